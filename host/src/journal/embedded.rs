//! The embedded journal on redb: one ACID file in the data directory.
//! `docs/adr/0001-embedded-store.md` says why redb.

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::Instant;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::{
    DeliveryKey, DeliveryRecord, DeliveryStatus, DueDelivery, EventTimeline, JournalError,
    JournalStats, Outcome, PlannedDelivery, Seq, Settled, Settlement,
};
use crate::event::Event;

/// seq → msgpack(StoredEvent)
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
/// event id → seq
const EVENT_IDS: TableDefinition<&str, u64> = TableDefinition::new("event_ids");
/// (seq, idx) → msgpack(DeliveryRecord)
const DELIVERIES: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("deliveries");
/// (due ms, seq, idx): the deliveries that are not final, in the order they are due.
const DUE: TableDefinition<(u64, u64, u32), ()> = TableDefinition::new("due");
/// (plugin, key) → value
const KV: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("kv");

/// How many operations may wait for the writer before new ones are refused.
const QUEUE_CAPACITY: usize = 16 * 1024;
/// The most operations one transaction takes, so one commit stays short.
const MAX_BATCH: usize = 2048;

#[derive(Serialize, Deserialize)]
struct StoredEvent {
    accepted_ms: u64,
    event: Event,
}

enum WriteOp {
    Append {
        event: Arc<Event>,
        accepted_ms: u64,
        deliveries: Vec<PlannedDelivery>,
        reply: oneshot::Sender<Result<Seq, JournalError>>,
    },
    Settle {
        settlement: Box<Settlement>,
        reply: oneshot::Sender<Result<Settled, JournalError>>,
    },
}

/// Handle to the embedded journal. Cheap to clone.
#[derive(Clone)]
pub struct Journal {
    db: Arc<Database>,
    writer: SyncSender<WriteOp>,
}

impl Journal {
    /// Opens (or creates) the journal in `dir`, and starts its writer thread.
    pub fn open(dir: &Path) -> Result<Journal, JournalError> {
        std::fs::create_dir_all(dir).map_err(|e| JournalError::Open {
            path: dir.display().to_string(),
            source: Box::new(e),
        })?;
        let path = dir.join("journal.redb");
        let db = Database::create(&path).map_err(|e| JournalError::Open {
            path: path.display().to_string(),
            source: Box::new(e),
        })?;
        // Create every table up front so readers never see a missing one.
        let txn = db.begin_write()?;
        let next_seq = {
            let events = txn.open_table(EVENTS)?;
            txn.open_table(EVENT_IDS)?;
            txn.open_table(DELIVERIES)?;
            txn.open_table(DUE)?;
            txn.open_table(KV)?;
            let last = events.last()?.map(|(k, _)| k.value());
            last.map_or(1, |s| s + 1)
        };
        txn.commit()?;

        let db = Arc::new(db);
        let (writer, queue) = std::sync::mpsc::sync_channel(QUEUE_CAPACITY);
        let writer_db = db.clone();
        std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || {
                Writer {
                    db: writer_db,
                    next_seq,
                }
                .run(queue)
            })
            .map_err(|e| JournalError::Open {
                path: path.display().to_string(),
                source: Box::new(e),
            })?;
        Ok(Journal { db, writer })
    }

    /// Durably stores an event with its planned deliveries; returns once they
    /// are committed.
    pub async fn append(
        &self,
        event: Arc<Event>,
        accepted_ms: u64,
        deliveries: Vec<PlannedDelivery>,
    ) -> Result<Seq, JournalError> {
        let (reply, rx) = oneshot::channel();
        self.submit(WriteOp::Append {
            event,
            accepted_ms,
            deliveries,
            reply,
        })?;
        rx.await.map_err(|_| JournalError::Closed)?
    }

    /// Durably records an attempt's result (and, on success, its kv writes).
    pub async fn settle(&self, settlement: Settlement) -> Result<Settled, JournalError> {
        let (reply, rx) = oneshot::channel();
        self.submit(WriteOp::Settle {
            settlement: Box::new(settlement),
            reply,
        })?;
        rx.await.map_err(|_| JournalError::Closed)?
    }

    fn submit(&self, op: WriteOp) -> Result<(), JournalError> {
        self.writer.try_send(op).map_err(|e| match e {
            TrySendError::Full(_) => JournalError::Saturated,
            TrySendError::Disconnected(_) => JournalError::Closed,
        })
    }

    /// Every delivery that is not final, in the order it is due.
    pub fn due_deliveries(&self) -> Result<Vec<DueDelivery>, JournalError> {
        let txn = self.db.begin_read()?;
        let due = txn.open_table(DUE)?;
        let deliveries = txn.open_table(DELIVERIES)?;
        let mut out = Vec::new();
        for entry in due.iter()? {
            let (k, _) = entry?;
            let (due_ms, seq, idx) = k.value();
            if let Some(v) = deliveries.get((seq, idx))? {
                out.push(DueDelivery {
                    key: DeliveryKey { seq, idx },
                    due_ms,
                    record: decode(v.value())?,
                });
            }
        }
        Ok(out)
    }

    /// The event stored at `seq`.
    pub fn event(&self, seq: Seq) -> Result<Option<Arc<Event>>, JournalError> {
        let txn = self.db.begin_read()?;
        let events = txn.open_table(EVENTS)?;
        match events.get(seq)? {
            Some(v) => Ok(Some(Arc::new(decode::<StoredEvent>(v.value())?.event))),
            None => Ok(None),
        }
    }

    /// The event with this id and all its deliveries.
    pub fn timeline(&self, id: &str) -> Result<Option<EventTimeline>, JournalError> {
        let txn = self.db.begin_read()?;
        let ids = txn.open_table(EVENT_IDS)?;
        let Some(seq) = ids.get(id)?.map(|v| v.value()) else {
            return Ok(None);
        };
        let events = txn.open_table(EVENTS)?;
        let Some(stored) = events.get(seq)? else {
            return Ok(None);
        };
        let stored: StoredEvent = decode(stored.value())?;
        let table = txn.open_table(DELIVERIES)?;
        let mut deliveries = Vec::new();
        for entry in table.range((seq, 0)..=(seq, u32::MAX))? {
            let (k, v) = entry?;
            let (seq, idx) = k.value();
            deliveries.push((DeliveryKey { seq, idx }, decode(v.value())?));
        }
        Ok(Some(EventTimeline {
            seq,
            event: Arc::new(stored.event),
            accepted_ms: stored.accepted_ms,
            deliveries,
        }))
    }

    /// A plugin's value under `key`, as last committed.
    pub fn kv_get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, JournalError> {
        let txn = self.db.begin_read()?;
        let kv = txn.open_table(KV)?;
        Ok(kv.get((plugin, key))?.map(|v| v.value().to_vec()))
    }

    /// How much the store holds.
    pub fn stats(&self) -> Result<JournalStats, JournalError> {
        let txn = self.db.begin_read()?;
        Ok(JournalStats {
            events: txn.open_table(EVENTS)?.len()?,
            deliveries: txn.open_table(DELIVERIES)?.len()?,
            due: txn.open_table(DUE)?.len()?,
            kv_entries: txn.open_table(KV)?.len()?,
        })
    }
}

