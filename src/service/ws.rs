//! RFC 6455 WebSocket protocol, server side, plus the client-side helpers the load generator and
//! tests use. No I/O: frames are decoded from the engine's input slice (unmasked in place) and
//! encoded into its output buffer.
//!
//! Per-connection state ([`WsConn`]) is 16 bytes and holds a heap buffer only while a fragmented
//! message is being assembled; an unfragmented message is delivered straight from the input.
//!
//! Rules enforced (close code in brackets), each as soon as the bytes that break it arrive: client
//! frames must be masked [1002]; RSV2 and RSV3 are refused, and RSV1 unless permessage-deflate
//! was negotiated, and then on control frames and continuations [1002]; unknown opcodes [1002];
//! control frames must be final and carry ≤ 125 bytes [1002]; continuation without a message in
//! progress, or a new data frame inside one [1002, from the frame header]; a message (all
//! fragments) over the caller's limit [1009, from the frame header, so a frame announcing more
//! than the connection could ever buffer is answered before its payload arrives]; text that is
//! not UTF-8 [1007]: the payload of an incomplete text frame is unmasked and validated in place as
//! it arrives (the engine keeps unconsumed input, so the connection remembers how much of the
//! frame at the start of its input is already unmasked), so a bad byte fails fast even inside a
//! frame that never completes; close payloads of one byte or with an invalid code [1002] or a
//! non-UTF-8 reason [1007]. Non-minimal length encodings are accepted, as most implementations do
//! (the RFC's "MUST" binds the sender; rejecting them protects nothing).
//!
//! With permessage-deflate negotiated ([`WsConn::process_with`]), RSV1 on a data message's first
//! frame marks it compressed: its fragments are assembled compressed, and the whole message is
//! inflated by the shard's inflater at its last fragment; inflating past the message limit is a
//! 1009, a corrupt stream a 1007, and text is validated once inflated.

use base64::Engine as _;
use sha1::{Digest, Sha1};

use super::deflate::{Inflate, InflateError};

const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

pub const CLOSE_NORMAL: u16 = 1000;
pub const CLOSE_GOING_AWAY: u16 = 1001;
pub const CLOSE_PROTOCOL: u16 = 1002;
pub const CLOSE_INVALID_DATA: u16 = 1007;
pub const CLOSE_POLICY: u16 = 1008;
pub const CLOSE_TOO_BIG: u16 = 1009;

/// Whether a `Sec-WebSocket-Key` is base64 of 16 bytes.
pub fn valid_key(key: &[u8]) -> bool {
    base64::engine::general_purpose::STANDARD
        .decode(key)
        .is_ok_and(|k| k.len() == 16)
}

/// `Sec-WebSocket-Accept` for a key.
pub fn accept_key(key: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(key);
    h.update(GUID);
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// A complete data message.
#[derive(Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// Validated UTF-8.
    Text(&'a str),
    Binary(&'a [u8]),
}

/// A fragmented message being assembled.
struct Assembly {
    opcode: u8,
    /// The first frame had RSV1 (permessage-deflate): `data` is compressed, inflated and
    /// validated once the last fragment is in.
    compressed: bool,
    data: Vec<u8>,
    /// Bytes of `data` known to be valid UTF-8 (uncompressed text only); the rest is an
    /// incomplete tail.
    validated: usize,
}

/// Per-connection protocol state.
#[derive(Default)]
pub struct WsConn {
    assembly: Option<Box<Assembly>>,
    /// Payload bytes of the incomplete text frame at the start of the input that are already
    /// unmasked and validated (0 when the input starts with no such frame).
    unmasked: u32,
    /// Of the text validated so far (the assembly, then those `unmasked` bytes), how many trailing
    /// bytes are an incomplete UTF-8 sequence (0 to 3) awaiting the next bytes.
    tail: u8,
    /// We sent a close frame: only a close reply is still expected.
    pub close_sent: bool,
}

impl WsConn {
    /// Appends the state, for a hand-over to another process: a fragmented message being
    /// assembled travels whole, and `unmasked` keeps its meaning because the engine moves the
    /// connection's unconsumed input (already unmasked in place) as it is.
    pub fn export(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.unmasked.to_le_bytes());
        out.push(self.tail);
        out.push(self.close_sent as u8);
        match &self.assembly {
            None => out.push(0),
            Some(a) => {
                out.push(1);
                out.push(a.opcode);
                out.push(a.compressed as u8);
                out.extend_from_slice(&(a.validated as u32).to_le_bytes());
                out.extend_from_slice(&(a.data.len() as u32).to_le_bytes());
                out.extend_from_slice(&a.data);
            }
        }
    }

    /// Reads what [`WsConn::export`] wrote from the front of `input`, advancing it.
    pub fn import(input: &mut &[u8]) -> Result<WsConn, String> {
        fn take<'a>(input: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
            if input.len() < n {
                return Err("a WebSocket state that ends early".into());
            }
            let (head, rest) = input.split_at(n);
            *input = rest;
            Ok(head)
        }
        let u32_of = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
        let unmasked = u32_of(take(input, 4)?);
        let head = take(input, 3)?;
        let (tail, close_sent, has_assembly) = (head[0], head[1] != 0, head[2] != 0);
        let assembly = if has_assembly {
            let h = take(input, 2)?;
            let validated = u32_of(take(input, 4)?) as usize;
            let len = u32_of(take(input, 4)?) as usize;
            let data = take(input, len)?.to_vec();
            if validated > data.len() || tail > 3 {
                return Err("an inconsistent WebSocket state".into());
            }
            Some(Box::new(Assembly {
                opcode: h[0],
                compressed: h[1] != 0,
                data,
                validated,
            }))
        } else {
            None
        };
        Ok(WsConn {
            assembly,
            unmasked,
            tail,
            close_sent,
        })
    }
}

