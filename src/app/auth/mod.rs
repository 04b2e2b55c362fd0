//! Authentication and permissions: JWT verification, topic permissions, API keys, and the
//! per-connection command rate limit.
//!
//! - [`Auth`] is everything `[auth]` configures, loaded once ([`Auth::load`]: key files read,
//!   keys parsed and checked) and then immutable. It is shared by every shard behind an `Arc`
//!   in a [`Reloadable`]: SIGHUP builds a new one and swaps it in, and each shard picks it up on
//!   its next connect ([`Local::get`], one atomic load when nothing changed). New keys are
//!   accepted at once; connections made with an old key's token keep working until that
//!   token's own expiry, because a connection keeps what its token allowed (a [`Grant`]), not
//!   a reference to the key.
//! - [`verify::Verifier`] checks a token (size first, then header, key, algorithm, signature,
//!   claims) and says why one is refused with a [`Failure`] a client can act on.
//! - [`perms`]: topic patterns and the shard-local [`PermTable`] the grants point into.
//! - [`apikeys`]: the publish API's and the admin routes' keys, compared in constant time.
//! - [`bucket`]: the token bucket, one timestamp per connection.
//!
//! [`load_config`] and [`parse_config`] read a configuration file together with the files its
//! `[auth]` names (what `config check`, `serve` and SIGHUP use), so that a missing or malformed
//! key file is a configuration error at the line of its key.
//!
//! Secrets never leave this module: the HS256 secret and API keys are not kept in a printable
//! form (the keys only as digests), `Debug` of every type here names keys by `kid` and source
//! only, and no error message includes a secret or a token.

pub mod apikeys;
pub mod bucket;
pub mod keys;
pub mod perms;
pub mod verify;

use std::borrow::Cow;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{AuthConfig, Config, ConfigError, KeyError};
use crate::stats::Counter;

pub use apikeys::{ApiKeys, Refusal};
pub use bucket::{Bucket, RateLimit, Verdict};
pub use perms::{Grant, PermId, PermTable, Permissions};
pub use verify::{Verified, Verifier};

/// The WebSocket close code of a connection whose token expired (plus leeway) without a
/// refresh: "token expired, refresh and reconnect". In the 4000-4999 range RFC 6455 leaves to
/// applications.
pub const CLOSE_TOKEN_EXPIRED: u16 = 4001;

/// Why a token is refused. The names (`as_str`) are the metric label and the `error` a
/// client gets; each says what to do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Failure {
    /// No token where one is required.
    Missing,
    /// Longer than `max_token_size`: refused before decoding.
    TooLarge,
    /// Not three base64url parts with a JSON header and claims.
    Malformed,
    /// `alg: none`.
    Unsigned,
    /// No configured key has the token's `kid` (or it has none and no key is the default).
    UnknownKey,
    /// The header's `alg` is not its key's algorithm (algorithm confusion).
    Algorithm,
    /// The signature does not verify.
    Signature,
    /// Past `exp` (plus leeway).
    Expired,
    /// Before `nbf` (less leeway).
    NotYetValid,
    /// `iss` missing or not the configured issuer.
    Issuer,
    /// `aud` missing or without the configured audience.
    Audience,
    /// `exp` missing, `sub` not a string, or a permission claim malformed.
    Claims,
}

