#[path = "../../../src/rules/json.rs"]
pub mod json;
#[path = "../../../src/rules/matcher.rs"]
pub mod matcher;
#[path = "../../../src/rules/pattern.rs"]
pub mod pattern;
