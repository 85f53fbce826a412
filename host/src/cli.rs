//! The `switchyard` command.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    /// Validate a configuration file and report every problem in it.
    Check {
        /// The configuration file.
        #[arg(default_value = "rules.toml")]
        file: PathBuf,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { file } => check(&file),
        Command::Serve {
            config,
            listen,
            data_dir,
        } => {
            telemetry::init(cli.log_format);
            serve(config, listen, data_dir)
        }
    }
}

fn check(file: &std::path::Path) -> ExitCode {
    match config::load(file) {
        Ok(c) => {
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

fn serve(config: PathBuf, listen: Option<SocketAddr>, data_dir: Option<PathBuf>) -> ExitCode {
    let mut cfg = match config::load(&config) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{}", errors.render(std::io::stderr().is_terminal()));
            return ExitCode::FAILURE;
        }
    };
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
        // Scripts and tests read the address from here (`--listen` may say port 0).
        println!("switchyard listening on http://{}", server.addr());
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
