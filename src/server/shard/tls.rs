//! TLS between the socket and the service, for the connections of a TLS listener: the shard's
//! side of [`crate::tls`] (whose module note has the design and the measurements).
//!
//! Owned by the shard thread. A connection of a TLS listener has a [`TlsState`] in `Core::tls`
//! (a listener's server side, or the load generator's client side, which sends its ClientHello
//! at adoption), a table indexed by slab slot: empty on a server without TLS, so plain
//! connections pay nothing, not even a pointer in their `Ctl`. The entry is set at adoption and
//! cleared when the connection is reaped, so it always belongs to the slot's current connection.
//!
//! The rules:
//! - Until its handshake finishes, a connection is not the service's: no callback runs on it
//!   ([`Core::invoke`] refuses it), `on_open` runs when the handshake completes, and `on_close`
//!   only for a connection that was opened. The handshake deadline (`handshake_timeout`) sits in
//!   the service timer's slot, which nothing else uses before `on_open`.
//! - Read path: ciphertext read into the shard's buffer is decrypted there, in place, and the
//!   plaintext delivered exactly as a plain read; a record cut by the read, or plaintext the
//!   service left unconsumed, goes to the connection's own buffers (see `read`).
//! - Write path: staged plaintext is encrypted into the shard's second staging buffer (`wire`)
//!   and that is what is sent or queued, so `max_write_buffer` and `write_timeout` bound the
//!   ciphertext that really waits for the socket. Handshake records and alerts take the same
//!   path.
//! - Close: a graceful close queues close_notify behind what is queued; a received
//!   close_notify is end of input. A handshake failure is answered with rustls's alert (sent if
//!   the socket takes it at once) and closes that connection only, counted.

use crate::conn::Token;
use crate::server::api::{CloseReason, Service};
use crate::server::{TlsSide, TlsSpec};
use crate::tls::{Dest, Progress, TlsClient, TlsConn, TlsError};

use super::state::Flags;
use super::{Core, Shard};

/// What the read path does after decrypting one read.
pub(crate) enum Plain {
    /// Not a TLS connection: the `n` bytes read are the input.
    Raw(usize),
    /// Deliver this many plaintext bytes, at the front of the read buffer.
    InPlace(usize),
    /// Plaintext was appended to the connection's input buffer: offer it (`deliver(token, 0)`).
    Appended,
    /// Nothing for the service (handshake records only, or the connection is closing).
    Nothing,
}

/// One connection's TLS state: a listener's server side, or the load generator's client side.
/// Boxed: a slot of the table costs two words, whatever the side.
pub(crate) enum TlsState {
    Server(Box<TlsConn>),
    Client(Box<TlsClient>),
}

/// Runs `$body` with `$t` bound to whichever side `$state` holds (both have the same methods).
macro_rules! either {
    ($state:expr, $t:ident => $body:expr) => {
        match $state {
            TlsState::Server($t) => $body,
            TlsState::Client($t) => $body,
        }
    };
}

impl TlsState {
    pub(crate) fn is_handshaking(&self) -> bool {
        either!(self, t => t.is_handshaking())
    }

    fn has_pending(&self) -> bool {
        either!(self, t => t.has_pending())
    }

    fn read(
        &mut self,
        data: &mut [u8],
        dest: Dest<'_>,
        out: &mut Vec<u8>,
    ) -> Result<Progress, TlsError> {
        either!(self, t => t.read(data, dest, out))
    }

    fn write(&mut self, plain: &[u8], out: &mut Vec<u8>) -> Result<(), TlsError> {
        either!(self, t => t.write(plain, out))
    }

    fn close_notify(&mut self, out: &mut Vec<u8>) -> bool {
        either!(self, t => t.close_notify(out))
    }
}

impl<St> Core<St> {
    /// Whether the connection is a TLS connection still in its handshake (not the service's).
    #[inline]
    pub(crate) fn tls_handshaking(&self, token: Token) -> bool {
        matches!(self.tls.get(token.index()), Some(Some(t)) if t.is_handshaking())
    }

    /// A new connection from listener `listener`: if that listener terminates TLS, gives it its
    /// handshake state and deadline; false for a plain listener.
    pub(crate) fn tls_adopt(&mut self, token: Token, listener: usize) -> bool {
        let Some(Some(TlsSpec {
            side,
            handshake_timeout,
        })) = self.tls_listeners.get(listener)
        else {
            return false;
        };
        let mut hello = Vec::new();
        let state = match side {
            TlsSide::Server(acceptor) => TlsState::Server(Box::new(acceptor.accept())),
            TlsSide::Client(connector) => {
                // The client speaks first: its ClientHello goes out now.
                let started = connector.connect().and_then(|mut c| {
                    c.start(&mut hello)?;
                    Ok(c)
                });
                match started {
                    Ok(c) => TlsState::Client(Box::new(c)),
                    Err(e) => {
                        log::warn!("shard {}: cannot start a TLS client: {e}", self.env.shard);
                        self.counters().tls_handshake_failures.inc();
                        self.doom(token, CloseReason::Tls);
                        return true;
                    }
                }
            }
        };
        let by = self.env.stamp_after(*handshake_timeout);
        let index = token.index();
        if self.tls.len() <= index {
            self.tls.resize_with(index + 1, || None);
        }
        self.tls[index] = Some(state);
        if let Some(e) = self.conns.get_mut(token) {
            e.ctl.timer = by;
            e.ctl.flags.set(Flags::TIMER);
        }
        if !hello.is_empty() {
            self.send_or_queue(token, &hello);
        }
        true
    }

