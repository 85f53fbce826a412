//! The rules engine and the ingress decoder compiled from the host's sources,
//! without the rest of the host (so fuzzing does not build the Wasm runtime).
#![allow(dead_code)]

#[path = "../../src/event.rs"]
pub mod event;
pub mod rules;

// The ingress decoder (`ingress_decode` target): request → event(s). At the
// root, so that `decode`'s `super::cloudevents` finds its sibling.
#[path = "../../src/ingress/cloudevents.rs"]
pub mod cloudevents;
#[path = "../../src/ingress/decode.rs"]
pub mod decode;
