//! Event patterns: Amazon EventBridge's pattern language, written in TOML.
//!
//! A pattern is a table of fields. A field's value is either a nested table
//! (the event's field must be an object matching it) or a list of match
//! conditions, any of which may match. Conditions are literals (string,
//! number, boolean, or `{ null = true }`, since TOML has no null) and operator
//! tables: `prefix`, `suffix`, `equals-ignore-case`, `wildcard`,
//! `anything-but`, `numeric`, `exists`, `cidr`. `$or` takes a list of
//! alternative field tables, at any level.
//!
//! Semantics (those of EventBridge / aws event-ruler):
//! - the event is seen as its leaves: every scalar (string, number, boolean,
//!   null) with the path of object keys leading to it; arrays are transparent,
//!   so an array matches if any element matches;
//! - exact numbers compare their JSON *text* (`300`, `300.0` and `3.0e2` are
//!   three values); only `numeric` compares values;
//! - `""`, `null` and a missing field are three different things; `exists`
//!   looks at leaves only (an object is not a leaf);
//! - `anything-but` matches a leaf (of any type) that does not match what it
//!   names, so an array matches if one element is not excluded;
//! - array consistency: fields matched inside elements of the same array of
//!   objects must come from the same element (`{a: {b: [1], c: [2]}}` does not
//!   match `{"a": [{"b": 1}, {"c": 2}]}`); `exists = false` means no such leaf
//!   consistent with the leaves that matched the other fields.
//!
//! `$or` is expanded into alternatives ([`Pattern::alternatives`]): each is a
//! conjunction of field tests, which is what the compiled matcher indexes.

use std::fmt;
use std::net::IpAddr;
use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// A pattern may expand (through `$or`) into at most this many alternatives.
pub const MAX_ALTERNATIVES: usize = 256;
/// A `wildcard` may hold at most this many `*`.
pub const MAX_WILDCARD_STARS: usize = 8;

/// A problem in a pattern, with where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct PatternError {
    /// Byte range in the config file.
    pub span: Range<usize>,
    /// The field path inside `match`, e.g. `data.total`.
    pub path: String,
    pub message: String,
}

/// A compiled pattern.
#[derive(Debug, Clone, PartialEq)]
pub struct Pattern {
    root: FieldSet,
    alts: Vec<Conj>,
}

#[derive(Debug, Clone, PartialEq)]
struct FieldSet {
    fields: Vec<(String, Node)>,
    /// Each group needs one of its alternatives to match.
    or_groups: Vec<Vec<FieldSet>>,
}

#[derive(Debug, Clone, PartialEq)]
enum Node {
    Nested(FieldSet),
    Any(Vec<Condition>),
}

/// One alternative of a pattern: every slot must be satisfied.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Conj {
    pub(crate) slots: Vec<Slot>,
}

/// A field test: some leaf at `path` matches one of `conds`, or (when one of
/// them is `exists = false`) no leaf is at `path`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Slot {
    pub(crate) path: Vec<String>,
    pub(crate) conds: Vec<Condition>,
}

impl Slot {
    /// Whether absence satisfies the slot.
    pub(crate) fn absent_ok(&self) -> bool {
        self.conds
            .iter()
            .any(|c| matches!(c, Condition::Exists(false)))
    }
    pub(crate) fn dotted(&self) -> String {
        self.path.join(".")
    }
}

/// One match condition on a leaf.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Condition {
    Exact(Literal),
    Prefix(String),
    Suffix(String),
    /// `prefix = { equals-ignore-case = "..." }`; held in lower case.
    PrefixIgnoreCase(String),
    /// `suffix = { equals-ignore-case = "..." }`; held in lower case.
    SuffixIgnoreCase(String),
    EqualsIgnoreCase(String),
    Wildcard(Wildcard),
    AnythingBut(AnythingBut),
    Numeric(NumRange),
    Exists(bool),
    Cidr(Cidr),
}

/// What `anything-but` excludes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum AnythingBut {
    Values(Vec<Literal>),
    Prefix(String),
    Suffix(String),
    EqualsIgnoreCase(Vec<String>),
    Wildcard(Vec<Wildcard>),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Literal {
    String(String),
    /// The number's JSON text: exact matching compares text, as in
    /// EventBridge (`numeric` compares values).
    Number(String),
    Bool(bool),
    Null,
}

/// A glob: literal pieces separated by `*` (so `pieces.len() - 1` stars).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Wildcard {
    pub(crate) text: String,
    pub(crate) pieces: Vec<String>,
}

/// A numeric interval; a bound is (value, inclusive).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct NumRange {
    pub(crate) lo: Option<(f64, bool)>,
    pub(crate) hi: Option<(f64, bool)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cidr {
    pub(crate) net: IpAddr,
    pub(crate) bits: u8,
}

/// An event leaf, as conditions see it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Scalar<'a> {
    Str(&'a str),
    /// JSON number text.
    Num(&'a str),
    Bool(bool),
    Null,
}

impl fmt::Display for Scalar<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scalar::Str(s) => write!(f, "{}", serde_json::Value::from(*s)),
            Scalar::Num(n) => f.write_str(n),
            Scalar::Bool(b) => write!(f, "{b}"),
            Scalar::Null => f.write_str("null"),
        }
    }
}

