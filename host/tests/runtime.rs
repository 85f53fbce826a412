//! The Wasm runtime on its own: the compiled-component cache, a fresh instance
//! per delivery, and limits that fail one delivery with a clear reason.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use switchyard::Event;
use switchyard::journal::Journal;
use switchyard::runtime::{Invocation, Limits, Runtime, RuntimeError};

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
    std::fs::write(&entries[0], &bad).unwrap();
    let again = runtime
        .load("p", wasm.as_ref(), Limits::default(), Default::default())
        .unwrap();
    assert_eq!(again.hash, first.hash);
    assert_eq!(std::fs::read(&entries[0]).unwrap(), good, "entry rewritten");
    // A truncated entry too.
    std::fs::write(&entries[0], &good[..good.len() / 3]).unwrap();
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
