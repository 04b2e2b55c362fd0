//! The broker: pub/sub across processes and hosts through Redis/Valkey or NATS.
//!
//! One broker per process, apart from the shards. It owns the broker connections on its own
//! threads (`broker`; for Redis also `broker-pub`, see below) and talks with the shards only
//! through bounded channels one way and a [`Sink`] the other way, so a shard never waits on the
//! broker: every shard-side call ([`BrokerHandle::publish`], [`ShardInterest::set`]) is a
//! `try_send` plus, for NATS, a wake-up of the broker's runtime.
//!
//! - **Interest, not traffic, drives subscriptions.** Each shard reports, per topic, whether it
//!   has local subscribers ([`ShardInterest`]: one notice when its first subscriber of a topic
//!   arrives and one when its last leaves). The broker keeps the table topic → shards with
//!   subscribers ([`ShardSet`]), subscribes to the topic on the broker while the set is not
//!   empty and unsubscribes when it empties. A host never receives topics nobody there wants.
//! - **One crossing per process.** A message from the broker is handed to the sink once, with
//!   the set of shards that want it; the sink (the product's pub/sub) encodes it once into a
//!   shared frame and sends it to those shards only.
//! - **Publishes are answered.** [`BrokerHandle::publish`] refuses at once (broker down, queue
//!   full) or queues the publish; a queued publish gets exactly one [`Sink::outcome`]: accepted
//!   by the broker, or refused with a [`Refusal`] (timeout, connection lost, too large, shutting
//!   down). The queue is bounded in count and bytes (`broker.max_pending`,
//!   `broker.max_pending_bytes`) and every publish has a deadline (`broker.publish_timeout`).
//!   Nothing is dropped silently: a publish that is dropped unanswered (the broker thread ending)
//!   answers `shutting down` from its `Drop`.
//! - **Faults.** An unreachable broker at start is retried with backoff and jitter while the
//!   process serves; [`BrokerHandle::is_up`] says whether it is up (for `/healthz`). After a lost
//!   connection the broker reconnects, subscribes again to every topic with local subscribers and
//!   emits one [`Sink::gap`] per such topic: messages published meanwhile are lost
//!   (at-most-once across an outage), and subscribers are told.
//!
//! Threads: Redis's synchronous client cannot wait on a socket and a channel at once, so Redis
//! runs two threads: `broker` owns the subscriber connection (reading it with a short timeout,
//! between reads applying interest notices) and `broker-pub` owns the publishing connection
//! (blocked on the publish queue, so a publish goes out at once). NATS runs one thread, `broker`,
//! with a current-thread tokio runtime for async-nats that lives only there; shards never run
//! async code.
//!
//! The wire (`wire.rs`): a message shardnet publishes carries a 20-byte header (origin process,
//! publish time) before its data, which gives the publish-to-delivery latency of this process's
//! own publishes; a message another program publishes without the header is delivered as its
//! data.

mod backoff;
mod core;
mod metrics;
mod nats;
mod redis;
mod wire;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::config::{BrokerConfig, BrokerKind};

pub use backoff::Backoff;
pub use metrics::{BrokerMetrics, BrokerStats, LATENCY_BOUNDS_US};
pub use wire::{subject_for_nats, topic_from_nats};

/// The shards that have local subscribers of one topic.
#[derive(Clone, PartialEq, Eq)]
pub struct ShardSet {
    words: Box<[u64]>,
}

impl ShardSet {
    /// An empty set for a process of `shards` shards.
    pub fn new(shards: usize) -> ShardSet {
        ShardSet {
            words: vec![0; shards.div_ceil(64).max(1)].into_boxed_slice(),
        }
    }

    pub fn insert(&mut self, shard: usize) {
        if let Some(w) = self.words.get_mut(shard / 64) {
            *w |= 1 << (shard % 64);
        }
    }

    pub fn remove(&mut self, shard: usize) {
        if let Some(w) = self.words.get_mut(shard / 64) {
            *w &= !(1 << (shard % 64));
        }
    }

    pub fn contains(&self, shard: usize) -> bool {
        self.words
            .get(shard / 64)
            .is_some_and(|w| w & (1 << (shard % 64)) != 0)
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    pub fn len(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// The shards in the set, in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros() as usize;
                w &= w - 1;
                Some(i * 64 + bit)
            })
        })
    }
}

