//! `rules.toml` as written: serde types that keep spans, reject unknown keys,
//! and check nothing else. `super::validate` turns them into a `Config`.
//! The doc comments double as the descriptions in `docs/rules.schema.json`.

use schemars::JsonSchema;
use serde::Deserialize;
use toml::Spanned;

/// `[server]`: where the router listens and keeps its data.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// Address and port to listen on, e.g. "127.0.0.1:8080" (the default).
    #[schemars(with = "Option<String>")]
    pub listen: Option<Spanned<String>>,
    /// A separate address for the admin API (`/api/...`), e.g.
    /// "127.0.0.1:9090": the main listener then serves only webhooks and
    /// health checks.
    #[schemars(with = "Option<String>")]
    pub admin_listen: Option<Spanned<String>>,
    /// Folder of the journal and the compiled-plugin cache, relative to this
    /// file (default "data").
    #[schemars(with = "Option<String>")]
    pub data_dir: Option<Spanned<String>>,
    /// Cargo target folder for plugin crates (default "<data_dir>/build").
    #[schemars(with = "Option<String>")]
    pub build_dir: Option<Spanned<String>>,
    /// Default body limit of every source, e.g. "1MiB" (the default).
    #[schemars(with = "Option<String>")]
    pub max_body: Option<Spanned<String>>,
    /// Deliveries running at once (default 8 per CPU).
    #[schemars(with = "Option<u32>", range(min = 1, max = 4096))]
    pub workers: Option<Spanned<i64>>,
    /// How long accepted events stay in the journal for replay, e.g. "7d"
    /// (the default). Events with dead letters or unfinished deliveries stay
    /// until those are done.
    #[schemars(with = "Option<String>")]
    pub retention: Option<Spanned<String>>,
    /// On SIGTERM/SIGINT, how long in-flight deliveries may take to finish,
    /// e.g. "10s" (the default).
    #[schemars(with = "Option<String>")]
    pub shutdown_grace: Option<Spanned<String>>,
    /// Whether each journal commit waits for the disk (default true). `false`
    /// is for benchmarks only: a crash may lose events already answered 202.
    #[schemars(with = "Option<bool>")]
    pub fsync: Option<Spanned<bool>>,
    /// CPU priority of the embedded store's background threads (fjall's
    /// flushes and compactions, the memtable reaper): "idle" (the default)
    /// runs them only on CPU time that nothing else wants, so their bursts do
    /// not hold up answers; "normal" where the machine is shared with busy
    /// work of ordinary priority, beside which idle threads fall behind and
    /// ingest slows to their pace. The embedded engine only: an error with
    /// `[engine] kind = "nats"`.
    #[schemars(with = "Option<BackgroundPriority>")]
    pub background_priority: Option<Spanned<String>>,
    /// Webhook requests handled at once; more are answered 503 at once (load
    /// shedding) rather than queued (default 1024).
    #[schemars(with = "Option<u32>", range(min = 1, max = 1000000))]
    pub max_concurrency: Option<Spanned<i64>>,
    /// How many times a chain of plugins may emit derived events from one
    /// webhook event (default 8); an emit beyond that dead-letters the delivery
    /// that tried it, which ends loops of plugins emitting each other's events.
    #[schemars(with = "Option<u32>", range(min = 1, max = 1000000))]
    pub max_hops: Option<Spanned<i64>>,
    /// How long a client may take to send its request headers, e.g. "10s"
    /// (the default): slow senders are cut off.
    #[schemars(with = "Option<String>")]
    pub header_timeout: Option<Spanned<String>>,
    /// How long a client may take to send its body, e.g. "30s" (the
    /// default); answered 408.
    #[schemars(with = "Option<String>")]
    pub body_timeout: Option<Spanned<String>>,
}

