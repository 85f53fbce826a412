//! `rules.toml`: parsed into raw spanned types, then validated into a `Config`,
//! collecting every problem at once, each with its line, column and key.

mod raw;
pub mod schema;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::IntoDeserializer;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::rules::{Backoff, Pattern, RetryPolicy, Route, RouteTable};
use crate::runtime::http::{DEFAULT_HTTP_TIMEOUT, HostPattern};
use crate::runtime::{HttpPolicy, Isolation, Limits, MAX_PLUGIN_INSTANCES, MAX_PLUGIN_MEMORY};
use raw::{RawEngine, RawPlugin, RawRetry, RawRoute, RawServer, RawSource, RawTelemetry};

/// The body limit of a source that does not set one: 1 MiB.
pub const DEFAULT_MAX_BODY: usize = 1 << 20;

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from.
    pub file: PathBuf,
    pub server: ServerConfig,
    pub sources: BTreeMap<String, SourceConfig>,
    pub plugins: BTreeMap<String, PluginConfig>,
    pub routes: RouteTable,
    pub telemetry: TelemetryConfig,
    pub engine: EngineConfig,
}

/// `[engine]`: which backend keeps events, deliveries, dedup and kv.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum EngineConfig {
    /// One store in `data_dir`.
    #[default]
    Embedded,
    /// NATS JetStream.
    Nats(NatsConfig),
}

/// `[engine] kind = "nats"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsConfig {
    pub url: String,
    pub stream: String,
    pub replicas: usize,
}

/// `[telemetry]`.
#[derive(Debug, Clone, Default)]
pub struct TelemetryConfig {
    /// OTLP/HTTP base URL, without a trailing `/`.
    pub otlp_endpoint: Option<String>,
    pub service_name: String,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Where the admin API listens, when not on `listen`.
    pub admin_listen: Option<SocketAddr>,
    pub data_dir: PathBuf,
    /// Cargo target dir for plugin crates; `None`: `<data_dir>/build`.
    pub build_dir: Option<PathBuf>,
    /// Deliveries running at once.
    pub workers: usize,
    /// How long events stay in the journal.
    pub retention: Duration,
    /// How long in-flight deliveries may take to finish on shutdown.
    pub shutdown_grace: Duration,
    /// Whether journal commits wait for the disk.
    pub fsync: bool,
    /// Whether the store's background threads run at idle CPU priority.
    pub idle_background: bool,
    /// Webhook requests handled at once (more: 503).
    pub max_concurrency: usize,
    /// Emits allowed between a webhook event and its last derived event.
    pub max_hops: u32,
    /// Deadline for a client to send its headers.
    pub header_timeout: Duration,
    /// Deadline for a client to send its body (408).
    pub body_timeout: Duration,
}

impl ServerConfig {
    pub fn build_dir(&self) -> PathBuf {
        self.build_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("build"))
    }
}

pub use crate::ingress::decode::FieldFrom;

#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub name: String,
    pub type_from: Option<FieldFrom>,
    pub subject_from: Option<FieldFrom>,
    pub max_body: usize,
    /// Where the idempotency key comes from, if the source deduplicates.
    pub dedup_from: Option<FieldFrom>,
    pub dedup_window: Duration,
    /// How requests are verified, if they are.
    pub verify: Option<VerifyConfig>,
    /// Sustained requests per second and burst, if limited.
    pub rate_limit: Option<(u32, u32)>,
    /// Requests of this source at once, if limited.
    pub max_concurrency: Option<usize>,
    /// Non-JSON media types accepted as raw bytes (lower case, no parameters).
    pub content_types: Vec<String>,
}

/// A source's `verify` table, validated (secrets are resolved at start).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyConfig {
    pub scheme: VerifyScheme,
    /// Environment variables holding the secrets, newest first.
    pub secret_env: Vec<String>,
    pub tolerance: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyScheme {
    StandardWebhooks,
    Github,
    Stripe,
    Bearer,
}

impl VerifyScheme {
    pub fn name(self) -> &'static str {
        match self {
            VerifyScheme::StandardWebhooks => "standard-webhooks",
            VerifyScheme::Github => "github",
            VerifyScheme::Stripe => "stripe",
            VerifyScheme::Bearer => "bearer",
        }
    }
}

/// How long a source remembers idempotency keys unless it says otherwise.
pub const DEFAULT_DEDUP_WINDOW: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WasmSource {
    /// A compiled component.
    File(PathBuf),
    /// A plugin crate, built for `wasm32-wasip2` on demand.
    Crate(PathBuf),
}

#[derive(Debug, Clone)]
pub struct PluginConfig {
    pub name: String,
    pub wasm: WasmSource,
    pub limits: Limits,
    pub config: serde_json::Map<String, serde_json::Value>,
    /// `allow_http` and `http_timeout`.
    pub http: HttpPolicy,
}

/// One problem in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Byte range in the file, when known.
    pub span: Option<Range<usize>>,
    /// The key it concerns, e.g. `routes[1].match.data.total`.
    pub key: String,
    pub message: String,
}

/// Every problem found in a file.
#[derive(Debug, Clone)]
pub struct ConfigErrors {
    pub file: PathBuf,
    pub text: String,
    pub errors: Vec<ConfigError>,
}

impl std::error::Error for ConfigErrors {}

impl fmt::Display for ConfigErrors {
    /// One line per problem: `file:line:col: message (key `k`)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            let (line, col) = e
                .span
                .as_ref()
                .map_or((1, 1), |s| line_col(&self.text, s.start));
            write!(f, "{}:{line}:{col}: {}", self.file.display(), e.message)?;
            if !e.key.is_empty() {
                write!(f, " (key `{}`)", e.key)?;
            }
        }
        Ok(())
    }
}

