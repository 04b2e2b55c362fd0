//! Pub/sub: topics, the wire format, batching, fan-out across shards and slow consumers.
//!
//! One [`Hub`] per shard, owned by that shard's router: its topic → local subscribers map, each
//! subscriber's topics, and the publishes received but not yet delivered. A publish is encoded
//! once into a shared frame (`Arc<[u8]>`) and sent to every shard over its command channel
//! (with an eventfd wake; [`Fanout`]); each shard writes it to its own subscribers. The one
//! structure shared between shards is the subscriber count per topic ([`Registry`], for the
//! `POST /publish` answer), locked only on subscribe, unsubscribe and publish requests, never on
//! delivery.
//!
//! Wire format (text frames, JSON): a subscriber receives `{"topic":T,"data":D}`. `D` is the
//! `data` of a WebSocket `{"op":"publish"}`, re-encoded; for `POST /publish/{topic}` it is the
//! body as sent when the body is one JSON value (no re-encoding, no escaping), else the body as a
//! JSON string when it is UTF-8 text (escaped: control bytes cost up to 6 bytes each). A body
//! that is not UTF-8 is refused (415): the text frame cannot carry it; send it base64-encoded.
//! The size is checked on the encoded frame payload, so what a subscriber receives is never
//! larger than the limit it was checked against.
//!
//! With a broker (`[broker] kind = "redis" | "nats"`, [`super::broker`]) a publish does not go to
//! the shards directly: its encoded message (the frame's payload) goes to the broker, and every
//! process subscribed to the topic, this one included, gets it back and frames it once; the
//! broker's [`BrokerSink`] hands the frame to the shards with subscribers of the topic only. So
//! every subscriber of a topic, on any host, sees its messages in the broker's order (Redis:
//! one order for all; NATS: each publishing process's order). The hub tells the broker when a topic gets its first local subscriber on this shard and when it
//! loses its last ([`ShardInterest`]); after a broker outage each local subscriber of a topic
//! gets `{"topic":T,"gap":true}`: messages may have been missed (at-most-once delivery). A
//! refused publish answers the publisher: `POST /publish` with 503 and the reason, a WebSocket
//! publisher with `{"error":…,"op":"publish","topic":…}`.
//!
//! Invariants:
//! - A publish is delivered to a subscriber only while that subscriber's queued output is under
//!   `max_write_buffer`, checked per message before it is queued: a subscriber never holds more
//!   than `max_write_buffer` plus one message. A message that does not fit is dropped (counted)
//!   or, under `slow_consumer = "disconnect"`, ends the connection with 1008.
//! - Publishes are appended to their topic's log as they arrive (one hash lookup each). A
//!   delivery pass over a topic visits its subscribers in a fixed order and writes each, in one
//!   write, every message of the log it has not had; messages of one topic keep their order and
//!   reach each subscriber once. A message that arrives while a pass is in progress reaches the
//!   subscribers the pass has not visited yet in that pass, and the ones it has in the next
//!   pass, so a message waits at most about one pass, not the rest of the pass in progress and
//!   then its place in the next. A subscriber gets the messages that arrive after it
//!   subscribed; one that leaves during a pass does not make the pass skip another (see `Topic`).
//! - Delivery stops once a wake's work passes [`DELIVERY_BUDGET`] (subscribers visited plus
//!   messages handled), also in the middle of a topic's pass, and continues on the next wake,
//!   which the hub requests by sending itself a command: other connections on the shard are
//!   served, and new publishes read, between the pieces. Messages held for delivery are bounded
//!   by [`PENDING_MAX`] (a topic keeps a message until every subscriber has had it); beyond it
//!   publishes are lost, and counted.
//! - Across a hand-over to a new process every publish reaches every subscriber once: the
//!   [`Gate`] holds the publishes made while connections move (in the process they were made
//!   in) and releases them at the commit, where the subscribers then are; see [`Gate`]. Not with
//!   a broker: a gap notice then, and rarely a repeat ([`PubsubHandover`]).
//! - A delivery round (one pass over each topic with messages to deliver) starts at most once per
//!   [`DELIVERY_INTERVAL`]: a publish after a quiet spell goes out at once, publishes that come
//!   faster wait for the next round and share its writes. Each write to a socket costs the
//!   same kernel work (on loopback the receiver's TCP processing too) whether it carries one
//!   message or five, so at 1,000 publishes/s to 1,000 subscribers this halves the writes for
//!   at most 2 ms of added latency, instead of running the shard at its limit, where latency is
//!   whatever queue builds up.
//! - With a broker, a round that is due waits up to [`ECHO_WAIT`] for this shard's own
//!   publishes of locally subscribed topics to come back from the broker ([`Echoes`]), so they
//!   go out to every subscriber in this round. Without it a saturated shard's own publishes
//!   leave while a round is being written and come back during it, and the subscribers the
//!   round has already visited get them a whole pass (the time to write every subscriber
//!   once) later than they would without a broker.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use indexmap::IndexMap;
use parking_lot::Mutex;

use super::broker::{
    BrokerHandle, BrokerMetrics, Outcome, Refusal, ShardInterest, ShardSet, Sink, Source, Ticket,
};
use super::compression::{Compression, Delivery};
use super::metrics::ServiceCounters;
use crate::config::SlowConsumer;
use crate::server::Peers;
use crate::service::deflate::{DeflateCounters, MAX_WINDOW_BITS, MIN_WINDOW_BITS};
use crate::service::ws::{self, Message};
use crate::service::{Ctx, Token};

/// How long a slow subscriber closed with 1008 has to read its backlog and the close frame.
const SLOW_CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Work one wake may spend delivering: subscribers visited plus messages handled (at least one
/// subscriber per wake). Small enough that a shard reads its commands about every millisecond
/// in a long pass (1,024 is about 100 subscribers owed ten messages each), so messages that
/// arrive during it reach the subscribers it has not visited yet.
pub const DELIVERY_BUDGET: usize = 1024;
/// Publishes a shard holds for delivery at most (beyond it they are counted as lost).
pub const PENDING_MAX: usize = 65536;
/// The shortest time between the starts of two delivery rounds (see the module's invariants).
pub const DELIVERY_INTERVAL: Duration = Duration::from_millis(2);
/// The longest a due delivery round waits for the broker to bring back this shard's own
/// publishes (see the module's invariants).
pub const ECHO_WAIT: Duration = Duration::from_millis(2);
/// A publish not back from the broker after this long is taken for one that never comes here
/// (its message went to a topic this shard has no subscriber of by then, or was lost).
const ECHO_LOST: Duration = Duration::from_millis(50);
/// Publishes a shard remembers as on their way through the broker at most; past it a publish
/// is not waited for.
const ECHOES_MAX: usize = 4096;

/// A message between shards' routers.
#[derive(Clone)]
pub enum Cmd {
    Publish {
        topic: Arc<str>,
        frame: Arc<[u8]>,
    },
    /// Sent by a shard to itself: deliver what the last wake's budget left.
    Continue,
    /// The broker's answer to a publish a connection of this shard made.
    Outcome {
        ticket: Ticket,
        topic: Box<str>,
        outcome: Outcome,
    },
}

/// What a route allows of one connection's pub/sub use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicLimits {
    /// Topics one connection may subscribe to at once.
    pub max_topics: usize,
    /// Longest topic name, in bytes.
    pub max_topic_length: usize,
    /// Largest encoded message (frame payload) a publish may produce.
    pub max_message: usize,
}

/// Why a publish or a subscription was refused; the message names the limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("topic must be 1 to {max} bytes (max_topic_length)")]
    Topic { max: usize },
    #[error("subscription refused: this connection has {max} topics (max_topics)")]
    TooManyTopics { max: usize },
    #[error("message of {size} bytes once encoded is larger than max_message ({max} bytes)")]
    TooLarge { size: usize, max: usize },
    #[error("body is neither JSON nor UTF-8 text: send binary data base64-encoded")]
    NotText,
    /// A hand-over is under way and this publish cannot be held for it (the hold is full, or
    /// the connection stays with a process that is handing over): publish again.
    #[error("the server is handing its connections to a new process: publish again in a moment")]
    Moving,
}

/// Subscribers per topic, all shards together, and the gate every publish goes through.
#[derive(Default)]
pub struct Registry {
    counts: Mutex<HashMap<Box<str>, usize>>,
    pub gate: Gate,
}

