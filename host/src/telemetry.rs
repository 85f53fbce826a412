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
//! - the rest: see `docs/operations.md` (a test keeps that list exact)

use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber. `RUST_LOG` overrides the default level
/// (`info`, with plugin log lines included).
pub fn init(format: LogFormat) {
    install(format, "info", None, std::io::stderr);
}

/// Writes log lines and exports spans while it lives; dropping it writes the
/// lines still queued and flushes the spans buffered.
pub struct TelemetryGuard {
    _log: tracing_appender::non_blocking::WorkerGuard,
    _traces: Option<TracingGuard>,
}

/// Exports spans while it lives; dropping it flushes what is buffered.
struct TracingGuard {
    provider: opentelemetry_sdk::trace::SdkTracerProvider,
}

impl Drop for TracingGuard {
    fn drop(&mut self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("warning: could not flush the last spans: {e}");
        }
    }
}

/// Like [`init`], with `level` as the default filter (e.g. `info,plugin=debug`
/// for `switchyard dev`) when `RUST_LOG` is not set, and, with an OTLP
/// endpoint in `telemetry`, spans exported there (see `crate::trace`).
///
/// Lines go to stderr from a thread of their own (`log-writer`), so that a
/// slow reader of stderr (a full pipe to a log collector) holds up that
/// thread, not the server's: a line is queued, up to 128,000 of them, and
/// only a full queue makes the logging thread wait (no line is dropped).
/// Keep the guard until the end: dropping it writes what is queued.
pub fn init_with(
    format: LogFormat,
    level: &str,
    telemetry: Option<&crate::config::TelemetryConfig>,
) -> TelemetryGuard {
    let (writer, log) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("log-writer")
        .finish(std::io::stderr());
    let traces = install(format, level, telemetry, writer);
    TelemetryGuard {
        _log: log,
        _traces: traces,
    }
}

/// Installs the subscriber, writing lines with `writer`.
fn install<W>(
    format: LogFormat,
    level: &str,
    telemetry: Option<&crate::config::TelemetryConfig>,
    writer: W,
) -> Option<TracingGuard>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "{level},wasmtime=warn,cranelift=warn,fjall=warn,lsm_tree=warn,opentelemetry=warn"
        ))
    });
    // Colours only on a terminal: a log redirected to a file stays plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(writer);
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    let (otel, guard) = match telemetry.and_then(|t| Some((t.otlp_endpoint.as_deref()?, t))) {
        None => (None, None),
        Some((endpoint, t)) => match otlp_provider(endpoint, &t.service_name) {
            Ok(provider) => {
                use opentelemetry::trace::TracerProvider as _;
                let tracer = provider.tracer("switchyard");
                (
                    Some(tracing_opentelemetry::layer().with_tracer(tracer)),
                    Some(TracingGuard { provider }),
                )
            }
            Err(e) => {
                eprintln!("warning: cannot export traces to {endpoint}: {e}");
                (None, None)
            }
        },
    };
    let exporting = otel.is_some();
    // A second init (tests) keeps the first subscriber.
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .is_ok();
    if installed && exporting {
        crate::trace::set_exporting();
    }
    guard
}

fn otlp_provider(
    endpoint: &str,
    service_name: &str,
) -> Result<opentelemetry_sdk::trace::SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    use opentelemetry_otlp::WithExportConfig as _;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(format!("{endpoint}/v1/traces"))
        .build()?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service_name.to_string())
        .build();
    Ok(opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
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
