//! `switchyard new` makes a plugin that passes its own test and runs in the
//! router as created; editing it while the server runs rebuilds and swaps it
//! (what `switchyard dev` relies on), and a broken edit keeps the old version.

mod common;

use std::process::Command;

use common::{TestServer, build_dir, repo, wait_for};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_plugin_builds_passes_its_test_serves_and_hot_swaps_on_save() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["new", "counter", "--dir"])
        .arg(&plugins)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("created plugin crate"), "{stdout}");
    let crate_dir = plugins.join("counter");
    // Pin dependency versions to the workspace's (no resolution over the network).
    std::fs::copy(repo().join("Cargo.lock"), crate_dir.join("Cargo.lock")).unwrap();

    // Its own test passes, natively, without edits.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let test = Command::new(&cargo)
        .args(["test", "--quiet", "--manifest-path"])
        .arg(crate_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(build_dir())
        .output()
        .unwrap();
    assert!(
        test.status.success(),
        "{}{}",
        String::from_utf8_lossy(&test.stdout),
        String::from_utf8_lossy(&test.stderr)
    );

    // And the router builds it for wasm32-wasip2, delivers to it, queries it.
    let readme = std::fs::read_to_string(crate_dir.join("README.md")).unwrap();
    assert!(readme.contains("name = \"counter\""), "{readme}");
    let config = format!(
        r#"
[server]
data_dir = "DATA"
build_dir = "BUILD"

[[sources]]
name = "s"
type_pointer = "/kind"

[[plugins]]
name = "counter"
wasm = "{crate_dir}"

[[routes]]
name = "counter"
to = ["counter"]
"#,
        crate_dir = crate_dir.display()
    );
    let dir_keep = tempfile::tempdir().unwrap();
    let t = TestServer::start_in(dir_keep, &config).await;
    let id = t.accept("s", &json!({"kind": "order.created"})).await;
    assert_eq!(t.settled(&id).await["deliveries"][0]["status"], "delivered");
    let (status, body) = t.get("/query/counter/counts/order.created").await;
    assert_eq!((status, body.as_str()), (200, "1"));

    // Saved with a bug: the build fails, the server says why and keeps the
    // running version.
    let lib = crate_dir.join("src/lib.rs");
    let source = std::fs::read_to_string(&lib).unwrap();
    std::fs::write(
        &lib,
        source.replace("kv::increment(", "kv::increment_typo("),
    )
    .unwrap();
    let errors = wait_for("the failed rebuild to be reported", || async {
        let routes: Value = t.get_json("/api/routes").await;
        routes["reload_error"]["errors"]
            .as_array()
            .filter(|e| !e.is_empty())
            .map(|e| json!(e).to_string())
    })
    .await;
    assert!(errors.contains("increment_typo"), "{errors}");
    let id = t.accept("s", &json!({"kind": "order.created"})).await;
    assert_eq!(t.settled(&id).await["deliveries"][0]["status"], "delivered");

    // Fixed to count by 10: swapped in; the next event counts 10.
    std::fs::write(
        &lib,
        source.replace(
            "kv::increment(&format!(\"count/{}\", event.ty), 1)",
            "kv::increment(&format!(\"count/{}\", event.ty), 10)",
        ),
    )
    .unwrap();
    wait_for("the fixed plugin to be swapped in", || async {
        let routes: Value = t.get_json("/api/routes").await;
        routes
            .get("reload_error")
            .is_none_or(Value::is_null)
            .then_some(())
    })
    .await;
    let id = t.accept("s", &json!({"kind": "order.created"})).await;
    assert_eq!(t.settled(&id).await["deliveries"][0]["status"], "delivered");
    let (_, body) = t.get("/query/counter/counts/order.created").await;
    assert_eq!(body, "12");
}
