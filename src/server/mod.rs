//! The server: an acceptor thread handing sockets to N pinned shard threads.
//!
//! ```text
//!   listeners ──► acceptor ──(bounded channel + eventfd wake)──► shard-00 (core 0): epoll, slab, wheel
//!                     │                                       ├► shard-01 (core 1): epoll, slab, wheel
//!                     └── round-robin / least-connections     └► ...
//! ```
//!
//! Ownership rule: a shard alone owns its connections, its epoll instance, its timer wheel and its
//! buffers. Only three things cross threads: messages on a shard's bounded channels (new sockets
//! from the acceptor; commands such as drain, new limits or a service's pub/sub message), each
//! followed by a wake of the shard's eventfd; the per-shard counters, written by their owner and
//! read by anyone; and stats snapshots. No lock is taken on the hot path.

pub mod acceptor;
pub mod shard;

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Sender, TrySendError};

use crate::config::{Balance, Config, LimitsConfig, Trigger};
use crate::service::{Service, ShardInfo};
use crate::stats::{Snapshot, Stats};
use crate::sys::{affinity, socket, waker::Waker};
use acceptor::{Acceptor, ShardPort};
use shard::Shard;
pub use shard::{Command, Limits, Tuning};

/// Capacity of each shard's channel of new sockets: a full one makes the acceptor skip it.
const CONN_QUEUE: usize = 1024;
/// Capacity of each shard's command channel (pub/sub messages).
const COMMAND_QUEUE: usize = 65536;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("listener `{name}`: cannot listen on {addr}")]
    Bind {
        name: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start {what}")]
    Start {
        what: String,
        source: std::io::Error,
    },
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

/// A service's way to reach every shard (pub/sub fan-out).
pub struct Peers<C> {
    ports: Arc<[PeerPort<C>]>,
}

struct PeerPort<C> {
    commands: Sender<Command<C>>,
    waker: Waker,
}

impl<C> Clone for Peers<C> {
    fn clone(&self) -> Self {
        Peers {
            ports: self.ports.clone(),
        }
    }
}

impl<C: Send + 'static> Peers<C> {
    pub fn len(&self) -> usize {
        self.ports.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ports.is_empty()
    }

    /// Sends to one shard without blocking; false if its queue is full (the caller counts it).
    pub fn send(&self, shard: usize, msg: C) -> bool {
        let port = &self.ports[shard];
        match port.commands.try_send(Command::Service(msg)) {
            Ok(()) => {
                port.waker.wake();
                true
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => false,
        }
    }

    /// Sends a clone to every shard; returns how many queues accepted it.
    pub fn broadcast(&self, msg: C) -> usize
    where
        C: Clone,
    {
        (0..self.ports.len())
            .filter(|&s| self.send(s, msg.clone()))
            .count()
    }
}

/// Type-erased control of one shard (the server does not need the service's types).
trait ShardControl: Send + Sync {
    fn command(&self, drain: Option<Limits>) -> bool;
}

impl<C: Send + 'static> ShardControl for PeerPort<C> {
    fn command(&self, limits: Option<Limits>) -> bool {
        let cmd = match limits {
            Some(l) => Command::Limits(l),
            None => Command::Drain,
        };
        // Control messages must not be lost to a full queue: wait a little for room.
        let ok = self
            .commands
            .send_timeout(cmd, Duration::from_secs(1))
            .is_ok();
        self.waker.wake();
        ok
    }
}

/// A set of running shards with their channels: the server's workers, and the load generator's.
pub struct ShardPool {
    stats: Arc<Stats>,
    ports: Vec<ShardPort>,
    controls: Vec<Arc<dyn ShardControl>>,
    handles: Vec<JoinHandle<()>>,
    cores: Vec<Option<usize>>,
    shutdown_timeout: Duration,
}