/// Publishes held at most while a hand-over runs (beyond either bound a publish is refused
/// with [`Refused::Moving`]).
pub const HELD_MAX: usize = 65536;
pub const HELD_BYTES: usize = 64 << 20;

/// How long releasing held publishes waits for room in a shard's full command channel.
const RELEASE_WAIT: Duration = Duration::from_secs(5);

/// One publish: its topic and its encoded frame.
pub type Publish = (Arc<str>, Arc<[u8]>);

/// Where the process's publishes go: to every shard at once (the normal case), or held while
/// connections move to or from another process.
///
/// Why: between its export and the commit a moving subscriber is in neither process's hub, and
/// a publisher of either process reaches only its own process's subscribers. So once the
/// listeners have moved, the old process holds its publishes ([`Gate::hold`], before any
/// connection is exported); what was published before is delivered before the export
/// ([`Hub::flush`]), into the subscribers' output, which moves with them. The new process
/// refuses publishes until its commit ([`Gate::refuse`]: `503` with `Retry-After`, or the
/// WebSocket error message), rather than hold them: it could still fail, after its publishers
/// had been told their publish was taken. At the end the old process relays its held
/// publishes to the new one ([`Gate::take_relay`], before `End`) and refuses further ones (only
/// connections that stay with it can still publish there); the new process, after its commit,
/// broadcasts them ([`Gate::release`]) to subscribers that are all its own by then, and opens.
/// If the hand-over fails, the old process broadcasts what it held itself: nothing is lost
/// unless the old process dies, which takes its connections along too.
///
/// Publishers take the read side of one lock per publish (one atomic operation uncontended);
/// switching modes takes the write side, which waits for the publishes under way to finish, so
/// none slips past a switch.
#[derive(Default)]
pub struct Gate {
    mode: parking_lot::RwLock<GateMode>,
    held: Mutex<Held>,
    /// Every shard's command channel, for releasing held publishes.
    peers: std::sync::OnceLock<Peers<Cmd>>,
}

#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
enum GateMode {
    #[default]
    Open,
    Holding,
    Refusing,
}

#[derive(Default)]
struct Held {
    /// What the old process relayed (new process only).
    relayed: Vec<Publish>,
    /// This process's own (old process only), in the order they were made, kept after they
    /// were relayed until the outcome is known.
    own: Vec<Publish>,
    bytes: usize,
}

impl Gate {
    /// The first shard to start gives the gate the way to every shard.
    pub fn set_peers(&self, peers: &Peers<Cmd>) {
        let _ = self.peers.set(peers.clone());
    }

    /// Publishes from now on are held.
    pub fn hold(&self) {
        *self.mode.write() = GateMode::Holding;
    }

    /// Publishes from now on are refused ([`Refused::Moving`]).
    pub fn refuse(&self) {
        *self.mode.write() = GateMode::Refusing;
    }

    /// Old process, every connection sent: what was held, encoded for the new process; further
    /// publishes are refused until the outcome. The held publishes stay here too: the
    /// subscribers that stay get them after the commit, everyone after a failure.
    pub fn take_relay(&self) -> Vec<u8> {
        *self.mode.write() = GateMode::Refusing;
        encode_publishes(&self.held.lock().own)
    }

    /// New process: publishes the old one relayed.
    pub fn add_relayed(&self, data: &[u8]) -> Result<(), String> {
        let publishes = decode_publishes(data)?;
        let mut held = self.held.lock();
        held.bytes += publishes
            .iter()
            .map(|(t, f)| t.len() + f.len())
            .sum::<usize>();
        held.relayed.extend(publishes);
        Ok(())
    }

    /// Broadcasts everything held (relayed first, then this process's own, then `extra`) to
    /// this process's shards, in order; then publishes go out again (`open`) or stay refused (a
    /// process that has handed over).
    pub fn release(&self, extra: Vec<Publish>, open: bool) {
        let mut mode = self.mode.write();
        let held = std::mem::take(&mut *self.held.lock());
        if let Some(peers) = self.peers.get() {
            let mut missed = 0;
            for (topic, frame) in held.relayed.into_iter().chain(held.own).chain(extra) {
                missed += broadcast_waiting(peers, Cmd::Publish { topic, frame });
            }
            if missed > 0 {
                log::error!(
                    "pub/sub: {missed} shard deliveries of held publishes lost: their queues \
                     stayed full"
                );
            }
        }
        *mode = if open {
            GateMode::Open
        } else {
            GateMode::Refusing
        };
    }

    /// Sends one publish to every shard, or holds or refuses it; returns how many shards'
    /// queues refused it.
    fn publish(&self, peers: &Peers<Cmd>, topic: &str, frame: Arc<[u8]>) -> Result<usize, Refused> {
        let mode = self.mode.read();
        match *mode {
            GateMode::Open => {
                let sent = peers.broadcast(Cmd::Publish {
                    topic: Arc::from(topic),
                    frame,
                });
                Ok(peers.len() - sent)
            }
            GateMode::Holding => {
                let mut held = self.held.lock();
                let size = topic.len() + frame.len();
                let count = held.own.len() + held.relayed.len();
                if count >= HELD_MAX || held.bytes + size > HELD_BYTES {
                    return Err(Refused::Moving);
                }
                held.bytes += size;
                held.own.push((Arc::from(topic), frame));
                Ok(0)
            }
            GateMode::Refusing => Err(Refused::Moving),
        }
    }
}

/// Broadcasts `cmd`, waiting (bounded) for room in a full queue; returns the shards it missed.
fn broadcast_waiting(peers: &Peers<Cmd>, cmd: Cmd) -> usize {
    let deadline = std::time::Instant::now() + RELEASE_WAIT;
    let mut missed = 0;
    for shard in 0..peers.len() {
        while !peers.send(shard, cmd.clone()) {
            if std::time::Instant::now() >= deadline {
                missed += 1;
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    missed
}

/// `u32 count`, then per publish `u32 topic length | topic | u32 frame length | frame`
/// (little-endian); empty for none.
fn encode_publishes(publishes: &[Publish]) -> Vec<u8> {
    if publishes.is_empty() {
        return Vec::new();
    }
    let size: usize = publishes.iter().map(|(t, f)| 8 + t.len() + f.len()).sum();
    let mut out = Vec::with_capacity(4 + size);
    out.extend_from_slice(&(publishes.len() as u32).to_le_bytes());
    for (topic, frame) in publishes {
        out.extend_from_slice(&(topic.len() as u32).to_le_bytes());
        out.extend_from_slice(topic.as_bytes());
        out.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        out.extend_from_slice(frame);
    }
    out
}

fn decode_publishes(mut data: &[u8]) -> Result<Vec<Publish>, String> {
    fn take<'a>(data: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
        if data.len() < n {
            return Err("held publishes that end early".into());
        }
        let (head, rest) = data.split_at(n);
        *data = rest;
        Ok(head)
    }
    fn len(data: &mut &[u8]) -> Result<usize, String> {
        Ok(u32::from_le_bytes(take(data, 4)?.try_into().expect("4 bytes")) as usize)
    }
    if data.is_empty() {
        return Ok(Vec::new());
    }
    let n = len(&mut data)?;
    let mut out = Vec::with_capacity(n.min(HELD_MAX));
    for _ in 0..n {
        let t = len(&mut data)?;
        let topic = std::str::from_utf8(take(&mut data, t)?)
            .map_err(|_| "a held publish whose topic is not UTF-8".to_string())?;
        let f = len(&mut data)?;
        let frame = take(&mut data, f)?;
        out.push((Arc::from(topic), Arc::from(frame)));
    }
    Ok(out)
}

/// What the product hands across a process hand-over: its publishes, through the [`Gate`].
///
/// With a broker (`[broker] kind` other than `"none"`) publishes do not go through the gate:
/// they go to the broker, which has taken them once it answers (a publisher's 200 stands whatever
/// becomes of the hand-over), and comes back to each process on its own connection. A moved
/// subscriber's topics enter the new process's hub at import, before the commit, so that
/// process subscribes at the broker (interest notices) before the old one lets go (at the commit,
/// when its lent connections are released). Between the two, the processes' two broker
/// connections share no point to cut at: across the switch a message may be missed (each moved
/// subscriber gets `{"topic":T,"gap":true}` for each of its topics, first thing after its moved
/// output, `Router::import_ws`, as after a broker outage) or, when the new process already had
/// the topic and its broker connection lags the old one's, delivered twice.
pub struct PubsubHandover {
    pub registry: Arc<Registry>,
}

impl crate::server::handover::HandoverHooks for PubsubHandover {
    fn begin(&self) {
        self.registry.gate.hold();
    }

    fn relay(&self) -> Vec<u8> {
        self.registry.gate.take_relay()
    }

    fn committed(&self) {
        // The subscribers that stayed here (until they close) get what was held; publishing
        // here stays refused: this process is on its way out.
        self.registry.gate.release(Vec::new(), false);
    }

    fn failed(&self, _returned: Vec<Vec<u8>>) {
        // The new process holds nothing of its own to give back (it refuses publishes).
        self.registry.gate.release(Vec::new(), true);
    }

    fn taking(&self) {
        self.registry.gate.refuse();
    }

    fn received(&self, data: &[u8]) {
        if let Err(e) = self.registry.gate.add_relayed(data) {
            log::error!("pub/sub: the old process relayed {e}");
        }
    }

    fn took(&self) {
        self.registry.gate.release(Vec::new(), true);
    }
}

impl Registry {
    pub fn count(&self, topic: &str) -> usize {
        self.counts.lock().get(topic).copied().unwrap_or(0)
    }

    fn add(&self, topic: &str) {
        *self.counts.lock().entry(Box::from(topic)).or_insert(0) += 1;
    }

    fn remove(&self, topic: &str) {
        let mut counts = self.counts.lock();
        if let Some(n) = counts.get_mut(topic) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(topic);
            }
        }
    }
}

