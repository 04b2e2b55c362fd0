//! A hashed timing wheel, one per shard, keyed by slab index.
//!
//! Each key is in at most one slot, kept in an intrusive doubly-linked list whose links live in
//! a vector indexed by key, so scheduling, cancelling and firing are O(1) and allocate nothing
//! once the vector has grown to the shard's peak connection count. A deadline further away than
//! the wheel's span simply stays in its slot for more turns ("rounds").
//!
//! The wheel does not know what a deadline means: the shard recomputes a connection's real
//! deadline when its entry fires (activity does not touch the wheel), so a busy connection costs
//! nothing here until its idle deadline comes round.
//!
//! Ticks are 64-bit everywhere (a 10 ms tick wraps after 5.8 billion years), and converting a tick
//! back to an instant goes through 128-bit nanoseconds: no `u32` multiplier that wraps after 2^32
//! ticks (497 days) and would put every wake-up in the past.

use std::time::{Duration, Instant};

const NIL: u32 = u32::MAX;
const UNSCHEDULED: u64 = u64::MAX;

#[derive(Clone, Copy)]
struct Link {
    prev: u32,
    next: u32,
    deadline: u64,
}

/// Bytes of wheel bookkeeping per key (one link per slab index that ever had a timer).
pub const LINK_BYTES: usize = std::mem::size_of::<Link>();

const EMPTY: Link = Link {
    prev: NIL,
    next: NIL,
    deadline: UNSCHEDULED,
};

pub struct TimerWheel {
    start: Instant,
    tick: Duration,
    mask: u64,
    /// One list head per slot, allocated at the first `schedule`: a shard that never had a
    /// connection does not carry 8192 slots (32 KiB) for nothing.
    heads: Vec<u32>,
    links: Vec<Link>,
    /// The last tick whose slot has been processed.
    current: u64,
    scheduled: usize,
}

impl TimerWheel {
    /// `slots` is rounded up to a power of two.
    pub fn new(start: Instant, tick: Duration, slots: usize) -> Self {
        let slots = slots.next_power_of_two().max(2);
        TimerWheel {
            start,
            tick,
            mask: slots as u64 - 1,
            heads: Vec::new(),
            links: Vec::new(),
            current: 0,
            scheduled: 0,
        }
    }

    pub fn tick_len(&self) -> Duration {
        self.tick
    }

    /// The tick an instant falls in.
    pub fn tick_of(&self, t: Instant) -> u64 {
        (t.saturating_duration_since(self.start).as_nanos() / self.tick.as_nanos()) as u64
    }

    /// The first tick at or after `t + d`, rounded up so a timer never fires early.
    pub fn deadline_after(&self, t: Instant, d: Duration) -> u64 {
        let ns = (t.saturating_duration_since(self.start) + d).as_nanos();
        ns.div_ceil(self.tick.as_nanos()) as u64
    }

    /// When the tick after the current one begins: how long the owner may sleep.
    pub fn next_wake(&self) -> Option<Instant> {
        (self.scheduled > 0).then(|| self.instant_of(self.current + 1))
    }

    /// The instant tick `tick` begins.
    pub fn instant_of(&self, tick: u64) -> Instant {
        let ns = self.tick.as_nanos() * tick as u128;
        let secs = (ns / 1_000_000_000).min(u64::MAX as u128) as u64;
        self.start + Duration::new(secs, (ns % 1_000_000_000) as u32)
    }

    /// The last tick processed by [`TimerWheel::advance`].
    pub fn current(&self) -> u64 {
        self.current
    }

    pub fn len(&self) -> usize {
        self.scheduled
    }

    pub fn is_empty(&self) -> bool {
        self.scheduled == 0
    }

    /// The deadline `key` is scheduled at, if any.
    pub fn deadline(&self, key: usize) -> Option<u64> {
        self.links
            .get(key)
            .map(|l| l.deadline)
            .filter(|&d| d != UNSCHEDULED)
    }

    /// Schedules (or moves) `key` to fire at `deadline` (a tick). A deadline already past fires
    /// on the next advance.
    pub fn schedule(&mut self, key: usize, deadline: u64) {
        if key >= self.links.len() {
            self.links.resize(key + 1, EMPTY);
        }
        self.cancel(key);
        if self.heads.is_empty() {
            self.heads = vec![NIL; self.mask as usize + 1];
        }
        let deadline = deadline.max(self.current + 1);
        let slot = (deadline & self.mask) as usize;
        let head = self.heads[slot];
        self.links[key] = Link {
            prev: NIL,
            next: head,
            deadline,
        };
        if head != NIL {
            self.links[head as usize].prev = key as u32;
        }
        self.heads[slot] = key as u32;
        self.scheduled += 1;
    }

    pub fn cancel(&mut self, key: usize) {
        let Some(&link) = self.links.get(key) else {
            return;
        };
        if link.deadline == UNSCHEDULED {
            return;
        }
        if link.prev != NIL {
            self.links[link.prev as usize].next = link.next;
        } else {
            let slot = (link.deadline & self.mask) as usize;
            self.heads[slot] = link.next;
        }
        if link.next != NIL {
            self.links[link.next as usize].prev = link.prev;
        }
        self.links[key] = EMPTY;
        self.scheduled -= 1;
    }

