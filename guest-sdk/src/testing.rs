//! Unit-test a plugin natively with plain `cargo test`: a mock host for
//! [`kv`](crate::kv), [`emit`](crate::emit), [`config`](crate::config) and
//! [`log`](crate::log), with the router's commit rules (a failed `handle`
//! leaves no kv writes and no emitted events behind; a query's kv is
//! read-only) and its limits on keys, values, emits and what one delivery
//! may store ([`MAX_OUTPUT_PER_DELIVERY`](crate::MAX_OUTPUT_PER_DELIVERY)),
//! with the router's error texts: a plugin that passes its tests here does
//! not meet a limit for the first time in production.
//!
//! ```
//! use switchyard_sdk::testing::{MockHost, event};
//! use switchyard_sdk::{kv, Event, Failure, Plugin};
//!
//! struct Counter;
//!
//! impl Plugin for Counter {
//!     fn handle(event: Event) -> Result<(), Failure> {
//!         let step: i64 = switchyard_sdk::config::get("step").unwrap_or(1);
//!         let n = kv::increment(&format!("count/{}", event.ty), step)?;
//!         if n == 3 {
//!             switchyard_sdk::emit::json("counter.three", &event.ty)?;
//!         }
//!         Ok(())
//!     }
//! }
//!
//! let host = MockHost::new().config(serde_json::json!({ "step": 1 }));
//! for _ in 0..3 {
//!     host.handle::<Counter>(event("order.created", &serde_json::json!({}))).unwrap();
//! }
//! assert_eq!(host.kv_string("count/order.created").as_deref(), Some("3"));
//! assert_eq!(host.emitted()[0].ty, "counter.three");
//! ```

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::emit::{
    EMIT_OVERHEAD, MAX_DATA_LEN, MAX_EMITS_PER_DELIVERY, MAX_SUBJECT_LEN, MAX_TYPE_LEN,
};
use crate::kv::{KvError, MAX_KEY_LEN, MAX_VALUE_LEN, MAX_WRITES_PER_DELIVERY};
use crate::query::{Request, Response};
use crate::{Event, Failure, MAX_OUTPUT_PER_DELIVERY, Plugin};

/// An event for a test: type `ty`, `data` as JSON, a fresh id, source `test`.
pub fn event<T: Serialize + ?Sized>(ty: &str, data: &T) -> Event {
    thread_local!(static NEXT: std::cell::Cell<u64> = const { std::cell::Cell::new(1) });
    let n = NEXT.with(|c| {
        let n = c.get();
        c.set(n + 1);
        n
    });
    Event {
        id: format!("test-{n}"),
        source: "test".into(),
        ty: ty.into(),
        subject: None,
        time: "2026-01-01T00:00:00Z".into(),
        datacontenttype: "application/json".into(),
        data: serde_json::to_vec(data).unwrap_or_else(|_| b"null".to_vec()),
        extensions: Vec::new(),
    }
}

/// An event a plugin emitted under a [`MockHost`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emitted {
    /// The id the mock host gave it.
    pub id: String,
    /// Its type.
    pub ty: String,
    /// Its subject, if set.
    pub subject: Option<String>,
    /// Its media type.
    pub datacontenttype: String,
    /// Its data.
    pub data: Vec<u8>,
}

impl Emitted {
    /// The data deserialized from JSON.
    pub fn data_as<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.data)
    }
}

#[derive(Debug, Clone, Default)]
struct Entry {
    value: Vec<u8>,
    expires: Option<Instant>,
}

#[derive(Debug, Default)]
pub(crate) struct State {
    kv: BTreeMap<String, Entry>,
    config: serde_json::Map<String, serde_json::Value>,
    logs: Vec<(String, String)>,
    emitted: Vec<Emitted>,
    /// Emits of the call in progress (kept only if it succeeds).
    pending: Vec<Emitted>,
    read_only: bool,
    next_id: u64,
    /// The call in progress: bytes of the last write of each key written.
    written: BTreeMap<String, usize>,
    /// The call in progress: bytes it would store (kv writes and emits).
    output: usize,
    /// The call in progress: the first emit limit it hit, which fails the
    /// delivery whatever `handle` returns.
    violation: Option<String>,
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<RefCell<State>>>> = const { RefCell::new(None) };
}

