//! Test helpers: servers on 127.0.0.1:0, clients with timeouts, bounded polling.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

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
    Server::start(config, |_, _| shardnet::service::echo::Echo).expect("server starts")
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

/// The path of the built `shardnet` binary.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_shardnet")
}

/// A `shardnet serve` child process; killed on drop if still running.
pub struct Child {
    pub child: std::process::Child,
    pub addrs: Vec<(String, SocketAddr)>,
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Child {
    /// Starts `shardnet serve --config FILE` through `sh -c PREFIX` (e.g. `ulimit -n 40 &&`), and
    /// waits (bounded) until it logged `listening:` for every listener in the config.
    pub fn spawn(config_toml: &str, shell_prefix: &str) -> Child {
        use std::io::BufRead;
        let dir = std::env::temp_dir().join(format!(
            "shardnet-test-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.toml");
        std::fs::write(&path, config_toml).unwrap();
        let listeners = config_toml.matches("[[listener]]").count();
        let script = format!("{shell_prefix} exec \"$0\" serve --config \"$1\"");
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(bin())
            .arg(&path)
            .env("SHARDNET_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn shardnet");
        let stderr = child.stderr.take().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(rest) = line.split("listening: ").nth(1) {
                    let mut parts = rest.split(" on ");
                    let name = parts.next().unwrap_or("").to_string();
                    if let Some(addr) = parts.next().and_then(|a| a.trim().parse().ok()) {
                        let _ = tx.send((name, addr));
                    }
                }
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let mut addrs = Vec::new();
        for _ in 0..listeners {
            match rx.recv_timeout(Duration::from_secs(20)) {
                Ok(a) => addrs.push(a),
                Err(_) => {
                    let _ = child.kill();
                    panic!("server did not start; log:\n{}", log.lock().unwrap());
                }
            }
        }
        Child {
            child,
            addrs,
            stderr: log,
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
/// under target/ created (once) with pip. Panics with what went wrong.
pub fn python_with(packages: &[(&str, &str)]) -> std::path::PathBuf {
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
        return system;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pyenv");
    let py = dir.join("bin/python");
    // Serialise venv creation between test binaries running at once.
    let lock = dir.with_extension("lock");
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if has(&py) {
            return py;
        }
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&lock)
        {
            Ok(_) => break,
            Err(_) => {
                assert!(
                    Instant::now() < deadline,
                    "waited too long for another test's pip install"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    let result = (|| {
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
    let _ = std::fs::remove_file(&lock);
    if let Err(e) = result {
        panic!("cannot provide Python packages {packages:?}: {e}");
    }
    assert!(has(&py), "packages still missing after pip install");
    py
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
    shardnet::service::start_default(&config(toml)).expect("server starts")
}

pub fn http_toml(shards: usize, listener_extra: &str) -> String {
    format!(
        "[server]\nshards = {shards}\npin = false\nstats_interval = \"0s\"\nshutdown_timeout = \"2s\"\n\
         [[listener]]\nname = \"http\"\naddr = \"127.0.0.1:0\"\nservice = \"http\"\n{listener_extra}\n"
    )
}
