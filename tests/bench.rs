//! `shardnet bench` as a user runs it: each mode completes against a real server, and the bench
//! fails loudly on a corrupted echo, a refused connection or a closed idle connection.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use common::*;

fn bench(args: &[&str]) -> (i32, String) {
    let out = Command::new(bin())
        .arg("bench")
        .args([
            "--duration",
            "600ms",
            "--warmup",
            "100ms",
            "--client-cores",
            "0",
        ])
        .args(args)
        .output()
        .expect("run bench");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn requests_of(text: &str) -> f64 {
    // The table row after the header: the req/s column.
    let row = text
        .lines()
        .find(|l| l.starts_with("shardnet "))
        .unwrap_or_else(|| panic!("no result row:\n{text}"));
    row.split_whitespace().nth(4).unwrap().parse().unwrap()
}

#[test]
fn echo_http_ws_and_connect_modes_run_and_verify() {
    let server = start_router(&format!(
        "{}[[listener.websocket]]\npath = \"/ws/echo\"\nmode = \"echo\"\n[[listener.websocket]]\npath = \"/ws\"\nmode = \"pubsub\"\n[[listener]]\nname = \"echo\"\naddr = \"127.0.0.1:0\"\nservice = \"echo\"\n",
        http_toml(1, "")
    ));
    let echo = server.addr("echo").unwrap().to_string();
    let http = server.addr("http").unwrap().to_string();
    let json = std::env::temp_dir().join(format!("bench-{}.json", std::process::id()));
    let (code, text) = bench(&[
        "--target",
        &echo,
        "--mode",
        "echo",
        "-c",
        "8",
        "-d",
        "4",
        "-s",
        "100",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{text}");
    assert!(requests_of(&text) > 100.0, "{text}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["runs"][0]["errors"], 0);
    assert!(report["runs"][0]["latency_us"]["p99"].as_u64().unwrap() > 0);
    assert!(report["kernel"].as_str().is_some_and(|k| !k.is_empty()));

    let (code, text) = bench(&["--target", &http, "--mode", "http", "-c", "4", "-d", "8"]);
    assert_eq!(code, 0, "{text}");
    assert!(requests_of(&text) > 100.0, "{text}");

    // The same load from Debian's wrk (installed by .ci/run): pipelined 16 deep, every
    // response counted by wrk, no errors.
    let (code, text) = bench(&[
        "--target", &http, "--mode", "http", "--wrk", "-c", "8", "-d", "16",
    ]);
    assert_eq!(code, 0, "{text}");
    assert!(requests_of(&text) > 100.0, "{text}");
    let (code, text) = bench(&[
        "--target", &http, "--mode", "http", "--wrk", "-c", "4", "--path", "/nowhere",
    ]);
    assert_ne!(code, 0, "404s must count as errors:\n{text}");
    assert!(text.contains("wrk counted"), "{text}");

    let (code, text) = bench(&[
        "--target", &http, "--mode", "ws", "-c", "4", "-d", "2", "-s", "300",
    ]);
    assert_eq!(code, 0, "{text}");
    assert!(requests_of(&text) > 100.0, "{text}");

    // Fan-out: 50 subscribers, 200 publishes/s; every subscriber sees every message once, in
    // order, and the report says so.
    let json = std::env::temp_dir().join(format!("bench-fanout-{}.json", std::process::id()));
    let (code, text) = bench(&[
        "--target",
        &http,
        "--mode",
        "fanout",
        "-c",
        "50",
        "--rate",
        "200",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{text}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let f = &report["runs"][0]["fanout"];
    assert_eq!(f["subscribers"], 50, "{text}");
    assert_eq!(f["lost"], 0, "{text}");
    let published = f["published"].as_u64().unwrap();
    assert!(published >= 60, "{text}");
    // Deliveries in the window: about subscribers × publishes (edges of the window aside).
    let delivered = f["delivered"].as_u64().unwrap();
    assert!(
        delivered >= 50 * (published - 20) && delivered <= 50 * (published + 20),
        "{text}"
    );
    let _ = std::fs::remove_file(&json);

    // Spread over client processes: echo verified by each, results merged.
    let (code, text) = bench(&[
        "--target",
        &echo,
        "--mode",
        "echo",
        "-c",
        "9",
        "-d",
        "2",
        "--processes",
        "3",
    ]);
    assert_eq!(code, 0, "{text}");
    assert!(requests_of(&text) > 100.0, "{text}");
    let row = text.lines().find(|l| l.starts_with("shardnet ")).unwrap();
    assert_eq!(row.split_whitespace().nth(1), Some("9"), "{text}");

    let (code, text) = bench(&["--target", &http, "--mode", "connect", "-c", "2"]);
    assert_eq!(code, 0, "{text}");
    assert!(requests_of(&text) > 10.0, "{text}");

    // Open loop at a fixed rate: about rate × duration requests.
    let (code, text) = bench(&[
        "--target", &echo, "--mode", "echo", "-c", "4", "--rate", "2000",
    ]);
    assert_eq!(code, 0, "{text}");
    let rps = requests_of(&text);
    assert!(
        (1000.0..3000.0).contains(&rps),
        "open loop at 2000/s measured {rps}:\n{text}"
    );
}

#[test]
fn idle_mode_reports_server_rss_and_fails_when_the_server_closes_idle_connections() {
    let mut server = Child::spawn(
        "[server]\nshards = 1\npin = false\nstats_interval = \"0s\"\n[limits]\nidle_timeout = \"0s\"\n\
         [[listener]]\nname = \"echo\"\naddr = \"127.0.0.1:0\"\n",
        "",
    );
    let addr = server.addr("echo").to_string();
    let pid = server.child.id().to_string();
    let (code, text) = bench(&[
        "--target",
        &addr,
        "--server-pid",
        &pid,
        "--mode",
        "idle",
        "-c",
        "500",
    ]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("bytes per connection"), "{text}");
    // The same over two client processes: the parent reads the server's RSS while both hold
    // their share.
    let (code, text) = bench(&[
        "--target",
        &addr,
        "--server-pid",
        &pid,
        "--mode",
        "idle",
        "-c",
        "600",
        "--processes",
        "2",
    ]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("idle: 600 connections held"), "{text}");
    server.signal("TERM");
    server.wait(Duration::from_secs(10));

    let server = Child::spawn(
        "[server]\nshards = 1\npin = false\nstats_interval = \"0s\"\n[limits]\nidle_timeout = \"200ms\"\n\
         [[listener]]\nname = \"echo\"\naddr = \"127.0.0.1:0\"\n",
        "",
    );
    let (code, text) = bench(&[
        "--target",
        &server.addr("echo").to_string(),
        "--mode",
        "idle",
        "-c",
        "20",
    ]);
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("closed 20 idle connections"), "{text}");
}

#[test]
fn refused_connection_fails_loudly() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (code, text) = bench(&[
        "--target",
        &format!("127.0.0.1:{port}"),
        "--mode",
        "echo",
        "-c",
        "2",
    ]);
    assert_ne!(code, 0);
    assert!(
        text.contains("failed") && text.contains("refused"),
        "{text}"
    );
}

#[test]
fn corrupted_echo_fails_loudly() {
    // An echo server that flips one byte in every 5000.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming().take(4) {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut total = 0usize;
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    for (i, b) in buf[..n].iter_mut().enumerate() {
                        if (total + i) % 5000 == 4999 {
                            *b ^= 0x55;
                        }
                    }
                    total += n;
                    if s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let (code, text) = bench(&[
        "--target",
        &addr.to_string(),
        "--mode",
        "echo",
        "-c",
        "2",
        "-s",
        "1000",
    ]);
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("corrupted echo"), "{text}");
}
