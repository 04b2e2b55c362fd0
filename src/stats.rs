//! Counters: per shard (written only by their owner) and for the acceptor, plus snapshots.
//!
//! Each shard's counters sit on their own cache lines, so a shard never shares a written line
//! with another thread. Owners update with a relaxed load and store (no locked instruction);
//! readers (the stats logger, `/metrics`, the bench) take relaxed snapshots, which are exact per
//! counter and approximately consistent across counters: good enough for monitoring.
//!
//! Writing is crate-private and only the engine holds a `Stats`: services and library users get
//! a [`StatsView`], which reads snapshots and nothing else, so a single-writer counter cannot get
//! a second writer.
//!
//! Every counter is declared once, below, with its help text; the log line, the JSON snapshot
//! and the Prometheus exposition are all generated from that one list.
//!
//! Two kinds of counters are not the engine's single-writer ones:
//! - the offload pool's ([`OffloadSnapshot`]): written by its threads and by every shard, so
//!   they use atomic read-modify-write (once per job, never per event);
//! - the ones a service registers for itself through its shard's [`Registry`]: single-writer
//!   like the engine's (a handle cannot leave the shard thread that registered it), listed by
//!   name in the snapshot so the product's `/metrics` and `/stats` show them.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;
use parking_lot::Mutex;
use serde::Serialize;

/// A counter written by one thread only (the engine's; services register theirs with a
/// [`Registry`]).
#[doc(hidden)]
#[derive(Default, Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub(crate) fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }

    #[inline]
    pub(crate) fn inc(&self) {
        self.add(1);
    }

    /// For gauges (open connections): the owner decrements too.
    #[inline]
    pub(crate) fn sub(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_sub(n), Relaxed);
    }

    #[inline]
    pub(crate) fn set(&self, v: u64) {
        self.0.store(v, Relaxed);
    }

    /// The current value.
    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// Whether a field is a monotonically increasing counter or a gauge (Prometheus type).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Kind {
    /// Only grows (a count of events).
    Counter,
    /// Goes up and down (a number of things now).
    Gauge,
}

