//! Fuzzing the HTTP handler with proptest: arbitrary bytes, and mutations of valid requests,
//! split at arbitrary points as a network would. No panic; consumption and output bounded.
//!
//! 100,000 cases per run (the `FUZZ_CASES` environment variable changes it).

use std::time::Duration;

use proptest::prelude::*;
use shardnet::service::deflate;
use shardnet::service::http::{
    DateCache, Handler, Http, HttpConn, HttpSettings, Request, Response, Sent,
};

/// Routes shaped like the product's: a fixed body, a body's length, an upgrade path (with
/// permessage-deflate negotiation), 404.
struct Fake;

const DEFLATE: deflate::Settings = deflate::Settings {
    mode: shardnet::config::Compression::Dedicated,
    window_bits: 12,
};

impl Handler for Fake {
    fn request(&mut self, req: &Request<'_>, resp: Response<'_>) -> Sent {
        match req.path() {
            "/plaintext" => resp.send(200, "text/plain", b"Hello, World!", ""),
            p if p.starts_with("/publish/") => {
                let n = req.body().len().to_string();
                resp.send(200, "text/plain", n.as_bytes(), "")
            }
            "/ws" => resp.upgrade(req, &[], DEFLATE, 0),
            _ => resp.send(404, "text/plain", b"not found\n", ""),
        }
    }
}

fn http() -> Http {
    Http::new(HttpSettings {
        max_header: 1024,
        max_body: 256,
        header_timeout: Duration::from_secs(1),
    })
}

const BUDGET: usize = 64 * 1024;

/// Feeds `input` in pieces split at `cuts`, keeping unconsumed bytes as the engine does.
fn feed(input: &[u8], cuts: &[usize]) {
    let h = http();
    let date = DateCache::default();
    let mut conn = HttpConn::default();
    let mut held: Vec<u8> = Vec::new();
    let mut last = 0;
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    points.sort_unstable();
    points.push(input.len());
    for p in points {
        held.extend_from_slice(&input[last..p.max(last)]);
        last = p.max(last);
        let mut out = Vec::new();
        let o = h.handle(&mut conn, &held, &mut out, BUDGET, &date, &mut Fake);
        assert!(o.consumed <= held.len());
        // Every final response is reported with its status.
        assert!(o.errors <= o.responses);
        assert_eq!(o.responses == 0, o.status == 0);
        if o.responses > 0 {
            let last = String::from_utf8_lossy(&out);
            let at = last.rfind("HTTP/1.1 ").expect("a status line");
            let status = last[at + 9..at + 12].parse::<u16>().ok();
            assert!(status == Some(o.status) || status == Some(100), "{last}");
        }
        // Output is bounded by the budget plus one response (the largest here is small).
        assert!(out.len() <= BUDGET + 4096, "{} bytes of output", out.len());
        held.drain(..o.consumed);
        // The engine would close here; a partial request is bounded by max_header + max_body.
        if o.close || o.upgrade.is_some() {
            return;
        }
        assert!(held.len() <= 1024 + 256 + input.len().min(64 * 1024));
    }
}

const VALID: &[&[u8]] = &[
    b"GET /plaintext HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /publish/t HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
    b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Extensions: x; y=\"z\", permessage-deflate; server_max_window_bits=10; client_max_window_bits\r\n\r\n",
    b"HEAD /json HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"GET http://a/plaintext HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /publish/x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n",
];

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases() / 2, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes(input in proptest::collection::vec(any::<u8>(), 0..2048), cuts in proptest::collection::vec(any::<usize>(), 0..4)) {
        feed(&input, &cuts);
    }

    #[test]
    fn mutated_requests(
        picks in proptest::collection::vec(0..VALID.len(), 1..6),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        cuts in proptest::collection::vec(any::<usize>(), 0..4),
    ) {
        let mut input: Vec<u8> = picks.iter().flat_map(|&i| VALID[i].iter().copied()).collect();
        let len = input.len();
        for (pos, byte) in flips {
            input[pos % len] = byte;
        }
        feed(&input, &cuts);
    }
}
