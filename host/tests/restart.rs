//! Nothing accepted is lost when the process dies between the 202 and the
//! delivery: the real binary is killed with SIGKILL while its plugin is stuck,
//! restarted with a working plugin, and delivers every accepted event. Also
//! what the process sets up for itself (no transparent huge pages).

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::{build_dir, fixture, plugin_crate, wait_for};
use serde_json::json;

struct Running {
    child: Child,
    base: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `switchyard serve` on an ephemeral port and waits until it listens.
fn serve(config: &Path, log: &Path) -> Running {
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).expect("log file"))
        .spawn()
        .expect("spawn switchyard");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read stdout");
    let base = line
        .trim()
        .strip_prefix("switchyard listening on ")
        .unwrap_or_else(|| {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            panic!("server did not start: {line:?}\n{log}")
        })
        .to_string();
    Running { child, base }
}

async fn timeline(client: &reqwest::Client, base: &str, id: &str) -> serde_json::Value {
    client
        .get(format!("{base}/api/events/{id}"))
        .send()
        .await
        .expect("get timeline")
        .json()
        .await
        .expect("timeline json")
}

fn config(data: &Path, sink_wasm: &str, timeout: &str) -> String {
    format!(
        r#"
[server]
data_dir = "{data}"
build_dir = "{build}"
workers = 2

[[sources]]
name = "s"

[[plugins]]
name = "sink"
wasm = "{sink_wasm}"
timeout = "{timeout}"

[[routes]]
name = "all"
to = ["sink"]
"#,
        data = data.display(),
        build = build_dir(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_events_are_delivered_after_a_kill_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = dir.path().join("rules.toml");
    let log = dir.path().join("serve.log");
    let client = reqwest::Client::new();

    // First life: the plugin never returns, so nothing gets delivered.
    let stuck = fixture(dir.path(), "stuck", common::LOOP);
    std::fs::write(&cfg, config(&data, &stuck, "10m")).unwrap();
    let first = serve(&cfg, &log);
    let mut ids = Vec::new();
    for i in 0..20 {
        let resp = client
            .post(format!("{}/webhooks/s", first.base))
            .json(&json!({"n": i}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 202);
        let body: serde_json::Value = resp.json().await.unwrap();
        ids.push(body["id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        let t = timeline(&client, &first.base, id).await;
        assert_eq!(t["deliveries"][0]["status"], "pending", "{t}");
    }
    drop(first); // SIGKILL

    // Second life: the same plugin name, now a working plugin.
    std::fs::write(&cfg, config(&data, &plugin_crate("audit"), "1s")).unwrap();
    let second = serve(&cfg, &log);
    for id in &ids {
        let url = format!("{}/api/plugins/sink/kv/{id}", second.base);
        let client = &client;
        wait_for(&format!("delivery of {id} after restart"), || async {
            let resp = client.get(&url).send().await.ok()?;
            (resp.status() == 200).then_some(())
        })
        .await;
        let t = timeline(client, &second.base, id).await;
        let d = &t["deliveries"][0];
        assert_eq!(d["status"], "delivered", "{t}");
        assert_eq!(d["attempts"].as_array().unwrap().len(), 1, "{t}");
    }
}

fn shutdown_config(data: &Path, grace: &str) -> String {
    format!(
        r#"
[server]
data_dir = "{data}"
build_dir = "{build}"
shutdown_grace = "{grace}"

[[sources]]
name = "s"

[[plugins]]
name = "flaky"
wasm = "{flaky}"
timeout = "30s"

[[routes]]
name = "all"
to = ["flaky"]
"#,
        data = data.display(),
        build = build_dir(),
        flaky = plugin_crate("flaky"),
    )
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
}

/// Waits for the process to exit on its own; returns its status.
fn wait_exit(child: &mut Child, within: std::time::Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the server did not exit within {within:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

async fn post(client: &reqwest::Client, base: &str, body: serde_json::Value) -> (u16, String) {
    let resp = client
        .post(format!("{base}/webhooks/s"))
        .json(&body)
        .send()
        .await
        .expect("post");
    (
        resp.status().as_u16(),
        resp.text().await.unwrap_or_default(),
    )
}

/// A server of `shutdown_config(grace)` with one delivery of a plugin that
/// sleeps `ms`, started 400 ms ago: returns the temp dir, the config and log
/// paths, the running server and the event id.
async fn with_delivery_in_flight(
    grace: &str,
    ms: u64,
) -> (
    tempfile::TempDir,
    std::path::PathBuf,
    std::path::PathBuf,
    Running,
    String,
) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = dir.path().join("rules.toml");
    let log = dir.path().join("serve.log");
    std::fs::write(&cfg, shutdown_config(&data, grace)).unwrap();
    let server = serve(&cfg, &log);
    let client = reqwest::Client::new();
    let (status, body) = post(&client, &server.base, json!({"mode": "sleep", "ms": ms})).await;
    assert_eq!(status, 202, "{body}");
    let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Let the delivery start.
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    (dir, cfg, log, server, id)
}

/// SIGTERM: new webhooks get 503 at once, the delivery in flight finishes
/// within the grace period and is committed, and the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_deliveries_and_exits_zero() {
    let (_dir, cfg, log, mut first, id) = with_delivery_in_flight("20s", 1500).await;
    let client = reqwest::Client::new();
    sigterm(&first.child);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let (status, body) = post(&client, &first.base, json!({})).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("shutting down"), "{body}");
    let ready = client
        .get(format!("{}/readyz", first.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status().as_u16(), 503);
    let exit = wait_exit(&mut first.child, std::time::Duration::from_secs(20));
    assert!(exit.success(), "exit status {exit:?}");
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(said.contains("journal checkpointed"), "{said}");

    // The delivery was finished and committed before the exit: after a
    // restart it is delivered, once, and the commit log had nothing left
    // for fjall (the checkpoint at shutdown).
    let second = serve(&cfg, &log);
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(!said.contains("replayed the commit log"), "{said}");
    let t = timeline(&client, &second.base, &id).await;
    let d = &t["deliveries"][0];
    assert_eq!(d["status"], "delivered", "{t}");
    assert_eq!(d["attempts"].as_array().unwrap().len(), 1, "{t}");
}

/// A delivery still running when the grace period ends is cut off, the
/// process still exits 0, and the delivery runs again after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_cut_off_at_shutdown_runs_again_after_restart() {
    let (_dir, cfg, log, mut first, id) = with_delivery_in_flight("200ms", 3000).await;
    let client = reqwest::Client::new();
    sigterm(&first.child);
    let exit = wait_exit(&mut first.child, std::time::Duration::from_secs(10));
    assert!(exit.success(), "exit status {exit:?}");

    let second = serve(&cfg, &log);
    let url = format!("{}/api/plugins/flaky/kv/done/{id}", second.base);
    wait_for("the cut-off delivery after restart", || async {
        let resp = client.get(&url).send().await.ok()?;
        (resp.status() == 200).then_some(())
    })
    .await;
    let t = timeline(&client, &second.base, &id).await;
    assert_eq!(t["deliveries"][0]["status"], "delivered", "{t}");
}

/// The real binary with the audit plugin, its config, data and log in `dir`:
/// for the tests that look at the running process itself.
#[cfg(target_os = "linux")]
fn serve_audit(dir: &Path) -> Running {
    let cfg = dir.join("rules.toml");
    std::fs::write(
        &cfg,
        config(&dir.join("data"), &plugin_crate("audit"), "1s"),
    )
    .unwrap();
    serve(&cfg, &dir.join("serve.log"))
}

/// The server turns transparent huge pages off for itself (`main.rs`): with
/// them, a 2 MiB first-touch fault stalled a group commit for ≈ 6 ms.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_server_runs_without_transparent_huge_pages() {
    let dir = tempfile::tempdir().unwrap();
    let running = serve_audit(dir.path());
    let status = std::fs::read_to_string(format!("/proc/{}/status", running.child.id())).unwrap();
    let thp = status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .unwrap_or_else(|| panic!("no THP_enabled line (Linux < 5.0?):\n{status}"));
    assert_eq!(thp.trim(), "0", "{status}");
}

/// Each thread of a running server, by name: (scheduling policy, nice), from
/// `/proc/PID/task/*/stat` (fields 19 and 41).
#[cfg(target_os = "linux")]
fn thread_priorities(pid: u32) -> Vec<(String, i64, i64)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let Ok(stat) = std::fs::read_to_string(task.unwrap().path().join("stat")) else {
            continue; // a thread that ended meanwhile
        };
        let name = &stat[stat.find('(').unwrap() + 1..stat.rfind(')').unwrap()];
        // The fields after the parenthesised name start at field 3 (state).
        let after: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        let field = |n: usize| after[n - 3].parse::<i64>().unwrap();
        threads.push((name.to_string(), field(41), field(19)));
    }
    threads
}

/// The store's background threads run at idle CPU priority by default
/// (`journal/priority.rs`): fjall's workers and the memtable reaper, which
/// frees flushed memtables away from the lock fjall would free them under
/// (90–115 ms for 64 MiB, docs/benchmarks.md). The threads that answer (the
/// journal writer, the HTTP workers) and the applier stay ordinary. With
/// `background_priority = "normal"` every thread is ordinary, and the reaper
/// at `nice` 19. Checked on the real binary, both ways.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_stores_background_threads_run_at_idle_priority_unless_told_normal() {
    const SCHED_OTHER: i64 = 0;
    const SCHED_IDLE: i64 = 5;
    for normal in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("rules.toml");
        let mut text = config(&dir.path().join("data"), &plugin_crate("audit"), "1s");
        if normal {
            text = text.replace("[server]\n", "[server]\nbackground_priority = \"normal\"\n");
        }
        std::fs::write(&cfg, text).unwrap();
        let running = serve(&cfg, &dir.path().join("serve.log"));
        let threads = thread_priorities(running.child.id());
        let of = |name: &str| -> Vec<(i64, i64)> {
            threads
                .iter()
                .filter(|(n, ..)| n == name)
                .map(|(_, policy, nice)| (*policy, *nice))
                .collect()
        };
        let background = if normal { SCHED_OTHER } else { SCHED_IDLE };
        for name in ["fjall:worker", "memtable-reaper"] {
            let seen = of(name);
            assert!(!seen.is_empty(), "no {name} among {threads:?}");
            for (policy, nice) in seen {
                assert_eq!(
                    policy, background,
                    "{name} (normal: {normal}) among {threads:?}"
                );
                if name == "memtable-reaper" && normal {
                    assert_eq!(nice, 19, "the reaper's nice among {threads:?}");
                }
            }
        }
        // The applier stays ordinary: lowered, it starved beside deliveries.
        for name in ["journal-writer", "journal-applier", "tokio-rt-worker"] {
            let seen = of(name);
            assert!(!seen.is_empty(), "no {name} among {threads:?}");
            assert!(
                seen.iter()
                    .all(|&(policy, nice)| policy == SCHED_OTHER && nice == 0),
                "{name} (normal: {normal}) among {threads:?}"
            );
        }
    }
}