impl Failure {
    pub const ALL: [Failure; 12] = [
        Failure::Missing,
        Failure::TooLarge,
        Failure::Malformed,
        Failure::Unsigned,
        Failure::UnknownKey,
        Failure::Algorithm,
        Failure::Signature,
        Failure::Expired,
        Failure::NotYetValid,
        Failure::Issuer,
        Failure::Audience,
        Failure::Claims,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Missing => "missing",
            Failure::TooLarge => "too_large",
            Failure::Malformed => "malformed",
            Failure::Unsigned => "unsigned",
            Failure::UnknownKey => "unknown_key",
            Failure::Algorithm => "algorithm",
            Failure::Signature => "signature",
            Failure::Expired => "expired",
            Failure::NotYetValid => "not_yet_valid",
            Failure::Issuer => "issuer",
            Failure::Audience => "audience",
            Failure::Claims => "claims",
        }
    }

    /// One sentence for the client: what is wrong and what to do.
    pub fn message(self) -> &'static str {
        match self {
            Failure::Missing => {
                "no token: send one in an `Authorization: Bearer` header or a `token` query parameter"
            }
            Failure::TooLarge => "the token is longer than this server accepts",
            Failure::Malformed => "not a JWT (three base64url parts: header, claims, signature)",
            Failure::Unsigned => "unsigned tokens (alg none) are not accepted",
            Failure::UnknownKey => "no key here for this token's kid: get a token from the current issuer",
            Failure::Algorithm => "the token's alg is not the algorithm of its key",
            Failure::Signature => "the signature does not verify",
            Failure::Expired => "the token has expired: get a new one",
            Failure::NotYetValid => "the token is not valid yet (nbf): check the clocks",
            Failure::Issuer => "the token is not from the expected issuer (iss)",
            Failure::Audience => "the token is not meant for this server (aud)",
            Failure::Claims => "a claim is missing or malformed (exp, sub, or a permission claim)",
        }
    }

    /// Whether a new token from the same issuer fixes it (the client should refresh), as
    /// opposed to a token that will never be accepted.
    pub fn refreshable(self) -> bool {
        matches!(
            self,
            Failure::Expired | Failure::NotYetValid | Failure::Missing
        )
    }

    fn index(self) -> usize {
        Failure::ALL.iter().position(|f| *f == self).unwrap_or(0)
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Token failures by reason, for one shard (written by it alone, like [`crate::stats`]).
#[derive(Debug, Default)]
pub struct FailureCounters {
    counts: [Counter; Failure::ALL.len()],
}

impl FailureCounters {
    pub fn inc(&self, f: Failure) {
        self.counts[f.index()].inc();
    }

    pub fn get(&self, f: Failure) -> u64 {
        self.counts[f.index()].get()
    }

    /// (reason, count) for every reason, in [`Failure::ALL`] order.
    pub fn snapshot(&self) -> [(Failure, u64); Failure::ALL.len()] {
        Failure::ALL.map(|f| (f, self.get(f)))
    }
}

/// A problem with `[auth]`'s files or values, naming the configuration key at fault (so that
/// `config check` can point at its line) and never the secret.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The Display includes the OS error; the source is kept for callers that walk the chain.
    #[error("key `{key}`: {path}: cannot read: {source}")]
    Io {
        key: String,
        path: String,
        source: std::io::Error,
    },
    #[error("key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

impl From<AuthError> for KeyError {
    fn from(e: AuthError) -> KeyError {
        KeyError {
            key: e.key().to_string(),
            reason: e.reason(),
        }
    }
}

/// Reads a configuration file and the files its `[auth]` names: the configuration and its
/// loaded [`Auth`], or the error located at the key at fault.
pub fn load_config(path: &Path) -> Result<(Config, Auth), ConfigError> {
    Config::load_with(path, |c| Auth::load(&c.auth).map_err(KeyError::from))
}

/// [`load_config`], with the configuration's text too (the TLS files are located in it).
pub fn read_config(path: &Path) -> Result<(Config, Auth, String), ConfigError> {
    Config::read_with(path, |c| Auth::load(&c.auth).map_err(KeyError::from))
}

/// [`load_config`] for a configuration's text.
pub fn parse_config(src: &str, file: &str) -> Result<(Config, Auth), ConfigError> {
    Config::parse_with(src, file, |c| Auth::load(&c.auth).map_err(KeyError::from))
}

impl AuthError {
    pub(crate) fn invalid(key: &str, reason: impl Into<String>) -> AuthError {
        AuthError::Invalid {
            key: key.to_string(),
            reason: reason.into(),
        }
    }

    /// The dotted configuration key (`auth.jwks_file`, `auth.public_key[1].file`).
    pub fn key(&self) -> &str {
        match self {
            AuthError::Io { key, .. } | AuthError::Invalid { key, .. } => key,
        }
    }

    /// The message without the key.
    pub fn reason(&self) -> String {
        match self {
            AuthError::Io { path, source, .. } => format!("{path}: cannot read: {source}"),
            AuthError::Invalid { reason, .. } => reason.clone(),
        }
    }
}

/// Reads a key file named by configuration key `key`.
pub(crate) fn read_file(key: &str, path: &Path) -> Result<Vec<u8>, AuthError> {
    std::fs::read(path).map_err(|source| AuthError::Io {
        key: key.to_string(),
        path: path.display().to_string(),
        source,
    })
}

/// Everything `[auth]` configures, loaded and checked.
#[derive(Debug)]
pub struct Auth {
    verifier: Option<Verifier>,
    publish_keys: Option<ApiKeys>,
    admin_keys: Option<ApiKeys>,
    anonymous_subscribe: Vec<String>,
    rate: Option<RateLimit>,
    query_token: bool,
    leeway: Duration,
    notes: Vec<String>,
}

impl Auth {
    /// Reads every file `[auth]` names and builds the verifier and key sets. Values alone were
    /// checked when the configuration was parsed; this checks the files.
    pub fn load(cfg: &AuthConfig) -> Result<Auth, AuthError> {
        for (i, p) in cfg.anonymous_subscribe.iter().enumerate() {
            perms::check_pattern(p, false).map_err(|e| {
                AuthError::invalid(
                    &format!("auth.anonymous_subscribe[{i}]"),
                    format!("`{p}` {e}"),
                )
            })?;
        }
        let loaded = keys::load(cfg)?;
        let verifier = if loaded.keys.is_empty() {
            None
        } else {
            Some(Verifier::new(loaded.keys, cfg))
        };
        let api_keys = |key: &str, path: &str, scoped: bool| {
            if path.is_empty() {
                return Ok(None);
            }
            ApiKeys::load(key, Path::new(path), scoped).map(Some)
        };
        Ok(Auth {
            verifier,
            publish_keys: api_keys("auth.api_keys_file", &cfg.api_keys_file, true)?,
            admin_keys: api_keys("auth.admin_api_keys_file", &cfg.admin_api_keys_file, false)?,
            anonymous_subscribe: cfg.anonymous_subscribe.clone(),
            rate: RateLimit::new(cfg.command_rate, cfg.command_burst),
            query_token: cfg.query_token,
            leeway: Duration::from_secs(cfg.leeway.as_secs()),
            notes: loaded.skipped,
        })
    }

    /// No keys, no limits: what the default configuration loads to.
    pub fn disabled() -> Auth {
        Auth {
            verifier: None,
            publish_keys: None,
            admin_keys: None,
            anonymous_subscribe: Vec::new(),
            rate: None,
            query_token: true,
            leeway: Duration::ZERO,
            notes: Vec::new(),
        }
    }

    /// Verifies a token; without any configured key every token is [`Failure::UnknownKey`].
    pub fn verify(&self, token: &[u8]) -> Result<Verified, Failure> {
        match &self.verifier {
            Some(v) => v.verify(token),
            None if token.is_empty() => Err(Failure::Missing),
            None => Err(Failure::UnknownKey),
        }
    }

    pub fn verifier(&self) -> Option<&Verifier> {
        self.verifier.as_ref()
    }

    /// `POST /publish` to `topic` with this `Authorization` value: allowed when no key file is
    /// configured.
    pub fn authorize_publish(
        &self,
        authorization: Option<&[u8]>,
        topic: &str,
    ) -> Result<(), Refusal> {
        match &self.publish_keys {
            Some(k) => k.authorize(authorization, Some(topic)),
            None => Ok(()),
        }
    }

    /// Whether the publish API needs a key.
    pub fn publish_needs_key(&self) -> bool {
        self.publish_keys.is_some()
    }

    /// `/metrics` or `/stats` with this `Authorization` value: allowed when no admin key file
    /// is configured.
    pub fn authorize_admin(&self, authorization: Option<&[u8]>) -> Result<(), Refusal> {
        match &self.admin_keys {
            Some(k) => k.authorize(authorization, None),
            None => Ok(()),
        }
    }

    /// `anonymous_subscribe`, for [`PermTable::new`] and [`PermTable::set_anonymous`].
    pub fn anonymous_subscribe(&self) -> &[String] {
        &self.anonymous_subscribe
    }

    pub fn rate_limit(&self) -> Option<&RateLimit> {
        self.rate.as_ref()
    }

    pub fn query_token(&self) -> bool {
        self.query_token
    }

    /// Added to `exp` when a live connection's token runs out.
    pub fn leeway(&self) -> Duration {
        self.leeway
    }

    /// What loading skipped (JWKS keys of an unsupported type or use), for a warning log.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// One line for the start and reload logs: counts and kids, never a secret.
    pub fn summary(&self) -> String {
        let tokens = match &self.verifier {
            Some(v) => v.describe(),
            None => "no token keys".to_string(),
        };
        let count = |k: &Option<ApiKeys>| k.as_ref().map_or(0, ApiKeys::len);
        format!(
            "{tokens}; {} publish API keys{}; {} admin keys; command rate {}",
            count(&self.publish_keys),
            if self.publish_keys.is_none() {
                " (publishing needs no key)"
            } else {
                ""
            },
            count(&self.admin_keys),
            match &self.rate {
                Some(_) => "limited",
                None => "unlimited",
            }
        )
    }
}

/// The credential of an `Authorization: Bearer ...` header value: the scheme matched without
/// regard to case, spaces around the credential dropped. `None` for another scheme or nothing.
pub fn bearer(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    let (scheme, rest) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") || rest.first() != Some(&b' ') {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// The `token` parameter of a request target's query (`/ws?token=...`), percent-decoded. The
/// first one counts; an empty one is `None`.
pub fn query_token(target: &str) -> Option<Cow<'_, str>> {
    let (_, query) = target.split_once('?')?;
    let value = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("token="))?;
    if value.is_empty() {
        return None;
    }
    if !value.contains('%') {
        return Some(Cow::Borrowed(value));
    }
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    Some(Cow::Owned(String::from_utf8_lossy(&out).into_owned()))
}

