//! hyper 1.x on one thread (current-thread runtime), pipeline flush on, serving the TechEmpower
//! plaintext shape at /plaintext. `cargo run --release --example hyper-plaintext -- --port P`
#[path = "../common.rs"]
mod common;

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};

async fn hello(_req: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut r = Response::new(Full::new(Bytes::from_static(b"Hello, World!")));
    let h = r.headers_mut();
    h.insert("server", "hyper".parse().expect("header"));
    h.insert("content-type", "text/plain".parse().expect("header"));
    Ok(r)
}

fn main() -> std::io::Result<()> {
    let port = common::port();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        eprintln!("listening on 127.0.0.1:{port}");
        loop {
            let (s, _) = listener.accept().await?;
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(s);
                let _ = http1::Builder::new()
                    .pipeline_flush(true)
                    .serve_connection(io, service_fn(hello))
                    .await;
            });
        }
    })
}
