//! Topic permissions: patterns, and the shard-local table that interns what connections may do.
//!
//! A pattern is a topic name in which `{sub}` stands for the token's subject and a final `*`
//! for any suffix: `chat:*`, `user:{sub}`, `user:{sub}:*`, `*`. The `*` is a wildcard only as
//! the pattern's last character (a `*` elsewhere is refused), and `{sub}` is replaced by the
//! subject literally, so a subject holding `*` matches only itself. Matching allocates nothing.
//!
//! Connections do not keep their token, nor their own copy of its pattern lists: a connection
//! holds a [`Grant`] (8 bytes: a [`PermId`] and the token's expiry), and the [`PermTable`] of
//! its shard holds the permissions. The table keeps what the permissions need and nothing more:
//! one slot per authenticated connection with its subject (for `{sub}`, the refresh check, the
//! close log and the hand-over) stored inline when it is 24 bytes or shorter, and the index of
//! its pattern lists, which are interned and shared by every connection with the same claims
//! (the `chat:*`, `user:{sub}` of a whole user base). A slot is 28 bytes; subjects are not
//! deduplicated, since an index of them would cost more than the subject it saves for the
//! usual one connection per user. Slots and rule sets are freed with their last user.
//!
//! Owned by one shard thread; the verifier that produces [`Permissions`] is shared, the table
//! is not.

use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use compact_str::CompactString;

/// The placeholder for the token's subject.
pub const SUB: &str = "{sub}";

/// Why a pattern is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("a pattern cannot be empty")]
    Empty,
    #[error("`*` is a wildcard only as the last character")]
    InnerWildcard,
    #[error("`{{` and `}}` appear only in `{{sub}}`")]
    Brace,
    #[error("holds a control character")]
    Control,
    #[error("uses `{{sub}}`, and there is no subject here")]
    NoSubject,
    #[error("is longer than {0} bytes")]
    TooLong(usize),
}

/// The longest pattern accepted (the longest topic, 256 bytes by default, plus room for
/// `{sub}` placeholders).
pub const MAX_PATTERN: usize = 1024;

/// Checks one pattern; `subject` says whether `{sub}` may appear (not for anonymous or API-key
/// patterns, which have no subject).
pub fn check_pattern(p: &str, subject: bool) -> Result<(), PatternError> {
    if p.is_empty() {
        return Err(PatternError::Empty);
    }
    if p.len() > MAX_PATTERN {
        return Err(PatternError::TooLong(MAX_PATTERN));
    }
    if p.chars().any(char::is_control) {
        return Err(PatternError::Control);
    }
    let body = p.strip_suffix('*').unwrap_or(p);
    if body.contains('*') {
        return Err(PatternError::InnerWildcard);
    }
    let without = body.replace(SUB, "");
    if without.contains(['{', '}']) {
        return Err(PatternError::Brace);
    }
    if !subject && body.contains(SUB) {
        return Err(PatternError::NoSubject);
    }
    Ok(())
}

/// Whether `topic` matches the checked pattern `p`, `{sub}` standing for `sub`.
pub fn matches(p: &str, sub: &str, topic: &str) -> bool {
    let (body, prefix) = match p.strip_suffix('*') {
        Some(b) => (b, true),
        None => (p, false),
    };
    let mut parts = body.split(SUB);
    let Some(mut rest) = parts.next().and_then(|first| topic.strip_prefix(first)) else {
        return false;
    };
    for part in parts {
        match rest.strip_prefix(sub).and_then(|r| r.strip_prefix(part)) {
            Some(r) => rest = r,
            None => return false,
        }
    }
    prefix || rest.is_empty()
}

/// Whether any pattern of `list` lets `topic` through.
pub fn any_matches<S: AsRef<str>>(list: &[S], sub: &str, topic: &str) -> bool {
    list.iter().any(|p| matches(p.as_ref(), sub, topic))
}

