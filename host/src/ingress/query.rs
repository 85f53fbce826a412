//! `GET /query/{plugin}/{path}`: the read side of CQRS. A plugin that exports
//! `query` answers from its kv state, in a fresh instance with read-only kv.

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState};
use crate::runtime::QueryError;

/// Calls the plugin's `query` with the rest of the path and the query
/// parameters, and answers with what it returns.
pub async fn query(
    State(state): State<AppState>,
    Path((plugin, path)): Path<(String, String)>,
    Query(params): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    let live = state.live.load_full();
    let Some(p) = live.plugins.get(&plugin).cloned() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no such plugin",
            format!("no plugin named `{plugin}` is configured"),
        ));
    };
    // Queries share the webhooks' budget of requests in progress.
    let Ok(_permit) = state.in_flight.clone().try_acquire_owned() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "too many requests in progress; retry shortly",
        ));
    };
    let started = std::time::Instant::now();
    let result = state.runtime.query(&p, &path, &params).await;
    let outcome = match &result {
        Ok(r) => r.status.to_string(),
        Err(QueryError::NoQuery(_)) => "no_query".to_string(),
        Err(QueryError::Failed { .. }) => "failed".to_string(),
    };
    metrics::histogram!("switchyard_query_seconds", "plugin" => plugin.clone())
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("switchyard_queries_total", "plugin" => plugin.clone(), "outcome" => outcome)
        .increment(1);
    match result {
        Ok(r) => {
            // A plugin's answer is untrusted: an impossible status or media
            // type is its error, said as such (not a bare 500).
            let status = StatusCode::from_u16(r.status).ok();
            let content_type = header::HeaderValue::from_str(&r.content_type).ok();
            let (Some(status), Some(content_type)) = (status, content_type) else {
                return Err(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "query failed",
                    format!(
                        "plugin `{plugin}` answered with status {} and content type {:?}, which HTTP cannot carry",
                        r.status, r.content_type
                    ),
                ));
            };
            Ok((status, [(header::CONTENT_TYPE, content_type)], r.body).into_response())
        }
        Err(e @ QueryError::NoQuery(_)) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no query",
            e.to_string(),
        )),
        Err(e @ QueryError::Failed { .. }) => {
            tracing::warn!(%plugin, %path, error = %e, "query failed");
            Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "query failed",
                e.to_string(),
            ))
        }
    }
}
