//! The event as it travels through the router: a CloudEvents 1.0 envelope.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// One accepted event. Stored in the journal as is and handed to plugins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub id: String,
    /// The name of the source (webhook) it arrived on.
    pub source: String,
    #[serde(rename = "type")]
    pub ty: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// RFC 3339, UTC, when the router accepted it.
    pub time: String,
    pub datacontenttype: String,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// Extension attributes (CloudEvents names: lower-case letters and digits).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extensions: BTreeMap<String, String>,
}

impl Event {
    /// The text at a JSON pointer into the envelope (`/subject`, `/type`,
    /// `/data/account`, an extension's name): strings as they are, numbers
    /// and booleans as JSON text; `None` when absent or not a scalar.
    pub fn pointer_text(&self, pointer: &str) -> Option<String> {
        let rest = pointer.strip_prefix('/')?;
        let (head, tail) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let attribute = |v: &str| tail.is_empty().then(|| v.to_string());
        match head {
            "data" if self.data_is_json() => {
                json_pointers(&self.data, &[tail]).ok()?.pop().flatten()
            }
            "data" => None,
            "id" => attribute(&self.id),
            "source" => attribute(&self.source),
            "type" => attribute(&self.ty),
            "subject" => attribute(self.subject.as_deref()?),
            "time" => attribute(&self.time),
            "datacontenttype" => attribute(&self.datacontenttype),
            ext => attribute(self.extensions.get(ext)?),
        }
    }

    /// Whether `data` is JSON (so patterns can look inside it).
    pub fn data_is_json(&self) -> bool {
        is_json_media_type(&self.datacontenttype)
    }

    /// `Err` when `datacontenttype` says JSON but `data` is not valid JSON.
    /// Every way into the router checks this, so the matcher can read data
    /// without checking it again (`rules::json::scan_valid`).
    pub fn check_data(&self) -> Result<(), String> {
        if self.data_is_json()
            && !self.data.is_empty()
            && let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&self.data)
        {
            return Err(format!(
                "data is not valid JSON, though datacontenttype is `{}`: {e}",
                self.datacontenttype
            ));
        }
        Ok(())
    }

    /// The envelope in CloudEvents' JSON format: `data` inline when it is JSON,
    /// else `data_base64`.
    pub fn to_json(&self) -> serde_json::Value {
        use base64::Engine as _;
        let mut obj = serde_json::Map::new();
        obj.insert("specversion".into(), "1.0".into());
        obj.insert("id".into(), self.id.clone().into());
        obj.insert("source".into(), self.source.clone().into());
        obj.insert("type".into(), self.ty.clone().into());
        if let Some(subject) = &self.subject {
            obj.insert("subject".into(), subject.clone().into());
        }
        obj.insert("time".into(), self.time.clone().into());
        obj.insert(
            "datacontenttype".into(),
            self.datacontenttype.clone().into(),
        );
        for (k, v) in &self.extensions {
            obj.insert(k.clone(), v.clone().into());
        }
        match self
            .data_is_json()
            .then(|| serde_json::from_slice::<serde_json::Value>(&self.data).ok())
            .flatten()
        {
            Some(data) => {
                obj.insert("data".into(), data);
            }
            None => {
                obj.insert(
                    "data_base64".into(),
                    base64::engine::general_purpose::STANDARD
                        .encode(&self.data)
                        .into(),
                );
            }
        }
        serde_json::Value::Object(obj)
    }
}

