//! The product's service: which listener runs which protocol, and the glue between the engine,
//! the protocol codecs and the product's routes and pub/sub hub.
//!
//! One `Router` per shard, on that shard's thread. A connection starts as echo or HTTP after its
//! listener; an HTTP connection that completes a WebSocket handshake becomes a WebSocket one and
//! runs its route's mode (echo or pub/sub). The router owns the timers a protocol needs (HTTP's
//! header timer, WebSocket's heartbeat and token expiry) through the connection's one service
//! timer.
//!
//! Authentication (routes with `auth = "optional"` or `"required"`): the upgrade's token is
//! verified by the routes; the connection then keeps a [`ConnAuth`] (its grant in this shard's
//! [`PermTable`] and its rate-limit bucket, 16 bytes) and never the token. Every command on a
//! pub/sub route passes the rate limit, then (on those routes) the permissions, before the hub
//! sees it; `refresh` swaps the grant here. The one timer fires at the earlier of the next
//! heartbeat and the token's expiry plus leeway, where the connection is closed with
//! [`CLOSE_TOKEN_EXPIRED`]: no timer of its own, nothing allocated while idle. A connection
//! that needs none of this (a route without auth, no rate limit when it upgraded) keeps the
//! plain [`WsState`], so that it costs what it did before.

use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::auth::{
    Auth, ConnAuth, FailureCounters, Grant, Local, PermTable, Permissions, Reloadable, Verdict,
    CLOSE_TOKEN_EXPIRED,
};
use super::broker::{Broker, BrokerHandle, Outcome, Ticket};
use super::compression::{Compression, Delivery};
use super::metrics::{Metrics, ServiceCounters};
use super::pubsub::{self, Client, Cmd, Deflate, Fanout, Hub, Op, Registry, TopicLimits};
use super::routes::{self, ListenerRoutes, Routes, WsPath};
use crate::config::{
    Config, ListenerConfig, RouteAuth, ServiceKind, SlowConsumer, WsMode, WsRouteConfig,
};
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
/// the permessage-deflate agreement, the route's path, the topics subscribed to, the
/// authentication state ([`MovedAuth`]), then [`WsConn::export`].
const BLOB_ECHO: u8 = 1;
const BLOB_HTTP: u8 = 2;
const BLOB_WS: u8 = 3;

/// What a WebSocket connection's [`ConnAuth`] becomes on the wire: the token's expiry and its
/// permissions (`None`: anonymous), interned again in the new shard's [`PermTable`]. The token
/// itself was never kept and does not travel. The rate-limit bucket does not either: its clock
/// is the process's, so a moved connection starts with a full bucket.
struct MovedAuth {
    expires: u32,
    perms: Option<Permissions>,
}

/// A WebSocket state from a hand-over blob, before it is checked against this configuration.
struct MovedWs {
    pubsub: bool,
    awaiting_pong: bool,
    deflate: Option<Agreed>,
    path: String,
    topics: Vec<String>,
    /// `None`: a plain connection (no grant, no bucket).
    auth: Option<MovedAuth>,
    conn: WsConn,
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u16).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

fn put_list<S: AsRef<str>>(b: &mut Vec<u8>, list: &[S]) {
    b.extend_from_slice(&(list.len() as u16).to_le_bytes());
    for s in list {
        put_str(b, s.as_ref());
    }
}

impl MovedWs {
    fn encode(
        s: &WsState,
        path: &str,
        topics: &[Arc<str>],
        auth: Option<(ConnAuth, &PermTable)>,
    ) -> Vec<u8> {
        let mut b = vec![BLOB_WS];
        b.push(0); // the mode, set by the caller
        b.push(s.awaiting_pong as u8);
        match s.deflate {
            None => b.extend_from_slice(&[0, 0, 0]),
            Some(a) => b.extend_from_slice(&[1, a.window_bits, a.takeover as u8]),
        }
        put_str(&mut b, path);
        put_list(&mut b, topics);
        match auth {
            None => b.push(0),
            Some((a, table)) => match table.permissions(a.grant.perms) {
                None => {
                    b.push(1);
                    b.extend_from_slice(&a.grant.expires.to_le_bytes());
                }
                Some(p) => {
                    b.push(2);
                    b.extend_from_slice(&a.grant.expires.to_le_bytes());
                    put_str(&mut b, &p.sub);
                    put_list(&mut b, &p.subscribe);
                    put_list(&mut b, &p.publish);
                }
            },
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
        fn list(b: &mut &[u8]) -> Result<Vec<String>, String> {
            let n = u16::from_le_bytes(take(b, 2)?.try_into().expect("2 bytes"));
            (0..n).map(|_| string(b)).collect()
        }
        fn expires(b: &mut &[u8]) -> Result<u32, String> {
            Ok(u32::from_le_bytes(take(b, 4)?.try_into().expect("4 bytes")))
        }
        let head = take(&mut b, 5)?;
        let deflate = (head[2] != 0).then_some(Agreed {
            window_bits: head[3],
            takeover: head[4] != 0,
        });
        let path = string(&mut b)?;
        let topics = list(&mut b)?;
        let auth = match take(&mut b, 1)?[0] {
            0 => None,
            1 => Some(MovedAuth {
                expires: expires(&mut b)?,
                perms: None,
            }),
            2 => {
                let expires = expires(&mut b)?;
                let boxed = |v: Vec<String>| v.into_iter().map(String::into_boxed_str).collect();
                Some(MovedAuth {
                    expires,
                    perms: Some(Permissions {
                        sub: string(&mut b)?.into_boxed_str(),
                        subscribe: boxed(list(&mut b)?),
                        publish: boxed(list(&mut b)?),
                    }),
                })
            }
            k => return Err(format!("unknown authentication state {k}")),
        };
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
            auth,
            conn,
        })
    }
}

