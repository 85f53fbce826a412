//! CloudEvents over real HTTP: binary, structured and batch modes reach the
//! plugin with their own attributes; invalid ones are refused and not stored;
//! a repeat of (source, id) is stored once.

mod common;

use common::{TestServer, plugin_crate};
use serde_json::{Value, json};

fn config() -> String {
    format!(
        r#"
[server]
data_dir = "DATA"
build_dir = "BUILD"

[[sources]]
name = "ce"

[[sources]]
name = "forms"
type_header = "X-Kind"
content_types = ["application/x-www-form-urlencoded"]

[[plugins]]
name = "audit"
wasm = "{audit}"

[[routes]]
name = "pulls"
match = {{ source = ["https://github.com/cloudevents/spec/pull"], type = [{{ prefix = "com.github." }}] }}
to = ["audit"]

[[routes]]
name = "orders"
match = {{ type = ["order.created"], data = {{ total = [{{ numeric = [">", 10] }}] }} }}
to = ["audit"]
"#,
        audit = plugin_crate("audit"),
    )
}

async fn send(t: &TestServer, headers: &[(&str, &str)], body: &str) -> (u16, Value) {
    let mut req = t
        .client
        .post(format!("{}/webhooks/ce", t.base))
        .body(body.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.expect("post");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_structured_and_batch_modes_are_accepted_and_routed() {
    let t = TestServer::start(&config()).await;

    // Binary mode: the spec's example, with an XML body.
    let binary = [
        ("ce-specversion", "1.0"),
        ("ce-id", "A234-1234-1234"),
        ("ce-source", "https://github.com/cloudevents/spec/pull"),
        ("ce-type", "com.github.pull_request.opened"),
        ("ce-subject", "123"),
        ("ce-comexampleextension1", "value"),
        ("content-type", "text/xml"),
    ];
    let (status, answer) = send(&t, &binary, "<much wow=\"xml\"/>").await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["id"], "A234-1234-1234");
    assert_eq!(answer["routes"], json!(["pulls"]));
    let tl = t.settled("A234-1234-1234").await;
    let e = &tl["event"];
    assert_eq!(e["source"], "https://github.com/cloudevents/spec/pull");
    assert_eq!(e["subject"], "123");
    assert_eq!(e["comexampleextension1"], "value");
    assert_eq!(e["webhook"], "ce");
    assert_eq!(e["datacontenttype"], "text/xml");
    assert_eq!(tl["deliveries"][0]["status"], "delivered");
    assert_eq!(
        t.kv("audit", "A234-1234-1234").await.as_deref(),
        Some("com.github.pull_request.opened")
    );
    // The same (source, id) again: the same event, stored once.
    let (status, again) = send(&t, &binary, "<much wow=\"xml\"/>").await;
    assert_eq!((status, again["duplicate"].as_bool()), (202, Some(true)));

    // Structured mode, JSON data matched by the pattern.
    let structured = json!({
        "specversion": "1.0", "id": "o-1", "source": "/shop", "type": "order.created",
        "datacontenttype": "application/json", "data": {"total": 42}
    });
    let (status, answer) = send(
        &t,
        &[("content-type", "application/cloudevents+json")],
        &structured.to_string(),
    )
    .await;
    assert_eq!(
        (status, answer["routes"].clone()),
        (202, json!(["orders"])),
        "{answer}"
    );

    // Batch: each element accepted or refused on its own.
    let batch = json!([
        {"specversion": "1.0", "id": "o-2", "source": "/shop", "type": "order.created", "data": {"total": 99}},
        {"specversion": "1.0", "id": "o-3", "type": "order.created"},
        {"specversion": "1.0", "id": "o-4", "source": "/shop", "type": "order.created", "data": {"total": 1}}
    ]);
    let before = t.journal().stats().unwrap().events;
    let (status, answer) = send(
        &t,
        &[("content-type", "application/cloudevents-batch+json")],
        &batch.to_string(),
    )
    .await;
    assert_eq!(status, 207, "{answer}");
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results[0]["id"], "o-2");
    assert_eq!(results[1]["error"], "invalid CloudEvent");
    assert_eq!(results[2]["routes"], json!([]));
    assert_eq!(t.journal().stats().unwrap().events, before + 2);
    t.settled("o-2").await;
    assert_eq!(t.kv("audit", "o-2").await.as_deref(), Some("order.created"));

    // Invalid CloudEvents are refused and leave nothing behind.
    let before = t.journal().stats().unwrap().events;
    for (headers, body) in [
        (
            vec![("content-type", "application/cloudevents+json")],
            r#"{"specversion":"1.0","id":"x"}"#,
        ),
        (
            vec![("content-type", "application/cloudevents+json")],
            "not json",
        ),
        (
            vec![("ce-specversion", "1.0"), ("ce-id", "x"), ("ce-type", "t")],
            "{}",
        ),
        (
            vec![("content-type", "application/cloudevents-batch+json")],
            r#"{"not":"an array"}"#,
        ),
        // Data that says it is JSON must be JSON: binary mode, `data_base64`.
        (
            vec![
                ("ce-specversion", "1.0"),
                ("ce-id", "bad-data"),
                ("ce-source", "/shop"),
                ("ce-type", "order.created"),
                ("content-type", "application/json"),
            ],
            r#"{"total": 12,"#,
        ),
        (
            vec![("content-type", "application/cloudevents+json")],
            r#"{"specversion":"1.0","id":"b64","source":"/shop","type":"order.created","datacontenttype":"application/json","data_base64":"eyJ0b3RhbCI6"}"#,
        ),
    ] {
        let (status, answer) = send(&t, &headers, body).await;
        assert_eq!(status, 400, "{answer}");
        assert_eq!(answer["error"], "invalid CloudEvent", "{answer}");
    }
    assert_eq!(t.journal().stats().unwrap().events, before);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_json_bodies_only_where_the_source_allows_them() {
    let t = TestServer::start(&config()).await;
    let post = |source: &'static str, ct: &'static str| {
        t.client
            .post(format!("{}/webhooks/{source}", t.base))
            .header("content-type", ct)
            .header("X-Kind", "form.posted")
            .body("name=ada&total=12")
            .send()
    };
    let resp = post("forms", "application/x-www-form-urlencoded; charset=utf-8")
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let id = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let tl = t.settled(&id).await;
    assert_eq!(tl["event"]["type"], "form.posted");
    assert_eq!(
        tl["event"]["datacontenttype"],
        "application/x-www-form-urlencoded; charset=utf-8"
    );
    // Not JSON, so the envelope carries it as data_base64, byte for byte.
    assert_eq!(tl["event"]["data_base64"], "bmFtZT1hZGEmdG90YWw9MTI=");
    let resp = post("forms", "text/plain").await.unwrap();
    assert_eq!(resp.status().as_u16(), 415);
    let resp = post("ce", "application/x-www-form-urlencoded")
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 415);
    t.stop().await;
}
