//! A connection's engine-side state: its lifecycle phase, a few orthogonal flags, and one
//! deadline per purpose; plus the shard's clock ([`Env`]) that turns durations into ticks.
//!
//! Owned by the shard thread. One [`Ctl`] exists per connection, idle ones included, so its size
//! is part of the per-connection cost (a unit test bounds it): ticks are stored as `u32` and read
//! back as 64-bit ticks relative to now (exact within ±248 days of now; longer timers are
//! clamped), while the wheel and every comparison use 64-bit ticks.
//!
//! The lifecycle ([`Phase`]) only moves forward: `Open` → `Closing` (flush what is queued, within
//! its bound) → `Lingering` (our FIN is sent; wait for the peer's, within its bound) → `Doomed`
//! (closed at the end of the current event); any phase may jump straight to `Doomed`. The close
//! bounds live in the phase itself, apart from the service's timer, so a service that asks for
//! a bounded close and sets a timer in the same callback keeps both.

use std::cell::Cell;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use crate::conn::{InBuf, OutBuf};
use crate::server::api::CloseReason;
use crate::server::Limits;

/// Length of one timer tick.
pub const TICK: Duration = Duration::from_millis(10);
/// The longest delay a `u32` tick stamp can express relative to now (about 248 days).
const MAX_AHEAD: u64 = i32::MAX as u64;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Reading (unless paused) and writing; the service's callbacks run.
    Open,
    /// Closing: reading has stopped and what is queued is being written, until tick `by` at the
    /// latest; then our FIN (`Lingering`), or the end if the peer already sent its own.
    Closing { by: u32, why: CloseReason },
    /// Everything is written and our FIN is sent: input is read and discarded until the peer's
    /// FIN or tick `until`, so unread input cannot turn our last bytes into a reset.
    Lingering { until: u32, why: CloseReason },
    /// In the shard's list of connections to close at the end of this event: no more I/O.
    Doomed,
    /// Sent to a new process that has not committed the hand-over yet: out of epoll and the
    /// wheel, no I/O and no callbacks. Back to `Open` if the hand-over fails; removed, without
    /// closing the connection (the new process holds it), once it commits.
    Lent,
}

/// Conditions that hold alongside the phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Flags(u16);

impl Flags {
    /// Reading stopped: queued output reached `max_write_buffer`.
    pub const PAUSED: Flags = Flags(1 << 0);
    /// The peer's FIN was read.
    pub const EOF: Flags = Flags(1 << 1);
    /// The service stopped before consuming its input: offer it again once output drains.
    pub const RESUME: Flags = Flags(1 << 2);
    /// EPOLLIN (with EPOLLRDHUP) is registered.
    pub const REG_READ: Flags = Flags(1 << 3);
    /// EPOLLOUT is registered.
    pub const REG_WRITE: Flags = Flags(1 << 4);
    /// The service asked to close during this callback: acted on when it returns.
    pub const CLOSE_REQ: Flags = Flags(1 << 5);
    /// The service timer (`Ctl::timer`) is armed.
    pub const TIMER: Flags = Flags(1 << 6);
    /// The service (re)set its timer during this callback: reschedule when it returns.
    pub const TIMER_SET: Flags = Flags(1 << 7);
    /// At least one byte has been received (draining gives a silent newcomer longer).
    pub const SPOKE: Flags = Flags(1 << 8);
    /// An event said the peer's FIN is pending behind the data (`EPOLLRDHUP`): read on to end
    /// of stream, even after a short read.
    pub const EOF_PENDING: Flags = Flags(1 << 9);
    /// The service paused reading (`Conn::pause_reading`) until it resumes it.
    pub const HELD: Flags = Flags(1 << 10);
    /// Received from an old process whose hand-over this process has not committed yet: not in
    /// epoll or the wheel, and output is queued rather than sent (the old process may still
    /// take the connection back).
    pub const UNCOMMITTED: Flags = Flags(1 << 11);

    #[inline]
    pub fn has(self, f: Flags) -> bool {
        self.0 & f.0 != 0
    }

    #[inline]
    pub fn set(&mut self, f: Flags) {
        self.0 |= f.0;
    }

    #[inline]
    pub fn clear(&mut self, f: Flags) {
        self.0 &= !f.0;
    }

    #[inline]
    pub fn union(self, f: Flags) -> Flags {
        Flags(self.0 | f.0)
    }

