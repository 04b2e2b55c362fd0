//! The hand-over's format on the control socket: frames, the messages they carry, and one
//! connection's state ([`Record`]).
//!
//! Owned by whichever thread talks on the socket (the old process's control thread and its
//! shards, each writing whole frames under one lock; the new process's taking thread). Every
//! frame is `u32 length (little-endian, of what follows) | u8 kind | payload`; integers are
//! little-endian, a string or byte string is a `u32` length and its bytes. Descriptors travel
//! with the first byte of the frame that needs them (`SCM_RIGHTS`, see `sys::fdpass`): a
//! [`Message::Listeners`] frame carries the sum of its counts, a [`Message::Batch`] frame one per
//! record, in record order.
//!
//! Versions: the frame header and the first fields of [`Message::Hello`] (magic, the lowest and
//! highest version the new process understands) and of [`Message::Welcome`] (the version chosen)
//! never change; everything after them is the chosen version's. A build understands
//! [`VERSIONS`]; the old process picks the highest version both understand or refuses, and the
//! new process refuses a `Welcome` for a version it does not understand, in both cases before
//! anything moves. Version 1 is the only one so far.
//!
//! A [`Record`] is the engine's part of a connection (listener, flags, the age of its last
//! progress, its service timer, unconsumed input, unsent output) and the service's opaque blob.
//! Times are milliseconds, not ticks, so the two processes need not share a tick length.

use std::collections::VecDeque;
use std::io;
use std::ops::RangeInclusive;
use std::os::fd::{AsFd, OwnedFd};

use crate::sys::fdpass;

/// Starts every `Hello`: a connection that does not is not a shardnet hand-over.
pub const MAGIC: [u8; 8] = *b"SHNETHO\0";
/// The versions of this format this build reads and writes.
pub const VERSIONS: RangeInclusive<u16> = 1..=1;
/// The largest frame accepted (a batch of connections with full buffers stays far below).
pub const MAX_FRAME: usize = 256 << 20;

/// [`Record::flags`]: the connection has received at least one byte.
pub const FLAG_SPOKE: u16 = 1 << 0;
/// [`Record::flags`]: the service stopped before consuming its input and asked to be offered
/// it again once its output drains.
pub const FLAG_RESUME: u16 = 1 << 1;

const HELLO: u8 = 1;
const WELCOME: u8 = 2;
const REFUSE: u8 = 3;
const WANT_LISTENERS: u8 = 4;
const LISTENERS: u8 = 5;
const ACCEPTING: u8 = 6;
const BATCH: u8 = 7;
const END: u8 = 8;
const COMMIT: u8 = 9;
const ABORT: u8 = 10;
const UPGRADE: u8 = 11;
const OUTCOME: u8 = 12;
const RELAY: u8 = 13;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("control socket: {0}")]
    Io(#[from] io::Error),
    #[error("the peer closed the control socket")]
    Closed,
    #[error("a {0} frame ends early")]
    Truncated(&'static str),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("a frame of {0} bytes is over the {MAX_FRAME}-byte bound")]
    TooLarge(usize),
    #[error("not a shardnet hand-over (bad magic)")]
    BadMagic,
    #[error("a string in a {0} frame is not UTF-8")]
    Utf8(&'static str),
    #[error("a {kind} frame needs {need} descriptors but {have} arrived")]
    Descriptors {
        kind: &'static str,
        need: usize,
        have: usize,
    },
}

/// A listener the old process offers: its name, bound address and sockets (one, or one per
/// shard under `balance = "reuseport"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offered {
    pub name: String,
    pub addr: String,
    pub sockets: u16,
    /// The sockets were opened with SO_REUSEPORT (more can be bound on the same port).
    pub reuse_port: bool,
}

/// One connection as it moves: the engine's part and the service's blob.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    /// Index of its listener in the old process's list (the taking side maps it to its own).
    pub listener: u16,
    /// [`FLAG_SPOKE`], [`FLAG_RESUME`].
    pub flags: u16,
    /// Milliseconds since its last progress (input while nothing was queued, or output
    /// written): the idle and write deadlines count from there.
    pub idle_ms: u32,
    /// Milliseconds left on the service's timer, if it is set.
    pub timer_ms: Option<u32>,
    /// Input the service has not consumed yet.
    pub input: Vec<u8>,
    /// Output the socket has not taken yet.
    pub output: Vec<u8>,
    /// The service's state, from `Service::export`.
    pub blob: Vec<u8>,
}

