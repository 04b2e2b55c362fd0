//! The command line: `serve` (with `--takeover`), `upgrade`, `config check|default` (and the
//! commands later modules add).
//!
//! This is the crate's outer edge: errors become `anyhow` messages here and exit codes below.
//! Exit codes: 0 success, 1 runtime failure, 2 invalid configuration or usage.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use crossbeam_channel::{never, select, tick, unbounded, Receiver, Sender};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR2};

use crate::app::auth::{self, Auth, Reloadable};
use crate::config::{
    duration, size, Config, ConfigError, ListenerConfig, ListenerTls, MaxConnections, Shards,
    TlsVersion, DEFAULT_NAME, DEFAULT_TOML,
};
use crate::server::handover::{self, ControlEvent};
use crate::server::{Server, Takeover};
use crate::stats::Snapshot;

#[derive(Parser, Debug)]
#[command(
    name = "shardnet",
    version,
    about = "A sharded epoll server for a million connections: TCP echo, HTTP/1.1, WebSocket pub/sub"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Run the server (without --config: the embedded default configuration).
    Serve(ServeArgs),
    /// Inspect configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Load generator: per-core throughput, latency, idle memory, shard sweeps, comparisons.
    Bench(Box<crate::bench::BenchArgs>),
    /// Print the recommended shards and cores for this host and every kernel limit that matters
    /// for a million connections, with the command to change it. Changes nothing.
    Tune,
    /// Restart the running server without dropping a connection: it starts a new process (with
    /// --config, checked here first, or its own configuration file), which takes over its
    /// listeners and open connections; the old one then exits. Waits for the outcome: exit 0
    /// once the new process owns everything, 1 if the hand-over failed (the old process keeps
    /// serving), 2 for a configuration that does not parse.
    Upgrade(UpgradeArgs),
}

#[derive(Args, Debug)]
pub(crate) struct UpgradeArgs {
    /// Configuration for the new process; its `server.control_socket` names the running server
    /// unless --control does.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// The running server's control socket (its `server.control_socket`).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// How long to wait for the outcome.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

#[derive(Args, Debug)]
pub(crate) struct ServeArgs {
    /// TOML configuration file; see `shardnet config default` for every key.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Number of shards (worker threads), overriding `server.shards`.
    #[arg(long)]
    pub shards: Option<std::num::NonZeroUsize>,
    /// Take over the server behind this control socket (its `server.control_socket`): its
    /// listeners and open connections move to this process, and it exits. The configuration is
    /// checked before anything is asked; if the takeover fails, this process exits 1 and the
    /// old one keeps serving.
    #[arg(long, value_name = "PATH")]
    pub takeover: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub(crate) enum ConfigCommand {
    /// Check a configuration file: print the effective configuration (exit 0), or the error with
    /// its file:line:column and key (exit 2).
    Check { file: PathBuf },
    /// Print the embedded default configuration, with every key documented.
    Default,
}

/// Runs the command line; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => match serve(args) {
            Ok(code) => code,
            Err(e) => {
                let code = if e.downcast_ref::<ConfigError>().is_some() {
                    2
                } else {
                    1
                };
                eprintln!("shardnet: {}", error_chain(&e));
                code
            }
        },
        Command::Bench(args) => match bench(*args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("shardnet bench: {e:#}");
                1
            }
        },
        Command::Tune => {
            print!("{}", crate::tune::report());
            0
        }
        Command::Upgrade(args) => upgrade(args),
        Command::Config(ConfigCommand::Default) => {
            print!("{DEFAULT_TOML}");
            0
        }
        // The files `[auth]` and `tls` name are read too: a missing or malformed key file is an
        // error at its key, like any other.
        Command::Config(ConfigCommand::Check { file }) => match load(Some(&file)) {
            Ok((config, auth, _tls)) => {
                print!("{}", config.to_toml());
                for note in auth.notes() {
                    eprintln!("warning: {note}");
                }
                0
            }
            Err(e) => {
                eprintln!("{e}");
                2
            }
        },
    }
}

/// `e` and its causes, `: `-separated, as `{:#}` writes them, except that the chain stops at a
/// [`ConfigError`]: its message already ends with its cause (the OS error of an unreadable file),
/// and printing the cause again after it would say it twice.
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&cause.to_string());
        if cause.is::<ConfigError>() {
            break;
        }
    }
    out
}

