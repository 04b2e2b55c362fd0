//! HTTP/1.1 framing: a pure function from input bytes to response bytes, with the routes left to
//! a [`Handler`].
//!
//! No I/O and no product knowledge here: [`Http::handle`] parses every complete request at the
//! start of its input with httparse (pipelining), hands each to the handler with a [`Response`]
//! that appends to one output buffer (the engine writes them with one `write(2)`), and reports
//! how much input it consumed, what the responses' statuses were, and what the connection should
//! do next. The product's routes (`crate::app`) bind it to the engine; tests and the fuzz test
//! call it directly with their own handlers.
//!
//! Decisions (RFC 9112 section numbers in brackets):
//! - Keep-alive is the default for HTTP/1.1; HTTP/1.0 keeps the connection only with
//!   `Connection: keep-alive`. `Connection: close` closes after the response.
//! - Only HTTP/1.0 and HTTP/1.1 are spoken: any other `HTTP/d.d` on the request line → 505.
//! - The request target is origin-form (`/path?query`), absolute-form (`http://host/path`, whose
//!   path is routed [3.2.2]) or `*`; one longer than [`MAX_TARGET`] (or `max_header`, if smaller)
//!   → 414.
//! - HTTP/1.1 without `Host`, any request with two `Host` fields, or a `Host` that is not a
//!   host[:port] → 400 [3.2].
//! - Request bodies need `Content-Length`: exactly `1*DIGIT` (`+1`, `-1`, `1 2`, `0x1` → 400; a
//!   proxy reading them otherwise would desynchronise from us), repeated only with the same value,
//!   up to `max_body` (else 413).
//! - Transfer codings: `chunked` is the only one known, and it is refused with **411 Length
//!   Required** (no route takes a streamed body; refusing keeps a body's bytes contiguous in the
//!   input, with no reassembly buffer per connection); any other coding (`gzip`, `foo`) → 501;
//!   `Transfer-Encoding` with `Content-Length` → 400 (smuggling) [6.1].
//! - `Expect: 100-continue` gets `100 Continue` once while the body is awaited.
//! - A header block over `max_header` → 431; malformed (obs-fold, space before the colon, bad
//!   bytes, a line ending in a bare LF) → 400. Every error response closes the connection.
//! - Output per call is bounded by the caller's budget: past it, handling stops and the caller
//!   offers the rest of the input again once the output has drained (a client that pipelines
//!   without reading costs bounded memory).
//! - The header timer belongs to each request from its first byte: [`Outcome::timer`] says when
//!   to start, keep or stop it, so a pipelining client whose reads end inside the next request is
//!   timed per request, not from its first one.
//! - A handler may answer later ([`Response::defer`]: `POST /publish` waits for the broker). The
//!   connection then holds a [`Pending`]; responses stay in request order. Behind it, only
//!   requests that are deferred too are taken ([`Request::behind`]: the handler defers them with
//!   the id [`Request::behind`] gives, or declines with [`Response::decline`], and nothing is
//!   written), up to [`MAX_DEFERRED`] in flight: a client pipelining publishes gets them to the
//!   broker one after another without waiting a round trip for each. Any other request, or one
//!   that is not complete in the strict form yet, waits in the input (bounded by the engine's
//!   `max_read_buffer`) until the caller has answered every deferred one with
//!   [`HttpConn::take_pending`] and [`Pending::respond`], in order.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::deflate::{self, Agreed};

mod head;

use head::Field;

/// Requests one connection may have waiting for their answers ([`Response::defer`]) at once.
pub const MAX_DEFERRED: u16 = 128;

/// Headers parsed per request; more → 431.
const MAX_HEADERS: usize = 32;
/// Fields the fast path ([`head`]) takes; a request with more goes through httparse.
const FAST_FIELDS: usize = 16;

/// Longest request target accepted (414 beyond it; `max_header` applies if it is smaller).
pub const MAX_TARGET: usize = 8 * 1024;

/// Per-listener HTTP settings.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub max_header: usize,
    pub max_body: usize,
    pub header_timeout: Duration,
}

impl HttpSettings {
    fn max_target(&self) -> usize {
        MAX_TARGET.min(self.max_header)
    }
}

/// Per-connection state: two flags, and the requests waiting for their answers, if any.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HttpConn {
    /// `100 Continue` was sent for the request being received.
    continue_sent: bool,
    /// The header timer runs for the request being received.
    timer_armed: bool,
    /// Deferred requests behind `pending`: ids `pending.id + 1 ..= pending.id + queued`, all
    /// answered like it (same version, keep-alive, not HEAD).
    queued: u16,
    /// The first request answered later ([`Response::defer`]).
    pending: Option<Pending>,
}

impl HttpConn {
    /// The header timer fired (the caller answers 408 and closes).
    pub fn timer_fired(&mut self) {
        self.timer_armed = false;
    }

    /// The state as one byte, for a hand-over to another process (the partial request itself
    /// is the engine's unconsumed input, the header timer the engine's timer). Not for a
    /// connection with a request [`HttpConn::pending`]: its answer is this process's to give.
    pub fn to_bits(&self) -> u8 {
        self.continue_sent as u8 | (self.timer_armed as u8) << 1
    }

    /// The state [`HttpConn::to_bits`] wrote.
    pub fn from_bits(bits: u8) -> HttpConn {
        HttpConn {
            continue_sent: bits & 1 != 0,
            timer_armed: bits & 2 != 0,
            queued: 0,
            pending: None,
        }
    }
    /// The first request waiting for its answer (the one to answer next).
    pub fn pending(&self) -> Option<Pending> {
        self.pending
    }

    /// Requests waiting for their answers, the first included.
    pub fn deferred(&self) -> usize {
        self.pending.map_or(0, |_| 1 + usize::from(self.queued))
    }

    /// Whether `id` is one of the requests waiting behind the first.
    pub fn is_queued(&self, id: u64) -> bool {
        self.pending
            .is_some_and(|p| id > p.id && id - p.id <= u64::from(self.queued))
    }

    /// Takes the first waiting request to answer it ([`Pending::respond`]); the next one, if
    /// any, becomes the first. The caller then offers the input left behind them again.
    pub fn take_pending(&mut self) -> Option<Pending> {
        let p = self.pending.take()?;
        if self.queued > 0 {
            self.queued -= 1;
            self.pending = Some(Pending { id: p.id + 1, ..p });
        }
        Some(p)
    }
}

/// A request whose answer comes later: what its response needs, and the caller's id for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    pub id: u64,
    head: bool,
    keep_alive: bool,
    version: u8,
}

impl Pending {
    /// The request's one answer, appended to `out`.
    pub fn respond<'a>(self, out: &'a mut Vec<u8>, date: &'a DateCache) -> Response<'a> {
        Response {
            out,
            date,
            head: self.head,
            keep_alive: self.keep_alive,
            version: self.version,
        }
    }

    /// Whether the connection stays open after the answer.
    pub fn keep_alive(&self) -> bool {
        self.keep_alive
    }
}

/// What the caller does with the connection's header timer after a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderTimer {
    /// Leave it as it is (running for the same request, or not running).
    Keep,
    /// (Re)start it for `header_timeout`: a new request began in this input.
    Start,
    /// Stop it: no request is partly received.
    Stop,
}

/// The result of one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Input bytes fully handled.
    pub consumed: usize,
    /// Close after writing the output.
    pub close: bool,
    /// A request is partly received.
    pub partial: bool,
    /// Stopped because the output budget ran out; call again when it drains.
    pub stopped: bool,
    /// A valid WebSocket upgrade for route `.0` was answered with 101 at `consumed`.
    pub upgrade: Option<usize>,
    /// The permessage-deflate parameters that upgrade agreed to (`None`: uncompressed).
    pub deflate: Option<Agreed>,
    /// Final responses written (error responses and a 101 included; `100 Continue` not).
    pub responses: u32,
    /// Of those, responses with a 4xx or 5xx status.
    pub errors: u32,
    /// The status of the last final response written (0: none).
    pub status: u16,
    /// What to do with the header timer.
    pub timer: HeaderTimer,
    /// The last request handled is answered later ([`Response::defer`]): nothing after it is
    /// read until [`HttpConn::take_pending`].
    pub deferred: bool,
    /// Requests taken behind deferred ones and deferred too ([`Request::behind`]).
    pub queued: u32,
}

/// What a request behind deferred ones must match: the id it is deferred with, and the version
/// their answers are framed in.
#[derive(Debug, Clone, Copy)]
struct Behind {
    id: u64,
    version: u8,
}

impl Outcome {
    fn new() -> Self {
        Outcome {
            consumed: 0,
            close: false,
            partial: false,
            stopped: false,
            upgrade: None,
            deflate: None,
            responses: 0,
            errors: 0,
            status: 0,
            timer: HeaderTimer::Keep,
            deferred: false,
            queued: 0,
        }
    }

