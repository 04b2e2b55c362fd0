//! A shard's part of a hand-over between processes (see [`crate::server::handover`]).
//!
//! Owned by the shard thread; each step arrives as a control message and is acknowledged once
//! done. In the old process: pause and resume its own listeners (reuseport), export (every open
//! connection the service can describe goes out in batches of up to `MAX_FDS` descriptors and
//! becomes `Lent`: out of epoll and the wheel, untouched), then either restore (the hand-over
//! failed: back to `Open`, registered again) or release (it committed: forgotten without being
//! closed). In the new process: receive (each connection arrives `UNCOMMITTED`: in the slab with its
//! buffers, deadlines and service state, but not in epoll or the wheel, its output queued),
//! prepare (take what is still in the channel), then activate (register and serve) or abandon.
//!
//! A connection is never served by both processes: the old one stops at export and starts again
//! only on restore; the new one starts only on activate, which its taking thread sends after the
//! commit reached the old process (see the ownership rule in `handover/mod.rs`).

use std::os::fd::{AsFd, BorrowedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Duration;

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

/// What a shard keeps during a hand-over.
pub(crate) struct HandoverState<C> {
    /// Old process: connections sent and not yet released or restored.
    pub(super) lent: Vec<Token>,
    /// Old process: results of offloaded jobs that came back for lent connections, delivered
    /// if they are restored, dropped and counted if they are released.
    pub(super) results: Vec<Done<C>>,
    /// New process: connections received and not yet activated or abandoned.
    pub(super) held: Vec<Token>,
    /// New process: where imports report.
    pub(super) job: Option<Arc<ImportJob>>,
    /// Old process: this shard's own listeners while accepting is paused (reuseport).
    pub(super) paused: Vec<Listener>,
}

impl<C> Default for HandoverState<C> {
    fn default() -> Self {
        HandoverState {
            lent: Vec::new(),
            results: Vec::new(),
            held: Vec::new(),
            job: None,
            paused: Vec::new(),
        }
    }
}

fn millis(d: Duration) -> u32 {
    d.as_millis().min(u32::MAX as u128) as u32
}

impl<S: Service> Shard<S> {
    /// One hand-over step (a control message).
    pub(crate) fn on_handover(&mut self, step: Handover) {
        match step {
            Handover::PauseAccept => self.pause_accept(),
            Handover::ResumeAccept => self.resume_accept(),
            Handover::Export(job) => self.export(&job),
            Handover::Restore => self.restore(),
            Handover::Release => self.release(),
            Handover::Receive(job) => self.handover.job = Some(job),
            Handover::Prepare => self.take_queued(),
            Handover::Activate => self.activate(),
            Handover::Abandon => self.abandon(),
        }
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
        if core.poller.delete(c.fd.as_fd()).is_err() {
            // Still registered: it cannot be lent safely; serve it here.
            core.after_callback(token);
            return false;
        }
        c.flags.clear(Flags::REG_READ.union(Flags::REG_WRITE));
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
            if self.register(token) {
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

    /// The new process committed: forget the lent connections without closing them.
    fn release(&mut self) {
        let lent = std::mem::take(&mut self.handover.lent);
        let n = lent.len() as u64;
        for token in lent {
            self.forget(token);
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

    /// The hand-over committed: serve every held connection.
    fn activate(&mut self) {
        self.take_queued();
        let held = std::mem::take(&mut self.handover.held);
        let mut n = 0;
        for token in held {
            let Some(e) = self.core.conns.get_mut(token) else {
                continue;
            };
            if !e.ctl.flags.has(Flags::UNCOMMITTED) {
                continue;
            }
            e.ctl.flags.clear(Flags::UNCOMMITTED);
            n += 1;
            if e.ctl.flags.has(Flags::CLOSE_REQ) {
                // The service asked to close while importing.
                e.ctl.flags.clear(Flags::CLOSE_REQ);
                self.core.continue_close(token);
                continue;
            }
            let resume = e.ctl.flags.has(Flags::RESUME);
            if self.register(token) {
                self.core.rearm(token, false);
                if resume {
                    self.core.ready.push(token);
                }
            }
        }
        self.handover.job = None;
        self.core.counters().received.add(n);
        self.reap();
    }

    /// The hand-over failed: the held connections are the old process's again.
    fn abandon(&mut self) {
        self.take_queued();
        for token in std::mem::take(&mut self.handover.held) {
            self.forget(token);
        }
        self.handover.job = None;
    }

    /// Registers a connection in epoll as its state asks (a restored or activated one). False
    /// if that failed: it is doomed.
    fn register(&mut self, token: Token) -> bool {
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
        match self.core.poller.add(c.fd.as_fd(), token.0, interest) {
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
    fn forget(&mut self, token: Token) {
        let core = &mut self.core;
        let Some(mut e) = core.conns.remove(token) else {
            return;
        };
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
    }

    /// A drain began with a hand-over unfinished (the server ends a session before draining,
    /// so only a shard that missed it gets here): lent connections are served again, so they
    /// drain with the rest; held ones go back to the old process.
    pub(crate) fn settle_handover(&mut self) {
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
