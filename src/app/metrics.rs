//! The product's counters, `/metrics` (Prometheus text exposition, format 0.0.4) and `/stats`
//! (JSON).
//!
//! [`ServiceCounters`] are the HTTP, WebSocket and pub/sub counters, one set per shard, written
//! by that shard's router only. Rendering is generated from the counter lists in
//! [`crate::stats`] and here: each counter becomes `shardnet_<name>_total{shard="N"}` (gauges lose
//! the `_total`), acceptor counters `shardnet_acceptor_<name>_total`, hand-over counters
//! `shardnet_handover_<name>_total`; times are exposed in seconds. Process gauges follow the Prometheus client conventions (`process_open_fds`,
//! `process_resident_memory_bytes`). Rendering runs on the shard that answers the request, off
//! the hot path; it reads other shards' counters without locks.

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::Instant;

use crossbeam_utils::CachePadded;

use crate::service::deflate::{DeflateCounters, DeflateSnapshot};
use crate::stats::{Kind, StatsView};

crate::stats::counters! {
    /// Counters of the HTTP and WebSocket services, per shard.
    ServiceCounters, ServiceSnapshot {
        http_requests: Counter, "HTTP responses sent (one per request answered, errors and upgrades included)";
        http_errors: Counter, "HTTP responses with a 4xx or 5xx status";
        ws_upgrades: Counter, "WebSocket upgrades completed";
        ws_open: Gauge, "WebSocket connections open";
        ws_messages_in: Counter, "WebSocket data messages received";
        ws_messages_out: Counter, "WebSocket data messages sent (echoes and pub/sub deliveries)";
        ws_protocol_closes: Counter, "WebSocket connections closed for a protocol violation (1002, 1007, 1009)";
        ws_published: Counter, "pub/sub messages published from this shard";
        ws_publish_refused: Counter, "publishes refused (topic, size or body not accepted)";
        ws_subscribe_refused: Counter, "subscriptions refused (max_topics reached or topic too long)";
        ws_dropped: Counter, "pub/sub messages dropped for slow subscribers (slow_consumer = drop)";
        ws_slow_closed: Counter, "slow subscribers closed with 1008 (slow_consumer = disconnect)";
        ws_fanout_lost: Counter, "pub/sub messages not delivered to a shard because its queue was full";
        ws_pings: Counter, "heartbeat pings sent";
        ws_reaped: Counter, "connections closed for not answering a ping within pong_timeout";
    }
}

/// Everything `/metrics` and `/stats` show: the engine's counters and the services'.
pub struct Metrics {
    stats: StatsView,
    counters: Box<[CachePadded<ServiceCounters>]>,
    /// permessage-deflate's counters, per shard (declared beside the codec that counts them).
    deflate: Box<[CachePadded<DeflateCounters>]>,
    started: Instant,
}

impl Metrics {
    /// Shards whose thread has ended (a panic outside a service callback).
    pub fn dead_shards(&self) -> usize {
        self.stats.dead_shards()
    }

    pub fn new(stats: StatsView, shards: usize, started: Instant) -> Self {
        Metrics {
            stats,
            counters: (0..shards)
                .map(|_| CachePadded::new(ServiceCounters::default()))
                .collect(),
            deflate: (0..shards)
                .map(|_| CachePadded::new(DeflateCounters::default()))
                .collect(),
            started,
        }
    }

    /// The counters of `shard` (written by that shard only).
    pub fn shard(&self, shard: usize) -> &ServiceCounters {
        &self.counters[shard]
    }

    /// The permessage-deflate counters of `shard` (written by that shard only).
    pub fn deflate(&self, shard: usize) -> &DeflateCounters {
        &self.deflate[shard]
    }

    /// Renders every counter and the process gauges.
    pub fn render(&self, buf: &mut Vec<u8>) {
        render(self, buf);
    }