/// How to run a pool's shards.
#[derive(Debug, Clone)]
pub struct PoolSpec {
    pub shards: usize,
    /// Core for each shard (`None`: not pinned).
    pub cores: Vec<Option<usize>>,
    pub limits: Limits,
    pub tuning: Tuning,
}

impl ShardPool {
    /// Starts `spec.shards` threads named `shard-NN`, each pinned as asked and building its
    /// service with `factory` on its own thread. Returns once every shard is ready, with the
    /// handle that sends commands to the services.
    pub fn start<S, F>(
        spec: &PoolSpec,
        factory: F,
    ) -> Result<(ShardPool, Peers<S::Command>), ServerError>
    where
        S: Service,
        F: Fn(ShardInfo, Peers<S::Command>) -> S + Send + Sync + 'static,
    {
        Self::start_with_listeners(spec, Vec::new(), usize::MAX, factory)
    }

    /// Like [`ShardPool::start`], with each shard accepting on its own listeners
    /// (`balance = "reuseport"`): `listeners[i]` goes to shard i.
    pub fn start_with_listeners<S, F>(
        spec: &PoolSpec,
        mut listeners: Vec<Vec<shard::OwnListener>>,
        max_connections: usize,
        factory: F,
    ) -> Result<(ShardPool, Peers<S::Command>), ServerError>
    where
        S: Service,
        F: Fn(ShardInfo, Peers<S::Command>) -> S + Send + Sync + 'static,
    {
        let n = spec.shards.max(1);
        listeners.resize_with(n, Vec::new);
        let mut listeners = listeners.into_iter();
        let stats = Arc::new(Stats::new(n));
        let start_err = |what: &str| {
            let what = what.to_string();
            move |source| ServerError::Start { what, source }
        };
        let mut ports = Vec::with_capacity(n);
        let mut peer_ports = Vec::with_capacity(n);
        let mut receivers = Vec::with_capacity(n);
        for _ in 0..n {
            let waker = Waker::new().map_err(start_err("a shard's eventfd"))?;
            let (conn_tx, conn_rx) = bounded(CONN_QUEUE);
            let (cmd_tx, cmd_rx) = bounded(COMMAND_QUEUE);
            ports.push(ShardPort {
                conns: conn_tx,
                waker: waker.clone(),
            });
            peer_ports.push(PeerPort {
                commands: cmd_tx,
                waker: waker.clone(),
            });
            receivers.push((waker, conn_rx, cmd_rx));
        }
        let peer_ports: Arc<[PeerPort<S::Command>]> = peer_ports.into();
        let peers = Peers {
            ports: peer_ports.clone(),
        };

        let factory = Arc::new(factory);
        let started = Instant::now();
        let (ready_tx, ready_rx) = bounded::<Result<(), std::io::Error>>(n);
        let mut handles = Vec::with_capacity(n);
        for (i, (waker, conn_rx, cmd_rx)) in receivers.into_iter().enumerate() {
            let factory = factory.clone();
            let peers = peers.clone();
            let stats = stats.clone();
            let ready_tx = ready_tx.clone();
            let core = spec.cores.get(i).copied().flatten();
            let (limits, tuning) = (spec.limits, spec.tuning);
            let own = listeners.next().unwrap_or_default();
            let handle = std::thread::Builder::new()
                .name(format!("shard-{i:02}"))
                .spawn(move || {
                    if let Some(core) = core {
                        if !affinity::pin_current(core) {
                            log::warn!("shard {i}: could not pin to core {core}");
                        }
                    }
                    let info = ShardInfo {
                        shard: i,
                        shards: n,
                        started,
                        tick: shard::TICK,
                        stats: stats.clone(),
                    };
                    let service = factory(info, peers);
                    match Shard::new(
                        i,
                        service,
                        limits,
                        tuning,
                        stats,
                        waker,
                        conn_rx,
                        cmd_rx,
                        started,
                        own,
                        max_connections,
                    ) {
                        Ok(shard) => {
                            let _ = ready_tx.send(Ok(()));
                            shard.run();
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                })
                .map_err(start_err("a shard thread"))?;
            handles.push(handle);
        }
        drop(ready_tx);
        for _ in 0..n {
            let err = match ready_rx.recv() {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e,
                Err(_) => std::io::Error::other("shard thread exited during start"),
            };
            return Err(ServerError::Start {
                what: "a shard".into(),
                source: err,
            });
        }
        let controls = peer_ports
            .iter()
            .map(|p| {
                let port = PeerPort {
                    commands: p.commands.clone(),
                    waker: p.waker.clone(),
                };
                Arc::new(port) as Arc<dyn ShardControl>
            })
            .collect();
        let pool = ShardPool {
            stats,
            ports,
            controls,
            handles,
            cores: spec.cores.clone(),
            shutdown_timeout: spec.tuning.shutdown_timeout,
        };
        Ok((pool, peers))
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    pub fn len(&self) -> usize {
        self.ports.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ports.is_empty()
    }

    pub fn cores(&self) -> &[Option<usize>] {
        &self.cores
    }

    /// Hands a connected socket to `shard` (the load generator's connections). Blocks briefly if
    /// that shard's queue is full.
    pub fn adopt(&self, shard: usize, fd: std::os::fd::OwnedFd, listener: usize) -> bool {
        let port = &self.ports[shard % self.ports.len()];
        let ok = port
            .conns
            .send_timeout(shard::NewConn { fd, listener }, Duration::from_secs(5))
            .is_ok();
        port.waker.wake();
        ok
    }

    /// Applies new limits in every shard.
    pub fn set_limits(&self, limits: Limits) {
        for c in &self.controls {
            c.command(Some(limits));
        }
    }

    /// Drains every shard and waits for the threads (at most `shutdown_timeout` plus a margin).
    /// False if a thread had to be abandoned.
    pub fn shutdown(&mut self) -> bool {
        for c in &self.controls {
            c.command(None);
        }
        let deadline = Instant::now() + self.shutdown_timeout + Duration::from_secs(2);
        let mut clean = true;
        for handle in self.handles.drain(..) {
            while !handle.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if handle.is_finished() {
                let _ = handle.join();
            } else {
                clean = false;
            }
        }
        clean
    }

    fn take_ports(&mut self) -> Vec<ShardPort> {
        self.ports
            .iter()
            .map(|p| ShardPort {
                conns: p.conns.clone(),
                waker: p.waker.clone(),
            })
            .collect()
    }
}

impl Drop for ShardPool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A running server. Dropping it shuts it down gracefully.
pub struct Server {
    addrs: Vec<(String, SocketAddr)>,
    pool: ShardPool,
    acceptor_stop: Waker,
    acceptor: Option<JoinHandle<()>>,
}

impl Server {
    /// The pool layout a configuration asks for: shard count, pinning, limits, tuning.
    pub fn pool_spec(config: &Config) -> PoolSpec {
        let sc = &config.server;
        let n = sc.shards.resolve(affinity::usable_cpus());
        let cores: Vec<Option<usize>> = if !sc.pin {
            vec![None; n]
        } else if !sc.cores.is_empty() {
            (0..n).map(|i| sc.cores.get(i).copied()).collect()
        } else {
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
        };
        PoolSpec {
            shards: n,
            cores,
            limits: Limits::from(&config.limits),
            tuning: Tuning {
                edge: sc.trigger == Trigger::Edge,
                read_buffer: sc.read_buffer,
                read_budget: sc.read_budget.max(sc.read_buffer),
                events_per_wait: sc.events_per_wait,
                shutdown_timeout: sc.shutdown_timeout,
            },
        }
    }

    /// Binds every listener, starts the shards (each building its service with `factory` on its
    /// own thread) and the acceptor.
    pub fn start<S, F>(config: &Config, factory: F) -> Result<Server, ServerError>
    where
        S: Service,
        F: Fn(ShardInfo, Peers<S::Command>) -> S + Send + Sync + 'static,
    {
        let spec = Self::pool_spec(config);
        // `max_connections = "auto"` comes to this process's descriptor limit (already raised
        // by the CLI) less a reserve.
        let max_connections =
            config.max_connections_for(spec.shards, crate::sys::rlimit::nofile_soft().ok());
        let reuseport = config.server.balance == Balance::Reuseport;
        let mut listeners = Vec::new();
        let mut own: Vec<Vec<shard::OwnListener>> = (0..spec.shards).map(|_| Vec::new()).collect();
        let mut addrs = Vec::new();
        for (i, l) in config.listeners.iter().enumerate() {
            let bind_err = |source| ServerError::Bind {
                name: l.name.clone(),
                addr: l.addr,
                source,
            };
            let listener =
                socket::listen(l.addr, l.backlog, l.reuse_port || reuseport).map_err(bind_err)?;
            let addr = socket::local_addr(&listener).map_err(bind_err)?;
            addrs.push((l.name.clone(), addr));
            if reuseport {
                // One socket per shard on the same port (the first fixed the port if it was 0).
                own[0].push(shard::OwnListener::new(listener, i));
                for shard_listeners in own.iter_mut().skip(1) {
                    let extra = socket::listen(addr, l.backlog, true).map_err(bind_err)?;
                    shard_listeners.push(shard::OwnListener::new(extra, i));
                }
            } else {
                listeners.push((i, listener));
            }
        }
        if reuseport {
            let (pool, _) = ShardPool::start_with_listeners(&spec, own, max_connections, factory)?;
            let acceptor_stop = Waker::new().map_err(|source| ServerError::Start {
                what: "a waker".into(),
                source,
            })?;
            return Ok(Server {
                addrs,
                pool,
                acceptor_stop,
                acceptor: None,
            });
        }
        let (mut pool, _) = ShardPool::start(&spec, factory)?;
        let start_err = |what: &str| {
            let what = what.to_string();
            move |source| ServerError::Start { what, source }
        };
        let acceptor_stop = Waker::new().map_err(start_err("the acceptor's eventfd"))?;
        let acceptor = Acceptor::new(
            listeners,
            pool.take_ports(),
            config.server.balance,
            max_connections,
            pool.stats(),
            acceptor_stop.clone(),
        )
        .map_err(start_err("the acceptor"))?;
        let acceptor = std::thread::Builder::new()
            .name("acceptor".into())
            .spawn(move || acceptor.run())
            .map_err(start_err("the acceptor thread"))?;
        Ok(Server {
            addrs,
            pool,
            acceptor_stop,
            acceptor: Some(acceptor),
        })
    }

    /// Every listener's name and bound address (the real port when the config said 0).
    pub fn addrs(&self) -> &[(String, SocketAddr)] {
        &self.addrs
    }

    /// The bound address of the listener called `name`.
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.addrs.iter().find(|(n, _)| n == name).map(|(_, a)| *a)
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.pool.stats()
    }

    pub fn snapshot(&self) -> Snapshot {
        self.pool.stats.snapshot()
    }

    pub fn shard_count(&self) -> usize {
        self.pool.len()
    }

    /// The core each shard is pinned to (`None`: not pinned).
    pub fn cores(&self) -> &[Option<usize>] {
        self.pool.cores()
    }

    /// Applies new limits in every shard (a reload).
    pub fn set_limits(&self, limits: &LimitsConfig) {
        self.pool.set_limits(Limits::from(limits));
    }

    /// Graceful shutdown: stop accepting and close the listeners, then every shard answers what
    /// it has read, flushes, closes its connections and exits (forcibly after
    /// `shutdown_timeout`). Blocks until the threads are gone; false if one had to be abandoned.
    pub fn shutdown(&mut self) -> bool {
        if let Some(acceptor) = self.acceptor.take() {
            self.acceptor_stop.wake();
            let _ = acceptor.join();
        }
        self.pool.shutdown()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}
