//! One behavioural suite, run on both storage engines: the embedded store and
//! NATS JetStream (`[engine] kind = "nats"`, each test with its own
//! `nats-server`). Every behaviour is an `async fn(Engine)`; `engines!` makes
//! an `embedded::<name>` and a `nats::<name>` test of each, so
//! `cargo test --test engines embedded` (or `nats`) runs one engine's half.
//!
//! Everything is judged through the HTTP API only (no `journal()`), since
//! that is what both engines promise alike.

mod common;

use std::ops::Deref;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::nats::NatsServer;
use common::{TestServer, plugin_crate, wait_for};
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Engine {
    Embedded,
    Nats,
}

/// A test server on one engine; on NATS, with the nats-server it uses.
struct Harness {
    t: TestServer,
    /// The `[engine]` table appended to every config text (empty: embedded).
    engine_table: String,
    nats: Option<NatsServer>,
    /// The events stream's name (empty on the embedded engine).
    stream: String,
}

impl Deref for Harness {
    type Target = TestServer;
    fn deref(&self) -> &TestServer {
        &self.t
    }
}

/// A stream name of its own per test: the servers are separate anyway, but a
/// name shared by accident (say, a test pointed at a shared server) must not
/// mix journals. No `DATA`/`BUILD` in it: `TestServer` replaces those.
fn stream_name() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "SWY_T{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

impl Harness {
    async fn start(engine: Engine, config: &str) -> Harness {
        let (nats, engine_table, stream) = match engine {
            Engine::Embedded => (None, String::new(), String::new()),
            Engine::Nats => {
                let nats = NatsServer::start().await;
                let stream = stream_name();
                let table = format!(
                    "\n[engine]\nkind = \"nats\"\nurl = \"{}\"\nstream = \"{stream}\"\n",
                    nats.url(),
                );
                (Some(nats), table, stream)
            }
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let t = TestServer::start_in(dir, &format!("{config}{engine_table}")).await;
        Harness {
            t,
            engine_table,
            nats,
            stream,
        }
    }

    /// Reloads with a new config text (keeping the engine).
    async fn reconfigure(&self, config: &str) {
        self.t
            .reconfigure(&format!("{config}{}", self.engine_table))
            .await;
    }

    /// Stops the server before its nats-server, so that it shuts down
    /// cleanly rather than into a vanished store.
    async fn stop(self) {
        self.t.stop().await;
        drop(self.nats);
    }

    /// Waits until the event's deliveries are final and checks that each of
    /// them was delivered; returns the timeline.
    async fn delivered(&self, id: &str) -> Value {
        let tl = self.settled(id).await;
        for d in tl["deliveries"].as_array().expect("deliveries") {
            assert_eq!(d["status"], "delivered", "{tl}");
        }
        tl
    }

    /// A kv value once it is there (kv writes commit with the delivery's
    /// ack, which may show in the timeline a moment before or after).
    async fn kv_eventually(&self, plugin: &str, key: &str) -> String {
        wait_for(&format!("{plugin} kv {key}"), || self.kv(plugin, key)).await
    }
}

/// Makes a test per engine of each behaviour, in modules `embedded` and
/// `nats` (a macro cannot glue identifiers together without a helper crate).
macro_rules! engines {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Engine::Embedded).await;
                }
            )*
        }
        mod nats {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Engine::Nats).await;
                }
            )*
        }
    };
}

engines!(
    fan_out_to_matching_routes_and_plugins_only,
    failures_are_retried_until_delivered,
    a_reject_is_dead_lettered_and_redriven,
    out_of_attempts_is_dead,
    repeats_of_an_idempotency_key_are_accepted_once,
    kv_writes_are_visible_and_concurrent_updates_are_not_lost,
    emitted_events_are_routed_with_their_causation,
    an_order_key_keeps_acceptance_order_per_key,
    what_the_engine_cannot_store_is_refused_with_a_reason,
    a_large_event_is_dead_lettered_whole,
    a_delivery_redriven_again_keeps_its_last_attempts,
);

fn attempts(delivery: &Value) -> usize {
    delivery["attempts"].as_array().map_or(0, Vec::len)
}

/// (route, plugin, status) of each delivery, sorted.
fn deliveries(tl: &Value) -> Vec<(String, String, String)> {
    let mut out: Vec<_> = tl["deliveries"]
        .as_array()
        .expect("deliveries")
        .iter()
        .map(|d| {
            let s = |k: &str| d[k].as_str().unwrap_or("?").to_string();
            (s("route"), s("plugin"), s("status"))
        })
        .collect();
    out.sort();
    out
}

fn routes_of(answer: &Value) -> Vec<&str> {
    answer["routes"]
        .as_array()
        .expect("the 202 lists the matched routes")
        .iter()
        .map(|r| r.as_str().expect("route name"))
        .collect()
}

