//! Blocking work beside a busy shard: `slow <text>` lines sleep for `--work` (a stand-in for a
//! database call) and hash the text on the offload pool, while every other line is echoed at
//! once by the same shard.
//!
//! ```text
//! cargo run --release --example offload -- --addr 127.0.0.1:7100 --work 20ms
//! printf 'hello\nslow abc\nworld\n' | nc -N 127.0.0.1 7100
//! ```
//!
//! The service is in `service.rs` (tested by `tests/offload.rs`).

mod service;

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use shardnet::server::{ListenerSpec, OffloadSpec, Server};

#[derive(Parser)]
#[command(about = "Line echo with slow requests on the offload pool")]
struct Args {
    /// Address to listen on (port 0 picks one).
    #[arg(long, default_value = "127.0.0.1:7100")]
    addr: SocketAddr,
    /// Shards (event loops).
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// Offload pool threads.
    #[arg(long, default_value_t = 8)]
    threads: usize,
    /// Jobs that may wait for a thread.
    #[arg(long, default_value_t = 1024)]
    queue: usize,
    /// How long each slow request blocks its thread.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    work: Duration,
}

fn main() {
    let args = Args::parse();
    // The engine logs through `log` (a shard that dies, a pool that cannot start): to stderr.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let work = args.work;
    let server = Server::builder()
        .listener(ListenerSpec::new("offload", args.addr))
        .shards(args.shards)
        .offload(OffloadSpec {
            threads: args.threads,
            queue: args.queue,
        })
        .start(move |info, peers| service::Slow::new(&info, peers, work));
    match server {
        Ok(server) => {
            println!("listening on {}", server.addr("offload").expect("bound"));
            wait_for_signal();
            // Dropping the server drains it: answers what was asked, then closes.
            drop(server);
        }
        Err(e) => {
            eprintln!("offload example: {e}");
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
