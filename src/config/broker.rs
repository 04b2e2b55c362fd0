//! The `[broker]` section: pub/sub across processes and hosts through Redis/Valkey or NATS
//! (`src/broker/` does the work; this is only what the file says and its checks).
//!
//! The url may carry a password (`redis://:secret@host:6379/0`, `nats://user:secret@host:4222`)
//! or, for NATS, a token in the user position (`nats://token@host:4222`). [`BrokerUrl`] keeps it
//! and never shows it: its `Display`, `Debug` and `Serialize` write `***` in its place, so the
//! effective-configuration printout, log lines, errors and metrics cannot leak it. Only
//! [`BrokerUrl::expose`] gives the real text, for the broker client. Parse errors never echo the
//! url either.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::ser::SerializeStruct;
use serde::{Deserialize, Serialize, Serializer};

use super::{duration, size};

/// What `[broker]` says; `kind = "none"` (the default) is in-process pub/sub only.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// Which broker, if any.
    pub kind: BrokerKind,
    /// Where it is (its password or token is never shown).
    pub url: BrokerUrl,
    /// Prepended to every topic to make the channel (Redis) or subject (NATS) name, so that
    /// several deployments can share one broker.
    pub prefix: String,
    /// First delay before reconnecting after a failure; doubles per failed attempt.
    #[serde(deserialize_with = "duration::deserialize")]
    pub reconnect_min: Duration,
    /// Longest delay between reconnection attempts.
    #[serde(deserialize_with = "duration::deserialize")]
    pub reconnect_max: Duration,
    /// Fraction (0 to 1) of each delay drawn at random, so that processes cut off together do
    /// not reconnect together: a delay `d` becomes a value between `(1 - jitter)·d` and `d`.
    pub reconnect_jitter: f64,
    /// One connection attempt (TCP and handshake) gives up after this long.
    #[serde(deserialize_with = "duration::deserialize")]
    pub connect_timeout: Duration,
    /// Publishes waiting for the broker's answer, all shards together; beyond it a publish is
    /// refused at once ("queue full").
    pub max_pending: usize,
    /// The same bound in bytes of payload.
    #[serde(deserialize_with = "size::deserialize")]
    pub max_pending_bytes: usize,
    /// A publish the broker has not accepted within this long is refused ("timeout").
    #[serde(deserialize_with = "duration::deserialize")]
    pub publish_timeout: Duration,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            kind: BrokerKind::None,
            url: BrokerUrl::default(),
            prefix: "shardnet.".into(),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            reconnect_jitter: 0.5,
            connect_timeout: Duration::from_secs(2),
            max_pending: 4096,
            max_pending_bytes: 16 << 20,
            publish_timeout: Duration::from_secs(2),
        }
    }
}

/// The keys other than `kind`, which `kind = "none"` refuses (they would do nothing).
pub(super) const BROKER_KEYS: &[&str] = &[
    "url",
    "prefix",
    "reconnect_min",
    "reconnect_max",
    "reconnect_jitter",
    "connect_timeout",
    "max_pending",
    "max_pending_bytes",
    "publish_timeout",
];

/// Written by hand: with `kind = "none"` only `kind` is printed (the other keys are refused
/// there, so the printout reads back as the same configuration), and the url is redacted.
impl Serialize for BrokerConfig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let on = self.kind != BrokerKind::None;
        let mut st = s.serialize_struct("BrokerConfig", if on { 10 } else { 1 })?;
        st.serialize_field("kind", &self.kind)?;
        if on {
            st.serialize_field("url", &self.url)?;
            st.serialize_field("prefix", &self.prefix)?;
            st.serialize_field("reconnect_min", &duration::format(self.reconnect_min))?;
            st.serialize_field("reconnect_max", &duration::format(self.reconnect_max))?;
            st.serialize_field("reconnect_jitter", &self.reconnect_jitter)?;
            st.serialize_field("connect_timeout", &duration::format(self.connect_timeout))?;
            st.serialize_field("max_pending", &self.max_pending)?;
            st.serialize_field("max_pending_bytes", &size::format(self.max_pending_bytes))?;
            st.serialize_field("publish_timeout", &duration::format(self.publish_timeout))?;
        }
        st.end()
    }
}

