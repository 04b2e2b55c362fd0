//! The per-connection rate limit for client commands: a token bucket kept as one timestamp.
//!
//! The bucket is the generic cell rate algorithm (GCRA), which is a token bucket stated as the
//! "theoretical arrival time" of the next command: with `rate` commands per second each one
//! moves that time on by `1/rate`, and a command is let through while the time is no further
//! ahead of now than `burst - 1` intervals. So a full bucket lets `burst` commands through at
//! once, and after that one per interval; refilling is implicit (time passing), so an idle
//! connection costs nothing and nothing runs per tick.
//!
//! A connection keeps a [`Bucket`] (8 bytes, no allocation): the arrival time, in ticks of
//! 10 µs on 48 bits (89 years of a shard's uptime), and the refusals in a row on 16. The
//! [`RateLimit`] (rate and burst) is the shard's, from `[auth]`. A command over the limit is
//! refused; a connection that goes on sending while refused, as many commands in a row as its
//! burst, is told to close: it is not reading the refusals. Times are given in microseconds on
//! the shard's own clock (any monotonic origin, such as the shard's start).

/// The bucket's clock resolution, in microseconds: rates up to 100,000 per second.
const TICK_US: u64 = 10;
const TAT_BITS: u32 = 48;
const TAT_MASK: u64 = (1 << TAT_BITS) - 1;

/// `command_rate` and `command_burst`, as the bucket uses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Ticks per command.
    interval: u64,
    /// How far ahead of now the arrival time may run: `(burst - 1)` intervals.
    tolerance: u64,
    /// Refusals in a row that close the connection.
    strikes: u16,
}

impl RateLimit {
    /// The fastest rate the bucket resolves: one command per tick.
    pub const MAX_RATE: u32 = (1_000_000 / TICK_US) as u32;

    /// `None` when `rate` is 0 (no limit). `rate` is capped at [`RateLimit::MAX_RATE`] and
    /// `burst` at 65535 (the refusal counter's range); a burst of 0 counts as 1.
    pub fn new(rate: u32, burst: u32) -> Option<RateLimit> {
        if rate == 0 {
            return None;
        }
        let interval = (1_000_000 / TICK_US / u64::from(rate)).max(1);
        let burst = burst.clamp(1, u32::from(u16::MAX));
        Some(RateLimit {
            interval,
            tolerance: interval * u64::from(burst - 1),
            strikes: burst as u16,
        })
    }
}

/// What to do with one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Answer with an error; the command does nothing.
    Refuse,
    /// The connection kept on while refused: close it (1008).
    Close,
}

/// One connection's bucket. A new one is full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bucket(u64);

impl Bucket {
    /// Takes one command's worth at `now_us` (microseconds, monotonic).
    pub fn take(&mut self, limit: &RateLimit, now_us: u64) -> Verdict {
        let now = (now_us / TICK_US).min(TAT_MASK);
        let tat = (self.0 & TAT_MASK).max(now);
        if tat - now > limit.tolerance {
            let refused = ((self.0 >> TAT_BITS) as u16).saturating_add(1);
            self.0 = (self.0 & TAT_MASK) | (u64::from(refused) << TAT_BITS);
            return if refused >= limit.strikes {
                Verdict::Close
            } else {
                Verdict::Refuse
            };
        }
        // The refusals start over.
        self.0 = (tat + limit.interval).min(TAT_MASK);
        Verdict::Allow
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_bucket_allows_the_burst_then_the_rate() {
        let limit = RateLimit::new(10, 5).unwrap(); // one per 100 ms, 5 at once
        let mut b = Bucket::default();
        let t0 = 1_000_000;
        for i in 0..5 {
            assert_eq!(b.take(&limit, t0), Verdict::Allow, "burst command {i}");
        }
        assert_eq!(b.take(&limit, t0), Verdict::Refuse);
        // 100 ms later there is room for one more, not two.
        assert_eq!(b.take(&limit, t0 + 100_000), Verdict::Allow);
        assert_eq!(b.take(&limit, t0 + 100_000), Verdict::Refuse);
        // Idle for a long time: full again, and no more than full.
        let later = t0 + 60_000_000;
        for _ in 0..5 {
            assert_eq!(b.take(&limit, later), Verdict::Allow);
        }
        assert_eq!(b.take(&limit, later), Verdict::Refuse);
    }

    #[test]
    fn refusals_in_a_row_close_and_an_allowed_command_forgives() {
        let limit = RateLimit::new(1, 3).unwrap();
        let mut b = Bucket::default();
        for _ in 0..3 {
            assert_eq!(b.take(&limit, 0), Verdict::Allow);
        }
        assert_eq!(b.take(&limit, 0), Verdict::Refuse);
        assert_eq!(b.take(&limit, 0), Verdict::Refuse);
        // A client that backs off is not closed: the refusals start over.
        assert_eq!(b.take(&limit, 1_000_000), Verdict::Allow);
        assert_eq!(b.take(&limit, 1_000_000), Verdict::Refuse);
        assert_eq!(b.take(&limit, 1_000_000), Verdict::Refuse);
        assert_eq!(b.take(&limit, 1_000_000), Verdict::Close);
    }

    #[test]
    fn a_flood_is_held_to_the_rate() {
        // 10,000 commands in one second against 100/s, burst 20: 20 + 100 get through (the
        // burst and one per interval), and the flood is told to close long before its end.
        let limit = RateLimit::new(100, 20).unwrap();
        let mut b = Bucket::default();
        let (mut allowed, mut closed_at) = (0, None);
        for i in 0..10_000u64 {
            match b.take(&limit, i * 100) {
                Verdict::Allow => allowed += 1,
                Verdict::Refuse => {}
                Verdict::Close => {
                    closed_at.get_or_insert(i);
                }
            }
        }
        assert!(closed_at.is_some_and(|i| i < 100), "{closed_at:?}");
        assert!(allowed <= 20 + 100, "{allowed}");
    }

    #[test]
    fn limits_and_size() {
        assert_eq!(RateLimit::new(0, 10), None);
        let l = RateLimit::new(2_000_000, 0).unwrap();
        assert_eq!((l.interval, l.tolerance, l.strikes), (1, 0, 1));
        let l = RateLimit::new(1, u32::MAX).unwrap();
        assert_eq!((l.interval, l.strikes), (100_000, u16::MAX));
        // Per connection: a timestamp and a refusal count, in one word.
        assert_eq!(std::mem::size_of::<Bucket>(), 8);
        // At the end of its clock (89 years of uptime) the bucket saturates, it does not wrap
        // into refusing everything.
        let l = RateLimit::new(100, 2).unwrap();
        let mut b = Bucket::default();
        for _ in 0..3 {
            assert_eq!(b.take(&l, u64::MAX), Verdict::Allow);
        }
    }
}
