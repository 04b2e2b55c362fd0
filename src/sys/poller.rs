//! A thin wrapper over one epoll instance: registration by `u64` token and a reusable event array.
//!
//! Owned by exactly one thread (a shard or the acceptor). Spurious wake-ups are possible and
//! harmless: every caller treats readiness as a hint and reads until `WouldBlock`.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::AsRawFd;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use super::io_err;
use super::mem::Zeroed;

/// What a registration waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interest {
    pub read: bool,
    pub write: bool,
    /// Edge-triggered (`EPOLLET`) rather than level-triggered.
    pub edge: bool,
}

impl Interest {
    fn flags(self) -> EpollFlags {
        let mut f = EpollFlags::empty();
        if self.read {
            // EPOLLRDHUP: an event that carries the peer's FIN says so, so a reader knows to read
            // on to end of stream even after a short read (the FIN raises no later edge).
            f |= EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP;
        }
        if self.write {
            f |= EpollFlags::EPOLLOUT;
        }
        if self.edge {
            f |= EpollFlags::EPOLLET;
        }
        f
    }
}

/// One readiness report.
#[derive(Debug, Clone, Copy)]
pub struct Event {
    pub token: u64,
    pub readable: bool,
    pub writable: bool,
    /// Error or hang-up: the next read or write will say what happened.
    pub error: bool,
    /// The peer closed its side (`EPOLLRDHUP` or `EPOLLHUP`): end of stream follows the data
    /// already queued, so read until end of stream or `WouldBlock`.
    pub read_closed: bool,
}

/// The reusable array `epoll_wait` fills. Its memory comes from [`Zeroed`]: the kernel writes
/// only as many entries as it returns, so an idle shard's 1024 slots (12 KiB) stay
/// non-resident, and a busy one's only up to its largest batch.
pub struct Events {
    buf: Zeroed<EpollEvent>,
    /// Slots offered to `epoll_wait` (the whole array, except in a test).
    cap: usize,
    len: usize,
}

impl Events {
    pub fn with_capacity(n: usize) -> Self {
        let n = n.max(1);
        Events {
            buf: Zeroed::new(n),
            cap: n,
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn get(&self, i: usize) -> Event {
        let e = &self.buf[i];
        let f = e.events();
        Event {
            token: e.data(),
            readable: f.intersects(EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP),
            writable: f.contains(EpollFlags::EPOLLOUT),
            error: f.intersects(EpollFlags::EPOLLERR | EpollFlags::EPOLLHUP),
            read_closed: f.intersects(EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLHUP),
        }
    }
}

/// One epoll instance.
pub struct Poller {
    epoll: Epoll,
}

/// A second handle on a [`Poller`]'s epoll instance, for another thread to remove
/// registrations with (a hand-over's clean-up, after the commit). The instance lives until both
/// are dropped.
pub struct Detacher {
    epoll: Epoll,
}

impl Detacher {
    /// Removes a registration (see [`Poller::delete`]).
    pub fn delete(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.epoll.delete(fd).map_err(io_err)
    }
}

impl Poller {
    pub fn new() -> io::Result<Self> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io_err)?;
        Ok(Poller { epoll })
    }

    pub fn add(&self, fd: BorrowedFd<'_>, token: u64, interest: Interest) -> io::Result<()> {
        self.epoll
            .add(fd, EpollEvent::new(interest.flags(), token))
            .map_err(io_err)
    }

    pub fn modify(&self, fd: BorrowedFd<'_>, token: u64, interest: Interest) -> io::Result<()> {
        let mut ev = EpollEvent::new(interest.flags(), token);
        self.epoll.modify(fd, &mut ev).map_err(io_err)
    }

    /// A second handle on this instance, for another thread.
    pub fn detacher(&self) -> io::Result<Detacher> {
        Ok(Detacher {
            epoll: Epoll(self.epoll.0.try_clone()?),
        })
    }

    /// Removes a registration. Needed before closing a descriptor whose file another process
    /// still holds (a hand-over): epoll forgets a registration only when the file itself is
    /// released, so a closed descriptor would keep reporting events otherwise.
    pub fn delete(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.epoll.delete(fd).map_err(io_err)
    }

