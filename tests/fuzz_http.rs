//! Fuzzing the HTTP handler with proptest: arbitrary bytes, and mutations of valid requests,
//! split at arbitrary points as a network would. No panic; consumption and output bounded.
//!
//! 100,000 cases per run (the `FUZZ_CASES` environment variable changes it).

use std::time::Duration;

use proptest::prelude::*;
use shardnet::service::http::{App, DateCache, Http, HttpConn, HttpSettings};

struct Fake;

impl App for Fake {
    fn draining(&self) -> bool {
        false
    }
    fn metrics(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"m 1\n");
    }
    fn stats_json(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{}");
    }
    fn publish(&mut self, _topic: &str, _data: &[u8]) -> usize {
        1
    }
}

fn http() -> Http {
    Http::new(HttpSettings {
        max_header: 1024,
        max_body: 256,
        header_timeout: Duration::from_secs(1),
        admin_routes: true,
        ws_routes: vec![("/ws".into(), vec![])],
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
    b"POST /publish/t HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
    b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    b"HEAD /json HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"POST /publish/x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n",
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