/// Logging does not hold up the server: with its stderr a pipe nobody reads
/// (a stuck log collector), webhooks are still answered and delivered long
/// after the pipe's buffer (64 KiB on Linux) filled with the plugin's log
/// lines, which wait in the log writer's queue instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_reader_of_stderr_does_not_hold_up_the_server() {
    const EVENTS: usize = 1000;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("rules.toml");
    std::fs::write(
        &cfg,
        config(&dir.path().join("data"), &plugin_crate("audit"), "5s"),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn switchyard");
    // Held open and never read.
    let _stderr = child.stderr.take().expect("stderr");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read stdout");
    let base = line
        .trim()
        .strip_prefix("switchyard listening on ")
        .unwrap_or_else(|| panic!("server did not start: {line:?}"))
        .to_string();
    let running = Running { child, base };
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .unwrap();
    for i in 0..EVENTS {
        let (status, body) = post(&client, &running.base, json!({ "n": i })).await;
        assert_eq!(status, 202, "event {i}: {body}");
    }
    let metrics = format!("{}/metrics", running.base);
    wait_for("every event delivered, stderr still unread", || async {
        let text = client.get(&metrics).send().await.ok()?.text().await.ok()?;
        let delivered: f64 = text
            .lines()
            .filter(|l| {
                l.starts_with("switchyard_deliveries_total{") && l.contains("outcome=\"delivered\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        (delivered >= EVENTS as f64).then_some(())
    })
    .await;
}
