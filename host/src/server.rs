//! Puts the stages together: journal, runtime and plugins, dispatcher, HTTP.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, EngineConfig, WasmSource};
use crate::dispatch::nats::NatsDispatcher;
use crate::dispatch::{Backend, Dispatcher, Work};
use crate::event::now_ms;
use crate::ingress::verify::{SecretError, Verifier};
use crate::ingress::{self, AppState};
use crate::journal::nats::{NatsJournal, StreamLimits};
use crate::journal::{Journal, JournalError, KvStore};
use crate::runtime::{Plugin, Runtime, RuntimeError, cargo};
use crate::watch::ConfigWatcher;

/// The configuration in force and the plugins loaded for it.
pub struct Live {
    pub config: Config,
    pub plugins: HashMap<String, Arc<Plugin>>,
    /// Per source that verifies requests, its verifier with secrets resolved.
    pub verifiers: HashMap<String, Arc<Verifier>>,
    /// Per source with a rate or concurrency limit, its limiter state (reset
    /// by a reload).
    pub limits: HashMap<String, Arc<SourceLimits>>,
    /// Per source, its `switchyard_events_accepted_total` counter (looked up
    /// once here rather than on every request).
    pub accepted: HashMap<String, metrics::Counter>,
    pub match_seconds: metrics::Histogram,
}

/// The limiter state of one source.
pub struct SourceLimits {
    pub rate: Option<governor::DefaultDirectRateLimiter>,
    pub concurrency: Option<Arc<tokio::sync::Semaphore>>,
}

fn source_limits(config: &Config) -> HashMap<String, Arc<SourceLimits>> {
    use std::num::NonZeroU32;
    let mut out = HashMap::new();
    for (name, s) in &config.sources {
        let rate = s.rate_limit.and_then(|(per_second, burst)| {
            let quota = governor::Quota::per_second(NonZeroU32::new(per_second)?)
                .allow_burst(NonZeroU32::new(burst)?);
            Some(governor::RateLimiter::direct(quota))
        });
        let concurrency = s
            .max_concurrency
            .map(|n| Arc::new(tokio::sync::Semaphore::new(n)));
        if rate.is_some() || concurrency.is_some() {
            out.insert(name.clone(), Arc::new(SourceLimits { rate, concurrency }));
        }
    }
    out
}

impl Live {
    /// Resolves secrets (from the environment) and loads every plugin.
    async fn load(runtime: &Runtime, config: Config) -> Result<Live, LoadError> {
        let verifiers = verifiers(&config)?;
        let plugins = load_plugins(runtime, &config).await?;
        // Only a load that succeeds changes the limit (a failed reload keeps
        // everything as it was).
        runtime.set_max_hops(config.server.max_hops);
        let accepted = config
            .sources
            .keys()
            .map(|name| {
                let counter =
                    metrics::counter!("switchyard_events_accepted_total", "source" => name.clone());
                (name.clone(), counter)
            })
            .collect();
        Ok(Live {
            limits: source_limits(&config),
            accepted,
            match_seconds: metrics::histogram!("switchyard_match_seconds"),
            config,
            plugins,
            verifiers,
        })
    }
}

/// The verifiers of every source that has a `verify` table.
pub fn verifiers(config: &Config) -> Result<HashMap<String, Arc<Verifier>>, SecretError> {
    let mut out = HashMap::new();
    for (name, source) in &config.sources {
        if let Some(v) = &source.verify {
            let verifier = Verifier::new(name, v, |var| std::env::var(var).ok())?;
            out.insert(name.clone(), Arc::new(verifier));
        }
    }
    Ok(out)
}

/// The last reload that failed (cleared by the next one that succeeds).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadFailure {
    /// RFC 3339.
    pub at: String,
    /// One line per problem (`file:line:col: message (key ...)`).
    pub errors: Vec<String>,
}

/// Why a reload left the configuration in force unchanged.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigErrors),
    #[error(transparent)]
    Load(#[from] LoadError),
}

