//! shardnet: a sharded epoll server built to hold a million concurrent connections on one host,
//! and the library it is built on.
//!
//! # The library
//!
//! A protocol is a [`server::Service`]: one instance per shard, on that shard's thread, called
//! with a [`server::Conn`] when one of its connections opens, has input, has drained its output,
//! reaches its timer or closes (with a [`server::CloseReason`]). It never sees a socket, and it
//! needs no lock: a shard alone owns its connections. [`server::Server::builder`] takes the
//! listeners, the number of shards and how they are pinned and balanced, and starts one service
//! per shard from a factory. Blocking work (a database call, a hash) goes to the offload pool
//! with [`server::Peers::offload`]; its result comes back on the connection's own shard, to
//! [`server::Service::on_offload`]. A service counts what it does in counters of its own
//! ([`stats::Registry`], in [`server::ShardInfo`]), which [`server::Server::snapshot`] (and the
//! product's `/metrics`) show beside the engine's.
//!
//! A service that hashes each line on the offload pool while its shard goes on serving, counting
//! the lines it was sent:
//!
//! ```
//! use shardnet::server::{Conn, ListenerSpec, OffloadSpec, Peers, Server, Service, ShardInfo};
//! use shardnet::stats::CounterHandle;
//! use std::io::{BufRead, BufReader, Write};
//!
//! struct Hasher {
//!     peers: Peers<u64>,
//!     lines: CounterHandle,
//! }
//!
//! fn hash(line: &[u8]) -> u64 {
//!     line.iter().fold(7u64, |h, &b| h.wrapping_mul(31) ^ u64::from(b))
//! }
//!
//! impl Service for Hasher {
//!     /// Per connection: nothing.
//!     type State = ();
//!     /// What a job sends back (other shards could send it too).
//!     type Command = u64;
//!
//!     fn on_data(&mut self, conn: &mut Conn<'_, ()>, input: &mut [u8]) -> usize {
//!         let Some(end) = input.iter().position(|&b| b == b'\n') else {
//!             return 0; // a partial line stays buffered until the rest arrives
//!         };
//!         self.lines.inc();
//!         let line = input[..end].to_vec();
//!         // Runs on a pool thread: nothing here may borrow from the shard.
//!         if self.peers.offload(conn, move || hash(&line)).is_err() {
//!             conn.write(b"busy\n"); // the pool is full: answer now, never queue more
//!         }
//!         end + 1
//!     }
//!
//!     fn on_offload(&mut self, conn: &mut Conn<'_, ()>, hash: u64) {
//!         conn.write(format!("{hash:x}\n").as_bytes());
//!     }
//! }
//!
//! let server = Server::builder()
//!     .listener(ListenerSpec::new("hash", "127.0.0.1:0".parse().unwrap()))
//!     .shards(2)
//!     .offload(OffloadSpec { threads: 2, queue: 16 })
//!     .start(|info: ShardInfo, peers| Hasher {
//!         peers,
//!         lines: info.counters.counter("lines", "lines received").unwrap(),
//!     })
//!     .unwrap();
//!
//! let mut client = std::net::TcpStream::connect(server.addr("hash").unwrap()).unwrap();
//! client.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
//! client.write_all(b"abc\n").unwrap();
//! let mut answer = String::new();
//! BufReader::new(&client).read_line(&mut answer).unwrap();
//! assert_eq!(answer, format!("{:x}\n", hash(b"abc")));
//!
//! let snapshot = server.snapshot();
//! assert_eq!(snapshot.offload.unwrap().done, 1);
//! let lines = snapshot.registered.iter().find(|f| f.name == "lines").unwrap();
//! assert_eq!(lines.values.iter().flatten().sum::<u64>(), 1);
//! drop(client); // the server (dropped last) drains quickly once its clients are gone
//! ```
//!
//! `examples/` has three more: `kv` (a Redis-protocol store partitioned across the shards),
//! `offload` (slow requests beside fast ones) and `chat` (rooms across shards).
//!
//! # The product
//!
//! `shardnet serve` runs the built-in services (TCP echo, HTTP/1.1, WebSocket echo and pub/sub)
//! from a configuration file: [`config::Config`] reads it, [`app::start`] composes the engine
//! from it (a service of your own can start from the same file with [`app::engine`]), and
//! [`cli::main`] is the binary's entry point.
//!
//! Layers, each pointing only down (`tests/layers.rs` checks it): the engine (`sys`, private, the
//! only nix/libc user; `conn`; `timer`; [`stats`]; [`server`]) knows nothing of the product; the
//! protocols usable without the product (`service`: echo, the HTTP/1.1, WebSocket and
//! permessage-deflate codecs; `tls`) sit on it; the product ([`app`], [`config`]) on those; the
//! load generator (`bench`) and [`cli`] on all of them. Modules named here without a link are
//! not part of the library's API: they are public only for this repository's tests, benches and
//! examples, and hidden from its documentation.
#![deny(unsafe_code)]
#![warn(missing_docs)]

#[cfg(not(target_os = "linux"))]
compile_error!("shardnet uses epoll and eventfd: it builds on Linux only");

// The library: the engine and what a service needs.
pub mod server;
pub mod stats;
// The product: its configuration, its composition of the engine, its command line.
pub mod app;
pub mod cli;
pub mod config;

// Not part of the library's API: public only for this repository's integration tests, benches
// and examples (`cargo doc` leaves them out; nothing in them is promised to stay).
#[doc(hidden)]
pub mod bench;
#[doc(hidden)]
pub mod conn;
#[doc(hidden)]
pub mod ready;
#[doc(hidden)]
pub mod service;
#[doc(hidden)]
pub mod timer;
#[doc(hidden)]
pub mod tls;

pub(crate) mod sys;
pub(crate) mod tune;
