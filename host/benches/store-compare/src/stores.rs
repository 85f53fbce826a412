//! The three candidate stores behind one small interface modelled on the journal
//! (host/src/journal): one transaction = a group of appends, each append = event
//! (seq -> ~1 KiB) + id index entry (36-char id -> seq) + 1–2 delivery records
//! ((seq, idx) -> ~100 B), each with a "due" index entry ((due_ms, seq, idx) -> ()).
//! Every commit is durable before `commit` returns.

use std::path::Path;
use std::sync::Arc;

pub type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// One journal append, as the writer thread sees it (seq already assigned).
pub struct Rec {
    pub seq: u64,
    pub id: String,
    pub body: Arc<[u8]>,
    pub deliveries: u8,
}

/// Milliseconds since the epoch: the "due" key of a new delivery.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// ~100-byte delivery state record (route, status, attempt, next-at, last error).
pub fn delivery_value(seq: u64, route: u32) -> [u8; 100] {
    let mut v = [b' '; 100];
    let s = format!(
        "{{\"route\":\"route-{route:02}\",\"status\":\"pending\",\"attempt\":0,\"next_at\":{},\"err\":null}}",
        1_700_000_000_000u64 + seq
    );
    let n = s.len().min(100);
    v[..n].copy_from_slice(&s.as_bytes()[..n]);
    v
}

pub trait Writer: Send {
    /// Write all records in ONE transaction and commit it durably.
    fn commit(&mut self, batch: &[Rec]) -> Res<()>;
}

pub trait Reader: Send {
    /// Look an event up by id (id -> seq -> event); returns the body length.
    fn get(&mut self, id: &str) -> Res<Option<usize>>;
}

pub trait Store: Send + Sync {
    fn writer(&self) -> Res<Box<dyn Writer>>;
    fn reader(&self) -> Res<Box<dyn Reader>>;
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Redb,
    RedbQuickRepair,
    Fjall,
    Sqlite,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Redb, Kind::RedbQuickRepair, Kind::Fjall, Kind::Sqlite];
    pub fn name(self) -> &'static str {
        match self {
            Kind::Redb => "redb",
            Kind::RedbQuickRepair => "redb-qr",
            Kind::Fjall => "fjall",
            Kind::Sqlite => "sqlite",
        }
    }
    pub fn title(self) -> &'static str {
        match self {
            Kind::Redb => "redb 4.6",
            Kind::RedbQuickRepair => "redb 4.6 +quick_repair",
            Kind::Fjall => "fjall 3.1",
            Kind::Sqlite => "SQLite (rusqlite 0.43)",
        }
    }
    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }
    pub fn open(self, dir: &Path) -> Res<Box<dyn Store>> {
        std::fs::create_dir_all(dir)?;
        Ok(match self {
            Kind::Redb => Box::new(RedbStore::open(dir, false)?),
            Kind::RedbQuickRepair => Box::new(RedbStore::open(dir, true)?),
            Kind::Fjall => Box::new(FjallStore::open(dir)?),
            Kind::Sqlite => Box::new(SqliteStore::open(dir)?),
        })
    }
}

// ---------------------------------------------------------------- redb

mod redb_impl {
    use super::*;
    use redb::{Database, ReadableDatabase, TableDefinition};

    const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
    const IDS: TableDefinition<&str, u64> = TableDefinition::new("event_ids");
    const DELIV: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("deliveries");
    const DUE: TableDefinition<(u64, u64, u32), ()> = TableDefinition::new("due");

    pub struct RedbStore {
        db: Arc<Database>,
        quick_repair: bool,
    }

    impl RedbStore {
        pub fn open(dir: &Path, quick_repair: bool) -> Res<Self> {
            // Database::create opens an existing file (and repairs it after a crash).
            let db = Database::create(dir.join("journal.redb"))?;
            let mut tx = db.begin_write()?; // Durability::Immediate is the default
            tx.set_quick_repair(quick_repair);
            {
                tx.open_table(EVENTS)?;
                tx.open_table(IDS)?;
                tx.open_table(DELIV)?;
                tx.open_table(DUE)?;
            }
            tx.commit()?;
            Ok(Self {
                db: Arc::new(db),
                quick_repair,
            })
        }
    }

