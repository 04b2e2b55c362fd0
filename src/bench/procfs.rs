//! What the bench reads about a server process from /proc: CPU time per thread, RSS, and the
//! facts recorded with a report (kernel, CPU model).

/// CPU seconds (user + system) of one thread.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ThreadCpu {
    pub tid: u32,
    pub name: String,
    pub seconds: f64,
}

/// utime + stime of a /proc stat line, in seconds, and the command name.
fn parse_stat(stat: &str, ticks: f64) -> Option<(String, f64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat[open + 1..close].to_string();
    let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
    // After the name: state is field 3; utime and stime are fields 14 and 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((name, (utime + stime) / ticks))
}

/// CPU time of every thread of `pid`.
pub fn threads(pid: u32) -> Vec<ThreadCpu> {
    let ticks = crate::sys::clock_ticks();
    let dir = format!("/proc/{pid}/task");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<ThreadCpu> = entries
        .filter_map(|e| {
            let e = e.ok()?;
            let tid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let (name, seconds) = parse_stat(&stat, ticks)?;
            Some(ThreadCpu { tid, name, seconds })
        })
        .collect();
    out.sort_by_key(|t| t.tid);
    out
}

/// Resident set size of `pid` in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

pub fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_default()
}

/// The git commit of the working tree the binary was run from, if any.
pub fn git_commit() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Whether `pid` is alive: it exists and is not a zombie (a killed process stays in /proc
/// until its parent reaps it, but it holds no socket and runs nothing).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // The state follows the name, which may itself hold ')'.
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().bytes().next());
        !matches!(state, None | Some(b'Z' | b'X'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_spaces_in_the_name() {
        let line = "1234 (shard-00 x) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 3 0";
        let (name, secs) = parse_stat(line, 100.0).unwrap();
        assert_eq!(name, "shard-00 x");
        assert!((secs - 3.0).abs() < 1e-9);
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(!threads(me).is_empty());
        assert!(rss_bytes(me).unwrap() > 0);
        assert!(alive(me));
    }

    #[test]
    fn a_zombie_is_not_alive() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Not reaped yet: it stays in /proc as a zombie once it has exited.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| !s.rsplit_once(')').unwrap().1.trim_start().starts_with('Z'))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the child did not exit"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
        assert!(!alive(pid));
        child.wait().unwrap();
        assert!(!alive(pid));
    }
}
