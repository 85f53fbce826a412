//! Several hosts on one NATS JetStream, as real processes (like crash.rs):
//! two `switchyard serve` share a stream and its consumers while concurrent
//! producers post to both.
//!
//! - One host is killed with SIGKILL midway; the survivor finishes its work.
//! - nats-server is stopped mid-load: the hosts answer 503 while it is down,
//!   and recover by themselves once it is back.
//!
//! Either way every event answered 202 must be delivered on every route it
//! matches (losses fail the test); duplicates (deliveries that ran more than
//! once, from the audit plugin's log lines on both hosts) are counted and
//! printed.
//!
//! ```sh
//! SWITCHYARD_MULTIHOST_EVENTS=20000 SWITCHYARD_MULTIHOST_POSTERS=32 \
//!   cargo test -p switchyard --test multihost -- --nocapture
//! ```
//!
//! `SWITCHYARD_MULTIHOST_KEEP=1` keeps the hosts' logs and data dirs of a run
//! that passed (a failed run always keeps them).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use common::nats::NatsServer;
use common::workload::{
    KINDS, Process, Verdict, env_or, expected, expected_routes, get, judge, serve, show_some,
};
use common::{build_dir, plugin_crate};
use futures_util::StreamExt;
use serde_json::{Value, json};

/// One host's rules.toml: the crash test's, on the NATS engine; the hosts'
/// differ only in their data dir (the compiled-plugin cache).
fn config(data: &Path, wasm: &Path, nats: &NatsServer, stream: &str) -> String {
    let engine = format!(
        "\n[engine]\nkind = \"nats\"\nurl = \"{}\"\nstream = \"{stream}\"\n",
        nats.url()
    );
    common::workload::config(data, wasm) + &engine
}

/// The two scenarios each run four processes and dozens of producers: on a
/// 2-core machine they would mostly measure each other, so they take turns.
/// (A tokio mutex: it works across the tests' runtimes and does not poison.)
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// An event answered 202.
#[derive(Debug, Clone)]
struct Accepted {
    n: usize,
    id: String,
    kind: &'static str,
}

/// What the producers and the test share.
struct Shared {
    /// The hosts to post to (a killed one is taken out).
    bases: RwLock<Vec<String>>,
    /// The next event number to post.
    next: AtomicUsize,
    /// Tries not answered, or not readably (a host was killed).
    failed_tries: AtomicUsize,
    /// Tries answered with another status than 202, by status.
    refused: Mutex<BTreeMap<u16, usize>>,
    /// Set to make the producers give up.
    stop: AtomicBool,
    /// nats-server is being stopped or is down (set before the stop begins,
    /// cleared only once the restart has begun).
    nats_down: AtomicBool,
    out: Mutex<Vec<Accepted>>,
    /// Problems with 202 answers (wrong routes listed, acceptance without a
    /// store).
    bad_answers: Mutex<Vec<String>>,
}

impl Shared {
    fn new(bases: Vec<String>, total: usize) -> Arc<Shared> {
        Arc::new(Shared {
            bases: RwLock::new(bases),
            next: AtomicUsize::new(0),
            failed_tries: AtomicUsize::new(0),
            refused: Mutex::new(BTreeMap::new()),
            stop: AtomicBool::new(false),
            nats_down: AtomicBool::new(false),
            out: Mutex::new(Vec::with_capacity(total)),
            bad_answers: Mutex::new(Vec::new()),
        })
    }

    fn accepted(&self) -> usize {
        self.out.lock().expect("lock").len()
    }
}

fn kind_of(n: usize) -> &'static str {
    KINDS[n % KINDS.len()]
}

