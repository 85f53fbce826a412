//! The compiled route matcher: ns per event against 10 / 100 / 1,000 /
//! 10,000 routes on a synthetic citylots-like data set (GeoJSON features of
//! about 1 KB: nested `properties`, `geometry.coordinates` arrays), with the
//! `quamina` crate on the same patterns as a peer.
//!
//! `switchyard` is the path events take (`matching_valid_json`: their data
//! was checked as they were accepted, so only what patterns name is read);
//! `switchyard-strict` also checks every byte (`matching_json`, as
//! `switchyard match` reads a file). quamina does not check what it skips.
//!
//! `cargo bench -p switchyard --bench matcher`

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use switchyard::rules::{Matcher, Pattern};

// The server's allocator (`host/src/main.rs`), for both engines: matching
// allocates only its result.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EVENTS: usize = 1_000;
const SPACE: usize = 10_000;

/// One GeoJSON feature, shaped like a San Francisco citylots record.
fn feature(rng: &mut fastrand::Rng) -> String {
    let block = rng.usize(0..SPACE);
    let lot = rng.usize(0..1000);
    let street = rng.usize(0..SPACE);
    let area = rng.u32(0..100_000);
    let (x, y) = (-122.5 + rng.f64() * 0.2, 37.7 + rng.f64() * 0.1);
    let mut ring = Vec::new();
    for i in 0..18 {
        let a = i as f64 / 18.0 * std::f64::consts::TAU;
        ring.push(format!(
            "[{:.13}, {:.13}, 0.0]",
            x + a.cos() * 1e-4,
            y + a.sin() * 1e-4
        ));
    }
    format!(
        r#"{{"type": "Feature", "properties": {{"MAPBLKLOT": "{block:05}{lot:03}", "BLKLOT": "{block:05}{lot:03}", "BLOCK_NUM": "{block:05}", "LOT_NUM": "{lot:03}", "FROM_ST": "{}", "TO_ST": "{}", "STREET": "STREET{street}", "ST_TYPE": "ST", "ODD_EVEN": "{}", "AREA": {area}}}, "geometry": {{"type": "Polygon", "coordinates": [[{}]]}}}}"#,
        rng.u32(0..2000),
        rng.u32(0..2000),
        if lot.is_multiple_of(2) { "E" } else { "O" },
        ring.join(", ")
    )
}

