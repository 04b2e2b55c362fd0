//! One listening socket and its accept policy, the same for the acceptor thread and for shards
//! that accept on their own SO_REUSEPORT sockets (`balance = "reuseport"`).
//!
//! Owned by one thread (the acceptor, or one shard). The socket is registered edge-triggered: an
//! edge marks it ready, and it stays ready until `accept4` says `EAGAIN`, so an owner that stops
//! after a batch comes back to it without waiting for a new edge, and a paused listener cannot
//! make its owner spin.
//!
//! One accept step ([`Listener::accept`]) and one classification of its errors (from
//! [`crate::sys::socket::AcceptError`]): errors that concern one connection are counted and
//! skipped; resource exhaustion (`EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`) and unknown errors pause
//! this listener for a backoff that doubles from [`BACKOFF_MIN`] to [`BACKOFF_MAX`] while it
//! persists (as memcached re-checks every 10 ms), with the time spent paused counted. Pending
//! connections wait in the kernel's backlog meanwhile; the process never exits over it.

use std::net::TcpListener;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::stats::{AcceptorCounters, Counter, ShardCounters};
use crate::sys::socket::{self, AcceptError};

/// First pause after resource exhaustion.
pub(crate) const BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest pause while exhaustion persists.
pub(crate) const BACKOFF_MAX: Duration = Duration::from_millis(320);

/// The counters one accept step updates: the acceptor's, or a reuseport shard's.
pub(crate) struct AcceptCounters<'a> {
    pub errors: &'a Counter,
    pub pauses: &'a Counter,
    pub paused_micros: &'a Counter,
}

impl<'a> AcceptCounters<'a> {
    pub fn acceptor(c: &'a AcceptorCounters) -> Self {
        AcceptCounters {
            errors: &c.accept_errors,
            pauses: &c.accept_pauses,
            paused_micros: &c.paused_micros,
        }
    }

    pub fn shard(c: &'a ShardCounters) -> Self {
        AcceptCounters {
            errors: &c.accept_errors,
            pauses: &c.accept_pauses,
            paused_micros: &c.accept_paused_micros,
        }
    }
}

/// What one accept step produced.
#[derive(Debug)]
pub(crate) enum Step {
    /// A connection.
    Conn(OwnedFd),
    /// Nothing happened that the caller must act on (a per-connection error, counted, or an
    /// interrupted call): go on with the batch.
    Skipped,
    /// Nothing pending: wait for the next edge.
    Drained,
    /// Accepting is paused (resource exhaustion); the listener says until when.
    Paused,
}

pub(crate) struct Listener {
    socket: TcpListener,
    /// Position of the listener in the server's list (what `Conn::listener` returns).
    pub index: usize,
    name: String,
    /// An edge was seen (or a batch ran out) and no accept has said `EAGAIN` since.
    ready: bool,
    paused_until: Option<Instant>,
    /// When the current run of pauses began (for `paused_micros`).
    paused_at: Option<Instant>,
    backoff: Duration,
}

