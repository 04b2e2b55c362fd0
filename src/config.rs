//! Configuration: TOML parsed with serde, every key optional with a documented default.
//!
//! `config/shardnet.toml` is the embedded default and documents every key. Unknown keys are
//! errors (`deny_unknown_fields`). Durations are strings like `"30s"`, `"500ms"`, `"5m"`; sizes are
//! strings like `"64KiB"`, `"1MiB"` (or a plain integer of bytes).
//!
//! Every error names the file, line, column and dotted key: value checks run inside the serde
//! deserializers so toml reports the span of the offending value; checks across keys run after
//! parsing and locate the key in the source text.

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::Path;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

pub const DEFAULT_TOML: &str = include_str!("../config/shardnet.toml");
pub const DEFAULT_NAME: &str = "<embedded default>";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{file}:{line}:{column}: key `{key}`: {reason}")]
    Invalid {
        file: String,
        line: usize,
        column: usize,
        key: String,
        reason: String,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub limits: LimitsConfig,
    pub log: LogConfig,
    #[serde(rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub shards: Shards,
    pub pin: bool,
    pub cores: Vec<usize>,
    pub balance: Balance,
    pub trigger: Trigger,
    pub max_connections: usize,
    #[serde(with = "duration")]
    pub shutdown_timeout: Duration,
    #[serde(with = "duration")]
    pub stats_interval: Duration,
    #[serde(with = "size")]
    pub read_buffer: usize,
    #[serde(with = "size")]
    pub read_budget: usize,
    pub events_per_wait: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            shards: Shards::Auto,
            pin: true,
            cores: Vec::new(),
            balance: Balance::RoundRobin,
            trigger: Trigger::Edge,
            max_connections: 1_000_000,
            shutdown_timeout: Duration::from_secs(10),
            stats_interval: Duration::from_secs(10),
            read_buffer: 64 * 1024,
            read_budget: 256 * 1024,
            events_per_wait: 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    #[serde(with = "size")]
    pub max_write_buffer: usize,
    #[serde(with = "duration")]
    pub write_timeout: Duration,
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub level: LogLevel,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: LogLevel::Info,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerConfig {
    pub name: String,
    #[serde(deserialize_with = "socket_addr")]
    pub addr: SocketAddr,
    pub service: ServiceKind,
    pub backlog: u32,
    pub reuse_port: bool,
    #[serde(with = "size")]
    pub max_header: usize,
    #[serde(with = "size")]
    pub max_body: usize,
    #[serde(with = "duration")]
    pub header_timeout: Duration,
    /// Serve /metrics and /stats on this listener (turn off on public listeners).
    pub admin_routes: bool,
    pub websocket: Vec<WsRouteConfig>,
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
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WsRouteConfig {
    pub path: String,
    pub mode: WsMode,
    #[serde(with = "size")]
    pub max_message: usize,
    #[serde(with = "duration")]
    pub ping_interval: Duration,
    #[serde(with = "duration")]
    pub pong_timeout: Duration,
    pub slow_consumer: SlowConsumer,
    pub allowed_origins: Vec<String>,
    /// Topics one connection may subscribe to at once (pub/sub routes).
    pub max_topics: usize,
    /// Longest topic name accepted, in bytes.
    #[serde(with = "size")]
    pub max_topic_length: usize,
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
        }
    }
}

/// `"auto"` (the CPUs this process may use, cgroup quota included) or a positive count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shards {
    Auto,
    Count(NonZeroUsize),
}

impl Shards {
    pub fn resolve(&self, available: usize) -> usize {
        match self {
            Shards::Auto => available.max(1),
            Shards::Count(n) => n.get(),
        }
    }
}

impl Serialize for Shards {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Shards::Auto => s.serialize_str("auto"),
            Shards::Count(n) => s.serialize_u64(n.get() as u64),
        }
    }
}

