//! All routes' patterns compiled into one matcher.
//!
//! Every pattern is expanded into alternatives (conjunctions of field tests,
//! see [`super::pattern`]). The matcher indexes every field test under the
//! field's path in one path trie; for each path an [`Index`] finds, for one
//! event leaf, every test that leaf passes:
//!
//! - exact strings and numbers (by text), booleans, `null`: hash maps;
//! - `prefix`, `suffix`, `wildcard`: one byte-level NFA per field (a trie in
//!   which `*` is a self-looping state), run once over the value;
//! - `equals-ignore-case`: a hash map on the lower-cased value;
//! - `numeric`: a segment tree over the intervals' end points;
//! - `cidr`: a binary trie of address prefixes per family;
//! - `anything-but`: the same structures index what each one excludes.
//!
//! Matching an event scans its JSON once, descending only into keys some
//! pattern names, looks each leaf up in its field's index, and counts the
//! tests hit per alternative: an alternative matches when all its required
//! fields were hit (then array consistency and `exists = false` are checked
//! on that candidate alone). So the work per event depends on the event and
//! on how many tests it hits, not on how many routes there are.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::IpAddr;

use super::json::{self, Value, Visit};
use super::pattern::{AnythingBut, Condition, Literal, NumRange, Pattern, Scalar, consistent};
use crate::event::Event;

/// Above this estimated NFA width (states active at once), a field's
/// wildcard set draws a warning.
pub const WARN_NFA_WIDTH: usize = 1_000;

/// A small, fast, non-cryptographic hasher (FxHash) for short keys.
#[derive(Default, Clone, Copy)]
pub struct FxHasher(u64);

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(K);
        }
        for &b in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ b as u64).wrapping_mul(K);
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.0 = (self.0.rotate_left(5) ^ i as u64).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// A literal as a map key: short ones inline, so that comparing a key at a
/// look-up follows no pointer (a cache miss saved per look-up in big tables).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Key {
    Inline(u8, [u8; INLINE_KEY]),
    Heap(Box<[u8]>),
}

const INLINE_KEY: usize = 22;

impl Key {
    fn new(b: &[u8]) -> Key {
        match b.len() {
            n @ 0..=INLINE_KEY => {
                let mut a = [0; INLINE_KEY];
                a[..n].copy_from_slice(b);
                Key::Inline(n as u8, a)
            }
            _ => Key::Heap(b.into()),
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Key::Inline(n, a) => &a[..*n as usize],
            Key::Heap(b) => b,
        }
    }
}

impl std::borrow::Borrow<[u8]> for Key {
    fn borrow(&self) -> &[u8] {
        self.bytes()
    }
}

impl std::hash::Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // As `[u8]` hashes, so that look-ups by `&[u8]` find it.
        self.bytes().hash(state)
    }
}

/// The tests one literal answers: the first inline (most literals have one).
#[derive(Debug, Clone)]
struct Tests {
    first: P,
    /// Boxed: a table entry stays small (more of them per cache line).
    #[allow(clippy::box_collection)]
    more: Option<Box<Vec<P>>>,
}

impl Tests {
    fn add(map: &mut FxMap<Key, Tests>, key: &str, p: P) {
        match map.get_mut(key.as_bytes()) {
            Some(t) => t.more.get_or_insert_default().push(p),
            None => {
                map.insert(
                    Key::new(key.as_bytes()),
                    Tests {
                        first: p,
                        more: None,
                    },
                );
            }
        }
    }

    fn each(&self, out: &mut impl FnMut(P)) {
        out(self.first);
        if let Some(more) = &self.more {
            more.iter().copied().for_each(out);
        }
    }
}

/// A test: condition `cond` of the key field of alternative `conj`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct P {
    conj: u32,
    cond: u32,
}

#[derive(Debug, Clone)]
struct ConjInfo {
    slots: Vec<SlotInfo>,
    /// The slot it is indexed by: a hit means it passed.
    key: Option<usize>,
}

#[derive(Debug, Clone)]
struct SlotInfo {
    node: u32,
    absent_ok: bool,
    conds: Vec<Condition>,
}

/// How many leaves a condition is likely to pass, relative to others: tests
/// that pass nearly everything make poor index keys.
fn breadth(c: &Condition) -> usize {
    match c {
        Condition::Exact(_) | Condition::EqualsIgnoreCase(_) => 1,
        Condition::Prefix(_)
        | Condition::Suffix(_)
        | Condition::PrefixIgnoreCase(_)
        | Condition::SuffixIgnoreCase(_)
        | Condition::Cidr(_) => 4,
        Condition::Wildcard(_) | Condition::Numeric(_) => 16,
        Condition::AnythingBut(_) | Condition::Exists(_) => 1 << 20,
    }
}

/// Up to this many children, a path node's keys are compared one by one
/// instead of hashed.
const FEW_CHILDREN: usize = 8;

