//! How other threads reach a shard: three channels, each send followed by a wake of the shard's
//! eventfd. The shard reads them in this order, so control never waits behind data:
//!
//! 1. **control** (drain, new limits): small and bounded; every message carries an
//!    acknowledgement channel the shard answers once it has applied it, and the shard reads it
//!    first in every loop turn, before any connection or data;
//! 2. **new connections** from the acceptor (or the load generator): bounded at [`CONN_QUEUE`],
//!    a full one makes the acceptor try another shard;
//! 3. **data**: the service's commands from other shards (pub/sub fan-out). Bounded at
//!    [`DATA_QUEUE`] messages;
//! 4. **results** of offloaded jobs, from the offload pool's threads: bounded by the pool's
//!    admission (a job holds its place until the shard takes its result), so the channel itself
//!    needs no bound of its own.
//!
//! The second and third are [`queue`]s: bounded, but allocated as they fill (a list channel
//! guarded by an atomic length) rather than preallocated rings (65,536 command slots, 1,024
//! socket slots of 24 bytes) that an idle shard would carry for nothing.
//!
//! Senders live on any thread; the receivers ([`Inbox`]) belong to the shard.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};

use crate::server::handover::wire::Record;
use crate::server::handover::{ExportJob, ImportJob};
use crate::server::offload::Done;
use crate::server::Limits;
use crate::sys::waker::Waker;
use crate::tls::TlsAcceptor;

/// Capacity of a shard's control channel (a few messages at most are ever in flight).
pub(crate) const CONTROL_QUEUE: usize = 16;
/// Capacity of each shard's channel of new sockets: a full one makes the acceptor skip it.
pub(crate) const CONN_QUEUE: usize = 1024;
/// Bound of each shard's data channel (service commands).
pub(crate) const DATA_QUEUE: usize = 65536;

/// What a control message asks of a shard.
#[derive(Debug, Clone)]
pub(crate) enum Control {
    /// Shut down gracefully: stop accepting and reading new requests, flush, close, exit.
    Drain,
    /// New limits (a configuration reload).
    Limits(Limits),
    /// New TLS configuration for listener `.0` (a certificate reload): new handshakes use it.
    Tls(usize, TlsAcceptor),
    /// A step of a hand-over to or from another process (see [`crate::server::handover`]).
    Handover(Handover),
}

/// The hand-over steps a shard takes, each acknowledged like any control message.
#[derive(Debug, Clone)]
pub(crate) enum Handover {
    /// Old process: stop accepting on this shard's own listeners (reuseport), keeping the
    /// sockets and their queues (the new process accepts on the same sockets).
    PauseAccept,
    /// Old process: accept again (the hand-over failed).
    ResumeAccept,
    /// Old process: send every connection that can move, in batches, and lend them.
    Export(Arc<ExportJob>),
    /// Old process: the hand-over failed; serve the lent connections again.
    Restore,
    /// Old process: the new process committed; forget the lent connections (without closing
    /// them: they are the new process's).
    Release,
    /// New process: connections with state are coming (`NewConn::import`): hold each, and
    /// report to this job.
    Receive(Arc<ImportJob>),
    /// New process: take every connection the taking thread has queued so far.
    Prepare,
    /// New process: the hand-over committed; serve the held connections.
    Activate,
    /// New process: the hand-over failed; let the held connections go back to the old one.
    Abandon,
}

/// A control message and where to acknowledge it (the shard sends its index once applied).
pub(crate) struct ControlMsg {
    pub control: Control,
    pub ack: Sender<usize>,
}

/// A socket handed to a shard, and the listener it came from.
pub(crate) struct NewConn {
    pub fd: OwnedFd,
    pub listener: usize,
    /// A connection taken over from an old process, with its state: held until the hand-over
    /// commits.
    pub import: Option<Box<Record>>,
}

impl NewConn {
    pub fn accepted(fd: OwnedFd, listener: usize) -> NewConn {
        NewConn {
            fd,
            listener,
            import: None,
        }
    }
}

/// The senders of one shard's control and connection channels, and its waker.
#[derive(Clone)]
pub(crate) struct ShardPort {
    pub control: Sender<ControlMsg>,
    pub conns: QueueTx<NewConn>,
    pub waker: Waker,
}

/// One shard's receiving ends.
pub(crate) struct Inbox<C> {
    pub control: Receiver<ControlMsg>,
    pub conns: QueueRx<NewConn>,
    pub data: QueueRx<C>,
    pub results: Receiver<Done<C>>,
}

/// The sending end of a queue: bounded by a shared length, allocated as it fills.
pub(crate) struct QueueTx<C> {
    tx: Sender<C>,
    len: Arc<AtomicUsize>,
    cap: usize,
}

