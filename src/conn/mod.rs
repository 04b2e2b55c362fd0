//! Connection bookkeeping owned by one shard: the generation-tagged slab and the buffers.
//!
//! A [`Token`] is what goes into `epoll_event.u64`: the slab index in the low 32 bits and a
//! generation in the high 32 bits. A slot is reused after a close, so an event still queued for
//! the old connection carries the old generation and is recognised as stale instead of being
//! delivered to the new one.
//!
//! The slab never uses index `u32::MAX`, so tokens with that index name the shard's other
//! registrations: its waker and its own listeners ([`Token::kind`] tells them apart).

pub mod buffer;

pub use buffer::{BufferPool, InBuf, OutBuf};

/// Identifies one connection within its shard for its whole life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Token(pub u64);

/// What an epoll token names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// The shard's eventfd.
    Waker,
    /// The shard's own listener at this position (`balance = "reuseport"`).
    Listener(usize),
    /// A connection (possibly a stale one: the slab decides).
    Conn,
}

impl Token {
    /// Reserved for the shard's waker; never produced by a slab (index `u32::MAX` is never used).
    pub const WAKER: Token = Token(u64::MAX);

    /// The token of a shard's own listener number `i` (index `u32::MAX`, `i` in the high half).
    pub fn listener(i: usize) -> Token {
        debug_assert!(i < u32::MAX as usize);
        Token(((i as u64) << 32) | 0xffff_ffff)
    }

    #[inline]
    pub fn kind(self) -> TokenKind {
        if self == Token::WAKER {
            TokenKind::Waker
        } else if self.index() == u32::MAX as usize {
            TokenKind::Listener(self.generation() as usize)
        } else {
            TokenKind::Conn
        }
    }

    fn new(index: usize, generation: u32) -> Token {
        Token(((generation as u64) << 32) | index as u64)
    }

    pub fn index(self) -> usize {
        (self.0 & 0xffff_ffff) as usize
    }

    pub fn generation(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

/// One slab slot: the value and the generation its token must carry.
pub(crate) struct Slot<T> {
    generation: u32,
    value: T,
}

/// A slab whose keys carry a generation.
pub struct Slab<T> {
    slab: slab::Slab<Slot<T>>,
    next_generation: u32,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            slab: slab::Slab::new(),
            next_generation: 1,
        }
    }
}

impl<T> Slab<T> {
    pub fn insert(&mut self, value: T) -> Token {
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1).max(1);
        let index = self.slab.insert(Slot { generation, value });
        assert!(
            index < u32::MAX as usize,
            "more than 2^32-1 connections in one shard"
        );
        Token::new(index, generation)
    }

    /// The live value for `token`, or `None` if the slot is empty or reused (a stale token).
    #[inline]
    pub fn get_mut(&mut self, token: Token) -> Option<&mut T> {
        match self.slab.get_mut(token.index()) {
            Some(slot) if slot.generation == token.generation() => Some(&mut slot.value),
            _ => None,
        }
    }

    pub fn get(&self, token: Token) -> Option<&T> {
        match self.slab.get(token.index()) {
            Some(slot) if slot.generation == token.generation() => Some(&slot.value),
            _ => None,
        }
    }

    pub fn remove(&mut self, token: Token) -> Option<T> {
        self.get(token)?;
        Some(self.slab.remove(token.index()).value)
    }

    /// The current token of the value at `index`, if any (timer wheel entries are plain indices).
    pub fn token_at(&self, index: usize) -> Option<Token> {
        self.slab
            .get(index)
            .map(|s| Token::new(index, s.generation))
    }

    pub fn len(&self) -> usize {
        self.slab.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }

    /// Every live token (allocates: for shutdown and reload, not the hot path).
    pub fn tokens(&self) -> Vec<Token> {
        self.slab
            .iter()
            .map(|(i, s)| Token::new(i, s.generation))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_token_is_rejected_after_reuse() {
        let mut slab = Slab::default();
        let a = slab.insert("a");
        assert_eq!(slab.get_mut(a), Some(&mut "a"));
        assert_eq!(slab.remove(a), Some("a"));
        let b = slab.insert("b");
        assert_eq!(a.index(), b.index(), "the slot is reused");
        assert_ne!(a, b);
        assert_eq!(slab.get_mut(a), None, "the old token is stale");
        assert_eq!(slab.remove(a), None);
        assert_eq!(slab.get(b), Some(&"b"));
        assert_eq!(slab.token_at(b.index()), Some(b));
    }

    #[test]
    fn tokens_never_collide_with_the_waker() {
        let mut slab = Slab::default();
        for _ in 0..1000 {
            let t = slab.insert(());
            assert_ne!(t, Token::WAKER);
            assert!(t.generation() != 0);
        }
        assert_eq!(slab.len(), 1000);
        assert_eq!(slab.tokens().len(), 1000);
        assert!(slab.tokens().iter().all(|t| t.kind() == TokenKind::Conn));
        assert_eq!(Token::WAKER.kind(), TokenKind::Waker);
        assert_eq!(Token::listener(3).kind(), TokenKind::Listener(3));
        assert_eq!(Token::listener(0).kind(), TokenKind::Listener(0));
    }
}
