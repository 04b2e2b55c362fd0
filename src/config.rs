//! TEMPORARY stand-in until the real config module lands (same names).
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::time::Duration;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    LeastConnections,
    Reuseport,
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Edge,
    Level,
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceKind {
    Echo,
    Http,
}
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub shards: Shards,
    pub pin: bool,
    pub cores: Vec<usize>,
    pub balance: Balance,
    pub trigger: Trigger,
    pub max_connections: usize,
    pub shutdown_timeout: Duration,
    pub stats_interval: Duration,
    pub read_buffer: usize,
    pub read_budget: usize,
    pub events_per_wait: usize,
}
impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            shards: Shards::Auto,
            pin: true,
            cores: vec![],
            balance: Balance::RoundRobin,
            trigger: Trigger::Edge,
            max_connections: 1_000_000,
            shutdown_timeout: Duration::from_secs(10),
            stats_interval: Duration::from_secs(10),
            read_buffer: 65536,
            read_budget: 262144,
            events_per_wait: 1024,
        }
    }
}
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    pub idle_timeout: Duration,
    pub max_write_buffer: usize,
    pub write_timeout: Duration,
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
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub name: String,
    pub addr: SocketAddr,
    pub service: ServiceKind,
    pub backlog: u32,
    pub reuse_port: bool,
}
#[derive(Debug, Clone, Default)]
pub struct LogConfig {
    pub level: String,
}
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub server: ServerConfig,
    pub limits: LimitsConfig,
    pub log: LogConfig,
    pub listeners: Vec<ListenerConfig>,
}
