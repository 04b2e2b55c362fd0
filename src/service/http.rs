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
//!   connection then holds a [`Pending`] and reads nothing more (pipelined requests wait in the
//!   input, bounded by the engine's `max_read_buffer`) until the caller answers it with
//!   [`HttpConn::take_pending`] and [`Pending::respond`], so responses stay in request order.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::deflate::{self, Agreed};

/// Headers parsed per request; more → 431.
const MAX_HEADERS: usize = 32;

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

/// Per-connection state: two flags, and the request waiting for its answer, if any.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HttpConn {
    /// `100 Continue` was sent for the request being received.
    continue_sent: bool,
    /// The header timer runs for the request being received.
    timer_armed: bool,
    /// A request answered later ([`Response::defer`]); nothing is read while it waits.
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
            pending: None,
        }
    }
    /// The request waiting for its answer.
    pub fn pending(&self) -> Option<Pending> {
        self.pending
    }

    /// Takes the waiting request to answer it ([`Pending::respond`]); the caller then offers
    /// the input left behind it again.
    pub fn take_pending(&mut self) -> Option<Pending> {
        self.pending.take()
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

/// The cached `Date` header value, reformatted at most once per second.
pub struct DateCache {
    second: u64,
    value: [u8; 29],
}

impl Default for DateCache {
    fn default() -> Self {
        let mut d = DateCache {
            second: u64::MAX,
            value: [b' '; 29],
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
        if s.len() == 29 {
            self.value.copy_from_slice(s.as_bytes());
        }
        true
    }

    pub fn get(&self) -> &[u8] {
        &self.value
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
    method: &'a str,
    target: &'a str,
    path: &'a str,
    query: Option<&'a str>,
    version: u8,
    body: &'a [u8],
    headers: &'a [httparse::Header<'a>],
    ws: WsHeaders,
    ws_key: Option<&'a [u8]>,
    origin: Option<&'a [u8]>,
}

impl<'a> Request<'a> {
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
            .find(|h| h.name.eq_ignore_ascii_case(name))
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
}

impl Sent {
    pub fn status(&self) -> u16 {
        self.status
    }
}

impl Response<'_> {
    /// Appends a complete response with Server, Date, Content-Type and Content-Length; `extra`
    /// holds further header lines, each ending in CRLF. Built from byte slices (no formatting
    /// machinery): this is the per-request hot path.
    pub fn send(self, status: u16, content_type: &str, body: &[u8], extra: &str) -> Sent {
        let out = self.out;
        status_line(out, status);
        out.extend_from_slice(b"Server: shardnet\r\nDate: ");
        out.extend_from_slice(self.date.get());
        out.extend_from_slice(b"\r\nContent-Type: ");
        out.extend_from_slice(content_type.as_bytes());
        out.extend_from_slice(b"\r\nContent-Length: ");
        push_decimal(out, body.len());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(extra.as_bytes());
        if !self.keep_alive {
            out.extend_from_slice(b"Connection: close\r\n");
        } else if self.version == 0 {
            out.extend_from_slice(b"Connection: keep-alive\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if !self.head {
            out.extend_from_slice(body);
        }
        Sent {
            status,
            upgrade: None,
            deferred: None,
            deflate: None,
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
            .filter(|h| h.name.eq_ignore_ascii_case("sec-websocket-extensions"))
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
        }
    }
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
    v.iter().all(|&b| HOST_BYTES[b as usize])
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
        if conn.pending.is_some() {
            // Behind a request still waiting for its answer: read nothing yet.
            return o;
        }
        self.handle_requests(conn, input, out, budget, date, handler, &mut o);
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
    ) {
        let max_target = self.settings.max_target();
        while o.consumed < input.len() {
            if out.len() >= budget {
                o.stopped = true;
                return;
            }
            let buf = &input[o.consumed..];
            // Uninitialised header slots: initialising 32 of them would cost a 1 KiB memset
            // per request, more than parsing a small request does.
            let mut headers =
                [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut []);
            let hlen = match req.parse_with_uninit_headers(buf, &mut headers) {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) => {
                    if target_too_long(buf, max_target) {
                        o.fail(out, date, 414, "request target too long");
                    } else if buf.len() > self.settings.max_header {
                        o.fail(out, date, 431, "request header fields too large");
                    } else {
                        o.partial = true;
                    }
                    return;
                }
                Err(httparse::Error::TooManyHeaders) => {
                    o.fail(out, date, 431, "too many header fields");
                    return;
                }
                Err(httparse::Error::Version) if unsupported_version(buf) => {
                    o.fail(
                        out,
                        date,
                        505,
                        "HTTP version not supported: this server speaks 1.0 and 1.1",
                    );
                    return;
                }
                Err(e) => {
                    o.fail(out, date, 400, &format!("malformed request: {e}"));
                    return;
                }
            };
            let target = req.path.unwrap_or("/");
            if target.len() > max_target {
                o.fail(out, date, 414, "request target too long");
                return;
            }
            if hlen > self.settings.max_header {
                o.fail(out, date, 431, "request header fields too large");
                return;
            }
            let version = req.version.unwrap_or(1);
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
            let mut crlf = ends_in_crlf(buf, hlen);
            for h in req.headers.iter() {
                let v = h.value;
                crlf &= after_crlf(buf, h.name);
                let name = h.name.as_bytes();
                // Dispatch on length first: most headers are compared against nothing.
                match name.len() {
                    4 if name.eq_ignore_ascii_case(b"host") => {
                        hosts += 1;
                        if !valid_host(v.trim_ascii()) {
                            bad = Some("invalid Host");
                        }
                    }
                    14 if name.eq_ignore_ascii_case(b"content-length") => {
                        match (parse_length(v), content_length) {
                            (Some(n), None) => content_length = Some(n),
                            (Some(n), Some(m)) if n == m => {}
                            _ => bad = Some("invalid Content-Length"),
                        }
                    }
                    17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
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
                    10 if name.eq_ignore_ascii_case(b"connection") => {
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
                    6 if name.eq_ignore_ascii_case(b"expect") => {
                        expect_continue = v.trim_ascii().eq_ignore_ascii_case(b"100-continue");
                    }
                    6 if name.eq_ignore_ascii_case(b"origin") => origin = Some(v.trim_ascii()),
                    7 if name.eq_ignore_ascii_case(b"upgrade") => {
                        ws.upgrade_websocket = has_token(v, "websocket")
                    }
                    21 if name.eq_ignore_ascii_case(b"sec-websocket-version") => {
                        ws.version_13 = v.trim_ascii() == b"13";
                    }
                    17 if name.eq_ignore_ascii_case(b"sec-websocket-key") => {
                        ws_key = Some(v.trim_ascii())
                    }
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
            let method = req.method.unwrap_or("");
            let (path, query) = route_path(target);
            let request = Request {
                method,
                target,
                path,
                query,
                version,
                body: &buf[hlen..hlen + body_len],
                headers: &*req.headers,
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
            if let Some(p) = sent.deferred {
                conn.pending = Some(p);
                o.deferred = true;
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

    #[test]
    fn a_deferred_answer_holds_back_the_pipeline() {
        let h = http();
        let date = DateCache::default();
        let mut conn = HttpConn::default();
        let mut out = Vec::new();
        let input = b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\nPOST /later HTTP/1.1\r\nHost: a\r\n\
                      Content-Length: 2\r\n\r\nhiGET /ok HTTP/1.1\r\nHost: a\r\n\r\n";
        let o = h.handle(&mut conn, input, &mut out, usize::MAX, &date, &mut Echo);
        let first = input.windows(4).position(|w| w == b"hiGE").unwrap() + 2;
        assert_eq!((o.consumed, o.responses, o.deferred), (first, 1, true));
        assert_eq!(conn.pending().map(|p| p.id), Some(7));
        // While it waits, nothing more is read.
        let o = h.handle(
            &mut conn,
            &input[first..],
            &mut out,
            usize::MAX,
            &date,
            &mut Echo,
        );
        assert_eq!((o.consumed, o.responses), (0, 0));
        let p = conn.take_pending().unwrap();
        assert!(p.keep_alive());
        let _ = p
            .respond(&mut out, &date)
            .send(503, "text/plain", b"later\n", "");
        let o = h.handle(
            &mut conn,
            &input[first..],
            &mut out,
            usize::MAX,
            &date,
            &mut Echo,
        );
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
        let h = http();
        let date = DateCache::default();
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
                let o = h.handle(&mut conn, &held, &mut out, usize::MAX, &date, &mut Echo);
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
            let o = h.handle(&mut conn, &held, &mut out, usize::MAX, &date, &mut Echo);
            held.drain(..o.consumed);
            timers.push(o.timer);
        }
        assert_eq!(timers, [Start, Start, Start, Start, Stop]);

        // More bytes of the same request keep the timer running from its first byte.
        let mut conn = HttpConn::default();
        let mut out = Vec::new();
        let o = h.handle(
            &mut conn,
            b"GET /ok",
            &mut out,
            usize::MAX,
            &date,
            &mut Echo,
        );
        assert_eq!(o.timer, Start);
        let o = h.handle(
            &mut conn,
            b"GET /ok HTTP/1.1\r\n",
            &mut out,
            usize::MAX,
            &date,
            &mut Echo,
        );
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
}