impl fmt::Debug for ShardSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

/// Who is waiting for a publish's outcome: opaque to the broker, handed back with it (the
/// product puts there the shard, the connection's token and which of its requests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ticket {
    pub shard: usize,
    pub token: u64,
    pub id: u64,
}

/// Who published a message that came from the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A shardnet process: the data is what that process handed to [`BrokerHandle::publish`].
    Shardnet,
    /// Another program (no shardnet header): the data is the message as published.
    Other,
}

/// The broker took the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// Redis: the subscriber connections the message reached, one per process with local
    /// subscribers of the topic (this one included). NATS does not say (`None`).
    pub receivers: Option<u64>,
}

/// Why a publish was not taken by the broker. The message is what a client is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("broker unavailable")]
    Down,
    #[error("broker queue full (broker.max_pending / broker.max_pending_bytes)")]
    QueueFull,
    #[error("the broker did not accept the message within broker.publish_timeout; it may still be delivered")]
    Timeout,
    #[error("the broker connection was lost before the broker answered; the message may still be delivered")]
    Lost,
    #[error("message of {size} bytes is larger than the broker accepts ({max} bytes)")]
    TooLarge { size: usize, max: usize },
    #[error("shutting down")]
    ShuttingDown,
    /// The broker answered with an error (already redacted of any secret).
    #[error("broker error: {0}")]
    Broker(String),
}

impl Refusal {
    /// The reason as a metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::Down => "down",
            Refusal::QueueFull => "queue_full",
            Refusal::Timeout => "timeout",
            Refusal::Lost => "lost",
            Refusal::TooLarge { .. } => "too_large",
            Refusal::ShuttingDown => "shutdown",
            Refusal::Broker(_) => "error",
        }
    }

    fn index(&self) -> usize {
        REFUSAL_LABELS
            .iter()
            .position(|l| *l == self.label())
            .unwrap_or(REFUSAL_LABELS.len() - 1)
    }
}

/// Every [`Refusal::label`], in the order of [`BrokerStats::refused`].
pub const REFUSAL_LABELS: &[&str] = &[
    "down",
    "queue_full",
    "timeout",
    "lost",
    "too_large",
    "shutdown",
    "error",
];

pub type Outcome = Result<Accepted, Refusal>;

/// Where the broker hands what it has for the shards. Called on the broker's threads; an
/// implementation must not block (the product's sends a command on each shard's bounded
/// channel and wakes it).
pub trait Sink: Send + Sync + 'static {
    /// A message for `topic` from the broker, for the shards in `shards` (never empty): `data`
    /// as [`BrokerHandle::publish`] took it when `source` is [`Source::Shardnet`], else the
    /// message as another program published it.
    fn message(&self, topic: &Arc<str>, data: &[u8], shards: &ShardSet, source: Source);
    /// The connection to the broker was (re)established after `topic` had local subscribers
    /// without one: messages may have been missed. Once per topic per reconnection.
    fn gap(&self, topic: &Arc<str>, shards: &ShardSet);
    /// The outcome of a publish [`BrokerHandle::publish`] queued (on `topic`); exactly once per
    /// publish.
    fn outcome(&self, ticket: Ticket, topic: &str, outcome: Outcome);
}

/// A shard's report: `shard` has (`wanted`) or no longer has local subscribers of `topic`.
#[derive(Debug)]
struct Notice {
    shard: usize,
    topic: Box<str>,
    wanted: bool,
}

/// A publish waiting for the broker. Dropped without an outcome (the broker thread ended), it
/// answers [`Refusal::ShuttingDown`] itself.
struct Publish {
    ticket: Ticket,
    topic: Box<str>,
    data: Vec<u8>,
    enqueued: Instant,
    shared: Arc<Shared>,
    answered: bool,
}

impl Publish {
    /// Answers the publish (once), counts it and releases its room in the queue.
    fn resolve(mut self, outcome: Outcome) {
        self.answer(outcome);
    }

    fn answer(&mut self, outcome: Outcome) {
        if std::mem::replace(&mut self.answered, true) {
            return;
        }
        self.shared.release(self.data.len());
        match &outcome {
            Ok(_) => self.shared.metrics.count_published(),
            Err(r) => self.shared.metrics.count_refused(r.index()),
        }
        self.shared.sink.outcome(self.ticket, &self.topic, outcome);
    }

