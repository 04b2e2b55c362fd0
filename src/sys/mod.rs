//! The operating-system layer: the only module that touches nix and libc.
//!
//! Everything above it speaks in `OwnedFd`, `io::Result` and plain Rust types. Every `unsafe`
//! block of the crate lives here, each with a `// SAFETY:` line.

pub mod affinity;
pub mod fdpass;
pub mod mem;
pub mod notify;
pub mod page;
pub mod poller;
pub mod process;
pub mod rlimit;
pub mod socket;
pub mod text;
pub mod waker;

use std::io;

/// Converts a nix error into the `io::Error` the rest of the crate uses.
pub(crate) fn io_err(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Clock ticks per second (`/proc` CPU times are in these units).
pub fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |v| v as f64)
}

/// The size of a memory page in bytes (/proc/net/sockstat counts socket memory in pages).
pub fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |v| v as u64)
}
