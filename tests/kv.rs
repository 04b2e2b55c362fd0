//! The kv example (`examples/kv/service.rs`) against real Redis clients nobody here wrote:
//! `redis-cli` for every command and its errors, `redis-benchmark` for pipelined load with its
//! own checks; and raw pipelines for the order of replies across shards and the bounds.

mod common;
#[path = "../examples/kv/service.rs"]
mod service;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use shardnet::server::{ListenerSpec, Pinning, Server};

use common::{connect, require_tool, wait_until, IO_TIMEOUT};
use service::{owner, KvLimits};

const INSTALL: &str = "apt-get install redis-tools";

fn start(shards: usize, limits: KvLimits) -> Server {
    Server::builder()
        .listener(ListenerSpec::new("kv", "127.0.0.1:0".parse().unwrap()))
        .shards(shards)
        .pinning(Pinning::Off)
        .start(move |info, peers| service::Kv::new(&info, peers, limits))
        .expect("server starts")
}

fn addr(server: &Server) -> SocketAddr {
    server.addr("kv").unwrap()
}

/// Runs a Redis tool to completion (killed after 60 s); its exit status and output.
fn run(tool: &str, args: &[&str]) -> (bool, String) {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{tool} {args:?} did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// `redis-cli -h H -p P args...`: its output, each reply on its line.
fn cli(target: SocketAddr, args: &[&str]) -> String {
    let (host, port) = (target.ip().to_string(), target.port().to_string());
    let mut all = vec!["-h", &host, "-p", &port];
    all.extend_from_slice(args);
    let (ok, out) = run("redis-cli", &all);
    assert!(ok, "redis-cli {args:?} failed: {out}");
    out
}

/// How redis-cli (not on a terminal) prints an error reply: the text, then an empty line.
fn error(text: &str) -> String {
    format!("{text}\n\n")
}

/// A key whose owner is `shard` of `shards`, from `prefix`.
fn key_on(shard: usize, shards: usize, prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|k| owner(k.as_bytes(), shards) == shard)
        .unwrap()
}

#[test]
fn every_command_with_redis_cli() {
    if !require_tool("redis-cli", INSTALL) {
        return;
    }
    let server = start(2, KvLimits::default());
    let t = addr(&server);
    // One key owned by each shard: whichever shard redis-cli's connection lands on, one of
    // them is another shard's.
    let (a, b) = (key_on(0, 2, "a"), key_on(1, 2, "b"));
    assert_eq!(cli(t, &["PING"]), "PONG\n");
    assert_eq!(cli(t, &["PING", "hello there"]), "hello there\n");
    assert_eq!(cli(t, &["SET", &a, "one"]), "OK\n");
    assert_eq!(cli(t, &["SET", &b, "two"]), "OK\n");
    assert_eq!(cli(t, &["GET", &a]), "one\n");
    assert_eq!(cli(t, &["GET", &b]), "two\n");
    assert_eq!(cli(t, &["GET", "nothing-here"]), "\n", "nil");
    assert_eq!(cli(t, &["INCR", "counter"]), "1\n");
    assert_eq!(cli(t, &["INCR", "counter"]), "2\n");
    assert_eq!(
        cli(t, &["INCR", &a]),
        error("ERR value is not an integer or out of range")
    );
    assert_eq!(cli(t, &["MGET", &a, "nothing-here", &b]), "one\n\ntwo\n");
    assert_eq!(cli(t, &["DEL", &a, &b, "nothing-here"]), "2\n");
    assert_eq!(cli(t, &["MGET", &a, &b]), "\n\n");
    assert_eq!(cli(t, &["SET", "k", "9223372036854775807"]), "OK\n");
    assert_eq!(
        cli(t, &["INCR", "k"]),
        error("ERR increment or decrement would overflow")
    );
    // Wrong arity, for every command.
    for args in [
        &["GET"][..],
        &["GET", "a", "b"],
        &["SET", "a"],
        &["DEL"],
        &["INCR"],
        &["INCR", "a", "b"],
        &["MGET"],
        &["PING", "a", "b"],
    ] {
        let name = args[0].to_lowercase();
        assert_eq!(
            cli(t, args),
            error(&format!(
                "ERR wrong number of arguments for '{name}' command"
            )),
            "{args:?}"
        );
    }
    assert_eq!(
        cli(t, &["SET", "a", "b", "EX", "10"]),
        error("ERR syntax error")
    );
    assert_eq!(
        cli(t, &["FLUSHALL", "now"]),
        error("ERR unknown command 'FLUSHALL', with args beginning with: 'now' ")
    );
    let snap = server.snapshot();
    let errors = snap
        .registered
        .iter()
        .find(|f| f.name == "kv_errors")
        .unwrap();
    assert_eq!(errors.values.iter().flatten().sum::<u64>(), 12);
}

