//! Protocols that run on the engine: echo, HTTP/1.1 and the WebSocket codec, usable without the
//! product; and, for now, the product itself (`router`: routes, pub/sub, the start function;
//! `metrics`), which sits above the engine and is bound for its own module.
//!
//! The service trait and its handles live in the engine ([`crate::server::api`]); they are
//! re-exported here so `crate::service::{Service, Conn, Ctx, Token, ShardInfo}` keeps working.

pub mod echo;
pub mod http;
pub mod metrics;
pub mod router;
pub mod ws;

pub use router::start as start_default;

pub use crate::server::api::{CloseReason, Conn, Ctx, Service, ShardInfo, Token};
