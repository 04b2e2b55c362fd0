//! The broker module against real brokers: a `redis-server` and a `nats-server` each test starts
//! on free ports (persistence off, a password required) and kills by pid on drop. The same test
//! bodies run for both; they drive `shardnet::broker` directly (shard-side calls in, a sink that
//! records what comes out) and ask the broker itself what is subscribed (`PUBSUB CHANNELS`,
//! NATS monitoring `/subsz?subs=1`).
//!
//! A missing `redis-server` or `nats-server` skips the test loudly outside CI and fails it under
//! `CI=true` (`common::require_tool`).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use shardnet::app::broker::{Broker, Outcome, Refusal, ShardSet, Sink, Source, Ticket};
use shardnet::config::{BrokerConfig, BrokerKind, BrokerUrl};

const SECRET: &str = "hunter2-secret";
const PREFIX: &str = "t.";
/// Bound on every wait for the broker or the module.
const WAIT: Duration = Duration::from_secs(15);

/// `N` distinct free ports: all held open until all are known, so no two are the same.
fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    std::array::from_fn(|i| held[i].local_addr().unwrap().port())
}

/// A broker server the test owns.
trait Server {
    fn kind(&self) -> BrokerKind;
    fn url(&self) -> String;
    /// Starts it (again) on its port.
    fn start(&mut self);
    /// Kills it (SIGKILL: no goodbye to the clients) and waits for it to be gone.
    fn kill(&mut self);
    /// The names it has subscriptions for (channels or subjects), from the broker itself.
    fn subscriptions(&self) -> Vec<String>;
    /// Publishes `data` on `name` as another program would (no shardnet header).
    fn publish_raw(&self, name: &str, data: &[u8]);
    /// The broker's name for `topic`.
    fn name_of(&self, topic: &str) -> String;
    /// How many connections (one per shardnet process) are subscribed to `name`.
    fn subscribers_of(&self, name: &str) -> usize {
        self.subscriptions().iter().filter(|s| *s == name).count()
    }
}

struct Proc {
    child: Option<Child>,
    log: Arc<Mutex<String>>,
}

impl Proc {
    fn spawn(cmd: &mut Command) -> Proc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the broker");
        let log = Arc::new(Mutex::new(String::new()));
        for out in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    let mut l = log.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        Proc {
            child: Some(child),
            log,
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

#[track_caller]
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    common::wait_until(WAIT, what, &mut cond);
}

/// Waits until something accepts TCP connections on `port`.
fn wait_listening(port: u16, proc_log: &Mutex<String>) {
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "broker did not listen on {port}; its output:\n{}",
            proc_log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

struct Redis {
    port: u16,
    proc: Option<Proc>,
}

impl Redis {
    fn new() -> Redis {
        let [port] = free_ports();
        Redis { port, proc: None }
    }

    fn admin(&self) -> redis::Connection {
        let url = format!("redis://:{SECRET}@127.0.0.1:{}/0", self.port);
        let c = redis::Client::open(url).unwrap();
        let con = c.get_connection_with_timeout(common::IO_TIMEOUT).unwrap();
        con.set_read_timeout(Some(common::IO_TIMEOUT)).unwrap();
        con
    }
}

impl Server for Redis {
    fn kind(&self) -> BrokerKind {
        BrokerKind::Redis
    }
    fn url(&self) -> String {
        format!("redis://:{SECRET}@127.0.0.1:{}/0", self.port)
    }
    fn start(&mut self) {
        let p = Proc::spawn(
            Command::new("redis-server")
                .args(["--port", &self.port.to_string()])
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--requirepass", SECRET]),
        );
        wait_listening(self.port, &p.log);
        self.proc = Some(p);
    }
    fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }
    fn subscriptions(&self) -> Vec<String> {
        redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .query(&mut self.admin())
            .unwrap()
    }
    fn subscribers_of(&self, name: &str) -> usize {
        let (_, n): (String, usize) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(name)
            .query(&mut self.admin())
            .unwrap();
        n
    }
    fn publish_raw(&self, name: &str, data: &[u8]) {
        let _: i64 = redis::cmd("PUBLISH")
            .arg(name)
            .arg(data)
            .query(&mut self.admin())
            .unwrap();
    }
    fn name_of(&self, topic: &str) -> String {
        format!("{PREFIX}{topic}")
    }
}

struct Nats {
    port: u16,
    monitor: u16,
    proc: Option<Proc>,
}

impl Nats {
    fn new() -> Nats {
        let [port, monitor] = free_ports();
        Nats {
            port,
            monitor,
            proc: None,
        }
    }

