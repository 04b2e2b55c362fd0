//! The kv example's service: a key-value store speaking RESP (`PING`, `GET`, `SET`, `DEL`,
//! `INCR`, `MGET`), pipelined, with the keyspace partitioned across the shards by key hash.
//!
//! Shared nothing: each shard owns the keys that hash to it, in a map only its thread touches.
//! A command for a key another shard owns goes to that shard as a message ([`Msg::Requests`],
//! over [`Peers::send`]: its bounded data channel and an eventfd wake), runs there, and its
//! reply comes back the same way ([`Msg::Replies`]). No lock, no shared map. What one read of a
//! connection asks of one shard travels as one message, and its replies as one, so a pipelined
//! client costs a message each way per shard and read, not one per command.
//!
//! Order: a connection's replies go out in the order of its requests, whatever shard answers.
//! Each request gets the connection's next sequence number; while nothing is outstanding a
//! reply is written straight away (the common case on one shard, and with no copy), otherwise
//! it takes a slot in the connection's queue ([`KvConn`]): a finished reply, one waiting for
//! another shard, or a `DEL` summing counts from several. Replies arriving from other shards
//! fill their slots, and the finished front of the queue is written.
//!
//! Bounds: a connection holds at most [`MAX_PENDING`] replies in its queue, and a shard at most
//! `Peers::capacity() / (2 × shards)` messages out on other shards, so the replies coming back
//! (plus the requests other shards send) always fit in its data channel and no reply is ever
//! lost. At either bound the connection stops reading (`Conn::pause_reading`) until replies
//! come back; TCP then holds the client. Keys and values are bounded in size, a command names
//! fewer than [`MAX_PENDING`] keys (so one reply is bounded too), and each shard bounds the
//! bytes it holds (`-OOM` past it). Malformed RESP is answered `-ERR Protocol error` and the
//! connection closed, as Redis does.

#[path = "resp.rs"]
pub mod resp;

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use shardnet::server::{Conn, Ctx, Peers, Service, ShardInfo, Token};
use shardnet::stats::{CounterHandle, GaugeHandle};

use resp::Parsed;

/// Replies a connection may have queued behind one still being answered by another shard.
pub const MAX_PENDING: usize = 1024;
/// Bytes each key costs besides its own and its value's (the map's entry, the allocations).
const ENTRY_OVERHEAD: usize = 64;

/// Size bounds of the store.
#[derive(Debug, Clone, Copy)]
pub struct KvLimits {
    /// Largest value (and key) accepted, in bytes.
    pub max_value: usize,
    /// Bytes all shards together hold (keys, values and overhead); each shard holds its share.
    pub max_memory: usize,
}

impl Default for KvLimits {
    fn default() -> Self {
        KvLimits {
            max_value: 64 * 1024,
            max_memory: 256 << 20,
        }
    }
}

/// FxHash (the Rust compiler's) with a final mix: the map's hasher. Fx alone leaves the low
/// bits of the hash to the low bits of the key's words, and keys that differ only in their last
/// digits (`key:000000001234`) then all land in one bucket group; the finalizer (splitmix64's)
/// spreads every bit. Keys come from clients, so a production store would want a keyed hash
/// against collision flooding; the example keeps the fast one and says so.
#[derive(Default)]
struct Fx(u64);

impl Hasher for Fx {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(word))
                .wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }

    fn finish(&self) -> u64 {
        let mut x = self.0;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }
}

type Map = HashMap<Box<[u8]>, Vec<u8>, BuildHasherDefault<Fx>>;