/// What a verified token allows: its subject and its two pattern lists (checked).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions {
    pub sub: Box<str>,
    pub subscribe: Vec<Box<str>>,
    pub publish: Vec<Box<str>>,
}

/// A slot of a [`PermTable`]; `0` is the anonymous one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PermId(u32);

impl PermId {
    /// Connections without a token (on an `optional` route): `anonymous_subscribe`, no publish.
    pub const ANONYMOUS: PermId = PermId(0);
}

/// What one connection holds for its permissions: 8 bytes, whatever the token said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub perms: PermId,
    /// The token's `exp` in Unix seconds ([`Grant::NEVER`] for anonymous connections). The
    /// `u32` lasts until 2106; a later `exp` is clamped to it, which only ends a connection
    /// sooner than its token would.
    pub expires: u32,
}

impl Grant {
    pub const NEVER: u32 = u32::MAX;

    pub const ANONYMOUS: Grant = Grant {
        perms: PermId::ANONYMOUS,
        expires: Grant::NEVER,
    };

    /// The token's `exp` as stored.
    pub fn expiry(exp: u64) -> u32 {
        u32::try_from(exp).unwrap_or(Grant::NEVER - 1)
    }

    pub fn is_anonymous(&self) -> bool {
        self.perms == PermId::ANONYMOUS
    }

    /// Time left at `now` before the token's `exp` plus `leeway` (zero once past it); `None`
    /// when the grant never expires.
    pub fn remaining(&self, leeway: Duration, now: SystemTime) -> Option<Duration> {
        if self.expires == Grant::NEVER {
            return None;
        }
        let end = UNIX_EPOCH + Duration::from_secs(u64::from(self.expires)) + leeway;
        Some(end.duration_since(now).unwrap_or(Duration::ZERO))
    }
}

/// Both pattern lists of a token, interned: every connection with the same claims shares one.
#[derive(Debug)]
struct RuleSet {
    subscribe: Box<[Box<str>]>,
    publish: Box<[Box<str>]>,
    /// Slots using it.
    refs: u32,
    /// Of the two lists, as [`RuleSets::hash`] computes it.
    hash: u64,
}

impl RuleSet {
    fn is<S: AsRef<str>, T: AsRef<str>>(&self, subscribe: &[S], publish: &[T]) -> bool {
        fn same<S: AsRef<str>>(a: &[Box<str>], b: &[S]) -> bool {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| **x == *y.as_ref())
        }
        same(&self.subscribe, subscribe) && same(&self.publish, publish)
    }
}

/// The interned pattern-list pairs of a table: a slab of refcounted sets, and a hash index on
/// their content that a lookup reads without building a set (connecting allocates nothing
/// here for claims already interned).
#[derive(Debug, Default)]
struct RuleSets {
    sets: slab::Slab<RuleSet>,
    index: hashbrown::HashTable<u32>,
    hasher: RandomState,
}

impl RuleSets {
    fn hash<S: AsRef<str>, T: AsRef<str>>(&self, subscribe: &[S], publish: &[T]) -> u64 {
        let mut h = self.hasher.build_hasher();
        h.write_usize(subscribe.len());
        for p in subscribe {
            p.as_ref().hash(&mut h);
        }
        h.write_usize(publish.len());
        for p in publish {
            p.as_ref().hash(&mut h);
        }
        h.finish()
    }

    /// A reference to the set of these lists, interned if no slot uses it yet.
    fn acquire<S: AsRef<str>, T: AsRef<str>>(&mut self, subscribe: &[S], publish: &[T]) -> u32 {
        let hash = self.hash(subscribe, publish);
        let sets = &mut self.sets;
        if let Some(&i) = self
            .index
            .find(hash, |&i| sets[i as usize].is(subscribe, publish))
        {
            sets[i as usize].refs += 1;
            return i;
        }
        let i = sets.insert(RuleSet {
            subscribe: subscribe.iter().map(|p| p.as_ref().into()).collect(),
            publish: publish.iter().map(|p| p.as_ref().into()).collect(),
            refs: 1,
            hash,
        });
        let i = u32::try_from(i).expect("fewer than 2^32 rule sets");
        self.index
            .insert_unique(hash, i, |&j| sets[j as usize].hash);
        i
    }

