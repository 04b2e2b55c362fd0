//! Topic permissions: patterns, and the shard-local table that interns what connections may do.
//!
//! A pattern is a topic name in which `{sub}` stands for the token's subject and a final `*`
//! for any suffix: `chat:*`, `user:{sub}`, `user:{sub}:*`, `*`. The `*` is a wildcard only as
//! the pattern's last character (a `*` elsewhere is refused), and `{sub}` is replaced by the
//! subject literally, so a subject holding `*` matches only itself. Matching allocates nothing.
//!
//! Connections do not keep their token, nor their own copy of its permissions: a connection
//! holds a [`Grant`] (8 bytes: a [`PermId`] and the token's expiry), and the [`PermTable`] of
//! its shard holds the permissions, shared. The table interns on two levels: pattern lists are
//! shared by every user with the same claims (the `chat:*`, `user:{sub}` of a whole user base),
//! and one entry per distinct subject holds its `sub` and a reference to them. A user's connections
//! share one entry; entries are reference-counted and freed with their last connection.
//!
//! Owned by one shard thread (it uses `Rc`); the verifier that produces [`Permissions`] is
//! shared, the table is not.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// An entry of a [`PermTable`]; `0` is the anonymous entry.
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

/// Both pattern lists of a token, interned: every subject with the same claims shares one.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Rules {
    subscribe: Box<[Box<str>]>,
    publish: Box<[Box<str>]>,
}

/// One subject's permissions: its `sub` and its (shared) rules.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Entry {
    sub: Box<str>,
    rules: Rc<Rules>,
}

#[derive(Debug)]
struct Slot {
    /// `None` for a free slot.
    entry: Option<Rc<Entry>>,
    /// Connections holding this entry (by convention 0 for the anonymous entry, which is never
    /// freed).
    refs: u32,
}

/// One shard's interned permissions. Lookups by [`PermId`] are an index; interning (on connect
/// and refresh) hashes the subject and the pattern lists.
#[derive(Debug)]
pub struct PermTable {
    slots: Vec<Slot>,
    free: Vec<u32>,
    index: HashMap<Rc<Entry>, u32>,
    rules: HashSet<Rc<Rules>>,
}

impl PermTable {
    /// A table whose anonymous entry allows `anonymous_subscribe` (checked patterns).
    pub fn new(anonymous_subscribe: &[String]) -> PermTable {
        let mut t = PermTable {
            slots: Vec::new(),
            free: Vec::new(),
            index: HashMap::new(),
            rules: HashSet::new(),
        };
        let entry = t.entry("", anonymous_subscribe, &[] as &[&str]);
        t.slots.push(Slot {
            entry: Some(entry),
            refs: 0,
        });
        t
    }

    /// Replaces what anonymous connections may subscribe to (a reload of `[auth]`).
    pub fn set_anonymous(&mut self, anonymous_subscribe: &[String]) {
        let entry = self.entry("", anonymous_subscribe, &[] as &[&str]);
        if let Some(old) = self.slots[0].entry.replace(entry) {
            self.drop_entry(old);
        }
    }

