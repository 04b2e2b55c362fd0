//! Reconnection delays: exponential from `reconnect_min` to `reconnect_max`, with jitter.
//!
//! Attempt 1 (right after a loss, or the first connection) waits nothing; attempt `n` waits
//! `min · 2^(n-2)`, capped at `max`, less a random part of up to `jitter` of it, so processes
//! that lost the broker together spread their retries instead of reconnecting in one burst.
//! The random numbers come from a xorshift seeded per process: no need for quality here, only
//! for processes to differ.

use std::time::Duration;

use crate::config::BrokerConfig;

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    jitter: f64,
    rng: u64,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration, jitter: f64, seed: u64) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            jitter: jitter.clamp(0.0, 1.0),
            rng: seed | 1,
        }
    }

    pub fn from_config(c: &BrokerConfig, seed: u64) -> Backoff {
        Backoff::new(c.reconnect_min, c.reconnect_max, c.reconnect_jitter, seed)
    }

    /// The delay before attempt `attempt` (1-based).
    pub fn delay(&mut self, attempt: usize) -> Duration {
        if attempt <= 1 {
            return Duration::ZERO;
        }
        let doublings = u32::try_from(attempt - 2).unwrap_or(u32::MAX).min(32);
        let full = self
            .min
            .checked_mul(1u32 << doublings.min(31))
            .unwrap_or(self.max)
            .min(self.max);
        let cut = self.jitter * self.random();
        full.mul_f64(1.0 - cut)
    }

    /// A number in [0, 1).
    fn random(&mut self) -> f64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A seed that differs between processes and between calls.
pub fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ (u64::from(std::process::id()) << 32) ^ 0x9e37_79b9_7f4a_7c15
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_within_the_jitter() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(1));
        let mut b = Backoff::new(min, max, 0.0, 1);
        let exact: Vec<u64> = (1..=7).map(|a| b.delay(a).as_millis() as u64).collect();
        assert_eq!(exact, [0, 100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.delay(10_000), max, "no overflow on long outages");
        let mut b = Backoff::new(min, max, 0.5, 42);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let d = b.delay(3);
            assert!(d <= Duration::from_millis(200) && d >= Duration::from_millis(100));
            seen.insert(d.as_micros());
        }
        assert!(seen.len() > 50, "the jitter varies: {} values", seen.len());
    }
}
