//! Configuration: TOML parsed with serde, every key optional with a documented default.
//!
//! `config/shardnet.toml` is the embedded default and documents every key. Unknown keys are
//! errors (`deny_unknown_fields`). Durations are strings such as `"30s"`, `"500ms"`, `"5m"`;
//! sizes are strings such as `"64KiB"`, `"1MiB"` or a plain integer of bytes (`units.rs` says
//! why the two differ).
//!
//! Every error names the file, line, column and dotted key (``file:line:column: key
//! `listener[1].addr`: reason``), or says `syntax error` where the file is not TOML. The locations
//! come from the TOML library's spans (`spans.rs`): checks of one value run inside the serde
//! deserializers, so the library reports the value's span; checks across keys (`validate.rs`) run
//! after parsing and point at the key, or at its table's header when the key is left to its
//! default. Parsing runs once per start or SIGHUP, on the main thread; nothing here is shared.

mod auth;
mod broker;
mod spans;
mod tls;
mod units;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::ser::SerializeStruct;
use serde::{Deserialize, Serialize, Serializer};

pub use auth::{AuthConfig, KeyAlg, PublicKeyConfig, RouteAuth};
pub use broker::{BrokerConfig, BrokerKind, BrokerUrl};
pub use tls::ListenerTls;
pub(crate) use units::{duration, size};

/// The embedded default configuration (`config/shardnet.toml`): what `shardnet serve` runs
/// without `--config`, and the documentation of every key.
pub const DEFAULT_TOML: &str = include_str!("../../config/shardnet.toml");
/// How errors in [`DEFAULT_TOML`] name it.
pub const DEFAULT_NAME: &str = "<embedded default>";

/// Why a configuration was refused. Each names the file and, where it can, the line, column
/// and dotted key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read. The Display includes the OS error; print it alone, not with
    /// its `source()` chain after it (the CLI does), or the reason appears twice.
    #[error("{path}: cannot read: {source}")]
    Io {
        /// The file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A key has a value that is refused (a wrong type, out of range, inconsistent with another).
    #[error("{file}:{line}:{column}: {}{reason}", key_label(.key))]
    Invalid {
        /// The file, as it was named.
        file: String,
        /// 1-based line of the key (or of its table, for a defaulted key).
        line: usize,
        /// 1-based column.
        column: usize,
        /// The dotted key at fault, such as `listener[1].websocket[0].path`.
        key: String,
        /// Why, in one line.
        reason: String,
    },
    /// The file is not TOML: there is no key to name, only where the parser stopped.
    #[error("{file}:{line}:{column}: syntax error: {reason}")]
    Syntax {
        /// The file, as it was named.
        file: String,
        /// 1-based line where the parser stopped.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The parser's message, in one line.
        reason: String,
    },
}

fn key_label(key: &str) -> String {
    if key.is_empty() {
        String::new()
    } else {
        format!("key `{key}`: ")
    }
}

/// A whole configuration file: `shardnet serve`'s, or one a service built on the library loads
/// ([`Config::load`]) to start the engine with [`crate::app::engine`]. Every key is optional;
/// `config/shardnet.toml` ([`DEFAULT_TOML`]) documents each with its default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[server]`: shards, pinning, balance, connection limit, buffers.
    pub server: ServerConfig,
    /// `[limits]`: per-connection timeouts and buffer bounds (reloadable).
    pub limits: LimitsConfig,
    /// `[log]`.
    pub log: LogConfig,
    /// `[offload]`: the pool blocking work goes to.
    pub offload: OffloadConfig,
    /// `[auth]`: who may connect, subscribe and publish (tokens, API keys, rate limit).
    pub auth: AuthConfig,
    /// Pub/sub across processes and hosts (`kind = "none"`: in-process only).
    pub broker: BrokerConfig,
    /// Every `[[listener]]`, in order (at least one).
    #[serde(rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
}

/// `[server]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Shards (worker threads): `"auto"` or a count.
    pub shards: Shards,
    /// Pin each shard to a core.
    pub pin: bool,
    /// The cores to pin to, one per shard (empty: the allowed cores in order).
    pub cores: Vec<usize>,
    /// How new connections are spread over the shards.
    pub balance: Balance,
    /// Edge- or level-triggered epoll.
    pub trigger: Trigger,
    /// Connections the server holds at once; see [`Config::max_connections_for`].
    pub max_connections: MaxConnections,
    /// How long a drain may take before the rest is closed.
    #[serde(with = "duration")]
    pub shutdown_timeout: Duration,
    /// Period of the statistics log line (zero: off).
    #[serde(with = "duration")]
    pub stats_interval: Duration,
    /// Size of each shard's one read buffer.
    #[serde(with = "size")]
    pub read_buffer: usize,
    /// Bytes read from one connection per wake before the others get a turn.
    #[serde(with = "size")]
    pub read_budget: usize,
    /// Events fetched per `epoll_wait`.
    pub events_per_wait: usize,
    /// The Unix socket a new process takes this one over through (`serve --takeover`,
    /// `shardnet upgrade`); `None` (the file's `""`): off.
    #[serde(with = "control_socket")]
    pub control_socket: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            shards: Shards::Auto,
            pin: true,
            cores: Vec::new(),
            balance: Balance::RoundRobin,
            trigger: Trigger::Edge,
            max_connections: MaxConnections::Auto,
            shutdown_timeout: Duration::from_secs(10),
            stats_interval: Duration::from_secs(10),
            read_buffer: 64 * 1024,
            read_budget: 256 * 1024,
            events_per_wait: 1024,
            control_socket: None,
        }
    }
}