/// A value every shard reads and the main thread replaces (SIGHUP): an `Arc` behind a lock,
/// with a generation number so that readers take the lock only after a change.
#[derive(Debug)]
pub struct Reloadable<T> {
    generation: AtomicU64,
    value: parking_lot::Mutex<Arc<T>>,
}

impl<T> Reloadable<T> {
    pub fn new(value: T) -> Reloadable<T> {
        Reloadable {
            generation: AtomicU64::new(0),
            value: parking_lot::Mutex::new(Arc::new(value)),
        }
    }

    /// Swaps in a new value; readers see it on their next [`Local::get`].
    pub fn replace(&self, value: T) {
        let mut v = self.value.lock();
        *v = Arc::new(value);
        // Under the lock, after the value: a reader that sees the new generation finds (at
        // least) this value when it takes the lock.
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub fn load(&self) -> Arc<T> {
        self.value.lock().clone()
    }

    /// A reader's copy, to be kept on its thread.
    pub fn local(&self) -> Local<T> {
        let generation = self.generation.load(Ordering::Acquire);
        Local {
            generation,
            value: self.load(),
        }
    }
}

/// One thread's copy of a [`Reloadable`].
#[derive(Debug)]
pub struct Local<T> {
    generation: u64,
    value: Arc<T>,
}

impl<T> Local<T> {
    /// The current value: one atomic load, and the lock only when it was replaced.
    pub fn get(&mut self, shared: &Reloadable<T>) -> &Arc<T> {
        let g = shared.generation.load(Ordering::Acquire);
        if g != self.generation {
            self.value = shared.load();
            self.generation = g;
        }
        &self.value
    }

