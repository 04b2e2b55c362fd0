//! `--processes N`: the load spread over N client processes, for connection counts past one
//! process's descriptor limit (RLIMIT_NOFILE binds at about 20k here, 1M on a tuned host).
//!
//! The parent starts the server (with `--spawn`), then N copies of this binary's `bench` against
//! it, each with its share of the connections, of the open-loop rate and of the source addresses.
//! Each child prints `ready` once its connections are up and writes its measurement, with its
//! latency histogram serialised, to a file; the parent reads the server's CPU and RSS from /proc
//! while every child is measuring, and merges: requests and bytes add up, histograms merge
//! exactly, and the idle report divides the RSS growth by the total connections.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base64::Engine;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;

use super::args::{parse_sources, BenchArgs};
use super::client::Mode;
use super::procfs;
use super::report::{histogram, CpuMeter, IdleReport, Measurement, Tally};

/// What a child writes for the parent.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct ChildReport {
    pub requests: u64,
    pub seconds: f64,
    pub bytes: f64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// V2-serialised hdrhistogram, base64.
    pub histogram: String,
}

pub fn encode_histogram(h: &Histogram<u64>) -> String {
    let mut buf = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut buf)
        .expect("serialising to memory");
    base64::engine::general_purpose::STANDARD.encode(buf)
}

fn decode_histogram(s: &str) -> anyhow::Result<Histogram<u64>> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(s)?;
    Deserializer::new()
        .deserialize(&mut &bytes[..])
        .map_err(|e| anyhow::anyhow!("bad histogram from a client process: {e:?}"))
}

/// A child's share of a total: as even as possible.
fn share(total: usize, i: usize, n: usize) -> usize {
    total / n + usize::from(i < total % n)
}

struct ChildProc {
    child: Child,
    report: PathBuf,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.report);
    }
}

/// Waits (bounded) for a child's `ready` line.
fn wait_ready(c: &mut ChildProc, i: usize, label: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.lines.recv_timeout(left.max(Duration::from_millis(1))) {
            Ok(l) if l.trim() == "ready" => return Ok(()),
            Ok(_) => {}
            Err(_) => {
                let status = c.child.try_wait()?;
                bail!(
                    "{label}: client process {} did not get its connections up ({})",
                    i + 1,
                    status.map_or("still running".into(), |s| s.to_string())
                );
            }
        }
    }
}

