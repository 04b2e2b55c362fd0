//! The product's HTTP routes: `/plaintext`, `/json`, `/healthz`, `/metrics`, `/stats`,
//! `POST /publish/{topic}` and the WebSocket upgrade paths.
//!
//! A [`Routes`] is built per call of the HTTP codec on the shard's thread, borrowing what the
//! routes read (the listener's route table, the counters, the fan-out); it implements
//! [`Handler`], so the codec calls it once per complete request and gets the status back.
//!
//! Credentials: an upgrade of a route with `auth = "optional"` or `"required"` is answered 401
//! before the handshake when its token is refused (or missing, where required), with the
//! reason as JSON and in `WWW-Authenticate` (RFC 6750); a verified token is handed to the
//! router through [`Routes::verified`]. `POST /publish` and the admin routes check the API key
//! of `Authorization: Bearer` when `[auth]` has a key file for them: 401 without a key or with
//! a wrong one, 403 for a publish key not scoped for the topic.

use std::borrow::Cow;
use std::cell::Cell;

use super::auth::{self, Auth, Failure, FailureCounters, Refusal, Verified};
use super::broker::{Outcome, Refusal as BrokerRefusal};
use super::metrics::{Metrics, ServiceCounters};
use super::pubsub::{self, Fanout, Refused, TopicLimits};
use crate::config::RouteAuth;
use crate::service::deflate;
use crate::service::http::{Handler, Prepared, Request, Response, Sent};
use crate::service::Token;

/// The routes one HTTP listener serves, fixed at start.
pub struct ListenerRoutes {
    /// Serve `/metrics` and `/stats`.
    pub admin_routes: bool,
    /// WebSocket paths, by route index.
    pub websocket: Vec<WsPath>,
    /// What `POST /publish` accepts: the largest topic and message any pub/sub route of the
    /// configuration could carry (a subscriber on any listener may receive it).
    pub publish: TopicLimits,
    /// The answers that never change, built once (boxed: they are large, and only the
    /// benchmark routes read them).
    pub fixed: Box<Fixed>,
}

/// The routes whose answer never changes, prepared (see [`Prepared`]).
pub struct Fixed {
    plaintext: Prepared,
    json: Prepared,
}

impl Default for Fixed {
    fn default() -> Self {
        Fixed {
            plaintext: Prepared::new(200, "text/plain", b"Hello, World!", ""),
            json: Prepared::new(
                200,
                "application/json",
                br#"{"message":"Hello, World!"}"#,
                "",
            ),
        }
    }
}

/// What the upgrade of one WebSocket path checks and negotiates.
pub struct WsPath {
    pub path: String,
    /// Origin values accepted (empty: any).
    pub allowed_origins: Vec<String>,
    pub compression: deflate::Settings,
    /// Whether the upgrade needs a token.
    pub auth: RouteAuth,
}

/// One shard's routes for one call.
pub struct Routes<'a> {
    pub listener: &'a ListenerRoutes,
    pub metrics: &'a Metrics,
    pub counters: &'a ServiceCounters,
    pub fanout: &'a Fanout,
    pub draining: bool,
    /// `[auth]` as this shard last saw it.
    pub auth: &'a Auth,
    pub auth_failures: &'a FailureCounters,
    /// Set when this call completed an upgrade with a verified token; the router makes the
    /// connection's grant from it.
    pub verified: Option<Verified>,
    /// The connection the requests came on (a publish through the broker is answered to it).
    pub token: Token,
    /// The shard's numbering of requests answered later (never 0: that is a WebSocket's).
    pub next_request: &'a Cell<u64>,
}

