//! The embedded journal on fjall: an LSM tree with one write-ahead journal, in
//! `<data dir>/journal/`. `docs/adr/0001-embedded-store.md` says why fjall.
//!
//! Durability: the writer commits each batch as one `SingleWriterTxDatabase`
//! transaction with `PersistMode::SyncAll`, so the whole batch is in the
//! fsynced journal before any caller hears back. Readers see a commit only
//! after that (fjall publishes the batch's sequence number last). After a crash,
//! opening replays the journal: a batch is recovered whole or not at all.

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::Instant;

use fjall::{
    KeyspaceCreateOptions, PersistMode, Readable, SingleWriterTxDatabase, SingleWriterTxKeyspace,
    SingleWriterWriteTx as WriteTransaction,
};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::{
    DeliveryKey, DeliveryRecord, DeliveryStatus, DueDelivery, EventTimeline, JournalError,
    JournalStats, Outcome, PlannedDelivery, Seq, Settled, Settlement,
};
use crate::event::Event;

// Keyspaces. Tuple keys are fixed-width big-endian concatenations, so that byte
// order (fjall's order) is tuple order.
//
// events:     seq (8 B)                        → msgpack(StoredEvent)
// event_ids:  event id (UTF-8)                 → seq (8 B)
// deliveries: seq (8 B) ‖ idx (4 B)            → msgpack(DeliveryRecord)
// due:        due ms (8 B) ‖ seq (8 B) ‖ idx (4 B) → empty: the deliveries that
//             are not final, in the order they are due
// kv:         plugin ‖ 0x00 ‖ key              → value. Plugin names are
//             `[A-Za-z0-9._-]` (config checks it), so they never hold 0x00 and
//             the order is (plugin, key) order; the key may hold any byte.
const EVENTS: &str = "events";
const EVENT_IDS: &str = "event_ids";
const DELIVERIES: &str = "deliveries";
const DUE: &str = "due";
const KV: &str = "kv";

/// fjall keys are 1 to 65535 bytes long; longer or empty ones would panic.
const MAX_KEY_LEN: usize = u16::MAX as usize;

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

impl WriteOp {
    /// The reply slot of an op that a failed batch did not get to (the caller
    /// is told the batch's error, not this placeholder).
    fn unapplied(self) -> Reply {
        match self {
            WriteOp::Append { reply, .. } => Reply::Append(reply, Err(JournalError::Closed)),
            WriteOp::Settle { reply, .. } => Reply::Settle(reply, Err(JournalError::Closed)),
        }
    }
}

/// The open store: the database and its keyspaces.
struct Store {
    db: SingleWriterTxDatabase,
    events: SingleWriterTxKeyspace,
    ids: SingleWriterTxKeyspace,
    deliveries: SingleWriterTxKeyspace,
    due: SingleWriterTxKeyspace,
    kv: SingleWriterTxKeyspace,
    /// Transactions the writer has committed (each one fsync), for tests and
    /// metrics: with concurrent requests it stays well below the op count.
    commits: std::sync::atomic::AtomicU64,
}

impl Store {
    /// Opens (or creates) the store at `path`, replaying its journal, and
    /// returns it with the next sequence number.
    fn open(path: &Path) -> Result<(Store, Seq), JournalError> {
        let open_err = |e: fjall::Error| JournalError::Open {
            path: path.display().to_string(),
            source: Box::new(e),
        };
        // Defaults: 512 MiB of journal, 64 MiB memtable per keyspace, min(cores, 4)
        // compaction threads, 32 MiB block cache.
        let db = SingleWriterTxDatabase::builder(path)
            .open()
            .map_err(open_err)?;
        let keyspace = |name| {
            db.keyspace(name, KeyspaceCreateOptions::default)
                .map_err(open_err)
        };
        let store = Store {
            events: keyspace(EVENTS)?,
            ids: keyspace(EVENT_IDS)?,
            deliveries: keyspace(DELIVERIES)?,
            due: keyspace(DUE)?,
            kv: keyspace(KV)?,
            db: db.clone(),
            commits: Default::default(),
        };
        let last = match store.db.read_tx().last_key_value(&store.events) {
            Some(guard) => Some(seq_from(&guard.key()?)?),
            None => None,
        };
        Ok((store, last.map_or(1, |s| s + 1)))
    }
}