/// Runs `f` on the mock host of the call in progress; `None` outside one.
pub(crate) fn with_current<R>(f: impl FnOnce(&mut State) -> R) -> Option<R> {
    let state = CURRENT.with(|c| c.borrow().clone())?;
    let mut s = state.borrow_mut();
    Some(f(&mut s))
}

/// A fake router for native tests: keeps kv, config, logs and emitted events
/// in memory and calls a plugin's `handle` and `query` with them.
#[derive(Debug, Default, Clone)]
pub struct MockHost {
    state: Rc<RefCell<State>>,
}

impl MockHost {
    /// A host with empty kv and config.
    pub fn new() -> MockHost {
        MockHost::default()
    }

    /// Sets the plugin's `config` table (a JSON object; anything else is
    /// ignored).
    pub fn config(self, table: serde_json::Value) -> MockHost {
        if let serde_json::Value::Object(m) = table {
            self.state.borrow_mut().config = m;
        }
        self
    }

    /// Stores `value` as JSON under `key` before the test runs.
    pub fn with_json<T: Serialize + ?Sized>(self, key: &str, value: &T) -> MockHost {
        let bytes = serde_json::to_vec(value).unwrap_or_default();
        self.state.borrow_mut().kv.insert(
            key.into(),
            Entry {
                value: bytes,
                expires: None,
            },
        );
        self
    }

    /// Calls `P::handle(event)` as the router would: on `Err`, its kv writes
    /// and emitted events are dropped. An emit over a limit (more than
    /// [`MAX_EMITS_PER_DELIVERY`], or past [`MAX_OUTPUT_PER_DELIVERY`]) fails
    /// the call whatever `handle` returned: `Err(Failure::Reject(why))`, as
    /// the router dead-letters it.
    pub fn handle<P: Plugin>(&self, event: Event) -> Result<(), Failure> {
        let before = {
            let mut s = self.state.borrow_mut();
            s.written.clear();
            s.output = 0;
            s.violation = None;
            s.kv.clone()
        };
        let mut result = self.call(false, || P::handle(event));
        let mut s = self.state.borrow_mut();
        if let Some(why) = s.violation.take() {
            result = Err(Failure::reject(why));
        }
        let pending = std::mem::take(&mut s.pending);
        match &result {
            Ok(()) => s.emitted.extend(pending),
            Err(_) => s.kv = before,
        }
        result
    }

    /// Calls `P::query(request)` with read-only kv.
    pub fn query<P: Plugin>(&self, path: &str, params: &[(&str, &str)]) -> Response {
        let request = Request {
            path: path.into(),
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        self.call(true, || P::query(request))
    }

    fn call<R>(&self, read_only: bool, f: impl FnOnce() -> R) -> R {
        struct Reset(Option<Rc<RefCell<State>>>);
        impl Drop for Reset {
            fn drop(&mut self) {
                let previous = self.0.take();
                CURRENT.with(|c| *c.borrow_mut() = previous);
            }
        }
        self.state.borrow_mut().read_only = read_only;
        let previous = CURRENT.with(|c| c.borrow_mut().replace(self.state.clone()));
        let _reset = Reset(previous);
        f()
    }

    /// The bytes under `key`, if any (and not expired).
    pub fn kv(&self, key: &str) -> Option<Vec<u8>> {
        self.state.borrow().get(key)
    }

    /// The value under `key` as UTF-8 text.
    pub fn kv_string(&self, key: &str) -> Option<String> {
        self.kv(key).and_then(|b| String::from_utf8(b).ok())
    }

    /// The value under `key` deserialized from JSON.
    pub fn kv_json<T: DeserializeOwned>(&self, key: &str) -> Option<T> {
        self.kv(key).and_then(|b| serde_json::from_slice(&b).ok())
    }

    /// Every live key, in order.
    pub fn kv_keys(&self) -> Vec<String> {
        self.state.borrow().list("", None, usize::MAX)
    }

    /// The events emitted by successful calls, oldest first.
    pub fn emitted(&self) -> Vec<Emitted> {
        self.state.borrow().emitted.clone()
    }

    /// The log lines, as (level, message), oldest first.
    pub fn logs(&self) -> Vec<(String, String)> {
        self.state.borrow().logs.clone()
    }
}

impl State {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        let e = self.kv.get(key)?;
        match e.expires {
            Some(at) if Instant::now() >= at => None,
            _ => Some(e.value.clone()),
        }
    }

