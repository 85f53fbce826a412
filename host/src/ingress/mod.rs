//! HTTP in: `POST /webhooks/{source}` turns a request into an event, plans its
//! deliveries, and answers 202 only once both are durable. Also mounts the
//! admin API (`admin`).

mod admin;
pub mod cloudevents;
pub mod serve;
pub mod verify;

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use http_body_util::BodyExt;
use serde_json::{Value, json};

use crate::config::{FieldFrom, SourceConfig};
use crate::dispatch::{Dispatcher, Work};
use crate::event::{Event, is_json_media_type, new_event_id, now_ms, rfc3339_ms};
use crate::journal::{Appended, DedupKey, Journal, JournalError, PlannedDelivery};
use crate::server::Live;
use cloudevents::Mode;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub live: Arc<ArcSwap<Live>>,
    pub reloader: Arc<crate::server::Reloader>,
    pub journal: Journal,
    pub dispatcher: Dispatcher,
    /// Whether the admin API needs a bearer token (not bound to loopback).
    pub admin_token: Option<Arc<str>>,
    pub admin_open: bool,
    /// Cancelled when the server begins to shut down: webhooks answer 503.
    pub draining: tokio_util::sync::CancellationToken,
    /// Webhook requests in progress (`[server] max_concurrency`): when none
    /// is left, requests are shed with 503 instead of queueing.
    pub in_flight: Arc<tokio::sync::Semaphore>,
}

/// An error answer: `{"error": "...", "detail": "..."}` with a status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub error: &'static str,
    pub detail: String,
}

impl ApiError {
    pub fn new(status: StatusCode, error: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError {
            status,
            error,
            detail: detail.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({ "error": self.error, "detail": self.detail })),
        )
            .into_response()
    }
}

impl From<JournalError> for ApiError {
    fn from(e: JournalError) -> ApiError {
        match e {
            JournalError::Saturated => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "the journal's write queue is full; retry shortly",
            ),
            other => {
                tracing::error!(error = %other, "journal unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store unavailable",
                    "the event could not be stored; retry later",
                )
            }
        }
    }
}

/// The whole HTTP surface.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/webhooks/{source}", post(webhook))
        .merge(admin::router(state.clone()))
        // Body limits are per source and enforced in the handler.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// Whether an address is loopback only (admin API open without a token).
pub fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

