//! API keys: the application's credentials for `POST /publish` (and, in a file of their own,
//! for the admin routes).
//!
//! A key file holds one key per line, so that rotation is adding the new key, reloading
//! (SIGHUP), moving the application over, then deleting the old line and reloading again. A
//! key may be followed by topic patterns (`chat:*`), which scope it: it may publish only on
//! those topics. Blank lines and lines starting with `#` are comments, as is everything from a
//! word starting with `#`:
//!
//! ```text
//! # the backend: every topic
//! k_3c1f9a7e0b5d4c2a8e6f
//! # the news job: two prefixes only
//! k_77ab03de19c54f60b2aa news:* alerts:*
//! ```
//!
//! The keys are not kept: only their SHA-256 digests, compared with the digest of the key a
//! request presents in constant time (`subtle`) and against every configured key, so neither
//! the comparison's time nor the set's size depends on how much of a key was right. Errors
//! name the file and line, never the key.

use std::path::Path;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::perms::{self, check_pattern};

/// The shortest key accepted: anything shorter is guessable.
pub const MIN_KEY_LEN: usize = 16;
/// The longest key accepted (it is also bounded by the request header limit).
pub const MAX_KEY_LEN: usize = 512;

/// Why a request's key is not accepted: 401 for the first two, 403 for the last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No `Authorization: Bearer` header.
    Missing,
    /// A key, but not one of the file's.
    Wrong,
    /// A valid key whose patterns do not include the topic.
    Forbidden,
}

impl Refusal {
    pub fn status(self) -> u16 {
        match self {
            Refusal::Missing | Refusal::Wrong => 401,
            Refusal::Forbidden => 403,
        }
    }

    /// The metric label and the `error` of the JSON answer.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Missing => "missing_key",
            Refusal::Wrong => "wrong_key",
            Refusal::Forbidden => "topic_not_allowed",
        }
    }
}

struct Key {
    digest: [u8; 32],
    /// Topic patterns; empty = every topic.
    scope: Box<[Box<str>]>,
}

/// The keys of one file.
pub struct ApiKeys {
    keys: Vec<Key>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.keys.len())
    }
}

fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

