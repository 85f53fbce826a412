//! **A consumer that fails on purpose**, for testing retries, dead letters,
//! redrive, replay and ordering. The event's data picks what it does:
//!
//! | data | behaviour |
//! | --- | --- |
//! | `{}` or `{"mode": "ok"}` | succeeds |
//! | `{"mode": "fail", "times": N}` | asks to be retried on attempts 1..=N, then succeeds |
//! | `{"mode": "fail", "times": N, "after_ms": D}` | the same, asking for a delay of D ms |
//! | `{"mode": "trap", "times": N}` | panics (a trap) on attempts 1..=N, then succeeds |
//! | `{"mode": "reject"}` | rejects the event (straight to the dead letters) |
//! | `{"mode": "sleep", "ms": D}` | sleeps D ms, then succeeds |
//!
//! `times` defaults to "always". On success it stores `done/<event id>` = the
//! attempt number, and, when the data has a `"key"`, appends the data's `"n"` to
//! the JSON list under `seen/<key>`, which shows the order deliveries
//! succeeded in. A replayed delivery also counts itself under `replayed`.

use serde::Deserialize;
use switchyard_sdk::{Event, Failure, Plugin, kv};

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Orders {
    mode: Option<String>,
    times: Option<u32>,
    after_ms: Option<u64>,
    ms: Option<u64>,
    key: Option<String>,
    n: Option<serde_json::Value>,
}

/// What to do on this attempt.
#[derive(Debug, PartialEq)]
enum Action {
    Succeed,
    Retry(Option<std::time::Duration>),
    Trap,
    Reject,
    Sleep(u64),
}

fn decide(o: &Orders, attempt: u32) -> Action {
    let failing = o.times.is_none_or(|n| attempt <= n);
    match o.mode.as_deref() {
        Some("fail") if failing => Action::Retry(o.after_ms.map(std::time::Duration::from_millis)),
        Some("trap") if failing => Action::Trap,
        Some("reject") => Action::Reject,
        Some("sleep") => Action::Sleep(o.ms.unwrap_or(0)),
        _ => Action::Succeed,
    }
}

struct Flaky;

impl Plugin for Flaky {
    fn handle(event: Event) -> Result<(), Failure> {
        let orders: Orders = event.data_as()?;
        let attempt = event.attempt();
        match decide(&orders, attempt) {
            Action::Retry(after) => return Err(Failure::Retry(after)),
            Action::Trap => panic!("flaky: trap on attempt {attempt}"),
            Action::Reject => return Err(Failure::reject("flaky: rejected on purpose")),
            Action::Sleep(ms) => std::thread::sleep(std::time::Duration::from_millis(ms)),
            Action::Succeed => {}
        }
        kv::set_json(&format!("done/{}", event.id), &attempt)?;
        if let Some(key) = &orders.key {
            let list_key = format!("seen/{key}");
            let mut seen: Vec<serde_json::Value> = kv::get_json(&list_key)?.unwrap_or_default();
            seen.push(orders.n.clone().unwrap_or_default());
            kv::set_json(&list_key, &seen)?;
        }
        if event.is_replay() {
            let n: u64 = kv::get_json("replayed")?.unwrap_or(0);
            kv::set_json("replayed", &(n + 1))?;
        }
        Ok(())
    }
}

switchyard_sdk::export!(Flaky);

#[cfg(test)]
mod tests {
    use super::*;

    fn orders(json: &str) -> Orders {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn fails_the_first_n_attempts_then_succeeds() {
        let o = orders(r#"{"mode": "fail", "times": 2}"#);
        assert_eq!(decide(&o, 1), Action::Retry(None));
        assert_eq!(decide(&o, 2), Action::Retry(None));
        assert_eq!(decide(&o, 3), Action::Succeed);
        let o = orders(r#"{"mode": "trap"}"#);
        assert_eq!(decide(&o, 99), Action::Trap);
        let o = orders(r#"{"mode": "fail", "times": 1, "after_ms": 5}"#);
        assert_eq!(
            decide(&o, 1),
            Action::Retry(Some(std::time::Duration::from_millis(5)))
        );
        assert_eq!(decide(&orders("{}"), 1), Action::Succeed);
        assert_eq!(decide(&orders(r#"{"mode": "reject"}"#), 1), Action::Reject);
    }
}
