//! Traces: a request's W3C `traceparent` follows its event through ingest,
//! matching, the journal and the delivery, whose plugin log lines are span
//! events; the spans reach an OTLP/HTTP collector (a real one in miniature
//! here: it decodes the protobuf requests the server sends), and the trace id
//! is kept with the event and shown in its timeline.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use common::{build_dir, plugin_crate, wait_for};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use serde_json::{Value, json};

#[derive(Debug, Clone)]
struct Span {
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    events: Vec<String>,
}

/// An OTLP/HTTP trace receiver on loopback; returns its base URL.
async fn collector(spans: Arc<Mutex<Vec<Span>>>) -> String {
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let spans = spans.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                let mut out = spans.lock().unwrap();
                for rs in req.resource_spans {
                    for ss in rs.scope_spans {
                        for s in ss.spans {
                            out.push(Span {
                                name: s.name,
                                trace_id: hex::encode(s.trace_id),
                                span_id: hex::encode(s.span_id),
                                parent: hex::encode(s.parent_span_id),
                                events: s.events.into_iter().map(|e| e.name).collect(),
                            });
                        }
                    }
                }
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traceparent_follows_the_event_to_its_delivery_and_is_exported() {
    let spans = Arc::new(Mutex::new(Vec::new()));
    let endpoint = collector(spans.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("rules.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
data_dir = "{data}"
build_dir = "{build}"

[telemetry]
otlp_endpoint = "{endpoint}"
service_name = "switchyard-test"

[[sources]]
name = "s"
type_pointer = "/t"

[[plugins]]
name = "audit"
wasm = "{audit}"

[[routes]]
name = "all"
to = ["audit"]
"#,
            data = dir.path().join("data").display(),
            build = build_dir(),
            audit = plugin_crate("audit"),
        ),
    )
    .unwrap();
    let log = dir.path().join("log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info,plugin=info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let base = line
        .trim()
        .strip_prefix("switchyard listening on ")
        .unwrap_or_else(|| {
            panic!(
                "{line}\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        })
        .to_string();

    let client = reqwest::Client::new();
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let caller_span = "b7ad6b7169203331";
    let answer: Value = client
        .post(format!("{base}/webhooks/s"))
        .header("traceparent", format!("00-{trace}-{caller_span}-01"))
        .json(&json!({"t": "order.created"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = answer["id"].as_str().expect("id").to_string();
    // A request without one starts a trace of its own.
    let other: Value = client
        .post(format!("{base}/webhooks/s"))
        .json(&json!({"t": "x"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let other = other["id"].as_str().unwrap().to_string();

    let timeline = wait_for("the delivery", || async {
        let t: Value = client
            .get(format!("{base}/api/events/{id}"))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (t["status"] == "delivered").then_some(t)
    })
    .await;
    assert_eq!(timeline["trace_id"], trace, "{timeline}");
    let tp = timeline["event"]["traceparent"].as_str().unwrap();
    assert!(tp.starts_with(&format!("00-{trace}-")), "{tp}");
    let other_tl: Value = client
        .get(format!("{base}/api/events/{other}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let other_trace = other_tl["trace_id"].as_str().expect("a new trace");
    assert_eq!(other_trace.len(), 32);
    assert_ne!(other_trace, trace);

    // A graceful stop flushes the spans still buffered.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    // The plugin's log line names the trace (its delivery span's field).
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(
        log_text.lines().any(|l| l.contains("plugin")
            && l.contains(&format!("trace_id={trace}"))
            && l.contains(&id)),
        "no plugin log line with trace_id={trace}:\n{log_text}"
    );

    let spans = spans.lock().unwrap().clone();
    let ours: Vec<&Span> = spans.iter().filter(|s| s.trace_id == trace).collect();
    let find = |name: &str| {
        ours.iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no `{name}` span in trace {trace}: {spans:#?}"))
    };
    let ingest = find("ingest");
    assert_eq!(ingest.parent, caller_span, "a child of the caller's span");
    assert_eq!(find("match").parent, ingest.span_id);
    assert_eq!(find("journal.append").parent, ingest.span_id);
    let deliver = find("deliver");
    assert_eq!(
        deliver.parent, ingest.span_id,
        "deliveries follow the event's trace"
    );
    assert!(
        !deliver.events.is_empty(),
        "the plugin's log line is an event of its delivery span: {deliver:?}"
    );
    assert!(
        spans
            .iter()
            .any(|s| s.trace_id == other_trace && s.name == "deliver"),
        "the other event's delivery is in its own trace"
    );
}
