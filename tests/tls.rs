//! TLS termination end to end: real clients (curl, openssl s_client, Python websockets, rustls)
//! against https, wss and TLS echo listeners, the handshake abuse cases, client certificates and
//! the certificate reload on SIGHUP. Certificates are made at run time (`common::pki`).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pki::Pki;
use common::*;
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use shardnet::server::Server;
use shardnet::stats::ShardSnapshot;

type TlsStream = StreamOwned<ClientConnection, TcpStream>;

/// An HTTP listener (with a pub/sub and an echo WebSocket route) and a TLS echo listener, both
/// with `tls`; `tls_extra` adds keys to both `tls` tables, `top` goes before everything.
fn tls_toml(pki: &Pki, tls_extra: &str, top: &str) -> String {
    let tls = format!(
        "tls = {{ cert = \"{}\", key = \"{}\"{tls_extra} }}",
        pki.cert.display(),
        pki.key.display()
    );
    format!(
        "{top}\n[server]\nshards = 2\npin = false\nstats_interval = \"0s\"\nshutdown_timeout = \"2s\"\n\
         [[listener]]\nname = \"https\"\naddr = \"127.0.0.1:0\"\nservice = \"http\"\n{tls}\n\
         [[listener.websocket]]\npath = \"/ws\"\nmode = \"pubsub\"\n\
         [[listener.websocket]]\npath = \"/ws/echo\"\nmode = \"echo\"\n\
         [[listener]]\nname = \"echo\"\naddr = \"127.0.0.1:0\"\nservice = \"echo\"\n{tls}\n"
    )
}

/// A server running `toml` in this process, its TLS files loaded as `serve` loads them.
fn start(toml: &str) -> Server {
    let config = config(toml);
    let tls = config
        .load_tls(toml, "tls-test.toml")
        .expect("TLS files load");
    shardnet::app::start_with_tls(&config, &tls).expect("server starts")
}

fn totals(server: &Server) -> ShardSnapshot {
    server.snapshot().total()
}

/// A rustls client connection over TCP, with the usual timeouts, its handshake done.
fn tls_connect(addr: SocketAddr, config: &Arc<ClientConfig>) -> std::io::Result<TlsStream> {
    let tcp = connect(addr);
    let conn = ClientConnection::new(config.clone(), "localhost".try_into().unwrap()).unwrap();
    let mut s = StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    Ok(s)
}

fn client(pki: &Pki) -> Arc<ClientConfig> {
    pki.client(
        &[&rustls::version::TLS13, &rustls::version::TLS12],
        &[],
        false,
    )
}

/// Reads until `want` bytes have come, or the peer closes.
fn read_n(s: &mut impl Read, want: usize) -> Vec<u8> {
    let mut got = vec![0; want];
    s.read_exact(&mut got).expect("read");
    got
}

const PLAINTEXT_RESPONSE_BODY: &str = "Hello, World!";

/// `curl` with the test CA, `localhost` resolved to the server, and `args`; its stdout.
fn curl(pki: &Pki, port: u16, args: &[&str]) -> String {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--http1.1", "--max-time", "10", "--cacert"])
        .arg(&pki.ca)
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn curl_gets_plaintext_over_https_with_keep_alive() {
    if !require_tool("curl", "apt-get install curl") {
        return;
    }
    let pki = Pki::new();
    let server = start(&tls_toml(&pki, "", ""));
    let port = server.addr("https").unwrap().port();
    let url = format!("https://localhost:{port}/plaintext");
    let text = curl(
        &pki,
        port,
        &["-w", " %{http_code} %{num_connects}\n", &url, &url],
    );
    // Two answers over one connection: the second made no new connection.
    assert_eq!(
        text,
        format!("{PLAINTEXT_RESPONSE_BODY} 200 1\n{PLAINTEXT_RESPONSE_BODY} 200 0\n")
    );
    wait_until(Duration::from_secs(5), "one handshake counted", || {
        totals(&server).tls_handshakes == 1
    });
    // Per shard in /metrics, served over TLS too.
    let text = curl(&pki, port, &[&format!("https://localhost:{port}/metrics")]);
    for name in [
        "shardnet_tls_handshakes_total{shard=\"",
        "shardnet_tls_handshake_failures_total{shard=\"",
        "shardnet_tls_handshake_timeouts_total{shard=\"",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }
}

#[test]
fn pipelined_requests_over_tls_are_answered_in_order() {
    let pki = Pki::new();
    let server = start(&tls_toml(&pki, "", ""));
    let mut s = tls_connect(server.addr("https").unwrap(), &client(&pki)).unwrap();
    let mut batch = String::new();
    for i in 0..16 {
        batch.push_str(&format!("GET /plaintext?{i} HTTP/1.1\r\nHost: x\r\n\r\n"));
    }
    s.write_all(batch.as_bytes()).unwrap();
    s.flush().unwrap();
    let mut text = String::new();
    let deadline = Instant::now() + IO_TIMEOUT;
    while text.matches(PLAINTEXT_RESPONSE_BODY).count() < 16 && Instant::now() < deadline {
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "closed early: {text}");
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 16, "{text}");
    assert_eq!(text.matches(PLAINTEXT_RESPONSE_BODY).count(), 16);
}

