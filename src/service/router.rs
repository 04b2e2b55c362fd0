//! The product service: routes each listener's connections to echo, HTTP or WebSocket, and runs
//! the pub/sub hub.
//!
//! One `Router` per shard. Pub/sub fan-out crosses shards without a lock on the delivery path:
//! a publish is encoded once into a shared frame (`Arc<[u8]>`) and sent to every shard over its
//! command channel (with an eventfd wake); each shard writes it to its own subscribers, found in
//! its own topic → subscribers map. The one shared structure is the subscriber count per topic
//! (for the `/publish` answer), locked only on subscribe, unsubscribe and publish requests.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crossbeam_utils::CachePadded;
use parking_lot::Mutex;

use super::http::{App, DateCache, Http, HttpConn, HttpSettings};
use super::ws::{self, Message, WsConn};
use super::{CloseReason, Conn, Ctx, Service, ShardInfo, Token};
use crate::config::{
    Balance as BalanceConfig, Config, LimitsConfig, ServiceKind, Shards, SlowConsumer, Trigger,
    WsMode, WsRouteConfig,
};
use crate::server::{
    Balance, Limits, ListenerSpec, Peers, Pinning, Server, ServerBuilder, ServerError, Tuning,
};
use crate::stats::StatsView;

/// Hand-over blob of an echo connection.
const BLOB_ECHO: u8 = 1;

/// How long a slow subscriber closed with 1008 has to read its backlog and the close frame.
const SLOW_CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

crate::stats::counters! {
    /// Counters of the HTTP and WebSocket services, per shard.
    ServiceCounters, ServiceSnapshot {
        http_requests: Counter, "HTTP requests answered";
        http_errors: Counter, "HTTP requests answered with an error status that closed the connection";
        ws_upgrades: Counter, "WebSocket upgrades completed";
        ws_open: Gauge, "WebSocket connections open";
        ws_messages_in: Counter, "WebSocket data messages received";
        ws_messages_out: Counter, "WebSocket data messages sent (echoes and pub/sub deliveries)";
        ws_protocol_closes: Counter, "WebSocket connections closed for a protocol violation (1002, 1007, 1009)";
        ws_published: Counter, "pub/sub messages published from this shard";
        ws_dropped: Counter, "pub/sub messages dropped for slow subscribers (slow_consumer = drop)";
        ws_slow_closed: Counter, "slow subscribers closed with 1008 (slow_consumer = disconnect)";
        ws_fanout_lost: Counter, "pub/sub messages not delivered to a shard because its queue was full";
        ws_pings: Counter, "heartbeat pings sent";
        ws_reaped: Counter, "connections closed for not answering a ping within pong_timeout";
    }
}

/// State shared by every shard's router (off the hot path).
pub struct Shared {
    pub stats: StatsView,
    pub counters: Box<[CachePadded<ServiceCounters>]>,
    /// Subscribers per topic, all shards together: the answer of `POST /publish`.
    pub subscribers: Mutex<HashMap<Box<str>, usize>>,
    pub config: Config,
    pub started: Instant,
}

/// A message between routers.
#[derive(Clone)]
pub enum RouterCmd {
    Publish { topic: Arc<str>, frame: Arc<[u8]> },
}

/// Per-connection state.
#[derive(Default)]
pub enum ConnState {
    #[default]
    Fresh,
    Echo,
    Http(HttpConn),
    Ws(Box<WsState>),
}

/// An upgraded connection.
pub struct WsState {
    conn: WsConn,
    listener: u16,
    route: u16,
    awaiting_pong: bool,
}

enum Kind {
    Echo,
    Http {
        http: Http,
        routes: Vec<WsRouteConfig>,
    },
}

pub struct Router {
    shard: usize,
    kinds: Vec<Kind>,
    date: DateCache,
    shared: Arc<Shared>,
    peers: Peers<RouterCmd>,
    /// Local subscribers per topic, and each subscriber's topics (for cleanup on close).
    topics: HashMap<Arc<str>, HashSet<Token>>,
    subscriptions: HashMap<Token, Vec<Arc<str>>>,
    draining: bool,
    /// Publishes received in this wake, per topic in arrival order: the topic, its frames
    /// concatenated, and how many. Delivered together in `on_commands_done`.
    pending: Vec<(Arc<str>, Vec<u8>, u64)>,
    /// Emptied batch buffers kept for the next wake.
    spare: Vec<Vec<u8>>,
}

