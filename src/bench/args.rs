//! The bench's command line: every flag of `shardnet bench`, and what a run derives from them
//! (the client [`Plan`], the listener of a spawned shardnet each mode talks to, core and source
//! address lists). Parsing only: nothing here starts a thread or a process.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};

use super::client::{Mode, Payload, Plan};
use crate::config::Trigger;

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Workload: echo, http (GET --path, pipelined --depth), ws (WebSocket echo), fanout
    /// (WebSocket subscribers, publishes at --rate), idle (hold connections, report server RSS
    /// per connection), connect (connect, one request, close).
    #[arg(long, value_enum, default_value = "echo")]
    pub mode: Mode,
    /// A running server to load (echo port for echo; HTTP port for http, ws, fanout, connect).
    #[arg(long, conflicts_with = "spawn")]
    pub target: Option<SocketAddr>,
    /// Start a shardnet server for the run (from this binary), pinned to --server-cores.
    #[arg(long)]
    pub spawn: bool,
    /// Configuration for the spawned server (default: a generated one with echo and http listeners).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Shards of the spawned server (of each process, with --server-processes).
    #[arg(long, default_value_t = 1)]
    pub shards: usize,
    /// Spawned server processes sharing each port (`reuse_port`, as nginx workers do), started
    /// one after another, each confirmed ready, taking --server-cores in turn. Default: one, or as many as -c needs when one
    /// process cannot hold them under RLIMIT_NOFILE (the bench says how many it picked). Each
    /// process also gets an HTTP listener of its own (`admin`), where fan-out publishes.
    #[arg(long)]
    pub server_processes: Option<usize>,
    /// Cores for the spawned server's shards (comma list).
    #[arg(long, default_value = "0")]
    pub server_cores: String,
    /// Cores for the load generator's client shards (comma list; one client shard per core).
    #[arg(long, default_value = "1")]
    pub client_cores: String,
    /// epoll mode of the spawned server.
    #[arg(long, value_enum)]
    pub trigger: Option<TriggerArg>,
    /// How the spawned server spreads connections over its shards (round-robin,
    /// least-connections, reuseport); compare them with `--mode connect`.
    #[arg(long, value_parser = ["round-robin", "least-connections", "reuseport"])]
    pub balance: Option<String>,
    /// Limit the server to this percentage of one core with a cgroup CPU quota, so that the
    /// server, not the client, is the bottleneck (needs root: a writable cgroup CPU controller).
    #[arg(long)]
    pub server_quota: Option<u32>,
    /// The server's pid when it runs already (for CPU and RSS figures).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// With --target: the server's admin listener (an HTTP listener with /stats), asked for the
    /// shard count recorded in the --json report. Without it, an HTTP --target is asked.
    #[arg(long, conflicts_with = "spawn")]
    pub admin: Option<SocketAddr>,
    /// Connections.
    #[arg(short = 'c', long, default_value_t = 50)]
    pub connections: usize,
    /// Requests in flight per connection (closed loop).
    #[arg(short = 'd', long, default_value_t = 1)]
    pub depth: usize,
    /// Request size in bytes (echo, ws).
    #[arg(short = 's', long, default_value_t = 64)]
    pub size: usize,
    /// HTTP path (http, connect) or WebSocket path (ws, idle --idle-ws).
    #[arg(long)]
    pub path: Option<String>,
    /// Measured duration.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Warm-up before measuring.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Open loop: total requests per second (latency from the intended send time); in fanout
    /// mode, publishes per second.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Idle mode: upgrade every connection to WebSocket before holding it.
    #[arg(long)]
    pub idle_ws: bool,
    /// A token for every WebSocket upgrade (and every --mode connect connection), sent as
    /// `Authorization: Bearer`.
    #[arg(long, conflicts_with_all = ["token_file", "mint"])]
    pub token: Option<String>,
    /// Tokens, one per line, used by the connections in turn.
    #[arg(long, conflicts_with = "mint")]
    pub token_file: Option<PathBuf>,
    /// Sign one token per connection before the run (sub bench-N, exp in a day, subscribe
    /// ["*"]): ALG:KEYFILE with HS256 (the secret file) or ES256, RS256, EdDSA (a PEM private key).
    #[arg(long)]
    pub mint: Option<String>,
    /// Claims added to --mint's tokens, as a JSON object (e.g. '{"aud":"shardnet"}'); a "kid"
    /// member goes into the header instead.
    #[arg(long, requires = "mint")]
    pub mint_claims: Option<String>,
    /// Internal: the number of --mint's first subject (`bench-N`), so that --processes'
    /// children mint subjects of their own.
    #[arg(long, hide = true, default_value_t = 0)]
    pub mint_first: usize,
    /// Send the token as a `token` query parameter instead of a header.
    #[arg(long)]
    pub token_in_query: bool,
    /// Connect mode: each connection is a WebSocket upgrade of --path (default /ws; 101
    /// expected) instead of a GET. Implied by --token, --token-file and --mint.
    #[arg(long)]
    pub upgrade: bool,
    /// WebSocket modes (ws, fanout, idle --idle-ws): offer permessage-deflate as a browser does
    /// (`permessage-deflate; client_max_window_bits`) and fail unless the server accepts; inflate
    /// what the server compresses; in ws mode, send every message compressed.
    #[arg(long)]
    pub deflate: bool,
    /// Message content in ws and fanout modes: pattern (a byte pattern that shows corruption and
    /// does not compress) or json (quotes of a feed; a fan-out publish is padded to --size with
    /// them). Compare compressed and plain runs with the same payload.
    #[arg(long, value_enum, default_value = "pattern")]
    pub payload: Payload,
    /// The spawned server's WebSocket routes' `compression` (default: the configuration's).
    #[arg(long, value_parser = ["off", "shared", "dedicated"])]
    pub compression: Option<String>,
    /// Source addresses to spread connections over, e.g. 127.0.0.2-127.0.0.40 (each gives
    /// about 28k ephemeral ports).
    #[arg(long)]
    pub source_addrs: Option<String>,
    /// Write the report (with config, shards, pinning, kernel, CPU and commit) as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Run the same load at each shard count (spawned server) and recommend one.
    #[arg(long)]
    pub sweep_shards: Option<String>,
    /// Other server commands to run the same load against, alternating with shardnet in one run;
    /// `{port}` is replaced by a free port. Pinned and capped like the spawned shardnet.
    #[arg(long)]
    pub compare: Vec<String>,
    /// Name for each --compare command in the table (same order).
    #[arg(long)]
    pub compare_name: Vec<String>,
    /// HTTP mode: drive the load with Debian's `wrk` (one thread per client core, --depth
    /// requests pipelined by benches/pipeline.lua) instead of the built-in client.
    #[arg(long)]
    pub wrk: bool,
    /// Spread the connections over this many client processes (past one process's descriptor
    /// limit); their results are merged (histograms exactly). Default: one, or as many as -c
    /// needs under RLIMIT_NOFILE (the bench says how many it picked).
    #[arg(long)]
    pub processes: Option<usize>,
    /// Fan-out: stop after this many measured publishes (after the warm-up's), then wait for
    /// every subscriber to have them (the broadcast scenario: `--publishes 10 --rate 0.5`).
    #[arg(long)]
    pub publishes: Option<u64>,
    /// Internal: the fan-out topic (the same in every client process of a run).
    #[arg(long, hide = true)]
    pub topic: Option<String>,
    /// Internal: run as one of --processes' children, writing the result to this file.
    #[arg(long, hide = true)]
    pub child_report: Option<PathBuf>,
    /// Rounds for --compare and --sweep-shards (medians are reported).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Measure a hand-over (with --spawn): -c idle connections and --probes busy ones move to a
    /// new process with --takeover-shards shards; reports the hand-over time, the longest round
    /// trip a probe saw, and whether any connection was lost.
    #[arg(long, requires = "spawn")]
    pub takeover: bool,
    /// Shards of the process that takes over (default: --shards).
    #[arg(long)]
    pub takeover_shards: Option<usize>,
    /// Idle mode with --spawn and --processes: once the connections are held, every server
    /// process is handed over to a new one (the request `shardnet upgrade` makes, over a
    /// control socket each process gets), one after another; the final probe then checks that
    /// every connection is still open. The new processes are stopped by pid at the end.
    #[arg(long, requires = "spawn", conflicts_with = "takeover")]
    pub takeover_all: bool,
    /// Busy connections measuring echo round trips throughout a --takeover run.
    #[arg(long, default_value_t = 4)]
    pub probes: usize,
    /// Speak TLS (https, wss, TLS echo) to the target, with rustls; the server must have `tls`
    /// on the listener. In connect mode every connection makes a full handshake (no resumption).
    #[arg(long, requires = "tls_ca")]
    pub tls: bool,
    /// PEM file of the CA certificates that vouch for the server's certificate (--tls).
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// The name the server's certificate must carry (--tls).
    #[arg(long, default_value = "localhost")]
    pub tls_name: String,
    /// With --spawn: start this broker (redis-server or nats-server, on a free port, no
    /// persistence) and run the spawned processes against it (`[broker]`), so a fan-out crosses
    /// processes through it.
    #[arg(long, value_enum, requires = "spawn", conflicts_with = "config")]
    pub broker: Option<BrokerArg>,
}

