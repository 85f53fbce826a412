//! Delivery: takes each (event, route, plugin) delivery the journal holds, runs
//! it when it is due, and records what happened. A delivery is marked done in
//! the journal only once `handle` returned Ok, so whatever was accepted and not
//! yet delivered when the process stopped is found again at the next start.
//!
//! The scheduler hands due deliveries to a fixed set of workers. It holds a
//! delivery back while its route is at its `concurrency` limit, and, for a
//! route with an `order_key`, while an earlier delivery with the same key is
//! not final (the journal's order index says which one is first).

pub mod nats;
pub mod replay;
pub mod stats;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::event::{Event, now_ms};
use crate::journal::nats::NatsJournal;
use crate::journal::{
    Attempt, DeliveryKey, DueDelivery, Emitted, EventStore, Journal, JournalError, KvChanges,
    Outcome, PlannedDelivery, RedriveSelect, ReplayJob, ReplaySpec, Settled, Settlement,
    plugin_text,
};
use crate::rules::RetryPolicy;
use crate::runtime::{Invocation, Runtime};
use crate::server::Live;
use stats::FlowStats;
use tracing::Instrument;

/// Longest delay a plugin may ask for with `retry(some(d))`.
const MAX_REQUESTED_DELAY: Duration = Duration::from_secs(24 * 3600);
/// Times a delivery is re-run at once because a key it read changed meanwhile.
const MAX_CONFLICT_RERUNS: u32 = 64;
/// How long to wait before trying again when the journal itself failed.
const JOURNAL_RETRY: Duration = Duration::from_secs(1);
/// Waiting deliveries that keep their event in memory; beyond this backlog
/// (and for deliveries due later than `KEEP_EVENT_AHEAD`), the event is read
/// back from the journal when the delivery is due, so a large backlog costs
/// a small record per delivery rather than its event.
const KEEP_EVENTS: usize = 10_000;
const KEEP_EVENT_AHEAD: Duration = Duration::from_secs(5);

/// The extension attribute that tells a plugin which attempt this is (1-based,
/// counted since the delivery was planned or last redriven).
pub const ATTEMPT_EXTENSION: &str = "deliveryattempt";
/// The extension attribute set to "true" on deliveries planned by a replay.
pub const REPLAYED_EXTENSION: &str = "replayed";

/// One delivery to make.
#[derive(Debug, Clone)]
pub struct Work {
    pub key: DeliveryKey,
    pub due_ms: u64,
    pub route: String,
    pub plugin: String,
    /// Attempts made so far that count against the retry policy.
    pub attempts: u32,
    /// When the retry budget started (planned or last redriven), Unix ms.
    pub since_ms: u64,
    /// The route's order key value, if the delivery is ordered.
    pub order_key: Option<String>,
    /// Planned by a replay.
    pub replayed: bool,
    /// Times this attempt was run again because a kv key it read changed.
    pub conflicts: u32,
    /// The event, when at hand (else it is read from the journal).
    pub event: Option<Arc<Event>>,
}

impl Work {
    /// The work for a delivery as the journal holds it.
    pub fn from_due(d: DueDelivery, event: Option<Arc<Event>>) -> Work {
        Work {
            key: d.key,
            due_ms: d.due_ms,
            attempts: d.record.budget_attempts(),
            since_ms: d.record.budget_since_ms(),
            replayed: d.record.replay.is_some(),
            route: d.record.route,
            plugin: d.record.plugin,
            order_key: d.record.order_key,
            conflicts: 0,
            event,
        }
    }

    fn order_slot(&self) -> Option<(String, String)> {
        self.order_key
            .as_ref()
            .map(|k| (self.route.clone(), k.clone()))
    }
}

enum Msg {
    Enqueue(Vec<Work>),
    /// A dispatched delivery is over (its result committed, or given up on).
    Done {
        route: String,
        order_key: Option<String>,
    },
}

/// Handle to the running dispatcher.
#[derive(Clone)]
pub struct Dispatcher {
    journal: Journal,
    tx: mpsc::UnboundedSender<Msg>,
    tasks: TaskTracker,
    stop: CancellationToken,
    stats: Arc<FlowStats>,
}

