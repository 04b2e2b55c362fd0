//! The product: what `shardnet serve` runs on top of the engine.
//!
//! [`start`] is the composition root: it binds the configuration's listeners through the engine
//! ([`crate::server::Server`]) and gives every shard a `router::Router`, which decides per
//! listener which protocol a connection speaks (echo, HTTP/1.1, WebSocket after an upgrade) and
//! binds the protocol codecs of [`crate::service`] to the product's parts:
//!
//! - `routes`: the HTTP routes (`/plaintext`, `/json`, `/healthz`, `/metrics`, `/stats`,
//!   `POST /publish/{topic}`, the WebSocket paths);
//! - `pubsub`: topics, the wire format, batching, fan-out across shards, slow consumers;
//! - `compression`: the shard's permessage-deflate compressors, and which one a connection's
//!   messages go through;
//! - `metrics`: the services' counters and their Prometheus and JSON renderings;
//! - [`auth`]: token verification, topic permissions, API keys, the command rate limit;
//! - `broker`: pub/sub across processes and hosts through Redis/Valkey or NATS (with
//!   `[broker] kind` other than `"none"`): its own threads, reached from `pubsub`.
//!
//! Layering: this module uses the engine (`server`, `service`'s trait and codecs, `stats`,
//! `config`); nothing below it uses this module. Inside it the imports only point down:
//! `router` → `routes` → `pubsub` → `compression` → `metrics` → `auth` (which uses none of
//! them), and `pubsub` → `broker` (which knows nothing of the others: it hands what comes from
//! the broker to a `Sink`, `pubsub::BrokerSink`).

#[doc(hidden)]
pub mod auth;
#[doc(hidden)]
pub mod broker;
mod compression;
mod metrics;
mod pubsub;
mod router;
mod routes;

use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use crate::config::{
    Balance as BalanceConfig, BrokerKind, Config, LimitsConfig, ListenerTls, Shards, Trigger,
};
use crate::server::{
    Balance, Limits, ListenerSpec, OffloadSpec, Pinning, Server, ServerBuilder, ServerError,
    TlsSpec, Tuning,
};
use crate::tls::ServerTls;
use metrics::Metrics;
use pubsub::{PubsubHandover, Registry};
use router::{Router, Shared};

