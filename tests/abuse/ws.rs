//! Abuse cases: the WebSocket codec and its routes. Each asserts the close code and a bounded
//! time until it arrives; the helpers here are shared with the pub/sub cases.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use shardnet::service::ws;

use super::common::{self, *};

/// An HTTP listener with a pub/sub route at `/ws` and an echo route at `/ws/echo`; `route`
/// extra keys go to both routes, `top` before `[server]` (e.g. a `[limits]` table).
pub(super) fn ws_toml(shards: usize, route: &str, top: &str) -> String {
    format!(
        "{top}\n[server]\nshards = {shards}\npin = false\nstats_interval = \"0s\"\nshutdown_timeout = \"2s\"\n\
         [[listener]]\nname = \"http\"\naddr = \"127.0.0.1:0\"\nservice = \"http\"\n\
         [[listener.websocket]]\npath = \"/ws\"\nmode = \"pubsub\"\n{route}\n\
         [[listener.websocket]]\npath = \"/ws/echo\"\nmode = \"echo\"\n{route}\n"
    )
}

const UPGRADE: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

/// Connects and upgrades; panics unless the answer is 101.
#[track_caller]
pub(super) fn ws_connect(addr: SocketAddr, path: &str) -> TcpStream {
    let mut s = connect(addr);
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{UPGRADE}\r\n");
    let (status, head, _) = http_exchange(&mut s, req.as_bytes());
    assert_eq!(status, 101, "{head}");
    s
}

pub(super) fn frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    ws::write_masked(&mut f, opcode, fin, payload, [9, 8, 7, 6]);
    f
}

pub(super) fn send(s: &mut TcpStream, opcode: u8, fin: bool, payload: &[u8]) {
    s.write_all(&frame(opcode, fin, payload)).unwrap();
}

/// Reads one server frame: (opcode, payload); `None` at the end of the stream or a timeout.
pub(super) fn try_recv(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
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

#[track_caller]
pub(super) fn recv(s: &mut TcpStream) -> (u8, Vec<u8>) {
    try_recv(s).expect("a frame, not the end of the stream")
}

/// Reads frames until a close frame; returns its code and the time since `since`, and checks
/// that the server then ends the stream.
#[track_caller]
pub(super) fn expect_close(s: &mut TcpStream, since: Instant) -> (u16, Duration) {
    loop {
        match try_recv(s) {
            Some((ws::OP_CLOSE, p)) => {
                let code = u16::from_be_bytes([p[0], p[1]]);
                let at = since.elapsed();
                assert!(read_to_end(s).1, "the stream ends after close {code}");
                return (code, at);
            }
            Some(_) => continue,
            None => panic!("stream ended (or timed out) without a close frame"),
        }
    }
}

#[test]
fn invalid_utf8_closes_before_the_frame_completes() {
    let server = start_router(&ws_toml(1, "", ""));
    let mut s = ws_connect(server.addr("http").unwrap(), "/ws/echo");
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    // A 100 KB text frame announced; its third byte is not UTF-8; only 100 bytes are sent.
    let mut payload = vec![b'a'; 100_000];
    payload[2] = 0xc3;
    payload[3] = 0x28;
    let f = frame(ws::OP_TEXT, true, &payload);
    let start = Instant::now();
    s.write_all(&f[..114]).unwrap();
    let (code, at) = expect_close(&mut s, start);
    assert_eq!(code, ws::CLOSE_INVALID_DATA);
    assert!(at < Duration::from_secs(2), "1007 after {at:?}");
}

#[test]
fn frame_larger_than_the_read_buffer_gets_1009_from_its_header() {
    // max_message allows the frame, but the engine could never buffer it: max_read_buffer is
    // the same size, and the header needs room too. (Built in code: whether the configuration
    // check accepts such limits is not what this case is about.)
    let mut config = common::config(&ws_toml(1, "max_message = \"64KiB\"", ""));
    config.limits.max_read_buffer = 64 * 1024;
    let server = shardnet::app::start(&config).expect("server starts");
    let mut s = ws_connect(server.addr("http").unwrap(), "/ws/echo");
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let f = frame(ws::OP_BINARY, true, &vec![0u8; 64 * 1024]);
    let start = Instant::now();
    s.write_all(&f[..14]).unwrap();
    let (code, at) = expect_close(&mut s, start);
    assert_eq!(code, ws::CLOSE_TOO_BIG);
    assert!(at < Duration::from_secs(2), "1009 after {at:?}");
    // A frame that fits is echoed.
    let mut s = ws_connect(server.addr("http").unwrap(), "/ws/echo");
    let body = vec![7u8; 64 * 1024 - 14];
    send(&mut s, ws::OP_BINARY, true, &body);
    assert_eq!(recv(&mut s), (ws::OP_BINARY, body));
}

#[test]
fn huge_announced_lengths_are_refused_from_the_header() {
    let server = start_router(&ws_toml(1, "", ""));
    let addr = server.addr("http").unwrap();
    for (len, code) in [
        (1u64 << 63, ws::CLOSE_PROTOCOL),
        (1u64 << 62, ws::CLOSE_TOO_BIG),
    ] {
        let mut s = ws_connect(addr, "/ws/echo");
        let mut h = vec![0x82, 0x80 | 127];
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(&[1, 2, 3, 4]);
        let start = Instant::now();
        s.write_all(&h).unwrap();
        let (got, at) = expect_close(&mut s, start);
        assert_eq!(got, code, "length {len}");
        assert!(at < Duration::from_secs(2), "after {at:?}");
    }
}

#[test]
fn two_hundred_thousand_one_byte_fragments_take_bounded_time() {
    let server = start_router(&ws_toml(1, "", ""));
    let mut s = ws_connect(server.addr("http").unwrap(), "/ws/echo");
    let n = 200_000;
    let mut stream = frame(ws::OP_TEXT, false, b"a");
    let one = frame(ws::OP_CONT, false, b"a");
    for _ in 1..n - 1 {
        stream.extend_from_slice(&one);
    }
    stream.extend(frame(ws::OP_CONT, true, b"a"));
    let start = Instant::now();
    let (op, payload) = std::thread::scope(|scope| {
        let mut w = s.try_clone().unwrap();
        scope.spawn(move || w.write_all(&stream).unwrap());
        recv(&mut s)
    });
    assert_eq!((op, payload.len()), (ws::OP_TEXT, n));
    assert!(payload.iter().all(|&b| b == b'a'));
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "{:?} for {n} fragments",
        start.elapsed()
    );
}

