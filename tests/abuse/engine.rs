//! Abuse cases: engine. Each case was a defect of the engine (issue 11, issue 20) and asserts the
//! exact outcome and a bounded time: output stalled under the bound is closed by the write
//! timeout; a FIN sent with the data is seen; a bounded close survives a later timer; reading
//! pauses at the bound itself; a panicking callback closes only its connection; a dead shard is
//! reported; control is not queued behind data. Descriptor exhaustion and recovery (acceptor and
//! reuseport shards) is in `tests/process.rs`, which needs a child process with a low limit.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shardnet::server::{
    CloseReason, Conn, Ctx, Limits, ListenerSpec, Peers, Pinning, Server, Service, ShardInfo,
    Token, Tuning,
};

use super::common::*;

/// Issue 11 item 1: a client that sends a lot and never reads, leaving output queued below
/// `max_write_buffer`, is closed once no write progress has been made for `write_timeout`.
#[test]
fn non_reader_with_output_below_the_bound_is_closed_after_write_timeout() {
    let config = echo_config(
        1,
        "",
        "max_write_buffer = \"64MiB\"\nwrite_timeout = \"1s\"\nidle_timeout = \"60s\"",
    );
    let server = start_echo(&config);
    let addr = server.addr("echo").unwrap();
    let mut client = connect(addr);
    // 16 MiB: more than the kernel buffers on both sides take (tcp_wmem max 4 MiB), far under the
    // 64 MiB bound, so reading never pauses and most of it waits in the server's queue.
    let chunk = vec![b'p'; 1 << 20];
    for _ in 0..16 {
        client.write_all(&chunk).unwrap();
    }
    let sent = Instant::now();
    let stats = server.stats();
    wait_until(
        Duration::from_secs(4),
        "output was queued in the server",
        || stats.snapshot().total().output_queued > 0 || stats.snapshot().total().closed > 0,
    );
    assert!(
        stats.snapshot().total().backpressure_pauses == 0,
        "the queue stayed under the bound (no pause)"
    );
    wait_until(
        Duration::from_secs(8),
        "the write timeout closes the connection",
        || stats.snapshot().total().closed == 1,
    );
    let waited = sent.elapsed();
    let snap = stats.snapshot().total();
    assert_eq!(snap.write_timeouts, 1, "closed by the write timeout");
    assert_eq!(snap.idle_timeouts, 0);
    assert_eq!(snap.output_queued, 0, "the queue was released");
    assert!(
        waited >= Duration::from_millis(900),
        "not before write_timeout: {waited:?}"
    );
}

/// The same through the product's HTTP service: a client pipelines requests and stops reading,
/// its answers queued under the bound; the write timeout closes it.
#[test]
fn pipelining_http_client_that_stops_reading_is_closed_after_write_timeout() {
    let toml = format!(
        "{}[limits]\nmax_write_buffer = \"64MiB\"\nwrite_timeout = \"1s\"\nidle_timeout = \"60s\"\n",
        http_toml(1, "")
    );
    let server = start_router(&toml);
    let mut client = connect(server.addr("http").unwrap());
    // 40,000 requests (1.4 MB) whose answers (about 5 MB) exceed what the kernel buffers hold.
    let batch = b"GET /plaintext HTTP/1.1\r\nHost: x\r\n\r\n".repeat(1000);
    for _ in 0..40 {
        client.write_all(&batch).unwrap();
    }
    let sent = Instant::now();
    let stats = server.stats();
    wait_until(
        Duration::from_secs(10),
        "the write timeout closes it",
        || stats.snapshot().total().write_timeouts == 1,
    );
    assert_eq!(
        stats.snapshot().total().backpressure_pauses,
        0,
        "never over the bound"
    );
    assert!(sent.elapsed() >= Duration::from_millis(900));
}

/// Issue 11 item 2: the request and the FIN arrive together; the answer comes back and the
/// connection closes at once, not after `idle_timeout`.
#[test]
fn fin_with_the_data_is_seen_and_the_connection_closes_promptly() {
    let server = start_echo(&echo_config(1, "", "idle_timeout = \"60s\""));
    let addr = server.addr("echo").unwrap();
    for trial in 0..20 {
        let mut c = connect(addr);
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let started = Instant::now();
        let payload = format!("request {trial}\n");
        c.write_all(payload.as_bytes()).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let (got, clean) = read_to_end(&mut c);
        assert!(
            clean,
            "trial {trial}: no EOF within 5 s (got {} bytes)",
            got.len()
        );
        assert_eq!(got, payload.as_bytes(), "trial {trial}: the echo");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "trial {trial}: closed after {:?}",
            started.elapsed()
        );
    }
    let stats = server.stats();
    wait_until(Duration::from_secs(5), "every connection closed", || {
        stats.snapshot().total().closed == 20
    });
    assert_eq!(stats.snapshot().total().idle_timeouts, 0);
}

