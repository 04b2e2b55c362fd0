//! The product's service: which listener runs which protocol, and the glue between the engine,
//! the protocol codecs and the product's routes and pub/sub hub.
//!
//! One `Router` per shard, on that shard's thread. A connection starts as echo or HTTP after its
//! listener; an HTTP connection that completes a WebSocket handshake becomes a WebSocket one and
//! runs its route's mode (echo or pub/sub). The router owns the timers a protocol needs (HTTP's
//! header timer, WebSocket's heartbeat) through the connection's one service timer.

use std::sync::Arc;
use std::time::SystemTime;

use super::compression::{Compression, Delivery};
use super::metrics::{Metrics, ServiceCounters};
use super::pubsub::{Client, Cmd, Deflate, Fanout, Hub, Registry, TopicLimits};
use super::routes::{ListenerRoutes, Routes, WsPath};
use crate::config::{Config, ListenerConfig, ServiceKind, SlowConsumer, WsMode, WsRouteConfig};
use crate::server::Peers;
use crate::service::deflate::{self, Agreed, Inflate, ShardInflater};
use crate::service::http::{DateCache, HeaderTimer, Http, HttpConn, HttpSettings};
use crate::service::ws::{self, Message, WsConn};
use crate::service::{CloseReason, Conn, Ctx, Service, ShardInfo, Token};

/// The longest WebSocket frame header (with the mask): what a frame needs in the input buffer
/// beyond its payload.
const MAX_FRAME_HEADER: usize = 14;

/// Hand-over blobs (the router's state format, [`Router::HANDOVER_FORMAT`]): the first byte
/// names the state. Echo: nothing more. HTTP: [`HttpConn::to_bits`] (a partial request is the
/// engine's input, the header timer its timer). WebSocket: the route's mode, `awaiting_pong`,
/// the permessage-deflate agreement, the route's path, the topics subscribed to, then
/// [`WsConn::export`].
const BLOB_ECHO: u8 = 1;
const BLOB_HTTP: u8 = 2;
const BLOB_WS: u8 = 3;

/// A WebSocket state from a hand-over blob, before it is checked against this configuration.
struct MovedWs {
    pubsub: bool,
    awaiting_pong: bool,
    deflate: Option<Agreed>,
    path: String,
    topics: Vec<String>,
    conn: WsConn,
}

impl MovedWs {
    fn encode(s: &WsState, path: &str, topics: &[Arc<str>]) -> Vec<u8> {
        let mut b = vec![BLOB_WS];
        b.push(0); // the mode, set by the caller
        b.push(s.awaiting_pong as u8);
        match s.deflate {
            None => b.extend_from_slice(&[0, 0, 0]),
            Some(a) => b.extend_from_slice(&[1, a.window_bits, a.takeover as u8]),
        }
        b.extend_from_slice(&(path.len() as u16).to_le_bytes());
        b.extend_from_slice(path.as_bytes());
        b.extend_from_slice(&(topics.len() as u16).to_le_bytes());
        for t in topics {
            b.extend_from_slice(&(t.len() as u16).to_le_bytes());
            b.extend_from_slice(t.as_bytes());
        }
        s.conn.export(&mut b);
        b
    }

    /// Reads a blob after its first byte.
    fn decode(mut b: &[u8]) -> Result<MovedWs, String> {
        fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
            if b.len() < n {
                return Err("a WebSocket connection's state ends early".into());
            }
            let (head, rest) = b.split_at(n);
            *b = rest;
            Ok(head)
        }
        fn string(b: &mut &[u8]) -> Result<String, String> {
            let n = u16::from_le_bytes(take(b, 2)?.try_into().expect("2 bytes")) as usize;
            String::from_utf8(take(b, n)?.to_vec()).map_err(|_| "a name that is not UTF-8".into())
        }
        let head = take(&mut b, 5)?;
        let deflate = (head[2] != 0).then_some(Agreed {
            window_bits: head[3],
            takeover: head[4] != 0,
        });
        let path = string(&mut b)?;
        let n = u16::from_le_bytes(take(&mut b, 2)?.try_into().expect("2 bytes"));
        let topics = (0..n).map(|_| string(&mut b)).collect::<Result<_, _>>()?;
        let conn = WsConn::import(&mut b)?;
        if !b.is_empty() {
            return Err("a WebSocket connection's state is longer than its format".into());
        }
        Ok(MovedWs {
            pubsub: head[0] != 0,
            awaiting_pong: head[1] != 0,
            deflate,
            path,
            topics,
            conn,
        })
    }
}

