//! Write [Switchyard](https://example.invalid/switchyard) consumer plugins in plain Rust.
//!
//! A plugin is a type implementing [`Plugin`], exported with [`export!`], in a crate
//! built as a `cdylib` for `wasm32-wasip2`. The router calls [`Plugin::handle`] once
//! per delivery, each time in a fresh instance: keep anything that must outlive one
//! event in [`kv`]. Return `Ok(())` to acknowledge the event, [`Failure::retry`] to
//! have it delivered again later, or [`Failure::reject`] to send it to the dead
//! letters. [`DataError`] and [`KvError`] convert into a [`Failure`], so `?` works.
//!
//! ```no_run
//! use serde::Deserialize;
//! use switchyard_sdk::{kv, Event, Failure, Plugin};
//!
//! /// Counts orders per customer.
//! struct Orders;
//!
//! #[derive(Deserialize)]
//! struct OrderCreated {
//!     customer: String,
//! }
//!
//! impl Plugin for Orders {
//!     fn handle(event: Event) -> Result<(), Failure> {
//!         if event.ty != "order.created" {
//!             return Ok(()); // not ours: acknowledge and move on
//!         }
//!         let order: OrderCreated = event.data_as()?; // bad JSON → reject
//!         let key = format!("orders/{}", order.customer);
//!         let count = kv::get_json::<u64>(&key)?.unwrap_or(0) + 1; // store down → retry
//!         kv::set_json(&key, &count)?;
//!         switchyard_sdk::info!("{} has {count} orders", order.customer);
//!         Ok(())
//!     }
//! }
//!
//! switchyard_sdk::export!(Orders);
//! ```
//!
//! The plugin's `Cargo.toml` needs `crate-type = ["cdylib"]` and depends on
//! `switchyard-sdk` (and on `serde` for `#[derive(Deserialize)]`; the SDK re-exports
//! [`serde`] and [`serde_json`], but the derive macros look for a `serde` dependency
//! unless told `#[serde(crate = "switchyard_sdk::serde")]`). Build it with
//! `cargo build --target wasm32-wasip2 --release`: the `.wasm` file is a component.
//!
//! Host calls ([`kv`], [`emit`], [`log`], [`config`], [`http`]) go to the router. In a
//! native build (`cargo test`), run the plugin through `testing::MockHost`, which
//! keeps kv, emit, log and config in memory with the router's commit rules; outside
//! one (and for `http`) they panic.

#![warn(missing_docs)]

// The generated bindings name their runtime `switchyard_sdk::__wit_bindgen::rt`, a
// path that must also resolve inside this crate.
extern crate self as switchyard_sdk;

pub mod config;
pub mod emit;
mod event;
mod failure;
pub mod http;
pub mod kv;
pub mod log;
pub mod query;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

pub use emit::EmitError;

/// Most bytes one delivery may store: its kv writes (key and value, the last
/// write of each key) and its emitted events (data, type and subject, plus
/// 256 bytes each) together, since they commit with its acknowledgement as
/// one transaction. A kv write past it fails with [`KvError::Invalid`]; an
/// emit past it fails the delivery into the dead letters.
pub const MAX_OUTPUT_PER_DELIVERY: usize = 4 << 20;
pub use event::{DataError, Event};
pub use failure::Failure;
pub use kv::KvError;
pub use serde;
pub use serde_json;

/// A consumer plugin: what the router calls for each event its routes match.
///
/// Export the implementing type with [`export!`].
pub trait Plugin {
    /// Handle one event.
    ///
    /// `Ok(())` acknowledges it: it is not delivered again. An `Err` either asks for a
    /// later retry or rejects the event for good; see [`Failure`]. Each call runs in
    /// a fresh instance, so statics do not carry over from one event to the next.
    fn handle(event: Event) -> Result<(), Failure>;

    /// Answer `GET /query/<plugin>/<path>` from the plugin's state (the read
    /// side of CQRS); see [`query`]. Runs in a fresh instance whose kv is
    /// read-only. By default a plugin answers no queries (404).
    fn query(request: query::Request) -> query::Response {
        let _ = request;
        query::Response::not_found("this plugin answers no queries")
    }
}

/// Exports a [`Plugin`] implementation as the component's `handle` function.
///
/// Invoke it once, at the top level of the plugin crate:
///
/// ```no_run
/// # use switchyard_sdk::{Event, Failure, Plugin};
/// struct Noop;
///
/// impl Plugin for Noop {
///     fn handle(_event: Event) -> Result<(), Failure> {
///         Ok(())
///     }
/// }
///
/// switchyard_sdk::export!(Noop);
/// ```
#[macro_export]
macro_rules! export {
    ($plugin:ty) => {
        const _: () = {
            // wit-bindgen's export macro wants an identifier naming a `Guest`.
            type __SwitchyardGuest = $crate::__private::Adapter<$plugin>;
    $crate::__bindings::export!(__SwitchyardGuest with_types_in $crate::__bindings);
        };
    };
}

/// The wit-bindgen output for world `queryable` of `wit/switchyard.wit`. Not part of
/// the API: plugins use the types and functions re-exported around it.
#[doc(hidden)]
pub mod __bindings {
    wit_bindgen::generate!({
        path: "../wit",
        // `queryable` is `consumer` plus the `query` export, which `Plugin`
        // gives a default for.
        world: "queryable",
        // The export macro is used from plugin crates, which only know this crate.
        pub_export_macro: true,
        default_bindings_module: "switchyard_sdk::__bindings",
        runtime_path: "switchyard_sdk::__wit_bindgen::rt",
        // `wasi:http` (and the `wasi:io`, `wasi:clocks` it uses) from
        // `wit/deps`, used by `http`.
        generate_all,
    });
}

#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

/// `docs/writing-plugins.md`, whose Rust examples run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../docs/writing-plugins.md")]
pub struct WritingPluginsGuide;

/// Glue between the generated `Guest` trait and [`Plugin`], used by [`export!`].
#[doc(hidden)]
pub mod __private {
    use crate::__bindings;
    use core::marker::PhantomData;

    /// Implements the generated `Guest` for any [`crate::Plugin`].
    pub struct Adapter<P>(PhantomData<P>);

    impl<P: crate::Plugin> __bindings::Guest for Adapter<P> {
        fn handle(event: __bindings::Event) -> Result<(), __bindings::Failure> {
            P::handle(event.into()).map_err(Into::into)
        }

        fn query(
            path: String,
            params: Vec<(String, String)>,
        ) -> __bindings::switchyard::plugin::types::Response {
            P::query(crate::query::Request { path, params }).into()
        }
    }
}

/// Panics with a clear message when a host call the mock host does not cover
/// (`http`) is made in a native build, instead of the bindings' bare
/// `unreachable!()`.
fn require_host(function: &str) {
    if cfg!(not(target_arch = "wasm32")) {
        panic!(
            "switchyard_sdk::{function} needs the Switchyard host; it cannot be called \
             in a native build (keep HTTP calls out of unit tests)"
        );
    }
}

/// In a native build (unit tests), runs a host call on the [`testing::MockHost`]
/// of the call in progress; panics with a clear message outside one, instead of
/// the bindings' bare `unreachable!()`.
#[cfg(not(target_arch = "wasm32"))]
fn native<R>(function: &str, f: impl FnOnce(&mut testing::State) -> R) -> R {
    testing::with_current(f).unwrap_or_else(|| {
        panic!(
            "switchyard_sdk::{function} needs the Switchyard host; in a native build, \
             call the plugin through switchyard_sdk::testing::MockHost"
        )
    })
}