    /// The bits of `mask` that are set.
    #[inline]
    pub fn only(self, mask: Flags) -> Flags {
        Flags(self.0 & mask.0)
    }
}

/// The engine's part of a connection.
pub(crate) struct Ctl {
    pub fd: OwnedFd,
    /// Index of the listener the connection came from.
    pub listener: u16,
    pub flags: Flags,
    pub phase: Phase,
    /// Tick of the last progress: input received while nothing was queued, or output written.
    /// The idle deadline (nothing queued), the write deadline (output queued) and the drain
    /// grace all count from it.
    pub last_active: u32,
    /// The service timer's tick, while `Flags::TIMER` is set.
    pub timer: u32,
    /// Input the service has not consumed yet.
    pub input: Option<InBuf>,
    /// Output the socket has not taken yet.
    pub output: Option<Box<OutBuf>>,
}

impl Ctl {
    pub fn new(fd: OwnedFd, listener: usize, now: u32) -> Ctl {
        Ctl {
            fd,
            listener: listener as u16,
            flags: Flags::REG_READ,
            phase: Phase::Open,
            last_active: now,
            timer: 0,
            input: None,
            output: None,
        }
    }

    #[inline]
    pub fn is_open(&self) -> bool {
        self.phase == Phase::Open
    }

    /// Whether the connection should be reading: open and not paused, or lingering (reading to
    /// the peer's FIN).
    #[inline]
    pub fn reading(&self) -> bool {
        match self.phase {
            Phase::Open => !self
                .flags
                .has(Flags::PAUSED.union(Flags::HELD).union(Flags::UNCOMMITTED)),
            Phase::Lingering { .. } => true,
            Phase::Closing { .. } | Phase::Doomed | Phase::Lent => false,
        }
    }

    pub fn queued(&self) -> usize {
        self.output.as_ref().map_or(0, |o| o.len())
    }

    /// The service asks to close: flush within `within` (or `write_timeout`), keeping an earlier
    /// bound already set. The shard acts on it when the callback returns.
    pub fn request_close(&mut self, env: &Env, within: Option<Duration>) {
        let within = within.unwrap_or(env.limits.write_timeout);
        let by = env.stamp_after(within);
        match &mut self.phase {
            Phase::Open => {
                self.phase = Phase::Closing {
                    by,
                    why: CloseReason::Service,
                };
                self.flags.set(Flags::CLOSE_REQ);
            }
            Phase::Closing { by: current, .. } => {
                if env.abs(by) < env.abs(*current) {
                    *current = by;
                }
            }
            Phase::Lingering { .. } | Phase::Doomed | Phase::Lent => {}
        }
    }
}

/// The shard's clock and settings, shared by every callback of one shard.
pub(crate) struct Env {
    pub shard: usize,
    /// The time of the current wake-up (read once per loop turn).
    pub now: Instant,
    /// The current tick (64-bit: never wraps).
    pub tick: u64,
    pub limits: Limits,
    pub draining: bool,
    /// Offloaded jobs of this shard's connections whose results have not come back yet:
    /// counted up by `Peers::offload` (on this shard's thread, inside a callback), down when
    /// the shard takes a result. A hand-over waits for it to reach zero before exporting.
    pub offloads: Cell<usize>,
}

impl Env {
    pub fn new(shard: usize, now: Instant, limits: Limits) -> Env {
        Env {
            shard,
            now,
            tick: 0,
            limits,
            draining: false,
            offloads: Cell::new(0),
        }
    }

    /// Whole ticks in `d`, rounded up (a deadline never fires early), at least one.
    pub fn ticks(d: Duration) -> u64 {
        (d.as_nanos().div_ceil(TICK.as_nanos()) as u64).max(1)
    }

    /// The current tick as stored in a connection.
    #[inline]
    pub fn stamp(&self) -> u32 {
        self.tick as u32
    }

    /// The stamp of the tick `d` from now (clamped to what a stamp can express).
    pub fn stamp_after(&self, d: Duration) -> u32 {
        (self.tick + Env::ticks(d).min(MAX_AHEAD)) as u32
    }

    /// Ticks from now to stamp `t` (negative: in the past), for stamps within ±248 days.
    #[inline]
    fn rel(&self, t: u32) -> i64 {
        t.wrapping_sub(self.tick as u32) as i32 as i64
    }

    /// The 64-bit tick of a stamp within ±248 days of now.
    #[inline]
    pub fn abs(&self, t: u32) -> u64 {
        (self.tick as i64 + self.rel(t)).max(0) as u64
    }

