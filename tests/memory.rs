//! What does not grow with connections stays small: an idle process's private memory, and what
//! each additional shard adds to it (the target: an idle shard costs at most 1 MiB).
//!
//! Private memory here is the `Anonymous` line of /proc/PID/smaps_rollup: the heap, the thread
//! stacks and arenas, the relocated data. The binary's text is left out: it is file-backed and
//! shared by every process running it (RSS counts it whole in each one).

mod common;

use std::time::{Duration, Instant};

use common::*;

fn config(shards: usize) -> String {
    format!(
        "[server]\nshards = {shards}\npin = false\nstats_interval = \"0s\"\n\
         [[listener]]\nname = \"echo\"\naddr = \"127.0.0.1:0\"\nservice = \"echo\"\n\
         [[listener]]\nname = \"http\"\naddr = \"127.0.0.1:0\"\nservice = \"http\"\n\
         [[listener.websocket]]\npath = \"/ws\"\nmode = \"pubsub\"\n"
    )
}

/// `Anonymous` of smaps_rollup in KiB, once it has stopped changing (the shards have reached
/// their loop): three equal readings 100 ms apart, within 10 s.
fn settled_anon_kib(pid: u32) -> Option<u64> {
    let read = || -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
        s.lines()
            .find_map(|l| l.strip_prefix("Anonymous:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut last, mut same) = (read()?, 0);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        let now = read()?;
        same = if now == last { same + 1 } else { 0 };
        last = now;
        if same == 2 {
            break;
        }
    }
    Some(last)
}

#[test]
fn an_idle_shard_costs_well_under_a_mebibyte_of_private_memory() {
    if !require(
        std::path::Path::new("/proc/self/smaps_rollup").exists(),
        "/proc/PID/smaps_rollup (Linux 4.14 or later)",
        "run on a newer kernel",
    ) {
        return;
    }
    let one = Child::spawn(&config(1), "");
    let eight = Child::spawn(&config(8), "");
    let a1 = settled_anon_kib(one.child.id()).expect("smaps_rollup of the 1-shard server");
    let a8 = settled_anon_kib(eight.child.id()).expect("smaps_rollup of the 8-shard server");
    let per_shard = a8.saturating_sub(a1) as f64 / 7.0;
    eprintln!("private memory: 1 shard {a1} KiB, 8 shards {a8} KiB: {per_shard:.0} KiB per shard");
    // Measured here: about 20 KiB per shard (a 12 KiB stack and an arena's first pages) and
    // 340 KiB for a one-shard process in a release build; 31 KiB and 1.1 MiB in a debug build
    // (larger relocated data and frames). The bounds leave room for another allocator or libc
    // and still catch an eagerly filled read buffer (64 KiB), event array (12 KiB), timer
    // wheel (32 KiB) or socket queue (24 KiB) coming back, let alone a preallocated ring of
    // commands (3.5 MiB).
    assert!(
        per_shard <= 128.0,
        "each extra shard adds {per_shard:.0} KiB of private memory (1 shard: {a1} KiB, 8: {a8} KiB)"
    );
    assert!(
        a1 <= 2048,
        "an idle one-shard server holds {a1} KiB of private memory"
    );
}
