//! Sockets: listeners, `accept4`, non-blocking reads and writes, half-close.
//!
//! Reads and writes return `Io` so the engine can treat `WouldBlock` as control flow without
//! allocating an `io::Error`.
#![allow(unsafe_code)]

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{
    self as sock, setsockopt, sockopt, AddressFamily, Backlog, Shutdown, SockFlag, SockType,
    SockaddrStorage,
};

use super::io_err;

/// The result of one non-blocking read or write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Io {
    /// This many bytes moved; for a read, 0 means end of stream.
    Done(usize),
    /// Not ready: wait for readiness.
    WouldBlock,
    /// The connection failed (reset, broken pipe, ...): close it. The raw `errno`.
    Failed(i32),
}

/// Why `accept4` returned no connection, in the classes a caller acts on (as actix-server and
/// memcached split them): nothing pending, retry at once, skip one connection, or pause.
#[derive(Debug)]
pub enum AcceptError {
    /// Nothing pending (`EAGAIN`).
    WouldBlock,
    /// A signal interrupted the call (`EINTR`): retry.
    Interrupted,
    /// The error concerned one connection only (it was aborted, refused by a firewall rule, or
    /// carries a pending network error, which Linux reports through `accept`): skip it.
    PerConnection(io::Error),
    /// The process or the system ran out of descriptors or memory (`EMFILE`, `ENFILE`,
    /// `ENOBUFS`, `ENOMEM`): pause accepting, the pending connections wait in the backlog.
    Exhausted(io::Error),
    /// Anything else: treated like exhaustion rather than spun on.
    Unknown(io::Error),
}

impl AcceptError {
    fn classify(e: Errno) -> AcceptError {
        match e {
            Errno::EAGAIN => AcceptError::WouldBlock,
            Errno::EINTR => AcceptError::Interrupted,
            // accept(2): "Linux accept() passes already-pending network errors on the new socket
            // as an error code from accept() ... should be treated like EAGAIN by retrying."
            Errno::ECONNABORTED
            | Errno::EPROTO
            | Errno::EPERM
            | Errno::ENETDOWN
            | Errno::ENOPROTOOPT
            | Errno::EHOSTDOWN
            | Errno::ENONET
            | Errno::EHOSTUNREACH
            | Errno::EOPNOTSUPP
            | Errno::ENETUNREACH => AcceptError::PerConnection(io_err(e)),
            Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM => {
                AcceptError::Exhausted(io_err(e))
            }
            _ => AcceptError::Unknown(io_err(e)),
        }
    }
}

/// Opens a non-blocking listening socket.
pub fn listen(addr: SocketAddr, backlog: u32, reuse_port: bool) -> io::Result<TcpListener> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = sock::socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io_err)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(io_err)?;
    if reuse_port {
        setsockopt(&fd, sockopt::ReusePort, &true).map_err(io_err)?;
    }
    if addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true).map_err(io_err)?;
    }
    sock::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)).map_err(io_err)?;
    // The kernel caps the backlog at net.core.somaxconn; nix refuses values above the libc
    // constant (4096), so larger ones ask for the kernel's maximum.
    let backlog = if backlog as i64 > libc::SOMAXCONN as i64 {
        Backlog::MAXALLOWABLE
    } else {
        Backlog::new(backlog as i32).map_err(io_err)?
    };
    sock::listen(&fd, backlog).map_err(io_err)?;
    Ok(TcpListener::from(fd))
}

/// Whether a socket has SO_REUSEPORT (so more listeners can bind its port): asked of an
/// inherited listener.
pub fn has_reuse_port(fd: BorrowedFd<'_>) -> bool {
    sock::getsockopt(&fd, sockopt::ReusePort).unwrap_or(false)
}

/// Accepts one connection, non-blocking and close-on-exec, with `TCP_NODELAY` set.
pub fn accept(listener: BorrowedFd<'_>) -> Result<OwnedFd, AcceptError> {
    let raw = sock::accept4(
        listener.as_raw_fd(),
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
    )
    .map_err(AcceptError::classify)?;
    // SAFETY: accept4 just returned this descriptor; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // Small request/response exchanges must not wait for Nagle; a failure here is harmless.
    let _ = setsockopt(&fd, sockopt::TcpNoDelay, &true);
    Ok(fd)
}

