//! The offload example's service: a line protocol where `slow <text>` does blocking work (a
//! sleep standing for a database call, then a SHA-1 of the text) on the offload pool and
//! answers `done <hex>`, while every other line is echoed at once by the shard.
//!
//! One service per shard, on the shard's thread. Per connection one job is in flight at a time:
//! while it runs the connection's reading is paused, so pipelined requests wait in its input
//! (bounded by the socket buffers) and answers keep the order of the requests. A full pool is
//! answered `busy` at once. Used by `examples/offload/main.rs` and by `tests/offload.rs`.

use std::fmt::Write as _;
use std::time::Duration;

use sha1::{Digest, Sha1};
use shardnet::server::{Conn, OffloadError, Peers, Service, ShardInfo};
use shardnet::stats::CounterHandle;

/// Longest request line, newline excluded; a longer one closes the connection.
pub const MAX_LINE: usize = 4096;

/// Per connection: whether its job is out.
#[derive(Default)]
pub struct Waiting(bool);

/// The service of one shard.
pub struct Slow {
    peers: Peers<String>,
    /// The blocking part of each job.
    work: Duration,
    slow: CounterHandle,
    busy: CounterHandle,
}

impl Slow {
    /// Builds the shard's service; `work` is how long each job blocks its thread.
    pub fn new(info: &ShardInfo, peers: Peers<String>, work: Duration) -> Slow {
        let counter = |name, help| info.counters.counter(name, help).expect("a valid name");
        Slow {
            peers,
            work,
            slow: counter("slow_requests", "slow requests handed to the offload pool"),
            busy: counter(
                "slow_busy",
                "slow requests answered busy: the pool was full",
            ),
        }
    }
}

/// The job: blocks for `work`, then hashes `text`.
fn job(text: Vec<u8>, work: Duration) -> String {
    std::thread::sleep(work);
    let mut hex = String::from("done ");
    for b in Sha1::digest(&text) {
        let _ = write!(hex, "{b:02x}");
    }
    hex.push('\n');
    hex
}

impl Service for Slow {
    type State = Waiting;
    /// An offloaded job's answer line.
    type Command = String;

    fn on_data(&mut self, conn: &mut Conn<'_, Waiting>, input: &mut [u8]) -> usize {
        let mut used = 0;
        while !conn.state().0 {
            let Some(end) = input[used..].iter().position(|&b| b == b'\n') else {
                if input.len() - used > MAX_LINE {
                    conn.write(b"error: line too long\n");
                    conn.close();
                    return input.len();
                }
                break;
            };
            let line = &input[used..used + end];
            used += end + 1;
            let Some(text) = line.strip_prefix(b"slow") else {
                conn.write(line);
                conn.write(b"\n");
                continue;
            };
            let (text, work) = (text.trim_ascii().to_vec(), self.work);
            match self.peers.offload(conn, move || job(text, work)) {
                Ok(()) => {
                    self.slow.inc();
                    conn.state().0 = true;
                    // The next request waits for this answer: stop reading until it comes.
                    conn.pause_reading();
                }
                Err(OffloadError::Full { .. }) => {
                    self.busy.inc();
                    conn.write(b"busy\n");
                }
                Err(e) => {
                    conn.write(format!("error: {e}\n").as_bytes());
                }
            }
        }
        used
    }

    fn on_offload(&mut self, conn: &mut Conn<'_, Waiting>, answer: String) {
        conn.write(answer.as_bytes());
        conn.state().0 = false;
        if conn.draining() {
            conn.close();
        } else {
            // Offers the requests that arrived meanwhile, then reads on.
            conn.resume_reading();
        }
    }

    fn on_drain(&mut self, conn: &mut Conn<'_, Waiting>) {
        // A job's answer is on its way: close once it is written (`on_offload`), or at the
        // server's shutdown_timeout.
        if !conn.state().0 {
            conn.close();
        }
    }
}
