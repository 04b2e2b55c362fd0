//! Fan-out mode's publisher: one keep-alive HTTP connection per server process that POSTs
//! `/publish/{topic}` at a fixed rate (open loop: each message carries its intended send time on
//! CLOCK_MONOTONIC, so a publisher or server that falls behind shows up as delivery latency, and
//! subscribers in other processes read the same clock), and the servers' own count of messages
//! they dropped for slow subscribers, read from `/metrics`.
//!
//! Several server processes (`--server-processes`) share no pub/sub state: a publish reaches
//! the subscribers of the process that receives it only. So every publish is posted to every
//! process, at its own HTTP listener; a subscriber receives it from the process it is
//! connected to.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::client::ShardResult;

/// What a fan-out run adds to the report. The measured window is a range of sequence numbers:
/// the publishes after the warm-up (`published` of them). Every count below is of deliveries of
/// those publishes only, so `delivered + lost = expected = subscribers x published`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FanoutReport {
    pub subscribers: u64,
    /// Publishes during the measured window.
    pub published: u64,
    pub publish_errors: u64,
    /// subscribers x published.
    pub expected: u64,
    /// Deliveries of the measured publishes that arrived.
    pub delivered: u64,
    /// Deliveries that did not: gaps in a subscriber's sequence, plus the tail it had not
    /// received when deliveries stopped (nothing new for 5 s after the last publish).
    pub lost: u64,
    pub gaps: u64,
    pub tail_missing: u64,
    /// The servers' `shardnet_ws_dropped_total` (None when /metrics is not served there).
    pub dropped_by_server: Option<u64>,
    /// Server CPU-seconds (all processes, the window of publishes) per million deliveries.
    pub server_cpu_seconds_per_million_deliveries: Option<f64>,
}

impl FanoutReport {
    /// The accounting of the window of publishes `first + 1 ..= last`, from the client shards'
    /// results (collected after [`settle`]).
    pub fn new(results: &[ShardResult], first: u64, last: u64, publish_errors: u64) -> Self {
        let subscribers = results
            .iter()
            .map(|r| r.last_seqs.len() as u64)
            .sum::<u64>();
        let published = last.saturating_sub(first);
        let gaps: u64 = results.iter().map(|r| r.gaps).sum();
        let tail_missing = tail_missing(results, first, last);
        FanoutReport {
            subscribers,
            published,
            publish_errors,
            expected: subscribers * published,
            delivered: results.iter().map(|r| r.requests).sum(),
            lost: gaps + tail_missing,
            gaps,
            tail_missing,
            dropped_by_server: None,
            server_cpu_seconds_per_million_deliveries: None,
        }
    }

    /// The accounting of client processes added up (each saw the same publishes).
    pub fn merge(parts: &[FanoutReport], publish_errors: u64) -> FanoutReport {
        let sum = |f: fn(&FanoutReport) -> u64| parts.iter().map(f).sum::<u64>();
        FanoutReport {
            subscribers: sum(|p| p.subscribers),
            published: parts.iter().map(|p| p.published).max().unwrap_or(0),
            publish_errors,
            expected: sum(|p| p.expected),
            delivered: sum(|p| p.delivered),
            lost: sum(|p| p.lost),
            gaps: sum(|p| p.gaps),
            tail_missing: sum(|p| p.tail_missing),
            dropped_by_server: None,
            server_cpu_seconds_per_million_deliveries: None,
        }
    }
}

/// Counts the lost messages the servers did not count as dropped (slow_consumer = "drop") as
/// errors: those are bugs, not policy.
pub fn fail_uncounted(tally: &mut super::report::Tally, f: &FanoutReport) {
    let uncounted = f.lost.saturating_sub(f.dropped_by_server.unwrap_or(0));
    tally.fail(uncounted, || {
        format!("{uncounted} messages lost that the server did not count as dropped")
    });
}

/// Deliveries of the publishes `first + 1 ..= last` that some subscriber has not received yet:
/// everything after the last sequence number it saw (subscribers see messages in order).
pub fn tail_missing(results: &[ShardResult], first: u64, last: u64) -> u64 {
    results
        .iter()
        .flat_map(|r| r.last_seqs.iter())
        .map(|&seen| last.saturating_sub(seen.max(first)))
        .sum()
}

