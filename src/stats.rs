//! Counters: per shard (written only by their owner) and for the acceptor, plus snapshots.
//!
//! Each shard's counters sit on their own cache lines, so a shard never shares a written line
//! with another thread. Owners update with a relaxed load and store (no locked instruction);
//! readers (the stats logger, `/metrics`, the bench) take relaxed snapshots, which are exact per
//! counter and approximately consistent across counters: good enough for monitoring.
//!
//! Writing is crate-private and only the engine holds a [`Stats`]: services and library users get
//! a [`StatsView`], which reads snapshots and nothing else, so a single-writer counter cannot get
//! a second writer.
//!
//! Every counter is declared once, below, with its help text; the log line, the JSON snapshot
//! and the Prometheus exposition are all generated from that one list.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_utils::CachePadded;
use serde::Serialize;

/// A counter written by one thread only.
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

    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// Whether a field is a monotonically increasing counter or a gauge (Prometheus type).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Kind {
    Counter,
    Gauge,
}

macro_rules! counters {
    ($(#[$m:meta])* $name:ident, $snap:ident { $($field:ident: $kind:ident, $help:literal;)* }) => {
        $(#[$m])*
        #[derive(Default, Debug)]
        pub struct $name { $(#[doc = $help] pub $field: $crate::stats::Counter,)* }

        #[derive(Default, Debug, Clone, Copy, PartialEq, Eq, ::serde::Serialize)]
        pub struct $snap { $(#[doc = $help] pub $field: u64,)* }

        impl $name {
            pub fn snapshot(&self) -> $snap {
                $snap { $($field: self.$field.get(),)* }
            }
        }

        impl $snap {
            /// (name, kind, help, value) for every field, in declaration order.
            /// Adds every field of `other` (sums over shards).
            pub fn accumulate(&mut self, other: &Self) {
                $(self.$field = self.$field.wrapping_add(other.$field);)*
            }

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
    /// Counters of one shard.
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
    /// Counters of the acceptor thread.
    AcceptorCounters, AcceptorSnapshot {
        accepted: Counter, "connections accepted";
        rejected_max_connections: Counter, "connections closed at once because max_connections was reached";
        rejected_busy: Counter, "connections closed because every shard's queue stayed full";
        accept_pauses: Counter, "times accepting paused on resource exhaustion (EMFILE, ENFILE, ENOBUFS, ENOMEM)";
        paused_micros: Counter, "time spent with accepting paused, in microseconds";
        accept_errors: Counter, "accept errors that only concerned one connection";
    }
}

/// All of a server's counters.
pub struct Stats {
    shards: Box<[CachePadded<ShardCounters>]>,
    acceptor: CachePadded<AcceptorCounters>,
    started: Instant,
    /// Written by any thread that sends control messages (rare): atomic adds, not owner-only.
    control_failures: CachePadded<AtomicU64>,
    /// Shards whose thread ended by a panic (the engine's own, or a service's outside a
    /// connection callback): the product's health check reads it.
    dead: AtomicUsize,
    handover: CachePadded<HandoverCounters>,
}

/// Read-only access to a server's counters: what services and library users get.
#[derive(Clone)]
pub struct StatsView(Arc<Stats>);

impl StatsView {
    pub(crate) fn new(stats: Arc<Stats>) -> Self {
        StatsView(stats)
    }

    pub fn snapshot(&self) -> Snapshot {
        self.0.snapshot()
    }

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
    pub uptime_seconds: f64,
    pub acceptor: AcceptorSnapshot,
    pub shards: Vec<ShardSnapshot>,
    /// Control messages (drain, new limits) that could not be sent to a shard or were not
    /// acknowledged in time.
    pub control_failures: u64,
    /// Shards whose thread has died.
    pub dead_shards: usize,
    pub handover: HandoverSnapshot,
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
        }
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

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    pub fn dead_shards(&self) -> usize {
        self.dead.load(Relaxed)
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            acceptor: self.acceptor.snapshot(),
            shards: self.shards.iter().map(|s| s.snapshot()).collect(),
            control_failures: self.control_failures.load(Relaxed),
            dead_shards: self.dead_shards(),
            handover: self.handover.snapshot(),
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
}
