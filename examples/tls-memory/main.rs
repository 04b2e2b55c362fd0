//! Resident memory per idle TLS connection, buffered rustls against the unbuffered connection
//! `shardnet::tls` drives (the figures in the `tls` module's design note).
//!
//! `cargo run --release --example tls-memory [CONNECTIONS]` (default 15000). Each variant runs
//! in a child process of its own, so neither reuses memory the other freed.

#[path = "../../src/tls/testpki.rs"]
#[allow(dead_code)]
mod pki;

mod measure;

use measure::Kind;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(15_000);
    if let Some(kind) = args.get(2) {
        let kind = if kind == "buffered" {
            Kind::Buffered
        } else {
            Kind::Unbuffered
        };
        println!("{}", measure::per_connection(kind, n));
        return;
    }
    println!(
        "size_of: TlsConn {} B, rustls UnbufferedServerConnection {} B, ServerConnection {} B",
        std::mem::size_of::<shardnet::tls::TlsConn>(),
        std::mem::size_of::<rustls::server::UnbufferedServerConnection>(),
        std::mem::size_of::<rustls::ServerConnection>()
    );
    for (kind, what) in [
        ("buffered", "rustls::ServerConnection (buffered)"),
        ("unbuffered", "shardnet::tls::TlsConn (unbuffered)"),
    ] {
        let out = std::process::Command::new(&args[0])
            .args([n.to_string(), kind.to_string()])
            .output()
            .expect("run the measurement");
        let bytes = String::from_utf8_lossy(&out.stdout).trim().to_string();
        println!("{what}: {bytes} B resident per idle connection ({n} held)");
    }
}