#[test]
fn tls_echo_and_close_notify_on_drain() {
    let pki = Pki::new();
    let mut server = start(&tls_toml(&pki, "", ""));
    let mut s = tls_connect(server.addr("echo").unwrap(), &client(&pki)).unwrap();
    let data = pattern(7, 100_000);
    // Larger than a record and than the read buffer's share: split records both ways.
    s.write_all(&data).unwrap();
    assert_eq!(read_n(&mut s, data.len()), data);
    // Draining closes with close_notify: the client sees a clean end, not a truncation.
    let stop = std::thread::spawn(move || server.shutdown());
    let mut rest = Vec::new();
    let r = s.read_to_end(&mut rest);
    assert!(r.is_ok(), "expected close_notify, got {r:?}");
    assert!(stop.join().unwrap());
}

/// `openssl s_client` output for one connection to `addr` with `args`; stdin closed at once.
fn s_client(addr: SocketAddr, pki: &Pki, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("timeout")
        .args([
            "10",
            "openssl",
            "s_client",
            "-connect",
            &addr.to_string(),
            "-CAfile",
        ])
        .arg(&pki.ca)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn openssl_negotiates_tls12_and_tls13_with_alpn_and_a_version_below_the_minimum_is_refused() {
    if !require_tool("openssl", "apt-get install openssl") {
        return;
    }
    let pki = Pki::new();
    let server = start(&tls_toml(&pki, "", ""));
    let https = server.addr("https").unwrap();
    for (flag, name) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let (ok, text) = s_client(https, &pki, &[flag, "-alpn", "http/1.1"]);
        assert!(ok, "{text}");
        assert!(text.contains(&format!("New, {name}, Cipher is")), "{text}");
        assert!(text.contains("ALPN protocol: http/1.1"), "{text}");
        assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
    }
    // The echo listener answers no ALPN.
    let (ok, text) = s_client(server.addr("echo").unwrap(), &pki, &["-alpn", "http/1.1"]);
    assert!(ok && text.contains("No ALPN negotiated"), "{text}");
    drop(server);

    let server = start(&tls_toml(&pki, ", min_version = \"1.3\"", ""));
    let (ok, text) = s_client(server.addr("https").unwrap(), &pki, &["-tls1_2"]);
    assert!(!ok, "TLS 1.2 accepted below min_version 1.3:\n{text}");
    assert!(text.contains("alert protocol version"), "{text}");
    wait_until(Duration::from_secs(5), "the refusal counted", || {
        totals(&server).tls_handshake_failures == 1
    });
    let (ok, text) = s_client(server.addr("https").unwrap(), &pki, &["-tls1_3"]);
    assert!(ok, "{text}");
}

#[test]
fn bad_handshakes_and_a_stalled_reader_close_only_their_connection() {
    let pki = Pki::new();
    let top = "[limits]\nmax_write_buffer = \"64KiB\"\nwrite_timeout = \"1s\"\n";
    let server = start(&tls_toml(&pki, ", handshake_timeout = \"1s\"", top));
    let addr = server.addr("https").unwrap();
    let config = client(&pki);
    // A connection that stays healthy throughout.
    let mut good = tls_connect(addr, &config).unwrap();

    // Garbage instead of a ClientHello: an alert, then the close.
    let mut garbage = connect(addr);
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (answer, closed) = read_to_end(&mut garbage);
    assert!(closed, "the connection was not closed");
    assert_eq!(
        answer.first(),
        Some(&0x15),
        "an alert record first: {answer:?}"
    );

    // Half a ClientHello, then silence: closed at handshake_timeout (1s), not before.
    let mut hello = Vec::new();
    let mut c = ClientConnection::new(config.clone(), "localhost".try_into().unwrap()).unwrap();
    c.write_tls(&mut hello).unwrap();
    let mut half = connect(addr);
    half.write_all(&hello[..hello.len() / 2]).unwrap();
    let sent = Instant::now();
    let (_, closed) = read_to_end(&mut half);
    let took = sent.elapsed();
    assert!(closed, "half a ClientHello was held open");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(8),
        "closed after {took:?}"
    );

    // A client that sends requests but stops reading: paused at max_write_buffer, closed at
    // write_timeout once nothing moves.
    let mut stalled = tls_connect(addr, &config).unwrap();
    let request = "GET /plaintext HTTP/1.1\r\nHost: x\r\n\r\n".repeat(2000);
    for _ in 0..20 {
        if stalled.write_all(request.as_bytes()).is_err() {
            break;
        }
    }
    wait_until(Duration::from_secs(10), "the stalled reader closed", || {
        totals(&server).write_timeouts >= 1
    });

    let t = totals(&server);
    assert_eq!(t.tls_handshake_failures, 1, "{t:?}");
    assert_eq!(t.tls_handshake_timeouts, 1, "{t:?}");
    // The healthy connection was untouched.
    good.write_all(b"GET /plaintext HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 512];
    let n = good.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains(PLAINTEXT_RESPONSE_BODY));
}

