//! Crash test, as a real process (issue 4, "Reliable delivery"): the
//! `switchyard` binary is killed with SIGKILL at random moments while
//! concurrent producers post events, and restarted on the same data dir each
//! time. At the end every event that got a 202 must be delivered on every
//! route it matches: losses fail the test, duplicates (deliveries that ran more
//! than once) are allowed and reported.
//!
//! CI runs it small. By hand, large and loud:
//!
//! ```sh
//! SWITCHYARD_CRASH_EVENTS=50000 SWITCHYARD_CRASH_KILLS=20 \
//!   cargo test -p switchyard --test crash -- --nocapture
//! ```
//!
//! `SWITCHYARD_CRASH_SEED` replays the kill schedule of an earlier run (its
//! seed is printed), `SWITCHYARD_CRASH_POSTERS` sets the concurrent producers,
//! `SWITCHYARD_CRASH_KEEP=1` keeps the data dir and the server logs of a run
//! that passed (a failed run always keeps them).
//! The kill moments are random points of progress (after a random number of
//! accepted events, plus a random delay), so a kill always lands while events
//! are coming in and deliveries are running.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use common::workload::{
    KINDS, Verdict, config, env_or, expected, expected_routes, get, judge, serve, show_some,
};
use common::{build_dir, plugin_crate};
use futures_util::StreamExt;
use serde_json::{Value, json};

/// What the producers and the killer share.
struct Shared {
    /// The base URL of the current life.
    base: RwLock<String>,
    /// The next event number to post.
    next: AtomicUsize,
    /// Events answered 202.
    accepted: AtomicUsize,
    /// Tries not answered, or not readably (the server was killed or down).
    failed_tries: AtomicUsize,
    /// Tries answered with another status than 202, by status.
    refused: Mutex<BTreeMap<u16, usize>>,
    /// Set to make the producers give up.
    stop: AtomicBool,
    out: Mutex<Vec<Accepted>>,
    /// Problems with 202 answers (wrong routes listed).
    bad_answers: Mutex<Vec<String>>,
}

/// An event answered 202.
#[derive(Debug, Clone)]
struct Accepted {
    n: usize,
    id: String,
    kind: &'static str,
}

/// Posts events until `total` are accepted; a try that fails (connection
/// refused or reset by a kill, a non-202 answer, an unreadable answer) is
/// repeated with the same body, and counts for nothing.
async fn producer(shared: Arc<Shared>, client: reqwest::Client, total: usize) {
    loop {
        let n = shared.next.fetch_add(1, Ordering::Relaxed);
        if n >= total {
            return;
        }
        let kind = KINDS[n % KINDS.len()];
        let body = json!({ "kind": kind, "n": n, "customer": format!("c{}", n % 97) });
        loop {
            if shared.stop.load(Ordering::Relaxed) {
                return;
            }
            let base = shared.base.read().expect("base lock").clone();
            let sent = client
                .post(format!("{base}/webhooks/shop"))
                .json(&body)
                .send()
                .await;
            let answer = match sent {
                Ok(resp) if resp.status().as_u16() == 202 => resp.json::<Value>().await.ok(),
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    *shared
                        .refused
                        .lock()
                        .expect("lock")
                        .entry(status)
                        .or_default() += 1;
                    tokio::time::sleep(Duration::from_millis(10 + fastrand::u64(0..20))).await;
                    continue;
                }
                Err(_) => None,
            };
            let id = answer
                .as_ref()
                .and_then(|a| a["id"].as_str())
                .map(str::to_string);
            let Some(id) = id else {
                shared.failed_tries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10 + fastrand::u64(0..20))).await;
                continue;
            };
            let routes: Vec<String> = answer
                .as_ref()
                .and_then(|a| a["routes"].as_array())
                .into_iter()
                .flatten()
                .filter_map(|r| r.as_str().map(str::to_string))
                .collect();
            if routes != expected_routes(kind) {
                shared
                    .bad_answers
                    .lock()
                    .expect("lock")
                    .push(format!("{id} ({kind}): 202 listed routes {routes:?}"));
            }
            shared
                .out
                .lock()
                .expect("lock")
                .push(Accepted { n, id, kind });
            shared.accepted.fetch_add(1, Ordering::Relaxed);
            break;
        }
    }
}

/// A kill, for the summary.
struct Kill {
    life: usize,
    uptime: Duration,
    accepted_before: usize,
}

