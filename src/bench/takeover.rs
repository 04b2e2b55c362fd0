//! `shardnet bench --takeover --spawn`: what a hand-over costs, end to end.
//!
//! The bench starts a shardnet with a control socket (pinned like any spawned server), opens
//! `-c` idle echo connections and `--probes` busy ones that run echo round trips back to back
//! throughout, then asks for an upgrade (`shardnet upgrade`'s request) to a new process with
//! `--takeover-shards` shards. It reports the hand-over's time from the new process's counters
//! (hello to commit; first batch to commit, the pause a moved connection sees at most, and that
//! per connection), the longest probe round trip (the worst pause a busy client saw), and
//! checks that every idle connection still echoes afterwards: a lost one fails the run.
//!
//! Runs on the controller thread, with one thread per probe. The server processes are its
//! children (the new one a child of the old, stopped by pid at the end).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;

use super::args::BenchArgs;
use super::spawn;
use crate::server::handover;

/// The run's figures (also written with --json).
#[derive(Debug, Clone, serde::Serialize)]
pub struct TakeoverReport {
    pub connections: usize,
    pub old_shards: usize,
    pub new_shards: usize,
    /// Connections the new process took (from its counters).
    pub moved: u64,
    /// The new process's hello to its commit.
    pub handover_ms: f64,
    /// The first batch received to the commit.
    pub moving_ms: f64,
    pub micros_per_connection: f64,
    /// From the upgrade request to its answer (includes starting the new process).
    pub upgrade_ms: f64,
    pub probe_round_trips: u64,
    pub longest_round_trip_ms: f64,
    pub p99_round_trip_us: u64,
    /// Idle connections that did not echo after the hand-over.
    pub lost: usize,
    pub probe_errors: u64,
}

struct ProbeResult {
    histogram: Histogram<u64>,
    longest: Duration,
    errors: u64,
    first_error: Option<String>,
}

/// Back-to-back echo round trips until `stop`.
fn probe(addr: SocketAddr, size: usize, stop: &AtomicBool) -> ProbeResult {
    let mut r = ProbeResult {
        histogram: Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
        longest: Duration::ZERO,
        errors: 0,
        first_error: None,
    };
    let fail = |r: &mut ProbeResult, e: String| {
        r.errors += 1;
        r.first_error.get_or_insert(e);
    };
    let mut s = match TcpStream::connect(addr) {
        Ok(s) => s,
        Err(e) => {
            fail(&mut r, e.to_string());
            return r;
        }
    };
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let data = vec![b'p'; size.max(1)];
    let mut back = vec![0u8; data.len()];
    while !stop.load(Relaxed) {
        let t = Instant::now();
        if let Err(e) = s.write_all(&data).and_then(|()| s.read_exact(&mut back)) {
            fail(&mut r, e.to_string());
            return r;
        }
        let rtt = t.elapsed();
        r.longest = r.longest.max(rtt);
        let _ = r.histogram.record((rtt.as_micros() as u64).max(1));
        if back != data {
            fail(&mut r, "the echo differs".into());
            return r;
        }
    }
    r
}

fn config(shards: usize, control: &Path) -> String {
    format!(
        "[server]\nshards = {shards}\npin = true\nstats_interval = \"0s\"\nshutdown_timeout = \"5s\"\n\
         control_socket = \"{}\"\n\n[limits]\nidle_timeout = \"0s\"\n\n\
         [[listener]]\nname = \"echo\"\naddr = \"127.0.0.1:0\"\nservice = \"echo\"\nbacklog = 65535\n\n\
         [[listener]]\nname = \"admin\"\naddr = \"127.0.0.1:0\"\nservice = \"http\"\n",
        control.display()
    )
}

/// `/stats` of the server behind `admin`.
fn stats(admin: SocketAddr) -> anyhow::Result<serde_json::Value> {
    let mut s = TcpStream::connect(admin).context("the admin listener")?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET /stats HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
    let mut text = Vec::new();
    s.read_to_end(&mut text)?;
    let body = text
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| &text[i + 4..])
        .context("no HTTP body in /stats")?;
    serde_json::from_slice(body).context("/stats is not JSON")
}

/// One small echo on `s`; false if the connection is gone or answers wrong.
fn still_echoes(s: &mut TcpStream) -> bool {
    s.write_all(b"?").is_ok() && {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).is_ok() && b == *b"?"
    }
}

