//! Puts the stages together: journal, runtime and plugins, dispatcher, HTTP.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, WasmSource};
use crate::dispatch::{Dispatcher, Work};
use crate::ingress::{self, AppState};
use crate::journal::{Journal, JournalError};
use crate::runtime::{Plugin, Runtime, RuntimeError, cargo};

/// The configuration in force and the plugins loaded for it.
pub struct Live {
    pub config: Config,
    pub plugins: HashMap<String, Arc<Plugin>>,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    journal: Journal,
    stop: CancellationToken,
    http: JoinHandle<()>,
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
        let data_dir = config.server.data_dir.clone();
        let journal = Journal::open(&data_dir)?;
        let runtime = Arc::new(Runtime::new(&data_dir.join("cache"), journal.clone())?);
        let plugins = load_plugins(&runtime, &config).await?;
        let workers = config.server.workers;
        let live = Arc::new(ArcSwap::from_pointee(Live { config, plugins }));

        let stop = CancellationToken::new();
        let dispatcher = Dispatcher::start(
            journal.clone(),
            runtime.clone(),
            live.clone(),
            workers,
            stop.clone(),
        );
        // Whatever was accepted but not finished before the last stop.
        let due = journal.due_deliveries()?;
        if !due.is_empty() {
            tracing::info!(count = due.len(), "resuming unfinished deliveries");
        }
        for d in due {
            dispatcher.enqueue(Work {
                key: d.key,
                due_ms: d.due_ms,
                route: d.record.route,
                plugin: d.record.plugin,
                attempts: d.record.attempts.len() as u32,
                event: None,
            });
        }

        let admin_token = std::env::var("SWITCHYARD_ADMIN_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .map(Arc::from);
        let state = AppState {
            live,
            journal: journal.clone(),
            dispatcher,
            admin_open: ingress::is_loopback(&addr),
            admin_token,
        };
        let app = ingress::router(state);
        let shutdown = stop.clone();
        let http = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "http server failed");
            }
        });
        tracing::info!(%addr, "switchyard listening");
        Ok(Server {
            addr,
            journal,
            stop,
            http,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// Stops accepting, stops the dispatcher, and waits for the HTTP side.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.http.await;
    }

    /// Runs until `signal` resolves, then shuts down.
    pub async fn run_until(self, signal: impl std::future::Future<Output = ()>) {
        signal.await;
        tracing::info!("shutting down");
        self.shutdown().await;
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
        let plugin = runtime.load(name, &wasm, p.limits, p.config.clone())?;
        tracing::info!(plugin = %name, hash = %&plugin.hash[..12], "plugin loaded");
        out.insert(name.clone(), Arc::new(plugin));
    }
    Ok(out)
}
