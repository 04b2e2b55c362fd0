//! Restart without dropping a connection: a running server (the old process) hands its
//! listening sockets and its open connections, with their state, to a new process over a Unix
//! control socket, and exits once it holds nothing.
//!
//! ```text
//!  new process                                   old process (control thread, shards)
//!  config parsed and checked
//!  Hello {versions, format} ───────────────────►  version and format agreed, or Refuse
//!                          ◄───────────────────  Welcome {version, listeners offered}
//!  WantListeners ──────────────────────────────►
//!                          ◄───────────────────  Listeners + the sockets (SCM_RIGHTS)
//!  starts its shards, accepts at once
//!  Accepting ──────────────────────────────────►  stops accepting (sockets kept open)
//!                          ◄───────────────────  Batch + descriptors, from every shard
//!  holds each connection                          (each connection lent: not served)
//!                          ◄───────────────────  End {sent, kept}
//!  every shard has its share
//!  Commit ─────────────────────────────────────►  releases the lent connections,
//!  serves them                                    closes the kept ones gracefully, exits 0
//! ```
//!
//! **Ownership rule.** A connection belongs to the old process until the new process's `Commit`
//! is in the old process's socket buffer, and to the new process from then on; the new process
//! serves nothing it received before its `Commit` write succeeded, and the old process serves
//! nothing it lent unless it has decided, with the socket's read side shut, that no `Commit`
//! came. Between export and commit a lent connection is served by neither (its client sees a
//! pause, nothing else: its bytes wait in the kernel). Whatever fails (the new process crashes
//! or is killed at any point, refuses a version, cannot import a connection; the old process
//! times out waiting) before the commit, the old process gets every connection back, as it was,
//! and accepts again; a later hand-over can then succeed. The decision cannot race a `Commit` in
//! flight: before restoring, the old process shuts the socket's read side, which the kernel
//! orders against the new process's write (a `Commit` queued before it is read and honoured; a
//! later one fails with `EPIPE`, and the new process then gives everything back).
//!
//! The commit is one for the whole hand-over, not one per batch, so that the new process dying
//! at any point before it (after the listeners, midway through the connections, before
//! acknowledging the end) loses no connection. The price is the pause: a moved connection waits
//! from its export to the commit and its activation. Each shard exports the connections idle
//! longest first, and the new process activates the most recently exported first, a few hundred
//! per loop turn, so the active ones wait the shortest: from the last batch to the commit, not
//! for the whole hand-over. Lending costs the old process no system call (edge-triggered, a lent
//! connection stays registered and its events are ignored); after the commit a thread of the
//! lowest priority removes those registrations, so that on a shared core the new process's
//! activation goes first. The new process accepts from the moment it has the sockets;
//! what it accepted is its own from the start (it dies with it, like any connection of a
//! process that crashes).
//!
//! **What moves.** Every open connection whose service describes it ([`Service::export`]),
//! busy or not, with its buffered bytes: unconsumed input (a partial request), unsent output (a
//! client that stopped reading), the age of its last progress (idle and write deadlines keep
//! counting from there), its service timer's remaining time and the service's blob. Bytes not
//! yet read stay in the socket and are read by the new process. A connection that is closing,
//! or that its service cannot describe (the default), stays: the old process keeps serving it
//! until the commit, then closes it gracefully (`on_drain`, within `shutdown_timeout`). So does
//! a connection whose service paused its reading ([`Conn::pause_reading`]: it waits for
//! something of this process's). Offloaded jobs ([`Peers::offload`]) finish first: a shard
//! exports once its connections' results have come back (waiting at most `shutdown_timeout`),
//! so a result is delivered by this process into the output that moves; one that comes back
//! later, for a lent connection, is delivered if the hand-over fails and dropped and counted
//! (offload `dropped`) once it commits.
//! Listeners are matched by name (and address, unless the new configuration says port 0); a
//! listener the new configuration moves elsewhere or drops is not taken, and its connections
//! stay with the old process.
//!
//! **Format.** [`wire`] (versioned): a new process that does not understand the old one's
//! version, or whose service speaks another state format ([`Service::HANDOVER_FORMAT`]), is
//! refused before anything moves.
//!
//! **Files.** [`wire`] (frames and records), `give` (the old process's control thread and its
//! session), `take` (the new process's side, [`Takeover`]); the shard's part is
//! `shard/handover.rs`. Threads: the control thread of the old process, the thread that calls
//! [`Takeover`] in the new one; the shards write their batches themselves, whole frames under
//! the job's lock.
//!
//! [`Service::export`]: crate::server::Service::export
//! [`Conn::pause_reading`]: crate::server::Conn::pause_reading
//! [`Peers::offload`]: crate::server::Peers::offload
//! [`Service::HANDOVER_FORMAT`]: crate::server::Service::HANDOVER_FORMAT

