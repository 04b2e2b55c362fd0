//! What a bench run reports, built in one place: the latency histogram every client uses (its
//! bounds are written here only), [`Measurement`] and its builder (rates, server CPU and the
//! per-core figure are derived there, not by each client), the table printed to stdout and the
//! JSON report.
//!
//! Runs on the controller thread, after the clients have stopped.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::Serialize;

use super::args::BenchArgs;
use super::client::{Mode, Payload};
pub use super::memory::MemoryReport;
use super::{fanout, procfs, spawn};

/// Longest latency a histogram records, in microseconds; longer ones are recorded as this.
pub const MAX_LATENCY_US: u64 = 60_000_000;

/// An empty latency histogram (microseconds, 1 µs to 60 s, 3 significant digits). Every client
/// shard, connect thread and client process records into one of these, so they merge exactly.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

/// Latency percentiles in microseconds; `None` where nothing was measured (no sample, or a
/// figure the load tool did not give: see [`Measurement::latency_note`]).
#[derive(Debug, Clone, Serialize, Default)]
pub struct Latency {
    pub p50: Option<u64>,
    pub p90: Option<u64>,
    pub p99: Option<u64>,
    pub p999: Option<u64>,
    pub max: Option<u64>,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            p50: Some(h.value_at_quantile(0.5)),
            p90: Some(h.value_at_quantile(0.9)),
            p99: Some(h.value_at_quantile(0.99)),
            p999: Some(h.value_at_quantile(0.999)),
            max: Some(h.max()),
        }
    }
}

/// A latency figure for a table: microseconds, or `n/a`.
pub fn us(v: Option<u64>) -> String {
    v.map_or_else(|| "n/a".to_string(), |v| v.to_string())
}

/// Idle connections held: how many, how long, and how many were still open at the end (each
/// answered a final probe). What they cost is in the run's [`MemoryReport`].
#[derive(Debug, Clone, Serialize)]
pub struct IdleReport {
    pub connections: usize,
    pub held_seconds: f64,
    /// Connections that echoed their final probe.
    pub verified: u64,
}

/// One measured run.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub label: String,
    pub mode: Mode,
    pub connections: usize,
    pub depth: usize,
    pub size: usize,
    /// What the messages contained, and whether WebSocket connections negotiated
    /// permessage-deflate (`--deflate`).
    pub payload: Payload,
    pub deflate: bool,
    pub seconds: f64,
    pub requests: u64,
    pub requests_per_second: f64,
    pub megabytes_per_second: f64,
    pub latency_us: Latency,
    /// Why a latency figure is missing, when the load tool gave none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_note: Option<String>,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Server CPU seconds per thread during the measurement.
    pub server_cpu: Vec<(String, f64)>,
    pub server_cpu_seconds: Option<f64>,
    /// Requests per server CPU-second.
    pub per_core_throughput: Option<f64>,
    pub idle: Option<IdleReport>,
    pub fanout: Option<fanout::FanoutReport>,
    /// What the connections cost the servers and the host's kernel (measured while held).
    pub memory: Option<MemoryReport>,
    /// Server processes loaded (several share the port with --server-processes), and the
    /// client processes the load came from (--processes).
    pub server_processes: usize,
    pub client_processes: usize,
    /// Seconds from the first connect until every connection was ready, and the rate.
    pub connect_seconds: Option<f64>,
    pub connects_per_second: Option<f64>,
    /// The merged latency histogram (for --processes; not in the JSON report).
    #[serde(skip)]
    pub histogram: Option<Histogram<u64>>,
}

/// What a client counted: requests, bytes, errors (with the first one's message).
#[derive(Debug, Default)]
pub struct Tally {
    pub requests: u64,
    pub bytes: f64,
    pub errors: u64,
    pub first_error: Option<String>,
}

impl Tally {
    /// Counts `n` errors; `why` becomes the first error's message if there was none.
    pub fn fail(&mut self, n: u64, why: impl FnOnce() -> String) {
        if n > 0 {
            self.errors += n;
            self.first_error.get_or_insert_with(why);
        }
    }
}

