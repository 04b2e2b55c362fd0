//! The service trait, and the protocols usable without the product: echo, the HTTP/1.1 codec
//! and the WebSocket codec (server and client halves). Nothing here knows the configuration file
//! or the product's routes (`crate::app` binds them).
//!
//! One service instance runs per shard, on that shard's thread, so it needs neither `Send` nor
//! `Sync`. It never sees a socket: it gets input bytes and writes through a [`Conn`] handle.
//! Output written during one callback is staged in the shard's one output buffer and written to
//! the socket in a single `write(2)` when the callback returns, so everything produced from one
//! read (a batch of pipelined responses) goes out together; only what the socket does not take
//! is copied into a per-connection queue.

pub mod echo;
pub mod http;
pub mod ws;

use std::time::{Duration, Instant};

pub use crate::conn::Token;
pub use crate::server::shard::{Conn, Ctx};

/// A protocol driven by the shard engine.
pub trait Service: 'static {
    /// Per-connection state, stored inline in the shard's connection slab: keep it small, it is
    /// paid for by every idle connection.
    type State: Default;
    /// Messages other threads send to this service on every shard (pub/sub fan-out).
    type Command: Send + 'static;

    /// A connection was accepted (or adopted) by this shard.
    fn on_open(&mut self, _conn: &mut Conn<'_, Self::State>) {}

    /// Input arrived. `input` holds every byte not yet consumed (a partial request from an
    /// earlier read followed by the new bytes). Return how many bytes were consumed; the rest is
    /// kept and offered again with the next read. Mutable so codecs can unmask in place.
    fn on_data(&mut self, conn: &mut Conn<'_, Self::State>, input: &mut [u8]) -> usize;

    /// Everything queued for this connection has been written.
    fn on_drained(&mut self, _conn: &mut Conn<'_, Self::State>) {}

    /// The deadline set with [`Conn::set_timer`] has passed.
    fn on_timer(&mut self, _conn: &mut Conn<'_, Self::State>) {}

    /// The connection is closed; release anything kept for it elsewhere.
    fn on_close(&mut self, _token: Token, _state: &mut Self::State) {}

    /// The server is shutting down: say goodbye. The default closes after flushing.
    fn on_drain(&mut self, conn: &mut Conn<'_, Self::State>) {
        conn.close();
    }

    /// Called once per timer tick (10 ms) while the shard is awake, before its events.
    fn on_tick(&mut self, _ctx: &mut Ctx<'_, Self::State>) {}

    /// Whether the shard must wake every tick even with nothing else to do (the load
    /// generator's open loop). Otherwise an idle shard sleeps until an event or a timer.
    fn wants_ticks(&self) -> bool {
        false
    }

    /// A message from another thread.
    fn on_command(&mut self, _cmd: Self::Command, _ctx: &mut Ctx<'_, Self::State>) {}

    /// Called after the commands of one wake-up (at most 4096) have been handed to
    /// `on_command`, so a service can coalesce their work: pub/sub writes every message queued
    /// for a subscriber in one write instead of one write per message.
    fn on_commands_done(&mut self, _ctx: &mut Ctx<'_, Self::State>) {}
}

/// What a service's constructor gets, on the shard's own thread.
pub struct ShardInfo {
    /// The pool's counters (for `/metrics`).
    pub stats: std::sync::Arc<crate::stats::Stats>,
    pub shard: usize,
    pub shards: usize,
    pub started: Instant,
    pub tick: Duration,
}
