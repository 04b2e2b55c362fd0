//! `/metrics` (Prometheus text exposition, format 0.0.4) and `/stats` (JSON).
//!
//! Generated from the counter lists in [`crate::stats`] and [`super::router`]: each counter
//! becomes `shardnet_<name>_total{shard="N"}` (gauges lose the `_total`), acceptor counters
//! `shardnet_acceptor_<name>_total`, hand-over counters `shardnet_handover_<name>_total`; times
//! are exposed in seconds. Process gauges follow the
//! Prometheus client conventions (`process_open_fds`, `process_resident_memory_bytes`).

use std::fmt::Write as _;
use std::io::Write as _;

use super::router::Shared;
use crate::stats::Kind;

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

/// Renders every counter and the process gauges.
pub fn render(shared: &Shared, buf: &mut Vec<u8>) {
    let snap = shared.stats.snapshot();
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
    let services: Vec<_> = shared
        .counters
        .iter()
        .map(|c| c.snapshot().fields())
        .collect();
    if let Some(first) = services.first() {
        for (i, (field, kind, help, _)) in first.iter().enumerate() {
            let name = metric_name("shardnet_", field, *kind);
            header(&mut out, &name, kind_str(*kind), help);
            for (shard, fields) in services.iter().enumerate() {
                let _ = writeln!(out, "{name}{{shard=\"{shard}\"}} {}", fields[i].3);
            }
        }
    }
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
        shared.started.elapsed().as_secs_f64()
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

fn kind_str(kind: Kind) -> &'static str {
    match kind {
        Kind::Counter => "counter",
        Kind::Gauge => "gauge",
    }
}

/// Open descriptors and RSS of this process, from /proc.
pub struct ProcessGauges {
    pub open_fds: Option<usize>,
    pub rss_bytes: Option<u64>,
}

pub fn process() -> ProcessGauges {
    let open_fds = std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count());
    let rss_bytes = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
            Some(pages * 4096)
        });
    ProcessGauges {
        open_fds,
        rss_bytes,
    }
}

/// The same as JSON.
pub fn render_json(shared: &Shared, buf: &mut Vec<u8>) {
    let snap = shared.stats.snapshot();
    let services: Vec<_> = shared.counters.iter().map(|c| c.snapshot()).collect();
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
        "process": { "open_fds": p.open_fds, "resident_memory_bytes": p.rss_bytes },
    });
    let _ = serde_json::to_writer(&mut *buf, &v);
    let _ = buf.write_all(b"\n");
}