impl Dispatcher {
    /// Starts the scheduler and `workers` delivery tasks.
    pub fn start(
        journal: Journal,
        runtime: Arc<Runtime>,
        live: Arc<ArcSwap<Live>>,
        workers: usize,
    ) -> Dispatcher {
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = mpsc::channel::<Work>(workers);
        let ready_rx = Arc::new(Mutex::new(ready_rx));
        let tasks = TaskTracker::new();
        let stop = CancellationToken::new();
        let stats = Arc::new(FlowStats::default());
        let ctx = Arc::new(Context {
            stats: stats.clone(),
            journal: journal.clone(),
            runtime,
            live: live.clone(),
            requeue: tx.clone(),
            tasks: tasks.clone(),
        });
        for _ in 0..workers {
            let (ctx, ready_rx, stop) = (ctx.clone(), ready_rx.clone(), stop.clone());
            tasks.spawn(async move {
                loop {
                    let work = tokio::select! {
                        _ = stop.cancelled() => break,
                        w = async { ready_rx.lock().await.recv().await } => w,
                    };
                    let Some(work) = work else { break };
                    // A started delivery runs to its end (its plugin's
                    // deadline bounds it); shutdown waits for it.
                    ctx.deliver(work).await;
                }
            });
        }
        let scheduler = Scheduler {
            journal: journal.clone(),
            live,
            ready: ready_tx,
            heap: BinaryHeap::new(),
            waiting: HashMap::new(),
            in_flight: HashMap::new(),
            held: HashMap::new(),
            busy_keys: HashSet::new(),
            parked: HashMap::new(),
        };
        tokio::spawn(scheduler.run(rx, stop.clone()));
        Dispatcher {
            journal,
            tx,
            tasks,
            stop,
            stats,
        }
    }

    /// Live delivery figures (for the dashboard).
    pub fn stats(&self) -> &FlowStats {
        &self.stats
    }

    /// Queues a delivery (already in the journal) to run when it is due.
    pub fn enqueue(&self, work: Work) {
        self.enqueue_all(vec![work]);
    }

    /// Queues deliveries together: the scheduler sees all of them before it
    /// dispatches any (ordered routes rely on it after a restart).
    pub fn enqueue_all(&self, work: Vec<Work>) {
        if !work.is_empty() {
            // Fails only after shutdown; the journal still has the deliveries.
            let _ = self.tx.send(Msg::Enqueue(work));
        }
    }

    /// Stops dispatching and waits up to `grace` for the deliveries in flight
    /// and their journal commits. Returns whether everything finished; what
    /// did not is delivered again after the next start.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.stop.cancel();
        self.tasks.close();
        tokio::time::timeout(grace, self.tasks.wait()).await.is_ok()
    }
}

/// Delivery state, whichever the engine: where deliveries stand, and what
/// plans them again (redrive, replay). One implementation per backend:
/// [`Dispatcher`] (embedded, this file) and [`nats::NatsDispatcher`].
#[async_trait::async_trait]
pub trait Deliveries: Send + Sync {
    /// Live delivery figures of this host.
    fn stats(&self) -> &FlowStats;
    /// Queues deliveries just planned with their event (a no-op where the
    /// engine finds them itself).
    fn enqueue_all(&self, work: Vec<Work>);
    /// Delivers dead letters again, with a fresh retry budget.
    async fn redrive(&self, select: RedriveSelect) -> Result<Vec<DeliveryKey>, JournalError>;
    /// Plans a replay of archived events to the routes in force now (marked
    /// `replayed`); returns once every delivery is planned.
    async fn replay(
        &self,
        live: &Arc<ArcSwap<Live>>,
        spec: ReplaySpec,
    ) -> Result<ReplayJob, replay::ReplayError>;
    /// A replay and the deliveries it planned.
    async fn replay_job(&self, id: u64) -> Result<Option<ReplayJob>, JournalError>;
    /// Where one delivery stands.
    async fn delivery(
        &self,
        key: DeliveryKey,
    ) -> Result<Option<crate::journal::DeliveryRecord>, JournalError>;
    /// Stops dispatching; waits up to `grace` for deliveries in flight.
    async fn drain(&self, grace: Duration) -> bool;
}

