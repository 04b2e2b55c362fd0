//! NATS through async-nats, on a current-thread tokio runtime that exists only inside the
//! `broker` thread.
//!
//! One connection does everything. The shards' channels are crossbeam ones like Redis's; a send
//! is followed by a `Notify` that wakes this runtime, which then drains them. Each wanted topic
//! is one async-nats subscription whose messages a small task forwards, in order, into one
//! bounded channel read by the main loop (so per-topic order holds and the main loop waits on
//! one receiver, not on every subscription).
//!
//! async-nats reconnects by itself, with the configured backoff (`reconnect_delay_callback`),
//! and sends its subscriptions again on the new connection; its `Connected` / `Disconnected`
//! events (and the connection state, polled as a backstop) drive `up`, the reconnect count and
//! the gap notices. Because the client resubscribes on its own, a message of the new connection
//! can come just before the gap notice of its topic; it is never older than the outage.
//!
//! "Accepted" means: written to the server's socket and flushed while connected. Core NATS has
//! no acknowledgement per message, so a publish flushed just before the connection breaks can be
//! lost although it was answered as accepted; and while disconnected nothing is handed to the
//! client (which would buffer it for later): such publishes are refused at once.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::{client::PublishErrorKind, ConnectOptions, Event, ServerAddr};
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use super::backoff::{seed, Backoff};
use super::core::Core;
use super::{redact, wire, Accepted, Context, Publish, Refusal, NOTICE_CHANNEL};

/// Messages one subscription may hold inside the client before it drops them (a slow consumer:
/// counted by the client, reported here as gaps).
const SUBSCRIPTION_CAPACITY: usize = 8192;
/// Messages forwarded to the main loop and not yet delivered.
const MERGE_CAPACITY: usize = 8192;
/// Publishes handled per wake-up at most, and messages delivered per turn at most.
const BATCH: usize = 256;
/// The loop looks at the connection state and the stop flag at least this often.
const TICK: Duration = Duration::from_millis(100);

pub(super) fn spawn(cx: Context) -> std::io::Result<Vec<JoinHandle<()>>> {
    let t = std::thread::Builder::new()
        .name("broker".into())
        .spawn(move || {
            super::relay_thread_started();
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    log::error!(
                        "broker: cannot start the NATS runtime: {e}; publishes are refused"
                    );
                    refuse_until_stopped(&cx);
                    return;
                }
            };
            rt.block_on(run(&cx));
            // Dropping the runtime ends the forwarding tasks; what is still queued is refused.
            drop(rt);
            while let Ok(p) = cx.publish_rx.try_recv() {
                p.resolve(Err(Refusal::ShuttingDown));
            }
        })?;
    Ok(vec![t])
}

/// Without a client there is nothing to do but answer every publish (`broker unavailable`).
fn refuse_until_stopped(cx: &Context) {
    while !cx.stop.load(Ordering::Acquire) {
        if let Ok(p) = cx.publish_rx.recv_timeout(TICK) {
            p.resolve(Err(Refusal::Down));
        }
        while cx.notice_rx.try_recv().is_ok() {}
    }
}

struct Nats<'a> {
    cx: &'a Context,
    core: Core,
    client: async_nats::Client,
    url: String,
    /// The forwarding task of each subscribed topic.
    subs: HashMap<Arc<str>, AbortHandle>,
    msg_tx: mpsc::Sender<(Arc<str>, Bytes)>,
    up: bool,
    /// A disconnection was seen since the last connection: the next one sends gap notices.
    lost: bool,
    connected_before: bool,
}

