//! **Event-carried state transfer.** `order.created` events carry everything this
//! plugin needs (`{"customer": "...", "total": 12.5, ...}`), so it keeps its own
//! per-customer view without calling back to the shop.
//!
//! State: `customer/<customer>` = `{"count": <orders>, "total": <sum, in cents
//! precision>}`. Other event types are acknowledged and ignored; an order without a
//! string `customer` or a numeric `total` is rejected. Each event is counted once:
//! the host commits a delivery's kv writes together with its acknowledgement.
//!
//! **Event chaining.** When a customer's total first reaches the `vip_total`
//! config value (default 1000), it emits `customer.vip` (`{"customer", "total"}`,
//! subject = the customer), which the router routes like any other event.

use serde::{Deserialize, Serialize};
use switchyard_sdk::{Event, Failure, Plugin, config, emit, info, kv};

/// The part of an `order.created` payload this plugin reads.
#[derive(Debug, Deserialize)]
struct OrderCreated {
    customer: String,
    total: f64,
}

/// One customer's running totals, as stored in kv.
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
struct Totals {
    count: u64,
    total: f64,
}

/// Whether an order took the total from below `threshold` to at least it.
fn crossed(before: f64, after: f64, threshold: f64) -> bool {
    before < threshold && after >= threshold
}

impl Totals {
    /// The totals after one more order of `amount`, rounded to cents.
    fn add(self, amount: f64) -> Totals {
        Totals {
            count: self.count + 1,
            total: ((self.total + amount) * 100.0).round() / 100.0,
        }
    }
}

struct OrderTotals;

impl Plugin for OrderTotals {
    fn handle(event: Event) -> Result<(), Failure> {
        if event.ty != "order.created" {
            return Ok(());
        }
        let order: OrderCreated = event.data_as()?;
        if order.customer.is_empty() {
            return Err(Failure::reject("order.created has an empty `customer`"));
        }
        let key = format!("customer/{}", order.customer);
        let before = kv::get_json::<Totals>(&key)?.unwrap_or_default();
        let previous_total = before.total;
        let totals = before.add(order.total);
        kv::set_json(&key, &totals)?;
        let vip_total = config::get::<f64>("vip_total").unwrap_or(1000.0);
        if crossed(previous_total, totals.total, vip_total) {
            emit::Emit::new("customer.vip")
                .subject(&order.customer)
                .json(&serde_json::json!({ "customer": order.customer, "total": totals.total }))?
                .send()?;
        }
        info!(
            "{}: {} orders, total {:.2}",
            order.customer, totals.count, totals.total
        );
        Ok(())
    }
}

switchyard_sdk::export!(OrderTotals);

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(data: &str) -> Result<OrderCreated, Failure> {
        let event = Event {
            ty: "order.created".into(),
            data: data.into(),
            ..Event::default()
        };
        Ok(event.data_as()?)
    }

    #[test]
    fn adds_and_rounds_to_cents() {
        let t = Totals::default().add(0.1).add(0.2);
        assert_eq!(
            t,
            Totals {
                count: 2,
                total: 0.3
            }
        );
        assert_eq!(Totals::default().add(19.999).total, 20.0);
    }

    #[test]
    fn vip_is_announced_once_when_the_total_reaches_the_threshold() {
        assert!(crossed(900.0, 1000.0, 1000.0));
        assert!(crossed(0.0, 5000.0, 1000.0));
        assert!(!crossed(1000.0, 1200.0, 1000.0), "already a VIP");
        assert!(!crossed(10.0, 999.99, 1000.0));
    }

    #[test]
    fn emits_customer_vip_once_on_a_mock_host() {
        use serde_json::json;
        use switchyard_sdk::testing::{MockHost, event};
        let host = MockHost::new().config(json!({ "vip_total": 100 }));
        let order =
            |total: f64| event("order.created", &json!({"customer": "ada", "total": total}));
        host.handle::<OrderTotals>(order(60.0)).unwrap();
        assert!(host.emitted().is_empty());
        host.handle::<OrderTotals>(order(90.0)).unwrap();
        host.handle::<OrderTotals>(order(10.0)).unwrap();
        let emitted = host.emitted();
        assert_eq!(emitted.len(), 1, "{emitted:?}");
        assert_eq!(emitted[0].ty, "customer.vip");
        assert_eq!(emitted[0].subject.as_deref(), Some("ada"));
        assert_eq!(
            emitted[0].data_as::<serde_json::Value>().unwrap(),
            json!({"customer": "ada", "total": 150.0})
        );
        assert_eq!(
            host.kv_json::<Totals>("customer/ada"),
            Some(Totals {
                count: 3,
                total: 160.0
            })
        );
    }

    #[test]
    fn stored_form_is_count_and_total() {
        let json = serde_json::to_string(&Totals::default().add(12.5)).unwrap();
        assert_eq!(json, r#"{"count":1,"total":12.5}"#);
    }

    #[test]
    fn reads_customer_and_total_ignoring_other_fields() {
        let order = parse(r#"{"customer": "ada", "total": 42, "items": []}"#).unwrap();
        assert_eq!((order.customer.as_str(), order.total), ("ada", 42.0));
    }

    #[test]
    fn rejects_missing_or_ill_typed_fields() {
        for (data, why) in [
            (r#"{"total": 1}"#, "missing field `customer`"),
            (r#"{"customer": "ada"}"#, "missing field `total`"),
            (
                r#"{"customer": "ada", "total": "12"}"#,
                "invalid type: string",
            ),
            ("not json", "expected ident"),
        ] {
            match parse(data) {
                Err(Failure::Reject(reason)) => assert!(reason.contains(why), "{reason}"),
                other => panic!("{data}: expected a reject, got {other:?}"),
            }
        }
    }
}
