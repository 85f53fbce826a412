//! Signature verification over real HTTP: each scheme accepts what its
//! provider sends and answers 401 (writing nothing) to what a forger sends.

mod common;

use std::sync::Once;

use base64::Engine as _;
use common::{TestServer, plugin_crate};
use hmac::Mac;
use serde_json::Value;

const SW_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SW_OLD: &str = "whsec_c2VjcmV0LXR3by1zZWNyZXQtdHdvLXNlY3JldA==";
const GH_SECRET: &str = "It's a Secret to Everybody";
const STRIPE_SECRET: &str = "whsec_stripe_test";
const TOKEN: &str = "a-long-random-token";

/// The variables are set once, before any server of this file reads them.
fn secrets() {
    static SET: Once = Once::new();
    SET.call_once(|| {
        // SAFETY: set once, at the start of each test and before any server
        // of this test binary starts; nothing else here changes the environment.
        unsafe {
            std::env::set_var("SY_TEST_SW_NEW", SW_SECRET);
            std::env::set_var("SY_TEST_SW_OLD", SW_OLD);
            std::env::set_var("SY_TEST_GH", GH_SECRET);
            std::env::set_var("SY_TEST_STRIPE", STRIPE_SECRET);
            std::env::set_var("SY_TEST_TOKEN", TOKEN);
        }
    });
}

fn config() -> String {
    format!(
        r#"
[server]
data_dir = "DATA"
build_dir = "BUILD"

[[sources]]
name = "sw"
type_pointer = "/type"
verify = {{ scheme = "standard-webhooks", secret_env = ["SY_TEST_SW_NEW", "SY_TEST_SW_OLD"] }}

[[sources]]
name = "gh"
type_header = "X-GitHub-Event"
dedup_header = "X-GitHub-Delivery"
verify = {{ scheme = "github", secret_env = "SY_TEST_GH" }}

[[sources]]
name = "stripe"
type_pointer = "/type"
dedup_pointer = "/id"
verify = {{ scheme = "stripe", secret_env = "SY_TEST_STRIPE", tolerance = "5m" }}

[[sources]]
name = "bearer"
verify = {{ scheme = "bearer", secret_env = "SY_TEST_TOKEN" }}

[[plugins]]
name = "audit"
wasm = "{audit}"

[[routes]]
name = "all"
to = ["audit"]
"#,
        audit = plugin_crate("audit"),
    )
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().to_vec()
}

fn sw_signature(secret: &str, id: &str, ts: u64, body: &str) -> String {
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = b64.decode(secret.trim_start_matches("whsec_")).unwrap();
    let sig = hmac(
        &key,
        &[
            id.as_bytes(),
            b".",
            ts.to_string().as_bytes(),
            b".",
            body.as_bytes(),
        ],
    );
    format!("v1,{}", b64.encode(sig))
}

