//! Delivery on the NATS engine: every (route, plugin) is a durable pull
//! consumer on the events stream, shared by every host, so the hosts split
//! the work and a host that dies leaves its unacknowledged messages to the
//! others (after the consumer's ack wait).
//!
//! Per message: a delivery the envelope does not name is acknowledged at once
//! (the routes were matched at acceptance); otherwise the plugin runs and
//! - on success its kv writes commit, the events it emitted are published,
//!   the attempt is recorded, and the message is acknowledged (double ack);
//! - on a retryable failure the attempt is recorded and the message is
//!   nak'ed with the delay the retry policy (or the plugin) asks for;
//! - on a rejection, or out of attempts or age, the dead letter is published
//!   with every attempt and the message is terminated.
//!
//! Ordered routes (`order_key`) get `max_ack_pending = 1`: one delivery of the
//! route in flight across all hosts, so per-key order holds everywhere; the
//! price is that a retrying delivery holds back the route's other keys too.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_nats::jetstream::{AckKind, Message, consumer};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::stats::FlowStats;
use super::{Work, run_attempt};
use crate::event::{Event, now_ms};
use crate::journal::nats::{Envelope, EnvelopeDelivery, NatsJournal};
use crate::journal::{
    DeliveryKey, DeliveryRecord, DeliveryStatus, JournalError, Outcome, RedriveSelect, ReplayJob,
    ReplaySpec,
};
use crate::runtime::Runtime;
use crate::server::Live;

/// How often the set of consumers is checked against the routes in force.
const RECONCILE: Duration = Duration::from_secs(1);
/// How long to wait after the consumer or the journal failed.
const BACKOFF: Duration = Duration::from_secs(1);
/// Added to a plugin's deadline for the consumer's ack wait: a message not
/// acknowledged by then (its host died) goes to another host.
const ACK_MARGIN: Duration = Duration::from_secs(10);
/// Deliveries of an unordered route in flight across all hosts, at most.
const MAX_ACK_PENDING: i64 = 1024;

/// Handle to the running consumers.
#[derive(Clone)]
pub struct NatsDispatcher {
    journal: NatsJournal,
    stop: CancellationToken,
    tasks: TaskTracker,
    stats: Arc<FlowStats>,
}

struct Ctx {
    journal: NatsJournal,
    runtime: Arc<Runtime>,
    live: Arc<ArcSwap<Live>>,
    stats: Arc<FlowStats>,
    workers: Arc<Semaphore>,
    tasks: TaskTracker,
    /// Stopped at shutdown: no new message is taken.
    stop: CancellationToken,
}

/// The durable consumer name of a (route, plugin) delivery.
pub fn consumer_name(route: &str, plugin: &str) -> String {
    use sha2::{Digest, Sha256};
    // Tokens lose characters; the hash keeps distinct pairs distinct.
    let digest = Sha256::digest(format!("{route}\n{plugin}").as_bytes());
    format!(
        "{}__{}__{}",
        crate::journal::nats::token(route),
        crate::journal::nats::token(plugin),
        &hex::encode(digest)[..8]
    )
}

impl NatsDispatcher {
    /// Starts a consumer per (route, plugin) of the rules in force (and of
    /// later reloads), running at most `workers` deliveries at once.
    pub fn start(
        journal: NatsJournal,
        runtime: Arc<Runtime>,
        live: Arc<ArcSwap<Live>>,
        workers: usize,
    ) -> NatsDispatcher {
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let stats = Arc::new(FlowStats::default());
        let ctx = Arc::new(Ctx {
            journal: journal.clone(),
            runtime,
            live,
            stats: stats.clone(),
            workers: Arc::new(Semaphore::new(workers.max(1))),
            tasks: tasks.clone(),
            stop: stop.clone(),
        });
        tokio::spawn(reconcile(ctx));
        NatsDispatcher {
            journal,
            stop,
            tasks,
            stats,
        }
    }

    /// Live delivery figures (for the dashboard).
    pub fn stats(&self) -> &FlowStats {
        &self.stats
    }

    /// Stops taking messages and waits up to `grace` for deliveries in
    /// flight; what does not finish is redelivered after the ack wait.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.stop.cancel();
        self.tasks.close();
        tokio::time::timeout(grace, self.tasks.wait()).await.is_ok()
    }
}

