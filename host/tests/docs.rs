//! The examples in `docs/` are true: every `toml` block loads as part of a
//! real `rules.toml`, and every `json` block marked `matches` or `misses` is an
//! event envelope that the route of the `toml` block above it matches, or not.
//! (`rust` blocks of `docs/writing-plugins.md` are the SDK's doc tests.)

mod common;

use switchyard::Event;

/// Fenced code blocks: (info string, body).
fn blocks(markdown: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut lines = markdown.lines();
    while let Some(line) = lines.next() {
        let Some(info) = line.strip_prefix("```") else {
            continue;
        };
        let mut body = String::new();
        for l in lines.by_ref() {
            if l.starts_with("```") {
                break;
            }
            body.push_str(l);
            body.push('\n');
        }
        out.push((info.trim().to_string(), body));
    }
    out
}

fn header(dir: &std::path::Path) -> String {
    let wasm = common::fixture(dir, "p", "(i32.const 2048)");
    format!(
        r#"
[server]
data_dir = "{data}"

[[sources]]
name = "shop"
[[sources]]
name = "bank"
[[sources]]
name = "storage"
[[sources]]
name = "edge"

[[plugins]]
name = "p"
wasm = "{wasm}"

[[plugins]]
name = "order-totals"
wasm = "{wasm}"
"#,
        data = dir.join("data").display()
    )
}

fn envelope(text: &str) -> Event {
    let mut v: serde_json::Value = serde_json::from_str(text).expect("json block is JSON");
    let obj = v.as_object_mut().expect("an envelope is an object");
    obj.entry("specversion").or_insert("1.0".into());
    obj.entry("id").or_insert("doc-example".into());
    Event::from_envelope_json(&v.to_string()).expect("a valid envelope")
}

fn check(doc: &str) -> (usize, usize) {
    let text = std::fs::read_to_string(common::repo().join(doc)).expect("doc");
    let dir = tempfile::tempdir().unwrap();
    let header = header(dir.path());
    let fixture = dir.path().join("p.wasm");
    let mut config = None;
    let (mut routes, mut events) = (0, 0);
    for (i, (info, body)) in blocks(&text).into_iter().enumerate() {
        match info.as_str() {
            "toml" => {
                // Plugin crates named in a guide are stood in for by a fixture.
                let body: String = body
                    .lines()
                    .map(|l| {
                        let t = l.trim_start();
                        if t.starts_with("wasm = ") {
                            format!("wasm = {:?}", fixture.display().to_string())
                        } else if t.starts_with("data_dir = ") {
                            format!(
                                "data_dir = {:?}",
                                dir.path().join("data").display().to_string()
                            )
                        } else {
                            l.to_string()
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
                // A whole file stands alone; a fragment joins the header.
                let text = match body.contains("[server]") {
                    true => body.clone(),
                    false => format!("{header}\n{body}"),
                };
                let file = dir.path().join("rules.toml");
                std::fs::write(&file, text).unwrap();
                let c = switchyard::config::load(&file)
                    .unwrap_or_else(|e| panic!("{doc}, block {i}:\n{body}\n{e}"));
                routes += 1;
                config = Some(c);
            }
            "json matches" | "json misses" => {
                let c = config
                    .as_ref()
                    .unwrap_or_else(|| panic!("{doc}, block {i}: no toml block above"));
                let event = envelope(&body);
                let matched = !c.routes.matching(&event).is_empty();
                let want = info == "json matches";
                assert_eq!(
                    matched,
                    want,
                    "{doc}, block {i}: expected the route above to {} {body}",
                    if want { "match" } else { "miss" }
                );
                events += 1;
            }
            // The SDK's doc tests compile and run these (see guest-sdk/src/lib.rs).
            "rust" if doc.ends_with("writing-plugins.md") => {}
            other => panic!("{doc}, block {i}: a `{other}` block is not checked by any test"),
        }
    }
    (routes, events)
}

#[test]
fn every_rules_example_loads_and_matches_as_it_says() {
    let (routes, events) = check("docs/rules.md");
    assert!(
        routes >= 12 && events >= 20,
        "{routes} routes, {events} events"
    );
}

#[test]
fn the_plugin_guide_config_loads() {
    let (routes, _) = check("docs/writing-plugins.md");
    assert_eq!(routes, 1);
}

#[test]
fn the_operations_config_reference_loads() {
    // Its `verify` names a secret variable that only needs to exist at start.
    let (routes, _) = check("docs/operations.md");
    assert_eq!(routes, 1);
}

/// Every metric the code records is in the table of `docs/operations.md`, and
/// every metric there is recorded somewhere.
#[test]
fn the_metrics_table_lists_exactly_the_recorded_metrics() {
    fn names(text: &str) -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        let mut rest = text;
        while let Some(i) = rest.find("switchyard_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(tail.len());
            let name = &tail[..end];
            if name != "switchyard_sdk" && name.len() > "switchyard_".len() {
                out.insert(name.to_string());
            }
            rest = &tail[end..];
        }
        out
    }
    let mut code = String::new();
    let mut stack = vec![common::repo().join("host/src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                // Only names passed to the `metrics` macros count: the first
                // string after each macro call.
                for mac in ["counter!(", "histogram!(", "gauge!("] {
                    for (i, _) in text.match_indices(mac) {
                        let after = &text[i + mac.len()..];
                        if let Some(q) = after.find('"') {
                            let name: String =
                                after[q + 1..].chars().take_while(|c| *c != '"').collect();
                            code.push_str(&name);
                            code.push('\n');
                        }
                    }
                }
            }
        }
    }
    let doc = std::fs::read_to_string(common::repo().join("docs/operations.md")).unwrap();
    let table: String = doc
        .lines()
        .filter(|l| l.starts_with("| `switchyard_"))
        .collect::<Vec<_>>()
        .join("\n");
    let (in_code, in_doc) = (names(&code), names(&table));
    assert!(in_code.len() >= 10, "{in_code:?}");
    assert_eq!(
        in_code, in_doc,
        "docs/operations.md's metrics table is out of date"
    );
}
