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
                    .map(|l| match l.trim_start().starts_with("wasm = ") {
                        true => format!("wasm = {:?}", fixture.display().to_string()),
                        false => l.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
                let file = dir.path().join("rules.toml");
                std::fs::write(&file, format!("{header}\n{body}")).unwrap();
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