/// The `[server]` table and the plugins, as `(name, crate)`.
fn server_with(plugins: &[(&str, &str)]) -> String {
    let mut text = String::from(
        r#"
[server]
data_dir = "DATA"
build_dir = "BUILD"
"#,
    );
    for (name, krate) in plugins {
        text.push_str(&format!(
            "\n[[plugins]]\nname = \"{name}\"\nwasm = \"{}\"\n",
            plugin_crate(krate)
        ));
    }
    text
}

/// Fan-out: every matching route, every plugin of a route; nothing else.
async fn fan_out_to_matching_routes_and_plugins_only(engine: Engine) {
    let config = format!(
        r#"{}
[[sources]]
name = "shop"
type_pointer = "/kind"

[[routes]]
name = "orders"
match = {{ source = ["shop"], type = [{{ prefix = "order." }}] }}
to = ["audit", "audit2"]

[[routes]]
name = "paid"
match = {{ type = ["order.paid"] }}
to = ["audit2"]

[[routes]]
name = "refunds"
match = {{ type = [{{ prefix = "refund." }}] }}
to = ["audit3"]
"#,
        server_with(&[("audit", "audit"), ("audit2", "audit"), ("audit3", "audit")])
    );
    let h = Harness::start(engine, &config).await;

    let (status, answer) = h.post("shop", &json!({"kind": "order.paid"})).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(routes_of(&answer), ["orders", "paid"]);
    let paid = answer["id"].as_str().expect("id").to_string();
    let (status, answer) = h.post("shop", &json!({"kind": "refund.issued"})).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(routes_of(&answer), ["refunds"]);
    let refund = answer["id"].as_str().expect("id").to_string();
    let (status, answer) = h.post("shop", &json!({"kind": "cart.created"})).await;
    assert_eq!(status, 202, "{answer}");
    assert!(routes_of(&answer).is_empty(), "{answer}");
    let unrouted = answer["id"].as_str().expect("id").to_string();

    let tl = h.delivered(&paid).await;
    let d = |r: &str, p: &str| (r.to_string(), p.to_string(), "delivered".to_string());
    assert_eq!(
        deliveries(&tl),
        [
            d("orders", "audit"),
            d("orders", "audit2"),
            d("paid", "audit2")
        ],
        "{tl}"
    );
    for delivery in tl["deliveries"].as_array().expect("deliveries") {
        assert_eq!(attempts(delivery), 1, "{tl}");
        assert_eq!(delivery["attempts"][0]["error"], Value::Null, "{tl}");
    }
    assert_eq!(tl["event"]["id"], paid.as_str());
    assert_eq!(tl["event"]["type"], "order.paid");
    assert_eq!(tl["event"]["source"], "shop");
    assert_eq!(tl["status"], "delivered");
    let tl = h.delivered(&refund).await;
    assert_eq!(deliveries(&tl), [d("refunds", "audit3")], "{tl}");
    let tl = h.settled(&unrouted).await;
    assert!(deliveries(&tl).is_empty(), "{tl}");

    // The effects: each plugin saw exactly the events routed to it.
    assert_eq!(h.kv_eventually("audit", &paid).await, "order.paid");
    assert_eq!(h.kv_eventually("audit2", &paid).await, "order.paid");
    assert_eq!(h.kv_eventually("audit3", &refund).await, "refund.issued");
    assert_eq!(h.kv("audit3", &paid).await, None);
    assert_eq!(h.kv("audit", &refund).await, None);
    assert_eq!(h.kv("audit2", &refund).await, None);
    for p in ["audit", "audit2", "audit3"] {
        assert_eq!(h.kv(p, &unrouted).await, None, "{p} got an unrouted event");
    }
    h.stop().await;
}

/// The `flaky` plugin behind route `main`, with `retry` as given.
fn flaky_config(retry: &str) -> String {
    format!(
        r#"{}
[[sources]]
name = "s"

[[routes]]
name = "main"
match = {{ source = ["s"] }}
to = ["flaky"]
retry = {retry}
"#,
        server_with(&[("flaky", "flaky")])
    )
}

const QUICK_RETRY: &str = r#"{ attempts = 5, backoff = "fixed", initial = "50ms", max = "50ms" }"#;

async fn failures_are_retried_until_delivered(engine: Engine) {
    let h = Harness::start(engine, &flaky_config(QUICK_RETRY)).await;
    let fails = h.accept("s", &json!({"mode": "fail", "times": 3})).await;
    let traps = h.accept("s", &json!({"mode": "trap", "times": 1})).await;

    let tl = h.delivered(&fails).await;
    let d = &tl["deliveries"][0];
    assert_eq!(attempts(d), 4, "3 failures and the success: {tl}");
    for a in &d["attempts"].as_array().expect("attempts")[..3] {
        assert_eq!(a["error"], "plugin asked to retry", "{tl}");
    }
    assert_eq!(d["attempts"][3]["error"], Value::Null, "{tl}");
    // The plugin was told which attempt it ran as.
    assert_eq!(
        h.kv_eventually("flaky", &format!("done/{fails}")).await,
        "4"
    );

    // A trap is retried like any transient failure.
    let tl = h.delivered(&traps).await;
    let d = &tl["deliveries"][0];
    assert_eq!(attempts(d), 2, "{tl}");
    let error = d["attempts"][0]["error"].as_str().expect("error text");
    assert!(error.contains("flaky: trap on attempt 1"), "{tl}");
    assert_eq!(
        h.kv_eventually("flaky", &format!("done/{traps}")).await,
        "2"
    );
    h.stop().await;
}

