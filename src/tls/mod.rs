//! TLS termination: the rustls configuration of a listener ([`load`]) and the per-connection
//! state that sits between a socket and a service ([`conn`]). The engine's side of it, where
//! the shard calls these, is `server/shard/tls.rs`.
//!
//! Ownership: a [`ServerTls`] (one per TLS listener) lives on the main thread, which builds it at
//! start-up and rebuilds it on SIGHUP; what crosses to the shards is a [`TlsAcceptor`] (its
//! `Arc<ServerConfig>`, immutable), at start and by control message on a reload. A [`TlsConn`]
//! (or the load generator's [`TlsClient`]) belongs to the shard that owns its connection and is
//! touched by that thread only.
//!
//! # Design: rustls's unbuffered API, from the shard's buffers
//!
//! The engine's rule is that an idle connection holds no buffer. Measured after a completed
//! TLS 1.3 handshake and one request/response (100 B in, 1,000 B out), with the connection idle
//! and its client gone (ECDSA P-256 certificate, X25519, AES-256-GCM, 15,000 held, release
//! build): `cargo run --release --example tls-memory` prints the resident growth per connection,
//! each variant in a process of its own; `tests/tls_memory.rs` holds the bound.
//!
//! | per idle connection                      | resident |
//! |------------------------------------------|----------|
//! | `rustls::ServerConnection` (buffered)    | 7,673 B  |
//! | [`TlsConn`] (`UnbufferedServerConnection`) | 3,537 B  |
//!
//! The buffered connection keeps a 4 KiB receive buffer for good once it has read anything
//! (rustls sizes it up to 4 KiB on every `read_tls` and shrinks it only back to 4 KiB), and
//! `set_buffer_limit` bounds only the sending side: no call releases it (measured: no change
//! after `set_buffer_limit(Some(0))`). The unbuffered connection keeps no buffer; a counting
//! allocator (a scratch program, not kept) showed what it holds after the handshake: the
//! 1,088-byte struct itself, two AES-GCM key schedules of 560 B, 640 B of post-handshake state
//! (the traffic secrets), a 224-byte HKDF key, two 96-byte empty record queues and the SNI name.
//! With the engine's ~100 B per plain connection that is about 3.6 KiB per idle TLS connection,
//! against the goal of 4 KiB (nginx with OpenSSL: ~16 KB).
//!
//! rustls 0.23 still copies: a received record is decrypted in place in the caller's buffer and
//! then copied into a `Vec` of its own, which [`TlsConn::read`] copies to its destination; a sent
//! record is built in a `Vec` and copied into the output. The counting allocator saw three
//! allocations per request/response on a TLS connection (none on a plain one); rustls marks in-place
//! reading as planned ("requires in-place decryption"), and this module's interface already
//! takes and returns the caller's buffers, so nothing above it changes when that lands.
//!
//! ## Read path (how the shard uses it)
//!
//! The shard reads ciphertext into its one shared read buffer, as for a plain connection, and
//! calls [`TlsConn::read`] on the bytes just read:
//! - the common case (no partial record kept, no unconsumed plaintext): [`Dest::InPlace`]. The
//!   plaintext of every whole record is compacted at the front of the read buffer (a record's
//!   plaintext is shorter than the record, so it never overtakes ciphertext still to decrypt),
//!   and the service is called on it in place exactly as for a plain read; what it leaves
//!   unconsumed goes to the connection's input buffer as for a plain connection.
//! - a record cut by the read: its bytes are kept in the connection's `pending` buffer, which
//!   exists only while a record is partial (and is bounded by [`conn::MAX_PENDING`]). While it
//!   exists, or while the connection has unconsumed plaintext, the shard passes
//!   [`Dest::Append`] with the connection's input buffer: the new ciphertext joins the kept
//!   tail, and the plaintext is appended after the unconsumed plaintext.
//! - handshake messages, session tickets and alerts that rustls answers with are appended to
//!   the output staging buffer and leave through the write path below.
//!
//! ## Write path
//!
//! A service writes plaintext into the shard's output staging buffer as on a plain connection;
//! after the callback the shard encrypts it with [`TlsConn::write`] into a second staging buffer
//! of the shard's (records of up to 16 KiB), and writes or queues that ciphertext exactly as it
//! writes plain output. `max_write_buffer`, backpressure and `write_timeout` therefore apply to the
//! ciphertext, which is what really waits for the socket.
//!
//! ## Lifecycle
//!
//! - Handshake: a new connection gets [`TlsAcceptor::accept`] and a deadline of
//!   `handshake_timeout` (in the service timer's slot, unused until `on_open`); the service's
//!   `on_open` runs when [`Progress::handshake_done`] is first seen, so a service never sees a
//!   connection before its handshake, and `on_close` only for one it saw. A connection still
//!   handshaking at its deadline is closed and counted (`tls_handshake_timeouts`), as is one
//!   whose handshake fails (`tls_handshake_failures`).
//! - Close: a close requested by the service, or by drain, first queues
//!   [`TlsConn::close_notify`] behind the pending output, then flushes and closes as for a plain
//!   connection. A received close_notify ([`Progress::peer_closed`]) is end of input, like FIN.
//! - Errors: after a [`TlsError`] the output may hold the alert rustls prepared; the shard sends
//!   it if the socket takes it at once, and closes that connection only.
//! - Reload: [`ServerTls::reload`] builds a new configuration and swaps it in only if every file
//!   was good; shards receive the new `Arc` by command and use it for the next handshakes, while
//!   open connections keep theirs.
//!
//! # Crypto provider: ring
//!
//! Measured on this 2-core machine (loaded by other builds, so the ratios mean more than the
//! absolute values): a clean debug build of rustls with ring takes ~15 s, with aws-lc-rs ~68 s
//! (aws-lc-sys compiles a large C library; the whole CI run is budgeted at 20 minutes); server
//! CPU per full TLS 1.3 handshake (ECDSA P-256, X25519, thread CPU time, in memory) is ~140 µs
//! with ring and ~112 µs with aws-lc-rs; an idle connection holds ~3,420 B with ring and
//! ~3,620 B with aws-lc-rs (its C allocations). ring wins on the goal that binds (memory per
//! idle connection, with the least margin) and on build time; aws-lc-rs's faster handshakes
//! (~20%) are not needed for the handshake goal (1.5× nginx's 3,100/s: ring's handshake alone
//! allows ~7,000 per server CPU-second).
//!
//! Session resumption uses stateless tickets (ring's ticketer, keys kept across reloads) and no
//! server-side session cache: no per-session memory and no lock shared by the shards.

pub mod conn;
pub mod load;

#[cfg(test)]
pub(crate) mod testpki;

pub use conn::{Dest, Progress, Side, Tls, TlsClient, TlsConn, TlsError};
pub use load::{
    provider, LoadError, MinVersion, ServerTls, TlsAcceptor, TlsConnector, TlsFile, TlsSettings,
};
