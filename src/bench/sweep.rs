//! `--sweep-shards 1,2,4`: the same load against a spawned shardnet at each shard count,
//! `--rounds` times each; medians, an SVG plot beside the JSON report, and the recommended count
//! (the smallest within 5% of the best throughput).
//!
//! Runs on the controller thread; one server at a time.

use std::path::PathBuf;

use anyhow::{bail, Context};

use super::args::BenchArgs;
use super::compare::median;
use super::report::{us, write_json};
use super::run::{measure, Servers};
use super::{plot, spawn};

/// Where the sweep writes its JSON (and the SVG beside it) without `--json`: under bench-out/,
/// which git ignores.
pub const DEFAULT_JSON: &str = "bench-out/sweep.json";

/// Runs the sweep; returns the exit code.
pub(super) fn sweep(args: &BenchArgs, list: &str) -> anyhow::Result<i32> {
    let counts: Vec<usize> = list
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<usize>()
                .with_context(|| format!("bad shard count `{s}`"))
        })
        .collect::<anyhow::Result<_>>()?;
    if counts.is_empty() || counts.contains(&0) {
        bail!("--sweep-shards takes positive counts, like 1,2,4");
    }
    let mut points = Vec::new();
    let mut runs = Vec::new();
    for &n in &counts {
        let mut rps = Vec::new();
        let mut p99 = Vec::new();
        for round in 0..args.rounds.max(1) {
            let server = spawn::shardnet(args, n)?;
            let servers = Servers::one(server.addr(args.listener())?, Some(server.pid()));
            let m = measure(args, &servers, &format!("shards={n}#{}", round + 1))?;
            eprintln!(
                "shards={n} round {}: {:.0} req/s, p99 {} us",
                round + 1,
                m.requests_per_second,
                us(m.latency_us.p99)
            );
            rps.push(m.requests_per_second);
            p99.extend(m.latency_us.p99.map(|p| p as f64));
            runs.push(m);
        }
        points.push((n, median(rps), median(p99)));
    }
    let best = points.iter().map(|p| p.1).fold(0.0, f64::max);
    // The smallest count within 5% of the best: more shards than that cost cores for nothing.
    let pick = points
        .iter()
        .find(|p| p.1 >= 0.95 * best)
        .expect("non-empty");
    println!("\nshards  req/s(median)  p99us(median)");
    for (n, r, p) in &points {
        println!("{n:>6} {r:>14.0} {p:>14.0}");
    }
    let why = if Some(pick.0) == points.iter().map(|p| p.0).max() {
        "the most shards tried gave the most throughput; try more if this host has the cores"
    } else {
        "more shards did not pay for their cores"
    };
    println!(
        "\nrecommended: shards = {}  ({:.0} req/s, within 5% of the best {:.0}; {why})",
        pick.0, pick.1, best
    );
    let out = args
        .json
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_JSON));
    let svg = out.with_extension("svg");
    if let Some(dir) = svg.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    plot::plot(&points, &svg)?;
    eprintln!("plot written to {}", svg.display());
    let summary = serde_json::json!({
        "points": points.iter().map(|(n, r, p)| serde_json::json!({"shards": n, "median_rps": r, "median_p99_us": p})).collect::<Vec<_>>(),
        "recommended_shards": pick.0,
    });
    write_json(args, runs, Some(summary), Some(&out))?;
    Ok(0)
}
