//! `--processes N`: the load spread over N client processes, for connection counts past one
//! process's descriptor limit (RLIMIT_NOFILE binds at about 20k here, 1M on a tuned host).
//!
//! The parent starts N copies of this binary's `bench` against the server(s), each with its
//! share of the connections and of the open-loop rate, and every source address (rotated, so
//! the connections spread evenly over them whatever N is). The children start one after
//! another, each once the previous one has its connections up, so that connection setup does
//! not overflow the servers' accept queues (somaxconn) with parallel bursts; each prints
//! `ready`, waits for `go`, and writes its measurement, with its latency histogram serialised,
//! to a file. The parent reads the servers' CPU and memory from /proc while every child is
//! measuring, and merges: requests and bytes add up, histograms merge exactly, fan-out and idle
//! accounting add up.
//!
//! Fan-out: the children are subscribers only; the parent publishes (to every server process)
//! and, once it has stopped, tells each child the last sequence number (`done N`), so each
//! child waits for exactly the publishes that were made.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base64::Engine;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;

use super::args::{parse_sources, BenchArgs};
use super::client::Mode;
use super::fanout::{self, FanoutReport};
use super::memory::Snapshot;
use super::report::{histogram, CpuMeter, IdleReport, Measurement, MemoryReport, Tally};
use super::run::Servers;

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
    /// Idle: connections that answered the final probe.
    pub verified: Option<u64>,
    /// Fan-out: this child's subscribers' accounting.
    pub fanout: Option<FanoutReport>,
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

