//! The WebSocket service over real sockets: handshake, frames, close codes, pub/sub, heartbeat.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use shardnet::service::ws;

fn ws_toml(shards: usize, route_extra: &str, top: &str) -> String {
    format!(
        "{top}\n[server]\nshards = {shards}\npin = false\nstats_interval = \"0s\"\nshutdown_timeout = \"2s\"\n\
         [[listener]]\nname = \"http\"\naddr = \"127.0.0.1:0\"\nservice = \"http\"\n\
         [[listener.websocket]]\npath = \"/ws\"\nmode = \"pubsub\"\n{route_extra}\n\
         [[listener.websocket]]\npath = \"/ws/echo\"\nmode = \"echo\"\nmax_message = \"1KiB\"\n{route_extra}\n"
    )
}

const UPGRADE: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

/// Connects and upgrades; panics unless the answer is 101 with the right accept key.
fn ws_connect(addr: SocketAddr, path: &str) -> TcpStream {
    let mut s = connect(addr);
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{UPGRADE}\r\n");
    let (status, head, _) = http_exchange(&mut s, req.as_bytes());
    assert_eq!(status, 101, "{head}");
    assert!(
        head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "{head}"
    );
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("sec-websocket-extensions"),
        "extensions are declined"
    );
    s
}

fn send(s: &mut TcpStream, opcode: u8, fin: bool, payload: &[u8]) {
    let mut f = Vec::new();
    ws::write_masked(&mut f, opcode, fin, payload, [9, 8, 7, 6]);
    s.write_all(&f).unwrap();
}

/// Reads one server frame: (opcode, payload). Panics on EOF.
fn recv(s: &mut TcpStream) -> (u8, Vec<u8>) {
    try_recv(s).expect("a frame, not end of stream")
}

fn try_recv(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1];
    loop {
        if let Some((op, _, range, _)) = ws::decode_server_frame(&buf).unwrap() {
            return Some((op, buf[range].to_vec()));
        }
        match s.read(&mut chunk) {
            Ok(1) => buf.push(chunk[0]),
            _ => return None,
        }
    }
}

fn close_code(payload: &[u8]) -> u16 {
    u16::from_be_bytes([payload[0], payload[1]])
}

