//! `shardnet bench`: the load generator, its report, the shard-count sweep and side-by-side
//! comparisons.
//!
//! The client runs on the same shard engine as the server ([`client`]). A run connects,
//! warms up, resets the counters, measures for a bounded time and collects every client shard's
//! histogram; when the server's pid is known (`--spawn`, `--server-pid`) it also reads the
//! server's CPU time per thread from /proc, which gives the per-core throughput: requests per
//! server CPU-second.

pub mod client;
pub mod fanout;
pub mod multi;
pub mod procfs;
pub mod spawn;
pub mod wrk;

use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::config::Trigger;
use crate::server::{Limits, PoolSpec, ShardPool, Tuning};
use client::{Client, ClientCmd, Mode, Plan, ShardResult};
use spawn::{Quota, Spawned};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Workload: echo, http (GET --path, pipelined --depth), ws (WebSocket echo), idle (hold
    /// connections, report server RSS per connection), connect (connect, one request, close).
    #[arg(long, value_enum, default_value = "echo")]
    pub mode: Mode,
    /// A running server to load (echo port for echo; HTTP port for http, ws, connect).
    #[arg(long, conflicts_with = "spawn")]
    pub target: Option<SocketAddr>,
    /// Start a shardnet server for the run (from this binary), pinned to --server-cores.
    #[arg(long)]
    pub spawn: bool,
    /// Configuration for the spawned server (default: a generated one with echo and http listeners).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Shards of the spawned server.
    #[arg(long, default_value_t = 1)]
    pub shards: usize,
    /// Cores for the spawned server's shards (comma list).
    #[arg(long, default_value = "0")]
    pub server_cores: String,
    /// Cores for the load generator's client shards (comma list; one client shard per core).
    #[arg(long, default_value = "1")]
    pub client_cores: String,
    /// epoll mode of the spawned server.
    #[arg(long, value_enum)]
    pub trigger: Option<TriggerArg>,
    /// How the spawned server spreads connections over its shards (round-robin,
    /// least-connections, reuseport); compare them with `--mode connect`.
    #[arg(long, value_parser = ["round-robin", "least-connections", "reuseport"])]
    pub balance: Option<String>,
    /// Limit the server to this percentage of one core with a cgroup CPU quota, so that the
    /// server, not the client, is the bottleneck.
    #[arg(long)]
    pub server_quota: Option<u32>,
    /// The server's pid when it runs already (for CPU and RSS figures).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Connections.
    #[arg(short = 'c', long, default_value_t = 50)]
    pub connections: usize,
    /// Requests in flight per connection (closed loop).
    #[arg(short = 'd', long, default_value_t = 1)]
    pub depth: usize,
    /// Request size in bytes (echo, ws).
    #[arg(short = 's', long, default_value_t = 64)]
    pub size: usize,
    /// HTTP path (http, connect) or WebSocket path (ws, idle --idle-ws).
    #[arg(long)]
    pub path: Option<String>,
    /// Measured duration.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Warm-up before measuring.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Open loop: total requests per second (latency from the intended send time).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Idle mode: upgrade every connection to WebSocket before holding it.
    #[arg(long)]
    pub idle_ws: bool,
    /// Source addresses to spread connections over, e.g. 127.0.0.2-127.0.0.40 (each gives
    /// about 28k ephemeral ports).
    #[arg(long)]
    pub source_addrs: Option<String>,
    /// Write the report (with config, shards, pinning, kernel, CPU and commit) as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Run the same load at each shard count (spawned server) and recommend one.
    #[arg(long)]
    pub sweep_shards: Option<String>,
    /// Other server commands to run the same load against, alternating with shardnet in one run;
    /// `{port}` is replaced by a free port. Pinned and capped like the spawned shardnet.
    #[arg(long)]
    pub compare: Vec<String>,
    /// Name for each --compare command in the table (same order).
    #[arg(long)]
    pub compare_name: Vec<String>,
    /// HTTP mode: drive the load with Debian's `wrk` (one thread per client core, --depth
    /// requests pipelined by benches/pipeline.lua) instead of the built-in client.
    #[arg(long)]
    pub wrk: bool,
    /// Spread the connections over this many client processes (past one process's descriptor
    /// limit); their results are merged (histograms exactly).
    #[arg(long, default_value_t = 1)]
    pub processes: usize,
    /// Internal: run as one of --processes' children, writing the result to this file.
    #[arg(long, hide = true)]
    pub child_report: Option<PathBuf>,
    /// Rounds for --compare and --sweep-shards (medians are reported).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TriggerArg {
    Edge,
    Level,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

/// The server's memory with idle connections.
#[derive(Debug, Clone, Serialize)]
pub struct IdleReport {
    pub connections: usize,
    pub held_seconds: f64,
    pub rss_before: u64,
    pub rss_after: u64,
    pub bytes_per_connection: f64,
}

impl IdleReport {
    /// The server's RSS growth while `connections` were held, per connection.
    pub fn new(
        connections: usize,
        held_seconds: f64,
        before: Option<u64>,
        after: Option<u64>,
    ) -> Self {
        let (rss_before, rss_after) = (before.unwrap_or(0), after.unwrap_or(0));
        IdleReport {
            connections,
            held_seconds,
            rss_before,
            rss_after,
            bytes_per_connection: rss_after.saturating_sub(rss_before) as f64
                / connections.max(1) as f64,
        }
    }
}

/// One measured run.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub label: String,
    pub mode: Mode,
    pub connections: usize,
    pub depth: usize,
    pub size: usize,
    pub seconds: f64,
    pub requests: u64,
    pub requests_per_second: f64,
    pub megabytes_per_second: f64,
    pub latency_us: Latency,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Server CPU seconds per thread during the measurement.
    pub server_cpu: Vec<(String, f64)>,
    pub server_cpu_seconds: Option<f64>,
    /// Requests per server CPU-second.
    pub per_core_throughput: Option<f64>,
    pub idle: Option<IdleReport>,
    pub fanout: Option<fanout::FanoutReport>,
    /// The merged latency histogram (for --processes; not in the JSON report).
    #[serde(skip)]
    pub histogram: Option<Histogram<u64>>,
}

