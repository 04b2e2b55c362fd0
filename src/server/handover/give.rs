//! The old process's side: the control socket, the thread that serves it, and one hand-over
//! session.
//!
//! The control thread (`control`) owns the listening Unix socket (mode 0600, only the server's
//! own user or root may talk to it: `SO_PEERCRED` is checked) and serves one connection at a
//! time. A connection opens with either `Hello` (a new process taking over: a session, run on
//! this thread to its end) or `Upgrade` (`shardnet upgrade` asking for a new process: the
//! request goes to the product as a [`ControlEvent`], and the asker waits for the outcome of
//! the session that follows). Everything else about the server it reaches through the shards'
//! control channels and the acceptor's, each step acknowledged.
//!
//! A session ends committed (the new process owns the listeners and the moved connections; the
//! thread reports [`ControlEvent::HandedOver`] and ends) or not (refused or failed: every lent
//! connection is restored, accepting resumes, and the thread waits for the next attempt). See
//! the ownership rule in `handover/mod.rs` for how the decision is made safely.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};

use super::wire::{self, FrameReader, Message, Offered, WireError};
use super::{ExportJob, HandoverError, COMMIT_TIMEOUT, EXPORT_TIMEOUT, STEP_TIMEOUT};
use crate::conn::{Token, TokenKind};
use crate::server::acceptor::AcceptorControl;
use crate::server::pool::control_all;
use crate::server::port::{Control, Handover, ShardPort};
use crate::stats::Stats;
use crate::sys::fdpass;
use crate::sys::poller::{Events, Interest, Poller};
use crate::sys::waker::Waker;

/// What the control thread tells the product.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlEvent {
    /// `shardnet upgrade` asks for a new process, with this configuration file (`None`: the one
    /// this process runs). The product starts it with `serve --takeover`; the session that
    /// follows answers the asker.
    UpgradeRequested {
        /// The new process's configuration file.
        config: Option<PathBuf>,
    },
    /// A hand-over committed: the new process (`pid`) owns the listeners and `connections`;
    /// `kept` connections could not move and are this process's to close gracefully. This
    /// process should now drain and exit.
    HandedOver {
        /// The new process.
        pid: u32,
        /// Connections it took.
        connections: u64,
        /// Connections that stayed here.
        kept: u64,
        /// From hello to commit.
        took: Duration,
    },
}

/// One listener as the server can offer it: second descriptors of its sockets.
pub(crate) struct OfferedSockets {
    pub name: String,
    pub addr: SocketAddr,
    pub reuse_port: bool,
    pub sockets: Vec<TcpListener>,
}

/// Everything a session needs of the server.
pub(crate) struct Giver {
    pub ports: Vec<ShardPort>,
    pub stats: Arc<Stats>,
    /// The acceptor's control channel and waker (`None` under reuseport: no acceptor).
    pub acceptor: Option<(Sender<AcceptorControl>, Waker)>,
    pub offer: Vec<OfferedSockets>,
    pub format: &'static str,
    pub hooks: super::Hooks,
}

/// The running control thread.
pub(crate) struct ControlThread {
    wake: Waker,
    shared: Arc<Shared>,
    handle: Option<JoinHandle<()>>,
}

/// What the server's thread and the control thread share.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    /// A second descriptor of the session's socket, to end a session from outside.
    session: Mutex<Option<UnixStream>>,
    /// The product's word that the process it started for an upgrade ended early.
    upgrade_failed: Mutex<Option<String>>,
}

