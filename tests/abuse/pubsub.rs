//! Abuse cases: pub/sub. Subscribers that stop reading, publishers that flood, bodies that grow
//! when encoded, too many topics; each asserts the answer and the bound.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use shardnet::service::ws;

use super::common::*;
use super::ws::{frame, recv, send, ws_connect, ws_toml};

fn subscribe(s: &mut TcpStream, topic: &str) -> String {
    let msg = format!(r#"{{"op":"subscribe","topic":"{topic}"}}"#);
    send(s, ws::OP_TEXT, true, msg.as_bytes());
    let (op, body) = recv(s);
    assert_eq!(op, ws::OP_TEXT);
    String::from_utf8(body).unwrap()
}

fn stats(addr: SocketAddr) -> serde_json::Value {
    let mut h = connect(addr);
    let (_, _, body) = http_exchange(&mut h, b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n");
    serde_json::from_slice(&body).unwrap()
}

fn service_total(addr: SocketAddr, key: &str) -> u64 {
    total(&stats(addr), key)
}

/// A service counter summed over the shards.
fn total(stats: &serde_json::Value, key: &str) -> u64 {
    stats["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s[key].as_u64().unwrap_or(0))
        .sum()
}

fn post(addr: SocketAddr, topic: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut h = connect(addr);
    let mut req = format!(
        "POST /publish/{topic} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    let (status, _, body) = http_exchange(&mut h, &req);
    (status, body)
}

/// Reads frames with a buffer (a backlog of megabytes), returning the code of the close frame
/// that ends them, if one does.
fn drain_to_close(s: &mut TcpStream) -> (usize, Option<u16>) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    let mut frames = 0;
    loop {
        while let Some((op, _, range, total)) = ws::decode_server_frame(&buf).unwrap() {
            if op == ws::OP_CLOSE {
                return (
                    frames,
                    Some(u16::from_be_bytes([buf[range.start], buf[range.start + 1]])),
                );
            }
            frames += 1;
            buf.drain(..total);
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return (frames, None),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Publishes `data` (a JSON value) on `topic`, `n` times per write, from a WebSocket client.
fn publish_batch(topic: &str, data: &str, n: usize) -> Vec<u8> {
    let msg = format!(r#"{{"op":"publish","topic":"{topic}","data":{data}}}"#);
    let one = frame(ws::OP_TEXT, true, msg.as_bytes());
    one.iter().copied().cycle().take(one.len() * n).collect()
}

const LIMITS: &str =
    "[limits]\nmax_write_buffer = \"64KiB\"\nwrite_timeout = \"30s\"\nidle_timeout = \"0s\"";

#[test]
fn ten_non_reading_subscribers_stay_within_their_bound() {
    let server = start_router(&ws_toml(1, "", LIMITS));
    let addr = server.addr("http").unwrap();
    let stats_handle = server.stats();
    let mut subs: Vec<TcpStream> = (0..10).map(|_| ws_connect(addr, "/ws")).collect();
    for s in subs.iter_mut() {
        assert_eq!(
            subscribe(s, "flood"),
            r#"{"ok":"subscribe","topic":"flood"}"#
        );
    }
    // They never read again. 4 KB messages, 2,500 of them: 10 MB per subscriber, more than
    // loopback socket buffers hold.
    let data = format!("\"{}\"", "x".repeat(4000));
    let batch = publish_batch("flood", &data, 50);
    let mut publisher = ws_connect(addr, "/ws");
    let mut peak = 0;
    for _ in 0..50 {
        publisher.write_all(&batch).unwrap();
        peak = peak.max(stats_handle.snapshot().shards[0].output_queued);
    }
    let message = 4000 + 40;
    wait_until(
        Duration::from_secs(10),
        "the flood is delivered or dropped",
        || {
            let t = stats(addr);
            peak = peak.max(stats_handle.snapshot().shards[0].output_queued);
            total(&t, "ws_messages_out") + total(&t, "ws_dropped") == 10 * 2500
        },
    );
    let bound = 10 * (64 * 1024 + message);
    assert!(
        peak <= bound as u64,
        "{peak} bytes queued for 10 subscribers (bound {bound})"
    );
    assert!(service_total(addr, "ws_dropped") > 0);
    assert_eq!(
        service_total(addr, "ws_open"),
        11,
        "drop policy: all still connected"
    );
}

#[test]
fn a_slow_subscriber_under_disconnect_gets_1008_behind_its_backlog() {
    let server = start_router(&ws_toml(1, "slow_consumer = \"disconnect\"", LIMITS));
    let addr = server.addr("http").unwrap();
    let mut slow = ws_connect(addr, "/ws");
    assert_eq!(
        subscribe(&mut slow, "flood"),
        r#"{"ok":"subscribe","topic":"flood"}"#
    );
    let data = format!("\"{}\"", "x".repeat(4000));
    let batch = publish_batch("flood", &data, 50);
    let mut publisher = ws_connect(addr, "/ws");
    let start = Instant::now();
    while service_total(addr, "ws_slow_closed") == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "never over the bound"
        );
        publisher.write_all(&batch).unwrap();
    }
    // Read at once (within the one-second grace): the backlog, then the close.
    let (frames, code) = drain_to_close(&mut slow);
    assert_eq!(code, Some(ws::CLOSE_POLICY), "after {frames} frames");
    assert!(frames > 0);
}

#[test]
fn publishes_are_checked_on_their_encoded_size() {
    let server = start_router(&ws_toml(1, "max_message = \"64KiB\"", ""));
    let addr = server.addr("http").unwrap();
    let mut sub = ws_connect(addr, "/ws");
    subscribe(&mut sub, "t");
    // 20 KB of control bytes is valid UTF-8 text, but 120 KB once escaped into JSON.
    let (status, body) = post(addr, "t", &[1u8; 20_000]);
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("max_message"));
    // Not UTF-8: refused, not mangled.
    assert_eq!(post(addr, "t", &[0xff, 0xfe, 0x00]).0, 415);
    // A JSON body is sent as it is, byte for byte.
    let json = format!("[{}1]", "1, ".repeat(15_000));
    assert_eq!(post(addr, "t", json.as_bytes()).0, 200);
    let (op, got) = recv(&mut sub);
    assert_eq!(op, ws::OP_TEXT);
    assert_eq!(
        got,
        format!(r#"{{"topic":"t","data":{json}}}"#).into_bytes()
    );
    // Text is sent as a JSON string.
    assert_eq!(post(addr, "t", b"plain \"text\"").0, 200);
    assert_eq!(
        recv(&mut sub).1,
        br#"{"topic":"t","data":"plain \"text\""}"#
    );
    // A WebSocket publish whose data grows when re-encoded (9e9 is 9000000000.0): refused with
    // an error message naming the limit; the connection stays.
    let mut publisher = ws_connect(addr, "/ws");
    let data = format!("[{}9e9]", "9e9,".repeat(6000));
    let msg = format!(r#"{{"op":"publish","topic":"t","data":{data}}}"#);
    assert!(msg.len() < 64 * 1024);
    send(&mut publisher, ws::OP_TEXT, true, msg.as_bytes());
    let (op, err) = recv(&mut publisher);
    assert_eq!(op, ws::OP_TEXT);
    let err: serde_json::Value = serde_json::from_slice(&err).unwrap();
    assert!(
        err["error"].as_str().unwrap().contains("max_message"),
        "{err}"
    );
    assert_eq!(
        (err["op"].as_str(), err["topic"].as_str()),
        (Some("publish"), Some("t"))
    );
    // Nothing was delivered: a ping's pong is the subscriber's next frame.
    send(&mut sub, ws::OP_PING, true, b"end");
    assert_eq!(recv(&mut sub), (ws::OP_PONG, b"end".to_vec()));
    assert_eq!(service_total(addr, "ws_publish_refused"), 3);
}

#[test]
fn topic_limits_refuse_and_never_acknowledge() {
    let server = start_router(&ws_toml(1, "max_topics = 3\nmax_topic_length = 16", ""));
    let addr = server.addr("http").unwrap();
    let mut s = ws_connect(addr, "/ws");
    for t in ["a", "b", "c"] {
        assert_eq!(
            subscribe(&mut s, t),
            format!(r#"{{"ok":"subscribe","topic":"{t}"}}"#)
        );
    }
    assert_eq!(
        subscribe(&mut s, "a"),
        r#"{"ok":"subscribe","topic":"a"}"#,
        "already in"
    );
    let refused: serde_json::Value = serde_json::from_str(&subscribe(&mut s, "d")).unwrap();
    let why = refused["error"].as_str().unwrap();
    assert!(why.contains("max_topics") && why.contains('3'), "{refused}");
    assert_eq!(refused["topic"], "d");
    let long = "x".repeat(17);
    let refused: serde_json::Value = serde_json::from_str(&subscribe(&mut s, &long)).unwrap();
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("max_topic_length"),
        "{refused}"
    );
    // Not subscribed to d: a publish there does not arrive.
    let (status, body) = post(addr, "d", b"1");
    assert_eq!(
        (status, body.as_slice()),
        (200, &br#"{"subscribers":0,"topic":"d"}"#[..])
    );
    send(&mut s, ws::OP_PING, true, b"probe");
    assert_eq!(recv(&mut s), (ws::OP_PONG, b"probe".to_vec()));
    // The HTTP side has the same topic bound.
    assert_eq!(post(addr, &long, b"1").0, 400);
    // Room again after an unsubscribe.
    send(
        &mut s,
        ws::OP_TEXT,
        true,
        br#"{"op":"unsubscribe","topic":"b"}"#,
    );
    recv(&mut s);
    assert_eq!(subscribe(&mut s, "d"), r#"{"ok":"subscribe","topic":"d"}"#);
    assert_eq!(post(addr, "d", b"2").0, 200);
    assert_eq!(recv(&mut s).1, br#"{"topic":"d","data":2}"#);
    assert_eq!(service_total(addr, "ws_subscribe_refused"), 2);
}

/// Connects `make()` until the connection lands on `shard` (least-connections spreads new
/// connections over shards; the per-shard open count tells where one went). Connections that
/// landed elsewhere go to `spare`, kept open so the balancer sends the next one elsewhere.
fn on_shard<T>(
    server: &shardnet::server::Server,
    shard: usize,
    spare: &mut Vec<T>,
    mut make: impl FnMut() -> T,
) -> T {
    for _ in 0..20 {
        let before: Vec<u64> = server.snapshot().shards.iter().map(|s| s.open).collect();
        let c = make();
        let mut landed = None;
        wait_until(Duration::from_secs(5), "the connection is adopted", || {
            let now: Vec<u64> = server.snapshot().shards.iter().map(|s| s.open).collect();
            landed = (0..now.len()).find(|&i| now[i] > before[i]);
            landed.is_some()
        });
        if landed == Some(shard) {
            return c;
        }
        spare.push(c);
    }
    panic!("no connection landed on shard {shard}");
}

#[test]
fn a_flood_over_many_topics_does_not_starve_other_connections() {
    // Publishes to 12,000 distinct topics arrive at shard 0 from a publisher on shard 1, while a
    // client on shard 0 subscribed to 500 of them reads, and another asks for /plaintext.
    let toml = ws_toml(2, "max_topics = 500", "").replace(
        "shutdown_timeout = \"2s\"\n",
        "shutdown_timeout = \"2s\"\nbalance = \"least-connections\"\n",
    );
    let server = start_router(&toml);
    let addr = server.addr("http").unwrap();
    let (mut spare, mut spare_plain) = (Vec::new(), Vec::new());
    let mut sub = on_shard(&server, 0, &mut spare, || ws_connect(addr, "/ws"));
    for i in 0..500 {
        subscribe(&mut sub, &format!("t{}", i * 24));
    }
    let mut plain = on_shard(&server, 0, &mut spare_plain, || connect(addr));
    let mut publisher = on_shard(&server, 1, &mut spare, || ws_connect(addr, "/ws"));
    let stop = AtomicBool::new(false);
    let worst = std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut batch = Vec::new();
            for t in 0..12_000 {
                let msg = format!(r#"{{"op":"publish","topic":"t{t}","data":{t}}}"#);
                batch.extend(frame(ws::OP_TEXT, true, msg.as_bytes()));
            }
            let start = Instant::now();
            while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(20) {
                if publisher.write_all(&batch).is_err() {
                    break;
                }
            }
        });
        scope.spawn(|| {
            let mut buf = vec![0u8; 1 << 16];
            sub.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            while !stop.load(Ordering::Relaxed) {
                let _ = sub.read(&mut buf);
            }
        });
        // Let the flood build up, then time requests on the flooded shard.
        wait_until(Duration::from_secs(10), "the flood reaches shard 0", || {
            server.snapshot().shards[0].commands > 20_000
        });
        let mut times = Vec::new();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            let t = Instant::now();
            let (status, _, _) =
                http_exchange(&mut plain, b"GET /plaintext HTTP/1.1\r\nHost: x\r\n\r\n");
            assert_eq!(status, 200);
            times.push(t.elapsed());
        }
        let flooded = server.snapshot().shards[0].commands;
        stop.store(true, Ordering::Relaxed);
        times.sort();
        let worst = *times.last().unwrap();
        let p90 = times[times.len() * 9 / 10];
        eprintln!(
            "{} requests during the flood ({flooded} commands on shard 0): median {:?}, p90 {p90:?}, worst {worst:?}",
            times.len(),
            times[times.len() / 2]
        );
        (p90, worst)
    });
    // The 90th percentile, not the worst: on a loaded 2-core machine one request can lose the CPU
    // to other test threads for longer than the bound, flood or not. Before the fix every
    // request behind a wake's grouping took 150-530 ms.
    let (p90, worst) = worst;
    assert!(
        p90 < Duration::from_millis(100),
        "/plaintext p90 {p90:?} (worst {worst:?})"
    );
}

#[test]
fn a_publisher_that_never_reads_its_errors_is_bounded() {
    // Every publish is refused (topic too long) with an error message the publisher never reads.
    let server = start_router(&ws_toml(1, "max_topic_length = 4", LIMITS));
    let addr = server.addr("http").unwrap();
    let stats_handle = server.stats();
    let mut p = ws_connect(addr, "/ws");
    p.set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let batch = publish_batch("toolong", "1", 500);
    let start = Instant::now();
    let mut peak = 0;
    while start.elapsed() < Duration::from_secs(10) && p.write_all(&batch).is_ok() {
        peak = peak.max(stats_handle.snapshot().shards[0].output_queued);
    }
    assert!(
        peak <= 64 * 1024 + 256 * 1024,
        "{peak} bytes of errors queued"
    );
}

#[test]
fn a_burst_larger_than_the_bound_reaches_a_reading_subscriber_whole() {
    // 600 KB published in one write, nine times the 64 KiB bound: a subscriber that reads
    // loses nothing (the bound is on what waits for a subscriber, not on what passes through).
    let server = start_router(&ws_toml(1, "", LIMITS));
    let addr = server.addr("http").unwrap();
    let mut sub = ws_connect(addr, "/ws");
    subscribe(&mut sub, "burst");
    let mut publisher = ws_connect(addr, "/ws");
    let mut burst = Vec::new();
    for n in 0..600 {
        let msg = format!(
            r#"{{"op":"publish","topic":"burst","data":[{n},"{}"]}}"#,
            "y".repeat(1000)
        );
        burst.extend(frame(ws::OP_TEXT, true, msg.as_bytes()));
    }
    publisher.write_all(&burst).unwrap();
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    let mut seen = 0;
    while seen < 600 {
        while let Some((op, _, range, total)) = ws::decode_server_frame(&buf).unwrap() {
            assert_eq!(op, ws::OP_TEXT);
            let v: serde_json::Value = serde_json::from_slice(&buf[range]).unwrap();
            assert_eq!(v["data"][0], seen, "in order, none missing");
            seen += 1;
            buf.drain(..total);
        }
        if seen == 600 {
            break;
        }
        let n = sub.read(&mut chunk).unwrap_or_else(|e| {
            panic!(
                "{e}: {seen} seen, {} dropped",
                service_total(addr, "ws_dropped")
            )
        });
        assert!(n > 0, "closed after {seen} messages");
        buf.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(service_total(addr, "ws_dropped"), 0);
}
