//! RLIMIT_NOFILE: raise the soft limit to the hard limit at start.

use std::io;

use nix::sys::resource::{getrlimit, setrlimit, Resource};

use super::io_err;

/// The descriptor limits before and after raising.
#[derive(Debug, Clone, Copy)]
pub struct NofileLimits {
    pub soft_before: u64,
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (never lowers it).
pub fn raise_nofile() -> io::Result<NofileLimits> {
    let (soft_before, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io_err)?;
    let mut soft = soft_before;
    if soft_before < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(io_err)?;
        soft = hard;
    }
    Ok(NofileLimits {
        soft_before,
        soft,
        hard,
    })
}

/// The current soft RLIMIT_NOFILE.
pub fn nofile_soft() -> io::Result<u64> {
    getrlimit(Resource::RLIMIT_NOFILE)
        .map(|(s, _)| s)
        .map_err(io_err)
}

/// The current RLIMIT_NOFILE (soft, hard).
pub fn nofile() -> io::Result<(u64, u64)> {
    getrlimit(Resource::RLIMIT_NOFILE).map_err(io_err)
}
