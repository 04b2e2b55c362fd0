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

use std::sync::Arc;

use crossbeam_utils::CachePadded;

use super::auth::FailureCounters;
use super::broker::{BrokerMetrics, BrokerStats, LATENCY_BOUNDS_US};
use crate::service::deflate::{DeflateCounters, DeflateSnapshot};
use crate::stats::{Kind, Snapshot, StatsView};

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
        ws_authenticated: Gauge, "WebSocket connections open with a verified token";
        ws_anonymous: Gauge, "WebSocket connections open without a token on auth = \"optional\" routes";
        auth_denied: Counter, "subscribes and publishes refused by the connection's permissions";
        auth_expired: Counter, "connections closed with 4001 because their token expired";
        auth_refreshed: Counter, "tokens replaced on a live connection by a refresh";
        auth_refresh_refused: Counter, "refreshes refused (token not accepted, another subject, or a route without tokens)";
        auth_unsubscribed: Counter, "subscriptions dropped by a refresh that narrowed the permissions";
        api_key_refused: Counter, "POST /publish, /metrics and /stats requests refused for a missing, wrong or out-of-scope API key";
        rate_limited: Counter, "client commands refused by the per-connection rate limit";
        rate_limit_closes: Counter, "connections closed with 1008 for going on over the rate limit";
    }
}

/// Everything `/metrics` and `/stats` show: the engine's counters and the services'.
pub struct Metrics {
    stats: StatsView,
    counters: Box<[CachePadded<ServiceCounters>]>,
    /// Tokens refused (at upgrade or refresh), by reason, per shard.
    auth_failures: Box<[CachePadded<FailureCounters>]>,
    /// permessage-deflate's counters, per shard (declared beside the codec that counts them).
    deflate: Box<[CachePadded<DeflateCounters>]>,
    started: Instant,
    /// The broker's counters, with `[broker] kind` other than `"none"`.
    broker: Option<Arc<BrokerMetrics>>,
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
            auth_failures: (0..shards)
                .map(|_| CachePadded::new(FailureCounters::default()))
                .collect(),
            deflate: (0..shards)
                .map(|_| CachePadded::new(DeflateCounters::default()))
                .collect(),
            started,
            broker: None,
        }
    }

    /// The token failures of `shard` (written by that shard only).
    pub fn auth_failures(&self, shard: usize) -> &FailureCounters {
        &self.auth_failures[shard]
    }

    /// Shows the broker's counters too.
    pub fn with_broker(mut self, broker: Arc<BrokerMetrics>) -> Self {
        self.broker = Some(broker);
        self
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
    // Token failures: one family, labelled by shard and reason.
    let name = "shardnet_auth_failures_total";
    header(
        &mut out,
        name,
        "counter",
        "tokens refused at upgrade or refresh, by reason (missing, expired, signature, ...)",
    );
    for (shard, f) in m.auth_failures.iter().enumerate() {
        for (reason, n) in f.snapshot() {
            let _ = writeln!(out, "{name}{{shard=\"{shard}\",reason=\"{reason}\"}} {n}");
        }
    }
    render_deflate(m, &mut out);
    render_offload_and_registered(&snap, &mut out);
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
    if let Some(b) = &m.broker {
        render_broker(&mut out, &b.snapshot());
    }
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
/// The offload pool's families (when there is a pool) and the services' registered counters.
fn render_offload_and_registered(snap: &Snapshot, out: &mut String) {
    if let Some(o) = &snap.offload {
        for (field, kind, help, value) in o.fields() {
            let name = metric_name("shardnet_offload_", field, kind);
            header(out, &name, kind_str(kind), help);
            let _ = writeln!(out, "{name} {value}");
        }
        let name = "shardnet_offload_latency_seconds";
        header(
            out,
            name,
            "histogram",
            "time from an offloaded job's submission to its result's delivery",
        );
        let h = &o.latency;
        for (bound, count) in h.bounds_seconds.iter().zip(&h.cumulative) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count());
        let _ = writeln!(out, "{name}_sum {}", h.sum_seconds);
        let _ = writeln!(out, "{name}_count {}", h.count());
    }
    for family in &snap.registered {
        let name = metric_name("shardnet_service_", &family.name, family.kind);
        header(out, &name, kind_str(family.kind), &family.help);
        for (shard, value) in family.values.iter().enumerate() {
            if let Some(v) = value {
                let _ = writeln!(out, "{name}{{shard=\"{shard}\"}} {v}");
            }
        }
    }
}

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
    let mut failures = serde_json::Map::new();
    for f in super::auth::Failure::ALL {
        let n: u64 = m.auth_failures.iter().map(|c| c.get(f)).sum();
        failures.insert(f.as_str().into(), n.into());
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
        "auth_failures": failures,
        "deflate": deflate,
        "deflate_total": deflate_total,
        "offload": snap.offload,
        "service_counters": snap.registered,
        "process": { "open_fds": p.open_fds, "resident_memory_bytes": p.rss_bytes },
        "broker": m.broker.as_ref().map(|b| broker_json(&b.snapshot())),
    });
    let _ = serde_json::to_writer(&mut *buf, &v);
    let _ = buf.write_all(b"\n");
}

