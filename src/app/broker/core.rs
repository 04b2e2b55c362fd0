//! What both brokers share, owned by the `broker` thread: the interest table, what the current
//! connection is subscribed to, gap notices and the delivery of a message to the sink.
//!
//! Invariants:
//! - `table` holds exactly the topics some shard has reported wanted and not since unwanted,
//!   each with a non-empty [`ShardSet`].
//! - `on_broker` is what the live connection is subscribed to (empty while disconnected);
//!   `dirty` holds the topics whose wanted state may differ from it. A backend brings the two
//!   together with [`Core::changes`] and confirms with [`Core::subscribed`] /
//!   [`Core::unsubscribed`].
//! - On every (re)connection, each topic of `table` gets one gap notice before any message of
//!   the new connection is delivered (Redis; NATS resubscribes inside its client, see
//!   `nats.rs`), then is subscribed again.

use crossbeam_channel::Receiver;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::{wire, Notice, ShardSet, Shared, Source};

pub(super) struct Core {
    shards: usize,
    pub(super) prefix: String,
    table: HashMap<Arc<str>, ShardSet>,
    on_broker: HashSet<Arc<str>>,
    dirty: HashSet<Arc<str>>,
    pub(super) shared: Arc<Shared>,
    /// The url's secrets, scrubbed from client errors before they are logged.
    pub(super) secrets: Vec<String>,
}

impl Core {
    pub(super) fn new(
        shards: usize,
        prefix: String,
        shared: Arc<Shared>,
        secrets: Vec<String>,
    ) -> Core {
        Core {
            shards,
            prefix,
            table: HashMap::new(),
            on_broker: HashSet::new(),
            dirty: HashSet::new(),
            shared,
            secrets,
        }
    }

    /// Applies up to `max` notices waiting in `rx`; returns how many.
    pub(super) fn drain_notices(&mut self, rx: &Receiver<Notice>, max: usize) -> usize {
        let mut n = 0;
        while n < max {
            match rx.try_recv() {
                Ok(notice) => {
                    self.apply(notice);
                    n += 1;
                }
                Err(_) => break,
            }
        }
        n
    }

    pub(super) fn apply(&mut self, n: Notice) {
        if n.shard >= self.shards {
            return;
        }
        if n.wanted {
            if let Some(set) = self.table.get_mut(&*n.topic) {
                set.insert(n.shard);
                return;
            }
            let topic: Arc<str> = Arc::from(n.topic);
            let mut set = ShardSet::new(self.shards);
            set.insert(n.shard);
            self.table.insert(topic.clone(), set);
            self.dirty.insert(topic);
        } else if let Some(set) = self.table.get_mut(&*n.topic) {
            set.remove(n.shard);
            if set.is_empty() {
                if let Some((topic, _)) = self.table.remove_entry(&*n.topic) {
                    self.dirty.insert(topic);
                }
            }
        }
    }

    /// The topics to subscribe to and to unsubscribe from on the live connection.
    pub(super) fn changes(&mut self) -> (Vec<Arc<str>>, Vec<Arc<str>>) {
        let (mut sub, mut unsub) = (Vec::new(), Vec::new());
        for topic in self.dirty.drain() {
            match (
                self.table.contains_key(&topic),
                self.on_broker.contains(&topic),
            ) {
                (true, false) => sub.push(topic),
                (false, true) => unsub.push(topic),
                _ => {}
            }
        }
        (sub, unsub)
    }

    pub(super) fn has_changes(&self) -> bool {
        !self.dirty.is_empty()
    }

    pub(super) fn subscribed(&mut self, topics: &[Arc<str>]) {
        self.on_broker.extend(topics.iter().cloned());
        self.shared.metrics.set_topics(self.on_broker.len());
    }

    pub(super) fn unsubscribed(&mut self, topics: &[Arc<str>]) {
        for t in topics {
            self.on_broker.remove(t);
        }
        self.shared.metrics.set_topics(self.on_broker.len());
    }

