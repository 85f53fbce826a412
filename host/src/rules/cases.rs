//! Table-driven tests of the pattern language and the compiled matcher, and
//! a property test against the reference interpreter.

use toml::de::DeTable;

use super::json::flatten;
use super::matcher::Matcher;
use super::pattern::{Pattern, PatternError};
use super::reference::{self, J};

fn compile(src: &str) -> Result<Pattern, Vec<PatternError>> {
    let text = format!("match = {src}");
    let doc = DeTable::parse(&text).expect("valid toml");
    let value = doc.get_ref().get("match").expect("match key");
    Pattern::compile(value)
}

/// (pattern, event, matches)
const CASES: &[(&str, &str, bool)] = &[
    // Exact strings, any-of lists, several fields.
    (r#"{ source = ["shop"] }"#, r#"{"source":"shop"}"#, true),
    (r#"{ source = ["shop"] }"#, r#"{"source":"shops"}"#, false),
    (
        r#"{ source = ["shop", "pos"] }"#,
        r#"{"source":"pos"}"#,
        true,
    ),
    (
        r#"{ source = ["shop"], type = ["a"] }"#,
        r#"{"source":"shop","type":"a"}"#,
        true,
    ),
    (
        r#"{ source = ["shop"], type = ["a"] }"#,
        r#"{"source":"shop","type":"b"}"#,
        false,
    ),
    (
        r#"{ source = ["shop"], type = ["a"] }"#,
        r#"{"source":"shop"}"#,
        false,
    ),
    (r#"{ source = ["shop"] }"#, r#"{}"#, false),
    (r#"{ a = ["é"] }"#, r#"{"a":"\u00e9"}"#, true),
    (r#"{ a = ["x\"y"] }"#, r#"{"a":"x\"y"}"#, true),
    (r#"{ "a.b" = ["x"] }"#, r#"{"a.b":"x"}"#, true),
    (r#"{ "a.b" = ["x"] }"#, r#"{"a":{"b":"x"}}"#, false),
    // Nested fields.
    (
        r#"{ data = { c = { tier = ["gold"] } } }"#,
        r#"{"data":{"c":{"tier":"gold"}}}"#,
        true,
    ),
    (
        r#"{ data = { c = { tier = ["gold"] } } }"#,
        r#"{"data":{"c":{"tier":"silver"}}}"#,
        false,
    ),
    (
        r#"{ data = { c = { tier = ["gold"] } } }"#,
        r#"{"data":{"c":"gold"}}"#,
        false,
    ),
    (
        r#"{ data = { c = ["gold"] } }"#,
        r#"{"data":{"c":{"tier":"gold"}}}"#,
        false,
    ),
    // Numbers compare text; strings and numbers differ.
    (r#"{ n = [300] }"#, r#"{"n":300}"#, true),
    (r#"{ n = [300] }"#, r#"{"n":300.0}"#, false),
    (r#"{ n = [300.0] }"#, r#"{"n":300.0}"#, true),
    (r#"{ n = [300.0] }"#, r#"{"n":300}"#, false),
    (r#"{ n = [3.0e2] }"#, r#"{"n":3.0e2}"#, true),
    (r#"{ n = [3.0e2] }"#, r#"{"n":300}"#, false),
    (r#"{ n = [-5] }"#, r#"{"n":-5}"#, true),
    (r#"{ n = [0x1F] }"#, r#"{"n":31}"#, true),
    (r#"{ n = [300] }"#, r#"{"n":"300"}"#, false),
    (r#"{ n = ["300"] }"#, r#"{"n":300}"#, false),
    (r#"{ n = ["300"] }"#, r#"{"n":"300"}"#, true),
    // Booleans and null.
    (r#"{ ok = [true] }"#, r#"{"ok":true}"#, true),
    (r#"{ ok = [true] }"#, r#"{"ok":"true"}"#, false),
    (r#"{ ok = [false] }"#, r#"{"ok":false}"#, true),
    (r#"{ v = [{ null = true }] }"#, r#"{"v":null}"#, true),
    (r#"{ v = [{ null = true }] }"#, r#"{"v":""}"#, false),
    (r#"{ v = [{ null = true }] }"#, r#"{}"#, false),
    (r#"{ v = [""] }"#, r#"{"v":""}"#, true),
    (r#"{ v = [""] }"#, r#"{"v":null}"#, false),
    (r#"{ v = [""] }"#, r#"{}"#, false),
    // Arrays in the event.
    (r#"{ tags = ["vip"] }"#, r#"{"tags":["new","vip"]}"#, true),
    (r#"{ tags = ["vip"] }"#, r#"{"tags":[]}"#, false),
    (r#"{ tags = ["vip"] }"#, r#"{"tags":[["vip"]]}"#, true),
    (
        r#"{ items = { sku = ["A1"] } }"#,
        r#"{"items":[{"sku":"B"},{"sku":"A1"}]}"#,
        true,
    ),
    (
        r#"{ items = { sku = ["A1"], n = [2] } }"#,
        r#"{"items":[{"sku":"A1","n":1},{"sku":"B","n":2}]}"#,
        false,
    ),
    (
        r#"{ items = { sku = ["A1"], n = [2] } }"#,
        r#"{"items":[{"sku":"B","n":1},{"sku":"A1","n":2}]}"#,
        true,
    ),
    (
        r#"{ a = { b = { c = [1], d = [2] } } }"#,
        r#"{"a":[{"b":[{"c":1},{"d":2}]}]}"#,
        false,
    ),
    (
        r#"{ a = { b = { c = [1], d = [2] } } }"#,
        r#"{"a":[{"b":[{"c":1,"d":2}]}]}"#,
        true,
    ),
    (
        r#"{ a = { x = [1] }, b = [2] }"#,
        r#"{"a":[{"x":1},{"x":3}],"b":[5,2]}"#,
        true,
    ),
    (
        r#"{ a = { t = ["x"], u = ["y"] } }"#,
        r#"{"a":{"t":["x","z"],"u":["q","y"]}}"#,
        true,
    ),
    // prefix / suffix.
    (
        r#"{ type = [{ prefix = "order." }] }"#,
        r#"{"type":"order.paid"}"#,
        true,
    ),
    (
        r#"{ type = [{ prefix = "order." }] }"#,
        r#"{"type":"refund"}"#,
        false,
    ),
    (
        r#"{ type = [{ prefix = "order." }] }"#,
        r#"{"type":"order"}"#,
        false,
    ),
    (r#"{ type = [{ prefix = "" }] }"#, r#"{"type":""}"#, true),
    (r#"{ type = [{ prefix = "1" }] }"#, r#"{"type":12}"#, false),
    (r#"{ f = [{ suffix = ".png" }] }"#, r#"{"f":"a.png"}"#, true),
    (
        r#"{ f = [{ suffix = ".png" }] }"#,
        r#"{"f":"a.PNG"}"#,
        false,
    ),
    (r#"{ f = [{ suffix = ".png" }] }"#, r#"{"f":".png"}"#, true),
    (
        r#"{ f = [{ suffix = "g" }, { prefix = "x" }] }"#,
        r#"{"f":"xa"}"#,
        true,
    ),
    // equals-ignore-case.
    (
        r#"{ t = [{ equals-ignore-case = "ORDER" }] }"#,
        r#"{"t":"Order"}"#,
        true,
    ),
    (
        r#"{ t = [{ equals-ignore-case = "ORDER" }] }"#,
        r#"{"t":"Orders"}"#,
        false,
    ),
    (
        r#"{ t = [{ equals-ignore-case = "ÉTÉ" }] }"#,
        r#"{"t":"été"}"#,
        true,
    ),
    (
        r#"{ t = [{ equals-ignore-case = "1" }] }"#,
        r#"{"t":1}"#,
        false,
    ),
    // prefix / suffix ignoring case (EventBridge's nested equals-ignore-case).
    (
        r#"{ t = [{ prefix = { equals-ignore-case = "ORDER." } }] }"#,
        r#"{"t":"order.Created"}"#,
        true,
    ),
    (
        r#"{ t = [{ prefix = { equals-ignore-case = "ORDER." } }] }"#,
        r#"{"t":"refund.order."}"#,
        false,
    ),
    (
        r#"{ f = [{ suffix = { equals-ignore-case = ".png" } }] }"#,
        r#"{"f":"A.PNG"}"#,
        true,
    ),
    (
        r#"{ f = [{ suffix = { equals-ignore-case = ".png" } }] }"#,
        r#"{"f":".pngx"}"#,
        false,
    ),
    (
        r#"{ f = [{ suffix = { equals-ignore-case = "G" } }] }"#,
        r#"{"f":7}"#,
        false,
    ),
    // wildcard.
    (
        r#"{ f = [{ wildcard = "*.png" }] }"#,
        r#"{"f":"a/b.png"}"#,
        true,
    ),
    (
        r#"{ f = [{ wildcard = "a*b*c" }] }"#,
        r#"{"f":"aXbYc"}"#,
        true,
    ),
    (
        r#"{ f = [{ wildcard = "a*b*c" }] }"#,
        r#"{"f":"abc"}"#,
        true,
    ),
    (
        r#"{ f = [{ wildcard = "a*b*c" }] }"#,
        r#"{"f":"aXcYb"}"#,
        false,
    ),
    (
        r#"{ f = [{ wildcard = "a*b*c" }] }"#,
        r#"{"f":"abcd"}"#,
        false,
    ),
    (r#"{ f = [{ wildcard = "*" }] }"#, r#"{"f":""}"#, true),
    (r#"{ f = [{ wildcard = "ab" }] }"#, r#"{"f":"ab"}"#, true),
    (r#"{ f = [{ wildcard = "ab" }] }"#, r#"{"f":"abc"}"#, false),
    (r#"{ f = [{ wildcard = 'a\*b' }] }"#, r#"{"f":"a*b"}"#, true),
    (
        r#"{ f = [{ wildcard = 'a\*b' }] }"#,
        r#"{"f":"aXb"}"#,
        false,
    ),
    (
        r#"{ f = [{ wildcard = 'a\\*' }] }"#,
        r#"{"f":"a\\xyz"}"#,
        true,
    ),
    (
        r#"{ f = [{ wildcard = "*/lib/*" }] }"#,
        r#"{"f":"/usr/lib/x"}"#,
        true,
    ),
    (r#"{ f = [{ wildcard = "a*a" }] }"#, r#"{"f":"a"}"#, false),
    (r#"{ f = [{ wildcard = "a*a" }] }"#, r#"{"f":"aa"}"#, true),
    // anything-but.
    (
        r#"{ t = [{ anything-but = ["a", "b"] }] }"#,
        r#"{"t":"c"}"#,
        true,
    ),
    (
        r#"{ t = [{ anything-but = ["a", "b"] }] }"#,
        r#"{"t":"a"}"#,
        false,
    ),
    (r#"{ t = [{ anything-but = ["a", "b"] }] }"#, r#"{}"#, false),
    (r#"{ t = [{ anything-but = "a" }] }"#, r#"{"t":"A"}"#, true),
    (r#"{ t = [{ anything-but = "a" }] }"#, r#"{"t":5}"#, true),
    (
        r#"{ t = [{ anything-but = "a" }] }"#,
        r#"{"t":["a","b"]}"#,
        true,
    ),
    (
        r#"{ t = [{ anything-but = "a" }] }"#,
        r#"{"t":["a"]}"#,
        false,
    ),
    (
        r#"{ n = [{ anything-but = [100, 200] }] }"#,
        r#"{"n":150}"#,
        true,
    ),
    (
        r#"{ n = [{ anything-but = [100, 200] }] }"#,
        r#"{"n":100}"#,
        false,
    ),
    (
        r#"{ n = [{ anything-but = 100 }] }"#,
        r#"{"n":"100"}"#,
        true,
    ),
    (
        r#"{ t = [{ anything-but = { prefix = "test." } }] }"#,
        r#"{"t":"order"}"#,
        true,
    ),
    (
        r#"{ t = [{ anything-but = { prefix = "test." } }] }"#,
        r#"{"t":"test.x"}"#,
        false,
    ),
    (
        r#"{ t = [{ anything-but = { suffix = ".png" } }] }"#,
        r#"{"t":"a.jpg"}"#,
        true,
    ),
    (
        r#"{ t = [{ anything-but = { suffix = ".png" } }] }"#,
        r#"{"t":"a.png"}"#,
        false,
    ),
    (
        r#"{ t = [{ anything-but = { equals-ignore-case = "init" } }] }"#,
        r#"{"t":"INIT"}"#,
        false,
    ),
    (
        r#"{ t = [{ anything-but = { equals-ignore-case = ["a", "b"] } }] }"#,
        r#"{"t":"B"}"#,
        false,
    ),
    (
        r#"{ t = [{ anything-but = { equals-ignore-case = ["a", "b"] } }] }"#,
        r#"{"t":"c"}"#,
        true,
    ),
    (
        r#"{ t = [{ anything-but = { wildcard = "*/lib/*" } }] }"#,
        r#"{"t":"/usr/lib/x"}"#,
        false,
    ),
    (
        r#"{ t = [{ anything-but = { wildcard = "*/lib/*" } }] }"#,
        r#"{"t":"/usr/bin/x"}"#,
        true,
    ),
    (
        r#"{ t = [{ anything-but = { wildcard = ["a*", "*z"] } }] }"#,
        r#"{"t":"xyz"}"#,
        false,
    ),
    (
        r#"{ t = [{ anything-but = [{ null = true }] }] }"#,
        r#"{"t":null}"#,
        false,
    ),
    (
        r#"{ t = [{ anything-but = [{ null = true }] }] }"#,
        r#"{"t":""}"#,
        true,
    ),
    // numeric.
    (r#"{ n = [{ numeric = [">", 0] }] }"#, r#"{"n":0.5}"#, true),
    (r#"{ n = [{ numeric = [">", 0] }] }"#, r#"{"n":0}"#, false),
    (r#"{ n = [{ numeric = [">=", 0] }] }"#, r#"{"n":0}"#, true),
    (r#"{ n = [{ numeric = ["<", 0] }] }"#, r#"{"n":-1e3}"#, true),
    (r#"{ n = [{ numeric = ["<=", 0] }] }"#, r#"{"n":1}"#, false),
    (
        r#"{ n = [{ numeric = ["=", 300] }] }"#,
        r#"{"n":300.0}"#,
        true,
    ),
    (
        r#"{ n = [{ numeric = ["=", 300] }] }"#,
        r#"{"n":3e2}"#,
        true,
    ),
    (
        r#"{ n = [{ numeric = ["=", 300] }] }"#,
        r#"{"n":301}"#,
        false,
    ),
    (
        r#"{ n = [{ numeric = [">=", 100, "<", 200] }] }"#,
        r#"{"n":100}"#,
        true,
    ),
    (
        r#"{ n = [{ numeric = [">=", 100, "<", 200] }] }"#,
        r#"{"n":199.99}"#,
        true,
    ),
    (
        r#"{ n = [{ numeric = [">=", 100, "<", 200] }] }"#,
        r#"{"n":200}"#,
        false,
    ),
    (
        r#"{ n = [{ numeric = ["<", 200, ">", 100] }] }"#,
        r#"{"n":150}"#,
        true,
    ),
    (r#"{ n = [{ numeric = [">", 0] }] }"#, r#"{"n":"5"}"#, false),
    (
        r#"{ n = [{ numeric = [">", 0] }] }"#,
        r#"{"n":[-1, 3]}"#,
        true,
    ),
    (r#"{ n = [{ numeric = [">", 0] }, 0] }"#, r#"{"n":0}"#, true),
    (
        r#"{ n = [{ numeric = [">", 10] }, { numeric = ["<", 0] }] }"#,
        r#"{"n":5}"#,
        false,
    ),
    // exists.
    (r#"{ c = [{ exists = true }] }"#, r#"{"c":""}"#, true),
    (r#"{ c = [{ exists = true }] }"#, r#"{"c":null}"#, true),
    (r#"{ c = [{ exists = true }] }"#, r#"{}"#, false),
    (r#"{ c = [{ exists = true }] }"#, r#"{"c":{"d":1}}"#, false),
    (r#"{ c = [{ exists = true }] }"#, r#"{"c":[]}"#, false),
    (r#"{ c = [{ exists = false }] }"#, r#"{}"#, true),
    (r#"{ c = [{ exists = false }] }"#, r#"{"c":""}"#, false),
    (r#"{ c = [{ exists = false }] }"#, r#"{"c":null}"#, false),
    (r#"{ c = [{ exists = false }] }"#, r#"{"c":{"d":1}}"#, true),
    (r#"{ d = { c = [{ exists = false }] } }"#, r#"{}"#, true),
    (
        r#"{ d = { c = [{ exists = false }] } }"#,
        r#"{"d":"x"}"#,
        true,
    ),
    (r#"{ c = [{ exists = false }, "x"] }"#, r#"{"c":"x"}"#, true),
    (
        r#"{ c = [{ exists = false }, "x"] }"#,
        r#"{"c":"y"}"#,
        false,
    ),
    (
        r#"{ a = { b = [1], c = [{ exists = false }] } }"#,
        r#"{"a":[{"b":1},{"c":2}]}"#,
        true,
    ),
    (
        r#"{ a = { b = [1], c = [{ exists = false }] } }"#,
        r#"{"a":[{"b":1,"c":2}]}"#,
        false,
    ),
    (
        r#"{ a = { c = [{ exists = false }] } }"#,
        r#"{"a":[{"b":1},{"c":2}]}"#,
        false,
    ),
    (
        r#"{ x = [1], c = [{ exists = false }] }"#,
        r#"{"x":1}"#,
        true,
    ),
    // cidr.
    (
        r#"{ ip = [{ cidr = "10.0.0.0/24" }] }"#,
        r#"{"ip":"10.0.0.255"}"#,
        true,
    ),
    (
        r#"{ ip = [{ cidr = "10.0.0.0/24" }] }"#,
        r#"{"ip":"10.0.1.0"}"#,
        false,
    ),
    (
        r#"{ ip = [{ cidr = "10.0.0.0/8" }] }"#,
        r#"{"ip":"10.200.3.4"}"#,
        true,
    ),
    (
        r#"{ ip = [{ cidr = "0.0.0.0/0" }] }"#,
        r#"{"ip":"8.8.8.8"}"#,
        true,
    ),
    (
        r#"{ ip = [{ cidr = "10.0.0.1/32" }] }"#,
        r#"{"ip":"10.0.0.1"}"#,
        true,
    ),
    (
        r#"{ ip = [{ cidr = "10.0.0.0/24" }] }"#,
        r#"{"ip":"not an ip"}"#,
        false,
    ),
    (
        r#"{ ip = [{ cidr = "10.0.0.0/24" }] }"#,
        r#"{"ip":"::ffff:10.0.0.1"}"#,
        false,
    ),
    (
        r#"{ ip = [{ cidr = "2001:db8::/32" }] }"#,
        r#"{"ip":"2001:db8:1::1"}"#,
        true,
    ),
    (
        r#"{ ip = [{ cidr = "2001:db8::/32" }] }"#,
        r#"{"ip":"2001:db9::1"}"#,
        false,
    ),
    (
        r#"{ ip = [{ cidr = "2001:db8::/32" }] }"#,
        r#"{"ip":"10.0.0.1"}"#,
        false,
    ),
    // $or at any level.
    (
        r#"{ source = ["s"], "$or" = [{ type = ["a"] }, { n = [{ numeric = [">", 5] }] }] }"#,
        r#"{"source":"s","type":"b","n":6}"#,
        true,
    ),
    (
        r#"{ source = ["s"], "$or" = [{ type = ["a"] }, { n = [{ numeric = [">", 5] }] }] }"#,
        r#"{"source":"s","type":"b","n":1}"#,
        false,
    ),
    (
        r#"{ source = ["s"], "$or" = [{ type = ["a"] }, { n = [{ numeric = [">", 5] }] }] }"#,
        r#"{"source":"x","type":"a"}"#,
        false,
    ),
    (
        r#"{ d = { "$or" = [{ a = ["1"] }, { b = ["2"] }] } }"#,
        r#"{"d":{"b":"2"}}"#,
        true,
    ),
    (
        r#"{ d = { "$or" = [{ a = ["1"] }, { b = ["2"] }] } }"#,
        r#"{"b":"2"}"#,
        false,
    ),
    (
        r#"{ d = { x = [1], "$or" = [{ a = [1] }, { b = [2] }] } }"#,
        r#"{"d":[{"x":1,"a":0},{"x":0,"b":2}]}"#,
        false,
    ),
    (
        r#"{ d = { x = [1], "$or" = [{ a = [1] }, { b = [2] }] } }"#,
        r#"{"d":[{"x":1,"a":0},{"x":1,"b":2}]}"#,
        true,
    ),
    (
        r#"{ "$or" = [{ a = [1] }, { "$or" = [{ b = [2] }, { c = [3] }] }] }"#,
        r#"{"c":3}"#,
        true,
    ),
    (
        r#"{ "$or" = [{ a = [{ exists = false }] }, { a = [1] }] }"#,
        r#"{"a":2}"#,
        false,
    ),
    (
        r#"{ "$or" = [{ a = [{ exists = false }] }, { a = [1] }] }"#,
        r#"{}"#,
        true,
    ),
];

#[test]
fn table_of_cases_compiled_alone_and_together() {
    assert!(CASES.len() >= 100, "{} cases", CASES.len());
    let patterns: Vec<Pattern> = CASES
        .iter()
        .map(|(p, _, _)| compile(p).unwrap_or_else(|e| panic!("{p}: {e:?}")))
        .collect();
    let all = Matcher::new(&patterns);
    for (i, ((p, event, want), pattern)) in CASES.iter().zip(&patterns).enumerate() {
        let alone = Matcher::new([pattern]);
        let got = alone.matching_json(event.as_bytes()).expect("valid json");
        assert_eq!(!got.is_empty(), *want, "case {i}: {p} on {event}");
        assert_eq!(
            alone.matching_valid_json(event.as_bytes()),
            Ok(got.clone()),
            "case {i} read as valid: {p} on {event}"
        );
        let together = all.matching_json(event.as_bytes()).expect("valid json");
        assert_eq!(
            all.matching_valid_json(event.as_bytes()),
            Ok(together.clone()),
            "case {i} among all, read as valid: {p} on {event}"
        );
        assert_eq!(
            together.contains(&i),
            *want,
            "case {i} among all: {p} on {event}"
        );
        let leaves = flatten(event.as_bytes()).expect("valid json");
        let explained = pattern.explain_leaves(&leaves);
        assert_eq!(
            explained.is_ok(),
            *want,
            "case {i} explained: {p} on {event}: {explained:?}"
        );
    }
}

#[test]
fn invalid_patterns_are_errors_with_paths() {
    let cases: &[(&str, &str, &str)] = &[
        (r#"{ type = "x" }"#, "type", "must be in a list"),
        (r#"{ type = [] }"#, "type", "empty list"),
        (
            r#"{ t = [{ prefix = { wildcard = "a*" } }] }"#,
            "t",
            "`prefix` takes a string, or { equals-ignore-case",
        ),
        (
            r#"{ t = [{ suffix = { equals-ignore-case = 1 } }] }"#,
            "t",
            "`suffix.equals-ignore-case` takes a string",
        ),
        (r#"{ d = {} }"#, "d", "empty table"),
        (
            r#"{ type = [{ prefixx = "a" }] }"#,
            "type",
            "unknown operator `prefixx`",
        ),
        (
            r#"{ n = [{ numeric = [">", "x"] }] }"#,
            "n",
            "in `numeric`: expected a number, found string",
        ),
        (r#"{ n = [{ numeric = ["<", 1, ">", 5] }] }"#, "n", "range"),
        (r#"{ n = [{ numeric = [">", 1, ">", 5] }] }"#, "n", "range"),
        (
            r#"{ n = [{ numeric = [">", 1, "<"] }] }"#,
            "n",
            "one or two comparisons",
        ),
        (
            r#"{ n = [{ numeric = ["~", 1] }] }"#,
            "n",
            "unknown comparison `~`",
        ),
        (
            r#"{ n = [{ numeric = [">", nan] }] }"#,
            "n",
            "not a finite number",
        ),
        (
            r#"{ n = [{ numeric = "> 1" }] }"#,
            "n",
            "one or two comparisons",
        ),
        (r#"{ "$or" = [{ a = ["x"] }] }"#, "$or", "$or"),
        (r#"{ "$or" = "x" }"#, "$or", "$or"),
        (
            r#"{ "$or" = [{ a = [] }, { b = [1] }] }"#,
            "$or.a",
            "empty list",
        ),
        (
            r#"{ ip = [{ cidr = "10.0.0.0" }] }"#,
            "ip",
            "not a CIDR block",
        ),
        (
            r#"{ ip = [{ cidr = "10.0.0.0/33" }] }"#,
            "ip",
            "prefix length 33 is over 32",
        ),
        (
            r#"{ ip = [{ cidr = "300.0.0.0/8" }] }"#,
            "ip",
            "not a CIDR block",
        ),
        (
            r#"{ ip = [{ cidr = "2001:db8::/129" }] }"#,
            "ip",
            "over 128",
        ),
        (r#"{ f = [{ wildcard = "a**b" }] }"#, "f", "`**`"),
        (r#"{ f = [{ wildcard = 'a\b' }] }"#, "f", "escapes only"),
        (
            r#"{ f = [{ wildcard = "*a*b*c*d*e*f*g*h*" }] }"#,
            "f",
            "more than 8",
        ),
        (
            r#"{ f = [{ wildcard = 1 }] }"#,
            "f",
            "`wildcard` takes a string, found integer",
        ),
        (
            r#"{ f = [{ prefix = 1 }] }"#,
            "f",
            "`prefix` takes a string, found integer",
        ),
        (
            r#"{ f = [{ exists = "yes" }] }"#,
            "f",
            "`exists` takes true or false",
        ),
        (r#"{ f = [{ null = false }] }"#, "f", "{ null = true }"),
        (
            r#"{ f = [{ prefix = "a", suffix = "b" }] }"#,
            "f",
            "exactly one operator",
        ),
        (r#"{ f = [["a"]] }"#, "f", "flatten"),
        (
            r#"{ f = [{ anything-but = [] }] }"#,
            "f",
            "at least one value",
        ),
        (
            r#"{ f = [{ anything-but = { numeric = [">", 1] } }] }"#,
            "f",
            "does not take `numeric`",
        ),
        (
            r#"{ f = [{ anything-but = { prefix = ["a"] } }] }"#,
            "f",
            "`anything-but.prefix` takes a string",
        ),
        (
            r#"{ f = [{ anything-but = { wildcard = "a**" } }] }"#,
            "f",
            "`**`",
        ),
        (
            r#"{ f = [{ anything-but = { equals-ignore-case = [] } }] }"#,
            "f",
            "at least one string",
        ),
    ];
    for (src, path, needle) in cases {
        let errs = compile(src).expect_err(src);
        assert_eq!(errs[0].path, *path, "{src}: {errs:?}");
        assert!(errs[0].message.contains(needle), "{src}: {errs:?}");
    }
    // Every problem at once.
    let errs =
        compile(r#"{ a = [], b = [{ cidr = "x" }], c = { d = [{ numeric = [">", "x"] }] } }"#)
            .expect_err("three errors");
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["a", "b", "c.d"]);
    // Too many `$or` combinations.
    let or = r#"{ "$or" = [{ a = [1] }, { b = [1] }, { c = [1] }, { d = [1] }] }"#;
    let many = format!("{{ x = {or}, y = {or}, z = {or}, w = {or}, v = {or} }}");
    let errs = compile(&many).expect_err("too many alternatives");
    assert!(errs[0].message.contains("alternatives"), "{errs:?}");
}

#[test]
fn explain_names_the_first_failing_field() {
    let cases: &[(&str, &str, &str)] = &[
        (
            r#"{ data = { total = [{ numeric = [">=", 100] }] } }"#,
            r#"{"data":{"total":80}}"#,
            "data.total: 80 is not >= 100",
        ),
        (
            r#"{ type = [{ prefix = "order." }] }"#,
            r#"{"type":"refund"}"#,
            r#"type: "refund" does not start with "order.""#,
        ),
        (
            r#"{ data = { customer = [{ exists = true }] } }"#,
            r#"{"data":{}}"#,
            "data.customer: missing",
        ),
        (
            r#"{ type = ["a", "b"] }"#,
            r#"{"type":"c"}"#,
            r#"type: "c" is not "a" or "b""#,
        ),
        (r#"{ n = [300] }"#, r#"{"n":300.0}"#, "n: 300.0 is not 300"),
        (
            r#"{ c = [{ exists = false }] }"#,
            r#"{"c":1}"#,
            "c: 1 is present, expected absent",
        ),
        (
            r#"{ n = [{ numeric = [">", 1] }] }"#,
            r#"{"n":"5"}"#,
            r#"n: "5" is not a number (expected > 1)"#,
        ),
        (
            r#"{ a = { b = [1], c = [2] } }"#,
            r#"{"a":[{"b":1},{"c":2}]}"#,
            "a.b, a.c: each matches, but not within the same array element",
        ),
        (
            r#"{ "$or" = [{ a = [1] }, { b = [2] }] }"#,
            r#"{}"#,
            "none of the 2 `$or` alternatives matches; the first fails at a: missing",
        ),
        (
            r#"{ t = [{ anything-but = "x" }] }"#,
            r#"{"t":"x"}"#,
            r#"t: "x" is excluded (anything but "x")"#,
        ),
    ];
    for (p, event, want) in cases {
        let pattern = compile(p).expect("valid");
        let leaves = flatten(event.as_bytes()).expect("json");
        assert_eq!(
            pattern.explain_leaves(&leaves),
            Err(want.to_string()),
            "{p}"
        );
    }
}

#[test]
fn exact_sources_and_match_all() {
    let p = compile(r#"{ source = ["shop", { prefix = "x" }] }"#).expect("valid");
    assert_eq!(p.exact_sources(), vec!["shop"]);
    assert!(Pattern::match_all().matches(&serde_json::json!({"anything": 1})));
    let m = Matcher::new([&Pattern::match_all(), &p]);
    assert_eq!(m.matching_json(br#"{"source":"shop"}"#), Ok(vec![0, 1]));
    assert_eq!(m.matching_json(br#"{"source":"web"}"#), Ok(vec![0]));
}

#[test]
fn routes_match_events_through_the_envelope() {
    use crate::event::Event;
    let event = |ct: &str, data: &str| Event {
        id: "1".into(),
        source: "shop".into(),
        ty: "order.created".into(),
        subject: None,
        time: "2024-01-01T00:00:00Z".into(),
        datacontenttype: ct.into(),
        data: data.as_bytes().to_vec(),
        extensions: [("tenant".to_string(), "acme".to_string())].into(),
    };
    let p = compile(
        r#"{ source = ["shop"], tenant = ["acme"], data = { total = [{ numeric = [">", 5] }] } }"#,
    )
    .expect("valid");
    let m = Matcher::new([&p]);
    assert_eq!(
        m.matching_event(&event("application/json", r#"{"total":9}"#)),
        vec![0]
    );
    assert!(
        m.matching_event(&event("application/json", r#"{"total":1}"#))
            .is_empty()
    );
    // Data that is not JSON has no fields.
    assert!(
        m.matching_event(&event("text/plain", r#"{"total":9}"#))
            .is_empty()
    );
    // Malformed JSON data never gets this far: every way in refuses it, so
    // the matcher reads data without checking it again.
    for bad in [r#"{"total":9"#, r#"{"total":9,"x":"#, r#"{"total":9} x"#] {
        assert!(
            event("application/json", bad).check_data().is_err(),
            "{bad}"
        );
        // Were it to, the result is unspecified but nothing panics.
        let _ = m.matching_event(&event("application/json", bad));
    }
    assert!(event("text/plain", "{").check_data().is_ok());
    let absent = compile(r#"{ data = { total = [{ exists = false }] } }"#).expect("valid");
    let m = Matcher::new([&absent]);
    assert_eq!(
        m.matching_event(&event("application/json", r#"{"x":{"total":9}}"#)),
        vec![0]
    );
    assert_eq!(
        super::explain(&p, &event("application/json", r#"{"total":1}"#)),
        Err("data.total: 1 is not > 5".to_string())
    );
}

#[test]
fn skipped_fields_are_still_checked_for_syntax() {
    let p = compile(r#"{ a = [1] }"#).expect("valid");
    let m = Matcher::new([&p]);
    assert_eq!(
        m.matching_json(br#"{"z":{"q":[1,{"r":"s\""}]},"a":1}"#),
        Ok(vec![0])
    );
    assert!(m.matching_json(br#"{"z":{"q":[1,}},"a":1}"#).is_err());
    assert!(m.matching_json(br#"{"a":1} x"#).is_err());
    let deep = format!("{{\"z\":{}{}}}", "[".repeat(500), "]".repeat(500));
    assert!(m.matching_json(deep.as_bytes()).is_err());
}

/// A key repeated in one object counts once, the first time, however the
/// document is read (strictly, as valid, or flattened for `explain`).
#[test]
fn a_repeated_key_counts_once_the_first() {
    let first = compile(r#"{ a = [1] }"#).expect("valid");
    let second = compile(r#"{ a = [2] }"#).expect("valid");
    let m = Matcher::new([&first, &second]);
    for doc in [
        r#"{"a":1,"a":2}"#,
        r#"{"a":1,"b":{"c":[1,2]},"a":2}"#,
        r#"{"z":true,"a":1,"a":2,"z":false}"#,
    ] {
        assert_eq!(m.matching_json(doc.as_bytes()), Ok(vec![0]), "{doc}");
        assert_eq!(m.matching_valid_json(doc.as_bytes()), Ok(vec![0]), "{doc}");
        let leaves = flatten(doc.as_bytes()).expect("valid json");
        assert!(first.explain_leaves(&leaves).is_ok(), "{doc}");
        assert!(second.explain_leaves(&leaves).is_err(), "{doc}");
    }
    // An object with more named keys than the bits track: the same rule.
    let wide: Vec<Pattern> = (0..70)
        .map(|i| compile(&format!("{{ w = {{ k{i} = [{i}] }} }}")).expect("valid"))
        .collect();
    let m = Matcher::new(&wide);
    let doc = br#"{"w":{"k3":3,"k5":5,"k3":4,"k69":69,"k5":6}}"#;
    assert_eq!(m.matching_json(doc), Ok(vec![3, 5, 69]));
    assert_eq!(m.matching_valid_json(doc), Ok(vec![3, 5, 69]));
    let doc = br#"{"w":{"k3":4,"k3":3}}"#;
    assert_eq!(m.matching_json(doc), Ok(vec![]));
    assert_eq!(m.matching_valid_json(doc), Ok(vec![]));
    // Each object in an array is an object of its own.
    let nested = compile(r#"{ xs = { a = [2] } }"#).expect("valid");
    let m = Matcher::new([&nested]);
    let doc = br#"{"xs":[{"a":1},{"a":2}]}"#;
    assert_eq!(m.matching_json(doc), Ok(vec![0]));
    assert_eq!(m.matching_valid_json(doc), Ok(vec![0]));
}

/// Read as valid, a document is read only as far as its named fields: what
/// comes after them is not looked at (it was checked on the way in).
#[test]
fn valid_documents_are_read_only_as_far_as_needed() {
    let p = compile(r#"{ a = [1], b = { c = ["x"] } }"#).expect("valid");
    let m = Matcher::new([&p]);
    let doc = br#"{"b":{"c":"x","skip":[1,{"d":"]}"}]},"a":1,"rest":[[[1,2],[3,4]]]}"#;
    assert_eq!(m.matching_json(doc), Ok(vec![0]));
    assert_eq!(m.matching_valid_json(doc), Ok(vec![0]));
    // The tail after `a` is garbage: the strict path sees it, the valid
    // path stops before it.
    let tail = br#"{"b":{"c":"x"},"a":1,"rest":[[[1,2],[3"#;
    assert!(m.matching_json(tail).is_err());
    assert_eq!(m.matching_valid_json(tail), Ok(vec![0]));
    // Skipped values with quotes, escapes and brackets inside strings.
    let tricky = br#"{"s":"a\"]}{[\\","t":["]",{"u":"}\"{"}],"b":{"c":"x"},"a":1}"#;
    assert_eq!(m.matching_valid_json(tricky), Ok(vec![0]));
    // Truncated input is an error, never a panic or an endless loop.
    for cut in 0..tricky.len() {
        let _ = m.matching_valid_json(&tricky[..cut]);
    }
}

/// Mutated documents: the valid path agrees with the strict one on every
/// document serde_json accepts, and never panics on the others.
#[test]
fn valid_path_agrees_with_strict_path() {
    let patterns: Vec<Pattern> = [
        r#"{ p = { A = [{ prefix = "01" }], N = [{ numeric = ["<", 0] }] } }"#,
        r#"{ g = { t = ["P"] }, p = { y = [true] } }"#,
        r#"{ k = { A = [{ exists = true }] }, e = [{ exists = false }] }"#,
        r#"{ "a\"b" = ["c\\d"], p = { y = [{ null = true }] } }"#,
    ]
    .iter()
    .map(|s| compile(s).expect("valid"))
    .collect();
    let m = Matcher::new(&patterns);
    let seeds = [
        r#"{"p": {"A": "0123", "N": -0.5e+10, "y": [true, false, null, 1E5]}, "g": {"t": "P", "c": [[[-122.4, 37.7, 0.0], [1, 2]]]}, "z": "Y_y"}"#,
        r#"{"a\"b": "c\\d", "k": {"A": [{"z": "q\n"}, {}], "e": []}, "p": {"y": null}}"#,
        r#"{"g":{"c":[{"t":"P"}],"t":"P"},"p":{"y":true,"y":false},"k":{}}"#,
    ];
    let bytes = b"\"\\{}[],:0123456789-+.eEtrufalsnY_y \t";
    let mut rng = fastrand::Rng::with_seed(11);
    let (mut valid, mut matched) = (0, 0);
    for n in 0..20_000 {
        let mut doc = seeds[n % seeds.len()].as_bytes().to_vec();
        for _ in 0..rng.usize(0..3) {
            let at = rng.usize(0..doc.len());
            let c = bytes[rng.usize(0..bytes.len())];
            match rng.u8(0..3) {
                0 => drop(doc.remove(at)),
                1 => doc.insert(at, c),
                _ => doc[at] = c,
            }
        }
        let trusted = m.matching_valid_json(&doc);
        if serde_json::from_slice::<serde::de::IgnoredAny>(&doc).is_ok() {
            valid += 1;
            let strict = m.matching_json(&doc);
            assert_eq!(trusted, strict, "{}", String::from_utf8_lossy(&doc));
            matched += usize::from(strict.is_ok_and(|r| !r.is_empty()));
        }
    }
    assert!(
        valid > 5_000 && matched > 1_000,
        "{valid} valid, {matched} matched"
    );
}

/// Prefixes of a few lengths are looked up by length; more lengths, or a
/// suffix on the same field, take the trie: both give the same answers.
#[test]
fn prefixes_by_length_and_by_trie_agree() {
    let sets: [&[&str]; 3] = [
        &["", "a", "ab", "abc"],
        &["a", "ab", "abc", "abcd", "abcde", "b"],
        &["ab", "é"],
    ];
    for set in sets {
        for extra in ["", r#", { suffix = "z" }"#] {
            let patterns: Vec<Pattern> = set
                .iter()
                .map(|p| {
                    compile(&format!(r#"{{ f = [{{ prefix = "{p}" }}{extra}] }}"#)).expect("valid")
                })
                .collect();
            let m = Matcher::new(&patterns);
            for value in ["", "a", "ab", "abc", "abcdef", "b", "ba", "z", "éa", "xyz"] {
                let doc = format!(r#"{{"f":"{value}"}}"#);
                let want: Vec<usize> = set
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| {
                        value.starts_with(*p) || (!extra.is_empty() && value.ends_with('z'))
                    })
                    .map(|(i, _)| i)
                    .collect();
                assert_eq!(
                    m.matching_json(doc.as_bytes()),
                    Ok(want),
                    "{set:?}{extra} on {value}"
                );
            }
        }
    }
}

#[test]
fn many_wildcards_on_one_field_draw_a_warning() {
    let patterns: Vec<Pattern> = (0..300)
        .map(|i| compile(&format!(r#"{{ f = [{{ wildcard = "*a{i}*b*c" }}] }}"#)).expect("valid"))
        .collect();
    let m = Matcher::new(&patterns);
    assert_eq!(m.warnings().len(), 1, "{:?}", m.warnings());
    assert!(m.warnings()[0].contains("field `f`"));
    assert_eq!(m.matching_json(br#"{"f":"xa7ybzc"}"#), Ok(vec![7]));
    let few = Matcher::new(&patterns[..10]);
    assert!(few.warnings().is_empty());
}

mod property {
    use proptest::prelude::*;

    use super::*;

    fn scalar() -> impl Strategy<Value = J> {
        prop_oneof![
            prop::sample::select(vec![
                "x",
                "y",
                "xy",
                "",
                "X",
                "ax",
                "10.1.2.3",
                "192.168.0.1",
                "2001:db8::1",
                "a*b"
            ])
            .prop_map(|s| J::Str(s.to_string())),
            prop::sample::select(vec!["1", "1.0", "2", "10", "-3", "1e1", "0"])
                .prop_map(|s| J::Num(s.to_string())),
            any::<bool>().prop_map(J::Bool),
            Just(J::Null),
        ]
    }

    /// An object with each of the keys a, b, c present most of the time.
    fn object(value: BoxedStrategy<J>) -> impl Strategy<Value = J> {
        let field = move |k: &'static str| {
            prop::option::weighted(0.75, value.clone())
                .prop_map(move |v| v.map(|v| (k.to_string(), v)))
        };
        (field("a"), field("b"), field("c"))
            .prop_map(|(a, b, c)| J::Obj([a, b, c].into_iter().flatten().collect()))
    }

    fn event() -> impl Strategy<Value = J> {
        let value = scalar().prop_recursive(3, 24, 3, |inner| {
            prop_oneof![
                2 => prop::collection::vec(inner.clone(), 0..3).prop_map(J::Arr),
                3 => object(inner.boxed()),
            ]
        });
        object(value.boxed())
    }

    fn condition() -> impl Strategy<Value = String> {
        prop::sample::select(vec![
            r#""x""#,
            r#""y""#,
            r#""""#,
            "1",
            "1.0",
            "10",
            "true",
            "false",
            "{ null = true }",
            r#"{ prefix = "x" }"#,
            r#"{ prefix = "" }"#,
            r#"{ suffix = "y" }"#,
            r#"{ equals-ignore-case = "x" }"#,
            r#"{ prefix = { equals-ignore-case = "X" } }"#,
            r#"{ suffix = { equals-ignore-case = "Y" } }"#,
            r#"{ wildcard = "*x*" }"#,
            r#"{ wildcard = "a*" }"#,
            r#"{ wildcard = 'a\*b' }"#,
            r#"{ wildcard = "x*y" }"#,
            r#"{ anything-but = "x" }"#,
            r#"{ anything-but = [1, "y"] }"#,
            r#"{ anything-but = { prefix = "x" } }"#,
            r#"{ anything-but = { suffix = "y" } }"#,
            r#"{ anything-but = { equals-ignore-case = ["x", "Y"] } }"#,
            r#"{ anything-but = { wildcard = "*y" } }"#,
            r#"{ numeric = [">", 1] }"#,
            r#"{ numeric = [">=", 1, "<", 10] }"#,
            r#"{ numeric = ["=", 10] }"#,
            r#"{ numeric = ["<=", 0] }"#,
            "{ exists = true }",
            "{ exists = false }",
            r#"{ cidr = "10.0.0.0/8" }"#,
            r#"{ cidr = "2001:db8::/32" }"#,
        ])
        .prop_map(str::to_string)
    }

    fn fields() -> impl Strategy<Value = String> {
        let list =
            prop::collection::vec(condition(), 1..3).prop_map(|cs| format!("[{}]", cs.join(", ")));
        let value = list.prop_recursive(2, 6, 2, |inner| {
            prop::collection::vec((prop::sample::select(vec!["a", "b", "c"]), inner), 1..3)
                .prop_map(|fs| table(&fs))
        });
        let key = prop::sample::select(vec!["a", "b", "c", "$or"]);
        prop::collection::vec((key, value), 1..3).prop_map(|fs| {
            let fs: Vec<(&str, String)> = fs
                .into_iter()
                .map(|(k, v)| {
                    if k == "$or" {
                        (
                            k,
                            format!("[{{ a = {v} }}, {{ b = [\"x\", 1, {{ exists = false }}] }}]"),
                        )
                    } else {
                        (k, v)
                    }
                })
                .collect();
            table(&fs)
        })
    }

    fn table(fs: &[(&str, String)]) -> String {
        let mut seen = Vec::new();
        let parts: Vec<String> = fs
            .iter()
            .filter(|(k, _)| {
                let new = !seen.contains(k);
                seen.push(*k);
                new
            })
            .map(|(k, v)| format!("\"{k}\" = {v}"))
            .collect();
        format!("{{ {} }}", parts.join(", "))
    }

    proptest! {
        // 2,000 cases unless PROPTEST_CASES asks for another number.
        #![proptest_config(ProptestConfig {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(2000),
            ..ProptestConfig::default()
        })]
        #[test]
        fn compiled_matcher_agrees_with_reference(
            sources in prop::collection::vec(fields(), 1..4),
            events in prop::collection::vec(event(), 1..4),
        ) {
            let patterns: Vec<Pattern> = sources
                .iter()
                .map(|s| compile(s).unwrap_or_else(|e| panic!("{s}: {e:?}")))
                .collect();
            let m = Matcher::new(&patterns);
            for e in &events {
                let text = e.to_json();
                let got = m.matching_json(text.as_bytes()).expect("valid json");
                prop_assert_eq!(m.matching_valid_json(text.as_bytes()), Ok(got.clone()), "read as valid: {}", text);
                let leaves = flatten(text.as_bytes()).expect("valid json");
                for (i, p) in patterns.iter().enumerate() {
                    let want = reference::matches(p, e);
                    prop_assert_eq!(got.contains(&i), want, "pattern {} on {}", sources[i], text);
                    prop_assert_eq!(p.explain_leaves(&leaves).is_ok(), want, "explain {} on {}", sources[i], text);
                }
            }
        }
    }

    /// The generators produce both outcomes often enough for the property
    /// above to mean something.
    #[test]
    fn generated_cases_match_and_miss() {
        use proptest::strategy::ValueTree;
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let (mut hit, mut miss) = (0, 0);
        for _ in 0..500 {
            let (Ok(src), Ok(e)) = (
                fields().new_tree(&mut runner),
                event().new_tree(&mut runner),
            ) else {
                continue;
            };
            let p = compile(&src.current()).expect("valid");
            if reference::matches(&p, &e.current()) {
                hit += 1;
            } else {
                miss += 1;
            }
        }
        assert!(hit >= 25 && miss >= 25, "{hit} matches, {miss} misses");
    }
}