impl<C> Clone for QueueTx<C> {
    fn clone(&self) -> Self {
        QueueTx {
            tx: self.tx.clone(),
            len: self.len.clone(),
            cap: self.cap,
        }
    }
}

impl<C> QueueTx<C> {
    /// The channel's bound.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Queues `msg` even past the bound (its place still counts, so the bound's other users
    /// see a full channel); `Err` only if the shard is gone. For a sender whose messages the
    /// shard must take however many there are (a hand-over's connections, bounded by what the
    /// old process sends), where waiting for places would only add sleeps.
    pub fn send_over(&self, msg: C) -> Result<(), C> {
        self.len.fetch_add(1, Relaxed);
        self.tx.send(msg).map_err(|e| {
            self.len.fetch_sub(1, Relaxed);
            e.into_inner()
        })
    }

    /// Queues `msg` unless the channel holds `cap` messages already or the shard is gone.
    pub fn try_send(&self, msg: C) -> Result<(), C> {
        // Reserve a place first: the bound holds however many threads send at once.
        if self.len.fetch_add(1, Relaxed) >= self.cap {
            self.len.fetch_sub(1, Relaxed);
            return Err(msg);
        }
        self.tx.send(msg).map_err(|e| {
            self.len.fetch_sub(1, Relaxed);
            e.into_inner()
        })
    }
}

/// The receiving end of a queue.
pub(crate) struct QueueRx<C> {
    rx: Receiver<C>,
    len: Arc<AtomicUsize>,
}

impl<C> QueueRx<C> {
    pub fn try_recv(&self) -> Option<C> {
        // Empty and disconnected alike: nothing to handle now.
        self.rx.try_recv().ok()
    }

    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// Gives back the places of `n` received messages (once per batch, not per message).
    pub fn release(&self, n: usize) {
        if n > 0 {
            self.len.fetch_sub(n, Relaxed);
        }
    }
}

/// A queue bounded at `cap` messages; a received message's place is given back by
/// [`QueueRx::release`].
pub(crate) fn queue<C>(cap: usize) -> (QueueTx<C>, QueueRx<C>) {
    let (tx, rx) = unbounded();
    let len = Arc::new(AtomicUsize::new(0));
    (
        QueueTx {
            tx,
            len: len.clone(),
            cap,
        },
        QueueRx { rx, len },
    )
}

/// The senders other threads use to reach one shard, besides its [`ShardPort`].
pub(crate) struct ShardSenders<C> {
    pub data: QueueTx<C>,
    pub results: Sender<Done<C>>,
}

/// Every channel of one shard: its port (control and connections), its data and result
/// senders, its inbox.
pub(crate) fn shard_channels<C>(waker: Waker) -> (ShardPort, ShardSenders<C>, Inbox<C>) {
    let (control_tx, control_rx) = bounded(CONTROL_QUEUE);
    let (conn_tx, conn_rx) = queue(CONN_QUEUE);
    let (data_tx, data_rx) = queue(DATA_QUEUE);
    let (results_tx, results_rx) = unbounded();
    (
        ShardPort {
            control: control_tx,
            conns: conn_tx,
            waker,
        },
        ShardSenders {
            data: data_tx,
            results: results_tx,
        },
        Inbox {
            control: control_rx,
            conns: conn_rx,
            data: data_rx,
            results: results_rx,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_keeps_its_bound_and_gives_places_back() {
        let (tx, rx) = queue::<u32>(3);
        assert!(tx.try_send(1).is_ok());
        assert!(tx.try_send(2).is_ok());
        assert!(tx.try_send(3).is_ok());
        assert_eq!(tx.try_send(4), Err(4), "full at the bound");
        assert_eq!(rx.try_recv(), Some(1));
        assert_eq!(
            tx.try_send(5),
            Err(5),
            "a place is given back by release, not by recv"
        );
        rx.release(1);
        assert!(tx.try_send(6).is_ok());
        let got: Vec<u32> = std::iter::from_fn(|| rx.try_recv()).collect();
        assert_eq!(got, vec![2, 3, 6]);
        rx.release(3);
        drop(rx);
        assert_eq!(tx.try_send(7), Err(7), "a gone shard refuses");
        assert_eq!(tx.len.load(Relaxed), 0);
    }

    #[test]
    fn send_over_passes_the_bound_and_its_places_count() {
        let (tx, rx) = queue::<u32>(2);
        for i in 0..5 {
            assert!(tx.send_over(i).is_ok());
        }
        assert_eq!(tx.try_send(9), Err(9), "the others see a full channel");
        let got: Vec<u32> = std::iter::from_fn(|| rx.try_recv()).collect();
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
        rx.release(5);
        assert!(tx.try_send(9).is_ok());
        rx.release(1);
        drop(rx);
        assert_eq!(tx.send_over(7), Err(7), "a gone shard refuses");
        assert_eq!(tx.len.load(Relaxed), 0);
    }
}
