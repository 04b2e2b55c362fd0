//! A connection's life in the shard: the one helper that runs a service callback, what happens
//! after every callback, the close transitions, the deadlines, and the final close.
//!
//! Owned by the shard thread. The rules:
//! - Every callback on one connection goes through [`Core::invoke`] (build the `Conn`, call
//!   under `catch_unwind`) and then [`Core::after_callback`] (write what was staged, act on a
//!   close request, resync epoll interest and the wheel). A panic discards the staged output and
//!   closes that connection only ([`CloseReason::Panic`]), counted and logged with the peer.
//! - Deadlines, one per purpose: with output queued, `write_timeout` from the last write
//!   progress (whatever the queue's size); with nothing queued, `idle_timeout` from the last
//!   input; the service's own timer; while closing, the phase's flush or linger bound; while
//!   draining, a quiet period. The wheel holds each connection once, at the earliest of them;
//!   activity does not touch it: a deadline that moved later is found when the old one fires.
//! - Closing: `Open` → `Closing` (flush within the bound) → `Lingering` (FIN sent; wait for the
//!   peer's FIN within [`LINGER`]) → `Doomed` → removed by [`Shard::reap`], which reports the
//!   reason to the service once.

use std::any::Any;
use std::os::fd::AsFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use super::state::{Ctl, Flags, Phase};
use super::{Core, Shard};
use crate::conn::Token;
use crate::server::api::{CloseReason, Conn, Service};
use crate::sys::poller::Interest;
use crate::sys::socket;

/// How long a closed connection waits for the peer's FIN after ours (see `finish_close`).
pub(crate) const LINGER: Duration = Duration::from_secs(2);
/// While draining, a connection that has spoken is closed once it has been quiet this long (a
/// client gets to hear the answer to what it sent; shutdown_timeout bounds the rest).
pub(crate) const DRAIN_QUIET: Duration = Duration::from_millis(250);
/// While draining, a connection that has not sent a byte yet gets this long from its accept
/// (or last progress) to send its first request: a client whose connect completed just before
/// the drain began, and that was slow to write (a loaded host), is served rather than closed
/// under it. Its peer cannot tell such a close from a failure.
pub(crate) const DRAIN_FIRST_REQUEST: Duration = Duration::from_secs(2);
/// Output staging above this capacity is given back after use.
pub(crate) const SCRATCH_KEEP: usize = 256 * 1024;

/// A panic's message, for the log.
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(not a string)"
    }
}

/// The quiet period after which a draining connection is closed.
fn drain_quiet(c: &Ctl) -> Duration {
    if c.flags.has(Flags::SPOKE) {
        DRAIN_QUIET
    } else {
        DRAIN_FIRST_REQUEST
    }
}

