//! Redis and Valkey through the redis crate's synchronous API: two threads, two connections.
//!
//! - `broker` (subscriber): one connection in pub/sub mode. It reads messages with a short
//!   timeout ([`POLL`]) and, between reads, applies the shards' interest notices and sends the
//!   SUBSCRIBE / UNSUBSCRIBE they call for (with a longer timeout while waiting for the
//!   confirmation, so a slow reply is never mistaken for silence). After [`PING_IDLE`] without
//!   traffic it pings, so a broker that vanished without closing the socket is noticed.
//! - `broker-pub` (publisher): a plain connection, blocked on the publish queue; it sends what is
//!   queued as one pipeline of PUBLISH commands and answers each publish with the reply (the
//!   number of subscriber connections reached) or the refusal.
//!
//! Each thread reconnects on its own with the configured backoff. After the subscriber
//! reconnects, every wanted topic gets its gap notice, then is subscribed again, so no message
//! of the new connection comes before the notice.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use redis::RedisError;

use super::backoff::{seed, Backoff};
use super::core::Core;
use super::{redact, wire, Accepted, Context, Notice, Publish, Refusal, Shared, NOTICE_CHANNEL};

/// How long the subscriber waits for a message before it looks at the interest notices again
/// (what a new topic may wait before its SUBSCRIBE goes out).
const POLL: Duration = Duration::from_millis(20);
/// Silence after which a connection is pinged.
const PING_IDLE: Duration = Duration::from_secs(1);
/// Publishes sent in one pipeline at most.
const BATCH: usize = 256;
/// Channels named in one SUBSCRIBE or UNSUBSCRIBE at most.
const SUBSCRIBE_CHUNK: usize = 256;

pub(super) fn spawn(cx: Context) -> std::io::Result<Vec<JoinHandle<()>>> {
    let secrets = cx.config.url.secrets();
    let client = redis::Client::open(cx.config.url.expose()).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("broker.url: {}", redact(e, &secrets)),
        )
    })?;
    let publisher = Publisher {
        client: client.clone(),
        shared: cx.shared.clone(),
        rx: cx.publish_rx,
        stop: cx.stop.clone(),
        backoff: Backoff::from_config(&cx.config, seed() ^ 0x5eed),
        connect_timeout: cx.config.connect_timeout,
        secrets: secrets.clone(),
        url: cx.config.url.to_string(),
        prefix: cx.config.prefix.clone(),
    };
    let subscriber = Subscriber {
        client,
        core: Core::new(
            cx.shards,
            cx.config.prefix.clone(),
            cx.shared.clone(),
            secrets,
        ),
        rx: cx.notice_rx,
        stop: cx.stop,
        backoff: Backoff::from_config(&cx.config, seed()),
        connect_timeout: cx.config.connect_timeout,
        confirm_timeout: cx.config.publish_timeout,
        url: cx.config.url.to_string(),
    };
    let p = std::thread::Builder::new()
        .name("broker-pub".into())
        .spawn(move || {
            super::relay_thread_started();
            publisher.run()
        })?;
    let s = std::thread::Builder::new()
        .name("broker".into())
        .spawn(move || {
            super::relay_thread_started();
            subscriber.run()
        })?;
    Ok(vec![s, p])
}

/// Logs a failed connection attempt: the first of a run at warn, then every tenth (an outage
/// of minutes would otherwise fill the log).
fn log_failure(role: &str, url: &str, attempt: usize, err: &str) {
    if attempt <= 1 || attempt.is_multiple_of(10) {
        log::warn!("broker: {role} cannot connect to {url} (attempt {attempt}): {err}; retrying");
    } else {
        log::debug!("broker: {role} cannot connect to {url} (attempt {attempt}): {err}");
    }
}

struct Subscriber {
    client: redis::Client,
    core: Core,
    rx: Receiver<Notice>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    backoff: Backoff,
    connect_timeout: Duration,
    confirm_timeout: Duration,
    /// The url as it may be printed (password redacted).
    url: String,
}

enum End {
    Stop,
    Lost(RedisError),
}

