//! The batches the journal's writer has made durable in its commit log but
//! its applier has not yet written into fjall, and the reads that see them
//! together with fjall (ADR 0002). The writer answers once a batch is in the
//! log, so everything it answered must be readable from then on: a read
//! looks at its own batch's writes (the writer's), then at these frames from
//! the newest, then at fjall.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::iter::Peekable;
use std::ops::Bound;
use std::sync::Arc;

use arc_swap::ArcSwap;
use fjall::{Readable, SingleWriterTxKeyspace, Slice};

/// The journal's keyspaces, numbered as they are in a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Ks {
    Events,
    Ids,
    ByTime,
    Deliveries,
    Due,
    Dead,
    Order,
    Dedup,
    Replays,
    Kv,
    KvTtl,
    KvExp,
    KvUsage,
    /// The applier's position in the commit log.
    Wal,
}

pub(super) const KEYSPACES: usize = 14;

impl Ks {
    pub(super) const ALL: [Ks; KEYSPACES] = [
        Ks::Events,
        Ks::Ids,
        Ks::ByTime,
        Ks::Deliveries,
        Ks::Due,
        Ks::Dead,
        Ks::Order,
        Ks::Dedup,
        Ks::Replays,
        Ks::Kv,
        Ks::KvTtl,
        Ks::KvExp,
        Ks::KvUsage,
        Ks::Wal,
    ];

    /// fjall's name for the keyspace.
    pub(super) fn name(self) -> &'static str {
        match self {
            Ks::Events => "events",
            Ks::Ids => "event_ids",
            Ks::ByTime => "by_time",
            Ks::Deliveries => "deliveries",
            Ks::Due => "due",
            Ks::Dead => "dead",
            Ks::Order => "order",
            Ks::Dedup => "dedup",
            Ks::Replays => "replays",
            Ks::Kv => "kv",
            Ks::KvTtl => "kv_ttl",
            Ks::KvExp => "kv_exp",
            Ks::KvUsage => "kv_usage",
            Ks::Wal => "wal",
        }
    }
}

/// The fjall keyspaces, indexed by [`Ks`].
pub(super) type Spaces = [SingleWriterTxKeyspace; KEYSPACES];

type Map = BTreeMap<Vec<u8>, Option<Slice>>;

/// One batch's writes: per keyspace, each key's last value, or `None` for a
/// removal. Physical, so applying it twice gives the same state.
#[derive(Default)]
pub(super) struct Writes {
    maps: [Map; KEYSPACES],
    bytes: usize,
}

