//! The rules engine compiled from the host's sources, without the rest of
//! the host (so fuzzing does not build the Wasm runtime).
#![allow(dead_code)]

#[path = "../../src/event.rs"]
pub mod event;
pub mod rules;
