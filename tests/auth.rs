//! Authentication with tokens minted by PyJWT (and keys made by Python's `cryptography`):
//! libraries shardnet did not write, so a mistake shared by our signer and our verifier cannot
//! hide. `tests/auth/mint.py` makes the keys and the tokens.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};
use shardnet::app::auth::{Auth, Failure, PermTable};

use common::python_with;

/// A directory of keys made by `mint.py keys`, and the Python that mints tokens with them.
struct Keys {
    py: PathBuf,
    dir: PathBuf,
}

impl Keys {
    /// `None` (after the skip line `python_with` prints) without Python and PyPI.
    fn new(name: &str) -> Option<Keys> {
        let py = python_with(&[("jwt", "PyJWT"), ("cryptography", "cryptography")])?;
        let dir = std::env::temp_dir().join(format!("shardnet-auth-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let keys = Keys { py, dir };
        let out = Command::new(&keys.py)
            .arg(script())
            .arg("keys")
            .arg(&keys.dir)
            .output()
            .expect("run mint.py");
        assert!(
            out.status.success(),
            "mint.py keys: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(keys)
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }

    /// Tokens for `specs` (see mint.py), by name.
    fn mint(&self, specs: &Value) -> HashMap<String, String> {
        let mut child = Command::new(&self.py)
            .arg(script())
            .arg("mint")
            .arg(&self.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run mint.py");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(specs.to_string().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "mint.py mint: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("mint.py prints JSON")
    }

    /// `[auth]` with every kind of key: the HS256 secret (kid "hs"), the RSA and Ed25519 keys
    /// as PEM (kids "rsa-pem", "ed"), the two EC keys and the RSA key in the JWKS.
    fn auth_toml(&self, extra: &str) -> String {
        format!(
            "[auth]\nhs256_secret_file = \"{}\"\nhs256_kid = \"hs\"\njwks_file = \"{}\"\n\
             issuer = \"https://id.example\"\naudience = \"shardnet\"\nleeway = \"0s\"\n\
             max_token_size = \"2KiB\"\n{extra}\n\
             [[auth.public_key]]\nkid = \"rsa-pem\"\nalg = \"RS256\"\nfile = \"{}\"\n\
             [[auth.public_key]]\nkid = \"ed\"\nalg = \"EdDSA\"\nfile = \"{}\"\n",
            self.path("secret"),
            self.path("jwks.json"),
            self.path("rsa.pub"),
            self.path("ed.pub"),
        )
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn script() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/auth/mint.py"))
}

fn claims() -> Value {
    json!({
        "sub": "alice",
        "iss": "https://id.example",
        "aud": "shardnet",
        "subscribe": ["chat:*", "user:{sub}"],
        "publish": ["chat:{sub}"],
    })
}

fn with(k: &str, v: Value) -> Value {
    let mut c = claims();
    c[k] = v;
    c
}

fn load(keys: &Keys, extra: &str) -> Auth {
    let toml = format!(
        "{}[[listener]]\nname = \"h\"\naddr = \"127.0.0.1:0\"\nservice = \"http\"\n\
         [[listener.websocket]]\npath = \"/ws\"\nauth = \"required\"\n",
        keys.auth_toml(extra)
    );
    let config = common::config(&toml);
    Auth::load(&config.auth).expect("auth loads")
}

#[test]
fn pyjwt_tokens_of_every_algorithm_verify_and_each_bad_one_has_its_reason() {
    let Some(keys) = Keys::new("verify") else {
        return; // skipped: python_with said why
    };
    let auth = load(&keys, "");
    let specs = json!([
        {"name": "hs256", "key": "hs", "kid": "hs", "claims": claims(), "exp_in": 60},
        {"name": "rs256-pem", "key": "rsa", "kid": "rsa-pem", "claims": claims(), "exp_in": 60},
        {"name": "rs256-jwks", "key": "rsa", "kid": "rsa", "claims": claims(), "exp_in": 60},
        {"name": "es256-a", "key": "ec-a", "kid": "ec-a", "claims": claims(), "exp_in": 60},
        {"name": "es256-b", "key": "ec-b", "kid": "ec-b", "claims": claims(), "exp_in": 60},
        {"name": "eddsa", "key": "ed", "kid": "ed", "claims": claims(), "exp_in": 60},
        {"name": "expired", "key": "hs", "kid": "hs", "claims": claims(), "exp_in": -30},
        {"name": "no-exp", "key": "hs", "kid": "hs", "claims": claims()},
        {"name": "not-yet", "key": "ec-a", "kid": "ec-a",
         "claims": with("nbf", json!(4_000_000_000u64)), "exp_in": 60},
        {"name": "wrong-signature", "key": "other-hs", "kid": "hs", "claims": claims(),
         "exp_in": 60},
        {"name": "wrong-key-in-jwks", "key": "ec-b", "kid": "ec-a", "claims": claims(),
         "exp_in": 60},
        {"name": "wrong-issuer", "key": "hs", "kid": "hs",
         "claims": with("iss", json!("https://evil.example")), "exp_in": 60},
        {"name": "wrong-audience", "key": "ed", "kid": "ed",
         "claims": with("aud", json!(["other"])), "exp_in": 60},
        {"name": "alg-none", "key": "none", "kid": "hs", "claims": claims(), "exp_in": 60},
        {"name": "alg-none-no-kid", "key": "none", "claims": claims(), "exp_in": 60},
        {"name": "hs256-with-rsa-public-key", "key": "rsa-pub-as-hmac", "kid": "rsa",
         "claims": claims(), "exp_in": 60},
        {"name": "hs256-with-rsa-pem-public-key", "key": "rsa-pub-as-hmac", "kid": "rsa-pem",
         "claims": claims(), "exp_in": 60},
        {"name": "unknown-kid", "key": "ec-a", "kid": "retired", "claims": claims(),
         "exp_in": 60},
        {"name": "no-kid", "key": "hs", "claims": claims(), "exp_in": 60},
        {"name": "oversized", "key": "hs", "kid": "hs", "claims": claims(), "exp_in": 60,
         "pad": 3000},
        {"name": "bad-pattern", "key": "hs", "kid": "hs",
         "claims": with("subscribe", json!(["a*b"])), "exp_in": 60},
    ]);
    let t = keys.mint(&specs);
    for name in [
        "hs256",
        "rs256-pem",
        "rs256-jwks",
        "es256-a",
        "es256-b",
        "eddsa",
    ] {
        let v = auth
            .verify(t[name].as_bytes())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(&*v.perms.sub, "alice", "{name}");
        assert_eq!(v.perms.subscribe.len(), 2, "{name}");
    }
    let refused = [
        ("expired", Failure::Expired),
        ("no-exp", Failure::Claims),
        ("not-yet", Failure::NotYetValid),
        ("wrong-signature", Failure::Signature),
        ("wrong-key-in-jwks", Failure::Signature),
        ("wrong-issuer", Failure::Issuer),
        ("wrong-audience", Failure::Audience),
        ("alg-none", Failure::Unsigned),
        ("alg-none-no-kid", Failure::Unsigned),
        ("hs256-with-rsa-public-key", Failure::Algorithm),
        ("hs256-with-rsa-pem-public-key", Failure::Algorithm),
        ("unknown-kid", Failure::UnknownKey),
        // Every key here has a kid, so a token without one has no key.
        ("no-kid", Failure::UnknownKey),
        ("oversized", Failure::TooLarge),
        ("bad-pattern", Failure::Claims),
    ];
    for (name, want) in refused {
        assert_eq!(auth.verify(t[name].as_bytes()).err(), Some(want), "{name}");
    }
    assert_eq!(auth.verify(b"").err(), Some(Failure::Missing));
}

#[test]
fn permissions_from_pyjwt_claims() {
    let Some(keys) = Keys::new("perms") else {
        return; // skipped: python_with said why
    };
    let auth = load(&keys, "anonymous_subscribe = [\"public:*\"]");
    let t = keys.mint(&json!([
        {"name": "alice", "key": "ec-a", "kid": "ec-a", "claims": claims(), "exp_in": 60},
        {"name": "bob", "key": "ec-b", "kid": "ec-b",
         "claims": with("sub", json!("bob")), "exp_in": 60},
        {"name": "reader", "key": "ed", "kid": "ed",
         "claims": with("publish", Value::Null), "exp_in": 60},
        {"name": "scope-string", "key": "hs", "kid": "hs",
         "claims": with("subscribe", json!("news:* user:{sub}:*")), "exp_in": 60},
    ]));
    let mut table = PermTable::new(auth.anonymous_subscribe());
    let id = |table: &mut PermTable, name: &str| {
        let v = auth.verify(t[name].as_bytes()).unwrap();
        table.acquire(&v.perms)
    };
    let alice = id(&mut table, "alice");
    let bob = id(&mut table, "bob");
    let reader = id(&mut table, "reader");
    let scoped = id(&mut table, "scope-string");
    assert!(table.may_subscribe(alice, "chat:general"));
    assert!(table.may_subscribe(alice, "user:alice"));
    assert!(
        !table.may_subscribe(alice, "user:bob"),
        "{{sub}} expands to alice only"
    );
    assert!(table.may_subscribe(bob, "user:bob"));
    assert!(!table.may_subscribe(alice, "news:today"));
    assert!(table.may_publish(alice, "chat:alice"));
    assert!(!table.may_publish(alice, "chat:general"));
    assert!(
        !table.may_publish(reader, "chat:alice"),
        "no publish claim, no publishing"
    );
    assert!(
        table.may_subscribe(scoped, "news:x") && table.may_subscribe(scoped, "user:alice:inbox")
    );
    assert!(!table.may_subscribe(scoped, "chat:x"));
    let anon = shardnet::app::auth::PermId::ANONYMOUS;
    assert!(table.may_subscribe(anon, "public:lobby"));
    assert!(!table.may_subscribe(anon, "chat:general") && !table.may_publish(anon, "public:x"));
    // Alice, Bob and the reader share their subscribe list; the entries are theirs.
    assert_eq!(table.len(), 4);
}

/// `shardnet config check` prints where the secret is, never the secret, with the secret in a
/// file or in the environment; and a bad secret's error does not quote it either.
#[test]
fn config_check_never_prints_the_secret() {
    let Some(keys) = Keys::new("check") else {
        return; // skipped: python_with said why
    };
    let secret = std::fs::read_to_string(keys.dir.join("secret")).unwrap();
    let secret = secret.trim_end();
    let route = "[[listener]]\nname = \"h\"\naddr = \"127.0.0.1:0\"\nservice = \"http\"\n\
                 [[listener.websocket]]\npath = \"/ws\"\nauth = \"required\"\n";
    let check = |toml: &str, env: Option<&str>| {
        let file = keys.dir.join("check.toml");
        std::fs::write(&file, toml).unwrap();
        let mut cmd = Command::new(common::bin());
        cmd.args(["config", "check"]).arg(&file);
        if let Some(v) = env {
            cmd.env("SHARDNET_TEST_JWT_SECRET", v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = check(
        &format!(
            "[auth]\nhs256_secret_file = \"{}\"\n{route}",
            keys.path("secret")
        ),
        None,
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("hs256_secret_file = "), "{out}");
    assert!(!out.contains(secret) && !err.contains(secret));
    let env_toml = format!("[auth]\nhs256_secret_env = \"SHARDNET_TEST_JWT_SECRET\"\n{route}");
    let (code, out, err) = check(&env_toml, Some(secret));
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("hs256_secret_env = \"SHARDNET_TEST_JWT_SECRET\""),
        "{out}"
    );
    assert!(!out.contains(secret) && !err.contains(secret));
    let short = "short-but-still-secret";
    let (code, out, err) = check(&env_toml, Some(short));
    assert_eq!(code, Some(2));
    assert!(
        err.contains("check.toml:2:1: key `auth.hs256_secret_env`:")
            && err.contains("holds 22 bytes"),
        "{err}"
    );
    assert!(!out.contains(short) && !err.contains(short), "{err}");
    let (code, _, err) = check(&env_toml, None);
    assert_eq!(code, Some(2));
    assert!(err.contains("SHARDNET_TEST_JWT_SECRET is not set"), "{err}");
    // A key file that is not there: its key and line, and the OS error once.
    let missing = keys.path("no-such-jwks.json");
    let (code, _, err) = check(
        &format!("[auth]\n\njwks_file = \"{missing}\"\n{route}"),
        None,
    );
    assert_eq!(code, Some(2));
    assert_eq!(
        err.trim_end(),
        format!(
            "{}:3:1: key `auth.jwks_file`: {missing}: cannot read: No such file or directory \
             (os error 2)",
            keys.dir.join("check.toml").display()
        )
    );
}

// ---- The server: upgrades, permissions, expiry, refresh, API keys, rate limit ----

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use shardnet::service::ws;

const UPGRADE: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                       Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

/// A server with `[auth]` from `keys` plus `auth_extra`, one shard unless `shards` says, an
/// HTTP listener with a required pub/sub route `/ws`, an optional one `/ws/open` and an
/// unauthenticated one `/ws/off`, each with `route_extra`.
fn auth_server(keys: &Keys, shards: usize, auth_extra: &str, route_extra: &str) -> String {
    format!(
        "[server]\nshards = {shards}\npin = false\nstats_interval = \"0s\"\nshutdown_timeout = \"2s\"\n\
         {}\
         [[listener]]\nname = \"http\"\naddr = \"127.0.0.1:0\"\nservice = \"http\"\n\
         [[listener.websocket]]\npath = \"/ws\"\nauth = \"required\"\n{route_extra}\n\
         [[listener.websocket]]\npath = \"/ws/open\"\nauth = \"optional\"\n{route_extra}\n\
         [[listener.websocket]]\npath = \"/ws/off\"\n{route_extra}\n",
        keys.auth_toml(auth_extra)
    )
}

/// The upgrade's answer: (status, head, body) and the stream, with `token` in the header.
fn upgrade(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String, String, TcpStream) {
    let mut s = common::connect(addr);
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{UPGRADE}{auth}\r\n");
    let (status, head, body) = common::http_exchange(&mut s, req.as_bytes());
    (status, head, String::from_utf8_lossy(&body).into_owned(), s)
}

#[track_caller]
fn ws_open(addr: SocketAddr, path: &str, token: Option<&str>) -> TcpStream {
    let (status, head, body, s) = upgrade(addr, path, token);
    assert_eq!(status, 101, "{head}{body}");
    s
}

fn send_text(s: &mut TcpStream, text: &str) {
    let mut f = Vec::new();
    ws::write_masked(&mut f, ws::OP_TEXT, true, text.as_bytes(), [1, 2, 3, 4]);
    s.write_all(&f).unwrap();
}

fn op(s: &mut TcpStream, v: Value) {
    send_text(s, &v.to_string());
}

/// The next frame: (opcode, payload), answering pings on the way; `None` at end of stream.
fn next_frame(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((opcode, _, range, used)) = ws::decode_server_frame(&buf).unwrap() {
            let payload = buf[range].to_vec();
            buf.drain(..used);
            if opcode == ws::OP_PING {
                let mut f = Vec::new();
                ws::write_masked(&mut f, ws::OP_PONG, true, &payload, [5, 6, 7, 8]);
                let _ = s.write_all(&f);
                if !buf.is_empty() {
                    continue;
                }
                // Frames are read one byte run at a time: nothing else is buffered here.
                continue;
            }
            assert!(buf.is_empty(), "more than one frame read at once");
            return Some((opcode, payload));
        }
        // One byte at a time: a frame never spills into the next read.
        match s.read(&mut chunk[..1]) {
            Ok(1) => buf.push(chunk[0]),
            _ => return None,
        }
    }
}

/// The next text message as JSON (pings answered); panics on a close or the end of stream.
#[track_caller]
fn reply(s: &mut TcpStream) -> Value {
    match next_frame(s) {
        Some((ws::OP_TEXT, p)) => serde_json::from_slice(&p).unwrap(),
        other => panic!("expected a text message, got {other:?}"),
    }
}

/// Reads until a close frame; its code.
#[track_caller]
fn close_code(s: &mut TcpStream) -> u16 {
    loop {
        match next_frame(s) {
            Some((ws::OP_CLOSE, p)) => return u16::from_be_bytes([p[0], p[1]]),
            Some(_) => {}
            None => panic!("the stream ended without a close frame"),
        }
    }
}

fn post(addr: SocketAddr, path: &str, key: Option<&str>, body: &str) -> (u16, String, String) {
    let mut s = common::connect(addr);
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (status, head, body) = common::http_exchange(&mut s, req.as_bytes());
    (status, head, String::from_utf8_lossy(&body).into_owned())
}

fn stats(addr: SocketAddr) -> Value {
    let mut s = common::connect(addr);
    let (status, _, body) =
        common::http_exchange(&mut s, b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 200);
    serde_json::from_slice(&body).unwrap()
}

#[test]
fn a_required_route_answers_401_with_the_reason_and_counts_it() {
    let Some(keys) = Keys::new("required") else {
        return; // skipped: python_with said why
    };
    let server = common::start_router(&auth_server(&keys, 2, "", ""));
    let addr = server.addr("http").unwrap();
    let t = keys.mint(&json!([
        {"name": "good", "key": "ec-a", "kid": "ec-a", "claims": claims(), "exp_in": 60},
        {"name": "expired", "key": "hs", "kid": "hs", "claims": claims(), "exp_in": -30},
        {"name": "wrong-signature", "key": "other-hs", "kid": "hs", "claims": claims(),
         "exp_in": 60},
        {"name": "wrong-issuer", "key": "ed", "kid": "ed",
         "claims": with("iss", json!("https://evil.example")), "exp_in": 60},
        {"name": "wrong-audience", "key": "rsa", "kid": "rsa",
         "claims": with("aud", json!("other")), "exp_in": 60},
        {"name": "alg-none", "key": "none", "kid": "hs", "claims": claims(), "exp_in": 60},
        {"name": "confused", "key": "rsa-pub-as-hmac", "kid": "rsa", "claims": claims(),
         "exp_in": 60},
        {"name": "unknown-kid", "key": "ec-b", "kid": "retired", "claims": claims(),
         "exp_in": 60},
        {"name": "oversized", "key": "hs", "kid": "hs", "claims": claims(), "exp_in": 60,
         "pad": 3000},
    ]));
    let cases = [
        (None, "missing"),
        (Some("expired"), "expired"),
        (Some("wrong-signature"), "signature"),
        (Some("wrong-issuer"), "issuer"),
        (Some("wrong-audience"), "audience"),
        (Some("alg-none"), "unsigned"),
        (Some("confused"), "algorithm"),
        (Some("unknown-kid"), "unknown_key"),
        (Some("oversized"), "too_large"),
    ];
    for (name, reason) in cases {
        let token = name.map(|n| t[n].as_str());
        let (status, head, body, _) = upgrade(addr, "/ws", token);
        assert_eq!(status, 401, "{name:?}: {head}{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"], reason, "{name:?}: {body}");
        assert_eq!(
            v["refresh"],
            reason == "expired" || reason == "missing",
            "{body}"
        );
        assert!(
            head.contains("WWW-Authenticate: Bearer realm=\"shardnet\""),
            "{head}"
        );
        if reason != "missing" {
            assert!(
                head.contains(&format!("error_description=\"{reason}\"")),
                "{head}"
            );
            assert!(!body.contains(token.unwrap()) && !head.contains(token.unwrap()));
        }
    }
    // The same refusals on the optional route, where a bad token is no anonymous pass.
    assert_eq!(upgrade(addr, "/ws/open", Some(&t["expired"])).0, 401);
    // A good token opens the route, in the header or the query.
    let _header = ws_open(addr, "/ws", Some(&t["good"]));
    let mut query = common::connect(addr);
    let req = format!(
        "GET /ws?token={} HTTP/1.1\r\nHost: x\r\n{UPGRADE}\r\n",
        t["good"]
    );
    assert_eq!(common::http_exchange(&mut query, req.as_bytes()).0, 101);
    // The route without auth looks at no token at all.
    let _off = ws_open(addr, "/ws/off", Some(&t["expired"]));
    // Counted by reason, over both shards (the optional route's refusal is one more expired).
    let st = stats(addr);
    let f = &st["auth_failures"];
    for (_, reason) in cases {
        let want = if reason == "expired" { 2 } else { 1 };
        assert_eq!(f[reason], want, "{reason}: {f}");
    }
    assert_eq!(f["claims"], 0);
    common::wait_until(
        Duration::from_secs(5),
        "two authenticated connections",
        || stats(addr)["services_total"]["ws_authenticated"] == 2,
    );
}

#[test]
fn query_tokens_can_be_refused() {
    let Some(keys) = Keys::new("query") else {
        return; // skipped: python_with said why
    };
    let server = common::start_router(&auth_server(&keys, 1, "query_token = false", ""));
    let addr = server.addr("http").unwrap();
    let t = keys.mint(&json!([
        {"name": "good", "key": "hs", "kid": "hs", "claims": claims(), "exp_in": 60},
    ]));
    let mut s = common::connect(addr);
    let req = format!(
        "GET /ws?token={} HTTP/1.1\r\nHost: x\r\n{UPGRADE}\r\n",
        t["good"]
    );
    let (status, _, body) = common::http_exchange(&mut s, req.as_bytes());
    assert_eq!(status, 401);
    assert!(String::from_utf8_lossy(&body).contains("\"missing\""));
    ws_open(addr, "/ws", Some(&t["good"]));
}

#[test]
fn permissions_decide_what_a_connection_may_subscribe_to_and_publish_on() {
    let Some(keys) = Keys::new("server-perms") else {
        return; // skipped: python_with said why
    };
    let server = common::start_router(&auth_server(
        &keys,
        2,
        "anonymous_subscribe = [\"public:*\"]",
        "",
    ));
    let addr = server.addr("http").unwrap();
    let t = keys.mint(&json!([
        {"name": "alice", "key": "ec-a", "kid": "ec-a", "claims": claims(), "exp_in": 60},
        {"name": "reader", "key": "hs", "kid": "hs",
         "claims": with("publish", Value::Null), "exp_in": 60},
    ]));
    let mut alice = ws_open(addr, "/ws", Some(&t["alice"]));
    for (topic, allowed) in [
        ("chat:general", true),
        ("news:today", false),
        ("user:alice", true),
        ("user:bob", false),
    ] {
        op(&mut alice, json!({"op": "subscribe", "topic": topic}));
        let r = reply(&mut alice);
        if allowed {
            assert_eq!(r, json!({"ok": "subscribe", "topic": topic}));
        } else {
            assert_eq!(r["op"], "subscribe", "{r}");
            assert_eq!(r["topic"], topic, "{r}");
            assert_eq!(r["reason"], "forbidden", "{r}");
            let e = r["error"].as_str().unwrap();
            assert!(e.contains(topic) && e.contains("subscribe claim"), "{e}");
            assert!(r.get("ok").is_none(), "never acknowledged: {r}");
        }
    }
    // Publishing: only chat:alice ({sub} expanded) is in alice's publish claim.
    op(
        &mut alice,
        json!({"op": "publish", "topic": "chat:general", "data": 1}),
    );
    let r = reply(&mut alice);
    assert_eq!(
        (r["op"].as_str(), r["reason"].as_str()),
        (Some("publish"), Some("forbidden"))
    );
    assert!(r["error"].as_str().unwrap().contains("chat:general"), "{r}");
    let mut reader = ws_open(addr, "/ws", Some(&t["reader"]));
    op(
        &mut reader,
        json!({"op": "subscribe", "topic": "chat:alice"}),
    );
    assert_eq!(reply(&mut reader)["ok"], "subscribe");
    op(
        &mut alice,
        json!({"op": "publish", "topic": "chat:alice", "data": "hi"}),
    );
    assert_eq!(
        reply(&mut reader),
        json!({"topic": "chat:alice", "data": "hi"})
    );
    // Without a publish claim, no publishing.
    op(
        &mut reader,
        json!({"op": "publish", "topic": "chat:alice", "data": 2}),
    );
    let r = reply(&mut reader);
    assert_eq!(r["reason"], "forbidden", "{r}");
    assert!(
        r["error"].as_str().unwrap().contains("publish claim"),
        "{r}"
    );
    // Anonymous on the optional route: anonymous_subscribe only, and never publish.
    let mut anon = ws_open(addr, "/ws/open", None);
    op(
        &mut anon,
        json!({"op": "subscribe", "topic": "public:lobby"}),
    );
    assert_eq!(reply(&mut anon)["ok"], "subscribe");
    op(
        &mut anon,
        json!({"op": "subscribe", "topic": "chat:general"}),
    );
    let r = reply(&mut anon);
    assert!(r["error"].as_str().unwrap().contains("send a token"), "{r}");
    op(
        &mut anon,
        json!({"op": "publish", "topic": "public:lobby", "data": 3}),
    );
    assert_eq!(reply(&mut anon)["reason"], "forbidden");
    // The application publishes anywhere (no api_keys_file here).
    let (status, _, body) = post(addr, "/publish/public:lobby", None, "\"welcome\"");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        reply(&mut anon),
        json!({"topic": "public:lobby", "data": "welcome"})
    );
    // The route without auth is as before: anything goes.
    let mut off = ws_open(addr, "/ws/off", None);
    op(&mut off, json!({"op": "subscribe", "topic": "news:today"}));
    assert_eq!(reply(&mut off)["ok"], "subscribe");
    op(&mut off, json!({"op": "refresh", "token": "x.y.z"}));
    assert!(reply(&mut off)["error"]
        .as_str()
        .unwrap()
        .contains("no tokens"));
    let st = stats(addr);
    assert_eq!(st["services_total"]["auth_denied"], 6, "{st}");
    assert_eq!(st["services_total"]["ws_authenticated"], 2, "{st}");
    assert_eq!(st["services_total"]["ws_anonymous"], 1, "{st}");
}

/// An absolute `exp` at least `secs` and less than `secs + 1` seconds away, on a second
/// boundary, so that the expiry is known to within a second whatever minting costs.
fn exp_in(secs: u64) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    now.as_secs() + 1 + secs
}

fn until_unix(exp: u64) -> Duration {
    let end = std::time::UNIX_EPOCH + Duration::from_secs(exp);
    end.duration_since(std::time::SystemTime::now())
        .unwrap_or(Duration::ZERO)
}

#[test]
fn tokens_expire_on_live_connections_unless_refreshed() {
    let Some(keys) = Keys::new("expiry") else {
        return; // skipped: python_with said why
    };
    // A heartbeat shorter than the token's life: the one timer serves both.
    let server = common::start_router(&auth_server(&keys, 1, "", "ping_interval = \"700ms\""));
    let addr = server.addr("http").unwrap();
    // Two seconds and then some: minting under load must not eat the whole life.
    let short = exp_in(3);
    let mut narrow = claims();
    narrow["subscribe"] = json!(["user:{sub}"]);
    let t = keys.mint(&json!([
        {"name": "short", "key": "hs", "kid": "hs", "claims": with("exp", json!(short))},
        {"name": "long", "key": "ec-a", "kid": "ec-a", "claims": claims(), "exp_in": 60},
        {"name": "narrow", "key": "ed", "kid": "ed", "claims": narrow, "exp_in": 60},
        {"name": "bob", "key": "hs", "kid": "hs", "claims": with("sub", json!("bob")),
         "exp_in": 60},
        {"name": "expired", "key": "hs", "kid": "hs", "claims": claims(), "exp_in": -10},
    ]));
    let mut expiring = ws_open(addr, "/ws", Some(&t["short"]));
    let mut refreshed = ws_open(addr, "/ws", Some(&t["short"]));
    let mut narrowed = ws_open(addr, "/ws", Some(&t["short"]));
    for topic in ["chat:a", "user:alice"] {
        op(&mut narrowed, json!({"op": "subscribe", "topic": topic}));
        assert_eq!(reply(&mut narrowed)["ok"], "subscribe");
    }
    // About two seconds before the expiry: the refreshes. One for another subject, one
    // expired: refused, nothing changes. Then the good ones.
    std::thread::sleep(until_unix(short - 2));
    op(&mut refreshed, json!({"op": "refresh", "token": t["bob"]}));
    let r = reply(&mut refreshed);
    assert_eq!(
        (r["op"].as_str(), r["reason"].as_str()),
        (Some("refresh"), Some("subject")),
        "{r}"
    );
    op(
        &mut refreshed,
        json!({"op": "refresh", "token": t["expired"]}),
    );
    assert_eq!(reply(&mut refreshed)["reason"], "expired");
    op(&mut refreshed, json!({"op": "refresh", "token": t["long"]}));
    let r = reply(&mut refreshed);
    assert_eq!(r["ok"], "refresh", "{r}");
    assert_eq!(r["unsubscribed"], json!([]));
    op(
        &mut narrowed,
        json!({"op": "refresh", "token": t["narrow"]}),
    );
    let r = reply(&mut narrowed);
    assert_eq!(r["ok"], "refresh", "{r}");
    assert_eq!(r["unsubscribed"], json!(["chat:a"]), "the client is told");

    // At exp (leeway 0s): 4001 for the one that did not refresh.
    let start = Instant::now();
    assert_eq!(
        close_code(&mut expiring),
        shardnet::app::auth::CLOSE_TOKEN_EXPIRED
    );
    let late = start.elapsed();
    assert!(
        until_unix(short) == Duration::ZERO && late < until_unix(short) + Duration::from_secs(3),
        "closed at the expiry, not before: {late:?}"
    );
    // Past it, the refreshed ones are open: the narrowed one hears only what it may.
    std::thread::sleep(Duration::from_millis(300));
    post(addr, "/publish/chat:a", None, "1");
    post(addr, "/publish/user:alice", None, "2");
    assert_eq!(
        reply(&mut narrowed),
        json!({"topic": "user:alice", "data": 2})
    );
    op(
        &mut refreshed,
        json!({"op": "subscribe", "topic": "chat:b"}),
    );
    assert_eq!(reply(&mut refreshed)["ok"], "subscribe");
    drop(expiring);
    common::wait_until(
        Duration::from_secs(5),
        "the expired connection gone",
        || stats(addr)["services_total"]["ws_authenticated"] == 2,
    );
    let st = stats(addr);
    let total = &st["services_total"];
    assert_eq!(total["auth_expired"], 1, "{st}");
    assert_eq!(total["auth_refreshed"], 2, "{st}");
    assert_eq!(total["auth_refresh_refused"], 2, "{st}");
    assert_eq!(total["auth_unsubscribed"], 1, "{st}");
    assert!(total["ws_pings"].as_u64().unwrap() >= 1, "{st}");
}

#[test]
fn the_publish_api_and_the_admin_routes_need_their_keys() {
    let Some(keys) = Keys::new("api-keys") else {
        return; // skipped: python_with said why
    };
    std::fs::write(
        keys.dir.join("publish-keys"),
        "# the backend\nk_backend_0123456789abcdef\nk_newsjob_0123456789abcdef news:*\n",
    )
    .unwrap();
    std::fs::write(keys.dir.join("admin-keys"), "k_admin_0123456789abcdef\n").unwrap();
    let extra = format!(
        "api_keys_file = \"{}\"\nadmin_api_keys_file = \"{}\"",
        keys.path("publish-keys"),
        keys.path("admin-keys")
    );
    let server = common::start_router(&auth_server(&keys, 1, &extra, ""));
    let addr = server.addr("http").unwrap();
    let (status, head, body) = post(addr, "/publish/chat:x", None, "1");
    assert_eq!(status, 401, "{head}");
    assert!(
        head.contains("WWW-Authenticate: Bearer realm=\"shardnet\"\r\n"),
        "{head}"
    );
    assert!(body.contains("missing_key"), "{body}");
    let (status, head, body) = post(
        addr,
        "/publish/chat:x",
        Some("k_backend_0123456789abcdeX"),
        "1",
    );
    assert_eq!(status, 401, "{head}");
    assert!(head.contains("error=\"invalid_token\"") && body.contains("wrong_key"));
    let (status, _, body) = post(
        addr,
        "/publish/chat:x",
        Some("k_backend_0123456789abcdef"),
        "1",
    );
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = post(
        addr,
        "/publish/chat:x",
        Some("k_newsjob_0123456789abcdef"),
        "1",
    );
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("topic_not_allowed") && body.contains("chat:x"),
        "{body}"
    );
    let (status, _, _) = post(
        addr,
        "/publish/news:x",
        Some("k_newsjob_0123456789abcdef"),
        "1",
    );
    assert_eq!(status, 200);
    // Admin routes: 401 without the admin key (a publish key is not one); /healthz is open.
    let get = |path: &str, key: Option<&str>| {
        let mut s = common::connect(addr);
        let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n");
        common::http_exchange(&mut s, req.as_bytes()).0
    };
    assert_eq!(get("/metrics", None), 401);
    assert_eq!(get("/stats", Some("k_backend_0123456789abcdef")), 401);
    assert_eq!(get("/healthz", None), 200);
    assert_eq!(get("/metrics", Some("k_admin_0123456789abcdef")), 200);
    let mut s = common::connect(addr);
    let (_, _, body) = common::http_exchange(
        &mut s,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k_admin_0123456789abcdef\r\n\r\n",
    );
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("shardnet_api_key_refused_total{shard=\"0\"} 5"),
        "{text}"
    );
    assert!(
        text.contains("shardnet_auth_failures_total{shard=\"0\",reason=\"expired\"} 0"),
        "{text}"
    );
    assert!(!text.contains("0123456789abcdef"), "a key in the metrics");
}

#[test]
fn a_client_over_the_rate_limit_is_refused_then_closed_and_its_neighbours_are_not() {
    let Some(keys) = Keys::new("rate") else {
        return; // skipped: python_with said why
    };
    // One shard: the flood and its neighbour share it.
    let server = common::start_router(&auth_server(
        &keys,
        1,
        "command_rate = 100\ncommand_burst = 20",
        "max_topics = 100000",
    ));
    let addr = server.addr("http").unwrap();
    let t = keys.mint(&json!([
        {"name": "a", "key": "hs", "kid": "hs", "claims": claims(), "exp_in": 60},
    ]));
    let mut neighbour = ws_open(addr, "/ws", Some(&t["a"]));
    op(
        &mut neighbour,
        json!({"op": "subscribe", "topic": "chat:quiet"}),
    );
    assert_eq!(reply(&mut neighbour)["ok"], "subscribe");

    let mut flood = ws_open(addr, "/ws", Some(&t["a"]));
    // 10,000 subscribes in one burst, far past 100 per second.
    let mut burst = Vec::new();
    for i in 0..10_000 {
        let text = json!({"op": "subscribe", "topic": format!("chat:{i}")}).to_string();
        ws::write_masked(&mut burst, ws::OP_TEXT, true, text.as_bytes(), [1, 2, 3, 4]);
    }
    let mut writer = flood.try_clone().unwrap();
    // The server stops reading once it closes: the write may fail, and that is the point.
    let sender = std::thread::spawn(move || writer.write_all(&burst).is_ok());
    let (mut acks, mut refused) = (0, 0);
    let code = loop {
        match next_frame(&mut flood) {
            Some((ws::OP_TEXT, p)) => {
                let v: Value = serde_json::from_slice(&p).unwrap();
                if v["ok"] == "subscribe" {
                    acks += 1;
                } else {
                    assert!(
                        v["error"].as_str().unwrap().starts_with("rate limit"),
                        "{v}"
                    );
                    refused += 1;
                }
            }
            Some((ws::OP_CLOSE, p)) => break u16::from_be_bytes([p[0], p[1]]),
            other => panic!("unexpected {other:?} after {acks} acks, {refused} refusals"),
        }
    };
    assert_eq!(code, 1008);
    assert!(
        (20..=60).contains(&acks),
        "the burst and the rate, no more: {acks}"
    );
    assert!(refused >= 19, "refusals came before the close: {refused}");
    let _ = sender.join();
    // The neighbour on the same shard: still served, its own bucket full.
    let (status, _, _) = post(addr, "/publish/chat:quiet", None, "\"still here\"");
    assert_eq!(status, 200);
    assert_eq!(
        reply(&mut neighbour),
        json!({"topic": "chat:quiet", "data": "still here"})
    );
    op(
        &mut neighbour,
        json!({"op": "subscribe", "topic": "chat:more"}),
    );
    assert_eq!(reply(&mut neighbour)["ok"], "subscribe");
    // A route without auth is limited too (its connections keep a bucket while a rate is set).
    let mut off = ws_open(addr, "/ws/off", None);
    let mut burst = Vec::new();
    for i in 0..25 {
        let text = json!({"op": "subscribe", "topic": format!("t{i}")}).to_string();
        ws::write_masked(&mut burst, ws::OP_TEXT, true, text.as_bytes(), [1, 2, 3, 4]);
    }
    off.write_all(&burst).unwrap();
    let answers: Vec<Value> = (0..25).map(|_| reply(&mut off)).collect();
    let limited = answers.iter().filter(|v| v.get("error").is_some()).count();
    assert!((1..=5).contains(&limited), "{answers:?}");
    let st = stats(addr);
    assert_eq!(st["services_total"]["rate_limit_closes"], 1, "{st}");
    assert_eq!(
        st["services_total"]["rate_limited"].as_u64().unwrap(),
        refused + limited as u64,
        "{st}"
    );
}

/// SIGHUP reloads the key files: a rotated API key and a rotated JWKS key are taken at once,
/// the old ones refused, and a connection made with the old key's token lives on.
#[test]
fn sighup_rotates_api_keys_and_token_keys() {
    let Some(keys) = Keys::new("rotate") else {
        return; // skipped: python_with said why
    };
    let jwks: Value =
        serde_json::from_str(&std::fs::read_to_string(keys.dir.join("jwks.json")).unwrap())
            .unwrap();
    let only = |kid: &str| {
        let list: Vec<&Value> = jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|k| k["kid"] == kid)
            .collect();
        json!({ "keys": list }).to_string()
    };
    let jwks_path = keys.dir.join("live-jwks.json");
    let api_path = keys.dir.join("live-api-keys");
    std::fs::write(&jwks_path, only("ec-a")).unwrap();
    std::fs::write(&api_path, "k_old_0123456789abcdef\n").unwrap();
    let toml = format!(
        "[server]\nshards = 2\npin = false\nstats_interval = \"0s\"\nshutdown_timeout = \"2s\"\n\
         [auth]\njwks_file = \"{}\"\napi_keys_file = \"{}\"\nleeway = \"0s\"\n\
         [[listener]]\nname = \"http\"\naddr = \"127.0.0.1:0\"\nservice = \"http\"\n\
         [[listener.websocket]]\npath = \"/ws\"\nauth = \"required\"\n",
        jwks_path.display(),
        api_path.display()
    );
    let server = common::Child::spawn(&toml, "");
    let addr = server.addr("http");
    let plain = json!({"sub": "alice", "subscribe": ["chat:*"]});
    let t = keys.mint(&json!([
        {"name": "a", "key": "ec-a", "kid": "ec-a", "claims": plain, "exp_in": 60},
        {"name": "b", "key": "ec-b", "kid": "ec-b", "claims": plain, "exp_in": 60},
    ]));
    let mut old = ws_open(addr, "/ws", Some(&t["a"]));
    op(&mut old, json!({"op": "subscribe", "topic": "chat:x"}));
    assert_eq!(reply(&mut old)["ok"], "subscribe");
    assert_eq!(upgrade(addr, "/ws", Some(&t["b"])).0, 401);
    assert_eq!(
        post(addr, "/publish/chat:x", Some("k_new_0123456789abcdef"), "0").0,
        401
    );