    /// Gives back a reference; the set is freed with its last one.
    fn release(&mut self, i: u32) {
        let set = &mut self.sets[i as usize];
        debug_assert!(set.refs > 0, "release of a free rule set");
        set.refs = set.refs.saturating_sub(1);
        if set.refs > 0 {
            return;
        }
        let hash = set.hash;
        if let Ok(e) = self.index.find_entry(hash, |&j| j == i) {
            e.remove();
        }
        self.sets.remove(i as usize);
    }

    fn get(&self, i: u32) -> &RuleSet {
        &self.sets[i as usize]
    }

    fn len(&self) -> usize {
        self.index.len()
    }
}

/// A slot's rule set when the slot is free.
const FREE: u32 = u32::MAX;

/// One shard's permissions: a slot per authenticated connection (plus the anonymous one, slot
/// 0), each holding its subject and the index of its interned [`RuleSet`]. The two are kept in
/// parallel vectors, 28 bytes a slot: the subject inline up to 24 bytes (a heap string beyond),
/// and a `u32`. Free slots are reused first, so the vectors follow the peak of connections
/// (their untouched capacity is not resident). Lookups by [`PermId`] are an index; acquiring
/// hashes the pattern lists only.
#[derive(Debug)]
pub struct PermTable {
    subjects: Vec<CompactString>,
    rules: Vec<u32>,
    free: Vec<u32>,
    /// Slots held by connections (the anonymous one excluded).
    held: usize,
    sets: RuleSets,
}

impl PermTable {
    /// A table whose anonymous entry allows `anonymous_subscribe` (checked patterns).
    pub fn new(anonymous_subscribe: &[String]) -> PermTable {
        let mut sets = RuleSets::default();
        let anonymous = sets.acquire(anonymous_subscribe, &[] as &[&str]);
        PermTable {
            subjects: vec![CompactString::default()],
            rules: vec![anonymous],
            free: Vec::new(),
            held: 0,
            sets,
        }
    }

    /// Replaces what anonymous connections may subscribe to (a reload of `[auth]`).
    pub fn set_anonymous(&mut self, anonymous_subscribe: &[String]) {
        let new = self.sets.acquire(anonymous_subscribe, &[] as &[&str]);
        let old = std::mem::replace(&mut self.rules[0], new);
        self.sets.release(old);
    }

    /// A slot for one connection with permissions `p`: its subject, and a reference to the
    /// interned rule set of its claims.
    pub fn acquire(&mut self, p: &Permissions) -> PermId {
        let rules = self.sets.acquire(&p.subscribe, &p.publish);
        let sub = CompactString::from(&*p.sub);
        self.held += 1;
        let i = match self.free.pop() {
            Some(i) => {
                self.subjects[i as usize] = sub;
                self.rules[i as usize] = rules;
                i
            }
            None => {
                self.subjects.push(sub);
                self.rules.push(rules);
                u32::try_from(self.rules.len() - 1).expect("fewer than 2^32 slots")
            }
        };
        PermId(i)
    }

    /// Gives back a slot taken with [`PermTable::acquire`] (the anonymous id is ignored).
    pub fn release(&mut self, id: PermId) {
        if id == PermId::ANONYMOUS {
            return;
        }
        let i = id.0 as usize;
        let rules = std::mem::replace(&mut self.rules[i], FREE);
        debug_assert!(rules != FREE, "release of a free permission slot");
        if rules == FREE {
            return;
        }
        self.sets.release(rules);
        // Frees a subject that did not fit inline.
        self.subjects[i] = CompactString::default();
        self.free.push(id.0);
        self.held -= 1;
    }

