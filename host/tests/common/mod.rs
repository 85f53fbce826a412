//! Shared by the integration tests: start a real server on an ephemeral
//! loopback port with a temp data dir, post real HTTP, wait for effects.
#![allow(dead_code)]

pub mod nats;
pub mod workload;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use switchyard::Server;

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ has a parent")
        .to_path_buf()
}

/// The plugin crate `plugins/<name>`.
pub fn plugin_crate(name: &str) -> String {
    repo().join("plugins").join(name).display().to_string()
}

/// One cargo target dir for every test's plugin builds, so that each plugin is
/// compiled once per test run, not once per test.
pub fn build_dir() -> String {
    repo()
        .join("target")
        .join("test-plugins")
        .display()
        .to_string()
}

/// A fixture component whose `handle` runs `body` (see fixtures/consumer.wat.in),
/// written as a .wasm file into `dir`.
pub fn fixture(dir: &Path, name: &str, body: &str) -> String {
    let template = include_str!("../fixtures/consumer.wat.in");
    let text = template.replace("{{BODY}}", body);
    let bytes = wat::parse_str(&text).expect("fixture compiles");
    let path = dir.join(format!("{name}.wasm"));
    std::fs::write(&path, bytes).expect("write fixture");
    path.display().to_string()
}

/// `handle` never returns.
pub const LOOP: &str = "(loop $l (br $l)) (unreachable)";
/// `handle` traps.
pub const TRAP: &str = "(unreachable)";
/// `handle` returns `err(retry(none))`.
pub const RETRY: &str = "(i32.store8 (i32.const 1024) (i32.const 1)) (i32.const 1024)";

/// A server started from a config text (with `DATA` and `BUILD` replaced by a
/// temp data dir and the shared plugin build dir).
pub struct TestServer {
    pub server: Option<Server>,
    pub base: String,
    pub client: reqwest::Client,
    pub dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start(config: &str) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(dir, config).await
    }

    pub async fn start_in(dir: tempfile::TempDir, config: &str) -> TestServer {
        let text = config
            .replace("DATA", &dir.path().join("data").display().to_string())
            .replace("BUILD", &build_dir());
        let file = dir.path().join("rules.toml");
        std::fs::write(&file, &text).expect("write config");
        let config = switchyard::config::load(&file).unwrap_or_else(|e| panic!("{e}"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let server = Server::start_on(config, listener)
            .await
            .unwrap_or_else(|e| panic!("server start: {e}"));
        let base = format!("http://{}", server.addr());
        TestServer {
            server: Some(server),
            base,
            client: reqwest::Client::new(),
            dir,
        }
    }

    /// Replaces the config file (with `DATA` and `BUILD` replaced) and reloads.
    pub async fn reconfigure(&self, config: &str) {
        let text = config
            .replace("DATA", &self.dir.path().join("data").display().to_string())
            .replace("BUILD", &build_dir());
        std::fs::write(self.dir.path().join("rules.toml"), text).expect("write config");
        self.server
            .as_ref()
            .expect("running")
            .reload()
            .await
            .unwrap_or_else(|e| panic!("reload: {e}"));
    }

    /// Redrives one dead letter through the API, expecting it to be taken.
    pub async fn redrive_one(&self, dead_id: &str) {
        let (status, answer) = self
            .post_api(
                &format!("/api/dlq/{dead_id}/redrive"),
                &serde_json::json!({}),
            )
            .await;
        assert_eq!(
            (status, answer["redriven"].as_u64()),
            (202, Some(1)),
            "{answer}"
        );
    }

    /// Posts JSON to a path; returns status and body.
    pub async fn post_api(&self, path: &str, body: &Value) -> (u16, Value) {
        let resp = self
            .client
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .expect("post");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// GETs an admin path as JSON, expecting 200.
    pub async fn get_json(&self, path: &str) -> Value {
        let (status, body) = self.get(path).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).expect("json")
    }

    pub fn journal(&self) -> &switchyard::journal::Journal {
        self.server
            .as_ref()
            .expect("running")
            .journal()
            .expect("the embedded engine")
    }

    /// Posts a JSON body to `/webhooks/{source}`; returns status and body.
    pub async fn post(&self, source: &str, body: &Value) -> (u16, Value) {
        self.post_api(&format!("/webhooks/{source}"), body).await
    }

    /// Posts and expects 202; returns the event id.
    pub async fn accept(&self, source: &str, body: &Value) -> String {
        let (status, answer) = self.post(source, body).await;
        assert_eq!(status, 202, "{answer}");
        answer["id"].as_str().expect("id").to_string()
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let resp = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("get");
        (resp.status().as_u16(), resp.text().await.expect("body"))
    }

    pub async fn kv(&self, plugin: &str, key: &str) -> Option<String> {
        let (status, body) = self.get(&format!("/api/plugins/{plugin}/kv/{key}")).await;
        (status == 200).then_some(body)
    }

    pub async fn event(&self, id: &str) -> Value {
        let (status, body) = self.get(&format!("/api/events/{id}")).await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("json")
    }

    /// Waits until every delivery of the event is final; returns the timeline.
    pub async fn settled(&self, id: &str) -> Value {
        wait_for(&format!("deliveries of {id} to finish"), || async {
            let t = self.event(id).await;
            let done = t["deliveries"].as_array().is_some_and(|ds| {
                ds.iter()
                    .all(|d| d["status"] == "delivered" || d["status"] == "dead")
            });
            done.then_some(t)
        })
        .await
    }

    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
        self.dir
    }
}

/// Polls `check` until it yields a value (at most 60 s).
pub async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
