//! One measured run against one server (or a group sharing a port): connect every connection
//! (at most [`CONNECTING_AHEAD`] ahead of those ready), wait until they are ready, start the
//! load on all of them at once ([`ClientCmd::Start`]), warm up, reset the counters, measure for
//! `--duration`, collect every client shard's results and hand them to the [`Measurement`]
//! builder. The servers' memory is read before the connections open and while they are held
//! ([`super::memory`]); idle connections answer a final probe each; fan-out's window is the
//! publishes after the warm-up's, by sequence number. Connect mode (a thread per client, a new
//! connection per request) has its own loop here; `--wrk` and `--processes` are delegated to
//! their modules.
//!
//! Runs on the controller thread; the client shards run on their own pinned threads and answer
//! its commands (reset, collect) over their command channels.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::args::{parse_cores, parse_sources, BenchArgs};
use super::client::{Client, ClientCmd, Mode, Payload, ShardResult};
use super::memory::Snapshot;
use super::report::{histogram, CpuMeter, IdleReport, Measurement, MemoryReport, Tally};
use super::{fanout, multi, wrk};
use crate::server::{Limits, OffloadSpec, PoolSpec, ShardPool, TlsSpec, Tuning};

/// Connections the bench opens ahead of those ready (connected, upgraded, TLS handshake done).
pub const CONNECTING_AHEAD: usize = 1024;

/// Set in --processes' children: no progress bar of their own.
pub(super) static CHILD: AtomicBool = AtomicBool::new(false);

/// Asks every client shard for a copy of its results (each answers within 5 s or is left out).
fn collect(peers: &crate::server::Peers<ClientCmd>) -> Vec<ShardResult> {
    collect_within(peers, Duration::from_secs(5))
}

/// [`collect`], waiting at most `within` for all the answers.
fn collect_within(peers: &crate::server::Peers<ClientCmd>, within: Duration) -> Vec<ShardResult> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let n = peers.broadcast(ClientCmd::Collect(tx));
    let deadline = Instant::now() + within;
    (0..n)
        .filter_map(|_| {
            rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .ok()
        })
        .collect()
}

/// The server(s) a run loads, and what the bench knows of them.
#[derive(Debug, Clone)]
pub struct Servers {
    /// Where the load connects (with several server processes: their shared port).
    pub target: SocketAddr,
    /// The server processes' pids; empty when unknown (a `--target` without `--server-pid`):
    /// then there are no CPU or user memory figures.
    pub pids: Vec<u32>,
    /// Fan-out: where each publish is posted: one HTTP listener per server process, or only
    /// the first process's with a broker (which carries each publish to every process).
    pub publish: Vec<SocketAddr>,
    /// Every server process's own HTTP listener, where its counters are read.
    pub admin: Vec<SocketAddr>,
}

impl Servers {
    /// One server process at `target`.
    pub fn one(target: SocketAddr, pid: Option<u32>) -> Servers {
        Servers {
            target,
            pids: pid.into_iter().collect(),
            publish: vec![target],
            admin: vec![target],
        }
    }

    /// How many server processes the run loads (one when they are not known).
    pub fn processes(&self) -> usize {
        self.pids.len().max(1)
    }
}

/// A `--processes` child: tells the parent its connections are up, then waits for its `go`
/// (every child warms up and measures over the same window).
fn child_handshake() {
    use std::io::{BufRead, Write};
    println!("ready");
    let _ = std::io::stdout().flush();
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
}

/// A fan-out child: waits for the parent's `done LAST` (the last publish's sequence number).
fn child_wait_done() -> anyhow::Result<u64> {
    use std::io::BufRead;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    line.trim()
        .strip_prefix("done ")
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("expected `done N` from the parent, got {:?}", line.trim()))
}

