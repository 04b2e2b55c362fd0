//! The read path and the write path of a shard's connections.
//!
//! Owned by the shard thread. Bytes cross the socket in exactly two functions, [`recv`] and
//! [`send`]. On a TLS connection the transport (`tls.rs`) sits between them and the service:
//! the read path hands what `recv` read to `Shard::tls_read`, which turns the ciphertext into the
//! plaintext it delivers, and `Core::write_staged` encrypts the staged plaintext before
//! `Core::send_or_queue` sends it; nothing above them touches the descriptor's bytes.
//!
//! Read path ([`Shard::on_readable`], [`Shard::deliver`]): input is read into the shard's one
//! buffer and handed to the service in place; only what the service leaves unconsumed is copied
//! into a buffer of the connection's own (bounded by `max_read_buffer`). Edge-triggered mode
//! reads until the socket is drained or the connection's byte budget for this wake is spent; a
//! connection with its budget spent goes on the `ready` list and continues after the other
//! events, so one busy connection cannot starve the rest. A short read (fewer bytes than asked)
//! means the socket was drained and the kernel raises a new edge for anything that arrives
//! later, so the extra read that would say `EAGAIN` is skipped, except when the peer's FIN is
//! known to be pending (`EPOLLRDHUP`): it arrived with the data and raises no later edge, so the
//! path reads on to end of stream.
//!
//! Write path ([`Core::write_staged`], [`Shard::on_writable`]): what a callback staged is sent
//! at once when nothing is queued before it; only what the socket does not take is queued
//! (`EPOLLOUT` is registered only then). Every write that moves bytes is progress; reading
//! pauses while `max_write_buffer` or more is queued and resumes under half of it.

use std::os::fd::{AsFd, BorrowedFd};

use super::state::{Flags, Phase};
use super::tls::Plain;
use super::{Core, Shard};
use crate::conn::Token;
use crate::server::api::{CloseReason, Service};
use crate::sys::socket::{self, Io};