async fn run(cx: &Context) {
    let secrets = cx.config.url.secrets();
    let url = cx.config.url.to_string();
    let parts = cx.config.url.split_credentials();
    let backoff = Arc::new(Mutex::new(Backoff::from_config(&cx.config, seed())));
    let (ev_tx, mut ev_rx) = mpsc::channel::<Event>(256);
    let metrics = cx.shared.metrics.clone();
    let mut opts = ConnectOptions::new()
        .name("shardnet")
        .retry_on_initial_connect()
        .connection_timeout(cx.config.connect_timeout)
        .ping_interval(Duration::from_secs(10))
        .subscription_capacity(SUBSCRIPTION_CAPACITY)
        .reconnect_delay_callback(move |attempts| {
            // Called before every attempt; from the second on, the one before it failed.
            if attempts > 1 {
                metrics.count_connect_failure();
            }
            backoff.lock().delay(attempts)
        })
        .event_callback(move |ev| {
            let tx = ev_tx.clone();
            async move {
                let _ = tx.try_send(ev);
            }
        });
    if let Some((user, pass)) = parts.iter().find_map(|(_, c)| c.clone()) {
        opts = match pass {
            Some(pass) => opts.user_and_password(user, pass),
            None => opts.token(user),
        };
    }
    let addrs: Result<Vec<ServerAddr>, _> = parts.iter().map(|(u, _)| u.parse()).collect();
    let client = match addrs {
        Ok(addrs) => opts.connect(addrs).await,
        Err(e) => {
            log::error!(
                "broker: {url} is not a NATS address: {}",
                redact(e, &secrets)
            );
            refuse_until_stopped(cx);
            return;
        }
    };
    let client = match client {
        Ok(c) => c,
        Err(e) => {
            log::error!(
                "broker: cannot set up the NATS client for {url}: {}",
                redact(e, &secrets)
            );
            refuse_until_stopped(cx);
            return;
        }
    };
    let Some(wake) = cx.shared.wake.clone() else {
        return;
    };
    let (msg_tx, mut msg_rx) = mpsc::channel(MERGE_CAPACITY);
    let mut n = Nats {
        cx,
        core: Core::new(
            cx.shards,
            cx.config.prefix.clone(),
            cx.shared.clone(),
            secrets,
        ),
        client,
        url,
        subs: HashMap::new(),
        msg_tx,
        up: false,
        lost: false,
        connected_before: false,
    };
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !cx.stop.load(Ordering::Acquire) {
        tokio::select! {
            biased;
            Some(ev) = ev_rx.recv() => n.event(ev),
            _ = wake.notified() => {}
            Some((topic, payload)) = msg_rx.recv() => {
                // Notices that came while waiting: the message goes to the shards that want
                // it now.
                n.core.drain_notices(&cx.notice_rx, NOTICE_CHANNEL);
                n.core.deliver(&topic, &payload);
                for _ in 1..BATCH {
                    match msg_rx.try_recv() {
                        Ok((topic, payload)) => n.core.deliver(&topic, &payload),
                        Err(_) => break,
                    }
                }
            }
            _ = tick.tick() => {}
        }
        n.poll_state();
        n.core.drain_notices(&cx.notice_rx, NOTICE_CHANNEL);
        if n.core.has_changes() {
            n.sync().await;
        }
        n.publish().await;
    }
    n.cx.shared.metrics.set_sub_up(false);
    n.cx.shared.metrics.set_pub_up(false);
    for (_, task) in n.subs.drain() {
        task.abort();
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), n.client.flush()).await;
}

