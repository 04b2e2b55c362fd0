//! permessage-deflate (RFC 7692) over real sockets: the answer to each offer, compressed echo
//! and fan-out (with Python's `websockets`, which negotiates it by default), and bad input: RSV1
//! where it cannot be (1002), a deflate bomb (1009, the server's memory flat), a corrupt stream
//! (1007).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use flate2::{Compress, Compression as Level, Decompress, FlushCompress, FlushDecompress};
use shardnet::service::ws;

const SHARED: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// One HTTP listener with echo routes in each compression mode and a pub/sub route.
fn toml(shards: usize, top: &str) -> String {
    format!(
        "{top}\n[server]\nshards = {shards}\npin = false\nstats_interval = \"0s\"\nshutdown_timeout = \"2s\"\n\
         [[listener]]\nname = \"http\"\naddr = \"127.0.0.1:0\"\nservice = \"http\"\n\
         [[listener.websocket]]\npath = \"/echo\"\nmode = \"echo\"\n\
         [[listener.websocket]]\npath = \"/echo/dedicated\"\nmode = \"echo\"\ncompression = \"dedicated\"\n\
         [[listener.websocket]]\npath = \"/echo/off\"\nmode = \"echo\"\ncompression = \"off\"\n\
         [[listener.websocket]]\npath = \"/echo/small\"\nmode = \"echo\"\nmax_message = \"64KiB\"\n\
         [[listener.websocket]]\npath = \"/ws\"\nmode = \"pubsub\"\n\
         [[listener.websocket]]\npath = \"/ws/dedicated\"\nmode = \"pubsub\"\ncompression = \"dedicated\"\n"
    )
}

const UPGRADE: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

/// Upgrades with `offers` (one `Sec-WebSocket-Extensions` line each): the status, the
/// response's extension header value (if any) and the stream.
fn upgrade(addr: SocketAddr, path: &str, offers: &[&str]) -> (u16, Option<String>, TcpStream) {
    let mut s = connect(addr);
    let lines: String = offers
        .iter()
        .map(|o| format!("Sec-WebSocket-Extensions: {o}\r\n"))
        .collect();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{UPGRADE}{lines}\r\n");
    let (status, head, _) = http_exchange(&mut s, req.as_bytes());
    let ext = head
        .lines()
        .find_map(|l| l.strip_prefix("Sec-WebSocket-Extensions: "))
        .map(str::to_string);
    (status, ext, s)
}

/// A client frame; `rsv1` marks it compressed.
fn frame(opcode: u8, fin: bool, rsv1: bool, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    ws::write_masked(&mut f, opcode, fin, payload, [9, 8, 7, 6]);
    if rsv1 {
        f[0] |= ws::RSV1;
    }
    f
}

/// Reads one server frame: (first header byte, payload); `None` at end of stream.
fn recv(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((_, _, range, len)) = ws::decode_server_frame(&buf).unwrap() {
            assert_eq!(len, buf.len(), "one frame at a time in these tests");
            return Some((buf[0], buf[range].to_vec()));
        }
        // Read no further than the frame's end once its header is in.
        let want = frame_len(&buf)
            .map_or(1, |n| n - buf.len())
            .min(chunk.len());
        match s.read(&mut chunk[..want]) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The total length of the server frame starting `buf`, once its header is in.
fn frame_len(buf: &[u8]) -> Option<usize> {
    let len7 = *buf.get(1)? & 0x7f;
    match len7 {
        126 => Some(4 + u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]) as usize),
        127 => Some(10 + u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize),
        n => Some(2 + n as usize),
    }
}

fn close_code_of(s: &mut TcpStream) -> u16 {
    let (b0, payload) = recv(s).expect("a close frame");
    assert_eq!(b0 & 0x0f, ws::OP_CLOSE, "{b0:#x}");
    u16::from_be_bytes([payload[0], payload[1]])
}

