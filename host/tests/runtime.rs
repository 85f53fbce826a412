//! The Wasm runtime on its own: the compiled-component cache, a fresh instance
//! per delivery, and limits that fail one delivery with a clear reason.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use switchyard::Event;
use switchyard::journal::Journal;
use switchyard::runtime::{Invocation, Isolation, Limits, Runtime, RuntimeError};

fn event() -> Event {
    Event {
        id: "e1".into(),
        source: "s".into(),
        ty: "t".into(),
        subject: None,
        time: "2026-01-01T00:00:00Z".into(),
        datacontenttype: "application/json".into(),
        data: b"{}".to_vec(),
        extensions: BTreeMap::new(),
    }
}

/// Succeeds the first time it runs in an instance, traps the second time: it
/// only ever succeeds if every delivery gets a fresh instance.
const ONCE_PER_INSTANCE: &str = "(if (i32.load8_u (i32.const 100)) (then (unreachable)))
     (i32.store8 (i32.const 100) (i32.const 1)) (i32.const 2048)";
/// Succeeds the first time it runs in an instance, loops forever the second.
const LOOP_SECOND_TIME: &str = "(if (i32.load8_u (i32.const 100)) (then (loop $l (br $l))))
     (i32.store8 (i32.const 100) (i32.const 1)) (i32.const 2048)";
/// Succeeds.
const OK: &str = "(i32.const 2048)";
/// Asks for 1000 more pages (64 MiB).
const GROW: &str = "(drop (memory.grow (i32.const 1000))) (i32.const 2048)";

fn cache_entries(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "cwasm"))
                .collect()
        })
        .unwrap_or_default()
}

/// Replaces a cache entry with `bytes` by a rename, as the cache itself
/// replaces entries. Not in place: loaded components map their entry's file,
/// and truncating a mapped file makes their next page fault a SIGBUS (this
/// test once crashed so, from writing over the entry `again` maps).
fn corrupt(entry: &std::path::Path, bytes: &[u8]) {
    let tmp = entry.with_extension("corrupt");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, entry).unwrap();
}

#[tokio::test]
async fn components_are_cached_on_disk_and_corrupt_entries_are_recompiled() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(&dir.path().join("data")).unwrap();
    let cache = dir.path().join("cache");
    let runtime = Runtime::new(&cache, journal).unwrap();
    let wasm = common::fixture(dir.path(), "once", ONCE_PER_INSTANCE);

    let first = runtime
        .load("p", wasm.as_ref(), Limits::default(), Default::default())
        .unwrap();
    let entries = cache_entries(&cache);
    assert_eq!(entries.len(), 1, "one cache entry per component and engine");
    let name = entries[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        name.starts_with(&first.hash),
        "{name} is keyed by the wasm hash"
    );
    let good = std::fs::read(&entries[0]).unwrap();

    // A flipped byte in the middle: detected by the checksum, recompiled.
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    corrupt(&entries[0], &bad);
    let again = runtime
        .load("p", wasm.as_ref(), Limits::default(), Default::default())
        .unwrap();
    assert_eq!(again.hash, first.hash);
    assert_eq!(std::fs::read(&entries[0]).unwrap(), good, "entry rewritten");
    // A truncated entry too.
    corrupt(&entries[0], &good[..good.len() / 3]);
    runtime
        .load("p", wasm.as_ref(), Limits::default(), Default::default())
        .unwrap();

    // Every delivery gets a fresh instance: no state carries over.
    for _ in 0..3 {
        let run = runtime.deliver(&again, &event()).await;
        assert_eq!(run.invocation, Invocation::Ok);
    }
}

#[tokio::test]
async fn limits_fail_the_delivery_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(&dir.path().join("data")).unwrap();
    let runtime = Runtime::new(&dir.path().join("cache"), journal).unwrap();

    let grow = common::fixture(dir.path(), "grow", GROW);
    let limits = Limits {
        timeout: Duration::from_secs(5),
        memory: 1 << 20,
        ..Limits::default()
    };
    let p = runtime
        .load("grow", grow.as_ref(), limits, Default::default())
        .unwrap();
    let run = runtime.deliver(&p, &event()).await;
    assert_eq!(
        run.invocation,
        Invocation::Trap("memory limit 1 MiB reached".into())
    );

    let looping = common::fixture(dir.path(), "loop", common::LOOP);
    let limits = Limits {
        timeout: Duration::from_millis(50),
        memory: 1 << 20,
        ..Limits::default()
    };
    let p = runtime
        .load("loop", looping.as_ref(), limits, Default::default())
        .unwrap();
    let run = runtime.deliver(&p, &event()).await;
    assert_eq!(
        run.invocation,
        Invocation::Trap("deadline of 50ms exceeded".into())
    );
    assert!(run.elapsed >= Duration::from_millis(50));

    // Not a component at all: a clear load error naming the plugin.
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"not wasm").unwrap();
    let err = runtime
        .load("junk", &junk, Limits::default(), Default::default())
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("plugin `junk`:"), "{err}");
    assert!(err.contains("is not a valid component"), "{err}");
}

