//! What the process-level tests (`crash.rs`, `multihost.rs`) share: the mix
//! of events they post, the routes those match, starting `switchyard serve`
//! as a real process, and judging an event's timeline.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Event types posted, in turn; see `expected` for the routes each matches.
pub const KINDS: [&str; 4] = [
    "order.created",
    "order.paid",
    "customer.updated",
    "refund.issued",
];

/// Every route matches a different subset; `paid` fans out to both plugins,
/// so an `order.paid` event has two deliveries to each of them.
pub const ROUTES: &str = r#"
[[routes]]
name = "all"
to = ["audit"]

[[routes]]
name = "orders"
match = { source = ["shop"], type = [{ prefix = "order." }] }
to = ["audit2"]

[[routes]]
name = "paid"
match = { type = ["order.paid"] }
to = ["audit", "audit2"]
"#;

/// The (route, plugin) deliveries an event of type `kind` must get.
pub fn expected(kind: &str) -> Vec<(&'static str, &'static str)> {
    let mut out = vec![("all", "audit")];
    if kind.starts_with("order.") {
        out.push(("orders", "audit2"));
    }
    if kind == "order.paid" {
        out.extend([("paid", "audit"), ("paid", "audit2")]);
    }
    out.sort_unstable();
    out
}

/// The route names of `expected`, in config order (as the 202 lists them).
pub fn expected_routes(kind: &str) -> Vec<String> {
    let routes: HashSet<&str> = expected(kind).into_iter().map(|(r, _)| r).collect();
    ["all", "orders", "paid"]
        .into_iter()
        .filter(|r| routes.contains(r))
        .map(str::to_string)
        .collect()
}

pub fn env_or<T: FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        Err(_) => default,
    }
}

/// One `switchyard serve` process.
pub struct Process {
    pub child: Child,
    pub base: String,
    pub log: PathBuf,
    pub started: Instant,
}

/// Starts `switchyard serve` on an ephemeral port, logging JSON lines to
/// `log`, and waits until it listens.
pub async fn serve(config: &Path, log: &Path) -> Process {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["serve", "--log-format", "json", "--listen", "127.0.0.1:0"])
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).expect("create log file"))
        .kill_on_drop(true)
        .spawn()
        .expect("spawn switchyard");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    let read = tokio::time::timeout(
        Duration::from_secs(120),
        BufReader::new(stdout).read_line(&mut line),
    )
    .await;
    let base = line
        .trim()
        .strip_prefix("switchyard listening on ")
        .map(str::to_string);
    match (read, base) {
        (Ok(Ok(_)), Some(base)) => Process {
            child,
            base,
            log: log.to_path_buf(),
            started,
        },
        (read, _) => {
            let _ = child.start_kill();
            let log = std::fs::read_to_string(log).unwrap_or_default();
            panic!("server did not start ({read:?}, stdout {line:?}):\n{log}")
        }
    }
}

/// Where an accepted event stands.
pub enum Verdict {
    /// Delivered on every route it matches, with this many attempts beyond
    /// one per delivery.
    Delivered(usize),
    /// Not yet: worth asking again.
    Waiting(String),
    /// Lost for good (not in the journal, or deliveries missing from its plan).
    Lost(String),
}

pub fn judge(t: &Value, kind: &str) -> Verdict {
    let Some(deliveries) = t["deliveries"].as_array() else {
        return Verdict::Lost(format!("timeline without deliveries: {t}"));
    };
    let mut planned: Vec<(&str, &str)> = deliveries
        .iter()
        .map(|d| {
            (
                d["route"].as_str().unwrap_or("?"),
                d["plugin"].as_str().unwrap_or("?"),
            )
        })
        .collect();
    planned.sort_unstable();
    let want = expected(kind);
    if planned != want {
        return Verdict::Lost(format!("planned deliveries {planned:?}, expected {want:?}"));
    }
    let mut extra = 0;
    let mut waiting = Vec::new();
    for d in deliveries {
        let attempts = d["attempts"].as_array().map_or(0, Vec::len);
        if d["status"] == "delivered" {
            extra += attempts.saturating_sub(1);
        } else {
            let last_error = d["attempts"]
                .as_array()
                .and_then(|a| a.last())
                .map(|a| a["error"].to_string())
                .unwrap_or_else(|| "none".into());
            waiting.push(format!(
                "{}/{}: {} after {attempts} attempts (last error {last_error})",
                d["route"].as_str().unwrap_or("?"),
                d["plugin"].as_str().unwrap_or("?"),
                d["status"],
            ));
        }
    }
    if waiting.is_empty() {
        Verdict::Delivered(extra)
    } else {
        Verdict::Waiting(waiting.join("; "))
    }
}

pub async fn get(client: &reqwest::Client, url: &str) -> Result<(u16, String), String> {
    let resp = client.get(url).send().await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp.text().await.map_err(|e| e.to_string())?;
    Ok((status, body))
}

pub fn show_some(items: &[String]) -> String {
    let mut text: String = items.iter().take(40).map(|i| format!("\n  {i}")).collect();
    if items.len() > 40 {
        text.push_str(&format!("\n  ... and {} more", items.len() - 40));
    }
    text
}

/// The rules.toml of the process tests: the two audit plugins and `ROUTES`.
pub fn config(data: &Path, wasm: &Path) -> String {
    // A generous deadline: a timeout fails a delivery for good, and this
    // machine may be busy; what is tested here is the journal, not the clock.
    format!(
        r#"
[server]
data_dir = "{data}"

[[sources]]
name = "shop"
type_pointer = "/kind"

[[plugins]]
name = "audit"
wasm = "{wasm}"
timeout = "10s"

[[plugins]]
name = "audit2"
wasm = "{wasm}"
timeout = "10s"
{ROUTES}"#,
        data = data.display(),
        wasm = wasm.display(),
    )
}
