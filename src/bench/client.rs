//! The load generator's client side: a [`Service`] driving outgoing connections on the same
//! shard engine as the server (pinned epoll loops), so one client core pushes as much as a server
//! core.
//!
//! Each client shard keeps its own latency histogram and counters; the controller collects them
//! with a command. Every response is verified: echo bytes are compared one by one with what was
//! sent, HTTP statuses and body lengths checked, WebSocket frames decoded and compared.
//!
//! The open loop (`--rate`) is a schedule per client shard, not per connection: the shard's
//! share of the rate, each request sent at its intended time (the shard asks the engine to wake
//! it then, [`Service::next_wake`]) on a connection chosen at random. So the cost per request
//! does not grow with the connections held, and a million connections can carry 20,000
//! requests per second spread over all of them. Idle connections are checked at the end of a
//! run with one probe each ([`ClientCmd::Verify`]): a byte that must be echoed, or on a
//! WebSocket a ping that must be answered with its pong (every route answers pings).
//!
//! Closed-loop load (echo, http, ws without --rate) also starts on [`ClientCmd::Start`], once
//! every connection is ready, not as each connection opens: otherwise the first connections
//! load the server while the last are still connecting (or in their TLS handshakes), and a
//! server that serves busy connections before new ones (nginx under pipelined TLS load) starves
//! those handshakes past their timeout.

use std::collections::VecDeque;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use hdrhistogram::Histogram;

use super::report::{histogram, MAX_LATENCY_US};
use crate::server::Peers;
use crate::service::deflate::{Agreed, Deflater, Inflater, LEVEL_FAST, TRAILER};
use crate::service::ws;
use crate::service::{CloseReason, Conn, Ctx, Service, ShardInfo, Token};

/// What each connection does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Echo,
    Http,
    Ws,
    Idle,
    Connect,
    /// Pub/sub fan-out: every connection subscribes to one topic over WebSocket; the controller
    /// publishes at --rate per second; delivery latency is measured from each publish's intended
    /// time, and every subscriber checks that it sees every sequence number once, in order.
    Fanout,
}

/// What the messages of the ws and fanout modes contain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Payload {
    /// A byte pattern that makes a misplaced or corrupted byte show; it does not compress.
    Pattern,
    /// JSON text, quotes of a feed (a fan-out publish is padded to --size with them): it
    /// compresses as such feeds do.
    Json,
}

/// Appends JSON quote records (`{"s":"ACME3","b":123.45,...},`) while they fit in `room` bytes,
/// with numbers drawn from `seed`: the same seed gives the same bytes.
pub fn json_records(out: &mut Vec<u8>, seed: u64, room: usize) {
    const RECORD: usize = 64; // an upper bound of one record's length
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = |m: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % m
    };
    let end = out.len() + room;
    let mut first = true;
    while out.len() + RECORD <= end {
        if !first {
            out.push(b',');
        }
        first = false;
        let bid = 100 + next(900);
        let cents = next(100);
        let fields: [(&[u8], u64); 5] = [
            (b"{\"s\":\"ACME", next(8)),
            (b"\",\"b\":", bid),
            (b".", cents),
            (b",\"a\":", bid + 1),
            (b",\"v\":", next(100_000)),
        ];
        for (text, n) in fields {
            out.extend_from_slice(text);
            out.extend_from_slice(n.to_string().as_bytes());
        }
        out.push(b'}');
    }
}

/// A JSON message of exactly `size` bytes (an array of quote records, space-padded).
pub fn json_message(seed: u64, size: usize, out: &mut Vec<u8>) {
    let start = out.len();
    out.push(b'[');
    json_records(out, seed, size.saturating_sub(2));
    while out.len() - start + 1 < size {
        out.push(b' ');
    }
    out.push(b']');
    out.truncate(start + size);
}

/// The permessage-deflate offer the bench makes: a browser's.
const DEFLATE_OFFER: &str =
    "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n";