/// `shardnet bench`. The client shards run on the engine: its warnings and errors are the
/// bench's too, so they are logged; except a shard's warning that it closed its connections at
/// `shutdown_timeout`, which is how the bench's clients end a run.
fn bench(args: crate::bench::BenchArgs) -> anyhow::Result<i32> {
    let mut builder = env_logger::Builder::new();
    builder
        .filter_level(log::LevelFilter::Warn)
        .filter_module("shardnet::server::shard", log::LevelFilter::Error)
        .format_timestamp_millis();
    if let Ok(spec) = std::env::var("SHARDNET_LOG") {
        builder.parse_filters(&spec);
    }
    let _ = builder.try_init();
    crate::bench::main(args)
}

/// Sets up logging to stderr: `SHARDNET_LOG` (env_logger syntax) overrides the config's level.
pub(crate) fn init_logging(level: log::LevelFilter) {
    let mut builder = env_logger::Builder::new();
    builder.filter_level(level).format_timestamp_millis();
    if let Ok(spec) = std::env::var("SHARDNET_LOG") {
        builder.parse_filters(&spec);
    }
    // A second initialisation (tests) is harmless.
    let _ = builder.try_init();
}

/// The configuration to serve, with the files it names read: `[auth]`'s keys and every
/// listener's TLS files (a file that cannot be used stops the start as a configuration error at
/// its key, like a bad value).
fn load(path: Option<&PathBuf>) -> Result<(Config, Auth, ListenerTls), ConfigError> {
    match path {
        Some(p) => {
            let (config, auth, src) = auth::read_config(p)?;
            let tls = config.load_tls(&src, &p.display().to_string())?;
            Ok((config, auth, tls))
        }
        None => {
            let config = Config::embedded_default();
            let tls = config.load_tls(DEFAULT_TOML, DEFAULT_NAME)?;
            Ok((config, Auth::disabled(), tls))
        }
    }
}

/// `[auth]` in one line at start and reload (kids and counts, never a secret), what loading
/// passed over, and a warning when tokens guard the WebSocket routes but anyone may publish.
fn log_auth(config: &Config, auth: &Auth) {
    log::info!("auth: {}", auth.summary());
    for note in auth.notes() {
        log::warn!("auth: {note}");
    }
    let guarded = config
        .listeners
        .iter()
        .flat_map(|l| &l.websocket)
        .any(|w| w.auth != crate::config::RouteAuth::Off);
    if guarded && !auth.publish_needs_key() {
        log::warn!(
            "auth: WebSocket routes check tokens, but POST /publish needs no key: set [auth] \
             api_keys_file"
        );
    }
}

/// `shardnet upgrade`: asks the running server (over its control socket) for a hand-over to a
/// new process, and waits for the outcome.
fn upgrade(args: UpgradeArgs) -> i32 {
    let config_path = args
        .config
        .as_ref()
        .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()));
    let config = match &config_path {
        Some(p) => match load(Some(p)) {
            Ok((c, _, _)) => Some(c),
            Err(e) => {
                eprintln!("shardnet upgrade: {e}; nothing was asked of the running server");
                return 2;
            }
        },
        None => None,
    };
    let control = args.control.clone().or_else(|| {
        config
            .as_ref()
            .and_then(|c| c.server.control_socket.clone())
    });
    let Some(control) = control else {
        eprintln!(
            "shardnet upgrade: no control socket: give --control PATH, or --config FILE with \
             [server] control_socket"
        );
        return 2;
    };
    match handover::control_request(&control, config_path.as_deref(), args.timeout) {
        Ok(message) => {
            println!("{message}");
            0
        }
        Err(e) => {
            eprintln!("shardnet upgrade: {e}");
            1
        }
    }
}

/// A process started for an upgrade that ended: (pid, its exit status, as an exit code).
type ChildExit = (u32, String, i32);

