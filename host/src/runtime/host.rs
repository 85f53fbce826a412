//! What a plugin instance can reach: `log`, `config`, `kv`, `emit`, a WASI
//! context with nothing granted (no files, no environment, no sockets), and
//! outbound `wasi:http` to its `allow_http` hosts (see `super::http`).

use std::collections::HashMap;
use std::sync::Arc;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::bindings::switchyard::plugin::{config, emit, kv, log, types};
use super::http::{HttpHooks, HttpPolicy};
use super::stdio::TailPipe;
use super::{Limit, Limits, Plugin};
use crate::event::Event;
use crate::journal::{KvChanges, KvStore, KvWrite};

/// Longest key a plugin may use, bytes.
pub const MAX_KEY_LEN: usize = 512;
/// Largest value a plugin may store, bytes.
pub const MAX_VALUE_LEN: usize = 1 << 20;
/// Most distinct kv keys one delivery may write.
pub const MAX_WRITES_PER_DELIVERY: usize = 10_000;
/// Emits allowed from a webhook event to the last derived one, unless
/// `[server] max_hops` says otherwise.
pub const DEFAULT_MAX_HOPS: u32 = 8;
/// Most keys one `list-keys` call returns.
pub const MAX_LIST_KEYS: u32 = 1000;
/// Most events one delivery may emit.
pub const MAX_EMITS_PER_DELIVERY: usize = 100;
/// Largest `data` of an emitted event, bytes.
pub const MAX_EMIT_DATA: usize = 1 << 20;
/// Longest type of an emitted event, bytes.
pub const MAX_EMIT_TYPE: usize = 256;
/// Longest subject of an emitted event, bytes.
pub const MAX_EMIT_SUBJECT: usize = 1024;
/// Most bytes one delivery may ask the journal to store: its kv writes (key
/// and value, last write of each key) and its emitted events together. The
/// settlement is one commit, and a commit has to fit the journal's log
/// (as DynamoDB caps a transaction at 4 MB).
pub const MAX_OUTPUT_PER_DELIVERY: usize = 4 << 20;
/// The extension attribute naming the event whose delivery emitted an event.
pub const CAUSATION_EXTENSION: &str = "causationid";
/// The extension attribute counting emits since the webhook event.
pub const HOPS_EXTENSION: &str = "hops";
/// Most log bytes one delivery may emit; the rest is dropped (and counted).
pub const MAX_LOG_BYTES: usize = 64 << 10;
/// Longest single log line kept, bytes.
const MAX_LOG_LINE: usize = 4 << 10;
/// How much of stdout/stderr is kept, the last bytes (to explain a panic).
const STDIO_CAPTURE: usize = 8 << 10;

/// The per-delivery state of a store.
pub struct HostState {
    plugin: String,
    event_id: String,
    config: Arc<serde_json::Map<String, serde_json::Value>>,
    kv: Arc<dyn KvStore>,
    /// The value of each key first read from the store (for conflict checks).
    reads: HashMap<String, Option<Vec<u8>>>,
    /// This delivery's own writes, newest state per key.
    overlay: HashMap<String, Option<Vec<u8>>>,
    writes: Vec<KvWrite>,
    /// Where each key's write is in `writes`.
    write_index: HashMap<String, usize>,
    /// The plugin's kv usage when this delivery first wrote (bytes), and the
    /// change its writes make, for the quota.
    usage_base: Option<u64>,
    usage_delta: i64,
    /// The committed size (key + value) of each key written, for `usage_delta`.
    committed_size: HashMap<String, u64>,
    kv_quota: u64,
    /// Queries run with read-only kv and no emit.
    read_only: bool,
    /// The event being handled (for emitted events' `causationid` and hops).
    parent: Option<(String, u32)>,
    /// The trace context of the event being handled, which emitted events
    /// continue (`traceparent`, `tracestate`).
    parent_trace: Vec<(String, String)>,
    max_hops: u32,
    emitted: Vec<Event>,
    /// What this delivery's writes and emits take, for
    /// [`MAX_OUTPUT_PER_DELIVERY`].
    output_bytes: usize,
    /// Why an emit was refused for a limit: the delivery is dead-lettered even
    /// if the plugin went on and returned Ok.
    emit_violation: Option<String>,
    log_bytes: usize,
    log_dropped: usize,
    /// The guest's stdout and stderr (kept to explain a panic).
    stdio: TailPipe,
    /// Built when the guest first calls a WASI function (most deliveries
    /// never do): building it costs about as much as a whole reused call.
    wasi: Option<WasiCtx>,
    table: ResourceTable,
    pub(super) limits: Limiter,
    http: WasiHttpCtx,
    http_policy: Arc<HttpPolicy>,
    /// Made on the first `wasi:http` call: most deliveries make none.
    http_hooks: Option<HttpHooks>,
}