    /// The subject and rule set of a held slot (or the anonymous one).
    fn get(&self, id: PermId) -> Option<(&str, &RuleSet)> {
        let i = id.0 as usize;
        match *self.rules.get(i)? {
            FREE => None,
            r => Some((&self.subjects[i], self.sets.get(r))),
        }
    }

    /// The permissions behind `id` (`None` for the anonymous entry or a free one): what a
    /// connection carries to another process in a hand-over, to be interned there again.
    pub fn permissions(&self, id: PermId) -> Option<Permissions> {
        if id == PermId::ANONYMOUS {
            return None;
        }
        let (sub, rules) = self.get(id)?;
        Some(Permissions {
            sub: sub.into(),
            subscribe: rules.subscribe.to_vec(),
            publish: rules.publish.to_vec(),
        })
    }

    pub fn may_subscribe(&self, id: PermId, topic: &str) -> bool {
        self.get(id)
            .is_some_and(|(sub, r)| any_matches(&r.subscribe, sub, topic))
    }

    pub fn may_publish(&self, id: PermId, topic: &str) -> bool {
        self.get(id)
            .is_some_and(|(sub, r)| any_matches(&r.publish, sub, topic))
    }

    /// The subject (empty for anonymous connections): for debug logs and the refresh check.
    pub fn sub(&self, id: PermId) -> &str {
        self.get(id).map_or("", |(sub, _)| sub)
    }

    /// Slots held by connections (the anonymous one excluded).
    pub fn len(&self) -> usize {
        self.held
    }

    pub fn is_empty(&self) -> bool {
        self.held == 0
    }

