//! Delivery: takes each (event, route, plugin) delivery the journal holds, runs
//! it when it is due, and records what happened. A delivery is marked done in
//! the journal only once `handle` returned Ok, so whatever was accepted and not
//! yet delivered when the process stopped is found again at the next start.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;

use crate::event::{Event, now_ms};
use crate::journal::{Attempt, DeliveryKey, Journal, Outcome, Settled, Settlement};
use crate::runtime::{Invocation, Runtime};
use crate::server::Live;

/// Longest delay a plugin may ask for with `retry(some(d))`.
const MAX_REQUESTED_DELAY: Duration = Duration::from_secs(24 * 3600);
/// Times a delivery is re-run at once because a key it read changed meanwhile.
const MAX_CONFLICT_RERUNS: u32 = 64;
/// How long to wait before trying again when the journal itself failed.
const JOURNAL_RETRY: Duration = Duration::from_secs(1);

/// One delivery to make.
#[derive(Debug, Clone)]
pub struct Work {
    pub key: DeliveryKey,
    pub due_ms: u64,
    pub route: String,
    pub plugin: String,
    /// Attempts made so far.
    pub attempts: u32,
    /// Times this attempt was run again because a kv key it read changed.
    pub conflicts: u32,
    /// The event, when at hand (else it is read from the journal).
    pub event: Option<Arc<Event>>,
}

/// Handle to the running dispatcher.
#[derive(Clone)]
pub struct Dispatcher {
    tx: mpsc::UnboundedSender<Work>,
}

impl Dispatcher {
    /// Starts the scheduler and `workers` delivery tasks; they stop when
    /// `stop` is cancelled.
    pub fn start(
        journal: Journal,
        runtime: Arc<Runtime>,
        live: Arc<ArcSwap<Live>>,
        workers: usize,
        stop: CancellationToken,
    ) -> Dispatcher {
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = mpsc::channel::<Work>(workers);
        let ready_rx = Arc::new(Mutex::new(ready_rx));
        let ctx = Arc::new(Context {
            journal,
            runtime,
            live,
            requeue: tx.clone(),
        });
        for _ in 0..workers {
            let (ctx, ready_rx, stop) = (ctx.clone(), ready_rx.clone(), stop.clone());
            tokio::spawn(async move {
                loop {
                    let work = tokio::select! {
                        _ = stop.cancelled() => break,
                        w = async { ready_rx.lock().await.recv().await } => w,
                    };
                    let Some(work) = work else { break };
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = ctx.deliver(work) => {}
                    }
                }
            });
        }
        tokio::spawn(schedule(rx, ready_tx, stop));
        Dispatcher { tx }
    }

    /// Queues a delivery (already in the journal) to run when it is due.
    pub fn enqueue(&self, work: Work) {
        // Fails only after shutdown; the journal still has the delivery.
        let _ = self.tx.send(work);
    }
}

/// Keeps deliveries until they are due, then hands them to the workers in due
/// order, waiting while every worker is busy.
async fn schedule(
    mut rx: mpsc::UnboundedReceiver<Work>,
    ready: mpsc::Sender<Work>,
    stop: CancellationToken,
) {
    let mut heap: BinaryHeap<Reverse<(u64, DeliveryKey)>> = BinaryHeap::new();
    let mut waiting: HashMap<DeliveryKey, Work> = HashMap::new();
    loop {
        let now = now_ms();
        while let Some(Reverse((due, key))) = heap.peek().copied() {
            if due > now {
                break;
            }
            heap.pop();
            if let Some(work) = waiting.remove(&key) {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = ready.send(work) => if r.is_err() { return },
                }
            }
        }
        let next = heap
            .peek()
            .map(|Reverse((due, _))| due.saturating_sub(now_ms()));
        tokio::select! {
            _ = stop.cancelled() => return,
            w = rx.recv() => match w {
                Some(w) => {
                    heap.push(Reverse((w.due_ms, w.key)));
                    waiting.insert(w.key, w);
                }
                None => return,
            },
            _ = tokio::time::sleep(Duration::from_millis(next.unwrap_or(0))), if next.is_some() => {}
        }
    }
}

struct Context {
    journal: Journal,
    runtime: Arc<Runtime>,
    live: Arc<ArcSwap<Live>>,
    requeue: mpsc::UnboundedSender<Work>,
}

