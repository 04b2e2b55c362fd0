//! Token verification keys: the HS256 secret (from a file or an environment variable), PEM
//! public keys, and JWKS files, each loaded into a [`Key`] with one fixed algorithm.
//!
//! Each key verifies exactly one algorithm, decided here and never by a token: a secret is
//! HS256, a PEM key is the `alg` its `[[auth.public_key]]` says, and a JWKS key is its `alg`
//! member (or, without one, the one algorithm its type allows here: RSA is RS256, P-256 is
//! ES256, Ed25519 is EdDSA). So a token signed with HMAC using a public key as the secret
//! cannot verify: no key with that `kid` does HMAC.
//!
//! Everything is checked when loaded, so that `config check` refuses what would fail later: a
//! secret shorter than 32 bytes (RFC 7518 wants at least the hash size), an RSA key under 2048
//! bits, a private key where a public one belongs (in PEM or JWKS), a symmetric JWKS key, a key
//! the crypto backend cannot parse, two keys with one `kid`, two keys without one. Messages say
//! which file and which key, never a secret's bytes.

use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;

use super::{read_file, AuthError};
use crate::config::{AuthConfig, KeyAlg};

/// The shortest HS256 secret accepted, in bytes.
pub const MIN_SECRET: usize = 32;
/// The smallest RSA modulus accepted, in bits.
pub const MIN_RSA_BITS: usize = 2048;

/// One verification key.
pub struct Key {
    /// The `kid` that selects it; `None` = the key for tokens without a `kid`.
    pub kid: Option<Box<str>>,
    pub alg: Algorithm,
    pub(super) decoding: DecodingKey,
    /// Where it came from, for logs: `hs256 secret`, `public_key[0]`, `jwks_file keys[2]`.
    pub source: String,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key material stays out of logs, even public keys (they identify deployments).
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// The keys of one `[auth]`, and what was passed over.
#[derive(Debug, Default)]
pub struct Loaded {
    pub keys: Vec<Key>,
    /// JWKS entries skipped (unsupported algorithm or curve, or not for signatures), one line
    /// each, for a warning.
    pub skipped: Vec<String>,
}

/// Loads every token key `cfg` names, or says which configuration key is at fault.
pub fn load(cfg: &AuthConfig) -> Result<Loaded, AuthError> {
    let mut loaded = Loaded::default();
    let kid = |k: &str| (!k.is_empty()).then(|| Box::from(k));
    if let Some((key, secret)) = secret(cfg)? {
        let decoding = DecodingKey::from_secret(&secret)
            .map_err(|e| AuthError::invalid(key, format!("not a usable HS256 secret: {e}")))?;
        push(
            &mut loaded,
            key,
            Key {
                kid: kid(&cfg.hs256_kid),
                alg: Algorithm::HS256,
                decoding,
                source: "hs256 secret".into(),
            },
        )?;
    }
    for (i, pk) in cfg.public_keys.iter().enumerate() {
        let key = format!("auth.public_key[{i}].file");
        let decoding = pem(&key, Path::new(&pk.file), pk.alg)?;
        push(
            &mut loaded,
            &key,
            Key {
                kid: kid(&pk.kid),
                alg: algorithm(pk.alg),
                decoding,
                source: format!("public_key[{i}]"),
            },
        )?;
    }
    if !cfg.jwks_file.is_empty() {
        jwks(&mut loaded, "auth.jwks_file", Path::new(&cfg.jwks_file))?;
    }
    Ok(loaded)
}

fn algorithm(a: KeyAlg) -> Algorithm {
    match a {
        KeyAlg::RS256 => Algorithm::RS256,
        KeyAlg::ES256 => Algorithm::ES256,
        KeyAlg::EdDSA => Algorithm::EdDSA,
    }
}

/// Adds a key, refusing a second key with the same `kid` (or a second one without a `kid`).
fn push(loaded: &mut Loaded, config_key: &str, key: Key) -> Result<(), AuthError> {
    if let Some(other) = loaded.keys.iter().find(|k| k.kid == key.kid) {
        let reason = match &key.kid {
            Some(kid) => format!(
                "{}: kid \"{kid}\" is also the kid of {}: kids must be unique",
                key.source, other.source
            ),
            None => format!(
                "{} and {} both have no kid: only one key can verify tokens without a kid, give \
                 the others one",
                other.source, key.source
            ),
        };
        return Err(AuthError::invalid(config_key, reason));
    }
    loaded.keys.push(key);
    Ok(())
}

/// The HS256 secret and the configuration key it came from, if one is configured.
fn secret(cfg: &AuthConfig) -> Result<Option<(&'static str, Vec<u8>)>, AuthError> {
    let (key, mut bytes, from) = if !cfg.hs256_secret_file.is_empty() {
        let key = "auth.hs256_secret_file";
        let path = Path::new(&cfg.hs256_secret_file);
        (key, read_file(key, path)?, path.display().to_string())
    } else if !cfg.hs256_secret_env.is_empty() {
        let key = "auth.hs256_secret_env";
        let name = &cfg.hs256_secret_env;
        let value = std::env::var_os(name).ok_or_else(|| {
            AuthError::invalid(key, format!("the environment variable {name} is not set"))
        })?;
        use std::os::unix::ffi::OsStringExt;
        (
            key,
            value.into_vec(),
            format!("the environment variable {name}"),
        )
    } else {
        return Ok(None);
    };
    // A file written by `echo` or an editor ends with a newline that is not part of the secret.
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
    }
    if bytes.len() < MIN_SECRET {
        return Err(AuthError::invalid(
            key,
            format!(
                "{from} holds {} bytes; an HS256 secret needs at least {MIN_SECRET} (for \
                 example `openssl rand -base64 48`)",
                bytes.len()
            ),
        ));
    }
    Ok(Some((key, bytes)))
}

