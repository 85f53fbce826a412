//! One hostile plugin hurts nobody else. `plugins/hostile` attacks its host
//! in the way its event's type says (infinite loop, unbounded memory or
//! recursion, panic, trap, floods of log, stdout, kv writes and emits, CPU burn under
//! a fuel budget). For every attack, on a real server: `/healthz` answers
//! throughout, a well-behaved route posted at the same time is delivered, and
//! the hostile delivery ends as it should, dead with an error that says why
//! (or, for the floods the host caps, delivered), counted in
//! `switchyard_plugin_limit_hits_total`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{TestServer, plugin_crate};
use serde_json::{Value, json};

fn config() -> String {
    format!(
        r#"
[server]
data_dir = "DATA"
build_dir = "BUILD"

[[sources]]
name = "attack"
type_pointer = "/type"

[[sources]]
name = "calm"
type_pointer = "/type"

# One plugin, three sets of limits, so that each attack meets the limit it
# is about and never races another (a flood must not lose to the deadline
# on a busy machine).
[[plugins]]
name = "hostile"
wasm = "{hostile}"
timeout = "200ms"

[[plugins]]
name = "hostile-fuel"
wasm = "{hostile}"
timeout = "30s"
fuel = 50_000_000

[[plugins]]
name = "hostile-patient"
wasm = "{hostile}"
timeout = "30s"
memory = "16MiB"
kv_quota = "1MiB"

# The default quota (64 MiB): a flood meets the cap on one delivery's output.
[[plugins]]
name = "hostile-roomy"
wasm = "{hostile}"
timeout = "30s"

[[plugins]]
name = "audit"
wasm = "{audit}"

[[routes]]
name = "deadline"
match = {{ source = ["attack"], type = ["loop"] }}
to = ["hostile"]
retry = {{ attempts = 1 }}

[[routes]]
name = "fuel"
match = {{ source = ["attack"], type = ["fuel"] }}
to = ["hostile-fuel"]
retry = {{ attempts = 1 }}

[[routes]]
name = "hostile"
match = {{ source = ["attack"], type = [{{ anything-but = ["loop", "fuel", "kv-flood-large"] }}] }}
to = ["hostile-patient"]
retry = {{ attempts = 1 }}

[[routes]]
name = "roomy"
match = {{ source = ["attack"], type = ["kv-flood-large"] }}
to = ["hostile-roomy"]
retry = {{ attempts = 1 }}

[[routes]]
name = "calm"
match = {{ source = ["calm"] }}
to = ["audit"]
"#,
        hostile = plugin_crate("hostile"),
        audit = plugin_crate("audit"),
    )
}

/// How a hostile delivery must end.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Dead, and its error starts with this.
    Dead(&'static str),
    /// Dead, and its error contains both.
    DeadWith(&'static str, &'static str),
    /// Delivered: the host capped what it did, and it went on.
    Delivered,
}