/// `[limits]`: what each connection may hold and how long it may stall (reloadable).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// A connection with nothing queued is closed after this long without input (zero: never).
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// Queued output at which reading from the connection pauses.
    #[serde(with = "size")]
    pub max_write_buffer: usize,
    /// A connection whose queued output made no progress for this long is closed.
    #[serde(with = "duration")]
    pub write_timeout: Duration,
    /// Unconsumed input beyond which a connection is closed.
    #[serde(with = "size")]
    pub max_read_buffer: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            idle_timeout: Duration::from_secs(300),
            max_write_buffer: 1 << 20,
            write_timeout: Duration::from_secs(30),
            max_read_buffer: 2 << 20,
        }
    }
}

/// `[offload]`: the pool of threads a service hands blocking work to
/// ([`crate::server::Peers::offload`]). It exists only once a service offloads something; the
/// built-in services do not, so these keys matter to services built on the library that load
/// this configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OffloadConfig {
    /// Threads that run jobs.
    pub threads: usize,
    /// Jobs that may wait for a thread; one more (beyond the running ones) is refused.
    pub queue: usize,
}

impl Default for OffloadConfig {
    fn default() -> Self {
        let spec = crate::server::OffloadSpec::default();
        OffloadConfig {
            threads: spec.threads,
            queue: spec.queue,
        }
    }
}

impl From<&OffloadConfig> for crate::server::OffloadSpec {
    fn from(c: &OffloadConfig) -> Self {
        crate::server::OffloadSpec {
            threads: c.threads,
            queue: c.queue,
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// The log level (`SHARDNET_LOG` overrides it).
    pub level: LogLevel,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: LogLevel::Info,
        }
    }
}

/// A log level, as the file spells it (`"info"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Nothing.
    Off,
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warn,
    /// The default: start, reloads, statistics, warnings, errors.
    Info,
    /// More detail.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    /// The `log` crate's filter for this level.
    pub fn to_level_filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Off => log::LevelFilter::Off,
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }

    /// The value as the file spells it (`"info"`).
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Off => "off",
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// One `[[listener]]`. Serialized by hand: the HTTP keys are written only for HTTP listeners, so
/// the effective configuration shows what applies (validation refuses them on echo listeners,
/// which keeps the printout reading back as the same configuration).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerConfig {
    /// Unique name, used in logs and metrics.
    pub name: String,
    /// Address and port (port 0 picks one).
    #[serde(deserialize_with = "socket_addr")]
    pub addr: SocketAddr,
    /// What the built-in server runs on it.
    pub service: ServiceKind,
    /// `listen(2)` backlog.
    pub backlog: u32,
    /// SO_REUSEPORT, for a zero-downtime restart.
    pub reuse_port: bool,
    /// HTTP: a request head larger than this gets 431.
    #[serde(deserialize_with = "size::deserialize")]
    pub max_header: usize,
    /// HTTP: a body larger than this gets 413.
    #[serde(deserialize_with = "size::deserialize")]
    pub max_body: usize,
    /// HTTP: a request not complete within this gets 408.
    #[serde(deserialize_with = "duration::deserialize")]
    pub header_timeout: Duration,
    /// Serve /metrics and /stats on this listener (turn off on public listeners).
    pub admin_routes: bool,
    /// HTTP: the listener's WebSocket routes.
    pub websocket: Vec<WsRouteConfig>,
    /// Terminate TLS on this listener (echo or HTTP).
    pub tls: Option<TlsConfig>,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            name: String::new(),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            service: ServiceKind::Echo,
            backlog: 4096,
            reuse_port: false,
            max_header: 16 * 1024,
            max_body: 1 << 20,
            header_timeout: Duration::from_secs(10),
            admin_routes: true,
            websocket: Vec::new(),
            tls: None,
        }
    }
}

impl Serialize for ListenerConfig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let http = self.service == ServiceKind::Http;
        let fields = if http { 10 } else { 5 } + usize::from(self.tls.is_some());
        let mut st = s.serialize_struct("ListenerConfig", fields)?;
        st.serialize_field("name", &self.name)?;
        st.serialize_field("addr", &self.addr)?;
        st.serialize_field("service", &self.service)?;
        st.serialize_field("backlog", &self.backlog)?;
        st.serialize_field("reuse_port", &self.reuse_port)?;
        if http {
            st.serialize_field("max_header", &size::format(self.max_header))?;
            st.serialize_field("max_body", &size::format(self.max_body))?;
            st.serialize_field("header_timeout", &duration::format(self.header_timeout))?;
            st.serialize_field("admin_routes", &self.admin_routes)?;
            st.serialize_field("websocket", &self.websocket)?;
        }
        if let Some(tls) = &self.tls {
            st.serialize_field("tls", tls)?;
        }
        st.end()
    }
}

/// `tls = { cert = "PATH", key = "PATH" }` on a listener. Relative paths are taken from the
/// configuration file's directory. The files are read by [`Config::load_tls`], not by parsing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates; when set, every client must present a certificate they signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
    /// The oldest TLS version accepted.
    #[serde(default)]
    pub min_version: TlsVersion,
    /// A handshake not finished within this is closed (and counted).
    #[serde(default = "default_handshake_timeout", with = "duration")]
    pub handshake_timeout: Duration,
}

fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}

