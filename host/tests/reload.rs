//! Hot reload: a changed rules.toml is swapped in while the server runs; a
//! broken one keeps the rules in force and says why.

mod common;

use common::{TestServer, plugin_crate, wait_for};
use serde_json::{Value, json};

fn config(routes: &str) -> String {
    format!(
        r#"
[server]
data_dir = "DATA"
build_dir = "BUILD"

[[sources]]
name = "s"
type_pointer = "/t"

[[plugins]]
name = "audit"
wasm = "{audit}"

{routes}
"#,
        audit = plugin_crate("audit"),
    )
}

async fn route_names(t: &TestServer) -> (Vec<String>, Value) {
    let (_, body) = t.get("/api/routes").await;
    let body: Value = serde_json::from_str(&body).unwrap();
    let names = body["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect();
    (names, body)
}

async fn routes_of(t: &TestServer, id: &str) -> Vec<String> {
    let timeline = t.settled(id).await;
    timeline["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["route"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_file_is_swapped_in_and_a_broken_one_is_refused() {
    let a = "[[routes]]\nname = \"a\"\nmatch = { type = [\"a\"] }\nto = [\"audit\"]\n";
    let t = TestServer::start(&config(a)).await;
    let file = t.dir.path().join("rules.toml");
    let id = t.accept("s", &json!({"t": "b"})).await;
    assert!(routes_of(&t, &id).await.is_empty());

    // Saved the way editors do it: a new file renamed over the old one.
    let b =
        format!("{a}\n[[routes]]\nname = \"b\"\nmatch = {{ type = [\"b\"] }}\nto = [\"audit\"]\n");
    let text = std::fs::read_to_string(&file).unwrap().replace(a, &b);
    let tmp = t.dir.path().join(".rules.toml.swp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    wait_for("the new route", || async {
        (route_names(&t).await.0 == ["a", "b"]).then_some(())
    })
    .await;
    let id = t.accept("s", &json!({"t": "b"})).await;
    assert_eq!(routes_of(&t, &id).await, ["b"]);

    // A broken file: the old rules stay in force and the error is reported.
    let good = std::fs::read_to_string(&file).unwrap();
    std::fs::write(
        &file,
        good.replace(
            "to = [\"audit\"]\n\n[[routes]]",
            "to = [\"nobody\"]\n\n[[routes]]",
        ),
    )
    .unwrap();
    let body = wait_for("the reload error", || async {
        let (_, body) = route_names(&t).await;
        body.get("reload_error").is_some().then_some(body)
    })
    .await;
    let errors = body["reload_error"]["errors"].as_array().unwrap();
    assert!(
        errors
            .iter()
            .any(|e| e.as_str().unwrap().contains("no plugin named `nobody`")
                && e.as_str().unwrap().contains("rules.toml:")),
        "{body}"
    );
    assert_eq!(route_names(&t).await.0, ["a", "b"]);
    let id = t.accept("s", &json!({"t": "a"})).await;
    assert_eq!(routes_of(&t, &id).await, ["a"]);

    // Fixing the file clears the error.
    std::fs::write(&file, &good).unwrap();
    wait_for("the error to clear", || async {
        let (_, body) = route_names(&t).await;
        body.get("reload_error").is_none().then_some(())
    })
    .await;
    t.stop().await;
}

/// A plugin's `.wasm` replaced on disk is swapped in without a restart: the
/// next attempts run the new version, and each attempt records the version
/// (content hash) that ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_plugin_file_is_hot_swapped() {
    let dir = tempfile::tempdir().unwrap();
    let wasm_dir = dir.path().join("wasm");
    std::fs::create_dir(&wasm_dir).unwrap();
    // v1 always asks to be retried; v2 succeeds.
    let v1 = common::fixture(&wasm_dir, "v1", common::RETRY);
    let v2 = common::fixture(&wasm_dir, "v2", "(i32.const 2048)");
    let live = wasm_dir.join("p.wasm");
    std::fs::copy(&v1, &live).unwrap();
    let text = format!(
        r#"
[server]
data_dir = "DATA"
build_dir = "BUILD"

[[sources]]
name = "s"

[[plugins]]
name = "p"
wasm = "{live}"

[[routes]]
name = "r"
to = ["p"]
retry = {{ attempts = 1000, backoff = "fixed", initial = "50ms", max = "50ms" }}
"#,
        live = live.display()
    );
    let t = TestServer::start_in(dir, &text).await;
    let old = plugin_hash(&t).await;
    let id = t.accept("s", &json!({})).await;
    wait_for("a failed attempt on v1", || async {
        let tl = t.event(&id).await;
        (tl["deliveries"][0]["attempts"].as_array()?.len() >= 2).then_some(())
    })
    .await;

    // Deployed the way build tools do it: written beside, renamed over.
    let tmp = wasm_dir.join("p.wasm.new");
    std::fs::copy(&v2, &tmp).unwrap();
    std::fs::rename(&tmp, &live).unwrap();

    let tl = t.settled(&id).await;
    let d = &tl["deliveries"][0];
    assert_eq!(d["status"], "delivered", "{tl}");
    let attempts = d["attempts"].as_array().unwrap();
    let last = attempts.last().unwrap();
    let new = plugin_hash(&t).await;
    assert_ne!(new, old);
    assert_eq!(last["plugin_hash"], new.as_str(), "the new version ran");
    assert_eq!(
        attempts[0]["plugin_hash"],
        old.as_str(),
        "the old one failed"
    );
    let (_, routes) = t.get("/api/routes").await;
    assert!(!routes.contains("\"errors\""), "{routes}");
}

async fn plugin_hash(t: &TestServer) -> String {
    let plugins = t.get_json("/api/plugins").await;
    plugins["plugins"][0]["hash"].as_str().unwrap().to_string()
}
