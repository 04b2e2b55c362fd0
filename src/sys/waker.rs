//! A cross-thread wake-up: an eventfd registered in the owner's epoll plus a "pending" flag.
//!
//! Any thread may call [`Waker::wake`]; only the owner calls the others. The flag makes wakes
//! cost a `write(2)` only when the owner may be asleep: it is set while the owner is awake (it
//! looks at its channels before it sleeps again, so a message sent meanwhile needs no write) and
//! by the first wake after the owner said it is going to sleep ([`Waker::arm`]). The owner arms,
//! then looks at its channels once more (a message sent just before the arm was not announced),
//! then sleeps; a wake after the arm finds the flag clear and writes. Both sides order their
//! store before their load with a sequentially consistent fence (the classic two-flag
//! handshake), so a message is never left unannounced while the owner sleeps.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;

use nix::sys::eventfd::{EfdFlags, EventFd};

use super::io_err;

#[derive(Clone)]
pub struct Waker {
    inner: Arc<Inner>,
}

struct Inner {
    fd: EventFd,
    pending: AtomicBool,
}

impl Waker {
    pub fn new() -> io::Result<Self> {
        let fd =
            EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC).map_err(io_err)?;
        Ok(Waker {
            inner: Arc::new(Inner {
                fd,
                pending: AtomicBool::new(false),
            }),
        })
    }

    /// Wakes the owner unless it is awake or a wake is already pending (the message sent
    /// before this call is then seen without one). Returns whether a syscall was made.
    pub fn wake(&self) -> bool {
        // The message this wake announces is stored before the flag is read.
        fence(Ordering::SeqCst);
        if self.inner.pending.swap(true, Ordering::SeqCst) {
            return false;
        }
        // EAGAIN only if the counter would overflow, which needs 2^64 wakes: nothing to do then.
        let _ = self.inner.fd.write(1);
        true
    }

    /// Owner only, before it sleeps: from now on a wake writes the eventfd. The owner must then
    /// look at its channels once more before sleeping.
    pub fn arm(&self) {
        self.inner.pending.store(false, Ordering::SeqCst);
        // The flag is stored before the channels are read.
        fence(Ordering::SeqCst);
    }

    /// Owner only, once awake (or when it decides not to sleep after all): wakes are skipped
    /// until the next [`Waker::arm`].
    pub fn disarm(&self) {
        self.inner.pending.store(true, Ordering::SeqCst);
    }

    /// Owner only: consumes the eventfd's count after it reported readable.
    pub fn consume(&self) {
        let _ = self.inner.fd.read();
    }

    /// Owner only: consume the wake before draining the channels it announces (for an owner
    /// that drains only when woken: the next message wakes again).
    pub fn reset(&self) {
        let _ = self.inner.fd.read();
        self.inner.pending.store(false, Ordering::Release);
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.inner.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::poller::{Events, Interest, Poller};
    use std::time::{Duration, Instant};

    #[test]
    fn a_wake_writes_only_while_the_owner_is_armed() {
        let w = Waker::new().unwrap();
        w.disarm();
        assert!(!w.wake(), "awake owner: no system call");
        w.arm();
        assert!(w.wake(), "armed owner: one write");
        assert!(!w.wake(), "then one is pending");
        w.consume();
        w.disarm();
        assert!(!w.wake());
    }

    /// The owner's loop as a shard runs it: arm, look at the channel, sleep, disarm, drain.
    /// However the sender's messages fall against it, none waits for the owner's timeout.
    #[test]
    fn no_message_is_left_unannounced_while_the_owner_sleeps() {
        const MESSAGES: u32 = 20_000;
        let w = Waker::new().unwrap();
        let poller = Poller::new().unwrap();
        let interest = Interest {
            read: true,
            write: false,
            edge: false,
        };
        poller.add(w.fd(), 1, interest).unwrap();
        let (tx, rx) = crossbeam_channel::unbounded::<u32>();
        let sender = {
            let w = w.clone();
            std::thread::spawn(move || {
                for i in 0..MESSAGES {
                    tx.send(i).unwrap();
                    w.wake();
                    if i % 64 == 0 {
                        std::thread::yield_now();
                    }
                }
            })
        };
        let mut events = Events::with_capacity(4);
        let mut got = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        while got < MESSAGES {
            assert!(Instant::now() < deadline, "stuck at {got}");
            let mut timeout = Some(Duration::from_secs(5));
            w.arm();
            if !rx.is_empty() {
                w.disarm();
                timeout = Some(Duration::ZERO);
            }
            let started = Instant::now();
            poller.wait(&mut events, timeout).unwrap();
            w.disarm();
            // Sleeping out the timeout while a message waited would be a lost wake.
            assert!(
                started.elapsed() < Duration::from_secs(4),
                "slept {:?} with {} messages waiting",
                started.elapsed(),
                rx.len()
            );
            if events.len() > 0 {
                w.consume();
            }
            while rx.try_recv().is_ok() {
                got += 1;
            }
        }
        sender.join().unwrap();
    }
}
