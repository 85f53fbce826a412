//! The Wasm runtime: one wasmtime engine, plugins compiled once (and cached on
//! disk), and a fresh component instance for every delivery (or, for a plugin
//! with `isolation = "reuse"`, instances kept between its deliveries).

mod cache;
pub mod cargo;
mod host;
pub mod http;
mod stdio;
mod wasi;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use wasmtime::component::{HasSelf, Linker};
use wasmtime::{
    Config, Engine, EngineWeak, InstanceAllocationStrategy, PoolingAllocationConfig, Store,
};

use crate::event::Event;
use crate::journal::{KvChanges, KvStore};
pub use host::{
    CAUSATION_EXTENSION, DEFAULT_MAX_HOPS, HOPS_EXTENSION, HostState, MAX_EMITS_PER_DELIVERY,
};
pub use http::HttpPolicy;

/// The one place that generates host bindings from `wit/`.
pub mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "consumer",
        exports: { default: async },
        // `wasi:http` (and the `wasi:io`/`wasi:clocks` it uses) is
        // implemented by wasmtime-wasi(-http): use their bindings.
        with: {
            "wasi:http": wasmtime_wasi_http::p2::bindings::http,
            "wasi:io": wasmtime_wasi::p2::bindings::io,
            "wasi:clocks": wasmtime_wasi::p2::bindings::clocks,
        },
    });
}

use bindings::ConsumerPre;
use bindings::switchyard::plugin::types::{
    Event as WitEvent, Failure as WitFailure, Response as WitResponse,
};

/// How often the engine's epoch advances: the resolution of deadlines, and how
/// often a running plugin yields to the async runtime.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Errors of loading and running plugins.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot set up the wasm engine: {0}")]
    Engine(String),
    #[error("plugin `{plugin}`: cannot read {path}: {source}")]
    Read {
        plugin: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("plugin `{plugin}`: {path} is not a valid component: {reason}")]
    Compile {
        plugin: String,
        path: String,
        reason: String,
    },
    #[error("plugin `{plugin}` cannot be linked: {reason}")]
    Link { plugin: String, reason: String },
    /// The component imports an interface the host does not give plugins
    /// (e.g. `wasi:sockets/tcp`, `wasi:filesystem/preopens`).
    #[error("plugin `{plugin}` imports `{import}`, which the host does not grant to plugins")]
    Ungranted { plugin: String, import: String },
    #[error("plugin `{plugin}`: {source}")]
    Build {
        plugin: String,
        #[source]
        source: cargo::BuildError,
    },
}

/// Per-plugin limits and isolation, from `rules.toml`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock deadline per delivery.
    pub timeout: Duration,
    /// Linear memory cap, bytes (all the memories of a delivery together).
    pub memory: u64,
    /// The most bytes (keys and values) the plugin's kv may hold.
    pub kv_quota: u64,
    /// Fuel per delivery (about one unit per wasm instruction), or none for
    /// no metering. Plugins with fuel run on an engine of their own.
    pub fuel: Option<u64>,
    /// Most core wasm instances (and memories) a delivery may create.
    pub max_instances: usize,
    /// Most wasm tables a delivery may create.
    pub max_tables: usize,
    /// Whether each delivery gets a fresh instance.
    pub isolation: Isolation,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout: Duration::from_secs(1),
            memory: 64 << 20,
            kv_quota: 64 << 20,
            fuel: None,
            max_instances: DEFAULT_MAX_INSTANCES,
            max_tables: DEFAULT_MAX_TABLES,
            isolation: Isolation::default(),
        }
    }
}

/// Default of `max_instances`: a Rust plugin needs a few (its module plus the
/// adapter shims of the component); the cap keeps one plugin from taking many
/// of the pooling allocator's slots, which every plugin shares.
pub const DEFAULT_MAX_INSTANCES: usize = 16;
/// Default of `max_tables` (a Rust plugin has one or two).
pub const DEFAULT_MAX_TABLES: usize = 16;
/// The largest `max_instances` / `max_tables` a plugin may ask for.
pub const MAX_PLUGIN_INSTANCES: usize = 1000;