    /// A subscription that failed: tried again at the next sync.
    pub(super) fn retry(&mut self, topic: Arc<str>) {
        self.dirty.insert(topic);
    }

    /// The topics gauge back to what is subscribed (NATS: after a reconnection, which keeps
    /// the client's subscriptions).
    pub(super) fn restore_gauge(&self) {
        self.shared.metrics.set_topics(self.on_broker.len());
    }

    /// The connection is gone: nothing is subscribed any more.
    pub(super) fn disconnected(&mut self) {
        self.on_broker.clear();
        self.shared.metrics.set_topics(0);
    }

    /// A connection is (again) up: every wanted topic gets its gap notice and is due to be
    /// subscribed.
    pub(super) fn connected(&mut self) {
        self.on_broker.clear();
        self.shared.metrics.set_topics(0);
        self.gap_all();
        self.dirty.extend(self.table.keys().cloned());
    }

    /// One gap notice per wanted topic.
    pub(super) fn gap_all(&self) {
        for (topic, set) in &self.table {
            self.shared.metrics.count_gap();
            self.shared.sink.gap(topic, set);
        }
    }

    pub(super) fn wanted(&self) -> usize {
        self.table.len()
    }

    /// A message from the broker for `topic`: to the sink with the shards that want it.
    pub(super) fn deliver(&self, topic: &str, payload: &[u8]) {
        let Some((topic, set)) = self.table.get_key_value(topic) else {
            self.shared.metrics.count_unwanted();
            return;
        };
        let (header, data) = wire::decode(payload);
        self.shared.metrics.count_received();
        let source = if header.is_some() {
            Source::Shardnet
        } else {
            Source::Other
        };
        self.shared.sink.message(topic, data, set, source);
        if let Some((origin, at)) = header {
            if origin == self.shared.origin {
                let now = self.shared.epoch.elapsed().as_nanos() as u64;
                self.shared
                    .metrics
                    .record_latency_us(now.saturating_sub(at) / 1000);
            }
        }
    }

    /// A message under a name that is not one of this prefix's topics.
    pub(super) fn foreign(&self) {
        self.shared.metrics.count_unwanted();
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{shared, Recorder};
    use super::*;

    fn notice(shard: usize, topic: &str, wanted: bool) -> Notice {
        Notice {
            shard,
            topic: topic.into(),
            wanted,
        }
    }

    #[test]
    fn the_table_follows_the_notices_and_drives_subscriptions() {
        let rec = Arc::new(Recorder::default());
        let (s, _n, _p) = shared(rec.clone(), 8, 8);
        let mut c = Core::new(3, "p.".into(), s, Vec::new());
        c.apply(notice(0, "a", true));
        c.apply(notice(1, "a", true));
        c.apply(notice(9, "a", true)); // no such shard: ignored
        let (sub, unsub) = c.changes();
        assert_eq!((sub.len(), unsub.len()), (1, 0));
        c.subscribed(&sub);
        c.apply(notice(0, "a", false));
        assert!(!c.has_changes(), "shard 1 still wants it");
        c.deliver("a", b"1");
        c.deliver("zzz", b"2");
        c.apply(notice(1, "a", false));
        let (sub, unsub) = c.changes();
        assert_eq!((sub.len(), &*unsub[0]), (0, "a"));
        c.unsubscribed(&unsub);
        // Wanted and unwanted again before a sync: nothing to do.
        c.apply(notice(2, "b", true));
        c.apply(notice(2, "b", false));
        assert_eq!(c.changes(), (vec![], vec![]));
        // A (re)connection: a gap per wanted topic, all due to be subscribed again.
        c.apply(notice(2, "c", true));
        c.connected();
        let (sub, _) = c.changes();
        assert_eq!(sub.iter().map(|t| &**t).collect::<Vec<_>>(), vec!["c"]);
        assert_eq!(
            *rec.0.lock(),
            vec!["message a 1 {1} Other".to_string(), "gap c {2}".to_string()]
        );
        let m = c.shared.metrics.snapshot();
        assert_eq!((m.received, m.unwanted, m.gaps), (1, 1, 1));
    }
}