    /// Distinct pattern-list pairs interned (shared between slots, the anonymous one's
    /// included).
    pub fn rule_sets(&self) -> usize {
        self.sets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn perms(sub: &str, subscribe: &[&str], publish: &[&str]) -> Permissions {
        Permissions {
            sub: sub.into(),
            subscribe: subscribe.iter().map(|s| (*s).into()).collect(),
            publish: publish.iter().map(|s| (*s).into()).collect(),
        }
    }

    #[test]
    fn patterns_match_literally_by_prefix_and_by_subject() {
        assert!(matches("chat:*", "", "chat:general"));
        assert!(matches("chat:*", "", "chat:"));
        assert!(matches("chat:*", "", "chat:a:b"));
        assert!(!matches("chat:*", "", "chat"));
        assert!(!matches("chat:*", "", "news:chat:x"));
        assert!(matches("news", "", "news"));
        assert!(!matches("news", "", "news2"));
        assert!(matches("*", "", "anything"));
        assert!(matches("user:{sub}", "alice", "user:alice"));
        assert!(!matches("user:{sub}", "alice", "user:bob"));
        assert!(!matches("user:{sub}", "alice", "user:alice2"));
        assert!(!matches("user:{sub}", "alice", "user:"));
        assert!(matches("user:{sub}:*", "alice", "user:alice:inbox"));
        assert!(!matches("user:{sub}:*", "alice", "user:alicex:inbox"));
        assert!(matches("dm:{sub}:{sub}", "a", "dm:a:a"));
        assert!(!matches("dm:{sub}:{sub}", "a", "dm:a:b"));
        // A subject is literal: a `*` in it is no wildcard.
        assert!(matches("user:{sub}", "a*", "user:a*"));
        assert!(!matches("user:{sub}", "a*", "user:abc"));
        // An empty subject (anonymous) never stands for something else.
        assert!(!matches("user:{sub}", "", "user:x"));
    }

    #[test]
    fn patterns_are_checked() {
        for ok in ["chat:*", "*", "user:{sub}", "a{sub}b{sub}*", "x"] {
            check_pattern(ok, true).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        assert_eq!(check_pattern("", true), Err(PatternError::Empty));
        assert_eq!(check_pattern("a*b", true), Err(PatternError::InnerWildcard));
        assert_eq!(check_pattern("**", true), Err(PatternError::InnerWildcard));
        assert_eq!(check_pattern("user:{id}", true), Err(PatternError::Brace));
        assert_eq!(check_pattern("user:{sub", true), Err(PatternError::Brace));
        assert_eq!(check_pattern("a\nb", true), Err(PatternError::Control));
        assert_eq!(
            check_pattern("user:{sub}", false),
            Err(PatternError::NoSubject)
        );
        check_pattern("chat:*", false).unwrap();
        let long = "a".repeat(MAX_PATTERN + 1);
        assert_eq!(
            check_pattern(&long, true),
            Err(PatternError::TooLong(MAX_PATTERN))
        );
    }

    #[test]
    fn permissions_come_back_out_as_they_went_in() {
        let mut t = PermTable::new(&[]);
        let p = perms("alice", &["chat:*", "user:{sub}"], &["chat:*"]);
        let id = t.acquire(&p);
        assert_eq!(t.permissions(id), Some(p.clone()));
        assert_eq!(t.permissions(PermId::ANONYMOUS), None);
        // Interned again (another shard, another process): the same rights.
        let mut other = PermTable::new(&[]);
        let again = other.acquire(&t.permissions(id).unwrap());
        assert!(other.may_subscribe(again, "user:alice"));
        assert!(!other.may_publish(again, "user:alice"));
    }

    #[test]
    fn the_table_shares_lists_and_frees_them() {
        let mut t = PermTable::new(&["public:*".to_string()]);
        assert!(t.may_subscribe(PermId::ANONYMOUS, "public:news"));
        assert!(!t.may_subscribe(PermId::ANONYMOUS, "chat:x"));
        assert!(!t.may_publish(PermId::ANONYMOUS, "public:news"));
        assert_eq!(t.sub(PermId::ANONYMOUS), "");
        let alice = perms("alice", &["chat:*", "user:{sub}"], &[]);
        let bob = perms("bob", &["chat:*", "user:{sub}"], &[]);
        let a1 = t.acquire(&alice);
        let a2 = t.acquire(&alice);
        let b = t.acquire(&bob);
        assert_ne!(a1, a2, "a slot per connection");
        assert_ne!(a1, b);
        assert_ne!(a1, PermId::ANONYMOUS);
        assert_eq!(t.len(), 3);
        // Alice's and Bob's rules are one; the anonymous entry has its own.
        assert_eq!(t.rule_sets(), 2);
        assert!(t.may_subscribe(a1, "user:alice") && !t.may_subscribe(a1, "user:bob"));
        assert!(t.may_subscribe(a2, "user:alice") && !t.may_subscribe(a2, "user:bob"));
        assert!(t.may_subscribe(b, "user:bob") && t.may_subscribe(b, "chat:x"));
        assert!(!t.may_publish(a1, "chat:x"));
        assert_eq!((t.sub(a1), t.sub(b)), ("alice", "bob"));
        t.release(a1);
        assert_eq!(t.len(), 2);
        assert_eq!(
            t.rule_sets(),
            2,
            "alice's other connection and bob use them"
        );
        assert!(
            t.may_subscribe(a2, "user:alice"),
            "the other slot is untouched"
        );
        t.release(a2);
        t.release(b);
        assert!(t.is_empty());
        assert_eq!(
            t.rule_sets(),
            1,
            "the chat rules went with their last connection"
        );
        // A freed slot is reused.
        let c = t.acquire(&perms("carol", &[], &["chat:{sub}"]));
        assert!([a1, a2, b].contains(&c));
        assert!(t.may_publish(c, "chat:carol") && !t.may_publish(c, "chat:dave"));
        t.release(PermId::ANONYMOUS);
        assert!(t.may_subscribe(PermId::ANONYMOUS, "public:x"));
        t.release(c);
        let d = t.acquire(&perms("dave", &["room:*"], &["room:*"]));
        assert_eq!(t.rule_sets(), 2);
        t.release(d);
        assert_eq!(t.rule_sets(), 1);
        // A released id allows nothing (and names no one).
        assert!(!t.may_subscribe(d, "room:x") && t.sub(d).is_empty());
        assert_eq!(t.permissions(d), None);
    }

    #[test]
    fn slots_are_reused_and_the_vectors_stay_at_the_peak() {
        let mut t = PermTable::new(&[]);
        let p = |i: usize| perms(&format!("user-{i}"), &["chat:*"], &["chat:{sub}"]);
        let ids: Vec<_> = (0..100).map(|i| t.acquire(&p(i))).collect();
        assert_eq!(t.len(), 100);
        assert_eq!(t.rule_sets(), 2, "theirs and the anonymous one");
        for id in &ids[..50] {
            t.release(*id);
        }
        let again: Vec<_> = (100..150).map(|i| t.acquire(&p(i))).collect();
        let mut reused = again.clone();
        reused.sort_by_key(|id| id.0);
        let mut freed = ids[..50].to_vec();
        freed.sort_by_key(|id| id.0);
        assert_eq!(reused, freed, "the freed slots, no new ones");
        assert_eq!(t.subjects.len(), 101);
        assert_eq!(t.rules.len(), 101);
        for (k, id) in again.iter().enumerate() {
            let sub = format!("user-{}", 100 + k);
            assert_eq!(t.sub(*id), sub);
            assert!(t.may_publish(*id, &format!("chat:{sub}")));
            assert!(!t.may_publish(*id, "chat:user-0"));
        }
        for id in ids[50..].iter().chain(&again) {
            t.release(*id);
        }
        assert!(t.is_empty());
        assert_eq!(t.rule_sets(), 1, "only the anonymous set");
        // What a slot costs: the subject inline (up to 24 bytes) and its rule set's index.
        assert_eq!(
            std::mem::size_of::<CompactString>() + std::mem::size_of::<u32>(),
            28
        );
        assert!(!CompactString::from("s".repeat(24)).is_heap_allocated());
    }

    #[test]
    fn rule_sets_are_refcounted_and_freed_when_unused() {
        let mut t = PermTable::new(&["news".to_string()]);
        let lists: Vec<Vec<String>> = (0..20).map(|i| vec![format!("room:{i}:*")]).collect();
        let of = |i: usize, sub: &str| {
            let l: Vec<&str> = lists[i].iter().map(String::as_str).collect();
            perms(sub, &l, &[])
        };
        let first: Vec<_> = (0..20).map(|i| t.acquire(&of(i, "a"))).collect();
        let second: Vec<_> = (0..20).map(|i| t.acquire(&of(i, "b"))).collect();
        assert_eq!(t.rule_sets(), 21);
        for id in &first {
            t.release(*id);
        }
        assert_eq!(t.rule_sets(), 21, "each set has a connection left");
        for (i, id) in second.iter().enumerate() {
            assert!(t.may_subscribe(*id, &format!("room:{i}:x")));
            assert!(!t.may_subscribe(*id, &format!("room:{}:x", i + 1)));
            t.release(*id);
            assert_eq!(t.rule_sets(), 20 - i);
        }
        // Freed sets are reused, and what they now hold is the new lists.
        let e = t.acquire(&perms("e", &["other:*"], &["other:*"]));
        assert_eq!(t.rule_sets(), 2);
        assert!(t.rules[e.0 as usize] < 21, "a freed set reused");
        assert!(t.may_publish(e, "other:x") && !t.may_subscribe(e, "room:0:x"));
        // Other lists are another set.
        let f = t.acquire(&perms("f", &["other:*"], &[]));
        assert_eq!(t.rule_sets(), 3);
        assert!(!t.may_publish(f, "other:x"));
        t.release(e);
        t.release(f);
        assert_eq!(t.rule_sets(), 1);
        assert!(t.may_subscribe(PermId::ANONYMOUS, "news"));
    }

    #[test]
    fn long_subjects_are_kept_whole() {
        let mut t = PermTable::new(&[]);
        // A UUID (36 bytes) and longer: past what a slot holds inline.
        let uuid = "6f1d2c3e-0000-4000-8000-000000000001";
        let long = "x".repeat(300);
        let short = "s".repeat(24);
        let mut ids = Vec::new();
        for sub in [uuid, long.as_str(), short.as_str(), ""] {
            let p = perms(sub, &["user:{sub}:*"], &["dm:{sub}"]);
            let id = t.acquire(&p);
            assert_eq!(t.sub(id), sub);
            assert_eq!(t.permissions(id), Some(p));
            assert!(t.may_subscribe(id, &format!("user:{sub}:inbox")));
            assert!(t.may_publish(id, &format!("dm:{sub}")));
            assert!(!t.may_publish(id, &format!("dm:{sub}x")));
            ids.push(id);
        }
        t.release(ids[0]);
        let again = t.acquire(&perms("bob", &["user:{sub}:*"], &[]));
        assert_eq!(again, ids[0]);
        assert_eq!(t.sub(again), "bob");
        assert!(t.may_subscribe(again, "user:bob:x") && !t.may_subscribe(again, "user:6f1d:x"));
        assert_eq!(t.sub(ids[1]), long, "the neighbours are untouched");
    }

    #[test]
    fn anonymous_patterns_can_be_replaced() {
        let mut t = PermTable::new(&[]);
        assert!(!t.may_subscribe(PermId::ANONYMOUS, "public:x"));
        t.set_anonymous(&["public:*".to_string()]);
        assert!(t.may_subscribe(PermId::ANONYMOUS, "public:x"));
        t.set_anonymous(&[]);
        assert!(!t.may_subscribe(PermId::ANONYMOUS, "public:x"));
        assert_eq!(t.rule_sets(), 1, "the replaced rules are not kept");
        // Connections with the same lists as the anonymous ones share their set, and keep it
        // when the anonymous patterns change.
        t.set_anonymous(&["public:*".to_string()]);
        let c = t.acquire(&perms("carol", &["public:*"], &[]));
        assert_eq!(t.rule_sets(), 1);
        t.set_anonymous(&["news".to_string()]);
        assert_eq!(t.rule_sets(), 2);
        assert!(t.may_subscribe(c, "public:x") && !t.may_subscribe(c, "news"));
        assert!(t.may_subscribe(PermId::ANONYMOUS, "news"));
        assert!(!t.may_subscribe(PermId::ANONYMOUS, "public:x"));
        assert_eq!(t.permissions(PermId::ANONYMOUS), None);
        t.release(c);
        assert_eq!(t.rule_sets(), 1);
    }

    #[test]
    fn a_grant_is_8_bytes() {
        // What a connection keeps in its own state for its permissions, whatever its token
        // held: the rest is its 28-byte slot in the shard's table and the shared rule set.
        assert_eq!(std::mem::size_of::<Grant>(), 8);
        assert_eq!(Grant::expiry(1_700_000_000), 1_700_000_000);
        assert_eq!(Grant::expiry(u64::MAX), Grant::NEVER - 1);
        assert!(Grant::ANONYMOUS.is_anonymous());
        let g = Grant {
            perms: PermId(3),
            expires: 1_000,
        };
        let at = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
        let leeway = Duration::from_secs(5);
        assert_eq!(g.remaining(leeway, at(990)), Some(Duration::from_secs(15)));
        assert_eq!(g.remaining(leeway, at(1_005)), Some(Duration::ZERO));
        assert_eq!(g.remaining(leeway, at(2_000)), Some(Duration::ZERO));
        assert_eq!(Grant::ANONYMOUS.remaining(leeway, at(0)), None);
    }
}
