//! Parses a pattern (TOML) and matches events (JSON) with it: the input is
//! the pattern text, a NUL byte, then one event per following NUL-separated
//! part. Checks that nothing panics and that the compiled matcher agrees with
//! the pattern's own evaluation (the one `explain` uses).
//!
//! `cargo +nightly fuzz run match_pattern -- -max_total_time=60` (in host/)
#![no_main]

use libfuzzer_sys::fuzz_target;

use switchyard_fuzz::rules::matcher::Matcher;
use switchyard_fuzz::rules::pattern::Pattern;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|&b| b == 0);
    let Some(pattern) = parts.next() else { return };
    let Ok(pattern) = std::str::from_utf8(pattern) else {
        return;
    };
    let text = format!("match = {pattern}");
    let Ok(doc) = toml::de::DeTable::parse(&text) else {
        return;
    };
    let Some(value) = doc.get_ref().get("match") else {
        return;
    };
    let Ok(p) = Pattern::compile(value) else {
        return;
    };
    let m = Matcher::new([&p, &p]);
    for event in parts.take(4) {
        let trusted = m.matching_valid_json(event);
        if serde_json::from_slice::<serde::de::IgnoredAny>(event).is_ok() {
            assert_eq!(trusted.ok(), m.matching_json(event).ok(), "valid path");
        }
        let compiled = m.matching_json(event);
        let interpreted = p.matches_json(event);
        match (compiled, interpreted) {
            (Ok(routes), Ok(yes)) => {
                assert_eq!(
                    !routes.is_empty(),
                    yes,
                    "{pattern} on {:?}",
                    String::from_utf8_lossy(event)
                );
                assert!(routes.is_empty() || routes == [0, 1]);
            }
            (Err(_), Err(_)) => {}
            (a, b) => panic!("disagree on validity: {a:?} vs {b:?}"),
        }
    }
});