/// A frame that does not decode: the log's CRC matched, so this is a bug or
/// a log from another version.
#[derive(Debug, thiserror::Error)]
#[error("a commit log frame does not decode: {0}")]
pub(super) struct BadFrame(&'static str);

impl Writes {
    pub(super) fn put(&mut self, ks: Ks, key: Vec<u8>, value: Option<Slice>) {
        self.bytes += key.len() + value.as_ref().map_or(0, |v| v.len()) + 10;
        self.maps[ks as usize].insert(key, value);
    }

    /// This batch's value for `key`: `Some(None)` if it removes it.
    pub(super) fn get(&self, ks: Ks, key: &[u8]) -> Option<&Option<Slice>> {
        self.maps[ks as usize].get(key)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.maps.iter().all(BTreeMap::is_empty)
    }

    /// About how many bytes the frame of these writes takes.
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Every write, keyspace by keyspace.
    pub(super) fn iter(&self) -> impl Iterator<Item = (Ks, &[u8], Option<&Slice>)> {
        Ks::ALL.into_iter().flat_map(move |ks| {
            self.maps[ks as usize]
                .iter()
                .map(move |(k, v)| (ks, k.as_slice(), v.as_ref()))
        })
    }

    /// `keyspace (1) ‖ key length (4) ‖ key ‖ tag (1: value, 0: removal)
    /// [‖ value length (4) ‖ value]`, repeated; little-endian.
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.bytes);
        for (ks, k, v) in self.iter() {
            out.push(ks as u8);
            out.extend_from_slice(&(k.len() as u32).to_le_bytes());
            out.extend_from_slice(k);
            match v {
                Some(v) => {
                    out.push(1);
                    out.extend_from_slice(&(v.len() as u32).to_le_bytes());
                    out.extend_from_slice(v);
                }
                None => out.push(0),
            }
        }
        out
    }

    pub(super) fn decode(mut b: &[u8]) -> Result<Writes, BadFrame> {
        fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], BadFrame> {
            if b.len() < n {
                return Err(BadFrame("truncated"));
            }
            let (head, rest) = b.split_at(n);
            *b = rest;
            Ok(head)
        }
        fn len(b: &mut &[u8]) -> Result<usize, BadFrame> {
            let raw = take(b, 4)?;
            let mut a = [0; 4];
            a.copy_from_slice(raw);
            Ok(u32::from_le_bytes(a) as usize)
        }
        let mut w = Writes::default();
        while !b.is_empty() {
            let ks = *Ks::ALL
                .get(take(&mut b, 1)?[0] as usize)
                .ok_or(BadFrame("unknown keyspace"))?;
            let n = len(&mut b)?;
            let key = take(&mut b, n)?.to_vec();
            let value = match take(&mut b, 1)?[0] {
                0 => None,
                1 => {
                    let n = len(&mut b)?;
                    Some(Slice::from(take(&mut b, n)?))
                }
                _ => return Err(BadFrame("unknown tag")),
            };
            w.put(ks, key, value);
        }
        Ok(w)
    }
}

/// A batch in the commit log: its LSN and the log position after it.
pub(super) struct Frame {
    pub(super) lsn: u64,
    pub(super) end: u64,
    pub(super) writes: Writes,
}

/// The frames not yet in fjall, oldest first. The writer adds one after the
/// log has it and before it answers; the applier drops them once fjall shows
/// them to readers. A reader loads the list before it opens its fjall
/// snapshot, so a frame it does not find there is in that snapshot.
#[derive(Default)]
pub(super) struct Overlay {
    frames: ArcSwap<Vec<Arc<Frame>>>,
}

impl Overlay {
    pub(super) fn load(&self) -> Arc<Vec<Arc<Frame>>> {
        self.frames.load_full()
    }

    /// Adds the newest frame.
    pub(super) fn push(&self, frame: Arc<Frame>) {
        self.frames.rcu(|old| {
            let mut new = Vec::with_capacity(old.len() + 1);
            new.extend(old.iter().cloned());
            new.push(frame.clone());
            new
        });
    }

    /// fjall now has everything up to `lsn`.
    pub(super) fn applied(&self, lsn: u64) {
        self.frames.rcu(|old| {
            old.iter()
                .filter(|f| f.lsn > lsn)
                .cloned()
                .collect::<Vec<_>>()
        });
    }

    /// One key's value without a snapshot: the frames, then fjall's latest
    /// (a frame gone from the list is in fjall by then).
    pub(super) fn get(
        &self,
        space: &SingleWriterTxKeyspace,
        ks: Ks,
        key: &[u8],
    ) -> Result<Option<Slice>, fjall::Error> {
        for f in self.frames.load().iter().rev() {
            if let Some(v) = f.writes.get(ks, key) {
                return Ok(v.clone());
            }
        }
        space.get(key)
    }

    /// How many frames are waiting for the applier.
    pub(super) fn pending(&self) -> usize {
        self.frames.load().len()
    }
}

/// Point reads, whether from the writer's batch or a reader's view.
pub(super) trait Reads {
    fn get(&self, ks: Ks, key: impl AsRef<[u8]>) -> Result<Option<Slice>, fjall::Error>;
}

/// A consistent read of the journal: the frames not yet applied over one
/// fjall snapshot, optionally under a batch of writes in progress.
pub(super) struct View<'a> {
    spaces: &'a Spaces,
    frames: Arc<Vec<Arc<Frame>>>,
    db: &'a fjall::SingleWriterTxDatabase,
    /// Opened with the view, or at its first read of fjall (the writer's).
    snap: std::sync::OnceLock<fjall::Snapshot>,
}

