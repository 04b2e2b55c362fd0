//! The `[auth]` section and each WebSocket route's `auth` mode: what verifies tokens, which
//! claims carry permissions, the publish API's keys, and the per-connection command rate.
//!
//! The section holds only *where* secrets are (a file path, an environment variable's name),
//! never a secret itself, so the effective-configuration printout of `config check` can show
//! every key as it is. Values are checked here (`validate.rs`); the files, and the topic
//! patterns, by the product (`app::auth`), which parses through
//! [`Config::parse_with`](super::Config::parse_with) so that a missing or malformed key file
//! fails `config check` at the line of the key naming it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{duration, size};

/// `[auth]`. Every key is optional; with none set, tokens cannot be verified (routes with
/// `auth = "off"`, the default, need none) and the publish API is open.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// A file holding the HS256 shared secret (its bytes, a trailing newline dropped).
    pub hs256_secret_file: String,
    /// An environment variable holding the HS256 shared secret.
    pub hs256_secret_env: String,
    /// The `kid` that selects the HS256 secret; empty = the secret verifies tokens without one.
    pub hs256_kid: String,
    /// A JWKS file (`{"keys": [...]}`) of RS256, ES256 and EdDSA public keys, chosen by `kid`.
    pub jwks_file: String,
    /// PEM public keys, each with its `kid` and its one algorithm.
    #[serde(rename = "public_key")]
    pub public_keys: Vec<PublicKeyConfig>,
    /// Required `iss`; empty = not checked.
    pub issuer: String,
    /// Required `aud` (one of the token's); empty = not checked.
    pub audience: String,
    /// Clock skew allowed on `exp` and `nbf`, whole seconds.
    #[serde(with = "duration")]
    pub leeway: Duration,
    /// Longer tokens are refused before any decoding.
    #[serde(with = "size")]
    pub max_token_size: usize,
    /// The claim listing the topic patterns a token may subscribe to.
    pub subscribe_claim: String,
    /// The claim listing the topic patterns a token may publish on.
    pub publish_claim: String,
    /// Topic patterns an anonymous connection (an `optional` route without a token) may
    /// subscribe to.
    pub anonymous_subscribe: Vec<String>,
    /// Accept the token as a `token` query parameter on upgrade (browsers cannot set headers on
    /// a WebSocket).
    pub query_token: bool,
    /// Keys for `POST /publish`, one per line; empty = the publish API needs no key.
    pub api_keys_file: String,
    /// Keys for `/metrics` and `/stats`, one per line; empty = they need no key.
    pub admin_api_keys_file: String,
    /// Client commands (subscribe, unsubscribe, publish, refresh) per second per connection;
    /// 0 = no limit.
    pub command_rate: u32,
    /// Commands a connection may send at once above the rate.
    pub command_burst: u32,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            hs256_secret_file: String::new(),
            hs256_secret_env: String::new(),
            hs256_kid: String::new(),
            jwks_file: String::new(),
            public_keys: Vec::new(),
            issuer: String::new(),
            audience: String::new(),
            leeway: Duration::from_secs(5),
            max_token_size: 4096,
            subscribe_claim: "subscribe".into(),
            publish_claim: "publish".into(),
            anonymous_subscribe: Vec::new(),
            query_token: true,
            api_keys_file: String::new(),
            admin_api_keys_file: String::new(),
            command_rate: 0,
            command_burst: 20,
        }
    }
}

impl AuthConfig {
    /// Whether any token verification key is configured.
    pub fn has_token_keys(&self) -> bool {
        !self.hs256_secret_file.is_empty()
            || !self.hs256_secret_env.is_empty()
            || !self.jwks_file.is_empty()
            || !self.public_keys.is_empty()
    }
}

/// One `[[auth.public_key]]`: a PEM public key and the algorithm it verifies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PublicKeyConfig {
    /// Selects this key by the token header's `kid`; empty = the key for tokens without one.
    pub kid: String,
    /// The one algorithm this key verifies.
    pub alg: KeyAlg,
    /// The PEM file (`-----BEGIN PUBLIC KEY-----`).
    pub file: String,
}

impl Default for PublicKeyConfig {
    fn default() -> Self {
        PublicKeyConfig {
            kid: String::new(),
            alg: KeyAlg::ES256,
            file: String::new(),
        }
    }
}

/// The public-key algorithms a key can be fixed to (HS256 is the secret's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyAlg {
    /// RSA with SHA-256 (keys of at least 2048 bits).
    RS256,
    /// ECDSA on P-256 with SHA-256.
    ES256,
    /// Ed25519.
    EdDSA,
}

/// A WebSocket route's `auth`: whether upgrading needs a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteAuth {
    /// No token is looked at; every connection may subscribe anywhere (and publish).
    #[default]
    Off,
    /// A valid token gives its permissions; none gives `anonymous_subscribe`; a bad one is 401.
    Optional,
    /// Without a valid token the upgrade is answered 401.
    Required,
}

