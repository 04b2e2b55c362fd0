//! Per-connection buffers, which exist only while a connection has leftover input or unsent
//! output, and the shard's pool that recycles them.
//!
//! An idle connection holds `None` for both: the "no buffer while idle" rule that keeps a
//! million idle connections cheap.

/// Unconsumed input: bytes the service has not yet accepted (a partial request or frame).
pub type InBuf = Box<Vec<u8>>;

/// Output the socket did not take yet. `pos` marks what was already written.
pub struct OutBuf {
    data: Vec<u8>,
    pos: usize,
}

impl OutBuf {
    pub fn pending(&self) -> &[u8] {
        &self.data[self.pos..]
    }

    pub fn len(&self) -> usize {
        self.data.len() - self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.pos == self.data.len()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        // Compact before growing, so a long-lived slow reader does not creep upward.
        if self.pos > 0 && self.pos >= self.data.len() / 2 {
            self.data.drain(..self.pos);
            self.pos = 0;
        }
        self.data.extend_from_slice(bytes);
    }

    pub fn consume(&mut self, n: usize) {
        self.pos += n;
        debug_assert!(self.pos <= self.data.len());
    }
}

/// Recycles buffers so a busy connection does not cost a malloc per partial read or write.
/// Bounded in count and in the capacity of what it keeps.
pub struct BufferPool {
    vecs: Vec<Vec<u8>>,
    keep: usize,
    max_capacity: usize,
}

impl BufferPool {
    pub fn new(keep: usize, max_capacity: usize) -> Self {
        BufferPool {
            vecs: Vec::new(),
            keep,
            max_capacity,
        }
    }

    fn take(&mut self) -> Vec<u8> {
        self.vecs.pop().unwrap_or_default()
    }

    fn give(&mut self, mut v: Vec<u8>) {
        if self.vecs.len() < self.keep && v.capacity() <= self.max_capacity {
            v.clear();
            self.vecs.push(v);
        }
    }

    pub fn input_from(&mut self, bytes: &[u8]) -> InBuf {
        let mut v = self.take();
        v.extend_from_slice(bytes);
        Box::new(v)
    }

    // The box is the connection's storage; what is recycled is the vector inside it.
    #[allow(clippy::boxed_local)]
    pub fn release_input(&mut self, b: InBuf) {
        self.give(*b);
    }

    pub fn output_from(&mut self, bytes: &[u8]) -> Box<OutBuf> {
        let mut data = self.take();
        data.extend_from_slice(bytes);
        Box::new(OutBuf { data, pos: 0 })
    }

    #[allow(clippy::boxed_local)]
    pub fn release_output(&mut self, b: Box<OutBuf>) {
        self.give(b.data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbuf_tracks_pending_and_compacts() {
        let mut pool = BufferPool::new(4, 1 << 20);
        let mut out = pool.output_from(b"hello world");
        out.consume(6);
        assert_eq!(out.pending(), b"world");
        out.push(b"!");
        assert_eq!(out.pending(), b"world!");
        assert_eq!(out.len(), 6);
        out.consume(6);
        assert!(out.is_empty());
        pool.release_output(out);
        let again = pool.output_from(b"x");
        assert_eq!(again.pending(), b"x");
    }

    #[test]
    fn pool_is_bounded() {
        let mut pool = BufferPool::new(2, 16);
        for _ in 0..5 {
            pool.release_input(Box::new(Vec::with_capacity(8)));
        }
        assert_eq!(pool.vecs.len(), 2);
        pool.vecs.clear();
        pool.release_input(Box::new(Vec::with_capacity(1024)));
        assert!(pool.vecs.is_empty(), "large buffers are freed, not kept");
    }
}
