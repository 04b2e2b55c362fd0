//! Test helpers: servers on 127.0.0.1:0, clients with timeouts, bounded polling.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use shardnet::config::Config;
use shardnet::server::Server;

/// Every blocking client call gives up after this long.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Parses a test configuration (panics with the config error, which names the line and key).
pub fn config(toml: &str) -> Config {
    Config::parse(toml, "test.toml").unwrap_or_else(|e| panic!("{e}"))
}

/// An echo listener on an ephemeral port, unpinned, with `extra` TOML appended to `[server]`
/// and `limits` as the `[limits]` section.
pub fn echo_config(shards: usize, server_extra: &str, limits: &str) -> Config {
    config(&format!(
        "[server]\nshards = {shards}\npin = false\nstats_interval = \"0s\"\nshutdown_timeout = \"5s\"\n{server_extra}\n\
         [limits]\n{limits}\n\
         [[listener]]\nname = \"echo\"\naddr = \"127.0.0.1:0\"\nservice = \"echo\"\n"
    ))
}

pub fn start_echo(config: &Config) -> Server {
    Server::start(config, |_, _| shardnet::service::echo::Echo).expect("server starts")
}

#[track_caller]
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Polls `cond` every 5 ms until it holds or `within` passes; panics with `what` on timeout.
#[track_caller]
pub fn wait_until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Reads until EOF (or error); returns what was read and whether it ended in a clean EOF.
pub fn read_to_end(s: &mut TcpStream) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (out, false),
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift), so failures are reproducible.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes `data` on one thread while reading the echo on this one; returns the echo.
pub fn echo_roundtrip(stream: &mut TcpStream, data: &[u8]) -> Vec<u8> {
    let mut writer = stream.try_clone().unwrap();
    std::thread::scope(|scope| {
        scope.spawn(move || writer.write_all(data).expect("write"));
        let mut got = vec![0u8; data.len()];
        stream.read_exact(&mut got).expect("read the echo");
        got
    })
}

/// The path of the built `shardnet` binary.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_shardnet")
}
