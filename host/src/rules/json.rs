//! A small JSON scanner that flattens a document into leaves for matching.
//!
//! It keeps each number's original text (exact matching compares text), and
//! asks a [`Visit`] for every object key whether to look inside: values under
//! keys no pattern names are skipped without being decoded. Each leaf comes
//! with its *trail*: the (array, element) pairs of the arrays of objects it
//! sits in, for array consistency.

use std::borrow::Cow;

use super::pattern::Scalar;

/// Nesting deeper than this is rejected (as serde_json does).
const MAX_DEPTH: usize = 128;

/// Why a document could not be scanned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    /// Malformed JSON at a byte offset.
    #[error("invalid JSON at byte {0}")]
    Syntax(usize),
    /// Arrays and objects nested deeper than the limit.
    #[error("JSON nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

/// A leaf value borrowed from the document (strings decoded when escaped).
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    Str(Cow<'a, str>),
    Num(&'a str),
    Bool(bool),
    Null,
}

impl Value<'_> {
    pub(crate) fn scalar(&self) -> Scalar<'_> {
        match self {
            Value::Str(s) => Scalar::Str(s),
            Value::Num(n) => Scalar::Num(n),
            Value::Bool(b) => Scalar::Bool(*b),
            Value::Null => Scalar::Null,
        }
    }
}

/// What the scanner reports to.
pub(crate) trait Visit {
    type Node: Copy;
    /// The node for `key` under `parent`, or `None` to skip its value.
    fn child(&mut self, parent: Self::Node, key: &str) -> Option<Self::Node>;
    /// A scalar at `node`.
    fn leaf(&mut self, node: Self::Node, value: Value<'_>, trail: &[(u32, u32)]);
    /// How many leaves were taken so far (to drop a malformed part).
    fn mark(&self) -> usize;
    /// Forgets the leaves taken after `mark`.
    fn rollback(&mut self, mark: usize);
}

/// Scans one JSON document whose root sits at `node`. `next_array` numbers
/// array instances (pass the same counter for every part of one event).
pub(crate) fn scan<V: Visit>(
    bytes: &[u8],
    node: V::Node,
    visit: &mut V,
    next_array: &mut u32,
) -> Result<(), JsonError> {
    let mut s = Scanner {
        b: bytes,
        i: 0,
        trail: Vec::new(),
        next_array,
    };
    s.value(node, visit, 0, 0)?;
    s.ws();
    if s.i != s.b.len() {
        return Err(JsonError::Syntax(s.i));
    }
    Ok(())
}

struct Scanner<'a, 'c> {
    b: &'a [u8],
    i: usize,
    trail: Vec<(u32, u32)>,
    next_array: &'c mut u32,
}

impl<'a> Scanner<'a, '_> {
    fn err<T>(&self) -> Result<T, JsonError> {
        Err(JsonError::Syntax(self.i))
    }