    fn count(&mut self, status: u16) {
        self.responses += 1;
        self.errors += u32::from(status >= 400);
        self.status = status;
    }

    /// Answers `status` with `message` and closes.
    fn fail(&mut self, out: &mut Vec<u8>, date: &DateCache, status: u16, message: &str) {
        error(out, date, status, message);
        self.count(status);
        self.close = true;
    }
}

/// The first line of a 200 response.
const OK_LINE: &[u8] = b"HTTP/1.1 200 OK\r\n";
/// What every response says between its status line and its content type.
const SERVER_DATE: &[u8] = b"Server: shardnet\r\nDate: ";
const DATE_LEN: usize = 29;
const TO_TYPE: &[u8] = b"\r\nContent-Type: ";
/// Where the date starts in [`DateCache::ok_head`].
const DATE_AT: usize = OK_LINE.len() + SERVER_DATE.len();
const OK_HEAD_LEN: usize = DATE_AT + DATE_LEN + TO_TYPE.len();

/// The cached `Date` header value, reformatted at most once per second, kept inside the bytes
/// every 200 response starts with (status line to `Content-Type: `), so that a response's head
/// up to its content type is one copy of a fixed size.
pub struct DateCache {
    second: u64,
    ok_head: [u8; OK_HEAD_LEN],
}

impl Default for DateCache {
    fn default() -> Self {
        let mut ok_head = [b' '; OK_HEAD_LEN];
        ok_head[..OK_LINE.len()].copy_from_slice(OK_LINE);
        ok_head[OK_LINE.len()..DATE_AT].copy_from_slice(SERVER_DATE);
        ok_head[DATE_AT + DATE_LEN..].copy_from_slice(TO_TYPE);
        let mut d = DateCache {
            second: u64::MAX,
            ok_head,
        };
        d.update(SystemTime::now());
        d
    }
}

impl DateCache {
    /// Reformats only when the second changed; returns whether it did.
    pub fn update(&mut self, now: SystemTime) -> bool {
        let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if second == self.second {
            return false;
        }
        self.second = second;
        let s = httpdate::fmt_http_date(now);
        if s.len() == DATE_LEN {
            self.ok_head[DATE_AT..DATE_AT + DATE_LEN].copy_from_slice(s.as_bytes());
        }
        true
    }

    pub fn get(&self) -> &[u8] {
        &self.ok_head[DATE_AT..DATE_AT + DATE_LEN]
    }

    /// `Server: ... Content-Type: `, the part of the head after any status line.
    fn after_status(&self) -> &[u8; OK_HEAD_LEN - OK_LINE.len()] {
        self.ok_head[OK_LINE.len()..]
            .try_into()
            .expect("fixed length")
    }
}

/// What answers requests: the routes. Called once per complete request, in order.
pub trait Handler {
    /// Answers `req` through `resp` (every method of [`Response`] consumes it, so there is
    /// exactly one answer) and returns what that method returned.
    fn request(&mut self, req: &Request<'_>, resp: Response<'_>) -> Sent;
}

/// One complete request, borrowed from the input.
pub struct Request<'a> {
    /// Behind a deferred request: the id this one must be deferred with.
    behind: Option<u64>,
    method: &'a str,
    target: &'a str,
    path: &'a str,
    query: Option<&'a str>,
    version: u8,
    body: &'a [u8],
    headers: &'a [Field<'a>],
    ws: WsHeaders,
    ws_key: Option<&'a [u8]>,
    origin: Option<&'a [u8]>,
}

impl<'a> Request<'a> {
    /// `Some(id)` when this request came behind requests that wait for their answers: the
    /// handler must then either defer it with this `id` ([`Response::defer`]) or decline it
    /// ([`Response::decline`]: it is handled again, in order, once those are answered). It is
    /// only offered when its answer would be framed like theirs (same version, keep-alive).
    pub fn behind(&self) -> Option<u64> {
        self.behind
    }

    pub fn method(&self) -> &'a str {
        self.method
    }

    /// The target as sent.
    pub fn target(&self) -> &'a str {
        self.target
    }

    /// The path to route on: the target without its query, and without scheme and authority in
    /// absolute form (`/` if it has no path); `*` for the asterisk form.
    pub fn path(&self) -> &'a str {
        self.path
    }

    pub fn query(&self) -> Option<&'a str> {
        self.query
    }

    /// The minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub fn version(&self) -> u8 {
        self.version
    }

    pub fn body(&self) -> &'a [u8] {
        self.body
    }

    /// The first field named `name` (case-insensitive), with surrounding whitespace removed.
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name.as_bytes()))
            .map(|h| h.value.trim_ascii())
    }
}

#[derive(Default, Clone, Copy)]
struct WsHeaders {
    upgrade_websocket: bool,
    connection_upgrade: bool,
    version_13: bool,
}

/// The one answer to a request, appended to the output.
pub struct Response<'a> {
    out: &'a mut Vec<u8>,
    date: &'a DateCache,
    head: bool,
    keep_alive: bool,
    version: u8,
}

/// Proof that a request was answered, with the status (what [`Handler::request`] returns).
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    status: u16,
    upgrade: Option<usize>,
    deferred: Option<Pending>,
    deflate: Option<Agreed>,
    /// [`Response::decline`]: not answered now.
    declined: bool,
}

impl Sent {
    pub fn status(&self) -> u16 {
        self.status
    }
}

/// A fixed response (status, content type, body, extra header lines), with its bytes after the
/// `Date` value built once by [`Response::send`] itself: answering a keep-alive HTTP/1.1
/// request with it ([`Response::send_prepared`]) is two copies, with the same bytes `send`
/// would write. For the routes whose answer never changes (`/plaintext`, `/json`).
pub struct Prepared {
    status: u16,
    content_type: &'static str,
    body: &'static [u8],
    extra: &'static str,
    /// The status line (for a status other than 200, which [`DateCache`] holds).
    line: Box<[u8]>,
    /// `\r\nContent-Type: ...` to the end of the body.
    tail: Box<[u8]>,
}

impl Prepared {
    pub fn new(
        status: u16,
        content_type: &'static str,
        body: &'static [u8],
        extra: &'static str,
    ) -> Prepared {
        let mut line = Vec::new();
        status_line(&mut line, status);
        let date = DateCache::default();
        let mut out = Vec::new();
        let _ = Response {
            out: &mut out,
            date: &date,
            head: false,
            keep_alive: true,
            version: 1,
        }
        .send(status, content_type, body, extra);
        let date_end = line.len() + SERVER_DATE.len() + DATE_LEN;
        Prepared {
            status,
            content_type,
            body,
            extra,
            line: line.into(),
            tail: out[date_end..].into(),
        }
    }
}