    /// What goes to the broker: header (this process, the publish's time) and data.
    fn payload(&self) -> Vec<u8> {
        let at = self.enqueued.saturating_duration_since(self.shared.epoch);
        wire::encode(self.shared.origin, at.as_nanos() as u64, &self.data)
    }

    fn expired(&self, now: Instant) -> bool {
        now.duration_since(self.enqueued) >= self.shared.publish_timeout
    }

    /// Time left before the deadline (zero when past it).
    fn remaining(&self, now: Instant) -> Duration {
        self.shared
            .publish_timeout
            .saturating_sub(now.duration_since(self.enqueued))
    }
}

impl Drop for Publish {
    fn drop(&mut self) {
        self.answer(Err(Refusal::ShuttingDown));
    }
}

/// What the handles and the broker threads share.
struct Shared {
    publish_tx: Sender<Publish>,
    notice_tx: Sender<Notice>,
    sink: Arc<dyn Sink>,
    metrics: Arc<BrokerMetrics>,
    /// Publishes queued or in flight, and their payload bytes (bounded by the two maxima).
    pending: AtomicUsize,
    pending_bytes: AtomicUsize,
    max_pending: usize,
    max_pending_bytes: usize,
    publish_timeout: Duration,
    /// Set once shutdown begins: new publishes are refused.
    closed: AtomicBool,
    /// Wakes the NATS runtime after a send; Redis's threads wait on their own.
    wake: Option<Arc<tokio::sync::Notify>>,
    /// When publish times are counted from (the header's clock).
    epoch: Instant,
    /// This process, in the header of its publishes (random per start).
    origin: u64,
}

impl Shared {
    fn release(&self, bytes: usize) {
        self.pending.fetch_sub(1, Ordering::AcqRel);
        self.pending_bytes.fetch_sub(bytes, Ordering::AcqRel);
    }

    fn wake(&self) {
        if let Some(n) = &self.wake {
            n.notify_one();
        }
    }
}

/// A shard's way to the broker: cheap to clone, never blocks.
#[derive(Clone)]
pub struct BrokerHandle {
    shared: Arc<Shared>,
}

impl BrokerHandle {
    /// Whether [`BrokerHandle::publish`] would take a publish now (not closed, the publisher
    /// connected, room in the queue), without counting anything. A publish pipelined behind
    /// others that would be refused waits instead, so that its refusal is answered in order.
    pub fn accepts(&self) -> bool {
        let s = &self.shared;
        !s.closed.load(Ordering::Acquire)
            && s.metrics.publisher_up()
            && s.pending.load(Ordering::Acquire) < s.max_pending
    }

    /// Queues `data` for `topic` (the product hands the encoded message a subscriber gets, so a
    /// receiving process only frames it). `Ok`: the outcome comes
    /// later through [`Sink::outcome`], exactly once. `Err`: refused at once (broker down, queue
    /// full, shutting down); no outcome follows.
    pub fn publish(&self, ticket: Ticket, topic: &str, data: Vec<u8>) -> Result<(), Refusal> {
        let s = &self.shared;
        let refuse = |r: Refusal| {
            s.metrics.count_refused(r.index());
            Err(r)
        };
        if s.closed.load(Ordering::Acquire) {
            return refuse(Refusal::ShuttingDown);
        }
        if !s.metrics.publisher_up() {
            return refuse(Refusal::Down);
        }
        let bytes = data.len();
        let count = s.pending.fetch_add(1, Ordering::AcqRel);
        let total = s.pending_bytes.fetch_add(bytes, Ordering::AcqRel);
        if count >= s.max_pending || total + bytes > s.max_pending_bytes {
            s.release(bytes);
            return refuse(Refusal::QueueFull);
        }
        let publish = Publish {
            ticket,
            topic: topic.into(),
            data,
            enqueued: Instant::now(),
            shared: s.clone(),
            answered: false,
        };
        match s.publish_tx.try_send(publish) {
            Ok(()) => {
                s.wake();
                Ok(())
            }
            Err(e) => {
                let reason = match e {
                    TrySendError::Full(_) => Refusal::QueueFull,
                    TrySendError::Disconnected(_) => Refusal::ShuttingDown,
                };
                let mut p = e.into_inner();
                // Answered here, through the return value, not the sink.
                p.answered = true;
                s.release(p.data.len());
                refuse(reason)
            }
        }
    }

