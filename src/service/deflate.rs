//! permessage-deflate (RFC 7692): negotiation of the `Sec-WebSocket-Extensions` offers, and the
//! compressor and inflater the WebSocket codec uses. No I/O and no framing: the codec sets and
//! reads RSV1, this module turns a message's payload into its compressed form and back.
//!
//! Owned by one shard thread: each shard has one [`ShardCompressors`] and one [`ShardInflater`];
//! a connection holds at most an [`Agreed`] (two bytes) and, in `dedicated` mode only, its own
//! [`Deflater`].
//!
//! What the server agrees to, per route mode (`compression` in `[[listener.websocket]]`):
//!
//! - `shared`: the server compresses without context takeover (it always answers
//!   `server_no_context_takeover`), so one compressor per shard serves every connection, and the
//!   same compressed frame can go to every subscriber of a fan-out. An idle connection costs
//!   nothing more than a plain one.
//! - `dedicated`: each connection gets its own compressor with context takeover (better ratios
//!   on streams of similar messages), its window bounded by the route's
//!   `compression_window_bits` (answered as `server_max_window_bits` when below 15). A client
//!   that asks for `server_no_context_takeover` gets it, and then shares the shard's compressor.
//! - `off`: offers are declined (the answer carries no extension).
//!
//! In every mode the server answers `client_no_context_takeover`: RFC 7692 §7.1.1.2 lets a
//! server include it whether or not the client offered it, and a client receiving it must not
//! use context takeover. Client messages are then independent deflate streams, inflated by the
//! shard's one inflater (reset after each message). A client cannot insist on context takeover
//! for its own direction (there is no offer parameter for that); a client that cannot honour the
//! answer fails the connection itself, as RFC 7692 §7 requires. So there is never a
//! per-connection inflater, not even while a fragmented message is assembled: its compressed
//! fragments are buffered (as plain fragments are) and inflated whole at the final one.
//!
//! `client_max_window_bits` is validated but never answered: the inflater's window is 15 bits,
//! which decodes any window a client uses, and omitting the parameter is always allowed.
//!
//! An offer the server cannot accept (an unknown or repeated parameter, an invalid value,
//! `server_max_window_bits=8`, which zlib cannot produce for raw deflate) is declined and the next
//! offer is tried. A header that is not valid syntax (RFC 6455 §9.1) is [`Malformed`]: the HTTP
//! layer answers 400.
//!
//! Payload rules (RFC 7692 §7.2): a message is compressed with a sync flush and its trailing
//! `00 00 ff ff` removed; a received message has those four bytes appended before inflating.
//! Inflating stops as soon as the output passes the route's `max_message` ([`InflateError::TooBig`],
//! close 1009), so a small message that would inflate to gigabytes costs at most `max_message`
//! of memory and the time to produce that much; a corrupt stream is [`InflateError::Invalid`]
//! (close 1007).
//!
//! Backend: `flate2` over `zlib-rs` (`benches/micro.rs` compares it with `miniz_oxide`; zlib-rs
//! is also the backend that can compress with a window below 15 bits, which `dedicated` needs).

use std::time::Instant;

use flate2::{Compress, Compression as Level, Decompress, FlushCompress, FlushDecompress, Status};

use crate::config::Compression;

/// The empty stored block a sync flush ends with: removed after compressing, appended before
/// inflating (RFC 7692 §7.2.1, §7.2.2).
pub const TRAILER: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The smallest window zlib compresses raw deflate with (it refuses 8, which the RFC allows).
pub const MIN_WINDOW_BITS: u8 = 9;
/// The largest window the RFC allows (32 KiB).
pub const MAX_WINDOW_BITS: u8 = 15;

/// The level for a `shared` connection's own messages (echo replies, acknowledgements), which
/// pay the whole cost every time: zlib-rs's level 1 (its "quick" strategy) compressed 1 KiB of
/// JSON to 361 bytes in 4.9 µs, level 6 to 270 bytes in 14 µs (`benches/micro.rs`; README
/// "Compression" has the runs).
pub const LEVEL_FAST: u32 = 1;
/// The level where the ratio is worth the time: a published message, compressed once per shard
/// for all its subscribers, and a `dedicated` connection's stream (a route chooses `dedicated`
/// for the ratio; at level 1 its context takeover would not even catch up with level 6 without).
pub const LEVEL_THOROUGH: u32 = 6;

/// Messages shorter than this are sent plain: deflate's block header and end-of-block code
/// make tiny messages (acknowledgements, pings of the application) grow, not shrink.
pub const MIN_COMPRESS: usize = 32;

/// The `Sec-WebSocket-Extensions` header is not valid syntax.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed Sec-WebSocket-Extensions header: {0}")]
pub struct Malformed(pub &'static str);

/// How the server compresses on one connection (the client side is always without context
/// takeover, inflated by the shard's inflater).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    /// The window the server compresses with (9..=15).
    pub window_bits: u8,
    /// The server keeps its window across messages: the connection has its own compressor
    /// (`dedicated` mode). Otherwise the shard's compressor for `window_bits` serves it.
    pub takeover: bool,
}

/// An accepted offer: what is in force and what the response says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub agreed: Agreed,
    /// Whether the response carries `server_max_window_bits` (with `agreed.window_bits`).
    window_answered: bool,
}

impl Answer {
    /// Appends the header's value, such as
    /// `permessage-deflate; server_no_context_takeover; client_no_context_takeover`.
    pub fn write_value(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"permessage-deflate");
        if !self.agreed.takeover {
            out.extend_from_slice(b"; server_no_context_takeover");
        }
        out.extend_from_slice(b"; client_no_context_takeover");
        if self.window_answered {
            out.extend_from_slice(b"; server_max_window_bits=");
            let w = self.agreed.window_bits;
            if w >= 10 {
                out.push(b'1');
            }
            out.push(b'0' + w % 10);
        }
    }

    /// Appends the whole response header line, CRLF included.
    pub fn write_header(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"Sec-WebSocket-Extensions: ");
        self.write_value(out);
        out.extend_from_slice(b"\r\n");
    }
}

/// A route's compression settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub mode: Compression,
    /// The largest window a `dedicated` connection's compressor uses (9..=15).
    pub window_bits: u8,
}

