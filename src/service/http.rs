//! HTTP/1.1 request handling: a pure function from input bytes to response bytes.
//!
//! No I/O here: [`Http::handle`] parses every complete request at the start of its input with
//! httparse (pipelining), appends the responses in order to one output buffer (the engine writes
//! them with one `write(2)`), and reports how much input it consumed and what the connection
//! should do next. The router ([`super::router`]) binds it to the engine; tests and the fuzz
//! test call it directly.
//!
//! Decisions:
//! - Keep-alive is the default for HTTP/1.1; HTTP/1.0 keeps the connection only with
//!   `Connection: keep-alive`. `Connection: close` closes after the response.
//! - Request bodies need `Content-Length` (up to `max_body`, else 413). Chunked request bodies
//!   are refused with **411 Length Required** and the connection closes: none of the routes takes
//!   a streamed body, and refusing keeps a body's bytes contiguous in the input (no reassembly
//!   buffer per connection). Both `Content-Length` and `Transfer-Encoding` → 400 (smuggling).
//! - `Expect: 100-continue` gets `100 Continue` once while the body is awaited.
//! - A header block over `max_header` → 431; malformed → 400; both close the connection.
//! - Output per call is bounded by the caller's budget: past it, handling stops and the caller
//!   offers the rest of the input again once the output has drained (a client that pipelines
//!   without reading costs bounded memory).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::ListenerConfig;

/// Headers parsed per request; more → 431.
const MAX_HEADERS: usize = 32;

/// Per-listener HTTP settings.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub max_header: usize,
    pub max_body: usize,
    pub header_timeout: Duration,
    /// Serve /metrics and /stats.
    pub admin_routes: bool,
    /// WebSocket routes by index: path and allowed origins (empty: any).
    pub ws_routes: Vec<(String, Vec<String>)>,
}

impl From<&ListenerConfig> for HttpSettings {
    fn from(l: &ListenerConfig) -> Self {
        HttpSettings {
            max_header: l.max_header,
            max_body: l.max_body,
            header_timeout: l.header_timeout,
            admin_routes: l.admin_routes,
            ws_routes: l
                .websocket
                .iter()
                .map(|w| (w.path.clone(), w.allowed_origins.clone()))
                .collect(),
        }
    }
}

/// Per-connection state: two flags.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HttpConn {
    /// `100 Continue` was sent for the request being received.
    pub continue_sent: bool,
    /// The header timer runs for the request being received.
    pub timer_armed: bool,
}

/// What the embedding server provides to the routes.
pub trait App {
    fn draining(&self) -> bool;
    fn metrics(&mut self, out: &mut Vec<u8>);
    fn stats_json(&mut self, out: &mut Vec<u8>);
    /// Publishes `data` on `topic`; returns the subscribers reached.
    fn publish(&mut self, topic: &str, data: &[u8]) -> usize;
}

/// The result of one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Input bytes fully handled.
    pub consumed: usize,
    /// Close after writing the output.
    pub close: bool,
    /// A request is partly received (the header timer should run).
    pub partial: bool,
    /// Stopped because the output budget ran out; call again when it drains.
    pub stopped: bool,
    /// A valid WebSocket upgrade for route `.0` was answered with 101 at `consumed`.
    pub upgrade: Option<usize>,
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

/// The HTTP handler of one listener on one shard.
pub struct Http {
    pub settings: HttpSettings,
}

/// Everything about one parsed request that the routes need (borrowed from the input).
struct Request<'a> {
    method: &'a str,
    path: &'a str,
    version: u8,
    keep_alive: bool,
    body: &'a [u8],
    ws_key: Option<&'a [u8]>,
    ws_ok: WsHeaders,
    origin: Option<&'a [u8]>,
}

#[derive(Default, Clone, Copy)]
struct WsHeaders {
    upgrade_websocket: bool,
    connection_upgrade: bool,
    version_13: bool,
    version_present: bool,
}

fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

impl Http {
    pub fn new(settings: HttpSettings) -> Self {
        Http { settings }
    }

