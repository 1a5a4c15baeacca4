use std::process::ExitCode;

use anyhow::Context;
use audit_api::cli::{Cli, Command, KeysCommand, StreamsCommand};
use audit_api::{keys, ApiConfig, Application};
use clap::Parser;
use secrecy::ExposeSecret;

#[tokio::main]
async fn main() -> ExitCode {
    audit_runtime::exit_code("audit-api", run(Cli::parse()).await)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = ApiConfig::load(cli.config.as_deref())?;
    let _telemetry = audit_runtime::init_telemetry("audit-api", &config.telemetry)?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let app = Application::build(config)
                .await
                .context("starting audit-api")?;
            audit_runtime::shutdown::cancel_on_signal(app.shutdown_token());
            app.run().await.context("audit-api stopped")?;
        }
        Command::Migrate => {
            audit_store::migrations::apply(&config.clickhouse)
                .await
                .context("applying ClickHouse migrations")?;
        }
        Command::Streams(StreamsCommand::Run) => {
            let worker = audit_api::log_streams::worker::Worker::build(config)
                .await
                .context("starting the stream worker")?;
            audit_runtime::shutdown::cancel_on_signal(worker.shutdown_token());
            worker.run().await.context("the stream worker stopped")?;
        }
        Command::Streams(command) => {
            audit_store::migrations::apply(&config.clickhouse)
                .await
                .context("applying ClickHouse migrations")?;
            streams_command(&config, command).await?;
        }
        command @ (Command::Retention(_)
        | Command::Hold(_)
        | Command::Erase { .. }
        | Command::Erasures { .. }) => {
            audit_store::migrations::apply(&config.clickhouse)
                .await
                .context("applying ClickHouse migrations")?;
            let operator = audit_api::retention::commands::Operator::new(&config)?;
            let out = match command {
                Command::Retention(command) => operator.retention(command).await?,
                Command::Hold(command) => operator.hold(command).await?,
                Command::Erase { org, user, by } => {
                    serde_json::to_value(operator.erase(&org, &user, &by).await?)?
                }
                Command::Erasures { org } => operator.erasures(&org).await?,
                _ => unreachable!("matched above"),
            };
            operator.admin.flush();
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Command::Keys(command) => {
            audit_store::migrations::apply(&config.clickhouse)
                .await
                .context("applying ClickHouse migrations")?;
            keys_command(&config, command).await?;
        }
    }
    Ok(())
}

async fn keys_command(config: &ApiConfig, command: KeysCommand) -> anyhow::Result<()> {
    let client = config.clickhouse.client();
    match command {
        KeysCommand::Create {
            org,
            role,
            name,
            quiet,
        } => {
            anyhow::ensure!(!org.trim().is_empty(), "--org must not be empty");
            let key = keys::generate(&org, role, &name);
            keys::create(&client, &key)
                .await
                .context("storing the new key")?;
            if quiet {
                println!("{}", key.secret.expose_secret());
            } else {
                println!("key id:  {}", key.row.key_id);
                println!("org:     {}", key.row.organization_id);
                println!("role:    {}", key.row.role);
                println!("api key: {}", key.secret.expose_secret());
                println!("(shown once: only its hash is stored)");
            }
        }
        KeysCommand::List { org } => {
            let rows = keys::load(&client, Some(&org))
                .await
                .context("reading keys")?;
            let used = keys::last_used(&client)
                .await
                .context("reading key usage")?;
            println!(
                "{:<18} {:<7} {:<24} {:<24} {:<24} name",
                "key id", "role", "created", "last used", "revoked"
            );
            let at = |ms: Option<i64>| {
                ms.map(audit_api::time::format_timestamp)
                    .unwrap_or_else(|| "-".to_owned())
            };
            for row in rows {
                println!(
                    "{:<18} {:<7} {:<24} {:<24} {:<24} {}",
                    row.key_id,
                    row.role,
                    at(Some(row.created_at_ms)),
                    at(used.get(&row.key_id).copied()),
                    at(row.revoked_at_ms),
                    row.name
                );
            }
        }
        KeysCommand::Revoke { key_id } => {
            let row = keys::revoke(&client, &key_id).await?;
            println!("revoked key {} of {}", row.key_id, row.organization_id);
        }
    }
    Ok(())
}

async fn streams_command(config: &ApiConfig, command: StreamsCommand) -> anyhow::Result<()> {
    use audit_api::log_streams::manage::{Actor, StreamAdmin};
    let metrics = audit_api::metrics::ApiMetrics::new();
    let events = audit_api::read_events::ReadEventPublisher::new(&config.read_events, metrics)?;
    let admin = StreamAdmin::new(config.clickhouse.client(), &config.streams, events)?;
    let actor = Actor {
        id: "audit-api-cli".to_owned(),
        actor_type: "system",
        name: std::env::var("USER").ok(),
        request_id: None,
        ip: None,
        user_agent: None,
    };
    let print = |value: serde_json::Value| -> anyhow::Result<()> {
        println!("{}", serde_json::to_string_pretty(&value)?);
        Ok(())
    };
    let parse = |text: &str| -> anyhow::Result<serde_json::Value> {
        serde_json::from_str(text).context("--json is not valid JSON")
    };
    match command {
        StreamsCommand::Run => unreachable!("handled by run"),
        StreamsCommand::List { org } => {
            print(serde_json::json!({ "data": admin.list(&org).await? }))?
        }
        StreamsCommand::Get { org, id } => {
            print(serde_json::to_value(admin.get(&org, &id).await?)?)?
        }
        StreamsCommand::Create { org, json } => {
            let body = serde_json::from_value(parse(&json)?).context("--json")?;
            print(serde_json::to_value(
                admin.create(&org, &actor, body).await?,
            )?)?
        }
        StreamsCommand::Update { org, id, json } => {
            let body = serde_json::from_value(parse(&json)?).context("--json")?;
            print(serde_json::to_value(
                admin.update(&org, &actor, &id, body).await?,
            )?)?
        }
        StreamsCommand::Delete { org, id } => {
            admin.delete(&org, &actor, &id).await?;
            println!("deleted stream {id} of {org}");
        }
        StreamsCommand::Test { org, id } => {
            print(serde_json::to_value(admin.test(&org, &id).await?)?)?
        }
        StreamsCommand::Replay { org, id, from } => {
            let from_ms = chrono::DateTime::parse_from_rfc3339(&from)
                .context("--from must be an RFC 3339 time such as 2026-01-31T00:00:00Z")?
                .timestamp_millis();
            print(serde_json::to_value(
                admin.replay(&org, &actor, &id, from_ms).await?,
            )?)?
        }
        StreamsCommand::RotateSecret {
            org,
            id,
            overlap_seconds,
        } => print(serde_json::to_value(
            admin
                .rotate_secret(&org, &actor, &id, overlap_seconds)
                .await?,
        )?)?,
    }
    Ok(())
}
