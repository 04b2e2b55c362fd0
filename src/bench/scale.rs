//! How a run is spread when one process cannot hold it: server processes sharing the port
//! (`--server-processes`), client processes (`--processes`) and source addresses
//! (`--source-addrs`). What the user left out is picked here from the descriptor limit and the
//! ephemeral port range, and the bench says what it picked and why.
//!
//! Runs once on the controller thread, before anything starts.

use std::net::{IpAddr, Ipv4Addr};

use super::args::BenchArgs;
use super::client::Mode;
use super::spawn;

/// Descriptors a client process keeps besides its connections (stdio, epoll and eventfd per
/// client shard, the report file, the readiness of nothing else): generous.
const CLIENT_RESERVE: u64 = 64;

/// The kernel spreads a reuse_port group's connections by a hash of the addresses, so a
/// process gets a little more or less than its share: plan for 90% of what one holds.
const REUSEPORT_FILL: f64 = 0.9;

/// Ports to use per source address toward one destination: half the ephemeral range. Past
/// that, `connect` scans longer and longer for a free port (it tries ports of one parity first).
const PORT_FILL: f64 = 0.5;

/// `args` with the server processes, client processes and source addresses it leaves out
/// picked for its `-c`; each pick is explained on stderr.
pub fn fill_in(args: &BenchArgs) -> anyhow::Result<BenchArgs> {
    let mut out = args.clone();
    if args.child_report.is_some() || args.mode == Mode::Connect || args.wrk {
        return Ok(out);
    }
    // Children inherit the raised soft limit.
    let nofile = crate::sys::rlimit::raise_nofile()?.soft;
    let c = args.connections;
    if args.spawn && args.server_processes.is_none() {
        let per = spawn::capacity(args, args.shards, nofile);
        let k = server_processes(c, per);
        if k > 1 {
            eprintln!(
                "bench: -c {c} is more than one server process holds under RLIMIT_NOFILE {nofile} \
                 ({per} connections): starting {k} processes of {} shard{} on one port \
                 (reuse_port, planned at {:.0}% each for the kernel's uneven spread); \
                 --server-processes sets it",
                args.shards,
                if args.shards == 1 { "" } else { "s" },
                REUSEPORT_FILL * 100.0
            );
        }
        out.server_processes = Some(k);
    }
    if args.processes.is_none() {
        let per = nofile.saturating_sub(CLIENT_RESERVE).max(1) as usize;
        let n = c.div_ceil(per).max(1);
        if n > 1 {
            eprintln!(
                "bench: -c {c} is more than one client process holds under RLIMIT_NOFILE \
                 {nofile}: spreading it over {n} client processes; --processes sets it"
            );
        }
        out.processes = Some(n);
    }
    let loopback = args.spawn || args.target.is_some_and(|t| t.ip().is_loopback());
    if args.source_addrs.is_none() && loopback {
        if let Some((lo, hi)) = port_range() {
            let per = (((hi - lo + 1) as f64) * PORT_FILL) as usize;
            let m = source_addresses(c, per);
            if m > 0 {
                let last = loopback_source(m - 1);
                eprintln!(
                    "bench: -c {c} needs more ports than one source address has toward one \
                     server address (net.ipv4.ip_local_port_range {lo}-{hi}, used to \
                     {:.0}%): connecting from {m} addresses, 127.0.0.2-{last}; \
                     --source-addrs sets them",
                    PORT_FILL * 100.0
                );
                out.source_addrs = Some(format!("127.0.0.2-{last}"));
            }
        }
    }
    Ok(out)
}

/// Server processes for `c` connections when one holds `per`.
pub fn server_processes(c: usize, per: usize) -> usize {
    if c <= per {
        return 1;
    }
    let usable = ((per as f64 * REUSEPORT_FILL) as usize).max(1);
    c.div_ceil(usable)
}

/// Source addresses for `c` connections when one carries `per` (0: the default one will do).
pub fn source_addresses(c: usize, per: usize) -> usize {
    if c <= per {
        0
    } else {
        c.div_ceil(per.max(1))
    }
}

/// The `i`-th source address: 127.0.0.2, 127.0.0.3, ... (all of 127/8 is this host's).
pub fn loopback_source(i: usize) -> IpAddr {
    let base = u32::from(Ipv4Addr::new(127, 0, 0, 2));
    IpAddr::V4(Ipv4Addr::from(base + i as u32))
}

/// net.ipv4.ip_local_port_range.
fn port_range() -> Option<(u32, u32)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = text.split_whitespace().map(|w| w.parse::<u32>().ok());
    let (lo, hi) = (it.next()??, it.next()??);
    (hi >= lo).then_some((lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_processes_and_addresses_for_a_million() {
        assert_eq!(server_processes(15_000, 19_970), 1);
        assert_eq!(server_processes(19_970, 19_970), 1);
        // 17,973 usable per process: 56 of them for a million.
        assert_eq!(server_processes(1_000_000, 19_970), 56);
        assert_eq!(server_processes(20_000, 19_970), 2);
        assert_eq!(source_addresses(10_000, 14_116), 0);
        assert_eq!(source_addresses(1_000_000, 14_116), 71);
        assert_eq!(source_addresses(1_000_000, 32_255), 32);
        assert_eq!(loopback_source(0).to_string(), "127.0.0.2");
        assert_eq!(loopback_source(300).to_string(), "127.0.1.46");
    }
}