#[derive(Debug, Clone, Default)]
struct PathNode {
    children: FxMap<Box<[u8]>, u32>,
    /// The children again when there are at most [`FEW_CHILDREN`].
    few: Vec<(Box<[u8]>, u32)>,
    index: Option<Box<Index>>,
    /// Some slot names this path: record its leaves.
    record: bool,
    /// This key's bit among its parent's children (0 when it has over 64:
    /// repeated keys are then found by their text).
    bit: u64,
    /// Its children's bits (0 when it has over 64): an object that has
    /// shown them all is not read further.
    named: u64,
}

/// The compiled matcher of a route table.
#[derive(Debug, Clone, Default)]
pub struct Matcher {
    paths: Vec<PathNode>,
    conjs: Vec<ConjInfo>,
    /// Per alternative: its route, and whether a hit on its key field is
    /// a match (one field, required: nothing else to check).
    conj_route: Vec<(u32, bool)>,
    /// Routes with an empty alternative (match everything).
    always: Vec<u32>,
    /// Alternatives with no required slot (only `exists = false`-able ones).
    absent_only: Vec<u32>,
    /// Dotted path per path node (for messages).
    names: Vec<String>,
    warnings: Vec<String>,
}

impl Matcher {
    /// Compiles the patterns, route `i` being `patterns[i]`.
    pub fn new<'p>(patterns: impl IntoIterator<Item = &'p Pattern>) -> Matcher {
        let mut m = Matcher {
            paths: vec![PathNode::default()],
            names: vec![String::new()],
            ..Matcher::default()
        };
        let patterns: Vec<&Pattern> = patterns.into_iter().collect();
        // How often each test appears on each path: an alternative is indexed
        // by its rarest required field only (the others are checked on the
        // candidates), so a value many routes test (`type = "Polygon"`) does
        // not make every event hit all of them.
        let mut seen: HashMap<(Vec<String>, String), usize> = HashMap::new();
        for pattern in &patterns {
            for alt in pattern.alternatives() {
                for slot in &alt.slots {
                    for c in &slot.conds {
                        *seen
                            .entry((slot.path.clone(), format!("{c:?}")))
                            .or_default() += 1;
                    }
                }
            }
        }
        let cost = |slot: &super::pattern::Slot| -> usize {
            slot.conds
                .iter()
                .map(|c| {
                    let n = seen
                        .get(&(slot.path.clone(), format!("{c:?}")))
                        .copied()
                        .unwrap_or(1);
                    n.saturating_mul(breadth(c))
                })
                .fold(0usize, usize::saturating_add)
        };
        for (route, pattern) in patterns.iter().enumerate() {
            let route = route as u32;
            for alt in pattern.alternatives() {
                if alt.slots.is_empty() {
                    if m.always.last() != Some(&route) {
                        m.always.push(route);
                    }
                    continue;
                }
                let conj = m.conjs.len() as u32;
                let mut info = ConjInfo {
                    slots: Vec::new(),
                    key: None,
                };
                for slot in &alt.slots {
                    let node = m.node_for(&slot.path);
                    m.paths[node as usize].record = true;
                    info.slots.push(SlotInfo {
                        node,
                        absent_ok: slot.absent_ok(),
                        conds: slot.conds.clone(),
                    });
                }
                let key = alt
                    .slots
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| !s.absent_ok())
                    .min_by_key(|(_, s)| cost(s))
                    .map(|(i, _)| i);
                match key {
                    Some(k) => {
                        let pn = &mut m.paths[info.slots[k].node as usize];
                        let index = pn.index.get_or_insert_with(Box::default);
                        // One payload per condition: an `anything-but`
                        // excludes for itself only.
                        for (i, c) in alt.slots[k].conds.iter().enumerate() {
                            index.insert(
                                c,
                                P {
                                    conj,
                                    cond: i as u32,
                                },
                            );
                        }
                    }
                    None => m.absent_only.push(conj),
                }
                info.key = key;
                let trivial = key.is_some() && info.slots.len() == 1;
                m.conj_route.push((route, trivial));
                m.conjs.push(info);
            }
        }
        for i in 0..m.paths.len() {
            let pn = &mut m.paths[i];
            if pn.children.len() <= FEW_CHILDREN {
                pn.few = pn.children.iter().map(|(k, &v)| (k.clone(), v)).collect();
            }
            if pn.children.len() <= 64 {
                let children: Vec<u32> = pn.children.values().copied().collect();
                for (j, &c) in children.iter().enumerate() {
                    m.paths[c as usize].bit = 1 << j;
                    m.paths[i].named |= 1 << j;
                }
            }
        }
        let mut warnings = Vec::new();
        for i in 0..m.paths.len() {
            if let Some(ix) = m.paths[i].index.as_mut() {
                ix.finish();
                let width = ix.nfa_width();
                if width > WARN_NFA_WIDTH {
                    warnings.push(format!(
                        "field `{}`: its prefix/suffix/wildcard patterns can keep up to {width} matcher states active per character (over {WARN_NFA_WIDTH}); matching it may be slow",
                        m.names[i]
                    ));
                }
            }
        }
        m.warnings = warnings;
        m
    }

    fn node_for(&mut self, path: &[String]) -> u32 {
        let mut cur = 0u32;
        for key in path {
            let next = self.paths.len() as u32;
            let entry = *self.paths[cur as usize]
                .children
                .entry(key.as_bytes().into())
                .or_insert(next);
            if entry == next {
                self.paths.push(PathNode::default());
                let name = match self.names.get(cur as usize) {
                    Some(parent) if !parent.is_empty() => format!("{parent}.{key}"),
                    _ => key.clone(),
                };
                self.names.push(name);
            }
            cur = entry;
        }
        cur
    }

    /// Problems measured at build time (wildcard sets that may be slow).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Indices of the routes matching `event`, ascending.
    pub fn matching_event(&self, event: &Event) -> Vec<usize> {
        let mut c = Collect::new(self);
        json::scan_event(event, 0, &mut c);
        c.finish()
    }

    /// Indices of the routes matching a JSON document (the whole envelope),
    /// which is checked as strictly as serde_json checks it.
    pub fn matching_json(&self, bytes: &[u8]) -> Result<Vec<usize>, json::JsonError> {
        let mut c = Collect::new(self);
        let mut arrays = 0;
        json::scan(bytes, 0, &mut c, &mut arrays)?;
        Ok(c.finish())
    }

    /// [`Matcher::matching_json`] for a document known to be valid JSON (as
    /// an accepted event's data is): only what patterns name is read. On
    /// invalid input the result is unspecified, but this never panics.
    pub fn matching_valid_json(&self, bytes: &[u8]) -> Result<Vec<usize>, json::JsonError> {
        let mut c = Collect::new(self);
        let mut arrays = 0;
        json::scan_valid(bytes, 0, &mut c, &mut arrays)?;
        Ok(c.finish())
    }
}

