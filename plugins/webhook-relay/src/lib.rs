//! **Webhook relay.** Forwards each event to the URL in its config
//! (`config = { url = "https://hooks.example.com/in" }`, with the host in
//! `allow_http`) as a CloudEvents binary-mode POST: the body is the event's
//! data as accepted, with its content type; the envelope travels in `ce-*`
//! headers.
//!
//! A 2xx or 3xx answer acknowledges the event. A refused host, a bad URL or a
//! 4xx answer dead-letters it; a timeout, a network error or a 5xx, 408 or
//! 429 answer has it retried (the SDK's `HttpError` → `Failure`).

use switchyard_sdk::{Event, Failure, Plugin, config, http};

struct Relay;

impl Plugin for Relay {
    fn handle(event: Event) -> Result<(), Failure> {
        let url = config::get_str("url")
            .ok_or_else(|| Failure::reject("webhook-relay: its config has no `url`"))?;
        let mut request = http::Request::post(url).body(event.data.clone());
        for (name, value) in headers(&event) {
            request = request.header(name, value);
        }
        request.send()?.error_for_status()?;
        Ok(())
    }
}

switchyard_sdk::export!(Relay);

/// The request headers for `event`: its content type and its CloudEvents
/// attributes; extensions only where name and value fit a header.
fn headers(event: &Event) -> Vec<(String, &str)> {
    let mut out = vec![
        ("content-type".to_string(), event.datacontenttype.as_str()),
        ("ce-specversion".to_string(), "1.0"),
        ("ce-id".to_string(), &event.id),
        ("ce-source".to_string(), &event.source),
        ("ce-type".to_string(), &event.ty),
        ("ce-time".to_string(), &event.time),
    ];
    if let Some(subject) = &event.subject {
        out.push(("ce-subject".to_string(), subject));
    }
    for (name, value) in &event.extensions {
        let name_ok = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if name_ok && !value.chars().any(char::is_control) {
            out.push((format!("ce-{name}"), value));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_envelope_goes_in_ce_headers() {
        let event = Event {
            id: "ev-1".into(),
            source: "shop".into(),
            ty: "order.created".into(),
            subject: Some("ada".into()),
            time: "2026-01-01T00:00:00Z".into(),
            datacontenttype: "application/json".into(),
            extensions: vec![
                ("replayed".into(), "true".into()),
                ("Bad-Name".into(), "x".into()),
                ("multi".into(), "a\nb".into()),
            ],
            ..Event::default()
        };
        let h = headers(&event);
        let get = |n: &str| h.iter().find(|(k, _)| k == n).map(|(_, v)| *v);
        assert_eq!(get("content-type"), Some("application/json"));
        assert_eq!(get("ce-id"), Some("ev-1"));
        assert_eq!(get("ce-type"), Some("order.created"));
        assert_eq!(get("ce-subject"), Some("ada"));
        assert_eq!(get("ce-replayed"), Some("true"));
        assert_eq!(h.len(), 8, "{h:?}");
    }
}
