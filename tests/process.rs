//! The `shardnet` binary as a process: signals, descriptor exhaustion, config errors.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

fn echo_toml(extra_server: &str) -> String {
    format!(
        "[server]\nshards = 1\npin = false\nstats_interval = \"200ms\"\nshutdown_timeout = \"5s\"\n{extra_server}\n\
         [[listener]]\nname = \"echo\"\naddr = \"127.0.0.1:0\"\nservice = \"echo\"\n"
    )
}

#[test]
fn sigterm_during_load_echoes_everything_received_then_exits_0() {
    let mut server = Child::spawn(&echo_toml(""), "");
    let addr = server.addr("echo");
    let mut conns: Vec<TcpStream> = (0..20).map(|_| connect(addr)).collect();
    let payloads: Vec<Vec<u8>> = (0..20).map(|i| pattern(i, 100_000)).collect();
    // Every client has sent all its bytes (none read back yet) when the signal arrives.
    for (c, p) in conns.iter_mut().zip(&payloads) {
        c.write_all(p).unwrap();
    }
    server.signal("TERM");
    for (i, (c, p)) in conns.iter_mut().zip(&payloads).enumerate() {
        let (got, clean) = read_to_end(c);
        assert!(clean, "connection {i} ended with an error, not EOF");
        assert!(
            got == *p,
            "connection {i}: got {} of {} bytes back (or different bytes)",
            got.len(),
            p.len()
        );
    }
    let status = server.wait(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "log:\n{}", server.log());
    assert!(server.log().contains("draining"));
}

#[test]
fn descriptor_exhaustion_pauses_accepting_and_recovers() {
    exhaustion_and_recovery("");
}

#[test]
fn descriptor_exhaustion_on_reuseport_shards_pauses_accepting_and_recovers() {
    // The same listener type and policy serve shards that accept on their own sockets.
    exhaustion_and_recovery("balance = \"reuseport\"");
}

fn exhaustion_and_recovery(server_extra: &str) {
    // 48 descriptors: about a dozen go to stdio, epoll, eventfds and the listener; the rest to
    // connections. 60 clients cannot all be accepted at once. An explicit max_connections above
    // the limit ("auto" would stay under it and close the extra clients at once instead), so it
    // is the kernel's limit that binds.
    let extra = format!("max_connections = 1000000\n{server_extra}");
    let server = Child::spawn(&echo_toml(&extra), "ulimit -n 48 &&");
    // The log is read by another thread: the line may trail the readiness announcement.
    wait_until(
        Duration::from_secs(10),
        "the descriptor-limit warning",
        || {
            server
                .log()
                .contains("max_connections = 1000000 is above the descriptor limit (48)")
        },
    );
    let addr = server.addr("echo");
    let mut pending: Vec<TcpStream> = (0..60)
        .map(|_| {
            let mut c = connect(addr);
            c.write_all(b"hi").unwrap();
            c.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            c
        })
        .collect();
    let mut served_total = 0;
    let mut rounds = 0;
    while !pending.is_empty() {
        rounds += 1;
        assert!(
            rounds <= 30,
            "{} clients never served; log:\n{}",
            pending.len(),
            server.log()
        );
        let mut waiting = Vec::new();
        let mut served = Vec::new();
        for mut c in pending.drain(..) {
            let mut buf = [0u8; 2];
            match c.read_exact(&mut buf) {
                Ok(()) => {
                    assert_eq!(&buf, b"hi");
                    served.push(c);
                }
                Err(_) => waiting.push(c),
            }
        }
        if rounds == 1 {
            assert!(
                !waiting.is_empty(),
                "the limit should have stopped some accepts"
            );
            assert!(!served.is_empty(), "the server kept serving those it had");
        }
        served_total += served.len();
        drop(served); // frees descriptors in the server: it must accept the waiting ones
        pending = waiting;
    }
    assert_eq!(served_total, 60);
    assert!(
        server.log().contains("pausing accepts"),
        "log:\n{}",
        server.log()
    );
    // Still alive and serving.
    let mut c = connect(addr);
    assert_eq!(echo_roundtrip(&mut c, b"after"), b"after");
}

