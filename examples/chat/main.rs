//! Line-based chat rooms across shards: each shard holds its own members, and a message goes to
//! every shard with `Peers::broadcast`, which writes it to its members of the room.
//!
//! ```text
//! cargo run --release --example chat -- --addr 127.0.0.1:7200 --shards 2
//! nc 127.0.0.1 7200        # in two terminals: /nick ada, /join rust, then talk
//! ```
//!
//! The service is in `service.rs` (tested by `tests/chat.rs`).

mod service;

use std::net::SocketAddr;

use clap::Parser;
use shardnet::server::{ListenerSpec, Server};

#[derive(Parser)]
#[command(about = "Line-based chat rooms across shards")]
struct Args {
    /// Address to listen on (port 0 picks one).
    #[arg(long, default_value = "127.0.0.1:7200")]
    addr: SocketAddr,
    /// Shards (event loops).
    #[arg(long, default_value_t = 2)]
    shards: usize,
}

fn main() {
    let args = Args::parse();
    // The engine logs through `log` (a shard that dies, a pool that cannot start): to stderr.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let server = Server::builder()
        .listener(ListenerSpec::new("chat", args.addr))
        .shards(args.shards)
        .start(|info, peers| service::Chat::new(&info, peers));
    match server {
        Ok(server) => {
            println!("listening on {}", server.addr("chat").expect("bound"));
            wait_for_signal();
            drop(server);
        }
        Err(e) => {
            eprintln!("chat example: {e}");
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
