//! Abuse cases: engine.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::{Duration, Instant};

use super::common::*;

/// Issue 11 item 1: a client that sends a lot and never reads, leaving output queued below
/// `max_write_buffer`, is closed once no write progress has been made for `write_timeout`.
#[test]
fn non_reader_with_output_below_the_bound_is_closed_after_write_timeout() {
    let config = echo_config(
        1,
        "",
        "max_write_buffer = \"64MiB\"\nwrite_timeout = \"1s\"\nidle_timeout = \"60s\"",
    );
    let server = start_echo(&config);
    let addr = server.addr("echo").unwrap();
    let mut client = connect(addr);
    // 16 MiB: more than the kernel buffers on both sides take (tcp_wmem max 4 MiB), far under the
    // 64 MiB bound, so reading never pauses and most of it waits in the server's queue.
    let chunk = vec![b'p'; 1 << 20];
    for _ in 0..16 {
        client.write_all(&chunk).unwrap();
    }
    let sent = Instant::now();
    let stats = server.stats();
    wait_until(
        Duration::from_secs(4),
        "output was queued in the server",
        || stats.snapshot().total().output_queued > 0 || stats.snapshot().total().closed > 0,
    );
    assert!(
        stats.snapshot().total().backpressure_pauses == 0,
        "the queue stayed under the bound (no pause)"
    );
    wait_until(
        Duration::from_secs(8),
        "the write timeout closes the connection",
        || stats.snapshot().total().closed == 1,
    );
    let waited = sent.elapsed();
    let snap = stats.snapshot().total();
    assert_eq!(snap.write_timeouts, 1, "closed by the write timeout");
    assert_eq!(snap.idle_timeouts, 0);
    assert_eq!(snap.output_queued, 0, "the queue was released");
    assert!(
        waited >= Duration::from_millis(900),
        "not before write_timeout: {waited:?}"
    );
}

/// Issue 11 item 2: the request and the FIN arrive together; the answer comes back and the
/// connection closes at once, not after `idle_timeout`.
#[test]
fn fin_with_the_data_is_seen_and_the_connection_closes_promptly() {
    let server = start_echo(&echo_config(1, "", "idle_timeout = \"60s\""));
    let addr = server.addr("echo").unwrap();
    for trial in 0..20 {
        let mut c = connect(addr);
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let started = Instant::now();
        let payload = format!("request {trial}\n");
        c.write_all(payload.as_bytes()).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let (got, clean) = read_to_end(&mut c);
        assert!(
            clean,
            "trial {trial}: no EOF within 5 s (got {} bytes)",
            got.len()
        );
        assert_eq!(got, payload.as_bytes(), "trial {trial}: the echo");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "trial {trial}: closed after {:?}",
            started.elapsed()
        );
    }
    let stats = server.stats();
    wait_until(Duration::from_secs(5), "every connection closed", || {
        stats.snapshot().total().closed == 20
    });
    assert_eq!(stats.snapshot().total().idle_timeouts, 0);
}

/// The same through the product's HTTP service: one request and FIN, one answer, then EOF.
#[test]
fn http_request_with_fin_is_answered_then_closed_promptly() {
    let server = start_router(&http_toml(1, ""));
    let addr = server.addr("http").unwrap();
    for trial in 0..20 {
        let mut c = connect(addr);
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let started = Instant::now();
        c.write_all(b"GET /plaintext HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let (got, clean) = read_to_end(&mut c);
        let text = String::from_utf8_lossy(&got);
        assert!(clean, "trial {trial}: no EOF within 5 s: {text:?}");
        assert!(
            text.starts_with("HTTP/1.1 200 "),
            "trial {trial}: answered: {text:?}"
        );
        assert!(text.ends_with("Hello, World!"), "trial {trial}: {text:?}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }
    let mut buf = [0u8; 1];
    let mut probe = connect(addr);
    probe
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert!(probe.read(&mut buf).unwrap() > 0, "still serving");
}