impl<'a> View<'a> {
    /// The frames first, then the snapshot: see [`Overlay`].
    pub(super) fn new(
        overlay: &Overlay,
        db: &'a fjall::SingleWriterTxDatabase,
        spaces: &'a Spaces,
    ) -> View<'a> {
        let view = View::deferred(overlay, db, spaces);
        view.snap();
        view
    }

    /// As [`View::new`], but fjall's snapshot is opened at the first read
    /// that needs it, for the journal's writer: most of its batches only
    /// append and never read. Opening a snapshot takes fjall's snapshot
    /// tracker lock, which a memtable rotation (in the applier or a fjall
    /// worker) and every 10,000th snapshot closed hold for writing while they
    /// sweep the tracker; a commit of 24 ms whose log write took 0.2 was seen
    /// in a half-rate run (docs/benchmarks.md). For the writer the later
    /// opening sees nothing the frames do not: it is the only thread that
    /// makes frames, and it makes none while it reads.
    pub(super) fn deferred(
        overlay: &Overlay,
        db: &'a fjall::SingleWriterTxDatabase,
        spaces: &'a Spaces,
    ) -> View<'a> {
        View {
            spaces,
            frames: overlay.load(),
            db,
            snap: std::sync::OnceLock::new(),
        }
    }

    fn snap(&self) -> &fjall::Snapshot {
        self.snap.get_or_init(|| self.db.read_tx())
    }

    pub(super) fn get_in(
        &self,
        top: Option<&Writes>,
        ks: Ks,
        key: &[u8],
    ) -> Result<Option<Slice>, fjall::Error> {
        if let Some(v) = top.and_then(|w| w.get(ks, key)) {
            return Ok(v.clone());
        }
        for f in self.frames.iter().rev() {
            if let Some(v) = f.writes.get(ks, key) {
                return Ok(v.clone());
            }
        }
        self.snap().get(&self.spaces[ks as usize], key)
    }

    /// Entries of `ks` in `[lo, hi)`-style bounds, in key order (or reverse).
    pub(super) fn range_in(
        &self,
        top: Option<&Writes>,
        ks: Ks,
        lo: Bound<&[u8]>,
        hi: Bound<&[u8]>,
        rev: bool,
    ) -> Merged {
        if is_empty_range(lo, hi) {
            return Merged::empty(rev);
        }
        let mut upper = Map::new();
        let layers = self
            .frames
            .iter()
            .map(|f| &f.writes)
            .chain(top)
            .map(|w| &w.maps[ks as usize]);
        for map in layers {
            for (k, v) in map.range::<[u8], _>((lo, hi)) {
                upper.insert(k.clone(), v.clone());
            }
        }
        let lower = self
            .snap()
            .range::<&[u8], _>(&self.spaces[ks as usize], (lo, hi));
        Merged::new(upper, lower, rev)
    }

    /// Entries of `ks` whose key starts with `prefix`.
    pub(super) fn prefix_in(
        &self,
        top: Option<&Writes>,
        ks: Ks,
        prefix: &[u8],
        rev: bool,
    ) -> Merged {
        let end = prefix_end(prefix);
        let hi = match &end {
            Some(e) => Bound::Excluded(e.as_slice()),
            None => Bound::Unbounded,
        };
        self.range_in(top, ks, Bound::Included(prefix), hi, rev)
    }

    /// How many entries `ks` holds (fjall counts by scanning).
    pub(super) fn len(&self, ks: Ks) -> Result<usize, fjall::Error> {
        self.range_in(None, ks, Bound::Unbounded, Bound::Unbounded, false)
            .try_fold(0, |n, e| e.map(|_| n + 1))
    }
}

impl Reads for View<'_> {
    fn get(&self, ks: Ks, key: impl AsRef<[u8]>) -> Result<Option<Slice>, fjall::Error> {
        self.get_in(None, ks, key.as_ref())
    }
}