impl fmt::Display for Literal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Literal::String(s) => write!(f, "{}", serde_json::Value::from(s.as_str())),
            Literal::Number(n) => f.write_str(n),
            Literal::Bool(b) => write!(f, "{b}"),
            Literal::Null => f.write_str("null"),
        }
    }
}

impl Literal {
    pub(crate) fn equals(&self, leaf: &Scalar<'_>) -> bool {
        match (self, leaf) {
            (Literal::String(a), Scalar::Str(b)) => a == b,
            (Literal::Number(a), Scalar::Num(b)) => a == b,
            (Literal::Bool(a), Scalar::Bool(b)) => a == b,
            (Literal::Null, Scalar::Null) => true,
            _ => false,
        }
    }
}

impl Wildcard {
    /// Parses `*` (any run of characters), `\*` (a star) and `\\`.
    fn parse(text: &str) -> Result<Wildcard, String> {
        let mut pieces = vec![String::new()];
        let mut chars = text.chars().peekable();
        let mut last_star = false;
        while let Some(c) = chars.next() {
            match c {
                '*' => {
                    if last_star {
                        return Err(format!(
                            "`wildcard` \"{text}\" has `**`; consecutive stars are not allowed"
                        ));
                    }
                    pieces.push(String::new());
                    last_star = true;
                    continue;
                }
                '\\' => match chars.next() {
                    Some(e @ ('*' | '\\')) => push_last(&mut pieces, e),
                    _ => {
                        return Err(format!(
                            "`wildcard` \"{text}\": `\\` escapes only `*` or `\\`"
                        ));
                    }
                },
                c => push_last(&mut pieces, c),
            }
            last_star = false;
        }
        if pieces.len() - 1 > MAX_WILDCARD_STARS {
            return Err(format!(
                "`wildcard` \"{text}\" has more than {MAX_WILDCARD_STARS} `*`; such patterns make matching slow"
            ));
        }
        Ok(Wildcard {
            text: text.to_string(),
            pieces,
        })
    }

    pub(crate) fn matches(&self, s: &str) -> bool {
        let (first, rest) = match self.pieces.split_first() {
            Some(x) => x,
            None => return s.is_empty(),
        };
        if rest.is_empty() {
            return s == first;
        }
        let Some(mut tail) = s.strip_prefix(first.as_str()) else {
            return false;
        };
        let (last, middle) = match rest.split_last() {
            Some(x) => x,
            None => return true,
        };
        for piece in middle {
            match tail.find(piece.as_str()) {
                Some(i) => tail = &tail[i + piece.len()..],
                None => return false,
            }
        }
        tail.len() >= last.len() && tail.ends_with(last.as_str())
    }
}

fn push_last(pieces: &mut [String], c: char) {
    if let Some(p) = pieces.last_mut() {
        p.push(c);
    }
}

impl NumRange {
    pub(crate) fn contains(&self, x: f64) -> bool {
        let lo_ok = match self.lo {
            None => true,
            Some((b, true)) => x >= b,
            Some((b, false)) => x > b,
        };
        let hi_ok = match self.hi {
            None => true,
            Some((b, true)) => x <= b,
            Some((b, false)) => x < b,
        };
        lo_ok && hi_ok
    }
}

impl fmt::Display for NumRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.lo, self.hi) {
            (Some((a, true)), Some((b, true))) if a == b => write!(f, "= {a}"),
            (lo, hi) => {
                let mut parts = Vec::new();
                if let Some((a, inc)) = lo {
                    parts.push(format!("{} {a}", if inc { ">=" } else { ">" }));
                }
                if let Some((b, inc)) = hi {
                    parts.push(format!("{} {b}", if inc { "<=" } else { "<" }));
                }
                f.write_str(&parts.join(" and "))
            }
        }
    }
}

impl Cidr {
    fn parse(text: &str) -> Result<Cidr, String> {
        let bad = || {
            format!(
                "`cidr` \"{text}\" is not a CIDR block, e.g. \"10.0.0.0/24\" or \"2001:db8::/32\""
            )
        };
        let (addr, bits) = text.split_once('/').ok_or_else(bad)?;
        let net: IpAddr = addr.parse().map_err(|_| bad())?;
        let bits: u8 = bits.parse().map_err(|_| bad())?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        if bits > max {
            return Err(format!(
                "`cidr` \"{text}\": prefix length {bits} is over {max}"
            ));
        }
        Ok(Cidr { net, bits })
    }

    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        fn masked(v: u128, bits: u8, width: u8) -> u128 {
            if bits == 0 { 0 } else { v >> (width - bits) }
        }
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                masked(u32::from(n) as u128, self.bits, 32)
                    == masked(u32::from(a) as u128, self.bits, 32)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                masked(u128::from(n), self.bits, 128) == masked(u128::from(a), self.bits, 128)
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.bits)
    }
}