/// A PEM public key for `alg`.
fn pem(key: &str, path: &Path, alg: KeyAlg) -> Result<DecodingKey, AuthError> {
    let at = |reason: String| AuthError::invalid(key, format!("{}: {reason}", path.display()));
    let bytes = read_file(key, path)?;
    let text =
        std::str::from_utf8(&bytes).map_err(|_| at("not a PEM file (it is not text)".into()))?;
    if text.contains("PRIVATE KEY-----") {
        return Err(at(
            "holds a private key; give the public key (`openssl pkey -in KEY -pubout`)".into(),
        ));
    }
    if !text.contains("-----BEGIN ") {
        return Err(at("not a PEM file (no -----BEGIN line)".into()));
    }
    let decoded = match alg {
        KeyAlg::RS256 => DecodingKey::from_rsa_pem(&bytes),
        KeyAlg::ES256 => DecodingKey::from_ec_pem(&bytes),
        KeyAlg::EdDSA => DecodingKey::from_ed_pem(&bytes),
    };
    let decoding = decoded.map_err(|e| at(format!("not a PEM {alg:?} public key ({e})")))?;
    check_key(&decoding, algorithm(alg)).map_err(at)?;
    Ok(decoding)
}

/// Left-pads a P-256 JWK's `x` and `y` to their 32 bytes. RFC 7518 (6.2.1.2) wants the full
/// size, but common writers (PyJWT 2.x among them) drop leading zero bytes, so about one key in
/// a hundred would otherwise be refused as another curve. Longer coordinates are left for
/// [`check_key`] to refuse.
fn pad_ec_coordinates(jwk: &mut Value) {
    for member in ["x", "y"] {
        let Some(text) = jwk.get(member).and_then(Value::as_str) else {
            continue;
        };
        let Ok(bytes) = URL_SAFE_NO_PAD.decode(text) else {
            continue; // the JWK parser names the error
        };
        if bytes.len() < 32 {
            let mut full = vec![0u8; 32 - bytes.len()];
            full.extend_from_slice(&bytes);
            jwk[member] = Value::String(URL_SAFE_NO_PAD.encode(full));
        }
    }
}

/// Checks that the backend can verify with `key` as `alg`, and the key's size.
fn check_key(key: &DecodingKey, alg: Algorithm) -> Result<(), String> {
    // An uncompressed P-256 point is 0x04 then 32 bytes each of x and y; another length is
    // another curve, which deserves its own message.
    if alg == Algorithm::ES256 && key.try_get_as_bytes().map(<[u8]>::len).ok() != Some(65) {
        return Err("not a P-256 key (ES256 needs the P-256 curve)".into());
    }
    // A signature check on nothing: the key is parsed (and refused) the way a real check would.
    jsonwebtoken::crypto::verify("AA", b"", key, alg)
        .map_err(|e| format!("not a usable {alg:?} key ({e})"))?;
    if alg == Algorithm::RS256 {
        let bits = rsa_bits(key).ok_or("cannot read the RSA modulus")?;
        if bits < MIN_RSA_BITS {
            return Err(format!(
                "an RSA key of {bits} bits; at least {MIN_RSA_BITS} are needed"
            ));
        }
    }
    Ok(())
}