#[async_trait::async_trait]
impl super::Deliveries for NatsDispatcher {
    fn stats(&self) -> &FlowStats {
        NatsDispatcher::stats(self)
    }
    /// The consumers find new deliveries in the stream.
    fn enqueue_all(&self, _work: Vec<Work>) {}
    async fn redrive(&self, select: RedriveSelect) -> Result<Vec<DeliveryKey>, JournalError> {
        self.journal.redrive(select).await
    }
    async fn replay(
        &self,
        live: &Arc<ArcSwap<Live>>,
        spec: ReplaySpec,
    ) -> Result<ReplayJob, super::replay::ReplayError> {
        let live = super::replay::check(live, &spec)?;
        let plan = |e: &Event| super::replay::plan_now(&live, &spec, e);
        Ok(self.journal.replay(spec.clone(), plan).await?)
    }
    async fn replay_job(&self, id: u64) -> Result<Option<ReplayJob>, JournalError> {
        self.journal.replay_job(id).await
    }
    async fn delivery(&self, key: DeliveryKey) -> Result<Option<DeliveryRecord>, JournalError> {
        self.journal.delivery(key).await
    }
    async fn drain(&self, grace: Duration) -> bool {
        NatsDispatcher::drain(self, grace).await
    }
}

/// Keeps one consumer task per (route, plugin) of the rules in force.
async fn reconcile(ctx: Arc<Ctx>) {
    let mut running: HashMap<(String, String), CancellationToken> = HashMap::new();
    loop {
        let live = ctx.live.load_full();
        let mut wanted = HashMap::new();
        for route in &live.config.routes.routes {
            for plugin in &route.to {
                wanted.insert((route.name.clone(), plugin.clone()), ());
            }
        }
        running.retain(|pair, token| {
            let keep = wanted.contains_key(pair);
            if !keep {
                token.cancel();
            }
            keep
        });
        for pair in wanted.into_keys() {
            if !running.contains_key(&pair) {
                let token = ctx.stop.child_token();
                running.insert(pair.clone(), token.clone());
                tokio::spawn(consume(ctx.clone(), pair.0, pair.1, token));
            }
        }
        tokio::select! {
            _ = ctx.stop.cancelled() => return,
            _ = tokio::time::sleep(RECONCILE) => {}
        }
    }
}

/// Creates (or opens) the durable consumer of a delivery.
async fn ensure_consumer(
    ctx: &Ctx,
    route: &str,
    plugin: &str,
) -> Result<consumer::PullConsumer, String> {
    let live = ctx.live.load_full();
    let r = live.config.routes.get(route);
    let ordered = r.is_some_and(|r| r.order_key.is_some());
    let max_ack_pending = if ordered {
        1
    } else {
        r.and_then(|r| r.concurrency)
            .map_or(MAX_ACK_PENDING, |c| c as i64)
    };
    let timeout = live
        .config
        .plugins
        .get(plugin)
        .map_or(Duration::from_secs(1), |p| p.limits.timeout);
    let name = consumer_name(route, plugin);
    let config = consumer::pull::Config {
        durable_name: Some(name.clone()),
        description: Some(format!("switchyard route `{route}` to plugin `{plugin}`")),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: timeout + ACK_MARGIN,
        // Attempts are counted against the route's retry policy here.
        max_deliver: -1,
        max_ack_pending,
        deliver_policy: consumer::DeliverPolicy::All,
        ..Default::default()
    };
    let stream = ctx
        .journal
        .context()
        .get_stream(ctx.journal.stream_name())
        .await
        .map_err(|e| e.to_string())?;
    // Creating a durable consumer that exists updates what may change (a
    // reload changed the route's concurrency or the plugin's deadline), and
    // keeps its position.
    match stream.create_consumer(config).await {
        Ok(c) => Ok(c),
        Err(create) => match stream.get_consumer::<consumer::pull::Config>(&name).await {
            Ok(c) => {
                tracing::warn!(%route, %plugin, error = %create, "cannot update the route's consumer; using it as it is");
                Ok(c)
            }
            Err(_) => Err(create.to_string()),
        },
    }
}

/// Takes the messages of one (route, plugin) consumer until stopped.
async fn consume(ctx: Arc<Ctx>, route: String, plugin: String, stop: CancellationToken) {
    let workers = ctx.workers.available_permits().max(1);
    while !stop.is_cancelled() {
        let consumer = match ensure_consumer(&ctx, &route, &plugin).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(%route, %plugin, error = %e, "cannot open the route's consumer; will try again");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(BACKOFF) => continue,
                }
            }
        };
        // Small batches: messages pulled but waiting for a worker count
        // against their ack wait, and another host may be idle.
        let messages = consumer
            .stream()
            .max_messages_per_batch(workers.min(64))
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await;
        let mut messages = match messages {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(%route, %plugin, error = %e, "cannot pull from the route's consumer; will try again");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(BACKOFF) => continue,
                }
            }
        };
        loop {
            let permit = tokio::select! {
                _ = stop.cancelled() => return,
                p = ctx.workers.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let next = tokio::select! {
                _ = stop.cancelled() => return,
                m = messages.next() => m,
            };
            match next {
                Some(Ok(msg)) => {
                    let ctx2 = ctx.clone();
                    let (route, plugin) = (route.clone(), plugin.clone());
                    ctx.tasks.spawn(async move {
                        handle(&ctx2, &route, &plugin, msg).await;
                        drop(permit);
                    });
                }
                Some(Err(e)) => {
                    tracing::warn!(%route, %plugin, error = %e, "pulling messages failed; reconnecting");
                    break;
                }
                None => break,
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(BACKOFF) => {}
        }
    }
}

