//! `switchyard new NAME`: a plugin crate from a template that builds for
//! `wasm32-wasip2` and passes its test as created.

use std::path::{Path, PathBuf};

/// Why a plugin crate could not be created.
#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    #[error(
        "`{0}` is not a usable plugin name: use 1 to 64 lower-case letters, digits, `-` or `_`, starting with a letter"
    )]
    BadName(String),
    #[error("{0} already exists; pick another name or --dir")]
    Exists(PathBuf),
    #[error(
        "cannot find the switchyard-sdk crate to depend on (looked for {0}); create the plugin inside the Switchyard workspace, or pass --sdk PATH"
    )]
    NoSdk(PathBuf),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What `new` created.
#[derive(Debug)]
pub struct Created {
    pub dir: PathBuf,
    /// Whether the crate joined an enclosing Cargo workspace.
    pub in_workspace: bool,
}

/// Where the SDK's sources were when this binary was built.
fn built_in_sdk() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|p| p.join("guest-sdk"))
        .unwrap_or_else(|| PathBuf::from("guest-sdk"))
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 64
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

/// `order-history` → `OrderHistory`.
fn type_name(name: &str) -> String {
    name.split(['-', '_'])
        .filter(|p| !p.is_empty())
        .map(|p| {
            let mut c = p.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// The enclosing Cargo workspace that has `switchyard-sdk` among its
/// dependencies and takes `dir` as a member (by a `prefix/*` glob or exactly).
fn workspace_for(dir: &Path) -> Option<PathBuf> {
    let mut at = dir.parent();
    while let Some(root) = at {
        let manifest = root.join("Cargo.toml");
        if let Ok(text) = std::fs::read_to_string(&manifest)
            && let Ok(doc) = text.parse::<toml::Table>()
            && let Some(ws) = doc.get("workspace").and_then(|w| w.as_table())
        {
            let has_sdk = ws
                .get("dependencies")
                .and_then(|d| d.as_table())
                .is_some_and(|d| d.contains_key("switchyard-sdk"));
            let rel = dir.strip_prefix(root).ok()?;
            let member = ws
                .get("members")
                .and_then(|m| m.as_array())
                .into_iter()
                .flatten()
                .filter_map(|m| m.as_str())
                .any(|m| match m.strip_suffix("/*") {
                    Some(prefix) => rel.parent() == Some(Path::new(prefix)),
                    None => rel == Path::new(m),
                });
            // The innermost workspace decides; if it does not take the crate,
            // the crate is standalone.
            return (has_sdk && member).then(|| root.to_path_buf());
        }
        at = root.parent();
    }
    None
}

/// Creates the crate `dir/name`.
pub fn new_plugin(name: &str, dir: &Path, sdk: Option<&Path>) -> Result<Created, ScaffoldError> {
    if !valid_name(name) {
        return Err(ScaffoldError::BadName(name.to_string()));
    }
    let crate_dir = dir.join(name);
    if crate_dir.exists() {
        return Err(ScaffoldError::Exists(crate_dir));
    }
    let abs = std::path::absolute(&crate_dir).unwrap_or_else(|_| crate_dir.clone());
    let workspace = workspace_for(&abs);
    let manifest = match &workspace {
        Some(_) => format!(
            r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
crate-type = ["cdylib"]

[dependencies]
switchyard-sdk.workspace = true
serde.workspace = true
serde_json.workspace = true
"#
        ),
        None => {
            let sdk = sdk.map(Path::to_path_buf).unwrap_or_else(built_in_sdk);
            if !sdk.join("Cargo.toml").is_file() {
                return Err(ScaffoldError::NoSdk(sdk));
            }
            let sdk = std::path::absolute(&sdk).unwrap_or(sdk);
            format!(
                r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
crate-type = ["cdylib"]

[dependencies]
switchyard-sdk = {{ path = {sdk:?} }}
serde = {{ version = "1", features = ["derive"] }}
serde_json = "1"

# A crate of its own, not a member of an enclosing workspace.
[workspace]
"#,
                sdk = sdk.display().to_string()
            )
        }
    };
    let fill = |template: &str| {
        template
            .replace("{{name}}", name)
            .replace("{{type_name}}", &type_name(name))
            .replace("{{wasm_path}}", &crate_dir.display().to_string())
    };
    let files = [
        (PathBuf::from("Cargo.toml"), manifest),
        (
            PathBuf::from("src/lib.rs"),
            fill(include_str!("../templates/plugin/lib.rs.in")),
        ),
        (
            PathBuf::from("README.md"),
            fill(include_str!("../templates/plugin/README.md.in")),
        ),
    ];
    for (rel, text) in files {
        let path = crate_dir.join(rel);
        let write = |path: &Path| {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(path, &text)
        };
        write(&path).map_err(|source| ScaffoldError::Write { path, source })?;
    }
    Ok(Created {
        dir: crate_dir,
        in_workspace: workspace.is_some(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_name("order-history"));
        assert!(valid_name("a_1"));
        for bad in ["", "Order", "1a", "a.b", "a/b", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert_eq!(type_name("order-history"), "OrderHistory");
        assert_eq!(type_name("a_b-c"), "ABC");
    }

    #[test]
    fn joins_a_workspace_that_takes_it_and_refuses_to_overwrite() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(
            root.path().join("Cargo.toml"),
            "[workspace]\nmembers = [\"plugins/*\"]\n[workspace.dependencies]\nswitchyard-sdk = { path = \"sdk\" }\n",
        )
        .unwrap();
        let created = new_plugin("demo", &root.path().join("plugins"), None).unwrap();
        assert!(created.in_workspace);
        let manifest = std::fs::read_to_string(created.dir.join("Cargo.toml")).unwrap();
        assert!(manifest.contains("switchyard-sdk.workspace = true"));
        let lib = std::fs::read_to_string(created.dir.join("src/lib.rs")).unwrap();
        assert!(lib.contains("struct Demo;") && !lib.contains("{{"));
        assert!(matches!(
            new_plugin("demo", &root.path().join("plugins"), None),
            Err(ScaffoldError::Exists(_))
        ));
        // Elsewhere in the tree: a crate of its own, on the SDK by path.
        let other = new_plugin("x", &root.path().join("elsewhere"), None).unwrap();
        assert!(!other.in_workspace);
        let manifest = std::fs::read_to_string(other.dir.join("Cargo.toml")).unwrap();
        assert!(
            manifest.contains("switchyard-sdk = { path = ") && manifest.contains("[workspace]")
        );
    }
}