/// Handle to the embedded journal. Cheap to clone.
#[derive(Clone)]
pub struct Journal {
    store: Arc<Store>,
    writer: SyncSender<WriteOp>,
}

impl Journal {
    /// Opens (or creates) the journal in `dir`, and starts its writer thread.
    pub fn open(dir: &Path) -> Result<Journal, JournalError> {
        std::fs::create_dir_all(dir).map_err(|e| JournalError::Open {
            path: dir.display().to_string(),
            source: Box::new(e),
        })?;
        if dir.join("journal.redb").exists() {
            tracing::warn!(
                dir = %dir.display(),
                "journal.redb (the redb journal of earlier versions) is ignored; \
                 the journal now lives in journal/"
            );
        }
        let path = dir.join("journal");
        let (store, next_seq) = Store::open(&path)?;
        let store = Arc::new(store);
        let (writer, queue) = std::sync::mpsc::sync_channel(QUEUE_CAPACITY);
        let writer_store = store.clone();
        std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || {
                Writer {
                    store: writer_store,
                    next_seq,
                }
                .run(queue)
            })
            .map_err(|e| JournalError::Open {
                path: path.display().to_string(),
                source: Box::new(e),
            })?;
        Ok(Journal { store, writer })
    }

    /// How many transactions the writer has committed since the journal opened.
    pub fn commits(&self) -> u64 {
        self.store
            .commits
            .load(std::sync::atomic::Ordering::Relaxed)
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
        let s = &*self.store;
        let snap = s.db.read_tx();
        let mut out = Vec::new();
        for entry in snap.iter(&s.due) {
            let (due_ms, seq, idx) = due_from(&entry.key()?)?;
            if let Some(v) = snap.get(&s.deliveries, delivery_key(seq, idx))? {
                out.push(DueDelivery {
                    key: DeliveryKey { seq, idx },
                    due_ms,
                    record: decode(&v)?,
                });
            }
        }
        Ok(out)
    }

    /// The event stored at `seq`.
    pub fn event(&self, seq: Seq) -> Result<Option<Arc<Event>>, JournalError> {
        match self.store.events.get(seq.to_be_bytes())? {
            Some(v) => Ok(Some(Arc::new(decode::<StoredEvent>(&v)?.event))),
            None => Ok(None),
        }
    }

    /// The event with this id and all its deliveries.
    pub fn timeline(&self, id: &str) -> Result<Option<EventTimeline>, JournalError> {
        if check_key(id.as_bytes()).is_err() {
            return Ok(None); // could not have been stored
        }
        let s = &*self.store;
        let snap = s.db.read_tx();
        let Some(seq) = snap.get(&s.ids, id)? else {
            return Ok(None);
        };
        let seq = seq_from(&seq)?;
        let Some(stored) = snap.get(&s.events, seq.to_be_bytes())? else {
            return Ok(None);
        };
        let stored: StoredEvent = decode(&stored)?;
        let mut deliveries = Vec::new();
        for entry in snap.prefix(&s.deliveries, seq.to_be_bytes()) {
            let (k, v) = entry.into_inner()?;
            let (seq, idx) = delivery_from(&k)?;
            deliveries.push((DeliveryKey { seq, idx }, decode(&v)?));
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
        let Ok(k) = kv_key(plugin, key) else {
            return Ok(None); // could not have been stored
        };
        Ok(self.store.kv.get(k)?.map(|v| v.to_vec()))
    }

    /// How much the store holds, from one snapshot. fjall counts by scanning
    /// (O(n)): fine for tests and the admin API, not for a hot path.
    pub fn stats(&self) -> Result<JournalStats, JournalError> {
        let s = &*self.store;
        let snap = s.db.read_tx();
        Ok(JournalStats {
            events: snap.len(&s.events)? as u64,
            deliveries: snap.len(&s.deliveries)? as u64,
            due: snap.len(&s.due)? as u64,
            kv_entries: snap.len(&s.kv)? as u64,
        })
    }
}