/// State shared by every shard's router (off the hot path).
pub struct Shared {
    pub metrics: Metrics,
    pub registry: Arc<Registry>,
    pub config: Config,
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

/// An upgraded connection. Compression adds two bytes, which fit in the padding: a compressed
/// connection's state is as large as a plain one's (a `dedicated` one's compressor is kept by
/// [`Compression`], not here).
pub struct WsState {
    conn: WsConn,
    listener: u16,
    route: u16,
    awaiting_pong: bool,
    /// permessage-deflate as agreed in the upgrade (`None`: uncompressed).
    deflate: Option<Agreed>,
}

/// A WebSocket route, with the limits derived from the configuration.
struct WsRoute {
    config: WsRouteConfig,
    /// The message limit handed to the codec: `max_message`, or less if a frame that size could
    /// not fit in `max_read_buffer`. Computed at start: a reload that lowers `max_read_buffer`
    /// (the engine's limit) is not seen here, and a frame between the two limits is then closed
    /// by the engine without a close frame.
    frame_limit: usize,
    topics: TopicLimits,
}

enum Kind {
    Echo,
    Http {
        http: Http,
        routes: ListenerRoutes,
        websocket: Vec<WsRoute>,
    },
}

/// The HTTP settings of a listener (the codec knows nothing of the configuration file).
fn http_settings(l: &ListenerConfig) -> HttpSettings {
    HttpSettings {
        max_header: l.max_header,
        max_body: l.max_body,
        header_timeout: l.header_timeout,
    }
}

fn topic_limits(w: &WsRouteConfig) -> TopicLimits {
    TopicLimits {
        max_topics: w.max_topics,
        max_topic_length: w.max_topic_length,
        max_message: w.max_message,
    }
}

/// What `POST /publish` accepts: the largest topic and message of any pub/sub route (the
/// defaults when there is none).
fn publish_limits(config: &Config) -> TopicLimits {
    let routes: Vec<&WsRouteConfig> = config
        .listeners
        .iter()
        .flat_map(|l| &l.websocket)
        .filter(|w| w.mode == WsMode::Pubsub)
        .collect();
    if routes.is_empty() {
        return topic_limits(&WsRouteConfig::default());
    }
    TopicLimits {
        max_topics: 0,
        max_topic_length: routes.iter().map(|w| w.max_topic_length).max().unwrap_or(0),
        max_message: routes.iter().map(|w| w.max_message).max().unwrap_or(0),
    }
}

pub struct Router {
    shard: usize,
    kinds: Vec<Kind>,
    date: DateCache,
    shared: Arc<Shared>,
    fanout: Fanout,
    hub: Hub,
    compression: Compression,
    inflater: ShardInflater,
    draining: bool,
}

impl Router {
    pub fn new(shared: Arc<Shared>, info: &ShardInfo, peers: Peers<Cmd>) -> Self {
        let publish = publish_limits(&shared.config);
        let max_read = shared.config.limits.max_read_buffer;
        let kinds = shared
            .config
            .listeners
            .iter()
            .map(|l| match l.service {
                ServiceKind::Echo => Kind::Echo,
                ServiceKind::Http => Kind::Http {
                    http: Http::new(http_settings(l)),
                    routes: ListenerRoutes {
                        admin_routes: l.admin_routes,
                        websocket: l
                            .websocket
                            .iter()
                            .map(|w| WsPath {
                                path: w.path.clone(),
                                allowed_origins: w.allowed_origins.clone(),
                                compression: deflate::Settings {
                                    mode: w.compression,
                                    window_bits: w.compression_window_bits,
                                },
                            })
                            .collect(),
                        publish,
                    },
                    websocket: l
                        .websocket
                        .iter()
                        .map(|w| WsRoute {
                            config: w.clone(),
                            frame_limit: w
                                .max_message
                                .min(max_read.saturating_sub(MAX_FRAME_HEADER)),
                            topics: topic_limits(w),
                        })
                        .collect(),
                },
            })
            .collect();
        Router {
            shard: info.shard,
            kinds,
            date: DateCache::default(),
            fanout: Fanout::new(peers, info.shard, shared.registry.clone()),
            shared,
            hub: Hub::default(),
            compression: Compression::default(),
            inflater: ShardInflater::default(),
            draining: false,
        }
    }