mod give;
mod take;
#[doc(hidden)]
pub mod wire;

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use give::{control_request, ControlEvent};
pub(crate) use give::{ControlThread, Giver, OfferedSockets};
pub use take::{Takeover, TakeoverReport};
pub use wire::WireError;

use crate::sys::fdpass;

/// The longest either side waits for one message from the other (or for one write to go).
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the shards together may take to send every connection.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the old process waits for `Commit` after `End`.
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Set to `listeners`, `connections` or `end`, the new process kills itself (SIGKILL) at that
/// point of a takeover: after it has said it accepts, after it received its first batch of
/// connections, or just before its commit. For the tests of a crash at each point; never set
/// it otherwise.
pub const TEST_KILL_VAR: &str = "SHARDNET_TEST_TAKEOVER_KILL";

/// What the product carries across a hand-over besides its connections, and when: pub/sub
/// publishes made while connections move. One object per server
/// ([`crate::server::ServerBuilder::handover_hooks`]), called on the thread that
/// runs the hand-over (the old process's control thread, the new process's taking thread), in
/// this order: old `begin`, `relay` (sent to the new process before `End`), then `committed` or
/// `failed`; new `taking` (before the server starts), `received` (what the old one relayed),
/// then `took` (after the commit, before any moved connection is served) or `abandoned` (sent
/// back). Every method has a default that does nothing.
pub trait HandoverHooks: Send + Sync + 'static {
    /// Old process: the listeners moved and the connections are about to. From now on nothing
    /// may be delivered only here: hold it.
    fn begin(&self) {}
    /// Old process: every connection that can move has been sent; what the new process must
    /// get (opaque; its [`HandoverHooks::received`] reads it). Empty: nothing to send.
    fn relay(&self) -> Vec<u8> {
        Vec::new()
    }
    /// Old process: the hand-over committed; the moved connections are gone from here.
    fn committed(&self) {}
    /// Old process: the hand-over failed and every connection is back; `returned` is what the
    /// new process gave back ([`HandoverHooks::abandoned`]).
    fn failed(&self, _returned: Vec<Vec<u8>>) {}
    /// New process: it takes over; called before its server starts.
    fn taking(&self) {}
    /// New process: what the old one relayed.
    fn received(&self, _data: &[u8]) {}
    /// New process: the commit is written; called before the moved connections are served.
    fn took(&self) {}
    /// New process: the takeover failed; what to give back to the old process.
    fn abandoned(&self) -> Vec<u8> {
        Vec::new()
    }
}

/// The hooks of a server that has none.
struct NoHooks;

impl HandoverHooks for NoHooks {}

/// A server's hooks (none by default), as the builder and the server keep them.
#[derive(Clone)]
pub(crate) struct Hooks(pub Arc<dyn HandoverHooks>);

impl Default for Hooks {
    fn default() -> Self {
        Hooks(Arc::new(NoHooks))
    }
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HandoverHooks")
    }
}

