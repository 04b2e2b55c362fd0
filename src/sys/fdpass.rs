//! Descriptor passing over a Unix stream socket (`SCM_RIGHTS`), the peer's credentials
//! (`SO_PEERCRED`), and the process-level calls of a hand-over (the control socket's owner, a
//! test's self-kill).
//!
//! Used by the hand-over's control thread (old process) and its taking side (new process), never
//! by a shard's event loop. A stream socket has no message boundaries, so the caller frames its
//! bytes itself; the descriptors of one [`send`] travel with that call's first byte, and
//! [`recv`] appends every descriptor it receives to the caller's queue in arrival order. The
//! kernel hands over at most [`MAX_FDS`] descriptors per call (`SCM_MAX_FD`), and one `recvmsg`
//! never returns the descriptors of two sends, so a buffer sized for [`MAX_FDS`] is never
//! truncated unless the process is out of descriptors, which [`recv`] reports as an error.
#![allow(unsafe_code)]

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{
    self as sock, getsockopt, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
};

use super::io_err;

/// The most descriptors one `sendmsg` may carry (the kernel's `SCM_MAX_FD`).
pub const MAX_FDS: usize = 253;

/// Sends `data` with `fds` attached; returns how many bytes went (the caller sends the rest
/// with [`send`] and no descriptors). Blocking unless the socket is not; `EINTR` is retried.
/// `MSG_NOSIGNAL`: a gone peer is `EPIPE`, not a signal.
pub fn send(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    debug_assert!(fds.len() <= MAX_FDS);
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let iov = [IoSlice::new(data)];
    let cmsgs = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsgs };
    loop {
        match sock::sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) => return Ok(n),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(io_err(e)),
        }
    }
}

/// Sends all of `data` (its first bytes carrying `fds`).
pub fn send_all(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let mut sent = send(sock, data, fds)?;
    while sent < data.len() {
        let n = send(sock, &data[sent..], &[])?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        sent += n;
    }
    Ok(())
}

/// Receives into `buf`, appending the descriptors that came with the bytes to `fds`
/// (close-on-exec). `Ok(0)`: end of stream. A read timeout (`SO_RCVTIMEO`) is `WouldBlock`.
pub fn recv(sock: BorrowedFd<'_>, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    loop {
        let mut iov = [IoSliceMut::new(buf)];
        let msg = match sock::recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(io_err(e)),
        };
        let bytes = msg.bytes;
        // MSG_CTRUNC: the kernel could not give every descriptor (out of descriptors here); the
        // ones it could not install are closed, so what arrived no longer matches the bytes.
        let cmsgs = msg.cmsgs().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "descriptors were lost in transit (out of descriptors?)",
            )
        })?;
        for cmsg in cmsgs {
            if let ControlMessageOwned::ScmRights(received) = cmsg {
                for raw in received {
                    // SAFETY: the kernel installed `raw` in this process for this message; it
                    // is open and nothing else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                }
            }
        }
        return Ok(bytes);
    }
}

/// The uid and pid of the process at the other end of a connected Unix socket.
pub fn peer(sock: BorrowedFd<'_>) -> io::Result<(u32, i32)> {
    let cred = getsockopt(&sock, sockopt::PeerCredentials).map_err(io_err)?;
    Ok((cred.uid(), cred.pid()))
}

/// This process's effective uid.
pub fn own_uid() -> u32 {
    // SAFETY: geteuid takes no arguments, touches no memory and cannot fail.
    unsafe { libc::geteuid() }
}

/// Ends this process at once with SIGKILL, as an operator's `kill -9` would: the hand-over tests
/// use it to crash the new process at a chosen point.
pub fn kill_self() -> ! {
    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    // SIGKILL cannot be caught; if raise itself failed, end without unwinding either.
    std::process::abort()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn descriptors_travel_with_their_bytes_in_order() {
        let (a, b) = UnixStream::pair().unwrap();
        let (p1, mut q1) = UnixStream::pair().unwrap();
        let (p2, mut q2) = UnixStream::pair().unwrap();
        send_all(a.as_fd(), b"first", &[p1.as_fd()]).unwrap();
        send_all(a.as_fd(), b"second", &[p2.as_fd(), p1.as_fd()]).unwrap();
        send_all(a.as_fd(), b"plain", &[]).unwrap();
        drop(a);
        let mut fds = Vec::new();
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        loop {
            let n = recv(b.as_fd(), &mut buf, &mut fds).unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"firstsecondplain");
        assert_eq!(fds.len(), 3);
        // Each received descriptor is the same socket as the one sent.
        let via = |fd: &OwnedFd, q: &mut UnixStream, msg: &[u8]| {
            let mut s = UnixStream::from(fd.try_clone().unwrap());
            s.write_all(msg).unwrap();
            let mut back = vec![0u8; msg.len()];
            q.read_exact(&mut back).unwrap();
            assert_eq!(back, msg);
        };
        via(&fds[0], &mut q1, b"one");
        via(&fds[1], &mut q2, b"two");
        via(&fds[2], &mut q1, b"three");
    }

    #[test]
    fn the_peer_is_this_process() {
        let (a, _b) = UnixStream::pair().unwrap();
        let (uid, pid) = peer(a.as_fd()).unwrap();
        assert_eq!(uid, own_uid());
        assert_eq!(pid as u32, std::process::id());
    }
}
