//! The memory page size, for turning page counts from `/proc` into bytes.

use std::sync::OnceLock;

/// Bytes per page (`sysconf(_SC_PAGESIZE)`; 4096 if the call fails, which POSIX does not allow).
pub fn page_size() -> u64 {
    static SIZE: OnceLock<u64> = OnceLock::new();
    *SIZE.get_or_init(|| {
        nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .and_then(|v| u64::try_from(v).ok())
            .filter(|&v| v > 0)
            .unwrap_or(4096)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn is_a_power_of_two() {
        let p = super::page_size();
        assert!(p >= 4096 && p.is_power_of_two(), "{p}");
    }
}
