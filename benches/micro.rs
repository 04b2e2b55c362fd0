//! Micro-benchmarks of the per-event building blocks: `cargo bench --bench micro`.

use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use shardnet::conn::Slab;
use shardnet::service::deflate::{Agreed, Deflater, Inflater, LEVEL_FAST, LEVEL_THOROUGH};
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

/// A 1 KiB JSON message of the kind a push gateway sends (quotes of a few symbols); `n` varies
/// the numbers as successive messages of a feed would.
fn json_1k_nth(n: u32) -> Vec<u8> {
    let mut x = 0x9e37_79b9_u32.wrapping_mul(n + 1) | 1;
    let mut next = |m: u32| {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x % m
    };
    let mut s = String::from("[");
    let mut i = 0u32;
    while s.len() < 1024 {
        let bid = 100 + next(50);
        s.push_str(&format!(
            "{{\"seq\":{},\"symbol\":\"ACME{}\",\"bid\":{bid}.{:02},\"ask\":{}.{:02},\"ts\":17000{:05}}},",
            1000 + n * 16 + i,
            next(5),
            next(100),
            bid + 1,
            next(100),
            n * 16 + i
        ));
        i += 1;
    }
    s.truncate(1023);
    s.push(']');
    s.into_bytes()
}

fn json_1k() -> Vec<u8> {
    json_1k_nth(0)
}

/// The ratio `dedicated` buys: a stream of 64 different 1 KiB JSON messages compressed with
/// context takeover at each window size, against each message on its own (`shared`). Printed,
/// not timed.
fn print_stream_ratios() {
    let msgs: Vec<Vec<u8>> = (0..64).map(json_1k_nth).collect();
    let total = |agreed: Agreed, level: u32| {
        let mut d = Deflater::new(agreed, level);
        let mut out = Vec::new();
        for m in &msgs {
            d.compress(m, &mut out).unwrap();
        }
        out.len() / msgs.len()
    };
    let shared = |level| {
        let agreed = Agreed {
            window_bits: 15,
            takeover: false,
        };
        total(agreed, level)
    };
    let dedicated: Vec<String> = [9u8, 12, 15]
        .iter()
        .map(|&w| {
            let agreed = Agreed {
                window_bits: w,
                takeover: true,
            };
            format!("window {w}: {} B", total(agreed, LEVEL_THOROUGH))
        })
        .collect();
    eprintln!(
        "deflate, 64 different 1024 B JSON messages, mean compressed size: shared {} B at \
         level {LEVEL_FAST}, {} B at level {LEVEL_THOROUGH}; dedicated at level \
         {LEVEL_THOROUGH}, {}",
        shared(LEVEL_FAST),
        shared(LEVEL_THOROUGH),
        dedicated.join(", ")
    );
}

/// permessage-deflate of a 1 KiB JSON message, each message its own stream (the `shared`
/// mode: the compressor is reset after every message, the inflater too), with the product's
/// backend (flate2 over zlib-rs) and with miniz_oxide (flate2's default backend) called
/// directly, at levels 1, 2 and 6; the product's two levels through its own wrapper. `cargo bench --bench micro -- deflate`; the compressed sizes
/// print once per level.
fn deflate(c: &mut Criterion) {
    use miniz_oxide::deflate::core::{
        compress, create_comp_flags_from_zip_params, CompressorOxide, TDEFLFlush,
    };
    use miniz_oxide::inflate::stream::{inflate, InflateState};
    use miniz_oxide::{DataFormat, MZFlush};

    print_stream_ratios();
    let msg = json_1k();
    let mut g = c.benchmark_group("deflate");
    g.throughput(Throughput::Bytes(msg.len() as u64));
    let agreed = Agreed {
        window_bits: 15,
        takeover: false,
    };
    let mut fast = Deflater::new(agreed, LEVEL_FAST);
    let mut thorough = Deflater::new(agreed, LEVEL_THOROUGH);
    let mut compressed = Vec::new();
    thorough.compress(&msg, &mut compressed).unwrap();
    for level in [1u32, 2, 6] {
        // zlib-rs through flate2, reset per message (the product's levels through Deflater follow).
        let mut z =
            flate2::Compress::new_with_window_bits(flate2::Compression::new(level), false, 15);
        let mut out = Vec::with_capacity(4096);
        z.compress_vec(&msg, &mut out, flate2::FlushCompress::Sync)
            .unwrap();
        z.reset();
        let zlen = out.len() - 4;
        let flags = create_comp_flags_from_zip_params(level as i32, -15, 0);
        let mut m = Box::new(CompressorOxide::new(flags));
        let mut buf = vec![0u8; 4096];
        let (_, _, mlen) = compress(&mut m, &msg, &mut buf, TDEFLFlush::Sync);
        m.reset();
        eprintln!(
            "deflate level {level}: 1024 B of JSON -> zlib-rs {zlen} B, miniz_oxide {} B",
            mlen - 4
        );
        g.bench_function(
            format!("compress 1 KiB JSON, zlib-rs, level {level}"),
            |b| {
                b.iter(|| {
                    out.clear();
                    z.compress_vec(black_box(&msg), &mut out, flate2::FlushCompress::Sync)
                        .unwrap();
                    z.reset();
                    out.len()
                })
            },
        );
        if level != 2 {
            g.bench_function(
                format!("compress 1 KiB JSON, miniz_oxide, level {level}"),
                |b| {
                    b.iter(|| {
                        let r = compress(&mut m, black_box(&msg), &mut buf, TDEFLFlush::Sync);
                        m.reset();
                        r.2
                    })
                },
            );
        }
        if level == 6 {
            // What the per-message reset alone costs (it clears the hash tables).
            g.bench_function("reset, zlib-rs", |b| b.iter(|| z.reset()));
            g.bench_function("reset, miniz_oxide", |b| b.iter(|| m.reset()));
        }
    }
    for (level, d) in [(LEVEL_FAST, &mut fast), (LEVEL_THOROUGH, &mut thorough)] {
        g.bench_function(
            format!("compress 1 KiB JSON, Deflater, level {level}"),
            |b| {
                let mut out = Vec::with_capacity(4096);
                b.iter(|| {
                    out.clear();
                    d.compress(black_box(&msg), &mut out).unwrap();
                    out.len()
                })
            },
        );
    }
    let mut with_trailer = compressed.clone();
    with_trailer.extend_from_slice(&[0, 0, 0xff, 0xff]);
    g.bench_function("inflate 1 KiB JSON, zlib-rs", |b| {
        let mut inf = Inflater::default();
        let mut out = Vec::with_capacity(4096);
        b.iter(|| {
            inf.inflate(black_box(&compressed), 1 << 20, &mut out)
                .unwrap();
            out.len()
        })
    });
    g.bench_function("inflate 1 KiB JSON, miniz_oxide", |b| {
        let mut st = InflateState::new_boxed(DataFormat::Raw);
        let mut out = vec![0u8; 4096];
        b.iter(|| {
            let r = inflate(&mut st, black_box(&with_trailer), &mut out, MZFlush::Sync);
            st.reset(DataFormat::Raw);
            assert_eq!(r.bytes_written, 1024);
            r.bytes_written
        })
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

criterion_group!(benches, timer_wheel, slab, http, websocket, deflate, tls);
criterion_main!(benches);
