//! The admin API: health, routes, an event's timeline, plugin kv, dead
//! letters and redrive, replay.
//!
//! Open without credentials only when the server listens on loopback;
//! otherwise it needs `Authorization: Bearer <SWITCHYARD_ADMIN_TOKEN>`.

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};
use crate::dispatch::replay::ReplayError;
use crate::event::rfc3339_ms;
use crate::journal::{
    DeadLetter, DeliveryKey, DeliveryRecord, DeliveryStatus, RedriveSelect, ReplayJob, ReplaySpec,
};

/// `/healthz` and `/readyz`, served on every listener.
pub(super) fn health() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

/// The `/api` routes, behind the admin check.
pub(super) fn api(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/api/routes", get(routes))
        .route("/api/plugins", get(plugins))
        .route("/api/events/{id}", get(event))
        .route("/api/plugins/{name}/kv/{*key}", get(kv_get))
        .route("/api/dlq", get(dlq_list))
        .route("/api/dlq/redrive", post(dlq_redrive_many))
        .route("/api/dlq/{id}", get(dlq_show))
        .route("/api/dlq/{id}/redrive", post(dlq_redrive_one))
        .route("/api/replay", post(replay_start))
        .route("/api/replay/{id}", get(replay_status))
        .route("/metrics", get(metrics_text))
        .merge(super::dashboard::pages())
        .route_layer(middleware::from_fn_with_state(state, require_admin))
}

async fn require_admin(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if state.admin_open {
        return next.run(req).await;
    }
    let Some(token) = &state.admin_token else {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "admin API disabled",
            "the server listens beyond loopback; set SWITCHYARD_ADMIN_TOKEN to enable the admin API",
        )
        .into_response();
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
        next.run(req).await
    } else {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the admin API needs `Authorization: Bearer <token>`",
        )
        .into_response()
    }
}

/// `GET /metrics`: Prometheus text format (see `telemetry` for the names).
async fn metrics_text() -> Response {
    match crate::telemetry::metrics() {
        Some(handle) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            handle.render(),
        )
            .into_response(),
        None => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics unavailable",
            "another metrics recorder is installed in this process",
        )
        .into_response(),
    }
}

async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready to take events: 503 once shutdown has begun.
async fn readyz(State(state): State<AppState>) -> Response {
    if state.draining.is_cancelled() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "shutting down" })),
        )
            .into_response()
    } else {
        Json(json!({ "status": "ready" })).into_response()
    }
}

async fn routes(State(state): State<AppState>) -> Json<Value> {
    let live = state.live.load();
    let routes: Vec<Value> = live
        .config
        .routes
        .routes
        .iter()
        .map(|r| {
            json!({
                "name": r.name,
                "match": r.match_json,
                "to": r.to,
                "retry": {
                    "attempts": r.retry.attempts,
                    "backoff": format!("{:?}", r.retry.backoff).to_lowercase(),
                    "initial": humantime::format_duration(r.retry.initial).to_string(),
                    "max": humantime::format_duration(r.retry.max).to_string(),
                    "max_age": humantime::format_duration(r.retry.max_age).to_string(),
                },
                "order_key": r.order_key,
                "concurrency": r.concurrency,
            })
        })
        .collect();
    let mut body = json!({ "routes": routes });
    if let Some(failure) = state.reloader.failure() {
        body["reload_error"] = json!(failure);
    }
    Json(body)
}

async fn plugins(State(state): State<AppState>) -> Json<Value> {
    let live = state.live.load();
    let plugins: Vec<Value> = live
        .plugins
        .values()
        .map(|p| {
            json!({
                "name": p.name,
                "hash": p.hash,
                "timeout": humantime::format_duration(p.limits.timeout).to_string(),
                "memory": crate::runtime::format_bytes(p.limits.memory),
                "fuel": p.limits.fuel,
                "max_instances": p.limits.max_instances,
                "max_tables": p.limits.max_tables,
                "kv_quota": crate::runtime::format_bytes(p.limits.kv_quota),
                "kv_used_bytes": state.backend.store().kv_usage(&p.name).ok(),
                "answers_queries": p.answers_queries,
                "allow_http": p.http.allow.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
                "http_timeout": humantime::format_duration(p.http.timeout).to_string(),
            })
        })
        .collect();
    let mut plugins = plugins;
    plugins.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    Json(json!({ "plugins": plugins }))
}