impl Router {
    pub fn new(shared: Arc<Shared>, info: &ShardInfo, peers: Peers<RouterCmd>) -> Self {
        let kinds = shared
            .config
            .listeners
            .iter()
            .map(|l| match l.service {
                ServiceKind::Echo => Kind::Echo,
                ServiceKind::Http => Kind::Http {
                    http: Http::new(HttpSettings::from(l)),
                    routes: l.websocket.clone(),
                },
            })
            .collect();
        Router {
            shard: info.shard,
            kinds,
            date: DateCache::default(),
            shared,
            peers,
            topics: HashMap::new(),
            subscriptions: HashMap::new(),
            draining: false,
            pending: Vec::new(),
            spare: Vec::new(),
        }
    }

    fn counters(&self) -> &ServiceCounters {
        &self.shared.counters[self.shard]
    }

    fn route_config(&self, listener: u16, route: u16) -> &WsRouteConfig {
        match &self.kinds[listener as usize] {
            Kind::Http { routes, .. } => &routes[route as usize],
            Kind::Echo => unreachable!("WebSocket state on an echo listener"),
        }
    }

    fn on_http(&mut self, conn: &mut Conn<'_, ConnState>, input: &mut [u8]) -> usize {
        let listener = conn.listener();
        let budget = conn.room();
        let Kind::Http { http, .. } = &self.kinds[listener] else {
            return 0;
        };
        let ConnState::Http(mut hc) = *conn.state() else {
            return 0;
        };
        let mut app = RouterApp {
            shared: &self.shared,
            shard: self.shard,
            peers: &self.peers,
            draining: self.draining,
        };
        let before = conn.out().len();
        let o = http.handle(
            &mut hc,
            input,
            conn.out(),
            before + budget,
            &self.date,
            &mut app,
        );
        let timeout = http.settings.header_timeout;
        if o.consumed > 0 || o.close {
            let c = &self.shared.counters[self.shard];
            c.http_requests.inc();
            if o.close
                && o.upgrade.is_none()
                && conn.out().len() > before
                && is_error_response(&conn.out()[before..])
            {
                c.http_errors.inc();
            }
        }
        // The header timer runs from the first byte of a request until it is complete.
        if o.partial && !hc.timer_armed {
            conn.set_timer(timeout);
            hc.timer_armed = true;
        } else if !o.partial && hc.timer_armed {
            conn.clear_timer();
            hc.timer_armed = false;
        }
        *conn.state() = ConnState::Http(hc);
        if o.close {
            conn.close();
            return o.consumed;
        }
        if o.stopped {
            conn.resume_later();
        }
        if let Some(route) = o.upgrade {
            self.counters().ws_upgrades.inc();
            self.counters().ws_open.inc();
            conn.clear_timer();
            *conn.state() = ConnState::Ws(Box::new(WsState {
                conn: WsConn::default(),
                listener: listener as u16,
                route: route as u16,
                awaiting_pong: false,
            }));
            let ping = self
                .route_config(listener as u16, route as u16)
                .ping_interval;
            if !ping.is_zero() {
                conn.set_timer(ping);
            }
            // Frames sent right behind the upgrade request are in this same input.
            let rest = &mut input[o.consumed..];
            return o.consumed
                + if rest.is_empty() {
                    0
                } else {
                    self.on_ws(conn, rest)
                };
        }
        o.consumed
    }