/// Checks a topic name against the limit.
pub fn check_topic(topic: &str, limits: &TopicLimits) -> Result<(), Refused> {
    if topic.is_empty() || topic.len() > limits.max_topic_length {
        return Err(Refused::Topic {
            max: limits.max_topic_length,
        });
    }
    Ok(())
}

/// Encodes `{"topic":T,"data":…}` as a server text frame, with `data` written by `write_data`;
/// refuses a payload over `max_message`.
fn envelope(
    topic: &str,
    max_message: usize,
    write_data: impl FnOnce(&mut Vec<u8>),
) -> Result<Arc<[u8]>, Refused> {
    // Room for the longest frame header in front, so the frame is built in place.
    const HEAD: usize = 10;
    let mut v = Vec::with_capacity(HEAD + 32 + topic.len());
    v.resize(HEAD, 0);
    v.extend_from_slice(b"{\"topic\":");
    // Writing JSON into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut v, topic);
    v.extend_from_slice(b",\"data\":");
    write_data(&mut v);
    v.push(b'}');
    let size = v.len() - HEAD;
    if size > max_message {
        return Err(Refused::TooLarge {
            size,
            max: max_message,
        });
    }
    let (h, n) = ws::frame_header(ws::OP_TEXT, size);
    v[HEAD - n..HEAD].copy_from_slice(&h[..n]);
    Ok(Arc::from(&v[HEAD - n..]))
}

/// The frame for an HTTP publish body (see the module's wire format).
pub fn encode_body(topic: &str, body: &[u8], max_message: usize) -> Result<Arc<[u8]>, Refused> {
    // The envelope adds at least this much to the body, escaped or not.
    let least = body.len() + topic.len() + 20;
    if least > max_message {
        return Err(Refused::TooLarge {
            size: least,
            max: max_message,
        });
    }
    if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok() {
        return envelope(topic, max_message, |v| v.extend_from_slice(body));
    }
    let Ok(text) = std::str::from_utf8(body) else {
        return Err(Refused::NotText);
    };
    envelope(topic, max_message, |v| {
        let _ = serde_json::to_writer(v, text);
    })
}

/// The frame for a WebSocket publish's `data`.
fn encode_value(
    topic: &str,
    data: &serde_json::Value,
    max_message: usize,
) -> Result<Arc<[u8]>, Refused> {
    envelope(topic, max_message, |v| {
        let _ = serde_json::to_writer(v, data);
    })
}

/// One shard's way to reach every shard's hub (or the broker), and the shared subscriber counts.
pub struct Fanout {
    peers: Peers<Cmd>,
    shard: usize,
    registry: Arc<Registry>,
    broker: Option<BrokerHandle>,
    /// This shard's publishes on their way through the broker.
    pub echoes: RefCell<Echoes>,
}

/// This shard's publishes that the broker took and has not brought back yet, per topic, oldest
/// first, each with its number in sending order and the time it was sent. A message from the
/// broker of topic T counts as the oldest one of T coming back: it may be another process's,
/// which only ends a wait early.
#[derive(Default)]
pub struct Echoes {
    topics: HashMap<Box<str>, VecDeque<(u64, Instant)>>,
    len: usize,
    /// The number the next publish sent gets.
    next: u64,
}

impl Echoes {
    /// A publish of `topic` went to the broker at `at`. At the bound, those older than
    /// [`ECHO_LOST`] are forgotten first (a shard with no round due never asks for the others).
    pub fn sent(&mut self, topic: &str, at: Instant) {
        if self.len >= ECHOES_MAX {
            self.awaited(0, at, |_| true);
            if self.len >= ECHOES_MAX {
                return;
            }
        }
        self.len += 1;
        let sent = (self.next, at);
        self.next += 1;
        match self.topics.get_mut(topic) {
            Some(times) => times.push_back(sent),
            None => {
                self.topics.insert(topic.into(), VecDeque::from([sent]));
            }
        }
    }

    /// A message of `topic` came from the broker.
    pub fn came_back(&mut self, topic: &str) {
        if self.len == 0 {
            return;
        }
        if let Some(times) = self.topics.get_mut(topic) {
            times.pop_front();
            self.len -= 1;
            if times.is_empty() {
                self.topics.remove(topic);
            }
        }
    }

    /// The number the next publish sent gets: those sent so far are below it.
    fn cut(&self) -> u64 {
        self.next
    }

    /// Whether a publish sent before `cut` ([`Echoes::cut`]) of a topic that is `wanted` here
    /// has not come back. Forgets the publishes of topics that are not wanted (their messages
    /// are not sent to this shard) and those older than [`ECHO_LOST`] at `now`.
    fn awaited(&mut self, cut: u64, now: Instant, wanted: impl Fn(&str) -> bool) -> bool {
        if self.len == 0 {
            return false;
        }
        let mut awaited = false;
        let len = &mut self.len;
        self.topics.retain(|topic, times| {
            if !wanted(topic) {
                *len -= times.len();
                return false;
            }
            while times
                .front()
                .is_some_and(|&(_, t)| now.saturating_duration_since(t) > ECHO_LOST)
            {
                times.pop_front();
                *len -= 1;
            }
            awaited |= times.front().is_some_and(|&(n, _)| n < cut);
            !times.is_empty()
        });
        awaited
    }
}

impl Fanout {
    pub fn new(
        peers: Peers<Cmd>,
        shard: usize,
        registry: Arc<Registry>,
        broker: Option<BrokerHandle>,
    ) -> Self {
        Fanout {
            peers,
            shard,
            registry,
            broker,
            echoes: RefCell::default(),
        }
    }

    /// The broker, when publishes go through one.
    pub fn broker(&self) -> Option<&BrokerHandle> {
        self.broker.as_ref()
    }

    /// Hands an encoded frame's message to the broker for connection `token` (request `id`;
    /// 0 for a WebSocket publish). `Ok`: the outcome comes back as [`Cmd::Outcome`].
    pub fn publish_via_broker(
        &self,
        token: Token,
        id: u64,
        topic: &str,
        frame: &[u8],
        counters: &ServiceCounters,
    ) -> Result<(), Refusal> {
        let Some(broker) = &self.broker else {
            return Err(Refusal::Down);
        };
        let payload = match ws::decode_server_frame(frame) {
            Ok(Some((_, _, range, _))) => frame[range].to_vec(),
            _ => frame.to_vec(),
        };
        let ticket = Ticket {
            shard: self.shard,
            token: token.0,
            id,
        };
        broker.publish(ticket, topic, payload)?;
        self.echoes.borrow_mut().sent(topic, Instant::now());
        counters.ws_published.inc();
        Ok(())
    }

