//! The protocols usable without the product: echo, the HTTP/1.1 codec
//! and the WebSocket codec (server and client halves), plus re-exports of the engine's service
//! trait. Nothing here knows the configuration file
//! or the product's routes (`crate::app` binds them).
//!
//! The service trait and its handles live in the engine ([`crate::server`]); they are
//! re-exported here so `crate::service::{Service, Conn, Ctx, Token, ShardInfo}` keeps working.

pub mod deflate;
pub mod echo;
pub mod http;
pub mod ws;

pub use crate::server::{CloseReason, Conn, Ctx, Service, ShardInfo, Token};