    /// The copy as last fetched, without looking for a newer one.
    pub fn cached(&self) -> &Arc<T> {
        &self.value
    }
}

/// What one authenticated (or anonymous, or unauthenticated-route) connection keeps for all of
/// this: its grant and its rate-limit bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnAuth {
    pub grant: Grant,
    pub bucket: Bucket,
}

impl Default for ConnAuth {
    fn default() -> Self {
        ConnAuth {
            grant: Grant::ANONYMOUS,
            bucket: Bucket::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_credentials() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"BEARER abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Bearer"), None);
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(b"Bearerabc"), None);
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b""), None);
    }

    #[test]
    fn query_tokens() {
        assert_eq!(query_token("/ws?token=a.b.c").as_deref(), Some("a.b.c"));
        assert_eq!(
            query_token("/ws?x=1&token=a.b.c&y").as_deref(),
            Some("a.b.c")
        );
        assert_eq!(query_token("/ws?token=a%2Eb.c").as_deref(), Some("a.b.c"));
        assert_eq!(query_token("/ws?token=a%2").as_deref(), Some("a%2"));
        assert_eq!(query_token("/ws?token=1&token=2").as_deref(), Some("1"));
        assert_eq!(query_token("/ws?mytoken=a"), None);
        assert_eq!(query_token("/ws?token="), None);
        assert_eq!(query_token("/ws"), None);
    }

    #[test]
    fn failures_have_names_and_counters() {
        let c = FailureCounters::default();
        c.inc(Failure::Expired);
        c.inc(Failure::Expired);
        c.inc(Failure::Claims);
        assert_eq!(c.get(Failure::Expired), 2);
        assert_eq!(c.get(Failure::Signature), 0);
        let snap = c.snapshot();
        assert_eq!(snap[7], (Failure::Expired, 2));
        assert_eq!(snap[11], (Failure::Claims, 1));
        let mut names: Vec<_> = Failure::ALL.iter().map(|f| f.as_str()).collect();
        names.dedup();
        assert_eq!(names.len(), Failure::ALL.len());
        assert!(Failure::Expired.refreshable() && !Failure::Signature.refreshable());
    }

    #[test]
    fn reloads_reach_readers() {
        let shared = Reloadable::new(1);
        let mut local = shared.local();
        assert_eq!(**local.get(&shared), 1);
        shared.replace(2);
        assert_eq!(**local.cached(), 1);
        assert_eq!(**local.get(&shared), 2);
        assert_eq!(**local.get(&shared), 2);
    }

    #[test]
    fn what_a_connection_keeps() {
        // An authenticated connection's state is as large as an anonymous one's: both keep a
        // grant (8 bytes) and a bucket (8). What an authenticated one adds is its slot in the
        // shard's permission table (28 bytes: its subject inline up to 24 bytes, and the index
        // of its shared pattern lists), within the 32 allowed; `tests/auth_memory.rs` counts it.
        assert_eq!(std::mem::size_of::<ConnAuth>(), 16);
        assert!(ConnAuth::default().grant.is_anonymous());
    }

    const TESTDATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/app/auth/testdata");

    fn route(auth: &str) -> String {
        format!(
            "[[listener]]\nname = \"h\"\naddr = \"127.0.0.1:0\"\nservice = \"http\"\n\
             [[listener.websocket]]\npath = \"/ws\"\n{auth}\n"
        )
    }

    fn err(src: &str) -> (usize, String, String) {
        match parse_config(src, "t.toml").map(drop).unwrap_err() {
            ConfigError::Invalid {
                line, key, reason, ..
            } => (line, key, reason),
            e => panic!("unexpected {e}"),
        }
    }

    #[test]
    fn key_files_that_are_missing_or_malformed_name_the_key_and_the_file() {
        let dir = std::env::temp_dir().join(format!("shardnet-cfg-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let keys = dir.join("keys.txt");
        std::fs::write(&keys, "# publishers\nk_0123456789abcdefgh\nshort\n").unwrap();
        let cases = [
            (
                format!("[auth]\njwks_file = \"{}/absent.json\"\n", dir.display()),
                2,
                "auth.jwks_file",
                "absent.json: cannot read: No such file".to_string(),
            ),
            (
                format!("[auth]\n\napi_keys_file = \"{}\"\n", keys.display()),
                3,
                "auth.api_keys_file",
                format!("{}:3: the key is 5 characters", keys.display()),
            ),
            (
                format!("[auth]\nadmin_api_keys_file = \"{TESTDATA}/ec.pub\"\n"),
                2,
                "auth.admin_api_keys_file",
                "ec.pub:1: the key".to_string(),
            ),
            (
                format!(
                    "[[auth.public_key]]\nkid = \"a\"\nalg = \"RS256\"\nfile = \"{TESTDATA}/ec.pub\"\n"
                ),
                4,
                "auth.public_key[0].file",
                "not a PEM RS256 public key".to_string(),
            ),
            (
                "[auth]\nanonymous_subscribe = [\"ok:*\", \"user:{sub}\"]\n".to_string(),
                2,
                "auth.anonymous_subscribe[1]",
                "`user:{sub}` uses `{sub}`, and there is no subject here".to_string(),
            ),
            (
                "[auth]\nanonymous_subscribe = [\"a*b\"]\n".to_string(),
                2,
                "auth.anonymous_subscribe[0]",
                "only as the last character".to_string(),
            ),
        ];
        for (auth, line, want_key, want) in cases {
            let (l, key, reason) = err(&format!("{auth}{}", route("")));
            assert_eq!((l, key.as_str()), (line, want_key), "{reason}");
            assert!(reason.contains(&want), "{want}: {reason}");
            assert!(!reason.contains("0123456789"), "a key leaked: {reason}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_secret_is_neither_printed_nor_quoted_in_errors() {
        let dir = std::env::temp_dir().join(format!("shardnet-cfg-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secret");
        let secret = "s3cr3t-0123456789-abcdefghij-klmnopqrstuvwxyz";
        std::fs::write(&file, format!("{secret}\n")).unwrap();
        let src = format!(
            "[auth]\nhs256_secret_file = \"{}\"\n{}",
            file.display(),
            route("auth = \"optional\"")
        );
        let (config, auth) = parse_config(&src, "t").unwrap();
        let printed = config.to_toml();
        assert!(printed.contains("hs256_secret_file = "), "{printed}");
        assert!(!printed.contains("s3cr3t"), "{printed}");
        for shown in [format!("{auth:?}"), auth.summary()] {
            assert!(
                !shown.contains("s3cr3t") && !shown.contains("0123456789"),
                "{shown}"
            );
        }
        std::fs::write(&file, "s3cr3t-short\n").unwrap();
        let e = parse_config(&src, "t").map(drop).unwrap_err().to_string();
        assert!(e.contains("t:2:1: key `auth.hs256_secret_file`:"), "{e}");
        assert!(e.contains("holds 12 bytes") && !e.contains("s3cr3t"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_disabled_set_allows_the_publish_api_and_knows_no_keys() {
        let a = Auth::disabled();
        assert_eq!(a.authorize_publish(None, "t"), Ok(()));
        assert_eq!(a.authorize_admin(None), Ok(()));
        assert_eq!(a.verify(b""), Err(Failure::Missing));
        assert_eq!(a.verify(b"a.b.c"), Err(Failure::UnknownKey));
        assert!(a.summary().contains("no token keys"), "{}", a.summary());
    }
}
