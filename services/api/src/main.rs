use std::process::ExitCode;

use anyhow::Context;
use audit_api::cli::{Cli, Command};
use audit_api::ApiConfig;
use clap::Parser;

/// mimalloc: less time in malloc/free and less fragmentation than glibc's allocator under
/// the many short-lived strings of a decode-and-insert loop.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    audit_runtime::exit_code("audit-api", run(Cli::parse()).await)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = ApiConfig::load(cli.config.as_deref())?;
    let _telemetry = audit_runtime::init_telemetry("audit-api", &config.telemetry)?;
    match cli.command {
        Command::Migrate => {
            audit_store::migrations::apply(&config.clickhouse)
                .await
                .context("applying ClickHouse migrations")?;
        }
    }
    Ok(())
}
