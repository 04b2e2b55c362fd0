//! Micro-benchmarks of the per-event building blocks: `cargo bench --bench micro`.

use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use shardnet::conn::Slab;
use shardnet::service::http::{
    DateCache, Handler, Http, HttpConn, HttpSettings, Request, Response, Sent,
};
use shardnet::service::ws::{self, WsConn};
use shardnet::timer::TimerWheel;
use shardnet::tls::{Dest, MinVersion, ServerTls, TlsClient, TlsConn, TlsSettings};

#[path = "../src/tls/testpki.rs"]
#[allow(dead_code)]
mod pki;

fn timer_wheel(c: &mut Criterion) {
    let mut g = c.benchmark_group("timer_wheel");
    g.bench_function("schedule+cancel", |b| {
        let mut w = TimerWheel::new(Instant::now(), Duration::from_millis(10), 8192);
        let mut k = 0usize;
        b.iter(|| {
            k = (k + 1) & 0xffff;
            w.schedule(k, 100 + (k as u64 & 0x3ff));
            w.cancel(black_box(k));
        });
    });
    g.bench_function("advance 10k timers one tick each", |b| {
        b.iter_batched(
            || {
                let mut w = TimerWheel::new(Instant::now(), Duration::from_millis(10), 8192);
                for k in 0..10_000 {
                    w.schedule(k, 1 + (k as u64 % 100));
                }
                w
            },
            |mut w| {
                let mut out = Vec::with_capacity(10_000);
                w.advance(100, &mut out);
                out.len()
            },
            BatchSize::LargeInput,
        );
    });
    g.finish();
}

fn slab(c: &mut Criterion) {
    c.bench_function("slab insert+remove (generation tokens)", |b| {
        let mut s: Slab<[u64; 6]> = Slab::default();
        for _ in 0..1000 {
            s.insert([0; 6]);
        }
        b.iter(|| {
            let t = s.insert(black_box([1; 6]));
            s.remove(t)
        });
    });
}

/// The `/plaintext` route alone: what the benchmark measures is the codec.
struct Plaintext;
impl Handler for Plaintext {
    fn request(&mut self, _: &Request<'_>, resp: Response<'_>) -> Sent {
        resp.send(200, "text/plain", b"Hello, World!", "")
    }
}

fn http(c: &mut Criterion) {
    let h = Http::new(HttpSettings {
        max_header: 16 * 1024,
        max_body: 1 << 20,
        header_timeout: Duration::from_secs(10),
    });
    let date = DateCache::default();
    let req = b"GET /plaintext HTTP/1.1\r\nHost: server\r\nUser-Agent: Mozilla/5.0\r\nAccept: text/plain\r\nConnection: keep-alive\r\n\r\n";
    let batch: Vec<u8> = req.iter().copied().cycle().take(req.len() * 16).collect();
    let mut g = c.benchmark_group("http");
    g.throughput(Throughput::Elements(16));
    g.bench_function("16 pipelined /plaintext requests", |b| {
        let mut out = Vec::with_capacity(64 * 1024);
        b.iter(|| {
            out.clear();
            let mut conn = HttpConn::default();
            h.handle(
                &mut conn,
                black_box(&batch),
                &mut out,
                usize::MAX,
                &date,
                &mut Plaintext,
            )
        });
    });
    g.finish();
}

fn websocket(c: &mut Criterion) {
    let mut frame = Vec::new();
    ws::write_masked(&mut frame, ws::OP_BINARY, true, &[7u8; 64], [1, 2, 3, 4]);
    let frames: Vec<u8> = frame
        .iter()
        .copied()
        .cycle()
        .take(frame.len() * 16)
        .collect();
    let mut g = c.benchmark_group("websocket");
    g.throughput(Throughput::Elements(16));
    g.bench_function("decode+unmask+echo 16 x 64 B frames", |b| {
        let mut out = Vec::with_capacity(4096);
        b.iter_batched(
            || frames.clone(),
            |mut input| {
                out.clear();
                let mut conn = WsConn::default();
                conn.process(&mut input, 1 << 20, &mut out, &mut |m, out| {
                    if let ws::Message::Binary(b) = m {
                        ws::write_frame(out, ws::OP_BINARY, b);
                    }
                })
            },
            BatchSize::SmallInput,
        );
    });
    g.bench_function("encode 64 B server frame", |b| {
        let mut out = Vec::with_capacity(128);
        b.iter(|| {
            out.clear();
            ws::write_frame(&mut out, ws::OP_TEXT, black_box(&[b'x'; 64]));
        });
    });
    g.finish();
}

/// Runs a handshake between `s` and `c` (both unbuffered, in memory); returns the time spent in
/// the server's calls only (the client's work is the load generator's, not the server's).
fn tls_handshake(s: &mut TlsConn, c: &mut TlsClient) -> Duration {
    let (mut to_server, mut to_client) = (Vec::with_capacity(4096), Vec::with_capacity(8192));
    c.start(&mut to_server).unwrap();
    let mut server_time = Duration::ZERO;
    while c.is_handshaking() || s.is_handshaking() {
        to_client.clear();
        let t = Instant::now();
        s.read(&mut to_server, Dest::InPlace, &mut to_client)
            .unwrap();
        server_time += t.elapsed();
        to_server.clear();
        let mut plain = Vec::new();
        c.read(&mut to_client, Dest::Append(&mut plain), &mut to_server)
            .unwrap();
    }
    server_time
}

fn tls(c: &mut Criterion) {
    let pki = pki::Pki::new();
    let server = ServerTls::new(TlsSettings {
        cert: pki.cert.clone(),
        key: pki.key.clone(),
        client_ca: None,
        min_version: MinVersion::Tls12,
        alpn: Vec::new(),
    })
    .unwrap();
    let client = pki.client(&[&rustls::version::TLS13], &[], false);
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut g = c.benchmark_group("tls");
    // ECDSA P-256, X25519, a session ticket: the server's CPU per full TLS 1.3 handshake.
    g.bench_function("full TLS 1.3 handshake, server side", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let mut s = server.accept();
                    let mut c = TlsClient::new(client.clone(), name.clone()).unwrap();
                    tls_handshake(&mut s, &mut c)
                })
                .sum()
        });
    });
    g.bench_function("100 B request in, 1 KiB response out, server side", |b| {
        let mut s = server.accept();
        let mut c = TlsClient::new(client.clone(), name.clone()).unwrap();
        tls_handshake(&mut s, &mut c);
        let (mut wire, mut out, mut plain) = (Vec::new(), Vec::new(), Vec::new());
        let (request, response) = ([b'q'; 100], [b'r'; 1024]);
        b.iter_custom(|iters| {
            let mut server_time = Duration::ZERO;
            for _ in 0..iters {
                wire.clear();
                c.write(&request, &mut wire).unwrap();
                out.clear();
                let t = Instant::now();
                let p = s.read(&mut wire, Dest::InPlace, &mut out).unwrap();
                black_box(&wire[..p.plaintext]);
                s.write(&response, &mut out).unwrap();
                server_time += t.elapsed();
                plain.clear();
                let mut back = Vec::new();
                c.read(&mut out, Dest::Append(&mut plain), &mut back)
                    .unwrap();
            }
            server_time
        });
    });
    g.finish();
}

criterion_group!(benches, timer_wheel, slab, http, websocket, tls);
criterion_main!(benches);