/// Why the product server did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// `[auth]`'s keys could not be loaded.
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    /// A listener's TLS files could not be loaded.
    #[error("TLS: {0}")]
    Tls(#[from] crate::config::ConfigError),
    /// The engine did not start (a listener's address, a thread).
    #[error(transparent)]
    Server(#[from] ServerError),
}

/// Starts the product server: every listener with the service its configuration names, with
/// `[auth]` and the TLS files loaded from the paths it names (relative to the working
/// directory).
pub fn start(config: &Config) -> Result<Server, StartError> {
    let tls = config.load_tls("", "")?;
    start_with_tls(config, &tls)
}

/// [`start`], with the TLS side of every listener already loaded ([`Config::load_tls`]) and
/// `[auth]` loaded here.
pub fn start_with_tls(config: &Config, tls: &ListenerTls) -> Result<Server, StartError> {
    let auth = auth::Auth::load(&config.auth)?;
    let app = start_app(config, tls, Arc::new(auth::Reloadable::new(auth)))?;
    Ok(app.server)
}

/// A started product server and, with a broker, the handle to read its state.
#[doc(hidden)]
pub struct App {
    /// The server.
    pub server: Server,
    /// The broker's handle, with `[broker]` configured.
    pub broker: Option<broker::BrokerHandle>,
}

/// The state format of the product's connections in a hand-over (`Service::HANDOVER_FORMAT` of
/// its router): what `serve --takeover` announces.
pub const HANDOVER_FORMAT: &str = <Router as crate::server::Service>::HANDOVER_FORMAT;

/// The composition root: the TLS side of every listener already loaded ([`Config::load_tls`])
/// and `[auth]` loaded in the handle a reload (SIGHUP) replaces it through: what the CLI runs,
/// having read the files with errors located in the configuration file. Keeps the broker's
/// handle (the CLI logs its counters).
#[doc(hidden)]
pub fn start_app(
    config: &Config,
    tls: &ListenerTls,
    auth: Arc<auth::Reloadable<auth::Auth>>,
) -> Result<App, ServerError> {
    start_app_on(config, tls, auth, engine_with_tls(config, tls))
}

/// [`start_with_tls`] on a given engine `builder` (one whose listeners were taken over from an
/// old process, `Takeover::take_listeners`), `[auth]` loaded here.
pub fn start_on(
    config: &Config,
    tls: &ListenerTls,
    builder: ServerBuilder,
) -> Result<Server, StartError> {
    let auth = auth::Auth::load(&config.auth)?;
    let app = start_app_on(config, tls, Arc::new(auth::Reloadable::new(auth)), builder)?;
    Ok(app.server)
}

/// [`start_app`] on a given engine `builder`.
pub fn start_app_on(
    config: &Config,
    tls: &ListenerTls,
    auth: Arc<auth::Reloadable<auth::Auth>>,
    builder: ServerBuilder,
) -> Result<App, ServerError> {
    if let Some(l) = config
        .listeners
        .iter()
        .enumerate()
        .find(|(i, l)| l.tls.is_some() && !matches!(tls.get(*i), Some(Some(_))))
        .map(|(_, l)| l)
    {
        // Never plaintext on a port configured for TLS.
        return Err(ServerError::Start {
            what: format!("listener `{}`", l.name),
            source: std::io::Error::other("its TLS files were not loaded"),
        });
    }
    let owned = config.clone();
    let started = Instant::now();
    let shards = resolve_shards(config);
    // The broker's threads start first (they wait for the broker in the background); the shards
    // it delivers to are handed to its sink as the engine creates them.
    let (threads, sink) = match config.broker.kind {
        BrokerKind::None => (None, None),
        _ => {
            let sink = Arc::new(pubsub::BrokerSink::new(largest_message(config)));
            let b = broker::Broker::start(&config.broker, shards, sink.clone()).map_err(|e| {
                ServerError::Start {
                    what: "the broker thread".into(),
                    source: e,
                }
            })?;
            sink.set_metrics(b.metrics().clone());
            (Some(b), Some(sink))
        }
    };
    let handle = threads.as_ref().map(broker::Broker::handle);
    let threads = Mutex::new(threads);
    let broker_handle = handle.clone();
    // The pool's counters exist once the pool does: the first shard to start completes the
    // shared state with them, the others take the same.
    let slot: Mutex<Option<Arc<Shared>>> = Mutex::new(None);
    // Pub/sub across a hand-over goes through the registry's gate (see `pubsub::Gate`).
    let registry: Arc<Registry> = Arc::default();
    let hooks = Arc::new(PubsubHandover {
        registry: registry.clone(),
    });
    let server = builder
        .shards(shards)
        .handover_hooks(hooks)
        .start(move |info, peers| {
            let shared = slot
                .lock()
                .get_or_insert_with(|| {
                    if let Some(sink) = &sink {
                        sink.set_peers(peers.clone());
                    }
                    registry.gate.set_peers(&peers);
                    let mut metrics = Metrics::new(info.stats.clone(), info.shards, started);
                    if let Some(b) = &broker_handle {
                        metrics = metrics.with_broker(b.metrics().clone());
                    }
                    Arc::new(Shared {
                        metrics,
                        registry: registry.clone(),
                        config: owned.clone(),
                        auth: auth.clone(),
                        broker: broker_handle.clone(),
                        _broker_threads: threads.lock().take(),
                    })
                })
                .clone();
            Router::new(shared, &info, peers)
        })?;
    Ok(App {
        server,
        broker: handle,
    })
}

/// The shards a configuration runs (`"auto"`: the CPUs this process may use).
fn resolve_shards(config: &Config) -> usize {
    config
        .server
        .shards
        .resolve(crate::sys::affinity::usable_cpus())
}

/// The largest message a pub/sub route accepts: what a message from the broker may be.
fn largest_message(config: &Config) -> usize {
    config
        .listeners
        .iter()
        .flat_map(|l| &l.websocket)
        .filter(|w| w.mode == crate::config::WsMode::Pubsub)
        .map(|w| w.max_message)
        .max()
        .unwrap_or(crate::config::WsRouteConfig::default().max_message)
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

/// The engine a configuration asks for: listeners, shards, pinning, balance, limits, tuning;
/// every listener plain (see [`engine_with_tls`]).
pub fn engine(config: &Config) -> ServerBuilder {
    engine_with_tls(config, &[])
}

/// [`engine`], with listener i terminating TLS as `tls[i]` says (what [`Config::load_tls`]
/// loaded; `None` or missing: plain).
pub fn engine_with_tls(config: &Config, tls: &[Option<ServerTls>]) -> ServerBuilder {
    let sc = &config.server;
    // `max_connections = "auto"` comes to this process's descriptor limit (already raised by the
    // CLI) less a reserve; the CLI logs the same figure.
    let shards = resolve_shards(config);
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
        .offload(OffloadSpec::from(&config.offload))
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
    for (i, l) in config.listeners.iter().enumerate() {
        let tls = match (tls.get(i), &l.tls) {
            (Some(Some(server_tls)), Some(t)) => {
                Some(TlsSpec::server(server_tls.acceptor(), t.handshake_timeout))
            }
            _ => None,
        };
        builder = builder.listener(ListenerSpec {
            name: l.name.clone(),
            addr: l.addr,
            backlog: l.backlog,
            reuse_port: l.reuse_port,
            tls,
        });
    }
    builder
}
