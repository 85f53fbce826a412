//! Switchyard: a serverless event router on WebAssembly.
//!
//! An event's path through the crate, one module per stage:
//! [`ingress`] (HTTP in) → [`journal`] (durable store) → [`rules`] (which
//! routes match) → [`dispatch`] (delivery, retries) → [`runtime`] (a fresh
//! Wasm instance per delivery). [`config`] reads `rules.toml`; [`server`]
//! wires the stages together; [`cli`] is the `switchyard` command, and
//! [`client`] its side of the admin API (`dlq`, `replay`).

pub mod cli;
pub mod client;
pub mod config;
pub mod dispatch;
pub mod event;
pub mod ingress;
pub mod journal;
pub mod rules;
pub mod runtime;
pub mod scaffold;
pub mod server;
pub mod telemetry;
pub mod trace;
pub mod watch;

pub use config::Config;
pub use event::Event;
pub use server::Server;