/// The brokers `--broker` can start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BrokerArg {
    Redis,
    Nats,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TriggerArg {
    Edge,
    Level,
}

impl From<TriggerArg> for Trigger {
    fn from(t: TriggerArg) -> Trigger {
        match t {
            TriggerArg::Edge => Trigger::Edge,
            TriggerArg::Level => Trigger::Level,
        }
    }
}

pub fn parse_cores(s: &str) -> anyhow::Result<Vec<usize>> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            p.trim()
                .parse::<usize>()
                .with_context(|| format!("bad core id `{p}`"))
        })
        .collect()
}

/// `127.0.0.2-127.0.0.40` or a comma list (both may be mixed: `127.0.0.2-127.0.0.9,127.0.0.20`).
pub fn parse_sources(s: &str) -> anyhow::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for part in s.split(',') {
        if let Some((a, b)) = part.split_once('-') {
            let (a, b): (std::net::Ipv4Addr, std::net::Ipv4Addr) = (
                a.trim().parse().context("source range start")?,
                b.trim().parse().context("source range end")?,
            );
            let (a, b) = (u32::from(a), u32::from(b));
            if b < a || b - a > 65536 {
                bail!("bad source address range `{part}`");
            }
            out.extend((a..=b).map(|x| IpAddr::V4(x.into())));
        } else {
            out.push(
                part.trim()
                    .parse()
                    .with_context(|| format!("bad source address `{part}`"))?,
            );
        }
    }
    Ok(out)
}