/// Everything a JSON report records.
#[derive(Debug, Serialize)]
pub struct Report {
    pub version: &'static str,
    pub commit: Option<String>,
    pub kernel: String,
    pub cpu_model: String,
    pub server_shards: usize,
    pub server_cores: String,
    pub client_cores: String,
    pub server_quota_percent: Option<u32>,
    pub trigger: Option<String>,
    pub config: Option<String>,
    pub runs: Vec<Measurement>,
    pub summary: Option<serde_json::Value>,
}

pub fn parse_cores(s: &str) -> anyhow::Result<Vec<usize>> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            p.trim()
                .parse::<usize>()
                .with_context(|| format!("bad core id `{p}`"))
        })
        .collect()
}

/// `127.0.0.2-127.0.0.40` or a comma list.
pub fn parse_sources(s: &str) -> anyhow::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for part in s.split(',') {
        if let Some((a, b)) = part.split_once('-') {
            let (a, b): (std::net::Ipv4Addr, std::net::Ipv4Addr) = (
                a.trim().parse().context("source range start")?,
                b.trim().parse().context("source range end")?,
            );
            let (a, b) = (u32::from(a), u32::from(b));
            if b < a || b - a > 65536 {
                bail!("bad source address range `{part}`");
            }
            out.extend((a..=b).map(|x| IpAddr::V4(x.into())));
        } else {
            out.push(
                part.trim()
                    .parse()
                    .with_context(|| format!("bad source address `{part}`"))?,
            );
        }
    }
    Ok(out)
}

impl BenchArgs {
    fn plan(&self, host: &str) -> Plan {
        let default_path = match self.mode {
            Mode::Ws | Mode::Idle => "/ws/echo",
            Mode::Fanout => "/ws",
            _ => "/plaintext",
        };
        let path = self
            .path
            .clone()
            .unwrap_or_else(|| default_path.to_string());
        Plan {
            mode: self.mode,
            depth: self.depth.max(1),
            size: self.size.max(1),
            idle_ws: (self.mode == Mode::Idle && self.idle_ws).then(|| path.clone()),
            path,
            // Fan-out: --rate is the publish rate, driven by the controller, not per connection.
            rate_per_conn: match self.mode {
                Mode::Fanout => 0.0,
                _ => self
                    .rate
                    .map_or(0.0, |r| r / self.connections.max(1) as f64),
            },
            host: host.to_string(),
            topic: format!("bench-{}", std::process::id()),
            base: Instant::now(),
        }
    }