impl Response<'_> {
    /// Appends a complete response with Server, Date, Content-Type and Content-Length; `extra`
    /// holds further header lines, each ending in CRLF. Built from byte slices (no formatting
    /// machinery): this is the per-request hot path.
    pub fn send(self, status: u16, content_type: &str, body: &[u8], extra: &str) -> Sent {
        let out = self.out;
        if status == 200 {
            out.extend_from_slice(&self.date.ok_head);
        } else {
            status_line(out, status);
            out.extend_from_slice(self.date.after_status());
        }
        out.extend_from_slice(content_type.as_bytes());
        out.extend_from_slice(b"\r\nContent-Length: ");
        push_decimal(out, body.len());
        if extra.is_empty() && self.keep_alive && self.version == 1 {
            // The common case: nothing else to say (one copy instead of three).
            out.extend_from_slice(b"\r\n\r\n");
        } else {
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(extra.as_bytes());
            if !self.keep_alive {
                out.extend_from_slice(b"Connection: close\r\n");
            } else if self.version == 0 {
                out.extend_from_slice(b"Connection: keep-alive\r\n");
            }
            out.extend_from_slice(b"\r\n");
        }
        if !self.head {
            out.extend_from_slice(body);
        }
        Sent {
            status,
            upgrade: None,
            deferred: None,
            deflate: None,
            declined: false,
        }
    }

    /// Answers later: the connection keeps a [`Pending`] with `id` and reads no further request
    /// until the caller answers it. Nothing is written now.
    pub fn defer(self, id: u64) -> Sent {
        Sent {
            status: 0,
            upgrade: None,
            deferred: Some(Pending {
                id,
                head: self.head,
                keep_alive: self.keep_alive,
                version: self.version,
            }),
            deflate: None,
            declined: false,
        }
    }

    /// Not now: a request [`Request::behind`] deferred ones that is not deferred itself. Nothing
    /// is written; the request stays in the input and is offered again once they are answered.
    pub fn decline(self) -> Sent {
        Sent {
            status: 0,
            upgrade: None,
            deferred: None,
            deflate: None,
            declined: true,
        }
    }

    /// Appends `p`, exactly as `send` with its parts would.
    pub fn send_prepared(self, p: &Prepared) -> Sent {
        if !self.keep_alive || self.version != 1 || self.head {
            return self.send(p.status, p.content_type, p.body, p.extra);
        }
        let out = self.out;
        if p.status == 200 {
            out.extend_from_slice(&self.date.ok_head[..DATE_AT + DATE_LEN]);
        } else {
            out.extend_from_slice(&p.line);
            out.extend_from_slice(&self.date.ok_head[OK_LINE.len()..DATE_AT + DATE_LEN]);
        }
        out.extend_from_slice(&p.tail);
        Sent {
            status: p.status,
            upgrade: None,
            deferred: None,
            deflate: None,
            declined: false,
        }
    }

    /// Completes a WebSocket handshake for the route numbered `route` (the caller's numbering,
    /// handed back in [`Outcome::upgrade`]), or answers why not: 405 for a method other than
    /// GET, 426 without `Upgrade: websocket` and `Connection: Upgrade` or with a version other
    /// than 13, 400 for a missing or malformed key or a malformed `Sec-WebSocket-Extensions`,
    /// 403 for an origin not in `allowed_origins` (empty: any origin). A permessage-deflate
    /// offer the route's `compression` accepts is answered in the 101 and handed back in
    /// [`Outcome::deflate`].
    pub fn upgrade(
        self,
        req: &Request<'_>,
        allowed_origins: &[String],
        compression: deflate::Settings,
        route: usize,
    ) -> Sent {
        if req.method != "GET" {
            return self.send(405, "text/plain", b"method not allowed\n", "Allow: GET\r\n");
        }
        let w = req.ws;
        if !w.upgrade_websocket || !w.connection_upgrade {
            return self.send(
                426,
                "text/plain",
                b"this path takes WebSocket upgrades only\n",
                "Upgrade: websocket\r\nConnection: Upgrade\r\n",
            );
        }
        if !w.version_13 {
            return self.send(
                426,
                "text/plain",
                b"unsupported WebSocket version\n",
                "Sec-WebSocket-Version: 13\r\n",
            );
        }
        let key = match req.ws_key {
            Some(k) if super::ws::valid_key(k) => k,
            _ => {
                return self.send(
                    400,
                    "text/plain",
                    b"missing or invalid Sec-WebSocket-Key\n",
                    "",
                )
            }
        };
        let offers = req
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(b"sec-websocket-extensions"))
            .map(|h| h.value);
        let answer = match deflate::negotiate(offers, compression) {
            Ok(a) => a,
            Err(e) => {
                let mut body = e.to_string().into_bytes();
                body.push(b'\n');
                return self.send(400, "text/plain", &body, "");
            }
        };
        if !allowed_origins.is_empty()
            && !req
                .origin
                .is_some_and(|o| allowed_origins.iter().any(|a| a.as_bytes() == o))
        {
            return self.send(403, "text/plain", b"origin not allowed\n", "");
        }
        let out = self.out;
        out.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ");
        out.extend_from_slice(super::ws::accept_key(key).as_bytes());
        out.extend_from_slice(b"\r\n");
        if let Some(a) = &answer {
            a.write_header(out);
        }
        out.extend_from_slice(b"\r\n");
        Sent {
            status: 101,
            upgrade: Some(route),
            deferred: None,
            deflate: answer.map(|a| a.agreed),
            declined: false,
        }
    }
}

/// Whether the field name `name` (token characters) is `lower` (lowercase letters and `-`) in
/// any case. Setting bit 0x20 folds case exactly here: the only other bytes it maps onto a
/// letter or `-` are control characters, which no token holds. No early exit (the names
/// compared have the length already, and are short).
#[inline]
fn named(name: &[u8], lower: &[u8]) -> bool {
    name.len() == lower.len()
        && name
            .iter()
            .zip(lower)
            .fold(0, |d, (&a, &b)| d | ((a | 0x20) ^ b))
            == 0
}

fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// `Content-Length = 1*DIGIT`, without overflow.
fn parse_length(v: &[u8]) -> Option<usize> {
    let v = v.trim_ascii();
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0usize, |n, &d| {
        n.checked_mul(10)?.checked_add(usize::from(d - b'0'))
    })
}

/// `Host = uri-host [ ":" port ]`: the reg-name, IPv4 and IP-literal alphabet, possibly empty.
fn valid_host(v: &[u8]) -> bool {
    // Eight bytes per step, the last step overlapping the one before, no early exit: unrolled
    // table lookups (a byte loop costs twice as much on a short value).
    let all = |c: &[u8]| c.iter().fold(true, |ok, &b| ok & HOST_BYTES[b as usize]);
    if v.len() < 8 {
        return all(v);
    }
    let mut ok = all(&v[v.len() - 8..]);
    for c in v.chunks_exact(8) {
        ok &= all(c);
    }
    ok
}

/// The bytes a Host value may hold (a table: one load per byte on the per-request path).
static HOST_BYTES: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'%'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b';'
                    | b'='
                    | b':'
                    | b'['
                    | b']'
            );
        b += 1;
    }
    t
};

/// Splits a target into the path to route on and the query.
fn route_path(target: &str) -> (&str, Option<&str>) {
    let rest = if target.starts_with('/') || target == "*" {
        target
    } else {
        // Absolute form: drop `scheme://authority`.
        let lower = |n: usize| target.get(..n).map(str::to_ascii_lowercase);
        let after = if lower(7).as_deref() == Some("http://") {
            &target[7..]
        } else if lower(8).as_deref() == Some("https://") {
            &target[8..]
        } else {
            return (target, None); // authority form or nonsense: no route matches
        };
        match after.find(['/', '?']) {
            Some(i) => &after[i..],
            None => "/",
        }
    };
    // A byte search: `split_once('?')` goes through the char searcher, slower per request.
    match rest.bytes().position(|b| b == b'?') {
        Some(0) => ("/", Some(&rest[1..])),
        Some(q) => (&rest[..q], Some(&rest[q + 1..])),
        None => (rest, None),
    }
}

/// The request line's version token when it is `HTTP/<digit>[.<digit>]` (any version httparse
/// refused): such a request gets 505, anything else that fails to parse gets 400.
fn unsupported_version(buf: &[u8]) -> bool {
    let line = buf.split(|&b| b == b'\n').next().unwrap_or(buf);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    if method.is_empty() || target.is_empty() {
        return false;
    }
    match version.strip_prefix(b"HTTP/") {
        Some([major]) => major.is_ascii_digit(),
        Some([major, b'.', minor]) => {
            major.is_ascii_digit() && minor.is_ascii_digit() && !(*major == b'1' && *minor <= b'1')
        }
        _ => false,
    }
}

/// Whether the header block `buf[..hlen]` ends in CRLF CRLF. httparse also takes a bare LF as a
/// line end; a proxy in front that does not would read `X: a\nContent-Length: 5` as one field,
/// and the two would disagree about where the request ends. The lines before the last are
/// checked in the field loop: each field's name must follow a CR LF ([`after_crlf`]).
fn ends_in_crlf(buf: &[u8], hlen: usize) -> bool {
    buf[..hlen].ends_with(b"\r\n\r\n")
}

/// Whether the field named `name` (a slice of `buf`) starts a line that a CR LF ended.
#[inline]
fn after_crlf(buf: &[u8], name: &str) -> bool {
    // httparse has checked that a line end (LF) precedes the name: only the CR is in question.
    let at = (name.as_ptr() as usize).wrapping_sub(buf.as_ptr() as usize);
    at.checked_sub(2).and_then(|i| buf.get(i)) == Some(&b'\r')
}

/// Whether the request line in `buf` (complete or not) already carries a target over `limit`.
fn target_too_long(buf: &[u8], limit: usize) -> bool {
    let line = buf.split(|&b| b == b'\n').next().unwrap_or(buf);
    let Some(sp) = line.iter().position(|&b| b == b' ') else {
        return false;
    };
    let target = &line[sp + 1..];
    let end = target
        .iter()
        .position(|&b| b == b' ')
        .unwrap_or(target.len());
    end > limit
}

/// A head as httparse parsed it (see [`Http::parse_slow`]).
struct SlowHead<'a> {
    method: &'a str,
    target: &'a str,
    version: u8,
    fields: [Field<'a>; MAX_HEADERS],
    count: usize,
    len: usize,
    /// Every line ends in CRLF (httparse also takes a bare LF).
    crlf: bool,
}

/// The HTTP handler of one listener on one shard.
pub struct Http {
    pub settings: HttpSettings,
}

impl Http {
    pub fn new(settings: HttpSettings) -> Self {
        Http { settings }
    }

