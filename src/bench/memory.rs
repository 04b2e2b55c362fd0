//! What connections cost in memory, measured as they are held: the servers' user memory and the
//! host kernel's.
//!
//! - **User memory** is the growth of the PSS (proportional set size, /proc/PID/smaps_rollup)
//!   summed over every server process. RSS would count the binary's shared text once per process
//!   (60 processes, 60 times); PSS divides each shared page among its users, so the sum over the
//!   processes is what they hold together. Its file-backed part is divided among *every*
//!   process mapping the binary, the bench's own client processes included, so it shrinks as
//!   they start: the growth is taken from the anonymous part (`Pss_Anon` + `Pss_Shmem`: heap,
//!   stacks, the connection slabs), which is all that connections grow; the whole PSS is
//!   reported beside it. Unknown without the servers' pids.
//! - **Kernel memory** is host-wide, from /proc/meminfo (Slab: socket structures, dentries and
//!   inodes of the socket files, epoll items) and /proc/net/sockstat (`mem`: pages charged to TCP
//!   socket buffers). With the load generator on the same host it covers both ends of every
//!   connection; the report says so. Every meminfo field that moved is kept in the JSON, so what
//!   else grows (page tables, kernel stacks, per-CPU memory) is on record.
//!
//! Runs on the controller thread: one snapshot before the connections open, one while they are
//! held.

use std::collections::BTreeMap;

use serde::Serialize;

/// A meminfo field that moved less than this (bytes) is left out of the report's deltas.
const MOVED: i64 = 1 << 20;

/// /proc/meminfo fields of the kernel's own memory shown besides Slab when they move.
const KERNEL_FIELDS: &[&str] = &[
    "SReclaimable",
    "SUnreclaim",
    "PageTables",
    "KernelStack",
    "Percpu",
    "VmallocUsed",
];

/// One reading of the servers and of the host.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Sums over the server processes; `None` if no pid is known or one could not be read.
    pss: Option<u64>,
    /// `Pss_Anon + Pss_Shmem` (`None` on a kernel without those lines).
    pss_anon: Option<u64>,
    rss: Option<u64>,
    /// /proc/meminfo, bytes.
    meminfo: BTreeMap<String, u64>,
    /// /proc/net/sockstat `TCP: ... mem N`, pages.
    tcp_mem_pages: Option<u64>,
}

/// One process's /proc/PID/smaps_rollup figures, bytes.
struct Rollup {
    pss: u64,
    pss_anon: Option<u64>,
    rss: u64,
}

fn smaps_rollup(pid: u32) -> Option<Rollup> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    parse_rollup(&text)
}

fn parse_rollup(text: &str) -> Option<Rollup> {
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(parse_kb)
    };
    Some(Rollup {
        pss: field("Pss:")?,
        pss_anon: field("Pss_Anon:").map(|a| a + field("Pss_Shmem:").unwrap_or(0)),
        rss: field("Rss:")?,
    })
}

/// `   1234 kB` as bytes.
fn parse_kb(v: &str) -> Option<u64> {
    let v = v.trim();
    let (n, unit) = v.split_once(' ').unwrap_or((v, ""));
    let n: u64 = n.trim().parse().ok()?;
    Some(if unit.trim() == "kB" { n * 1024 } else { n })
}

/// /proc/meminfo as bytes per field.
pub fn parse_meminfo(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_string(), parse_kb(v)?))
        })
        .collect()
}

/// The `mem` figure of the `TCP:` line of /proc/net/sockstat, in pages.
pub fn parse_sockstat_tcp_mem(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let i = words.iter().position(|w| *w == "mem")?;
    words.get(i + 1)?.parse().ok()
}

impl Snapshot {
    /// Reads the servers `pids` (none: their memory is unknown) and the host.
    pub fn take(pids: &[u32]) -> Snapshot {
        let per: Option<Vec<Rollup>> = (!pids.is_empty())
            .then(|| pids.iter().map(|&p| smaps_rollup(p)).collect())
            .flatten();
        Snapshot {
            pss: per.as_ref().map(|v| v.iter().map(|x| x.pss).sum()),
            pss_anon: per
                .as_ref()
                .and_then(|v| v.iter().map(|x| x.pss_anon).sum::<Option<u64>>()),
            rss: per.as_ref().map(|v| v.iter().map(|x| x.rss).sum()),
            meminfo: std::fs::read_to_string("/proc/meminfo")
                .map(|t| parse_meminfo(&t))
                .unwrap_or_default(),
            tcp_mem_pages: std::fs::read_to_string("/proc/net/sockstat")
                .ok()
                .and_then(|t| parse_sockstat_tcp_mem(&t)),
        }
    }
}