impl HostState {
    pub(super) fn new(plugin: &Plugin, event_id: &str, kv: Arc<dyn KvStore>) -> HostState {
        let stdio = TailPipe::new(STDIO_CAPTURE);
        HostState {
            plugin: plugin.name.clone(),
            event_id: event_id.to_string(),
            config: plugin.config.clone(),
            kv,
            reads: HashMap::new(),
            overlay: HashMap::new(),
            writes: Vec::new(),
            write_index: HashMap::new(),
            usage_base: None,
            usage_delta: 0,
            committed_size: HashMap::new(),
            kv_quota: plugin.limits.kv_quota,
            read_only: false,
            parent: None,
            parent_trace: Vec::new(),
            max_hops: DEFAULT_MAX_HOPS,
            emitted: Vec::new(),
            output_bytes: 0,
            emit_violation: None,
            log_bytes: 0,
            log_dropped: 0,
            stdio,
            wasi: None,
            table: ResourceTable::new(),
            limits: Limiter::new(plugin.limits),
            http: WasiHttpCtx::new(),
            http_policy: plugin.http.clone(),
            http_hooks: None,
        }
    }

    /// Lets `emit` derive events from `event`, up to `max_hops` from the
    /// webhook event.
    pub(super) fn set_parent(&mut self, event: &Event, max_hops: u32) {
        let hops = event
            .extensions
            .get(HOPS_EXTENSION)
            .and_then(|h| h.parse().ok())
            .unwrap_or(0);
        self.parent = Some((event.id.clone(), hops));
        self.parent_trace = [crate::trace::TRACEPARENT, crate::trace::TRACESTATE]
            .iter()
            .filter_map(|k| Some((k.to_string(), event.extensions.get(*k)?.clone())))
            .collect();
        self.max_hops = max_hops;
    }

    /// For queries: kv reads only, no emit.
    pub(super) fn set_read_only(&mut self) {
        self.read_only = true;
    }

    /// Why the delivery must fail although `handle` returned Ok, if it must.
    pub(super) fn emit_violation(&self) -> Option<&str> {
        self.emit_violation.as_deref()
    }

