//! The extension point: what a protocol implements ([`Service`]) and the handles it is given:
//! [`Conn`] during one connection's callback, [`Ctx`] for the shard's other connections, and
//! [`Peers`] to send messages to every shard.
//!
//! One service instance runs per shard, on that shard's thread, so it needs neither `Send` nor
//! `Sync`. It never sees a socket: it gets input bytes and writes through a [`Conn`]. Output
//! written during one callback is staged in the shard's one output buffer and written to the
//! socket in a single `send(2)` when the callback returns, so everything produced from one read
//! (a batch of pipelined responses) goes out together; only what the socket does not take is
//! copied into a per-connection queue.
//!
//! Rules a service can rely on:
//! - A connection closes for one [`CloseReason`], reported to [`Service::on_close`] exactly once.
//! - Output that makes no progress for `write_timeout` closes the connection, whatever its size;
//!   reading pauses while `max_write_buffer` or more is queued.
//! - A callback that panics closes that connection only ([`CloseReason::Panic`], counted in
//!   `service_panics`); the shard carries on. `next_wake` and `State::default` must not panic:
//!   a panic there ends the shard, which the server then reports (`dead_shards`).
//!
//! ```
//! use shardnet::server::{Conn, ListenerSpec, Server, Service};
//! use std::io::{Read, Write};
//!
//! /// Answers every line with its length.
//! struct LineLength;
//!
//! impl Service for LineLength {
//!     type State = ();
//!     type Command = ();
//!
//!     fn on_data(&mut self, conn: &mut Conn<'_, ()>, input: &mut [u8]) -> usize {
//!         let mut used = 0;
//!         while let Some(end) = input[used..].iter().position(|&b| b == b'\n') {
//!             let reply = format!("{}\n", end);
//!             conn.write(reply.as_bytes());
//!             used += end + 1;
//!         }
//!         used // a partial line stays buffered until the rest arrives
//!     }
//! }
//!
//! let server = Server::builder()
//!     .listener(ListenerSpec::new("lines", "127.0.0.1:0".parse().unwrap()))
//!     .shards(1)
//!     .start(|_info, _peers| LineLength)
//!     .unwrap();
//! let mut client = std::net::TcpStream::connect(server.addr("lines").unwrap()).unwrap();
//! client.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
//! client.write_all(b"hello\nsharded").unwrap();
//! client.write_all(b" world\n").unwrap();
//! let mut answer = [0u8; 5];
//! client.read_exact(&mut answer).unwrap();
//! assert_eq!(&answer, b"5\n13\n");
//! ```

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use crate::conn::Token;
use crate::server::offload::{Offload, OffloadError};
use crate::server::port::QueueTx;
use crate::server::shard::state::{Ctl, Env, Flags};
use crate::server::shard::Core;
use crate::stats::{Registry, StatsView};
use crate::sys::{socket, waker::Waker};

