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

/// Hand-over blob of an echo connection.
const BLOB_ECHO: u8 = 1;

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

    /// Version 1: one byte naming the state. Echo connections move; HTTP and WebSocket ones stay
    /// with the old process (closed gracefully after the hand-over).
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
