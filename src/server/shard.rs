//! One shard: a pinned thread that owns an epoll instance, a slab of connections, a timer wheel,
//! one read buffer and one output staging buffer, and drives one service instance.
//!
//! Ownership: everything in this file is touched by the shard's own thread only. Other threads
//! reach a shard through its two bounded channels (new connections; commands) followed by a
//! wake of its eventfd, and read its counters.
//!
//! Per event in the steady state the shard makes the same system calls as a minimal epoll loop
//! (one `read`, one `write`) and allocates nothing: input is read into the shard's one buffer and
//! handed to the service in place; a connection owns a buffer only while it has leftover input or
//! unsent output, so an idle connection holds none.
//!
//! Edge-triggered mode reads until the socket is drained or the connection's byte budget for this
//! wake is spent; a connection with budget exhausted goes on the `ready` list and is continued
//! after the other events, so one busy connection cannot starve the rest. A short read (fewer
//! bytes than asked) means the socket was drained: the kernel raises a new edge for anything that
//! arrives later, so the extra read that would return `EAGAIN` is skipped.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, TryRecvError};

use crate::conn::{BufferPool, InBuf, OutBuf, Slab, Token};
use crate::service::Service;
use crate::stats::{ShardCounters, Stats};
use crate::sys::poller::{Events, Interest, Poller};
use crate::sys::socket::{self, Io};
use crate::sys::waker::Waker;
use crate::timer::TimerWheel;

/// Length of one timer tick.
pub const TICK: Duration = Duration::from_millis(10);
/// Wheel slots: 8192 ticks of 10 ms span 82 s; longer deadlines wait for their round.
const WHEEL_SLOTS: usize = 8192;
/// How long a closed connection waits for the peer's FIN after ours (see `finish_close`).
const LINGER: Duration = Duration::from_secs(2);
/// While draining, a connection is closed once it has been quiet this long (a client that just
/// connected gets to send its request and hear the answer; shutdown_timeout bounds the rest).
const DRAIN_QUIET: Duration = Duration::from_millis(250);
/// Output staging above this capacity is given back after use.
const SCRATCH_KEEP: usize = 256 * 1024;

/// The limits a shard enforces; they can change at run time (reload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `Duration::ZERO`: never.
    pub idle_timeout: Duration,
    pub max_write_buffer: usize,
    pub write_timeout: Duration,
    pub max_read_buffer: usize,
}

/// Engine settings fixed for the life of a shard.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    pub edge: bool,
    pub read_buffer: usize,
    pub read_budget: usize,
    pub events_per_wait: usize,
    pub shutdown_timeout: Duration,
}

/// A message to a shard.
pub enum Command<C> {
    /// Shut down gracefully: stop reading new requests, flush, close, exit.
    Drain,
    /// New limits (a configuration reload).
    Limits(Limits),
    /// For the service.
    Service(C),
}

/// A socket handed to a shard, and the listener it came from.
pub struct NewConn {
    pub fd: OwnedFd,
    pub listener: usize,
}

// Connection flags.
const PAUSED: u16 = 1 << 0; // reading stopped: output over max_write_buffer
const CLOSING: u16 = 1 << 1; // close requested: flush, then finish
const LINGER_WAIT: u16 = 1 << 2; // FIN sent, waiting for the peer's
const EOF: u16 = 1 << 3; // the peer closed its side
const CLOSE_REQ: u16 = 1 << 4; // set by `Conn::close`, acted on after the callback
const SVC_TIMER: u16 = 1 << 5; // `deadline` holds a service timer
const CLOSE_TIMER: u16 = 1 << 6; // `deadline` bounds the close (flush or linger)
const REG_READ: u16 = 1 << 7; // EPOLLIN is registered
const REG_WRITE: u16 = 1 << 8; // EPOLLOUT is registered
const DOOMED: u16 = 1 << 9; // queued for close: ignore further I/O
const ABORT: u16 = 1 << 10; // close without flushing (write failed)
const RESUME: u16 = 1 << 11; // the service stopped early: offer its leftover input again
const CLOSE_SOON: u16 = 1 << 12; // `deadline` already bounds the flush of a close

/// Why a connection closed (for counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    Normal,
    Error,
    Idle,
    WriteTimeout,
    ReadOverflow,
}

/// The engine's part of a connection. Ticks are stored as `u32` (10 ms: wraps after 497 days)
/// and compared with wrapping arithmetic relative to now.
pub struct Ctl {
    fd: OwnedFd,
    listener: u16,
    flags: u16,
    last_active: u32,
    deadline: u32,
    over_since: u32,
    input: Option<InBuf>,
    output: Option<Box<OutBuf>>,
}

struct Entry<St> {
    ctl: Ctl,
    state: St,
}