/// The servers' CPU time per thread over a measured window, from two /proc snapshots.
pub struct CpuMeter {
    pids: Vec<u32>,
    before: Vec<procfs::ThreadCpu>,
    started: Instant,
}

/// What a [`CpuMeter`] measured.
#[derive(Debug, Default)]
pub struct CpuUse {
    /// CPU seconds per thread name that spent any (summed over the server processes: `shard-00
    /// x56` is the first shard of 56 processes).
    pub threads: Vec<(String, f64)>,
    /// Their sum; `None` when the servers' pids are unknown.
    pub seconds: Option<f64>,
    /// Wall-clock seconds between the two snapshots.
    pub window: f64,
}

impl CpuMeter {
    /// Starts measuring the processes `pids` (none: unknown).
    pub fn start(pids: &[u32]) -> CpuMeter {
        CpuMeter {
            pids: pids.to_vec(),
            before: snapshot(pids),
            started: Instant::now(),
        }
    }

    pub fn stop(self) -> CpuUse {
        let window = self.started.elapsed().as_secs_f64();
        let after = snapshot(&self.pids);
        let before: std::collections::HashMap<u32, f64> =
            self.before.iter().map(|b| (b.tid, b.seconds)).collect();
        // Summed by thread name, in the order names first appear (thread ids are unique across
        // processes).
        let mut threads: Vec<(String, f64, usize)> = Vec::new();
        for t in &after {
            let spent = t.seconds - before.get(&t.tid).copied().unwrap_or(0.0);
            match threads.iter_mut().find(|(n, _, _)| *n == t.name) {
                Some(entry) => {
                    entry.1 += spent;
                    entry.2 += 1;
                }
                None => threads.push((t.name.clone(), spent, 1)),
            }
        }
        let threads: Vec<(String, f64)> = threads
            .into_iter()
            .filter(|(_, s, _)| *s > 0.0)
            .map(|(n, s, k)| (if k > 1 { format!("{n} x{k}") } else { n }, s))
            .collect();
        CpuUse {
            seconds: (!self.pids.is_empty()).then(|| threads.iter().map(|(_, s)| s).sum::<f64>()),
            threads,
            window,
        }
    }
}

fn snapshot(pids: &[u32]) -> Vec<procfs::ThreadCpu> {
    pids.iter().flat_map(|&p| procfs::threads(p)).collect()
}

/// Builds a [`Measurement`]: every client hands over what it counted, and the derived figures
/// (rates, per-core throughput) are computed in [`MeasurementBuilder::build`] only.
pub struct MeasurementBuilder {
    m: Measurement,
    bytes: f64,
    /// The window the server's CPU was read over, when it is not the requests' own (client
    /// processes count over their own clocks; the parent reads the server in between).
    cpu_window: Option<f64>,
}

impl Measurement {
    /// A measurement of `args`' load (mode, connections, depth, size) labelled `label`.
    pub fn builder(label: &str, args: &BenchArgs) -> MeasurementBuilder {
        MeasurementBuilder {
            m: Measurement {
                label: label.to_string(),
                mode: args.mode,
                connections: args.connections,
                depth: args.depth,
                size: args.size,
                payload: args.payload,
                deflate: args.deflate,
                seconds: 0.0,
                requests: 0,
                requests_per_second: 0.0,
                megabytes_per_second: 0.0,
                latency_us: Latency::default(),
                latency_note: None,
                errors: 0,
                first_error: None,
                server_cpu: Vec::new(),
                server_cpu_seconds: None,
                per_core_throughput: None,
                idle: None,
                fanout: None,
                memory: None,
                server_processes: 1,
                client_processes: 1,
                connect_seconds: None,
                connects_per_second: None,
                histogram: None,
            },
            bytes: 0.0,
            cpu_window: None,
        }
    }
}

impl MeasurementBuilder {
    /// Overrides the load's shape (connect mode: threads, one request, no payload; wrk: no size).
    pub fn shape(mut self, connections: usize, depth: usize, size: usize) -> Self {
        (self.m.connections, self.m.depth, self.m.size) = (connections, depth, size);
        self
    }

    /// What was counted over `seconds` of measurement.
    pub fn counted(mut self, tally: Tally, seconds: f64) -> Self {
        self.m.seconds = seconds;
        self.m.requests = tally.requests;
        self.m.errors = tally.errors;
        self.m.first_error = tally.first_error;
        self.bytes = tally.bytes;
        self
    }