    struct W(Arc<Database>, bool);
    struct R(Arc<Database>);

    impl Writer for W {
        fn commit(&mut self, batch: &[Rec]) -> Res<()> {
            let mut tx = self.0.begin_write()?;
            tx.set_quick_repair(self.1);
            {
                let mut ev = tx.open_table(EVENTS)?;
                let mut ids = tx.open_table(IDS)?;
                let mut dl = tx.open_table(DELIV)?;
                let mut due = tx.open_table(DUE)?;
                let ms = now_ms();
                for r in batch {
                    ev.insert(r.seq, &r.body[..])?;
                    ids.insert(r.id.as_str(), r.seq)?;
                    for k in 0..r.deliveries as u32 {
                        dl.insert((r.seq, k), &delivery_value(r.seq, k)[..])?;
                        due.insert((ms, r.seq, k), ())?;
                    }
                }
            }
            tx.commit()?;
            Ok(())
        }
    }

    impl Reader for R {
        fn get(&mut self, id: &str) -> Res<Option<usize>> {
            let tx = self.0.begin_read()?;
            let ids = tx.open_table(IDS)?;
            let Some(seq) = ids.get(id)?.map(|g| g.value()) else {
                return Ok(None);
            };
            let ev = tx.open_table(EVENTS)?;
            Ok(ev.get(seq)?.map(|g| g.value().len()))
        }
    }

    impl Store for RedbStore {
        fn writer(&self) -> Res<Box<dyn Writer>> {
            Ok(Box::new(W(self.db.clone(), self.quick_repair)))
        }
        fn reader(&self) -> Res<Box<dyn Reader>> {
            Ok(Box::new(R(self.db.clone())))
        }
    }
}
pub use redb_impl::RedbStore;

// ---------------------------------------------------------------- fjall

mod fjall_impl {
    use super::*;
    use fjall::{
        KeyspaceCreateOptions, PersistMode, Readable, SingleWriterTxDatabase,
        SingleWriterTxKeyspace,
    };

    #[derive(Clone)]
    pub struct FjallStore {
        db: SingleWriterTxDatabase,
        events: SingleWriterTxKeyspace,
        ids: SingleWriterTxKeyspace,
        deliv: SingleWriterTxKeyspace,
        due: SingleWriterTxKeyspace,
    }

    impl FjallStore {
        pub fn open(dir: &Path) -> Res<Self> {
            let db = SingleWriterTxDatabase::builder(dir.join("journal.fjall")).open()?;
            let events = db.keyspace("events", KeyspaceCreateOptions::default)?;
            let ids = db.keyspace("event_ids", KeyspaceCreateOptions::default)?;
            let deliv = db.keyspace("deliveries", KeyspaceCreateOptions::default)?;
            let due = db.keyspace("due", KeyspaceCreateOptions::default)?;
            Ok(Self {
                db,
                events,
                ids,
                deliv,
                due,
            })
        }
    }

    impl Writer for FjallStore {
        fn commit(&mut self, batch: &[Rec]) -> Res<()> {
            // Cross-keyspace atomic; fsync the journal before commit returns.
            let mut tx = self.db.write_tx().durability(Some(PersistMode::SyncAll));
            let ms = now_ms().to_be_bytes();
            for r in batch {
                let seq = r.seq.to_be_bytes();
                tx.insert(&self.events, seq, &r.body[..]);
                tx.insert(&self.ids, r.id.as_str(), seq);
                for k in 0..r.deliveries as u32 {
                    // Tuple keys as big-endian concatenations: byte order = tuple order.
                    let mut key = [0u8; 12];
                    key[..8].copy_from_slice(&seq);
                    key[8..].copy_from_slice(&k.to_be_bytes());
                    tx.insert(&self.deliv, key, &delivery_value(r.seq, k)[..]);
                    let mut due = [0u8; 20];
                    due[..8].copy_from_slice(&ms);
                    due[8..].copy_from_slice(&key);
                    tx.insert(&self.due, due, b"");
                }
            }
            tx.commit()?;
            Ok(())
        }
    }

    impl Reader for FjallStore {
        fn get(&mut self, id: &str) -> Res<Option<usize>> {
            let snap = self.db.read_tx();
            let Some(seq) = snap.get(&self.ids, id)? else {
                return Ok(None);
            };
            Ok(snap.get(&self.events, &*seq)?.map(|v| v.len()))
        }
    }