macro_rules! counters {
    ($(#[$m:meta])* $name:ident, $snap:ident { $($field:ident: $kind:ident, $help:literal;)* }) => {
        $(#[$m])*
        #[derive(Default, Debug)]
        pub struct $name { $(#[doc = $help] pub $field: $crate::stats::Counter,)* }

        #[doc = concat!("A copy of `", stringify!($name), "` at one moment.")]
        #[derive(Default, Debug, Clone, Copy, PartialEq, Eq, ::serde::Serialize)]
        pub struct $snap { $(#[doc = $help] pub $field: u64,)* }

        impl $name {
            /// Every counter's value now.
            pub fn snapshot(&self) -> $snap {
                $snap { $($field: self.$field.get(),)* }
            }
        }

        impl $snap {
            /// Adds every field of `other` (sums over shards).
            pub fn accumulate(&mut self, other: &Self) {
                $(self.$field = self.$field.wrapping_add(other.$field);)*
            }

            /// (name, kind, help, value) for every field, in declaration order.
            pub fn fields(&self) -> [(&'static str, $crate::stats::Kind, &'static str, u64); $crate::stats::counters!(@count $($field)*)] {
                [$((stringify!($field), $crate::stats::Kind::$kind, $help, self.$field),)*]
            }
        }
    };
    (@count) => { 0 };
    (@count $head:ident $($tail:ident)*) => { 1 + $crate::stats::counters!(@count $($tail)*) };
}
pub(crate) use counters;

counters! {
    /// Counters of one shard (written by the engine; read them in a [`Snapshot`]).
    #[doc(hidden)]
    ShardCounters, ShardSnapshot {
        accepted: Counter, "connections taken over from the acceptor";
        open: Gauge, "connections currently open";
        closed: Counter, "connections closed";
        bytes_in: Counter, "bytes read from sockets";
        bytes_out: Counter, "bytes written to sockets";
        reads: Counter, "read system calls";
        writes: Counter, "write system calls";
        wakeups: Counter, "wake-ups through the shard's eventfd";
        epoll_waits: Counter, "epoll_wait calls";
        events: Counter, "readiness events handled";
        stale_tokens: Counter, "events for connections already closed (ignored)";
        idle_timeouts: Counter, "connections closed for being idle";
        backpressure_pauses: Counter, "times reading stopped because queued output reached max_write_buffer";
        write_timeouts: Counter, "connections closed because their queued output made no progress for write_timeout (or a close could not flush in time)";
        read_overflows: Counter, "connections closed for holding more than max_read_buffer of unconsumed input";
        errors: Counter, "connections closed by a socket error";
        service_panics: Counter, "service callbacks that panicked (the connection was closed, the shard carried on)";
        commands: Counter, "service commands received from other threads";
        controls: Counter, "control messages applied (drain, new limits)";
        rejected: Counter, "connections closed at once by this shard (reuseport mode) because max_connections was reached";
        accept_pauses: Counter, "times this shard paused accepting on resource exhaustion (reuseport mode)";
        accept_paused_micros: Counter, "time this shard spent with accepting paused, in microseconds (reuseport mode)";
        accept_errors: Counter, "accept errors on this shard's listeners that only concerned one connection (reuseport mode)";
        alive: Gauge, "1 while the shard's thread runs; 0 once it has ended (before shutdown: it died)";
        output_queued: Gauge, "bytes of output queued because sockets did not take them";
        input_buffered: Gauge, "bytes of unconsumed input held for connections";
        tls_handshakes: Counter, "TLS handshakes completed";
        tls_handshake_failures: Counter, "TLS handshakes refused or failed (not TLS, no common version or cipher, a client certificate missing or refused); the connection closed";
        tls_handshake_timeouts: Counter, "TLS handshakes not finished within handshake_timeout; the connection closed";
        tls_errors: Counter, "TLS connections closed by a protocol error after the handshake";
        handed_over: Counter, "connections this shard handed to a new process (restart without dropping a connection)";
        received: Counter, "connections this shard took over from an old process";
    }
}

counters! {
    /// Counters of hand-overs between processes (`shardnet upgrade`, `serve --takeover`),
    /// written by the thread that runs the hand-over (one at a time).
    HandoverCounters, HandoverSnapshot {
        sessions: Counter, "hand-over sessions opened on the control socket by a new process";
        given: Counter, "hand-overs this process completed as the old one: its listeners and connections moved to the new process";
        failed: Counter, "hand-overs refused or failed as the old process, which kept serving everything";
        taken: Counter, "hand-overs this process completed as the new one";
        kept: Counter, "connections the service could not hand over (closed gracefully after the commit)";
        last_micros: Gauge, "duration of the last completed hand-over, from the new process's hello to its commit, in microseconds";
        last_moving_micros: Gauge, "in the last completed hand-over, from the first batch of connections sent (old process) or received (new) to the commit, in microseconds: about the longest any moved connection was paused";
    }
}

counters! {
    /// Counters of the acceptor thread (written by the engine; read them in a [`Snapshot`]).
    #[doc(hidden)]
    AcceptorCounters, AcceptorSnapshot {
        accepted: Counter, "connections accepted";
        rejected_max_connections: Counter, "connections closed at once because max_connections was reached";
        rejected_busy: Counter, "connections closed because every shard's queue stayed full for a second (held, with accepting paused, until then)";
        accept_pauses: Counter, "times accepting paused on resource exhaustion (EMFILE, ENFILE, ENOBUFS, ENOMEM)";
        paused_micros: Counter, "time spent with accepting paused, in microseconds";
        accept_errors: Counter, "accept errors that only concerned one connection";
    }
}

/// All of a server's counters.
pub(crate) struct Stats {
    shards: Box<[CachePadded<ShardCounters>]>,
    acceptor: CachePadded<AcceptorCounters>,
    started: Instant,
    /// Written by any thread that sends control messages (rare): atomic adds, not owner-only.
    control_failures: CachePadded<AtomicU64>,
    /// Shards whose thread ended by a panic (the engine's own, or a service's outside a
    /// connection callback): the product's health check reads it.
    dead: AtomicUsize,
    handover: CachePadded<HandoverCounters>,
    offload: CachePadded<OffloadCounters>,
    /// The counters services registered, every shard's (locked at registration and by
    /// snapshots only; the values themselves are written without a lock).
    registered: Mutex<Vec<Registered>>,
}

/// Upper bounds of the offload latency histogram's buckets, in seconds (a last bucket takes
/// everything slower).
pub(crate) const OFFLOAD_LATENCY_BOUNDS: [f64; 13] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
];

/// A counter any thread may write (atomic read-modify-write): the offload pool's.
#[derive(Default, Debug)]
pub(crate) struct SharedCounter(AtomicU64);

impl SharedCounter {
    #[inline]
    pub(crate) fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }

    #[inline]
    pub(crate) fn inc(&self) {
        self.add(1);
    }

    #[inline]
    pub(crate) fn sub(&self, n: u64) {
        self.0.fetch_sub(n, Relaxed);
    }

    /// The current value.
    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// The offload pool's counters: written by the pool's threads (a job starts, ends) and by the
/// shards (a job is submitted, its result is delivered or dropped), once per job.
#[derive(Default, Debug)]
pub(crate) struct OffloadCounters {
    /// Set once the pool has been asked for (the first job): until then there is no pool and
    /// the snapshot leaves it out.
    pub started: AtomicBool,
    pub threads: AtomicUsize,
    /// The admission bound: threads plus queue.
    pub limit: AtomicUsize,
    /// Jobs accepted whose result the shard has not taken yet (the admission count).
    pub in_flight: AtomicUsize,
    pub queued: SharedCounter,
    pub running: SharedCounter,
    pub accepted: SharedCounter,
    pub done: SharedCounter,
    pub rejected: SharedCounter,
    pub dropped: SharedCounter,
    pub panicked: SharedCounter,
    /// Submission to result delivery, per bucket of [`OFFLOAD_LATENCY_BOUNDS`] (not cumulative).
    pub latency: [SharedCounter; OFFLOAD_LATENCY_BOUNDS.len() + 1],
    pub latency_micros: SharedCounter,
}

impl OffloadCounters {
    /// Records one delivered result's latency.
    pub(crate) fn record_latency(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let bucket = OFFLOAD_LATENCY_BOUNDS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(OFFLOAD_LATENCY_BOUNDS.len());
        self.latency[bucket].inc();
        self.latency_micros
            .add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    fn snapshot(&self) -> Option<OffloadSnapshot> {
        if !self.started.load(Relaxed) {
            return None;
        }
        let mut cumulative = 0;
        let buckets = self
            .latency
            .iter()
            .map(|c| {
                cumulative += c.get();
                cumulative
            })
            .collect();
        Some(OffloadSnapshot {
            threads: self.threads.load(Relaxed) as u64,
            limit: self.limit.load(Relaxed) as u64,
            queued: self.queued.get(),
            running: self.running.get(),
            accepted: self.accepted.get(),
            done: self.done.get(),
            rejected: self.rejected.get(),
            dropped: self.dropped.get(),
            panicked: self.panicked.get(),
            latency: LatencyHistogram {
                bounds_seconds: OFFLOAD_LATENCY_BOUNDS.to_vec(),
                cumulative: buckets,
                sum_seconds: self.latency_micros.get() as f64 / 1e6,
            },
        })
    }
}

/// The offload pool's counters at one moment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OffloadSnapshot {
    /// Threads the pool runs.
    pub threads: u64,
    /// Jobs that may be in flight at once (threads plus queue); one more is refused.
    pub limit: u64,
    /// Jobs accepted and waiting for a thread.
    pub queued: u64,
    /// Jobs running on a thread now.
    pub running: u64,
    /// Jobs accepted.
    pub accepted: u64,
    /// Results handed to the connection that asked for them.
    pub done: u64,
    /// Jobs refused because the pool was full (or could not start, or was stopping).
    pub rejected: u64,
    /// Results dropped because their connection had closed (or was closing), and jobs
    /// discarded at shutdown.
    pub dropped: u64,
    /// Jobs that panicked (their connection was closed).
    pub panicked: u64,
    /// Time from submission to the result's delivery, for delivered results.
    pub latency: LatencyHistogram,
}

impl OffloadSnapshot {
    /// (name, kind, help, value) of every scalar field, for renderers.
    pub fn fields(&self) -> [(&'static str, Kind, &'static str, u64); 9] {
        [
            (
                "threads",
                Kind::Gauge,
                "threads of the offload pool",
                self.threads,
            ),
            (
                "limit",
                Kind::Gauge,
                "jobs that may be in flight at once (threads plus queue)",
                self.limit,
            ),
            (
                "queued",
                Kind::Gauge,
                "offloaded jobs waiting for a thread",
                self.queued,
            ),
            (
                "running",
                Kind::Gauge,
                "offloaded jobs running now",
                self.running,
            ),
            (
                "accepted",
                Kind::Counter,
                "offloaded jobs accepted",
                self.accepted,
            ),
            (
                "done",
                Kind::Counter,
                "offload results delivered to their connection",
                self.done,
            ),
            (
                "rejected",
                Kind::Counter,
                "offloaded jobs refused because the pool was full",
                self.rejected,
            ),
            (
                "dropped",
                Kind::Counter,
                "offload results dropped because their connection had closed",
                self.dropped,
            ),
            (
                "panicked",
                Kind::Counter,
                "offloaded jobs that panicked (their connection was closed)",
                self.panicked,
            ),
        ]
    }
}

/// A latency histogram in the Prometheus layout: cumulative counts per upper bound.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LatencyHistogram {
    /// Upper bound of each bucket but the last, in seconds.
    pub bounds_seconds: Vec<f64>,
    /// Observations at or under each bound, then the total (the `+Inf` bucket).
    pub cumulative: Vec<u64>,
    /// Sum of all observations, in seconds.
    pub sum_seconds: f64,
}

impl LatencyHistogram {
    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }
}

/// One counter a service registered on one shard.
struct Registered {
    shard: usize,
    name: Box<str>,
    help: Box<str>,
    kind: Kind,
    value: Arc<CachePadded<AtomicU64>>,
}

/// Why a service's counter could not be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    /// Names are what Prometheus accepts, in lower case: `[a-z][a-z0-9_]*`, at most 64 bytes,
    /// not ending in `_total` (added to counters when rendered).
    #[error(
        "`{0}` is not a counter name: use [a-z][a-z0-9_]*, at most 64 bytes, not ending in _total"
    )]
    InvalidName(String),
    /// The name was registered already (on this shard or another) as the other kind.
    #[error("`{0}` is registered already as a {1:?}")]
    KindMismatch(String, Kind),
}