/// A frame's content. Descriptors are not part of it: they come with [`FrameReader::next`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// New process → old: who it is and what it understands.
    Hello {
        min: u16,
        max: u16,
        pid: u32,
        /// The service's state format (`Service::HANDOVER_FORMAT`): blobs move only between
        /// services that agree on it.
        format: String,
    },
    /// Old → new: the version chosen and what there is to take.
    Welcome {
        version: u16,
        pid: u32,
        shards: u32,
        /// Connections open when the hand-over began (an estimate: it moves).
        connections: u64,
        listeners: Vec<Offered>,
    },
    /// Old → new (or → an upgrade client): no hand-over, and why.
    Refuse { reason: String },
    /// New → old: the offered listeners (by index) it takes.
    WantListeners { indices: Vec<u16> },
    /// Old → new: the sockets of each wanted listener, counts in the order asked; descriptors
    /// attached.
    Listeners { counts: Vec<u16> },
    /// New → old: it accepts on the listeners now; the old process stops accepting.
    Accepting,
    /// Old → new: connections of one shard; one descriptor per record attached.
    Batch { shard: u16, records: Vec<Record> },
    /// Old → new: every exportable connection has been sent (`sent` in all); `kept` stay with
    /// the old process, which closes them gracefully after the commit.
    End { sent: u64, kept: u64 },
    /// New → old: it owns every sent connection from the moment this frame is in the old
    /// process's socket buffer.
    Commit { taken: u64 },
    /// Either side: the hand-over is off.
    Abort { reason: String },
    /// `shardnet upgrade` → old: start a new process (with this configuration file; empty: the
    /// running one's) and hand over to it.
    Upgrade { config: String },
    /// Old → `shardnet upgrade`: how it ended.
    Outcome { ok: bool, message: String },
    /// Either side: the product's data for the other process ([`HandoverHooks`]): the old
    /// process's before `End`, the new process's before its `Abort`.
    ///
    /// [`HandoverHooks`]: super::HandoverHooks
    Relay { data: Vec<u8> },
}

