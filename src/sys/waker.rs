//! A cross-thread wake-up: an eventfd registered in the owner's epoll plus a "pending" flag.
//!
//! Any thread may call [`Waker::wake`]; only the owner calls [`Waker::reset`]. The flag makes a
//! burst of wakes cost one `write(2)` until the owner has run: the owner clears it *before*
//! draining its channels, so a message sent after the drain always produces a fresh wake.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
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

    /// Wakes the owner unless a wake is already pending. Returns whether a syscall was made.
    pub fn wake(&self) -> bool {
        if self.inner.pending.swap(true, Ordering::AcqRel) {
            return false;
        }
        // EAGAIN only if the counter would overflow, which needs 2^64 wakes: nothing to do then.
        let _ = self.inner.fd.write(1);
        true
    }

    /// Owner only: consume the wake before draining the channels it announces.
    pub fn reset(&self) {
        let _ = self.inner.fd.read();
        self.inner.pending.store(false, Ordering::Release);
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.inner.fd.as_fd()
    }
}
