//! `switchyard check` as a user runs it: exit codes, and every problem of a
//! broken file reported with file:line:col and the key (golden file).

use std::path::Path;
use std::process::Command;

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
        "rules.toml: ok (2 sources, 3 plugins, 3 routes)"
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