    fn list(&self, prefix: &str, after: Option<&str>, limit: usize) -> Vec<String> {
        self.kv
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter(|(k, _)| after.is_none_or(|a| k.as_str() > a))
            .filter(|(k, _)| self.get(k).is_some())
            .take(limit)
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn writable(&self) -> Result<(), KvError> {
        if self.read_only {
            return Err(KvError::Invalid(
                "kv is read-only in a query; write while handling events".into(),
            ));
        }
        Ok(())
    }

    fn check_key(key: &str) -> Result<(), KvError> {
        if key.is_empty() {
            return Err(KvError::Invalid("kv key must not be empty".into()));
        }
        if key.len() > MAX_KEY_LEN {
            return Err(KvError::Invalid(format!(
                "kv key of {} bytes is over the limit of {MAX_KEY_LEN}",
                key.len()
            )));
        }
        Ok(())
    }

    /// Counts a write of `key` (with `value`, or a delete) against the
    /// delivery's limits, as the router does.
    fn record_write(&mut self, key: &str, value: Option<&[u8]>) -> Result<(), KvError> {
        self.writable()?;
        Self::check_key(key)?;
        if let Some(v) = value
            && v.len() > MAX_VALUE_LEN
        {
            return Err(KvError::Invalid(format!(
                "kv value of {} bytes is over the limit of {MAX_VALUE_LEN}",
                v.len()
            )));
        }
        if self.written.len() >= MAX_WRITES_PER_DELIVERY {
            return Err(KvError::Invalid(format!(
                "more than {MAX_WRITES_PER_DELIVERY} kv keys written in one delivery"
            )));
        }
        let size = key.len() + value.map_or(0, <[u8]>::len);
        let before = self.written.get(key).copied().unwrap_or(0);
        let output = self.output - before + size;
        if output > self.output && output > MAX_OUTPUT_PER_DELIVERY {
            return Err(KvError::Invalid(output_over_limit(output)));
        }
        self.output = output;
        self.written.insert(key.to_string(), size);
        Ok(())
    }

    pub(crate) fn kv_get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        Self::check_key(key)?;
        Ok(self.get(key))
    }

    pub(crate) fn kv_set(
        &mut self,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), KvError> {
        self.record_write(key, Some(value))?;
        self.kv.insert(
            key.into(),
            Entry {
                value: value.to_vec(),
                expires: ttl.map(|t| Instant::now() + t),
            },
        );
        Ok(())
    }

    pub(crate) fn kv_delete(&mut self, key: &str) -> Result<(), KvError> {
        self.record_write(key, None)?;
        self.kv.remove(key);
        Ok(())
    }

    pub(crate) fn kv_increment(&mut self, key: &str, delta: i64) -> Result<i64, KvError> {
        let current = match self.get(key) {
            None => 0,
            Some(b) => std::str::from_utf8(&b)
                .ok()
                .and_then(|t| t.trim().parse::<i64>().ok())
                .ok_or_else(|| {
                    KvError::Invalid(format!(
                        "kv increment: the value under {key:?} is not an integer"
                    ))
                })?,
        };
        let new = current
            .checked_add(delta)
            .ok_or_else(|| KvError::Invalid(format!("kv increment overflows under {key:?}")))?;
        self.kv_set(key, new.to_string().as_bytes(), None)?;
        Ok(new)
    }

