//! What permessage-deflate costs in memory, measured with a counting allocator (this test binary
//! only): a `dedicated` connection's compressor per window size and the shard's inflater, as
//! `README.md` states them; and a running server's heap per idle WebSocket connection, plain,
//! `shared` (the same) and `dedicated`.
//!
//! `cargo test --test deflate_memory -- --nocapture` prints the figures.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::TcpStream;
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};
use std::sync::Mutex;

use common::*;
use shardnet::service::deflate::{Agreed, Deflater, Inflater, LEVEL_FAST, LEVEL_THOROUGH};

/// The tests here measure the whole process's heap: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Bytes currently allocated through the global allocator.
static LIVE: AtomicIsize = AtomicIsize::new(0);

struct Counting;

// SAFETY: every call forwards to the system allocator with the caller's own arguments; the
// counter is only arithmetic on the sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Relaxed);
        // SAFETY: the caller's layout, as GlobalAlloc::alloc requires.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Relaxed);
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Relaxed);
        // SAFETY: as for alloc.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Relaxed);
        // SAFETY: `ptr` came from this allocator with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Heap bytes `make` leaves allocated, after it ran one message through (some state is
/// allocated lazily). One test function only, so that no other thread allocates meanwhile.
fn retained<T>(make: impl FnOnce() -> T) -> (T, isize) {
    let before = LIVE.load(Relaxed);
    let t = make();
    (t, LIVE.load(Relaxed) - before)
}

fn json() -> Vec<u8> {
    (0..40)
        .flat_map(|i| format!("{{\"seq\":{i},\"symbol\":\"ACME\",\"bid\":101.{i}}},").into_bytes())
        .collect()
}

#[test]
fn memory_per_connection_and_per_shard() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let msg = json();
    let mut out = Vec::with_capacity(64 << 10);
    let mut scratch = Vec::with_capacity(64 << 10);

    // Shared mode: the connection keeps an Agreed, inline.
    assert!(std::mem::size_of::<Agreed>() <= 2);

    let mut figures = Vec::new();
    for bits in 9..=15u8 {
        let (d, bytes) = retained(|| {
            let agreed = Agreed {
                window_bits: bits,
                takeover: true,
            };
            let mut d = Deflater::new(agreed, LEVEL_THOROUGH);
            out.clear();
            d.compress(&msg, &mut out).unwrap();
            d
        });
        drop(d);
        figures.push((bits, bytes));
    }
    let (inflater, inflater_bytes) = retained(|| {
        let mut i = Inflater::default();
        let mut c = Vec::with_capacity(4096);
        let agreed = Agreed {
            window_bits: 15,
            takeover: false,
        };
        Deflater::new(agreed, LEVEL_FAST)
            .compress(&msg, &mut c)
            .unwrap();
        i.inflate(&c, 1 << 20, &mut scratch).unwrap();
        assert_eq!(scratch, msg);
        drop(c);
        i
    });
    drop(inflater);

    eprintln!("dedicated compressor per connection (window bits: heap bytes):");
    for (bits, bytes) in &figures {
        eprintln!("  {bits:2}: {bytes} B ({:.0} KiB)", *bytes as f64 / 1024.0);
    }
    eprintln!(
        "shard inflater: {inflater_bytes} B ({:.0} KiB)",
        inflater_bytes as f64 / 1024.0
    );

    // zlib-rs: a fixed 128 KiB hash head, 64 KiB pending and 48 KiB symbol buffers, plus
    // 4 bytes per window byte (window and chain): about 242 KiB at 9 bits, 368 KiB at 15.
    let at = |b: u8| figures.iter().find(|f| f.0 == b).unwrap().1;
    assert!(at(9) > 200 << 10 && at(9) < 300 << 10, "{}", at(9));
    assert!(at(15) > 300 << 10 && at(15) < 420 << 10, "{}", at(15));
    // Each step up in the window costs more, to within what the allocator's rounding moves
    // between two measurements (a few KiB: 11 bits measured 266,724 B once, 12 bits 265,344 B).
    assert!(
        figures.windows(2).all(|w| w[0].1 <= w[1].1 + (4 << 10)),
        "memory grows with the window: {figures:?}"
    );
    assert!(at(15) > at(9) + (100 << 10), "{figures:?}");
    assert!(inflater_bytes < 64 << 10, "{inflater_bytes}");
}

const UPGRADE: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

/// Opens `n` WebSocket connections to `path` (offering permessage-deflate when `offer`), each
/// upgraded (its 101 read: the server has set the connection's state), into `into`.
fn open(addr: std::net::SocketAddr, path: &str, offer: bool, n: usize, into: &mut Vec<TcpStream>) {
    let ext = if offer {
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    } else {
        ""
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{UPGRADE}{ext}\r\n");
    for _ in 0..n {
        let mut s = connect(addr);
        let (status, head, _) = http_exchange(&mut s, req.as_bytes());
        assert_eq!(status, 101, "{head}");
        assert_eq!(head.contains("permessage-deflate"), offer, "{head}");
        into.push(s);
    }
}

/// Heap bytes per connection that `open` adds to the process (the server's, since the client
/// side keeps its streams in a vector reserved beforehand).
fn heap_per_connection(
    addr: std::net::SocketAddr,
    path: &str,
    offer: bool,
    n: usize,
    held: &mut Vec<TcpStream>,
) -> f64 {
    held.reserve(n);
    let before = LIVE.load(Relaxed);
    open(addr, path, offer, n, held);
    (LIVE.load(Relaxed) - before) as f64 / n as f64
}

/// An idle WebSocket connection that negotiated `shared` compression holds no more heap in the
/// server than a plain one; a `dedicated` one holds its compressor.
#[test]
fn an_idle_compressed_connection_costs_what_a_plain_one_does() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let server = start_router(&format!(
        "{}[[listener.websocket]]\npath = \"/echo\"\nmode = \"echo\"\nping_interval = \"0s\"\n\
         [[listener.websocket]]\npath = \"/dedicated\"\nmode = \"echo\"\nping_interval = \"0s\"\n\
         compression = \"dedicated\"\n",
        http_toml(1, "")
    ));
    let addr = server.addr("http").unwrap();
    let n = 1000;
    // Warm-up: the engine's slab, timer wheel and the allocator's pools grow to 3n connections
    // once, so that no phase below pays for growth the others do not.
    let mut held = Vec::with_capacity(3 * n);
    open(addr, "/echo", false, 3 * n, &mut held);
    drop(std::mem::take(&mut held));
    wait_until(
        std::time::Duration::from_secs(10),
        "the warm-up connections closed",
        || {
            let mut s = connect(addr);
            let (_, _, body) = http_exchange(&mut s, b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n");
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            v["services_total"]["ws_open"].as_u64() == Some(0)
        },
    );
    let mut held = Vec::with_capacity(3 * n);
    let plain = heap_per_connection(addr, "/echo", false, n, &mut held);
    let shared = heap_per_connection(addr, "/echo", true, n, &mut held);
    let dedicated = heap_per_connection(addr, "/dedicated", true, 20, &mut held);
    eprintln!(
        "server heap per idle WebSocket connection: plain {plain:.0} B, shared compression \
         {shared:.0} B, dedicated {dedicated:.0} B"
    );
    assert!(
        plain > 0.0,
        "the measurement sees the connection state: {plain}"
    );
    assert!(
        shared <= plain + 8.0,
        "shared compression adds heap per connection: {shared} vs {plain}"
    );
    assert!(
        dedicated > plain + 200_000.0 && dedicated < plain + 420_000.0,
        "dedicated: {dedicated}"
    );
    drop(held);
}