/// What one call did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub consumed: usize,
    /// The connection must close after the output is written: the peer's close (echoed) or a
    /// protocol error (a close frame with this code was appended).
    pub close: Option<u16>,
    /// A pong arrived.
    pub pong: bool,
    /// At least one frame arrived.
    pub frames: usize,
}

/// The frame header bit that marks a compressed message (permessage-deflate, RFC 7692 §6).
pub const RSV1: u8 = 0x40;

/// Appends a server (unmasked) frame.
pub fn write_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    if payload.len() < 126 {
        // The common short frame: a two-byte header of fixed size (no length-dependent copy).
        out.extend_from_slice(&[0x80 | opcode, payload.len() as u8]);
    } else {
        let (h, n) = frame_header(opcode, payload.len());
        out.extend_from_slice(&h[..n]);
    }
    out.extend_from_slice(payload);
}

/// Appends a server frame whose payload is compressed (RSV1 set).
pub fn write_frame_compressed(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    let (mut h, n) = frame_header(opcode, payload.len());
    h[0] |= RSV1;
    out.extend_from_slice(&h[..n]);
    out.extend_from_slice(payload);
}

/// The header of a final, unmasked frame of `len` bytes.
pub fn frame_header(opcode: u8, len: usize) -> ([u8; 10], usize) {
    let mut h = [0u8; 10];
    h[0] = 0x80 | opcode;
    if len < 126 {
        h[1] = len as u8;
        (h, 2)
    } else if len <= 0xffff {
        h[1] = 126;
        h[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        (h, 4)
    } else {
        h[1] = 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        (h, 10)
    }
}

/// Appends a close frame with a status code and reason.
pub fn write_close(out: &mut Vec<u8>, code: u16, reason: &str) {
    let mut p = Vec::with_capacity(2 + reason.len());
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(&reason.as_bytes()[..reason.len().min(123)]);
    write_frame(out, OP_CLOSE, &p);
}

/// Appends a masked (client) frame.
pub fn write_masked(out: &mut Vec<u8>, opcode: u8, fin: bool, payload: &[u8], mask: [u8; 4]) {
    let (mut h, n) = frame_header(opcode, payload.len());
    if !fin {
        h[0] &= 0x7f;
    }
    h[1] |= 0x80;
    out.extend_from_slice(&h[..n]);
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
}

/// A decoded server frame: opcode, fin, payload range within the buffer, total length.
pub type ServerFrame = (u8, bool, std::ops::Range<usize>, usize);

/// Decodes a server frame (client side). `Ok(None)`: incomplete.
pub fn decode_server_frame(buf: &[u8]) -> Result<Option<ServerFrame>, &'static str> {
    if buf.len() < 2 {
        return Ok(None);
    }
    if buf[1] & 0x80 != 0 {
        return Err("server frames must not be masked");
    }
    let (len, hdr) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => (
            u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes")) as usize,
            10,
        ),
        126 | 127 => return Ok(None),
        n => (n as usize, 2),
    };
    if buf.len() < hdr + len {
        return Ok(None);
    }
    Ok(Some((
        buf[0] & 0x0f,
        buf[0] & 0x80 != 0,
        hdr..hdr + len,
        hdr + len,
    )))
}

fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

impl WsConn {
    /// Bytes held for a message being assembled.
    pub fn buffered(&self) -> usize {
        self.assembly.as_ref().map_or(0, |a| a.data.capacity())
    }

    /// Handles every complete frame at the start of `input`, and checks what has arrived of an
    /// incomplete text frame after them. Responses (pongs, close replies, and what `on_message`
    /// appends) go to `out`. `max_message` bounds a message, all fragments together; a caller
    /// whose input buffer is bounded passes the smaller of its message limit and what that buffer
    /// can hold of one frame, so an announced frame that could never be buffered is refused
    /// (1009) from its header.
    pub fn process<F: FnMut(Message<'_>, &mut Vec<u8>) + ?Sized>(
        &mut self,
        input: &mut [u8],
        max_message: usize,
        out: &mut Vec<u8>,
        on_message: &mut F,
    ) -> Progress {
        self.process_with(input, max_message, out, None, on_message)
    }