/// `[telemetry]`: where traces go.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawTelemetry {
    /// OTLP/HTTP collector base URL, e.g. "http://127.0.0.1:4318": spans go to
    /// `<url>/v1/traces` (protobuf). Without it, no spans are exported (events
    /// still carry their `traceparent`). Read at start; a reload keeps it.
    #[schemars(with = "Option<String>")]
    pub otlp_endpoint: Option<Spanned<String>>,
    /// The `service.name` of exported spans (default "switchyard").
    #[schemars(with = "Option<String>")]
    pub service_name: Option<Spanned<String>>,
}

/// `[engine]`: where events, deliveries, dedup and plugin kv are kept.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawEngine {
    /// "embedded" (the default: one store in `data_dir`) or "nats" (NATS
    /// JetStream, shared by several hosts).
    #[schemars(with = "Option<String>", regex(pattern = r"^(embedded|nats)$"))]
    pub kind: Option<Spanned<String>>,
    /// With "nats": the server URL(s), comma-separated, e.g.
    /// "nats://127.0.0.1:4222" (the default). Credentials come from the
    /// environment: SWITCHYARD_NATS_TOKEN, or SWITCHYARD_NATS_USER and
    /// SWITCHYARD_NATS_PASSWORD.
    #[schemars(with = "Option<String>")]
    pub url: Option<Spanned<String>>,
    /// With "nats": the name of the events stream (default "SWITCHYARD"); the
    /// dead-letter stream, consumers and kv buckets are named after it.
    #[schemars(with = "Option<String>", regex(pattern = r"^[A-Za-z0-9_-]{1,32}$"))]
    pub stream: Option<Spanned<String>>,
    /// With "nats": replicas of every stream and bucket (default 1; 3 on a
    /// cluster so that losing a server loses nothing).
    #[schemars(with = "Option<u32>", range(min = 1, max = 5))]
    pub replicas: Option<Spanned<i64>>,
}

/// `[[sources]]`: a webhook, `POST /webhooks/<name>`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    /// The source's name: the last part of its URL, and the events' `source`.
    #[schemars(with = "String", regex(pattern = r"^[A-Za-z0-9._-]{1,64}$"))]
    pub name: Spanned<String>,
    /// Take the event type from this request header, e.g. "X-GitHub-Event".
    #[schemars(with = "Option<String>")]
    pub type_header: Option<Spanned<String>>,
    /// Take the event type from this JSON pointer into the body, e.g. "/type".
    #[schemars(with = "Option<String>")]
    pub type_pointer: Option<Spanned<String>>,
    /// Take the event subject from this request header.
    #[schemars(with = "Option<String>")]
    pub subject_header: Option<Spanned<String>>,
    /// Take the event subject from this JSON pointer into the body.
    #[schemars(with = "Option<String>")]
    pub subject_pointer: Option<Spanned<String>>,
    /// Largest body accepted, e.g. "256KiB" (default: `[server] max_body`).
    #[schemars(with = "Option<String>")]
    pub max_body: Option<Spanned<String>>,
    /// Deduplicate on this request header, e.g. "webhook-id",
    /// "X-GitHub-Delivery" or "Idempotency-Key": a repeat within
    /// `dedup_window` is answered with the first event's id and stored once.
    /// A request without the header is not deduplicated.
    #[schemars(with = "Option<String>")]
    pub dedup_header: Option<Spanned<String>>,
    /// Deduplicate on the string at this JSON pointer into the body, e.g. "/id".
    #[schemars(with = "Option<String>")]
    pub dedup_pointer: Option<Spanned<String>>,
    /// How long an idempotency key is remembered, e.g. "24h" (the default).
    #[schemars(with = "Option<String>")]
    pub dedup_window: Option<Spanned<String>>,
    /// Verify each request's signature or token before accepting it (401 if
    /// it fails).
    #[schemars(with = "Option<RawVerify>")]
    pub verify: Option<Spanned<RawVerify>>,
    /// Requests per second this source accepts (a token bucket); more are
    /// answered 429 with `Retry-After`.
    #[schemars(with = "Option<RawRateLimit>")]
    pub rate_limit: Option<Spanned<RawRateLimit>>,
    /// Requests of this source handled at once; more are answered 503.
    #[schemars(with = "Option<u32>", range(min = 1, max = 1000000))]
    pub max_concurrency: Option<Spanned<i64>>,
    /// Non-JSON media types this source also accepts, e.g. ["text/plain",
    /// "application/x-www-form-urlencoded"]: the body is passed on as bytes
    /// with its content type (JSON is always accepted).
    #[schemars(with = "Option<Vec<String>>")]
    pub content_types: Option<Spanned<Vec<Spanned<String>>>>,
}