/// The host kernel's memory, before and while the connections were held.
#[derive(Debug, Clone, Serialize)]
pub struct KernelMemory {
    /// /proc/meminfo `Slab`, bytes.
    pub slab_before: Option<u64>,
    pub slab_held: Option<u64>,
    /// Slab growth per connection (both ends when the clients run on this host).
    pub slab_bytes_per_connection: Option<f64>,
    /// /proc/net/sockstat TCP `mem`, pages of `page_size` bytes.
    pub tcp_mem_pages_before: Option<u64>,
    pub tcp_mem_pages_held: Option<u64>,
    pub page_size: u64,
    /// Socket buffer growth per connection, bytes.
    pub socket_buffer_bytes_per_connection: Option<f64>,
    /// Every /proc/meminfo field that moved by a MiB or more: held minus before, bytes.
    pub meminfo_delta: BTreeMap<String, i64>,
}

/// What the held connections cost: the servers' user memory and the host kernel's.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryReport {
    pub connections: usize,
    pub server_processes: usize,
    /// PSS summed over the server processes, bytes (`None`: the pids are unknown).
    pub pss_before: Option<u64>,
    pub pss_held: Option<u64>,
    /// Its anonymous part (`Pss_Anon + Pss_Shmem`), which is what connections grow.
    pub pss_anon_before: Option<u64>,
    pub pss_anon_held: Option<u64>,
    /// PSS growth per connection (of the anonymous part where the kernel reports it).
    pub user_bytes_per_connection: Option<f64>,
    /// RSS summed over the server processes (counts the shared binary once per process).
    pub rss_before: Option<u64>,
    pub rss_held: Option<u64>,
    pub kernel: KernelMemory,
    /// Whether the load generator ran on this host (then the kernel figures cover both ends).
    pub clients_on_this_host: bool,
}

impl MemoryReport {
    pub fn new(
        connections: usize,
        server_processes: usize,
        before: &Snapshot,
        held: &Snapshot,
        clients_on_this_host: bool,
    ) -> MemoryReport {
        let per = |b: Option<u64>, a: Option<u64>| {
            b.zip(a)
                .map(|(b, a)| (a as f64 - b as f64) / connections.max(1) as f64)
        };
        let page_size = crate::sys::page_size();
        let slab = |s: &Snapshot| s.meminfo.get("Slab").copied();
        let mut meminfo_delta = BTreeMap::new();
        for (k, &a) in &held.meminfo {
            if let Some(&b) = before.meminfo.get(k) {
                let d = a as i64 - b as i64;
                if d.abs() >= MOVED {
                    meminfo_delta.insert(k.clone(), d);
                }
            }
        }
        MemoryReport {
            connections,
            server_processes,
            pss_before: before.pss,
            pss_held: held.pss,
            pss_anon_before: before.pss_anon,
            pss_anon_held: held.pss_anon,
            user_bytes_per_connection: match (before.pss_anon, held.pss_anon) {
                (Some(b), Some(a)) => per(Some(b), Some(a)),
                _ => per(before.pss, held.pss),
            },
            rss_before: before.rss,
            rss_held: held.rss,
            kernel: KernelMemory {
                slab_before: slab(before),
                slab_held: slab(held),
                slab_bytes_per_connection: per(slab(before), slab(held)),
                tcp_mem_pages_before: before.tcp_mem_pages,
                tcp_mem_pages_held: held.tcp_mem_pages,
                page_size,
                socket_buffer_bytes_per_connection: per(
                    before.tcp_mem_pages.map(|p| p * page_size),
                    held.tcp_mem_pages.map(|p| p * page_size),
                ),
                meminfo_delta,
            },
            clients_on_this_host,
        }
    }

