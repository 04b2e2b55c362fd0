//! A shard's part of a hand-over between processes (see [`crate::server::handover`]).
//!
//! Owned by the shard thread; each step arrives as a control message and is acknowledged once
//! done. In the old process: pause and resume its own listeners (reuseport), export (every open
//! connection the service can describe goes out in batches of up to `MAX_FDS` descriptors and
//! becomes `Lent`: out of the wheel, untouched; edge-triggered it stays registered in epoll and
//! its events are ignored, level-triggered it leaves epoll), then either restore (the hand-over
//! failed: back to `Open`, its registration rearmed or made again) or release (it committed:
//! forgotten without being closed; a nice-19 thread removes the registrations and closes this
//! process's descriptors, and the shard joins it before it ends). In the new process: receive
//! (each connection arrives `UNCOMMITTED`: in the slab with its buffers, deadlines and service
//! state, but not in epoll or the wheel, its output queued), prepare (take what is still in the
//! channel), then activate (register and serve, the most recently active first, `ACTIVATE_BATCH`
//! per loop turn; acknowledged after the last) or abandon.
//!
//! A connection is never served by both processes: the old one stops at export and starts again
//! only on restore; the new one starts only on activate, which its taking thread sends after the
//! commit reached the old process (see the ownership rule in `handover/mod.rs`).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;

use super::state::{Ctl, Flags, Phase};
use super::{lifecycle, Entry, Shard};
use crate::conn::Token;
use crate::server::api::{CloseReason, Service};
use crate::server::handover::wire::{self, BatchWriter, Record, RecordRef};
use crate::server::handover::{ExportJob, ImportJob};
use crate::server::listener::Listener;
use crate::server::offload::{Done, Outcome};
use crate::server::port::{Handover, NewConn};
use crate::sys::fdpass;
use crate::sys::poller::Interest;

/// A batch is sent once its frame reaches this size, even below `MAX_FDS` connections.
const BATCH_BYTES: usize = 4 << 20;
/// Committed connections registered per loop turn (about half a millisecond of `epoll_ctl`).
const ACTIVATE_BATCH: usize = 256;

/// What a shard keeps during a hand-over.
pub(crate) struct HandoverState<C> {
    /// Old process: connections sent and not yet released or restored.
    pub(super) lent: Vec<Token>,
    /// Old process, committed: the thread that removes the released connections'
    /// registrations.
    pub(super) cleanup: Option<std::thread::JoinHandle<()>>,
    /// Old process: results of offloaded jobs that came back for lent connections, delivered
    /// if they are restored, dropped and counted if they are released.
    pub(super) results: Vec<Done<C>>,
    /// New process: connections received and not yet activated or abandoned.
    pub(super) held: Vec<Token>,
    /// New process: where imports report.
    pub(super) job: Option<Arc<ImportJob>>,
    /// Old process: this shard's own listeners while accepting is paused (reuseport).
    pub(super) paused: Vec<Listener>,
    /// New process, committed: connections still to register, the most recently active last
    /// (activated first), a few per loop turn.
    pub(super) activating: Vec<Token>,
    /// New process: where to acknowledge `Activate` once every connection is served.
    pub(super) activate_ack: Option<Sender<usize>>,
    /// New process: connections activated so far in this hand-over.
    activated: u64,
}

impl<C> Default for HandoverState<C> {
    fn default() -> Self {
        HandoverState {
            lent: Vec::new(),
            cleanup: None,
            results: Vec::new(),
            held: Vec::new(),
            job: None,
            paused: Vec::new(),
            activating: Vec::new(),
            activate_ack: None,
            activated: 0,
        }
    }
}

fn millis(d: Duration) -> u32 {
    d.as_millis().min(u32::MAX as u128) as u32
}