/// Where a service registers its own counters: one per shard, in [`ShardInfo`] (and only
/// usable on that shard's thread).
///
/// A counter is declared once per shard at factory time; registering a name again on the same
/// shard returns the same counter. The product's `/metrics` shows each as
/// `shardnet_service_<name>_total{shard="N"}` (a gauge without `_total`), and `/stats` lists
/// them under `service_counters`; library users read them in [`Snapshot::registered`].
///
/// [`ShardInfo`]: crate::server::ShardInfo
pub struct Registry {
    stats: Arc<Stats>,
    shard: usize,
    /// Not `Send`: a handle registered here is written by this shard's thread only.
    _shard_thread: PhantomData<*const ()>,
}

impl Registry {
    pub(crate) fn new(stats: Arc<Stats>, shard: usize) -> Self {
        Registry {
            stats,
            shard,
            _shard_thread: PhantomData,
        }
    }

    /// Declares a counter (a value that only grows) named `name`, described by `help`.
    pub fn counter(&self, name: &str, help: &str) -> Result<CounterHandle, RegisterError> {
        self.register(name, help, Kind::Counter)
            .map(|value| CounterHandle {
                value,
                _shard_thread: PhantomData,
            })
    }

    /// Declares a gauge (a value that goes up and down) named `name`, described by `help`.
    pub fn gauge(&self, name: &str, help: &str) -> Result<GaugeHandle, RegisterError> {
        self.register(name, help, Kind::Gauge)
            .map(|value| GaugeHandle {
                value,
                _shard_thread: PhantomData,
            })
    }