    pub(crate) fn kv_cas(
        &mut self,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<bool, KvError> {
        if self.get(key).as_deref() != expected {
            return Ok(false);
        }
        match new {
            Some(v) => self.kv_set(key, v, None)?,
            None => self.kv_delete(key)?,
        }
        Ok(true)
    }

    pub(crate) fn kv_list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<String>, KvError> {
        Ok(self.list(prefix, after, limit.clamp(1, 1000) as usize))
    }

    pub(crate) fn config_get(&self, key: &str) -> Option<String> {
        self.config.get(key).map(|v| v.to_string())
    }

    pub(crate) fn config_all(&self) -> String {
        serde_json::Value::Object(self.config.clone()).to_string()
    }

    pub(crate) fn log(&mut self, level: &str, message: &str) {
        self.logs.push((level.into(), message.into()));
    }

    pub(crate) fn emit(
        &mut self,
        ty: String,
        subject: Option<String>,
        datacontenttype: Option<String>,
        data: Vec<u8>,
    ) -> Result<String, crate::EmitError> {
        if self.read_only {
            return Err(crate::EmitError::Invalid(
                "emit is only possible while handling an event".into(),
            ));
        }
        if self.pending.len() >= MAX_EMITS_PER_DELIVERY {
            return self.violated(format!(
                "emit refused: more than {MAX_EMITS_PER_DELIVERY} events from one delivery"
            ));
        }
        if ty.is_empty() || ty.len() > MAX_TYPE_LEN {
            return Err(crate::EmitError::Invalid(format!(
                "an emitted event's type must be 1 to {MAX_TYPE_LEN} bytes"
            )));
        }
        if subject.as_ref().is_some_and(|s| s.len() > MAX_SUBJECT_LEN) {
            return Err(crate::EmitError::Invalid(format!(
                "an emitted event's subject must be at most {MAX_SUBJECT_LEN} bytes"
            )));
        }
        if data.len() > MAX_DATA_LEN {
            return Err(crate::EmitError::Invalid(format!(
                "an emitted event's data of {} bytes is over the limit of {MAX_DATA_LEN}",
                data.len()
            )));
        }
        let output = self.output
            + data.len()
            + ty.len()
            + subject.as_ref().map_or(0, String::len)
            + EMIT_OVERHEAD;
        if output > MAX_OUTPUT_PER_DELIVERY {
            return self.violated(format!("emit refused: {}", output_over_limit(output)));
        }
        let datacontenttype = datacontenttype.unwrap_or_else(|| "application/json".into());
        if is_json_media_type(&datacontenttype)
            && let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&data)
        {
            return Err(crate::EmitError::Invalid(format!(
                "an emitted event's data is not valid JSON ({datacontenttype}): {e}"
            )));
        }
        self.output = output;
        self.next_id += 1;
        let id = format!("emitted-{}", self.next_id);
        self.pending.push(Emitted {
            id: id.clone(),
            ty,
            subject,
            datacontenttype,
            data,
        });
        Ok(id)
    }

    /// An emit limit: the emit fails, and so does the delivery.
    fn violated(&mut self, why: String) -> Result<String, crate::EmitError> {
        self.violation.get_or_insert_with(|| why.clone());
        Err(crate::EmitError::Limit(why))
    }
}

fn output_over_limit(bytes: usize) -> String {
    format!(
        "one delivery may store at most {} MiB of kv writes and emitted events together \
         (this would make {bytes} bytes)",
        MAX_OUTPUT_PER_DELIVERY >> 20
    )
}