    fn http_get(&self, path: &str) -> String {
        let mut s = common::connect(([127, 0, 0, 1], self.monitor).into());
        write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
        let (body, _) = common::read_to_end(&mut s);
        let text = String::from_utf8_lossy(&body).to_string();
        text.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default()
    }
}

impl Server for Nats {
    fn kind(&self) -> BrokerKind {
        BrokerKind::Nats
    }
    fn url(&self) -> String {
        format!("nats://app:{SECRET}@127.0.0.1:{}", self.port)
    }
    fn start(&mut self) {
        let p = Proc::spawn(
            Command::new("nats-server")
                .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
                .args(["-m", &self.monitor.to_string()])
                .args(["--user", "app", "--pass", SECRET]),
        );
        wait_listening(self.port, &p.log);
        wait_listening(self.monitor, &p.log);
        self.proc = Some(p);
    }
    fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }
    fn subscriptions(&self) -> Vec<String> {
        let body = self.http_get("/subsz?subs=1&limit=100000");
        let v: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("/subsz is not JSON ({e}): {body}"));
        v["subscriptions_list"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s["subject"].as_str().map(str::to_string))
                    .filter(|s| !s.starts_with("$SYS") && !s.starts_with("_INBOX"))
                    .collect()
            })
            .unwrap_or_default()
    }
    /// The NATS protocol by hand: CONNECT, PUB, then PING and wait for PONG (the server has
    /// processed the PUB).
    fn publish_raw(&self, name: &str, data: &[u8]) {
        let mut s = common::connect(([127, 0, 0, 1], self.port).into());
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(line.starts_with("INFO"), "{line}");
        let connect = format!(
            "CONNECT {{\"verbose\":false,\"pedantic\":false,\"user\":\"app\",\"pass\":\"{SECRET}\"}}\r\n"
        );
        s.write_all(connect.as_bytes()).unwrap();
        s.write_all(format!("PUB {name} {}\r\n", data.len()).as_bytes())
            .unwrap();
        s.write_all(data).unwrap();
        s.write_all(b"\r\nPING\r\n").unwrap();
        loop {
            line.clear();
            assert!(r.read_line(&mut line).unwrap() > 0, "NATS closed");
            assert!(!line.starts_with("-ERR"), "{line}");
            if line.starts_with("PONG") {
                break;
            }
        }
    }
    fn name_of(&self, topic: &str) -> String {
        shardnet::app::broker::subject_for_nats(PREFIX, topic)
    }
}

/// What the broker handed out.
#[derive(Debug, Clone)]
enum Ev {
    Message(String, Vec<u8>, Vec<usize>),
    Gap(String, Vec<usize>),
    Outcome(Ticket, Outcome),
}

struct TestSink(Sender<Ev>);

fn shards_of(s: &ShardSet) -> Vec<usize> {
    s.iter().collect()
}

impl Sink for TestSink {
    fn message(&self, topic: &Arc<str>, data: &[u8], shards: &ShardSet, source: Source) {
        // Publishes of this test carry shardnet's header; only publish_raw's do not.
        let data = match source {
            Source::Shardnet => data.to_vec(),
            Source::Other => [&b"raw:"[..], data].concat(),
        };
        let _ = self
            .0
            .send(Ev::Message(topic.to_string(), data, shards_of(shards)));
    }
    fn gap(&self, topic: &Arc<str>, shards: &ShardSet) {
        let _ = self.0.send(Ev::Gap(topic.to_string(), shards_of(shards)));
    }
    fn outcome(&self, ticket: Ticket, _topic: &str, outcome: Outcome) {
        let _ = self.0.send(Ev::Outcome(ticket, outcome));
    }
}

/// Captures every log line of this test binary, to check that no secret is ever logged.
struct Capture(Mutex<String>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, r: &log::Record) {
        let mut l = self.0.lock().unwrap();
        l.push_str(&format!("{} {}\n", r.level(), r.args()));
    }
    fn flush(&self) {}
}

fn logs() -> &'static Capture {
    static CAPTURE: OnceLock<&'static Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let c: &'static Capture = Box::leak(Box::new(Capture(Mutex::new(String::new()))));
        let _ = log::set_logger(c);
        log::set_max_level(log::LevelFilter::Debug);
        c
    })
}

fn assert_no_secret_logged() {
    let l = logs().0.lock().unwrap();
    assert!(!l.contains(SECRET), "a secret reached the log:\n{l}");
}

struct Under {
    broker: Broker,
    events: Receiver<Ev>,
    /// Events read while looking for others.
    seen: Vec<Ev>,
}

fn config(url: &str, kind: BrokerKind, tweak: impl FnOnce(&mut BrokerConfig)) -> BrokerConfig {
    let mut c = BrokerConfig {
        kind,
        url: BrokerUrl::new(url).unwrap(),
        prefix: PREFIX.into(),
        reconnect_min: Duration::from_millis(20),
        reconnect_max: Duration::from_millis(200),
        publish_timeout: Duration::from_secs(3),
        ..BrokerConfig::default()
    };
    tweak(&mut c);
    c
}

fn start(c: &BrokerConfig, shards: usize) -> Under {
    logs();
    let (tx, rx) = crossbeam_channel::unbounded();
    let broker = Broker::start(c, shards, Arc::new(TestSink(tx))).expect("broker starts");
    Under {
        broker,
        events: rx,
        seen: Vec::new(),
    }
}

