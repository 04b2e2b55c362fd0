//! The readiness announcement: once `shardnet serve` listens, it sends one sd_notify datagram to
//! `$NOTIFY_SOCKET` that says it is ready, its pid and where every listener is bound, so that a
//! supervisor, a test or `bench --spawn` learns the addresses (port 0 picks a free one) from a
//! channel made for that, not from the wording of a log line.
//!
//! ```text
//! READY=1
//! MAINPID=4242
//! STATUS=listening: echo 127.0.0.1:7000, http 127.0.0.1:8080
//! SHARDNET_LISTENER=echo 127.0.0.1:7000
//! SHARDNET_LISTENER=http 127.0.0.1:8080
//! ```
//!
//! systemd reads `READY`, `MAINPID` and `STATUS` (shown by `systemctl status`) and ignores
//! variables it does not know. One `SHARDNET_LISTENER=NAME ADDR` line per listener, in
//! configuration order; an address has no space, so the name is everything before the last one
//! (a backslash or newline in a name is written `\\` or `\n`).
//!
//! The receiving side is [`ReadyListener`]: an abstract Unix datagram socket (no file to clean
//! up) whose name goes into the child's `NOTIFY_SOCKET`. Sender: the `serve` main thread, after
//! every listener is bound. Receiver: whoever started the process, on its own thread.

use std::io;
use std::net::SocketAddr;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{self, UnixDatagram};
use std::time::{Duration, Instant};

/// The variable carrying one listener.
pub const LISTENER_VAR: &str = "SHARDNET_LISTENER";

/// What a ready server announces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    pub pid: u32,
    /// Listener name and bound address, in configuration order.
    pub listeners: Vec<(String, SocketAddr)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadyError {
    #[error("readiness socket: {0}")]
    Io(#[from] io::Error),
    #[error("the server exited before it was ready ({0})")]
    Exited(String),
    #[error("the server did not announce readiness within {0:?}")]
    Timeout(Duration),
    #[error("malformed readiness announcement: {0}")]
    Malformed(String),
}

impl Ready {
    /// This process, with `listeners`.
    pub fn of_this_process(listeners: &[(String, SocketAddr)]) -> Ready {
        Ready {
            pid: std::process::id(),
            listeners: listeners.to_vec(),
        }
    }

    /// The sd_notify datagram.
    pub fn message(&self) -> String {
        let status: Vec<String> = self
            .listeners
            .iter()
            .map(|(n, a)| format!("{} {a}", escape(n)))
            .collect();
        let mut m = format!(
            "READY=1\nMAINPID={}\nSTATUS=listening: {}\n",
            self.pid,
            status.join(", ")
        );
        for (name, addr) in &self.listeners {
            m.push_str(&format!("{LISTENER_VAR}={} {addr}\n", escape(name)));
        }
        m
    }

    /// Reads an announcement; `Ok(None)` for another state (`RELOADING=1`, `STOPPING=1`, or the
    /// plain `READY=1` that ends a reload).
    pub fn parse(message: &str) -> Result<Option<Ready>, ReadyError> {
        let mut ready = false;
        let (mut pid, mut listeners) = (None, Vec::new());
        for line in message.lines() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            match key {
                "READY" => ready = value == "1",
                "MAINPID" => {
                    pid = Some(value.parse().map_err(|_| {
                        ReadyError::Malformed(format!("MAINPID `{value}` is not a pid"))
                    })?)
                }
                LISTENER_VAR => {
                    let (name, addr) = value
                        .rsplit_once(' ')
                        .ok_or_else(|| ReadyError::Malformed(format!("{LISTENER_VAR}={value}")))?;
                    let addr = addr.parse().map_err(|_| {
                        ReadyError::Malformed(format!("`{addr}` is not a socket address"))
                    })?;
                    listeners.push((unescape(name), addr));
                }
                _ => {}
            }
        }
        Ok(match (ready, pid) {
            (true, Some(pid)) => Some(Ready { pid, listeners }),
            _ => None,
        })
    }

    /// The address of the listener called `name`.
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
    }
}

fn escape(name: &str) -> String {
    name.replace('\\', "\\\\").replace('\n', "\\n")
}

fn unescape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut chars = name.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        out.push(match chars.next() {
            Some('n') => '\n',
            Some(other) => other,
            None => '\\',
        });
    }
    out
}

/// The socket a starter listens on for its child's announcement.
pub struct ReadyListener {
    sock: UnixDatagram,
    name: String,
}