    fn register(
        &self,
        name: &str,
        help: &str,
        kind: Kind,
    ) -> Result<Arc<CachePadded<AtomicU64>>, RegisterError> {
        let valid = !name.is_empty()
            && name.len() <= 64
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && !name.ends_with("_total");
        if !valid {
            return Err(RegisterError::InvalidName(name.to_string()));
        }
        let mut list = self.stats.registered.lock();
        // One name is one kind on every shard: it renders as one family.
        if let Some(r) = list.iter().find(|r| &*r.name == name && r.kind != kind) {
            return Err(RegisterError::KindMismatch(name.to_string(), r.kind));
        }
        if let Some(r) = list
            .iter()
            .find(|r| r.shard == self.shard && &*r.name == name)
        {
            return Ok(r.value.clone());
        }
        let value = Arc::new(CachePadded::new(AtomicU64::new(0)));
        list.push(Registered {
            shard: self.shard,
            name: name.into(),
            // One line: help text goes into the exposition format's `# HELP` line.
            help: help.replace(['\n', '\r'], " ").into(),
            kind,
            value: value.clone(),
        });
        Ok(value)
    }
}

/// A service's own counter (see [`Registry`]), written only on the shard that registered it.
#[derive(Clone)]
pub struct CounterHandle {
    value: Arc<CachePadded<AtomicU64>>,
    _shard_thread: PhantomData<*const ()>,
}