#[test]
fn redis_benchmark_passes_its_own_checks() {
    if !require_tool("redis-benchmark", INSTALL) {
        return;
    }
    let server = start(2, KvLimits::default());
    let t = addr(&server);
    let (host, port) = (t.ip().to_string(), t.port().to_string());
    // Once as asked (one key), once over 10,000 keys, so that most requests cross shards.
    for extra in [&[][..], &["-r", "10000"]] {
        let mut args = vec![
            "-h", &host, "-p", &port, "-t", "set,get", "-P", "16", "-n", "20000", "-q",
        ];
        args.extend_from_slice(extra);
        let (ok, out) = run("redis-benchmark", &args);
        // -q still draws progress with carriage returns; the last text of each line is the
        // result.
        let lines: Vec<&str> = out
            .lines()
            .filter_map(|l| l.rsplit('\r').next())
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert!(ok, "redis-benchmark {extra:?} failed: {out}");
        for test in ["SET", "GET"] {
            assert!(
                lines
                    .iter()
                    .any(|l| l.trim_start().starts_with(&format!("{test}: "))
                        && l.contains("requests per second")),
                "no {test} result from redis-benchmark {extra:?}: {lines:?}"
            );
        }
        assert!(
            !out.contains("rror") && !out.contains("WARN"),
            "redis-benchmark {extra:?} reported: {out}"
        );
    }
    let snap = server.snapshot();
    let family = |name: &str| -> u64 {
        let f = snap.registered.iter().find(|f| f.name == name).unwrap();
        f.values.iter().flatten().sum()
    };
    assert_eq!(family("kv_errors"), 0);
    assert!(family("kv_commands") >= 80_000, "{}", family("kv_commands"));
    assert!(
        family("kv_remote_requests") > 10_000,
        "the keys crossed shards: {}",
        family("kv_remote_requests")
    );
}

/// Reads exactly `n` bytes (or fails after the timeout).
fn read_n(s: &mut std::net::TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).expect("the whole reply");
    buf
}

fn bulk(v: &str) -> String {
    format!("${}\r\n{v}\r\n", v.len())
}

fn array(args: &[&str]) -> String {
    let mut s = format!("*{}\r\n", args.len());
    for a in args {
        s += &bulk(a);
    }
    s
}

#[test]
fn pipelined_replies_keep_the_order_of_requests_across_shards() {
    let shards = 4;
    let server = start(shards, KvLimits::default());
    let mut s = connect(addr(&server));
    let keys: Vec<String> = (0..shards).map(|i| key_on(i, shards, "k")).collect();
    let mut request = String::new();
    let mut expected = String::new();
    let mut model = std::collections::HashMap::<String, i64>::new();
    for round in 0..50 {
        for (i, k) in keys.iter().enumerate() {
            match (round + i) % 4 {
                0 => {
                    request += &array(&["SET", k, &round.to_string()]);
                    expected += "+OK\r\n";
                    model.insert(k.clone(), round as i64);
                }
                1 => {
                    request += &array(&["INCR", k]);
                    let v = model.entry(k.clone()).or_insert(0);
                    *v += 1;
                    expected += &format!(":{v}\r\n");
                }
                2 => {
                    request += &array(&["GET", k]);
                    expected += &match model.get(k) {
                        Some(v) => bulk(&v.to_string()),
                        None => "$-1\r\n".into(),
                    };
                }
                _ => {
                    request += "PING\r\n"; // inline, answered by the connection's own shard
                    expected += "+PONG\r\n";
                }
            }
        }
        let all: Vec<&str> = keys.iter().map(String::as_str).collect();
        let mut mget = vec!["MGET"];
        mget.extend(&all);
        request += &array(&mget);
        expected += &format!("*{}\r\n", keys.len());
        for k in &keys {
            expected += &match model.get(k) {
                Some(v) => bulk(&v.to_string()),
                None => "$-1\r\n".into(),
            };
        }
    }
    let mut del = vec!["DEL"];
    del.extend(keys.iter().map(String::as_str));
    del.push("missing");
    request += &array(&del);
    expected += &format!(":{}\r\n", keys.len());
    s.write_all(request.as_bytes()).unwrap();
    let got = read_n(&mut s, expected.len());
    assert_eq!(String::from_utf8_lossy(&got), expected);
}

