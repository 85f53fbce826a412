//! CloudEvents 1.0 over HTTP, in its three modes: binary (`ce-*` headers, the
//! body is the data), structured (`application/cloudevents+json`, including
//! `data_base64`) and batch (`application/cloudevents-batch+json`, a JSON
//! array of structured events). The mapping of headers and JSON to an event,
//! and the checks of the required attributes, are cloudevents-sdk's.
//!
//! A CloudEvent keeps its own `id`, `source` and `type`; the name of the
//! webhook it arrived on is added as the `webhook` extension attribute.

use cloudevents::event::{Data, ExtensionValue};
use cloudevents::{AttributesReader, Event as CloudEvent};
use http::{HeaderMap, header};

use crate::event::{Event, now_ms, rfc3339_ms};

/// The extension attribute naming the webhook a CloudEvent arrived on.
pub const WEBHOOK_EXTENSION: &str = "webhook";

/// How a request carries its event(s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A plain webhook body (JSON), mapped by the source's pointers/headers.
    Plain,
    /// CloudEvents binary mode: attributes in `ce-*` headers.
    Binary,
    /// CloudEvents structured mode: one JSON envelope.
    Structured,
    /// CloudEvents batch mode: a JSON array of envelopes.
    Batch,
}

/// The mode of a request, from its content type and headers.
pub fn mode(headers: &HeaderMap) -> Mode {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    match ct.as_str() {
        "application/cloudevents+json" => Mode::Structured,
        "application/cloudevents-batch+json" => Mode::Batch,
        _ if headers.contains_key("ce-specversion") => Mode::Binary,
        _ => Mode::Plain,
    }
}

/// Decodes a binary- or structured-mode request.
pub fn decode(headers: &HeaderMap, body: &[u8], webhook: &str) -> Result<Event, String> {
    let ce = cloudevents::binding::http::to_event(headers, body.to_vec())
        .map_err(|e| format!("not a valid CloudEvent: {e}"))?;
    convert(ce, webhook)
}

/// Decodes a batch-mode body: one result per element, in order. Fails as a
/// whole only if the body is not a JSON array.
pub fn decode_batch(body: &[u8], webhook: &str) -> Result<Vec<Result<Event, String>>, String> {
    let items: Vec<serde_json::Value> = serde_json::from_slice(body)
        .map_err(|e| format!("a batch must be a JSON array of CloudEvents: {e}"))?;
    Ok(items
        .into_iter()
        .map(|item| {
            serde_json::from_value::<CloudEvent>(item)
                .map_err(|e| format!("not a valid CloudEvent: {e}"))
                .and_then(|ce| convert(ce, webhook))
        })
        .collect())
}

