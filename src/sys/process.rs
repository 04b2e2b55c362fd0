//! Processes: reaping children and passing signals on, for a server that is PID 1 of a
//! container and has handed over to a new process (it stays as the container's init rather than
//! ending the container).
//!
//! Used by the main thread only, after the hand-over, when nothing else runs.

use std::io;

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::io_err;

/// What one non-blocking wait found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reaped {
    /// A child ended, with this exit code (128 + the signal for a child killed by one).
    Ended { pid: u32, code: i32 },
    /// Children are running; none has ended.
    Running,
    /// No child is left.
    None,
}

/// Reaps one ended child, if any (`waitpid(-1, WNOHANG)`).
pub fn reap() -> io::Result<Reaped> {
    loop {
        return match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => Ok(Reaped::Ended {
                pid: pid.as_raw() as u32,
                code,
            }),
            Ok(WaitStatus::Signaled(pid, sig, _)) => Ok(Reaped::Ended {
                pid: pid.as_raw() as u32,
                code: 128 + sig as i32,
            }),
            Ok(WaitStatus::StillAlive) => Ok(Reaped::Running),
            // Stopped or continued children are still there.
            Ok(_) => Ok(Reaped::Running),
            Err(Errno::EINTR) => continue,
            Err(Errno::ECHILD) => Ok(Reaped::None),
            Err(e) => Err(io_err(e)),
        };
    }
}

/// Sends signal number `sig` to `pid`.
pub fn signal(pid: u32, sig: i32) -> io::Result<()> {
    let sig = Signal::try_from(sig).map_err(io_err)?;
    kill(Pid::from_raw(pid as i32), sig).map_err(io_err)
}

/// The processes whose parent is this one (from /proc).
pub fn children() -> Vec<u32> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    // `pid (comm) state ppid ...`: comm may hold spaces, so split after ')'.
                    let rest = &s[s.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(me)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn a_child_is_seen_and_signalled() {
        // `reap` waits for any child, so it is exercised by the PID 1 process test, not here
        // where other tests' children run too.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        assert!(children().contains(&pid));
        signal(pid, libc::SIGTERM).unwrap();
        assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGTERM));
        assert!(!children().contains(&pid));
    }
}
