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
    /// Re-read a range of topics into ClickHouse (idempotent: already stored events stay single).
    Replay(ReplayArgs),
}

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Topic to replay; repeat for several. Default: the configured kafka.topics.
    #[arg(long = "topic")]
    pub topics: Vec<String>,
    /// Partition to replay; repeat for several. Default: all.
    #[arg(long = "partition")]
    pub partitions: Vec<i32>,
    /// First offset to read (per partition). Default: the earliest retained message.
    #[arg(long, conflicts_with = "from_time")]
    pub from_offset: Option<i64>,
    /// First message time to read, RFC 3339 (Kafka message timestamps).
    #[arg(long)]
    pub from_time: Option<String>,
    /// Offset to stop before (per partition). Default: the end of the partition at start.
    #[arg(long, conflicts_with = "to_time")]
    pub to_offset: Option<i64>,
    /// Message time to stop before, RFC 3339.
    #[arg(long)]
    pub to_time: Option<String>,
    /// Never draw a progress bar (it is drawn only on a terminal anyway).
    #[arg(long)]
    pub no_progress: bool,
}