impl<S: Service> Shard<S> {
    /// One hand-over step (a control message); returns `ack` if the step is done now, or keeps
    /// it to acknowledge later (`Activate`, which takes several loop turns).
    pub(crate) fn on_handover(
        &mut self,
        step: Handover,
        ack: Sender<usize>,
    ) -> Option<Sender<usize>> {
        match step {
            Handover::PauseAccept => self.pause_accept(),
            Handover::ResumeAccept => self.resume_accept(),
            Handover::Export(job) => self.export(&job),
            Handover::Restore => self.restore(),
            Handover::Release => self.release(),
            Handover::Receive(job) => self.handover.job = Some(job),
            Handover::Prepare => self.take_queued(),
            Handover::Activate => {
                self.activate(ack);
                return None;
            }
            Handover::Abandon => self.abandon(),
        }
        Some(ack)
    }

    fn pause_accept(&mut self) {
        for l in &self.listeners {
            // Out of epoll but open: the new process accepts on the same sockets, whose queues
            // it therefore gets whole.
            let _ = self.core.poller.delete(l.fd());
        }
        let mut taken = std::mem::take(&mut self.listeners);
        self.handover.paused.append(&mut taken);
    }

    fn resume_accept(&mut self) {
        let paused = std::mem::take(&mut self.handover.paused);
        for mut l in paused {
            let i = self.listeners.len();
            let interest = Interest {
                read: true,
                write: false,
                edge: true,
            };
            if let Err(e) = self.core.poller.add(l.fd(), Token::listener(i).0, interest) {
                log::error!("{}: cannot accept again on a listener: {e}", self.name);
            }
            l.mark_ready();
            self.listeners.push(l);
        }
    }

    /// Sends every connection that can move and lends it. The ones idle longest go first, so
    /// the active ones (a client in the middle of an exchange) are paused the shortest.
    fn export(&mut self, job: &ExportJob) {
        // Sockets the acceptor handed over before it paused move too.
        self.take_queued_conns();
        self.wait_for_offloads();
        self.reap();
        // Commands already here (pub/sub publishes made before the hand-over began: the product
        // holds later ones) are delivered first, so what they wrote travels in the output.
        let mut commands = 0;
        while let Some(cmd) = self.inbox.data.try_recv() {
            commands += 1;
            self.with_ctx("on_command", |service, ctx| service.on_command(cmd, ctx));
        }
        self.inbox.data.release(commands);
        if commands > 0 {
            self.core.counters().commands.add(commands as u64);
            self.with_ctx("on_commands_done", |service, ctx| {
                service.on_commands_done(ctx)
            });
        }
        self.with_ctx("before_export", |service, ctx| service.before_export(ctx));
        let env = &self.core.env;
        let mut order: Vec<(Duration, Token)> = self
            .core
            .conns
            .tokens()
            .into_iter()
            .filter_map(|t| {
                let e = self.core.conns.get(t)?;
                Some((env.since(e.ctl.last_active), t))
            })
            .collect();
        order.sort_unstable_by_key(|&(idle, _)| std::cmp::Reverse(idle));
        let shard = self.core.env.shard as u16;
        let mut batch = BatchWriter::new(shard);
        let mut members: Vec<Token> = Vec::with_capacity(fdpass::MAX_FDS);
        let (mut sent, mut kept) = (0u64, 0u64);
        for (idle, token) in order {
            if job.failed() {
                break;
            }
            match self.export_one(job, token, idle, &mut batch) {
                true => members.push(token),
                false => {
                    kept += 1;
                    continue;
                }
            }
            if members.len() == fdpass::MAX_FDS || batch.bytes() >= BATCH_BYTES {
                sent += self.send_batch(job, &mut batch, &mut members);
            }
        }
        if !members.is_empty() {
            sent += self.send_batch(job, &mut batch, &mut members);
        }
        self.reap();
        job.add(sent, kept);
    }