/// One try at posting event `n` to `base`: `Ok` with the id on 202, else
/// the status (0: no readable answer).
async fn post_event(
    shared: &Shared,
    client: &reqwest::Client,
    base: &str,
    n: usize,
) -> Result<(), (u16, String)> {
    let kind = kind_of(n);
    let body = json!({ "kind": kind, "n": n, "customer": format!("c{}", n % 97) });
    // Whether nats-server was down for the whole exchange: a 202 then
    // would be an acceptance nothing made durable.
    let down_before = shared.nats_down.load(Ordering::SeqCst);
    let sent = client
        .post(format!("{base}/webhooks/shop"))
        .json(&body)
        .send()
        .await;
    let resp = match sent {
        Ok(resp) => resp,
        Err(e) => {
            shared.failed_tries.fetch_add(1, Ordering::Relaxed);
            return Err((0, e.to_string()));
        }
    };
    let status = resp.status().as_u16();
    if status != 202 {
        *shared
            .refused
            .lock()
            .expect("lock")
            .entry(status)
            .or_default() += 1;
        return Err((status, resp.text().await.unwrap_or_default()));
    }
    let answer = match resp.json::<Value>().await {
        Ok(answer) => answer,
        Err(e) => {
            shared.failed_tries.fetch_add(1, Ordering::Relaxed);
            return Err((0, e.to_string()));
        }
    };
    let down_after = shared.nats_down.load(Ordering::SeqCst);
    let Some(id) = answer["id"].as_str().map(str::to_string) else {
        shared
            .bad_answers
            .lock()
            .expect("lock")
            .push(format!("#{n}: 202 without an id: {answer}"));
        return Err((202, answer.to_string()));
    };
    let routes: Vec<String> = answer["routes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r.as_str().map(str::to_string))
        .collect();
    let mut bad = shared.bad_answers.lock().expect("lock");
    if routes != expected_routes(kind) {
        bad.push(format!("{id} ({kind}): 202 listed routes {routes:?}"));
    }
    if down_before && down_after {
        bad.push(format!(
            "{id} (#{n}): 202 while nats-server was down from before the request to after the answer"
        ));
    }
    drop(bad);
    shared
        .out
        .lock()
        .expect("lock")
        .push(Accepted { n, id, kind });
    Ok(())
}

/// Posts events until `total` are accepted, spreading them over the live
/// hosts; a try that fails is repeated (on the next host) with the same
/// body, and counts for nothing.
async fn producer(shared: Arc<Shared>, client: reqwest::Client, total: usize) {
    loop {
        let n = shared.next.fetch_add(1, Ordering::Relaxed);
        if n >= total {
            return;
        }
        let mut tries = 0;
        loop {
            if shared.stop.load(Ordering::Relaxed) {
                return;
            }
            let base = {
                let bases = shared.bases.read().expect("bases lock");
                bases[(n + tries) % bases.len()].clone()
            };
            tries += 1;
            match post_event(&shared, &client, &base, n).await {
                Ok(_) => break,
                // 503 is expected for a while (nats-server down): back off.
                Err((503, _)) => {
                    tokio::time::sleep(Duration::from_millis(50 + fastrand::u64(0..50))).await
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10 + fastrand::u64(0..20))).await
                }
            }
        }
    }
}

/// What settling found.
struct Settled {
    /// One line per problem (lost events, missing kv effects).
    failures: Vec<String>,
    /// Events judged lost, by index into the accepted list.
    lost: HashSet<usize>,
    extra_attempts: usize,
    multi_attempt: usize,
}

