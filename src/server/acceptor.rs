//! The acceptor thread: accepts on every listener and hands sockets to shards.
//!
//! It owns its own epoll over the listeners plus a waker for shutdown; the accept step and its
//! overload policy are the [`Listener`]'s, shared with reuseport shards. Sockets go to a shard
//! over that shard's bounded channel, chosen by the [`Balance`] policy; a full or gone shard is
//! skipped for the next one. Each shard that received sockets is woken once per accept batch,
//! not once per socket. Beyond `max_connections` open connections, new sockets are closed at
//! once and counted.
//!
//! Its waker announces a control message ([`AcceptorControl`]): stop (the listeners are closed),
//! or pause and resume accepting during a hand-over (the listeners leave epoll but stay open, so
//! a new process accepting on the same sockets gets their queues whole).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::conn::{Token, TokenKind};
use crate::server::listener::{AcceptCounters, Listener, Step};
use crate::server::port::{NewConn, ShardPort};
use crate::server::Balance;
use crate::stats::Stats;
use crate::sys::poller::{Events, Interest, Poller};
use crate::sys::waker::Waker;

/// Accepts per listener before the other listeners (and the stop signal) get a turn.
const BATCH: usize = 1024;

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
    woken: Vec<bool>,
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
                woken: vec![false; n],
            },
        })
    }

    /// Runs until told to stop; then the listeners are closed (dropped).
    pub fn run(mut self) {
        let mut events = Events::with_capacity(64);
        loop {
            let timeout = if self.paused {
                None
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
            for l in &mut self.listeners {
                if !l.wants_accept(now) {
                    continue;
                }
                for _ in 0..BATCH {
                    match l.accept("acceptor", &counters) {
                        Step::Conn(fd) => {
                            self.stats.acceptor().accepted.inc();
                            self.dispatch.dispatch(NewConn::accepted(fd, l.index));
                        }
                        Step::Skipped => {}
                        Step::Drained | Step::Paused => break,
                    }
                }
                // A batch used up leaves the listener ready: the loop comes back at once.
            }
            for (shard, woken) in self.dispatch.woken.iter_mut().enumerate() {
                if std::mem::take(woken) {
                    self.dispatch.shards[shard].waker.wake();
                }
            }
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

    fn dispatch(&mut self, mut nc: NewConn) {
        let n = self.shards.len();
        let open: u64 = (0..n).map(|s| self.open(s)).sum();
        if open >= self.max_connections as u64 {
            self.stats.acceptor().rejected_max_connections.inc();
            return; // dropping `nc` closes the socket
        }
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
                    self.woken[shard] = true;
                    self.next = shard + 1;
                    return;
                }
                Err(TrySendError::Full(back)) | Err(TrySendError::Disconnected(back)) => nc = back,
            }
        }
        self.stats.acceptor().rejected_busy.inc();
    }
}