async fn webhook(
    State(state): State<AppState>,
    Path(source_name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if state.draining.is_cancelled() {
        return Err(shutting_down());
    }
    let live = state.live.load_full();
    let Some(source) = live.config.sources.get(&source_name) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown source",
            format!("no source named `{source_name}` is declared in rules.toml"),
        ));
    };
    let _in_flight = state.in_flight.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "the server is handling as many requests as it may; retry shortly",
        )
    })?;
    let _source_slot = match live.limits.get(&source.name) {
        None => None,
        Some(limits) => {
            if let Some(rate) = &limits.rate
                && let Err(not_until) = rate.check()
            {
                use governor::clock::Clock as _;
                let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
                let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                let mut resp = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate limited",
                    format!("this source accepts a limited rate of requests; retry in {secs} s"),
                )
                .into_response();
                resp.headers_mut().insert(
                    header::RETRY_AFTER,
                    axum::http::HeaderValue::from(secs.max(1)),
                );
                return Ok(resp);
            }
            match &limits.concurrency {
                None => None,
                Some(sem) => Some(sem.clone().try_acquire_owned().map_err(|_| {
                    ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "overloaded",
                        "this source is handling as many requests as it may; retry shortly",
                    )
                })?),
            }
        }
    };
    let mode = cloudevents::mode(&headers);
    // A plain body that is not JSON: only the media types the source allows.
    let mut raw_type = None;
    if mode == Mode::Plain
        && let Some(ct) = headers.get(header::CONTENT_TYPE)
    {
        let ct = ct.to_str().unwrap_or("(not text)");
        if !is_json_media_type(ct) {
            let essence = ct
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            if !source.content_types.contains(&essence) {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported content type",
                    format!(
                        "`{ct}` is not accepted here; send application/json, or a CloudEvent \
                         (binary mode with ce-* headers, application/cloudevents+json, \
                         application/cloudevents-batch+json)"
                    ),
                ));
            }
            raw_type = Some(ct.to_string());
        }
    }
    let body = read_body(
        body,
        &headers,
        source.max_body,
        live.config.server.body_timeout,
    )
    .await?;
    // Before anything is parsed: a forged request must cost as little as
    // possible and leave no trace.
    if let Some(verifier) = live.verifiers.get(&source.name) {
        let now = now_ms() / 1000;
        verifier.verify(&headers, &body, now).map_err(|e| {
            tracing::debug!(source = %source.name, reason = %e, "request failed verification");
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "verification failed",
                e.to_string(),
            )
        })?;
    }
    let invalid =
        |detail: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid CloudEvent", detail);
    let accepted = match mode {
        Mode::Plain if raw_type.is_some() => {
            let event = to_raw_event(source, &headers, body, raw_type.unwrap_or_default())?;
            let dedup = source.dedup_from.as_ref().and_then(|from| {
                Some(DedupKey {
                    source: source.name.clone(),
                    key: attribute(from, &headers, &Value::Null)?,
                    window_ms: source.dedup_window.as_millis() as u64,
                })
            });
            accept(&state, &live, event, None, dedup).await?
        }
        Mode::Plain => {
            let data: Value = serde_json::from_slice(&body).map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "malformed JSON",
                    format!("the body is not valid JSON: {e}"),
                )
            })?;
            // A request without the key is accepted as a new event: like
            // Stripe's optional `Idempotency-Key`, the sender chooses to
            // deduplicate.
            let delivery_id = provider_delivery_id(source, &headers, &data);
            let key = match &source.dedup_from {
                Some(from) => attribute(from, &headers, &data),
                None => delivery_id.clone(),
            };
            let dedup = key.map(|key| DedupKey {
                source: source.name.clone(),
                key,
                window_ms: source.dedup_window.as_millis() as u64,
            });
            let mut event = to_event(source, &headers, &data, body)?;
            if let Some(id) = delivery_id {
                event.id = id;
            }
            accept(&state, &live, event, Some(&data), dedup).await?
        }
        Mode::Binary | Mode::Structured => {
            let event = cloudevents::decode(&headers, &body, &source.name).map_err(invalid)?;
            let dedup = ce_dedup(source, &event);
            accept(&state, &live, event, None, dedup).await?
        }
        Mode::Batch => {
            let items = cloudevents::decode_batch(&body, &source.name).map_err(invalid)?;
            return accept_batch(state, live, &source_name, items).await;
        }
    };
    Ok((StatusCode::ACCEPTED, Json(accepted.to_json())).into_response())
}

/// What became of one accepted event.
struct Accepted {
    id: String,
    /// A repeat of an event accepted before (nothing new was stored).
    duplicate: bool,
    routes: Vec<String>,
}

impl Accepted {
    fn to_json(&self) -> Value {
        if self.duplicate {
            json!({ "id": self.id, "duplicate": true })
        } else {
            json!({ "id": self.id, "routes": self.routes })
        }
    }
}

/// A CloudEvent's own (source, id) is its idempotency key: the spec makes
/// that pair unique per distinct event.
fn ce_dedup(source: &SourceConfig, event: &Event) -> Option<DedupKey> {
    Some(DedupKey {
        source: source.name.clone(),
        key: format!("{}\u{1f}{}", event.source, event.id),
        window_ms: source.dedup_window.as_millis() as u64,
    })
}

