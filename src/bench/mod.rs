//! `shardnet bench`: the load generator, its report, the shard-count sweep and side-by-side
//! comparisons.
//!
//! The client runs on the same shard engine as the server ([`client`]). A run ([`run`])
//! connects, warms up, resets the counters, measures for a bounded time and collects every
//! client shard's histogram; when the server's pid is known (`--spawn`, `--server-pid`) it also
//! reads the server's CPU time per thread from /proc, which gives the per-core throughput:
//! requests per server CPU-second.
//!
//! Files by concern: [`args`] (the flags), [`scale`] (server and client processes and source
//! addresses picked for `-c`), [`run`] (one measured run), [`report`] (the histogram, the one
//! [`Measurement`] builder, table and JSON), [`memory`] (the servers' PSS and the kernel's
//! memory per connection), [`compare`] (alternating servers), [`sweep`] and [`plot`] (shard
//! counts), [`spawn`] (the servers the bench starts, one or a group on one port, owned by
//! guards that stop them), [`tokens`] (the tokens of authenticated connections); the clients:
//! [`client`] (echo, http, ws, idle, fan-out subscribers on the shard engine), [`fanout`] (the
//! publisher), [`wrk`], [`multi`] (`--processes`), and [`procfs`] (what the bench reads about a
//! server from /proc); [`takeover`] measures a hand-over to a new process (`--takeover`).
//!
//! Everything here runs on the controller thread except the client shards and helper threads
//! each module names.

pub mod args;
pub mod client;
mod compare;
pub mod fanout;
pub mod memory;
pub mod multi;
mod plot;
pub mod procfs;
pub mod report;
pub mod run;
pub mod scale;
pub mod spawn;
mod sweep;
pub mod takeover;
pub mod tokens;
pub mod wrk;

use std::sync::atomic::Ordering;

use anyhow::{bail, Context};

pub use args::{parse_cores, parse_sources, BenchArgs, TriggerArg};
pub use report::{print_table, IdleReport, Latency, Measurement, Report};
pub use run::{measure, Servers};

/// Runs `shardnet bench`. Returns the process exit code.
pub fn main(args: BenchArgs) -> anyhow::Result<i32> {
    if let Some(path) = &args.child_report {
        run::CHILD.store(true, Ordering::Relaxed);
        let target = args.target.context("a child needs --target")?;
        let m = measure(&args, &Servers::one(target, None), "child")?;
        let report = multi::ChildReport {
            requests: m.requests,
            seconds: m.seconds,
            bytes: m.megabytes_per_second * m.seconds * 1e6,
            errors: m.errors,
            first_error: m.first_error.clone(),
            histogram: multi::encode_histogram(m.histogram.as_ref().context("no histogram")?),
            verified: m.idle.as_ref().map(|i| i.verified),
            fanout: m.fanout.clone(),
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
    let args = scale::fill_in(&args)?;
    let (servers, group, broker) = if args.spawn {
        let broker = args.broker.map(spawn::broker).transpose()?;
        let k = args.server_processes.unwrap_or(1);
        let url = broker.as_ref().map(spawn::SpawnedBroker::url);
        let group = spawn::shardnet_group(&args, args.shards, k, url)?;
        let admin = group.own_http()?;
        // With a broker, one process takes each publish and the broker carries it to all.
        let publish = if broker.is_some() {
            admin[..1].to_vec()
        } else {
            admin.clone()
        };
        let servers = Servers {
            target: group.addr(args.listener())?,
            pids: group.pids(),
            publish,
            admin,
        };
        if broker.is_some() {
            // Publishes are refused until a process has reached the broker.
            for &admin in &servers.admin {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
                while fanout::http_get(admin, "/healthz").as_deref() != Some(b"ok\n") {
                    if std::time::Instant::now() > deadline {
                        bail!("a spawned server did not reach the broker within 20 s");
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
        }
        (servers, Some(group), broker)
    } else {
        let Some(t) = args.target else {
            bail!("give --target ADDR or --spawn")
        };
        (Servers::one(t, args.server_pid), None, None)
    };
    let m = measure(&args, &servers, "shardnet");
    // The servers stop before their broker, which would otherwise have them warn that it went.
    drop(group);
    drop(broker);
    let m = m?;
    print_table(std::slice::from_ref(&m));
    report::write_json(&args, vec![m.clone()], None, None)?;
    Ok(if m.errors > 0 { 1 } else { 0 })
}
