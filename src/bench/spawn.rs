//! Servers the bench starts: shardnet itself, or any other command (`--compare`), pinned with
//! `taskset` and optionally held to a CPU quota in a cgroup of their own.
//!
//! Every process is owned by a [`Spawned`] guard from the moment it exists, so any error after
//! that (no readiness, no cgroup, a server that exits) stops it: the guard kills it by pid and
//! reaps it on drop, then removes its cgroup. If the bench itself is killed, the kernel kills
//! every child with it (the parent-death signal, [`crate::sys::process::die_with_parent`]). The
//! quota's cgroup is created before the process, so a host where it cannot be (not root) fails
//! before anything starts. A spawned shardnet announces its listeners over the sd_notify socket
//! ([`crate::ready`]); another command is ready when its port accepts.
//!
//! Past one process's descriptor limit, a [`ServerGroup`] of shardnet processes shares the
//! ports with `reuse_port` (the kernel spreads connections over them by a hash of the
//! addresses); each also has an HTTP listener of its own (`admin`) for what must reach one
//! process: a publish, /metrics.

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
/// timeouts off (the load decides when connections end). With `--server-processes` above one,
/// see [`group_config`].
pub fn generated_config(args: &BenchArgs, shards: usize) -> String {
    config_with_broker(args, shards, None)
}

/// [`generated_config`] against `broker_url`, if given.
fn config_with_broker(args: &BenchArgs, shards: usize, broker_url: Option<&str>) -> String {
    match args.server_processes {
        Some(k) if k > 1 => group_config(args, shards, 0, 0, broker_url),
        _ => config_text(args, shards, None, broker_url),
    }
}

/// The control socket of spawned process `index` under --takeover-all.
pub fn control_path(index: usize) -> PathBuf {
    std::env::temp_dir().join(format!(
        "shardnet-bench-{}-{index}.sock",
        std::process::id()
    ))
}

/// `text` with process `index`'s control socket in its `[server]` section, under
/// --takeover-all (unchanged otherwise).
fn with_control(args: &BenchArgs, text: &str, index: usize) -> String {
    if !args.takeover_all {
        return text.to_string();
    }
    let line = format!(
        "[server]\ncontrol_socket = \"{}\"\n",
        control_path(index).display()
    );
    text.replacen("[server]\n", &line, 1)
}

/// The configuration of each process of a [`ServerGroup`]: the echo and http listeners on the
/// given ports (0 for the first process, which picks them) with `reuse_port`, and an `admin`
/// HTTP listener of the process's own on a free port.
pub fn group_config(
    args: &BenchArgs,
    shards: usize,
    echo: u16,
    http: u16,
    broker_url: Option<&str>,
) -> String {
    config_text(args, shards, Some((echo, http)), broker_url)
}

