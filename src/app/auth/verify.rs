//! The token verifier: built once per load of `[auth]`, shared read-only by every shard.
//!
//! Checks run cheapest first, and nothing is decoded before the size is known to be within
//! `max_token_size`:
//!
//! 1. size; then the compact form (three `.`-separated parts);
//! 2. the header, decoded here rather than by the library so that `alg: none` is named as such
//!    (the library only knows real algorithms) and the key can be chosen by `kid`;
//! 3. the key: by `kid`, or the one key without a `kid` for tokens without one;
//! 4. the algorithm: the header's `alg` must be the key's one algorithm. The token never
//!    chooses between HMAC and a public-key algorithm, which is what algorithm-confusion
//!    attacks rely on (an HS256 token "signed" with a public RSA key as the secret);
//! 5. signature and registered claims, by `jsonwebtoken` with a [`Validation`] fixed to that
//!    one algorithm: `exp` required, `nbf` checked, `iss` and `aud` required when configured,
//!    the configured leeway;
//! 6. the permission claims, into [`Permissions`].
//!
//! Keys come from the configuration only: a header's `jwk`, `jku`, `x5u` or `x5c` is never
//! fetched nor trusted, and an unknown `crit` extension is refused (by the library).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Map, Value};

use super::keys::{alg_name, Key};
use super::perms::{check_pattern, Permissions, SUB};
use super::Failure;
use crate::config::AuthConfig;

/// A verified token: what it allows and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub perms: Permissions,
    /// `exp`, Unix seconds (the leeway not added).
    pub exp: u64,
}

struct Entry {
    key: Key,
    validation: Validation,
}

/// Verifies tokens against the configured keys.
pub struct Verifier {
    entries: Vec<Entry>,
    max_token_size: usize,
    subscribe_claim: Box<str>,
    publish_claim: Box<str>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Verifier({})", self.describe())
    }
}

impl Verifier {
    pub fn new(keys: Vec<Key>, cfg: &AuthConfig) -> Verifier {
        let entries = keys
            .into_iter()
            .map(|key| {
                let validation = validation(key.alg, cfg);
                Entry { key, validation }
            })
            .collect();
        Verifier {
            entries,
            max_token_size: cfg.max_token_size,
            subscribe_claim: cfg.subscribe_claim.as_str().into(),
            publish_claim: cfg.publish_claim.as_str().into(),
        }
    }

    /// The keys, as `kid:ALG` (`-` for the key without a kid), for logs.
    pub fn describe(&self) -> String {
        let keys: Vec<String> = self
            .entries
            .iter()
            .map(|e| {
                format!(
                    "{}:{}",
                    e.key.kid.as_deref().unwrap_or("-"),
                    alg_name(e.key.alg)
                )
            })
            .collect();
        format!("{} token keys [{}]", keys.len(), keys.join(" "))
    }

    pub fn verify(&self, token: &[u8]) -> Result<Verified, Failure> {
        if token.is_empty() {
            return Err(Failure::Missing);
        }
        if token.len() > self.max_token_size {
            return Err(Failure::TooLarge);
        }
        let mut parts = token.split(|b| *b == b'.');
        let (Some(header), Some(_), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Failure::Malformed);
        };
        let header = parse_header(header)?;
        if header.alg.eq_ignore_ascii_case("none") {
            return Err(Failure::Unsigned);
        }
        let entry = self
            .entries
            .iter()
            .find(|e| e.key.kid.as_deref() == header.kid.as_deref())
            .ok_or(Failure::UnknownKey)?;
        if header.alg != alg_name(entry.key.alg) {
            return Err(Failure::Algorithm);
        }
        let data = jsonwebtoken::decode::<Map<String, Value>>(
            token,
            &entry.key.decoding,
            &entry.validation,
        )
        .map_err(|e| failure(e.kind()))?;
        self.permissions(&data.claims)
    }

    fn permissions(&self, claims: &Map<String, Value>) -> Result<Verified, Failure> {
        let exp = match claims.get("exp") {
            Some(Value::Number(n)) => n
                .as_u64()
                .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
                .ok_or(Failure::Claims)?,
            _ => return Err(Failure::Claims),
        };
        let sub = match claims.get("sub") {
            None | Some(Value::Null) => "",
            Some(Value::String(s)) => s.as_str(),
            Some(_) => return Err(Failure::Claims),
        };
        let subscribe = patterns(claims, &self.subscribe_claim, sub)?;
        let publish = patterns(claims, &self.publish_claim, sub)?;
        Ok(Verified {
            perms: Permissions {
                sub: sub.into(),
                subscribe,
                publish,
            },
            exp,
        })
    }
}

