//! Command line of `audit-ingest`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "audit-ingest",
    version,
    about = "Kafka -> ClickHouse audit event ingestion"
)]
pub struct Cli {
    /// TOML configuration file; environment variables AUDIT_INGEST__* override it.
    #[arg(long, short, env = "AUDIT_INGEST_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Consume the configured topics into ClickHouse until SIGTERM/SIGINT (the default).
    Run,
    /// Apply pending ClickHouse migrations and exit.
    Migrate,
}