/// The oldest TLS version a listener accepts: `"1.2"` or `"1.3"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3 (the default).
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    Tls13,
}

/// One `[[listener.websocket]]` route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WsRouteConfig {
    /// URL path of the upgrade.
    pub path: String,
    /// Echo or pub/sub.
    pub mode: WsMode,
    /// Larger messages close the connection with 1009.
    #[serde(with = "size")]
    pub max_message: usize,
    /// Ping a connection idle this long (zero: never).
    #[serde(with = "duration")]
    pub ping_interval: Duration,
    /// Close a pinged connection that does not answer within this.
    #[serde(with = "duration")]
    pub pong_timeout: Duration,
    /// What happens to pub/sub messages for a subscriber that does not read.
    pub slow_consumer: SlowConsumer,
    /// Origin values accepted on upgrade (empty: any).
    pub allowed_origins: Vec<String>,
    /// Topics one connection may subscribe to at once (pub/sub routes).
    pub max_topics: usize,
    /// Longest topic name accepted, in bytes.
    #[serde(with = "size")]
    pub max_topic_length: usize,
    /// Whether upgrading needs a token (`[auth]` says how tokens are verified).
    pub auth: RouteAuth,
    /// permessage-deflate (RFC 7692) on this route.
    pub compression: Compression,
    /// The largest window a `dedicated` connection's compressor uses, as a power of two (9..=15).
    pub compression_window_bits: u8,
}

impl Default for WsRouteConfig {
    fn default() -> Self {
        WsRouteConfig {
            path: "/ws".into(),
            mode: WsMode::Pubsub,
            max_message: 1 << 20,
            ping_interval: Duration::from_secs(30),
            pong_timeout: Duration::from_secs(10),
            slow_consumer: SlowConsumer::Drop,
            allowed_origins: Vec::new(),
            max_topics: 64,
            max_topic_length: 256,
            auth: RouteAuth::Off,
            compression: Compression::Shared,
            compression_window_bits: 12,
        }
    }
}

/// `"auto"` (the CPUs this process may use, cgroup quota included) or a positive count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shards {
    /// The CPUs this process may use.
    Auto,
    /// This many.
    Count(NonZeroUsize),
}

impl Shards {
    /// The count, given the CPUs `available`.
    pub fn resolve(&self, available: usize) -> usize {
        match self {
            Shards::Auto => available.max(1),
            Shards::Count(n) => n.get(),
        }
    }
}

/// `"auto"` (the descriptor limit less what the process needs besides connections, resolved
/// at start by [`Config::max_connections_for`]) or a positive count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxConnections {
    /// The descriptor limit less a reserve.
    Auto,
    /// This many.
    Count(NonZeroUsize),
}

/// What `max_connections = "auto"` comes to when the descriptor limit cannot be read.
pub const MAX_CONNECTIONS_UNKNOWN_LIMIT: usize = 1_000_000;

impl Config {
    /// Descriptors the process keeps besides connections: stdio, the signal pipe, the sd_notify
    /// socket and a few files read while serving (16); per shard its epoll, its eventfd and room
    /// for a `/proc` read (4); per listener and shard two (its socket, one per shard under
    /// reuseport, and a second descriptor of it kept to offer it to a new process in a
    /// hand-over).
    pub fn descriptor_reserve(&self, shards: usize) -> u64 {
        let (shards, listeners) = (shards as u64, self.listeners.len() as u64);
        16 + 4 * shards + 2 * listeners * shards.max(1)
    }

    /// The connection limit to run with: an explicit count as given, `"auto"` as the soft
    /// RLIMIT_NOFILE (read after raising it) less [`Config::descriptor_reserve`], so that the
    /// server closes connections beyond it itself, counted, before `accept` runs out of
    /// descriptors. `nofile_soft` is `None` when the limit cannot be read.
    pub fn max_connections_for(&self, shards: usize, nofile_soft: Option<u64>) -> usize {
        match self.server.max_connections {
            MaxConnections::Count(n) => n.get(),
            MaxConnections::Auto => match nofile_soft {
                None => MAX_CONNECTIONS_UNKNOWN_LIMIT,
                Some(limit) => {
                    let room = limit.saturating_sub(self.descriptor_reserve(shards)).max(1);
                    usize::try_from(room).unwrap_or(usize::MAX)
                }
            },
        }
    }
}

impl Serialize for Shards {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        auto_or_count::serialize(self.count(), s)
    }
}

impl<'de> Deserialize<'de> for Shards {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(auto_or_count::deserialize(d)?.map_or(Shards::Auto, Shards::Count))
    }
}

impl Shards {
    fn count(&self) -> Option<NonZeroUsize> {
        match self {
            Shards::Auto => None,
            Shards::Count(n) => Some(*n),
        }
    }
}

impl MaxConnections {
    fn count(&self) -> Option<NonZeroUsize> {
        match self {
            MaxConnections::Auto => None,
            MaxConnections::Count(n) => Some(*n),
        }
    }
}

impl Serialize for MaxConnections {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        auto_or_count::serialize(self.count(), s)
    }
}

impl<'de> Deserialize<'de> for MaxConnections {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(auto_or_count::deserialize(d)?.map_or(MaxConnections::Auto, MaxConnections::Count))
    }
}

/// `"auto"` (`None`) or a positive integer, for the keys that take either.
mod auto_or_count {
    use super::*;