/// A private directory for the configurations and the control socket, removed on drop.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The server the upgrade started (a child of the old one): stopped by pid when the run ends.
struct Stop(u32);

impl Drop for Stop {
    fn drop(&mut self) {
        let alive = || super::procfs::alive(self.0);
        for sig in [libc::SIGTERM, libc::SIGKILL] {
            if !alive() || crate::sys::process::signal(self.0, sig).is_err() {
                return;
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while alive() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Runs the takeover bench; the exit code is 1 if a connection was lost or a probe failed.
pub fn run(args: &BenchArgs) -> anyhow::Result<i32> {
    if !args.spawn {
        bail!("--takeover needs --spawn: the bench starts the server it hands over");
    }
    let old_shards = args.shards.max(1);
    let new_shards = args.takeover_shards.unwrap_or(old_shards).max(1);
    let dir = Dir(std::env::temp_dir().join(format!("shardnet-bench-ho-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0)?;
    let control = dir.0.join("ctl.sock");
    let (old_config, new_config) = (dir.0.join("old.toml"), dir.0.join("new.toml"));
    std::fs::write(&old_config, config(old_shards, &control))?;
    std::fs::write(&new_config, config(new_shards, &control))?;
    let mut old = spawn::shardnet_with_config(args, &old_config)?;
    let (echo, admin) = (old.addr("echo")?, old.addr("admin")?);

    eprintln!(
        "takeover bench: opening {} idle connections",
        args.connections
    );
    let mut idle = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let mut s = TcpStream::connect(echo)
            .with_context(|| format!("idle connection {i} of {}", args.connections))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        if !still_echoes(&mut s) {
            bail!("idle connection {i} does not echo before the hand-over");
        }
        idle.push(s);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let probes: Vec<_> = (0..args.probes)
        .map(|_| {
            let stop = stop.clone();
            let size = args.size;
            std::thread::spawn(move || probe(echo, size, &stop))
        })
        .collect();
    std::thread::sleep(args.warmup);

    eprintln!(
        "takeover bench: upgrade to a {new_shards}-shard process ({} idle, {} probes)",
        args.connections, args.probes
    );
    let asked = Instant::now();
    let outcome = handover::control_request(&control, Some(&new_config), Duration::from_secs(120));
    let upgrade = asked.elapsed();
    // Probes carry on against the new process for a moment, then stop.
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Relaxed);
    let results: Vec<ProbeResult> = probes
        .into_iter()
        .map(|p| p.join().expect("a probe thread"))
        .collect();
    let message = outcome.context("the upgrade failed")?;
    let status = old.wait_exit(Duration::from_secs(20));
    let s = stats(admin)?;
    let new_pid = s["pid"].as_u64().context("no pid in /stats")? as u32;
    let _stop = Stop(new_pid);
    match status {
        Some(st) if st.success() => {}
        other => bail!("the old process did not exit 0 after the hand-over: {other:?}"),
    }
    let lost = idle.iter_mut().map(still_echoes).filter(|ok| !ok).count();
    // Closed before the new server is stopped, so its drain does not wait for them.
    drop(idle);

    let moved = s["handover"]["taken"]
        .as_u64()
        .filter(|&t| t == 1)
        .and(s["total"]["received"].as_u64())
        .context("the new process reports no takeover")?;
    let micros = |k: &str| s["handover"][k].as_u64().unwrap_or(0) as f64;
    let (handover_us, moving_us) = (micros("last_micros"), micros("last_moving_micros"));
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    let mut longest = Duration::ZERO;
    let mut probe_errors = 0;
    for r in &results {
        let _ = all.add(&r.histogram);
        longest = longest.max(r.longest);
        probe_errors += r.errors;
        if let Some(e) = &r.first_error {
            eprintln!("takeover bench: a probe failed: {e}");
        }
    }
    let report = TakeoverReport {
        connections: args.connections,
        old_shards,
        new_shards,
        moved,
        handover_ms: handover_us / 1e3,
        moving_ms: moving_us / 1e3,
        micros_per_connection: if moved > 0 {
            moving_us / moved as f64
        } else {
            0.0
        },
        upgrade_ms: upgrade.as_secs_f64() * 1e3,
        probe_round_trips: all.len(),
        longest_round_trip_ms: longest.as_secs_f64() * 1e3,
        p99_round_trip_us: all.value_at_quantile(0.99),
        lost,
        probe_errors,
    };
    println!("{message}");
    println!(
        "takeover: {} connections ({} idle + {} probes), {} -> {} shards",
        report.moved, report.connections, args.probes, old_shards, new_shards
    );
    println!(
        "  hand-over, hello to commit:           {:>9.2} ms",
        report.handover_ms
    );
    println!(
        "  first batch to commit:                {:>9.2} ms  = {:.2} us per connection (goal <= 5 us)",
        report.moving_ms, report.micros_per_connection
    );
    println!(
        "  upgrade request to answer:            {:>9.2} ms  (starting the new process included)",
        report.upgrade_ms
    );
    println!(
        "  longest echo round trip (probes):     {:>9.2} ms  (goal <= 50 ms); p99 {} us over {} round trips",
        report.longest_round_trip_ms, report.p99_round_trip_us, report.probe_round_trips
    );
    println!("  connections lost:                     {:>9}", report.lost);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(if lost == 0 && probe_errors == 0 { 0 } else { 1 })
}

/// Processes that took over in a --takeover-all run: not this bench's children (their parents,
/// the old processes, have exited), so they are stopped by pid on drop, and their control
/// sockets removed.
#[derive(Debug, Default)]
pub struct Adopted {
    pids: Vec<u32>,
    sockets: Vec<PathBuf>,
}

impl Drop for Adopted {
    fn drop(&mut self) {
        for &pid in &self.pids {
            let _ = crate::sys::process::signal(pid, libc::SIGKILL);
        }
        // SIGKILL is only a request: wait (at most 2 s) until each has died, so that no server
        // is left when the bench exits.
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.pids.iter().any(|&p| super::procfs::alive(p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        for p in &self.sockets {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// `--takeover-all`: hands each of the `k` spawned server processes over to a new process, one
/// after another (over the control socket each was given, as `shardnet upgrade` does), and says
/// how long each took. A hand-over that fails ends the run.
pub fn hand_over_all(k: usize, label: &str) -> anyhow::Result<Adopted> {
    let mut adopted = Adopted::default();
    let mut took = Vec::with_capacity(k);
    let (mut moved, mut kept) = (0u64, 0u64);
    let started = Instant::now();
    for i in 0..k {
        let t = Instant::now();
        let socket = spawn::control_path(i);
        adopted.sockets.push(socket.clone());
        let message = handover::control_request(&socket, None, Duration::from_secs(120))
            .with_context(|| {
                format!("{label}: the hand-over of server process {} of {k}", i + 1)
            })?;
        took.push(t.elapsed());
        let (pid, m, kp) = parse_handed_over(&message)
            .with_context(|| format!("{label}: unexpected hand-over answer: {message}"))?;
        adopted.pids.push(pid);
        moved += m;
        kept += kp;
    }
    took.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    eprintln!(
        "{label}: takeover-all: {k} of {k} server processes handed over one after another in \
         {:.0} ms ({moved} connections moved, {kept} kept; each from the request to its answer: \
         median {:.0} ms, max {:.0} ms)",
        ms(started.elapsed()),
        ms(took[took.len() / 2]),
        ms(took[took.len() - 1]),
    );
    Ok(adopted)
}

/// `handed over to pid P: N connections moved, K kept ...` → (P, N, K).
fn parse_handed_over(message: &str) -> Option<(u32, u64, u64)> {
    let rest = message.strip_prefix("handed over to pid ")?;
    let (pid, rest) = rest.split_once(':')?;
    let mut words = rest.split_whitespace();
    let moved = words.next()?.parse().ok()?;
    let kept = words
        .skip_while(|w| !w.starts_with("moved"))
        .nth(1)?
        .parse()
        .ok()?;
    Some((pid.trim().parse().ok()?, moved, kept))
}

#[cfg(test)]
mod tests {
    #[test]
    fn handed_over_answers_parse() {
        assert_eq!(
            super::parse_handed_over("handed over to pid 42: 1500 connections moved, 3 kept (x)"),
            Some((42, 1500, 3))
        );
        assert_eq!(super::parse_handed_over("refused"), None);
    }
}
