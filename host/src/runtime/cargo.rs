//! Builds a plugin crate for `wasm32-wasip2` on demand (like `spin up --build`),
//! so that `serve` on a fresh clone just works.

use std::path::{Path, PathBuf};
use std::process::Stdio;

pub const TARGET: &str = "wasm32-wasip2";

/// Why a plugin crate could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot run cargo: {0}")]
    Spawn(std::io::Error),
    #[error("the {TARGET} target is not installed; run `rustup target add {TARGET}`\n{stderr}")]
    TargetMissing { stderr: String },
    #[error("cargo build of {crate_dir} failed:\n{stderr}")]
    Failed { crate_dir: String, stderr: String },
    #[error("cargo built {crate_dir} but produced no .wasm (is it a `cdylib`?)")]
    NoArtifact { crate_dir: String },
}

/// Builds the crate in `crate_dir` (release, `wasm32-wasip2`) into `target_dir`,
/// and returns the path of the `.wasm` component it produced.
pub async fn build_plugin(crate_dir: &Path, target_dir: &Path) -> Result<PathBuf, BuildError> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = tokio::process::Command::new(cargo)
        .arg("build")
        .arg("--release")
        .args(["--target", TARGET])
        .arg("--manifest-path")
        .arg(crate_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir)
        .args(["--message-format", "json-render-diagnostics"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(BuildError::Spawn)?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        if stderr.contains("E0463") || stderr.contains("target may not be installed") {
            return Err(BuildError::TargetMissing { stderr });
        }
        return Err(BuildError::Failed {
            crate_dir: crate_dir.display().to_string(),
            stderr,
        });
    }
    let manifest = std::fs::canonicalize(crate_dir.join("Cargo.toml"))
        .unwrap_or_else(|_| crate_dir.join("Cargo.toml"));
    find_wasm_artifact(&String::from_utf8_lossy(&output.stdout), &manifest).ok_or_else(|| {
        BuildError::NoArtifact {
            crate_dir: crate_dir.display().to_string(),
        }
    })
}

/// Finds, in cargo's JSON messages, the `.wasm` file of the package whose
/// manifest is `manifest`.
fn find_wasm_artifact(messages: &str, manifest: &Path) -> Option<PathBuf> {
    let mut found = None;
    for line in messages.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let same_package = msg["manifest_path"]
            .as_str()
            .is_some_and(|p| Path::new(p) == manifest);
        if !same_package {
            continue;
        }
        let wasm = msg["filenames"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| f.as_str())
            .find(|f| f.ends_with(".wasm"));
        if let Some(w) = wasm {
            found = Some(PathBuf::from(w));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cdylib_of_the_right_package() {
        let messages = r#"{"reason":"compiler-artifact","manifest_path":"/w/guest-sdk/Cargo.toml","filenames":["/t/libswitchyard_sdk.rlib"]}
not json
{"reason":"compiler-artifact","manifest_path":"/w/plugins/audit/Cargo.toml","filenames":["/t/wasm32-wasip2/release/audit.wasm"]}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            find_wasm_artifact(messages, Path::new("/w/plugins/audit/Cargo.toml")),
            Some(PathBuf::from("/t/wasm32-wasip2/release/audit.wasm"))
        );
        assert_eq!(
            find_wasm_artifact(messages, Path::new("/w/plugins/x/Cargo.toml")),
            None
        );
    }
}
