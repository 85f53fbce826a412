//! The durable journal: accepted events, their planned deliveries, and plugin
//! key-value state, all in one store so that they change together.
//!
//! Writes go through one writer that commits whatever is queued in a single
//! transaction (group commit): concurrent requests share an fsync instead of
//! paying one each. Reads go straight to the store.

mod embedded;

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
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    /// Not attempted yet.
    Pending,
    /// Failed at least once and will be attempted again.
    Retrying,
    /// `handle` returned Ok; final.
    Delivered,
    /// Rejected, trapped, or out of attempts; final.
    Failed,
}

impl DeliveryStatus {
    pub fn is_final(self) -> bool {
        matches!(self, DeliveryStatus::Delivered | DeliveryStatus::Failed)
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
}

/// What became of an attempt, as the dispatcher reports it.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Acknowledged: apply the delivery's kv writes, mark delivered.
    Delivered,
    /// Try again at `due_ms`; the delivery's kv writes are dropped.
    Retry { due_ms: u64 },
    /// Give up; the delivery's kv writes are dropped.
    Failed,
}

/// The kv reads and writes one delivery made. Writes commit only with a
/// successful delivery, and only if every key it read still holds the value it
/// saw (optimistic concurrency: deliveries of one plugin run in parallel, yet
/// each one's read-modify-write is applied as if they ran one at a time).
#[derive(Debug, Clone, Default)]
pub struct KvChanges {
    /// Keys read from the store, with the value seen.
    pub reads: Vec<(String, Option<Vec<u8>>)>,
    /// Keys written: `Some` sets, `None` deletes. In order; the last one wins.
    pub writes: Vec<(String, Option<Vec<u8>>)>,
}

/// An attempt's result, for the writer to commit.
#[derive(Debug, Clone)]
pub struct Settlement {
    pub key: DeliveryKey,
    pub plugin: String,
    pub attempt: Attempt,
    pub outcome: Outcome,
    pub kv: KvChanges,
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

/// A delivery that is not final, as found when the journal opens.
#[derive(Debug, Clone)]
pub struct DueDelivery {
    pub key: DeliveryKey,
    pub due_ms: u64,
    pub record: DeliveryRecord,
}

/// An event and its deliveries, as the admin API shows them.
#[derive(Debug, Clone)]
pub struct EventTimeline {
    pub seq: Seq,
    pub event: Arc<Event>,
    pub accepted_ms: u64,
    pub deliveries: Vec<(DeliveryKey, DeliveryRecord)>,
}

/// Counts of what the store holds (for tests and the admin API).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct JournalStats {
    pub events: u64,
    pub deliveries: u64,
    pub due: u64,
    pub kv_entries: u64,
}