/// The same through the product's HTTP service: one request and FIN, one answer, then EOF.
#[test]
fn http_request_with_fin_is_answered_then_closed_promptly() {
    let server = start_router(&http_toml(1, ""));
    let addr = server.addr("http").unwrap();
    for trial in 0..20 {
        let mut c = connect(addr);
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let started = Instant::now();
        c.write_all(b"GET /plaintext HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let (got, clean) = read_to_end(&mut c);
        let text = String::from_utf8_lossy(&got);
        assert!(clean, "trial {trial}: no EOF within 5 s: {text:?}");
        assert!(
            text.starts_with("HTTP/1.1 200 "),
            "trial {trial}: answered: {text:?}"
        );
        assert!(text.ends_with("Hello, World!"), "trial {trial}: {text:?}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }
    let mut buf = [0u8; 1];
    let mut probe = connect(addr);
    probe
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert!(probe.read(&mut buf).unwrap() > 0, "still serving");
}

/// A server on 127.0.0.1:0 running the test's own service, unpinned.
fn start_custom<S, F>(shards: usize, limits: Limits, factory: F) -> Server
where
    S: Service,
    F: Fn(ShardInfo, Peers<S::Command>) -> S + Send + Sync + 'static,
{
    Server::builder()
        .listener(ListenerSpec::new("t", "127.0.0.1:0".parse().unwrap()))
        .shards(shards)
        .pinning(Pinning::Off)
        .limits(limits)
        .tuning(Tuning {
            shutdown_timeout: Duration::from_secs(3),
            ..Tuning::default()
        })
        .start(factory)
        .expect("server starts")
}

/// 8 MiB: more than the kernel buffers of a loopback connection take from a peer that never
/// reads, so most of it stays queued in the server.
fn flood(conn: &mut Conn<'_, impl Sized>) {
    conn.out().resize(8 << 20, b'f');
}

/// Writes a flood the client never reads, asks for a close bounded at 300 ms, then sets a timer
/// far beyond it (as a protocol arming its next heartbeat would).
struct CloseThenTimer;

impl Service for CloseThenTimer {
    type State = ();
    type Command = ();

    fn on_data(&mut self, conn: &mut Conn<'_, ()>, input: &mut [u8]) -> usize {
        flood(conn);
        conn.close_within(Duration::from_millis(300));
        conn.set_timer(Duration::from_secs(60));
        input.len()
    }
}

/// `close_within` then `set_timer` in one callback: the flush bound still holds (the timer used
/// to overwrite it, leaving the connection open until the timer or `write_timeout`).
#[test]
fn close_within_then_set_timer_keeps_the_close_bound() {
    let limits = Limits {
        write_timeout: Duration::from_secs(60),
        ..Limits::default()
    };
    let server = start_custom(1, limits, |_, _| CloseThenTimer);
    let mut c = connect(server.addr("t").unwrap());
    c.write_all(b"go").unwrap();
    let sent = Instant::now();
    let stats = server.stats();
    wait_until(Duration::from_secs(5), "the bounded close happens", || {
        stats.snapshot().total().closed == 1
    });
    let took = sent.elapsed();
    assert!(
        took >= Duration::from_millis(250),
        "not before the bound: {took:?}"
    );
    assert_eq!(stats.snapshot().total().write_timeouts, 1);
}

/// What each connection of [`Recorder`] was asked to do, by its first byte.
#[derive(Default)]
struct Role(u8);

/// Records every close and its reason, and each connection's peer address.
struct Recorder {
    closes: Arc<Mutex<Vec<(u8, CloseReason)>>>,
    peers: Arc<Mutex<Vec<std::net::SocketAddr>>>,
}

impl Service for Recorder {
    type State = Role;
    type Command = ();

    fn on_open(&mut self, conn: &mut Conn<'_, Role>) {
        if let Some(peer) = conn.peer_addr() {
            self.peers.lock().unwrap().push(peer);
        }
    }

    fn on_data(&mut self, conn: &mut Conn<'_, Role>, input: &mut [u8]) -> usize {
        if conn.state().0 == 0 {
            conn.state().0 = input[0];
        }
        match conn.state().0 {
            b'c' => conn.close(),
            b'p' => panic!("the service trips over {:?}", input[0] as char),
            b'w' => flood(conn),
            // Consume nothing: the input piles up to max_read_buffer.
            b'o' => return 0,
            _ => conn.write(input),
        }
        input.len()
    }

    fn on_close(&mut self, _token: Token, state: &mut Role, reason: CloseReason) {
        self.closes.lock().unwrap().push((state.0, reason));
    }
}

/// Every way a connection ends reaches `on_close` with its reason; a panicking callback closes
/// only its own connection and is counted; `Conn::peer_addr` is the client's address.
#[test]
fn close_reasons_reach_the_service_and_a_panic_closes_only_its_connection() {
    let closes = Arc::new(Mutex::new(Vec::new()));
    let peers = Arc::new(Mutex::new(Vec::new()));
    let limits = Limits {
        idle_timeout: Duration::from_millis(600),
        write_timeout: Duration::from_millis(600),
        max_read_buffer: 64 * 1024,
        ..Limits::default()
    };
    let (c2, p2) = (closes.clone(), peers.clone());
    let mut server = start_custom(1, limits, move |_, _| Recorder {
        closes: c2.clone(),
        peers: p2.clone(),
    });
    let addr = server.addr("t").unwrap();
    let stats = server.stats();
    let reason_of = |role: u8| {
        closes
            .lock()
            .unwrap()
            .iter()
            .find(|(r, _)| *r == role)
            .map(|(_, why)| *why)
    };

    let mut keeper = connect(addr);
    assert_eq!(echo_roundtrip(&mut keeper, b"e-keep"), b"e-keep");
    let keeper_addr = keeper.local_addr().unwrap();

    let mut panicker = connect(addr);
    panicker.write_all(b"p").unwrap();
    let (got, _) = read_to_end(&mut panicker);
    assert!(got.is_empty(), "nothing is sent for a panicked callback");
    wait_until(Duration::from_secs(5), "the panic is reported", || {
        reason_of(b'p') == Some(CloseReason::Panic)
    });
    assert_eq!(stats.snapshot().total().service_panics, 1);
    // The shard carried on: the other connection still works.
    assert_eq!(echo_roundtrip(&mut keeper, b"e-again"), b"e-again");

    let mut closer = connect(addr);
    closer.write_all(b"c").unwrap();
    assert_eq!(read_to_end(&mut closer), (Vec::new(), true));

    let mut peer_closer = connect(addr);
    peer_closer.write_all(b"e-bye").unwrap();
    peer_closer.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_end(&mut peer_closer), (b"e-bye".to_vec(), true));

    let mut overflow = connect(addr);
    let _ = overflow.write_all(&[b'o'; 128 * 1024]);
    let mut non_reader = connect(addr);
    non_reader.write_all(b"w").unwrap();
    let _idle = connect(addr);

    wait_until(Duration::from_secs(8), "every close reported", || {
        closes.lock().unwrap().len() >= 7
    });
    assert_eq!(reason_of(b'c'), Some(CloseReason::Service));
    assert_eq!(reason_of(b'e'), Some(CloseReason::PeerClosed));
    assert_eq!(reason_of(b'o'), Some(CloseReason::ReadOverflow));
    assert_eq!(reason_of(b'w'), Some(CloseReason::WriteTimeout));
    assert_eq!(
        reason_of(0),
        Some(CloseReason::IdleTimeout),
        "{:?}",
        closes.lock()
    );
    // The keeper went idle too once it stopped talking.
    let idle = closes
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, why)| *why == CloseReason::IdleTimeout)
        .count();
    assert_eq!(idle, 2, "{:?}", closes.lock());
    assert!(peers.lock().unwrap().contains(&keeper_addr));

    let mut last = connect(addr);
    assert_eq!(echo_roundtrip(&mut last, b"e-last"), b"e-last");
    assert!(server.shutdown());
    assert_eq!(
        closes.lock().unwrap().last(),
        Some(&(b'e', CloseReason::Drain))
    );
    let snap = stats.snapshot().total();
    assert_eq!(
        (snap.read_overflows, snap.write_timeouts, snap.idle_timeouts),
        (1, 1, 2)
    );
}

