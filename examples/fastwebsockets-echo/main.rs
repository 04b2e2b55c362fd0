//! fastwebsockets (deno's RFC 6455 implementation) echo on a current-thread tokio runtime,
//! upgraded through hyper. `cargo run --release --example fastwebsockets-echo -- --port P`
#[path = "../common.rs"]
mod common;

use bytes::Bytes;
use fastwebsockets::{upgrade, OpCode, WebSocketError};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};

async fn client(fut: upgrade::UpgradeFut) -> Result<(), WebSocketError> {
    let mut ws = fastwebsockets::FragmentCollector::new(fut.await?);
    loop {
        let frame = ws.read_frame().await?;
        match frame.opcode {
            OpCode::Close => return Ok(()),
            OpCode::Text | OpCode::Binary => ws.write_frame(frame).await?,
            _ => {}
        }
    }
}

async fn upgrade(mut req: Request<Incoming>) -> Result<Response<Empty<Bytes>>, WebSocketError> {
    let (response, fut) = upgrade::upgrade(&mut req)?;
    tokio::task::spawn(async move {
        let _ = tokio::task::unconstrained(client(fut)).await;
    });
    Ok(response)
}

fn main() -> std::io::Result<()> {
    let port = common::port();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
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
                    .serve_connection(io, service_fn(upgrade))
                    .with_upgrades()
                    .await;
            });
        }
    })
}