    /// The interest reporter for `shard` (one per shard, owned by it).
    pub fn interest(&self, shard: usize) -> ShardInterest {
        ShardInterest {
            shard,
            shared: self.shared.clone(),
            held: HashMap::new(),
        }
    }

    /// Whether the broker connections are up (subscribing and publishing both).
    pub fn is_up(&self) -> bool {
        self.shared.metrics.is_up()
    }

    pub fn metrics(&self) -> &Arc<BrokerMetrics> {
        &self.shared.metrics
    }
}

/// One shard's interest reports. The shard calls [`ShardInterest::set`] when its first local
/// subscriber of a topic arrives (`true`) and when its last leaves (`false`). A notice the
/// channel cannot take now is held here, coalesced per topic (only the last state matters), and
/// sent by the next `set` or [`ShardInterest::flush`] (call it on a timer while
/// [`ShardInterest::held`] is not zero): the broker's view converges and the shard never waits.
/// What is held is bounded by the topics this shard has subscribers of or just dropped.
pub struct ShardInterest {
    shard: usize,
    shared: Arc<Shared>,
    held: HashMap<Box<str>, bool>,
}

impl ShardInterest {
    pub fn set(&mut self, topic: &str, wanted: bool) {
        if !self.held.is_empty() {
            // Behind notices already held: keep the order per topic by holding this one too.
            self.held.insert(topic.into(), wanted);
            self.flush();
            return;
        }
        let notice = Notice {
            shard: self.shard,
            topic: topic.into(),
            wanted,
        };
        match self.shared.notice_tx.try_send(notice) {
            Ok(()) => self.shared.wake(),
            Err(TrySendError::Full(n)) => {
                self.held.insert(n.topic, n.wanted);
            }
            // The broker has stopped: interest no longer matters.
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// Sends what is held, as far as the channel takes it; returns what is still held.
    pub fn flush(&mut self) -> usize {
        let mut sent = false;
        let topics: Vec<Box<str>> = self.held.keys().cloned().collect();
        for topic in topics {
            let wanted = self.held[&topic];
            let notice = Notice {
                shard: self.shard,
                topic: topic.clone(),
                wanted,
            };
            match self.shared.notice_tx.try_send(notice) {
                Ok(()) => {
                    self.held.remove(&topic);
                    sent = true;
                }
                Err(TrySendError::Full(_)) => break,
                Err(TrySendError::Disconnected(_)) => {
                    self.held.clear();
                    break;
                }
            }
        }
        if sent {
            self.shared.wake();
        }
        self.held.len()
    }

    /// Notices waiting for room in the channel.
    pub fn held(&self) -> usize {
        self.held.len()
    }
}

/// The time slice a broker thread asks for (see [`relay_thread_started`]).
const RELAY_SLICE: Duration = Duration::from_micros(100);

/// Called first on every broker thread: they wake for a message, hand it on and sleep, so they
/// ask for a short slice ([`crate::sys::affinity::request_short_slice`]). Where a process's
/// threads share a core with a busy shard (its own or another process's), a message would
/// otherwise wait for the shard's slice to end at each of its hops through a broker thread.
fn relay_thread_started() {
    if !crate::sys::affinity::request_short_slice(RELAY_SLICE) {
        log::debug!("broker: the kernel refused a short time slice for this thread");
    }
}

/// Room in the interest channel: notices are small, and a full channel only delays them.
const NOTICE_CHANNEL: usize = 4096;

/// The running broker: its threads and the handle shards use.
pub struct Broker {
    handle: BrokerHandle,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// What a broker thread needs.
struct Context {
    config: BrokerConfig,
    shards: usize,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    publish_rx: Receiver<Publish>,
    notice_rx: Receiver<Notice>,
}

impl Broker {
    /// Starts the broker threads for `config` (whose kind is not `none`) in a process of
    /// `shards` shards. It does not wait for the broker: an unreachable one is retried in the
    /// background (see [`BrokerHandle::is_up`]).
    pub fn start(
        config: &BrokerConfig,
        shards: usize,
        sink: Arc<dyn Sink>,
    ) -> std::io::Result<Broker> {
        let (publish_tx, publish_rx) = crossbeam_channel::bounded(config.max_pending.max(1));
        let (notice_tx, notice_rx) = crossbeam_channel::bounded(NOTICE_CHANNEL);
        let wake = (config.kind == BrokerKind::Nats).then(|| Arc::new(tokio::sync::Notify::new()));
        let shared = Arc::new(Shared {
            publish_tx,
            notice_tx,
            sink,
            metrics: Arc::new(BrokerMetrics::new(config.kind)),
            pending: AtomicUsize::new(0),
            pending_bytes: AtomicUsize::new(0),
            max_pending: config.max_pending.max(1),
            max_pending_bytes: config.max_pending_bytes,
            publish_timeout: config.publish_timeout,
            closed: AtomicBool::new(false),
            wake,
            epoch: Instant::now(),
            origin: backoff::seed().wrapping_mul(0x2545_f491_4f6c_dd1d) | 1,
        });
        let stop = Arc::new(AtomicBool::new(false));
        let cx = Context {
            config: config.clone(),
            shards: shards.max(1),
            shared: shared.clone(),
            stop: stop.clone(),
            publish_rx,
            notice_rx,
        };
        let threads = match config.kind {
            BrokerKind::Redis => redis::spawn(cx)?,
            BrokerKind::Nats => nats::spawn(cx)?,
            BrokerKind::None => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "broker.kind = \"none\" has no broker to start",
                ))
            }
        };
        Ok(Broker {
            handle: BrokerHandle { shared },
            stop,
            threads,
        })
    }