    fn on_ws(&mut self, conn: &mut Conn<'_, ConnState>, input: &mut [u8]) -> usize {
        let ConnState::Ws(ws_state) = conn.state() else {
            return 0;
        };
        let (listener, route) = (ws_state.listener, ws_state.route);
        let mut wsc = std::mem::take(&mut ws_state.conn);
        let cfg = self.route_config(listener, route);
        let (mode, max_message, ping) = (cfg.mode, cfg.max_message, cfg.ping_interval);
        let token = conn.token();
        let shared = self.shared.clone();
        let counters = &shared.counters[self.shard];
        let mut subscribe_ops: Vec<(bool, String)> = Vec::new();
        let mut publishes: Vec<(String, serde_json::Value)> = Vec::new();
        let p = wsc.process(input, max_message, conn.out(), &mut |msg, out| {
            counters.ws_messages_in.inc();
            match mode {
                WsMode::Echo => {
                    counters.ws_messages_out.inc();
                    match msg {
                        Message::Text(s) => ws::write_frame(out, ws::OP_TEXT, s.as_bytes()),
                        Message::Binary(b) => ws::write_frame(out, ws::OP_BINARY, b),
                    }
                }
                WsMode::Pubsub => match parse_op(&msg) {
                    Ok(op @ (Op::Subscribe(_) | Op::Unsubscribe(_))) => {
                        // Acknowledged, so a client knows when its subscription is in force.
                        let (word, t, on) = match op {
                            Op::Subscribe(t) => ("subscribe", t, true),
                            Op::Unsubscribe(t) => ("unsubscribe", t, false),
                            Op::Publish(..) => unreachable!(),
                        };
                        let ack = serde_json::json!({ "ok": word, "topic": t }).to_string();
                        ws::write_frame(out, ws::OP_TEXT, ack.as_bytes());
                        subscribe_ops.push((on, t));
                    }
                    Ok(Op::Publish(t, data)) => publishes.push((t, data)),
                    Err(why) => {
                        let body = serde_json::json!({ "error": why }).to_string();
                        ws::write_frame(out, ws::OP_TEXT, body.as_bytes());
                    }
                },
            }
        });
        if let ConnState::Ws(s) = conn.state() {
            s.conn = wsc;
            if p.frames > 0 {
                s.awaiting_pong = false;
            }
        }
        if p.frames > 0 && !ping.is_zero() {
            conn.set_timer(ping);
        }
        for (subscribe, topic) in subscribe_ops {
            if subscribe {
                self.subscribe(token, &topic);
            } else {
                self.unsubscribe(token, &topic);
            }
        }
        for (topic, data) in publishes {
            self.publish(&topic, &data);
        }
        if let Some(code) = p.close {
            if matches!(
                code,
                ws::CLOSE_PROTOCOL | ws::CLOSE_INVALID_DATA | ws::CLOSE_TOO_BIG
            ) {
                counters.ws_protocol_closes.inc();
            }
            conn.close();
        }
        p.consumed
    }

    fn subscribe(&mut self, token: Token, topic: &str) {
        let subs = self.subscriptions.entry(token).or_default();
        if subs.iter().any(|t| &**t == topic) || subs.len() >= 64 {
            return; // already subscribed, or at the per-connection cap
        }
        let key: Arc<str> = match self.topics.get_key_value(topic) {
            Some((k, _)) => k.clone(),
            None => Arc::from(topic),
        };
        subs.push(key.clone());
        self.topics.entry(key).or_default().insert(token);
        *self
            .shared
            .subscribers
            .lock()
            .entry(Box::from(topic))
            .or_insert(0) += 1;
    }

    fn unsubscribe(&mut self, token: Token, topic: &str) {
        let Some(subs) = self.subscriptions.get_mut(&token) else {
            return;
        };
        let Some(i) = subs.iter().position(|t| &**t == topic) else {
            return;
        };
        subs.swap_remove(i);
        if subs.is_empty() {
            self.subscriptions.remove(&token);
        }
        self.forget(token, topic);
    }

