//! The HTTP codec's fast path: a request head in its strict common form, parsed without
//! httparse.
//!
//! Pure functions, called on the shard's thread by [`super::http`]. [`parse`] accepts a head only
//! when httparse accepts it too, with exactly httparse's result (method, target, version, header
//! names and values with surrounding spaces and tabs removed, head length): a method of token
//! characters, one space, a target of visible ASCII (`0x21`–`0x7E`), one space, `HTTP/1.1` or
//! `HTTP/1.0`, CRLF; then lines of a token name, a colon, optional spaces and tabs, a value of
//! visible ASCII, spaces and tabs, CRLF; then CRLF; at most as many fields as the caller's array
//! holds. Anything else returns `None` (a head not complete yet, a bare LF, a byte outside those
//! sets, obs-text, an empty line before the request line, more fields) and the codec asks
//! httparse, which then decides and words the error: the fast path changes what a request
//! costs, never what it gets. A unit test holds the two parsers to the same answers on mutated
//! requests.
//!
//! Why: for the two-line requests of a pipelining client httparse spends about 560 instructions
//! per request (callgrind): a runtime SIMD dispatch per field, a UTF-8 check of the target, its
//! bookkeeping per field. Here the target and the values are scanned eight bytes at a time with
//! plain integer arithmetic (no target features), the names byte by byte (they are short), and
//! only the request line is converted to `str`, by an ASCII check ([`crate::sys::text`]).

/// One header field of a request: the name as sent (token characters), the value without the
/// spaces and tabs around it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field<'a> {
    pub name: &'a [u8],
    pub value: &'a [u8],
}

impl Field<'_> {
    pub const EMPTY: Field<'static> = Field {
        name: b"",
        value: b"",
    };
}

/// A head parsed by [`parse`]; its fields are at the front of the caller's array.
#[derive(Debug, PartialEq, Eq)]
pub struct Head<'a> {
    pub method: &'a str,
    pub target: &'a str,
    /// Index of the first `?` in `target`, if any.
    pub query: Option<usize>,
    /// The minor version: 0 or 1.
    pub version: u8,
    /// Fields parsed into the caller's array.
    pub fields: usize,
    /// Bytes of the head, the final CRLF included.
    pub len: usize,
}

/// `tchar` (RFC 9110 5.6.2): the characters of a method and of a field name.
static TCHAR: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        b += 1;
    }
    t
};

const HTTP_11: u64 = u64::from_le_bytes(*b"HTTP/1.1");
const HTTP_10: u64 = u64::from_le_bytes(*b"HTTP/1.0");
const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// The eight bytes at `buf[i..]` as one little-endian word (byte `k` in bits `8k..8k+8`).
#[inline]
fn word(buf: &[u8], i: usize) -> Option<u64> {
    let w: [u8; 8] = buf.get(i..i + 8)?.try_into().ok()?;
    Some(u64::from_le_bytes(w))
}

/// The high bit of every byte of `w` that is below `low` (at most 0x80) or above 0x7E. Only the
/// lowest flagged byte is exact (a borrow or a carry may flag bytes above it), which is all the
/// callers read: the first byte outside the range.
#[inline]
fn outside(w: u64, low: u8) -> u64 {
    let below = w.wrapping_sub(ONES * u64::from(low)) & !w;
    let above = w.wrapping_add(ONES) | w;
    (below | above) & HIGH
}

/// The high bit of every byte of `w` equal to `b`; only the lowest flag is exact, as above.
#[inline]
fn equal(w: u64, b: u8) -> u64 {
    let x = w ^ (ONES * u64::from(b));
    x.wrapping_sub(ONES) & !x & HIGH
}

/// Byte index (0–7) of the lowest flagged byte of a non-zero mask.
#[inline]
fn first(mask: u64) -> usize {
    (mask.trailing_zeros() / 8) as usize
}

/// Whether `b` is a token character.
#[inline]
pub fn is_token(b: u8) -> bool {
    TCHAR[b as usize]
}

/// The end of the token starting at `i`.
#[inline]
fn token_end(buf: &[u8], mut i: usize) -> usize {
    while i < buf.len() && is_token(buf[i]) {
        i += 1;
    }
    i
}

