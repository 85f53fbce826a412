//! `/metrics` after a known sequence of events: the counters say exactly what
//! happened. (The recorder is process-wide, so this file holds one test.)

mod common;

use common::{TestServer, plugin_crate};
use serde_json::json;

fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_tell_what_happened() {
    let t = TestServer::start(&format!(
        r#"
[server]
data_dir = "DATA"
build_dir = "BUILD"

[[sources]]
name = "a"
dedup_header = "Idempotency-Key"

[[plugins]]
name = "flaky"
wasm = "{flaky}"

[[routes]]
name = "r"
to = ["flaky"]
retry = {{ attempts = 2, backoff = "fixed", initial = "10ms", max = "10ms" }}
"#,
        flaky = plugin_crate("flaky"),
    ))
    .await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(t.accept("a", &json!({"n": i})).await);
    }
    // Fails twice: one retry, then a dead letter.
    ids.push(t.accept("a", &json!({"mode": "fail"})).await);
    // A repeat of a keyed request, and a request to no source.
    for _ in 0..2 {
        let resp = t
            .client
            .post(format!("{}/webhooks/a", t.base))
            .header("Idempotency-Key", "k-1")
            .json(&json!({"n": 9}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 202);
    }
    assert_eq!(t.post("nowhere", &json!({})).await.0, 404);
    for id in &ids {
        t.settled(id).await;
    }

    let (_, text) = t.get("/metrics").await;
    let v = |series: &str| value(&text, series);
    assert_eq!(v(r#"switchyard_events_accepted_total{source="a"}"#), 5.0);
    assert_eq!(v(r#"switchyard_events_duplicate_total{source="a"}"#), 1.0);
    assert_eq!(
        v(r#"switchyard_requests_rejected_total{source="(unknown)",reason="unknown source"}"#),
        1.0
    );
    assert_eq!(
        v(r#"switchyard_deliveries_total{route="r",outcome="delivered"}"#),
        4.0
    );
    assert_eq!(
        v(r#"switchyard_deliveries_total{route="r",outcome="retry"}"#),
        1.0
    );
    assert_eq!(
        v(r#"switchyard_deliveries_total{route="r",outcome="dead"}"#),
        1.0
    );
    assert_eq!(v(r#"switchyard_dead_letters_total{route="r"}"#), 1.0);
    assert_eq!(
        v(r#"switchyard_delivery_seconds_count{plugin="flaky"}"#),
        6.0
    );
    // Matching comes before the dedup check: the repeat was matched too.
    assert_eq!(v("switchyard_match_seconds_count"), 6.0);
}
