//! CPU pinning: which cores this process may use and pinning the calling thread to one.

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
