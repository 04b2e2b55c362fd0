//! The memory goal of TLS termination: an idle TLS connection (handshake done, one
//! request/response served) holds at most about 4 KiB in all, so the TLS state itself must stay
//! under 4 KiB less the ~100 bytes of a plain connection. The only test in this binary: the
//! figure is the process's resident growth, which other tests' threads would blur.

#[path = "../src/tls/testpki.rs"]
#[allow(dead_code)]
mod pki;

#[path = "../examples/tls-memory/measure.rs"]
mod measure;

/// 4 KiB less the engine's per-connection cost (a slab entry and a timer link, ~100 B) and a
/// margin for the allocator's page granularity over 1,000 connections (±130 B).
const BOUND: usize = 4096 - 100 - 130;

#[test]
fn an_idle_tls_connection_holds_under_4_kib() {
    let per_conn = measure::per_connection(measure::Kind::Unbuffered, 1000);
    eprintln!("idle TLS connection: {per_conn} B resident");
    assert!(
        per_conn <= BOUND,
        "an idle TLS connection holds {per_conn} B (bound {BOUND} B)"
    );
    // The measurement measures something: the connection's own struct alone is over 1 KiB.
    assert!(per_conn > 1024, "implausibly small: {per_conn} B");
}