/// A limit a delivery can run into: the `limit` label of
/// `switchyard_plugin_limit_hits_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Deadline,
    Fuel,
    Memory,
    Stack,
    Instances,
    Tables,
    Memories,
    TableElements,
    /// Log output over the per-delivery cap (dropped; the delivery goes on).
    Log,
    /// Stdout/stderr output over what is kept (the rest is dropped).
    Stdio,
    /// A kv write over the plugin's `kv_quota`, or the per-delivery caps.
    Kv,
    /// An emit over the hop limit or the per-delivery count.
    Emit,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Deadline => "deadline",
            Limit::Fuel => "fuel",
            Limit::Memory => "memory",
            Limit::Stack => "stack",
            Limit::Instances => "instances",
            Limit::Tables => "tables",
            Limit::Memories => "memories",
            Limit::TableElements => "table_elements",
            Limit::Log => "log",
            Limit::Stdio => "stdio",
            Limit::Kv => "kv",
            Limit::Emit => "emit",
        }
    }
}

/// Counts one hit of `limit` by `plugin`.
pub(crate) fn count_limit_hit(plugin: &str, limit: Limit) {
    metrics::counter!(
        "switchyard_plugin_limit_hits_total",
        "plugin" => plugin.to_string(),
        "limit" => limit.as_str()
    )
    .increment(1);
}
/// How a plugin's deliveries are kept apart (`isolation` in `rules.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Isolation {
    /// Each delivery runs in a fresh instance: nothing one delivery leaves in
    /// the plugin's memory (statics, heap) is seen by another. The default.
    #[default]
    InstancePerEvent,
    /// Deliveries run in instances kept from earlier deliveries of the same
    /// plugin: several times cheaper per event, but the guest's memory
    /// (statics, heap, leaks) carries over from one event to the next. Host
    /// state (kv reads and writes, log budget, stdio capture) is still per
    /// delivery, the deadline still applies to each call, and an instance
    /// that trapped or hit a limit is thrown away.
    Reuse,
}

/// Idle instances kept per plugin with `isolation = "reuse"`: each holds a
/// slot of the pooling allocator (memory, tables) while idle, so this bounds
/// what idle reusable instances pin (deliveries beyond it instantiate and
/// drop instances as the fresh path does).
const REUSE_IDLE_PER_PLUGIN: usize = 4;

/// The largest `memory` a plugin may ask for; also the pooling allocator's
/// per-memory reservation.
pub const MAX_PLUGIN_MEMORY: u64 = 1 << 30;

/// A compiled plugin, ready to be instantiated for each delivery.
pub struct Plugin {
    pub name: String,
    /// sha256 of the component's bytes (hex): the version that ran.
    pub hash: String,
    pub limits: Limits,
    /// The plugin's `config` table as JSON.
    pub config: Arc<serde_json::Map<String, serde_json::Value>>,
    /// Whether it exports `query` (world `queryable`).
    pub answers_queries: bool,
    /// `switchyard_plugin_instantiate_seconds{plugin}`, resolved once.
    instantiate_seconds: metrics::Histogram,
    /// Where it may send HTTP requests (by default nowhere).
    pub http: Arc<HttpPolicy>,
    pre: ConsumerPre<HostState>,
    /// With `isolation = "reuse"`: instances between deliveries.
    idle: std::sync::Mutex<Vec<ReusedInstance>>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("hash", &self.hash)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// How one invocation of `handle` ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Invocation {
    /// `handle` returned Ok.
    Ok,
    /// `handle` asked to be retried, optionally after a delay.
    Retry(Option<Duration>),
    /// `handle` rejected the event.
    Reject(String),
    /// The instance trapped, hit a limit or its deadline, or could not be
    /// instantiated: the text says which.
    Trap(String),
}

/// The result of delivering one event to one plugin.
#[derive(Debug)]
pub struct DeliveryRun {
    pub invocation: Invocation,
    /// The kv reads and writes it made (to commit only if it succeeded).
    pub kv: KvChanges,
    /// The events it emitted (to store only if it succeeded).
    pub emitted: Vec<Event>,
    pub elapsed: Duration,
    /// Its last outbound HTTP request failure (refused, timed out, ...): a
    /// `Retry` has no text of its own, this says what probably caused it.
    pub http_failure: Option<String>,
}

