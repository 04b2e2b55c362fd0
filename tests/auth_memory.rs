//! What an authenticated WebSocket connection costs in memory beyond an anonymous one, counted
//! by a global allocator (this test binary's only test, so nothing else allocates meanwhile).
//!
//! Per connection, both kinds keep the same 16-byte `ConnAuth` in their state (a grant and a
//! rate-limit bucket): the difference there is nothing (`app::router`'s tests hold that the
//! state of a connection with it is 16 bytes larger than a plain one's). The permissions live in the shard's
//! `PermTable`: one entry per distinct subject (its `sub` and a reference to pattern lists
//! that every subject with the same claims shares), and none per further connection of the same
//! subject. This test writes both figures down; `bench --mode idle --idle-ws --mint ...`
//! measures the whole server's RSS per connection.

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

#[test]
fn an_authenticated_connection_costs_its_subject_and_nothing_per_further_connection() {
    const N: usize = 10_000;
    assert_eq!(
        std::mem::size_of::<ConnAuth>(),
        16,
        "the same for every connection"
    );
    // Subjects as issuers write them: a 36-character UUID.
    let subs: Vec<String> = (0..N)
        .map(|i| format!("6f1d2c3e-0000-4000-8000-{i:012}"))
        .collect();
    let verified: Vec<Permissions> = subs.iter().map(|s| perms(s)).collect();
    let mut table = PermTable::new(&[]);
    let before = net();
    let ids: Vec<_> = verified.iter().map(|p| table.acquire(p)).collect();
    // Less `ids` itself (4 bytes an id).
    let per_subject = (net() - before - (N * 4) as isize) as f64 / N as f64;
    // One more connection for each subject: the entries are shared.
    let before = net();
    let again: Vec<_> = verified.iter().map(|p| table.acquire(p)).collect();
    let per_extra = (net() - before - (N * 4) as isize) as f64 / N as f64;
    eprintln!(
        "PermTable: {per_subject:.0} bytes per distinct subject (36-byte sub), \
         {per_extra:.1} per further connection of one"
    );
    assert_eq!(table.len(), N);
    assert!(per_extra.abs() < 1.0, "{per_extra}");
    // Measured: 130 bytes. The sub itself (36), its entry (a 40-byte Rc), its slot (16) and its
    // index entry (12), the last two with the vectors' and the hash table's growth slack.
    assert!(
        (36.0..=160.0).contains(&per_subject),
        "{per_subject} bytes per subject"
    );
    for id in ids.into_iter().chain(again) {
        table.release(id);
    }
    assert!(table.is_empty());
}
