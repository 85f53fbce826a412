//! **Event sourcing.** An account's balance is not stored by anyone upstream: it is
//! the fold of its `deposit` and `withdrawal` events, each
//! `{"account": "...", "amount": <positive integer, minor units>}`.
//!
//! State: `balance/<account>` = the balance as a JSON integer. A withdrawal that
//! would overdraw the account is rejected (dead-lettered with the reason), as is a
//! non-positive or non-integer amount; other event types are ignored. Each event is
//! applied once: the host commits a delivery's kv writes together with its
//! acknowledgement, so a redelivered event never finds its own earlier writes.

use serde::Deserialize;
use serde_json::Number;
use switchyard_sdk::{Event, Failure, Plugin, info, kv};

/// The two kinds of event that change a balance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Deposit,
    Withdrawal,
}

/// The payload of a `deposit` or `withdrawal`.
#[derive(Debug, Deserialize)]
struct Movement {
    account: String,
    amount: Number,
}

/// The amount as a positive integer of minor units.
fn amount(n: &Number) -> Result<i64, String> {
    match n.as_i64() {
        Some(a) if a > 0 => Ok(a),
        _ => Err(format!(
            "amount must be a positive integer (minor units), got {n}"
        )),
    }
}

/// Folds one movement into `balance`.
fn apply(balance: i64, kind: Kind, amount: i64) -> Result<i64, String> {
    match kind {
        Kind::Deposit => balance
            .checked_add(amount)
            .ok_or_else(|| format!("deposit of {amount} overflows balance {balance}")),
        Kind::Withdrawal if amount > balance => Err(format!(
            "insufficient funds: balance {balance}, withdrawal {amount}"
        )),
        Kind::Withdrawal => Ok(balance - amount),
    }
}

struct Account;

impl Plugin for Account {
    fn handle(event: Event) -> Result<(), Failure> {
        let kind = match event.ty.as_str() {
            "deposit" => Kind::Deposit,
            "withdrawal" => Kind::Withdrawal,
            _ => return Ok(()),
        };
        let movement: Movement = event.data_as()?;
        let amount = amount(&movement.amount).map_err(Failure::reject)?;
        let key = format!("balance/{}", movement.account);
        let balance = kv::get_json::<i64>(&key)?.unwrap_or(0);
        let balance = apply(balance, kind, amount).map_err(Failure::reject)?;
        kv::set_json(&key, &balance)?;
        info!("{}: {kind:?} {amount}, balance {balance}", movement.account);
        Ok(())
    }
}

switchyard_sdk::export!(Account);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_deposits_and_withdrawals() {
        let b = apply(0, Kind::Deposit, 100).unwrap();
        let b = apply(b, Kind::Withdrawal, 70).unwrap();
        assert_eq!(b, 30);
        assert_eq!(apply(b, Kind::Withdrawal, 30), Ok(0));
    }

    #[test]
    fn rejects_overdraft() {
        assert_eq!(
            apply(30, Kind::Withdrawal, 50),
            Err("insufficient funds: balance 30, withdrawal 50".into())
        );
    }

    #[test]
    fn rejects_overflow() {
        assert!(apply(i64::MAX, Kind::Deposit, 1).is_err());
    }

    #[test]
    fn amount_must_be_a_positive_integer() {
        let n = |s: &str| serde_json::from_str::<Number>(s).unwrap();
        assert_eq!(amount(&n("50")), Ok(50));
        for bad in ["0", "-5", "10.5", "1e2", "18446744073709551615"] {
            let err = amount(&n(bad)).unwrap_err();
            assert!(err.contains("positive integer"), "{bad}: {err}");
        }
    }

    #[test]
    fn rejects_payloads_without_account_or_amount() {
        let event = Event {
            ty: "deposit".into(),
            data: br#"{"amount": 5}"#.to_vec(),
            ..Event::default()
        };
        let err = Failure::from(event.data_as::<Movement>().unwrap_err());
        assert!(matches!(err, Failure::Reject(r) if r.contains("missing field `account`")));
    }
}
