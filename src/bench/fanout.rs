//! Fan-out mode's publisher: one keep-alive HTTP connection that POSTs `/publish/{topic}` at a
//! fixed rate (open loop: each message carries its intended send time, so a publisher or server
//! that falls behind shows up as delivery latency), and the server's own count of messages it
//! dropped for slow subscribers, read from `/metrics`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::client::ShardResult;

/// What a fan-out run adds to the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FanoutReport {
    pub subscribers: u64,
    /// Publishes during the measured window.
    pub published: u64,
    pub publish_errors: u64,
    /// Deliveries during the measured window (subscribers × messages).
    pub delivered: u64,
    /// Messages some subscriber never received: gaps in its sequence, plus the tail it had not
    /// received when deliveries stopped (nothing new for a second after the last publish).
    pub lost: u64,
    pub gaps: u64,
    pub tail_missing: u64,
    /// The server's `shardnet_ws_dropped_total` (None when /metrics is not served there).
    pub dropped_by_server: Option<u64>,
}

/// Subscribers, and the sum over them of the last sequence number each has seen.
pub fn progress(results: &[ShardResult]) -> (u64, u64) {
    let seqs = results.iter().flat_map(|r| r.last_seqs.iter());
    (seqs.clone().count() as u64, seqs.sum())
}

/// After the last publish (`last`), waits for the backlog to arrive: until every subscriber has
/// it, or nothing arrived for 5 s (what is missing then is lost), at most 60 s. The quiet period
/// covers TCP retransmission backoff: an overloaded receiver's kernel drops segments when its
/// socket memory runs out (TcpExtTCPRcvQDrop) and the sender retries after 0.2, 0.4, 0.8, ... s.
/// `collect` asks every client shard for its results; `shards` is how many must answer.
pub fn settle(collect: impl Fn() -> Vec<ShardResult>, shards: usize, last: u64, label: &str) {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(60);
    let (mut before, mut still_since) = (0u64, Instant::now());
    let (subs, seen, r) = loop {
        let r = collect();
        if r.len() < shards {
            // A client shard too busy to answer within the collect timeout: still working.
            still_since = Instant::now();
        } else {
            let (subs, seen) = progress(&r);
            if seen != before {
                (before, still_since) = (seen, Instant::now());
            }
            if seen >= subs * last || still_since.elapsed() > Duration::from_secs(5) {
                break (subs, seen, r);
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
        .flat_map(|x| x.last_seqs.iter().map(|&s| last.saturating_sub(s)))
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
    eprintln!(
        "{label}: backlog after the last publish: {:.1} s, {} of {} deliveries missing{}",
        start.elapsed().as_secs_f64(),
        (subs * last).saturating_sub(seen),
        subs * last,
        if seen >= subs * last {
            ""
        } else {
            " (nothing arrived for 5 s)"
        }
    );
}

pub struct Publisher {
    stop: Arc<AtomicBool>,
    seq: Arc<AtomicU64>,
    thread: JoinHandle<anyhow::Result<u64>>,
}

impl Publisher {
    /// Starts publishing `rate` messages per second on `topic` at the HTTP listener `target`.
    pub fn start(target: SocketAddr, topic: String, base: Instant, rate: f64) -> Publisher {
        let stop = Arc::new(AtomicBool::new(false));
        let seq = Arc::new(AtomicU64::new(0));
        let (st, sq) = (stop.clone(), seq.clone());
        let thread = std::thread::Builder::new()
            .name("publisher".into())
            .spawn(move || publish_loop(target, &topic, base, rate.max(1.0), &st, &sq))
            .expect("spawn the publisher thread");
        Publisher { stop, seq, thread }
    }

    /// Sequence number of the last message published.
    pub fn published(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }

    /// Stops; returns the last sequence number and the publish errors (0 or 1: the first
    /// error ends publishing and is reported).
    pub fn stop(self) -> anyhow::Result<(u64, u64)> {
        self.stop.store(true, Ordering::Release);
        let last = self.published();
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

fn publish_loop(
    target: SocketAddr,
    topic: &str,
    base: Instant,
    rate: f64,
    stop: &AtomicBool,
    seq: &AtomicU64,
) -> anyhow::Result<u64> {
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
        k += 1;
        let t = intended.saturating_duration_since(base).as_micros();
        let body = format!(r#"{{"seq":{k},"t":{t}}}"#);
        let req = format!(
            "POST /publish/{topic} HTTP/1.1\r\nHost: {target}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes())
            .context("publisher: write failed")?;
        seq.store(k, Ordering::Release);
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

/// Sum of `shardnet_ws_dropped_total` over shards, from the server's /metrics on `target`.
pub fn server_dropped(target: SocketAddr) -> Option<u64> {
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .ok()?;
    let body = read_response(&mut s, &mut Vec::new()).ok()?;
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
