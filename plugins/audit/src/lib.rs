//! **Event notification.** The audit plugin is told that something happened and
//! records the fact; it needs nothing from the event but its envelope, and it never
//! fails the event on its own account.
//!
//! For each event it logs the type, id and source, and stores
//! `kv[<event id>] = <event type>` (the raw UTF-8 of the type). Writing the same
//! value again is harmless, so redeliveries need no special care.

use switchyard_sdk::{Event, Failure, Plugin, info, kv};

struct Audit;

impl Plugin for Audit {
    fn handle(event: Event) -> Result<(), Failure> {
        info!("{}", describe(&event));
        kv::set_string(&event.id, &event.ty)?;
        Ok(())
    }
}

switchyard_sdk::export!(Audit);

/// The log line for `event`.
fn describe(event: &Event) -> String {
    format!(
        "audit: type={} id={} source={}",
        event.ty, event.id, event.source
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_type_id_and_source() {
        let event = Event {
            id: "ev-1".into(),
            source: "shop".into(),
            ty: "order.created".into(),
            ..Event::default()
        };
        assert_eq!(
            describe(&event),
            "audit: type=order.created id=ev-1 source=shop"
        );
    }
}
