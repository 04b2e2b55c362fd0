//! The `shardnet` binary as a process: signals, descriptor exhaustion, config errors.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

fn echo_toml(extra_server: &str) -> String {
    format!(
        "[server]\nshards = 1\npin = false\nstats_interval = \"200ms\"\nshutdown_timeout = \"5s\"\n{extra_server}\n\
         [[listener]]\nname = \"echo\"\naddr = \"127.0.0.1:0\"\nservice = \"echo\"\n"
    )
}

#[test]
fn sigterm_during_load_echoes_everything_received_then_exits_0() {
    let mut server = Child::spawn(&echo_toml(""), "");
    let addr = server.addr("echo");
    let mut conns: Vec<TcpStream> = (0..20).map(|_| connect(addr)).collect();
    let payloads: Vec<Vec<u8>> = (0..20).map(|i| pattern(i, 100_000)).collect();
    // Every client has sent all its bytes (none read back yet) when the signal arrives.
    for (c, p) in conns.iter_mut().zip(&payloads) {
        c.write_all(p).unwrap();
    }
    server.signal("TERM");
    for (i, (c, p)) in conns.iter_mut().zip(&payloads).enumerate() {
        let (got, clean) = read_to_end(c);
        assert!(clean, "connection {i} ended with an error, not EOF");
        assert!(
            got == *p,
            "connection {i}: got {} of {} bytes back (or different bytes)",
            got.len(),
            p.len()
        );
    }
    let status = server.wait(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "log:\n{}", server.log());
    assert!(server.log().contains("draining"));
}

#[test]
fn descriptor_exhaustion_pauses_accepting_and_recovers() {
    exhaustion_and_recovery("");
}

#[test]
fn descriptor_exhaustion_on_reuseport_shards_pauses_accepting_and_recovers() {
    // The same listener type and policy serve shards that accept on their own sockets.
    exhaustion_and_recovery("balance = \"reuseport\"");
}

fn exhaustion_and_recovery(server_extra: &str) {
    // 48 descriptors: about a dozen go to stdio, epoll, eventfds and the listener; the rest to
    // connections. 60 clients cannot all be accepted at once.
    let server = Child::spawn(&echo_toml(server_extra), "ulimit -n 48 &&");
    let addr = server.addr("echo");
    let mut pending: Vec<TcpStream> = (0..60)
        .map(|_| {
            let mut c = connect(addr);
            c.write_all(b"hi").unwrap();
            c.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            c
        })
        .collect();
    let mut served_total = 0;
    let mut rounds = 0;
    while !pending.is_empty() {
        rounds += 1;
        assert!(
            rounds <= 30,
            "{} clients never served; log:\n{}",
            pending.len(),
            server.log()
        );
        let mut waiting = Vec::new();
        let mut served = Vec::new();
        for mut c in pending.drain(..) {
            let mut buf = [0u8; 2];
            match c.read_exact(&mut buf) {
                Ok(()) => {
                    assert_eq!(&buf, b"hi");
                    served.push(c);
                }
                Err(_) => waiting.push(c),
            }
        }
        if rounds == 1 {
            assert!(
                !waiting.is_empty(),
                "the limit should have stopped some accepts"
            );
            assert!(!served.is_empty(), "the server kept serving those it had");
        }
        served_total += served.len();
        drop(served); // frees descriptors in the server: it must accept the waiting ones
        pending = waiting;
    }
    assert_eq!(served_total, 60);
    assert!(
        server.log().contains("pausing accepts"),
        "log:\n{}",
        server.log()
    );
    // Still alive and serving.
    let mut c = connect(addr);
    assert_eq!(echo_roundtrip(&mut c, b"after"), b"after");
}

#[test]
fn config_check_reports_file_line_and_key() {
    let dir = std::env::temp_dir().join(format!("shardnet-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[server]\nshards = 0\n").unwrap();
    let out = std::process::Command::new(bin())
        .args(["config", "check"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:2:10: key `server.shards`", bad.display())),
        "{err}"
    );

    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "[[listener]]\nname = \"e\"\naddr = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .args(["config", "check"])
        .arg(&good)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let effective = String::from_utf8_lossy(&out.stdout);
    assert!(effective.contains("idle_timeout = \"5m\""), "{effective}");

    let out = std::process::Command::new(bin())
        .args(["config", "default"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("[[listener.websocket]]"));

    // `serve` with a broken file exits 2 with the same message.
    let out = std::process::Command::new(bin())
        .args(["serve", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("key `server.shards`"));
}
