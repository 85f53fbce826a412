//! The admin API: health, routes, an event's timeline, plugin kv.
//!
//! Open without credentials only when the server listens on loopback;
//! otherwise it needs `Authorization: Bearer <SWITCHYARD_ADMIN_TOKEN>`.

use axum::Json;
use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};
use crate::event::rfc3339_ms;
use crate::journal::DeliveryRecord;

pub(super) fn router(state: AppState) -> Router<AppState> {
    let api = Router::new()
        .route("/api/routes", get(routes))
        .route("/api/plugins", get(plugins))
        .route("/api/events/{id}", get(event))
        .route("/api/plugins/{name}/kv/{*key}", get(kv_get))
        .route_layer(middleware::from_fn_with_state(state, require_admin));
    Router::new().route("/healthz", get(healthz)).merge(api)
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

async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
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
                },
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
            })
        })
        .collect();
    Json(json!({ "plugins": plugins }))
}

async fn event(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let timeline = state.journal.timeline(&id).map_err(ApiError::from)?;
    let Some(t) = timeline else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown event",
            format!("no event with id `{id}`"),
        ));
    };
    let deliveries: Vec<Value> = t.deliveries.iter().map(|(_, d)| delivery_json(d)).collect();
    Ok(Json(json!({
        "event": t.event.to_json(),
        "accepted_at": rfc3339_ms(t.accepted_ms),
        "deliveries": deliveries,
    })))
}

fn delivery_json(d: &DeliveryRecord) -> Value {
    let attempts: Vec<Value> = d
        .attempts
        .iter()
        .map(|a| {
            json!({
                "at": rfc3339_ms(a.at_ms),
                "duration_ms": a.duration_us as f64 / 1000.0,
                "error": a.error,
            })
        })
        .collect();
    let mut v = json!({
        "route": d.route,
        "plugin": d.plugin,
        "status": d.status,
        "attempts": attempts,
    });
    if let Some(due) = d.due_ms {
        v["next_attempt_at"] = rfc3339_ms(due).into();
    }
    v
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
    let value = state.journal.kv_get(&name, &key).map_err(ApiError::from)?;
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
