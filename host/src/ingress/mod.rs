//! HTTP in: `POST /webhooks/{source}` turns a request into an event, plans its
//! deliveries, and answers 202 only once both are durable. Also mounts the
//! admin API (`admin`).

mod admin;
pub mod cloudevents;
mod dashboard;
pub mod decode;
mod query;
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
use axum::routing::{get, post};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tracing::Instrument;

use crate::config::{FieldFrom, SourceConfig};
use crate::dispatch::{Backend, Work};
use crate::event::{Event, now_ms};
use crate::journal::{Appended, DedupKey, JournalError, PlannedDelivery};
use crate::server::Live;
use decode::DecodeError;

/// What every handler shares: one `Arc`, as axum clones the state for every
/// request.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> AppState {
        AppState(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The parts of [`AppState`].
pub struct Shared {
    pub live: Arc<ArcSwap<Live>>,
    pub reloader: Arc<crate::server::Reloader>,
    /// The engine: events, timelines, dead letters, deliveries.
    pub backend: Backend,
    /// Runs plugins' queries (`GET /query/...`).
    pub runtime: Arc<crate::runtime::Runtime>,
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
            e @ JournalError::TooLarge { .. } => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "event too large",
                e.to_string(),
            ),
            JournalError::Saturated => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "the journal's write queue is full; retry shortly",
            ),
            JournalError::Unavailable(reason) => {
                // The engine's server is away (it reconnects by itself): one
                // line per request, but not an error of this host.
                tracing::warn!(%reason, "engine unavailable; answering 503");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store unavailable",
                    "the store did not take the request; retry later",
                )
            }
            other => {
                tracing::error!(error = %other, "journal unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store unavailable",
                    "the store did not take the request; retry later",
                )
            }
        }
    }
}

/// The whole HTTP surface.
pub fn router(state: AppState) -> Router {
    webhooks(state.clone())
        .merge(admin::api(state.clone()))
        .with_state(state)
}

/// Webhooks and health only: the public listener when the admin API has its
/// own (`[server] admin_listen`).
pub fn public_router(state: AppState) -> Router {
    webhooks(state.clone()).with_state(state)
}

/// The admin API and health: the `admin_listen` listener.
pub fn admin_router(state: AppState) -> Router {
    admin::health()
        .merge(admin::api(state.clone()))
        .with_state(state)
}

fn webhooks(_state: AppState) -> Router<AppState> {
    Router::new()
        .route("/webhooks/{source}", post(webhook))
        .route("/query/{plugin}/{*path}", get(query::query))
        .merge(admin::health())
        // Body limits are per source and enforced in the handler.
        .layer(DefaultBodyLimit::disable())
}

/// Whether an address is loopback only (admin API open without a token).
pub fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

async fn webhook(
    state: State<AppState>,
    Path(source_name): Path<String>,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    // The request taken apart, not its headers copied (as the `HeaderMap`
    // extractor does).
    let (parts, body) = request.into_parts();
    let headers = parts.headers;
    let span = crate::trace::ingest_span(&source_name, &headers);
    let result = handle_webhook(&state, &source_name, headers, body)
        .instrument(span)
        .await;
    let rejected = match &result {
        Err(e) => Some(e.error),
        Ok(r) if !r.status().is_success() => Some("partly rejected batch"),
        Ok(_) => None,
    };
    if let Some(reason) = rejected {
        let known = state.live.load().config.sources.contains_key(&source_name);
        let source = if known {
            source_name
        } else {
            "(unknown)".into()
        };
        metrics::counter!("switchyard_requests_rejected_total", "source" => source, "reason" => reason)
            .increment(1);
    }
    result
}

async fn handle_webhook(
    state: &AppState,
    source_name: &str,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if state.draining.is_cancelled() {
        return Err(shutting_down());
    }
    let live = state.live.load_full();
    let Some(source) = live.config.sources.get(source_name) else {
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
    let provider_id = provider_id_from(source);
    let rules = source_rules(source, provider_id.as_ref());
    // Before the body is read: refuse what this source does not take.
    let checked = decode::check_content_type(&rules, &headers).map_err(decode_error)?;
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
    let dedup = |key: Option<String>| {
        key.map(|key| DedupKey {
            source: source.name.clone(),
            key,
            window_ms: source.dedup_window.as_millis() as u64,
        })
    };
    let accepted =
        match decode::decode_checked(&rules, &headers, &body, checked).map_err(decode_error)? {
            decode::Request::One(mut d) => {
                crate::trace::stamp(&mut d.event, &headers);
                accept(state, &live, &source.name, d.event, dedup(d.dedup_key)).await?
            }
            decode::Request::Batch(items) => {
                let items = items
                    .into_iter()
                    .map(|r| {
                        r.map(|mut d| {
                            crate::trace::stamp(&mut d.event, &headers);
                            (d.event, dedup(d.dedup_key))
                        })
                    })
                    .collect();
                let webhook = source.name.clone();
                return accept_batch(state.clone(), live.clone(), webhook, items).await;
            }
        };
    Ok((StatusCode::ACCEPTED, Json(accepted)).into_response())
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
        serde_json::to_value(self).unwrap_or_default()
    }
}