impl Context {
    async fn deliver(self: &Arc<Self>, work: Work) {
        let event = match &work.event {
            Some(e) => e.clone(),
            None => match self.journal.event(work.key.seq) {
                Ok(Some(e)) => e,
                Ok(None) => {
                    tracing::error!(
                        seq = work.key.seq,
                        "delivery refers to a missing event; dropping it"
                    );
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot read event from journal; will try again");
                    return self.later(work, JOURNAL_RETRY);
                }
            },
        };
        let live = self.live.load_full();
        let policy = live
            .config
            .routes
            .get(&work.route)
            .map(|r| r.retry)
            .unwrap_or_default();
        let attempt_no = work.attempts + 1;
        let Some(plugin) = live.plugins.get(&work.plugin).cloned() else {
            let error = format!("plugin `{}` is not configured", work.plugin);
            let attempt = Attempt {
                at_ms: now_ms(),
                duration_us: 0,
                error: Some(error),
            };
            return self.settle_later(work, event, attempt, Outcome::Failed, Default::default());
        };

        if work.conflicts >= MAX_CONFLICT_RERUNS {
            // Constant conflicts: count it as a failed attempt and back off.
            let attempt = Attempt {
                at_ms: now_ms(),
                duration_us: 0,
                error: Some("kv writes kept conflicting with concurrent deliveries".into()),
            };
            let outcome = if attempt_no < policy.attempts {
                Outcome::Retry {
                    due_ms: now_ms() + policy.delay_after(attempt_no).as_millis() as u64,
                }
            } else {
                Outcome::Failed
            };
            return self.settle_later(work, event, attempt, outcome, Default::default());
        }

        let at_ms = now_ms();
        let run = self.runtime.deliver(&plugin, &event).await;
        let (outcome, error) = match run.invocation {
            Invocation::Ok => (Outcome::Delivered, None),
            Invocation::Retry(delay) if attempt_no < policy.attempts => {
                let delay = delay
                    .map(|d| d.min(MAX_REQUESTED_DELAY))
                    .unwrap_or_else(|| policy.delay_after(attempt_no));
                let due_ms = now_ms() + delay.as_millis() as u64;
                (
                    Outcome::Retry { due_ms },
                    Some(format!(
                        "plugin asked to retry; next attempt in {}",
                        humantime::format_duration(Duration::from_millis(delay.as_millis() as u64))
                    )),
                )
            }
            Invocation::Retry(_) => (
                Outcome::Failed,
                Some(format!(
                    "plugin asked to retry; gave up after {attempt_no} attempts"
                )),
            ),
            Invocation::Reject(reason) => (Outcome::Failed, Some(format!("rejected: {reason}"))),
            Invocation::Trap(text) => (Outcome::Failed, Some(text)),
        };
        if let Some(e) = &error {
            tracing::warn!(
                event_id = %event.id, route = %work.route, plugin = %work.plugin,
                attempt = attempt_no, error = %e, "delivery failed"
            );
        } else {
            tracing::debug!(
                event_id = %event.id, route = %work.route, plugin = %work.plugin,
                elapsed = ?run.elapsed, "delivered"
            );
        }
        let attempt = Attempt {
            at_ms,
            duration_us: run.elapsed.as_micros() as u64,
            error,
        };
        self.settle_later(work, event, attempt, outcome, run.kv);
    }

    /// Commits an attempt's result in the background, so the worker is free
    /// for the next delivery while the journal writer batches the commit.
    fn settle_later(
        self: &Arc<Self>,
        work: Work,
        event: Arc<Event>,
        attempt: Attempt,
        outcome: Outcome,
        kv: crate::journal::KvChanges,
    ) {
        let ctx = self.clone();
        tokio::spawn(async move {
            let settlement = Settlement {
                key: work.key,
                plugin: work.plugin.clone(),
                attempt,
                outcome: outcome.clone(),
                kv,
            };
            match ctx.journal.settle(settlement).await {
                Ok(Settled::Committed) => {
                    if let Outcome::Retry { due_ms } = outcome {
                        ctx.enqueue_retry(&work, event, work.attempts + 1, due_ms);
                    }
                }
                Ok(Settled::Stale) => {}
                Ok(Settled::Conflict) => {
                    // A key it read changed meanwhile: nothing was written; run
                    // the same attempt again now, on the new values.
                    tracing::debug!(event_id = %event.id, plugin = %work.plugin, "kv conflict; running the delivery again");
                    let _ = ctx.requeue.send(Work {
                        due_ms: now_ms(),
                        conflicts: work.conflicts + 1,
                        event: Some(event),
                        ..work
                    });
                }
                Err(e) => {
                    tracing::error!(error = %e, event_id = %event.id, "cannot record delivery; will try again");
                    ctx.later(work, JOURNAL_RETRY);
                }
            }
        });
    }

    fn enqueue_retry(&self, work: &Work, event: Arc<Event>, attempts: u32, due_ms: u64) {
        let _ = self.requeue.send(Work {
            key: work.key,
            due_ms,
            route: work.route.clone(),
            plugin: work.plugin.clone(),
            attempts,
            conflicts: 0,
            event: Some(event),
        });
    }

    /// Runs the same attempt again later (the journal was not updated).
    fn later(&self, mut work: Work, delay: Duration) {
        work.due_ms = now_ms() + delay.as_millis() as u64;
        let _ = self.requeue.send(work);
    }
}