impl Listener {
    pub fn new(socket: TcpListener, index: usize, name: &str) -> Listener {
        Listener {
            socket,
            index,
            name: name.to_string(),
            // Connections may have queued before the first edge could be seen.
            ready: true,
            paused_until: None,
            paused_at: None,
            backoff: BACKOFF_MIN,
        }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// An epoll event reported the listener readable.
    pub fn mark_ready(&mut self) {
        self.ready = true;
    }

    /// Whether an accept should be tried now: ready and not paused. A pause that has run out
    /// ends here (the listener is tried again whatever edges were seen meanwhile).
    pub fn wants_accept(&mut self, now: Instant) -> bool {
        if let Some(until) = self.paused_until {
            if now < until {
                return false;
            }
            self.paused_until = None;
            self.ready = true;
        }
        self.ready
    }

    /// Ready to accept without waiting for an event.
    pub fn is_ready(&self) -> bool {
        self.ready && self.paused_until.is_none()
    }

    /// When a paused listener is to be tried again.
    pub fn paused_until(&self) -> Option<Instant> {
        self.paused_until
    }

    /// One accept step. `owner` names the thread in log lines (`acceptor`, `shard 3`).
    pub fn accept(&mut self, owner: &str, counters: &AcceptCounters<'_>) -> Step {
        match socket::accept(self.socket.as_fd()) {
            Ok(fd) => {
                self.end_pause(owner, counters);
                Step::Conn(fd)
            }
            Err(AcceptError::WouldBlock) => {
                self.ready = false;
                self.end_pause(owner, counters);
                Step::Drained
            }
            Err(AcceptError::Interrupted) => Step::Skipped,
            Err(AcceptError::PerConnection(e)) => {
                counters.errors.inc();
                log::debug!("{owner}: accept on `{}`: {e} (skipped)", self.name);
                Step::Skipped
            }
            Err(AcceptError::Exhausted(e)) => {
                self.pause(owner, &e, counters);
                Step::Paused
            }
            Err(AcceptError::Unknown(e)) => {
                counters.errors.inc();
                self.pause(owner, &e, counters);
                Step::Paused
            }
        }
    }

    fn pause(&mut self, owner: &str, e: &std::io::Error, counters: &AcceptCounters<'_>) {
        let now = Instant::now();
        if self.paused_at.is_none() {
            self.paused_at = Some(now);
            counters.pauses.inc();
            log::warn!(
                "{owner}: accept on listener `{}` failed ({e}); pausing accepts, retrying every {:?} or more",
                self.name,
                self.backoff
            );
        }
        self.paused_until = Some(now + self.backoff);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    /// The condition that paused accepting is over: count the time and reset the backoff.
    fn end_pause(&mut self, owner: &str, counters: &AcceptCounters<'_>) {
        if let Some(at) = self.paused_at.take() {
            let paused = at.elapsed();
            counters.paused_micros.add(paused.as_micros() as u64);
            log::info!(
                "{owner}: accepting again on listener `{}` after {paused:?} paused",
                self.name
            );
        }
        self.backoff = BACKOFF_MIN;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::AcceptorCounters;

    #[test]
    fn drained_then_accepts_then_drained() {
        let socket = socket::listen("127.0.0.1:0".parse().unwrap(), 16, false).unwrap();
        let addr = socket::local_addr(&socket).unwrap();
        let mut l = Listener::new(socket, 2, "test");
        let c = AcceptorCounters::default();
        let counters = AcceptCounters::acceptor(&c);
        let now = Instant::now();
        assert!(l.wants_accept(now), "ready at first");
        assert!(matches!(l.accept("test", &counters), Step::Drained));
        assert!(!l.wants_accept(now), "waits for an edge once drained");
        let _client = std::net::TcpStream::connect(addr).unwrap();
        l.mark_ready();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match l.accept("test", &counters) {
                Step::Conn(_) => break,
                Step::Drained if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(c.accept_errors.get(), 0);
        assert_eq!(c.accept_pauses.get(), 0);
    }

    #[test]
    fn exhaustion_pauses_with_a_doubling_backoff_and_counts_the_time() {
        let socket = socket::listen("127.0.0.1:0".parse().unwrap(), 16, false).unwrap();
        let mut l = Listener::new(socket, 0, "test");
        let c = AcceptorCounters::default();
        let counters = AcceptCounters::acceptor(&c);
        let e = std::io::Error::from_raw_os_error(libc::EMFILE);
        l.pause("test", &e, &counters);
        let first = l.paused_until().unwrap();
        assert!(!l.wants_accept(Instant::now()));
        assert!(!l.is_ready());
        l.pause("test", &e, &counters);
        assert!(l.paused_until().unwrap() > first, "the backoff grew");
        assert_eq!(c.accept_pauses.get(), 1, "one run of pauses counts once");
        for _ in 0..10 {
            l.pause("test", &e, &counters);
        }
        assert_eq!(l.backoff, BACKOFF_MAX);
        assert!(
            l.wants_accept(Instant::now() + BACKOFF_MAX * 2),
            "tried again"
        );
        std::thread::sleep(Duration::from_millis(2));
        assert!(matches!(l.accept("test", &counters), Step::Drained));
        assert!(c.paused_micros.get() >= 2000, "paused time counted");
        assert_eq!(l.backoff, BACKOFF_MIN);
    }
}