/// Why a hand-over did not happen (or did not complete), on either side.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// The control socket could not be created, connected to or used.
    #[error("control socket {path}: {source}")]
    Socket {
        /// The socket's path.
        path: String,
        /// What the system said.
        source: io::Error,
    },
    /// A message on the control socket could not be read or written.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The old process said no (another hand-over under way, another state format, ...).
    #[error("the running server refused the hand-over: {0}")]
    Refused(String),
    /// No hand-over version both sides understand.
    #[error(
        "the running server speaks hand-over version {theirs}; this build understands {min} to {max}"
    )]
    Version {
        /// The version the other side asked for.
        theirs: u16,
        /// The oldest version this build understands.
        min: u16,
        /// The newest version this build understands.
        max: u16,
    },
    /// A message out of order.
    #[error("the running server sent {got} where {want} was expected")]
    Unexpected {
        /// The message that came.
        got: &'static str,
        /// The message this step waits for.
        want: &'static str,
    },
    /// The old process gave up (and keeps serving everything).
    #[error("the running server aborted the hand-over: {0}")]
    Aborted(String),
    /// This side failed (a shard, an import, a timeout), with the reason.
    #[error("{0}")]
    Failed(String),
}

/// Records a failure once (the first reason wins) and says whether one happened.
#[derive(Debug, Default)]
struct Failure {
    failed: AtomicBool,
    why: Mutex<Option<String>>,
}

impl Failure {
    fn set(&self, why: String) {
        let mut w = self.why.lock().unwrap_or_else(|e| e.into_inner());
        if w.is_none() {
            *w = Some(why);
        }
        self.failed.store(true, Relaxed);
    }

    fn is_set(&self) -> bool {
        self.failed.load(Relaxed)
    }

    fn reason(&self) -> Option<String> {
        self.why.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// An old process's export in progress: where the shards write their batches, and what they
/// report.
#[derive(Debug)]
pub(crate) struct ExportJob {
    /// The session's socket (a second descriptor of it): shards write whole frames under the
    /// lock.
    writer: Mutex<UnixStream>,
    /// Listeners (old indices) the new process took: connections of the others stay.
    moving: Vec<bool>,
    sent: AtomicU64,
    kept: AtomicU64,
    /// When the first batch went (the start of the longest pause).
    first: Mutex<Option<Instant>>,
    failure: Failure,
}

impl ExportJob {
    pub(crate) fn new(writer: UnixStream, moving: Vec<bool>) -> ExportJob {
        ExportJob {
            writer: Mutex::new(writer),
            moving,
            sent: AtomicU64::new(0),
            kept: AtomicU64::new(0),
            first: Mutex::new(None),
            failure: Failure::default(),
        }
    }

    /// Whether connections of listener `index` move (the new process took that listener).
    pub(crate) fn moves(&self, index: usize) -> bool {
        self.moving.get(index).copied().unwrap_or(false)
    }

    /// Sends one frame with its descriptors.
    pub(crate) fn send(&self, frame: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        self.first
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(Instant::now);
        fdpass::send_all(w.as_fd(), frame, fds)
    }

    pub(crate) fn add(&self, sent: u64, kept: u64) {
        self.sent.fetch_add(sent, Relaxed);
        self.kept.fetch_add(kept, Relaxed);
    }

    pub(crate) fn fail(&self, why: String) {
        self.failure.set(why);
    }

    pub(crate) fn failed(&self) -> bool {
        self.failure.is_set()
    }
}

/// A new process's import in progress: what the shards report about the connections they hold.
#[derive(Debug, Default)]
pub(crate) struct ImportJob {
    imported: AtomicU64,
    failure: Failure,
}

impl ImportJob {
    pub(crate) fn imported(&self) {
        self.imported.fetch_add(1, Relaxed);
    }

    pub(crate) fn fail(&self, why: String) {
        self.failure.set(why);
    }
}