/// Starts `exe serve --config CONFIG --takeover CONTROL` for an upgrade, and a thread that
/// reports on `exits` if it ends.
fn start_upgrade(
    exe: Option<&Path>,
    config: Option<&Path>,
    control: &Path,
    exits: &Sender<ChildExit>,
) -> Result<u32, String> {
    let exe = exe.ok_or("the path of this program is unknown")?;
    let config = config.ok_or("this server runs the embedded default configuration")?;
    let mut child = std::process::Command::new(exe)
        .arg("serve")
        .arg("--config")
        .arg(config)
        .arg("--takeover")
        .arg(control)
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    let pid = child.id();
    let exits = exits.clone();
    std::thread::Builder::new()
        .name("upgrade-child".into())
        .spawn(move || {
            use std::os::unix::process::ExitStatusExt;
            let (status, code) = match child.wait() {
                Ok(s) => (
                    s.to_string(),
                    s.code().or(s.signal().map(|g| 128 + g)).unwrap_or(1),
                ),
                Err(e) => (e.to_string(), 1),
            };
            let _ = exits.send((pid, status, code));
        })
        .map_err(|e| format!("cannot watch the new process: {e}"))?;
    log::info!(
        "upgrade: started pid {pid}: {} serve --config {} --takeover {}",
        exe.display(),
        config.display(),
        control.display()
    );
    Ok(pid)
}

/// Starts the server: fresh, or (`--takeover`) on the listeners and connections of the server
/// behind that control socket.
fn start_server(
    config: &Config,
    tls: &ListenerTls,
    auth: Arc<Reloadable<Auth>>,
    takeover: Option<&Path>,
) -> anyhow::Result<(crate::app::App, Option<handover::TakeoverReport>)> {
    let Some(path) = takeover else {
        let app = crate::app::start_app(config, tls, auth).context("cannot start the server")?;
        return Ok((app, None));
    };
    let mut t = Takeover::connect(path, crate::app::HANDOVER_FORMAT)
        .with_context(|| format!("takeover through {}", path.display()))?;
    let builder = t
        .take_listeners(crate::app::engine_with_tls(config, tls))
        .context("takeover: the listeners")?;
    let mut app =
        crate::app::start_app_on(config, tls, auth, builder).context("cannot start the server")?;
    match t.take_connections(&app.server) {
        Ok(report) => Ok((app, Some(report))),
        Err(e) => {
            // Everything went back to the old process; what this one accepted meanwhile closes
            // gracefully.
            app.server.shutdown();
            Err(anyhow::Error::new(e).context("takeover failed; the old process keeps serving"))
        }
    }
}