impl Under {
    /// The next event that `want` picks (others are kept in `seen`), within `WAIT`.
    #[track_caller]
    fn next(&mut self, what: &str, mut want: impl FnMut(&Ev) -> bool) -> Ev {
        if let Some(i) = self.seen.iter().position(&mut want) {
            return self.seen.remove(i);
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(ev) if want(&ev) => return ev,
                Ok(ev) => self.seen.push(ev),
                Err(_) => panic!("timed out waiting for {what}; seen: {:?}", self.seen),
            }
        }
    }

    fn outcome(&mut self, id: u64) -> Outcome {
        match self.next(
            &format!("the outcome of publish {id}"),
            |e| matches!(e, Ev::Outcome(t, _) if t.id == id),
        ) {
            Ev::Outcome(_, o) => o,
            _ => unreachable!(),
        }
    }

    /// Publishes and returns the outcome, however it comes (at once or through the sink).
    fn publish(&mut self, id: u64, topic: &str, data: &[u8]) -> Outcome {
        let ticket = Ticket {
            shard: 0,
            token: 0,
            id,
        };
        match self.broker.handle().publish(ticket, topic, data.to_vec()) {
            Err(r) => Err(r),
            Ok(()) => self.outcome(id),
        }
    }

    fn message(&mut self, topic: &str, data: &[u8]) -> Vec<usize> {
        match self.next(
            &format!("the message {:?} on {topic}", String::from_utf8_lossy(data)),
            |e| matches!(e, Ev::Message(t, d, _) if t == topic && d == data),
        ) {
            Ev::Message(_, _, shards) => shards,
            _ => unreachable!(),
        }
    }

    fn gap(&mut self, topic: &str) -> Vec<usize> {
        match self.next(
            &format!("a gap notice for {topic}"),
            |e| matches!(e, Ev::Gap(t, _) if t == topic),
        ) {
            Ev::Gap(_, shards) => shards,
            _ => unreachable!(),
        }
    }

    fn wait_up(&self, up: bool) {
        let h = self.broker.handle();
        wait_for(
            if up {
                "the broker up"
            } else {
                "the broker down"
            },
            || h.is_up() == up,
        );
    }
}

#[track_caller]
fn wait_subscribed(server: &dyn Server, topic: &str, subscribed: bool) {
    let name = server.name_of(topic);
    wait_for(
        &format!("{name} subscribed = {subscribed} on the broker"),
        || server.subscriptions().contains(&name) == subscribed,
    );
}

/// Interest drives subscriptions: subscribed while any shard wants the topic, not before, not
/// after; a message goes to the shards that want it only.
fn interest(server: &mut dyn Server) {
    server.start();
    let mut u = start(&config(&server.url(), server.kind(), |_| {}), 3);
    u.wait_up(true);
    let h = u.broker.handle();
    let (mut s0, mut s1) = (h.interest(0), h.interest(1));
    assert!(server.subscriptions().is_empty());
    s0.set("room.1", true);
    wait_subscribed(server, "room.1", true);
    s1.set("room.1", true);
    s0.set("room.1", false);
    // Shard 1 still wants it: a message goes there only.
    match u.publish(1, "room.1", b"{\"n\":1}") {
        Ok(a) if server.kind() == BrokerKind::Redis => assert_eq!(a.receivers, Some(1)),
        Ok(a) => assert_eq!(a.receivers, None),
        Err(e) => panic!("refused: {e}"),
    }
    assert_eq!(u.message("room.1", b"{\"n\":1}"), vec![1]);
    assert!(server.subscriptions().contains(&server.name_of("room.1")));
    // A topic nobody here wants is not received at all.
    let a = u.publish(2, "nobody", b"2").expect("accepted");
    if server.kind() == BrokerKind::Redis {
        assert_eq!(a.receivers, Some(0));
    }
    // Another program's message, without shardnet's header, arrives as its data.
    server.publish_raw(&server.name_of("room.1"), b"{\"from\":\"outside\"}");
    assert_eq!(u.message("room.1", b"raw:{\"from\":\"outside\"}"), vec![1]);
    // Topics that NATS would take as wildcards or tokens still work.
    s0.set("a b.*", true);
    wait_subscribed(server, "a b.*", true);
    u.publish(3, "a b.*", b"3").expect("accepted");
    assert_eq!(u.message("a b.*", b"3"), vec![0]);
    // Quiet for longer than the idle ping: the connections stay as they are (no reconnection,
    // no gap notice), and delivery goes on.
    std::thread::sleep(Duration::from_millis(1300));
    u.publish(4, "a b.*", b"4")
        .expect("accepted after a quiet second");
    assert_eq!(u.message("a b.*", b"4"), vec![0]);
    assert_eq!(u.broker.metrics().snapshot().reconnects, 0);
    assert!(
        u.seen.iter().all(|e| !matches!(e, Ev::Gap(..))),
        "{:?}",
        u.seen
    );
    s1.set("room.1", false);
    wait_subscribed(server, "room.1", false);
    let stats = u.broker.metrics().snapshot();
    wait_for("the topics gauge at 1", || {
        u.broker.metrics().snapshot().topics == 1
    });
    assert!(stats.received >= 3 && stats.published >= 3, "{stats:?}");
    assert!(
        stats.latency_count >= 2,
        "own publishes are timed: {stats:?}"
    );
    assert!(stats.up);
    assert!(u
        .seen
        .iter()
        .all(|e| !matches!(e, Ev::Message(t, ..) if t == "nobody")));
    assert!(u.broker.shutdown(WAIT));
    assert_no_secret_logged();
}

