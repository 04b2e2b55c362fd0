//! shardnet: a sharded epoll server built to hold a million concurrent connections on one host.
//!
//! One acceptor thread hands sockets to N shard threads, each pinned to a core and owning its
//! own epoll instance, connection slab, timer wheel and read buffer; see [`server`] for the
//! ownership rule.
//!
//! Layers, each pointing only down (`tests/layers.rs` checks it): the engine (`sys`, private,
//! the only nix/libc user; [`conn`]; [`timer`]; [`stats`]; [`server`], with the
//! [`server::Service`] trait and [`server::Server::builder`]) knows nothing of the product; the
//! protocols usable without the product ([`service`]: echo, the HTTP/1.1 and WebSocket codecs)
//! sit on it; the product that `shardnet serve` runs ([`app`]: routes, pub/sub, metrics, and
//! `start`, which builds the engine from a [`config::Config`]) on those; [`mod@bench`] and
//! [`cli`] on all of them.
#![deny(unsafe_code)]

#[cfg(not(target_os = "linux"))]
compile_error!("shardnet uses epoll and eventfd: it builds on Linux only");

pub mod app;
pub mod bench;
pub mod cli;
pub mod config;
pub mod conn;
pub mod ready;
pub mod server;
pub mod service;
pub mod stats;
pub(crate) mod sys;
pub mod timer;
pub mod tls;
pub mod tune;
