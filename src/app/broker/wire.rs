//! What goes over the broker: channel and subject names, and the message header.
//!
//! Names: the configured prefix, then the topic. Redis channels are binary-safe, so the topic
//! goes as it is (`shardnet.chat`). NATS subjects are dot-separated tokens without spaces or
//! the wildcards `*` and `>`, so a topic is escaped: bytes outside `A-Z a-z 0-9 - _` are written
//! `%XX`, except a dot between two non-empty tokens, which stays a dot (`chat.room1` →
//! `shardnet.chat.room1`, so other NATS clients can use subject hierarchies and wildcards;
//! `a..b` → `shardnet.a%2E%2Eb`). Decoding undoes it, and any subject decodes to the topic
//! a shardnet publish of it would use.
//!
//! Header: a message shardnet publishes is `HEADER_LEN` bytes of header, then the data:
//! `00 'S' 'N' '1'`, the origin process (u64, little-endian, random per process) and the
//! publish time (u64 nanoseconds on the origin's monotonic clock). JSON and text never start
//! with a zero byte, so a message another program publishes (`PUBLISH shardnet.chat '{"a":1}'`)
//! is recognised as bare data. The origin and time give this process the publish-to-delivery
//! latency of its own publishes; times from other processes are not compared (their clocks are
//! not this one).

/// Header bytes before the data of a message shardnet publishes.
pub const HEADER_LEN: usize = 20;
const MAGIC: [u8; 4] = [0, b'S', b'N', b'1'];

/// `header + data` for one publish.
pub fn encode(origin: u64, published_ns: u64, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN + data.len());
    v.extend_from_slice(&MAGIC);
    v.extend_from_slice(&origin.to_le_bytes());
    v.extend_from_slice(&published_ns.to_le_bytes());
    v.extend_from_slice(data);
    v
}

/// `(origin, publish time)` when the payload has shardnet's header, and the data.
pub fn decode(payload: &[u8]) -> (Option<(u64, u64)>, &[u8]) {
    if payload.len() >= HEADER_LEN && payload[..4] == MAGIC {
        let origin = u64::from_le_bytes(payload[4..12].try_into().unwrap_or_default());
        let at = u64::from_le_bytes(payload[12..20].try_into().unwrap_or_default());
        (Some((origin, at)), &payload[HEADER_LEN..])
    } else {
        (None, payload)
    }
}

/// The Redis channel of `topic`.
pub fn channel_for_redis(prefix: &str, topic: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(prefix.len() + topic.len());
    v.extend_from_slice(prefix.as_bytes());
    v.extend_from_slice(topic.as_bytes());
    v
}

/// The topic of a Redis channel, if it is under `prefix` and UTF-8.
pub fn topic_from_redis<'a>(prefix: &str, channel: &'a [u8]) -> Option<&'a str> {
    let rest = channel.strip_prefix(prefix.as_bytes())?;
    std::str::from_utf8(rest).ok().filter(|t| !t.is_empty())
}

fn plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// The NATS subject of `topic` (see the module documentation for the escaping).
pub fn subject_for_nats(prefix: &str, topic: &str) -> String {
    let bytes = topic.as_bytes();
    let mut s = String::with_capacity(prefix.len() + bytes.len() + 8);
    s.push_str(prefix);
    for (i, &b) in bytes.iter().enumerate() {
        let inner_dot = b == b'.'
            && i > 0
            && i + 1 < bytes.len()
            && bytes[i - 1] != b'.'
            && bytes[i + 1] != b'.';
        if plain(b) || inner_dot {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

/// The topic of a NATS subject under `prefix`, if it decodes to UTF-8.
pub fn topic_from_nats(prefix: &str, subject: &str) -> Option<String> {
    let rest = subject.strip_prefix(prefix)?.as_bytes();
    let mut out = Vec::with_capacity(rest.len());
    let mut i = 0;
    while i < rest.len() {
        if rest[i] == b'%' {
            let hex = rest.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(rest[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_bare_data_passes() {
        let m = encode(7, 123_456, b"{\"a\":1}");
        assert_eq!(m.len(), HEADER_LEN + 7);
        assert_eq!(decode(&m), (Some((7, 123_456)), &b"{\"a\":1}"[..]));
        assert_eq!(decode(b"{\"a\":1}"), (None, &b"{\"a\":1}"[..]));
        assert_eq!(decode(b"hello"), (None, &b"hello"[..]));
        assert_eq!(decode(b""), (None, &b""[..]));
        // A short payload that starts like the header is data.
        assert_eq!(decode(&MAGIC), (None, &MAGIC[..]));
    }

    #[test]
    fn redis_channels_are_the_topic_under_the_prefix() {
        let c = channel_for_redis("shardnet.", "chat room");
        assert_eq!(c, b"shardnet.chat room");
        assert_eq!(topic_from_redis("shardnet.", &c), Some("chat room"));
        assert_eq!(topic_from_redis("shardnet.", b"other.chat"), None);
        assert_eq!(topic_from_redis("shardnet.", b"shardnet."), None);
    }

    #[test]
    fn nats_subjects_escape_what_nats_refuses() {
        for (topic, subject) in [
            ("chat", "sn.chat"),
            ("chat.room1", "sn.chat.room1"),
            ("a b", "sn.a%20b"),
            ("*", "sn.%2A"),
            ("a.>", "sn.a.%3E"),
            (".a", "sn.%2Ea"),
            ("a.", "sn.a%2E"),
            ("a..b", "sn.a%2E%2Eb"),
            ("50%", "sn.50%25"),
            ("é", "sn.%C3%A9"),
        ] {
            assert_eq!(subject_for_nats("sn.", topic), subject, "{topic}");
            assert_eq!(
                topic_from_nats("sn.", subject).as_deref(),
                Some(topic),
                "{subject}"
            );
            // Every token of the subject is non-empty and free of wildcards and spaces.
            assert!(
                subject
                    .split('.')
                    .all(|t| !t.is_empty() && !t.contains(['*', '>', ' '])),
                "{subject}"
            );
        }
        assert_eq!(topic_from_nats("sn.", "other.chat"), None);
        assert_eq!(topic_from_nats("sn.", "sn.%zz"), None);
        assert_eq!(topic_from_nats("sn.", "sn.%C3"), None);
    }
}