/// What the verifier needs of a JOSE header.
#[derive(serde::Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

fn parse_header(b64: &[u8]) -> Result<Header, Failure> {
    let json = URL_SAFE_NO_PAD
        .decode(b64)
        .map_err(|_| Failure::Malformed)?;
    serde_json::from_slice(&json).map_err(|_| Failure::Malformed)
}

/// A claim's patterns: a JSON array of strings, or one string of space-separated patterns (as
/// OAuth's `scope`); absent = none. `{sub}` needs a non-empty `sub`.
fn patterns(claims: &Map<String, Value>, name: &str, sub: &str) -> Result<Vec<Box<str>>, Failure> {
    let list: Vec<&str> = match claims.get(name) {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => s.split_whitespace().collect(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().ok_or(Failure::Claims))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(Failure::Claims),
    };
    list.into_iter()
        .map(|p| {
            check_pattern(p, true).map_err(|_| Failure::Claims)?;
            if sub.is_empty() && p.contains(SUB) {
                return Err(Failure::Claims);
            }
            Ok(Box::from(p))
        })
        .collect()
}

fn validation(alg: Algorithm, cfg: &AuthConfig) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = cfg.leeway.as_secs();
    v.validate_exp = true;
    v.validate_nbf = true;
    let mut required = vec!["exp"];
    if cfg.issuer.is_empty() {
        v.iss = None;
    } else {
        v.set_issuer(&[&cfg.issuer]);
        required.push("iss");
    }
    // Without a configured audience `aud` is not looked at (the library would refuse every
    // token that has one).
    if cfg.audience.is_empty() {
        v.validate_aud = false;
    } else {
        v.set_audience(&[&cfg.audience]);
        required.push("aud");
    }
    v.set_required_spec_claims(&required);
    v
}

fn failure(kind: &ErrorKind) -> Failure {
    match kind {
        ErrorKind::InvalidSignature => Failure::Signature,
        ErrorKind::ExpiredSignature => Failure::Expired,
        ErrorKind::ImmatureSignature => Failure::NotYetValid,
        ErrorKind::InvalidIssuer => Failure::Issuer,
        ErrorKind::InvalidAudience => Failure::Audience,
        ErrorKind::MissingRequiredClaim(c) if c == "iss" => Failure::Issuer,
        ErrorKind::MissingRequiredClaim(c) if c == "aud" => Failure::Audience,
        ErrorKind::MissingRequiredClaim(_) | ErrorKind::InvalidClaimFormat(_) => Failure::Claims,
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => Failure::Algorithm,
        // A key the backend refuses at verification time (it was checked when loaded) or a
        // signature of the wrong shape for its algorithm: either way, not a valid signature.
        ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat => Failure::Signature,
        _ => Failure::Malformed,
    }
}

#[cfg(test)]
mod tests {
    use super::super::keys::tests::{Dir, EC_PUB, ED_PUB, JWKS, RSA_PUB, SECRET};
    use super::*;
    use crate::config::{KeyAlg, PublicKeyConfig};
    use jsonwebtoken::{encode, EncodingKey, Header as JwtHeader};
    use serde_json::json;