/// A recorded leaf's value; strings and numbers are ranges of `Scratch::text`.
#[derive(Debug, Clone, Copy)]
enum Recorded {
    Str(u32, u32),
    Num(u32, u32),
    Bool(bool),
    Null,
}

/// The buffers of one match, kept per thread between events.
#[derive(Debug, Default)]
struct Scratch {
    /// (conj, condition, leaf): candidates, by their key field.
    hits: Vec<(u32, u32, u32)>,
    /// (node, trail start, trail end) per recorded leaf.
    leaves: Vec<(u32, u32, u32)>,
    values: Vec<Recorded>,
    text: String,
    trails: Vec<(u32, u32)>,
    scratch: Vec<P>,
    /// Candidate alternatives (in `finish`).
    conjs: Vec<u32>,
}

/// Buffers larger than this are not kept for the next event.
const KEEP_SCRATCH: usize = 1 << 16;

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

struct Collect<'m> {
    m: &'m Matcher,
    s: Scratch,
}

impl Drop for Collect<'_> {
    fn drop(&mut self) {
        let mut s = std::mem::take(&mut self.s);
        if s.text.capacity() > KEEP_SCRATCH
            || s.leaves.capacity() > KEEP_SCRATCH
            || s.hits.capacity() > KEEP_SCRATCH
            || s.trails.capacity() > KEEP_SCRATCH
            || s.conjs.capacity() > KEEP_SCRATCH
        {
            return;
        }
        s.hits.clear();
        s.leaves.clear();
        s.values.clear();
        s.text.clear();
        s.trails.clear();
        s.scratch.clear();
        s.conjs.clear();
        let _ = SCRATCH.try_with(|c| {
            if let Ok(mut slot) = c.try_borrow_mut() {
                *slot = s;
            }
        });
    }
}

impl Visit for Collect<'_> {
    type Node = u32;

    fn child(&mut self, parent: u32, key: &[u8]) -> Option<u32> {
        let pn = &self.m.paths[parent as usize];
        if pn.children.len() <= FEW_CHILDREN {
            return pn.few.iter().find(|(k, _)| **k == *key).map(|&(_, v)| v);
        }
        pn.children.get(key).copied()
    }

    fn wants(&self, node: u32) -> bool {
        self.m.paths[node as usize].record
    }

    fn bit(&self, node: u32) -> u64 {
        self.m.paths[node as usize].bit
    }

    fn named(&self, node: u32) -> u64 {
        self.m.paths[node as usize].named
    }

    fn dedup_keys(&self, node: u32) -> bool {
        // Over 64 named keys: no bits (see `PathNode::bit`), compare text.
        self.m.paths[node as usize].children.len() > 64
    }

    fn leaf(&mut self, node: u32, value: Value<'_>, trail: &[(u32, u32)]) {
        let pn = &self.m.paths[node as usize];
        if !pn.record {
            return;
        }
        let s = &mut self.s;
        let leaf = s.leaves.len() as u32;
        let start = s.trails.len() as u32;
        s.trails.extend_from_slice(trail);
        s.leaves.push((node, start, s.trails.len() as u32));
        let mut text = |t: &str| {
            let a = s.text.len() as u32;
            s.text.push_str(t);
            (a, s.text.len() as u32)
        };
        let rec = match &value {
            Value::Str(t) => {
                let (a, b) = text(t);
                Recorded::Str(a, b)
            }
            Value::Num(n) => {
                let (a, b) = text(n);
                Recorded::Num(a, b)
            }
            Value::Bool(b) => Recorded::Bool(*b),
            Value::Null => Recorded::Null,
        };
        s.values.push(rec);
        if let Some(ix) = &pn.index {
            let hits = &mut s.hits;
            ix.lookup(&value.scalar(), &mut s.scratch, &mut |p| {
                hits.push((p.conj, p.cond, leaf))
            });
        }
    }

    fn mark(&self) -> usize {
        self.s.leaves.len()
    }

    fn rollback(&mut self, mark: usize) {
        self.s.leaves.truncate(mark);
        self.s.values.truncate(mark);
        self.s.hits.retain(|h| (h.2 as usize) < mark);
    }
}