/// The bounds `config check` enforces, with the reasons they exist.
pub(super) mod bounds {
    use std::time::Duration;

    /// More leeway than this stops `exp` from meaning much.
    pub const MAX_LEEWAY: Duration = Duration::from_secs(300);
    /// A token must at least hold a header, a few claims and a signature.
    pub const MIN_TOKEN_SIZE: usize = 256;
    /// Beyond this a token no longer fits comfortably in a request header (or a URL).
    pub const MAX_TOKEN_SIZE: usize = 64 * 1024;
    /// One command per 10 µs: the rate-limit bucket's resolution (`app::auth::bucket`).
    pub const MAX_COMMAND_RATE: u32 = 100_000;
}

/// Claims with a meaning of their own, which cannot also carry permissions.
pub(super) const REGISTERED_CLAIMS: &[&str] = &["iss", "sub", "aud", "exp", "nbf", "iat", "jti"];

#[cfg(test)]
mod tests {
    use super::super::{Config, ConfigError};
    use super::*;

    const TESTDATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/app/auth/testdata");

    fn route(auth: &str) -> String {
        format!(
            "[[listener]]\nname = \"h\"\naddr = \"127.0.0.1:0\"\nservice = \"http\"\n\
             [[listener.websocket]]\npath = \"/ws\"\n{auth}\n"
        )
    }

    fn err(src: &str) -> (usize, String, String) {
        match Config::parse(src, "t.toml").unwrap_err() {
            ConfigError::Invalid {
                line, key, reason, ..
            } => (line, key, reason),
            e => panic!("unexpected {e}"),
        }
    }

    fn ec_key() -> String {
        format!(
            "[[auth.public_key]]\nkid = \"k1\"\nalg = \"ES256\"\nfile = \"{TESTDATA}/ec.pub\"\n"
        )
    }

    #[test]
    fn routes_default_to_off_and_auth_round_trips() {
        let c = Config::parse(&route(""), "t").unwrap();
        assert_eq!(c.listeners[0].websocket[0].auth, RouteAuth::Off);
        assert_eq!(c.auth, AuthConfig::default());
        let src = format!(
            "[auth]\nissuer = \"https://id.example\"\nleeway = \"10s\"\n\
             anonymous_subscribe = [\"public:*\"]\ncommand_rate = 50\n{}{}",
            ec_key(),
            route("auth = \"required\"")
        );
        let c = Config::parse(&src, "t").unwrap();
        assert_eq!(c.listeners[0].websocket[0].auth, RouteAuth::Required);
        assert_eq!(c.auth.public_keys.len(), 1);
        assert_eq!(c.auth.public_keys[0].alg, KeyAlg::ES256);
        let printed = c.to_toml();
        assert!(printed.contains("[[auth.public_key]]"), "{printed}");
        assert_eq!(Config::parse(&printed, "again").unwrap(), c);
    }

    #[test]
    fn a_route_that_needs_tokens_needs_a_key() {
        for mode in ["optional", "required"] {
            let (line, key, reason) = err(&route(&format!("auth = \"{mode}\"")));
            assert_eq!((line, key.as_str()), (7, "listener[0].websocket[0].auth"));
            assert!(reason.contains("needs a key to verify tokens"), "{reason}");
        }
        let (line, key, _) = err(&route("auth = \"sometimes\""));
        assert_eq!((line, key.as_str()), (7, "listener[0].websocket[0].auth"));
    }

    #[test]
    fn values_are_checked_where_they_are() {
        let cases = [
            ("leeway = \"1500ms\"", "auth.leeway", "whole seconds"),
            ("leeway = \"10m\"", "auth.leeway", "at most 5m"),
            (
                "max_token_size = 100",
                "auth.max_token_size",
                "between 256B and 64KiB",
            ),
            (
                "max_token_size = \"1MiB\"",
                "auth.max_token_size",
                "between",
            ),
            (
                "subscribe_claim = \"sub\"",
                "auth.subscribe_claim",
                "registered claim",
            ),
            (
                "publish_claim = \"\"",
                "auth.publish_claim",
                "must name a claim",
            ),
            (
                "publish_claim = \"subscribe\"",
                "auth.publish_claim",
                "must differ from subscribe_claim",
            ),
            ("command_rate = 2000000", "auth.command_rate", "at most"),
            (
                "command_burst = 0",
                "auth.command_burst",
                "between 1 and 65535",
            ),
            (
                "hs256_secret_file = \"/x\"\nhs256_secret_env = \"X\"",
                "auth.hs256_secret_env",
                "not both",
            ),
            ("hs256_kid = \"k\"", "auth.hs256_kid", "none is configured"),
        ];
        for (body, want_key, want) in cases {
            let (line, key, reason) = err(&format!("[auth]\n{body}\n{}", route("")));
            assert_eq!(key, want_key, "{body}: {reason}");
            assert!(line >= 2, "{body}: line {line}");
            assert!(reason.contains(want), "{body}: {reason}");
        }
    }
}