impl ControlThread {
    /// Listens on `path` and starts the thread. `replace`: the path belongs to the process this
    /// one took over from, and is replaced even if that one still answers (it is finishing).
    pub fn start(
        path: &Path,
        replace: bool,
        giver: Giver,
    ) -> Result<(ControlThread, Receiver<ControlEvent>), HandoverError> {
        let sock_err = |source| HandoverError::Socket {
            path: path.display().to_string(),
            source,
        };
        let (listener, ino) = bind(path, replace).map_err(sock_err)?;
        listener.set_nonblocking(true).map_err(sock_err)?;
        let wake = Waker::new().map_err(sock_err)?;
        let shared = Arc::new(Shared::default());
        let (events_tx, events_rx) = unbounded();
        let mut thread = Thread {
            listener,
            path: path.to_path_buf(),
            ino,
            wake: wake.clone(),
            shared: shared.clone(),
            events: events_tx,
            giver,
            waiter: None,
        };
        let handle = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || thread.run())
            .map_err(sock_err)?;
        log::info!("control socket listening on {}", path.display());
        Ok((
            ControlThread {
                wake,
                shared,
                handle: Some(handle),
            },
            events_rx,
        ))
    }

    /// The process started for an upgrade ended before it took over: tell whoever asked.
    pub fn upgrade_failed(&self, why: String) {
        *self
            .shared
            .upgrade_failed
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(why);
        self.wake.wake();
    }

    /// Ends a session in progress (its connections come back unless it has committed), closes
    /// the socket and waits for the thread.
    pub fn stop(mut self) {
        self.shared.stop.store(true, Relaxed);
        if let Some(s) = &*self
            .shared
            .session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
        {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        self.wake.wake();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for ControlThread {
    fn drop(&mut self) {
        if self.handle.is_some() {
            self.shared.stop.store(true, Relaxed);
            self.wake.wake();
        }
    }
}

/// Binds the control socket: a socket file under a temporary name, made private (0600), then
/// renamed into place, so no one else can connect at any moment and no stale file is left half
/// replaced. A file already there is replaced if nothing answers on it (a process that is
/// gone), or with `replace`. Returns the socket and its file's inode.
fn bind(path: &Path, replace: bool) -> io::Result<(UnixListener, u64)> {
    if !replace && path.exists() && UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "a running server already listens there (take it over with `serve --takeover`)",
        ));
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.new", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let ino = std::fs::metadata(path)?.ino();
    Ok((listener, ino))
}

/// `shardnet upgrade`'s side: asks the server behind `path` for a hand-over to a new process
/// (with `config`, or its own), and waits up to `wait` for the outcome. `Ok`: the message of a
/// committed hand-over.
pub fn control_request(
    path: &Path,
    config: Option<&Path>,
    wait: Duration,
) -> Result<String, HandoverError> {
    let sock_err = |source| HandoverError::Socket {
        path: path.display().to_string(),
        source,
    };
    let stream = UnixStream::connect(path).map_err(sock_err)?;
    stream
        .set_write_timeout(Some(STEP_TIMEOUT))
        .map_err(sock_err)?;
    stream.set_read_timeout(Some(wait)).map_err(sock_err)?;
    let config = config.map_or_else(String::new, |p| p.display().to_string());
    fdpass::send_all(stream.as_fd(), &Message::Upgrade { config }.encode(), &[])
        .map_err(sock_err)?;
    match FrameReader::default().next(&stream)? {
        (Message::Outcome { ok: true, message }, _) => Ok(message),
        (Message::Outcome { ok: false, message }, _) => Err(HandoverError::Failed(message)),
        (Message::Refuse { reason }, _) => Err(HandoverError::Refused(reason)),
        (other, _) => Err(HandoverError::Unexpected {
            got: other.name(),
            want: "outcome",
        }),
    }
}

struct Thread {
    listener: UnixListener,
    path: PathBuf,
    ino: u64,
    wake: Waker,
    shared: Arc<Shared>,
    events: Sender<ControlEvent>,
    giver: Giver,
    /// The `shardnet upgrade` connection waiting for the outcome.
    waiter: Option<UnixStream>,
}

/// How a session ended.
enum Outcome {
    Committed {
        pid: u32,
        sent: u64,
        kept: u64,
        took: Duration,
    },
    /// Nothing happened (refused), or everything came back (failed).
    NotDone(String),
}