    /// Sends an encoded frame to every shard (this one included, through its channel, so that
    /// every subscriber sees publishes in one order per publisher); returns the subscribers
    /// counted on `topic`.
    ///
    /// While a hand-over runs the publish is held for the commit ([`Gate`]), or refused with
    /// [`Refused::Moving`] when it cannot be.
    pub fn publish(
        &self,
        topic: &str,
        frame: Arc<[u8]>,
        counters: &ServiceCounters,
    ) -> Result<usize, Refused> {
        let reached = self.registry.count(topic);
        let lost = self.registry.gate.publish(&self.peers, topic, frame)?;
        counters.ws_published.inc();
        if lost > 0 {
            counters.ws_fanout_lost.add(lost as u64);
        }
        Ok(reached)
    }

    /// Asks this shard to wake again (to go on delivering); false if its queue is full, in which
    /// case the commands waiting there wake it anyway.
    fn wake_self(&self) -> bool {
        self.peers.send(self.shard, Cmd::Continue)
    }
}

/// The messages of the pass in progress, compressed once per window size for all the
/// subscribers that share it: built as far as the first subscriber needing them, extended when
/// messages arrive during the pass, reset when a pass starts (the buffers are kept).
#[derive(Default)]
struct Packed {
    data: Vec<u8>,
    /// Where the frame of the log's `i`th message ends in `data`.
    ends: Vec<usize>,
}

impl Packed {
    fn frame(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.data[start..self.ends[i]]
    }

    fn reset(&mut self) {
        if self.ends.is_empty() {
            return;
        }
        self.data.clear();
        self.ends.clear();
        // A burst's large buffer goes back to the allocator.
        if self.data.capacity() > PACKED_KEEP {
            *self = Packed::default();
        }
    }
}

const WINDOW_SIZES: usize = (MAX_WINDOW_BITS - MIN_WINDOW_BITS + 1) as usize;

/// One [`Packed`] per window size.
type Packs = [Packed; WINDOW_SIZES];

/// Capacity a pass's compressed buffer keeps for the next pass.
const PACKED_KEEP: usize = 1 << 20;

/// What delivery needs of the shard's permessage-deflate state.
pub struct Deflate<'a> {
    pub compression: &'a mut Compression,
    pub counters: &'a DeflateCounters,
}

/// One topic's subscribers on this shard and the messages not yet written to all of them.
///
/// Messages are numbered in arrival order; each subscriber remembers the first number it has
/// not been written. A pass visits the subscribers in `subs` order and writes each what it has
/// not had, in one write; a message that arrives during a pass reaches the subscribers the pass
/// has not visited yet in this pass, and the others in the next one. Removing a subscriber keeps
/// the visited ones before `cursor` (see [`Topic::remove`]), so a pass never skips one.
#[derive(Default)]
struct Topic {
    /// Subscriber → number of the first message it has not been written.
    subs: IndexMap<Token, u64>,
    /// Messages some subscriber has still to get; `log[0]` is number `base`.
    log: Vec<Arc<[u8]>>,
    base: u64,
    /// A pass is in progress; the subscribers before `cursor` have been visited in it.
    in_pass: bool,
    cursor: usize,
    /// The log's end when the pass in progress (or the last one) started.
    pass_from: u64,
    /// In [`Hub::current`] or [`Hub::next`].
    queued: bool,
}

impl Topic {
    fn end(&self) -> u64 {
        self.base + self.log.len() as u64
    }

    /// A new subscriber gets the messages that arrive from now on; false if it was one already.
    fn add(&mut self, token: Token) -> bool {
        let end = self.end();
        match self.subs.entry(token) {
            indexmap::map::Entry::Occupied(_) => false,
            indexmap::map::Entry::Vacant(v) => {
                v.insert(end);
                true
            }
        }
    }

    /// Removes a subscriber. One visited in the pass in progress changes places with the last
    /// visited one first, which then makes room for the last of all: the visited stay before
    /// the cursor, the others after it.
    fn remove(&mut self, token: Token) {
        let Some(i) = self.subs.get_index_of(&token) else {
            return;
        };
        if self.in_pass && i < self.cursor {
            self.cursor -= 1;
            self.subs.swap_indices(i, self.cursor);
            self.subs.swap_remove_index(self.cursor);
        } else {
            self.subs.swap_remove_index(i);
        }
    }

    /// Starts a pass; returns how many messages left the log. Every subscriber has been
    /// written everything before the last pass's start (those visited then got everything
    /// up to their visit, and the ones added since start at their subscribe), so those go.
    fn start_pass(&mut self) -> usize {
        let done = (self.pass_from - self.base) as usize;
        self.log.drain(..done);
        self.base = self.pass_from;
        self.pass_from = self.end();
        self.in_pass = true;
        self.cursor = 0;
        done
    }

    /// Visits subscribers of the pass in progress until `budget` work is done (one per
    /// subscriber visited plus what `write` reports: it writes `log[from..]` to one subscriber
    /// and returns the messages it handled); true when the pass is over.
    fn advance(
        &mut self,
        budget: usize,
        work: &mut usize,
        mut write: impl FnMut(Token, &[Arc<[u8]>], usize) -> usize,
    ) -> bool {
        let end = self.end();
        while self.cursor < self.subs.len() && *work < budget {
            let (&token, upto) = self.subs.get_index_mut(self.cursor).expect("in range");
            self.cursor += 1;
            *work += 1;
            if *upto < end {
                debug_assert!(*upto >= self.base, "a subscriber's messages left the log");
                let from = upto.saturating_sub(self.base) as usize;
                *upto = end;
                *work += write(token, &self.log, from);
            }
        }
        if self.cursor < self.subs.len() {
            return false;
        }
        self.in_pass = false;
        self.cursor = 0;
        true
    }

    /// After a pass: whether subscribers it visited early have messages to come (they arrived
    /// during it), so the topic needs another pass.
    fn behind(&self) -> bool {
        self.end() > self.pass_from
    }

    /// Everyone has everything: the log empties. Returns how many messages left it.
    fn caught_up(&mut self) -> usize {
        let n = self.log.len();
        self.base += n as u64;
        self.log.clear();
        self.pass_from = self.base;
        n
    }
}

/// One shard's topics, subscribers and undelivered publishes.
#[derive(Default)]
pub struct Hub {
    /// With a broker: where the first and last local subscriber of a topic are reported.
    interest: Option<ShardInterest>,
    /// Local subscribers and undelivered messages per topic.
    topics: HashMap<Arc<str>, Topic>,
    /// Each subscriber's topics (for its limit and for cleanup on close).
    subscriptions: HashMap<Token, Vec<Arc<str>>>,
    /// The topics the round in progress (or the next) passes over, in the order their messages
    /// arrived; the front one's pass may be in progress. A name whose topic is gone is skipped.
    current: VecDeque<Arc<str>>,
    /// Topics whose subscribers visited early in their last pass have messages to come; the
    /// next round passes over them first.
    next: VecDeque<Arc<str>>,
    /// Messages in the topics' logs.
    messages: usize,
    /// The messages of the pass in progress, compressed once per window size.
    packed: Packs,
    /// A `Continue` is on its way to this shard.
    continuing: bool,
    /// When the last delivery round started, and whether it ran out of budget with topics
    /// left (those go out at the next wake, not after the interval).
    round_started: Option<Instant>,
    unfinished: bool,
    /// Since when a due round waits for this shard's publishes to come back from the broker,
    /// and for which of them (those numbered below: [`Echoes::cut`]).
    echo_wait: Option<(Instant, u64)>,
}

impl Hub {
    /// A hub that reports its topics' interest to the broker.
    pub fn with_interest(interest: Option<ShardInterest>) -> Hub {
        Hub {
            interest,
            ..Hub::default()
        }
    }

    /// Sends the interest notices the broker's channel could not take yet (called every tick).
    pub fn flush_interest(&mut self) {
        if let Some(i) = &mut self.interest {
            if i.held() > 0 {
                i.flush();
            }
        }
    }

    /// Subscribes `token` to `topic`; true if it was not subscribed yet. Refused, and nothing
    /// changed, at the limits. A subscriber gets the messages that arrive after it subscribed.
    pub fn subscribe(
        &mut self,
        token: Token,
        topic: &str,
        limits: &TopicLimits,
        registry: &Registry,
    ) -> Result<bool, Refused> {
        check_topic(topic, limits)?;
        let subs = self.subscriptions.get(&token).map_or(&[][..], |v| &v[..]);
        if subs.iter().any(|t| &**t == topic) {
            return Ok(false);
        }
        if subs.len() >= limits.max_topics {
            return Err(Refused::TooManyTopics {
                max: limits.max_topics,
            });
        }
        let key: Arc<str> = match self.topics.get_key_value(topic) {
            Some((k, _)) => k.clone(),
            None => Arc::from(topic),
        };
        self.subscriptions
            .entry(token)
            .or_default()
            .push(key.clone());
        let t = self.topics.entry(key).or_default();
        t.add(token);
        if t.subs.len() == 1 {
            if let Some(i) = &mut self.interest {
                i.set(topic, true);
            }
        }
        registry.add(topic);
        Ok(true)
    }

