//! The JSON Schema of `rules.toml`, generated from the raw config types, for
//! editors (Taplo / Even Better TOML read the `#:schema` line at the top of the
//! file). Committed as `docs/rules.schema.json`; a test fails when it is stale.

use std::borrow::Cow;

use schemars::{JsonSchema, Schema, SchemaGenerator, generate::SchemaSettings, json_schema};

use super::raw::{RawEngine, RawPlugin, RawRoute, RawServer, RawSource, RawTelemetry};

/// Switchyard's configuration: webhook sources, consumer plugins, and the
/// routes between them.
#[derive(JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct RulesToml {
    server: Option<RawServer>,
    sources: Option<Vec<RawSource>>,
    plugins: Option<Vec<RawPlugin>>,
    routes: Option<Vec<RouteWithMatch>>,
    telemetry: Option<RawTelemetry>,
    engine: Option<RawEngine>,
}

/// `[[routes]]`: which events go to which plugins.
#[derive(JsonSchema)]
#[allow(dead_code)]
struct RouteWithMatch {
    #[serde(flatten)]
    route: RawRoute,
    /// An Amazon EventBridge event pattern, in TOML. Without it the route takes
    /// every event.
    #[serde(rename = "match")]
    pattern: Option<EventPattern>,
}

/// An event pattern: fields of the event (`source`, `type`, `subject`, `data`
/// and its nested fields, ...), each a list of values any of which may match,
/// or a nested pattern; `$or` takes a list of alternative patterns.
struct EventPattern;

impl JsonSchema for EventPattern {
    fn schema_name() -> Cow<'static, str> {
        "EventPattern".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let nested = generator.subschema_for::<EventPattern>();
        json_schema!({
            "type": "object",
            "description": "Every field named must match. A list matches if any of its values does; a table matches nested fields.",
            "properties": {
                "$or": { "type": "array", "minItems": 2, "items": nested.clone() }
            },
            "additionalProperties": {
                "anyOf": [
                    {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "anyOf": [
                                { "type": "string" },
                                { "type": "number" },
                                { "type": "boolean" },
                                {
                                    "type": "object",
                                    "description": "An operator: prefix, suffix, equals-ignore-case, wildcard, anything-but, numeric, exists, cidr; or { null = true } for JSON null.",
                                    "minProperties": 1,
                                    "maxProperties": 1,
                                    "propertyNames": {
                                        "enum": ["prefix", "suffix", "equals-ignore-case", "wildcard", "anything-but", "numeric", "exists", "cidr", "null"]
                                    }
                                }
                            ]
                        }
                    },
                    nested
                ]
            }
        })
    }
}

/// The schema as pretty JSON (draft-07, which Taplo's validator reads).
pub fn rules_schema_json() -> String {
    let generator = SchemaSettings::draft07().into_generator();
    let mut schema = generator.into_root_schema_for::<RulesToml>().to_value();
    drop_null(&mut schema);
    let mut text = serde_json::to_string_pretty(&schema).unwrap_or_default();
    text.push('\n');
    text
}

/// TOML has no null: an optional key is simply left out. Removes the `null`
/// alternatives schemars gives `Option` fields.
fn drop_null(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Object(obj) => {
            if let Some(Value::Array(types)) = obj.get_mut("type") {
                types.retain(|t| t != "null");
                if types.len() == 1 {
                    let only = types.remove(0);
                    obj.insert("type".into(), only);
                }
            }
            if let Some(Value::Array(alts)) = obj.get_mut("anyOf") {
                alts.retain(|a| a.get("type").is_none_or(|t| t != "null"));
                if alts.len() == 1 {
                    let only = alts.remove(0);
                    obj.remove("anyOf");
                    if let Value::Object(inner) = only {
                        for (k, v) in inner {
                            obj.entry(k).or_insert(v);
                        }
                    }
                }
            }
            obj.values_mut().for_each(drop_null);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_null),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Set UPDATE_GOLDEN=1 to rewrite docs/rules.schema.json.
    #[test]
    fn committed_schema_is_up_to_date() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/rules.schema.json");
        let fresh = rules_schema_json();
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, &fresh).expect("write schema");
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == fresh,
            "docs/rules.schema.json is stale: run `UPDATE_GOLDEN=1 cargo test -p switchyard --lib schema`"
        );
    }

    #[test]
    fn schema_describes_every_section() {
        let schema: serde_json::Value = serde_json::from_str(&rules_schema_json()).unwrap();
        for key in [
            "server",
            "sources",
            "plugins",
            "routes",
            "telemetry",
            "engine",
        ] {
            assert!(schema["properties"][key].is_object(), "{key}");
        }
        assert_eq!(schema["$schema"], "http://json-schema.org/draft-07/schema#");
    }
}
