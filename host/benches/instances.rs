//! Fresh-instance delivery, setting by setting, and on one core against two.
//!
//! `cargo bench -p switchyard --bench instances [-- levers|scaling|profile] [--quick]`
//!
//! - `levers`: µs per delivery of the `audit` plugin (one log line, one kv
//!   write) in a fresh instance, under the engine configuration the server
//!   runs (`engine_config()`), the one it ran before (`before`), and `before`
//!   with one pooling/engine setting changed at a time; then, under
//!   `engine_config()`, `audit` with `isolation = "reuse"`, and the same two
//!   for `noop` (a plugin whose `handle` returns `Ok` at once: the issue's
//!   "trivial plugin"). Every configuration gets its own `Runtime` (engine,
//!   pool, linker) and they are all timed in the same rounds, one after the
//!   other, so background load on this shared machine hits them alike; the
//!   figure is the median over rounds. "wasmtime instantiate (bare)" is
//!   wasmtime alone on the same engine: a `Store<()>` and an instantiation
//!   from an `InstancePre` (every import a trap stub), no call, drop.
//! - `scaling`: deliveries per second with 1 and 2 OS threads (each a
//!   current-thread tokio runtime, as a dispatcher worker would be) sharing
//!   one `Runtime` and one plugin, for a fixed time each, alternated over
//!   several rounds; the ratio 2 workers ÷ 1 worker is the scaling figure
//!   (2.0 would be perfect, on this 2-core machine). Each worker's CPU time
//!   is read too, to tell "the other builds took the cores" from contention.
//! - `profile`: one configuration only, for `perf record` (see `profile`).
//!
//! `levers` and `scaling` run by default; `ONLY=<part of a name>` limits
//! either to some configurations. Like the server binary, this uses
//! mimalloc.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use switchyard::event::Event;
use switchyard::journal::Journal;
use switchyard::runtime::{Invocation, Isolation, Limits, Plugin, Runtime};
use wasmtime::component::{Component, InstancePre, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};

/// The server binary's allocator (`src/main.rs`), so that allocation costs
/// as much here as in the server.
mod common;

use common::{event, median, repo};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The settings this bench varies. `BEFORE` is the engine configuration of
/// commit 127e0ff (before this work), field for field.
#[derive(Clone, Copy, Debug)]
struct Knobs {
    /// `PoolingAllocationConfig::max_memory_size` (and, when `guards` is
    /// off, the memory reservation).
    max_memory: usize,
    /// `Config::memory_reservation`; `None`: wasmtime's default (4 GiB).
    reservation: Option<u64>,
    /// Guard pages and signal-based traps (wasmtime's defaults: 32 MiB
    /// guard, bounds checks elided). Off: `signals_based_traps(false)`,
    /// `memory_guard_size(0)`, `guard_before_linear_memory(false)` — explicit
    /// bounds checks, and a slot's memory stays read/write between
    /// instances (no `mprotect` per instance).
    guards: bool,
    /// `linear_memory_keep_resident` (bytes).
    keep_resident: usize,
    /// `table_keep_resident` (bytes).
    table_keep_resident: usize,
    /// `pagemap_scan`: reset only the pages an instance dirtied.
    pagemap: bool,
    /// `decommit_batch_size`.
    decommit_batch: usize,
    /// `memory_init_cow`.
    cow: bool,
    /// `table_lazy_init`.
    lazy_table: bool,
}

const BEFORE: Knobs = Knobs {
    max_memory: 1 << 30,
    reservation: None,
    guards: true,
    keep_resident: 1 << 20,
    table_keep_resident: 64 << 10,
    pagemap: true,
    decommit_batch: 16,
    cow: true,
    lazy_table: true,
};

/// The pooling allocator's own defaults for what `BEFORE` tuned (what the
/// field notes measured not to scale).
const POOLING_DEFAULTS: Knobs = Knobs {
    keep_resident: 0,
    table_keep_resident: 0,
    pagemap: false,
    decommit_batch: 1,
    ..BEFORE
};

