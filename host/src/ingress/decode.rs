//! From request (headers and body) to event(s), before anything is verified,
//! matched or stored: plain JSON webhooks (type, subject and dedup key from
//! the source's headers or pointers), non-JSON bodies the source allows, and
//! CloudEvents in their three modes (`cloudevents`).
//!
//! Pure and self-contained (it needs only `event` and `cloudevents`), so the
//! fuzz target `host/fuzz/fuzz_targets/ingress_decode.rs` compiles it alone.

use http::{HeaderMap, header};

use super::cloudevents::{self as ce, Mode};
use crate::event::{Event, is_json_media_type, json_pointers, new_event_id, now_ms, rfc3339_ms};

/// Where an envelope attribute of a plain webhook comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldFrom {
    /// A request header (name in lower case).
    Header(String),
    /// A JSON pointer into the body.
    Pointer(String),
}

/// What decoding needs to know about the source a request came to.
#[derive(Debug, Clone, Copy)]
pub struct SourceRules<'a> {
    pub name: &'a str,
    pub type_from: Option<&'a FieldFrom>,
    pub subject_from: Option<&'a FieldFrom>,
    /// The source's own idempotency key, if it names one.
    pub dedup_from: Option<&'a FieldFrom>,
    /// Where a verified provider puts its delivery id (`webhook-id`, ...): it
    /// becomes the event id and, without `dedup_from`, the dedup key.
    pub provider_id: Option<&'a FieldFrom>,
    /// Non-JSON media types the source accepts (lower case, no parameters).
    pub content_types: &'a [String],
}

/// Why a request cannot become an event (a 4xx; the text says why).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    MalformedJson(String),
    #[error("{0}")]
    MissingType(String),
    #[error("{0}")]
    InvalidCloudEvent(String),
}

/// One decoded event.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub event: Event,
    /// The idempotency key, if the request has one.
    pub dedup_key: Option<String>,
}

/// What a request carries.
#[derive(Debug)]
pub enum Request {
    One(Box<Decoded>),
    /// A CloudEvents batch: each element decoded, or why not, in order.
    Batch(Vec<Result<Decoded, String>>),
}

/// The request's mode, and for a non-JSON plain body its content type;
/// refuses (415) a content type the source does not take. Cheap: call it
/// before reading the body.
pub fn check_content_type(
    rules: &SourceRules<'_>,
    headers: &HeaderMap,
) -> Result<(Mode, Option<String>), DecodeError> {
    let mode = ce::mode(headers);
    if mode != Mode::Plain {
        return Ok((mode, None));
    }
    let Some(ct) = headers.get(header::CONTENT_TYPE) else {
        return Ok((mode, None));
    };
    let ct = ct.to_str().unwrap_or("(not text)");
    if is_json_media_type(ct) {
        return Ok((mode, None));
    }
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if rules.content_types.contains(&essence) {
        Ok((mode, Some(ct.to_string())))
    } else {
        Err(DecodeError::UnsupportedMediaType(format!(
            "`{ct}` is not accepted here; send application/json, or a CloudEvent \
             (binary mode with ce-* headers, application/cloudevents+json, \
             application/cloudevents-batch+json)"
        )))
    }
}

/// Decodes a request to the source `rules` describes.
pub fn decode(
    rules: &SourceRules<'_>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Request, DecodeError> {
    let checked = check_content_type(rules, headers)?;
    decode_checked(rules, headers, body, checked)
}

/// As [`decode`], with what [`check_content_type`] said of these headers.
pub fn decode_checked(
    rules: &SourceRules<'_>,
    headers: &HeaderMap,
    body: &[u8],
    (mode, raw_type): (Mode, Option<String>),
) -> Result<Request, DecodeError> {
    let invalid = DecodeError::InvalidCloudEvent;
    match mode {
        Mode::Plain => {
            // The body's fields that the source names, read in the pass that
            // checks it is JSON (no tree of it is built).
            let fields = [
                rules.type_from,
                rules.subject_from,
                rules.dedup_from,
                rules.provider_id,
            ];
            let pointers: Vec<&str> = fields
                .iter()
                .filter_map(|f| match f {
                    Some(FieldFrom::Pointer(p)) => Some(p.as_str()),
                    _ => None,
                })
                .collect();
            let mut found = match raw_type {
                Some(_) => vec![None; pointers.len()],
                None => json_pointers(body, &pointers).map_err(|e| {
                    DecodeError::MalformedJson(format!("the body is not valid JSON: {e}"))
                })?,
            }
            .into_iter();
            let mut field = |from: Option<&FieldFrom>| -> Option<String> {
                let text = match from? {
                    FieldFrom::Header(name) => headers.get(name)?.to_str().ok()?.trim().to_string(),
                    FieldFrom::Pointer(_) => found.next()??,
                };
                (!text.is_empty()).then_some(text)
            };
            // In the order of `fields`, so each takes its own pointer's value.
            let ty = field(rules.type_from);
            let subject = field(rules.subject_from);
            let own_dedup = field(rules.dedup_from);
            let delivery_id = field(rules.provider_id).filter(|id| id.len() <= 256);
            let dedup_key = match rules.dedup_from {
                Some(_) => own_dedup,
                None => delivery_id.clone(),
            };
            let mut event = plain_event(rules, ty, subject, body)?;
            if let Some(id) = delivery_id {
                event.id = id;
            }
            if let Some(ct) = raw_type {
                event.datacontenttype = ct;
            }
            Ok(Request::One(Box::new(Decoded { event, dedup_key })))
        }
        Mode::Binary | Mode::Structured => {
            let event = ce::decode(headers, body, rules.name).map_err(invalid)?;
            Ok(Request::One(Box::new(ce_decoded(event))))
        }
        Mode::Batch => {
            let items = ce::decode_batch(body, rules.name).map_err(invalid)?;
            Ok(Request::Batch(
                items.into_iter().map(|r| r.map(ce_decoded)).collect(),
            ))
        }
    }
}