/// The single writer: drains the queue, applies everything in one transaction,
/// commits once, then answers every caller.
struct Writer {
    store: Arc<Store>,
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
        let mut ops = batch.drain(..);
        let result = self.apply(&mut ops, &mut replies);
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
                // Nothing of this batch became visible. Either it failed before
                // reaching fjall's journal, or writing/fsyncing the journal
                // failed, which poisons the database so that it takes no more
                // writes (the batch may or may not be replayed after a restart,
                // which recomputes the next seq). Tell every caller, including
                // those of ops not applied yet, and give back the sequence numbers.
                tracing::error!(error = %e, "journal commit failed");
                self.next_seq = seq_before;
                let text = e.to_string();
                for reply in replies.into_iter().chain(ops.map(WriteOp::unapplied)) {
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
        ops: &mut impl Iterator<Item = WriteOp>,
        replies: &mut Vec<Reply>,
    ) -> Result<(), JournalError> {
        let s = &*self.store;
        // Reads inside the transaction see its own earlier writes, so each op
        // sees the ops before it in the batch.
        let mut tx = s.db.write_tx().durability(Some(PersistMode::SyncAll));
        for op in ops {
            match op {
                WriteOp::Append {
                    event,
                    accepted_ms,
                    deliveries,
                    reply,
                } => {
                    // Appends only write, and cannot fail once encoded.
                    let r = append(&mut tx, s, self.next_seq, &event, accepted_ms, deliveries);
                    if r.is_ok() {
                        self.next_seq += 1;
                    }
                    replies.push(Reply::Append(reply, r));
                }
                WriteOp::Settle { settlement, reply } => {
                    let r = settle(&mut tx, s, &settlement);
                    // A store error fails the whole batch (the transaction is
                    // dropped, i.e. rolled back); an encoding error concerns
                    // only this op, which wrote nothing.
                    if let Err(JournalError::Store(e)) = r {
                        replies.push(Reply::Settle(reply, Err(JournalError::Closed)));
                        return Err(JournalError::Store(e));
                    }
                    replies.push(Reply::Settle(reply, r));
                }
            }
        }
        #[cfg(test)]
        if tests::FAIL_COMMIT.get() {
            return Err(fjall::Error::Io(std::io::Error::other("injected")).into());
        }
        // No-op (and no fsync) when the batch wrote nothing, e.g. only stale
        // settlements.
        tx.commit()?;
        self.store
            .commits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

/// Stages an event and its deliveries under `seq`. Everything is encoded and
/// checked before the first write, so an error leaves the transaction as it was.
fn append(
    tx: &mut WriteTransaction<'_>,
    s: &Store,
    seq: Seq,
    event: &Event,
    accepted_ms: u64,
    planned: Vec<PlannedDelivery>,
) -> Result<Seq, JournalError> {
    check_key(event.id.as_bytes())?;
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
    tx.insert(&s.events, seq.to_be_bytes(), stored);
    tx.insert(&s.ids, event.id.as_str(), seq.to_be_bytes());
    for (idx, record) in records.into_iter().enumerate() {
        let idx = idx as u32;
        tx.insert(&s.deliveries, delivery_key(seq, idx), record);
        tx.insert(&s.due, due_key(accepted_ms, seq, idx), b"");
    }
    Ok(seq)
}

/// Stages a settlement. Reads (and the kv check) go through `tx`, so they see
/// earlier ops of the same batch. All checks and encoding come before the first
/// write, so `Stale`, `Conflict` or an error leave the transaction as it was.
fn settle(
    tx: &mut WriteTransaction<'_>,
    s: &Store,
    st: &Settlement,
) -> Result<Settled, JournalError> {
    let key = delivery_key(st.key.seq, st.key.idx);
    let Some(mut record) = tx
        .get(&s.deliveries, key)?
        .map(|v| decode::<DeliveryRecord>(&v[..]))
        .transpose()?
    else {
        return Ok(Settled::Stale);
    };
    if record.status.is_final() {
        return Ok(Settled::Stale);
    }
    let mut kv_writes = Vec::new();
    if let Outcome::Delivered = st.outcome {
        for (k, seen) in &st.kv.reads {
            let now = match kv_key(&st.plugin, k) {
                Ok(k) => tx.get(&s.kv, k)?,
                Err(_) => None, // could not have been stored
            };
            if now.as_deref() != seen.as_deref() {
                return Ok(Settled::Conflict);
            }
        }
        for (k, v) in &st.kv.writes {
            kv_writes.push((kv_key(&st.plugin, k)?, v));
        }
    }
    let old_due = record.due_ms;
    record.attempts.push(st.attempt.clone());
    let new_due = match st.outcome {
        Outcome::Delivered => {
            record.status = DeliveryStatus::Delivered;
            None
        }
        Outcome::Failed => {
            record.status = DeliveryStatus::Failed;
            None
        }
        Outcome::Retry { due_ms } => {
            record.status = DeliveryStatus::Retrying;
            Some(due_ms)
        }
    };
    record.due_ms = new_due;
    let record = encode(&record)?;

    // In order: the last write of a key wins.
    for (k, v) in kv_writes {
        match v {
            Some(v) => tx.insert(&s.kv, k, v.as_slice()),
            None => tx.remove(&s.kv, k),
        }
    }
    if let Some(old_due) = old_due {
        tx.remove(&s.due, due_key(old_due, st.key.seq, st.key.idx));
    }
    if let Some(due_ms) = new_due {
        tx.insert(&s.due, due_key(due_ms, st.key.seq, st.key.idx), b"");
    }
    tx.insert(&s.deliveries, key, record);
    Ok(Settled::Committed)
}

fn delivery_key(seq: Seq, idx: u32) -> [u8; 12] {
    let mut k = [0; 12];
    k[..8].copy_from_slice(&seq.to_be_bytes());
    k[8..].copy_from_slice(&idx.to_be_bytes());
    k
}

fn due_key(due_ms: u64, seq: Seq, idx: u32) -> [u8; 20] {
    let mut k = [0; 20];
    k[..8].copy_from_slice(&due_ms.to_be_bytes());
    k[8..].copy_from_slice(&delivery_key(seq, idx));
    k
}

/// `plugin ‖ 0x00 ‖ key`; see the keyspace table at the top.
fn kv_key(plugin: &str, key: &str) -> Result<Vec<u8>, JournalError> {
    if plugin.is_empty() || plugin.contains('\0') {
        return Err(JournalError::Encoding(format!(
            "plugin name {plugin:?} cannot be a kv key prefix"
        )));
    }
    let mut k = Vec::with_capacity(plugin.len() + 1 + key.len());
    k.extend_from_slice(plugin.as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    check_key(&k)?;
    Ok(k)
}

fn check_key(key: &[u8]) -> Result<(), JournalError> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(JournalError::Encoding(format!(
            "a key of {} bytes cannot be stored (1 to {MAX_KEY_LEN})",
            key.len()
        )));
    }
    Ok(())
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().expect("8 bytes"))
}