    fn counters(&self) -> &ServiceCounters {
        self.shared.metrics.shard(self.shard)
    }

    fn on_http(&mut self, conn: &mut Conn<'_, ConnState>, input: &mut [u8]) -> usize {
        let listener = conn.listener();
        let budget = conn.room();
        let Kind::Http { http, routes, .. } = &self.kinds[listener] else {
            return 0;
        };
        let ConnState::Http(mut hc) = *conn.state() else {
            return 0;
        };
        let counters = self.shared.metrics.shard(self.shard);
        let mut handler = Routes {
            listener: routes,
            metrics: &self.shared.metrics,
            counters,
            fanout: &self.fanout,
            draining: self.draining,
        };
        let before = conn.out().len();
        let o = http.handle(
            &mut hc,
            input,
            conn.out(),
            before + budget,
            &self.date,
            &mut handler,
        );
        counters.http_requests.add(u64::from(o.responses));
        counters.http_errors.add(u64::from(o.errors));
        match o.timer {
            HeaderTimer::Start => conn.set_timer(http.settings.header_timeout),
            HeaderTimer::Stop => conn.clear_timer(),
            HeaderTimer::Keep => {}
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
            counters.ws_upgrades.inc();
            counters.ws_open.inc();
            conn.clear_timer();
            *conn.state() = ConnState::Ws(Box::new(WsState {
                conn: WsConn::default(),
                listener: listener as u16,
                route: route as u16,
                awaiting_pong: false,
                deflate: o.deflate,
            }));
            if let Some(agreed) = o.deflate {
                let deflate = self.shared.metrics.deflate(self.shard);
                self.compression.open(conn.token(), agreed, deflate);
            }
            let ping = self
                .route(listener as u16, route as u16)
                .config
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

    fn route(&self, listener: u16, route: u16) -> &WsRoute {
        route_of(&self.kinds, listener, route)
    }

    /// A WebSocket connection from an old process: its route (found by path, in the same
    /// mode), compression and subscriptions here. If this configuration no longer serves it
    /// that way (the route is gone or changed mode, a subscription is over the limits now), it
    /// gets a 1001 close (sent once the hand-over commits) rather than a different service.
    fn import_ws(&mut self, conn: &mut Conn<'_, ConnState>, moved: MovedWs) {
        let listener = conn.listener();
        let token = conn.token();
        let Kind::Http { websocket, .. } = &self.kinds[listener] else {
            return;
        };
        let route = websocket.iter().position(|r| {
            r.config.path == moved.path && (r.config.mode == WsMode::Pubsub) == moved.pubsub
        });
        let Some(route) = route else {
            log::warn!(
                "hand-over: WebSocket route `{}` is not served here in the same mode; closing                  a connection that used it (1001)",
                moved.path
            );
            ws::write_close(
                conn.out(),
                ws::CLOSE_GOING_AWAY,
                "route not served after restart",
            );
            conn.close();
            return;
        };
        let limits = websocket[route].topics;
        let counters = self.shared.metrics.shard(self.shard);
        counters.ws_open.inc();
        let mut conn_state = moved.conn;
        let refused = moved.topics.iter().find_map(|t| {
            self.hub
                .subscribe(token, t, &limits, &self.shared.registry)
                .err()
                .map(|e| (t.clone(), e))
        });
        if let Some(agreed) = moved.deflate {
            // A `dedicated` connection gets a fresh compressor: its next message starts new
            // deflate blocks after the last one's sync flush, which the client's inflater (with
            // its window of the earlier messages) reads as it would any block.
            let deflate = self.shared.metrics.deflate(self.shard);
            self.compression.open(token, agreed, deflate);
        }
        if let Some((topic, why)) = refused {
            log::warn!(
                "hand-over: a subscriber's topic `{topic}` is refused here ({why}); closing it"
            );
            conn_state.close_sent = true;
            ws::write_close(
                conn.out(),
                ws::CLOSE_GOING_AWAY,
                "subscription refused after restart",
            );
            conn.close();
        }
        *conn.state() = ConnState::Ws(Box::new(WsState {
            conn: conn_state,
            listener: listener as u16,
            route: route as u16,
            awaiting_pong: moved.awaiting_pong,
            deflate: moved.deflate,
        }));
    }

    fn on_ws(&mut self, conn: &mut Conn<'_, ConnState>, input: &mut [u8]) -> usize {
        let ConnState::Ws(ws_state) = conn.state() else {
            return 0;
        };
        let (listener, route, agreed) = (ws_state.listener, ws_state.route, ws_state.deflate);
        let mut wsc = std::mem::take(&mut ws_state.conn);
        let token = conn.token();
        let Router {
            kinds,
            shared,
            hub,
            fanout,
            shard,
            compression,
            inflater,
            ..
        } = self;
        let r = route_of(kinds, listener, route);
        let counters = shared.metrics.shard(*shard);
        let deflate_counters = shared.metrics.deflate(*shard);
        let client = Client {
            token,
            limits: &r.topics,
            fanout,
            counters,
        };
        let mode = r.config.mode;
        let inflate = agreed.map(|_| Inflate {
            shard: inflater,
            counters: deflate_counters,
            max_message: r.config.max_message,
        });
        let p = wsc.process_with(
            input,
            r.frame_limit,
            conn.out(),
            inflate,
            &mut |msg, out| {
                counters.ws_messages_in.inc();
                match mode {
                    WsMode::Echo => {
                        counters.ws_messages_out.inc();
                        let (opcode, payload) = match msg {
                            Message::Text(s) => (ws::OP_TEXT, s.as_bytes()),
                            Message::Binary(b) => (ws::OP_BINARY, b),
                        };
                        compression.write_message(
                            token,
                            agreed,
                            out,
                            opcode,
                            payload,
                            deflate_counters,
                        );
                    }
                    WsMode::Pubsub => hub.on_message(&client, &msg, out),
                }
            },
        );
        let ping = r.config.ping_interval;
        if let ConnState::Ws(s) = conn.state() {
            s.conn = wsc;
            if p.frames > 0 {
                s.awaiting_pong = false;
            }
        }
        if p.frames > 0 && !ping.is_zero() {
            conn.set_timer(ping);
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
}

fn route_of(kinds: &[Kind], listener: u16, route: u16) -> &WsRoute {
    match &kinds[listener as usize] {
        Kind::Http { websocket, .. } => &websocket[route as usize],
        Kind::Echo => unreachable!("WebSocket state on an echo listener"),
    }
}

impl Service for Router {
    type State = ConnState;
    type Command = Cmd;

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
                hc.timer_fired();
                Http::timeout_response(conn.out(), &self.date);
                let counters = self.counters();
                counters.http_requests.inc();
                counters.http_errors.inc();
                conn.close();
            }
            ConnState::Ws(s) => {
                let (l, r, awaiting) = (s.listener, s.route, s.awaiting_pong);
                let cfg = &self.route(l, r).config;
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
        if let ConnState::Ws(s) = state {
            self.counters().ws_open.sub(1);
            self.hub.on_close(token, &self.shared.registry);
            if s.deflate.is_some() {
                let deflate = self.shared.metrics.deflate(self.shard);
                self.compression.close(token, deflate);
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

    fn on_command(&mut self, cmd: Cmd, _ctx: &mut Ctx<'_, ConnState>) {
        // Queued per topic and delivered in on_commands_done: a subscriber then gets all of a
        // topic's messages of this wake in one write (one syscall, not one per message).
        let counters = self.shared.metrics.shard(self.shard);
        self.hub.on_command(cmd, counters);
    }

    /// Version 2: echo, HTTP (keep-alive or mid-request) and WebSocket connections (route,
    /// close and ping state, fragment assembly, compression agreement, topics) all move; see
    /// the blob constants.
    const HANDOVER_FORMAT: &'static str = "shardnet-router/2";

    fn before_export(&mut self, ctx: &mut Ctx<'_, ConnState>) {
        // Publishes received but not yet written go into the subscribers' output, which moves
        // with them (later publishes are held by the gate: `pubsub::Gate`).
        let kinds = &self.kinds;
        let counters = self.shared.metrics.shard(self.shard);
        let mut deflate = Deflate {
            compression: &mut self.compression,
            counters: self.shared.metrics.deflate(self.shard),
        };
        self.hub.flush(
            ctx,
            &self.fanout,
            counters,
            &mut deflate,
            |state| match state {
                ConnState::Ws(s) => Some((slow_consumer(kinds, s), Delivery::of(s.deflate))),
                _ => None,
            },
        );
    }

    fn export(&mut self, conn: &mut Conn<'_, ConnState>) -> Option<Vec<u8>> {
        let token = conn.token();
        match conn.state() {
            ConnState::Echo => Some(vec![BLOB_ECHO]),
            ConnState::Http(hc) => Some(vec![BLOB_HTTP, hc.to_bits()]),
            ConnState::Ws(s) => {
                let route = &route_of(&self.kinds, s.listener, s.route).config;
                let mut blob = MovedWs::encode(s, &route.path, self.hub.topics_of(token));
                blob[1] = (route.mode == WsMode::Pubsub) as u8;
                Some(blob)
            }
            ConnState::Fresh => None,
        }
    }

    fn import(&mut self, conn: &mut Conn<'_, ConnState>, blob: &[u8]) -> Result<(), String> {
        let listener = conn.listener();
        let (&kind, rest) = blob.split_first().ok_or("an empty connection state")?;
        match (kind, &self.kinds[listener]) {
            (BLOB_ECHO, Kind::Echo) => *conn.state() = ConnState::Echo,
            (BLOB_HTTP, Kind::Http { .. }) => {
                let bits = *rest.first().ok_or("an HTTP state without its byte")?;
                *conn.state() = ConnState::Http(HttpConn::from_bits(bits));
            }
            (BLOB_WS, Kind::Http { .. }) => self.import_ws(conn, MovedWs::decode(rest)?),
            (BLOB_ECHO | BLOB_HTTP | BLOB_WS, _) => {
                // The listener's service changed in the new configuration: the client closes
                // and reconnects rather than speak to the wrong protocol.
                log::warn!(
                    "hand-over: a connection of listener {listener} speaks another protocol                      than it does now; closing it"
                );
                conn.close();
            }
            _ => return Err(format!("unknown connection state {kind}")),
        }
        Ok(())
    }

    fn on_commands_done(&mut self, ctx: &mut Ctx<'_, ConnState>) {
        if !self.hub.has_pending() {
            return;
        }
        let kinds = &self.kinds;
        let counters = self.shared.metrics.shard(self.shard);
        let mut deflate = Deflate {
            compression: &mut self.compression,
            counters: self.shared.metrics.deflate(self.shard),
        };
        self.hub.deliver(
            ctx,
            &self.fanout,
            counters,
            &mut deflate,
            |state| match state {
                ConnState::Ws(s) => Some((slow_consumer(kinds, s), Delivery::of(s.deflate))),
                _ => None,
            },
        );
    }
}

fn slow_consumer(kinds: &[Kind], s: &WsState) -> SlowConsumer {
    route_of(kinds, s.listener, s.route).config.slow_consumer
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What an idle WebSocket connection holds besides the engine's slot: its boxed state.
    /// Compression must not make it larger (the agreed parameters fit in its padding).
    #[test]
    fn websocket_state_is_as_small_with_compression() {
        assert_eq!(std::mem::size_of::<Option<Agreed>>(), 2);
        assert!(
            std::mem::size_of::<WsState>() <= 24,
            "{}",
            std::mem::size_of::<WsState>()
        );
    }
}