    pub fn handle(&self) -> BrokerHandle {
        self.handle.clone()
    }

    pub fn metrics(&self) -> &Arc<BrokerMetrics> {
        self.handle.metrics()
    }

    /// Stops the broker threads: publishes still queued are refused (`shutting down`), the
    /// connections close. Waits for the threads at most `within`; returns whether they ended.
    pub fn shutdown(mut self, within: Duration) -> bool {
        self.stop_threads(within)
    }

    fn stop_threads(&mut self, within: Duration) -> bool {
        self.handle.shared.closed.store(true, Ordering::Release);
        self.stop.store(true, Ordering::Release);
        self.handle.shared.wake();
        let deadline = Instant::now() + within;
        let mut clean = true;
        for t in self.threads.drain(..) {
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                clean = false;
            }
        }
        clean
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop_threads(Duration::from_secs(5));
        }
    }
}

/// `text` with every secret of the broker url replaced by `***`: for messages from the client
/// libraries, which are logged and may end up in a refusal.
fn redact(text: impl fmt::Display, secrets: &[String]) -> String {
    let mut out = text.to_string();
    for s in secrets {
        out = out.replace(s.as_str(), "***");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what the broker hands out.
    #[derive(Default)]
    pub(super) struct Recorder(pub parking_lot::Mutex<Vec<String>>);

    impl Sink for Recorder {
        fn message(&self, topic: &Arc<str>, data: &[u8], shards: &ShardSet, source: Source) {
            let d = String::from_utf8_lossy(data);
            self.0
                .lock()
                .push(format!("message {topic} {d} {shards:?} {source:?}"));
        }
        fn gap(&self, topic: &Arc<str>, shards: &ShardSet) {
            self.0.lock().push(format!("gap {topic} {shards:?}"));
        }
        fn outcome(&self, ticket: Ticket, _topic: &str, outcome: Outcome) {
            self.0
                .lock()
                .push(format!("outcome {} {outcome:?}", ticket.id));
        }
    }

    /// A `Shared` with channels of the given room, and their receivers.
    pub(super) fn shared(
        sink: Arc<dyn Sink>,
        notices: usize,
        publishes: usize,
    ) -> (Arc<Shared>, Receiver<Notice>, Receiver<Publish>) {
        let (publish_tx, publish_rx) = crossbeam_channel::bounded(publishes);
        let (notice_tx, notice_rx) = crossbeam_channel::bounded(notices);
        let s = Arc::new(Shared {
            publish_tx,
            notice_tx,
            sink,
            metrics: Arc::new(BrokerMetrics::new(BrokerKind::Redis)),
            pending: AtomicUsize::new(0),
            pending_bytes: AtomicUsize::new(0),
            max_pending: publishes,
            max_pending_bytes: 1000,
            publish_timeout: Duration::from_secs(1),
            closed: AtomicBool::new(false),
            wake: None,
            epoch: Instant::now(),
            origin: 7,
        });
        (s, notice_rx, publish_rx)
    }

    #[test]
    fn held_notices_are_coalesced_and_sent_later() {
        let (s, rx, _p) = shared(Arc::new(Recorder::default()), 1, 1);
        let mut i = BrokerHandle { shared: s }.interest(2);
        i.set("a", true);
        i.set("b", true);
        i.set("b", false);
        i.set("c", true);
        assert_eq!(i.held(), 2, "b (last: unwanted) and c wait");
        let first = rx.try_recv().unwrap();
        assert_eq!((first.shard, &*first.topic, first.wanted), (2, "a", true));
        let mut got = Vec::new();
        for _ in 0..4 {
            i.flush();
            while let Ok(n) = rx.try_recv() {
                got.push((n.topic.to_string(), n.wanted));
            }
        }
        got.sort();
        assert_eq!(got, vec![("b".into(), false), ("c".into(), true)]);
        assert_eq!(i.held(), 0);
    }

    #[test]
    fn publishes_are_bounded_and_answered_once() {
        let rec = Arc::new(Recorder::default());
        let (s, _n, prx) = shared(rec.clone(), 1, 2);
        s.metrics.set_pub_up(true);
        let h = BrokerHandle { shared: s.clone() };
        let t = |id| Ticket {
            shard: 0,
            token: 0,
            id,
        };
        assert_eq!(
            h.publish(t(1), "x", vec![0; 2000]),
            Err(Refusal::QueueFull),
            "bytes"
        );
        h.publish(t(2), "x", vec![1]).unwrap();
        h.publish(t(3), "x", vec![2]).unwrap();
        assert_eq!(
            h.publish(t(4), "x", vec![3]),
            Err(Refusal::QueueFull),
            "count"
        );
        assert_eq!(s.pending.load(Ordering::Relaxed), 2);
        // One answered by the broker, one dropped unanswered: that one says so itself.
        prx.recv()
            .unwrap()
            .resolve(Ok(Accepted { receivers: Some(1) }));
        drop(prx.recv().unwrap());
        assert_eq!(s.pending.load(Ordering::Relaxed), 0);
        assert_eq!(s.pending_bytes.load(Ordering::Relaxed), 0);
        assert_eq!(
            *rec.0.lock(),
            vec![
                "outcome 2 Ok(Accepted { receivers: Some(1) })".to_string(),
                "outcome 3 Err(ShuttingDown)".to_string()
            ]
        );
        let stats = s.metrics.snapshot();
        assert_eq!((stats.published, stats.refused_total()), (1, 3));
        s.metrics.set_pub_up(false);
        assert_eq!(h.publish(t(5), "x", vec![1]), Err(Refusal::Down));
    }

    #[test]
    fn shard_sets() {
        let mut s = ShardSet::new(130);
        assert!(s.is_empty());
        for i in [0, 63, 64, 129] {
            s.insert(i);
        }
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0, 63, 64, 129]);
        assert_eq!(s.len(), 4);
        assert!(s.contains(64) && !s.contains(65));
        s.remove(63);
        s.insert(500); // out of range: ignored
        assert_eq!(format!("{s:?}"), "{0, 64, 129}");
    }

    #[test]
    fn redaction_scrubs_every_secret() {
        let secrets = vec!["hunter2".to_string()];
        assert_eq!(
            redact("AUTH failed for hunter2 at hunter2", &secrets),
            "AUTH failed for *** at ***"
        );
    }

    #[test]
    fn refusal_labels_cover_every_reason() {
        for r in [
            Refusal::Down,
            Refusal::QueueFull,
            Refusal::Timeout,
            Refusal::Lost,
            Refusal::TooLarge { size: 1, max: 0 },
            Refusal::ShuttingDown,
            Refusal::Broker("x".into()),
        ] {
            assert_eq!(REFUSAL_LABELS[r.index()], r.label());
        }
    }
}
