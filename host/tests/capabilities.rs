//! Plugin capabilities end to end on a real server, through the guest SDK: kv
//! (increment, compare-and-swap, TTL, listing, quota), emit (derived events with
//! causation and hop count, stored only with the ack, loops cut off), and
//! queries (CQRS read side with read-only kv). The `probe` plugin runs the ops
//! each event's data lists; `order-history` is the example read model.

mod common;

use common::{TestServer, plugin_crate};
use serde_json::{Value, json};

fn config() -> String {
    format!(
        r#"
[server]
data_dir = "DATA"
build_dir = "BUILD"
max_hops = 3

[[sources]]
name = "s"
type_pointer = "/type"

[[plugins]]
name = "probe"
wasm = "{probe}"
kv_quota = "64KiB"

[[plugins]]
name = "order-history"
wasm = "{history}"

[[routes]]
name = "probe"
match = {{ source = ["s"], type = ["probe"] }}
to = ["probe"]
retry = {{ attempts = 2, backoff = "fixed", initial = "10ms", max = "10ms" }}

# Events the probe emits come back to it.
[[routes]]
name = "chain"
match = {{ source = ["plugin/probe"] }}
to = ["probe"]
retry = {{ attempts = 1 }}

[[routes]]
name = "orders"
match = {{ source = ["s"], type = [{{ prefix = "order." }}] }}
to = ["order-history"]
"#,
        probe = plugin_crate("probe"),
        history = plugin_crate("order-history"),
    )
}

/// Posts a probe script; returns the event id.
async fn probe(t: &TestServer, ops: Value) -> String {
    t.accept("s", &json!({"type": "probe", "ops": ops})).await
}