/// Chooses the answer to a request's `Sec-WebSocket-Extensions` headers (`values`, one per
/// header line, in order): the first `permessage-deflate` offer this route can accept, or `None`
/// (no extension in the response). Unknown extensions are skipped. Every value is checked for
/// syntax, even after an offer was accepted: a malformed header is an error however it ends.
pub fn negotiate<'a>(
    values: impl IntoIterator<Item = &'a [u8]>,
    settings: Settings,
) -> Result<Option<Answer>, Malformed> {
    let mut answer = None;
    for value in values {
        let mut p = Parser { s: value, i: 0 };
        let mut extensions = 0;
        loop {
            p.ows();
            match p.peek() {
                None => break,
                // Empty list elements are allowed (RFC 7230 §7).
                Some(b',') => {
                    p.i += 1;
                    continue;
                }
                Some(_) => {}
            }
            let name = p.token().ok_or(Malformed("expected an extension name"))?;
            extensions += 1;
            let mut offer = Offer::default();
            loop {
                p.ows();
                if !p.eat(b';') {
                    break;
                }
                p.ows();
                let param = p
                    .token()
                    .ok_or(Malformed("expected a parameter name after ';'"))?;
                p.ows();
                let value = if p.eat(b'=') {
                    p.ows();
                    Some(p.value()?)
                } else {
                    None
                };
                offer.param(param, value);
            }
            p.ows();
            if !matches!(p.peek(), None | Some(b',')) {
                return Err(Malformed("expected ',' or ';' after an extension"));
            }
            if answer.is_none() && name.eq_ignore_ascii_case(b"permessage-deflate") {
                answer = offer.accept(settings);
            }
        }
        if extensions == 0 {
            return Err(Malformed("the header names no extension"));
        }
    }
    Ok(answer)
}

/// RFC 7230 `tchar`.
fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        let hit = self.peek() == Some(c);
        self.i += hit as usize;
        hit
    }

    fn ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.i += 1;
        }
    }

    fn token(&mut self) -> Option<&'a [u8]> {
        let start = self.i;
        while self.peek().is_some_and(is_tchar) {
            self.i += 1;
        }
        (self.i > start).then(|| &self.s[start..self.i])
    }

    /// A parameter value: a token, or a quoted string whose unescaped content is a token
    /// (RFC 6455 §9.1).
    fn value(&mut self) -> Result<Value, Malformed> {
        let mut v = Value::default();
        if self.eat(b'"') {
            loop {
                let c = match self.peek() {
                    None => return Err(Malformed("unterminated quoted value")),
                    Some(b'"') => {
                        self.i += 1;
                        break;
                    }
                    Some(b'\\') => {
                        self.i += 1;
                        self.peek().ok_or(Malformed("unterminated quoted value"))?
                    }
                    Some(c) => c,
                };
                self.i += 1;
                if !is_tchar(c) {
                    return Err(Malformed("a quoted value must be a token once unquoted"));
                }
                v.push(c);
            }
            if v.len == 0 {
                return Err(Malformed("empty quoted value"));
            }
        } else {
            let t = self
                .token()
                .ok_or(Malformed("expected a token or a quoted string after '='"))?;
            t.iter().for_each(|&c| v.push(c));
        }
        Ok(v)
    }
}

/// What the parameters need of a value: whether it is a window size.
#[derive(Default)]
struct Value {
    len: usize,
    digits: bool,
    number: u32,
    first: u8,
}

impl Value {
    fn push(&mut self, c: u8) {
        if self.len == 0 {
            self.first = c;
            self.digits = true;
        }
        self.len += 1;
        self.digits &= c.is_ascii_digit();
        self.number = self
            .number
            .saturating_mul(10)
            .saturating_add(c.wrapping_sub(b'0') as u32);
    }

    /// A window size: a decimal 8..=15 without leading zeros (RFC 7692 §7.1.2).
    fn window_bits(&self) -> Option<u8> {
        (self.digits && self.first != b'0' && (8..=15).contains(&self.number))
            .then_some(self.number as u8)
    }
}

/// One `permessage-deflate` offer's parameters.
#[derive(Default)]
struct Offer {
    /// Declined whatever the mode (RFC 7692 §7: unknown or repeated parameter, invalid value).
    invalid: bool,
    seen: u8,
    server_no_context_takeover: bool,
    server_max_window_bits: Option<u8>,
}

impl Offer {
    fn param(&mut self, name: &[u8], value: Option<Value>) {
        let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
        let (bit, valid) = if is("server_no_context_takeover") {
            self.server_no_context_takeover = true;
            (1, value.is_none())
        } else if is("client_no_context_takeover") {
            (2, value.is_none())
        } else if is("server_max_window_bits") {
            self.server_max_window_bits = value.and_then(|v| v.window_bits());
            (4, self.server_max_window_bits.is_some())
        } else if is("client_max_window_bits") {
            // Without a value: the client can limit its window if asked (we never ask).
            (8, value.is_none_or(|v| v.window_bits().is_some()))
        } else {
            (0, false)
        };
        if !valid || self.seen & bit != 0 {
            self.invalid = true;
        }
        self.seen |= bit;
    }

    fn accept(&self, s: Settings) -> Option<Answer> {
        if self.invalid {
            return None;
        }
        let (bound, takeover) = match s.mode {
            Compression::Off => return None,
            Compression::Shared => (MAX_WINDOW_BITS, false),
            Compression::Dedicated => (
                s.window_bits.clamp(MIN_WINDOW_BITS, MAX_WINDOW_BITS),
                !self.server_no_context_takeover,
            ),
        };
        // An offered server_max_window_bits must be answered with it or less (§7.1.2.1);
        // without one the server may still announce its bound, which lets the client size
        // its inflater.
        let window_bits = match self.server_max_window_bits {
            Some(w) if w < MIN_WINDOW_BITS => return None,
            Some(w) => w.min(bound),
            None => bound,
        };
        Some(Answer {
            agreed: Agreed {
                window_bits,
                takeover,
            },
            window_answered: self.server_max_window_bits.is_some() || window_bits < MAX_WINDOW_BITS,
        })
    }
}

/// The compressor failed (a backend error; not caused by the data). The caller sends the
/// message plain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("compression failed")]
pub struct DeflateError;