/// `broker.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BrokerKind {
    /// No broker: pub/sub within the process.
    None,
    /// Redis or Valkey pub/sub.
    Redis,
    /// NATS core subjects.
    Nats,
}

impl BrokerKind {
    /// The value as the file spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            BrokerKind::None => "none",
            BrokerKind::Redis => "redis",
            BrokerKind::Nats => "nats",
        }
    }

    /// The url schemes this kind takes.
    fn scheme(self) -> &'static str {
        match self {
            BrokerKind::None => "",
            BrokerKind::Redis => "redis",
            BrokerKind::Nats => "nats",
        }
    }
}

/// A user name and a password (or, for NATS, a token and no password), percent-decoded.
pub type Credentials = (String, Option<String>);

/// A broker url, or several comma-separated ones (NATS: the servers of one cluster), that
/// never shows its password or token. Parsed when the file is read: each part is a URL with a
/// host.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct BrokerUrl(String);

impl BrokerUrl {
    /// Builds one from text (tests, tools); the configuration file goes through serde.
    pub fn new(s: impl Into<String>) -> Result<BrokerUrl, String> {
        let s = s.into();
        for part in s.split(',') {
            parse_part(part)?;
        }
        Ok(BrokerUrl(s))
    }

    /// The real text, password included: for the broker client, never for printing.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether no url is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Each comma-separated url, parsed (they all parsed when the value was read).
    pub fn parts(&self) -> impl Iterator<Item = url::Url> + '_ {
        self.0
            .split(',')
            .filter(|p| !p.trim().is_empty())
            .filter_map(|p| parse_part(p).ok())
    }

    /// The user name and password of each part, percent-decoded (`user`, `password`), with the
    /// part's url stripped of them: for clients that take credentials apart from the address
    /// (async-nats). A NATS url with a user and no password carries a token: `(token, None)`.
    pub fn split_credentials(&self) -> Vec<(String, Option<Credentials>)> {
        self.parts()
            .map(|mut u| {
                let user = urlencoding_decode(u.username()).unwrap_or_default();
                let pass = u
                    .password()
                    .map(|p| urlencoding_decode(p).unwrap_or_default());
                let creds = (!user.is_empty() || pass.is_some()).then_some((user, pass));
                let _ = u.set_username("");
                let _ = u.set_password(None);
                (u.to_string(), creds)
            })
            .collect()
    }

    /// The secrets in the url (passwords, NATS tokens), to scrub from any text a client
    /// library produces before it is logged (see `broker::redact`).
    pub fn secrets(&self) -> Vec<String> {
        let mut out = Vec::new();
        for u in self.parts() {
            if let Some(p) = u.password() {
                out.push(p.to_string());
                if let Ok(decoded) = urlencoding_decode(p) {
                    out.push(decoded);
                }
            } else if u.scheme() == "nats" && !u.username().is_empty() {
                out.push(u.username().to_string());
            }
        }
        out.retain(|s| !s.is_empty());
        out
    }
}

/// Percent-decoding for a password (`p%40ss` is the password `p@ss`), so the decoded form is
/// scrubbed too.
fn urlencoding_decode(s: &str) -> Result<String, ()> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).map_err(|_| ())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| ())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ())
}

fn parse_part(part: &str) -> Result<url::Url, String> {
    let part = part.trim();
    let u = url::Url::parse(part).map_err(|e| {
        format!("not a URL ({e}): write it like redis://127.0.0.1:6379/0 or nats://127.0.0.1:4222")
    })?;
    if u.host_str().is_none_or(str::is_empty) {
        return Err(format!("a {}:// url needs a host", u.scheme()));
    }
    Ok(u)
}

/// The url with every password (and NATS token) replaced by `***`.
fn redacted(s: &str) -> String {
    s.split(',')
        .map(|part| match parse_part(part) {
            Ok(mut u) => {
                if u.password().is_some() {
                    let _ = u.set_password(Some("***"));
                } else if u.scheme() == "nats" && !u.username().is_empty() {
                    let _ = u.set_username("***");
                }
                u.to_string()
            }
            Err(_) if part.trim().is_empty() => String::new(),
            // Unparsable text could hide a secret anywhere in it: show none of it.
            Err(_) => "<invalid url>".to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redacted(&self.0))
    }
}

