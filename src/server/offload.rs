//! The offload pool: a bounded set of threads for the blocking work a service must not do on a
//! shard (a database call, a password hash, a file read).
//!
//! ```text
//!   shard-00 ── Peers::offload(conn, job) ──► jobs channel ──► offload-00 … offload-NN
//!      ▲                                                              │ job() -> result
//!      └──── on_offload(conn, result) ◄── shard's result channel + eventfd wake ◄┘
//! ```
//!
//! Threads: the pool's own (`offload-NN`) run jobs; any shard submits; each result goes back to
//! the shard that submitted it, on that shard's result channel followed by a wake of its
//! eventfd, and the shard hands it to [`Service::on_offload`] with the connection, on its own
//! thread. The connection's [`Token`] travels with the job: if the connection has closed (or is
//! closing) by the time the result arrives, its generation no longer matches and the result is
//! dropped and counted (`offload dropped`).
//!
//! Bounds: at most `threads + queue` jobs are in flight (waiting, running, or with a result on
//! its way to its shard); a submission beyond that is refused at once with
//! [`OffloadError::Full`], so the service sees the backpressure and nothing queues without
//! bound. The pool is created by the first submission (a server whose services never offload
//! has no offload threads), and stopped after the shards at shutdown: a job still running then
//! is waited for a short while and then abandoned (its thread ends when the job does).
//!
//! Metrics (owned by the pool, in [`crate::stats`], shown by `/metrics`): queued and running
//! gauges, accepted, done, rejected, dropped and panicked counts, and the time from submission
//! to the result's delivery as a histogram.
//!
//! The crate documentation (`src/lib.rs`) has a service that offloads, end to end.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, unbounded, Receiver, Sender};
use parking_lot::Mutex;

use crate::conn::Token;
use crate::server::shard::lifecycle::panic_message;
use crate::stats::Stats;
use crate::sys::waker::Waker;

/// How long shutdown waits for jobs that are still running before it abandons their threads.
const STOP_WAIT: Duration = Duration::from_secs(2);

/// The size of the offload pool (`[offload]` in the product's configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffloadSpec {
    /// Threads that run jobs.
    pub threads: usize,
    /// Jobs that may wait for a thread; with the running ones, the bound of jobs in flight.
    pub queue: usize,
}

impl Default for OffloadSpec {
    /// 8 threads and a queue of 1024 jobs.
    fn default() -> Self {
        OffloadSpec {
            threads: 8,
            queue: 1024,
        }
    }
}

/// Why a job was not accepted. The job is dropped; the service answers its client (a "busy"
/// reply) or tries later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    /// `limit` jobs (threads plus queue) are in flight already: backpressure.
    #[error("the offload pool is full ({limit} jobs in flight)")]
    Full {
        /// Threads plus queue.
        limit: usize,
    },
    /// The pool could not start any thread (the error was logged when it was tried).
    #[error("the offload pool has no threads (they could not be started)")]
    Unavailable,
    /// The server is shutting down.
    #[error("the offload pool is stopping")]
    Stopped,
}

/// A job's outcome, on its way back to its shard.
pub(crate) enum Outcome<C> {
    Ok(C),
    /// The job panicked; the message is for the log.
    Panicked(String),
}

/// A result for one connection of one shard.
pub(crate) struct Done<C> {
    pub token: Token,
    pub queued_at: Instant,
    pub outcome: Outcome<C>,
}

struct Job<C> {
    shard: usize,
    token: Token,
    queued_at: Instant,
    work: Box<dyn FnOnce() -> C + Send>,
}

/// Where results go: each shard's result channel and waker.
pub(crate) struct ResultPort<C> {
    pub tx: Sender<Done<C>>,
    pub waker: Waker,
}

/// The pool as every shard's [`Peers`](crate::server::Peers) sees it: created empty with the
/// shard pool, its threads started by the first submission.
pub(crate) struct Offload<C> {
    spec: OffloadSpec,
    stats: Arc<Stats>,
    results: Box<[ResultPort<C>]>,
    workers: OnceLock<Option<Workers<C>>>,
    stopped: AtomicBool,
}

struct Workers<C> {
    jobs: Sender<Job<C>>,
    /// A receiving end kept to discard what is left at shutdown.
    leftover: Receiver<Job<C>>,
    /// Dropped to stop the threads.
    stop: Mutex<Option<Sender<()>>>,
    handles: Mutex<Vec<JoinHandle<()>>>,
}