    /// Processes every tick up to `now` (a tick): keys whose deadline has come are unscheduled
    /// and appended to `expired`.
    pub fn advance(&mut self, now: u64, expired: &mut Vec<usize>) {
        if now <= self.current {
            return;
        }
        // After a long stall every slot is visited once, not once per elapsed tick.
        let first = if now - self.current > self.mask + 1 {
            now - self.mask
        } else {
            self.current + 1
        };
        for t in first..=now {
            if self.scheduled == 0 {
                break;
            }
            let slot = (t & self.mask) as usize;
            let mut k = self.heads[slot];
            while k != NIL {
                let link = self.links[k as usize];
                if link.deadline <= now {
                    self.cancel(k as usize);
                    expired.push(k as usize);
                }
                k = link.next;
            }
        }
        self.current = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wheel() -> (TimerWheel, Instant) {
        let start = Instant::now();
        (TimerWheel::new(start, Duration::from_millis(10), 8), start)
    }

    #[test]
    fn fires_at_deadline_not_before() {
        let (mut w, _) = wheel();
        w.schedule(3, 5);
        let mut out = Vec::new();
        w.advance(4, &mut out);
        assert!(out.is_empty());
        w.advance(5, &mut out);
        assert_eq!(out, vec![3]);
        assert!(w.is_empty());
    }

    #[test]
    fn deadlines_beyond_the_span_wait_for_their_round() {
        let (mut w, _) = wheel();
        w.schedule(1, 21); // slot 5, third turn of an 8-slot wheel
        let mut out = Vec::new();
        w.advance(13, &mut out);
        assert!(
            out.is_empty(),
            "slot 5 was visited at ticks 5 and 13 but the deadline is 21"
        );
        w.advance(21, &mut out);
        assert_eq!(out, vec![1]);
    }

    #[test]
    fn cancel_and_reschedule_unlink_cleanly() {
        let (mut w, _) = wheel();
        for k in 0..5 {
            w.schedule(k, 3);
        }
        w.cancel(2);
        w.cancel(0);
        w.cancel(4);
        w.schedule(1, 6);
        assert_eq!(w.len(), 2);
        let mut out = Vec::new();
        w.advance(3, &mut out);
        assert_eq!(out, vec![3]);
        w.advance(6, &mut out);
        out.sort_unstable();
        assert_eq!(out, vec![1, 3]);
        w.advance(100, &mut out);
        assert_eq!(out.len(), 2);
        assert!(w.is_empty());
    }

    #[test]
    fn past_deadlines_fire_on_the_next_tick_and_stalls_visit_everything() {
        let (mut w, _) = wheel();
        let mut out = Vec::new();
        w.advance(10, &mut out);
        w.schedule(7, 2);
        assert_eq!(w.deadline(7), Some(11));
        w.schedule(8, 40);
        w.advance(1000, &mut out);
        out.sort_unstable();
        assert_eq!(out, vec![7, 8]);
    }

    #[test]
    fn ticks_round_up() {
        let (w, start) = wheel();
        assert_eq!(w.deadline_after(start, Duration::from_millis(1)), 1);
        assert_eq!(w.deadline_after(start, Duration::from_millis(10)), 1);
        assert_eq!(w.deadline_after(start, Duration::from_millis(11)), 2);
        assert_eq!(w.tick_of(start + Duration::from_millis(25)), 2);
    }

    #[test]
    fn wake_ups_stay_in_the_future_past_two_to_the_32_ticks() {
        let (mut w, start) = wheel();
        let mut out = Vec::new();
        // 497 days of 10 ms ticks, and a few more: a u32 tick count has wrapped by now.
        let near = (1u64 << 32) - 2;
        w.advance(near, &mut out);
        w.schedule(1, near + 4);
        let past_wrap = (1u64 << 32) + 3;
        w.advance(past_wrap, &mut out);
        assert_eq!(out, vec![1], "the deadline across the wrap fired");
        w.schedule(2, past_wrap + 5);
        let wake = w.next_wake().expect("a timer is scheduled");
        let expected = start + Duration::from_millis(10 * (past_wrap + 1));
        assert_eq!(
            wake - start,
            expected - start,
            "the next wake is the next tick, 497 days after the start"
        );
        assert_eq!(w.tick_of(wake), past_wrap + 1);
        assert!(w.instant_of(past_wrap) < wake);
    }

    #[test]
    fn random_operations_match_a_model() {
        // A small deterministic model check: the wheel fires exactly the keys a BTreeMap would.
        use std::collections::BTreeMap;
        let (mut w, _) = wheel();
        let mut model: BTreeMap<usize, u64> = BTreeMap::new();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut now = 0;
        let mut out = Vec::new();
        for _ in 0..20_000 {
            let key = (rand() % 64) as usize;
            match rand() % 4 {
                0 | 1 => {
                    let d = now + 1 + rand() % 40;
                    w.schedule(key, d);
                    model.insert(key, d);
                }
                2 => {
                    w.cancel(key);
                    model.remove(&key);
                }
                _ => {
                    now += rand() % 5;
                    out.clear();
                    w.advance(now, &mut out);
                    out.sort_unstable();
                    let due: Vec<usize> = model
                        .iter()
                        .filter(|(_, &d)| d <= now)
                        .map(|(&k, _)| k)
                        .collect();
                    model.retain(|_, d| *d > now);
                    assert_eq!(out, due);
                }
            }
            assert_eq!(w.len(), model.len());
        }
    }
}