/// The shard that owns `key`: FNV-1a, a different function from the map's, so the keys of one
/// shard still spread over its map's buckets.
pub fn owner(key: &[u8], shards: usize) -> usize {
    if shards == 1 {
        return 0;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    (h % shards as u64) as usize
}

/// One shard's part of the keyspace.
struct Store {
    map: Map,
    bytes: usize,
    max_bytes: usize,
}

/// Why a write was refused.
const OOM: &str = "OOM command not allowed when used memory > 'maxmemory'";
const NOT_INTEGER: &str = "ERR value is not an integer or out of range";
const OVERFLOW: &str = "ERR increment or decrement would overflow";
const UNAVAILABLE: &str = "ERR the shard that owns this key is unavailable";

impl Store {
    fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.map.get(key).map(Vec::as_slice)
    }

    fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), &'static str> {
        if let Some(v) = self.map.get_mut(key) {
            let bytes = self.bytes - v.len() + value.len();
            if value.len() > v.len() && bytes > self.max_bytes {
                return Err(OOM);
            }
            v.clear();
            v.extend_from_slice(value);
            self.bytes = bytes;
            return Ok(());
        }
        let cost = key.len() + value.len() + ENTRY_OVERHEAD;
        if self.bytes + cost > self.max_bytes {
            return Err(OOM);
        }
        self.map.insert(key.into(), value.to_vec());
        self.bytes += cost;
        Ok(())
    }

    fn del(&mut self, key: &[u8]) -> bool {
        match self.map.remove(key) {
            Some(v) => {
                self.bytes -= key.len() + v.len() + ENTRY_OVERHEAD;
                true
            }
            None => false,
        }
    }

    fn incr(&mut self, key: &[u8]) -> Result<i64, &'static str> {
        let current = match self.get(key) {
            None => 0,
            Some(v) => std::str::from_utf8(v)
                .ok()
                .filter(|s| !s.starts_with('+'))
                .and_then(|s| s.parse::<i64>().ok())
                .ok_or(NOT_INTEGER)?,
        };
        let next = current.checked_add(1).ok_or(OVERFLOW)?;
        let mut text = Vec::with_capacity(20);
        resp::decimal(&mut text, next);
        self.set(key, &text)?;
        Ok(next)
    }

    /// Runs one operation of a batch another shard sent, appending its answer. Returns whether
    /// the answer is an error.
    fn answer(&mut self, op: &BatchOp, bytes: &[u8], answers: &mut Answers) -> bool {
        let key = &bytes[op.key.0 as usize..op.key.1 as usize];
        let start = answers.bytes.len();
        let out = &mut answers.bytes;
        let mut error = false;
        let mut fail = |out: &mut Vec<u8>, e: &str| {
            error = true;
            resp::error(out, e);
        };
        match op.kind {
            OpKind::Get => resp::bulk(out, self.get(key)),
            OpKind::Set => {
                let value = &bytes[op.value.0 as usize..op.value.1 as usize];
                match self.set(key, value) {
                    Ok(()) => out.extend_from_slice(b"+OK\r\n"),
                    Err(e) => fail(out, e),
                }
            }
            OpKind::Incr => match self.incr(key) {
                Ok(n) => resp::integer(out, n),
                Err(e) => fail(out, e),
            },
            OpKind::Del => {
                let n = i64::from(self.del(key));
                answers.list.push(Answer {
                    seq: op.seq,
                    what: AnswerKind::Count(n),
                });
                return false;
            }
        }
        let end = answers.bytes.len();
        answers.list.push(Answer {
            seq: op.seq,
            what: AnswerKind::Encoded(start as u32, end as u32),
        });
        error
    }
}

/// What an operation on another shard's key does.
#[derive(Clone, Copy)]
enum OpKind {
    Get,
    Set,
    Del,
    Incr,
}

/// One operation of a [`Batch`]: its kind, the reply it fills, and where its key (and value)
/// lie in the batch's bytes.
struct BatchOp {
    seq: u64,
    kind: OpKind,
    key: (u32, u32),
    value: (u32, u32),
}

/// What one read of a connection asks of one shard: the operations, with every key and value
/// in one buffer (a message is a few cache lines to move between cores, not one allocation per
/// key).
#[derive(Default)]
pub struct Batch {
    bytes: Vec<u8>,
    ops: Vec<BatchOp>,
}

impl Batch {
    fn push(&mut self, seq: u64, kind: OpKind, key: &[u8], value: &[u8]) {
        let at = |b: &Vec<u8>| b.len() as u32;
        let k0 = at(&self.bytes);
        self.bytes.extend_from_slice(key);
        let k1 = at(&self.bytes);
        self.bytes.extend_from_slice(value);
        let v1 = at(&self.bytes);
        self.ops.push(BatchOp {
            seq,
            kind,
            key: (k0, k1),
            value: (k1, v1),
        });
    }
}

