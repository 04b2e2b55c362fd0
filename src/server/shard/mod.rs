//! One shard: a pinned thread that owns an epoll instance, a slab of connections, a timer wheel,
//! one read buffer and one output staging buffer, and drives one service instance.
//!
//! Ownership: everything under `shard/` is touched by the shard's own thread only. Other threads
//! reach a shard through its channels (see [`crate::server::port`]) followed by a wake of its
//! eventfd, and read its counters.
//!
//! This file holds the run loop and what enters the shard from outside: control messages, new
//! connections, data commands for the service, and its own listeners (`balance = "reuseport"`).
//! [`state`] is a connection's lifecycle, [`lifecycle`] the callback helper and the close and
//! deadline rules, [`io`] the read and write paths. One loop turn, in order:
//!
//! 1. `epoll_wait`, for no longer than the next timer, the service's `next_wake`, a paused
//!    listener's retry or the drain deadline (zero while work is left over from the last turn or
//!    waits in a channel);
//! 2. the clock (read once per turn), then **control** (drain, new limits), each message applied
//!    and acknowledged before anything else is looked at;
//! 3. a new tick: the service's `on_tick`, then the connections whose deadline came (or, between
//!    ticks, `on_tick` alone at the instant the service's `next_wake` asked for);
//! 4. the events: reads and writes (and the eventfd, whose count is consumed);
//! 5. connections whose read budget ran out, then the shard's own listeners;
//! 6. the channels: control again, new connections, then at most 4096 data commands (with
//!    control looked at every 64 of them), then at most 4096 results of offloaded jobs;
//! 7. once draining and empty (or past `shutdown_timeout`), the end.
//!
//! The channels are looked at every turn, so a shard that is awake needs no wake: senders
//! write its eventfd only once it has said it is going to sleep ([`Waker::arm`]), and it looks
//! at its channels once more after saying so. A busy shard exchanging commands with another
//! makes no eventfd system call at all.
//!
//! Per event in the steady state the shard makes the same system calls as a minimal epoll loop
//! (one `recv`, one `send`) and allocates nothing.

pub(crate) mod handover;
pub(crate) mod io;
pub(crate) mod lifecycle;
pub(crate) mod state;
pub(crate) mod tls;

use std::os::fd::AsFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::conn::{BufferPool, Slab, Token, TokenKind};
use crate::server::api::{CloseReason, Ctx, Service};
use crate::server::listener::{AcceptCounters, Listener, Step};
use crate::server::offload::{Done, Outcome};
use crate::server::port::{Control, Inbox, NewConn};
use crate::server::{Limits, TlsSide, TlsSpec, Tuning};
use crate::stats::{ShardCounters, Stats};
use crate::sys::mem::Zeroed;
use crate::sys::poller::{Events, Interest, Poller};
use crate::sys::waker::Waker;
use crate::timer::TimerWheel;
pub use state::TICK;
use state::{Ctl, Env};

/// Wheel slots: 8192 ticks of 10 ms span 82 s; longer deadlines wait for their round.
const WHEEL_SLOTS: usize = 8192;
/// Commands (and new connections, and offload results) handled per loop turn; the rest wait for
/// the next turn, which does not sleep, so a flood of commands cannot stall I/O.
const WAKE_BATCH: usize = 4096;
/// Within a batch of data commands, control is looked at again after this many.
const CONTROL_EVERY: usize = 64;
/// Accepts per own listener per loop turn (the connections already open get their turn too).
const ACCEPT_BATCH: usize = 64;

/// A connection: the engine's part and the service's.
pub(crate) struct Entry<St> {
    pub ctl: Ctl,
    pub state: St,
}

/// Everything a shard owns except its service (kept apart so the service can be called while
/// the core is borrowed).
pub(crate) struct Core<St> {
    pub(crate) poller: Poller,
    pub(crate) conns: Slab<Entry<St>>,
    pub(crate) wheel: TimerWheel,
    /// Resident only as far as reads have reached (see [`crate::sys::mem`]).
    pub(crate) read_buf: Zeroed<u8>,
    /// Where a callback's output is staged before one `send`.
    pub(crate) scratch: Vec<u8>,
    pub(crate) pool: BufferPool,
    pub(crate) stats: Arc<Stats>,
    pub(crate) env: Env,
    pub(crate) tuning: Tuning,
    /// Connections to read again after everyone else had a turn (budget spent, resumed).
    pub(crate) ready: Vec<Token>,
    /// Connections to close at the end of the current event.
    pub(crate) doomed: Vec<(Token, CloseReason)>,
    /// TLS of each listener, by listener index (see [`tls`]).
    pub(crate) tls_listeners: Vec<Option<TlsSpec>>,
    /// The TLS state of each TLS connection, by slab slot; empty without TLS listeners.
    pub(crate) tls: Vec<Option<tls::TlsState>>,
    /// Where TLS records are built before one `send`: the ciphertext of what a callback staged,
    /// or what a handshake step answered.
    pub(crate) wire: Vec<u8>,
}