    /// Handles every complete request at the start of `input`, appending responses to `out`
    /// until `out` reaches `budget` bytes. Generic over the handler so that the routes inline
    /// into the per-request loop (a `dyn Handler` works too).
    pub fn handle<H: Handler + ?Sized>(
        &self,
        conn: &mut HttpConn,
        input: &[u8],
        out: &mut Vec<u8>,
        budget: usize,
        date: &DateCache,
        handler: &mut H,
    ) -> Outcome {
        let mut o = Outcome::new();
        if let Some(first) = conn.pending {
            self.handle_behind(conn, first, input, out, budget, date, handler, &mut o);
            return o;
        }
        self.handle_requests(conn, input, out, budget, date, handler, &mut o, None);
        if let (true, false, Some(first)) = (o.deferred, o.close, conn.pending) {
            // The requests pipelined behind it that are deferred too go now.
            self.handle_behind(conn, first, input, out, budget, date, handler, &mut o);
        }
        // The timer runs from a request's first byte: a request left partial after others
        // completed in this call began here, and gets a timer of its own.
        o.timer = if o.partial && !o.close {
            if o.consumed > 0 || !conn.timer_armed {
                conn.timer_armed = true;
                HeaderTimer::Start
            } else {
                HeaderTimer::Keep
            }
        } else if conn.timer_armed {
            conn.timer_armed = false;
            HeaderTimer::Stop
        } else {
            HeaderTimer::Keep
        };
        o
    }

    /// Behind deferred requests (`first` and `conn.queued` more): takes the complete requests
    /// the handler defers as well, one at a time, and stops, leaving everything as it was, at the
    /// first other one (declined, answered at once, refused by the framing, partial, or framed
    /// otherwise than `first`). The header timer is left alone: the deferral's timer runs.
    #[allow(clippy::too_many_arguments)]
    fn handle_behind<H: Handler + ?Sized>(
        &self,
        conn: &mut HttpConn,
        first: Pending,
        input: &[u8],
        out: &mut Vec<u8>,
        budget: usize,
        date: &DateCache,
        handler: &mut H,
        o: &mut Outcome,
    ) {
        if !first.keep_alive || first.head {
            return;
        }
        while conn.queued + 1 < MAX_DEFERRED && o.consumed < input.len() {
            let (mark, saved) = (out.len(), *conn);
            let mut one = Outcome::new();
            one.consumed = o.consumed;
            let behind = Behind {
                id: first.id + u64::from(conn.queued) + 1,
                version: first.version,
            };
            self.handle_requests(
                conn,
                input,
                out,
                budget,
                date,
                handler,
                &mut one,
                Some(behind),
            );
            if one.deferred && conn.queued > saved.queued && !one.close {
                o.consumed = one.consumed;
                o.queued += 1;
                continue;
            }
            debug_assert!(
                one.responses == 0 || one.close || one.partial || one.stopped,
                "a request behind deferred ones was answered at once"
            );
            out.truncate(mark);
            *conn = saved;
            return;
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn handle_requests<H: Handler + ?Sized>(
        &self,
        conn: &mut HttpConn,
        input: &[u8],
        out: &mut Vec<u8>,
        budget: usize,
        date: &DateCache,
        handler: &mut H,
        o: &mut Outcome,
        behind: Option<Behind>,
    ) {
        let max_target = self.settings.max_target();
        // The fast path's fields, once per call (a memset of 512 bytes, shared by every
        // pipelined request of the input).
        let mut fast = [Field::EMPTY; FAST_FIELDS];
        while o.consumed < input.len() {
            if out.len() >= budget {
                o.stopped = true;
                return;
            }
            let buf = &input[o.consumed..];
            let slow_fields: [Field<'_>; MAX_HEADERS];
            // The common strict form without httparse (`head`); anything else through it.
            let quick = head::parse(buf, &mut fast);
            // The tests can send every request through httparse, to hold the two paths to
            // the same answers.
            #[cfg(test)]
            let quick = quick.filter(|_| !tests::SLOW_ONLY.get());
            if behind.is_some() && quick.is_none() {
                // Partial, or not the strict form: it waits for the deferred answers.
                return;
            }
            let (method, target, split, version, fields, hlen, crlf) = match quick {
                Some(h) => {
                    // An origin-form target splits at its first `?` (as `route_path` does).
                    let split = match h.query {
                        _ if !h.target.starts_with('/') => None,
                        Some(q) => Some((&h.target[..q], Some(&h.target[q + 1..]))),
                        None => Some((h.target, None)),
                    };
                    let fields = &fast[..h.fields];
                    // Every line of this form ends in CRLF.
                    (h.method, h.target, split, h.version, fields, h.len, true)
                }
                None => {
                    let Some(slow) = self.parse_slow(buf, out, date, o) else {
                        return;
                    };
                    slow_fields = slow.fields;
                    let fields = &slow_fields[..slow.count];
                    let (m, t, v, len, crlf) =
                        (slow.method, slow.target, slow.version, slow.len, slow.crlf);
                    (m, t, None, v, fields, len, crlf)
                }
            };
            if target.len() > max_target {
                o.fail(out, date, 414, "request target too long");
                return;
            }
            if hlen > self.settings.max_header {
                o.fail(out, date, 431, "request header fields too large");
                return;
            }
            let mut content_length: Option<usize> = None;
            let mut codings = 0u32;
            let mut unknown_coding = false;
            let mut transfer_encoding = false;
            let mut hosts = 0u32;
            let mut expect_continue = false;
            let mut conn_close = false;
            let mut conn_keep_alive = false;
            let mut ws = WsHeaders::default();
            let mut ws_key = None;
            let mut origin = None;
            let mut bad: Option<&str> = None;
            for h in fields {
                let v = h.value;
                let name = h.name;
                // Dispatch on length first: most headers are compared against nothing.
                match name.len() {
                    4 if named(name, b"host") => {
                        hosts += 1;
                        // Values never start or end with whitespace (both parsers trim spaces
                        // and tabs and refuse other control bytes): no trim needed.
                        if !valid_host(v) {
                            bad = Some("invalid Host");
                        }
                    }
                    14 if named(name, b"content-length") => {
                        match (parse_length(v), content_length) {
                            (Some(n), None) => content_length = Some(n),
                            (Some(n), Some(m)) if n == m => {}
                            _ => bad = Some("invalid Content-Length"),
                        }
                    }
                    17 if named(name, b"transfer-encoding") => {
                        transfer_encoding = true;
                        // A list; empty elements are allowed and ignored (RFC 9110 5.6.1).
                        for t in v.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                            if t.is_empty() {
                                continue;
                            }
                            codings += 1;
                            unknown_coding |= !t.eq_ignore_ascii_case(b"chunked");
                        }
                    }
                    10 if named(name, b"connection") => {
                        // One pass over the tokens (a list like `keep-alive, Upgrade`).
                        for t in v.split(|&b| b == b',') {
                            let t = t.trim_ascii();
                            match t.len() {
                                5 => conn_close |= t.eq_ignore_ascii_case(b"close"),
                                10 => conn_keep_alive |= t.eq_ignore_ascii_case(b"keep-alive"),
                                7 => ws.connection_upgrade |= t.eq_ignore_ascii_case(b"upgrade"),
                                _ => {}
                            }
                        }
                    }
                    6 if named(name, b"expect") => {
                        expect_continue = v.trim_ascii().eq_ignore_ascii_case(b"100-continue");
                    }
                    6 if named(name, b"origin") => origin = Some(v.trim_ascii()),
                    7 if named(name, b"upgrade") => {
                        ws.upgrade_websocket = has_token(v, "websocket")
                    }
                    21 if named(name, b"sec-websocket-version") => {
                        ws.version_13 = v.trim_ascii() == b"13";
                    }
                    17 if named(name, b"sec-websocket-key") => ws_key = Some(v.trim_ascii()),
                    _ => {}
                }
            }
            if !crlf {
                o.fail(out, date, 400, "lines must end in CRLF");
                return;
            }
            if let Some(reason) = bad {
                o.fail(out, date, 400, reason);
                return;
            }
            if hosts > 1 {
                o.fail(out, date, 400, "more than one Host");
                return;
            }
            if hosts == 0 && version == 1 {
                o.fail(out, date, 400, "Host is required in HTTP/1.1");
                return;
            }
            if transfer_encoding && content_length.is_some() {
                o.fail(out, date, 400, "both Content-Length and Transfer-Encoding");
                return;
            }
            if transfer_encoding && codings == 0 {
                o.fail(out, date, 400, "empty Transfer-Encoding");
                return;
            }
            if unknown_coding {
                o.fail(
                    out,
                    date,
                    501,
                    "transfer coding not implemented: send Content-Length",
                );
                return;
            }
            if transfer_encoding {
                o.fail(
                    out,
                    date,
                    411,
                    "chunked request bodies are not accepted: send Content-Length",
                );
                return;
            }
            let body_len = content_length.unwrap_or(0);
            if body_len > self.settings.max_body {
                o.fail(out, date, 413, "request body larger than max_body");
                return;
            }
            if buf.len() < hlen + body_len {
                if expect_continue && !conn.continue_sent {
                    out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                    conn.continue_sent = true;
                }
                o.partial = true;
                return;
            }
            conn.continue_sent = false;
            let keep_alive = !conn_close && (version == 1 || conn_keep_alive);
            if let Some(b) = behind {
                // Its answer must be framed like the deferred ones' (`Pending` is shared).
                if !keep_alive || version != b.version || method == "HEAD" {
                    return;
                }
            }
            let (path, query) = split.unwrap_or_else(|| route_path(target));
            let request = Request {
                behind: behind.map(|b| b.id),
                method,
                target,
                path,
                query,
                version,
                body: &buf[hlen..hlen + body_len],
                headers: fields,
                ws,
                ws_key,
                origin,
            };
            o.consumed += hlen + body_len;
            let resp = Response {
                out,
                date,
                head: method == "HEAD",
                keep_alive,
                version,
            };
            let sent = handler.request(&request, resp);
            if sent.declined {
                debug_assert!(behind.is_some(), "declined outside a pipeline of deferrals");
                o.consumed -= hlen + body_len;
                return;
            }
            if let Some(p) = sent.deferred {
                match (behind, conn.pending) {
                    (Some(b), Some(_)) => {
                        debug_assert_eq!(
                            p.id, b.id,
                            "a deferral behind others takes their next id"
                        );
                        conn.queued += 1;
                    }
                    _ => conn.pending = Some(p),
                }
                o.deferred = true;
                return;
            }
            if behind.is_some() {
                // Answered at once behind deferred requests: the caller takes it back.
                o.count(sent.status);
                return;
            }
            o.count(sent.status);
            if let Some(route) = sent.upgrade {
                o.upgrade = Some(route);
                o.deflate = sent.deflate;
                return;
            }
            if !keep_alive {
                o.close = true;
                return;
            }
        }
    }

    /// httparse on a head the fast path did not take: its result with the fields copied out,
    /// or `None` when the request is partial or refused (`o` then says which, with the error
    /// response written).
    fn parse_slow<'a>(
        &self,
        buf: &'a [u8],
        out: &mut Vec<u8>,
        date: &DateCache,
        o: &mut Outcome,
    ) -> Option<SlowHead<'a>> {
        // Uninitialised header slots: initialising 32 of them would cost a 1 KiB memset.
        let mut headers =
            [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let len = match req.parse_with_uninit_headers(buf, &mut headers) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                if target_too_long(buf, self.settings.max_target()) {
                    o.fail(out, date, 414, "request target too long");
                } else if buf.len() > self.settings.max_header {
                    o.fail(out, date, 431, "request header fields too large");
                } else {
                    o.partial = true;
                }
                return None;
            }
            Err(httparse::Error::TooManyHeaders) => {
                o.fail(out, date, 431, "too many header fields");
                return None;
            }
            Err(httparse::Error::Version) if unsupported_version(buf) => {
                o.fail(
                    out,
                    date,
                    505,
                    "HTTP version not supported: this server speaks 1.0 and 1.1",
                );
                return None;
            }
            Err(e) => {
                o.fail(out, date, 400, &format!("malformed request: {e}"));
                return None;
            }
        };
        let crlf = ends_in_crlf(buf, len) && req.headers.iter().all(|h| after_crlf(buf, h.name));
        let mut fields = [Field::EMPTY; MAX_HEADERS];
        for (f, h) in fields.iter_mut().zip(req.headers.iter()) {
            *f = Field {
                name: h.name.as_bytes(),
                value: h.value,
            };
        }
        Some(SlowHead {
            method: req.method.unwrap_or(""),
            target: req.path.unwrap_or("/"),
            version: req.version.unwrap_or(1),
            fields,
            count: req.headers.len(),
            len,
            crlf,
        })
    }

    /// The 408 answer when the header timer fires.
    pub fn timeout_response(out: &mut Vec<u8>, date: &DateCache) {
        error(out, date, 408, "request not complete within header_timeout");
    }
}

