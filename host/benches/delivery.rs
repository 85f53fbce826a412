//! Per-delivery cost of the `audit` plugin, in one run so the figures can be
//! compared with each other (the machine is shared and noisy: read ratios,
//! not absolute numbers).
//!
//! - `fresh_instance`: `Runtime::deliver` — new Store + HostState, instantiate
//!   from the `InstancePre`, call `handle`, drop. What the server does.
//! - `reused_instance`: the baseline — the same plugin with
//!   `isolation = "reuse"`: `Runtime::deliver` calls `handle` again in an
//!   instance kept from the previous delivery (fresh HostState per call, no
//!   Store, no instantiation).
//! - `bare_instantiate`: wasmtime alone — `Store<()>` + instantiate the same
//!   component from an `InstancePre` on an engine configured like the
//!   runtime's, every import a trap stub, no call, drop.
//! - `wasi_ctx`: building a WASI context and stdio capture pipe (what each
//!   delivery's HostState did until the context became lazy: now only a
//!   delivery whose guest calls WASI pays it).
//!
//! `cargo bench -p switchyard --bench delivery`

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use switchyard::journal::Journal;
use switchyard::runtime::{Invocation, Isolation, Limits, Runtime};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;

/// The server binary's allocator (`src/main.rs`), so that allocation costs
/// as much here as in the server.
mod common;

use common::{event, median, repo};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn bare_engine() -> Engine {
    Engine::new(&switchyard::runtime::engine_config()).expect("engine")
}

fn delivery(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let repo = repo();
    let wasm = rt
        .block_on(switchyard::runtime::cargo::build_plugin(
            &repo.join("plugins").join("audit"),
            &repo.join("target").join("test-plugins"),
        ))
        .unwrap_or_else(|e| panic!("building plugins/audit: {e}"));

    let dir = tempfile::tempdir().expect("tempdir");
    let journal = Journal::open(&dir.path().join("journal")).expect("journal");
    let runtime = Runtime::new(&dir.path().join("cache"), journal).expect("runtime");
    let limits = Limits {
        timeout: Duration::from_millis(500),
        memory: 16 << 20,
        isolation: Isolation::InstancePerEvent,
        ..Limits::default()
    };
    let plugin = runtime
        .load("audit", &wasm, limits, Default::default())
        .expect("load audit");
    let reusing = Limits {
        isolation: Isolation::Reuse,
        ..limits
    };
    let reused = runtime
        .load("audit", &wasm, reusing, Default::default())
        .expect("load audit");
    let event = event();

    // Both paths must really run `handle` to completion, every time.
    let run = rt.block_on(runtime.deliver(&plugin, &event));
    assert_eq!(run.invocation, Invocation::Ok, "fresh delivery");
    assert_eq!(run.kv.writes.len(), 1, "audit writes one key");
    for _ in 0..1000 {
        let run = rt.block_on(runtime.deliver(&reused, &event));
        assert_eq!(run.invocation, Invocation::Ok, "reused");
        assert_eq!(run.kv.writes.len(), 1, "reused: one key per call");
    }

    let engine = bare_engine();
    let component = Component::from_file(&engine, &wasm).expect("compile audit");
    let mut linker = Linker::<()>::new(&engine);
    linker
        .define_unknown_imports_as_traps(&component)
        .expect("stub imports");
    let bare_pre = linker.instantiate_pre(&component).expect("instantiate_pre");

    let mut group = c.benchmark_group("delivery/audit");
    group.measurement_time(Duration::from_secs(10));

    group.bench_function("fresh_instance", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let run = runtime.deliver(&plugin, black_box(&event)).await;
                    debug_assert_eq!(run.invocation, Invocation::Ok);
                    black_box(run);
                }
                start.elapsed()
            })
        })
    });

    group.bench_function("reused_instance", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let run = runtime.deliver(&reused, black_box(&event)).await;
                    debug_assert_eq!(run.invocation, Invocation::Ok);
                    black_box(run);
                }
                start.elapsed()
            })
        })
    });

    group.bench_function("bare_instantiate", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let mut store = Store::new(&engine, ());
                    store.set_epoch_deadline(u64::MAX / 2);
                    let instance = bare_pre
                        .instantiate_async(&mut store)
                        .await
                        .expect("instantiate");
                    black_box(instance);
                }
                start.elapsed()
            })
        })
    });

    group.bench_function("wasi_ctx", |b| {
        b.iter(|| {
            let stdio = MemoryOutputPipe::new(8 << 10);
            let wasi = WasiCtxBuilder::new()
                .stdout(stdio.clone())
                .stderr(stdio.clone())
                .build();
            black_box((wasi, stdio, ResourceTable::new()))
        })
    });

    group.finish();
    // Still a full, successful `handle` after millions of calls on one instance.
    let run = rt.block_on(runtime.deliver(&reused, &event));
    assert_eq!(run.invocation, Invocation::Ok, "reused");

    // Criterion runs one benchmark after the other, so load from other work
    // on a shared machine can land on one of them only. Alternate them in
    // short rounds as well and report the median of the per-round ratios.
    if std::env::args().any(|a| a == "--bench") {
        const ROUNDS: usize = 21;
        const N: u32 = 2000;
        let mut fresh = Vec::with_capacity(ROUNDS);
        let mut reuse = Vec::with_capacity(ROUNDS);
        let mut bare = Vec::with_capacity(ROUNDS);
        let per_op = |d: Duration| d.as_secs_f64() * 1e6 / f64::from(N);
        rt.block_on(async {
            for _ in 0..ROUNDS {
                let start = Instant::now();
                for _ in 0..N {
                    black_box(runtime.deliver(&plugin, black_box(&event)).await);
                }
                fresh.push(per_op(start.elapsed()));
                let start = Instant::now();
                for _ in 0..N {
                    black_box(runtime.deliver(&reused, black_box(&event)).await);
                }
                reuse.push(per_op(start.elapsed()));
                let start = Instant::now();
                for _ in 0..N {
                    let mut store = Store::new(&engine, ());
                    store.set_epoch_deadline(u64::MAX / 2);
                    black_box(
                        bare_pre
                            .instantiate_async(&mut store)
                            .await
                            .expect("instantiate"),
                    );
                }
                bare.push(per_op(start.elapsed()));
            }
        });
        let ratios: Vec<f64> = fresh.iter().zip(&reuse).map(|(f, r)| f / r).collect();
        println!(
            "interleaved, {ROUNDS} rounds of {N} each (median µs per op): fresh_instance {:.1}, \
             reused_instance {:.2}, bare_instantiate {:.1}; fresh/reused median {:.1}x \
             (rounds: {:.1}x..{:.1}x)",
            median(&fresh),
            median(&reuse),
            median(&bare),
            median(&ratios),
            ratios.iter().copied().fold(f64::INFINITY, f64::min),
            ratios.iter().copied().fold(0.0, f64::max),
        );
    }
}

criterion_group!(benches, delivery);
criterion_main!(benches);