impl ReadyListener {
    /// Binds a fresh abstract socket (unique per process and call).
    pub fn bind() -> io::Result<ReadyListener> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!(
            "shardnet-ready-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let sock = UnixDatagram::bind_addr(&net::SocketAddr::from_abstract_name(name.as_bytes())?)?;
        Ok(ReadyListener { sock, name })
    }

    /// The value for the child's `NOTIFY_SOCKET` (`@` marks an abstract socket).
    pub fn notify_socket(&self) -> String {
        format!("@{}", self.name)
    }

    /// The next datagram within `within`; `Ok(None)` when none came.
    pub fn recv(&self, within: Duration) -> Result<Option<String>, ReadyError> {
        self.sock
            .set_read_timeout(Some(within.max(Duration::from_millis(1))))?;
        let mut buf = vec![0u8; 64 * 1024];
        match self.sock.recv(&mut buf) {
            Ok(n) => Ok(Some(String::from_utf8_lossy(&buf[..n]).into_owned())),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Waits (at most `within`) for the announcement. `exited` tells whether the child has
    /// ended (with its status), so that a server that fails at start is reported at once rather
    /// than after the whole wait; it is asked between reads, every 100 ms at most.
    pub fn wait(
        &self,
        within: Duration,
        mut exited: impl FnMut() -> Option<String>,
    ) -> Result<Ready, ReadyError> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ReadyError::Timeout(within));
            }
            if let Some(message) = self.recv(left.min(Duration::from_millis(100)))? {
                if let Some(ready) = Ready::parse(&message)? {
                    return Ok(ready);
                }
            } else if let Some(status) = exited() {
                return Err(ReadyError::Exited(status));
            }
        }
    }

    /// Waits (at most `within`) for a datagram whose lines include `state` (e.g. `READY=1` at the
    /// end of a reload, `STOPPING=1`); returns the whole datagram.
    pub fn wait_for(&self, state: &str, within: Duration) -> Result<String, ReadyError> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ReadyError::Timeout(within));
            }
            if let Some(message) = self.recv(left)? {
                if message.lines().any(|l| l == state) {
                    return Ok(message);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_announcement_round_trips() {
        let ready = Ready {
            pid: 4242,
            listeners: vec![
                ("echo".into(), "127.0.0.1:7000".parse().unwrap()),
                ("public http".into(), "[::1]:8080".parse().unwrap()),
                ("odd\\name\nx".into(), "127.0.0.1:1".parse().unwrap()),
            ],
        };
        let m = ready.message();
        assert!(m.starts_with("READY=1\nMAINPID=4242\n"), "{m}");
        assert!(m.contains("SHARDNET_LISTENER=echo 127.0.0.1:7000\n"), "{m}");
        assert_eq!(m.lines().count(), 6, "a name's newline stays escaped: {m}");
        assert_eq!(Ready::parse(&m).unwrap(), Some(ready.clone()));
        assert_eq!(ready.addr("public http"), "[::1]:8080".parse().ok());
    }

    #[test]
    fn other_states_are_not_an_announcement() {
        for m in ["RELOADING=1", "READY=1", "STOPPING=1", ""] {
            assert_eq!(Ready::parse(m).unwrap(), None, "{m}");
        }
        assert!(Ready::parse("READY=1\nMAINPID=x\n").is_err());
        assert!(Ready::parse("READY=1\nMAINPID=1\nSHARDNET_LISTENER=a nowhere\n").is_err());
    }

    #[test]
    fn the_listener_receives_what_notify_sends() {
        let l = ReadyListener::bind().unwrap();
        let ready = Ready::of_this_process(&[("echo".into(), "127.0.0.1:9".parse().unwrap())]);
        crate::sys::notify::notify_to(&l.notify_socket(), "RELOADING=1").unwrap();
        crate::sys::notify::notify_to(&l.notify_socket(), &ready.message()).unwrap();
        let got = l.wait(Duration::from_secs(5), || None).unwrap();
        assert_eq!(got, ready);
        crate::sys::notify::notify_to(&l.notify_socket(), "STOPPING=1").unwrap();
        assert_eq!(
            l.wait_for("STOPPING=1", Duration::from_secs(5)).unwrap(),
            "STOPPING=1"
        );
    }

    #[test]
    fn a_child_that_exits_is_reported_at_once() {
        let l = ReadyListener::bind().unwrap();
        let start = Instant::now();
        let e = l
            .wait(Duration::from_secs(30), || Some("exit status: 2".into()))
            .unwrap_err();
        assert!(matches!(e, ReadyError::Exited(_)), "{e}");
        assert!(start.elapsed() < Duration::from_secs(5));
        let e = l.wait(Duration::from_millis(150), || None).unwrap_err();
        assert!(matches!(e, ReadyError::Timeout(_)), "{e}");
    }
}
