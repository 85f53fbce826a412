//! `rules.toml` as written: serde types that keep spans, reject unknown keys,
//! and check nothing else. `super::validate` turns them into a `Config`.

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<Spanned<String>>,
    pub data_dir: Option<Spanned<String>>,
    /// Where plugin crates are built (a cargo target dir).
    pub build_dir: Option<Spanned<String>>,
    /// Default body limit of every source.
    pub max_body: Option<Spanned<String>>,
    /// Deliveries running at once.
    pub workers: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    pub name: Spanned<String>,
    pub type_header: Option<Spanned<String>>,
    pub type_pointer: Option<Spanned<String>>,
    pub subject_header: Option<Spanned<String>>,
    pub subject_pointer: Option<Spanned<String>>,
    pub max_body: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPlugin {
    pub name: Spanned<String>,
    pub wasm: Spanned<String>,
    pub timeout: Option<Spanned<String>>,
    pub memory: Option<Spanned<String>>,
    pub config: Option<Spanned<toml::Table>>,
}

/// A route without its `match` table, which `rules::Pattern` compiles from the
/// spanned document itself.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: Spanned<String>,
    pub to: Spanned<Vec<Spanned<String>>>,
    pub retry: Option<Spanned<RawRetry>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    pub attempts: Option<Spanned<i64>>,
    pub backoff: Option<Spanned<String>>,
    pub initial: Option<Spanned<String>>,
    pub max: Option<Spanned<String>>,
}