    std::fs::write(&jwks_path, only("ec-b")).unwrap();
    std::fs::write(&api_path, "k_new_0123456789abcdef\n").unwrap();
    server.signal("HUP");
    server.wait_for_state("RELOADING=1", Duration::from_secs(5));
    server.wait_for_state("READY=1", Duration::from_secs(5));
    let (status, _, body) = post(addr, "/publish/chat:x", Some("k_old_0123456789abcdef"), "1");
    assert_eq!(status, 401, "the old key is gone: {body}");
    let (status, _, body) = post(addr, "/publish/chat:x", Some("k_new_0123456789abcdef"), "2");
    assert_eq!(status, 200, "{body}");
    // Made with the old key's token, the connection lives on and hears the publish.
    assert_eq!(reply(&mut old), json!({"topic": "chat:x", "data": 2}));
    let (status, _, body, _) = upgrade(addr, "/ws", Some(&t["a"]));
    assert_eq!(status, 401);
    assert!(body.contains("unknown_key"), "{body}");
    ws_open(addr, "/ws", Some(&t["b"]));
    let log = server.log();
    assert!(log.contains("auth: 1 token keys [ec-b:ES256]"), "{log}");
    assert!(
        !log.contains("k_new_") && !log.contains(&t["a"]),
        "a secret in the log:\n{log}"
    );
}