/// One deflate stream of the server's direction: the shard's shared one for a window size, or a
/// `dedicated` connection's own.
pub struct Deflater {
    inner: Compress,
    takeover: bool,
}

impl Deflater {
    /// A compressor for `agreed` at `level` ([`LEVEL_FAST`] or [`LEVEL_THOROUGH`]).
    pub fn new(agreed: Agreed, level: u32) -> Deflater {
        let bits = agreed.window_bits.clamp(MIN_WINDOW_BITS, MAX_WINDOW_BITS);
        Deflater {
            inner: Compress::new_with_window_bits(Level::new(level.min(9)), false, bits),
            takeover: agreed.takeover,
        }
    }

    /// Appends the compressed payload of message `msg` to `out` (RFC 7692 §7.2.1: a sync
    /// flush, then the trailing `00 00 ff ff` removed). On an error nothing is appended and the
    /// stream starts afresh, which the peer decodes whatever its window holds.
    pub fn compress(&mut self, msg: &[u8], out: &mut Vec<u8>) -> Result<(), DeflateError> {
        let start = out.len();
        let done = self.run(msg, out, start);
        if done.is_err() {
            out.truncate(start);
            self.inner.reset();
        } else if !self.takeover {
            self.inner.reset();
        }
        done
    }

    fn run(&mut self, msg: &[u8], out: &mut Vec<u8>, start: usize) -> Result<(), DeflateError> {
        // Deflate's worst case is a few bytes per 16 KiB stored block more than the input.
        out.reserve(msg.len() + msg.len() / 1024 + 64);
        let mut read = 0;
        loop {
            let (in0, out0) = (self.inner.total_in(), out.len());
            self.inner
                .compress_vec(&msg[read..], out, FlushCompress::Sync)
                .map_err(|_| DeflateError)?;
            read += (self.inner.total_in() - in0) as usize;
            // The flush is complete once the compressor returns with room left.
            if read == msg.len() && out.len() < out.capacity() {
                break;
            }
            if read == msg.len() && out.len() == out0 && out.len() < out.capacity() {
                return Err(DeflateError);
            }
            out.reserve(out.capacity().max(64));
        }
        if !out[start..].ends_with(&TRAILER) {
            return Err(DeflateError);
        }
        out.truncate(out.len() - TRAILER.len());
        Ok(())
    }

    /// Compresses `msg` for sending, counted in `counters`: `true` when `out` received the
    /// compressed payload (send it with RSV1), `false` when nothing was appended and `msg` goes
    /// plain (too short to gain, a failure, or, without context takeover, no smaller compressed).
    /// With context takeover a compressed message is always sent: the compressor's window now
    /// holds it, and the peer's must too.
    pub fn encode(&mut self, msg: &[u8], out: &mut Vec<u8>, counters: &DeflateCounters) -> bool {
        if msg.len() < MIN_COMPRESS {
            return false;
        }
        let start = out.len();
        let began = Instant::now();
        let ok = self.compress(msg, out).is_ok();
        counters
            .ws_deflate_nanos
            .add(began.elapsed().as_nanos().min(u64::MAX as u128) as u64);
        if !ok {
            counters.ws_deflate_failures.inc();
            return false;
        }
        let len = out.len() - start;
        if !self.takeover && len >= msg.len() {
            out.truncate(start);
            counters.ws_deflate_skipped.inc();
            return false;
        }
        counters.ws_deflate_messages.inc();
        counters.ws_deflate_bytes_in.add(msg.len() as u64);
        counters.ws_deflate_bytes_out.add(len as u64);
        true
    }
}

/// Why a compressed message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    /// It inflates to more than `max_message` (close 1009).
    #[error("message larger than max_message once inflated")]
    TooBig,
    /// Not a valid deflate stream (close 1007).
    #[error("invalid compressed data")]
    Invalid,
}

/// The shard's inflater: every client message is an independent stream (the server answers
/// `client_no_context_takeover`), so one serves every connection, reset after each message.
pub struct Inflater {
    inner: Decompress,
}

impl Default for Inflater {
    fn default() -> Self {
        Inflater {
            inner: Decompress::new_with_window_bits(false, MAX_WINDOW_BITS),
        }
    }
}

impl Inflater {
    /// Inflates one whole message (its compressed fragments concatenated) into `out`, which is
    /// cleared first. Stops with [`InflateError::TooBig`] as soon as the output passes `max`
    /// bytes: `out` never grows past `max + 1` bytes (or the capacity it came with).
    pub fn inflate(
        &mut self,
        payload: &[u8],
        max: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), InflateError> {
        out.clear();
        let r = self.run(payload, max, out);
        self.inner.reset(false);
        r
    }

    fn run(&mut self, payload: &[u8], max: usize, out: &mut Vec<u8>) -> Result<(), InflateError> {
        for part in [payload, &TRAILER[..]] {
            let mut read = 0;
            loop {
                if out.len() == out.capacity() {
                    // Grow by doubling, but never past the first byte over the limit.
                    let want = (out.capacity().max(2048) * 2).min(max.saturating_add(1));
                    if want <= out.len() {
                        return Err(InflateError::TooBig);
                    }
                    out.reserve_exact(want - out.len());
                }
                let (in0, out0) = (self.inner.total_in(), out.len());
                let status = self
                    .inner
                    .decompress_vec(&part[read..], out, FlushDecompress::Sync)
                    .map_err(|_| InflateError::Invalid)?;
                read += (self.inner.total_in() - in0) as usize;
                if out.len() > max {
                    return Err(InflateError::TooBig);
                }
                if status == Status::StreamEnd {
                    // A final block (BFINAL, §7.2.3.4) ended the message. What follows it is
                    // ignored: the RFC's own example puts a stored block's first byte there, so
                    // that the appended trailer completes it.
                    return Ok(());
                }
                if read == part.len() && out.len() < out.capacity() {
                    break;
                }
                if self.inner.total_in() == in0 && out.len() == out0 {
                    // Input and room left, yet no progress: the stream cannot continue.
                    return Err(InflateError::Invalid);
                }
            }
        }
        Ok(())
    }
}

