//! `--wrk`: HTTP load from Debian's `wrk` instead of the built-in client, so HTTP figures can be
//! compared with those published for other servers (TechEmpower's plaintext test uses wrk with
//! the same pipelining script). One wrk thread per client core, pinned with taskset; pipelining
//! depth from `--depth` through `benches/pipeline.lua` (embedded here).

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

use super::args::{parse_cores, BenchArgs};
use super::report::{CpuMeter, Latency, Measurement, Tally};
use super::spawn::require_program;

const PIPELINE_LUA: &str = include_str!("../../benches/pipeline.lua");

/// What one wrk run printed.
#[derive(Debug, Default)]
pub struct WrkOutput {
    pub requests: u64,
    pub seconds: f64,
    pub bytes: f64,
    pub errors: u64,
    pub latency_us: Latency,
}

/// One measured run: a warm-up wrk run, then the measured one with the server's CPU read around it.
pub fn measure(
    args: &BenchArgs,
    target: SocketAddr,
    pids: &[u32],
    label: &str,
) -> anyhow::Result<Measurement> {
    // Both programs are checked here, so that a missing wrk is not reported as taskset's
    // "failed to execute wrk".
    let wrk = require_program("wrk", "Debian/Ubuntu: apt-get install wrk")?;
    let taskset = require_program("taskset", "Debian/Ubuntu: apt-get install util-linux")?;
    let script = std::env::temp_dir().join(format!("shardnet-pipeline-{}.lua", std::process::id()));
    std::fs::write(&script, PIPELINE_LUA).context("cannot write the wrk script")?;
    let cores = parse_cores(&args.client_cores)?;
    let path = args.path.clone().unwrap_or_else(|| "/plaintext".into());
    // wrk (Debian's is built with OpenSSL) speaks TLS for an https URL; it does not verify the
    // certificate, so --tls-ca is not used here.
    let scheme = if args.tls { "https" } else { "http" };
    let url = format!("{scheme}://{target}{path}");
    let run = |d: Duration, latency: bool| -> anyhow::Result<String> {
        let list: Vec<String> = cores.iter().map(|c| c.to_string()).collect();
        let mut cmd = Command::new(&taskset);
        cmd.arg("-c")
            .arg(list.join(","))
            .arg(&wrk)
            .arg(format!("-t{}", cores.len().max(1)))
            .arg(format!("-c{}", args.connections))
            .arg(format!("-d{}s", d.as_secs_f64().ceil().max(1.0) as u64))
            .arg("--timeout")
            .arg("5s");
        if latency {
            cmd.arg("--latency");
        }
        cmd.arg("-s")
            .arg(&script)
            .arg(&url)
            .arg("--")
            .arg(args.depth.max(1).to_string());
        let out = cmd
            .output()
            .with_context(|| format!("cannot run {} {}", taskset.display(), wrk.display()))?;
        if !out.status.success() {
            // wrk reports its errors on stdout.
            bail!(
                "wrk failed: {} {}",
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let result = (|| {
        if !args.warmup.is_zero() {
            run(args.warmup, false)?;
        }
        let cpu = CpuMeter::start(pids);
        let text = run(args.duration, true)?;
        let cpu = cpu.stop();
        let parsed =
            parse(&text).with_context(|| format!("{label}: cannot read wrk's output:\n{text}"))?;
        Ok::<_, anyhow::Error>((parsed, cpu))
    })();
    let _ = std::fs::remove_file(&script);
    let (w, cpu) = result?;
    let mut tally = Tally {
        requests: w.requests,
        bytes: w.bytes,
        ..Tally::default()
    };
    tally.fail(w.errors, || format!("wrk counted {} errors", w.errors));
    let note = w.latency_note();
    Ok(Measurement::builder(label, args)
        .shape(args.connections, args.depth, 0)
        .counted(tally, w.seconds.max(1e-9))
        .latency(w.latency_us, note)
        .server_cpu(cpu)
        .build())
}

impl WrkOutput {
    /// Why latency figures are missing: wrk printed `0.00us` for them, which no request takes
    /// (wrk records one latency per pipelined batch of `--depth` requests, from the batch's
    /// first write to its last response; a zero means it has no sample for that figure).
    fn latency_note(&self) -> Option<String> {
        let l = &self.latency_us;
        let missing: Vec<&str> = [
            ("p50", l.p50),
            ("p90", l.p90),
            ("p99", l.p99),
            ("max", l.max),
        ]
        .iter()
        .filter(|(_, v)| v.is_none())
        .map(|(n, _)| *n)
        .collect();
        (!missing.is_empty()).then(|| {
            format!(
                "wrk printed 0.00us for {}, which is no measured latency (wrk records one latency per pipelined batch, not per request)",
                missing.join(", ")
            )
        })
    }
}

/// `1.23ms`, `456.78us`, `2.00s`, `1.5m` → microseconds.
fn duration_us(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().ok()?;
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => return None,
    };
    Some((n * scale).round() as u64)
}

/// A latency wrk printed; `0.00us` (or anything unreadable) is no measurement.
fn measured_us(s: &str) -> Option<u64> {
    duration_us(s).filter(|&us| us > 0)
}

/// `150.00MB` → bytes.
fn size_bytes(s: &str) -> Option<f64> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().ok()?;
    let scale = match unit {
        "" | "B" => 1.0,
        "KB" => 1024.0,
        "MB" => 1024.0 * 1024.0,
        "GB" => 1024.0 * 1024.0 * 1024.0,
        "TB" => 1024.0f64.powi(4),
        _ => return None,
    };
    Some(n * scale)
}

/// Reads wrk 4's report: the totals line, the latency line and distribution, and every error
/// count (socket errors, non-2xx/3xx responses).
pub fn parse(text: &str) -> anyhow::Result<WrkOutput> {
    let mut w = WrkOutput::default();
    let mut totals = false;
    for line in text.lines() {
        let t = line.trim();
        let words: Vec<&str> = t.split_whitespace().collect();
        match words.as_slice() {
            // "1234567 requests in 4.00s, 150.00MB read"
            [n, "requests", "in", secs, bytes, "read"] => {
                w.requests = n.parse().context("request count")?;
                w.seconds =
                    duration_us(secs.trim_end_matches(',')).context("run duration")? as f64 / 1e6;
                w.bytes = size_bytes(bytes).context("bytes read")?;
                totals = true;
            }
            // "Latency   1.23ms   2.34ms  45.67ms   89.00%"
            ["Latency", _avg, _stdev, max, _] => w.latency_us.max = measured_us(max),
            ["50%", v] => w.latency_us.p50 = measured_us(v),
            ["90%", v] => w.latency_us.p90 = measured_us(v),
            ["99%", v] => w.latency_us.p99 = measured_us(v),
            // "Socket errors: connect 0, read 0, write 0, timeout 0"
            ["Socket", "errors:", rest @ ..] => {
                w.errors += rest
                    .iter()
                    .filter_map(|x| x.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => {
                w.errors += n.parse::<u64>().unwrap_or(1);
            }
            _ => {}
        }
    }
    if !totals {
        bail!("no `N requests in T, B read` line");
    }
    // wrk prints no p99.9; the table shows the maximum there rather than a made-up figure.
    w.latency_us.p999 = w.latency_us.max;
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "Running 4s test @ http://127.0.0.1:8080/plaintext
  1 threads and 256 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.61ms    1.02ms  19.53ms   80.12%
    Req/Sec   705.12k    12.34k  750.00k    70.00%
  Latency Distribution
     50%    3.50ms
     75%    4.00ms
     90%    4.80ms
     99%    7.20ms
  2806160 requests in 4.00s, 353.26MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 5
Requests/sec: 701540.00
Transfer/sec:     88.32MB
";

    #[test]
    fn parses_wrk_report() {
        let w = parse(SAMPLE).unwrap();
        assert_eq!(w.requests, 2_806_160);
        assert_eq!(w.seconds, 4.0);
        assert!((w.bytes - 353.26 * 1024.0 * 1024.0).abs() < 1.0);
        assert_eq!(w.errors, 8);
        assert_eq!(w.latency_us.p50, Some(3500));
        assert_eq!(w.latency_us.p90, Some(4800));
        assert_eq!(w.latency_us.p99, Some(7200));
        assert_eq!(w.latency_us.max, Some(19530));
        assert_eq!(w.latency_note(), None);
    }

    #[test]
    fn zero_latency_is_not_a_measurement() {
        let text = SAMPLE
            .replace("99%    7.20ms", "99%    0.00us")
            .replace("50%    3.50ms", "50%    0.00us");
        let w = parse(&text).unwrap();
        assert_eq!(w.latency_us.p99, None);
        assert_eq!(w.latency_us.p50, None);
        assert_eq!(w.latency_us.p90, Some(4800));
        let note = w.latency_note().unwrap();
        assert!(note.contains("0.00us for p50, p99"), "{note}");
    }

    #[test]
    fn refuses_output_without_totals() {
        assert!(parse("Running 4s test\n").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(duration_us("456.78us"), Some(457));
        assert_eq!(duration_us("2.00s"), Some(2_000_000));
        assert_eq!(duration_us("1.5m"), Some(90_000_000));
        assert_eq!(duration_us("x"), None);
    }
}
