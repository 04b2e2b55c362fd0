//! The engine: an acceptor thread (or SO_REUSEPORT listeners) handing sockets to N pinned shard
//! threads, each driving one instance of a [`Service`].
//!
//! ```text
//!   listeners ──► acceptor ──(bounded channels + eventfd wake)──► shard-00 (core 0): epoll, slab, wheel
//!                     │                                        ├► shard-01 (core 1): epoll, slab, wheel
//!                     └── round-robin / least-connections      └► ...
//! ```
//!
//! Ownership rule: a shard alone owns its connections, its epoll instance, its timer wheel and
//! its buffers. Only three things cross threads: messages on a shard's bounded channels (control:
//! drain and new limits, each acknowledged; new sockets from the acceptor; data: a service's
//! messages to other shards; results of offloaded jobs), each followed by a wake of the shard's
//! eventfd when it sleeps; the per-shard counters, written by their owner and read by anyone; and
//! stats snapshots. No lock is taken on the hot path.
//!
//! The API: a protocol implements [`Service`] and is given a [`Conn`] during a connection's
//! callbacks, a [`Ctx`] for the shard's other connections, [`Peers`] to reach the other shards
//! and the offload pool ([`Peers::offload`]), and a [`ShardInfo`] when it is built; a
//! [`ServerBuilder`] takes listeners ([`ListenerSpec`]), shards, [`Pinning`], [`Balance`],
//! [`Limits`], [`Tuning`] and an [`OffloadSpec`], and starts a [`Server`] with one service per
//! shard.
//!
//! Layers: the engine (`sys`, `conn`, `timer`, `stats`, `server`) knows nothing of the product
//! (its configuration file, routes, pub/sub or metrics pages): the product builds a [`Server`]
//! with [`Server::builder`] from its own configuration. `tests/layers.rs` holds the rule.
//!
//! Files: `api` (the service trait and its handles), `offload` (the offload pool), `listener`
//! (one accept step and its overload policy), `acceptor` (the acceptor thread), `port` (a
//! shard's channels), `pool` (the shard threads, control and acknowledgements), `shard/` (the
//! run loop, the connection
//! lifecycle, the read and write paths, and TLS between the socket and the service for the
//! listeners with [`ListenerSpec::tls`]), [`handover`] (restart without dropping a connection:
//! the control socket, and listeners and connections moving to a new process).

pub(crate) mod acceptor;
mod api;
pub mod handover;
pub(crate) mod listener;
pub(crate) mod offload;
mod pool;
pub(crate) mod port;
pub(crate) mod shard;

use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

pub use crate::tls::TlsAcceptor;
pub use api::{CloseReason, Conn, Ctx, Peers, Service, ShardInfo, Token};
pub use handover::{Takeover, TakeoverReport};
pub use offload::{OffloadError, OffloadSpec};
pub use pool::ControlError;
pub(crate) use pool::{PoolSpec, ShardPool};
pub use shard::TICK;

use crate::stats::{Snapshot, StatsView};
use crate::sys::{affinity, socket, waker::Waker};
use crate::tls::TlsConnector;
use acceptor::{Acceptor, AcceptorControl};
use handover::{ControlEvent, ControlThread, Giver, HandoverError, OfferedSockets};
use listener::Listener;

/// The limits a shard enforces; they can change at run time ([`Server::set_limits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Close a connection with nothing queued after this long without input. `Duration::ZERO`:
    /// never.
    pub idle_timeout: Duration,
    /// Queued output at which reading pauses.
    pub max_write_buffer: usize,
    /// Close a connection whose queued output made no progress for this long.
    pub write_timeout: Duration,
    /// Unconsumed input above which a connection is closed.
    pub max_read_buffer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            idle_timeout: Duration::from_secs(300),
            max_write_buffer: 1 << 20,
            write_timeout: Duration::from_secs(30),
            max_read_buffer: 2 << 20,
        }
    }
}