impl ConfigErrors {
    /// The problems with source snippets and carets, as a compiler shows them.
    pub fn render(&self, color: bool) -> String {
        use annotate_snippets::{AnnotationKind, Level, Renderer, Snippet};
        let path = self.file.display().to_string();
        let renderer = if color {
            Renderer::styled()
        } else {
            Renderer::plain()
        };
        let mut out = String::new();
        for e in &self.errors {
            let title = if e.key.is_empty() {
                e.message.clone()
            } else {
                format!("{} (key `{}`)", e.message, e.key)
            };
            let span = e.span.clone().unwrap_or(0..0);
            let report = &[Level::ERROR.primary_title(&title).element(
                Snippet::source(&self.text)
                    .path(&path)
                    .annotation(AnnotationKind::Primary.span(span)),
            )];
            out.push_str(&renderer.render(report));
            out.push_str("\n\n");
        }
        out.push_str(&format!(
            "{} error{} in {path}",
            self.errors.len(),
            if self.errors.len() == 1 { "" } else { "s" }
        ));
        out
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..text.floor_char_boundary(offset)];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(path, &text),
        Err(e) => Err(ConfigErrors {
            file: path.to_path_buf(),
            text: String::new(),
            errors: vec![ConfigError {
                span: None,
                key: String::new(),
                message: format!("cannot read the file: {e}"),
            }],
        }),
    }
}

/// Validates config `text` read from `file` (relative paths in it are relative
/// to the file's folder).
pub fn parse(file: &Path, text: &str) -> Result<Config, ConfigErrors> {
    let mut v = Validator {
        base: file
            .parent()
            .map(Path::to_path_buf)
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from(".")),
        errors: Vec::new(),
        declared_plugins: Default::default(),
    };
    let config = v.document(file, text);
    match config {
        Some(c) if v.errors.is_empty() => Ok(c),
        _ => {
            v.errors
                .sort_by_key(|e| e.span.as_ref().map_or(0, |s| s.start));
            Err(ConfigErrors {
                file: file.to_path_buf(),
                text: text.to_string(),
                errors: v.errors,
            })
        }
    }
}

struct Validator {
    base: PathBuf,
    errors: Vec<ConfigError>,
    /// Every plugin name declared, valid or not.
    declared_plugins: std::collections::BTreeSet<String>,
}

impl Validator {
    fn error(
        &mut self,
        span: Option<Range<usize>>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        self.errors.push(ConfigError {
            span,
            key: key.into(),
            message: message.into(),
        });
    }

    /// Deserializes one spanned value, recording a failure.
    /// Deserializes one spanned value, recording failures. An unknown key is
    /// reported, dropped, and the rest deserialized again, so that every
    /// unknown key of a table is reported, along with the other problems.
    fn raw<T: for<'de> Deserialize<'de>>(
        &mut self,
        value: Spanned<DeValue<'_>>,
        key: &str,
    ) -> Option<T> {
        let span = value.span();
        let mut value = value;
        loop {
            match T::deserialize(value.clone().into_deserializer()) {
                Ok(t) => return Some(t),
                Err(e) => {
                    let message = e.message().to_string();
                    let at = e.span().unwrap_or(span.clone());
                    let removed = message
                        .starts_with("unknown field")
                        .then(|| remove_key_at(value.get_mut(), &at))
                        .flatten();
                    match removed {
                        Some(path) => self.error(Some(at), format!("{key}.{path}"), message),
                        None => {
                            self.error(Some(at), key, message);
                            return None;
                        }
                    }
                }
            }
        }
    }

    fn document(&mut self, file: &Path, text: &str) -> Option<Config> {
        let doc = match DeTable::parse(text) {
            Ok(d) => d,
            Err(e) => {
                self.error(e.span(), "", format!("invalid TOML: {}", e.message()));
                return None;
            }
        };
        let mut server = RawServer::default();
        let mut sources = Vec::new();
        let mut plugins = Vec::new();
        let mut routes = Vec::new();
        let mut telemetry = RawTelemetry::default();
        let mut engine = RawEngine::default();
        for (key, value) in doc.get_ref().iter() {
            let name = key.get_ref().as_ref();
            match name {
                "server" => {
                    if let Some(s) = self.raw::<RawServer>(value.clone(), "server") {
                        server = s;
                    }
                }
                "telemetry" => {
                    if let Some(t) = self.raw::<RawTelemetry>(value.clone(), "telemetry") {
                        telemetry = t;
                    }
                }
                "engine" => {
                    if let Some(e) = self.raw::<RawEngine>(value.clone(), "engine") {
                        engine = e;
                    }
                }
                "sources" | "plugins" | "routes" => {
                    let DeValue::Array(items) = value.get_ref() else {
                        self.error(
                            Some(value.span()),
                            name,
                            format!("`{name}` must be an array of tables: write [[{name}]]"),
                        );
                        continue;
                    };
                    for (i, item) in items.iter().enumerate() {
                        let key = format!("{name}[{i}]");
                        match name {
                            "sources" => sources.extend(self.raw::<RawSource>(item.clone(), &key)),
                            "plugins" => plugins.extend(self.raw::<RawPlugin>(item.clone(), &key)),
                            _ => routes.extend(self.route(item, &key)),
                        }
                    }
                }
                _ => self.error(
                    Some(key.span()),
                    name,
                    format!("unknown key `{name}`; expected server, sources, plugins, routes, telemetry or engine"),
                ),
            }
        }
        // Checked with the engine: it tunes only the embedded store.
        let background_priority = server.background_priority.as_ref().map(|p| p.span());
        let server = self.server(server);
        let sources = self.sources(sources, server.as_ref().map(|s| s.1));
        let plugins = self.plugins(plugins);
        let routes = self.routes(routes, &sources, &plugins);
        let telemetry = self.telemetry(telemetry);
        let engine = self.engine(engine, background_priority);
        Some(Config {
            file: file.to_path_buf(),
            server: server?.0,
            sources,
            plugins,
            routes,
            telemetry,
            engine,
        })
    }