/// The dead letter of `event`, from `GET /api/dlq` (waiting for it to show).
async fn dead_letter(h: &Harness, event: &str) -> Value {
    wait_for(&format!("a dead letter of {event}"), || async {
        let dlq = h.get_json("/api/dlq").await;
        dlq["items"]
            .as_array()
            .expect("items")
            .iter()
            .find(|item| item["event_id"] == event)
            .cloned()
    })
    .await
}

/// Swaps `flaky` for `audit` (which takes everything), redrives the dead
/// letter and returns the event's timeline once the delivery went through.
async fn fix_and_redrive(h: &Harness, config: &str, dead_id: &str, event: &str) -> Value {
    h.reconfigure(&config.replace(&plugin_crate("flaky"), &plugin_crate("audit")))
        .await;
    h.redrive_one(dead_id).await;
    wait_for("the redriven delivery", || async {
        let tl = h.event(event).await;
        (tl["deliveries"][0]["status"] == "delivered").then_some(tl)
    })
    .await
}

async fn a_reject_is_dead_lettered_and_redriven(engine: Engine) {
    let config = flaky_config(QUICK_RETRY);
    let h = Harness::start(engine, &config).await;
    let rejected = h.accept("s", &json!({"mode": "reject"})).await;
    let fine = h.accept("s", &json!({})).await;

    // A reject is not retried.
    let tl = h.settled(&rejected).await;
    let d = &tl["deliveries"][0];
    assert_eq!(
        (d["status"].as_str(), attempts(d)),
        (Some("dead"), 1),
        "{tl}"
    );
    assert_eq!(
        d["attempts"][0]["error"],
        "rejected: flaky: rejected on purpose"
    );
    assert_eq!(tl["status"], "dead");
    h.delivered(&fine).await;

    // The dead letter keeps the route, the plugin, its hash and each attempt.
    let item = dead_letter(&h, &rejected).await;
    assert_eq!(item["route"], "main", "{item}");
    assert_eq!(item["plugin"], "flaky", "{item}");
    assert_eq!(item["status"], "dead", "{item}");
    assert_eq!(item["reason"], "rejected: flaky: rejected on purpose");
    let old_hash = item["plugin_hash"]
        .as_str()
        .unwrap_or_else(|| panic!("plugin_hash: {item}"))
        .to_string();
    assert_eq!(old_hash.len(), 64, "a sha-256 in hex: {item}");
    assert_eq!(attempts(&item), 1, "{item}");
    assert_eq!(item["attempts"][0]["plugin_hash"], old_hash.as_str());
    let dlq = h.get_json("/api/dlq").await;
    assert_eq!(dlq["items"].as_array().map(Vec::len), Some(1), "{dlq}");
    let dead_id = item["id"].as_str().expect("dead letter id").to_string();
    let shown = h.get_json(&format!("/api/dlq/{dead_id}")).await;
    assert_eq!(shown["event"]["data"]["mode"], "reject", "{shown}");

    // Fixed: `flaky` is now a plugin that takes everything; the redriven
    // letter goes to it as it is now.
    let tl = fix_and_redrive(&h, &config, &dead_id, &rejected).await;
    let d = &tl["deliveries"][0];
    assert_eq!(attempts(d), 2, "{tl}");
    assert_eq!(d["attempts"][1]["error"], Value::Null, "{tl}");
    assert_ne!(d["attempts"][1]["plugin_hash"], old_hash.as_str(), "{tl}");
    assert_eq!(
        h.kv_eventually("flaky", &rejected).await,
        "webhook",
        "the audit plugin stores the type under the id"
    );
    wait_for("the dead letter list to empty", || async {
        let dlq = h.get_json("/api/dlq").await;
        dlq["items"]
            .as_array()
            .is_some_and(Vec::is_empty)
            .then_some(())
    })
    .await;
    // Redriving what is no longer dead is a 404.
    let (status, _) = h
        .post_api(&format!("/api/dlq/{dead_id}/redrive"), &json!({}))
        .await;
    assert_eq!(status, 404);
    h.stop().await;
}