/// What a plugin's `query` answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryResponse {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
}

/// Why a query could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("plugin `{0}` does not answer queries (it does not export `query`)")]
    NoQuery(String),
    #[error("plugin `{plugin}` failed to answer: {reason}")]
    Failed { plugin: String, reason: String },
}
/// An engine and the plugin linker made for it.
type EngineAndLinker = (Engine, Linker<HostState>);

/// The engine and what every plugin shares.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    /// The engine (and its linker) for plugins that set `fuel`, made when
    /// the first of them loads. Fuel metering is compiled into the code and
    /// slowed a CPU-bound wasm loop by 15–27 % in an ad-hoc run (not yet a
    /// bench in `docs/benchmarks.md`) on this project's 2-core
    /// machine (a tiny call: from noise to +20 %), so it lives on an engine
    /// of its own and plugins without `fuel` do not pay for it. The second
    /// engine's pooling allocator reserves address space of its own, only
    /// once some plugin uses fuel.
    fuel: Mutex<Option<Arc<EngineAndLinker>>>,
    /// The fuel engine, for the epoch ticker.
    fuel_epoch: Arc<OnceLock<EngineWeak>>,
    cache_dir: PathBuf,
    kv: Arc<dyn KvStore>,
    ticker_stop: Arc<AtomicBool>,
    /// `[server] max_hops`, for emitted events.
    max_hops: AtomicU32,
}

/// The engine configuration every plugin runs under: component model, epoch
/// interruption for deadlines, the pooling allocator.
pub fn engine_config() -> Config {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    // Smaller compiled artifacts, which every loaded plugin maps: no ELF
    // symbol table (for `objdump` only) and no `.eh_frame` (for native
    // debuggers and profilers only; wasmtime's own traps and backtraces do
    // not use it, and registering it with the system unwinder costs time at
    // each load). See "Idle memory per plugin" in docs/benchmarks.md.
    config.debug_symbols(false);
    config.native_unwind_info(false);
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(1000);
    pool.total_core_instances(4000);
    pool.total_memories(2000);
    pool.total_tables(4000);
    pool.max_memory_size(MAX_PLUGIN_MEMORY as usize);
    // Reset a freed slot's first pages with memset (only the resident ones,
    // where the kernel has PAGEMAP_SCAN) instead of madvise: the next instance
    // in the slot takes no page faults for them. Memory is still zeroed
    // between deliveries. Halves the cost of a fresh instance (field notes:
    // ≈36 → ≈17 µs).
    pool.linear_memory_keep_resident(1 << 20);
    pool.table_keep_resident(64 << 10);
    pool.pagemap_scan(wasmtime::Enabled::Auto);
    // `decommit_batch_size` stays 1 (wasmtime's default): with the slot
    // reset by `pagemap_scan` there is nothing to decommit after a typical
    // delivery, but a batch size above 1 still parked every freed slot in a
    // shared queue (behind a lock) until 16 had gathered, then made a
    // `process_madvise` call for empty ranges (measured in
    // `benches/instances.rs`).
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    config
}

impl Runtime {
    /// Sets up the engine; compiled artifacts are cached in `cache_dir`.
    pub fn new(cache_dir: &Path, kv: impl Into<Arc<dyn KvStore>>) -> Result<Runtime, RuntimeError> {
        Self::with_config(cache_dir, kv, &engine_config())
    }

