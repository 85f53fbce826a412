//! The embedded journal on fjall: an LSM tree, in `<data dir>/journal/`, with a
//! commit log of our own in front of it, in `<data dir>/wal/log`.
//! `docs/adr/0001-embedded-store.md` says why fjall, `0002-own-commit-log.md`
//! why the log.
//!
//! Durability: the writer stages each batch's writes, writes them to the
//! commit log as one frame (`O_DIRECT | O_DSYNC`, so the write is durable
//! when it returns), makes the frame readable (the overlay), and answers.
//! The applier writes frames into fjall behind the answers, without a sync,
//! and from time to time persists fjall and releases the log up to there.
//! After a crash, opening replays fjall's journal, then the log's frames after
//! the position fjall recorded: a batch is recovered whole or not at all.

use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use fjall::{
    AbstractTree as _, KeyspaceCreateOptions, PersistMode, SingleWriterTxDatabase,
    SingleWriterTxKeyspace, Slice,
};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::overlay::{Frame, KEYSPACES, Ks, Merged, Overlay, Reads, Spaces, View, Writes};
use super::reaper;
use super::wal::{Wal, WalError, WalPos, WalSpace};
use super::{
    Appended, ArchivedEvent, Compacted, DeadLetter, DeadLetterPage, DedupInfo, DedupKey,
    DeliveryKey, DeliveryRecord, DeliveryStatus, DueDelivery, EventTimeline, JournalError,
    JournalStats, Outcome, PlannedDelivery, RedriveSelect, ReplayJob, ReplaySpec, Seq, Settled,
    Settlement,
};
use crate::event::Event;

// Keyspaces. Tuple keys are fixed-width big-endian concatenations, so that byte
// order (fjall's order) is tuple order.
//
// events:     seq (8 B)                        → msgpack(StoredEvent)
// event_ids:  event id (UTF-8)                 → seq (8 B)
// by_time:    accepted ms (8 B) ‖ seq (8 B)    → empty: events in acceptance
//             time, for replay and compaction
// deliveries: seq (8 B) ‖ idx (4 B)            → msgpack(DeliveryRecord)
// due:        due ms (8 B) ‖ seq (8 B) ‖ idx (4 B) → empty: the deliveries that
//             are not final, in the order they are due
// dead:       seq (8 B) ‖ idx (4 B)            → route: the dead letters
// order:      route ‖ 0x00 ‖ key length (4 B) ‖ key ‖ seq (8 B) ‖ idx (4 B)
//             → empty: the ordered deliveries that are not final; the first
//             one under a (route, key) prefix is the one that may run
// dedup:      source ‖ 0x00 ‖ idempotency key  → msgpack(DedupEntry)
// replays:    replay id (8 B)                  → msgpack(ReplayJob)
// kv:         plugin ‖ 0x00 ‖ key              → value. Plugin, source and
//             route names are `[A-Za-z0-9._-]` (config checks it), so they
//             never hold 0x00 and the order is (name, key) order; the key may
//             hold any byte.
// kv_ttl:     kv key                           → expires ms (8 B), for keys
//             set with a TTL
// kv_exp:     expires ms (8 B) ‖ kv key        → empty: the same, in expiry
//             order, for the sweep
// kv_usage:   plugin                           → bytes (8 B): the sum of key
//             and value lengths of the plugin's entries, for its quota
// wal:        "position"                       → LSN (8 B) ‖ log position
//             (8 B): the last commit log frame in fjall (`Ks::Wal`)
const WAL_POSITION: &[u8] = b"position";

/// The commit log's size. Whole 4 KiB blocks per batch.
const WAL_SIZE: u64 = if cfg!(test) { 1 << 20 } else { 64 << 20 };
/// The applier persists fjall and releases the log each time this fraction
/// of it has been applied: small checkpoints, because each one's `fsync` of
/// fjall's journal competes with the log's writes for the disk (a sixteenth
/// halved the batches over 5 ms against a quarter: docs/benchmarks.md, "the
/// commit log built").
const CHECKPOINT_FRACTION: u64 = 16;
/// The applier persists fjall and releases the log once no frame has come
/// for this long, so a restart after a quiet spell replays little.
const CHECKPOINT_IDLE: Duration = Duration::from_millis(500);

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
    /// The idempotency key it was accepted under, if its source has one.
    #[serde(default)]
    dedup_key: Option<String>,
}

/// What the searches by time and by id read of a stored event, skipping
/// the rest (its body above all) rather than copying it.
#[derive(Deserialize)]
struct StoredHead {
    accepted_ms: u64,
    event: EventHead,
}

#[derive(Deserialize)]
struct EventHead {
    id: String,
}

/// The first event accepted under an idempotency key.
#[derive(Serialize, Deserialize)]
struct DedupEntry {
    seq: Seq,
    id: String,
    first_ms: u64,
    duplicates: u64,
    last_duplicate_ms: Option<u64>,
}

/// An operation for the writer, with the channel its result goes back on.
enum WriteOp {
    Append {
        encoded: EncodedEvent,
        dedup: Option<DedupKey>,
        reply: oneshot::Sender<Result<Appended, JournalError>>,
    },
    Settle {
        settlement: Box<Settlement>,
        reply: oneshot::Sender<Result<Settled, JournalError>>,
    },
    Redrive {
        keys: Vec<DeliveryKey>,
        now_ms: u64,
        reply: oneshot::Sender<Result<Vec<DueDelivery>, JournalError>>,
    },
    Replay {
        /// `None`: a new replay.
        job: Option<u64>,
        spec: ReplaySpec,
        items: Vec<(Seq, Vec<PlannedDelivery>)>,
        now_ms: u64,
        reply: oneshot::Sender<Result<(u64, Vec<DueDelivery>), JournalError>>,
    },
    Compact {
        cutoff_ms: u64,
        resume: Option<(u64, Seq)>,
        limit: usize,
        reply: oneshot::Sender<Result<Compacted, JournalError>>,
    },
    /// Deletes up to `limit` kv entries whose TTL ran out by `now_ms`.
    ExpireKv {
        now_ms: u64,
        limit: usize,
        reply: oneshot::Sender<Result<usize, JournalError>>,
    },
    /// Answers once everything queued before it is committed.
    Flush {
        reply: oneshot::Sender<Result<(), JournalError>>,
    },
}

/// Sends an op's result once its batch is committed, or the batch's error.
type Reply = Box<dyn FnOnce(Option<&str>) + Send>;

fn reply<T: Send + 'static>(
    tx: oneshot::Sender<Result<T, JournalError>>,
    result: Result<T, JournalError>,
) -> Reply {
    Box::new(move |failed: Option<&str>| {
        let result = match failed {
            None => result,
            Some(text) => Err(JournalError::CommitFailed(text.to_string())),
        };
        let _ = tx.send(result);
    })
}

impl WriteOp {
    /// The reply slot of an op that a failed batch did not get to (the caller
    /// is told the batch's error).
    fn unapplied(self) -> Reply {
        use JournalError::Closed;
        match self {
            WriteOp::Append { reply: r, .. } => reply(r, Err(Closed)),
            WriteOp::Settle { reply: r, .. } => reply(r, Err(Closed)),
            WriteOp::Redrive { reply: r, .. } => reply(r, Err(Closed)),
            WriteOp::Replay { reply: r, .. } => reply(r, Err(Closed)),
            WriteOp::Compact { reply: r, .. } => reply(r, Err(Closed)),
            WriteOp::ExpireKv { reply: r, .. } => reply(r, Err(Closed)),
            WriteOp::Flush { reply: r } => reply(r, Err(Closed)),
        }
    }
}

/// The open store: the database and its keyspaces.
struct Store {
    db: SingleWriterTxDatabase,
    spaces: Spaces,
    /// The batches logged but not yet in fjall.
    overlay: Overlay,
    /// Whether batches go through the commit log (off only for benchmarks:
    /// see `[server] fsync`).
    fsync: bool,
    /// Batches the writer has made durable (one log write each), for tests
    /// and metrics: with concurrent requests it stays well below the op count.
    commits: std::sync::atomic::AtomicU64,
    /// Set when the applier failed: fjall no longer takes writes, so the
    /// writer takes none either.
    poisoned: std::sync::OnceLock<String>,
}

impl Store {
    /// Opens (or creates) the store at `path`, replaying fjall's journal.
    fn open(path: &Path, fsync: bool) -> Result<Store, JournalError> {
        let open_err = |e: fjall::Error| JournalError::Open {
            path: path.display().to_string(),
            source: Box::new(e),
        };
        // Defaults: 512 MiB of journal, 64 MiB memtable per keyspace, min(cores, 4)
        // compaction threads, 32 MiB block cache.
        let db = SingleWriterTxDatabase::builder(path)
            .open()
            .map_err(open_err)?;
        // Tables compressed from the first level on (fjall leaves L0 and L1
        // raw): a 64 MiB memtable of events then flushes as 16 MB, not 60, and
        // on a virtual disk that burst is what a concurrent commit's fsync
        // waits behind (docs/benchmarks.md, half-rate p99). fjall stores these
        // options with a keyspace when it creates it: a journal created before
        // keeps its own (raw L0 and L1), and reads either kind.
        let mut spaces = Vec::with_capacity(KEYSPACES);
        for ks in Ks::ALL {
            spaces.push(
                db.keyspace(ks.name(), || {
                    KeyspaceCreateOptions::default().data_block_compression_policy(
                        fjall::config::CompressionPolicy::all(fjall::CompressionType::Lz4),
                    )
                })
                .map_err(open_err)?,
            );
        }
        let spaces: Spaces = spaces
            .try_into()
            .map_err(|_| JournalError::Encoding("keyspace count".into()))?;
        Ok(Store {
            db,
            spaces,
            overlay: Overlay::default(),
            fsync,
            commits: Default::default(),
            poisoned: Default::default(),
        })
    }

    fn ks(&self, ks: Ks) -> &SingleWriterTxKeyspace {
        &self.spaces[ks as usize]
    }

    /// One key's value, as last committed.
    fn get(&self, ks: Ks, key: impl AsRef<[u8]>) -> Result<Option<Slice>, fjall::Error> {
        self.overlay.get(self.ks(ks), ks, key.as_ref())
    }

    /// A consistent read of everything committed so far.
    fn view(&self) -> View<'_> {
        View::new(&self.overlay, &self.db, &self.spaces)
    }

    /// The sequence number the next event gets.
    fn next_seq(&self) -> Result<Seq, JournalError> {
        let last = match self
            .view()
            .range_in(None, Ks::Events, Bound::Unbounded, Bound::Unbounded, true)
            .next()
        {
            Some(entry) => Some(seq_from(&entry?.0)?),
            None => None,
        };
        Ok(last.map_or(1, |s| s + 1))
    }

    /// The acceptance time of the newest event (0 without events): the
    /// writer stamps no event earlier than this.
    fn last_accepted_ms(&self) -> Result<u64, JournalError> {
        match self
            .view()
            .range_in(None, Ks::Events, Bound::Unbounded, Bound::Unbounded, true)
            .next()
        {
            Some(entry) => Ok(decode::<StoredHead>(&entry?.1)?.accepted_ms),
            None => Ok(0),
        }
    }

    /// Where the applier stands in the commit log.
    fn wal_position(&self) -> Result<WalPos, JournalError> {
        match self.ks(Ks::Wal).get(WAL_POSITION)? {
            Some(v) if v.len() == 16 => Ok(WalPos {
                lsn: be_u64(&v[..8]),
                end: be_u64(&v[8..]),
            }),
            Some(_) => Err(JournalError::Encoding("bad commit log position".into())),
            None => Ok(WalPos::default()),
        }
    }

    /// Writes logged frames into fjall, with the log position after the
    /// last one, in one fjall batch. No sync: the log has them until a
    /// checkpoint persists fjall.
    fn apply_frames<'f>(
        &self,
        frames: impl IntoIterator<Item = (&'f Writes, WalPos)>,
    ) -> Result<Option<WalPos>, fjall::Error> {
        let mut tx = self.db.write_tx().durability(Some(PersistMode::Buffer));
        let mut last = None;
        for (writes, pos) in frames {
            for (ks, k, v) in writes.iter() {
                match v {
                    Some(v) => tx.insert(self.ks(ks), k, v.clone()),
                    None => tx.remove(self.ks(ks), k),
                }
            }
            last = Some(pos);
        }
        if let Some(pos) = last
            && self.fsync
        {
            let mut b = [0; 16];
            b[..8].copy_from_slice(&pos.lsn.to_be_bytes());
            b[8..].copy_from_slice(&pos.end.to_be_bytes());
            tx.insert(self.ks(Ks::Wal), WAL_POSITION, b);
        }
        tx.commit()?;
        Ok(last)
    }

    /// The active memtable of each keyspace, for the reaper (`reaper.rs`).
    fn active_memtables(&self) -> Vec<reaper::Held> {
        self.spaces
            .iter()
            .map(|keyspace| keyspace.inner().tree.active_memtable() as reaper::Held)
            .collect()
    }
}

/// Handle to the embedded journal. Cheap to clone.
#[derive(Clone)]
pub struct Journal {
    store: Arc<Store>,
    writer: SyncSender<WriteOp>,
    /// For [`Journal::checkpoint`], which asks the applier directly.
    applier: std::sync::mpsc::Sender<ToApplier>,
}

/// What the applier is sent.
enum ToApplier {
    /// A logged batch, in log order.
    Frame(Arc<Frame>),
    /// Apply what came before, persist fjall and release the log, then
    /// answer.
    Checkpoint(oneshot::Sender<Result<(), JournalError>>),
}

impl Journal {
    /// Opens (or creates) the journal in `dir`, and starts its writer thread.
    pub fn open(dir: &Path) -> Result<Journal, JournalError> {
        Journal::open_with(dir, true, true)
    }