    fn ws(&mut self) {
        while let Some(c) = self.b.get(self.i) {
            if matches!(c, b' ' | b'\t' | b'\n' | b'\r') {
                self.i += 1;
            } else {
                break;
            }
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.b.get(self.i).copied()
    }

    fn expect(&mut self, c: u8) -> Result<(), JsonError> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            self.err()
        }
    }

    /// `eff` is how much of the trail counts for leaves here: arrays entered
    /// since the last object key hold scalars of this very field, which do
    /// not constrain each other.
    fn value<V: Visit>(
        &mut self,
        node: V::Node,
        visit: &mut V,
        depth: usize,
        eff: usize,
    ) -> Result<(), JsonError> {
        if depth > MAX_DEPTH {
            return Err(JsonError::TooDeep);
        }
        match self.peek() {
            Some(b'{') => {
                self.i += 1;
                if self.peek() == Some(b'}') {
                    self.i += 1;
                    return Ok(());
                }
                loop {
                    if self.peek() != Some(b'"') {
                        return self.err();
                    }
                    let key = self.string()?;
                    self.expect(b':')?;
                    match visit.child(node, &key) {
                        Some(child) => {
                            let eff = self.trail.len();
                            self.value(child, visit, depth + 1, eff)?
                        }
                        None => self.skip(depth + 1)?,
                    }
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(());
                        }
                        _ => return self.err(),
                    }
                }
            }
            Some(b'[') => {
                self.i += 1;
                let id = *self.next_array;
                *self.next_array = self.next_array.wrapping_add(1);
                if self.peek() == Some(b']') {
                    self.i += 1;
                    return Ok(());
                }
                let mut idx = 0u32;
                loop {
                    self.trail.push((id, idx));
                    let r = self.value(node, visit, depth + 1, eff);
                    self.trail.pop();
                    r?;
                    idx += 1;
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(());
                        }
                        _ => return self.err(),
                    }
                }
            }
            Some(b'"') => {
                let s = self.string()?;
                visit.leaf(node, Value::Str(s), &self.trail[..eff]);
                Ok(())
            }
            Some(_) => {
                let v = self.scalar()?;
                visit.leaf(node, v, &self.trail[..eff]);
                Ok(())
            }
            None => self.err(),
        }
    }

    fn scalar(&mut self) -> Result<Value<'a>, JsonError> {
        let rest = &self.b[self.i..];
        for (lit, v) in [
            (&b"true"[..], Value::Bool(true)),
            (b"false", Value::Bool(false)),
            (b"null", Value::Null),
        ] {
            if rest.starts_with(lit) {
                self.i += lit.len();
                return Ok(v);
            }
        }
        self.number().map(Value::Num)
    }

    fn number(&mut self) -> Result<&'a str, JsonError> {
        let start = self.i;
        self.number_end()?;
        // Only ASCII digits and signs: always UTF-8.
        std::str::from_utf8(&self.b[start..self.i]).or_else(|_| self.err())
    }

    /// Moves past a number, checking its syntax (as [`Scanner::number`]).
    fn number_end(&mut self) -> Result<(), JsonError> {
        let b = self.b;
        let digits = |i: &mut usize| {
            let s = *i;
            // Eight digits at a time (the test of simdjson's
            // `is_made_of_eight_digits_fast`), then one by one.
            while let Some(c) = b.get(*i..*i + 8) {
                let mut w = [0u8; 8];
                w.copy_from_slice(c);
                let v = u64::from_le_bytes(w);
                const HI: u64 = 0xF0F0_F0F0_F0F0_F0F0;
                if (v & HI) | (((v.wrapping_add(0x0606_0606_0606_0606)) & HI) >> 4)
                    != 0x3333_3333_3333_3333
                {
                    break;
                }
                *i += 8;
            }
            while b.get(*i).is_some_and(u8::is_ascii_digit) {
                *i += 1;
            }
            *i > s
        };
        let mut i = self.i;
        if b.get(i) == Some(&b'-') {
            i += 1;
        }
        if b.get(i) == Some(&b'0') {
            i += 1;
        } else if !digits(&mut i) {
            return self.err();
        }
        if b.get(i) == Some(&b'.') {
            i += 1;
            if !digits(&mut i) {
                self.i = i;
                return self.err();
            }
        }
        if matches!(b.get(i), Some(b'e' | b'E')) {
            i += 1;
            if matches!(b.get(i), Some(b'+' | b'-')) {
                i += 1;
            }
            if !digits(&mut i) {
                self.i = i;
                return self.err();
            }
        }
        self.i = i;
        Ok(())
    }

    /// Skips a scalar other than a string, as strictly as [`Scanner::scalar`].
    fn skip_scalar(&mut self) -> Result<(), JsonError> {
        let rest = &self.b[self.i..];
        let lit: &[u8] = match rest.first() {
            Some(b't') => b"true",
            Some(b'f') => b"false",
            Some(b'n') => b"null",
            _ => return self.number_end(),
        };
        if rest.starts_with(lit) {
            self.i += lit.len();
            Ok(())
        } else {
            self.number_end()
        }
    }

    /// Skips a string at `"`, as strictly as [`Scanner::string`] but without
    /// decoding it (escaped strings take the decoding path).
    fn skip_string(&mut self) -> Result<(), JsonError> {
        let b = self.b;
        let start = self.i + 1;
        let mut i = start;
        let mut ascii = true;
        while let Some(&c) = b.get(i) {
            match c {
                b'"' => {
                    self.i = i + 1;
                    return if ascii || std::str::from_utf8(&b[start..i]).is_ok() {
                        Ok(())
                    } else {
                        self.err()
                    };
                }
                b'\\' => return self.string().map(drop),
                c if c < 0x20 => {
                    self.i = i;
                    return self.err();
                }
                c => {
                    ascii &= c < 0x80;
                    i += 1;
                }
            }
        }
        self.i = i;
        self.err()
    }

    /// A string at `"`, decoded.
    fn string(&mut self) -> Result<Cow<'a, str>, JsonError> {
        self.i += 1;
        let start = self.i;
        let b = self.b;
        // Fast path: no escapes.
        let mut i = start;
        while let Some(&c) = b.get(i) {
            match c {
                b'"' => {
                    self.i = i + 1;
                    return std::str::from_utf8(&b[start..i])
                        .map(Cow::Borrowed)
                        .or_else(|_| self.err());
                }
                b'\\' => break,
                c if c < 0x20 => {
                    self.i = i;
                    return self.err();
                }
                _ => i += 1,
            }
        }
        let mut out: Vec<u8> = b[start..i].to_vec();
        loop {
            let Some(&c) = b.get(i) else {
                self.i = i;
                return self.err();
            };
            i += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let Some(&e) = b.get(i) else {
                        self.i = i;
                        return self.err();
                    };
                    i += 1;
                    match e {
                        b'"' | b'\\' | b'/' => out.push(e),
                        b'b' => out.push(8),
                        b'f' => out.push(12),
                        b'n' => out.push(b'\n'),
                        b'r' => out.push(b'\r'),
                        b't' => out.push(b'\t'),
                        b'u' => {
                            let hex = |i: usize| -> Option<u32> {
                                let h = b.get(i..i + 4)?;
                                u32::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()
                            };
                            let Some(mut cp) = hex(i) else {
                                self.i = i;
                                return self.err();
                            };
                            i += 4;
                            if (0xD800..0xDC00).contains(&cp)
                                && b.get(i) == Some(&b'\\')
                                && b.get(i + 1) == Some(&b'u')
                                && let Some(lo) = hex(i + 2)
                                && (0xDC00..0xE000).contains(&lo)
                            {
                                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                                i += 6;
                            }
                            let ch = char::from_u32(cp).unwrap_or('\u{FFFD}');
                            let mut buf = [0u8; 4];
                            out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                        }
                        _ => {
                            self.i = i;
                            return self.err();
                        }
                    }
                }
                c if c < 0x20 => {
                    self.i = i;
                    return self.err();
                }
                c => out.push(c),
            }
        }
        self.i = i;
        String::from_utf8(out)
            .map(Cow::Owned)
            .or_else(|_| self.err())
    }

    /// Skips one value without building anything, checking its syntax as
    /// strictly as [`Scanner::value`] does.
    /// `base` is the nesting depth of the value (limits count from the root).
    fn skip(&mut self, base: usize) -> Result<(), JsonError> {
        let mut stack = [0u8; MAX_DEPTH + 1];
        let mut depth = 0usize;
        loop {
            // A value.
            if base + depth > MAX_DEPTH {
                return Err(JsonError::TooDeep);
            }
            match self.peek() {
                Some(open @ (b'{' | b'[')) => {
                    self.i += 1;
                    let close = if open == b'{' { b'}' } else { b']' };
                    if self.peek() == Some(close) {
                        self.i += 1;
                    } else {
                        stack[depth] = open;
                        depth += 1;
                        if open == b'{' {
                            self.key()?;
                        }
                        continue;
                    }
                }
                Some(b'"') => self.skip_string()?,
                Some(_) => self.skip_scalar()?,
                None => return self.err(),
            }
            // What follows a value.
            loop {
                if depth == 0 {
                    return Ok(());
                }
                let top = stack[depth - 1];
                match self.peek() {
                    Some(b',') => {
                        self.i += 1;
                        if top == b'{' {
                            self.key()?;
                        }
                        break;
                    }
                    Some(b'}') if top == b'{' => {
                        self.i += 1;
                        depth -= 1;
                    }
                    Some(b']') if top == b'[' => {
                        self.i += 1;
                        depth -= 1;
                    }
                    _ => return self.err(),
                }
            }
        }
    }

    /// `"key":` inside an object being skipped.
    fn key(&mut self) -> Result<(), JsonError> {
        if self.peek() != Some(b'"') {
            return self.err();
        }
        self.skip_string()?;
        self.expect(b':')
    }
}