impl Handler for Routes<'_> {
    fn request(&mut self, r: &Request<'_>, resp: Response<'_>) -> Sent {
        let path = r.path();
        if r.behind().is_some() {
            // Behind publishes waiting for the broker only another such publish goes now.
            return match path.strip_prefix("/publish/") {
                Some(topic) => self.publish(topic, r, resp),
                None => resp.decline(),
            };
        }
        let get = matches!(r.method(), "GET" | "HEAD");
        if let Some(i) = self.listener.websocket.iter().position(|w| w.path == path) {
            return self.upgrade(i, r, resp);
        }
        if matches!(path, "/metrics" | "/stats") && self.listener.admin_routes && get {
            if let Err(refusal) = self.auth.authorize_admin(r.header("authorization")) {
                return self.key_refused(refusal, None, resp);
            }
        }
        match path {
            // The benchmark routes first: the common request costs one comparison.
            "/plaintext" if get => resp.send_prepared(&self.listener.fixed.plaintext),
            "/json" if get => resp.send_prepared(&self.listener.fixed.json),
            "/metrics" | "/stats" if !self.listener.admin_routes => {
                resp.send(404, "text/plain", b"not found\n", "")
            }
            "/plaintext" | "/json" | "/healthz" | "/metrics" | "/stats" if !get => resp.send(
                405,
                "text/plain",
                b"method not allowed\n",
                "Allow: GET, HEAD\r\n",
            ),
            "/healthz" if self.draining => resp.send(503, "text/plain", b"draining\n", ""),
            // Health fails once a shard has died: the server no longer serves whole.
            "/healthz" if self.metrics.dead_shards() > 0 => {
                resp.send(503, "text/plain", b"a shard has stopped\n", "")
            }
            // A broker outage is shared by every process: failing readiness everywhere would add
            // a full outage to a pub/sub one. It is said in the body (and the metrics).
            "/healthz" if self.fanout.broker().is_some_and(|b| !b.is_up()) => resp.send(
                200,
                "text/plain",
                b"degraded: broker unavailable (publishes are refused; subscriptions resume when it is back)\n",
                "",
            ),
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

/// The token of an upgrade: `Authorization: Bearer`, else (when allowed) the `token` query
/// parameter. A token is never logged, and this is the only place that reads one.
fn presented<'r>(r: &Request<'r>, query_allowed: bool) -> Option<Cow<'r, [u8]>> {
    if let Some(t) = r.header("authorization").and_then(auth::bearer) {
        return Some(Cow::Borrowed(t));
    }
    if !query_allowed {
        return None;
    }
    auth::query_token(r.target()).map(|t| match t {
        Cow::Borrowed(s) => Cow::Borrowed(s.as_bytes()),
        Cow::Owned(s) => Cow::Owned(s.into_bytes()),
    })
}

