use beamdrop::cli::{self, Command};
use beamdrop::server::{self, config::Cli, config::Config};
use clap::Parser;
use leptos::prelude::get_configuration;
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

/// jemalloc instead of glibc's malloc: a node holds tens of thousands of long-lived sockets whose
/// small allocations interleave with each connection's short-lived HTTP ones, and glibc's arenas
/// kept ~1.2 kB of free fragments per idle peer resident (malloc_stats at 18k peers: 54 MB
/// held, 31 MB in use; malloc_trim returned nothing). Measured side by side with the load
/// benchmark: RSS per idle peer 2.99 -> 2.41 kB, CPU per relayed message unchanged.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // The terminal peer logs only warnings unless asked: its output is for a person.
    let default_log = match cli.command {
        None | Some(Command::Serve) => "info",
        Some(_) => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| default_log.into()))
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Some(Command::Send(args)) => return exit(cli::send(args).await.map(|()| true)),
        Some(Command::Receive(args)) => return exit(cli::receive(args).await),
        None | Some(Command::Serve) => {}
    }
    match serve(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// The exit code of a CLI command: 0 done, 1 done with files missing, 2 stopped by an error.
fn exit(outcome: Result<bool, cli::CliError>) -> ExitCode {
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("beamdrop: {e}");
            ExitCode::from(2)
        }
    }
}

async fn serve(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    let config = Config::load(&cli)?;
    // Site paths and output name come from cargo-leptos (compiled in, overridable by LEPTOS_* vars).
    let leptos_options = get_configuration(None)?.leptos_options;
    let server = server::start(config, leptos_options).await?;
    match &server.tls_fingerprint {
        None => tracing::info!("listening on http://{}", server.addr),
        Some(fingerprint) => {
            tracing::info!("listening on https://{}", server.addr);
            // Printed, not only logged: a person compares it with what the browser shows
            // before trusting a self-signed certificate.
            println!("TLS certificate SHA-256 fingerprint: {fingerprint}");
        }
    }
    shutdown_signal().await;
    tracing::info!("shutting down");
    server.shutdown().await?;
    Ok(())
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