    /// [`WsConn::process`] on a connection that negotiated permessage-deflate when `inflate` is
    /// given: a data message whose first frame has RSV1 is compressed, and is inflated (up to
    /// `inflate.max_message`: 1009 past it, 1007 if corrupt) before `on_message` sees it.
    /// `max_message` still bounds what arrives on the wire. RSV1 is refused (1002) on a control
    /// frame, on a continuation, and on any frame when `inflate` is `None`.
    pub fn process_with<F: FnMut(Message<'_>, &mut Vec<u8>) + ?Sized>(
        &mut self,
        input: &mut [u8],
        max_message: usize,
        out: &mut Vec<u8>,
        mut inflate: Option<Inflate<'_>>,
        on_message: &mut F,
    ) -> Progress {
        let mut p = Progress::default();
        loop {
            let buf = &mut input[p.consumed..];
            if buf.len() < 2 {
                break;
            }
            let (b0, b1) = (buf[0], buf[1]);
            // The common frame: a final text or binary frame, masked, with a 7-bit length,
            // complete, no message in progress, nothing unmasked ahead, no close sent. Every
            // check below then passes but the size, and what follows reduces to this.
            let len = (b1 & 0x7f) as usize;
            if (b0 == 0x80 | OP_TEXT || b0 == 0x80 | OP_BINARY)
                && b1 & 0x80 != 0
                && len < 126
                && len <= max_message
                && buf.len() >= 6 + len
                && self.assembly.is_none()
                && self.unmasked == 0
                && !self.close_sent
            {
                let mask = [buf[2], buf[3], buf[4], buf[5]];
                let payload = &mut buf[6..6 + len];
                self.tail = 0;
                unmask(payload, mask, 0);
                p.consumed += 6 + len;
                p.frames += 1;
                if let Err((code, why)) = deliver(b0 & 0x0f, payload, out, on_message) {
                    write_close(out, code, why);
                    p.close = Some(code);
                    break;
                }
                continue;
            }
            let fin = b0 & 0x80 != 0;
            let opcode = b0 & 0x0f;
            let control = opcode & 0x08 != 0;
            let len7 = (b1 & 0x7f) as usize;
            let fail = |out: &mut Vec<u8>, p: &mut Progress, code: u16, why: &str| {
                write_close(out, code, why);
                p.close = Some(code);
            };
            let rsv1 = b0 & RSV1 != 0;
            if b0 & 0x30 != 0 || (rsv1 && inflate.is_none()) {
                fail(out, &mut p, CLOSE_PROTOCOL, "reserved bits set");
                break;
            }
            if !matches!(
                opcode,
                OP_CONT | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
            ) {
                fail(out, &mut p, CLOSE_PROTOCOL, "unknown opcode");
                break;
            }
            if b1 & 0x80 == 0 {
                fail(out, &mut p, CLOSE_PROTOCOL, "client frames must be masked");
                break;
            }
            if control && (!fin || len7 > 125) {
                fail(
                    out,
                    &mut p,
                    CLOSE_PROTOCOL,
                    "control frames must be final and at most 125 bytes",
                );
                break;
            }
            if rsv1 && (control || opcode == OP_CONT) {
                fail(
                    out,
                    &mut p,
                    CLOSE_PROTOCOL,
                    "RSV1 is set only on the first frame of a data message",
                );
                break;
            }
            let (len, hdr) = match len7 {
                126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as u64, 8),
                127 if buf.len() >= 10 => {
                    (u64::from_be_bytes(buf[2..10].try_into().expect("8")), 14)
                }
                126 | 127 => break,
                n => (n as u64, 6),
            };
            if len >> 63 != 0 {
                fail(out, &mut p, CLOSE_PROTOCOL, "length with the top bit set");
                break;
            }
            let so_far = self.assembly.as_ref().map_or(0, |a| a.data.len()) as u64;
            if !control && so_far + len > max_message as u64 {
                fail(
                    out,
                    &mut p,
                    CLOSE_TOO_BIG,
                    "message larger than max_message",
                );
                break;
            }
            if !control && !self.close_sent {
                match (opcode, self.assembly.is_some()) {
                    (OP_CONT, false) => {
                        fail(
                            out,
                            &mut p,
                            CLOSE_PROTOCOL,
                            "continuation without a message",
                        );
                        break;
                    }
                    (OP_TEXT | OP_BINARY, true) => {
                        fail(
                            out,
                            &mut p,
                            CLOSE_PROTOCOL,
                            "new message inside a fragmented one",
                        );
                        break;
                    }
                    _ => {}
                }
            }
            let len = len as usize;
            if buf.len() < hdr + len {
                if buf.len() > hdr && !self.close_sent && self.checks_in_place(opcode, rsv1) {
                    let avail = buf.len() - hdr;
                    if let Err(why) = self.check_prefix(buf, hdr, avail) {
                        fail(out, &mut p, CLOSE_INVALID_DATA, why);
                    }
                }
                break;
            }
            let mask = [buf[hdr - 4], buf[hdr - 3], buf[hdr - 2], buf[hdr - 1]];
            let payload = &mut buf[hdr..hdr + len];
            // A prefix may have been unmasked while the frame was incomplete.
            let done = std::mem::take(&mut self.unmasked) as usize;
            self.tail = 0;
            unmask(&mut payload[done..], mask, done);
            p.consumed += hdr + len;
            p.frames += 1;
            if self.close_sent && opcode != OP_CLOSE {
                continue; // after our close only the peer's close matters
            }
            match opcode {
                OP_PING => write_frame(out, OP_PONG, payload),
                OP_PONG => p.pong = true,
                OP_CLOSE => {
                    let code = match payload.len() {
                        0 => None,
                        1 => {
                            fail(out, &mut p, CLOSE_PROTOCOL, "one-byte close payload");
                            break;
                        }
                        _ => Some(u16::from_be_bytes([payload[0], payload[1]])),
                    };
                    if code.is_some_and(|c| !valid_close_code(c)) {
                        fail(out, &mut p, CLOSE_PROTOCOL, "invalid close code");
                        break;
                    }
                    if payload.len() > 2 && std::str::from_utf8(&payload[2..]).is_err() {
                        fail(out, &mut p, CLOSE_INVALID_DATA, "close reason is not UTF-8");
                        break;
                    }
                    if !self.close_sent {
                        match code {
                            Some(c) => write_close(out, c, ""),
                            None => write_frame(out, OP_CLOSE, &[]),
                        }
                        self.close_sent = true;
                    }
                    p.close = Some(code.unwrap_or(CLOSE_NORMAL));
                    break;
                }
                OP_TEXT | OP_BINARY => {
                    if fin {
                        let delivered = match inflate.as_mut().filter(|_| rsv1) {
                            Some(inf) => deliver_compressed(inf, opcode, payload, out, on_message),
                            None => deliver(opcode, payload, out, on_message),
                        };
                        if let Err((code, why)) = delivered {
                            fail(out, &mut p, code, why);
                            break;
                        }
                    } else {
                        let mut a = Box::new(Assembly {
                            opcode,
                            compressed: rsv1,
                            data: Vec::with_capacity(len.max(64)),
                            validated: 0,
                        });
                        a.data.extend_from_slice(payload);
                        if !a.check_utf8(false) {
                            fail(out, &mut p, CLOSE_INVALID_DATA, "text is not UTF-8");
                            break;
                        }
                        self.assembly = Some(a);
                    }
                }
                _ => {
                    // Continuation (one without a message is refused from its header).
                    let Some(a) = self.assembly.as_mut() else {
                        fail(
                            out,
                            &mut p,
                            CLOSE_PROTOCOL,
                            "continuation without a message",
                        );
                        break;
                    };
                    a.data.extend_from_slice(payload);
                    if !a.check_utf8(fin) {
                        fail(out, &mut p, CLOSE_INVALID_DATA, "text is not UTF-8");
                        break;
                    }
                    if fin {
                        let a = self.assembly.take().expect("some");
                        let delivered = match (a.compressed, inflate.as_mut()) {
                            (true, Some(inf)) => {
                                deliver_compressed(inf, a.opcode, &a.data, out, on_message)
                            }
                            (true, None) => Err((CLOSE_PROTOCOL, "reserved bits set")),
                            (false, _) if a.opcode == OP_TEXT => {
                                // check_utf8(true) validated all of it.
                                let s = std::str::from_utf8(&a.data).unwrap_or_default();
                                on_message(Message::Text(s), out);
                                Ok(())
                            }
                            (false, _) => {
                                on_message(Message::Binary(&a.data), out);
                                Ok(())
                            }
                        };
                        if let Err((code, why)) = delivered {
                            fail(out, &mut p, code, why);
                            break;
                        }
                    }
                }
            }
        }
        if p.close.is_some() {
            self.assembly = None;
            self.close_sent = true;
            self.unmasked = 0;
            self.tail = 0;
        }
        p
    }

    /// Whether a data frame with this opcode (and RSV1 bit) carries text that can be validated
    /// as it arrives: uncompressed text, or a continuation of it. Compressed text is validated
    /// once inflated.
    fn checks_in_place(&self, opcode: u8, rsv1: bool) -> bool {
        match opcode {
            OP_TEXT => !rsv1,
            OP_CONT => self
                .assembly
                .as_ref()
                .is_some_and(|a| a.opcode == OP_TEXT && !a.compressed),
            _ => false,
        }
    }

    /// Unmasks the bytes of an incomplete text frame that arrived since the last call (`avail`
    /// of its payload are here, after a header of `hdr` bytes) and validates them as the
    /// continuation of the text before them. Kept out of line: only a frame split across reads
    /// takes this path, and the per-frame loop stays small.
    #[cold]
    #[inline(never)]
    fn check_prefix(
        &mut self,
        frame: &mut [u8],
        hdr: usize,
        avail: usize,
    ) -> Result<(), &'static str> {
        let Ok(avail32) = u32::try_from(avail) else {
            return Ok(()); // beyond 4 GiB in one read: validated when complete
        };
        let mask = [
            frame[hdr - 4],
            frame[hdr - 3],
            frame[hdr - 2],
            frame[hdr - 1],
        ];
        let payload = &mut frame[hdr..hdr + avail];
        let done = self.unmasked as usize;
        unmask(&mut payload[done..], mask, done);
        // What the assembled fragments before this frame left open (a continuation only).
        let carry = self
            .assembly
            .as_ref()
            .map_or(&[][..], |a| &a.data[a.validated..]);
        let tail = if done == 0 {
            carry.len()
        } else {
            self.tail as usize
        };
        let new_tail = if tail <= done {
            // The sequence left open (if any) started inside this frame.
            utf8_continue(&[], &payload[done - tail..])
        } else {
            // It started in the fragments before this frame and is still open.
            utf8_continue(carry, payload)
        }
        .ok_or("text is not UTF-8")?;
        self.unmasked = avail32;
        self.tail = new_tail as u8;
        Ok(())
    }
}