/// How long past `broker.publish_timeout` a `POST /publish` waits for the broker's outcome before
/// it answers 503 itself (the outcome may have been lost to a full shard queue).
const OUTCOME_GRACE: Duration = Duration::from_secs(1);

/// State shared by every shard's router (off the hot path).
pub struct Shared {
    pub metrics: Metrics,
    pub registry: Arc<Registry>,
    pub config: Config,
    /// `[auth]`, replaced on SIGHUP; each router keeps a [`Local`] copy.
    pub auth: Arc<Reloadable<Auth>>,
    /// The broker, when `[broker]` names one.
    pub broker: Option<BrokerHandle>,
    /// Its threads: stopped when the last router goes (the server has shut down).
    pub _broker_threads: Option<Broker>,
}

/// Per-connection state.
#[derive(Default)]
pub enum ConnState {
    #[default]
    Fresh,
    Echo,
    Http(HttpConn),
    Ws(Box<WsState>),
    /// A WebSocket connection with a grant and a rate-limit bucket: on a route with `auth`, or
    /// upgraded while `[auth]` limits the command rate.
    WsAuth(Box<WsAuthState>),
}

impl ConnState {
    fn ws(&mut self) -> Option<&mut WsState> {
        match self {
            ConnState::Ws(s) => Some(s),
            ConnState::WsAuth(a) => Some(&mut a.ws),
            _ => None,
        }
    }

    fn ws_ref(&self) -> Option<&WsState> {
        match self {
            ConnState::Ws(s) => Some(s),
            ConnState::WsAuth(a) => Some(&a.ws),
            _ => None,
        }
    }

    fn conn_auth(&self) -> Option<ConnAuth> {
        match self {
            ConnState::WsAuth(a) => Some(a.auth),
            _ => None,
        }
    }
}