#[test]
fn handshake_good_and_bad() {
    let server = start_router(&ws_toml(1, "", ""));
    let addr = server.addr("http").unwrap();
    ws_connect(addr, "/ws/echo");
    let cases: &[(&str, u16)] = &[
        ("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 12\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n", 426),
        ("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: short\r\n\r\n", 400),
        ("GET /ws HTTP/1.1\r\nHost: x\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n", 426),
        ("POST /ws HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405),
    ];
    for (req, want) in cases {
        let mut s = connect(addr);
        let (status, head, _) = http_exchange(&mut s, req.as_bytes());
        assert_eq!(status, *want, "{req}");
        if *want == 426 && req.contains("Version: 12") {
            assert!(head.contains("Sec-WebSocket-Version: 13"));
        }
    }
    // Origins, when listed, are enforced.
    let server = start_router(&ws_toml(
        1,
        "allowed_origins = [\"https://good.example\"]",
        "",
    ));
    let addr = server.addr("http").unwrap();
    let mut s = connect(addr);
    let req =
        format!("GET /ws HTTP/1.1\r\nHost: x\r\nOrigin: https://evil.example\r\n{UPGRADE}\r\n");
    assert_eq!(http_exchange(&mut s, req.as_bytes()).0, 403);
    let mut s = connect(addr);
    let req =
        format!("GET /ws HTTP/1.1\r\nHost: x\r\nOrigin: https://good.example\r\n{UPGRADE}\r\n");
    assert_eq!(http_exchange(&mut s, req.as_bytes()).0, 101);
}

#[test]
fn echo_text_binary_and_fragments_with_interleaved_ping() {
    let server = start_router(&ws_toml(2, "", ""));
    let mut s = ws_connect(server.addr("http").unwrap(), "/ws/echo");
    send(&mut s, ws::OP_TEXT, true, "héllo".as_bytes());
    assert_eq!(recv(&mut s), (ws::OP_TEXT, "héllo".as_bytes().to_vec()));
    send(&mut s, ws::OP_BINARY, true, &[0, 1, 2, 255]);
    assert_eq!(recv(&mut s), (ws::OP_BINARY, vec![0, 1, 2, 255]));
    send(&mut s, ws::OP_TEXT, false, b"frag");
    send(&mut s, ws::OP_PING, true, b"p1");
    send(&mut s, ws::OP_CONT, false, b"men");
    send(&mut s, ws::OP_CONT, true, b"ted");
    assert_eq!(
        recv(&mut s),
        (ws::OP_PONG, b"p1".to_vec()),
        "the ping is answered mid-message"
    );
    assert_eq!(
        recv(&mut s),
        (ws::OP_TEXT, b"fragmented".to_vec()),
        "the message is delivered once, whole"
    );
    send(&mut s, ws::OP_CLOSE, true, &1000u16.to_be_bytes());
    let (op, payload) = recv(&mut s);
    assert_eq!((op, close_code(&payload)), (ws::OP_CLOSE, 1000));
    assert!(read_to_end(&mut s).1, "then the server closes");
}

#[test]
fn close_codes_for_bad_frames() {
    let server = start_router(&ws_toml(1, "", ""));
    let addr = server.addr("http").unwrap();
    let unmasked = |s: &mut TcpStream| {
        let mut f = Vec::new();
        ws::write_frame(&mut f, ws::OP_TEXT, b"x");
        s.write_all(&f).unwrap();
    };
    type Act = Box<dyn Fn(&mut TcpStream)>;
    let cases: Vec<(&str, Act, u16)> = vec![
        ("unmasked", Box::new(unmasked), 1002),
        (
            "reserved opcode",
            Box::new(|s: &mut TcpStream| send(s, 0x3, true, b"x")),
            1002,
        ),
        (
            "invalid utf-8",
            Box::new(|s: &mut TcpStream| send(s, ws::OP_TEXT, true, &[0xc3, 0x28])),
            1007,
        ),
        (
            "too big",
            Box::new(|s: &mut TcpStream| send(s, ws::OP_BINARY, true, &[0u8; 2000])),
            1009,
        ),
        (
            "fragmented too big",
            Box::new(|s: &mut TcpStream| {
                send(s, ws::OP_BINARY, false, &[0u8; 600]);
                send(s, ws::OP_CONT, true, &[0u8; 600]);
            }),
            1009,
        ),
        (
            "ping too long",
            Box::new(|s: &mut TcpStream| send(s, ws::OP_PING, true, &[0u8; 126])),
            1002,
        ),
    ];
    let mut bystander = ws_connect(addr, "/ws/echo");
    for (name, act, code) in cases {
        let mut s = ws_connect(addr, "/ws/echo");
        act(&mut s);
        let (op, payload) = recv(&mut s);
        assert_eq!((op, close_code(&payload)), (ws::OP_CLOSE, code), "{name}");
        let (_, clean) = read_to_end(&mut s);
        assert!(clean, "{name}: closed with FIN");
    }
    send(&mut bystander, ws::OP_TEXT, true, b"still fine");
    assert_eq!(recv(&mut bystander).1, b"still fine");
}

#[test]
fn a_burst_of_publishes_arrives_complete_and_in_order_on_every_shard() {
    // 300 publishes on two topics in one write: the shards coalesce what one wake brings into
    // one write per subscriber; every subscriber must still see its topic's messages exactly
    // once and in publish order, and nothing of the other topic.
    let server = start_router(&ws_toml(2, "", ""));
    let addr = server.addr("http").unwrap();
    let mut subs: Vec<(TcpStream, &str)> = (0..20)
        .map(|i| {
            let topic = if i % 2 == 0 { "a" } else { "b" };
            (ws_connect(addr, "/ws"), topic)
        })
        .collect();
    for (c, topic) in subs.iter_mut() {
        let msg = format!(r#"{{"op":"subscribe","topic":"{topic}"}}"#);
        send(c, ws::OP_TEXT, true, msg.as_bytes());
        assert_eq!(recv(c).0, ws::OP_TEXT);
    }
    let mut burst = Vec::new();
    for n in 0..300 {
        let topic = if n % 3 == 0 { "b" } else { "a" };
        let body = format!("{n}");
        burst.extend_from_slice(
            format!(
                "POST /publish/{topic} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
    }
    let mut h = connect(addr);
    h.write_all(&burst).unwrap();
    for (c, topic) in subs.iter_mut() {
        let expected: Vec<String> = (0..300)
            .filter(|n| (n % 3 == 0) == (*topic == "b"))
            .map(|n| format!(r#"{{"topic":"{topic}","data":{n}}}"#))
            .collect();
        for want in &expected {
            let (op, body) = recv(c);
            assert_eq!(op, ws::OP_TEXT);
            assert_eq!(&String::from_utf8(body).unwrap(), want);
        }
        // Nothing else: a ping's pong is the next frame.
        send(c, ws::OP_PING, true, b"end");
        assert_eq!(recv(c), (ws::OP_PONG, b"end".to_vec()));
    }
}

#[test]
fn thousand_subscribers_over_shards_receive_a_publish_exactly_once() {
    let server = start_router(&ws_toml(3, "", ""));
    let addr = server.addr("http").unwrap();
    let mut clients: Vec<TcpStream> = (0..1000).map(|_| ws_connect(addr, "/ws")).collect();
    for c in clients.iter_mut() {
        send(
            c,
            ws::OP_TEXT,
            true,
            br#"{"op":"subscribe","topic":"news"}"#,
        );
    }
    for c in clients.iter_mut() {
        let (op, body) = recv(c);
        assert_eq!(op, ws::OP_TEXT);
        assert_eq!(
            String::from_utf8(body).unwrap(),
            r#"{"ok":"subscribe","topic":"news"}"#
        );
    }
    let snap = server.snapshot();
    assert!(
        snap.shards.iter().all(|s| s.open >= 300),
        "spread over the shards"
    );
    let mut h = connect(addr);
    let (status, _, body) = http_exchange(
        &mut h,
        b"POST /publish/news HTTP/1.1\r\nHost: x\r\nContent-Length: 13\r\n\r\n{\"n\":\"hello\"}",
    );
    assert_eq!(status, 200);
    assert_eq!(
        String::from_utf8(body).unwrap(),
        r#"{"subscribers":1000,"topic":"news"}"#
    );
    for c in clients.iter_mut() {
        let (op, body) = recv(c);
        assert_eq!(op, ws::OP_TEXT);
        assert_eq!(
            String::from_utf8(body).unwrap(),
            r#"{"topic":"news","data":{"n":"hello"}}"#
        );
    }
    // Exactly once: nothing else arrives. Probe with a ping; its pong must be the next frame.
    for c in clients.iter_mut().step_by(50) {
        send(c, ws::OP_PING, true, b"end");
        assert_eq!(recv(c), (ws::OP_PONG, b"end".to_vec()));
    }
    // A subscriber can publish too, and unsubscribing stops delivery.
    send(
        &mut clients[0],
        ws::OP_TEXT,
        true,
        br#"{"op":"unsubscribe","topic":"news"}"#,
    );
    assert_eq!(
        recv(&mut clients[0]).1,
        br#"{"ok":"unsubscribe","topic":"news"}"#
    );
    send(
        &mut clients[1],
        ws::OP_TEXT,
        true,
        br#"{"op":"publish","topic":"news","data":42}"#,
    );
    assert_eq!(recv(&mut clients[1]).1, br#"{"topic":"news","data":42}"#);
    assert_eq!(recv(&mut clients[999]).1, br#"{"topic":"news","data":42}"#);
    send(&mut clients[0], ws::OP_PING, true, b"x");
    assert_eq!(
        recv(&mut clients[0]),
        (ws::OP_PONG, b"x".to_vec()),
        "unsubscribed: no delivery"
    );
}

#[test]
fn delivery_past_the_wake_budget_continues_on_the_next_wake() {
    // 2,100 subscribers on one shard, each on five topics: delivering one publish per topic is
    // 5 x 2,101 units of work, over the 8,192 one wake may spend, so the last topic waits for a
    // wake the shard asks for itself (a command it sends itself: the command count shows it).
    let server = start_router(&ws_toml(1, "", ""));
    let addr = server.addr("http").unwrap();
    let topics = ["a", "b", "c", "d", "e"];
    let subscribe_all: Vec<u8> = topics
        .iter()
        .flat_map(|t| {
            let mut f = Vec::new();
            let msg = format!(r#"{{"op":"subscribe","topic":"{t}"}}"#);
            ws::write_masked(&mut f, ws::OP_TEXT, true, msg.as_bytes(), [1, 2, 3, 4]);
            f
        })
        .collect();
    let mut clients: Vec<TcpStream> = (0..2100).map(|_| ws_connect(addr, "/ws")).collect();
    for c in clients.iter_mut() {
        c.write_all(&subscribe_all).unwrap();
    }
    for c in clients.iter_mut() {
        for _ in topics {
            assert_eq!(recv(c).0, ws::OP_TEXT);
        }
    }
    let before = server.snapshot().total().commands;
    let mut burst = Vec::new();
    for t in topics {
        burst.extend_from_slice(
            format!("POST /publish/{t} HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n1")
                .as_bytes(),
        );
    }
    let mut h = connect(addr);
    h.write_all(&burst).unwrap();
    for c in clients.iter_mut() {
        let mut got: Vec<String> = (0..5)
            .map(|_| String::from_utf8(recv(c).1).unwrap())
            .collect();
        got.sort();
        let want: Vec<String> = topics
            .iter()
            .map(|t| format!(r#"{{"topic":"{t}","data":1}}"#))
            .collect();
        assert_eq!(got, want);
    }
    let commands = server.snapshot().total().commands - before;
    assert!(
        commands > 5,
        "{commands} commands: delivery did not continue on a later wake"
    );
}

fn stats_json(addr: SocketAddr) -> serde_json::Value {
    let mut h = connect(addr);
    let (_, _, body) = http_exchange(&mut h, b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n");
    serde_json::from_slice(&body).unwrap()
}

fn service_total(v: &serde_json::Value, key: &str) -> u64 {
    v["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s[key].as_u64().unwrap())
        .sum()
}

#[test]
fn slow_subscribers_stay_bounded_under_both_policies() {
    for policy in ["drop", "disconnect"] {
        let limits = "[limits]\nmax_write_buffer = \"16KiB\"\nidle_timeout = \"0s\"\nwrite_timeout = \"30s\"";
        let server = start_router(&ws_toml(
            1,
            &format!("slow_consumer = \"{policy}\""),
            limits,
        ));
        let addr = server.addr("http").unwrap();
        let mut slow = ws_connect(addr, "/ws");
        slow.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        send(
            &mut slow,
            ws::OP_TEXT,
            true,
            br#"{"op":"subscribe","topic":"firehose"}"#,
        );
        assert_eq!(
            recv(&mut slow).1,
            br#"{"ok":"subscribe","topic":"firehose"}"#
        );
        // `slow` never reads again. Publish 24 MB at it: more than loopback socket buffers hold.
        let mut publisher = connect(addr);
        let payload = "x".repeat(16_000);
        let req = format!(
            "POST /publish/firehose HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{payload}",
            payload.len()
        );
        let mut peak = 0;
        for _ in 0..1500 {
            assert_eq!(http_exchange(&mut publisher, req.as_bytes()).0, 200);
            peak = peak.max(server.snapshot().shards[0].output_queued);
        }
        // Bounded by max_write_buffer plus the one message that crossed it.
        assert!(
            peak <= 16 * 1024 + 16_100,
            "{policy}: queued output peaked at {peak}"
        );
        let stats = stats_json(addr);
        match policy {
            "drop" => {
                assert!(service_total(&stats, "ws_dropped") > 500, "{stats}");
                assert_eq!(service_total(&stats, "ws_slow_closed"), 0);
            }
            _ => {
                assert_eq!(service_total(&stats, "ws_slow_closed"), 1, "{stats}");
                wait_until(Duration::from_secs(5), "slow subscriber closed", || {
                    server.snapshot().total().open <= 1
                });
            }
        }
    }
}

#[test]
fn heartbeat_reaps_a_silent_client_and_keeps_a_live_one() {
    let server = start_router(&ws_toml(
        1,
        "ping_interval = \"200ms\"\npong_timeout = \"200ms\"",
        "",
    ));
    let addr = server.addr("http").unwrap();
    let mut silent = ws_connect(addr, "/ws/echo");
    let mut live = ws_connect(addr, "/ws/echo");
    live.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let start = Instant::now();
    let mut pongs = 0;
    while start.elapsed() < Duration::from_millis(1500) {
        if let Some((op, payload)) = try_recv(&mut live) {
            if op == ws::OP_PING {
                send(&mut live, ws::OP_PONG, true, &payload);
                pongs += 1;
            }
        }
    }
    assert!(pongs >= 2, "the live client was pinged ({pongs})");
    let (op, _) = recv(&mut silent);
    assert_eq!(op, ws::OP_PING);
    let (op, payload) = recv(&mut silent);
    assert_eq!(
        (op, close_code(&payload)),
        (ws::OP_CLOSE, 1001),
        "reaped after no pong"
    );
    live.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    send(&mut live, ws::OP_TEXT, true, b"alive");
    loop {
        let (op, p) = recv(&mut live);
        if op == ws::OP_TEXT {
            assert_eq!(p, b"alive");
            break;
        }
    }
    let stats = stats_json(addr);
    assert_eq!(service_total(&stats, "ws_reaped"), 1);
}

#[test]
fn drain_sends_going_away() {
    let mut server = start_router(&ws_toml(2, "", ""));
    let mut c = ws_connect(server.addr("http").unwrap(), "/ws/echo");
    assert!(server.shutdown());
    let (op, payload) = recv(&mut c);
    assert_eq!((op, close_code(&payload)), (ws::OP_CLOSE, 1001));
}

#[test]
fn interoperates_with_python_websockets() {
    let server = start_router(&ws_toml(2, "", ""));
    let addr = server.addr("http").unwrap();
    let Some(py) = python_with(&[("websockets", "websockets")]) else {
        return; // skipped: python_with said why
    };
    let script = r#"
import asyncio, json, sys
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError

async def main(base):
    async with connect(base + "/ws/echo", max_size=None) as ws:
        await ws.send("héllo")
        assert await ws.recv() == "héllo"
        await ws.send(b"\x00\x01binary")
        assert await ws.recv() == b"\x00\x01binary"
        await ws.send(["frag", "mented ", "text"])
        assert await ws.recv() == "fragmented text"
        await ws.send([b"ab", b"cd"])
        assert await ws.recv() == b"abcd"
        pong = await ws.ping(b"hi")
        await asyncio.wait_for(pong, 5)
    # A message over max_message (1KiB on /ws/echo) is closed with 1009.
    async with connect(base + "/ws/echo", max_size=None) as ws:
        await ws.send("x" * 5000)
        try:
            await ws.recv()
            raise SystemExit("expected a close")
        except ConnectionClosedError as e:
            assert e.rcvd.code == 1009, e.rcvd
    async with connect(base + "/ws") as sub, connect(base + "/ws") as pub:
        await sub.send(json.dumps({"op": "subscribe", "topic": "py"}))
        assert json.loads(await sub.recv()) == {"ok": "subscribe", "topic": "py"}
        await pub.send(json.dumps({"op": "publish", "topic": "py", "data": {"k": [1, 2]}}))
        assert json.loads(await sub.recv()) == {"topic": "py", "data": {"k": [1, 2]}}
    print("ok")

asyncio.run(main(sys.argv[1]))
"#;
    run_python(&py, script, &[&format!("ws://{addr}")]);
}
