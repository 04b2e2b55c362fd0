//! What an authenticated WebSocket connection costs in memory beyond an anonymous one, counted
//! by a global allocator (this test binary's only test, so nothing else allocates meanwhile).
//!
//! Per connection, both kinds keep the same 16-byte `ConnAuth` in their state (a grant and a
//! rate-limit bucket): the difference there is nothing (`app::router`'s tests hold that the
//! state of a connection with it is 16 bytes larger than a plain one's). The permissions live in
//! the shard's `PermTable`: one slot per authenticated connection, 28 bytes (its `sub`, inline
//! up to 24 bytes, and the index of pattern lists that every connection with the same claims
//! shares), plus the subject on the heap when it is longer. This test writes the figures down;
//! `bench --mode idle --idle-ws --mint ...` measures the whole server's PSS per connection.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use shardnet::app::auth::{ConnAuth, PermTable, Permissions};

/// Net bytes requested from the allocator (requested sizes: malloc adds its own rounding).
struct Counting;

static NET: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged; the counter only observes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        NET.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's layout contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        NET.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn net() -> isize {
    NET.load(Ordering::Relaxed)
}

fn perms(sub: &str) -> Permissions {
    Permissions {
        sub: sub.into(),
        subscribe: vec!["chat:*".into(), "user:{sub}".into()],
        publish: vec!["chat:{sub}".into()],
    }
}

/// Bytes per connection that `table` takes for `N` connections with these subjects, all in
/// one table: with the anonymous slot, `N + 1` = 2^14 slots fill the vectors' capacity exactly,
/// so the figure has no growth slack in it (a vector's untouched capacity is not resident
/// anyway, but the allocator counts it).
fn per_connection(subs: &[String]) -> f64 {
    let verified: Vec<Permissions> = subs.iter().map(|s| perms(s)).collect();
    let mut table = PermTable::new(&[]);
    let before = net();
    let ids: Vec<_> = verified.iter().map(|p| table.acquire(p)).collect();
    // Less `ids` itself (4 bytes an id) and the one rule set they share.
    let per = (net() - before - (subs.len() * 4) as isize) as f64 / subs.len() as f64;
    assert_eq!(table.len(), subs.len());
    assert_eq!(table.rule_sets(), 2, "theirs and the anonymous one");
    for id in ids {
        table.release(id);
    }
    assert!(table.is_empty());
    assert_eq!(table.rule_sets(), 1);
    per
}

#[test]
fn an_authenticated_connection_costs_a_slot_and_a_long_subject() {
    const N: usize = (1 << 14) - 1;
    assert_eq!(
        std::mem::size_of::<ConnAuth>(),
        16,
        "the same for every connection"
    );
    // As the bench mints them (`bench-{i}`): inline.
    let short: Vec<String> = (0..N).map(|i| format!("bench-{i}")).collect();
    // As many issuers write them: a 36-character UUID, past the inline 24 bytes.
    let uuid: Vec<String> = (0..N)
        .map(|i| format!("6f1d2c3e-0000-4000-8000-{i:012}"))
        .collect();
    let (short, uuid) = (per_connection(&short), per_connection(&uuid));
    eprintln!(
        "PermTable: {short:.1} bytes per connection with a short sub, {uuid:.1} with a 36-byte one"
    );
    // The slot: 24 bytes of subject and a 4-byte rule set index; the rule set is shared.
    assert!(
        (28.0..29.0).contains(&short),
        "{short} bytes per connection"
    );
    // And the subject's own heap string.
    assert!(
        (28.0 + 36.0..29.0 + 36.0).contains(&uuid),
        "{uuid} bytes per connection"
    );
}
