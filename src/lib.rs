//! shardnet: a sharded epoll server built to hold a million concurrent connections on one host.
//!
//! One acceptor thread hands sockets to N shard threads, each pinned to a core and owning its
//! own epoll instance, connection slab, timer wheel and read buffer; see [`server`] for the
//! ownership rule. Services (echo, HTTP/1.1, WebSocket) implement [`service::Service`].
#![deny(unsafe_code)]

#[cfg(not(target_os = "linux"))]
compile_error!("shardnet uses epoll and eventfd: it builds on Linux only");

pub mod bench;
pub mod broker;
pub mod cli;
pub mod config;
pub mod conn;
pub mod server;
pub mod service;
pub mod stats;
pub mod sys;
pub mod timer;
pub mod tune;