/// Runs the load from `args.processes` client processes against `target`.
pub fn measure(
    args: &BenchArgs,
    target: SocketAddr,
    pid: Option<u32>,
    label: &str,
) -> anyhow::Result<Measurement> {
    let n = args.processes.max(1);
    if args.wrk || matches!(args.mode, Mode::Connect | Mode::Fanout) {
        bail!("--processes spreads echo, http, ws and idle loads (not connect, fanout or --wrk)");
    }
    if args.connections < n {
        bail!("--processes {n} needs at least {n} connections");
    }
    let sources = match &args.source_addrs {
        Some(s) => parse_sources(s)?,
        None => Vec::new(),
    };
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let rss_before = pid.and_then(procfs::rss_bytes);
    let mut children = Vec::new();
    for i in 0..n {
        let report =
            std::env::temp_dir().join(format!("shardnet-bench-{}-{i}.json", std::process::id()));
        let mut cmd = Command::new(&exe);
        cmd.arg("bench")
            .arg("--target")
            .arg(target.to_string())
            .arg("--mode")
            .arg(format!("{:?}", args.mode).to_lowercase())
            .arg("-c")
            .arg(share(args.connections, i, n).to_string())
            .arg("-d")
            .arg(args.depth.to_string())
            .arg("-s")
            .arg(args.size.to_string())
            .arg("--duration")
            .arg(format!("{}ms", args.duration.as_millis()))
            .arg("--warmup")
            .arg(format!("{}ms", args.warmup.as_millis()))
            .arg("--client-cores")
            .arg(&args.client_cores)
            .arg("--child-report")
            .arg(&report);
        if let Some(p) = &args.path {
            cmd.arg("--path").arg(p);
        }
        if let Some(r) = args.rate {
            cmd.arg("--rate").arg((r / n as f64).to_string());
        }
        if args.idle_ws {
            cmd.arg("--idle-ws");
        }
        // Tokens: each child mints its own share, with subjects of their own.
        if let Some(t) = &args.token {
            cmd.arg("--token").arg(t);
        }
        if let Some(f) = &args.token_file {
            cmd.arg("--token-file").arg(f);
        }
        if let Some(m) = &args.mint {
            let first: usize = (0..i).map(|j| share(args.connections, j, n)).sum();
            cmd.arg("--mint")
                .arg(m)
                .arg("--mint-first")
                .arg(first.to_string());
        }
        if let Some(c) = &args.mint_claims {
            cmd.arg("--mint-claims").arg(c);
        }
        if args.token_in_query {
            cmd.arg("--token-in-query");
        }
        if args.deflate {
            cmd.arg("--deflate");
        }
        if args.payload == super::client::Payload::Json {
            cmd.arg("--payload").arg("json");
        }
        if let (true, Some(ca)) = (args.tls, &args.tls_ca) {
            cmd.arg("--tls")
                .arg("--tls-ca")
                .arg(ca)
                .arg("--tls-name")
                .arg(&args.tls_name);
        }
        // Source addresses dealt out: child i takes every n-th one.
        let mine: Vec<String> = sources
            .iter()
            .skip(i)
            .step_by(n)
            .map(|a| a.to_string())
            .collect();
        if !mine.is_empty() {
            cmd.arg("--source-addrs").arg(mine.join(","));
        } else if !sources.is_empty() {
            bail!("--processes {n} needs at least {n} source addresses");
        }
        let (tx, rx) = std::sync::mpsc::channel();
        // Owned by the guard from here on: any early return stops it.
        let mut c = ChildProc {
            child: cmd
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .context("cannot start a client process")?,
            report,
            lines: rx,
        };
        let out = c.child.stdout.take().expect("piped");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        wait_ready(&mut c, i, label)?;
        children.push(c);
    }
    // Every child ready: they were started one after another (below), each once the previous
    // one had its connections up, so that connection setup does not overflow the server's
    // accept queue (somaxconn) with parallel bursts. Now all start together.
    for c in children.iter_mut() {
        if let Some(stdin) = c.child.stdin.as_mut() {
            use std::io::Write;
            stdin
                .write_all(b"go\n")
                .and_then(|_| stdin.flush())
                .context("cannot start a client process's measurement")?;
        }
    }
    // Every child now warms up, then measures for `duration`: read the server in that window.
    std::thread::sleep(args.warmup + Duration::from_millis(100));
    let cpu = CpuMeter::start(pid);
    std::thread::sleep(args.duration / 2);
    let rss_held = pid.and_then(procfs::rss_bytes);
    std::thread::sleep(
        args.duration
            .saturating_sub(args.duration / 2 + Duration::from_millis(100)),
    );
    let cpu = cpu.stop();

    let mut hist = histogram();
    let mut tally = Tally::default();
    let mut seconds = 0f64;
    for (i, c) in children.iter_mut().enumerate() {
        let status = c.child.wait()?;
        let text = std::fs::read_to_string(&c.report).with_context(|| {
            format!(
                "{label}: client process {} wrote no report ({status})",
                i + 1
            )
        })?;
        let r: ChildReport = serde_json::from_str(&text)?;
        hist.add(decode_histogram(&r.histogram)?)
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        tally.requests += r.requests;
        tally.bytes += r.bytes;
        seconds = f64::max(seconds, r.seconds);
        tally.fail(r.errors, || r.first_error.clone().unwrap_or_default());
        if !status.success() && r.errors == 0 {
            tally.fail(1, || format!("client process {} failed", i + 1));
        }
    }
    let idle = (args.mode == Mode::Idle)
        .then(|| IdleReport::new(args.connections, seconds, rss_before, rss_held));
    // The CPU window is the parent's view of the children's common measuring time.
    let window = cpu.window;
    Ok(Measurement::builder(label, args)
        .counted(tally, seconds)
        .histogram(hist)
        .server_cpu(cpu)
        .cpu_window(window)
        .idle(idle)
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up() {
        for total in [7, 100, 15_001] {
            for n in 1..6 {
                assert_eq!((0..n).map(|i| share(total, i, n)).sum::<usize>(), total);
            }
        }
    }

    #[test]
    fn histogram_round_trip() {
        let mut h = histogram();
        for v in [1, 50, 999, 123_456] {
            h.record(v).unwrap();
        }
        let back = decode_histogram(&encode_histogram(&h)).unwrap();
        assert_eq!(back.len(), 4);
        assert_eq!(back.max(), h.max());
    }
}
