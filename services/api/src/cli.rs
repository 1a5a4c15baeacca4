//! Command line of `audit-api`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "audit-api", version, about = "Audit log read API")]
pub struct Cli {
    /// TOML configuration file; environment variables AUDIT_API__* override it.
    #[arg(long, short, env = "AUDIT_API_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply pending ClickHouse migrations and exit.
    Migrate,
}
