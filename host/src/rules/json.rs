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
    /// The node for `key` (valid UTF-8) under `parent`, or `None` to skip
    /// its value.
    fn child(&mut self, parent: Self::Node, key: &[u8]) -> Option<Self::Node>;
    /// Whether scalars at `node` are wanted (else they are only checked).
    fn wants(&self, _node: Self::Node) -> bool {
        true
    }
    /// The bit of named key `node` in its object's set of named keys (0: not
    /// tracked). A tracked key repeated in one object counts once: the first.
    fn bit(&self, _node: Self::Node) -> u64 {
        0
    }
    /// The bits of every key named under `node` (0: none tracked). Once an
    /// object at `node` has shown all of them, its other members are only
    /// skipped: nothing more in it can match.
    fn named(&self, _node: Self::Node) -> u64 {
        0
    }
    /// Whether repeated keys in an object at `node` are told apart by their
    /// text instead of by [`Visit::bit`] (for a visitor that takes every key,
    /// as [`Flatten`] does, or a node with too many keys for the bits).
    fn dedup_keys(&self, _node: Self::Node) -> bool {
        false
    }
    /// A scalar at `node`.
    fn leaf(&mut self, node: Self::Node, value: Value<'_>, trail: &[(u32, u32)]);
    /// How many leaves were taken so far (to drop a malformed part).
    fn mark(&self) -> usize;
    /// Forgets the leaves taken after `mark`.
    fn rollback(&mut self, mark: usize);
}

/// Scans one JSON document whose root sits at `node`, checking all of it as
/// strictly as serde_json does. `next_array` numbers array instances (pass
/// the same counter for every part of one event).
pub(crate) fn scan<V: Visit>(
    bytes: &[u8],
    node: V::Node,
    visit: &mut V,
    next_array: &mut u32,
) -> Result<(), JsonError> {
    scan_as::<V, false>(bytes, node, visit, next_array)
}

/// [`scan`] for a document already known to be valid JSON (an event's data
/// is checked when it is accepted): values no pattern names are skipped by
/// their brackets and quotes alone, and reading stops once every named field
/// has been seen. On invalid input the result is unspecified but safe (no
/// panic, no endless loop): an error, or leaves from the part read.
pub(crate) fn scan_valid<V: Visit>(
    bytes: &[u8],
    node: V::Node,
    visit: &mut V,
    next_array: &mut u32,
) -> Result<(), JsonError> {
    scan_as::<V, true>(bytes, node, visit, next_array)
}

fn scan_as<V: Visit, const VALID: bool>(
    bytes: &[u8],
    node: V::Node,
    visit: &mut V,
    next_array: &mut u32,
) -> Result<(), JsonError> {
    let mut s = Scanner::<VALID> {
        b: bytes,
        i: 0,
        trail: Vec::new(),
        keys: Vec::new(),
        done: false,
        next_array,
    };
    s.value(node, visit, 0, 0, true)?;
    s.ws();
    if s.i != s.b.len() {
        return Err(JsonError::Syntax(s.i));
    }
    Ok(())
}

/// `VALID`: the document is known to be valid JSON (see [`scan_valid`]).
struct Scanner<'a, 'c, const VALID: bool> {
    b: &'a [u8],
    i: usize,
    trail: Vec<(u32, u32)>,
    /// Keys taken in the open objects, for [`Visit::dedup_keys`].
    keys: Vec<Vec<u8>>,
    /// Valid documents: everything wanted has been seen; the rest is not read.
    done: bool,
    next_array: &'c mut u32,
}