crate::stats::counters! {
    /// Compression counters of one shard (written by that shard only).
    DeflateCounters, DeflateSnapshot {
        ws_deflate_messages: Counter, "WebSocket messages sent compressed";
        ws_deflate_bytes_in: Counter, "bytes of the messages sent compressed, before compression";
        ws_deflate_bytes_out: Counter, "bytes of the messages sent compressed, after compression";
        ws_deflate_nanos: Counter, "time spent compressing";
        ws_deflate_skipped: Counter, "messages sent plain because compressing did not make them smaller";
        ws_deflate_failures: Counter, "messages sent plain because the compressor failed";
        ws_inflate_messages: Counter, "compressed WebSocket messages received";
        ws_inflate_bytes_in: Counter, "bytes of the compressed messages received, as received";
        ws_inflate_bytes_out: Counter, "bytes of the compressed messages received, once inflated";
        ws_inflate_nanos: Counter, "time spent inflating";
        ws_inflate_too_big: Counter, "compressed messages refused for inflating past max_message (close 1009)";
        ws_inflate_invalid: Counter, "compressed messages refused as invalid deflate data (close 1007)";
        ws_deflate_dedicated: Gauge, "compressors held for dedicated connections (one each, 245 to 371 KiB by window)";
    }
}

const WINDOW_SIZES: usize = (MAX_WINDOW_BITS - MIN_WINDOW_BITS + 1) as usize;

/// A shard's compressors, all without context takeover: per window size in use, one for a
/// `shared` connection's own messages and one for fan-out (created on first use; nearly every
/// client leaves the window at 15, so a shard usually holds two, about 740 KiB).
#[derive(Default)]
pub struct ShardCompressors {
    direct: [Option<Box<Deflater>>; WINDOW_SIZES],
    fanout: [Option<Box<Deflater>>; WINDOW_SIZES],
}

fn shard_deflater(
    slots: &mut [Option<Box<Deflater>>; WINDOW_SIZES],
    window_bits: u8,
    level: u32,
) -> &mut Deflater {
    let bits = window_bits.clamp(MIN_WINDOW_BITS, MAX_WINDOW_BITS);
    slots[(bits - MIN_WINDOW_BITS) as usize].get_or_insert_with(|| {
        let agreed = Agreed {
            window_bits: bits,
            takeover: false,
        };
        Box::new(Deflater::new(agreed, level))
    })
}

impl ShardCompressors {
    /// The compressor for a `shared` connection's own messages, for a window size.
    pub fn direct(&mut self, window_bits: u8) -> &mut Deflater {
        shard_deflater(&mut self.direct, window_bits, LEVEL_FAST)
    }

    /// The compressor for published messages, for a window size.
    pub fn fanout(&mut self, window_bits: u8) -> &mut Deflater {
        shard_deflater(&mut self.fanout, window_bits, LEVEL_THOROUGH)
    }
}

/// A shard's inflater and the buffer messages are inflated into (it keeps the capacity of the
/// largest message inflated, at most the largest `max_message`; a refused message's buffer is
/// not kept).
#[derive(Default)]
pub struct ShardInflater {
    inflater: Option<Box<Inflater>>,
    inflated: Vec<u8>,
}

impl ShardInflater {
    /// Inflates one received message, counted; the result borrows the shard's buffer until the
    /// next call.
    pub fn inflate(
        &mut self,
        payload: &[u8],
        max: usize,
        counters: &DeflateCounters,
    ) -> Result<&[u8], InflateError> {
        let inflater = self.inflater.get_or_insert_with(Box::default);
        let began = Instant::now();
        let r = inflater.inflate(payload, max, &mut self.inflated);
        counters
            .ws_inflate_nanos
            .add(began.elapsed().as_nanos().min(u64::MAX as u128) as u64);
        match r {
            Ok(()) => {
                counters.ws_inflate_messages.inc();
                counters.ws_inflate_bytes_in.add(payload.len() as u64);
                counters
                    .ws_inflate_bytes_out
                    .add(self.inflated.len() as u64);
                Ok(&self.inflated)
            }
            Err(e) => {
                match e {
                    InflateError::TooBig => counters.ws_inflate_too_big.inc(),
                    InflateError::Invalid => counters.ws_inflate_invalid.inc(),
                }
                self.inflated = Vec::new();
                Err(e)
            }
        }
    }
}

/// What the WebSocket codec needs to accept compressed messages on a connection that
/// negotiated permessage-deflate.
pub struct Inflate<'a> {
    pub shard: &'a mut ShardInflater,
    pub counters: &'a DeflateCounters,
    /// The route's `max_message`: the most a message may inflate to.
    pub max_message: usize,
}