    /// Waits up to `timeout` (`None`: until an event). `EINTR` counts as zero events. After any
    /// error the array holds zero events, so a caller cannot handle the previous wait's again.
    ///
    /// The timeout is kept to the microsecond with `epoll_pwait2` (Linux 5.11): `epoll_wait`
    /// takes milliseconds, and rounding up (so that a 0.4 ms wait does not become a busy poll)
    /// makes every timed wake-up up to a millisecond late, which an open-loop load generator
    /// would count as latency. Older kernels fall back to `epoll_wait`.
    pub fn wait(&self, events: &mut Events, timeout: Option<Duration>) -> io::Result<usize> {
        events.len = 0;
        let slots = &mut events.buf[..events.cap];
        let result = match timeout {
            Some(d) if PWAIT2.load(Ordering::Relaxed) => match pwait2(&self.epoll, slots, d) {
                Err(nix::Error::ENOSYS) => {
                    PWAIT2.store(false, Ordering::Relaxed);
                    self.epoll.wait(slots, ms_timeout(Some(d)))
                }
                r => r,
            },
            _ => self.epoll.wait(slots, ms_timeout(timeout)),
        };
        match result {
            Ok(n) => {
                events.len = n;
                Ok(n)
            }
            Err(nix::Error::EINTR) => Ok(0),
            Err(e) => Err(io_err(e)),
        }
    }
}

/// Whether `epoll_pwait2` is worth trying (cleared at the first `ENOSYS`).
static PWAIT2: AtomicBool = AtomicBool::new(true);

/// `epoll_wait`'s millisecond timeout, rounded up: a 0.4 ms wait must not become a busy poll.
fn ms_timeout(timeout: Option<Duration>) -> EpollTimeout {
    match timeout {
        None => EpollTimeout::NONE,
        Some(d) => {
            let ms = d.as_micros().div_ceil(1000).min(i32::MAX as u128);
            EpollTimeout::try_from(ms as u32).unwrap_or(EpollTimeout::MAX)
        }
    }
}

/// `epoll_pwait2` with no signal mask: `epoll_wait` with a nanosecond timeout.
fn pwait2(epoll: &Epoll, events: &mut [EpollEvent], timeout: Duration) -> nix::Result<usize> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: the epoll descriptor is open (borrowed from `epoll`); `events` is a writable array
    // of `events.len()` `epoll_event`s (EpollEvent is repr(transparent) over it) that the kernel
    // fills at most that far; `ts` outlives the call; a null mask leaves the signal mask alone
    // (the size argument is then unused). The raw syscall needs no glibc 2.35 symbol.
    let n = unsafe {
        libc::syscall(
            libc::SYS_epoll_pwait2,
            epoll.0.as_raw_fd(),
            events.as_mut_ptr().cast::<libc::epoll_event>(),
            events.len().min(i32::MAX as usize) as libc::c_int,
            &ts as *const libc::timespec,
            std::ptr::null::<libc::sigset_t>(),
            8usize,
        )
    };
    if n < 0 {
        Err(nix::Error::last())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    #[test]
    fn the_peers_fin_is_reported_with_the_data() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        client.write_all(b"last words").unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let poller = Poller::new().unwrap();
        let interest = Interest {
            read: true,
            write: false,
            edge: true,
        };
        poller.add(server.as_fd(), 7, interest).unwrap();
        let mut events = Events::with_capacity(4);
        let n = poller
            .wait(&mut events, Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(n, 1);
        let ev = events.get(0);
        assert_eq!(ev.token, 7);
        assert!(ev.readable && ev.read_closed, "{ev:?}");
        // A wait that returns nothing leaves nothing to handle.
        let quiet = Poller::new().unwrap();
        assert_eq!(quiet.wait(&mut events, Some(Duration::ZERO)).unwrap(), 0);
        assert_eq!(events.len(), 0);
    }

    #[test]
    fn a_failed_wait_leaves_no_stale_events() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let poller = Poller::new().unwrap();
        let interest = Interest {
            read: true,
            write: false,
            edge: false,
        };
        poller.add(listener.as_fd(), 1, interest).unwrap();
        let mut events = Events::with_capacity(4);
        assert_eq!(
            poller
                .wait(&mut events, Some(Duration::from_secs(5)))
                .unwrap(),
            1
        );
        // An array epoll_wait refuses (EINVAL for zero slots) makes the next wait fail.
        events.cap = 0;
        assert!(poller.wait(&mut events, Some(Duration::ZERO)).is_err());
        assert_eq!(
            events.len(),
            0,
            "the last wait's events are not handled again"
        );
    }
}
