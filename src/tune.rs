//! `shardnet tune`: what this host should run and how far its kernel limits are from what a
//! million connections need. Reads only; changes nothing.

use std::fmt::Write as _;

/// One kernel setting: where it lives, what it is, what it should be.
pub struct Limit {
    pub key: &'static str,
    pub current: Option<String>,
    pub recommended: &'static str,
    pub ok: Option<bool>,
    pub fix: String,
    pub why: &'static str,
}

/// Everything the report is made from (gathered, or made up by tests).
pub struct HostFacts {
    pub allowed_cpus: Vec<usize>,
    /// CPU quota in cores (cgroup), if any.
    pub quota_cores: Option<f64>,
    /// NUMA nodes and their CPUs.
    pub numa: Vec<(usize, String)>,
    pub nofile: Option<(u64, u64)>,
    pub sysctls: Vec<(&'static str, Option<String>)>,
}

/// (key, recommended, how to compare, why)
const SYSCTLS: &[(&str, &str, Cmp, &str)] = &[
    (
        "fs.nr_open",
        "1048576",
        Cmp::AtLeast,
        "ceiling for RLIMIT_NOFILE: one descriptor per connection",
    ),
    (
        "fs.file-max",
        "2097152",
        Cmp::AtLeast,
        "system-wide descriptors",
    ),
    (
        "net.core.somaxconn",
        "65535",
        Cmp::AtLeast,
        "accept queue for connection bursts",
    ),
    (
        "net.ipv4.tcp_max_syn_backlog",
        "65535",
        Cmp::AtLeast,
        "half-open connections during bursts",
    ),
    (
        "net.core.netdev_max_backlog",
        "16384",
        Cmp::AtLeast,
        "packets queued per CPU",
    ),
    (
        "net.ipv4.ip_local_port_range",
        "1024 65535",
        Cmp::Range,
        "source ports for proxies and load generators",
    ),
    (
        "net.ipv4.tcp_mem",
        "1048576 2097152 3145728",
        Cmp::Third,
        "TCP memory for all sockets (pages)",
    ),
    (
        "net.ipv4.tcp_rmem",
        "4096 16384 4194304",
        Cmp::Info,
        "per-socket receive buffers: small defaults keep idle sockets cheap",
    ),
    (
        "net.ipv4.tcp_wmem",
        "4096 16384 4194304",
        Cmp::Info,
        "per-socket send buffers",
    ),
    (
        "net.ipv4.tcp_migrate_req",
        "1",
        Cmp::AtLeast,
        "zero-downtime restarts with reuse_port: queued connections move to the new listener",
    ),
    (
        "net.netfilter.nf_conntrack_max",
        "2097152",
        Cmp::AtLeast,
        "conntrack entries, if a firewall tracks connections (or use notrack)",
    ),
];

#[derive(Clone, Copy)]
enum Cmp {
    AtLeast,
    Range,
    Third,
    Info,
}

fn read_sysctl(key: &str) -> Option<String> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
}

fn nums(s: &str) -> Vec<u64> {
    s.split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect()
}

fn judge(cmp: Cmp, current: &str, recommended: &str) -> Option<bool> {
    let (c, r) = (nums(current), nums(recommended));
    match cmp {
        Cmp::AtLeast => Some(c.first()? >= r.first()?),
        Cmp::Range => {
            Some(c.get(1)?.saturating_sub(*c.first()?) >= r.get(1)?.saturating_sub(*r.first()?))
        }
        Cmp::Third => Some(c.get(2)? >= r.get(2)?),
        // No minimum: a value other than the suggestion is a choice, not a shortfall.
        Cmp::Info => (c == r).then_some(true),
    }
}

