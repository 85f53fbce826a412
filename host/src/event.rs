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
    /// and booleans as JSON text; `None` when absent or not a scalar. `data`
    /// is the parsed payload if the caller has it (else it is parsed here).
    pub fn pointer_text(&self, pointer: &str, data: Option<&serde_json::Value>) -> Option<String> {
        use serde_json::Value;
        let rest = pointer.strip_prefix('/')?;
        let (head, tail) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let scalar = |v: &Value| match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(_) | Value::Bool(_) => Some(v.to_string()),
            _ => None,
        };
        let attribute = |v: &str| tail.is_empty().then(|| v.to_string());
        match head {
            "data" => match data {
                Some(d) => d.pointer(tail).and_then(scalar),
                None if self.data_is_json() => serde_json::from_slice::<Value>(&self.data)
                    .ok()?
                    .pointer(tail)
                    .and_then(scalar),
                None => None,
            },
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
pub fn new_event_id() -> String {
    uuid::Uuid::now_v7().to_string()
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
        let p = |e: &Event, ptr: &str| e.pointer_text(ptr, None);
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