fn status_line(out: &mut Vec<u8>, status: u16) {
    out.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(out, status as usize);
    out.push(b' ');
    out.extend_from_slice(reason(status).as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn push_decimal(out: &mut Vec<u8>, mut n: usize) {
    // Most lengths and every status have two or three digits: no loop, no digit buffer.
    if n < 100 {
        if n < 10 {
            out.push(b'0' + n as u8);
        } else {
            out.extend_from_slice(&[b'0' + (n / 10) as u8, b'0' + (n % 10) as u8]);
        }
        return;
    }
    if n < 1000 {
        let d = [
            b'0' + (n / 100) as u8,
            b'0' + (n / 10 % 10) as u8,
            b'0' + (n % 10) as u8,
        ];
        out.extend_from_slice(&d);
        return;
    }
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// An error response that closes the connection.
fn error(out: &mut Vec<u8>, date: &DateCache, status: u16, message: &str) {
    let body = format!("{message}\n");
    let _ = Response {
        out,
        date,
        head: false,
        keep_alive: false,
        version: 1,
    }
    .send(status, "text/plain", body.as_bytes(), "");
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Routes `/ok` (200, echoing the body length), `/ws` (upgrade, compression shared),
    /// `/ws/plain` (upgrade, compression off), anything else 404.
    struct Echo;

    const SHARED: deflate::Settings = deflate::Settings {
        mode: crate::config::Compression::Shared,
        window_bits: 12,
    };
    const OFF: deflate::Settings = deflate::Settings {
        mode: crate::config::Compression::Off,
        window_bits: 12,
    };

    impl Handler for Echo {
        fn request(&mut self, req: &Request<'_>, resp: Response<'_>) -> Sent {
            if let Some(id) = req.behind() {
                return match req.path() {
                    "/later" => resp.defer(id),
                    _ => resp.decline(),
                };
            }
            match req.path() {
                "/ok" => resp.send(200, "text/plain", req.body(), ""),
                "/ws" => resp.upgrade(req, &[], SHARED, 0),
                "/ws/plain" => resp.upgrade(req, &[], OFF, 1),
                "/later" => resp.defer(7),
                _ => resp.send(404, "text/plain", b"", ""),
            }
        }
    }

    fn http() -> Http {
        Http::new(HttpSettings {
            max_header: 16 * 1024,
            max_body: 1024,
            header_timeout: Duration::from_secs(1),
        })
    }

    /// `input` offered to `conn` with no output budget, to the `Echo` routes.
    fn offer(conn: &mut HttpConn, input: &[u8], out: &mut Vec<u8>) -> Outcome {
        http().handle(
            conn,
            input,
            out,
            usize::MAX,
            &DateCache::default(),
            &mut Echo,
        )
    }

    fn run(input: &[u8]) -> (Outcome, String) {
        let mut conn = HttpConn::default();
        let mut out = Vec::new();
        let o = http().handle(
            &mut conn,
            input,
            &mut out,
            usize::MAX,
            &DateCache::default(),
            &mut Echo,
        );
        (o, String::from_utf8_lossy(&out).into_owned())
    }

    #[track_caller]
    fn status_of(input: &[u8]) -> u16 {
        let (o, out) = run(input);
        assert!(o.responses >= 1, "no response to {input:?}");
        assert_eq!(out[9..12].parse::<u16>().unwrap(), o.status);
        o.status
    }

    /// Pipelined deferrals are taken one after another (ids in order), anything else waits
    /// behind them, and answering them in order lets the rest through.
    #[test]
    fn deferred_requests_pipeline_behind_each_other() {
        let date = DateCache::default();
        let mut conn = HttpConn::default();
        let mut out = Vec::new();
        let later = b"POST /later HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi";
        let mut input = Vec::new();
        for _ in 0..3 {
            input.extend_from_slice(later);
        }
        let three = input.len();
        input.extend_from_slice(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n");
        let o = offer(&mut conn, &input, &mut out);
        assert_eq!(
            (o.consumed, o.responses, o.deferred, o.queued),
            (three, 0, true, 2)
        );
        assert!(out.is_empty(), "nothing is answered yet");
        assert_eq!(conn.deferred(), 3);
        assert!(conn.is_queued(8) && conn.is_queued(9) && !conn.is_queued(7));
        // The GET waits behind them, however often it is offered.
        let o = offer(&mut conn, &input[three..], &mut out);
        assert_eq!((o.consumed, o.responses, o.queued), (0, 0, 0));
        for id in 7..=9 {
            let p = conn.take_pending().unwrap();
            assert_eq!(p.id, id);
            let _ = p.respond(&mut out, &date).send(200, "text/plain", b"", "");
        }
        assert_eq!(conn.deferred(), 0);
        let o = offer(&mut conn, &input[three..], &mut out);
        assert_eq!((o.consumed, o.responses), (input.len() - three, 1));
    }

    /// Behind a deferral: a partial request, HEAD, another version, `Connection: close` and a
    /// framing error all wait (nothing written, nothing consumed); the bound holds.
    #[test]
    fn only_complete_deferrals_framed_alike_pipeline() {
        let later = b"POST /later HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi".to_vec();
        let waiting: [&[u8]; 5] = [
            b"POST /later HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nh",
            b"HEAD /later HTTP/1.1\r\nHost: a\r\n\r\n",
            b"POST /later HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nhi",
            b"POST /later HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi",
            b"POST /later HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\nhi",
        ];
        for next in waiting {
            let mut conn = HttpConn::default();
            let mut out = Vec::new();
            let input = [&later[..], next].concat();
            let o = offer(&mut conn, &input, &mut out);
            assert_eq!(
                (o.consumed, o.queued, o.close),
                (later.len(), 0, false),
                "{next:?}"
            );
            assert!(out.is_empty(), "{next:?}");
            assert_eq!(conn.deferred(), 1, "{next:?}");
        }
        let mut conn = HttpConn::default();
        let mut out = Vec::new();
        let input = later.repeat(usize::from(MAX_DEFERRED) + 5);
        let o = offer(&mut conn, &input, &mut out);
        assert_eq!(conn.deferred(), usize::from(MAX_DEFERRED));
        assert_eq!(o.consumed, later.len() * usize::from(MAX_DEFERRED));
    }

    #[test]
    fn a_deferred_answer_holds_back_the_pipeline() {
        let date = DateCache::default();
        let mut conn = HttpConn::default();
        let mut out = Vec::new();
        let input = b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\nPOST /later HTTP/1.1\r\nHost: a\r\n\
                      Content-Length: 2\r\n\r\nhiGET /ok HTTP/1.1\r\nHost: a\r\n\r\n";
        let o = offer(&mut conn, input, &mut out);
        let first = input.windows(4).position(|w| w == b"hiGE").unwrap() + 2;
        assert_eq!((o.consumed, o.responses, o.deferred), (first, 1, true));
        assert_eq!(conn.pending().map(|p| p.id), Some(7));
        // While it waits, nothing more is read.
        let o = offer(&mut conn, &input[first..], &mut out);
        assert_eq!((o.consumed, o.responses), (0, 0));
        let p = conn.take_pending().unwrap();
        assert!(p.keep_alive());
        let _ = p
            .respond(&mut out, &date)
            .send(503, "text/plain", b"later\n", "");
        let o = offer(&mut conn, &input[first..], &mut out);
        assert_eq!((o.consumed, o.responses), (input.len() - first, 1));
        let text = String::from_utf8(out).unwrap();
        let statuses: Vec<&str> = text.split("HTTP/1.1 ").skip(1).map(|r| &r[..3]).collect();
        assert_eq!(statuses, ["200", "503", "200"], "in request order: {text}");
        assert!(text.contains("later\n"));
    }

    #[test]
    fn content_length_must_be_digits() {
        for bad in [
            "+1",
            "-1",
            " 1 2",
            "0x1",
            "1.0",
            "",
            "1,1",
            "99999999999999999999999",
        ] {
            let req = format!("POST /ok HTTP/1.1\r\nHost: a\r\nContent-Length: {bad}\r\n\r\nx");
            assert_eq!(status_of(req.as_bytes()), 400, "Content-Length: {bad:?}");
        }
        let req =
            b"POST /ok HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx";
        assert_eq!(
            status_of(req),
            200,
            "a repeated identical length is one length"
        );
        let req =
            b"POST /ok HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxy";
        assert_eq!(status_of(req), 400);
    }

    #[test]
    fn host_is_required_once_in_http11() {
        assert_eq!(status_of(b"GET /ok HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(
            status_of(b"GET /ok HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
            400
        );
        assert_eq!(
            status_of(b"GET /ok HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n"),
            400
        );
        assert_eq!(status_of(b"GET /ok HTTP/1.1\r\nHost: a b\r\n\r\n"), 400);
        assert_eq!(
            status_of(b"GET /ok HTTP/1.0\r\n\r\n"),
            200,
            "1.0 needs none"
        );
        assert_eq!(
            status_of(b"GET /ok HTTP/1.1\r\nHost: [::1]:80\r\n\r\n"),
            200
        );
        assert_eq!(
            status_of(b"GET /ok HTTP/1.1\r\nHost:\r\n\r\n"),
            200,
            "empty is valid"
        );
    }

    #[test]
    fn absolute_form_is_routed_by_its_path() {
        assert_eq!(
            status_of(b"GET http://a/ok HTTP/1.1\r\nHost: a\r\n\r\n"),
            200
        );
        assert_eq!(
            status_of(b"GET HTTPS://a:1/ok?x=1 HTTP/1.1\r\nHost: a\r\n\r\n"),
            200
        );
        assert_eq!(route_path("http://a"), ("/", None));
        assert_eq!(route_path("http://a?q"), ("/", Some("q")));
        assert_eq!(route_path("/p?q=1"), ("/p", Some("q=1")));
        assert_eq!(route_path("a:80"), ("a:80", None));
    }

    #[test]
    fn long_targets_get_414_even_before_the_line_ends() {
        let long = "a".repeat(MAX_TARGET);
        let req = format!("GET /{long} HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(status_of(req.as_bytes()), 414);
        let partial = format!("GET /{long}");
        assert_eq!(status_of(partial.as_bytes()), 414, "no line end yet");
        let ok = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", &long[1..]);
        assert_eq!(
            status_of(ok.as_bytes()),
            404,
            "exactly the limit is accepted"
        );
    }

    #[test]
    fn transfer_codings() {
        let te =
            |v: &str| format!("POST /ok HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: {v}\r\n\r\n");
        assert_eq!(status_of(te("chunked").as_bytes()), 411);
        assert_eq!(status_of(te("Chunked, ").as_bytes()), 411);
        assert_eq!(status_of(te("gzip, chunked").as_bytes()), 501);
        assert_eq!(status_of(te("foo").as_bytes()), 501);
        assert_eq!(status_of(te(",").as_bytes()), 400);
        let both = b"POST /ok HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\nx";
        assert_eq!(status_of(both), 400);
    }

    #[test]
    fn other_versions_get_505() {
        for v in ["HTTP/2.0", "HTTP/1.2", "HTTP/0.9", "HTTP/3"] {
            let req = format!("GET /ok {v}\r\nHost: a\r\n\r\n");
            assert_eq!(status_of(req.as_bytes()), 505, "{v}");
        }
        assert_eq!(status_of(b"GET /ok HTTP/x\r\n\r\n"), 400);
        assert_eq!(status_of(b"GET /ok FTP/1.1\r\n\r\n"), 400);
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        // obs-fold, space before the colon, a bad byte in a name.
        assert_eq!(
            status_of(b"GET /ok HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n"),
            400
        );
        assert_eq!(status_of(b"GET /ok HTTP/1.1\r\nHost : a\r\n\r\n"), 400);
        assert_eq!(status_of(b"GET /ok HTTP/1.1\r\nHo\x01st: a\r\n\r\n"), 400);
        // Bare LF, in any position.
        assert_eq!(status_of(b"GET /ok HTTP/1.1\nHost: a\r\n\r\n"), 400);
        assert_eq!(status_of(b"GET /ok HTTP/1.1\r\nHost: a\nX: b\r\n\r\n"), 400);
        assert_eq!(status_of(b"GET /ok HTTP/1.1\r\nHost: a\r\n\n"), 400);
        assert_eq!(status_of(b"GET /ok HTTP/1.0\n\n"), 400);
        assert_eq!(status_of(b"GET /ok HTTP/1.0\r\n\r\n"), 200);
    }

    #[test]
    fn statuses_are_reported_per_response() {
        let (o, _) = run(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\nGET /no HTTP/1.1\r\nHost: a\r\n\r\nGET /ok HTTP/1.1\r\n\r\n");
        assert_eq!(
            (o.responses, o.errors, o.status, o.close),
            (3, 2, 400, true)
        );
        let (o, _) = run(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(
            (o.responses, o.errors, o.status, o.close),
            (1, 0, 200, false)
        );
    }

    #[test]
    fn header_timer_restarts_for_each_request() {
        let mut conn = HttpConn::default();
        let req = b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n";
        let mut held: Vec<u8> = Vec::new();
        let mut timers = Vec::new();
        // Every read ends in the middle of the next request.
        let mut stream: Vec<u8> = Vec::new();
        for _ in 0..4 {
            stream.extend_from_slice(req);
        }
        for chunk in stream
            .chunks(req.len())
            .map(|c| c.to_vec())
            .collect::<Vec<_>>()
        {
            let (a, b) = chunk.split_at(10);
            for piece in [a, b] {
                held.extend_from_slice(piece);
                let mut out = Vec::new();
                let o = offer(&mut conn, &held, &mut out);
                held.drain(..o.consumed);
                timers.push(o.timer);
            }
        }
        use HeaderTimer::*;
        assert_eq!(timers, [Start, Stop, Start, Stop, Start, Stop, Start, Stop]);

        // Reads offset by half a request: each completes one and starts the next.
        let mut conn = HttpConn::default();
        held.clear();
        timers.clear();
        let mut pos = 0;
        let mut step = 10;
        while pos < stream.len() {
            let end = (pos + step).min(stream.len());
            held.extend_from_slice(&stream[pos..end]);
            pos = end;
            step = req.len();
            let mut out = Vec::new();
            let o = offer(&mut conn, &held, &mut out);
            held.drain(..o.consumed);
            timers.push(o.timer);
        }
        assert_eq!(timers, [Start, Start, Start, Start, Stop]);

        // More bytes of the same request keep the timer running from its first byte.
        let mut conn = HttpConn::default();
        let mut out = Vec::new();
        let o = offer(&mut conn, b"GET /ok", &mut out);
        assert_eq!(o.timer, Start);
        let o = offer(&mut conn, b"GET /ok HTTP/1.1\r\n", &mut out);
        assert_eq!(o.timer, Keep);
    }

    #[test]
    fn upgrade_checks() {
        let up = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n";
        let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
        let (o, out) = run(format!("GET /ws HTTP/1.1\r\nHost: a\r\n{up}{key}\r\n").as_bytes());
        assert_eq!((o.upgrade, o.status), (Some(0), 101));
        assert!(out.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
        assert_eq!(
            status_of(format!("GET /ws HTTP/1.1\r\nHost: a\r\n{up}\r\n").as_bytes()),
            400
        );
        assert_eq!(
            status_of(
                format!("POST /ws HTTP/1.1\r\nHost: a\r\n{up}{key}Content-Length: 0\r\n\r\n")
                    .as_bytes()
            ),
            405
        );
    }

    #[test]
    fn upgrade_negotiates_permessage_deflate() {
        let up = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                  Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
        let ask = |path: &str, ext: &str| {
            run(format!("GET {path} HTTP/1.1\r\nHost: a\r\n{up}{ext}\r\n").as_bytes())
        };
        let (o, out) = ask(
            "/ws",
            "Sec-WebSocket-Extensions: x-foo, permessage-deflate; client_max_window_bits\r\n",
        );
        assert_eq!((o.status, o.upgrade), (101, Some(0)));
        assert_eq!(
            o.deflate,
            Some(Agreed {
                window_bits: 15,
                takeover: false
            })
        );
        assert!(
            out.ends_with(
                "\r\nSec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; \
                 client_no_context_takeover\r\n\r\n"
            ),
            "{out}"
        );
        // Offers spread over two header lines count as one list.
        let (o, out) = ask(
            "/ws",
            "Sec-WebSocket-Extensions: x-foo\r\nSec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=10\r\n",
        );
        assert_eq!(o.deflate.map(|a| a.window_bits), Some(10));
        assert!(out.contains("; server_max_window_bits=10\r\n"), "{out}");
        // Declined: no extension header, an uncompressed connection.
        for (path, ext) in [
            ("/ws", ""),
            (
                "/ws",
                "Sec-WebSocket-Extensions: x-webkit-deflate-frame\r\n",
            ),
            (
                "/ws",
                "Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=8\r\n",
            ),
            (
                "/ws/plain",
                "Sec-WebSocket-Extensions: permessage-deflate\r\n",
            ),
        ] {
            let (o, out) = ask(path, ext);
            assert_eq!((o.status, o.deflate), (101, None), "{ext}");
            assert!(!out.contains("Sec-WebSocket-Extensions"), "{out}");
        }
        // Malformed: 400, on every route.
        for path in ["/ws", "/ws/plain"] {
            let (o, out) = ask(
                path,
                "Sec-WebSocket-Extensions: permessage-deflate; a=\"b\r\n",
            );
            assert_eq!((o.status, o.upgrade), (400, None), "{out}");
            assert!(
                out.contains("malformed Sec-WebSocket-Extensions header"),
                "{out}"
            );
        }
    }

    thread_local! {
        /// Set: every request goes through httparse, as before the fast path (`head`).
        pub(super) static SLOW_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// Answers with everything the codec parsed (method, target, path, query, version, the
    /// fields the codec reads, the body) so that two parses compare through the response;
    /// `/ws` upgrades, `/fixed` and `/fixed404` answer prepared, `/later` answers later.
    struct Mirror {
        ok: Prepared,
        missing: Prepared,
    }

    impl Mirror {
        fn new() -> Mirror {
            Mirror {
                ok: Prepared::new(200, "text/plain", b"fixed", ""),
                missing: Prepared::new(404, "text/plain", b"gone\n", "X-A: b\r\n"),
            }
        }
    }

    impl Handler for Mirror {
        fn request(&mut self, req: &Request<'_>, resp: Response<'_>) -> Sent {
            if let Some(id) = req.behind() {
                return match req.path() {
                    "/later" => resp.defer(id),
                    _ => resp.decline(),
                };
            }
            match req.path() {
                "/ws" => return resp.upgrade(req, &[], SHARED, 0),
                "/fixed" => return resp.send_prepared(&self.ok),
                "/fixed404" => return resp.send_prepared(&self.missing),
                "/later" => return resp.defer(7),
                _ => {}
            }
            let mut body = format!(
                "{}|{}|{}|{:?}|{}|",
                req.method(),
                req.target(),
                req.path(),
                req.query(),
                req.version()
            )
            .into_bytes();
            for name in [
                "host",
                "X-A",
                "content-length",
                "transfer-encoding",
                "origin",
            ] {
                body.extend_from_slice(req.header(name).unwrap_or(b"-"));
                body.push(b'|');
            }
            body.extend_from_slice(req.body());
            resp.send(200, "text/plain", &body, "")
        }
    }

    /// The codec's outcomes and output for `input` delivered in two reads (split at `at`,
    /// the unconsumed rest carried over), with the fast path or without it.
    fn converse(input: &[u8], at: usize, slow: bool, date: &DateCache) -> (Vec<Outcome>, Vec<u8>) {
        SLOW_ONLY.set(slow);
        let h = http();
        let mut conn = HttpConn::default();
        let mut mirror = Mirror::new();
        let mut held = Vec::new();
        let mut out = Vec::new();
        let mut outcomes = Vec::new();
        for piece in [&input[..at], &input[at..]] {
            held.extend_from_slice(piece);
            let o = h.handle(&mut conn, &held, &mut out, usize::MAX, date, &mut mirror);
            held.drain(..o.consumed);
            let stop = o.close || o.upgrade.is_some();
            outcomes.push(o);
            if stop {
                break;
            }
        }
        SLOW_ONLY.set(false);
        (outcomes, out)
    }

    /// The fast path changes nothing a client sees: same outcomes, same bytes.
    #[track_caller]
    fn same_with_and_without_fast_path(input: &[u8], at: usize) {
        let date = DateCache::default();
        let at = at.min(input.len());
        let fast = converse(input, at, false, &date);
        let slow = converse(input, at, true, &date);
        assert_eq!(
            (&fast.0, String::from_utf8_lossy(&fast.1)),
            (&slow.0, String::from_utf8_lossy(&slow.1)),
            "input {:?} split at {at}",
            String::from_utf8_lossy(input)
        );
    }

    /// Valid requests and hostile ones: smuggling shapes, bare LF, obs-fold, bytes outside
    /// tokens, length and coding rules, every refusal status, the field count limit.
    fn corpus() -> Vec<Vec<u8>> {
        let mut c: Vec<Vec<u8>> = [
            &b"GET /plaintext HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"[..],
            b"GET / HTTP/1.0\r\n\r\n",
            b"GET /a?b=c&d HTTP/1.1\r\nHost: a\r\nX-A: \t v \t\r\n\r\n",
            b"GET /a?b?c HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET /? HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET * HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET *?q HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET http://a/p?q HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET HTTPS://a:1 HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET a:80 HTTP/1.1\r\nHost: a\r\n\r\n",
            b"get /x HTTP/1.1\r\nhOsT: a\r\n\r\n",
            b"GET /fixed HTTP/1.1\r\nHost: a\r\n\r\n",
            b"HEAD /fixed HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET /fixed HTTP/1.0\r\n\r\n",
            b"GET /fixed HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
            b"GET /fixed HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            b"GET /fixed404 HTTP/1.1\r\nHost: a\r\n\r\nGET /fixed404 HTTP/1.0\r\n\r\n",
            b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcGET /x HTTP/1.1\r\nHost: b\r\n\r\n",
            b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
            b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
            b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\nabc",
            b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3,3\r\n\r\nabc",
            b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3 \r\n\r\nabc",
            b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 99999\r\n\r\nabc",
            b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nab",
            b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\nab",
            b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: ,\r\n\r\n",
            b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST /x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n",
            b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\x0bchunked\r\n\r\n",
            b"POST /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nab",
            b"GET /x HTTP/1.1\r\n\r\n",
            b"GET /x HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
            b"GET /x HTTP/1.1\r\nHost: a b\r\n\r\n",
            b"GET /x HTTP/1.1\r\nHost: [::1]:80\r\n\r\n",
            b"GET /x HTTP/1.1\r\nHost: a/b\r\n\r\n",
            b"GET /x HTTP/1.1\r\nHost:\r\n\r\n",
            b"GET /x HTTP/1.1\r\nHost: \t\r\n\r\n",
            b"GET /x HTTP/1.1\nHost: a\r\n\r\n",
            b"GET /x HTTP/1.1\r\nHost: a\nX-A: b\r\n\r\n",
            b"GET /x HTTP/1.1\r\nHost: a\r\n\n",
            b"GET /x HTTP/1.0\n\n",
            b"GET /x HTTP/1.1\r\nHost: a\r\rX-A: b\r\n\r\n",
            b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: a\r\n b\r\n\r\n",
            b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: a\r\n\tb\r\n\r\n",
            b"GET /x HTTP/1.1\r\n Host: a\r\n\r\n",
            b"GET /x HTTP/1.1\r\nHost : a\r\n\r\n",
            b"GET /x HTTP/1.1\r\nHo\x01st: a\r\n\r\n",
            b"GET /x HTTP/1.1\r\nHo@st: a\r\n\r\n",
            b"GET /x HTTP/1.1\r\n: a\r\n\r\n",
            b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: a\x00b\r\n\r\n",
            b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: a\x7fb\r\n\r\n",
            b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: caf\xc3\xa9\r\n\r\n",
            b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: \xff\r\n\r\n",
            b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET /\xff HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET /a\x7f HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET /a\tb HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET  /x HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET /x  HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET /x HTTP/1.1 \r\nHost: a\r\n\r\n",
            b"G(T /x HTTP/1.1\r\nHost: a\r\n\r\n",
            b" GET /x HTTP/1.1\r\nHost: a\r\n\r\n",
            b"\r\nGET /x HTTP/1.1\r\nHost: a\r\n\r\n",
            b"\r\n\r\nGET /x HTTP/1.1\r\nHost: a\r\n\r\n",
            b"\nGET /x HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET /x HTTP/2.0\r\nHost: a\r\n\r\n",
            b"GET /x HTTP/1.2\r\nHost: a\r\n\r\n",
            b"GET /x HTTP/0.9\r\nHost: a\r\n\r\n",
            b"GET /x HTTP/3\r\nHost: a\r\n\r\n",
            b"GET /x HTTP/x\r\n\r\n",
            b"GET /x FTP/1.1\r\n\r\n",
            b"GET /x http/1.1\r\n\r\n",
            b"GET /x\r\n\r\n",
            b"GET\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n\x81\x80abcd",
            b"GET /ws HTTP/1.1\r\nHost: a\r\nupgrade: WebSocket\r\nconnection: keep-alive, upgrade\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 12\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            b"GET /x HTTP/1.1\r\nHost: a\r\nOrigin: http://o\r\n\r\n",
            b"POST /later HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhiGET /x HTTP/1.1\r\n\r\n",
        ]
        .iter()
        .map(|r| r.to_vec())
        .collect();
        // Around the fast path's field count, and httparse's limit (431 past it).
        for n in [14, 15, 16, 17, 31, 32, 33, 40] {
            let mut r = b"GET /x HTTP/1.1\r\nHost: a\r\n".to_vec();
            for i in 1..n {
                r.extend_from_slice(format!("X-{i}: {i}\r\n").as_bytes());
            }
            r.extend_from_slice(b"\r\n");
            c.push(r);
        }
        // The target and header size limits (414, 431), at and past them.
        let long = "a".repeat(MAX_TARGET);
        c.push(format!("GET /{long} HTTP/1.1\r\nHost: a\r\n\r\n").into_bytes());
        c.push(format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", &long[1..]).into_bytes());
        c.push(format!("GET /{long}").into_bytes());
        let big = "v".repeat(16 * 1024);
        c.push(format!("GET /x HTTP/1.1\r\nHost: a\r\nX-A: {big}\r\n\r\n").into_bytes());
        c.push(
            format!(
                "GET /x HTTP/1.1\r\nHost: a\r\nX-A: {}\r\n\r\n",
                &big[..16000]
            )
            .into_bytes(),
        );
        c
    }

    #[test]
    fn the_fast_path_answers_exactly_as_httparse_alone() {
        for input in corpus() {
            // Whole, and cut at every byte (a head completed by a later read).
            for at in 0..=input.len().min(400) {
                same_with_and_without_fast_path(&input, at);
            }
            same_with_and_without_fast_path(&input, input.len());
            // Pipelined behind a request that takes the fast path.
            let mut two = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n".to_vec();
            two.extend_from_slice(&input);
            same_with_and_without_fast_path(&two, two.len());
        }
    }

    #[test]
    fn the_fast_path_takes_the_common_requests() {
        // Not a behaviour a client sees; this keeps the fast path from silently never running.
        let mut fields = [Field::EMPTY; FAST_FIELDS];
        for r in [
            &b"GET /plaintext HTTP/1.1\r\nHost: a\r\n\r\n"[..],
            b"POST /publish/t HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx",
        ] {
            assert!(head::parse(r, &mut fields).is_some());
        }
    }

    #[test]
    fn prepared_responses_are_what_send_writes() {
        let date = DateCache::default();
        for (status, extra) in [(200, ""), (404, ""), (503, "Retry-After: 1\r\n")] {
            let p = Prepared::new(status, "text/plain", b"body", extra);
            for (head, keep_alive, version) in [
                (false, true, 1),
                (true, true, 1),
                (false, false, 1),
                (false, true, 0),
                (false, false, 0),
            ] {
                let resp = |out| Response {
                    out,
                    date: &date,
                    head,
                    keep_alive,
                    version,
                };
                let (mut a, mut b) = (Vec::new(), Vec::new());
                let sa = resp(&mut a).send(status, "text/plain", b"body", extra);
                let sb = resp(&mut b).send_prepared(&p);
                assert_eq!(sa.status(), sb.status());
                assert_eq!(
                    String::from_utf8_lossy(&a),
                    String::from_utf8_lossy(&b),
                    "{status} head {head} keep-alive {keep_alive} 1.{version}"
                );
            }
        }
    }

    #[test]
    fn named_is_a_case_insensitive_comparison_on_tokens() {
        let names: [&[u8]; 9] = [
            b"host",
            b"content-length",
            b"transfer-encoding",
            b"connection",
            b"expect",
            b"origin",
            b"upgrade",
            b"sec-websocket-version",
            b"sec-websocket-key",
        ];
        // Every token byte at every position, against every name of the same length.
        for lower in names {
            for i in 0..lower.len() {
                for b in 0..=255u8 {
                    if !head::is_token(b) {
                        continue;
                    }
                    let mut name = lower.to_vec();
                    name[i] = b;
                    assert_eq!(
                        named(&name, lower),
                        name.eq_ignore_ascii_case(lower),
                        "{:?}",
                        String::from_utf8_lossy(&name)
                    );
                }
            }
        }
    }

    /// Bytes that matter to the parsers, and any byte.
    fn byte() -> impl proptest::strategy::Strategy<Value = u8> {
        use proptest::prelude::*;
        prop_oneof![
            Just(b' '),
            Just(b'\t'),
            Just(b'\r'),
            Just(b'\n'),
            Just(b':'),
            Just(b'?'),
            Just(b'/'),
            Just(b','),
            Just(b'0'),
            Just(0x7f),
            Just(0x80),
            Just(0),
            Just(0x0b),
            any::<u8>(),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 3000,
            ..proptest::prelude::ProptestConfig::default()
        })]

        /// Mutations of pipelined requests (bytes replaced, inserted, removed), read in two
        /// pieces: the fast path answers exactly as httparse alone.
        #[test]
        fn mutated_requests_get_the_same_answers(
            seed in 0usize..4,
            edits in proptest::collection::vec(
                (proptest::prelude::any::<proptest::sample::Index>(), 0u8..3, byte()),
                0..5,
            ),
            at in proptest::prelude::any::<proptest::sample::Index>(),
        ) {
            let seeds: [&[u8]; 4] = [
                b"GET /p?q=1 HTTP/1.1\r\nHost: a.b:80\r\nX-A: x \t y\r\nE:\r\n\r\nGET / HTTP/1.0\r\n\r\n",
                b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nabGET /x HTTP/1.1\r\nHost: a\r\n\r\n",
                b"GET /fixed HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\n\r\nHEAD /fixed404 HTTP/1.0\r\n\r\n",
                b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            ];
            let mut buf = seeds[seed].to_vec();
            for (i, kind, b) in edits {
                let i = i.index(buf.len());
                match kind {
                    0 => buf[i] = b,
                    1 => buf.insert(i, b),
                    _ => {
                        buf.remove(i);
                    }
                }
            }
            let at = at.index(buf.len() + 1);
            same_with_and_without_fast_path(&buf, at);
        }
    }
}