impl AnythingBut {
    /// Whether `leaf` is one of the excluded values.
    pub(crate) fn excludes(&self, leaf: &Scalar<'_>) -> bool {
        match self {
            AnythingBut::Values(vs) => vs.iter().any(|v| v.equals(leaf)),
            AnythingBut::Prefix(p) => matches!(leaf, Scalar::Str(s) if s.starts_with(p.as_str())),
            AnythingBut::Suffix(p) => matches!(leaf, Scalar::Str(s) if s.ends_with(p.as_str())),
            AnythingBut::EqualsIgnoreCase(vs) => match leaf {
                Scalar::Str(s) => {
                    let s = s.to_lowercase();
                    vs.iter().any(|v| v.to_lowercase() == s)
                }
                _ => false,
            },
            AnythingBut::Wildcard(ws) => {
                matches!(leaf, Scalar::Str(s) if ws.iter().any(|w| w.matches(s)))
            }
        }
    }
}

impl Condition {
    /// Whether one leaf satisfies the condition (`exists = false` is about
    /// absence, never about a leaf).
    pub(crate) fn test(&self, leaf: &Scalar<'_>) -> bool {
        match (self, leaf) {
            (Condition::Exact(l), leaf) => l.equals(leaf),
            (Condition::Prefix(p), Scalar::Str(s)) => s.starts_with(p.as_str()),
            (Condition::Suffix(p), Scalar::Str(s)) => s.ends_with(p.as_str()),
            (Condition::PrefixIgnoreCase(p), Scalar::Str(s)) => {
                s.to_lowercase().starts_with(p.as_str())
            }
            (Condition::SuffixIgnoreCase(p), Scalar::Str(s)) => {
                s.to_lowercase().ends_with(p.as_str())
            }
            (Condition::EqualsIgnoreCase(p), Scalar::Str(s)) => {
                p.to_lowercase() == s.to_lowercase()
            }
            (Condition::Wildcard(w), Scalar::Str(s)) => w.matches(s),
            (Condition::AnythingBut(ab), leaf) => !ab.excludes(leaf),
            (Condition::Numeric(r), Scalar::Num(n)) => {
                parse_number(n).is_some_and(|x| r.contains(x))
            }
            (Condition::Exists(want), _) => *want,
            (Condition::Cidr(c), Scalar::Str(s)) => {
                s.parse::<IpAddr>().is_ok_and(|ip| c.contains(ip))
            }
            _ => false,
        }
    }
}

/// A JSON number's value, when finite.
pub(crate) fn parse_number(text: &str) -> Option<f64> {
    text.parse::<f64>().ok().filter(|x| x.is_finite())
}

impl fmt::Display for Condition {
    /// What the condition asks for, e.g. `>= 100`, `starts with "order."`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let q = |s: &str| serde_json::Value::from(s).to_string();
        match self {
            Condition::Exact(l) => write!(f, "{l}"),
            Condition::Prefix(p) => write!(f, "starts with {}", q(p)),
            Condition::Suffix(p) => write!(f, "ends with {}", q(p)),
            Condition::PrefixIgnoreCase(p) => write!(f, "starts with {} ignoring case", q(p)),
            Condition::SuffixIgnoreCase(p) => write!(f, "ends with {} ignoring case", q(p)),
            Condition::EqualsIgnoreCase(p) => write!(f, "equals {} ignoring case", q(p)),
            Condition::Wildcard(w) => write!(f, "matches wildcard {}", q(&w.text)),
            Condition::Numeric(r) => write!(f, "{r}"),
            Condition::Exists(true) => f.write_str("present"),
            Condition::Exists(false) => f.write_str("absent"),
            Condition::Cidr(c) => write!(f, "in {c}"),
            Condition::AnythingBut(ab) => match ab {
                AnythingBut::Values(vs) => {
                    let vs: Vec<String> = vs.iter().map(|v| v.to_string()).collect();
                    write!(f, "anything but {}", vs.join(", "))
                }
                AnythingBut::Prefix(p) => write!(f, "anything not starting with {}", q(p)),
                AnythingBut::Suffix(p) => write!(f, "anything not ending with {}", q(p)),
                AnythingBut::EqualsIgnoreCase(vs) => {
                    let vs: Vec<String> = vs.iter().map(|v| q(v)).collect();
                    write!(f, "anything but {} ignoring case", vs.join(", "))
                }
                AnythingBut::Wildcard(ws) => {
                    let vs: Vec<String> = ws.iter().map(|w| q(&w.text)).collect();
                    write!(f, "anything not matching wildcard {}", vs.join(", "))
                }
            },
        }
    }
}