/// How one operation was answered.
enum AnswerKind {
    /// The reply, encoded, at this range of the answers' bytes.
    Encoded(u32, u32),
    /// Keys deleted (a `DEL` sums them over the shards).
    Count(i64),
}

struct Answer {
    seq: u64,
    what: AnswerKind,
}

/// The owner's answers to one [`Batch`], in its order, encoded in one buffer.
#[derive(Default)]
pub struct Answers {
    bytes: Vec<u8>,
    list: Vec<Answer>,
}

/// Messages between shards.
pub enum Msg {
    /// Run the batch and send the answers to shard `from`, for its connection `token`.
    Requests {
        from: usize,
        token: Token,
        batch: Batch,
    },
    /// The answers to one `Requests`.
    Replies { token: Token, answers: Answers },
}

/// One reply in a connection's queue.
enum Slot {
    Ready(Vec<u8>),
    /// Waiting for another shard.
    Waiting,
    /// A `DEL` over several shards: replies still to come, keys deleted so far.
    Sum {
        left: u32,
        total: i64,
    },
}

/// Per connection: replies queued behind one that another shard is answering.
#[derive(Default)]
pub struct KvConn {
    pending: VecDeque<Slot>,
    /// Sequence number of `pending[0]` (the next reply to write).
    base: u64,
    /// Reading is paused until replies come back.
    held: bool,
    /// Close once the queue is written (a protocol error behind replies still coming).
    close_when_answered: bool,
}

impl KvConn {
    /// Sequence numbers wrap (the queue may also grow at the front, see `on_data`).
    fn next_seq(&self) -> u64 {
        self.base.wrapping_add(self.pending.len() as u64)
    }

    /// Writes the finished front of the queue.
    fn flush(&mut self, out: &mut Vec<u8>) {
        while let Some(Slot::Ready(_)) = self.pending.front() {
            if let Some(Slot::Ready(bytes)) = self.pending.pop_front() {
                out.extend_from_slice(&bytes);
            }
            self.base = self.base.wrapping_add(1);
        }
    }
}

/// The commands the service knows.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cmd {
    Ping,
    Get,
    Set,
    Del,
    Incr,
    Mget,
    Config,
}

impl Cmd {
    fn of(name: &[u8]) -> Option<Cmd> {
        const NAMES: [(&[u8], Cmd); 7] = [
            (b"GET", Cmd::Get),
            (b"SET", Cmd::Set),
            (b"PING", Cmd::Ping),
            (b"DEL", Cmd::Del),
            (b"INCR", Cmd::Incr),
            (b"MGET", Cmd::Mget),
            (b"CONFIG", Cmd::Config),
        ];
        NAMES
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|&(_, c)| c)
    }

    fn name(self) -> &'static str {
        match self {
            Cmd::Ping => "ping",
            Cmd::Get => "get",
            Cmd::Set => "set",
            Cmd::Del => "del",
            Cmd::Incr => "incr",
            Cmd::Mget => "mget",
            Cmd::Config => "config",
        }
    }

    /// Whether `n` arguments (the name included) is a valid count.
    fn arity_ok(self, n: usize) -> bool {
        match self {
            Cmd::Ping => n <= 2,
            Cmd::Get | Cmd::Incr => n == 2,
            Cmd::Set => n >= 3,
            Cmd::Del | Cmd::Mget => n >= 2,
            Cmd::Config => n >= 2,
        }
    }
}

/// The service of one shard.
pub struct Kv {
    shard: usize,
    shards: usize,
    store: Store,
    peers: Peers<Msg>,
    max_value: usize,
    /// Argument ranges of the command being handled (reused: no allocation per command).
    args: Vec<(usize, usize)>,
    /// Messages this shard has out on other shards (each answered by one), and their bound.
    outstanding: usize,
    max_outstanding: usize,
    /// What the connection being read asks of each shard, sent when its read is handled.
    outbox: Vec<Batch>,
    /// Connections paused because `outstanding` reached its bound.
    blocked: Vec<Token>,
    commands: CounterHandle,
    remote: CounterHandle,
    errors: CounterHandle,
    paused: CounterHandle,
    keys: GaugeHandle,
}