/// A fixture component (see `common::fixture`) with `extra` — component-level
/// definitions — added at its top.
fn fixture_with(dir: &std::path::Path, name: &str, extra: &str, body: &str) -> String {
    let template = include_str!("fixtures/consumer.wat.in");
    let text = template
        .replacen("(component\n", &format!("(component\n{extra}\n"), 1)
        .replace("{{BODY}}", body);
    let bytes = wat::parse_str(&text).expect("fixture compiles");
    let path = dir.join(format!("{name}.wasm"));
    std::fs::write(&path, bytes).expect("write fixture");
    path.display().to_string()
}

/// Three more core instances, each with a 640 KiB memory and a table.
const EXTRA_INSTANCES: &str = "(core module $extra (memory 10) (table 1 funcref))
  (core instance (instantiate $extra))
  (core instance (instantiate $extra))
  (core instance (instantiate $extra))";

fn runtime(dir: &std::path::Path) -> Runtime {
    let journal = Journal::open(&dir.join("data")).unwrap();
    Runtime::new(&dir.join("cache"), journal).unwrap()
}

#[tokio::test]
async fn imports_the_host_does_not_grant_fail_at_load_naming_the_import() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    for import in [
        "wasi:sockets/tcp@0.2.6",
        "wasi:filesystem/preopens@0.2.6",
        "acme:backdoor/shell@1.0.0",
    ] {
        let wasm = fixture_with(
            dir.path(),
            "importer",
            &format!("(import \"{import}\" (instance (export \"open\" (func))))"),
            "(i32.const 2048)",
        );
        let err = runtime
            .load("nosy", wasm.as_ref(), Limits::default(), Default::default())
            .unwrap_err();
        assert!(matches!(err, RuntimeError::Ungranted { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("plugin `nosy` imports `{import}`, which the host does not grant to plugins")
        );
    }
    // What `std` needs is granted: stdio, environment, exit, clocks, random.
    let wasm = fixture_with(
        dir.path(),
        "std",
        "(import \"wasi:cli/environment@0.2.6\" (instance
           (export \"get-environment\" (func (result (list (tuple string string)))))))
         (import \"wasi:clocks/monotonic-clock@0.2.6\" (instance
           (export \"now\" (func (result u64)))))
         (import \"wasi:random/random@0.2.6\" (instance
           (export \"get-random-u64\" (func (result u64)))))",
        "(i32.const 2048)",
    );
    let p = runtime
        .load("std", wasm.as_ref(), Limits::default(), Default::default())
        .unwrap();
    assert_eq!(
        runtime.deliver(&p, &event()).await.invocation,
        Invocation::Ok
    );
}

#[tokio::test]
async fn fuel_caps_cpu_per_delivery_on_its_own_engine() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    let fueled = Limits {
        timeout: Duration::from_secs(30),
        fuel: Some(100_000),
        ..Limits::default()
    };
    let looping = common::fixture(dir.path(), "loop", common::LOOP);
    let p = runtime
        .load("spin", looping.as_ref(), fueled, Default::default())
        .unwrap();
    let run = runtime.deliver(&p, &event()).await;
    assert_eq!(
        run.invocation,
        Invocation::Trap("fuel limit of 100000 exhausted".into())
    );
    // Each delivery gets the whole budget again, and a handler within it
    // succeeds.
    let once = common::fixture(dir.path(), "once", ONCE_PER_INSTANCE);
    let p = runtime
        .load("once", once.as_ref(), fueled, Default::default())
        .unwrap();
    for _ in 0..3 {
        assert_eq!(
            runtime.deliver(&p, &event()).await.invocation,
            Invocation::Ok
        );
    }
    // The deadline still applies on the fuel engine (its epoch ticks too).
    let p = runtime
        .load(
            "spin-long",
            looping.as_ref(),
            Limits {
                timeout: Duration::from_millis(50),
                fuel: Some(u64::MAX / 2),
                ..Limits::default()
            },
            Default::default(),
        )
        .unwrap();
    assert_eq!(
        runtime.deliver(&p, &event()).await.invocation,
        Invocation::Trap("deadline of 50ms exceeded".into())
    );
    // Plugins without fuel are not metered: the same loop runs until its
    // deadline, not out of fuel.
    let p = runtime
        .load(
            "spin-free",
            looping.as_ref(),
            Limits {
                timeout: Duration::from_millis(50),
                ..Limits::default()
            },
            Default::default(),
        )
        .unwrap();
    assert_eq!(
        runtime.deliver(&p, &event()).await.invocation,
        Invocation::Trap("deadline of 50ms exceeded".into())
    );
}

#[tokio::test]
async fn instance_table_and_memory_caps_fail_the_delivery_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    // Four core instances (the fixture's own and three more), four tables,
    // four memories of 64 KiB + 3 × 640 KiB.
    let wasm = fixture_with(dir.path(), "many", EXTRA_INSTANCES, "(i32.const 2048)");
    let deliver = |limits: Limits| {
        let (runtime, wasm) = (&runtime, &wasm);
        async move {
            let p = runtime
                .load("many", wasm.as_ref(), limits, Default::default())
                .unwrap();
            runtime.deliver(&p, &event()).await.invocation
        }
    };
    assert_eq!(deliver(Limits::default()).await, Invocation::Ok);
    assert_eq!(
        deliver(Limits {
            max_instances: 3,
            ..Limits::default()
        })
        .await,
        Invocation::Trap("instance limit of 3 reached (`max_instances`)".into())
    );
    assert_eq!(
        deliver(Limits {
            max_tables: 2,
            ..Limits::default()
        })
        .await,
        Invocation::Trap("table count limit of 2 reached (`max_tables`)".into())
    );
    // `memory` caps all memories together: each is under 1 MiB, their sum
    // (1984 KiB) is not.
    assert_eq!(
        deliver(Limits {
            memory: 1 << 20,
            ..Limits::default()
        })
        .await,
        Invocation::Trap("memory limit 1 MiB reached".into())
    );
    assert_eq!(
        deliver(Limits {
            memory: 2 << 20,
            ..Limits::default()
        })
        .await,
        Invocation::Ok
    );
}

#[tokio::test]
async fn table_growth_and_recursion_fail_the_delivery_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path());
    // A table grown past 100,000 elements.
    let template = include_str!("fixtures/consumer.wat.in").replacen(
        "(memory (export \"memory\") 1)",
        "(memory (export \"memory\") 1) (table $tab 1 funcref)",
        1,
    );
    let text = template.replace(
        "{{BODY}}",
        "(drop (table.grow $tab (ref.null func) (i32.const 200000))) (i32.const 2048)",
    );
    let grow = dir.path().join("grow-table.wasm");
    std::fs::write(&grow, wat::parse_str(&text).unwrap()).unwrap();
    let p = runtime
        .load("grow-table", &grow, Limits::default(), Default::default())
        .unwrap();
    assert_eq!(
        runtime.deliver(&p, &event()).await.invocation,
        Invocation::Trap("table limit of 100000 elements reached".into())
    );
    // `handle` calling itself without end.
    let recurse = common::fixture(
        dir.path(),
        "recurse",
        "(drop (call 1 (local.get $event))) (i32.const 2048)",
    );
    let p = runtime
        .load(
            "recurse",
            recurse.as_ref(),
            Limits::default(),
            Default::default(),
        )
        .unwrap();
    assert_eq!(
        runtime.deliver(&p, &event()).await.invocation,
        Invocation::Trap("stack overflow".into())
    );
}

fn event_with(id: &str, data: &str) -> Event {
    Event {
        id: id.into(),
        data: data.as_bytes().to_vec(),
        ..event()
    }
}

fn reusing(timeout: Duration) -> Limits {
    Limits {
        timeout,
        memory: 16 << 20,
        isolation: Isolation::Reuse,
        ..Limits::default()
    }
}

#[tokio::test]
async fn reused_instances_carry_memory_over_until_a_trap_throws_them_away() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(&dir.path().join("data")).unwrap();
    let runtime = Runtime::new(&dir.path().join("cache"), journal).unwrap();

    // The fixture traps the second time it runs in an instance: with reuse,
    // the second delivery finds the first one's memory. The instance that
    // trapped is dropped, so the third delivery gets a new one.
    let once = common::fixture(dir.path(), "once", ONCE_PER_INSTANCE);
    let p = runtime
        .load(
            "once",
            once.as_ref(),
            reusing(Duration::from_secs(5)),
            Default::default(),
        )
        .unwrap();
    let outcomes: Vec<Invocation> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(runtime.deliver(&p, &event()).await.invocation);
        }
        v
    };
    assert_eq!(outcomes[0], Invocation::Ok);
    assert!(
        matches!(&outcomes[1], Invocation::Trap(t) if t.contains("unreachable")),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[2], Invocation::Ok, "a new instance after the trap");
    assert!(
        matches!(&outcomes[3], Invocation::Trap(_)),
        "and that one is reused again: {outcomes:?}"
    );

    // The default stays one fresh instance per delivery.
    let fresh = runtime
        .load("once", once.as_ref(), Limits::default(), Default::default())
        .unwrap();
    assert_eq!(fresh.limits.isolation, Isolation::InstancePerEvent);
    for _ in 0..3 {
        let run = runtime.deliver(&fresh, &event()).await;
        assert_eq!(run.invocation, Invocation::Ok);
    }
}