/// The end of the run of visible ASCII (`0x21`–`0x7E`) starting at `i`, and the index of its
/// first `?`.
#[inline]
fn target_end(buf: &[u8], mut i: usize) -> (usize, Option<usize>) {
    let mut query = None;
    while let Some(w) = word(buf, i) {
        let bad = outside(w, 0x21);
        if query.is_none() {
            let q = equal(w, b'?');
            // Only a `?` before the end of the run belongs to the target.
            if q != 0 && (bad == 0 || first(q) < first(bad)) {
                query = Some(i + first(q));
            }
        }
        if bad != 0 {
            return (i + first(bad), query);
        }
        i += 8;
    }
    while let Some(&b) = buf.get(i) {
        if !(0x21..=0x7e).contains(&b) {
            break;
        }
        if b == b'?' && query.is_none() {
            query = Some(i);
        }
        i += 1;
    }
    (i, query)
}

/// The index of the CR that ends the field value starting at `i`: `None` if a byte other than
/// visible ASCII, space or tab comes first (or the line is not complete).
#[inline]
fn value_end(buf: &[u8], mut i: usize) -> Option<usize> {
    loop {
        let stop = match word(buf, i) {
            Some(w) => {
                let bad = outside(w, 0x20);
                if bad == 0 {
                    i += 8;
                    continue;
                }
                i + first(bad)
            }
            None => {
                while buf.get(i).is_some_and(|&b| (0x20..=0x7e).contains(&b)) {
                    i += 1;
                }
                i
            }
        };
        match *buf.get(stop)? {
            b'\r' => return Some(stop),
            b'\t' => i = stop + 1,
            _ => return None,
        }
    }
}

