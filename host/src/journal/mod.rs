//! The durable journal: accepted events, their planned deliveries, and plugin
//! key-value state.
//!
//! Two backends: `embedded` keeps everything in one store so that it changes
//! together, with one writer that commits whatever is queued in a single
//! transaction (group commit); `nats` keeps it in NATS JetStream, shared by
//! several hosts. What both offer behind one interface is a trait per
//! capability: [`EventStore`] (events, dedup, timelines, dead letters) and
//! [`KvStore`] (plugin state as plugins read it); delivery state is
//! `dispatch::Deliveries`, with the dispatcher of each backend.

mod embedded;
pub mod nats;
mod overlay;
mod priority;
mod reaper;
mod wal;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::event::Event;

pub use embedded::Journal;

/// Errors of the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The underlying store failed (I/O, corruption, a poisoned database
    /// after a failed fsync, ...).
    #[error("store error: {0}")]
    Store(#[from] fjall::Error),
    /// A record could not be encoded or decoded, or a key cannot be stored
    /// (an empty event id, or a key over 64 KiB).
    #[error("record encoding error: {0}")]
    Encoding(String),
    /// One event, or one delivery's result (its kv writes and emitted
    /// events), takes more bytes than a batch of the commit log holds (HTTP
    /// 413 for an event); nothing of it is stored, and the ops batched with
    /// it are not affected.
    #[error(
        "a write of {bytes} bytes is more than the journal takes in one commit ({limit} bytes at most)"
    )]
    TooLarge { bytes: usize, limit: usize },
    /// The write queue is full: the caller should shed load (HTTP 503).
    #[error("journal write queue is full")]
    Saturated,
    /// The batch this operation was in could not be committed; nothing of it
    /// is stored.
    #[error("journal commit failed: {0}")]
    CommitFailed(String),
    /// The writer has stopped (shutdown, or a fatal store error).
    #[error("journal writer has stopped")]
    Closed,
    /// The engine's server could not be reached or did not answer in time
    /// (NATS down, no JetStream): the caller should answer 503.
    #[error("engine unavailable: {0}")]
    Unavailable(String),
    /// The data directory could not be prepared.
    #[error("cannot open journal at {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The journal's position of an event: its sequence number (acceptance order).
pub type Seq = u64;

/// Identifies one delivery: the event's sequence number and the delivery's index
/// among the deliveries planned for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeliveryKey {
    pub seq: Seq,
    pub idx: u32,
}

/// A delivery to plan together with its event.
#[derive(Debug, Clone)]
pub struct PlannedDelivery {
    pub route: String,
    pub plugin: String,
    /// The route's `order_key` value for this event, when the route has one
    /// and the event holds it: such deliveries run one at a time per key.
    pub order_key: Option<String>,
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    /// Not attempted yet (or redriven).
    Pending,
    /// Failed at least once and will be attempted again.
    Retrying,
    /// `handle` returned Ok; final.
    Delivered,
    /// Rejected, or out of attempts or age: a dead letter until redriven.
    #[serde(alias = "failed")]
    Dead,
}

impl DeliveryStatus {
    pub fn is_final(self) -> bool {
        matches!(self, DeliveryStatus::Delivered | DeliveryStatus::Dead)
    }
}

/// One attempt at a delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// When it started, Unix milliseconds.
    pub at_ms: u64,
    /// How long it ran, microseconds.
    pub duration_us: u64,
    /// Why it failed; `None` when it succeeded.
    pub error: Option<String>,
    /// The content hash (sha256) of the plugin that ran, when one ran.
    #[serde(default)]
    pub plugin_hash: Option<String>,
    /// The ids of the events it emitted (stored only when it succeeded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub emitted: Vec<String>,
}

/// Most bytes of a plugin's own text (a reject reason, a panic message, a
/// URL it fetched) kept in an attempt's error. A route allows up to 1,000
/// attempts, all kept in the delivery's record (JSON, where `"` and `\`
/// double) and its dead letter; under the NATS engine each is one message
/// of at most 1 MiB.
pub const MAX_PLUGIN_TEXT: usize = 256;