impl Message {
    fn kind_name(kind: u8) -> &'static str {
        match kind {
            HELLO => "hello",
            WELCOME => "welcome",
            REFUSE => "refuse",
            WANT_LISTENERS => "want-listeners",
            LISTENERS => "listeners",
            ACCEPTING => "accepting",
            BATCH => "batch",
            END => "end",
            COMMIT => "commit",
            ABORT => "abort",
            UPGRADE => "upgrade",
            OUTCOME => "outcome",
            RELAY => "relay",
            _ => "unknown",
        }
    }

    /// What the message is, for log lines.
    pub fn name(&self) -> &'static str {
        Message::kind_name(self.kind())
    }

    fn kind(&self) -> u8 {
        match self {
            Message::Hello { .. } => HELLO,
            Message::Welcome { .. } => WELCOME,
            Message::Refuse { .. } => REFUSE,
            Message::WantListeners { .. } => WANT_LISTENERS,
            Message::Listeners { .. } => LISTENERS,
            Message::Accepting => ACCEPTING,
            Message::Batch { .. } => BATCH,
            Message::End { .. } => END,
            Message::Commit { .. } => COMMIT,
            Message::Abort { .. } => ABORT,
            Message::Upgrade { .. } => UPGRADE,
            Message::Outcome { .. } => OUTCOME,
            Message::Relay { .. } => RELAY,
        }
    }

    /// How many descriptors come with this message.
    pub fn descriptors(&self) -> usize {
        match self {
            Message::Listeners { counts } => counts.iter().map(|&c| c as usize).sum(),
            Message::Batch { records, .. } => records.len(),
            _ => 0,
        }
    }

    /// The whole frame.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::frame(self.kind());
        match self {
            Message::Hello {
                min,
                max,
                pid,
                format,
            } => {
                w.bytes_raw(&MAGIC);
                w.u16(*min);
                w.u16(*max);
                w.u32(*pid);
                w.str(format);
            }
            Message::Welcome {
                version,
                pid,
                shards,
                connections,
                listeners,
            } => {
                w.u16(*version);
                w.u32(*pid);
                w.u32(*shards);
                w.u64(*connections);
                w.u32(listeners.len() as u32);
                for l in listeners {
                    w.str(&l.name);
                    w.str(&l.addr);
                    w.u16(l.sockets);
                    w.u8(l.reuse_port as u8);
                }
            }
            Message::Refuse { reason } | Message::Abort { reason } => w.str(reason),
            Message::WantListeners { indices } => {
                w.u32(indices.len() as u32);
                for &i in indices {
                    w.u16(i);
                }
            }
            Message::Listeners { counts } => {
                w.u32(counts.len() as u32);
                for &c in counts {
                    w.u16(c);
                }
            }
            Message::Accepting => {}
            Message::Batch { shard, records } => {
                w.u16(*shard);
                w.u32(records.len() as u32);
                for r in records {
                    RecordRef::of(r).encode(&mut w.0);
                }
            }
            Message::End { sent, kept } => {
                w.u64(*sent);
                w.u64(*kept);
            }
            Message::Commit { taken } => w.u64(*taken),
            Message::Upgrade { config } => w.str(config),
            Message::Outcome { ok, message } => {
                w.u8(*ok as u8);
                w.str(message);
            }
            Message::Relay { data } => {
                w.u32(data.len() as u32);
                w.bytes_raw(data);
            }
        }
        w.finish()
    }

    /// Decodes one frame's kind and payload (the length already stripped).
    pub fn decode(kind: u8, payload: &[u8]) -> Result<Message, WireError> {
        let what = Message::kind_name(kind);
        let mut r = Reader { buf: payload, what };
        let m = match kind {
            HELLO => {
                if r.take(MAGIC.len())? != MAGIC {
                    return Err(WireError::BadMagic);
                }
                Message::Hello {
                    min: r.u16()?,
                    max: r.u16()?,
                    pid: r.u32()?,
                    format: r.str()?,
                }
            }
            WELCOME => {
                let version = r.u16()?;
                let pid = r.u32()?;
                let shards = r.u32()?;
                let connections = r.u64()?;
                let n = r.count(4)?;
                let mut listeners = Vec::with_capacity(n);
                for _ in 0..n {
                    listeners.push(Offered {
                        name: r.str()?,
                        addr: r.str()?,
                        sockets: r.u16()?,
                        reuse_port: r.u8()? != 0,
                    });
                }
                Message::Welcome {
                    version,
                    pid,
                    shards,
                    connections,
                    listeners,
                }
            }
            REFUSE => Message::Refuse { reason: r.str()? },
            ABORT => Message::Abort { reason: r.str()? },
            WANT_LISTENERS => {
                let n = r.count(2)?;
                let indices = (0..n).map(|_| r.u16()).collect::<Result<_, _>>()?;
                Message::WantListeners { indices }
            }
            LISTENERS => {
                let n = r.count(2)?;
                let counts = (0..n).map(|_| r.u16()).collect::<Result<_, _>>()?;
                Message::Listeners { counts }
            }
            ACCEPTING => Message::Accepting,
            BATCH => {
                let shard = r.u16()?;
                let n = r.count(RecordRef::MIN_LEN)?;
                let mut records = Vec::with_capacity(n);
                for _ in 0..n {
                    records.push(Record::decode(&mut r)?);
                }
                Message::Batch { shard, records }
            }
            END => Message::End {
                sent: r.u64()?,
                kept: r.u64()?,
            },
            COMMIT => Message::Commit { taken: r.u64()? },
            UPGRADE => Message::Upgrade { config: r.str()? },
            OUTCOME => Message::Outcome {
                ok: r.u8()? != 0,
                message: r.str()?,
            },
            RELAY => Message::Relay { data: r.bytes()? },
            other => return Err(WireError::UnknownKind(other)),
        };
        Ok(m)
    }
}