/// What to do with the command at the front of the input.
enum Step {
    /// Handled: consume it.
    Done,
    /// Not now (a bound was reached): leave it in the input and pause reading.
    Wait,
}

impl Kv {
    /// Builds shard `info.shard`'s service.
    pub fn new(info: &ShardInfo, peers: Peers<Msg>, limits: KvLimits) -> Kv {
        let counter = |name, help| info.counters.counter(name, help).expect("a valid name");
        let max_outstanding = (peers.capacity() / (2 * info.shards)).max(1);
        Kv {
            shard: info.shard,
            shards: info.shards,
            store: Store {
                map: Map::default(),
                bytes: 0,
                max_bytes: limits.max_memory / info.shards,
            },
            peers,
            max_value: limits.max_value,
            args: Vec::with_capacity(8),
            outstanding: 0,
            max_outstanding,
            outbox: (0..info.shards).map(|_| Batch::default()).collect(),
            blocked: Vec::new(),
            commands: counter(
                "kv_commands",
                "commands handled by the shard the client is on",
            ),
            remote: counter(
                "kv_remote_requests",
                "single-key operations sent to the shard that owns the key",
            ),
            errors: counter("kv_errors", "commands answered with an error"),
            paused: counter(
                "kv_paused",
                "times a connection stopped reading until replies from other shards came back",
            ),
            keys: info
                .counters
                .gauge("kv_keys", "keys this shard owns")
                .expect("a valid name"),
        }
    }

    /// Handles one parsed command (its arguments are `self.args` into `input`).
    fn command(&mut self, conn: &mut Conn<'_, KvConn>, input: &[u8]) -> Step {
        let args = std::mem::take(&mut self.args);
        let step = self.dispatch(conn, input, &args);
        self.args = args;
        step
    }

