//! CPU pinning and scheduling: which cores this process may use, pinning the calling thread to
//! one, and a thread's time slice.
#![allow(unsafe_code)]

/// The core ids in this process's affinity mask, ascending.
pub fn allowed_cores() -> Vec<usize> {
    let mut ids: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    ids.sort_unstable();
    ids
}

/// Pins the calling thread to `core`. Returns false if the kernel refused.
pub fn pin_current(core: usize) -> bool {
    core_affinity::set_for_current(core_affinity::CoreId { id: core })
}

/// How many CPUs this process may use: the affinity mask, further limited by a cgroup CPU quota.
pub fn usable_cpus() -> usize {
    num_cpus::get().max(1)
}

/// The first version of the kernel's `struct sched_attr` (`SCHED_ATTR_SIZE_VER0`, 48 bytes).
#[repr(C)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

/// Asks the scheduler for a short time slice (`slice`, clamped by the kernel to 0.1-100 ms) for
/// the calling thread, keeping its policy (SCHED_OTHER) and nice value. Since Linux 6.12
/// (EEVDF's `sched_attr.sched_runtime` for fair tasks, no privilege needed) a thread with a
/// shorter slice than the one running preempts it when it wakes, instead of waiting for that
/// thread's slice (1.4 ms on the 2-core machine here) to end. For threads that relay a message
/// and sleep again (the broker's) on a core shared with a busy shard. Its CPU share is
/// unchanged. Older kernels take the call and ignore the slice. Returns false if the kernel
/// refused it.
pub fn request_short_slice(slice: std::time::Duration) -> bool {
    // SAFETY: getpriority only reads the calling thread's nice value (`who` 0 = this thread
    // for PRIO_PROCESS on Linux); it cannot fail for the caller itself.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: libc::SCHED_OTHER as u32,
        flags: 0,
        nice,
        priority: 0,
        runtime: u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX),
        deadline: 0,
        period: 0,
    };
    // SAFETY: `attr` is a valid, initialised sched_attr of the size it declares, alive for the
    // call; pid 0 is the calling thread; flags 0.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    rc == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_gets_the_short_slice_it_asks_for_and_keeps_its_nice_value() {
        let (granted, slice, nice) = std::thread::spawn(|| {
            let granted = request_short_slice(std::time::Duration::from_micros(100));
            let sched = std::fs::read_to_string("/proc/thread-self/sched").unwrap_or_default();
            // SAFETY: getpriority only reads this thread's nice value.
            let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
            (granted, field(&sched, "se.slice"), nice)
        })
        .join()
        .unwrap();
        if !granted {
            // A seccomp filter (some container runtimes) may refuse sched_setattr.
            let msg = "sched_setattr was refused here: broker threads keep the default slice";
            assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "{msg}");
            eprintln!("SKIPPED: {msg}");
            return;
        }
        // SAFETY: as above, for this thread.
        assert_eq!(nice, unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) });
        match slice {
            // EEVDF kernels (6.6 and later) show a slice per task; 6.12 and later keep the one
            // asked for.
            Some(ns) if kernel_at_least(6, 12) => assert_eq!(ns, 100_000),
            _ => eprintln!("note: this kernel does not show or keep a per-thread slice"),
        }
    }

    fn field(sched: &str, name: &str) -> Option<u64> {
        sched
            .lines()
            .find(|l| l.trim_start().starts_with(name))
            .and_then(|l| l.rsplit(':').next())
            .and_then(|v| v.trim().parse().ok())
    }

    fn kernel_at_least(major: u32, minor: u32) -> bool {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut it = release
            .trim()
            .split(['.', '-'])
            .map(|p| p.parse::<u32>().unwrap_or(0));
        (it.next().unwrap_or(0), it.next().unwrap_or(0)) >= (major, minor)
    }
}