#[tokio::test]
async fn reused_instances_get_a_deadline_per_call() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(&dir.path().join("data")).unwrap();
    let runtime = Runtime::new(&dir.path().join("cache"), journal).unwrap();
    let timeout = Duration::from_millis(50);

    // Idle for longer than the timeout between calls: each call has the
    // whole timeout, counted from its own start.
    let ok = common::fixture(dir.path(), "ok", OK);
    let p = runtime
        .load("ok", ok.as_ref(), reusing(timeout), Default::default())
        .unwrap();
    for _ in 0..3 {
        assert_eq!(
            runtime.deliver(&p, &event()).await.invocation,
            Invocation::Ok
        );
        tokio::time::sleep(timeout * 2).await;
    }

    // A reused instance that runs past its deadline fails that delivery and
    // is thrown away (its memory says "loop" next time; a new one does not).
    let looping = common::fixture(dir.path(), "loop2", LOOP_SECOND_TIME);
    let p = runtime
        .load(
            "loop2",
            looping.as_ref(),
            reusing(timeout),
            Default::default(),
        )
        .unwrap();
    assert_eq!(
        runtime.deliver(&p, &event()).await.invocation,
        Invocation::Ok
    );
    let run = runtime.deliver(&p, &event()).await;
    assert_eq!(
        run.invocation,
        Invocation::Trap("deadline of 50ms exceeded".into())
    );
    assert!(run.elapsed >= timeout);
    assert_eq!(
        runtime.deliver(&p, &event()).await.invocation,
        Invocation::Ok
    );
}