/// Asks every client shard to probe its idle connections and waits (bounded) for the answers;
/// returns how many answered.
fn verify_idle(peers: &crate::server::Peers<ClientCmd>, connections: usize) -> u64 {
    let (tx, rx) = crossbeam_channel::unbounded();
    let n = peers.broadcast(ClientCmd::Verify(tx));
    // Generous bounds: at a million connections on two cores every client process probes at
    // once, and a probe costs the kernel's whole loopback path on both sides (measured: 500,000
    // probes answer within the old 30 s, 1,000,000 did not). The loop ends as soon as every
    // probe is answered.
    let sent: u64 = (0..n)
        .filter_map(|_| rx.recv_timeout(Duration::from_secs(60)).ok())
        .sum();
    let want = sent.min(connections as u64);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let verified: u64 = collect(peers).iter().map(|r| r.verified).sum();
        if verified >= want || Instant::now() > deadline {
            return verified;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One run against `servers`: connect, warm up, measure, collect.
pub fn measure(args: &BenchArgs, servers: &Servers, label: &str) -> anyhow::Result<Measurement> {
    let child = args.child_report.is_some();
    if args.processes.unwrap_or(1) > 1 && !child {
        return multi::measure(args, servers, label);
    }
    let (target, pids) = (servers.target, &servers.pids[..]);
    if args.mode == Mode::Connect {
        return measure_connect(args, target, pids, label);
    }
    if args.wrk {
        if args.mode != Mode::Http {
            bail!("--wrk drives HTTP load only (--mode http)");
        }
        return wrk::measure(args, target, pids, label);
    }
    let client_cores = parse_cores(&args.client_cores)?;
    let sources = match &args.source_addrs {
        Some(s) => parse_sources(s)?,
        None => Vec::new(),
    };
    let mut plan = args.plan(&target.to_string());
    plan.tokens = super::tokens::from_args(args)?.into();
    let plan = Arc::new(plan);
    let shards = client_cores.len().max(1);
    // Connections are adopted as "listener 0": with --tls, that one speaks TLS.
    let tls = args
        .tls_connector(true)?
        .map(|c| TlsSpec::client(c, Duration::from_secs(10)));
    let spec = PoolSpec {
        tls: vec![tls],
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
        offload: OffloadSpec::default(),
    };
    let p = plan.clone();
    let (mut pool, peers) = ShardPool::start(&spec, move |info, peers| {
        Client::new(p.clone(), &info, peers)
    })
    .context("cannot start the client shards")?;

    let memory_before = (!child).then(|| Snapshot::take(pids));
    let connect_start = Instant::now();
    // How many connections are ready (WebSocket upgrades done, TLS handshakes done); fails at
    // the first error, and at a failed TLS handshake (which never reaches the client service:
    // the engine counts it).
    let ready_now = || -> anyhow::Result<usize> {
        let results = collect(&peers);
        if let Some(e) = results.iter().find_map(|r| r.first_error.clone()) {
            bail!("{label}: {e}");
        }
        let t = pool.stats().snapshot().total();
        if t.tls_handshake_failures + t.tls_handshake_timeouts > 0 {
            bail!(
                "{label}: {} TLS handshakes failed and {} timed out; one more, to see why: {}",
                t.tls_handshake_failures,
                t.tls_handshake_timeouts,
                tls_diagnosis(args, target)
            );
        }
        Ok(results.iter().map(|r| r.ready as usize).sum())
    };
    // Waits (bounded: 60 s without reaching `n`) until `n` connections are ready.
    let wait_ready = |n: usize| -> anyhow::Result<usize> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = ready_now()?;
            if ready >= n {
                return Ok(ready);
            }
            if Instant::now() > deadline {
                bail!(
                    "{label}: only {ready} of {} connections became ready within 60 s",
                    args.connections
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    let mut ready = 0;
    for i in 0..args.connections {
        // At most CONNECTING_AHEAD connections still connecting: a burst of thousands of TLS
        // handshakes or upgrades overflows the server's accept queue while its core is busy
        // with the first ones, and a connection whose handshake ACK was dropped there waits
        // for the kernel's retransmissions, long past any deadline.
        if i - ready >= CONNECTING_AHEAD {
            ready = wait_ready(i + 1 - CONNECTING_AHEAD)?;
        }
        let src = (!sources.is_empty()).then(|| sources[i % sources.len()]);
        let fd = crate::sys::socket::connect_from(target, src, Duration::from_secs(5))
            .with_context(|| {
                format!(
                    "connection {} of {} to {target}{} failed",
                    i + 1,
                    args.connections,
                    src.map_or(String::new(), |s| format!(" from {s}"))
                )
            })?;
        if !pool.adopt(i % shards, fd, 0) {
            bail!("a client shard does not take connections");
        }
    }
    wait_ready(args.connections)?;
    let connect_seconds = connect_start.elapsed().as_secs_f64();
    if child {
        child_handshake();
    }
    peers.broadcast(ClientCmd::Start);

    let fanout_mode = args.mode == Mode::Fanout;
    let window_after = plan.window_after;
    // Fan-out: every subscriber is in: what they cost is read now, before the publishes.
    let mut memory_held = None;
    if fanout_mode && !child {
        memory_held = Some(Snapshot::take(pids));
    }
    let bar = progress(args.warmup + args.duration, label);
    let mut publisher = None;
    if fanout_mode && !child {
        let p = fanout::Publisher::start(
            servers.publish.clone(),
            plan.topic.clone(),
            fanout::Pace {
                rate: args.rate.unwrap_or(1000.0),
                limit: args.publishes.map(|n| window_after + n),
            },
            (args.payload == Payload::Json).then_some(args.size),
        );
        // The warm-up is the publishes up to `window_after` (the window is a sequence range).
        let within = args.warmup * 2 + Duration::from_secs(30);
        if !p.wait_for(window_after, within) {
            bail!("{label}: the publisher did not reach publish {window_after} within {within:?}");
        }
        publisher = Some(p);
    } else if !fanout_mode {
        sleep_with(&bar, args.warmup);
        peers.broadcast(ClientCmd::Reset);
    }
    let cpu = CpuMeter::start(pids);
    let t0 = Instant::now();
    let mut window = None;
    if let Some(p) = publisher {
        match args.publishes {
            Some(n) => {
                let rate = args.rate.unwrap_or(1000.0).max(0.001);
                let within = Duration::from_secs_f64(n as f64 / rate) + Duration::from_secs(30);
                if !p.wait_for(window_after + n, within) {
                    eprintln!("{label}: {n} publishes did not go out within {within:?}");
                }
            }
            None => sleep_with(&bar, args.duration),
        }
        let (last, publish_errors) = p.stop()?;
        window = Some((last, publish_errors, t0.elapsed().as_secs_f64()));
        fanout::settle(|| collect(&peers), shards, window_after, last, label, false);
    } else if fanout_mode {
        // A fan-out child: the parent publishes, then says which was the last.
        let last = child_wait_done()?;
        window = Some((last, 0, 0.0));
        fanout::settle(|| collect(&peers), shards, window_after, last, label, true);
    } else {
        sleep_with(&bar, args.duration / 2);
        if !child {
            memory_held = Some(Snapshot::take(pids));
        }
        sleep_with(&bar, args.duration - args.duration / 2);
    }
    peers.broadcast(ClientCmd::Stop);
    let cpu = cpu.stop();
    let verified = (args.mode == Mode::Idle).then(|| verify_idle(&peers, args.connections));
    // A shard with a backlog of answers to read (an overloaded run) may take a while to get to
    // the command; its results still count.
    let results = collect_within(&peers, Duration::from_secs(30));
    bar.finish_and_clear();
    pool.shutdown();

    let mut hist = histogram();
    let mut tally = Tally::default();
    let mut closed = 0;
    for r in &results {
        hist.add(&r.hist).expect("same bounds");
        tally.requests += r.requests;
        tally.bytes += r.bytes as f64;
        tally.fail(r.errors, || r.first_error.clone().unwrap_or_default());
        closed += r.closed;
    }
    if results.len() < shards {
        tally.fail(1, || "a client shard did not report".into());
    }
    // Fan-out rates are over the window of publishes; the wait for the backlog is not in it.
    let seconds = window.map_or(cpu.window, |w| w.2);
    let fanout = window.map(|(last, publish_errors, _)| fanout::FanoutReport {
        dropped_by_server: (!child)
            .then(|| fanout::servers_dropped(&servers.admin))
            .flatten(),
        ..fanout::FanoutReport::new(&results, window_after, last, publish_errors)
    });
    if let Some(f) = &fanout {
        tally.fail(f.publish_errors, || "a publish failed".into());
        // A lost message is an error unless the server counted it (slow_consumer = "drop"); a
        // child cannot tell, its parent (which reads the servers' counts) judges.
        if !child {
            fanout::fail_uncounted(&mut tally, f);
        }
        tally.fail(closed, || format!("the server closed {closed} subscribers"));
    }
    let idle = verified.map(|verified| {
        tally.fail(closed, || {
            format!("the server closed {closed} idle connections")
        });
        let silent = (args.connections as u64).saturating_sub(verified + closed);
        tally.fail(silent, || {
            format!("{silent} idle connections did not answer their final probe")
        });
        IdleReport {
            connections: args.connections,
            held_seconds: seconds,
            verified,
        }
    });
    let memory = memory_before
        .zip(memory_held)
        .map(|(b, h)| MemoryReport::new(args.connections, servers.processes(), &b, &h, true));
    Ok(Measurement::builder(label, args)
        .counted(tally, seconds)
        .histogram(hist)
        .server_cpu(cpu)
        .idle(idle)
        .fanout(fanout)
        .memory(memory)
        .server_processes(servers.processes())
        .connected_in(Some(connect_seconds))
        .build())
}

/// Why a TLS handshake with `target` fails: one blocking handshake with the same settings.
fn tls_diagnosis(args: &BenchArgs, target: SocketAddr) -> String {
    let attempt = || -> anyhow::Result<()> {
        let connector = args.tls_connector(false)?.context("--tls is off")?;
        let tcp = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
        tcp.set_write_timeout(Some(Duration::from_secs(5)))?;
        let conn = rustls::ClientConnection::new(connector.config(), connector.name().clone())?;
        let mut s = rustls::StreamOwned::new(conn, tcp);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock)?;
        }
        Ok(())
    };
    match attempt() {
        Ok(()) => "it succeeded (a transient failure?)".into(),
        Err(e) => format!("{e:#}"),
    }
}

/// A plain or a TLS stream, for connect mode.
trait ReadWrite: std::io::Read + std::io::Write {}
impl<T: std::io::Read + std::io::Write> ReadWrite for T {}

/// Connection churn: each client thread connects, sends one HTTP request (or, with --upgrade or
/// tokens, a WebSocket upgrade carrying the next token), reads the answer and closes, as fast
/// as it can (with --tls, after a full TLS handshake).
fn measure_connect(
    args: &BenchArgs,
    target: SocketAddr,
    pids: &[u32],
    label: &str,
) -> anyhow::Result<Measurement> {
    use std::io::{Read, Write};
    let cores = parse_cores(&args.client_cores)?;
    let threads = args.connections.clamp(1, 64);
    let upgrade = args.upgrade || args.has_tokens();
    let default_path = if upgrade { "/ws" } else { "/plaintext" };
    let path = args.path.clone().unwrap_or_else(|| default_path.into());
    let host = target.to_string();
    let tokens = super::tokens::from_args(args)?;
    // Every request prepared before the clock starts: connection n of thread i sends
    // requests[(n * threads + i) % len].
    let requests: Arc<[String]> = if upgrade {
        let each = |t: Option<&str>| {
            super::tokens::upgrade_request(&path, &host, t, args.token_in_query, "")
        };
        if tokens.is_empty() {
            vec![each(None)].into()
        } else {
            tokens.iter().map(|t| each(Some(t))).collect()
        }
    } else {
        vec![format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )]
        .into()
    };
    let ok_status: &'static [u8] = if upgrade {
        b"HTTP/1.1 101"
    } else {
        b"HTTP/1.1 200"
    };
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    // --tls: a full handshake per connection, which is what this mode measures.
    let tls = args.tls_connector(false)?;
    let bar = progress(args.warmup + args.duration, label);
    let mut cpu = None;
    let results: Vec<(hdrhistogram::Histogram<u64>, Tally)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let (stop, measuring, requests) =
                    (stop.clone(), measuring.clone(), requests.clone());
                let tls = tls.clone();
                let core = cores.get(i % cores.len().max(1)).copied();
                scope.spawn(move || {
                    if let Some(c) = core {
                        crate::sys::affinity::pin_current(c);
                    }
                    let mut h = histogram();
                    let mut tally = Tally::default();
                    let mut buf = [0u8; 4096];
                    let mut n = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        let request = &requests[(n * threads + i) % requests.len()];
                        n += 1;
                        let start = Instant::now();
                        // Ok(None): the expected answer; Ok(Some(line)): another status line.
                        let r = (|| -> std::io::Result<Option<String>> {
                            let s = std::net::TcpStream::connect_timeout(
                                &target,
                                Duration::from_secs(5),
                            )?;
                            s.set_read_timeout(Some(Duration::from_secs(5)))?;
                            s.set_write_timeout(Some(Duration::from_secs(5)))?;
                            let mut s: Box<dyn ReadWrite> = match &tls {
                                None => Box::new(s),
                                Some(c) => {
                                    let conn =
                                        rustls::ClientConnection::new(c.config(), c.name().clone())
                                            .map_err(std::io::Error::other)?;
                                    Box::new(rustls::StreamOwned::new(conn, s))
                                }
                            };
                            s.write_all(request.as_bytes())?;
                            let mut got = Vec::new();
                            loop {
                                let k = match s.read(&mut buf) {
                                    // A TLS server may close without close_notify after
                                    // `Connection: close`; the answer is complete anyway.
                                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
                                    r => r?,
                                };
                                if k == 0 {
                                    break;
                                }
                                got.extend_from_slice(&buf[..k]);
                                // An upgraded connection stays open: its answer ends with the
                                // head.
                                if upgrade && got.windows(4).any(|w| w == b"\r\n\r\n") {
                                    break;
                                }
                            }
                            if got.starts_with(ok_status) {
                                return Ok(None);
                            }
                            let line = got.split(|b| *b == b'\r').next().unwrap_or(&[]);
                            Ok(Some(String::from_utf8_lossy(line).into_owned()))
                        })();
                        if !measuring.load(Ordering::Relaxed) {
                            continue;
                        }
                        match r {
                            Ok(None) => {
                                tally.requests += 1;
                                let _ = h.record(start.elapsed().as_micros().max(1) as u64);
                            }
                            Ok(Some(line)) => tally.fail(1, || format!("answered `{line}`")),
                            Err(e) => tally.fail(1, || format!("connect/request failed: {e}")),
                        }
                    }
                    (h, tally)
                })
            })
            .collect();
        sleep_with(&bar, args.warmup);
        cpu = Some(CpuMeter::start(pids));
        measuring.store(true, Ordering::Relaxed);
        sleep_with(&bar, args.duration);
        stop.store(true, Ordering::Relaxed);
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });
    let cpu = cpu.expect("set before the threads stop").stop();
    bar.finish_and_clear();
    let mut hist = histogram();
    let mut tally = Tally::default();
    for (h, t) in results {
        hist.add(&h).expect("same bounds");
        tally.requests += t.requests;
        tally.fail(t.errors, || t.first_error.unwrap_or_default());
    }
    let seconds = cpu.window;
    Ok(Measurement::builder(label, args)
        .shape(threads, 1, 0)
        .counted(tally, seconds)
        .histogram(hist)
        .server_cpu(cpu)
        .build())
}

fn progress(total: Duration, label: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() || CHILD.load(Ordering::Relaxed) {
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