/// The generated configuration; with `broker_url`, a `[broker]` section for it (its kind from
/// the scheme, a prefix of this bench's own so that runs sharing a broker do not mix).
fn config_text(
    args: &BenchArgs,
    shards: usize,
    shared: Option<(u16, u16)>,
    broker_url: Option<&str>,
) -> String {
    let trigger = match args.trigger {
        Some(TriggerArg::Level) => "level",
        _ => "edge",
    };
    let balance = args.balance.as_deref().unwrap_or("round-robin");
    let (echo, http) = shared.unwrap_or((0, 0));
    let reuse = if shared.is_some() {
        "reuse_port = true\n"
    } else {
        ""
    };
    let admin = if shared.is_some() {
        "\n[[listener]]\nname = \"admin\"\naddr = \"127.0.0.1:0\"\nservice = \"http\"\n"
    } else {
        ""
    };
    let compression = args
        .compression
        .as_deref()
        .map_or(String::new(), |c| format!("compression = \"{c}\"\n"));
    let mut c = format!(
        "[server]\nshards = {shards}\npin = true\ntrigger = \"{trigger}\"\nbalance = \"{balance}\"\nstats_interval = \"0s\"\nshutdown_timeout = \"2s\"\n\n\
         [limits]\nidle_timeout = \"0s\"\n\n\
         [[listener]]\nname = \"echo\"\naddr = \"127.0.0.1:{echo}\"\nservice = \"echo\"\nbacklog = 65535\n{reuse}\n\
         [[listener]]\nname = \"http\"\naddr = \"127.0.0.1:{http}\"\nservice = \"http\"\nbacklog = 65535\n{reuse}\n\
         [[listener.websocket]]\npath = \"/ws/echo\"\nmode = \"echo\"\nping_interval = \"0s\"\n{compression}\n\
         [[listener.websocket]]\npath = \"/ws\"\nmode = \"pubsub\"\nping_interval = \"0s\"\n{compression}{admin}"
    );
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

/// Connections one spawned shardnet process of `shards` shards holds under the descriptor limit
/// `nofile` (its `max_connections = "auto"`).
pub fn capacity(args: &BenchArgs, shards: usize, nofile: u64) -> usize {
    let text = group_config(args, shards, 0, 0, None);
    crate::config::Config::parse(&text, "generated")
        .map(|c| c.max_connections_for(shards, Some(nofile)))
        .unwrap_or(nofile.saturating_sub(64) as usize)
}

/// `K` shardnet processes on the same ports (`reuse_port`); each stopped by its own guard on
/// drop, then the configuration file removed.
pub struct ServerGroup {
    procs: Vec<Spawned>,
    _config: Option<TempPath>,
}

impl ServerGroup {
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(Spawned::pid).collect()
    }

    pub fn len(&self) -> usize {
        self.procs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.procs.is_empty()
    }

    /// The listener `name` (the same port in every process).
    pub fn addr(&self, name: &str) -> anyhow::Result<SocketAddr> {
        self.procs.first().context("no server process")?.addr(name)
    }

    /// Every process's own HTTP listener: where a publish or a /metrics read reaches that
    /// process (`admin` in a group, the `http` listener of a single process).
    pub fn own_http(&self) -> anyhow::Result<Vec<SocketAddr>> {
        let name = if self.procs.len() > 1 {
            "admin"
        } else {
            "http"
        };
        self.procs.iter().map(|p| p.addr(name)).collect()
    }
}

/// Starts `k` shardnet processes of `shards` shards one after another, each confirmed ready by
/// its announcement before the next starts. The first picks the ports; the others bind the same
/// ones. They take `--server-cores` in turn ([`group_cores`]).
pub fn shardnet_group(
    args: &BenchArgs,
    shards: usize,
    k: usize,
    broker_url: Option<&str>,
) -> anyhow::Result<ServerGroup> {
    if k <= 1 {
        return Ok(ServerGroup {
            procs: vec![shardnet_at(args, shards, None, broker_url)?],
            _config: None,
        });
    }
    if args.config.is_some() {
        bail!(
            "--server-processes {k} runs the generated configuration (shared ports with \
             reuse_port, an admin listener per process): leave out --config"
        );
    }
    if args.server_quota.is_some() {
        bail!(
            "--server-quota holds one process: it cannot be combined with --server-processes {k}"
        );
    }
    let started = Instant::now();
    let first = shardnet_at(args, shards, Some(0), broker_url)?;
    let (echo, http) = (first.addr("echo")?.port(), first.addr("http")?.port());
    let path = std::env::temp_dir().join(format!(
        "shardnet-bench-{}-{shards}-group.toml",
        std::process::id()
    ));
    let text = group_config(args, shards, echo, http, broker_url);
    std::fs::write(&path, &text).with_context(|| format!("cannot write {}", path.display()))?;
    let mut group = ServerGroup {
        procs: vec![first],
        _config: Some(TempPath(path.clone())),
    };
    for i in 1..k {
        // With --takeover-all each process has a control socket, so a configuration of its own.
        let own = args.takeover_all.then(|| {
            let p = std::env::temp_dir().join(format!(
                "shardnet-bench-{}-{shards}-group-{i}.toml",
                std::process::id()
            ));
            (p.clone(), TempPath(p))
        });
        if let Some((p, _)) = &own {
            std::fs::write(p, with_control(args, &text, i))
                .with_context(|| format!("cannot write {}", p.display()))?;
        }
        let (config, temp) = match own {
            Some((p, t)) => (p, Some(t)),
            None => (path.clone(), None),
        };
        let p = start(args, shards, false, &config, temp, Some(i))
            .with_context(|| format!("server process {} of {k}", i + 1))?;
        group.procs.push(p);
    }
    eprintln!(
        "bench: {k} server processes of {shards} shard{} ready on ports {echo} (echo) and {http} (http) in {:.1}s",
        if shards == 1 { "" } else { "s" },
        started.elapsed().as_secs_f64()
    );
    Ok(group)
}

