//! Outbound HTTP from plugins (`wasi:http`), end to end: the `webhook-relay`
//! plugin POSTs each event to a real HTTP server on loopback, and the router
//! lets through only hosts in the plugin's `allow_http`, within its
//! `http_timeout`.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use common::{TestServer, plugin_crate};
use serde_json::{Value, json};

/// A request the loopback server received.
#[derive(Debug, Clone)]
struct Received {
    path: &'static str,
    headers: HeaderMap,
    body: Bytes,
}

#[derive(Default)]
struct Sink {
    received: Mutex<Vec<Received>>,
}

impl Sink {
    fn all(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    fn record(&self, path: &'static str, headers: HeaderMap, body: Bytes) -> usize {
        let mut received = self.received.lock().unwrap();
        received.push(Received {
            path,
            headers,
            body,
        });
        received.iter().filter(|r| r.path == path).count()
    }
}

/// `/hook` answers 204; `/slow` never answers its first request, and 204 to
/// the later ones.
async fn receiver() -> (SocketAddr, Arc<Sink>) {
    async fn hook(State(sink): State<Arc<Sink>>, headers: HeaderMap, body: Bytes) -> StatusCode {
        sink.record("/hook", headers, body);
        StatusCode::NO_CONTENT
    }
    async fn slow(State(sink): State<Arc<Sink>>, headers: HeaderMap, body: Bytes) -> StatusCode {
        if sink.record("/slow", headers, body) == 1 {
            std::future::pending::<()>().await;
        }
        StatusCode::NO_CONTENT
    }
    let sink = Arc::new(Sink::default());
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .route("/slow", axum::routing::post(slow))
        .with_state(sink.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, sink)
}

/// One `webhook-relay` plugin per case, each behind a route taking the
/// events whose `to` names it.
fn config(addr: SocketAddr) -> String {
    let relay = plugin_crate("webhook-relay");
    let port = addr.port();
    let plugin = |name: &str, path: &str, extra: &str| {
        format!(
            r#"
[[plugins]]
name = "{name}"
wasm = "{relay}"
config = {{ url = "http://{addr}{path}" }}
{extra}

[[routes]]
name = "{name}"
match = {{ type = ["{name}"] }}
to = ["{name}"]
retry = {{ attempts = 3, backoff = "fixed", initial = "20ms", max = "20ms" }}
"#
        )
    };
    [
        "[server]\ndata_dir = \"DATA\"\nbuild_dir = \"BUILD\"\n\n[[sources]]\nname = \"s\"\ntype_pointer = \"/to\"\n".to_string(),
        plugin("allowed", "/hook", &format!(r#"allow_http = ["127.0.0.1:{port}"]"#)),
        // Another host, and the right one without a port: port 80 only.
        plugin(
            "other-host",
            "/hook",
            r#"allow_http = ["hooks.example.com", "127.0.0.1"]"#,
        ),
        plugin("no-allow-list", "/hook", ""),
        plugin(
            "slow",
            "/slow",
            &format!(
                "allow_http = [\"127.0.0.1:{port}\"]\ntimeout = \"10s\"\nhttp_timeout = \"300ms\""
            ),
        ),
    ]
    .concat()
}

fn attempt_errors(timeline: &Value) -> Vec<String> {
    timeline["deliveries"][0]["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["error"].as_str().unwrap_or("").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_reach_only_the_hosts_they_are_allowed_within_their_timeout() {
    let (addr, sink) = receiver().await;
    let t = TestServer::start(&config(addr)).await;
    // The admin API shows each plugin's allow list and timeout.
    let plugins = t.get_json("/api/plugins").await;
    let slow = plugins["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["http_timeout"] == "300ms")
        .unwrap_or_else(|| panic!("{plugins}"));
    assert_eq!(
        slow["allow_http"],
        json!([format!("127.0.0.1:{}", addr.port())])
    );

    // Allowed: the request arrives with the event's data as its body and
    // the envelope in ce-* headers; the delivery succeeds.
    let data = json!({"to": "allowed", "order": 7, "note": "héllo"});
    let id = t.accept("s", &data).await;
    let tl = t.settled(&id).await;
    assert_eq!(tl["deliveries"][0]["status"], "delivered", "{tl}");
    let got = sink.all();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].path, "/hook");
    assert_eq!(serde_json::from_slice::<Value>(&got[0].body).unwrap(), data);
    assert_eq!(got[0].headers["content-type"], "application/json");
    assert_eq!(got[0].headers["ce-id"], id.as_str());
    assert_eq!(got[0].headers["ce-type"], "allowed");
    assert_eq!(got[0].headers["ce-source"], "s");

    // Not in allow_http (another host; this host but not this port), or no
    // allow_http at all: refused before connecting, dead-lettered at once
    // with the reason, and the server sees nothing.
    for (plugin, host_text) in [
        ("other-host", format!("POST http://{addr}/hook")),
        ("no-allow-list", format!("POST http://{addr}/hook")),
    ] {
        let id = t.accept("s", &json!({"to": plugin})).await;
        let tl = t.settled(&id).await;
        let d = &tl["deliveries"][0];
        assert_eq!(d["status"], "dead", "{tl}");
        assert_eq!(
            attempt_errors(&tl),
            [format!(
                "rejected: http: {host_text}: refused, the host is not allowed (not in the plugin's allow_http)"
            )],
            "{plugin}"
        );
    }
    assert_eq!(sink.all().len(), 1, "refused requests must not arrive");

    // A server slower than http_timeout: the attempt fails as retryable,
    // saying it timed out; the next attempt gets its answer.
    let id = t.accept("s", &json!({"to": "slow"})).await;
    let tl = t.settled(&id).await;
    assert_eq!(tl["deliveries"][0]["status"], "delivered", "{tl}");
    let errors = attempt_errors(&tl);
    assert_eq!(errors.len(), 2, "{tl}");
    assert_eq!(
        errors[0],
        format!(
            "plugin asked to retry (last HTTP failure: POST http://{addr}/slow: timed out waiting for the response (http_timeout 300ms))"
        )
    );
    assert_eq!(errors[1], "");
    let slow: Vec<_> = sink
        .all()
        .into_iter()
        .filter(|r| r.path == "/slow")
        .collect();
    assert_eq!(slow.len(), 2);

    // Counted by plugin and outcome.
    let metrics = t.get("/metrics").await.1;
    for (plugin, outcome, n) in [
        ("allowed", "ok", 1),
        ("other-host", "denied", 1),
        ("no-allow-list", "denied", 1),
        ("slow", "timeout", 1),
        ("slow", "ok", 1),
    ] {
        let series = format!(
            r#"switchyard_plugin_http_requests_total{{plugin="{plugin}",outcome="{outcome}"}} {n}"#
        );
        assert!(
            metrics.lines().any(|l| l == series),
            "missing {series} in:\n{metrics}"
        );
    }
    t.stop().await;
}