impl Event {
    /// An event from its CloudEvents JSON form (as `to_json` writes it): `source`
    /// and `type` are required; `id` and `time` are filled in when absent; `data`
    /// or `data_base64`; other string attributes become extensions.
    pub fn from_envelope_json(text: &str) -> Result<Event, String> {
        use base64::Engine as _;
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        let serde_json::Value::Object(obj) = value else {
            return Err("an event envelope must be a JSON object".into());
        };
        let text_attr = |name: &str| -> Result<Option<String>, String> {
            match obj.get(name) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(format!("`{name}` must be a string, found {other}")),
            }
        };
        let required =
            |name: &str| text_attr(name)?.ok_or_else(|| format!("the envelope has no `{name}`"));
        let (data, datacontenttype) = match (obj.get("data"), text_attr("data_base64")?) {
            (Some(_), Some(_)) => return Err("give `data` or `data_base64`, not both".into()),
            (Some(d), None) => (
                d.to_string().into_bytes(),
                text_attr("datacontenttype")?.unwrap_or_else(|| "application/json".into()),
            ),
            (None, Some(b64)) => (
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|e| format!("`data_base64` is not base64: {e}"))?,
                text_attr("datacontenttype")?.unwrap_or_else(|| "application/octet-stream".into()),
            ),
            (None, None) => (
                Vec::new(),
                text_attr("datacontenttype")?.unwrap_or_else(|| "application/json".into()),
            ),
        };

        let mut extensions = BTreeMap::new();
        for (k, v) in &obj {
            if CONTEXT_ATTRIBUTES.contains(&k.as_str()) || k == "data_base64" {
                continue;
            }
            let v = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            extensions.insert(k.clone(), v);
        }
        let event = Event {
            id: text_attr("id")?.unwrap_or_else(new_event_id),
            source: required("source")?,
            ty: required("type")?,
            subject: text_attr("subject")?,
            time: text_attr("time")?.unwrap_or_else(|| rfc3339_ms(now_ms())),
            datacontenttype,
            data,
            extensions,
        };
        event.check_data()?;
        Ok(event)
    }
}

/// The scalars at several JSON pointers (RFC 6901) into a JSON document, read
/// in one pass that also checks the whole document (an `Err` when it is not
/// JSON) without building a tree of it: strings as they are, numbers and
/// booleans as JSON text (as `serde_json::Value` writes them), `None` when a
/// pointer is absent or names an object, an array or null. A key repeated in
/// one object counts once, the first time, as in matching (`docs/rules.md`).
pub fn json_pointers(
    bytes: &[u8],
    pointers: &[&str],
) -> Result<Vec<Option<String>>, serde_json::Error> {
    use serde::de::DeserializeSeed as _;
    let paths: Vec<Vec<String>> = pointers.iter().map(|p| pointer_tokens(p)).collect();
    let mut walk = PointerWalk {
        out: vec![None; paths.len()],
        // The depth down to which each pointer has been followed: a second
        // key of the same name at a depth already passed is ignored.
        reached: vec![0; paths.len()],
        paths,
    };
    let valid: Vec<usize> = (0..walk.paths.len())
        .filter(|&i| !walk.paths[i].is_empty() || pointers[i].is_empty())
        .collect();
    let mut de = serde_json::Deserializer::from_slice(bytes);
    PointerSeed {
        walk: &mut walk,
        active: valid,
        depth: 0,
    }
    .deserialize(&mut de)?;
    de.end()?;
    Ok(walk.out)
}

/// A pointer's reference tokens, unescaped (`~1` is `/`, `~0` is `~`); empty
/// for the whole document (`""`) and for text that is not a pointer.
fn pointer_tokens(pointer: &str) -> Vec<String> {
    match pointer.strip_prefix('/') {
        None => Vec::new(),
        Some(rest) => rest
            .split('/')
            .map(|t| match t.contains('~') {
                true => t.replace("~1", "/").replace("~0", "~"),
                false => t.to_string(),
            })
            .collect(),
    }
}

struct PointerWalk {
    paths: Vec<Vec<String>>,
    out: Vec<Option<String>>,
    reached: Vec<usize>,
}

/// One value of the document, with the pointers (indices into `paths`) that
/// pass through it or end at it.
struct PointerSeed<'w> {
    walk: &'w mut PointerWalk,
    active: Vec<usize>,
    depth: usize,
}

impl PointerSeed<'_> {
    fn set(&mut self, text: impl Fn() -> String) {
        for &i in &self.active {
            if self.walk.paths[i].len() == self.depth {
                self.walk.out[i] = Some(text());
            }
        }
    }

    /// The pointers that go on below this value under `token`.
    fn below(&mut self, token: impl Fn(&str) -> bool) -> Vec<usize> {
        let depth = self.depth;
        let walk = &mut *self.walk;
        let below: Vec<usize> = self
            .active
            .iter()
            .copied()
            .filter(|&i| {
                walk.paths[i].len() > depth
                    && walk.reached[i] == depth
                    && token(&walk.paths[i][depth])
            })
            .collect();
        for &i in &below {
            walk.reached[i] = depth + 1;
        }
        below
    }
}