type Headers = Vec<(&'static str, String)>;

/// Posts `body` with `headers`; returns status and JSON answer.
async fn post(
    t: &TestServer,
    source: &str,
    headers: &[(&str, String)],
    body: &str,
) -> (u16, Value) {
    let mut req = t
        .client
        .post(format!("{}/webhooks/{source}", t.base))
        .header("content-type", "application/json")
        .body(body.to_string());
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let resp = req.send().await.expect("post");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn events(t: &TestServer) -> u64 {
    t.journal().stats().unwrap().events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_webhooks_signatures_are_checked_with_rotation() {
    secrets();
    let t = TestServer::start(&config()).await;
    let body = r#"{"type":"invoice.paid","amount":10}"#;
    let ts = now();
    let good = sw_signature(SW_SECRET, "msg_1", ts, body);
    let h = |id: &str, ts: u64, sig: &str| {
        vec![
            ("webhook-id", id.to_string()),
            ("webhook-timestamp", ts.to_string()),
            ("webhook-signature", sig.to_string()),
        ]
    };
    let (status, answer) = post(&t, "sw", &h("msg_1", ts, &good), body).await;
    assert_eq!(status, 202, "{answer}");
    // The provider's delivery id is the event's id, and its dedup key: the
    // provider retrying the same message gets the same answer.
    assert_eq!(answer["id"], "msg_1");
    let (status, again) = post(&t, "sw", &h("msg_1", ts, &good), body).await;
    assert_eq!((status, again["duplicate"].as_bool()), (202, Some(true)));
    let id = answer["id"].as_str().unwrap().to_string();
    let tl = t.settled(&id).await;
    assert_eq!(tl["event"]["type"], "invoice.paid");
    assert_eq!(tl["event"]["data"]["amount"], 10);
    // Signed with the old secret, still configured: accepted.
    let old = sw_signature(SW_OLD, "msg_2", ts, body);
    assert_eq!(post(&t, "sw", &h("msg_2", ts, &old), body).await.0, 202);

    let before = events(&t);
    let other_body = r#"{"type":"invoice.paid","amount":1000}"#;
    let cases: Vec<(Headers, &str, &str)> = vec![
        (h("msg_1", ts, &good), other_body, "signature mismatch"),
        (h("msg_3", ts, &good), body, "signature mismatch"),
        (
            h("msg_1", ts, &good[..good.len() - 4]),
            body,
            "signature mismatch",
        ),
        (
            h("msg_1", ts, ""),
            body,
            "no signature of a supported version (expected v1,<base64>)",
        ),
        (
            h(
                "msg_1",
                ts - 600,
                &sw_signature(SW_SECRET, "msg_1", ts - 600, body),
            ),
            body,
            "timestamp outside tolerance",
        ),
        (
            h(
                "msg_1",
                ts + 600,
                &sw_signature(SW_SECRET, "msg_1", ts + 600, body),
            ),
            body,
            "timestamp outside tolerance",
        ),
        (
            vec![
                ("webhook-id", "msg_1".into()),
                ("webhook-timestamp", ts.to_string()),
            ],
            body,
            "missing webhook-signature header",
        ),
    ];
    for (headers, body, reason) in cases {
        let (status, answer) = post(&t, "sw", &headers, body).await;
        assert_eq!(status, 401, "{answer}");
        assert_eq!(answer["error"], "verification failed");
        assert_eq!(answer["detail"], reason, "{answer}");
    }
    assert_eq!(events(&t), before, "rejected requests must not be stored");
    t.stop().await;
}

/// GitHub's documented example, a ping event with its delivery id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn github_stripe_and_bearer_verify_and_reject() {
    secrets();
    let t = TestServer::start(&config()).await;

    // GitHub: HMAC of the raw body, hex, "sha256=" prefix.
    let body =
        r#"{"zen":"Design for failure.","hook_id":1,"repository":{"full_name":"octo/hello"}}"#;
    let sig = format!(
        "sha256={}",
        hex::encode(hmac(GH_SECRET.as_bytes(), &[body.as_bytes()]))
    );
    let gh = |sig: &str, delivery: &str| {
        vec![
            ("X-GitHub-Event", "ping".to_string()),
            ("X-GitHub-Delivery", delivery.to_string()),
            ("X-Hub-Signature-256", sig.to_string()),
        ]
    };
    let (status, answer) = post(
        &t,
        "gh",
        &gh(&sig, "72d3162e-cc78-11e3-81ab-4c9367dc0958"),
        body,
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    let tl = t.settled(answer["id"].as_str().unwrap()).await;
    assert_eq!(tl["event"]["type"], "ping");
    assert_eq!(tl["event"]["data"]["repository"]["full_name"], "octo/hello");
    assert_eq!(tl["dedup"]["key"], "72d3162e-cc78-11e3-81ab-4c9367dc0958");
    let before = events(&t);
    let (status, answer) = post(
        &t,
        "gh",
        &gh(&sig, "x"),
        &body.replace("failure", "success"),
    )
    .await;
    assert_eq!(
        (status, answer["detail"].as_str()),
        (401, Some("signature mismatch"))
    );
    let (status, answer) = post(&t, "gh", &gh(&sig.replace("sha256=", "sha1="), "x"), body).await;
    assert_eq!(
        (status, answer["detail"].as_str()),
        (401, Some("malformed x-hub-signature-256 header"))
    );

    // Stripe: "t=...,v1=..." over "t.body".
    let body = r#"{"id":"evt_1NG8Du2eZvKYlo2CUI79vXWy","type":"charge.succeeded","data":{"object":{"amount":2000}}}"#;
    let ts = now();
    let v1 = hex::encode(hmac(
        STRIPE_SECRET.as_bytes(),
        &[ts.to_string().as_bytes(), b".", body.as_bytes()],
    ));
    let stripe = |v: String| vec![("Stripe-Signature", v)];
    let (status, answer) = post(&t, "stripe", &stripe(format!("t={ts},v1={v1}")), body).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["id"], "evt_1NG8Du2eZvKYlo2CUI79vXWy");
    let tl = t.settled(answer["id"].as_str().unwrap()).await;
    assert_eq!(tl["event"]["type"], "charge.succeeded");
    let before_stripe = events(&t);
    let stale = ts - 301;
    let v1_stale = hex::encode(hmac(
        STRIPE_SECRET.as_bytes(),
        &[stale.to_string().as_bytes(), b".", body.as_bytes()],
    ));
    let (status, answer) = post(
        &t,
        "stripe",
        &stripe(format!("t={stale},v1={v1_stale}")),
        body,
    )
    .await;
    assert_eq!(
        (status, answer["detail"].as_str()),
        (401, Some("timestamp outside tolerance"))
    );
    let (status, _) = post(
        &t,
        "stripe",
        &stripe(format!("t={ts},v1={}", &v1[..10])),
        body,
    )
    .await;
    assert_eq!(status, 401);

    // Bearer.
    let (status, _) = post(
        &t,
        "bearer",
        &[("Authorization", format!("Bearer {TOKEN}"))],
        "{}",
    )
    .await;
    assert_eq!(status, 202);
    let (status, answer) = post(
        &t,
        "bearer",
        &[("Authorization", "Bearer nope".into())],
        "{}",
    )
    .await;
    assert_eq!(
        (status, answer["detail"].as_str()),
        (401, Some("signature mismatch"))
    );
    let (status, answer) = post(&t, "bearer", &[], "{}").await;
    assert_eq!(
        (status, answer["detail"].as_str()),
        (401, Some("missing authorization header"))
    );
    assert_eq!(
        events(&t),
        before_stripe + 1,
        "only the valid bearer request was stored"
    );
    assert!(before < before_stripe);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_secret_variable_stops_the_start_naming_source_and_variable() {
    secrets();
    let cfg = config().replace("SY_TEST_TOKEN", "SY_TEST_NOT_SET_ANYWHERE");
    let dir = tempfile::tempdir().unwrap();
    let text = cfg
        .replace("DATA", &dir.path().join("data").display().to_string())
        .replace("BUILD", &common::build_dir());
    let file = dir.path().join("rules.toml");
    std::fs::write(&file, text).unwrap();
    let config = switchyard::config::load(&file).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = match switchyard::Server::start_on(config, listener).await {
        Ok(_) => panic!("started without the secret"),
        Err(e) => e.to_string(),
    };
    assert_eq!(
        err,
        "source `bearer`: environment variable SY_TEST_NOT_SET_ANYWHERE is not set (it holds the bearer secret)"
    );
}
