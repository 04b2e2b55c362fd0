//! The product's HTTP routes: `/plaintext`, `/json`, `/healthz`, `/metrics`, `/stats`,
//! `POST /publish/{topic}` and the WebSocket upgrade paths.
//!
//! A [`Routes`] is built per call of the HTTP codec on the shard's thread, borrowing what the
//! routes read (the listener's route table, the counters, the fan-out); it implements
//! [`Handler`], so the codec calls it once per complete request and gets the status back.

use super::metrics::{Metrics, ServiceCounters};
use super::pubsub::{self, Fanout, Refused, TopicLimits};
use crate::service::deflate;
use crate::service::http::{Handler, Request, Response, Sent};

/// The routes one HTTP listener serves, fixed at start.
pub struct ListenerRoutes {
    /// Serve `/metrics` and `/stats`.
    pub admin_routes: bool,
    /// WebSocket paths, by route index.
    pub websocket: Vec<WsPath>,
    /// What `POST /publish` accepts: the largest topic and message any pub/sub route of the
    /// configuration could carry (a subscriber on any listener may receive it).
    pub publish: TopicLimits,
}

/// What the upgrade of one WebSocket path checks and negotiates.
pub struct WsPath {
    pub path: String,
    /// Origin values accepted (empty: any).
    pub allowed_origins: Vec<String>,
    pub compression: deflate::Settings,
}

/// One shard's routes for one call.
pub struct Routes<'a> {
    pub listener: &'a ListenerRoutes,
    pub metrics: &'a Metrics,
    pub counters: &'a ServiceCounters,
    pub fanout: &'a Fanout,
    pub draining: bool,
}

impl Handler for Routes<'_> {
    fn request(&mut self, r: &Request<'_>, resp: Response<'_>) -> Sent {
        let path = r.path();
        let get = matches!(r.method(), "GET" | "HEAD");
        if let Some(i) = self.listener.websocket.iter().position(|w| w.path == path) {
            let w = &self.listener.websocket[i];
            return resp.upgrade(r, &w.allowed_origins, w.compression, i);
        }
        match path {
            "/metrics" | "/stats" if !self.listener.admin_routes => {
                resp.send(404, "text/plain", b"not found\n", "")
            }
            "/plaintext" | "/json" | "/healthz" | "/metrics" | "/stats" if !get => resp.send(
                405,
                "text/plain",
                b"method not allowed\n",
                "Allow: GET, HEAD\r\n",
            ),
            "/plaintext" => resp.send(200, "text/plain", b"Hello, World!", ""),
            "/json" => resp.send(
                200,
                "application/json",
                br#"{"message":"Hello, World!"}"#,
                "",
            ),
            "/healthz" if self.draining => resp.send(503, "text/plain", b"draining\n", ""),
            // Health fails once a shard has died: the server no longer serves whole.
            "/healthz" if self.metrics.dead_shards() > 0 => {
                resp.send(503, "text/plain", b"a shard has stopped\n", "")
            }
            "/healthz" => resp.send(200, "text/plain", b"ok\n", ""),
            "/metrics" => {
                let mut body = Vec::with_capacity(8192);
                self.metrics.render(&mut body);
                resp.send(200, "text/plain; version=0.0.4; charset=utf-8", &body, "")
            }
            "/stats" => {
                let mut body = Vec::with_capacity(4096);
                self.metrics.render_json(&mut body);
                resp.send(200, "application/json", &body, "")
            }
            p if p.starts_with("/publish/") => self.publish(&p["/publish/".len()..], r, resp),
            _ => resp.send(404, "text/plain", b"not found\n", ""),
        }
    }
}

impl Routes<'_> {
    fn publish(&self, topic: &str, r: &Request<'_>, resp: Response<'_>) -> Sent {
        if r.method() != "POST" {
            return resp.send(
                405,
                "text/plain",
                b"method not allowed\n",
                "Allow: POST\r\n",
            );
        }
        let limits = &self.listener.publish;
        let frame = pubsub::check_topic(topic, limits)
            .and_then(|()| {
                if topic.contains('/') {
                    Err(Refused::Topic {
                        max: limits.max_topic_length,
                    })
                } else {
                    Ok(())
                }
            })
            .and_then(|()| pubsub::encode_body(topic, r.body(), limits.max_message));
        match frame.and_then(|frame| self.fanout.publish(topic, frame, self.counters)) {
            Ok(n) => {
                let body = serde_json::json!({ "topic": topic, "subscribers": n }).to_string();
                resp.send(200, "application/json", body.as_bytes(), "")
            }
            Err(e) => {
                self.counters.ws_publish_refused.inc();
                let status = match e {
                    Refused::TooLarge { .. } => 413,
                    Refused::NotText => 415,
                    Refused::Topic { .. } | Refused::TooManyTopics { .. } => 400,
                    Refused::Moving => 503,
                };
                if e == Refused::Moving {
                    let why = format!("{e}\n");
                    return resp.send(status, "text/plain", why.as_bytes(), "Retry-After: 1\r\n");
                }
                let why = match e {
                    Refused::Topic { max } => {
                        format!("topic must be 1 to {max} bytes without '/' (max_topic_length)\n")
                    }
                    e => format!("{e}\n"),
                };
                resp.send(status, "text/plain", why.as_bytes(), "")
            }
        }
    }
}