/// A plugin's text as an attempt keeps it: control characters (a terminal's
/// escape sequences) replaced, line breaks and tabs as spaces, and cut to
/// [`MAX_PLUGIN_TEXT`] bytes on a character, saying how long it was.
pub fn plugin_text(text: String) -> String {
    let clean = |c: char| match c {
        '\n' | '\r' | '\t' => ' ',
        c if c.is_control() => char::REPLACEMENT_CHARACTER,
        c => c,
    };
    let fits = text.len() <= MAX_PLUGIN_TEXT;
    if fits && !text.chars().any(char::is_control) {
        return text;
    }
    let mut kept = String::with_capacity(MAX_PLUGIN_TEXT.min(text.len()));
    for c in text.chars().map(clean) {
        if kept.len() + c.len_utf8() > MAX_PLUGIN_TEXT {
            return format!("{kept}… ({} bytes, cut)", text.len());
        }
        kept.push(c);
    }
    kept
}

/// The stored state of one delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryRecord {
    pub route: String,
    pub plugin: String,
    pub status: DeliveryStatus,
    pub attempts: Vec<Attempt>,
    /// When it is due next (Unix ms), while it is not final.
    pub due_ms: Option<u64>,
    /// When it was planned (Unix ms).
    #[serde(default)]
    pub created_ms: u64,
    /// See [`PlannedDelivery::order_key`].
    #[serde(default)]
    pub order_key: Option<String>,
    /// The replay that planned it, if one did.
    #[serde(default)]
    pub replay: Option<u64>,
    /// When it was redriven from the dead letters, oldest first.
    #[serde(default)]
    pub redriven_ms: Vec<u64>,
    /// Attempts made but no longer kept: the oldest, once a delivery
    /// redriven again and again has made more than [`MAX_KEPT_ATTEMPTS`].
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempts_not_kept: u64,
}

/// Most attempts a delivery's record keeps. A route allows at most as many
/// per redrive, so only attempts from before a redrive are ever dropped; the
/// bound keeps the record within one NATS message however often a delivery
/// is redriven.
pub const MAX_KEPT_ATTEMPTS: usize = 1000;

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl DeliveryRecord {
    /// Adds an attempt; past [`MAX_KEPT_ATTEMPTS`] the oldest are dropped
    /// and counted.
    pub fn add_attempt(&mut self, attempt: &Attempt) {
        self.attempts.push(attempt.clone());
        let over = self.attempts.len().saturating_sub(MAX_KEPT_ATTEMPTS);
        if over > 0 {
            self.attempts.drain(..over);
            self.attempts_not_kept += over as u64;
        }
    }

    /// Every attempt made, kept or not.
    pub fn attempts_made(&self) -> u64 {
        self.attempts_not_kept + self.attempts.len() as u64
    }

    /// Attempts that count against the retry policy: those since the last
    /// redrive (a redrive grants a fresh budget).
    pub fn budget_attempts(&self) -> u32 {
        let since = self.budget_since_ms();
        self.attempts.iter().filter(|a| a.at_ms >= since).count() as u32
    }

    /// When the current retry budget started: planned, or last redriven.
    pub fn budget_since_ms(&self) -> u64 {
        self.redriven_ms.last().copied().unwrap_or(self.created_ms)
    }
}

/// What became of an attempt, as the dispatcher reports it.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Acknowledged: apply the delivery's kv writes, mark delivered.
    Delivered,
    /// Try again at `due_ms`; the delivery's kv writes are dropped.
    Retry { due_ms: u64 },
    /// Give up: a dead letter; the delivery's kv writes are dropped.
    Dead,
}

/// The kv reads and writes one delivery made. Writes commit only with a
/// successful delivery, and only if every key it read still holds the value it
/// saw (optimistic concurrency: deliveries of one plugin run in parallel, yet
/// each one's read-modify-write is applied as if they ran one at a time).
#[derive(Debug, Clone, Default)]
pub struct KvChanges {
    /// Keys read from the store, with the value seen.
    pub reads: Vec<(String, Option<Vec<u8>>)>,
    /// Keys written, in order; the last write of a key wins.
    pub writes: Vec<KvWrite>,
}

/// One kv write of a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvWrite {
    pub key: String,
    /// `Some` sets, `None` deletes.
    pub value: Option<Vec<u8>>,
    /// When a set value expires (Unix ms); `None`: never.
    pub expires_ms: Option<u64>,
}

impl KvWrite {
    /// Sets `key` to `value`, without expiry.
    pub fn set(key: impl Into<String>, value: impl Into<Vec<u8>>) -> KvWrite {
        KvWrite {
            key: key.into(),
            value: Some(value.into()),
            expires_ms: None,
        }
    }