fn cgroup_quota() -> Option<f64> {
    // cgroup v2: "max 100000" or "200000 100000"
    for p in ["/sys/fs/cgroup/cpu.max", "/sys/fs/cgroup/unified/cpu.max"] {
        if let Ok(s) = std::fs::read_to_string(p) {
            let f: Vec<&str> = s.split_whitespace().collect();
            if let (Some(q), Some(per)) = (
                f.first().and_then(|q| q.parse::<f64>().ok()),
                f.get(1).and_then(|p| p.parse::<f64>().ok()),
            ) {
                return Some(q / per);
            }
        }
    }
    let q: f64 = std::fs::read_to_string("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let p: f64 = std::fs::read_to_string("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (q > 0.0 && p > 0.0).then(|| q / p)
}

impl HostFacts {
    pub fn gather() -> HostFacts {
        let numa = std::fs::read_dir("/sys/devices/system/node")
            .map(|d| {
                let mut v: Vec<(usize, String)> = d
                    .filter_map(|e| {
                        let e = e.ok()?;
                        let id: usize =
                            e.file_name().to_str()?.strip_prefix("node")?.parse().ok()?;
                        let cpus = std::fs::read_to_string(e.path().join("cpulist")).ok()?;
                        Some((id, cpus.trim().to_string()))
                    })
                    .collect();
                v.sort();
                v
            })
            .unwrap_or_default();
        let nofile = crate::sys::rlimit::nofile().ok();
        HostFacts {
            allowed_cpus: crate::sys::affinity::allowed_cores(),
            quota_cores: cgroup_quota(),
            numa,
            nofile,
            sysctls: SYSCTLS.iter().map(|(k, ..)| (*k, read_sysctl(k))).collect(),
        }
    }

    fn limits(&self) -> Vec<Limit> {
        let mut out = Vec::new();
        let (soft, hard) = self.nofile.unzip();
        out.push(Limit {
            key: "RLIMIT_NOFILE (soft/hard)",
            current: self.nofile.map(|(s, h)| format!("{s}/{h}")),
            recommended: "1048576/1048576",
            ok: hard.map(|h| h >= 1_048_576),
            fix: "LimitNOFILE=1048576 in the systemd unit (or `ulimit -n 1048576` before starting)"
                .into(),
            why: "one descriptor per connection; shardnet raises soft to hard itself",
        });
        let _ = soft;
        for (key, rec, cmp, why) in SYSCTLS {
            let current = self
                .sysctls
                .iter()
                .find(|(k, _)| k == key)
                .and_then(|(_, v)| v.clone());
            let ok = current.as_deref().and_then(|c| judge(*cmp, c, rec));
            out.push(Limit {
                key,
                current,
                recommended: rec,
                ok,
                fix: format!("sysctl -w {key}=\"{rec}\""),
                why,
            });
        }
        out
    }
}

/// The report as text.
pub fn render(f: &HostFacts) -> String {
    let mut s = String::new();
    let cpus = f.allowed_cpus.len().max(1);
    let shards = match f.quota_cores {
        Some(q) => cpus.min(q.ceil().max(1.0) as usize),
        None => cpus,
    };
    let _ = writeln!(
        s,
        "shardnet tune: recommendations for this host (nothing is changed)\n"
    );
    let _ = writeln!(
        s,
        "CPUs this process may use: {} ({:?})",
        f.allowed_cpus.len(),
        f.allowed_cpus
    );
    let _ = writeln!(
        s,
        "cgroup CPU quota: {}",
        f.quota_cores
            .map_or("none".to_string(), |q| format!("{q:.2} cores"))
    );
    if f.numa.len() > 1 {
        for (id, cpus) in &f.numa {
            let _ = writeln!(s, "NUMA node {id}: CPUs {cpus}");
        }
        let _ = writeln!(
            s,
            "  (several NUMA nodes: consider one shardnet per node, each with the node's cores)"
        );
    } else {
        let _ = writeln!(s, "NUMA nodes: {}", f.numa.len().max(1));
    }
    let cores: Vec<String> = f
        .allowed_cpus
        .iter()
        .take(shards)
        .map(|c| c.to_string())
        .collect();
    let _ = writeln!(s, "\nrecommended [server] settings:");
    let _ = writeln!(
        s,
        "  shards = {shards}          # what \"auto\" resolves to here"
    );
    let _ = writeln!(s, "  cores = [{}]", cores.join(", "));
    let _ = writeln!(
        s,
        "  confirm with: shardnet bench --spawn --sweep-shards {} (throughput and p99 per shard count)",
        (1..=shards).filter(|n| n.is_power_of_two() || *n == shards).map(|n| n.to_string()).collect::<Vec<_>>().join(",")
    );
    let _ = writeln!(s, "\nkernel limits for a million connections (deploy/sysctl.d/90-shardnet.conf sets them all):");
    let _ = writeln!(
        s,
        "  (status: OK meets the recommendation, LOW is below it, - has no minimum or could not be read)"
    );
    let _ = writeln!(
        s,
        "  {:<34} {:<28} {:<28} {:<6} change with",
        "setting", "current", "recommended", "status"
    );
    for l in f.limits() {
        let verdict = match l.ok {
            Some(true) => "OK",
            Some(false) => "LOW",
            None => "-",
        };
        let _ = writeln!(
            s,
            "  {:<34} {:<28} {:<28} {:<6} {}",
            l.key,
            l.current.as_deref().unwrap_or("unavailable"),
            l.recommended,
            verdict,
            l.fix
        );
        let _ = writeln!(s, "  {:<34} ({})", "", l.why);
    }
    s
}

pub fn report() -> String {
    render(&HostFacts::gather())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_names_every_limit_and_the_recommendation() {
        let facts = HostFacts {
            allowed_cpus: vec![0, 1, 2, 3],
            quota_cores: Some(2.5),
            numa: vec![(0, "0-1".into()), (1, "2-3".into())],
            nofile: Some((1024, 4096)),
            sysctls: vec![
                ("net.core.somaxconn", Some("4096".into())),
                ("fs.nr_open", Some("1048576".into())),
            ],
        };
        let text = render(&facts);
        assert!(
            text.contains("shards = 3"),
            "quota 2.5 cores on 4 CPUs: 3 shards\n{text}"
        );
        assert!(text.contains("cores = [0, 1, 2]"));
        assert!(text.contains("NUMA node 1: CPUs 2-3"));
        for (key, ..) in SYSCTLS {
            assert!(text.contains(key), "{key} missing");
        }
        assert!(text.contains("RLIMIT_NOFILE"));
        let somax = text
            .lines()
            .find(|l| l.contains("net.core.somaxconn "))
            .unwrap();
        assert!(
            somax.contains("LOW") && somax.contains("sysctl -w net.core.somaxconn=\"65535\""),
            "{somax}"
        );
        let nr_open = text.lines().find(|l| l.contains("fs.nr_open ")).unwrap();
        assert!(nr_open.contains("OK"));
        assert!(text.contains("unavailable"), "unread settings say so");
    }

    #[test]
    fn judging() {
        assert_eq!(judge(Cmp::AtLeast, "4096", "65535"), Some(false));
        assert_eq!(judge(Cmp::Range, "32768 60999", "1024 65535"), Some(false));
        assert_eq!(
            judge(Cmp::Third, "1 2 9999999", "1048576 2097152 3145728"),
            Some(true)
        );
        assert_eq!(judge(Cmp::Info, "1", "2"), None);
        assert_eq!(
            judge(Cmp::Info, "4096 16384 4194304", "4096 16384 4194304"),
            Some(true)
        );
    }

    #[test]
    fn the_status_column_has_a_header_and_equal_advisory_values_are_ok() {
        let facts = HostFacts {
            allowed_cpus: vec![0],
            quota_cores: None,
            numa: Vec::new(),
            nofile: None,
            sysctls: vec![
                ("net.ipv4.tcp_wmem", Some("4096 16384 4194304".into())),
                ("net.ipv4.tcp_rmem", Some("4096 131072 6291456".into())),
            ],
        };
        let text = render(&facts);
        let header = text.lines().find(|l| l.starts_with("  setting ")).unwrap();
        assert!(header.contains(" status "), "{header}");
        let status_col = header.find(" status ").unwrap() + 1;
        let status = |key: &str| {
            let line = text.lines().find(|l| l.contains(key)).unwrap();
            line[status_col..]
                .split_whitespace()
                .next()
                .unwrap()
                .to_string()
        };
        assert_eq!(status("net.ipv4.tcp_wmem "), "OK");
        assert_eq!(status("net.ipv4.tcp_rmem "), "-");
        assert_eq!(status("fs.nr_open "), "-", "unavailable");
    }
}
