//! RESP (the Redis serialization protocol, version 2) as the kv example speaks it: requests as
//! arrays of bulk strings (what every client library and `redis-cli` send) or inline commands
//! (a line of words, for `nc`), replies as simple strings, errors, integers, bulk strings and
//! arrays.
//!
//! The parser is incremental and copies nothing: it reports where each argument lies in the
//! input and how many bytes one whole command took, or that the command is not complete yet.
//! Every length is bounded before anything is buffered for it, so a client cannot announce an
//! argument larger than the server will hold.

/// Arguments of one command, at most.
pub const MAX_ARGS: usize = 1024 * 1024;
/// An inline command line, at most.
pub const MAX_INLINE: usize = 64 * 1024;

/// What the input holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not one whole command yet: wait for more bytes.
    Incomplete,
    /// One command of `used` bytes; its arguments are in `args`. An empty line or an empty
    /// array is a command with no arguments (skipped, as Redis does).
    Command { used: usize },
    /// The input is not RESP: answer `-ERR Protocol error: ...` and close, as Redis does.
    Invalid(&'static str),
}

/// Parses one command at the start of `input`, putting each argument's range in `args`.
/// `max_bulk` bounds one argument's length.
pub fn parse(input: &[u8], args: &mut Vec<(usize, usize)>, max_bulk: usize) -> Parsed {
    args.clear();
    match input.first() {
        None => Parsed::Incomplete,
        Some(b'*') => parse_array(input, args, max_bulk),
        Some(_) => parse_inline(input, args),
    }
}

/// The number of a length line (`123\r\n` after its `*` or `$`) starting at `at`, and where the
/// line ends; `Ok(None)` if the line is not complete yet. One pass over the digits (this runs
/// once per argument): an optional `-`, at most 18 digits, then `\r\n`.
fn length(
    input: &[u8],
    at: usize,
    long: &'static str,
) -> Result<Option<(i64, usize)>, &'static str> {
    let mut i = at;
    let neg = input.get(i) == Some(&b'-');
    if neg {
        i += 1;
    }
    let start = i;
    let mut n: i64 = 0;
    while let Some(&d) = input.get(i) {
        if !d.is_ascii_digit() {
            break;
        }
        if i - start == 18 {
            return Err(long);
        }
        n = n * 10 + i64::from(d - b'0');
        i += 1;
    }
    match (input.get(i), input.get(i + 1)) {
        (None, _) | (Some(b'\r'), None) => Ok(None),
        (Some(b'\r'), Some(b'\n')) if i > start => Ok(Some((if neg { -n } else { n }, i + 2))),
        _ => Err("invalid length"),
    }
}

fn parse_array(input: &[u8], args: &mut Vec<(usize, usize)>, max_bulk: usize) -> Parsed {
    let (count, mut at) = match length(input, 1, "too big mbulk count string") {
        Ok(Some(v)) => v,
        Ok(None) => return Parsed::Incomplete,
        Err("invalid length") => return Parsed::Invalid("invalid multibulk length"),
        Err(e) => return Parsed::Invalid(e),
    };
    if count <= 0 {
        return Parsed::Command { used: at };
    }
    if count as u64 > MAX_ARGS as u64 {
        return Parsed::Invalid("invalid multibulk length");
    }
    for _ in 0..count {
        match input.get(at) {
            None => return Parsed::Incomplete,
            Some(b'$') => {}
            Some(_) => return Parsed::Invalid("expected '$'"),
        }
        let (len, start) = match length(input, at + 1, "too big bulk count string") {
            Ok(Some(v)) => v,
            Ok(None) => return Parsed::Incomplete,
            Err("invalid length") => return Parsed::Invalid("invalid bulk length"),
            Err(e) => return Parsed::Invalid(e),
        };
        if len < 0 || len as u64 > max_bulk as u64 {
            return Parsed::Invalid("invalid bulk length");
        }
        let len = len as usize;
        if input.len() < start + len + 2 {
            return Parsed::Incomplete;
        }
        if &input[start + len..start + len + 2] != b"\r\n" {
            return Parsed::Invalid("bulk string not terminated by CRLF");
        }
        args.push((start, start + len));
        at = start + len + 2;
    }
    Parsed::Command { used: at }
}