/// Every publish gets exactly one outcome; a full queue refuses at once; a message the broker
/// refuses is refused with the reason.
fn outcomes(server: &mut dyn Server) {
    server.start();
    let c = config(&server.url(), server.kind(), |c| c.max_pending = 2);
    let mut u = start(&c, 1);
    u.wait_up(true);
    let h = u.broker.handle();
    let mut interest = h.interest(0);
    interest.set("burst", true);
    wait_subscribed(server, "burst", true);
    let total = 2000u64;
    let mut refused_at_once = 0;
    let mut queued = Vec::new();
    for id in 0..total {
        let data = format!("{id}").into_bytes();
        match h.publish(
            Ticket {
                shard: 0,
                token: 0,
                id,
            },
            "burst",
            data,
        ) {
            Ok(()) => queued.push(id),
            Err(Refusal::QueueFull) => refused_at_once += 1,
            Err(e) => panic!("publish {id}: unexpected refusal {e}"),
        }
    }
    assert!(
        refused_at_once > 0,
        "a queue of 2 overflowed by a burst of {total}"
    );
    let mut accepted = 0;
    for &id in &queued {
        match u.outcome(id) {
            Ok(_) => accepted += 1,
            Err(e) => panic!("publish {id} refused: {e}"),
        }
    }
    // Exactly one outcome each: nothing more arrives.
    std::thread::sleep(Duration::from_millis(100));
    while let Ok(ev) = u.events.try_recv() {
        assert!(!matches!(ev, Ev::Outcome(..)), "a second outcome: {ev:?}");
    }
    let s = u.broker.metrics().snapshot();
    assert_eq!(s.published, accepted);
    let by_reason: std::collections::HashMap<_, _> = s.refused_by_reason().collect();
    assert_eq!(by_reason["queue_full"], refused_at_once);
    assert_eq!(accepted + refused_at_once, total);
    if server.kind() == BrokerKind::Nats {
        // nats-server's max_payload is 1MiB by default.
        let big = vec![b'x'; 2 << 20];
        let r = u.publish(total, "burst", &big);
        assert!(
            matches!(r, Err(Refusal::TooLarge { max, .. }) if max > 0),
            "{r:?}"
        );
    }
    assert!(u.broker.shutdown(WAIT));
    // After shutdown, publishes are refused at once.
    let r = h.publish(
        Ticket {
            shard: 0,
            token: 0,
            id: 99_999,
        },
        "burst",
        b"x".to_vec(),
    );
    assert_eq!(r, Err(Refusal::ShuttingDown));
    assert_no_secret_logged();
}