/// Settings shared by every client shard.
#[derive(Debug, Clone)]
pub struct Plan {
    pub mode: Mode,
    /// Requests in flight per connection (closed loop).
    pub depth: usize,
    /// Bytes per echo request or WebSocket message.
    pub size: usize,
    /// HTTP path.
    pub path: String,
    /// Open loop: requests per second this client shard sends, over connections chosen at
    /// random (0: closed loop).
    pub rate_per_shard: f64,
    /// Idle mode: upgrade to WebSocket at this path first.
    pub idle_ws: Option<String>,
    /// Offer permessage-deflate on WebSocket upgrades, insist on it, and (ws) send compressed.
    pub deflate: bool,
    pub payload: Payload,
    pub host: String,
    /// Tokens for the WebSocket upgrades, used in turn (empty: none); see [`super::tokens`].
    pub tokens: Arc<[String]>,
    /// Send the token as `?token=` rather than `Authorization: Bearer`.
    pub token_in_query: bool,
    /// Fan-out: the topic (the same in every client process of a run).
    pub topic: String,
    /// Fan-out: the measured window is every publish after this sequence number (the warm-up's
    /// publishes are not counted). Publish timestamps are CLOCK_MONOTONIC microseconds, the
    /// same clock in every process.
    pub window_after: u64,
}

/// Results of one client shard.
#[derive(Debug, Clone)]
pub struct ShardResult {
    pub hist: Histogram<u64>,
    pub requests: u64,
    pub bytes: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub closed: u64,
    pub ready: u64,
    /// Fan-out: messages a subscriber never saw (gaps in its sequence), and the last sequence
    /// number each subscriber saw (filled by Collect).
    pub gaps: u64,
    pub last_seqs: Vec<u64>,
    /// Idle: connections that answered the final probe.
    pub verified: u64,
}

impl ShardResult {
    fn new() -> Self {
        ShardResult {
            hist: histogram(),
            requests: 0,
            bytes: 0,
            errors: 0,
            first_error: None,
            closed: 0,
            ready: 0,
            gaps: 0,
            last_seqs: Vec::new(),
            verified: 0,
        }
    }
}

/// Controller → client shard.
#[derive(Clone)]
pub enum ClientCmd {
    /// Every connection is up: start the load, the open loop's schedule or each closed-loop
    /// connection's first --depth requests (nothing is sent before, so opening connections is
    /// not slowed by, nor crowded with, a backlog of requests).
    Start,
    /// Start counting (end of warm-up): clear everything measured so far.
    Reset,
    /// End of the measured window: the open loop sends nothing more (what is in flight is
    /// still answered and counted).
    Stop,
    /// Send a copy of the results.
    Collect(Sender<ShardResult>),
    /// Idle: send every connection one probe that must come back (counted in `verified`);
    /// answers how many were sent.
    Verify(Sender<u64>),
}

/// Per-connection state.
#[derive(Default)]
pub struct ClientConn {
    seed: u32,
    sent_bytes: u64,
    recv_bytes: u64,
    /// Send (or, open loop, intended send) time of each request in flight.
    inflight: VecDeque<Instant>,
    upgraded: bool,
    /// Idle: the final probe was sent (and not yet answered).
    probing: bool,
    started: Option<Instant>,
    /// Fan-out: subscribed (ack seen), and the last sequence number received.
    subscribed: bool,
    last_seq: u64,
    /// permessage-deflate was agreed; with the server's context takeover (its `dedicated`
    /// mode) the connection needs an inflater of its own, created on the first compressed frame.
    compressed: bool,
    takeover: bool,
    inflater: Option<Box<flate2::Decompress>>,
}

pub struct Client {
    plan: Arc<Plan>,
    result: ShardResult,
    conns: Vec<Token>,
    next_seed: u32,
    /// Open loop: the schedule's origin (set by [`ClientCmd::Start`]), requests scheduled so
    /// far, and whether it has stopped (draining).
    start: Option<Instant>,
    scheduled: u64,
    stopped: bool,
    /// xorshift64 state: which connection the next open-loop request goes to.
    rng: u64,
    request: Vec<u8>,
    /// Upgrades sent by this shard, and the shard's place among the client shards: connection
    /// n of shard s takes token `n * shards + s` (modulo their number).
    upgrades: usize,
    shard: usize,
    shards: usize,
    /// permessage-deflate: the shard's compressor (a client compresses without context
    /// takeover, as the server asks), its inflater for servers without takeover, and buffers.
    deflater: Option<Deflater>,
    inflater: Inflater,
    inflated: Vec<u8>,
    scratch: Vec<u8>,
    /// [`ClientCmd::Start`] came: closed-loop connections send as soon as they are ready.
    going: bool,
    /// Fan-out: the time the bytes in hand were read, taken once per read (every message of
    /// one read came at once); cleared at the start of each.
    read_at: Option<u64>,
}

