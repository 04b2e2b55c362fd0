//! Micro-benchmarks of the per-event building blocks: `cargo bench --bench micro`.

use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use shardnet::conn::Slab;
use shardnet::service::http::{
    DateCache, Handler, Http, HttpConn, HttpSettings, Request, Response, Sent,
};
use shardnet::service::ws::{self, WsConn};
use shardnet::timer::TimerWheel;

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

criterion_group!(benches, timer_wheel, slab, http, websocket);
criterion_main!(benches);