fn bad_key(b: &[u8]) -> JournalError {
    JournalError::Encoding(format!("malformed key of {} bytes", b.len()))
}

fn seq_from(b: &[u8]) -> Result<Seq, JournalError> {
    (b.len() == 8).then(|| be_u64(b)).ok_or_else(|| bad_key(b))
}

fn delivery_from(b: &[u8]) -> Result<(Seq, u32), JournalError> {
    if b.len() != 12 {
        return Err(bad_key(b));
    }
    let idx = u32::from_be_bytes(b[8..].try_into().expect("4 bytes"));
    Ok((be_u64(&b[..8]), idx))
}

fn due_from(b: &[u8]) -> Result<(u64, Seq, u32), JournalError> {
    if b.len() != 20 {
        return Err(bad_key(b));
    }
    let (seq, idx) = delivery_from(&b[8..])?;
    Ok((be_u64(&b[..8]), seq, idx))
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
    use std::cell::Cell;
    use std::collections::BTreeMap;

    thread_local! {
        /// Makes the next commits on this thread fail, as a failed fsync would.
        pub(super) static FAIL_COMMIT: Cell<bool> = const { Cell::new(false) };
    }

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
        // On this current-thread runtime all 200 appends are queued before any
        // caller waits, while each commit takes an fsync: they must share
        // commits. One commit per append would be 200.
        let commits = j.commits();
        assert!(
            (1..=20).contains(&commits),
            "200 concurrent appends took {commits} commits"
        );
    }

    /// A store and a writer driven by the test itself (no thread).
    fn bare_writer(dir: &std::path::Path) -> (Arc<Store>, Writer) {
        let (store, next_seq) = Store::open(&dir.join("journal")).unwrap();
        let store = Arc::new(store);
        let writer = Writer {
            store: store.clone(),
            next_seq,
        };
        (store, writer)
    }

    /// Ops of one batch see each other: a settlement sees the delivery
    /// appended before it, and the kv writes of the settlement before it.
    #[test]
    fn ops_in_one_batch_see_earlier_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (store, mut writer) = bare_writer(dir.path());
        let write = |v: &str| KvChanges {
            reads: vec![("k".into(), None)],
            writes: vec![("k".into(), Some(v.as_bytes().to_vec()))],
        };
        let mut batch = Vec::new();
        let mut appends = Vec::new();
        let mut settles = Vec::new();
        for (id, n) in [("a", 1), ("", 1), ("b", 1)] {
            let (reply, rx) = oneshot::channel();
            batch.push(WriteOp::Append {
                event: event(id),
                accepted_ms: 5,
                deliveries: planned(n),
                reply,
            });
            appends.push(rx);
        }
        for s in [
            settlement(1, Outcome::Delivered, write("x")),
            settlement(2, Outcome::Delivered, write("y")),
            settlement(1, Outcome::Failed, KvChanges::default()),
            settlement(9, Outcome::Failed, KvChanges::default()),
        ] {
            let (reply, rx) = oneshot::channel();
            batch.push(WriteOp::Settle {
                settlement: Box::new(s),
                reply,
            });
            settles.push(rx);
        }
        writer.commit_batch(&mut batch);

        let appended: Vec<_> = appends
            .iter_mut()
            .map(|rx| rx.try_recv().unwrap())
            .collect();
        assert_eq!(appended[0].as_ref().unwrap(), &1);
        // An empty id cannot be a key: that op alone fails, and takes no seq.
        assert!(matches!(appended[1], Err(JournalError::Encoding(_))));
        assert_eq!(appended[2].as_ref().unwrap(), &2);
        let settled: Vec<_> = settles
            .iter_mut()
            .map(|rx| rx.try_recv().unwrap().unwrap())
            .collect();
        assert_eq!(
            settled,
            [
                Settled::Committed,
                Settled::Conflict,
                Settled::Stale,
                Settled::Stale
            ]
        );

        let (j, _queue) = journal_without_writer(store);
        assert_eq!(j.kv_get("p", "k").unwrap(), Some(b"x".to_vec()));
        let due = j.due_deliveries().unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].key, DeliveryKey { seq: 2, idx: 0 });
        assert_eq!(
            j.stats().unwrap(),
            JournalStats {
                events: 2,
                deliveries: 2,
                due: 1,
                kv_entries: 1
            }
        );
    }

    /// A failed commit answers every op of the batch with `CommitFailed`,
    /// writes nothing, and gives back the sequence numbers.
    #[test]
    fn a_failed_commit_fails_the_whole_batch() {
        let dir = tempfile::tempdir().unwrap();
        let (store, mut writer) = bare_writer(dir.path());
        let mut run = |ids: &[&str]| {
            let mut batch = Vec::new();
            let mut rxs = Vec::new();
            for id in ids {
                let (reply, rx) = oneshot::channel();
                batch.push(WriteOp::Append {
                    event: event(id),
                    accepted_ms: 1,
                    deliveries: planned(1),
                    reply,
                });
                rxs.push(rx);
            }
            let (reply, mut rx) = oneshot::channel();
            batch.push(WriteOp::Settle {
                settlement: Box::new(settlement(1, Outcome::Failed, KvChanges::default())),
                reply,
            });
            writer.commit_batch(&mut batch);
            let appended: Vec<_> = rxs.iter_mut().map(|rx| rx.try_recv().unwrap()).collect();
            (appended, rx.try_recv().unwrap())
        };

        FAIL_COMMIT.set(true);
        let (appended, settled) = run(&["a", "b"]);
        FAIL_COMMIT.set(false);
        assert!(
            appended
                .iter()
                .all(|r| matches!(r, Err(JournalError::CommitFailed(_))))
        );
        assert!(matches!(settled, Err(JournalError::CommitFailed(_))));
        let (j, _queue) = journal_without_writer(store);
        assert_eq!(j.stats().unwrap(), JournalStats::default());

        let (appended, settled) = run(&["c"]);
        assert_eq!(appended[0].as_ref().unwrap(), &1);
        assert_eq!(settled.unwrap(), Settled::Committed);
        assert!(j.timeline("a").unwrap().is_none());
        assert_eq!(j.timeline("c").unwrap().unwrap().seq, 1);
    }

    fn journal_without_writer(store: Arc<Store>) -> (Journal, Receiver<WriteOp>) {
        let (writer, queue) = std::sync::mpsc::sync_channel(1);
        (Journal { store, writer }, queue)
    }

    /// Keys sort as tuples: numerically by due time (big-endian, not byte-wise
    /// little-endian), and kv keys of one plugin never mix with another's.
    #[tokio::test]
    async fn keys_sort_as_tuples_and_kv_is_per_plugin() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let late = j.append(event("late"), 256, planned(1)).await.unwrap();
        let early = j.append(event("early"), 1, planned(1)).await.unwrap();
        let due: Vec<_> = j
            .due_deliveries()
            .unwrap()
            .iter()
            .map(|d| d.key.seq)
            .collect();
        assert_eq!(due, [early, late]);

        let mut s = settlement(late, Outcome::Delivered, KvChanges::default());
        s.plugin = "p.x".into();
        s.kv.writes = vec![
            ("a\0b".into(), Some(b"1".to_vec())),
            ("gone".into(), Some(b"2".to_vec())),
            ("gone".into(), None),
        ];
        assert_eq!(j.settle(s).await.unwrap(), Settled::Committed);
        assert_eq!(j.kv_get("p.x", "a\0b").unwrap(), Some(b"1".to_vec()));
        assert_eq!(j.kv_get("p.x", "gone").unwrap(), None);
        assert_eq!(j.kv_get("p", "a\0b").unwrap(), None);
        assert_eq!(j.kv_get("p.x\0a", "b").unwrap(), None);
        assert_eq!(j.stats().unwrap().kv_entries, 1);
        assert_eq!(j.timeline("").unwrap().map(|t| t.seq), None);
        assert_eq!(j.timeline("late").unwrap().map(|t| t.seq), Some(late));
    }
}