/// Matches, plans, journals (answering only once durable) and queues one event.
async fn accept(
    state: &AppState,
    live: &Live,
    event: Event,
    data: Option<&Value>,
    dedup: Option<DedupKey>,
) -> Result<Accepted, ApiError> {
    let event = Arc::new(event);
    let routes = live.config.routes.matching(&event);
    let planned: Vec<PlannedDelivery> = plan(&routes, &event, data);
    let route_names: Vec<String> = routes.iter().map(|r| r.name.clone()).collect();
    let accepted_ms = now_ms();
    let appended = state
        .journal
        .append(event.clone(), accepted_ms, planned.clone(), dedup)
        .await?;
    let seq = match appended {
        Appended::New(seq) => seq,
        Appended::Duplicate { id } => {
            tracing::debug!(%id, source = %event.source, "duplicate delivery; answered with the first event's id");
            return Ok(Accepted {
                id,
                duplicate: true,
                routes: Vec::new(),
            });
        }
    };
    // The index of a delivery is its position in `planned`.
    let work = planned
        .into_iter()
        .enumerate()
        .map(|(idx, p)| Work {
            key: crate::journal::DeliveryKey {
                seq,
                idx: idx as u32,
            },
            due_ms: accepted_ms,
            route: p.route,
            plugin: p.plugin,
            attempts: 0,
            since_ms: accepted_ms,
            order_key: p.order_key,
            replayed: false,
            conflicts: 0,
            event: Some(event.clone()),
        })
        .collect();
    state.dispatcher.enqueue_all(work);
    tracing::debug!(id = %event.id, source = %event.source, r#type = %event.ty, routes = ?route_names, "accepted");
    Ok(Accepted {
        id: event.id.clone(),
        duplicate: false,
        routes: route_names,
    })
}

/// A CloudEvents batch: each valid event is journaled (concurrently, so they
/// share commits); the answer lists, in order, each event's id or error.
/// 202 when all were accepted, 207 when some were, 400 when none was.
async fn accept_batch(
    state: AppState,
    live: Arc<Live>,
    source_name: &str,
    items: Vec<Result<Event, String>>,
) -> Result<Response, ApiError> {
    let Some(source) = live.config.sources.get(source_name).cloned() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown source",
            format!("no source named `{source_name}`"),
        ));
    };
    let mut tasks = tokio::task::JoinSet::new();
    let mut results: Vec<Option<Value>> = vec![None; items.len()];
    for (i, item) in items.into_iter().enumerate() {
        match item {
            Err(e) => results[i] = Some(json!({ "error": "invalid CloudEvent", "detail": e })),
            Ok(event) => {
                let (state, live, dedup) = (state.clone(), live.clone(), ce_dedup(&source, &event));
                tasks.spawn(async move { (i, accept(&state, &live, event, None, dedup).await) });
            }
        }
    }
    while let Some(joined) = tasks.join_next().await {
        let (i, result) = joined.map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error",
                e.to_string(),
            )
        })?;
        results[i] = Some(match result {
            Ok(a) => a.to_json(),
            Err(e) => json!({ "error": e.error, "detail": e.detail }),
        });
    }
    let results: Vec<Value> = results.into_iter().map(Option::unwrap_or_default).collect();
    let ok = results.iter().filter(|r| r.get("id").is_some()).count();
    let status = if ok == results.len() {
        StatusCode::ACCEPTED
    } else if ok > 0 {
        StatusCode::MULTI_STATUS
    } else {
        StatusCode::BAD_REQUEST
    };
    Ok((status, Json(json!({ "results": results }))).into_response())
}

/// The deliveries of an event to the routes it matched: one per (route,
/// plugin), with the route's order key value if it has one.
pub fn plan(
    routes: &[&crate::rules::Route],
    event: &Event,
    data: Option<&Value>,
) -> Vec<PlannedDelivery> {
    routes
        .iter()
        .flat_map(|r| {
            let order_key = r
                .order_key
                .as_ref()
                .and_then(|ptr| event.pointer_text(ptr, data));
            r.to.iter().map(move |p| PlannedDelivery {
                route: r.name.clone(),
                plugin: p.clone(),
                order_key: order_key.clone(),
            })
        })
        .collect()
}

fn shutting_down() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "shutting down",
        "this server is shutting down; retry against another or after it restarts",
    )
}

/// Reads the body, refusing (413) anything over `limit` without buffering it,
/// and (408) a body that takes longer than `timeout` to arrive.
async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body too large",
            format!("the body is over this source's limit of {limit} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let collected =
        tokio::time::timeout(timeout, http_body_util::Limited::new(body, limit).collect())
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request timeout",
                    format!(
                        "the body did not arrive within {}",
                        humantime::format_duration(timeout)
                    ),
                )
            })?;
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "unreadable body",
            format!("the body could not be read: {e}"),
        )),
    }
}