    /// Handles every complete request at the start of `input`, appending responses to `out`
    /// until `out` reaches `budget` bytes.
    pub fn handle(
        &self,
        conn: &mut HttpConn,
        input: &[u8],
        out: &mut Vec<u8>,
        budget: usize,
        date: &DateCache,
        app: &mut dyn App,
    ) -> Outcome {
        let mut o = Outcome {
            consumed: 0,
            close: false,
            partial: false,
            stopped: false,
            upgrade: None,
        };
        while o.consumed < input.len() {
            if out.len() >= budget {
                o.stopped = true;
                break;
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
                    if buf.len() > self.settings.max_header {
                        error(out, date, 431, "request header fields too large");
                        o.close = true;
                    } else {
                        o.partial = true;
                    }
                    break;
                }
                Err(httparse::Error::TooManyHeaders) => {
                    error(out, date, 431, "too many header fields");
                    o.close = true;
                    break;
                }
                Err(e) => {
                    error(out, date, 400, &format!("malformed request: {e}"));
                    o.close = true;
                    break;
                }
            };
            if hlen > self.settings.max_header {
                error(out, date, 431, "request header fields too large");
                o.close = true;
                break;
            }
            let version = req.version.unwrap_or(1);
            let mut content_length: Option<usize> = None;
            let mut chunked = false;
            let mut expect_continue = false;
            let mut conn_close = false;
            let mut conn_keep_alive = false;
            let mut ws = WsHeaders::default();
            let mut ws_key = None;
            let mut origin = None;
            let mut bad: Option<&str> = None;
            for h in req.headers.iter() {
                let v = h.value;
                let name = h.name.as_bytes();
                // Dispatch on length first: most headers are compared against nothing.
                match name.len() {
                    14 if name.eq_ignore_ascii_case(b"content-length") => {
                        let parsed = std::str::from_utf8(v)
                            .ok()
                            .and_then(|s| s.trim().parse::<usize>().ok());
                        match (parsed, content_length) {
                            (Some(n), None) => content_length = Some(n),
                            (Some(n), Some(m)) if n == m => {}
                            _ => bad = Some("invalid Content-Length"),
                        }
                    }
                    17 if name.eq_ignore_ascii_case(b"transfer-encoding") => chunked = true,
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
                        ws.version_present = true;
                        ws.version_13 = v.trim_ascii() == b"13";
                    }
                    17 if name.eq_ignore_ascii_case(b"sec-websocket-key") => {
                        ws_key = Some(v.trim_ascii())
                    }
                    _ => {}
                }
            }
            if let Some(reason) = bad {
                error(out, date, 400, reason);
                o.close = true;
                break;
            }
            if chunked && content_length.is_some() {
                error(out, date, 400, "both Content-Length and Transfer-Encoding");
                o.close = true;
                break;
            }
            if chunked {
                error(
                    out,
                    date,
                    411,
                    "chunked request bodies are not accepted: send Content-Length",
                );
                o.close = true;
                break;
            }
            let body_len = content_length.unwrap_or(0);
            if body_len > self.settings.max_body {
                error(out, date, 413, "request body larger than max_body");
                o.close = true;
                break;
            }
            if buf.len() < hlen + body_len {
                if expect_continue && !conn.continue_sent {
                    out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                    conn.continue_sent = true;
                }
                o.partial = true;
                break;
            }
            conn.continue_sent = false;
            let keep_alive = !conn_close && (version == 1 || conn_keep_alive);
            let request = Request {
                method: req.method.unwrap_or(""),
                path: req.path.unwrap_or("/"),
                version,
                keep_alive,
                body: &buf[hlen..hlen + body_len],
                ws_key,
                ws_ok: ws,
                origin,
            };
            o.consumed += hlen + body_len;
            match self.route(&request, out, date, app) {
                Routed::Done => {}
                Routed::Upgrade(route) => {
                    o.upgrade = Some(route);
                    return o;
                }
            }
            if !request.keep_alive {
                o.close = true;
                break;
            }
        }
        o
    }

    fn route(
        &self,
        r: &Request<'_>,
        out: &mut Vec<u8>,
        date: &DateCache,
        app: &mut dyn App,
    ) -> Routed {
        let path = match r.path.as_bytes().iter().position(|&b| b == b'?') {
            Some(q) => &r.path[..q],
            None => r.path,
        };
        let head = r.method == "HEAD";
        let get = r.method == "GET" || head;
        let resp = Resp {
            out,
            date,
            head,
            keep_alive: r.keep_alive,
            version: r.version,
        };
        if let Some(route) = self.settings.ws_routes.iter().position(|(p, _)| p == path) {
            if r.method != "GET" {
                resp.send(405, "text/plain", b"method not allowed\n", "Allow: GET\r\n");
                return Routed::Done;
            }
            return self.upgrade(r, route, resp);
        }
        match path {
            "/metrics" | "/stats" if !self.settings.admin_routes => {
                resp.send(404, "text/plain", b"not found\n", "");
            }
            "/plaintext" | "/json" | "/healthz" | "/metrics" | "/stats" if !get => {
                resp.send(
                    405,
                    "text/plain",
                    b"method not allowed\n",
                    "Allow: GET, HEAD\r\n",
                );
            }
            "/plaintext" => resp.send(200, "text/plain", b"Hello, World!", ""),
            "/json" => resp.send(
                200,
                "application/json",
                br#"{"message":"Hello, World!"}"#,
                "",
            ),
            "/healthz" => {
                if app.draining() {
                    resp.send(503, "text/plain", b"draining\n", "")
                } else {
                    resp.send(200, "text/plain", b"ok\n", "")
                }
            }
            "/metrics" => {
                let mut body = Vec::with_capacity(8192);
                app.metrics(&mut body);
                resp.send(200, "text/plain; version=0.0.4; charset=utf-8", &body, "");
            }
            "/stats" => {
                let mut body = Vec::with_capacity(4096);
                app.stats_json(&mut body);
                resp.send(200, "application/json", &body, "");
            }
            p if p.starts_with("/publish/") => {
                let topic = &p["/publish/".len()..];
                if r.method != "POST" {
                    resp.send(
                        405,
                        "text/plain",
                        b"method not allowed\n",
                        "Allow: POST\r\n",
                    );
                } else if topic.is_empty() || topic.len() > 256 || topic.contains('/') {
                    resp.send(
                        400,
                        "text/plain",
                        b"topic must be 1 to 256 bytes without '/'\n",
                        "",
                    );
                } else {
                    let n = app.publish(topic, r.body);
                    let body = serde_json::json!({ "topic": topic, "subscribers": n }).to_string();
                    resp.send(200, "application/json", body.as_bytes(), "");
                }
            }
            _ => resp.send(404, "text/plain", b"not found\n", ""),
        }
        Routed::Done
    }

    fn upgrade(&self, r: &Request<'_>, route: usize, resp: Resp<'_>) -> Routed {
        let w = r.ws_ok;
        if !w.upgrade_websocket || !w.connection_upgrade {
            resp.send(
                426,
                "text/plain",
                b"this path takes WebSocket upgrades only\n",
                "Upgrade: websocket\r\nConnection: Upgrade\r\n",
            );
            return Routed::Done;
        }
        if !w.version_13 {
            resp.send(
                426,
                "text/plain",
                b"unsupported WebSocket version\n",
                "Sec-WebSocket-Version: 13\r\n",
            );
            return Routed::Done;
        }
        let key = match r.ws_key {
            Some(k) if super::ws::valid_key(k) => k,
            _ => {
                resp.send(
                    400,
                    "text/plain",
                    b"missing or invalid Sec-WebSocket-Key\n",
                    "",
                );
                return Routed::Done;
            }
        };
        let origins = &self.settings.ws_routes[route].1;
        if !origins.is_empty()
            && !r
                .origin
                .is_some_and(|o| origins.iter().any(|a| a.as_bytes() == o))
        {
            resp.send(403, "text/plain", b"origin not allowed\n", "");
            return Routed::Done;
        }
        let out = resp.out;
        out.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ");
        out.extend_from_slice(super::ws::accept_key(key).as_bytes());
        out.extend_from_slice(b"\r\n\r\n");
        Routed::Upgrade(route)
    }

    /// The 408 answer when the header timer fires.
    pub fn timeout_response(out: &mut Vec<u8>, date: &DateCache) {
        error(out, date, 408, "request not complete within header_timeout");
    }
}

enum Routed {
    Done,
    Upgrade(usize),
}

struct Resp<'a> {
    out: &'a mut Vec<u8>,
    date: &'a DateCache,
    head: bool,
    keep_alive: bool,
    version: u8,
}

impl Resp<'_> {
    /// Appends a complete response with Server, Date, Content-Type and Content-Length. Built
    /// from byte slices (no formatting machinery): this is the per-request hot path.
    fn send(self, status: u16, content_type: &str, body: &[u8], extra: &str) {
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
    Resp {
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
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        403 => "Forbidden",
        411 => "Length Required",
        413 => "Content Too Large",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}
