//! `--compare`: the same load against shardnet and each other server command, alternating
//! within each round (the first slot rotates), `--rounds` times; medians per server and
//! shardnet's throughput over each other's. Every command is checked before the first round, so
//! a missing binary is reported at once with what to build, not after a full round.
//!
//! Runs on the controller thread; one server runs at a time, owned by a [`Spawned`] guard.

use super::args::{parse_cores, BenchArgs};
use super::report::{us, write_json, Measurement};
use super::run::{measure, Servers};
use super::spawn::{self, Quota, Spawned};

/// The middle value (the upper one of an even count); 0 for none.
pub(super) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

/// Runs the comparison; returns the exit code (1 if any run failed or counted errors).
pub(super) fn compare(args: &BenchArgs) -> anyhow::Result<i32> {
    let cores = parse_cores(&args.server_cores)?;
    for c in &args.compare {
        spawn::check_command(c)?;
    }
    let mut names = vec!["shardnet".to_string()];
    for (i, c) in args.compare.iter().enumerate() {
        names.push(
            args.compare_name
                .get(i)
                .cloned()
                .unwrap_or_else(|| c.split_whitespace().next().unwrap_or("other").to_string()),
        );
    }
    let mut runs: Vec<Measurement> = Vec::new();
    let mut errors = 0;
    for round in 0..args.rounds.max(1) {
        // Rotate who goes first: on a shared machine the first run of a round is not like the
        // others (caches, frequency, neighbours), and no server should always get that slot.
        for j in 0..names.len() {
            let k = (j + round) % names.len();
            let name = &names[k];
            let server: Spawned = if k == 0 {
                spawn::shardnet(args, args.shards)?
            } else {
                spawn::command(
                    &args.compare[k - 1],
                    &cores,
                    args.server_quota.map(Quota::percent),
                )?
            };
            let target = if k == 0 {
                server.addr(args.listener())?
            } else {
                server.addr("main")?
            };
            let label = format!("{name}#{}", round + 1);
            match measure(args, &Servers::one(target, Some(server.pid())), &label) {
                Ok(mut m) => {
                    errors += m.errors;
                    m.label = name.clone();
                    eprintln!(
                        "{label}: {:.0} req/s, p99 {} us, {} errors",
                        m.requests_per_second,
                        us(m.latency_us.p99),
                        m.errors
                    );
                    runs.push(m);
                }
                Err(e) => {
                    errors += 1;
                    eprintln!("{label}: failed: {e:#}");
                }
            }
            drop(server);
        }
    }
    // Medians per server and ratios against shardnet.
    let mut summary = Vec::new();
    let shard_median = median(
        runs.iter()
            .filter(|m| m.label == "shardnet")
            .map(|m| m.requests_per_second)
            .collect(),
    );
    println!("\nmedian of {} rounds ({}):", args.rounds, args.describe());
    println!(
        "{:<20} {:>12} {:>10} {:>10} {:>16} {:>22}",
        "server", "req/s", "p99us", "CPU s", "req/CPU-second", "shardnet / this (req/s)"
    );
    for name in &names {
        let mine: Vec<&Measurement> = runs.iter().filter(|m| &m.label == name).collect();
        let rps = median(mine.iter().map(|m| m.requests_per_second).collect());
        let p99s: Vec<f64> = mine
            .iter()
            .filter_map(|m| m.latency_us.p99)
            .map(|p| p as f64)
            .collect();
        let p99 = (!p99s.is_empty()).then(|| median(p99s));
        let cpu = median(mine.iter().filter_map(|m| m.server_cpu_seconds).collect());
        let pc = median(mine.iter().filter_map(|m| m.per_core_throughput).collect());
        let all: Vec<String> = mine
            .iter()
            .map(|m| format!("{:.0}", m.requests_per_second))
            .collect();
        let ratio = if rps > 0.0 { shard_median / rps } else { 0.0 };
        println!(
            "{name:<20} {rps:>12.0} {:>10} {cpu:>10.2} {pc:>16.0} {ratio:>22.3}   runs: {}",
            us(p99.map(|p| p as u64)),
            all.join(", ")
        );
        summary.push(serde_json::json!({ "server": name, "median_rps": rps, "median_p99_us": p99, "median_per_core": pc, "shardnet_over_this": ratio, "runs_rps": all }));
    }
    write_json(args, runs, Some(serde_json::Value::Array(summary)), None)?;
    Ok(if errors > 0 { 1 } else { 0 })
}