/// An object's key, compared with the pointers' tokens where it lies (no
/// copy of it is made).
struct KeySeed<'a, 'w>(&'a mut PointerSeed<'w>);

impl<'de> serde::de::DeserializeSeed<'de> for KeySeed<'_, '_> {
    type Value = Vec<usize>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Vec<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl serde::de::Visitor<'_> for KeySeed<'_, '_> {
    type Value = Vec<usize>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object key")
    }
    fn visit_str<E>(self, key: &str) -> Result<Vec<usize>, E> {
        Ok(self.0.below(|t| t == key))
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for PointerSeed<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for PointerSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(mut self, v: bool) -> Result<(), E> {
        self.set(|| v.to_string());
        Ok(())
    }
    fn visit_i64<E>(mut self, v: i64) -> Result<(), E> {
        self.set(|| v.to_string());
        Ok(())
    }
    fn visit_u64<E>(mut self, v: u64) -> Result<(), E> {
        self.set(|| v.to_string());
        Ok(())
    }
    fn visit_f64<E>(mut self, v: f64) -> Result<(), E> {
        self.set(|| serde_json::Value::from(v).to_string());
        Ok(())
    }
    fn visit_str<E>(mut self, v: &str) -> Result<(), E> {
        self.set(|| v.to_string());
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        let mut index = 0usize;
        loop {
            let below = self.below(|t| {
                // RFC 6901: no leading zeros, no sign.
                t.parse::<usize>().ok() == Some(index) && (t == "0" || !t.starts_with('0'))
            });
            let more = if below.is_empty() {
                seq.next_element::<serde::de::IgnoredAny>()?.is_some()
            } else {
                seq.next_element_seed(PointerSeed {
                    walk: &mut *self.walk,
                    active: below,
                    depth: self.depth + 1,
                })?
                .is_some()
            };
            if !more {
                return Ok(());
            }
            index += 1;
        }
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        while let Some(below) = map.next_key_seed(KeySeed(&mut self))? {
            if below.is_empty() {
                map.next_value::<serde::de::IgnoredAny>()?;
            } else {
                map.next_value_seed(PointerSeed {
                    walk: &mut *self.walk,
                    active: below,
                    depth: self.depth + 1,
                })?;
            }
        }
        Ok(())
    }
}

/// The envelope's own attributes: an extension may not use these names.
pub const CONTEXT_ATTRIBUTES: [&str; 8] = [
    "id",
    "source",
    "type",
    "subject",
    "time",
    "datacontenttype",
    "data",
    "specversion",
];

/// `application/json`, `application/cloudevents+json`, `text/json`, any `+json`.
pub fn is_json_media_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence == "text/json" || essence.ends_with("+json")
}

/// A new, time-ordered event id (UUIDv7).
///
/// Ids of one process only grow, also within a millisecond (RFC 9562's
/// "monotonic random": the 74 bits after the time are the last id's plus a
/// random step), so their order is the order of acceptance, as with
/// `Uuid::now_v7`, which however asks the kernel for its random bits, one
/// system call per event.
pub fn new_event_id() -> String {
    static LAST: std::sync::Mutex<(u64, u128)> = std::sync::Mutex::new((0, 0));
    // rand_a (12 bits) and rand_b (62 bits) as one number; a new millisecond
    // starts in the lower half so that its steps have room.
    const BITS: u32 = 74;
    let fresh = || fastrand::u128(..) >> (128 - BITS + 1);
    let now = now_ms();
    let (ms, counter) = {
        let mut last = LAST
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let next = if now > last.0 {
            (now, fresh())
        } else {
            let r = last.1 + u128::from(fastrand::u32(1..));
            if r >> BITS == 0 {
                (last.0, r)
            } else {
                // This millisecond's ids are used up: go on in the next.
                (last.0 + 1, fresh())
            }
        };
        *last = next;
        next
    };
    uuid_v7(ms, counter).to_string()
}