impl<'a, const VALID: bool> Scanner<'a, '_, VALID> {
    fn err<T>(&self) -> Result<T, JsonError> {
        Err(JsonError::Syntax(self.i))
    }

    fn ws(&mut self) {
        self.i = ws(self.b, self.i);
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
    /// not constrain each other. `last`: once this value has shown all its
    /// named keys, so has every object it sits in (nothing after it is
    /// wanted).
    fn value<V: Visit>(
        &mut self,
        node: V::Node,
        visit: &mut V,
        depth: usize,
        eff: usize,
        last: bool,
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
                let frame = self.keys.len();
                let r = self.members(node, visit, depth, last);
                self.keys.truncate(frame);
                r
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
                    let r = self.value(node, visit, depth + 1, eff, false);
                    self.trail.pop();
                    r?;
                    if self.done {
                        return Ok(());
                    }
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
            Some(b'"') if !visit.wants(node) => self.skip_string(),
            Some(b'"') => {
                let s = self.string()?;
                visit.leaf(node, Value::Str(s), &self.trail[..eff]);
                Ok(())
            }
            Some(_) if !visit.wants(node) => self.skip_scalar(),
            Some(_) => {
                let v = self.scalar()?;
                visit.leaf(node, v, &self.trail[..eff]);
                Ok(())
            }
            None => self.err(),
        }
    }

    /// An object's members, its `{` read.
    fn members<V: Visit>(
        &mut self,
        node: V::Node,
        visit: &mut V,
        depth: usize,
        last: bool,
    ) -> Result<(), JsonError> {
        let named = visit.named(node);
        let by_key = visit.dedup_keys(node);
        let frame = self.keys.len();
        let mut seen = 0u64;
        loop {
            if self.peek() != Some(b'"') {
                return self.err();
            }
            let key = self.key_bytes()?;
            self.expect(b':')?;
            let child = match visit.child(node, &key) {
                Some(_) if by_key && self.keys[frame..].iter().any(|k| **k == *key) => None,
                Some(child) if by_key => {
                    self.keys.push(key.into_owned());
                    Some(child)
                }
                Some(child) => {
                    let bit = visit.bit(child);
                    if seen & bit != 0 {
                        None
                    } else {
                        seen |= bit;
                        Some(child)
                    }
                }
                None => None,
            };
            match child {
                Some(child) => {
                    let eff = self.trail.len();
                    let child_last = VALID && last && named != 0 && seen == named;
                    self.value(child, visit, depth + 1, eff, child_last)?;
                    if self.done {
                        return Ok(());
                    }
                }
                None => self.skip(depth + 1)?,
            }
            if named != 0 && seen == named {
                if VALID && last {
                    self.done = true;
                    self.i = self.b.len();
                    return Ok(());
                }
                return self.rest_of_object(depth);
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

    /// Past the rest of an object (after one of its values) in which nothing
    /// more is wanted: checked as strictly as ever, or, in a valid document,
    /// jumped over by its brackets.
    fn rest_of_object(&mut self, depth: usize) -> Result<(), JsonError> {
        if VALID {
            let end = close_valid(self.b, self.i, 1);
            return self.advance(end);
        }
        loop {
            match self.peek() {
                Some(b',') => {
                    let end = key_end(self.b, self.i + 1);
                    self.advance(end)?;
                    self.skip(depth + 1)?;
                }
                Some(b'}') => {
                    self.i += 1;
                    return Ok(());
                }
                _ => return self.err(),
            }
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

    /// Moves to the end a skip function found (`Ok`), or to where it failed
    /// (`Err`) and reports the error there.
    fn advance(&mut self, end: Result<usize, usize>) -> Result<(), JsonError> {
        match end {
            Ok(i) => {
                self.i = i;
                Ok(())
            }
            Err(i) => {
                self.i = i;
                self.err()
            }
        }
    }

    /// Moves past a number, checking its syntax (as [`Scanner::number`]).
    fn number_end(&mut self) -> Result<(), JsonError> {
        let end = number_end(self.b, self.i);
        self.advance(end)
    }

    /// Skips a scalar other than a string, as strictly as [`Scanner::scalar`].
    fn skip_scalar(&mut self) -> Result<(), JsonError> {
        let end = if VALID {
            scalar_end_valid(self.b, self.i)
        } else {
            scalar_end(self.b, self.i)
        };
        self.advance(end)
    }

    /// Skips a string at `"`, as strictly as [`Scanner::string`] but without
    /// decoding it (escaped strings take the decoding path).
    fn skip_string(&mut self) -> Result<(), JsonError> {
        let end = if VALID {
            string_end_valid(self.b, self.i)
        } else {
            string_end(self.b, self.i)
        };
        self.advance(end)
    }

    /// An object key at `"`, decoded, as bytes (valid UTF-8).
    fn key_bytes(&mut self) -> Result<Cow<'a, [u8]>, JsonError> {
        let b = self.b;
        let start = self.i + 1;
        let i = string_stop(b, start);
        if b.get(i) == Some(&b'"') {
            self.i = i + 1;
            let key = &b[start..i];
            return if utf8(key) {
                Ok(Cow::Borrowed(key))
            } else {
                self.err()
            };
        }
        Ok(match self.string()? {
            Cow::Borrowed(s) => Cow::Borrowed(s.as_bytes()),
            Cow::Owned(s) => Cow::Owned(s.into_bytes()),
        })
    }

    /// A string at `"`, decoded.
    fn string(&mut self) -> Result<Cow<'a, str>, JsonError> {
        self.i += 1;
        let start = self.i;
        let b = self.b;
        // Fast path: no escapes.
        let mut i = string_stop(b, start);
        match b.get(i) {
            Some(b'"') => {
                self.i = i + 1;
                return std::str::from_utf8(&b[start..i])
                    .map(Cow::Borrowed)
                    .or_else(|_| self.err());
            }
            Some(b'\\') => {}
            _ => {
                self.i = i;
                return self.err();
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
                c => {
                    // Copy the run up to the next special byte at once.
                    let end = string_stop(b, i);
                    out.push(c);
                    out.extend_from_slice(&b[i..end]);
                    i = end;
                }
            }
        }
        self.i = i;
        String::from_utf8(out)
            .map(Cow::Owned)
            .or_else(|_| self.err())
    }

    /// Skips one value without building anything, checking its syntax as
    /// strictly as [`Scanner::value`] does (same errors at the same offsets).
    /// `base` is the nesting depth of the value (limits count from the root).
    fn skip(&mut self, base: usize) -> Result<(), JsonError> {
        if VALID {
            let end = skip_value_valid(self.b, self.i);
            return self.advance(end);
        }
        match skip_value(self.b, self.i, base) {
            Ok(i) => {
                self.i = i;
                Ok(())
            }
            Err(Some(i)) => {
                self.i = i;
                self.err()
            }
            Err(None) => Err(JsonError::TooDeep),
        }
    }
}

/// Past the value at `i` (whitespace first), checked as strictly as
/// [`Scanner::value`] checks it; else the offset of the syntax error, or
/// `None` when nested deeper than the limit (`base` is the value's depth).
#[inline(never)]
fn skip_value(b: &[u8], mut i: usize, base: usize) -> Result<usize, Option<usize>> {
    // One bit per open container: set for an object.
    let mut objects = [0u64; MAX_DEPTH / 64 + 1];
    let mut depth = 0usize;
    loop {
        // A value.
        if base + depth > MAX_DEPTH {
            return Err(None);
        }
        i = ws(b, i);
        match b.get(i) {
            Some(b'"') => i = string_end(b, i)?,
            Some(&open @ (b'{' | b'[')) => {
                i = ws(b, i + 1);
                let close = if open == b'{' { b'}' } else { b']' };
                if b.get(i) == Some(&close) {
                    i += 1;
                } else {
                    let bit = 1u64 << (depth % 64);
                    if open == b'{' {
                        objects[depth / 64] |= bit;
                        depth += 1;
                        i = key_end(b, i)?;
                    } else {
                        objects[depth / 64] &= !bit;
                        depth += 1;
                    }
                    continue;
                }
            }
            Some(b'-' | b'0'..=b'9') => {
                i = number_end(b, i)?;
                // Arrays of numbers (coordinates): `, ` and the next number
                // without the general dispatch.
                if depth > 0 && objects[(depth - 1) / 64] & (1u64 << ((depth - 1) % 64)) == 0 {
                    while b.get(i) == Some(&b',') {
                        let j = ws(b, i + 1);
                        if !matches!(b.get(j), Some(b'-' | b'0'..=b'9')) {
                            break;
                        }
                        i = number_end(b, j)?;
                    }
                }
            }
            Some(_) => i = scalar_end(b, i)?,
            None => return Err(Some(i)),
        }
        // What follows a value.
        loop {
            if depth == 0 {
                return Ok(i);
            }
            let top = depth - 1;
            let object = objects[top / 64] & (1u64 << (top % 64)) != 0;
            i = ws(b, i);
            match b.get(i) {
                Some(b',') => {
                    i += 1;
                    if object {
                        i = key_end(b, i)?;
                    }
                    break;
                }
                Some(b'}') if object => {
                    i += 1;
                    depth -= 1;
                }
                Some(b']') if !object => {
                    i += 1;
                    depth -= 1;
                }
                _ => return Err(Some(i)),
            }
        }
    }
}

/// Past the string at `i` (its `"`), checked as [`Scanner::string`] checks
/// it; else the offset of the error.
#[inline(always)]
fn string_end(b: &[u8], i: usize) -> Result<usize, usize> {
    let start = i + 1;
    let end = string_stop(b, start);
    match b.get(end) {
        Some(b'"') if utf8(&b[start..end]) => Ok(end + 1),
        Some(b'"') => Err(end + 1),
        Some(b'\\') => escaped_string_end(b, i),
        _ => Err(end),
    }
}

/// [`string_end`] for a string with escapes: decoded to check it.
#[cold]
fn escaped_string_end(b: &[u8], i: usize) -> Result<usize, usize> {
    let mut s = Scanner::<false> {
        b,
        i,
        trail: Vec::new(),
        keys: Vec::new(),
        done: false,
        next_array: &mut 0,
    };
    match s.string() {
        Ok(_) => Ok(s.i),
        Err(_) => Err(s.i),
    }
}

/// Past the value at `i` (whitespace first) of a valid document, by its
/// brackets and quotes alone; else where the input ended.
fn skip_value_valid(b: &[u8], i: usize) -> Result<usize, usize> {
    let i = ws(b, i);
    match b.get(i) {
        Some(b'"') => string_end_valid(b, i),
        Some(b'{' | b'[') => close_valid(b, i + 1, 1),
        Some(_) => scalar_end_valid(b, i),
        None => Err(i),
    }
}

/// Past the bracket that closes the `depth` containers open at `i`, in a
/// valid document: only quotes and brackets are looked at, eight bytes at a
/// time.
fn close_valid(b: &[u8], mut i: usize, mut depth: usize) -> Result<usize, usize> {
    loop {
        i = structural_stop(b, i);
        match b.get(i) {
            Some(b'"') => i = string_end_valid(b, i)?,
            Some(b'{' | b'[') => {
                depth += 1;
                i += 1;
            }
            Some(b'}' | b']') => {
                depth -= 1;
                i += 1;
                if depth == 0 {
                    return Ok(i);
                }
            }
            // Another byte `structural_stop` flags (`Y`, `_`, `y`, DEL).
            Some(_) => i += 1,
            None => return Err(i),
        }
    }
}

/// Past the string at `i` (its `"`) of a valid document, not decoded.
#[inline(always)]
fn string_end_valid(b: &[u8], i: usize) -> Result<usize, usize> {
    let mut i = i + 1;
    loop {
        i = string_stop(b, i);
        match b.get(i) {
            Some(b'"') => return Ok(i + 1),
            Some(b'\\') => i += 2,
            // A control byte (invalid, but this document is taken as valid).
            Some(_) => i += 1,
            None => return Err(i),
        }
    }
}

/// Past the number or literal at `i` of a valid document.
#[inline(always)]
fn scalar_end_valid(b: &[u8], mut i: usize) -> Result<usize, usize> {
    let start = i;
    while let Some(c) = b.get(i) {
        if matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
            break;
        }
        i += 1;
    }
    if i == start { Err(i) } else { Ok(i) }
}

/// The first byte at or after `i` that may be `"`, `[`, `]`, `{` or `}` (or
/// the end). Bytes equal to 0x59, 0x5B, 0x5D, 0x5F, 0x79, 0x7B, 0x7D or 0x7F
/// under the mask 0xD9 are flagged, so `Y`, `_`, `y` and DEL are too (they
/// occur outside strings in no valid document).
#[inline(always)]
fn structural_stop(b: &[u8], mut i: usize) -> usize {
    while let Some(v) = word(b, i) {
        let m = exact_zeros(v ^ (b'"' as u64 * ONES))
            | exact_zeros((v & (0xD9 * ONES)) ^ (0x59 * ONES));
        if m != 0 {
            return i + (m.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while let Some(&c) = b.get(i) {
        if c == b'"' || c & 0xD9 == 0x59 {
            break;
        }
        i += 1;
    }
    i
}

/// The high bit of every byte of `x` that is zero (exact in every byte).
#[inline(always)]
fn exact_zeros(x: u64) -> u64 {
    !(((x & !HIGH) + !HIGH) | x) & HIGH
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// The eight bytes at `i`, little-endian, if there are eight.
#[inline(always)]
fn word(b: &[u8], i: usize) -> Option<u64> {
    b.get(i..)
        .and_then(<[u8]>::first_chunk::<8>)
        .map(|w| u64::from_le_bytes(*w))
}

/// The high bit of every byte of `v` that is not an ASCII digit.
#[inline(always)]
fn non_digits(v: u64) -> u64 {
    let x = v ^ (0x30 * ONES);
    // A byte is a digit iff x < 10: (x & 0x7f) + 0x76 does not carry out
    // of its byte and sets the high bit iff (x & 0x7f) >= 10.
    (((x & !HIGH) + 0x76 * ONES) | x) & HIGH
}

/// The high bit of the lowest byte of `x` that is zero (higher bytes may be
/// flagged wrongly; the lowest flagged one is exact).
#[inline(always)]
fn zeros(x: u64) -> u64 {
    x.wrapping_sub(ONES) & !x & HIGH
}

/// Past the ASCII digits at `i`, eight at a time.
#[inline(always)]
fn digits_end(b: &[u8], mut i: usize) -> usize {
    while let Some(v) = word(b, i) {
        let m = non_digits(v);
        if m != 0 {
            return i + (m.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while b.get(i).is_some_and(u8::is_ascii_digit) {
        i += 1;
    }
    i
}

/// The first `"`, `\` or control byte at or after `i` (or the end).
#[inline(always)]
fn string_stop(b: &[u8], mut i: usize) -> usize {
    while let Some(v) = word(b, i) {
        let m = zeros(v ^ (b'"' as u64 * ONES))
            | zeros(v ^ (b'\\' as u64 * ONES))
            | (v.wrapping_sub(0x20 * ONES) & !v & HIGH);
        if m != 0 {
            return i + (m.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while let Some(&c) = b.get(i) {
        if c == b'"' || c == b'\\' || c < 0x20 {
            break;
        }
        i += 1;
    }
    i
}

/// Whether string content (no escapes) is valid UTF-8.
#[inline(always)]
fn utf8(s: &[u8]) -> bool {
    s.is_ascii() || std::str::from_utf8(s).is_ok()
}

/// Past the whitespace at `i`.
#[inline(always)]
fn ws(b: &[u8], mut i: usize) -> usize {
    while let Some(c) = b.get(i) {
        if matches!(c, b' ' | b'\t' | b'\n' | b'\r') {
            i += 1;
        } else {
            break;
        }
    }
    i
}

/// The end of the number at `i`, or the offset of its syntax error.
#[inline(always)]
fn number_end(b: &[u8], start: usize) -> Result<usize, usize> {
    let mut i = start;
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    if b.get(i) == Some(&b'0') {
        i += 1;
    } else {
        let e = digits_end(b, i);
        if e == i {
            return Err(start);
        }
        i = e;
    }
    if b.get(i) == Some(&b'.') {
        let e = digits_end(b, i + 1);
        if e == i + 1 {
            return Err(e);
        }
        i = e;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let e = digits_end(b, i);
        if e == i {
            return Err(e);
        }
        i = e;
    }
    Ok(i)
}

/// The end of the scalar other than a string at `i` (a literal or a
/// number), or the offset of its syntax error.
#[inline(always)]
fn scalar_end(b: &[u8], i: usize) -> Result<usize, usize> {
    let lit: &[u8] = match b.get(i) {
        Some(b't') => b"true",
        Some(b'f') => b"false",
        Some(b'n') => b"null",
        _ => return number_end(b, i),
    };
    if b.get(i..).is_some_and(|r| r.starts_with(lit)) {
        Ok(i + lit.len())
    } else {
        Err(i)
    }
}

/// Past `"key":` (whitespace first) inside an object being skipped, or the
/// offset of its syntax error. Escaped keys are checked by decoding them.
fn key_end(b: &[u8], i: usize) -> Result<usize, usize> {
    let i = ws(b, i);
    if b.get(i) != Some(&b'"') {
        return Err(i);
    }
    let i = string_end(b, i)?;
    let i = ws(b, i);
    if b.get(i) == Some(&b':') {
        Ok(i + 1)
    } else {
        Err(i)
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
    fn dedup_keys(&self, _node: usize) -> bool {
        true
    }
    fn child(&mut self, parent: usize, key: &[u8]) -> Option<usize> {
        let mut p = self.paths.get(parent).cloned().unwrap_or_default();
        p.push(String::from_utf8_lossy(key).into_owned());
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
/// and `data` when it is JSON (malformed `data` counts as absent). `data` is
/// read with [`scan_valid`]: JSON data is checked when an event is accepted
/// (`Event::check_data`).
pub(crate) fn scan_event<V: Visit>(event: &crate::event::Event, root: V::Node, visit: &mut V) {
    let string = |visit: &mut V, key: &str, value: &str| {
        if let Some(n) = visit.child(root, key.as_bytes()) {
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
        && let Some(n) = visit.child(root, b"data")
    {
        let mark = visit.mark();
        let mut arrays = 0;
        if scan_valid(&event.data, n, visit, &mut arrays).is_err() {
            visit.rollback(mark);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Looks inside nothing: every value goes through `skip_value`.
    struct Nothing;
    impl Visit for Nothing {
        type Node = ();
        fn child(&mut self, _: (), _: &[u8]) -> Option<()> {
            None
        }
        fn leaf(&mut self, _: (), _: Value<'_>, _: &[(u32, u32)]) {}
        fn mark(&self) -> usize {
            0
        }
        fn rollback(&mut self, _: usize) {}
    }

    /// Skipping a value and decoding it reject the same documents, at the
    /// same offsets (mutated documents: numbers, escapes, UTF-8, nesting).
    #[test]
    fn skipping_and_decoding_agree_on_errors() {
        let seeds = [
            r#"{"p": {"A": "0123", "N": -0.5e+10, "y": [true, false, null, 1E5, 0, -0, 123456789012.5]}, "g": {"t": "P", "c": [[[-122.4123456789012, 37.7123456789012, 0.0], [1, 2]]]}}"#.to_string(),
            r#"{"a\"b": "c\\d\u00e9\ud83d\ude00", "é": "ü日本", "k": {"\u0041": [{"z": "q\n"}, {}], "e": []}}"#.to_string(),
            "{\"a\":\"x\u{7f}y\u{80}z\",\"b\":[ 1 , 2 ],\n\"c\"\t:\r{ } }".to_string(),
            format!("{{\"z\":{}{}}}", "[{\"a\":".repeat(70), "}]".repeat(70)),
        ];
        let bytes = b"\"\\{}[],:0123456789-+.eEtrufalsn \t\x01\xc3\xa9\xff";
        let mut rng = fastrand::Rng::with_seed(3);
        for n in 0..20_000 {
            let mut doc = seeds[n % seeds.len()].as_bytes().to_vec();
            for _ in 0..rng.usize(0..3) {
                let at = rng.usize(0..doc.len().max(1));
                let c = bytes[rng.usize(0..bytes.len())];
                match rng.u8(0..3) {
                    0 if at < doc.len() => drop(doc.remove(at)),
                    1 => doc.insert(at.min(doc.len()), c),
                    _ if at < doc.len() => doc[at] = c,
                    _ => {}
                }
            }
            let decoded = flatten(&doc).map(drop);
            let skipped = scan(&doc, (), &mut Nothing, &mut 0);
            assert_eq!(decoded, skipped, "{}", String::from_utf8_lossy(&doc));
        }
    }
}