    /// The tick `d` after stamp `t`. Exact for a stamp before this shard's first tick too (a
    /// connection taken over from an older process, idle for longer than this one has run).
    #[inline]
    pub fn after(&self, t: u32, d: Duration) -> u64 {
        (self.tick as i64 + self.rel(t) + Env::ticks(d) as i64).max(0) as u64
    }

    /// The stamp of the tick `d` ago (whole ticks, rounded down; clamped to ±248 days). It may
    /// lie before this shard's first tick: [`Env::after`] reads it back exactly.
    pub fn stamp_before(&self, d: Duration) -> u32 {
        let ticks = ((d.as_nanos() / TICK.as_nanos()) as u64).min(MAX_AHEAD);
        self.tick.wrapping_sub(ticks) as u32
    }

    /// How long ago stamp `t` was (zero for a stamp in the future).
    pub fn since(&self, t: u32) -> Duration {
        TICK * (-self.rel(t)).clamp(0, u32::MAX as i64) as u32
    }

    /// How long until stamp `t` (zero for a stamp in the past).
    pub fn until(&self, t: u32) -> Duration {
        TICK * self.rel(t).clamp(0, u32::MAX as i64) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_at(tick: u64) -> Env {
        let limits = Limits::default();
        let mut env = Env::new(0, Instant::now(), limits);
        env.tick = tick;
        env
    }

    #[test]
    fn stamps_read_back_across_the_u32_wrap() {
        let env = env_at((1 << 32) + 5);
        // Stamped 8 ticks ago, before the low 32 bits wrapped.
        let old = ((1u64 << 32) - 3) as u32;
        assert_eq!(env.abs(old), (1 << 32) - 3);
        // A deadline 100 ticks ahead.
        let ahead = env.stamp_after(Duration::from_secs(1));
        assert_eq!(env.abs(ahead), (1 << 32) + 5 + 100);
        assert_eq!(env.after(old, Duration::from_millis(80)), (1 << 32) + 5);
        // Far-future timers are clamped, never wrapped into the past.
        let far = env.stamp_after(Duration::from_secs(10 * 365 * 86400));
        assert!(env.abs(far) > env.tick + (200 * 86400 * 100));
    }

    #[test]
    fn stamps_before_the_first_tick_read_back_exactly() {
        // A shard 30 ticks old takes a connection idle for 200 s (20,000 ticks).
        let env = env_at(30);
        let last = env.stamp_before(Duration::from_secs(200));
        assert_eq!(env.since(last), Duration::from_secs(200));
        // Its 300 s idle deadline is 100 s from now, not 300 s after the shard started.
        assert_eq!(env.after(last, Duration::from_secs(300)), 30 + 10_000);
        assert_eq!(
            env.abs(last),
            0,
            "abs still clamps: a tick is never negative"
        );
        let timer = env.stamp_after(Duration::from_millis(450));
        assert_eq!(env.until(timer), Duration::from_millis(450));
        assert_eq!(env.until(last), Duration::ZERO);
        assert_eq!(env.since(timer), Duration::ZERO);
    }

    #[test]
    fn ticks_round_up_and_are_never_zero() {
        assert_eq!(Env::ticks(Duration::ZERO), 1);
        assert_eq!(Env::ticks(Duration::from_millis(10)), 1);
        assert_eq!(Env::ticks(Duration::from_millis(11)), 2);
    }

    #[test]
    fn a_later_close_request_keeps_the_earlier_bound() {
        let env = env_at(1000);
        let (fd, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut c = Ctl::new(fd.into(), 0, env.stamp());
        c.request_close(&env, Some(Duration::from_millis(200)));
        c.request_close(&env, None); // write_timeout: 30 s
        assert_eq!(
            c.phase,
            Phase::Closing {
                by: 1020,
                why: CloseReason::Service
            }
        );
        assert!(c.flags.has(Flags::CLOSE_REQ));
        assert!(!c.reading());
    }

    #[test]
    fn ctl_stays_small() {
        // Paid by every idle connection: fd, listener, flags, phase with its bound, two stamps,
        // and the two buffer pointers (None while idle).
        assert!(
            std::mem::size_of::<Ctl>() <= 40,
            "Ctl is {} bytes",
            std::mem::size_of::<Ctl>()
        );
        assert!(std::mem::size_of::<Phase>() <= 8);
    }
}