impl Condition {
    /// Why `leaf` fails the condition, e.g. `80 is not >= 100`.
    pub(crate) fn why_not(&self, leaf: &Scalar<'_>) -> String {
        let q = |s: &str| serde_json::Value::from(s).to_string();
        match (self, leaf) {
            (Condition::Prefix(p), Scalar::Str(_)) => {
                format!("{leaf} does not start with {}", q(p))
            }
            (Condition::Suffix(p), Scalar::Str(_)) => format!("{leaf} does not end with {}", q(p)),
            (Condition::PrefixIgnoreCase(p), Scalar::Str(_)) => {
                format!("{leaf} does not start with {} ignoring case", q(p))
            }
            (Condition::SuffixIgnoreCase(p), Scalar::Str(_)) => {
                format!("{leaf} does not end with {} ignoring case", q(p))
            }
            (Condition::Numeric(_), Scalar::Num(_)) => format!("{leaf} is not {self}"),
            (
                Condition::Numeric(_)
                | Condition::Prefix(_)
                | Condition::Suffix(_)
                | Condition::PrefixIgnoreCase(_)
                | Condition::SuffixIgnoreCase(_)
                | Condition::EqualsIgnoreCase(_)
                | Condition::Wildcard(_)
                | Condition::Cidr(_),
                _,
            ) => {
                let kind = if matches!(self, Condition::Numeric(_)) {
                    "a number"
                } else {
                    "a string"
                };
                format!("{leaf} is not {kind} (expected {self})")
            }
            (Condition::Exists(false), _) => format!("{leaf} is present, expected absent"),
            (Condition::AnythingBut(_), _) => format!("{leaf} is excluded ({self})"),
            _ => format!("{leaf} is not {self}"),
        }
    }
}

impl Pattern {
    /// A pattern that matches every event (a route without `match`).
    pub fn match_all() -> Pattern {
        Pattern {
            root: FieldSet {
                fields: Vec::new(),
                or_groups: Vec::new(),
            },
            alts: vec![Conj { slots: Vec::new() }],
        }
    }