impl Thread {
    fn run(&mut self) {
        let committed = self.serve();
        drop(self.waiter.take());
        if !committed {
            // A plain shutdown: the socket file is ours to remove. After a hand-over it is left
            // alone, since the new process replaces it (removing it could race that).
            if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }

    /// Serves connections until stopped (false) or a hand-over committed (true).
    fn serve(&mut self) -> bool {
        let poller = match Poller::new() {
            Ok(p) => p,
            Err(e) => {
                log::error!("control socket: cannot start: {e}");
                return false;
            }
        };
        let level = |read| Interest {
            read,
            write: false,
            edge: false,
        };
        if poller
            .add(self.wake.fd(), Token::WAKER.0, level(true))
            .and_then(|()| poller.add(self.listener.as_fd(), Token::listener(0).0, level(true)))
            .is_err()
        {
            log::error!("control socket: cannot watch the socket");
            return false;
        }
        let mut events = Events::with_capacity(4);
        loop {
            if poller.wait(&mut events, None).is_err() {
                std::thread::sleep(Duration::from_millis(10));
            }
            for i in 0..events.len() {
                if Token(events.get(i).token).kind() == TokenKind::Waker {
                    self.wake.reset();
                }
            }
            if self.shared.stop.load(Relaxed) {
                return false;
            }
            let early_end = self
                .shared
                .upgrade_failed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(why) = early_end {
                self.answer(false, &why);
            }
            loop {
                let stream = match self.listener.accept() {
                    Ok((s, _)) => s,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        log::warn!("control socket: accept: {e}");
                        break;
                    }
                };
                if self.on_connection(stream) {
                    return true;
                }
                if self.shared.stop.load(Relaxed) {
                    return false;
                }
            }
        }
    }

    /// One connection on the control socket; true if it was a hand-over that committed.
    fn on_connection(&mut self, stream: UnixStream) -> bool {
        let setup = stream
            .set_nonblocking(false)
            .and_then(|()| stream.set_read_timeout(Some(STEP_TIMEOUT)))
            .and_then(|()| stream.set_write_timeout(Some(STEP_TIMEOUT)));
        if let Err(e) = setup {
            log::warn!("control socket: {e}");
            return false;
        }
        match fdpass::peer(stream.as_fd()) {
            Ok((uid, _)) if uid == fdpass::own_uid() || uid == 0 => {}
            Ok((uid, pid)) => {
                log::warn!(
                    "control socket: refused a connection from pid {pid} (uid {uid}): only this \
                     server's user may hand over"
                );
                return false;
            }
            Err(e) => {
                log::warn!("control socket: cannot tell who connected: {e}");
                return false;
            }
        }
        let mut reader = FrameReader::default();
        let first = match reader.next(&stream) {
            Ok((m, _)) => m,
            Err(e) => {
                log::warn!("control socket: no request: {e}");
                return false;
            }
        };
        match first {
            Message::Upgrade { config } => {
                if self.waiter.is_some() {
                    answer_on(&stream, false, "an upgrade is already under way");
                    return false;
                }
                let config = (!config.is_empty()).then(|| PathBuf::from(config));
                log::info!(
                    "upgrade requested ({}): starting a new process to take over",
                    config
                        .as_ref()
                        .map_or("this configuration".to_string(), |p| p
                            .display()
                            .to_string())
                );
                self.waiter = Some(stream);
                let _ = self.events.send(ControlEvent::UpgradeRequested { config });
                false
            }
            hello @ Message::Hello { .. } => {
                self.giver.stats.handover().sessions.inc();
                *self
                    .shared
                    .session
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = stream.try_clone().ok();
                let outcome = Session::new(&self.giver, stream, reader).run(hello);
                *self
                    .shared
                    .session
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = None;
                match outcome {
                    Outcome::Committed {
                        pid,
                        sent,
                        kept,
                        took,
                    } => {
                        let message = format!(
                            "handed over to pid {pid}: {sent} connections moved, {kept} kept \
                             (closed gracefully), in {took:?}"
                        );
                        self.answer(true, &message);
                        let _ = self.events.send(ControlEvent::HandedOver {
                            pid,
                            connections: sent,
                            kept,
                            took,
                        });
                        true
                    }
                    Outcome::NotDone(why) => {
                        self.giver.stats.handover().failed.inc();
                        self.answer(false, &why);
                        false
                    }
                }
            }
            other => {
                log::warn!(
                    "control socket: a connection opened with {} (expected hello or upgrade)",
                    other.name()
                );
                false
            }
        }
    }