    /// The events emitted, to store if the delivery succeeds.
    pub(super) fn take_emitted(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.emitted)
    }

    /// The last outbound HTTP request failure of this delivery (refused,
    /// timed out, ...), to explain a retry.
    pub(super) fn http_failure(&self) -> Option<String> {
        self.http_hooks.as_ref().and_then(HttpHooks::last_failure)
    }

    pub(super) fn into_kv_changes(self) -> KvChanges {
        if self.log_dropped > 0 {
            tracing::warn!(
                plugin = %self.plugin,
                event_id = %self.event_id,
                dropped = self.log_dropped,
                "plugin log output over {MAX_LOG_BYTES} bytes was dropped"
            );
            super::count_limit_hit(&self.plugin, Limit::Log);
        }
        let dropped = self.stdio.dropped();
        if dropped > 0 {
            tracing::warn!(
                plugin = %self.plugin,
                event_id = %self.event_id,
                dropped,
                "plugin stdout/stderr before its last {STDIO_CAPTURE} bytes was dropped"
            );
            super::count_limit_hit(&self.plugin, Limit::Stdio);
        }
        KvChanges {
            reads: self.reads.into_iter().collect(),
            writes: self.writes,
        }
    }

    /// The name of the plugin this store runs.
    pub(super) fn plugin_name(&self) -> &str {
        &self.plugin
    }

    /// Where this store reads kv from.
    pub(super) fn kv(&self) -> &Arc<dyn KvStore> {
        &self.kv
    }

    /// Takes over `previous`'s WASI context, resource table and stdio
    /// capture (emptied), and its memory accounting: for the next call of the
    /// same instance (the guest may hold handles into the table).
    pub(super) fn keep_wasi_of(&mut self, previous: &mut HostState) {
        self.wasi = previous.wasi.take();
        self.table = std::mem::take(&mut previous.table);
        self.stdio = previous.stdio.clone();
        self.stdio.clear();
        self.limits.carry_usage_from(&previous.limits);
    }

    /// The last line the guest wrote to stdout/stderr, e.g. a panic message.
    pub(super) fn stderr_tail(&self) -> Option<String> {
        let bytes = self.stdio.contents();
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        if lines.is_empty() {
            return None;
        }
        // Rust prints "thread '<unnamed>' panicked at src/lib.rs:3:5:\n<message>".
        let tail = lines[lines.len().saturating_sub(2)..].join(": ");
        Some(truncate(&tail, 500).to_string())
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        let stdio = &self.stdio;
        let ctx = self.wasi.get_or_insert_with(|| {
            WasiCtxBuilder::new()
                .stdout(stdio.clone())
                .stderr(stdio.clone())
                .build()
        });
        WasiCtxView {
            ctx,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for HostState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        let hooks = self.http_hooks.get_or_insert_with(|| {
            HttpHooks::new(self.http_policy.clone(), &self.plugin, &self.event_id)
        });
        WasiHttpCtxView {
            ctx: &mut self.http,
            // The same table as WASI's: `wasi:http` bodies are `wasi:io` streams.
            table: &mut self.table,
            hooks,
        }
    }
}

impl types::Host for HostState {}

impl log::Host for HostState {
    fn log(&mut self, level: log::Level, message: String) {
        if self.log_bytes >= MAX_LOG_BYTES {
            self.log_dropped += 1;
            return;
        }
        self.log_bytes += message.len();
        let message = truncate(&message, MAX_LOG_LINE);
        let (plugin, event_id) = (&self.plugin, &self.event_id);
        match level {
            log::Level::Trace => tracing::trace!(target: "plugin", plugin, event_id, "{message}"),
            log::Level::Debug => tracing::debug!(target: "plugin", plugin, event_id, "{message}"),
            log::Level::Info => tracing::info!(target: "plugin", plugin, event_id, "{message}"),
            log::Level::Warn => tracing::warn!(target: "plugin", plugin, event_id, "{message}"),
            log::Level::Error => tracing::error!(target: "plugin", plugin, event_id, "{message}"),
        }
    }
}

impl config::Host for HostState {
    fn get(&mut self, key: String) -> Option<String> {
        self.config.get(&key).map(|v| v.to_string())
    }

    fn get_all(&mut self) -> String {
        serde_json::Value::Object((*self.config).clone()).to_string()
    }
}

impl HostState {
    fn check_key(key: &str) -> Result<(), kv::Error> {
        if key.is_empty() {
            return Err(kv::Error::Invalid("kv key must not be empty".into()));
        }
        if key.len() > MAX_KEY_LEN {
            return Err(kv::Error::Invalid(format!(
                "kv key of {} bytes is over the limit of {MAX_KEY_LEN}",
                key.len()
            )));
        }
        Ok(())
    }

    fn check_value(value: &[u8]) -> Result<(), kv::Error> {
        if value.len() > MAX_VALUE_LEN {
            return Err(kv::Error::Invalid(format!(
                "kv value of {} bytes is over the limit of {MAX_VALUE_LEN}",
                value.len()
            )));
        }
        Ok(())
    }

    fn unavailable(e: crate::journal::JournalError) -> kv::Error {
        kv::Error::Unavailable(e.to_string())
    }

    /// The value as this delivery sees it; a read from the store is recorded
    /// for the conflict check at commit.
    fn read(&mut self, key: &str) -> Result<Option<Vec<u8>>, kv::Error> {
        Self::check_key(key)?;
        if let Some(v) = self.overlay.get(key) {
            return Ok(v.clone());
        }
        if let Some(v) = self.reads.get(key) {
            return Ok(v.clone());
        }
        let value = self
            .kv
            .kv_get(&self.plugin, key)
            .map_err(Self::unavailable)?;
        self.reads.insert(key.to_string(), value.clone());
        Ok(value)
    }