/// What the probe recorded for each op of event `id`.
async fn results(t: &TestServer, id: &str) -> Value {
    let tl = t.settled(id).await;
    assert_eq!(tl["deliveries"][0]["status"], "delivered", "{tl}");
    let text = t
        .kv("probe", &format!("result/{id}"))
        .await
        .expect("results");
    serde_json::from_str(&text).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_increment_compare_and_swap_ttl_and_listing() {
    let t = TestServer::start(&config()).await;
    let id = probe(
        &t,
        json!([
            {"op": "increment", "key": "n", "by": 2},
            {"op": "increment", "key": "n", "by": -5},
            {"op": "cas", "key": "k", "expect": null, "new": "v1"},
            {"op": "cas", "key": "k", "expect": "other", "new": "v2"},
            {"op": "cas", "key": "k", "expect": "v1", "new": "v3"},
            {"op": "get", "key": "k"},
            {"op": "set", "key": "l/a", "value": "1"},
            {"op": "set", "key": "l/b", "value": "1"},
            {"op": "set", "key": "l/c", "value": "1"},
            {"op": "delete", "key": "l/b"},
            {"op": "list", "prefix": "l/"},
            {"op": "set", "key": "word", "value": "x"},
            {"op": "increment", "key": "word", "by": 1},
            {"op": "set", "key": "brief", "value": "here", "ttl_ms": 400},
            {"op": "get", "key": "brief"},
            {"op": "fill", "prefix": "many/", "bytes": 1, "count": 300}
        ]),
    )
    .await;
    let r = results(&t, &id).await;
    assert_eq!(r[0], 2);
    assert_eq!(r[1], -3);
    assert_eq!(r[2], true, "absent matches expect = null");
    assert_eq!(r[3], false, "a value other than the expected one");
    assert_eq!(r[4], true);
    assert_eq!(r[5], "v3");
    assert_eq!(
        r[10],
        json!(["l/a", "l/c"]),
        "own writes and deletes listed"
    );
    assert!(
        r[12]["error"].as_str().unwrap().contains("not an integer"),
        "{}",
        r[12]
    );
    assert_eq!(r[14], "here");
    // Committed: an increment is stored as decimal text.
    assert_eq!(t.kv("probe", "n").await.as_deref(), Some("-3"));

    // Listing pages through the store (more keys than one page of 256), and
    // a TTL runs out.
    tokio::time::sleep(std::time::Duration::from_millis(450)).await;
    let id = probe(
        &t,
        json!([
            {"op": "list", "prefix": "many/"},
            {"op": "get", "key": "brief"},
            {"op": "list", "prefix": "l/"}
        ]),
    )
    .await;
    let r = results(&t, &id).await;
    let many = r[0].as_array().unwrap();
    assert_eq!(many.len(), 300);
    assert!(
        many.windows(2).all(|w| w[0].as_str() < w[1].as_str()),
        "in order"
    );
    assert_eq!(r[1], Value::Null, "expired");
    assert_eq!(r[2], json!(["l/a", "l/c"]));
    assert_eq!(
        t.kv("probe", "brief").await,
        None,
        "expired for the admin API too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_increments_all_count() {
    let t = TestServer::start(&config()).await;
    // Posted at once, so deliveries of the same key overlap.
    let mut posts = tokio::task::JoinSet::new();
    for _ in 0..24 {
        let (client, url) = (t.client.clone(), format!("{}/webhooks/s", t.base));
        posts.spawn(async move {
            let body =
                json!({"type": "probe", "ops": [{"op": "increment", "key": "hits", "by": 1}]});
            let resp = client.post(url).json(&body).send().await.expect("post");
            assert_eq!(resp.status().as_u16(), 202);
            let answer: Value = resp.json().await.expect("json");
            answer["id"].as_str().expect("id").to_string()
        });
    }
    let ids = posts.join_all().await;
    for id in &ids {
        t.settled(id).await;
    }
    assert_eq!(t.kv("probe", "hits").await.as_deref(), Some("24"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kv_quota_fails_the_write_that_would_exceed_it() {
    let t = TestServer::start(&config()).await;
    // 6 × 8 KiB fits in 64 KiB.
    let ok = probe(
        &t,
        json!([{"op": "fill", "prefix": "big/", "bytes": 8192, "count": 6}]),
    )
    .await;
    results(&t, &ok).await;
    // 3 more do not: the error names the quota, and the delivery (which
    // propagates it) is dead-lettered with nothing of it written.
    let over = t
        .accept(
            "s",
            &json!({"type": "probe", "stop_on_error": true,
                    "ops": [{"op": "fill", "prefix": "more/", "bytes": 8192, "count": 3}]}),
        )
        .await;
    let tl = t.settled(&over).await;
    let d = &tl["deliveries"][0];
    assert_eq!(d["status"], "dead", "{tl}");
    let error = d["attempts"][0]["error"].as_str().unwrap();
    assert!(error.contains("kv quota of 64 KiB reached"), "{error}");
    assert_eq!(t.kv("probe", "more/0").await, None);
    // Freeing space makes room again.
    let ids: Vec<Value> = (0..6)
        .map(|i| json!({"op": "delete", "key": format!("big/{i}")}))
        .collect();
    let freed = probe(&t, Value::Array(ids)).await;
    results(&t, &freed).await;
    let again = probe(
        &t,
        json!([{"op": "fill", "prefix": "more/", "bytes": 8192, "count": 3}]),
    )
    .await;
    let r = results(&t, &again).await;
    assert_eq!(r[0], "ok", "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emitted_events_are_routed_with_causation_and_hops_only_when_acknowledged() {
    let t = TestServer::start(&config()).await;
    let before = t.journal().stats().unwrap().events;
    let parent = probe(
        &t,
        json!([{"op": "emit", "type": "child", "subject": "sub",
                "data": {"ops": [{"op": "increment", "key": "children", "by": 1}]}}]),
    )
    .await;
    let r = results(&t, &parent).await;
    let child = r[0].as_str().expect("the child's id").to_string();
    // The parent's attempt links to the child; the child links back.
    let tl = t.event(&parent).await;
    assert_eq!(
        tl["deliveries"][0]["attempts"][0]["emitted"],
        json!([child])
    );
    let ctl = t.settled(&child).await;
    assert_eq!(ctl["event"]["source"], "plugin/probe", "{ctl}");
    assert_eq!(ctl["event"]["type"], "child");
    assert_eq!(ctl["event"]["subject"], "sub");
    assert_eq!(ctl["event"]["causationid"], parent.as_str(), "{ctl}");
    assert_eq!(ctl["event"]["hops"], "1");
    // It continues its cause's trace.
    assert_eq!(ctl["trace_id"], tl["trace_id"], "{ctl}");
    assert!(ctl["trace_id"].as_str().is_some_and(|t| t.len() == 32));
    assert_eq!(ctl["deliveries"][0]["route"], "chain");
    assert_eq!(ctl["deliveries"][0]["status"], "delivered");
    assert_eq!(t.kv("probe", "children").await.as_deref(), Some("1"));
    let seen: Value =
        serde_json::from_str(&t.kv("probe", &format!("seen/{child}")).await.unwrap()).unwrap();
    assert_eq!(seen["causationid"], parent.as_str());
    assert_eq!(seen["hops"], "1");
    assert_eq!(t.journal().stats().unwrap().events, before + 2);

    // A delivery that fails after emitting stores no event: no emit without
    // the ack.
    let after = t.journal().stats().unwrap().events;
    let rejected = t
        .accept(
            "s",
            &json!({"type": "probe", "stop_on_error": true, "ops": [
                {"op": "emit", "type": "never", "data": {}},
                {"op": "cas", "key": "x", "expect": null, "new": "y"},
                {"op": "set", "key": "", "value": "bad key"},
            ]}),
        )
        .await;
    let tl = t.settled(&rejected).await;
    assert_eq!(tl["deliveries"][0]["status"], "dead", "{tl}");
    assert!(tl["deliveries"][0]["attempts"][0].get("emitted").is_none());
    assert_eq!(
        t.journal().stats().unwrap().events,
        after + 1,
        "only the webhook event: the emit was dropped with the failed delivery"
    );
    assert_eq!(t.kv("probe", "x").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loop_of_emits_ends_in_the_dead_letters_at_the_hop_limit() {
    let t = TestServer::start(&config()).await;
    // Each delivery emits its own event again: webhook (hops 0) → 1 → 2 → 3,
    // and the delivery of hop 3 may not emit (max_hops = 3).
    let root = probe(&t, json!([{"op": "echo"}])).await;
    let mut id = root.clone();
    let mut chain = vec![];
    loop {
        let tl = t.settled(&id).await;
        let d = &tl["deliveries"][0];
        chain.push((
            tl["event"]["hops"].as_str().unwrap_or("0").to_string(),
            d["status"].clone(),
        ));
        match d["attempts"][0]["emitted"][0].as_str() {
            Some(next) => id = next.to_string(),
            None => {
                let error = d["attempts"][0]["error"].as_str().unwrap_or_default();
                assert!(error.contains("already 3 hops"), "{error}");
                assert!(error.contains("loop"), "{error}");
                break;
            }
        }
        assert!(chain.len() < 10, "the loop was not cut: {chain:?}");
    }
    let hops: Vec<&str> = chain.iter().map(|(h, _)| h.as_str()).collect();
    assert_eq!(hops, ["0", "1", "2", "3"]);
    assert_eq!(chain[3].1, "dead");
    let dlq = t.get_json("/api/dlq?route=chain").await;
    assert_eq!(dlq["items"].as_array().map(Vec::len), Some(1), "{dlq}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_answer_from_state_with_read_only_kv() {
    let t = TestServer::start(&config()).await;
    let a = t
        .accept(
            "s",
            &json!({"type": "order.created", "customer": "c1", "order": "o1", "total": 12.5}),
        )
        .await;
    let b = t
        .accept(
            "s",
            &json!({"type": "order.paid", "customer": "c1", "order": "o1"}),
        )
        .await;
    let c = t
        .accept(
            "s",
            &json!({"type": "order.created", "customer": "c2", "order": "o2", "total": 3}),
        )
        .await;
    for id in [&a, &b, &c] {
        assert_eq!(t.settled(id).await["deliveries"][0]["status"], "delivered");
    }

    let (status, body) = t.get("/query/order-history/customers/c1").await;
    assert_eq!(status, 200, "{body}");
    let h: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(h["count"], 2);
    assert_eq!(h["events"][0]["id"], a.as_str());
    assert_eq!(h["events"][0]["total"], 12.5);
    assert_eq!(h["events"][1]["type"], "order.paid");

    let (status, body) = t.get("/query/order-history/customers?limit=10").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["customers"],
        json!(["c1", "c2"])
    );
    let (status, body) = t.get("/query/order-history/customers/nobody").await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = t.get("/query/order-history/customers?limit=x").await;
    assert_eq!(status, 400, "{body}");

    // Read-only: the probe's write attempt in a query is refused.
    let (status, body) = t.get("/query/probe/write/k").await;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("read-only"), "{body}");
    assert_eq!(t.kv("probe", "k").await, None);
    let (status, _) = t.get("/query/nope/x").await;
    assert_eq!(status, 404);
    // An answer HTTP cannot carry (a header injection attempt) is refused.
    let (status, body) = t.get("/query/probe/bad-answer").await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("cannot carry"), "{body}");

    // Query metrics are counted per plugin.
    let (_, metrics) = t.get("/metrics").await;
    assert!(
        metrics.contains(r#"switchyard_queries_total{plugin="order-history",outcome="200"} 2"#),
        "{metrics}"
    );
}