/// Appends data message `payload` as one server frame: compressed with `deflater` (RSV1 set)
/// when one is given and [`Deflater::encode`] says it pays, else plain. `scratch` holds the
/// compressed payload on its way (a buffer the caller keeps, so that no call allocates).
pub fn write_message(
    out: &mut Vec<u8>,
    opcode: u8,
    payload: &[u8],
    deflater: Option<&mut Deflater>,
    scratch: &mut Vec<u8>,
    counters: &DeflateCounters,
) {
    if let Some(d) = deflater {
        scratch.clear();
        if d.encode(payload, scratch, counters) {
            super::ws::write_frame_compressed(out, opcode, scratch);
            return;
        }
    }
    super::ws::write_frame(out, opcode, payload);
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const SHARED: Settings = Settings {
        mode: Compression::Shared,
        window_bits: 12,
    };
    const DEDICATED: Settings = Settings {
        mode: Compression::Dedicated,
        window_bits: 12,
    };
    const DEDICATED_15: Settings = Settings {
        mode: Compression::Dedicated,
        window_bits: 15,
    };
    const OFF: Settings = Settings {
        mode: Compression::Off,
        window_bits: 12,
    };

    /// The response header's value for `offer` (one header line), or `None` if declined.
    fn answer(offer: &str, s: Settings) -> Option<String> {
        answer_lines(&[offer], s)
    }

    fn answer_lines(lines: &[&str], s: Settings) -> Option<String> {
        negotiate(lines.iter().map(|l| l.as_bytes()), s)
            .unwrap_or_else(|e| panic!("{lines:?}: {e}"))
            .map(|a| {
                let mut v = Vec::new();
                a.write_value(&mut v);
                String::from_utf8(v).unwrap()
            })
    }

    fn malformed(offer: &str) -> Malformed {
        match negotiate([offer.as_bytes()], SHARED) {
            Err(e) => e,
            Ok(a) => panic!("{offer:?} accepted as {a:?}"),
        }
    }

    const NCT: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
    const CNCT: &str = "permessage-deflate; client_no_context_takeover";

    #[test]
    fn plain_offer() {
        assert_eq!(answer("permessage-deflate", SHARED).as_deref(), Some(NCT));
        assert_eq!(
            answer("permessage-deflate", DEDICATED).as_deref(),
            Some(&*format!("{CNCT}; server_max_window_bits=12"))
        );
        // A dedicated window of 15 is the default: nothing to announce.
        assert_eq!(
            answer("permessage-deflate", DEDICATED_15).as_deref(),
            Some(CNCT)
        );
        assert_eq!(answer("permessage-deflate", OFF), None);
        let a = negotiate([&b"permessage-deflate"[..]], DEDICATED)
            .unwrap()
            .unwrap();
        assert_eq!(
            a.agreed,
            Agreed {
                window_bits: 12,
                takeover: true
            }
        );
        let mut line = Vec::new();
        a.write_header(&mut line);
        assert_eq!(
            line,
            b"Sec-WebSocket-Extensions: permessage-deflate; client_no_context_takeover; server_max_window_bits=12\r\n"
        );
    }

    /// RFC 7692 §7.1.1.1: a server accepts `server_no_context_takeover` by answering it, and may
    /// answer it unasked (shared mode always does).
    #[test]
    fn server_no_context_takeover() {
        let offer = "permessage-deflate; server_no_context_takeover";
        assert_eq!(answer(offer, SHARED).as_deref(), Some(NCT));
        assert_eq!(
            answer(offer, DEDICATED).as_deref(),
            Some(&*format!("{NCT}; server_max_window_bits=12"))
        );
        let a = negotiate([offer.as_bytes()], DEDICATED).unwrap().unwrap();
        assert!(
            !a.agreed.takeover,
            "the client's request binds dedicated mode too"
        );
        assert_eq!(answer(offer, DEDICATED_15).as_deref(), Some(NCT));
        // It takes no value.
        assert_eq!(
            answer("permessage-deflate; server_no_context_takeover=1", SHARED),
            None
        );
    }

    /// §7.1.1.2: `client_no_context_takeover` is a hint in an offer; the server may answer it in
    /// any case, and always does.
    #[test]
    fn client_no_context_takeover() {
        let offer = "permessage-deflate; client_no_context_takeover";
        assert_eq!(answer(offer, SHARED).as_deref(), Some(NCT));
        assert_eq!(answer(offer, DEDICATED_15).as_deref(), Some(CNCT));
        assert_eq!(
            answer(
                "permessage-deflate; client_no_context_takeover=\"x\"",
                SHARED
            ),
            None,
            "takes no value"
        );
        let both = "permessage-deflate; client_no_context_takeover; server_no_context_takeover";
        assert_eq!(answer(both, SHARED).as_deref(), Some(NCT));
        assert_eq!(answer(both, DEDICATED_15).as_deref(), Some(NCT));
    }

    /// §7.1.2.1: an offered `server_max_window_bits` is answered with the same or a smaller
    /// value; 8 is declined (zlib cannot compress raw deflate with a 256-byte window); a value
    /// outside 8..=15, with leading zeros, or missing makes the offer invalid.
    #[test]
    fn server_max_window_bits() {
        for w in 9..=15 {
            let offer = format!("permessage-deflate; server_max_window_bits={w}");
            assert_eq!(
                answer(&offer, SHARED),
                Some(format!("{NCT}; server_max_window_bits={w}")),
                "{offer}"
            );
            let a = negotiate([offer.as_bytes()], SHARED).unwrap().unwrap();
            assert_eq!(a.agreed.window_bits, w);
            // Dedicated answers the smaller of the offer and its bound (12).
            assert_eq!(
                answer(&offer, DEDICATED),
                Some(format!("{CNCT}; server_max_window_bits={}", w.min(12))),
                "{offer}"
            );
            assert_eq!(
                answer(&offer, DEDICATED_15),
                Some(format!("{CNCT}; server_max_window_bits={w}")),
                "{offer}"
            );
        }
        for bad in ["8", "7", "16", "0", "010", "9.5", "x", "\"\\1\\6\""] {
            let offer = format!("permessage-deflate; server_max_window_bits={bad}");
            assert_eq!(answer(&offer, SHARED), None, "{offer}");
            assert_eq!(answer(&offer, DEDICATED), None, "{offer}");
        }
        assert_eq!(
            answer("permessage-deflate; server_max_window_bits", SHARED),
            None,
            "a value is required"
        );
        // A quoted value is the same value once unquoted.
        assert_eq!(
            answer("permessage-deflate; server_max_window_bits=\"10\"", SHARED),
            Some(format!("{NCT}; server_max_window_bits=10"))
        );
        assert_eq!(
            answer(
                "permessage-deflate; server_max_window_bits=\"1\\0\"",
                SHARED
            ),
            Some(format!("{NCT}; server_max_window_bits=10"))
        );
    }

    /// §7.1.2.2: `client_max_window_bits` with or without a value is accepted and never
    /// answered (the response must not carry it unoffered, and need not carry it offered).
    #[test]
    fn client_max_window_bits() {
        for offer in [
            "permessage-deflate; client_max_window_bits",
            "permessage-deflate; client_max_window_bits=8",
            "permessage-deflate; client_max_window_bits=15",
            "permessage-deflate; client_max_window_bits=\"10\"",
        ] {
            assert_eq!(answer(offer, SHARED).as_deref(), Some(NCT), "{offer}");
            assert_eq!(
                answer(offer, DEDICATED_15).as_deref(),
                Some(CNCT),
                "{offer}"
            );
        }
        for bad in ["7", "16", "09", "ten"] {
            let offer = format!("permessage-deflate; client_max_window_bits={bad}");
            assert_eq!(answer(&offer, SHARED), None, "{offer}");
        }
    }

    /// Every parameter together, and the RFC's §7.1.3 examples of several offers.
    #[test]
    fn combinations_and_several_offers() {
        let all = "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
                   server_max_window_bits=10; client_max_window_bits=10";
        assert_eq!(
            answer(all, SHARED),
            Some(format!("{NCT}; server_max_window_bits=10"))
        );
        assert_eq!(
            answer(all, DEDICATED),
            Some(format!("{NCT}; server_max_window_bits=10"))
        );
        // The first acceptable offer wins.
        let two = "permessage-deflate; client_max_window_bits; server_max_window_bits=10, \
                   permessage-deflate; client_max_window_bits";
        assert_eq!(
            answer(two, SHARED),
            Some(format!("{NCT}; server_max_window_bits=10"))
        );
        // An offer the server cannot take is declined and the next one tried.
        let fallback = "permessage-deflate; server_max_window_bits=8, permessage-deflate";
        assert_eq!(answer(fallback, SHARED).as_deref(), Some(NCT));
        assert_eq!(
            answer("permessage-deflate; server_max_window_bits=8", SHARED),
            None
        );
        // Repeated or unknown parameters make an offer invalid (§7), not the header.
        for invalid in [
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; client_max_window_bits; client_max_window_bits=10",
            "permessage-deflate; server_max_window_bits=10; server_max_window_bits=10",
            "permessage-deflate; mystery",
            "permessage-deflate; mystery=\"quoted\"",
        ] {
            assert_eq!(answer(invalid, SHARED), None, "{invalid}");
            let then = format!("{invalid}, permessage-deflate");
            assert_eq!(answer(&then, SHARED).as_deref(), Some(NCT), "{then}");
        }
    }

    #[test]
    fn other_extensions_are_ignored_and_lines_combine() {
        assert_eq!(answer("x-webkit-deflate-frame", SHARED), None);
        assert_eq!(
            answer(
                "foo; bar=\"b\\az\"; q, x-webkit-deflate-frame, permessage-deflate",
                SHARED
            )
            .as_deref(),
            Some(NCT)
        );
        assert_eq!(
            answer_lines(
                &["foo", "permessage-deflate; server_max_window_bits=11"],
                SHARED
            ),
            Some(format!("{NCT}; server_max_window_bits=11"))
        );
        // Names are matched without regard to case; whitespace around separators is allowed;
        // empty list elements are skipped.
        assert_eq!(
            answer(
                " , Permessage-Deflate ;\tSERVER_MAX_WINDOW_BITS = 10 ,, ",
                SHARED
            ),
            Some(format!("{NCT}; server_max_window_bits=10"))
        );
        assert_eq!(answer_lines(&[], SHARED), None, "no header: no extension");
    }

    #[test]
    fn malformed_headers_are_errors_in_every_mode() {
        for bad in [
            "",
            " , ",
            "; server_no_context_takeover",
            "permessage-deflate;",
            "permessage-deflate; =10",
            "permessage-deflate; server_max_window_bits=",
            "permessage-deflate; server_max_window_bits=\"10",
            "permessage-deflate; a=\"\"",
            "permessage-deflate; a=\"b c\"",
            "permessage-deflate; a=\"b\\",
            "permessage-deflate x",
            "permessage-deflate; a=b c",
            "perm@ssage",
            "permessage-deflate, \"quoted\"",
            "permessage-deflate; a=b=c",
        ] {
            malformed(bad);
            assert!(
                negotiate([bad.as_bytes()], OFF).is_err(),
                "{bad:?} with off"
            );
        }
        // A syntax error after an acceptable offer is still an error.
        malformed("permessage-deflate, bad;");
        assert!(negotiate([&b"permessage-deflate"[..], b""], SHARED).is_err());
        assert_eq!(
            malformed("a b").to_string(),
            "malformed Sec-WebSocket-Extensions header: expected ',' or ';' after an extension"
        );
    }

    // ---- payloads

    fn json(n: usize) -> Vec<u8> {
        let mut s = String::from("[");
        let mut i = 0;
        while s.len() < n {
            s.push_str(&format!(
                "{{\"id\":{i},\"symbol\":\"ACME{}\",\"price\":{}.{:02},\"side\":\"{}\"}},",
                i % 7,
                100 + i * 13 % 50,
                i * 7 % 100,
                if i % 2 == 0 { "buy" } else { "sell" }
            ));
            i += 1;
        }
        s.truncate(n - 1);
        s.push(']');
        s.into_bytes()
    }

    fn noise(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn shared(bits: u8) -> Deflater {
        let agreed = Agreed {
            window_bits: bits,
            takeover: false,
        };
        Deflater::new(agreed, LEVEL_THOROUGH)
    }

    fn dedicated(bits: u8) -> Deflater {
        let agreed = Agreed {
            window_bits: bits,
            takeover: true,
        };
        Deflater::new(agreed, LEVEL_THOROUGH)
    }

    fn compressed(d: &mut Deflater, msg: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        d.compress(msg, &mut out).unwrap();
        out
    }

    fn inflated(payload: &[u8]) -> Result<Vec<u8>, InflateError> {
        let mut out = Vec::new();
        Inflater::default()
            .inflate(payload, 1 << 20, &mut out)
            .map(|()| out)
    }

    #[test]
    fn round_trip_without_context_takeover() {
        let mut d = shared(15);
        let mut inf = Inflater::default();
        let msgs = [
            json(1024),
            json(50),
            noise(1, 3000),
            json(200_000),
            Vec::new(),
        ];
        for m in msgs.iter().chain(msgs.iter()) {
            let c = compressed(&mut d, m);
            assert!(!c.ends_with(&TRAILER), "the trailer is removed");
            let mut out = Vec::new();
            inf.inflate(&c, 1 << 20, &mut out).unwrap();
            assert_eq!(&out, m);
        }
        // Each message is its own stream: the same message compresses to the same bytes.
        assert_eq!(
            compressed(&mut d, &json(1024)),
            compressed(&mut d, &json(1024))
        );
        let c = compressed(&mut d, &json(1024));
        assert!(
            c.len() < 1024 / 2,
            "1 KiB of JSON compresses: {} bytes",
            c.len()
        );
        // An empty message is the single byte 0x00 (RFC 7692 §7.2.3.6).
        assert_eq!(compressed(&mut d, b""), [0x00]);
    }

    /// With context takeover (dedicated) the stream continues: a repeated message costs a few
    /// bytes, and a client inflater that keeps its window (as a client does) decodes each.
    #[test]
    fn context_takeover_continues_the_stream() {
        let mut d = dedicated(12);
        let mut client = Decompress::new_with_window_bits(false, 12);
        let m = json(1024);
        let first = compressed(&mut d, &m);
        let second = compressed(&mut d, &m);
        assert!(
            second.len() < first.len() / 4,
            "{} vs {}",
            second.len(),
            first.len()
        );
        for c in [first, second] {
            let mut input = c;
            input.extend_from_slice(&TRAILER);
            let mut out = Vec::with_capacity(4096);
            client
                .decompress_vec(&input, &mut out, FlushDecompress::Sync)
                .unwrap();
            assert_eq!(out, m);
        }
    }

    /// The window size agreed is the one used: a 9-bit (512-byte) window does not reach
    /// repeats 1000 bytes back, which a 15-bit one does, and does reach repeats 100 bytes back
    /// (zlib keeps 262 bytes of lookahead, so 9 bits reach less than 250 bytes). An inflater
    /// cannot tell: zlib-rs accepts distances past its declared window.
    #[test]
    fn window_bits_bound_the_distance() {
        let repeated = |n: usize| {
            let block = noise(7, n);
            [&block[..], &block[..], &block[..]].concat()
        };
        let far = repeated(1000);
        let c9 = compressed(&mut shared(9), &far);
        let c15 = compressed(&mut shared(15), &far);
        assert!(
            c9.len() > 2900,
            "no match found 1000 bytes back: {}",
            c9.len()
        );
        assert!(
            c15.len() < 1100,
            "matches found 1000 bytes back: {}",
            c15.len()
        );
        let near = repeated(100);
        let c9 = compressed(&mut shared(9), &near);
        assert!(c9.len() < 150, "matches found 100 bytes back: {}", c9.len());
        for (c, m) in [(compressed(&mut shared(9), &far), &far), (c9, &near)] {
            assert_eq!(inflated(&c).as_ref(), Ok(m));
        }
    }

    /// The payloads of RFC 7692 §7.2.3: "Hello" with fixed Huffman codes, in a stored block,
    /// with BFINAL set, in two blocks; the empty message two ways.
    #[test]
    fn rfc_examples_inflate() {
        for (payload, text) in [
            (
                &[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00][..],
                &b"Hello"[..],
            ),
            (
                &[
                    0x00, 0x05, 0x00, 0xfa, 0xff, 0x48, 0x65, 0x6c, 0x6c, 0x6f, 0x00,
                ],
                b"Hello",
            ),
            (&[0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00], b"Hello"),
            (
                &[
                    0xf2, 0x48, 0x05, 0x00, 0x00, 0x00, 0xff, 0xff, 0xca, 0xc9, 0xc9, 0x07, 0x00,
                ],
                b"Hello",
            ),
            (&[0x00], b""),
            (&[0x02, 0x00], b""),
        ] {
            assert_eq!(inflated(payload).as_deref(), Ok(text), "{payload:02x?}");
        }
    }

    #[test]
    fn corrupt_streams_are_invalid() {
        // BTYPE = 11 is reserved.
        assert_eq!(inflated(&[0x07, 0x01, 0x02]), Err(InflateError::Invalid));
        // A stored block whose length check fails.
        assert_eq!(
            inflated(&[0x00, 0x05, 0x00, 0x00, 0x00, b'H']),
            Err(InflateError::Invalid)
        );
        // A client that keeps its context although the answer forbade it: its second message
        // refers to the first, which the reset inflater no longer has.
        let mut takeover = dedicated(15);
        let m = json(1024);
        let _first = compressed(&mut takeover, &m);
        let second = compressed(&mut takeover, &m);
        assert_eq!(inflated(&second), Err(InflateError::Invalid));
        // The inflater is usable again after an error.
        let mut inf = Inflater::default();
        let mut out = Vec::new();
        assert!(inf.inflate(&[0x07, 0x01], 100, &mut out).is_err());
        inf.inflate(&compressed(&mut shared(15), &m), 1 << 20, &mut out)
            .unwrap();
        assert_eq!(out, m);
    }

    #[test]
    fn the_limit_is_exact() {
        let m = json(5000);
        let c = compressed(&mut shared(15), &m);
        let mut inf = Inflater::default();
        let mut out = Vec::new();
        inf.inflate(&c, 5000, &mut out).unwrap();
        assert_eq!(out, m);
        let mut fresh = Vec::new();
        assert_eq!(inf.inflate(&c, 4999, &mut fresh), Err(InflateError::TooBig));
        assert!(
            fresh.capacity() <= 5000,
            "never past max + 1: {}",
            fresh.capacity()
        );
    }

    /// A deflate bomb: `chunks` MiB of zeros, built from the steady-state compressed form of
    /// one MiB repeated (deflate's best ratio is about 1030:1, so a 1 GiB message is 1 MB).
    fn bomb(chunk: usize, chunks: usize) -> Vec<u8> {
        let mut c = Compress::new_with_window_bits(Level::new(9), false, 15);
        let zeros = vec![0u8; chunk];
        let mut parts = Vec::new();
        for _ in 0..3 {
            let mut o = Vec::with_capacity(chunk / 256 + 1024);
            c.compress_vec(&zeros, &mut o, FlushCompress::Sync).unwrap();
            assert_eq!(c.total_in() as usize % chunk, 0);
            parts.push(o);
        }
        assert_eq!(
            parts[1], parts[2],
            "steady state: every further chunk is the same"
        );
        let mut b = parts[0].clone();
        for _ in 1..chunks {
            b.extend_from_slice(&parts[1]);
        }
        b.truncate(b.len() - TRAILER.len());
        b
    }

    #[test]
    fn a_kilobyte_bomb_stops_at_the_limit() {
        let b = bomb(1 << 20, 1);
        assert!(b.len() <= 1100, "1 MiB of zeros is {} bytes", b.len());
        let mut out = Vec::new();
        let mut inf = Inflater::default();
        assert_eq!(
            inf.inflate(&b, 64 << 10, &mut out),
            Err(InflateError::TooBig)
        );
        assert!(out.capacity() <= (64 << 10) + 1, "{}", out.capacity());
        inf.inflate(&b, 1 << 20, &mut out).unwrap();
        assert_eq!(out.len(), 1 << 20);
        assert!(out.iter().all(|&b| b == 0));
    }

    #[test]
    fn a_gigabyte_bomb_stops_at_the_limit_quickly() {
        let b = bomb(16 << 20, 64);
        assert!(b.len() < 1 << 20, "1 GiB compresses to {} bytes", b.len());
        let mut out = Vec::new();
        let began = Instant::now();
        let mut inf = Inflater::default();
        assert_eq!(
            inf.inflate(&b, 1 << 20, &mut out),
            Err(InflateError::TooBig)
        );
        // Inflating all of it would take seconds and a gigabyte; stopping at 1 MiB takes
        // about a millisecond (generous here: the machine is shared and this is a debug build).
        assert!(
            began.elapsed() < Duration::from_secs(2),
            "{:?}",
            began.elapsed()
        );
        assert!(out.capacity() <= (1 << 20) + 1, "{}", out.capacity());
        assert!(
            inf.inner.total_in() == 0,
            "the inflater is reset for the next message"
        );
    }

    #[test]
    fn encode_sends_plain_when_it_does_not_pay() {
        let counters = DeflateCounters::default();
        let mut out = Vec::new();
        let mut d = shared(15);
        assert!(
            !d.encode(b"{\"ok\":\"subscribe\"}", &mut out, &counters),
            "too short"
        );
        assert!(
            !d.encode(&noise(3, 200), &mut out, &counters),
            "incompressible"
        );
        assert!(out.is_empty());
        let m = json(1024);
        assert!(d.encode(&m, &mut out, &counters));
        let s = counters.snapshot();
        assert_eq!((s.ws_deflate_messages, s.ws_deflate_skipped), (1, 1));
        assert_eq!(s.ws_deflate_bytes_in, 1024);
        assert_eq!(s.ws_deflate_bytes_out, out.len() as u64);
        assert!(s.ws_deflate_nanos > 0);
        // With context takeover a compressed message is sent even if larger: the windows of
        // both ends must hold it.
        let mut t = dedicated(15);
        out.clear();
        assert!(t.encode(&noise(4, 200), &mut out, &counters));
        assert!(out.len() > 200);
    }

    #[test]
    fn shard_contexts() {
        let mut comp = ShardCompressors::default();
        let mut inf = ShardInflater::default();
        let counters = DeflateCounters::default();
        let m = json(1024);
        let mut c = Vec::new();
        assert!(comp.fanout(15).encode(&m, &mut c, &counters));
        let mut c10 = Vec::new();
        assert!(comp.direct(10).encode(&m, &mut c10, &counters));
        assert!(comp.direct(10).encode(&m, &mut Vec::new(), &counters));
        let held = |slots: &[Option<Box<Deflater>>]| slots.iter().filter(|s| s.is_some()).count();
        assert_eq!((held(&comp.direct), held(&comp.fanout)), (1, 1));
        assert_eq!(inf.inflate(&c, 1 << 20, &counters), Ok(&m[..]));
        assert_eq!(inf.inflate(&c10, 1 << 20, &counters), Ok(&m[..]));
        assert_eq!(inf.inflate(&c, 100, &counters), Err(InflateError::TooBig));
        assert_eq!(
            inf.inflate(&[0x07], 100, &counters),
            Err(InflateError::Invalid)
        );
        let s = counters.snapshot();
        assert_eq!(s.ws_deflate_messages, 3);
        assert_eq!(s.ws_inflate_messages, 2);
        assert_eq!(s.ws_inflate_bytes_out, 2048);
        assert_eq!(s.ws_inflate_bytes_in, (c.len() + c10.len()) as u64);
        assert_eq!((s.ws_inflate_too_big, s.ws_inflate_invalid), (1, 1));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 2000, failure_persistence: None, ..Default::default() })]

        /// Any header bytes: an answer, a decline or an error, never a panic; an answer is
        /// always one the RFC allows (window 9..=15).
        #[test]
        fn any_header_is_answered_safely(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..120)) {
            for s in [SHARED, DEDICATED, OFF] {
                if let Ok(Some(a)) = negotiate([&bytes[..]], s) {
                    proptest::prop_assert!((MIN_WINDOW_BITS..=MAX_WINDOW_BITS).contains(&a.agreed.window_bits));
                }
            }
        }

        /// Any payload: inflated within the limit, or refused; never more than `max + 1` bytes.
        #[test]
        fn any_payload_inflates_within_the_limit(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let mut out = Vec::new();
            let r = Inflater::default().inflate(&bytes, 4096, &mut out);
            proptest::prop_assert!(out.len() <= 4097);
            if r.is_ok() {
                proptest::prop_assert!(out.len() <= 4096);
            }
        }
    }

    #[test]
    fn messages_are_framed_compressed_or_plain() {
        let counters = DeflateCounters::default();
        let mut scratch = Vec::new();
        let mut out = Vec::new();
        let m = json(1024);
        let mut d = shared(15);
        write_message(
            &mut out,
            super::super::ws::OP_TEXT,
            &m,
            Some(&mut d),
            &mut scratch,
            &counters,
        );
        assert_eq!(out[0], 0x80 | 0x40 | 0x01, "FIN, RSV1, text");
        let (_, _, range, len) = super::super::ws::decode_server_frame(&out)
            .unwrap()
            .unwrap();
        assert_eq!(len, out.len());
        assert_eq!(inflated(&out[range]).unwrap(), m);
        out.clear();
        write_message(
            &mut out,
            super::super::ws::OP_TEXT,
            b"short",
            Some(&mut d),
            &mut scratch,
            &counters,
        );
        assert_eq!(
            out,
            [0x81, 5, b's', b'h', b'o', b'r', b't'],
            "too short: plain"
        );
        out.clear();
        write_message(
            &mut out,
            super::super::ws::OP_BINARY,
            &m,
            None,
            &mut scratch,
            &counters,
        );
        assert_eq!(out[0], 0x82, "no deflater: plain");
    }
}
