//! **A plugin that does what the event says**, for testing the host's
//! capabilities end to end. The event's data is `{"ops": [...]}`; each op runs
//! in turn and its result is appended to a JSON list stored under
//! `result/<event id>` (so a test reads back what the plugin saw):
//!
//! | op | does | result |
//! | --- | --- | --- |
//! | `{"op": "get", "key": K}` | `kv::get_string` | the value or `null` |
//! | `{"op": "set", "key": K, "value": V, "ttl_ms": T?}` | `kv::set` / `set_with_ttl` | `"ok"` |
//! | `{"op": "delete", "key": K}` | `kv::delete` | `"ok"` |
//! | `{"op": "increment", "key": K, "by": N}` | `kv::increment` | the new value |
//! | `{"op": "cas", "key": K, "expect": V or null, "new": V or null}` | `kv::compare_and_swap` | `true`/`false` |
//! | `{"op": "list", "prefix": P}` | every key via `kv::keys` | the keys |
//! | `{"op": "emit", "type": T, "data": D, "subject": S?}` | `emit::Emit` | the new id |
//! | `{"op": "fill", "prefix": P, "bytes": N, "count": C}` | C sets of N bytes each | `"ok"` |
//! | `{"op": "echo"}` | emits an event with this event's type and data (a loop) | the new id |
//!
//! An op that fails records `{"error": "..."}` and the rest still run, unless the
//! data says `"stop_on_error": true`, in which case the error fails the delivery.
//! The extensions `causationid` and `hops`, if the event has them, are recorded
//! under `seen/<event id>`.
//!
//! Queries: `kv/<key>` answers the value under a key (404 if none);
//! `write/<key>` tries to write (and answers the error a query gets);
//! `bad-answer` answers a content type with a line break in it.

use serde::Deserialize;
use serde_json::{Value, json};
use switchyard_sdk::query::{Request, Response};
use switchyard_sdk::{Event, Failure, Plugin, emit, kv};

#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Op {
    Get {
        key: String,
    },
    Set {
        key: String,
        value: String,
        ttl_ms: Option<u64>,
    },
    Delete {
        key: String,
    },
    Increment {
        key: String,
        by: i64,
    },
    Cas {
        key: String,
        expect: Option<String>,
        new: Option<String>,
    },
    List {
        prefix: String,
    },
    Emit {
        #[serde(rename = "type")]
        ty: String,
        #[serde(default)]
        data: Value,
        subject: Option<String>,
    },
    Fill {
        prefix: String,
        bytes: usize,
        count: usize,
    },
    Echo,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Script {
    ops: Vec<Op>,
    stop_on_error: bool,
}

fn run(op: Op, event: &Event) -> Result<Value, String> {
    let kv_err = |e: kv::KvError| e.to_string();
    Ok(match op {
        Op::Get { key } => json!(kv::get_string(&key).map_err(kv_err)?),
        Op::Set { key, value, ttl_ms } => {
            match ttl_ms {
                Some(ms) => {
                    kv::set_with_ttl(&key, value.as_bytes(), std::time::Duration::from_millis(ms))
                }
                None => kv::set(&key, value.as_bytes()),
            }
            .map_err(kv_err)?;
            json!("ok")
        }
        Op::Delete { key } => {
            kv::delete(&key).map_err(kv_err)?;
            json!("ok")
        }
        Op::Increment { key, by } => json!(kv::increment(&key, by).map_err(kv_err)?),
        Op::Cas { key, expect, new } => json!(
            kv::compare_and_swap(
                &key,
                expect.as_deref().map(str::as_bytes),
                new.as_deref().map(str::as_bytes)
            )
            .map_err(kv_err)?
        ),
        Op::List { prefix } => {
            let keys: Result<Vec<String>, _> = kv::keys(&prefix).collect();
            json!(keys.map_err(kv_err)?)
        }
        Op::Emit { ty, data, subject } => {
            let mut e = emit::Emit::new(&ty);
            if let Some(s) = &subject {
                e = e.subject(s);
            }
            let id = e
                .json(&data)
                .and_then(emit::Emit::send)
                .map_err(|e| e.to_string())?;
            json!(id)
        }
        Op::Fill {
            prefix,
            bytes,
            count,
        } => {
            let value = vec![b'x'; bytes];
            for i in 0..count {
                kv::set(&format!("{prefix}{i}"), &value).map_err(kv_err)?;
            }
            json!("ok")
        }
        Op::Echo => {
            let data: Value = event.data_as().map_err(|e| e.to_string())?;
            json!(emit::json(&event.ty, &data).map_err(|e| e.to_string())?)
        }
    })
}

struct Probe;

impl Plugin for Probe {
    fn handle(event: Event) -> Result<(), Failure> {
        let script: Script = event.data_as()?;
        let mut results = Vec::new();
        for op in script.ops {
            match run(op, &event) {
                Ok(v) => results.push(v),
                Err(e) if script.stop_on_error => return Err(Failure::reject(e)),
                Err(e) => results.push(json!({ "error": e })),
            }
        }
        kv::set_json(&format!("result/{}", event.id), &results)?;
        let ext = |name: &str| event.extension(name).map(str::to_string);
        if let (Some(cause), Some(hops)) = (ext("causationid"), ext("hops")) {
            kv::set_json(
                &format!("seen/{}", event.id),
                &json!({ "causationid": cause, "hops": hops, "source": event.source }),
            )?;
        }
        Ok(())
    }

    fn query(request: Request) -> Response {
        match request.segments().as_slice() {
            ["kv", key @ ..] => match kv::get_string(&key.join("/")) {
                Ok(Some(v)) => Response::json(&v),
                Ok(None) => Response::not_found("no such key"),
                Err(e) => Response::error(503, &e.to_string()),
            },
            ["write", key @ ..] => match kv::set(&key.join("/"), b"x") {
                Ok(()) => Response::json(&"written"),
                Err(e) => Response::error(409, &e.to_string()),
            },
            // An answer HTTP cannot carry, for the host's check.
            ["bad-answer"] => Response {
                status: 200,
                content_type: "text/plain\nx-injected: 1".into(),
                body: b"?".to_vec(),
            },
            _ => Response::not_found("try kv/<key> or write/<key>"),
        }
    }
}

switchyard_sdk::export!(Probe);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_parse() {
        let s: Script = serde_json::from_value(json!({
            "ops": [
                {"op": "increment", "key": "c", "by": 2},
                {"op": "cas", "key": "k", "expect": null, "new": "v"},
                {"op": "emit", "type": "t", "data": {"a": 1}},
                {"op": "set", "key": "t", "value": "v", "ttl_ms": 5}
            ],
            "stop_on_error": true
        }))
        .unwrap();
        assert_eq!(s.ops.len(), 4);
        assert!(s.stop_on_error);
        assert!(matches!(&s.ops[1], Op::Cas { expect: None, new: Some(n), .. } if n == "v"));
    }

    #[test]
    fn unknown_ops_are_refused() {
        assert!(serde_json::from_value::<Script>(json!({"ops": [{"op": "nope"}]})).is_err());
    }
}
