//! The new process's side: [`Takeover`], driven by the thread that starts the server
//! (`shardnet serve --takeover`), step by step around the server's own start.
//!
//! 1. [`Takeover::connect`]: hello, and the version and state format agreed (or refused);
//! 2. [`Takeover::take_listeners`]: the sockets of the listeners both configurations share, put
//!    into the [`ServerBuilder`] in place of binding;
//! 3. the caller starts the server, which accepts at once;
//! 4. [`Takeover::take_connections`]: says so (the old process stops accepting), receives the
//!    batches and spreads the connections over its shards by its balance policy (held, not
//!    served), has every shard take its share, then commits and only then serves them.
//!
//! Any failure before the commit write succeeded gives the held connections back (the old
//! process restores them) and returns the error; the caller then shuts its server down and
//! exits. After the commit nothing can fail: the connections are this process's.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::wire::{self, FrameReader, Message, Offered, Record};
use super::{HandoverError, ImportJob, EXPORT_TIMEOUT, STEP_TIMEOUT, TEST_KILL_VAR};
use crate::server::pool::control_all;
use crate::server::port::{Control, Handover, NewConn, ShardPort};
use crate::server::{Balance, Server, ServerBuilder};
use crate::stats::Stats;
use crate::sys::fdpass;

/// What a takeover achieved.
#[derive(Debug, Clone)]
pub struct TakeoverReport {
    /// The process taken over.
    pub old_pid: u32,
    /// Listeners taken over (the others were bound afresh).
    pub listeners: usize,
    /// Connections taken over.
    pub connections: u64,
    /// Connections the old process kept (its service could not hand them over).
    pub kept: u64,
    /// From hello to commit.
    pub took: Duration,
}

/// A point where the tests crash the new process ([`TEST_KILL_VAR`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KillAt {
    Listeners,
    Connections,
    End,
}

/// A takeover in progress (the new process's side of a hand-over).
pub struct Takeover {
    stream: UnixStream,
    reader: FrameReader,
    started: Instant,
    old_pid: u32,
    offered: Vec<Offered>,
    /// Old listener index → this server's, for the listeners taken.
    map: Vec<Option<usize>>,
    taken_listeners: usize,
    kill_at: Option<KillAt>,
}

fn sock_err(path: &Path) -> impl Fn(std::io::Error) -> HandoverError + '_ {
    move |source| HandoverError::Socket {
        path: path.display().to_string(),
        source,
    }
}

impl Takeover {
    /// Connects to the old process's control socket and agrees on a version and the service's
    /// state format (`format`: the service's `HANDOVER_FORMAT`). Nothing has moved yet if this
    /// fails.
    pub fn connect(path: &Path, format: &str) -> Result<Takeover, HandoverError> {
        let stream = UnixStream::connect(path).map_err(sock_err(path))?;
        stream
            .set_read_timeout(Some(STEP_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(STEP_TIMEOUT)))
            .map_err(sock_err(path))?;
        let kill_at = match std::env::var(TEST_KILL_VAR).as_deref() {
            Ok("listeners") => Some(KillAt::Listeners),
            Ok("connections") => Some(KillAt::Connections),
            Ok("end") => Some(KillAt::End),
            _ => None,
        };
        let mut t = Takeover {
            stream,
            reader: FrameReader::default(),
            started: Instant::now(),
            old_pid: 0,
            offered: Vec::new(),
            map: Vec::new(),
            taken_listeners: 0,
            kill_at,
        };
        let (min, max) = (*wire::VERSIONS.start(), *wire::VERSIONS.end());
        t.write(&Message::Hello {
            min,
            max,
            pid: std::process::id(),
            format: format.to_string(),
        })?;
        match t.read()? {
            Message::Welcome {
                version,
                pid,
                listeners,
                connections,
                shards,
            } => {
                if !wire::VERSIONS.contains(&version) {
                    let err = HandoverError::Version {
                        theirs: version,
                        min,
                        max,
                    };
                    t.abort(&err.to_string());
                    return Err(err);
                }
                log::info!(
                    "takeover: pid {pid} (version {version}, {shards} shards, {connections} \
                     connections) agreed to hand over"
                );
                t.old_pid = pid;
                t.map = vec![None; listeners.len()];
                t.offered = listeners;
                Ok(t)
            }
            Message::Refuse { reason } => Err(HandoverError::Refused(reason)),
            other => Err(HandoverError::Unexpected {
                got: other.name(),
                want: "welcome",
            }),
        }
    }

    /// The old process's pid.
    pub fn old_pid(&self) -> u32 {
        self.old_pid
    }