    /// `background_priority`: where `[server] background_priority` is set,
    /// which the NATS engine has nothing to apply to.
    fn engine(
        &mut self,
        raw: RawEngine,
        background_priority: Option<Range<usize>>,
    ) -> EngineConfig {
        // Every key is checked whatever the kind, so that all errors show.
        let stream = match &raw.stream {
            Some(s) => {
                let name = s.get_ref();
                let ok = !name.is_empty()
                    && name.len() <= 32
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                if !ok {
                    self.error(
                        Some(s.span()),
                        "engine.stream",
                        format!("`{name}` is not a stream name: 1 to 32 of A-Z, a-z, 0-9, _ and -"),
                    );
                }
                name.clone()
            }
            None => "SWITCHYARD".into(),
        };
        let replicas = match &raw.replicas {
            Some(r) if !(1..=5).contains(r.get_ref()) => {
                self.error(
                    Some(r.span()),
                    "engine.replicas",
                    "`replicas` must be between 1 and 5",
                );
                1
            }
            Some(r) => *r.get_ref() as usize,
            None => 1,
        };
        let url = match &raw.url {
            Some(u) => {
                for part in u.get_ref().split(',') {
                    if let Err(e) = part.trim().parse::<async_nats::ServerAddr>() {
                        self.error(
                            Some(u.span()),
                            "engine.url",
                            format!(
                                "`{}` is not a NATS server address, e.g. \"nats://127.0.0.1:4222\": {e}",
                                part.trim()
                            ),
                        );
                    }
                }
                u.get_ref().clone()
            }
            None => "nats://127.0.0.1:4222".into(),
        };
        let kind = raw
            .kind
            .as_ref()
            .map(|k| k.get_ref().as_str())
            .unwrap_or("embedded");
        match kind {
            "embedded" => {
                for (key, span) in [
                    ("url", raw.url.as_ref().map(|s| s.span())),
                    ("stream", raw.stream.as_ref().map(|s| s.span())),
                    ("replicas", raw.replicas.as_ref().map(|s| s.span())),
                ] {
                    if let Some(span) = span {
                        self.error(
                            Some(span),
                            format!("engine.{key}"),
                            format!("`{key}` applies only to kind = \"nats\""),
                        );
                    }
                }
                EngineConfig::Embedded
            }
            "nats" => {
                if let Some(span) = background_priority {
                    self.error(
                        Some(span),
                        "server.background_priority",
                        "`background_priority` applies only to the embedded engine: \
                         with kind = \"nats\" the store's threads are nats-server's",
                    );
                }
                EngineConfig::Nats(NatsConfig {
                    url,
                    stream,
                    replicas,
                })
            }
            other => {
                let span = raw.kind.as_ref().map(|k| k.span());
                self.error(
                    span,
                    "engine.kind",
                    format!("unknown engine `{other}`; expected \"embedded\" or \"nats\""),
                );
                EngineConfig::Embedded
            }
        }
    }

    fn telemetry(&mut self, raw: RawTelemetry) -> TelemetryConfig {
        let otlp_endpoint = raw.otlp_endpoint.and_then(|e| {
            let url = e.get_ref().trim_end_matches('/').to_string();
            match url.parse::<http::Uri>() {
                Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some() => {
                    Some(url)
                }
                _ => {
                    self.error(
                        Some(e.span()),
                        "telemetry.otlp_endpoint",
                        format!(
                            "`{}` is not an http(s) URL, e.g. \"http://127.0.0.1:4318\"",
                            e.get_ref()
                        ),
                    );
                    None
                }
            }
        });
        TelemetryConfig {
            otlp_endpoint,
            service_name: raw
                .service_name
                .map(|s| s.into_inner())
                .unwrap_or_else(|| "switchyard".into()),
        }
    }

    /// A `[[routes]]` item: its `match` compiled from the spanned tree, the rest
    /// through serde.
    fn route(
        &mut self,
        item: &Spanned<DeValue<'_>>,
        key: &str,
    ) -> Option<(RawRoute, Option<Pattern>, Range<usize>, serde_json::Value)> {
        let DeValue::Table(table) = item.get_ref() else {
            self.error(Some(item.span()), key, "a route must be a table");
            return None;
        };
        let mut rest = DeTable::new();
        let mut pattern = Some(Pattern::match_all());
        let mut match_json = serde_json::json!({});
        for (k, v) in table.iter() {
            if k.get_ref().as_ref() == "match" {
                match_json = devalue_to_json(v.get_ref());
                pattern = match Pattern::compile(v) {
                    Ok(p) => Some(p),
                    Err(errs) => {
                        for e in errs {
                            let key = if e.path.is_empty() {
                                format!("{key}.match")
                            } else {
                                format!("{key}.match.{}", e.path)
                            };
                            self.error(Some(e.span), key, e.message);
                        }
                        None
                    }
                };
            } else {
                rest.insert(k.clone(), v.clone());
            }
        }
        let raw = self.raw::<RawRoute>(Spanned::new(item.span(), DeValue::Table(rest)), key)?;
        Some((raw, pattern, item.span(), match_json))
    }

