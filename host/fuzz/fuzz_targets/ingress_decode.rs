//! The ingress decoder on arbitrary requests: the input is header lines
//! (`name: value`), an empty line, then the body, as on the wire. The first
//! byte picks the source's rules (type from a header or a pointer, a provider
//! id, a dedup pointer, a non-JSON content type allowed). Checks that nothing
//! panics, that what decodes has the attributes every event must have, and
//! that its envelope serializes.
//!
//! `cargo +nightly fuzz run ingress_decode -- -max_total_time=60` (in host/)
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

use switchyard_fuzz::decode::{FieldFrom, Request, SourceRules, decode};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (head, body) = match rest.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&rest[..i], &rest[i + 2..]),
        None => (&rest[..0], rest),
    };
    let mut headers = HeaderMap::new();
    for line in head.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    let type_header = FieldFrom::Header("x-kind".into());
    let type_pointer = FieldFrom::Pointer("/type".into());
    let subject = FieldFrom::Pointer("/a/0/b".into());
    let provider = FieldFrom::Header("webhook-id".into());
    let dedup = FieldFrom::Pointer("/id".into());
    let allowed = ["text/plain".to_string()];
    let rules = SourceRules {
        name: "fuzz",
        type_from: match flags % 3 {
            0 => None,
            1 => Some(&type_header),
            _ => Some(&type_pointer),
        },
        subject_from: Some(&subject),
        dedup_from: (flags & 4 != 0).then_some(&dedup),
        provider_id: (flags & 8 != 0).then_some(&provider),
        content_types: if flags & 16 != 0 { &allowed } else { &[] },
    };
    let decoded = match decode(&rules, &headers, body) {
        Ok(Request::One(d)) => vec![*d],
        Ok(Request::Batch(items)) => items.into_iter().filter_map(Result::ok).collect(),
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    for d in decoded {
        let e = &d.event;
        assert!(!e.id.is_empty() && !e.source.is_empty() && !e.ty.is_empty(), "{e:?}");
        let json = e.to_json();
        assert_eq!(json["id"], e.id.as_str());
        assert_eq!(json["type"], e.ty.as_str());
    }
});