impl fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BrokerUrl({:?})", redacted(&self.0))
    }
}

impl Serialize for BrokerUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&redacted(&self.0))
    }
}

impl<'de> Deserialize<'de> for BrokerUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.trim().is_empty() {
            return Ok(BrokerUrl(String::new()));
        }
        BrokerUrl::new(s).map_err(de::Error::custom)
    }
}

impl BrokerConfig {
    /// The checks of `[broker]` that involve several keys (or the kind); `Err((key, reason))`
    /// with the key relative to `broker.` (`validate.rs` locates it). `max_message` is the
    /// largest message a pub/sub route accepts, with the route's key.
    pub(super) fn check(
        &self,
        spelled: impl Fn(&str) -> bool,
        max_message: Option<(String, usize)>,
    ) -> Result<(), (String, String)> {
        let fail = |k: &str, reason: String| Err((k.to_string(), reason));
        if self.kind == BrokerKind::None {
            if let Some(k) = BROKER_KEYS.iter().find(|k| spelled(k)) {
                return fail(
                    k,
                    "applies only with a broker: set kind = \"redis\" or \"nats\" (kind is \
                     \"none\")"
                        .into(),
                );
            }
            return Ok(());
        }
        let scheme = self.kind.scheme();
        if self.url.is_empty() {
            let example = match self.kind {
                BrokerKind::Redis => "redis://127.0.0.1:6379/0",
                _ => "nats://127.0.0.1:4222",
            };
            return fail(
                "url",
                format!(
                    "kind = \"{}\" needs a url such as \"{example}\"",
                    self.kind.as_str()
                ),
            );
        }
        let parts: Vec<url::Url> = self.url.parts().collect();
        if self.kind == BrokerKind::Redis && parts.len() != 1 {
            return fail(
                "url",
                "Redis takes one url (a comma-separated list is for NATS servers)".into(),
            );
        }
        for u in &parts {
            if u.scheme() != scheme {
                let tls = matches!(u.scheme(), "rediss" | "tls");
                let why = if tls {
                    "TLS to the broker is not supported yet".to_string()
                } else {
                    format!("kind = \"{}\" takes {scheme}:// urls", self.kind.as_str())
                };
                return fail(
                    "url",
                    format!("scheme `{}://` does not match: {why}", u.scheme()),
                );
            }
            if self.kind == BrokerKind::Redis {
                let db = u.path().trim_start_matches('/');
                if !db.is_empty() && db.parse::<u32>().is_err() {
                    return fail(
                        "url",
                        "the path of a redis:// url is a database number, like /0".into(),
                    );
                }
            }
            if u.query().is_some() || u.fragment().is_some() {
                return fail("url", "a broker url takes no ?query or #fragment".into());
            }
        }
        if self.prefix.len() > 128 {
            return fail("prefix", "must be at most 128 bytes".into());
        }
        if self
            .prefix
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return fail(
                "prefix",
                "must not contain spaces or control characters".into(),
            );
        }
        if self.kind == BrokerKind::Nats {
            let p = &self.prefix;
            if p.contains(['*', '>']) || p.starts_with('.') || p.contains("..") {
                return fail(
                    "prefix",
                    format!(
                        "`{p}` cannot start a NATS subject: no `*` or `>`, no leading `.`, no \
                         empty token (`..`)"
                    ),
                );
            }
        }
        if self.reconnect_min.is_zero() {
            return fail("reconnect_min", "must be positive".into());
        }
        if self.reconnect_max < self.reconnect_min {
            return fail(
                "reconnect_max",
                format!(
                    "must be at least reconnect_min ({})",
                    duration::format(self.reconnect_min)
                ),
            );
        }
        if !(0.0..=1.0).contains(&self.reconnect_jitter) {
            return fail(
                "reconnect_jitter",
                format!(
                    "must be between 0 and 1 (a fraction of each delay), found {}",
                    self.reconnect_jitter
                ),
            );
        }
        if self.connect_timeout.is_zero() {
            return fail("connect_timeout", "must be positive".into());
        }
        if self.publish_timeout.is_zero() {
            return fail("publish_timeout", "must be positive".into());
        }
        if self.max_pending == 0 || self.max_pending > 1 << 20 {
            return fail("max_pending", "must be between 1 and 1048576".into());
        }
        if let Some((route_key, max)) = max_message {
            if self.max_pending_bytes < max {
                return fail(
                    "max_pending_bytes",
                    format!(
                        "{} cannot hold one message of {route_key} = {}: every such publish \
                         would be refused; raise it or lower max_message",
                        size::format(self.max_pending_bytes),
                        size::format(max)
                    ),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_and_tokens_are_never_shown() {
        for (url, shown) in [
            (
                "redis://:hunter2@10.0.0.1:6379/0",
                "redis://:***@10.0.0.1:6379/0",
            ),
            ("redis://app:hunter2@h:6379", "redis://app:***@h:6379"),
            ("nats://u:hunter2@h:4222", "nats://u:***@h:4222"),
            ("nats://hunter2@h:4222", "nats://***@h:4222"),
            (
                "nats://a:hunter2@h1:4222,nats://h2:4222",
                "nats://a:***@h1:4222,nats://h2:4222",
            ),
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
        ] {
            let u = BrokerUrl::new(url).unwrap();
            assert_eq!(u.to_string(), shown);
            assert!(!format!("{u:?}").contains("hunter2"), "{u:?}");
            assert!(!toml::to_string(&Wrap { url: u.clone() })
                .unwrap()
                .contains("hunter2"));
            assert_eq!(u.expose(), url);
            if url.contains("hunter2") {
                assert!(u.secrets().iter().any(|s| s == "hunter2"), "{url}");
            }
        }
        let u = BrokerUrl::new("redis://:p%40ss@h:6379").unwrap();
        assert!(u.secrets().iter().any(|s| s == "p@ss"));
        let u = BrokerUrl::new("nats://u:p%40ss@h:4222,nats://tok@h2:4222").unwrap();
        let split = u.split_credentials();
        assert_eq!(split[0].0, "nats://h:4222");
        assert_eq!(
            split[0].1,
            Some(("u".to_string(), Some("p@ss".to_string())))
        );
        assert_eq!(split[1].1, Some(("tok".to_string(), None)));
        assert_eq!(redacted("::not a url:hunter2"), "<invalid url>");
    }

    #[derive(Serialize)]
    struct Wrap {
        url: BrokerUrl,
    }

    fn err(src: &str) -> (usize, usize, String, String) {
        match crate::config::Config::parse(src, "t.toml").unwrap_err() {
            crate::config::ConfigError::Invalid {
                line,
                column,
                key,
                reason,
                ..
            } => (line, column, key, reason),
            e => panic!("unexpected {e}"),
        }
    }

    const L: &str = "[[listener]]\nname = \"e\"\naddr = \"127.0.0.1:0\"\n";

    #[test]
    fn errors_name_the_broker_key() {
        let cases: &[(&str, usize, &str, &str)] = &[
            (
                "kind = \"none\"\nurl = \"redis://h:6379\"\n",
                3,
                "broker.url",
                "applies only",
            ),
            ("kind = \"kafka\"\n", 2, "broker.kind", "unknown variant"),
            ("kind = \"redis\"\n", 1, "broker.url", "needs a url"),
            (
                "kind = \"redis\"\nurl = \"nats://h:4222\"\n",
                3,
                "broker.url",
                "does not match",
            ),
            (
                "kind = \"nats\"\nurl = \"redis://h:6379\"\n",
                3,
                "broker.url",
                "does not match",
            ),
            (
                "kind = \"redis\"\nurl = \"rediss://h:6379\"\n",
                3,
                "broker.url",
                "TLS",
            ),
            (
                "kind = \"redis\"\nurl = \"redis://h:6379/x\"\n",
                3,
                "broker.url",
                "database",
            ),
            (
                "kind = \"redis\"\nurl = \"h:6379\"\n",
                3,
                "broker.url",
                "needs a host",
            ),
            (
                "kind = \"redis\"\nurl = \"no url at all\"\n",
                3,
                "broker.url",
                "not a URL",
            ),
            (
                "kind = \"redis\"\nurl = \"redis://a:1,redis://b:2\"\n",
                3,
                "broker.url",
                "one url",
            ),
            (
                "kind = \"nats\"\nurl = \"nats://h:4222\"\nprefix = \"a.*\"\n",
                4,
                "broker.prefix",
                "NATS subject",
            ),
            (
                "kind = \"redis\"\nurl = \"redis://h:6379\"\nprefix = \"a b\"\n",
                4,
                "broker.prefix",
                "spaces",
            ),
            (
                "kind = \"redis\"\nurl = \"redis://h:6379\"\nreconnect_jitter = 1.5\n",
                4,
                "broker.reconnect_jitter",
                "between 0 and 1",
            ),
            (
                "kind = \"redis\"\nurl = \"redis://h:6379\"\nreconnect_max = \"10ms\"\n",
                4,
                "broker.reconnect_max",
                "at least reconnect_min (100ms)",
            ),
            (
                "kind = \"redis\"\nurl = \"redis://h:6379\"\npublish_timeout = 2\n",
                4,
                "broker.publish_timeout",
                "no unit",
            ),
            (
                "kind = \"redis\"\nurl = \"redis://h:6379\"\nmax_pending = 0\n",
                4,
                "broker.max_pending",
                "between 1",
            ),
        ];
        for (body, line, key, reason_has) in cases {
            let (l, _, k, reason) = err(&format!("[broker]\n{body}{L}"));
            assert_eq!((l, k.as_str()), (*line, *key), "{body}: {reason}");
            assert!(reason.contains(reason_has), "{body}: {reason}");
        }
    }

    #[test]
    fn pending_bytes_must_hold_the_largest_message() {
        let src = format!(
            "[broker]\nkind = \"redis\"\nurl = \"redis://h:6379\"\nmax_pending_bytes = \"64KiB\"\n\
             {L}service = \"http\"\n[[listener.websocket]]\npath = \"/ws\"\n"
        );
        let (line, _, key, reason) = err(&src);
        assert_eq!(
            (line, key.as_str()),
            (4, "broker.max_pending_bytes"),
            "{reason}"
        );
        assert!(
            reason.contains("listener[0].websocket[0].max_message = 1MiB"),
            "{reason}"
        );
    }

    #[test]
    fn printout_redacts_and_reads_back() {
        let src = format!(
            "[broker]\nkind = \"nats\"\nurl = \"nats://u:hunter2@h:4222\"\nreconnect_jitter = 0.25\n{L}"
        );
        let c = crate::config::Config::parse(&src, "t").unwrap();
        assert_eq!(c.broker.url.expose(), "nats://u:hunter2@h:4222");
        let printed = c.to_toml();
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(
            printed.contains("url = \"nats://u:***@h:4222\""),
            "{printed}"
        );
        assert!(!format!("{c:?}").contains("hunter2"));
        let back = crate::config::Config::parse(&printed, "printed").unwrap();
        assert_eq!(back.broker.reconnect_jitter, 0.25);
        assert_eq!(back.broker.kind, BrokerKind::Nats);
        // Without a password the printout is the same configuration.
        let plain = crate::config::Config::parse(
            &format!("[broker]\nkind = \"redis\"\nurl = \"redis://h:6379/2\"\n{L}"),
            "t",
        )
        .unwrap();
        assert_eq!(
            crate::config::Config::parse(&plain.to_toml(), "p").unwrap(),
            plain
        );
        // kind = "none" prints only kind.
        let none = crate::config::Config::parse(L, "t").unwrap().to_toml();
        assert!(none.contains("[broker]\nkind = \"none\"\n"), "{none}");
        assert!(!none.contains("publish_timeout"), "{none}");
    }

    #[test]
    fn bad_urls_are_refused_without_echoing_them() {
        for bad in ["hunter2", "redis://", "nats://:hunter2@"] {
            let e = BrokerUrl::new(bad).unwrap_err();
            assert!(!e.contains("hunter2"), "{e}");
        }
    }
}
