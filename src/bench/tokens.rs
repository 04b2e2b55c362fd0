//! Tokens for the load: what `--token`, `--token-file` and `--mint` give every WebSocket
//! upgrade (and, with them, every `--mode connect` connection), so that the cost of verifying
//! tokens can be measured (connect rate, server CPU per verified connection) and the memory of
//! an authenticated connection compared with an anonymous one (`--mode idle --idle-ws`).
//!
//! `--mint ALG:KEYFILE` signs the tokens here, before anything is measured: one per connection
//! (at most [`MAX_MINTED`], cycled beyond), each with its own `sub` (`bench-0`, `bench-1`, …),
//! an `exp` a day away and `subscribe: ["*"]`, plus `--mint-claims`. ALG is HS256 (KEYFILE holds
//! the secret, as the server's `hs256_secret_file`), ES256, RS256 or EdDSA (KEYFILE a PEM private
//! key). A token is sent as `Authorization: Bearer` unless `--token-in-query` puts it in the
//! URL as `?token=`.

use std::path::Path;

use anyhow::{bail, Context};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Map, Value};

use super::args::BenchArgs;

/// Tokens minted at most; connections beyond reuse them in turn.
pub const MAX_MINTED: usize = 100_000;

/// The tokens the arguments ask for (empty: none).
pub fn from_args(args: &BenchArgs) -> anyhow::Result<Vec<String>> {
    if let Some(t) = &args.token {
        return Ok(vec![t.trim().to_string()]);
    }
    if let Some(path) = &args.token_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--token-file {}", path.display()))?;
        let tokens: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        if tokens.is_empty() {
            bail!("--token-file {}: no token in it", path.display());
        }
        return Ok(tokens);
    }
    match &args.mint {
        Some(spec) => {
            let extra = match &args.mint_claims {
                Some(json) => serde_json::from_str::<Map<String, Value>>(json)
                    .context("--mint-claims: not a JSON object")?,
                None => Map::new(),
            };
            mint(
                spec,
                args.mint_first,
                args.connections.clamp(1, MAX_MINTED),
                &extra,
            )
        }
        None => Ok(Vec::new()),
    }
}

/// `count` tokens signed as `spec` (`ALG:KEYFILE`) says, for subjects `bench-{first}` on.
pub fn mint(
    spec: &str,
    first: usize,
    count: usize,
    extra: &Map<String, Value>,
) -> anyhow::Result<Vec<String>> {
    let (alg, file) = spec
        .split_once(':')
        .context("--mint takes ALG:KEYFILE, e.g. ES256:/path/key.pem")?;
    let bytes = std::fs::read(Path::new(file)).with_context(|| format!("--mint key {file}"))?;
    let (alg, key) = match alg {
        "HS256" => {
            let secret = bytes.trim_ascii_end();
            (Algorithm::HS256, EncodingKey::from_secret(secret)?)
        }
        "ES256" => (Algorithm::ES256, EncodingKey::from_ec_pem(&bytes)?),
        "RS256" => (Algorithm::RS256, EncodingKey::from_rsa_pem(&bytes)?),
        "EdDSA" => (Algorithm::EdDSA, EncodingKey::from_ed_pem(&bytes)?),
        other => bail!("--mint: algorithm {other} is not one of HS256, ES256, RS256, EdDSA"),
    };
    let exp = jsonwebtoken::get_current_timestamp() + 86_400;
    let mut header = Header::new(alg);
    if let Some(Value::String(kid)) = extra.get("kid") {
        header.kid = Some(kid.clone());
    }
    (first..first + count)
        .map(|i| {
            let mut claims = Map::new();
            claims.insert("sub".into(), format!("bench-{i}").into());
            claims.insert("exp".into(), exp.into());
            claims.insert("subscribe".into(), vec!["*"].into());
            for (k, v) in extra.iter().filter(|(k, _)| *k != "kid") {
                claims.insert(k.clone(), v.clone());
            }
            jsonwebtoken::encode(&header, &claims, &key).context("--mint: signing failed")
        })
        .collect()
}

/// A WebSocket upgrade request for `path` on `host`, with `token` if there is one and `extra`
/// header lines (each ending in CRLF).
pub fn upgrade_request(
    path: &str,
    host: &str,
    token: Option<&str>,
    in_query: bool,
    extra: &str,
) -> String {
    let (query, auth_line) = match token {
        Some(t) if in_query => (format!("?token={t}"), String::new()),
        Some(t) => (String::new(), format!("Authorization: Bearer {t}\r\n")),
        None => (String::new(), String::new()),
    };
    format!(
        "GET {path}{query} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{auth_line}{extra}\r\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_verify_with_the_servers_verifier() {
        let dir = std::env::temp_dir().join(format!("shardnet-bench-mint-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("secret");
        std::fs::write(&secret, "0123456789abcdef0123456789abcdef-bench\n").unwrap();
        let es = concat!(env!("CARGO_MANIFEST_DIR"), "/src/app/auth/testdata/ec.key");
        let mut extra = Map::new();
        extra.insert("aud".into(), "shardnet".into());
        let hs = mint(&format!("HS256:{}", secret.display()), 0, 3, &extra).unwrap();
        let ec = mint(&format!("ES256:{es}"), 0, 2, &Map::new()).unwrap();
        let cfg = crate::config::AuthConfig {
            hs256_secret_file: secret.display().to_string(),
            audience: "shardnet".into(),
            public_keys: vec![crate::config::PublicKeyConfig {
                kid: "ec".into(),
                alg: crate::config::KeyAlg::ES256,
                file: concat!(env!("CARGO_MANIFEST_DIR"), "/src/app/auth/testdata/ec.pub").into(),
            }],
            ..Default::default()
        };
        let auth = crate::app::auth::Auth::load(&cfg).unwrap();
        for (i, t) in hs.iter().enumerate() {
            let v = auth.verify(t.as_bytes()).unwrap();
            assert_eq!(&*v.perms.sub, format!("bench-{i}"));
            assert_eq!(v.perms.subscribe, vec![Box::<str>::from("*")]);
        }
        // ES256 tokens need the key's kid; without it the HS256 secret is the default key.
        assert!(auth.verify(ec[0].as_bytes()).is_err());
        let mut kid = Map::new();
        kid.insert("kid".into(), "ec".into());
        kid.insert("aud".into(), "shardnet".into());
        let ec = mint(&format!("ES256:{es}"), 7, 1, &kid).unwrap();
        assert_eq!(
            &*auth.verify(ec[0].as_bytes()).unwrap().perms.sub,
            "bench-7"
        );
        assert!(mint("HS512:/nope", 0, 1, &Map::new()).is_err());
        assert!(mint("nocolon", 0, 1, &Map::new()).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn upgrade_requests_carry_the_token_where_asked() {
        let h = upgrade_request("/ws", "h:1", Some("a.b.c"), false, "");
        assert!(h.starts_with("GET /ws HTTP/1.1\r\n"), "{h}");
        assert!(h.contains("\r\nAuthorization: Bearer a.b.c\r\n\r\n"), "{h}");
        let q = upgrade_request("/ws", "h:1", Some("a.b.c"), true, "");
        assert!(q.starts_with("GET /ws?token=a.b.c HTTP/1.1\r\n") && !q.contains("Authorization"));
        let none = upgrade_request("/ws", "h:1", None, false, "X: y\r\n");
        assert!(
            !none.contains("token") && none.ends_with("\r\nX: y\r\n\r\n"),
            "{none}"
        );
    }
}
