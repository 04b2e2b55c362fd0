//! One TLS connection, driven from caller-owned buffers through rustls's unbuffered API:
//! ciphertext comes in as a slice (the shard's shared read buffer), plaintext goes back in place
//! at the front of that slice (or appended to a buffer the caller names), and every record to
//! send is appended to the caller's output buffer. The server side ([`TlsConn`]) is what
//! listeners use; the client side ([`TlsClient`]) is the load generator's, on the same engine.
//!
//! Owned by the shard that owns the connection; nothing here is shared. The only buffer a
//! connection keeps is `pending`: ciphertext that does not make a whole record yet (or, during
//! the handshake, records of a handshake message rustls is still assembling). It exists only
//! while there is such a tail, and is bounded by [`MAX_PENDING`].
//!
//! rustls keeps offsets into the bytes it has not released, so every buffer given to it starts
//! with those bytes: the `pending` tail, never an empty slice while a tail exists (it panics
//! otherwise). Every call below follows that.

use std::mem;
use std::ops::DerefMut;
use std::sync::Arc;

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::pki_types::ServerName;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, InsufficientSizeError,
    UnbufferedConnectionCommon, UnbufferedStatus,
};
use rustls::{ClientConfig, ProtocolVersion, ServerConfig};

/// A side of a connection rustls's unbuffered API drives: the server's or the client's.
pub trait Side: DerefMut<Target = UnbufferedConnectionCommon<Self::Data>> {
    type Data;
    fn process_tls<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
}

impl Side for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    fn process_tls<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
}

impl Side for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    fn process_tls<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
}

/// The server side of one TLS connection.
pub type TlsConn = Tls<UnbufferedServerConnection>;
/// The client side of one TLS connection (the load generator).
pub type TlsClient = Tls<UnbufferedClientConnection>;

/// Largest record on the wire: a 5-byte header and at most 2^14 + 2048 bytes of payload.
pub const MAX_RECORD: usize = 5 + (1 << 14) + 2048;
/// Ciphertext kept between reads at most: a handshake message still being assembled (rustls's
/// buffered API caps those at 64 KiB, and so does this) plus one partial record.
pub const MAX_PENDING: usize = 0x1_0000 + MAX_RECORD;
/// Bytes a record adds to its plaintext at most, with every suite rustls offers (TLS 1.2 GCM:
/// header 5, explicit nonce 8, tag 16; TLS 1.3: header 5, content type 1, tag 16).
const RECORD_OVERHEAD: usize = 5 + 8 + 16;
/// Plaintext per record (rustls's default fragment size).
const MAX_FRAGMENT: usize = 1 << 14;

// State flags.
const DONE: u8 = 1 << 0; // handshake finished
const PEER_CLOSED: u8 = 1 << 1; // close_notify received: no more plaintext will come
const CLOSE_SENT: u8 = 1 << 2; // close_notify queued: nothing more may be written
const FAILED: u8 = 1 << 3; // a protocol error: the connection must close

/// Why a TLS connection must close. None of these carries key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The handshake failed: not TLS, a version or cipher suite we do not offer, a missing or
    /// refused client certificate, a bad message.
    #[error("TLS handshake failed: {0}")]
    Handshake(rustls::Error),
    /// A protocol error after the handshake (a record that does not decrypt, a bad alert).
    #[error("TLS error: {0}")]
    Traffic(rustls::Error),
    /// The peer sent more handshake data than a handshake needs without completing a message.
    #[error("TLS handshake message over {MAX_PENDING} bytes")]
    TooLarge,
    /// Plaintext was written before the handshake finished.
    #[error("TLS handshake not finished: cannot send data yet")]
    NotReady,
    /// Plaintext was written after close_notify.
    #[error("TLS connection already closed")]
    Closed,
    /// `Dest::InPlace` was asked for while a partial record is kept ([`TlsConn::has_pending`]).
    #[error("TLS: partial record pending, plaintext needs a buffer to go to")]
    NeedsBuffer,
}

impl TlsError {
    /// Whether this error ended a handshake (the per-shard `bad handshake` counter).
    pub fn is_handshake(&self) -> bool {
        matches!(self, TlsError::Handshake(_) | TlsError::TooLarge)
    }
}

/// Where the plaintext of a read goes.
pub enum Dest<'a> {
    /// Compacted at the front of the ciphertext slice given to [`TlsConn::read`] (plaintext is
    /// never longer than its record, so it never overtakes the ciphertext still to decrypt).
    InPlace,
    /// Appended to this buffer: the connection already holds unconsumed plaintext, or a partial
    /// record (whose completion may hold more plaintext than the new bytes have room for).
    Append(&'a mut Vec<u8>),
}

/// What one [`TlsConn::read`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Plaintext bytes produced: at the front of the slice (`Dest::InPlace`) or appended.
    pub plaintext: usize,
    /// The handshake finished during this call.
    pub handshake_done: bool,
    /// close_notify arrived during this call: the peer will send nothing more.
    pub peer_closed: bool,
}