async fn out_of_attempts_is_dead(engine: Engine) {
    let retry = r#"{ attempts = 3, backoff = "fixed", initial = "50ms", max = "50ms" }"#;
    let h = Harness::start(engine, &flaky_config(retry)).await;
    let never = h.accept("s", &json!({"mode": "fail"})).await;
    let tl = h.settled(&never).await;
    let d = &tl["deliveries"][0];
    assert_eq!(
        (d["status"].as_str(), attempts(d)),
        (Some("dead"), 3),
        "{tl}"
    );
    for a in d["attempts"].as_array().expect("attempts") {
        // The last one also says that it was the last.
        let error = a["error"].as_str().unwrap_or_default();
        assert!(error.starts_with("plugin asked to retry"), "{tl}");
        assert!(a["at"].is_string(), "each attempt keeps its time: {tl}");
    }
    let item = dead_letter(&h, &never).await;
    assert_eq!(attempts(&item), 3, "{item}");
    let reason = item["reason"].as_str().expect("reason");
    assert!(
        reason.contains("plugin asked to retry") && reason.contains("3 attempts"),
        "{item}"
    );
    assert_eq!(h.kv("flaky", &format!("done/{never}")).await, None);
    h.stop().await;
}

/// A record keeps the last 1,000 attempts and counts the rest: a delivery
/// that fails 600 times, is redriven and fails 600 times more, twice, keeps
/// 1,000, says 800 are not kept, and is a dead letter each time. On NATS a
/// letter's message id counts every attempt made: counting those kept, the
/// third letter's id would repeat the second's, and the server would drop
/// it as a repeat.
async fn a_delivery_redriven_again_keeps_its_last_attempts(engine: Engine) {
    let retry = r#"{ attempts = 600, backoff = "fixed", initial = "1ms", max = "1ms" }"#;
    let h = Harness::start(engine, &flaky_config(retry)).await;
    let never = h.accept("s", &json!({"mode": "fail"})).await;
    let tl = h.settled(&never).await;
    assert_eq!(attempts(&tl["deliveries"][0]), 600, "{tl}");
    for (round, not_kept) in [(1, 200), (2, 800)] {
        let item = dead_letter(&h, &never).await;
        let dead_id = item["id"].as_str().expect("dead letter id").to_string();
        h.redrive_one(&dead_id).await;
        let d = wait_for(&format!("redrive {round} to be dead again"), || async {
            let tl = h.event(&never).await;
            let d = tl["deliveries"][0].clone();
            (d["status"] == "dead" && d["attempts_not_kept"] == not_kept).then_some(d)
        })
        .await;
        assert_eq!(attempts(&d), 1000);
        assert_eq!(d["redriven_at"].as_array().map(Vec::len), Some(round));
        let last = d["attempts"][999]["error"].as_str().unwrap_or_default();
        assert!(last.ends_with("gave up after 600 attempts"), "{last}");
        let item = wait_for(&format!("dead letter {}", round + 1), || async {
            let dlq = h.get_json("/api/dlq").await;
            dlq["items"]
                .as_array()
                .expect("items")
                .iter()
                .find(|i| i["event_id"] == never.as_str() && i["attempts_not_kept"] == not_kept)
                .cloned()
        })
        .await;
        assert_eq!(attempts(&item), 1000, "{}", item["id"]);
    }
    // The dashboard numbers the attempts it shows after those not kept.
    let (status, page) = h.get(&format!("/ui/events/{never}")).await;
    assert_eq!(status, 200);
    assert!(
        page.contains("800 earlier attempts are not kept."),
        "{page}"
    );
    assert!(page.contains("<td>801</td>") && page.contains("<td>1800</td>"));
    h.stop().await;
}

async fn repeats_of_an_idempotency_key_are_accepted_once(engine: Engine) {
    let config = format!(
        r#"{}
[[sources]]
name = "bank"
dedup_header = "Idempotency-Key"

[[routes]]
name = "count"
match = {{ source = ["bank"] }}
to = ["probe"]
"#,
        server_with(&[("probe", "probe")])
    );
    let h = Harness::start(engine, &config).await;
    // Each event counts its deliveries under its own key.
    let post = |key: &'static str| {
        let h = &h;
        async move {
            let body = json!({"ops": [{"op": "increment", "key": format!("runs/{key}"), "by": 1}]});
            let resp = h
                .client
                .post(format!("{}/webhooks/bank", h.base))
                .header("Idempotency-Key", key)
                .json(&body)
                .send()
                .await
                .expect("post");
            let status = resp.status().as_u16();
            let answer: Value = resp.json().await.expect("json answer");
            assert_eq!(status, 202, "{answer}");
            answer
        }
    };
    let first = post("k1").await;
    let again = post("k1").await;
    assert_eq!(again["id"], first["id"], "{again}");
    assert_eq!(again["duplicate"], true, "{again}");
    let other = post("k2").await;
    assert_ne!(other["id"], first["id"]);
    let first = first["id"].as_str().expect("id");
    let other = other["id"].as_str().expect("id");

    let tl = h.delivered(first).await;
    assert_eq!(tl["deliveries"].as_array().map(Vec::len), Some(1), "{tl}");
    assert_eq!(attempts(&tl["deliveries"][0]), 1, "{tl}");
    h.delivered(other).await;
    // One more event, after the repeat: once it is through, a second delivery
    // of the repeat would have had its chance.
    let late = post("k3").await;
    h.delivered(late["id"].as_str().expect("id")).await;
    for key in ["k1", "k2", "k3"] {
        assert_eq!(
            h.kv_eventually("probe", &format!("runs/{key}")).await,
            "1",
            "deliveries of {key}"
        );
    }
    h.stop().await;
}