impl CounterHandle {
    /// Adds `n`.
    #[inline]
    pub fn add(&self, n: u64) {
        // One writer (the handle stays on its shard's thread): load and store, no locked
        // instruction, as the engine's own counters.
        self.value
            .store(self.value.load(Relaxed).wrapping_add(n), Relaxed);
    }

    /// Adds one.
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.value.load(Relaxed)
    }
}

/// A service's own gauge (see [`Registry`]), written only on the shard that registered it.
#[derive(Clone)]
pub struct GaugeHandle {
    value: Arc<CachePadded<AtomicU64>>,
    _shard_thread: PhantomData<*const ()>,
}

impl GaugeHandle {
    /// Adds `n`.
    #[inline]
    pub fn add(&self, n: u64) {
        self.value
            .store(self.value.load(Relaxed).wrapping_add(n), Relaxed);
    }

    /// Subtracts `n`.
    #[inline]
    pub fn sub(&self, n: u64) {
        self.value
            .store(self.value.load(Relaxed).wrapping_sub(n), Relaxed);
    }

    /// Sets the value.
    #[inline]
    pub fn set(&self, v: u64) {
        self.value.store(v, Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.value.load(Relaxed)
    }
}

/// One registered counter across the shards, in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RegisteredFamily {
    /// The name it was registered with.
    pub name: String,
    /// Counter or gauge.
    pub kind: Kind,
    /// Its help text.
    pub help: String,
    /// Its value on each shard; `None` where that shard did not register it.
    pub values: Vec<Option<u64>>,
}

/// Read-only access to a server's counters: what services and library users get.
#[derive(Clone)]
pub struct StatsView(Arc<Stats>);

impl StatsView {
    pub(crate) fn new(stats: Arc<Stats>) -> Self {
        StatsView(stats)
    }

    /// Every counter now.
    pub fn snapshot(&self) -> Snapshot {
        self.0.snapshot()
    }

    /// How many shards the server runs.
    pub fn shard_count(&self) -> usize {
        self.0.shard_count()
    }

    /// Shards whose thread has died (a panic outside any connection's callback). Not zero means
    /// part of the server no longer serves: a health check should fail.
    pub fn dead_shards(&self) -> usize {
        self.0.dead_shards()
    }
}