/// Whether the router requires an emitted event's data of this media type to
/// be valid JSON: `application/json`, `text/json` or `*+json`, parameters
/// aside. (The router has its own copy; a test of the host checks that the
/// two agree.)
pub fn is_json_media_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence == "text/json" || essence.ends_with("+json")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv;

    struct Writer;

    impl Plugin for Writer {
        fn handle(event: Event) -> Result<(), Failure> {
            kv::set_string("last", &event.ty)?;
            crate::emit::json("seen", &event.ty)?;
            crate::info!("saw {}", event.ty);
            if event.ty == "bad" {
                return Err(Failure::reject("bad"));
            }
            Ok(())
        }

        fn query(request: Request) -> Response {
            match kv::set("x", b"1") {
                Ok(()) => Response::json(&"wrote"),
                Err(e) => Response::error(409, &format!("{}: {e}", request.path)),
            }
        }
    }

    #[test]
    fn failed_calls_leave_nothing_behind() {
        let host = MockHost::new();
        host.handle::<Writer>(event("good", &1)).unwrap();
        assert!(host.handle::<Writer>(event("bad", &1)).is_err());
        assert_eq!(host.kv_string("last").as_deref(), Some("good"));
        assert_eq!(host.emitted().len(), 1);
        assert_eq!(host.emitted()[0].data_as::<String>().unwrap(), "good");
        assert_eq!(host.logs().len(), 2, "logs are kept either way");
    }

    #[test]
    fn queries_cannot_write() {
        let host = MockHost::new();
        let r = host.query::<Writer>("p", &[]);
        assert_eq!(r.status, 409);
        assert!(String::from_utf8(r.body).unwrap().contains("read-only"));
        assert!(host.kv_keys().is_empty());
    }

    #[test]
    fn kv_operations() {
        let host = MockHost::new().with_json("n", &5);
        struct Ops;
        impl Plugin for Ops {
            fn handle(_: Event) -> Result<(), Failure> {
                assert_eq!(kv::increment("n", 2)?, 7);
                assert!(kv::compare_and_swap("k", None, Some(b"v"))?);
                assert!(!kv::compare_and_swap("k", None, Some(b"w"))?);
                kv::set_with_ttl("gone", b"x", Duration::from_nanos(1))?;
                std::thread::sleep(Duration::from_millis(2));
                assert_eq!(kv::get("gone")?, None);
                let keys: Result<Vec<String>, _> = kv::keys("").collect();
                assert_eq!(keys?, ["k", "n"]);
                Ok(())
            }
        }
        host.handle::<Ops>(event("t", &())).unwrap();
        assert_eq!(host.kv_json::<i64>("n"), Some(7));
    }

    /// The router's limits hold under the mock too, with its texts.
    #[test]
    fn the_routers_limits_apply() {
        use crate::emit::{self, Emit};
        struct Limits;
        impl Plugin for Limits {
            fn handle(event: Event) -> Result<(), Failure> {
                let invalid = |r: Result<(), KvError>, text: &str| match r {
                    Err(KvError::Invalid(m)) if m.contains(text) => {}
                    other => panic!("{other:?}: wanted an error saying {text:?}"),
                };
                let mb = vec![b'0'; MAX_VALUE_LEN];
                match event.ty.as_str() {
                    "keys" => {
                        invalid(
                            kv::set(&"k".repeat(MAX_KEY_LEN + 1), b"v"),
                            "over the limit of 512",
                        );
                        invalid(kv::get("").map(drop), "must not be empty");
                        kv::set(&"k".repeat(MAX_KEY_LEN), b"v")?;
                        invalid(
                            kv::set("v", &vec![0; MAX_VALUE_LEN + 1]),
                            "over the limit of 1048576",
                        );
                    }
                    "output" => {
                        // Rewriting one key counts its last value only.
                        for _ in 0..10 {
                            kv::set("same", &mb)?;
                        }
                        kv::set("a", &mb)?;
                        kv::set("b", &mb)?;
                        invalid(kv::set("c", &mb), "at most 4 MiB");
                        // What still fits is taken.
                        kv::set("small", b"1")?;
                    }
                    "writes" => {
                        for i in 0..MAX_WRITES_PER_DELIVERY {
                            kv::set(&format!("k{i}"), b"")?;
                        }
                        invalid(kv::set("one-more", b""), "more than 10000 kv keys");
                    }
                    "emits" => {
                        assert!(matches!(
                            Emit::new("e").bytes("application/json", b"{".to_vec()).send(),
                            Err(crate::EmitError::Invalid(m)) if m.contains("not valid JSON")
                        ));
                        Emit::new("e").bytes("text/plain", b"{".to_vec()).send()?;
                        for i in 1..MAX_EMITS_PER_DELIVERY {
                            emit::json("e", &i)?;
                        }
                        // Ignored by the plugin, but the delivery fails.
                        let _ = emit::json("e", &0);
                        kv::set("after", b"1")?;
                    }
                    _ => {}
                }
                Ok(())
            }
        }
        let host = MockHost::new();
        host.handle::<Limits>(event("keys", &())).unwrap();
        host.handle::<Limits>(event("output", &())).unwrap();
        assert_eq!(host.kv("small").as_deref(), Some(&b"1"[..]));
        assert_eq!(host.kv("c"), None);
        // The limits are per delivery: the next one starts afresh.
        host.handle::<Limits>(event("output", &())).unwrap();
        host.handle::<Limits>(event("writes", &())).unwrap();
        assert_eq!(host.kv_keys().len(), MAX_WRITES_PER_DELIVERY + 5);
        match host.handle::<Limits>(event("emits", &())) {
            Err(Failure::Reject(why)) => assert!(why.contains("more than 100 events"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(host.emitted().is_empty());
        assert_eq!(host.kv("after"), None);
    }
}