/// A client's compressor: no context takeover (the server always asks for that).
fn client_deflate(data: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(Level::new(6), false);
    let mut out = Vec::with_capacity(data.len() + 64);
    c.compress_vec(data, &mut out, FlushCompress::Sync).unwrap();
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

/// A client's inflater; it keeps its window across messages, as the server's context
/// takeover (dedicated mode) needs.
struct ClientInflater(Decompress);

impl ClientInflater {
    fn new() -> Self {
        ClientInflater(Decompress::new(false))
    }

    fn inflate(&mut self, payload: &[u8]) -> Vec<u8> {
        let mut input = payload.to_vec();
        input.extend_from_slice(&[0, 0, 0xff, 0xff]);
        let mut out = Vec::with_capacity(1 << 20);
        self.0
            .decompress_vec(&input, &mut out, FlushDecompress::Sync)
            .unwrap();
        out
    }
}

fn json(n: usize, seed: usize) -> Vec<u8> {
    let mut s = String::from("[");
    let mut i = seed;
    while s.len() < n {
        s.push_str(&format!(
            "{{\"seq\":{i},\"symbol\":\"ACME{}\",\"bid\":{}.{:02}}},",
            i % 5,
            100 + i * 37 % 50,
            i * 13 % 100
        ));
        i += 1;
    }
    s.truncate(n - 1);
    s.push(']');
    s.into_bytes()
}

fn stats(addr: SocketAddr) -> serde_json::Value {
    let mut h = connect(addr);
    let (_, _, body) = http_exchange(&mut h, b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n");
    serde_json::from_slice(&body).unwrap()
}

fn deflate_total(v: &serde_json::Value, key: &str) -> u64 {
    v["deflate_total"][key].as_u64().unwrap()
}

/// Every offer-parameter combination of RFC 7692 §7.1, per mode: the exact answer, then an echo
/// of two compressed messages through it.
#[test]
fn offers_get_the_exact_answer() {
    let server = start_router(&toml(1, ""));
    let addr = server.addr("http").unwrap();
    let dedicated = "permessage-deflate; client_no_context_takeover; server_max_window_bits=12";
    let cases: &[(&str, &[&str], Option<&str>)] = &[
        ("/echo", &["permessage-deflate"], Some(SHARED)),
        (
            "/echo",
            &["permessage-deflate; client_max_window_bits"],
            Some(SHARED),
        ),
        (
            "/echo",
            &["permessage-deflate; client_max_window_bits=9"],
            Some(SHARED),
        ),
        (
            "/echo",
            &["permessage-deflate; server_no_context_takeover"],
            Some(SHARED),
        ),
        (
            "/echo",
            &["permessage-deflate; client_no_context_takeover"],
            Some(SHARED),
        ),
        (
            "/echo",
            &["permessage-deflate; server_max_window_bits=10"],
            Some(
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
                 server_max_window_bits=10",
            ),
        ),
        (
            "/echo",
            &["permessage-deflate; server_max_window_bits=8"],
            None,
        ),
        (
            "/echo",
            &["permessage-deflate; server_max_window_bits=8, permessage-deflate; client_max_window_bits"],
            Some(SHARED),
        ),
        ("/echo", &["x-webkit-deflate-frame", "permessage-deflate"], Some(SHARED)),
        (
            "/echo",
            &["permessage-deflate; client_max_window_bits=16"],
            None,
        ),
        ("/echo", &["permessage-deflate; mystery"], None),
        ("/echo", &["x-webkit-deflate-frame"], None),
        ("/echo", &[], None),
        (
            "/echo/dedicated",
            &["permessage-deflate; client_max_window_bits"],
            Some(dedicated),
        ),
        (
            "/echo/dedicated",
            &["permessage-deflate; server_max_window_bits=10"],
            Some("permessage-deflate; client_no_context_takeover; server_max_window_bits=10"),
        ),
        (
            "/echo/dedicated",
            &["permessage-deflate; server_max_window_bits=15"],
            Some(dedicated),
        ),
        (
            "/echo/dedicated",
            &["permessage-deflate; server_no_context_takeover"],
            Some(
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
                 server_max_window_bits=12",
            ),
        ),
        ("/echo/off", &["permessage-deflate"], None),
    ];
    for &(path, offers, expected) in cases {
        let (status, ext, mut s) = upgrade(addr, path, offers);
        assert_eq!(status, 101, "{path} {offers:?}");
        assert_eq!(ext.as_deref(), expected, "{path} {offers:?}");
        let mut inflater = ClientInflater::new();
        for seed in [0, 1] {
            let msg = json(2048, seed);
            let compressed = expected.is_some();
            let payload = if compressed {
                client_deflate(&msg)
            } else {
                msg.clone()
            };
            s.write_all(&frame(ws::OP_TEXT, true, compressed, &payload))
                .unwrap();
            let (b0, reply) = recv(&mut s).expect("the echo");
            assert_eq!(b0 & 0x0f, ws::OP_TEXT);
            assert_eq!(b0 & ws::RSV1 != 0, compressed, "{path} {offers:?}");
            let got = if compressed {
                inflater.inflate(&reply)
            } else {
                reply
            };
            assert_eq!(got, msg, "{path} {offers:?}");
        }
    }
    // Malformed offers get 400 on every route, compression off included.
    for path in ["/echo", "/echo/dedicated", "/echo/off"] {
        for bad in [
            "permessage-deflate; x=\"open",
            "permessage-deflate;",
            ", ,",
            "a b",
        ] {
            let (status, _, _) = upgrade(addr, path, &[bad]);
            assert_eq!(status, 400, "{path} {bad:?}");
        }
    }
}

#[test]
fn rsv1_where_it_cannot_be_is_a_protocol_error() {
    let server = start_router(&toml(1, ""));
    let addr = server.addr("http").unwrap();
    let z = client_deflate(b"hello hello hello hello hello hello hello");
    // No compression negotiated.
    for path in ["/echo", "/echo/off"] {
        let (_, ext, mut s) = upgrade(addr, path, &[]);
        assert_eq!(ext, None);
        s.write_all(&frame(ws::OP_TEXT, true, true, &z)).unwrap();
        assert_eq!(close_code_of(&mut s), ws::CLOSE_PROTOCOL, "{path}");
    }
    // Negotiated, but on a control frame or a continuation.
    let mut on_cont = frame(ws::OP_TEXT, false, true, &z[..4]);
    on_cont.extend(frame(ws::OP_CONT, true, true, &z[4..]));
    for bytes in [frame(ws::OP_PING, true, true, b"p"), on_cont] {
        let (_, ext, mut s) = upgrade(addr, "/echo", &["permessage-deflate"]);
        assert_eq!(ext.as_deref(), Some(SHARED));
        s.write_all(&bytes).unwrap();
        assert_eq!(close_code_of(&mut s), ws::CLOSE_PROTOCOL);
    }
}

#[test]
fn fragmented_compressed_messages_are_echoed() {
    let server = start_router(&toml(2, ""));
    let addr = server.addr("http").unwrap();
    let (_, _, mut s) = upgrade(addr, "/echo", &["permessage-deflate"]);
    let msg = json(10_000, 3);
    let z = client_deflate(&msg);
    let mut bytes = frame(ws::OP_BINARY, false, true, &z[..100]);
    bytes.extend(frame(ws::OP_PING, true, false, b"mid"));
    bytes.extend(frame(ws::OP_CONT, false, false, &z[100..z.len() / 2]));
    bytes.extend(frame(ws::OP_CONT, true, false, &z[z.len() / 2..]));
    // Sent in small pieces, so the message is assembled across reads.
    for piece in bytes.chunks(333) {
        s.write_all(piece).unwrap();
    }
    let (b0, pong) = recv(&mut s).unwrap();
    assert_eq!((b0 & 0x0f, &pong[..]), (ws::OP_PONG, &b"mid"[..]));
    let (b0, reply) = recv(&mut s).unwrap();
    assert_eq!(b0, 0x80 | ws::RSV1 | ws::OP_BINARY);
    assert_eq!(ClientInflater::new().inflate(&reply), msg);
}

/// A deflate bomb: `chunks` times `chunk` zero bytes, from the steady-state compressed form of
/// one chunk repeated (deflate's best ratio is about 1030:1, so 1 GiB takes 1 MB).
fn bomb(chunk: usize, chunks: usize) -> Vec<u8> {
    let mut c = Compress::new(Level::new(9), false);
    let zeros = vec![0u8; chunk];
    let mut parts = Vec::new();
    for _ in 0..3 {
        let mut o = Vec::with_capacity(chunk / 256 + 1024);
        c.compress_vec(&zeros, &mut o, FlushCompress::Sync).unwrap();
        parts.push(o);
    }
    assert_eq!(parts[1], parts[2], "steady state");
    let mut b = parts[0].clone();
    for _ in 1..chunks {
        b.extend_from_slice(&parts[1]);
    }
    b.truncate(b.len() - 4);
    b
}

/// VmHWM (peak resident set) and VmRSS of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
    };
    (field("VmHWM:"), field("VmRSS:"))
}