impl<C: Send + 'static> Offload<C> {
    pub(crate) fn new(spec: OffloadSpec, stats: Arc<Stats>, results: Vec<ResultPort<C>>) -> Self {
        Offload {
            spec: OffloadSpec {
                threads: spec.threads.max(1),
                queue: spec.queue,
            },
            stats,
            results: results.into(),
            workers: OnceLock::new(),
            stopped: AtomicBool::new(false),
        }
    }

    /// Accepts `work` for the connection `token` of `shard`, or refuses it at once.
    pub(crate) fn submit(
        self: &Arc<Self>,
        shard: usize,
        token: Token,
        work: Box<dyn FnOnce() -> C + Send>,
    ) -> Result<(), OffloadError> {
        let c = self.stats.offload();
        if self.stopped.load(Acquire) {
            c.rejected.inc();
            return Err(OffloadError::Stopped);
        }
        let Some(workers) = self.workers.get_or_init(|| self.start()) else {
            c.rejected.inc();
            return Err(OffloadError::Unavailable);
        };
        let limit = self.spec.threads + self.spec.queue;
        // Reserve a place first: the bound holds however many shards submit at once.
        if c.in_flight.fetch_add(1, AcqRel) >= limit {
            c.in_flight.fetch_sub(1, AcqRel);
            c.rejected.inc();
            return Err(OffloadError::Full { limit });
        }
        c.queued.inc();
        let job = Job {
            shard,
            token,
            queued_at: Instant::now(),
            work,
        };
        if workers.jobs.send(job).is_err() {
            c.queued.sub(1);
            c.in_flight.fetch_sub(1, AcqRel);
            c.rejected.inc();
            return Err(OffloadError::Stopped);
        }
        c.accepted.inc();
        Ok(())
    }

    /// Starts the threads (the first submission). `None` if not one could be started.
    fn start(self: &Arc<Self>) -> Option<Workers<C>> {
        let c = self.stats.offload();
        c.limit.store(self.spec.threads + self.spec.queue, Relaxed);
        c.started.store(true, Relaxed);
        // Unbounded in type only: admission (`in_flight`) bounds it, and nothing is allocated
        // for places that are never used.
        let (jobs, rx) = unbounded::<Job<C>>();
        let (stop, stop_rx) = unbounded::<()>();
        let mut handles = Vec::with_capacity(self.spec.threads);
        for i in 0..self.spec.threads {
            let (pool, rx, stop_rx) = (self.clone(), rx.clone(), stop_rx.clone());
            match std::thread::Builder::new()
                .name(format!("offload-{i:02}"))
                .spawn(move || pool.work(&rx, &stop_rx))
            {
                Ok(h) => handles.push(h),
                Err(e) => {
                    log::error!(
                        "offload pool: cannot start thread {i} of {}: {e}; running with {i}",
                        self.spec.threads
                    );
                    break;
                }
            }
        }
        c.threads.store(handles.len(), Relaxed);
        if handles.is_empty() {
            return None;
        }
        log::info!(
            "offload pool started: {} threads, queue {}",
            handles.len(),
            self.spec.queue
        );
        Some(Workers {
            jobs,
            leftover: rx,
            stop: Mutex::new(Some(stop)),
            handles: Mutex::new(handles),
        })
    }

    /// A pool thread: runs jobs until the pool stops.
    fn work(&self, jobs: &Receiver<Job<C>>, stop: &Receiver<()>) {
        let c = self.stats.offload();
        loop {
            let job = select! {
                recv(jobs) -> job => match job {
                    Ok(job) => job,
                    Err(_) => return,
                },
                // Nothing is ever sent: the channel disconnects when the pool stops.
                recv(stop) -> _ => return,
            };
            c.queued.sub(1);
            c.running.inc();
            let outcome = match catch_unwind(AssertUnwindSafe(job.work)) {
                Ok(r) => Outcome::Ok(r),
                Err(payload) => Outcome::Panicked(panic_message(&*payload).to_string()),
            };
            c.running.sub(1);
            let port = &self.results[job.shard];
            let done = Done {
                token: job.token,
                queued_at: job.queued_at,
                outcome,
            };
            if port.tx.send(done).is_ok() {
                port.waker.wake();
            } else {
                // The shard is gone (shut down, or died): nobody will take the result.
                c.in_flight.fetch_sub(1, AcqRel);
                c.dropped.inc();
            }
        }
    }
}

/// What a shard pool holds of its offload pool: a way to stop it.
pub(crate) trait Stop: Send + Sync {
    /// Stops the threads (after the shards have ended): discards the jobs still waiting,
    /// waits up to a bound for the running ones. False if a thread had to be abandoned.
    fn stop(&self) -> bool;
}