fn config(k: &Knobs) -> Config {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    config.memory_init_cow(k.cow);
    config.table_lazy_init(k.lazy_table);
    if let Some(r) = k.reservation {
        config.memory_reservation(r);
    }
    if !k.guards {
        config.signals_based_traps(false);
        config.memory_guard_size(0);
        config.guard_before_linear_memory(false);
        config.memory_reservation(k.max_memory as u64);
        config.memory_reservation_for_growth(0);
    }
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(1000);
    pool.total_core_instances(4000);
    pool.total_memories(2000);
    pool.total_tables(4000);
    pool.max_memory_size(k.max_memory);
    pool.linear_memory_keep_resident(k.keep_resident);
    pool.table_keep_resident(k.table_keep_resident);
    pool.pagemap_scan(if k.pagemap {
        wasmtime::Enabled::Auto
    } else {
        wasmtime::Enabled::No
    });
    pool.decommit_batch_size(k.decommit_batch);
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    config
}

/// One configuration under test: a runtime with the audit plugin loaded, and
/// wasmtime alone on an engine configured the same way.
struct Setup {
    name: String,
    runtime: Arc<Runtime>,
    plugin: Arc<Plugin>,
    bare_engine: Engine,
    bare_pre: InstancePre<()>,
    _dir: tempfile::TempDir,
}

fn setup(name: &str, wasm: &Path, config: &Config, isolation: Isolation) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let journal = Journal::open(&dir.path().join("journal")).expect("journal");
    let runtime = Runtime::with_config(&dir.path().join("cache"), journal, config)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let limits = Limits {
        timeout: Duration::from_millis(500),
        memory: 16 << 20,
        isolation,
        ..Limits::default()
    };
    let plugin = runtime
        .load("audit", wasm, limits, Default::default())
        .expect("load audit");
    // The same engine (and pool): a second one would reserve as much virtual
    // memory again, and this process holds a dozen configurations at once.
    let bare_engine = runtime.engine().clone();
    let component = Component::from_file(&bare_engine, wasm).expect("compile audit");
    let mut linker = Linker::<()>::new(&bare_engine);
    linker
        .define_unknown_imports_as_traps(&component)
        .expect("stub imports");
    let bare_pre = linker.instantiate_pre(&component).expect("instantiate_pre");
    Setup {
        name: name.to_string(),
        runtime: Arc::new(runtime),
        plugin: Arc::new(plugin),
        bare_engine,
        bare_pre,
        _dir: dir,
    }
}

/// Builds `plugins/<name>` (wasm32-wasip2, release) as the server would.
fn build_plugin(name: &str) -> PathBuf {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let repo = repo();
    rt.block_on(switchyard::runtime::cargo::build_plugin(
        &repo.join("plugins").join(name),
        &repo.join("target").join("test-plugins"),
    ))
    .unwrap_or_else(|e| panic!("building plugins/{name}: {e}"))
}

/// The two plugins measured: `audit` (one log line, one kv write: a small
/// real plugin) and `noop` (returns `Ok` at once: the issue's "trivial
/// plugin").
struct Plugins {
    audit: PathBuf,
    noop: PathBuf,
}