/// The broker's families: `shardnet_broker_*`, the refusals by `reason`, the latency as a
/// histogram in seconds.
fn render_broker(out: &mut String, b: &BrokerStats) {
    let families: [(&str, &str, &str, u64); 10] = [
        (
            "shardnet_broker_up",
            "gauge",
            "1 when the broker connections are up",
            u64::from(b.up),
        ),
        (
            "shardnet_broker_reconnects_total",
            "counter",
            "broker connections re-established after a loss",
            b.reconnects,
        ),
        (
            "shardnet_broker_connect_failures_total",
            "counter",
            "broker connection attempts that failed",
            b.connect_failures,
        ),
        (
            "shardnet_broker_published_total",
            "counter",
            "publishes the broker accepted",
            b.published,
        ),
        (
            "shardnet_broker_received_total",
            "counter",
            "messages received from the broker for topics with local subscribers",
            b.received,
        ),
        (
            "shardnet_broker_unwanted_total",
            "counter",
            "messages received from the broker for topics no longer wanted here",
            b.unwanted,
        ),
        (
            "shardnet_broker_topics",
            "gauge",
            "topics this process is subscribed to on the broker",
            b.topics,
        ),
        (
            "shardnet_broker_gaps_total",
            "counter",
            "gap notices: topics told that messages may have been missed after a broker outage",
            b.gaps,
        ),
        (
            "shardnet_broker_handoff_lost_total",
            "counter",
            "messages from the broker not handed to a shard (its queue was full)",
            b.handoff_lost,
        ),
        (
            "shardnet_broker_undeliverable_total",
            "counter",
            "messages from the broker that are not text or too large for subscribers",
            b.undeliverable,
        ),
    ];
    for (name, kind, help, value) in families {
        header(out, name, kind, help);
        let _ = writeln!(out, "{name}{{broker=\"{}\"}} {value}", b.kind);
    }
    let name = "shardnet_broker_outcomes_lost_total";
    header(
        out,
        name,
        "counter",
        "publish outcomes not handed back to the publisher's shard",
    );
    let _ = writeln!(out, "{name}{{broker=\"{}\"}} {}", b.kind, b.outcomes_lost);
    let name = "shardnet_broker_refused_total";
    header(out, name, "counter", "publishes refused, by reason");
    for (reason, n) in b.refused_by_reason() {
        let _ = writeln!(
            out,
            "{name}{{broker=\"{}\",reason=\"{reason}\"}} {n}",
            b.kind
        );
    }
    let name = "shardnet_broker_latency_seconds";
    header(
        out,
        name,
        "histogram",
        "publish-to-delivery time of this process's own publishes, through the broker",
    );
    let mut cumulative = 0;
    for (i, n) in b.latency_buckets.iter().enumerate() {
        cumulative += n;
        let le = LATENCY_BOUNDS_US
            .get(i)
            .map_or_else(|| "+Inf".to_string(), |us| format!("{}", *us as f64 / 1e6));
        let _ = writeln!(
            out,
            "{name}_bucket{{broker=\"{}\",le=\"{le}\"}} {cumulative}",
            b.kind
        );
    }
    let _ = writeln!(
        out,
        "{name}_sum{{broker=\"{}\"}} {}",
        b.kind,
        b.latency_sum_us as f64 / 1e6
    );
    let _ = writeln!(
        out,
        "{name}_count{{broker=\"{}\"}} {}",
        b.kind, b.latency_count
    );
}