/// Why a connection closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CloseReason {
    /// The peer closed its side (end of stream), after what it sent was answered.
    PeerClosed,
    /// Nothing happened for `idle_timeout`.
    IdleTimeout,
    /// Queued output made no progress for `write_timeout`, or a close could not flush within
    /// its bound.
    WriteTimeout,
    /// Unconsumed input exceeded `max_read_buffer`.
    ReadOverflow,
    /// A socket error (reset, broken pipe, ...).
    Error,
    /// The server is shutting down.
    Drain,
    /// The service closed it ([`Conn::close`], [`Conn::close_within`]).
    Service,
    /// A service callback panicked on this connection.
    Panic,
    /// The connection moved to another process (a hand-over): to the new process once it
    /// committed, or back to the old one from a new process whose hand-over failed. The
    /// connection itself stays open; only this process's part of it ends.
    HandedOver,
    /// TLS failed: a record that does not decrypt or another protocol error after the
    /// handshake. (A connection whose handshake fails or times out never reaches the service.)
    Tls,
}

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

    /// The connection is closed, for `reason`; release anything kept for it elsewhere.
    fn on_close(&mut self, _token: Token, _state: &mut Self::State, _reason: CloseReason) {}

    /// The server is shutting down: say goodbye. The default closes after flushing.
    fn on_drain(&mut self, conn: &mut Conn<'_, Self::State>) {
        conn.close();
    }

    /// Called once per timer tick (10 ms) while the shard is awake, before its events, and at
    /// the instant [`Service::next_wake`] asked for.
    fn on_tick(&mut self, _ctx: &mut Ctx<'_, Self::State>) {}

    /// An instant at which the shard must wake and call [`Service::on_tick`] even with nothing
    /// else to do, to the microsecond rather than at the next 10 ms tick (the load generator's
    /// open loop sends each request at its intended time). `None` (the default): an idle shard
    /// sleeps until an event or a timer. Asked once per loop turn.
    fn next_wake(&self) -> Option<std::time::Instant> {
        None
    }

    /// A message from another thread.
    fn on_command(&mut self, _cmd: Self::Command, _ctx: &mut Ctx<'_, Self::State>) {}

    /// Called after the commands of one wake-up (at most 4096) have been handed to
    /// `on_command`, so a service can coalesce their work: pub/sub writes every message queued
    /// for a subscriber in one write instead of one write per message.
    fn on_commands_done(&mut self, _ctx: &mut Ctx<'_, Self::State>) {}

    // Hand-over to a new process (restart without dropping a connection, see
    // `crate::server::handover`): the four items below belong together.

    /// Names the format of this service's [`Service::export`] blobs, version included. A
    /// hand-over moves connections only between two services with the same format (the new
    /// process refuses before anything moves otherwise). The default, empty, moves none: the
    /// listeners still move, and the old process keeps serving its connections until the
    /// hand-over commits, then closes them gracefully ([`Service::on_drain`]).
    const HANDOVER_FORMAT: &'static str = "";

    /// This shard is about to export its connections: finish delivering what is under way
    /// (pub/sub messages received but not yet written), so that it travels in the connections'
    /// output. The engine has already handed this shard's pending commands to `on_command`.
    fn before_export(&mut self, _ctx: &mut Ctx<'_, Self::State>) {}

    /// The connection is about to move to a new process: its state as bytes, or `None` if it
    /// cannot move (this process then keeps it and closes it gracefully once the hand-over has
    /// committed). Called on open connections only, between callbacks. The engine carries its
    /// own part itself: unconsumed input, unsent output, the timer, the idle age. Output written
    /// here is queued behind what is already queued and sent by whichever process ends up with
    /// the connection. After `Some`, no callback runs for the connection in this process unless
    /// the hand-over fails (then it carries on as if nothing happened) or it ends
    /// ([`CloseReason::HandedOver`]).
    fn export(&mut self, _conn: &mut Conn<'_, Self::State>) -> Option<Vec<u8>> {
        None
    }

    /// The new process's side of [`Service::export`], instead of [`Service::on_open`]: rebuild
    /// the state from `blob`. The connection is not live yet: output written here is queued and
    /// sent once the hand-over commits, a close request takes effect then, and an error
    /// refuses the whole hand-over (the old process keeps every connection).
    fn import(&mut self, _conn: &mut Conn<'_, Self::State>, _blob: &[u8]) -> Result<(), String> {
        Err("this service takes no connection over".into())
    }
    // --- Offloaded work ([`Peers::offload`]) ---

    /// The result of a job this connection handed to the offload pool with
    /// [`Peers::offload`], back on the connection's own shard. Results come in the order the
    /// jobs finish, not the order they were submitted. Not called when the connection closed
    /// (or began closing) meanwhile: that result is dropped and counted. The default drops it.
    fn on_offload(&mut self, _conn: &mut Conn<'_, Self::State>, _result: Self::Command) {}
}

/// What a service's constructor gets, on the shard's own thread.
pub struct ShardInfo {
    /// The pool's counters, read-only (for `/metrics` and health checks).
    pub stats: StatsView,
    /// Where this shard's service registers counters of its own.
    pub counters: Registry,
    /// This shard's index (0-based).
    pub shard: usize,
    /// How many shards the server runs.
    pub shards: usize,
    /// When the server started.
    pub started: Instant,
    /// The timer tick: timers and timeouts are rounded up to it.
    pub tick: Duration,
}

/// The handle a service writes through during one connection's callback.
pub struct Conn<'a, St> {
    pub(crate) token: Token,
    pub(crate) ctl: &'a mut Ctl,
    pub(crate) state: &'a mut St,
    pub(crate) out: &'a mut Vec<u8>,
    pub(crate) env: &'a Env,
}

impl<St> Conn<'_, St> {
    /// The connection's token: its name on this shard for its whole life (for
    /// [`Ctx::with_conn`] and [`Service::on_close`]), never reused by a later connection.
    pub fn token(&self) -> Token {
        self.token
    }

    /// Index of the listener this connection came from (configuration order).
    pub fn listener(&self) -> usize {
        self.ctl.listener as usize
    }

    /// The shard the connection lives on.
    pub fn shard(&self) -> usize {
        self.env.shard
    }

    /// The service's state for this connection.
    pub fn state(&mut self) -> &mut St {
        self.state
    }

    /// The peer's address, asked of the kernel (one `getpeername`; nothing is stored per
    /// connection). `None` once the peer is gone.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        socket::peer_addr(self.ctl.fd.as_fd()).ok()
    }

    /// Queues bytes; they are written when the callback returns.
    #[inline]
    pub fn write(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    /// The staging buffer itself, for encoders that append.
    #[inline]
    pub fn out(&mut self) -> &mut Vec<u8> {
        self.out
    }

    /// Bytes owed to this connection: queued earlier plus written in this callback.
    pub fn queued(&self) -> usize {
        self.ctl.queued() + self.out.len()
    }

    /// Bytes that may still be written before reaching `max_write_buffer`.
    pub fn room(&self) -> usize {
        self.env
            .limits
            .max_write_buffer
            .saturating_sub(self.queued())
    }

    /// Whether output is at or over `max_write_buffer` (a slow reader).
    pub fn over_limit(&self) -> bool {
        self.queued() >= self.env.limits.max_write_buffer
    }

    /// Closes the connection once what is queued has been written (within `write_timeout`).
    pub fn close(&mut self) {
        self.ctl.request_close(self.env, None);
    }

    /// Closes after flushing, but gives the flush at most `within` (instead of `write_timeout`):
    /// for a peer that may not be reading at all. A timer set afterwards does not move it.
    pub fn close_within(&mut self, within: Duration) {
        self.ctl.request_close(self.env, Some(within));
    }

    /// The service stopped before consuming all its input (its output is over the bound): offer
    /// the leftover input again once the output has drained, without waiting for new bytes.
    pub fn resume_later(&mut self) {
        self.ctl.flags.set(Flags::RESUME);
    }

    /// Stops reading from this connection (and offering it input) until [`Conn::resume_reading`]:
    /// for a service waiting on something (an offloaded job, another shard) before it takes the
    /// next request. Input already received stays buffered; the socket's buffers then fill and
    /// TCP holds the client back. While paused a reset from the peer is noticed, its FIN only
    /// once reading resumes (so a half-closed client still gets its answers). Timeouts run as
    /// usual.
    pub fn pause_reading(&mut self) {
        self.ctl.flags.set(Flags::HELD);
    }

    /// Undoes [`Conn::pause_reading`]: the input left unconsumed is offered again (without
    /// waiting for new bytes) and the socket is read again.
    pub fn resume_reading(&mut self) {
        if self.ctl.flags.has(Flags::HELD) {
            self.ctl.flags.clear(Flags::HELD);
            if self.ctl.input.is_some() {
                self.ctl.flags.set(Flags::RESUME);
            }
        }
    }

    /// Whether reading is paused by [`Conn::pause_reading`].
    pub fn reading_paused(&self) -> bool {
        self.ctl.flags.has(Flags::HELD)
    }

    /// Whether the connection is closing (asked to, or already on its way out).
    pub fn is_closing(&self) -> bool {
        !self.ctl.is_open()
    }

    /// Calls the service's `on_timer` once `after` has passed (replacing any earlier timer).
    /// Timers do not fire once the connection is closing.
    pub fn set_timer(&mut self, after: Duration) {
        self.ctl.timer = self.env.stamp_after(after);
        self.ctl.flags.set(Flags::TIMER.union(Flags::TIMER_SET));
    }

    /// Disarms the timer set with [`Conn::set_timer`].
    pub fn clear_timer(&mut self) {
        self.ctl.flags.clear(Flags::TIMER);
    }

    /// The time of the current wake-up (read once per loop, not per call).
    pub fn now(&self) -> Instant {
        self.env.now
    }

    /// The server is shutting down.
    pub fn draining(&self) -> bool {
        self.env.draining
    }
}

/// Access to the shard's connections outside a connection's own callbacks (ticks, commands).
pub struct Ctx<'a, St> {
    pub(crate) core: &'a mut Core<St>,
}

impl<St> Ctx<'_, St> {
    /// Runs `f` with the handle of connection `token`, then writes what it wrote. Returns `None`
    /// if the connection is gone or closing (or `f` panicked: that connection is then closed).
    pub fn with_conn<R>(
        &mut self,
        token: Token,
        f: impl FnOnce(&mut Conn<'_, St>) -> R,
    ) -> Option<R> {
        self.core.call(token, f)
    }

    /// The time of the current wake-up (read once per loop, not per call).
    pub fn now(&self) -> Instant {
        self.core.env.now
    }

    /// The shard this runs on.
    pub fn shard(&self) -> usize {
        self.core.env.shard
    }

    /// The server is shutting down.
    pub fn draining(&self) -> bool {
        self.core.env.draining
    }

    /// Connections open on this shard.
    pub fn connections(&self) -> usize {
        self.core.conns.len()
    }
}

/// A service's way to reach other threads: every shard (pub/sub fan-out, requests to the shard
/// that owns some data), through each shard's bounded data channel followed by a wake of its
/// eventfd; and the offload pool ([`Peers::offload`]), whose results come back the same way.
pub struct Peers<C> {
    pub(crate) ports: Arc<[PeerPort<C>]>,
    pub(crate) offload: Arc<Offload<C>>,
}

pub(crate) struct PeerPort<C> {
    pub(crate) data: QueueTx<C>,
    pub(crate) waker: Waker,
}

impl<C> Clone for Peers<C> {
    fn clone(&self) -> Self {
        Peers {
            ports: self.ports.clone(),
            offload: self.offload.clone(),
        }
    }
}

impl<C: Send + 'static> Peers<C> {
    /// How many shards there are (the valid indexes of [`Peers::send`]).
    pub fn len(&self) -> usize {
        self.ports.len()
    }

    /// Whether there are no shards (never, for a running server).
    pub fn is_empty(&self) -> bool {
        self.ports.is_empty()
    }

    /// How many commands each shard's data channel holds before [`Peers::send`] refuses: a
    /// service that must never lose a reply keeps its messages in flight under it.
    pub fn capacity(&self) -> usize {
        self.ports.first().map_or(0, |p| p.data.capacity())
    }

    /// Runs `job` on a thread of the offload pool (started by the first job), and hands its
    /// result to [`Service::on_offload`] with this connection, on this connection's shard. Never
    /// blocks: a full pool (`threads + queue` jobs in flight) refuses at once, and the job is
    /// dropped without running.
    ///
    /// The job must not borrow from the connection or the service (it runs on another thread):
    /// move what it needs into it, and the result carries what comes back.
    pub fn offload<St>(
        &self,
        conn: &Conn<'_, St>,
        job: impl FnOnce() -> C + Send + 'static,
    ) -> Result<(), OffloadError> {
        self.offload
            .submit(conn.env.shard, conn.token, Box::new(job))?;
        // The shard's own count (a hand-over waits for its jobs): this runs on its thread.
        conn.env.offloads.set(conn.env.offloads.get() + 1);
        Ok(())
    }

    /// Sends to one shard without blocking; false if its queue is full or the shard is gone
    /// (the caller counts it).
    pub fn send(&self, shard: usize, msg: C) -> bool {
        self.try_send(shard, msg).is_ok()
    }

    /// [`Peers::send`], giving the message back when it is refused.
    pub fn try_send(&self, shard: usize, msg: C) -> Result<(), C> {
        let port = &self.ports[shard];
        port.data.try_send(msg)?;
        port.waker.wake();
        Ok(())
    }

    /// Sends a clone to every shard; returns how many queues accepted it.
    pub fn broadcast(&self, msg: C) -> usize
    where
        C: Clone,
    {
        (0..self.ports.len())
            .filter(|&s| self.send(s, msg.clone()))
            .count()
    }
}
