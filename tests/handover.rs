//! Restart without dropping a connection: listeners and live connections handed from an old
//! server to a new one over the control socket.
//!
//! The first tests run both servers in this process (the engine's API: `Server::open_control`
//! on the old one, `Takeover` on the new one), with services that keep state in the engine's
//! buffers. The `process_*` tests run real `shardnet serve` processes: a takeover by
//! `serve --takeover`, `shardnet upgrade`, a new process killed at three points, a
//! configuration that does not parse and versions that do not match.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use shardnet::server::handover::ControlEvent;
use shardnet::server::{Conn, ListenerSpec, Server, Service, Takeover};
use shardnet::service::echo::Echo;

/// A private directory for a control socket (removed on drop).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "shardnet-ho-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Answers every line with its length; a partial line waits in the engine's input buffer.
struct Lines;

impl Service for Lines {
    type State = ();
    type Command = ();

    fn on_data(&mut self, conn: &mut Conn<'_, ()>, input: &mut [u8]) -> usize {
        let mut used = 0;
        while let Some(end) = input[used..].iter().position(|&b| b == b'\n') {
            conn.write(format!("{end}\n").as_bytes());
            used += end + 1;
        }
        used
    }

    const HANDOVER_FORMAT: &'static str = "test-lines/1";

    fn export(&mut self, _conn: &mut Conn<'_, ()>) -> Option<Vec<u8>> {
        Some(Vec::new())
    }

    fn import(&mut self, _conn: &mut Conn<'_, ()>, _blob: &[u8]) -> Result<(), String> {
        Ok(())
    }
}

/// Echo that cannot hand a connection over (the trait's defaults).
struct Stuck;

impl Service for Stuck {
    type State = ();
    type Command = ();

    fn on_data(&mut self, conn: &mut Conn<'_, ()>, input: &mut [u8]) -> usize {
        conn.write(input);
        input.len()
    }
}

fn spec() -> ListenerSpec {
    ListenerSpec::new("main", "127.0.0.1:0".parse().unwrap())
}

/// Starts a server with `shards` shards and `service`.
fn server<S: Service, F>(shards: usize, factory: F) -> Server
where
    F: Fn() -> S + Send + Sync + 'static,
{
    Server::builder()
        .listener(spec())
        .shards(shards)
        .pinning(shardnet::server::Pinning::Off)
        .start(move |_, _| factory())
        .expect("server starts")
}

/// Takes `old` over (through its control socket at `path`) with a new server of `shards`
/// shards, on another thread; returns the new server and what the old one reported.
fn take_over<S: Service, F>(
    path: &std::path::Path,
    events: &crossbeam_channel::Receiver<ControlEvent>,
    shards: usize,
    factory: F,
) -> (Server, ControlEvent)
where
    F: Fn() -> S + Send + Sync + 'static,
{
    let path = path.to_path_buf();
    let new = std::thread::spawn(move || {
        let mut t = Takeover::connect(&path, S::HANDOVER_FORMAT).expect("hello");
        let builder = t
            .take_listeners(
                Server::builder()
                    .listener(spec())
                    .shards(shards)
                    .pinning(shardnet::server::Pinning::Off),
            )
            .expect("listeners");
        let server = builder.start(move |_, _| factory()).expect("new server");
        t.take_connections(&server).expect("connections");
        server
    })
    .join()
    .expect("the taking thread");
    let event = events
        .recv_timeout(Duration::from_secs(10))
        .expect("the old server reports the hand-over");
    (new, event)
}

#[test]
fn echo_connections_move_to_a_server_with_more_shards_byte_exact() {
    let dir = TempDir::new("echo");
    let path = dir.path("control.sock");
    let mut old = server(2, || Echo);
    let events = old.open_control(&path, false).unwrap();
    let addr = old.addr("main").unwrap();
    let mut clients: Vec<TcpStream> = (0..200).map(|_| connect(addr)).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        let d = pattern(i as u64, 100);
        assert_eq!(echo_roundtrip(c, &d), d);
    }
    let (new, event) = take_over(&path, &events, 3, || Echo);
    match event {
        ControlEvent::HandedOver {
            connections, kept, ..
        } => assert_eq!((connections, kept), (200, 0)),
        other => panic!("{other:?}"),
    }
    let moved = old.snapshot();
    assert_eq!(moved.total().handed_over, 200);
    assert_eq!(moved.total().open, 0, "the old server holds nothing");
    assert_eq!(moved.total().closed, 0, "and closed nothing");
    assert!(old.shutdown());
    for (i, c) in clients.iter_mut().enumerate() {
        let d = pattern(1000 + i as u64, 3000);
        assert_eq!(
            echo_roundtrip(c, &d),
            d,
            "connection {i} after the hand-over"
        );
    }
    let snap = new.snapshot();
    assert_eq!(snap.total().received, 200);
    assert_eq!(snap.total().open, 200);
    assert!(
        snap.shards.iter().all(|s| s.received > 50),
        "spread over the 3 shards: {:?}",
        snap.shards.iter().map(|s| s.received).collect::<Vec<_>>()
    );
    assert_eq!(snap.handover.taken, 1);
    // New connections reach the new server through the same listening socket.
    let mut fresh = connect(addr);
    assert_eq!(echo_roundtrip(&mut fresh, b"new"), b"new");
    assert_eq!(new.snapshot().total().accepted, 1);
    // Clients close first, so the new server's drain does not wait for their FIN.
    drop((clients, fresh));
}