#[test]
fn a_deflate_bomb_is_closed_with_1009_and_memory_stays_flat() {
    let gib = bomb(16 << 20, 64);
    assert!(gib.len() < 1 << 20, "1 GiB of zeros in {} bytes", gib.len());
    let kib = bomb(1 << 20, 1);
    assert!(kib.len() < 1100, "1 MiB of zeros in {} bytes", kib.len());
    let server = Child::spawn(&toml(1, ""), "");
    let addr = server.addr("http");
    let pid = server.child.id();
    // Warm the server's buffers with a legitimate compressed message of the same wire size.
    let (_, _, mut s) = upgrade(addr, "/echo", &["permessage-deflate"]);
    let noise: Vec<u8> = (0..gib.len() as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    s.write_all(&frame(ws::OP_BINARY, true, false, &noise))
        .unwrap();
    let (b0, echoed) = recv(&mut s).expect("the echo");
    let echoed = match b0 & ws::RSV1 {
        0 => echoed,
        _ => ClientInflater::new().inflate(&echoed),
    };
    assert_eq!(echoed, noise);
    let (peak_before, rss_before) = memory_kib(pid);

    // 1 MB on the wire (under max_message = 1MiB), 1 GiB inflated.
    let began = Instant::now();
    s.write_all(&frame(ws::OP_BINARY, true, true, &gib))
        .unwrap();
    assert_eq!(close_code_of(&mut s), ws::CLOSE_TOO_BIG);
    let took = began.elapsed();
    // 1 KiB that inflates to 1 MiB, on a route whose max_message is 64 KiB.
    let (_, _, mut s) = upgrade(addr, "/echo/small", &["permessage-deflate"]);
    s.write_all(&frame(ws::OP_TEXT, true, true, &kib)).unwrap();
    assert_eq!(close_code_of(&mut s), ws::CLOSE_TOO_BIG);

    let (peak_after, rss_after) = memory_kib(pid);
    eprintln!(
        "deflate bomb: 1009 after {took:?}; server VmHWM {peak_before} -> {peak_after} KiB, \
         VmRSS {rss_before} -> {rss_after} KiB"
    );
    // Inflating stops at max_message (1 MiB): the peak moves by that buffer at most, not by
    // the gigabyte the message would inflate to.
    assert!(
        peak_after <= peak_before + 4 * 1024,
        "peak {peak_before} -> {peak_after} KiB"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    let v = stats(addr);
    assert_eq!(deflate_total(&v, "ws_inflate_too_big"), 2);
}

#[test]
fn a_corrupt_stream_is_closed_with_1007() {
    let server = start_router(&toml(1, ""));
    let addr = server.addr("http").unwrap();
    let mut z = client_deflate(&json(4000, 1));
    // Compressed text that is not UTF-8 once inflated.
    let (_, _, mut s) = upgrade(addr, "/echo", &["permessage-deflate"]);
    s.write_all(&frame(
        ws::OP_TEXT,
        true,
        true,
        &client_deflate(&[0xc3; 500]),
    ))
    .unwrap();
    assert_eq!(close_code_of(&mut s), ws::CLOSE_INVALID_DATA);
    // A reserved block type where the stream starts; then a stream cut and scrambled.
    for bad in [vec![0x07, 0x00, 0x11, 0x22], {
        z.truncate(z.len() / 2);
        z.iter_mut().skip(10).for_each(|b| *b = b.rotate_left(3));
        z.clone()
    }] {
        let (_, _, mut s) = upgrade(addr, "/echo", &["permessage-deflate"]);
        s.write_all(&frame(ws::OP_BINARY, true, true, &bad))
            .unwrap();
        assert_eq!(close_code_of(&mut s), ws::CLOSE_INVALID_DATA);
    }
    let v = stats(addr);
    assert!(deflate_total(&v, "ws_inflate_invalid") >= 1);
}

const PY_ECHO: &str = r#"
import asyncio, json, sys
from websockets.asyncio.client import connect

SHARED = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
DEDICATED = "permessage-deflate; client_no_context_takeover; server_max_window_bits=12"

async def main(base):
    big = json.dumps([{"seq": i, "symbol": "ACME", "bid": 100 + i % 7} for i in range(60)])
    async with connect(base + "/echo", max_size=None) as ws:
        assert ws.response.headers["Sec-WebSocket-Extensions"] == SHARED, ws.response.headers
        for m in ["héllo", big, b"\x00\x01binary" * 50, b"", ""]:
            await ws.send(m)
            assert await ws.recv() == m
        await ws.send([big[:100], big[100:1000], big[1000:]])
        assert await ws.recv() == big
        await ws.send([b"ab" * 400, b"cd" * 400])
        assert await ws.recv() == b"ab" * 400 + b"cd" * 400
    async with connect(base + "/echo/dedicated") as ws:
        assert ws.response.headers["Sec-WebSocket-Extensions"] == DEDICATED, ws.response.headers
        for i in range(5):
            await ws.send(big)
            assert await ws.recv() == big
    async with connect(base + "/echo", compression=None) as ws:
        assert "Sec-WebSocket-Extensions" not in ws.response.headers
        await ws.send(big)
        assert await ws.recv() == big
    print("ok")

asyncio.run(main(sys.argv[1]))
"#;

const PY_FANOUT: &str = r#"
import asyncio, json, sys
from websockets.asyncio.client import connect

async def main(base, messages):
    subs = []
    for i in range(4):
        subs.append(await connect(base + "/ws"))                       # shared
        subs.append(await connect(base + "/ws", compression=None))     # plain
    for i in range(2):
        subs.append(await connect(base + "/ws/dedicated"))             # dedicated
    assert sum("Sec-WebSocket-Extensions" in s.response.headers for s in subs) == 6
    for s in subs:
        await s.send(json.dumps({"op": "subscribe", "topic": "mix"}))
        assert json.loads(await s.recv()) == {"ok": "subscribe", "topic": "mix"}
    async with connect(base + "/ws", compression=None) as pub:
        for i in range(messages):
            data = {"seq": i, "quotes": [{"s": "ACME%d" % (j % 5), "p": 100 + (i * j) % 97} for j in range(40)]}
            await pub.send(json.dumps({"op": "publish", "topic": "mix", "data": data}))
    for s in subs:
        for i in range(messages):
            got = json.loads(await asyncio.wait_for(s.recv(), 10))
            assert got["topic"] == "mix" and got["data"]["seq"] == i, got
            assert len(got["data"]["quotes"]) == 40
        await s.close()
    print("ok")

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"#;

/// Python's `websockets` negotiates permessage-deflate by default: echo of text and binary,
/// whole and fragmented; then a fan-out where subscribers that compress (shared and dedicated)
/// and subscribers that do not all get every message intact, in order. The server compresses
/// each published message once per shard for all its shared subscribers.
#[test]
fn python_websockets_echo_and_mixed_fanout() {
    let Some(py) = python_with(&[("websockets", "websockets")]) else {
        return;
    };
    let server = start_router(&toml(2, ""));
    let addr = server.addr("http").unwrap();
    let base = format!("ws://{addr}");
    run_python(&py, PY_ECHO, &[&base]);
    let v = stats(addr);
    // Echo replies sent compressed: the long ones (4 on /echo, 5 on /echo/dedicated); the
    // short and empty ones go plain, and so does everything on the plain connection.
    assert_eq!(deflate_total(&v, "ws_deflate_messages"), 9);
    // Python compresses every message it sends on a compressing connection: 7 on /echo, 5 on
    // /echo/dedicated.
    assert_eq!(deflate_total(&v, "ws_inflate_messages"), 7 + 5);
    let echoed = deflate_total(&v, "ws_deflate_messages");

    let messages = 30;
    run_python(&py, PY_FANOUT, &[&base, &messages.to_string()]);
    let v = stats(addr);
    // Each published message is compressed once per shard that has shared subscribers (one or
    // both of the 2), and once per dedicated subscriber (2): 90 or 120, where compressing per
    // subscriber would have taken 30 * 6 = 180.
    let fanout = deflate_total(&v, "ws_deflate_messages") - echoed;
    assert!(
        fanout == messages * 3 || fanout == messages * 4,
        "fan-out compressions: {fanout}"
    );
    let (before, after) = (
        deflate_total(&v, "ws_deflate_bytes_in"),
        deflate_total(&v, "ws_deflate_bytes_out"),
    );
    assert!(after * 2 < before, "JSON shrinks: {before} -> {after}");
    assert_eq!(deflate_total(&v, "ws_deflate_dedicated"), 0, "all closed");
    // The metrics page shows the same per shard, with the ratio and seconds.
    let mut h = connect(addr);
    let (_, _, body) = http_exchange(&mut h, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let text = String::from_utf8(body).unwrap();
    for name in [
        "shardnet_ws_deflate_bytes_in_total{shard=\"0\"}",
        "shardnet_ws_deflate_bytes_out_total{shard=\"1\"}",
        "shardnet_ws_deflate_seconds_total{shard=\"0\"}",
        "shardnet_ws_inflate_seconds_total{shard=\"1\"}",
        "shardnet_ws_deflate_ratio{shard=\"1\"}",
        "shardnet_ws_deflate_dedicated{shard=\"0\"}",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
}

fn report(path: &std::path::Path) -> serde_json::Value {
    let v = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let _ = std::fs::remove_file(path);
    v
}

/// The bench's `--deflate` at small scale: ws echo and fan-out of JSON (`--payload json`) with
/// compression negotiated and verified end to end, idle connections held compressed, and a
/// loud failure when the server declines.
#[test]
fn bench_runs_compressed_ws_fanout_and_idle() {
    let server = Child::spawn(&toml(1, "[limits]\nidle_timeout = \"0s\"\n"), "");
    let http = server.addr("http").to_string();
    let pid = server.child.id().to_string();
    let json = std::env::temp_dir().join(format!("bench-deflate-{}.json", std::process::id()));
    let json_arg = json.to_str().unwrap();

    // Echo of 1 KiB JSON messages, compressed both ways.
    let before = stats(server.addr("http"));
    let (code, text) = bench(&[
        "--target",
        &http,
        "--mode",
        "ws",
        "--path",
        "/echo",
        "--deflate",
        "--payload",
        "json",
        "-c",
        "4",
        "-d",
        "2",
        "-s",
        "1024",
        "--json",
        json_arg,
    ]);
    assert_eq!(code, 0, "{text}");
    let r = report(&json);
    let run = &r["runs"][0];
    assert_eq!(
        (run["deflate"].as_bool(), run["payload"].as_str()),
        (Some(true), Some("json"))
    );
    assert_eq!(run["errors"], 0, "{text}");
    assert!(run["requests"].as_u64().unwrap() > 50, "{text}");
    let after = stats(server.addr("http"));
    let grew = |k: &str| deflate_total(&after, k) - deflate_total(&before, k);
    assert!(
        grew("ws_deflate_messages") > 50,
        "the server compressed the echoes"
    );
    assert!(
        grew("ws_inflate_messages") > 50,
        "the client compressed its messages"
    );
    assert!(
        grew("ws_deflate_bytes_out") * 2 < grew("ws_deflate_bytes_in"),
        "1 KiB JSON compresses"
    );

    // Against a route that declines: a failed run, saying why.
    let (code, text) = bench(&[
        "--target",
        &http,
        "--mode",
        "ws",
        "--path",
        "/echo/off",
        "--deflate",
        "-c",
        "2",
    ]);
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("declined permessage-deflate"), "{text}");

    // Fan-out of 1 KiB JSON to subscribers that compress: each publish compressed once on the
    // one shard, whatever the number of subscribers.
    let before = stats(server.addr("http"));
    let (code, text) = bench(&[
        "--target",
        &http,
        "--mode",
        "fanout",
        "--deflate",
        "--payload",
        "json",
        "-s",
        "1024",
        "-c",
        "20",
        "--rate",
        "200",
        "--json",
        json_arg,
    ]);
    assert_eq!(code, 0, "{text}");
    let r = report(&json);
    let f = &r["runs"][0]["fanout"];
    assert_eq!(
        (f["subscribers"].as_u64(), f["lost"].as_u64()),
        (Some(20), Some(0)),
        "{text}"
    );
    let after = stats(server.addr("http"));
    let published = after["services_total"]["ws_published"].as_u64().unwrap()
        - before["services_total"]["ws_published"].as_u64().unwrap();
    let compressed = deflate_total(&after, "ws_deflate_messages")
        - deflate_total(&before, "ws_deflate_messages");
    assert!(published > 50, "{text}");
    assert_eq!(
        compressed, published,
        "once per publish on one shard, for 20 subscribers"
    );
    let bytes_in = deflate_total(&after, "ws_deflate_bytes_in")
        - deflate_total(&before, "ws_deflate_bytes_in");
    assert!(
        bytes_in / published >= 900,
        "publishes are padded to about 1 KiB"
    );

    // Idle connections that negotiated compression, with the server's RSS per connection.
    let (code, text) = bench(&[
        "--target",
        &http,
        "--server-pid",
        &pid,
        "--mode",
        "idle",
        "--idle-ws",
        "--path",
        "/echo",
        "--deflate",
        "-c",
        "200",
    ]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("bytes per connection"), "{text}");
}
