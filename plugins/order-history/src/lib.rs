//! **CQRS read model.** Folds a shop's `order.*` events into a per-customer
//! order history (the write side, in `handle`) and answers
//! `GET /query/order-history/customers/<id>` from it (the read side, in `query`).
//!
//! State: `history/<customer>` = the customer's events, oldest first, at most
//! [`MAX_ENTRIES`] (the oldest are dropped). Each event is added once even if
//! delivered again (its id is checked). Events without a string `customer` are
//! rejected; other event types are ignored.
//!
//! Queries:
//! - `customers/<id>` → `{"customer", "count", "events": [...]}`, 404 if unknown;
//! - `customers?limit=N` → `{"customers": [...]}` (ids in order, at most N).

use serde::{Deserialize, Serialize};
use switchyard_sdk::query::{Request, Response};
use switchyard_sdk::{Event, Failure, Plugin, kv};

/// The most events kept per customer.
pub const MAX_ENTRIES: usize = 500;

/// The part of an `order.*` payload this plugin reads.
#[derive(Debug, Deserialize)]
struct OrderEvent {
    customer: String,
    #[serde(default)]
    order: Option<serde_json::Value>,
    #[serde(default)]
    total: Option<f64>,
}

/// One entry of a customer's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Entry {
    id: String,
    #[serde(rename = "type")]
    ty: String,
    time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    order: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    total: Option<f64>,
}

/// Adds `entry` unless an entry with its id is there, in event-time order;
/// keeps the newest `MAX_ENTRIES`. Returns whether it changed anything.
///
/// Deliveries of a route without `order_key` run concurrently, so events can
/// arrive here out of order. `time` is the router's acceptance time (RFC 3339,
/// UTC, one fixed precision, so it sorts as text); ids it generates increase
/// within a millisecond, which breaks ties.
fn fold(history: &mut Vec<Entry>, entry: Entry) -> bool {
    if history.iter().any(|e| e.id == entry.id) {
        return false;
    }
    let at = history.partition_point(|e| (&e.time, &e.id) <= (&entry.time, &entry.id));
    history.insert(at, entry);
    if history.len() > MAX_ENTRIES {
        let excess = history.len() - MAX_ENTRIES;
        history.drain(..excess);
    }
    true
}

fn key(customer: &str) -> String {
    format!("history/{customer}")
}

struct OrderHistory;

impl Plugin for OrderHistory {
    fn handle(event: Event) -> Result<(), Failure> {
        if !event.ty.starts_with("order.") {
            return Ok(());
        }
        let order: OrderEvent = event.data_as()?;
        if order.customer.is_empty() || order.customer.contains('/') {
            return Err(Failure::reject(format!(
                "{} has an invalid `customer`: {:?}",
                event.ty, order.customer
            )));
        }
        let key = key(&order.customer);
        let mut history: Vec<Entry> = kv::get_json(&key)?.unwrap_or_default();
        let entry = Entry {
            id: event.id.clone(),
            ty: event.ty.clone(),
            time: event.time.clone(),
            order: order.order,
            total: order.total,
        };
        if fold(&mut history, entry) {
            kv::set_json(&key, &history)?;
        }
        Ok(())
    }

    fn query(request: Request) -> Response {
        match request.segments().as_slice() {
            ["customers", id] => match kv::get_json::<Vec<Entry>>(&key(id)) {
                Ok(Some(events)) => Response::json(&serde_json::json!({
                    "customer": id,
                    "count": events.len(),
                    "events": events,
                })),
                Ok(None) => Response::not_found(&format!("no orders for customer {id:?}")),
                Err(e) => Response::error(503, &e.to_string()),
            },
            ["customers"] => {
                let limit = match request.param("limit").map(str::parse::<usize>) {
                    None => 100,
                    Some(Ok(n)) if n > 0 => n,
                    Some(_) => return Response::bad_request("limit must be a positive integer"),
                };
                let mut customers = Vec::new();
                for k in kv::keys("history/").take(limit) {
                    match k {
                        Ok(k) => customers.push(k["history/".len()..].to_string()),
                        Err(e) => return Response::error(503, &e.to_string()),
                    }
                }
                Response::json(&serde_json::json!({ "customers": customers }))
            }
            _ => Response::not_found("try customers/<id> or customers"),
        }
    }
}

switchyard_sdk::export!(OrderHistory);

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str) -> Entry {
        Entry {
            id: id.into(),
            ty: "order.created".into(),
            time: "2026-01-01T00:00:00Z".into(),
            order: None,
            total: Some(1.0),
        }
    }

    #[test]
    fn folds_each_event_once() {
        let mut h = Vec::new();
        assert!(fold(&mut h, entry("a")));
        assert!(fold(&mut h, entry("b")));
        assert!(!fold(&mut h, entry("a")), "a redelivery is not added twice");
        assert_eq!(
            h.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
    }

    #[test]
    fn keeps_event_time_order_when_deliveries_finish_out_of_order() {
        let at = |id: &str, time: &str| Entry {
            time: time.into(),
            ..entry(id)
        };
        let mut h = Vec::new();
        fold(&mut h, at("b", "2026-01-01T00:00:00.002Z"));
        fold(&mut h, at("a", "2026-01-01T00:00:00.001Z"));
        fold(&mut h, at("d", "2026-01-01T00:00:00.003Z"));
        fold(&mut h, at("c", "2026-01-01T00:00:00.003Z"));
        assert_eq!(
            h.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
            ["a", "b", "c", "d"]
        );
    }

    #[test]
    fn keeps_the_newest_entries() {
        let mut h = Vec::new();
        for i in 0..MAX_ENTRIES + 3 {
            let mut e = entry(&i.to_string());
            e.time = format!("2026-01-01T00:00:00.{i:06}Z");
            fold(&mut h, e);
        }
        assert_eq!(h.len(), MAX_ENTRIES);
        assert_eq!(h[0].id, "3");
    }

    #[test]
    fn folds_orders_and_answers_queries_on_a_mock_host() {
        use switchyard_sdk::testing::{MockHost, event};
        let host = MockHost::new();
        let created = event(
            "order.created",
            &serde_json::json!({"customer": "ada", "order": "o1", "total": 5}),
        );
        host.handle::<OrderHistory>(created.clone()).unwrap();
        host.handle::<OrderHistory>(created).unwrap(); // redelivered: added once
        host.handle::<OrderHistory>(event("order.paid", &serde_json::json!({"customer": "ada"})))
            .unwrap();
        host.handle::<OrderHistory>(event("cart.created", &serde_json::json!({})))
            .unwrap();
        let bad = host.handle::<OrderHistory>(event(
            "order.created",
            &serde_json::json!({"customer": "a/b"}),
        ));
        assert!(matches!(bad, Err(Failure::Reject(_))));

        let r = host.query::<OrderHistory>("customers/ada", &[]);
        assert_eq!(r.status, 200);
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["count"], 2);
        assert_eq!(body["events"][1]["type"], "order.paid");
        let r = host.query::<OrderHistory>("customers", &[("limit", "5")]);
        assert_eq!(r.body, br#"{"customers":["ada"]}"#);
        assert_eq!(host.query::<OrderHistory>("customers/bob", &[]).status, 404);
        assert_eq!(
            host.query::<OrderHistory>("customers", &[("limit", "0")])
                .status,
            400
        );
    }

    #[test]
    fn default_query_paths() {
        let r = Request {
            path: "nope".into(),
            params: vec![],
        };
        assert_eq!(OrderHistory::query(r).status, 404);
    }
}