/// Engine settings fixed for the life of a shard.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    /// Edge-triggered epoll (else level-triggered).
    pub edge: bool,
    /// Size of the shard's one read buffer.
    pub read_buffer: usize,
    /// Bytes read from one connection per wake before the others get a turn.
    pub read_budget: usize,
    /// Events fetched per `epoll_wait`.
    pub events_per_wait: usize,
    /// How long a drain may take before the remaining connections are closed.
    pub shutdown_timeout: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            edge: true,
            read_buffer: 64 * 1024,
            read_budget: 256 * 1024,
            events_per_wait: 1024,
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

/// How new connections are spread over the shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Balance {
    /// The acceptor hands them out in turn.
    #[default]
    RoundRobin,
    /// The acceptor gives each to the shard with the fewest open connections.
    LeastConnections,
    /// No acceptor: each shard accepts on its own SO_REUSEPORT socket and the kernel spreads
    /// connections over them.
    Reuseport,
}

/// Which cores the shards run on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Pinning {
    /// Not pinned.
    Off,
    /// Shard i on the i-th core of the process's affinity mask (wrapping around).
    #[default]
    Auto,
    /// Shard i on `cores[i]`; shards beyond the list are not pinned.
    Cores(Vec<usize>),
}

/// One address to listen on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSpec {
    /// Names the listener in logs and in [`Server::addr`].
    pub name: String,
    /// Port 0 picks a free port ([`Server::addr`] tells which).
    pub addr: SocketAddr,
    /// The `listen(2)` backlog.
    pub backlog: u32,
    /// SO_REUSEPORT, so another process can bind the same port (zero-downtime restart).
    pub reuse_port: bool,
    /// Terminate TLS on this listener: the shards decrypt before the service and encrypt after
    /// it, so the service sees plaintext as on any other listener.
    pub tls: Option<TlsSpec>,
}

/// TLS on a listener ([`TlsSpec::server`]); for the load generator's pool, on the connections
/// it adopts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSpec {
    pub(crate) side: TlsSide,
    /// A handshake not finished within this closes its connection (counted in
    /// `tls_handshake_timeouts`).
    pub handshake_timeout: Duration,
}

/// Which end of TLS the shard is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TlsSide {
    /// A listener's: the configuration new handshakes use ([`Server::set_tls`] replaces it).
    Server(TlsAcceptor),
    /// The load generator's: it sends the ClientHello when it adopts a connection.
    Client(TlsConnector),
}

impl TlsSpec {
    /// A listener terminating TLS with `acceptor`'s configuration (certificate, key, versions,
    /// ALPN); a handshake not finished within `handshake_timeout` closes its connection.
    pub fn server(acceptor: TlsAcceptor, handshake_timeout: Duration) -> TlsSpec {
        TlsSpec {
            side: TlsSide::Server(acceptor),
            handshake_timeout,
        }
    }

    /// The load generator's side: each adopted connection starts a handshake with `connector`.
    pub(crate) fn client(connector: TlsConnector, handshake_timeout: Duration) -> TlsSpec {
        TlsSpec {
            side: TlsSide::Client(connector),
            handshake_timeout,
        }
    }
}

impl ListenerSpec {
    /// A listener with a 4096 backlog and no SO_REUSEPORT.
    pub fn new(name: &str, addr: SocketAddr) -> Self {
        ListenerSpec {
            name: name.to_string(),
            addr,
            backlog: 4096,
            reuse_port: false,
            tls: None,
        }
    }
}