/// Each attack: the event type (the plugin's mode), extra event data, the
/// outcome, and the `limit` label it must have counted, if any.
const ATTACKS: &[(&str, &str, Expect, Option<&str>)] = &[
    (
        "loop",
        "{}",
        Expect::Dead("deadline of 200ms exceeded; gave up after 1 attempts"),
        Some("deadline"),
    ),
    (
        "fuel",
        "{}",
        Expect::Dead("fuel limit of 50000000 exhausted; gave up after 1 attempts"),
        Some("fuel"),
    ),
    (
        "alloc",
        "{}",
        Expect::Dead("memory limit 16 MiB reached; gave up after 1 attempts"),
        Some("memory"),
    ),
    (
        "recurse",
        "{}",
        Expect::Dead("stack overflow; gave up after 1 attempts"),
        Some("stack"),
    ),
    (
        "panic",
        "{}",
        Expect::DeadWith("trap: unreachable executed", "hostile: panic on purpose"),
        None,
    ),
    (
        "trap",
        "{}",
        Expect::Dead("trap: unreachable executed; gave up after 1 attempts"),
        None,
    ),
    ("log-flood", "{}", Expect::Delivered, Some("log")),
    ("print-flood", "{}", Expect::Delivered, Some("stdio")),
    (
        "kv-flood",
        r#"{"value_bytes": 65536}"#,
        Expect::DeadWith(
            "rejected: kv: invalid key or value: ",
            "kv quota of 1 MiB reached",
        ),
        Some("kv"),
    ),
    (
        "kv-flood-large",
        r#"{"value_bytes": 1048576}"#,
        Expect::DeadWith(
            "rejected: kv: invalid key or value: ",
            "one delivery may store at most 4 MiB of kv writes and emitted events together",
        ),
        Some("kv"),
    ),
    (
        "emit-storm",
        "{}",
        Expect::DeadWith(
            "rejected: emit: emit refused",
            "more than 100 events from one delivery",
        ),
        Some("emit"),
    ),
    (
        "emit-flood",
        "{}",
        Expect::DeadWith(
            "rejected: emit: emit refused",
            "one delivery may store at most 4 MiB of kv writes and emitted events together",
        ),
        Some("emit"),
    ),
    (
        "reject-flood",
        "{}",
        Expect::DeadWith("rejected: hostile: rrrr", "… (4194313 bytes, cut)"),
        None,
    ),
];

/// Polls `/healthz` until stopped; counts answers and anything but a 200.
struct HealthPoller {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl HealthPoller {
    fn start(base: &str) -> HealthPoller {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicUsize::new(0));
        let url = format!("{base}/healthz");
        let (s, a) = (stop.clone(), answered.clone());
        let task = tokio::spawn(async move {
            // Its own client, so it never waits behind the test's requests;
            // a hung server fails the test instead of hanging it.
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("client");
            let mut failures = Vec::new();
            while !s.load(Ordering::Relaxed) {
                match client.get(&url).send().await {
                    Ok(r) if r.status().is_success() => {}
                    Ok(r) => failures.push(format!("status {}", r.status())),
                    Err(e) => failures.push(e.to_string()),
                }
                a.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            failures
        });
        HealthPoller {
            stop,
            answered,
            task,
        }
    }

    /// Stops polling; returns how many polls there were and the failures.
    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let failures = self.task.await.expect("poller");
        (self.answered.load(Ordering::Relaxed), failures)
    }
}

