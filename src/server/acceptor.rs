//! The acceptor thread: accepts on every listener and hands sockets to shards.
//!
//! It owns its own epoll over the listeners (edge-triggered, so a paused listener cannot make it
//! spin) plus a waker for shutdown. Sockets go to a shard over that shard's bounded channel; each
//! shard that received sockets is woken once per accept batch, not once per socket.
//!
//! Errors from `accept4` come in two kinds (as in actix-server and memcached): those that concern
//! one connection (ECONNABORTED, EPROTO, EPERM, ...) are counted and skipped; resource exhaustion
//! (EMFILE, ENFILE, ENOBUFS, ENOMEM) pauses that listener for a backoff that doubles from 5 ms to
//! 320 ms while it persists. The pending connections wait in the kernel's backlog meanwhile, and
//! the process never exits over it.

use std::net::TcpListener;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, TrySendError};
use nix::errno::Errno;

use crate::config::Balance;
use crate::server::shard::NewConn;
use crate::stats::Stats;
use crate::sys::poller::{Events, Interest, Poller};
use crate::sys::socket;
use crate::sys::waker::Waker;

const STOP: u64 = u64::MAX;
const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_millis(320);
/// Accepts per listener before the other listeners (and the stop signal) get a turn.
const BATCH: usize = 1024;

/// The acceptor's view of one shard.
pub struct ShardPort {
    pub conns: Sender<NewConn>,
    pub waker: Waker,
}

struct Listening {
    listener: TcpListener,
    index: usize,
    /// Set while paused after resource exhaustion.
    paused_until: Option<Instant>,
    paused_at: Option<Instant>,
    backoff: Duration,
    /// Still has pending connections (its batch ran out): retry without waiting for an edge.
    ready: bool,
}

pub struct Acceptor {
    poller: Poller,
    stop: Waker,
    listeners: Vec<Listening>,
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
        listeners: Vec<(usize, TcpListener)>,
        shards: Vec<ShardPort>,
        balance: Balance,
        max_connections: usize,
        stats: Arc<Stats>,
        stop: Waker,
    ) -> std::io::Result<Self> {
        let poller = Poller::new()?;
        poller.add(
            stop.fd(),
            STOP,
            Interest {
                read: true,
                write: false,
                edge: false,
            },
        )?;
        let listeners: Vec<Listening> = listeners
            .into_iter()
            .map(|(index, listener)| Listening {
                listener,
                index,
                paused_until: None,
                paused_at: None,
                backoff: BACKOFF_MIN,
                ready: true,
            })
            .collect();
        for (i, l) in listeners.iter().enumerate() {
            poller.add(
                l.listener.as_fd(),
                i as u64,
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
            stop,
            listeners,
            shards,
            balance,
            max_connections,
            stats,
            assigned: vec![0; n],
            next: 0,
            woken: vec![false; n],
        })
    }

    /// Runs until the stop waker fires; then the listeners are closed (dropped).
    pub fn run(mut self) {
        let mut events = Events::with_capacity(64);
        loop {
            let now = Instant::now();
            let timeout = if self
                .listeners
                .iter()
                .any(|l| l.ready && l.paused_until.is_none())
            {
                Some(Duration::ZERO)
            } else {
                self.listeners
                    .iter()
                    .filter_map(|l| l.paused_until)
                    .min()
                    .map(|t| t.saturating_duration_since(now))
            };
            if let Err(e) = self.poller.wait(&mut events, timeout) {
                log::error!("acceptor: epoll_wait failed: {e}; retrying");
                std::thread::sleep(BACKOFF_MIN);
                continue;
            }
            for i in 0..events.len() {
                let token = events.get(i).token;
                if token == STOP {
                    self.stop.reset();
                    log::info!("acceptor: stopped; listeners closed");
                    return;
                }
                self.listeners[token as usize].ready = true;
            }
            let now = Instant::now();
            for i in 0..self.listeners.len() {
                let l = &mut self.listeners[i];
                if let Some(until) = l.paused_until {
                    if now < until {
                        continue;
                    }
                    l.paused_until = None;
                    l.ready = true;
                }
                if l.ready {
                    self.accept_batch(i);
                }
            }
            for (shard, woken) in self.woken.iter_mut().enumerate() {
                if std::mem::take(woken) {
                    self.shards[shard].waker.wake();
                }
            }
        }
    }

    fn accept_batch(&mut self, i: usize) {
        for _ in 0..BATCH {
            let l = &mut self.listeners[i];
            match socket::accept(l.listener.as_fd()) {
                Ok(fd) => {
                    if let Some(at) = l.paused_at.take() {
                        self.stats
                            .acceptor()
                            .paused_micros
                            .add(at.elapsed().as_micros() as u64);
                    }
                    l.backoff = BACKOFF_MIN;
                    let listener = l.index;
                    self.stats.acceptor().accepted.inc();
                    self.dispatch(NewConn { fd, listener });
                }
                Err(Errno::EAGAIN) => {
                    l.ready = false;
                    if let Some(at) = l.paused_at.take() {
                        self.stats
                            .acceptor()
                            .paused_micros
                            .add(at.elapsed().as_micros() as u64);
                    }
                    return;
                }
                Err(Errno::EINTR) => {}
                Err(e) if socket::is_resource_exhaustion(e) => {
                    self.pause(i, e);
                    return;
                }
                Err(Errno::ECONNABORTED | Errno::EPROTO | Errno::EPERM) => {
                    self.stats.acceptor().accept_errors.inc();
                }
                Err(e) => {
                    // Unknown: treat like exhaustion rather than spin on it.
                    self.stats.acceptor().accept_errors.inc();
                    self.pause(i, e);
                    return;
                }
            }
        }
        // Batch used up; `ready` stays set so the loop comes back without waiting.
    }

    fn pause(&mut self, i: usize, e: Errno) {
        let l = &mut self.listeners[i];
        let now = Instant::now();
        if l.paused_at.is_none() {
            l.paused_at = Some(now);
            self.stats.acceptor().accept_pauses.inc();
            log::warn!(
                "acceptor: accept on listener {} failed ({e}); pausing accepts, retrying every {:?} or more",
                l.index,
                l.backoff
            );
        }
        l.paused_until = Some(now + l.backoff);
        l.backoff = (l.backoff * 2).min(BACKOFF_MAX);
        l.ready = true;
    }

    fn open(&self, shard: usize) -> u64 {
        self.assigned[shard].saturating_sub(self.stats.shard(shard).closed.get())
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
            _ => self.next % n,
        };
        // Try the chosen shard, then the others in order: a full channel means a stuck shard.
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
