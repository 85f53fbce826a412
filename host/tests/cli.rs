//! `switchyard check` and `switchyard match` as a user runs them: exit codes,
//! every problem of a broken file with file:line:col and the key (golden
//! file), and why a route does not match an event.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

fn check(dir: &Path, file: &str) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["check", file])
        .current_dir(dir)
        .output()
        .expect("run switchyard check");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ui() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui")
}

#[test]
fn the_example_rules_toml_is_valid() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let (code, stdout, stderr) = check(repo, "rules.toml");
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        stdout.trim(),
        "rules.toml: ok (2 sources, 4 plugins, 4 routes)"
    );
}

#[test]
fn a_valid_file_passes() {
    let (code, stdout, stderr) = check(&ui(), "valid.toml");
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        stdout.trim(),
        "valid.toml: ok (1 sources, 1 plugins, 2 routes)"
    );
}

/// Set UPDATE_GOLDEN=1 to rewrite `tests/ui/invalid.stderr`.
#[test]
fn every_problem_of_a_broken_file_is_reported_at_once() {
    let (code, stdout, stderr) = check(&ui(), "invalid.toml");
    assert_eq!(code, 1);
    assert_eq!(stdout, "");
    let golden = ui().join("invalid.stderr");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, &stderr).unwrap();
    }
    let expected = std::fs::read_to_string(&golden).expect("golden file");
    assert_eq!(
        stderr, expected,
        "set UPDATE_GOLDEN=1 to accept the new output"
    );
}

#[test]
fn a_missing_file_is_an_error() {
    let (code, _, stderr) = check(&ui(), "nope.toml");
    assert_eq!(code, 1);
    assert!(stderr.contains("cannot read the file"), "{stderr}");
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// Runs `switchyard match` in the repo with the example rules.toml.
fn match_cmd(args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("match")
        .args(args)
        .current_dir(repo())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run switchyard match");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn match_lists_matching_routes_and_why_the_others_do_not_match() {
    let envelope =
        r#"{"source": "bank", "type": "deposit", "data": {"account": "a", "amount": 0}}"#;
    let (code, stdout, stderr) = match_cmd(&["-", "--json"], envelope);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["matched"], serde_json::json!(["audit-all"]));
    let unmatched = v["unmatched"].as_array().unwrap();
    assert_eq!(unmatched.len(), 3, "{v}");
    assert_eq!(unmatched[0]["route"], "orders");
    assert_eq!(unmatched[0]["reason"], "source: \"bank\" is not \"shop\"");
    assert_eq!(unmatched[1]["route"], "order-history");
    assert_eq!(unmatched[2]["route"], "ledger");
    assert_eq!(unmatched[2]["reason"], "data.amount: 0 is not > 0");

    // Data only, with --source and --type; plain text output.
    let (code, stdout, _) = match_cmd(
        &["--source", "shop", "--type", "order.created", "-"],
        r#"{"customer": "ada", "total": 80}"#,
    );
    assert_eq!(code, 0);
    assert!(
        stdout.starts_with("matched: audit-all, orders, order-history\n"),
        "{stdout}"
    );
    assert!(stdout.contains("not ledger: "), "{stdout}");
}

#[test]
fn match_fails_clearly_on_bad_input_but_not_on_no_match() {
    let (code, stdout, _) = match_cmd(&["--source", "nowhere", "--type", "x", "-"], "{}");
    assert_eq!(code, 0, "an unmatched route is not an error");
    assert!(
        stdout.starts_with("matched: audit-all\nnot orders: "),
        "{stdout}"
    );
    let (code, _, stderr) = match_cmd(&["-"], "{not json");
    assert_eq!(code, 2);
    assert!(stderr.contains("not valid JSON"), "{stderr}");
    let (code, _, stderr) = match_cmd(&["-"], r#"{"type": "x"}"#);
    assert_eq!(code, 2);
    assert!(stderr.contains("no `source`"), "{stderr}");
    let (code, _, stderr) = match_cmd(&["--config", "missing.toml", "-"], "{}");
    assert_eq!(code, 2);
    assert!(stderr.contains("cannot read the file"), "{stderr}");
}

#[test]
fn schema_command_prints_the_committed_schema() {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("schema")
        .output()
        .unwrap();
    let committed = std::fs::read_to_string(repo().join("docs/rules.schema.json")).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), committed);
}

#[test]
fn check_warns_about_wildcard_sets_that_may_match_slowly() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = format!(
        "[[sources]]\nname = \"s\"\n[[plugins]]\nname = \"p\"\nwasm = \"{}\"\n",
        repo().join("plugins/audit").display()
    );
    for i in 0..300 {
        text.push_str(&format!(
            "[[routes]]\nname = \"r{i}\"\nmatch = {{ subject = [{{ wildcard = \"*a{i}*b*c*\" }}] }}\nto = [\"p\"]\n"
        ));
    }
    std::fs::write(dir.path().join("rules.toml"), text).unwrap();
    let (code, stdout, stderr) = check(dir.path(), "rules.toml");
    assert_eq!(code, 0, "a warning is not an error: {stderr}");
    assert!(
        stdout.contains("ok (1 sources, 1 plugins, 300 routes)"),
        "{stdout}"
    );
    assert!(
        stderr.starts_with("warning: rules.toml: field `subject`:")
            && stderr.contains("may be slow"),
        "{stderr}"
    );
}
