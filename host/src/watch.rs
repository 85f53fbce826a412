//! Hot reload: watches the config file and every plugin's source (its `.wasm`
//! file, or its crate's files outside `target/`), and reloads when one
//! changes. A reload builds and compiles what changed and swaps the new
//! plugins in at once: new deliveries run the new version, deliveries in
//! flight finish on the old one, and a reload that fails (a build error, a
//! broken file) keeps everything in force and says why.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::RecursiveMode;
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, WasmSource};
use crate::server::{Live, Reloader};

/// How long to wait for a burst of saves to end.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// What changes are worth a reload.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Watched {
    config: PathBuf,
    /// Plugin `.wasm` files.
    files: BTreeSet<PathBuf>,
    /// Plugin crate folders (their `target/` excepted).
    crates: BTreeSet<PathBuf>,
}

impl Watched {
    fn of(config: &Config) -> Watched {
        let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        let mut w = Watched {
            config: abs(&config.file),
            ..Watched::default()
        };
        for p in config.plugins.values() {
            match &p.wasm {
                WasmSource::File(f) => w.files.insert(abs(f)),
                WasmSource::Crate(c) => w.crates.insert(abs(c)),
            };
        }
        w
    }

    /// Whether a change at `path` may change the config or a plugin.
    fn relevant(&self, path: &Path) -> bool {
        path == self.config
            || self.files.contains(path)
            || self
                .crates
                .iter()
                .any(|c| path.starts_with(c) && !path.starts_with(c.join("target")))
    }

    /// The (path, recursive) watches these need. Files are watched through
    /// their folder: editors and build tools often replace a file by renaming
    /// a new one over it, which a watch on the file itself misses.
    fn watches(&self) -> BTreeSet<(PathBuf, bool)> {
        let parent = |p: &Path| {
            p.parent()
                .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
        };
        let mut out: BTreeSet<(PathBuf, bool)> =
            self.crates.iter().map(|c| (c.clone(), true)).collect();
        for f in std::iter::once(&self.config).chain(&self.files) {
            out.insert((parent(f), false));
        }
        out
    }
}

/// Keeps the watches; dropping it stops watching.
pub struct ConfigWatcher {
    _debouncer: Arc<Mutex<Debouncer<notify::RecommendedWatcher, RecommendedCache>>>,
}

impl ConfigWatcher {
    /// Starts watching what `live`'s config names, and reloading on changes
    /// until `stop`.
    pub fn start(
        file: &Path,
        live: Arc<ArcSwap<Live>>,
        reloader: Arc<Reloader>,
        stop: CancellationToken,
    ) -> Result<ConfigWatcher, notify::Error> {
        let mut watched = Watched::of(&live.load().config);
        watched.config = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
        let shared = Arc::new(RwLock::new(watched.clone()));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<PathBuf>();
        let filter = shared.clone();
        let debouncer = new_debouncer(DEBOUNCE, None, move |result: DebounceEventResult| {
            let Ok(events) = result else { return };
            let Ok(w) = filter.read() else { return };
            let changed = events
                .iter()
                .filter(|e| !e.kind.is_access())
                .flat_map(|e| e.paths.iter())
                .find(|p| w.relevant(p));
            if let Some(p) = changed {
                let _ = tx.send(p.clone());
            }
        })?;
        let debouncer = Arc::new(Mutex::new(debouncer));
        let mut active = BTreeSet::new();
        sync_watches(&debouncer, &mut active, &watched)?;

        let handle = debouncer.clone();
        tokio::spawn(async move {
            loop {
                let changed = tokio::select! {
                    _ = stop.cancelled() => break,
                    changed = rx.recv() => changed,
                };
                let Some(path) = changed else { break };
                // A burst of saves reloads once.
                while rx.try_recv().is_ok() {}
                if path == watched.config {
                    tracing::info!("config file changed; reloading");
                } else {
                    tracing::info!(path = %path.display(), "plugin source changed; rebuilding and reloading");
                }
                if reloader.reload().await.is_ok() {
                    // The new config may name other plugins.
                    let mut next = Watched::of(&live.load().config);
                    next.config = watched.config.clone();
                    if next != watched {
                        if let Err(e) = sync_watches(&handle, &mut active, &next) {
                            tracing::warn!(error = %e, "cannot watch the new plugins' sources");
                        }
                        if let Ok(mut w) = shared.write() {
                            *w = next.clone();
                        }
                        watched = next;
                    }
                }
            }
        });
        Ok(ConfigWatcher {
            _debouncer: debouncer,
        })
    }
}

/// Adds and removes watches so that `active` becomes what `watched` needs.
fn sync_watches(
    debouncer: &Mutex<Debouncer<notify::RecommendedWatcher, RecommendedCache>>,
    active: &mut BTreeSet<(PathBuf, bool)>,
    watched: &Watched,
) -> Result<(), notify::Error> {
    let want = watched.watches();
    let Ok(mut d) = debouncer.lock() else {
        return Ok(());
    };
    for gone in active.difference(&want) {
        let _ = d.unwatch(&gone.0);
    }
    let mut first_error = None;
    for (path, recursive) in want.difference(active) {
        let mode = if *recursive {
            RecursiveMode::Recursive
        } else {
            RecursiveMode::NonRecursive
        };
        if let Err(e) = d.watch(path, mode) {
            tracing::warn!(path = %path.display(), error = %e, "cannot watch");
            first_error.get_or_insert(e);
        }
    }
    *active = want;
    // Only the config file's own folder is essential.
    match first_error {
        Some(e) if !active.iter().any(|(p, _)| watched.config.starts_with(p)) => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relevant_changes() {
        let w = Watched {
            config: "/srv/rules.toml".into(),
            files: ["/srv/wasm/a.wasm".into()].into(),
            crates: ["/src/plugins/b".into()].into(),
        };
        assert!(w.relevant(Path::new("/srv/rules.toml")));
        assert!(!w.relevant(Path::new("/srv/other.toml")));
        assert!(w.relevant(Path::new("/srv/wasm/a.wasm")));
        assert!(!w.relevant(Path::new("/srv/wasm/a.wasm.tmp")));
        assert!(w.relevant(Path::new("/src/plugins/b/src/lib.rs")));
        assert!(w.relevant(Path::new("/src/plugins/b/Cargo.toml")));
        assert!(!w.relevant(Path::new("/src/plugins/b/target/debug/x")));
        assert!(!w.relevant(Path::new("/src/plugins/bb/src/lib.rs")));
        let watches: Vec<_> = w.watches().into_iter().collect();
        assert_eq!(
            watches,
            [
                (PathBuf::from("/src/plugins/b"), true),
                (PathBuf::from("/srv"), false),
                (PathBuf::from("/srv/wasm"), false)
            ]
        );
    }
}
