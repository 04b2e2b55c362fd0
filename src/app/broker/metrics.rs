//! The broker's counters: written by the broker threads (and, for refusals at the door, by the
//! shards), read by anyone through [`BrokerMetrics::snapshot`] (`/metrics`, `/stats`, the log
//! line). Relaxed atomics: each value is exact on its own, a snapshot is not one instant.
//!
//! The latency histogram is publish-to-delivery of this process's own publishes as the broker
//! thread sees them: from the shard's `publish` call to the message coming back from the broker
//! and being handed to the shards (the time in the shards' queues after that is not in it).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::config::BrokerKind;

use super::REFUSAL_LABELS;

/// Upper bounds of the latency buckets, in microseconds (the last bucket is everything above).
pub const LATENCY_BOUNDS_US: &[u64] = &[
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];

pub struct BrokerMetrics {
    kind: BrokerKind,
    sub_up: AtomicBool,
    pub_up: AtomicBool,
    reconnects: AtomicU64,
    connect_failures: AtomicU64,
    published: AtomicU64,
    refused: [AtomicU64; 7],
    received: AtomicU64,
    unwanted: AtomicU64,
    topics: AtomicU64,
    gaps: AtomicU64,
    handoff_lost: AtomicU64,
    outcomes_lost: AtomicU64,
    undeliverable: AtomicU64,
    latency: [AtomicU64; 13],
    latency_sum_us: AtomicU64,
    latency_count: AtomicU64,
}

/// One reading of [`BrokerMetrics`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerStats {
    pub kind: &'static str,
    /// Both connections up (subscribing and publishing).
    pub up: bool,
    /// Connections re-established after one was lost (or after the broker first appeared).
    pub reconnects: u64,
    /// Connection attempts that failed.
    pub connect_failures: u64,
    /// Publishes the broker accepted.
    pub published: u64,
    /// Publishes refused, by reason, in the order of [`REFUSAL_LABELS`].
    pub refused: [u64; 7],
    /// Messages received from the broker for topics with local subscribers.
    pub received: u64,
    /// Messages received for a topic no longer wanted here (an unsubscribe in flight), or
    /// under a name that is not a topic of this prefix; not delivered.
    pub unwanted: u64,
    /// Topics this process is subscribed to on the broker.
    pub topics: u64,
    /// Gap notices: topics told "messages may have been missed", once per topic per
    /// reconnection.
    pub gaps: u64,
    /// Messages (or gap notices) not handed to a shard because its command queue was full.
    pub handoff_lost: u64,
    /// Publish outcomes not handed back to the publisher's shard (its queue was full): the HTTP
    /// request then times out with 503.
    pub outcomes_lost: u64,
    /// Messages from the broker that cannot be sent to a subscriber (not text, or larger than
    /// the largest max_message).
    pub undeliverable: u64,
    /// Latency histogram counts per bucket of [`LATENCY_BOUNDS_US`] (and one above).
    pub latency_buckets: [u64; 13],
    pub latency_sum_us: u64,
    pub latency_count: u64,
}

impl BrokerStats {
    pub fn refused_total(&self) -> u64 {
        self.refused.iter().sum()
    }

    /// The refusals with their labels.
    pub fn refused_by_reason(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        REFUSAL_LABELS
            .iter()
            .copied()
            .zip(self.refused.iter().copied())
    }

