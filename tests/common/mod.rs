//! Test helpers: servers on 127.0.0.1:0, clients with timeouts, bounded polling.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use shardnet::app::engine;
use shardnet::config::Config;
use shardnet::server::Server;

/// Test certificates made at run time (the same file the unit tests use).
#[path = "../../src/tls/testpki.rs"]
pub mod pki;

/// Every blocking client call gives up after this long.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Parses a test configuration (panics with the config error, which names the line and key).
pub fn config(toml: &str) -> Config {
    Config::parse(toml, "test.toml").unwrap_or_else(|e| panic!("{e}"))
}

/// An echo listener on an ephemeral port, unpinned, with `extra` TOML appended to `[server]`
/// and `limits` as the `[limits]` section.
pub fn echo_config(shards: usize, server_extra: &str, limits: &str) -> Config {
    config(&format!(
        "[server]\nshards = {shards}\npin = false\nstats_interval = \"0s\"\nshutdown_timeout = \"5s\"\n{server_extra}\n\
         [limits]\n{limits}\n\
         [[listener]]\nname = \"echo\"\naddr = \"127.0.0.1:0\"\nservice = \"echo\"\n"
    ))
}

pub fn start_echo(config: &Config) -> Server {
    engine(config)
        .start(|_, _| shardnet::service::echo::Echo)
        .expect("server starts")
}

#[track_caller]
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Polls `cond` every 5 ms until it holds or `within` passes; panics with `what` on timeout.
#[track_caller]
pub fn wait_until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Reads until EOF (or error); returns what was read and whether it ended in a clean EOF.
pub fn read_to_end(s: &mut TcpStream) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (out, false),
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift), so failures are reproducible.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes `data` on one thread while reading the echo on this one; returns the echo.
pub fn echo_roundtrip(stream: &mut TcpStream, data: &[u8]) -> Vec<u8> {
    let mut writer = stream.try_clone().unwrap();
    std::thread::scope(|scope| {
        scope.spawn(move || writer.write_all(data).expect("write"));
        let mut got = vec![0u8; data.len()];
        stream.read_exact(&mut got).expect("read the echo");
        got
    })
}

/// Whether this run is CI's (`CI=true` or `CI=1`): there a missing prerequisite fails the test.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// The one way a test says it cannot run here. Outside CI it writes one loud line to the
/// process's stderr (straight to the descriptor, which libtest does not capture, so the line
/// shows in a plain `cargo test` among the `test ... ok` lines) and returns false: the test
/// returns at once and counts as passed. Under CI (`CI=true`) it panics with the same line.
///
/// `what` names the tool or privilege, `install` how to get it.
#[track_caller]
pub fn require(available: bool, what: &str, install: &str) -> bool {
    if available {
        return true;
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_string();
    if in_ci() {
        panic!("{test} needs {what} ({install}); under CI=true that is a failure, not a skip");
    }
    let line =
        format!("SKIPPED {test}: needs {what} ({install}); set CI=true to make this a failure\n");
    use std::io::Write;
    let _ = std::io::stderr().write_all(line.as_bytes());
    false
}

/// `require` for a program on PATH, e.g. `require_tool("wrk", "apt-get install wrk")`.
#[track_caller]
pub fn require_tool(tool: &str, install: &str) -> bool {
    require(
        shardnet::bench::spawn::find_program(tool).is_some(),
        &format!("`{tool}` on PATH"),
        install,
    )
}

/// Whether this process runs as root (the effective uid in /proc/self/status).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))?
                .split_whitespace()
                .nth(1)
                .map(|euid| euid == "0")
        })
        .unwrap_or(false)
}

/// The path of the built `shardnet` binary.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_shardnet")
}

/// A `shardnet serve` child process; killed on drop if still running.
pub struct Child {
    pub child: std::process::Child,
    /// Every listener's bound address, from the readiness announcement.
    pub addrs: Vec<(String, SocketAddr)>,
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
    /// The child's sd_notify socket: later states (`RELOADING=1`, `READY=1`, `STOPPING=1`).
    pub notify: shardnet::ready::ReadyListener,
}