    /// The report's lines for the text output.
    pub fn lines(&self) -> Vec<String> {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let mut out = Vec::new();
        out.push(
            match (self.pss_before, self.pss_held, self.user_bytes_per_connection) {
                (Some(b), Some(a), Some(per)) => format!(
                    "user memory: server PSS (sum over {} process{}) {}: {per:.0} bytes per connection (whole PSS {:.1} -> {:.1} MiB{})",
                    self.server_processes,
                    if self.server_processes == 1 { "" } else { "es" },
                    match (self.pss_anon_before, self.pss_anon_held) {
                        (Some(ab), Some(aa)) => format!("anonymous {:.2} -> {:.2} MiB", mib(ab), mib(aa)),
                        _ => format!("{:.2} -> {:.2} MiB", mib(b), mib(a)),
                    },
                    mib(b),
                    mib(a),
                    match (self.rss_before, self.rss_held) {
                        (Some(rb), Some(ra)) => format!(", RSS {:.1} -> {:.1} MiB", mib(rb), mib(ra)),
                        _ => String::new(),
                    }
                ),
                _ => "user memory: server memory unknown (give --server-pid PID, or --spawn)"
                    .to_string(),
            },
        );
        let k = &self.kernel;
        let both = if self.clients_on_this_host {
            " (this host, both ends of each connection)"
        } else {
            " (this host)"
        };
        let slab = match (k.slab_before, k.slab_held, k.slab_bytes_per_connection) {
            (Some(b), Some(a), Some(per)) => {
                format!(
                    "Slab {:.0} -> {:.0} MiB: {per:.0} bytes per connection",
                    mib(b),
                    mib(a)
                )
            }
            _ => "Slab unknown".to_string(),
        };
        let buffers = match (
            k.tcp_mem_pages_before,
            k.tcp_mem_pages_held,
            k.socket_buffer_bytes_per_connection,
        ) {
            (Some(b), Some(a), Some(per)) => {
                format!("TCP socket buffers {b} -> {a} pages: {per:.0} bytes per connection")
            }
            _ => "TCP socket buffers unknown".to_string(),
        };
        out.push(format!("kernel memory{both}: {slab}; {buffers}"));
        // The kernel's own fields (the JSON has every field that moved; page cache and dirty
        // pages move with whatever else runs on the host).
        let others: Vec<String> = k
            .meminfo_delta
            .iter()
            .filter(|(name, _)| KERNEL_FIELDS.contains(&name.as_str()))
            .map(|(name, d)| format!("{name} {:+.0} MiB", *d as f64 / (1 << 20) as f64))
            .collect();
        if !others.is_empty() {
            out.push(format!(
                "    kernel fields of /proc/meminfo that moved: {}",
                others.join(", ")
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_meminfo_and_sockstat() {
        let m = parse_meminfo(
            "MemTotal:       24000000 kB\nSlab:             123456 kB\nHugePages_Total:       0\n",
        );
        assert_eq!(m["MemTotal"], 24_000_000 * 1024);
        assert_eq!(m["Slab"], 123_456 * 1024);
        assert_eq!(m["HugePages_Total"], 0);
        let s =
            "sockets: used 330\nTCP: inuse 9 orphan 0 tw 0 alloc 12 mem 7\nUDP: inuse 0 mem 0\n";
        assert_eq!(parse_sockstat_tcp_mem(s), Some(7));
        assert_eq!(parse_sockstat_tcp_mem("UDP: inuse 0 mem 3\n"), None);
    }

    #[test]
    fn per_connection_figures_and_unknown_without_pids() {
        let mut before = Snapshot {
            pss: Some(10_000_000),
            pss_anon: Some(1_000_000),
            rss: Some(20_000_000),
            tcp_mem_pages: Some(10),
            ..Snapshot::default()
        };
        before.meminfo.insert("Slab".into(), 100 << 20);
        before.meminfo.insert("PageTables".into(), 10 << 20);
        // The file-backed part shrank (more processes map the binary): the anonymous part grew
        // by 80 bytes per connection.
        let mut held = Snapshot {
            pss: Some(10_000_000 + 1000 * 80 - 500_000),
            pss_anon: Some(1_000_000 + 1000 * 80),
            rss: Some(20_000_000 + 1000 * 90),
            tcp_mem_pages: Some(10),
            ..Snapshot::default()
        };
        held.meminfo
            .insert("Slab".into(), (100 << 20) + 9000 * 1000);
        held.meminfo
            .insert("PageTables".into(), (10 << 20) + (2 << 20));
        let r = MemoryReport::new(1000, 2, &before, &held, true);
        assert_eq!(r.user_bytes_per_connection, Some(80.0));
        assert_eq!(r.kernel.slab_bytes_per_connection, Some(9000.0));
        assert_eq!(r.kernel.socket_buffer_bytes_per_connection, Some(0.0));
        assert_eq!(r.kernel.meminfo_delta["PageTables"], 2 << 20);
        let text = r.lines().join("\n");
        assert!(text.contains("80 bytes per connection"), "{text}");
        assert!(text.contains("both ends"), "{text}");
        assert!(text.contains("PageTables +2 MiB"), "{text}");

        let unknown = MemoryReport::new(1000, 1, &Snapshot::default(), &Snapshot::default(), true);
        assert_eq!(unknown.user_bytes_per_connection, None);
        assert!(unknown.lines()[0].contains("server memory unknown"));
    }

    #[test]
    fn rollup_anonymous_part() {
        let r = parse_rollup(
            "Rss: 5000 kB\nPss: 3000 kB\nPss_Anon: 400 kB\nPss_File: 2600 kB\nPss_Shmem: 8 kB\n",
        )
        .unwrap();
        assert_eq!(
            (r.rss, r.pss, r.pss_anon),
            (5000 << 10, 3000 << 10, Some(408 << 10))
        );
        let old = parse_rollup("Rss: 5000 kB\nPss: 3000 kB\n").unwrap();
        assert_eq!(old.pss_anon, None);
    }

    #[test]
    fn reads_this_process_and_host() {
        let s = Snapshot::take(&[std::process::id()]);
        assert!(
            s.pss.is_some_and(|p| p > 0)
                || !std::path::Path::new("/proc/self/smaps_rollup").exists()
        );
        assert!(s.meminfo.contains_key("MemTotal"));
        assert_eq!(Snapshot::take(&[]).pss, None);
        // A pid that is not there makes the sum unknown, not smaller.
        assert_eq!(Snapshot::take(&[std::process::id(), u32::MAX]).pss, None);
    }
}