#[test]
fn a_client_without_a_certificate_is_refused_when_client_ca_is_set() {
    let pki = Pki::new();
    let extra = format!(", client_ca = \"{}\"", pki.ca.display());
    let server = start(&tls_toml(&pki, &extra, ""));
    let addr = server.addr("echo").unwrap();
    let without = pki.client(&[&rustls::version::TLS13], &[], false);
    // TLS 1.3: the client's handshake completes before the server's verdict arrives; the
    // refusal is the first read.
    let refused = tls_connect(addr, &without).and_then(|mut s| {
        s.write_all(b"hello")?;
        let mut b = [0u8; 5];
        s.read_exact(&mut b)
    });
    assert!(
        refused.is_err(),
        "a client without a certificate was served"
    );
    let with = pki.client(&[&rustls::version::TLS13], &[], true);
    let mut s = tls_connect(addr, &with).unwrap();
    s.write_all(b"hello").unwrap();
    assert_eq!(read_n(&mut s, 5), b"hello");
    wait_until(Duration::from_secs(5), "the refusal counted", || {
        totals(&server).tls_handshake_failures == 1
    });
}

#[test]
fn python_websockets_over_wss_echo_and_pubsub() {
    let pki = Pki::new();
    let server = start(&tls_toml(&pki, "", ""));
    let Some(py) = python_with(&[("websockets", "websockets")]) else {
        return; // skipped: python_with said why
    };
    let script = r#"
import asyncio, json, ssl, sys
from websockets.asyncio.client import connect

async def main(base, ca):
    ctx = ssl.create_default_context(cafile=ca)
    async with connect(base + "/ws/echo", ssl=ctx) as ws:
        await ws.send("héllo over tls")
        assert await ws.recv() == "héllo over tls"
        big = "x" * 100000
        await ws.send(big)
        assert await ws.recv() == big
    async with connect(base + "/ws", ssl=ctx) as sub, connect(base + "/ws", ssl=ctx) as pub:
        await sub.send(json.dumps({"op": "subscribe", "topic": "t"}))
        assert json.loads(await sub.recv()) == {"ok": "subscribe", "topic": "t"}
        await pub.send(json.dumps({"op": "publish", "topic": "t", "data": [1, 2]}))
        assert json.loads(await sub.recv()) == {"topic": "t", "data": [1, 2]}
    print("ok")

asyncio.run(asyncio.wait_for(main(sys.argv[1], sys.argv[2]), 20))
"#;
    let base = format!("wss://localhost:{}", server.addr("https").unwrap().port());
    let out = std::process::Command::new(py)
        .args(["-c", script, &base])
        .arg(&pki.ca)
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "python websockets over wss failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn sighup_with_a_new_certificate_serves_it_to_new_connections_and_keeps_old_ones() {
    let (first, second) = (Pki::new(), Pki::named("renewed"));
    // The files the configuration names: the first certificate now, the second after.
    let cert = first.file("live-cert.pem", std::fs::read(&first.cert).unwrap());
    let key = first.file("live-key.pem", std::fs::read(&first.key).unwrap());
    let toml = format!(
        "[server]\nshards = 2\npin = false\n\
         [[listener]]\nname = \"echo\"\naddr = \"127.0.0.1:0\"\nservice = \"echo\"\n\
         tls = {{ cert = \"{}\", key = \"{}\" }}\n",
        cert.display(),
        key.display()
    );
    let server = Child::spawn(&toml, "");
    let addr = server.addr("echo");
    let mut old = tls_connect(addr, &client(&first)).unwrap();
    old.write_all(b"before").unwrap();
    assert_eq!(read_n(&mut old, 6), b"before");

    std::fs::write(&cert, std::fs::read(&second.cert).unwrap()).unwrap();
    std::fs::write(&key, std::fs::read(&second.key).unwrap()).unwrap();
    server.signal("HUP");
    wait_until(Duration::from_secs(10), "the reload logged", || {
        server.log().contains("listener `echo`: TLS reloaded")
    });
    // New connections get the new certificate: only the new CA vouches for it.
    assert!(tls_connect(addr, &client(&first)).is_err());
    let mut new = tls_connect(addr, &client(&second)).unwrap();
    new.write_all(b"after").unwrap();
    assert_eq!(read_n(&mut new, 5), b"after");
    // The connection opened before the reload still works.
    old.write_all(b"still").unwrap();
    assert_eq!(read_n(&mut old, 5), b"still");

    // A reload with a bad file changes nothing, and says why.
    std::fs::write(&cert, "not a certificate").unwrap();
    server.signal("HUP");
    wait_until(Duration::from_secs(10), "the refusal logged", || {
        server.log().contains("reload refused")
    });
    let log = server.log();
    assert!(
        log.contains("key `listener[0].tls.cert`") && log.contains("no certificate found"),
        "{log}"
    );
    let mut again = tls_connect(addr, &client(&second)).unwrap();
    again.write_all(b"same").unwrap();
    assert_eq!(read_n(&mut again, 4), b"same");
}