impl ChildProc {
    /// Writes one line to the child's stdin.
    fn say(&mut self, line: &str) -> anyhow::Result<()> {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().context("no stdin")?;
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|_| stdin.flush())
            .context("cannot talk to a client process")
    }

    /// Waits (until `deadline`) for the child to exit; kills it past that.
    fn wait_until(&mut self, deadline: Instant) -> anyhow::Result<std::process::ExitStatus> {
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return Ok(self.child.wait()?);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
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

/// Runs the load from `args.processes` client processes against `servers`.
pub fn measure(args: &BenchArgs, servers: &Servers, label: &str) -> anyhow::Result<Measurement> {
    let n = args.processes.unwrap_or(1).max(1);
    if args.wrk || args.mode == Mode::Connect {
        bail!("--processes spreads echo, http, ws, idle and fanout loads (not connect or --wrk)");
    }
    if args.connections < n {
        bail!("--processes {n} needs at least {n} connections");
    }
    let (target, pids) = (servers.target, &servers.pids[..]);
    let sources = match &args.source_addrs {
        Some(s) => parse_sources(s)?,
        None => Vec::new(),
    };
    // One topic for every child (and the publisher here).
    let topic = args
        .topic
        .clone()
        .unwrap_or_else(|| format!("bench-{}", std::process::id()));
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let memory_before = Snapshot::take(pids);
    let connect_start = Instant::now();
    let mut children = Vec::new();
    let mut offset = 0;
    for i in 0..n {
        let count = share(args.connections, i, n);
        let report =
            std::env::temp_dir().join(format!("shardnet-bench-{}-{i}.json", std::process::id()));
        let mut cmd = Command::new(&exe);
        crate::sys::process::die_with_parent(&mut cmd);
        cmd.arg("bench")
            .arg("--target")
            .arg(target.to_string())
            .arg("--mode")
            .arg(format!("{:?}", args.mode).to_lowercase())
            .arg("-c")
            .arg(count.to_string())
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
            .arg("--topic")
            .arg(&topic)
            .arg("--child-report")
            .arg(&report);
        if let Some(p) = &args.path {
            cmd.arg("--path").arg(p);
        }
        if let Some(r) = args.rate {
            // Fan-out children only need the rate to agree on the warm-up's publishes.
            let r = if args.mode == Mode::Fanout {
                r
            } else {
                r / n as f64
            };
            cmd.arg("--rate").arg(r.to_string());
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
        // Every source address, rotated to where the previous child's connections ended, so
        // that every address carries the same number of connections.
        if !sources.is_empty() {
            let k = sources.len();
            let mine: Vec<String> = (0..k)
                .map(|j| sources[(offset + j) % k].to_string())
                .collect();
            cmd.arg("--source-addrs").arg(mine.join(","));
            offset = (offset + count) % k;
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
    let connect_seconds = connect_start.elapsed().as_secs_f64();
    // Every child ready: now all start together.
    for c in children.iter_mut() {
        c.say("go")?;
    }
    let memory_held;
    let mut published = None;
    // --takeover-all: the processes that took over, stopped by pid once the children are done.
    let mut adopted = None;
    let cpu;
    if args.mode == Mode::Fanout {
        // Every subscriber is in: what they cost is read before the publishes.
        memory_held = Snapshot::take(pids);
        let rate = args.rate.unwrap_or(1000.0).max(0.001);
        let window_after = args.fanout_window_after();
        let p = fanout::Publisher::start(
            servers.publish.clone(),
            topic.clone(),
            fanout::Pace {
                rate,
                limit: args.publishes.map(|k| window_after + k),
            },
            (args.payload == super::client::Payload::Json).then_some(args.size),
        );
        let within = args.warmup * 2 + Duration::from_secs(30);
        if !p.wait_for(window_after, within) {
            bail!("{label}: the publisher did not reach publish {window_after} within {within:?}");
        }
        let meter = CpuMeter::start(pids);
        let t0 = Instant::now();
        match args.publishes {
            Some(k) => {
                let within = Duration::from_secs_f64(k as f64 / rate) + Duration::from_secs(30);
                if !p.wait_for(window_after + k, within) {
                    eprintln!("{label}: {k} publishes did not go out within {within:?}");
                }
            }
            None => std::thread::sleep(args.duration),
        }
        let (last, errors) = p.stop()?;
        let seconds = t0.elapsed().as_secs_f64();
        for c in children.iter_mut() {
            c.say(&format!("done {last}"))?;
        }
        cpu = meter.stop();
        published = Some((errors, seconds, Instant::now()));
    } else {
        // Every child now warms up, then measures for `duration`: read the servers then.
        std::thread::sleep(args.warmup + Duration::from_millis(100));
        let meter = CpuMeter::start(pids);
        std::thread::sleep(args.duration / 2);
        memory_held = Snapshot::take(pids);
        let left = args
            .duration
            .saturating_sub(args.duration / 2 + Duration::from_millis(100));
        if args.takeover_all {
            // The processes measured are about to be replaced: their CPU is read now.
            cpu = meter.stop();
            let t = Instant::now();
            adopted = Some(super::takeover::hand_over_all(servers.processes(), label)?);
            if t.elapsed() > left {
                eprintln!(
                    "{label}: the hand-overs took longer than the rest of --duration: the \
                     final probe may have started before they ended (give a longer --duration)"
                );
            }
        } else {
            std::thread::sleep(left);
            cpu = meter.stop();
        }
    }

    let mut hist = histogram();
    let mut tally = Tally::default();
    let mut seconds = 0f64;
    let mut verified = 0;
    let mut fanouts = Vec::new();
    // A child settles a fan-out backlog (at most 120 s) or probes its idle connections (40 s).
    // The children's own bounds after the window (idle: the final probe, up to 180 s) fit in it.
    let deadline = Instant::now() + args.warmup + args.duration + Duration::from_secs(240);
    for (i, c) in children.iter_mut().enumerate() {
        let status = c.wait_until(deadline)?;
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
        verified += r.verified.unwrap_or(0);
        fanouts.extend(r.fanout);
        tally.fail(r.errors, || r.first_error.clone().unwrap_or_default());
        if !status.success() && r.errors == 0 {
            tally.fail(1, || format!("client process {} failed", i + 1));
        }
    }
    drop(adopted);
    let fanout = published.map(|(errors, window, done)| {
        seconds = window;
        let mut f = FanoutReport::merge(&fanouts, errors);
        // Every child has settled (exited): the backlog took at most this long.
        fanout::backlog_line(label, done.elapsed(), f.tail_missing, f.expected);
        f.dropped_by_server = fanout::servers_dropped(&servers.admin);
        tally.fail(errors, || "a publish failed".into());
        fanout::fail_uncounted(&mut tally, &f);
        f
    });
    let idle = (args.mode == Mode::Idle).then_some(IdleReport {
        connections: args.connections,
        held_seconds: seconds,
        verified,
    });
    let memory = MemoryReport::new(
        args.connections,
        servers.processes(),
        &memory_before,
        &memory_held,
        true,
    );
    // The CPU window is the parent's view of the children's common measuring time.
    let window = cpu.window;
    Ok(Measurement::builder(label, args)
        .counted(tally, seconds)
        .histogram(hist)
        .server_cpu(cpu)
        .cpu_window(window)
        .idle(idle)
        .fanout(fanout)
        .memory(Some(memory))
        .server_processes(servers.processes())
        .client_processes(n)
        .connected_in(Some(connect_seconds))
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
