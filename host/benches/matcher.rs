//! The compiled route matcher: ns per event against 10 / 100 / 1,000 /
//! 10,000 routes on a synthetic citylots-like data set (GeoJSON features of
//! about 1 KB: nested `properties`, `geometry.coordinates` arrays), with the
//! `quamina` crate on the same patterns as a peer.
//!
//! `cargo bench -p switchyard --bench matcher`

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use switchyard::rules::{Matcher, Pattern};

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

/// Route `k` as (TOML `match` table, the same pattern as JSON for quamina):
/// exact strings, prefix, two fields, numeric ranges.
fn route(k: usize) -> (String, String) {
    match k % 4 {
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

fn bench(c: &mut Criterion) {
    let mut rng = fastrand::Rng::with_seed(7);
    let events: Vec<String> = (0..EVENTS).map(|_| feature(&mut rng)).collect();
    let avg = events.iter().map(String::len).sum::<usize>() / events.len();
    println!("{EVENTS} events, {avg} bytes on average");
    let mut group = c.benchmark_group("matcher");
    for n in [10usize, 100, 1_000, 10_000] {
        // Spread the routes over the key space the events draw from.
        let routes: Vec<(String, String)> = (0..n).map(|i| route(i * (SPACE / n))).collect();
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
            let mut theirs = q.matches_for_event(e.as_bytes()).expect("json");
            ours.sort_unstable();
            theirs.sort_unstable();
            theirs.dedup();
            assert_eq!(ours, theirs, "{e}");
            matched += ours.len();
        }
        println!("{n} routes: {matched} matches over {EVENTS} events");
        let ours = cpu_per_event(|i| {
            std::hint::black_box(matcher.matching_json(events[i % EVENTS].as_bytes())).ok();
        });
        let theirs = cpu_per_event(|i| {
            std::hint::black_box(q.matches_for_event(events[i % EVENTS].as_bytes())).ok();
        });
        if let (Some(ours), Some(theirs)) = (ours, theirs) {
            println!(
                "{n} routes, CPU time per event: switchyard {ours:.0} ns, quamina {theirs:.0} ns"
            );
        }
        let mut i = 0;
        group.bench_with_input(BenchmarkId::new("switchyard", n), &n, |b, _| {
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
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