    fn forget(&mut self, token: Token, topic: &str) {
        if let Some(set) = self.topics.get_mut(topic) {
            set.remove(&token);
            if set.is_empty() {
                self.topics.remove(topic);
            }
        }
        let mut counts = self.shared.subscribers.lock();
        if let Some(n) = counts.get_mut(topic) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(topic);
            }
        }
    }

    /// Encodes once and fans out to every shard (this one included, through its channel, so
    /// that every subscriber sees publishes in one order per publisher).
    fn publish(&mut self, topic: &str, data: &serde_json::Value) -> usize {
        let body = serde_json::json!({ "topic": topic, "data": data }).to_string();
        let mut frame = Vec::with_capacity(body.len() + 10);
        ws::write_frame(&mut frame, ws::OP_TEXT, body.as_bytes());
        publish_frame(&self.shared, self.shard, &self.peers, topic, frame.into())
    }

    /// Writes `frames` (`count` encoded messages of one topic) to each local subscriber.
    fn deliver(&mut self, topic: &str, frames: &[u8], count: u64, ctx: &mut Ctx<'_, ConnState>) {
        let Some(set) = self.topics.get(topic) else {
            return;
        };
        let counters = &self.shared.counters[self.shard];
        for &token in set {
            let policy = ctx.with_conn(token, |conn| {
                let ConnState::Ws(s) = conn.state() else {
                    return None;
                };
                let (l, r) = (s.listener, s.route);
                if conn.over_limit() {
                    return Some(route_policy(&self.kinds, l, r));
                }
                conn.write(frames);
                counters.ws_messages_out.add(count);
                None
            });
            match policy.flatten() {
                Some(SlowConsumer::Drop) => counters.ws_dropped.add(count),
                Some(SlowConsumer::Disconnect) => {
                    counters.ws_slow_closed.inc();
                    // The 1008 queues behind the backlog: a slow reader gets it within a
                    // second, one that does not read at all is cut off then.
                    ctx.with_conn(token, |conn| {
                        ws::write_close(conn.out(), ws::CLOSE_POLICY, "slow consumer");
                        conn.close_within(SLOW_CLOSE_GRACE);
                    });
                }
                None => {}
            }
        }
    }
}

fn route_policy(kinds: &[Kind], listener: u16, route: u16) -> SlowConsumer {
    match &kinds[listener as usize] {
        Kind::Http { routes, .. } => routes[route as usize].slow_consumer,
        Kind::Echo => SlowConsumer::Drop,
    }
}

fn is_error_response(out: &[u8]) -> bool {
    out.windows(9)
        .any(|w| w.starts_with(b"HTTP/1.1 4") || w.starts_with(b"HTTP/1.1 5"))
}

fn publish_frame(
    shared: &Shared,
    shard: usize,
    peers: &Peers<RouterCmd>,
    topic: &str,
    frame: Arc<[u8]>,
) -> usize {
    let reached = shared.subscribers.lock().get(topic).copied().unwrap_or(0);
    let counters = &shared.counters[shard];
    counters.ws_published.inc();
    let msg = RouterCmd::Publish {
        topic: Arc::from(topic),
        frame,
    };
    let sent = peers.broadcast(msg);
    let lost = peers.len() - sent;
    if lost > 0 {
        counters.ws_fanout_lost.add(lost as u64);
    }
    reached
}

enum Op {
    Subscribe(String),
    Unsubscribe(String),
    Publish(String, serde_json::Value),
}

fn parse_op(msg: &Message<'_>) -> Result<Op, &'static str> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Raw {
        op: String,
        topic: String,
        #[serde(default)]
        data: serde_json::Value,
    }
    let bytes = match msg {
        Message::Text(s) => s.as_bytes(),
        Message::Binary(b) => b,
    };
    let raw: Raw = serde_json::from_slice(bytes)
        .map_err(|_| "expected {\"op\":\"subscribe|unsubscribe|publish\",\"topic\":\"...\"}")?;
    if raw.topic.is_empty() || raw.topic.len() > 256 {
        return Err("topic must be 1 to 256 bytes");
    }
    match raw.op.as_str() {
        "subscribe" => Ok(Op::Subscribe(raw.topic)),
        "unsubscribe" => Ok(Op::Unsubscribe(raw.topic)),
        "publish" => Ok(Op::Publish(raw.topic, raw.data)),
        _ => Err("op must be subscribe, unsubscribe or publish"),
    }
}

/// The routes' view of the server.
struct RouterApp<'a> {
    shared: &'a Arc<Shared>,
    shard: usize,
    peers: &'a Peers<RouterCmd>,
    draining: bool,
}

impl App for RouterApp<'_> {
    fn draining(&self) -> bool {
        // Health fails too once a shard has died: the server no longer serves whole.
        self.draining || self.shared.stats.dead_shards() > 0
    }

    fn metrics(&mut self, out: &mut Vec<u8>) {
        super::metrics::render(self.shared, out);
    }

    fn stats_json(&mut self, out: &mut Vec<u8>) {
        super::metrics::render_json(self.shared, out);
    }

    fn publish(&mut self, topic: &str, data: &[u8]) -> usize {
        // The body is published as a JSON value when it is one, else as a string.
        let value = serde_json::from_slice(data).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(data).into_owned())
        });
        let body = serde_json::json!({ "topic": topic, "data": value }).to_string();
        let mut frame = Vec::with_capacity(body.len() + 10);
        ws::write_frame(&mut frame, ws::OP_TEXT, body.as_bytes());
        publish_frame(self.shared, self.shard, self.peers, topic, frame.into())
    }
}