/// The single writer: drains the queue, applies everything in one transaction,
/// commits once, then answers every caller.
struct Writer {
    db: Arc<Database>,
    next_seq: Seq,
}

enum Reply {
    Append(
        oneshot::Sender<Result<Seq, JournalError>>,
        Result<Seq, JournalError>,
    ),
    Settle(
        oneshot::Sender<Result<Settled, JournalError>>,
        Result<Settled, JournalError>,
    ),
}

impl Writer {
    fn run(mut self, queue: Receiver<WriteOp>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while let Ok(first) = queue.recv() {
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            let started = Instant::now();
            let size = batch.len();
            self.commit_batch(&mut batch);
            tracing::trace!(size, elapsed = ?started.elapsed(), "journal batch committed");
        }
        tracing::debug!("journal writer stopped");
    }

    fn commit_batch(&mut self, batch: &mut Vec<WriteOp>) {
        let seq_before = self.next_seq;
        let mut replies = Vec::with_capacity(batch.len());
        let result = self.apply(batch.drain(..), &mut replies);
        match result {
            Ok(()) => {
                for reply in replies {
                    match reply {
                        Reply::Append(tx, r) => drop(tx.send(r)),
                        Reply::Settle(tx, r) => drop(tx.send(r)),
                    }
                }
            }
            Err(e) => {
                // Nothing of this batch is durable: tell every caller, and give
                // back the sequence numbers.
                tracing::error!(error = %e, "journal commit failed");
                self.next_seq = seq_before;
                let text = e.to_string();
                for reply in replies {
                    let err = || JournalError::CommitFailed(text.clone());
                    match reply {
                        Reply::Append(tx, _) => drop(tx.send(Err(err()))),
                        Reply::Settle(tx, _) => drop(tx.send(Err(err()))),
                    }
                }
            }
        }
    }