/// State shared by every callback of one shard.
pub struct Env {
    shard: usize,
    now: Instant,
    tick: u64,
    limits: Limits,
    draining: bool,
}

impl Env {
    fn ticks(d: Duration) -> u64 {
        d.as_nanos().div_ceil(TICK.as_nanos()) as u64
    }

    /// The absolute tick of a stored `u32` tick within ±248 days of now.
    fn abs(&self, t: u32) -> u64 {
        let d = t.wrapping_sub(self.tick as u32) as i32 as i64;
        (self.tick as i64 + d).max(0) as u64
    }
}

/// The handle a service writes through during a callback.
pub struct Conn<'a, St> {
    token: Token,
    ctl: &'a mut Ctl,
    state: &'a mut St,
    out: &'a mut Vec<u8>,
    env: &'a Env,
}

impl<St> Conn<'_, St> {
    pub fn token(&self) -> Token {
        self.token
    }

    /// Index of the listener this connection came from (configuration order).
    pub fn listener(&self) -> usize {
        self.ctl.listener as usize
    }

    pub fn shard(&self) -> usize {
        self.env.shard
    }

    pub fn state(&mut self) -> &mut St {
        self.state
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
        self.ctl.output.as_ref().map_or(0, |o| o.len()) + self.out.len()
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

    /// Closes the connection once what is queued has been written.
    pub fn close(&mut self) {
        self.ctl.flags |= CLOSE_REQ;
    }

    /// The service stopped before consuming all its input (its output is over the bound): offer
    /// the leftover input again once the output has drained, without waiting for new bytes.
    pub fn resume_later(&mut self) {
        self.ctl.flags |= RESUME;
    }

    /// Closes after flushing, but gives the flush at most `within` (instead of `write_timeout`):
    /// for a peer that may not be reading at all.
    pub fn close_within(&mut self, within: Duration) {
        self.ctl.flags |= CLOSE_REQ | CLOSE_SOON;
        self.ctl.deadline = (self.env.tick + Env::ticks(within).max(1)) as u32;
    }

    pub fn is_closing(&self) -> bool {
        self.ctl.flags & (CLOSE_REQ | CLOSING | DOOMED) != 0
    }

    /// Calls the service's `on_timer` once `after` has passed (replacing any earlier timer).
    pub fn set_timer(&mut self, after: Duration) {
        let t = self.env.tick + Env::ticks(after).max(1);
        self.ctl.deadline = t as u32;
        self.ctl.flags |= SVC_TIMER;
    }

    pub fn clear_timer(&mut self) {
        self.ctl.flags &= !SVC_TIMER;
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
    core: &'a mut Core<St>,
}

impl<St> Ctx<'_, St> {
    /// Runs `f` with the handle of connection `token`, then writes what it wrote. Returns `None`
    /// if the connection is gone or closing.
    pub fn with_conn<R>(
        &mut self,
        token: Token,
        f: impl FnOnce(&mut Conn<'_, St>) -> R,
    ) -> Option<R> {
        let core = &mut *self.core;
        let e = core.conns.get_mut(token)?;
        if e.ctl.flags & (CLOSING | DOOMED | LINGER_WAIT) != 0 {
            return None;
        }
        let r = {
            let mut conn = Conn {
                token,
                ctl: &mut e.ctl,
                state: &mut e.state,
                out: &mut core.scratch,
                env: &core.env,
            };
            f(&mut conn)
        };
        core.after_callback(token);
        Some(r)
    }

    pub fn now(&self) -> Instant {
        self.core.env.now
    }

    pub fn shard(&self) -> usize {
        self.core.env.shard
    }

    pub fn draining(&self) -> bool {
        self.core.env.draining
    }

    pub fn connections(&self) -> usize {
        self.core.conns.len()
    }
}

/// Everything a shard owns except its service (kept apart so the service can be called while
/// the core is borrowed).
pub struct Core<St> {
    poller: Poller,
    conns: Slab<Entry<St>>,
    wheel: TimerWheel,
    read_buf: Box<[u8]>,
    scratch: Vec<u8>,
    pool: BufferPool,
    stats: Arc<Stats>,
    env: Env,
    tuning: Tuning,
    ready: Vec<Token>,
    doomed: Vec<(Token, Reason)>,
}

impl<St> Core<St> {
    fn counters(&self) -> &ShardCounters {
        self.stats.shard(self.env.shard)
    }

    /// Registers or updates epoll interest to match the connection's flags.
    fn sync_interest(&mut self, token: Token) {
        let edge = self.tuning.edge;
        let Some(e) = self.conns.get_mut(token) else {
            return;
        };
        let c = &mut e.ctl;
        let read = c.flags & (PAUSED | DOOMED) == 0
            && (c.flags & CLOSING == 0 || c.flags & LINGER_WAIT != 0);
        let write = c.output.is_some() && c.flags & DOOMED == 0;
        let want = (if read { REG_READ } else { 0 }) | (if write { REG_WRITE } else { 0 });
        if c.flags & (REG_READ | REG_WRITE) == want {
            return;
        }
        let interest = Interest { read, write, edge };
        let was_reading = c.flags & REG_READ != 0;
        if self.poller.modify(c.fd.as_fd(), token.0, interest).is_ok() {
            c.flags = (c.flags & !(REG_READ | REG_WRITE)) | want;
            // Edge-triggered: data that arrived while reading was off raised no new edge.
            if edge && read && !was_reading {
                self.ready.push(token);
            }
        } else {
            c.flags |= ABORT;
            self.doom(token, Reason::Error);
        }
    }

    fn doom(&mut self, token: Token, reason: Reason) {
        if let Some(e) = self.conns.get_mut(token) {
            if e.ctl.flags & DOOMED == 0 {
                e.ctl.flags |= DOOMED;
                self.doomed.push((token, reason));
            }
        }
    }

    /// Writes what a callback staged in `scratch`, queues the rest, and acts on a close request.
    fn after_callback(&mut self, token: Token) {
        let max_write = self.env.limits.max_write_buffer;
        let tick = self.env.tick;
        let Some(e) = self.conns.get_mut(token) else {
            self.scratch.clear();
            return;
        };
        let c = &mut e.ctl;
        let mut rearm = c.flags & SVC_TIMER != 0;
        if !self.scratch.is_empty() {
            let data = &self.scratch[..];
            let counters = self.stats.shard(self.env.shard);
            match &mut c.output {
                Some(out) => {
                    out.push(data);
                    counters.output_queued.add(data.len() as u64);
                }
                None => {
                    let written = match socket::write(c.fd.as_fd(), data) {
                        Io::Done(n) => {
                            counters.writes.inc();
                            counters.bytes_out.add(n as u64);
                            n
                        }
                        Io::WouldBlock => 0,
                        Io::Failed(_) => {
                            c.flags |= ABORT;
                            usize::MAX
                        }
                    };
                    if written != usize::MAX && written < data.len() {
                        c.output = Some(self.pool.output_from(&data[written..]));
                        counters.output_queued.add((data.len() - written) as u64);
                    }
                }
            }
            if self.scratch.capacity() > SCRATCH_KEEP {
                self.scratch = Vec::with_capacity(SCRATCH_KEEP);
            } else {
                self.scratch.clear();
            }
            if c.flags & ABORT == 0 {
                let queued = c.output.as_ref().map_or(0, |o| o.len());
                if queued > max_write && c.flags & PAUSED == 0 {
                    c.flags |= PAUSED;
                    c.over_since = tick as u32;
                    rearm = true;
                    self.stats.shard(self.env.shard).backpressure_pauses.inc();
                }
            }
        }
        if c.flags & ABORT != 0 {
            self.doom(token, Reason::Error);
            return;
        }
        if c.flags & CLOSE_REQ != 0 {
            c.flags &= !CLOSE_REQ;
            self.begin_close(token);
            return;
        }
        if c.flags & RESUME != 0 && c.output.is_none() {
            self.ready.push(token);
        }
        self.sync_interest(token);
        if rearm {
            self.rearm(token, true);
        }
    }

    /// Graceful close: flush what is queued (bounded by write_timeout), then `finish_close`.
    fn begin_close(&mut self, token: Token) {
        let write_ticks = Env::ticks(self.env.limits.write_timeout).max(1);
        let tick = self.env.tick;
        let Some(e) = self.conns.get_mut(token) else {
            return;
        };
        if e.ctl.flags & (CLOSING | DOOMED) != 0 {
            return;
        }
        e.ctl.flags |= CLOSING;
        if e.ctl.output.is_none() {
            self.finish_close(token);
            return;
        }
        if e.ctl.flags & CLOSE_SOON == 0 {
            e.ctl.deadline = (tick + write_ticks) as u32;
        }
        e.ctl.flags = (e.ctl.flags & !(SVC_TIMER | CLOSE_SOON)) | CLOSE_TIMER;
        self.sync_interest(token);
        self.rearm(token, true);
    }

    /// Everything is written. If the peer may still be sending, closing now could turn our last
    /// bytes into a reset (unread input makes `close` send RST), so send FIN and wait briefly for
    /// the peer's FIN, discarding input, as lingering close in HTTP servers does.
    fn finish_close(&mut self, token: Token) {
        let tick = self.env.tick;
        let Some(e) = self.conns.get_mut(token) else {
            return;
        };
        if e.ctl.flags & EOF != 0 {
            self.doom(token, Reason::Normal);
            return;
        }
        socket::shutdown_write(e.ctl.fd.as_fd());
        e.ctl.flags = (e.ctl.flags & !SVC_TIMER) | CLOSING | LINGER_WAIT | CLOSE_TIMER;
        e.ctl.deadline = (tick + Env::ticks(LINGER)) as u32;
        if let Some(b) = e.ctl.input.take() {
            self.stats
                .shard(self.env.shard)
                .input_buffered
                .sub(b.len() as u64);
            self.pool.release_input(b);
        }
        self.sync_interest(token);
        self.rearm(token, true);
        // The peer's FIN (or more input) may already be here; no new edge would announce it.
        self.ready.push(token);
    }

    /// The connection's next deadline: the earliest of its idle, service, write and close timers.
    fn next_deadline(&self, c: &Ctl) -> Option<u64> {
        let env = &self.env;
        let mut best: Option<u64> = None;
        let mut consider = |t: u64| best = Some(best.map_or(t, |b: u64| b.min(t)));
        if c.flags & (SVC_TIMER | CLOSE_TIMER) != 0 {
            consider(env.abs(c.deadline));
        }
        if env.draining && c.flags & CLOSING == 0 {
            consider(env.abs(c.last_active) + Env::ticks(DRAIN_QUIET));
        }
        if c.flags & CLOSING == 0 {
            if c.flags & PAUSED != 0 {
                consider(env.abs(c.over_since) + Env::ticks(env.limits.write_timeout).max(1));
            } else if !env.limits.idle_timeout.is_zero() && c.output.is_none() {
                consider(env.abs(c.last_active) + Env::ticks(env.limits.idle_timeout).max(1));
            }
        }
        best
    }

    /// Puts the connection in the wheel at its next deadline. Activity does not call this: a
    /// moved-out idle deadline is discovered when the old one fires. `earlier_only` keeps an
    /// earlier scheduled entry (it will re-evaluate when it fires).
    fn rearm(&mut self, token: Token, earlier_only: bool) {
        let Some(e) = self.conns.get(token) else {
            return;
        };
        let next = self.next_deadline(&e.ctl);
        let key = token.index();
        match (next, self.wheel.deadline(key)) {
            (None, _) => self.wheel.cancel(key),
            (Some(n), Some(cur)) if earlier_only && cur <= n => {}
            (Some(n), _) => self.wheel.schedule(key, n),
        }
    }
}

/// A shard: its core, its service, and the channels other threads reach it through.
pub struct Shard<S: Service> {
    core: Core<S::State>,
    service: S,
    conns_rx: Receiver<NewConn>,
    cmds_rx: Receiver<Command<S::Command>>,
    waker: Waker,
    drain_deadline: Option<Instant>,
    expired: Vec<usize>,
    start: Instant,
    /// `balance = "reuseport"`: this shard's own listeners (no acceptor thread).
    listeners: Vec<OwnListener>,
    max_connections: usize,
}

/// A listener a shard accepts on itself (SO_REUSEPORT: the kernel spreads connections).
pub struct OwnListener {
    pub listener: std::net::TcpListener,
    /// Index of the listener in the configuration.
    pub index: usize,
    paused_until: Option<Instant>,
    backoff: Duration,
}

impl OwnListener {
    pub fn new(listener: std::net::TcpListener, index: usize) -> Self {
        OwnListener {
            listener,
            index,
            paused_until: None,
            backoff: Duration::from_millis(5),
        }
    }
}

/// Tokens of a shard's own listeners: slab index u32::MAX (never produced by the slab) and the
/// listener's position in the high half.
fn listener_token(i: usize) -> u64 {
    ((i as u64) << 32) | 0xffff_ffff
}

impl<S: Service> Shard<S> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        shard: usize,
        service: S,
        limits: Limits,
        tuning: Tuning,
        stats: Arc<Stats>,
        waker: Waker,
        conns_rx: Receiver<NewConn>,
        cmds_rx: Receiver<Command<S::Command>>,
        start: Instant,
        listeners: Vec<OwnListener>,
        max_connections: usize,
    ) -> std::io::Result<Self> {
        let poller = Poller::new()?;
        let level_read = Interest {
            read: true,
            write: false,
            edge: false,
        };
        poller.add(waker.fd(), Token::WAKER.0, level_read)?;
        for (i, l) in listeners.iter().enumerate() {
            poller.add(l.listener.as_fd(), listener_token(i), level_read)?;
        }
        Ok(Shard {
            core: Core {
                poller,
                conns: Slab::default(),
                wheel: TimerWheel::new(start, TICK, WHEEL_SLOTS),
                read_buf: vec![0u8; tuning.read_buffer.max(512)].into_boxed_slice(),
                scratch: Vec::with_capacity(16 * 1024),
                pool: BufferPool::new(256, 256 * 1024),
                stats,
                env: Env {
                    shard,
                    now: start,
                    tick: 0,
                    limits,
                    draining: false,
                },
                tuning,
                ready: Vec::new(),
                doomed: Vec::new(),
            },
            service,
            conns_rx,
            cmds_rx,
            waker,
            drain_deadline: None,
            expired: Vec::new(),
            start,
            listeners,
            max_connections,
        })
    }

    /// Runs until drained (or told to stop). Consumes the shard.
    pub fn run(mut self) {
        let mut events = Events::with_capacity(self.core.tuning.events_per_wait);
        let mut ready = Vec::new();
        loop {
            let timeout = if !self.core.ready.is_empty() {
                Some(Duration::ZERO)
            } else {
                let mut wake = self.core.wheel.next_wake();
                if let Some(t) = self.listeners.iter().filter_map(|l| l.paused_until).min() {
                    wake = Some(wake.map_or(t, |w| w.min(t)));
                }
                if self.service.wants_ticks() {
                    let next = self.core.wheel.tick_len() * (self.core.env.tick as u32 + 1);
                    let at = self.start + next;
                    wake = Some(wake.map_or(at, |w| w.min(at)));
                }
                let wake = match (wake, self.drain_deadline) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                wake.map(|w| w.saturating_duration_since(Instant::now()))
            };
            if let Err(e) = self.core.poller.wait(&mut events, timeout) {
                log::error!(
                    "shard {}: epoll_wait failed: {e}; retrying",
                    self.core.env.shard
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            self.core.counters().epoll_waits.inc();
            self.advance_clock();
            self.resume_listeners();

            let n = events.len();
            self.core.counters().events.add(n as u64);
            for i in 0..n {
                let ev = events.get(i);
                let token = Token(ev.token);
                if token == Token::WAKER {
                    self.on_wake();
                    continue;
                }
                if token.index() == u32::MAX as usize {
                    self.accept(token.generation() as usize);
                    continue;
                }
                if self.core.conns.get(token).is_none() {
                    self.core.counters().stale_tokens.inc();
                    continue;
                }
                if ev.writable || ev.error {
                    self.on_writable(token);
                }
                if ev.readable || ev.error {
                    self.on_readable(token);
                }
                self.reap();
            }
            // Continue connections whose budget ran out, after everyone else had a turn.
            std::mem::swap(&mut ready, &mut self.core.ready);
            for token in ready.drain(..) {
                self.on_readable(token);
                self.reap();
            }

            if let Some(deadline) = self.drain_deadline {
                if self.core.conns.is_empty() {
                    break;
                }
                if self.core.env.now >= deadline {
                    log::warn!(
                        "shard {}: shutdown_timeout reached, closing {} connections",
                        self.core.env.shard,
                        self.core.conns.len()
                    );
                    for token in self.core.conns.tokens() {
                        self.core.doom(token, Reason::Normal);
                    }
                    self.reap();
                    break;
                }
            }
        }
    }

    fn ctx(&mut self) -> (&mut S, Ctx<'_, S::State>) {
        (
            &mut self.service,
            Ctx {
                core: &mut self.core,
            },
        )
    }

    fn advance_clock(&mut self) {
        let now = Instant::now();
        self.core.env.now = now;
        let tick = self.core.wheel.tick_of(now);
        if tick == self.core.env.tick {
            return;
        }
        self.core.env.tick = tick;
        let (service, mut ctx) = self.ctx();
        service.on_tick(&mut ctx);
        let mut expired = std::mem::take(&mut self.expired);
        self.core.wheel.advance(tick, &mut expired);
        for &index in &expired {
            if let Some(token) = self.core.conns.token_at(index) {
                self.on_deadline(token);
            }
        }
        expired.clear();
        self.expired = expired;
        self.reap();
    }

    fn on_deadline(&mut self, token: Token) {
        let env = &self.core.env;
        let now = env.tick;
        let limits = env.limits;
        let Some(e) = self.core.conns.get_mut(token) else {
            return;
        };
        let c = &mut e.ctl;
        if c.flags & DOOMED != 0 {
            return;
        }
        if c.flags & CLOSE_TIMER != 0 && env.abs(c.deadline) <= now {
            // The flush or linger took too long: the peer is not reading or not closing.
            let reason = if c.flags & LINGER_WAIT != 0 {
                Reason::Normal
            } else {
                Reason::WriteTimeout
            };
            self.core.doom(token, reason);
            return;
        }
        if c.flags & PAUSED != 0
            && env.abs(c.over_since) + Env::ticks(limits.write_timeout).max(1) <= now
        {
            self.core.doom(token, Reason::WriteTimeout);
            return;
        }
        if env.draining
            && c.flags & CLOSING == 0
            && env.abs(c.last_active) + Env::ticks(DRAIN_QUIET) <= now
        {
            self.drain_one(token);
            self.core.rearm(token, false);
            return;
        }
        if c.flags & SVC_TIMER != 0 && env.abs(c.deadline) <= now {
            c.flags &= !SVC_TIMER;
            let core = &mut self.core;
            let e = core.conns.get_mut(token).expect("checked above");
            let mut conn = Conn {
                token,
                ctl: &mut e.ctl,
                state: &mut e.state,
                out: &mut core.scratch,
                env: &core.env,
            };
            self.service.on_timer(&mut conn);
            core.after_callback(token);
        } else if c.flags & (CLOSING | PAUSED) == 0
            && c.output.is_none()
            && !limits.idle_timeout.is_zero()
            && env.abs(c.last_active) + Env::ticks(limits.idle_timeout).max(1) <= now
        {
            self.core.doom(token, Reason::Idle);
            return;
        }
        self.core.rearm(token, false);
    }

    fn on_wake(&mut self) {
        self.core.counters().wakeups.inc();
        self.waker.reset();
        // Bounded per wake so a flood of commands cannot stall I/O; the waker is re-armed when
        // something is left.
        let mut left = false;
        for _ in 0..4096 {
            match self.conns_rx.try_recv() {
                Ok(nc) => self.adopt(nc),
                Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => break,
            }
        }
        let mut service_cmds = false;
        for i in 0..4096 {
            match self.cmds_rx.try_recv() {
                Ok(cmd) => {
                    self.core.counters().commands.inc();
                    service_cmds |= matches!(cmd, Command::Service(_));
                    self.on_command(cmd);
                }
                Err(_) => break,
            }
            left = i == 4095;
        }
        if service_cmds {
            let (service, mut ctx) = self.ctx();
            service.on_commands_done(&mut ctx);
            self.reap();
        }
        if left || !self.conns_rx.is_empty() {
            self.waker.wake();
        }
    }

    fn on_command(&mut self, cmd: Command<S::Command>) {
        match cmd {
            Command::Service(c) => {
                let (service, mut ctx) = self.ctx();
                service.on_command(c, &mut ctx);
                self.reap();
            }
            Command::Limits(limits) => {
                self.core.env.limits = limits;
                // A shorter idle timeout must take effect for connections already waiting.
                for token in self.core.conns.tokens() {
                    self.core.rearm(token, true);
                }
            }
            Command::Drain => self.start_drain(),
        }
    }

    fn start_drain(&mut self) {
        if self.drain_deadline.is_some() {
            return;
        }
        self.core.env.draining = true;
        self.drain_deadline = Some(self.core.env.now + self.core.tuning.shutdown_timeout);
        // Reuseport mode: stop accepting; closing the sockets hands their queues to any other
        // process on the port (net.ipv4.tcp_migrate_req).
        self.listeners.clear();
        // Sockets still in the channel were accepted: serve what they sent, then close them.
        while let Ok(nc) = self.conns_rx.try_recv() {
            self.adopt(nc);
        }
        // Serve what each client already sent; each connection then closes once it has been
        // quiet for DRAIN_QUIET (see `on_deadline`), or at shutdown_timeout.
        for token in self.core.conns.tokens() {
            self.on_readable(token);
            self.core.rearm(token, true);
        }
        self.reap();
    }

    /// Reads what the client already sent, lets the service answer it, then asks it to close.
    fn drain_one(&mut self, token: Token) {
        self.on_readable(token);
        let core = &mut self.core;
        let Some(e) = core.conns.get_mut(token) else {
            return;
        };
        if e.ctl.flags & (CLOSING | DOOMED) != 0 {
            return;
        }
        let mut conn = Conn {
            token,
            ctl: &mut e.ctl,
            state: &mut e.state,
            out: &mut core.scratch,
            env: &core.env,
        };
        self.service.on_drain(&mut conn);
        core.after_callback(token);
    }

    /// Accepts on this shard's own listener `i` (reuseport mode): up to 64 per event, the rest
    /// on the next (level-triggered) event. Resource exhaustion pauses the listener with a
    /// doubling backoff, as the acceptor does.
    fn accept(&mut self, i: usize) {
        if self.drain_deadline.is_some() {
            return;
        }
        for _ in 0..64 {
            let Some(l) = self.listeners.get_mut(i) else {
                return;
            };
            match crate::sys::socket::accept(l.listener.as_fd()) {
                Ok(fd) => {
                    l.backoff = Duration::from_millis(5);
                    let listener = l.index;
                    let stats = &self.core.stats;
                    let open: u64 = (0..stats.shard_count())
                        .map(|s| stats.shard(s).open.get())
                        .sum();
                    if open >= self.max_connections as u64 {
                        self.core.counters().rejected.inc();
                        continue;
                    }
                    self.adopt(NewConn { fd, listener });
                }
                Err(nix::errno::Errno::EAGAIN) => return,
                Err(
                    nix::errno::Errno::EINTR
                    | nix::errno::Errno::ECONNABORTED
                    | nix::errno::Errno::EPROTO,
                ) => {}
                Err(e) => {
                    // Exhaustion or unknown: stop watching this listener for a while.
                    let until = Instant::now() + l.backoff;
                    log::warn!(
                        "shard {}: accept failed ({e}); pausing accepts for {:?}",
                        self.core.env.shard,
                        l.backoff
                    );
                    l.backoff = (l.backoff * 2).min(Duration::from_millis(320));
                    l.paused_until = Some(until);
                    let _ = self.core.poller.delete(l.listener.as_fd());
                    self.core.counters().accept_pauses.inc();
                    return;
                }
            }
        }
    }

    fn resume_listeners(&mut self) {
        let now = self.core.env.now;
        for (i, l) in self.listeners.iter_mut().enumerate() {
            if l.paused_until.is_some_and(|t| t <= now) {
                l.paused_until = None;
                let interest = Interest {
                    read: true,
                    write: false,
                    edge: false,
                };
                let _ = self
                    .core
                    .poller
                    .add(l.listener.as_fd(), listener_token(i), interest);
            }
        }
    }

    fn adopt(&mut self, nc: NewConn) {
        let core = &mut self.core;
        let edge = core.tuning.edge;
        let tick = core.env.tick as u32;
        let token = core.conns.insert(Entry {
            ctl: Ctl {
                fd: nc.fd,
                listener: nc.listener as u16,
                flags: REG_READ,
                last_active: tick,
                deadline: 0,
                over_since: 0,
                input: None,
                output: None,
            },
            state: S::State::default(),
        });
        let e = core.conns.get_mut(token).expect("just inserted");
        let interest = Interest {
            read: true,
            write: false,
            edge,
        };
        if let Err(err) = core.poller.add(e.ctl.fd.as_fd(), token.0, interest) {
            log::warn!(
                "shard {}: cannot register a connection: {err}",
                core.env.shard
            );
            core.conns.remove(token);
            core.counters().errors.inc();
            return;
        }
        let counters = core.stats.shard(core.env.shard);
        counters.accepted.inc();
        counters.open.inc();
        let mut conn = Conn {
            token,
            ctl: &mut e.ctl,
            state: &mut e.state,
            out: &mut core.scratch,
            env: &core.env,
        };
        self.service.on_open(&mut conn);
        core.after_callback(token);
        core.rearm(token, false);
    }

    fn on_readable(&mut self, token: Token) {
        let edge = self.core.tuning.edge;
        let mut budget = self.core.tuning.read_budget;
        let mut resumed = false;
        loop {
            let core = &mut self.core;
            let Some(e) = core.conns.get_mut(token) else {
                return;
            };
            let flags = e.ctl.flags;
            if flags & (DOOMED | PAUSED) != 0 || (flags & CLOSING != 0 && flags & LINGER_WAIT == 0)
            {
                return;
            }
            if flags & RESUME != 0 && flags & LINGER_WAIT == 0 {
                if resumed {
                    // Set again: the connection is on the ready list or waits for its drain.
                    return;
                }
                resumed = true;
                e.ctl.flags &= !RESUME;
                if !self.deliver(token, 0) {
                    return;
                }
                continue;
            }
            let want = core.read_buf.len();
            let n = match socket::read(e.ctl.fd.as_fd(), &mut core.read_buf) {
                Io::Done(0) => {
                    e.ctl.flags |= EOF;
                    if flags & LINGER_WAIT != 0 {
                        core.doom(token, Reason::Normal);
                    } else {
                        // The peer is done sending: answer what it sent, then close.
                        core.begin_close(token);
                    }
                    return;
                }
                Io::Done(n) => n,
                Io::WouldBlock => return,
                Io::Failed(_) => {
                    e.ctl.flags |= ABORT;
                    core.doom(token, Reason::Error);
                    return;
                }
            };
            let counters = core.stats.shard(core.env.shard);
            counters.reads.inc();
            counters.bytes_in.add(n as u64);
            if flags & LINGER_WAIT == 0 {
                e.ctl.last_active = core.env.tick as u32;
                if !self.deliver(token, n) {
                    return;
                }
            }
            let core = &mut self.core;
            if !edge || n < want {
                return;
            }
            budget = budget.saturating_sub(n);
            if budget == 0 {
                core.ready.push(token);
                return;
            }
        }
    }

    /// Offers the connection's input to the service: its leftover bytes followed by the `n` bytes
    /// just read into the shard's buffer (`n` = 0 re-offers the leftover after a `resume_later`).
    /// False if the connection is being closed.
    fn deliver(&mut self, token: Token, n: usize) -> bool {
        let core = &mut self.core;
        let Some(e) = core.conns.get_mut(token) else {
            return false;
        };
        let counters = core.stats.shard(core.env.shard);
        let consumed;
        let mut leftover = e.ctl.input.take();
        let held_before = leftover.as_ref().map_or(0, |b| b.len());
        {
            let input: &mut [u8] = match &mut leftover {
                Some(buf) => {
                    buf.extend_from_slice(&core.read_buf[..n]);
                    &mut buf[..]
                }
                None => &mut core.read_buf[..n],
            };
            let len = input.len();
            let mut conn = Conn {
                token,
                ctl: &mut e.ctl,
                state: &mut e.state,
                out: &mut core.scratch,
                env: &core.env,
            };
            consumed = self.service.on_data(&mut conn, input).min(len);
            // Keep what the service did not consume, in a buffer of its own.
            match &mut leftover {
                Some(buf) => {
                    buf.drain(..consumed);
                    if buf.is_empty() {
                        core.pool.release_input(leftover.take().expect("some"));
                    }
                }
                None if consumed < n => {
                    leftover = Some(core.pool.input_from(&core.read_buf[consumed..n]));
                }
                None => {}
            }
        }
        let held = leftover.as_ref().map_or(0, |b| b.len());
        counters.input_buffered.add(held as u64);
        counters.input_buffered.sub(held_before as u64);
        let overflow = held > core.env.limits.max_read_buffer;
        e.ctl.input = leftover;
        if overflow {
            core.doom(token, Reason::ReadOverflow);
            return false;
        }
        core.after_callback(token);
        core.conns
            .get(token)
            .is_some_and(|e| e.ctl.flags & (DOOMED | CLOSING) == 0)
    }

    fn on_writable(&mut self, token: Token) {
        let core = &mut self.core;
        let max_write = core.env.limits.max_write_buffer;
        let Some(e) = core.conns.get_mut(token) else {
            return;
        };
        if e.ctl.flags & DOOMED != 0 {
            return;
        }
        let Some(out) = e.ctl.output.as_mut() else {
            return;
        };
        let counters = core.stats.shard(core.env.shard);
        while !out.is_empty() {
            let pending = out.pending();
            let len = pending.len();
            match socket::write(e.ctl.fd.as_fd(), pending) {
                Io::Done(n) => {
                    counters.writes.inc();
                    counters.bytes_out.add(n as u64);
                    counters.output_queued.sub(n as u64);
                    out.consume(n);
                    if n < len {
                        break;
                    }
                }
                Io::WouldBlock => break,
                Io::Failed(_) => {
                    e.ctl.flags |= ABORT;
                    core.doom(token, Reason::Error);
                    return;
                }
            }
        }
        let remaining = out.len();
        if remaining == 0 {
            let out = e.ctl.output.take().expect("some");
            core.pool.release_output(out);
        }
        // Resume reading once the queue is back under half the bound (hysteresis avoids
        // flapping between paused and reading on every write).
        if e.ctl.flags & PAUSED != 0 && remaining <= max_write / 2 {
            e.ctl.flags &= !PAUSED;
        }
        let closing = e.ctl.flags & CLOSING != 0;
        core.sync_interest(token);
        if remaining == 0 {
            if closing {
                core.finish_close(token);
            } else {
                if core
                    .conns
                    .get(token)
                    .is_some_and(|e| e.ctl.flags & RESUME != 0)
                {
                    core.ready.push(token);
                }
                let e = core.conns.get_mut(token).expect("live");
                let mut conn = Conn {
                    token,
                    ctl: &mut e.ctl,
                    state: &mut e.state,
                    out: &mut core.scratch,
                    env: &core.env,
                };
                self.service.on_drained(&mut conn);
                core.after_callback(token);
            }
        }
    }

    /// Closes the connections marked for closing.
    fn reap(&mut self) {
        while let Some((token, reason)) = self.core.doomed.pop() {
            let core = &mut self.core;
            let Some(mut e) = core.conns.remove(token) else {
                continue;
            };
            core.wheel.cancel(token.index());
            self.service.on_close(token, &mut e.state);
            let counters = core.stats.shard(core.env.shard);
            if let Some(b) = e.ctl.input.take() {
                counters.input_buffered.sub(b.len() as u64);
                core.pool.release_input(b);
            }
            if let Some(b) = e.ctl.output.take() {
                counters.output_queued.sub(b.len() as u64);
                core.pool.release_output(b);
            }
            counters.closed.inc();
            counters.open.sub(1);
            match reason {
                Reason::Normal => {}
                Reason::Error => counters.errors.inc(),
                Reason::Idle => counters.idle_timeouts.inc(),
                Reason::WriteTimeout => counters.write_timeouts.inc(),
                Reason::ReadOverflow => counters.read_overflows.inc(),
            }
            // Dropping `e` closes the descriptor, which also removes it from the epoll set.
        }
    }
}
