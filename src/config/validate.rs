//! Checks across keys, run after a file has deserialized (checks of one value alone run inside
//! the deserializers, where the TOML library reports the value's span).
//!
//! Each failure names the dotted key at fault and points at it in the file; a key the file
//! leaves to its default is pointed at through its table's header (`[[listener.websocket]]`),
//! never at 1:1 unless the file has no such table at all.

use super::auth::{bounds, REGISTERED_CLAIMS};
use super::spans::Spans;
use super::{duration, size, Config, ConfigError, RouteAuth, ServiceKind, Shards, WsMode};

/// The longest WebSocket frame header a client sends (2 bytes, an 8-byte length, a 4-byte mask):
/// a frame of `max_message` bytes occupies this much more in the read buffer.
const WS_MAX_FRAME_HEADER: usize = 14;

/// Bounds of `[offload]`: threads beyond a thousand are a misconfiguration, and a queue beyond a
/// million jobs is no longer backpressure.
const MAX_OFFLOAD_THREADS: usize = 1024;
const MAX_OFFLOAD_QUEUE: usize = 1_000_000;

/// Keys a listener takes only when `service = "http"`.
const HTTP_ONLY_KEYS: &[&str] = &["max_header", "max_body", "header_timeout", "admin_routes"];

impl Config {
    pub(super) fn check(&self, spans: &Spans, src: &str, file: &str) -> Result<(), ConfigError> {
        let fail = |path: &str, reason: String| {
            Err(super::invalid(
                src,
                file,
                spans.at(path),
                path.to_string(),
                reason,
            ))
        };
        let s = &self.server;
        if self.listeners.is_empty() {
            return fail("listener", "at least one [[listener]] is required".into());
        }
        if s.read_buffer < 4096 || s.read_buffer > 16 << 20 {
            return fail(
                "server.read_buffer",
                "must be between 4KiB and 16MiB".into(),
            );
        }
        if s.read_budget < s.read_buffer {
            return fail("server.read_budget", "must be at least read_buffer".into());
        }
        if s.events_per_wait == 0 || s.events_per_wait > 65536 {
            return fail(
                "server.events_per_wait",
                "must be between 1 and 65536".into(),
            );
        }
        if let Shards::Count(n) = s.shards {
            if !s.cores.is_empty() && s.cores.len() < n.get() {
                return fail(
                    "server.cores",
                    format!(
                        "lists {} cores for {} shards: give one per shard",
                        s.cores.len(),
                        n
                    ),
                );
            }
        }
        if !(1..=MAX_OFFLOAD_THREADS).contains(&self.offload.threads) {
            return fail(
                "offload.threads",
                format!("must be between 1 and {MAX_OFFLOAD_THREADS}"),
            );
        }
        if !(1..=MAX_OFFLOAD_QUEUE).contains(&self.offload.queue) {
            return fail(
                "offload.queue",
                format!("must be between 1 and {MAX_OFFLOAD_QUEUE}"),
            );
        }
        let limits = &self.limits;
        if limits.max_write_buffer == 0 {
            return fail("limits.max_write_buffer", "must be positive".into());
        }
        if limits.max_read_buffer < 1024 {
            return fail("limits.max_read_buffer", "must be at least 1KiB".into());
        }
        self.check_broker(spans, &fail)?;
        for (i, l) in self.listeners.iter().enumerate() {
            let key = |k: &str| format!("listener[{i}].{k}");
            if l.name.is_empty() {
                return fail(&key("name"), "every listener needs a name".into());
            }
            if self.listeners[..i].iter().any(|o| o.name == l.name) {
                return fail(
                    &key("name"),
                    format!("duplicate listener name `{}`", l.name),
                );
            }
            if l.addr.port() != 0
                && self.listeners[..i].iter().any(|o| o.addr == l.addr)
                && !l.reuse_port
            {
                return fail(
                    &key("addr"),
                    format!("{} is used by another listener", l.addr),
                );
            }
            if l.backlog == 0 || l.backlog > 65535 {
                return fail(&key("backlog"), "must be between 1 and 65535".into());
            }
            if l.service != ServiceKind::Http {
                if !l.websocket.is_empty() {
                    return fail(
                        &key("websocket"),
                        "WebSocket routes need service = \"http\" (this listener is \"echo\")"
                            .into(),
                    );
                }
                // Refused rather than ignored: the key would do nothing, and the effective
                // configuration printout (which leaves these keys out of echo listeners) would
                // otherwise not read back as the same configuration.
                if let Some(k) = HTTP_ONLY_KEYS.iter().find(|k| spans.contains(&key(k))) {
                    return fail(
                        &key(k),
                        "applies to HTTP listeners only (this listener is service = \"echo\")"
                            .into(),
                    );
                }
            }
            if let Some(tls) = &l.tls {
                for (k, path) in [("cert", &tls.cert), ("key", &tls.key)] {
                    if path.as_os_str().is_empty() {
                        return fail(&key(&format!("tls.{k}")), "needs a file path".into());
                    }
                }
                if tls
                    .client_ca
                    .as_ref()
                    .is_some_and(|p| p.as_os_str().is_empty())
                {
                    return fail(&key("tls.client_ca"), "needs a file path".into());
                }
                if tls.handshake_timeout.is_zero() {
                    return fail(
                        &key("tls.handshake_timeout"),
                        "must be positive: a handshake that never finishes would hold its \
                         connection forever"
                            .into(),
                    );
                }
            }
            for (j, w) in l.websocket.iter().enumerate() {
                let key = |k: &str| format!("listener[{i}].websocket[{j}].{k}");
                if !w.path.starts_with('/') {
                    return fail(&key("path"), format!("`{}` must start with '/'", w.path));
                }
                if l.websocket[..j].iter().any(|o| o.path == w.path) {
                    return fail(
                        &key("path"),
                        format!("duplicate WebSocket path `{}`", w.path),
                    );
                }
                if w.max_message == 0 {
                    return fail(&key("max_message"), "must be positive".into());
                }
                // 8 is in RFC 7692's range, but zlib cannot compress raw deflate with it.
                if !(9..=15).contains(&w.compression_window_bits) {
                    return fail(
                        &key("compression_window_bits"),
                        format!(
                            "must be between 9 and 15 (a window of 512 bytes to 32KiB), found {}",
                            w.compression_window_bits
                        ),
                    );
                }
                // A frame is parsed only once it is whole in the read buffer, so a message
                // limit the buffer cannot hold would never be reached: the connection would hit
                // max_read_buffer first. Refused, so the limit configured is the limit enforced.
                if w.max_message + WS_MAX_FRAME_HEADER > limits.max_read_buffer {
                    let (message, buffer) = (
                        size::format(w.max_message),
                        size::format(limits.max_read_buffer),
                    );
                    let fix = "lower max_message or raise limits.max_read_buffer";
                    let route_key = key("max_message");
                    if !spans.contains(&route_key) && spans.contains("limits.max_read_buffer") {
                        return fail(
                            "limits.max_read_buffer",
                            format!(
                                "{buffer} cannot hold a message of {route_key} = {message} \
                                 (the default) plus its {WS_MAX_FRAME_HEADER}-byte frame \
                                 header: {fix}"
                            ),
                        );
                    }
                    return fail(
                        &route_key,
                        format!(
                            "{message} (plus a {WS_MAX_FRAME_HEADER}-byte frame header) does not \
                             fit in limits.max_read_buffer = {buffer}, so such a message could \
                             never be received: {fix}"
                        ),
                    );
                }
            }
        }
        self.check_auth(&fail)
    }