/// A source's rate limit.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    /// Sustained requests per second.
    #[schemars(with = "u32", range(min = 1))]
    pub per_second: Spanned<i64>,
    /// Requests accepted at once after a quiet period (default: `per_second`).
    #[schemars(with = "Option<u32>", range(min = 1))]
    pub burst: Option<Spanned<i64>>,
}

/// A source's request verification. Secrets are never written in the file:
/// it names the environment variables that hold them.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawVerify {
    /// "standard-webhooks" (`webhook-signature`, v1 HMAC `whsec_...` or v1a
    /// ed25519 `whpk_...`), "github" (`X-Hub-Signature-256`), "stripe"
    /// (`Stripe-Signature`) or "bearer" (`Authorization: Bearer`).
    #[schemars(with = "VerifySchemeName")]
    pub scheme: Spanned<String>,
    /// The environment variable holding the secret, or several (new first)
    /// while rotating: a request signed with any of them passes.
    #[schemars(with = "SecretEnv")]
    pub secret_env: Spanned<toml::Value>,
    /// How far a signed timestamp may be from now, e.g. "5m" (the default).
    #[schemars(with = "Option<String>")]
    pub tolerance: Option<Spanned<String>>,
}

/// The verification schemes.
#[derive(JsonSchema)]
#[serde(rename_all = "kebab-case")]
#[allow(dead_code)]
enum VerifySchemeName {
    StandardWebhooks,
    Github,
    Stripe,
    Bearer,
}

/// One variable name, or a list of them.
#[derive(JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)]
enum SecretEnv {
    One(String),
    Many(Vec<String>),
}

/// `[[plugins]]`: a consumer plugin (a WebAssembly component).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawPlugin {
    /// The plugin's name, used by routes' `to` and as its kv namespace.
    #[schemars(with = "String", regex(pattern = r"^[A-Za-z0-9._-]{1,64}$"))]
    pub name: Spanned<String>,
    /// A plugin crate folder (built for wasm32-wasip2 on start) or a .wasm file,
    /// relative to this file.
    #[schemars(with = "String")]
    pub wasm: Spanned<String>,
    /// Wall-clock deadline per delivery, e.g. "200ms" (default "1s").
    #[schemars(with = "Option<String>")]
    pub timeout: Option<Spanned<String>>,
    /// Linear memory cap, e.g. "32MiB" (default "64MiB", at most "1GiB").
    #[schemars(with = "Option<String>")]
    pub memory: Option<Spanned<String>>,
    /// The most the plugin's kv may hold, keys and values, e.g. "16MiB"
    /// (default "64MiB"); a write beyond it fails with a clear error.
    #[schemars(with = "Option<String>")]
    pub kv_quota: Option<Spanned<String>>,
    /// Fuel per delivery, about one unit per wasm instruction, e.g.
    /// 1_000_000_000: a delivery that uses it up fails ("fuel limit of N
    /// exhausted"). A CPU budget that, unlike `timeout`, does not depend on
    /// the machine's load. Default: no metering (it slows CPU-bound plugin
    /// code by about a fifth, so only plugins that set it pay for it).
    #[schemars(with = "Option<u64>", range(min = 1))]
    pub fuel: Option<Spanned<i64>>,
    /// Most core wasm instances (each with at most one memory) one delivery
    /// may create (default 16; a Rust plugin needs a few).
    #[schemars(with = "Option<u32>", range(min = 1, max = 1000))]
    pub max_instances: Option<Spanned<i64>>,
    /// Most wasm tables one delivery may create (default 16).
    #[schemars(with = "Option<u32>", range(min = 1, max = 1000))]
    pub max_tables: Option<Spanned<i64>>,
    /// "instance-per-event" (the default): every delivery in a fresh
    /// instance, so nothing in the plugin's memory carries over between
    /// events. "reuse": instances are kept and called again (several times
    /// cheaper per event; statics and heap carry over, host state does not;
    /// an instance that trapped is discarded).
    #[schemars(with = "Option<IsolationName>")]
    pub isolation: Option<Spanned<String>>,
    /// Values handed to the plugin (`switchyard_sdk::config`).
    #[schemars(with = "Option<serde_json::Map<String, serde_json::Value>>")]
    pub config: Option<Spanned<toml::Table>>,
    /// Hosts the plugin may send HTTP requests to (`wasi:http`): "host",
    /// "host:port", "*.domain" (every subdomain, not the domain itself) or
    /// "*.domain:port". Without a port, only the scheme's default (80 or
    /// 443). Without `allow_http`, no requests at all.
    #[schemars(with = "Option<Vec<String>>")]
    pub allow_http: Option<Spanned<Vec<Spanned<String>>>>,
    /// Connect, first-byte and between-bytes timeout of each HTTP request,
    /// e.g. "2s" (default "10s" or `timeout` if shorter; at most `timeout`).
    #[schemars(with = "Option<String>")]
    pub http_timeout: Option<Spanned<String>>,
}