    /// Unsubscribes; false if `token` was not subscribed to `topic`.
    pub fn unsubscribe(&mut self, token: Token, topic: &str, registry: &Registry) -> bool {
        let Some(subs) = self.subscriptions.get_mut(&token) else {
            return false;
        };
        let Some(i) = subs.iter().position(|t| &**t == topic) else {
            return false;
        };
        subs.swap_remove(i);
        if subs.is_empty() {
            self.subscriptions.remove(&token);
        }
        self.forget(token, topic, registry);
        true
    }

    /// The topics `token` is subscribed to.
    pub fn topics_of(&self, token: Token) -> &[Arc<str>] {
        self.subscriptions.get(&token).map_or(&[], |v| &v[..])
    }

    /// The connection closed: drops every subscription it had.
    pub fn on_close(&mut self, token: Token, registry: &Registry) {
        if let Some(topics) = self.subscriptions.remove(&token) {
            for t in topics {
                self.forget(token, &t, registry);
            }
        }
    }

    fn forget(&mut self, token: Token, topic: &str, registry: &Registry) {
        if let Some(t) = self.topics.get_mut(topic) {
            t.remove(token);
            if t.subs.is_empty() {
                self.messages -= t.log.len();
                self.topics.remove(topic);
                if let Some(i) = &mut self.interest {
                    i.set(topic, false);
                }
            }
        }
        registry.remove(topic);
    }

    /// A command from a shard (this one included).
    pub fn on_command(&mut self, cmd: Cmd, counters: &ServiceCounters) {
        match cmd {
            Cmd::Publish { topic, frame } => {
                if !self.queue(topic, frame) {
                    counters.ws_fanout_lost.inc();
                }
            }
            Cmd::Continue => self.continuing = false,
            // Answered by the router, which owns the connections' HTTP state.
            Cmd::Outcome { .. } => {}
        }
    }

    /// Adds a publish to its topic's log; false if the pending bound is reached.
    fn queue(&mut self, topic: Arc<str>, frame: Arc<[u8]>) -> bool {
        let Some(t) = self.topics.get_mut(&topic) else {
            return true; // no subscriber here: nothing to deliver
        };
        if self.messages >= PENDING_MAX {
            return false;
        }
        self.messages += 1;
        t.log.push(frame);
        if !t.queued {
            t.queued = true;
            self.current.push_back(topic);
        }
        true
    }

    /// Whether publishes wait for delivery.
    pub fn has_pending(&self) -> bool {
        !self.current.is_empty() || !self.next.is_empty()
    }

    /// When the pending publishes' round may start, if they wait for [`DELIVERY_INTERVAL`] or
    /// for [`ECHO_WAIT`]; `None` when nothing waits on it (nothing pending, no round yet, or a
    /// round to finish). A wait for echoes ends earlier when they come (a command wakes the
    /// shard).
    pub fn next_round(&self) -> Option<Instant> {
        if !self.has_pending() || self.unfinished {
            return None;
        }
        let interval = self.round_started.map(|t| t + DELIVERY_INTERVAL);
        let echoes = self.echo_wait.map(|(t, _)| t + ECHO_WAIT);
        interval.max(echoes)
    }

    /// Whether a delivery round is due at `now`: publishes wait, the interval since the last
    /// round has passed, and none of this shard's own publishes made before the round became
    /// due is still on its way back from the broker (waited for up to [`ECHO_WAIT`]). The
    /// publishes counted are those sent before the wait began, not by time: `now` is the
    /// shard's clock of this loop turn, older than the publishes the turn read.
    pub fn round_due(&mut self, now: Instant, echoes: &mut Echoes) -> bool {
        if !self.has_pending() {
            return false;
        }
        if self.unfinished {
            return true;
        }
        if self
            .round_started
            .is_some_and(|t| now < t + DELIVERY_INTERVAL)
        {
            return false;
        }
        let (since, cut) = *self.echo_wait.get_or_insert((now, echoes.cut()));
        if now < since + ECHO_WAIT && echoes.awaited(cut, now, |t| self.topics.contains_key(t)) {
            return false;
        }
        self.echo_wait = None;
        true
    }

    /// Runs the round (starting one at `now` if none is in progress) until `budget` work is
    /// done: one pass over each topic in `current`, in order. `write` writes a subscriber its
    /// messages (`log[from..]`, with the pass's compressed frames) and returns how many it
    /// handled. True if the round is over.
    fn run_round(
        &mut self,
        now: Instant,
        budget: usize,
        mut write: impl FnMut(&mut Packs, Token, &[Arc<[u8]>], usize) -> usize,
    ) -> bool {
        if !self.unfinished {
            self.round_started = Some(now);
            self.echo_wait = None;
            // The topics the last round left behind first, then those that came since.
            if !self.next.is_empty() {
                let mut round = std::mem::take(&mut self.next);
                round.append(&mut self.current);
                self.current = round;
            }
        }
        let mut work = 0;
        while work < budget {
            let Some(name) = self.current.front() else {
                break;
            };
            let Some(topic) = self.topics.get_mut(name) else {
                self.current.pop_front(); // every subscriber left
                continue;
            };
            if !topic.in_pass {
                self.messages -= topic.start_pass();
                self.packed.iter_mut().for_each(Packed::reset);
            }
            let packed = &mut self.packed;
            let over = topic.advance(budget, &mut work, |token, log, from| {
                write(packed, token, log, from)
            });
            if !over {
                break;
            }
            let name = self.current.pop_front().expect("the front");
            if topic.behind() {
                self.next.push_back(name);
            } else {
                self.messages -= topic.caught_up();
                topic.queued = false;
            }
        }
        self.unfinished = !self.current.is_empty();
        !self.unfinished
    }

    /// Delivers waiting messages, topic by topic, until the wake's budget is spent; asks for
    /// another wake through `fanout` if the round is not over. `policy` gives a connection's
    /// slow-consumer policy and how its messages are written (compressed or not), or `None` if
    /// it is not a pub/sub connection. A pass's messages are compressed at most once per window
    /// size, for all the subscribers that share it; a `dedicated` subscriber's compressor
    /// compresses for it alone.
    pub fn deliver<S>(
        &mut self,
        ctx: &mut Ctx<'_, S>,
        fanout: &Fanout,
        counters: &ServiceCounters,
        deflate: &mut Deflate<'_>,
        policy: impl Fn(&mut S) -> Option<(SlowConsumer, Delivery)>,
    ) {
        let now = ctx.now();
        let over = self.run_round(now, DELIVERY_BUDGET, |packed, token, log, from| {
            let to = Subscriber {
                token,
                log,
                from,
                packed,
            };
            deliver_to(ctx, to, counters, deflate, &policy)
        });
        if !over && !self.continuing {
            self.continuing = fanout.wake_self();
        }
    }

    /// Delivers everything waiting, whatever the budget: the shard is about to export its
    /// connections (a hand-over), and what they are owed must be in their output by then.
    pub fn flush<S>(
        &mut self,
        ctx: &mut Ctx<'_, S>,
        fanout: &Fanout,
        counters: &ServiceCounters,
        deflate: &mut Deflate<'_>,
        policy: impl Fn(&mut S) -> Option<(SlowConsumer, Delivery)>,
    ) {
        while self.has_pending() {
            self.deliver(ctx, fanout, counters, deflate, &policy);
        }
    }
}

/// One subscriber of the pass in progress and the messages it is owed: `log[from..]`.
struct Subscriber<'a> {
    token: Token,
    log: &'a [Arc<[u8]>],
    from: usize,
    packed: &'a mut Packs,
}