/// The broker killed and restarted mid-stream: refusals (not hangs) during the outage, then a
/// gap notice per wanted topic, resubscription, and delivery again.
fn outage(server: &mut dyn Server) {
    server.start();
    let mut u = start(
        &config(&server.url(), server.kind(), |c| {
            c.publish_timeout = Duration::from_millis(500)
        }),
        2,
    );
    u.wait_up(true);
    let h = u.broker.handle();
    let (mut s0, mut s1) = (h.interest(0), h.interest(1));
    s0.set("live", true);
    s1.set("live", true);
    s1.set("other", true);
    wait_subscribed(server, "live", true);
    wait_subscribed(server, "other", true);
    for i in 0..10u64 {
        let d = format!("before-{i}").into_bytes();
        u.publish(i, "live", &d)
            .expect("accepted before the outage");
        assert_eq!(u.message("live", &d), vec![0, 1]);
    }
    server.kill();
    u.wait_up(false);
    // During the outage every publish is refused, each within the publish timeout.
    for i in 100..110u64 {
        let t0 = Instant::now();
        let r = u.publish(i, "live", b"during");
        assert!(
            matches!(r, Err(Refusal::Down | Refusal::Lost | Refusal::Timeout)),
            "publish during the outage: {r:?}"
        );
        assert!(t0.elapsed() < Duration::from_secs(3), "answered in time");
    }
    // Interest changes during the outage are kept and applied after it.
    s1.set("other", false);
    s0.set("late", true);
    server.start();
    u.wait_up(true);
    assert_eq!(u.gap("live"), vec![0, 1]);
    assert_eq!(u.gap("late"), vec![0]);
    wait_subscribed(server, "live", true);
    wait_subscribed(server, "late", true);
    wait_subscribed(server, "other", false);
    // Publishes right after the reconnection may still meet the old connection's state; the
    // first accepted one comes back, and every one after it.
    let mut first = None;
    for i in 200..300u64 {
        let d = format!("after-{i}").into_bytes();
        if u.publish(i, "live", &d).is_ok() {
            first = Some(d);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let first = first.expect("publishes accepted again after the reconnection");
    assert_eq!(u.message("live", &first), vec![0, 1]);
    for i in 300..310u64 {
        let d = format!("after-{i}").into_bytes();
        u.publish(i, "live", &d).expect("accepted after the outage");
        assert_eq!(u.message("live", &d), vec![0, 1]);
    }
    let s = u.broker.metrics().snapshot();
    assert!(s.reconnects >= 1, "{s:?}");
    assert!(s.gaps >= 2, "{s:?}");
    assert!(s.refused_total() >= 10, "{s:?}");
    assert!(s.up);
    assert!(u.broker.shutdown(WAIT));
    assert_no_secret_logged();
}

/// No broker at first: the module runs, says it is down, refuses publishes; when the broker
/// appears it connects, subscribes what is wanted (with a gap notice) and delivers.
fn never_started(server: &mut dyn Server) {
    let mut u = start(&config(&server.url(), server.kind(), |_| {}), 2);
    let h = u.broker.handle();
    wait_for("failed connection attempts counted", || {
        u.broker.metrics().snapshot().connect_failures >= 2
    });
    assert!(!h.is_up());
    let mut s1 = h.interest(1);
    s1.set("early", true);
    assert_eq!(u.publish(1, "early", b"1"), Err(Refusal::Down));
    server.start();
    u.wait_up(true);
    assert_eq!(u.gap("early"), vec![1]);
    wait_subscribed(server, "early", true);
    u.publish(2, "early", b"2")
        .expect("accepted once the broker is up");
    assert_eq!(u.message("early", b"2"), vec![1]);
    let s = u.broker.metrics().snapshot();
    assert_eq!(
        s.refused_by_reason().find(|(l, _)| *l == "down").unwrap().1,
        1
    );
    assert!(u.broker.shutdown(WAIT));
    assert_no_secret_logged();
}

macro_rules! for_both {
    ($($body:ident)*) => {
        mod redis_server {
            use super::*;
            $(#[test]
            fn $body() {
                if common::require_tool("redis-server", "apt-get install redis-server") {
                    super::$body(&mut Redis::new());
                }
            })*
        }
        mod nats_server {
            use super::*;
            $(#[test]
            fn $body() {
                if common::require_tool("nats-server", "apt-get install nats-server") {
                    super::$body(&mut Nats::new());
                }
            })*
        }
    };
}

for_both!(
    interest outcomes outage never_started
    cluster_delivers_every_message_once_in_order processes_follow_interest
    processes_ride_out_an_outage processes_wait_for_a_broker_that_is_not_there
    processes_answer_pipelined_publishes_in_order
);

/// `config check` prints the effective configuration with the password as `***`.
#[test]
fn config_check_never_prints_the_password() {
    let dir = std::env::temp_dir().join(format!("shardnet-broker-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("c.toml");
    std::fs::write(
        &path,
        format!(
            "[broker]\nkind = \"redis\"\nurl = \"redis://:{SECRET}@10.1.2.3:6379/0\"\n\
             [[listener]]\nname = \"h\"\naddr = \"127.0.0.1:0\"\nservice = \"http\"\n"
        ),
    )
    .unwrap();
    let out = Command::new(common::bin())
        .args(["config", "check"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("url = \"redis://:***@10.1.2.3:6379/0\""),
        "{text}"
    );
    assert!(!text.contains(SECRET), "{text}");
    // And a wrong url is refused without echoing what it holds.
    std::fs::write(
        &path,
        format!(
            "[broker]\nkind = \"nats\"\nurl = \"redis://:{SECRET}@10.1.2.3:6379/0\"\n\
             [[listener]]\nname = \"h\"\naddr = \"127.0.0.1:0\"\n"
        ),
    )
    .unwrap();
    let out = Command::new(common::bin())
        .args(["config", "check"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(":3:1: key `broker.url`: scheme `redis://` does not match"),
        "{err}"
    );
    assert!(!err.contains(SECRET), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- shardnet processes on one broker ------------------------------------------------------

/// A shardnet process's configuration: 2 shards, one HTTP listener with a pub/sub route.
fn process_toml(url: &str, kind: BrokerKind) -> String {
    format!(
        "[server]\nshards = 2\npin = false\nstats_interval = \"300ms\"\nshutdown_timeout = \"2s\"\n\
         [broker]\nkind = \"{}\"\nurl = \"{url}\"\nprefix = \"{PREFIX}\"\n\
         reconnect_min = \"20ms\"\nreconnect_max = \"200ms\"\npublish_timeout = \"1s\"\n\
         [[listener]]\nname = \"http\"\naddr = \"127.0.0.1:0\"\nservice = \"http\"\n\
         [[listener.websocket]]\npath = \"/ws\"\nmode = \"pubsub\"\n",
        kind.as_str()
    )
}

/// A process connected to the broker (its /healthz says ok): a client that subscribes before
/// the first connection would rightly get a gap notice when it comes.
fn spawn_process(server: &dyn Server) -> common::Child {
    let p = spawn_unconnected(server);
    let addr = p.addr("http");
    wait_for("the process connected to the broker", || {
        http_get(addr, "/healthz").1 == "ok\n"
    });
    p
}

fn spawn_unconnected(server: &dyn Server) -> common::Child {
    common::Child::spawn(&process_toml(&server.url(), server.kind()), "")
}

/// A WebSocket client of the pub/sub route, reading frames out of its own buffer.
struct Ws {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Ws {
    fn connect(addr: std::net::SocketAddr) -> Ws {
        let mut s = common::connect(addr);
        let req = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
        let (status, head, _) = common::http_exchange(&mut s, req.as_bytes());
        assert_eq!(status, 101, "{head}");
        Ws { s, buf: Vec::new() }
    }

    fn send(&mut self, v: serde_json::Value) {
        let mut f = Vec::new();
        shardnet::service::ws::write_masked(
            &mut f,
            shardnet::service::ws::OP_TEXT,
            true,
            v.to_string().as_bytes(),
            [1, 2, 3, 4],
        );
        self.s.write_all(&f).unwrap();
    }

    /// The next text message, or `None` if none comes within `within`.
    fn recv_within(&mut self, within: Duration) -> Option<serde_json::Value> {
        let deadline = Instant::now() + within;
        loop {
            if let Some((op, _, range, used)) =
                shardnet::service::ws::decode_server_frame(&self.buf).unwrap()
            {
                let payload = self.buf[range].to_vec();
                self.buf.drain(..used);
                if op != shardnet::service::ws::OP_TEXT {
                    continue; // pings
                }
                return Some(serde_json::from_slice(&payload).unwrap());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.s.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 16384];
            match self.s.read(&mut chunk) {
                Ok(0) => panic!("the server closed a WebSocket client"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return None
                }
                Err(e) => panic!("WebSocket read: {e}"),
            }
        }
    }

    #[track_caller]
    fn recv(&mut self) -> serde_json::Value {
        self.recv_within(WAIT).expect("a message within the wait")
    }

    fn subscribe(&mut self, topic: &str) {
        self.send(serde_json::json!({"op": "subscribe", "topic": topic}));
        let ack = self.recv();
        assert_eq!(ack["ok"], "subscribe", "{ack}");
    }
}

/// `POST /publish/{topic}` on a keep-alive connection: (status, body).
fn http_publish(s: &mut TcpStream, topic: &str, body: &str) -> (u16, String) {
    let req = format!(
        "POST /publish/{topic} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (status, _, body) = common::http_exchange(s, req.as_bytes());
    (status, String::from_utf8_lossy(&body).to_string())
}

fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = common::connect(addr);
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    let (status, _, body) = common::http_exchange(&mut s, req.as_bytes());
    (status, String::from_utf8_lossy(&body).to_string())
}

/// The value of the metric family `name` (summed over its samples) in `/metrics`.
fn metric(addr: std::net::SocketAddr, name: &str) -> u64 {
    let (_, text) = http_get(addr, "/metrics");
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[track_caller]
fn assert_no_secret_in(procs: &[common::Child]) {
    for p in procs {
        let log = p.log();
        assert!(
            !log.contains(SECRET),
            "a secret reached a process log:\n{log}"
        );
    }
}

/// Three processes of 2 shards on one broker, 300 subscribers spread over them, publishes from
/// every process over WebSocket and HTTP at once: every subscriber gets every message of its
/// topics exactly once, and all subscribers of a topic see them in the same order.
fn cluster_delivers_every_message_once_in_order(server: &mut dyn Server) {
    server.start();
    let procs: Vec<common::Child> = (0..3).map(|_| spawn_process(server)).collect();
    let addrs: Vec<_> = procs.iter().map(|p| p.addr("http")).collect();
    let topics = ["a", "b", "c"];
    // Subscriber i: process i % 3, topic i % 3 (and every fifth the next topic too).
    let mut subs: Vec<(Ws, Vec<&str>)> = (0..300)
        .map(|i| {
            let mut ws = Ws::connect(addrs[i % 3]);
            let mut mine = vec![topics[(i / 3) % 3]];
            if i % 5 == 0 {
                mine.push(topics[(i / 3 + 1) % 3]);
            }
            for t in &mine {
                ws.subscribe(t);
            }
            (ws, mine)
        })
        .collect();
    for t in topics {
        let name = server.name_of(t);
        wait_for(&format!("3 processes subscribed to {name}"), || {
            server.subscribers_of(&name) == 3
        });
    }
    // Each process publishes every topic 4 times over WebSocket and 4 times over HTTP, all
    // processes at once.
    let per = 4;
    std::thread::scope(|scope| {
        for (p, &addr) in addrs.iter().enumerate() {
            let kind = server.kind();
            scope.spawn(move || {
                let mut ws = Ws::connect(addr);
                let mut http = common::connect(addr);
                for n in 0..per {
                    for t in topics {
                        ws.send(serde_json::json!({
                            "op": "publish", "topic": t, "data": {"p": p, "via": "ws", "n": n}
                        }));
                        let body = serde_json::json!({"p": p, "via": "http", "n": n}).to_string();
                        let (status, answer) = http_publish(&mut http, t, &body);
                        assert_eq!(status, 200, "{answer}");
                        let a: serde_json::Value = serde_json::from_str(&answer).unwrap();
                        assert_eq!(a["topic"], t);
                        assert_eq!(a["broker"], kind.as_str());
                        if kind == BrokerKind::Redis {
                            assert_eq!(a["processes"], 3, "{answer}");
                        } else {
                            assert!(a["processes"].is_null(), "{answer}");
                        }
                    }
                }
                // No refusal came back to the WebSocket publisher.
                assert_eq!(ws.recv_within(Duration::from_millis(200)), None);
            });
        }
    });
    let expected_per_topic = 3 * per * 2;
    let mut order: std::collections::HashMap<&str, Vec<serde_json::Value>> = Default::default();
    for (i, (ws, mine)) in subs.iter_mut().enumerate() {
        let mut got: std::collections::HashMap<&str, Vec<serde_json::Value>> = Default::default();
        for _ in 0..expected_per_topic * mine.len() {
            let m = ws.recv();
            let t = topics
                .iter()
                .find(|t| m["topic"] == **t)
                .unwrap_or_else(|| panic!("subscriber {i}: unexpected {m}"));
            assert!(
                mine.contains(t),
                "subscriber {i} got {m} for a topic it did not want"
            );
            got.entry(*t).or_default().push(m["data"].clone());
        }
        for t in mine.iter() {
            // Redis hands every subscriber one order; NATS keeps each publisher's order only
            // (two processes' publishes may interleave differently for different
            // subscribers), so with NATS the order is compared per publishing process.
            let seq: Vec<serde_json::Value> = match server.kind() {
                BrokerKind::Redis => got[t].clone(),
                _ => {
                    let mut by_p = got[t].clone();
                    by_p.sort_by_key(|v| v["p"].as_u64());
                    by_p
                }
            };
            let seq = &seq;
            let unique: std::collections::HashSet<String> =
                seq.iter().map(|v| v.to_string()).collect();
            assert_eq!(
                unique.len(),
                expected_per_topic,
                "subscriber {i}: duplicates on {t}"
            );
            match order.get(t) {
                Some(first) => assert_eq!(first, seq, "subscriber {i}: another order on {t}"),
                None => {
                    order.insert(t, seq.clone());
                }
            }
        }
    }
    // Nothing more than that: after a pause for stragglers, no subscriber has anything left.
    std::thread::sleep(Duration::from_millis(200));
    for (i, (ws, _)) in subs.iter_mut().enumerate() {
        let extra = ws.recv_within(Duration::from_millis(1));
        assert_eq!(extra, None, "subscriber {i}: more than expected");
    }
    assert_no_secret_in(&procs);
    let received: u64 = addrs
        .iter()
        .map(|&a| metric(a, "shardnet_broker_received_total"))
        .sum();
    assert_eq!(
        received,
        3 * (3 * expected_per_topic) as u64,
        "each process got each message once"
    );
}

/// Publishes pipelined on one keep-alive connection all go to the broker without waiting for
/// each other's answers, are answered in order, and reach the subscriber in order; a request of
/// another kind pipelined behind them is answered after them. With the broker gone, pipelined
/// publishes get their refusals in order, and the connection stays usable.
fn processes_answer_pipelined_publishes_in_order(server: &mut dyn Server) {
    server.start();
    let p = spawn_process(server);
    let addr = p.addr("http");
    let mut sub = Ws::connect(addr);
    sub.subscribe("pipe");
    let name = server.name_of("pipe");
    wait_for(&format!("the process subscribed to {name}"), || {
        server.subscribers_of(&name) == 1
    });
    let n = 300;
    let mut burst = Vec::new();
    for i in 0..n {
        let body = format!("{{\"n\":{i}}}");
        burst.extend_from_slice(
            format!(
                "POST /publish/pipe HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
    }
    burst.extend_from_slice(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut http = common::connect(addr);
    http.write_all(&burst).unwrap();
    for i in 0..n {
        let (status, head, body) = common::read_response(&mut http, false);
        let body = String::from_utf8_lossy(&body);
        assert_eq!(status, 200, "publish {i}: {head}{body}");
        assert!(body.contains("\"topic\":\"pipe\""), "publish {i}: {body}");
    }
    let (status, _, body) = common::read_response(&mut http, false);
    assert_eq!(
        (status, &body[..]),
        (200, &b"ok\n"[..]),
        "the GET behind them"
    );
    for i in 0..n {
        let m = sub.recv();
        assert_eq!(m["data"]["n"], i, "message {i}: {m}");
    }
    assert_eq!(sub.recv_within(Duration::from_millis(100)), None);
    // Broker gone: refused in order, then the GET behind them, on the same connection.
    server.kill();
    wait_for("the process saw the broker go", || {
        http_get(addr, "/healthz").1.starts_with("degraded")
    });
    let mut burst = Vec::new();
    for _ in 0..5 {
        burst.extend_from_slice(
            b"POST /publish/pipe HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
        );
    }
    burst.extend_from_slice(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    http.write_all(&burst).unwrap();
    for i in 0..5 {
        let (status, head, body) = common::read_response(&mut http, false);
        assert_eq!(
            status,
            503,
            "refused publish {i}: {head}{}",
            String::from_utf8_lossy(&body)
        );
    }
    let (status, _, body) = common::read_response(&mut http, false);
    assert_eq!(status, 200);
    assert!(
        body.starts_with(b"degraded"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert_no_secret_in(&[p]);
}

/// A process is subscribed to a topic on the broker while it has local subscribers of it,
/// whichever shard they are on, and no longer once the last leaves (unsubscribe or close).
fn processes_follow_interest(server: &mut dyn Server) {
    server.start();
    let procs = [spawn_process(server)];
    let addr = procs[0].addr("http");
    let name = server.name_of("x");
    // Two subscribers: round-robin puts them on the two shards.
    let (mut one, mut two) = (Ws::connect(addr), Ws::connect(addr));
    one.subscribe("x");
    wait_for("subscribed on the broker", || {
        server.subscribers_of(&name) == 1
    });
    two.subscribe("x");
    one.send(serde_json::json!({"op": "unsubscribe", "topic": "x"}));
    assert_eq!(one.recv()["ok"], "unsubscribe");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        server.subscribers_of(&name),
        1,
        "the other shard still wants it"
    );
    drop(two); // closing is leaving
    wait_for("unsubscribed on the broker", || {
        server.subscribers_of(&name) == 0
    });
    wait_for("the topics gauge at 0", || {
        metric(addr, "shardnet_broker_topics") == 0
    });
    // The periodic log line carries the broker's part.
    let line = format!("broker={} up=1 reconnects=0", server.kind().as_str());
    wait_for("the broker in the stats log line", || {
        procs[0].log().contains(&line)
    });
    assert_no_secret_in(&procs);
}

/// The broker killed and restarted in the middle of a publish stream: no process exits, clients
/// stay connected, publishes meanwhile get the clear error, every subscriber gets the gap
/// notice, delivery resumes and the metrics count the outage.
fn processes_ride_out_an_outage(server: &mut dyn Server) {
    server.start();
    let mut procs = vec![spawn_process(server), spawn_process(server)];
    let addrs: Vec<_> = procs.iter().map(|p| p.addr("http")).collect();
    let mut subs: Vec<Ws> = (0..10).map(|i| Ws::connect(addrs[i % 2])).collect();
    for s in &mut subs {
        s.subscribe("live");
    }
    let name = server.name_of("live");
    wait_for("both processes subscribed", || {
        server.subscribers_of(&name) == 2
    });
    let mut http = common::connect(addrs[0]);
    let mut publisher = Ws::connect(addrs[1]);
    for n in 0..5 {
        let (status, body) = http_publish(&mut http, "live", &format!("{{\"n\":{n}}}"));
        assert_eq!(status, 200, "{body}");
    }
    for s in &mut subs {
        for n in 0..5 {
            assert_eq!(s.recv()["data"]["n"], n);
        }
    }
    server.kill();
    wait_for("/healthz says the broker is down", || {
        http_get(addrs[0], "/healthz") == (200, "degraded: broker unavailable (publishes are refused; subscriptions resume when it is back)\n".into())
    });
    // Publishes during the outage: 503 with the reason, an error message on WebSocket.
    let (status, body) = http_publish(&mut http, "live", "{\"n\":-1}");
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("broker: "), "{body}");
    wait_for("the second process sees the outage", || {
        http_get(addrs[1], "/healthz").1.starts_with("degraded")
    });
    publisher.send(serde_json::json!({"op": "publish", "topic": "live", "data": -2}));
    let e = publisher.recv();
    assert_eq!(
        (e["op"].as_str(), e["topic"].as_str()),
        (Some("publish"), Some("live")),
        "{e}"
    );
    assert!(e["error"].as_str().unwrap().contains("broker"), "{e}");
    for p in &mut procs {
        assert!(
            p.child.try_wait().unwrap().is_none(),
            "a process exited: {}",
            p.log()
        );
    }
    server.start();
    // Every subscriber: the gap notice, and nothing of the outage.
    for s in &mut subs {
        let g = s.recv();
        assert_eq!(g, serde_json::json!({"topic": "live", "gap": true}));
    }
    wait_for("both processes subscribed again", || {
        server.subscribers_of(&name) == 2
    });
    wait_for("/healthz ok again on both processes", || {
        addrs.iter().all(|&a| http_get(a, "/healthz").1 == "ok\n")
    });
    let (status, body) = http_publish(&mut http, "live", "{\"n\":100}");
    assert_eq!(status, 200, "{body}");
    for s in &mut subs {
        assert_eq!(s.recv()["data"]["n"], 100);
    }
    for &a in &addrs {
        assert!(metric(a, "shardnet_broker_reconnects_total") >= 1);
        assert!(metric(a, "shardnet_broker_gaps_total") >= 1);
        assert_eq!(metric(a, "shardnet_broker_up"), 1);
    }
    assert!(metric(addrs[0], "shardnet_broker_refused_total") >= 1);
    assert!(metric(addrs[1], "shardnet_broker_refused_total") >= 1);
    assert_no_secret_in(&procs);
}

/// No broker at first: the process starts, says so, refuses publishes; when the broker
/// appears, it subscribes what its clients want and delivers.
fn processes_wait_for_a_broker_that_is_not_there(server: &mut dyn Server) {
    let procs = [spawn_unconnected(server)];
    let addr = procs[0].addr("http");
    assert!(http_get(addr, "/healthz").1.starts_with("degraded"));
    let mut sub = Ws::connect(addr);
    sub.subscribe("early");
    let mut http = common::connect(addr);
    let (status, body) = http_publish(&mut http, "early", "1");
    assert_eq!(
        (status, body.as_str()),
        (503, "broker: broker unavailable\n")
    );
    server.start();
    wait_for("/healthz ok once the broker is there", || {
        http_get(addr, "/healthz").1 == "ok\n"
    });
    assert_eq!(
        sub.recv(),
        serde_json::json!({"topic": "early", "gap": true})
    );
    let name = server.name_of("early");
    wait_for("subscribed on the broker", || {
        server.subscribers_of(&name) == 1
    });
    let (status, body) = http_publish(&mut http, "early", "2");
    assert_eq!(status, 200, "{body}");
    assert_eq!(sub.recv(), serde_json::json!({"topic": "early", "data": 2}));
    assert!(metric(addr, "shardnet_broker_connect_failures_total") >= 1);
    assert_no_secret_in(&procs);
}