#[async_trait::async_trait]
impl Deliveries for Dispatcher {
    fn stats(&self) -> &FlowStats {
        Dispatcher::stats(self)
    }
    fn enqueue_all(&self, work: Vec<Work>) {
        Dispatcher::enqueue_all(self, work)
    }
    async fn redrive(&self, select: RedriveSelect) -> Result<Vec<DeliveryKey>, JournalError> {
        replay::redrive(&self.journal, self, select).await
    }
    async fn replay(
        &self,
        live: &Arc<ArcSwap<Live>>,
        spec: ReplaySpec,
    ) -> Result<ReplayJob, replay::ReplayError> {
        replay::replay(&self.journal, self, live, spec).await
    }
    async fn replay_job(&self, id: u64) -> Result<Option<ReplayJob>, JournalError> {
        self.journal.replay_job(id)
    }
    async fn delivery(
        &self,
        key: DeliveryKey,
    ) -> Result<Option<crate::journal::DeliveryRecord>, JournalError> {
        self.journal.delivery(key)
    }
    async fn drain(&self, grace: Duration) -> bool {
        Dispatcher::drain(self, grace).await
    }
}

/// The engine a server runs on: its store and its deliveries.
#[derive(Clone)]
pub struct Backend {
    store: Arc<dyn EventStore>,
    deliveries: Arc<dyn Deliveries>,
    /// The embedded journal, for what only it has (flush, stats for tests).
    embedded: Option<Journal>,
}

impl Backend {
    /// The embedded engine.
    pub fn embedded_engine(journal: Journal, dispatcher: Dispatcher) -> Backend {
        Backend {
            store: Arc::new(journal.clone()),
            deliveries: Arc::new(dispatcher),
            embedded: Some(journal),
        }
    }

    /// The NATS JetStream engine.
    pub fn nats_engine(journal: NatsJournal, dispatcher: nats::NatsDispatcher) -> Backend {
        Backend {
            store: Arc::new(journal),
            deliveries: Arc::new(dispatcher),
            embedded: None,
        }
    }

    /// Events, timelines, dead letters and kv.
    pub fn store(&self) -> &dyn EventStore {
        &*self.store
    }

    /// Delivery state: redrive, replay, stats.
    pub fn deliveries(&self) -> &dyn Deliveries {
        &*self.deliveries
    }

    /// The embedded journal, when the engine is the embedded one.
    pub fn embedded(&self) -> Option<&Journal> {
        self.embedded.as_ref()
    }
}

/// Keeps deliveries until they are due, then hands them to the workers in due
/// order, waiting while every worker is busy.
struct Scheduler {
    journal: Journal,
    live: Arc<ArcSwap<Live>>,
    ready: mpsc::Sender<Work>,
    heap: BinaryHeap<Reverse<(u64, DeliveryKey)>>,
    waiting: HashMap<DeliveryKey, Work>,
    /// Deliveries dispatched and not done, per route.
    in_flight: HashMap<String, usize>,
    /// Due deliveries of routes at their concurrency limit, in due order.
    held: HashMap<String, VecDeque<Work>>,
    /// (route, order key) slots with a delivery in flight.
    busy_keys: HashSet<(String, String)>,
    /// Due deliveries waiting for an earlier one of their (route, key).
    parked: HashMap<(String, String), Vec<Work>>,
}

