//! What permessage-deflate costs in memory, measured with a counting allocator (this test binary
//! only): a `shared` connection's state is two bytes and no heap; a `dedicated` connection's
//! compressor is what `README.md` states, per window size; the shard's inflater.
//!
//! `cargo test --test deflate_memory -- --nocapture` prints the figures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};

use shardnet::service::deflate::{Agreed, Deflater, Inflater, LEVEL_FAST, LEVEL_THOROUGH};

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
    assert!(
        figures.windows(2).all(|w| w[0].1 <= w[1].1),
        "memory grows with the window"
    );
    assert!(inflater_bytes < 64 << 10, "{inflater_bytes}");
}