    fn dispatch(
        &mut self,
        conn: &mut Conn<'_, KvConn>,
        input: &[u8],
        args: &[(usize, usize)],
    ) -> Step {
        let arg = |i: usize| &input[args[i].0..args[i].1];
        let Some(&(name_start, name_end)) = args.first() else {
            return Step::Done; // an empty command: nothing to answer
        };
        let name = &input[name_start..name_end];
        let Some(cmd) = Cmd::of(name) else {
            let mut text = format!(
                "ERR unknown command '{}', with args beginning with: ",
                printable(name)
            );
            for i in 1..args.len().min(4) {
                text.push_str(&format!("'{}' ", printable(arg(i))));
            }
            self.error(conn, &text);
            return Step::Done;
        };
        if !cmd.arity_ok(args.len()) {
            let text = format!("ERR wrong number of arguments for '{}' command", cmd.name());
            self.error(conn, &text);
            return Step::Done;
        }
        // Multi-key commands first check they fit in the bounds as a whole.
        let keys = match cmd {
            Cmd::Del | Cmd::Mget => &args[1..],
            Cmd::Get | Cmd::Set | Cmd::Incr => &args[1..2],
            Cmd::Ping | Cmd::Config => &args[..0],
        };
        let remote = keys
            .iter()
            .filter(|&&(a, b)| owner(&input[a..b], self.shards) != self.shard)
            .count();
        if keys.len() >= MAX_PENDING {
            let text = format!(
                "ERR too many keys in one command (at most {})",
                MAX_PENDING - 1
            );
            self.error(conn, &text);
            return Step::Done;
        }
        let slots = if cmd == Cmd::Mget { keys.len() + 1 } else { 1 };
        let queued = conn.state().pending.len();
        if queued > 0 && queued + slots > MAX_PENDING {
            return Step::Wait;
        }
        // This read's messages (at most one per other shard) must fit under the bound. With
        // nothing out, a read always goes (else more shards than the bound would never start).
        if remote > 0
            && self.outstanding > 0
            && self.outstanding + self.shards > self.max_outstanding
        {
            self.blocked.push(conn.token());
            return Step::Wait;
        }
        self.commands.inc();
        match cmd {
            Cmd::Ping => match args.len() {
                1 => reply(conn, |out| resp::simple(out, "PONG")),
                _ => reply(conn, |out| resp::bulk(out, Some(arg(1)))),
            },
            Cmd::Config => {
                // What redis-benchmark asks before it starts (`save`, `appendonly`); nothing
                // here is configurable at run time.
                let value: Option<&[u8]> = match arg(1) {
                    sub if sub.eq_ignore_ascii_case(b"GET") && args.len() == 3 => {
                        let key = arg(2);
                        if key.eq_ignore_ascii_case(b"save") {
                            Some(b"")
                        } else if key.eq_ignore_ascii_case(b"appendonly") {
                            Some(b"no")
                        } else {
                            None
                        }
                    }
                    _ => {
                        self.error(conn, "ERR only CONFIG GET <parameter> is supported");
                        return Step::Done;
                    }
                };
                reply(conn, |out| match value {
                    Some(v) => {
                        resp::array(out, 2);
                        resp::bulk(out, Some(arg(2)));
                        resp::bulk(out, Some(v));
                    }
                    None => resp::array(out, 0),
                });
            }
            Cmd::Get | Cmd::Incr => {
                let key = arg(1);
                let owner = owner(key, self.shards);
                if owner != self.shard {
                    let kind = match cmd {
                        Cmd::Get => OpKind::Get,
                        _ => OpKind::Incr,
                    };
                    self.send(conn, owner, kind, key, b"");
                } else if cmd == Cmd::Get {
                    let value = self.store.get(key);
                    reply(conn, |out| resp::bulk(out, value));
                } else {
                    let before = self.store.map.len();
                    let result = self.store.incr(key);
                    self.count_keys(before);
                    match result {
                        Ok(n) => reply(conn, |out| resp::integer(out, n)),
                        Err(e) => self.error(conn, e),
                    }
                }
            }
            Cmd::Set => {
                if args.len() > 3 {
                    // SET's options (EX, NX, GET, ...) are not supported.
                    self.error(conn, "ERR syntax error");
                    return Step::Done;
                }
                let (key, value) = (arg(1), arg(2));
                let owner = owner(key, self.shards);
                if owner != self.shard {
                    self.send(conn, owner, OpKind::Set, key, value);
                } else {
                    let before = self.store.map.len();
                    let result = self.store.set(key, value);
                    self.count_keys(before);
                    match result {
                        Ok(()) => reply(conn, |out| out.extend_from_slice(b"+OK\r\n")),
                        Err(e) => self.error(conn, e),
                    }
                }
            }
            Cmd::Del => {
                let mut total = 0;
                let before = self.store.map.len();
                for &(a, b) in keys {
                    let key = &input[a..b];
                    if owner(key, self.shards) == self.shard {
                        total += i64::from(self.store.del(key));
                    }
                }
                self.count_keys(before);
                if remote == 0 {
                    reply(conn, |out| resp::integer(out, total));
                } else {
                    // One slot, filled in by every owner's count.
                    let seq = conn.state().next_seq();
                    conn.state().pending.push_back(Slot::Sum {
                        left: remote as u32,
                        total,
                    });
                    for &(a, b) in keys {
                        let key = &input[a..b];
                        let owner = owner(key, self.shards);
                        if owner != self.shard {
                            self.remote.inc();
                            self.outbox[owner].push(seq, OpKind::Del, key, b"");
                        }
                    }
                }
            }
            Cmd::Mget => {
                reply(conn, |out| resp::array(out, keys.len()));
                for &(a, b) in keys {
                    let key = &input[a..b];
                    let owner = owner(key, self.shards);
                    if owner == self.shard {
                        let value = self.store.get(key);
                        reply(conn, |out| resp::bulk(out, value));
                    } else {
                        self.send(conn, owner, OpKind::Get, key, b"");
                    }
                }
            }
        }
        Step::Done
    }