impl Scheduler {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>, stop: CancellationToken) {
        loop {
            let now = now_ms();
            while let Some(Reverse((due, key))) = self.heap.peek().copied() {
                if due > now {
                    break;
                }
                self.heap.pop();
                let Some(work) = self.waiting.remove(&key) else {
                    continue;
                };
                let Some(work) = self.admit(work) else {
                    continue;
                };
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = self.ready.send(work) => if r.is_err() { return },
                }
            }
            metrics::gauge!("switchyard_scheduled_deliveries").set(self.waiting.len() as f64);
            let next = self
                .heap
                .peek()
                .map(|Reverse((due, _))| due.saturating_sub(now_ms()));
            tokio::select! {
                _ = stop.cancelled() => return,
                msg = rx.recv() => match msg {
                    Some(msg) => {
                        self.handle(msg);
                        // Take everything already queued before dispatching.
                        while let Ok(msg) = rx.try_recv() {
                            self.handle(msg);
                        }
                    }
                    None => return,
                },
                _ = tokio::time::sleep(Duration::from_millis(next.unwrap_or(0))), if next.is_some() => {}
            }
        }
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Enqueue(works) => {
                for w in works {
                    self.push(w);
                }
            }
            Msg::Done { route, order_key } => {
                if let Some(n) = self.in_flight.get_mut(&route) {
                    *n = n.saturating_sub(1);
                }
                if let Some(w) = self.held.get_mut(&route).and_then(VecDeque::pop_front) {
                    self.push(w);
                }
                if let Some(k) = order_key {
                    let slot = (route, k);
                    self.busy_keys.remove(&slot);
                    for w in self.parked.remove(&slot).unwrap_or_default() {
                        self.push(w);
                    }
                }
            }
        }
    }

    fn push(&mut self, w: Work) {
        let w = shed_event(w, now_ms(), self.waiting.len());
        self.heap.push(Reverse((w.due_ms, w.key)));
        self.waiting.insert(w.key, w);
    }

    /// Whether a due delivery may run now; if not, keeps it where it waits.
    fn admit(&mut self, work: Work) -> Option<Work> {
        let limit = self
            .live
            .load()
            .config
            .routes
            .get(&work.route)
            .and_then(|r| r.concurrency);
        let running = self.in_flight.get(&work.route).copied().unwrap_or(0);
        if limit.is_some_and(|l| running >= l) {
            self.held
                .entry(work.route.clone())
                .or_default()
                .push_back(work);
            return None;
        }
        if let Some(slot) = work.order_slot() {
            if self.busy_keys.contains(&slot) {
                self.parked.entry(slot).or_default().push(work);
                return None;
            }
            match self.journal.order_head(&slot.0, &slot.1) {
                Ok(Some(head)) if head != work.key => {
                    self.parked.entry(slot).or_default().push(work);
                    return None;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the order index; will try again");
                    let mut work = work;
                    work.due_ms = now_ms() + JOURNAL_RETRY.as_millis() as u64;
                    self.push(work);
                    return None;
                }
            }
            self.busy_keys.insert(slot);
        }
        *self.in_flight.entry(work.route.clone()).or_default() += 1;
        Some(work)
    }
}

/// Drops the in-memory copy of a waiting delivery's event when the backlog
/// is large or the delivery is not due soon (see `KEEP_EVENTS`).
fn shed_event(mut w: Work, now_ms: u64, waiting: usize) -> Work {
    let later = w.due_ms > now_ms + KEEP_EVENT_AHEAD.as_millis() as u64;
    if later || waiting >= KEEP_EVENTS {
        w.event = None;
    }
    w
}

struct Context {
    stats: Arc<FlowStats>,
    journal: Journal,
    runtime: Arc<Runtime>,
    live: Arc<ArcSwap<Live>>,
    requeue: mpsc::UnboundedSender<Msg>,
    tasks: TaskTracker,
}

/// What to record for an attempt that did not succeed.
fn failed(
    policy: &RetryPolicy,
    work: &Work,
    error: String,
    requested: Option<Duration>,
    retryable: bool,
) -> (Outcome, String) {
    let attempt_no = work.attempts + 1;
    if !retryable {
        return (Outcome::Dead, error);
    }
    if attempt_no >= policy.attempts {
        return (
            Outcome::Dead,
            format!("{error}; gave up after {attempt_no} attempts"),
        );
    }
    let delay = requested
        .map(|d| d.min(MAX_REQUESTED_DELAY))
        .unwrap_or_else(|| policy.delay_after(attempt_no));
    let due_ms = now_ms() + delay.as_millis() as u64;
    let deadline = work.since_ms + policy.max_age.as_millis() as u64;
    if due_ms > deadline {
        return (
            Outcome::Dead,
            format!(
                "{error}; gave up: the next attempt would come after the route's max_age of {}",
                humantime::format_duration(policy.max_age)
            ),
        );
    }
    (Outcome::Retry { due_ms }, error)
}

/// What one attempt at a delivery gave, for the engine to commit.
pub(crate) struct Attempted {
    pub outcome: Outcome,
    pub attempt: Attempt,
    pub kv: KvChanges,
    pub emitted: Vec<Emitted>,
}