/// A point-in-time copy of every counter.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// Seconds since the server started.
    pub uptime_seconds: f64,
    /// The acceptor thread's counters (all zero with `balance = "reuseport"`).
    pub acceptor: AcceptorSnapshot,
    /// Each shard's counters, by shard index.
    pub shards: Vec<ShardSnapshot>,
    /// Control messages (drain, new limits) that could not be sent to a shard or were not
    /// acknowledged in time.
    pub control_failures: u64,
    /// Shards whose thread has died.
    pub dead_shards: usize,
    /// Hand-overs to and from other processes (restart without dropping a connection).
    pub handover: HandoverSnapshot,
    /// The offload pool's counters; `None` while no service has offloaded anything (there is
    /// no pool then).
    pub offload: Option<OffloadSnapshot>,
    /// The counters services registered, in the order they were first registered.
    pub registered: Vec<RegisteredFamily>,
}

impl Snapshot {
    /// Sum over shards.
    pub fn total(&self) -> ShardSnapshot {
        let mut t = ShardSnapshot::default();
        for s in &self.shards {
            t.accumulate(s);
        }
        t
    }

    /// The periodic one-line summary.
    pub fn log_line(&self, previous: Option<&Snapshot>) -> String {
        let t = self.total();
        let (dt, p) = match previous {
            Some(p) => (
                (self.uptime_seconds - p.uptime_seconds).max(1e-9),
                p.total(),
            ),
            None => (self.uptime_seconds.max(1e-9), ShardSnapshot::default()),
        };
        let per_shard: Vec<String> = self.shards.iter().map(|s| s.open.to_string()).collect();
        format!(
            "stats: open={} [{}] accepted={} closed={} in={:.1}MB/s out={:.1}MB/s reads={:.0}/s \
             idle_timeouts={} write_timeouts={} pauses={} rejected={} accept_pauses={} panics={} \
             dead_shards={}",
            t.open,
            per_shard.join(" "),
            self.acceptor.accepted,
            t.closed,
            (t.bytes_in - p.bytes_in) as f64 / dt / 1e6,
            (t.bytes_out - p.bytes_out) as f64 / dt / 1e6,
            (t.reads - p.reads) as f64 / dt,
            t.idle_timeouts,
            t.write_timeouts,
            t.backpressure_pauses,
            self.acceptor.rejected_max_connections + self.acceptor.rejected_busy + t.rejected,
            self.acceptor.accept_pauses + t.accept_pauses,
            t.service_panics,
            self.dead_shards,
        )
    }
}

impl Stats {
    pub(crate) fn new(shards: usize) -> Self {
        Stats {
            shards: (0..shards)
                .map(|_| CachePadded::new(ShardCounters::default()))
                .collect(),
            acceptor: CachePadded::new(AcceptorCounters::default()),
            started: Instant::now(),
            control_failures: CachePadded::new(AtomicU64::new(0)),
            dead: AtomicUsize::new(0),
            handover: CachePadded::new(HandoverCounters::default()),
            offload: CachePadded::new(OffloadCounters::default()),
            registered: Mutex::new(Vec::new()),
        }
    }

    /// The offload pool's counters.
    pub(crate) fn offload(&self) -> &OffloadCounters {
        &self.offload
    }

    /// Every registered counter, grouped by name across shards.
    fn registered(&self) -> Vec<RegisteredFamily> {
        let n = self.shards.len();
        let mut families: Vec<RegisteredFamily> = Vec::new();
        for r in self.registered.lock().iter() {
            let value = Some(r.value.load(Relaxed));
            match families.iter_mut().find(|f| f.name == *r.name) {
                Some(f) => f.values[r.shard] = value,
                None => {
                    let mut values = vec![None; n];
                    values[r.shard] = value;
                    families.push(RegisteredFamily {
                        name: r.name.to_string(),
                        kind: r.kind,
                        help: r.help.to_string(),
                        values,
                    });
                }
            }
        }
        families
    }