    fn record_write(
        &mut self,
        key: String,
        value: Option<Vec<u8>>,
        expires_ms: Option<u64>,
    ) -> Result<(), kv::Error> {
        if self.read_only {
            return Err(kv::Error::Invalid(
                "kv is read-only in a query; write while handling events".into(),
            ));
        }
        if self.writes.len() >= MAX_WRITES_PER_DELIVERY {
            super::count_limit_hit(&self.plugin, Limit::Kv);
            return Err(kv::Error::Invalid(format!(
                "more than {MAX_WRITES_PER_DELIVERY} kv keys written in one delivery"
            )));
        }
        let size = |key: &str, value: Option<&[u8]>| key.len() + value.map_or(0, <[u8]>::len);
        let before = self.write_index.get(&key).map_or(0, |&i| {
            size(&self.writes[i].key, self.writes[i].value.as_deref())
        });
        let output = self.output_bytes - before + size(&key, value.as_deref());
        if output > self.output_bytes && output > MAX_OUTPUT_PER_DELIVERY {
            super::count_limit_hit(&self.plugin, Limit::Kv);
            return Err(kv::Error::Invalid(output_over_limit(output)));
        }
        if let Err(e) = self.charge_quota(&key, value.as_deref()) {
            if let kv::Error::Invalid(_) = e {
                super::count_limit_hit(&self.plugin, Limit::Kv);
            }
            return Err(e);
        }
        self.output_bytes = output;
        self.overlay.insert(key.clone(), value.clone());
        // Only the last write of a key is committed: rewriting one key again
        // and again keeps one value in memory, not one per write.
        let write = KvWrite {
            key,
            value,
            expires_ms,
        };
        match self.write_index.get(&write.key) {
            Some(&i) => self.writes[i] = write,
            None => {
                self.write_index
                    .insert(write.key.clone(), self.writes.len());
                self.writes.push(write);
            }
        }
        Ok(())
    }

    /// Refuses a write that would take the plugin's kv over its quota. Exact
    /// for one delivery; concurrent deliveries may overshoot it by their own
    /// writes, since each checks against the usage last committed.
    fn charge_quota(&mut self, key: &str, value: Option<&[u8]>) -> Result<(), kv::Error> {
        let base = match self.usage_base {
            Some(b) => b,
            None => {
                let b = self.kv.kv_usage(&self.plugin).map_err(Self::unavailable)?;
                *self.usage_base.insert(b)
            }
        };
        // Entries count their key (with the plugin prefix) and value bytes, as
        // the journal counts them.
        let entry = |len: usize| (self.plugin.len() + 1 + key.len() + len) as u64;
        let committed = match self.committed_size.get(key) {
            Some(&c) => c,
            None => {
                let c = self
                    .kv
                    .kv_get(&self.plugin, key)
                    .map_err(Self::unavailable)?
                    .map_or(0, |v| entry(v.len()));
                self.committed_size.insert(key.to_string(), c);
                c
            }
        };
        let current = match self.overlay.get(key) {
            Some(v) => v.as_ref().map_or(0, |v| entry(v.len())),
            None => committed,
        };
        let new = value.map_or(0, |v| entry(v.len()));
        let delta = self.usage_delta + new as i64 - current as i64;
        let total = base as i64 + delta;
        if new > current && total > self.kv_quota as i64 {
            return Err(kv::Error::Invalid(format!(
                "kv quota of {} reached (plugin `{}` would use {} bytes)",
                super::format_bytes(self.kv_quota),
                self.plugin,
                total
            )));
        }
        self.usage_delta = delta;
        Ok(())
    }
}

impl kv::Host for HostState {
    fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, kv::Error> {
        self.read(&key)
    }

    fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), kv::Error> {
        Self::check_key(&key)?;
        Self::check_value(&value)?;
        self.record_write(key, Some(value), None)
    }

    fn set_with_ttl(
        &mut self,
        key: String,
        value: Vec<u8>,
        ttl: types::Duration,
    ) -> Result<(), kv::Error> {
        Self::check_key(&key)?;
        Self::check_value(&value)?;
        if ttl == 0 {
            return Err(kv::Error::Invalid("kv ttl must be more than 0".into()));
        }
        let ttl_ms = ttl.div_ceil(1_000_000);
        let expires = crate::event::now_ms().saturating_add(ttl_ms);
        self.record_write(key, Some(value), Some(expires))
    }

    fn delete(&mut self, key: String) -> Result<(), kv::Error> {
        Self::check_key(&key)?;
        self.record_write(key, None, None)
    }

    fn increment(&mut self, key: String, delta: i64) -> Result<i64, kv::Error> {
        let current = match self.read(&key)? {
            None => 0,
            Some(bytes) => std::str::from_utf8(&bytes)
                .ok()
                .and_then(|t| t.trim().parse::<i64>().ok())
                .ok_or_else(|| {
                    kv::Error::Invalid(format!(
                        "kv increment: the value under {key:?} is not an integer"
                    ))
                })?,
        };
        let new = current.checked_add(delta).ok_or_else(|| {
            kv::Error::Invalid(format!(
                "kv increment: {current} + {delta} overflows under {key:?}"
            ))
        })?;
        self.record_write(key, Some(new.to_string().into_bytes()), None)?;
        Ok(new)
    }

    fn compare_and_swap(
        &mut self,
        key: String,
        expected: Option<Vec<u8>>,
        new: Option<Vec<u8>>,
    ) -> Result<bool, kv::Error> {
        if let Some(v) = &new {
            Self::check_value(v)?;
        }
        if self.read(&key)? != expected {
            return Ok(false);
        }
        self.record_write(key, new, None)?;
        Ok(true)
    }

    fn list_keys(
        &mut self,
        prefix: String,
        after: Option<String>,
        limit: u32,
    ) -> Result<Vec<String>, kv::Error> {
        let limit = limit.clamp(1, MAX_LIST_KEYS) as usize;
        // Enough committed keys to fill the page after this delivery's own
        // deletes, merged with its own sets.
        let deleted = self.overlay.values().filter(|v| v.is_none()).count();
        let committed = self
            .kv
            .kv_list(&self.plugin, &prefix, after.as_deref(), limit + deleted)
            .map_err(Self::unavailable)?;
        let mut keys: std::collections::BTreeSet<String> = committed.into_iter().collect();
        for (k, v) in &self.overlay {
            let in_range =
                k.starts_with(&prefix) && after.as_ref().is_none_or(|a| k.as_str() > a.as_str());
            match v {
                Some(_) if in_range => {
                    keys.insert(k.clone());
                }
                None => {
                    keys.remove(k);
                }
                _ => {}
            }
        }
        Ok(keys.into_iter().take(limit).collect())
    }
}