impl<'m> Collect<'m> {
    fn new(m: &'m Matcher) -> Self {
        let s = SCRATCH
            .try_with(|c| c.try_borrow_mut().map(|mut s| std::mem::take(&mut *s)))
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        Collect { m, s }
    }

    fn trail(&self, leaf: u32) -> &[(u32, u32)] {
        let (_, a, b) = self.s.leaves[leaf as usize];
        &self.s.trails[a as usize..b as usize]
    }

    /// The value of recorded leaf `l`.
    fn value(&self, l: usize) -> Scalar<'_> {
        let text = |a: u32, b: u32| self.s.text.get(a as usize..b as usize).unwrap_or("");
        match self.s.values[l] {
            Recorded::Str(a, b) => Scalar::Str(text(a, b)),
            Recorded::Num(a, b) => Scalar::Num(text(a, b)),
            Recorded::Bool(b) => Scalar::Bool(b),
            Recorded::Null => Scalar::Null,
        }
    }

    fn finish(mut self) -> Vec<usize> {
        let m = self.m;
        let mut conjs = std::mem::take(&mut self.s.conjs);
        conjs.clear();
        conjs.extend(self.s.hits.iter().map(|h| h.0));
        conjs.extend_from_slice(&m.absent_only);
        if conjs.len() > 1 {
            conjs.sort_unstable();
            conjs.dedup();
        }
        // Alternatives are numbered route by route: ascending routes.
        let mut routes: Vec<usize> = Vec::new();
        for &c in &conjs {
            let (route, trivial) = m.conj_route[c as usize];
            let route = route as usize;
            if routes.last() != Some(&route) && (trivial || self.verify(&m.conjs[c as usize])) {
                routes.push(route);
            }
        }
        self.s.conjs = conjs;
        if !m.always.is_empty() {
            routes.extend(m.always.iter().map(|&r| r as usize));
            routes.sort_unstable();
            routes.dedup();
        }
        routes
    }

    /// Every field of a candidate alternative, with array consistency and
    /// absence.
    fn verify(&self, info: &ConjInfo) -> bool {
        // Without arrays of objects or optional fields, any passing leaf per
        // field will do (no allocation).
        let mut simple = true;
        // With no arrays of objects at all, the key slot passed (it was hit).
        let hit = if self.s.trails.is_empty() {
            info.key
        } else {
            None
        };
        for (i, slot) in info.slots.iter().enumerate() {
            if hit == Some(i) {
                continue;
            }
            let mut any = false;
            for (l, &(node, a, b)) in self.s.leaves.iter().enumerate() {
                if node == slot.node && slot.conds.iter().any(|cond| cond.test(&self.value(l))) {
                    simple &= a == b;
                    any = true;
                }
            }
            if !any && !slot.absent_ok {
                return false;
            }
            simple &= !slot.absent_ok;
        }
        if simple {
            return true;
        }
        let mut candidates: Vec<Vec<u32>> = Vec::with_capacity(info.slots.len());
        let mut simple = true;
        for slot in &info.slots {
            let mut c = Vec::new();
            for (l, &(node, a, b)) in self.s.leaves.iter().enumerate() {
                if node == slot.node && slot.conds.iter().any(|cond| cond.test(&self.value(l))) {
                    simple &= a == b;
                    c.push(l as u32);
                }
            }
            if c.is_empty() && !slot.absent_ok {
                return false;
            }
            simple &= !slot.absent_ok;
            candidates.push(c);
        }
        simple || self.assign(info, &candidates, &mut Vec::new())
    }

    fn assign(
        &self,
        info: &ConjInfo,
        candidates: &[Vec<u32>],
        chosen: &mut Vec<Option<u32>>,
    ) -> bool {
        let k = chosen.len();
        if k == info.slots.len() {
            return info.slots.iter().zip(chosen.iter()).all(|(slot, c)| {
                c.is_some()
                    || !self.s.leaves.iter().enumerate().any(|(l, &(node, _, _))| {
                        node == slot.node
                            && chosen
                                .iter()
                                .flatten()
                                .all(|&j| consistent(self.trail(l as u32), self.trail(j)))
                    })
            });
        }
        for &leaf in &candidates[k] {
            if chosen
                .iter()
                .flatten()
                .all(|&j| consistent(self.trail(leaf), self.trail(j)))
            {
                chosen.push(Some(leaf));
                if self.assign(info, candidates, chosen) {
                    return true;
                }
                chosen.pop();
            }
        }
        if info.slots[k].absent_ok {
            chosen.push(None);
            if self.assign(info, candidates, chosen) {
                return true;
            }
            chosen.pop();
        }
        false
    }
}

