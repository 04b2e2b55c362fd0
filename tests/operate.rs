//! Operating the server: SIGHUP reload, zero-downtime restart on SO_REUSEPORT, reuseport
//! balancing, `shardnet tune`.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;

fn echo_config(idle: &str, extra_server: &str, port: u16, reuse: bool) -> String {
    format!(
        "[server]\nshards = 2\npin = false\nstats_interval = \"0s\"\nshutdown_timeout = \"5s\"\n{extra_server}\n\
         [limits]\nidle_timeout = \"{idle}\"\n\
         [[listener]]\nname = \"echo\"\naddr = \"127.0.0.1:{port}\"\nservice = \"echo\"\nreuse_port = {reuse}\n"
    )
}

#[test]
fn sighup_reload_applies_live_keys_refuses_restart_keys_and_survives_a_bad_file() {
    let mut server = Child::spawn(&echo_config("60s", "", 0, false), "");
    let addr = server.addr("echo");
    // The child's config file: rewrite it in place (the path is in the process's arguments).
    let cmdline = std::fs::read_to_string(format!("/proc/{}/cmdline", server.child.id())).unwrap();
    let config_path = cmdline
        .split('\0')
        .rfind(|a| a.ends_with(".toml"))
        .unwrap()
        .to_string();

    // A broken file changes nothing. The server says when it is done with the reload
    // (RELOADING=1, then READY=1 on the sd_notify socket).
    std::fs::write(&config_path, "[server]\nshards = 0\n").unwrap();
    server.signal("HUP");
    server.wait_for_state("RELOADING=1", Duration::from_secs(5));
    server.wait_for_state("READY=1", Duration::from_secs(5));
    wait_until(Duration::from_secs(5), "the refusal is logged", || {
        server.log().contains("reload refused")
    });
    assert!(
        server.log().contains("key `server.shards`"),
        "{}",
        server.log()
    );

    let mut idle = connect(addr);
    assert_eq!(echo_roundtrip(&mut idle, b"x"), b"x");

    // A restart-only key is refused; idle_timeout applies live.
    std::fs::write(
        &config_path,
        echo_config("300ms", "", addr.port(), false).replace("shards = 2", "shards = 3"),
    )
    .unwrap();
    server.signal("HUP");
    wait_until(Duration::from_secs(5), "the reload is logged", || {
        server.log().contains("reloaded")
    });
    assert!(
        server.log().contains("`server.shards` needs a restart"),
        "{}",
        server.log()
    );
    // The connection, idle since before the reload, is now past the new timeout.
    let start = Instant::now();
    let mut buf = [0u8; 1];
    assert_eq!(
        idle.read(&mut buf).unwrap(),
        0,
        "closed by the new idle_timeout"
    );
    assert!(start.elapsed() < Duration::from_secs(5));
    let mut fresh = connect(addr);
    assert_eq!(
        echo_roundtrip(&mut fresh, b"still serving"),
        b"still serving"
    );
    server.signal("TERM");
    assert_eq!(server.wait(Duration::from_secs(10)).code(), Some(0));
}

/// Connect, echo, close, in a loop; every attempt must succeed.
fn churn(addr: SocketAddr, stop: &std::sync::atomic::AtomicBool) -> (usize, Vec<String>) {
    let mut done = 0;
    let mut failures = Vec::new();
    let mut i = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        i += 1;
        let result = (|| -> std::io::Result<()> {
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            let data = pattern(i, 200);
            s.write_all(&data)?;
            let mut got = vec![0u8; 200];
            s.read_exact(&mut got)?;
            if got != data {
                return Err(std::io::Error::other("echo differs"));
            }
            Ok(())
        })();
        match result {
            Ok(()) => done += 1,
            Err(e) => failures.push(e.to_string()),
        }
    }
    (done, failures)
}