/// Writes a subscriber the messages it is owed that fit under its bound; returns how many
/// messages it handled. A message is staged only while the subscriber's queued output (staged
/// bytes included) is under `max_write_buffer`; what was staged is then written, and if the
/// socket took it the next messages get their turn, so only a subscriber that is really not
/// reading loses messages. A `dedicated` subscriber's compressor sees only the messages
/// written to it; for `shared` subscribers the pass's messages are compressed once, for all.
fn deliver_to<S>(
    ctx: &mut Ctx<'_, S>,
    to: Subscriber<'_>,
    counters: &ServiceCounters,
    deflate: &mut Deflate<'_>,
    policy: &impl Fn(&mut S) -> Option<(SlowConsumer, Delivery)>,
) -> usize {
    let Subscriber {
        token,
        log,
        from,
        packed,
    } = to;
    let frames = log.len() - from;
    let mut next = from;
    while next < log.len() {
        let round = ctx.with_conn(token, |conn| {
            let (policy, delivery) = policy(conn.state())?;
            if let Delivery::Shared(bits) = delivery {
                let p = &mut packed[usize::from(bits.saturating_sub(MIN_WINDOW_BITS))];
                if p.ends.len() < log.len() {
                    let Deflate {
                        compression,
                        counters,
                    } = deflate;
                    let built = p.ends.len();
                    compression.pack_fanout(
                        bits,
                        &log[built..],
                        &mut p.data,
                        &mut p.ends,
                        counters,
                    );
                }
            }
            let mut i = next;
            while i < log.len() && !conn.over_limit() {
                match delivery {
                    Delivery::Plain => conn.write(&log[i]),
                    Delivery::Shared(bits) => {
                        let p = &packed[usize::from(bits.saturating_sub(MIN_WINDOW_BITS))];
                        conn.write(p.frame(i));
                    }
                    Delivery::Dedicated => deflate.compression.write_dedicated_frame(
                        token,
                        conn.out(),
                        &log[i],
                        deflate.counters,
                    ),
                }
                i += 1;
            }
            if i == next && policy == SlowConsumer::Disconnect {
                // The 1008 queues behind the backlog: a slow reader gets it within a second,
                // one that does not read at all is cut off then.
                ws::write_close(conn.out(), ws::CLOSE_POLICY, "slow consumer");
                conn.close_within(SLOW_CLOSE_GRACE);
            }
            Some((policy, i))
        });
        let Some(Some((policy, i))) = round else {
            return frames; // closed, or not a pub/sub connection
        };
        counters.ws_messages_out.add((i - next) as u64);
        if i == next {
            // At the bound with nothing written since: the rest does not fit.
            match policy {
                SlowConsumer::Drop => counters.ws_dropped.add((log.len() - i) as u64),
                SlowConsumer::Disconnect => counters.ws_slow_closed.inc(),
            }
            return frames;
        }
        next = i;
    }
    frames
}

/// A client's request on a pub/sub route.
pub enum Op {
    Subscribe(String),
    Unsubscribe(String),
    Publish(String, serde_json::Value),
    /// `{"op":"refresh","token":"..."}`: a newer token for this connection, handled by the
    /// router (which holds the connection's permissions), never by the hub.
    Refresh(String),
}

const USAGE: &str = "expected {\"op\":\"subscribe|unsubscribe|publish\",\"topic\":\"...\"} \
                     or {\"op\":\"refresh\",\"token\":\"...\"}";

/// Parses one client message (the router does, so that it can check permissions and the rate
/// limit between parsing and [`Hub::on_op`]).
pub fn parse_op(msg: &Message<'_>) -> Result<Op, &'static str> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Raw {
        op: String,
        #[serde(default)]
        topic: Option<String>,
        #[serde(default)]
        data: serde_json::Value,
        #[serde(default)]
        token: Option<String>,
    }
    let bytes = match msg {
        Message::Text(s) => s.as_bytes(),
        Message::Binary(b) => b,
    };
    let raw: Raw = serde_json::from_slice(bytes).map_err(|_| USAGE)?;
    match (raw.op.as_str(), raw.topic, raw.token) {
        ("subscribe", Some(t), None) => Ok(Op::Subscribe(t)),
        ("unsubscribe", Some(t), None) => Ok(Op::Unsubscribe(t)),
        ("publish", Some(t), None) => Ok(Op::Publish(t, raw.data)),
        ("refresh", None, Some(token)) => Ok(Op::Refresh(token)),
        ("subscribe" | "unsubscribe" | "publish" | "refresh", _, _) => Err(USAGE),
        _ => Err("op must be subscribe, unsubscribe, publish or refresh"),
    }
}

/// Writes one JSON text frame to a client.
pub fn reply(out: &mut Vec<u8>, body: &serde_json::Value) {
    ws::write_frame(out, ws::OP_TEXT, body.to_string().as_bytes());
}

/// What a WebSocket publisher is told when the broker refused its publish (at once or later).
pub fn publish_refused(out: &mut Vec<u8>, topic: &str, refusal: &Refusal) {
    reply(
        out,
        &serde_json::json!({ "error": refusal.to_string(), "op": "publish", "topic": topic }),
    );
}

/// The notice a subscriber gets after a broker outage: messages of `topic` may have been
/// missed.
pub fn gap_frame(topic: &str) -> Arc<[u8]> {
    let mut v = Vec::new();
    reply(&mut v, &serde_json::json!({ "topic": topic, "gap": true }));
    Arc::from(v)
}

/// The broker's way back to the shards: each message is framed once and sent to the shards
/// that have subscribers of its topic; each outcome to the shard of its publisher. Runs on the
/// broker's threads and never blocks: a shard queue that is full loses the message (counted in
/// the broker's metrics).
pub struct BrokerSink {
    /// Set once the shards exist (the engine hands them out when it starts them).
    peers: OnceLock<Peers<Cmd>>,
    metrics: OnceLock<Arc<BrokerMetrics>>,
    /// The largest message any pub/sub route accepts: what is framed for subscribers.
    max_message: usize,
}

impl BrokerSink {
    pub fn new(max_message: usize) -> BrokerSink {
        BrokerSink {
            peers: OnceLock::new(),
            metrics: OnceLock::new(),
            max_message,
        }
    }

    pub fn set_peers(&self, peers: Peers<Cmd>) {
        let _ = self.peers.set(peers);
    }

    pub fn set_metrics(&self, metrics: Arc<BrokerMetrics>) {
        let _ = self.metrics.set(metrics);
    }

    fn count(&self, f: impl FnOnce(&BrokerMetrics)) {
        if let Some(m) = self.metrics.get() {
            f(m);
        }
    }

    fn to_shards(&self, topic: &Arc<str>, frame: Arc<[u8]>, shards: &ShardSet) {
        let Some(peers) = self.peers.get() else {
            return self.count(BrokerMetrics::count_handoff_lost);
        };
        for shard in shards.iter().filter(|&s| s < peers.len()) {
            let cmd = Cmd::Publish {
                topic: topic.clone(),
                frame: frame.clone(),
            };
            if !peers.send(shard, cmd) {
                self.count(BrokerMetrics::count_handoff_lost);
            }
        }
    }

    /// The frame for a message from the broker: shardnet's own messages are already encoded
    /// (`{"topic":…,"data":…}`) and only framed; another program's are encoded like a `POST
    /// /publish` body.
    fn frame(&self, topic: &str, data: &[u8], source: Source) -> Option<Arc<[u8]>> {
        match source {
            Source::Shardnet => {
                if data.len() > self.max_message || std::str::from_utf8(data).is_err() {
                    return None;
                }
                let (h, n) = ws::frame_header(ws::OP_TEXT, data.len());
                let mut v = Vec::with_capacity(n + data.len());
                v.extend_from_slice(&h[..n]);
                v.extend_from_slice(data);
                Some(Arc::from(v))
            }
            Source::Other => encode_body(topic, data, self.max_message).ok(),
        }
    }
}

impl Sink for BrokerSink {
    fn message(&self, topic: &Arc<str>, data: &[u8], shards: &ShardSet, source: Source) {
        match self.frame(topic, data, source) {
            Some(frame) => self.to_shards(topic, frame, shards),
            None => self.count(BrokerMetrics::count_undeliverable),
        }
    }

    fn gap(&self, topic: &Arc<str>, shards: &ShardSet) {
        self.to_shards(topic, gap_frame(topic), shards);
    }

    fn outcome(&self, ticket: Ticket, topic: &str, outcome: Outcome) {
        // A WebSocket publish (id 0) that went through is not acknowledged: nothing to send.
        if ticket.id == 0 && outcome.is_ok() {
            return;
        }
        let Some(peers) = self.peers.get() else {
            return self.count(BrokerMetrics::count_outcome_lost);
        };
        let cmd = Cmd::Outcome {
            ticket,
            topic: topic.into(),
            outcome,
        };
        if ticket.shard >= peers.len() || !peers.send(ticket.shard, cmd) {
            self.count(BrokerMetrics::count_outcome_lost);
        }
    }
}