/// The one byte of an idle connection's final probe.
const PROBE: u8 = b'?';

/// The byte at stream position `pos` of the connection with `seed`: a cheap pattern that makes
/// a misplaced, dropped or corrupted byte show.
#[inline]
fn byte_at(seed: u32, pos: u64) -> u8 {
    ((pos as u32).wrapping_mul(2_654_435_761) ^ seed).rotate_left(7) as u8 ^ (pos >> 32) as u8
}

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

impl Client {
    pub fn new(plan: Arc<Plan>, info: &ShardInfo, _peers: Peers<ClientCmd>) -> Self {
        let request = match plan.mode {
            Mode::Http | Mode::Connect => {
                format!("GET {} HTTP/1.1\r\nHost: {}\r\n\r\n", plan.path, plan.host).into_bytes()
            }
            _ => Vec::new(),
        };
        let deflater = plan.deflate.then(|| {
            let agreed = Agreed {
                window_bits: 15,
                takeover: false,
            };
            Deflater::new(agreed, LEVEL_FAST)
        });
        Client {
            plan,
            result: ShardResult::new(),
            conns: Vec::new(),
            next_seed: (info.shard as u32).wrapping_mul(0x9e37_79b9) | 1,
            start: None,
            scheduled: 0,
            stopped: false,
            rng: (info.shard as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
            request,
            upgrades: 0,
            shard: info.shard,
            shards: info.shards.max(1),
            deflater,
            inflater: Inflater::default(),
            inflated: Vec::new(),
            scratch: Vec::new(),
            going: false,
            read_at: None,
        }
    }

    /// The payload of the ws-mode message that starts at byte `from` of a connection's stream.
    fn payload(&self, seed: u32, from: u64) -> Vec<u8> {
        let size = self.plan.size as u64;
        match self.plan.payload {
            Payload::Pattern => (from..from + size).map(|p| byte_at(seed, p)).collect(),
            Payload::Json => {
                let mut v = Vec::with_capacity(self.plan.size);
                json_message(
                    (u64::from(seed) << 32) ^ (from / size),
                    self.plan.size,
                    &mut v,
                );
                v
            }
        }
    }

    /// The upgrade request for `path`, with the next token if there are any.
    fn upgrade_request(&mut self, path: &str) -> String {
        let tokens = &self.plan.tokens;
        let token = (!tokens.is_empty())
            .then(|| tokens[(self.upgrades * self.shards + self.shard) % tokens.len()].as_str());
        self.upgrades += 1;
        let offer = if self.plan.deflate { DEFLATE_OFFER } else { "" };
        super::tokens::upgrade_request(
            path,
            &self.plan.host,
            token,
            self.plan.token_in_query,
            offer,
        )
    }

    /// Inflates a compressed server frame's payload into `self.inflated`.
    fn inflate(&mut self, conn: &mut Conn<'_, ClientConn>, payload: &[u8]) -> Result<(), String> {
        let st = conn.state();
        if !st.takeover {
            return self
                .inflater
                .inflate(payload, usize::MAX / 2, &mut self.inflated)
                .map_err(|e| format!("inflating a server message: {e}"));
        }
        let d = st
            .inflater
            .get_or_insert_with(|| Box::new(flate2::Decompress::new(false)));
        self.inflated.clear();
        for part in [payload, &TRAILER[..]] {
            let mut read = 0;
            while read < part.len() || self.inflated.len() == self.inflated.capacity() {
                self.inflated.reserve(4096.max(part.len() * 4));
                let before = d.total_in();
                d.decompress_vec(
                    &part[read..],
                    &mut self.inflated,
                    flate2::FlushDecompress::Sync,
                )
                .map_err(|e| format!("inflating a server message: {e}"))?;
                read += (d.total_in() - before) as usize;
                if read == part.len() && self.inflated.len() < self.inflated.capacity() {
                    break;
                }
            }
        }
        Ok(())
    }

    fn error(&mut self, why: String) {
        self.result.errors += 1;
        if self.result.first_error.is_none() {
            self.result.first_error = Some(why);
        }
    }

    /// Writes one request; `at` is its (intended) send time.
    /// A closed-loop connection's first --depth requests.
    fn start_closed_loop(&mut self, conn: &mut Conn<'_, ClientConn>) {
        let now = conn.now();
        for _ in 0..self.plan.depth {
            self.send(conn, now);
        }
    }

    fn send(&mut self, conn: &mut Conn<'_, ClientConn>, at: Instant) {
        let st = conn.state();
        st.inflight.push_back(at);
        match self.plan.mode {
            Mode::Echo => {
                let (seed, from) = (st.seed, st.sent_bytes);
                st.sent_bytes += self.plan.size as u64;
                let size = self.plan.size as u64;
                conn.out()
                    .extend((from..from + size).map(|p| byte_at(seed, p)));
            }
            Mode::Ws => {
                let (seed, from, compressed) = (st.seed, st.sent_bytes, st.compressed);
                st.sent_bytes += self.plan.size as u64;
                let payload = self.payload(seed, from);
                match self.deflater.as_mut().filter(|_| compressed) {
                    Some(d) => {
                        self.scratch.clear();
                        if d.compress(&payload, &mut self.scratch).is_err() {
                            self.error("the client's compressor failed".into());
                            return;
                        }
                        let at = conn.out().len();
                        ws::write_masked(conn.out(), ws::OP_BINARY, true, &self.scratch, MASK);
                        conn.out()[at] |= ws::RSV1;
                    }
                    None => ws::write_masked(conn.out(), ws::OP_BINARY, true, &payload, MASK),
                }
            }
            Mode::Http | Mode::Connect => conn.write(&self.request),
            Mode::Idle | Mode::Fanout => {}
        }
    }

    fn complete(&mut self, conn: &mut Conn<'_, ClientConn>) {
        let now = conn.now();
        if let Some(sent) = conn.state().inflight.pop_front() {
            let micros = now.saturating_duration_since(sent).as_micros().max(1) as u64;
            let _ = self.result.hist.record(micros.min(MAX_LATENCY_US));
        }
        self.result.requests += 1;
        if self.plan.mode == Mode::Connect {
            conn.close();
        } else if self.plan.rate_per_shard == 0.0 {
            self.send(conn, now);
        }
    }

    fn on_echo(&mut self, conn: &mut Conn<'_, ClientConn>, input: &[u8]) {
        let size = self.plan.size as u64;
        let (seed, from) = (conn.state().seed, conn.state().recv_bytes);
        if let Some(i) = input
            .iter()
            .enumerate()
            .position(|(i, &b)| b != byte_at(seed, from + i as u64))
        {
            self.error(format!(
                "corrupted echo at byte {} of the stream",
                from + i as u64
            ));
            conn.close();
            return;
        }
        let to = from + input.len() as u64;
        conn.state().recv_bytes = to;
        if to > conn.state().sent_bytes {
            self.error("received more bytes than were sent".into());
            conn.close();
            return;
        }
        for _ in from / size..to / size {
            self.complete(conn);
        }
    }

    /// Parses complete HTTP responses; returns bytes consumed.
    fn on_http(&mut self, conn: &mut Conn<'_, ClientConn>, input: &[u8]) -> usize {
        let mut pos = 0;
        while pos < input.len() {
            let mut headers = [httparse::EMPTY_HEADER; 24];
            let mut resp = httparse::Response::new(&mut headers);
            let hlen = match resp.parse(&input[pos..]) {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) => break,
                Err(e) => {
                    self.error(format!("malformed HTTP response: {e}"));
                    conn.close();
                    return input.len();
                }
            };
            let status = resp.code.unwrap_or(0);
            let len = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| {
                    std::str::from_utf8(h.value)
                        .ok()?
                        .trim()
                        .parse::<usize>()
                        .ok()
                });
            let Some(len) = len else {
                self.error("HTTP response without Content-Length".into());
                conn.close();
                return input.len();
            };
            if input.len() - pos < hlen + len {
                break;
            }
            pos += hlen + len;
            if status != 200 {
                self.error(format!("HTTP status {status}"));
            }
            self.complete(conn);
        }
        pos
    }

    fn on_ws(&mut self, conn: &mut Conn<'_, ClientConn>, input: &[u8]) -> usize {
        let mut pos = 0;
        self.read_at = None;
        if !conn.state().upgraded {
            let Some(end) = input.windows(4).position(|w| w == b"\r\n\r\n") else {
                return 0;
            };
            if !input.starts_with(b"HTTP/1.1 101") {
                self.error(format!(
                    "upgrade refused: {}",
                    String::from_utf8_lossy(&input[..end.min(80)])
                ));
                conn.close();
                return input.len();
            }
            let head = String::from_utf8_lossy(&input[..end]).to_ascii_lowercase();
            let answer = head
                .lines()
                .find_map(|l| l.strip_prefix("sec-websocket-extensions:"))
                .map(str::trim);
            match (self.plan.deflate, answer) {
                (true, Some(a)) if a.starts_with("permessage-deflate") => {
                    let st = conn.state();
                    st.compressed = true;
                    st.takeover = !a.contains("server_no_context_takeover");
                }
                (true, _) => {
                    self.error("the server declined permessage-deflate (--deflate)".into());
                    conn.close();
                    return input.len();
                }
                (false, Some(a)) => {
                    self.error(format!("the server answered an extension not offered: {a}"));
                    conn.close();
                    return input.len();
                }
                (false, None) => {}
            }
            conn.state().upgraded = true;
            pos = end + 4;
            if self.plan.mode == Mode::Fanout {
                // Ready once the subscription is acknowledged (on_fanout).
                let msg = format!(r#"{{"op":"subscribe","topic":"{}"}}"#, self.plan.topic);
                ws::write_masked(conn.out(), ws::OP_TEXT, true, msg.as_bytes(), MASK);
            } else {
                self.result.ready += 1;
            }
            if self.plan.mode == Mode::Ws && self.plan.rate_per_shard == 0.0 && self.going {
                self.start_closed_loop(conn);
            }
        }
        while pos < input.len() {
            let (op, range, total) = match ws::decode_server_frame(&input[pos..]) {
                Ok(Some((op, _, range, total))) => (op, range, total),
                Ok(None) => break,
                Err(e) => {
                    self.error(e.into());
                    conn.close();
                    return input.len();
                }
            };
            let rsv1 = input[pos] & ws::RSV1 != 0;
            let mut payload = &input[pos + range.start..pos + range.end];
            pos += total;
            let mut inflated = Vec::new();
            if rsv1 {
                if !conn.state().compressed {
                    self.error("a compressed frame on a connection that agreed to none".into());
                    conn.close();
                    return input.len();
                }
                if let Err(e) = self.inflate(conn, payload) {
                    self.error(e);
                    conn.close();
                    return input.len();
                }
                inflated = std::mem::take(&mut self.inflated);
                payload = &inflated;
            }
            match op {
                ws::OP_PONG if self.plan.mode == Mode::Idle => {
                    let answered = self.probe_answered(conn, payload);
                    if !answered {
                        conn.close();
                        return input.len();
                    }
                }
                ws::OP_BINARY => {
                    let (seed, from) = (conn.state().seed, conn.state().recv_bytes);
                    if payload != &self.payload(seed, from)[..] {
                        self.error("corrupted WebSocket echo".into());
                        conn.close();
                        return input.len();
                    }
                    conn.state().recv_bytes += payload.len() as u64;
                    self.complete(conn);
                }
                ws::OP_TEXT if self.plan.mode == Mode::Fanout => {
                    let valid = self.on_fanout(conn, payload);
                    if !valid {
                        conn.close();
                        return input.len();
                    }
                }
                ws::OP_PING => {
                    ws::write_masked(conn.out(), ws::OP_PONG, true, payload, MASK);
                }
                ws::OP_CLOSE => {
                    self.error("server sent a WebSocket close".into());
                    conn.close();
                    return input.len();
                }
                _ => {}
            }
            if rsv1 {
                // The inflate buffer goes back for the next frame.
                self.inflated = inflated;
            }
        }
        pos
    }
}