/// The two restart tests both set a global sysctl: one at a time.
static SYSCTL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn zero_downtime(balance: &str) {
    let _one_at_a_time = SYSCTL.lock().unwrap_or_else(|e| e.into_inner());
    // Queued connections of a closing listener move to the new one (Linux 5.14+); CI runs as root.
    let knob = "/proc/sys/net/ipv4/tcp_migrate_req";
    let Ok(before) = std::fs::read_to_string(knob) else {
        require(
            false,
            "Linux 5.14+ (net.ipv4.tcp_migrate_req)",
            "a newer kernel",
        );
        return;
    };
    let writable = std::fs::OpenOptions::new().write(true).open(knob).is_ok();
    if !require(
        writable,
        "root, to set net.ipv4.tcp_migrate_req = 1",
        "run the tests as root, as .ci/run does",
    ) {
        return;
    }
    std::fs::write(knob, "1").expect("set net.ipv4.tcp_migrate_req = 1");
    let extra = format!("balance = \"{balance}\"");
    let mut old = Child::spawn(&echo_config("60s", &extra, 0, true), "");
    let addr = old.addr("echo");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (done, failures) = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..4).map(|_| scope.spawn(|| churn(addr, &stop))).collect();
        std::thread::sleep(Duration::from_millis(300));
        let new = Child::spawn(&echo_config("60s", &extra, addr.port(), true), "");
        std::thread::sleep(Duration::from_millis(300));
        old.signal("TERM");
        assert_eq!(
            old.wait(Duration::from_secs(10)).code(),
            Some(0),
            "{}",
            old.log()
        );
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut done = 0;
        let mut failures = Vec::new();
        for c in clients {
            let (d, f) = c.join().unwrap();
            done += d;
            failures.extend(f);
        }
        drop(new);
        (done, failures)
    });
    let _ = std::fs::write(knob, before.trim());
    assert!(done > 100, "only {done} exchanges");
    assert!(
        failures.is_empty(),
        "{} of {} attempts failed: {:?}",
        failures.len(),
        done + failures.len(),
        &failures[..failures.len().min(5)]
    );
}

#[test]
fn readiness_announces_the_pid_and_every_listener_then_stopping() {
    // Three listeners on port 0: the announcement on the sd_notify socket is the only place
    // the test learns their ports (Child::spawn also checks that it names the server's pid).
    let mut server = Child::spawn(
        "[server]\nshards = 1\npin = false\nstats_interval = \"0s\"\n\
         [[listener]]\nname = \"echo\"\naddr = \"127.0.0.1:0\"\nservice = \"echo\"\n\
         [[listener]]\nname = \"public http\"\naddr = \"127.0.0.1:0\"\nservice = \"http\"\n\
         [[listener]]\nname = \"admin\"\naddr = \"127.0.0.1:0\"\nservice = \"http\"\n",
        "",
    );
    let names: Vec<&str> = server.addrs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["echo", "public http", "admin"]);
    assert!(server.addrs.iter().all(|(_, a)| a.port() != 0));
    let mut c = connect(server.addr("echo"));
    assert_eq!(echo_roundtrip(&mut c, b"ready"), b"ready");
    for name in ["public http", "admin"] {
        let mut s = connect(server.addr(name));
        let (status, _, body) = http_exchange(&mut s, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!((status, &body[..]), (200, &b"ok\n"[..]), "{name}");
    }
    server.signal("TERM");
    server.wait_for_state("STOPPING=1", Duration::from_secs(5));
    assert_eq!(server.wait(Duration::from_secs(10)).code(), Some(0));
}

#[test]
fn restart_on_reuse_port_loses_no_connection_attempt() {
    zero_downtime("round-robin");
}

#[test]
fn reuseport_balance_serves_and_restarts_without_loss() {
    zero_downtime("reuseport");
}

#[test]
fn reuseport_balance_spreads_over_shards() {
    let config = config(
        &echo_config("60s", "balance = \"reuseport\"", 0, false)
            .replace("shards = 2", "shards = 3"),
    );
    let server = shardnet::app::start(&config).unwrap();
    let addr = server.addr("echo").unwrap();
    let mut conns: Vec<_> = (0..300).map(|_| connect(addr)).collect();
    for (i, c) in conns.iter_mut().enumerate() {
        let d = pattern(i as u64, 10);
        assert_eq!(echo_roundtrip(c, &d), d);
    }
    let per: Vec<u64> = server
        .snapshot()
        .shards
        .iter()
        .map(|s| s.accepted)
        .collect();
    assert_eq!(per.iter().sum::<u64>(), 300);
    assert!(
        per.iter().all(|&n| n > 30),
        "the kernel spreads connections over every shard's listener: {per:?}"
    );
}

#[test]
fn tune_prints_the_recommendation_and_every_limit() {
    let out = std::process::Command::new(bin())
        .arg("tune")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("shards = "), "{text}");
    for key in [
        "RLIMIT_NOFILE",
        "fs.nr_open",
        "fs.file-max",
        "net.core.somaxconn",
        "net.ipv4.tcp_max_syn_backlog",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.tcp_mem",
        "net.ipv4.tcp_migrate_req",
        "net.netfilter.nf_conntrack_max",
    ] {
        assert!(text.contains(key), "{key} missing:\n{text}");
    }
    assert!(text.contains("sysctl -w"), "{text}");
}
