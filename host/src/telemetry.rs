//! Logging setup (human-readable by default, JSON lines on request) and the
//! Prometheus metrics behind `GET /metrics`.
//!
//! Metric names and their labels (all of bounded cardinality: names from
//! `rules.toml` and fixed words, never an event id):
//! - `switchyard_events_accepted_total{source}`, `switchyard_events_duplicate_total{source}`
//! - `switchyard_requests_rejected_total{source, reason}` (reason: the error word
//!   of the answer; an undeclared source counts as `source="(unknown)"`)
//! - `switchyard_match_seconds` (histogram)
//! - `switchyard_deliveries_total{route, outcome}` (delivered, retry, dead)
//! - `switchyard_delivery_seconds{plugin}` (histogram)
//! - `switchyard_dead_letters_total{route}`
//! - `switchyard_scheduled_deliveries` (gauge: waiting in the scheduler)
//! - `switchyard_journal_commit_ops` and `switchyard_journal_commit_seconds` (histograms)

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber. `RUST_LOG` overrides the default level
/// (`info`, with plugin log lines included).
pub fn init(format: LogFormat) {
    init_with(format, "info");
}

/// Like [`init`], with `level` as the default filter (e.g. `info,plugin=debug`
/// for `switchyard dev`) when `RUST_LOG` is not set.
pub fn init_with(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "{level},wasmtime=warn,cranelift=warn,fjall=warn,lsm_tree=warn"
        ))
    });
    // Colours only on a terminal: a log redirected to a file stays plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    // A second init (tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// The process-wide Prometheus recorder (installed once: tests start several
/// servers in one process), or `None` if another recorder was installed.
pub fn metrics() -> Option<&'static metrics_exporter_prometheus::PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<Option<metrics_exporter_prometheus::PrometheusHandle>> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let seconds = [
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0,
            ];
            let ops = [
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0,
            ];
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .set_buckets(&seconds)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Full(
                            "switchyard_journal_commit_ops".into(),
                        ),
                        &ops,
                    )
                })
                .and_then(|b| b.install_recorder())
                .map_err(|e| tracing::warn!(error = %e, "metrics recorder not installed"))
                .ok()
        })
        .as_ref()
}