async fn ack(msg: &Message, kind: AckKind) {
    let result = match kind {
        AckKind::Ack => msg.double_ack().await,
        other => msg.ack_with(other).await,
    };
    if let Err(e) = result {
        // Not acknowledged: the server delivers it again after the ack wait.
        tracing::warn!(error = %e, "cannot acknowledge a message");
    }
}

/// One message of a (route, plugin) consumer.
async fn handle(ctx: &Ctx, route: &str, plugin: &str, msg: Message) {
    let (stream_seq, delivered, published_ms) = match msg.info() {
        Ok(i) => (
            i.stream_sequence,
            i.delivered.max(1) as u32,
            (i.published.unix_timestamp_nanos() / 1_000_000).max(0) as u64,
        ),
        Err(e) => {
            tracing::error!(error = %e, "a message without JetStream metadata");
            return;
        }
    };
    let env = match Envelope::decode(&msg.payload) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(stream_seq, error = %e, "an unreadable message in the events stream; skipping it");
            return ack(&msg, AckKind::Term).await;
        }
    };
    let Some(delivery) = env
        .deliveries
        .iter()
        .find(|d| d.route == route && d.plugin == plugin)
        .cloned()
    else {
        return ack(&msg, AckKind::Ack).await;
    };
    let seq = env.event_seq.unwrap_or(stream_seq);
    // The event's own message, delivered for the first time: its delivery
    // has no record yet.
    let first = delivered == 1 && env.event_seq.is_none();
    let event = Arc::new(env.event.clone());
    let mut work = Work {
        key: DeliveryKey {
            seq,
            idx: delivery.idx,
        },
        due_ms: now_ms(),
        route: route.to_string(),
        plugin: plugin.to_string(),
        attempts: delivered - 1,
        // A redrive's budget starts when it was published.
        since_ms: if env.event_seq.is_some() {
            published_ms
        } else {
            env.accepted_ms
        },
        order_key: delivery.order_key.clone(),
        replayed: env.replay.is_some(),
        conflicts: 0,
        event: Some(event.clone()),
    };
    loop {
        let live = ctx.live.load_full();
        let a = run_attempt(&ctx.runtime, &ctx.stats, &live, &work, &event).await;
        let mut outcome = a.outcome.clone();
        let result = match a.outcome {
            Outcome::Delivered => {
                let envelopes = emitted_envelopes(seq, &delivery, a.emitted);
                // Everything is checked against the server's message size
                // before the kv writes commit: a result it cannot take is
                // refused whole, and the delivery is dead.
                let (stored, payloads) = match ctx.journal.encode_emitted(&envelopes) {
                    Ok(p) => (ctx.journal.commit_kv(plugin, &a.kv).await, p),
                    Err(e) => (Err(e), Vec::new()),
                };
                match stored {
                    Ok(true) => {
                        let emitted = (envelopes, payloads);
                        delivered_ok(ctx, &env, seq, &delivery, first, a.attempt, emitted).await
                    }
                    Ok(false) => {
                        // A key it read changed meanwhile: run it again on the
                        // new values (run_attempt gives up after too many).
                        tracing::debug!(event_id = %event.id, plugin, "kv conflict; running the delivery again");
                        work.conflicts += 1;
                        continue;
                    }
                    Err(e @ JournalError::TooLarge { .. }) => {
                        let error = format!("the delivery's result cannot be stored: {e}");
                        tracing::warn!(event_id = %event.id, route, plugin, %error, "delivery failed");
                        outcome = Outcome::Dead;
                        let attempt = crate::journal::Attempt {
                            error: Some(error),
                            emitted: Vec::new(),
                            ..a.attempt
                        };
                        dead(ctx, &env, seq, &delivery, first, attempt).await
                    }
                    Err(e) => {
                        tracing::error!(error = %e, event_id = %event.id, "cannot commit kv writes; will try again");
                        return ack(&msg, AckKind::Nak(Some(BACKOFF))).await;
                    }
                }
            }
            Outcome::Retry { due_ms } => {
                let delay = Duration::from_millis(due_ms.saturating_sub(now_ms()));
                ctx.journal
                    .record_attempt(
                        &env,
                        seq,
                        &delivery,
                        first,
                        a.attempt,
                        DeliveryStatus::Retrying,
                        Some(due_ms),
                        None,
                    )
                    .await
                    .map(|()| AckKind::Nak(Some(delay)))
            }
            Outcome::Dead => dead(ctx, &env, seq, &delivery, first, a.attempt).await,
        };
        match result {
            Ok(kind) => {
                let word = match (&outcome, &kind) {
                    (Outcome::Delivered, _) => "delivered",
                    (Outcome::Retry { .. }, _) => "retry",
                    (Outcome::Dead, _) => "dead",
                };
                ack(&msg, kind).await;
                metrics::counter!("switchyard_deliveries_total", "route" => route.to_string(), "outcome" => word)
                    .increment(1);
                ctx.stats.outcome(route, word);
                if word == "dead" {
                    metrics::counter!("switchyard_dead_letters_total", "route" => route.to_string())
                        .increment(1);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, event_id = %event.id, "cannot record the delivery; will try again");
                ack(&msg, AckKind::Nak(Some(BACKOFF))).await;
            }
        }
        return;
    }
}