/// Everything tested on one field.
#[derive(Debug, Clone, Default)]
struct Index {
    strings: FxMap<Key, Tests>,
    numbers: FxMap<Key, Tests>,
    trues: Vec<P>,
    falses: Vec<P>,
    nulls: Vec<P>,
    /// `exists = true`: any leaf.
    any: Vec<P>,
    ignore_case: FxMap<Box<str>, Vec<P>>,
    nfa: Option<Nfa>,
    /// `prefix` tests by length, one map per length: set by `finish` in
    /// place of `nfa` when that holds prefixes of at most [`PREFIX_LENGTHS`]
    /// lengths and nothing else (a look-up per length instead of a walk of
    /// dependent steps through a big trie).
    prefixes: Vec<(usize, FxMap<Key, Tests>)>,
    /// Every `prefix` test (until `finish`), and whether `nfa` also holds
    /// suffixes or wildcards.
    prefix_tests: Vec<(Box<str>, P)>,
    nfa_mixed: bool,
    /// Prefixes and suffixes compared ignoring case: run on the lower-cased leaf.
    nfa_ci: Option<Nfa>,
    numeric: NumIndex,
    cidr4: BitTrie,
    cidr6: BitTrie,
    /// What each `anything-but` excludes, indexed like the rest.
    but: Option<Box<Index>>,
    /// Every `anything-but` test, sorted.
    but_all: Vec<P>,
}

impl Index {
    fn insert(&mut self, c: &Condition, p: P) {
        match c {
            Condition::Exact(l) => self.insert_literal(l, p),
            Condition::Prefix(s) => {
                self.prefix_tests.push((s.as_str().into(), p));
                self.nfa_insert(&[s.as_str(), ""], p)
            }
            Condition::Suffix(s) => {
                self.nfa_mixed = true;
                self.nfa_insert(&["", s.as_str()], p)
            }
            Condition::PrefixIgnoreCase(s) => self
                .nfa_ci
                .get_or_insert_with(Nfa::new)
                .insert(&[s.as_str(), ""], p),
            Condition::SuffixIgnoreCase(s) => self
                .nfa_ci
                .get_or_insert_with(Nfa::new)
                .insert(&["", s.as_str()], p),
            Condition::Wildcard(w) => {
                self.nfa_mixed = true;
                let pieces: Vec<&str> = w.pieces.iter().map(String::as_str).collect();
                self.nfa_insert(&pieces, p)
            }
            Condition::EqualsIgnoreCase(s) => self
                .ignore_case
                .entry(s.to_lowercase().into())
                .or_default()
                .push(p),
            Condition::Numeric(r) => self.numeric.pending.push((*r, p)),
            Condition::Exists(true) => self.any.push(p),
            // Absence is checked per candidate, not per leaf.
            Condition::Exists(false) => {}
            Condition::Cidr(c) => match c.net {
                IpAddr::V4(a) => self.cidr4.insert((u32::from(a) as u128) << 96, c.bits, p),
                IpAddr::V6(a) => self.cidr6.insert(u128::from(a), c.bits, p),
            },
            Condition::AnythingBut(ab) => {
                self.but_all.push(p);
                let but = self.but.get_or_insert_with(Box::default);
                match ab {
                    AnythingBut::Values(vs) => vs.iter().for_each(|l| but.insert_literal(l, p)),
                    AnythingBut::Prefix(s) => but.nfa_insert(&[s.as_str(), ""], p),
                    AnythingBut::Suffix(s) => but.nfa_insert(&["", s.as_str()], p),
                    AnythingBut::EqualsIgnoreCase(vs) => {
                        for s in vs {
                            but.ignore_case
                                .entry(s.to_lowercase().into())
                                .or_default()
                                .push(p)
                        }
                    }
                    AnythingBut::Wildcard(ws) => {
                        for w in ws {
                            let pieces: Vec<&str> = w.pieces.iter().map(String::as_str).collect();
                            but.nfa_insert(&pieces, p)
                        }
                    }
                }
            }
        }
    }

    fn insert_literal(&mut self, l: &Literal, p: P) {
        match l {
            Literal::String(s) => Tests::add(&mut self.strings, s, p),
            Literal::Number(n) => Tests::add(&mut self.numbers, n, p),
            Literal::Bool(true) => self.trues.push(p),
            Literal::Bool(false) => self.falses.push(p),
            Literal::Null => self.nulls.push(p),
        }
    }

    fn nfa_insert(&mut self, pieces: &[&str], p: P) {
        self.nfa.get_or_insert_with(Nfa::new).insert(pieces, p)
    }