impl Client {
    /// A uniformly chosen index below `n` (xorshift64, multiply-shift: no modulo bias).
    fn pick(&mut self, n: usize) -> usize {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        ((x as u128 * n as u128) >> 64) as usize
    }

    /// Sends an idle connection its final probe (once); false if it cannot take one (a
    /// WebSocket not upgraded yet, or a probe already out).
    fn probe(&mut self, conn: &mut Conn<'_, ClientConn>) -> bool {
        let st = conn.state();
        if st.probing || (self.plan.idle_ws.is_some() && !st.upgraded) {
            return false;
        }
        st.probing = true;
        if self.plan.idle_ws.is_some() {
            ws::write_masked(conn.out(), ws::OP_PING, true, &[PROBE], MASK);
        } else {
            conn.write(&[PROBE]);
        }
        true
    }

    /// What an idle connection received: only the echo of its probe is expected.
    fn probe_answered(&mut self, conn: &mut Conn<'_, ClientConn>, data: &[u8]) -> bool {
        if !conn.state().probing || data != [PROBE] {
            self.error(format!(
                "unexpected data on an idle connection: {:?}",
                String::from_utf8_lossy(&data[..data.len().min(40)])
            ));
            return false;
        }
        conn.state().probing = false;
        self.result.verified += 1;
        true
    }
}

