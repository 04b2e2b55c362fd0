//! The engine with the echo service: correctness, balancing, timeouts, backpressure.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;

#[test]
fn echo_1000_connections_random_sizes_every_byte_compared() {
    let server = start_echo(&echo_config(3, "", ""));
    let addr = server.addr("echo").unwrap();
    let mut conns: Vec<_> = (0..1000).map(|_| connect(addr)).collect();
    // Mostly small messages, every 25th up to 1 MiB: about 100 MB through the server.
    let chunks: Vec<&mut [std::net::TcpStream]> = conns.chunks_mut(125).collect();
    std::thread::scope(|scope| {
        for (t, chunk) in chunks.into_iter().enumerate() {
            scope.spawn(move || {
                for (i, stream) in chunk.iter_mut().enumerate() {
                    let seed = (t * 1000 + i) as u64;
                    let len = if i % 25 == 0 {
                        1 + (seed as usize * 7919) % (1 << 20)
                    } else {
                        1 + (seed as usize * 104_729) % 65_536
                    };
                    let data = pattern(seed, len);
                    let echo = echo_roundtrip(stream, &data);
                    assert!(
                        echo == data,
                        "connection {t}/{i}: echo of {len} bytes differs"
                    );
                }
            });
        }
    });
    let snap = server.snapshot();
    assert_eq!(snap.total().accepted, 1000);
    assert!(
        snap.shards.iter().all(|s| s.accepted > 300),
        "all three shards served: {:?}",
        snap.shards.iter().map(|s| s.accepted).collect::<Vec<_>>()
    );
    assert_eq!(snap.total().bytes_in, snap.total().bytes_out);
}

#[test]
fn round_robin_spreads_evenly() {
    let server = start_echo(&echo_config(4, "balance = \"round-robin\"", ""));
    let addr = server.addr("echo").unwrap();
    let conns: Vec<_> = (0..1000).map(|_| connect(addr)).collect();
    let stats = server.stats();
    wait_until(
        Duration::from_secs(10),
        "1000 connections taken over by shards",
        || stats.snapshot().total().accepted == 1000,
    );
    let per: Vec<u64> = stats.snapshot().shards.iter().map(|s| s.accepted).collect();
    let (min, max) = (per.iter().min().unwrap(), per.iter().max().unwrap());
    assert!(
        max - min <= 1,
        "per-shard accepted counts {per:?} differ by more than 1"
    );
    drop(conns);
}

#[test]
fn least_connections_sends_new_connections_to_the_emptiest_shard() {
    let server = start_echo(&echo_config(3, "balance = \"least-connections\"", ""));
    let addr = server.addr("echo").unwrap();
    let stats = server.stats();
    // Open 30 connections one at a time, learning which shard took each.
    let mut on_shard: Vec<Vec<std::net::TcpStream>> = vec![Vec::new(), Vec::new(), Vec::new()];
    for n in 1..=30u64 {
        let before: Vec<u64> = stats.snapshot().shards.iter().map(|s| s.accepted).collect();
        let mut c = connect(addr);
        wait_until(Duration::from_secs(5), "shard takes the connection", || {
            stats.snapshot().total().accepted == n
        });
        let after: Vec<u64> = stats.snapshot().shards.iter().map(|s| s.accepted).collect();
        let shard = (0..3).find(|&i| after[i] > before[i]).unwrap();
        assert_eq!(echo_roundtrip(&mut c, b"x"), b"x");
        on_shard[shard].push(c);
    }
    let counts: Vec<usize> = on_shard.iter().map(Vec::len).collect();
    assert_eq!(
        counts,
        vec![10, 10, 10],
        "least-connections keeps shards level"
    );
    // Empty shard 1; the next 10 connections must all land there.
    on_shard[1].clear();
    wait_until(
        Duration::from_secs(5),
        "shard 1 closes its connections",
        || stats.snapshot().shards[1].open == 0,
    );
    let before = stats.snapshot().shards[1].accepted;
    let fresh: Vec<_> = (0..10).map(|_| connect(addr)).collect();
    wait_until(Duration::from_secs(5), "10 more accepted", || {
        stats.snapshot().total().accepted == 40
    });
    assert_eq!(
        stats.snapshot().shards[1].accepted - before,
        10,
        "all new connections went to the emptiest shard"
    );
    drop(fresh);
}