async fn kv_writes_are_visible_and_concurrent_updates_are_not_lost(engine: Engine) {
    // No order key on the ledger: the 50 read-modify-writes of one balance
    // run concurrently, so only the engine's conflict check keeps them whole.
    let config = format!(
        r#"{}
[[sources]]
name = "s"
type_pointer = "/type"

[[routes]]
name = "probe"
match = {{ type = ["probe"] }}
to = ["probe"]

[[routes]]
name = "ledger"
match = {{ type = ["deposit"] }}
to = ["account"]
retry = {{ attempts = 10, backoff = "fixed", initial = "20ms", max = "20ms" }}
"#,
        server_with(&[("probe", "probe"), ("account", "account")])
    );
    let h = Harness::start(engine, &config).await;

    let set = h
        .accept(
            "s",
            &json!({"type": "probe", "ops": [
                {"op": "set", "key": "greeting", "value": "hello"},
                {"op": "set", "key": "doomed", "value": "x"},
                {"op": "delete", "key": "doomed"},
                {"op": "cas", "key": "slot", "expect": null, "new": "mine"},
            ]}),
        )
        .await;
    h.delivered(&set).await;
    assert_eq!(h.kv_eventually("probe", "greeting").await, "hello");
    assert_eq!(h.kv("probe", "doomed").await, None);
    assert_eq!(h.kv("probe", "slot").await.as_deref(), Some("mine"));
    let results: Value =
        serde_json::from_str(&h.kv_eventually("probe", &format!("result/{set}")).await)
            .expect("probe results are JSON");
    assert_eq!(results, json!(["ok", "ok", "ok", true]));

    // 50 at once: atomic increments (probe) and read-modify-writes (account).
    let mut posts = tokio::task::JoinSet::new();
    for i in 0..50 {
        let (client, url) = (h.client.clone(), format!("{}/webhooks/s", h.base));
        posts.spawn(async move {
            let body = if i % 2 == 0 {
                json!({"type": "probe", "ops": [{"op": "increment", "key": "hits", "by": 1}]})
            } else {
                json!({"type": "deposit", "account": "acc", "amount": 3})
            };
            let resp = client.post(url).json(&body).send().await.expect("post");
            assert_eq!(resp.status().as_u16(), 202);
            let answer: Value = resp.json().await.expect("json");
            answer["id"].as_str().expect("id").to_string()
        });
    }
    let ids = posts.join_all().await;
    for id in &ids {
        h.delivered(id).await;
    }
    assert_eq!(h.kv_eventually("probe", "hits").await, "25");
    assert_eq!(h.kv_eventually("account", "balance/acc").await, "75");
    // An unknown key is a 404.
    let (status, _) = h.get("/api/plugins/probe/kv/never-written").await;
    assert_eq!(status, 404);
    h.stop().await;
}

async fn emitted_events_are_routed_with_their_causation(engine: Engine) {
    let config = format!(
        r#"{}
[[plugins]]
name = "order-totals"
wasm = "{}"
config = {{ vip_total = 100 }}

[[sources]]
name = "shop"
type_pointer = "/kind"
subject_pointer = "/customer"

[[routes]]
name = "orders"
match = {{ source = ["shop"], type = [{{ prefix = "order." }}] }}
to = ["order-totals"]

[[routes]]
name = "vips"
match = {{ source = ["plugin/order-totals"], type = ["customer.vip"] }}
to = ["audit"]
"#,
        server_with(&[("audit", "audit")]),
        plugin_crate("order-totals"),
    );
    let h = Harness::start(engine, &config).await;
    let order = |total: f64| json!({"kind": "order.created", "customer": "ada", "total": total});
    // One after the other, so that the second order is the one crossing 100.
    let first = h.accept("shop", &order(60.0)).await;
    let tl = h.delivered(&first).await;
    assert!(
        tl["deliveries"][0]["attempts"][0].get("emitted").is_none(),
        "{tl}"
    );
    let second = h.accept("shop", &order(50.0)).await;
    let tl = h.delivered(&second).await;
    let emitted = &tl["deliveries"][0]["attempts"][0]["emitted"];
    let child = emitted[0]
        .as_str()
        .unwrap_or_else(|| panic!("the crossing order emitted an event: {tl}"))
        .to_string();
    assert_eq!(emitted.as_array().map(Vec::len), Some(1), "{tl}");

    let ctl = h.delivered(&child).await;
    let event = &ctl["event"];
    assert_eq!(event["type"], "customer.vip", "{ctl}");
    assert_eq!(event["source"], "plugin/order-totals", "{ctl}");
    assert_eq!(event["subject"], "ada", "{ctl}");
    assert_eq!(event["causationid"], second.as_str(), "{ctl}");
    assert_eq!(event["hops"], "1", "{ctl}");
    assert_eq!(event["data"], json!({"customer": "ada", "total": 110.0}));
    assert_eq!(
        deliveries(&ctl),
        [("vips".into(), "audit".into(), "delivered".into())]
    );
    assert_eq!(h.kv_eventually("audit", &child).await, "customer.vip");
    let totals: Value =
        serde_json::from_str(&h.kv_eventually("order-totals", "customer/ada").await)
            .expect("totals are JSON");
    assert_eq!(totals, json!({"count": 2, "total": 110.0}));
    h.stop().await;
}