impl Child {
    /// Starts `shardnet serve --config FILE` through `sh -c PREFIX` (e.g. `ulimit -n 40 &&`), and
    /// waits (bounded) for its readiness announcement on the sd_notify socket, which names every
    /// listener's bound address (see `shardnet::ready`; the log's wording does not matter).
    pub fn spawn(config_toml: &str, shell_prefix: &str) -> Child {
        Child::spawn_with(config_toml, shell_prefix, &[], &[])
    }

    /// [`Child::spawn`] with more arguments after `serve --config FILE` and more environment.
    pub fn spawn_with(
        config_toml: &str,
        shell_prefix: &str,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Child {
        let mut child = Child::launch(config_toml, shell_prefix, args, envs);
        let ready = child.notify.wait(Duration::from_secs(20), || {
            child.child.try_wait().ok().flatten().map(|s| s.to_string())
        });
        let ready = match ready {
            Ok(r) => r,
            Err(e) => {
                let _ = child.child.kill();
                let _ = child.child.wait();
                panic!("server did not start: {e}; log:\n{}", child.log());
            }
        };
        assert_eq!(
            ready.pid,
            child.child.id(),
            "the announcement names the server's pid"
        );
        child.addrs = ready.listeners;
        child
    }

    /// Starts the server like [`Child::spawn_with`] without waiting for it to be ready (one
    /// expected to fail, or to announce itself later); `addrs` is empty.
    pub fn launch(
        config_toml: &str,
        shell_prefix: &str,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Child {
        use std::io::BufRead;
        let dir = std::env::temp_dir().join(format!(
            "shardnet-test-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.toml");
        std::fs::write(&path, config_toml).unwrap();
        let notify = shardnet::ready::ReadyListener::bind().expect("readiness socket");
        let script =
            format!("cfg=\"$1\"; shift; {shell_prefix} exec \"$0\" serve --config \"$cfg\" \"$@\"");
        let mut command = std::process::Command::new("sh");
        command
            .arg("-c")
            .arg(script)
            .arg(bin())
            .arg(&path)
            .args(args)
            .env("SHARDNET_LOG", "info")
            .env("NOTIFY_SOCKET", notify.notify_socket())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        for (k, v) in envs {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("spawn shardnet");
        let stderr = child.stderr.take().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        Child {
            child,
            addrs: Vec::new(),
            stderr: log,
            notify,
        }
    }

    /// Waits (bounded) for the server to send `state` (e.g. `READY=1` once a reload is done).
    #[track_caller]
    pub fn wait_for_state(&self, state: &str, within: Duration) {
        if let Err(e) = self.notify.wait_for(state, within) {
            panic!("no {state} from the server: {e}; log:\n{}", self.log());
        }
    }

    pub fn addr(&self, name: &str) -> SocketAddr {
        self.addrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .expect("listener")
    }

    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits (bounded) for the exit status.
    pub fn wait(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit within {within:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed) ^ (Instant::now().elapsed().as_nanos() as u64)
}

/// A Python interpreter with `packages` importable: the system one if it has them, else a venv
/// in the build's target directory (wherever `CARGO_TARGET_DIR` puts it) created (once) with
/// pip. `None` (after `require`'s skip line) when neither
/// works: no venv module (Debian: python3-venv) or no PyPI; under CI that is a failure.
pub fn python_with(packages: &[(&str, &str)]) -> Option<std::path::PathBuf> {
    use std::process::Command;
    let imports = packages
        .iter()
        .map(|(m, _)| format!("import {m}"))
        .collect::<Vec<_>>()
        .join("; ");
    let has = |py: &std::path::Path| {
        Command::new(py)
            .args(["-c", &imports])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    let system = std::path::PathBuf::from("python3");
    if has(&system) {
        return Some(system);
    }
    let tmp = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(tmp).expect("the target directory's tmp");
    let dir = tmp.join("pyenv");
    let py = dir.join("bin/python");
    // Serialise venv creation between test binaries running at once. A test that finds the
    // packages importable while another one's pip is still writing them (`import jwt` works
    // before cryptography is whole) would fail, so outside the lock only a marker written after
    // a complete install (one per set of modules) counts.
    let lock = dir.with_extension("lock");
    let names: Vec<&str> = packages.iter().map(|(m, _)| *m).collect();
    let ready = tmp.join(format!("pyenv.ready-{}", names.join("+")));
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if ready.exists() && has(&py) {
            return Some(py);
        }
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&lock)
        {
            Ok(_) => break,
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                panic!("cannot create {}: {e}", lock.display())
            }
            Err(_) => {
                assert!(
                    Instant::now() < deadline,
                    "waited too long for another test's pip install"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    // Holding the lock: nobody is installing now, so what imports is whole.
    let result = (|| {
        if has(&py) {
            return Ok(());
        }
        if !py.exists() {
            let ok = Command::new("python3")
                .args(["-m", "venv"])
                .arg(&dir)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                return Err("python3 -m venv failed".to_string());
            }
        }
        let pkgs: Vec<&str> = packages.iter().map(|(_, p)| *p).collect();
        let out = Command::new(&py)
            .args(["-m", "pip", "install", "--quiet"])
            .args(&pkgs)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "pip install failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    })();
    let complete = result.is_ok() && has(&py);
    if complete {
        let _ = std::fs::write(&ready, b"");
    }
    let _ = std::fs::remove_file(&lock);
    let pkgs: Vec<&str> = packages.iter().map(|(_, p)| *p).collect();
    let why = match result {
        Err(e) => e,
        Ok(()) if complete => return Some(py),
        Ok(()) => "packages still missing after pip install".to_string(),
    };
    require(
        false,
        &format!("the Python packages {} ({why})", pkgs.join(", ")),
        "python3 with its venv module, Debian: apt-get install python3-venv; and access to pypi.org",
    );
    None
}

/// Sends raw bytes and reads one HTTP response (head and Content-Length body).
pub fn http_exchange(s: &mut TcpStream, request: &[u8]) -> (u16, String, Vec<u8>) {
    s.write_all(request).unwrap();
    read_response(s, false)
}

/// Reads one HTTP response; `head` = the request was HEAD (no body expected).
pub fn read_response(s: &mut TcpStream, head: bool) -> (u16, String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            other => panic!(
                "connection ended inside a response head ({other:?}): {:?}",
                String::from_utf8_lossy(&buf)
            ),
        }
    }
    let head_text = String::from_utf8(buf).unwrap();
    let status: u16 = head_text[9..12].parse().unwrap();
    let len = head_text
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .map_or(0, |v| v.trim().parse::<usize>().unwrap());
    let mut body = vec![
        0u8;
        if head || status == 100 || status == 101 {
            0
        } else {
            len
        }
    ];
    s.read_exact(&mut body).unwrap();
    (status, head_text, body)
}

/// A server running the product router with `toml`.
pub fn start_router(toml: &str) -> Server {
    shardnet::app::start(&config(toml)).expect("server starts")
}

pub fn http_toml(shards: usize, listener_extra: &str) -> String {
    format!(
        "[server]\nshards = {shards}\npin = false\nstats_interval = \"0s\"\nshutdown_timeout = \"2s\"\n\
         [[listener]]\nname = \"http\"\naddr = \"127.0.0.1:0\"\nservice = \"http\"\n{listener_extra}\n"
    )
}

/// `shardnet bench` with `args`, short (600 ms measured after a 100 ms warm-up) and on client
/// core 0: its exit code and everything it printed.
pub fn bench(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(bin())
        .arg("bench")
        .args([
            "--duration",
            "600ms",
            "--warmup",
            "100ms",
            "--client-cores",
            "0",
        ])
        .args(args)
        .output()
        .expect("run bench");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// Runs a Python client `script` with `args`; panics, with its output, unless it prints `ok`.
#[track_caller]
pub fn run_python(py: &std::path::Path, script: &str, args: &[&str]) {
    let out = std::process::Command::new(py)
        .args(["-c", script])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "python client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
