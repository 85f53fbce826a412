//! What a plugin instance can reach: `log`, `config`, `kv`, and a WASI context
//! with nothing granted (no files, no environment, no sockets).

use std::collections::HashMap;
use std::sync::Arc;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::Plugin;
use super::bindings::switchyard::plugin::{config, kv, log, types};
use crate::journal::{Journal, KvChanges};

/// Longest key a plugin may use, bytes.
pub const MAX_KEY_LEN: usize = 512;
/// Largest value a plugin may store, bytes.
pub const MAX_VALUE_LEN: usize = 1 << 20;
/// Most kv writes one delivery may make.
pub const MAX_WRITES_PER_DELIVERY: usize = 10_000;
/// Most log bytes one delivery may emit; the rest is dropped (and counted).
pub const MAX_LOG_BYTES: usize = 64 << 10;
/// Longest single log line kept, bytes.
const MAX_LOG_LINE: usize = 4 << 10;
/// How much of stdout/stderr is kept (to explain a panic).
const STDIO_CAPTURE: usize = 8 << 10;

/// The per-delivery state of a store.
pub struct HostState {
    plugin: String,
    event_id: String,
    config: Arc<serde_json::Map<String, serde_json::Value>>,
    journal: Journal,
    /// The value of each key first read from the store (for conflict checks).
    reads: HashMap<String, Option<Vec<u8>>>,
    /// This delivery's own writes, newest state per key.
    overlay: HashMap<String, Option<Vec<u8>>>,
    writes: Vec<(String, Option<Vec<u8>>)>,
    log_bytes: usize,
    log_dropped: usize,
    stdio: MemoryOutputPipe,
    wasi: WasiCtx,
    table: ResourceTable,
    pub(super) limits: Limiter,
}

impl HostState {
    pub(super) fn new(plugin: &Plugin, event_id: &str, journal: Journal) -> HostState {
        let stdio = MemoryOutputPipe::new(STDIO_CAPTURE);
        let wasi = WasiCtxBuilder::new()
            .stdout(stdio.clone())
            .stderr(stdio.clone())
            .build();
        HostState {
            plugin: plugin.name.clone(),
            event_id: event_id.to_string(),
            config: plugin.config.clone(),
            journal,
            reads: HashMap::new(),
            overlay: HashMap::new(),
            writes: Vec::new(),
            log_bytes: 0,
            log_dropped: 0,
            stdio,
            wasi,
            table: ResourceTable::new(),
            limits: Limiter::new(plugin.limits.memory),
        }
    }

    pub(super) fn into_kv_changes(self) -> KvChanges {
        if self.log_dropped > 0 {
            tracing::warn!(
                plugin = %self.plugin,
                event_id = %self.event_id,
                dropped = self.log_dropped,
                "plugin log output over {MAX_LOG_BYTES} bytes was dropped"
            );
        }
        KvChanges {
            reads: self.reads.into_iter().collect(),
            writes: self.writes,
        }
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
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
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

    fn record_write(&mut self, key: String, value: Option<Vec<u8>>) -> Result<(), kv::Error> {
        if self.writes.len() >= MAX_WRITES_PER_DELIVERY {
            return Err(kv::Error::Invalid(format!(
                "more than {MAX_WRITES_PER_DELIVERY} kv writes in one delivery"
            )));
        }
        self.overlay.insert(key.clone(), value.clone());
        self.writes.push((key, value));
        Ok(())
    }
}

impl kv::Host for HostState {
    fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, kv::Error> {
        Self::check_key(&key)?;
        if let Some(v) = self.overlay.get(&key) {
            return Ok(v.clone());
        }
        if let Some(v) = self.reads.get(&key) {
            return Ok(v.clone());
        }
        let value = self
            .journal
            .kv_get(&self.plugin, &key)
            .map_err(|e| kv::Error::Unavailable(e.to_string()))?;
        self.reads.insert(key, value.clone());
        Ok(value)
    }

    fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), kv::Error> {
        Self::check_key(&key)?;
        if value.len() > MAX_VALUE_LEN {
            return Err(kv::Error::Invalid(format!(
                "kv value of {} bytes is over the limit of {MAX_VALUE_LEN}",
                value.len()
            )));
        }
        self.record_write(key, Some(value))
    }

    fn delete(&mut self, key: String) -> Result<(), kv::Error> {
        Self::check_key(&key)?;
        self.record_write(key, None)
    }
}

/// Caps memory and tables, and remembers which cap was hit so the error can
/// say so.
pub struct Limiter {
    memory: u64,
    hit: Option<String>,
}

impl Limiter {
    fn new(memory: u64) -> Limiter {
        Limiter { memory, hit: None }
    }

    pub(super) fn hit(&self) -> Option<String> {
        self.hit.clone()
    }
}

/// Most table elements per table.
const MAX_TABLE_ELEMENTS: usize = 100_000;

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired as u64 > self.memory {
            let text = format!("memory limit {} reached", super::format_bytes(self.memory));
            self.hit = Some(text.clone());
            return Err(wasmtime::Error::msg(text));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > MAX_TABLE_ELEMENTS {
            let text = format!("table limit of {MAX_TABLE_ELEMENTS} elements reached");
            self.hit = Some(text.clone());
            return Err(wasmtime::Error::msg(text));
        }
        Ok(true)
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