/// The unsigned integer after `"key":` in a small JSON text.
fn json_u64(text: &[u8], key: &memchr::memmem::Finder<'static>) -> Option<u64> {
    // A prepared memmem search, not `windows().position()`: that compares at every offset (a
    // memcmp call each) and was the client core's largest cost at a million deliveries a second.
    let at = key.find(text)? + key.needle().len();
    let digits = &text[at..];
    let n = digits.iter().take_while(|b| b.is_ascii_digit()).count();
    if n == 0 {
        return None;
    }
    digits[..n].iter().try_fold(0u64, |v, &d| {
        v.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// The keys of a published message's `data` that [`Client::on_fanout`] reads.
static SEQ_KEY: LazyLock<memchr::memmem::Finder<'static>> =
    LazyLock::new(|| memchr::memmem::Finder::new(br#""seq":"#));
static T_KEY: LazyLock<memchr::memmem::Finder<'static>> =
    LazyLock::new(|| memchr::memmem::Finder::new(br#""t":"#));

impl Client {
    /// One pub/sub message: the subscription acknowledgement, or a published
    /// `{"topic":..,"data":{"seq":N,"t":MICROS}}`. Returns false on a protocol error.
    fn on_fanout(&mut self, conn: &mut Conn<'_, ClientConn>, text: &[u8]) -> bool {
        if text.starts_with(br#"{"ok":"subscribe""#) {
            if !conn.state().subscribed {
                conn.state().subscribed = true;
                self.result.ready += 1;
            }
            return true;
        }
        let (Some(seq), Some(t)) = (json_u64(text, &SEQ_KEY), json_u64(text, &T_KEY)) else {
            self.error(format!(
                "unexpected pub/sub message: {}",
                String::from_utf8_lossy(&text[..text.len().min(80)])
            ));
            return false;
        };
        let st = conn.state();
        if seq <= st.last_seq {
            self.error(format!(
                "message {seq} delivered twice or out of order (after {})",
                st.last_seq
            ));
            return false;
        }
        let window_after = self.plan.window_after;
        let before = st.last_seq;
        st.last_seq = seq;
        if seq <= window_after {
            return true; // a warm-up publish: not counted
        }
        // Messages of the window this subscriber skipped (seq > window_after, seq > before).
        self.result.gaps += seq - 1 - before.max(window_after);
        // `t` is the publish's intended time on CLOCK_MONOTONIC, which every process shares.
        let now = *self
            .read_at
            .get_or_insert_with(crate::sys::process::monotonic_micros);
        let micros = now.saturating_sub(t).max(1);
        let _ = self.result.hist.record(micros.min(MAX_LATENCY_US));
        self.result.requests += 1;
        true
    }
}

impl Service for Client {
    type State = ClientConn;
    type Command = ClientCmd;

    fn on_open(&mut self, conn: &mut Conn<'_, ClientConn>) {
        self.next_seed = self.next_seed.wrapping_add(0x6d2b_79f5);
        let now = conn.now();
        let st = conn.state();
        st.seed = self.next_seed;
        st.started = Some(now);
        self.conns.push(conn.token());
        let closed_loop = self.plan.rate_per_shard == 0.0;
        match self.plan.mode {
            Mode::Echo | Mode::Http if closed_loop => {
                if self.going {
                    self.start_closed_loop(conn);
                }
                self.result.ready += 1;
            }
            Mode::Connect => {
                self.send(conn, now);
                self.result.ready += 1;
            }
            Mode::Ws | Mode::Fanout => {
                let plan = self.plan.clone();
                let upgrade = self.upgrade_request(&plan.path);
                conn.write(upgrade.as_bytes());
            }
            Mode::Idle => match self.plan.idle_ws.clone() {
                Some(path) => {
                    let upgrade = self.upgrade_request(&path);
                    conn.write(upgrade.as_bytes());
                }
                None => self.result.ready += 1,
            },
            _ => self.result.ready += 1,
        }
    }

    fn on_data(&mut self, conn: &mut Conn<'_, ClientConn>, input: &mut [u8]) -> usize {
        self.result.bytes += input.len() as u64;
        match self.plan.mode {
            Mode::Echo => {
                self.on_echo(conn, input);
                input.len()
            }
            Mode::Http | Mode::Connect => self.on_http(conn, input),
            Mode::Ws | Mode::Fanout => self.on_ws(conn, input),
            Mode::Idle => {
                if self.plan.idle_ws.is_some() {
                    self.on_ws(conn, input)
                } else {
                    if !self.probe_answered(conn, input) {
                        conn.close();
                    }
                    input.len()
                }
            }
        }
    }

    fn on_close(&mut self, token: Token, state: &mut ClientConn, _reason: CloseReason) {
        self.conns.retain(|&t| t != token);
        self.result.closed += 1;
        if self.plan.mode != Mode::Connect
            && !state.inflight.is_empty()
            && self.plan.mode != Mode::Idle
        {
            self.error(format!(
                "connection closed with {} requests unanswered",
                state.inflight.len()
            ));
        }
    }

    fn on_drain(&mut self, conn: &mut Conn<'_, ClientConn>) {
        // End of the run: what is in flight is not an error.
        conn.state().inflight.clear();
        conn.close();
    }

    fn on_tick(&mut self, ctx: &mut Ctx<'_, ClientConn>) {
        let rate = self.plan.rate_per_shard;
        let Some(start) = self.start.filter(|_| rate > 0.0 && !self.stopped) else {
            return;
        };
        if ctx.draining() {
            self.stopped = true;
            return;
        }
        // Open loop: send every request whose intended time has come, each on a connection
        // chosen at random; latency counts from the intended time, so a stalled server (or a
        // late client) cannot hide its stall. Requests 0..=k are due once start + k/rate has
        // passed.
        let elapsed = ctx.now().saturating_duration_since(start).as_secs_f64();
        let due_now = due(elapsed, rate);
        while self.scheduled < due_now {
            let k = self.scheduled;
            self.scheduled += 1;
            if self.conns.is_empty() {
                continue; // not connected yet (warm-up)
            }
            let i = self.pick(self.conns.len());
            let token = self.conns[i];
            let at = start + Duration::from_secs_f64(k as f64 / rate);
            ctx.with_conn(token, |conn| {
                let ready = self.plan.mode != Mode::Ws || conn.state().upgraded;
                // A connection this far behind shows in the latency already.
                if ready && conn.state().inflight.len() < 100_000 {
                    self.send(conn, at);
                }
            });
        }
    }

    fn next_wake(&self) -> Option<Instant> {
        let rate = self.plan.rate_per_shard;
        let start = self.start.filter(|_| rate > 0.0 && !self.stopped)?;
        Some(start + Duration::from_secs_f64(self.scheduled as f64 / rate))
    }

    fn on_command(&mut self, cmd: ClientCmd, ctx: &mut Ctx<'_, ClientConn>) {
        match cmd {
            ClientCmd::Start => {
                if self.start.is_none() {
                    self.start = Some(ctx.now());
                }
                // Closed loop: every connection sends its --depth requests now; connections
                // that open later start at once.
                self.going = true;
                let closed_loop = self.plan.rate_per_shard == 0.0;
                for i in 0..self.conns.len() {
                    let token = self.conns[i];
                    ctx.with_conn(token, |conn| match self.plan.mode {
                        Mode::Echo | Mode::Http if closed_loop => self.start_closed_loop(conn),
                        Mode::Ws if closed_loop && conn.state().upgraded => {
                            self.start_closed_loop(conn)
                        }
                        _ => {}
                    });
                }
            }
            ClientCmd::Stop => self.stopped = true,
            ClientCmd::Reset => {
                let ready = self.result.ready;
                let errors = (self.result.errors, self.result.first_error.take());
                self.result = ShardResult::new();
                self.result.ready = ready;
                // Errors during warm-up still fail the run.
                self.result.errors = errors.0;
                self.result.first_error = errors.1;
            }
            ClientCmd::Verify(tx) => {
                let mut sent = 0;
                for i in 0..self.conns.len() {
                    let token = self.conns[i];
                    ctx.with_conn(token, |conn| sent += u64::from(self.probe(conn)));
                }
                let _ = tx.send(sent);
            }
            ClientCmd::Collect(tx) => {
                let mut r = self.result.clone();
                if self.plan.mode == Mode::Fanout {
                    for &t in &self.conns {
                        ctx.with_conn(t, |c| r.last_seqs.push(c.state().last_seq));
                    }
                }
                let _ = tx.send(r);
            }
        }
    }
}

/// Requests of one open-loop client shard due `elapsed` seconds after the start at `rate` per
/// second. Request k (from 0) is due at k / rate, so the first is due at once: counting only
/// whole intervals (`elapsed * rate`) would send each request one interval after its intended
/// time and charge that interval to the server as latency.
fn due(elapsed: f64, rate: f64) -> u64 {
    (elapsed * rate) as u64 + 1
}

#[cfg(test)]
mod tests {
    use super::{due, json_u64};
    use memchr::memmem::Finder;

    #[test]
    fn json_u64_reads_the_number_after_its_key_and_refuses_what_is_not_one() {
        let (seq, t, nope) = (
            Finder::new(br#""seq":"#),
            Finder::new(br#""t":"#),
            Finder::new(br#""nope":"#),
        );
        let m = br#"{"topic":"t","data":{"seq":42,"t":1234567890123,"pad":"seq"}}"#;
        assert_eq!(json_u64(m, &seq), Some(42));
        assert_eq!(json_u64(m, &t), Some(1_234_567_890_123));
        assert_eq!(json_u64(m, &nope), None);
        assert_eq!(json_u64(br#"{"seq":x}"#, &seq), None);
        assert_eq!(json_u64(br#"{"seq":"#, &seq), None);
        // One past u64::MAX does not wrap.
        assert_eq!(json_u64(br#"{"seq":18446744073709551616}"#, &seq), None);
        assert_eq!(
            json_u64(br#"{"seq":18446744073709551615}"#, &seq),
            Some(u64::MAX)
        );
    }

    #[test]
    fn a_request_is_due_at_its_intended_time_not_one_interval_later() {
        // 40 requests/s: one every 25 ms, the first at 0.
        assert_eq!(due(0.0, 40.0), 1);
        assert_eq!(due(0.024, 40.0), 1);
        assert_eq!(due(0.0251, 40.0), 2);
        assert_eq!(due(1.0, 40.0), 41);
    }
}