/// An owned leaf value.
#[derive(Debug, Clone, PartialEq)]
pub enum Owned {
    Str(String),
    /// JSON number text.
    Num(String),
    Bool(bool),
    Null,
}

/// A leaf with its full path (for `explain` and one-off matching).
#[derive(Debug, Clone, PartialEq)]
pub struct Leaf {
    pub path: Vec<String>,
    pub value: Owned,
    pub trail: Vec<(u32, u32)>,
}

impl Owned {
    pub(crate) fn scalar(&self) -> Scalar<'_> {
        match self {
            Owned::Str(s) => Scalar::Str(s),
            Owned::Num(n) => Scalar::Num(n),
            Owned::Bool(b) => Scalar::Bool(*b),
            Owned::Null => Scalar::Null,
        }
    }
}

impl Leaf {
    pub(crate) fn scalar(&self) -> Scalar<'_> {
        self.value.scalar()
    }
}

/// Collects every leaf with its path.
pub(crate) struct Flatten {
    /// Path per node; node 0 is the root.
    pub(crate) paths: Vec<Vec<String>>,
    pub(crate) leaves: Vec<Leaf>,
}

impl Default for Flatten {
    fn default() -> Self {
        Flatten {
            paths: vec![Vec::new()],
            leaves: Vec::new(),
        }
    }
}