    /// Queues a slot for the connection's next reply and puts its operation in the outbox for
    /// `owner`.
    fn send(
        &mut self,
        conn: &mut Conn<'_, KvConn>,
        owner: usize,
        kind: OpKind,
        key: &[u8],
        value: &[u8],
    ) {
        let seq = conn.state().next_seq();
        conn.state().pending.push_back(Slot::Waiting);
        self.remote.inc();
        self.outbox[owner].push(seq, kind, key, value);
    }

    /// Sends what this read of the connection asked of other shards: one message per shard.
    fn send_outbox(&mut self, conn: &mut Conn<'_, KvConn>) {
        for owner in 0..self.shards {
            if self.outbox[owner].ops.is_empty() {
                continue;
            }
            let batch = std::mem::take(&mut self.outbox[owner]);
            let msg = Msg::Requests {
                from: self.shard,
                token: conn.token(),
                batch,
            };
            match self.peers.try_send(owner, msg) {
                Ok(()) => self.outstanding += 1,
                Err(msg) => {
                    // Only a shard that is gone refuses (the bound keeps its channel from
                    // filling): each reply it owed is an error.
                    log::error!("kv: shard {owner} is gone");
                    self.errors.inc();
                    if let Msg::Requests { batch, .. } = msg {
                        let mut answers = Answers::default();
                        for op in &batch.ops {
                            let start = answers.bytes.len() as u32;
                            match op.kind {
                                // A DEL counts what it can: nothing deleted there.
                                OpKind::Del => answers.list.push(Answer {
                                    seq: op.seq,
                                    what: AnswerKind::Count(0),
                                }),
                                _ => {
                                    resp::error(&mut answers.bytes, UNAVAILABLE);
                                    let end = answers.bytes.len() as u32;
                                    answers.list.push(Answer {
                                        seq: op.seq,
                                        what: AnswerKind::Encoded(start, end),
                                    });
                                }
                            }
                        }
                        fill(conn, &answers);
                    }
                }
            }
        }
    }

    fn error(&mut self, conn: &mut Conn<'_, KvConn>, text: &str) {
        self.errors.inc();
        reply(conn, |out| resp::error(out, text));
    }

    fn count_keys(&self, before: usize) {
        let after = self.store.map.len();
        if after > before {
            self.keys.add((after - before) as u64);
        } else {
            self.keys.sub((before - after) as u64);
        }
    }
}

/// Answers from another shard: each into its slot (or, for the front slot, straight to the
/// output), then the finished front of the queue out: one write for them all.
fn fill(conn: &mut Conn<'_, KvConn>, answers: &Answers) {
    let mut out = std::mem::take(conn.out());
    let st = conn.state();
    for answer in &answers.list {
        let i = answer.seq.wrapping_sub(st.base) as usize;
        if i >= st.pending.len() {
            continue;
        }
        match (&mut st.pending[i], &answer.what) {
            (Slot::Sum { left, total }, &AnswerKind::Count(n)) => {
                *total += n;
                *left -= 1;
                if *left == 0 {
                    let mut bytes = Vec::new();
                    resp::integer(&mut bytes, *total);
                    st.pending[i] = Slot::Ready(bytes);
                }
            }
            (Slot::Waiting, &AnswerKind::Encoded(a, b)) => {
                let reply = &answers.bytes[a as usize..b as usize];
                if i == 0 {
                    // Answers mostly come back in order: the front one needs no buffer of its
                    // own.
                    out.extend_from_slice(reply);
                    st.pending.pop_front();
                    st.base = st.base.wrapping_add(1);
                    st.flush(&mut out);
                } else {
                    st.pending[i] = Slot::Ready(reply.to_vec());
                }
            }
            // A slot answered already, or an answer of the other kind: nothing to fill.
            _ => {}
        }
    }
    st.flush(&mut out);
    *conn.out() = out;
    let st = conn.state();
    if st.held && st.pending.len() < MAX_PENDING / 2 {
        st.held = false;
        conn.resume_reading();
    }
    let st = conn.state();
    if st.pending.is_empty() && (st.close_when_answered || conn.draining()) {
        conn.close();
    }
}