    /// Takes a reference to the entry for `p`, creating it if no connection holds one yet.
    pub fn acquire(&mut self, p: &Permissions) -> PermId {
        let entry = self.entry(&p.sub, &p.subscribe, &p.publish);
        if let Some(&i) = self.index.get(&entry) {
            self.slots[i as usize].refs += 1;
            self.drop_entry(entry);
            return PermId(i);
        }
        let slot = Slot {
            entry: Some(entry.clone()),
            refs: 1,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = slot;
                i
            }
            None => {
                self.slots.push(slot);
                u32::try_from(self.slots.len() - 1).expect("fewer than 2^32 entries")
            }
        };
        self.index.insert(entry, i);
        PermId(i)
    }

    /// Gives back a reference taken with [`PermTable::acquire`] (the anonymous id is ignored).
    pub fn release(&mut self, id: PermId) {
        if id == PermId::ANONYMOUS {
            return;
        }
        let slot = &mut self.slots[id.0 as usize];
        debug_assert!(slot.refs > 0, "release of a free permission entry");
        slot.refs = slot.refs.saturating_sub(1);
        if slot.refs > 0 {
            return;
        }
        if let Some(entry) = slot.entry.take() {
            self.index.remove(&entry);
            self.free.push(id.0);
            self.drop_entry(entry);
        }
    }

    fn get(&self, id: PermId) -> Option<&Entry> {
        self.slots.get(id.0 as usize)?.entry.as_deref()
    }

    /// The permissions behind `id` (`None` for the anonymous entry or a free one): what a
    /// connection carries to another process in a hand-over, to be interned there again.
    pub fn permissions(&self, id: PermId) -> Option<Permissions> {
        if id == PermId::ANONYMOUS {
            return None;
        }
        let e = self.get(id)?;
        Some(Permissions {
            sub: e.sub.clone(),
            subscribe: e.rules.subscribe.to_vec(),
            publish: e.rules.publish.to_vec(),
        })
    }

    pub fn may_subscribe(&self, id: PermId, topic: &str) -> bool {
        self.get(id)
            .is_some_and(|e| any_matches(&e.rules.subscribe, &e.sub, topic))
    }

    pub fn may_publish(&self, id: PermId, topic: &str) -> bool {
        self.get(id)
            .is_some_and(|e| any_matches(&e.rules.publish, &e.sub, topic))
    }

    /// The subject (empty for anonymous connections): for debug logs and the refresh check.
    pub fn sub(&self, id: PermId) -> &str {
        self.get(id).map_or("", |e| &e.sub)
    }

    /// Entries held by connections (the anonymous one excluded).
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Distinct pattern-list pairs interned (shared between entries).
    pub fn rule_sets(&self) -> usize {
        self.rules.len()
    }

    fn entry<S: AsRef<str>, T: AsRef<str>>(
        &mut self,
        sub: &str,
        subscribe: &[S],
        publish: &[T],
    ) -> Rc<Entry> {
        let rules = Rules {
            subscribe: subscribe.iter().map(|p| p.as_ref().into()).collect(),
            publish: publish.iter().map(|p| p.as_ref().into()).collect(),
        };
        let rules = match self.rules.get(&rules) {
            Some(r) => r.clone(),
            None => {
                let r = Rc::new(rules);
                self.rules.insert(r.clone());
                r
            }
        };
        Rc::new(Entry {
            sub: sub.into(),
            rules,
        })
    }

    /// Drops `entry`, and its rules from the interned set when nothing else uses them.
    fn drop_entry(&mut self, entry: Rc<Entry>) {
        let Ok(Entry { rules, .. }) = Rc::try_unwrap(entry) else {
            return;
        };
        // The set's own reference plus this one: nothing else uses the rules.
        if Rc::strong_count(&rules) == 2 {
            self.rules.remove(&rules);
        }
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
    fn the_table_shares_entries_and_lists_and_frees_them() {
        let mut t = PermTable::new(&["public:*".to_string()]);
        assert!(t.may_subscribe(PermId::ANONYMOUS, "public:news"));
        assert!(!t.may_subscribe(PermId::ANONYMOUS, "chat:x"));
        assert!(!t.may_publish(PermId::ANONYMOUS, "public:news"));
        let alice = perms("alice", &["chat:*", "user:{sub}"], &[]);
        let bob = perms("bob", &["chat:*", "user:{sub}"], &[]);
        let a1 = t.acquire(&alice);
        let a2 = t.acquire(&alice);
        let b = t.acquire(&bob);
        assert_eq!(a1, a2, "one entry per distinct subject and claims");
        assert_ne!(a1, b);
        assert_eq!(t.len(), 2);
        // Alice's and Bob's rules are one; the anonymous entry has its own.
        assert_eq!(t.rule_sets(), 2);
        assert!(t.may_subscribe(a1, "user:alice") && !t.may_subscribe(a1, "user:bob"));
        assert!(t.may_subscribe(b, "user:bob") && t.may_subscribe(b, "chat:x"));
        assert!(!t.may_publish(a1, "chat:x"));
        assert_eq!(t.sub(b), "bob");
        t.release(a1);
        assert_eq!(t.len(), 2, "alice still has a connection");
        t.release(a2);
        assert_eq!(t.len(), 1);
        t.release(b);
        assert!(t.is_empty());
        assert_eq!(
            t.rule_sets(),
            1,
            "the chat rules went with their last entry"
        );
        // A freed slot is reused.
        let c = t.acquire(&perms("carol", &[], &["chat:{sub}"]));
        assert!(c == a1 || c == b);
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
    }

    #[test]
    fn a_grant_is_8_bytes() {
        // What a connection pays for its permissions, whatever its token held: the rest is
        // shared in the shard's table.
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
