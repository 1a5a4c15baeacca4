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
    /// Organizations' retention, and the retention job.
    #[command(subcommand)]
    Retention(RetentionCommand),
    /// Legal holds: nothing they cover is removed, by retention or by erasure.
    #[command(subcommand)]
    Hold(HoldCommand),
    /// Replace a person's emails, names, IP addresses and user agents in every stored event and
    /// table by stable pseudonyms (refused while a legal hold covers their events). Finishes an
    /// erasure of the same person left running.
    Erase {
        #[arg(long)]
        org: String,
        /// The person's user id (as in actor.id / affectedUser.id).
        #[arg(long)]
        user: String,
        /// Who asked for the erasure (recorded in its audit event).
        #[arg(long)]
        by: String,
    },
    /// An organization's erasures.
    Erasures {
        #[arg(long)]
        org: String,
    },
}

/// Retention (README "Retention, legal hold and erasure").
#[derive(Debug, Subcommand)]
pub enum RetentionCommand {
    /// An organization's retention, oldest event held and active holds.
    Show {
        #[arg(long)]
        org: String,
    },
    /// Set an organization's retention in days (1 to 3650).
    Set {
        #[arg(long)]
        org: String,
        #[arg(long)]
        days: u32,
        /// Who asks (recorded in the change's audit event).
        #[arg(long)]
        by: String,
    },
    /// Back to the configured default (retention.default_days).
    Clear {
        #[arg(long)]
        org: String,
        #[arg(long)]
        by: String,
    },
    /// One run of the retention job: finish erasures left running, then remove every event
    /// past its organization's retention (and not held) from every table. Schedule it (the
    /// chart's CronJob runs it daily).
    Run,
}

#[derive(Debug, Subcommand)]
pub enum HoldCommand {
    /// Place a hold on an organization's events, all of them or those of a time range.
    Place {
        #[arg(long)]
        org: String,
        /// Why (shown to the organization's admin).
        #[arg(long)]
        reason: String,
        /// Start of the range (RFC 3339, inclusive); the oldest event when absent.
        #[arg(long)]
        from: Option<String>,
        /// End of the range (RFC 3339, exclusive); every later event when absent.
        #[arg(long)]
        to: Option<String>,
        #[arg(long)]
        by: String,
    },
    /// Holds, active and lifted (of one organization, or of all).
    List {
        #[arg(long)]
        org: Option<String>,
    },
    /// Lift a hold: normal expiry resumes for its range.
    Lift {
        #[arg(long)]
        org: String,
        id: String,
        #[arg(long)]
        by: String,
    },
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
