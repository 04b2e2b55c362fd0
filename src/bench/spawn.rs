//! Servers the bench starts: shardnet itself, or any other command (`--compare`), pinned with
//! `taskset` and optionally held to a CPU quota in a cgroup of their own.
//!
//! Every process is owned by a [`Spawned`] guard from the moment it exists, so any error after
//! that (no readiness, no cgroup, a server that exits) stops it: the guard kills and reaps it on
//! drop, then removes its cgroup. The quota's cgroup is created before the process, so a host
//! where it cannot be (not root) fails before anything starts. A spawned shardnet announces its
//! listeners over the sd_notify socket ([`crate::ready`]); another command is ready when its
//! port accepts.

use std::collections::VecDeque;
use std::io::BufRead;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::args::{parse_cores, BenchArgs, TriggerArg};
use crate::ready::ReadyListener;

/// How long a spawned server may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A CPU quota: `percent` of one core.
#[derive(Debug, Clone, Copy)]
pub struct Quota(u32);

impl Quota {
    pub fn percent(p: u32) -> Quota {
        Quota(p.clamp(1, 10_000))
    }
}

/// The executable `name` would run as: a path with a `/` as it is, else the first match on
/// `$PATH`; `None` if there is no such executable file.
pub fn find_program(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if name.contains('/') {
        let p = PathBuf::from(name);
        return executable(&p).then_some(p);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| executable(p))
}

/// [`find_program`], or an error naming the program and how to install it.
pub fn require_program(name: &str, install: &str) -> anyhow::Result<PathBuf> {
    find_program(name).with_context(|| format!("`{name}` is not installed ({install})"))
}

/// Checks that a `--compare` command's program exists, so that a missing one is reported
/// before anything is measured, with what to build.
pub fn check_command(template: &str) -> anyhow::Result<()> {
    let line = template.replace("{port}", "0");
    // `VAR=value program args`: the program is the first word that is not an assignment.
    let Some(program) = line
        .split_whitespace()
        .find(|w| w.split_once('=').is_none_or(|(k, _)| k.contains('/')))
    else {
        bail!("--compare `{template}`: no command");
    };
    if find_program(program).is_some() {
        return Ok(());
    }
    let hint = if program.contains("/examples/") {
        "build the comparison servers with `cargo build --release --examples`".to_string()
    } else if program.contains("target/reference/") {
        "benches/run-all.sh builds the C reference servers from ../shared/reference/*.c".to_string()
    } else if program.contains('/') {
        let cwd = std::env::current_dir().map_or_else(|_| "?".into(), |d| d.display().to_string());
        format!("no executable file there (relative paths start at {cwd})")
    } else {
        "not on PATH".to_string()
    };
    bail!("--compare `{template}`: `{program}` not found: {hint}")
}

/// A cgroup holding one process under a CPU quota; removed on drop.
struct CpuCgroup {
    dir: PathBuf,
}

impl CpuCgroup {
    /// Creates an empty cgroup with `quota`: cgroup v1 (`/sys/fs/cgroup/cpu`) or v2
    /// (`cpu.max`), whichever this host has.
    fn create(quota: Quota) -> anyhow::Result<CpuCgroup> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "shardnet-bench-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let v1 = PathBuf::from("/sys/fs/cgroup/cpu");
        let v2 = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.join("cgroup.controllers").exists());
        let period = 100_000u64;
        let quota_us = period * quota.0 as u64 / 100;
        let (dir, settings) = if v1.join("cpu.cfs_quota_us").exists() {
            (
                v1.join(&name),
                vec![
                    ("cpu.cfs_period_us", period.to_string()),
                    ("cpu.cfs_quota_us", quota_us.to_string()),
                ],
            )
        } else if let Some(root) = v2 {
            (
                root.join(&name),
                vec![("cpu.max", format!("{quota_us} {period}"))],
            )
        } else {
            bail!("--server-quota: this host has no cgroup CPU controller");
        };
        std::fs::create_dir(&dir).with_context(|| {
            format!(
                "--server-quota needs root (a writable cgroup CPU controller): cannot create {}",
                dir.display()
            )
        })?;
        let cgroup = CpuCgroup { dir };
        for (file, value) in settings {
            let path = cgroup.dir.join(file);
            std::fs::write(&path, value)
                .with_context(|| format!("--server-quota: cannot write {}", path.display()))?;
        }
        Ok(cgroup)
    }

    /// Moves `pid` into the cgroup.
    fn adopt(&self, pid: u32) -> anyhow::Result<()> {
        let path = self.dir.join("cgroup.procs");
        std::fs::write(&path, pid.to_string())
            .with_context(|| format!("--server-quota: cannot write {}", path.display()))
    }
}