impl<St> Core<St> {
    /// Runs one service callback on an open connection: the only place a `Conn` is built. A
    /// panic is caught: the staged output is discarded and the connection doomed. `None` if the
    /// connection is gone, not open, or the callback panicked. The caller then calls
    /// [`Core::after_callback`] (or uses [`Core::call`], which does both).
    pub(crate) fn invoke<R>(
        &mut self,
        token: Token,
        f: impl FnOnce(&mut Conn<'_, St>) -> R,
    ) -> Option<R> {
        if self.tls_handshaking(token) {
            // Not the service's yet: it hears of the connection once the handshake is done.
            return None;
        }
        let e = self.conns.get_mut(token)?;
        if !e.ctl.is_open() {
            return None;
        }
        let result = {
            let mut conn = Conn {
                token,
                ctl: &mut e.ctl,
                state: &mut e.state,
                out: &mut self.scratch,
                env: &self.env,
            };
            catch_unwind(AssertUnwindSafe(|| f(&mut conn)))
        };
        match result {
            Ok(r) => Some(r),
            Err(payload) => {
                self.on_panic(token, &*payload);
                None
            }
        }
    }

    /// [`Core::invoke`] followed by [`Core::after_callback`].
    pub(crate) fn call<R>(
        &mut self,
        token: Token,
        f: impl FnOnce(&mut Conn<'_, St>) -> R,
    ) -> Option<R> {
        let r = self.invoke(token, f)?;
        self.after_callback(token);
        Some(r)
    }

    fn on_panic(&mut self, token: Token, payload: &(dyn Any + Send)) {
        self.scratch.clear();
        self.counters().service_panics.inc();
        let peer = self
            .conns
            .get(token)
            .and_then(|e| socket::peer_addr(e.ctl.fd.as_fd()).ok())
            .map_or_else(|| "an unknown peer".to_string(), |a| a.to_string());
        log::error!(
            "shard {}: the service panicked on the connection from {peer}: {}; closing it",
            self.env.shard,
            panic_message(payload)
        );
        self.doom(token, CloseReason::Panic);
    }

    /// After every callback: writes what it staged, acts on a close request, and brings epoll
    /// interest and the wheel up to date.
    pub(crate) fn after_callback(&mut self, token: Token) {
        let queue_started = self.write_staged(token);
        if self.scratch.capacity() > SCRATCH_KEEP {
            self.scratch = Vec::with_capacity(SCRATCH_KEEP);
        }
        let Some(e) = self.conns.get_mut(token) else {
            return;
        };
        let c = &mut e.ctl;
        if c.phase == Phase::Doomed {
            return;
        }
        if c.flags.has(Flags::UNCOMMITTED) {
            // Not this process's to drive yet: a close request, the timer and epoll interest are
            // acted on when the hand-over commits (`Shard::activate`).
            return;
        }
        let rearm = queue_started || c.flags.has(Flags::TIMER_SET);
        c.flags.clear(Flags::TIMER_SET);
        if c.flags.has(Flags::CLOSE_REQ) {
            c.flags.clear(Flags::CLOSE_REQ);
            self.continue_close(token);
            return;
        }
        if c.flags.has(Flags::RESUME) && c.output.is_none() {
            self.ready.push(token);
        }
        self.sync_interest(token);
        if rearm {
            self.rearm(token, true);
        }
    }

    /// Registers or updates epoll interest to match the connection's state.
    pub(crate) fn sync_interest(&mut self, token: Token) {
        let edge = self.tuning.edge;
        let Some(e) = self.conns.get_mut(token) else {
            return;
        };
        let c = &mut e.ctl;
        if matches!(c.phase, Phase::Doomed | Phase::Lent) || c.flags.has(Flags::UNCOMMITTED) {
            return;
        }
        let read = c.reading();
        let write = c.output.is_some();
        let mut want = Flags::default();
        if read {
            want.set(Flags::REG_READ);
        }
        if write {
            want.set(Flags::REG_WRITE);
        }
        let registered = Flags::REG_READ.union(Flags::REG_WRITE);
        if c.flags.only(registered) == want {
            return;
        }
        let was_reading = c.flags.has(Flags::REG_READ);
        let interest = Interest { read, write, edge };
        if self.poller.modify(c.fd.as_fd(), token.0, interest).is_ok() {
            c.flags.clear(registered);
            c.flags.set(want);
            // Edge-triggered: data that arrived while reading was off raised no new edge.
            if edge && read && !was_reading {
                self.ready.push(token);
            }
        } else {
            self.doom(token, CloseReason::Error);
        }
    }

    /// Marks the connection for closing at the end of this event, without flushing.
    pub(crate) fn doom(&mut self, token: Token, why: CloseReason) {
        if let Some(e) = self.conns.get_mut(token) {
            if e.ctl.phase != Phase::Doomed {
                e.ctl.phase = Phase::Doomed;
                self.doomed.push((token, why));
            }
        }
    }

    /// Graceful close of an open connection for `why` (the peer's FIN): flush what is queued
    /// within `write_timeout`, then finish.
    pub(crate) fn begin_close(&mut self, token: Token, why: CloseReason) {
        let Some(e) = self.conns.get_mut(token) else {
            return;
        };
        if e.ctl.phase != Phase::Open {
            return;
        }
        let by = self.env.stamp_after(self.env.limits.write_timeout);
        e.ctl.phase = Phase::Closing { by, why };
        self.continue_close(token);
    }

    /// A connection that just entered `Closing`: finish at once if nothing is queued, else stop
    /// reading and wait for the flush (bounded by the phase's deadline).
    pub(crate) fn continue_close(&mut self, token: Token) {
        let Some(e) = self.conns.get_mut(token) else {
            return;
        };
        // Service timers do not fire once closing.
        e.ctl.flags.clear(Flags::TIMER);
        // TLS: close_notify goes out behind what is queued.
        self.tls_close_notify(token);
        let Some(e) = self.conns.get_mut(token) else {
            return;
        };
        if e.ctl.phase == Phase::Doomed {
            return;
        }
        if e.ctl.output.is_none() {
            self.finish_close(token);
            return;
        }
        self.sync_interest(token);
        self.rearm(token, true);
    }

    /// Everything is written. If the peer may still be sending, closing now could turn our last
    /// bytes into a reset (unread input makes `close` send RST), so send FIN and wait briefly for
    /// the peer's FIN, discarding input, as lingering close in HTTP servers does.
    pub(crate) fn finish_close(&mut self, token: Token) {
        let Some(e) = self.conns.get_mut(token) else {
            return;
        };
        let why = match e.ctl.phase {
            Phase::Closing { why, .. } => why,
            Phase::Open | Phase::Lingering { .. } | Phase::Doomed | Phase::Lent => return,
        };
        if e.ctl.flags.has(Flags::EOF) {
            self.doom(token, why);
            return;
        }
        socket::shutdown_write(e.ctl.fd.as_fd());
        e.ctl.phase = Phase::Lingering {
            until: self.env.stamp_after(LINGER),
            why,
        };
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

    /// Changes the reason of a close the service has just asked for (during `on_drain`, its
    /// close is the drain's).
    pub(crate) fn relabel_close(&mut self, token: Token, as_why: CloseReason) {
        if let Some(e) = self.conns.get_mut(token) {
            if let Phase::Closing { why, .. } = &mut e.ctl.phase {
                if *why == CloseReason::Service {
                    *why = as_why;
                }
            }
        }
    }

    /// The connection's next deadline (a tick): the earliest of those that apply to its phase.
    fn next_deadline(&self, c: &Ctl) -> Option<u64> {
        let env = &self.env;
        let limits = &env.limits;
        if c.flags.has(Flags::UNCOMMITTED) {
            return None;
        }
        match c.phase {
            Phase::Doomed | Phase::Lent => None,
            Phase::Closing { by, .. } => Some(env.abs(by)),
            Phase::Lingering { until, .. } => Some(env.abs(until)),
            Phase::Open => {
                let mut best: Option<u64> = None;
                let mut consider = |t: u64| best = Some(best.map_or(t, |b: u64| b.min(t)));
                if c.flags.has(Flags::TIMER) {
                    consider(env.abs(c.timer));
                }
                if env.draining {
                    consider(env.after(c.last_active, drain_quiet(c)));
                }
                if c.output.is_some() {
                    consider(env.after(c.last_active, limits.write_timeout));
                } else if !limits.idle_timeout.is_zero() {
                    consider(env.after(c.last_active, limits.idle_timeout));
                }
                best
            }
        }
    }

    /// Puts the connection in the wheel at its next deadline. `earlier_only` keeps an earlier
    /// scheduled entry (it will re-evaluate when it fires).
    pub(crate) fn rearm(&mut self, token: Token, earlier_only: bool) {
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

impl<S: Service> Shard<S> {
    /// The connection's wheel entry fired: act on whichever of its deadlines has come.
    pub(super) fn on_deadline(&mut self, token: Token) {
        let env = &self.core.env;
        let now = env.tick;
        let limits = env.limits;
        let Some(e) = self.core.conns.get_mut(token) else {
            return;
        };
        let c = &mut e.ctl;
        match c.phase {
            Phase::Doomed | Phase::Lent => return,
            Phase::Closing { by, .. } => {
                if env.abs(by) <= now {
                    // The flush took too long: the peer is not reading.
                    self.core.doom(token, CloseReason::WriteTimeout);
                    return;
                }
            }
            Phase::Lingering { until, why } => {
                if env.abs(until) <= now {
                    self.core.doom(token, why);
                    return;
                }
            }
            Phase::Open => {
                if c.output.is_some() && env.after(c.last_active, limits.write_timeout) <= now {
                    // Queued output made no progress for write_timeout (nginx send_timeout).
                    self.core.doom(token, CloseReason::WriteTimeout);
                    return;
                }
                if env.draining && env.after(c.last_active, drain_quiet(c)) <= now {
                    self.drain_one(token);
                    self.core.rearm(token, false);
                    return;
                }
                if c.flags.has(Flags::TIMER) && env.abs(c.timer) <= now {
                    c.flags.clear(Flags::TIMER);
                    if self.core.tls_handshaking(token) {
                        // The timer slot held the handshake deadline.
                        self.core.counters().tls_handshake_timeouts.inc();
                        self.core.doom(token, CloseReason::Tls);
                        return;
                    }
                    self.core.call(token, |conn| self.service.on_timer(conn));
                } else if c.output.is_none()
                    && !limits.idle_timeout.is_zero()
                    && env.after(c.last_active, limits.idle_timeout) <= now
                {
                    self.core.doom(token, CloseReason::IdleTimeout);
                    return;
                }
            }
        }
        self.core.rearm(token, false);
    }

    /// Draining: reads what the client already sent, lets the service answer it, then lets the
    /// service say goodbye (`on_drain`, which closes by default).
    pub(super) fn drain_one(&mut self, token: Token) {
        self.on_readable(token, false);
        if self.core.tls_handshaking(token) {
            // Never the service's: nothing to answer or say goodbye to.
            self.core.doom(token, CloseReason::Drain);
            return;
        }
        let service = &mut self.service;
        if self
            .core
            .invoke(token, |conn| service.on_drain(conn))
            .is_some()
        {
            self.core.relabel_close(token, CloseReason::Drain);
            self.core.after_callback(token);
        }
    }

    /// Closes the connections marked for closing, telling the service why.
    pub(crate) fn reap(&mut self) {
        while let Some((token, why)) = self.core.doomed.pop() {
            let core = &mut self.core;
            let Some(mut e) = core.conns.remove(token) else {
                continue;
            };
            core.wheel.cancel(token.index());
            let opened = core.tls_forget(token);
            let service = &mut self.service;
            let state = &mut e.state;
            if !opened {
                // A TLS connection whose handshake never finished: the service never had it.
            } else if let Err(payload) =
                catch_unwind(AssertUnwindSafe(|| service.on_close(token, state, why)))
            {
                core.counters().service_panics.inc();
                log::error!(
                    "shard {}: the service panicked in on_close: {}",
                    core.env.shard,
                    panic_message(&*payload)
                );
            }
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
            match why {
                CloseReason::Error => counters.errors.inc(),
                CloseReason::IdleTimeout => counters.idle_timeouts.inc(),
                CloseReason::WriteTimeout => counters.write_timeouts.inc(),
                CloseReason::ReadOverflow => counters.read_overflows.inc(),
                // Counted when caught (panics, TLS failures).
                CloseReason::Panic | CloseReason::Tls => {}
                CloseReason::PeerClosed
                | CloseReason::Drain
                | CloseReason::Service
                | CloseReason::HandedOver => {}
            }
            // Dropping `e` closes the descriptor, which also removes it from the epoll set.
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_messages_are_read_from_both_payload_kinds() {
        let p = std::panic::catch_unwind(|| panic!("plain")).unwrap_err();
        assert_eq!(panic_message(&*p), "plain");
        let n = 3;
        let p = std::panic::catch_unwind(|| panic!("formatted {n}")).unwrap_err();
        assert_eq!(panic_message(&*p), "formatted 3");
    }
}
