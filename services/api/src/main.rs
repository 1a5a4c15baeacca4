use std::process::ExitCode;

use anyhow::Context;
use audit_api::cli::{Cli, Command, KeysCommand};
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