/// Runs the server; returns the exit code (0, or the last server's as a container's init).
fn serve(args: ServeArgs) -> anyhow::Result<i32> {
    // The configuration first: a file that does not parse ends here, before a takeover asks
    // the running server for anything.
    let (mut config, auth, mut tls) = load(args.config.as_ref())?;
    if let Some(n) = args.shards {
        config.server.shards = Shards::Count(n);
    }
    init_logging(config.log.level.to_level_filter());
    match crate::sys::rlimit::raise_nofile() {
        Ok(l) if l.soft_before < l.soft => {
            log::info!(
                "RLIMIT_NOFILE: raised soft limit {} -> {} (hard {})",
                l.soft_before,
                l.soft,
                l.hard
            )
        }
        Ok(l) => log::info!("RLIMIT_NOFILE: soft {} = hard {}", l.soft, l.hard),
        Err(e) => log::warn!("RLIMIT_NOFILE: cannot raise the soft limit: {e}"),
    }
    log_max_connections(&config);

    // Signal handling first: once the acceptor runs it may use every descriptor left.
    let (sig_tx, sig_rx) = unbounded();
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP, SIGUSR2])
        .context("cannot install signal handlers")?;
    let sig_handle = signals.handle();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for s in signals.forever() {
                if sig_tx.send(s).is_err() {
                    break;
                }
            }
        })
        .context("cannot start the signal thread")?;

    // What an upgrade needs to start the next process: this program and the configuration
    // file, as absolute paths (the binary may have been replaced on disk since: the path then
    // runs the new one).
    let exe = std::env::current_exe().ok();
    let config_path = args
        .config
        .as_ref()
        .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()));
    log_auth(&config, &auth);
    let auth = Arc::new(Reloadable::new(auth));
    let (app, took_over) = start_server(&config, &tls, auth.clone(), args.takeover.as_deref())?;
    let (mut server, broker) = (app.server, app.broker);
    if let Some(r) = &took_over {
        log::info!(
            "took over from pid {}: {} listeners, {} connections ({} kept there) in {:?}",
            r.old_pid,
            r.listeners,
            r.connections,
            r.kept,
            r.took
        );
    }
    let control = config.server.control_socket.clone();
    let control_events: Receiver<ControlEvent> = match &control {
        Some(path) => {
            let replace = args.takeover.as_deref() == Some(path.as_path());
            server
                .open_control(path, replace)
                .context("cannot open the control socket")?
        }
        None => {
            if took_over.is_some() {
                log::warn!(
                    "no server.control_socket in this configuration: this process cannot be \
                     taken over in turn"
                );
            }
            never()
        }
    };
    let (child_tx, child_rx) = unbounded::<ChildExit>();
    let mut upgrading: Option<u32> = None;
    log_summary(&config, &server);

    // Ready, with the pid and every listener's bound address (port 0 picks one): supervisors,
    // the tests and `bench --spawn` read the addresses here, not from the log (crate::ready).
    notify(&crate::ready::Ready::of_this_process(server.addrs()).message());
    let mut ticker = stats_ticker(config.server.stats_interval);
    let mut last: Option<Snapshot> = None;
    let mut handed_over = false;
    loop {
        let mut upgrade_with: Option<Option<PathBuf>> = None;
        select! {
            recv(sig_rx) -> sig => match sig {
                Ok(SIGHUP) => {
                    notify("RELOADING=1");
                    if reload(args.config.as_ref(), &mut config, &mut tls, &server, &auth) {
                        ticker = stats_ticker(config.server.stats_interval);
                    }
                    notify("READY=1");
                }
                Ok(SIGUSR2) => {
                    if control.is_some() {
                        log::info!("SIGUSR2: upgrade (a new process takes this one over)");
                        upgrade_with = Some(None);
                    } else {
                        log::warn!(
                            "SIGUSR2: an upgrade needs server.control_socket; ignored"
                        );
                    }
                }
                Ok(s) => {
                    log::info!("signal {s}: draining (a second signal exits at once)");
                    notify("STOPPING=1");
                    break;
                }
                Err(_) => break,
            },
            recv(ticker) -> _ => {
                let snap = server.snapshot();
                match &broker {
                    Some(b) => log::info!(
                        "{} {}",
                        snap.log_line(last.as_ref()),
                        broker_line(&b.metrics().snapshot())
                    ),
                    None => log::info!("{}", snap.log_line(last.as_ref())),
                }
                last = Some(snap);
            }
            recv(control_events) -> event => match event {
                Ok(ControlEvent::UpgradeRequested { config }) => upgrade_with = Some(config),
                Ok(ControlEvent::HandedOver { pid, connections, kept, took }) => {
                    log::info!(
                        "handed over to pid {pid} ({connections} connections moved, {kept} kept) \
                         in {took:?}: closing the rest and exiting"
                    );
                    // The service manager's main process is the new one now.
                    notify(&format!("MAINPID={pid}\nSTATUS=handed over to pid {pid}"));
                    handed_over = true;
                    break;
                }
                Err(_) => {}
            },
            recv(child_rx) -> exit => {
                if let Ok((pid, status, _)) = exit {
                    if upgrading == Some(pid) {
                        upgrading = None;
                        let why = format!(
                            "the new process (pid {pid}) ended ({status}) before it took over; \
                             its log says why"
                        );
                        log::warn!("upgrade: {why}");
                        server.upgrade_failed(why);
                    }
                }
            }
        }
        if let Some(requested) = upgrade_with {
            let path = control.as_deref().expect("upgrades need a control socket");
            let config_file = requested.or_else(|| config_path.clone());
            match start_upgrade(exe.as_deref(), config_file.as_deref(), path, &child_tx) {
                Ok(pid) => upgrading = Some(pid),
                Err(why) => {
                    log::error!("upgrade: {why}");
                    server.upgrade_failed(why);
                }
            }
        }
    }

    // Drain in the background so a second signal can still end the process at once.
    let (done_tx, done_rx) = unbounded();
    std::thread::Builder::new()
        .name("drain".into())
        .spawn(move || {
            let clean = server.shutdown();
            let _ = done_tx.send(clean);
        })
        .context("cannot start the drain thread")?;
    // PID 1 of a container: ending would end the container under the new process.
    let init = handed_over && std::process::id() == 1;
    let clean = loop {
        select! {
            recv(done_rx) -> clean => break clean.unwrap_or(false),
            recv(sig_rx) -> sig => {
                let sig = sig.unwrap_or(SIGTERM);
                if init {
                    forward(sig);
                    continue;
                }
                log::warn!("second signal ({sig}): exiting now");
                std::process::exit(128 + sig);
            }
        }
    };
    match (clean, handed_over) {
        (true, false) => log::info!("drained; exiting"),
        (true, true) if !init => log::info!("handed over and closed what stayed; exiting"),
        (true, true) => {}
        (false, _) => log::warn!("some shards did not finish within shutdown_timeout"),
    }
    if init {
        return Ok(linger_as_init(&sig_rx, &child_rx));
    }
    sig_handle.close();
    Ok(0)
}