#[test]
fn a_partial_request_and_unsent_output_move_with_their_connection() {
    let dir = TempDir::new("buffers");
    let path = dir.path("control.sock");
    let mut old = server(1, || Lines);
    let events = old.open_control(&path, false).unwrap();
    let addr = old.addr("main").unwrap();

    // Half a line, left in the old server's input buffer.
    let mut partial = connect(addr);
    partial.write_all(b"twelve\nhalf a li").unwrap();
    let mut got = [0u8; 2];
    partial.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"6\n");

    // A client that writes lines and does not read: answers queue in the old server.
    let mut stalled = connect(addr);
    stalled.set_nonblocking(true).unwrap();
    let chunk = b"0123456789\n".repeat(6000);
    let mut bytes_sent = 0usize;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while old.snapshot().total().output_queued == 0 {
        assert!(std::time::Instant::now() < deadline, "no output queued");
        match stalled.write(&chunk) {
            Ok(n) => {
                bytes_sent += n;
                if n % 11 != 0 {
                    // Finish the line so the count of answers stays exact.
                    stalled.set_nonblocking(false).unwrap();
                    stalled.write_all(&chunk[n % 11..11]).unwrap();
                    stalled.set_nonblocking(true).unwrap();
                    bytes_sent += 11 - n % 11;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Err(e) => panic!("{e}"),
        }
    }
    let lines_sent = bytes_sent / 11;
    let queued = old.snapshot().total().output_queued;
    let (new, _) = take_over(&path, &events, 2, || Lines);
    assert_eq!(old.snapshot().total().handed_over, 2);
    assert!(old.shutdown());
    assert!(new.snapshot().total().output_queued > 0 || queued > 0);

    // The rest of the line: the new server sees the whole of it.
    partial.write_all(b"ne\n").unwrap();
    let mut got = [0u8; 3];
    partial.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"11\n", "\"half a line\" is 11 bytes");

    // Every answer arrives once, in order, none lost or doubled.
    stalled.set_nonblocking(false).unwrap();
    stalled.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut answers = vec![0u8; lines_sent * 3];
    stalled.read_exact(&mut answers).unwrap();
    assert!(answers.chunks(3).all(|a| a == b"10\n"));
    stalled.write_all(b"x\n").unwrap();
    let mut last = [0u8; 2];
    stalled.read_exact(&mut last).unwrap();
    assert_eq!(&last, b"1\n", "nothing more was queued than the answers");
}

#[test]
fn connections_a_service_cannot_describe_stay_and_close_gracefully() {
    let dir = TempDir::new("stuck");
    let path = dir.path("control.sock");
    let mut old = server(1, || Stuck);
    let events = old.open_control(&path, false).unwrap();
    let addr = old.addr("main").unwrap();
    let mut c = connect(addr);
    assert_eq!(echo_roundtrip(&mut c, b"before"), b"before");
    let (new, event) = take_over(&path, &events, 1, || Stuck);
    match event {
        ControlEvent::HandedOver {
            connections, kept, ..
        } => assert_eq!((connections, kept), (0, 1)),
        other => panic!("{other:?}"),
    }
    // The listeners moved; the kept connection ends with a clean close when the old one drains.
    let mut fresh = connect(addr);
    assert_eq!(echo_roundtrip(&mut fresh, b"new"), b"new");
    assert_eq!(new.snapshot().total().accepted, 1);
    assert!(old.shutdown());
    let (rest, clean) = read_to_end(&mut c);
    assert!(
        rest.is_empty() && clean,
        "a graceful close: {rest:?} {clean}"
    );
    drop((c, fresh, new));
}

#[test]
fn a_takeover_refused_for_its_format_moves_nothing() {
    let dir = TempDir::new("format");
    let path = dir.path("control.sock");
    let mut old = server(1, || Echo);
    let _events = old.open_control(&path, false).unwrap();
    let addr = old.addr("main").unwrap();
    let mut c = connect(addr);
    let err = Takeover::connect(&path, "test-lines/1")
        .err()
        .expect("refused");
    assert!(err.to_string().contains("shardnet-echo/1"), "{err}");
    assert_eq!(echo_roundtrip(&mut c, b"still here"), b"still here");
    assert_eq!(old.snapshot().handover.failed, 1);
    assert_eq!(old.snapshot().total().handed_over, 0);
}