impl BenchArgs {
    /// The client side of TLS for --tls (`None` without it); `resume`: whether to resume
    /// sessions.
    pub(super) fn tls_connector(
        &self,
        resume: bool,
    ) -> anyhow::Result<Option<crate::tls::TlsConnector>> {
        if !self.tls {
            return Ok(None);
        }
        let ca = self.tls_ca.as_ref().context("--tls needs --tls-ca PATH")?;
        // HTTP and WebSocket modes offer http/1.1, as browsers do; echo offers no ALPN.
        let alpn: &[&[u8]] = match self.mode {
            Mode::Echo => &[],
            Mode::Idle if !self.idle_ws => &[],
            _ => &[b"http/1.1"],
        };
        let connector = crate::tls::TlsConnector::from_ca(ca, &self.tls_name, alpn, resume)
            .map_err(|e| anyhow::anyhow!("--tls-ca {e}"))?;
        Ok(Some(connector))
    }

    pub(super) fn plan(&self, host: &str) -> Plan {
        let default_path = match self.mode {
            Mode::Ws | Mode::Idle => "/ws/echo",
            Mode::Fanout => "/ws",
            _ => "/plaintext",
        };
        let path = self
            .path
            .clone()
            .unwrap_or_else(|| default_path.to_string());
        Plan {
            mode: self.mode,
            depth: self.depth.max(1),
            size: self.size.max(1),
            idle_ws: (self.mode == Mode::Idle && self.idle_ws).then(|| path.clone()),
            deflate: self.deflate,
            payload: self.payload,
            path,
            // Fan-out: --rate is the publish rate, driven by the controller, not per connection.
            rate_per_shard: match self.mode {
                Mode::Fanout => 0.0,
                _ => self.rate.map_or(0.0, |r| r / self.client_shards() as f64),
            },
            host: host.to_string(),
            tokens: Arc::from(Vec::new()),
            token_in_query: self.token_in_query,
            topic: self
                .topic
                .clone()
                .unwrap_or_else(|| format!("bench-{}", std::process::id())),
            window_after: self.fanout_window_after(),
        }
    }

    /// Client shards per client process: one per client core.
    pub(super) fn client_shards(&self) -> usize {
        parse_cores(&self.client_cores).map_or(1, |c| c.len().max(1))
    }

    /// Fan-out: the publishes of the warm-up (at --rate), which are not counted. A sequence
    /// number rather than an instant, so every client process agrees on it without a clock.
    pub fn fanout_window_after(&self) -> u64 {
        (self.warmup.as_secs_f64() * self.rate.unwrap_or(1000.0).max(0.0)).round() as u64
    }

    /// Whether the bench starts the server(s) itself (--spawn, --compare, --sweep-shards), and
    /// so knows their configuration.
    pub fn spawns(&self) -> bool {
        self.spawn || !self.compare.is_empty() || self.sweep_shards.is_some()
    }

    /// The listener of a spawned shardnet this mode talks to.
    pub(super) fn listener(&self) -> &'static str {
        match self.mode {
            Mode::Echo => "echo",
            Mode::Idle if !self.idle_ws => "echo",
            _ => "http",
        }
    }

    /// Whether connections carry tokens.
    pub fn has_tokens(&self) -> bool {
        self.token.is_some() || self.token_file.is_some() || self.mint.is_some()
    }

    /// The load and the servers' pinning in one line, for the summary tables.
    pub(super) fn describe(&self) -> String {
        let tokens = match (&self.mint, self.has_tokens()) {
            (Some(m), _) => format!(" tokens {}", m.split(':').next().unwrap_or("")),
            (None, true) => " tokens".to_string(),
            (None, false) => String::new(),
        };
        format!(
            "{:?}{}{tokens} c={} d={} s={}{}{} server cores {}{} quota {} client cores {}{}",
            self.mode,
            if self.wrk { " (wrk)" } else { "" },
            self.connections,
            self.depth,
            self.size,
            match self.payload {
                Payload::Pattern => "",
                Payload::Json => " payload json",
            },
            if self.deflate { " deflate" } else { "" },
            self.server_cores,
            self.server_processes
                .filter(|&k| k > 1)
                .map_or(String::new(), |k| format!(" x{k} processes")),
            self.server_quota.map_or("none".into(), |q| format!("{q}%")),
            self.client_cores,
            self.balance
                .as_deref()
                .map_or(String::new(), |b| format!(" balance {b}"))
        ) + &self
            .broker
            .map_or(String::new(), |b| format!(" broker {b:?}").to_lowercase())
    }
}