/// Passes signal `sig` on to every child (the server that took over, and the ones after it,
/// which the kernel reparents to PID 1).
fn forward(sig: i32) {
    for pid in crate::sys::process::children() {
        match crate::sys::process::signal(pid, sig) {
            Ok(()) => log::info!("signal {sig} passed on to pid {pid}"),
            Err(e) => log::warn!("signal {sig} to pid {pid}: {e}"),
        }
    }
}

/// After a hand-over as PID 1 (a container's entrypoint): stays as the container's init,
/// reaping every process that ends and passing signals on, until no process is left; returns
/// the exit code of the last one (the server of the moment), which becomes the container's.
fn linger_as_init(signals: &Receiver<i32>, upgrades: &Receiver<ChildExit>) -> i32 {
    use crate::sys::process::{reap, Reaped};
    log::info!(
        "PID 1: staying as this container's init (reaping, passing signals on to the server \
         that took over)"
    );
    let mut last = 0;
    let ticker = tick(Duration::from_millis(100));
    loop {
        select! {
            recv(signals) -> sig => if let Ok(sig) = sig { forward(sig) },
            // The thread watching a process this one started reaps it itself.
            recv(upgrades) -> exit => if let Ok((pid, _, code)) = exit {
                log::info!("pid {pid} ended ({code})");
                last = code;
            },
            recv(ticker) -> _ => loop {
                match reap() {
                    Ok(Reaped::Ended { pid, code }) => {
                        log::info!("pid {pid} ended ({code})");
                        last = code;
                    }
                    Ok(Reaped::Running) => break,
                    Ok(Reaped::None) | Err(_) => {
                        if crate::sys::process::children().is_empty() {
                            while let Ok((_, _, code)) = upgrades.try_recv() {
                                last = code;
                            }
                            log::info!("no process left; exiting with {last}");
                            return last;
                        }
                        break;
                    }
                }
            },
        }
    }
}

/// The broker's part of the periodic log line (totals since start).
fn broker_line(b: &crate::app::broker::BrokerStats) -> String {
    let latency = match (b.latency_quantile_us(0.5), b.latency_quantile_us(0.99)) {
        (Some(p50), Some(p99)) => format!(" latency_p50<={p50}us p99<={p99}us"),
        _ => String::new(),
    };
    format!(
        "broker={} up={} reconnects={} published={} refused={} received={} topics={} gaps={}{latency}",
        b.kind,
        u8::from(b.up),
        b.reconnects,
        b.published,
        b.refused_total(),
        b.received,
        b.topics,
        b.gaps,
    )
}

fn stats_ticker(interval: std::time::Duration) -> crossbeam_channel::Receiver<std::time::Instant> {
    if interval.is_zero() {
        crossbeam_channel::never()
    } else {
        tick(interval)
    }
}

fn notify(state: &str) {
    if let Err(e) = crate::sys::notify::notify(state) {
        log::warn!("sd_notify {state}: {e}");
    }
}