/// A record's parts, borrowed: how a shard encodes a connection without copying its buffers
/// first.
pub struct RecordRef<'a> {
    pub listener: u16,
    pub flags: u16,
    pub idle_ms: u32,
    pub timer_ms: Option<u32>,
    pub input: &'a [u8],
    pub output: &'a [u8],
    pub blob: &'a [u8],
}

impl<'a> RecordRef<'a> {
    /// The encoded size of an idle connection's record.
    const MIN_LEN: usize = 2 + 2 + 4 + 1 + 4 + 4 + 4;

    fn of(r: &'a Record) -> RecordRef<'a> {
        RecordRef {
            listener: r.listener,
            flags: r.flags,
            idle_ms: r.idle_ms,
            timer_ms: r.timer_ms,
            input: &r.input,
            output: &r.output,
            blob: &r.blob,
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.listener.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&self.idle_ms.to_le_bytes());
        match self.timer_ms {
            Some(t) => {
                out.push(1);
                out.extend_from_slice(&t.to_le_bytes());
            }
            None => out.push(0),
        }
        out.extend_from_slice(&(self.input.len() as u32).to_le_bytes());
        out.extend_from_slice(self.input);
        out.extend_from_slice(&(self.output.len() as u32).to_le_bytes());
        out.extend_from_slice(self.output);
        out.extend_from_slice(&(self.blob.len() as u32).to_le_bytes());
        out.extend_from_slice(self.blob);
    }
}

impl Record {
    fn decode(r: &mut Reader<'_>) -> Result<Record, WireError> {
        let listener = r.u16()?;
        let flags = r.u16()?;
        let idle_ms = r.u32()?;
        let timer_ms = match r.u8()? {
            0 => None,
            _ => Some(r.u32()?),
        };
        Ok(Record {
            listener,
            flags,
            idle_ms,
            timer_ms,
            input: r.bytes()?,
            output: r.bytes()?,
            blob: r.bytes()?,
        })
    }
}

/// Builds one batch frame record by record (a shard's export), patching the header at the end.
pub struct BatchWriter {
    buf: Vec<u8>,
    count: u32,
}

impl BatchWriter {
    /// Offset of the record count: length (4), kind (1), shard (2).
    const COUNT_AT: usize = 7;

    pub fn new(shard: u16) -> BatchWriter {
        let mut b = BatchWriter {
            buf: Vec::with_capacity(64 * 1024),
            count: 0,
        };
        b.reset(shard);
        b
    }

    /// Empties the batch for the next one.
    pub fn reset(&mut self, shard: u16) {
        self.buf.clear();
        self.buf.extend_from_slice(&[0; 4]);
        self.buf.push(BATCH);
        self.buf.extend_from_slice(&shard.to_le_bytes());
        self.buf.extend_from_slice(&[0; 4]);
        self.count = 0;
    }

    pub fn push(&mut self, r: &RecordRef<'_>) {
        r.encode(&mut self.buf);
        self.count += 1;
    }

