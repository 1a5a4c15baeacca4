//! Command line of `audit-api`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::keys::Role;

#[derive(Debug, Parser)]
#[command(name = "audit-api", version, about = "Audit log read API")]
pub struct Cli {
    /// TOML configuration file; environment variables AUDIT_API__* override it.
    #[arg(long, short, env = "AUDIT_API_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API (the default).
    Serve,
    /// Apply pending ClickHouse migrations and exit.
    Migrate,
    /// Create, list and revoke API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key; the key is printed once and never stored in clear.
    Create {
        /// Organization the key reads.
        #[arg(long)]
        org: String,
        #[arg(long, value_enum)]
        role: Role,
        /// A label to recognise the key by.
        #[arg(long, default_value = "")]
        name: String,
        /// Print only the key (for scripts).
        #[arg(long)]
        quiet: bool,
    },
    /// List an organization's keys (never the keys themselves).
    List {
        #[arg(long)]
        org: String,
    },
    /// Revoke a key by its id; every replica refuses it within keys.refresh_interval_ms.
    Revoke { key_id: String },
}