    fn server(&mut self, raw: RawServer) -> Option<(ServerConfig, usize)> {
        let listen = match &raw.listen {
            None => Some(SocketAddr::from(([127, 0, 0, 1], 8080))),
            Some(l) => match l.get_ref().parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    self.error(
                        Some(l.span()),
                        "server.listen",
                        format!(
                            "`{}` is not an address:port, e.g. \"127.0.0.1:8080\"",
                            l.get_ref()
                        ),
                    );
                    None
                }
            },
        };
        let admin_listen = match &raw.admin_listen {
            None => Some(None),
            Some(l) => match l.get_ref().parse::<SocketAddr>() {
                Ok(a) => Some(Some(a)),
                Err(_) => {
                    self.error(
                        Some(l.span()),
                        "server.admin_listen",
                        format!(
                            "`{}` is not an address:port, e.g. \"127.0.0.1:9090\"",
                            l.get_ref()
                        ),
                    );
                    None
                }
            },
        };
        let data_dir = raw
            .data_dir
            .as_ref()
            .map_or_else(|| self.base.join("data"), |d| self.base.join(d.get_ref()));
        let build_dir = raw.build_dir.as_ref().map(|d| self.base.join(d.get_ref()));
        let max_body = match &raw.max_body {
            None => Some(DEFAULT_MAX_BODY),
            Some(s) => self.size(s, "server.max_body"),
        };
        let workers = match &raw.workers {
            None => Some(default_workers()),
            Some(w) if (1..=4096).contains(w.get_ref()) => Some(*w.get_ref() as usize),
            Some(w) => {
                self.error(
                    Some(w.span()),
                    "server.workers",
                    "`workers` must be between 1 and 4096",
                );
                None
            }
        };
        let retention = match &raw.retention {
            None => Some(Duration::from_secs(7 * 24 * 3600)),
            Some(d) => self.duration(d, "server.retention"),
        };
        let shutdown_grace = match &raw.shutdown_grace {
            None => Some(Duration::from_secs(10)),
            Some(d) => self.duration(d, "server.shutdown_grace"),
        };
        let max_concurrency = match &raw.max_concurrency {
            None => Some(1024),
            Some(n) => self.count(n, "server.max_concurrency"),
        };
        let idle_background = match &raw.background_priority {
            None => true,
            Some(p) => match p.get_ref().as_str() {
                "idle" => true,
                "normal" => false,
                other => {
                    self.error(
                        Some(p.span()),
                        "server.background_priority",
                        format!(
                            "unknown priority `{other}`; expected \"idle\" (the default) or \"normal\""
                        ),
                    );
                    true
                }
            },
        };
        let max_hops = match &raw.max_hops {
            None => Some(crate::runtime::DEFAULT_MAX_HOPS),
            Some(n) => self.count(n, "server.max_hops").map(|n| n as u32),
        };
        let header_timeout = match &raw.header_timeout {
            None => Some(Duration::from_secs(10)),
            Some(d) => self.duration(d, "server.header_timeout"),
        };
        let body_timeout = match &raw.body_timeout {
            None => Some(Duration::from_secs(30)),
            Some(d) => self.duration(d, "server.body_timeout"),
        };
        Some((
            ServerConfig {
                listen: listen?,
                admin_listen: admin_listen?,
                data_dir,
                build_dir,
                workers: workers?,
                retention: retention?,
                shutdown_grace: shutdown_grace?,
                fsync: raw.fsync.as_ref().is_none_or(|f| *f.get_ref()),
                idle_background,
                max_concurrency: max_concurrency?,
                max_hops: max_hops?,
                header_timeout: header_timeout?,
                body_timeout: body_timeout?,
            },
            max_body?,
        ))
    }

    fn size(&mut self, s: &Spanned<String>, key: &str) -> Option<usize> {
        match s.get_ref().trim().parse::<bytesize::ByteSize>() {
            Ok(b) if b.as_u64() > 0 => Some(b.as_u64() as usize),
            _ => {
                self.error(
                    Some(s.span()),
                    key,
                    format!(
                        "`{}` is not a size, e.g. \"1MiB\" or \"512KiB\"",
                        s.get_ref()
                    ),
                );
                None
            }
        }
    }

    fn duration(&mut self, s: &Spanned<String>, key: &str) -> Option<Duration> {
        match humantime::parse_duration(s.get_ref().trim()) {
            Ok(d) if !d.is_zero() => Some(d),
            _ => {
                self.error(
                    Some(s.span()),
                    key,
                    format!(
                        "`{}` is not a duration, e.g. \"200ms\", \"5s\" or \"1m\"",
                        s.get_ref()
                    ),
                );
                None
            }
        }
    }

    fn name(&mut self, name: &Spanned<String>, key: &str, seen: &mut BTreeMap<String, ()>) -> bool {
        let n = name.get_ref();
        let valid = !n.is_empty()
            && n.len() <= 64
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !valid {
            self.error(
                Some(name.span()),
                key,
                format!("name `{n}` must be 1–64 characters of letters, digits, `-`, `_` or `.`"),
            );
            return false;
        }
        if seen.insert(n.clone(), ()).is_some() {
            self.error(Some(name.span()), key, format!("`{n}` is declared twice"));
            return false;
        }
        true
    }

    fn field_from(
        &mut self,
        header: &Option<Spanned<String>>,
        pointer: &Option<Spanned<String>>,
        key: &str,
        what: &str,
    ) -> Option<FieldFrom> {
        match (header, pointer) {
            (Some(h), Some(_)) => {
                self.error(
                    Some(h.span()),
                    format!("{key}.{what}_header"),
                    format!("set either `{what}_header` or `{what}_pointer`, not both"),
                );
                None
            }
            (Some(h), None) => {
                let name = h.get_ref().trim();
                if name.is_empty() || axum::http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    self.error(
                        Some(h.span()),
                        format!("{key}.{what}_header"),
                        format!("`{name}` is not an HTTP header name"),
                    );
                    return None;
                }
                Some(FieldFrom::Header(name.to_ascii_lowercase()))
            }
            (None, Some(p)) => {
                let ptr = p.get_ref();
                if !ptr.starts_with('/') {
                    self.error(
                        Some(p.span()),
                        format!("{key}.{what}_pointer"),
                        format!(
                            "`{ptr}` is not a JSON pointer; it starts with `/`, e.g. \"/kind\""
                        ),
                    );
                    return None;
                }
                Some(FieldFrom::Pointer(ptr.clone()))
            }
            (None, None) => None,
        }
    }

    fn sources(
        &mut self,
        raw: Vec<RawSource>,
        default_max_body: Option<usize>,
    ) -> BTreeMap<String, SourceConfig> {
        let mut seen = BTreeMap::new();
        let mut out = BTreeMap::new();
        for (i, s) in raw.into_iter().enumerate() {
            let key = format!("sources[{i}]");
            let named = self.name(&s.name, &format!("{key}.name"), &mut seen);
            let type_from = self.field_from(&s.type_header, &s.type_pointer, &key, "type");
            let subject_from =
                self.field_from(&s.subject_header, &s.subject_pointer, &key, "subject");
            let max_body = match &s.max_body {
                Some(m) => self.size(m, &format!("{key}.max_body")),
                None => default_max_body,
            };
            let dedup_from = self.field_from(&s.dedup_header, &s.dedup_pointer, &key, "dedup");
            let dedup_window = match &s.dedup_window {
                Some(d) => self.duration(d, &format!("{key}.dedup_window")),
                None => Some(DEFAULT_DEDUP_WINDOW),
            };
            let verify = s
                .verify
                .as_ref()
                .and_then(|v| self.verify(v, &format!("{key}.verify")));
            let rate_limit = s.rate_limit.as_ref().and_then(|r| {
                let per_second = self.count(
                    &r.get_ref().per_second,
                    &format!("{key}.rate_limit.per_second"),
                )?;
                let burst = match &r.get_ref().burst {
                    Some(b) => self.count(b, &format!("{key}.rate_limit.burst"))?,
                    None => per_second,
                };
                Some((per_second as u32, burst as u32))
            });
            let max_concurrency = s
                .max_concurrency
                .as_ref()
                .and_then(|n| self.count(n, &format!("{key}.max_concurrency")));
            let mut content_types = Vec::new();
            for ct in s.content_types.iter().flat_map(|l| l.get_ref()) {
                let t = ct.get_ref().trim().to_ascii_lowercase();
                let valid = t.split_once('/').is_some_and(|(a, b)| {
                    !a.is_empty() && !b.is_empty() && !t.contains([';', ' ', ','])
                });
                if valid {
                    content_types.push(t);
                } else {
                    self.error(
                        Some(ct.span()),
                        format!("{key}.content_types"),
                        format!("`{}` is not a media type like \"text/plain\"", ct.get_ref()),
                    );
                }
            }
            if named {
                let name = s.name.into_inner();
                out.insert(
                    name.clone(),
                    SourceConfig {
                        name,
                        type_from,
                        subject_from,
                        max_body: max_body.unwrap_or(DEFAULT_MAX_BODY),
                        dedup_from,
                        dedup_window: dedup_window.unwrap_or(DEFAULT_DEDUP_WINDOW),
                        verify,
                        rate_limit,
                        max_concurrency,
                        content_types,
                    },
                );
            }
        }
        out
    }

    fn plugins(&mut self, raw: Vec<RawPlugin>) -> BTreeMap<String, PluginConfig> {
        let mut seen = BTreeMap::new();
        let mut out = BTreeMap::new();
        for (i, p) in raw.into_iter().enumerate() {
            let key = format!("plugins[{i}]");
            self.declared_plugins.insert(p.name.get_ref().clone());
            let named = self.name(&p.name, &format!("{key}.name"), &mut seen);
            let path = self.base.join(p.wasm.get_ref());
            let wasm = if path.is_dir() {
                if path.join("Cargo.toml").is_file() {
                    Some(WasmSource::Crate(path))
                } else {
                    self.error(
                        Some(p.wasm.span()),
                        format!("{key}.wasm"),
                        format!("{} is a folder without a Cargo.toml: expected a plugin crate or a .wasm file", path.display()),
                    );
                    None
                }
            } else if path.is_file() {
                Some(WasmSource::File(path))
            } else {
                self.error(
                    Some(p.wasm.span()),
                    format!("{key}.wasm"),
                    format!(
                        "{} does not exist: expected a plugin crate or a .wasm file",
                        path.display()
                    ),
                );
                None
            };
            let mut limits = Limits::default();
            if let Some(t) = &p.timeout {
                limits.timeout = self
                    .duration(t, &format!("{key}.timeout"))
                    .unwrap_or(limits.timeout);
            }
            if let Some(m) = &p.memory
                && let Some(bytes) = self.size(m, &format!("{key}.memory"))
            {
                if bytes as u64 > MAX_PLUGIN_MEMORY {
                    self.error(
                        Some(m.span()),
                        format!("{key}.memory"),
                        format!(
                            "`memory` is at most {}",
                            crate::runtime::format_bytes(MAX_PLUGIN_MEMORY)
                        ),
                    );
                } else {
                    limits.memory = bytes as u64;
                }
            }
            if let Some(q) = &p.kv_quota
                && let Some(bytes) = self.size(q, &format!("{key}.kv_quota"))
            {
                limits.kv_quota = bytes as u64;
            }
            if let Some(f) = &p.fuel {
                if *f.get_ref() >= 1 {
                    limits.fuel = Some(*f.get_ref() as u64);
                } else {
                    self.error(
                        Some(f.span()),
                        format!("{key}.fuel"),
                        "`fuel` must be at least 1 (leave it out for no fuel metering)",
                    );
                }
            }
            let max = MAX_PLUGIN_INSTANCES;
            if let Some(n) = &p.max_instances
                && let Some(n) = self.within(n, &format!("{key}.max_instances"), 1, max)
            {
                limits.max_instances = n;
            }
            if let Some(n) = &p.max_tables
                && let Some(n) = self.within(n, &format!("{key}.max_tables"), 1, max)
            {
                limits.max_tables = n;
            }
            let http = self.http_policy(&p, &key, limits.timeout);
            if let Some(i) = &p.isolation {
                match i.get_ref().as_str() {
                    "instance-per-event" => limits.isolation = Isolation::InstancePerEvent,
                    "reuse" => limits.isolation = Isolation::Reuse,
                    other => self.error(
                        Some(i.span()),
                        format!("{key}.isolation"),
                        format!(
                            "unknown isolation `{other}`; expected \"instance-per-event\" or \"reuse\""
                        ),
                    ),
                }
            }
            let config = p
                .config
                .map(
                    |c| match toml_to_json(&toml::Value::Table(c.into_inner())) {
                        serde_json::Value::Object(m) => m,
                        _ => serde_json::Map::new(),
                    },
                )
                .unwrap_or_default();
            if let (true, Some(wasm)) = (named, wasm) {
                let name = p.name.into_inner();
                out.insert(
                    name.clone(),
                    PluginConfig {
                        name,
                        wasm,
                        limits,
                        config,
                        http,
                    },
                );
            }
        }
        out
    }

    fn routes(
        &mut self,
        raw: Vec<(RawRoute, Option<Pattern>, Range<usize>, serde_json::Value)>,
        sources: &BTreeMap<String, SourceConfig>,
        plugins: &BTreeMap<String, PluginConfig>,
    ) -> RouteTable {
        let mut seen = BTreeMap::new();
        let mut table = Vec::new();
        for (i, (r, pattern, span, match_json)) in raw.into_iter().enumerate() {
            let key = format!("routes[{i}]");
            let named = self.name(&r.name, &format!("{key}.name"), &mut seen);
            if r.to.get_ref().is_empty() {
                self.error(
                    Some(r.to.span()),
                    format!("{key}.to"),
                    "`to` must name at least one plugin",
                );
            }
            let mut to = Vec::new();
            for p in r.to.get_ref() {
                // Plugins that failed validation were reported already.
                // A plugin left out for its own errors is still declared: its
                // error already says what to fix.
                if !plugins.contains_key(p.get_ref())
                    && !self.declared_plugins.contains(p.get_ref())
                {
                    self.error(
                        Some(p.span()),
                        format!("{key}.to"),
                        format!(
                            "no plugin named `{}` is declared in [[plugins]]",
                            p.get_ref()
                        ),
                    );
                } else if to.contains(p.get_ref()) {
                    self.error(
                        Some(p.span()),
                        format!("{key}.to"),
                        format!("`{}` is listed twice", p.get_ref()),
                    );
                } else {
                    to.push(p.get_ref().clone());
                }
            }
            if let Some(p) = &pattern {
                for s in p.exact_sources() {
                    // A CloudEvent keeps its own `source`, a URI reference
                    // ("/orders", "https://…"): only a bare name must be a
                    // declared webhook (a typo check).
                    let uri_like = s.contains(['/', ':']);
                    if !uri_like && !sources.contains_key(s) {
                        self.error(
                            Some(span.clone()),
                            format!("{key}.match.source"),
                            format!("no source named `{s}` is declared in [[sources]]"),
                        );
                    }
                }
            }
            let retry = r
                .retry
                .as_ref()
                .and_then(|rt| self.retry(rt, &format!("{key}.retry")));
            let order_key = r.order_key.as_ref().and_then(|k| {
                let ptr = k.get_ref();
                if ptr.starts_with('/') {
                    Some(ptr.clone())
                } else {
                    self.error(
                        Some(k.span()),
                        format!("{key}.order_key"),
                        format!(
                            "`{ptr}` is not a JSON pointer into the event; write e.g. \"/data/account\" or \"/subject\""
                        ),
                    );
                    None
                }
            });
            let concurrency = match &r.concurrency {
                None => None,
                Some(c) if (1..=4096).contains(c.get_ref()) => Some(*c.get_ref() as usize),
                Some(c) => {
                    self.error(
                        Some(c.span()),
                        format!("{key}.concurrency"),
                        "`concurrency` must be between 1 and 4096",
                    );
                    None
                }
            };
            if let (true, Some(pattern)) = (named, pattern) {
                table.push(Route {
                    name: r.name.into_inner(),
                    pattern,
                    to,
                    retry: retry.unwrap_or_default(),
                    order_key,
                    concurrency,
                    match_json,
                });
            }
        }
        RouteTable::new(table)
    }

    /// A whole number in `min..=max`.
    fn within(&mut self, n: &Spanned<i64>, key: &str, min: usize, max: usize) -> Option<usize> {
        match usize::try_from(*n.get_ref()) {
            Ok(v) if (min..=max).contains(&v) => Some(v),
            _ => {
                self.error(
                    Some(n.span()),
                    key,
                    format!(
                        "`{}` must be between {min} and {max}",
                        key.rsplit('.').next().unwrap_or(key)
                    ),
                );
                None
            }
        }
    }

    /// A plugin's `allow_http` and `http_timeout`; `timeout` is its
    /// delivery deadline, which a request may not outlast.
    fn http_policy(&mut self, p: &RawPlugin, key: &str, timeout: Duration) -> HttpPolicy {
        let mut allow = Vec::new();
        for entry in p.allow_http.iter().flat_map(|l| l.get_ref()) {
            match entry.get_ref().parse::<HostPattern>() {
                Ok(pattern) => allow.push(pattern),
                Err(e) => self.error(
                    Some(entry.span()),
                    format!("{key}.allow_http"),
                    format!(
                        "`{}` is not a host pattern (\"host[:port]\" or \"*.domain[:port]\"): {e}",
                        entry.get_ref()
                    ),
                ),
            }
        }
        let timeout = match &p.http_timeout {
            None => DEFAULT_HTTP_TIMEOUT.min(timeout),
            Some(t) => match self.duration(t, &format!("{key}.http_timeout")) {
                Some(d) if d > timeout => {
                    self.error(
                        Some(t.span()),
                        format!("{key}.http_timeout"),
                        format!(
                            "`http_timeout` must not be longer than the plugin's `timeout` ({})",
                            humantime::format_duration(timeout)
                        ),
                    );
                    timeout
                }
                Some(d) => d,
                None => timeout,
            },
        };
        HttpPolicy { allow, timeout }
    }

    /// A positive count (1 to 1,000,000).
    fn count(&mut self, n: &Spanned<i64>, key: &str) -> Option<usize> {
        if (1..=1_000_000).contains(n.get_ref()) {
            Some(*n.get_ref() as usize)
        } else {
            self.error(
                Some(n.span()),
                key,
                format!(
                    "`{}` must be between 1 and 1000000",
                    key.rsplit('.').next().unwrap_or(key)
                ),
            );
            None
        }
    }

    fn verify(&mut self, raw: &Spanned<raw::RawVerify>, key: &str) -> Option<VerifyConfig> {
        let v = raw.get_ref();
        let scheme = match v.scheme.get_ref().as_str() {
            "standard-webhooks" => Some(VerifyScheme::StandardWebhooks),
            "github" => Some(VerifyScheme::Github),
            "stripe" => Some(VerifyScheme::Stripe),
            "bearer" => Some(VerifyScheme::Bearer),
            other => {
                self.error(
                    Some(v.scheme.span()),
                    format!("{key}.scheme"),
                    format!(
                        "unknown scheme `{other}`; expected \"standard-webhooks\", \"github\", \"stripe\" or \"bearer\""
                    ),
                );
                None
            }
        };
        let names: Option<Vec<String>> = match v.secret_env.get_ref() {
            toml::Value::String(s) => Some(vec![s.clone()]),
            toml::Value::Array(items) => items
                .iter()
                .map(|i| i.as_str().map(str::to_string))
                .collect(),
            _ => None,
        };
        let valid_name =
            |n: &str| !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        let secret_env = match names {
            Some(n) if !n.is_empty() && n.iter().all(|n| valid_name(n)) => Some(n),
            _ => {
                self.error(
                    Some(v.secret_env.span()),
                    format!("{key}.secret_env"),
                    "`secret_env` names an environment variable (e.g. \"SHOP_WEBHOOK_SECRET\") or a list of them; the secret itself never goes in this file",
                );
                None
            }
        };
        let tolerance = match &v.tolerance {
            Some(t) => self.duration(t, &format!("{key}.tolerance")),
            None => Some(Duration::from_secs(300)),
        };
        Some(VerifyConfig {
            scheme: scheme?,
            secret_env: secret_env?,
            tolerance: tolerance?,
        })
    }

    fn retry(&mut self, raw: &Spanned<RawRetry>, key: &str) -> Option<RetryPolicy> {
        let mut policy = RetryPolicy::default();
        let r = raw.get_ref();
        if let Some(a) = &r.attempts {
            if (1..=1000).contains(a.get_ref()) {
                policy.attempts = *a.get_ref() as u32;
            } else {
                self.error(
                    Some(a.span()),
                    format!("{key}.attempts"),
                    "`attempts` must be between 1 and 1000",
                );
            }
        }
        if let Some(b) = &r.backoff {
            policy.backoff = match b.get_ref().as_str() {
                "exponential" => Backoff::Exponential,
                "fixed" => Backoff::Fixed,
                other => {
                    self.error(
                        Some(b.span()),
                        format!("{key}.backoff"),
                        format!("unknown backoff `{other}`; expected \"exponential\" or \"fixed\""),
                    );
                    Backoff::Exponential
                }
            };
        }
        if let Some(d) = &r.initial {
            policy.initial = self
                .duration(d, &format!("{key}.initial"))
                .unwrap_or(policy.initial);
        }
        if let Some(d) = &r.max {
            policy.max = self
                .duration(d, &format!("{key}.max"))
                .unwrap_or(policy.max);
        }
        if let Some(d) = &r.max_age {
            policy.max_age = self
                .duration(d, &format!("{key}.max_age"))
                .unwrap_or(policy.max_age);
        }
        if policy.max < policy.initial {
            self.error(
                Some(raw.span()),
                key,
                "`max` must not be shorter than `initial`",
            );
        }
        Some(policy)
    }
}

fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()) * 8
}

/// Removes, anywhere in `value`, the table entry whose key has `span`;
/// returns the dotted path of the removed key.
fn remove_key_at(value: &mut DeValue<'_>, span: &Range<usize>) -> Option<String> {
    match value {
        DeValue::Table(t) => {
            let found = t
                .iter()
                .find(|(k, _)| k.span() == *span)
                .map(|(k, _)| k.get_ref().to_string());
            if let Some(k) = found {
                t.remove(k.as_str());
                return Some(k);
            }
            t.iter_mut().find_map(|(k, v)| {
                remove_key_at(v.get_mut(), span).map(|path| format!("{}.{path}", k.get_ref()))
            })
        }
        DeValue::Array(items) => items
            .iter_mut()
            .enumerate()
            .find_map(|(i, v)| remove_key_at(v.get_mut(), span).map(|p| format!("[{i}].{p}"))),
        _ => None,
    }
}

fn devalue_to_json(v: &DeValue<'_>) -> serde_json::Value {
    match v {
        DeValue::String(s) => serde_json::Value::String(s.to_string()),
        DeValue::Integer(i) => i
            .as_str()
            .replace('_', "")
            .parse::<i64>()
            .map(Into::into)
            .unwrap_or(serde_json::Value::Null),
        DeValue::Float(f) => f
            .as_str()
            .replace('_', "")
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map_or(serde_json::Value::Null, serde_json::Value::Number),
        DeValue::Boolean(b) => (*b).into(),
        DeValue::Datetime(d) => d.to_string().into(),
        DeValue::Array(items) => items.iter().map(|i| devalue_to_json(i.get_ref())).collect(),
        DeValue::Table(t) => serde_json::Value::Object(
            t.iter()
                .map(|(k, v)| (k.get_ref().to_string(), devalue_to_json(v.get_ref())))
                .collect(),
        ),
    }
}