/// [`WsState`] with what authentication and the rate limit keep: 16 bytes more.
pub struct WsAuthState {
    ws: WsState,
    auth: ConnAuth,
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
    /// This shard's copy of `[auth]`, and the one whose `anonymous_subscribe` `perms` holds.
    auth: Local<Auth>,
    anonymous_of: Arc<Auth>,
    /// The permissions of this shard's authenticated connections, interned.
    perms: PermTable,
    /// The origin of the rate-limit buckets' clock.
    epoch: Instant,
    /// Numbers requests answered later (`POST /publish` through the broker).
    next_request: Cell<u64>,
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
                                auth: w.auth,
                            })
                            .collect(),
                        publish,
                        fixed: Default::default(),
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
        let auth = shared.auth.local();
        let anonymous_of = auth.cached().clone();
        Router {
            shard: info.shard,
            kinds,
            date: DateCache::default(),
            fanout: Fanout::new(
                peers,
                info.shard,
                shared.registry.clone(),
                shared.broker.clone(),
            ),
            hub: Hub::with_interest(shared.broker.as_ref().map(|b| b.interest(info.shard))),
            compression: Compression::default(),
            inflater: ShardInflater::default(),
            draining: false,
            next_request: Cell::new(1),
            perms: PermTable::new(anonymous_of.anonymous_subscribe()),
            auth,
            anonymous_of,
            epoch: info.started,
            shared,
        }
    }

    /// Picks up a reloaded `[auth]` (one atomic load when there is none), and with it the
    /// anonymous permissions.
    fn sync_auth(&mut self) {
        let current = self.auth.get(&self.shared.auth);
        if !Arc::ptr_eq(current, &self.anonymous_of) {
            self.perms.set_anonymous(current.anonymous_subscribe());
            self.anonymous_of = current.clone();
        }
    }

    fn counters(&self) -> &ServiceCounters {
        self.shared.metrics.shard(self.shard)
    }

    fn on_http(&mut self, conn: &mut Conn<'_, ConnState>, input: &mut [u8]) -> usize {
        self.sync_auth();
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
            auth: self.auth.cached(),
            auth_failures: self.shared.metrics.auth_failures(self.shard),
            verified: None,
            token: conn.token(),
            next_request: &self.next_request,
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
        if o.deferred {
            // The answer waits for the broker; this timer answers 503 if it never comes.
            conn.set_timer(self.shared.config.broker.publish_timeout + OUTCOME_GRACE);
        }
        *conn.state() = ConnState::Http(hc);
        if o.close {
            conn.close();
            return o.consumed;
        }
        if o.stopped {
            conn.resume_later();
        }
        let verified = handler.verified.take();
        if let Some(route) = o.upgrade {
            counters.ws_upgrades.inc();
            counters.ws_open.inc();
            conn.clear_timer();
            let cfg = &self.route(listener as u16, route as u16).config;
            let (ping, gated) = (cfg.ping_interval, cfg.auth != RouteAuth::Off);
            let current = self.auth.cached();
            let leeway = current.leeway();
            let mut auth = ConnAuth::default();
            match verified {
                Some(v) => {
                    auth.grant = Grant {
                        perms: self.perms.acquire(&v.perms),
                        expires: Grant::expiry(v.exp),
                    };
                    counters.ws_authenticated.inc();
                }
                None if gated => counters.ws_anonymous.inc(),
                None => {}
            }
            let ws = WsState {
                conn: WsConn::default(),
                listener: listener as u16,
                route: route as u16,
                awaiting_pong: false,
                deflate: o.deflate,
            };
            *conn.state() = if gated || current.rate_limit().is_some() {
                ConnState::WsAuth(Box::new(WsAuthState { ws, auth }))
            } else {
                ConnState::Ws(Box::new(ws))
            };
            if let Some(agreed) = o.deflate {
                let deflate = self.shared.metrics.deflate(self.shard);
                self.compression.open(conn.token(), agreed, deflate);
            }
            if let Some(after) = ws_timer(ping, &auth.grant, leeway, SystemTime::now()) {
                conn.set_timer(after);
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
    /// mode), compression, grant and subscriptions here. If this configuration no longer serves
    /// it that way (the route is gone or changed mode, now requires a token the connection did
    /// not show, a subscription is over the limits or outside its permissions now), it gets a
    /// 1001 close (sent once the hand-over commits) rather than a different service.
    fn import_ws(&mut self, conn: &mut Conn<'_, ConnState>, moved: MovedWs) {
        self.sync_auth();
        let listener = conn.listener();
        let token = conn.token();
        let Kind::Http { websocket, .. } = &self.kinds[listener] else {
            return;
        };
        let route = websocket.iter().position(|r| {
            r.config.path == moved.path && (r.config.mode == WsMode::Pubsub) == moved.pubsub
        });
        let going_away = |conn: &mut Conn<'_, ConnState>, why: &str| {
            ws::write_close(conn.out(), ws::CLOSE_GOING_AWAY, why);
            conn.close();
        };
        let Some(route) = route else {
            log::warn!(
                "hand-over: WebSocket route `{}` is not served here in the same mode; closing \
                 a connection that used it (1001)",
                moved.path
            );
            return going_away(conn, "route not served after restart");
        };
        let cfg = &websocket[route].config;
        let gated = cfg.auth != RouteAuth::Off;
        let limits = websocket[route].topics;
        // The grant: the token's permissions where the route still looks at them (interned in
        // this shard's table), anonymous otherwise; a bucket where the route is gated or the
        // command rate is limited, as at an upgrade.
        let mut grant = Grant::ANONYMOUS;
        if gated {
            if let Some(MovedAuth {
                expires,
                perms: Some(p),
            }) = &moved.auth
            {
                grant = Grant {
                    perms: self.perms.acquire(p),
                    expires: *expires,
                };
            }
        }
        let with_auth = gated || self.auth.cached().rate_limit().is_some();
        let counters = self.shared.metrics.shard(self.shard);
        counters.ws_open.inc();
        if !grant.is_anonymous() {
            counters.ws_authenticated.inc();
        } else if gated {
            counters.ws_anonymous.inc();
        }
        let mut conn_state = moved.conn;
        if let Some(agreed) = moved.deflate {
            // A `dedicated` connection gets a fresh compressor: its next message starts new
            // deflate blocks after the last one's sync flush, which the client's inflater (with
            // its window of the earlier messages) reads as it would any block.
            let deflate = self.shared.metrics.deflate(self.shard);
            self.compression.open(token, agreed, deflate);
        }
        // From here the connection is this shard's (`on_close` undoes all of the above).
        let state = WsState {
            conn: WsConn::default(),
            listener: listener as u16,
            route: route as u16,
            awaiting_pong: moved.awaiting_pong,
            deflate: moved.deflate,
        };
        let required = cfg.auth == RouteAuth::Required;
        let refused = moved.topics.iter().find_map(|t| {
            if gated && !self.perms.may_subscribe(grant.perms, t) {
                return Some((
                    t.clone(),
                    "outside the connection's permissions".to_string(),
                ));
            }
            self.hub
                .subscribe(token, t, &limits, &self.shared.registry)
                .err()
                .map(|e| (t.clone(), e.to_string()))
        });
        if required && grant.is_anonymous() {
            log::warn!(
                "hand-over: WebSocket route `{}` now requires a token; closing a connection \
                 that has none (1001)",
                moved.path
            );
            conn_state.close_sent = true;
            going_away(conn, "token required after restart");
        } else if let Some((topic, why)) = refused {
            log::warn!(
                "hand-over: a subscriber's topic `{topic}` is refused here ({why}); closing it"
            );
            conn_state.close_sent = true;
            going_away(conn, "subscription refused after restart");
        } else if self.fanout.broker().is_some() {
            // Through a broker the two processes receive a topic's messages on two connections
            // of their own, with no common point to cut at: what the broker delivered between
            // this connection's export there and this process's subscription here may be
            // missed. The subscriber is told, as after a broker outage.
            for t in self.hub.topics_of(token) {
                conn.out().extend_from_slice(&pubsub::gap_frame(t));
            }
        }
        let state = WsState {
            conn: conn_state,
            ..state
        };
        *conn.state() = if with_auth {
            ConnState::WsAuth(Box::new(WsAuthState {
                ws: state,
                auth: ConnAuth {
                    grant,
                    ..ConnAuth::default()
                },
            }))
        } else {
            ConnState::Ws(Box::new(state))
        };
    }

    fn on_ws(&mut self, conn: &mut Conn<'_, ConnState>, input: &mut [u8]) -> usize {
        self.sync_auth();
        let now_us = conn.now().saturating_duration_since(self.epoch).as_micros() as u64;
        // A plain connection has no grant and no bucket: it passes as ungated and unlimited.
        let has_auth = conn.state().conn_auth();
        let Some(ws_state) = conn.state().ws() else {
            return 0;
        };
        let (listener, route, agreed) = (ws_state.listener, ws_state.route, ws_state.deflate);
        let mut wsc = std::mem::take(&mut ws_state.conn);
        let mut ca = has_auth.unwrap_or_default();
        let token = conn.token();
        let Router {
            kinds,
            shared,
            hub,
            fanout,
            shard,
            compression,
            inflater,
            auth,
            perms,
            ..
        } = self;
        let r = route_of(kinds, listener, route);
        let counters = shared.metrics.shard(*shard);
        let deflate_counters = shared.metrics.deflate(*shard);
        let failures = shared.metrics.auth_failures(*shard);
        let current: &Auth = auth.cached();
        let rate = has_auth.and(current.rate_limit());
        let client = Client {
            token,
            limits: &r.topics,
            fanout,
            counters,
        };
        let (mode, gated) = (r.config.mode, r.config.auth != RouteAuth::Off);
        let before = ca.grant;
        let mut closing = false;
        let inflate = agreed.map(|_| Inflate {
            shard: inflater,
            counters: deflate_counters,
            max_message: r.config.max_message,
        });
        // Counted once per call rather than per message (the same totals, fewer stores). One
        // call per mode, so that the echo closure is small enough to be inlined into the codec.
        let mut messages = 0u64;
        let limit = r.frame_limit;
        let p = match mode {
            WsMode::Echo => wsc.process_with(input, limit, conn.out(), inflate, &mut |msg, out| {
                messages += 1;
                let (opcode, payload) = match msg {
                    Message::Text(s) => (ws::OP_TEXT, s.as_bytes()),
                    Message::Binary(b) => (ws::OP_BINARY, b),
                };
                match agreed {
                    // What `write_message` does uncompressed, without its lookups.
                    None => ws::write_frame(out, opcode, payload),
                    Some(_) => compression.write_message(
                        token,
                        agreed,
                        out,
                        opcode,
                        payload,
                        deflate_counters,
                    ),
                }
            }),
            WsMode::Pubsub => {
                wsc.process_with(input, limit, conn.out(), inflate, &mut |msg, out| {
                    messages += 1;
                    // A client that goes on past the rate limit is being closed: the rest of what
                    // it sent is not read.
                    if closing {
                        return;
                    }
                    if let Some(limit) = rate {
                        match ca.bucket.take(limit, now_us) {
                            Verdict::Allow => {}
                            Verdict::Refuse => {
                                counters.rate_limited.inc();
                                return pubsub::reply(
                                    out,
                                    &serde_json::json!({
                                        "error": "rate limit: too many commands, slow down \
                                                  (going on closes the connection)",
                                    }),
                                );
                            }
                            Verdict::Close => {
                                counters.rate_limit_closes.inc();
                                closing = true;
                                return;
                            }
                        }
                    }
                    let op = match pubsub::parse_op(&msg) {
                        Ok(op) => op,
                        Err(why) => {
                            return pubsub::reply(out, &serde_json::json!({ "error": why }))
                        }
                    };
                    match op {
                        Op::Refresh(t) if gated => {
                            let cx = Refresh {
                                auth: current,
                                perms: &mut *perms,
                                hub: &mut *hub,
                                client: &client,
                                registry: &shared.registry,
                                failures,
                            };
                            cx.run(&mut ca.grant, t.as_bytes(), out);
                        }
                        Op::Subscribe(t) if gated && !perms.may_subscribe(ca.grant.perms, &t) => {
                            counters.auth_denied.inc();
                            deny(out, "subscribe", &t, &ca.grant);
                        }
                        Op::Publish(t, _) if gated && !perms.may_publish(ca.grant.perms, &t) => {
                            counters.auth_denied.inc();
                            deny(out, "publish", &t, &ca.grant);
                        }
                        op => hub.on_op(&client, op, out),
                    }
                })
            }
        };
        counters.ws_messages_in.add(messages);
        if mode == WsMode::Echo {
            counters.ws_messages_out.add(messages);
        }
        let ping = r.config.ping_interval;
        let leeway = current.leeway();
        if let ConnState::WsAuth(a) = conn.state() {
            a.auth = ca;
        }
        if let Some(s) = conn.state().ws() {
            s.conn = wsc;
            if p.frames > 0 {
                s.awaiting_pong = false;
            }
        }
        if p.frames > 0 || ca.grant != before {
            if let Some(after) = ws_timer(ping, &ca.grant, leeway, SystemTime::now()) {
                conn.set_timer(after);
            }
        }
        if closing && p.close.is_none() {
            if let Some(s) = conn.state().ws() {
                s.conn.close_sent = true;
            }
            ws::write_close(conn.out(), ws::CLOSE_POLICY, "rate limit");
            conn.close();
            return input.len();
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

/// When a WebSocket connection's one timer is due: the next heartbeat (`ping`, zero = none) or
/// the token's expiry plus leeway, whichever comes first; `None` when neither applies.
fn ws_timer(ping: Duration, grant: &Grant, leeway: Duration, now: SystemTime) -> Option<Duration> {
    let expiry = grant.remaining(leeway, now);
    match (ping.is_zero(), expiry) {
        (true, e) => e,
        (false, None) => Some(ping),
        (false, Some(e)) => Some(ping.min(e)),
    }
}

/// Refuses a subscribe or publish outside the connection's permissions: the topic and the
/// reason in the error, nothing acknowledged.
fn deny(out: &mut Vec<u8>, op: &str, topic: &str, grant: &Grant) {
    let why = if grant.is_anonymous() {
        "an anonymous connection may subscribe only to anonymous_subscribe topics: send a token"
    } else if op == "publish" {
        "the token's publish claim does not allow this topic"
    } else {
        "the token's subscribe claim does not allow this topic"
    };
    pubsub::reply(
        out,
        &serde_json::json!({
            "error": format!("{op} to `{topic}` refused: {why}"),
            "op": op,
            "topic": topic,
            "reason": "forbidden",
        }),
    );
}

/// What a `refresh` needs: the verifier, the permissions, and the hub to drop what the new
/// token no longer allows.
struct Refresh<'a, 'c> {
    auth: &'a Auth,
    perms: &'a mut PermTable,
    hub: &'a mut Hub,
    client: &'a Client<'c>,
    registry: &'a Registry,
    failures: &'a FailureCounters,
}

impl Refresh<'_, '_> {
    /// Verifies `token` and, if it is good and for the same subject (an anonymous connection
    /// may take any), replaces `grant`; subscriptions the new permissions do not allow are
    /// dropped and listed in the answer. A refused refresh changes nothing: the connection
    /// still ends at its current token's expiry.
    fn run(self, grant: &mut Grant, token: &[u8], out: &mut Vec<u8>) {
        let counters = self.client.counters;
        let refuse = |out: &mut Vec<u8>, reason: &str, message: &str| {
            counters.auth_refresh_refused.inc();
            pubsub::reply(
                out,
                &serde_json::json!({
                    "error": format!("refresh refused: {message}"),
                    "op": "refresh",
                    "reason": reason,
                }),
            );
        };
        let v = match self.auth.verify(token) {
            Ok(v) => v,
            Err(f) => {
                self.failures.inc(f);
                return refuse(out, f.as_str(), f.message());
            }
        };
        if !grant.is_anonymous() && self.perms.sub(grant.perms) != &*v.perms.sub {
            return refuse(
                out,
                "subject",
                "the token is for another subject than this connection's",
            );
        }
        let new = Grant {
            perms: self.perms.acquire(&v.perms),
            expires: Grant::expiry(v.exp),
        };
        if grant.is_anonymous() {
            counters.ws_anonymous.sub(1);
            counters.ws_authenticated.inc();
        }
        self.perms.release(grant.perms);
        *grant = new;
        let registry = self.registry;
        let dropped: Vec<Arc<str>> = self
            .hub
            .topics_of(self.client.token)
            .iter()
            .filter(|t| !self.perms.may_subscribe(new.perms, t))
            .cloned()
            .collect();
        for t in &dropped {
            self.hub.unsubscribe(self.client.token, t, registry);
        }
        counters.auth_refreshed.inc();
        counters.auth_unsubscribed.add(dropped.len() as u64);
        let dropped: Vec<&str> = dropped.iter().map(|t| &**t).collect();
        pubsub::reply(
            out,
            &serde_json::json!({ "ok": "refresh", "exp": v.exp, "unsubscribed": dropped }),
        );
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
            ConnState::Ws(_) | ConnState::WsAuth(_) => self.on_ws(conn, input),
        }
    }

    fn on_timer(&mut self, conn: &mut Conn<'_, ConnState>) {
        match conn.state() {
            ConnState::Http(hc) if hc.pending().is_some() => {
                let outcome = Err(super::broker::Refusal::Timeout);
                self.answer_publish(conn, None, "", &outcome);
            }
            ConnState::Http(hc) => {
                hc.timer_fired();
                Http::timeout_response(conn.out(), &self.date);
                let counters = self.counters();
                counters.http_requests.inc();
                counters.http_errors.inc();
                conn.close();
            }
            ConnState::Ws(_) | ConnState::WsAuth(_) => {
                let grant = conn.state().conn_auth().unwrap_or_default().grant;
                let Some(s) = conn.state().ws() else {
                    return;
                };
                let (l, r, awaiting) = (s.listener, s.route, s.awaiting_pong);
                let cfg = &self.route(l, r).config;
                let (ping, pong) = (cfg.ping_interval, cfg.pong_timeout);
                let leeway = self.auth.cached().leeway();
                let now = SystemTime::now();
                // The timer never fires early, so a grant with nothing left is past its time.
                if grant.remaining(leeway, now) == Some(Duration::ZERO) {
                    self.counters().auth_expired.inc();
                    if let Some(s) = conn.state().ws() {
                        s.conn.close_sent = true;
                    }
                    ws::write_close(
                        conn.out(),
                        CLOSE_TOKEN_EXPIRED,
                        "token expired, refresh and reconnect",
                    );
                    conn.close();
                } else if awaiting {
                    self.counters().ws_reaped.inc();
                    ws::write_close(conn.out(), ws::CLOSE_GOING_AWAY, "no pong");
                    conn.close();
                } else if !ping.is_zero() {
                    if let Some(s) = conn.state().ws() {
                        s.awaiting_pong = true;
                    }
                    self.counters().ws_pings.inc();
                    ws::write_frame(conn.out(), ws::OP_PING, b"");
                    let expiry = grant.remaining(leeway, now).unwrap_or(pong);
                    conn.set_timer(pong.min(expiry));
                } else if let Some(after) = grant.remaining(leeway, now) {
                    // No heartbeat and time left: every change of the grant re-arms the timer,
                    // so this is only a guard that the expiry is never lost.
                    conn.set_timer(after);
                }
            }
            _ => {}
        }
    }

    fn on_close(&mut self, token: Token, state: &mut ConnState, reason: CloseReason) {
        let grant = state.conn_auth().map(|a| a.grant);
        if let Some(s) = state.ws() {
            let counters = self.shared.metrics.shard(self.shard);
            counters.ws_open.sub(1);
            let gated = route_of(&self.kinds, s.listener, s.route).config.auth != RouteAuth::Off;
            match grant {
                Some(g) if !g.is_anonymous() => {
                    // The subject at debug level only (it identifies a user); never the token.
                    log::debug!(
                        "WebSocket connection of sub {:?} closed ({reason:?})",
                        self.perms.sub(g.perms)
                    );
                    self.perms.release(g.perms);
                    counters.ws_authenticated.sub(1);
                }
                _ if gated => counters.ws_anonymous.sub(1),
                _ => {}
            }
            self.hub.on_close(token, &self.shared.registry);
            if s.deflate.is_some() {
                let deflate = self.shared.metrics.deflate(self.shard);
                self.compression.close(token, deflate);
            }
        }
    }

    fn on_drain(&mut self, conn: &mut Conn<'_, ConnState>) {
        self.draining = true;
        if matches!(conn.state(), ConnState::Http(hc) if hc.pending().is_some()) {
            // A `POST /publish` waiting for the broker's outcome is answered first (by the
            // outcome or its timer, both within `shutdown_timeout`), then closed there.
            return;
        }
        if let Some(s) = conn.state().ws() {
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
        self.hub.flush_interest();
        self.deliver_if_due(ctx);
    }

    /// Pub/sub: wake when the waiting publishes' delivery round may start.
    fn next_wake(&self) -> Option<Instant> {
        self.hub.next_round()
    }

    fn on_command(&mut self, cmd: Cmd, ctx: &mut Ctx<'_, ConnState>) {
        if let Cmd::Outcome {
            ticket,
            topic,
            outcome,
        } = cmd
        {
            ctx.with_conn(Token(ticket.token), |conn| {
                self.answer_publish(conn, Some(ticket), &topic, &outcome)
            });
            return;
        }
        // Queued per topic and delivered in on_commands_done: a subscriber then gets all of a
        // topic's messages of this wake in one write (one syscall, not one per message).
        let counters = self.shared.metrics.shard(self.shard);
        if let Cmd::Publish { topic, .. } = &cmd {
            self.fanout.echoes.get_mut().came_back(topic);
        }
        self.hub.on_command(cmd, counters);
    }

    /// Version 3: echo, HTTP (keep-alive or mid-request; not one waiting for the broker) and
    /// WebSocket connections (route, close and ping state, fragment assembly, compression
    /// agreement, topics, the token's expiry and permissions) all move; see the blob constants.
    const HANDOVER_FORMAT: &'static str = "shardnet-router/3";

    fn before_export(&mut self, ctx: &mut Ctx<'_, ConnState>) {
        // Publishes received but not yet written go into the subscribers' output, which moves
        // with them (later publishes are held by the gate: `pubsub::Gate`).
        self.deliver_pending(ctx, true);
    }

    fn export(&mut self, conn: &mut Conn<'_, ConnState>) -> Option<Vec<u8>> {
        let token = conn.token();
        match conn.state() {
            ConnState::Echo => Some(vec![BLOB_ECHO]),
            // Its answer comes from the broker, to this process: it stays, is answered here
            // and then closes (`on_drain`); the client reconnects to the new process.
            ConnState::Http(hc) if hc.pending().is_some() => None,
            ConnState::Http(hc) => Some(vec![BLOB_HTTP, hc.to_bits()]),
            ConnState::Ws(_) | ConnState::WsAuth(_) => {
                let auth = conn.state().conn_auth().map(|a| (a, &self.perms));
                let s = conn.state().ws_ref()?;
                let route = &route_of(&self.kinds, s.listener, s.route).config;
                let mut blob = MovedWs::encode(s, &route.path, self.hub.topics_of(token), auth);
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
                    "hand-over: a connection of listener {listener} speaks another protocol \
                     than it does now; closing it"
                );
                conn.close();
            }
            _ => return Err(format!("unknown connection state {kind}")),
        }
        Ok(())
    }

    fn on_commands_done(&mut self, ctx: &mut Ctx<'_, ConnState>) {
        self.deliver_if_due(ctx);
    }
}

impl Router {
    /// Delivers the waiting publishes if their round is due ([`pubsub::DELIVERY_INTERVAL`]);
    /// otherwise the shard wakes for it ([`Service::next_wake`]).
    fn deliver_if_due(&mut self, ctx: &mut Ctx<'_, ConnState>) {
        if self.hub.round_due(ctx.now(), self.fanout.echoes.get_mut()) {
            self.deliver_pending(ctx, false);
        }
    }

    /// One delivery round of the waiting publishes, or (`all`) rounds until none waits.
    fn deliver_pending(&mut self, ctx: &mut Ctx<'_, ConnState>, all: bool) {
        let kinds = &self.kinds;
        let counters = self.shared.metrics.shard(self.shard);
        let mut deflate = Deflate {
            compression: &mut self.compression,
            counters: self.shared.metrics.deflate(self.shard),
        };
        let policy = |state: &mut ConnState| {
            state
                .ws_ref()
                .map(|s| (slow_consumer(kinds, s), Delivery::of(s.deflate)))
        };
        if all {
            self.hub
                .flush(ctx, &self.fanout, counters, &mut deflate, policy);
        } else {
            self.hub
                .deliver(ctx, &self.fanout, counters, &mut deflate, policy);
        }
    }
}

impl Router {
    /// The broker's outcome for a publish of `conn` (`ticket`; `None`: the wait for it ran out).
    /// A `POST /publish` waiting for it is answered (200 or 503), then the requests pipelined
    /// behind it are read; a WebSocket publisher is told of a refusal. An outcome for a request
    /// the connection no longer waits for (answered by the timer) is dropped.
    fn answer_publish(
        &self,
        conn: &mut Conn<'_, ConnState>,
        ticket: Option<Ticket>,
        topic: &str,
        outcome: &Outcome,
    ) {
        let kind = self.shared.config.broker.kind.as_str();
        let lost: Outcome = Err(super::broker::Refusal::Timeout);
        loop {
            // Outcomes come back in the order the connection's publishes went out: one for a
            // request further down the line means the ones before it were lost on the way (the
            // shard's queue was full), and they are answered as timed out first.
            let (pending, this) = match conn.state() {
                ConnState::Http(hc) => match hc.pending() {
                    Some(p) if ticket.is_none_or(|t| t.id == p.id) => {
                        hc.take_pending();
                        (p, true)
                    }
                    Some(p) if ticket.is_some_and(|t| hc.is_queued(t.id)) => {
                        hc.take_pending();
                        (p, false)
                    }
                    _ => return,
                },
                ConnState::Ws(_) => {
                    if let (Some(t), Err(refusal)) = (ticket, outcome) {
                        if t.id == 0 {
                            pubsub::publish_refused(conn.out(), topic, refusal);
                        }
                    }
                    return;
                }
                _ => return,
            };
            // Without a ticket (the timer), the topic is not at hand: the answer says the reason.
            let (topic, outcome) = if this { (topic, outcome) } else { ("", &lost) };
            let sent = routes::publish_answer(
                pending.respond(conn.out(), &self.date),
                topic,
                outcome,
                kind,
            );
            let counters = self.counters();
            counters.http_requests.inc();
            if sent.status() >= 400 {
                counters.http_errors.inc();
            }
            if !pending.keep_alive() {
                conn.close();
                return;
            }
            if this {
                break;
            }
        }
        let waiting = matches!(conn.state(), ConnState::Http(hc) if hc.pending().is_some());
        if waiting {
            // The next one's outcome is on its way (it went out after this one).
            conn.set_timer(self.shared.config.broker.publish_timeout + OUTCOME_GRACE);
            conn.resume_later();
        } else if self.draining {
            conn.close();
        } else {
            conn.clear_timer();
            // The requests that came behind it wait in the input: read them now.
            conn.resume_later();
        }
    }
}

fn slow_consumer(kinds: &[Kind], s: &WsState) -> SlowConsumer {
    route_of(kinds, s.listener, s.route).config.slow_consumer
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::auth::PermId;
    use std::time::UNIX_EPOCH;

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

    /// A connection with a grant and a bucket (on a route with auth, or rate-limited) holds
    /// 16 bytes more; an authenticated one and an anonymous one hold the same.
    #[test]
    fn authentication_costs_a_connection_16_bytes() {
        assert_eq!(
            std::mem::size_of::<WsAuthState>(),
            std::mem::size_of::<WsState>() + 16
        );
    }

    #[test]
    fn one_timer_for_the_heartbeat_and_the_expiry() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        let s = Duration::from_secs;
        let grant = |expires| Grant {
            perms: PermId::ANONYMOUS,
            expires,
        };
        let leeway = s(5);
        // No token: the heartbeat alone, or nothing.
        assert_eq!(ws_timer(s(30), &Grant::ANONYMOUS, leeway, now), Some(s(30)));
        assert_eq!(
            ws_timer(Duration::ZERO, &Grant::ANONYMOUS, leeway, now),
            None
        );
        // The earlier of the two, the leeway counted.
        assert_eq!(ws_timer(s(30), &grant(1_010), leeway, now), Some(s(15)));
        assert_eq!(ws_timer(s(30), &grant(2_000), leeway, now), Some(s(30)));
        assert_eq!(
            ws_timer(Duration::ZERO, &grant(1_010), leeway, now),
            Some(s(15))
        );
        // Past the expiry: due now.
        assert_eq!(
            ws_timer(s(30), &grant(900), leeway, now),
            Some(Duration::ZERO)
        );
    }
}