#[test]
fn ping_flood_from_a_non_reader_is_bounded_and_closed() {
    let limits =
        "[limits]\nmax_write_buffer = \"64KiB\"\nwrite_timeout = \"1s\"\nidle_timeout = \"0s\"";
    let server = start_router(&ws_toml(1, "", limits).replacen(
        "shutdown_timeout = \"2s\"\n",
        "shutdown_timeout = \"2s\"\nread_buffer = \"64KiB\"\nread_budget = \"64KiB\"\n",
        1,
    ));
    let stats = server.stats();
    let mut s = ws_connect(server.addr("http").unwrap(), "/ws/echo");
    s.set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let pings: Vec<u8> = (0..500)
        .flat_map(|_| frame(ws::OP_PING, true, &[b'p'; 125]))
        .collect();
    let start = Instant::now();
    let mut peak = 0;
    while start.elapsed() < Duration::from_secs(10) && s.write_all(&pings).is_ok() {
        peak = peak.max(stats.snapshot().shards[0].output_queued);
    }
    let stopped = Instant::now();
    // Pongs queue up to the bound plus what one read produced.
    assert!(
        peak <= 64 * 1024 + 160 * 1024,
        "{peak} bytes of pongs queued for a non-reader"
    );
    wait_until(
        Duration::from_secs(10),
        "write timeout closes the non-reader",
        || stats.snapshot().total().write_timeouts == 1,
    );
    assert!(stopped.elapsed() < Duration::from_secs(10));
}

#[test]
fn partial_frame_then_silence_is_reaped_by_the_heartbeat() {
    let server = start_router(&ws_toml(
        1,
        "ping_interval = \"300ms\"\npong_timeout = \"300ms\"",
        "",
    ));
    let mut s = ws_connect(server.addr("http").unwrap(), "/ws/echo");
    let start = Instant::now();
    s.write_all(&frame(ws::OP_TEXT, true, b"hello")[..3])
        .unwrap();
    let (code, at) = expect_close(&mut s, start);
    assert_eq!(code, ws::CLOSE_GOING_AWAY);
    assert!(
        at >= Duration::from_millis(500) && at < Duration::from_secs(5),
        "reaped after {at:?}"
    );
}