    /// Latency from a merged histogram, which the measurement keeps (for --processes).
    pub fn histogram(mut self, h: Histogram<u64>) -> Self {
        self.m.latency_us = Latency::of(&h);
        self.m.histogram = Some(h);
        self
    }

    /// Latency figures another tool gave (wrk), with why any is missing.
    pub fn latency(mut self, l: Latency, note: Option<String>) -> Self {
        self.m.latency_us = l;
        self.m.latency_note = note;
        self
    }

    pub fn server_cpu(mut self, cpu: CpuUse) -> Self {
        self.m.server_cpu = cpu.threads;
        self.m.server_cpu_seconds = cpu.seconds;
        self
    }

    /// The server CPU was read over `seconds` of the clients' common measuring time.
    pub fn cpu_window(mut self, seconds: f64) -> Self {
        self.cpu_window = Some(seconds);
        self
    }

    pub fn idle(mut self, idle: Option<IdleReport>) -> Self {
        self.m.idle = idle;
        self
    }

    pub fn fanout(mut self, f: Option<fanout::FanoutReport>) -> Self {
        self.m.fanout = f;
        self
    }

    pub fn memory(mut self, m: Option<MemoryReport>) -> Self {
        self.m.memory = m;
        self
    }

    pub fn server_processes(mut self, k: usize) -> Self {
        self.m.server_processes = k.max(1);
        self
    }

    pub fn client_processes(mut self, n: usize) -> Self {
        self.m.client_processes = n.max(1);
        self
    }

    /// Every connection was ready `seconds` after the first connect.
    pub fn connected_in(mut self, seconds: Option<f64>) -> Self {
        self.m.connect_seconds = seconds;
        self
    }

    pub fn build(self) -> Measurement {
        let mut m = self.m;
        let seconds = m.seconds.max(1e-9);
        m.requests_per_second = m.requests as f64 / seconds;
        m.megabytes_per_second = self.bytes / seconds / 1e6;
        m.per_core_throughput =
            m.server_cpu_seconds
                .filter(|&s| s > 0.0)
                .map(|s| match self.cpu_window {
                    Some(w) => m.requests_per_second * w / s,
                    None => m.requests as f64 / s,
                });
        m.connects_per_second = m
            .connect_seconds
            .filter(|&s| s > 0.0)
            .map(|s| m.connections as f64 / s);
        if let Some(f) = &mut m.fanout {
            // The servers' CPU over the window of publishes, per million deliveries made in it.
            f.server_cpu_seconds_per_million_deliveries = m
                .server_cpu_seconds
                .filter(|_| f.delivered > 0)
                .map(|s| s / f.delivered as f64 * 1e6);
        }
        m
    }
}

/// Everything a JSON report records. What the bench does not know about a server it did not
/// start (`--target`) is left out rather than filled with the bench's own defaults.
#[derive(Debug, Serialize)]
pub struct Report {
    pub version: &'static str,
    pub commit: Option<String>,
    pub kernel: String,
    pub cpu_model: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_shards: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cores: Option<String>,
    pub client_cores: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_quota_percent: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trigger: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    pub runs: Vec<Measurement>,
    pub summary: Option<serde_json::Value>,
}

impl Report {
    /// The facts of this host and of the server `args` describes.
    pub fn new(
        args: &BenchArgs,
        runs: Vec<Measurement>,
        summary: Option<serde_json::Value>,
    ) -> Report {
        let (server_shards, server_cores, quota, trigger, config) = if args.spawns() {
            let config = match &args.config {
                Some(p) => std::fs::read_to_string(p).ok(),
                None => Some(spawn::generated_config(args, args.shards)),
            };
            (
                // A sweep runs several shard counts: each run's label and the summary name them.
                args.sweep_shards.is_none().then_some(args.shards),
                Some(args.server_cores.clone()),
                args.server_quota,
                args.trigger.map(|t| format!("{t:?}").to_lowercase()),
                config,
            )
        } else {
            (stats_shards(args), None, None, None, None)
        };
        Report {
            version: env!("CARGO_PKG_VERSION"),
            commit: procfs::git_commit(),
            kernel: procfs::kernel(),
            cpu_model: procfs::cpu_model(),
            server_shards,
            server_cores,
            client_cores: args.client_cores.clone(),
            server_quota_percent: quota,
            trigger,
            config,
            runs,
            summary,
        }
    }
}