    /// Deletes `key`.
    pub fn delete(key: impl Into<String>) -> KvWrite {
        KvWrite {
            key: key.into(),
            value: None,
            expires_ms: None,
        }
    }
}

/// An event a delivery emitted, with the deliveries its routes planned: stored
/// only if the delivery succeeds, in the same commit.
#[derive(Debug, Clone)]
pub struct Emitted {
    pub event: Arc<Event>,
    pub deliveries: Vec<PlannedDelivery>,
}

/// An attempt's result, for the writer to commit.
#[derive(Debug, Clone)]
pub struct Settlement {
    pub key: DeliveryKey,
    pub plugin: String,
    pub attempt: Attempt,
    pub outcome: Outcome,
    pub kv: KvChanges,
    /// Events to store with a `Delivered` outcome (dropped otherwise).
    pub emitted: Vec<Emitted>,
}

impl Settlement {
    /// About the bytes its writes take when stored: the kv writes, the
    /// emitted events with their deliveries, and the attempt.
    pub fn approx_bytes(&self) -> usize {
        let kv: usize = self
            .kv
            .writes
            .iter()
            .map(|w| w.key.len() + w.value.as_ref().map_or(0, Vec::len) + 32)
            .sum();
        let emitted: usize = self
            .emitted
            .iter()
            .map(|e| {
                let ev = &e.event;
                let ext: usize = ev.extensions.iter().map(|(k, v)| k.len() + v.len()).sum();
                2 * ev.id.len()
                    + ev.source.len()
                    + ev.ty.len()
                    + ev.subject.as_ref().map_or(0, String::len)
                    + ev.data.len()
                    + ext
                    + e.deliveries
                        .iter()
                        .map(|d| {
                            2 * d.route.len()
                                + d.plugin.len()
                                + d.order_key.as_ref().map_or(0, String::len)
                                + 64
                        })
                        .sum::<usize>()
                    + 128
            })
            .sum();
        let attempt = self.attempt.error.as_ref().map_or(0, String::len)
            + self.attempt.emitted.iter().map(String::len).sum::<usize>()
            + 128;
        kv + emitted + attempt
    }
}

/// What committing a settlement did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Committed.
    Committed,
    /// A key the delivery read has changed since: nothing was written, run the
    /// delivery again.
    Conflict,
    /// The delivery was already final (or is unknown); nothing was written.
    Stale,
}

/// Ingest deduplication: an event whose key was seen within the window is
/// not stored again.
#[derive(Debug, Clone)]
pub struct DedupKey {
    /// The source's name.
    pub source: String,
    /// The idempotency key the request carried.
    pub key: String,
    pub window_ms: u64,
}

/// What an append did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    /// Stored under this sequence number.
    New(Seq),
    /// A repeat of the event stored under this id within the dedup window:
    /// nothing was written but the repeat count.
    Duplicate { id: String },
}

/// A delivery that is not final, to hand to the dispatcher.
#[derive(Debug, Clone)]
pub struct DueDelivery {
    pub key: DeliveryKey,
    pub due_ms: u64,
    pub record: DeliveryRecord,
}

/// How an event's dedup key was used, for its timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupInfo {
    pub key: String,
    /// Repeats answered with this event's id.
    pub duplicates: u64,
    /// When the last repeat arrived (Unix ms).
    pub last_duplicate_ms: Option<u64>,
}

/// An event and its deliveries, as the admin API shows them.
#[derive(Debug, Clone)]
pub struct EventTimeline {
    pub seq: Seq,
    pub event: Arc<Event>,
    pub accepted_ms: u64,
    pub dedup: Option<DedupInfo>,
    pub deliveries: Vec<(DeliveryKey, DeliveryRecord)>,
}

/// Which dead letters to redrive.
#[derive(Debug, Clone)]
pub enum RedriveSelect {
    /// These deliveries (those not dead are skipped).
    Keys(Vec<DeliveryKey>),
    /// Every dead letter of this route, or of every route.
    Route(Option<String>),
}

/// A dead letter: a delivery that gave up, with its event.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub key: DeliveryKey,
    pub event: Arc<Event>,
    pub record: DeliveryRecord,
}

/// A page of dead letters, oldest event first.
#[derive(Debug, Clone)]
pub struct DeadLetterPage {
    pub items: Vec<DeadLetter>,
    /// Pass as `after` for the next page; `None` on the last page.
    pub next: Option<DeliveryKey>,
}