    /// The connection is gone: drops its TLS state. Returns whether the service had it (a TLS
    /// connection reaped before its handshake finished was never opened).
    pub(crate) fn tls_forget(&mut self, token: Token) -> bool {
        match self.tls.get_mut(token.index()).and_then(Option::take) {
            Some(t) => !t.is_handshaking(),
            None => true,
        }
    }

    /// Write path: encrypts the staged plaintext (a TLS connection) and sends or queues it.
    /// Returns what [`Core::send_or_queue`] returns.
    pub(crate) fn write_staged_tls(&mut self, token: Token) -> Option<bool> {
        let tls = self.tls.get_mut(token.index())?.as_mut()?;
        let mut wire = std::mem::take(&mut self.wire);
        let result = tls.write(&self.scratch, &mut wire);
        self.scratch.clear();
        let started = match result {
            Ok(()) => self.send_or_queue(token, &wire),
            Err(e) => {
                log::debug!("shard {}: {e}", self.env.shard);
                self.counters().tls_errors.inc();
                self.doom(token, CloseReason::Tls);
                false
            }
        };
        self.recycle_wire(wire);
        Some(started)
    }

    /// Close path: queues close_notify behind the pending output (once; only after a finished
    /// handshake).
    pub(crate) fn tls_close_notify(&mut self, token: Token) {
        let Some(Some(tls)) = self.tls.get_mut(token.index()) else {
            return;
        };
        let mut wire = std::mem::take(&mut self.wire);
        if tls.close_notify(&mut wire) {
            self.send_or_queue(token, &wire);
        }
        self.recycle_wire(wire);
    }

    fn recycle_wire(&mut self, mut wire: Vec<u8>) {
        wire.clear();
        if wire.capacity() > super::lifecycle::SCRATCH_KEEP {
            wire = Vec::new();
        }
        self.wire = wire;
    }
}

impl<S: Service> Shard<S> {
    /// Read path: `n` bytes were read into the shard's buffer. For a TLS connection they are
    /// decrypted: what rustls answers (handshake records, tickets, alerts) is sent, a finished
    /// handshake opens the connection to the service, an error closes it.
    ///
    /// Also returns whether close_notify arrived: the read path then closes after delivering.
    pub(crate) fn tls_read(&mut self, token: Token, n: usize) -> (Plain, bool) {
        let core = &mut self.core;
        let Some(Some(tls)) = core.tls.get_mut(token.index()) else {
            return (Plain::Raw(n), false);
        };
        let Some(e) = core.conns.get_mut(token) else {
            return (Plain::Nothing, false);
        };
        let handshaking = tls.is_handshaking();
        let mut wire = std::mem::take(&mut core.wire);
        let data = &mut core.read_buf[..n];
        let counters = core.stats.shard(core.env.shard);
        let (result, plain) = if e.ctl.input.is_some() || tls.has_pending() {
            // A record continues from the last read, or the service left plaintext unconsumed:
            // the new plaintext goes after it, in the connection's buffer.
            let input = e.ctl.input.get_or_insert_with(|| core.pool.input_from(&[]));
            let before = input.len();
            let r = tls.read(data, Dest::Append(input), &mut wire);
            let added = input.len() - before;
            counters.input_buffered.add(added as u64);
            if input.is_empty() {
                core.pool
                    .release_input(e.ctl.input.take().expect("just inserted"));
            }
            (
                r,
                if added > 0 {
                    Plain::Appended
                } else {
                    Plain::Nothing
                },
            )
        } else {
            let r = tls.read(data, Dest::InPlace, &mut wire);
            let m = r.as_ref().map_or(0, |p| p.plaintext);
            (
                r,
                if m > 0 {
                    Plain::InPlace(m)
                } else {
                    Plain::Nothing
                },
            )
        };
        // A queue started here (a flight, tickets, a key update the socket did not take) needs
        // its write deadline in the wheel, as one started by a callback does.
        let queued = !wire.is_empty() && core.send_or_queue(token, &wire);
        core.recycle_wire(wire);
        if queued {
            core.rearm(token, true);
        }
        let progress = match result {
            Ok(p) => p,
            Err(err) => {
                if handshaking {
                    core.counters().tls_handshake_failures.inc();
                } else {
                    core.counters().tls_errors.inc();
                }
                let peer = core.conns.get(token).and_then(|e| {
                    crate::sys::socket::peer_addr(std::os::fd::AsFd::as_fd(&e.ctl.fd)).ok()
                });
                log::debug!(
                    "shard {}: closing the TLS connection from {}: {err}",
                    core.env.shard,
                    peer.map_or_else(|| "an unknown peer".into(), |a| a.to_string())
                );
                core.doom(token, CloseReason::Tls);
                return (Plain::Nothing, false);
            }
        };
        if progress.handshake_done {
            core.counters().tls_handshakes.inc();
            if let Some(e) = core.conns.get_mut(token) {
                // The handshake deadline is over; the timer slot is the service's from now on.
                e.ctl.flags.clear(Flags::TIMER);
            }
            core.call(token, |conn| self.service.on_open(conn));
            core.rearm(token, false);
        }
        (plain, progress.peer_closed)
    }
}