/// The smallest key after every key that starts with `prefix` (`None`: no
/// such key, the prefix is all 0xff).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Whether the bounds hold no key (`BTreeMap::range` panics on those).
fn is_empty_range(lo: Bound<&[u8]>, hi: Bound<&[u8]>) -> bool {
    match (lo, hi) {
        (Bound::Included(l), Bound::Included(h)) => l > h,
        (Bound::Included(l) | Bound::Excluded(l), Bound::Excluded(h))
        | (Bound::Excluded(l), Bound::Included(h)) => l >= h,
        _ => false,
    }
}

/// The upper layer's entries of a range, in the iteration's direction.
type Upper = Box<dyn Iterator<Item = (Vec<u8>, Option<Slice>)>>;

/// The entries of a range: an upper layer (frames and the batch in
/// progress, where `None` hides the key) merged over fjall's iterator.
pub(super) struct Merged {
    upper: Peekable<Upper>,
    lower: Option<fjall::Iter>,
    pending: Option<(Slice, Slice)>,
    rev: bool,
}

impl Merged {
    fn new(upper: Map, lower: fjall::Iter, rev: bool) -> Merged {
        let upper: Upper = if rev {
            Box::new(upper.into_iter().rev())
        } else {
            Box::new(upper.into_iter())
        };
        Merged {
            upper: upper.peekable(),
            lower: Some(lower),
            pending: None,
            rev,
        }
    }

    fn empty(rev: bool) -> Merged {
        let upper: Upper = Box::new(std::iter::empty());
        Merged {
            upper: upper.peekable(),
            lower: None,
            pending: None,
            rev,
        }
    }

    fn next_lower(&mut self) -> Option<fjall::Guard> {
        let lower = self.lower.as_mut()?;
        if self.rev {
            lower.next_back()
        } else {
            lower.next()
        }
    }
}

