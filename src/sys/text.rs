//! Text from bytes already known to be ASCII: the HTTP codec's fast path takes its request line
//! as `str` through here.
//!
//! Why it is in `sys`: it is the crate's one `unsafe` outside the kernel interface, and `unsafe`
//! lives here only. `str::from_utf8` validates UTF-8 in general and costs about 130
//! instructions for a 15-byte request line (callgrind: an unaligned short slice goes byte by
//! byte); an ASCII check is a few word-sized loads.
#![allow(unsafe_code)]

/// `bytes` as text if every byte is ASCII.
#[inline]
pub fn ascii_str(bytes: &[u8]) -> Option<&str> {
    if is_ascii(bytes) {
        // SAFETY: every byte is below 0x80, and a sequence of ASCII bytes is valid UTF-8.
        Some(unsafe { std::str::from_utf8_unchecked(bytes) })
    } else {
        None
    }
}

/// Whether every byte is below 0x80, eight at a time (the last word overlapping the one before):
/// `<[u8]>::is_ascii` takes about 50 instructions on a 15-byte slice, this about 10.
#[inline]
fn is_ascii(bytes: &[u8]) -> bool {
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let word = |c: &[u8]| u64::from_le_bytes(c.try_into().expect("8 bytes"));
    if bytes.len() < 8 {
        return bytes.iter().fold(0, |a, &b| a | b) < 0x80;
    }
    let mut any = word(&bytes[bytes.len() - 8..]);
    for c in bytes.chunks_exact(8) {
        any |= word(c);
    }
    any & HIGH == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ascii_becomes_text() {
        assert_eq!(ascii_str(b"GET /a?b=c"), Some("GET /a?b=c"));
        assert_eq!(ascii_str(b""), Some(""));
        assert_eq!(ascii_str(b"caf\xc3\xa9"), None);
        assert_eq!(ascii_str(b"\x80"), None);
        for len in 0..40 {
            let mut b = vec![b'a'; len];
            assert!(ascii_str(&b).is_some());
            for i in 0..len {
                b[i] = 0xff;
                assert_eq!(ascii_str(&b), None, "{len} {i}");
                b[i] = b'a';
            }
        }
    }
}