    /// Records in the batch.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes in the frame so far.
    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    /// The finished frame.
    pub fn frame(&mut self) -> &[u8] {
        let len = (self.buf.len() - 4) as u32;
        self.buf[..4].copy_from_slice(&len.to_le_bytes());
        self.buf[Self::COUNT_AT..Self::COUNT_AT + 4].copy_from_slice(&self.count.to_le_bytes());
        &self.buf
    }
}

struct Writer(Vec<u8>);

impl Writer {
    fn frame(kind: u8) -> Writer {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(&[0; 4]);
        v.push(kind);
        Writer(v)
    }
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes_raw(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    fn str(&mut self, s: &str) {
        self.u32(s.len() as u32);
        self.0.extend_from_slice(s.as_bytes());
    }
    fn finish(mut self) -> Vec<u8> {
        let len = (self.0.len() - 4) as u32;
        self.0[..4].copy_from_slice(&len.to_le_bytes());
        self.0
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated(self.what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    /// A count of items of at least `min_len` bytes each, checked against what is left (so a
    /// forged count cannot make the reader reserve gigabytes).
    fn count(&mut self, min_len: usize) -> Result<usize, WireError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_len) > self.buf.len() {
            return Err(WireError::Truncated(self.what));
        }
        Ok(n)
    }
    fn bytes(&mut self) -> Result<Vec<u8>, WireError> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn str(&mut self) -> Result<String, WireError> {
        String::from_utf8(self.bytes()?).map_err(|_| WireError::Utf8(self.what))
    }
}

/// Reads frames (and the descriptors that came with them) from a stream socket.
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    fds: VecDeque<OwnedFd>,
}

impl Default for FrameReader {
    fn default() -> Self {
        FrameReader {
            buf: Vec::with_capacity(64 * 1024),
            start: 0,
            fds: VecDeque::new(),
        }
    }
}

impl FrameReader {
    /// The next message and its descriptors, reading as much as it needs. End of stream before
    /// a whole frame is [`WireError::Closed`]; a read timeout is an `Io` error of kind
    /// `WouldBlock` or `TimedOut`.
    pub fn next(&mut self, sock: &impl AsFd) -> Result<(Message, Vec<OwnedFd>), WireError> {
        loop {
            if let Some(m) = self.parse()? {
                return Ok(m);
            }
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            let len = self.buf.len();
            self.buf.resize(len + 64 * 1024, 0);
            let mut fds = Vec::new();
            let got = fdpass::recv(sock.as_fd(), &mut self.buf[len..], &mut fds);
            self.fds.extend(fds);
            match got {
                Ok(0) => {
                    self.buf.truncate(len);
                    return Err(WireError::Closed);
                }
                Ok(n) => self.buf.truncate(len + n),
                Err(e) => {
                    self.buf.truncate(len);
                    return Err(WireError::Io(e));
                }
            }
        }
    }