fn rsa_bits(key: &DecodingKey) -> Option<usize> {
    let jwk = Jwk::from_decoding_key(key, None).ok()?;
    let AlgorithmParameters::RSA(rsa) = jwk.algorithm else {
        return None;
    };
    let n = URL_SAFE_NO_PAD.decode(rsa.n).ok()?;
    let first = n.iter().position(|b| *b != 0)?;
    Some((n.len() - first) * 8 - n[first].leading_zeros() as usize)
}

/// Members that only private (or symmetric) JWKs have.
const PRIVATE_MEMBERS: &[&str] = &["d", "p", "q", "dp", "dq", "qi", "oth", "k"];

/// The keys of a JWKS file.
fn jwks(loaded: &mut Loaded, key: &str, path: &Path) -> Result<(), AuthError> {
    let at = |reason: String| AuthError::invalid(key, format!("{}{reason}", path.display()));
    let bytes = read_file(key, path)?;
    // serde_json's syntax errors carry a position and no content.
    let doc: Value = serde_json::from_slice(&bytes).map_err(|e| {
        at(format!(
            ":{}:{}: not JSON: {}",
            e.line(),
            e.column(),
            json_error_kind(&e)
        ))
    })?;
    let Some(list) = doc.get("keys").and_then(Value::as_array) else {
        return Err(at(": not a JWKS (an object with a \"keys\" array)".into()));
    };
    let before = loaded.keys.len();
    for (i, v) in list.iter().enumerate() {
        let kid = v.get("kid").and_then(Value::as_str);
        let name = match kid {
            Some(k) => format!("keys[{i}] (kid \"{k}\")"),
            None => format!("keys[{i}]"),
        };
        let fail = |reason: &str| at(format!(": {name}: {reason}"));
        let Some(obj) = v.as_object() else {
            return Err(fail("not an object"));
        };
        if let Some(m) = PRIVATE_MEMBERS.iter().find(|m| obj.contains_key(**m)) {
            return Err(fail(&format!(
                "holds private or secret key material (`{m}`): a JWKS here lists public keys \
                 only (an HS256 secret goes in hs256_secret_file)"
            )));
        }
        if v.get("kid").is_some() && kid.is_none() {
            return Err(fail("kid is not a string"));
        }
        let str_member = |m: &str| v.get(m).and_then(Value::as_str);
        if str_member("use").is_some_and(|u| u != "sig") {
            loaded.skipped.push(format!(
                "{}: {name} skipped: its use is not \"sig\"",
                path.display()
            ));
            continue;
        }
        if let Some(ops) = v.get("key_ops").and_then(Value::as_array) {
            if !ops.iter().any(|o| o.as_str() == Some("verify")) {
                loaded.skipped.push(format!(
                    "{}: {name} skipped: its key_ops do not include \"verify\"",
                    path.display()
                ));
                continue;
            }
        }
        let kty = str_member("kty").ok_or_else(|| fail("has no kty"))?;
        let natural = match (kty, str_member("crv")) {
            ("RSA", _) => Some(Algorithm::RS256),
            ("EC", Some("P-256")) => Some(Algorithm::ES256),
            ("OKP", Some("Ed25519")) => Some(Algorithm::EdDSA),
            _ => None,
        };
        let alg = match (str_member("alg"), natural) {
            (Some(a), Some(n)) if a == alg_name(n) => n,
            (Some(a), _) if !["RS256", "ES256", "EdDSA"].contains(&a) => {
                loaded.skipped.push(format!(
                    "{}: {name} skipped: alg {a} is not supported here (RS256, ES256, EdDSA)",
                    path.display()
                ));
                continue;
            }
            (Some(a), _) => {
                return Err(fail(&format!(
                    "alg {a} does not fit its key type (kty {kty}{})",
                    str_member("crv").map_or(String::new(), |c| format!(", crv {c}"))
                )));
            }
            (None, Some(n)) => n,
            (None, None) => {
                loaded.skipped.push(format!(
                    "{}: {name} skipped: kty {kty}{} is not supported here (RSA, EC P-256, OKP \
                     Ed25519)",
                    path.display(),
                    str_member("crv").map_or(String::new(), |c| format!(" crv {c}"))
                ));
                continue;
            }
        };
        let mut v = v.clone();
        if alg == Algorithm::ES256 {
            pad_ec_coordinates(&mut v);
        }
        let jwk: Jwk = serde_json::from_value(v)
            .map_err(|e| fail(&format!("not a valid JWK ({})", json_error_kind(&e))))?;
        let decoding =
            DecodingKey::from_jwk(&jwk).map_err(|e| fail(&format!("not a usable key ({e})")))?;
        check_key(&decoding, alg).map_err(|e| fail(&e))?;
        push(
            loaded,
            key,
            Key {
                kid: kid.map(Box::from),
                alg,
                decoding,
                source: format!("jwks_file {name}"),
            },
        )?;
    }
    if loaded.keys.len() == before {
        return Err(at(
            ": no usable key (RS256, ES256 or EdDSA, for signatures)".into(),
        ));
    }
    Ok(())
}