fn toml_to_json(v: &toml::Value) -> serde_json::Value {
    match v {
        toml::Value::String(s) => s.clone().into(),
        toml::Value::Integer(i) => (*i).into(),
        toml::Value::Float(f) => serde_json::Number::from_f64(*f)
            .map_or(serde_json::Value::Null, serde_json::Value::Number),
        toml::Value::Boolean(b) => (*b).into(),
        toml::Value::Datetime(d) => d.to_string().into(),
        toml::Value::Array(a) => a.iter().map(toml_to_json).collect(),
        toml::Value::Table(t) => serde_json::Value::Object(
            t.iter()
                .map(|(k, v)| (k.clone(), toml_to_json(v)))
                .collect(),
        ),
    }
}

#[cfg(test)]
mod http_tests {
    use super::*;

    fn plugin(extra: &str) -> Result<Config, ConfigErrors> {
        let wasm = concat!(env!("CARGO_MANIFEST_DIR"), "/../plugins/audit");
        let text = format!("[[plugins]]\nname = \"p\"\nwasm = \"{wasm}\"\n{extra}\n");
        parse(Path::new("rules.toml"), &text)
    }

    #[test]
    fn background_threads_are_idle_unless_told_normal() {
        let server = |extra: &str| parse(Path::new("rules.toml"), &format!("[server]\n{extra}\n"));
        assert!(server("").unwrap().server.idle_background);
        assert!(
            server("background_priority = \"idle\"")
                .unwrap()
                .server
                .idle_background
        );
        assert!(
            !server("background_priority = \"normal\"")
                .unwrap()
                .server
                .idle_background
        );
        let nats = parse(
            Path::new("rules.toml"),
            "[server]\nbackground_priority = \"normal\"\n[engine]\nkind = \"nats\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            nats.contains("applies only to the embedded engine")
                && nats.contains("server.background_priority"),
            "{nats}"
        );
        let e = server("background_priority = \"high\"")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown priority `high`") && e.contains("server.background_priority"),
            "{e}"
        );
    }

    #[test]
    fn allow_http_and_http_timeout_make_the_plugins_policy() {
        let c = plugin(
            "timeout = \"5s\"\nallow_http = [\"hooks.example.com\", \"*.example.org:8443\"]\nhttp_timeout = \"2s\"",
        )
        .unwrap();
        let http = &c.plugins["p"].http;
        let shown: Vec<String> = http.allow.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["hooks.example.com", "*.example.org:8443"]);
        assert_eq!(http.timeout, Duration::from_secs(2));
    }

    #[test]
    fn without_allow_http_there_is_none_and_the_timeout_follows_the_deadline() {
        let c = plugin("").unwrap();
        assert!(c.plugins["p"].http.allow.is_empty());
        // The default 10 s, lowered to the default delivery timeout of 1 s.
        assert_eq!(c.plugins["p"].http.timeout, Duration::from_secs(1));
        let c = plugin("timeout = \"1m\"").unwrap();
        assert_eq!(c.plugins["p"].http.timeout, Duration::from_secs(10));
    }

    #[test]
    fn bad_entries_and_timeouts_are_reported_at_their_place() {
        let e = plugin(
            "allow_http = [\"ok.example.com\", \"https://x.com\", \"*\"]\nhttp_timeout = \"5s\"",
        )
        .unwrap_err();
        let lines: Vec<String> = e.to_string().lines().map(str::to_string).collect();
        assert_eq!(lines.len(), 3, "{e}");
        assert!(
            lines[0].starts_with(
                "rules.toml:4:33: `https://x.com` is not a host pattern (\"host[:port]\" or \"*.domain[:port]\"): write the host without a scheme"
            ),
            "{}",
            lines[0]
        );
        assert!(
            lines[0].ends_with("(key `plugins[0].allow_http`)"),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].contains("4:50: `*` is not a host pattern"),
            "{}",
            lines[1]
        );
        assert!(
            lines[1].contains("`*` alone would allow every host"),
            "{}",
            lines[1]
        );
        assert_eq!(
            lines[2],
            "rules.toml:5:16: `http_timeout` must not be longer than the plugin's `timeout` (1s) (key `plugins[0].http_timeout`)"
        );
    }
}