/// One side of a TLS connection: [`TlsConn`] or [`TlsClient`].
pub struct Tls<S> {
    conn: S,
    pending: Vec<u8>,
    flags: u8,
}

impl TlsConn {
    pub fn new(config: Arc<ServerConfig>) -> TlsConn {
        Tls {
            // Fails only for a configuration without protocol versions, which `load::build`
            // never makes.
            conn: UnbufferedServerConnection::new(config)
                .expect("a server configuration from tls::load is usable"),
            pending: Vec::new(),
            flags: 0,
        }
    }
}

impl TlsClient {
    /// A client connection to `server` (the name its certificate must carry). Send what
    /// [`Tls::start`] produces first.
    pub fn new(config: Arc<ClientConfig>, server: ServerName<'static>) -> Result<Self, TlsError> {
        Ok(Tls {
            conn: UnbufferedClientConnection::new(config, server).map_err(TlsError::Handshake)?,
            pending: Vec::new(),
            flags: 0,
        })
    }

    /// Appends the ClientHello to `out`.
    pub fn start(&mut self, out: &mut Vec<u8>) -> Result<(), TlsError> {
        self.read(&mut [], Dest::InPlace, out).map(|_| ())
    }
}

impl<S: Side> Tls<S> {
    pub fn is_handshaking(&self) -> bool {
        self.flags & DONE == 0
    }

    /// Whether ciphertext is kept from an earlier read: the next read must use `Dest::Append`.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Bytes of ciphertext kept (counted as the connection's buffered input).
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    pub fn peer_closed(&self) -> bool {
        self.flags & PEER_CLOSED != 0
    }