/// The router's event for a CloudEvent.
fn convert(ce: CloudEvent, webhook: &str) -> Result<Event, String> {
    if ce.id().is_empty() {
        return Err("`id` must not be empty".into());
    }
    if ce.source().is_empty() {
        return Err("`source` must not be empty".into());
    }
    if ce.ty().is_empty() {
        return Err("`type` must not be empty".into());
    }
    // JSON data the SDK parsed is valid; bytes (binary mode, `data_base64`) are checked below.
    let parsed = matches!(ce.data(), Some(Data::Json(_)));
    let (data, inferred_type) = match ce.data() {
        None => (Vec::new(), None),
        Some(Data::Json(v)) => (
            serde_json::to_vec(v).map_err(|e| e.to_string())?,
            Some("application/json"),
        ),
        Some(Data::String(s)) => (s.clone().into_bytes(), Some("text/plain")),
        Some(Data::Binary(b)) => (b.clone(), Some("application/octet-stream")),
    };
    let datacontenttype = ce
        .datacontenttype()
        .or(inferred_type)
        .unwrap_or("application/json")
        .to_string();
    let mut extensions = std::collections::BTreeMap::new();
    for (name, value) in ce.iter_extensions() {
        let text = match value {
            ExtensionValue::String(s) => s.clone(),
            ExtensionValue::Boolean(b) => b.to_string(),
            ExtensionValue::Integer(i) => i.to_string(),
        };
        extensions.insert(name.to_string(), text);
    }
    if let Some(schema) = ce.dataschema() {
        extensions.insert("dataschema".into(), schema.to_string());
    }
    extensions.insert(WEBHOOK_EXTENSION.into(), webhook.to_string());
    let event = Event {
        id: ce.id().to_string(),
        source: ce.source().to_string(),
        ty: ce.ty().to_string(),
        subject: ce.subject().map(str::to_string),
        time: match ce.time() {
            Some(t) => t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
            None => rfc3339_ms(now_ms()),
        },
        datacontenttype,
        data,
        extensions,
    };
    if !parsed {
        event.check_data()?;
    }
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn modes_come_from_content_type_and_headers() {
        assert_eq!(
            mode(&headers(&[("content-type", "application/json")])),
            Mode::Plain
        );
        assert_eq!(
            mode(&headers(&[(
                "content-type",
                "application/cloudevents+json; charset=utf-8"
            )])),
            Mode::Structured
        );
        assert_eq!(
            mode(&headers(&[(
                "content-type",
                "application/cloudevents-batch+json"
            )])),
            Mode::Batch
        );
        assert_eq!(
            mode(&headers(&[
                ("content-type", "text/plain"),
                ("ce-specversion", "1.0")
            ])),
            Mode::Binary
        );
    }

    #[test]
    fn binary_mode_keeps_attributes_extensions_and_raw_data() {
        let h = headers(&[
            ("ce-specversion", "1.0"),
            ("ce-id", "A234-1234-1234"),
            ("ce-source", "https://github.com/cloudevents/spec/pull"),
            ("ce-type", "com.github.pull_request.opened"),
            ("ce-subject", "123"),
            ("ce-time", "2018-04-05T17:31:00Z"),
            ("ce-comexampleextension1", "value"),
            ("content-type", "text/xml"),
        ]);
        let e = decode(&h, b"<much wow=\"xml\"/>", "gh").unwrap();
        assert_eq!(e.id, "A234-1234-1234");
        assert_eq!(e.source, "https://github.com/cloudevents/spec/pull");
        assert_eq!(e.ty, "com.github.pull_request.opened");
        assert_eq!(e.subject.as_deref(), Some("123"));
        assert_eq!(e.time, "2018-04-05T17:31:00.000Z");
        assert_eq!(e.datacontenttype, "text/xml");
        assert_eq!(e.data, b"<much wow=\"xml\"/>");
        assert_eq!(e.extensions["comexampleextension1"], "value");
        assert_eq!(e.extensions["webhook"], "gh");
        // A required attribute missing.
        let h = headers(&[("ce-specversion", "1.0"), ("ce-id", "1"), ("ce-type", "t")]);
        assert!(decode(&h, b"{}", "gh").unwrap_err().contains("source"));
    }

    #[test]
    fn structured_mode_with_json_and_base64_data() {
        let h = headers(&[("content-type", "application/cloudevents+json")]);
        let body = br#"{"specversion":"1.0","id":"e1","source":"/orders","type":"order.created",
            "datacontenttype":"application/json","data":{"total":42},"tenant":"t1"}"#;
        let e = decode(&h, body, "shop").unwrap();
        assert_eq!((e.id.as_str(), e.source.as_str()), ("e1", "/orders"));
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&e.data).unwrap()["total"],
            42
        );
        assert_eq!(e.extensions["tenant"], "t1");
        let body = br#"{"specversion":"1.0","id":"e2","source":"/files","type":"file.uploaded",
            "datacontenttype":"application/octet-stream","data_base64":"AAEC/w=="}"#;
        let e = decode(&h, body, "shop").unwrap();
        assert_eq!(e.data, [0, 1, 2, 255]);
        assert_eq!(e.datacontenttype, "application/octet-stream");
        let err = decode(&h, br#"{"specversion":"1.0","id":"e3","type":"t"}"#, "shop").unwrap_err();
        assert!(err.starts_with("not a valid CloudEvent"), "{err}");
        let err = decode(
            &h,
            br#"{"specversion":"0.1","id":"e3","source":"s","type":"t"}"#,
            "shop",
        )
        .unwrap_err();
        assert!(err.starts_with("not a valid CloudEvent"), "{err}");
    }

    #[test]
    fn batches_report_each_element() {
        let body = br#"[
            {"specversion":"1.0","id":"b1","source":"/s","type":"t","data":{"n":1}},
            {"specversion":"1.0","id":"b2","type":"t"},
            {"specversion":"1.0","id":"b3","source":"/s","type":"t"}
        ]"#;
        let out = decode_batch(body, "w").unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].as_ref().unwrap().id, "b1");
        assert!(out[1].is_err());
        assert_eq!(out[2].as_ref().unwrap().data, b"");
        assert!(decode_batch(b"{}", "w").is_err());
    }
}