/// How long nothing may arrive before what is missing counts as lost ([`settle`]), in a client
/// process that has all the subscribers of the run.
const QUIET: Duration = Duration::from_secs(5);
/// The longest the backlog is waited for. A client process of several ([`settle`]'s `quiet`)
/// waits this long for its share whatever arrives meanwhile: it sees only its share, and a
/// server's delivery pass visits subscribers in the order they subscribed, so the subscribers of
/// a client shard that subscribed first get a message that came during a pass only in the next
/// one; at a million subscribers over 56 server processes on two cores a pass takes tens of
/// seconds of wall time, and such a share gets nothing meanwhile while the others do.
const SETTLE_MAX: Duration = Duration::from_secs(120);

/// After the last publish (`last`), waits for the backlog to arrive: until every subscriber has
/// it, or (in the process that has all the subscribers) nothing arrived for [`QUIET`], at most
/// [`SETTLE_MAX`]; what is missing then is lost. The quiet period also covers TCP retransmission backoff: an
/// overloaded receiver's kernel drops segments when its socket memory runs out
/// (TcpExtTCPRcvQDrop) and the sender retries after 0.2, 0.4, 0.8, ... s.
/// `collect` asks every client shard for its results; `shards` is how many must answer. The
/// measured window is the publishes after `first`; the line printed counts those only, like the
/// report. `quiet` (a client process of several): only what is missing is printed, the parent
/// prints the summary. Returns how long the backlog took.
pub fn settle(
    collect: impl Fn() -> Vec<ShardResult>,
    shards: usize,
    first: u64,
    last: u64,
    label: &str,
    quiet: bool,
) -> Duration {
    let start = Instant::now();
    let deadline = start + SETTLE_MAX;
    let quiet_for = if quiet { SETTLE_MAX } else { QUIET };
    let (mut before, mut still_since) = (u64::MAX, Instant::now());
    let (missing, r) = loop {
        let r = collect();
        if r.len() < shards {
            // A client shard too busy to answer within the collect timeout: still working.
            still_since = Instant::now();
        } else {
            let missing = tail_missing(&r, first, last);
            if missing != before {
                (before, still_since) = (missing, Instant::now());
            }
            if missing == 0 || still_since.elapsed() > quiet_for {
                break (missing, r);
            }
        }
        if Instant::now() > deadline {
            eprintln!(
                "{label}: the backlog did not settle within {} s",
                SETTLE_MAX.as_secs()
            );
            return start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut lag: Vec<u64> = r
        .iter()
        .flat_map(|x| {
            x.last_seqs
                .iter()
                .map(|&s| last.saturating_sub(s.max(first)))
        })
        .filter(|&d| d > 0)
        .collect();
    lag.sort_unstable();
    if let (Some(min), Some(max)) = (lag.first(), lag.last()) {
        eprintln!(
            "{label}: {} subscribers incomplete, missing from {min} to {max} messages (median {})",
            lag.len(),
            lag[lag.len() / 2]
        );
    }
    let subscribers = r.iter().map(|x| x.last_seqs.len() as u64).sum::<u64>();
    if !quiet {
        backlog_line(
            label,
            start.elapsed(),
            missing,
            subscribers * last.saturating_sub(first),
        );
    }
    start.elapsed()
}

/// The summary of a backlog: how long it took and what did not arrive.
pub fn backlog_line(label: &str, took: Duration, missing: u64, expected: u64) {
    eprintln!(
        "{label}: backlog after the last publish: {:.1} s; {missing} of the {expected} deliveries of the measured publishes not arrived{}",
        took.as_secs_f64(),
        if missing == 0 {
            ""
        } else {
            " (nothing more arrived in time)"
        }
    );
}

pub struct Publisher {
    stop: Arc<AtomicBool>,
    seq: Arc<AtomicU64>,
    thread: JoinHandle<anyhow::Result<u64>>,
}

impl Publisher {
    /// Starts publishing `rate` messages per second on `topic`, each one to every HTTP listener
    /// of `targets` (one per server process); after publish `limit`, if given, it stops. With
    /// `pad_to`, each message is padded with JSON quote records to about that many bytes.
    pub fn start(
        targets: Vec<SocketAddr>,
        topic: String,
        pace: Pace,
        pad_to: Option<usize>,
    ) -> Publisher {
        let stop = Arc::new(AtomicBool::new(false));
        let seq = Arc::new(AtomicU64::new(0));
        let (st, sq) = (stop.clone(), seq.clone());
        let thread = std::thread::Builder::new()
            .name("publisher".into())
            .spawn(move || publish_loop(&targets, &topic, pace, pad_to, &st, &sq))
            .expect("spawn the publisher thread");
        Publisher { stop, seq, thread }
    }

    /// The sequence number of the last publish written (to every target).
    pub fn published(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }

    /// Whether publishing has ended (the limit reached, or an error).
    pub fn finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Waits (at most `within`) until publish `seq` has been written or publishing ended;
    /// false on timeout.
    pub fn wait_for(&self, seq: u64, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while self.published() < seq && !self.finished() {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }

    /// Stops; returns the last sequence number and the publish errors (0 or 1: the first
    /// error ends publishing and is reported).
    pub fn stop(self) -> anyhow::Result<(u64, u64)> {
        self.stop.store(true, Ordering::Release);
        let last = self.seq.load(Ordering::Acquire);
        match self.thread.join() {
            Ok(Ok(n)) => Ok((n, 0)),
            Ok(Err(e)) => {
                eprintln!("publisher: {e:#}");
                Ok((last, 1))
            }
            Err(_) => bail!("the publisher thread panicked"),
        }
    }
}

/// How long after the last publish every answer must have come (a server process among a
/// hundred on two cores, writing a publish to ten thousand subscribers, takes seconds).
const ANSWER_WAIT: Duration = Duration::from_secs(30);

/// One target's connection and the thread that checks its answers.
struct Outlet {
    stream: TcpStream,
    answered: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
    reader: JoinHandle<anyhow::Result<()>>,
}

impl Outlet {
    fn open(target: SocketAddr) -> anyhow::Result<Outlet> {
        let s = TcpStream::connect_timeout(&target, Duration::from_secs(5))
            .with_context(|| format!("publisher cannot connect to {target}"))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        // Open loop: publishes are written on schedule whatever the server answers (pipelined
        // on one keep-alive connection); the reader thread checks every answer.
        let mut reader = s.try_clone()?;
        let answered = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let (a, d) = (answered.clone(), done.clone());
        let reader = std::thread::Builder::new()
            .name("publish-answers".into())
            .spawn(move || -> anyhow::Result<()> {
                let mut buf = Vec::with_capacity(4096);
                while !d.load(Ordering::Acquire) {
                    match read_response(&mut reader, &mut buf) {
                        Ok(_) => {
                            a.fetch_add(1, Ordering::AcqRel);
                        }
                        // A server busy writing a publish to its subscribers may answer late
                        // (a million of them on two cores: seconds); `finish` bounds the wait
                        // for the last answers. What was read so far stays in `buf`.
                        Err(e) if is_timeout(&e) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            })?;
        Ok(Outlet {
            stream: s,
            answered,
            done,
            reader,
        })
    }

    /// Waits (until `deadline`) for the answers to `k` publishes, then closes.
    fn finish(self, k: u64, target: SocketAddr, deadline: Instant) -> anyhow::Result<()> {
        while self.answered.load(Ordering::Acquire) < k && !self.reader.is_finished() {
            if Instant::now() > deadline {
                // The reader stops at its next read timeout.
                self.done.store(true, Ordering::Release);
                let _ = self.stream.shutdown(std::net::Shutdown::Both);
                bail!(
                    "{} of {k} publishes to {target} unanswered",
                    k - self.answered.load(Ordering::Acquire)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.done.store(true, Ordering::Release);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        match self.reader.join() {
            Ok(Err(e)) if self.answered.load(Ordering::Acquire) < k => {
                Err(e.context(format!("publishing to {target}")))
            }
            Err(_) => bail!("the publish reader panicked"),
            _ => Ok(()),
        }
    }
}

/// How fast and how many: publishes per second, and the last one (`None`: until stopped).
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    pub rate: f64,
    pub limit: Option<u64>,
}

/// The body of publish `k` intended at `t` microseconds: `{"seq":K,"t":T}`, padded to about
/// `pad_to` bytes with `"quotes":[...]` (the subscribers read `seq` and `t` only).
fn publish_body(k: u64, t: u64, pad_to: Option<usize>, body: &mut Vec<u8>) {
    use std::io::Write as _;
    body.clear();
    let _ = write!(body, r#"{{"seq":{k},"t":{t}"#);
    if let Some(size) = pad_to {
        body.extend_from_slice(br#","quotes":["#);
        let room = size.saturating_sub(body.len() + 2);
        super::client::json_records(body, k, room);
        body.push(b']');
    }
    body.push(b'}');
}

fn publish_loop(
    targets: &[SocketAddr],
    topic: &str,
    pace: Pace,
    pad_to: Option<usize>,
    stop: &AtomicBool,
    seq: &AtomicU64,
) -> anyhow::Result<u64> {
    let Pace { rate, limit } = pace;
    let rate = rate.max(0.001);
    let mut outlets = targets
        .iter()
        .map(|&t| Outlet::open(t))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // Intended times on CLOCK_MONOTONIC: the clock origin every subscriber process shares.
    let (start, start_micros) = (Instant::now(), crate::sys::process::monotonic_micros());
    let mut k: u64 = 0;
    let mut body = Vec::new();
    let mut req = Vec::new();
    while !stop.load(Ordering::Acquire) && limit.is_none_or(|n| k < n) {
        let offset = Duration::from_secs_f64(k as f64 / rate);
        let intended = start + offset;
        // Sleep in slices, so a stop is seen within 100 ms at a slow rate.
        let now = Instant::now();
        if intended > now {
            std::thread::sleep((intended - now).min(Duration::from_millis(100)));
            continue;
        }
        if outlets.iter().any(|o| o.reader.is_finished()) {
            break;
        }
        k += 1;
        let t = start_micros + offset.as_micros() as u64;
        publish_body(k, t, pad_to, &mut body);
        for (o, target) in outlets.iter_mut().zip(targets) {
            req.clear();
            let _ = write!(
                req,
                "POST /publish/{topic} HTTP/1.1\r\nHost: {target}\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            req.extend_from_slice(&body);
            o.stream
                .write_all(&req)
                .with_context(|| format!("publisher: write to {target} failed"))?;
        }
        seq.store(k, Ordering::Release);
    }
    // Every publish must be answered with 200 by every target, within ANSWER_WAIT of the last.
    let deadline = Instant::now() + ANSWER_WAIT;
    for (o, &target) in outlets.into_iter().zip(targets) {
        o.finish(k, target, deadline)?;
    }
    Ok(k)
}

/// Whether `e` is a socket read timing out (nothing came within the read timeout).
fn is_timeout(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>().is_some_and(|e| {
        matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        )
    })
}

/// Reads one response with a Content-Length body; fails on a status other than 200.
fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<Vec<u8>> {
    let mut chunk = [0u8; 4096];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut resp = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(h) = resp.parse(buf)? {
            let len = resp
                .headers
                .iter()
                .find(|x| x.name.eq_ignore_ascii_case("content-length"))
                .and_then(|x| {
                    std::str::from_utf8(x.value)
                        .ok()?
                        .trim()
                        .parse::<usize>()
                        .ok()
                })
                .context("response without Content-Length")?;
            let code = resp.code.unwrap_or(0);
            if buf.len() >= h + len {
                let body = buf[h..h + len].to_vec();
                buf.drain(..h + len);
                if code != 200 {
                    bail!("HTTP {code}: {}", String::from_utf8_lossy(&body).trim());
                }
                return Ok(body);
            }
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            bail!("the server closed the connection");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The body of `GET path` at the HTTP listener `target` (None on any failure or a status other
/// than 200).
pub fn http_get(target: SocketAddr, path: &str) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .ok()?;
    read_response(&mut s, &mut Vec::new()).ok()
}

/// Sum of `shardnet_ws_dropped_total` over the shards of every server at `targets` (their
/// /metrics); `None` if none of them serves it.
pub fn servers_dropped(targets: &[SocketAddr]) -> Option<u64> {
    targets
        .iter()
        .filter_map(|&t| server_dropped(t))
        .reduce(|a, b| a + b)
}

/// Sum of `shardnet_ws_dropped_total` over shards, from the server's /metrics on `target`.
pub fn server_dropped(target: SocketAddr) -> Option<u64> {
    let body = http_get(target, "/metrics")?;
    let text = String::from_utf8_lossy(&body);
    let mut found = false;
    let mut sum = 0.0;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("shardnet_ws_dropped_total") {
            found = true;
            sum += rest
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
        }
    }
    found.then_some(sum as u64)
}