    impl Store for FjallStore {
        fn writer(&self) -> Res<Box<dyn Writer>> {
            Ok(Box::new(self.clone()))
        }
        fn reader(&self) -> Res<Box<dyn Reader>> {
            Ok(Box::new(self.clone()))
        }
    }
}
pub use fjall_impl::FjallStore;

// ---------------------------------------------------------------- SQLite

mod sqlite_impl {
    use super::*;
    use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
    use std::path::PathBuf;

    pub struct SqliteStore {
        path: PathBuf,
        // Keeps the database open (and the WAL in place) between scenarios.
        _keep: std::sync::Mutex<Connection>,
    }

    fn conn(path: &Path) -> Res<Connection> {
        let c = Connection::open(path)?;
        c.busy_timeout(std::time::Duration::from_secs(10))?;
        c.pragma_update(None, "journal_mode", "WAL")?;
        c.pragma_update(None, "synchronous", "FULL")?;
        Ok(c)
    }

    impl SqliteStore {
        pub fn open(dir: &Path) -> Res<Self> {
            let path = dir.join("journal.sqlite");
            let c = conn(&path)?;
            c.execute_batch(
                "CREATE TABLE IF NOT EXISTS events(seq INTEGER PRIMARY KEY, body BLOB NOT NULL);
                 CREATE TABLE IF NOT EXISTS event_ids(id TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID;
                 CREATE TABLE IF NOT EXISTS deliveries(seq INTEGER NOT NULL, route INTEGER NOT NULL,
                     state BLOB NOT NULL, PRIMARY KEY(seq, route)) WITHOUT ROWID;
                 CREATE TABLE IF NOT EXISTS due(due_ms INTEGER NOT NULL, seq INTEGER NOT NULL,
                     route INTEGER NOT NULL, PRIMARY KEY(due_ms, seq, route)) WITHOUT ROWID;",
            )?;
            Ok(Self {
                path,
                _keep: std::sync::Mutex::new(c),
            })
        }
    }

    struct W(Connection);
    struct R(Connection);

    impl Writer for W {
        fn commit(&mut self, batch: &[Rec]) -> Res<()> {
            let tx = self
                .0
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            {
                let mut ev = tx.prepare_cached("INSERT INTO events(seq, body) VALUES (?1, ?2)")?;
                let mut ids =
                    tx.prepare_cached("INSERT OR REPLACE INTO event_ids(id, seq) VALUES (?1, ?2)")?;
                let mut dl = tx.prepare_cached(
                    "INSERT INTO deliveries(seq, route, state) VALUES (?1, ?2, ?3)",
                )?;
                let mut due =
                    tx.prepare_cached("INSERT INTO due(due_ms, seq, route) VALUES (?1, ?2, ?3)")?;
                let ms = now_ms() as i64;
                for r in batch {
                    ev.execute(params![r.seq as i64, &r.body[..]])?;
                    ids.execute(params![r.id, r.seq as i64])?;
                    for k in 0..r.deliveries as u32 {
                        dl.execute(params![r.seq as i64, k, &delivery_value(r.seq, k)[..]])?;
                        due.execute(params![ms, r.seq as i64, k])?;
                    }
                }
            }
            tx.commit()?;
            Ok(())
        }
    }

    impl Reader for R {
        fn get(&mut self, id: &str) -> Res<Option<usize>> {
            let mut st = self.0.prepare_cached(
                "SELECT e.body FROM event_ids i JOIN events e ON e.seq = i.seq WHERE i.id = ?1",
            )?;
            // Fetch the blob itself (length() would let SQLite skip reading it).
            Ok(st
                .query_row([id], |r| Ok(r.get_ref(0)?.as_blob()?.len()))
                .optional()?)
        }
    }

    impl Store for SqliteStore {
        fn writer(&self) -> Res<Box<dyn Writer>> {
            Ok(Box::new(W(conn(&self.path)?)))
        }
        fn reader(&self) -> Res<Box<dyn Reader>> {
            Ok(Box::new(R(conn(&self.path)?)))
        }
    }
}
pub use sqlite_impl::SqliteStore;