async fn event(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let timeline = state
        .backend
        .store()
        .timeline(&id)
        .await
        .map_err(ApiError::from)?;
    let Some(t) = timeline else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown event",
            format!("no event with id `{id}`"),
        ));
    };
    let deliveries: Vec<Value> = t
        .deliveries
        .iter()
        .map(|(k, d)| delivery_json(*k, d))
        .collect();
    let mut body = json!({
        "event": t.event.to_json(),
        "accepted_at": rfc3339_ms(t.accepted_ms),
        "status": overall_status(t.deliveries.iter().map(|(_, d)| d)),
        "deliveries": deliveries,
        "trace_id": crate::trace::trace_id(&t.event),
    });
    if let Some(d) = &t.dedup {
        body["dedup"] = json!({
            "key": d.key,
            "duplicates": d.duplicates,
            "last_duplicate_at": d.last_duplicate_ms.map(rfc3339_ms),
        });
    }
    Ok(Json(body))
}

/// One word for an event: `dead` if any delivery is, else `retrying`, else
/// `pending`, else `delivered` (also when no route matched).
fn overall_status<'a>(deliveries: impl Iterator<Item = &'a DeliveryRecord>) -> &'static str {
    let mut worst = "delivered";
    for d in deliveries {
        let s = match d.status {
            DeliveryStatus::Dead => return "dead",
            DeliveryStatus::Retrying => "retrying",
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
        };
        if s == "retrying" || (s == "pending" && worst == "delivered") {
            worst = s;
        }
    }
    worst
}

/// A delivery's id in the API: `<seq>-<idx>`.
pub(super) fn delivery_id(k: DeliveryKey) -> String {
    format!("{}-{}", k.seq, k.idx)
}

pub(super) fn parse_delivery_id(id: &str) -> Result<DeliveryKey, ApiError> {
    id.split_once('-')
        .and_then(|(s, i)| {
            Some(DeliveryKey {
                seq: s.parse().ok()?,
                idx: i.parse().ok()?,
            })
        })
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown dead letter",
                format!("`{id}` is not a delivery id (they look like `42-0`)"),
            )
        })
}

fn delivery_json(key: DeliveryKey, d: &DeliveryRecord) -> Value {
    let attempts: Vec<Value> = d
        .attempts
        .iter()
        .map(|a| {
            let mut v = json!({
                "at": rfc3339_ms(a.at_ms),
                "duration_ms": a.duration_us as f64 / 1000.0,
                "error": a.error,
                "plugin_hash": a.plugin_hash,
            });
            // Derived events, linked from the attempt that emitted them (they
            // link back with their `causationid`).
            if !a.emitted.is_empty() {
                v["emitted"] = json!(a.emitted);
            }
            v
        })
        .collect();
    let mut v = json!({
        "id": delivery_id(key),
        "route": d.route,
        "plugin": d.plugin,
        "status": d.status,
        "attempts": attempts,
        "replayed": d.replay.is_some(),
    });
    if let Some(due) = d.due_ms.filter(|_| !d.status.is_final()) {
        v["next_attempt_at"] = rfc3339_ms(due).into();
    }
    if let Some(k) = &d.order_key {
        v["order_key"] = k.clone().into();
    }
    if let Some(r) = d.replay {
        v["replay"] = r.into();
    }
    if !d.redriven_ms.is_empty() {
        v["redriven_at"] = d.redriven_ms.iter().map(|&ms| rfc3339_ms(ms)).collect();
    }
    if d.attempts_not_kept > 0 {
        v["attempts_not_kept"] = d.attempts_not_kept.into();
    }
    v
}