/// XORs `data`, which starts `offset` bytes into a payload, with the payload's mask: sixteen
/// bytes at a time (a multiple of the mask's period, so the phase holds; the fixed-size inner
/// loop becomes one vector XOR), then eight, then the tail.
#[inline]
fn unmask(data: &mut [u8], mask: [u8; 4], offset: usize) {
    // The mask as it applies from `offset`: rotated by the phase (byte k uses mask[(offset+k)%4]).
    let m = u32::from_le_bytes(mask).rotate_right(8 * (offset & 3) as u32);
    let key = u128::from(m) * 0x0000_0001_0000_0001_0000_0001_0000_0001;
    let key = key.to_le_bytes();
    let mut blocks = data.chunks_exact_mut(16);
    for b in &mut blocks {
        for (x, k) in b.iter_mut().zip(key) {
            *x ^= k;
        }
    }
    let mut rest = blocks.into_remainder();
    if rest.len() >= 8 {
        let (w, tail) = rest.split_at_mut(8);
        for (x, k) in w.iter_mut().zip(key) {
            *x ^= k;
        }
        rest = tail;
    }
    for (x, k) in rest.iter_mut().zip(key) {
        *x ^= k;
    }
}

/// Validates `data` as UTF-8 text following `carry`, the incomplete sequence (0 to 3 bytes) that
/// ended the text before it. Returns how many trailing bytes of `carry ++ data` are an
/// incomplete sequence (0 to 3), or `None` if the bytes cannot be UTF-8 whatever follows.
fn utf8_continue(carry: &[u8], data: &[u8]) -> Option<usize> {
    let mut rest = data;
    if !carry.is_empty() {
        let width: usize = match carry[0] {
            0xc2..=0xdf => 2,
            0xe0..=0xef => 3,
            0xf0..=0xf4 => 4,
            _ => return None,
        };
        let take = width.saturating_sub(carry.len()).min(data.len());
        let mut seq = [0u8; 4];
        let n = carry.len() + take;
        if n > 4 {
            return None;
        }
        seq[..carry.len()].copy_from_slice(carry);
        seq[carry.len()..n].copy_from_slice(&data[..take]);
        match std::str::from_utf8(&seq[..n]) {
            Ok(_) => {}
            Err(e) if e.error_len().is_none() && n < width => return Some(n),
            Err(_) => return None,
        }
        rest = &data[take..];
    }
    match std::str::from_utf8(rest) {
        Ok(_) => Some(0),
        Err(e) if e.error_len().is_none() => Some(rest.len() - e.valid_up_to()),
        Err(_) => None,
    }
}

