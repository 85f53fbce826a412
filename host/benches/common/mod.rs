//! What the delivery benches share: the repository root, a typical event,
//! and a median.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use switchyard::event::Event;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ has a parent")
        .to_path_buf()
}

/// An event like the ones `POST /webhooks/shop` produces.
pub fn event() -> Event {
    let data = serde_json::json!({
        "kind": "order.created",
        "customer": "c-1042",
        "order": "o-77812",
        "total": 129.5,
        "currency": "EUR",
        "items": [{"sku": "A-1", "qty": 2}, {"sku": "B-7", "qty": 1}],
    });
    Event {
        id: "0199a0b2-5c3e-7a41-9d2e-3f1c2b4a5d6e".into(),
        source: "shop".into(),
        ty: "order.created".into(),
        subject: Some("c-1042".into()),
        time: "2025-01-01T00:00:00.000Z".into(),
        datacontenttype: "application/json".into(),
        data: serde_json::to_vec(&data).expect("json"),
        extensions: Default::default(),
    }
}

/// An engine set up like `Runtime::new`'s (pooling allocator, epochs), for the
/// bare instantiation figure.
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