fn dead_letter_json(d: &DeadLetter, with_event: bool) -> Value {
    let last = d.record.attempts.last();
    let mut v = delivery_json(d.key, &d.record);
    v["event_id"] = d.event.id.clone().into();
    v["source"] = d.event.source.clone().into();
    v["type"] = d.event.ty.clone().into();
    v["dead_at"] = last.map(|a| rfc3339_ms(a.at_ms)).into();
    v["reason"] = last.and_then(|a| a.error.clone()).into();
    v["plugin_hash"] = last.and_then(|a| a.plugin_hash.clone()).into();
    if with_event {
        v["event"] = d.event.to_json();
    }
    v
}

#[derive(serde::Deserialize)]
struct DlqQuery {
    route: Option<String>,
    limit: Option<usize>,
    /// The `next` of the previous page.
    after: Option<String>,
}

/// `GET /api/dlq?route=R&limit=N&after=ID`: dead letters, oldest first.
async fn dlq_list(
    State(state): State<AppState>,
    Query(q): Query<DlqQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    let after = match &q.after {
        Some(a) => Some(parse_delivery_id(a).map_err(|mut e| {
            e.status = StatusCode::BAD_REQUEST;
            e.error = "bad cursor";
            e
        })?),
        None => None,
    };
    let page = state
        .backend
        .store()
        .dead_letters(q.route.as_deref(), after, limit)
        .await
        .map_err(ApiError::from)?;
    let items: Vec<Value> = page
        .items
        .iter()
        .map(|d| dead_letter_json(d, false))
        .collect();
    Ok(Json(json!({
        "items": items,
        "next": page.next.map(delivery_id),
    })))
}

async fn dlq_show(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let key = parse_delivery_id(&id)?;
    match state
        .backend
        .store()
        .dead_letter(key)
        .await
        .map_err(ApiError::from)?
    {
        Some(d) => Ok(Json(dead_letter_json(&d, true))),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown dead letter",
            format!("delivery `{id}` is not a dead letter"),
        )),
    }
}

async fn dlq_redrive_one(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let key = parse_delivery_id(&id)?;
    let keys = state
        .backend
        .deliveries()
        .redrive(RedriveSelect::Keys(vec![key]))
        .await
        .map_err(ApiError::from)?;
    if keys.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown dead letter",
            format!("delivery `{id}` is not a dead letter"),
        ));
    }
    Ok(redriven(keys))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RedriveBody {
    /// Every dead letter of this route...
    route: Option<String>,
    /// ...or of every route (must be said explicitly).
    #[serde(default)]
    all: bool,
}

/// `POST /api/dlq/redrive` with `{"route": "R"}` or `{"all": true}`.
async fn dlq_redrive_many(
    State(state): State<AppState>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let body: RedriveBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed request",
            format!("expected {{\"route\": \"NAME\"}} or {{\"all\": true}}: {e}"),
        )
    })?;
    let select = match (body.route, body.all) {
        (Some(r), false) => RedriveSelect::Route(Some(r)),
        (None, true) => RedriveSelect::Route(None),
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed request",
                "give either `route` or `\"all\": true`",
            ));
        }
    };
    let keys = state
        .backend
        .deliveries()
        .redrive(select)
        .await
        .map_err(ApiError::from)?;
    Ok(redriven(keys))
}

fn redriven(keys: Vec<DeliveryKey>) -> Response {
    let ids: Vec<String> = keys.into_iter().map(delivery_id).collect();
    (
        StatusCode::ACCEPTED,
        Json(json!({ "redriven": ids.len(), "ids": ids })),
    )
        .into_response()
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayBody {
    /// RFC 3339 (UTC) or Unix milliseconds.
    since: Value,
    until: Option<Value>,
    route: Option<String>,
    source: Option<String>,
}

fn parse_time(v: &Value, key: &str) -> Result<u64, ApiError> {
    let parsed = match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => humantime::parse_rfc3339_weak(s.trim_end_matches('Z'))
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as u64),
        _ => None,
    };
    parsed.ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed request",
            format!("`{key}` must be an RFC 3339 UTC time (\"2026-11-26T10:00:00Z\") or Unix milliseconds"),
        )
    })
}

