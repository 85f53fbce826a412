//! Abuse limits over real HTTP: per-source rate limits (429 with Retry-After),
//! slow senders cut off (headers and body), load shedding.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{TestServer, plugin_crate};
use serde_json::json;

fn config() -> String {
    format!(
        r#"
[server]
data_dir = "DATA"
build_dir = "BUILD"
header_timeout = "300ms"
body_timeout = "300ms"

[[sources]]
name = "limited"
rate_limit = {{ per_second = 1, burst = 3 }}

[[sources]]
name = "free"

[[plugins]]
name = "audit"
wasm = "{audit}"

[[routes]]
name = "all"
to = ["audit"]
"#,
        audit = plugin_crate("audit"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_source_answers_429_with_retry_after() {
    let t = TestServer::start(&config()).await;
    for _ in 0..3 {
        t.accept("limited", &json!({})).await;
    }
    let before = t.journal().stats().unwrap().events;
    let resp = t
        .client
        .post(format!("{}/webhooks/limited", t.base))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 429);
    let retry_after: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "rate limited");
    assert_eq!(t.journal().stats().unwrap().events, before);
    // Other sources are not limited.
    for _ in 0..5 {
        t.accept("free", &json!({})).await;
    }
    t.stop().await;
}

/// Sends raw bytes on a new connection; returns what the server answered
/// (empty if it closed the connection) and how long it took.
fn raw(addr: &str, first: &[u8], pause: Duration, rest: &[u8]) -> (String, Duration) {
    let started = Instant::now();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(first).unwrap();
    std::thread::sleep(pause);
    let _ = s.write_all(rest);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    (
        String::from_utf8_lossy(&out).into_owned(),
        started.elapsed(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_senders_are_cut_off() {
    let t = TestServer::start(&config()).await;
    let addr = t.base.trim_start_matches("http://").to_string();
    // Headers that never finish: the connection is closed after the header
    // timeout, not held open.
    let a = addr.clone();
    let (answer, took) = tokio::task::spawn_blocking(move || {
        raw(
            &a,
            b"POST /webhooks/free HTTP/1.1\r\nHost: x\r\n",
            Duration::from_secs(2),
            b"",
        )
    })
    .await
    .unwrap();
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(!answer.contains("202"), "{answer}");
    // A body that stalls: 408, nothing stored.
    let a = addr.clone();
    let head = "POST /webhooks/free HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 20\r\nConnection: close\r\n\r\n{\"a\":";
    let (answer, _) = tokio::task::spawn_blocking(move || {
        raw(&a, head.as_bytes(), Duration::from_secs(1), b"1}")
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request timeout"), "{answer}");
    assert_eq!(t.journal().stats().unwrap().events, 0);
    // And normal requests still work.
    t.accept("free", &json!({})).await;
    t.stop().await;
}

/// `[server] admin_listen`: the admin API moves to its own listener; the
/// public one keeps webhooks and health checks only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_can_have_its_own_listener() {
    let cfg = config().replace(
        "header_timeout = \"300ms\"",
        "header_timeout = \"300ms\"\nadmin_listen = \"127.0.0.1:0\"",
    );
    let t = TestServer::start(&cfg).await;
    let admin = format!(
        "http://{}",
        t.server
            .as_ref()
            .unwrap()
            .admin_addr()
            .expect("admin address")
    );
    let id = t.accept("free", &json!({})).await;
    let (status, _) = t.get("/api/routes").await;
    assert_eq!(status, 404, "the admin API is not on the public listener");
    let (status, _) = t.get("/healthz").await;
    assert_eq!(status, 200);
    for path in ["/api/routes", &format!("/api/events/{id}"), "/readyz"] {
        let resp = t.client.get(format!("{admin}{path}")).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{path}");
    }
    let resp = t
        .client
        .post(format!("{admin}/webhooks/free"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status().as_u16(),
        404,
        "no webhooks on the admin listener"
    );
    t.stop().await;
}

/// `GET /metrics`: Prometheus text with the ingest, delivery and journal
/// series (process-wide, so only their presence is checked here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_in_prometheus_format() {
    let t = TestServer::start(&config()).await;
    let id = t.accept("free", &json!({})).await;
    t.settled(&id).await;
    let (status, _) = t.post("nowhere", &json!({})).await;
    assert_eq!(status, 404);
    let resp = t
        .client
        .get(format!("{}/metrics", t.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = resp.text().await.unwrap();
    for needle in [
        r#"switchyard_events_accepted_total{source="free"}"#,
        r#"switchyard_requests_rejected_total{source="(unknown)",reason="unknown source"}"#,
        r#"switchyard_deliveries_total{route="all",outcome="delivered"}"#,
        r#"switchyard_delivery_seconds_bucket{plugin="audit",le="0.005"}"#,
        "switchyard_journal_commit_ops_bucket",
        "switchyard_match_seconds_bucket",
        "switchyard_scheduled_deliveries",
    ] {
        assert!(text.contains(needle), "missing {needle} in:\n{text}");
    }
    t.stop().await;
}