    /// The listener of a spawned shardnet this mode talks to.
    fn listener(&self) -> &'static str {
        match self.mode {
            Mode::Echo => "echo",
            Mode::Idle if !self.idle_ws => "echo",
            _ => "http",
        }
    }
}

/// Set in --processes' children: no progress bar of their own.
static CHILD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Runs `shardnet bench`. Returns the process exit code.
pub fn main(args: BenchArgs) -> anyhow::Result<i32> {
    if let Some(path) = &args.child_report {
        CHILD.store(true, std::sync::atomic::Ordering::Relaxed);
        let target = args.target.context("a child needs --target")?;
        let m = measure(&args, target, None, "child")?;
        let report = multi::ChildReport {
            requests: m.requests,
            seconds: m.seconds,
            bytes: m.megabytes_per_second * m.seconds * 1e6,
            errors: m.errors,
            first_error: m.first_error.clone(),
            histogram: multi::encode_histogram(m.histogram.as_ref().context("no histogram")?),
        };
        std::fs::write(path, serde_json::to_string(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        return Ok(if m.errors > 0 { 1 } else { 0 });
    }
    if let Some(list) = &args.sweep_shards {
        return sweep(&args, list);
    }
    if !args.compare.is_empty() {
        return compare(&args);
    }
    let (target, pid, _server) = if args.spawn {
        let s = spawn::shardnet(&args, args.shards)?;
        (s.addr(args.listener())?, Some(s.pid()), Some(s))
    } else {
        let Some(t) = args.target else {
            bail!("give --target ADDR or --spawn")
        };
        (t, args.server_pid, None)
    };
    let m = measure(&args, target, pid, "shardnet")?;
    print_table(std::slice::from_ref(&m));
    write_json(&args, vec![m.clone()], None)?;
    Ok(if m.errors > 0 { 1 } else { 0 })
}

fn write_json(
    args: &BenchArgs,
    runs: Vec<Measurement>,
    summary: Option<serde_json::Value>,
) -> anyhow::Result<()> {
    let Some(path) = &args.json else {
        return Ok(());
    };
    let config = match &args.config {
        Some(p) => std::fs::read_to_string(p).ok(),
        None => args
            .spawn
            .then(|| spawn::generated_config(args, args.shards)),
    };
    let report = Report {
        version: env!("CARGO_PKG_VERSION"),
        commit: procfs::git_commit(),
        kernel: procfs::kernel(),
        cpu_model: procfs::cpu_model(),
        server_shards: args.shards,
        server_cores: args.server_cores.clone(),
        client_cores: args.client_cores.clone(),
        server_quota_percent: args.server_quota,
        trigger: args.trigger.map(|t| format!("{t:?}").to_lowercase()),
        config,
        runs,
        summary,
    };
    std::fs::write(path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("report written to {}", path.display());
    Ok(())
}

fn collect(peers: &crate::server::Peers<ClientCmd>) -> Vec<ShardResult> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let n = peers.broadcast(ClientCmd::Collect(tx));
    (0..n)
        .filter_map(|_| rx.recv_timeout(Duration::from_secs(5)).ok())
        .collect()
}

/// CPU seconds each server thread spent between two snapshots (threads that spent none left out).
fn cpu_delta(cpu0: &[procfs::ThreadCpu], cpu1: &[procfs::ThreadCpu]) -> Vec<(String, f64)> {
    cpu1.iter()
        .map(|t| {
            let before = cpu0
                .iter()
                .find(|b| b.tid == t.tid)
                .map_or(0.0, |b| b.seconds);
            (t.name.clone(), t.seconds - before)
        })
        .filter(|(_, s)| *s > 0.0)
        .collect()
}

fn cpu_snapshot(pid: Option<u32>) -> Vec<procfs::ThreadCpu> {
    pid.map(procfs::threads).unwrap_or_default()
}

/// One run against `target`: connect, warm up, measure, collect.
pub fn measure(
    args: &BenchArgs,
    target: SocketAddr,
    pid: Option<u32>,
    label: &str,
) -> anyhow::Result<Measurement> {
    if args.processes > 1 && args.child_report.is_none() {
        return multi::measure(args, target, pid, label);
    }
    if args.mode == Mode::Connect {
        return measure_connect(args, target, pid, label);
    }
    if args.wrk {
        if args.mode != Mode::Http {
            bail!("--wrk drives HTTP load only (--mode http)");
        }
        return wrk::measure(args, target, pid, label);
    }
    let client_cores = parse_cores(&args.client_cores)?;
    let sources = match &args.source_addrs {
        Some(s) => parse_sources(s)?,
        None => Vec::new(),
    };
    let plan = Arc::new(args.plan(&target.to_string()));
    let shards = client_cores.len().max(1);
    let spec = PoolSpec {
        shards,
        cores: client_cores.iter().map(|&c| Some(c)).collect(),
        limits: Limits {
            idle_timeout: Duration::ZERO,
            max_write_buffer: 64 << 20,
            write_timeout: Duration::from_secs(60),
            max_read_buffer: 64 << 20,
        },
        tuning: Tuning {
            edge: true,
            read_buffer: 256 * 1024,
            read_budget: 1 << 20,
            events_per_wait: 1024,
            shutdown_timeout: Duration::from_secs(2),
        },
    };
    let p = plan.clone();
    let (mut pool, peers) = ShardPool::start(&spec, move |info, peers| {
        Client::new(p.clone(), &info, peers)
    })
    .context("cannot start the client shards")?;

    let rss_before = pid.and_then(procfs::rss_bytes);
    for i in 0..args.connections {
        let src = (!sources.is_empty()).then(|| sources[i % sources.len()]);
        let fd = crate::sys::socket::connect_from(target, src, Duration::from_secs(5))
            .with_context(|| {
                format!(
                    "connection {} of {} to {target} failed",
                    i + 1,
                    args.connections
                )
            })?;
        if !pool.adopt(i % shards, fd, 0) {
            bail!("a client shard does not take connections");
        }
    }
    // Wait (bounded) until every connection is ready (WebSocket upgrades done).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let results = collect(&peers);
        let ready: u64 = results.iter().map(|r| r.ready).sum();
        if let Some(e) = results.iter().find_map(|r| r.first_error.clone()) {
            bail!("{label}: {e}");
        }
        if ready as usize >= args.connections {
            if args.child_report.is_some() {
                // Tell the parent (--processes) that this child's connections are up, then wait
                // for its go: every child warms up and measures over the same window.
                use std::io::{BufRead, Write};
                println!("ready");
                let _ = std::io::stdout().flush();
                let mut line = String::new();
                let _ = std::io::stdin().lock().read_line(&mut line);
            }
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{label}: only {ready} of {} connections became ready within 60 s",
                args.connections
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    let publisher = (args.mode == Mode::Fanout).then(|| {
        fanout::Publisher::start(
            target,
            plan.topic.clone(),
            plan.base,
            args.rate.unwrap_or(1000.0),
        )
    });
    let bar = progress(args.warmup + args.duration, label);
    sleep_with(&bar, args.warmup);
    peers.broadcast(ClientCmd::Reset);
    let seq0 = publisher.as_ref().map_or(0, |p| p.published());
    let cpu0 = cpu_snapshot(pid);
    let t0 = Instant::now();
    sleep_with(&bar, args.duration);
    let mut fan = None;
    if let Some(p) = publisher {
        let (last, publish_errors) = p.stop()?;
        fanout::settle(|| collect(&peers), shards, last, label);
        fan = Some((seq0, last, publish_errors));
    }
    let results = collect(&peers);
    let seconds = t0.elapsed().as_secs_f64();
    let cpu1 = cpu_snapshot(pid);
    let rss_after = pid.and_then(procfs::rss_bytes);
    bar.finish_and_clear();
    pool.shutdown();

    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    let (mut requests, mut bytes, mut errors, mut closed) = (0, 0, 0, 0);
    let mut first_error = None;
    for r in &results {
        hist.add(&r.hist).expect("same bounds");
        requests += r.requests;
        bytes += r.bytes;
        errors += r.errors;
        closed += r.closed;
        first_error = first_error.or_else(|| r.first_error.clone());
    }
    if results.len() < shards {
        errors += 1;
        first_error = first_error.or(Some("a client shard did not report".into()));
    }
    let fanout = fan.map(|(seq0, last, publish_errors)| {
        let (subscribers, seen) = fanout::progress(&results);
        let gaps: u64 = results.iter().map(|r| r.gaps).sum();
        let never = (subscribers * last).saturating_sub(seen);
        let dropped_by_server = fanout::server_dropped(target);
        fanout::FanoutReport {
            subscribers,
            published: last - seq0,
            publish_errors,
            delivered: requests,
            lost: gaps + never,
            gaps,
            tail_missing: never,
            dropped_by_server,
        }
    });
    if let Some(f) = &fanout {
        errors += f.publish_errors;
        // A lost message is an error unless the server counted it (slow_consumer = "drop").
        let uncounted = f.lost.saturating_sub(f.dropped_by_server.unwrap_or(0));
        if uncounted > 0 {
            errors += uncounted;
            first_error = first_error.or(Some(format!(
                "{uncounted} messages lost that the server did not count as dropped"
            )));
        }
        if closed > 0 {
            errors += closed;
            first_error = first_error.or(Some(format!("the server closed {closed} subscribers")));
        }
    }
    if args.mode == Mode::Idle && closed > 0 {
        errors += closed;
        first_error = first_error.or(Some(format!("the server closed {closed} idle connections")));
    }
    let server_cpu = cpu_delta(&cpu0, &cpu1);
    let server_cpu_seconds = pid.map(|_| server_cpu.iter().map(|(_, s)| s).sum::<f64>());
    let idle = (args.mode == Mode::Idle)
        .then(|| IdleReport::new(args.connections, seconds, rss_before, rss_after));
    Ok(Measurement {
        label: label.to_string(),
        mode: args.mode,
        connections: args.connections,
        depth: args.depth,
        size: args.size,
        seconds,
        requests,
        requests_per_second: requests as f64 / seconds,
        megabytes_per_second: bytes as f64 / seconds / 1e6,
        latency_us: latency(&hist),
        errors,
        first_error,
        server_cpu,
        per_core_throughput: server_cpu_seconds
            .filter(|&s| s > 0.0)
            .map(|s| requests as f64 / s),
        server_cpu_seconds,
        idle,
        fanout,
        histogram: Some(hist),
    })
}

fn latency(h: &Histogram<u64>) -> Latency {
    if h.is_empty() {
        return Latency::default();
    }
    Latency {
        p50: h.value_at_quantile(0.5),
        p90: h.value_at_quantile(0.9),
        p99: h.value_at_quantile(0.99),
        p999: h.value_at_quantile(0.999),
        max: h.max(),
    }
}

/// Connection churn: each client thread connects, sends one HTTP request, reads the answer and
/// closes, as fast as it can.
fn measure_connect(
    args: &BenchArgs,
    target: SocketAddr,
    pid: Option<u32>,
    label: &str,
) -> anyhow::Result<Measurement> {
    use std::io::{Read, Write};
    let cores = parse_cores(&args.client_cores)?;
    let threads = args.connections.clamp(1, 64);
    let path = args.path.clone().unwrap_or_else(|| "/plaintext".into());
    let request = format!("GET {path} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let bar = progress(args.warmup + args.duration, label);
    let mut cpu0 = Vec::new();
    let mut t0 = Instant::now();
    let results: Vec<(Histogram<u64>, u64, u64, Option<String>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let (stop, measuring, request) = (stop.clone(), measuring.clone(), request.clone());
                let core = cores.get(i % cores.len().max(1)).copied();
                scope.spawn(move || {
                    if let Some(c) = core {
                        crate::sys::affinity::pin_current(c);
                    }
                    let mut h =
                        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
                    let (mut n, mut errors, mut first) = (0u64, 0u64, None);
                    let mut buf = [0u8; 4096];
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let start = Instant::now();
                        let r = (|| -> std::io::Result<bool> {
                            let mut s = std::net::TcpStream::connect_timeout(
                                &target,
                                Duration::from_secs(5),
                            )?;
                            s.set_read_timeout(Some(Duration::from_secs(5)))?;
                            s.write_all(request.as_bytes())?;
                            let mut got = Vec::new();
                            loop {
                                let k = s.read(&mut buf)?;
                                if k == 0 {
                                    break;
                                }
                                got.extend_from_slice(&buf[..k]);
                            }
                            Ok(got.starts_with(b"HTTP/1.1 200"))
                        })();
                        if !measuring.load(std::sync::atomic::Ordering::Relaxed) {
                            continue;
                        }
                        match r {
                            Ok(true) => {
                                n += 1;
                                let _ = h.record(start.elapsed().as_micros().max(1) as u64);
                            }
                            Ok(false) => {
                                errors += 1;
                                first.get_or_insert_with(|| "non-200 answer".to_string());
                            }
                            Err(e) => {
                                errors += 1;
                                first.get_or_insert_with(|| format!("connect/request failed: {e}"));
                            }
                        }
                    }
                    (h, n, errors, first)
                })
            })
            .collect();
        sleep_with(&bar, args.warmup);
        cpu0 = cpu_snapshot(pid);
        t0 = Instant::now();
        measuring.store(true, std::sync::atomic::Ordering::Relaxed);
        sleep_with(&bar, args.duration);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });
    let seconds = t0.elapsed().as_secs_f64();
    let cpu1 = cpu_snapshot(pid);
    bar.finish_and_clear();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    let (mut requests, mut errors, mut first_error) = (0, 0, None);
    for (h, n, e, f) in results {
        hist.add(&h).expect("same bounds");
        requests += n;
        errors += e;
        first_error = first_error.or(f);
    }
    let server_cpu: Vec<(String, f64)> = cpu1
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                t.seconds
                    - cpu0
                        .iter()
                        .find(|b| b.tid == t.tid)
                        .map_or(0.0, |b| b.seconds),
            )
        })
        .filter(|(_, s)| *s > 0.0)
        .collect();
    let server_cpu_seconds = pid.map(|_| server_cpu.iter().map(|(_, s)| s).sum::<f64>());
    Ok(Measurement {
        label: label.to_string(),
        mode: Mode::Connect,
        connections: threads,
        depth: 1,
        size: 0,
        seconds,
        requests,
        requests_per_second: requests as f64 / seconds,
        megabytes_per_second: 0.0,
        latency_us: latency(&hist),
        errors,
        first_error,
        server_cpu,
        per_core_throughput: server_cpu_seconds
            .filter(|&s| s > 0.0)
            .map(|s| requests as f64 / s),
        server_cpu_seconds,
        idle: None,
        fanout: None,
        histogram: None,
    })
}

