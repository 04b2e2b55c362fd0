//! The HTTP/1.1 service over real sockets.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn keep_alive_close_and_http10() {
    let server = start_router(&http_toml(2, ""));
    let addr = server.addr("http").unwrap();
    let mut s = connect(addr);
    for _ in 0..3 {
        let (status, head, body) =
            http_exchange(&mut s, b"GET /plaintext HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(status, 200);
        assert_eq!(body, b"Hello, World!");
        for h in [
            "Server: shardnet",
            "Date: ",
            "Content-Type: text/plain",
            "Content-Length: 13",
        ] {
            assert!(head.contains(h), "missing {h} in {head}");
        }
    }
    let (status, head, body) = http_exchange(
        &mut s,
        b"GET /json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200);
    assert_eq!(body, br#"{"message":"Hello, World!"}"#);
    assert!(head.contains("Connection: close"));
    assert_eq!(
        read_to_end(&mut s),
        (Vec::new(), true),
        "closed after Connection: close"
    );

    let mut s = connect(addr);
    let (status, head, _) = http_exchange(&mut s, b"GET /plaintext HTTP/1.0\r\n\r\n");
    assert_eq!(status, 200);
    assert!(head.contains("Connection: close"));
    assert!(read_to_end(&mut s).1, "HTTP/1.0 closes by default");

    let mut s = connect(addr);
    for _ in 0..2 {
        let (status, head, _) = http_exchange(
            &mut s,
            b"GET /plaintext HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        );
        assert_eq!(status, 200);
        assert!(head.contains("Connection: keep-alive"));
    }
}

#[test]
fn hundred_pipelined_requests_in_one_write_answer_in_order() {
    let server = start_router(&http_toml(1, ""));
    let mut s = connect(server.addr("http").unwrap());
    let mut batch = Vec::new();
    for i in 0..100 {
        let path = if i % 2 == 0 { "/plaintext" } else { "/json" };
        batch.extend_from_slice(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
    }
    s.write_all(&batch).unwrap();
    for i in 0..100 {
        let (status, _, body) = read_response(&mut s, false);
        assert_eq!(status, 200);
        let want: &[u8] = if i % 2 == 0 {
            b"Hello, World!"
        } else {
            br#"{"message":"Hello, World!"}"#
        };
        assert_eq!(body, want, "response {i} out of order");
    }
    // One read produced all of them: far fewer writes than responses.
    let snap = server.snapshot();
    assert!(
        snap.total().writes < 20,
        "{} writes for 100 pipelined responses",
        snap.total().writes
    );
}

#[test]
fn head_404_405_healthz_and_publish() {
    let server = start_router(&http_toml(2, ""));
    let mut s = connect(server.addr("http").unwrap());
    s.write_all(b"HEAD /plaintext HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (status, head, body) = read_response(&mut s, true);
    assert_eq!((status, body.len()), (200, 0));
    assert!(
        head.contains("Content-Length: 13"),
        "HEAD keeps the GET's Content-Length"
    );
    assert_eq!(
        http_exchange(&mut s, b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n").0,
        404
    );
    let (status, head, _) = http_exchange(
        &mut s,
        b"POST /plaintext HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(status, 405);
    assert!(head.contains("Allow: GET, HEAD"));
    let (status, _, body) = http_exchange(&mut s, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!((status, body.as_slice()), (200, &b"ok\n"[..]));
    let (status, _, body) = http_exchange(
        &mut s,
        b"POST /publish/news HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    );
    assert_eq!(status, 200);
    assert_eq!(
        String::from_utf8(body).unwrap(),
        r#"{"subscribers":0,"topic":"news"}"#
    );
    let (status, head, _) = http_exchange(&mut s, b"GET /publish/news HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 405);
    assert!(head.contains("Allow: POST"));
    let (status, _, body) = http_exchange(&mut s, b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["shards"], 2);
}

#[test]
fn expect_100_continue() {
    let server = start_router(&http_toml(1, ""));
    let mut s = connect(server.addr("http").unwrap());
    s.write_all(
        b"POST /publish/t HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n",
    )
    .unwrap();
    let (status, _, _) = read_response(&mut s, false);
    assert_eq!(status, 100);
    s.write_all(b"data").unwrap();
    assert_eq!(read_response(&mut s, false).0, 200);
}

/// Sends `request` on a fresh connection; expects `status` and then the connection closed.
#[track_caller]
fn expect_error_and_close(addr: std::net::SocketAddr, request: &[u8], status: u16) {
    let mut s = connect(addr);
    let _ = s.write_all(request);
    let (got, head, _) = read_response(&mut s, false);
    assert_eq!(got, status, "{head}");
    assert!(head.contains("Connection: close"));
    let (_, clean) = read_to_end(&mut s);
    assert!(clean, "closed cleanly (FIN, not reset) after {status}");
}

#[test]
fn errors_close_only_that_connection() {
    let server = start_router(&http_toml(
        1,
        "max_header = \"1KiB\"\nmax_body = \"100B\"\nheader_timeout = \"300ms\"",
    ));
    let addr = server.addr("http").unwrap();
    let mut bystander = connect(addr);
    assert_eq!(
        http_exchange(
            &mut bystander,
            b"GET /plaintext HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        .0,
        200
    );

    expect_error_and_close(addr, b"BLAH\x01 / HTTP/9\r\n\r\n", 400);
    expect_error_and_close(
        addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n",
        400,
    );
    expect_error_and_close(
        addr,
        b"POST /publish/t HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        400,
    );
    expect_error_and_close(
        addr,
        b"POST /publish/t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        411,
    );
    expect_error_and_close(
        addr,
        b"POST /publish/t HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n",
        413,
    );
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(2000)
    );
    expect_error_and_close(addr, huge.as_bytes(), 431);
    // Slowloris: half a request, then silence.
    let start = Instant::now();
    expect_error_and_close(addr, b"GET /plaintext HTTP/1.1\r\nHost: sl", 408);
    assert!(
        start.elapsed() >= Duration::from_millis(250),
        "408 came after header_timeout"
    );

    // The bystander was not affected.
    assert_eq!(
        http_exchange(
            &mut bystander,
            b"GET /plaintext HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        .0,
        200
    );
    assert!(server.snapshot().total().open >= 1);
}

#[test]
fn pipelining_client_that_never_reads_is_bounded() {
    let server = start_router(&format!(
        "[limits]\nmax_write_buffer = \"64KiB\"\nwrite_timeout = \"1s\"\nidle_timeout = \"0s\"\n{}",
        http_toml(1, "")
    ));
    let mut s = connect(server.addr("http").unwrap());
    s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
    let stats = server.stats();
    let mut batch = Vec::new();
    for _ in 0..1000 {
        batch.extend_from_slice(b"GET /plaintext HTTP/1.1\r\nHost: x\r\n\r\n");
    }
    let mut peak = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(6) {
        if s.write_all(&batch).is_err() {
            break;
        }
        let snap = stats.snapshot();
        peak = peak.max(snap.shards[0].output_queued + snap.shards[0].input_buffered);
    }
    // Output is bounded by max_write_buffer plus one batch of responses; input by max_read_buffer.
    assert!(
        peak < 4 << 20,
        "server buffered {peak} bytes for one client"
    );
    wait_until(
        Duration::from_secs(10),
        "write timeout closes the non-reader",
        || stats.snapshot().total().write_timeouts == 1,
    );
}

#[test]
fn metrics_parse_with_prometheus_client() {
    let server = start_router(&http_toml(3, ""));
    let addr = server.addr("http").unwrap();
    let mut s = connect(addr);
    for _ in 0..5 {
        assert_eq!(
            http_exchange(&mut s, b"GET /plaintext HTTP/1.1\r\nHost: x\r\n\r\n").0,
            200
        );
    }
    let (status, head, body) = http_exchange(&mut s, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 200);
    assert!(head.contains("text/plain; version=0.0.4"));
    let Some(py) = python_with(&[("prometheus_client", "prometheus_client")]) else {
        return; // skipped: python_with said why
    };
    let script = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
text = sys.stdin.read()
shards = set()
n = 0
for fam in text_string_to_metric_families(text):
    for s in fam.samples:
        n += 1
        if "shard" in s.labels:
            shards.add(s.labels["shard"])
names = {f.name for f in text_string_to_metric_families(text)}
print(n, ",".join(sorted(shards)), "shardnet_accepted" in names, "process_open_fds" in names)
"#;
    let mut child = std::process::Command::new(py)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&body).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "parser rejected the exposition: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8(out.stdout).unwrap();
    let parts: Vec<&str> = line.split_whitespace().collect();
    assert!(parts[0].parse::<usize>().unwrap() > 50, "{line}");
    assert_eq!(parts[1], "0,1,2", "every shard appears");
    assert_eq!(&parts[2..], ["True", "True"], "{line}");
    // Every non-comment line is `name{labels} value`.
    let text = String::from_utf8(body).unwrap();
    assert!(text.lines().filter(|l| !l.starts_with('#')).all(|l| l
        .rsplit_once(' ')
        .is_some_and(|(_, v)| v.parse::<f64>().is_ok())));
}

#[test]
fn admin_listener_separates_metrics() {
    let toml = format!(
        "{}admin_routes = false\n[[listener]]\nname = \"admin\"\naddr = \"127.0.0.1:0\"\nservice = \"http\"\n",
        http_toml(1, "")
    );
    let server = start_router(&toml);
    let mut public = connect(server.addr("http").unwrap());
    assert_eq!(
        http_exchange(&mut public, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").0,
        404
    );
    assert_eq!(
        http_exchange(&mut public, b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n").0,
        404
    );
    assert_eq!(
        http_exchange(&mut public, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").0,
        200
    );
    let mut admin = connect(server.addr("admin").unwrap());
    let (status, _, body) = http_exchange(&mut admin, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 200);
    assert!(String::from_utf8(body)
        .unwrap()
        .contains("shardnet_accepted_total{shard=\"0\"}"));
}