impl Subscriber {
    fn run(mut self) {
        let mut attempt = 0;
        let mut connected_before = false;
        while !self.stopping() {
            attempt += 1;
            let wait = self.backoff.delay(attempt);
            if !self.wait_applying_notices(wait) {
                break;
            }
            let mut con = match self
                .client
                .get_connection_with_timeout(self.connect_timeout)
            {
                Ok(c) => c,
                Err(e) => {
                    self.core.shared.metrics.count_connect_failure();
                    let e = redact(e, &self.core.secrets);
                    log_failure("subscriber", &self.url, attempt, &e);
                    continue;
                }
            };
            if connected_before {
                self.core.shared.metrics.count_reconnect();
            }
            connected_before = true;
            attempt = 0;
            log::info!(
                "broker: subscriber connected to {} ({} topics wanted)",
                self.url,
                self.core.wanted()
            );
            let end = self.serve(&mut con);
            self.core.shared.metrics.set_sub_up(false);
            self.core.disconnected();
            match end {
                End::Stop => break,
                End::Lost(e) => log::warn!(
                    "broker: subscriber connection to {} lost: {}; reconnecting (messages \
                     published until then are missed: each wanted topic gets a gap notice)",
                    self.url,
                    redact(e, &self.core.secrets)
                ),
            }
        }
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Waits `wait` (or until stopped: then false), keeping the interest table current.
    fn wait_applying_notices(&mut self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        loop {
            if self.stopping() {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            // Bounded slices, so a stop is seen promptly.
            match self.rx.recv_timeout((deadline - now).min(POLL * 5)) {
                Ok(n) => self.core.apply(n),
                Err(RecvTimeoutError::Timeout) => {}
                // Every handle is gone: nothing will want topics any more, but keep the
                // connection logic simple and let the stop flag end the thread.
                Err(RecvTimeoutError::Disconnected) => std::thread::sleep(POLL),
            }
        }
    }

    /// The connected phase: gap notices and subscriptions, then messages until the
    /// connection fails or the broker stops.
    fn serve(&mut self, con: &mut redis::Connection) -> End {
        if let Err(e) = con.set_write_timeout(Some(self.confirm_timeout)) {
            return End::Lost(e);
        }
        let mut ps = con.as_pubsub();
        self.core.drain_notices(&self.rx, NOTICE_CHANNEL);
        self.core.shared.metrics.set_sub_up(true);
        self.core.connected();
        if let Err(e) = self.sync(&mut ps) {
            return End::Lost(e);
        }
        if let Err(e) = ps.set_read_timeout(Some(POLL)) {
            return End::Lost(e);
        }
        let mut last_traffic = Instant::now();
        loop {
            if self.stopping() {
                return End::Stop;
            }
            if self.core.drain_notices(&self.rx, 1024) > 0 || self.core.has_changes() {
                if let Err(e) = self.sync(&mut ps) {
                    return End::Lost(e);
                }
            }
            match ps.get_message() {
                Ok(msg) => {
                    last_traffic = Instant::now();
                    // Notices that came while waiting: the message goes to the shards that
                    // want it now.
                    self.core.drain_notices(&self.rx, NOTICE_CHANNEL);
                    let channel = msg.get_channel_name();
                    match wire::topic_from_redis(&self.core.prefix, channel.as_bytes()) {
                        Some(topic) => self.core.deliver(topic, msg.get_payload_bytes()),
                        None => self.core.foreign(),
                    }
                }
                Err(e) if e.is_timeout() => {
                    if last_traffic.elapsed() >= PING_IDLE {
                        if let Err(e) =
                            self.confirmed(&mut ps, |ps| ps.ping::<redis::Value>().map(drop))
                        {
                            return End::Lost(e);
                        }
                        last_traffic = Instant::now();
                    }
                }
                Err(e) => return End::Lost(e),
            }
        }
    }

    /// Runs a command that waits for its reply with the longer timeout, then goes back to
    /// polling.
    fn confirmed(
        &self,
        ps: &mut redis::PubSub<'_>,
        f: impl FnOnce(&mut redis::PubSub<'_>) -> redis::RedisResult<()>,
    ) -> redis::RedisResult<()> {
        ps.set_read_timeout(Some(self.confirm_timeout))?;
        f(ps)?;
        ps.set_read_timeout(Some(POLL))
    }

    /// Subscribes and unsubscribes as the interest table says.
    fn sync(&mut self, ps: &mut redis::PubSub<'_>) -> redis::RedisResult<()> {
        let (sub, unsub) = self.core.changes();
        let prefix = self.core.prefix.clone();
        for chunk in sub.chunks(SUBSCRIBE_CHUNK) {
            let channels: Vec<Vec<u8>> = chunk
                .iter()
                .map(|t| wire::channel_for_redis(&prefix, t))
                .collect();
            let refs: Vec<&[u8]> = channels.iter().map(Vec::as_slice).collect();
            self.confirmed(ps, |ps| ps.subscribe(refs))?;
            self.core.subscribed(chunk);
        }
        for chunk in unsub.chunks(SUBSCRIBE_CHUNK) {
            let channels: Vec<Vec<u8>> = chunk
                .iter()
                .map(|t| wire::channel_for_redis(&prefix, t))
                .collect();
            let refs: Vec<&[u8]> = channels.iter().map(Vec::as_slice).collect();
            self.confirmed(ps, |ps| ps.unsubscribe(refs))?;
            self.core.unsubscribed(chunk);
        }
        Ok(())
    }
}

struct Publisher {
    client: redis::Client,
    shared: Arc<Shared>,
    rx: Receiver<Publish>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    backoff: Backoff,
    connect_timeout: Duration,
    secrets: Vec<String>,
    url: String,
    prefix: String,
}

impl Publisher {
    fn run(mut self) {
        let mut con: Option<redis::Connection> = None;
        let mut attempt = 0;
        let mut next_attempt = Instant::now();
        let mut connected_before = false;
        let mut last_used = Instant::now();
        let mut batch: Vec<Publish> = Vec::with_capacity(BATCH);
        loop {
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            if con.is_none() && Instant::now() >= next_attempt {
                attempt += 1;
                match self
                    .client
                    .get_connection_with_timeout(self.connect_timeout)
                {
                    Ok(c) => {
                        if connected_before {
                            log::info!("broker: publisher reconnected to {}", self.url);
                        }
                        connected_before = true;
                        attempt = 0;
                        con = Some(c);
                        last_used = Instant::now();
                        self.shared.metrics.set_pub_up(true);
                    }
                    Err(e) => {
                        self.shared.metrics.count_connect_failure();
                        let e = redact(e, &self.secrets);
                        log_failure("publisher", &self.url, attempt, &e);
                        next_attempt = Instant::now() + self.backoff.delay(attempt + 1);
                    }
                }
            }
            let wait = match &con {
                None => next_attempt.saturating_duration_since(Instant::now()),
                Some(_) => PING_IDLE.saturating_sub(last_used.elapsed()),
            };
            // Bounded, so a stop is seen promptly.
            match self
                .rx
                .recv_timeout(wait.clamp(Duration::from_millis(1), POLL * 5))
            {
                Ok(p) => batch.push(p),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            while batch.len() < BATCH {
                match self.rx.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            let Some(c) = con.as_mut() else {
                for p in batch.drain(..) {
                    p.resolve(Err(Refusal::Down));
                }
                continue;
            };
            let result = if batch.is_empty() {
                if last_used.elapsed() < PING_IDLE {
                    continue;
                }
                redis::cmd("PING").query::<String>(c).map(drop)
            } else {
                self.send(c, &mut batch)
            };
            last_used = Instant::now();
            if let Err(e) = result {
                // The connection's state is unknown after any failure but a server's error
                // reply (already answered in `send`): start again on a new one.
                log::warn!(
                    "broker: publisher connection to {} lost: {}; reconnecting",
                    self.url,
                    redact(&e, &self.secrets)
                );
                con = None;
                self.shared.metrics.set_pub_up(false);
                next_attempt = Instant::now();
            }
        }
        // Whatever is still queued is answered by its Drop (`shutting down`).
        self.shared.metrics.set_pub_up(false);
        drop(batch);
        while let Ok(p) = self.rx.try_recv() {
            p.resolve(Err(Refusal::ShuttingDown));
        }
    }

    /// Sends `batch` as one pipeline and answers every publish in it. `Err` when the
    /// connection must be replaced.
    fn send(
        &self,
        con: &mut redis::Connection,
        batch: &mut Vec<Publish>,
    ) -> Result<(), RedisError> {
        let now = Instant::now();
        let (expired, live): (Vec<Publish>, Vec<Publish>) =
            batch.drain(..).partition(|p| p.expired(now));
        for p in expired {
            p.resolve(Err(Refusal::Timeout));
        }
        if live.is_empty() {
            return Ok(());
        }
        let deadline = live
            .iter()
            .map(|p| p.remaining(now))
            .min()
            .unwrap_or_default()
            .max(Duration::from_millis(1));
        con.set_read_timeout(Some(deadline))?;
        con.set_write_timeout(Some(deadline))?;
        let mut pipe = redis::pipe();
        for p in &live {
            pipe.cmd("PUBLISH")
                .arg(wire::channel_for_redis(&self.prefix, &p.topic))
                .arg(p.payload());
        }
        match pipe.query::<Vec<i64>>(con) {
            Ok(counts) => {
                let mut counts = counts.into_iter();
                for p in live {
                    let receivers = counts.next().map(|n| n.max(0) as u64);
                    p.resolve(Ok(Accepted { receivers }));
                }
                Ok(())
            }
            Err(e) if e.is_timeout() => {
                for p in live {
                    p.resolve(Err(Refusal::Timeout));
                }
                Err(e)
            }
            Err(e) if e.is_io_error() => {
                for p in live {
                    p.resolve(Err(Refusal::Lost));
                }
                Err(e)
            }
            Err(e) => {
                // The broker answered with an error (ACL, OOM...): the connection is fine.
                let msg = redact(&e, &self.secrets);
                log::warn!("broker: PUBLISH refused by {}: {msg}", self.url);
                for p in live {
                    p.resolve(Err(Refusal::Broker(msg.clone())));
                }
                Ok(())
            }
        }
    }
}