/// The envelopes of the events a delivery emitted, each with its message id.
fn emitted_envelopes(
    seq: u64,
    delivery: &EnvelopeDelivery,
    emitted: Vec<crate::journal::Emitted>,
) -> Vec<(Envelope, String)> {
    let now = now_ms();
    emitted
        .into_iter()
        .enumerate()
        .map(|(n, e)| {
            let deliveries = e
                .deliveries
                .into_iter()
                .enumerate()
                .map(|(i, p)| EnvelopeDelivery {
                    idx: i as u32,
                    route: p.route,
                    plugin: p.plugin,
                    order_key: p.order_key,
                })
                .collect();
            let env = Envelope {
                event: Event::clone(&e.event),
                accepted_ms: now,
                deliveries,
                event_seq: None,
                replay: None,
                dedup_key: None,
            };
            // Stable per (delivery, n): a re-run after a crash before the
            // ack publishes nothing new within the dedup window.
            (env, format!("emit:{seq}:{}:{n}", delivery.idx))
        })
        .collect()
}

/// After a successful attempt: publishes what it emitted, then records it.
async fn delivered_ok(
    ctx: &Ctx,
    env: &Envelope,
    seq: u64,
    delivery: &EnvelopeDelivery,
    first: bool,
    mut attempt: crate::journal::Attempt,
    (envelopes, payloads): (Vec<(Envelope, String)>, Vec<Bytes>),
) -> Result<AckKind, crate::journal::JournalError> {
    if !envelopes.is_empty() {
        ctx.journal.publish_emitted(&envelopes, payloads).await?;
        metrics::counter!("switchyard_events_emitted_total", "plugin" => delivery.plugin.clone())
            .increment(envelopes.len() as u64);
        attempt.emitted = envelopes.iter().map(|(e, _)| e.event.id.clone()).collect();
    }
    ctx.journal
        .record_attempt(
            env,
            seq,
            delivery,
            first,
            attempt,
            DeliveryStatus::Delivered,
            None,
            None,
        )
        .await?;
    Ok(AckKind::Ack)
}

/// Publishes the dead letter (with every attempt) and records it.
async fn dead(
    ctx: &Ctx,
    env: &Envelope,
    seq: u64,
    delivery: &EnvelopeDelivery,
    first: bool,
    attempt: crate::journal::Attempt,
) -> Result<AckKind, crate::journal::JournalError> {
    let mut record = ctx
        .journal
        .delivery_record(&env.event.id, delivery.idx)
        .await?
        .unwrap_or_else(|| crate::journal::DeliveryRecord {
            route: delivery.route.clone(),
            plugin: delivery.plugin.clone(),
            status: DeliveryStatus::Dead,
            attempts: Vec::new(),
            due_ms: None,
            created_ms: env.accepted_ms,
            order_key: delivery.order_key.clone(),
            replay: env.replay,
            redriven_ms: Vec::new(),
            attempts_not_kept: 0,
        });
    if !record.attempts.contains(&attempt) {
        record.add_attempt(&attempt);
    }
    record.status = DeliveryStatus::Dead;
    record.due_ms = None;
    let dlq_seq = ctx
        .journal
        .publish_dead_letter(env, seq, delivery, record)
        .await?;
    ctx.journal
        .record_attempt(
            env,
            seq,
            delivery,
            first,
            attempt,
            DeliveryStatus::Dead,
            None,
            Some(dlq_seq),
        )
        .await?;
    Ok(AckKind::Term)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_names_are_valid_and_distinct() {
        let a = consumer_name("orders", "audit");
        let b = consumer_name("orders.x", "audit");
        let c = consumer_name("orders_x", "audit");
        assert!(a.starts_with("orders__audit__"));
        assert_ne!(b, c);
        for n in [a, b, c] {
            assert!(!n.contains(['.', '*', '>', ' ']), "{n}");
        }
    }
}