/// What a replay asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplaySpec {
    /// Events accepted at or after this time (Unix ms)...
    pub since_ms: u64,
    /// ...and before this one, if set.
    pub until_ms: Option<u64>,
    /// Only to this route (else every route that matches now).
    pub route: Option<String>,
    /// Only events from this source.
    pub source: Option<String>,
}

/// A replay and the deliveries it planned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayJob {
    pub id: u64,
    pub spec: ReplaySpec,
    pub created_ms: u64,
    /// Events that matched at least one route.
    pub events: u64,
    pub deliveries: Vec<DeliveryKey>,
}

/// An archived event as a replay reads it.
#[derive(Debug, Clone)]
pub struct ArchivedEvent {
    pub seq: Seq,
    pub accepted_ms: u64,
    pub event: Arc<Event>,
}

/// What one compaction step deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Compacted {
    pub events: u64,
    pub deliveries: u64,
    /// Where the next step goes on: `(accepted ms, seq)` of the next event to
    /// look at, or `None` when everything before the cutoff was looked at.
    pub resume: Option<(u64, Seq)>,
}

/// Counts of what the store holds (for tests and the admin API).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct JournalStats {
    pub events: u64,
    pub deliveries: u64,
    pub due: u64,
    pub dead: u64,
    pub kv_entries: u64,
}

