//! The acceptor thread: accepts on every listener and hands sockets to shards.
//!
//! It owns its own epoll over the listeners plus a waker for shutdown; the accept step and its
//! overload policy are the [`Listener`]'s, shared with reuseport shards. Sockets go to a shard
//! over that shard's bounded channel, chosen by the [`Balance`] policy; a full or gone shard is
//! skipped for the next one. Each shard that received sockets is woken once per
//! [`WAKE_EVERY`] sockets and at the end of an accept batch, not once per socket. When every
//! shard's queue is full (a burst of connections faster than the shards adopt them), the
//! acceptor holds the socket in hand and stops accepting, so the rest wait in the kernel's
//! backlog, and retries every millisecond; only a socket that found every queue full for
//! [`HOLD_LIMIT`] (stuck shards) is closed and counted. Beyond `max_connections` open
//! connections, new sockets are closed at once and counted.
//!
//! Its waker announces a control message ([`AcceptorControl`]): stop (the listeners are closed),
//! or pause and resume accepting during a hand-over (the listeners leave epoll but stay open, so
//! a new process accepting on the same sockets gets their queues whole; a socket held in hand is
//! given to a shard before the pause is acknowledged, so that it moves with the shard's others).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::conn::{Token, TokenKind};
use crate::server::listener::{AcceptCounters, Listener, Step};
use crate::server::port::{NewConn, ShardPort};
use crate::server::Balance;
use crate::stats::Stats;
use crate::sys::poller::{Events, Interest, Poller};
use crate::sys::waker::Waker;

/// Accepts per listener before the other listeners (and the stop signal) get a turn.
const BATCH: usize = 1024;
/// Sockets handed to one shard before it is woken, within a batch: its queue (1,024) drains
/// while the acceptor goes on.
const WAKE_EVERY: u32 = 64;
/// How long a socket is held while every shard's queue is full before it is closed.
const HOLD_LIMIT: Duration = Duration::from_secs(1);
/// How often a held socket is offered again.
const HOLD_RETRY: Duration = Duration::from_millis(1);

/// What the server asks of its acceptor (each followed by a wake).
pub(crate) enum AcceptorControl {
    /// Close the listeners and end the thread.
    Stop,
    /// Stop accepting, keeping the sockets; acknowledged once no accept can start any more.
    Pause(Sender<()>),
    /// Accept again; acknowledged.
    Resume(Sender<()>),
}

pub(crate) struct Acceptor {
    poller: Poller,
    wake: Waker,
    control: Receiver<AcceptorControl>,
    listeners: Vec<Listener>,
    paused: bool,
    dispatch: Dispatch,
    stats: Arc<Stats>,
}

/// Where accepted sockets go.
struct Dispatch {
    shards: Vec<ShardPort>,
    balance: Balance,
    max_connections: usize,
    stats: Arc<Stats>,
    /// Connections handed to each shard; open = assigned - closed (the shard's counter).
    assigned: Vec<u64>,
    next: usize,
    /// Sockets handed to each shard since it was last woken.
    unwoken: Vec<u32>,
    /// A socket every shard refused (queues full), since when: offered again before any new
    /// accept.
    held: Option<(NewConn, Instant)>,
}

impl Acceptor {
    pub fn new(
        listeners: Vec<Listener>,
        shards: Vec<ShardPort>,
        balance: Balance,
        max_connections: usize,
        stats: Arc<Stats>,
        wake: Waker,
        control: Receiver<AcceptorControl>,
    ) -> std::io::Result<Self> {
        let poller = Poller::new()?;
        poller.add(
            wake.fd(),
            Token::WAKER.0,
            Interest {
                read: true,
                write: false,
                edge: false,
            },
        )?;
        for (i, l) in listeners.iter().enumerate() {
            poller.add(
                l.fd(),
                Token::listener(i).0,
                Interest {
                    read: true,
                    write: false,
                    edge: true,
                },
            )?;
        }
        let n = shards.len();
        Ok(Acceptor {
            poller,
            wake,
            control,
            listeners,
            paused: false,
            stats: stats.clone(),
            dispatch: Dispatch {
                shards,
                balance,
                max_connections,
                stats,
                assigned: vec![0; n],
                next: 0,
                unwoken: vec![0; n],
                held: None,
            },
        })
    }