/// Runs one attempt at a delivery with the plugin and rules in force, and
/// says what to record: shared by both engines' dispatchers.
pub(crate) async fn run_attempt(
    runtime: &Runtime,
    stats: &FlowStats,
    live: &Live,
    work: &Work,
    event: &Arc<Event>,
) -> Attempted {
    let policy = live
        .config
        .routes
        .get(&work.route)
        .map(|r| r.retry)
        .unwrap_or_default();
    let attempt_no = work.attempts + 1;
    let at_ms = now_ms();
    let Some(plugin) = live.plugins.get(&work.plugin).cloned() else {
        // Retryable: a reload may bring the plugin back.
        let error = format!("plugin `{}` is not configured", work.plugin);
        let (outcome, error) = failed(&policy, work, error, None, true);
        let attempt = Attempt {
            at_ms,
            duration_us: 0,
            error: Some(error),
            plugin_hash: None,
            emitted: Vec::new(),
        };
        return Attempted {
            outcome,
            attempt,
            kv: KvChanges::default(),
            emitted: Vec::new(),
        };
    };

    if work.conflicts >= MAX_CONFLICT_RERUNS {
        // Constant conflicts: count it as a failed attempt and back off.
        let error = "kv writes kept conflicting with concurrent deliveries".to_string();
        let (outcome, error) = failed(&policy, work, error, None, true);
        let attempt = Attempt {
            at_ms,
            duration_us: 0,
            error: Some(error),
            plugin_hash: Some(plugin.hash.clone()),
            emitted: Vec::new(),
        };
        return Attempted {
            outcome,
            attempt,
            kv: KvChanges::default(),
            emitted: Vec::new(),
        };
    }

    let mut extra = vec![(ATTEMPT_EXTENSION, attempt_no.to_string())];
    if work.replayed {
        extra.push((REPLAYED_EXTENSION, "true".to_string()));
    }
    let span = crate::trace::delivery_span(event, &work.route, &work.plugin, attempt_no);
    let run = runtime
        .deliver_with(&plugin, event, &extra)
        .instrument(span)
        .await;
    let (outcome, error) = match run.invocation {
        Invocation::Ok => (Outcome::Delivered, None),
        Invocation::Retry(delay) => {
            let error = match run.http_failure {
                Some(http) => format!(
                    "plugin asked to retry (last HTTP failure: {})",
                    plugin_text(http)
                ),
                None => "plugin asked to retry".to_string(),
            };
            let (o, e) = failed(&policy, work, error, delay, true);
            (o, Some(e))
        }
        Invocation::Reject(reason) => (
            Outcome::Dead,
            Some(format!("rejected: {}", plugin_text(reason))),
        ),
        Invocation::Trap(text) => {
            let (o, e) = failed(&policy, work, plugin_text(text), None, true);
            (o, Some(e))
        }
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
    metrics::histogram!("switchyard_delivery_seconds", "plugin" => work.plugin.clone())
        .record(run.elapsed.as_secs_f64());
    stats.duration(&work.plugin, run.elapsed);
    let attempt = Attempt {
        at_ms,
        duration_us: run.elapsed.as_micros() as u64,
        error,
        plugin_hash: Some(plugin.hash.clone()),
        emitted: run.emitted.iter().map(|e| e.id.clone()).collect(),
    };
    // Derived events are routed now, by the rules in force, and stored
    // in the same commit as the acknowledgement.
    let emitted: Vec<Emitted> = run
        .emitted
        .into_iter()
        .map(|e| {
            let e = Arc::new(e);
            let routes = live.config.routes.matching(&e);
            let deliveries = crate::ingress::plan(&routes, &e);
            Emitted {
                event: e,
                deliveries,
            }
        })
        .collect();
    Attempted {
        outcome,
        attempt,
        kv: run.kv,
        emitted,
    }
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
                    return self.done(&work);
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot read event from journal; will try again");
                    return self.later(work, JOURNAL_RETRY);
                }
            },
        };
        let live = self.live.load_full();
        let a = run_attempt(&self.runtime, &self.stats, &live, &work, &event).await;
        self.settle_later(work, event, a.attempt, a.outcome, a.kv, a.emitted);
    }

    /// Commits an attempt's result in the background, so the worker is free
    /// for the next delivery while the journal writer batches the commit.
    fn settle_later(
        self: &Arc<Self>,
        work: Work,
        event: Arc<Event>,
        attempt: Attempt,
        outcome: Outcome,
        kv: KvChanges,
        emitted: Vec<Emitted>,
    ) {
        let ctx = self.clone();
        self.tasks.spawn(async move {
            let mut derived: Vec<(Arc<Event>, Vec<PlannedDelivery>)> = emitted
                .iter()
                .map(|e| (e.event.clone(), e.deliveries.clone()))
                .collect();
            let mut outcome = outcome;
            let settlement = Settlement {
                key: work.key,
                plugin: work.plugin.clone(),
                attempt: attempt.clone(),
                outcome: outcome.clone(),
                kv,
                emitted,
            };
            let mut result = ctx.journal.settle(settlement).await;
            if let Err(e @ JournalError::TooLarge { .. }) = &result {
                // The same run would make the same result again: the
                // delivery is dead, with why, and without its writes.
                let error = format!("the delivery's result cannot be stored: {e}");
                tracing::warn!(event_id = %event.id, route = %work.route, plugin = %work.plugin, %error, "delivery failed");
                outcome = Outcome::Dead;
                derived.clear();
                let settlement = Settlement {
                    key: work.key,
                    plugin: work.plugin.clone(),
                    attempt: Attempt {
                        error: Some(error),
                        emitted: Vec::new(),
                        ..attempt
                    },
                    outcome: Outcome::Dead,
                    kv: KvChanges::default(),
                    emitted: Vec::new(),
                };
                result = ctx.journal.settle(settlement).await;
            }
            // Only now, with the result committed, may the next delivery of
            // the same order key start.
            ctx.done(&work);
            if let Ok(Settled::Committed) = result {
                let word = match outcome {
                    Outcome::Delivered => "delivered",
                    Outcome::Retry { .. } => "retry",
                    Outcome::Dead => "dead",
                };
                metrics::counter!("switchyard_deliveries_total", "route" => work.route.clone(), "outcome" => word)
                    .increment(1);
                ctx.stats.outcome(&work.route, word);
                if word == "dead" {
                    metrics::counter!("switchyard_dead_letters_total", "route" => work.route.clone())
                        .increment(1);
                }
            }
            match result {
                Ok(Settled::Committed) => {
                    if let Outcome::Delivered = outcome
                        && !derived.is_empty()
                    {
                        ctx.dispatch_emitted(&work.plugin, derived);
                    }
                    if let Outcome::Retry { due_ms } = outcome {
                        ctx.requeue(Work {
                            due_ms,
                            attempts: work.attempts + 1,
                            conflicts: 0,
                            event: Some(event),
                            ..work
                        });
                    }
                }
                Ok(Settled::Stale) => {}
                Ok(Settled::Conflict) => {
                    // A key it read changed meanwhile: nothing was written; run
                    // the same attempt again now, on the new values.
                    tracing::debug!(event_id = %event.id, plugin = %work.plugin, "kv conflict; running the delivery again");
                    ctx.requeue(Work {
                        due_ms: now_ms(),
                        conflicts: work.conflicts + 1,
                        event: Some(event),
                        ..work
                    });
                }
                Err(e) => {
                    tracing::error!(error = %e, event_id = %event.id, "cannot record delivery; will try again");
                    ctx.requeue(Work {
                        due_ms: now_ms() + JOURNAL_RETRY.as_millis() as u64,
                        ..work
                    });
                }
            }
        });
    }

    /// Queues the deliveries of events a delivery emitted, now committed.
    fn dispatch_emitted(&self, plugin: &str, derived: Vec<(Arc<Event>, Vec<PlannedDelivery>)>) {
        metrics::counter!("switchyard_events_emitted_total", "plugin" => plugin.to_string())
            .increment(derived.len() as u64);
        let mut work = Vec::new();
        for (event, planned) in derived {
            let seq = match self.journal.event_seq(&event.id) {
                Ok(Some(seq)) => seq,
                Ok(None) => continue,
                Err(e) => {
                    // They are in the journal: the next start dispatches them.
                    tracing::error!(error = %e, event_id = %event.id, "cannot look up an emitted event");
                    continue;
                }
            };
            tracing::debug!(id = %event.id, r#type = %event.ty, plugin, deliveries = planned.len(), "emitted");
            let now = now_ms();
            for (idx, p) in planned.into_iter().enumerate() {
                work.push(Work {
                    key: DeliveryKey {
                        seq,
                        idx: idx as u32,
                    },
                    due_ms: now,
                    route: p.route,
                    plugin: p.plugin,
                    attempts: 0,
                    since_ms: now,
                    order_key: p.order_key,
                    replayed: false,
                    conflicts: 0,
                    event: Some(event.clone()),
                });
            }
        }
        if !work.is_empty() {
            let _ = self.requeue.send(Msg::Enqueue(work));
        }
    }

    fn done(&self, work: &Work) {
        let _ = self.requeue.send(Msg::Done {
            route: work.route.clone(),
            order_key: work.order_key.clone(),
        });
    }

    fn requeue(&self, work: Work) {
        let _ = self.requeue.send(Msg::Enqueue(vec![work]));
    }

    /// Runs the same attempt again later (the journal was not updated).
    fn later(&self, mut work: Work, delay: Duration) {
        self.done(&work);
        work.due_ms = now_ms() + delay.as_millis() as u64;
        self.requeue(work);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn work(attempts: u32, since_ms: u64) -> Work {
        Work {
            key: DeliveryKey { seq: 1, idx: 0 },
            due_ms: 0,
            route: "r".into(),
            plugin: "p".into(),
            attempts,
            since_ms,
            order_key: None,
            replayed: false,
            conflicts: 0,
            event: None,
        }
    }

    #[test]
    fn waiting_deliveries_keep_their_event_only_when_due_soon_and_few() {
        let event = Arc::new(Event {
            id: "e".into(),
            source: "s".into(),
            ty: "t".into(),
            subject: None,
            time: "now".into(),
            datacontenttype: "application/json".into(),
            data: b"{}".to_vec(),
            extensions: Default::default(),
        });
        let with = |due_ms| Work {
            due_ms,
            event: Some(event.clone()),
            ..work(0, 0)
        };
        assert!(shed_event(with(1_000), 1_000, 0).event.is_some());
        assert!(shed_event(with(60_000), 1_000, 0).event.is_none());
        assert!(shed_event(with(1_000), 1_000, KEEP_EVENTS).event.is_none());
    }

    fn policy(attempts: u32, max_age: Duration) -> RetryPolicy {
        RetryPolicy {
            attempts,
            backoff: crate::rules::Backoff::Fixed,
            initial: Duration::from_secs(10),
            max: Duration::from_secs(10),
            max_age,
        }
    }

    #[test]
    fn retryable_failures_back_off_until_attempts_or_age_run_out() {
        let day = Duration::from_secs(86400);
        let now = now_ms();
        let (o, e) = failed(&policy(3, day), &work(0, now), "boom".into(), None, true);
        let Outcome::Retry { due_ms } = o else {
            panic!("{o:?}")
        };
        // Fixed 10 s with equal jitter: 5 to 10 s from now.
        assert!(
            (now + 5_000..=now_ms() + 10_000).contains(&due_ms),
            "{due_ms}"
        );
        assert_eq!(e, "boom");

        // The plugin's own delay wins over the policy's.
        let (o, _) = failed(
            &policy(3, day),
            &work(1, now),
            "x".into(),
            Some(Duration::from_millis(1)),
            true,
        );
        assert!(matches!(o, Outcome::Retry { due_ms } if due_ms <= now_ms() + 1));

        // The third of three attempts was the last.
        let (o, e) = failed(&policy(3, day), &work(2, now), "boom".into(), None, true);
        assert!(matches!(o, Outcome::Dead));
        assert_eq!(e, "boom; gave up after 3 attempts");

        // Past max_age: dead even with attempts left.
        let (o, e) = failed(
            &policy(100, Duration::from_secs(60)),
            &work(1, now - 58_000),
            "boom".into(),
            None,
            true,
        );
        assert!(matches!(o, Outcome::Dead), "{o:?}");
        assert!(e.contains("max_age of 1m"), "{e}");

        // A rejection is not retried.
        let (o, e) = failed(&policy(3, day), &work(0, now), "no".into(), None, false);
        assert!(matches!(o, Outcome::Dead));
        assert_eq!(e, "no");
    }
}