    /// Compiles the `match` table of a route; reports every problem found.
    pub fn compile(value: &Spanned<DeValue<'_>>) -> Result<Pattern, Vec<PatternError>> {
        let mut errors = Vec::new();
        let root = match value.get_ref() {
            DeValue::Table(t) => compile_fields(t, "", &mut errors),
            _ => {
                errors.push(PatternError {
                    span: value.span(),
                    path: String::new(),
                    message: "`match` must be a table of fields, e.g. match = { type = [\"order.created\"] }".into(),
                });
                FieldSet {
                    fields: Vec::new(),
                    or_groups: Vec::new(),
                }
            }
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        match expand(&root, &[]) {
            Some(alts) => Ok(Pattern { root, alts }),
            None => Err(vec![PatternError {
                span: value.span(),
                path: String::new(),
                message: format!(
                    "`$or` expands this pattern into more than {MAX_ALTERNATIVES} alternatives; split the route"
                ),
            }]),
        }
    }

    /// The alternatives (`$or` expanded): the pattern matches if one does.
    pub(crate) fn alternatives(&self) -> &[Conj] {
        &self.alts
    }

    /// Whether the event (as JSON: its envelope with `data` parsed) matches.
    /// (Routing uses the compiled [`super::matcher::Matcher`]; this is for
    /// one-off checks.)
    pub fn matches(&self, event: &serde_json::Value) -> bool {
        let bytes = event.to_string();
        let leaves = super::json::flatten(bytes.as_bytes()).unwrap_or_default();
        self.explain_leaves(&leaves).is_ok()
    }

    /// Whether a JSON document (an envelope) matches; `Err` if it is not JSON.
    pub fn matches_json(&self, bytes: &[u8]) -> Result<bool, super::json::JsonError> {
        let leaves = super::json::flatten(bytes)?;
        Ok(self.explain_leaves(&leaves).is_ok())
    }

    /// The top-level `source` values the pattern requires exactly, if it names
    /// `source` (used to check that routes name declared sources).
    pub fn exact_sources(&self) -> Vec<&str> {
        self.root
            .fields
            .iter()
            .filter(|(name, _)| name == "source")
            .flat_map(|(_, node)| match node {
                Node::Any(conds) => conds
                    .iter()
                    .filter_map(|c| match c {
                        Condition::Exact(Literal::String(s)) => Some(s.as_str()),
                        _ => None,
                    })
                    .collect(),
                Node::Nested(_) => Vec::new(),
            })
            .collect()
    }
}

/// `$or` expanded: the alternatives of a field set at `path`, or `None` when
/// there are too many.
fn expand(set: &FieldSet, path: &[String]) -> Option<Vec<Conj>> {
    let mut acc = vec![Conj { slots: Vec::new() }];
    let product = |acc: &mut Vec<Conj>, options: Vec<Conj>| -> Option<()> {
        if acc.len().saturating_mul(options.len()) > MAX_ALTERNATIVES {
            return None;
        }
        let mut next = Vec::with_capacity(acc.len() * options.len());
        for a in acc.iter() {
            for o in &options {
                let mut slots = a.slots.clone();
                slots.extend(o.slots.iter().cloned());
                next.push(Conj { slots });
            }
        }
        *acc = next;
        Some(())
    };
    for (name, node) in &set.fields {
        let mut p = path.to_vec();
        p.push(name.clone());
        match node {
            Node::Any(conds) => {
                for a in acc.iter_mut() {
                    a.slots.push(Slot {
                        path: p.clone(),
                        conds: conds.clone(),
                    });
                }
            }
            Node::Nested(inner) => product(&mut acc, expand(inner, &p)?)?,
        }
    }
    for group in &set.or_groups {
        let mut options = Vec::new();
        for alt in group {
            options.extend(expand(alt, path)?);
        }
        product(&mut acc, options)?;
    }
    Some(acc)
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn compile_fields(table: &DeTable<'_>, path: &str, errors: &mut Vec<PatternError>) -> FieldSet {
    let mut set = FieldSet {
        fields: Vec::new(),
        or_groups: Vec::new(),
    };
    for (key, value) in table.iter() {
        let name = key.get_ref().as_ref();
        let field_path = join(path, name);
        if name == "$or" {
            if let Some(group) = compile_or(value, &field_path, errors) {
                set.or_groups.push(group);
            }
            continue;
        }
        match value.get_ref() {
            DeValue::Table(t) if t.is_empty() => errors.push(PatternError {
                span: value.span(),
                path: field_path.clone(),
                message: "an empty table tests nothing; name a field inside it or remove it".into(),
            }),
            DeValue::Table(t) => {
                set.fields.push((
                    name.to_string(),
                    Node::Nested(compile_fields(t, &field_path, errors)),
                ));
            }
            DeValue::Array(items) => {
                let items: Vec<&Spanned<DeValue<'_>>> = items.iter().collect();
                if items.is_empty() {
                    errors.push(PatternError {
                        span: value.span(),
                        path: field_path.clone(),
                        message: "an empty list can never match; list at least one value".into(),
                    });
                    continue;
                }
                let conds = items
                    .iter()
                    .filter_map(|item| compile_condition(item, &field_path, errors))
                    .collect();
                set.fields.push((name.to_string(), Node::Any(conds)));
            }
            other => errors.push(PatternError {
                span: value.span(),
                path: field_path.clone(),
                message: format!(
                    "match values must be in a list: write `{name} = [{}]`",
                    toml_text(other)
                ),
            }),
        }
    }
    set
}

fn compile_or(
    value: &Spanned<DeValue<'_>>,
    path: &str,
    errors: &mut Vec<PatternError>,
) -> Option<Vec<FieldSet>> {
    let err = |errors: &mut Vec<PatternError>, span: Range<usize>| {
        errors.push(PatternError {
            span,
            path: path.to_string(),
            message: "`$or` takes a list of at least two field tables, e.g. `$or = [{ a = [1] }, { b = [2] }]`".into(),
        })
    };
    let DeValue::Array(items) = value.get_ref() else {
        err(errors, value.span());
        return None;
    };
    let items: Vec<_> = items.iter().collect();
    if items.len() < 2 {
        err(errors, value.span());
        return None;
    }
    let mut alts = Vec::new();
    for item in items {
        match item.get_ref() {
            DeValue::Table(t) if !t.is_empty() => alts.push(compile_fields(t, path, errors)),
            _ => err(errors, item.span()),
        }
    }
    Some(alts)
}

fn compile_condition(
    item: &Spanned<DeValue<'_>>,
    path: &str,
    errors: &mut Vec<PatternError>,
) -> Option<Condition> {
    let error = |errors: &mut Vec<PatternError>, span: Range<usize>, message: String| {
        errors.push(PatternError {
            span,
            path: path.to_string(),
            message,
        });
        None
    };
    match item.get_ref() {
        DeValue::Table(t) if is_null_marker(t) => Some(Condition::Exact(Literal::Null)),
        DeValue::Table(t) => {
            let entries: Vec<_> = t.iter().collect();
            if entries.len() != 1 {
                return error(
                    errors,
                    item.span(),
                    "an operator table holds exactly one operator, e.g. { prefix = \"order.\" }"
                        .into(),
                );
            }
            let (op, arg) = entries[0];
            compile_operator(op.get_ref().as_ref(), op.span(), arg, path, errors)
        }
        DeValue::Array(_) => error(
            errors,
            item.span(),
            "a list inside a match list is not allowed; flatten it".into(),
        ),
        _ => match literal(item) {
            Ok(l) => Some(Condition::Exact(l)),
            Err(m) => error(errors, item.span(), m),
        },
    }
}

fn literal(value: &Spanned<DeValue<'_>>) -> Result<Literal, String> {
    match value.get_ref() {
        DeValue::String(s) => Ok(Literal::String(s.to_string())),
        DeValue::Boolean(b) => Ok(Literal::Bool(*b)),
        DeValue::Integer(_) | DeValue::Float(_) => {
            number(value).map(|(text, _)| Literal::Number(text))
        }
        DeValue::Datetime(d) => Ok(Literal::String(d.to_string())),
        DeValue::Table(t) if is_null_marker(t) => Ok(Literal::Null),
        other => Err(format!(
            "expected a string, number or boolean, found {}",
            other.type_str()
        )),
    }
}

fn is_null_marker(t: &DeTable<'_>) -> bool {
    let entries: Vec<_> = t.iter().collect();
    entries.len() == 1
        && entries[0].0.get_ref().as_ref() == "null"
        && matches!(entries[0].1.get_ref(), DeValue::Boolean(true))
}

/// A TOML number as (JSON text, value). Exact matching compares the text as
/// written (`300.0` stays `300.0`, `3.0e2` stays `3.0e2`); only `_`, a leading
/// `+` and non-decimal radixes are normalised, since JSON has none of them.
fn number(value: &Spanned<DeValue<'_>>) -> Result<(String, f64), String> {
    match value.get_ref() {
        DeValue::Integer(i) => {
            let text = i.as_str().replace('_', "");
            let digits = text.trim_start_matches('+');
            let digits = digits
                .strip_prefix("0x")
                .or_else(|| digits.strip_prefix("0o"))
                .or_else(|| digits.strip_prefix("0b"))
                .unwrap_or(digits);
            let parsed = i64::from_str_radix(digits, i.radix())
                .map_err(|e| format!("invalid integer: {e}"))?;
            Ok((parsed.to_string(), parsed as f64))
        }
        DeValue::Float(f) => {
            let text = f.as_str().replace('_', "");
            let text = text.trim_start_matches('+').to_string();
            let v: f64 = text
                .parse()
                .map_err(|_| format!("`{text}` is not a finite number"))?;
            if !v.is_finite() {
                return Err(format!("`{text}` is not a finite number"));
            }
            Ok((text, v))
        }
        other => Err(format!("expected a number, found {}", other.type_str())),
    }
}

const OPERATORS: &str =
    "prefix, suffix, equals-ignore-case, wildcard, anything-but, numeric, exists, cidr";

fn compile_operator(
    op: &str,
    op_span: Range<usize>,
    arg: &Spanned<DeValue<'_>>,
    path: &str,
    errors: &mut Vec<PatternError>,
) -> Option<Condition> {
    let mut fail = |span: Range<usize>, message: String| {
        errors.push(PatternError {
            span,
            path: path.to_string(),
            message,
        });
        None
    };
    let string_arg = |arg: &Spanned<DeValue<'_>>| match arg.get_ref() {
        DeValue::String(s) => Ok(s.to_string()),
        other => Err(format!("`{op}` takes a string, found {}", other.type_str())),
    };
    match op {
        // EventBridge's `{ prefix = { equals-ignore-case = "..." } }`.
        "prefix" | "suffix" if matches!(arg.get_ref(), DeValue::Table(_)) => {
            let DeValue::Table(t) = arg.get_ref() else {
                return None;
            };
            let entries: Vec<_> = t.iter().collect();
            match entries.as_slice() {
                [(k, v)] if k.get_ref().as_ref() == "equals-ignore-case" => match v.get_ref() {
                    DeValue::String(s) => {
                        let s = s.to_lowercase();
                        Some(if op == "prefix" {
                            Condition::PrefixIgnoreCase(s)
                        } else {
                            Condition::SuffixIgnoreCase(s)
                        })
                    }
                    other => fail(
                        v.span(),
                        format!(
                            "`{op}.equals-ignore-case` takes a string, found {}",
                            other.type_str()
                        ),
                    ),
                },
                _ => fail(
                    arg.span(),
                    format!("`{op}` takes a string, or {{ equals-ignore-case = \"...\" }}"),
                ),
            }
        }
        "prefix" | "suffix" | "equals-ignore-case" | "wildcard" | "cidr" => {
            let s = match string_arg(arg) {
                Ok(s) => s,
                Err(m) => return fail(arg.span(), m),
            };
            let cond = match op {
                "prefix" => Ok(Condition::Prefix(s)),
                "suffix" => Ok(Condition::Suffix(s)),
                "equals-ignore-case" => Ok(Condition::EqualsIgnoreCase(s)),
                "wildcard" => Wildcard::parse(&s).map(Condition::Wildcard),
                _ => Cidr::parse(&s).map(Condition::Cidr),
            };
            match cond {
                Ok(c) => Some(c),
                Err(m) => fail(arg.span(), m),
            }
        }
        "exists" => match arg.get_ref() {
            DeValue::Boolean(b) => Some(Condition::Exists(*b)),
            other => fail(
                arg.span(),
                format!("`exists` takes true or false, found {}", other.type_str()),
            ),
        },
        "null" => fail(
            op_span,
            "`null` marks a null literal and takes `true`: { null = true }".into(),
        ),
        "anything-but" => compile_anything_but(arg, &mut fail),
        "numeric" => compile_numeric(arg, &mut fail),
        _ => fail(
            op_span,
            format!("unknown operator `{op}`; expected one of {OPERATORS}"),
        ),
    }
}

fn compile_anything_but(
    arg: &Spanned<DeValue<'_>>,
    fail: &mut impl FnMut(Range<usize>, String) -> Option<Condition>,
) -> Option<Condition> {
    match arg.get_ref() {
        DeValue::Array(items) => {
            let mut values = Vec::new();
            let items: Vec<_> = items.iter().collect();
            if items.is_empty() {
                return fail(arg.span(), "`anything-but` needs at least one value".into());
            }
            for item in items {
                match literal(item) {
                    Ok(l) => values.push(l),
                    Err(m) => return fail(item.span(), format!("in `anything-but`: {m}")),
                }
            }
            Some(Condition::AnythingBut(AnythingBut::Values(values)))
        }
        DeValue::Table(t) if !is_null_marker(t) => {
            let entries: Vec<_> = t.iter().collect();
            if entries.len() != 1 {
                return fail(
                    arg.span(),
                    "`anything-but` takes a value, a list, or one of { prefix | suffix | equals-ignore-case | wildcard = \"...\" }".into(),
                );
            }
            let (op, value) = entries[0];
            let op = op.get_ref().as_ref();
            if !matches!(op, "prefix" | "suffix" | "equals-ignore-case" | "wildcard") {
                return fail(
                    arg.span(),
                    format!(
                        "`anything-but` does not take `{op}`; it takes prefix, suffix, equals-ignore-case or wildcard"
                    ),
                );
            }
            // prefix and suffix take one string; the others a string or a list.
            let strings: Vec<(String, Range<usize>)> = match value.get_ref() {
                DeValue::String(s) => vec![(s.to_string(), value.span())],
                DeValue::Array(items) if matches!(op, "equals-ignore-case" | "wildcard") => {
                    let mut out = Vec::new();
                    for item in items.iter() {
                        match item.get_ref() {
                            DeValue::String(s) => out.push((s.to_string(), item.span())),
                            other => {
                                return fail(
                                    item.span(),
                                    format!(
                                        "`anything-but.{op}` takes strings, found {}",
                                        other.type_str()
                                    ),
                                );
                            }
                        }
                    }
                    if out.is_empty() {
                        return fail(
                            value.span(),
                            format!("`anything-but.{op}` needs at least one string"),
                        );
                    }
                    out
                }
                other => {
                    return fail(
                        value.span(),
                        format!(
                            "`anything-but.{op}` takes a string, found {}",
                            other.type_str()
                        ),
                    );
                }
            };
            let first = strings[0].0.clone();
            let inner = match op {
                "prefix" => AnythingBut::Prefix(first),
                "suffix" => AnythingBut::Suffix(first),
                "equals-ignore-case" => {
                    AnythingBut::EqualsIgnoreCase(strings.into_iter().map(|(s, _)| s).collect())
                }
                "wildcard" => {
                    let mut ws = Vec::new();
                    for (s, span) in strings {
                        match Wildcard::parse(&s) {
                            Ok(w) => ws.push(w),
                            Err(m) => return fail(span, m),
                        }
                    }
                    AnythingBut::Wildcard(ws)
                }
                _ => {
                    return fail(
                        arg.span(),
                        format!(
                            "`anything-but` does not take `{op}`; it takes prefix, suffix, equals-ignore-case or wildcard"
                        ),
                    );
                }
            };
            Some(Condition::AnythingBut(inner))
        }
        _ => match literal(arg) {
            Ok(l) => Some(Condition::AnythingBut(AnythingBut::Values(vec![l]))),
            Err(m) => fail(arg.span(), format!("in `anything-but`: {m}")),
        },
    }
}

#[derive(Clone, Copy)]
enum Cmp {
    Eq,
    Lt,
    Le,
    Gt,
    Ge,
}

fn compile_numeric(
    arg: &Spanned<DeValue<'_>>,
    fail: &mut impl FnMut(Range<usize>, String) -> Option<Condition>,
) -> Option<Condition> {
    const USAGE: &str =
        "`numeric` takes one or two comparisons, e.g. [\">\", 0] or [\">=\", 10, \"<\", 20]";
    let DeValue::Array(items) = arg.get_ref() else {
        return fail(arg.span(), USAGE.into());
    };
    let items: Vec<_> = items.iter().collect();
    if items.len() != 2 && items.len() != 4 {
        return fail(arg.span(), USAGE.into());
    }
    let mut comparisons = Vec::new();
    for pair in items.chunks(2) {
        let cmp = match pair[0].get_ref() {
            DeValue::String(s) => match s.as_ref() {
                "=" => Cmp::Eq,
                "<" => Cmp::Lt,
                "<=" => Cmp::Le,
                ">" => Cmp::Gt,
                ">=" => Cmp::Ge,
                other => {
                    return fail(
                        pair[0].span(),
                        format!("unknown comparison `{other}`; expected =, <, <=, > or >="),
                    );
                }
            },
            _ => return fail(pair[0].span(), USAGE.into()),
        };
        match number(pair[1]) {
            Ok((_, v)) => comparisons.push((cmp, v)),
            Err(m) => return fail(pair[1].span(), format!("in `numeric`: {m}")),
        }
    }
    let mut range = NumRange { lo: None, hi: None };
    for &(cmp, v) in &comparisons {
        match cmp {
            Cmp::Eq if comparisons.len() == 1 => {
                range.lo = Some((v, true));
                range.hi = Some((v, true));
            }
            Cmp::Gt | Cmp::Ge if range.lo.is_none() => range.lo = Some((v, matches!(cmp, Cmp::Ge))),
            Cmp::Lt | Cmp::Le if range.hi.is_none() => range.hi = Some((v, matches!(cmp, Cmp::Le))),
            _ => {
                return fail(
                    arg.span(),
                    "two comparisons must bound a non-empty range from below and above, e.g. [\">\", 0, \"<=\", 5]".into(),
                );
            }
        }
    }
    if let (Some((a, _)), Some((b, _))) = (range.lo, range.hi)
        && comparisons.len() == 2
        && a >= b
    {
        return fail(
            arg.span(),
            "two comparisons must bound a non-empty range from below and above, e.g. [\">\", 0, \"<=\", 5]".into(),
        );
    }
    Some(Condition::Numeric(range))
}

fn toml_text(v: &DeValue<'_>) -> String {
    match v {
        DeValue::String(s) => format!("{:?}", s.as_ref()),
        DeValue::Integer(i) => i.as_str().to_string(),
        DeValue::Float(f) => f.as_str().to_string(),
        DeValue::Boolean(b) => b.to_string(),
        DeValue::Datetime(d) => d.to_string(),
        _ => "...".into(),
    }
}

// ---------------------------------------------------------------------------
// Evaluation on a flat list of leaves: `explain` and one-off matching. The
// compiled matcher (matcher.rs) is what routes events.

use super::json::Leaf;

impl Pattern {
    /// `Ok` if the leaves match; else why the first alternative failed.
    pub(crate) fn explain_leaves(&self, leaves: &[Leaf]) -> Result<(), String> {
        let mut first_reason = None;
        for conj in &self.alts {
            match explain_conj(conj, leaves) {
                Ok(()) => return Ok(()),
                Err(r) => {
                    first_reason.get_or_insert(r);
                }
            }
        }
        let reason = first_reason.unwrap_or_else(|| "no alternative".into());
        if self.alts.len() > 1 {
            Err(format!(
                "none of the {} `$or` alternatives matches; the first fails at {reason}",
                self.alts.len()
            ))
        } else {
            Err(reason)
        }
    }
}

/// Whether two leaves may be used together (array consistency).
pub(crate) fn consistent(a: &[(u32, u32)], b: &[(u32, u32)]) -> bool {
    for (x, y) in a.iter().zip(b) {
        if x.0 != y.0 {
            return true;
        }
        if x.1 != y.1 {
            return false;
        }
    }
    true
}

fn explain_conj(conj: &Conj, leaves: &[Leaf]) -> Result<(), String> {
    // Candidate leaves per slot, and the first failing slot.
    let mut candidates: Vec<Vec<usize>> = Vec::with_capacity(conj.slots.len());
    for slot in &conj.slots {
        let at: Vec<usize> = leaves
            .iter()
            .enumerate()
            .filter(|(_, l)| l.path == slot.path)
            .map(|(i, _)| i)
            .collect();
        let hits: Vec<usize> = at
            .iter()
            .copied()
            .filter(|&i| slot.conds.iter().any(|c| c.test(&leaves[i].scalar())))
            .collect();
        if hits.is_empty() && !slot.absent_ok() {
            return Err(slot_failure(slot, leaves, &at));
        }
        candidates.push(hits);
    }
    if assign(conj, leaves, &candidates, &mut Vec::new()) {
        Ok(())
    } else if let Some((slot, at)) = conj.slots.iter().zip(&candidates).find_map(|(slot, hits)| {
        let at: Vec<usize> = (0..leaves.len())
            .filter(|&i| leaves[i].path == slot.path)
            .collect();
        (slot.absent_ok() && hits.is_empty() && !at.is_empty()).then_some((slot, at))
    }) {
        Err(slot_failure(slot, leaves, &at))
    } else {
        let names: Vec<String> = conj.slots.iter().map(|s| s.dotted()).collect();
        Err(format!(
            "{}: each matches, but not within the same array element",
            names.join(", ")
        ))
    }
}

fn slot_failure(slot: &Slot, leaves: &[Leaf], at: &[usize]) -> String {
    let name = slot.dotted();
    if at.is_empty() {
        return format!("{name}: missing");
    }
    let shown: Vec<String> = at
        .iter()
        .take(3)
        .map(|&i| leaves[i].scalar().to_string())
        .collect();
    let value = if at.len() == 1 {
        shown.join("")
    } else {
        format!(
            "[{}{}]",
            shown.join(", "),
            if at.len() > 3 { ", ..." } else { "" }
        )
    };
    match (slot.conds.as_slice(), at) {
        ([c], [i]) => format!("{name}: {}", c.why_not(&leaves[*i].scalar())),
        _ => {
            let wants: Vec<String> = slot.conds.iter().map(|c| c.to_string()).collect();
            format!("{name}: {value} is not {}", wants.join(" or "))
        }
    }
}

/// Backtracking search for one leaf per slot (or absence, where allowed), all
/// consistent. `chosen` holds the leaf index per slot decided so far.
fn assign(
    conj: &Conj,
    leaves: &[Leaf],
    candidates: &[Vec<usize>],
    chosen: &mut Vec<Option<usize>>,
) -> bool {
    let k = chosen.len();
    if k == conj.slots.len() {
        // Absent slots: no leaf at the path consistent with the chosen ones.
        return conj.slots.iter().zip(chosen.iter()).all(|(slot, c)| {
            c.is_some()
                || !leaves.iter().any(|l| {
                    l.path == slot.path
                        && chosen
                            .iter()
                            .flatten()
                            .all(|&j| consistent(&l.trail, &leaves[j].trail))
                })
        });
    }
    for &i in &candidates[k] {
        if chosen
            .iter()
            .flatten()
            .all(|&j| consistent(&leaves[i].trail, &leaves[j].trail))
        {
            chosen.push(Some(i));
            if assign(conj, leaves, candidates, chosen) {
                return true;
            }
            chosen.pop();
        }
    }
    if conj.slots[k].absent_ok() {
        chosen.push(None);
        if assign(conj, leaves, candidates, chosen) {
            return true;
        }
        chosen.pop();
    }
    false
}