    /// Like [`Runtime::new`], with another engine configuration: for the
    /// benchmarks that compare pooling settings side by side in one process.
    #[doc(hidden)]
    pub fn with_config(
        cache_dir: &Path,
        kv: impl Into<Arc<dyn KvStore>>,
        config: &Config,
    ) -> Result<Runtime, RuntimeError> {
        cache::sweep(cache_dir);
        let engine_err = |e: wasmtime::Error| RuntimeError::Engine(format!("{e:#}"));
        let engine = Engine::new(config).map_err(engine_err)?;

        let linker = plugin_linker(&engine).map_err(engine_err)?;

        let ticker_stop = Arc::new(AtomicBool::new(false));
        let fuel_epoch = Arc::new(OnceLock::<EngineWeak>::new());
        let (weak, stop, fuel_weak) = (engine.weak(), ticker_stop.clone(), fuel_epoch.clone());
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    if let Some(engine) = fuel_weak.get().and_then(EngineWeak::upgrade) {
                        engine.increment_epoch();
                    }
                    match weak.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                }
            })
            .map_err(|e| RuntimeError::Engine(e.to_string()))?;

        Ok(Runtime {
            engine,
            linker,
            fuel: Mutex::new(None),
            fuel_epoch,
            cache_dir: cache_dir.to_path_buf(),
            kv: kv.into(),
            ticker_stop,
            max_hops: AtomicU32::new(DEFAULT_MAX_HOPS),
        })
    }

    /// The engine every plugin runs on (for benchmarks that use wasmtime
    /// directly on the same engine).
    #[doc(hidden)]
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Loads a component from `wasm`: compiled, or taken from the on-disk cache.
    pub fn load(
        &self,
        name: &str,
        wasm: &Path,
        limits: Limits,
        config: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Plugin, RuntimeError> {
        let bytes = std::fs::read(wasm).map_err(|source| RuntimeError::Read {
            plugin: name.to_string(),
            path: wasm.display().to_string(),
            source,
        })?;
        let fuel_engine = match limits.fuel {
            Some(_) => Some(self.fuel_engine()?),
            None => None,
        };
        let (engine, linker) = match &fuel_engine {
            Some(pair) => (&pair.0, &pair.1),
            None => (&self.engine, &self.linker),
        };
        let (component, hash) =
            cache::load_or_compile(engine, &self.cache_dir, &bytes).map_err(|e| {
                RuntimeError::Compile {
                    plugin: name.to_string(),
                    path: wasm.display().to_string(),
                    reason: format!("{e:#}"),
                }
            })?;
        let instance_pre =
            linker
                .instantiate_pre(&component)
                .map_err(|e| match wasi::ungranted_import(&e) {
                    Some(import) => RuntimeError::Ungranted {
                        plugin: name.to_string(),
                        import,
                    },
                    None => RuntimeError::Link {
                        plugin: name.to_string(),
                        reason: format!("{e:#}"),
                    },
                })?;
        let answers_queries = component.get_export_index(None, "query").is_some();
        cache::release_idle_pages(&component);
        let pre = ConsumerPre::new(instance_pre).map_err(|e| RuntimeError::Link {
            plugin: name.to_string(),
            reason: format!("it does not export the `consumer` world: {e:#}"),
        })?;
        Ok(Plugin {
            name: name.to_string(),
            hash,
            limits,
            config: Arc::new(config),
            answers_queries,
            instantiate_seconds: metrics::histogram!(
                "switchyard_plugin_instantiate_seconds",
                "plugin" => name.to_string()
            ),
            http: Arc::default(),
            pre,
            idle: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// How many emits may separate a derived event from its webhook event.
    pub fn set_max_hops(&self, max_hops: u32) {
        self.max_hops.store(max_hops, Ordering::Relaxed);
    }

    /// The engine for plugins with `fuel`, made on first use.
    fn fuel_engine(&self) -> Result<Arc<EngineAndLinker>, RuntimeError> {
        let mut slot = self.fuel.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pair) = &*slot {
            return Ok(pair.clone());
        }
        let engine_err = |e: wasmtime::Error| RuntimeError::Engine(format!("{e:#}"));
        let mut config = engine_config();
        config.consume_fuel(true);
        let engine = Engine::new(&config).map_err(engine_err)?;
        let linker = plugin_linker(&engine).map_err(engine_err)?;
        // Set once: this is the only place that makes the fuel engine, and
        // it holds the lock.
        let _ = self.fuel_epoch.set(engine.weak());
        let pair = Arc::new((engine, linker));
        *slot = Some(pair.clone());
        Ok(pair)
    }

    /// Runs `handle(event)` in an instance of `plugin` (a fresh one, unless
    /// the plugin's isolation is `reuse`).
    pub async fn deliver(&self, plugin: &Plugin, event: &Event) -> DeliveryRun {
        self.deliver_with(plugin, event, &[]).await
    }

    /// Delivers `event` with extension attributes added for this delivery only
    /// (`deliveryattempt`, `replayed`): the stored event stays as accepted.
    pub async fn deliver_with(
        &self,
        plugin: &Plugin,
        event: &Event,
        extra: &[(&str, String)],
    ) -> DeliveryRun {
        match plugin.limits.isolation {
            Isolation::InstancePerEvent => self.deliver_fresh(plugin, event, extra).await,
            Isolation::Reuse => self.deliver_reused(plugin, event, extra).await,
        }
    }

    /// A store for one instance of `plugin`, with its memory limiter and fuel
    /// (each call's deadline is set by `set_deadline`).
    fn store(&self, plugin: &Plugin, state: HostState) -> Store<HostState> {
        let mut store = Store::new(plugin.pre.engine(), state);
        store.limiter(|s| &mut s.limits);
        set_fuel(&mut store, plugin);
        store
    }

    /// Host state for a delivery of `event`.
    fn delivery_state(&self, plugin: &Plugin, event: &Event) -> HostState {
        let mut state = HostState::new(plugin, &event.id, self.kv.clone());
        state.set_parent(event, self.max_hops.load(Ordering::Relaxed));
        state
    }

    async fn deliver_fresh(
        &self,
        plugin: &Plugin,
        event: &Event,
        extra: &[(&str, String)],
    ) -> DeliveryRun {
        let started = Instant::now();
        let mut store = self.store(plugin, self.delivery_state(plugin, event));
        set_deadline(&mut store, started, plugin.limits.timeout);
        let result = async {
            let instance = plugin.pre.instantiate_async(&mut store).await?;
            plugin
                .instantiate_seconds
                .record(started.elapsed().as_secs_f64());
            instance
                .call_handle(&mut store, &to_wit(event, extra))
                .await
        }
        .await;
        let invocation = invocation(result, store.data());
        finish(invocation, store.into_data(), started)
    }

    async fn deliver_reused(
        &self,
        plugin: &Plugin,
        event: &Event,
        extra: &[(&str, String)],
    ) -> DeliveryRun {
        let started = Instant::now();
        let idle = plugin
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop();
        let mut reused = match idle {
            Some(r) => r,
            None => {
                let mut store = self.store(plugin, self.delivery_state(plugin, event));
                set_deadline(&mut store, started, plugin.limits.timeout);
                match plugin.pre.instantiate_async(&mut store).await {
                    Ok(instance) => {
                        plugin
                            .instantiate_seconds
                            .record(started.elapsed().as_secs_f64());
                        ReusedInstance { store, instance }
                    }
                    Err(e) => {
                        let invocation = Invocation::Trap(describe_trap(&e, store.data()));
                        return finish(invocation, store.into_data(), started);
                    }
                }
            }
        };
        let state = self.delivery_state(plugin, event);
        let (run, healthy) = reused.call(plugin, state, event, extra, started).await;
        if healthy {
            let mut idle = plugin
                .idle
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if idle.len() < REUSE_IDLE_PER_PLUGIN {
                idle.push(reused);
            }
        }
        run
    }

    /// Calls `query(path, params)` in a fresh instance of `plugin` whose kv
    /// is read-only, under the plugin's limits.
    pub async fn query(
        &self,
        plugin: &Plugin,
        path: &str,
        params: &[(String, String)],
    ) -> Result<QueryResponse, QueryError> {
        if !plugin.answers_queries {
            return Err(QueryError::NoQuery(plugin.name.clone()));
        }
        let started = Instant::now();
        let mut state = HostState::new(plugin, "query", self.kv.clone());
        state.set_read_only();
        let mut store = self.store(plugin, state);
        set_deadline(&mut store, started, plugin.limits.timeout);
        let result = async {
            let instance = plugin
                .pre
                .instance_pre()
                .instantiate_async(&mut store)
                .await?;
            let query = instance.get_typed_func::<(&str, &[(String, String)]), (WitResponse,)>(
                &mut store, "query",
            )?;
            let (response,) = query.call_async(&mut store, (path, params)).await?;
            Ok::<_, wasmtime::Error>(response)
        }
        .await;
        match result {
            Ok(r) => Ok(QueryResponse {
                status: r.status,
                content_type: r.content_type,
                body: r.body,
            }),
            Err(e) => Err(QueryError::Failed {
                plugin: plugin.name.clone(),
                reason: describe_trap(&e, store.data()),
            }),
        }
    }
}

/// Makes the store's next call fail once `timeout` has passed since
/// `started`, yielding to the async runtime at every epoch tick until then.
fn set_deadline(store: &mut Store<HostState>, started: Instant, timeout: Duration) {
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |_| {
        if started.elapsed() >= timeout {
            Err(wasmtime::Error::msg(DeadlineExceeded(timeout)))
        } else {
            Ok(wasmtime::UpdateDeadline::Yield(1))
        }
    });
}

/// What `handle` returned, or why it did not. A refused emit (hop or count
/// limit) fails the delivery even if the plugin went on: a loop ends in the
/// dead letters.
fn invocation(
    result: Result<Result<(), WitFailure>, wasmtime::Error>,
    state: &HostState,
) -> Invocation {
    match result {
        Ok(Ok(())) => match state.emit_violation() {
            Some(v) => Invocation::Reject(v.to_string()),
            None => Invocation::Ok,
        },
        Ok(Err(WitFailure::Retry(delay))) => Invocation::Retry(delay.map(Duration::from_nanos)),
        Ok(Err(WitFailure::Reject(reason))) => Invocation::Reject(reason),
        Err(e) => Invocation::Trap(describe_trap(&e, state)),
    }
}

/// The delivery's result from its host state: kv changes, and the events it
/// emitted if it succeeded.
fn finish(invocation: Invocation, mut state: HostState, started: Instant) -> DeliveryRun {
    let http_failure = state.http_failure();
    let emitted = match invocation {
        Invocation::Ok => state.take_emitted(),
        _ => Vec::new(),
    };
    DeliveryRun {
        invocation,
        kv: state.into_kv_changes(),
        emitted,
        elapsed: started.elapsed(),
        http_failure,
    }
}

/// An instance of a plugin with `isolation = "reuse"`, kept between its
/// deliveries.
///
/// Each call gets a fresh [`HostState`] (kv reads and writes, emits, log
/// budget, limiter, event id) — only the WASI context and its resource table
/// carry over, since the guest may hold handles into them (e.g. its stdout
/// stream). The deadline is set again for each call. An instance whose call
/// trapped (a trap, the deadline, a limit) is dropped, never called again:
/// wasmtime does not allow re-entering a store that trapped, and its memory
/// may be half-updated.
struct ReusedInstance {
    store: Store<HostState>,
    instance: bindings::Consumer,
}

impl ReusedInstance {
    /// Calls `handle(event)` with `state`; returns the delivery's result and
    /// whether the instance may be called again.
    async fn call(
        &mut self,
        plugin: &Plugin,
        mut state: HostState,
        event: &Event,
        extra: &[(&str, String)],
        started: Instant,
    ) -> (DeliveryRun, bool) {
        state.keep_wasi_of(self.store.data_mut());
        *self.store.data_mut() = state;
        set_deadline(&mut self.store, started, plugin.limits.timeout);
        set_fuel(&mut self.store, plugin);
        let result = self
            .instance
            .call_handle(&mut self.store, &to_wit(event, extra))
            .await;
        let healthy = result.is_ok() && !self.store.data().limits.was_hit();
        let invocation = invocation(result, self.store.data());
        // Take this call's state out; the one left keeps the WASI context.
        let mut next = HostState::new(plugin, "", self.store.data().kv().clone());
        next.keep_wasi_of(self.store.data_mut());
        let done = std::mem::replace(self.store.data_mut(), next);
        (finish(invocation, done, started), healthy)
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

impl Plugin {
    /// The plugin with outbound HTTP allowed as `policy` says.
    pub fn with_http(mut self, policy: HttpPolicy) -> Plugin {
        self.http = Arc::new(policy);
        self
    }
}

/// Adds the `switchyard:plugin` imports. Interface by interface rather than
/// `Consumer::add_to_linker`, which would also add `wasi:http` and want
/// `HostState` itself to implement its host traits; wasmtime-wasi-http
/// implements them on its own view type, added by
/// `add_only_http_to_linker_async`. A new interface in `world consumer`
/// needs its line here.
fn add_plugin_interfaces(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    use bindings::switchyard::plugin::{config, emit, kv, log, types};
    types::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    log::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    config::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    kv::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    emit::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    Ok(())
}

/// The error raised when a delivery runs past its deadline.
#[derive(Debug)]
struct DeadlineExceeded(Duration);

impl std::fmt::Display for DeadlineExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "deadline of {} exceeded",
            humantime::format_duration(self.0)
        )
    }
}