impl<'de> Deserialize<'de> for Shards {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Shards;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"auto\" or a positive integer")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Shards, E> {
                if v == "auto" {
                    Ok(Shards::Auto)
                } else {
                    Err(E::custom(format!(
                        "expected \"auto\" or a positive integer, found \"{v}\""
                    )))
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Shards, E> {
                usize::try_from(v)
                    .ok()
                    .and_then(NonZeroUsize::new)
                    .map(Shards::Count)
                    .ok_or_else(|| {
                        E::custom(format!(
                            "shards must be \"auto\" or a positive integer, found {v}"
                        ))
                    })
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Shards, E> {
                self.visit_i64(i64::try_from(v).unwrap_or(-1))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    RoundRobin,
    LeastConnections,
    Reuseport,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    Edge,
    Level,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceKind {
    Echo,
    Http,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WsMode {
    Echo,
    Pubsub,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlowConsumer {
    Drop,
    Disconnect,
}

fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(|_| {
        de::Error::custom(format!(
            "`{s}` is not an address with a port (like 127.0.0.1:7000 or [::1]:7000)"
        ))
    })
}

/// Sizes: `"64KiB"`, `"1MiB"`, `"2GiB"`, `"512B"`, `"4kB"` (powers of 1000 for kB/MB/GB), or
/// an integer of bytes.
pub mod size {
    use super::*;

    const UNITS: &[(&str, u64)] = &[
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
        ("GB", 1_000_000_000),
        ("MB", 1_000_000),
        ("kB", 1_000),
        ("KB", 1_000),
        ("B", 1),
    ];

    pub fn parse(s: &str) -> Result<usize, String> {
        let t = s.trim();
        let (num, mult) = UNITS
            .iter()
            .find_map(|(u, m)| t.strip_suffix(u).map(|n| (n.trim(), *m)))
            .unwrap_or((t, 1));
        let n: u64 = num.parse().map_err(|_| {
            format!("`{s}` is not a size (use bytes or a unit: B, KiB, MiB, GiB, kB, MB, GB)")
        })?;
        n.checked_mul(mult)
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| format!("`{s}` is too large"))
    }

    pub fn format(v: usize) -> String {
        for (u, m) in [("GiB", 1usize << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if v >= m && v % m == 0 {
                return format!("{}{u}", v / m);
            }
        }
        format!("{v}B")
    }

    pub fn serialize<S: Serializer>(v: &usize, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = usize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size like \"64KiB\" or a number of bytes")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<usize, E> {
                parse(v).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<usize, E> {
                usize::try_from(v).map_err(|_| E::custom(format!("a size cannot be negative: {v}")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<usize, E> {
                usize::try_from(v).map_err(|_| E::custom("too large"))
            }
        }
        d.deserialize_any(V)
    }
}

/// Durations: humantime strings (`"30s"`, `"500ms"`, `"5m"`, `"1h 30m"`); `"0s"` for zero.
pub mod duration {
    use super::*;

    pub fn parse(s: &str) -> Result<Duration, String> {
        humantime::parse_duration(s.trim())
            .map_err(|e| format!("`{s}` is not a duration like \"30s\" or \"500ms\" ({e})"))
    }

    pub fn format(d: Duration) -> String {
        if d.is_zero() {
            "0s".into()
        } else {
            humantime::format_duration(d).to_string().replace(' ', "")
        }
    }

    pub fn serialize<S: Serializer>(v: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map_err(de::Error::custom)
    }
}

impl Config {
    /// Parses and validates `src`; `file` names it in errors.
    pub fn parse(src: &str, file: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(src).map_err(|e| {
            let offset = e.span().map_or(0, |s| s.start);
            let key = key_at(src, offset);
            invalid(src, file, offset, key, e.message().trim().to_string())
        })?;
        config.validate(src, file)?;
        Ok(config)
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let src = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&src, &path.display().to_string())
    }

    /// The embedded default; a unit test guarantees it parses.
    pub fn embedded_default() -> Config {
        Config::parse(DEFAULT_TOML, DEFAULT_NAME)
            .expect("the embedded default configuration is valid")
    }

    /// The effective configuration as TOML (every key, defaults filled in).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a configuration always serialises")
    }

    /// Checks across keys; errors point at the key's line in `src` when it can be found.
    pub fn validate(&self, src: &str, file: &str) -> Result<(), ConfigError> {
        let fail = |section: &str, nth: usize, key: &str, reason: String| {
            let (offset, dotted) = locate(src, section, nth, key);
            Err(invalid(src, file, offset, dotted, reason))
        };
        let s = &self.server;
        if self.listeners.is_empty() {
            return fail(
                "",
                0,
                "listener",
                "at least one [[listener]] is required".into(),
            );
        }
        if s.read_buffer < 4096 || s.read_buffer > 16 << 20 {
            return fail(
                "server",
                0,
                "read_buffer",
                "must be between 4KiB and 16MiB".into(),
            );
        }
        if s.read_budget < s.read_buffer {
            return fail(
                "server",
                0,
                "read_budget",
                "must be at least read_buffer".into(),
            );
        }
        if s.events_per_wait == 0 || s.events_per_wait > 65536 {
            return fail(
                "server",
                0,
                "events_per_wait",
                "must be between 1 and 65536".into(),
            );
        }
        if s.max_connections == 0 {
            return fail("server", 0, "max_connections", "must be positive".into());
        }
        if let Shards::Count(n) = s.shards {
            if !s.cores.is_empty() && s.cores.len() < n.get() {
                return fail(
                    "server",
                    0,
                    "cores",
                    format!(
                        "lists {} cores for {} shards: give one per shard",
                        s.cores.len(),
                        n
                    ),
                );
            }
        }
        if self.limits.max_write_buffer == 0 {
            return fail("limits", 0, "max_write_buffer", "must be positive".into());
        }
        if self.limits.max_read_buffer < 1024 {
            return fail(
                "limits",
                0,
                "max_read_buffer",
                "must be at least 1KiB".into(),
            );
        }
        for (i, l) in self.listeners.iter().enumerate() {
            if l.name.is_empty() {
                return fail("listener", i, "name", "every listener needs a name".into());
            }
            if self.listeners[..i].iter().any(|o| o.name == l.name) {
                return fail(
                    "listener",
                    i,
                    "name",
                    format!("duplicate listener name `{}`", l.name),
                );
            }
            if l.addr.port() != 0
                && self.listeners[..i].iter().any(|o| o.addr == l.addr)
                && !l.reuse_port
            {
                return fail(
                    "listener",
                    i,
                    "addr",
                    format!("{} is used by another listener", l.addr),
                );
            }
            if l.backlog == 0 || l.backlog > 65535 {
                return fail(
                    "listener",
                    i,
                    "backlog",
                    "must be between 1 and 65535".into(),
                );
            }
            if l.service != ServiceKind::Http && !l.websocket.is_empty() {
                return fail(
                    "listener",
                    i,
                    "websocket",
                    "WebSocket routes need service = \"http\"".into(),
                );
            }
            for (j, w) in l.websocket.iter().enumerate() {
                let section = format!("listener.websocket#{i}");
                if !w.path.starts_with('/') {
                    return fail(
                        &section,
                        j,
                        "path",
                        format!("`{}` must start with '/'", w.path),
                    );
                }
                if l.websocket[..j].iter().any(|o| o.path == w.path) {
                    return fail(
                        &section,
                        j,
                        "path",
                        format!("duplicate WebSocket path `{}`", w.path),
                    );
                }
                if w.max_message == 0 {
                    return fail(&section, j, "max_message", "must be positive".into());
                }
            }
        }
        Ok(())
    }
}

fn invalid(src: &str, file: &str, offset: usize, key: String, reason: String) -> ConfigError {
    let offset = offset.min(src.len());
    let before = &src[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    ConfigError::Invalid {
        file: file.to_string(),
        line,
        column,
        key,
        reason,
    }
}

/// The table header in force at each line: `server`, `listener[1]`, `listener[0].websocket[2]`.
fn table_path(src: &str, upto_line: usize) -> String {
    let mut path = String::new();
    let mut listeners = 0usize;
    let mut websockets = 0usize;
    for line in src.lines().take(upto_line) {
        let t = line.trim();
        if let Some(h) = t.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            match h.trim() {
                "listener" => {
                    listeners += 1;
                    websockets = 0;
                    path = format!("listener[{}]", listeners - 1);
                }
                "listener.websocket" => {
                    websockets += 1;
                    path = format!(
                        "listener[{}].websocket[{}]",
                        listeners.saturating_sub(1),
                        websockets - 1
                    );
                }
                other => path = other.to_string(),
            }
        } else if let Some(h) = t.strip_prefix('[').and_then(|r| r.split(']').next()) {
            path = h.trim().to_string();
        }
    }
    path
}

/// The dotted key at byte `offset`: the key of that line (text before `=`) under its table.
fn key_at(src: &str, offset: usize) -> String {
    let offset = offset.min(src.len());
    let line_no = src[..offset].matches('\n').count();
    let line = src.lines().nth(line_no).unwrap_or("");
    let table = table_path(src, line_no + 1);
    let t = line.trim();
    let key = if t.starts_with('[') {
        String::new()
    } else {
        t.split('=')
            .next()
            .unwrap_or("")
            .trim()
            .trim_matches('"')
            .to_string()
    };
    match (table.is_empty(), key.is_empty()) {
        (true, _) => key,
        (false, true) => table,
        (false, false) => format!("{table}.{key}"),
    }
}

/// Finds `key` inside the `nth` table named `section` (`listener.websocket#i` is the websocket
/// tables of listener `i`); returns its byte offset (0 if absent) and dotted name.
fn locate(src: &str, section: &str, nth: usize, key: &str) -> (usize, String) {
    let (table, owner) = match section.split_once('#') {
        Some((t, o)) => (t, o.parse::<usize>().ok()),
        None => (section, None),
    };
    let dotted = match (table, owner) {
        ("", _) => key.to_string(),
        ("listener", _) => format!("listener[{nth}].{key}"),
        ("listener.websocket", Some(o)) => format!("listener[{o}].websocket[{nth}].{key}"),
        (t, _) => format!("{t}.{key}"),
    };
    let want_table = match (table, owner) {
        ("listener.websocket", Some(o)) => format!("listener[{o}].websocket[{nth}]"),
        ("listener", _) => format!("listener[{nth}]"),
        (t, _) => t.to_string(),
    };
    let mut offset = 0;
    for (i, line) in src.split_inclusive('\n').enumerate() {
        let t = line.trim_start();
        let k = t.split('=').next().unwrap_or("").trim();
        if k == key && t.contains('=') && table_path(src, i + 1) == want_table {
            return (offset + line.len() - t.len(), dotted);
        }
        if table.is_empty() && t.starts_with(&format!("[[{key}")) {
            return (offset, dotted);
        }
        offset += line.len();
    }
    (0, dotted)
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
    fn sizes_and_durations() {
        assert_eq!(size::parse("64KiB"), Ok(65536));
        assert_eq!(size::parse("1MiB"), Ok(1 << 20));
        assert_eq!(size::parse("4kB"), Ok(4000));
        assert_eq!(size::parse("512"), Ok(512));
        assert!(size::parse("-1KiB").is_err());
        assert!(size::parse("10 parsecs").is_err());
        assert_eq!(size::format(65536), "64KiB");
        assert_eq!(size::format(1000), "1000B");
        assert_eq!(duration::parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(duration::parse("5m"), Ok(Duration::from_secs(300)));
        assert!(duration::parse("10 parsecs").is_err());
        assert_eq!(duration::format(Duration::from_millis(1500)), "1s500ms");
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
}