/// The delivery id a verified provider gives each event (Standard Webhooks'
/// `webhook-id`, GitHub's `X-GitHub-Delivery`, the `id` of a Stripe event):
/// it becomes the event's id and, unless the source says otherwise, its
/// idempotency key, so a provider's retry is recognised as the same event.
fn provider_delivery_id(
    source: &SourceConfig,
    headers: &HeaderMap,
    data: &Value,
) -> Option<String> {
    use crate::config::VerifyScheme;
    let from = match source.verify.as_ref()?.scheme {
        VerifyScheme::StandardWebhooks => FieldFrom::Header("webhook-id".into()),
        VerifyScheme::Github => FieldFrom::Header("x-github-delivery".into()),
        VerifyScheme::Stripe => FieldFrom::Pointer("/id".into()),
        VerifyScheme::Bearer => return None,
    };
    attribute(&from, headers, data).filter(|id| id.len() <= 256)
}

/// A non-JSON webhook body (an allowed `content_types` entry) as an event:
/// the bytes as they came, the type and subject from headers only.
fn to_raw_event(
    source: &SourceConfig,
    headers: &HeaderMap,
    body: Bytes,
    content_type: String,
) -> Result<Event, ApiError> {
    let mut event = to_event(source, headers, &Value::Null, body)?;
    event.datacontenttype = content_type;
    Ok(event)
}

/// A plain JSON webhook as a CloudEvents envelope.
fn to_event(
    source: &SourceConfig,
    headers: &HeaderMap,
    data: &Value,
    body: Bytes,
) -> Result<Event, ApiError> {
    let ty = match &source.type_from {
        None => "webhook".to_string(),
        Some(from) => attribute(from, headers, data).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "missing event type",
                format!(
                    "this source takes the event type from {}, which the request lacks",
                    describe(from)
                ),
            )
        })?,
    };
    let subject = source
        .subject_from
        .as_ref()
        .and_then(|from| attribute(from, headers, data));
    Ok(Event {
        id: new_event_id(),
        source: source.name.clone(),
        ty,
        subject,
        time: rfc3339_ms(now_ms()),
        datacontenttype: "application/json".into(),
        data: body.to_vec(),
        extensions: Default::default(),
    })
}

/// A header's value, or the string (or number/boolean, as text) at a pointer.
fn attribute(from: &FieldFrom, headers: &HeaderMap, data: &Value) -> Option<String> {
    let text = match from {
        FieldFrom::Header(name) => headers.get(name)?.to_str().ok()?.trim().to_string(),
        FieldFrom::Pointer(ptr) => match data.pointer(ptr)? {
            Value::String(s) => s.clone(),
            v @ (Value::Number(_) | Value::Bool(_)) => v.to_string(),
            _ => return None,
        },
    };
    (!text.is_empty()).then_some(text)
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

    fn source(type_from: Option<FieldFrom>) -> SourceConfig {
        SourceConfig {
            name: "shop".into(),
            type_from,
            subject_from: Some(FieldFrom::Pointer("/customer".into())),
            max_body: 1024,
            dedup_from: None,
            dedup_window: crate::config::DEFAULT_DEDUP_WINDOW,
            verify: None,
            rate_limit: None,
            max_concurrency: None,
            content_types: Vec::new(),
        }
    }

    #[test]
    fn plain_json_becomes_an_envelope() {
        let data = json!({"kind": "order.created", "customer": "c1"});
        let body = Bytes::from(data.to_string());
        let e = to_event(
            &source(Some(FieldFrom::Pointer("/kind".into()))),
            &HeaderMap::new(),
            &data,
            body.clone(),
        )
        .unwrap();
        assert_eq!(e.ty, "order.created");
        assert_eq!(e.subject.as_deref(), Some("c1"));
        assert_eq!(e.source, "shop");
        assert_eq!(e.data, body.to_vec());
        let e = to_event(&source(None), &HeaderMap::new(), &data, body.clone()).unwrap();
        assert_eq!(e.ty, "webhook");
        let mut headers = HeaderMap::new();
        headers.insert("x-github-event", "push".parse().unwrap());
        let e = to_event(
            &source(Some(FieldFrom::Header("x-github-event".into()))),
            &headers,
            &data,
            body.clone(),
        )
        .unwrap();
        assert_eq!(e.ty, "push");
        let err = to_event(
            &source(Some(FieldFrom::Pointer("/nope".into()))),
            &headers,
            &data,
            body,
        )
        .unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
    }
}
