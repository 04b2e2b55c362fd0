//! Memory held by idle TLS connections: N connections complete a TLS 1.3 handshake and one
//! request/response against an in-memory rustls client, the client side is dropped, and the
//! growth of the process's resident memory is divided by N. Run in a fresh process per variant:
//! memory freed by an earlier run would be reused and hide what a later one holds.
//!
//! Resident memory rather than a counting allocator: it includes what the crypto provider's C
//! code allocates and what the allocator loses to fragmentation, which is what an operator pays.

use std::io::{Read, Write};
use std::sync::Arc;

use rustls::{ClientConfig, ClientConnection, ServerConnection};
use shardnet::tls::{Dest, MinVersion, ServerTls, TlsConn, TlsSettings};

use crate::pki::Pki;

/// Which server connection to hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `rustls::ServerConnection`, with its own buffers.
    Buffered,
    /// `shardnet::tls::TlsConn`: rustls's unbuffered connection from the caller's buffers.
    Unbuffered,
}

/// The process's resident memory, in bytes.
pub fn rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

struct Setup {
    server: ServerTls,
    client: Arc<ClientConfig>,
    _pki: Pki,
}

fn setup() -> Setup {
    let pki = Pki::new();
    let server = ServerTls::new(TlsSettings {
        cert: pki.cert.clone(),
        key: pki.key.clone(),
        client_ca: None,
        min_version: MinVersion::Tls12,
        alpn: Vec::new(),
    })
    .unwrap();
    let client = pki.client(&[&rustls::version::TLS13], &[], false);
    Setup {
        server,
        client,
        _pki: pki,
    }
}

fn client(s: &Setup) -> ClientConnection {
    ClientConnection::new(s.client.clone(), "localhost".try_into().unwrap()).unwrap()
}

fn from_client(c: &mut ClientConnection, wire: &mut Vec<u8>) {
    wire.clear();
    while c.wants_write() {
        c.write_tls(wire).unwrap();
    }
}

fn to_client(c: &mut ClientConnection, out: &[u8]) {
    let mut rd = out;
    while !rd.is_empty() {
        c.read_tls(&mut rd).unwrap();
        c.process_new_packets().unwrap();
    }
}

const REQUEST: &[u8] = &[b'q'; 100];
const RESPONSE: &[u8] = &[b'r'; 1000];

/// The shard's shared buffers: allocated once, outside what is measured.
struct Shared {
    read: Vec<u8>,
    out: Vec<u8>,
}

fn unbuffered(s: &Setup, sh: &mut Shared) -> TlsConn {
    let mut c = client(s);
    let mut conn = s.server.accept();
    while conn.is_handshaking() || c.wants_write() {
        from_client(&mut c, &mut sh.read);
        sh.out.clear();
        conn.read(&mut sh.read, Dest::InPlace, &mut sh.out).unwrap();
        to_client(&mut c, &sh.out);
    }
    c.writer().write_all(REQUEST).unwrap();
    from_client(&mut c, &mut sh.read);
    sh.out.clear();
    let p = conn.read(&mut sh.read, Dest::InPlace, &mut sh.out).unwrap();
    assert_eq!(&sh.read[..p.plaintext], REQUEST);
    conn.write(RESPONSE, &mut sh.out).unwrap();
    to_client(&mut c, &sh.out);
    let mut back = [0; RESPONSE.len()];
    c.reader().read_exact(&mut back).unwrap();
    conn
}

fn buffered(s: &Setup, sh: &mut Shared) -> ServerConnection {
    let mut c = client(s);
    let mut conn = ServerConnection::new(s.server.config()).unwrap();
    while conn.is_handshaking() || c.wants_write() {
        from_client(&mut c, &mut sh.read);
        let mut rd = &sh.read[..];
        while !rd.is_empty() {
            conn.read_tls(&mut rd).unwrap();
            conn.process_new_packets().unwrap();
        }
        sh.out.clear();
        while conn.wants_write() {
            conn.write_tls(&mut sh.out).unwrap();
        }
        to_client(&mut c, &sh.out);
    }
    c.writer().write_all(REQUEST).unwrap();
    from_client(&mut c, &mut sh.read);
    let mut rd = &sh.read[..];
    while !rd.is_empty() {
        conn.read_tls(&mut rd).unwrap();
        conn.process_new_packets().unwrap();
    }
    let mut got = [0; REQUEST.len()];
    conn.reader().read_exact(&mut got).unwrap();
    conn.writer().write_all(RESPONSE).unwrap();
    sh.out.clear();
    while conn.wants_write() {
        conn.write_tls(&mut sh.out).unwrap();
    }
    to_client(&mut c, &sh.out);
    conn
}

/// Resident bytes per idle connection of `kind`, with `n` held.
pub fn per_connection(kind: Kind, n: usize) -> usize {
    let s = setup();
    let mut sh = Shared {
        read: Vec::with_capacity(64 << 10),
        out: Vec::with_capacity(64 << 10),
    };
    // Warm up: the provider's one-time set-up and the allocator's first arenas are not per
    // connection.
    for _ in 0..100 {
        match kind {
            Kind::Buffered => drop(buffered(&s, &mut sh)),
            Kind::Unbuffered => drop(unbuffered(&s, &mut sh)),
        }
    }
    let mut held_b = Vec::with_capacity(if kind == Kind::Buffered { n } else { 0 });
    let mut held_u = Vec::with_capacity(if kind == Kind::Unbuffered { n } else { 0 });
    let before = rss();
    for _ in 0..n {
        // Boxed, as the shard keeps it (a connection without TLS pays only the pointer).
        match kind {
            Kind::Buffered => held_b.push(Box::new(buffered(&s, &mut sh))),
            Kind::Unbuffered => held_u.push(Box::new(unbuffered(&s, &mut sh))),
        }
    }
    let grown = rss().saturating_sub(before);
    grown / n
}