/// The only delivery of event `id`'s timeline.
fn only_delivery(timeline: &Value) -> &Value {
    let deliveries = timeline["deliveries"].as_array().expect("deliveries");
    assert_eq!(deliveries.len(), 1, "{timeline}");
    &deliveries[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_attack_fails_only_its_own_delivery() {
    let t = TestServer::start(&config()).await;
    let health = HealthPoller::start(&t.base);

    // Every attack at once, each with a well-behaved event posted alongside.
    let posted = futures_util::future::join_all(ATTACKS.iter().map(|(mode, data, _, _)| {
        let t = &t;
        async move {
            let mut body: Value = serde_json::from_str(data).expect("data");
            body["type"] = json!(mode);
            let calm = json!({"type": format!("calm.{mode}")});
            let (hostile, calm) = tokio::join!(t.accept("attack", &body), t.accept("calm", &calm));
            (hostile, calm)
        }
    }))
    .await;
    let settled = futures_util::future::join_all(posted.iter().map(|(hostile, calm)| {
        let t = &t;
        async move { (t.settled(hostile).await, t.settled(calm).await) }
    }))
    .await;
    let (polls, failures) = health.finish().await;

    assert!(polls > 0, "/healthz was polled");
    assert!(
        failures.is_empty(),
        "/healthz failed {} of {polls} times: {failures:?}",
        failures.len()
    );
    for ((mode, _, expect, _), ((hostile_tl, calm_tl), (_, calm_id))) in
        ATTACKS.iter().zip(settled.iter().zip(&posted))
    {
        // The well-behaved route was delivered, and its plugin did its work.
        let calm = only_delivery(calm_tl);
        assert_eq!(calm["status"], "delivered", "calm beside {mode}: {calm_tl}");
        assert_eq!(
            t.kv("audit", calm_id).await.as_deref(),
            Some(format!("calm.{mode}").as_str()),
        );

        let d = only_delivery(hostile_tl);
        let error = d["attempts"][0]["error"].as_str().unwrap_or_default();
        // Whatever the guest said, the text kept for each attempt is short.
        assert!(
            error.len() <= 600,
            "{mode}: an error of {} bytes",
            error.len()
        );
        match expect {
            Expect::Dead(prefix) => {
                assert_eq!(d["status"], "dead", "{mode}: {hostile_tl}");
                assert!(error.starts_with(prefix), "{mode}: {error}");
            }
            Expect::DeadWith(start, middle) => {
                assert_eq!(d["status"], "dead", "{mode}: {hostile_tl}");
                assert!(
                    error.starts_with(start) && error.contains(middle),
                    "{mode}: {error}"
                );
            }
            Expect::Delivered => {
                assert_eq!(d["status"], "delivered", "{mode}: {hostile_tl}");
            }
        }
    }
    // Nothing the flood wrote was kept: a failed delivery leaves no writes.
    assert_eq!(t.kv("hostile-patient", "flood/0").await, None);
    assert_eq!(t.kv("hostile-roomy", "flood/0").await, None);
    // Nor did the storm's emits: only the posted events are stored.
    assert_eq!(
        t.journal().stats().unwrap().events,
        2 * ATTACKS.len() as u64,
        "a dead delivery's emitted events are not stored"
    );

    // Each limit hit was counted, per plugin and limit.
    let (status, metrics) = t.get("/metrics").await;
    assert_eq!(status, 200);
    for (mode, _, _, limit) in ATTACKS {
        let Some(limit) = limit else { continue };
        let plugin = match *mode {
            "loop" => "hostile",
            "fuel" => "hostile-fuel",
            "kv-flood-large" => "hostile-roomy",
            _ => "hostile-patient",
        };
        let series =
            format!(r#"switchyard_plugin_limit_hits_total{{plugin="{plugin}",limit="{limit}"}}"#);
        assert!(
            metrics.contains(&series),
            "{mode}: no {series} in:\n{metrics}"
        );
    }

    // The host is still fine: a new well-behaved event goes through.
    let id = t.accept("calm", &json!({"type": "after"})).await;
    assert_eq!(only_delivery(&t.settled(&id).await)["status"], "delivered");
    t.stop().await;
}

/// `fuel`, `max_instances` and `max_tables` are checked like every other key:
/// each problem with its line, column and key.
#[test]
fn plugin_limits_are_validated_with_line_and_key() {
    let text = format!(
        r#"[[plugins]]
name = "p"
wasm = "{audit}"
fuel = 0
max_instances = 0
max_tables = 5000

[[plugins]]
name = "q"
wasm = "{audit}"
fuel = 1_000_000
max_instances = 4
max_tables = 2
"#,
        audit = plugin_crate("audit"),
    );
    let err = switchyard::config::parse(std::path::Path::new("rules.toml"), &text)
        .expect_err("invalid limits");
    assert_eq!(
        err.to_string(),
        "rules.toml:4:8: `fuel` must be at least 1 (leave it out for no fuel metering) (key `plugins[0].fuel`)\n\
         rules.toml:5:17: `max_instances` must be between 1 and 1000 (key `plugins[0].max_instances`)\n\
         rules.toml:6:14: `max_tables` must be between 1 and 1000 (key `plugins[0].max_tables`)"
    );
    // Without the first plugin the file is valid, and the limits are read.
    let valid = text.split_once("\n\n").expect("two plugins").1;
    let config =
        switchyard::config::parse(std::path::Path::new("rules.toml"), valid).expect("valid");
    let limits = config.plugins["q"].limits;
    assert_eq!(limits.fuel, Some(1_000_000));
    assert_eq!((limits.max_instances, limits.max_tables), (4, 2));
}
