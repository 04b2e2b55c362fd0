//! Servers the bench starts: shardnet itself, or any other command (`--compare`), pinned with
//! `taskset` and optionally held to a CPU quota in a cgroup of their own. Killed on drop.

use std::io::BufRead;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::{parse_cores, BenchArgs};

/// A CPU quota: `percent` of one core.
#[derive(Debug, Clone, Copy)]
pub struct Quota(u32);

impl Quota {
    pub fn percent(p: u32) -> Quota {
        Quota(p.clamp(1, 10_000))
    }
}

/// A cgroup holding one process under a CPU quota; removed on drop.
struct CpuCgroup {
    dir: PathBuf,
}

impl CpuCgroup {
    /// cgroup v1 (`/sys/fs/cgroup/cpu`) or v2 (`cpu.max`), whichever this host has.
    fn create(pid: u32, quota: Quota) -> anyhow::Result<CpuCgroup> {
        let name = format!("shardnet-bench-{pid}");
        let v1 = PathBuf::from("/sys/fs/cgroup/cpu");
        let v2 = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.join("cgroup.controllers").exists());
        let period = 100_000u64;
        let quota_us = period * quota.0 as u64 / 100;
        if v1.join("cpu.cfs_quota_us").exists() {
            let dir = v1.join(&name);
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            std::fs::write(dir.join("cpu.cfs_period_us"), period.to_string())?;
            std::fs::write(dir.join("cpu.cfs_quota_us"), quota_us.to_string())?;
            std::fs::write(dir.join("cgroup.procs"), pid.to_string())?;
            Ok(CpuCgroup { dir })
        } else if let Some(root) = v2 {
            let dir = root.join(&name);
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            std::fs::write(dir.join("cpu.max"), format!("{quota_us} {period}"))?;
            std::fs::write(dir.join("cgroup.procs"), pid.to_string())?;
            Ok(CpuCgroup { dir })
        } else {
            bail!("no cgroup CPU controller found for --server-quota");
        }
    }
}

impl Drop for CpuCgroup {
    fn drop(&mut self) {
        // The process is gone by now; an empty cgroup can be removed.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A server process started by the bench.
pub struct Spawned {
    child: Child,
    addrs: Vec<(String, SocketAddr)>,
    _cgroup: Option<CpuCgroup>,
    _config: Option<tempfile_path::TempPath>,
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
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A file removed on drop.
mod tempfile_path {
    pub struct TempPath(pub std::path::PathBuf);
    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// The configuration of a bench-spawned shardnet: echo and http listeners on free ports,
/// timeouts off (the load decides when connections end).
pub fn generated_config(args: &BenchArgs, shards: usize) -> String {
    let trigger = match args.trigger {
        Some(super::TriggerArg::Level) => "level",
        _ => "edge",
    };
    let balance = args.balance.as_deref().unwrap_or("round-robin");
    format!(
        "[server]\nshards = {shards}\npin = true\ntrigger = \"{trigger}\"\nbalance = \"{balance}\"\nstats_interval = \"0s\"\nshutdown_timeout = \"2s\"\n\n\
         [limits]\nidle_timeout = \"0s\"\n\n\
         [[listener]]\nname = \"echo\"\naddr = \"127.0.0.1:0\"\nservice = \"echo\"\nbacklog = 65535\n\n\
         [[listener]]\nname = \"http\"\naddr = \"127.0.0.1:0\"\nservice = \"http\"\nbacklog = 65535\n\n\
         [[listener.websocket]]\npath = \"/ws/echo\"\nmode = \"echo\"\nping_interval = \"0s\"\n\n\
         [[listener.websocket]]\npath = \"/ws\"\nmode = \"pubsub\"\nping_interval = \"0s\"\n"
    )
}

/// Starts this binary's `serve`, pinned to the server cores, and waits for its listeners.
pub fn shardnet(args: &BenchArgs, shards: usize) -> anyhow::Result<Spawned> {
    let cores = parse_cores(&args.server_cores)?;
    let (config_path, temp) = match &args.config {
        Some(p) => (p.clone(), None),
        None => {
            let p = std::env::temp_dir().join(format!(
                "shardnet-bench-{}-{shards}.toml",
                std::process::id()
            ));
            std::fs::write(&p, generated_config(args, shards))?;
            (p.clone(), Some(tempfile_path::TempPath(p)))
        }
    };
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let mut cmd = taskset(&cores);
    cmd.arg(exe).arg("serve").arg("--config").arg(&config_path);
    if args.config.is_some() {
        cmd.arg("--shards").arg(shards.to_string());
    }
    let mut child = cmd
        .env("SHARDNET_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start the server")?;
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(rest) = line.split("listening: ").nth(1) {
                if let Some((name, addr)) = rest.split_once(" on ") {
                    if let Ok(a) = addr.trim().parse::<SocketAddr>() {
                        let _ = tx.send(Some((name.to_string(), a)));
                    }
                }
            } else if line.contains("shards on cores") {
                let _ = tx.send(None);
            } else if line.contains("ERROR") || line.starts_with("shardnet:") {
                eprintln!("server: {line}");
            }
        }
    });
    let mut addrs = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(Some(a)) => addrs.push(a),
            Ok(None) => break,
            Err(_) => {
                let _ = child.kill();
                bail!("the spawned server did not start (see its messages above)");
            }
        }
    }
    let cgroup = match args.server_quota {
        Some(q) => Some(CpuCgroup::create(child.id(), Quota::percent(q))?),
        None => None,
    };
    Ok(Spawned {
        child,
        addrs,
        _cgroup: cgroup,
        _config: temp,
    })
}

fn taskset(cores: &[usize]) -> Command {
    let mut cmd = Command::new("taskset");
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
    let port = free_port()?;
    let line = template.replace("{port}", &port.to_string());
    let mut cmd = taskset(cores);
    cmd.arg("sh").arg("-c").arg(format!("exec {line}"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start `{line}`"))?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if Instant::now() > deadline || child.try_wait()?.is_some() {
            let _ = child.kill();
            bail!("`{line}` did not accept connections on {addr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let cgroup = match quota {
        Some(q) => Some(CpuCgroup::create(child.id(), q)?),
        None => None,
    };
    Ok(Spawned {
        child,
        addrs: vec![("main".into(), addr)],
        _cgroup: cgroup,
        _config: None,
    })
}
