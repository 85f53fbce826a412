//! **Does nothing**: acknowledges every event without looking at it. The
//! trivial plugin of the delivery benchmarks (`host/benches/instances.rs`):
//! what a delivery costs the host when the plugin's own work costs nothing
//! (the SDK still lifts the event into an [`Event`]).

use switchyard_sdk::{Event, Failure, Plugin};

struct Noop;

impl Plugin for Noop {
    fn handle(_event: Event) -> Result<(), Failure> {
        Ok(())
    }
}

switchyard_sdk::export!(Noop);