    /// Tells a waiting `shardnet upgrade` how it ended.
    fn answer(&mut self, ok: bool, message: &str) {
        if let Some(w) = self.waiter.take() {
            answer_on(&w, ok, message);
        }
    }
}

fn answer_on(stream: &UnixStream, ok: bool, message: &str) {
    let frame = Message::Outcome {
        ok,
        message: message.to_string(),
    }
    .encode();
    let _ = fdpass::send_all(stream.as_fd(), &frame, &[]);
}

/// One hand-over, from `Hello` to commit or failure.
struct Session<'a> {
    giver: &'a Giver,
    stream: UnixStream,
    reader: FrameReader,
    started: Instant,
    /// Accepting is paused (to resume on failure).
    paused: bool,
    /// Connections were lent (to restore on failure).
    lent: bool,
    /// `End` was sent: a `Commit` may follow.
    ended: bool,
    /// The product's hooks were told the hand-over began (to tell them how it ended).
    begun: bool,
    /// What the new process gave back with its `Abort` ([`super::HandoverHooks::abandoned`]).
    returned: Vec<Vec<u8>>,
    pid: u32,
    job: Option<Arc<ExportJob>>,
}

/// Why a session step failed.
enum Stop {
    /// Before anything moved: say no, and why.
    Refuse(String),
    /// Something failed; everything comes back unless a `Commit` is found.
    Fail(String),
}

impl From<WireError> for Stop {
    fn from(e: WireError) -> Stop {
        Stop::Fail(e.to_string())
    }
}

