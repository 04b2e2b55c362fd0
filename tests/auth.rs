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
}