    pub(super) fn serialize<S: Serializer>(
        v: Option<NonZeroUsize>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            None => s.serialize_str("auto"),
            Some(n) => s.serialize_u64(n.get() as u64),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<NonZeroUsize>, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Option<NonZeroUsize>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"auto\" or a positive integer")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                if v == "auto" {
                    Ok(None)
                } else {
                    Err(E::custom(format!(
                        "expected \"auto\" or a positive integer, found \"{v}\""
                    )))
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                usize::try_from(v)
                    .ok()
                    .and_then(NonZeroUsize::new)
                    .map(Some)
                    .ok_or_else(|| {
                        E::custom(format!("must be \"auto\" or a positive integer, found {v}"))
                    })
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                self.visit_i64(i64::try_from(v).unwrap_or(-1))
            }
        }
        d.deserialize_any(V)
    }
}

/// `server.balance`: how new connections are spread over the shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    /// In turn.
    RoundRobin,
    /// To the shard with the fewest open connections.
    LeastConnections,
    /// Each shard accepts on its own SO_REUSEPORT socket (no acceptor thread).
    Reuseport,
}

/// `server.trigger`: the epoll mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// EPOLLET: read until drained or `read_budget`.
    Edge,
    /// Level-triggered.
    Level,
}

/// `listener.service`: what the built-in server runs on a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceKind {
    /// Echo every byte back.
    Echo,
    /// HTTP/1.1, with its WebSocket routes.
    Http,
}

/// `listener.websocket.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WsMode {
    /// Echo every message back.
    Echo,
    /// Subscribe to and publish on topics.
    Pubsub,
}

/// permessage-deflate on a WebSocket route; `service::deflate` says what each mode agrees to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Offers are declined.
    Off,
    /// Without context takeover, one compressor per shard: no memory per connection.
    Shared,
    /// A compressor per connection, with context takeover.
    Dedicated,
}

/// `listener.websocket.slow_consumer`: a subscriber whose output is over `max_write_buffer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlowConsumer {
    /// Its messages are dropped (and counted).
    Drop,
    /// It is closed with 1008.
    Disconnect,
}

/// `server.control_socket`: `""` (off) or an absolute path short enough for a Unix socket's
/// address once the server adds its temporary suffix while binding.
mod control_socket {
    use super::*;

    /// `sun_path` holds 108 bytes; binding goes through `PATH.<pid>.new` (up to 15 more).
    pub(super) const MAX_LEN: usize = 90;

    pub(super) fn serialize<S: Serializer>(v: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(
            &v.as_ref()
                .map_or_else(String::new, |p| p.display().to_string()),
        )
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<PathBuf>, D::Error> {
        let s = String::deserialize(d)?;
        if s.is_empty() {
            return Ok(None);
        }
        if !s.starts_with('/') {
            return Err(de::Error::custom(format!(
                "`{s}` is not an absolute path (a new process started elsewhere must find it)"
            )));
        }
        if s.len() > MAX_LEN || s.contains('\0') {
            return Err(de::Error::custom(format!(
                "a Unix socket path must be at most {MAX_LEN} bytes without NUL; this one has {}",
                s.len()
            )));
        }
        Ok(Some(PathBuf::from(s)))
    }
}

fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(|_| {
        de::Error::custom(format!(
            "`{s}` is not an address with a port (like 127.0.0.1:7000 or [::1]:7000)"
        ))
    })
}

/// A problem found by a check that a layer above makes ([`Config::parse_with`]): the dotted key
/// at fault and why, located in the file like the configuration's own errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError {
    /// The dotted key at fault.
    pub key: String,
    /// Why, in one line.
    pub reason: String,
}

impl Config {
    /// Parses and validates `src`; `file` names it in errors.
    pub fn parse(src: &str, file: &str) -> Result<Config, ConfigError> {
        Config::parse_with(src, file, |_| Ok(())).map(|(c, ())| c)
    }

    /// [`Config::parse`], then `check`, whose error is located at its key: what the layers
    /// above use for what this module cannot check itself (the product reads the key files
    /// `[auth]` names, so that `config check` refuses a missing or malformed one at its line).
    /// Returns what `check` made of the configuration along with it.
    pub fn parse_with<T>(
        src: &str,
        file: &str,
        check: impl FnOnce(&Config) -> Result<T, KeyError>,
    ) -> Result<(Config, T), ConfigError> {
        let doc = toml_edit::ImDocument::parse(src).map_err(|e| {
            let (line, column) = line_column(src, e.span().map_or(0, |s| s.start));
            ConfigError::Syntax {
                file: file.to_string(),
                line,
                column,
                reason: one_line(e.message()),
            }
        })?;
        let spans = spans::Spans::new(&doc);
        let config = Config::deserialize(toml_edit::de::Deserializer::from(doc)).map_err(|e| {
            let offset = e.span().map_or(0, |s| s.start);
            let key = spans.key_at(offset).unwrap_or_default().to_string();
            invalid(src, file, offset, key, one_line(e.message()))
        })?;
        config.check(&spans, src, file)?;
        let made =
            check(&config).map_err(|e| invalid(src, file, spans.at(&e.key), e.key, e.reason))?;
        Ok((config, made))
    }

