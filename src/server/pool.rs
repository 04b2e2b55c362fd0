//! A pool of running shards (the server's workers, and the load generator's): threads named
//! `shard-NN`, each pinned as asked and building its service on its own thread; the channels that
//! reach them; control messages with acknowledgements; and how a dead shard is noticed.
//!
//! Owned by the thread that started it (the server's, or the bench's). Control (drain, new
//! limits) goes on each shard's control channel and is acknowledged by the shard once applied:
//! [`ShardPool::set_limits`] says whether every shard applied the new limits, and a control
//! message that cannot be sent or is not acknowledged in time is logged and counted
//! (`control_failures`). A shard thread that ends by a panic clears its `alive` gauge, is counted
//! in `dead_shards` and logged: the process knows it is no longer whole.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::bounded;

use crate::server::api::{PeerPort, Peers, Service, ShardInfo};
use crate::server::listener::Listener;
use crate::server::offload::{Offload, OffloadSpec, ResultPort, Stop};
use crate::server::port::{shard_channels, Control, ControlMsg, NewConn, ShardPort};
use crate::server::shard::{Shard, ShardSetup, TICK};
use crate::server::{Limits, ServerError, TlsSpec, Tuning};
use crate::stats::{Registry, Stats, StatsView};
use crate::sys::{affinity, waker::Waker};
use crate::tls::TlsAcceptor;