    /// Takes the listening sockets of every listener `builder` shares with the old process (the
    /// same name, and the same address unless the builder's port is 0) and returns the builder
    /// with them in place of binding. Listeners the builder lacks stay with the old process
    /// (closed when it exits, with their connections); new ones are bound as usual.
    pub fn take_listeners(
        &mut self,
        mut builder: ServerBuilder,
    ) -> Result<ServerBuilder, HandoverError> {
        let mut indices = Vec::new();
        for (i, o) in self.offered.iter().enumerate() {
            let Some(pos) = builder.listeners.iter().position(|l| l.name == o.name) else {
                log::info!(
                    "takeover: listener `{}` is not in this configuration",
                    o.name
                );
                continue;
            };
            let theirs: Option<SocketAddr> = o.addr.parse().ok();
            let ours = builder.listeners[pos].addr;
            let same =
                theirs.is_some_and(|t| t == ours || (ours.port() == 0 && t.ip() == ours.ip()));
            if !same {
                log::info!(
                    "takeover: listener `{}` moves from {} to {ours}: bound afresh",
                    o.name,
                    o.addr
                );
                continue;
            }
            indices.push(i as u16);
            self.map[i] = Some(pos);
        }
        // The server it starts takes over: its product's hooks hear it before a shard starts.
        builder.taking_over = true;
        self.write(&Message::WantListeners {
            indices: indices.clone(),
        })?;
        let (m, mut fds) = self.reader.next(&self.stream)?;
        let counts = match m {
            Message::Listeners { counts } => counts,
            other => return Err(self.unexpected(other, "listeners")),
        };
        if counts.len() != indices.len() {
            return Err(self.fail("the listener counts do not match the request".into()));
        }
        let mut fds = fds.drain(..);
        for (&i, &n) in indices.iter().zip(&counts) {
            let o = &self.offered[i as usize];
            let sockets: Vec<TcpListener> = fds
                .by_ref()
                .take(n as usize)
                .map(TcpListener::from)
                .collect();
            if sockets.is_empty() {
                return Err(self.fail(format!("no socket came for listener `{}`", o.name)));
            }
            log::info!(
                "takeover: listener `{}` on {} taken ({} socket{})",
                o.name,
                o.addr,
                sockets.len(),
                if sockets.len() == 1 { "" } else { "s" }
            );
            builder = builder.inherit(&o.name, sockets);
        }
        self.taken_listeners = indices.len();
        Ok(builder)
    }

    /// With the server running on the taken listeners: tells the old process it accepts, takes
    /// every connection it sends (held), and commits. The connections are served from the
    /// moment this returns `Ok`; on `Err` they went back to the old process.
    pub fn take_connections(mut self, server: &Server) -> Result<TakeoverReport, HandoverError> {
        let ports = server.pool.ports();
        let stats = server.pool.stats_arc();
        let job = Arc::new(ImportJob::default());
        let receive = Control::Handover(Handover::Receive(job.clone()));
        if let Err(e) = control_all(&ports, &stats, receive, "receive", STEP_TIMEOUT) {
            return Err(self.fail(e.to_string()));
        }
        match self.receive(server, &ports, &stats, &job) {
            Ok(report) => Ok(report),
            Err(e) => {
                // What the product holds goes back to the old process, which serves on.
                let back = server.hooks.0.abandoned();
                if !back.is_empty() {
                    let _ = fdpass::send_all(
                        self.stream.as_fd(),
                        &Message::Relay { data: back }.encode(),
                        &[],
                    );
                }
                self.abort(&e.to_string());
                let abandon = Control::Handover(Handover::Abandon);
                let _ = control_all(&ports, &stats, abandon, "abandon", EXPORT_TIMEOUT);
                server.pool.stats_arc().handover().failed.inc();
                Err(e)
            }
        }
    }

    fn receive(
        &mut self,
        server: &Server,
        ports: &[ShardPort],
        stats: &Stats,
        job: &ImportJob,
    ) -> Result<TakeoverReport, HandoverError> {
        self.write(&Message::Accepting)?;
        self.kill_point(KillAt::Listeners);
        let mut spread = Spread::new(server.balance, ports.len());
        let mut received = 0u64;
        let mut first_batch: Option<Instant> = None;
        let (sent, kept) = loop {
            let (m, fds) = self.reader.next(&self.stream)?;
            match m {
                Message::Batch { records, .. } => {
                    first_batch.get_or_insert_with(Instant::now);
                    received += records.len() as u64;
                    self.place(records, fds, ports, stats, &mut spread)?;
                    self.kill_point(KillAt::Connections);
                }
                Message::Relay { data } => server.hooks.0.received(&data),
                Message::End { sent, kept } => break (sent, kept),
                Message::Abort { reason } => return Err(HandoverError::Aborted(reason)),
                other => return Err(self.unexpected(other, "batch or end")),
            }
        };
        if received != sent {
            return Err(self.fail(format!("{received} connections arrived of the {sent} sent")));
        }
        // Every shard takes what is still in its channel; then the count must be whole.
        if let Err(e) = control_all(
            ports,
            stats,
            Control::Handover(Handover::Prepare),
            "prepare",
            EXPORT_TIMEOUT,
        ) {
            return Err(self.fail(e.to_string()));
        }
        if let Some(why) = job.failure.reason() {
            return Err(HandoverError::Failed(why));
        }
        let imported = job.imported.load(std::sync::atomic::Ordering::Relaxed);
        if imported != received {
            return Err(self.fail(format!(
                "the shards hold {imported} of the {received} connections received"
            )));
        }
        self.kill_point(KillAt::End);
        // The decisive write: once it is in the old process's buffer, the connections are ours.
        // If it fails, the old process has shut its read side and takes them back.
        self.write(&Message::Commit { taken: received })?;
        // Before any moved connection is served: what the product held (the old process's
        // relayed publishes, then its own) goes out now, to subscribers that are all here.
        server.hooks.0.took();
        let activate = Control::Handover(Handover::Activate);
        if let Err(e) = control_all(ports, stats, activate, "activate", EXPORT_TIMEOUT) {
            // The message waits in the shards' channels: they serve them once they read it.
            log::error!("takeover: {e}");
        }
        let took = self.started.elapsed();
        let moving = first_batch.map_or(Duration::ZERO, |t| t.elapsed());
        let c = stats.handover();
        c.taken.inc();
        c.last_micros.set(took.as_micros() as u64);
        c.last_moving_micros.set(moving.as_micros() as u64);
        log::info!(
            "takeover committed: {received} connections from pid {} in {took:?} ({kept} kept there)",
            self.old_pid
        );
        Ok(TakeoverReport {
            old_pid: self.old_pid,
            listeners: self.taken_listeners,
            connections: received,
            kept,
            took,
        })
    }