    /// The ALPN protocol agreed on, if any.
    pub fn alpn(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    pub fn protocol_version(&self) -> Option<ProtocolVersion> {
        self.conn.protocol_version()
    }

    /// Whether the peer presented a certificate (on the server: verified against `client_ca`).
    pub fn has_peer_certificate(&self) -> bool {
        self.conn.peer_certificates().is_some_and(|c| !c.is_empty())
    }

    /// Takes `data`, ciphertext just read from the socket. Decrypted application data goes to
    /// `dest`; handshake messages, alerts and session tickets to send are appended to `out`
    /// (send them even when this returns an error: they may hold the alert saying why). What
    /// does not make a whole record is kept until the next read. After an error the connection
    /// must be closed once `out` is written.
    pub fn read(
        &mut self,
        data: &mut [u8],
        dest: Dest<'_>,
        out: &mut Vec<u8>,
    ) -> Result<Progress, TlsError> {
        let mut progress = Progress::default();
        if self.flags & (PEER_CLOSED | FAILED) != 0 {
            // "Any data received after a closure alert has been received MUST be ignored."
            // (RFC 8446, 6.1); after a failure nothing more is read.
            return Ok(progress);
        }
        let result = match dest {
            Dest::InPlace if self.has_pending() => Err(TlsError::NeedsBuffer),
            Dest::InPlace => {
                let (used, r) = self.process(data, None, out, &mut progress);
                let kept = self.keep(&data[used..]);
                r.and(kept)
            }
            Dest::Append(plain) if !self.has_pending() => {
                let (used, r) = self.process(data, Some(plain), out, &mut progress);
                let kept = self.keep(&data[used..]);
                r.and(kept)
            }
            Dest::Append(plain) => {
                // The tail of the last read and these bytes must be one contiguous slice: a
                // record (or a handshake message rustls is assembling) may span both.
                let mut pending = mem::take(&mut self.pending);
                pending.extend_from_slice(data);
                let (used, r) = self.process(&mut pending, Some(plain), out, &mut progress);
                if used == pending.len() {
                    // Whole records only: the buffer goes, as the idle rule asks.
                    drop(pending);
                } else {
                    pending.drain(..used);
                    self.pending = pending;
                }
                r.and(self.check_pending())
            }
        };
        if let Err(e) = &result {
            if !matches!(e, TlsError::NeedsBuffer) {
                self.flags |= FAILED;
                self.pending = Vec::new();
            }
        }
        result.map(|()| progress)
    }

    /// Encrypts `plain` as application data records appended to `out`.
    pub fn write(&mut self, plain: &[u8], out: &mut Vec<u8>) -> Result<(), TlsError> {
        if plain.is_empty() {
            return Ok(());
        }
        if self.flags & (CLOSE_SENT | FAILED) != 0 {
            return Err(TlsError::Closed);
        }
        if self.flags & DONE == 0 {
            return Err(TlsError::NotReady);
        }
        // rustls must see the bytes it has not released yet at the front of every buffer it is
        // given (it keeps offsets into them): that is `pending`, never an empty slice.
        let Self {
            conn,
            pending,
            flags,
        } = self;
        for _ in 0..16 {
            let UnbufferedStatus { discard, state } = conn.process_tls(pending);
            // Only whole records are released, and `read` left none unprocessed.
            debug_assert_eq!(discard, 0);
            match state.map_err(TlsError::Traffic)? {
                ConnectionState::EncodeTlsData(mut e) => encode(&mut e, out),
                ConnectionState::TransmitTlsData(t) => t.done(),
                ConnectionState::WriteTraffic(mut w) => {
                    let records = plain.len().div_ceil(MAX_FRAGMENT);
                    let mut need = plain.len() + records * RECORD_OVERHEAD;
                    loop {
                        let start = out.len();
                        out.resize(start + need, 0);
                        match w.encrypt(plain, &mut out[start..]) {
                            Ok(n) => {
                                out.truncate(start + n);
                                return Ok(());
                            }
                            Err(EncryptError::InsufficientSize(InsufficientSizeError {
                                required_size,
                            })) if required_size > need => {
                                out.truncate(start);
                                need = required_size;
                            }
                            Err(_) => {
                                // Key exhaustion (2^64 records, or the suite's limit): rustls
                                // asks for a close; so does this.
                                out.truncate(start);
                                return Err(TlsError::Closed);
                            }
                        }
                    }
                }
                ConnectionState::PeerClosed => *flags |= PEER_CLOSED,
                ConnectionState::Closed => return Err(TlsError::Closed),
                _ => return Err(TlsError::NotReady),
            }
        }
        Err(TlsError::NotReady)
    }

    /// Queues close_notify into `out` (once; only after a finished handshake). Returns whether it
    /// did: a connection that never finished its handshake is just closed.
    pub fn close_notify(&mut self, out: &mut Vec<u8>) -> bool {
        if self.flags & (DONE | CLOSE_SENT | FAILED) != DONE {
            return false;
        }
        let Self {
            conn,
            pending,
            flags,
        } = self;
        for _ in 0..16 {
            let UnbufferedStatus { state, .. } = conn.process_tls(pending);
            match state {
                Ok(ConnectionState::EncodeTlsData(mut e)) => encode(&mut e, out),
                Ok(ConnectionState::TransmitTlsData(t)) => t.done(),
                Ok(ConnectionState::PeerClosed) => *flags |= PEER_CLOSED,
                Ok(ConnectionState::WriteTraffic(mut w)) => {
                    // One alert record: header 5, alert 2, and the suite's overhead.
                    let start = out.len();
                    out.resize(start + 64, 0);
                    let n = w.queue_close_notify(&mut out[start..]).unwrap_or(0);
                    out.truncate(start + n);
                    *flags |= CLOSE_SENT;
                    return n > 0;
                }
                _ => return false,
            }
        }
        false
    }

    /// Runs the state machine over `data`, returning how many bytes of it are done with (the
    /// rest must be offered again, after any new bytes) and whether it failed.
    fn process(
        &mut self,
        data: &mut [u8],
        mut plain: Option<&mut Vec<u8>>,
        out: &mut Vec<u8>,
        progress: &mut Progress,
    ) -> (usize, Result<(), TlsError>) {
        // `off`: bytes of `data` rustls is done with; `w`: plaintext written in place before it.
        let (mut off, mut w) = (0, 0);
        let handshake = |f: u8| f & DONE == 0;
        loop {
            let (front, rest) = data.split_at_mut(off);
            let UnbufferedStatus { discard, state } = self.conn.process_tls(rest);
            let state = match state {
                Ok(s) => s,
                Err(e) => {
                    let e = if handshake(self.flags) {
                        TlsError::Handshake(e)
                    } else {
                        TlsError::Traffic(e)
                    };
                    let used = off + discard;
                    self.queue_alert(&mut data[used..], out);
                    return (used, Err(e));
                }
            };
            match state {
                ConnectionState::ReadTraffic(mut r) => {
                    if discard > 0 {
                        // The record just decrypted is still inside `rest`: step past it first,
                        // so that in-place plaintext lands only in bytes already consumed.
                        off += discard;
                        continue;
                    }
                    while let Some(record) = r.next_record() {
                        let record = match record {
                            Ok(r) => r,
                            Err(e) => return (off, Err(TlsError::Traffic(e))),
                        };
                        let payload = record.payload;
                        progress.plaintext += payload.len();
                        match plain.as_deref_mut() {
                            Some(v) => v.extend_from_slice(payload),
                            None => {
                                // A record's plaintext is shorter than the record, and the
                                // record lies in `front`, so this always fits.
                                let end = w + payload.len();
                                let Some(to) = front.get_mut(w..end) else {
                                    let e = rustls::Error::General("record overlap".into());
                                    return (off, Err(TlsError::Traffic(e)));
                                };
                                to.copy_from_slice(payload);
                                w = end;
                            }
                        }
                    }
                }
                ConnectionState::EncodeTlsData(mut e) => {
                    encode(&mut e, out);
                    off += discard;
                }
                ConnectionState::TransmitTlsData(t) => {
                    // The caller sends `out` after this call; records stay in order.
                    t.done();
                    off += discard;
                }
                ConnectionState::BlockedHandshake => return (off + discard, Ok(())),
                ConnectionState::WriteTraffic(_) => {
                    if handshake(self.flags) {
                        self.flags |= DONE;
                        progress.handshake_done = true;
                    }
                    return (off + discard, Ok(()));
                }
                ConnectionState::PeerClosed | ConnectionState::Closed => {
                    self.flags |= PEER_CLOSED | DONE;
                    progress.peer_closed = true;
                    // Whatever follows close_notify is ignored.
                    return (data.len(), Ok(()));
                }
                // Early data is never enabled (`max_early_data_size` stays 0); any other state
                // is one this code does not know, so the connection closes.
                _ => {
                    let e = rustls::Error::General("unexpected TLS state".into());
                    return (off + discard, Err(TlsError::Traffic(e)));
                }
            }
        }
    }

    /// Keeps `tail` (the bytes `process` was not done with) for the next read.
    fn keep(&mut self, tail: &[u8]) -> Result<(), TlsError> {
        if !tail.is_empty() {
            self.pending.extend_from_slice(tail);
        }
        self.check_pending()
    }

    fn check_pending(&self) -> Result<(), TlsError> {
        if self.pending.len() > MAX_PENDING {
            return Err(TlsError::TooLarge);
        }
        Ok(())
    }

    /// After an error: appends what rustls queued before giving up (a ServerHello it already
    /// built, then the fatal alert saying why). `rest` is what rustls has not released of the
    /// buffer it failed on (it must see the same bytes at the front again).
    ///
    /// Only while something is queued: rustls hands out queued records before it looks at
    /// input, and a call with nothing queued would parse the bad input a second time.
    fn queue_alert(&mut self, rest: &mut [u8], out: &mut Vec<u8>) {
        for _ in 0..8 {
            if !self.conn.wants_write() {
                return;
            }
            let UnbufferedStatus { state, .. } = self.conn.process_tls(rest);
            match state {
                Ok(ConnectionState::EncodeTlsData(mut e)) => encode(&mut e, out),
                _ => return,
            }
        }
    }
}

/// Appends one handshake or alert record rustls has ready: the first call learns its size.
fn encode<D>(e: &mut EncodeTlsData<'_, D>, out: &mut Vec<u8>) {
    let need = match e.encode(&mut []) {
        Ok(_) | Err(EncodeError::AlreadyEncoded) => return,
        Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
            required_size
        }
    };
    let start = out.len();
    out.resize(start + need, 0);
    let n = e.encode(&mut out[start..]).unwrap_or(0);
    out.truncate(start + n);
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use rustls::version::{TLS12, TLS13};
    use rustls::{ClientConfig, ClientConnection};