    const RSA_KEY: &[u8] = include_bytes!("testdata/rsa.key");
    const EC_KEY: &[u8] = include_bytes!("testdata/ec.key");
    const EC2_KEY: &[u8] = include_bytes!("testdata/ec2.key");
    const ED_KEY: &[u8] = include_bytes!("testdata/ed.key");

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn mint(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: Value) -> Vec<u8> {
        let mut h = JwtHeader::new(alg);
        h.kid = kid.map(str::to_string);
        encode(&h, &claims, key).unwrap().into_bytes()
    }

    /// Header and claims as given, signed by nobody: what an attacker can send.
    fn forge(header: Value, claims: Value, sig: &[u8]) -> Vec<u8> {
        let b = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
        format!(
            "{}.{}.{}",
            b(&header),
            b(&claims),
            URL_SAFE_NO_PAD.encode(sig)
        )
        .into_bytes()
    }

    struct Fixture {
        _dir: Dir,
        verifier: Verifier,
    }

    fn fixture(name: &str, tweak: impl FnOnce(&mut AuthConfig)) -> Fixture {
        let dir = Dir::new(name);
        let mut cfg = AuthConfig {
            hs256_secret_file: dir.file("secret", SECRET),
            hs256_kid: "hs".into(),
            public_keys: vec![
                PublicKeyConfig {
                    kid: "pem-rsa".into(),
                    alg: KeyAlg::RS256,
                    file: dir.file("rsa.pub", RSA_PUB.as_bytes()),
                },
                PublicKeyConfig {
                    kid: "pem-ed".into(),
                    alg: KeyAlg::EdDSA,
                    file: dir.file("ed.pub", ED_PUB.as_bytes()),
                },
                PublicKeyConfig {
                    kid: String::new(),
                    alg: KeyAlg::ES256,
                    file: dir.file("ec.pub", EC_PUB.as_bytes()),
                },
            ],
            jwks_file: dir.file("jwks.json", JWKS.as_bytes()),
            issuer: "https://issuer.example".into(),
            audience: "shardnet".into(),
            leeway: std::time::Duration::from_secs(2),
            ..AuthConfig::default()
        };
        tweak(&mut cfg);
        let loaded = super::super::keys::load(&cfg).unwrap();
        Fixture {
            verifier: Verifier::new(loaded.keys, &cfg),
            _dir: dir,
        }
    }

    fn good_claims() -> Value {
        json!({
            "sub": "alice",
            "exp": now() + 60,
            "iss": "https://issuer.example",
            "aud": ["other", "shardnet"],
            "subscribe": ["chat:*", "user:{sub}"],
            "publish": "chat:{sub}",
        })
    }

    fn hs() -> EncodingKey {
        EncodingKey::from_secret(SECRET).unwrap()
    }

    #[test]
    fn valid_tokens_of_every_algorithm_and_key_source() {
        let f = fixture("valid", |_| {});
        let rsa = EncodingKey::from_rsa_pem(RSA_KEY).unwrap();
        let ec = EncodingKey::from_ec_pem(EC_KEY).unwrap();
        let ec2 = EncodingKey::from_ec_pem(EC2_KEY).unwrap();
        let ed = EncodingKey::from_ed_pem(ED_KEY).unwrap();
        let cases = [
            mint(Algorithm::HS256, Some("hs"), &hs(), good_claims()),
            mint(Algorithm::RS256, Some("pem-rsa"), &rsa, good_claims()),
            mint(Algorithm::RS256, Some("rsa-1"), &rsa, good_claims()),
            mint(Algorithm::ES256, None, &ec, good_claims()),
            mint(Algorithm::ES256, Some("ec-1"), &ec, good_claims()),
            mint(Algorithm::ES256, Some("ec-2"), &ec2, good_claims()),
            mint(Algorithm::EdDSA, Some("pem-ed"), &ed, good_claims()),
            mint(Algorithm::EdDSA, Some("ed-1"), &ed, good_claims()),
        ];
        for (i, t) in cases.iter().enumerate() {
            let v = f
                .verifier
                .verify(t)
                .unwrap_or_else(|e| panic!("token {i}: {e}"));
            assert_eq!(&*v.perms.sub, "alice");
            assert_eq!(
                v.perms.subscribe,
                vec!["chat:*".into(), "user:{sub}".into()]
            );
            assert_eq!(v.perms.publish, vec![Box::<str>::from("chat:{sub}")]);
            assert!(v.exp > now());
        }
        // The JWKS selects by kid: ec-2's token does not verify as ec-1.
        let wrong_kid = mint(Algorithm::ES256, Some("ec-1"), &ec2, good_claims());
        assert_eq!(f.verifier.verify(&wrong_kid), Err(Failure::Signature));
        assert!(f
            .verifier
            .describe()
            .starts_with("8 token keys [hs:HS256 pem-rsa:RS256"));
    }