/// Whether configuration `name` is measured: all of them, unless the
/// environment variable `ONLY` names a part of the names wanted (`|` between
/// alternatives), e.g. for profiling one of them with `perf`.
fn selected(name: &str) -> bool {
    match std::env::var("ONLY") {
        Ok(only) => only.split('|').any(|part| name.contains(part)),
        Err(_) => true,
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// µs per delivery for `n` deliveries in a row.
fn time_deliveries(rt: &tokio::runtime::Runtime, s: &Setup, event: &Event, n: u32) -> f64 {
    rt.block_on(async {
        let start = Instant::now();
        for _ in 0..n {
            let run = s.runtime.deliver(&s.plugin, black_box(event)).await;
            debug_assert_eq!(run.invocation, Invocation::Ok);
            black_box(run);
        }
        start.elapsed().as_secs_f64() * 1e6 / f64::from(n)
    })
}

/// µs per bare wasmtime instantiation (plus drop) for `n` in a row.
fn time_bare(rt: &tokio::runtime::Runtime, s: &Setup, n: u32) -> f64 {
    rt.block_on(async {
        let start = Instant::now();
        for _ in 0..n {
            let mut store = Store::new(&s.bare_engine, ());
            store.set_epoch_deadline(u64::MAX / 2);
            let instance = s
                .bare_pre
                .instantiate_async(&mut store)
                .await
                .expect("instantiate");
            black_box(instance);
        }
        start.elapsed().as_secs_f64() * 1e6 / f64::from(n)
    })
}

fn levers(plugins: &Plugins, quick: bool) {
    let wasm = &plugins.audit;
    let lever = |name: &str, f: fn(&mut Knobs)| {
        let mut k = BEFORE;
        f(&mut k);
        (name.to_string(), config(&k))
    };
    let configs = vec![
        (
            "engine_config() (what the server runs)".to_string(),
            switchyard::runtime::engine_config(),
        ),
        ("before (commit 127e0ff)".to_string(), config(&BEFORE)),
        lever("before + decommit_batch_size 1", |k| k.decommit_batch = 1),
        lever("before + no guard pages, no signal traps", |k| {
            k.guards = false
        }),
        lever("before + memory_reservation = max_memory_size", |k| {
            k.reservation = Some(k.max_memory as u64)
        }),
        lever("before + max_memory_size 64 MiB", |k| {
            k.max_memory = 64 << 20;
            k.reservation = Some(64 << 20);
        }),
        lever("before + memory_init_cow off", |k| k.cow = false),
        lever("before + table_lazy_init off", |k| k.lazy_table = false),
        lever("before + keep_resident 4 MiB", |k| {
            k.keep_resident = 4 << 20
        }),
        lever("before + pagemap_scan off", |k| k.pagemap = false),
        (
            "pooling defaults (no keep_resident, no pagemap_scan)".to_string(),
            config(&POOLING_DEFAULTS),
        ),
    ];
    let setups: Vec<Setup> = configs
        .iter()
        .filter(|(name, _)| selected(name))
        .map(|(name, c)| setup(name, wasm, c, Isolation::InstancePerEvent))
        .collect();
    // The same engine configuration with the other isolation and plugin.
    let production = switchyard::runtime::engine_config();
    let others = [
        (
            "audit, isolation = \"reuse\" (engine_config())",
            &plugins.audit,
            Isolation::Reuse,
        ),
        (
            "noop (trivial plugin), engine_config()",
            &plugins.noop,
            Isolation::InstancePerEvent,
        ),
        (
            "noop, isolation = \"reuse\" (engine_config())",
            &plugins.noop,
            Isolation::Reuse,
        ),
    ]
    .map(|(name, wasm, isolation)| setup(name, wasm, &production, isolation));
    let event = event();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    // Every configuration really runs `handle` to completion.
    for s in setups.iter().chain(&others) {
        let run = rt.block_on(s.runtime.deliver(&s.plugin, &event));
        assert_eq!(run.invocation, Invocation::Ok, "{}", s.name);
        // audit writes one key per event; noop none.
        let writes = usize::from(!s.name.starts_with("noop"));
        assert_eq!(run.kv.writes.len(), writes, "{}: kv writes", s.name);
    }
    let (rounds, n) = if quick { (5, 500) } else { (15, 2000) };
    let before_load = load_average();
    let mut fresh = vec![Vec::new(); setups.len()];
    let mut bare = vec![Vec::new(); setups.len()];
    let mut other = vec![Vec::new(); others.len()];
    for _ in 0..rounds {
        for (i, s) in setups.iter().enumerate() {
            fresh[i].push(time_deliveries(&rt, s, &event, n));
            bare[i].push(time_bare(&rt, s, n));
        }
        for (i, s) in others.iter().enumerate() {
            other[i].push(time_deliveries(&rt, s, &event, n));
        }
    }
    println!(
        "levers: {rounds} rounds of {n} deliveries, median µs per delivery (load average {before_load} → {})",
        load_average()
    );
    println!(
        "| configuration (audit plugin, fresh instances, unless named) | delivery | wasmtime instantiate (bare) |"
    );
    println!("| --- | ---: | ---: |");
    for (i, s) in setups.iter().enumerate() {
        println!(
            "| {} | {:.2} | {:.2} |",
            s.name,
            median(&fresh[i]),
            median(&bare[i])
        );
    }
    for (i, s) in others.iter().enumerate() {
        println!("| {} | {:.2} | – |", s.name, median(&other[i]));
    }
}

/// CPU time of this thread in ns, from the scheduler's accounting (Linux).
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// What `workers` threads delivered in a fixed time.
#[derive(Clone, Copy)]
struct Rate {
    /// Deliveries per second of wall time, all workers together.
    per_s: f64,
    /// Deliveries per second of the workers' CPU time: unlike `per_s`, not
    /// lowered when other processes take the cores, but lowered by
    /// contention that burns CPU (spinning, TLB shootdowns, cache-line
    /// ping-pong).
    per_cpu_s: f64,
    /// CPU seconds the workers got per second of wall time (2.0 = both
    /// cores all the time): below the worker count when other processes
    /// ran, or when workers slept on a lock.
    cpus: f64,
}

/// Deliveries per second with `workers` threads for `time`.
fn rate(s: &Setup, event: &Event, workers: usize, time: Duration) -> Rate {
    let stop = Arc::new(AtomicBool::new(false));
    let barrier = Arc::new(Barrier::new(workers + 1));
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            let (runtime, plugin) = (s.runtime.clone(), s.plugin.clone());
            let (stop, barrier, event) = (stop.clone(), barrier.clone(), event.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                barrier.wait();
                let cpu = thread_cpu_ns();
                let count = rt.block_on(async {
                    let mut count = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let run = runtime.deliver(&plugin, black_box(&event)).await;
                        debug_assert_eq!(run.invocation, Invocation::Ok);
                        black_box(run);
                        count += 1;
                    }
                    count
                });
                (count, thread_cpu_ns() - cpu)
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    std::thread::sleep(time);
    stop.store(true, Ordering::Relaxed);
    let (count, cpu_ns) = threads
        .into_iter()
        .map(|t| t.join().expect("worker"))
        .fold((0, 0), |(c, n), (c1, n1)| (c + c1, n + n1));
    let wall = start.elapsed().as_secs_f64();
    let cpu = cpu_ns as f64 / 1e9;
    Rate {
        per_s: count as f64 / wall,
        per_cpu_s: count as f64 / cpu.max(1e-9),
        cpus: cpu / wall,
    }
}

fn scaling(plugins: &Plugins, quick: bool) {
    let wasm = &plugins.audit;
    let mut no_guards = BEFORE;
    no_guards.guards = false;
    no_guards.decommit_batch = 1;
    let setups: Vec<Setup> = [
        (
            "engine_config() (what the server runs)",
            switchyard::runtime::engine_config(),
            Isolation::InstancePerEvent,
        ),
        (
            "before (commit 127e0ff)",
            config(&BEFORE),
            Isolation::InstancePerEvent,
        ),
        (
            "before + no guard pages/signal traps + decommit_batch_size 1",
            config(&no_guards),
            Isolation::InstancePerEvent,
        ),
        (
            "pooling defaults (no keep_resident, no pagemap_scan)",
            config(&POOLING_DEFAULTS),
            Isolation::InstancePerEvent,
        ),
        (
            "isolation = \"reuse\" (engine_config())",
            switchyard::runtime::engine_config(),
            Isolation::Reuse,
        ),
    ]
    .into_iter()
    .filter(|(name, _, _)| selected(name))
    .map(|(name, config, isolation)| setup(name, wasm, &config, isolation))
    .chain(selected("noop").then(|| {
        setup(
            "noop (trivial plugin), engine_config()",
            &plugins.noop,
            &switchyard::runtime::engine_config(),
            Isolation::InstancePerEvent,
        )
    }))
    .collect();
    let event = event();
    let (rounds, time) = if quick {
        (2, Duration::from_millis(500))
    } else {
        (10, Duration::from_secs(1))
    };
    let before_load = load_average();
    let mut one = vec![Vec::new(); setups.len()];
    let mut two = vec![Vec::new(); setups.len()];
    for _ in 0..rounds {
        for (i, s) in setups.iter().enumerate() {
            one[i].push(rate(s, &event, 1, time));
            two[i].push(rate(s, &event, 2, time));
        }
    }
    println!(
        "scaling: {rounds} rounds of {time:?} per figure, medians (load average {before_load} → {})",
        load_average()
    );
    println!(
        "| configuration | 1 worker: deliveries/s · CPUs used | 2 workers: deliveries/s · CPUs used | 2 ÷ 1, wall (min–max) | 2 ÷ 1, per CPU-second | 2 ÷ 1, wall, rounds with the cores to themselves |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (i, s) in setups.iter().enumerate() {
        // Rounds in which nothing else took the cores: the single worker ran
        // ≥ 95 % of the time and the pair ≥ 1.9 CPUs' worth. Lock waits would
        // also lower the pair's CPUs, so if there are none, say so rather
        // than guess.
        let clean: Vec<f64> = two[i]
            .iter()
            .zip(&one[i])
            .filter(|(b, a)| a.cpus >= 0.95 && b.cpus >= 1.9)
            .map(|(b, a)| b.per_s / a.per_s)
            .collect();
        let clean = if clean.is_empty() {
            "none of the rounds".to_string()
        } else {
            format!("{:.2} ({} of {rounds})", median(&clean), clean.len())
        };
        let wall: Vec<f64> = two[i]
            .iter()
            .zip(&one[i])
            .map(|(b, a)| b.per_s / a.per_s)
            .collect();
        let cpu: Vec<f64> = two[i]
            .iter()
            .zip(&one[i])
            .map(|(b, a)| b.per_cpu_s / a.per_cpu_s)
            .collect();
        let med =
            |rates: &[Rate], f: fn(&Rate) -> f64| median(&rates.iter().map(f).collect::<Vec<_>>());
        println!(
            "| {} | {:.0} · {:.2} | {:.0} · {:.2} | {:.2} ({:.2}–{:.2}) | {:.2} | {clean} |",
            s.name,
            med(&one[i], |r| r.per_s),
            med(&one[i], |r| r.cpus),
            med(&two[i], |r| r.per_s),
            med(&two[i], |r| r.cpus),
            median(&wall),
            wall.iter().copied().fold(f64::INFINITY, f64::min),
            wall.iter().copied().fold(0.0, f64::max),
            median(&cpu),
        );
    }
}

/// `profile`: only runs `WORKERS` workers (default 2) for `SECONDS` (default
/// 5) on `engine_config()` (fresh instances, or `ISOLATION=reuse`; the audit
/// plugin, or `PLUGIN=noop`), for `perf record`.
fn profile(plugins: &Plugins) {
    let wasm = match std::env::var("PLUGIN").as_deref() {
        Ok("noop") => &plugins.noop,
        _ => &plugins.audit,
    };
    let workers = std::env::var("WORKERS")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(2);
    let seconds = std::env::var("SECONDS")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(5);
    let isolation = match std::env::var("ISOLATION").as_deref() {
        Ok("reuse") => Isolation::Reuse,
        _ => Isolation::InstancePerEvent,
    };
    let s = setup(
        "profile",
        wasm,
        &switchyard::runtime::engine_config(),
        isolation,
    );
    let r = rate(&s, &event(), workers, Duration::from_secs(seconds));
    println!(
        "profile: {workers} workers, {isolation:?}: {:.0} deliveries/s, {:.0} per CPU-second, {:.2} CPUs",
        r.per_s, r.per_cpu_s, r.cpus
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let modes: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let all = modes.is_empty();
    let plugins = Plugins {
        audit: build_plugin("audit"),
        noop: build_plugin("noop"),
    };
    if all || modes.contains(&"levers") {
        levers(&plugins, quick);
    }
    if all || modes.contains(&"scaling") {
        scaling(&plugins, quick);
    }
    if modes.contains(&"profile") {
        profile(&plugins);
    }
}