/// Everything a pub/sub message needs besides the hub.
pub struct Client<'a> {
    pub token: Token,
    pub limits: &'a TopicLimits,
    pub fanout: &'a Fanout,
    pub counters: &'a ServiceCounters,
}

impl Hub {
    /// Handles one message on a pub/sub route, parsed by [`parse_op`] (the router checks the
    /// rate limit and the permissions in between); acknowledgements and errors go to `out`. A
    /// subscription is acknowledged only once it is in force; what is refused gets
    /// `{"error":…,"op":…,"topic":…}` and changes nothing. A `refresh` is the router's on
    /// routes with tokens; it reaches the hub only on a route without them, and is refused.
    pub fn on_op(&mut self, c: &Client<'_>, op: Op, out: &mut Vec<u8>) {
        let registry = &*c.fanout.registry;
        let (word, topic, result) = match op {
            Op::Subscribe(t) => {
                let r = self.subscribe(c.token, &t, c.limits, registry).map(|_| ());
                if r.is_err() {
                    c.counters.ws_subscribe_refused.inc();
                }
                ("subscribe", t, r)
            }
            Op::Unsubscribe(t) => {
                self.unsubscribe(c.token, &t, registry);
                ("unsubscribe", t, Ok(()))
            }
            Op::Publish(t, data) => {
                let r = check_topic(&t, c.limits)
                    .and_then(|()| encode_value(&t, &data, c.limits.max_message));
                match r {
                    // A publish that went out is not acknowledged (it is a stream).
                    Ok(frame) if c.fanout.broker().is_none() => {
                        match c.fanout.publish(&t, frame, c.counters) {
                            Ok(_) => return,
                            Err(e) => {
                                c.counters.ws_publish_refused.inc();
                                ("publish", t, Err(e))
                            }
                        }
                    }
                    Ok(frame) => {
                        match c
                            .fanout
                            .publish_via_broker(c.token, 0, &t, &frame, c.counters)
                        {
                            Ok(()) => return,
                            Err(refusal) => return publish_refused(out, &t, &refusal),
                        }
                    }
                    Err(e) => {
                        c.counters.ws_publish_refused.inc();
                        ("publish", t, Err(e))
                    }
                }
            }
            Op::Refresh(_) => {
                return reply(
                    out,
                    &serde_json::json!({
                        "error": "this route takes no tokens (auth = \"off\")",
                        "op": "refresh",
                    }),
                )
            }
        };
        match result {
            Ok(()) => reply(out, &serde_json::json!({ "ok": word, "topic": topic })),
            Err(e) => reply(
                out,
                &serde_json::json!({ "error": e.to_string(), "op": word, "topic": topic }),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: TopicLimits = TopicLimits {
        max_topics: 2,
        max_topic_length: 8,
        max_message: 64,
    };

    fn payload(frame: &[u8]) -> String {
        let (op, _, range, _) = ws::decode_server_frame(frame).unwrap().unwrap();
        assert_eq!(op, ws::OP_TEXT);
        String::from_utf8(frame[range].to_vec()).unwrap()
    }

    #[test]
    fn bodies_are_sent_as_json_when_they_are_json() {
        let f = encode_body("t", br#" {"a": [1, 2]} "#, 64).unwrap();
        assert_eq!(payload(&f), r#"{"topic":"t","data": {"a": [1, 2]} }"#);
        let f = encode_body("t", b"hi \"you\"\n", 64).unwrap();
        assert_eq!(payload(&f), r#"{"topic":"t","data":"hi \"you\"\n"}"#);
        assert_eq!(encode_body("t", &[0xff, 0xfe], 64), Err(Refused::NotText));
        // Control bytes escape to 6 bytes each: the check is on the encoded size.
        let ctl = [1u8; 20];
        assert!(matches!(
            encode_body("t", &ctl, 64),
            Err(Refused::TooLarge { size, max: 64 }) if size > 64
        ));
        assert!(matches!(
            encode_body("t", &[b'1'; 100], 64),
            Err(Refused::TooLarge { .. })
        ));
        // A long frame gets the 16-bit length header.
        let big = encode_body("t", &[b'x'; 300], 1000).unwrap();
        assert_eq!(payload(&big).len(), 300 + 23, "quoted");
        // Topics are JSON-escaped.
        let f = encode_body("a\"b", b"1", 64).unwrap();
        assert_eq!(payload(&f), r#"{"topic":"a\"b","data":1}"#);
    }

    #[test]
    fn subscriptions_respect_the_limits() {
        let mut hub = Hub::default();
        let reg = Registry::default();
        let t = Token(1);
        assert_eq!(hub.subscribe(t, "a", &LIMITS, &reg), Ok(true));
        assert_eq!(hub.subscribe(t, "a", &LIMITS, &reg), Ok(false));
        assert_eq!(hub.subscribe(t, "b", &LIMITS, &reg), Ok(true));
        assert_eq!(
            hub.subscribe(t, "c", &LIMITS, &reg),
            Err(Refused::TooManyTopics { max: 2 })
        );
        assert_eq!(reg.count("c"), 0, "nothing done when refused");
        assert_eq!(
            hub.subscribe(Token(2), "123456789", &LIMITS, &reg),
            Err(Refused::Topic { max: 8 })
        );
        assert_eq!(
            hub.subscribe(Token(2), "", &LIMITS, &reg),
            Err(Refused::Topic { max: 8 })
        );
        assert!(hub.unsubscribe(t, "a", &reg));
        assert_eq!(hub.subscribe(t, "c", &LIMITS, &reg), Ok(true), "room again");
        assert_eq!((reg.count("a"), reg.count("b"), reg.count("c")), (0, 1, 1));
        hub.on_close(t, &reg);
        assert_eq!((reg.count("b"), reg.count("c")), (0, 0));
        assert!(hub.topics.is_empty() && hub.subscriptions.is_empty());
    }

    #[test]
    fn publishes_group_per_topic_in_order_and_stay_bounded() {
        let mut hub = Hub::default();
        let reg = Registry::default();
        let limits = TopicLimits {
            max_topics: 100_000,
            ..LIMITS
        };
        for i in 0..1000 {
            hub.subscribe(Token(1), &format!("t{i}"), &limits, &reg)
                .unwrap();
        }
        let frame: Arc<[u8]> = Arc::from(&b"x"[..]);
        for round in 0..3 {
            for i in 0..1000 {
                let topic: Arc<str> = Arc::from(format!("t{i}"));
                assert!(hub.queue(topic, frame.clone()), "round {round}");
            }
        }
        assert!(hub.queue(Arc::from("nobody"), frame.clone()));
        assert_eq!(hub.current.len(), 1000, "each topic queued once");
        assert!(hub.topics.values().all(|t| t.log.len() == 3));
        assert_eq!(&*hub.current[7], "t7", "first-arrival order");
        assert_eq!(hub.messages, 3000);
        hub.messages = PENDING_MAX;
        assert!(!hub.queue(Arc::from("t1"), frame), "bounded");
    }

    fn message(n: u64) -> Arc<[u8]> {
        Arc::from(&n.to_le_bytes()[..])
    }

    /// A writer for [`Hub::run_round`] that records what each subscriber was written, one
    /// `Vec` per write.
    fn record(
        writes: &mut HashMap<Token, Vec<Vec<u64>>>,
    ) -> impl FnMut(&mut Packs, Token, &[Arc<[u8]>], usize) -> usize + '_ {
        |_, token, log, from| {
            let got = log[from..]
                .iter()
                .map(|m| u64::from_le_bytes(m[..].try_into().unwrap()))
                .collect();
            writes.entry(token).or_default().push(got);
            log.len() - from
        }
    }

    #[test]
    fn a_message_arriving_during_a_pass_reaches_the_subscribers_it_has_not_visited_yet() {
        let mut hub = Hub::default();
        let reg = Registry::default();
        for i in 0..10 {
            hub.subscribe(Token(i), "t", &LIMITS, &reg).unwrap();
        }
        let now = Instant::now();
        let mut writes = HashMap::new();
        assert!(hub.queue(Arc::from("t"), message(0)));
        // 2 work per subscriber (the visit and one message): the budget stops after two.
        assert!(!hub.run_round(now, 4, record(&mut writes)), "in progress");
        assert_eq!(writes.len(), 2);
        assert!(hub.queue(Arc::from("t"), message(1)));
        assert!(hub.queue(Arc::from("t"), message(2)));
        while !hub.run_round(now, 4, record(&mut writes)) {}
        let (early, late): (Vec<_>, Vec<_>) = (0..10)
            .map(Token)
            .partition(|t| writes[t].len() == 1 && writes[t][0] == [0]);
        assert_eq!(early.len(), 2, "{writes:?}");
        for t in &late {
            assert_eq!(writes[t], [vec![0, 1, 2]], "one write with all three");
        }
        // The two visited first get the rest in the next round, and only they.
        assert!(hub.has_pending());
        assert_eq!(hub.messages, 3);
        writes.clear();
        while !hub.run_round(now, 4, record(&mut writes)) {}
        assert_eq!(writes.len(), 2);
        for t in &early {
            assert_eq!(writes[t], [vec![1, 2]]);
        }
        assert!(!hub.has_pending());
        assert_eq!(hub.messages, 0, "the log empties once everyone has it");
        assert!(hub.topics["t"].log.is_empty());
    }

    #[test]
    fn every_subscriber_gets_every_message_once_in_order_whatever_joins_and_leaves_mid_pass() {
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let limits = TopicLimits {
            max_topics: 4,
            max_topic_length: 8,
            max_message: 64,
        };
        let names = ["a", "b", "c"];
        for trial in 0..50 {
            let mut hub = Hub::default();
            let reg = Registry::default();
            let now = Instant::now();
            // Per (subscriber, topic): the messages it is owed since it subscribed, and those
            // it was written; each message's topic.
            let mut owed: HashMap<(u64, &str), Vec<u64>> = HashMap::new();
            let mut got: HashMap<(u64, &str), Vec<u64>> = HashMap::new();
            let mut topic_of: Vec<&str> = Vec::new();
            let run = |hub: &mut Hub,
                       budget,
                       got: &mut HashMap<(u64, &str), Vec<u64>>,
                       topic_of: &[&'static str]| {
                let mut writes = HashMap::new();
                let over = hub.run_round(now, budget, record(&mut writes));
                for (token, ws) in writes {
                    for m in ws.into_iter().flatten() {
                        let key = (token.0, topic_of[m as usize]);
                        got.get_mut(&key).expect("written to a subscriber").push(m);
                    }
                }
                over
            };
            for _ in 0..600 {
                let topic = names[next(3) as usize];
                let sub = next(20);
                match next(10) {
                    0..=2 => {
                        if hub.subscribe(Token(sub), topic, &limits, &reg) == Ok(true) {
                            owed.insert((sub, topic), Vec::new());
                            got.insert((sub, topic), Vec::new());
                        }
                    }
                    3 => {
                        if hub.unsubscribe(Token(sub), topic, &reg) {
                            assert!(owed[&(sub, topic)].starts_with(&got[&(sub, topic)]));
                            owed.remove(&(sub, topic));
                            got.remove(&(sub, topic));
                        }
                    }
                    4..=6 => {
                        let m = topic_of.len() as u64;
                        topic_of.push(topic);
                        assert!(hub.queue(Arc::from(topic), message(m)));
                        for (k, v) in owed.iter_mut() {
                            if k.1 == topic {
                                v.push(m);
                            }
                        }
                    }
                    _ => {
                        run(&mut hub, 1 + next(12) as usize, &mut got, &topic_of);
                    }
                }
                for (k, g) in &got {
                    assert!(
                        owed[k].starts_with(g),
                        "trial {trial} {k:?}: {g:?} of {:?}",
                        owed[k]
                    );
                }
            }
            let mut rounds = 0;
            while hub.has_pending() {
                run(&mut hub, 1 + next(12) as usize, &mut got, &topic_of);
                rounds += 1;
                assert!(rounds < 10_000, "delivery ends");
            }
            assert_eq!(got, owed, "trial {trial}");
            assert_eq!(hub.messages, 0);
        }
    }

    #[test]
    fn delivery_rounds_start_at_most_once_per_interval() {
        let mut hub = Hub::default();
        let reg = Registry::default();
        let mut none = Echoes::default();
        hub.subscribe(Token(1), "t", &LIMITS, &reg).unwrap();
        let t0 = Instant::now();
        assert!(!hub.round_due(t0, &mut none), "nothing pending");
        assert!(hub.queue(Arc::from("t"), Arc::from(&b"x"[..])));
        // No round yet: at once.
        assert_eq!(hub.next_round(), None);
        assert!(hub.round_due(t0, &mut none));
        // A round just started: the next publish waits for the interval.
        hub.round_started = Some(t0);
        assert_eq!(hub.next_round(), Some(t0 + DELIVERY_INTERVAL));
        assert!(!hub.round_due(t0 + DELIVERY_INTERVAL / 2, &mut none));
        assert!(hub.round_due(t0 + DELIVERY_INTERVAL, &mut none));
        // A round that ran out of budget goes on at the next wake.
        hub.unfinished = true;
        assert_eq!(hub.next_round(), None);
        assert!(hub.round_due(t0, &mut none));
    }

    #[test]
    fn a_due_round_waits_briefly_for_its_own_publishes_to_come_back_from_the_broker() {
        let mut hub = Hub::default();
        let reg = Registry::default();
        hub.subscribe(Token(1), "t", &LIMITS, &reg).unwrap();
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut echoes = Echoes::default();
        // Pending from elsewhere; this shard sent two publishes of "t" and one of a topic
        // nobody here takes (which is never waited for, and forgotten).
        assert!(hub.queue(Arc::from("t"), Arc::from(&b"x"[..])));
        echoes.sent("t", t0);
        echoes.sent("t", t0 + ms(1));
        echoes.sent("elsewhere", t0);
        assert!(!hub.round_due(t0 + ms(1), &mut echoes), "waits for both");
        assert_eq!(echoes.len, 2, "the unwanted topic is forgotten");
        assert_eq!(hub.next_round(), Some(t0 + ms(1) + ECHO_WAIT));
        echoes.came_back("t");
        assert!(!hub.round_due(t0 + ms(1), &mut echoes), "one still away");
        // Publishes sent once the wait began do not extend it, even with an earlier time (the
        // shard's clock is the loop turn's).
        echoes.came_back("t");
        echoes.sent("t", t0);
        assert!(hub.round_due(t0 + ms(2), &mut echoes), "both back");
        // The wait ends after ECHO_WAIT whether or not they came back.
        hub.round_started = None;
        let since = t0 + ms(3);
        assert!(!hub.round_due(since, &mut echoes));
        assert!(!hub.round_due(since + ECHO_WAIT / 2, &mut echoes));
        assert!(
            hub.round_due(since + ECHO_WAIT, &mut echoes),
            "waited long enough"
        );
        // One that never came back is forgotten after ECHO_LOST.
        assert!(!echoes.awaited(u64::MAX, t0 + ms(3) + ECHO_LOST, |_| true));
        assert_eq!(echoes.len, 0);
        // Nothing is remembered past the bound; at it, the lost ones make room.
        for _ in 0..ECHOES_MAX + 10 {
            echoes.sent("t", t0);
        }
        assert_eq!(echoes.len, ECHOES_MAX);
        echoes.sent("u", t0 + ECHO_LOST + ms(1));
        assert_eq!(echoes.len, 1, "the old ones forgotten, the new one kept");
    }

    #[test]
    fn ops_are_parsed() {
        assert!(matches!(
            parse_op(&Message::Text(r#"{"op":"publish","topic":"t","data":[1]}"#)),
            Ok(Op::Publish(t, _)) if t == "t"
        ));
        assert_eq!(
            parse_op(&Message::Text(r#"{"op":"shout","topic":"t"}"#)).err(),
            Some("op must be subscribe, unsubscribe, publish or refresh")
        );
        assert_eq!(parse_op(&Message::Text("nope")).err(), Some(USAGE));
        assert!(matches!(
            parse_op(&Message::Text(r#"{"op":"refresh","token":"a.b.c"}"#)),
            Ok(Op::Refresh(t)) if t == "a.b.c"
        ));
        for bad in [
            r#"{"op":"refresh"}"#,
            r#"{"op":"refresh","token":"a","topic":"t"}"#,
            r#"{"op":"subscribe","token":"a"}"#,
            r#"{"op":"subscribe"}"#,
        ] {
            assert_eq!(parse_op(&Message::Text(bad)).err(), Some(USAGE), "{bad}");
        }
    }
}