    #[test]
    fn each_refusal_has_its_reason() {
        let f = fixture("refusals", |_| {});
        let v = |t: &[u8]| f.verifier.verify(t);
        let with = |k: &str, val: Value| {
            let mut c = good_claims();
            c[k] = val;
            mint(Algorithm::HS256, Some("hs"), &hs(), c)
        };
        let without = |k: &str| {
            let mut c = good_claims();
            c.as_object_mut().unwrap().remove(k);
            mint(Algorithm::HS256, Some("hs"), &hs(), c)
        };
        assert_eq!(v(b""), Err(Failure::Missing));
        assert_eq!(v(b"abc"), Err(Failure::Malformed));
        assert_eq!(v(b"a.b.c.d.e"), Err(Failure::Malformed));
        assert_eq!(v(b"!!.b.c"), Err(Failure::Malformed));
        assert_eq!(v(&with("exp", json!(now() - 60))), Err(Failure::Expired));
        // Within the leeway (2 s) an expired token still passes.
        assert!(v(&with("exp", json!(now() - 1))).is_ok());
        assert_eq!(
            v(&with("nbf", json!(now() + 60))),
            Err(Failure::NotYetValid)
        );
        assert_eq!(
            v(&with("iss", json!("https://evil.example"))),
            Err(Failure::Issuer)
        );
        assert_eq!(v(&without("iss")), Err(Failure::Issuer));
        assert_eq!(v(&with("aud", json!("other"))), Err(Failure::Audience));
        assert_eq!(v(&without("aud")), Err(Failure::Audience));
        assert_eq!(v(&without("exp")), Err(Failure::Claims));
        // A string where a time belongs is refused, not ignored (CVE-2026-25537's shape).
        assert_eq!(v(&with("exp", json!("never"))), Err(Failure::Claims));
        assert_eq!(v(&with("nbf", json!("99999999999"))), Err(Failure::Claims));
        assert_eq!(v(&with("sub", json!(7))), Err(Failure::Claims));
        assert_eq!(v(&with("subscribe", json!({"a": 1}))), Err(Failure::Claims));
        assert_eq!(
            v(&with("subscribe", json!(["ok", 3]))),
            Err(Failure::Claims)
        );
        assert_eq!(v(&with("subscribe", json!(["a*b"]))), Err(Failure::Claims));
        let mut anon = good_claims();
        anon.as_object_mut().unwrap().remove("sub");
        assert_eq!(
            v(&mint(Algorithm::HS256, Some("hs"), &hs(), anon)),
            Err(Failure::Claims),
            "{{sub}} without a sub"
        );
        // Signed by another secret.
        let other = EncodingKey::from_secret(b"another-secret-of-at-least-32-bytes!!").unwrap();
        let t = mint(Algorithm::HS256, Some("hs"), &other, good_claims());
        assert_eq!(v(&t), Err(Failure::Signature));
        // A valid token with one byte of its signature changed.
        let mut t = mint(Algorithm::HS256, Some("hs"), &hs(), good_claims());
        let last = t.len() - 2;
        t[last] = if t[last] == b'A' { b'B' } else { b'A' };
        assert_eq!(v(&t), Err(Failure::Signature));
        assert_eq!(
            v(&mint(Algorithm::HS256, Some("nope"), &hs(), good_claims())),
            Err(Failure::UnknownKey)
        );
    }

