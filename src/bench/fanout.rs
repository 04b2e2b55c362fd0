//! Fan-out mode's publisher: one keep-alive HTTP connection that POSTs `/publish/{topic}` at a
//! fixed rate (open loop: each message carries its intended send time, so a publisher or server
//! that falls behind shows up as delivery latency), and the server's own count of messages it
//! dropped for slow subscribers, read from `/metrics`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::client::ShardResult;

/// What a fan-out run adds to the report. The measured window is a range of sequence numbers:
/// the publishes after the warm-up (`published` of them). Every count below is of deliveries of
/// those publishes only, so `delivered + lost = expected = subscribers x published`.
#[derive(Debug, Clone, serde::Serialize)]
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
    /// The server's `shardnet_ws_dropped_total` (None when /metrics is not served there).
    pub dropped_by_server: Option<u64>,
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
        }
    }
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

/// After the last publish (`last`), waits for the backlog to arrive: until every subscriber has
/// it, or nothing arrived for 5 s (what is missing then is lost), at most 60 s. The quiet period
/// covers TCP retransmission backoff: an overloaded receiver's kernel drops segments when its
/// socket memory runs out (TcpExtTCPRcvQDrop) and the sender retries after 0.2, 0.4, 0.8, ... s.
/// `collect` asks every client shard for its results; `shards` is how many must answer. The
/// measured window is the publishes after `first`; the line printed counts those only, like the
/// report.
pub fn settle(
    collect: impl Fn() -> Vec<ShardResult>,
    shards: usize,
    first: u64,
    last: u64,
    label: &str,
) {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(60);
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
            if missing == 0 || still_since.elapsed() > Duration::from_secs(5) {
                break (missing, r);
            }
        }
        if Instant::now() > deadline {
            eprintln!("{label}: the backlog did not settle within 60 s");
            return;
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
    eprintln!(
        "{label}: backlog after the last publish: {:.1} s; {missing} of the {} deliveries of the measured publishes not arrived{}",
        start.elapsed().as_secs_f64(),
        subscribers * last.saturating_sub(first),
        if missing == 0 {
            ""
        } else {
            " (nothing arrived for 5 s)"
        }
    );
}

pub struct Publisher {
    stop: Arc<AtomicBool>,
    seq: Arc<AtomicU64>,
    /// Held while a publish is numbered and written, so that opening the window falls between
    /// two publishes.
    writing: Arc<Mutex<()>>,
    window_after: Arc<AtomicU64>,
    thread: JoinHandle<anyhow::Result<u64>>,
}

impl Publisher {
    /// Starts publishing `rate` messages per second on `topic` at the HTTP listener `target`.
    /// `window_after` is the client shards' start of the measured window (see `open_window`).
    /// With `pad_to`, each message is padded with JSON quote records to about that many bytes.
    pub fn start(
        target: SocketAddr,
        topic: String,
        base: Instant,
        rate: f64,
        window_after: Arc<AtomicU64>,
        pad_to: Option<usize>,
    ) -> Publisher {
        let stop = Arc::new(AtomicBool::new(false));
        let seq = Arc::new(AtomicU64::new(0));
        let writing = Arc::new(Mutex::new(()));
        let (st, sq, w) = (stop.clone(), seq.clone(), writing.clone());
        let thread = std::thread::Builder::new()
            .name("publisher".into())
            .spawn(move || {
                let pace = Pace {
                    base,
                    rate: rate.max(1.0),
                    pad_to,
                };
                publish_loop(target, &topic, pace, &st, &sq, &w)
            })
            .expect("spawn the publisher thread");
        Publisher {
            stop,
            seq,
            writing,
            window_after,
            thread,
        }
    }

    /// Starts the measured window: the clients count the deliveries of every later publish.
    /// Returns the sequence number of the last publish before it.
    pub fn open_window(&self) -> u64 {
        let _between_publishes = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let first = self.seq.load(Ordering::SeqCst);
        self.window_after.store(first, Ordering::SeqCst);
        first
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

/// When and what the publisher publishes.
struct Pace {
    /// The clock origin of the timestamps in the messages.
    base: Instant,
    /// Publishes per second.
    rate: f64,
    /// Pad each message to about this many bytes with JSON quote records.
    pad_to: Option<usize>,
}

/// The body of publish `k` intended at `t` microseconds: `{"seq":K,"t":T}`, padded to about
/// `pad_to` bytes with `"quotes":[...]` (the subscribers read `seq` and `t` only).
fn publish_body(k: u64, t: u128, pad_to: Option<usize>) -> Vec<u8> {
    let mut body = format!(r#"{{"seq":{k},"t":{t}"#).into_bytes();
    if let Some(size) = pad_to {
        body.extend_from_slice(br#","quotes":["#);
        let room = size.saturating_sub(body.len() + 2);
        super::client::json_records(&mut body, k, room);
        body.push(b']');
    }
    body.push(b'}');
    body
}

fn publish_loop(
    target: SocketAddr,
    topic: &str,
    pace: Pace,
    stop: &AtomicBool,
    seq: &AtomicU64,
    writing: &Mutex<()>,
) -> anyhow::Result<u64> {
    let Pace { base, rate, pad_to } = pace;
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(5))
        .with_context(|| format!("publisher cannot connect to {target}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    // Open loop: publishes are written on schedule whatever the server answers (pipelined on
    // one keep-alive connection); a reader thread checks every answer.
    let mut reader = s.try_clone()?;
    let answered = Arc::new(AtomicU64::new(0));
    let reader_done = Arc::new(AtomicBool::new(false));
    let (a, d) = (answered.clone(), reader_done.clone());
    let reader = std::thread::Builder::new()
        .name("publish-answers".into())
        .spawn(move || -> anyhow::Result<()> {
            let mut buf = Vec::with_capacity(4096);
            while !d.load(Ordering::Acquire) {
                read_response(&mut reader, &mut buf)?;
                a.fetch_add(1, Ordering::AcqRel);
            }
            Ok(())
        })?;
    let start = Instant::now();
    let mut k: u64 = 0;
    while !stop.load(Ordering::Acquire) {
        let intended = start + Duration::from_secs_f64(k as f64 / rate);
        let now = Instant::now();
        if intended > now {
            std::thread::sleep(intended - now);
        }
        if reader.is_finished() {
            break;
        }
        let _numbering = writing.lock().unwrap_or_else(|e| e.into_inner());
        k += 1;
        let t = intended.saturating_duration_since(base).as_micros();
        let body = publish_body(k, t, pad_to);
        let mut req = format!(
            "POST /publish/{topic} HTTP/1.1\r\nHost: {target}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(&body);
        s.write_all(&req).context("publisher: write failed")?;
        seq.store(k, Ordering::SeqCst);
    }
    // Every publish must be answered with 200 (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(5);
    while answered.load(Ordering::Acquire) < k && !reader.is_finished() {
        if Instant::now() > deadline {
            bail!(
                "{} of {k} publishes unanswered",
                k - answered.load(Ordering::Acquire)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    reader_done.store(true, Ordering::Release);
    let _ = s.shutdown(std::net::Shutdown::Both);
    match reader.join() {
        Ok(Err(e)) if answered.load(Ordering::Acquire) < k => Err(e),
        Err(_) => bail!("the publish reader panicked"),
        _ => Ok(k),
    }
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
