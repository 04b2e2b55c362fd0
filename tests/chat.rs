//! The chat example (`examples/chat/service.rs`): rooms whose members sit on different shards.

mod common;
#[path = "../examples/chat/service.rs"]
mod service;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use shardnet::server::{ListenerSpec, Pinning, Server};

use common::{connect, wait_until, IO_TIMEOUT};

struct Client {
    r: BufReader<TcpStream>,
    shard: usize,
}

impl Client {
    fn new(server: &Server) -> Client {
        let mut r = BufReader::new(connect(server.addr("chat").unwrap()));
        let hello = line(&mut r);
        // "hello guestS-N: shard S of T, room lobby"
        let shard = hello
            .split("shard ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("unexpected greeting {hello:?}"));
        assert!(hello.ends_with(" of 2, room lobby"), "{hello}");
        Client { r, shard }
    }

    fn send(&mut self, text: &str) {
        self.r.get_mut().write_all(text.as_bytes()).unwrap();
        self.r.get_mut().write_all(b"\n").unwrap();
    }

    /// Sends a command and checks its one-line answer.
    fn ask(&mut self, text: &str, answer: &str) {
        self.send(text);
        assert_eq!(line(&mut self.r), answer, "answer to {text:?}");
    }

    fn next(&mut self) -> String {
        line(&mut self.r)
    }
}

fn line(r: &mut BufReader<TcpStream>) -> String {
    let mut s = String::new();
    r.read_line(&mut s).expect("a line before the timeout");
    s.trim_end_matches('\n').to_string()
}

fn start() -> Server {
    Server::builder()
        .listener(ListenerSpec::new("chat", "127.0.0.1:0".parse().unwrap()))
        .shards(2)
        .pinning(Pinning::Off)
        .start(|info, peers| service::Chat::new(&info, peers))
        .expect("server starts")
}

fn counter(server: &Server, name: &str) -> u64 {
    let snap = server.snapshot();
    let f = snap.registered.iter().find(|f| f.name == name).unwrap();
    f.values.iter().flatten().sum()
}

#[test]
fn messages_reach_a_room_on_every_shard_and_no_other_room() {
    let server = start();
    let mut clients: Vec<Client> = (0..4).map(|_| Client::new(&server)).collect();
    // Round robin over two shards: two clients on each.
    let shards: Vec<usize> = clients.iter().map(|c| c.shard).collect();
    assert_eq!(shards.iter().filter(|&&s| s == 0).count(), 2, "{shards:?}");
    let (ada, rest) = clients.split_first_mut().unwrap();
    let bob_at = rest.iter().position(|c| c.shard != ada.shard).unwrap();
    let cy_at = rest.iter().position(|c| c.shard == ada.shard).unwrap();
    let other_at = (0..3).find(|&i| i != bob_at && i != cy_at).unwrap();
    ada.ask("/nick ada", "ok nick ada");
    ada.ask("/join rust", "ok join rust");
    rest[bob_at].ask("/nick bob", "ok nick bob");
    rest[bob_at].ask("/join rust", "ok join rust");
    rest[cy_at].ask("/join rust", "ok join rust");
    // The fourth stays in the lobby.
    ada.send("hello, shards");
    assert_eq!(rest[bob_at].next(), "ada: hello, shards");
    assert_eq!(rest[cy_at].next(), "ada: hello, shards");
    rest[bob_at].send("hi ada");
    assert_eq!(ada.next(), "bob: hi ada");
    assert_eq!(rest[cy_at].next(), "bob: hi ada");
    // The lobby heard nothing: its next line is the answer to its own command.
    rest[other_at].ask("/nick quiet", "ok nick quiet");
    assert_eq!(counter(&server, "chat_said"), 2);
    wait_until(IO_TIMEOUT, "four deliveries counted", || {
        counter(&server, "chat_delivered") == 4
    });
    // Leaving a room: bob joins another and hears nothing more from rust.
    rest[bob_at].ask("/join go", "ok join go");
    ada.send("still here?");
    assert_eq!(rest[cy_at].next(), "ada: still here?");
    rest[bob_at].ask("/nick bob2", "ok nick bob2");
    wait_until(IO_TIMEOUT, "five deliveries counted", || {
        counter(&server, "chat_delivered") == 5
    });
    assert_eq!(counter(&server, "chat_lost"), 0);
}

#[test]
fn commands_are_checked_and_long_lines_close() {
    let server = start();
    let mut c = Client::new(&server);
    c.ask("/dance", "error: unknown command /dance");
    c.ask(
        "/nick not valid!",
        "error: /nick takes a name of 1 to 32 letters, digits, _ or -",
    );
    c.ask(
        "/join",
        "error: /join takes a name of 1 to 32 letters, digits, _ or -",
    );
    c.send(&"x".repeat(service::MAX_LINE + 1));
    assert_eq!(c.next(), "error: line too long (at most 1024 bytes)");
    let (_, clean) = common::read_to_end(c.r.get_mut());
    assert!(clean, "closed after the error");
    drop(c);
    let mut q = Client::new(&server);
    q.ask("/quit", "bye");
    let (rest, clean) = common::read_to_end(q.r.get_mut());
    assert!(rest.is_empty() && clean);
    drop(q);
    wait_until(Duration::from_secs(10), "both closed", || {
        server.snapshot().total().open == 0
    });
}