    /// A whole frame from what has been read, if there is one.
    fn parse(&mut self) -> Result<Option<(Message, Vec<OwnedFd>)>, WireError> {
        let avail = &self.buf[self.start..];
        if avail.len() < 5 {
            return Ok(None);
        }
        let len = u32::from_le_bytes(avail[..4].try_into().expect("4 bytes")) as usize;
        if len > MAX_FRAME || len == 0 {
            return Err(WireError::TooLarge(len));
        }
        if avail.len() < 4 + len {
            return Ok(None);
        }
        let kind = avail[4];
        let msg = Message::decode(kind, &avail[5..4 + len])?;
        self.start += 4 + len;
        let need = msg.descriptors();
        if self.fds.len() < need {
            return Err(WireError::Descriptors {
                kind: msg.name(),
                need,
                have: self.fds.len(),
            });
        }
        let fds = self.fds.drain(..need).collect();
        Ok(Some((msg, fds)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn roundtrip(m: Message) {
        let frame = m.encode();
        let len = u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize;
        assert_eq!(len, frame.len() - 4);
        assert_eq!(Message::decode(frame[4], &frame[5..]).unwrap(), m);
    }

    fn record(i: u8) -> Record {
        Record {
            listener: i as u16,
            flags: FLAG_SPOKE,
            idle_ms: 1234 * i as u32,
            timer_ms: i.is_multiple_of(2).then_some(500),
            input: vec![i; i as usize],
            output: vec![i + 1; 3 * i as usize],
            blob: b"state".to_vec(),
        }
    }

    #[test]
    fn every_message_reads_back_as_written() {
        roundtrip(Message::Hello {
            min: 1,
            max: 3,
            pid: 42,
            format: "echo".into(),
        });
        roundtrip(Message::Welcome {
            version: 1,
            pid: 7,
            shards: 2,
            connections: 1_000_000,
            listeners: vec![Offered {
                name: "echo".into(),
                addr: "127.0.0.1:7000".into(),
                sockets: 2,
                reuse_port: true,
            }],
        });
        roundtrip(Message::Refuse {
            reason: "no".into(),
        });
        roundtrip(Message::WantListeners {
            indices: vec![0, 2],
        });
        roundtrip(Message::Listeners { counts: vec![1, 3] });
        roundtrip(Message::Accepting);
        roundtrip(Message::Batch {
            shard: 1,
            records: (0..5).map(record).collect(),
        });
        roundtrip(Message::End { sent: 9, kept: 1 });
        roundtrip(Message::Commit { taken: 9 });
        roundtrip(Message::Abort {
            reason: "gone".into(),
        });
        roundtrip(Message::Upgrade {
            config: "/etc/shardnet.toml".into(),
        });
        roundtrip(Message::Outcome {
            ok: true,
            message: "done".into(),
        });
        roundtrip(Message::Relay {
            data: b"held publishes".to_vec(),
        });
    }

    #[test]
    fn a_batch_built_in_place_equals_the_encoded_message() {
        let records: Vec<Record> = (1..4).map(record).collect();
        let mut b = BatchWriter::new(3);
        for r in &records {
            b.push(&RecordRef {
                listener: r.listener,
                flags: r.flags,
                idle_ms: r.idle_ms,
                timer_ms: r.timer_ms,
                input: &r.input,
                output: &r.output,
                blob: &r.blob,
            });
        }
        assert_eq!(b.len(), 3);
        let expected = Message::Batch { shard: 3, records }.encode();
        assert_eq!(b.frame(), &expected[..]);
        b.reset(0);
        assert!(b.is_empty());
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        assert!(matches!(
            Message::decode(HELLO, b"NOTSHARD\x01\x00\x01\x00"),
            Err(WireError::BadMagic)
        ));
        assert!(matches!(
            Message::decode(99, b""),
            Err(WireError::UnknownKind(99))
        ));
        let frame = Message::Batch {
            shard: 0,
            records: vec![record(3)],
        }
        .encode();
        for cut in 5..frame.len() {
            assert!(Message::decode(BATCH, &frame[5..cut]).is_err(), "cut {cut}");
        }
        // A count far beyond what the frame holds is refused before anything is reserved.
        let mut forged = vec![0, 0];
        forged.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Message::decode(BATCH, &forged),
            Err(WireError::Truncated(_))
        ));
    }

    #[test]
    fn frames_and_their_descriptors_come_back_together() {
        let (a, b) = UnixStream::pair().unwrap();
        let (x, _x) = UnixStream::pair().unwrap();
        let (y, _y) = UnixStream::pair().unwrap();
        let batch = Message::Batch {
            shard: 0,
            records: vec![record(1), record(2)],
        };
        fdpass::send_all(a.as_fd(), &Message::Accepting.encode(), &[]).unwrap();
        fdpass::send_all(a.as_fd(), &batch.encode(), &[x.as_fd(), y.as_fd()]).unwrap();
        fdpass::send_all(a.as_fd(), &Message::End { sent: 2, kept: 0 }.encode(), &[]).unwrap();
        drop(a);
        let mut r = FrameReader::default();
        assert_eq!(r.next(&b).unwrap().0, Message::Accepting);
        let (m, fds) = r.next(&b).unwrap();
        assert_eq!(m, batch);
        assert_eq!(fds.len(), 2);
        assert_eq!(r.next(&b).unwrap().0, Message::End { sent: 2, kept: 0 });
        assert!(matches!(r.next(&b), Err(WireError::Closed)));
    }

    #[test]
    fn a_frame_without_its_descriptors_is_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let frame = Message::Listeners { counts: vec![2] }.encode();
        fdpass::send_all(a.as_fd(), &frame, &[]).unwrap();
        let mut r = FrameReader::default();
        assert!(matches!(
            r.next(&b),
            Err(WireError::Descriptors {
                need: 2,
                have: 0,
                ..
            })
        ));
    }
}
