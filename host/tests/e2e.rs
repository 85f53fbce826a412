//! End to end: real HTTP into a real server, plugins built for wasm32-wasip2
//! from `plugins/`, effects read back through the admin API.

mod common;

use common::{TestServer, fixture, plugin_crate};
use serde_json::{Value, json};

fn config(routes: &str) -> String {
    format!(
        r#"
[server]
data_dir = "DATA"
build_dir = "BUILD"

[[sources]]
name = "shop"
type_pointer = "/kind"
subject_pointer = "/customer"
max_body = "1KiB"

[[sources]]
name = "bank"
type_pointer = "/type"

[[plugins]]
name = "audit"
wasm = "{audit}"

[[plugins]]
name = "order-totals"
wasm = "{orders}"
config = {{ vip_total = 150 }}

[[plugins]]
name = "account"
wasm = "{account}"

{routes}
"#,
        audit = plugin_crate("audit"),
        orders = plugin_crate("order-totals"),
        account = plugin_crate("account"),
    )
}

const ROUTES: &str = r#"
[[routes]]
name = "audit-all"
to = ["audit"]

[[routes]]
name = "orders"
match = { source = ["shop"], type = [{ prefix = "order." }] }
to = ["order-totals"]

[[routes]]
name = "ledger"
match = { source = ["bank"], type = ["deposit", "withdrawal"] }
to = ["account"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_records_every_event_it_is_given() {
    let t = TestServer::start(&config(ROUTES)).await;
    let id = t
        .accept(
            "shop",
            &json!({"kind": "cart.abandoned", "customer": "ada"}),
        )
        .await;
    let timeline = t.settled(&id).await;
    assert_eq!(t.kv("audit", &id).await.as_deref(), Some("cart.abandoned"));

    let event = &timeline["event"];
    assert_eq!(event["id"], id.as_str());
    assert_eq!(event["source"], "shop");
    assert_eq!(event["type"], "cart.abandoned");
    assert_eq!(event["subject"], "ada");
    assert_eq!(event["data"]["customer"], "ada");
    let deliveries = timeline["deliveries"].as_array().unwrap();
    assert_eq!(deliveries.len(), 1, "{timeline}");
    assert_eq!(deliveries[0]["route"], "audit-all");
    assert_eq!(deliveries[0]["plugin"], "audit");
    assert_eq!(deliveries[0]["status"], "delivered");
    assert_eq!(deliveries[0]["attempts"][0]["error"], Value::Null);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_totals_keeps_a_running_total_per_customer() {
    let t = TestServer::start(&config(ROUTES)).await;
    // Posted concurrently: the per-customer read-modify-writes race, and the
    // journal's conflict check must still count every order exactly once.
    let mut posts = Vec::new();
    for i in 0..20 {
        let customer = if i % 2 == 0 { "ada" } else { "bob" };
        let body =
            json!({"kind": "order.created", "customer": customer, "total": 10.25 + i as f64});
        let t = &t;
        posts.push(async move { t.accept("shop", &body).await });
    }
    let ids = futures_util::future::join_all(posts).await;
    let mut vips = Vec::new();
    for id in &ids {
        let timeline = t.settled(id).await;
        for d in timeline["deliveries"].as_array().unwrap() {
            assert_eq!(d["status"], "delivered", "{timeline}");
            for a in d["attempts"].as_array().unwrap() {
                for child in a["emitted"].as_array().into_iter().flatten() {
                    vips.push(child.as_str().unwrap().to_string());
                }
            }
        }
    }
    // Event chaining: each customer's total passed `vip_total` once, and the
    // `customer.vip` event order-totals emitted was routed (to audit-all).
    let mut who = Vec::new();
    for vip in &vips {
        let timeline = t.settled(vip).await;
        assert_eq!(timeline["event"]["type"], "customer.vip", "{timeline}");
        assert_eq!(timeline["event"]["source"], "plugin/order-totals");
        assert_eq!(timeline["deliveries"][0]["route"], "audit-all");
        assert_eq!(t.kv("audit", vip).await.as_deref(), Some("customer.vip"));
        who.push(timeline["event"]["subject"].as_str().unwrap().to_string());
    }
    who.sort();
    assert_eq!(who, ["ada", "bob"]);
    let ada: Value =
        serde_json::from_str(&t.kv("order-totals", "customer/ada").await.unwrap()).unwrap();
    let bob: Value =
        serde_json::from_str(&t.kv("order-totals", "customer/bob").await.unwrap()).unwrap();
    // ada: i = 0,2,..,18 → 10 orders, 102.5 + 90; bob: i = 1,..,19 → 102.5 + 100.
    assert_eq!(ada, json!({"count": 10, "total": 192.5}));
    assert_eq!(bob, json!({"count": 10, "total": 202.5}));
    // Other event types from the shop are not orders.
    let id = t
        .accept("shop", &json!({"kind": "cart.created", "customer": "ada"}))
        .await;
    let timeline = t.settled(&id).await;
    assert_eq!(timeline["deliveries"].as_array().unwrap().len(), 1);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_folds_deposits_and_withdrawals_and_rejects_overdrafts() {
    let t = TestServer::start(&config(ROUTES)).await;
    for (ty, amount) in [("deposit", 100), ("withdrawal", 30)] {
        let id = t
            .accept(
                "bank",
                &json!({"type": ty, "account": "acc-1", "amount": amount}),
            )
            .await;
        t.settled(&id).await;
    }
    assert_eq!(
        t.kv("account", "balance/acc-1").await.as_deref(),
        Some("70")
    );

    let id = t
        .accept(
            "bank",
            &json!({"type": "withdrawal", "account": "acc-1", "amount": 500}),
        )
        .await;
    let timeline = t.settled(&id).await;
    let ledger = timeline["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["route"] == "ledger")
        .expect("ledger delivery")
        .clone();
    assert_eq!(ledger["status"], "dead", "{timeline}");
    assert_eq!(
        ledger["attempts"][0]["error"],
        "rejected: insufficient funds: balance 70, withdrawal 500"
    );
    assert_eq!(
        ledger["attempts"].as_array().unwrap().len(),
        1,
        "a reject is not retried"
    );
    assert_eq!(
        t.kv("account", "balance/acc-1").await.as_deref(),
        Some("70")
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_fans_out_to_every_plugin_it_names() {
    let routes = r#"
[[routes]]
name = "big-orders"
match = { type = ["order.created"], data = { total = [{ numeric = [">=", 100] }] } }
to = ["audit", "order-totals"]
"#;
    let t = TestServer::start(&config(routes)).await;
    let big = t
        .accept(
            "shop",
            &json!({"kind": "order.created", "customer": "cy", "total": 150}),
        )
        .await;
    let small = t
        .accept(
            "shop",
            &json!({"kind": "order.created", "customer": "cy", "total": 5}),
        )
        .await;
    let timeline = t.settled(&big).await;
    let plugins: Vec<&str> = timeline["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            assert_eq!(d["status"], "delivered");
            d["plugin"].as_str().unwrap()
        })
        .collect();
    assert_eq!(plugins, ["audit", "order-totals"]);
    assert_eq!(t.kv("audit", &big).await.as_deref(), Some("order.created"));
    assert_eq!(
        t.kv("order-totals", "customer/cy").await.as_deref(),
        Some(r#"{"count":1,"total":150.0}"#)
    );
    let timeline = t.event(&small).await;
    assert_eq!(
        timeline["deliveries"],
        json!([]),
        "the small order matches no route"
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_writes_nothing() {
    let t = TestServer::start(&config(ROUTES)).await;
    let url = |source: &str| format!("{}/webhooks/{source}", t.base);
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (
            t.client
                .post(url("shop"))
                .header("content-type", "application/json")
                .body(r#"{"kind": "order.created", "#),
            400,
            "malformed JSON",
        ),
        (
            t.client.post(url("nowhere")).json(&json!({"kind": "x"})),
            404,
            "unknown source",
        ),
        (
            t.client
                .post(url("shop"))
                .json(&json!({"kind": "x", "pad": "x".repeat(2048)})),
            413,
            "body too large",
        ),
        (
            t.client
                .post(url("shop"))
                .header("content-type", "text/plain")
                .body("kind=x"),
            415,
            "unsupported content type",
        ),
        (
            t.client.post(url("shop")).json(&json!({"no-kind": true})),
            400,
            "missing event type",
        ),
        (
            t.client
                .post(url("shop"))
                .header("content-type", "application/json")
                .body(""),
            400,
            "malformed JSON",
        ),
    ];
    for (request, status, error) in cases {
        let resp = request.send().await.expect("send");
        assert_eq!(resp.status().as_u16(), status);
        let body: Value = resp.json().await.expect("json error body");
        assert_eq!(body["error"], error, "{body}");
        assert!(
            body["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{body}"
        );
    }
    // A chunked body (no content-length) over the limit is refused too.
    let chunks: Vec<Result<String, std::io::Error>> = vec![
        Ok("{\"kind\":\"".into()),
        Ok("y".repeat(4096)),
        Ok("\"}".into()),
    ];
    let resp = t
        .client
        .post(url("shop"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status().as_u16(), 413);

    let stats = t.journal().stats().unwrap();
    assert_eq!(
        stats.events, 0,
        "rejected requests must not be journaled: {stats:?}"
    );
    assert_eq!(stats.deliveries, 0);
    // And a good request right after is accepted. (On a new connection: the
    // server answered the chunked upload early and closes that connection, so
    // a pooled one may be half-closed when reused.)
    let resp = reqwest::Client::new()
        .post(url("shop"))
        .json(&json!({"kind": "ok"}))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status().as_u16(), 202);
    assert_eq!(t.journal().stats().unwrap().events, 1);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traps_deadlines_and_retries_are_retried_then_dead_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let trap = fixture(dir.path(), "trap", common::TRAP);
    let looping = fixture(dir.path(), "loop", common::LOOP);
    let retry = fixture(dir.path(), "retry", common::RETRY);
    let cfg = format!(
        r#"
[server]
data_dir = "DATA"

[[sources]]
name = "s"
type_pointer = "/t"

[[plugins]]
name = "trap"
wasm = "{trap}"

[[plugins]]
name = "loop"
wasm = "{looping}"
timeout = "100ms"

[[plugins]]
name = "retry"
wasm = "{retry}"

[[routes]]
name = "to-trap"
match = {{ type = ["trap"] }}
to = ["trap"]
retry = {{ attempts = 2, backoff = "fixed", initial = "20ms", max = "20ms" }}

[[routes]]
name = "to-loop"
match = {{ type = ["loop"] }}
to = ["loop"]
retry = {{ attempts = 2, backoff = "fixed", initial = "20ms", max = "20ms" }}

[[routes]]
name = "to-retry"
match = {{ type = ["retry"] }}
to = ["retry"]
retry = {{ attempts = 3, backoff = "fixed", initial = "20ms", max = "20ms" }}
"#
    );
    let t = TestServer::start_in(dir, &cfg).await;
    let error_of = |timeline: &Value| {
        let d = &timeline["deliveries"][0];
        assert_eq!(d["status"], "dead", "{timeline}");
        d["attempts"].as_array().unwrap().last().unwrap()["error"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let id = t.accept("s", &json!({"t": "trap"})).await;
    let trap = t.settled(&id).await;
    // Traps and deadline hits are retried like any transient failure.
    let trap_error = error_of(&trap);
    assert!(trap_error.contains("unreachable"), "{trap}");
    assert!(trap_error.ends_with("; gave up after 2 attempts"), "{trap}");
    assert_eq!(
        trap["deliveries"][0]["attempts"].as_array().unwrap().len(),
        2
    );

    let id = t.accept("s", &json!({"t": "loop"})).await;
    let looped = t.settled(&id).await;
    assert_eq!(
        error_of(&looped),
        "deadline of 100ms exceeded; gave up after 2 attempts"
    );

    let id = t.accept("s", &json!({"t": "retry"})).await;
    let retried = t.settled(&id).await;
    assert_eq!(
        error_of(&retried),
        "plugin asked to retry; gave up after 3 attempts"
    );
    let attempts = retried["deliveries"][0]["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 3, "{retried}");
    assert_eq!(attempts[0]["error"], "plugin asked to retry", "{retried}");
    assert_eq!(retried["status"], "dead");

    // The host kept serving throughout.
    let (status, _) = t.get("/healthz").await;
    assert_eq!(status, 200);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_lists_routes_and_plugins_and_404s_the_unknown() {
    let t = TestServer::start(&config(ROUTES)).await;
    let (status, body) = t.get("/healthz").await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));
    let (_, routes) = t.get("/api/routes").await;
    let routes: Value = serde_json::from_str(&routes).unwrap();
    let names: Vec<&str> = routes["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["audit-all", "orders", "ledger"]);
    assert_eq!(routes["routes"][1]["match"]["type"][0]["prefix"], "order.");
    let (_, plugins) = t.get("/api/plugins").await;
    let plugins: Value = serde_json::from_str(&plugins).unwrap();
    assert_eq!(plugins["plugins"].as_array().unwrap().len(), 3);
    assert_eq!(plugins["plugins"][0]["hash"].as_str().unwrap().len(), 64);
    let audit = &plugins["plugins"][1]; // sorted by name: account, audit, order-totals
    assert_eq!(audit["name"], "audit", "{plugins}");
    assert_eq!(audit["kv_quota"], "64 MiB");
    assert_eq!(audit["max_instances"], 16);
    assert_eq!(audit["fuel"], Value::Null);
    assert_eq!(audit["answers_queries"], true, "SDK plugins export query");
    assert_eq!(t.get("/api/events/nope").await.0, 404);
    assert_eq!(t.get("/api/plugins/nope/kv/x").await.0, 404);
    assert_eq!(t.get("/api/plugins/audit/kv/missing").await.0, 404);
    t.stop().await;
}
