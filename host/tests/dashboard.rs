//! The dashboard in a real browser: headless Chromium (Debian's `chromium`),
//! driven by playwright-core (`host/tests/dashboard/drive.mjs`), opens the
//! overview, finds a dead-lettered event among the dead letters, clicks its
//! Redrive button, and sees the delivery delivered on the event's timeline.
//! `UPDATE_SCREENSHOTS=1` writes a screenshot of each page into `docs/`.

mod common;

use std::path::Path;
use std::process::Command;

use common::{TestServer, plugin_crate, repo};
use serde_json::json;

/// The route's plugin `handler` runs `wasm`: first the `flaky` plugin, which
/// fails as told; then, "fixed", `audit`, which takes everything.
fn config(wasm: &str) -> String {
    format!(
        r#"
[server]
data_dir = "DATA"
build_dir = "BUILD"

[[sources]]
name = "orders"
type_pointer = "/type"

[[plugins]]
name = "handler"
wasm = "{wasm}"

[[routes]]
name = "main"
match = {{ source = ["orders"] }}
to = ["handler"]
retry = {{ attempts = 1 }}
"#,
        wasm = plugin_crate(wasm),
    )
}

/// Installs playwright-core once (the npm registry), if it is not yet.
fn driver_dir() -> std::path::PathBuf {
    let dir = repo().join("host/tests/dashboard");
    if !dir.join("node_modules/playwright-core").is_dir() {
        let out = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .output()
            .expect("npm (Node.js) is needed to drive the dashboard test");
        assert!(
            out.status.success(),
            "npm ci failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_redriven_from_the_dashboard_in_a_browser() {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "{chromium} not found: install Debian's chromium (`apt-get install chromium`; .ci/run does) or set CHROMIUM"
    );
    let driver = driver_dir();
    let t = TestServer::start(&config("flaky")).await;
    // A few that succeed, and one that fails: with one attempt, it is dead.
    for i in 0..3 {
        t.accept("orders", &json!({"type": "order.created", "n": i}))
            .await;
    }
    let dead = t
        .accept("orders", &json!({"type": "order.paid", "mode": "fail"}))
        .await;
    assert_eq!(t.settled(&dead).await["deliveries"][0]["status"], "dead");
    // The plugin is fixed and deployed; the redrive goes to it as it is now.
    t.reconfigure(&config("audit")).await;

    let base = t.base.clone();
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(driver.join("drive.mjs"))
        .arg(&base)
        .arg(&dead)
        .env("CHROMIUM", &chromium);
    if std::env::var_os("UPDATE_SCREENSHOTS").is_some() {
        cmd.arg(repo().join("docs"));
    }
    let out = cmd.output().await.expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the browser run failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(r#""ok":true"#), "{stdout}");

    // What the browser saw is what the server did.
    let tl = t.settled(&dead).await;
    let d = &tl["deliveries"][0];
    assert_eq!(d["status"], "delivered", "{tl}");
    assert_eq!(d["attempts"].as_array().unwrap().len(), 2);
    assert!(
        d["redriven_at"].is_array() || d["redriven_at"].is_string(),
        "{tl}"
    );
}
