//! The product: what `shardnet serve` runs on top of the engine.
//!
//! [`start`] is the composition root: it binds the configuration's listeners through the engine
//! ([`crate::server::Server`]) and gives every shard a [`router::Router`], which decides per
//! listener which protocol a connection speaks (echo, HTTP/1.1, WebSocket after an upgrade) and
//! binds the protocol codecs of [`crate::service`] to the product's parts:
//!
//! - `routes`: the HTTP routes (`/plaintext`, `/json`, `/healthz`, `/metrics`, `/stats`,
//!   `POST /publish/{topic}`, the WebSocket paths);
//! - `pubsub`: topics, the wire format, batching, fan-out across shards, slow consumers;
//! - `metrics`: the services' counters and their Prometheus and JSON renderings.
//!
//! Layering: this module uses the engine (`server`, `service`'s trait and codecs, `stats`,
//! `config`); nothing below it uses this module. Inside it the imports only point down:
//! `router` → `routes` → `pubsub` → `metrics`.

mod metrics;
mod pubsub;
mod router;
mod routes;

use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use crate::config::Config;
use crate::server::{Server, ServerError};
use metrics::Metrics;
use router::{Router, Shared};

/// Starts the product server: every listener with the service its configuration names.
pub fn start(config: &Config) -> Result<Server, ServerError> {
    let owned = config.clone();
    let started = Instant::now();
    // The pool's counters exist once the pool does: the first shard to start completes the
    // shared state with them, the others take the same.
    let slot: Mutex<Option<Arc<Shared>>> = Mutex::new(None);
    Server::start(config, move |info, peers| {
        let shared = slot
            .lock()
            .get_or_insert_with(|| {
                Arc::new(Shared {
                    metrics: Metrics::new(info.stats.clone(), info.shards, started),
                    registry: Arc::default(),
                    config: owned.clone(),
                })
            })
            .clone();
        Router::new(shared, &info, peers)
    })
}