    /// `[auth]`'s values and the routes that need it. Its files and patterns are the product's
    /// to check (`app::auth::load_config`, through [`Config::parse_with`]).
    fn check_auth(
        &self,
        fail: &dyn Fn(&str, String) -> Result<(), ConfigError>,
    ) -> Result<(), ConfigError> {
        let a = &self.auth;
        if a.leeway > bounds::MAX_LEEWAY || a.leeway.subsec_nanos() != 0 {
            return fail(
                "auth.leeway",
                format!(
                    "must be whole seconds, at most {}",
                    duration::format(bounds::MAX_LEEWAY)
                ),
            );
        }
        if a.max_token_size < bounds::MIN_TOKEN_SIZE || a.max_token_size > bounds::MAX_TOKEN_SIZE {
            return fail(
                "auth.max_token_size",
                format!(
                    "must be between {} and {}",
                    size::format(bounds::MIN_TOKEN_SIZE),
                    size::format(bounds::MAX_TOKEN_SIZE)
                ),
            );
        }
        for (key, claim) in [
            ("auth.subscribe_claim", &a.subscribe_claim),
            ("auth.publish_claim", &a.publish_claim),
        ] {
            if claim.is_empty() {
                return fail(key, "must name a claim".into());
            }
            if REGISTERED_CLAIMS.contains(&claim.as_str()) {
                return fail(
                    key,
                    format!("`{claim}` is a registered claim with a meaning of its own"),
                );
            }
        }
        if a.subscribe_claim == a.publish_claim {
            return fail(
                "auth.publish_claim",
                "must differ from subscribe_claim (publishing is granted apart)".into(),
            );
        }
        if a.command_rate > bounds::MAX_COMMAND_RATE {
            return fail(
                "auth.command_rate",
                format!("at most {} per second", bounds::MAX_COMMAND_RATE),
            );
        }
        if a.command_burst == 0 || a.command_burst > u32::from(u16::MAX) {
            return fail(
                "auth.command_burst",
                format!("must be between 1 and {}", u16::MAX),
            );
        }
        if !a.hs256_secret_file.is_empty() && !a.hs256_secret_env.is_empty() {
            return fail(
                "auth.hs256_secret_env",
                "give the HS256 secret in a file or in the environment, not both".into(),
            );
        }
        if !a.hs256_kid.is_empty()
            && a.hs256_secret_file.is_empty()
            && a.hs256_secret_env.is_empty()
        {
            return fail(
                "auth.hs256_kid",
                "names the kid of an HS256 secret, and none is configured".into(),
            );
        }
        for (i, k) in a.public_keys.iter().enumerate() {
            if k.file.is_empty() {
                return fail(
                    &format!("auth.public_key[{i}].file"),
                    "every public key needs its PEM file".into(),
                );
            }
        }
        for (i, l) in self.listeners.iter().enumerate() {
            for (j, w) in l.websocket.iter().enumerate() {
                if w.auth != RouteAuth::Off && !a.has_token_keys() {
                    return fail(
                        &format!("listener[{i}].websocket[{j}].auth"),
                        "needs a key to verify tokens with in [auth] (hs256_secret_file, \
                         hs256_secret_env, public_key or jwks_file)"
                            .into(),
                    );
                }
            }
        }
        Ok(())
    }

    /// `[broker]`: its own checks, and its byte bound against the largest pub/sub message.
    fn check_broker(
        &self,
        spans: &Spans,
        fail: &dyn Fn(&str, String) -> Result<(), ConfigError>,
    ) -> Result<(), ConfigError> {
        let largest = self
            .listeners
            .iter()
            .enumerate()
            .flat_map(|(i, l)| {
                l.websocket
                    .iter()
                    .enumerate()
                    .filter(|(_, w)| w.mode == WsMode::Pubsub)
                    .map(move |(j, w)| {
                        (
                            format!("listener[{i}].websocket[{j}].max_message"),
                            w.max_message,
                        )
                    })
            })
            .max_by_key(|(_, m)| *m);
        match self
            .broker
            .check(|k| spans.contains(&format!("broker.{k}")), largest)
        {
            Ok(()) => Ok(()),
            Err((key, reason)) => fail(&format!("broker.{key}"), reason),
        }
    }
}