    /// Hands one batch's connections to this server's shards, held.
    fn place(
        &self,
        records: Vec<Record>,
        fds: Vec<OwnedFd>,
        ports: &[ShardPort],
        stats: &Stats,
        spread: &mut Spread,
    ) -> Result<(), HandoverError> {
        spread.refresh(stats);
        for (record, fd) in records.into_iter().zip(fds) {
            let Some(listener) = self.map.get(record.listener as usize).copied().flatten() else {
                return Err(HandoverError::Failed(format!(
                    "a connection of listener {} came, which this process did not take",
                    record.listener
                )));
            };
            let mut nc = NewConn {
                fd,
                listener,
                import: Some(Box::new(record)),
            };
            let first = spread.pick();
            let mut placed = false;
            for k in 0..ports.len() {
                let shard = (first + k) % ports.len();
                // Past the channel's bound: the shard takes them all before the commit anyway
                // (`Prepare`), and a full channel would only make this thread sleep.
                match ports[shard].conns.send_over(nc) {
                    Ok(()) => {
                        spread.placed(shard);
                        placed = true;
                        break;
                    }
                    Err(back) => nc = back,
                }
            }
            if !placed {
                return Err(HandoverError::Failed(
                    "no shard took a connection (every shard is gone)".into(),
                ));
            }
        }
        for (shard, woken) in spread.woken.iter_mut().enumerate() {
            if std::mem::take(woken) {
                ports[shard].waker.wake();
            }
        }
        Ok(())
    }

    fn kill_point(&self, at: KillAt) {
        if self.kill_at == Some(at) {
            log::warn!("takeover: {TEST_KILL_VAR} says to die here ({at:?})");
            fdpass::kill_self();
        }
    }

    fn write(&self, m: &Message) -> Result<(), HandoverError> {
        fdpass::send_all(self.stream.as_fd(), &m.encode(), &[]).map_err(|e| {
            HandoverError::Failed(format!("writing {} to the running server: {e}", m.name()))
        })
    }

    fn read(&mut self) -> Result<Message, HandoverError> {
        Ok(self.reader.next(&self.stream)?.0)
    }

    fn abort(&self, reason: &str) {
        let _ = fdpass::send_all(
            self.stream.as_fd(),
            &Message::Abort {
                reason: reason.to_string(),
            }
            .encode(),
            &[],
        );
    }

    fn fail(&self, why: String) -> HandoverError {
        HandoverError::Failed(why)
    }

    fn unexpected(&self, got: Message, want: &'static str) -> HandoverError {
        match got {
            Message::Abort { reason } => HandoverError::Aborted(reason),
            other => HandoverError::Unexpected {
                got: other.name(),
                want,
            },
        }
    }
}

/// Where the next connection goes: this server's balance policy over its shards.
struct Spread {
    balance: Balance,
    next: usize,
    /// Open connections per shard (from the counters, plus what was placed since).
    open: Vec<u64>,
    woken: Vec<bool>,
}

impl Spread {
    fn new(balance: Balance, shards: usize) -> Spread {
        Spread {
            balance,
            next: 0,
            open: vec![0; shards],
            woken: vec![false; shards],
        }
    }

    fn refresh(&mut self, stats: &Stats) {
        for (i, o) in self.open.iter_mut().enumerate() {
            *o = stats.shard(i).open.get();
        }
    }

    fn pick(&mut self) -> usize {
        let n = self.open.len();
        match self.balance {
            Balance::LeastConnections => (0..n).min_by_key(|&s| (self.open[s], s)).unwrap_or(0),
            Balance::RoundRobin | Balance::Reuseport => self.next % n,
        }
    }

    fn placed(&mut self, shard: usize) {
        self.open[shard] += 1;
        self.next = shard + 1;
        self.woken[shard] = true;
    }
}