/// Says once what `max_connections` comes to: `"auto"` at info with the number chosen, an
/// explicit count above the descriptor limit as a warning (accepting pauses at the limit first).
/// The engine resolves `"auto"` with the same inputs ([`Config::max_connections_for`]).
fn log_max_connections(config: &Config) {
    let shards = config
        .server
        .shards
        .resolve(crate::sys::affinity::usable_cpus());
    let nofile = crate::sys::rlimit::nofile_soft().ok();
    let max = config.max_connections_for(shards, nofile);
    match (config.server.max_connections, nofile) {
        (MaxConnections::Auto, Some(limit)) => log::info!(
            "max_connections = \"auto\": {max} (RLIMIT_NOFILE {limit} less {} descriptors kept \
             for listeners, epoll instances, eventfds and the process)",
            config.descriptor_reserve(shards)
        ),
        (MaxConnections::Auto, None) => log::warn!(
            "max_connections = \"auto\": the descriptor limit cannot be read; using {max}"
        ),
        (MaxConnections::Count(n), Some(limit)) if n.get() as u64 > limit => log::warn!(
            "max_connections = {n} is above the descriptor limit ({limit}): accepting will pause \
             at the limit"
        ),
        (MaxConnections::Count(_), _) => {}
    }
}

/// The keys that cannot change without a restart, if `new` changes them.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let (a, b) = (&old.server, &new.server);
    let mut keys = Vec::new();
    macro_rules! check {
        ($($f:ident)*) => { $(if a.$f != b.$f { keys.push(concat!("server.", stringify!($f))); })* };
    }
    check!(shards pin cores balance trigger max_connections shutdown_timeout read_buffer read_budget events_per_wait control_socket);
    // The broker thread's connections and bounds are set up once, at start.
    let (a, b) = (&old.broker, &new.broker);
    macro_rules! check_broker {
        ($($f:ident)*) => { $(if a.$f != b.$f { keys.push(concat!("broker.", stringify!($f))); })* };
    }
    check_broker!(kind url prefix reconnect_min reconnect_max reconnect_jitter connect_timeout max_pending max_pending_bytes publish_timeout);
    // A listener's TLS files, minimum version and client CA reload live (`reload_tls`); whether
    // it has TLS at all, and its handshake timeout, need a restart like its other keys.
    let restart_part = |c: &Config| -> Vec<ListenerConfig> {
        let mut listeners = c.listeners.clone();
        for l in &mut listeners {
            if let Some(t) = &mut l.tls {
                t.cert = PathBuf::new();
                t.key = PathBuf::new();
                t.client_ca = None;
                t.min_version = TlsVersion::default();
            }
        }
        listeners
    };
    if restart_part(old) != restart_part(new) {
        keys.push("listener");
    }
    if old.offload != new.offload {
        keys.push("offload");
    }
    keys
}