/// A UUIDv7 of a time and 74 bits (`rand_a` then `rand_b`), in that order.
fn uuid_v7(ms: u64, counter: u128) -> uuid::Uuid {
    let mut bytes = [0u8; 16];
    bytes[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    let rand_a = ((counter >> 62) & 0xfff) as u16;
    let rand_b = counter as u64 & ((1 << 62) - 1);
    bytes[6..8].copy_from_slice(&(0x7000 | rand_a).to_be_bytes());
    bytes[8..].copy_from_slice(&((1u64 << 63) | rand_b).to_be_bytes());
    uuid::Uuid::from_bytes(bytes)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// RFC 3339 text (UTC, millisecond precision) for a Unix time in milliseconds.
pub fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_grow_also_within_a_millisecond() {
        let ids: Vec<String> = (0..10_000).map(|_| new_event_id()).collect();
        for pair in ids.windows(2) {
            assert!(pair[0] < pair[1], "{} then {}", pair[0], pair[1]);
        }
        let u = uuid::Uuid::parse_str(&ids[0]).unwrap();
        assert_eq!(u.get_version_num(), 7);
        assert_eq!(u.get_variant(), uuid::Variant::RFC4122);
        // Across the boundary of rand_a and rand_b, the text still grows.
        let c = (1u128 << 62) - 1;
        let (x, y) = (uuid_v7(5, c).to_string(), uuid_v7(5, c + 1).to_string());
        assert!(x < y, "{x} then {y}");
        let ms = u.get_timestamp().unwrap().to_unix();
        let secs = now_ms() / 1000;
        assert!(ms.0.abs_diff(secs) <= 2, "{ms:?}");
    }

    fn pointers(doc: &str, ptrs: &[&str]) -> Vec<Option<String>> {
        json_pointers(doc.as_bytes(), ptrs).unwrap()
    }

    #[test]
    fn json_pointers_read_scalars_in_one_pass() {
        let doc = r#"{"s":"x\"y","n":1.0,"e":1e2,"i":-3,"b":true,"z":null,"o":{"k":[10,{"d":"deep"}]},"a/b":1,"m~n":2,"":"empty"}"#;
        let got = pointers(
            doc,
            &[
                "/s", "/n", "/e", "/i", "/b", "/z", "/o", "/o/k", "/o/k/0", "/o/k/1/d", "/o/k/2",
                "/o/k/01", "/a~1b", "/m~0n", "/", "/missing", "nope",
            ],
        );
        let want: Vec<Option<&str>> = vec![
            Some("x\"y"),
            Some("1.0"),
            Some("100.0"),
            Some("-3"),
            Some("true"),
            None,
            None,
            None,
            Some("10"),
            Some("deep"),
            None,
            None,
            Some("1"),
            Some("2"),
            Some("empty"),
            None,
            None,
        ];
        assert_eq!(
            got,
            want.iter().map(|o| o.map(String::from)).collect::<Vec<_>>()
        );
        // The whole document, when it is a scalar.
        assert_eq!(pointers("\"top\"", &[""]), vec![Some("top".into())]);
        assert_eq!(pointers("{}", &[""]), vec![None]);
    }

    #[test]
    fn json_pointers_agree_with_serde_json_values() {
        let docs = [
            r#"{"kind":"order.created","customer":"c-1042","total":129.5,"items":[{"sku":"A-1","qty":2},{"sku":"B-7","qty":1}]}"#,
            r#"[1,[2,[3,"x"]],{"a":{"b":{"c":false}}}]"#,
            r#"{"u":"\u00e9\ud83d\ude00","big":18446744073709551615,"neg":-9223372036854775808,"f":-0.5e-3}"#,
        ];
        let ptrs = [
            "/kind",
            "/customer",
            "/total",
            "/items/0/sku",
            "/items/1/qty",
            "/items/2",
            "/0",
            "/1/1/1",
            "/1/1/0",
            "/2/a/b/c",
            "/2/a/b",
            "/u",
            "/big",
            "/neg",
            "/f",
        ];
        for doc in docs {
            let value: serde_json::Value = serde_json::from_str(doc).unwrap();
            let want: Vec<Option<String>> = ptrs
                .iter()
                .map(|p| match value.pointer(p)? {
                    serde_json::Value::String(s) => Some(s.clone()),
                    v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_)) => {
                        Some(v.to_string())
                    }
                    _ => None,
                })
                .collect();
            assert_eq!(pointers(doc, &ptrs), want, "{doc}");
        }
    }

    #[test]
    fn json_pointers_take_a_repeated_key_once_the_first_time() {
        assert_eq!(
            pointers(r#"{"a":1,"a":2}"#, &["/a"]),
            vec![Some("1".into())]
        );
        // The first `a` has no `b`: the second is not looked into either.
        assert_eq!(pointers(r#"{"a":{},"a":{"b":2}}"#, &["/a/b"]), vec![None]);
        assert_eq!(
            pointers(
                r#"{"a":{"b":1,"b":2,"c":3},"a":{"c":4}}"#,
                &["/a/b", "/a/c"]
            ),
            vec![Some("1".into()), Some("3".into())]
        );
    }

    #[test]
    fn json_pointers_check_the_whole_document() {
        for bad in [
            r#"{"a":1"#,
            r#"{"a":1} x"#,
            r#"{"a":tru}"#,
            "",
            r#"{"a":[1,]}"#,
        ] {
            assert!(json_pointers(bad.as_bytes(), &["/a"]).is_err(), "{bad}");
        }
        // Also past the fields asked for.
        assert!(json_pointers(br#"{"a":1,"b":[}"#, &["/a"]).is_err());
    }

    #[test]
    fn pointer_text_reads_attributes_and_data() {
        let mut e = Event {
            id: "i".into(),
            source: "s".into(),
            ty: "t".into(),
            subject: Some("sub".into()),
            time: "now".into(),
            datacontenttype: "application/json".into(),
            data: br#"{"account":"a1","n":7,"deep":{"x":true},"list":[1]}"#.to_vec(),
            extensions: BTreeMap::from([("tenant".into(), "t1".into())]),
        };
        let p = |e: &Event, ptr: &str| e.pointer_text(ptr);
        assert_eq!(p(&e, "/data/account").as_deref(), Some("a1"));
        assert_eq!(p(&e, "/data/n").as_deref(), Some("7"));
        assert_eq!(p(&e, "/data/deep/x").as_deref(), Some("true"));
        assert_eq!(p(&e, "/data/list"), None);
        assert_eq!(p(&e, "/data/missing"), None);
        assert_eq!(p(&e, "/subject").as_deref(), Some("sub"));
        assert_eq!(p(&e, "/tenant").as_deref(), Some("t1"));
        assert_eq!(p(&e, "/subject/x"), None);
        assert_eq!(p(&e, "data"), None);
        e.subject = None;
        assert_eq!(p(&e, "/subject"), None);
    }

    #[test]
    fn json_media_types() {
        assert!(is_json_media_type("application/json"));
        assert!(is_json_media_type("Application/JSON; charset=utf-8"));
        assert!(is_json_media_type("application/cloudevents+json"));
        assert!(!is_json_media_type("text/plain"));
        assert!(!is_json_media_type(""));
    }

    #[test]
    fn envelope_json_round_trips() {
        let text = r#"{"id":"x","source":"shop","type":"order.created","subject":"ada",
            "data":{"total":5},"tenant":"t1"}"#;
        let e = Event::from_envelope_json(text).unwrap();
        assert_eq!((e.id.as_str(), e.ty.as_str()), ("x", "order.created"));
        assert_eq!(e.extensions.get("tenant").map(String::as_str), Some("t1"));
        let back = Event::from_envelope_json(&e.to_json().to_string()).unwrap();
        assert_eq!(back, e);
        assert!(
            Event::from_envelope_json(r#"{"type":"t"}"#)
                .unwrap_err()
                .contains("`source`")
        );
        assert!(Event::from_envelope_json("[1]").is_err());
        assert!(Event::from_envelope_json(r#"{"source":"s","type":1}"#).is_err());
    }

    #[test]
    fn envelope_json_inlines_json_data_and_base64s_the_rest() {
        let mut e = Event {
            id: "1".into(),
            source: "shop".into(),
            ty: "t".into(),
            subject: None,
            time: rfc3339_ms(0),
            datacontenttype: "application/json".into(),
            data: br#"{"a":1}"#.to_vec(),
            extensions: BTreeMap::new(),
        };
        assert_eq!(e.to_json()["data"]["a"], 1);
        assert_eq!(e.to_json()["time"], "1970-01-01T00:00:00.000Z");
        e.datacontenttype = "text/plain".into();
        e.data = b"hi".to_vec();
        assert_eq!(e.to_json()["data_base64"], "aGk=");
    }
}