    #[test]
    fn unsigned_and_confused_tokens_are_refused() {
        let f = fixture("confusion", |_| {});
        let v = |t: &[u8]| f.verifier.verify(t);
        for alg in ["none", "None", "NONE"] {
            let t = forge(json!({"alg": alg, "typ": "JWT"}), good_claims(), b"");
            assert_eq!(v(&t), Err(Failure::Unsigned), "{alg}");
            let t = forge(json!({"alg": alg, "kid": "hs"}), good_claims(), b"");
            assert_eq!(v(&t), Err(Failure::Unsigned), "{alg} with a kid");
        }
        // HS256 "signed" with the RSA public key's PEM as the HMAC secret: the classic
        // algorithm confusion. The key with that kid is RS256, so the alg is refused before
        // any HMAC is computed.
        let confused = EncodingKey::from_secret(RSA_PUB.as_bytes()).unwrap();
        for kid in [Some("pem-rsa"), Some("rsa-1")] {
            let t = mint(Algorithm::HS256, kid, &confused, good_claims());
            assert_eq!(v(&t), Err(Failure::Algorithm), "{kid:?}");
        }
        // Without a kid the default key (ES256 here) is chosen, and HS256 is not its alg.
        let t = mint(Algorithm::HS256, None, &confused, good_claims());
        assert_eq!(v(&t), Err(Failure::Algorithm));
        // Nor can an RS256 token claim the HMAC key.
        let rsa = EncodingKey::from_rsa_pem(RSA_KEY).unwrap();
        let t = mint(Algorithm::RS256, Some("hs"), &rsa, good_claims());
        assert_eq!(v(&t), Err(Failure::Algorithm));
        // An alg the header names but no key uses.
        let t = forge(json!({"alg": "HS512", "kid": "hs"}), good_claims(), b"x");
        assert_eq!(v(&t), Err(Failure::Algorithm));
    }

    #[test]
    fn size_is_bounded_before_decoding() {
        let f = fixture("size", |c| c.max_token_size = 512);
        let mut big = good_claims();
        big["pad"] = json!("x".repeat(600));
        let t = mint(Algorithm::HS256, Some("hs"), &hs(), big);
        assert_eq!(f.verifier.verify(&t), Err(Failure::TooLarge));
        // Garbage of that size is not even split.
        assert_eq!(f.verifier.verify(&[b'.'; 513]), Err(Failure::TooLarge));
        assert!(f
            .verifier
            .verify(&mint(Algorithm::HS256, Some("hs"), &hs(), good_claims()))
            .is_ok());
    }

    #[test]
    fn issuer_and_audience_unset_are_not_checked() {
        let f = fixture("open", |c| {
            c.issuer.clear();
            c.audience.clear();
            c.subscribe_claim = "channels".into();
            c.publish_claim = "pub".into();
        });
        let claims = json!({"exp": now() + 60, "aud": "anyone", "iss": "anybody",
            "channels": "a:* b", "pub": ["a:x"]});
        let t = mint(Algorithm::HS256, Some("hs"), &hs(), claims);
        let v = f.verifier.verify(&t).unwrap();
        assert_eq!(&*v.perms.sub, "");
        assert_eq!(v.perms.subscribe, vec!["a:*".into(), "b".into()]);
        assert_eq!(v.perms.publish, vec![Box::<str>::from("a:x")]);
        let bare = mint(
            Algorithm::HS256,
            Some("hs"),
            &hs(),
            json!({"exp": now() + 60}),
        );
        let v = f.verifier.verify(&bare).unwrap();
        assert!(v.perms.subscribe.is_empty() && v.perms.publish.is_empty());
    }
}