    fn finish(&mut self) {
        let tests = std::mem::take(&mut self.prefix_tests);
        let mut lengths: Vec<usize> = tests.iter().map(|(s, _)| s.len()).collect();
        lengths.sort_unstable();
        lengths.dedup();
        if !tests.is_empty() && !self.nfa_mixed && lengths.len() <= PREFIX_LENGTHS {
            self.nfa = None;
            self.prefixes = lengths.iter().map(|&n| (n, FxMap::default())).collect();
            for (s, p) in &tests {
                if let Some((_, map)) = self.prefixes.iter_mut().find(|(n, _)| *n == s.len()) {
                    Tests::add(map, s, *p);
                }
            }
        }
        self.numeric.finish();
        for nfa in [&mut self.nfa, &mut self.nfa_ci].into_iter().flatten() {
            nfa.finish();
        }
        self.but_all.sort_unstable();
        self.but_all.dedup();
        if let Some(b) = self.but.as_mut() {
            b.finish();
        }
    }

    fn nfa_width(&self) -> usize {
        self.nfa.as_ref().map_or(0, Nfa::width)
            + self.nfa_ci.as_ref().map_or(0, Nfa::width)
            + self.but.as_ref().map_or(0, |b| b.nfa_width())
    }

    /// Calls `out` for every test `leaf` passes (possibly twice).
    fn lookup(&self, leaf: &Scalar<'_>, scratch: &mut Vec<P>, out: &mut impl FnMut(P)) {
        self.any.iter().copied().for_each(&mut *out);
        self.positive(leaf, out);
        if !self.but_all.is_empty() {
            scratch.clear();
            if let Some(b) = &self.but {
                b.positive(leaf, &mut |p| scratch.push(p));
            }
            scratch.sort_unstable();
            for &p in &self.but_all {
                if scratch.binary_search(&p).is_err() {
                    out(p);
                }
            }
        }
    }

    fn positive(&self, leaf: &Scalar<'_>, out: &mut impl FnMut(P)) {
        match leaf {
            Scalar::Str(s) => {
                if let Some(t) = self.strings.get(s.as_bytes()) {
                    t.each(out);
                }
                if !self.ignore_case.is_empty()
                    && let Some(ps) = self.ignore_case.get(s.to_lowercase().as_str())
                {
                    ps.iter().copied().for_each(&mut *out);
                }
                for (n, map) in &self.prefixes {
                    if let Some(t) = s.as_bytes().get(..*n).and_then(|b| map.get(b)) {
                        t.each(out);
                    }
                }
                if let Some(nfa) = &self.nfa {
                    nfa.run(s.as_bytes(), out);
                }
                if let Some(nfa) = &self.nfa_ci {
                    nfa.run(s.to_lowercase().as_bytes(), out);
                }
                if !self.cidr4.is_empty() || !self.cidr6.is_empty() {
                    match s.parse::<IpAddr>() {
                        Ok(IpAddr::V4(a)) => {
                            self.cidr4.lookup((u32::from(a) as u128) << 96, 32, out)
                        }
                        Ok(IpAddr::V6(a)) => self.cidr6.lookup(u128::from(a), 128, out),
                        Err(_) => {}
                    }
                }
            }
            Scalar::Num(n) => {
                if let Some(t) = self.numbers.get(n.as_bytes()) {
                    t.each(out);
                }
                if !self.numeric.is_empty()
                    && let Some(x) = super::pattern::parse_number(n)
                {
                    self.numeric.lookup(x, out);
                }
            }
            Scalar::Bool(true) => self.trues.iter().copied().for_each(out),
            Scalar::Bool(false) => self.falses.iter().copied().for_each(out),
            Scalar::Null => self.nulls.iter().copied().for_each(out),
        }
    }
}

/// Prefix, suffix and wildcard patterns of one field as one NFA: a trie of
/// literal bytes in which a `*` leads to a star state that loops on any byte.
#[derive(Debug, Clone)]
struct Nfa {
    nodes: Vec<NfaNode>,
    /// Every node's edges in one array (set by `finish`): node `n`'s are
    /// `flat[spans[n].0..spans[n].1]`; `spans[n].2` is its star state
    /// (`NO_STAR`: none), so a walk touches `nodes` only to report. The
    /// edges' bytes are also in `flat_bytes`, to be searched in one line.
    flat: Vec<(u8, u32)>,
    flat_bytes: Vec<u8>,
    spans: Vec<(u32, u32, u32)>,
    /// Every star state is a dead end that loops (prefixes only): one path
    /// through the trie, no state sets.
    det: bool,
}

const NO_STAR: u32 = u32::MAX;

/// See `Index::prefixes`.
const PREFIX_LENGTHS: usize = 4;

#[derive(Debug, Clone, Default)]
struct NfaNode {
    /// Sorted by byte.
    edges: Vec<(u8, u32)>,
    /// The star state reached through `*` (with no input).
    star: Option<u32>,
    is_star: bool,
    accept: Vec<P>,
}

impl Nfa {
    fn new() -> Nfa {
        Nfa {
            nodes: vec![NfaNode::default()],
            flat: Vec::new(),
            flat_bytes: Vec::new(),
            spans: Vec::new(),
            det: false,
        }
    }

    /// Freezes the edges into one array and looks for the prefix-only case.
    fn finish(&mut self) {
        self.flat.clear();
        self.flat_bytes.clear();
        self.spans.clear();
        for node in &self.nodes {
            let a = self.flat.len() as u32;
            self.flat.extend_from_slice(&node.edges);
            self.flat_bytes.extend(node.edges.iter().map(|e| e.0));
            self.spans
                .push((a, self.flat.len() as u32, node.star.unwrap_or(NO_STAR)));
        }
        self.det = self
            .nodes
            .iter()
            .all(|n| !n.is_star || (n.edges.is_empty() && n.star.is_none()));
    }