/// Runs the binary with `args` then `file`: (exit code, stdout, stderr).
fn shardnet(args: &[&str], file: &std::path::Path) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(bin())
        .args(args)
        .arg(file)
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn config_check_reports_file_line_and_key() {
    let dir = std::env::temp_dir().join(format!("shardnet-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = |name: &str, src: &str| {
        let path = dir.join(name);
        std::fs::write(&path, src).unwrap();
        path
    };
    let bad = file("bad.toml", "[server]\nshards = 0\n");
    let (code, _, err) = shardnet(&["config", "check"], &bad);
    assert_eq!(code, Some(2));
    assert!(
        err.contains(&format!("{}:2:10: key `server.shards`", bad.display())),
        "{err}"
    );

    let good = file(
        "good.toml",
        "[[listener]]\nname = \"e\"\naddr = \"127.0.0.1:0\"\n",
    );
    let (code, effective, _) = shardnet(&["config", "check"], &good);
    assert_eq!(code, Some(0));
    assert!(effective.contains("idle_timeout = \"5m\""), "{effective}");

    let out = std::process::Command::new(bin())
        .args(["config", "default"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("[[listener.websocket]]"));

    // `serve` with a broken file exits 2 with the same message.
    let (code, _, err) = shardnet(&["serve", "--config"], &bad);
    assert_eq!(code, Some(2));
    assert!(err.contains("key `server.shards`"), "{err}");

    // A syntax error has no key: it says so, with the parser's line and column.
    let syntax = file(
        "syntax.toml",
        "[server]\nshards = 1\n[[listener]\nname = \"x\"\n",
    );
    let (code, _, err) = shardnet(&["config", "check"], &syntax);
    assert_eq!(code, Some(2));
    let want = format!("{}:3:11: syntax error: ", syntax.display());
    assert!(err.starts_with(&want), "{err}");
    assert!(!err.contains("key `"), "{err}");

    // A cross-key error on a key left to its default points at its table's header.
    let ws = file(
        "ws.toml",
        "[[listener]]\nname = \"e\"\naddr = \"127.0.0.1:0\"\n\n[[listener.websocket]]\npath = \"/ws\"\n",
    );
    let (code, _, err) = shardnet(&["config", "check"], &ws);
    assert_eq!(code, Some(2));
    let want = format!("{}:5:1: key `listener[0].websocket`", ws.display());
    assert!(err.contains(&want), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn serve_with_a_missing_config_says_the_os_error_once() {
    let missing =
        std::env::temp_dir().join(format!("shardnet-missing-{}.toml", std::process::id()));
    let (code, _, err) = shardnet(&["serve", "--config"], &missing);
    assert_eq!(code, Some(2));
    assert_eq!(
        err.trim_end(),
        format!(
            "shardnet: {}: cannot read: No such file or directory (os error 2)",
            missing.display()
        )
    );
}

#[test]
fn max_connections_auto_is_logged_once_at_info_without_a_warning() {
    let server = Child::spawn(&echo_toml(""), "ulimit -n 2000 &&");
    // The summary line follows the readiness announcement.
    wait_until(Duration::from_secs(10), "the summary line", || {
        server.log().contains("max_connections=")
    });
    let log = server.log();
    // 2000 less 16 + 4 per shard + 2 per shard for the one listener, with one shard.
    assert_eq!(
        log.matches("max_connections = \"auto\": 1978 (RLIMIT_NOFILE 2000 less 22 ")
            .count(),
        1,
        "log:\n{log}"
    );
    let line = log
        .lines()
        .find(|l| l.contains("max_connections = \"auto\""))
        .unwrap();
    assert!(line.contains(" INFO "), "{line}");
    assert!(!log.contains("WARN"), "log:\n{log}");
    assert!(
        log.contains("max_connections=1978"),
        "the summary line; log:\n{log}"
    );
}

#[test]
fn sighup_reload_logs_values_in_the_files_units() {
    let server = Child::spawn(&echo_toml(""), "");
    let cmdline = std::fs::read_to_string(format!("/proc/{}/cmdline", server.child.id())).unwrap();
    let config_path = cmdline
        .split('\0')
        .rfind(|a| a.ends_with(".toml"))
        .unwrap()
        .to_string();
    // The same server and listener; live keys changed.
    let reloaded =
        "[server]\nshards = 1\npin = false\nstats_interval = \"0s\"\nshutdown_timeout = \"5s\"\n\
                    [limits]\nidle_timeout = \"90s\"\nmax_write_buffer = \"512KiB\"\n\
                    [log]\nlevel = \"debug\"\n\
                    [[listener]]\nname = \"echo\"\naddr = \"127.0.0.1:0\"\nservice = \"echo\"\n";
    std::fs::write(&config_path, reloaded).unwrap();
    server.signal("HUP");
    wait_until(Duration::from_secs(5), "the reload is logged", || {
        server.log().contains("reloaded")
    });
    let log = server.log();
    let line = log.lines().find(|l| l.contains("reloaded")).unwrap();
    assert!(
        line.ends_with(
            "idle_timeout=1m30s max_write_buffer=512KiB write_timeout=30s max_read_buffer=2MiB \
             stats_interval=0s log.level=debug"
        ),
        "{line}"
    );
}

#[test]
fn config_check_reads_the_tls_files_and_names_the_bad_one() {
    let pki = common::pki::Pki::new();
    let conf = |name: &str, tls: &str| {
        pki.file(
            name,
            format!(
                "[[listener]]\nname = \"https\"\naddr = \"127.0.0.1:0\"\nservice = \"http\"\n{tls}"
            ),
        )
    };
    // Relative paths: from the configuration file's directory, not the working directory.
    let good = conf(
        "good.toml",
        "tls = { cert = \"cert.pem\", key = \"key.pem\", min_version = \"1.3\" }\n",
    );
    let (code, effective, err) = shardnet(&["config", "check"], &good);
    assert_eq!(code, Some(0), "{err}");
    assert!(effective.contains("[listener.tls]"), "{effective}");
    assert!(effective.contains("min_version = \"1.3\""), "{effective}");

    let missing = conf(
        "missing.toml",
        "tls = { cert = \"cert.pem\", key = \"nokey.pem\" }\n",
    );
    let (code, _, err) = shardnet(&["config", "check"], &missing);
    assert_eq!(code, Some(2));
    let want = format!(
        "{}:5:28: key `listener[0].tls.key`: {}: cannot read: no such file",
        missing.display(),
        pki.dir.join("nokey.pem").display()
    );
    assert_eq!(err.trim_end(), want);

    // The client's key with the server's certificate: refused, and the key is not quoted.
    let mismatch = conf(
        "mismatch.toml",
        "[listener.tls]\ncert = \"cert.pem\"\nkey = \"client-key.pem\"\n",
    );
    let key_text = std::fs::read_to_string(&pki.client_key).unwrap();
    for args in [&["config", "check"][..], &["serve", "--config"]] {
        let (code, _, err) = shardnet(args, &mismatch);
        assert_eq!(code, Some(2), "{args:?}");
        assert!(
            err.contains("key `listener[0].tls.key`") && err.contains("does not match"),
            "{args:?}: {err}"
        );
        for line in key_text.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!err.contains(line), "the key leaked: {err}");
        }
    }
}
