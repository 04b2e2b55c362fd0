use shardnet::config::*;
use std::io::{Read, Write};
use std::net::TcpStream;
#[test]
fn smoke() {
    let mut c = Config::default();
    c.server.shards = Shards::Count(2.try_into().unwrap());
    c.server.pin = false;
    c.listeners.push(ListenerConfig {
        name: "echo".into(),
        addr: "127.0.0.1:0".parse().unwrap(),
        service: ServiceKind::Echo,
        backlog: 128,
        reuse_port: false,
    });
    let mut server =
        shardnet::server::Server::start(&c, |_, _| shardnet::service::echo::Echo).unwrap();
    let addr = server.addr("echo").unwrap();
    for i in 0..50 {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let data = vec![i as u8; 1000 * (i + 1)];
        let mut w = s.try_clone().unwrap();
        let d2 = data.clone();
        let t = std::thread::spawn(move || w.write_all(&d2).unwrap());
        let mut got = vec![0; data.len()];
        s.read_exact(&mut got).unwrap();
        t.join().unwrap();
        assert_eq!(got, data);
    }
    let snap = server.snapshot();
    eprintln!("{:?}", snap.total());
    assert!(server.shutdown());
}
