//! The plugin's `config` table from `rules.toml`.
//!
//! ```no_run
//! // [[plugins]] ... config = { channel = "#orders", threshold = 100 }
//! use switchyard_sdk::config;
//!
//! let channel = config::get_str("channel").unwrap_or_else(|| "#general".into());
//! let threshold: f64 = config::get("threshold").unwrap_or(50.0);
//! ```

use serde::de::DeserializeOwned;

/// The value under `key` deserialized into `T`, or `None` when the table has no such
/// key. A value that does not fit `T` also gives `None`, and logs a warning.
pub fn get<T: DeserializeOwned>(key: &str) -> Option<T> {
    let json = raw(key)?;
    match serde_json::from_str(&json) {
        Ok(value) => Some(value),
        Err(e) => {
            crate::log::warn(&format!(
                "config key {key:?} is not a valid {}: {e}",
                std::any::type_name::<T>()
            ));
            None
        }
    }
}

/// The value under `key` if it is a string; `None` if it is missing or not a string.
pub fn get_str(key: &str) -> Option<String> {
    match serde_json::from_str(&raw(key)?) {
        Ok(serde_json::Value::String(s)) => Some(s),
        _ => None,
    }
}

/// The whole table as a JSON object (an empty one if the plugin has no config).
pub fn all() -> serde_json::Value {
    #[cfg(not(target_arch = "wasm32"))]
    let json = crate::native("config::all", |h| h.config_all());
    #[cfg(target_arch = "wasm32")]
    let json = crate::__bindings::switchyard::plugin::config::get_all();
    serde_json::from_str(&json).unwrap_or_else(|_| serde_json::Value::Object(Default::default()))
}

fn raw(key: &str) -> Option<String> {
    #[cfg(not(target_arch = "wasm32"))]
    return crate::native("config::get", |h| h.config_get(key));
    #[cfg(target_arch = "wasm32")]
    crate::__bindings::switchyard::plugin::config::get(key)
}