impl<C: Send + 'static> Stop for Offload<C> {
    fn stop(&self) -> bool {
        self.stopped.store(true, Release);
        let Some(Some(workers)) = self.workers.get() else {
            return true;
        };
        drop(workers.stop.lock().take());
        let c = self.stats.offload();
        let mut discarded = 0;
        while let Ok(job) = workers.leftover.try_recv() {
            drop(job);
            discarded += 1;
        }
        if discarded > 0 {
            c.queued.sub(discarded);
            c.in_flight.fetch_sub(discarded as usize, AcqRel);
            c.dropped.add(discarded);
            log::warn!("offload pool: {discarded} jobs discarded at shutdown");
        }
        let deadline = Instant::now() + STOP_WAIT;
        let mut clean = true;
        for handle in workers.handles.lock().drain(..) {
            while !handle.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if handle.is_finished() {
                clean &= handle.join().is_ok();
            } else {
                log::warn!("offload pool: a job still running at shutdown was abandoned");
                clean = false;
            }
        }
        clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(threads: usize, queue: usize) -> (Arc<Offload<u32>>, Receiver<Done<u32>>, Arc<Stats>) {
        let stats = Arc::new(Stats::new(1));
        let (tx, rx) = unbounded();
        let waker = Waker::new().unwrap();
        let pool = Arc::new(Offload::new(
            OffloadSpec { threads, queue },
            stats.clone(),
            vec![ResultPort { tx, waker }],
        ));
        (pool, rx, stats)
    }

    #[test]
    fn no_threads_until_the_first_job() {
        let (pool, rx, stats) = pool(2, 4);
        assert!(stats.snapshot().offload.is_none(), "no pool, no metrics");
        pool.submit(0, Token(7), Box::new(|| 41 + 1)).unwrap();
        let done = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(done.token, Token(7));
        assert!(matches!(done.outcome, Outcome::Ok(42)));
        let snap = stats.snapshot().offload.unwrap();
        assert_eq!((snap.threads, snap.limit, snap.accepted), (2, 6, 1));
        assert!(pool.stop());
    }

    #[test]
    fn the_bound_is_threads_plus_queue_and_results_hold_their_place() {
        let (pool, rx, stats) = pool(1, 2);
        let (gate_tx, gate_rx) = crossbeam_channel::bounded::<()>(0);
        // The first job holds the only thread until the gate opens.
        pool.submit(
            0,
            Token(1),
            Box::new(move || gate_rx.recv().map_or(0, |_| 1)),
        )
        .unwrap();
        pool.submit(0, Token(2), Box::new(|| 2)).unwrap();
        pool.submit(0, Token(3), Box::new(|| 3)).unwrap();
        assert_eq!(
            pool.submit(0, Token(4), Box::new(|| 4)),
            Err(OffloadError::Full { limit: 3 })
        );
        gate_tx.send(()).unwrap();
        let got: Vec<u64> = (0..3)
            .map(|_| rx.recv_timeout(Duration::from_secs(10)).unwrap().token.0)
            .collect();
        assert_eq!(got, vec![1, 2, 3], "one thread runs them in order");
        // The results are not taken yet (a shard releases a place when it takes one): still full.
        assert!(matches!(
            pool.submit(0, Token(5), Box::new(|| 5)),
            Err(OffloadError::Full { .. })
        ));
        stats.offload().in_flight.fetch_sub(3, AcqRel);
        pool.submit(0, Token(6), Box::new(|| 6)).unwrap();
        let snap = stats.snapshot().offload.unwrap();
        assert_eq!((snap.accepted, snap.rejected), (4, 2));
        assert!(pool.stop());
    }

    #[test]
    fn a_panicking_job_is_reported_and_the_thread_carries_on() {
        let (pool, rx, stats) = pool(1, 4);
        pool.submit(0, Token(1), Box::new(|| panic!("job exploded")))
            .unwrap();
        pool.submit(0, Token(2), Box::new(|| 2)).unwrap();
        let first = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(matches!(first.outcome, Outcome::Panicked(ref m) if m == "job exploded"));
        let second = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(matches!(second.outcome, Outcome::Ok(2)));
        assert_eq!(stats.snapshot().offload.unwrap().running, 0);
        assert!(pool.stop());
    }

    #[test]
    fn stop_discards_waiting_jobs_and_refuses_new_ones() {
        let (pool, rx, stats) = pool(1, 8);
        let (gate_tx, gate_rx) = crossbeam_channel::bounded::<()>(0);
        pool.submit(
            0,
            Token(1),
            Box::new(move || gate_rx.recv().map_or(0, |_| 1)),
        )
        .unwrap();
        wait_for(|| stats.offload().running.get() == 1);
        for t in 2..5 {
            pool.submit(0, Token(t), Box::new(|| 0)).unwrap();
        }
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let _ = gate_tx.send(());
        });
        assert!(pool.stop());
        let snap = stats.snapshot().offload.unwrap();
        assert_eq!((snap.dropped, snap.queued, snap.running), (3, 0, 0));
        assert_eq!(rx.try_iter().count(), 1, "the running job finished");
        assert_eq!(
            pool.submit(0, Token(9), Box::new(|| 0)),
            Err(OffloadError::Stopped)
        );
    }

    #[test]
    fn latency_lands_in_its_bucket() {
        let stats = Stats::new(1);
        stats.offload().started.store(true, Relaxed);
        stats.offload().record_latency(Duration::from_micros(1500));
        stats.offload().record_latency(Duration::from_secs(60));
        let h = stats.snapshot().offload.unwrap().latency;
        assert_eq!(h.cumulative[0], 0);
        assert_eq!(h.cumulative[1], 1, "1.5 ms is under the 2 ms bound");
        assert_eq!(h.cumulative[h.bounds_seconds.len() - 1], 1);
        assert_eq!(h.count(), 2, "a minute lands in +Inf");
        assert!((h.sum_seconds - 60.0015).abs() < 1e-9);
    }

    fn wait_for(cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