/// Writes a reply now if nothing is queued before it, else queues it in its slot.
fn reply(conn: &mut Conn<'_, KvConn>, encode: impl FnOnce(&mut Vec<u8>)) {
    if conn.state().pending.is_empty() {
        encode(conn.out());
    } else {
        let mut bytes = Vec::new();
        encode(&mut bytes);
        conn.state().pending.push_back(Slot::Ready(bytes));
    }
}

/// A client's bytes for an error message: printable ASCII, at most 64 bytes.
fn printable(bytes: &[u8]) -> String {
    bytes
        .iter()
        .take(64)
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '?'
            }
        })
        .collect()
}

impl Service for Kv {
    type State = KvConn;
    type Command = Msg;

    fn on_data(&mut self, conn: &mut Conn<'_, KvConn>, input: &mut [u8]) -> usize {
        let mut used = 0;
        let mut args = std::mem::take(&mut self.args);
        while used < input.len() {
            let rest = &input[used..];
            match resp::parse(rest, &mut args, self.max_value) {
                Parsed::Incomplete => break,
                Parsed::Invalid(why) => {
                    // As Redis: the replies owed first, then the error, then the close.
                    self.errors.inc();
                    let text = format!("ERR Protocol error: {why}");
                    reply(conn, |out| resp::error(out, &text));
                    if conn.state().pending.is_empty() {
                        conn.close();
                    } else {
                        conn.state().close_when_answered = true;
                        conn.pause_reading();
                    }
                    used = input.len();
                    break;
                }
                Parsed::Command { used: n } => {
                    self.args = std::mem::take(&mut args);
                    let step = self.command(conn, rest);
                    args = std::mem::take(&mut self.args);
                    match step {
                        Step::Done => used += n,
                        Step::Wait => {
                            self.paused.inc();
                            conn.state().held = true;
                            conn.pause_reading();
                            break;
                        }
                    }
                }
            }
        }
        self.args = args;
        self.send_outbox(conn);
        // Replies written straight out (before the first that waits for another shard) would
        // go in a write of their own now and the rest in another when the replies come back:
        // they wait in a slot at the front instead, so the whole read is answered in one write.
        if !conn.out().is_empty() && !conn.state().pending.is_empty() {
            let bytes = conn.out().to_vec();
            conn.out().clear();
            let st = conn.state();
            st.pending.push_front(Slot::Ready(bytes));
            st.base = st.base.wrapping_sub(1);
        }
        used
    }

    fn on_command(&mut self, msg: Msg, ctx: &mut Ctx<'_, KvConn>) {
        match msg {
            Msg::Requests { from, token, batch } => {
                let before = self.store.map.len();
                let mut answers = Answers {
                    bytes: Vec::with_capacity(batch.bytes.len() + 16 * batch.ops.len()),
                    list: Vec::with_capacity(batch.ops.len()),
                };
                let mut errors = 0;
                for op in &batch.ops {
                    errors += u64::from(self.store.answer(op, &batch.bytes, &mut answers));
                }
                self.count_keys(before);
                // Counted where they are decided, like every other error.
                self.errors.add(errors);
                // Cannot fail while `from` runs: its messages out are bounded so that every
                // answer fits in its channel.
                if !self.peers.send(from, Msg::Replies { token, answers }) {
                    log::error!("kv: shard {from} is gone; its answers are lost");
                }
            }
            Msg::Replies { token, answers } => {
                self.outstanding -= 1;
                // None: the connection closed meanwhile; its answers go nowhere.
                let _ = ctx.with_conn(token, |conn| fill(conn, &answers));
            }
        }
    }

    fn on_commands_done(&mut self, ctx: &mut Ctx<'_, KvConn>) {
        // Connections paused at the shard's bound read on once half of it is free again.
        if self.outstanding <= self.max_outstanding / 2 && !self.blocked.is_empty() {
            for token in std::mem::take(&mut self.blocked) {
                let _ = ctx.with_conn(token, |conn| {
                    if conn.state().held {
                        conn.state().held = false;
                        conn.resume_reading();
                    }
                });
            }
        }
    }

    fn on_drain(&mut self, conn: &mut Conn<'_, KvConn>) {
        // Replies still coming from other shards: close once they are written (`fill`).
        if conn.state().pending.is_empty() {
            conn.close();
        }
    }
}