/// A CloudEvent's own (source, id) is its idempotency key: the spec makes
/// that pair unique per distinct event.
fn ce_decoded(event: Event) -> Decoded {
    Decoded {
        dedup_key: Some(format!("{}\u{1f}{}", event.source, event.id)),
        event,
    }
}

/// A plain webhook as an envelope: `source` is the source's name, `type` and
/// `subject` from its headers or pointers (`ty` is `None` when the source
/// names a place for it and the request has none there).
fn plain_event(
    rules: &SourceRules<'_>,
    ty: Option<String>,
    subject: Option<String>,
    body: &[u8],
) -> Result<Event, DecodeError> {
    let ty = match rules.type_from {
        None => "webhook".to_string(),
        Some(from) => ty.ok_or_else(|| {
            DecodeError::MissingType(format!(
                "this source takes the event type from {}, which the request lacks",
                describe(from)
            ))
        })?,
    };
    Ok(Event {
        id: new_event_id(),
        source: rules.name.to_string(),
        ty,
        subject,
        time: rfc3339_ms(now_ms()),
        datacontenttype: "application/json".into(),
        data: body.to_vec(),
        extensions: Default::default(),
    })
}

fn describe(from: &FieldFrom) -> String {
    match from {
        FieldFrom::Header(h) => format!("the `{h}` header"),
        FieldFrom::Pointer(p) => format!("the JSON pointer `{p}` (a string in the body)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules<'a>(type_from: Option<&'a FieldFrom>, subject: &'a FieldFrom) -> SourceRules<'a> {
        SourceRules {
            name: "shop",
            type_from,
            subject_from: Some(subject),
            dedup_from: None,
            provider_id: None,
            content_types: &[],
        }
    }

    fn one(r: Result<Request, DecodeError>) -> Decoded {
        match r.unwrap() {
            Request::One(d) => *d,
            Request::Batch(_) => panic!("a batch"),
        }
    }

    #[test]
    fn plain_json_becomes_an_envelope() {
        let subject = FieldFrom::Pointer("/customer".into());
        let kind = FieldFrom::Pointer("/kind".into());
        let body = json!({"kind": "order.created", "customer": "c1"}).to_string();
        let d = one(decode(
            &rules(Some(&kind), &subject),
            &HeaderMap::new(),
            body.as_bytes(),
        ));
        assert_eq!(d.event.ty, "order.created");
        assert_eq!(d.event.subject.as_deref(), Some("c1"));
        assert_eq!(d.event.source, "shop");
        assert_eq!(d.event.data, body.as_bytes());
        let d = one(decode(
            &rules(None, &subject),
            &HeaderMap::new(),
            body.as_bytes(),
        ));
        assert_eq!(d.event.ty, "webhook");
        let mut headers = HeaderMap::new();
        headers.insert("x-github-event", "push".parse().unwrap());
        let gh = FieldFrom::Header("x-github-event".into());
        let d = one(decode(
            &rules(Some(&gh), &subject),
            &headers,
            body.as_bytes(),
        ));
        assert_eq!(d.event.ty, "push");
        let missing = FieldFrom::Pointer("/nope".into());
        let err = decode(&rules(Some(&missing), &subject), &headers, body.as_bytes()).unwrap_err();
        assert!(matches!(err, DecodeError::MissingType(_)), "{err}");
        let err = decode(&rules(None, &subject), &headers, b"{").unwrap_err();
        assert!(matches!(err, DecodeError::MalformedJson(_)), "{err}");
    }

    #[test]
    fn provider_ids_and_dedup_keys() {
        let subject = FieldFrom::Pointer("/customer".into());
        let provider = FieldFrom::Header("webhook-id".into());
        let mut r = rules(None, &subject);
        r.provider_id = Some(&provider);
        let mut headers = HeaderMap::new();
        headers.insert("webhook-id", "msg_1".parse().unwrap());
        let d = one(decode(&r, &headers, b"{}"));
        assert_eq!(
            (d.event.id.as_str(), d.dedup_key.as_deref()),
            ("msg_1", Some("msg_1"))
        );
        // The source's own key wins for dedup; the id stays the provider's.
        let own = FieldFrom::Pointer("/ref".into());
        r.dedup_from = Some(&own);
        let d = one(decode(&r, &headers, br#"{"ref": 7}"#));
        assert_eq!(
            (d.event.id.as_str(), d.dedup_key.as_deref()),
            ("msg_1", Some("7"))
        );
    }

    #[test]
    fn content_types_gate_non_json_bodies() {
        let subject = FieldFrom::Header("x-who".into());
        let allowed = vec!["text/plain".to_string()];
        let mut r = rules(None, &subject);
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            "text/plain; charset=utf-8".parse().unwrap(),
        );
        let err = decode(&r, &headers, b"hi").unwrap_err();
        assert!(matches!(err, DecodeError::UnsupportedMediaType(_)));
        r.content_types = &allowed;
        let d = one(decode(&r, &headers, b"hi"));
        assert_eq!(d.event.datacontenttype, "text/plain; charset=utf-8");
        assert_eq!(d.event.data, b"hi");
    }
}
