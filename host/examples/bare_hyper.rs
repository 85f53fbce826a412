//! The baseline of the ingest benchmark (`host/benches/ingest.sh`): the same
//! HTTP stack as switchyard (axum 0.8 on hyper 1, multi-threaded tokio) and the
//! same per-request work up to the point where switchyard starts storing —
//! read the body (with a size limit), parse it as JSON with `serde_json`, mint
//! a UUIDv7 id, answer 202 `{"id": …, "routes": […]}` — and nothing else: no
//! journal, no routes, no deliveries.
//!
//! `cargo run --release -p switchyard --example bare_hyper -- 127.0.0.1:8081`

// The same allocator as the switchyard binary, so the baseline differs only
// in what the server does.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use http_body_util::BodyExt;
use serde_json::{Value, json};

/// The same default as switchyard's per-source `max_body`.
const MAX_BODY: usize = 1 << 20;

async fn webhook(Path(source): Path<String>, body: Body) -> Response {
    let bytes = match http_body_util::Limited::new(body, MAX_BODY).collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => return StatusCode::PAYLOAD_TOO_LARGE.into_response(),
    };
    let data: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    // Keep the parse from being optimised away, as switchyard reads fields of it.
    std::hint::black_box((&source, &data));
    let id = uuid::Uuid::now_v7().to_string();
    (
        StatusCode::ACCEPTED,
        Json(json!({ "id": id, "routes": ["audit-all"] })),
    )
        .into_response()
}

fn main() {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8081".into())
        .parse()
        .expect("usage: bare_hyper [ADDR:PORT]");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        let app = Router::new()
            .route("/webhooks/{source}", post(webhook))
            .layer(DefaultBodyLimit::disable());
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        eprintln!("bare_hyper listening on {}", listener.local_addr().unwrap());
        let stop = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {},
                _ = tokio::signal::ctrl_c() => {},
            }
        };
        axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
            .expect("serve");
    });
}