async fn an_order_key_keeps_acceptance_order_per_key(engine: Engine) {
    let config = format!(
        r#"{}
[[sources]]
name = "o"

[[routes]]
name = "ordered"
match = {{ source = ["o"] }}
to = ["flaky"]
order_key = "/data/key"
retry = {{ attempts = 5, backoff = "fixed", initial = "20ms", max = "20ms" }}
"#,
        server_with(&[("flaky", "flaky")])
    );
    let h = Harness::start(engine, &config).await;
    // Key `a`'s first event fails twice, asking for 300 ms each time: the
    // rest of `a` must wait for it. Key `b` fails now and then, briefly. Key
    // `c` has a rejected event in the middle: dead, and the rest of `c` goes
    // on. Posted in turn, so acceptance order is `n` per key.
    let mut ids = Vec::new();
    for n in 0..12u32 {
        let a = if n == 0 {
            json!({"key": "a", "n": n, "mode": "fail", "times": 2, "after_ms": 300})
        } else {
            json!({"key": "a", "n": n})
        };
        let b =
            json!({"key": "b", "n": n, "mode": if n % 4 == 1 { "fail" } else { "ok" }, "times": 1});
        let c = json!({"key": "c", "n": n, "mode": if n == 5 { "reject" } else { "ok" }});
        for body in [a, b, c] {
            ids.push(h.accept("o", &body).await);
        }
    }
    for id in &ids {
        h.settled(id).await;
    }
    let seen = |key: &'static str| {
        let h = &h;
        async move {
            let text = h.kv_eventually("flaky", &format!("seen/{key}")).await;
            serde_json::from_str::<Vec<u32>>(&text).expect("a JSON list of n")
        }
    };
    let all: Vec<u32> = (0..12).collect();
    assert_eq!(seen("a").await, all, "key a");
    assert_eq!(seen("b").await, all, "key b");
    let without_5: Vec<u32> = all.iter().copied().filter(|&n| n != 5).collect();
    assert_eq!(seen("c").await, without_5, "key c");
    // Nothing lost: every event of `a` and `b` delivered, `c`'s n=5 dead.
    let mut dead = 0;
    for id in &ids {
        let tl = h.event(id).await;
        let status = tl["deliveries"][0]["status"].as_str().unwrap_or("?");
        if status == "dead" {
            dead += 1;
            assert_eq!(
                tl["event"]["data"],
                json!({"key": "c", "n": 5, "mode": "reject"})
            );
        } else {
            assert_eq!(status, "delivered", "{tl}");
        }
        assert_eq!(
            tl["deliveries"][0]["order_key"], tl["event"]["data"]["key"],
            "{tl}"
        );
    }
    assert_eq!(dead, 1);
    h.stop().await;
}

/// The harness the NATS half relies on: stop, kill and restart keep the
/// port and the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_harness_stops_kills_and_restarts() {
    let mut nats = NatsServer::start().await;
    let port = nats.port();
    let connects = || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
    assert!(connects());
    assert_eq!(nats.url(), format!("nats://127.0.0.1:{port}"));
    assert!(
        nats.store_dir().join("jetstream").is_dir(),
        "{}",
        nats.log()
    );
    nats.stop().await;
    assert!(!nats.is_running());
    assert!(!connects());
    nats.restart().await;
    assert!(nats.is_running() && connects());
    nats.kill();
    assert!(!nats.is_running() && !connects());
    nats.restart().await;
    assert!(connects());
    assert_eq!(nats.log().matches("Server is ready").count(), 3);
}