/// Starts this binary's `serve`, pinned to the server cores, and waits for its readiness
/// announcement (its listeners' addresses); then puts it under the quota, if any.
pub fn shardnet(args: &BenchArgs, shards: usize) -> anyhow::Result<Spawned> {
    shardnet_at(args, shards, None, None)
}

/// [`shardnet`], as process `index` of a group, against `broker_url` if given.
fn shardnet_at(
    args: &BenchArgs,
    shards: usize,
    index: Option<usize>,
    broker_url: Option<&str>,
) -> anyhow::Result<Spawned> {
    let (config_path, temp) = match &args.config {
        Some(p) => (p.clone(), None),
        None => {
            let p = std::env::temp_dir().join(format!(
                "shardnet-bench-{}-{shards}-{}.toml",
                std::process::id(),
                index.unwrap_or(0)
            ));
            let text = config_with_broker(args, shards, broker_url);
            std::fs::write(&p, with_control(args, &text, index.unwrap_or(0)))
                .with_context(|| format!("cannot write {}", p.display()))?;
            (p.clone(), Some(TempPath(p)))
        }
    };
    start(
        args,
        shards,
        args.config.is_some(),
        &config_path,
        temp,
        index,
    )
}

/// Starts this binary's `serve --config PATH` like [`shardnet`] (pinned, under the quota), with
/// a configuration the caller wrote (its shard count is the file's).
pub fn shardnet_with_config(args: &BenchArgs, config_path: &Path) -> anyhow::Result<Spawned> {
    start(args, 1, false, config_path, None, None)
}

/// The cores of process `i` of a group: its `shards` cores taken in turn from `cores`, so the
/// processes spread over all of them (a single process gets them all).
pub fn group_cores(cores: &[usize], shards: usize, i: Option<usize>) -> Vec<usize> {
    let Some(i) = i.filter(|_| !cores.is_empty()) else {
        return cores.to_vec();
    };
    let mut mine: Vec<usize> = (0..shards.max(1))
        .map(|j| cores[(i * shards.max(1) + j) % cores.len()])
        .collect();
    mine.sort_unstable();
    mine.dedup();
    mine
}

/// Starts one shardnet process on `config_path` (removed with it when `temp` is given);
/// `index` is its place in a group (its cores: [`group_cores`]); `shards_flag` passes `shards`
/// as `--shards` (for a configuration file of the user's).
fn start(
    args: &BenchArgs,
    shards: usize,
    shards_flag: bool,
    config_path: &Path,
    temp: Option<TempPath>,
    index: Option<usize>,
) -> anyhow::Result<Spawned> {
    let cores = group_cores(&parse_cores(&args.server_cores)?, shards, index);
    let taskset = taskset()?;
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let cgroup = args
        .server_quota
        .map(|q| CpuCgroup::create(Quota::percent(q)))
        .transpose()?;
    let ready = ReadyListener::bind().context("cannot open the readiness socket")?;
    let mut cmd = pinned(&taskset, &cores);
    crate::sys::process::die_with_parent(&mut cmd);
    cmd.arg(exe).arg("serve").arg("--config").arg(config_path);
    if shards_flag {
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
    // Errors, the server's own announcements, and the broker's warnings (a lost broker
    // connection explains a fan-out run's gaps).
    let tail = StderrTail::start(stderr, |l| {
        l.contains("ERROR")
            || l.starts_with("shardnet:")
            || (l.contains("WARN") && l.contains("broker:"))
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
    crate::sys::process::die_with_parent(&mut cmd);
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
    fn group_processes_take_the_server_cores_in_turn() {
        assert_eq!(group_cores(&[0, 1], 1, None), vec![0, 1]);
        assert_eq!(group_cores(&[0, 1], 1, Some(0)), vec![0]);
        assert_eq!(group_cores(&[0, 1], 1, Some(3)), vec![1]);
        assert_eq!(group_cores(&[0, 1, 2, 3], 2, Some(1)), vec![2, 3]);
        assert_eq!(group_cores(&[5], 2, Some(7)), vec![5]);
    }

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