impl Visit for Flatten {
    type Node = usize;
    fn child(&mut self, parent: usize, key: &str) -> Option<usize> {
        let mut p = self.paths.get(parent).cloned().unwrap_or_default();
        p.push(key.to_string());
        self.paths.push(p);
        Some(self.paths.len() - 1)
    }
    fn leaf(&mut self, node: usize, value: Value<'_>, trail: &[(u32, u32)]) {
        let value = match value {
            Value::Str(s) => Owned::Str(s.into_owned()),
            Value::Num(n) => Owned::Num(n.to_string()),
            Value::Bool(b) => Owned::Bool(b),
            Value::Null => Owned::Null,
        };
        self.leaves.push(Leaf {
            path: self.paths.get(node).cloned().unwrap_or_default(),
            value,
            trail: trail.to_vec(),
        });
    }
    fn mark(&self) -> usize {
        self.leaves.len()
    }
    fn rollback(&mut self, mark: usize) {
        self.leaves.truncate(mark);
    }
}

/// Every leaf of a JSON document.
pub fn flatten(bytes: &[u8]) -> Result<Vec<Leaf>, JsonError> {
    let mut f = Flatten::default();
    let mut n = 0;
    scan(bytes, 0, &mut f, &mut n)?;
    Ok(f.leaves)
}

/// Scans an event as patterns see it: its envelope attributes, extensions,
/// and `data` when it is JSON (malformed `data` counts as absent).
pub(crate) fn scan_event<V: Visit>(event: &crate::event::Event, root: V::Node, visit: &mut V) {
    let string = |visit: &mut V, key: &str, value: &str| {
        if let Some(n) = visit.child(root, key) {
            visit.leaf(n, Value::Str(Cow::Borrowed(value)), &[]);
        }
    };
    for (k, v) in &event.extensions {
        if !crate::event::CONTEXT_ATTRIBUTES.contains(&k.as_str()) {
            string(visit, k, v);
        }
    }
    string(visit, "id", &event.id);
    string(visit, "source", &event.source);
    string(visit, "type", &event.ty);
    if let Some(s) = &event.subject {
        string(visit, "subject", s);
    }
    string(visit, "time", &event.time);
    string(visit, "datacontenttype", &event.datacontenttype);
    if event.data_is_json()
        && let Some(n) = visit.child(root, "data")
    {
        let mark = visit.mark();
        let mut arrays = 0;
        if scan(&event.data, n, visit, &mut arrays).is_err() {
            visit.rollback(mark);
        }
    }
}
