//! `shardnet bench`: the load generator, its report, the shard-count sweep and side-by-side
//! comparisons.
//!
//! The client runs on the same shard engine as the server ([`client`]). A run ([`run`])
//! connects, warms up, resets the counters, measures for a bounded time and collects every
//! client shard's histogram; when the server's pid is known (`--spawn`, `--server-pid`) it also
//! reads the server's CPU time per thread from /proc, which gives the per-core throughput:
//! requests per server CPU-second.
//!
//! Files by concern: [`args`] (the flags), [`run`] (one measured run), [`report`] (the
//! histogram, the one [`Measurement`] builder, table and JSON), [`compare`] (alternating
//! servers), [`sweep`] and [`plot`] (shard counts), [`spawn`] (the servers the bench starts,
//! owned by guards that stop them); the clients: [`client`] (echo, http, ws, idle, fan-out
//! subscribers on the shard engine), [`fanout`] (the publisher), [`wrk`], [`multi`]
//! (`--processes`), and [`procfs`] (what the bench reads about a server from /proc);
//! [`takeover`] measures a hand-over to a new process (`--takeover`).
//!
//! Everything here runs on the controller thread except the client shards and helper threads
//! each module names.

pub mod args;
pub mod client;
mod compare;
pub mod fanout;
pub mod multi;
mod plot;
pub mod procfs;
pub mod report;
pub mod run;
pub mod spawn;
mod sweep;
pub mod takeover;
pub mod wrk;

use std::sync::atomic::Ordering;

use anyhow::{bail, Context};

pub use args::{parse_cores, parse_sources, BenchArgs, TriggerArg};
pub use report::{print_table, IdleReport, Latency, Measurement, Report};
pub use run::measure;

/// Runs `shardnet bench`. Returns the process exit code.
pub fn main(args: BenchArgs) -> anyhow::Result<i32> {
    if let Some(path) = &args.child_report {
        run::CHILD.store(true, Ordering::Relaxed);
        let target = args.target.context("a child needs --target")?;
        let m = measure(&args, target, None, "child")?;
        let report = multi::ChildReport {
            requests: m.requests,
            seconds: m.seconds,
            bytes: m.megabytes_per_second * m.seconds * 1e6,
            errors: m.errors,
            first_error: m.first_error.clone(),
            histogram: multi::encode_histogram(m.histogram.as_ref().context("no histogram")?),
        };
        std::fs::write(path, serde_json::to_string(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        return Ok(if m.errors > 0 { 1 } else { 0 });
    }
    if args.takeover {
        return takeover::run(&args);
    }
    if let Some(list) = &args.sweep_shards {
        return sweep::sweep(&args, list);
    }
    if !args.compare.is_empty() {
        return compare::compare(&args);
    }
    let (target, pid, _server) = if args.spawn {
        let s = spawn::shardnet(&args, args.shards)?;
        (s.addr(args.listener())?, Some(s.pid()), Some(s))
    } else {
        let Some(t) = args.target else {
            bail!("give --target ADDR or --spawn")
        };
        (t, args.server_pid, None)
    };
    let m = measure(&args, target, pid, "shardnet")?;
    print_table(std::slice::from_ref(&m));
    report::write_json(&args, vec![m.clone()], None, None)?;
    Ok(if m.errors > 0 { 1 } else { 0 })
}