/// Why a server did not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listener's address could not be bound (in use, not local, not permitted).
    #[error("listener `{name}`: cannot listen on {addr}")]
    Bind {
        /// The listener's name.
        name: String,
        /// The address asked for.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A thread or a descriptor the server needs could not be created.
    #[error("cannot start {what}")]
    Start {
        /// What could not be started (`a shard thread`, `the acceptor's eventfd`, ...).
        what: String,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// How to build a [`Server`]: listeners, shards, pinning, balance, limits and tuning, then
/// [`ServerBuilder::start`] with the service factory.
#[derive(Debug, Clone, Default)]
pub struct ServerBuilder {
    listeners: Vec<ListenerSpec>,
    shards: Option<usize>,
    pinning: Pinning,
    balance: Balance,
    max_connections: Option<usize>,
    limits: Limits,
    tuning: Tuning,
    offload: OffloadSpec,
    /// Listening sockets taken over from an old process, by listener name: used instead of
    /// binding ([`handover::Takeover::take_listeners`]).
    inherited: Vec<(String, Arc<[TcpListener]>)>,
    hooks: handover::Hooks,
    /// The server takes an old process over: its hooks' `taking` runs before the shards start.
    taking_over: bool,
}

impl ServerBuilder {
    /// Adds a listener; [`Conn::listener`] is its position in the order they were added.
    pub fn listener(mut self, spec: ListenerSpec) -> Self {
        self.listeners.push(spec);
        self
    }

    /// Number of shards (default: the CPUs this process may use).
    pub fn shards(mut self, n: usize) -> Self {
        self.shards = Some(n.max(1));
        self
    }

    /// Default: [`Pinning::Auto`].
    pub fn pinning(mut self, pinning: Pinning) -> Self {
        self.pinning = pinning;
        self
    }

    /// Default: [`Balance::RoundRobin`].
    pub fn balance(mut self, balance: Balance) -> Self {
        self.balance = balance;
        self
    }

    /// Open connections beyond which new ones are closed at once and counted (default: no
    /// limit but the descriptor limit).
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = Some(n);
        self
    }

    /// The limits every shard starts with (default [`Limits::default`]; changed later with
    /// [`Server::set_limits`]).
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Engine settings (default [`Tuning::default`]).
    pub fn tuning(mut self, tuning: Tuning) -> Self {
        self.tuning = tuning;
        self
    }

    /// The size of the offload pool ([`Peers::offload`]); default [`OffloadSpec::default`]. The
    /// pool's threads start with the first job: a server whose service never offloads has none.
    pub fn offload(mut self, spec: OffloadSpec) -> Self {
        self.offload = spec;
        self
    }

    /// What the product carries across a hand-over besides connections (default: nothing).
    pub fn handover_hooks(mut self, hooks: Arc<dyn handover::HandoverHooks>) -> Self {
        self.hooks = handover::Hooks(hooks);
        self
    }

    /// Serve listener `name` on these already listening sockets instead of binding it.
    pub(crate) fn inherit(mut self, name: &str, sockets: Vec<TcpListener>) -> Self {
        self.inherited.retain(|(n, _)| n != name);
        self.inherited.push((name.to_string(), sockets.into()));
        self
    }

    /// The pool layout this builder asks for, resolved on this host: shard count and the core
    /// of each shard.
    pub(crate) fn pool_spec(&self) -> PoolSpec {
        let n = self.shards.unwrap_or_else(affinity::usable_cpus).max(1);
        let cores: Vec<Option<usize>> = match &self.pinning {
            Pinning::Off => vec![None; n],
            Pinning::Cores(list) => (0..n).map(|i| list.get(i).copied()).collect(),
            Pinning::Auto => {
                let allowed = affinity::allowed_cores();
                if allowed.is_empty() {
                    vec![None; n]
                } else {
                    if n > allowed.len() {
                        log::warn!(
                            "{n} shards on {} allowed cores: some cores run several shards",
                            allowed.len()
                        );
                    }
                    (0..n).map(|i| Some(allowed[i % allowed.len()])).collect()
                }
            }
        };
        PoolSpec {
            shards: n,
            cores,
            limits: self.limits,
            tuning: self.tuning,
            offload: self.offload,
            tls: self.listeners.iter().map(|l| l.tls.clone()).collect(),
        }
    }

    /// Binds every listener, starts the shards (each building its service with `factory` on its
    /// own thread) and the acceptor (none with [`Balance::Reuseport`]).
    pub fn start<S, F>(self, factory: F) -> Result<Server, ServerError>
    where
        S: Service,
        F: Fn(ShardInfo, Peers<S::Command>) -> S + Send + Sync + 'static,
    {
        let spec = self.pool_spec();
        if self.taking_over {
            // Before a shard runs: the product holds what must wait for the commit.
            self.hooks.0.taking();
        }
        let max_connections = self.max_connections.unwrap_or(usize::MAX);
        let reuseport = self.balance == Balance::Reuseport;
        let mut shared = Vec::new();
        let mut own: Vec<Vec<Listener>> = (0..spec.shards).map(|_| Vec::new()).collect();
        let mut addrs = Vec::new();
        let mut offer = Vec::new();
        for (i, l) in self.listeners.iter().enumerate() {
            let bind_err = |source| ServerError::Bind {
                name: l.name.clone(),
                addr: l.addr,
                source,
            };
            let inherited = self.inherited.iter().find(|(n, _)| *n == l.name);
            let mut sockets: Vec<TcpListener> = match inherited {
                Some((_, taken)) => taken
                    .iter()
                    .map(TcpListener::try_clone)
                    .collect::<std::io::Result<_>>()
                    .map_err(bind_err)?,
                None => vec![socket::listen(l.addr, l.backlog, l.reuse_port || reuseport)
                    .map_err(bind_err)?],
            };
            let addr = socket::local_addr(&sockets[0]).map_err(bind_err)?;
            let reusable = socket::has_reuse_port(sockets[0].as_fd());
            addrs.push((l.name.clone(), addr));
            if reuseport {
                // One socket per shard on the same port (the first fixed the port if it was 0);
                // sockets taken over are dealt out first.
                if sockets.len() < spec.shards && !reusable {
                    log::warn!(
                        "listener `{}`: the socket taken over has no SO_REUSEPORT, so only {} of \
                         {} shards accept on it until the next restart",
                        l.name,
                        sockets.len(),
                        spec.shards
                    );
                }
                while sockets.len() < spec.shards && reusable {
                    sockets.push(socket::listen(addr, l.backlog, true).map_err(bind_err)?);
                }
                for (k, sock) in sockets.iter().enumerate() {
                    let sock = sock.try_clone().map_err(bind_err)?;
                    own[k % spec.shards].push(Listener::new(sock, i, &l.name));
                }
            } else {
                for sock in &sockets {
                    let sock = sock.try_clone().map_err(bind_err)?;
                    shared.push(Listener::new(sock, i, &l.name));
                }
            }
            // The second descriptors, kept to offer these sockets to a new process.
            offer.push(OfferedSockets {
                name: l.name.clone(),
                addr,
                reuse_port: reusable,
                sockets,
            });
        }
        let format = S::HANDOVER_FORMAT;
        if reuseport {
            let (pool, _) = ShardPool::start_with_listeners(&spec, own, max_connections, factory)?;
            return Ok(Server {
                addrs,
                pool,
                acceptor: None,
                balance: self.balance,
                format,
                offer,
                control: None,
                hooks: self.hooks,
            });
        }
        let (pool, _) = ShardPool::start(&spec, factory)?;
        let start_err = |what: &str| {
            let what = what.to_string();
            move |source| ServerError::Start { what, source }
        };
        let wake = Waker::new().map_err(start_err("the acceptor's eventfd"))?;
        let (control, control_rx) = crossbeam_channel::bounded(4);
        let acceptor = Acceptor::new(
            shared,
            pool.ports(),
            self.balance,
            max_connections,
            pool.stats_arc(),
            wake.clone(),
            control_rx,
        )
        .map_err(start_err("the acceptor"))?;
        let handle = std::thread::Builder::new()
            .name("acceptor".into())
            .spawn(move || acceptor.run())
            .map_err(start_err("the acceptor thread"))?;
        Ok(Server {
            addrs,
            pool,
            acceptor: Some(AcceptorHandle {
                wake,
                control,
                handle,
            }),
            balance: self.balance,
            format,
            offer,
            control: None,
            hooks: self.hooks,
        })
    }
}

/// The acceptor thread and how to reach it.
struct AcceptorHandle {
    wake: Waker,
    control: Sender<AcceptorControl>,
    handle: JoinHandle<()>,
}

/// A running server. Dropping it shuts it down gracefully.
pub struct Server {
    addrs: Vec<(String, SocketAddr)>,
    pool: ShardPool,
    acceptor: Option<AcceptorHandle>,
    balance: Balance,
    /// The service's hand-over format (`Service::HANDOVER_FORMAT`).
    format: &'static str,
    /// Second descriptors of every listening socket, to offer to a new process; they go to the
    /// control thread when it starts, and are closed before the listeners at shutdown (so a
    /// closing listener is really closed).
    offer: Vec<OfferedSockets>,
    control: Option<ControlThread>,
    hooks: handover::Hooks,
}

impl Server {
    /// A builder with no listener and every default.
    pub fn builder() -> ServerBuilder {
        ServerBuilder::default()
    }

    /// Every listener's name and bound address (the real port when the spec said 0).
    pub fn addrs(&self) -> &[(String, SocketAddr)] {
        &self.addrs
    }

    /// The bound address of the listener called `name`.
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.addrs.iter().find(|(n, _)| n == name).map(|(_, a)| *a)
    }

    /// The counters, read-only.
    pub fn stats(&self) -> StatsView {
        self.pool.stats()
    }

    /// Every counter now (engine, offload pool, the services' registered counters).
    pub fn snapshot(&self) -> Snapshot {
        self.pool.stats().snapshot()
    }

    /// How many shards run.
    pub fn shard_count(&self) -> usize {
        self.pool.len()
    }

    /// The core each shard is pinned to (`None`: not pinned).
    pub fn cores(&self) -> &[Option<usize>] {
        self.pool.cores()
    }

    /// Shards whose thread has died: the server no longer serves whole (health should fail).
    pub fn dead_shards(&self) -> usize {
        self.pool.dead_shards()
    }

    /// Applies new limits in every shard (a reload); `Ok` once every shard acknowledged them.
    pub fn set_limits(&self, limits: Limits) -> Result<(), ControlError> {
        self.pool.set_limits(limits)
    }

    /// Gives listener `listener` (its position in the builder's order) a new TLS configuration
    /// (a certificate reload): every shard uses it for the handshakes that start after it
    /// acknowledged; open connections keep theirs. `Ok` once every shard has it.
    pub fn set_tls(&self, listener: usize, acceptor: TlsAcceptor) -> Result<(), ControlError> {
        self.pool.set_tls(listener, acceptor)
    }

    /// Serves the control socket at `path` (a Unix socket, mode 0600): a new process can take
    /// this server over (`serve --takeover`), and `shardnet upgrade` can ask for one. The events
    /// say when an upgrade is asked for and when a hand-over has committed (this process should
    /// then drain and exit). `replace`: the path is the one of a process this one took over
    /// from, replaced even though that process may still answer on it. Once per server.
    pub fn open_control(
        &mut self,
        path: &Path,
        replace: bool,
    ) -> Result<Receiver<ControlEvent>, HandoverError> {
        if self.control.is_some() {
            return Err(HandoverError::Failed(
                "the control socket is open already".into(),
            ));
        }
        let giver = Giver {
            ports: self.pool.ports(),
            stats: self.pool.stats_arc(),
            acceptor: self
                .acceptor
                .as_ref()
                .map(|a| (a.control.clone(), a.wake.clone())),
            offer: std::mem::take(&mut self.offer),
            format: self.format,
            hooks: self.hooks.clone(),
        };
        let (thread, events) = ControlThread::start(path, replace, giver)?;
        self.control = Some(thread);
        Ok(events)
    }

    /// The process started for an upgrade ended before taking over: the control thread tells
    /// whoever asked (`shardnet upgrade`).
    pub fn upgrade_failed(&self, why: String) {
        if let Some(c) = &self.control {
            c.upgrade_failed(why);
        }
    }

    /// Graceful shutdown: stop accepting and close the listeners, then every shard answers what
    /// it has read, flushes, closes its connections and exits (forcibly after
    /// `shutdown_timeout`). A hand-over in progress ends first (its connections come back here
    /// unless it had committed). Blocks until the threads are gone; false if one had to be
    /// abandoned.
    pub fn shutdown(&mut self) -> bool {
        if let Some(control) = self.control.take() {
            control.stop();
        }
        self.offer.clear();
        if let Some(a) = self.acceptor.take() {
            let _ = a.control.send(AcceptorControl::Stop);
            a.wake.wake();
            let _ = a.handle.join();
        }
        self.pool.shutdown()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}
