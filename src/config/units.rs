//! Units in the configuration file: sizes and durations, parsed inside serde so that the TOML
//! library reports the span of a bad value, and formatted back the way a person writes them
//! (the effective-config printout and the log lines use [`size::format`] and
//! [`duration::format`], so `"0s"` is printed `0s`, never `0ns`).
//!
//! Sizes accept a plain integer (bytes: the one base unit, so no reading of a bare number is
//! surprising). Durations do not: a bare `300` could mean seconds or milliseconds, a 1000×
//! difference, so a duration must carry its unit and a bare number is refused with an example.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Serializer;

/// Sizes: `"64KiB"`, `"1MiB"`, `"2GiB"`, `"512B"`, `"4kB"` (powers of 1000 for kB/MB/GB), or
/// an integer of bytes.
pub mod size {
    use super::*;

    const UNITS: &[(&str, u64)] = &[
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
        ("GB", 1_000_000_000),
        ("MB", 1_000_000),
        ("kB", 1_000),
        ("KB", 1_000),
        ("B", 1),
    ];

    pub fn parse(s: &str) -> Result<usize, String> {
        let t = s.trim();
        let (num, mult) = UNITS
            .iter()
            .find_map(|(u, m)| t.strip_suffix(u).map(|n| (n.trim(), *m)))
            .unwrap_or((t, 1));
        let n: u64 = num.parse().map_err(|_| {
            format!("`{s}` is not a size (use bytes or a unit: B, KiB, MiB, GiB, kB, MB, GB)")
        })?;
        n.checked_mul(mult)
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| format!("`{s}` is too large"))
    }

    /// The largest binary unit that divides `v` exactly: `65536` is `64KiB`, `1000` is `1000B`.
    pub fn format(v: usize) -> String {
        for (u, m) in [("GiB", 1usize << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if v >= m && v.is_multiple_of(m) {
                return format!("{}{u}", v / m);
            }
        }
        format!("{v}B")
    }

    pub fn serialize<S: Serializer>(v: &usize, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = usize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as \"64KiB\" or a number of bytes")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<usize, E> {
                parse(v).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<usize, E> {
                usize::try_from(v).map_err(|_| E::custom(format!("a size cannot be negative: {v}")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<usize, E> {
                usize::try_from(v).map_err(|_| E::custom("too large"))
            }
        }
        d.deserialize_any(V)
    }
}

/// Durations: humantime strings (`"30s"`, `"500ms"`, `"5m"`, `"1h 30m"`); `"0s"` for zero.
pub mod duration {
    use super::*;

    pub fn parse(s: &str) -> Result<Duration, String> {
        humantime::parse_duration(s.trim())
            .map_err(|e| format!("`{s}` is not a duration such as \"30s\" or \"500ms\" ({e})"))
    }

    /// Compact humantime: `5m`, `1s500ms`, and `0s` for zero (humantime alone writes `0s` too,
    /// but `Debug` for `Duration` writes `0ns`, which is not what the file says).
    pub fn format(d: Duration) -> String {
        if d.is_zero() {
            "0s".into()
        } else {
            humantime::format_duration(d).to_string().replace(' ', "")
        }
    }

    pub fn serialize<S: Serializer>(v: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        struct V;
        impl V {
            fn bare_number<E: de::Error>(n: impl fmt::Display) -> E {
                E::custom(format!(
                    "{n} has no unit: write a duration such as \"{n}s\" or \"{n}ms\""
                ))
            }
        }
        impl Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as \"300s\" or \"500ms\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                parse(v).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
                Err(V::bare_number(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
                Err(V::bare_number(v))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
                Err(V::bare_number(v))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_format() {
        assert_eq!(size::parse("64KiB"), Ok(65536));
        assert_eq!(size::parse("1MiB"), Ok(1 << 20));
        assert_eq!(size::parse("4kB"), Ok(4000));
        assert_eq!(size::parse("512"), Ok(512));
        assert!(size::parse("-1KiB").is_err());
        assert!(size::parse("10 parsecs").is_err());
        assert!(size::parse("99999999999GiB").is_err());
        assert_eq!(size::format(65536), "64KiB");
        assert_eq!(size::format(3 << 20), "3MiB");
        assert_eq!(size::format(1000), "1000B");
        assert_eq!(size::format(0), "0B");
    }

    #[test]
    fn durations_parse_and_format() {
        assert_eq!(duration::parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(duration::parse("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(duration::parse("1h 30m"), Ok(Duration::from_secs(5400)));
        assert!(duration::parse("10 parsecs").is_err());
        assert_eq!(duration::format(Duration::from_millis(1500)), "1s500ms");
        assert_eq!(duration::format(Duration::ZERO), "0s");
        assert_eq!(duration::format(Duration::from_secs(300)), "5m");
        for d in [
            Duration::ZERO,
            Duration::from_millis(1500),
            Duration::from_secs(86_400),
        ] {
            assert_eq!(duration::parse(&duration::format(d)), Ok(d));
        }
    }
}