    use super::*;
    use crate::tls::load::tests::settings;
    use crate::tls::testpki::Pki;
    use crate::tls::{MinVersion, ServerTls, TlsSettings};

    /// Hands the server's `out` to the client, which must fail on the alert `alert`.
    fn client_hears(c: &mut ClientConnection, out: &[u8], alert: rustls::AlertDescription) {
        c.read_tls(&mut &out[..]).unwrap();
        let got = c.process_new_packets().unwrap_err();
        assert_eq!(got, rustls::Error::AlertReceived(alert));
    }

    fn client(config: &Arc<ClientConfig>) -> ClientConnection {
        ClientConnection::new(config.clone(), "localhost".try_into().unwrap()).unwrap()
    }

    /// What the client has to send.
    fn from_client(c: &mut ClientConnection) -> Vec<u8> {
        let mut wire = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut wire).unwrap();
        }
        wire
    }

    /// Hands the server's output to the client; false if the client refused it.
    fn to_client(c: &mut ClientConnection, out: &[u8]) -> bool {
        let mut rd = out;
        while !rd.is_empty() {
            if c.read_tls(&mut rd).is_err() || c.process_new_packets().is_err() {
                return false;
            }
        }
        true
    }

    /// Feeds `wire` to the server in place; returns the plaintext.
    fn server_read(s: &mut TlsConn, mut wire: Vec<u8>, out: &mut Vec<u8>) -> Vec<u8> {
        let p = s.read(&mut wire, Dest::InPlace, out).unwrap();
        wire.truncate(p.plaintext);
        wire
    }

    /// Runs the handshake to its end; the server's first error, if any.
    fn handshake(s: &mut TlsConn, c: &mut ClientConnection) -> Result<(), TlsError> {
        for _ in 0..10 {
            let mut wire = from_client(c);
            let mut out = Vec::new();
            let r = s.read(&mut wire, Dest::InPlace, &mut out);
            let delivered = to_client(c, &out);
            r?;
            assert!(delivered, "the client refused what the server sent");
            if !s.is_handshaking() && !c.is_handshaking() && !c.wants_write() {
                return Ok(());
            }
        }
        panic!("handshake did not finish in 10 rounds");
    }

    fn pair(
        pki: &Pki,
        settings: TlsSettings,
        client_config: &Arc<ClientConfig>,
    ) -> (TlsConn, ClientConnection) {
        let mut s = ServerTls::new(settings).unwrap().accept();
        let mut c = client(client_config);
        handshake(&mut s, &mut c).unwrap();
        let _ = pki;
        (s, c)
    }

    fn client_reads(c: &mut ClientConnection, n: usize) -> Vec<u8> {
        let mut got = vec![0; n];
        c.reader().read_exact(&mut got).unwrap();
        got
    }

    #[test]
    fn handshake_and_data_both_ways_in_tls13_and_tls12() {
        let pki = Pki::new();
        for (version, expect) in [
            (&TLS13, ProtocolVersion::TLSv1_3),
            (&TLS12, ProtocolVersion::TLSv1_2),
        ] {
            let (mut s, mut c) = pair(&pki, settings(&pki), &pki.client(&[version], &[], false));
            assert_eq!(s.protocol_version(), Some(expect));
            assert!(!s.is_handshaking() && !s.has_pending());
            c.writer().write_all(b"hello").unwrap();
            let mut out = Vec::new();
            assert_eq!(server_read(&mut s, from_client(&mut c), &mut out), b"hello");
            assert!(out.is_empty(), "nothing to answer to application data");
            s.write(b"world", &mut out).unwrap();
            assert!(to_client(&mut c, &out));
            assert_eq!(client_reads(&mut c, 5), b"world");
        }
    }

    #[test]
    fn alpn_http11_is_answered_and_a_client_without_it_refused() {
        let pki = Pki::new();
        let mut st = settings(&pki);
        st.alpn = vec![b"http/1.1".to_vec()];
        let (s, c) = pair(
            &pki,
            st.clone(),
            &pki.client(&[&TLS13], &[b"h2", b"http/1.1"], false),
        );
        assert_eq!(s.alpn(), Some(&b"http/1.1"[..]));
        assert_eq!(c.alpn_protocol(), Some(&b"http/1.1"[..]));
        // A client offering no ALPN at all is served (curl without --http1.1 offers it; plain
        // TLS clients do not).
        let (s, _) = pair(&pki, st.clone(), &pki.client(&[&TLS13], &[], false));
        assert_eq!(s.alpn(), None);
        let mut s = ServerTls::new(st).unwrap().accept();
        let mut c = client(&pki.client(&[&TLS13], &[b"h2"], false));
        let mut out = Vec::new();
        let e = s.read(&mut from_client(&mut c), Dest::InPlace, &mut out);
        assert!(
            matches!(
                e,
                Err(TlsError::Handshake(rustls::Error::NoApplicationProtocol))
            ),
            "{e:?}"
        );
        // The client hears why: the ServerHello already built, then the (encrypted) alert.
        client_hears(
            &mut c,
            &out,
            rustls::AlertDescription::NoApplicationProtocol,
        );
    }

    /// Reads `wire` cut at `at`, as two socket reads, the way the shard would: in place while
    /// nothing is kept, appended otherwise. Returns the plaintext, in order.
    fn read_split(
        s: &mut TlsConn,
        wire: &[u8],
        at: usize,
        out: &mut Vec<u8>,
    ) -> Result<Vec<u8>, TlsError> {
        let mut plain = Vec::new();
        for part in [&wire[..at], &wire[at..]] {
            let mut buf = part.to_vec();
            if s.has_pending() {
                s.read(&mut buf, Dest::Append(&mut plain), out)?;
            } else {
                let p = s.read(&mut buf, Dest::InPlace, out)?;
                plain.extend_from_slice(&buf[..p.plaintext]);
            }
        }
        Ok(plain)
    }

    #[test]
    fn records_split_at_every_byte() {
        let pki = Pki::new();
        let config = pki.client(&[&TLS13], &[], false);
        // Two records, so some cuts fall inside the second one and some between them.
        let mut sample = client(&config);
        let mut probe = ServerTls::new(settings(&pki)).unwrap().accept();
        handshake(&mut probe, &mut sample).unwrap();
        sample.writer().write_all(b"abc").unwrap();
        let first = from_client(&mut sample).len();
        for at in 0..=2 * first {
            let (mut s, mut c) = pair(&pki, settings(&pki), &config);
            c.writer().write_all(b"abc").unwrap();
            let mut wire = from_client(&mut c);
            c.writer().write_all(b"defgh").unwrap();
            wire.extend(from_client(&mut c));
            let at = at.min(wire.len());
            let mut out = Vec::new();
            assert_eq!(
                read_split(&mut s, &wire, at, &mut out).unwrap(),
                b"abcdefgh",
                "cut at {at}"
            );
            assert!(
                !s.has_pending(),
                "the kept tail is released once whole (cut at {at})"
            );
        }
    }

    #[test]
    fn client_hello_split_at_every_byte() {
        let pki = Pki::new();
        let config = pki.client(&[&TLS13], &[], false);
        let hello_len = from_client(&mut client(&config)).len();
        for at in 0..hello_len {
            let mut s = ServerTls::new(settings(&pki)).unwrap().accept();
            let mut c = client(&config);
            let hello = from_client(&mut c);
            let mut out = Vec::new();
            let plain = read_split(&mut s, &hello, at, &mut out).unwrap();
            assert!(plain.is_empty());
            assert!(!s.has_pending(), "cut at {at}");
            assert!(to_client(&mut c, &out), "cut at {at}");
            handshake(&mut s, &mut c).unwrap();
        }
    }

    #[test]
    fn close_notify_both_ways() {
        let pki = Pki::new();
        let (mut s, mut c) = pair(&pki, settings(&pki), &pki.client(&[&TLS13], &[], false));
        c.writer().write_all(b"last").unwrap();
        c.send_close_notify();
        let mut wire = from_client(&mut c);
        // Bytes after close_notify are ignored.
        wire.extend_from_slice(b"ignored garbage");
        let mut out = Vec::new();
        let p = s.read(&mut wire, Dest::InPlace, &mut out).unwrap();
        assert_eq!(&wire[..p.plaintext], b"last");
        assert!(p.peer_closed && s.peer_closed());
        assert_eq!(
            s.read(&mut b"more".to_vec(), Dest::InPlace, &mut out)
                .unwrap()
                .plaintext,
            0
        );
        // The server may still answer, then closes in turn.
        s.write(b"bye", &mut out).unwrap();
        assert!(s.close_notify(&mut out));
        assert!(!s.close_notify(&mut out), "sent once");
        assert!(matches!(s.write(b"x", &mut out), Err(TlsError::Closed)));
        assert!(to_client(&mut c, &out));
        assert_eq!(client_reads(&mut c, 3), b"bye");
        let mut rest = Vec::new();
        assert_eq!(c.reader().read_to_end(&mut rest).unwrap(), 0, "clean close");

        // The server closing first.
        let (mut s, mut c) = pair(&pki, settings(&pki), &pki.client(&[&TLS13], &[], false));
        let mut out = Vec::new();
        assert!(s.close_notify(&mut out));
        assert!(to_client(&mut c, &out));
        assert_eq!(c.reader().read(&mut [0; 8]).unwrap(), 0);
    }

    #[test]
    fn garbage_instead_of_a_client_hello_fails_the_handshake() {
        let pki = Pki::new();
        for garbage in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            &[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5],
            &[0xff; 64],
        ] {
            let mut s = ServerTls::new(settings(&pki)).unwrap().accept();
            let mut out = Vec::new();
            let e = s
                .read(&mut garbage.to_vec(), Dest::InPlace, &mut out)
                .unwrap_err();
            assert!(e.is_handshake(), "{e}");
            assert!(!s.has_pending());
            // Nothing more is read from a failed connection.
            let p = s
                .read(&mut garbage.to_vec(), Dest::InPlace, &mut out)
                .unwrap();
            assert_eq!(p, Progress::default());
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Whatever a client sends, cut wherever, the server answers with an error or waits for
        /// more: it never panics, and keeps at most MAX_PENDING bytes.
        #[test]
        fn mangled_client_hellos_never_panic(
            flips in proptest::collection::vec((0usize..600, proptest::prelude::any::<u8>()), 0..4),
            cuts in proptest::collection::vec(1usize..300, 0..4),
            garbage in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        ) {
            let pki = PKI.with(|p| p.clone());
            let mut hello = from_client(&mut client(&pki.1));
            for (at, x) in flips {
                let n = hello.len();
                hello[at % n] ^= x;
            }
            hello.extend_from_slice(&garbage);
            let mut s = pki.0.accept();
            let (mut out, mut plain, mut rest) = (Vec::new(), Vec::new(), &hello[..]);
            for cut in cuts.into_iter().chain([usize::MAX]) {
                let (part, tail) = rest.split_at(cut.min(rest.len()));
                rest = tail;
                let mut buf = part.to_vec();
                let dest = if s.has_pending() { Dest::Append(&mut plain) } else { Dest::InPlace };
                if s.read(&mut buf, dest, &mut out).is_err() {
                    break;
                }
                proptest::prop_assert!(s.pending() <= MAX_PENDING);
            }
        }
    }

    thread_local! {
        static PKI: (Arc<ServerTls>, Arc<ClientConfig>, Arc<Pki>) = {
            let pki = Arc::new(Pki::new());
            let server = Arc::new(ServerTls::new(settings(&pki)).unwrap());
            (server, pki.client(&[&TLS13, &TLS12], &[], false), pki)
        };
    }

    #[test]
    fn endless_handshake_data_is_bounded() {
        let pki = Pki::new();
        let mut s = ServerTls::new(settings(&pki)).unwrap().accept();
        let mut out = Vec::new();
        // A ClientHello that announces 16 MiB and never ends, one full record at a time.
        let mut first = vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0xff, 0xff, 0xff];
        first.resize(5 + (1 << 14), 0);
        let mut record = vec![0x16, 0x03, 0x01, 0x40, 0x00];
        record.resize(5 + (1 << 14), 0);
        let mut failed = None;
        let mut plain = Vec::new();
        for i in 0..64 {
            let mut buf = if i == 0 {
                first.clone()
            } else {
                record.clone()
            };
            let r = if s.has_pending() {
                s.read(&mut buf, Dest::Append(&mut plain), &mut out)
            } else {
                s.read(&mut buf, Dest::InPlace, &mut out)
                    .map(|_| Progress::default())
            };
            assert!(s.pending() <= MAX_PENDING);
            if let Err(e) = r {
                failed = Some(e);
                break;
            }
        }
        let e = failed.expect("refused before 1 MiB");
        assert!(e.is_handshake(), "{e}");
    }

    #[test]
    fn client_certificate_required_and_refused() {
        let pki = Pki::new();
        let mut st = settings(&pki);
        st.client_ca = Some(pki.ca.clone());
        let (s, _) = pair(&pki, st.clone(), &pki.client(&[&TLS13], &[], true));
        assert!(s.has_peer_certificate());
        for version in [&TLS13, &TLS12] {
            let mut s = ServerTls::new(st.clone()).unwrap().accept();
            let e = handshake(&mut s, &mut client(&pki.client(&[version], &[], false)));
            assert!(
                matches!(
                    e,
                    Err(TlsError::Handshake(rustls::Error::NoCertificatesPresented))
                ),
                "{e:?}"
            );
        }
        // A certificate from another CA is refused too.
        let other = Pki::new();
        let mut s = ServerTls::new(st).unwrap().accept();
        let mut c = ClientConnection::new(
            {
                // Trusts our server, presents the other PKI's client certificate.
                let mut cfg = (*other.client(&[&TLS13], &[], true)).clone();
                cfg.dangerous().set_certificate_verifier(pki_verifier(&pki));
                Arc::new(cfg)
            },
            "localhost".try_into().unwrap(),
        )
        .unwrap();
        let e = handshake(&mut s, &mut c);
        assert!(
            matches!(
                e,
                Err(TlsError::Handshake(rustls::Error::InvalidCertificate(_)))
            ),
            "{e:?}"
        );
    }

    fn pki_verifier(pki: &Pki) -> Arc<dyn rustls::client::danger::ServerCertVerifier> {
        let roots = Arc::new(pki.roots());
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots, crate::tls::provider())
            .build()
            .unwrap()
    }

    #[test]
    fn a_version_below_the_minimum_is_refused() {
        let pki = Pki::new();
        let mut st = settings(&pki);
        st.min_version = MinVersion::Tls13;
        let mut s = ServerTls::new(st.clone()).unwrap().accept();
        let mut c = client(&pki.client(&[&TLS12], &[], false));
        let mut out = Vec::new();
        let e = s.read(&mut from_client(&mut c), Dest::InPlace, &mut out);
        assert!(
            matches!(
                e,
                Err(TlsError::Handshake(rustls::Error::PeerIncompatible(_)))
            ),
            "{e:?}"
        );
        // The client is told why (a protocol_version alert), not just cut off.
        client_hears(&mut c, &out, rustls::AlertDescription::ProtocolVersion);
        let (s, _) = pair(&pki, st, &pki.client(&[&TLS13, &TLS12], &[], false));
        assert_eq!(s.protocol_version(), Some(ProtocolVersion::TLSv1_3));
    }

    #[test]
    fn after_a_reload_new_handshakes_see_the_new_certificate_and_old_connections_stay() {
        let (old, new) = (Pki::new(), Pki::named("renewed"));
        let mut tls = ServerTls::new(settings(&old)).unwrap();
        let mut s_old = tls.accept();
        let mut c_old = client(&old.client(&[&TLS13], &[], false));
        handshake(&mut s_old, &mut c_old).unwrap();
        tls.reload(settings(&new)).unwrap();
        // A client trusting only the old CA now fails; one trusting the new one succeeds.
        let mut c = client(&old.client(&[&TLS13], &[], false));
        let mut out = Vec::new();
        tls.accept()
            .read(&mut from_client(&mut c), Dest::InPlace, &mut out)
            .unwrap();
        assert!(
            !to_client(&mut c, &out),
            "the old CA does not vouch for the new certificate"
        );
        let mut s_new = tls.accept();
        let mut c_new = client(&new.client(&[&TLS13], &[], false));
        handshake(&mut s_new, &mut c_new).unwrap();
        // The connection opened before the reload still works.
        c_old.writer().write_all(b"still here").unwrap();
        let mut out = Vec::new();
        assert_eq!(
            server_read(&mut s_old, from_client(&mut c_old), &mut out),
            b"still here"
        );
        s_old.write(b"yes", &mut out).unwrap();
        assert!(to_client(&mut c_old, &out));
        assert_eq!(client_reads(&mut c_old, 3), b"yes");
    }

    /// Moves `from`'s output to `to` until neither has anything to say; errors of either side.
    fn pump(
        server: &mut TlsConn,
        client: &mut TlsClient,
        mut to_server: Vec<u8>,
    ) -> (Vec<u8>, Result<(), TlsError>) {
        let (mut server_plain, mut client_plain) = (Vec::new(), Vec::new());
        for _ in 0..10 {
            let mut to_client = Vec::new();
            let dest = Dest::Append(&mut server_plain);
            server.read(&mut to_server, dest, &mut to_client).unwrap();
            to_server = Vec::new();
            if to_client.is_empty() {
                break;
            }
            let dest = Dest::Append(&mut client_plain);
            if let Err(e) = client.read(&mut to_client, dest, &mut to_server) {
                return (client_plain, Err(e));
            }
        }
        assert!(server_plain.is_empty() || !server.is_handshaking());
        (client_plain, Ok(()))
    }

    #[test]
    fn the_client_side_talks_to_the_server_side() {
        let pki = Pki::new();
        let tls = ServerTls::new(settings(&pki)).unwrap();
        for version in [&TLS13, &TLS12] {
            let mut s = tls.accept();
            let name = ServerName::try_from("localhost").unwrap();
            let mut c = TlsClient::new(pki.client(&[version], &[], false), name).unwrap();
            let mut hello = Vec::new();
            c.start(&mut hello).unwrap();
            assert!(!hello.is_empty() && c.is_handshaking());
            let (_, r) = pump(&mut s, &mut c, hello);
            r.unwrap();
            assert!(!c.is_handshaking() && !s.is_handshaking());
            // Both ways, in place on the server, appended on the client.
            let mut wire = Vec::new();
            c.write(b"ping", &mut wire).unwrap();
            let mut out = Vec::new();
            let p = s.read(&mut wire, Dest::InPlace, &mut out).unwrap();
            assert_eq!(&wire[..p.plaintext], b"ping");
            s.write(b"pong", &mut out).unwrap();
            let mut plain = Vec::new();
            let mut back = Vec::new();
            c.read(&mut out, Dest::Append(&mut plain), &mut back)
                .unwrap();
            assert_eq!(plain, b"pong");
            assert!(c.close_notify(&mut back));
            let p = s.read(&mut back, Dest::InPlace, &mut out).unwrap();
            assert!(p.peer_closed);
        }
        // A client that does not trust the server's CA refuses the handshake.
        let other = Pki::new();
        let mut s = tls.accept();
        let name = ServerName::try_from("localhost").unwrap();
        let mut c = TlsClient::new(other.client(&[&TLS13], &[], false), name).unwrap();
        let mut hello = Vec::new();
        c.start(&mut hello).unwrap();
        let (_, r) = pump(&mut s, &mut c, hello);
        assert!(
            matches!(
                r,
                Err(TlsError::Handshake(rustls::Error::InvalidCertificate(_)))
            ),
            "{r:?}"
        );
    }

    #[test]
    fn writes_wait_for_the_handshake_and_large_writes_are_split_into_records() {
        let pki = Pki::new();
        let mut s = ServerTls::new(settings(&pki)).unwrap().accept();
        let mut out = Vec::new();
        assert!(matches!(
            s.write(b"early", &mut out),
            Err(TlsError::NotReady)
        ));
        assert!(
            !s.close_notify(&mut out),
            "no close_notify before the handshake"
        );
        assert!(out.is_empty());
        let mut c = client(&pki.client(&[&TLS13], &[], false));
        handshake(&mut s, &mut c).unwrap();
        let big: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        s.write(&big, &mut out).unwrap();
        let records = big.len().div_ceil(MAX_FRAGMENT);
        assert_eq!(
            out.len(),
            big.len() + records * 22,
            "TLS 1.3 adds 22 bytes per record"
        );
        // The client takes at most 16 KiB of plaintext at a time: read as it arrives.
        let mut got = Vec::new();
        for chunk in out.chunks(MAX_FRAGMENT) {
            assert!(to_client(&mut c, chunk));
            let _ = c.reader().read_to_end(&mut got);
        }
        assert_eq!(got, big);
    }
}