/// Route of `shape` for key `k` as (TOML `match` table, the same pattern as
/// JSON for quamina): exact strings, prefix, two fields, numeric ranges.
fn route(shape: usize, k: usize) -> (String, String) {
    match shape % 4 {
        0 => (
            format!(r#"{{ properties = {{ STREET = ["STREET{k}"] }} }}"#),
            format!(r#"{{"properties": {{"STREET": ["STREET{k}"]}}}}"#),
        ),
        1 => (
            format!(r#"{{ properties = {{ MAPBLKLOT = [{{ prefix = "{k:05}" }}] }} }}"#),
            format!(r#"{{"properties": {{"MAPBLKLOT": [{{"prefix": "{k:05}"}}]}}}}"#),
        ),
        2 => (
            format!(
                r#"{{ properties = {{ BLOCK_NUM = ["{k:05}"] }}, geometry = {{ type = ["Polygon"] }} }}"#
            ),
            format!(
                r#"{{"properties": {{"BLOCK_NUM": ["{k:05}"]}}, "geometry": {{"type": ["Polygon"]}}}}"#
            ),
        ),
        _ => (
            format!(
                r#"{{ properties = {{ AREA = [{{ numeric = [">=", {}, "<", {}] }}] }} }}"#,
                k * 10,
                k * 10 + 5
            ),
            format!(
                r#"{{"properties": {{"AREA": [{{"numeric": [">=", {}, "<", {}]}}]}}}}"#,
                k * 10,
                k * 10 + 5
            ),
        ),
    }
}

fn compile(src: &str) -> Pattern {
    let text = format!("match = {src}");
    let doc = toml::de::DeTable::parse(&text).expect("valid toml");
    let value = doc.get_ref().get("match").expect("match key");
    Pattern::compile(value).expect("valid pattern")
}

/// CPU time of this thread in ns, from the scheduler's accounting (Linux):
/// unlike wall time, not inflated when other processes share the cores.
fn thread_cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// CPU ns per call of `f` (event `i`): the best of 5 rounds of 100,000.
fn cpu_per_event(mut f: impl FnMut(usize)) -> Option<f64> {
    const ROUND: usize = 100_000;
    (0..ROUND / 5).for_each(&mut f);
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t0 = thread_cpu_ns()?;
        (0..ROUND).for_each(&mut f);
        let t1 = thread_cpu_ns()?;
        best = best.min(t1.saturating_sub(t0) as f64 / ROUND as f64);
    }
    Some(best)
}

fn best(xs: &[f64]) -> Option<f64> {
    xs.iter().copied().reduce(f64::min)
}

fn bench(c: &mut Criterion) {
    let mut rng = fastrand::Rng::with_seed(7);
    let events: Vec<String> = (0..EVENTS).map(|_| feature(&mut rng)).collect();
    let avg = events.iter().map(String::len).sum::<usize>() / events.len();
    println!("{EVENTS} events, {avg} bytes on average");
    // `matcher`: the four shapes take turns at every route count, so every
    // count names the same fields and counts differ only in table size.
    // `matcher-one-field`: only the first shape (one field named: the case
    // where quamina stops reading earliest).
    let cases = [10usize, 100, 1_000, 10_000]
        .map(|n| ("matcher", n, 4))
        .into_iter()
        .chain([10usize, 100].map(|n| ("matcher-one-field", n, 1)));
    // `ROUTES=10000` runs one route count only (for profiling).
    let only: Option<usize> = std::env::var("ROUTES").ok().and_then(|v| v.parse().ok());
    for (group_name, n, shapes) in cases.filter(|c| only.is_none_or(|o| o == c.1)) {
        let mut group = c.benchmark_group(group_name);
        // Spread the routes over the key space the events draw from.
        let routes: Vec<(String, String)> =
            (0..n).map(|i| route(i % shapes, i * (SPACE / n))).collect();
        let patterns: Vec<Pattern> = routes.iter().map(|(t, _)| compile(t)).collect();
        let matcher = Matcher::new(&patterns);
        let mut q = quamina::Quamina::new();
        for (i, (_, json)) in routes.iter().enumerate() {
            q.add_pattern(i, json).expect("quamina pattern");
        }
        // Both must agree on what matches.
        let mut matched = 0;
        for e in &events {
            let mut ours = matcher.matching_json(e.as_bytes()).expect("json");
            let valid = matcher.matching_valid_json(e.as_bytes()).expect("json");
            assert_eq!(ours, valid, "{e}");
            let mut theirs = q.matches_for_event(e.as_bytes()).expect("json");
            ours.sort_unstable();
            theirs.sort_unstable();
            theirs.dedup();
            assert_eq!(ours, theirs, "{e}");
            matched += ours.len();
        }
        println!("{group_name}, {n} routes: {matched} matches over {EVENTS} events");
        // Interleaved, so that a noisy moment does not fall on one engine.
        let (mut ours, mut strict, mut theirs) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..3 {
            ours.extend(cpu_per_event(|i| {
                std::hint::black_box(matcher.matching_valid_json(events[i % EVENTS].as_bytes()))
                    .ok();
            }));
            strict.extend(cpu_per_event(|i| {
                std::hint::black_box(matcher.matching_json(events[i % EVENTS].as_bytes())).ok();
            }));
            theirs.extend(cpu_per_event(|i| {
                std::hint::black_box(q.matches_for_event(events[i % EVENTS].as_bytes())).ok();
            }));
        }
        if let (Some(ours), Some(strict), Some(theirs)) =
            (best(&ours), best(&strict), best(&theirs))
        {
            println!(
                "{group_name}, {n} routes, CPU time per event: switchyard {ours:.0} ns \
                 (strict {strict:.0} ns), quamina {theirs:.0} ns"
            );
        }
        let mut i = 0;
        group.bench_with_input(BenchmarkId::new("switchyard", n), &n, |b, _| {
            b.iter(|| {
                i = (i + 1) % events.len();
                matcher.matching_valid_json(events[i].as_bytes())
            })
        });
        let mut i = 0;
        group.bench_with_input(BenchmarkId::new("switchyard-strict", n), &n, |b, _| {
            b.iter(|| {
                i = (i + 1) % events.len();
                matcher.matching_json(events[i].as_bytes())
            })
        });
        let mut i = 0;
        group.bench_with_input(BenchmarkId::new("quamina", n), &n, |b, _| {
            b.iter(|| {
                i = (i + 1) % events.len();
                q.matches_for_event(events[i].as_bytes())
            })
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