impl<St> Core<St> {
    pub(crate) fn counters(&self) -> &ShardCounters {
        self.stats.shard(self.env.shard)
    }
}

/// A shard: its core, its service, and the channels other threads reach it through.
pub(crate) struct Shard<S: Service> {
    pub(crate) core: Core<S::State>,
    pub(crate) service: S,
    inbox: Inbox<S::Command>,
    waker: Waker,
    drain_deadline: Option<Instant>,
    expired: Vec<usize>,
    /// `balance = "reuseport"`: this shard's own listeners (no acceptor thread).
    listeners: Vec<Listener>,
    max_connections: usize,
    /// `shard N`, for log lines.
    name: String,
    /// Connections lent to or held from another process during a hand-over.
    handover: handover::HandoverState<S::Command>,
}

/// What a shard is started with.
pub(crate) struct ShardSetup<C> {
    pub shard: usize,
    pub limits: Limits,
    pub tuning: Tuning,
    pub stats: Arc<Stats>,
    pub waker: Waker,
    pub inbox: Inbox<C>,
    pub start: Instant,
    pub listeners: Vec<Listener>,
    pub max_connections: usize,
    /// TLS of each listener, by listener index.
    pub tls: Vec<Option<TlsSpec>>,
}

impl<S: Service> Shard<S> {
    pub fn new(service: S, setup: ShardSetup<S::Command>) -> std::io::Result<Self> {
        let poller = Poller::new()?;
        poller.add(
            setup.waker.fd(),
            Token::WAKER.0,
            Interest {
                read: true,
                write: false,
                edge: false,
            },
        )?;
        for (i, l) in setup.listeners.iter().enumerate() {
            let interest = Interest {
                read: true,
                write: false,
                edge: true,
            };
            poller.add(l.fd(), Token::listener(i).0, interest)?;
        }
        let tuning = setup.tuning;
        Ok(Shard {
            core: Core {
                poller,
                conns: Slab::default(),
                wheel: TimerWheel::new(setup.start, TICK, WHEEL_SLOTS),
                read_buf: Zeroed::new(tuning.read_buffer.max(512)),
                scratch: Vec::with_capacity(16 * 1024),
                pool: BufferPool::new(256, 256 * 1024),
                stats: setup.stats,
                env: Env::new(setup.shard, setup.start, setup.limits),
                tuning,
                ready: Vec::new(),
                doomed: Vec::new(),
                tls_listeners: setup.tls,
                tls: Vec::new(),
                wire: Vec::new(),
            },
            service,
            inbox: setup.inbox,
            waker: setup.waker,
            drain_deadline: None,
            expired: Vec::new(),
            listeners: setup.listeners,
            max_connections: setup.max_connections,
            name: format!("shard {}", setup.shard),
            handover: handover::HandoverState::default(),
        })
    }