impl emit::Host for HostState {
    fn emit(&mut self, event: emit::NewEvent) -> Result<String, emit::Error> {
        let Some((parent_id, parent_hops)) = self.parent.clone().filter(|_| !self.read_only) else {
            return Err(emit::Error::Invalid(
                "emit is only possible while handling an event".into(),
            ));
        };
        let limit = |this: &mut HostState, text: String| {
            if this.emit_violation.is_none() {
                super::count_limit_hit(&this.plugin, Limit::Emit);
            }
            this.emit_violation.get_or_insert_with(|| text.clone());
            Err(emit::Error::Limit(text))
        };
        if parent_hops >= self.max_hops {
            let text = format!(
                "emit refused: event {parent_id} is already {parent_hops} hops from its webhook \
                 event (limit {}); is there a loop of plugins emitting each other's events?",
                self.max_hops
            );
            return limit(self, text);
        }
        if self.emitted.len() >= MAX_EMITS_PER_DELIVERY {
            let text = format!(
                "emit refused: more than {MAX_EMITS_PER_DELIVERY} events from one delivery"
            );
            return limit(self, text);
        }
        if event.type_.is_empty() || event.type_.len() > MAX_EMIT_TYPE {
            return Err(emit::Error::Invalid(format!(
                "an emitted event's type must be 1 to {MAX_EMIT_TYPE} bytes"
            )));
        }
        if event
            .subject
            .as_ref()
            .is_some_and(|s| s.len() > MAX_EMIT_SUBJECT)
        {
            return Err(emit::Error::Invalid(format!(
                "an emitted event's subject must be at most {MAX_EMIT_SUBJECT} bytes"
            )));
        }
        if event.data.len() > MAX_EMIT_DATA {
            return Err(emit::Error::Invalid(format!(
                "an emitted event's data of {} bytes is over the limit of {MAX_EMIT_DATA}",
                event.data.len()
            )));
        }
        let output = self.output_bytes
            + event.data.len()
            + event.type_.len()
            + event.subject.as_ref().map_or(0, String::len)
            + EMIT_OVERHEAD;
        if output > MAX_OUTPUT_PER_DELIVERY {
            return limit(self, format!("emit refused: {}", output_over_limit(output)));
        }
        let datacontenttype = event
            .datacontenttype
            .unwrap_or_else(|| "application/json".to_string());
        if crate::event::is_json_media_type(&datacontenttype)
            && let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&event.data)
        {
            return Err(emit::Error::Invalid(format!(
                "an emitted event's data is not valid JSON ({datacontenttype}): {e}"
            )));
        }
        self.output_bytes = output;
        let id = crate::event::new_event_id();
        let mut extensions = std::collections::BTreeMap::new();
        extensions.insert(CAUSATION_EXTENSION.to_string(), parent_id);
        extensions.insert(HOPS_EXTENSION.to_string(), (parent_hops + 1).to_string());
        // A derived event belongs to its cause's trace.
        extensions.extend(self.parent_trace.iter().cloned());
        self.emitted.push(Event {
            id: id.clone(),
            source: format!("plugin/{}", self.plugin),
            ty: event.type_,
            subject: event.subject,
            time: crate::event::rfc3339_ms(crate::event::now_ms()),
            datacontenttype,
            data: event.data,
            extensions,
        });
        Ok(id)
    }
}

/// What an emitted event takes beyond its data, type and subject: its id,
/// source, time, extensions and delivery records, roughly.
const EMIT_OVERHEAD: usize = 256;

fn output_over_limit(bytes: usize) -> String {
    format!(
        "one delivery may store at most {} of kv writes and emitted events together \
         (this would make {bytes} bytes)",
        super::format_bytes(MAX_OUTPUT_PER_DELIVERY as u64)
    )
}

/// Enforces a plugin's [`Limits`] on one store: linear memory (summed over all
/// of the instance's memories, so several small memories cannot add up past
/// the cap), the number of core instances, tables and memories, and table
/// growth. Remembers which cap was hit, so the failure can say so.
pub struct Limiter {
    limits: Limits,
    /// Bytes of linear memory the store has, all memories together.
    memory_used: u64,
    /// The growth last allowed (`current`, `desired`), undone if it then fails.
    pending_growth: (u64, u64),
    hit: Option<(Limit, String)>,
}

/// Most elements one table may grow to. The pooling allocator's own cap (its
/// `table_elements`, 20,000 by default) is lower, so in practice a `table.grow`
/// past that fails with -1 as the spec allows; this is the backstop that
/// traps with a clear message.
const MAX_TABLE_ELEMENTS: usize = 100_000;

impl Limiter {
    pub(super) fn new(limits: Limits) -> Limiter {
        Limiter {
            limits,
            memory_used: 0,
            pending_growth: (0, 0),
            hit: None,
        }
    }

    /// Which limit an instance that failed with `e` ran into, with the text
    /// to record, if it was one of the limits this limiter enforces.
    pub(super) fn explain(&self, e: &wasmtime::Error) -> Option<(Limit, String)> {
        if let Some(hit) = &self.hit {
            return Some(hit.clone());
        }
        // Instance, table and memory counts are checked by wasmtime itself
        // against `instances()`, `tables()` and `memories()` below, with the
        // error "resource limit exceeded: <what> count too high at <n>".
        let cause = e.root_cause().to_string();
        let what = cause
            .strip_prefix("resource limit exceeded: ")?
            .split(" count too high")
            .next()?;
        let (limit, text) = match what {
            "instance" => (
                Limit::Instances,
                format!(
                    "instance limit of {} reached (`max_instances`)",
                    self.limits.max_instances
                ),
            ),
            "table" => (
                Limit::Tables,
                format!(
                    "table count limit of {} reached (`max_tables`)",
                    self.limits.max_tables
                ),
            ),
            "memory" => (
                Limit::Memories,
                format!(
                    "memory count limit of {} reached (`max_instances`)",
                    self.limits.max_instances
                ),
            ),
            _ => return None,
        };
        Some((limit, text))
    }