/// A redrive whose publish fails (here: the events stream stops taking the
/// delivery subjects, as a broken or misconfigured cluster might) answers an
/// error and leaves the delivery dead with its letter listed, not "pending"
/// with nothing to run it; a later redrive delivers it. NATS only: the
/// embedded engine redrives in one transaction. The fault is injected with a
/// NATS client, the rest is judged through the HTTP API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_a_redrive_that_cannot_publish_leaves_its_letter_dead() {
    let config = flaky_config(QUICK_RETRY);
    let h = Harness::start(Engine::Nats, &config).await;
    let rejected = h.accept("s", &json!({"mode": "reject"})).await;
    let item = dead_letter(&h, &rejected).await;
    let dead_id = item["id"].as_str().expect("dead letter id").to_string();

    let nats = h.nats.as_ref().expect("a nats-server");
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(&h.stream).await.expect("the events stream");
    let mut cfg = stream.info().await.expect("stream info").config.clone();
    let subjects = cfg.subjects.clone();
    cfg.subjects.retain(|s| !s.contains(".deliver."));
    assert_eq!(cfg.subjects.len() + 1, subjects.len(), "{subjects:?}");
    js.update_stream(cfg.clone())
        .await
        .expect("narrow the stream");

    let (status, answer) = h
        .post_api(&format!("/api/dlq/{dead_id}/redrive"), &json!({}))
        .await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (503, Some("store unavailable")),
        "{answer}"
    );
    let tl = h.event(&rejected).await;
    let d = &tl["deliveries"][0];
    assert_eq!(d["status"], "dead", "{tl}");
    assert_eq!(d["redriven_at"], Value::Null, "{tl}");
    let again = dead_letter(&h, &rejected).await;
    assert_eq!(again["id"], dead_id.as_str(), "{again}");

    // Mended: the same letter redrives, to a plugin that now takes it.
    cfg.subjects = subjects;
    js.update_stream(cfg).await.expect("restore the stream");
    let tl = fix_and_redrive(&h, &config, &dead_id, &rejected).await;
    assert_eq!(attempts(&tl["deliveries"][0]), 2, "{tl}");
    h.stop().await;
}

/// What the engine cannot store is refused with a reason, never retried
/// forever. On NATS a message is at most the server's `max_payload` (1 MiB
/// by default): a kv value of 1 MiB (which the runtime allows) makes its
/// delivery dead, with nothing written, and a webhook body over it is a 413.
/// The embedded engine takes both.
async fn what_the_engine_cannot_store_is_refused_with_a_reason(engine: Engine) {
    let config = format!(
        r#"
[server]
data_dir = "DATA"
build_dir = "BUILD"
max_body = "4MiB"

[[sources]]
name = "s"
type_pointer = "/type"

[[sources]]
name = "keyed"
dedup_header = "Idempotency-Key"

[[plugins]]
name = "hostile"
wasm = "{hostile}"
timeout = "30s"

[[routes]]
name = "big"
match = {{ type = ["kv-large"] }}
to = ["hostile"]
retry = {{ attempts = 1 }}

[[routes]]
name = "loud"
match = {{ type = ["reject-flood"] }}
to = ["hostile"]
retry = {{ attempts = 1 }}
"#,
        hostile = plugin_crate("hostile"),
    );
    let h = Harness::start(engine, &config).await;
    // A reason of 4 MiB is cut where it enters: on NATS a record holding
    // it whole could never be stored, and the delivery would never end.
    let loud = h.accept("s", &json!({"type": "reject-flood"})).await;
    let tl = h.settled(&loud).await;
    let d = &tl["deliveries"][0];
    assert_eq!(d["status"], "dead", "{tl}");
    let error = d["attempts"][0]["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("rejected: hostile: rrr") && error.ends_with("… (4194313 bytes, cut)"),
        "{error}"
    );
    assert!(error.len() < 600, "{} bytes", error.len());
    let letter = dead_letter(&h, &loud).await;
    assert_eq!(letter["route"], "loud", "{letter}");
    let big = h
        .accept("s", &json!({"type": "kv-large", "value_bytes": 1 << 20}))
        .await;
    let tl = h.settled(&big).await;
    let d = &tl["deliveries"][0];
    let body = json!({"type": "other", "pad": "p".repeat(1_500_000)});
    let (status, answer) = h.post("s", &body).await;
    // A long idempotency key rides in the message's header as well as in
    // the event: an event that fits with a little room for headers, but not
    // with this one, is refused before it is sent (the server would refuse
    // it every time, a 503 the producer would retry forever).
    let key = "k".repeat(40_000);
    let keyed = h
        .client
        .post(format!("{}/webhooks/keyed", h.base))
        .header("Idempotency-Key", &key)
        .json(&json!({"pad": "p".repeat((1 << 20) - 60_000)}))
        .send()
        .await
        .expect("post");
    let keyed_status = keyed.status().as_u16();
    let keyed_answer: Value = keyed.json().await.unwrap_or(Value::Null);
    match engine {
        Engine::Embedded => {
            assert_eq!(d["status"], "delivered", "{tl}");
            let value = h.kv_eventually("hostile", "large").await;
            assert_eq!(value.len(), 1 << 20);
            assert_eq!(status, 202, "{answer}");
            assert_eq!(keyed_status, 202, "{keyed_answer}");
        }
        Engine::Nats => {
            assert_eq!(d["status"], "dead", "{tl}");
            let error = d["attempts"][0]["error"].as_str().unwrap_or_default();
            assert!(
                error.starts_with("the delivery's result cannot be stored: ")
                    && error.contains("(1048576 bytes at most)"),
                "{error}"
            );
            assert_eq!(h.kv("hostile", "large").await, None);
            assert_eq!(status, 413, "{answer}");
            assert_eq!(keyed_status, 413, "{keyed_answer}");
        }
    }
    h.stop().await;
}