impl Nats<'_> {
    fn set_up(&mut self, up: bool) {
        self.up = up;
        self.cx.shared.metrics.set_sub_up(up);
        self.cx.shared.metrics.set_pub_up(up);
    }

    fn event(&mut self, ev: Event) {
        match ev {
            Event::Connected => self.on_connected(),
            Event::Disconnected => self.on_disconnected(),
            Event::SlowConsumer(_) => {
                // The client dropped messages of a subscription it does not name: every topic
                // may have a hole.
                log::warn!(
                    "broker: NATS client dropped messages (slow consumer); gap notices to every \
                     topic"
                );
                self.core.gap_all();
            }
            Event::Closed => {
                log::warn!("broker: NATS client closed");
                self.on_disconnected();
            }
            Event::LameDuckMode => log::info!("broker: {} is entering lame duck mode", self.url),
            Event::Draining => {}
            Event::ServerError(e) => log::warn!(
                "broker: NATS server error: {}",
                redact(e, &self.core.secrets)
            ),
            Event::ClientError(e) => log::warn!(
                "broker: NATS client error: {}",
                redact(e, &self.core.secrets)
            ),
        }
    }

    /// The state, polled: catches a transition whose event was missed (the event channel is
    /// bounded).
    fn poll_state(&mut self) {
        let connected = self.client.connection_state() == State::Connected;
        if connected && !self.up {
            self.on_connected();
        } else if !connected && self.up {
            self.on_disconnected();
        }
    }

    fn on_connected(&mut self) {
        if self.up {
            return;
        }
        if self.connected_before {
            self.cx.shared.metrics.count_reconnect();
        }
        log::info!(
            "broker: connected to {} ({} topics wanted)",
            self.url,
            self.core.wanted()
        );
        // First connection: topics wanted before it may have missed messages too.
        if self.lost || !self.connected_before {
            self.core.gap_all();
        }
        self.connected_before = true;
        self.lost = false;
        self.set_up(true);
        self.core.restore_gauge();
    }

    fn on_disconnected(&mut self) {
        self.lost = true;
        if self.up {
            log::warn!(
                "broker: connection to {} lost; reconnecting (messages published until then are \
                 missed: each wanted topic gets a gap notice)",
                self.url
            );
        }
        self.set_up(false);
        self.cx.shared.metrics.set_topics(0);
    }

    /// Subscribes and unsubscribes as the interest table says. Works while disconnected too:
    /// the client sends its subscriptions when it connects.
    async fn sync(&mut self) {
        let (sub, unsub) = self.core.changes();
        for topic in unsub {
            if let Some(task) = self.subs.remove(&topic) {
                // Dropping the subscription (in the task) sends UNSUB.
                task.abort();
            }
            self.core.unsubscribed(std::slice::from_ref(&topic));
        }
        let wait = self.cx.config.publish_timeout;
        for topic in sub {
            let subject = wire::subject_for_nats(&self.core.prefix, &topic);
            match tokio::time::timeout(wait, self.client.subscribe(subject)).await {
                Ok(Ok(mut subscriber)) => {
                    let tx = self.msg_tx.clone();
                    let t = topic.clone();
                    let task = tokio::spawn(async move {
                        while let Some(m) = subscriber.next().await {
                            if tx.send((t.clone(), m.payload)).await.is_err() {
                                break;
                            }
                        }
                    });
                    self.subs.insert(topic.clone(), task.abort_handle());
                    self.core.subscribed(std::slice::from_ref(&topic));
                }
                Ok(Err(e)) => {
                    log::warn!(
                        "broker: cannot subscribe to {topic}: {}; retrying",
                        redact(e, &self.core.secrets)
                    );
                    self.core.retry(topic);
                }
                Err(_) => {
                    log::warn!("broker: subscribing to {topic} timed out; retrying");
                    self.core.retry(topic);
                }
            }
        }
        if !self.up {
            self.cx.shared.metrics.set_topics(0);
        }
    }

    /// Sends what is queued, and answers each publish.
    async fn publish(&mut self) {
        let mut sent: Vec<Publish> = Vec::new();
        for _ in 0..BATCH {
            let Ok(p) = self.cx.publish_rx.try_recv() else {
                break;
            };
            let now = Instant::now();
            if !self.up {
                p.resolve(Err(Refusal::Down));
                continue;
            }
            if p.expired(now) {
                p.resolve(Err(Refusal::Timeout));
                continue;
            }
            let subject = wire::subject_for_nats(&self.core.prefix, &p.topic);
            let payload = Bytes::from(p.payload());
            let size = payload.len();
            match tokio::time::timeout(p.remaining(now), self.client.publish(subject, payload))
                .await
            {
                Ok(Ok(())) => sent.push(p),
                Ok(Err(e)) => {
                    let refusal = match e.kind() {
                        PublishErrorKind::MaxPayloadExceeded => Refusal::TooLarge {
                            size,
                            max: self.client.server_info().max_payload,
                        },
                        PublishErrorKind::Send => Refusal::Lost,
                        PublishErrorKind::BadSubject => {
                            Refusal::Broker(redact(&e, &self.core.secrets))
                        }
                    };
                    p.resolve(Err(refusal));
                }
                Err(_) => p.resolve(Err(Refusal::Timeout)),
            }
        }
        if sent.is_empty() {
            return;
        }
        let now = Instant::now();
        let wait = sent
            .iter()
            .map(|p| p.remaining(now))
            .min()
            .unwrap_or_default();
        let outcome = match tokio::time::timeout(wait, self.client.flush()).await {
            Ok(Ok(())) => Ok(Accepted { receivers: None }),
            Ok(Err(_)) => Err(Refusal::Lost),
            Err(_) => Err(Refusal::Timeout),
        };
        for p in sent {
            p.resolve(outcome.clone());
        }
        if !self.cx.publish_rx.is_empty() {
            // More than one batch was waiting: come back without waiting for a wake.
            if let Some(w) = &self.cx.shared.wake {
                w.notify_one();
            }
        }
    }
}