fn broker_json(b: &BrokerStats) -> serde_json::Value {
    let refused: serde_json::Map<String, serde_json::Value> = b
        .refused_by_reason()
        .map(|(k, v)| (k.to_string(), v.into()))
        .collect();
    serde_json::json!({
        "kind": b.kind,
        "up": b.up,
        "reconnects": b.reconnects,
        "connect_failures": b.connect_failures,
        "published": b.published,
        "refused": refused,
        "received": b.received,
        "unwanted": b.unwanted,
        "topics": b.topics,
        "gaps": b.gaps,
        "handoff_lost": b.handoff_lost,
        "outcomes_lost": b.outcomes_lost,
        "undeliverable": b.undeliverable,
        "latency_us": {
            "count": b.latency_count,
            "p50": b.latency_quantile_us(0.5),
            "p99": b.latency_quantile_us(0.99),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::{ListenerSpec, Peers, Server, Service};

    /// A service that registers a counter and offloads one job per connection.
    struct Counting {
        peers: Peers<u8>,
        opened: crate::stats::CounterHandle,
    }

    impl Service for Counting {
        type State = ();
        type Command = u8;

        fn on_open(&mut self, conn: &mut crate::server::Conn<'_, ()>) {
            self.opened.inc();
            self.peers.offload(conn, || 7).expect("room in the pool");
        }

        fn on_data(&mut self, _conn: &mut crate::server::Conn<'_, ()>, input: &mut [u8]) -> usize {
            input.len()
        }

        fn on_offload(&mut self, conn: &mut crate::server::Conn<'_, ()>, result: u8) {
            conn.write(&[result]);
        }
    }

    #[test]
    fn offload_and_registered_counters_are_rendered() {
        let server = Server::builder()
            .listener(ListenerSpec::new("t", "127.0.0.1:0".parse().unwrap()))
            .shards(1)
            .pinning(crate::server::Pinning::Off)
            .start(|info, peers| Counting {
                peers,
                opened: info
                    .counters
                    .counter("opened", "connections opened")
                    .unwrap(),
            })
            .unwrap();
        let empty = server.snapshot();
        assert!(empty.offload.is_none(), "no job yet, no pool");
        let mut client = std::net::TcpStream::connect(server.addr("t").unwrap()).unwrap();
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut byte = [0u8; 1];
        std::io::Read::read_exact(&mut client, &mut byte).unwrap();
        assert_eq!(byte[0], 7);
        let snap = server.snapshot();
        let mut out = String::new();
        render_offload_and_registered(&snap, &mut out);
        assert!(out.contains("shardnet_offload_done_total 1\n"), "{out}");
        assert!(
            out.contains("# TYPE shardnet_offload_queued gauge\n"),
            "{out}"
        );
        assert!(
            out.contains("shardnet_offload_latency_seconds_count 1\n"),
            "{out}"
        );
        assert!(
            out.contains("shardnet_offload_latency_seconds_bucket{le=\"+Inf\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("# HELP shardnet_service_opened_total connections opened\n"),
            "{out}"
        );
        assert!(
            out.contains("shardnet_service_opened_total{shard=\"0\"} 1\n"),
            "{out}"
        );
    }
}