#[test]
fn idle_timeout_closes_idle_connections_and_spares_busy_ones() {
    let server = start_echo(&echo_config(1, "", "idle_timeout = \"300ms\""));
    let addr = server.addr("echo").unwrap();
    let mut idle = connect(addr);
    let mut busy = connect(addr);
    let start = Instant::now();
    // Keep `busy` active every 50 ms for 1.2 s: four idle periods.
    while start.elapsed() < Duration::from_millis(1200) {
        assert_eq!(echo_roundtrip(&mut busy, b"ping"), b"ping");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut buf = [0u8; 16];
    assert_eq!(
        idle.read(&mut buf).expect("EOF, not an error"),
        0,
        "the idle connection was closed"
    );
    assert_eq!(echo_roundtrip(&mut busy, b"still here"), b"still here");
    let snap = server.snapshot();
    assert_eq!(snap.total().idle_timeouts, 1);
}

#[test]
fn backpressure_bounds_memory_and_write_timeout_closes() {
    let max_write = 64 * 1024;
    let config = echo_config(
        1,
        "read_buffer = \"64KiB\"\nread_budget = \"64KiB\"",
        "max_write_buffer = \"64KiB\"\nwrite_timeout = \"1s\"\nidle_timeout = \"0s\"",
    );
    let server = start_echo(&config);
    let addr = server.addr("echo").unwrap();
    let mut stream = connect(addr);
    stream
        .set_write_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let stats = server.stats();
    let started = Instant::now();
    let sent = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            // While the client pushes, the shard's queued output must stay within the bound
            // plus what one read can produce.
            let mut peak = 0;
            while started.elapsed() < Duration::from_secs(4) {
                peak = peak.max(stats.snapshot().shards[0].output_queued);
                std::thread::sleep(Duration::from_millis(2));
            }
            peak
        });
        let chunk = vec![7u8; 1 << 20];
        let mut sent = 0usize;
        while sent < 64 << 20 {
            match stream.write(&chunk) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        let peak = sampler.join().unwrap();
        assert!(peak > 0, "output was queued (the client never reads)");
        assert!(
            peak <= (max_write + 64 * 1024) as u64,
            "queued output peaked at {peak} bytes"
        );
        sent
    });
    assert!(
        sent < 64 << 20,
        "the server stopped reading: the client could not send all 64 MiB"
    );
    wait_until(
        Duration::from_secs(5),
        "write timeout closes the connection",
        || stats.snapshot().total().write_timeouts == 1,
    );
    assert_eq!(stats.snapshot().total().open, 0);
    assert!(stats.snapshot().total().backpressure_pauses >= 1);
}

#[test]
fn stale_events_and_reuse_do_not_mix_connections() {
    // Churn: connections closed and reopened rapidly reuse slab slots; every echo must still
    // reach its own connection.
    let server = start_echo(&echo_config(2, "", ""));
    let addr = server.addr("echo").unwrap();
    for round in 0..200u64 {
        let mut a = connect(addr);
        let mut b = connect(addr);
        let da = pattern(round, 100);
        let db = pattern(round + 10_000, 100);
        a.write_all(&da).unwrap();
        b.write_all(&db).unwrap();
        let mut ga = vec![0; 100];
        let mut gb = vec![0; 100];
        a.read_exact(&mut ga).unwrap();
        b.read_exact(&mut gb).unwrap();
        assert_eq!(ga, da);
        assert_eq!(gb, db);
    }
    let stats = server.stats();
    wait_until(Duration::from_secs(5), "all closed", || {
        stats.snapshot().total().open == 0
    });
    assert_eq!(stats.snapshot().total().closed, 400);
}

#[test]
fn drain_serves_a_connection_accepted_just_before_that_speaks_late() {
    // A client whose connect completed just before the drain but that writes only 600 ms later
    // (a loaded host): it is answered, not closed under it after the 250 ms quiet period.
    let mut server = start_echo(&echo_config(1, "", ""));
    let addr = server.addr("echo").unwrap();
    let mut late = connect(addr);
    let mut talker = connect(addr);
    assert_eq!(echo_roundtrip(&mut talker, b"early"), b"early");
    let stats = server.stats();
    wait_until(
        Duration::from_secs(5),
        "both taken over by the shard",
        || stats.snapshot().total().accepted == 2,
    );
    std::thread::scope(|scope| {
        let drain = scope.spawn(|| server.shutdown());
        // The scenario itself: this client is slow to send its first request.
        std::thread::sleep(Duration::from_millis(600));
        late.write_all(b"late request").unwrap();
        let (got, clean) = read_to_end(&mut late);
        assert_eq!(got, b"late request", "the late request was answered");
        assert!(clean, "then closed with FIN");
        // The connection that had spoken closes after the short quiet period.
        assert_eq!(read_to_end(&mut talker), (Vec::new(), true));
        // Our FINs end the server's lingering closes at once.
        let _ = late.shutdown(std::net::Shutdown::Both);
        let _ = talker.shutdown(std::net::Shutdown::Both);
        assert!(drain.join().unwrap(), "drained cleanly");
    });
}

#[test]
fn a_burst_of_connections_past_a_shards_queue_is_held_not_closed() {
    // One shard, whose queue of new sockets holds 1,024: a burst of 4,000 connections from eight
    // threads can find it full while the shard is busy adopting. The acceptor then waits with
    // the rest in the kernel's backlog rather than closing accepted connections (the bench at
    // 10,000 connections saw 2,100 closed that way).
    let server = start_echo(&echo_config(1, "", ""));
    let addr = server.addr("echo").unwrap();
    let conns: Vec<std::net::TcpStream> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| scope.spawn(move || (0..500).map(|_| connect(addr)).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    for (i, mut c) in conns.into_iter().enumerate() {
        let data = pattern(i as u64, 16);
        assert_eq!(echo_roundtrip(&mut c, &data), data, "connection {i}");
    }
    let snap = server.snapshot();
    assert_eq!(snap.acceptor.rejected_busy, 0);
    assert_eq!(snap.total().accepted, 4000);
}