    /// The latency under which `q` (0..1) of the measured deliveries fall, as the upper bound
    /// of the bucket that holds it (`None` without measurements, `u64::MAX` above the last
    /// bound).
    pub fn latency_quantile_us(&self, q: f64) -> Option<u64> {
        if self.latency_count == 0 {
            return None;
        }
        let target = ((self.latency_count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.latency_buckets.iter().enumerate() {
            seen += n;
            if seen >= target {
                return Some(LATENCY_BOUNDS_US.get(i).copied().unwrap_or(u64::MAX));
            }
        }
        Some(u64::MAX)
    }
}

impl BrokerMetrics {
    pub(super) fn new(kind: BrokerKind) -> BrokerMetrics {
        BrokerMetrics {
            kind,
            sub_up: AtomicBool::new(false),
            pub_up: AtomicBool::new(false),
            reconnects: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            published: AtomicU64::new(0),
            refused: Default::default(),
            received: AtomicU64::new(0),
            unwanted: AtomicU64::new(0),
            topics: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            handoff_lost: AtomicU64::new(0),
            outcomes_lost: AtomicU64::new(0),
            undeliverable: AtomicU64::new(0),
            latency: Default::default(),
            latency_sum_us: AtomicU64::new(0),
            latency_count: AtomicU64::new(0),
        }
    }

    pub fn is_up(&self) -> bool {
        self.sub_up.load(Ordering::Acquire) && self.pub_up.load(Ordering::Acquire)
    }

    pub(super) fn publisher_up(&self) -> bool {
        self.pub_up.load(Ordering::Acquire)
    }

    pub(super) fn set_sub_up(&self, up: bool) {
        self.sub_up.store(up, Ordering::Release);
    }

    pub(super) fn set_pub_up(&self, up: bool) {
        self.pub_up.store(up, Ordering::Release);
    }

    pub(super) fn count_reconnect(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn count_connect_failure(&self) {
        self.connect_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn count_published(&self) {
        self.published.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn count_refused(&self, index: usize) {
        if let Some(c) = self.refused.get(index) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(super) fn count_received(&self) {
        self.received.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn count_unwanted(&self) {
        self.unwanted.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn set_topics(&self, n: usize) {
        self.topics.store(n as u64, Ordering::Relaxed);
    }

    pub(super) fn count_gap(&self) {
        self.gaps.fetch_add(1, Ordering::Relaxed);
    }

    /// For the sink (the product's side): a message or gap notice a shard's queue refused.
    pub fn count_handoff_lost(&self) {
        self.handoff_lost.fetch_add(1, Ordering::Relaxed);
    }

    /// For the sink: an outcome a shard's queue refused.
    pub fn count_outcome_lost(&self) {
        self.outcomes_lost.fetch_add(1, Ordering::Relaxed);
    }

    /// For the sink: a message that cannot be framed for subscribers.
    pub fn count_undeliverable(&self) {
        self.undeliverable.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn record_latency_us(&self, us: u64) {
        let i = LATENCY_BOUNDS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(LATENCY_BOUNDS_US.len());
        self.latency[i].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
        self.latency_count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> BrokerStats {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BrokerStats {
            kind: self.kind.as_str(),
            up: self.is_up(),
            reconnects: r(&self.reconnects),
            connect_failures: r(&self.connect_failures),
            published: r(&self.published),
            refused: std::array::from_fn(|i| r(&self.refused[i])),
            received: r(&self.received),
            unwanted: r(&self.unwanted),
            topics: r(&self.topics),
            gaps: r(&self.gaps),
            handoff_lost: r(&self.handoff_lost),
            outcomes_lost: r(&self.outcomes_lost),
            undeliverable: r(&self.undeliverable),
            latency_buckets: std::array::from_fn(|i| r(&self.latency[i])),
            latency_sum_us: r(&self.latency_sum_us),
            latency_count: r(&self.latency_count),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_and_quantiles() {
        let m = BrokerMetrics::new(BrokerKind::Redis);
        assert_eq!(m.snapshot().latency_quantile_us(0.5), None);
        for us in [50, 80, 300, 900, 2_000_000] {
            m.record_latency_us(us);
        }
        let s = m.snapshot();
        assert_eq!(s.latency_count, 5);
        assert_eq!(s.latency_buckets[0], 2);
        assert_eq!(s.latency_buckets[12], 1);
        assert_eq!(s.latency_quantile_us(0.4), Some(100));
        assert_eq!(s.latency_quantile_us(0.6), Some(500));
        assert_eq!(s.latency_quantile_us(0.99), Some(u64::MAX));
        assert_eq!(LATENCY_BOUNDS_US.len() + 1, s.latency_buckets.len());
        assert_eq!(REFUSAL_LABELS.len(), s.refused.len());
    }
}