#[test]
fn a_long_pipeline_to_other_shards_waits_at_the_bound_and_completes() {
    let server = start(2, KvLimits::default());
    let mut s = connect(addr(&server));
    // Learn the connection's shard from nothing but replies: set one key per shard, then flood
    // GETs of both, far more than one connection may have waiting (1,024).
    let keys = [key_on(0, 2, "p"), key_on(1, 2, "q")];
    let mut request = String::new();
    for k in &keys {
        request += &array(&["SET", k, k]);
    }
    let mut expected = "+OK\r\n+OK\r\n".to_string();
    for i in 0..20_000 {
        let k = &keys[i % 2];
        request += &array(&["GET", k]);
        expected += &bulk(k);
    }
    let writer = {
        let mut w = s.try_clone().unwrap();
        std::thread::spawn(move || w.write_all(request.as_bytes()).unwrap())
    };
    let got = read_n(&mut s, expected.len());
    writer.join().unwrap();
    assert!(got == expected.as_bytes(), "replies out of order or wrong");
    let snap = server.snapshot();
    assert_eq!(snap.total().read_overflows, 0);
    let paused = snap
        .registered
        .iter()
        .find(|f| f.name == "kv_paused")
        .unwrap();
    assert!(
        paused.values.iter().flatten().sum::<u64>() > 0,
        "the connection reached its bound and waited"
    );
}

#[test]
fn bad_input_gets_a_redis_error() {
    let server = start(
        1,
        KvLimits {
            max_value: 100,
            max_memory: 4096,
        },
    );
    let t = addr(&server);
    let expect_then_close = |request: &[u8], reply: &str| {
        let mut s = connect(t);
        s.write_all(request).unwrap();
        let (got, clean) = common::read_to_end(&mut s);
        assert_eq!(String::from_utf8_lossy(&got), reply, "{request:?}");
        assert!(clean, "closed after the error");
    };
    expect_then_close(b"*1\r\n+PING\r\n", "-ERR Protocol error: expected '$'\r\n");
    expect_then_close(
        b"*x\r\n",
        "-ERR Protocol error: invalid multibulk length\r\n",
    );
    expect_then_close(
        b"*2\r\n$3\r\nGET\r\n$101\r\n",
        "-ERR Protocol error: invalid bulk length\r\n",
    );
    // Within the protocol: an error reply, and the connection carries on.
    let mut s = connect(t);
    let big = "x".repeat(60);
    let mut request = String::new();
    let mut expected = String::new();
    for i in 0..100 {
        request += &array(&["SET", &format!("key{i}"), &big]);
    }
    s.write_all(request.as_bytes()).unwrap();
    // 4,096 bytes hold a few of them; the rest are refused.
    let mut oks = 0;
    let mut ooms = 0;
    let mut buf = Vec::new();
    wait_until(IO_TIMEOUT, "100 replies", || {
        let mut chunk = [0u8; 8192];
        if let Ok(n) = s.read(&mut chunk) {
            buf.extend_from_slice(&chunk[..n]);
        }
        buf.split(|&b| b == b'\n').count() > 100
    });
    for line in String::from_utf8_lossy(&buf).lines() {
        match line {
            "+OK" => oks += 1,
            "-OOM command not allowed when used memory > 'maxmemory'" => ooms += 1,
            other => panic!("unexpected reply {other:?}"),
        }
    }
    assert_eq!(oks + ooms, 100);
    assert!(oks > 10 && ooms > 10, "{oks} stored, {ooms} refused");
    // Room again once a key is deleted.
    request.clear();
    request += &array(&["DEL", "key0"]);
    request += &array(&["SET", "again", "1"]);
    expected += ":1\r\n+OK\r\n";
    s.write_all(request.as_bytes()).unwrap();
    let got = read_n(&mut s, expected.len());
    assert_eq!(String::from_utf8_lossy(&got), expected);
    // A value over max_value is refused by its length, before it is buffered.
    expect_then_close(
        array(&["SET", "k", &"y".repeat(101)]).as_bytes(),
        "-ERR Protocol error: invalid bulk length\r\n",
    );
}

#[test]
fn a_protocol_error_comes_after_the_replies_owed_from_other_shards() {
    let server = start(2, KvLimits::default());
    let mut s = connect(addr(&server));
    let keys = [key_on(0, 2, "e"), key_on(1, 2, "f")];
    let mut request = String::new();
    let mut expected = String::new();
    for k in &keys {
        request += &array(&["SET", k, "v"]);
        expected += "+OK\r\n";
    }
    // Whichever shard this connection is on, one GET crosses to the other.
    for k in &keys {
        request += &array(&["GET", k]);
        expected += &bulk("v");
    }
    request += "*1\r\n+PING\r\n";
    expected += "-ERR Protocol error: expected '$'\r\n";
    s.write_all(request.as_bytes()).unwrap();
    let (got, clean) = common::read_to_end(&mut s);
    assert_eq!(String::from_utf8_lossy(&got), expected);
    assert!(clean, "closed after the error");
}