/// `POST /api/replay`: plans the replay and answers 202 with its id; `GET
/// /api/replay/{id}` tells how far it got.
async fn replay_start(
    State(state): State<AppState>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let body: ReplayBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed request",
            format!("expected {{\"since\": ..., \"until\"?, \"route\"?, \"source\"?}}: {e}"),
        )
    })?;
    let spec = ReplaySpec {
        since_ms: parse_time(&body.since, "since")?,
        until_ms: body
            .until
            .as_ref()
            .map(|u| parse_time(u, "until"))
            .transpose()?,
        route: body.route,
        source: body.source,
    };
    let job = state
        .backend
        .deliveries()
        .replay(&state.live, spec)
        .await
        .map_err(|e| match e {
            ReplayError::Journal(j) => ApiError::from(j),
            other => ApiError::new(StatusCode::BAD_REQUEST, "bad replay", other.to_string()),
        })?;
    Ok((StatusCode::ACCEPTED, Json(replay_json(&state, &job).await?)).into_response())
}

async fn replay_status(
    State(state): State<AppState>,
    Path(id): Path<u64>,
) -> Result<Json<Value>, ApiError> {
    match state
        .backend
        .deliveries()
        .replay_job(id)
        .await
        .map_err(ApiError::from)?
    {
        Some(job) => Ok(Json(replay_json(&state, &job).await?)),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown replay",
            format!("no replay {id}"),
        )),
    }
}

/// A replay with its progress, counted from its deliveries' records.
async fn replay_json(state: &AppState, job: &ReplayJob) -> Result<Value, ApiError> {
    let (mut delivered, mut dead, mut pending) = (0u64, 0u64, 0u64);
    for &k in &job.deliveries {
        match state
            .backend
            .deliveries()
            .delivery(k)
            .await
            .map_err(ApiError::from)?
        {
            Some(d) if d.status == DeliveryStatus::Delivered => delivered += 1,
            Some(d) if d.status == DeliveryStatus::Dead => dead += 1,
            Some(_) => pending += 1,
            None => delivered += 1, // compacted, so it was delivered
        }
    }
    Ok(json!({
        "id": job.id,
        "since": rfc3339_ms(job.spec.since_ms),
        "until": job.spec.until_ms.map(rfc3339_ms),
        "route": job.spec.route,
        "source": job.spec.source,
        "created_at": rfc3339_ms(job.created_ms),
        "events": job.events,
        "deliveries": job.deliveries.len(),
        "delivered": delivered,
        "dead": dead,
        "pending": pending,
        "done": pending == 0,
    }))
}

/// The raw value, typed `application/json` when it parses as JSON, else
/// `text/plain` when it is UTF-8, else `application/octet-stream`.
async fn kv_get(
    State(state): State<AppState>,
    Path((name, key)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let known = state.live.load().plugins.contains_key(&name);
    if !known {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown plugin",
            format!("no plugin named `{name}`"),
        ));
    }
    let value = state
        .backend
        .store()
        .kv_get(&name, &key)
        .map_err(ApiError::from)?;
    let Some(value) = value else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no such key",
            format!("plugin `{name}` has no value under `{key}`"),
        ));
    };
    let content_type = if serde_json::from_slice::<Value>(&value).is_ok() {
        "application/json"
    } else if std::str::from_utf8(&value).is_ok() {
        "text/plain; charset=utf-8"
    } else {
        "application/octet-stream"
    };
    Ok(([(header::CONTENT_TYPE, content_type)], value).into_response())
}
