//! `plugins/noop` (the trivial plugin of the benchmarks) through the real
//! server, in both isolation modes: every delivery succeeds, and a reused
//! instance serves many deliveries.

mod common;

use common::{TestServer, plugin_crate};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noop_is_delivered_fresh_and_reused() {
    let t = TestServer::start(&format!(
        r#"
[server]
data_dir = "DATA"
build_dir = "BUILD"

[[sources]]
name = "s"

[[plugins]]
name = "noop"
wasm = "{noop}"

[[plugins]]
name = "noop-reused"
wasm = "{noop}"
isolation = "reuse"

[[routes]]
name = "both"
to = ["noop", "noop-reused"]
"#,
        noop = plugin_crate("noop"),
    ))
    .await;
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(t.accept("s", &json!({"n": i})).await);
    }
    for id in &ids {
        let tl = t.settled(id).await;
        let ds = tl["deliveries"].as_array().unwrap();
        assert_eq!(ds.len(), 2);
        for d in ds {
            assert_eq!(d["status"], "delivered", "{tl}");
            assert_eq!(d["attempts"].as_array().unwrap().len(), 1);
        }
    }
    let (_, metrics) = t.get("/metrics").await;
    // Reused: fewer instantiations than deliveries (instances are kept).
    let count = |plugin: &str| -> f64 {
        let series = format!("switchyard_plugin_instantiate_seconds_count{{plugin=\"{plugin}\"}}");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str())?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    assert_eq!(count("noop"), 20.0, "{metrics}");
    let reused = count("noop-reused");
    assert!((1.0..20.0).contains(&reused), "{reused}: {metrics}");
}
