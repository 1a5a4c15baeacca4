use std::process::ExitCode;

use anyhow::Context;
use audit_ingest::cli::{Cli, Command};
use audit_ingest::{Application, IngestConfig};
use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // The error chain only: no backtrace, whatever RUST_BACKTRACE says.
            eprintln!("audit-ingest: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = IngestConfig::load(cli.config.as_deref())?;
    let _telemetry = audit_runtime::init_telemetry("audit-ingest", &config.telemetry)?;
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            let app = Application::build(config)
                .await
                .context("starting audit-ingest")?;
            let shutdown = app.shutdown_token();
            tokio::spawn(async move {
                audit_runtime::shutdown::signal().await;
                shutdown.cancel();
            });
            app.run().await.context("audit-ingest stopped")?;
        }
        Command::Migrate => {
            let report = audit_store::migrations::apply(&config.clickhouse)
                .await
                .context("applying ClickHouse migrations")?;
            tracing::info!(applied = ?report.applied, already_applied = ?report.already_applied, "migrations done");
        }
    }
    Ok(())
}