/// Plugin key-value state as plugins read it while they run. Writes are not
/// here: they commit with the delivery that made them (see [`Settlement`]).
pub trait KvStore: Send + Sync {
    /// A plugin's value under `key`, as last committed (absent once its TTL
    /// has run out).
    fn kv_get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, JournalError>;
    /// Up to `limit` of a plugin's keys that start with `prefix`, after
    /// `after` if given, in byte order; expired keys are left out.
    fn kv_list(
        &self,
        plugin: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, JournalError>;
    /// The bytes a plugin's kv entries take, for its quota.
    fn kv_usage(&self, plugin: &str) -> Result<u64, JournalError>;
}

/// Which events a listing keeps.
pub type EventFilter<'a> = dyn for<'e> Fn(&'e Event) -> bool + Send + Sync + 'a;

/// Accepted events as the HTTP side sees them: appending (with dedup), and
/// reading back timelines and dead letters.
#[async_trait::async_trait]
pub trait EventStore: KvStore {
    /// Durably stores an event with its planned deliveries; returns once they
    /// are committed. With a dedup key seen within its window, stores nothing
    /// and names the event first accepted under it.
    async fn append(
        &self,
        event: Arc<Event>,
        accepted_ms: u64,
        deliveries: Vec<PlannedDelivery>,
        dedup: Option<DedupKey>,
    ) -> Result<Appended, JournalError>;
    /// An event and its deliveries, by event id.
    async fn timeline(&self, id: &str) -> Result<Option<EventTimeline>, JournalError>;
    /// The newest events (newest first) accepted before `before` (exclusive)
    /// that `keep` accepts, at most `limit`, scanning at most `scan`.
    async fn recent(
        &self,
        before: Option<Seq>,
        limit: usize,
        scan: usize,
        keep: &EventFilter<'_>,
    ) -> Result<Vec<EventTimeline>, JournalError>;
    /// Dead letters after `after` (exclusive), oldest first, of one route or all.
    async fn dead_letters(
        &self,
        route: Option<&str>,
        after: Option<DeliveryKey>,
        limit: usize,
    ) -> Result<DeadLetterPage, JournalError>;
    /// One dead letter.
    async fn dead_letter(&self, key: DeliveryKey) -> Result<Option<DeadLetter>, JournalError>;
}

impl From<Journal> for Arc<dyn KvStore> {
    fn from(j: Journal) -> Arc<dyn KvStore> {
        Arc::new(j)
    }
}

impl From<nats::NatsJournal> for Arc<dyn KvStore> {
    fn from(j: nats::NatsJournal) -> Arc<dyn KvStore> {
        Arc::new(j)
    }
}

impl KvStore for Journal {
    fn kv_get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, JournalError> {
        Journal::kv_get(self, plugin, key)
    }
    fn kv_list(
        &self,
        plugin: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, JournalError> {
        Journal::kv_list(self, plugin, prefix, after, limit)
    }
    fn kv_usage(&self, plugin: &str) -> Result<u64, JournalError> {
        Journal::kv_usage(self, plugin)
    }
}

#[async_trait::async_trait]
impl EventStore for Journal {
    async fn append(
        &self,
        event: Arc<Event>,
        accepted_ms: u64,
        deliveries: Vec<PlannedDelivery>,
        dedup: Option<DedupKey>,
    ) -> Result<Appended, JournalError> {
        Journal::append(self, event, accepted_ms, deliveries, dedup).await
    }
    async fn timeline(&self, id: &str) -> Result<Option<EventTimeline>, JournalError> {
        Journal::timeline(self, id)
    }
    async fn recent(
        &self,
        before: Option<Seq>,
        limit: usize,
        scan: usize,
        keep: &EventFilter<'_>,
    ) -> Result<Vec<EventTimeline>, JournalError> {
        Journal::recent(self, before, limit, scan, |e| keep(e))
    }
    async fn dead_letters(
        &self,
        route: Option<&str>,
        after: Option<DeliveryKey>,
        limit: usize,
    ) -> Result<DeadLetterPage, JournalError> {
        Journal::dead_letters(self, route, after, limit)
    }
    async fn dead_letter(&self, key: DeliveryKey) -> Result<Option<DeadLetter>, JournalError> {
        Journal::dead_letter(self, key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plugins_text_is_kept_whole_up_to_its_limit_then_cut_on_a_char() {
        let short = "x".repeat(MAX_PLUGIN_TEXT);
        assert_eq!(plugin_text(short.clone()), short);
        // 'é' is two bytes; after the odd 'a' the limit falls inside one.
        let long = format!("a{}", "é".repeat(MAX_PLUGIN_TEXT));
        let cut = plugin_text(long.clone());
        let kept = cut.split('…').next().unwrap_or_default();
        assert_eq!(kept.len(), MAX_PLUGIN_TEXT - 1);
        assert!(long.starts_with(kept));
        assert!(
            cut.ends_with(&format!("… ({} bytes, cut)", long.len())),
            "{cut}"
        );
    }

    fn attempt(at_ms: u64) -> Attempt {
        Attempt {
            at_ms,
            duration_us: 1,
            error: Some("plugin asked to retry".into()),
            plugin_hash: None,
            emitted: Vec::new(),
        }
    }

    #[test]
    fn a_record_keeps_its_last_attempts_and_counts_the_rest() {
        let mut record = DeliveryRecord {
            route: "r".into(),
            plugin: "p".into(),
            status: DeliveryStatus::Retrying,
            attempts: Vec::new(),
            due_ms: None,
            created_ms: 0,
            order_key: None,
            replay: None,
            redriven_ms: Vec::new(),
            attempts_not_kept: 0,
        };
        for at in 0..MAX_KEPT_ATTEMPTS as u64 {
            record.add_attempt(&attempt(at));
        }
        assert_eq!(record.attempts.len(), MAX_KEPT_ATTEMPTS);
        assert_eq!(record.attempts_not_kept, 0);
        // Redriven: the new budget's attempts push out the oldest.
        record.redriven_ms.push(10_000);
        for at in 10_000..10_003 {
            record.add_attempt(&attempt(at));
        }
        assert_eq!(record.attempts.len(), MAX_KEPT_ATTEMPTS);
        assert_eq!(record.attempts_not_kept, 3);
        assert_eq!(record.attempts_made(), MAX_KEPT_ATTEMPTS as u64 + 3);
        assert_eq!(record.attempts[0].at_ms, 3);
        assert_eq!(record.budget_attempts(), 3);
        // Stored records without the field read as none dropped.
        let mut json = serde_json::to_value(&record).unwrap();
        json.as_object_mut().unwrap().remove("attempts_not_kept");
        let back: DeliveryRecord = serde_json::from_value(json).unwrap();
        assert_eq!(back.attempts_not_kept, 0);
    }

    #[test]
    fn a_plugins_text_loses_its_control_characters() {
        assert_eq!(
            plugin_text("red \u{1b}[31mtext\u{1b}[0m\nnext\tline\0".into()),
            "red \u{fffd}[31mtext\u{fffd}[0m next line\u{fffd}"
        );
        // Replacements that make it longer are cut too.
        let cut = plugin_text("\u{7}".repeat(MAX_PLUGIN_TEXT));
        assert!(cut.len() < MAX_PLUGIN_TEXT + 30, "{}", cut.len());
        assert!(cut.ends_with(&format!("… ({MAX_PLUGIN_TEXT} bytes, cut)")));
    }
}
