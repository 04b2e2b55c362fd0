//! The chat example's service: line-based rooms whose members are spread over every shard.
//!
//! Each shard knows only its own members (room name → its connections in that room). A message
//! is shared once (`Arc`) and sent to every shard with [`Peers::broadcast`] (each shard's
//! bounded data channel and an eventfd wake); each shard writes it to its own members of the
//! room. Nothing is locked and no shard touches another's connections.
//!
//! Protocol, one line each way (at most [`MAX_LINE`] bytes):
//! - on connecting: `hello guestN: shard S of T, room lobby`;
//! - `/nick NAME` → `ok nick NAME`; `/join ROOM` → `ok join ROOM` (leaving the room it was in);
//!   `/quit` → `bye`, then the server closes;
//! - any other line is a message: every other member of the room gets `NAME: line`.
//!
//! Bounds: a line longer than [`MAX_LINE`] is answered with an error and the connection
//! closed; a member whose output is over `max_write_buffer` (not reading) misses messages,
//! counted in `chat_dropped`, rather than growing a queue; a message a shard's full queue
//! refused is counted in `chat_lost`.

use std::collections::HashMap;
use std::sync::Arc;

use shardnet::server::{CloseReason, Conn, Ctx, Peers, Service, ShardInfo, Token};
use shardnet::stats::CounterHandle;

/// Longest line, newline excluded.
pub const MAX_LINE: usize = 1024;
/// Longest nick and room name.
pub const MAX_NAME: usize = 32;

/// A message for one room, sent to every shard.
#[derive(Clone)]
pub struct Said {
    room: Arc<str>,
    /// The sender (its shard and token), who does not get its own message back.
    from: (usize, Token),
    /// `NAME: text\n`, encoded once.
    line: Arc<[u8]>,
}

/// Per connection: its nick and its room.
pub struct Member {
    nick: Box<str>,
    room: Arc<str>,
}

impl Default for Member {
    fn default() -> Self {
        Member {
            nick: "".into(),
            room: "lobby".into(),
        }
    }
}

/// The service of one shard.
pub struct Chat {
    shard: usize,
    shards: usize,
    peers: Peers<Said>,
    /// This shard's members of each room.
    rooms: HashMap<Arc<str>, Vec<Token>>,
    guests: u64,
    said: CounterHandle,
    delivered: CounterHandle,
    dropped: CounterHandle,
    lost: CounterHandle,
}

impl Chat {
    /// Builds shard `info.shard`'s service.
    pub fn new(info: &ShardInfo, peers: Peers<Said>) -> Chat {
        let counter = |name, help| info.counters.counter(name, help).expect("a valid name");
        Chat {
            shard: info.shard,
            shards: info.shards,
            peers,
            rooms: HashMap::new(),
            guests: 0,
            said: counter("chat_said", "messages said on this shard"),
            delivered: counter(
                "chat_delivered",
                "messages written to members on this shard",
            ),
            dropped: counter(
                "chat_dropped",
                "messages a member missed for not reading (output over max_write_buffer)",
            ),
            lost: counter("chat_lost", "messages a shard's full queue refused"),
        }
    }

    fn join(&mut self, token: Token, room: &Arc<str>) {
        self.rooms.entry(room.clone()).or_default().push(token);
    }

    fn leave(&mut self, token: Token, room: &str) {
        if let Some(members) = self.rooms.get_mut(room) {
            members.retain(|&t| t != token);
            if members.is_empty() {
                self.rooms.remove(room);
            }
        }
    }

    fn line(&mut self, conn: &mut Conn<'_, Member>, line: &[u8]) {
        let Ok(line) = std::str::from_utf8(line) else {
            conn.write(b"error: lines are UTF-8\n");
            return;
        };
        let line = line.strip_suffix('\r').unwrap_or(line);
        if let Some(command) = line.strip_prefix('/') {
            let (verb, arg) = command.split_once(' ').unwrap_or((command, ""));
            let arg = arg.trim();
            let valid = !arg.is_empty()
                && arg.len() <= MAX_NAME
                && arg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            match verb {
                "nick" if valid => {
                    conn.state().nick = arg.into();
                    conn.write(format!("ok nick {arg}\n").as_bytes());
                }
                "join" if valid => {
                    let token = conn.token();
                    let old = conn.state().room.clone();
                    self.leave(token, &old);
                    let room: Arc<str> = arg.into();
                    self.join(token, &room);
                    conn.state().room = room;
                    conn.write(format!("ok join {arg}\n").as_bytes());
                }
                "nick" | "join" => conn.write(
                    format!(
                        "error: /{verb} takes a name of 1 to {MAX_NAME} letters, digits, _ or -\n"
                    )
                    .as_bytes(),
                ),
                "quit" => {
                    conn.write(b"bye\n");
                    conn.close();
                }
                _ => conn.write(format!("error: unknown command /{verb}\n").as_bytes()),
            }
            return;
        }
        let from = (self.shard, conn.token());
        let st = conn.state();
        let said = Said {
            room: st.room.clone(),
            from,
            line: format!("{}: {line}\n", st.nick).into_bytes().into(),
        };
        self.said.inc();
        let reached = self.peers.broadcast(said);
        self.lost.add((self.shards - reached) as u64);
    }
}

impl Service for Chat {
    type State = Member;
    type Command = Said;

    fn on_open(&mut self, conn: &mut Conn<'_, Member>) {
        self.guests += 1;
        let nick = format!("guest{}-{}", self.shard, self.guests);
        let token = conn.token();
        let room = conn.state().room.clone();
        self.join(token, &room);
        let hello = format!(
            "hello {nick}: shard {} of {}, room {room}\n",
            self.shard, self.shards
        );
        conn.state().nick = nick.into();
        conn.write(hello.as_bytes());
    }

    fn on_data(&mut self, conn: &mut Conn<'_, Member>, input: &mut [u8]) -> usize {
        let mut used = 0;
        while let Some(end) = input[used..].iter().position(|&b| b == b'\n') {
            if end > MAX_LINE {
                break;
            }
            let line = &input[used..used + end];
            used += end + 1;
            self.line(conn, line);
            if conn.is_closing() {
                return input.len();
            }
        }
        if input.len() - used > MAX_LINE {
            conn.write(format!("error: line too long (at most {MAX_LINE} bytes)\n").as_bytes());
            conn.close();
            return input.len();
        }
        used
    }

    fn on_command(&mut self, said: Said, ctx: &mut Ctx<'_, Member>) {
        let Some(members) = self.rooms.get(&said.room) else {
            return;
        };
        for &token in members {
            if (self.shard, token) == said.from {
                continue;
            }
            let delivered = ctx.with_conn(token, |conn| {
                if conn.over_limit() {
                    false
                } else {
                    conn.write(&said.line);
                    true
                }
            });
            match delivered {
                Some(true) => self.delivered.inc(),
                Some(false) => self.dropped.inc(),
                None => {}
            }
        }
    }

    fn on_close(&mut self, token: Token, member: &mut Member, _reason: CloseReason) {
        let room = member.room.clone();
        self.leave(token, &room);
    }
}
