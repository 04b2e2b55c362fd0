//! Processes.
//!
//! - Reaping children and passing signals on, for a server that is PID 1 of a container and has
//!   handed over to a new process (it stays as the container's init rather than ending the
//!   container). Used by the main thread only, after the hand-over, when nothing else runs.
//! - Child processes the bench starts: they die with it. A spawned server or client process is
//!   owned by a guard that kills it on drop, but a drop does not run when the bench itself is
//!   killed (SIGKILL, or a signal without a handler). The parent-death signal covers that: the
//!   kernel sends the child SIGKILL the moment the thread that started it ends, so no server is
//!   left holding a port and thousands of sockets.
#![allow(unsafe_code)]

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

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

/// Makes the process `cmd` starts receive SIGKILL when the calling thread ends. Start such
/// children from a thread that lives as long as they should (the bench's main thread): the
/// signal follows the thread, not the process. It survives `exec` (through `taskset` and
/// `sh -c exec`).
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the child between fork and exec, and makes only
    // async-signal-safe calls (prctl, getppid, _exit); it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            // The parent may have died before the prctl: then no signal will come.
            if nix::unistd::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        })
    }
}

/// CLOCK_MONOTONIC in microseconds: the same clock in every process of the host (unlike
/// `Instant`, which cannot be sent to another process), for timestamps a publisher writes
/// and subscribers in other processes compare with their own clock.
pub fn monotonic_micros() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
        .unwrap_or(0)
}

/// Gives the calling thread the lowest scheduling priority (nice 19), for work that should run
/// only when nothing else on its cores wants to: the old process's clean-up after a hand-over.
/// Raising a thread's nice value needs no privilege; the thread cannot lower it again.
pub fn lowest_priority_for_this_thread() {
    // SAFETY: setpriority reads only its arguments; on Linux, PRIO_PROCESS with 0 means the
    // calling thread.
    let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
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

    #[test]
    fn the_monotonic_clock_advances_with_instant() {
        let (a, t) = (monotonic_micros(), std::time::Instant::now());
        std::thread::sleep(std::time::Duration::from_millis(20));
        let (b, d) = (monotonic_micros(), t.elapsed().as_micros() as u64);
        assert!(a > 0 && b >= a + 20_000, "{a} {b}");
        assert!(b - a <= d + 2_000, "{} vs {d}", b - a);
    }

    #[test]
    fn a_child_dies_with_its_parent_thread() {
        // A thread starts `sleep 30` and ends: the child is killed at once.
        let child = std::thread::spawn(|| {
            die_with_parent(Command::new("sleep").arg("30"))
                .spawn()
                .expect("spawn sleep")
        })
        .join()
        .unwrap();
        let mut child = child;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(!status.success());
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the child outlived its parent thread"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}