impl Iterator for Merged {
    type Item = Result<(Slice, Slice), fjall::Error>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.pending.is_none()
                && let Some(guard) = self.next_lower()
            {
                match guard.into_inner() {
                    Ok(kv) => self.pending = Some(kv),
                    Err(e) => return Some(Err(e)),
                }
            }
            let take_upper = match (self.upper.peek(), &self.pending) {
                (None, None) => return None,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some((u, _)), Some((l, _))) => {
                    let ord = u.as_slice().cmp(l.as_ref());
                    match if self.rev { ord.reverse() } else { ord } {
                        Ordering::Less => true,
                        Ordering::Equal => {
                            self.pending = None; // shadowed by the newer write
                            true
                        }
                        Ordering::Greater => false,
                    }
                }
            };
            if !take_upper {
                return self.pending.take().map(Ok);
            }
            match self.upper.next() {
                Some((k, Some(v))) => return Some(Ok((Slice::from(k), v))),
                Some((_, None)) => continue, // removed
                None => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_round_trip_through_a_frame() {
        let mut w = Writes::default();
        w.put(Ks::Events, vec![0, 1], Some(Slice::from(&b"event"[..])));
        w.put(Ks::Due, vec![9; 20], None);
        w.put(Ks::Wal, b"pos".to_vec(), Some(Slice::from(&[][..])));
        let back = Writes::decode(&w.encode()).unwrap();
        let got: Vec<_> = back
            .iter()
            .map(|(ks, k, v)| (ks, k.to_vec(), v.map(|v| v.to_vec())))
            .collect();
        assert_eq!(
            got,
            vec![
                (Ks::Events, vec![0, 1], Some(b"event".to_vec())),
                (Ks::Due, vec![9; 20], None),
                (Ks::Wal, b"pos".to_vec(), Some(vec![])),
            ]
        );
        assert!(Writes::decode(&w.encode()[..5]).is_err());
        assert!(Writes::decode(&[200, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn prefix_end_and_empty_ranges() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 255]), Some(vec![2]));
        assert_eq!(prefix_end(&[255, 255]), None);
        assert!(is_empty_range(Bound::Included(b"b"), Bound::Excluded(b"a")));
        assert!(is_empty_range(Bound::Included(b"a"), Bound::Excluded(b"a")));
        assert!(!is_empty_range(
            Bound::Included(b"a"),
            Bound::Included(b"a")
        ));
        assert!(!is_empty_range(Bound::Unbounded, Bound::Excluded(b"a")));
    }

    /// Frames and the batch in progress shadow fjall, newest first, in
    /// both directions, with removals hiding fjall's entries.
    #[test]
    fn views_merge_layers_over_fjall() {
        let dir = std::env::temp_dir().join(format!(
            "switchyard-overlay-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        let db = fjall::SingleWriterTxDatabase::builder(&dir).open().unwrap();
        let spaces: Spaces = Ks::ALL.map(|ks| {
            db.keyspace(ks.name(), fjall::KeyspaceCreateOptions::default)
                .unwrap()
        });
        let mut tx = db.write_tx();
        for k in [b"a", b"b", b"c", b"d"] {
            tx.insert(&spaces[Ks::Kv as usize], *k, b"fjall");
        }
        tx.commit().unwrap();
        let overlay = Overlay::default();
        let mut older = Writes::default();
        older.put(Ks::Kv, b"b".to_vec(), None);
        older.put(Ks::Kv, b"e".to_vec(), Some(Slice::from(&b"old"[..])));
        overlay.push(Arc::new(Frame {
            lsn: 1,
            end: 4096,
            writes: older,
        }));
        let mut newer = Writes::default();
        newer.put(Ks::Kv, b"e".to_vec(), Some(Slice::from(&b"new"[..])));
        newer.put(Ks::Kv, b"c".to_vec(), Some(Slice::from(&b"frame"[..])));
        overlay.push(Arc::new(Frame {
            lsn: 2,
            end: 8192,
            writes: newer,
        }));
        let mut top = Writes::default();
        top.put(Ks::Kv, b"d".to_vec(), None);
        top.put(Ks::Kv, b"0".to_vec(), Some(Slice::from(&b"top"[..])));

        let view = View::new(&overlay, &db, &spaces);
        let all = |rev| -> Vec<(String, String)> {
            view.range_in(Some(&top), Ks::Kv, Bound::Unbounded, Bound::Unbounded, rev)
                .map(|e| {
                    let (k, v) = e.unwrap();
                    (
                        String::from_utf8(k.to_vec()).unwrap(),
                        String::from_utf8(v.to_vec()).unwrap(),
                    )
                })
                .collect()
        };
        let want: Vec<(String, String)> =
            [("0", "top"), ("a", "fjall"), ("c", "frame"), ("e", "new")]
                .map(|(k, v)| (k.into(), v.into()))
                .into();
        assert_eq!(all(false), want);
        assert_eq!(all(true), want.iter().rev().cloned().collect::<Vec<_>>());
        assert_eq!(view.get(Ks::Kv, b"b").unwrap(), None);
        assert_eq!(
            view.get(Ks::Kv, b"e").unwrap().as_deref(),
            Some(&b"new"[..])
        );
        assert_eq!(view.get_in(Some(&top), Ks::Kv, b"d").unwrap(), None);
        assert_eq!(
            view.get(Ks::Kv, b"d").unwrap().as_deref(),
            Some(&b"fjall"[..])
        );
        let c: Vec<_> = view
            .prefix_in(None, Ks::Kv, b"c", false)
            .map(|e| e.unwrap().1.to_vec())
            .collect();
        assert_eq!(c, vec![b"frame".to_vec()]);
        // a, c, d (fjall's b hidden), e.
        assert_eq!(view.len(Ks::Kv).unwrap(), 4);

        // Once applied, frames leave the overlay.
        overlay.applied(1);
        assert_eq!(overlay.pending(), 1);
        overlay.applied(2);
        assert_eq!(overlay.pending(), 0);
        drop(view);
        drop(spaces);
        drop(db);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
