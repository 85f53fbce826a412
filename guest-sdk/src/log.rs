//! Log lines, attributed by the host to the plugin and the event being handled.
//!
//! Use the functions with a ready string, or the macros to format one:
//!
//! ```no_run
//! let (id, n) = ("ev-1", 3);
//! switchyard_sdk::log::info("starting");
//! switchyard_sdk::info!("event {id}: {n} items");
//! switchyard_sdk::log::warn!("{n} is a lot"); // the macros are here too
//! ```

use crate::__bindings::switchyard::plugin::log::Level;
#[cfg(target_arch = "wasm32")]
use crate::__bindings::switchyard::plugin::log::log;

pub use crate::{debug, error, info, trace, warn};

fn emit(level: Level, message: &str) {
    #[cfg(not(target_arch = "wasm32"))]
    crate::native("log", |h| {
        let name = match level {
            Level::Trace => "trace",
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        };
        h.log(name, message)
    });
    #[cfg(target_arch = "wasm32")]
    log(level, message);
}

/// Logs `message` at level `trace`.
pub fn trace(message: &str) {
    emit(Level::Trace, message);
}

/// Logs `message` at level `debug`.
pub fn debug(message: &str) {
    emit(Level::Debug, message);
}

/// Logs `message` at level `info`.
pub fn info(message: &str) {
    emit(Level::Info, message);
}

/// Logs `message` at level `warn`.
pub fn warn(message: &str) {
    emit(Level::Warn, message);
}

/// Logs `message` at level `error`.
pub fn error(message: &str) {
    emit(Level::Error, message);
}

/// Formats its arguments like [`format!`] and logs the result at level `trace`.
#[macro_export]
macro_rules! trace {
    ($($arg:tt)+) => { $crate::log::trace(&::std::format!($($arg)+)) };
}

/// Formats its arguments like [`format!`] and logs the result at level `debug`.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)+) => { $crate::log::debug(&::std::format!($($arg)+)) };
}

/// Formats its arguments like [`format!`] and logs the result at level `info`.
#[macro_export]
macro_rules! info {
    ($($arg:tt)+) => { $crate::log::info(&::std::format!($($arg)+)) };
}

/// Formats its arguments like [`format!`] and logs the result at level `warn`.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)+) => { $crate::log::warn(&::std::format!($($arg)+)) };
}

/// Formats its arguments like [`format!`] and logs the result at level `error`.
#[macro_export]
macro_rules! error {
    ($($arg:tt)+) => { $crate::log::error(&::std::format!($($arg)+)) };
}