impl<'a> Session<'a> {
    fn new(giver: &'a Giver, stream: UnixStream, reader: FrameReader) -> Session<'a> {
        Session {
            giver,
            stream,
            reader,
            started: Instant::now(),
            paused: false,
            lent: false,
            ended: false,
            begun: false,
            returned: Vec::new(),
            pid: 0,
            job: None,
        }
    }

    fn run(mut self, hello: Message) -> Outcome {
        match self.steps(hello) {
            Ok(taken) => self.commit(taken),
            Err(Stop::Refuse(why)) => {
                log::warn!("hand-over refused: {why}; this process keeps serving");
                self.send(&Message::Refuse {
                    reason: why.clone(),
                });
                Outcome::NotDone(format!("refused: {why}"))
            }
            Err(Stop::Fail(why)) => self.decide(why),
        }
    }

    fn send(&self, m: &Message) {
        let _ = fdpass::send_all(self.stream.as_fd(), &m.encode(), &[]);
    }

    fn write(&self, m: &Message, fds: &[BorrowedFd<'_>]) -> Result<(), Stop> {
        fdpass::send_all(self.stream.as_fd(), &m.encode(), fds)
            .map_err(|e| Stop::Fail(format!("writing {}: {e}", m.name())))
    }

    fn read(&mut self, want: &'static str) -> Result<Message, Stop> {
        loop {
            let (m, _) = self.reader.next(&self.stream)?;
            return match m {
                Message::Relay { data } => {
                    // Given back ahead of an abort: kept for the hooks.
                    self.returned.push(data);
                    continue;
                }
                Message::Abort { reason } => {
                    Err(Stop::Fail(format!("the new process gave up: {reason}")))
                }
                m if m.name() == want => Ok(m),
                other => Err(Stop::Fail(format!(
                    "the new process sent {} where {want} was expected",
                    other.name()
                ))),
            };
        }
    }

    /// Every step up to the `Commit`; returns what the new process says it took.
    fn steps(&mut self, hello: Message) -> Result<u64, Stop> {
        let Message::Hello {
            min,
            max,
            pid,
            format,
        } = hello
        else {
            return Err(Stop::Refuse("no hello".into()));
        };
        self.pid = pid;
        let (lo, hi) = (*wire::VERSIONS.start(), *wire::VERSIONS.end());
        let version = hi.min(max);
        if version < min || version < lo {
            return Err(Stop::Refuse(format!(
                "the new process (pid {pid}) understands hand-over versions {min} to {max}, this \
                 one {lo} to {hi}"
            )));
        }
        if format != self.giver.format {
            return Err(Stop::Refuse(format!(
                "the new process (pid {pid}) keeps connections in the format `{format}`, this one \
                 in `{}`",
                self.giver.format
            )));
        }
        let g = self.giver;
        let open: u64 = (0..g.stats.shard_count())
            .map(|s| g.stats.shard(s).open.get())
            .sum();
        log::info!(
            "hand-over: new process pid {pid} connected (version {version}); {open} connections \
             open here"
        );
        let offered = g
            .offer
            .iter()
            .map(|o| Offered {
                name: o.name.clone(),
                addr: o.addr.to_string(),
                sockets: o.sockets.len() as u16,
                reuse_port: o.reuse_port,
            })
            .collect();
        self.write(
            &Message::Welcome {
                version,
                pid: std::process::id(),
                shards: g.ports.len() as u32,
                connections: open,
                listeners: offered,
            },
            &[],
        )?;

        // Listeners.
        let Message::WantListeners { indices } = self.read("want-listeners")? else {
            unreachable!("read checks the kind")
        };
        let mut moving = vec![false; g.offer.len()];
        for &i in &indices {
            match moving.get_mut(i as usize) {
                Some(m) if !*m => *m = true,
                _ => {
                    return Err(Stop::Refuse(format!(
                        "asked for listener {i} twice or unknown"
                    )))
                }
            }
        }
        let wanted: Vec<&OfferedSockets> = indices.iter().map(|&i| &g.offer[i as usize]).collect();
        let fds: Vec<BorrowedFd<'_>> = wanted
            .iter()
            .flat_map(|o| o.sockets.iter().map(|s| s.as_fd()))
            .collect();
        if fds.len() > fdpass::MAX_FDS {
            return Err(Stop::Refuse(format!(
                "{} listening sockets are more than one message carries",
                fds.len()
            )));
        }
        let counts = wanted.iter().map(|o| o.sockets.len() as u16).collect();
        self.write(&Message::Listeners { counts }, &fds)?;
        let names: Vec<&str> = wanted.iter().map(|o| o.name.as_str()).collect();
        log::info!("hand-over: listeners passed: {}", names.join(", "));

        self.read("accepting")?;
        self.pause()?;
        // From here on the product holds what it must not deliver here alone (pub/sub).
        g.hooks.0.begin();
        self.begun = true;

        // Connections.
        let writer = self
            .stream
            .try_clone()
            .map_err(|e| Stop::Fail(format!("control socket: {e}")))?;
        let job = Arc::new(ExportJob::new(writer, moving));
        self.job = Some(job.clone());
        self.lent = true;
        let export = Control::Handover(Handover::Export(job.clone()));
        let acked = control_all(&g.ports, &g.stats, export, "export", EXPORT_TIMEOUT);
        if let Some(why) = job.failure.reason() {
            return Err(Stop::Fail(why));
        }
        acked.map_err(|e| Stop::Fail(e.to_string()))?;
        let sent = job.sent.load(Relaxed);
        let kept = job.kept.load(Relaxed);
        log::info!("hand-over: {sent} connections sent, {kept} kept here");
        let data = g.hooks.0.relay();
        if !data.is_empty() {
            log::info!("hand-over: relaying {} bytes of the product's", data.len());
            self.write(&Message::Relay { data }, &[])?;
        }
        self.write(&Message::End { sent, kept }, &[])?;
        self.ended = true;
        let _ = self.stream.set_read_timeout(Some(COMMIT_TIMEOUT));
        let Message::Commit { taken } = self.read("commit")? else {
            unreachable!("read checks the kind")
        };
        Ok(taken)
    }

    /// Stops accepting, here and in the shards' own listeners; the sockets stay open.
    fn pause(&mut self) -> Result<(), Stop> {
        self.paused = true;
        let g = self.giver;
        if let Some((control, wake)) = &g.acceptor {
            let (ack_tx, ack_rx) = bounded(1);
            let sent = control.send(AcceptorControl::Pause(ack_tx)).is_ok();
            wake.wake();
            if !sent || ack_rx.recv_timeout(STEP_TIMEOUT).is_err() {
                return Err(Stop::Fail("the acceptor did not pause".into()));
            }
        }
        let pause = Control::Handover(Handover::PauseAccept);
        control_all(&g.ports, &g.stats, pause, "pause accepting", STEP_TIMEOUT)
            .map_err(|e| Stop::Fail(e.to_string()))
    }

    fn resume(&self) {
        let g = self.giver;
        if let Some((control, wake)) = &g.acceptor {
            let (ack_tx, ack_rx) = bounded(1);
            if control.send(AcceptorControl::Resume(ack_tx)).is_ok() {
                wake.wake();
                let _ = ack_rx.recv_timeout(STEP_TIMEOUT);
            }
        }
        let resume = Control::Handover(Handover::ResumeAccept);
        let _ = control_all(&g.ports, &g.stats, resume, "resume accepting", STEP_TIMEOUT);
    }

    /// A step failed. Shut the read side first: from then on no `Commit` can arrive, and one
    /// that arrived before is in the buffer. Honour it if it is there (after `End`); otherwise
    /// take everything back.
    fn decide(mut self, why: String) -> Outcome {
        let _ = self.stream.shutdown(std::net::Shutdown::Read);
        loop {
            match self.reader.next(&self.stream) {
                Ok((Message::Commit { taken }, _)) if self.ended => {
                    log::info!("hand-over: the commit came before the failure ({why})");
                    return self.commit(taken);
                }
                Ok((Message::Relay { data }, _)) => self.returned.push(data),
                Ok(_) => continue,
                Err(_) => break,
            }
        }
        let g = self.giver;
        if self.lent {
            let restore = Control::Handover(Handover::Restore);
            let _ = control_all(&g.ports, &g.stats, restore, "restore", EXPORT_TIMEOUT);
        }
        if self.paused {
            self.resume();
        }
        if self.begun {
            g.hooks.0.failed(std::mem::take(&mut self.returned));
        }
        self.send(&Message::Abort {
            reason: why.clone(),
        });
        log::warn!(
            "hand-over to pid {} failed: {why}; every connection is still served here and \
             accepting resumed",
            self.pid
        );
        Outcome::NotDone(format!("failed: {why}"))
    }

    /// The new process committed: the lent connections are its own.
    fn commit(self, taken: u64) -> Outcome {
        let g = self.giver;
        let job = self.job.as_ref().expect("a commit follows an export");
        let sent = job.sent.load(Relaxed);
        let kept = job.kept.load(Relaxed);
        if taken != sent {
            log::error!(
                "hand-over: the new process committed {taken} connections of the {sent} sent; \
                 they are its own now"
            );
        }
        let release = Control::Handover(Handover::Release);
        let _ = control_all(&g.ports, &g.stats, release, "release", EXPORT_TIMEOUT);
        g.hooks.0.committed();
        let took = self.started.elapsed();
        let moving = job
            .first
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map_or(Duration::ZERO, |t| t.elapsed());
        let c = g.stats.handover();
        c.given.inc();
        c.kept.add(kept);
        c.last_micros.set(took.as_micros() as u64);
        c.last_moving_micros.set(moving.as_micros() as u64);
        log::info!(
            "hand-over committed: pid {} owns the listeners and {sent} connections ({kept} kept \
             here, closed gracefully); {took:?} in all, connections paused at most {moving:?}",
            self.pid
        );
        Outcome::Committed {
            pid: self.pid,
            sent,
            kept,
            took,
        }
    }
}