/// SIGHUP: re-reads the configuration file and applies what can change live (limits, stats
/// interval, log level, all of `[auth]` with the key files it names, and TLS listeners'
/// certificates, keys, client CAs and minimum versions) in every shard; refuses the rest with a
/// log line. A file that does not parse, or whose key or TLS files cannot be used, changes
/// nothing. Returns whether anything was applied.
fn reload(
    path: Option<&PathBuf>,
    config: &mut Config,
    tls: &mut ListenerTls,
    server: &Server,
    auth: &Reloadable<Auth>,
) -> bool {
    let Some(path) = path else {
        log::warn!(
            "SIGHUP: running the embedded default configuration; there is no file to reload"
        );
        return false;
    };
    let file = path.display().to_string();
    let loaded = auth::read_config(path).and_then(|(new, new_auth, src)| {
        let new_tls = new.reload_tls(&src, &file, tls)?;
        Ok((new, new_auth, new_tls))
    });
    let (new, new_auth, new_tls) = match loaded {
        Ok(c) => c,
        Err(e) => {
            log::error!("reload refused, configuration unchanged: {e}");
            return false;
        }
    };
    for key in restart_only_changes(config, &new) {
        log::warn!("reload: `{key}` needs a restart to change; the running value stays");
    }
    config.limits = new.limits;
    config.server.stats_interval = new.server.stats_interval;
    config.log = new.log;
    // New keys verify from the next upgrade or refresh on; connections keep the grants their
    // tokens gave them until those tokens expire.
    log_auth(config, &new_auth);
    config.auth = new.auth;
    auth.replace(new_auth);
    let level = config.log.level.to_level_filter();
    if std::env::var_os("SHARDNET_LOG").is_none() {
        log::set_max_level(level);
    }
    // "reloaded" only once every shard has acknowledged the new limits.
    if let Err(e) = server.set_limits(crate::server::Limits::from(&config.limits)) {
        log::error!(
            "reload of {} incomplete: {e}; those shards keep their previous limits",
            path.display()
        );
        return true;
    }
    for (i, new_tls) in new_tls.into_iter().enumerate() {
        let Some(new_tls) = new_tls else {
            continue;
        };
        let name = &config.listeners[i].name;
        match server.set_tls(i, new_tls.acceptor()) {
            Ok(()) => {
                log::info!(
                    "listener `{name}`: TLS reloaded from {}: new handshakes use it",
                    new_tls.settings().cert.display()
                );
                if let (Some(running), Some(read)) =
                    (&mut config.listeners[i].tls, &new.listeners[i].tls)
                {
                    running.cert = read.cert.clone();
                    running.key = read.key.clone();
                    running.client_ca = read.client_ca.clone();
                    running.min_version = read.min_version;
                }
                tls[i] = Some(new_tls);
            }
            Err(e) => log::error!(
                "listener `{name}`: TLS reload incomplete: {e}; those shards keep the previous \
                 certificate"
            ),
        }
    }
    // Values in the file's own units (`0s`, `1MiB`), so the line reads like the file.
    log::info!(
        "reloaded {}: idle_timeout={} max_write_buffer={} write_timeout={} max_read_buffer={} \
         stats_interval={} log.level={}",
        path.display(),
        duration::format(config.limits.idle_timeout),
        size::format(config.limits.max_write_buffer),
        duration::format(config.limits.write_timeout),
        size::format(config.limits.max_read_buffer),
        duration::format(config.server.stats_interval),
        config.log.level.as_str()
    );
    true
}

fn log_summary(config: &Config, server: &Server) {
    let cores: Vec<String> = server
        .cores()
        .iter()
        .map(|c| c.map_or_else(|| "-".to_string(), |c| c.to_string()))
        .collect();
    let listeners: Vec<String> = config
        .listeners
        .iter()
        .zip(server.addrs())
        .map(|(l, (_, addr))| {
            let tls = if l.tls.is_some() { "+TLS" } else { "" };
            format!("{}={}({:?}{tls})", l.name, addr, l.service)
        })
        .collect();
    for (name, addr) in server.addrs() {
        log::info!("listening: {name} on {addr}");
    }
    let b = &config.broker;
    if b.kind != crate::config::BrokerKind::None {
        // The url as Display shows it: any password or token is `***`.
        log::info!(
            "broker: {} at {}, prefix `{}`: publishes go through the broker",
            b.kind.as_str(),
            b.url,
            b.prefix
        );
    }
    log::info!(
        "shardnet {}: {} shards on cores [{}], balance={:?}, trigger={:?}, listeners: {}; \
         max_connections={}, idle_timeout={}, max_write_buffer={}, write_timeout={}",
        env!("CARGO_PKG_VERSION"),
        server.shard_count(),
        cores.join(","),
        config.server.balance,
        config.server.trigger,
        listeners.join(" "),
        config.max_connections_for(server.shard_count(), crate::sys::rlimit::nofile_soft().ok()),
        duration::format(config.limits.idle_timeout),
        size::format(config.limits.max_write_buffer),
        duration::format(config.limits.write_timeout),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: &str = "[[listener]]\nname = \"e\"\naddr = \"127.0.0.1:0\"\n";

    #[test]
    fn broker_keys_are_restart_only() {
        let parse = |broker: &str| Config::parse(&format!("{broker}{L}"), "t").unwrap();
        let none = parse("");
        let redis = parse("[broker]\nkind = \"redis\"\nurl = \"redis://h:6379\"\n");
        assert_eq!(
            restart_only_changes(&none, &redis),
            vec!["broker.kind", "broker.url"]
        );
        let slower = parse(
            "[broker]\nkind = \"redis\"\nurl = \"redis://h:6379\"\npublish_timeout = \"9s\"\n",
        );
        assert_eq!(
            restart_only_changes(&redis, &slower),
            vec!["broker.publish_timeout"]
        );
        assert!(restart_only_changes(&redis, &redis).is_empty());
    }
}
