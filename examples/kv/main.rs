//! A key-value server speaking the Redis protocol (`PING`, `GET`, `SET`, `DEL`, `INCR`, `MGET`),
//! its keyspace partitioned across the shards by key hash: each shard owns its part, and a
//! request for a key another shard owns goes there as a message and comes back.
//!
//! ```text
//! cargo run --release --example kv -- --addr 127.0.0.1:6380 --shards 2
//! redis-cli -p 6380 SET greeting hello
//! redis-benchmark -p 6380 -t set,get -P 16 -q
//! ```
//!
//! The service is in `service.rs` (tested by `tests/kv.rs` with redis-cli and
//! redis-benchmark); `benches/kv.sh` compares it with redis-server.

mod service;

use std::net::SocketAddr;

use clap::Parser;
use shardnet::server::{ListenerSpec, Pinning, Server};

#[derive(Parser)]
#[command(about = "A sharded key-value server speaking RESP")]
struct Args {
    /// Address to listen on (port 0 picks one).
    #[arg(long, default_value = "127.0.0.1:6380")]
    addr: SocketAddr,
    /// Shards (event loops), each owning its part of the keyspace.
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// Cores to pin the shards to, comma-separated (default: the allowed cores in order).
    #[arg(long, value_delimiter = ',')]
    cores: Vec<usize>,
    /// Largest key or value accepted, in bytes.
    #[arg(long, default_value_t = service::KvLimits::default().max_value)]
    max_value: usize,
    /// Bytes the whole store holds (keys, values, overhead); past it writes get -OOM.
    #[arg(long, default_value_t = service::KvLimits::default().max_memory)]
    max_memory: usize,
}

fn main() {
    let args = Args::parse();
    // The engine logs through `log` (a shard that dies, a pool that cannot start): to stderr.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let limits = service::KvLimits {
        max_value: args.max_value,
        max_memory: args.max_memory,
    };
    let pinning = if args.cores.is_empty() {
        Pinning::Auto
    } else {
        Pinning::Cores(args.cores.clone())
    };
    let server = Server::builder()
        .listener(ListenerSpec::new("kv", args.addr))
        .shards(args.shards)
        .pinning(pinning)
        .start(move |info, peers| service::Kv::new(&info, peers, limits));
    match server {
        Ok(server) => {
            println!("listening on {}", server.addr("kv").expect("bound"));
            wait_for_signal();
            // Dropping the server drains it: answers what was asked, then closes.
            drop(server);
        }
        Err(e) => {
            eprintln!("kv example: {e}");
            std::process::exit(1);
        }
    }
}

/// Blocks until SIGINT or SIGTERM.
fn wait_for_signal() {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]).expect("signals");
    signals.forever().next();
}