    /// The same as JSON.
    pub fn render_json(&self, buf: &mut Vec<u8>) {
        render_json(self, buf);
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn metric_name(prefix: &str, field: &str, kind: Kind) -> String {
    match kind {
        Kind::Counter => format!("{prefix}{field}_total"),
        Kind::Gauge => format!("{prefix}{field}"),
    }
}

fn render(m: &Metrics, buf: &mut Vec<u8>) {
    let snap = m.stats.snapshot();
    let mut out = String::with_capacity(16 * 1024);

    // Per-shard engine counters: one family per field, one sample per shard.
    let per_shard: Vec<_> = snap.shards.iter().map(|s| s.fields()).collect();
    if let Some(first) = per_shard.first() {
        for (i, (field, kind, help, _)) in first.iter().enumerate() {
            let name = metric_name("shardnet_", field, *kind);
            header(&mut out, &name, kind_str(*kind), help);
            for (shard, fields) in per_shard.iter().enumerate() {
                let _ = writeln!(out, "{name}{{shard=\"{shard}\"}} {}", fields[i].3);
            }
        }
    }
    let services: Vec<_> = m.counters.iter().map(|c| c.snapshot().fields()).collect();
    if let Some(first) = services.first() {
        for (i, (field, kind, help, _)) in first.iter().enumerate() {
            let name = metric_name("shardnet_", field, *kind);
            header(&mut out, &name, kind_str(*kind), help);
            for (shard, fields) in services.iter().enumerate() {
                let _ = writeln!(out, "{name}{{shard=\"{shard}\"}} {}", fields[i].3);
            }
        }
    }
    render_deflate(m, &mut out);
    for (field, kind, help, value) in snap.acceptor.fields() {
        if field == "paused_micros" {
            let name = "shardnet_acceptor_paused_seconds_total";
            header(
                &mut out,
                name,
                "counter",
                "time spent with accepting paused",
            );
            let _ = writeln!(out, "{name} {}", value as f64 / 1e6);
            continue;
        }
        let name = metric_name("shardnet_acceptor_", field, kind);
        header(&mut out, &name, kind_str(kind), help);
        let _ = writeln!(out, "{name} {value}");
    }
    // Hand-overs between processes; durations in seconds.
    for (field, kind, help, value) in snap.handover.fields() {
        if let Some(stem) = field.strip_suffix("_micros") {
            let name = format!("shardnet_handover_{stem}_seconds");
            header(&mut out, &name, kind_str(kind), help);
            let _ = writeln!(out, "{name} {}", value as f64 / 1e6);
            continue;
        }
        let name = metric_name("shardnet_handover_", field, kind);
        header(&mut out, &name, kind_str(kind), help);
        let _ = writeln!(out, "{name} {value}");
    }

    header(
        &mut out,
        "shardnet_shards",
        "gauge",
        "configured shards (worker threads)",
    );
    let _ = writeln!(out, "shardnet_shards {}", snap.shards.len());
    header(
        &mut out,
        "shardnet_uptime_seconds",
        "gauge",
        "seconds since the server started",
    );
    let _ = writeln!(
        out,
        "shardnet_uptime_seconds {:.3}",
        m.started.elapsed().as_secs_f64()
    );
    header(
        &mut out,
        "shardnet_build_info",
        "gauge",
        "build information (always 1)",
    );
    let _ = writeln!(
        out,
        "shardnet_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    let p = process();
    if let Some(fds) = p.open_fds {
        header(
            &mut out,
            "process_open_fds",
            "gauge",
            "open file descriptors",
        );
        let _ = writeln!(out, "process_open_fds {fds}");
    }
    if let Some(rss) = p.rss_bytes {
        header(
            &mut out,
            "process_resident_memory_bytes",
            "gauge",
            "resident set size in bytes",
        );
        let _ = writeln!(out, "process_resident_memory_bytes {rss}");
    }
    buf.extend_from_slice(out.as_bytes());
}

/// permessage-deflate's counters, per shard: times in seconds (`*_nanos` becomes
/// `*_seconds_total`), and the compression ratio of what was sent compressed.
fn render_deflate(m: &Metrics, out: &mut String) {
    let snaps: Vec<DeflateSnapshot> = m.deflate.iter().map(|c| c.snapshot()).collect();
    let per_shard: Vec<_> = snaps.iter().map(|s| s.fields()).collect();
    if let Some(first) = per_shard.first() {
        for (i, (field, kind, help, _)) in first.iter().enumerate() {
            let seconds = field.strip_suffix("_nanos");
            let name = match seconds {
                Some(stem) => format!("shardnet_{stem}_seconds_total"),
                None => metric_name("shardnet_", field, *kind),
            };
            header(out, &name, kind_str(*kind), help);
            for (shard, fields) in per_shard.iter().enumerate() {
                let v = fields[i].3;
                let _ = match seconds {
                    Some(_) => writeln!(out, "{name}{{shard=\"{shard}\"}} {}", v as f64 / 1e9),
                    None => writeln!(out, "{name}{{shard=\"{shard}\"}} {v}"),
                };
            }
        }
    }
    let name = "shardnet_ws_deflate_ratio";
    header(
        out,
        name,
        "gauge",
        "bytes before compression per byte after, of the messages sent compressed (0: none yet)",
    );
    for (shard, s) in snaps.iter().enumerate() {
        let ratio = match s.ws_deflate_bytes_out {
            0 => 0.0,
            after => s.ws_deflate_bytes_in as f64 / after as f64,
        };
        let _ = writeln!(out, "{name}{{shard=\"{shard}\"}} {ratio:.3}");
    }
}

fn kind_str(kind: Kind) -> &'static str {
    match kind {
        Kind::Counter => "counter",
        Kind::Gauge => "gauge",
    }
}

/// Open descriptors and RSS of this process, from /proc.
struct ProcessGauges {
    open_fds: Option<usize>,
    rss_bytes: Option<u64>,
}

fn process() -> ProcessGauges {
    let open_fds = std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count());
    let rss_bytes = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
            Some(pages * crate::sys::page::page_size())
        });
    ProcessGauges {
        open_fds,
        rss_bytes,
    }
}

fn render_json(m: &Metrics, buf: &mut Vec<u8>) {
    let snap = m.stats.snapshot();
    let services: Vec<_> = m.counters.iter().map(|c| c.snapshot()).collect();
    let mut services_total = ServiceSnapshot::default();
    for s in &services {
        services_total.accumulate(s);
    }
    let deflate: Vec<_> = m.deflate.iter().map(|c| c.snapshot()).collect();
    let mut deflate_total = DeflateSnapshot::default();
    for s in &deflate {
        deflate_total.accumulate(s);
    }
    let p = process();
    let v = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "uptime_seconds": snap.uptime_seconds,
        "shards": snap.shards.len(),
        "total": snap.total(),
        "acceptor": snap.acceptor,
        "handover": snap.handover,
        "per_shard": snap.shards,
        "services": services,
        "services_total": services_total,
        "deflate": deflate,
        "deflate_total": deflate_total,
        "process": { "open_fds": p.open_fds, "resident_memory_bytes": p.rss_bytes },
    });
    let _ = serde_json::to_writer(&mut *buf, &v);
    let _ = buf.write_all(b"\n");
}