impl ApiKeys {
    /// Parses a key file's text; `scoped` says whether keys may carry topic patterns (publish
    /// keys) or not (admin keys). An error is the 1-based line (`None` for the whole file) and
    /// the reason, which never includes the key.
    pub fn parse(text: &str, scoped: bool) -> Result<ApiKeys, (Option<usize>, String)> {
        let mut keys: Vec<(usize, Key)> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let n = n + 1;
            let mut words = line.split_whitespace().take_while(|w| !w.starts_with('#'));
            let Some(key) = words.next() else {
                continue;
            };
            let len = key.chars().count();
            let at = |reason: String| (Some(n), reason);
            if len < MIN_KEY_LEN {
                return Err(at(format!(
                    "the key is {len} characters; at least {MIN_KEY_LEN} are needed"
                )));
            }
            if len > MAX_KEY_LEN {
                return Err(at(format!(
                    "the key is longer than {MAX_KEY_LEN} characters"
                )));
            }
            if !key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(at(
                    "the key holds a character other than printable ASCII".into()
                ));
            }
            let scope: Box<[Box<str>]> = words.map(Box::from).collect();
            if !scoped && !scope.is_empty() {
                return Err(at(format!(
                    "admin keys take no topic patterns (found {})",
                    scope.len()
                )));
            }
            for (i, p) in scope.iter().enumerate() {
                check_pattern(p, false).map_err(|e| at(format!("pattern {} `{p}` {e}", i + 1)))?;
            }
            let digest = digest(key.as_bytes());
            if let Some((first, _)) = keys.iter().find(|(_, k)| k.digest == digest) {
                return Err(at(format!("the same key as line {first}")));
            }
            keys.push((n, Key { digest, scope }));
        }
        if keys.is_empty() {
            return Err((
                None,
                "holds no key (one per line; `#` starts a comment)".into(),
            ));
        }
        Ok(ApiKeys {
            keys: keys.into_iter().map(|(_, k)| k).collect(),
        })
    }

    /// Reads and parses the key file that configuration key `key` names; the error says
    /// `path:line: reason`.
    pub fn load(key: &str, path: &Path, scoped: bool) -> Result<ApiKeys, super::AuthError> {
        let bytes = super::read_file(key, path)?;
        let at = |line: Option<usize>, reason: String| {
            let line = line.map_or(String::new(), |n| format!(":{n}"));
            super::AuthError::invalid(key, format!("{}{line}: {reason}", path.display()))
        };
        let text = std::str::from_utf8(&bytes).map_err(|e| {
            at(
                None,
                format!("not text (invalid UTF-8 at byte {})", e.valid_up_to()),
            )
        })?;
        ApiKeys::parse(text, scoped).map_err(|(line, reason)| at(line, reason))
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks the `Authorization` header's value (`None` when absent) for `topic` (`None` for
    /// routes without one, such as the admin routes).
    pub fn authorize(
        &self,
        authorization: Option<&[u8]>,
        topic: Option<&str>,
    ) -> Result<(), Refusal> {
        let presented = authorization
            .and_then(super::bearer)
            .ok_or(Refusal::Missing)?;
        let d = digest(presented);
        // Every key is compared, whichever matches: the time does not say which one did.
        let mut found: Option<&Key> = None;
        for k in &self.keys {
            if bool::from(d.ct_eq(&k.digest)) {
                found = Some(k);
            }
        }
        let key = found.ok_or(Refusal::Wrong)?;
        match topic {
            Some(t) if !key.scope.is_empty() && !perms::any_matches(&key.scope, "", t) => {
                Err(Refusal::Forbidden)
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "# the backend\n\
                        k_backend_0123456789abcdef\n\
                        \n\
                        k_newsjob_0123456789abcdef news:* alerts:*  # the news job\n";

    fn bearer(k: &str) -> Vec<u8> {
        format!("Bearer {k}").into_bytes()
    }

    #[test]
    fn keys_scopes_and_refusals() {
        let keys = ApiKeys::parse(FILE, true).unwrap();
        assert_eq!(keys.len(), 2);
        let ok = |k: &str, t: &str| keys.authorize(Some(&bearer(k)), Some(t));
        assert_eq!(ok("k_backend_0123456789abcdef", "chat:x"), Ok(()));
        assert_eq!(ok("k_newsjob_0123456789abcdef", "news:today"), Ok(()));
        assert_eq!(ok("k_newsjob_0123456789abcdef", "alerts:"), Ok(()));
        assert_eq!(
            ok("k_newsjob_0123456789abcdef", "chat:x"),
            Err(Refusal::Forbidden)
        );
        assert_eq!(
            ok("k_backend_0123456789abcdeX", "chat:x"),
            Err(Refusal::Wrong)
        );
        assert_eq!(
            ok("k_backend_0123456789abcde", "chat:x"),
            Err(Refusal::Wrong)
        );
        assert_eq!(ok("", "chat:x"), Err(Refusal::Missing));
        assert_eq!(keys.authorize(None, Some("chat:x")), Err(Refusal::Missing));
        assert_eq!(
            keys.authorize(Some(b"Basic k_backend_0123456789abcdef"), None),
            Err(Refusal::Missing)
        );
        assert_eq!(
            keys.authorize(Some(b"bearer   k_backend_0123456789abcdef "), None),
            Ok(()),
            "the scheme is case-insensitive and spaces around the key do not count"
        );
        // No topic (the admin routes): any valid key.
        assert_eq!(
            keys.authorize(Some(&bearer("k_newsjob_0123456789abcdef")), None),
            Ok(())
        );
        assert_eq!(Refusal::Missing.status(), 401);
        assert_eq!(Refusal::Wrong.status(), 401);
        assert_eq!(Refusal::Forbidden.status(), 403);
    }

    #[test]
    fn bad_files_name_the_line_and_never_the_key() {
        let cases = [
            ("short_key_123\n", Some(1), "the key is 13 characters"),
            (
                "# c\nk_0123456789abcdefgh\nk_0123456789abcdefgh\n",
                Some(3),
                "the same key as line 2",
            ),
            (
                "k_0123456789abcdefgh chat:*x\n",
                Some(1),
                "pattern 1 `chat:*x`",
            ),
            (
                "k_0123456789abcdefgh user:{sub}\n",
                Some(1),
                "no subject here",
            ),
            ("# only comments\n\n", None, "holds no key"),
            ("k_0123456789abcdefgé\n", Some(1), "printable ASCII"),
        ];
        for (text, line, want) in cases {
            let (l, e) = ApiKeys::parse(text, true).unwrap_err();
            assert_eq!(l, line, "{text:?}: {e}");
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(!e.contains("0123456789"), "the key leaked: {e}");
        }
        let (l, e) = ApiKeys::parse("k_0123456789abcdefgh news:*\n", false).unwrap_err();
        assert_eq!(l, Some(1));
        assert!(e.contains("admin keys take no topic patterns"), "{e}");
        let admin = ApiKeys::parse("k_0123456789abcdefgh\n", false).unwrap();
        assert_eq!(
            admin.authorize(Some(&bearer("k_0123456789abcdefgh")), None),
            Ok(())
        );
        assert_eq!(format!("{admin:?}"), "ApiKeys(1 keys)");
    }
}