    /// Shard `i`'s counters, for that shard to write.
    pub(crate) fn shard(&self, i: usize) -> &ShardCounters {
        &self.shards[i]
    }

    /// The acceptor's counters, for the acceptor thread to write.
    pub(crate) fn acceptor(&self) -> &AcceptorCounters {
        &self.acceptor
    }

    /// The hand-over counters, for the thread running a hand-over to write.
    pub(crate) fn handover(&self) -> &HandoverCounters {
        &self.handover
    }

    pub(crate) fn control_failed(&self, n: u64) {
        self.control_failures.fetch_add(n, Relaxed);
    }

    pub(crate) fn shard_died(&self) {
        self.dead.fetch_add(1, Relaxed);
    }

    pub(crate) fn shard_count(&self) -> usize {
        self.shards.len()
    }

    pub(crate) fn dead_shards(&self) -> usize {
        self.dead.load(Relaxed)
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        Snapshot {
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            acceptor: self.acceptor.snapshot(),
            shards: self.shards.iter().map(|s| s.snapshot()).collect(),
            control_failures: self.control_failures.load(Relaxed),
            dead_shards: self.dead_shards(),
            handover: self.handover.snapshot(),
            offload: self.offload.snapshot(),
            registered: self.registered(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_reflects_counters_and_totals() {
        let stats = Stats::new(2);
        stats.shard(0).accepted.add(3);
        stats.shard(1).accepted.inc();
        stats.shard(1).open.inc();
        stats.shard(1).open.sub(1);
        stats.acceptor().accepted.add(4);
        let snap = stats.snapshot();
        assert_eq!(snap.total().accepted, 4);
        assert_eq!(snap.total().open, 0);
        assert_eq!(snap.acceptor.accepted, 4);
        let fields = snap.shards[0].fields();
        assert_eq!(fields[0].0, "accepted");
        assert_eq!(fields[0].3, 3);
        assert!(fields.iter().any(|f| f.0 == "open" && f.1 == Kind::Gauge));
        assert!(snap.log_line(None).contains("open=0"));
        assert_eq!(snap.dead_shards, 0);
        let view = StatsView::new(Arc::new(stats));
        assert_eq!(view.snapshot().total().accepted, 4);
        assert_eq!(view.shard_count(), 2);
    }

    #[test]
    fn services_register_their_own_counters_per_shard() {
        let stats = Arc::new(Stats::new(2));
        let (r0, r1) = (
            Registry::new(stats.clone(), 0),
            Registry::new(stats.clone(), 1),
        );
        let hits0 = r0.counter("kv_hits", "GETs that found their key").unwrap();
        let again = r0
            .counter("kv_hits", "ignored: registered already")
            .unwrap();
        hits0.add(2);
        again.inc();
        assert_eq!(hits0.get(), 3, "one name, one counter per shard");
        r1.counter("kv_hits", "GETs that found their key")
            .unwrap()
            .inc();
        let keys = r1.gauge("kv_keys", "keys held\nby the shard").unwrap();
        keys.set(10);
        keys.sub(4);
        assert_eq!(
            r0.gauge("kv_hits", "x").err(),
            Some(RegisterError::KindMismatch("kv_hits".into(), Kind::Counter)),
            "one kind per name on every shard"
        );
        for bad in [
            "",
            "Upper",
            "9lives",
            "with-dash",
            "hits_total",
            &"x".repeat(65),
        ] {
            assert!(
                matches!(r0.counter(bad, ""), Err(RegisterError::InvalidName(_))),
                "{bad:?}"
            );
        }
        let snap = stats.snapshot();
        assert_eq!(
            snap.registered,
            vec![
                RegisteredFamily {
                    name: "kv_hits".into(),
                    kind: Kind::Counter,
                    help: "GETs that found their key".into(),
                    values: vec![Some(3), Some(1)],
                },
                RegisteredFamily {
                    name: "kv_keys".into(),
                    kind: Kind::Gauge,
                    help: "keys held by the shard".into(),
                    values: vec![None, Some(6)],
                },
            ]
        );
    }
}