/// Why the plugins or secrets of a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Plugin(#[from] RuntimeError),
    #[error(transparent)]
    Secret(#[from] SecretError),
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// How often old events are looked for, at most: a quarter of the retention
/// if that is shorter.
const COMPACTION_INTERVAL: std::time::Duration = std::time::Duration::from_secs(300);
/// Events looked at per compaction step (one journal transaction), so that
/// ingest waits for at most one short step.
const COMPACTION_STEP: usize = 512;

/// A running server.
pub struct Server {
    addr: SocketAddr,
    /// The admin API's own address, with `[server] admin_listen`.
    admin_addr: Option<SocketAddr>,
    admin_http: Option<JoinHandle<()>>,
    backend: Backend,
    live: Arc<ArcSwap<Live>>,
    reloader: Arc<Reloader>,
    /// Cancelled when shutdown begins: webhooks answer 503 from then on.
    draining: CancellationToken,
    /// Cancelled when shutdown ends: HTTP, watcher and compaction stop.
    stop: CancellationToken,
    http: JoinHandle<()>,
    _watcher: Option<ConfigWatcher>,
}

/// Re-reads the config file and swaps in its routes and plugins.
pub struct Reloader {
    live: Arc<ArcSwap<Live>>,
    runtime: Arc<Runtime>,
    failure: ArcSwap<Option<ReloadFailure>>,
    /// One reload at a time.
    lock: tokio::sync::Mutex<()>,
}

impl Reloader {
    /// Loads, validates and compiles the file, builds and loads its plugins,
    /// then swaps everything in at once. On any error the configuration in
    /// force stays, and the error is kept for `GET /api/routes`.
    pub async fn reload(&self) -> Result<(), ReloadError> {
        let _one = self.lock.lock().await;
        let current = self.live.load_full();
        let result = async {
            let mut config = crate::config::load(&current.config.file)?;
            // Where the server listens and keeps its data cannot change while
            // it runs; keep what it started with.
            let (old, new) = (&current.config.server, &config.server);
            if old.listen != new.listen || old.data_dir != new.data_dir {
                tracing::warn!("`listen` and `data_dir` changes take effect at the next start");
            }
            config.server.listen = old.listen;
            config.server.data_dir = old.data_dir.clone();
            config.server.build_dir = old.build_dir.clone();
            if config.engine != current.config.engine {
                tracing::warn!("`[engine]` changes take effect at the next start");
                config.engine = current.config.engine.clone();
            }
            Ok::<_, ReloadError>(Live::load(&self.runtime, config).await?)
        }
        .await;
        match result {
            Ok(live) => {
                tracing::info!(
                    routes = live.config.routes.routes.len(),
                    plugins = live.plugins.len(),
                    "configuration reloaded"
                );
                self.live.store(Arc::new(live));
                self.failure.store(Arc::new(None));
                Ok(())
            }
            Err(e) => {
                let errors: Vec<String> = e.to_string().lines().map(str::to_string).collect();
                for line in &errors {
                    tracing::error!("reload failed, keeping the rules in force: {line}");
                }
                self.failure.store(Arc::new(Some(ReloadFailure {
                    at: crate::event::rfc3339_ms(crate::event::now_ms()),
                    errors,
                })));
                Err(e)
            }
        }
    }

    /// The last failed reload, if the latest attempt failed.
    pub fn failure(&self) -> Option<ReloadFailure> {
        (*self.failure.load_full()).clone()
    }
}

impl Server {
    /// Binds `config.server.listen` and starts.
    pub async fn start(config: Config) -> Result<Server, ServeError> {
        let addr = config.server.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { addr, source })?;
        Server::start_on(config, listener).await
    }

    /// Starts on an already bound listener (tests bind port 0).
    pub async fn start_on(config: Config, listener: TcpListener) -> Result<Server, ServeError> {
        let addr = listener.local_addr().map_err(|source| ServeError::Bind {
            addr: config.server.listen,
            source,
        })?;
        // Installed before anything records a metric.
        let _ = crate::telemetry::metrics();
        let data_dir = config.server.data_dir.clone();
        let workers = config.server.workers;
        let config_file = config.file.clone();
        let stop = CancellationToken::new();
        let draining = CancellationToken::new();
        // The engine: its store first (the runtime reads plugin kv from it),
        // then, once the plugins are loaded, its dispatcher.
        enum Store {
            Embedded(Journal),
            Nats(NatsJournal),
        }
        let store = match &config.engine {
            EngineConfig::Embedded => {
                let journal = Journal::open_with(
                    &data_dir,
                    config.server.fsync,
                    config.server.idle_background,
                )?;
                if !config.server.fsync {
                    tracing::warn!(
                        "[server] fsync = false: a crash may lose events already answered 202"
                    );
                }
                Store::Embedded(journal)
            }
            EngineConfig::Nats(nats) => {
                let dedup_window = config
                    .sources
                    .values()
                    .filter(|s| s.dedup_from.is_some())
                    .map(|s| s.dedup_window)
                    .max()
                    .unwrap_or(crate::config::DEFAULT_DEDUP_WINDOW);
                let limits = StreamLimits {
                    retention: config.server.retention,
                    dedup_window,
                };
                let journal = NatsJournal::connect(nats, limits).await?;
                tracing::info!(url = %nats.url, stream = %nats.stream, "engine: NATS JetStream");
                if !config.server.fsync {
                    tracing::warn!(
                        "[server] fsync = false has no effect with the NATS engine: a 202 waits for the NATS server's acknowledgement, and its own sync settings decide what that survives (see docs/nats.md)"
                    );
                }
                if nats.replicas < 3 {
                    tracing::warn!(
                        replicas = nats.replicas,
                        "with fewer than 3 replicas, a 202 survives power loss only if the NATS server runs with `sync_interval: always` (see docs/nats.md)"
                    );
                }
                Store::Nats(journal)
            }
        };
        let kv: Arc<dyn KvStore> = match &store {
            Store::Embedded(j) => Arc::new(j.clone()),
            Store::Nats(j) => Arc::new(j.clone()),
        };
        let runtime = Arc::new(Runtime::new(&data_dir.join("cache"), kv)?);
        let live = Live::load(&runtime, config).await?;
        let live = Arc::new(ArcSwap::from_pointee(live));
        let reloader = Arc::new(Reloader {
            live: live.clone(),
            runtime: runtime.clone(),
            failure: ArcSwap::from_pointee(None),
            lock: tokio::sync::Mutex::new(()),
        });
        let backend = match store {
            Store::Embedded(journal) => {
                let dispatcher =
                    Dispatcher::start(journal.clone(), runtime.clone(), live.clone(), workers);
                // Whatever was accepted but not finished before the last stop.
                let due = journal.due_deliveries()?;
                if !due.is_empty() {
                    tracing::info!(count = due.len(), "resuming unfinished deliveries");
                }
                dispatcher.enqueue_all(due.into_iter().map(|d| Work::from_due(d, None)).collect());
                tokio::spawn(compact_periodically(
                    journal.clone(),
                    live.clone(),
                    stop.clone(),
                ));
                Backend::embedded_engine(journal, dispatcher)
            }
            Store::Nats(journal) => {
                // Unfinished deliveries wait in the consumers: nothing to resume.
                let dispatcher =
                    NatsDispatcher::start(journal.clone(), runtime.clone(), live.clone(), workers);
                tokio::spawn(expire_kv_periodically(
                    journal.clone(),
                    live.clone(),
                    stop.clone(),
                ));
                Backend::nats_engine(journal, dispatcher)
            }
        };

        let admin_listener = match live.load().config.server.admin_listen {
            None => None,
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .map_err(|source| ServeError::Bind { addr: a, source })?,
            ),
        };
        let admin_addr = match &admin_listener {
            Some(l) => Some(
                l.local_addr()
                    .map_err(|source| ServeError::Bind { addr, source })?,
            ),
            None => None,
        };
        let admin_token = std::env::var("SWITCHYARD_ADMIN_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .map(Arc::from);
        let state = AppState::new(ingress::Shared {
            live: live.clone(),
            reloader: reloader.clone(),
            backend: backend.clone(),
            runtime: runtime.clone(),
            admin_open: ingress::is_loopback(&admin_addr.unwrap_or(addr)),
            admin_token,
            draining: draining.clone(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(
                live.load().config.server.max_concurrency,
            )),
        });
        let header_timeout = live.load().config.server.header_timeout;
        let drain = std::time::Duration::from_secs(5);
        let admin_http = admin_listener.map(|l| {
            let app = ingress::admin_router(state.clone());
            tokio::spawn(ingress::serve::serve(
                l,
                app,
                header_timeout,
                stop.clone(),
                drain,
            ))
        });
        let app = match admin_addr {
            Some(_) => ingress::public_router(state),
            None => ingress::router(state),
        };
        let http = tokio::spawn(ingress::serve::serve(
            listener,
            app,
            header_timeout,
            stop.clone(),
            drain,
        ));
        let watcher = match ConfigWatcher::start(
            &config_file,
            live.clone(),
            reloader.clone(),
            stop.clone(),
        ) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(file = %config_file.display(), error = %e, "cannot watch the config file and plugins; reload with SIGHUP");
                None
            }
        };
        tracing::info!(%addr, "switchyard listening");
        if let Some(a) = admin_addr {
            tracing::info!(addr = %a, "admin API listening");
        }
        Ok(Server {
            addr,
            admin_addr,
            admin_http,
            backend,
            live,
            reloader,
            draining,
            stop,
            http,
            _watcher: watcher,
        })
    }

    /// Reloads the config file now (as SIGHUP and file changes do).
    pub async fn reload(&self) -> Result<(), ReloadError> {
        self.reloader.reload().await
    }

    pub fn reloader(&self) -> Arc<Reloader> {
        self.reloader.clone()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where the admin API listens, if not on [`Server::addr`].
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The embedded journal (`None` on the NATS engine).
    pub fn journal(&self) -> Option<&Journal> {
        self.backend.embedded()
    }

    /// The engine this server runs on.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Graceful shutdown: webhooks answer 503 from now on; deliveries in
    /// flight get `[server] shutdown_grace` to finish and commit; then HTTP
    /// stops. A delivery cut off is delivered again after the next start.
    pub async fn shutdown(self) {
        self.draining.cancel();
        let grace = self.live.load().config.server.shutdown_grace;
        if self.backend.deliveries().drain(grace).await {
            tracing::info!("deliveries in flight finished");
        } else {
            tracing::warn!(
                grace = %humantime::format_duration(grace),
                "deliveries still running at the end of the grace period will run again after restart"
            );
        }
        // Everything in fjall and the commit log released: the next start
        // has nothing to replay (it would replay it correctly, only slower).
        if let Some(journal) = self.backend.embedded() {
            match journal.checkpoint().await {
                Ok(()) => {
                    tracing::info!("journal checkpointed: nothing to replay at the next start")
                }
                Err(e) => {
                    tracing::error!(error = %e, "journal checkpoint at shutdown failed: the next start replays the commit log")
                }
            }
        }
        self.stop.cancel();
        let _ = self.http.await;
        if let Some(admin) = self.admin_http {
            let _ = admin.await;
        }
    }

    /// Runs until `signal` resolves, then shuts down.
    pub async fn run_until(self, signal: impl std::future::Future<Output = ()>) {
        signal.await;
        tracing::info!("shutting down");
        self.shutdown().await;
    }
}