/// A running server's shard count from its `/stats`: at `--admin`, else at an HTTP `--target`
/// (when that listener serves the admin routes).
fn stats_shards(args: &BenchArgs) -> Option<usize> {
    let addr = args
        .admin
        .or_else(|| args.target.filter(|_| args.listener() == "http"))?;
    let body = fanout::http_get(addr, "/stats")?;
    let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    v.get("shards")?.as_u64().map(|n| n as usize)
}

/// Writes the JSON report to `--json` (or `default`, when given and `--json` is not).
pub fn write_json(
    args: &BenchArgs,
    runs: Vec<Measurement>,
    summary: Option<serde_json::Value>,
    path: Option<&Path>,
) -> anyhow::Result<()> {
    let Some(path) = args.json.as_deref().or(path) else {
        return Ok(());
    };
    let report = Report::new(args, runs, summary);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("report written to {}", path.display());
    Ok(())
}

/// The results table (one row per run), with each run's details below its row. Idle runs
/// measure memory, not throughput: they print their idle report only.
pub fn print_table(runs: &[Measurement]) {
    let (idle, load): (Vec<&Measurement>, Vec<&Measurement>) =
        runs.iter().partition(|m| m.mode == Mode::Idle);
    if !load.is_empty() {
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
    }
    for m in load {
        let l = &m.latency_us;
        println!(
            "{:<16} {:>6} {:>5} {:>6} {:>12.0} {:>9.1} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>12} {:>14}",
            m.label,
            m.connections,
            m.depth,
            m.size,
            m.requests_per_second,
            m.megabytes_per_second,
            us(l.p50),
            us(l.p90),
            us(l.p99),
            us(l.p999),
            us(l.max),
            m.errors,
            // `+ 0.0`: an empty sum is -0.0.
            m.server_cpu_seconds
                .map_or("-".into(), |s| format!("{:.2}", s + 0.0)),
            m.per_core_throughput
                .map_or("-".into(), |t| format!("{t:.0}")),
        );
        print_details(m);
    }
    for m in idle {
        print_idle(m);
        print_details(m);
    }
}

fn print_idle(m: &Measurement) {
    let Some(i) = &m.idle else { return };
    println!(
        "{}: idle: {} connections held {:.1}s{}; {} of them answered a final probe; {} errors ({} client and {} server process{})",
        m.label,
        i.connections,
        i.held_seconds,
        connect_note(m),
        i.verified,
        m.errors,
        m.client_processes,
        m.server_processes,
        if m.server_processes == 1 { "" } else { "es" }
    );
}

/// `, opened in 12.3 s (81,300/s)` when the connect time is known.
fn connect_note(m: &Measurement) -> String {
    match (m.connect_seconds, m.connects_per_second) {
        (Some(s), Some(r)) => format!(", opened in {s:.1}s ({r:.0}/s)"),
        _ => String::new(),
    }
}