    /// Reads and parses the file at `path` ([`Config::parse`]).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Ok(Config::read(path)?.0)
    }

    /// [`Config::load`], then [`Config::load_tls`]: everything `config check` checks and `serve`
    /// needs before it starts, but for the files the product's layers read ([`Config::read_with`]).
    pub fn load_with_tls(path: &Path) -> Result<(Config, ListenerTls), ConfigError> {
        let (config, src) = Config::read(path)?;
        let tls = config.load_tls(&src, &path.display().to_string())?;
        Ok((config, tls))
    }

    /// Parses and validates the file at `path`; returns the text too (errors found later, such
    /// as a TLS file that cannot be used, are located in it).
    pub fn read(path: &Path) -> Result<(Config, String), ConfigError> {
        Config::read_with(path, |_| Ok(())).map(|(c, (), src)| (c, src))
    }

    /// [`Config::load`] with [`Config::parse_with`]'s extra check.
    pub fn load_with<T>(
        path: &Path,
        check: impl FnOnce(&Config) -> Result<T, KeyError>,
    ) -> Result<(Config, T), ConfigError> {
        Config::read_with(path, check).map(|(c, t, _)| (c, t))
    }

    /// [`Config::read`] with [`Config::parse_with`]'s extra check: the configuration, what the
    /// check made of it, and the text.
    pub fn read_with<T>(
        path: &Path,
        check: impl FnOnce(&Config) -> Result<T, KeyError>,
    ) -> Result<(Config, T, String), ConfigError> {
        let src = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let (config, made) = Config::parse_with(&src, &path.display().to_string(), check)?;
        Ok((config, made, src))
    }

    /// The embedded default; a unit test guarantees it parses.
    pub fn embedded_default() -> Config {
        Config::parse(DEFAULT_TOML, DEFAULT_NAME)
            .expect("the embedded default configuration is valid")
    }

    /// The effective configuration as TOML: every key that applies, defaults filled in. It
    /// parses back to the same configuration.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a configuration always serialises")
    }

    /// Checks across keys, with errors located in `src` (the text this configuration was parsed
    /// from); [`Config::parse`] runs it already.
    pub fn validate(&self, src: &str, file: &str) -> Result<(), ConfigError> {
        let spans = toml_edit::ImDocument::parse(src)
            .map(|doc| spans::Spans::new(&doc))
            .unwrap_or_default();
        self.check(&spans, src, file)
    }
}