    fn apply(
        &mut self,
        ops: impl Iterator<Item = WriteOp>,
        replies: &mut Vec<Reply>,
    ) -> Result<(), JournalError> {
        let txn = self.db.begin_write()?;
        {
            let mut events = txn.open_table(EVENTS)?;
            let mut ids = txn.open_table(EVENT_IDS)?;
            let mut deliveries = txn.open_table(DELIVERIES)?;
            let mut due = txn.open_table(DUE)?;
            let mut kv = txn.open_table(KV)?;
            let mut tables = Tables {
                events: &mut events,
                ids: &mut ids,
                deliveries: &mut deliveries,
                due: &mut due,
                kv: &mut kv,
            };
            for op in ops {
                match op {
                    WriteOp::Append {
                        event,
                        accepted_ms,
                        deliveries,
                        reply,
                    } => {
                        let r = self.append(&mut tables, &event, accepted_ms, deliveries);
                        // A store error poisons the whole transaction; an
                        // encoding error concerns only this op.
                        if let Err(JournalError::Store(_)) = r {
                            return r.map(|_| ());
                        }
                        replies.push(Reply::Append(reply, r));
                    }
                    WriteOp::Settle { settlement, reply } => {
                        let r = settle(&mut tables, &settlement);
                        if let Err(JournalError::Store(_)) = r {
                            return r.map(|_| ());
                        }
                        replies.push(Reply::Settle(reply, r));
                    }
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    fn append(
        &mut self,
        t: &mut Tables<'_, '_>,
        event: &Event,
        accepted_ms: u64,
        planned: Vec<PlannedDelivery>,
    ) -> Result<Seq, JournalError> {
        let stored = encode(&StoredEvent {
            accepted_ms,
            event: event.clone(),
        })?;
        let mut records = Vec::with_capacity(planned.len());
        for p in planned {
            records.push(encode(&DeliveryRecord {
                route: p.route,
                plugin: p.plugin,
                status: DeliveryStatus::Pending,
                attempts: Vec::new(),
                due_ms: Some(accepted_ms),
            })?);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        t.events.insert(seq, stored.as_slice())?;
        t.ids.insert(event.id.as_str(), seq)?;
        for (idx, record) in records.iter().enumerate() {
            let idx = idx as u32;
            t.deliveries.insert((seq, idx), record.as_slice())?;
            t.due.insert((accepted_ms, seq, idx), ())?;
        }
        Ok(seq)
    }
}

struct Tables<'a, 'txn> {
    events: &'a mut redb::Table<'txn, u64, &'static [u8]>,
    ids: &'a mut redb::Table<'txn, &'static str, u64>,
    deliveries: &'a mut redb::Table<'txn, (u64, u32), &'static [u8]>,
    due: &'a mut redb::Table<'txn, (u64, u64, u32), ()>,
    kv: &'a mut redb::Table<'txn, (&'static str, &'static str), &'static [u8]>,
}

fn settle(t: &mut Tables<'_, '_>, s: &Settlement) -> Result<Settled, JournalError> {
    let key = (s.key.seq, s.key.idx);
    let Some(mut record) = t
        .deliveries
        .get(key)?
        .map(|v| decode::<DeliveryRecord>(v.value()))
        .transpose()?
    else {
        return Ok(Settled::Stale);
    };
    if record.status.is_final() {
        return Ok(Settled::Stale);
    }
    if let Outcome::Delivered = s.outcome {
        for (k, seen) in &s.kv.reads {
            let now = t.kv.get((s.plugin.as_str(), k.as_str()))?;
            if now.as_ref().map(|v| v.value()) != seen.as_deref() {
                return Ok(Settled::Conflict);
            }
        }
        for (k, v) in &s.kv.writes {
            match v {
                Some(v) => {
                    t.kv.insert((s.plugin.as_str(), k.as_str()), v.as_slice())?;
                }
                None => {
                    t.kv.remove((s.plugin.as_str(), k.as_str()))?;
                }
            }
        }
    }
    if let Some(old_due) = record.due_ms {
        t.due.remove((old_due, s.key.seq, s.key.idx))?;
    }
    record.attempts.push(s.attempt.clone());
    match s.outcome {
        Outcome::Delivered => {
            record.status = DeliveryStatus::Delivered;
            record.due_ms = None;
        }
        Outcome::Failed => {
            record.status = DeliveryStatus::Failed;
            record.due_ms = None;
        }
        Outcome::Retry { due_ms } => {
            record.status = DeliveryStatus::Retrying;
            record.due_ms = Some(due_ms);
            t.due.insert((due_ms, s.key.seq, s.key.idx), ())?;
        }
    }
    t.deliveries.insert(key, encode(&record)?.as_slice())?;
    Ok(Settled::Committed)
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, JournalError> {
    rmp_serde::to_vec_named(value).map_err(|e| JournalError::Encoding(e.to_string()))
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, JournalError> {
    rmp_serde::from_slice(bytes).map_err(|e| JournalError::Encoding(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{Attempt, KvChanges};
    use std::collections::BTreeMap;

    fn event(id: &str) -> Arc<Event> {
        Arc::new(Event {
            id: id.into(),
            source: "s".into(),
            ty: "t".into(),
            subject: None,
            time: "1970-01-01T00:00:00Z".into(),
            datacontenttype: "application/json".into(),
            data: b"{}".to_vec(),
            extensions: BTreeMap::new(),
        })
    }

    fn planned(n: usize) -> Vec<PlannedDelivery> {
        (0..n)
            .map(|i| PlannedDelivery {
                route: format!("r{i}"),
                plugin: "p".into(),
            })
            .collect()
    }

    fn settlement(seq: Seq, outcome: Outcome, kv: KvChanges) -> Settlement {
        Settlement {
            key: DeliveryKey { seq, idx: 0 },
            plugin: "p".into(),
            attempt: Attempt {
                at_ms: 1,
                duration_us: 2,
                error: None,
            },
            outcome,
            kv,
        }
    }

    #[tokio::test]
    async fn append_is_durable_and_reopens_with_due_deliveries() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = Journal::open(dir.path()).unwrap();
            let s1 = j.append(event("a"), 10, planned(2)).await.unwrap();
            let s2 = j.append(event("b"), 11, planned(1)).await.unwrap();
            assert_eq!((s1, s2), (1, 2));
        }
        // The writer thread of the first handle exits once its sender drops;
        // wait until the file lock is free.
        let j = loop {
            match Journal::open(dir.path()) {
                Ok(j) => break j,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        };
        let due = j.due_deliveries().unwrap();
        assert_eq!(due.len(), 3);
        assert_eq!(due[0].key, DeliveryKey { seq: 1, idx: 0 });
        assert_eq!(due[2].due_ms, 11);
        assert_eq!(j.append(event("c"), 12, vec![]).await.unwrap(), 3);
        let t = j.timeline("a").unwrap().unwrap();
        assert_eq!(t.deliveries.len(), 2);
        assert_eq!(t.deliveries[1].1.route, "r1");
    }

    #[tokio::test]
    async fn settle_applies_kv_only_on_success_and_detects_conflicts() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let seq = j.append(event("a"), 1, planned(1)).await.unwrap();
        let write = |v: &str| KvChanges {
            reads: vec![("k".into(), None)],
            writes: vec![("k".into(), Some(v.as_bytes().to_vec()))],
        };
        // A retry drops writes and reschedules.
        let r = j
            .settle(settlement(seq, Outcome::Retry { due_ms: 50 }, write("x")))
            .await
            .unwrap();
        assert_eq!(r, Settled::Committed);
        assert_eq!(j.kv_get("p", "k").unwrap(), None);
        assert_eq!(j.due_deliveries().unwrap()[0].due_ms, 50);
        // Success applies them.
        let r = j
            .settle(settlement(seq, Outcome::Delivered, write("y")))
            .await
            .unwrap();
        assert_eq!(r, Settled::Committed);
        assert_eq!(j.kv_get("p", "k").unwrap(), Some(b"y".to_vec()));
        assert!(j.due_deliveries().unwrap().is_empty());
        // A final delivery is not settled twice.
        let r = j
            .settle(settlement(seq, Outcome::Delivered, write("z")))
            .await
            .unwrap();
        assert_eq!(r, Settled::Stale);
        // A delivery that read "k" as absent conflicts now that it is "y".
        let seq2 = j.append(event("b"), 2, planned(1)).await.unwrap();
        let r = j
            .settle(settlement(seq2, Outcome::Delivered, write("w")))
            .await
            .unwrap();
        assert_eq!(r, Settled::Conflict);
        assert_eq!(j.kv_get("p", "k").unwrap(), Some(b"y".to_vec()));
        let t = j.timeline("a").unwrap().unwrap();
        assert_eq!(t.deliveries[0].1.status, DeliveryStatus::Delivered);
        assert_eq!(t.deliveries[0].1.attempts.len(), 2);
    }

    #[tokio::test]
    async fn concurrent_appends_share_commits() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let mut tasks = Vec::new();
        for i in 0..200 {
            let j = j.clone();
            tasks.push(tokio::spawn(async move {
                j.append(event(&format!("e{i}")), 1, planned(1)).await
            }));
        }
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.push(t.await.unwrap().unwrap());
        }
        seqs.sort();
        assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
        assert_eq!(j.stats().unwrap().events, 200);
    }
}