/// Parses the head at the start of `buf` when it has the strict common form (see the module
/// note), its fields into `fields`. `None`: not that form, or not complete; ask httparse.
pub fn parse<'a>(buf: &'a [u8], fields: &mut [Field<'a>]) -> Option<Head<'a>> {
    let method_end = token_end(buf, 0);
    if method_end == 0 || buf.get(method_end) != Some(&b' ') {
        return None;
    }
    let start = method_end + 1;
    let (end, query) = target_end(buf, start);
    if end == start || buf.get(end) != Some(&b' ') {
        return None;
    }
    // `HTTP/1.x` as one word, then CRLF.
    let version = match word(buf, end + 1)? {
        HTTP_11 => 1,
        HTTP_10 => 0,
        _ => return None,
    };
    if buf.get(end + 9..end + 11)? != b"\r\n" {
        return None;
    }
    let mut i = end + 11;
    let mut n = 0;
    loop {
        if *buf.get(i)? == b'\r' {
            if *buf.get(i + 1)? != b'\n' {
                return None;
            }
            i += 2;
            break;
        }
        let name_end = token_end(buf, i);
        if name_end == i || buf.get(name_end) != Some(&b':') {
            return None;
        }
        let mut v = name_end + 1;
        while matches!(buf.get(v), Some(b' ' | b'\t')) {
            v += 1;
        }
        let cr = value_end(buf, v)?;
        if *buf.get(cr + 1)? != b'\n' {
            return None;
        }
        let mut value_end = cr;
        while value_end > v && matches!(buf[value_end - 1], b' ' | b'\t') {
            value_end -= 1;
        }
        *fields.get_mut(n)? = Field {
            name: &buf[i..name_end],
            value: &buf[v..value_end],
        };
        n += 1;
        i = cr + 2;
    }
    // Only the request line is needed as text; it is ASCII, so this cannot fail.
    let line = crate::sys::text::ascii_str(&buf[..end])?;
    Some(Head {
        method: &line[..method_end],
        target: &line[start..],
        query: query.map(|q| q - start),
        version,
        fields: n,
        len: i,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Method, target, version, fields (name, value) and head length.
    type Parsed = (String, String, u8, Vec<(Vec<u8>, Vec<u8>)>, usize);

    /// httparse's answer in the same shape, when it parses a complete head.
    fn reference(buf: &[u8]) -> Option<Parsed> {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(n)) => Some((
                req.method?.to_string(),
                req.path?.to_string(),
                req.version?,
                req.headers
                    .iter()
                    .map(|h| (h.name.as_bytes().to_vec(), h.value.to_vec()))
                    .collect(),
                n,
            )),
            _ => None,
        }
    }

    /// Checks the fast path against httparse on `buf`; returns whether the fast path took it.
    #[track_caller]
    fn agree(buf: &[u8]) -> bool {
        let mut fields = [Field::EMPTY; 8];
        let Some(head) = parse(buf, &mut fields) else {
            return false;
        };
        let Some((method, target, version, headers, len)) = reference(buf) else {
            panic!(
                "fast path took what httparse refuses: {:?}",
                String::from_utf8_lossy(buf)
            );
        };
        let ours: Vec<(Vec<u8>, Vec<u8>)> = fields[..head.fields]
            .iter()
            .map(|f| (f.name.to_vec(), f.value.to_vec()))
            .collect();
        assert_eq!(
            (head.method, head.target, head.version, &ours, head.len),
            (&*method, &*target, version, &headers, len),
            "{:?}",
            String::from_utf8_lossy(buf)
        );
        assert_eq!(head.query, target.find('?'));
        true
    }

    #[test]
    fn common_requests_take_the_fast_path_with_httparse_results() {
        for req in [
            &b"GET /plaintext HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"[..],
            b"GET / HTTP/1.0\r\n\r\n",
            b"POST /publish/t?x=1&y=?2 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi",
            b"get /a?b HTTP/1.1\r\nX-Empty:\r\nX-Spaces: \t \r\nX-Inner: a \t b \t\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\nhost:x\r\n\r\n",
            b"GET http://example.com/a?q HTTP/1.1\r\nHost: example.com\r\n\r\n",
            b"GET /0123456789abcdef0123456789abcdef HTTP/1.1\r\nA: 0123456789abcdef0123\r\n\r\n",
        ] {
            assert!(agree(req), "{:?}", String::from_utf8_lossy(req));
        }
    }

    #[test]
    fn uncommon_forms_are_left_to_httparse() {
        for req in [
            &b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"[..], // empty line first
            b"GET / HTTP/1.1\nHost: a\r\n\r\n",            // bare LF
            b"GET / HTTP/1.1\r\nHost: a\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n\n",
            b"GET /\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n", // non-ASCII target
            b"GET / HTTP/1.1\r\nX: caf\xc3\xa9\r\n\r\n",  // obs-text
            b"GET / HTTP/1.1\r\nX: a\x7f\r\n\r\n",
            b"GET / HTTP/1.1\r\nX : a\r\n\r\n",
            b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n", // not complete
            b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\nE: 5\r\nF: 6\r\nG: 7\r\nH: 8\r\nI: 9\r\n\r\n",
        ] {
            assert!(!agree(req), "{:?}", String::from_utf8_lossy(req));
        }
    }

    /// Bytes that matter to either parser, and ordinary ones.
    fn byte() -> impl Strategy<Value = u8> {
        prop_oneof![
            Just(b' '),
            Just(b'\t'),
            Just(b'\r'),
            Just(b'\n'),
            Just(b':'),
            Just(b'?'),
            Just(b'/'),
            Just(0x7f),
            Just(0x80),
            Just(0xc3),
            Just(0),
            Just(b'a'),
            Just(b'"'),
            any::<u8>(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

        /// Mutations of a valid head (bytes replaced, inserted, removed; the input cut short):
        /// whatever the fast path accepts, httparse accepts with the same result.
        #[test]
        fn the_fast_path_agrees_with_httparse(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..3, byte()), 0..4),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut buf = b"GET /p?q=1 HTTP/1.1\r\nHost: a.b:80\r\nUser-Agent: x \t y\r\nE:\r\n\r\nbody".to_vec();
            for (at, kind, b) in edits {
                let i = at.index(buf.len());
                match kind {
                    0 => buf[i] = b,
                    1 => buf.insert(i, b),
                    _ => {
                        buf.remove(i);
                    }
                }
            }
            let len = cut.index(buf.len() + 1);
            agree(&buf[..len]);
            agree(&buf);
        }
    }
}