impl Routes<'_> {
    /// A WebSocket upgrade of route `i`: the token checked first where the route wants one.
    fn upgrade(&mut self, i: usize, r: &Request<'_>, resp: Response<'_>) -> Sent {
        let w = &self.listener.websocket[i];
        let mode = w.auth;
        if mode != RouteAuth::Off {
            match presented(r, self.auth.query_token()) {
                None if mode == RouteAuth::Optional => {}
                None => return self.unauthorized(Failure::Missing, resp),
                Some(token) => match self.auth.verify(&token) {
                    Ok(v) => self.verified = Some(v),
                    Err(f) => return self.unauthorized(f, resp),
                },
            }
        }
        let sent = resp.upgrade(r, &w.allowed_origins, w.compression, i);
        if sent.status() != 101 {
            // Refused for another reason (origin, handshake headers): no connection to grant.
            self.verified = None;
        }
        sent
    }

    /// 401 for a refused token, counted by reason: the reason in the JSON body and in the
    /// `WWW-Authenticate` challenge, so that a client can tell "refresh" from "give up".
    fn unauthorized(&self, f: Failure, resp: Response<'_>) -> Sent {
        self.auth_failures.inc(f);
        let body = serde_json::json!({
            "error": f.as_str(),
            "message": f.message(),
            "refresh": f.refreshable(),
        })
        .to_string();
        let challenge = match f {
            Failure::Missing => "WWW-Authenticate: Bearer realm=\"shardnet\"\r\n".to_string(),
            f => format!(
                "WWW-Authenticate: Bearer realm=\"shardnet\", error=\"invalid_token\", \
                 error_description=\"{}\"\r\n",
                f.as_str()
            ),
        };
        resp.send(401, "application/json", body.as_bytes(), &challenge)
    }

    /// 401 or 403 for an API key the publish API or the admin routes do not accept.
    fn key_refused(&self, refusal: Refusal, topic: Option<&str>, resp: Response<'_>) -> Sent {
        self.counters.api_key_refused.inc();
        let mut body = serde_json::json!({ "error": refusal.as_str() });
        if let Some(t) = topic {
            body["topic"] = t.into();
        }
        let challenge = match refusal {
            Refusal::Missing => "WWW-Authenticate: Bearer realm=\"shardnet\"\r\n",
            Refusal::Wrong => {
                "WWW-Authenticate: Bearer realm=\"shardnet\", error=\"invalid_token\"\r\n"
            }
            Refusal::Forbidden => "",
        };
        resp.send(
            refusal.status(),
            "application/json",
            body.to_string().as_bytes(),
            challenge,
        )
    }

    /// `POST /publish/{topic}`. Behind publishes still waiting for the broker
    /// ([`Request::behind`]) it is either sent to the broker too or declined, to be answered in
    /// order once they are.
    fn publish(&self, topic: &str, r: &Request<'_>, resp: Response<'_>) -> Sent {
        let behind = r.behind();
        if behind.is_some() && r.method() != "POST" {
            return resp.decline();
        }
        if r.method() != "POST" {
            return resp.send(
                405,
                "text/plain",
                b"method not allowed\n",
                "Allow: POST\r\n",
            );
        }
        if let Err(refusal) = self
            .auth
            .authorize_publish(r.header("authorization"), topic)
        {
            if behind.is_some() {
                return resp.decline();
            }
            return self.key_refused(refusal, Some(topic), resp);
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
        let local = match frame {
            Ok(frame) if self.fanout.broker().is_some() => {
                if behind.is_some() && !self.fanout.broker().is_some_and(|b| b.accepts()) {
                    // Its refusal is answered in order, after those before it.
                    return resp.decline();
                }
                // Behind others it takes the id after theirs; the shard's counter moves past
                // it, so an id is never given to two requests of one connection.
                let id = behind.unwrap_or_else(|| self.next_request.get().max(1));
                self.next_request
                    .set(id.wrapping_add(1).max(self.next_request.get()).max(1));
                return match self.fanout.publish_via_broker(
                    self.token,
                    id,
                    topic,
                    &frame,
                    self.counters,
                ) {
                    // Answered when the broker's outcome comes back (`publish_answer`).
                    Ok(()) => resp.defer(id),
                    // Refused between the check above and the queue (it filled meanwhile):
                    // answered in order when offered again (and counted again then).
                    Err(_) if behind.is_some() => resp.decline(),
                    Err(refusal) => publish_answer(resp, topic, &Err(refusal), ""),
                };
            }
            _ if behind.is_some() => return resp.decline(),
            Ok(frame) => self.fanout.publish(topic, frame, self.counters),
            Err(e) => Err(e),
        };
        match local {
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

/// The answer to a `POST /publish` that went to the broker: 200 with the processes it reached
/// (Redis: every process with subscribers of the topic, this one included, from PUBLISH's reply;
/// NATS does not say: `null`), or 503 with the reason. `kind` names the broker.
pub fn publish_answer(resp: Response<'_>, topic: &str, outcome: &Outcome, kind: &str) -> Sent {
    match outcome {
        Ok(accepted) => {
            let body = serde_json::json!({
                "topic": topic,
                "broker": kind,
                "processes": accepted.receivers,
            })
            .to_string();
            resp.send(200, "application/json", body.as_bytes(), "")
        }
        Err(refusal) => {
            // Worth retrying soon when the broker is away or busy; not for a message too large.
            let retry = match refusal {
                BrokerRefusal::TooLarge { .. } => "",
                _ => "Retry-After: 1\r\n",
            };
            let body = format!("broker: {refusal}\n");
            resp.send(503, "text/plain", body.as_bytes(), retry)
        }
    }
}