    #[inline]
    fn edge(&self, n: u32, b: u8) -> Option<u32> {
        let edges = match self.spans.get(n as usize) {
            Some(&(a, z, _)) if z - a <= 16 => {
                let (a, z) = (a as usize, z as usize);
                let at = self.flat_bytes[a..z].iter().position(|&c| c == b)?;
                return Some(self.flat[a + at].1);
            }
            Some(&(a, z, _)) => &self.flat[a as usize..z as usize],
            None => &self.nodes[n as usize].edges[..],
        };
        edges
            .binary_search_by_key(&b, |e| e.0)
            .ok()
            .map(|i| edges[i].1)
    }

    /// `run` when every star state is a dead end: walk the trie, reporting
    /// each star state met (it stays active to the end).
    fn run_det(&self, input: &[u8], out: &mut impl FnMut(P)) {
        let star = |n: u32, out: &mut dyn FnMut(P)| {
            let s = match self.spans.get(n as usize) {
                Some(&(_, _, s)) if s != NO_STAR => s,
                Some(_) => return,
                None => match self.nodes[n as usize].star {
                    Some(s) => s,
                    None => return,
                },
            };
            self.nodes[s as usize].accept.iter().copied().for_each(out);
        };
        let mut n = 0u32;
        for &b in input {
            star(n, out);
            match self.edge(n, b) {
                Some(t) => n = t,
                None => return,
            }
        }
        star(n, out);
        self.nodes[n as usize]
            .accept
            .iter()
            .copied()
            .for_each(&mut *out);
    }

    fn insert(&mut self, pieces: &[&str], p: P) {
        let mut cur = 0u32;
        for (i, piece) in pieces.iter().enumerate() {
            if i > 0 {
                cur = match self.nodes[cur as usize].star {
                    Some(s) => s,
                    None => {
                        let s = self.nodes.len() as u32;
                        self.nodes.push(NfaNode {
                            is_star: true,
                            ..NfaNode::default()
                        });
                        self.nodes[cur as usize].star = Some(s);
                        s
                    }
                };
            }
            for &b in piece.as_bytes() {
                cur = match self.edge(cur, b) {
                    Some(n) => n,
                    None => {
                        let n = self.nodes.len() as u32;
                        self.nodes.push(NfaNode::default());
                        let edges = &mut self.nodes[cur as usize].edges;
                        let at = edges.partition_point(|e| e.0 < b);
                        edges.insert(at, (b, n));
                        n
                    }
                };
            }
        }
        self.nodes[cur as usize].accept.push(p);
    }

    fn push_closure(&self, n: u32, set: &mut Vec<u32>) {
        set.push(n);
        if let Some(s) = self.nodes[n as usize].star {
            set.push(s);
        }
    }

    fn run(&self, input: &[u8], out: &mut impl FnMut(P)) {
        if self.det {
            return self.run_det(input, out);
        }
        let mut cur = Vec::with_capacity(8);
        let mut next = Vec::with_capacity(8);
        self.push_closure(0, &mut cur);
        for &b in input {
            next.clear();
            for &n in &cur {
                if self.nodes[n as usize].is_star {
                    next.push(n);
                }
                if let Some(t) = self.edge(n, b) {
                    self.push_closure(t, &mut next);
                }
            }
            if next.len() > 1 {
                next.sort_unstable();
                next.dedup();
            }
            std::mem::swap(&mut cur, &mut next);
            if cur.is_empty() {
                return;
            }
        }
        for &n in &cur {
            self.nodes[n as usize]
                .accept
                .iter()
                .copied()
                .for_each(&mut *out);
        }
    }

    /// An upper bound on the states active at once: each star state, plus
    /// the longest literal run after it (one node per depth can be active).
    fn width(&self) -> usize {
        fn depth(nfa: &Nfa, n: u32) -> usize {
            nfa.nodes[n as usize]
                .edges
                .iter()
                .map(|&(_, c)| 1 + depth(nfa, c))
                .max()
                .unwrap_or(0)
        }
        let mut w = 1 + depth(self, 0);
        for (i, node) in self.nodes.iter().enumerate() {
            if node.is_star {
                w += 1 + depth(self, i as u32);
            }
        }
        w
    }
}

/// Bounds per block of the numeric index's first search level.
const BLOCK: usize = 32;

/// Numeric intervals as a segment tree over the regions their end points
/// cut the line into: a point query visits one root-to-leaf path.
#[derive(Debug, Clone, Default)]
struct NumIndex {
    pending: Vec<(NumRange, P)>,
    bounds: Vec<f64>,
    /// The last bound of every block of [`BLOCK`] bounds (a small first
    /// level for the search, so that big tables touch few cache lines).
    tops: Vec<f64>,
    tree: Vec<Vec<P>>,
    regions: usize,
    /// The tests passed in each region, when that is not much bigger than
    /// the tree: region `r`'s are `flat[starts[r]..starts[r + 1]]`.
    starts: Vec<u32>,
    flat: Vec<P>,
}

