//! Reliable delivery, end to end on a real server: retries, dead letters and
//! redrive, ingest dedup, replay, order keys and per-route concurrency. The
//! `flaky` plugin fails on purpose as each event's data tells it to.

mod common;

use common::{TestServer, plugin_crate, wait_for};
use serde_json::{Value, json};

/// A server with the `flaky` plugin behind route `main` (3 attempts, 20 ms
/// apart), plus whatever `extra` adds.
fn config(extra: &str) -> String {
    format!(
        r#"
[server]
data_dir = "DATA"
build_dir = "BUILD"

[[sources]]
name = "s"

[[plugins]]
name = "flaky"
wasm = "{flaky}"

[[routes]]
name = "main"
match = {{ source = ["s"] }}
to = ["flaky"]
retry = {{ attempts = 3, backoff = "fixed", initial = "20ms", max = "20ms" }}
{extra}
"#,
        flaky = plugin_crate("flaky"),
    )
}

fn attempts(delivery: &Value) -> usize {
    delivery["attempts"].as_array().map_or(0, Vec::len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_retried_then_dead_lettered_and_redriven_to_the_plugin_as_it_is_now() {
    let t = TestServer::start(&config("")).await;
    let recovers = t.accept("s", &json!({"mode": "fail", "times": 2})).await;
    let traps_once = t.accept("s", &json!({"mode": "trap", "times": 1})).await;
    let never = t.accept("s", &json!({"mode": "fail"})).await;
    let rejected = t.accept("s", &json!({"mode": "reject"})).await;

    // Fails twice, succeeds on the third attempt, and saw its attempt number.
    let tl = t.settled(&recovers).await;
    let d = &tl["deliveries"][0];
    assert_eq!(d["status"], "delivered", "{tl}");
    assert_eq!(attempts(d), 3);
    assert_eq!(d["attempts"][0]["error"], "plugin asked to retry");
    assert_eq!(
        t.kv("flaky", &format!("done/{recovers}")).await.as_deref(),
        Some("3")
    );
    // A trap is retried like any transient failure.
    let tl = t.settled(&traps_once).await;
    assert_eq!(tl["deliveries"][0]["status"], "delivered", "{tl}");
    let trap_error = tl["deliveries"][0]["attempts"][0]["error"]
        .as_str()
        .unwrap();
    assert!(trap_error.contains("flaky: trap on attempt 1"), "{tl}");

    // Out of attempts: dead, with every attempt kept.
    let tl = t.settled(&never).await;
    let d = &tl["deliveries"][0];
    assert_eq!(
        (d["status"].as_str(), attempts(d)),
        (Some("dead"), 3),
        "{tl}"
    );
    assert_eq!(tl["status"], "dead");
    // A reject goes straight to the dead letters.
    let tl = t.settled(&rejected).await;
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

    // The dead letters, listed, paged and shown.
    let dlq = t.get_json("/api/dlq?route=main").await;
    let items = dlq["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{dlq}");
    assert_eq!(items[0]["event_id"], never.as_str());
    assert_eq!(
        items[0]["reason"],
        "plugin asked to retry; gave up after 3 attempts"
    );
    let old_hash = items[0]["plugin_hash"].as_str().unwrap().to_string();
    assert_eq!(old_hash.len(), 64);
    let page = t.get_json("/api/dlq?limit=1").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    let next = page["next"].as_str().unwrap();
    let page2 = t.get_json(&format!("/api/dlq?limit=1&after={next}")).await;
    assert_eq!(page2["items"][0]["event_id"], rejected.as_str());
    assert_eq!(page2["next"], Value::Null);
    assert!(
        t.get_json("/api/dlq?route=other").await["items"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let dead_id = items[1]["id"].as_str().unwrap().to_string();
    let shown = t.get_json(&format!("/api/dlq/{dead_id}")).await;
    assert_eq!(shown["event"]["data"]["mode"], "reject");
    assert_eq!(shown["route"], "main");
    assert_eq!(shown["plugin"], "flaky");

    // Bad requests are told so, and change nothing.
    let (status, _) = t.post_api("/api/dlq/redrive", &json!({})).await;
    assert_eq!(status, 400);
    let (status, _) = t.post_api("/api/dlq/1-99/redrive", &json!({})).await;
    assert_eq!(status, 404);
    let (status, _) = t.get("/api/dlq/nonsense").await;
    assert_eq!(status, 404);

    // Fix the plugin (here: swap in one that always succeeds), then redrive:
    // the dead letters go to the plugin as it is now.
    let fixed = config("").replace(&plugin_crate("flaky"), &plugin_crate("audit"));
    t.reconfigure(&fixed).await;
    t.redrive_one(&dead_id).await;
    let (status, answer) = t
        .post_api("/api/dlq/redrive", &json!({"route": "main"}))
        .await;
    assert_eq!(
        (status, answer["redriven"].as_u64()),
        (202, Some(1)),
        "{answer}"
    );
    for id in [&never, &rejected] {
        let tl = wait_for("redriven delivery", || async {
            let tl = t.event(id).await;
            (tl["deliveries"][0]["status"] == "delivered").then_some(tl)
        })
        .await;
        let d = &tl["deliveries"][0];
        assert_eq!(d["redriven_at"].as_array().unwrap().len(), 1, "{tl}");
        let last = d["attempts"].as_array().unwrap().last().unwrap();
        assert_ne!(last["plugin_hash"].as_str().unwrap(), old_hash, "{tl}");
    }
    assert!(
        t.get_json("/api/dlq").await["items"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeats_of_an_idempotency_key_are_accepted_once() {
    let extra = r#"
[[sources]]
name = "gh"
dedup_header = "X-GitHub-Delivery"

[[sources]]
name = "stripe"
dedup_pointer = "/id"
dedup_window = "1h"

[[routes]]
name = "others"
match = { source = ["gh", "stripe"] }
to = ["flaky"]
"#;
    let t = TestServer::start(&config(extra)).await;
    let post_gh = |delivery: &'static str| {
        let t = &t;
        async move {
            let resp = t
                .client
                .post(format!("{}/webhooks/gh", t.base))
                .header("X-GitHub-Delivery", delivery)
                .json(&json!({"action": "opened"}))
                .send()
                .await
                .unwrap();
            (
                resp.status().as_u16(),
                resp.json::<Value>().await.unwrap_or_default(),
            )
        }
    };
    let (status, first) = post_gh("d-1").await;
    assert_eq!(status, 202);
    let (status, again) = post_gh("d-1").await;
    assert_eq!(status, 202);
    assert_eq!(again["id"], first["id"], "{again}");
    assert_eq!(again["duplicate"], true);
    let (_, other) = post_gh("d-2").await;
    assert_ne!(other["id"], first["id"]);

    let a = t
        .accept(
            "stripe",
            &json!({"id": "evt_1", "type": "charge.succeeded"}),
        )
        .await;
    let b = t
        .accept(
            "stripe",
            &json!({"id": "evt_1", "type": "charge.succeeded"}),
        )
        .await;
    assert_eq!(a, b);

    // Three events stored, each delivered once.
    assert_eq!(t.journal().stats().unwrap().events, 3);
    let tl = t.settled(first["id"].as_str().unwrap()).await;
    assert_eq!(tl["dedup"]["key"], "d-1");
    assert_eq!(tl["dedup"]["duplicates"], 1);
    assert_eq!(tl["deliveries"].as_array().unwrap().len(), 1);

    // Without the key a request is simply not deduplicated.
    let one = t.accept("gh", &json!({"action": "opened"})).await;
    let two = t.accept("gh", &json!({"action": "opened"})).await;
    assert_ne!(one, two);
    assert_eq!(t.journal().stats().unwrap().events, 5);
    t.stop().await;
}

/// Event sourcing: replaying the ledger into a fresh `account` plugin rebuilds
/// the same balances; replayed deliveries carry the `replayed` mark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_rebuilds_a_projection_from_the_archive() {
    let base = format!(
        r#"
[server]
data_dir = "DATA"
build_dir = "BUILD"

[[sources]]
name = "bank"
type_pointer = "/type"

[[plugins]]
name = "account"
wasm = "{account}"

[[plugins]]
name = "rebuilt"
wasm = "{account}"

[[plugins]]
name = "flaky"
wasm = "{flaky}"

[[routes]]
name = "ledger"
match = {{ type = ["deposit", "withdrawal"] }}
to = ["account"]
order_key = "/data/account"
"#,
        account = plugin_crate("account"),
        flaky = plugin_crate("flaky"),
    );
    let t = TestServer::start(&base).await;
    let ops = [
        ("deposit", "a", 100),
        ("deposit", "b", 40),
        ("withdrawal", "a", 30),
        ("withdrawal", "b", 90), // overdraft: rejected, dead
        ("deposit", "a", 5),
        ("withdrawal", "b", 15),
        ("deposit", "c", 7),
    ];
    let mut ids = Vec::new();
    for (ty, account, amount) in ops {
        ids.push(
            t.accept(
                "bank",
                &json!({"type": ty, "account": account, "amount": amount}),
            )
            .await,
        );
    }
    for id in &ids {
        t.settled(id).await;
    }
    let balances = |plugin: &'static str| {
        let t = &t;
        async move {
            let mut out = Vec::new();
            for acct in ["a", "b", "c"] {
                out.push(t.kv(plugin, &format!("balance/{acct}")).await);
            }
            out
        }
    };
    let live = balances("account").await;
    assert_eq!(
        live,
        [Some("75".into()), Some("25".into()), Some("7".into())]
    );

    // A new projection, fed only by a replay of the archive.
    let with_rebuild = format!(
        r#"{base}
[[routes]]
name = "rebuild"
match = {{ type = ["deposit", "withdrawal"] }}
to = ["rebuilt"]
order_key = "/data/account"

[[routes]]
name = "count"
match = {{ source = ["bank"] }}
to = ["flaky"]
"#
    );
    t.reconfigure(&with_rebuild).await;
    let (status, bad) = t
        .post_api("/api/replay", &json!({"since": 0, "route": "nope"}))
        .await;
    assert_eq!(status, 400, "{bad}");
    let (status, job) = t
        .post_api(
            "/api/replay",
            &json!({"since": "2000-01-01T00:00:00Z", "route": "rebuild"}),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    assert_eq!(
        (job["events"].as_u64(), job["deliveries"].as_u64()),
        (Some(7), Some(7))
    );
    let id = job["id"].as_u64().unwrap();
    let done = wait_for("replay to finish", || async {
        let j = t.get_json(&format!("/api/replay/{id}")).await;
        (j["done"] == true).then_some(j)
    })
    .await;
    // The overdraft is rejected again, as it was live.
    assert_eq!(
        (done["delivered"].as_u64(), done["dead"].as_u64()),
        (Some(6), Some(1)),
        "{done}"
    );
    assert_eq!(balances("rebuilt").await, live);
    // The live projection was not touched by the replay.
    assert_eq!(balances("account").await, live);

    // Only the named route got deliveries; plugins see the `replayed` mark.
    let (_, job) = t
        .post_api("/api/replay", &json!({"since": 0, "route": "count"}))
        .await;
    let id = job["id"].as_u64().unwrap();
    wait_for("second replay", || async {
        let j = t.get_json(&format!("/api/replay/{id}")).await;
        (j["done"] == true).then_some(())
    })
    .await;
    assert_eq!(t.kv("flaky", "replayed").await.as_deref(), Some("7"));
    let tl = t.event(&ids[0]).await;
    let routes: Vec<_> = tl["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["route"].as_str().unwrap(), d["replayed"] == true))
        .collect();
    assert_eq!(
        routes,
        [("ledger", false), ("rebuild", true), ("count", true)]
    );
    t.stop().await;
}

/// Deliveries with the same order key run one at a time in acceptance order;
/// one held back by a retry holds back only its own key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_key_serializes_deliveries_per_key_only() {
    let extra = r#"
[[sources]]
name = "o"

[[routes]]
name = "ordered"
match = { source = ["o"] }
to = ["flaky"]
order_key = "/data/key"
retry = { attempts = 5, backoff = "fixed", initial = "10ms", max = "10ms" }
"#;
    let t = TestServer::start(&config(extra)).await;
    // Key `a`'s first event fails once and asks for a 1.5 s delay.
    t.accept(
        "o",
        &json!({"key": "a", "n": 0, "mode": "fail", "times": 1, "after_ms": 1500}),
    )
    .await;
    let mut last = String::new();
    for n in 1..8 {
        t.accept("o", &json!({"key": "a", "n": n})).await;
        // Key `b` fails now and then, briefly: still in order.
        let mode = if n % 3 == 0 { "fail" } else { "ok" };
        last = t
            .accept("o", &json!({"key": "b", "n": n, "mode": mode, "times": 1}))
            .await;
    }
    t.settled(&last).await;
    let b = wait_for("key b", || async {
        let v = t.kv("flaky", "seen/b").await?;
        let list: Vec<u64> = serde_json::from_str(&v).ok()?;
        (list.len() == 7).then_some(list)
    })
    .await;
    assert_eq!(b, (1..8).collect::<Vec<_>>());
    // Key `b` is done while `a` still waits for its first event's retry.
    assert_eq!(t.kv("flaky", "seen/a").await, None);
    let a = wait_for("key a", || async {
        let v = t.kv("flaky", "seen/a").await?;
        let list: Vec<u64> = serde_json::from_str(&v).ok()?;
        (list.len() == 8).then_some(list)
    })
    .await;
    assert_eq!(a, (0..8).collect::<Vec<_>>());
    t.stop().await;
}

/// `concurrency = 1`: no two deliveries of the route overlap in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_concurrency_limit_holds() {
    let extra = r#"
[[sources]]
name = "c"

[[routes]]
name = "one-at-a-time"
match = { source = ["c"] }
to = ["flaky"]
concurrency = 1
"#;
    let t = TestServer::start(&config(extra)).await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(t.accept("c", &json!({"mode": "sleep", "ms": 60})).await);
    }
    let mut spans = Vec::new();
    for id in &ids {
        let tl = t.settled(id).await;
        let a = &tl["deliveries"][0]["attempts"][0];
        let start = humantime::parse_rfc3339_weak(a["at"].as_str().unwrap()).unwrap();
        let micros = (a["duration_ms"].as_f64().unwrap() * 1000.0) as u64;
        spans.push((start, start + std::time::Duration::from_micros(micros)));
    }
    spans.sort();
    for w in spans.windows(2) {
        // Attempt times are kept in milliseconds: allow that much rounding.
        let slack = std::time::Duration::from_millis(1);
        assert!(w[1].0 + slack >= w[0].1, "deliveries overlapped: {spans:?}");
    }
    t.stop().await;
}

/// Runs the `switchyard` binary against the test server; returns exit code,
/// stdout and stderr.
async fn cli(t: &TestServer, args: &[&str]) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"));
    cmd.args(args).args(["--server", &t.base]);
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run switchyard"))
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lists_shows_and_redrives_dead_letters_and_replays() {
    let t = TestServer::start(&config("")).await;
    let dead = t.accept("s", &json!({"mode": "reject"})).await;
    let ok = t.accept("s", &json!({"n": 1})).await;
    t.settled(&dead).await;
    t.settled(&ok).await;

    let (code, out, err) = cli(&t, &["dlq", "list"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&dead) && out.contains("main → flaky"), "{out}");
    assert!(
        out.contains("rejected: flaky: rejected on purpose"),
        "{out}"
    );
    assert!(err.contains("1 dead letter(s)"), "{err}");
    let id = out.split_whitespace().next().unwrap().to_string();

    let (code, out, err) = cli(&t, &["dlq", "show", &id]).await;
    assert_eq!(code, 0, "{err}");
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["event_id"], dead.as_str());

    let (code, _, err) = cli(&t, &["dlq", "show", "9-9"]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("404") && err.contains("not a dead letter"),
        "{err}"
    );

    // Redriven to the same rejecting plugin: dead again, with two attempts.
    let (code, out, err) = cli(&t, &["dlq", "redrive", "--route", "main"]).await;
    assert_eq!((code, out.trim()), (0, "redriven: 1"), "{err}");
    wait_for("the redriven letter to die again", || async {
        let tl = t.event(&dead).await;
        (attempts(&tl["deliveries"][0]) == 2 && tl["status"] == "dead").then_some(())
    })
    .await;

    // A replay of the last hour into `main`: two events, one rejected again,
    // so the command reports it and exits 1.
    let (code, out, err) = cli(&t, &["replay", "--since", "1h", "--route", "main"]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("2 events, 2 deliveries: 1 delivered, 1 dead"),
        "{out}"
    );
    assert!(err.contains("switchyard dlq list"), "{err}");
    let (code, _, err) = cli(&t, &["replay", "--since", "last week"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("neither an RFC 3339 time"), "{err}");
    t.stop().await;
}

/// Past `retention`, delivered events are compacted away; a dead letter keeps
/// its event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_past_retention_are_compacted_but_dead_letters_stay() {
    let cfg = config("").replace(
        "build_dir = \"BUILD\"",
        "build_dir = \"BUILD\"\nretention = \"1s\"",
    );
    let t = TestServer::start(&cfg).await;
    let done = t.accept("s", &json!({})).await;
    let dead = t.accept("s", &json!({"mode": "reject"})).await;
    t.settled(&done).await;
    t.settled(&dead).await;
    wait_for("compaction", || async {
        let (status, _) = t.get(&format!("/api/events/{done}")).await;
        (status == 404).then_some(())
    })
    .await;
    assert_eq!(t.event(&dead).await["status"], "dead");
    let stats = t.journal().stats().unwrap();
    assert_eq!((stats.events, stats.deliveries, stats.dead), (1, 1, 1));
    t.stop().await;
}