    /// Runs until told to stop; then the listeners are closed (dropped).
    pub fn run(mut self) {
        let mut events = Events::with_capacity(64);
        loop {
            let timeout = if self.paused {
                None
            } else if self.dispatch.held.is_some() {
                Some(HOLD_RETRY)
            } else if self.listeners.iter().any(Listener::is_ready) {
                Some(Duration::ZERO)
            } else {
                let now = Instant::now();
                self.listeners
                    .iter()
                    .filter_map(Listener::paused_until)
                    .min()
                    .map(|t| t.saturating_duration_since(now))
            };
            if let Err(e) = self.poller.wait(&mut events, timeout) {
                log::error!("acceptor: epoll_wait failed: {e}; retrying");
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            for i in 0..events.len() {
                match Token(events.get(i).token).kind() {
                    TokenKind::Waker => {
                        self.wake.reset();
                        if !self.on_control() {
                            log::info!("acceptor: stopped; listeners closed");
                            return;
                        }
                    }
                    TokenKind::Listener(l) => self.listeners[l].mark_ready(),
                    TokenKind::Conn => {}
                }
            }
            if self.paused {
                continue;
            }
            let now = Instant::now();
            let counters = AcceptCounters::acceptor(self.stats.acceptor());
            // The held socket first: while the shards cannot take it, nothing new is accepted.
            let mut room = self.dispatch.retry_held(now);
            for l in &mut self.listeners {
                if !room || !l.wants_accept(now) {
                    continue;
                }
                for _ in 0..BATCH {
                    match l.accept("acceptor", &counters) {
                        Step::Conn(fd) => {
                            self.stats.acceptor().accepted.inc();
                            if !self.dispatch.dispatch(NewConn::accepted(fd, l.index), now) {
                                room = false;
                                break;
                            }
                        }
                        Step::Skipped => {}
                        Step::Drained | Step::Paused => break,
                    }
                }
                // A batch used up leaves the listener ready: the loop comes back at once.
            }
            self.dispatch.wake_all();
        }
    }
}

impl Acceptor {
    /// Applies every pending control message; false once told to stop (or the server is gone).
    fn on_control(&mut self) -> bool {
        loop {
            match self.control.try_recv() {
                Ok(AcceptorControl::Stop) => return false,
                Ok(AcceptorControl::Pause(ack)) => {
                    if !self.paused {
                        for l in &self.listeners {
                            let _ = self.poller.delete(l.fd());
                        }
                        self.paused = true;
                        // A socket in hand goes to a shard first (or is closed and counted after
                        // HOLD_LIMIT, as always): the shards export what they were given.
                        while !self.dispatch.retry_held(Instant::now()) {
                            std::thread::sleep(HOLD_RETRY);
                        }
                        self.dispatch.wake_all();
                        log::info!("acceptor: paused (hand-over); listeners kept open");
                    }
                    let _ = ack.send(());
                }
                Ok(AcceptorControl::Resume(ack)) => {
                    if self.paused {
                        for (i, l) in self.listeners.iter_mut().enumerate() {
                            let interest = Interest {
                                read: true,
                                write: false,
                                edge: true,
                            };
                            if let Err(e) = self.poller.add(l.fd(), Token::listener(i).0, interest)
                            {
                                log::error!("acceptor: cannot accept again on a listener: {e}");
                            }
                            // Connections queued while paused raised no edge we saw.
                            l.mark_ready();
                        }
                        self.paused = false;
                        log::info!("acceptor: accepting again");
                    }
                    let _ = ack.send(());
                }
                Err(crossbeam_channel::TryRecvError::Empty) => return true,
                Err(crossbeam_channel::TryRecvError::Disconnected) => return false,
            }
        }
    }
}

impl Dispatch {
    fn open(&self, shard: usize) -> u64 {
        let counters = self.stats.shard(shard);
        if counters.alive.get() == 0 {
            // A dead shard's connections are gone (its channel refuses new ones).
            return 0;
        }
        self.assigned[shard].saturating_sub(counters.closed.get())
    }

    /// Wakes every shard that was handed sockets since its last wake.
    fn wake_all(&mut self) {
        for (shard, n) in self.unwoken.iter_mut().enumerate() {
            if std::mem::take(n) > 0 {
                self.shards[shard].waker.wake();
            }
        }
    }

    /// Offers the held socket again; true if there is none left (given to a shard, or closed
    /// after [`HOLD_LIMIT`]), so accepting may go on.
    fn retry_held(&mut self, now: Instant) -> bool {
        let Some((nc, since)) = self.held.take() else {
            return true;
        };
        match self.place(nc) {
            Ok(()) => true,
            Err(nc) if now.saturating_duration_since(since) < HOLD_LIMIT => {
                self.held = Some((nc, since));
                // The shards may have been handed sockets without a wake yet.
                self.wake_all();
                false
            }
            Err(_closed) => {
                self.stats.acceptor().rejected_busy.inc();
                true
            }
        }
    }

    /// Hands `nc` to a shard, or holds it when every queue is full (false: stop accepting).
    fn dispatch(&mut self, nc: NewConn, now: Instant) -> bool {
        let n = self.shards.len();
        let open: u64 = (0..n).map(|s| self.open(s)).sum();
        if open >= self.max_connections as u64 {
            self.stats.acceptor().rejected_max_connections.inc();
            return true; // dropping `nc` closes the socket
        }
        match self.place(nc) {
            Ok(()) => true,
            Err(nc) => {
                self.held = Some((nc, now));
                self.wake_all();
                false
            }
        }
    }

    /// The chosen shard, else the first other one with room; `Err` gives the socket back when
    /// every queue is full (or its shard gone).
    fn place(&mut self, mut nc: NewConn) -> Result<(), NewConn> {
        let n = self.shards.len();
        let first = match self.balance {
            Balance::LeastConnections => (0..n).min_by_key(|&s| (self.open(s), s)).unwrap_or(0),
            Balance::RoundRobin | Balance::Reuseport => self.next % n,
        };
        // Try the chosen shard, then the others in order: a full channel means a stuck shard,
        // a disconnected one a dead shard.
        for k in 0..n {
            let shard = (first + k) % n;
            match self.shards[shard].conns.try_send(nc) {
                Ok(()) => {
                    self.assigned[shard] += 1;
                    self.next = shard + 1;
                    self.unwoken[shard] += 1;
                    if self.unwoken[shard] >= WAKE_EVERY {
                        self.unwoken[shard] = 0;
                        self.shards[shard].waker.wake();
                    }
                    return Ok(());
                }
                Err(back) => nc = back,
            }
        }
        Err(nc)
    }
}