/// A dead letter keeps the whole event, whatever its size. On NATS a dead
/// letter is one message: an event of 900 kB (JSON would have written its
/// bytes as numbers, over 3 MB) fits as it is; an event near the limit,
/// whose record of 40 attempts does not fit beside it, keeps its data in
/// the event stream, and the letter shows it all the same. Neither may stay
/// undead, its delivery run again and again.
async fn a_large_event_is_dead_lettered_whole(engine: Engine) {
    let config = format!(
        r#"
[server]
data_dir = "DATA"
build_dir = "BUILD"
max_body = "4MiB"

[[plugins]]
name = "flaky"
wasm = "{flaky}"

[[sources]]
name = "s"

[[routes]]
name = "main"
match = {{ source = ["s"] }}
to = ["flaky"]
retry = {{ attempts = 40, backoff = "fixed", initial = "20ms", max = "20ms" }}
"#,
        flaky = plugin_crate("flaky"),
    );
    let h = Harness::start(engine, &config).await;
    let big = "b".repeat(900_000);
    let rejected = h.accept("s", &json!({"mode": "reject", "pad": big})).await;
    let near = "n".repeat((1 << 20) - 2_500);
    let failing = h.accept("s", &json!({"mode": "fail", "pad": near})).await;

    let mut letters = Vec::new();
    for (event, tries, pad) in [(&rejected, 1, &big), (&failing, 40, &near)] {
        let tl = h.settled(event).await;
        let d = &tl["deliveries"][0];
        assert_eq!(
            (d["status"].as_str(), attempts(d)),
            (Some("dead"), tries),
            "{}",
            d["attempts"]
        );
        let item = dead_letter(&h, event).await;
        let id = item["id"].as_str().expect("dead letter id");
        let shown = h.get_json(&format!("/api/dlq/{id}")).await;
        assert_eq!(
            shown["event"]["data"]["pad"].as_str().map(str::len),
            Some(pad.len()),
            "{}",
            shown["attempts"]
        );
        letters.push(id.to_string());
    }
    if let Some(nats) = h.nats.as_ref() {
        // In the dead-letter stream: the first letter holds its 900 kB of
        // data, the second left its data in the event stream.
        let client = async_nats::connect(nats.url()).await.expect("connect");
        let js = async_nats::jetstream::new(client);
        let dlq = js
            .get_stream(format!("{}_DLQ", h.stream))
            .await
            .expect("the dead-letter stream");
        let mut sizes = Vec::new();
        for seq in [1, 2] {
            let m = dlq.get_raw_message(seq).await.expect("a dead letter");
            sizes.push(m.payload.len());
        }
        assert!(
            sizes[0] > big.len() && sizes[0] < big.len() + 10_000,
            "{sizes:?}"
        );
        assert!(sizes[1] < 20_000, "{sizes:?}");

        // The second event leaves the event stream (as retention would
        // take it): its letter, without data, is listed still, and a
        // redrive of the route leaves it there rather than deliver an
        // event without its data. The other letter is redriven.
        let seq: u64 = letters[1]
            .split('-')
            .next()
            .and_then(|s| s.parse().ok())
            .expect("a letter id is <seq>-<idx>");
        let events = js.get_stream(&h.stream).await.expect("the events stream");
        assert!(events.delete_message(seq).await.expect("delete the event"));
        let (status, answer) = h
            .post_api("/api/dlq/redrive", &json!({"route": "main"}))
            .await;
        assert_eq!(status, 202, "{answer}");
        assert_eq!(answer["ids"], json!([letters[0]]), "{answer}");
        let dlq = h.get_json("/api/dlq").await;
        let listed: Vec<&str> = dlq["items"]
            .as_array()
            .expect("items")
            .iter()
            .filter_map(|i| i["id"].as_str())
            .collect();
        assert!(listed.contains(&letters[1].as_str()), "{dlq}");
        // Found by its id too, though its event, through which an id is
        // looked up, is gone.
        let shown = h.get_json(&format!("/api/dlq/{}", letters[1])).await;
        assert_eq!(shown["event"]["id"], failing.as_str(), "{shown}");
        assert_eq!(attempts(&shown), 40, "{shown}");
        // An id past the stream's end names no letter.
        let (status, body) = h.get("/api/dlq/999999-0").await;
        assert_eq!(status, 404, "{body}");
    }
    h.stop().await;
}