#[tokio::test]
async fn reused_instances_get_fresh_host_state_and_stdio_per_call() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(&dir.path().join("data")).unwrap();
    let runtime = Runtime::new(&dir.path().join("cache"), journal).unwrap();
    let wasm = switchyard::runtime::cargo::build_plugin(
        std::path::Path::new(&common::plugin_crate("flaky")),
        std::path::Path::new(&common::build_dir()),
    )
    .await
    .unwrap();
    let p = runtime
        .load(
            "flaky",
            &wasm,
            reusing(Duration::from_secs(5)),
            Default::default(),
        )
        .unwrap();

    // Each call's kv writes are its own, not the previous calls' too.
    for id in ["a", "b", "c"] {
        let run = runtime.deliver(&p, &event_with(id, "{}")).await;
        assert_eq!(run.invocation, Invocation::Ok);
        let keys: Vec<&str> = run.kv.writes.iter().map(|w| w.key.as_str()).collect();
        assert_eq!(keys, [format!("done/{id}")]);
    }
    // A guest panic is explained by what it printed (captured per call) ...
    let run = runtime
        .deliver(&p, &event_with("d", r#"{"mode": "trap"}"#))
        .await;
    let Invocation::Trap(text) = run.invocation else {
        panic!("expected a trap, got {:?}", run.invocation);
    };
    assert!(text.contains("flaky: trap on attempt 1"), "{text}");
    assert!(run.kv.writes.is_empty(), "{:?}", run.kv.writes);
    // ... and the next delivery, in a new instance, succeeds.
    let run = runtime.deliver(&p, &event_with("e", "{}")).await;
    assert_eq!(run.invocation, Invocation::Ok);
    assert_eq!(run.kv.writes.len(), 1);
}

#[test]
fn isolation_is_read_from_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = common::fixture(dir.path(), "ok", OK);
    let file = dir.path().join("rules.toml");
    let write = |isolation: &str| {
        std::fs::write(
            &file,
            format!(
                "[server]\ndata_dir = \"data\"\n\n[[plugins]]\nname = \"p\"\nwasm = \"{wasm}\"\n{isolation}\n"
            ),
        )
        .unwrap();
    };
    write("");
    let config = switchyard::config::load(&file).unwrap();
    assert_eq!(
        config.plugins["p"].limits.isolation,
        Isolation::InstancePerEvent
    );
    write("isolation = \"reuse\"");
    let config = switchyard::config::load(&file).unwrap();
    assert_eq!(config.plugins["p"].limits.isolation, Isolation::Reuse);
    write("isolation = \"instance-per-event\"");
    let config = switchyard::config::load(&file).unwrap();
    assert_eq!(
        config.plugins["p"].limits.isolation,
        Isolation::InstancePerEvent
    );
    write("isolation = \"shared\"");
    let err = switchyard::config::load(&file).unwrap_err().to_string();
    assert!(err.contains("plugins[0].isolation"), "{err}");
    assert!(err.contains("unknown isolation `shared`"), "{err}");
}