    /// Whether a limit was hit (the instance must not be called again).
    pub(super) fn was_hit(&self) -> bool {
        self.hit.is_some()
    }

    /// Starts from `previous`'s memory accounting: the same instance, called
    /// again with fresh host state.
    pub(super) fn carry_usage_from(&mut self, previous: &Limiter) {
        self.memory_used = previous.memory_used;
    }

    /// The fuel the delivery started with, if it is metered.
    pub(super) fn fuel(&self) -> Option<u64> {
        self.limits.fuel
    }

    fn hit(&mut self, limit: Limit, text: String) -> wasmtime::Error {
        self.hit = Some((limit, text.clone()));
        wasmtime::Error::msg(text)
    }
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let (current, desired) = (current as u64, desired as u64);
        let total = self.memory_used.saturating_sub(current) + desired;
        if total > self.limits.memory {
            let text = format!(
                "memory limit {} reached",
                super::format_bytes(self.limits.memory)
            );
            return Err(self.hit(Limit::Memory, text));
        }
        self.memory_used = total;
        self.pending_growth = (current, desired);
        Ok(true)
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        // Allowed above, refused by the allocator (the spec's `memory.grow`
        // then returns -1): the memory kept its old size.
        let (current, desired) = self.pending_growth;
        self.memory_used = self.memory_used.saturating_sub(desired) + current;
        Ok(())
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > MAX_TABLE_ELEMENTS {
            let text = format!("table limit of {MAX_TABLE_ELEMENTS} elements reached");
            return Err(self.hit(Limit::TableElements, text));
        }
        Ok(true)
    }

    fn instances(&self) -> usize {
        self.limits.max_instances
    }

    fn tables(&self) -> usize {
        self.limits.max_tables
    }

    /// Under the pooling allocator a core instance has at most one memory,
    /// and their total size is capped by `memory`: the instance cap is enough.
    fn memories(&self) -> usize {
        self.limits.max_instances
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SDK's `MockHost` enforces these limits for plugin authors' tests
    /// (`guest-sdk/src/testing.rs`): it has to state the same ones.
    #[test]
    fn the_sdk_states_the_same_limits() {
        use switchyard_sdk::{emit, kv};
        assert_eq!(kv::MAX_KEY_LEN, MAX_KEY_LEN);
        assert_eq!(kv::MAX_VALUE_LEN, MAX_VALUE_LEN);
        assert_eq!(kv::MAX_WRITES_PER_DELIVERY, MAX_WRITES_PER_DELIVERY);
        assert_eq!(emit::MAX_EMITS_PER_DELIVERY, MAX_EMITS_PER_DELIVERY);
        assert_eq!(emit::MAX_DATA_LEN, MAX_EMIT_DATA);
        assert_eq!(emit::MAX_TYPE_LEN, MAX_EMIT_TYPE);
        assert_eq!(emit::MAX_SUBJECT_LEN, MAX_EMIT_SUBJECT);
        assert_eq!(emit::EMIT_OVERHEAD, EMIT_OVERHEAD);
        assert_eq!(
            switchyard_sdk::MAX_OUTPUT_PER_DELIVERY,
            MAX_OUTPUT_PER_DELIVERY
        );
        for media in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "text/json",
            "application/cloudevents+json",
            "text/plain",
            "application/octet-stream",
            "",
        ] {
            assert_eq!(
                switchyard_sdk::testing::is_json_media_type(media),
                crate::event::is_json_media_type(media),
                "{media:?}"
            );
        }
        assert_eq!(
            output_over_limit(7),
            "one delivery may store at most 4 MiB of kv writes and emitted events together \
             (this would make 7 bytes)"
        );
    }
}
