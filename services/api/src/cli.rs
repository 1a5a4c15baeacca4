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
    /// Run the stream worker, or manage an organization's log streams as its operator.
    #[command(subcommand)]
    Streams(StreamsCommand),
}

/// The operator's side of the streams API (README "Log streams"): the same operations and
/// checks, printed as the API's JSON. Changes are audit events of the organization, with actor
/// `{type: system, id: audit-api-cli}`.
#[derive(Debug, Subcommand)]
pub enum StreamsCommand {
    /// Deliver the streams of this replica's share of the stored-events topic (a Deployment of
    /// its own in the chart).
    Run,
    /// An organization's streams, with their health.
    List {
        #[arg(long)]
        org: String,
    },
    /// One stream.
    Get {
        #[arg(long)]
        org: String,
        id: String,
    },
    /// Create a stream from the API's JSON body (a webhook's secret is printed once).
    Create {
        #[arg(long)]
        org: String,
        /// The body, e.g. '{"name": "SIEM", "destination": {"type": "webhook", "url": "https://..."}}'.
        #[arg(long)]
        json: String,
    },
    /// Change a stream (the API's PATCH body); `{"paused": false}` resumes a stream in error.
    Update {
        #[arg(long)]
        org: String,
        id: String,
        #[arg(long)]
        json: String,
    },
    Delete {
        #[arg(long)]
        org: String,
        id: String,
    },
    /// Send one synthetic event and print the destination's answer.
    Test {
        #[arg(long)]
        org: String,
        id: String,
    },
    /// Deliver again from a time (RFC 3339), as far back as the stored-events topic holds.
    Replay {
        #[arg(long)]
        org: String,
        id: String,
        #[arg(long)]
        from: String,
    },
    /// A new webhook signing secret (printed once); the old one is still sent during the overlap.
    RotateSecret {
        #[arg(long)]
        org: String,
        id: String,
        #[arg(long)]
        overlap_seconds: Option<u64>,
    },
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