/// `{"id": …, "routes": […]}`, or `{"id": …, "duplicate": true}`: written
/// straight to the answer, without a `Value` in between.
impl serde::Serialize for Accepted {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let mut map = s.serialize_map(Some(2))?;
        map.serialize_entry("id", &self.id)?;
        if self.duplicate {
            map.serialize_entry("duplicate", &true)?;
        } else {
            map.serialize_entry("routes", &self.routes)?;
        }
        map.end()
    }
}

/// Matches, plans, journals (answering only once durable) and queues one event.
async fn accept(
    state: &AppState,
    live: &Live,
    webhook: &str,
    event: Event,
    dedup: Option<DedupKey>,
) -> Result<Accepted, ApiError> {
    let event = Arc::new(event);
    let matching = std::time::Instant::now();
    let routes =
        crate::ingest_stage_span!("match").in_scope(|| live.config.routes.matching(&event));
    live.match_seconds.record(matching.elapsed().as_secs_f64());
    let planned: Vec<PlannedDelivery> = plan(&routes, &event);
    let route_names: Vec<String> = routes.iter().map(|r| r.name.clone()).collect();
    let accepted_ms = now_ms();
    let appended = state
        .backend
        .store()
        .append(event.clone(), accepted_ms, planned.clone(), dedup)
        .instrument(crate::ingest_stage_span!("journal.append"))
        .await?;
    let seq = match appended {
        Appended::New(seq) => seq,
        Appended::Duplicate { id } => {
            metrics::counter!("switchyard_events_duplicate_total", "source" => webhook.to_string())
                .increment(1);
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
    state.backend.deliveries().enqueue_all(work);
    match live.accepted.get(webhook) {
        Some(counter) => counter.increment(1),
        None => {
            metrics::counter!("switchyard_events_accepted_total", "source" => webhook.to_string())
                .increment(1)
        }
    }
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
    webhook: String,
    items: Vec<Result<(Event, Option<DedupKey>), String>>,
) -> Result<Response, ApiError> {
    let mut tasks = tokio::task::JoinSet::new();
    let mut results: Vec<Option<Value>> = vec![None; items.len()];
    for (i, item) in items.into_iter().enumerate() {
        match item {
            Err(e) => results[i] = Some(json!({ "error": "invalid CloudEvent", "detail": e })),
            Ok((event, dedup)) => {
                let (state, live, webhook) = (state.clone(), live.clone(), webhook.clone());
                tasks.spawn(async move {
                    let accepted = accept(&state, &live, &webhook, event, dedup).await;
                    (i, accepted)
                });
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
pub fn plan(routes: &[&crate::rules::Route], event: &Event) -> Vec<PlannedDelivery> {
    routes
        .iter()
        .flat_map(|r| {
            let order_key = r.order_key.as_ref().and_then(|ptr| event.pointer_text(ptr));
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

/// Where a verified provider puts its delivery id (Standard Webhooks'
/// `webhook-id`, GitHub's `X-GitHub-Delivery`, the `id` of a Stripe event):
/// it becomes the event's id and, unless the source says otherwise, its
/// idempotency key, so a provider's retry is recognised as the same event.
fn provider_id_from(source: &SourceConfig) -> Option<FieldFrom> {
    use crate::config::VerifyScheme;
    match source.verify.as_ref()?.scheme {
        VerifyScheme::StandardWebhooks => Some(FieldFrom::Header("webhook-id".into())),
        VerifyScheme::Github => Some(FieldFrom::Header("x-github-delivery".into())),
        VerifyScheme::Stripe => Some(FieldFrom::Pointer("/id".into())),
        VerifyScheme::Bearer => None,
    }
}

fn source_rules<'a>(
    source: &'a SourceConfig,
    provider_id: Option<&'a FieldFrom>,
) -> decode::SourceRules<'a> {
    decode::SourceRules {
        name: &source.name,
        type_from: source.type_from.as_ref(),
        subject_from: source.subject_from.as_ref(),
        dedup_from: source.dedup_from.as_ref(),
        provider_id,
        content_types: &source.content_types,
    }
}

fn decode_error(e: DecodeError) -> ApiError {
    let (status, error) = match &e {
        DecodeError::UnsupportedMediaType(_) => (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported content type",
        ),
        DecodeError::MalformedJson(_) => (StatusCode::BAD_REQUEST, "malformed JSON"),
        DecodeError::MissingType(_) => (StatusCode::BAD_REQUEST, "missing event type"),
        DecodeError::InvalidCloudEvent(_) => (StatusCode::BAD_REQUEST, "invalid CloudEvent"),
    };
    ApiError::new(status, error, e.to_string())
}