/// Deletes events older than `[server] retention` (and their finished
/// deliveries) now and then, one short journal transaction at a time.
async fn compact_periodically(journal: Journal, live: Arc<ArcSwap<Live>>, stop: CancellationToken) {
    loop {
        let retention = live.load().config.server.retention;
        let cutoff = now_ms().saturating_sub(retention.as_millis() as u64);
        let (mut events, mut deliveries) = (0, 0);
        let mut resume = None;
        loop {
            if stop.is_cancelled() {
                return;
            }
            match journal.compact(cutoff, resume, COMPACTION_STEP).await {
                Ok(step) => {
                    events += step.events;
                    deliveries += step.deliveries;
                    resume = step.resume;
                    if resume.is_none() {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "compaction step failed; trying again later");
                    break;
                }
            }
            tokio::task::yield_now().await;
        }
        if events > 0 {
            tracing::info!(events, deliveries, "compacted events past retention");
        }
        // Plugin kv entries whose TTL ran out: unreadable already, now deleted.
        loop {
            if stop.is_cancelled() {
                return;
            }
            match journal.expire_kv(now_ms(), COMPACTION_STEP).await {
                Ok(n) if n == COMPACTION_STEP => tokio::task::yield_now().await,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "kv expiry step failed; trying again later");
                    break;
                }
            }
        }
        let pause =
            (retention / 4).clamp(std::time::Duration::from_millis(250), COMPACTION_INTERVAL);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Deletes plugin kv entries whose TTL ran out, on the NATS engine (where
/// expiry is checked on read, but the entries would stay).
async fn expire_kv_periodically(
    journal: NatsJournal,
    live: Arc<ArcSwap<Live>>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(COMPACTION_INTERVAL / 5) => {}
        }
        let plugins: Vec<String> = live.load().plugins.keys().cloned().collect();
        for plugin in plugins {
            if let Err(e) = journal.expire_kv(&plugin, COMPACTION_STEP).await {
                tracing::debug!(%plugin, error = %e, "kv expiry sweep failed; trying again later");
            }
        }
    }
}

/// Builds (crates) and compiles every plugin of the config.
async fn load_plugins(
    runtime: &Runtime,
    config: &Config,
) -> Result<HashMap<String, Arc<Plugin>>, RuntimeError> {
    let mut out = HashMap::new();
    for (name, p) in &config.plugins {
        let wasm: PathBuf = match &p.wasm {
            WasmSource::File(path) => path.clone(),
            WasmSource::Crate(dir) => {
                tracing::info!(plugin = %name, dir = %dir.display(), "building plugin crate");
                cargo::build_plugin(dir, &config.server.build_dir())
                    .await
                    .map_err(|source| RuntimeError::Build {
                        plugin: name.clone(),
                        source,
                    })?
            }
        };
        let plugin = runtime
            .load(name, &wasm, p.limits, p.config.clone())?
            .with_http(p.http.clone());
        tracing::info!(plugin = %name, hash = %&plugin.hash[..12], "plugin loaded");
        out.insert(name.clone(), Arc::new(plugin));
    }
    Ok(out)
}