impl Service for Router {
    type State = ConnState;
    type Command = RouterCmd;

    fn on_open(&mut self, conn: &mut Conn<'_, ConnState>) {
        *conn.state() = match self.kinds[conn.listener()] {
            Kind::Echo => ConnState::Echo,
            Kind::Http { .. } => ConnState::Http(HttpConn::default()),
        };
    }

    fn on_data(&mut self, conn: &mut Conn<'_, ConnState>, input: &mut [u8]) -> usize {
        match conn.state() {
            ConnState::Echo | ConnState::Fresh => {
                conn.write(input);
                input.len()
            }
            ConnState::Http(_) => self.on_http(conn, input),
            ConnState::Ws(_) => self.on_ws(conn, input),
        }
    }

    fn on_timer(&mut self, conn: &mut Conn<'_, ConnState>) {
        match conn.state() {
            ConnState::Http(hc) => {
                hc.timer_armed = false;
                Http::timeout_response(conn.out(), &self.date);
                conn.close();
            }
            ConnState::Ws(s) => {
                let (l, r, awaiting) = (s.listener, s.route, s.awaiting_pong);
                let cfg = self.route_config(l, r);
                let (ping, pong) = (cfg.ping_interval, cfg.pong_timeout);
                if awaiting {
                    self.counters().ws_reaped.inc();
                    ws::write_close(conn.out(), ws::CLOSE_GOING_AWAY, "no pong");
                    conn.close();
                } else if !ping.is_zero() {
                    if let ConnState::Ws(s) = conn.state() {
                        s.awaiting_pong = true;
                    }
                    self.counters().ws_pings.inc();
                    ws::write_frame(conn.out(), ws::OP_PING, b"");
                    conn.set_timer(pong);
                }
            }
            _ => {}
        }
    }

    fn on_close(&mut self, token: Token, state: &mut ConnState, _reason: CloseReason) {
        if let ConnState::Ws(_) = state {
            self.counters().ws_open.sub(1);
            if let Some(topics) = self.subscriptions.remove(&token) {
                for t in topics {
                    self.forget(token, &t);
                }
            }
        }
    }

    fn on_drain(&mut self, conn: &mut Conn<'_, ConnState>) {
        self.draining = true;
        if let ConnState::Ws(s) = conn.state() {
            if !s.conn.close_sent {
                s.conn.close_sent = true;
                ws::write_close(conn.out(), ws::CLOSE_GOING_AWAY, "server shutting down");
            }
        }
        conn.close();
    }

    fn on_tick(&mut self, ctx: &mut Ctx<'_, ConnState>) {
        self.draining |= ctx.draining();
        self.date.update(SystemTime::now());
    }

    fn on_command(&mut self, cmd: RouterCmd, _ctx: &mut Ctx<'_, ConnState>) {
        match cmd {
            // Queued per topic and delivered in on_commands_done: a subscriber then gets all of a
            // topic's messages of this wake in one write (one syscall, not one per message).
            RouterCmd::Publish { topic, frame } => {
                match self.pending.iter_mut().find(|(t, _, _)| *t == topic) {
                    Some((_, frames, count)) => {
                        frames.extend_from_slice(&frame);
                        *count += 1;
                    }
                    None => {
                        let mut frames = self.spare.pop().unwrap_or_default();
                        frames.extend_from_slice(&frame);
                        self.pending.push((topic, frames, 1));
                    }
                }
            }
        }
    }

    /// Version 1: one byte naming the state. Echo connections move; HTTP and WebSocket ones stay
    /// with the old process (closed gracefully after the hand-over) until their state is
    /// described too.
    const HANDOVER_FORMAT: &'static str = "shardnet-router/1";

    fn export(&mut self, conn: &mut Conn<'_, ConnState>) -> Option<Vec<u8>> {
        match conn.state() {
            ConnState::Echo => Some(vec![BLOB_ECHO]),
            ConnState::Fresh | ConnState::Http(_) | ConnState::Ws(_) => None,
        }
    }