/// How long a control message may wait for room in a shard's control channel.
const CONTROL_SEND_TIMEOUT: Duration = Duration::from_secs(1);
/// How long every shard together has to acknowledge new limits (a loop turn is milliseconds;
/// this is generous for a loaded host).
const LIMITS_ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the shards have to acknowledge a drain before the pool reports it (it still waits
/// for the threads up to `shutdown_timeout`).
const DRAIN_ACK_TIMEOUT: Duration = Duration::from_secs(2);

/// Some shards did not apply a control message.
#[derive(Debug, thiserror::Error)]
#[error("{missing} of {shards} shards did not acknowledge {what}")]
pub struct ControlError {
    /// What was asked (`new limits`, `drain`).
    pub what: &'static str,
    /// How many shards did not.
    pub missing: usize,
    /// How many shards there are.
    pub shards: usize,
}

/// How to run a pool's shards.
#[derive(Debug, Clone)]
pub(crate) struct PoolSpec {
    pub shards: usize,
    /// Core for each shard (`None`: not pinned).
    pub cores: Vec<Option<usize>>,
    pub limits: Limits,
    pub tuning: Tuning,
    /// TLS of each listener, by listener index (`None` or missing: plain).
    pub tls: Vec<Option<TlsSpec>>,
    /// The offload pool the shards' services share (its threads start with the first job).
    pub offload: OffloadSpec,
}

/// A set of running shards with their channels.
pub(crate) struct ShardPool {
    stats: Arc<Stats>,
    /// Stopped after the shards.
    offload: Arc<dyn Stop>,
    ports: Vec<ShardPort>,
    handles: Vec<JoinHandle<()>>,
    cores: Vec<Option<usize>>,
    shutdown_timeout: Duration,
    stopped: bool,
}

/// Clears the shard's `alive` gauge when its thread ends, and reports a death by panic.
struct AliveGuard {
    stats: Arc<Stats>,
    shard: usize,
}

impl Drop for AliveGuard {
    fn drop(&mut self) {
        let counters = self.stats.shard(self.shard);
        counters.alive.set(0);
        if std::thread::panicking() {
            // Unwinding dropped the shard and closed its connections without counting them.
            counters.open.set(0);
            counters.output_queued.set(0);
            counters.input_buffered.set(0);
            self.stats.shard_died();
            log::error!(
                "shard {}: its thread died (a panic outside any connection's callback); its \
                 connections are closed and it takes no new ones",
                self.shard
            );
        }
    }
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
    pub(crate) fn start_with_listeners<S, F>(
        spec: &PoolSpec,
        mut listeners: Vec<Vec<Listener>>,
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
        let mut result_ports = Vec::with_capacity(n);
        let mut inboxes = Vec::with_capacity(n);
        for _ in 0..n {
            let waker = Waker::new().map_err(start_err("a shard's eventfd"))?;
            let (port, senders, inbox) = shard_channels(waker.clone());
            ports.push(port);
            peer_ports.push(PeerPort {
                data: senders.data,
                waker: waker.clone(),
            });
            result_ports.push(ResultPort {
                tx: senders.results,
                waker: waker.clone(),
            });
            inboxes.push((waker, inbox));
        }
        let offload = Arc::new(Offload::new(spec.offload, stats.clone(), result_ports));
        let peers = Peers {
            ports: peer_ports.into(),
            offload: offload.clone(),
        };

        let factory = Arc::new(factory);
        let started = Instant::now();
        let (ready_tx, ready_rx) = bounded::<Result<(), std::io::Error>>(n);
        let mut handles = Vec::with_capacity(n);
        for (i, (waker, inbox)) in inboxes.into_iter().enumerate() {
            let factory = factory.clone();
            let peers = peers.clone();
            let stats = stats.clone();
            let ready_tx = ready_tx.clone();
            let core = spec.cores.get(i).copied().flatten();
            let (limits, tuning) = (spec.limits, spec.tuning);
            let tls = spec.tls.clone();
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
                        counters: Registry::new(stats.clone(), i),
                        shard: i,
                        shards: n,
                        started,
                        tick: TICK,
                        stats: StatsView::new(stats.clone()),
                    };
                    let service = factory(info, peers);
                    let setup = ShardSetup {
                        shard: i,
                        limits,
                        tuning,
                        stats: stats.clone(),
                        waker,
                        inbox,
                        start: started,
                        listeners: own,
                        max_connections,
                        tls,
                    };
                    match Shard::new(service, setup) {
                        Ok(shard) => {
                            stats.shard(i).alive.set(1);
                            let _guard = AliveGuard { stats, shard: i };
                            let _ = ready_tx.send(Ok(()));
                            drop(ready_tx);
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
        let mut pool = ShardPool {
            stats,
            offload,
            ports,
            handles,
            cores: spec.cores.clone(),
            shutdown_timeout: spec.tuning.shutdown_timeout,
            stopped: false,
        };
        for _ in 0..n {
            let err = match ready_rx.recv() {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e,
                Err(_) => std::io::Error::other("shard thread exited during start"),
            };
            pool.shutdown();
            return Err(ServerError::Start {
                what: "a shard".into(),
                source: err,
            });
        }
        Ok((pool, peers))
    }

    /// The pool's counters, read-only.
    pub fn stats(&self) -> StatsView {
        StatsView::new(self.stats.clone())
    }

    pub(crate) fn stats_arc(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    pub fn len(&self) -> usize {
        self.ports.len()
    }

    pub fn cores(&self) -> &[Option<usize>] {
        &self.cores
    }

    /// Shards whose thread has died.
    pub fn dead_shards(&self) -> usize {
        self.stats.dead_shards()
    }

    pub(crate) fn ports(&self) -> Vec<ShardPort> {
        self.ports.clone()
    }

    /// Hands a connected socket to `shard` (the load generator's connections). Blocks briefly if
    /// that shard's queue is full.
    pub fn adopt(&self, shard: usize, fd: OwnedFd, listener: usize) -> bool {
        let port = &self.ports[shard % self.ports.len()];
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut nc = NewConn::accepted(fd, listener);
        loop {
            match port.conns.try_send(nc) {
                Ok(()) => {
                    port.waker.wake();
                    return true;
                }
                Err(back) if std::time::Instant::now() < deadline => {
                    nc = back;
                    port.waker.wake();
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => return false,
            }
        }
    }

    /// Applies new limits in every shard; `Ok` once every shard has acknowledged them.
    pub fn set_limits(&self, limits: Limits) -> Result<(), ControlError> {
        self.control(Control::Limits(limits), "new limits", LIMITS_ACK_TIMEOUT)
    }

    /// Gives listener `listener`'s new TLS configuration to every shard: handshakes that start
    /// after a shard's acknowledgement use it; open connections keep the one they started with.
    pub fn set_tls(&self, listener: usize, acceptor: TlsAcceptor) -> Result<(), ControlError> {
        let control = Control::Tls(listener, acceptor);
        self.control(control, "a new TLS configuration", LIMITS_ACK_TIMEOUT)
    }

    /// Sends `control` to every shard and waits (up to `wait` in all) for their
    /// acknowledgements; see [`control_all`].
    pub(crate) fn control(
        &self,
        control: Control,
        what: &'static str,
        wait: Duration,
    ) -> Result<(), ControlError> {
        control_all(&self.ports, &self.stats, control, what, wait)
    }

    /// Drains every shard and waits for the threads (at most `shutdown_timeout` plus a margin),
    /// then stops the offload pool. False if a thread had to be abandoned or had died. Later
    /// calls do nothing.
    pub fn shutdown(&mut self) -> bool {
        if std::mem::replace(&mut self.stopped, true) {
            return true;
        }
        let acked = self
            .control(Control::Drain, "drain", DRAIN_ACK_TIMEOUT)
            .is_ok();
        let deadline = Instant::now() + self.shutdown_timeout + Duration::from_secs(2);
        let mut clean = acked;
        for handle in self.handles.drain(..) {
            while !handle.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if handle.is_finished() {
                clean &= handle.join().is_ok();
            } else {
                clean = false;
            }
        }
        // After the shards: their connections took the results of the jobs still running.
        clean &= self.offload.stop();
        clean
    }
}

/// Sends `control` to every shard of `ports` and waits (up to `wait` in all) for their
/// acknowledgements. Every shard that could not be reached or did not answer is logged and
/// counted (`control_failures`).
pub(crate) fn control_all(
    ports: &[ShardPort],
    stats: &Stats,
    control: Control,
    what: &'static str,
    wait: Duration,
) -> Result<(), ControlError> {
    let n = ports.len();
    let (ack_tx, ack_rx) = bounded(n);
    let mut sent = 0;
    for (i, port) in ports.iter().enumerate() {
        let msg = ControlMsg {
            control: control.clone(),
            ack: ack_tx.clone(),
        };
        match port.control.send_timeout(msg, CONTROL_SEND_TIMEOUT) {
            Ok(()) => {
                port.waker.wake();
                sent += 1;
            }
            Err(e) => {
                let why = if e.is_timeout() {
                    "its control channel stayed full"
                } else {
                    "its thread is gone"
                };
                log::error!("shard {i}: cannot send {what}: {why}");
            }
        }
    }
    drop(ack_tx);
    let deadline = Instant::now() + wait;
    let mut acked = vec![false; n];
    let mut count = 0;
    while count < sent {
        match ack_rx.recv_deadline(deadline) {
            Ok(shard) => {
                if !std::mem::replace(&mut acked[shard], true) {
                    count += 1;
                }
            }
            Err(_) => break,
        }
    }
    if count == n {
        return Ok(());
    }
    let missing = n - count;
    stats.control_failed(missing as u64);
    let unacked: Vec<String> = (0..n)
        .filter(|&i| !acked[i])
        .map(|i| i.to_string())
        .collect();
    log::error!(
        "{missing} of {n} shards did not acknowledge {what} within {wait:?} (shards {})",
        unacked.join(", ")
    );
    Err(ControlError {
        what,
        missing,
        shards: n,
    })
}

impl Drop for ShardPool {
    fn drop(&mut self) {
        self.shutdown();
    }
}