/// The parser's messages run over several lines ("invalid table header\nexpected `.`, `]]`"):
/// one line reads better after `file:line:column:`.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// 1-based line and column (in characters) of byte `offset`.
fn line_column(src: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(src.len());
    while !src.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &src[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

fn invalid(src: &str, file: &str, offset: usize, key: String, reason: String) -> ConfigError {
    let (line, column) = line_column(src, offset);
    ConfigError::Invalid {
        file: file.to_string(),
        line,
        column,
        key,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(src: &str) -> (usize, usize, String, String) {
        match Config::parse(src, "t.toml").unwrap_err() {
            ConfigError::Invalid {
                line,
                column,
                key,
                reason,
                ..
            } => (line, column, key, reason),
            e => panic!("unexpected {e}"),
        }
    }

    const L: &str = "[[listener]]\nname = \"e\"\naddr = \"127.0.0.1:0\"\n";

    #[test]
    fn embedded_default_parses_and_round_trips() {
        let c = Config::embedded_default();
        assert_eq!(c.listeners.len(), 3);
        let again = Config::parse(&c.to_toml(), "roundtrip").unwrap();
        assert_eq!(c, again);
        let http = c.listeners.iter().find(|l| l.name == "http").unwrap();
        assert_eq!(http.websocket.len(), 2);
        assert_eq!(http.websocket[0].mode, WsMode::Pubsub);
        assert_eq!(http.websocket[1].path, "/ws/echo");
    }

    #[test]
    fn control_socket_is_off_by_default_and_checked_when_set() {
        assert_eq!(Config::embedded_default().server.control_socket, None);
        let c = Config::parse(
            &format!("[server]\ncontrol_socket = \"/run/s.sock\"\n{L}"),
            "t",
        )
        .unwrap();
        assert_eq!(c.server.control_socket, Some(PathBuf::from("/run/s.sock")));
        assert_eq!(Config::parse(&c.to_toml(), "again").unwrap(), c);
        let (line, _, key, reason) = err(&format!("[server]\ncontrol_socket = \"run/s\"\n{L}"));
        assert_eq!((line, key.as_str()), (2, "server.control_socket"));
        assert!(reason.contains("absolute"), "{reason}");
        let long = format!("/{}", "x".repeat(100));
        let (_, _, key, reason) = err(&format!("[server]\ncontrol_socket = \"{long}\"\n{L}"));
        assert_eq!(key, "server.control_socket");
        assert!(reason.contains("at most 90 bytes"), "{reason}");
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let (line, col, key, reason) = err(&format!("[server]\npin = true\nnosuch = 1\n{L}"));
        assert_eq!((line, col), (3, 1));
        assert_eq!(key, "server.nosuch");
        assert!(reason.contains("unknown field"), "{reason}");
    }

    #[test]
    fn wrong_type_names_line_and_key() {
        let (line, _, key, _) = err(&format!("[server]\n\npin = \"yes\"\n{L}"));
        assert_eq!(line, 3);
        assert_eq!(key, "server.pin");
    }

    #[test]
    fn zero_and_negative_shards_are_refused() {
        for v in ["0", "-2", "\"many\""] {
            let (line, _, key, reason) = err(&format!("[server]\nshards = {v}\n{L}"));
            assert_eq!((line, key.as_str()), (2, "server.shards"), "{v}: {reason}");
        }
        let c = Config::parse(&format!("[server]\nshards = 3\n{L}"), "t").unwrap();
        assert_eq!(c.server.shards.resolve(8), 3);
        assert_eq!(Shards::Auto.resolve(8), 8);
    }

    #[test]
    fn bad_addresses_name_the_listener() {
        for a in ["127.0.0.1:99999", "nonsense"] {
            let src = format!("[[listener]]\nname = \"x\"\naddr = \"{a}\"\n");
            let (line, col, key, reason) = err(&src);
            assert_eq!((line, key.as_str()), (3, "listener[0].addr"), "{reason}");
            assert_eq!(col, 8);
        }
        let src = format!("{L}[[listener]]\nname = \"y\"\naddr = \"bad\"\n");
        assert_eq!(err(&src).2, "listener[1].addr");
    }

    #[test]
    fn websocket_errors_name_the_route() {
        let src = format!(
            "{L}service = \"http\"\n[[listener.websocket]]\npath = \"/a\"\nmode = \"fanout\"\n"
        );
        let (line, _, key, _) = err(&src);
        assert_eq!((line, key.as_str()), (7, "listener[0].websocket[0].mode"));
        let src = format!("{L}service = \"http\"\n[[listener.websocket]]\npath = \"nope\"\n");
        let (line, _, key, reason) = err(&src);
        assert_eq!(
            (line, key.as_str()),
            (6, "listener[0].websocket[0].path"),
            "{reason}"
        );
        let src = format!("{L}service = \"http\"\n[[listener.websocket]]\nbogus = 1\n");
        assert_eq!(err(&src).2, "listener[0].websocket[0].bogus");
    }

    #[test]
    fn websocket_compression() {
        let route = |extra: &str| {
            format!("{L}service = \"http\"\n[[listener.websocket]]\npath = \"/ws\"\n{extra}")
        };
        let c = Config::parse(&route(""), "t").unwrap();
        assert_eq!(c.listeners[0].websocket[0].compression, Compression::Shared);
        assert_eq!(c.listeners[0].websocket[0].compression_window_bits, 12);
        for (v, mode) in [
            ("off", Compression::Off),
            ("shared", Compression::Shared),
            ("dedicated", Compression::Dedicated),
        ] {
            let src = route(&format!(
                "compression = \"{v}\"\ncompression_window_bits = 9\n"
            ));
            let c = Config::parse(&src, "t").unwrap();
            assert_eq!(c.listeners[0].websocket[0].compression, mode);
            assert_eq!(Config::parse(&c.to_toml(), "again").unwrap(), c);
        }
        let (line, _, key, reason) = err(&route("compression = \"zlib\"\n"));
        assert_eq!(
            (line, key.as_str()),
            (7, "listener[0].websocket[0].compression"),
            "{reason}"
        );
        assert!(reason.contains("shared"), "{reason}");
        for bits in ["8", "16", "0"] {
            let (line, col, key, reason) =
                err(&route(&format!("compression_window_bits = {bits}\n")));
            assert_eq!(
                (line, col, key.as_str()),
                (7, 1, "listener[0].websocket[0].compression_window_bits"),
                "{reason}"
            );
            assert!(reason.contains("between 9 and 15"), "{reason}");
        }
        let (line, _, key, _) = err(&route("compression_window_bits = 300\n"));
        assert_eq!(
            (line, key.as_str()),
            (7, "listener[0].websocket[0].compression_window_bits")
        );
    }

    #[test]
    fn sizes_and_durations() {
        // The units themselves are tested in `units`; here, that their errors are located.
        let (line, _, key, _) = err(&format!("[limits]\nidle_timeout = \"soon\"\n{L}"));
        assert_eq!((line, key.as_str()), (2, "limits.idle_timeout"));
        let (_, _, key, _) = err(&format!("[limits]\nmax_write_buffer = \"-1KiB\"\n{L}"));
        assert_eq!(key, "limits.max_write_buffer");
    }

    #[test]
    fn cross_key_checks_locate_the_key() {
        let src = format!("{L}[[listener]]\nname = \"e\"\naddr = \"127.0.0.1:0\"\n");
        let (line, _, key, reason) = err(&src);
        assert_eq!((line, key.as_str()), (5, "listener[1].name"), "{reason}");
        let (line, _, key, _) = err("[server]\npin = true\n");
        assert_eq!((line, key.as_str()), (1, "listener"));
        let (line, _, key, _) = err(&format!("[server]\nshards = 4\ncores = [0, 1]\n{L}"));
        assert_eq!((line, key.as_str()), (3, "server.cores"));
    }

    #[test]
    fn only_a_listener_takes_every_default() {
        let c = Config::parse(L, "t").unwrap();
        assert_eq!(c.server, ServerConfig::default());
        assert_eq!(c.limits, LimitsConfig::default());
        assert_eq!(c.listeners[0].backlog, 4096);
        assert_eq!(c.listeners[0].max_header, 16 * 1024);
        assert_eq!(c.log.level, LogLevel::Info);
    }

    #[test]
    fn error_display_has_file_line_column_and_key() {
        let e = Config::parse("[server]\nshards = 0\n", "conf/x.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("conf/x.toml:2:10: key `server.shards`:"),
            "{e}"
        );
    }

    fn syntax_err(src: &str) -> (usize, usize, String) {
        match Config::parse(src, "t.toml").unwrap_err() {
            ConfigError::Syntax {
                line,
                column,
                reason,
                ..
            } => (line, column, reason),
            e => panic!("expected a syntax error, got {e}"),
        }
    }

    #[test]
    fn inline_tables_are_located() {
        let src = "listener = [{ name = \"x\", addr = \"bad\" }]\n";
        let (line, col, key, reason) = err(src);
        assert_eq!(
            (line, col, key.as_str()),
            (1, 34, "listener[0].addr"),
            "{reason}"
        );
        let src = format!("server = {{ pin = true, shards = 0 }}\n{L}");
        let (line, col, key, _) = err(&src);
        assert_eq!((line, col, key.as_str()), (1, 33, "server.shards"));
        let (line, col, key, reason) = err(&format!("server = {{ nosuch = 1 }}\n{L}"));
        assert_eq!(
            (line, col, key.as_str()),
            (1, 12, "server.nosuch"),
            "{reason}"
        );
        // A cross-key check on an inline table points at the key inside it.
        let src = format!("server = {{ shards = 4, cores = [0, 1] }}\n{L}");
        let (line, col, key, _) = err(&src);
        assert_eq!((line, col, key.as_str()), (1, 24, "server.cores"));
        let src =
            "listener = [{ name = \"a\", addr = \"127.0.0.1:0\" }, { addr = \"127.0.0.1:0\" }]";
        let (line, col, key, reason) = err(src);
        assert_eq!(
            (line, col, key.as_str()),
            (1, 51, "listener[1].name"),
            "{reason}"
        );
    }

    #[test]
    fn dotted_keys_are_located() {
        let (line, col, key, _) = err(&format!("server.shards = 0\n{L}"));
        assert_eq!((line, col, key.as_str()), (1, 17, "server.shards"));
        let (line, col, key, reason) = err(&format!("limits.idle_timeout = \"soon\"\n{L}"));
        assert_eq!(
            (line, col, key.as_str()),
            (1, 23, "limits.idle_timeout"),
            "{reason}"
        );
        let src = format!("{L}service = \"http\"\nwebsocket = [{{ path = \"nope\" }}]\n");
        let (line, _, key, _) = err(&src);
        assert_eq!((line, key.as_str()), (5, "listener[0].websocket[0].path"));
        let c = Config::parse(
            &format!("server.shards = 2\nlog.level = \"warn\"\n{L}"),
            "t",
        )
        .unwrap();
        assert_eq!(c.server.shards.resolve(8), 2);
        assert_eq!(c.log.level, LogLevel::Warn);
    }

    #[test]
    fn syntax_errors_have_no_key() {
        let (line, col, reason) = syntax_err("[server]\nshards = 1\n[[listener]\nname = \"x\"\n");
        assert_eq!((line, col), (3, 11), "{reason}");
        assert!(reason.contains("invalid table header"), "{reason}");
        assert!(!reason.contains('\n'), "one line: {reason}");
        let (line, _, reason) = syntax_err(&format!("{L}name = \"y\"\n"));
        assert_eq!(line, 4);
        assert!(reason.contains("duplicate key"), "{reason}");
        let e = Config::parse("[server\n", "conf/x.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("conf/x.toml:1:8: syntax error: "), "{e}");
        assert!(!e.contains("key `"), "{e}");
    }

    #[test]
    fn cross_key_errors_on_defaults_point_at_the_table() {
        // service is left to its default ("echo"): the route's header is what to look at.
        let src = format!("{L}backlog = 16\n\n[[listener.websocket]]\npath = \"/a\"\n");
        let (line, col, key, reason) = err(&src);
        assert_eq!(
            (line, col, key.as_str()),
            (6, 1, "listener[0].websocket"),
            "{reason}"
        );
        assert!(reason.contains("need service = \"http\""), "{reason}");
        // A missing name is named, and located at its listener's header.
        let src = format!("{L}[[listener]]\naddr = \"127.0.0.1:0\"\n");
        let (line, col, key, _) = err(&src);
        assert_eq!((line, col, key.as_str()), (4, 1, "listener[1].name"));
        // Cross-key errors point at the key's first column.
        let (line, col, key, _) = err(&format!(
            "[server]\nread_buffer = 4096\nread_budget = 100\n{L}"
        ));
        assert_eq!((line, col, key.as_str()), (3, 1, "server.read_budget"));
    }

    #[test]
    fn durations_need_a_unit() {
        for v in ["300", "1.5", "true"] {
            let (line, col, key, reason) = err(&format!("[limits]\nidle_timeout = {v}\n{L}"));
            assert_eq!((line, col, key.as_str()), (2, 16, "limits.idle_timeout"));
            assert!(reason.contains("a duration such as \""), "{v}: {reason}");
        }
        let (_, _, _, reason) = err(&format!("[limits]\nidle_timeout = 300\n{L}"));
        assert!(reason.contains("\"300s\""), "{reason}");
        // Sizes, whose unit is bytes, take integers.
        let c = Config::parse(&format!("[limits]\nmax_write_buffer = 4096\n{L}"), "t").unwrap();
        assert_eq!(c.limits.max_write_buffer, 4096);
    }

    #[test]
    fn echo_listeners_print_and_take_only_their_keys() {
        let c = Config::embedded_default();
        let printed = c.to_toml();
        let echo = printed.split("[[listener]]").nth(1).unwrap();
        assert!(echo.contains("name = \"echo\""), "{echo}");
        for k in HTTP_KEYS {
            assert!(
                !echo.contains(k),
                "`{k}` printed for an echo listener:\n{echo}"
            );
        }
        let http = printed.split("[[listener]]").nth(2).unwrap();
        for k in HTTP_KEYS {
            assert!(
                http.contains(k),
                "`{k}` missing from an HTTP listener:\n{http}"
            );
        }
        for (k, v) in [
            ("max_header", "\"8KiB\""),
            ("max_body", "100"),
            ("header_timeout", "\"1s\""),
            ("admin_routes", "false"),
        ] {
            let src = format!("{L}service = \"echo\"\n{k} = {v}\n");
            let (line, col, key, reason) = err(&src);
            assert_eq!((line, col), (5, 1), "{k}: {reason}");
            assert_eq!(key, format!("listener[0].{k}"));
            assert!(reason.contains("HTTP listeners only"), "{reason}");
        }
    }

    const HTTP_KEYS: &[&str] = &[
        "max_header",
        "max_body",
        "header_timeout",
        "admin_routes",
        "websocket",
    ];

    #[test]
    fn ws_max_message_must_fit_the_read_buffer() {
        let route = |max_message: &str, limits: &str| {
            format!("{limits}{L}service = \"http\"\n[[listener.websocket]]\npath = \"/ws\"\n{max_message}")
        };
        let (line, col, key, reason) = err(&route("max_message = \"4MiB\"\n", ""));
        assert_eq!((line, col), (7, 1), "{reason}");
        assert_eq!(key, "listener[0].websocket[0].max_message");
        assert!(
            reason.contains("4MiB") && reason.contains("2MiB"),
            "{reason}"
        );
        // The default max_message (1MiB) against a smaller explicit read buffer: the key the
        // file spells out is the one named.
        let (line, col, key, reason) = err(&route("", "[limits]\nmax_read_buffer = \"512KiB\"\n"));
        assert_eq!(
            (line, col, key.as_str()),
            (2, 1, "limits.max_read_buffer"),
            "{reason}"
        );
        assert!(
            reason.contains("listener[0].websocket[0].max_message = 1MiB"),
            "{reason}"
        );
        // Exactly enough room for the largest frame header passes.
        let fits = route(
            "max_message = 65522\n",
            "[limits]\nmax_read_buffer = \"64KiB\"\n",
        );
        Config::parse(&fits, "t").unwrap();
        let over = route(
            "max_message = 65523\n",
            "[limits]\nmax_read_buffer = \"64KiB\"\n",
        );
        assert_eq!(err(&over).2, "listener[0].websocket[0].max_message");
    }

    #[test]
    fn offload_takes_bounded_threads_and_queue() {
        let c = Config::parse(L, "t").unwrap();
        assert_eq!((c.offload.threads, c.offload.queue), (8, 1024));
        let c = Config::parse(&format!("[offload]\nthreads = 2\nqueue = 10\n{L}"), "t").unwrap();
        let spec = crate::server::OffloadSpec::from(&c.offload);
        assert_eq!((spec.threads, spec.queue), (2, 10));
        for (k, v) in [
            ("threads", "0"),
            ("threads", "1025"),
            ("queue", "0"),
            ("queue", "1000001"),
        ] {
            let (line, col, key, reason) = err(&format!("[offload]\n{k} = {v}\n{L}"));
            assert_eq!((line, col), (2, 1), "{k} = {v}: {reason}");
            assert_eq!(key, format!("offload.{k}"));
            assert!(reason.contains("between"), "{reason}");
        }
        let (line, _, key, _) = err(&format!("[offload]\nthreads = \"many\"\n{L}"));
        assert_eq!((line, key.as_str()), (2, "offload.threads"));
    }

    #[test]
    fn max_connections_auto_follows_the_descriptor_limit() {
        let c = Config::parse(L, "t").unwrap();
        assert_eq!(c.server.max_connections, MaxConnections::Auto);
        let reserve = c.descriptor_reserve(2);
        assert_eq!(reserve, 16 + 8 + 4);
        assert_eq!(c.max_connections_for(2, Some(20_000)), 20_000 - 28);
        assert_eq!(c.max_connections_for(2, Some(10)), 1);
        assert_eq!(
            c.max_connections_for(2, None),
            MAX_CONNECTIONS_UNKNOWN_LIMIT
        );
        let c = Config::parse(&format!("[server]\nmax_connections = 500\n{L}"), "t").unwrap();
        assert_eq!(c.max_connections_for(2, Some(20_000)), 500);
        assert_eq!(
            c.max_connections_for(2, Some(100)),
            500,
            "explicit is kept (and warned)"
        );
        for v in ["0", "-1", "\"lots\""] {
            let (line, _, key, reason) = err(&format!("[server]\nmax_connections = {v}\n{L}"));
            assert_eq!(
                (line, key.as_str()),
                (2, "server.max_connections"),
                "{v}: {reason}"
            );
        }
        let printed = Config::parse(L, "t").unwrap().to_toml();
        assert!(printed.contains("max_connections = \"auto\""), "{printed}");
    }

    #[test]
    fn validate_on_its_own_locates_like_parse() {
        let src = format!("[server]\nshards = 4\ncores = [0, 1]\n{L}");
        let mut c = Config::parse(L, "t").unwrap();
        c.server.shards = Shards::Count(NonZeroUsize::new(4).unwrap());
        c.server.cores = vec![0, 1];
        match c.validate(&src, "t.toml").unwrap_err() {
            ConfigError::Invalid { line, key, .. } => {
                assert_eq!((line, key.as_str()), (3, "server.cores"))
            }
            e => panic!("{e}"),
        }
    }
}
