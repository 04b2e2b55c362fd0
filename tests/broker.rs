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

for_both!(interest outcomes outage never_started);

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