    /// Runs until drained. Consumes the shard.
    pub fn run(mut self) {
        let mut events = Events::with_capacity(self.core.tuning.events_per_wait);
        let mut ready = Vec::new();
        loop {
            let mut timeout = self.timeout();
            if timeout != Some(Duration::ZERO) {
                // Going to sleep: from here on a message wakes us, and one sent just before is
                // looked for now.
                self.waker.arm();
                if self.inbox_waiting() {
                    self.waker.disarm();
                    timeout = Some(Duration::ZERO);
                }
            }
            let waited = self.core.poller.wait(&mut events, timeout);
            self.waker.disarm();
            if let Err(e) = waited {
                // The event array is empty after an error: nothing stale is handled below.
                log::error!("{}: epoll_wait failed: {e}; retrying", self.name);
                std::thread::sleep(Duration::from_millis(10));
            }
            self.core.counters().epoll_waits.inc();
            let new_tick = self.update_clock();
            self.on_control();
            if new_tick {
                self.fire_timers();
            } else if self
                .service
                .next_wake()
                .is_some_and(|t| t <= self.core.env.now)
            {
                self.with_ctx("on_tick", |service, ctx| service.on_tick(ctx));
            }

            let n = events.len();
            self.core.counters().events.add(n as u64);
            for i in 0..n {
                let ev = events.get(i);
                let token = Token(ev.token);
                match token.kind() {
                    TokenKind::Waker => {
                        self.core.counters().wakeups.inc();
                        self.waker.consume();
                    }
                    TokenKind::Listener(l) => {
                        if let Some(l) = self.listeners.get_mut(l) {
                            l.mark_ready();
                        }
                    }
                    TokenKind::Conn => {
                        if self.core.conns.get(token).is_none() {
                            self.core.counters().stale_tokens.inc();
                            continue;
                        }
                        if ev.writable || ev.error {
                            self.on_writable(token);
                        }
                        if ev.readable || ev.error {
                            self.on_readable(token, ev.read_closed);
                        }
                        if ev.error {
                            self.on_error_unread(token);
                        }
                    }
                }
                self.reap();
            }
            // Continue connections whose budget ran out, after everyone else had a turn.
            std::mem::swap(&mut ready, &mut self.core.ready);
            for token in ready.drain(..) {
                self.on_readable(token, false);
                self.reap();
            }
            self.accept_ready();
            self.on_inbox();
            if self.activating() {
                self.activate_some();
            }

            if let Some(deadline) = self.drain_deadline {
                if self.core.conns.is_empty() {
                    break;
                }
                if self.core.env.now >= deadline {
                    log::warn!(
                        "{}: shutdown_timeout reached, closing {} connections",
                        self.name,
                        self.core.conns.len()
                    );
                    for token in self.core.conns.tokens() {
                        self.core.doom(token, CloseReason::Drain);
                    }
                    self.reap();
                    break;
                }
            }
        }
        // A hand-over's clean-up finishes before the shard counts as ended, so the process does
        // not exit with it half done (the rest would then be done at the exit's priority).
        self.join_cleanup();
    }

    /// How long the next `epoll_wait` may sleep.
    fn timeout(&self) -> Option<Duration> {
        if !self.core.ready.is_empty()
            || self.listeners.iter().any(Listener::is_ready)
            || self.activating()
        {
            return Some(Duration::ZERO);
        }
        let mut wake = self.core.wheel.next_wake();
        let mut consider = |t: Instant| wake = Some(wake.map_or(t, |w: Instant| w.min(t)));
        for t in self.listeners.iter().filter_map(Listener::paused_until) {
            consider(t);
        }
        if let Some(t) = self.service.next_wake() {
            consider(t);
        }
        if let Some(d) = self.drain_deadline {
            consider(d);
        }
        wake.map(|w| w.saturating_duration_since(Instant::now()))
    }

    /// Reads the clock; true if a new tick began.
    fn update_clock(&mut self) -> bool {
        let now = Instant::now();
        self.core.env.now = now;
        let tick = self.core.wheel.tick_of(now);
        if tick == self.core.env.tick {
            return false;
        }
        self.core.env.tick = tick;
        true
    }

    /// A new tick: the service's `on_tick`, then every connection whose deadline came.
    fn fire_timers(&mut self) {
        self.with_ctx("on_tick", |service, ctx| service.on_tick(ctx));
        let mut expired = std::mem::take(&mut self.expired);
        self.core.wheel.advance(self.core.env.tick, &mut expired);
        for &index in &expired {
            if let Some(token) = self.core.conns.token_at(index) {
                self.on_deadline(token);
            }
        }
        expired.clear();
        self.expired = expired;
        self.reap();
    }