/// serde_json's message without the input it quotes (`invalid type: string "...", expected`):
/// the category, and the expectation when there is one.
fn json_error_kind(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    // Messages end with " at line L column C"; the position is reported apart.
    let msg = msg.split(" at line ").next().unwrap_or(&msg);
    match (e.classify(), msg.rsplit_once(", expected ")) {
        (serde_json::error::Category::Data, Some((_, expected))) => {
            format!("expected {expected}")
        }
        (serde_json::error::Category::Data, None) => "a member has the wrong type or value".into(),
        _ => msg.to_string(),
    }
}

pub(super) fn alg_name(a: Algorithm) -> &'static str {
    match a {
        Algorithm::HS256 => "HS256",
        Algorithm::RS256 => "RS256",
        Algorithm::ES256 => "ES256",
        Algorithm::EdDSA => "EdDSA",
        _ => "other",
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::config::PublicKeyConfig;

    /// A directory of its own per test, removed on drop.
    pub struct Dir(pub std::path::PathBuf);

    impl Dir {
        pub fn new(name: &str) -> Dir {
            let d =
                std::env::temp_dir().join(format!("shardnet-auth-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&d).unwrap();
            Dir(d)
        }

        pub fn file(&self, name: &str, contents: &[u8]) -> String {
            let p = self.0.join(name);
            std::fs::write(&p, contents).unwrap();
            p.display().to_string()
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    pub const RSA_PUB: &str = include_str!("testdata/rsa.pub");
    pub const EC_PUB: &str = include_str!("testdata/ec.pub");
    pub const ED_PUB: &str = include_str!("testdata/ed.pub");
    pub const JWKS: &str = include_str!("testdata/jwks.json");
    pub const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-secret";

    fn err(cfg: &AuthConfig) -> (String, String) {
        let e = load(cfg).unwrap_err();
        (e.key().to_string(), e.reason())
    }

    #[test]
    fn every_source_loads_with_its_one_algorithm() {
        let d = Dir::new("sources");
        let cfg = AuthConfig {
            hs256_secret_file: d.file("secret", &[SECRET, b"\n"].concat()),
            hs256_kid: "hs".into(),
            public_keys: vec![
                PublicKeyConfig {
                    kid: "pem-rsa".into(),
                    alg: KeyAlg::RS256,
                    file: d.file("rsa.pub", RSA_PUB.as_bytes()),
                },
                PublicKeyConfig {
                    kid: String::new(),
                    alg: KeyAlg::EdDSA,
                    file: d.file("ed.pub", ED_PUB.as_bytes()),
                },
            ],
            jwks_file: d.file("jwks.json", JWKS.as_bytes()),
            ..AuthConfig::default()
        };
        let loaded = load(&cfg).unwrap();
        let got: Vec<(Option<&str>, &str)> = loaded
            .keys
            .iter()
            .map(|k| (k.kid.as_deref(), alg_name(k.alg)))
            .collect();
        assert_eq!(
            got,
            [
                (Some("hs"), "HS256"),
                (Some("pem-rsa"), "RS256"),
                (None, "EdDSA"),
                (Some("rsa-1"), "RS256"),
                (Some("ec-1"), "ES256"),
                // No alg member: ES256 from its curve.
                (Some("ec-2"), "ES256"),
                (Some("ed-1"), "EdDSA"),
            ]
        );
        assert!(loaded.skipped.is_empty());
        // Debug shows kids and sources, not key material.
        let dbg = format!("{:?}", loaded.keys);
        assert!(
            dbg.contains("pem-rsa") && !dbg.contains("0123456789"),
            "{dbg}"
        );
    }

    #[test]
    fn secret_files_and_variables_and_their_errors_never_show_the_secret() {
        // Setting variables here would race with other test threads reading the environment:
        // tests/auth.rs sets them on a child process instead. An unset one is safe to test.
        let var = "SHARDNET_TEST_SURELY_UNSET_VARIABLE";
        let cfg = AuthConfig {
            hs256_secret_env: var.into(),
            ..AuthConfig::default()
        };
        let (key, reason) = err(&cfg);
        assert_eq!(key, "auth.hs256_secret_env");
        assert!(
            reason.contains(
                "the environment variable SHARDNET_TEST_SURELY_UNSET_VARIABLE is not set"
            ),
            "{reason}"
        );

        let d = Dir::new("secret-file");
        let cfg = AuthConfig {
            hs256_secret_file: d.file("s", b"short-but-secret\n"),
            ..AuthConfig::default()
        };
        let (key, reason) = err(&cfg);
        assert_eq!(key, "auth.hs256_secret_file");
        assert!(!reason.contains("short-but-secret"), "{reason}");
        let cfg = AuthConfig {
            hs256_secret_file: d.0.join("absent").display().to_string(),
            ..AuthConfig::default()
        };
        let (key, reason) = err(&cfg);
        assert_eq!(key, "auth.hs256_secret_file");
        assert!(
            reason.contains("absent: cannot read: No such file"),
            "{reason}"
        );
    }

    #[test]
    fn pem_files_are_checked_for_type_curve_size_and_privacy() {
        let d = Dir::new("pem");
        let one = |alg: KeyAlg, contents: &[u8]| AuthConfig {
            public_keys: vec![PublicKeyConfig {
                kid: "k".into(),
                alg,
                file: d.file("key.pem", contents),
            }],
            ..AuthConfig::default()
        };
        let cases: &[(KeyAlg, &[u8], &str)] = &[
            (
                KeyAlg::ES256,
                RSA_PUB.as_bytes(),
                "not a PEM ES256 public key",
            ),
            (
                KeyAlg::RS256,
                EC_PUB.as_bytes(),
                "not a PEM RS256 public key",
            ),
            (
                KeyAlg::ES256,
                include_bytes!("testdata/ec384.pub"),
                "not a P-256 key",
            ),
            (
                KeyAlg::RS256,
                include_bytes!("testdata/rsa1024.pub"),
                "an RSA key of 1024 bits",
            ),
            (
                KeyAlg::ES256,
                include_bytes!("testdata/ec.key"),
                "holds a private key",
            ),
            (KeyAlg::EdDSA, b"hello", "not a PEM file"),
            (KeyAlg::EdDSA, &[0xff, 0xfe, 0], "not a PEM file"),
        ];
        for (alg, contents, want) in cases {
            let (key, reason) = err(&one(*alg, contents));
            assert_eq!(key, "auth.public_key[0].file");
            assert!(reason.contains(want), "{alg:?} {want}: {reason}");
            assert!(reason.contains("key.pem: "), "{reason}");
            assert!(!reason.contains("MII"), "key material in {reason}");
        }
        load(&one(KeyAlg::ES256, EC_PUB.as_bytes())).unwrap();
    }

    #[test]
    fn kids_are_unique_and_one_key_at_most_has_none() {
        let d = Dir::new("kids");
        let cfg = AuthConfig {
            hs256_secret_file: d.file("secret", SECRET),
            public_keys: vec![PublicKeyConfig {
                kid: String::new(),
                alg: KeyAlg::ES256,
                file: d.file("ec.pub", EC_PUB.as_bytes()),
            }],
            ..AuthConfig::default()
        };
        let (key, reason) = err(&cfg);
        assert_eq!(key, "auth.public_key[0].file");
        assert!(reason.contains("both have no kid"), "{reason}");
        let cfg = AuthConfig {
            hs256_kid: "ec-1".into(),
            jwks_file: d.file("jwks.json", JWKS.as_bytes()),
            public_keys: Vec::new(),
            ..cfg
        };
        let (key, reason) = err(&cfg);
        assert_eq!(key, "auth.jwks_file");
        assert!(
            reason.contains("kid \"ec-1\" is also the kid of hs256 secret"),
            "{reason}"
        );
    }

    #[test]
    fn short_p256_coordinates_are_left_padded_and_full_ones_kept() {
        let full = URL_SAFE_NO_PAD.encode([7u8; 32]);
        let short = URL_SAFE_NO_PAD.encode([9u8; 31]);
        let mut jwk = serde_json::json!({"kty": "EC", "crv": "P-256", "x": short, "y": full});
        pad_ec_coordinates(&mut jwk);
        let x = URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap();
        assert_eq!(x.len(), 32);
        assert_eq!(x[0], 0);
        assert!(x[1..].iter().all(|&b| b == 9));
        assert_eq!(jwk["y"].as_str().unwrap(), full);
    }

    #[test]
    fn jwks_files_are_checked_and_unsupported_keys_skipped() {
        let d = Dir::new("jwks");
        let with = |doc: &str| AuthConfig {
            jwks_file: d.file("jwks.json", doc.as_bytes()),
            ..AuthConfig::default()
        };
        let ec: Value = serde_json::from_str::<Value>(JWKS).unwrap()["keys"][1].clone();
        let mut private = ec.clone();
        private["d"] = "c2VjcmV0LWJ5dGVz".into();
        let mut wrong_alg = ec.clone();
        wrong_alg["alg"] = "RS256".into();
        let mut bad_point = ec.clone();
        // 32 bytes, so a P-256 coordinate by its size, but not a point on the curve.
        bad_point["x"] = "A".repeat(43).into();
        let doc = |keys: &[&Value]| serde_json::json!({ "keys": keys }).to_string();
        let cases = [
            ("{\"keys\": [", "jwks.json:1:10: not JSON"),
            ("[1, 2]", "not a JWKS"),
            (
                &doc(&[&private]) as &str,
                "keys[0] (kid \"ec-1\"): holds private",
            ),
            (
                &doc(&[&serde_json::json!({"kty": "oct", "k": "c2VjcmV0"})]),
                "keys[0]: holds private or secret key material (`k`)",
            ),
            (
                &doc(&[&wrong_alg]),
                "alg RS256 does not fit its key type (kty EC, crv P-256)",
            ),
            (&doc(&[&bad_point]), "keys[0] (kid \"ec-1\"): not a usable"),
            (&doc(&[]), "no usable key"),
            (
                &doc(&[&ec, &ec]),
                "kid \"ec-1\" is also the kid of jwks_file keys[0]",
            ),
        ];
        for (text, want) in cases {
            let (key, reason) = err(&with(text));
            assert_eq!(key, "auth.jwks_file");
            assert!(reason.contains(want), "{want}: {reason}");
            assert!(!reason.contains("c2VjcmV0"), "secret material in {reason}");
        }
        let mut enc = ec.clone();
        enc["use"] = "enc".into();
        enc["kid"] = "enc".into();
        let mut es384 = ec.clone();
        es384["alg"] = "ES384".into();
        es384["kid"] = "es384".into();
        let p384 = serde_json::json!({"kty": "EC", "crv": "P-384", "kid": "p384",
            "x": "AAAA", "y": "AAAA"});
        let loaded = load(&with(&doc(&[&enc, &es384, &p384, &ec]))).unwrap();
        assert_eq!(loaded.keys.len(), 1);
        assert_eq!(loaded.skipped.len(), 3, "{:?}", loaded.skipped);
        assert!(loaded.skipped[0].contains("use is not \"sig\""));
        assert!(loaded.skipped[1].contains("alg ES384 is not supported"));
        assert!(loaded.skipped[2].contains("kty EC crv P-384 is not supported"));
    }
}
