//! The abuse suite: hostile clients against a real server, each asserting the exact answer (close
//! code or status), a bounded time until the connection is closed, and bounded server memory.
//! Every loop is bounded in count and time; the whole suite runs well under a minute.
//!
//! One module per layer under attack, so each can grow without touching the others.

mod common;

#[path = "abuse/engine.rs"]
mod engine;
#[path = "abuse/http.rs"]
mod http;
#[path = "abuse/pubsub.rs"]
mod pubsub;
#[path = "abuse/ws.rs"]
mod ws;