impl NumIndex {
    fn is_empty(&self) -> bool {
        self.regions == 0
    }

    fn finish(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut bounds: Vec<f64> = self
            .pending
            .iter()
            .flat_map(|(r, _)| [r.lo.map(|b| b.0), r.hi.map(|b| b.0)])
            .flatten()
            .collect();
        bounds.sort_by(f64::total_cmp);
        bounds.dedup();
        self.tops = bounds
            .chunks(BLOCK)
            .filter_map(<[f64]>::last)
            .copied()
            .collect();
        self.bounds = bounds;
        self.regions = 2 * self.bounds.len() + 1;
        self.tree = vec![Vec::new(); 4 * self.regions];
        let pending = std::mem::take(&mut self.pending);
        for (r, p) in pending {
            let start = match r.lo {
                None => 0,
                Some((b, inc)) => {
                    let i = self.bound_index(b);
                    if inc { 2 * i + 1 } else { 2 * i + 2 }
                }
            };
            let end = match r.hi {
                None => self.regions - 1,
                Some((b, inc)) => {
                    let i = self.bound_index(b);
                    if inc { 2 * i + 1 } else { 2 * i }
                }
            };
            if start <= end {
                self.add(1, 0, self.regions - 1, start, end, p);
            }
        }
        let cap = 8 * self.tree.iter().map(Vec::len).sum::<usize>() + 1024;
        let (mut starts, mut flat) = (Vec::with_capacity(self.regions + 1), Vec::new());
        for r in 0..self.regions {
            starts.push(flat.len() as u32);
            self.walk(r, &mut |p| flat.push(p));
            if flat.len() > cap {
                return;
            }
        }
        starts.push(flat.len() as u32);
        self.starts = starts;
        self.flat = flat;
    }

    /// How many bounds are below `b`.
    fn bound_index(&self, b: f64) -> usize {
        let block = self.tops.partition_point(|x| *x < b);
        let start = block * BLOCK;
        match self.bounds.get(start..) {
            Some(rest) => start + rest[..rest.len().min(BLOCK)].partition_point(|x| *x < b),
            None => self.bounds.len(),
        }
    }

    fn add(&mut self, node: usize, lo: usize, hi: usize, a: usize, b: usize, p: P) {
        if a <= lo && hi <= b {
            self.tree[node].push(p);
            return;
        }
        let mid = (lo + hi) / 2;
        if a <= mid {
            self.add(2 * node, lo, mid, a, b, p);
        }
        if b > mid {
            self.add(2 * node + 1, mid + 1, hi, a, b, p);
        }
    }

    fn lookup(&self, x: f64, out: &mut impl FnMut(P)) {
        let i = self.bound_index(x);
        let region = if self.bounds.get(i) == Some(&x) {
            2 * i + 1
        } else {
            2 * i
        };
        if let (Some(&a), Some(&z)) = (self.starts.get(region), self.starts.get(region + 1)) {
            self.flat[a as usize..z as usize]
                .iter()
                .copied()
                .for_each(out);
            return;
        }
        self.walk(region, out);
    }

    /// Every test on the root-to-leaf path of `region` in the tree.
    fn walk(&self, region: usize, out: &mut impl FnMut(P)) {
        let (mut node, mut lo, mut hi) = (1, 0, self.regions - 1);
        loop {
            self.tree[node].iter().copied().for_each(&mut *out);
            if lo == hi {
                return;
            }
            let mid = (lo + hi) / 2;
            if region <= mid {
                node *= 2;
                hi = mid;
            } else {
                node = 2 * node + 1;
                lo = mid + 1;
            }
        }
    }
}

/// CIDR blocks as a binary trie of address bits (left-aligned in a u128).
#[derive(Debug, Clone, Default)]
struct BitTrie {
    nodes: Vec<([u32; 2], Vec<P>)>,
}

impl BitTrie {
    fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    fn insert(&mut self, addr: u128, bits: u8, p: P) {
        if self.nodes.is_empty() {
            self.nodes.push(([0, 0], Vec::new()));
        }
        let mut cur = 0usize;
        for i in 0..bits as u32 {
            let bit = ((addr >> (127 - i)) & 1) as usize;
            let next = self.nodes[cur].0[bit];
            cur = if next == 0 {
                let n = self.nodes.len();
                self.nodes.push(([0, 0], Vec::new()));
                self.nodes[cur].0[bit] = n as u32;
                n
            } else {
                next as usize
            };
        }
        self.nodes[cur].1.push(p);
    }

    fn lookup(&self, addr: u128, width: u32, out: &mut impl FnMut(P)) {
        if self.nodes.is_empty() {
            return;
        }
        let mut cur = 0usize;
        for i in 0..=width {
            self.nodes[cur].1.iter().copied().for_each(&mut *out);
            if i == width {
                return;
            }
            let bit = ((addr >> (127 - i)) & 1) as usize;
            match self.nodes[cur].0[bit] {
                0 => return,
                n => cur = n as usize,
            }
        }
    }
}