fn progress(total: Duration, label: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() || CHILD.load(std::sync::atomic::Ordering::Relaxed) {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total.as_millis() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {elapsed}/{duration}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(label.to_string());
    bar
}

fn sleep_with(bar: &indicatif::ProgressBar, d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        std::thread::sleep(
            Duration::from_millis(100).min(end.saturating_duration_since(Instant::now())),
        );
        bar.inc(100);
    }
}

pub fn print_table(runs: &[Measurement]) {
    println!(
        "{:<16} {:>6} {:>5} {:>6} {:>12} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>12} {:>14}",
        "server",
        "conns",
        "depth",
        "size",
        "req/s",
        "MB/s",
        "p50us",
        "p90us",
        "p99us",
        "p999us",
        "maxus",
        "errors",
        "server CPU s",
        "req/CPU-second"
    );
    for m in runs {
        println!(
            "{:<16} {:>6} {:>5} {:>6} {:>12.0} {:>9.1} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>12} {:>14}",
            m.label,
            m.connections,
            m.depth,
            m.size,
            m.requests_per_second,
            m.megabytes_per_second,
            m.latency_us.p50,
            m.latency_us.p90,
            m.latency_us.p99,
            m.latency_us.p999,
            m.latency_us.max,
            m.errors,
            // `+ 0.0`: an empty sum is -0.0.
            m.server_cpu_seconds.map_or("-".into(), |s| format!("{:.2}", s + 0.0)),
            m.per_core_throughput.map_or("-".into(), |t| format!("{t:.0}")),
        );
        if !m.server_cpu.is_empty() {
            let per: Vec<String> = m
                .server_cpu
                .iter()
                .map(|(n, s)| format!("{n}={s:.2}s"))
                .collect();
            println!("    server CPU per thread: {}", per.join(" "));
        }
        if let Some(i) = &m.idle {
            println!(
                "    idle: {} connections held {:.1}s; server RSS {} -> {} bytes: {:.0} bytes per connection",
                i.connections, i.held_seconds, i.rss_before, i.rss_after, i.bytes_per_connection
            );
        }
        if let Some(f) = &m.fanout {
            println!(
                "    fan-out: {} subscribers, {} publishes ({:.0}/s), {} deliveries ({:.0}/s), {} lost ({} gaps, {} never arrived), {} dropped by the server, {} publish errors",
                f.subscribers,
                f.published,
                f.published as f64 / m.seconds,
                f.delivered,
                f.delivered as f64 / m.seconds,
                f.lost,
                f.gaps,
                f.tail_missing,
                f.dropped_by_server.map_or("unknown".into(), |d| d.to_string()),
                f.publish_errors
            );
        }
        if let Some(e) = &m.first_error {
            println!("    first error: {e}");
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

/// The same load against shardnet and each --compare command, alternating, `rounds` times.
fn compare(args: &BenchArgs) -> anyhow::Result<i32> {
    let cores = parse_cores(&args.server_cores)?;
    let mut names = vec!["shardnet".to_string()];
    for (i, c) in args.compare.iter().enumerate() {
        names.push(
            args.compare_name
                .get(i)
                .cloned()
                .unwrap_or_else(|| c.split_whitespace().next().unwrap_or("other").to_string()),
        );
    }
    let mut runs: Vec<Measurement> = Vec::new();
    let mut errors = 0;
    for round in 0..args.rounds.max(1) {
        // Rotate who goes first: on a shared machine the first run of a round is not like the
        // others (caches, frequency, neighbours), and no server should always get that slot.
        for j in 0..names.len() {
            let k = (j + round) % names.len();
            let name = &names[k];
            let server: Spawned = if k == 0 {
                spawn::shardnet(args, args.shards)?
            } else {
                spawn::command(
                    &args.compare[k - 1],
                    &cores,
                    args.server_quota.map(Quota::percent),
                )?
            };
            let target = if k == 0 {
                server.addr(args.listener())?
            } else {
                server.addr("main")?
            };
            let label = format!("{name}#{}", round + 1);
            match measure(args, target, Some(server.pid()), &label) {
                Ok(mut m) => {
                    errors += m.errors;
                    m.label = name.clone();
                    eprintln!(
                        "{label}: {:.0} req/s, p99 {} us, {} errors",
                        m.requests_per_second, m.latency_us.p99, m.errors
                    );
                    runs.push(m);
                }
                Err(e) => {
                    errors += 1;
                    eprintln!("{label}: failed: {e:#}");
                }
            }
            drop(server);
        }
    }
    // Medians per server and ratios against shardnet.
    let mut summary = Vec::new();
    let shard_median = median(
        runs.iter()
            .filter(|m| m.label == "shardnet")
            .map(|m| m.requests_per_second)
            .collect(),
    );
    println!("\nmedian of {} rounds ({}):", args.rounds, describe(args));
    println!(
        "{:<20} {:>12} {:>10} {:>10} {:>16} {:>22}",
        "server", "req/s", "p99us", "CPU s", "req/CPU-second", "shardnet / this (req/s)"
    );
    for name in &names {
        let mine: Vec<&Measurement> = runs.iter().filter(|m| &m.label == name).collect();
        let rps = median(mine.iter().map(|m| m.requests_per_second).collect());
        let p99 = median(mine.iter().map(|m| m.latency_us.p99 as f64).collect());
        let cpu = median(mine.iter().filter_map(|m| m.server_cpu_seconds).collect());
        let pc = median(mine.iter().filter_map(|m| m.per_core_throughput).collect());
        let all: Vec<String> = mine
            .iter()
            .map(|m| format!("{:.0}", m.requests_per_second))
            .collect();
        let ratio = if rps > 0.0 { shard_median / rps } else { 0.0 };
        println!(
            "{name:<20} {rps:>12.0} {p99:>10.0} {cpu:>10.2} {pc:>16.0} {ratio:>22.3}   runs: {}",
            all.join(", ")
        );
        summary.push(serde_json::json!({ "server": name, "median_rps": rps, "median_p99_us": p99, "median_per_core": pc, "shardnet_over_this": ratio, "runs_rps": all }));
    }
    write_json(args, runs, Some(serde_json::Value::Array(summary)))?;
    Ok(if errors > 0 { 1 } else { 0 })
}

fn describe(args: &BenchArgs) -> String {
    format!(
        "{:?}{} c={} d={} s={} server cores {} quota {} client cores {}{}",
        args.mode,
        if args.wrk { " (wrk)" } else { "" },
        args.connections,
        args.depth,
        args.size,
        args.server_cores,
        args.server_quota.map_or("none".into(), |q| format!("{q}%")),
        args.client_cores,
        args.balance
            .as_deref()
            .map_or(String::new(), |b| format!(" balance {b}"))
    )
}

/// Runs the same load at each shard count; writes JSON and an SVG plot; recommends a count.
fn sweep(args: &BenchArgs, list: &str) -> anyhow::Result<i32> {
    let counts: Vec<usize> = list
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<usize>()
                .with_context(|| format!("bad shard count `{s}`"))
        })
        .collect::<anyhow::Result<_>>()?;
    if counts.is_empty() || counts.contains(&0) {
        bail!("--sweep-shards takes positive counts, like 1,2,4");
    }
    let mut points = Vec::new();
    let mut runs = Vec::new();
    for &n in &counts {
        let mut rps = Vec::new();
        let mut p99 = Vec::new();
        for round in 0..args.rounds.max(1) {
            let server = spawn::shardnet(args, n)?;
            let m = measure(
                args,
                server.addr(args.listener())?,
                Some(server.pid()),
                &format!("shards={n}#{}", round + 1),
            )?;
            eprintln!(
                "shards={n} round {}: {:.0} req/s, p99 {} us",
                round + 1,
                m.requests_per_second,
                m.latency_us.p99
            );
            rps.push(m.requests_per_second);
            p99.push(m.latency_us.p99 as f64);
            runs.push(m);
        }
        points.push((n, median(rps), median(p99)));
    }
    let best = points.iter().map(|p| p.1).fold(0.0, f64::max);
    // The smallest count within 5% of the best: more shards than that cost cores for nothing.
    let pick = points
        .iter()
        .find(|p| p.1 >= 0.95 * best)
        .expect("non-empty");
    println!("\nshards  req/s(median)  p99us(median)");
    for (n, r, p) in &points {
        println!("{n:>6} {r:>14.0} {p:>14.0}");
    }
    let why = if Some(pick.0) == points.iter().map(|p| p.0).max() {
        "the most shards tried gave the most throughput; try more if this host has the cores"
    } else {
        "more shards did not pay for their cores"
    };
    println!(
        "\nrecommended: shards = {}  ({:.0} req/s, within 5% of the best {:.0}; {why})",
        pick.0, pick.1, best
    );
    let out = args
        .json
        .clone()
        .unwrap_or_else(|| PathBuf::from("sweep.json"));
    let svg = out.with_extension("svg");
    plot(&points, &svg)?;
    eprintln!("plot written to {}", svg.display());
    let summary = serde_json::json!({
        "points": points.iter().map(|(n, r, p)| serde_json::json!({"shards": n, "median_rps": r, "median_p99_us": p})).collect::<Vec<_>>(),
        "recommended_shards": pick.0,
    });
    let args = BenchArgs {
        json: Some(out),
        ..args.clone()
    };
    write_json(&args, runs, Some(summary))?;
    Ok(0)
}

fn plot(points: &[(usize, f64, f64)], path: &std::path::Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE)
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    let max_n = points.iter().map(|p| p.0).max().unwrap_or(1) as f64;
    let max_r = points.iter().map(|p| p.1).fold(1.0, f64::max) * 1.15;
    let max_p = points.iter().map(|p| p.2).fold(1.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "shardnet: throughput and p99 against shards",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .right_y_label_area_size(70)
        .build_cartesian_2d(0.5..max_n + 0.5, 0.0..max_r)
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?
        .set_secondary_coord(0.5..max_n + 0.5, 0.0..max_p);
    chart
        .configure_mesh()
        .x_desc("shards")
        .y_desc("requests/s (median)")
        .draw()
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    chart
        .configure_secondary_axes()
        .y_desc("p99 latency, us")
        .draw()
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    chart
        .draw_series(LineSeries::new(
            points.iter().map(|p| (p.0 as f64, p.1)),
            BLUE.stroke_width(2),
        ))
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?
        .label("req/s")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(
            points
                .iter()
                .map(|p| Circle::new((p.0 as f64, p.1), 4, BLUE.filled())),
        )
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    chart
        .draw_secondary_series(LineSeries::new(
            points.iter().map(|p| (p.0 as f64, p.2)),
            RED.stroke_width(2),
        ))
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?
        .label("p99 us")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED));
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    Ok(())
}

impl From<TriggerArg> for Trigger {
    fn from(t: TriggerArg) -> Trigger {
        match t {
            TriggerArg::Edge => Trigger::Edge,
            TriggerArg::Level => Trigger::Level,
        }
    }
}