/// What the server logs said, over every life.
#[derive(Default)]
struct LogFacts {
    /// Executions of `handle` per (event id, plugin), from the audit plugin's
    /// log line (written before its kv write commits).
    runs: HashMap<(String, String), usize>,
    /// "resuming unfinished deliveries" at each start.
    resumed: Vec<u64>,
    /// `delivery failed` warnings.
    failed_attempts: usize,
    /// ERROR lines (first few).
    errors: Vec<String>,
    error_count: usize,
    warn_count: usize,
}

fn read_logs(logs: &[PathBuf]) -> LogFacts {
    let mut facts = LogFacts::default();
    for log in logs {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let mut resumed = 0;
        // A kill may tear the last line; it does not parse and is skipped.
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let fields = &v["fields"];
            let message = fields["message"].as_str().unwrap_or("");
            if v["target"] == "plugin" && message.starts_with("audit: ") {
                let id = fields["event_id"].as_str().unwrap_or("?").to_string();
                let plugin = fields["plugin"].as_str().unwrap_or("?").to_string();
                *facts.runs.entry((id, plugin)).or_default() += 1;
            } else if message == "resuming unfinished deliveries" {
                resumed = fields["count"].as_u64().unwrap_or(0);
            } else if message == "delivery failed" {
                facts.failed_attempts += 1;
            }
            if v["level"] == "WARN" {
                facts.warn_count += 1;
            }
            if v["level"] == "ERROR" {
                facts.error_count += 1;
                if facts.errors.len() < 10 {
                    facts.errors.push(line.to_string());
                }
            }
        }
        facts.resumed.push(resumed);
    }
    facts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_event_is_delivered_despite_sigkills() {
    let total: usize = env_or("SWITCHYARD_CRASH_EVENTS", 2000);
    let kills: usize = env_or("SWITCHYARD_CRASH_KILLS", 5);
    let posters: usize = env_or("SWITCHYARD_CRASH_POSTERS", 24);
    let seed: u64 = env_or("SWITCHYARD_CRASH_SEED", fastrand::u64(..));
    assert!(total > 0 && posters > 0, "nothing to post");
    println!(
        "crash test: seed {seed} (SWITCHYARD_CRASH_SEED), {total} events, {kills} kills, {posters} producers"
    );
    let mut rng = fastrand::Rng::with_seed(seed);

    // Build the plugin once and give both plugin entries that one file, so
    // that restarts do not run cargo and load the compiled-component cache.
    let built = switchyard::runtime::cargo::build_plugin(
        Path::new(&plugin_crate("audit")),
        Path::new(&build_dir()),
    )
    .await
    .unwrap_or_else(|e| panic!("build plugins/audit: {e}"));
    let dir = tempfile::tempdir().expect("tempdir");
    let wasm = dir.path().join("audit.wasm");
    std::fs::copy(&built, &wasm).expect("copy audit.wasm");
    let cfg = dir.path().join("rules.toml");
    std::fs::write(&cfg, config(&dir.path().join("data"), &wasm)).expect("write rules.toml");
    let log_of = |life: usize| dir.path().join(format!("serve-{life}.log"));

    // Kill moments: after a random number of accepted events each (sorted),
    // plus a random delay, so that kills land among in-flight requests and
    // running deliveries.
    let mut thresholds: Vec<usize> = (0..kills).map(|_| rng.usize(total / 20..=total)).collect();
    thresholds.sort_unstable();

    let started = Instant::now();
    let mut logs = vec![log_of(0)];
    let mut life = serve(&cfg, &logs[0]).await;
    let shared = Arc::new(Shared {
        base: RwLock::new(life.base.clone()),
        next: AtomicUsize::new(0),
        accepted: AtomicUsize::new(0),
        failed_tries: AtomicUsize::new(0),
        refused: Mutex::new(BTreeMap::new()),
        stop: AtomicBool::new(false),
        out: Mutex::new(Vec::with_capacity(total)),
        bad_answers: Mutex::new(Vec::new()),
    });
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client");
    let producers: Vec<_> = (0..posters)
        .map(|_| tokio::spawn(producer(shared.clone(), client.clone(), total)))
        .collect();

    // The killer.
    let posting_deadline = started + Duration::from_secs(60 + total as u64 / 20);
    let mut kill_log = Vec::new();
    for threshold in thresholds {
        while shared.accepted.load(Ordering::Relaxed) < threshold {
            if let Ok(Some(status)) = life.child.try_wait() {
                shared.stop.store(true, Ordering::Relaxed);
                let log = std::fs::read_to_string(logs.last().expect("log")).unwrap_or_default();
                panic!("the server exited on its own ({status}):\n{log}");
            }
            if Instant::now() > posting_deadline {
                shared.stop.store(true, Ordering::Relaxed);
                panic!(
                    "posting is stuck: {} of {total} accepted",
                    shared.accepted.load(Ordering::Relaxed)
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.u64(0..=150))).await;
        life.child.start_kill().expect("SIGKILL");
        let _ = life.child.wait().await;
        kill_log.push(Kill {
            life: logs.len() - 1,
            uptime: life.started.elapsed(),
            accepted_before: shared.accepted.load(Ordering::Relaxed),
        });
        logs.push(log_of(logs.len()));
        life = serve(&cfg, logs.last().expect("log")).await;
        *shared.base.write().expect("base lock") = life.base.clone();
    }
    for p in producers {
        let finished = tokio::time::timeout_at(posting_deadline.into(), p).await;
        if !matches!(finished, Ok(Ok(()))) {
            shared.stop.store(true, Ordering::Relaxed);
            panic!(
                "producers did not finish: {} of {total} accepted",
                shared.accepted.load(Ordering::Relaxed)
            );
        }
    }
    let posted_in = started.elapsed();
    let accepted = shared.out.lock().expect("lock").clone();
    assert_eq!(accepted.len(), total);
    let mut numbers: Vec<usize> = accepted.iter().map(|a| a.n).collect();
    numbers.sort_unstable();
    numbers.dedup();
    assert_eq!(numbers.len(), total, "an event number was accepted twice");

    // Settle: every accepted event delivered on every route it matches.
    let base = life.base.clone();
    let settle_deadline = Instant::now() + Duration::from_secs(120 + total as u64 / 500);
    let mut pending: Vec<usize> = (0..accepted.len()).collect();
    let mut why: BTreeMap<usize, String> = BTreeMap::new();
    let mut extra_attempts = 0;
    let mut multi_attempt = Vec::new();
    loop {
        let results: Vec<(usize, Verdict)> = futures_util::stream::iter(pending.iter().copied())
            .map(|i| {
                let (client, a) = (&client, &accepted[i]);
                let url = format!("{base}/api/events/{}", a.id);
                async move {
                    let verdict = match get(client, &url).await {
                        Ok((200, body)) => match serde_json::from_str::<Value>(&body) {
                            Ok(t) => judge(&t, a.kind),
                            Err(e) => Verdict::Waiting(format!("timeline is not JSON: {e}")),
                        },
                        // Posting is over: whatever was acknowledged is in
                        // the journal of the life that runs now, or never.
                        Ok((404, _)) => Verdict::Lost("not in the journal (404)".into()),
                        Ok((status, body)) => {
                            Verdict::Waiting(format!("timeline: {status} {body}"))
                        }
                        Err(e) => Verdict::Waiting(format!("timeline: {e}")),
                    };
                    (i, verdict)
                }
            })
            .buffer_unordered(8)
            .collect()
            .await;
        pending.clear();
        for (i, verdict) in results {
            match verdict {
                Verdict::Delivered(extra) => {
                    why.remove(&i);
                    if extra > 0 {
                        extra_attempts += extra;
                        multi_attempt.push(accepted[i].id.clone());
                    }
                }
                Verdict::Waiting(reason) => {
                    pending.push(i);
                    why.insert(i, reason);
                }
                Verdict::Lost(reason) => {
                    why.insert(i, reason);
                }
            }
        }
        if pending.is_empty() || Instant::now() > settle_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let settled_in = started.elapsed() - posted_in;
    let mut failures: Vec<String> = why
        .iter()
        .map(|(&i, reason)| {
            let a = &accepted[i];
            format!("lost: {} (#{} {}): {reason}", a.id, a.n, a.kind)
        })
        .collect();

    // Effects: each plugin's kv holds every event it was given.
    let mut kv_checks = Vec::new();
    for a in &accepted {
        let mut plugins: Vec<&str> = expected(a.kind).into_iter().map(|(_, p)| p).collect();
        plugins.dedup();
        for p in plugins {
            kv_checks.push((p, a));
        }
    }
    let kv_failures: Vec<String> = futures_util::stream::iter(kv_checks)
        .map(|(plugin, a)| {
            let url = format!("{base}/api/plugins/{plugin}/kv/{}", a.id);
            let client = &client;
            async move {
                match get(client, &url).await {
                    Ok((200, body)) if body == a.kind => None,
                    Ok((status, body)) => Some(format!(
                        "kv: {plugin}[{}] (#{} {}) is {status} {body:?}",
                        a.id, a.n, a.kind
                    )),
                    Err(e) => Some(format!("kv: {plugin}[{}]: {e}", a.id)),
                }
            }
        })
        .buffer_unordered(8)
        .filter_map(|f| async move { f })
        .collect()
        .await;
    failures.extend(kv_failures);
    failures.extend(shared.bad_answers.lock().expect("lock").iter().cloned());
    if let Ok(Some(status)) = life.child.try_wait() {
        failures.push(format!("the last server exited on its own ({status})"));
    }
    life.child.start_kill().expect("SIGKILL");
    let _ = life.child.wait().await;

    // Duplicates, from the plugin's log lines: runs of `handle` beyond the
    // deliveries planned for that (event, plugin).
    let facts = read_logs(&logs);
    let ids: HashSet<&str> = accepted.iter().map(|a| a.id.as_str()).collect();
    let mut duplicate_runs = 0;
    let mut duplicated = 0;
    let mut missing_log = Vec::new();
    for (i, a) in accepted.iter().enumerate() {
        if why.contains_key(&i) {
            continue; // lost, reported as such
        }
        let mut per_plugin: BTreeMap<&str, usize> = BTreeMap::new();
        for (_, p) in expected(a.kind) {
            *per_plugin.entry(p).or_default() += 1;
        }
        let mut dup = 0;
        for (p, want) in per_plugin {
            let seen = facts
                .runs
                .get(&(a.id.clone(), p.to_string()))
                .copied()
                .unwrap_or(0);
            dup += seen.saturating_sub(want);
            if seen < want {
                missing_log.push(format!("{} {p}: {seen} runs logged, {want} expected", a.id));
            }
        }
        duplicate_runs += dup;
        duplicated += usize::from(dup > 0);
    }
    let unacknowledged: HashSet<&str> = facts
        .runs
        .keys()
        .map(|(id, _)| id.as_str())
        .filter(|id| !ids.contains(id))
        .collect();

    let deliveries: usize = accepted.iter().map(|a| expected(a.kind).len()).sum();
    let lost = why.len();
    println!(
        "crash test summary (seed {seed}):\n  \
         accepted {} of {total} events ({} tries unanswered, refused by status: {:?}), {deliveries} deliveries\n  \
         delivered: {} events, {} lost\n  \
         duplicates: {duplicate_runs} extra runs of handle on {duplicated} events (plugin logs); \
         {extra_attempts} extra attempts on {} delivered deliveries (timelines)\n  \
         unacknowledged events delivered anyway: {}\n  \
         kills: {} ({}), resumed at each start: {:?}\n  \
         failed attempts logged: {}, warnings: {}, errors: {}\n  \
         elapsed: {:.1?} (posting and killing {:.1?}, settling {:.1?})",
        accepted.len(),
        shared.failed_tries.load(Ordering::Relaxed),
        shared.refused.lock().expect("lock"),
        accepted.len() - lost,
        lost,
        multi_attempt.len(),
        unacknowledged.len(),
        kill_log.len(),
        kill_log
            .iter()
            .map(|k| format!(
                "life {} after {:.1?} at {} accepted",
                k.life, k.uptime, k.accepted_before
            ))
            .collect::<Vec<_>>()
            .join(", "),
        facts.resumed,
        facts.failed_attempts,
        facts.warn_count,
        facts.error_count,
        started.elapsed(),
        posted_in,
        settled_in,
    );
    if !multi_attempt.is_empty() {
        println!(
            "  deliveries with several attempts:{}",
            show_some(&multi_attempt)
        );
    }
    if !missing_log.is_empty() {
        println!(
            "  delivered, yet fewer plugin log lines than deliveries:{}",
            show_some(&missing_log)
        );
    }
    if !facts.errors.is_empty() {
        println!("  error lines:{}", show_some(&facts.errors));
    }
    if failures.is_empty() {
        if std::env::var_os("SWITCHYARD_CRASH_KEEP").is_some() {
            println!(
                "  data dir and serve-N.log kept in {}",
                dir.keep().display()
            );
        }
    } else {
        let kept = dir.keep();
        panic!(
            "{} problems (seed {seed}; data dir and serve-N.log kept in {}):{}",
            failures.len(),
            kept.display(),
            show_some(&failures)
        );
    }
}