/// Panics in `next_wake` on shard 0 once told to: outside any connection callback, so the
/// shard thread dies.
struct DiesOnCue {
    shard: usize,
    cue: Arc<AtomicBool>,
}

impl Service for DiesOnCue {
    type State = ();
    type Command = ();

    fn on_data(&mut self, conn: &mut Conn<'_, ()>, input: &mut [u8]) -> usize {
        conn.write(input);
        input.len()
    }

    fn next_wake(&self) -> Option<std::time::Instant> {
        if self.shard == 0 && self.cue.load(Ordering::Relaxed) {
            panic!("shard 0 dies on cue");
        }
        None
    }
}

/// A shard whose thread dies is reported (`dead_shards`, its `alive` gauge), control messages
/// say it did not acknowledge, and the other shards keep serving new connections.
#[test]
fn a_dead_shard_is_reported_and_the_others_keep_serving() {
    let cue = Arc::new(AtomicBool::new(false));
    let cue2 = cue.clone();
    let server = start_custom(2, Limits::default(), move |info, _| DiesOnCue {
        shard: info.shard,
        cue: cue2.clone(),
    });
    let addr = server.addr("t").unwrap();
    assert_eq!(server.dead_shards(), 0);
    assert_eq!(server.snapshot().total().alive, 2);
    assert!(
        server.set_limits(Limits::default()).is_ok(),
        "every shard acknowledges"
    );
    cue.store(true, Ordering::Relaxed);
    // Round-robin: within two connections one lands on shard 0 and wakes it.
    let mut tries = 0;
    while server.dead_shards() == 0 {
        tries += 1;
        assert!(tries < 100, "shard 0 never died");
        let _ = std::net::TcpStream::connect(addr);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(server.dead_shards(), 1);
    let snap = server.snapshot();
    assert_eq!(snap.dead_shards, 1);
    assert_eq!(snap.shards[0].alive, 0);
    assert_eq!(snap.shards[0].open, 0, "its connections went with it");
    assert_eq!(snap.shards[1].alive, 1);
    let err = server.set_limits(Limits::default()).unwrap_err();
    assert_eq!((err.missing, err.shards), (1, 2), "{err}");
    assert!(server.snapshot().control_failures >= 1);
    for i in 0..6u8 {
        let mut c = connect(addr);
        assert_eq!(echo_roundtrip(&mut c, &[i; 10]), [i; 10], "connection {i}");
    }
}

/// Writes a flood when the connection opens, then on input exactly what is left to reach
/// `max_write_buffer`.
struct FillToTheBound {
    bound: usize,
}

impl Service for FillToTheBound {
    type State = ();
    type Command = ();

    fn on_open(&mut self, conn: &mut Conn<'_, ()>) {
        flood(conn);
    }

    fn on_data(&mut self, conn: &mut Conn<'_, ()>, input: &mut [u8]) -> usize {
        let room = self.bound - conn.queued();
        let out = conn.out();
        let staged = out.len();
        out.resize(staged + room, b'b');
        assert_eq!(conn.queued(), self.bound);
        assert!(conn.over_limit());
        input.len()
    }
}

/// Reading pauses when the queue reaches `max_write_buffer` exactly (it used to need more).
#[test]
fn reading_pauses_at_exactly_max_write_buffer() {
    let bound = 16 << 20;
    let limits = Limits {
        max_write_buffer: bound,
        ..Limits::default()
    };
    let server = start_custom(1, limits, move |_, _| FillToTheBound { bound });
    let mut c = connect(server.addr("t").unwrap());
    let stats = server.stats();
    wait_until(Duration::from_secs(5), "the flood is queued", || {
        stats.snapshot().total().output_queued > 0
    });
    c.write_all(b"x").unwrap();
    wait_until(
        Duration::from_secs(5),
        "reading pauses at the bound",
        || stats.snapshot().total().backpressure_pauses == 1,
    );
    assert_eq!(stats.snapshot().total().output_queued, bound as u64);
}

/// Spends a millisecond on every command, like a service with heavy fan-out work.
struct SlowCommands;

impl Service for SlowCommands {
    type State = ();
    type Command = u32;

    fn on_data(&mut self, _conn: &mut Conn<'_, ()>, input: &mut [u8]) -> usize {
        input.len()
    }

    fn on_command(&mut self, _cmd: u32, _ctx: &mut Ctx<'_, ()>) {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Control is not queued behind data: new limits reach a shard that has 3000 slow commands
/// queued (3 s of work) at once, acknowledged.
#[test]
fn new_limits_reach_a_shard_busy_with_a_flood_of_commands_at_once() {
    let slot: Arc<Mutex<Option<Peers<u32>>>> = Arc::new(Mutex::new(None));
    let slot2 = slot.clone();
    let server = start_custom(1, Limits::default(), move |_, peers| {
        *slot2.lock().unwrap() = Some(peers);
        SlowCommands
    });
    let peers = slot.lock().unwrap().clone().expect("the factory ran");
    for i in 0..3000 {
        assert!(peers.send(0, i), "command {i} queued");
    }
    let asked = Instant::now();
    let applied = server.set_limits(Limits {
        idle_timeout: Duration::from_secs(7),
        ..Limits::default()
    });
    let took = asked.elapsed();
    assert!(applied.is_ok(), "{applied:?}");
    assert!(took < Duration::from_secs(1), "acknowledged after {took:?}");
}