/// A protocol failure: the close code and its reason.
type Failure = (u16, &'static str);

/// Hands a complete message to `on_message`, text validated as UTF-8 first.
#[inline]
fn deliver<F: FnMut(Message<'_>, &mut Vec<u8>) + ?Sized>(
    opcode: u8,
    data: &[u8],
    out: &mut Vec<u8>,
    on_message: &mut F,
) -> Result<(), Failure> {
    if opcode == OP_TEXT {
        let s = std::str::from_utf8(data).map_err(|_| (CLOSE_INVALID_DATA, "text is not UTF-8"))?;
        on_message(Message::Text(s), out);
    } else {
        on_message(Message::Binary(data), out);
    }
    Ok(())
}

/// Inflates a complete compressed message and hands it on.
fn deliver_compressed<F: FnMut(Message<'_>, &mut Vec<u8>) + ?Sized>(
    inf: &mut Inflate<'_>,
    opcode: u8,
    compressed: &[u8],
    out: &mut Vec<u8>,
    on_message: &mut F,
) -> Result<(), Failure> {
    match inf.shard.inflate(compressed, inf.max_message, inf.counters) {
        Ok(data) => deliver(opcode, data, out, on_message),
        Err(InflateError::TooBig) => Err((
            CLOSE_TOO_BIG,
            "message larger than max_message once inflated",
        )),
        Err(InflateError::Invalid) => Err((CLOSE_INVALID_DATA, "invalid compressed data")),
    }
}

impl Assembly {
    /// Validates the new bytes of a text message; an incomplete sequence may end a non-final
    /// fragment but not the message. Compressed data is checked once inflated.
    fn check_utf8(&mut self, last: bool) -> bool {
        if self.opcode != OP_TEXT || self.compressed {
            return true;
        }
        match std::str::from_utf8(&self.data[self.validated..]) {
            Ok(_) => {
                self.validated = self.data.len();
                true
            }
            Err(e) if e.error_len().is_none() && !last => {
                self.validated += e.valid_up_to();
                true
            }
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: [u8; 4] = [1, 2, 3, 4];

    fn masked(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        write_masked(&mut v, opcode, fin, payload, MASK);
        v
    }

    fn run(conn: &mut WsConn, input: &[u8], max: usize) -> (Progress, Vec<u8>, Vec<String>) {
        let mut input = input.to_vec();
        let mut out = Vec::new();
        let mut msgs = Vec::new();
        let p = conn.process(&mut input, max, &mut out, &mut |m, _| match m {
            Message::Text(s) => msgs.push(format!("t:{s}")),
            Message::Binary(b) => msgs.push(format!("b:{}", b.len())),
        });
        (p, out, msgs)
    }

    fn close_code(out: &[u8]) -> u16 {
        let (op, _, range, _) = decode_server_frame(out).unwrap().unwrap();
        assert_eq!(op, OP_CLOSE);
        u16::from_be_bytes([out[range.start], out[range.start + 1]])
    }

    #[test]
    fn accept_key_matches_rfc_example() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert!(valid_key(b"dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(!valid_key(b"short"));
    }

    #[test]
    fn masked_text_is_delivered() {
        let mut c = WsConn::default();
        let (p, out, msgs) = run(&mut c, &masked(OP_TEXT, true, b"hello"), 1 << 20);
        assert_eq!(msgs, vec!["t:hello"]);
        assert!(out.is_empty());
        assert_eq!(p.close, None);
        assert_eq!(p.consumed, 11);
    }

    #[test]
    fn protocol_errors_close_with_1002() {
        let mut unmasked = Vec::new();
        write_frame(&mut unmasked, OP_TEXT, b"x");
        let mut rsv = masked(OP_TEXT, true, b"x");
        rsv[0] |= 0x40;
        let mut opcode = masked(OP_TEXT, true, b"x");
        opcode[0] = 0x80 | 0x3;
        let big_ping = masked(OP_PING, true, &[0; 126]);
        let frag_ping = masked(OP_PING, false, b"x");
        let cont = masked(OP_CONT, true, b"x");
        let close1 = masked(OP_CLOSE, true, &[3]);
        let close1005 = masked(OP_CLOSE, true, &1005u16.to_be_bytes());
        for (name, frame) in [
            ("unmasked", unmasked),
            ("rsv", rsv),
            ("opcode", opcode),
            ("big ping", big_ping),
            ("fragmented ping", frag_ping),
            ("lone continuation", cont),
            ("one-byte close", close1),
            ("close 1005", close1005),
        ] {
            let mut c = WsConn::default();
            let (p, out, msgs) = run(&mut c, &frame, 1 << 20);
            assert_eq!(p.close, Some(CLOSE_PROTOCOL), "{name}");
            assert_eq!(close_code(&out), CLOSE_PROTOCOL, "{name}");
            assert!(msgs.is_empty());
        }
    }

    #[test]
    fn a_message_half_assembled_moves_with_its_state_and_completes_once() {
        // The first fragment and half of the second (text split inside a UTF-8 sequence), then
        // the state moves (as in a hand-over) with the unconsumed input, and the rest arrives.
        let mut c = WsConn::default();
        let first = masked(OP_TEXT, false, "caf\u{e9} ".as_bytes());
        let second = masked(OP_CONT, true, "na\u{ef}ve".as_bytes());
        let mut input = first.clone();
        input.extend_from_slice(&second[..second.len() - 3]);
        let mut out = Vec::new();
        let mut msgs: Vec<String> = Vec::new();
        let p = c.process(&mut input, 1 << 20, &mut out, &mut |m, _| {
            msgs.push(format!("{m:?}"))
        });
        assert!(msgs.is_empty(), "{msgs:?}");
        let mut state = Vec::new();
        c.export(&mut state);
        let mut reader = &state[..];
        let mut moved = WsConn::import(&mut reader).unwrap();
        assert!(reader.is_empty(), "import reads exactly what export wrote");
        let mut rest = input[p.consumed..].to_vec();
        rest.extend_from_slice(&second[second.len() - 3..]);
        let (p2, _, msgs) = run(&mut moved, &rest, 1 << 20);
        assert_eq!(msgs, vec!["t:caf\u{e9} na\u{ef}ve"]);
        assert_eq!(p2.consumed, rest.len());
        assert!(WsConn::import(&mut &state[..state.len() - 1]).is_err());
    }

    #[test]
    fn fragments_with_interleaved_ping_deliver_once() {
        let mut input = masked(OP_TEXT, false, b"hel");
        input.extend(masked(OP_PING, true, b"p"));
        input.extend(masked(OP_CONT, false, b"lo "));
        input.extend(masked(OP_CONT, true, b"world"));
        let mut c = WsConn::default();
        let (p, out, msgs) = run(&mut c, &input, 1 << 20);
        assert_eq!(msgs, vec!["t:hello world"]);
        assert_eq!(decode_server_frame(&out).unwrap().unwrap().0, OP_PONG);
        assert_eq!(p.close, None);
        assert_eq!(c.buffered(), 0, "the assembly buffer is freed");
    }

    #[test]
    fn utf8_split_across_fragments_is_accepted_and_bad_utf8_fails_fast() {
        let s = "a😀b".as_bytes(); // the emoji is 4 bytes
        let mut input = masked(OP_TEXT, false, &s[..3]);
        input.extend(masked(OP_CONT, true, &s[3..]));
        let mut c = WsConn::default();
        assert_eq!(run(&mut c, &input, 1 << 20).2, vec!["t:a😀b"]);

        let mut c = WsConn::default();
        let (p, out, _) = run(&mut c, &masked(OP_TEXT, false, &[0xff, b'a']), 1 << 20);
        assert_eq!(
            p.close,
            Some(CLOSE_INVALID_DATA),
            "fails in the first fragment"
        );
        assert_eq!(close_code(&out), CLOSE_INVALID_DATA);

        let mut input = masked(OP_TEXT, false, b"ok");
        input.extend(masked(OP_CONT, true, &[0xf0, 0x9f]));
        let mut c = WsConn::default();
        assert_eq!(
            run(&mut c, &input, 1 << 20).0.close,
            Some(CLOSE_INVALID_DATA),
            "truncated at the end"
        );

        let mut c = WsConn::default();
        let (p, _, _) = run(
            &mut c,
            &masked(OP_CLOSE, true, &[0x03, 0xe8, 0xff]),
            1 << 20,
        );
        assert_eq!(p.close, Some(CLOSE_INVALID_DATA), "close reason not UTF-8");
    }

    #[test]
    fn too_big_closes_with_1009() {
        let mut c = WsConn::default();
        assert_eq!(
            run(&mut c, &masked(OP_BINARY, true, &[0; 200]), 100)
                .0
                .close,
            Some(CLOSE_TOO_BIG)
        );
        let mut input = masked(OP_BINARY, false, &[0; 60]);
        input.extend(masked(OP_CONT, true, &[0; 60]));
        let mut c = WsConn::default();
        assert_eq!(run(&mut c, &input, 100).0.close, Some(CLOSE_TOO_BIG));
    }

    #[test]
    fn close_is_echoed() {
        let mut c = WsConn::default();
        let (p, out, _) = run(
            &mut c,
            &masked(OP_CLOSE, true, &1000u16.to_be_bytes()),
            1 << 20,
        );
        assert_eq!(p.close, Some(1000));
        assert_eq!(close_code(&out), 1000);
        assert!(c.close_sent);
    }

    #[test]
    fn byte_by_byte_feeding_and_long_lengths() {
        for len in [5usize, 300, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let frame = masked(OP_BINARY, true, &payload);
            let mut c = WsConn::default();
            let mut held: Vec<u8> = Vec::new();
            let mut got = Vec::new();
            let step = if len > 1000 { 997 } else { 1 };
            for chunk in frame.chunks(step) {
                held.extend_from_slice(chunk);
                let mut out = Vec::new();
                let p = c.process(&mut held, 1 << 20, &mut out, &mut |m, _| {
                    if let Message::Binary(b) = m {
                        got.push(b.to_vec())
                    }
                });
                held.drain(..p.consumed);
            }
            assert_eq!(got, vec![payload], "len {len}");
            assert!(held.is_empty());
        }
    }

    /// Feeds `stream` in pieces of `step` bytes, keeping unconsumed input as the engine does.
    fn feed(stream: &[u8], step: usize, max: usize) -> (Vec<String>, Option<u16>, usize) {
        let mut c = WsConn::default();
        let mut held: Vec<u8> = Vec::new();
        let mut msgs = Vec::new();
        for (i, chunk) in stream.chunks(step).enumerate() {
            held.extend_from_slice(chunk);
            let mut out = Vec::new();
            let p = c.process(&mut held, max, &mut out, &mut |m, _| match m {
                Message::Text(s) => msgs.push(s.to_string()),
                Message::Binary(b) => msgs.push(format!("b:{}", b.len())),
            });
            held.drain(..p.consumed);
            if p.close.is_some() {
                return (msgs, p.close, (i + 1) * step);
            }
        }
        (msgs, None, stream.len())
    }

    #[test]
    fn text_fed_in_pieces_is_unmasked_once_and_validated() {
        let text = "aé😀€b".repeat(40);
        let mut one = masked(OP_TEXT, true, text.as_bytes());
        let b = text.as_bytes();
        let mut frags = masked(OP_TEXT, false, &b[..5]);
        frags.extend(masked(OP_PING, true, b"p"));
        frags.extend(masked(OP_CONT, false, &b[5..7]));
        frags.extend(masked(OP_CONT, false, &b[7..150]));
        frags.extend(masked(OP_CONT, true, &b[150..]));
        one.extend(frags);
        for step in [1, 2, 3, 5, 7, 64, 1000] {
            let (msgs, close, _) = feed(&one, step, 1 << 20);
            assert_eq!(close, None, "step {step}");
            assert_eq!(msgs, vec![text.clone(), text.clone()], "step {step}");
        }
    }

    #[test]
    fn bad_utf8_fails_before_the_frame_completes() {
        // A 100 KB text frame whose third byte is invalid: closed after the first piece.
        let mut payload = vec![b'a'; 100_000];
        payload[2] = 0xff;
        let frame = masked(OP_TEXT, true, &payload);
        let (msgs, close, fed) = feed(&frame, 1000, 1 << 20);
        assert_eq!((close, fed), (Some(CLOSE_INVALID_DATA), 1000));
        assert!(msgs.is_empty());
        // A sequence broken across two reads: a lead byte, then an ASCII byte.
        let frame = masked(OP_TEXT, true, &[b'x', 0xe2, b'y', b'z', b'z', b'z']);
        let (_, close, fed) = feed(&frame, 8, 1 << 20);
        assert_eq!((close, fed), (Some(CLOSE_INVALID_DATA), 16));
        // Inside a continuation, completing a sequence the first fragment left open is fine,
        // breaking it is not.
        let mut ok = masked(OP_TEXT, false, &[b'a', 0xf0, 0x9f]);
        ok.extend(masked(OP_CONT, true, &[0x98, 0x80, b'b']));
        assert_eq!(feed(&ok, 1, 1 << 20).0, vec!["a😀b"]);
        let mut bad = masked(OP_TEXT, false, &[b'a', 0xf0, 0x9f]);
        let cont = masked(OP_CONT, true, &[b'b'; 50]);
        bad.extend(&cont);
        let first = bad.len() - cont.len();
        let (_, close, fed) = feed(&bad, 1, 1 << 20);
        assert_eq!(close, Some(CLOSE_INVALID_DATA));
        assert_eq!(fed, first + 7, "on the continuation's first payload byte");
    }

    #[test]
    fn structure_and_size_are_checked_from_the_header() {
        // 2^62 bytes announced: 1009 from the 10 header bytes.
        let mut h = vec![0x82, 0x80 | 127];
        h.extend_from_slice(&(1u64 << 62).to_be_bytes());
        h.extend_from_slice(&MASK);
        let (_, close, fed) = feed(&h, 14, 1 << 20);
        assert_eq!((close, fed), (Some(CLOSE_TOO_BIG), 14));
        // A new message inside a fragmented one: 1002 before its payload.
        let mut input = masked(OP_TEXT, false, b"a");
        let start = input.len();
        input.extend(masked(OP_BINARY, true, &[0; 1000]));
        let mut c = WsConn::default();
        let (p, _, _) = run(&mut c, &input[..start + 8], 1 << 20);
        assert_eq!(p.close, Some(CLOSE_PROTOCOL));
    }

    #[test]
    fn unmask_keeps_the_phase_at_any_offset_and_length() {
        let mask = [0x11, 0x22, 0x44, 0x88];
        for len in 0..40 {
            let plain: Vec<u8> = (0..len as u8).collect();
            let masked: Vec<u8> = plain
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i & 3])
                .collect();
            for split in 0..=len {
                let mut buf = masked.clone();
                let (a, b) = buf.split_at_mut(split);
                unmask(a, mask, 0);
                unmask(b, mask, split);
                assert_eq!(buf, plain, "len {len} split {split}");
            }
        }
    }

    mod compressed {
        use super::*;
        use crate::service::deflate::{
            Agreed, DeflateCounters, Deflater, ShardInflater, LEVEL_THOROUGH,
        };

        fn deflate(data: &[u8]) -> Vec<u8> {
            let agreed = Agreed {
                window_bits: 15,
                takeover: false,
            };
            let mut out = Vec::new();
            Deflater::new(agreed, LEVEL_THOROUGH)
                .compress(data, &mut out)
                .unwrap();
            out
        }

        /// A client frame with RSV1 set.
        fn rsv1(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
            let mut v = masked(opcode, fin, payload);
            v[0] |= RSV1;
            v
        }

        /// Feeds `stream` in pieces of `step` bytes on a connection that negotiated
        /// permessage-deflate, with messages inflated up to `max`.
        fn feed(stream: &[u8], step: usize, max: usize) -> (Vec<String>, Option<u16>, Vec<u8>) {
            let mut c = WsConn::default();
            let mut shard = ShardInflater::default();
            let counters = DeflateCounters::default();
            let mut held: Vec<u8> = Vec::new();
            let mut msgs = Vec::new();
            let mut out = Vec::new();
            for chunk in stream.chunks(step) {
                held.extend_from_slice(chunk);
                let inflate = Inflate {
                    shard: &mut shard,
                    counters: &counters,
                    max_message: max,
                };
                let p =
                    c.process_with(
                        &mut held,
                        1 << 20,
                        &mut out,
                        Some(inflate),
                        &mut |m, _| match m {
                            Message::Text(s) => msgs.push(s.to_string()),
                            Message::Binary(b) => msgs.push(format!("b:{}", b.len())),
                        },
                    );
                held.drain(..p.consumed);
                if p.close.is_some() {
                    return (msgs, p.close, out);
                }
            }
            (msgs, None, out)
        }

        #[test]
        fn compressed_and_plain_messages_are_delivered() {
            let text = "héllo wörld, ".repeat(50);
            let mut input = rsv1(OP_TEXT, true, &deflate(text.as_bytes()));
            input.extend(rsv1(OP_BINARY, true, &deflate(&[7u8; 3000])));
            input.extend(masked(OP_TEXT, true, b"plain is still fine"));
            input.extend(rsv1(OP_TEXT, true, &deflate(b"")));
            for step in [1, 7, 4096] {
                let (msgs, close, _) = feed(&input, step, 1 << 20);
                assert_eq!(close, None, "step {step}");
                assert_eq!(
                    msgs,
                    vec![
                        text.clone(),
                        "b:3000".into(),
                        "plain is still fine".into(),
                        "".into()
                    ],
                    "step {step}"
                );
            }
        }

        #[test]
        fn fragmented_compressed_messages_are_inflated_whole() {
            let text = "a😀b".repeat(300);
            let z = deflate(text.as_bytes());
            let (a, rest) = z.split_at(z.len() / 3);
            let (b, c) = rest.split_at(rest.len() / 2);
            let mut input = rsv1(OP_TEXT, false, a);
            input.extend(masked(OP_PING, true, b"p"));
            input.extend(masked(OP_CONT, false, b));
            input.extend(masked(OP_CONT, true, c));
            for step in [1, 5, 1000] {
                let (msgs, close, out) = feed(&input, step, 1 << 20);
                assert_eq!((msgs, close), (vec![text.clone()], None), "step {step}");
                assert_eq!(decode_server_frame(&out).unwrap().unwrap().0, OP_PONG);
            }
            // A compressed fragment is not UTF-8 and is not checked as such.
            let mut input = rsv1(OP_TEXT, false, &[0xff, 0xfe]);
            input.extend(masked(OP_CONT, false, &[0xff]));
            assert_eq!(feed(&input, 1, 1 << 20).1, None);
        }

        #[test]
        fn rsv1_is_refused_where_it_cannot_be() {
            let z = deflate(b"hello hello hello hello hello hello");
            let mut on_cont = rsv1(OP_TEXT, false, &z[..3]);
            on_cont.extend(rsv1(OP_CONT, true, &z[3..]));
            let mut rsv2 = masked(OP_TEXT, true, b"x");
            rsv2[0] |= 0x20;
            for (name, frame) in [
                ("ping", rsv1(OP_PING, true, b"p")),
                ("close", rsv1(OP_CLOSE, true, &1000u16.to_be_bytes())),
                ("continuation", on_cont),
                ("rsv2", rsv2),
            ] {
                let (msgs, close, out) = feed(&frame, 1 << 16, 1 << 20);
                assert_eq!(close, Some(CLOSE_PROTOCOL), "{name}");
                assert_eq!(close_code(&out), CLOSE_PROTOCOL, "{name}");
                assert!(msgs.is_empty(), "{name}");
            }
            // Without permessage-deflate, RSV1 on a data frame is refused too.
            let mut c = WsConn::default();
            let (p, _, _) = run(&mut c, &rsv1(OP_TEXT, true, &z), 1 << 20);
            assert_eq!(p.close, Some(CLOSE_PROTOCOL));
        }

        #[test]
        fn bad_compressed_input_closes_with_1007_or_1009() {
            // Compressed bytes that inflate to invalid UTF-8 text.
            let (_, close, out) = feed(&rsv1(OP_TEXT, true, &deflate(&[0xff; 100])), 64, 1 << 20);
            assert_eq!(close, Some(CLOSE_INVALID_DATA));
            assert_eq!(close_code(&out), CLOSE_INVALID_DATA);
            // Not a deflate stream.
            let (_, close, _) = feed(&rsv1(OP_BINARY, true, &[0x07, 1, 2, 3]), 64, 1 << 20);
            assert_eq!(close, Some(CLOSE_INVALID_DATA));
            // Small on the wire, larger than the limit once inflated, fragmented or not.
            let z = deflate(&[b'a'; 100_000]);
            assert!(z.len() < 1000);
            let (msgs, close, out) = feed(&rsv1(OP_TEXT, true, &z), 4096, 10_000);
            assert_eq!((msgs.len(), close), (0, Some(CLOSE_TOO_BIG)));
            assert_eq!(close_code(&out), CLOSE_TOO_BIG);
            let mut frags = rsv1(OP_TEXT, false, &z[..10]);
            frags.extend(masked(OP_CONT, true, &z[10..]));
            assert_eq!(feed(&frags, 4096, 10_000).1, Some(CLOSE_TOO_BIG));
            assert_eq!(
                feed(&frags, 4096, 100_000).0.len(),
                1,
                "at the limit it passes"
            );
        }
    }

    #[test]
    fn state_is_small() {
        assert!(
            std::mem::size_of::<WsConn>() <= 16,
            "{}",
            std::mem::size_of::<WsConn>()
        );
    }
}