/// Waits (until `deadline`) for every accepted event to be delivered on
/// every route it matches, asking `base`, then checks each plugin's kv holds
/// every event it was given.
async fn settle(
    client: &reqwest::Client,
    base: &str,
    accepted: &[Accepted],
    deadline: Instant,
) -> Settled {
    let mut pending: Vec<usize> = (0..accepted.len()).collect();
    let mut why: BTreeMap<usize, String> = BTreeMap::new();
    let mut extra_attempts = 0;
    let mut multi_attempt = 0;
    loop {
        let results: Vec<(usize, Verdict)> = futures_util::stream::iter(pending.iter().copied())
            .map(|i| {
                let a = &accepted[i];
                let url = format!("{base}/api/events/{}", a.id);
                async move {
                    let verdict = match get(client, &url).await {
                        Ok((200, body)) => match serde_json::from_str::<Value>(&body) {
                            Ok(t) => judge(&t, a.kind),
                            Err(e) => Verdict::Waiting(format!("timeline is not JSON: {e}")),
                        },
                        // Another host's acceptance may take a moment to be
                        // visible here; past the deadline, it is lost.
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
                        multi_attempt += 1;
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
        if pending.is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut failures: Vec<String> = why
        .iter()
        .map(|(&i, reason)| {
            let a = &accepted[i];
            format!("lost: {} (#{} {}): {reason}", a.id, a.n, a.kind)
        })
        .collect();

    // Effects: each plugin's kv holds every event it was given.
    let mut kv_checks = Vec::new();
    for a in accepted {
        let mut plugins: Vec<&str> = expected(a.kind).into_iter().map(|(_, p)| p).collect();
        plugins.sort_unstable();
        plugins.dedup();
        for p in plugins {
            kv_checks.push((p, a));
        }
    }
    let kv_failures: Vec<String> = futures_util::stream::iter(kv_checks)
        .map(|(plugin, a)| {
            let url = format!("{base}/api/plugins/{plugin}/kv/{}", a.id);
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
    Settled {
        failures,
        lost: why.into_keys().collect(),
        extra_attempts,
        multi_attempt,
    }
}

/// Runs of `handle` per (event id, plugin), from the audit plugin's log
/// line, per host log.
fn runs_in(log: &Path) -> HashMap<(String, String), usize> {
    let mut runs = HashMap::new();
    let text = std::fs::read_to_string(log).unwrap_or_default();
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
            *runs.entry((id, plugin)).or_default() += 1;
        }
    }
    runs
}

/// ERROR lines of a log (the first few) and how many there were.
fn errors_in(log: &Path) -> (usize, Vec<String>) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("\"level\":\"ERROR\""))
        .collect();
    (
        errors.len(),
        errors.iter().take(10).map(|l| l.to_string()).collect(),
    )
}

/// Duplicates over both hosts' logs: runs of `handle` beyond the deliveries
/// planned for each (event, plugin). Returns (extra runs, events with
/// some, deliveries delivered yet never logged, runs per host).
fn duplicates(
    accepted: &[Accepted],
    lost: &HashSet<usize>,
    logs: &[PathBuf],
) -> (usize, usize, Vec<String>, Vec<usize>) {
    let per_host: Vec<HashMap<(String, String), usize>> = logs.iter().map(|l| runs_in(l)).collect();
    let runs_per_host = per_host.iter().map(|r| r.values().sum()).collect();
    let mut runs: HashMap<(String, String), usize> = HashMap::new();
    for host in per_host {
        for (k, n) in host {
            *runs.entry(k).or_default() += n;
        }
    }
    let (mut extra, mut events, mut missing) = (0, 0, Vec::new());
    for (i, a) in accepted.iter().enumerate() {
        if lost.contains(&i) {
            continue; // reported as lost
        }
        let mut per_plugin: BTreeMap<&str, usize> = BTreeMap::new();
        for (_, p) in expected(a.kind) {
            *per_plugin.entry(p).or_default() += 1;
        }
        let mut dup = 0;
        for (p, want) in per_plugin {
            let seen = runs
                .get(&(a.id.clone(), p.to_string()))
                .copied()
                .unwrap_or(0);
            dup += seen.saturating_sub(want);
            if seen < want {
                missing.push(format!("{} {p}: {seen} runs logged, {want} expected", a.id));
            }
        }
        extra += dup;
        events += usize::from(dup > 0);
    }
    (extra, events, missing, runs_per_host)
}

/// A nats-server, two hosts on it, and the temp dir with their configs,
/// data dirs and logs.
struct Cluster {
    nats: NatsServer,
    hosts: Vec<Process>,
    dir: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> Cluster {
        let nats = NatsServer::start().await;
        // Build the plugin once and give both plugin entries that one file,
        // so that hosts do not run cargo and load the compiled cache.
        let built = switchyard::runtime::cargo::build_plugin(
            Path::new(&plugin_crate("audit")),
            Path::new(&build_dir()),
        )
        .await
        .unwrap_or_else(|e| panic!("build plugins/audit: {e}"));
        let dir = tempfile::tempdir().expect("tempdir");
        let wasm = dir.path().join("audit.wasm");
        std::fs::copy(&built, &wasm).expect("copy audit.wasm");
        let stream = format!("SWY_MULTI_{}", std::process::id());
        let mut hosts = Vec::new();
        for name in ["a", "b"] {
            let cfg = dir.path().join(format!("rules-{name}.toml"));
            let data = dir.path().join(format!("data-{name}"));
            std::fs::write(&cfg, config(&data, &wasm, &nats, &stream)).expect("write rules.toml");
            hosts.push(serve(&cfg, &dir.path().join(format!("serve-{name}.log"))).await);
        }
        Cluster { nats, hosts, dir }
    }

    fn logs(&self) -> Vec<PathBuf> {
        self.hosts.iter().map(|h| h.log.clone()).collect()
    }

    /// Fails the test if a host exited on its own (the killed one excepted).
    fn check_alive(&mut self, killed: Option<usize>) {
        for (i, host) in self.hosts.iter_mut().enumerate() {
            if Some(i) == killed {
                continue;
            }
            if let Ok(Some(status)) = host.child.try_wait() {
                let log = std::fs::read_to_string(&host.log).unwrap_or_default();
                panic!("host {i} exited on its own ({status}):\n{log}");
            }
        }
    }

    /// Reports, and fails with the dirs kept if there are problems.
    fn finish(self, name: &str, mut failures: Vec<String>, summary: String) {
        println!("{name} summary:\n{summary}");
        if failures.is_empty() {
            if std::env::var_os("SWITCHYARD_MULTIHOST_KEEP").is_some() {
                println!("  logs and data dirs kept in {}", self.dir.keep().display());
            }
            return;
        }
        failures.sort();
        let nats_log = self.nats.log();
        let kept = self.dir.keep();
        let tail: String = nats_log
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .map(|l| format!("\n  {l}"))
            .collect();
        panic!(
            "{} problems (logs and data dirs kept in {}):{}\nnats-server log (last lines):{tail}",
            failures.len(),
            kept.display(),
            show_some(&failures)
        );
    }
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client")
}

/// Waits for the producers, failing the test if they get stuck.
async fn join_producers(
    shared: &Shared,
    producers: Vec<tokio::task::JoinHandle<()>>,
    deadline: Instant,
    total: usize,
) {
    for p in producers {
        let finished = tokio::time::timeout_at(deadline.into(), p).await;
        if !matches!(finished, Ok(Ok(()))) {
            shared.stop.store(true, Ordering::Relaxed);
            panic!(
                "producers did not finish: {} of {total} accepted (refused by status: {:?})",
                shared.accepted(),
                shared.refused.lock().expect("lock")
            );
        }
    }
}

/// Checks the accepted list is whole: `total` events, each number once.
fn accepted_list(shared: &Shared, total: usize) -> Vec<Accepted> {
    let accepted = shared.out.lock().expect("lock").clone();
    let mut numbers: Vec<usize> = accepted.iter().map(|a| a.n).collect();
    numbers.sort_unstable();
    numbers.dedup();
    assert_eq!(
        numbers.len(),
        accepted.len(),
        "an event number was accepted twice"
    );
    assert_eq!(accepted.len(), total);
    accepted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_survivor_of_a_sigkilled_host_delivers_everything() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let total: usize = env_or("SWITCHYARD_MULTIHOST_EVENTS", 2000);
    let posters: usize = env_or("SWITCHYARD_MULTIHOST_POSTERS", 16);
    assert!(total > 0 && posters > 0, "nothing to post");
    let started = Instant::now();
    let mut cluster = Cluster::start().await;
    let shared = Shared::new(
        cluster.hosts.iter().map(|h| h.base.clone()).collect(),
        total,
    );
    let client = http_client();
    let producers: Vec<_> = (0..posters)
        .map(|_| tokio::spawn(producer(shared.clone(), client.clone(), total)))
        .collect();

    // Kill host b midway, a random moment after half the events are in, so
    // that requests and deliveries are in flight on it.
    let posting_deadline = started + Duration::from_secs(90 + total as u64 / 20);
    while shared.accepted() < total / 2 {
        cluster.check_alive(None);
        if Instant::now() > posting_deadline {
            shared.stop.store(true, Ordering::Relaxed);
            panic!(
                "posting is stuck: {} of {total} accepted",
                shared.accepted()
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tokio::time::sleep(Duration::from_millis(fastrand::u64(0..=150))).await;
    let victim = 1;
    let dead_base = cluster.hosts[victim].base.clone();
    cluster.hosts[victim].child.start_kill().expect("SIGKILL");
    let _ = cluster.hosts[victim].child.wait().await;
    let accepted_at_kill = shared.accepted();
    shared
        .bases
        .write()
        .expect("bases lock")
        .retain(|b| *b != dead_base);
    join_producers(&shared, producers, posting_deadline, total).await;
    let posted_in = started.elapsed();
    let accepted = accepted_list(&shared, total);

    // The survivor finishes: the dead host's unacknowledged deliveries come
    // back to it (after the consumers' ack wait, hence the generous time).
    let survivor = cluster.hosts[0].base.clone();
    let deadline = Instant::now() + Duration::from_secs(150 + total as u64 / 200);
    let settled = settle(&client, &survivor, &accepted, deadline).await;
    let settled_in = started.elapsed() - posted_in;
    cluster.check_alive(Some(victim));
    let mut failures = settled.failures;
    failures.extend(shared.bad_answers.lock().expect("lock").iter().cloned());

    let (dup_runs, dup_events, missing_log, runs_per_host) =
        duplicates(&accepted, &settled.lost, &cluster.logs());
    // Sharing the work: the killed host had delivered some before it died.
    if runs_per_host.contains(&0) {
        failures.push(format!(
            "a host ran no deliveries (runs per host {runs_per_host:?}): the work is not shared"
        ));
    }
    let (error_count, errors) = errors_in(&cluster.hosts[0].log);
    let deliveries: usize = accepted.iter().map(|a| expected(a.kind).len()).sum();
    let mut summary = format!(
        "  accepted {} events ({} tries unanswered, refused by status: {:?}), {deliveries} deliveries\n  \
         host b SIGKILLed at {accepted_at_kill} accepted; runs of handle per host (a, b): {runs_per_host:?}\n  \
         delivered: {} events, {} lost\n  \
         duplicates: {dup_runs} extra runs of handle on {dup_events} events (plugin logs); \
         {} extra attempts on {} events (timelines)\n  \
         survivor errors: {error_count}\n  \
         elapsed: {:.1?} (posting {posted_in:.1?}, settling {settled_in:.1?})",
        accepted.len(),
        shared.failed_tries.load(Ordering::Relaxed),
        shared.refused.lock().expect("lock"),
        accepted.len() - settled.lost.len(),
        settled.lost.len(),
        settled.extra_attempts,
        settled.multi_attempt,
        started.elapsed(),
    );
    if !missing_log.is_empty() {
        summary.push_str(&format!(
            "\n  delivered, yet fewer plugin log lines than deliveries:{}",
            show_some(&missing_log)
        ));
    }
    if !errors.is_empty() {
        summary.push_str(&format!("\n  survivor error lines:{}", show_some(&errors)));
    }
    cluster.finish("multihost (SIGKILL)", failures, summary);
}

/// Posts to `base` until it answers `want`, returning the time it took and
/// the answer's body; events it gets accepted are recorded like the
/// producers' (they must be delivered too). `next_n` numbers its events.
async fn post_until(
    shared: &Shared,
    client: &reqwest::Client,
    base: &str,
    want: u16,
    next_n: &AtomicUsize,
    within: Duration,
) -> Result<(Duration, String), String> {
    let start = Instant::now();
    let mut seen = BTreeMap::new();
    loop {
        let n = next_n.fetch_add(1, Ordering::Relaxed);
        let (status, body) = match post_event(shared, client, base, n).await {
            Ok(()) => (202, String::new()),
            Err(answer) => answer,
        };
        if status == want {
            return Ok((start.elapsed(), body));
        }
        *seen.entry(status).or_insert(0usize) += 1;
        if start.elapsed() > within {
            return Err(format!(
                "{base} did not answer {want} within {within:?} (answers by status, 0 = none: {seen:?})"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_answer_503_while_nats_is_down_and_recover_by_themselves() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let total: usize = env_or("SWITCHYARD_MULTIHOST_EVENTS", 2000);
    let posters: usize = env_or("SWITCHYARD_MULTIHOST_POSTERS", 16);
    assert!(total > 0 && posters > 0, "nothing to post");
    let started = Instant::now();
    let mut cluster = Cluster::start().await;
    let bases: Vec<String> = cluster.hosts.iter().map(|h| h.base.clone()).collect();
    let shared = Shared::new(bases.clone(), total);
    let client = http_client();
    let producers: Vec<_> = (0..posters)
        .map(|_| tokio::spawn(producer(shared.clone(), client.clone(), total)))
        .collect();
    // The probes' events are numbered past the producers'.
    let probe_n = AtomicUsize::new(total);

    let posting_deadline = started + Duration::from_secs(120 + total as u64 / 20);
    while shared.accepted() < total / 3 {
        cluster.check_alive(None);
        if Instant::now() > posting_deadline {
            shared.stop.store(true, Ordering::Relaxed);
            panic!(
                "posting is stuck: {} of {total} accepted",
                shared.accepted()
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut failures = Vec::new();
    let accepted_at_stop = shared.accepted();
    cluster.nats.stop().await;
    // Down from when the process is gone: while it shuts down after SIGTERM
    // it may still store (and acknowledge) publishes, rightly answered 202.
    shared.nats_down.store(true, Ordering::SeqCst);
    let stopped = Instant::now();
    // Down: each host says so, with a 503 (the store is unavailable), soon.
    let mut to_503 = Vec::new();
    for base in &bases {
        match post_until(
            &shared,
            &client,
            base,
            503,
            &probe_n,
            Duration::from_secs(30),
        )
        .await
        {
            Ok((took, body)) => {
                to_503.push(took);
                let v: Value = serde_json::from_str(&body).unwrap_or_default();
                if !v["error"].is_string() {
                    failures.push(format!("{base}: a 503 without a JSON error: {body}"));
                }
            }
            Err(e) => failures.push(format!("while nats-server is down: {e}")),
        }
    }
    // Let the outage last a little while the producers keep trying.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let outage = stopped.elapsed();
    cluster.check_alive(None);
    // Up from when the process starts: a publish may be acknowledged before
    // restart() has seen it ready.
    shared.nats_down.store(false, Ordering::SeqCst);
    cluster.nats.restart().await;

    // Back: each host takes events again by itself, within seconds.
    let mut to_202 = Vec::new();
    for base in &bases {
        match post_until(
            &shared,
            &client,
            base,
            202,
            &probe_n,
            Duration::from_secs(30),
        )
        .await
        {
            Ok((took, _)) => to_202.push(took),
            Err(e) => failures.push(format!("after nats-server came back: {e}")),
        }
    }
    join_producers(&shared, producers, posting_deadline, total).await;
    let posted_in = started.elapsed();
    let accepted = shared.out.lock().expect("lock").clone();
    let mut numbers: Vec<usize> = accepted.iter().map(|a| a.n).collect();
    numbers.sort_unstable();
    numbers.dedup();
    assert_eq!(
        numbers.len(),
        accepted.len(),
        "an event number was accepted twice"
    );
    assert!(
        numbers.iter().filter(|&&n| n < total).count() == total,
        "not every producer event was accepted"
    );

    let deadline = Instant::now() + Duration::from_secs(150 + total as u64 / 200);
    let settled = settle(&client, &bases[0], &accepted, deadline).await;
    let settled_in = started.elapsed() - posted_in;
    cluster.check_alive(None);
    failures.extend(settled.failures);
    failures.extend(shared.bad_answers.lock().expect("lock").iter().cloned());
    // The other host sees the same journal.
    for a in accepted.iter().step_by(97) {
        let url = format!("{}/api/events/{}", bases[1], a.id);
        match get(&client, &url).await {
            Ok((200, body)) => {
                let t: Value = serde_json::from_str(&body).unwrap_or_default();
                if !matches!(judge(&t, a.kind), Verdict::Delivered(_)) {
                    failures.push(format!(
                        "host b's timeline of {} is not delivered: {t}",
                        a.id
                    ));
                }
            }
            other => failures.push(format!("host b on {}: {other:?}", a.id)),
        }
    }

    let (dup_runs, dup_events, missing_log, runs_per_host) =
        duplicates(&accepted, &settled.lost, &cluster.logs());
    let errors: usize = cluster.logs().iter().map(|l| errors_in(l).0).sum();
    let mut summary = format!(
        "  accepted {} events ({} tries unanswered, refused by status: {:?})\n  \
         nats-server stopped at {accepted_at_stop} accepted for {outage:.1?}; \
         first 503 after {to_503:.1?}, first 202 after the restart {to_202:.1?} (per host)\n  \
         runs of handle per host (a, b): {runs_per_host:?}\n  \
         delivered: {} events, {} lost\n  \
         duplicates: {dup_runs} extra runs of handle on {dup_events} events (plugin logs); \
         {} extra attempts on {} events (timelines)\n  \
         error lines (both hosts): {errors}\n  \
         elapsed: {:.1?} (posting {posted_in:.1?}, settling {settled_in:.1?})",
        accepted.len(),
        shared.failed_tries.load(Ordering::Relaxed),
        shared.refused.lock().expect("lock"),
        accepted.len() - settled.lost.len(),
        settled.lost.len(),
        settled.extra_attempts,
        settled.multi_attempt,
        started.elapsed(),
    );
    if !missing_log.is_empty() {
        summary.push_str(&format!(
            "\n  delivered, yet fewer plugin log lines than deliveries:{}",
            show_some(&missing_log)
        ));
    }
    cluster.finish("multihost (nats-server outage)", failures, summary);
}

/// `[server] fsync` is the embedded engine's: under NATS the host says at
/// start that `fsync = false` changes nothing, rather than let an operator
/// believe a 202 is cheaper (or less durable) for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsync_false_under_nats_is_said_to_have_no_effect() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("rules.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\ndata_dir = \"{}\"\nfsync = false\n\n[[sources]]\nname = \"shop\"\n\n\
             [engine]\nkind = \"nats\"\nurl = \"{}\"\nstream = \"SWY_FSYNC_{}\"\n",
            dir.path().join("data").display(),
            nats.url(),
            std::process::id()
        ),
    )
    .expect("write rules.toml");
    let log = dir.path().join("serve.log");
    let mut host = serve(&cfg, &log).await;
    let text = std::fs::read_to_string(&log).expect("read the log");
    let _ = host.child.kill().await;
    assert!(
        text.lines().any(|l| l.contains("\"WARN\"")
            && l.contains("fsync = false has no effect with the NATS engine")),
        "{text}"
    );
}