    fn import(&mut self, conn: &mut Conn<'_, ConnState>, blob: &[u8]) -> Result<(), String> {
        match (blob, &self.kinds[conn.listener()]) {
            ([BLOB_ECHO], Kind::Echo) => {
                *conn.state() = ConnState::Echo;
                Ok(())
            }
            ([BLOB_ECHO], Kind::Http { .. }) => Err(format!(
                "an echo connection came for listener {}, an HTTP listener here",
                conn.listener()
            )),
            _ => Err(format!("unknown connection state {blob:?}")),
        }
    }

    fn on_commands_done(&mut self, ctx: &mut Ctx<'_, ConnState>) {
        let mut pending = std::mem::take(&mut self.pending);
        for (topic, mut frames, count) in pending.drain(..) {
            self.deliver(&topic, &frames, count, ctx);
            frames.clear();
            // Keep a few modest buffers; a burst's large one goes back to the allocator.
            if frames.capacity() <= 1 << 20 && self.spare.len() < 8 {
                self.spare.push(frames);
            }
        }
        self.pending = pending;
    }
}

impl From<&LimitsConfig> for Limits {
    fn from(l: &LimitsConfig) -> Self {
        Limits {
            idle_timeout: l.idle_timeout,
            max_write_buffer: l.max_write_buffer,
            write_timeout: l.write_timeout,
            max_read_buffer: l.max_read_buffer,
        }
    }
}

/// The engine a configuration asks for: listeners, shards, pinning, balance, limits, tuning.
pub fn engine(config: &Config) -> ServerBuilder {
    let sc = &config.server;
    // `max_connections = "auto"` comes to this process's descriptor limit (already raised by the
    // CLI) less a reserve; the CLI logs the same figure.
    let shards = sc.shards.resolve(crate::sys::affinity::usable_cpus());
    let max_connections =
        config.max_connections_for(shards, crate::sys::rlimit::nofile_soft().ok());
    let mut builder = Server::builder()
        .pinning(match (sc.pin, sc.cores.is_empty()) {
            (false, _) => Pinning::Off,
            (true, true) => Pinning::Auto,
            (true, false) => Pinning::Cores(sc.cores.clone()),
        })
        .balance(match sc.balance {
            BalanceConfig::RoundRobin => Balance::RoundRobin,
            BalanceConfig::LeastConnections => Balance::LeastConnections,
            BalanceConfig::Reuseport => Balance::Reuseport,
        })
        .max_connections(max_connections)
        .limits(Limits::from(&config.limits))
        .tuning(Tuning {
            edge: sc.trigger == Trigger::Edge,
            read_buffer: sc.read_buffer,
            read_budget: sc.read_budget.max(sc.read_buffer),
            events_per_wait: sc.events_per_wait,
            shutdown_timeout: sc.shutdown_timeout,
        });
    if let Shards::Count(n) = sc.shards {
        builder = builder.shards(n.get());
    }
    for l in &config.listeners {
        builder = builder.listener(ListenerSpec {
            name: l.name.clone(),
            addr: l.addr,
            backlog: l.backlog,
            reuse_port: l.reuse_port,
        });
    }
    builder
}

/// Starts the product server: every listener with the service its configuration names.
pub fn start(config: &Config) -> Result<Server, ServerError> {
    start_with(config, engine(config))
}

/// [`start`] on a given engine builder (one that took its listeners over from an old process).
pub fn start_with(config: &Config, builder: ServerBuilder) -> Result<Server, ServerError> {
    let owned = config.clone();
    let started = Instant::now();
    // The pool's counters exist once the pool does: the first shard to start completes the
    // shared state with them, the others take the same.
    let slot: Mutex<Option<Arc<Shared>>> = Mutex::new(None);
    builder.start(move |info, peers| {
        let shared = slot
            .lock()
            .get_or_insert_with(|| {
                Arc::new(Shared {
                    stats: info.stats.clone(),
                    counters: (0..info.shards)
                        .map(|_| CachePadded::new(ServiceCounters::default()))
                        .collect(),
                    subscribers: Mutex::new(HashMap::new()),
                    config: owned.clone(),
                    started,
                })
            })
            .clone();
        Router::new(shared, &info, peers)
    })
}