    /// As [`Journal::open`]; `fsync = false` commits without waiting for the
    /// disk (benchmarks only: a crash may lose acknowledged writes), and
    /// `idle_background = false` leaves fjall's workers and the reaper at
    /// ordinary CPU priority (`priority.rs`).
    pub fn open_with(
        dir: &Path,
        fsync: bool,
        idle_background: bool,
    ) -> Result<Journal, JournalError> {
        let open_err =
            |path: &Path, e: Box<dyn std::error::Error + Send + Sync>| JournalError::Open {
                path: path.display().to_string(),
                source: e,
            };
        std::fs::create_dir_all(dir).map_err(|e| open_err(dir, Box::new(e)))?;
        let path = dir.join("journal");
        let store = Store::open(&path, fsync)?;
        if idle_background {
            // fjall's flushes and compactions (`priority.rs`).
            super::priority::lower_threads_named("fjall:worker");
        }
        let wal = if fsync {
            let wal_dir = dir.join("wal");
            std::fs::create_dir_all(&wal_dir).map_err(|e| open_err(&wal_dir, Box::new(e)))?;
            let log = wal_dir.join("log");
            let mut wal = Wal::open(&log, WAL_SIZE).map_err(|e| open_err(&log, Box::new(e)))?;
            tracing::debug!(path = %log.display(), direct_io = wal.direct(), "commit log open");
            let after = store.wal_position()?;
            let frames = wal
                .recover(after)
                .map_err(|e| open_err(&log, Box::new(e)))?;
            if !frames.is_empty() {
                // The batches that were answered but had not reached fjall,
                // or whose fjall writes a machine crash took back.
                let mut writes = Vec::with_capacity(frames.len());
                for (_, payload) in &frames {
                    writes.push(Writes::decode(payload).map_err(|e| open_err(&log, Box::new(e)))?);
                }
                let end = wal.position();
                let last = writes.len() - 1;
                store.apply_frames(writes.iter().enumerate().map(|(i, w)| {
                    (
                        w,
                        if i == last {
                            end
                        } else {
                            WalPos {
                                lsn: frames[i].0,
                                end: 0,
                            }
                        },
                    )
                }))?;
                store.db.persist(PersistMode::SyncAll)?;
                wal.space().release(end.end);
                tracing::info!(
                    batches = frames.len(),
                    "replayed the commit log's batches that fjall did not have"
                );
            }
            Some(wal)
        } else {
            None
        };
        let next_seq = store.next_seq()?;
        let last_ms = store.last_accepted_ms()?;
        let store = Arc::new(store);
        let thread_err = |e: std::io::Error| open_err(&path, Box::new(e));
        let (applier, frames) = std::sync::mpsc::channel();
        let applier_store = store.clone();
        let space = wal
            .as_ref()
            .map(|w| (w.space(), w.size(), w.position().end));
        std::thread::Builder::new()
            .name("journal-applier".into())
            .spawn(move || apply_loop(&applier_store, frames, space))
            .map_err(thread_err)?;
        let checkpoints = applier.clone();
        let (writer, queue) = std::sync::mpsc::sync_channel(QUEUE_CAPACITY);
        let writer_store = store.clone();
        std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || {
                Writer {
                    store: writer_store,
                    next_seq,
                    last_ms,
                    store_time: Duration::ZERO,
                    wal,
                    applier,
                    lsn: 0,
                    carry: Vec::new(),
                    logged: None,
                    flushed: Vec::new(),
                }
                .run(queue)
            })
            .map_err(thread_err)?;
        // A weak reference, so that the reaper does not keep the store open.
        let weak = Arc::downgrade(&store);
        reaper::spawn(idle_background, move || {
            weak.upgrade().map(|s| s.active_memtables())
        })
        .map_err(thread_err)?;
        Ok(Journal {
            store,
            writer,
            applier: checkpoints,
        })
    }

    /// How many transactions the writer has committed since the journal opened.
    pub fn commits(&self) -> u64 {
        self.store
            .commits
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn call<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<T, JournalError>>) -> WriteOp,
    ) -> Result<T, JournalError> {
        let (reply, rx) = oneshot::channel();
        self.writer.try_send(op(reply)).map_err(|e| match e {
            TrySendError::Full(_) => JournalError::Saturated,
            TrySendError::Disconnected(_) => JournalError::Closed,
        })?;
        rx.await.map_err(|_| JournalError::Closed)?
    }

    /// Durably stores an event with its planned deliveries; returns once they
    /// are committed. With a dedup key seen within its window, stores nothing
    /// and names the event first accepted under it.
    pub async fn append(
        &self,
        event: Arc<Event>,
        accepted_ms: u64,
        deliveries: Vec<PlannedDelivery>,
        dedup: Option<DedupKey>,
    ) -> Result<Appended, JournalError> {
        // Encoded here, on the caller's thread, so the single writer only
        // writes.
        let encoded = encode_event(
            &event,
            accepted_ms,
            deliveries,
            dedup.as_ref().map(|d| d.key.as_str()),
        )?;
        self.call(|reply| WriteOp::Append {
            encoded,
            dedup,
            reply,
        })
        .await
    }

    /// Durably records an attempt's result (and, on success, its kv writes).
    pub async fn settle(&self, settlement: Settlement) -> Result<Settled, JournalError> {
        self.call(|reply| WriteOp::Settle {
            settlement: Box::new(settlement),
            reply,
        })
        .await
    }

    /// Makes dead letters pending again, with a fresh retry budget; returns
    /// the deliveries to dispatch. Deliveries that are not dead are skipped.
    pub async fn redrive(&self, select: RedriveSelect) -> Result<Vec<DueDelivery>, JournalError> {
        let keys = match select {
            RedriveSelect::Keys(keys) => keys,
            RedriveSelect::Route(route) => {
                let s = &*self.store;
                let mut keys = Vec::new();
                for entry in
                    s.view()
                        .range_in(None, Ks::Dead, Bound::Unbounded, Bound::Unbounded, false)
                {
                    let (k, v) = entry?;
                    if route.as_deref().is_none_or(|r| r.as_bytes() == &v[..]) {
                        let (seq, idx) = delivery_from(&k)?;
                        keys.push(DeliveryKey { seq, idx });
                    }
                }
                keys
            }
        };
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(MAX_BATCH) {
            let keys = chunk.to_vec();
            let now_ms = crate::event::now_ms();
            out.extend(
                self.call(|reply| WriteOp::Redrive {
                    keys,
                    now_ms,
                    reply,
                })
                .await?,
            );
        }
        Ok(out)
    }

    /// Plans deliveries of archived events (a replay). `job = None` starts a
    /// new replay; later chunks name the id the first one returned.
    pub async fn plan_replay(
        &self,
        job: Option<u64>,
        spec: ReplaySpec,
        items: Vec<(Seq, Vec<PlannedDelivery>)>,
    ) -> Result<(u64, Vec<DueDelivery>), JournalError> {
        let now_ms = crate::event::now_ms();
        self.call(|reply| WriteOp::Replay {
            job,
            spec,
            items,
            now_ms,
            reply,
        })
        .await
    }

    /// Deletes, oldest first, up to `limit` events accepted before `cutoff_ms`
    /// whose deliveries are all delivered (dead letters and unfinished
    /// deliveries keep their event), with their deliveries and dedup entries.
    pub async fn compact(
        &self,
        cutoff_ms: u64,
        resume: Option<(u64, Seq)>,
        limit: usize,
    ) -> Result<Compacted, JournalError> {
        self.call(|reply| WriteOp::Compact {
            cutoff_ms,
            resume,
            limit,
            reply,
        })
        .await
    }

    /// Deletes up to `limit` kv entries whose TTL ran out by `now_ms`;
    /// returns how many it deleted (fewer than `limit`: none are left).
    pub async fn expire_kv(&self, now_ms: u64, limit: usize) -> Result<usize, JournalError> {
        self.call(|reply| WriteOp::ExpireKv {
            now_ms,
            limit,
            reply,
        })
        .await
    }

    /// Waits until everything submitted before is committed.
    pub async fn flush(&self) -> Result<(), JournalError> {
        self.call(|reply| WriteOp::Flush { reply }).await
    }

    /// Waits until everything submitted before is committed and in fjall,
    /// synced, with the commit log released: a start after this replays
    /// nothing from the log. For a clean shutdown; the applier does the
    /// same on its own every so often.
    pub async fn checkpoint(&self) -> Result<(), JournalError> {
        self.flush().await?;
        // The flush's answer came after the writer sent its last frame to
        // the applier, so this request follows every frame committed so far.
        let (reply, rx) = oneshot::channel();
        self.applier
            .send(ToApplier::Checkpoint(reply))
            .map_err(|_| self.gone())?;
        rx.await.map_err(|_| self.gone())?
    }

    /// Why the applier is gone: it stops only after poisoning the store.
    fn gone(&self) -> JournalError {
        match self.store.poisoned.get() {
            Some(why) => JournalError::CommitFailed(why.clone()),
            None => JournalError::Closed,
        }
    }

    /// Every delivery that is not final, in the order it is due.
    pub fn due_deliveries(&self) -> Result<Vec<DueDelivery>, JournalError> {
        let s = &*self.store;
        let snap = s.view();
        let mut out = Vec::new();
        for entry in snap.range_in(None, Ks::Due, Bound::Unbounded, Bound::Unbounded, false) {
            let (due_ms, seq, idx) = due_from(&entry?.0)?;
            if let Some(v) = snap.get(Ks::Deliveries, delivery_key(seq, idx))? {
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
        match self.store.get(Ks::Events, seq.to_be_bytes())? {
            Some(v) => Ok(Some(Arc::new(decode::<StoredEvent>(&v)?.event))),
            None => Ok(None),
        }
    }

    /// One delivery's record.
    pub fn delivery(&self, key: DeliveryKey) -> Result<Option<DeliveryRecord>, JournalError> {
        match self
            .store
            .get(Ks::Deliveries, delivery_key(key.seq, key.idx))?
        {
            Some(v) => Ok(Some(decode(&v)?)),
            None => Ok(None),
        }
    }

    /// The first ordered delivery of `(route, key)` that is not final: the
    /// only one of them that may run.
    pub fn order_head(&self, route: &str, key: &str) -> Result<Option<DeliveryKey>, JournalError> {
        let s = &*self.store;
        let prefix = order_prefix(route, key);
        match s.view().prefix_in(None, Ks::Order, &prefix, false).next() {
            Some(entry) => {
                let k = entry?.0;
                let (seq, idx) = delivery_from(&k[prefix.len()..])?;
                Ok(Some(DeliveryKey { seq, idx }))
            }
            None => Ok(None),
        }
    }

    /// The event with this id and all its deliveries.
    pub fn timeline(&self, id: &str) -> Result<Option<EventTimeline>, JournalError> {
        if check_key(id.as_bytes()).is_err() {
            return Ok(None); // could not have been stored
        }
        let s = &*self.store;
        let snap = s.view();
        let Some(seq) = seq_of_id(&snap, id)? else {
            return Ok(None);
        };
        let Some(stored) = snap.get(Ks::Events, seq.to_be_bytes())? else {
            return Ok(None);
        };
        let stored: StoredEvent = decode(&stored)?;
        let mut deliveries = Vec::new();
        for entry in snap.prefix_in(None, Ks::Deliveries, &seq.to_be_bytes(), false) {
            let (k, v) = entry?;
            let (seq, idx) = delivery_from(&k)?;
            deliveries.push((DeliveryKey { seq, idx }, decode(&v)?));
        }
        let dedup = match &stored.dedup_key {
            Some(key) => {
                let entry = snap
                    .get(Ks::Dedup, dedup_key(&stored.event.source, key))?
                    .map(|v| decode::<DedupEntry>(&v))
                    .transpose()?
                    .filter(|e| e.seq == seq);
                Some(DedupInfo {
                    key: key.clone(),
                    duplicates: entry.as_ref().map_or(0, |e| e.duplicates),
                    last_duplicate_ms: entry.and_then(|e| e.last_duplicate_ms),
                })
            }
            None => None,
        };
        Ok(Some(EventTimeline {
            seq,
            event: Arc::new(stored.event),
            accepted_ms: stored.accepted_ms,
            dedup,
            deliveries,
        }))
    }

    /// The newest events (newest first) accepted before `before` (a seq,
    /// exclusive) that `keep` accepts, at most `limit`, with their deliveries;
    /// scans at most `scan` events, so a rare filter stays cheap.
    pub fn recent(
        &self,
        before: Option<Seq>,
        limit: usize,
        scan: usize,
        keep: impl Fn(&Event) -> bool,
    ) -> Result<Vec<EventTimeline>, JournalError> {
        let s = &*self.store;
        let snap = s.view();
        let upper = before.unwrap_or(Seq::MAX).to_be_bytes();
        let mut out = Vec::new();
        for entry in snap
            .range_in(
                None,
                Ks::Events,
                Bound::Unbounded,
                Bound::Excluded(&upper),
                true,
            )
            .take(scan)
        {
            let (k, v) = entry?;
            let seq = seq_from(&k)?;
            let stored: StoredEvent = decode(&v)?;
            if !keep(&stored.event) {
                continue;
            }
            let mut deliveries = Vec::new();
            for d in snap.prefix_in(None, Ks::Deliveries, &seq.to_be_bytes(), false) {
                let (k, v) = d?;
                let (seq, idx) = delivery_from(&k)?;
                deliveries.push((DeliveryKey { seq, idx }, decode(&v)?));
            }
            out.push(EventTimeline {
                seq,
                event: Arc::new(stored.event),
                accepted_ms: stored.accepted_ms,
                dedup: None,
                deliveries,
            });
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Dead letters after `after` (exclusive), oldest event first, of one
    /// route or all.
    pub fn dead_letters(
        &self,
        route: Option<&str>,
        after: Option<DeliveryKey>,
        limit: usize,
    ) -> Result<DeadLetterPage, JournalError> {
        let s = &*self.store;
        let snap = s.view();
        let start = after.map(|k| {
            // The smallest key after `k`: its 12 bytes followed by a zero.
            let mut b = delivery_key(k.seq, k.idx).to_vec();
            b.push(0);
            b
        });
        let lo = match &start {
            Some(b) => Bound::Included(b.as_slice()),
            None => Bound::Unbounded,
        };
        let iter = snap.range_in(None, Ks::Dead, lo, Bound::Unbounded, false);
        let mut items = Vec::new();
        let mut next = None;
        for entry in iter {
            let (k, v) = entry?;
            if route.is_some_and(|r| r.as_bytes() != &v[..]) {
                continue;
            }
            let (seq, idx) = delivery_from(&k)?;
            let key = DeliveryKey { seq, idx };
            if items.len() == limit {
                next = items.last().map(|d: &DeadLetter| d.key);
                break;
            }
            if let Some(d) = self.dead_letter_in(&snap, key)? {
                items.push(d);
            }
        }
        Ok(DeadLetterPage { items, next })
    }

    /// One dead letter (`None` if that delivery is not dead).
    pub fn dead_letter(&self, key: DeliveryKey) -> Result<Option<DeadLetter>, JournalError> {
        let snap = self.store.view();
        self.dead_letter_in(&snap, key)
    }

    fn dead_letter_in(
        &self,
        snap: &View<'_>,
        key: DeliveryKey,
    ) -> Result<Option<DeadLetter>, JournalError> {
        let Some(record) = snap.get(Ks::Deliveries, delivery_key(key.seq, key.idx))? else {
            return Ok(None);
        };
        let record: DeliveryRecord = decode(&record)?;
        if record.status != DeliveryStatus::Dead {
            return Ok(None);
        }
        let Some(stored) = snap.get(Ks::Events, key.seq.to_be_bytes())? else {
            return Ok(None);
        };
        let stored: StoredEvent = decode(&stored)?;
        Ok(Some(DeadLetter {
            key,
            event: Arc::new(stored.event),
            record,
        }))
    }

    /// Archived events accepted in `[since_ms, until_ms)`, from `after`
    /// (exclusive) on, at most `limit`, in acceptance order.
    ///
    /// Acceptance times never decrease in sequence order (see `append`), so
    /// the window is a range of `events`: its start is found by a binary
    /// search, and the walk ends at the first event at or after `until_ms`.
    /// (Stores written before that rule may hold events a few milliseconds
    /// out of order; at the window's edges those follow their sequence.)
    pub fn archived(
        &self,
        since_ms: u64,
        until_ms: Option<u64>,
        after: Option<(u64, Seq)>,
        limit: usize,
    ) -> Result<Vec<ArchivedEvent>, JournalError> {
        let snap = self.store.view();
        let until_ms = until_ms.unwrap_or(u64::MAX);
        let start = match after {
            Some((_, seq)) => seq.saturating_add(1),
            None => match first_accepted_at(&snap, since_ms)? {
                Some(seq) => seq,
                None => return Ok(Vec::new()),
            },
        };
        let mut out = Vec::new();
        for entry in events_from(&snap, start) {
            if out.len() == limit {
                break;
            }
            let (k, v) = entry?;
            let stored = decode::<StoredEvent>(&v)?;
            if stored.accepted_ms >= until_ms {
                break;
            }
            if stored.accepted_ms < since_ms {
                continue;
            }
            out.push(ArchivedEvent {
                seq: seq_from(&k)?,
                accepted_ms: stored.accepted_ms,
                event: Arc::new(stored.event),
            });
        }
        Ok(out)
    }

    /// A replay and the deliveries it planned.
    pub fn replay_job(&self, id: u64) -> Result<Option<ReplayJob>, JournalError> {
        match self.store.get(Ks::Replays, id.to_be_bytes())? {
            Some(v) => Ok(Some(decode(&v)?)),
            None => Ok(None),
        }
    }

    /// The sequence number of the event with this id, if it is stored.
    pub fn event_seq(&self, id: &str) -> Result<Option<Seq>, JournalError> {
        if id.is_empty() || id.len() > MAX_KEY_LEN {
            return Ok(None);
        }
        seq_of_id(&self.store.view(), id)
    }

    /// A plugin's value under `key`, as last committed (absent once its TTL
    /// has run out).
    pub fn kv_get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, JournalError> {
        let Ok(k) = kv_key(plugin, key) else {
            return Ok(None); // could not have been stored
        };
        let s = &*self.store;
        kv_live(&s.view(), &k, crate::event::now_ms())
    }

    /// Up to `limit` of a plugin's keys that start with `prefix`, after `after`
    /// if given, in byte order; expired keys are left out.
    pub fn kv_list(
        &self,
        plugin: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, JournalError> {
        let s = &*self.store;
        let Ok(base) = kv_key(plugin, "x") else {
            return Ok(Vec::new());
        };
        let name_len = base.len() - 1;
        let mut start = base[..name_len].to_vec();
        start.extend_from_slice(prefix.as_bytes());
        // Page on from just past `after` when it lies inside the prefix.
        let lower = match after {
            Some(a) if a.as_bytes() >= prefix.as_bytes() => {
                let mut l = base[..name_len].to_vec();
                l.extend_from_slice(a.as_bytes());
                Bound::Excluded(l)
            }
            _ => Bound::Included(start.clone()),
        };
        let snap = s.view();
        let now = crate::event::now_ms();
        let mut out = Vec::new();
        let lower = match &lower {
            Bound::Excluded(l) => Bound::Excluded(l.as_slice()),
            Bound::Included(l) => Bound::Included(l.as_slice()),
            Bound::Unbounded => Bound::Unbounded,
        };
        for entry in snap.range_in(None, Ks::Kv, lower, Bound::Unbounded, false) {
            let k = entry?.0;
            if !k.starts_with(&start) {
                break;
            }
            let key = std::str::from_utf8(&k[name_len..])
                .map_err(|_| JournalError::Encoding("a kv key is not UTF-8".into()))?;
            if let Some(exp) = snap.get(Ks::KvTtl, &k)?
                && be_u64(&exp) <= now
            {
                continue;
            }
            out.push(key.to_string());
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// The bytes (keys and values) a plugin's kv entries take, for its quota.
    pub fn kv_usage(&self, plugin: &str) -> Result<u64, JournalError> {
        Ok(self
            .store
            .get(Ks::KvUsage, plugin.as_bytes())?
            .map_or(0, |v| be_u64(&v)))
    }

    /// How much the store holds, from one snapshot. fjall counts by scanning
    /// (O(n)): fine for tests and the admin API, not for a hot path.
    pub fn stats(&self) -> Result<JournalStats, JournalError> {
        let s = &*self.store;
        let snap = s.view();
        Ok(JournalStats {
            events: snap.len(Ks::Events)? as u64,
            deliveries: snap.len(Ks::Deliveries)? as u64,
            due: snap.len(Ks::Due)? as u64,
            dead: snap.len(Ks::Dead)? as u64,
            kv_entries: snap.len(Ks::Kv)? as u64,
        })
    }
}

/// The single writer: drains the queue, stages everything as one batch of
/// writes, makes it durable in the commit log with one write, publishes it
/// to readers, then answers every caller; the applier writes it into fjall
/// behind the answers (ADR 0002).
struct Writer {
    store: Arc<Store>,
    next_seq: Seq,
    /// The acceptance time of the last event staged: events are stored with
    /// times that never decrease in sequence order, so that a time window is
    /// a range of sequence numbers (see `archived` and `compact`).
    last_ms: u64,
    /// How long the last batch spent in the log's write (and sync), as
    /// opposed to staging its ops.
    store_time: Duration,
    /// The commit log; `None` with `fsync = false`.
    wal: Option<Wal>,
    /// Where logged frames go to be written into fjall.
    applier: std::sync::mpsc::Sender<ToApplier>,
    /// The last frame's LSN without a log.
    lsn: u64,
    /// Ops left for the next batch when one reached the log's frame limit.
    carry: Vec<WriteOp>,
    /// The batch just logged, for the applier once its callers are answered.
    logged: Option<Arc<Frame>>,
    /// The batch's `Flush` ops, answered once its frame is with the applier.
    flushed: Vec<Reply>,
}

/// Commits slower than this are logged at debug level, with when they
/// ended, so that a latency tail can be lined up with the store's own events
/// (`RUST_LOG=switchyard::journal=debug,fjall=debug`; `half-rate.sh`
/// `EPISODES=1` does this). A group commit's time is added to every request
/// in it.
const SLOW_COMMIT: Duration = Duration::from_millis(2);
/// Commits slower than this are logged as warnings: requests are waiting on
/// a disk or store that has stalled.
const STALLED_COMMIT: Duration = Duration::from_secs(1);

/// The level a commit of this duration is logged at, if it is slow.
fn slow_commit(elapsed: Duration) -> Option<tracing::Level> {
    if elapsed >= STALLED_COMMIT {
        Some(tracing::Level::WARN)
    } else if elapsed >= SLOW_COMMIT {
        Some(tracing::Level::DEBUG)
    } else {
        None
    }
}

/// A batch being staged: its writes over a view of everything logged before.
/// Reads see the batch's own earlier writes, so each op sees the ops before
/// it in the batch.
struct Tx<'a> {
    view: View<'a>,
    writes: Writes,
}

impl Tx<'_> {
    fn insert(&mut self, ks: Ks, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        self.writes
            .put(ks, key.as_ref().to_vec(), Some(Slice::from(value.as_ref())));
    }

    fn remove(&mut self, ks: Ks, key: impl AsRef<[u8]>) {
        self.writes.put(ks, key.as_ref().to_vec(), None);
    }

    fn range(&self, ks: Ks, lo: Bound<&[u8]>, hi: Bound<&[u8]>) -> Merged {
        self.view.range_in(Some(&self.writes), ks, lo, hi, false)
    }

    fn prefix(&self, ks: Ks, prefix: impl AsRef<[u8]>, rev: bool) -> Merged {
        self.view
            .prefix_in(Some(&self.writes), ks, prefix.as_ref(), rev)
    }
}

impl Reads for Tx<'_> {
    fn get(&self, ks: Ks, key: impl AsRef<[u8]>) -> Result<Option<Slice>, fjall::Error> {
        self.view.get_in(Some(&self.writes), ks, key.as_ref())
    }
}

impl Writer {
    fn run(mut self, queue: Receiver<WriteOp>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        // The commit histograms, looked up once.
        let commit_ops = metrics::histogram!("switchyard_journal_commit_ops");
        let commit_seconds = metrics::histogram!("switchyard_journal_commit_seconds");
        loop {
            if self.carry.is_empty() {
                match queue.recv() {
                    Ok(first) => batch.push(first),
                    Err(_) => break,
                }
            } else {
                batch.append(&mut self.carry);
            }
            while batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            let started = Instant::now();
            let size = batch.len();
            self.store_time = Duration::ZERO;
            self.commit_batch(&mut batch);
            let elapsed = started.elapsed();
            commit_ops.record(size as f64);
            commit_seconds.record(elapsed.as_secs_f64());
            let ms = elapsed.as_secs_f64() * 1e3;
            let store_ms = self.store_time.as_secs_f64() * 1e3;
            match slow_commit(elapsed) {
                Some(tracing::Level::WARN) => tracing::warn!(
                    ops = size,
                    ms = %format_args!("{ms:.2}"),
                    store_ms = %format_args!("{store_ms:.2}"),
                    "a journal commit took over a second: the disk or the store is stalling"
                ),
                Some(_) => tracing::debug!(
                    ops = size,
                    ms = %format_args!("{ms:.2}"),
                    store_ms = %format_args!("{store_ms:.2}"),
                    "slow journal commit"
                ),
                None => tracing::trace!(ops = size, ms, "journal batch committed"),
            }
        }
        tracing::debug!("journal writer stopped");
    }

    fn commit_batch(&mut self, batch: &mut Vec<WriteOp>) {
        let seq_before = self.next_seq;
        let ms_before = self.last_ms;
        let mut replies = Vec::with_capacity(batch.len());
        let mut ops = batch.drain(..);
        let failed = match self.apply(&mut ops, &mut replies) {
            Ok(()) => {
                self.carry.extend(ops);
                for reply in replies {
                    reply(None);
                }
                None
            }
            Err(e) => {
                // Nothing of this batch became visible: it failed before the
                // log had it, or the log's write failed, which poisons the
                // journal (the batch may or may not be replayed after a
                // restart, which recomputes the next seq). Tell every caller,
                // including those of ops not applied yet, and give back the
                // sequence numbers.
                tracing::error!(error = %e, "journal commit failed");
                self.next_seq = seq_before;
                self.last_ms = ms_before;
                let text = e.to_string();
                for reply in replies.into_iter().chain(ops.map(WriteOp::unapplied)) {
                    reply(Some(&text));
                }
                Some(text)
            }
        };
        // The applier is woken only after the callers: on two cores it would
        // otherwise take the core that their tasks wake up on. It is gone
        // only after it poisoned the store; the frame stays readable, and the
        // log has it for the next start.
        if let Some(frame) = self.logged.take() {
            let _ = self.applier.send(ToApplier::Frame(frame));
        }
        for reply in self.flushed.drain(..) {
            reply(failed.as_deref());
        }
    }

    fn apply(
        &mut self,
        ops: &mut impl Iterator<Item = WriteOp>,
        replies: &mut Vec<Reply>,
    ) -> Result<(), JournalError> {
        if let Some(why) = self.store.poisoned.get() {
            return Err(JournalError::CommitFailed(why.clone()));
        }
        let store = self.store.clone();
        let s = &*store;
        let mut tx = Tx {
            view: View::deferred(&s.overlay, &s.db, &s.spaces),
            writes: Writes::default(),
        };
        // Stops taking ops once the frame nears the log's limit; the rest
        // wait for the next batch.
        let limit = self
            .wal
            .as_ref()
            .map_or(usize::MAX, |w| w.max_payload() / 2);
        // An event or a delivery's result larger than this is refused alone,
        // before it is staged: a frame over the log's limit would fail the
        // whole batch. Half the batch limit, so that a batch just under it
        // plus this op (estimated) still fits a frame.
        let fits = |bytes: usize| match limit / 2 {
            most if bytes > most => Err(JournalError::TooLarge { bytes, limit: most }),
            _ => Ok(()),
        };
        // A store error fails the whole batch (nothing is logged); any other
        // error concerns only its op, which wrote nothing.
        fn fatal<T>(r: &Result<T, JournalError>) -> Option<fjall::Error> {
            match r {
                Err(JournalError::Store(e)) => Some(clone_store_error(e)),
                _ => None,
            }
        }
        for op in ops.by_ref() {
            match op {
                WriteOp::Append {
                    encoded,
                    dedup,
                    reply: r,
                } => {
                    if let Err(e) = fits(encoded.bytes()) {
                        replies.push(reply(r, Err(e)));
                        continue;
                    }
                    let res = append(&mut tx, self.next_seq, &mut self.last_ms, encoded, dedup);
                    if let Ok(Appended::New(_)) = res {
                        self.next_seq += 1;
                    }
                    let err = fatal(&res);
                    replies.push(reply(r, res));
                    if let Some(e) = err {
                        return Err(e.into());
                    }
                }
                WriteOp::Settle {
                    settlement,
                    reply: r,
                } => {
                    // The dispatcher dead-letters a result refused here.
                    if let Err(e) = fits(settlement.approx_bytes()) {
                        replies.push(reply(r, Err(e)));
                        continue;
                    }
                    let res = settle(&mut tx, &settlement, &mut self.next_seq, &mut self.last_ms);
                    let err = fatal(&res);
                    replies.push(reply(r, res));
                    if let Some(e) = err {
                        return Err(e.into());
                    }
                }
                WriteOp::Redrive {
                    keys,
                    now_ms,
                    reply: r,
                } => {
                    let res = redrive(&mut tx, &keys, now_ms);
                    let err = fatal(&res);
                    replies.push(reply(r, res));
                    if let Some(e) = err {
                        return Err(e.into());
                    }
                }
                WriteOp::Replay {
                    job,
                    spec,
                    items,
                    now_ms,
                    reply: r,
                } => {
                    let res = replay(&mut tx, job, spec, items, now_ms);
                    let err = fatal(&res);
                    replies.push(reply(r, res));
                    if let Some(e) = err {
                        return Err(e.into());
                    }
                }
                WriteOp::Compact {
                    cutoff_ms,
                    resume,
                    limit,
                    reply: r,
                } => {
                    let res = compact(&mut tx, cutoff_ms, resume, limit);
                    let err = fatal(&res);
                    replies.push(reply(r, res));
                    if let Some(e) = err {
                        return Err(e.into());
                    }
                }
                WriteOp::ExpireKv {
                    now_ms,
                    limit,
                    reply: r,
                } => {
                    let res = expire_kv(&mut tx, now_ms, limit);
                    let err = fatal(&res);
                    replies.push(reply(r, res));
                    if let Some(e) = err {
                        return Err(e.into());
                    }
                }
                // Answered after the batch's frame went to the applier (see
                // `commit_batch`), which `Journal::checkpoint` relies on.
                WriteOp::Flush { reply: r } => self.flushed.push(reply(r, Ok(()))),
            }
            if tx.writes.bytes() >= limit {
                break;
            }
        }
        #[cfg(test)]
        if tests::FAIL_COMMIT.get() {
            return Err(fjall::Error::Io(std::io::Error::other("injected")).into());
        }
        let writes = tx.writes;
        // Nothing to log (and no sync) when the batch wrote nothing, e.g.
        // only stale settlements.
        if writes.is_empty() {
            return Ok(());
        }
        let committing = Instant::now();
        let pos = match &mut self.wal {
            Some(wal) => match wal.append(&writes.encode()) {
                Ok(pos) => pos,
                Err(e @ WalError::TooLarge { .. }) => {
                    return Err(JournalError::CommitFailed(e.to_string()));
                }
                Err(e) => {
                    // The frame may be partly written: no later frame may
                    // follow it, as after a failed fsync in fjall.
                    let text = e.to_string();
                    let _ = s.poisoned.set(format!("the commit log failed: {text}"));
                    return Err(JournalError::CommitFailed(text));
                }
            },
            None => {
                self.lsn += 1;
                WalPos {
                    lsn: self.lsn,
                    end: 0,
                }
            }
        };
        self.store_time = committing.elapsed();
        let frame = Arc::new(Frame {
            lsn: pos.lsn,
            end: pos.end,
            writes,
        });
        // Readable before anyone hears back.
        s.overlay.push(frame.clone());
        self.logged = Some(frame);
        s.commits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

/// The applier: writes logged frames into fjall in log order, without a sync,
/// then drops them from the overlay. When the log's unreleased part grows
/// past [`CHECKPOINT_FRACTION`] of the log (or the writer goes quiet), it persists fjall
/// (`SyncAll`) and releases the log up to there: only then may the writer
/// overwrite it.
fn apply_loop(store: &Store, frames: Receiver<ToApplier>, space: Option<(WalSpace, u64, u64)>) {
    use std::sync::mpsc::RecvTimeoutError;
    let mut applied: Option<WalPos> = None;
    let mut released = space.as_ref().map_or(0, |s| s.2);
    let checkpoint = |applied: Option<WalPos>, released: &mut u64| -> Result<(), fjall::Error> {
        let (Some((space, _, _)), Some(pos)) = (&space, applied) else {
            // No log to release (`fsync = false`), or nothing applied.
            return Ok(());
        };
        if pos.end <= *released {
            return Ok(());
        }
        let started = Instant::now();
        store.db.persist(PersistMode::SyncAll)?;
        space.release(pos.end);
        // For matching the 202's slow episodes against checkpoints
        // (`EPISODES=1` in host/benches/half-rate.sh).
        tracing::debug!(
            log_bytes = pos.end - *released,
            ms = %format_args!("{:.2}", started.elapsed().as_secs_f64() * 1e3),
            "journal checkpoint"
        );
        *released = pos.end;
        Ok(())
    };
    let fail = |what: &str, e: fjall::Error| {
        tracing::error!(error = %e, "the journal's {what} failed: it takes no more writes");
        let _ = store
            .poisoned
            .set(format!("the journal's {what} failed: {e}"));
        if let Some((space, _, _)) = &space {
            space.close();
        }
    };
    let unapplied = metrics::gauge!("switchyard_journal_unapplied_batches");
    let mut batch = Vec::new();
    // A checkpoint asked for, answered once the frames before it are in.
    let mut asked = None;
    loop {
        unapplied.set(store.overlay.pending() as f64);
        match frames.recv_timeout(CHECKPOINT_IDLE) {
            Ok(ToApplier::Frame(frame)) => batch.push(frame),
            Ok(ToApplier::Checkpoint(reply)) => asked = Some(reply),
            Err(RecvTimeoutError::Timeout) => {
                if let Err(e) = checkpoint(applied, &mut released) {
                    fail("checkpoint", e);
                    return;
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
        while asked.is_none() && batch.len() < 64 {
            match frames.try_recv() {
                Ok(ToApplier::Frame(frame)) => batch.push(frame),
                Ok(ToApplier::Checkpoint(reply)) => asked = Some(reply),
                Err(_) => break,
            }
        }
        let res = match batch.is_empty() {
            // Only a checkpoint was asked for.
            true => Ok(None),
            false => store.apply_frames(batch.iter().map(|f| {
                (
                    &f.writes,
                    WalPos {
                        lsn: f.lsn,
                        end: f.end,
                    },
                )
            })),
        };
        batch.clear();
        match res {
            Ok(Some(pos)) => {
                store.overlay.applied(pos.lsn);
                applied = Some(pos);
            }
            Ok(None) => {}
            Err(e) => {
                fail("apply", e);
                return;
            }
        }
        if let Some(reply) = asked.take() {
            let res = checkpoint(applied, &mut released).and_then(|()| {
                // Without a log there is nothing to release, but the caller
                // still wants fjall on disk.
                match space {
                    Some(_) => Ok(()),
                    None => store.db.persist(PersistMode::SyncAll),
                }
            });
            let failed = res.as_ref().err().map(clone_store_error);
            let _ = reply.send(res.map_err(JournalError::from));
            if let Some(e) = failed {
                fail("checkpoint", e);
                return;
            }
            tracing::debug!("journal checkpointed on request");
            continue;
        }
        if let (Some((_, size, _)), Some(pos)) = (&space, applied)
            && pos.end - released >= size / CHECKPOINT_FRACTION
            && let Err(e) = checkpoint(applied, &mut released)
        {
            fail("checkpoint", e);
            return;
        }
    }
    if let Err(e) = checkpoint(applied, &mut released) {
        fail("checkpoint", e);
    }
    tracing::debug!("journal applier stopped");
}

/// fjall's error is not `Clone`; the op's caller gets one copy (as text, if
/// need be) and the batch another.
fn clone_store_error(e: &fjall::Error) -> fjall::Error {
    fjall::Error::Io(std::io::Error::other(e.to_string()))
}

/// Stages an event and its deliveries under `seq`, unless its dedup key was
/// seen within the window. Everything is encoded and checked before the first
/// write, so an error leaves the transaction as it was.
///
/// An event stamped before the last one staged (its request waited longer
/// for the writer) is stored with that later time: acceptance times never
/// decrease in sequence order. `last_ms` is the writer's, advanced here.
fn append(
    tx: &mut Tx<'_>,
    seq: Seq,
    last_ms: &mut u64,
    mut encoded: EncodedEvent,
    dedup: Option<DedupKey>,
) -> Result<Appended, JournalError> {
    check_key(encoded.id.as_bytes())?;
    if encoded.accepted_ms < *last_ms {
        encoded.restamp(*last_ms)?;
    }
    let accepted_ms = encoded.accepted_ms;
    let mut dedup_write = None;
    if let Some(d) = &dedup {
        let k = dedup_key(&d.source, &d.key);
        check_key(&k)?;
        if let Some(v) = tx.get(Ks::Dedup, &k)? {
            let mut entry: DedupEntry = decode(&v)?;
            if accepted_ms.saturating_sub(entry.first_ms) < d.window_ms {
                entry.duplicates += 1;
                entry.last_duplicate_ms = Some(accepted_ms);
                tx.insert(Ks::Dedup, &k, encode(&entry)?);
                return Ok(Appended::Duplicate { id: entry.id });
            }
        }
        let entry = DedupEntry {
            seq,
            id: encoded.id.clone(),
            first_ms: accepted_ms,
            duplicates: 0,
            last_duplicate_ms: None,
        };
        dedup_write = Some((k, encode(&entry)?));
    }
    let staged = stage(seq, encoded)?;
    if let Some((k, v)) = dedup_write {
        tx.insert(Ks::Dedup, k, v);
    }
    staged.write(tx);
    *last_ms = accepted_ms;
    Ok(Appended::New(seq))
}

/// An event and its planned deliveries, encoded, not yet given a sequence
/// number.
struct EncodedEvent {
    id: String,
    accepted_ms: u64,
    stored: Vec<u8>,
    records: Vec<(Vec<u8>, DeliveryRecord)>,
}

impl EncodedEvent {
    /// Gives the event a later acceptance time. Rare (see `append`), so the
    /// stored form is decoded and encoded again rather than patched.
    fn restamp(&mut self, accepted_ms: u64) -> Result<(), JournalError> {
        let mut stored: StoredEvent = decode(&self.stored)?;
        stored.accepted_ms = accepted_ms;
        self.stored = encode(&stored)?;
        self.accepted_ms = accepted_ms;
        Ok(())
    }

    /// About the bytes its writes take in a frame.
    fn bytes(&self) -> usize {
        self.stored.len()
            + 2 * self.id.len()
            + self
                .records
                .iter()
                .map(|(b, r)| b.len() + 2 * r.route.len() + 64)
                .sum::<usize>()
    }
}

/// An event and its deliveries, encoded and checked, ready to write.
struct StagedEvent {
    seq: Seq,
    id: String,
    /// Whether the id alone does not lead to the event (see `id_time_ms`).
    needs_id_entry: bool,
    stored: Vec<u8>,
    records: Vec<(DeliveryKey, Vec<u8>, IndexEntries)>,
}

/// `StoredEvent` as written, borrowing the event rather than copying it.
#[derive(Serialize)]
struct StoredEventRef<'a> {
    accepted_ms: u64,
    event: &'a Event,
    dedup_key: Option<&'a str>,
}

fn encode_event(
    event: &Event,
    accepted_ms: u64,
    planned: Vec<PlannedDelivery>,
    dedup_key: Option<&str>,
) -> Result<EncodedEvent, JournalError> {
    let stored = encode(&StoredEventRef {
        accepted_ms,
        event,
        dedup_key,
    })?;
    let mut records = Vec::with_capacity(planned.len());
    for p in planned {
        let record = DeliveryRecord {
            route: p.route,
            plugin: p.plugin,
            status: DeliveryStatus::Pending,
            attempts: Vec::new(),
            due_ms: Some(accepted_ms),
            created_ms: accepted_ms,
            order_key: p.order_key,
            replay: None,
            redriven_ms: Vec::new(),
            attempts_not_kept: 0,
        };
        records.push((encode(&record)?, record));
    }
    Ok(EncodedEvent {
        id: event.id.clone(),
        accepted_ms,
        stored,
        records,
    })
}

/// Gives an encoded event its sequence number (and its deliveries their keys).
fn stage(seq: Seq, encoded: EncodedEvent) -> Result<StagedEvent, JournalError> {
    let mut records = Vec::with_capacity(encoded.records.len());
    for (idx, (bytes, record)) in encoded.records.into_iter().enumerate() {
        let key = DeliveryKey {
            seq,
            idx: idx as u32,
        };
        records.push((key, bytes, index_entries(key, &record)?));
    }
    Ok(StagedEvent {
        seq,
        needs_id_entry: id_time_ms(&encoded.id)
            .is_none_or(|t| t.abs_diff(encoded.accepted_ms) > ID_WINDOW_MS),
        id: encoded.id,
        stored: encoded.stored,
        records,
    })
}

fn stage_event(
    seq: Seq,
    event: &Event,
    accepted_ms: u64,
    planned: Vec<PlannedDelivery>,
    dedup_key: Option<&str>,
) -> Result<StagedEvent, JournalError> {
    check_key(event.id.as_bytes())?;
    stage(seq, encode_event(event, accepted_ms, planned, dedup_key)?)
}

impl StagedEvent {
    fn write(self, tx: &mut Tx<'_>) {
        let seq = self.seq;
        tx.insert(Ks::Events, seq.to_be_bytes(), self.stored);
        // Each entry per event costs the 202's tail (docs/benchmarks.md, "a
        // sixth machine"), so an event gets no `by_time` entry (acceptance
        // times follow sequence order, see `append`, so `events` answers by
        // time) and an `event_ids` entry only when its id does not say when
        // it was accepted.
        if self.needs_id_entry {
            tx.insert(Ks::Ids, self.id.as_str(), seq.to_be_bytes());
        }
        for (key, record, indexes) in self.records {
            tx.insert(Ks::Deliveries, delivery_key(key.seq, key.idx), record);
            add_indexes(tx, indexes);
        }
    }
}

/// The index entries a delivery has in its state: `due` and `order` while it
/// is not final, `dead` while it is dead.
struct IndexEntries {
    due: Option<[u8; 20]>,
    dead: Option<([u8; 12], Vec<u8>)>,
    order: Option<Vec<u8>>,
}

fn index_entries(key: DeliveryKey, r: &DeliveryRecord) -> Result<IndexEntries, JournalError> {
    let open = !r.status.is_final();
    let order = match (&r.order_key, open) {
        (Some(k), true) => {
            let mut b = order_prefix(&r.route, k);
            b.extend_from_slice(&delivery_key(key.seq, key.idx));
            check_key(&b)?;
            Some(b)
        }
        _ => None,
    };
    Ok(IndexEntries {
        due: r
            .due_ms
            .filter(|_| open)
            .map(|d| due_key(d, key.seq, key.idx)),
        dead: (r.status == DeliveryStatus::Dead)
            .then(|| (delivery_key(key.seq, key.idx), r.route.as_bytes().to_vec())),
        order,
    })
}

fn add_indexes(tx: &mut Tx<'_>, e: IndexEntries) {
    if let Some(k) = e.due {
        tx.insert(Ks::Due, k, b"");
    }
    if let Some((k, route)) = e.dead {
        tx.insert(Ks::Dead, k, route);
    }
    if let Some(k) = e.order {
        tx.insert(Ks::Order, k, b"");
    }
}

fn remove_indexes(tx: &mut Tx<'_>, e: IndexEntries) {
    if let Some(k) = e.due {
        tx.remove(Ks::Due, k);
    }
    if let Some((k, _)) = e.dead {
        tx.remove(Ks::Dead, k);
    }
    if let Some(k) = e.order {
        tx.remove(Ks::Order, k);
    }
}

/// Replaces a delivery's record and moves its index entries along. Encodes
/// before it writes, so an error leaves the transaction as it was.
fn update_delivery(
    tx: &mut Tx<'_>,
    key: DeliveryKey,
    old: &DeliveryRecord,
    new: &DeliveryRecord,
) -> Result<(), JournalError> {
    let encoded = encode(new)?;
    let old_idx = index_entries(key, old)?;
    let new_idx = index_entries(key, new)?;
    remove_indexes(tx, old_idx);
    add_indexes(tx, new_idx);
    tx.insert(Ks::Deliveries, delivery_key(key.seq, key.idx), encoded);
    Ok(())
}

fn read_delivery(tx: &Tx<'_>, key: DeliveryKey) -> Result<Option<DeliveryRecord>, JournalError> {
    tx.get(Ks::Deliveries, delivery_key(key.seq, key.idx))?
        .map(|v| decode::<DeliveryRecord>(&v[..]))
        .transpose()
}

/// Stages a settlement. Reads (and the kv check) go through `tx`, so they see
/// earlier ops of the same batch. All checks and encoding come before the first
/// write, so `Stale`, `Conflict` or an error leave the transaction as it was.
/// Emitted events of a delivered attempt are appended under `next_seq` on.
fn settle(
    tx: &mut Tx<'_>,
    st: &Settlement,
    next_seq: &mut Seq,
    last_ms: &mut u64,
) -> Result<Settled, JournalError> {
    let Some(old) = read_delivery(tx, st.key)? else {
        return Ok(Settled::Stale);
    };
    if old.status.is_final() {
        return Ok(Settled::Stale);
    }
    let now_ms = crate::event::now_ms();
    let mut kv_writes = Vec::new();
    let delivered = matches!(st.outcome, Outcome::Delivered);
    if delivered {
        for (k, seen) in &st.kv.reads {
            let now = match kv_key(&st.plugin, k) {
                Ok(k) => kv_live(tx, &k, now_ms)?,
                Err(_) => None, // could not have been stored
            };
            if now.as_deref() != seen.as_deref() {
                return Ok(Settled::Conflict);
            }
        }
        for w in &st.kv.writes {
            kv_writes.push((kv_key(&st.plugin, &w.key)?, w));
        }
    }
    // Staged (checked and encoded) before the first write, like the rest.
    let mut staged = Vec::new();
    // Emitted events are accepted now, and no earlier than the last event
    // (see `append`).
    let accepted_ms = now_ms.max(*last_ms);
    if delivered {
        for (i, e) in st.emitted.iter().enumerate() {
            let seq = *next_seq + i as Seq;
            let mut event = stage_event(seq, &e.event, accepted_ms, e.deliveries.clone(), None)?;
            // The dispatcher looks each one up by id once committed
            // (`event_seq`): a point read, not a search.
            event.needs_id_entry = true;
            staged.push(event);
        }
    }
    let mut record = old.clone();
    record.add_attempt(&st.attempt);
    (record.status, record.due_ms) = match st.outcome {
        Outcome::Delivered => (DeliveryStatus::Delivered, None),
        Outcome::Dead => (DeliveryStatus::Dead, None),
        Outcome::Retry { due_ms } => (DeliveryStatus::Retrying, Some(due_ms)),
    };
    update_delivery(tx, st.key, &old, &record)?;
    if !delivered {
        return Ok(Settled::Committed);
    }
    // In order: the last write of a key wins.
    let mut usage: i128 = 0;
    for (k, w) in kv_writes {
        usage += kv_write(tx, &k, w)?;
    }
    if usage != 0 {
        let before = tx
            .get(Ks::KvUsage, st.plugin.as_bytes())?
            .map_or(0, |v| be_u64(&v));
        let after = (before as i128 + usage).max(0) as u64;
        tx.insert(Ks::KvUsage, st.plugin.as_bytes(), after.to_be_bytes());
    }
    *next_seq += staged.len() as Seq;
    if !staged.is_empty() {
        *last_ms = accepted_ms;
    }
    for e in staged {
        e.write(tx);
    }
    Ok(Settled::Committed)
}

/// The live value under a kv key: absent once its TTL ran out (the sweep
/// deletes it later).
fn kv_live(r: &impl Reads, k: &[u8], now_ms: u64) -> Result<Option<Vec<u8>>, JournalError> {
    let Some(v) = r.get(Ks::Kv, k)? else {
        return Ok(None);
    };
    if let Some(exp) = r.get(Ks::KvTtl, k)?
        && be_u64(&exp) <= now_ms
    {
        return Ok(None);
    }
    Ok(Some(v.to_vec()))
}

/// Stages one kv write with its TTL entries; returns the change in the
/// plugin's usage (bytes).
fn kv_write(tx: &mut Tx<'_>, k: &[u8], w: &crate::journal::KvWrite) -> Result<i128, JournalError> {
    let mut delta: i128 = 0;
    if let Some(old) = tx.get(Ks::Kv, k)? {
        delta -= (k.len() + old.len()) as i128;
    }
    if let Some(old_exp) = tx.get(Ks::KvTtl, k)? {
        tx.remove(Ks::KvExp, exp_key(be_u64(&old_exp), k));
        tx.remove(Ks::KvTtl, k);
    }
    match &w.value {
        Some(v) => {
            tx.insert(Ks::Kv, k, v.as_slice());
            delta += (k.len() + v.len()) as i128;
            if let Some(exp) = w.expires_ms {
                tx.insert(Ks::KvTtl, k, exp.to_be_bytes());
                tx.insert(Ks::KvExp, exp_key(exp, k), b"");
            }
        }
        None => tx.remove(Ks::Kv, k),
    }
    Ok(delta)
}

/// `expires ms ‖ kv key`.
fn exp_key(exp: u64, k: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + k.len());
    b.extend_from_slice(&exp.to_be_bytes());
    b.extend_from_slice(k);
    b
}

/// Stages the deletion of up to `limit` expired kv entries.
fn expire_kv(tx: &mut Tx<'_>, now_ms: u64, limit: usize) -> Result<usize, JournalError> {
    let mut expired = Vec::new();
    let end = exp_key(now_ms.saturating_add(1), b"");
    for entry in tx.range(Ks::KvExp, Bound::Unbounded, Bound::Excluded(&end)) {
        let k = entry?.0;
        if k.len() <= 8 {
            return Err(bad_key(&k));
        }
        expired.push(k.to_vec());
        if expired.len() >= limit {
            break;
        }
    }
    for e in &expired {
        let k = &e[8..];
        tx.remove(Ks::KvExp, e.as_slice());
        tx.remove(Ks::KvTtl, k);
        if let Some(old) = tx.get(Ks::Kv, k)? {
            tx.remove(Ks::Kv, k);
            let Some(end) = k.iter().position(|&b| b == 0) else {
                continue;
            };
            let plugin = &k[..end];
            let before = tx.get(Ks::KvUsage, plugin)?.map_or(0, |v| be_u64(&v));
            let after = before.saturating_sub((k.len() + old.len()) as u64);
            tx.insert(Ks::KvUsage, plugin, after.to_be_bytes());
        }
    }
    Ok(expired.len())
}

/// Stages the redrive of those of `keys` that are dead letters.
fn redrive(
    tx: &mut Tx<'_>,
    keys: &[DeliveryKey],
    now_ms: u64,
) -> Result<Vec<DueDelivery>, JournalError> {
    let mut out = Vec::new();
    for &key in keys {
        let Some(old) = read_delivery(tx, key)? else {
            continue;
        };
        if old.status != DeliveryStatus::Dead {
            continue;
        }
        let mut record = old.clone();
        record.status = DeliveryStatus::Pending;
        record.due_ms = Some(now_ms);
        record.redriven_ms.push(now_ms);
        update_delivery(tx, key, &old, &record)?;
        out.push(DueDelivery {
            key,
            due_ms: now_ms,
            record,
        });
    }
    Ok(out)
}

/// Stages new deliveries of archived events, marked with the replay's id.
fn replay(
    tx: &mut Tx<'_>,
    job: Option<u64>,
    spec: ReplaySpec,
    items: Vec<(Seq, Vec<PlannedDelivery>)>,
    now_ms: u64,
) -> Result<(u64, Vec<DueDelivery>), JournalError> {
    let mut record = match job {
        Some(id) => match tx.get(Ks::Replays, id.to_be_bytes())? {
            Some(v) => decode::<ReplayJob>(&v)?,
            None => return Err(JournalError::Encoding(format!("no replay {id}"))),
        },
        None => {
            let mut last = tx.view.range_in(
                Some(&tx.writes),
                Ks::Replays,
                Bound::Unbounded,
                Bound::Unbounded,
                true,
            );
            let id = match last.next() {
                Some(entry) => seq_from(&entry?.0)? + 1,
                None => 1,
            };
            ReplayJob {
                id,
                spec,
                created_ms: now_ms,
                events: 0,
                deliveries: Vec::new(),
            }
        }
    };
    let mut writes = Vec::new();
    let mut out = Vec::new();
    for (seq, planned) in items {
        if planned.is_empty() || tx.get(Ks::Events, seq.to_be_bytes())?.is_none() {
            continue; // compacted meanwhile
        }
        let first = match tx.prefix(Ks::Deliveries, seq.to_be_bytes(), true).next() {
            Some(entry) => delivery_from(&entry?.0)?.1 + 1,
            None => 0,
        };
        record.events += 1;
        for (idx, p) in (first..).zip(planned) {
            let key = DeliveryKey { seq, idx };
            let d = DeliveryRecord {
                route: p.route,
                plugin: p.plugin,
                status: DeliveryStatus::Pending,
                attempts: Vec::new(),
                due_ms: Some(now_ms),
                created_ms: now_ms,
                order_key: p.order_key,
                replay: Some(record.id),
                redriven_ms: Vec::new(),
                attempts_not_kept: 0,
            };
            writes.push((key, encode(&d)?, index_entries(key, &d)?));
            record.deliveries.push(key);
            out.push(DueDelivery {
                key,
                due_ms: now_ms,
                record: d,
            });
        }
    }
    let job_bytes = encode(&record)?;
    for (key, bytes, indexes) in writes {
        tx.insert(Ks::Deliveries, delivery_key(key.seq, key.idx), bytes);
        add_indexes(tx, indexes);
    }
    tx.insert(Ks::Replays, record.id.to_be_bytes(), job_bytes);
    Ok((record.id, out))
}

/// Stages one compaction step; see [`Journal::compact`].
fn compact(
    tx: &mut Tx<'_>,
    cutoff_ms: u64,
    resume: Option<(u64, Seq)>,
    limit: usize,
) -> Result<Compacted, JournalError> {
    // Oldest first along `events`: acceptance times follow sequence order
    // (see `append`), so the first event at or after the cutoff ends it.
    let start = resume.map_or(0, |r| r.1).to_be_bytes();
    let mut candidates = Vec::new();
    let mut resume = None;
    for entry in tx.range(
        Ks::Events,
        Bound::Included(start.as_slice()),
        Bound::Unbounded,
    ) {
        let (k, v) = entry?;
        let stored: StoredEvent = decode(&v)?;
        if stored.accepted_ms >= cutoff_ms {
            break;
        }
        let pos = (stored.accepted_ms, seq_from(&k)?);
        if candidates.len() == limit {
            resume = Some(pos);
            break;
        }
        candidates.push((pos, stored));
    }
    let mut done = Compacted {
        resume,
        ..Compacted::default()
    };
    'events: for ((ms, seq), stored) in candidates {
        let mut keys = Vec::new();
        for entry in tx.prefix(Ks::Deliveries, seq.to_be_bytes(), false) {
            let (k, v) = entry?;
            if decode::<DeliveryRecord>(&v)?.status != DeliveryStatus::Delivered {
                continue 'events; // unfinished or dead: keep the event
            }
            keys.push(k);
        }
        // Looked up first, as most events have none (see `StagedEvent`). It
        // may be a later event's with the same id: that one keeps it.
        if let Some(v) = tx.get(Ks::Ids, stored.event.id.as_str())?
            && seq_from(&v)? == seq
        {
            tx.remove(Ks::Ids, stored.event.id.as_str());
        }
        if let Some(key) = &stored.dedup_key {
            let dk = dedup_key(&stored.event.source, key);
            let ours = match tx.get(Ks::Dedup, &dk)? {
                Some(v) => decode::<DedupEntry>(&v)?.seq == seq,
                None => false,
            };
            if ours {
                tx.remove(Ks::Dedup, dk);
            }
        }
        tx.remove(Ks::Events, seq.to_be_bytes());
        // Stores written before events answered by time kept a `by_time`
        // entry per event; looked up first so that a newer event, which has
        // none, costs no removal.
        let time = time_key(ms, seq);
        if tx.get(Ks::ByTime, time)?.is_some() {
            tx.remove(Ks::ByTime, time);
        }
        done.deliveries += keys.len() as u64;
        for k in keys {
            tx.remove(Ks::Deliveries, k);
        }
        done.events += 1;
    }
    Ok(done)
}

/// The events from sequence number `seq` on, oldest first.
fn events_from(view: &View<'_>, seq: Seq) -> Merged {
    let from = seq.to_be_bytes();
    view.range_in(
        None,
        Ks::Events,
        Bound::Included(from.as_slice()),
        Bound::Unbounded,
        false,
    )
}

/// How far from its acceptance time an id's own time may be for the id to
/// find its event without an `event_ids` entry.
const ID_WINDOW_MS: u64 = 50;

/// The millisecond a UUIDv7 id was made (the ids Switchyard gives events
/// are UUIDv7, made just before the event is accepted); `None` for any
/// other id, such as one a producer chose.
fn id_time_ms(id: &str) -> Option<u64> {
    let uuid = uuid::Uuid::try_parse(id).ok()?;
    if uuid.get_version_num() != 7 {
        return None;
    }
    let b = uuid.as_bytes();
    Some(u64::from_be_bytes([
        0, 0, b[0], b[1], b[2], b[3], b[4], b[5],
    ]))
}

/// The event with this id: its `event_ids` entry, or else, for an id that
/// says when it was made, the events accepted within [`ID_WINDOW_MS`] of
/// then (the latest, if a producer sent an id twice).
fn seq_of_id(view: &View<'_>, id: &str) -> Result<Option<Seq>, JournalError> {
    if let Some(v) = view.get_in(None, Ks::Ids, id.as_bytes())? {
        return Ok(Some(seq_from(&v)?));
    }
    let Some(made) = id_time_ms(id) else {
        return Ok(None);
    };
    let Some(start) = first_accepted_at(view, made.saturating_sub(ID_WINDOW_MS))? else {
        return Ok(None);
    };
    let mut found = None;
    for entry in events_from(view, start) {
        let (k, v) = entry?;
        let head: StoredHead = decode(&v)?;
        if head.accepted_ms > made.saturating_add(ID_WINDOW_MS) {
            break;
        }
        if head.event.id == id {
            found = Some(seq_from(&k)?);
        }
    }
    Ok(found)
}

/// The first event accepted at or after `since_ms`, by a binary search over
/// the sequence numbers (acceptance times never decrease along them; see
/// `append`); each step is one seek, to the first event at or after a
/// sequence number, as events deleted by compaction leave gaps.
fn first_accepted_at(view: &View<'_>, since_ms: u64) -> Result<Option<Seq>, JournalError> {
    let at_or_after = |seq: Seq| -> Result<Option<(Seq, u64)>, JournalError> {
        match events_from(view, seq).next() {
            Some(entry) => {
                let (k, v) = entry?;
                Ok(Some((seq_from(&k)?, decode::<StoredHead>(&v)?.accepted_ms)))
            }
            None => Ok(None),
        }
    };
    let (mut lo, mut hi) = (0, Seq::MAX);
    let mut found = None;
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match at_or_after(mid)? {
            // No event in [mid, hi): the answer, if any, is below mid.
            Some((seq, _)) if seq >= hi => hi = mid,
            None => hi = mid,
            Some((seq, ms)) if ms >= since_ms => {
                // No event in [mid, seq): seq is the best so far.
                found = Some(seq);
                hi = mid;
            }
            Some((seq, _)) => lo = seq.saturating_add(1),
        }
    }
    Ok(found)
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

fn time_key(ms: u64, seq: Seq) -> [u8; 16] {
    let mut k = [0; 16];
    k[..8].copy_from_slice(&ms.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// `route ‖ 0x00 ‖ key length ‖ key`: the length keeps a key that is a
/// prefix of another from sharing its range.
fn order_prefix(route: &str, key: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(route.len() + 5 + key.len() + 12);
    b.extend_from_slice(route.as_bytes());
    b.push(0);
    b.extend_from_slice(&(key.len() as u32).to_be_bytes());
    b.extend_from_slice(key.as_bytes());
    b
}

fn dedup_key(source: &str, key: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(source.len() + 1 + key.len());
    b.extend_from_slice(source.as_bytes());
    b.push(0);
    b.extend_from_slice(key.as_bytes());
    b
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
    use crate::journal::{Attempt, KvChanges, KvWrite};
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

    fn new(a: Appended) -> Seq {
        match a {
            Appended::New(seq) => seq,
            other => panic!("not stored: {other:?}"),
        }
    }

    fn planned(n: usize) -> Vec<PlannedDelivery> {
        (0..n)
            .map(|i| PlannedDelivery {
                route: format!("r{i}"),
                plugin: "p".into(),
                order_key: None,
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
                plugin_hash: None,
                emitted: Vec::new(),
            },
            outcome,
            kv,
            emitted: Vec::new(),
        }
    }

    #[tokio::test]
    async fn append_is_durable_and_reopens_with_due_deliveries() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = Journal::open(dir.path()).unwrap();
            let s1 = new(j.append(event("a"), 10, planned(2), None).await.unwrap());
            let s2 = new(j.append(event("b"), 11, planned(1), None).await.unwrap());
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
        assert_eq!(
            new(j.append(event("c"), 12, vec![], None).await.unwrap()),
            3
        );
        let t = j.timeline("a").unwrap().unwrap();
        assert_eq!(t.deliveries.len(), 2);
        assert_eq!(t.deliveries[1].1.route, "r1");
    }

    #[tokio::test]
    async fn settle_applies_kv_only_on_success_and_detects_conflicts() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let seq = new(j.append(event("a"), 1, planned(1), None).await.unwrap());
        let write = |v: &str| KvChanges {
            reads: vec![("k".into(), None)],
            writes: vec![KvWrite::set("k", v)],
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
        let seq2 = new(j.append(event("b"), 2, planned(1), None).await.unwrap());
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
    async fn emitted_events_commit_only_with_a_delivered_settlement() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let a = new(j.append(event("a"), 1, planned(2), None).await.unwrap());
        let emitted = |id: &str| crate::journal::Emitted {
            event: event(id),
            deliveries: planned(1),
        };
        let mut retry = settlement(a, Outcome::Retry { due_ms: 5 }, KvChanges::default());
        retry.emitted = vec![emitted("lost")];
        j.settle(retry).await.unwrap();
        assert_eq!(
            j.event_seq("lost").unwrap(),
            None,
            "no emit without the ack"
        );
        let mut ok = settlement(a, Outcome::Delivered, KvChanges::default());
        ok.emitted = vec![emitted("c1"), emitted("c2")];
        assert_eq!(j.settle(ok).await.unwrap(), Settled::Committed);
        let (c1, c2) = (
            j.event_seq("c1").unwrap().unwrap(),
            j.event_seq("c2").unwrap().unwrap(),
        );
        assert_eq!((c1, c2), (a + 1, a + 2));
        // Their deliveries are planned and due; the next append goes on after.
        let due: Vec<Seq> = j
            .due_deliveries()
            .unwrap()
            .iter()
            .map(|d| d.key.seq)
            .collect();
        assert_eq!(
            due,
            [a, c1, c2],
            "the other delivery of `a`, then the children"
        );
        let b = new(j.append(event("b"), 9, planned(0), None).await.unwrap());
        assert_eq!(b, c2 + 1);
        // And they survive a restart.
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.event_seq("c2").unwrap(), Some(c2));
    }

    #[tokio::test]
    async fn kv_ttl_listing_and_usage() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let now = crate::event::now_ms();
        let seq = new(j.append(event("a"), 1, planned(1), None).await.unwrap());
        let mut writes = vec![
            KvWrite::set("l/a", "1"),
            KvWrite::set("l/b", "22"),
            KvWrite::set("l/c", "333"),
            KvWrite::set("m", "x"),
        ];
        writes.push(KvWrite {
            key: "l/old".into(),
            value: Some(b"gone".to_vec()),
            expires_ms: Some(now.saturating_sub(1)),
        });
        writes.push(KvWrite {
            key: "l/later".into(),
            value: Some(b"v".to_vec()),
            expires_ms: Some(now + 3_600_000),
        });
        let kv = KvChanges {
            reads: vec![],
            writes,
        };
        j.settle(settlement(seq, Outcome::Delivered, kv))
            .await
            .unwrap();
        // Expired keys read as absent and are not listed.
        assert_eq!(j.kv_get("p", "l/old").unwrap(), None);
        assert_eq!(j.kv_get("p", "l/later").unwrap(), Some(b"v".to_vec()));
        assert_eq!(
            j.kv_list("p", "l/", None, 10).unwrap(),
            ["l/a", "l/b", "l/c", "l/later"]
        );
        assert_eq!(
            j.kv_list("p", "l/", Some("l/b"), 2).unwrap(),
            ["l/c", "l/later"]
        );
        assert_eq!(j.kv_list("p", "l/", Some("a"), 1).unwrap(), ["l/a"]);
        assert!(
            j.kv_list("q", "", None, 10).unwrap().is_empty(),
            "per plugin"
        );
        // Usage counts "p\0" + key + value of every entry, expired ones until swept.
        let entry = |k: &str, v: &str| (2 + k.len() + v.len()) as u64;
        let all = entry("l/a", "1")
            + entry("l/b", "22")
            + entry("l/c", "333")
            + entry("m", "x")
            + entry("l/old", "gone")
            + entry("l/later", "v");
        assert_eq!(j.kv_usage("p").unwrap(), all);
        assert_eq!(j.expire_kv(now, 100).await.unwrap(), 1);
        assert_eq!(j.expire_kv(now, 100).await.unwrap(), 0);
        assert_eq!(j.kv_usage("p").unwrap(), all - entry("l/old", "gone"));
        // Overwriting without a TTL drops the expiry; deleting frees usage.
        let seq = new(j.append(event("b"), 2, planned(1), None).await.unwrap());
        let kv = KvChanges {
            reads: vec![],
            writes: vec![KvWrite::set("l/later", "vv"), KvWrite::delete("l/c")],
        };
        j.settle(settlement(seq, Outcome::Delivered, kv))
            .await
            .unwrap();
        assert_eq!(j.expire_kv(now + 7_200_000, 100).await.unwrap(), 0);
        assert_eq!(j.kv_get("p", "l/later").unwrap(), Some(b"vv".to_vec()));
        assert_eq!(
            j.kv_usage("p").unwrap(),
            all - entry("l/old", "gone") - entry("l/c", "333") + 1
        );
    }

    /// Group commit: ops that wait in the queue together go into one batch,
    /// one log write. (Queued before the writer runs, so the count does not
    /// depend on how fast the disk is.)
    #[test]
    fn queued_appends_share_one_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = bare_writer(dir.path());
        let (tx, queue) = std::sync::mpsc::sync_channel(QUEUE_CAPACITY);
        let mut rxs = Vec::new();
        for i in 0..200 {
            let (reply, rx) = oneshot::channel();
            let encoded = encode_event(&event(&format!("e{i}")), 1, planned(1), None).unwrap();
            tx.send(WriteOp::Append {
                encoded,
                dedup: None,
                reply,
            })
            .unwrap();
            rxs.push(rx);
        }
        drop(tx);
        writer.run(queue);
        let seqs: Vec<_> = rxs
            .iter_mut()
            .map(|rx| new(rx.try_recv().unwrap().unwrap()))
            .collect();
        assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
        assert_eq!(
            store.commits.load(std::sync::atomic::Ordering::Relaxed),
            1,
            "200 queued appends took more than one commit"
        );
        let (j, _queue) = journal_without_writer(store);
        assert_eq!(j.stats().unwrap().events, 200);
    }

    /// The reaper is given every keyspace's active memtable, and after a
    /// rotation the new one, so no flushed memtable is freed under fjall's lock.
    #[test]
    fn the_reaper_sees_each_keyspace_and_follows_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("journal"), true).unwrap();
        let before = store.active_memtables();
        assert_eq!(before.len(), KEYSPACES);
        for (i, a) in before.iter().enumerate() {
            assert!(
                before[i + 1..].iter().all(|b| !Arc::ptr_eq(a, b)),
                "keyspace {i} listed twice"
            );
        }
        let events = store.ks(Ks::Events);
        let active = events.inner().tree.active_memtable() as reaper::Held;
        assert!(Arc::ptr_eq(&before[0], &active));
        events.insert("k", "v").unwrap();
        events.inner().rotate_memtable_and_wait().unwrap();
        let after = store.active_memtables();
        assert!(!Arc::ptr_eq(&before[0], &after[0]), "events rotated");
        assert!(Arc::ptr_eq(&before[1], &after[1]), "ids did not");
    }

    /// A store and a writer driven by the test itself, with a commit log
    /// and no applier: what it commits is only in the log and the overlay.
    fn bare_writer(dir: &std::path::Path) -> (Arc<Store>, Writer) {
        let store = Store::open(&dir.join("journal"), true).unwrap();
        std::fs::create_dir_all(dir.join("wal")).unwrap();
        let mut wal = Wal::open(&dir.join("wal").join("log"), WAL_SIZE).unwrap();
        assert!(
            wal.recover(store.wal_position().unwrap())
                .unwrap()
                .is_empty()
        );
        let next_seq = store.next_seq().unwrap();
        let last_ms = store.last_accepted_ms().unwrap();
        let store = Arc::new(store);
        let writer = Writer {
            store: store.clone(),
            next_seq,
            last_ms,
            store_time: Duration::ZERO,
            wal: Some(wal),
            applier: std::sync::mpsc::channel().0,
            lsn: 0,
            carry: Vec::new(),
            logged: None,
            flushed: Vec::new(),
        };
        (store, writer)
    }

    /// Slow commits are logged at debug level from 2 ms, as warnings from
    /// one second; the time is the store's commit as well as the whole batch.
    #[test]
    fn slow_commits_are_classified_and_the_store_part_is_timed() {
        use tracing::Level;
        assert_eq!(slow_commit(Duration::from_micros(1_999)), None);
        assert_eq!(slow_commit(Duration::from_millis(2)), Some(Level::DEBUG));
        assert_eq!(slow_commit(Duration::from_millis(999)), Some(Level::DEBUG));
        assert_eq!(slow_commit(Duration::from_secs(1)), Some(Level::WARN));

        let dir = tempfile::tempdir().unwrap();
        let (_store, mut writer) = bare_writer(dir.path());
        let (reply, _rx) = oneshot::channel();
        let encoded = encode_event(&event("slow-1"), 1, planned(1), None).unwrap();
        let mut batch = vec![WriteOp::Append {
            encoded,
            dedup: None,
            reply,
        }];
        writer.commit_batch(&mut batch);
        // An fsynced commit of a new event takes time in the store.
        assert!(writer.store_time > Duration::ZERO);
    }

    /// Ops of one batch see each other: a settlement sees the delivery
    /// appended before it, and the kv writes of the settlement before it.
    #[test]
    fn ops_in_one_batch_see_earlier_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (store, mut writer) = bare_writer(dir.path());
        let write = |v: &str| KvChanges {
            reads: vec![("k".into(), None)],
            writes: vec![KvWrite::set("k", v)],
        };
        let mut batch = Vec::new();
        let mut appends = Vec::new();
        let mut settles = Vec::new();
        for (id, n) in [("a", 1), ("", 1), ("b", 1)] {
            let (reply, rx) = oneshot::channel();
            batch.push(WriteOp::Append {
                encoded: encode_event(&event(id), 5, planned(n), None).unwrap(),
                dedup: None,
                reply,
            });
            appends.push(rx);
        }
        for s in [
            settlement(1, Outcome::Delivered, write("x")),
            settlement(2, Outcome::Delivered, write("y")),
            settlement(1, Outcome::Dead, KvChanges::default()),
            settlement(9, Outcome::Dead, KvChanges::default()),
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
        assert_eq!(appended[0].as_ref().unwrap(), &Appended::New(1));
        // An empty id cannot be a key: that op alone fails, and takes no seq.
        assert!(matches!(appended[1], Err(JournalError::Encoding(_))));
        assert_eq!(appended[2].as_ref().unwrap(), &Appended::New(2));
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
                dead: 0,
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
                    encoded: encode_event(&event(id), 1, planned(1), None).unwrap(),
                    dedup: None,
                    reply,
                });
                rxs.push(rx);
            }
            let (reply, mut rx) = oneshot::channel();
            batch.push(WriteOp::Settle {
                settlement: Box::new(settlement(1, Outcome::Dead, KvChanges::default())),
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
        assert_eq!(appended[0].as_ref().unwrap(), &Appended::New(1));
        assert_eq!(settled.unwrap(), Settled::Committed);
        assert!(j.timeline("a").unwrap().is_none());
        assert_eq!(j.timeline("c").unwrap().unwrap().seq, 1);
    }

    fn dedup(key: &str, window_ms: u64) -> Option<DedupKey> {
        Some(DedupKey {
            source: "s".into(),
            key: key.into(),
            window_ms,
        })
    }

    /// A repeat within the window names the first event and stores nothing;
    /// after the window it is a new event; the count shows in the timeline.
    #[tokio::test]
    async fn dedup_answers_repeats_with_the_first_id() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let first = j
            .append(event("a"), 1_000, planned(1), dedup("k1", 100))
            .await
            .unwrap();
        assert_eq!(first, Appended::New(1));
        let again = j
            .append(event("b"), 1_050, planned(1), dedup("k1", 100))
            .await
            .unwrap();
        assert_eq!(again, Appended::Duplicate { id: "a".into() });
        // Another key, or another source, is not a repeat.
        let other = j
            .append(event("c"), 1_050, planned(1), dedup("k2", 100))
            .await
            .unwrap();
        assert_eq!(other, Appended::New(2));
        let stats = j.stats().unwrap();
        assert_eq!((stats.events, stats.deliveries), (2, 2));
        let t = j.timeline("a").unwrap().unwrap();
        let d = t.dedup.unwrap();
        assert_eq!((d.key.as_str(), d.duplicates), ("k1", 1));
        assert_eq!(d.last_duplicate_ms, Some(1_050));
        assert!(j.timeline("b").unwrap().is_none());
        // Past the window the key starts over.
        let late = j
            .append(event("d"), 1_100, planned(1), dedup("k1", 100))
            .await
            .unwrap();
        assert_eq!(late, Appended::New(3));
        let again = j
            .append(event("e"), 1_150, planned(1), dedup("k1", 100))
            .await
            .unwrap();
        assert_eq!(again, Appended::Duplicate { id: "d".into() });
    }

    /// Dead letters are listed (per route, paged), redriven with a fresh
    /// budget, and leave the dead index when redriven.
    #[tokio::test]
    async fn dead_letters_page_and_redrive() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            let seq = new(j.append(event(id), 10, planned(2), None).await.unwrap());
            assert_eq!(seq, i as u64 + 1);
            for idx in 0..2 {
                let mut st = settlement(seq, Outcome::Dead, KvChanges::default());
                st.key.idx = idx;
                st.attempt.error = Some("boom".into());
                assert_eq!(j.settle(st).await.unwrap(), Settled::Committed);
            }
        }
        assert_eq!(j.stats().unwrap().dead, 6);
        let page = j.dead_letters(Some("r1"), None, 2).unwrap();
        let keys: Vec<_> = page.items.iter().map(|d| (d.key.seq, d.key.idx)).collect();
        assert_eq!(keys, [(1, 1), (2, 1)]);
        assert_eq!(page.items[0].event.id, "a");
        let rest = j.dead_letters(Some("r1"), page.next, 2).unwrap();
        assert_eq!(rest.items.len(), 1);
        assert_eq!(rest.items[0].key, DeliveryKey { seq: 3, idx: 1 });
        assert_eq!(rest.next, None);

        let due = j
            .redrive(RedriveSelect::Route(Some("r0".into())))
            .await
            .unwrap();
        assert_eq!(due.len(), 3);
        assert!(
            due.iter()
                .all(|d| d.record.status == DeliveryStatus::Pending)
        );
        assert_eq!(due[0].record.attempts.len(), 1);
        assert_eq!(due[0].record.budget_attempts(), 0);
        assert_eq!(j.stats().unwrap().dead, 3);
        assert_eq!(j.due_deliveries().unwrap().len(), 3);
        assert!(
            j.dead_letter(DeliveryKey { seq: 1, idx: 0 })
                .unwrap()
                .is_none()
        );
        // Redriving what is not dead does nothing.
        let none = j
            .redrive(RedriveSelect::Keys(vec![DeliveryKey { seq: 1, idx: 0 }]))
            .await
            .unwrap();
        assert!(none.is_empty());
        let all = j.redrive(RedriveSelect::Route(None)).await.unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(j.stats().unwrap().dead, 0);
    }

    /// The order index names the first unfinished delivery per (route, key);
    /// keys that are prefixes of each other do not mix.
    #[tokio::test]
    async fn order_head_follows_acceptance_order() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let ordered = |k: &str| {
            vec![PlannedDelivery {
                route: "r".into(),
                plugin: "p".into(),
                order_key: Some(k.into()),
            }]
        };
        let a1 = new(j.append(event("1"), 5, ordered("a"), None).await.unwrap());
        let ab = new(j.append(event("2"), 5, ordered("ab"), None).await.unwrap());
        let a2 = new(j.append(event("3"), 5, ordered("a"), None).await.unwrap());
        let head = |k: &str| j.order_head("r", k).unwrap().map(|d| d.seq);
        assert_eq!(head("a"), Some(a1));
        assert_eq!(head("ab"), Some(ab));
        // A retry keeps its place; success hands over to the next one.
        let retry = settlement(a1, Outcome::Retry { due_ms: 99 }, KvChanges::default());
        j.settle(retry).await.unwrap();
        assert_eq!(head("a"), Some(a1));
        j.settle(settlement(a1, Outcome::Delivered, KvChanges::default()))
            .await
            .unwrap();
        assert_eq!(head("a"), Some(a2));
        j.settle(settlement(a2, Outcome::Dead, KvChanges::default()))
            .await
            .unwrap();
        assert_eq!(head("a"), None);
        // A redriven letter takes its place in the order again.
        j.redrive(RedriveSelect::Keys(vec![DeliveryKey { seq: a2, idx: 0 }]))
            .await
            .unwrap();
        assert_eq!(head("a"), Some(a2));
        assert_eq!(head("x"), None);
    }

    /// A replay adds deliveries after the event's own, marked with its id,
    /// and keeps the list for progress.
    #[tokio::test]
    async fn replay_plans_new_deliveries_of_archived_events() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        for (id, ms) in [("a", 100), ("b", 200), ("c", 300)] {
            let seq = new(j.append(event(id), ms, planned(1), None).await.unwrap());
            j.settle(settlement(seq, Outcome::Delivered, KvChanges::default()))
                .await
                .unwrap();
        }
        let found = j.archived(150, Some(300), None, 10).unwrap();
        assert_eq!(found.iter().map(|e| e.seq).collect::<Vec<_>>(), [2]);
        let all = j.archived(0, None, None, 2).unwrap();
        assert_eq!(all.len(), 2);
        let rest = j
            .archived(0, None, Some((all[1].accepted_ms, all[1].seq)), 2)
            .unwrap();
        assert_eq!(rest.iter().map(|e| e.seq).collect::<Vec<_>>(), [3]);

        let spec = ReplaySpec {
            since_ms: 0,
            until_ms: None,
            route: None,
            source: None,
        };
        let (id, due) = j
            .plan_replay(None, spec.clone(), vec![(1, planned(1)), (3, planned(2))])
            .await
            .unwrap();
        assert_eq!(id, 1);
        let keys: Vec<_> = due.iter().map(|d| (d.key.seq, d.key.idx)).collect();
        assert_eq!(keys, [(1, 1), (3, 1), (3, 2)]);
        assert!(due.iter().all(|d| d.record.replay == Some(1)));
        let (again, due) = j
            .plan_replay(Some(id), spec, vec![(2, planned(1))])
            .await
            .unwrap();
        assert_eq!((again, due.len()), (1, 1));
        let job = j.replay_job(1).unwrap().unwrap();
        assert_eq!((job.events, job.deliveries.len()), (3, 4));
        assert_eq!(j.timeline("c").unwrap().unwrap().deliveries.len(), 3);
    }

    /// Compaction deletes old events whose deliveries are all delivered, in
    /// steps, and keeps dead letters, unfinished deliveries and recent events.
    #[tokio::test]
    async fn compaction_keeps_what_is_not_done() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let mut seqs = Vec::new();
        for (i, ms) in [10, 20, 30, 40, 50, 500].into_iter().enumerate() {
            let id = format!("e{i}");
            let seq = new(j
                .append(event(&id), ms, planned(1), dedup(&id, 1_000_000))
                .await
                .unwrap());
            seqs.push(seq);
        }
        for &seq in &seqs[..3] {
            j.settle(settlement(seq, Outcome::Delivered, KvChanges::default()))
                .await
                .unwrap();
        }
        j.settle(settlement(seqs[3], Outcome::Dead, KvChanges::default()))
            .await
            .unwrap();
        j.settle(settlement(
            seqs[5],
            Outcome::Delivered,
            KvChanges::default(),
        ))
        .await
        .unwrap();
        // Event 4 (ms 50) is unfinished, event 5 (ms 500) is recent.
        let step = j.compact(100, None, 2).await.unwrap();
        assert_eq!((step.events, step.deliveries), (2, 2));
        assert_eq!(step.resume, Some((30, seqs[2])));
        let step = j.compact(100, step.resume, 2).await.unwrap();
        assert_eq!(step.events, 1);
        let step = j.compact(100, step.resume, 2).await.unwrap();
        assert_eq!((step.events, step.resume), (0, None));
        let stats = j.stats().unwrap();
        assert_eq!((stats.events, stats.deliveries, stats.dead), (3, 3, 1));
        assert!(j.timeline("e0").unwrap().is_none());
        assert!(j.timeline("e3").unwrap().is_some());
        // The dedup entry went with its event: the key is free again.
        let again = j
            .append(event("x"), 600, planned(0), dedup("e0", 1_000_000))
            .await
            .unwrap();
        assert!(matches!(again, Appended::New(_)));
        let kept = j
            .append(event("y"), 600, planned(0), dedup("e3", 1_000_000))
            .await
            .unwrap();
        assert_eq!(kept, Appended::Duplicate { id: "e3".into() });
    }

    /// An event stamped before one already stored takes the later time, also
    /// after a restart, so acceptance times follow sequence order and a time
    /// window is a range of sequence numbers.
    #[tokio::test]
    async fn acceptance_times_never_go_back() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = Journal::open(dir.path()).unwrap();
            for (id, ms) in [("a", 100), ("b", 300), ("c", 200)] {
                new(j.append(event(id), ms, planned(0), None).await.unwrap());
            }
            let times = |found: Vec<ArchivedEvent>| {
                found
                    .iter()
                    .map(|e| (e.seq, e.accepted_ms))
                    .collect::<Vec<_>>()
            };
            assert_eq!(
                times(j.archived(0, None, None, 10).unwrap()),
                [(1, 100), (2, 300), (3, 300)]
            );
            assert_eq!(
                times(j.archived(250, None, None, 10).unwrap()),
                [(2, 300), (3, 300)]
            );
            assert_eq!(
                times(j.archived(0, Some(300), None, 10).unwrap()),
                [(1, 100)]
            );
            j.checkpoint().await.unwrap();
        }
        let j = Journal::open(dir.path()).unwrap();
        let seq = new(j.append(event("d"), 50, planned(0), None).await.unwrap());
        let found = j.archived(300, None, Some((300, 3)), 10).unwrap();
        assert_eq!(
            found
                .iter()
                .map(|e| (e.seq, e.accepted_ms))
                .collect::<Vec<_>>(),
            [(seq, 300)]
        );
    }

    /// An id that says when it was made (a UUIDv7 near the acceptance time)
    /// finds its event without an `event_ids` entry; any other id, or one
    /// made long before, keeps its entry. Either way the lookup answers.
    #[tokio::test]
    async fn ids_find_their_events_with_or_without_an_entry() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let ms = 1_764_000_000_000u64;
        let made_at = |t: u64| {
            let mut b = *uuid::Uuid::now_v7().as_bytes();
            b[..6].copy_from_slice(&t.to_be_bytes()[2..]);
            uuid::Uuid::from_bytes(b).to_string()
        };
        let near = made_at(ms - 3);
        let far = made_at(ms - 60_000);
        assert_eq!(id_time_ms(&near), Some(ms - 3));
        assert_eq!(id_time_ms("order-42"), None);
        let mut seqs = Vec::new();
        for (i, id) in [near.as_str(), far.as_str(), "order-42"]
            .into_iter()
            .enumerate()
        {
            // Other events around them, as under load.
            new(j
                .append(event(&made_at(ms)), ms, planned(0), None)
                .await
                .unwrap());
            seqs.push(new(j
                .append(event(id), ms + i as u64, planned(0), None)
                .await
                .unwrap()));
        }
        let entry = |id: &str| j.store.get(Ks::Ids, id.as_bytes()).unwrap().is_some();
        assert!(!entry(&near), "its id says when it was made");
        assert!(entry(&far) && entry("order-42"));
        assert_eq!(j.event_seq(&near).unwrap(), Some(seqs[0]));
        assert_eq!(j.event_seq(&far).unwrap(), Some(seqs[1]));
        assert_eq!(j.event_seq("order-42").unwrap(), Some(seqs[2]));
        assert_eq!(j.timeline(&near).unwrap().unwrap().seq, seqs[0]);
        assert_eq!(j.event_seq(&made_at(ms + 1)).unwrap(), None);
        // Compaction finds and deletes it as well.
        let step = j.compact(ms + 10, None, 100).await.unwrap();
        assert_eq!(step.events, 6);
        assert_eq!(j.event_seq(&near).unwrap(), None);
        assert!(!entry(&far) && !entry("order-42"));
    }

    /// A replay's window is found by a binary search over the events, across
    /// the gaps that compaction leaves, and read a page at a time.
    #[tokio::test]
    async fn replay_windows_are_found_across_compacted_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        for i in 0..40u64 {
            new(j
                .append(event(&format!("e{i}")), 10 * i, planned(0), None)
                .await
                .unwrap());
        }
        // Without deliveries every event is finished: ms 0 to 140 go.
        let step = j.compact(145, None, 100).await.unwrap();
        assert_eq!((step.events, step.resume), (15, None));
        let ms = |found: &[ArchivedEvent]| found.iter().map(|e| e.accepted_ms).collect::<Vec<_>>();
        assert!(j.archived(0, Some(150), None, 10).unwrap().is_empty());
        assert_eq!(
            ms(&j.archived(0, Some(175), None, 10).unwrap()),
            [150, 160, 170]
        );
        assert_eq!(
            ms(&j.archived(333, Some(365), None, 10).unwrap()),
            [340, 350, 360]
        );
        let first = j.archived(355, None, None, 2).unwrap();
        assert_eq!(ms(&first), [360, 370]);
        let last = first.last().map(|e| (e.accepted_ms, e.seq));
        assert_eq!(ms(&j.archived(355, None, last, 2).unwrap()), [380, 390]);
        assert!(j.archived(391, None, None, 10).unwrap().is_empty());
    }

    /// A store written before events answered by time has a `by_time` entry
    /// per event; compaction deletes it with its event.
    #[tokio::test]
    async fn compaction_deletes_the_time_entries_of_older_stores() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let seq = new(j.append(event("old"), 10, planned(0), None).await.unwrap());
        j.checkpoint().await.unwrap();
        let store = &j.store;
        let entry = time_key(10, seq);
        let mut tx = store.db.write_tx();
        tx.insert(store.ks(Ks::ByTime), entry, b"");
        tx.commit().unwrap();
        assert!(store.get(Ks::ByTime, entry).unwrap().is_some());
        let step = j.compact(100, None, 10).await.unwrap();
        assert_eq!(step.events, 1);
        assert!(store.get(Ks::ByTime, entry).unwrap().is_none());
        assert!(j.archived(0, None, None, 10).unwrap().is_empty());
    }

    /// An event too large for the commit log is refused alone, with
    /// `TooLarge`; the events batched with it are stored.
    #[test]
    fn an_event_too_large_for_the_log_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (store, mut writer) = bare_writer(dir.path());
        let mut huge = (*event("huge")).clone();
        // More than a frame holds: without the check the whole batch fails.
        huge.data = vec![b'x'; WAL_SIZE as usize * 3 / 4];
        let mut batch = Vec::new();
        let mut rxs = Vec::new();
        for e in [event("a"), Arc::new(huge), event("b")] {
            let (reply, rx) = oneshot::channel();
            batch.push(WriteOp::Append {
                encoded: encode_event(&e, 1, planned(1), None).unwrap(),
                dedup: None,
                reply,
            });
            rxs.push(rx);
        }
        writer.commit_batch(&mut batch);
        let got: Vec<_> = rxs.iter_mut().map(|rx| rx.try_recv().unwrap()).collect();
        assert_eq!(got[0].as_ref().unwrap(), &Appended::New(1));
        assert!(
            matches!(got[1], Err(JournalError::TooLarge { .. })),
            "{:?}",
            got[1]
        );
        assert_eq!(got[2].as_ref().unwrap(), &Appended::New(2));
        let (j, _queue) = journal_without_writer(store);
        assert!(j.timeline("huge").unwrap().is_none());
        assert_eq!(j.timeline("b").unwrap().unwrap().seq, 2);
    }

    /// A delivery's result too large for the commit log is refused alone,
    /// with `TooLarge`: the ops batched with it are stored, and the dead
    /// settlement the dispatcher sends instead (without the writes) commits.
    #[test]
    fn a_result_too_large_for_the_log_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (store, mut writer) = bare_writer(dir.path());
        let append = |name: &str| {
            let (reply, rx) = oneshot::channel();
            let op = WriteOp::Append {
                encoded: encode_event(&event(name), 1, planned(1), None).unwrap(),
                dedup: None,
                reply,
            };
            (op, rx)
        };
        let settle = |outcome: Outcome, kv: KvChanges| {
            let (reply, rx) = oneshot::channel();
            let op = WriteOp::Settle {
                settlement: Box::new(settlement(1, outcome, kv)),
                reply,
            };
            (op, rx)
        };
        let (op, mut a) = append("a");
        writer.commit_batch(&mut vec![op]);
        assert_eq!(a.try_recv().unwrap().unwrap(), Appended::New(1));

        // More than a frame holds: without the check the whole batch fails.
        let huge = KvChanges {
            reads: Vec::new(),
            writes: vec![KvWrite::set("big", vec![b'x'; WAL_SIZE as usize * 3 / 4])],
        };
        let (op1, mut too_large) = settle(Outcome::Delivered, huge);
        let (op2, mut b) = append("b");
        let (op3, mut dead) = settle(Outcome::Dead, KvChanges::default());
        writer.commit_batch(&mut vec![op1, op2, op3]);
        let got = too_large.try_recv().unwrap();
        assert!(matches!(got, Err(JournalError::TooLarge { .. })), "{got:?}");
        assert_eq!(b.try_recv().unwrap().unwrap(), Appended::New(2));
        assert_eq!(dead.try_recv().unwrap().unwrap(), Settled::Committed);

        let (j, _queue) = journal_without_writer(store);
        assert_eq!(j.kv_get("p", "big").unwrap(), None);
        let t = j.timeline("a").unwrap().unwrap();
        assert_eq!(t.deliveries[0].1.status, DeliveryStatus::Dead);
    }

    /// Opens the journal in `dir`, waiting for an earlier handle's threads
    /// to let go of fjall's lock.
    fn reopen(dir: &std::path::Path) -> Journal {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Journal::open(dir) {
                Ok(j) => break j,
                Err(e) if Instant::now() > deadline => panic!("cannot reopen: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    /// What the writer answered is in the commit log: with no applier, fjall
    /// never got it, and opening the journal replays it from the log.
    #[tokio::test]
    async fn answered_batches_come_back_from_the_log() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, mut writer) = bare_writer(dir.path());
            let mut batch = Vec::new();
            let mut rxs = Vec::new();
            for id in ["a", "b"] {
                let (reply, rx) = oneshot::channel();
                batch.push(WriteOp::Append {
                    encoded: encode_event(
                        &event(id),
                        7,
                        planned(1),
                        dedup(id, 1_000).as_ref().map(|d| d.key.as_str()),
                    )
                    .unwrap(),
                    dedup: dedup(id, 1_000),
                    reply,
                });
                rxs.push(rx);
            }
            writer.commit_batch(&mut batch);
            let (reply, mut settled) = oneshot::channel();
            let mut s = settlement(1, Outcome::Delivered, KvChanges::default());
            s.kv.writes = vec![KvWrite::set("k", "v")];
            batch.push(WriteOp::Settle {
                settlement: Box::new(s),
                reply,
            });
            writer.commit_batch(&mut batch);
            for mut rx in rxs {
                assert!(matches!(rx.try_recv().unwrap(), Ok(Appended::New(_))));
            }
            assert_eq!(settled.try_recv().unwrap().unwrap(), Settled::Committed);
            assert_eq!(store.overlay.pending(), 2);
            // fjall itself has none of it.
            assert!(
                store
                    .ks(Ks::Events)
                    .get(1u64.to_be_bytes())
                    .unwrap()
                    .is_none()
            );
        }
        let j = reopen(dir.path());
        assert_eq!(j.store.overlay.pending(), 0);
        assert_eq!(j.timeline("b").unwrap().unwrap().seq, 2);
        assert_eq!(j.kv_get("p", "k").unwrap(), Some(b"v".to_vec()));
        let due: Vec<_> = j.due_deliveries().unwrap().iter().map(|d| d.key).collect();
        assert_eq!(due, [DeliveryKey { seq: 2, idx: 0 }]);
        // The dedup entries came back too, and the next event gets seq 3.
        let again = j.append(event("x"), 8, planned(0), dedup("a", 1_000)).await;
        assert_eq!(again.unwrap(), Appended::Duplicate { id: "a".into() });
        assert_eq!(
            new(j.append(event("c"), 9, planned(0), None).await.unwrap()),
            3
        );
    }

    /// `Journal::checkpoint` (as at a clean shutdown) waits for every batch
    /// committed before it to be in fjall, with the log position after the
    /// last one: the log holds nothing a start would replay. (That the log is
    /// released only after fjall is synced: the next test.)
    #[tokio::test]
    async fn a_checkpoint_leaves_nothing_to_replay() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let mut tasks = Vec::new();
        for i in 0..40 {
            let j = j.clone();
            tasks.push(tokio::spawn(async move {
                j.append(event(&format!("e{i}")), i, planned(1), None).await
            }));
        }
        for t in tasks {
            assert!(matches!(t.await.unwrap(), Ok(Appended::New(_))));
        }
        j.checkpoint().await.unwrap();
        assert_eq!(j.store.overlay.pending(), 0);
        // fjall's own record (the overlay is empty) names the last batch.
        let pos = j.store.wal_position().unwrap();
        assert_eq!(pos.lsn, j.commits());
        let mut log = Wal::open(&dir.path().join("wal").join("log"), WAL_SIZE).unwrap();
        assert_eq!(log.recover(pos).unwrap().len(), 0);
        // A second request with nothing new is answered too.
        j.checkpoint().await.unwrap();
        assert_eq!(j.store.wal_position().unwrap(), pos);
    }

    /// The writer answers a batch's callers before it hands the batch's frame
    /// to the applier (so that the applier does not take the core their
    /// tasks wake on), but a `Flush` only after: `Journal::checkpoint` sends
    /// its request to the applier once its flush is answered, and the request
    /// must come after every frame committed before it.
    #[test]
    fn a_flush_is_answered_once_the_frame_is_with_the_applier() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, mut writer) = bare_writer(dir.path());
        let (to_applier, frames) = std::sync::mpsc::channel();
        writer.applier = to_applier;
        let batch = |id: &str| {
            let (append, appended) = oneshot::channel();
            let (flush, flushed) = oneshot::channel();
            let ops = vec![
                WriteOp::Append {
                    encoded: encode_event(&event(id), 7, planned(1), None).unwrap(),
                    dedup: None,
                    reply: append,
                },
                WriteOp::Flush { reply: flush },
            ];
            (ops, appended, flushed)
        };

        // Staged and logged: the append's answer is ready, the flush's and
        // the frame wait for `commit_batch` to send them, in that order.
        let (ops, _appended, _flushed) = batch("f1");
        let mut replies = Vec::new();
        writer.apply(&mut ops.into_iter(), &mut replies).unwrap();
        assert_eq!(
            replies.len(),
            1,
            "only the append is answered with the batch"
        );
        assert_eq!(writer.flushed.len(), 1);
        assert!(writer.logged.is_some());
        assert!(
            frames.try_recv().is_err(),
            "the frame waits for the answers"
        );
        writer.logged = None;
        writer.flushed.clear();

        let (mut ops, mut appended, mut flushed) = batch("f2");
        writer.commit_batch(&mut ops);
        assert!(matches!(appended.try_recv(), Ok(Ok(Appended::New(_)))));
        assert!(matches!(flushed.try_recv(), Ok(Ok(()))));
        assert!(matches!(frames.try_recv(), Ok(ToApplier::Frame(_))));
        assert!(writer.logged.is_none() && writer.flushed.is_empty());
    }

    /// The applier answers a checkpoint request only once the frames sent
    /// before it are in fjall, fjall is synced and the log is released up to
    /// them; until then (less than a sixteenth of the log, no idle second) it
    /// keeps the log.
    #[tokio::test]
    async fn a_checkpoint_request_releases_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let (store, mut writer) = bare_writer(dir.path());
        let space = writer.wal.as_ref().unwrap().space();
        let start = space.released();
        let (to_applier, frames) = std::sync::mpsc::channel();
        writer.applier = to_applier.clone();
        let applier = {
            let (store, space) = (store.clone(), space.clone());
            std::thread::spawn(move || apply_loop(&store, frames, Some((space, WAL_SIZE, start))))
        };
        for i in 0..4 {
            let (reply, _rx) = oneshot::channel();
            let id = format!("e{i}");
            let mut batch = vec![WriteOp::Append {
                encoded: encode_event(&event(&id), 7, planned(1), None).unwrap(),
                dedup: None,
                reply,
            }];
            writer.commit_batch(&mut batch);
        }
        let end = writer.wal.as_ref().unwrap().position();
        assert!(end.end > start);
        assert_eq!(space.released(), start, "released before any checkpoint");
        let (reply, rx) = oneshot::channel();
        to_applier.send(ToApplier::Checkpoint(reply)).unwrap();
        rx.await.unwrap().unwrap();
        assert_eq!(space.released(), end.end);
        assert_eq!(store.overlay.pending(), 0);
        assert_eq!(store.wal_position().unwrap(), end);
        drop((writer, to_applier));
        applier.join().unwrap();
    }

    /// The log is a ring: many times its size goes through it (the applier
    /// checkpoints fjall and releases it), and everything is there after a
    /// reopen.
    #[tokio::test]
    async fn the_log_is_reused_after_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let body = vec![b'x'; 3000];
        let total = 4 * WAL_SIZE as usize / 4096;
        {
            let j = Journal::open(dir.path()).unwrap();
            let mut tasks = Vec::new();
            for i in 0..total {
                let j = j.clone();
                let mut e = (*event(&format!("e{i}"))).clone();
                e.data = body.clone();
                tasks.push(tokio::spawn(async move {
                    j.append(Arc::new(e), i as u64, planned(1), None).await
                }));
            }
            for t in tasks {
                assert!(matches!(t.await.unwrap(), Ok(Appended::New(_))));
            }
        }
        let j = reopen(dir.path());
        assert_eq!(j.stats().unwrap().events, total as u64);
        assert_eq!(
            j.timeline(&format!("e{}", total - 1))
                .unwrap()
                .unwrap()
                .event
                .data,
            body
        );
    }

    fn journal_without_writer(store: Arc<Store>) -> (Journal, Receiver<WriteOp>) {
        let (writer, queue) = std::sync::mpsc::sync_channel(1);
        let applier = std::sync::mpsc::channel().0;
        (
            Journal {
                store,
                writer,
                applier,
            },
            queue,
        )
    }

    /// Keys sort as tuples: numerically by due time (big-endian, not byte-wise
    /// little-endian), and kv keys of one plugin never mix with another's.
    #[tokio::test]
    async fn keys_sort_as_tuples_and_kv_is_per_plugin() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let late = new(j
            .append(event("late"), 256, planned(1), None)
            .await
            .unwrap());
        let early = new(j.append(event("early"), 1, planned(1), None).await.unwrap());
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
            KvWrite::set("a\0b", "1"),
            KvWrite::set("gone", "2"),
            KvWrite::delete("gone"),
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