/// Connects (blocking) to `dst`, from `src` when given (spreading a load generator over source
/// addresses: each has its own ~28k ephemeral ports), and returns the socket non-blocking with
/// `TCP_NODELAY`, ready for the engine.
pub fn connect_from(
    dst: SocketAddr,
    src: Option<std::net::IpAddr>,
    timeout: std::time::Duration,
) -> io::Result<OwnedFd> {
    let Some(src) = src else {
        return adopt_stream(TcpStream::connect_timeout(&dst, timeout)?);
    };
    let family = if dst.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd =
        sock::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).map_err(io_err)?;
    // Let the kernel pick the port per destination (IP_BIND_ADDRESS_NO_PORT): a bind to port 0
    // would otherwise reserve a port for every destination at once.
    let _ = setsockopt(&fd, sockopt::IpBindAddressNoPort, &true);
    sock::bind(
        fd.as_raw_fd(),
        &SockaddrStorage::from(SocketAddr::new(src, 0)),
    )
    .map_err(io_err)?;
    sock::connect(fd.as_raw_fd(), &SockaddrStorage::from(dst)).map_err(io_err)?;
    adopt_stream(TcpStream::from(fd))
}

/// Prepares a connected client socket (the load generator's) for the engine.
pub fn adopt_stream(stream: TcpStream) -> io::Result<OwnedFd> {
    stream.set_nonblocking(true)?;
    stream.set_nodelay(true)?;
    Ok(OwnedFd::from(stream))
}

#[inline]
pub fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Io {
    loop {
        // recv/send rather than read/write: the socket calls skip the VFS layer (file position
        // lock, rw_verify_area) on every call; MSG_NOSIGNAL turns a write to a reset
        // connection into EPIPE instead of SIGPIPE.
        match sock::recv(fd.as_raw_fd(), buf, sock::MsgFlags::empty()) {
            Ok(n) => return Io::Done(n),
            Err(Errno::EAGAIN) => return Io::WouldBlock,
            Err(Errno::EINTR) => continue,
            Err(e) => return Io::Failed(e as i32),
        }
    }
}

#[inline]
pub fn write(fd: BorrowedFd<'_>, buf: &[u8]) -> Io {
    loop {
        match sock::send(fd.as_raw_fd(), buf, sock::MsgFlags::MSG_NOSIGNAL) {
            Ok(n) => return Io::Done(n),
            Err(Errno::EAGAIN) => return Io::WouldBlock,
            Err(Errno::EINTR) => continue,
            Err(e) => return Io::Failed(e as i32),
        }
    }
}

/// Sends FIN: the peer sees end of stream once it has read everything before it.
pub fn shutdown_write(fd: BorrowedFd<'_>) {
    // ENOTCONN when the peer is already gone: the close that follows is all that is left.
    let _ = sock::shutdown(fd.as_raw_fd(), Shutdown::Write);
}

/// Local address of a listener.
pub fn local_addr(fd: &impl AsFd) -> io::Result<SocketAddr> {
    let addr: SockaddrStorage = sock::getsockname(fd.as_fd().as_raw_fd()).map_err(io_err)?;
    inet(addr)
}

/// The peer's address of a connected socket (asked of the kernel, not stored per connection).
pub fn peer_addr(fd: BorrowedFd<'_>) -> io::Result<SocketAddr> {
    let addr: SockaddrStorage = sock::getpeername(fd.as_raw_fd()).map_err(io_err)?;
    inet(addr)
}

fn inet(addr: SockaddrStorage) -> io::Result<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Ok(SocketAddr::V4((*v4).into()));
    }
    if let Some(v6) = addr.as_sockaddr_in6() {
        return Ok(SocketAddr::V6((*v6).into()));
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "not an IP socket",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_errors_fall_into_their_classes() {
        use AcceptError as A;
        assert!(matches!(A::classify(Errno::EAGAIN), A::WouldBlock));
        assert!(matches!(A::classify(Errno::EINTR), A::Interrupted));
        for e in [
            Errno::ECONNABORTED,
            Errno::EPERM,
            Errno::EPROTO,
            Errno::ENETUNREACH,
        ] {
            assert!(matches!(A::classify(e), A::PerConnection(_)), "{e}");
        }
        for e in [Errno::EMFILE, Errno::ENFILE, Errno::ENOBUFS, Errno::ENOMEM] {
            assert!(matches!(A::classify(e), A::Exhausted(_)), "{e}");
        }
        assert!(matches!(A::classify(Errno::EBADF), A::Unknown(_)));
    }

    #[test]
    fn peer_and_local_addresses() {
        let listener = listen("127.0.0.1:0".parse().unwrap(), 16, false).unwrap();
        let addr = local_addr(&listener).unwrap();
        let client = TcpStream::connect(addr).unwrap();
        let mut accepted = None;
        for _ in 0..1000 {
            match accept(listener.as_fd()) {
                Ok(fd) => {
                    accepted = Some(fd);
                    break;
                }
                Err(AcceptError::WouldBlock) => {
                    std::thread::sleep(std::time::Duration::from_millis(1))
                }
                Err(e) => panic!("{e:?}"),
            }
        }
        let fd = accepted.expect("accepted within a second");
        assert_eq!(peer_addr(fd.as_fd()).unwrap(), client.local_addr().unwrap());
    }
}