fn print_details(m: &Measurement) {
    if m.mode != Mode::Idle && m.connect_seconds.is_some() {
        println!(
            "    {} connections{} from {} client process{} to {} server process{}",
            m.connections,
            connect_note(m),
            m.client_processes,
            if m.client_processes == 1 { "" } else { "es" },
            m.server_processes,
            if m.server_processes == 1 { "" } else { "es" }
        );
    }
    if let Some(mem) = &m.memory {
        for line in mem.lines() {
            println!("    {line}");
        }
    }
    if !m.server_cpu.is_empty() {
        let per: Vec<String> = m
            .server_cpu
            .iter()
            .map(|(n, s)| format!("{n}={s:.2}s"))
            .collect();
        println!("    server CPU per thread: {}", per.join(" "));
    }
    if let Some(note) = &m.latency_note {
        println!("    latency n/a: {note}");
    }
    if let Some(f) = &m.fanout {
        let window = m.seconds.max(1e-9);
        println!(
            "    fan-out: {} subscribers x {} publishes ({:.1}/s) = {} deliveries expected: {} delivered ({:.0}/s), {} lost ({} gaps, {} never arrived), {} dropped by the server, {} publish errors; server CPU {} per million deliveries",
            f.subscribers,
            f.published,
            f.published as f64 / window,
            f.expected,
            f.delivered,
            f.delivered as f64 / window,
            f.lost,
            f.gaps,
            f.tail_missing,
            f.dropped_by_server
                .map_or("unknown".into(), |d| d.to_string()),
            f.publish_errors,
            f.server_cpu_seconds_per_million_deliveries
                .map_or("unknown".into(), |s| format!("{s:.2} s")),
        );
    }
    if let Some(e) = &m.first_error {
        println!("    first error: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> BenchArgs {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            bench: BenchArgs,
        }
        let mut argv = vec!["bench"];
        argv.extend_from_slice(extra);
        Cli::parse_from(argv).bench
    }

    #[test]
    fn builder_derives_rates_and_the_per_core_figure() {
        let mut h = histogram();
        for v in [10, 20, 30, 40] {
            h.record(v).unwrap();
        }
        let mut tally = Tally {
            requests: 1000,
            bytes: 2e6,
            ..Tally::default()
        };
        tally.fail(0, || "not an error".into());
        tally.fail(2, || "first".into());
        tally.fail(1, || "second".into());
        let m = Measurement::builder("x", &args(&["-c", "7"]))
            .counted(tally, 2.0)
            .histogram(h)
            .server_cpu(CpuUse {
                threads: vec![("shard-00".into(), 0.5)],
                seconds: Some(0.5),
                window: 2.0,
            })
            .build();
        assert_eq!(m.connections, 7);
        assert_eq!(m.requests_per_second, 500.0);
        assert_eq!(m.megabytes_per_second, 1.0);
        assert_eq!(m.per_core_throughput, Some(2000.0));
        assert_eq!((m.errors, m.first_error.as_deref()), (2 + 1, Some("first")));
        assert_eq!(m.latency_us.max, Some(40));
        // Client processes: the server's CPU was read over a window of its own.
        let m = Measurement::builder("x", &args(&[]))
            .counted(
                Tally {
                    requests: 1000,
                    ..Tally::default()
                },
                2.0,
            )
            .server_cpu(CpuUse {
                threads: Vec::new(),
                seconds: Some(0.5),
                window: 1.0,
            })
            .cpu_window(1.0)
            .build();
        assert_eq!(m.per_core_throughput, Some(1000.0));
        assert_eq!(m.latency_us.p99, None, "no samples: no figure");
    }

    #[test]
    fn connect_rate_and_fanout_cpu_per_million_deliveries() {
        let f = fanout::FanoutReport::new(&[], 0, 0, 0);
        let m = Measurement::builder("x", &args(&["-c", "1000"]))
            .connected_in(Some(0.5))
            .server_cpu(CpuUse {
                threads: Vec::new(),
                seconds: Some(3.0),
                window: 1.0,
            })
            .fanout(Some(fanout::FanoutReport {
                delivered: 2_000_000,
                ..f
            }))
            .build();
        assert_eq!(m.connects_per_second, Some(2000.0));
        let per = m.fanout.unwrap().server_cpu_seconds_per_million_deliveries;
        assert_eq!(per, Some(1.5));
    }

    #[test]
    fn a_target_report_leaves_out_what_the_bench_does_not_know() {
        let a = args(&["--target", "127.0.0.1:1"]);
        let r = serde_json::to_value(Report::new(&a, Vec::new(), None)).unwrap();
        for key in ["server_shards", "server_cores", "config", "trigger"] {
            assert!(r.get(key).is_none(), "{key} in {r}");
        }
        let a = args(&["--spawn", "--shards", "2", "--server-cores", "0,1"]);
        let r = serde_json::to_value(Report::new(&a, Vec::new(), None)).unwrap();
        assert_eq!(r["server_shards"], 2);
        assert_eq!(r["server_cores"], "0,1");
        assert!(r["config"].as_str().unwrap().contains("shards = 2"));
    }
}