fn parse_inline(input: &[u8], args: &mut Vec<(usize, usize)>) -> Parsed {
    let window = &input[..input.len().min(MAX_INLINE + 1)];
    let Some(nl) = window.iter().position(|&b| b == b'\n') else {
        return if window.len() > MAX_INLINE {
            Parsed::Invalid("too big inline request")
        } else {
            Parsed::Incomplete
        };
    };
    let line = &input[..nl];
    let mut i = 0;
    while i < line.len() {
        if line[i].is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        while i < line.len() && !line[i].is_ascii_whitespace() {
            i += 1;
        }
        args.push((start, i));
    }
    Parsed::Command { used: nl + 1 }
}

/// Appends `+text\r\n`.
pub fn simple(out: &mut Vec<u8>, text: &str) {
    out.push(b'+');
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends `-text\r\n` (`text` starts with the error kind, such as `ERR`).
pub fn error(out: &mut Vec<u8>, text: &str) {
    out.push(b'-');
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends `:n\r\n`.
pub fn integer(out: &mut Vec<u8>, n: i64) {
    out.push(b':');
    decimal(out, n);
    out.extend_from_slice(b"\r\n");
}

/// Appends a bulk string, or the null bulk string for `None`.
pub fn bulk(out: &mut Vec<u8>, value: Option<&[u8]>) {
    match value {
        None => out.extend_from_slice(b"$-1\r\n"),
        Some(v) => {
            out.push(b'$');
            decimal(out, v.len() as i64);
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(v);
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// Appends an array header of `n` elements.
pub fn array(out: &mut Vec<u8>, n: usize) {
    out.push(b'*');
    decimal(out, n as i64);
    out.extend_from_slice(b"\r\n");
}

/// Appends `n` in decimal without going through `fmt` (this runs once per reply).
pub fn decimal(out: &mut Vec<u8>, n: i64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    let mut v = n.unsigned_abs();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if n < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(&buf[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(input: &[u8]) -> Result<(usize, Vec<&[u8]>), Parsed> {
        let mut args = Vec::new();
        match parse(input, &mut args, 512) {
            Parsed::Command { used } => {
                Ok((used, args.iter().map(|&(a, b)| &input[a..b]).collect()))
            }
            other => Err(other),
        }
    }

    #[test]
    fn arrays_inline_and_partial_input() {
        let req = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nva\r\nl\r\n*1\r\n$4\r\nPING\r\n";
        let (used, args) = words(req).unwrap();
        assert_eq!(args, [&b"SET"[..], b"k", b"va\r\nl"]);
        assert_eq!(words(&req[used..]).unwrap().1, [&b"PING"[..]]);
        for cut in 1..used {
            assert_eq!(words(&req[..cut]), Err(Parsed::Incomplete), "cut at {cut}");
        }
        assert_eq!(
            words(b"get  key\r\n").unwrap(),
            (10, vec![&b"get"[..], b"key"])
        );
        assert_eq!(words(b"\r\n").unwrap(), (2, vec![]));
        assert_eq!(words(b"*0\r\n").unwrap(), (4, vec![]));
        assert_eq!(words(b"*1\r\n$0\r\n\r\n").unwrap().1, [&b""[..]]);
    }

    #[test]
    fn malformed_and_oversized_input_is_invalid() {
        for bad in [
            &b"*x\r\n"[..],
            b"*1\r\n+PING\r\n",
            b"*1\r\n$-2\r\n",
            b"*1\r\n$513\r\n",
            b"*1\r\n$3\r\nGETxx",
            b"*99999999999999999999\r\n",
            b"*2000000\r\n",
        ] {
            assert!(
                matches!(words(bad), Err(Parsed::Invalid(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = vec![b'a'; MAX_INLINE + 1];
        assert_eq!(words(&long), Err(Parsed::Invalid("too big inline request")));
        let digits = [b"*".as_slice(), &[b'1'; 40]].concat();
        assert!(matches!(words(&digits), Err(Parsed::Invalid(_))));
    }

    #[test]
    fn replies_encode() {
        let mut out = Vec::new();
        simple(&mut out, "OK");
        error(&mut out, "ERR no");
        integer(&mut out, -42);
        integer(&mut out, i64::MIN);
        bulk(&mut out, Some(b"hi"));
        bulk(&mut out, None);
        array(&mut out, 2);
        assert_eq!(
            out,
            b"+OK\r\n-ERR no\r\n:-42\r\n:-9223372036854775808\r\n$2\r\nhi\r\n$-1\r\n*2\r\n"
        );
    }
}
