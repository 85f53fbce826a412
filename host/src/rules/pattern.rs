//! Event patterns: Amazon EventBridge's pattern language, written in TOML.
//!
//! A pattern is a table of fields. A field's value is either a nested table
//! (the event's field must be an object matching it) or a list of match
//! conditions, any of which may match. Conditions are literals (string,
//! number, boolean, or `{ null = true }`, since TOML has no null) and operator
//! tables: `prefix`, `suffix`, `equals-ignore-case`, `anything-but`,
//! `numeric`, `exists`. `$or` takes a list of alternative field tables.
//!
//! Matching works on the event as JSON (its CloudEvents envelope, with `data`
//! parsed). An array in the event matches if any element matches.

use std::ops::Range;

use serde_json::Value;
use toml::de::{DeTable, DeValue};

use toml::Spanned;

/// A problem in a pattern, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
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

#[derive(Debug, Clone, PartialEq)]
enum Condition {
    Exact(Literal),
    Prefix(String),
    Suffix(String),
    EqualsIgnoreCase(String),
    AnythingBut(Vec<Condition>),
    Numeric(Vec<(Cmp, f64)>),
    Exists(bool),
}

#[derive(Debug, Clone, PartialEq)]
enum Literal {
    String(String),
    /// The number's canonical text: exact matching compares text, as in
    /// EventBridge (`numeric` compares values).
    Number(String),
    Bool(bool),
    Null,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Cmp {
    Eq,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Cmp {
    fn holds(self, a: f64, b: f64) -> bool {
        match self {
            Cmp::Eq => a == b,
            Cmp::Lt => a < b,
            Cmp::Le => a <= b,
            Cmp::Gt => a > b,
            Cmp::Ge => a >= b,
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
        if errors.is_empty() {
            Ok(Pattern { root })
        } else {
            Err(errors)
        }
    }

    /// Whether the event (as JSON: its envelope with `data` parsed) matches.
    pub fn matches(&self, event: &Value) -> bool {
        self.root.matches(Some(event))
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

/// A TOML number as (canonical JSON text, value).
fn number(value: &Spanned<DeValue<'_>>) -> Result<(String, f64), String> {
    match value.get_ref() {
        DeValue::Integer(i) => {
            let text = i.as_str().replace('_', "");
            let parsed = i64::from_str_radix(
                text.trim_start_matches("0x")
                    .trim_start_matches("0o")
                    .trim_start_matches("0b"),
                i.radix(),
            )
            .map_err(|e| format!("invalid integer: {e}"))?;
            Ok((parsed.to_string(), parsed as f64))
        }
        DeValue::Float(f) => {
            let text = f.as_str().replace('_', "");
            let v: f64 = text
                .parse()
                .map_err(|_| format!("`{text}` is not a finite number"))?;
            if !v.is_finite() {
                return Err(format!("`{text}` is not a finite number"));
            }
            // serde_json prints floats in their shortest form; compare alike.
            let canonical = serde_json::Number::from_f64(v)
                .map(|n| n.to_string())
                .unwrap_or(text);
            Ok((canonical, v))
        }
        other => Err(format!("expected a number, found {}", other.type_str())),
    }
}

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
        "prefix" | "suffix" | "equals-ignore-case" => match string_arg(arg) {
            Ok(s) => Some(match op {
                "prefix" => Condition::Prefix(s),
                "suffix" => Condition::Suffix(s),
                _ => Condition::EqualsIgnoreCase(s),
            }),
            Err(m) => fail(arg.span(), m),
        },
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
        "wildcard" | "cidr" => fail(op_span, format!("operator `{op}` is not supported yet")),
        _ => fail(
            op_span,
            format!(
                "unknown operator `{op}`; expected one of prefix, suffix, equals-ignore-case, anything-but, numeric, exists"
            ),
        ),
    }
}

fn compile_anything_but(
    arg: &Spanned<DeValue<'_>>,
    fail: &mut impl FnMut(Range<usize>, String) -> Option<Condition>,
) -> Option<Condition> {
    match arg.get_ref() {
        DeValue::Array(items) => {
            let mut conds = Vec::new();
            let items: Vec<_> = items.iter().collect();
            if items.is_empty() {
                return fail(arg.span(), "`anything-but` needs at least one value".into());
            }
            for item in items {
                match literal(item) {
                    Ok(l) => conds.push(Condition::Exact(l)),
                    Err(m) => return fail(item.span(), format!("in `anything-but`: {m}")),
                }
            }
            Some(Condition::AnythingBut(conds))
        }
        DeValue::Table(t) if !is_null_marker(t) => {
            let entries: Vec<_> = t.iter().collect();
            if entries.len() != 1 {
                return fail(
                    arg.span(),
                    "`anything-but` takes a value, a list, or one of { prefix | suffix | equals-ignore-case = \"...\" }".into(),
                );
            }
            let (op, value) = entries[0];
            let op = op.get_ref().as_ref();
            let DeValue::String(s) = value.get_ref() else {
                return fail(value.span(), format!("`anything-but.{op}` takes a string"));
            };
            let inner = match op {
                "prefix" => Condition::Prefix(s.to_string()),
                "suffix" => Condition::Suffix(s.to_string()),
                "equals-ignore-case" => Condition::EqualsIgnoreCase(s.to_string()),
                _ => {
                    return fail(
                        arg.span(),
                        format!(
                            "`anything-but` does not take `{op}`; it takes prefix, suffix or equals-ignore-case"
                        ),
                    );
                }
            };
            Some(Condition::AnythingBut(vec![inner]))
        }
        _ => match literal(arg) {
            Ok(l) => Some(Condition::AnythingBut(vec![Condition::Exact(l)])),
            Err(m) => fail(arg.span(), format!("in `anything-but`: {m}")),
        },
    }
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
    if comparisons.len() == 2 {
        let lower = |c: Cmp| matches!(c, Cmp::Gt | Cmp::Ge);
        let upper = |c: Cmp| matches!(c, Cmp::Lt | Cmp::Le);
        let (a, b) = (comparisons[0], comparisons[1]);
        let valid_range =
            (lower(a.0) && upper(b.0) && a.1 < b.1) || (upper(a.0) && lower(b.0) && b.1 < a.1);
        if !valid_range {
            return fail(
                arg.span(),
                "two comparisons must bound a non-empty range from below and above, e.g. [\">\", 0, \"<=\", 5]".into(),
            );
        }
    }
    Some(Condition::Numeric(comparisons))
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

impl FieldSet {
    /// `value` is the event field this set applies to (`None`: absent).
    fn matches(&self, value: Option<&Value>) -> bool {
        match value {
            // An array of objects matches if one element matches the whole set.
            Some(Value::Array(items)) => items.iter().any(|v| self.matches(Some(v))),
            Some(Value::Object(_)) | None => {
                let get = |name: &str| value.and_then(|v| v.get(name));
                self.fields
                    .iter()
                    .all(|(name, node)| node.matches(get(name)))
                    && self
                        .or_groups
                        .iter()
                        .all(|alts| alts.iter().any(|alt| alt.matches(value)))
            }
            // A scalar where fields are expected: every field is absent.
            Some(_) => self.matches(None),
        }
    }
}

impl Node {
    fn matches(&self, value: Option<&Value>) -> bool {
        match self {
            Node::Nested(set) => set.matches(value),
            Node::Any(conds) => {
                let mut leaves = Vec::new();
                if let Some(v) = value {
                    collect_leaves(v, &mut leaves);
                }
                conds.iter().any(|c| c.matches(&leaves))
            }
        }
    }
}

/// Scalars at this position (arrays flattened; objects are not leaves).
fn collect_leaves<'v>(value: &'v Value, out: &mut Vec<&'v Value>) {
    match value {
        Value::Array(items) => items.iter().for_each(|v| collect_leaves(v, out)),
        Value::Object(_) => {}
        scalar => out.push(scalar),
    }
}

impl Condition {
    fn matches(&self, leaves: &[&Value]) -> bool {
        match self {
            Condition::Exists(want) => leaves.is_empty() != *want,
            Condition::AnythingBut(excluded) => {
                !leaves.is_empty()
                    && leaves
                        .iter()
                        .all(|leaf| !excluded.iter().any(|c| c.matches_one(leaf)))
            }
            _ => leaves.iter().any(|leaf| self.matches_one(leaf)),
        }
    }

    fn matches_one(&self, leaf: &Value) -> bool {
        match (self, leaf) {
            (Condition::Exact(Literal::String(s)), Value::String(v)) => s == v,
            (Condition::Exact(Literal::Number(n)), Value::Number(v)) => *n == v.to_string(),
            (Condition::Exact(Literal::Bool(b)), Value::Bool(v)) => b == v,
            (Condition::Exact(Literal::Null), Value::Null) => true,
            (Condition::Prefix(p), Value::String(v)) => v.starts_with(p.as_str()),
            (Condition::Suffix(p), Value::String(v)) => v.ends_with(p.as_str()),
            (Condition::EqualsIgnoreCase(p), Value::String(v)) => {
                p.to_lowercase() == v.to_lowercase()
            }
            (Condition::Numeric(cmps), Value::Number(v)) => v
                .as_f64()
                .is_some_and(|x| cmps.iter().all(|(c, bound)| c.holds(x, *bound))),
            (Condition::Exists(want), _) => *want,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn compile(src: &str) -> Result<Pattern, Vec<PatternError>> {
        let text = format!("match = {src}");
        let doc = DeTable::parse(&text).expect("valid toml");
        let value = doc.get_ref().get("match").expect("match key");
        Pattern::compile(value)
    }

    fn matches(pattern: &str, event: Value) -> bool {
        compile(pattern).expect("valid pattern").matches(&event)
    }

    #[test]
    fn exact_values_and_any_of() {
        let p = r#"{ source = ["shop", "pos"], type = ["order.created"] }"#;
        assert!(matches(
            p,
            json!({"source": "shop", "type": "order.created"})
        ));
        assert!(matches(
            p,
            json!({"source": "pos", "type": "order.created"})
        ));
        assert!(!matches(
            p,
            json!({"source": "web", "type": "order.created"})
        ));
        assert!(!matches(p, json!({"source": "shop"})));
    }

    #[test]
    fn prefix_on_nested_data_and_arrays() {
        let p = r#"{ type = [{ prefix = "order." }], data = { customer = { tier = ["gold"] } } }"#;
        assert!(matches(
            p,
            json!({"type": "order.paid", "data": {"customer": {"tier": "gold"}}})
        ));
        assert!(!matches(
            p,
            json!({"type": "refund", "data": {"customer": {"tier": "gold"}}})
        ));
        // An array in the event matches if any element does.
        let p = r#"{ data = { tags = ["vip"] } }"#;
        assert!(matches(p, json!({"data": {"tags": ["new", "vip"]}})));
        assert!(!matches(p, json!({"data": {"tags": []}})));
        let p = r#"{ data = { items = { sku = ["A1"] } } }"#;
        assert!(matches(
            p,
            json!({"data": {"items": [{"sku": "B"}, {"sku": "A1"}]}})
        ));
    }

    #[test]
    fn numbers_booleans_and_null() {
        assert!(matches(
            "{ data = { n = [300] } }",
            json!({"data": {"n": 300}})
        ));
        assert!(!matches(
            "{ data = { n = [300] } }",
            json!({"data": {"n": 300.5}})
        ));
        assert!(!matches(
            "{ data = { n = [300.0] } }",
            json!({"data": {"n": 300}})
        ));
        assert!(matches(
            "{ data = { n = [\"300\"] } }",
            json!({"data": {"n": "300"}})
        ));
        assert!(!matches(
            "{ data = { n = [\"300\"] } }",
            json!({"data": {"n": 300}})
        ));
        assert!(matches(
            "{ data = { ok = [true] } }",
            json!({"data": {"ok": true}})
        ));
        let null = "{ data = { v = [{ null = true }] } }";
        assert!(matches(null, json!({"data": {"v": null}})));
        assert!(!matches(null, json!({"data": {"v": ""}})));
        assert!(!matches(null, json!({"data": {}})));
    }

    #[test]
    fn operators() {
        assert!(matches(
            r#"{ type = [{ suffix = ".created" }] }"#,
            json!({"type": "order.created"})
        ));
        assert!(matches(
            r#"{ type = [{ equals-ignore-case = "ORDER" }] }"#,
            json!({"type": "Order"})
        ));
        let range = r#"{ data = { total = [{ numeric = [">=", 100, "<", 200] }] } }"#;
        assert!(matches(range, json!({"data": {"total": 100}})));
        assert!(matches(range, json!({"data": {"total": 150.5}})));
        assert!(!matches(range, json!({"data": {"total": 200}})));
        assert!(!matches(range, json!({"data": {"total": "150"}})));
        let but = r#"{ type = [{ anything-but = ["a", "b"] }] }"#;
        assert!(matches(but, json!({"type": "c"})));
        assert!(!matches(but, json!({"type": "a"})));
        assert!(!matches(but, json!({})));
        let but_prefix = r#"{ type = [{ anything-but = { prefix = "test." } }] }"#;
        assert!(matches(but_prefix, json!({"type": "order"})));
        assert!(!matches(but_prefix, json!({"type": "test.x"})));
    }

    #[test]
    fn exists_and_absence_are_distinct_from_empty_and_null() {
        let absent = "{ data = { c = [{ exists = false }] } }";
        assert!(matches(absent, json!({"data": {}})));
        assert!(matches(absent, json!({})));
        assert!(!matches(absent, json!({"data": {"c": ""}})));
        assert!(!matches(absent, json!({"data": {"c": null}})));
        let present = "{ data = { c = [{ exists = true }] } }";
        assert!(matches(present, json!({"data": {"c": ""}})));
        assert!(!matches(present, json!({"data": {}})));
        assert!(matches(
            r#"{ data = { c = [""] } }"#,
            json!({"data": {"c": ""}})
        ));
        assert!(!matches(
            r#"{ data = { c = [""] } }"#,
            json!({"data": {"c": null}})
        ));
    }

    #[test]
    fn or_groups() {
        let p = r#"{ source = ["shop"], "$or" = [{ type = ["a"] }, { data = { n = [{ numeric = [">", 5] }] } }] }"#;
        assert!(matches(p, json!({"source": "shop", "type": "a"})));
        assert!(matches(
            p,
            json!({"source": "shop", "type": "b", "data": {"n": 6}})
        ));
        assert!(!matches(
            p,
            json!({"source": "shop", "type": "b", "data": {"n": 1}})
        ));
        assert!(!matches(p, json!({"source": "web", "type": "a"})));
    }

    #[test]
    fn invalid_patterns_are_errors_with_paths() {
        let errs = compile(r#"{ type = "x" }"#).unwrap_err();
        assert_eq!(errs[0].path, "type");
        assert!(errs[0].message.contains("must be in a list"), "{:?}", errs);
        let errs =
            compile(r#"{ data = { n = [{ numeric = [">", "x"] }] }, type = [] }"#).unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert_eq!(errs[0].path, "data.n");
        assert!(errs[0].message.contains("numeric"));
        assert!(errs[1].message.contains("empty list"));
        let errs = compile(r#"{ type = [{ prefixx = "a" }] }"#).unwrap_err();
        assert!(errs[0].message.contains("unknown operator `prefixx`"));
        let errs = compile(r#"{ n = [{ numeric = ["<", 1, ">", 5] }] }"#).unwrap_err();
        assert!(errs[0].message.contains("range"));
        let errs = compile(r#"{ "$or" = [{ a = ["x"] }] }"#).unwrap_err();
        assert!(errs[0].message.contains("$or"));
    }

    #[test]
    fn exact_sources_lists_required_sources() {
        let p = compile(r#"{ source = ["shop", { prefix = "x" }] }"#).unwrap();
        assert_eq!(p.exact_sources(), vec!["shop"]);
        assert!(Pattern::match_all().matches(&json!({"anything": 1})));
    }
}
