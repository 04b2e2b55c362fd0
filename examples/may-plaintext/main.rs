//! may_minihttp (a TechEmpower plaintext leader among Rust servers) with one worker thread.
//! `cargo run --release --example may-plaintext -- --port P`
#[path = "../common.rs"]
mod common;

use std::io;

use may_minihttp::{HttpService, HttpServiceFactory, Request, Response};

#[derive(Clone)]
struct Hello;

impl HttpService for Hello {
    fn call(&mut self, _req: Request, rsp: &mut Response) -> io::Result<()> {
        rsp.header("Content-Type: text/plain");
        rsp.body("Hello, World!");
        Ok(())
    }
}

struct Factory;

impl HttpServiceFactory for Factory {
    type Service = Hello;
    fn new_service(&self, _: usize) -> Hello {
        Hello
    }
}

fn main() {
    let port = common::port();
    may::config().set_workers(1);
    let server = Factory.start(format!("127.0.0.1:{port}")).expect("bind");
    eprintln!("listening on 127.0.0.1:{port}");
    server.wait();
}
