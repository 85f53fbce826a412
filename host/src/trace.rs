//! Distributed tracing: a W3C `traceparent` follows each event from its
//! webhook request through the journal, matching and every delivery attempt.
//!
//! The event keeps it as the CloudEvents distributed-tracing extension
//! (`traceparent`, and `tracestate` if the request had one), so it survives
//! restarts and retries and is shown in the event's timeline. A request
//! without one starts a new trace. With `[telemetry] otlp_endpoint`, spans
//! (`ingest`, `match`, `journal.append`, `deliver`) are exported over OTLP,
//! and plugin log lines become events of their `deliver` span.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::event::Event;

/// The extension attributes of the CloudEvents distributed-tracing extension.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct Map<'a>(&'a mut HashMap<String, String>);

impl Injector for Map<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_string(), value);
    }
}

impl Extractor for Map<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// Whether `s` is a well-formed W3C `traceparent` with a non-zero trace id.
pub fn valid_traceparent(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    let hex = |p: &str, n: usize| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit());
    parts.len() >= 4
        && hex(parts[0], 2)
        && parts[0] != "ff"
        && hex(parts[1], 32)
        && parts[1].bytes().any(|b| b != b'0')
        && hex(parts[2], 16)
        && parts[2].bytes().any(|b| b != b'0')
        && hex(parts[3], 2)
}

/// The trace id (32 hex digits) of an event's `traceparent`.
pub fn trace_id(event: &Event) -> Option<&str> {
    let tp = event.extensions.get(TRACEPARENT)?;
    valid_traceparent(tp).then(|| &tp[3..35])
}

/// Whether spans are exported (`[telemetry] otlp_endpoint`). Without an
/// exporter, the ingest path's spans would only cost time: its log lines name
/// the source themselves, and events keep the `traceparent` either way.
static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Called once the exporting subscriber is installed.
pub fn set_exporting() {
    EXPORTING.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Whether spans are exported.
pub fn exporting() -> bool {
    EXPORTING.load(std::sync::atomic::Ordering::Relaxed)
}

/// A span of the ingest path (`match`, `journal.append`) when spans are
/// exported, else none.
#[macro_export]
macro_rules! ingest_stage_span {
    ($name:literal) => {
        if $crate::trace::exporting() {
            tracing::info_span!($name)
        } else {
            tracing::Span::none()
        }
    };
}

/// The span of one webhook request, a child of the request's `traceparent`
/// if it has a valid one; none when spans are not exported.
pub fn ingest_span(source: &str, headers: &http::HeaderMap) -> tracing::Span {
    if !exporting() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!("ingest", source = %source, otel.kind = "server");
    let parent = TraceContextPropagator::new().extract(&Headers(headers));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
    span
}

/// Gives `event` the `traceparent` it keeps: the current span's when spans are
/// exported (so deliveries become its children), else the one it came with
/// (request header or CloudEvents attribute), else a new trace.
pub fn stamp(event: &mut Event, headers: &http::HeaderMap) {
    if !event.extensions.contains_key(TRACEPARENT)
        && let Some(tp) = headers.get(TRACEPARENT).and_then(|v| v.to_str().ok())
        && valid_traceparent(tp)
    {
        event.extensions.insert(TRACEPARENT.into(), tp.to_string());
        if let Some(ts) = headers.get(TRACESTATE).and_then(|v| v.to_str().ok()) {
            event.extensions.insert(TRACESTATE.into(), ts.to_string());
        }
    }
    let cx = if exporting() {
        tracing::Span::current().context()
    } else {
        opentelemetry::Context::new()
    };
    if cx.span().span_context().is_valid() {
        let mut map = HashMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut Map(&mut map));
        if let Some(tp) = map.remove(TRACEPARENT) {
            event.extensions.insert(TRACEPARENT.into(), tp);
        }
        return;
    }
    let keep = event
        .extensions
        .get(TRACEPARENT)
        .is_some_and(|tp| valid_traceparent(tp));
    if !keep {
        let trace = loop {
            let t = fastrand::u128(..);
            if t != 0 {
                break t;
            }
        };
        let span = fastrand::u64(1..);
        event.extensions.insert(
            TRACEPARENT.into(),
            format!("00-{trace:032x}-{span:016x}-01"),
        );
    }
}

/// The span of one delivery attempt, a child of the event's `traceparent`.
pub fn delivery_span(event: &Event, route: &str, plugin: &str, attempt: u32) -> tracing::Span {
    // The trace id is a field too, so every log line of the delivery (the
    // plugin's own included) names it, exported or not.
    let span = tracing::info_span!(
        "deliver",
        event_id = %event.id,
        trace_id = %trace_id(event).unwrap_or("-"),
        route = %route,
        plugin = %plugin,
        attempt,
        otel.kind = "consumer",
    );
    if !exporting() {
        return span;
    }
    let mut map: HashMap<String, String> = HashMap::new();
    for key in [TRACEPARENT, TRACESTATE] {
        if let Some(v) = event.extensions.get(key) {
            map.insert(key.to_string(), v.clone());
        }
    }
    let parent = TraceContextPropagator::new().extract(&Map(&mut map));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        assert!(valid_traceparent(tp));
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319g-b7ad6b7169203331-01",
        ] {
            assert!(!valid_traceparent(bad), "{bad}");
        }
    }

    #[test]
    fn events_keep_an_incoming_trace_or_start_one() {
        let mut e = Event {
            id: "e".into(),
            source: "s".into(),
            ty: "t".into(),
            subject: None,
            time: "2026-01-01T00:00:00Z".into(),
            datacontenttype: "application/json".into(),
            data: b"{}".to_vec(),
            extensions: Default::default(),
        };
        let mut headers = http::HeaderMap::new();
        headers.insert(
            TRACEPARENT,
            http::HeaderValue::from_static(
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
        );
        // No exporting subscriber here: the incoming one is kept as it is.
        stamp(&mut e, &headers);
        assert_eq!(trace_id(&e), Some("0af7651916cd43dd8448eb211c80319c"));
        let mut fresh = Event {
            extensions: Default::default(),
            ..e.clone()
        };
        stamp(&mut fresh, &http::HeaderMap::new());
        let id = trace_id(&fresh).expect("a new trace");
        assert_ne!(id, "0af7651916cd43dd8448eb211c80319c");
    }
}