    /// Runs a service callback that gets the shard's [`Ctx`] rather than one connection. A panic
    /// in it is caught, counted and logged; the shard carries on (a panic inside
    /// `Ctx::with_conn` has already closed that connection).
    fn with_ctx(&mut self, what: &str, f: impl FnOnce(&mut S, &mut Ctx<'_, S::State>)) {
        let service = &mut self.service;
        let mut ctx = Ctx {
            core: &mut self.core,
        };
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| f(service, &mut ctx))) {
            self.core.scratch.clear();
            self.core.counters().service_panics.inc();
            log::error!(
                "{}: the service panicked in {what}: {}",
                self.name,
                lifecycle::panic_message(&*payload)
            );
        }
        self.reap();
    }

    /// Control first: applies and acknowledges every pending control message.
    fn on_control(&mut self) {
        while let Ok(msg) = self.inbox.control.try_recv() {
            match msg.control {
                Control::Drain => self.start_drain(),
                Control::Limits(limits) => {
                    self.core.env.limits = limits;
                    // A shorter timeout must take effect for connections already waiting.
                    for token in self.core.conns.tokens() {
                        self.core.rearm(token, true);
                    }
                }
                Control::Tls(listener, acceptor) => {
                    // Handshakes from now on use it; open connections keep their own.
                    if let Some(Some(spec)) = self.core.tls_listeners.get_mut(listener) {
                        spec.side = TlsSide::Server(acceptor);
                    }
                }
                Control::Handover(step) => {
                    self.core.counters().controls.inc();
                    if let Some(ack) = self.on_handover(step, msg.ack) {
                        let _ = ack.send(self.core.env.shard);
                    }
                    continue;
                }
            }
            self.core.counters().controls.inc();
            // The sender may have stopped waiting; it has counted that already.
            let _ = msg.ack.send(self.core.env.shard);
        }
    }

    /// Whether a channel holds something (looked at after arming the waker, before sleeping).
    fn inbox_waiting(&self) -> bool {
        let inbox = &self.inbox;
        !inbox.control.is_empty()
            || !inbox.conns.is_empty()
            || !inbox.data.is_empty()
            || !inbox.results.is_empty()
    }

    /// The channels, every loop turn: control, new connections, data commands, offload results.
    fn on_inbox(&mut self) {
        self.on_control();
        let mut adopted = 0;
        while adopted < WAKE_BATCH {
            let Some(nc) = self.inbox.conns.try_recv() else {
                break;
            };
            self.adopt(nc);
            adopted += 1;
        }
        self.inbox.conns.release(adopted);
        let mut commands = 0;
        while commands < WAKE_BATCH {
            let Some(cmd) = self.inbox.data.try_recv() else {
                break;
            };
            commands += 1;
            self.with_ctx("on_command", |service, ctx| service.on_command(cmd, ctx));
            if commands % CONTROL_EVERY == 0 {
                // Control does not wait for the rest of a batch of slow commands either.
                self.on_control();
            }
        }
        self.inbox.data.release(commands);
        if commands > 0 {
            self.core.counters().commands.add(commands as u64);
            self.with_ctx("on_commands_done", |service, ctx| {
                service.on_commands_done(ctx)
            });
        }
        let mut results = 0;
        while results < WAKE_BATCH {
            let Ok(done) = self.inbox.results.try_recv() else {
                break;
            };
            results += 1;
            self.on_result(done);
        }
        // What is left past a batch's bound waits for the next turn, which does not sleep
        // (`inbox_waiting`).
        self.reap();
    }

    /// An offloaded job's result: to its connection if that is still open, else dropped.
    fn on_result(&mut self, done: Done<S::Command>) {
        let offload = self.core.stats.offload();
        // The place this job held in the pool's bound is free once its result is taken.
        offload
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        let env = &self.core.env;
        env.offloads.set(env.offloads.get().saturating_sub(1));
        let Some(done) = self.keep_if_lent(done) else {
            return;
        };
        self.deliver_result(done);
    }

    /// [`Shard::on_result`] once the result is known to be this process's to deliver.
    pub(crate) fn deliver_result(&mut self, done: Done<S::Command>) {
        let offload = self.core.stats.offload();
        let open = self
            .core
            .conns
            .get(done.token)
            .is_some_and(|e| e.ctl.is_open());
        match done.outcome {
            Outcome::Ok(result) if open => {
                offload.done.inc();
                offload.record_latency(done.queued_at.elapsed());
                let service = &mut self.service;
                self.core
                    .call(done.token, |conn| service.on_offload(conn, result));
            }
            Outcome::Ok(_) => offload.dropped.inc(),
            Outcome::Panicked(message) => {
                offload.panicked.inc();
                log::error!(
                    "{}: an offloaded job panicked: {message}; closing its connection",
                    self.name
                );
                self.core.doom(done.token, CloseReason::Panic);
            }
        }
        self.reap();
    }

    /// An error or hang-up event for a connection the read path did not look at (its service
    /// paused reading) and the write path had nothing for: the peer is gone (a reset), so
    /// the connection is closed now rather than when reading resumes.
    fn on_error_unread(&mut self, token: Token) {
        let Some(e) = self.core.conns.get(token) else {
            return;
        };
        if e.ctl.is_open() && !e.ctl.reading() && e.ctl.output.is_none() {
            self.core.doom(token, CloseReason::Error);
        }
    }

    fn start_drain(&mut self) {
        if self.drain_deadline.is_some() {
            return;
        }
        self.settle_handover();
        self.core.env.draining = true;
        self.drain_deadline = Some(self.core.env.now + self.core.tuning.shutdown_timeout);
        // Reuseport mode: stop accepting; closing the sockets hands their queues to any other
        // process on the port (net.ipv4.tcp_migrate_req).
        self.listeners.clear();
        self.handover.paused.clear();
        // Sockets still in the channel were accepted: serve what they sent, then close them.
        while let Some(nc) = self.inbox.conns.try_recv() {
            self.inbox.conns.release(1);
            self.adopt(nc);
        }
        // Serve what each client already sent; each connection then closes once it has been
        // quiet for a while (see `lifecycle::drain_quiet`), or at shutdown_timeout.
        for token in self.core.conns.tokens() {
            self.on_readable(token, false);
            self.core.rearm(token, true);
        }
        self.reap();
    }

    /// Accepts on this shard's own listeners (reuseport mode), one batch per ready listener.
    fn accept_ready(&mut self) {
        let now = self.core.env.now;
        for i in 0..self.listeners.len() {
            if !self.listeners[i].wants_accept(now) {
                continue;
            }
            for _ in 0..ACCEPT_BATCH {
                let step = {
                    let counters = AcceptCounters::shard(self.core.counters());
                    self.listeners[i].accept(&self.name, &counters)
                };
                match step {
                    Step::Conn(fd) => {
                        let stats = &self.core.stats;
                        let open: u64 = (0..stats.shard_count())
                            .map(|s| stats.shard(s).open.get())
                            .sum();
                        if open >= self.max_connections as u64 {
                            self.core.counters().rejected.inc();
                            continue; // dropping `fd` closes it
                        }
                        let listener = self.listeners[i].index;
                        self.adopt(NewConn::accepted(fd, listener));
                        self.reap();
                    }
                    Step::Skipped => {}
                    Step::Drained | Step::Paused => break,
                }
            }
        }
    }

    /// Takes a connected socket into the slab and epoll, then tells the service (a connection
    /// from an old process: held, see [`handover`]).
    fn adopt(&mut self, mut nc: NewConn) {
        if let Some(record) = nc.import.take() {
            self.import(nc, *record);
            return;
        }
        let core = &mut self.core;
        let edge = core.tuning.edge;
        let token = core.conns.insert(Entry {
            ctl: Ctl::new(nc.fd, nc.listener, core.env.stamp()),
            state: S::State::default(),
        });
        let e = core.conns.get_mut(token).expect("just inserted");
        let interest = Interest {
            read: true,
            write: false,
            edge,
        };
        if let Err(err) = core.poller.add(e.ctl.fd.as_fd(), token.0, interest) {
            log::warn!("{}: cannot register a connection: {err}", self.name);
            core.conns.remove(token);
            core.counters().errors.inc();
            return;
        }
        let counters = core.counters();
        counters.accepted.inc();
        counters.open.inc();
        // A TLS connection is the service's once its handshake is done (`tls::tls_read`).
        if !core.tls_adopt(token, nc.listener) {
            core.call(token, |conn| self.service.on_open(conn));
        }
        core.rearm(token, false);
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    /// The slab crate's own entry around each slot (`Vacant(next free)` or the value).
    #[allow(dead_code)]
    enum SlabEntry<T> {
        Vacant(usize),
        Occupied(T),
    }

    #[test]
    fn an_idle_connection_costs_at_most_64_bytes_of_engine_state() {
        // The engine's part of an idle connection: its slab entry (generation, Ctl, a stateless
        // service's nothing) and its timer link. The goal is 100 bytes with the service's state.
        let slab_entry = std::mem::size_of::<SlabEntry<crate::conn::Slot<Entry<()>>>>();
        let total = slab_entry + crate::timer::LINK_BYTES;
        assert!(slab_entry <= 48, "slab entry {slab_entry} bytes");
        assert!(total <= 64, "{total} bytes per idle connection");
    }
}
