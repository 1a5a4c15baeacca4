use std::process::ExitCode;

use anyhow::Context;
use audit_ingest::cli::{Cli, Command, ReplayArgs};
use audit_ingest::replay::{RangeEnd, ReplayRange};
use audit_ingest::{Application, IngestConfig};
use clap::Parser;

/// mimalloc: less time in malloc/free and less fragmentation than glibc's allocator under
/// the many short-lived strings of a decode-and-insert loop.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    audit_runtime::exit_code("audit-ingest", run(Cli::parse()).await)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = IngestConfig::load(cli.config.as_deref())?;
    let _telemetry = audit_runtime::init_telemetry("audit-ingest", &config.telemetry)?;
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            let app = Application::build(config)
                .await
                .context("starting audit-ingest")?;
            audit_runtime::shutdown::cancel_on_signal(app.shutdown_token());
            app.run().await.context("audit-ingest stopped")?;
        }
        Command::Replay(args) => {
            let range = replay_range(args, &config)?;
            let stop = tokio_util::sync::CancellationToken::new();
            audit_runtime::shutdown::cancel_on_signal(stop.clone());
            let summary = audit_ingest::replay::replay(&config, &range.0, range.1, stop)
                .await
                .context("replay failed")?;
            println!(
                "replayed {} messages: {} events ({} of them stored already, not stored again), {} dead-lettered",
                summary.messages, summary.events, summary.already_stored, summary.dead_letters
            );
        }
        Command::Migrate => {
            audit_store::migrations::apply(&config.clickhouse)
                .await
                .context("applying ClickHouse migrations")?;
        }
    }
    Ok(())
}

fn replay_range(args: ReplayArgs, config: &IngestConfig) -> anyhow::Result<(ReplayRange, bool)> {
    let time = |flag: &str, value: &str| {
        chrono::DateTime::parse_from_rfc3339(value)
            .map(|t| RangeEnd::Time(t.with_timezone(&chrono::Utc)))
            .with_context(|| format!("{flag} {value:?} is not an RFC 3339 date-time"))
    };
    let from = match (args.from_offset, &args.from_time) {
        (Some(offset), _) => RangeEnd::Offset(offset),
        (None, Some(at)) => time("--from-time", at)?,
        (None, None) => RangeEnd::Edge,
    };
    let to = match (args.to_offset, &args.to_time) {
        (Some(offset), _) => RangeEnd::Offset(offset),
        (None, Some(at)) => time("--to-time", at)?,
        (None, None) => RangeEnd::Edge,
    };
    let topics = if args.topics.is_empty() {
        config.kafka.topics.clone()
    } else {
        args.topics
    };
    let progress = !args.no_progress && std::io::IsTerminal::is_terminal(&std::io::stderr());
    Ok((
        ReplayRange {
            topics,
            partitions: args.partitions,
            from,
            to,
        },
        progress,
    ))
}
