//! Abuse cases: HTTP/1.1. Each asserts the exact status, that only that connection closes (with
//! a FIN, not a reset), and a bounded time until the answer.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::common::*;

/// Sends `request` on a fresh connection; expects `status`, then the connection closed with a
/// FIN, all within `within`.
#[track_caller]
fn expect_status_and_close(addr: SocketAddr, request: &[u8], status: u16, within: Duration) {
    let mut s = connect(addr);
    let start = Instant::now();
    let _ = s.write_all(request);
    let (got, head, body) = read_response(&mut s, false);
    assert_eq!(
        got,
        status,
        "{:?}: {head}{}",
        String::from_utf8_lossy(&request[..request.len().min(80)]),
        String::from_utf8_lossy(&body)
    );
    assert!(head.contains("Connection: close"), "{head}");
    assert!(read_to_end(&mut s).1, "closed with a FIN after {status}");
    assert!(
        start.elapsed() < within,
        "{status} after {:?}",
        start.elapsed()
    );
}

fn service_total(server: &shardnet::server::Server, key: &str) -> u64 {
    let mut s = connect(server.addr("http").unwrap());
    let (_, _, body) = http_exchange(&mut s, b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    v["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s[key].as_u64().unwrap())
        .sum()
}

const SOON: Duration = Duration::from_secs(5);

#[test]
fn framing_errors_get_their_status() {
    let server = start_router(&http_toml(1, ""));
    let addr = server.addr("http").unwrap();
    let long = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(9000));
    let cases: &[(&[u8], u16)] = &[
        (
            b"POST /publish/t HTTP/1.1\r\nHost: x\r\nContent-Length: +1\r\n\r\n1",
            400,
        ),
        (
            b"POST /publish/t HTTP/1.1\r\nHost: x\r\nContent-Length: 1_0\r\n\r\n1",
            400,
        ),
        (b"GET /plaintext HTTP/1.1\r\n\r\n", 400),
        (
            b"GET /plaintext HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            400,
        ),
        (long.as_bytes(), 414),
        (
            b"POST /publish/t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
            501,
        ),
        (
            b"POST /publish/t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            501,
        ),
        (b"GET /plaintext HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        (b"GET /plaintext HTTP/1.2\r\nHost: x\r\n\r\n", 505),
        // A bare LF would let a proxy that does not take it as a line end see other fields.
        (
            b"GET /plaintext HTTP/1.1\r\nHost: x\nContent-Length: 5\r\n\r\nhello",
            400,
        ),
    ];
    let mut bystander = connect(addr);
    for (req, status) in cases {
        expect_status_and_close(addr, req, *status, SOON);
    }
    // An absolute-form target is served, on a connection that stays open.
    let mut s = connect(addr);
    for _ in 0..2 {
        let (status, _, body) = http_exchange(
            &mut s,
            b"GET http://example.com/plaintext HTTP/1.1\r\nHost: example.com\r\n\r\n",
        );
        assert_eq!((status, body.as_slice()), (200, &b"Hello, World!"[..]));
    }
    assert_eq!(
        http_exchange(
            &mut bystander,
            b"GET /plaintext HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        .0,
        200
    );
}

#[test]
fn smuggling_inputs_are_refused() {
    let server = start_router(&http_toml(1, ""));
    let addr = server.addr("http").unwrap();
    let cases: &[(&[u8], u16)] = &[
        // CL + TE, in both orders.
        (b"POST /publish/t HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        (b"POST /publish/t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n", 400),
        // Two different lengths.
        (b"POST /publish/t HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
        (b"POST /publish/t HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 2\r\n\r\nab", 400),
        // obs-fold, space before the colon, a tab in the name, NUL in a value.
        (b"GET /plaintext HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", 400),
        (b"GET /plaintext HTTP/1.1\r\nHost: x\r\nContent-Length : 0\r\n\r\n", 400),
        (b"GET /plaintext HTTP/1.1\r\nHost: x\r\nX\tA: a\r\n\r\n", 400),
        (b"GET /plaintext HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n", 400),
        // A chunked body is refused as a whole (no reassembly).
        (b"POST /publish/t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 411),
    ];
    for (req, status) in cases {
        expect_status_and_close(addr, req, *status, SOON);
    }
}

#[test]
fn header_timer_runs_per_request_for_a_streaming_client() {
    let server = start_router(&http_toml(1, "header_timeout = \"1s\""));
    let mut s = connect(server.addr("http").unwrap());
    let req = b"GET /plaintext HTTP/1.1\r\nHost: x\r\n\r\n";
    let (head, tail) = req.split_at(12);
    // Every write completes one request and starts the next: each request is complete 0.25 s
    // after its first byte, and every read ends inside a request, for 2.5 s (2.5 timeouts).
    s.write_all(head).unwrap();
    let start = Instant::now();
    for i in 1..=10u32 {
        let at = start + Duration::from_millis(250) * i;
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        let mut w = tail.to_vec();
        w.extend_from_slice(head);
        s.write_all(&w).unwrap();
        let (status, _, _) = read_response(&mut s, false);
        assert_eq!(status, 200, "request {i} at {:?}", start.elapsed());
    }
    // The request left half-sent is timed from its own first byte.
    let last = Instant::now();
    let (status, head, _) = read_response(&mut s, false);
    let waited = last.elapsed();
    assert_eq!(status, 408, "{head}");
    assert!(
        waited >= Duration::from_millis(900) && waited < SOON,
        "408 after {waited:?}"
    );
    assert!(read_to_end(&mut s).1);
}

#[test]
fn slowloris_on_headers_and_on_the_upgrade_get_408() {
    let server = start_router(&format!(
        "{}[[listener.websocket]]\npath = \"/ws\"\n",
        http_toml(1, "header_timeout = \"1s\"")
    ));
    let addr = server.addr("http").unwrap();
    let requests: [&[u8]; 2] = [
        b"GET /plaintext HTTP/1.1\r\nHost: x\r\nX-Slow: 1\r\nX-Slower: 2\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    ];
    let mut bystander = connect(addr);
    for req in requests {
        let mut s = connect(addr);
        let start = Instant::now();
        // One byte every 100 ms: the request would take seconds to complete.
        let mut sent = 0;
        let mut answer = None;
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        while sent < req.len() - 1 && start.elapsed() < SOON {
            if s.write_all(&req[sent..sent + 1]).is_err() {
                break;
            }
            sent += 1;
            let mut peek = [0u8; 1];
            if let Ok(n) = s.peek(&mut peek) {
                answer = Some((n, start.elapsed()));
                break;
            }
        }
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let (status, _, _) = read_response(&mut s, false);
        assert_eq!(status, 408);
        let at = answer.map_or(start.elapsed(), |(_, at)| at);
        assert!(
            at >= Duration::from_millis(900) && at < SOON,
            "408 after {at:?}, {sent} bytes sent"
        );
        assert!(read_to_end(&mut s).1);
    }
    assert_eq!(
        http_exchange(
            &mut bystander,
            b"GET /plaintext HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        .0,
        200
    );
}

#[test]
fn reset_mid_response_leaves_the_server_serving() {
    let server = start_router(&http_toml(1, ""));
    let addr = server.addr("http").unwrap();
    let mut bystander = connect(addr);
    let batch: Vec<u8> = b"GET /json HTTP/1.1\r\nHost: x\r\n\r\n"
        .iter()
        .copied()
        .cycle()
        .take(32 * 2000)
        .collect();
    for _ in 0..5 {
        let mut s = connect(addr);
        s.write_all(&batch).unwrap();
        let mut first = [0u8; 64];
        std::io::Read::read_exact(&mut s, &mut first).unwrap();
        reset(s);
    }
    wait_until(SOON, "the reset connections are closed", || {
        server.snapshot().total().open == 1
    });
    assert_eq!(
        http_exchange(
            &mut bystander,
            b"GET /plaintext HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        .0,
        200
    );
}

/// Closes with SO_LINGER 0: the kernel sends RST instead of FIN.
fn reset(s: TcpStream) {
    nix::sys::socket::setsockopt(
        &s,
        nix::sys::socket::sockopt::Linger,
        &nix::libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )
    .unwrap();
    drop(s);
}

#[test]
fn errors_are_counted_from_the_status() {
    let server = start_router(&http_toml(1, ""));
    let addr = server.addr("http").unwrap();
    let mut s = connect(addr);
    // Two errors that keep the connection (a count from "closing error" bytes missed them),
    // one success that closes it, then one error that closes it.
    assert_eq!(
        http_exchange(&mut s, b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n").0,
        404
    );
    assert_eq!(
        http_exchange(
            &mut s,
            b"PUT /json HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        )
        .0,
        405
    );
    let req =
        b"POST /publish/t HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}";
    assert_eq!(http_exchange(&mut s, req).0, 200);
    expect_status_and_close(
        addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n",
        400,
        SOON,
    );
    assert_eq!(service_total(&server, "http_errors"), 3);
    // Four answers, plus the first /stats (a /stats response is counted once written, after
    // its body was rendered).
    assert_eq!(service_total(&server, "http_requests"), 5);
}