/// How a plugin's deliveries are kept apart.
#[derive(JsonSchema)]
#[serde(rename_all = "kebab-case")]
#[allow(dead_code)]
enum IsolationName {
    InstancePerEvent,
    Reuse,
}

/// `[[routes]]`: which events go to which plugins. Its `match` table is
/// compiled by `rules::Pattern` from the spanned document itself, so it is not
/// a field here (see `RawRouteSchema`).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// The route's name.
    #[schemars(with = "String", regex(pattern = r"^[A-Za-z0-9._-]{1,64}$"))]
    pub name: Spanned<String>,
    /// The plugins every matching event is delivered to (fan-out).
    #[schemars(with = "Vec<String>", length(min = 1))]
    pub to: Spanned<Vec<Spanned<String>>>,
    /// How a failed delivery is retried.
    #[schemars(with = "Option<RawRetry>")]
    pub retry: Option<Spanned<RawRetry>>,
    /// A JSON pointer into the event envelope, e.g. "/data/account" or
    /// "/subject": deliveries with the same value run one at a time, in the
    /// order the events were accepted. Events without the value are not
    /// ordered.
    #[schemars(with = "Option<String>")]
    pub order_key: Option<Spanned<String>>,
    /// Deliveries of this route running at once (default: no limit but
    /// `[server] workers`).
    #[schemars(with = "Option<u32>", range(min = 1, max = 4096))]
    pub concurrency: Option<Spanned<i64>>,
}

/// A route's retry policy.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    /// Attempts in all, the first included (default 8).
    #[schemars(with = "Option<u32>", range(min = 1, max = 1000))]
    pub attempts: Option<Spanned<i64>>,
    /// "exponential" (the default) or "fixed".
    #[schemars(with = "Option<Backoff>")]
    pub backoff: Option<Spanned<String>>,
    /// Delay before the second attempt (default "30s").
    #[schemars(with = "Option<String>")]
    pub initial: Option<Spanned<String>>,
    /// Longest delay between attempts (default "30m").
    #[schemars(with = "Option<String>")]
    pub max: Option<Spanned<String>>,
    /// Give up once this long has passed since the first attempt, e.g. "1d"
    /// (the default).
    #[schemars(with = "Option<String>")]
    pub max_age: Option<Spanned<String>>,
}

/// The CPU priority of the store's background threads.
#[derive(JsonSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
enum BackgroundPriority {
    Idle,
    Normal,
}

/// How the delay between attempts grows.
#[derive(JsonSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
enum Backoff {
    Exponential,
    Fixed,
}