impl std::error::Error for DeadlineExceeded {}

/// The linker every plugin is instantiated with, for `engine`: the granted
/// WASI interfaces and the `consumer` world's imports.
fn plugin_linker(engine: &Engine) -> wasmtime::Result<Linker<HostState>> {
    let mut linker = Linker::new(engine);
    wasi::add_granted(&mut linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
    add_plugin_interfaces(&mut linker)?;
    Ok(linker)
}

/// Gives a fresh store its plugin's fuel (plugins without `fuel` run on an
/// engine without metering and need none).
fn set_fuel(store: &mut Store<HostState>, plugin: &Plugin) {
    if let Some(fuel) = plugin.limits.fuel
        && let Err(e) = store.set_fuel(fuel)
    {
        // Cannot happen: `load` puts plugins with fuel on the fuel engine.
        tracing::error!(plugin = %plugin.name, error = %e, "cannot set fuel");
    }
}

/// Says why an instance failed, in words a plugin author can act on, and
/// counts it when it ran into one of its limits.
fn describe_trap(e: &wasmtime::Error, state: &HostState) -> String {
    let (text, limit) = explain_trap(e, state);
    if let Some(limit) = limit {
        count_limit_hit(state.plugin_name(), limit);
    }
    text
}

fn explain_trap(e: &wasmtime::Error, state: &HostState) -> (String, Option<Limit>) {
    if let Some(d) = e.downcast_ref::<DeadlineExceeded>() {
        return (d.to_string(), Some(Limit::Deadline));
    }
    if let Some((limit, text)) = state.limits.explain(e) {
        return (text, Some(limit));
    }
    let mut text = match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::StackOverflow) => {
            return ("stack overflow".into(), Some(Limit::Stack));
        }
        Some(wasmtime::Trap::OutOfFuel) => {
            let fuel = state.limits.fuel().unwrap_or_default();
            return (format!("fuel limit of {fuel} exhausted"), Some(Limit::Fuel));
        }
        Some(wasmtime::Trap::UnreachableCodeReached) => "trap: unreachable executed".to_string(),
        Some(trap) => format!("trap: {trap}"),
        None => format!("{:#}", e.root_cause()),
    };
    // A Rust guest prints its panic message to stderr before it aborts.
    if let Some(panic) = state.stderr_tail() {
        text = format!("{text} ({panic})");
    }
    (text, None)
}

fn to_wit(e: &Event, extra: &[(&str, String)]) -> WitEvent {
    WitEvent {
        id: e.id.clone(),
        source: e.source.clone(),
        type_: e.ty.clone(),
        subject: e.subject.clone(),
        time: e.time.clone(),
        datacontenttype: e.datacontenttype.clone(),
        data: e.data.clone(),
        extensions: e
            .extensions
            .iter()
            .filter(|(k, _)| !extra.iter().any(|(x, _)| x == k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .chain(extra.iter().map(|(k, v)| (k.to_string(), v.clone())))
            .collect(),
    }
}

/// Bytes in the largest binary unit that divides them: "32 MiB", "1536 KiB".
pub fn format_bytes(bytes: u64) -> String {
    for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if bytes >= size && bytes.is_multiple_of(size) {
            return format!("{} {unit}", bytes / size);
        }
    }
    format!("{bytes} bytes")
}