    /// Offloaded jobs of this shard's connections finish before anything is exported: their
    /// results are delivered here, into the output that moves with the connections. The wait
    /// is bounded by `shutdown_timeout`; a result that comes back later, for a connection that
    /// is lent by then, is kept: delivered if the hand-over fails, dropped and counted (offload
    /// `dropped`) once it commits.
    fn wait_for_offloads(&mut self) {
        if self.core.env.offloads.get() == 0 {
            return;
        }
        let deadline = std::time::Instant::now() + self.core.tuning.shutdown_timeout;
        while self.core.env.offloads.get() > 0 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                log::warn!(
                    "{}: {} offloaded jobs still running after {:?}: exporting their \
                     connections without their results",
                    self.name,
                    self.core.env.offloads.get(),
                    self.core.tuning.shutdown_timeout
                );
                return;
            }
            match self.inbox.results.recv_timeout(left) {
                Ok(done) => self.on_result(done),
                Err(_) => return,
            }
        }
    }

    /// An offloaded job's result for a lent connection is kept until the hand-over's outcome;
    /// `Some` gives back one that is not for a lent connection.
    pub(crate) fn keep_if_lent(&mut self, done: Done<S::Command>) -> Option<Done<S::Command>> {
        let lent = self
            .core
            .conns
            .get(done.token)
            .is_some_and(|e| e.ctl.phase == Phase::Lent);
        if !lent {
            return Some(done);
        }
        self.handover.results.push(done);
        None
    }

    /// Lends one connection into `batch`, or says why not (false: it stays here).
    fn export_one(
        &mut self,
        job: &ExportJob,
        token: Token,
        idle: Duration,
        batch: &mut BatchWriter,
    ) -> bool {
        // A TLS connection's record state (keys, sequence numbers) lives in the TLS library and
        // cannot move without exporting its secrets: it stays, and closes gracefully
        // (close_notify) after the commit.
        let tls = matches!(self.core.tls.get(token.index()), Some(Some(_)));
        let exportable = !tls
            && self.core.conns.get(token).is_some_and(|e| {
                e.ctl.is_open()
                    && !e.ctl.flags.has(Flags::UNCOMMITTED)
                    // Its service paused reading to wait for something of this process's (a
                    // reply from another shard, an offloaded job): it stays and finishes here.
                    && !e.ctl.flags.has(Flags::HELD)
                    && job.moves(e.ctl.listener as usize)
            });
        if !exportable {
            return false;
        }
        let service = &mut self.service;
        let blob = self.core.invoke(token, |conn| service.export(conn));
        let core = &mut self.core;
        let Some(e) = core.conns.get_mut(token) else {
            return false;
        };
        let blob = match blob {
            Some(Some(b)) if e.ctl.is_open() => b,
            // Not exportable, panicked (now doomed) or closing: it stays, and what the service
            // wrote goes out the usual way.
            _ => {
                core.after_callback(token);
                return false;
            }
        };
        // What the service wrote while exporting queues behind the rest: it travels with the
        // connection, and is still in the queue if the hand-over fails.
        if !core.scratch.is_empty() {
            let counters = core.stats.shard(core.env.shard);
            counters.output_queued.add(core.scratch.len() as u64);
            match &mut e.ctl.output {
                Some(out) => out.push(&core.scratch),
                None => e.ctl.output = Some(core.pool.output_from(&core.scratch)),
            }
            core.scratch.clear();
        }
        let c = &mut e.ctl;
        // Edge-triggered, a lent connection stays registered: its events are ignored (a `Lent`
        // connection neither reads nor writes), so lending costs no system call, and epoll is
        // rearmed on restore or the registration removed on release, after the commit.
        // Level-triggered, it would report the same readiness on every wait: out of epoll.
        if !core.tuning.edge {
            if core.poller.delete(c.fd.as_fd()).is_err() {
                // Still registered: it cannot be lent safely; serve it here.
                core.after_callback(token);
                return false;
            }
            c.flags.clear(Flags::REG_READ.union(Flags::REG_WRITE));
        }
        let mut flags = 0;
        if c.flags.has(Flags::SPOKE) {
            flags |= wire::FLAG_SPOKE;
        }
        if c.flags.has(Flags::RESUME) {
            flags |= wire::FLAG_RESUME;
        }
        let env = &core.env;
        let timer_ms = c
            .flags
            .has(Flags::TIMER)
            .then(|| millis(env.until(c.timer)));
        let output = c.output.as_ref().map_or(&[][..], |o| o.pending());
        batch.push(&RecordRef {
            listener: c.listener,
            flags,
            idle_ms: millis(idle),
            timer_ms,
            input: c.input.as_ref().map_or(&[][..], |b| &b[..]),
            output,
            blob: &blob,
        });
        c.phase = Phase::Lent;
        core.wheel.cancel(token.index());
        self.handover.lent.push(token);
        true
    }

    /// Sends the batch with its connections' descriptors (under the job's lock: shards write
    /// whole frames). Returns how many it sent (0 after a failure, which the job records).
    fn send_batch(
        &mut self,
        job: &ExportJob,
        batch: &mut BatchWriter,
        members: &mut Vec<Token>,
    ) -> u64 {
        let n = members.len() as u64;
        let fds: Vec<BorrowedFd<'_>> = members
            .iter()
            .filter_map(|&t| self.core.conns.get(t).map(|e| e.ctl.fd.as_fd()))
            .collect();
        let result = if fds.len() == members.len() {
            job.send(batch.frame(), &fds)
        } else {
            Err(std::io::Error::other("a lent connection vanished"))
        };
        batch.reset(self.core.env.shard as u16);
        members.clear();
        match result {
            Ok(()) => n,
            Err(e) => {
                job.fail(format!(
                    "shard {}: sending a batch: {e}",
                    self.core.env.shard
                ));
                0
            }
        }
    }

    /// The hand-over failed: every lent connection is served again, as it was.
    fn restore(&mut self) {
        for token in std::mem::take(&mut self.handover.lent) {
            let Some(e) = self.core.conns.get_mut(token) else {
                continue;
            };
            if e.ctl.phase != Phase::Lent {
                continue;
            }
            e.ctl.phase = Phase::Open;
            // Still registered if edge-triggered (see `export_one`): rearmed, so readiness that
            // came while it was lent is reported again.
            let still = self.core.tuning.edge;
            if self.register(token, still) {
                self.core.rearm(token, false);
                // Input that arrived meanwhile, or a resume the service asked for.
                self.core.ready.push(token);
            }
        }
        for done in std::mem::take(&mut self.handover.results) {
            self.deliver_result(done);
        }
        self.reap();
    }

    /// The new process committed: forget the lent connections without closing them. Edge-
    /// triggered, they are still registered here (see `export_one`), and the registrations must
    /// be removed before this process's descriptors close (the new process holds the files, so
    /// closing would not end them): that work, two system calls per connection, goes to a
    /// clean-up thread at the lowest priority, so that on a core shared with the new process it
    /// does not slow that one's activation of the same connections. Until it is done their
    /// events come here with tokens of freed slots, which the loop ignores (stale).
    fn release(&mut self) {
        let lent = std::mem::take(&mut self.handover.lent);
        let n = lent.len() as u64;
        let mut fds = Vec::with_capacity(if self.core.tuning.edge { lent.len() } else { 0 });
        for token in lent {
            if let Some(fd) = self.forget(token) {
                if self.core.tuning.edge {
                    fds.push(fd);
                }
            }
        }
        if !fds.is_empty() {
            self.detach_later(fds);
        }
        // Results that came back after their connection moved: nobody here to give them to.
        let offload = self.core.stats.offload();
        for done in std::mem::take(&mut self.handover.results) {
            match done.outcome {
                Outcome::Ok(_) => offload.dropped.inc(),
                Outcome::Panicked(_) => offload.panicked.inc(),
            }
        }
        self.core.counters().handed_over.add(n);
    }

    /// Removes the registrations of `fds` and closes them on a thread of the lowest priority
    /// (here, at once, if there is no such thread). The shard joins it before it ends.
    fn detach_later(&mut self, fds: Vec<OwnedFd>) {
        let (tx, rx) = crossbeam_channel::bounded::<Vec<OwnedFd>>(1);
        let spawned = self.core.poller.detacher().and_then(|detacher| {
            std::thread::Builder::new()
                .name("release".into())
                .spawn(move || {
                    crate::sys::process::lowest_priority_for_this_thread();
                    for fd in rx.recv().unwrap_or_default() {
                        let _ = detacher.delete(fd.as_fd());
                    }
                })
        });
        match spawned {
            Ok(handle) => {
                let _ = tx.send(fds);
                self.join_cleanup();
                self.handover.cleanup = Some(handle);
            }
            Err(e) => {
                log::warn!("{}: no clean-up thread ({e}): removing here", self.name);
                for fd in fds {
                    let _ = self.core.poller.delete(fd.as_fd());
                }
            }
        }
    }

    /// Waits for the clean-up thread of a committed hand-over, if one runs.
    pub(crate) fn join_cleanup(&mut self) {
        if let Some(h) = self.handover.cleanup.take() {
            let _ = h.join();
        }
    }

    /// New process: takes a connection with its state and holds it.
    pub(crate) fn import(&mut self, nc: NewConn, record: Record) {
        let Some(job) = self.handover.job.clone() else {
            log::error!(
                "{}: a connection with state arrived outside a hand-over",
                self.name
            );
            return;
        };
        let core = &mut self.core;
        let env = &core.env;
        let mut ctl = Ctl::new(nc.fd, nc.listener, env.stamp());
        ctl.flags = Flags::UNCOMMITTED;
        if record.flags & wire::FLAG_SPOKE != 0 {
            ctl.flags.set(Flags::SPOKE);
        }
        if record.flags & wire::FLAG_RESUME != 0 {
            ctl.flags.set(Flags::RESUME);
        }
        ctl.last_active = env.stamp_before(Duration::from_millis(record.idle_ms as u64));
        if let Some(ms) = record.timer_ms {
            ctl.timer = env.stamp_after(Duration::from_millis(ms as u64));
            ctl.flags.set(Flags::TIMER);
        }
        let counters = core.stats.shard(env.shard);
        if !record.input.is_empty() {
            counters.input_buffered.add(record.input.len() as u64);
            ctl.input = Some(core.pool.input_from(&record.input));
        }
        if !record.output.is_empty() {
            counters.output_queued.add(record.output.len() as u64);
            if record.output.len() >= env.limits.max_write_buffer {
                ctl.flags.set(Flags::PAUSED);
            }
            ctl.output = Some(core.pool.output_from(&record.output));
        }
        counters.open.inc();
        let token = core.conns.insert(Entry {
            ctl,
            state: S::State::default(),
        });
        let service = &mut self.service;
        let blob = &record.blob;
        let result = core.invoke(token, |conn| service.import(conn, blob));
        core.after_callback(token);
        match result {
            Some(Ok(())) => {
                self.handover.held.push(token);
                job.imported();
            }
            Some(Err(why)) => {
                job.fail(format!("the service refused a connection: {why}"));
                self.forget(token);
            }
            None => {
                job.fail("the service panicked importing a connection".into());
                self.reap();
            }
        }
    }

    /// Takes everything the taking thread queued so far (new connections it accepted too).
    fn take_queued(&mut self) {
        self.take_queued_conns();
        self.reap();
    }

    /// Adopts every connection in the channel, giving their places back.
    fn take_queued_conns(&mut self) {
        while let Some(nc) = self.inbox.conns.try_recv() {
            self.inbox.conns.release(1);
            self.adopt(nc);
        }
    }

    /// The hand-over committed: serve every held connection. The most recently active go
    /// first (they were exported last), [`ACTIVATE_BATCH`] per loop turn, so the ones a client
    /// is waiting on are served while the idle rest are still being registered; `ack` goes once
    /// the last one is ([`Shard::activate_some`], called every turn meanwhile).
    fn activate(&mut self, ack: Sender<usize>) {
        self.take_queued();
        let held = std::mem::take(&mut self.handover.held);
        self.handover.activating.extend(held);
        self.handover.activate_ack = Some(ack);
        self.activate_some();
    }

    /// Whether committed connections are still waiting to be registered (the loop does not
    /// sleep meanwhile).
    pub(crate) fn activating(&self) -> bool {
        self.handover.activate_ack.is_some()
    }

    /// Registers the next [`ACTIVATE_BATCH`] committed connections; acknowledges `Activate`
    /// after the last.
    pub(crate) fn activate_some(&mut self) {
        for _ in 0..ACTIVATE_BATCH {
            let Some(token) = self.handover.activating.pop() else {
                break;
            };
            self.activate_one(token);
        }
        self.reap();
        if !self.handover.activating.is_empty() {
            return;
        }
        if let Some(ack) = self.handover.activate_ack.take() {
            self.handover.job = None;
            let n = std::mem::take(&mut self.handover.activated);
            self.core.counters().received.add(n);
            let _ = ack.send(self.core.env.shard);
        }
    }

    fn activate_one(&mut self, token: Token) {
        let Some(e) = self.core.conns.get_mut(token) else {
            return;
        };
        if !e.ctl.flags.has(Flags::UNCOMMITTED) {
            return;
        }
        e.ctl.flags.clear(Flags::UNCOMMITTED);
        self.handover.activated += 1;
        if e.ctl.flags.has(Flags::CLOSE_REQ) {
            // The service asked to close while importing.
            e.ctl.flags.clear(Flags::CLOSE_REQ);
            self.core.continue_close(token);
            return;
        }
        let resume = e.ctl.flags.has(Flags::RESUME);
        if self.register(token, false) {
            self.core.rearm(token, false);
            if resume {
                self.core.ready.push(token);
            }
        }
    }

    /// The hand-over failed: the held connections are the old process's again.
    fn abandon(&mut self) {
        self.take_queued();
        for token in std::mem::take(&mut self.handover.held) {
            self.forget(token);
        }
        self.handover.job = None;
    }

    /// Registers a connection in epoll as its state asks (a restored or activated one), or with
    /// `modify` updates a registration that is there already (which reports its readiness
    /// afresh). False if that failed: it is doomed.
    fn register(&mut self, token: Token, modify: bool) -> bool {
        let edge = self.core.tuning.edge;
        let Some(e) = self.core.conns.get_mut(token) else {
            return false;
        };
        let c = &mut e.ctl;
        let interest = Interest {
            read: c.reading(),
            write: c.output.is_some(),
            edge,
        };
        c.flags.clear(Flags::REG_READ.union(Flags::REG_WRITE));
        if interest.read {
            c.flags.set(Flags::REG_READ);
        }
        if interest.write {
            c.flags.set(Flags::REG_WRITE);
        }
        let done = if modify {
            self.core.poller.modify(c.fd.as_fd(), token.0, interest)
        } else {
            self.core.poller.add(c.fd.as_fd(), token.0, interest)
        };
        match done {
            Ok(()) => true,
            Err(err) => {
                log::warn!("{}: cannot register a connection again: {err}", self.name);
                self.core.doom(token, CloseReason::Error);
                false
            }
        }
    }

    /// Removes a connection that now belongs to the other process: the service hears
    /// [`CloseReason::HandedOver`], the gauges lose it, and dropping this process's descriptor
    /// leaves the connection open (the other process holds it; it was out of this epoll).
    /// Returns its descriptor (dropping it closes this process's).
    fn forget(&mut self, token: Token) -> Option<OwnedFd> {
        let core = &mut self.core;
        let mut e = core.conns.remove(token)?;
        core.wheel.cancel(token.index());
        let service = &mut self.service;
        let state = &mut e.state;
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| {
            service.on_close(token, state, CloseReason::HandedOver)
        })) {
            core.counters().service_panics.inc();
            log::error!(
                "{}: the service panicked in on_close: {}",
                self.name,
                lifecycle::panic_message(&*payload)
            );
        }
        let counters = core.stats.shard(core.env.shard);
        if let Some(b) = e.ctl.input.take() {
            counters.input_buffered.sub(b.len() as u64);
            core.pool.release_input(b);
        }
        if let Some(b) = e.ctl.output.take() {
            counters.output_queued.sub(b.len() as u64);
            core.pool.release_output(b);
        }
        counters.open.sub(1);
        Some(e.ctl.fd)
    }

    /// A drain began with a hand-over unfinished (the server ends a session before draining,
    /// so only a shard that missed it gets here): lent connections are served again, so they
    /// drain with the rest; held ones go back to the old process.
    pub(crate) fn settle_handover(&mut self) {
        // Committed ones are this process's: served (and drained) like the rest.
        while self.activating() {
            self.activate_some();
        }
        if !self.handover.lent.is_empty() {
            log::warn!(
                "{}: draining with lent connections: taking them back",
                self.name
            );
            self.restore();
        }
        if !self.handover.held.is_empty() {
            self.abandon();
        }
    }
}