/// Reads from the connection's socket: the read side of the transport seam.
#[inline]
fn recv(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Io {
    socket::read(fd, buf)
}

/// Writes to the connection's socket: the write side of the transport seam.
#[inline]
fn send(fd: BorrowedFd<'_>, data: &[u8]) -> Io {
    socket::write(fd, data)
}

impl<St> Core<St> {
    /// Write path, first step: sends what a callback staged, behind anything already queued.
    /// Returns true if this started a queue (the write deadline then needs the wheel). A failed
    /// write dooms the connection. The staging buffer is empty afterwards.
    pub(crate) fn write_staged(&mut self, token: Token) -> bool {
        if self.scratch.is_empty() {
            return false;
        }
        if let Some(started) = self.write_staged_tls(token) {
            return started;
        }
        let scratch = std::mem::take(&mut self.scratch);
        let started = self.send_or_queue(token, &scratch);
        self.scratch = scratch;
        self.scratch.clear();
        started
    }

    /// Sends `data` at once when nothing is queued before it, queues what the socket does not
    /// take; the bytes as they go on the wire (ciphertext on a TLS connection). Returns true if
    /// this started a queue. A failed write dooms the connection.
    pub(crate) fn send_or_queue(&mut self, token: Token, data: &[u8]) -> bool {
        let Some(e) = self.conns.get_mut(token) else {
            return false;
        };
        let c = &mut e.ctl;
        let counters = self.stats.shard(self.env.shard);
        let mut started = false;
        let mut failed = false;
        match &mut c.output {
            Some(out) => {
                out.push(data);
                counters.output_queued.add(data.len() as u64);
            }
            None if c.flags.has(Flags::UNCOMMITTED) => {
                // Received in a hand-over not committed yet: the old process may still take the
                // connection back, so nothing reaches the socket before the commit.
                c.output = Some(self.pool.output_from(data));
                counters.output_queued.add(data.len() as u64);
            }
            None => {
                let written = match send(c.fd.as_fd(), data) {
                    Io::Done(n) => {
                        counters.writes.inc();
                        counters.bytes_out.add(n as u64);
                        n
                    }
                    Io::WouldBlock => 0,
                    Io::Failed(_) => {
                        failed = true;
                        0
                    }
                };
                if !failed && written < data.len() {
                    c.output = Some(self.pool.output_from(&data[written..]));
                    counters.output_queued.add((data.len() - written) as u64);
                    // The write deadline counts from here: no progress since this moment.
                    c.last_active = self.env.stamp();
                    started = true;
                }
            }
        }
        if failed {
            self.doom(token, CloseReason::Error);
            return false;
        }
        if c.queued() >= self.env.limits.max_write_buffer && !c.flags.has(Flags::PAUSED) {
            c.flags.set(Flags::PAUSED);
            counters.backpressure_pauses.inc();
        }
        started
    }
}

impl<S: Service> Shard<S> {
    /// Read path: reads what the socket has (within the budget) and offers it to the service.
    /// `read_closed`: the event says the peer's FIN is pending.
    pub(crate) fn on_readable(&mut self, token: Token, read_closed: bool) {
        let edge = self.core.tuning.edge;
        let mut budget = self.core.tuning.read_budget;
        let mut resumed = false;
        if read_closed {
            if let Some(e) = self.core.conns.get_mut(token) {
                e.ctl.flags.set(Flags::EOF_PENDING);
            }
        }
        loop {
            let core = &mut self.core;
            let Some(e) = core.conns.get_mut(token) else {
                return;
            };
            if !e.ctl.reading() {
                return;
            }
            let lingering = matches!(e.ctl.phase, Phase::Lingering { .. });
            if !lingering && e.ctl.flags.has(Flags::RESUME) {
                if resumed {
                    // Set again: the connection is on the ready list or waits for its drain.
                    return;
                }
                resumed = true;
                e.ctl.flags.clear(Flags::RESUME);
                if !self.deliver(token, 0) {
                    return;
                }
                continue;
            }
            let want = core.read_buf.len();
            let n = match recv(e.ctl.fd.as_fd(), &mut core.read_buf) {
                Io::Done(0) => {
                    e.ctl.flags.set(Flags::EOF);
                    if let Phase::Lingering { why, .. } = e.ctl.phase {
                        core.doom(token, why);
                    } else {
                        // The peer is done sending: answer what it sent, then close.
                        core.begin_close(token, CloseReason::PeerClosed);
                    }
                    return;
                }
                Io::Done(n) => n,
                Io::WouldBlock => return,
                Io::Failed(_) => {
                    core.doom(token, CloseReason::Error);
                    return;
                }
            };
            let counters = core.stats.shard(core.env.shard);
            counters.reads.inc();
            counters.bytes_in.add(n as u64);
            let eof_pending = e.ctl.flags.has(Flags::EOF_PENDING);
            if !lingering {
                let first_words = !e.ctl.flags.has(Flags::SPOKE);
                e.ctl.flags.set(Flags::SPOKE);
                // Input is progress only while nothing is queued: a peer that sends but does
                // not read must not keep its stalled output alive.
                if e.ctl.output.is_none() {
                    e.ctl.last_active = core.env.stamp();
                }
                // The transport seam: a TLS connection's ciphertext becomes plaintext here.
                let (plain, peer_closed) = self.tls_read(token, n);
                let delivered = match plain {
                    Plain::Raw(m) | Plain::InPlace(m) => self.deliver(token, m),
                    Plain::Appended => self.deliver(token, 0),
                    Plain::Nothing => self.core.conns.get(token).is_some_and(|e| e.ctl.is_open()),
                };
                if !delivered {
                    return;
                }
                if peer_closed {
                    // close_notify: answer what was sent, then close with our own.
                    self.core.begin_close(token, CloseReason::PeerClosed);
                    return;
                }
                if first_words && self.core.env.draining {
                    // Its drain deadline just became the shorter quiet period.
                    self.core.rearm(token, true);
                }
            }
            if !edge || (n < want && !eof_pending) {
                return;
            }
            budget = budget.saturating_sub(n);
            if budget == 0 {
                self.core.ready.push(token);
                return;
            }
        }
    }

    /// Offers the connection's input to the service: its leftover bytes followed by the `n` bytes
    /// just read into the shard's buffer (`n` = 0 re-offers the leftover after a `resume_later`).
    /// False if the connection is no longer open.
    fn deliver(&mut self, token: Token, n: usize) -> bool {
        let core = &mut self.core;
        let Some(e) = core.conns.get_mut(token) else {
            return false;
        };
        let mut leftover = e.ctl.input.take();
        let held_before = leftover.as_ref().map_or(0, |b| b.len());
        if let Some(buf) = &mut leftover {
            buf.extend_from_slice(&core.read_buf[..n]);
        }
        // The read buffer leaves the core for the call (a pointer move, no copy), so the
        // callback helper can borrow the core while the service reads the input in place.
        let mut read_buf = std::mem::take(&mut core.read_buf);
        let service = &mut self.service;
        let consumed = core.invoke(token, |conn| {
            let input: &mut [u8] = match &mut leftover {
                Some(buf) => &mut buf[..],
                None => &mut read_buf[..n],
            };
            let len = input.len();
            service.on_data(conn, input).min(len)
        });
        let counters = core.stats.shard(core.env.shard);
        let Some(consumed) = consumed else {
            // Gone or panicked (then doomed): its input goes with it.
            core.read_buf = read_buf;
            counters.input_buffered.sub(held_before as u64);
            if let Some(b) = leftover {
                core.pool.release_input(b);
            }
            return false;
        };
        // Keep what the service did not consume, in a buffer of its own.
        match &mut leftover {
            Some(buf) => {
                buf.drain(..consumed);
                if buf.is_empty() {
                    core.pool.release_input(leftover.take().expect("some"));
                }
            }
            None if consumed < n => {
                leftover = Some(core.pool.input_from(&read_buf[consumed..n]));
            }
            None => {}
        }
        core.read_buf = read_buf;
        let held = leftover.as_ref().map_or(0, |b| b.len());
        counters.input_buffered.add(held as u64);
        counters.input_buffered.sub(held_before as u64);
        let overflow = held > core.env.limits.max_read_buffer;
        if let Some(e) = core.conns.get_mut(token) {
            e.ctl.input = leftover;
        }
        core.after_callback(token);
        if overflow {
            core.doom(token, CloseReason::ReadOverflow);
            return false;
        }
        core.conns.get(token).is_some_and(|e| e.ctl.is_open())
    }

    /// Write path, second step: the socket can take more of the queue.
    pub(crate) fn on_writable(&mut self, token: Token) {
        let core = &mut self.core;
        let max_write = core.env.limits.max_write_buffer;
        let stamp = core.env.stamp();
        let Some(e) = core.conns.get_mut(token) else {
            return;
        };
        if matches!(e.ctl.phase, Phase::Doomed | Phase::Lent) || e.ctl.flags.has(Flags::UNCOMMITTED)
        {
            return;
        }
        let Some(out) = e.ctl.output.as_mut() else {
            return;
        };
        let counters = core.stats.shard(core.env.shard);
        let mut progress = false;
        while !out.is_empty() {
            let pending = out.pending();
            let len = pending.len();
            match send(e.ctl.fd.as_fd(), pending) {
                Io::Done(n) => {
                    counters.writes.inc();
                    counters.bytes_out.add(n as u64);
                    counters.output_queued.sub(n as u64);
                    out.consume(n);
                    progress |= n > 0;
                    if n < len {
                        break;
                    }
                }
                Io::WouldBlock => break,
                Io::Failed(_) => {
                    core.doom(token, CloseReason::Error);
                    return;
                }
            }
        }
        let remaining = out.len();
        if progress {
            e.ctl.last_active = stamp;
        }
        if remaining == 0 {
            let out = e.ctl.output.take().expect("some");
            core.pool.release_output(out);
        }
        // Resume reading once the queue is back under half the bound (hysteresis avoids
        // flapping between paused and reading on every write).
        if e.ctl.flags.has(Flags::PAUSED) && remaining <= max_write / 2 {
            e.ctl.flags.clear(Flags::PAUSED);
        }
        let closing = matches!(e.ctl.phase, Phase::Closing { .. });
        let resume = e.ctl.flags.has(Flags::RESUME);
        core.sync_interest(token);
        if remaining == 0 {
            if closing {
                core.finish_close(token);
            } else {
                if resume {
                    core.ready.push(token);
                }
                core.call(token, |conn| self.service.on_drained(conn));
            }
        }
    }
}