#[test]
fn bench_carries_minted_tokens_on_connect_and_idle_runs() {
    let Some(keys) = Keys::new("bench") else {
        return; // skipped: python_with said why
    };
    let server = common::start_router(&auth_server(&keys, 1, "", ""));
    let target = server.addr("http").unwrap().to_string();
    let bench = |extra: &[&str]| {
        let out = Command::new(common::bin())
            .args([
                "bench",
                "--target",
                &target,
                "--duration",
                "500ms",
                "--warmup",
                "100ms",
            ])
            .args(["--client-cores", "0", "-c", "4"])
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let hs = format!("HS256:{}", keys.path("secret"));
    let es = format!("ES256:{}", keys.path("ec-a.key"));
    let claims = "{\"iss\":\"https://id.example\",\"aud\":\"shardnet\",\"kid\":\"hs\"}";
    let es_claims = "{\"iss\":\"https://id.example\",\"aud\":\"shardnet\",\"kid\":\"ec-a\"}";
    let (code, text) = bench(&["--mode", "connect", "--mint", &hs, "--mint-claims", claims]);
    assert_eq!(code, Some(0), "{text}");
    let (code, text) = bench(&[
        "--mode",
        "connect",
        "--mint",
        &es,
        "--mint-claims",
        es_claims,
    ]);
    assert_eq!(code, Some(0), "{text}");
    let (code, text) = bench(&[
        "--mode",
        "idle",
        "--idle-ws",
        "--path",
        "/ws",
        "--mint",
        &es,
        "--mint-claims",
        es_claims,
        "--token-in-query",
    ]);
    assert_eq!(code, Some(0), "{text}");
    // Without tokens the required route refuses every connection, and the bench says so.
    let (code, text) = bench(&["--mode", "connect", "--upgrade", "--path", "/ws"]);
    assert_ne!(code, Some(0), "{text}");
    assert!(text.contains("401"), "{text}");
    let st = stats(server.addr("http").unwrap());
    assert!(
        st["services_total"]["ws_upgrades"].as_u64().unwrap() >= 4,
        "{st}"
    );
}