impl Drop for CpuCgroup {
    fn drop(&mut self) {
        // The process is gone by now (the guard reaped it first); an empty cgroup can be
        // removed, once the kernel has noticed that it is empty.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A server process started by the bench: killed and reaped on drop, then its cgroup and
/// generated configuration are removed (fields drop in declaration order, after `drop`).
pub struct Spawned {
    child: Child,
    addrs: Vec<(String, SocketAddr)>,
    _cgroup: Option<CpuCgroup>,
    _config: Option<TempPath>,
}

impl Spawned {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn addr(&self, name: &str) -> anyhow::Result<SocketAddr> {
        self.addrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .with_context(|| format!("the server has no listener named `{name}`"))
    }

    /// Waits up to `within` for the process to end; its status, if it did.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The exit status, if the process has ended.
    fn exited(&mut self) -> Option<String> {
        self.child.try_wait().ok().flatten().map(|s| s.to_string())
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A file removed on drop.
struct TempPath(PathBuf);

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The last lines a child wrote to stderr (read on a thread of their own, so the pipe never
/// fills); lines `forward` picks are copied to our stderr as they come.
#[derive(Clone, Default)]
struct StderrTail(Arc<(Mutex<Tail>, Condvar)>);

#[derive(Default)]
struct Tail {
    lines: VecDeque<String>,
    /// The child's stderr reached EOF: every line is in (and forwarded).
    done: bool,
}

impl StderrTail {
    const LINES: usize = 20;

    fn start(
        stderr: std::process::ChildStderr,
        forward: impl Fn(&str) -> bool + Send + 'static,
    ) -> StderrTail {
        let tail = StderrTail::default();
        let t = tail.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if forward(&line) {
                    eprintln!("server: {line}");
                }
                let mut tail = t.0 .0.lock().unwrap_or_else(|e| e.into_inner());
                if tail.lines.len() == Self::LINES {
                    tail.lines.pop_front();
                }
                tail.lines.push_back(line);
            }
            t.0 .0.lock().unwrap_or_else(|e| e.into_inner()).done = true;
            t.0 .1.notify_all();
        });
        tail
    }

    /// Waits (at most a second) until the child's stderr has ended, as it does when the child
    /// has exited; then every line it wrote is in, and forwarded.
    fn ended(&self) -> std::sync::MutexGuard<'_, Tail> {
        let (lock, ended) = &*self.0;
        let tail = lock.lock().unwrap_or_else(|e| e.into_inner());
        ended
            .wait_timeout_while(tail, Duration::from_secs(1), |t| !t.done)
            .unwrap_or_else(|e| e.into_inner())
            .0
    }

    /// The last lines (see `ended`).
    fn text(&self) -> String {
        let tail = self.ended();
        if tail.lines.is_empty() {
            "it printed nothing".to_string()
        } else {
            let lines: Vec<&str> = tail.lines.iter().map(String::as_str).collect();
            format!("its last messages:\n{}", lines.join("\n"))
        }
    }
}

/// The configuration of a bench-spawned shardnet: echo and http listeners on free ports,
/// timeouts off (the load decides when connections end).
/// [`generated_config`] with a `[broker]` section for `broker_url` (its kind from the scheme).
pub fn generated_config_with_broker(
    args: &BenchArgs,
    shards: usize,
    broker_url: Option<&str>,
) -> String {
    let mut c = generated_config(args, shards);
    if let Some(url) = broker_url {
        let kind = if url.starts_with("nats://") {
            "nats"
        } else {
            "redis"
        };
        c.push_str(&format!(
            "\n[broker]\nkind = \"{kind}\"\nurl = \"{url}\"\nprefix = \"bench.{}.\"\n",
            std::process::id()
        ));
    }
    c
}

pub fn generated_config(args: &BenchArgs, shards: usize) -> String {
    let trigger = match args.trigger {
        Some(TriggerArg::Level) => "level",
        _ => "edge",
    };
    let balance = args.balance.as_deref().unwrap_or("round-robin");
    let compression = args
        .compression
        .as_deref()
        .map_or(String::new(), |c| format!("compression = \"{c}\"\n"));
    format!(
        "[server]\nshards = {shards}\npin = true\ntrigger = \"{trigger}\"\nbalance = \"{balance}\"\nstats_interval = \"0s\"\nshutdown_timeout = \"2s\"\n\n\
         [limits]\nidle_timeout = \"0s\"\n\n\
         [[listener]]\nname = \"echo\"\naddr = \"127.0.0.1:0\"\nservice = \"echo\"\nbacklog = 65535\n\n\
         [[listener]]\nname = \"http\"\naddr = \"127.0.0.1:0\"\nservice = \"http\"\nbacklog = 65535\n\n\
         [[listener.websocket]]\npath = \"/ws/echo\"\nmode = \"echo\"\nping_interval = \"0s\"\n{compression}\n\
         [[listener.websocket]]\npath = \"/ws\"\nmode = \"pubsub\"\nping_interval = \"0s\"\n{compression}"
    )
}

/// Starts this binary's `serve`, pinned to the server cores, and waits for its readiness
/// announcement (its listeners' addresses); then puts it under the quota, if any.
pub fn shardnet(args: &BenchArgs, shards: usize) -> anyhow::Result<Spawned> {
    shardnet_process(args, shards, None, 0)
}

/// [`shardnet`], one of several (`index`), against `broker_url` if given.
pub fn shardnet_process(
    args: &BenchArgs,
    shards: usize,
    broker_url: Option<&str>,
    index: usize,
) -> anyhow::Result<Spawned> {
    let (config_path, temp) = match &args.config {
        Some(p) => (p.clone(), None),
        None => {
            let p = std::env::temp_dir().join(format!(
                "shardnet-bench-{}-{shards}-{index}.toml",
                std::process::id()
            ));
            std::fs::write(&p, generated_config_with_broker(args, shards, broker_url))
                .with_context(|| format!("cannot write {}", p.display()))?;
            (p.clone(), Some(TempPath(p)))
        }
    };
    let shards_flag = args.config.is_some().then_some(shards);
    start_serve(args, &config_path, shards_flag, temp)
}

/// Starts this binary's `serve --config PATH` like [`shardnet`] (pinned, under the quota), with
/// a configuration the caller wrote.
pub fn shardnet_with_config(args: &BenchArgs, config_path: &Path) -> anyhow::Result<Spawned> {
    start_serve(args, config_path, None, None)
}

fn start_serve(
    args: &BenchArgs,
    config_path: &Path,
    shards: Option<usize>,
    temp: Option<TempPath>,
) -> anyhow::Result<Spawned> {
    let cores = parse_cores(&args.server_cores)?;
    let taskset = taskset()?;
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let cgroup = args
        .server_quota
        .map(|q| CpuCgroup::create(Quota::percent(q)))
        .transpose()?;
    let ready = ReadyListener::bind().context("cannot open the readiness socket")?;
    let mut cmd = pinned(&taskset, &cores);
    cmd.arg(exe).arg("serve").arg("--config").arg(config_path);
    if let Some(shards) = shards {
        cmd.arg("--shards").arg(shards.to_string());
    }
    let mut server = Spawned {
        child: cmd
            .env("SHARDNET_LOG", "warn")
            .env("NOTIFY_SOCKET", ready.notify_socket())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start the server")?,
        addrs: Vec::new(),
        _cgroup: cgroup,
        _config: temp,
    };
    let stderr = server.child.stderr.take().expect("piped");
    let tail = StderrTail::start(stderr, |l| {
        l.contains("ERROR") || l.starts_with("shardnet:")
    });
    let announced = match ready.wait(START_TIMEOUT, || server.exited()) {
        Ok(a) => a,
        Err(e) => {
            // Its errors were forwarded above as they came; this waits for the last of them.
            drop(tail.ended());
            return Err(anyhow::Error::new(e).context(format!(
                "the spawned server (pid {}) did not start (see its messages above)",
                server.pid()
            )));
        }
    };
    server.addrs = announced.listeners;
    if let Some(cgroup) = &server._cgroup {
        cgroup.adopt(server.pid())?;
    }
    Ok(server)
}

fn taskset() -> anyhow::Result<PathBuf> {
    require_program("taskset", "Debian/Ubuntu: apt-get install util-linux")
}

fn pinned(taskset: &Path, cores: &[usize]) -> Command {
    let mut cmd = Command::new(taskset);
    let list: Vec<String> = cores.iter().map(|c| c.to_string()).collect();
    cmd.arg("-c").arg(list.join(","));
    cmd
}

/// A free port on 127.0.0.1 (bound and released: a small race, acceptable for a benchmark).
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts another server command (`{port}` replaced), pinned and capped like shardnet; waits
/// until its port accepts.
pub fn command(template: &str, cores: &[usize], quota: Option<Quota>) -> anyhow::Result<Spawned> {
    check_command(template)?;
    let taskset = taskset()?;
    let cgroup = quota.map(CpuCgroup::create).transpose()?;
    let port = free_port()?;
    let line = template.replace("{port}", &port.to_string());
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut cmd = pinned(&taskset, cores);
    cmd.arg("sh").arg("-c").arg(format!("exec {line}"));
    let mut server = Spawned {
        child: cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start `{line}`"))?,
        addrs: vec![("main".into(), addr)],
        _cgroup: cgroup,
        _config: None,
    };
    let stderr = server.child.stderr.take().expect("piped");
    let tail = StderrTail::start(stderr, |_| false);
    let deadline = Instant::now() + START_TIMEOUT;
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if let Some(status) = server.exited() {
            bail!(
                "`{line}` exited ({status}) before accepting connections on {addr}; {}",
                tail.text()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "`{line}` did not accept connections on {addr} within {START_TIMEOUT:?}; {}",
                tail.text()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Some(cgroup) = &server._cgroup {
        cgroup.adopt(server.pid())?;
    }
    Ok(server)
}

/// A broker the bench started (`--broker`): killed and reaped on drop.
pub struct SpawnedBroker {
    child: Child,
    url: String,
}

impl SpawnedBroker {
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for SpawnedBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `redis-server` or `nats-server` on a free loopback port, without persistence, and
/// waits (bounded) until it accepts connections.
pub fn broker(kind: super::args::BrokerArg) -> anyhow::Result<SpawnedBroker> {
    use super::args::BrokerArg;
    let port = free_port()?;
    let (program, install) = match kind {
        BrokerArg::Redis => ("redis-server", "apt-get install redis-server"),
        BrokerArg::Nats => ("nats-server", "apt-get install nats-server"),
    };
    let exe = require_program(program, install)?;
    let mut cmd = Command::new(exe);
    let port_s = port.to_string();
    let url = match kind {
        BrokerArg::Redis => {
            cmd.args(["--port", &port_s, "--bind", "127.0.0.1"]).args([
                "--save",
                "",
                "--appendonly",
                "no",
            ]);
            format!("redis://127.0.0.1:{port}/0")
        }
        BrokerArg::Nats => {
            cmd.args(["-a", "127.0.0.1", "-p", &port_s]);
            format!("nats://127.0.0.1:{port}")
        }
    };
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {program}"))?;
    let mut broker = SpawnedBroker { child, url };
    let deadline = Instant::now() + START_TIMEOUT;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = broker.child.try_wait()? {
            bail!("{program} exited at start ({status})");
        }
        if Instant::now() > deadline {
            bail!("{program} did not listen on port {port} within {START_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(broker)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_found_on_path_or_by_path() {
        assert!(find_program("sh").is_some());
        assert!(find_program("/bin/sh").is_some());
        assert!(find_program("no-such-program-here").is_none());
        assert!(find_program("/etc/passwd").is_none(), "not executable");
        let e = require_program("no-such-program-here", "apt-get install it").unwrap_err();
        assert_eq!(
            e.to_string(),
            "`no-such-program-here` is not installed (apt-get install it)"
        );
    }

    #[test]
    fn compare_commands_are_checked_with_what_to_build() {
        check_command("sh -c 'exit 0' {port}").unwrap();
        check_command("PORT={port} sh").unwrap();
        let e = check_command("target/release/examples/nothing-like-it --port {port}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cargo build --release --examples"), "{e}");
        let e = check_command("no-such-server {port}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`no-such-server` not found: not on PATH"), "{e}");
    }
}
