//! The `switchyard` command.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::client;
use crate::config;
use crate::server::Server;
use crate::telemetry::{self, LogFormat};

#[derive(Debug, Parser)]
#[command(
    name = "switchyard",
    version,
    about = "A serverless event router on WebAssembly"
)]
pub struct Cli {
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the router: accept webhooks, journal them, deliver them to plugins.
    Serve {
        /// The configuration file.
        #[arg(long, short, default_value = "rules.toml")]
        config: PathBuf,
        /// Listen address, overriding `[server] listen`.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Data directory, overriding `[server] data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// `serve` for plugin authors: plugin logs at debug level, and a saved
    /// change to a plugin crate rebuilds and hot-swaps it (build errors are
    /// printed; the server keeps the last good version running).
    Dev {
        /// The configuration file.
        #[arg(long, short, default_value = "rules.toml")]
        config: PathBuf,
        /// Listen address, overriding `[server] listen`.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Data directory, overriding `[server] data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Validate a configuration file and report every problem in it.
    Check {
        /// The configuration file.
        #[arg(default_value = "rules.toml")]
        file: PathBuf,
    },
    /// Show which routes an event matches, and for the others why not.
    Match {
        /// The configuration file.
        #[arg(long, short, default_value = "rules.toml")]
        config: PathBuf,
        /// The event: a CloudEvents JSON envelope, or (with --source and
        /// --type) just its data. `-` reads standard input.
        event: PathBuf,
        /// The event's source, when EVENT is only its data.
        #[arg(long, requires = "ty")]
        source: Option<String>,
        /// The event's type, when EVENT is only its data.
        #[arg(long = "type", id = "ty", requires = "source")]
        ty: Option<String>,
        /// Print `{"matched": [...], "unmatched": [{"route", "reason"}]}`.
        #[arg(long)]
        json: bool,
    },
    /// Print the JSON Schema of rules.toml (for editors).
    Schema,
    /// Create a plugin crate from a template (builds for wasm32-wasip2 and
    /// passes its test as created).
    New {
        /// The plugin's name (lower-case letters, digits, `-`, `_`).
        name: String,
        /// The folder to create it in.
        #[arg(long, default_value = "plugins")]
        dir: PathBuf,
        /// The switchyard-sdk crate to depend on, outside the Switchyard
        /// workspace (default: the one this binary was built from).
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Dead letters of a running server: list, show, redrive.
    Dlq {
        #[command(flatten)]
        server: ServerArgs,
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Deliver archived events again to the routes as they are now (marked
    /// `replayed`), with a progress bar.
    Replay {
        #[command(flatten)]
        server: ServerArgs,
        /// Events accepted from then on: RFC 3339 (2026-11-26T10:00:00Z) or
        /// a duration ago (90m, 7d).
        #[arg(long)]
        since: String,
        /// ...and before then (same forms).
        #[arg(long)]
        until: Option<String>,
        /// Only to this route (else every route the events match now).
        #[arg(long)]
        route: Option<String>,
        /// Only events of this source.
        #[arg(long)]
        source: Option<String>,
        /// Start the replay and return without waiting for it.
        #[arg(long)]
        no_wait: bool,
        /// Print the replay's final state as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Which server the admin commands talk to.
#[derive(Debug, clap::Args)]
pub struct ServerArgs {
    /// The server's base URL, e.g. http://127.0.0.1:8080 (default: the
    /// `listen` address in --config). The token, if the server needs one, is
    /// read from SWITCHYARD_ADMIN_TOKEN.
    #[arg(long, env = "SWITCHYARD_URL", global = true)]
    server: Option<String>,
    /// The configuration file to read `listen` from.
    #[arg(long, short, default_value = "rules.toml", global = true)]
    config: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum DlqAction {
    /// List dead letters, oldest first.
    List {
        /// Only this route's.
        #[arg(long)]
        route: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter with its event and every attempt (JSON).
    Show {
        /// The dead letter's id, as `list` shows it (e.g. 42-0).
        id: String,
    },
    /// Deliver dead letters again, to the plugin as it is now.
    Redrive {
        /// Dead letter ids (e.g. 42-0).
        #[arg(required_unless_present_any = ["route", "all"], conflicts_with_all = ["route", "all"])]
        ids: Vec<String>,
        /// Every dead letter of this route.
        #[arg(long, conflicts_with = "all")]
        route: Option<String>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { file } => check(&file),
        Command::Match {
            config,
            event,
            source,
            ty,
            json,
        } => match_event(&config, &event, source.zip(ty), json),
        Command::Schema => {
            print!("{}", config::schema::rules_schema_json());
            ExitCode::SUCCESS
        }
        Command::New { name, dir, sdk } => {
            match crate::scaffold::new_plugin(&name, &dir, sdk.as_deref()) {
                Ok(created) => {
                    let d = created.dir.display();
                    println!("created plugin crate {d}");
                    if !created.in_workspace {
                        println!("  (a crate of its own: it depends on switchyard-sdk by path)");
                    }
                    println!("next:");
                    println!(
                        "  cd {d} && cargo test           # its test, natively on the mock host"
                    );
                    println!(
                        "  add the [[plugins]] and [[routes]] from {d}/README.md to rules.toml"
                    );
                    println!(
                        "  switchyard dev                  # serve, rebuilding the plugin on save"
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Dlq { server, action } => remote(&server, |c| dlq(c, action)),
        Command::Replay {
            server,
            since,
            until,
            route,
            source,
            no_wait,
            json,
        } => remote(&server, |c| async move {
            let now = crate::event::now_ms();
            let since = client::parse_when(&since, now)?;
            let until = until.map(|u| client::parse_when(&u, now)).transpose()?;
            let state = client::replay(
                &c,
                since,
                until,
                route.as_deref(),
                source.as_deref(),
                !no_wait,
            )
            .await?;
            if json {
                println!("{state}");
            } else if no_wait {
                println!(
                    "replay {} started: {} events, {} deliveries planned",
                    state["id"], state["events"], state["deliveries"]
                );
            } else {
                println!(
                    "replay {}: {} events, {} deliveries: {} delivered, {} dead",
                    state["id"],
                    state["events"],
                    state["deliveries"],
                    state["delivered"],
                    state["dead"]
                );
                if state["dead"].as_u64().unwrap_or(0) > 0 {
                    eprintln!("some deliveries are dead letters: see `switchyard dlq list`");
                    return Ok(ExitCode::FAILURE);
                }
            }
            Ok(ExitCode::SUCCESS)
        }),
        Command::Serve {
            config,
            listen,
            data_dir,
        } => serve(config, listen, data_dir, cli.log_format, "info"),
        Command::Dev {
            config,
            listen,
            data_dir,
        } => serve(
            config,
            listen,
            data_dir,
            cli.log_format,
            "info,plugin=debug",
        ),
    }
}

/// Runs an admin API command against a server; errors go to stderr.
fn remote<F, Fut>(args: &ServerArgs, run: F) -> ExitCode
where
    F: FnOnce(client::AdminClient) -> Fut,
    Fut: std::future::Future<Output = Result<ExitCode, client::ClientError>>,
{
    let result = client::AdminClient::new(args.server.as_deref(), &args.config).and_then(|c| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| client::ClientError::Usage(format!("cannot start the runtime: {e}")))?
            .block_on(run(c))
    });
    result.unwrap_or_else(|e| {
        eprintln!("error: {e}");
        ExitCode::FAILURE
    })
}

async fn dlq(c: client::AdminClient, action: DlqAction) -> Result<ExitCode, client::ClientError> {
    match action {
        DlqAction::List { route, limit, json } => {
            let items = client::dead_letters(&c, route.as_deref(), limit).await?;
            for d in &items {
                if json {
                    println!("{d}");
                } else {
                    println!("{}", client::dead_letter_line(d));
                }
            }
            if !json {
                eprintln!("{} dead letter(s)", items.len());
            }
        }
        DlqAction::Show { id } => {
            let d = c.get(&format!("/api/dlq/{id}")).await?;
            println!(
                "{}",
                serde_json::to_string_pretty(&d).unwrap_or_else(|_| d.to_string())
            );
        }
        DlqAction::Redrive { ids, route, all } => {
            let mut total = 0;
            if all || route.is_some() {
                let body = match route {
                    Some(r) => serde_json::json!({ "route": r }),
                    None => serde_json::json!({ "all": true }),
                };
                let answer = c.post("/api/dlq/redrive", &body).await?;
                total += answer["redriven"].as_u64().unwrap_or(0);
            }
            for id in ids {
                let answer = c
                    .post(&format!("/api/dlq/{id}/redrive"), &serde_json::json!({}))
                    .await?;
                total += answer["redriven"].as_u64().unwrap_or(0);
            }
            println!("redriven: {total}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn check(file: &std::path::Path) -> ExitCode {
    match config::load(file) {
        Ok(c) => {
            // Valid, but worth knowing: patterns that may make matching slow.
            for warning in c.routes.warnings() {
                eprintln!("warning: {}: {warning}", file.display());
            }
            println!(
                "{}: ok ({} sources, {} plugins, {} routes)",
                file.display(),
                c.sources.len(),
                c.plugins.len(),
                c.routes.routes.len()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            let color = std::io::stderr().is_terminal();
            eprintln!("{}", errors.render(color));
            ExitCode::FAILURE
        }
    }
}

/// Exit code of `match` for bad input (a bad file or event); 0 means it ran,
/// whether or not anything matched.
const MATCH_INPUT_ERROR: u8 = 2;

fn match_event(
    config_file: &std::path::Path,
    event_file: &std::path::Path,
    source_and_type: Option<(String, String)>,
    json: bool,
) -> ExitCode {
    let cfg = match config::load(config_file) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{}", errors.render(std::io::stderr().is_terminal()));
            return ExitCode::from(MATCH_INPUT_ERROR);
        }
    };
    let text = if event_file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).map(|_| s)
    } else {
        std::fs::read_to_string(event_file)
    };
    let text = match text {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", event_file.display());
            return ExitCode::from(MATCH_INPUT_ERROR);
        }
    };
    let event = match source_and_type {
        Some((source, ty)) => serde_json::from_str::<serde_json::Value>(&text)
            .map_err(|e| format!("{} is not valid JSON: {e}", event_file.display()))
            .map(|_| crate::Event {
                id: crate::event::new_event_id(),
                source,
                ty,
                subject: None,
                time: crate::event::rfc3339_ms(crate::event::now_ms()),
                datacontenttype: "application/json".into(),
                data: text.into_bytes(),
                extensions: Default::default(),
            }),
        None => crate::event::Event::from_envelope_json(&text)
            .map_err(|e| format!("{}: {e}", event_file.display())),
    };
    let event = match event {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(MATCH_INPUT_ERROR);
        }
    };
    let mut matched = Vec::new();
    let mut unmatched = Vec::new();
    for route in &cfg.routes.routes {
        match cfg.routes.explain(route, &event) {
            Ok(()) => matched.push(route.name.clone()),
            Err(reason) => unmatched.push((route.name.clone(), reason)),
        }
    }
    if json {
        let unmatched: Vec<serde_json::Value> = unmatched
            .iter()
            .map(|(route, reason)| serde_json::json!({ "route": route, "reason": reason }))
            .collect();
        println!(
            "{}",
            serde_json::json!({ "matched": matched, "unmatched": unmatched })
        );
    } else {
        if matched.is_empty() {
            println!("matched: (no route)");
        } else {
            println!("matched: {}", matched.join(", "));
        }
        for (route, reason) in &unmatched {
            println!("not {route}: {reason}");
        }
    }
    ExitCode::SUCCESS
}

fn serve(
    config: PathBuf,
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    log_format: LogFormat,
    level: &str,
) -> ExitCode {
    let mut cfg = match config::load(&config) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{}", errors.render(std::io::stderr().is_terminal()));
            return ExitCode::FAILURE;
        }
    };
    // Queued lines are written and spans flushed when the guard drops, after
    // the server stopped (it is dropped last).
    let _telemetry = telemetry::init_with(log_format, level, Some(&cfg.telemetry));
    if level.contains("plugin=debug") {
        tracing::info!(
            "dev mode: plugin crates and .wasm files named in {} are watched; save to rebuild and swap",
            config.display()
        );
    }
    if let Some(endpoint) = &cfg.telemetry.otlp_endpoint {
        tracing::info!(%endpoint, "exporting traces over OTLP/HTTP");
    }
    if let Some(l) = listen {
        cfg.server.listen = l;
    }
    if let Some(d) = data_dir {
        cfg.server.data_dir = d;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let server = match Server::start(cfg).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("{e}");
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        #[cfg(unix)]
        {
            let reloader = server.reloader();
            tokio::spawn(async move {
                use tokio::signal::unix::{SignalKind, signal};
                let Ok(mut hup) = signal(SignalKind::hangup()) else {
                    return;
                };
                while hup.recv().await.is_some() {
                    tracing::info!("SIGHUP: reloading the configuration");
                    let _ = reloader.reload().await;
                }
            });
        }
        // Scripts and tests read the address from here (`--listen` may say port 0).
        println!("switchyard listening on http://{}", server.addr());
        if let Some(admin) = server.admin_addr() {
            println!("admin API on http://{admin}");
        }
        server.run_until(shutdown_signal()).await;
        ExitCode::SUCCESS
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
