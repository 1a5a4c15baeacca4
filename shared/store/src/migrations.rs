//! Applies the numbered SQL files of `schemas/clickhouse/` and records each applied version with
//! its checksum. Safe to run concurrently from several processes: every statement is idempotent
//! and the record table collapses duplicate rows.

use clickhouse::Row;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::info;

use crate::config::ClickHouseConfig;
use crate::error::StoreError;

/// One migration file, compiled into the binary so a deployed build carries its own schema.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, in order. `tests/migrations.rs` checks this list against the directory.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "create_audit_events",
        sql: include_str!("../../../schemas/clickhouse/0001_create_audit_events.sql"),
    },
    Migration {
        version: 2,
        name: "create_directory",
        sql: include_str!("../../../schemas/clickhouse/0002_create_directory.sql"),
    },
    Migration {
        version: 3,
        name: "create_api_keys",
        sql: include_str!("../../../schemas/clickhouse/0003_create_api_keys.sql"),
    },
    Migration {
        version: 4,
        name: "create_filter_indexes",
        sql: include_str!("../../../schemas/clickhouse/0004_create_filter_indexes.sql"),
    },
    Migration {
        version: 5,
        name: "create_actor_email_rows",
        sql: include_str!("../../../schemas/clickhouse/0005_create_actor_email_rows.sql"),
    },
    Migration {
        version: 6,
        name: "create_ingest_fences",
        sql: include_str!("../../../schemas/clickhouse/0006_create_ingest_fences.sql"),
    },
    Migration {
        version: 7,
        name: "create_log_streams",
        sql: include_str!("../../../schemas/clickhouse/0007_create_log_streams.sql"),
    },
    Migration {
        version: 8,
        name: "create_retention",
        sql: include_str!("../../../schemas/clickhouse/0008_create_retention.sql"),
    },
];

const RECORD_TABLE: &str = "schema_migrations";

impl Migration {
    pub fn checksum(&self) -> String {
        hex::encode(Sha256::digest(self.sql.as_bytes()))
    }

    /// The statements of the file: split at `;` ending a line, comments and blanks dropped.
    pub fn statements(&self) -> Vec<String> {
        let mut statements = Vec::new();
        let mut current = String::new();
        for line in self.sql.lines() {
            let trimmed = line.trim();
            if trimmed.starts_with("--") || (trimmed.is_empty() && current.is_empty()) {
                continue;
            }
            current.push_str(line);
            current.push('\n');
            if trimmed.ends_with(';') {
                let statement = current.trim().trim_end_matches(';').trim().to_owned();
                if !statement.is_empty() {
                    statements.push(statement);
                }
                current.clear();
            }
        }
        let rest = current.trim();
        if !rest.is_empty() {
            statements.push(rest.to_owned());
        }
        statements
    }
}

#[derive(Debug, Row, Serialize, Deserialize)]
struct AppliedMigration {
    version: u32,
    name: String,
    checksum: String,
    applied_at: u32,
}

#[derive(Debug, Row, Deserialize)]
struct AppliedVersion {
    version: u32,
    checksum: String,
}

/// What [`apply`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    pub applied: Vec<u32>,
    pub already_applied: Vec<u32>,
}

/// Versions of [`MIGRATIONS`] not recorded as applied (all of them if the database is missing).
pub async fn pending(config: &ClickHouseConfig) -> Result<Vec<u32>, StoreError> {
    let applied = applied_versions(config).await?;
    verify_applied(&applied)?;
    Ok(MIGRATIONS
        .iter()
        .filter(|m| !applied.iter().any(|a| a.version == m.version))
        .map(|m| m.version)
        .collect())
}

/// What a service does with the schema as it starts: applies the pending migrations when
/// `migrate_on_start` is set, else checks that none is pending.
pub async fn prepare(config: &ClickHouseConfig, migrate_on_start: bool) -> Result<(), StoreError> {
    if migrate_on_start {
        apply(config).await.map(|_| ())
    } else {
        ensure_current(config).await
    }
}

/// Fails with [`StoreError::SchemaBehind`] unless every migration has been applied.
pub async fn ensure_current(config: &ClickHouseConfig) -> Result<(), StoreError> {
    let pending = pending(config).await?;
    if pending.is_empty() {
        Ok(())
    } else {
        Err(StoreError::SchemaBehind { pending })
    }
}

/// The record of applied migrations, in the form [`crate::Topology::render`] lays out.
const RECORD_TABLE_SQL: &str = "CREATE TABLE IF NOT EXISTS schema_migrations \
     (version UInt32, name String, checksum String, applied_at DateTime)\n\
     ENGINE = ReplacingMergeTree()\n\
     ORDER BY version";

/// Runs `statement` on the topology of `config`: rendered for it, each part once or on every
/// server.
async fn run(config: &ClickHouseConfig, statement: &str, doing: &str) -> Result<(), StoreError> {
    for part in config.topology().render(statement, &config.database)? {
        let result = if part.every_server {
            config.execute_everywhere(&part.sql, |c| c).await
        } else {
            config.client().query(&part.sql).execute().await
        };
        result.map_err(StoreError::clickhouse(doing))?;
    }
    Ok(())
}

/// Creates the database if needed and applies every pending migration in order.
pub async fn apply(config: &ClickHouseConfig) -> Result<MigrationReport, StoreError> {
    config.validate()?;
    let create_database = format!(
        "CREATE DATABASE IF NOT EXISTS {}{}",
        config.database,
        config.topology().on_cluster()
    );
    for server in config.every_server() {
        server
            .server_client()
            .query(&create_database)
            .execute()
            .await
            .map_err(StoreError::clickhouse("creating the database"))?;
    }
    let client = config.client();
    run(config, RECORD_TABLE_SQL, "creating the migrations table").await?;

    let applied = applied_versions(config).await?;
    verify_applied(&applied)?;

    let mut report = MigrationReport {
        applied: Vec::new(),
        already_applied: Vec::new(),
    };
    for migration in MIGRATIONS {
        if applied.iter().any(|a| a.version == migration.version) {
            report.already_applied.push(migration.version);
            continue;
        }
        let doing = format!(
            "applying migration {} ({})",
            migration.version, migration.name
        );
        for statement in migration.statements() {
            run(config, &statement, &doing).await?;
        }
        let mut insert = client
            .insert::<AppliedMigration>(RECORD_TABLE)
            .await
            .map_err(StoreError::clickhouse("recording a migration"))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as u32)
            .unwrap_or_default();
        insert
            .write(&AppliedMigration {
                version: migration.version,
                name: migration.name.to_owned(),
                checksum: migration.checksum(),
                applied_at: now,
            })
            .await
            .map_err(StoreError::clickhouse("recording a migration"))?;
        insert
            .end()
            .await
            .map_err(StoreError::clickhouse("recording a migration"))?;
        info!(
            version = migration.version,
            name = migration.name,
            database = %config.database,
            "migration applied"
        );
        report.applied.push(migration.version);
    }
    info!(
        database = %config.database,
        applied = ?report.applied,
        already_applied = ?report.already_applied,
        "clickhouse schema is current"
    );
    Ok(report)
}

async fn applied_versions(config: &ClickHouseConfig) -> Result<Vec<AppliedVersion>, StoreError> {
    let client = config.server_client();
    // Ask the catalog first so that a missing database reads as "nothing applied".
    let exists: u8 = client
        .query("SELECT count() > 0 FROM system.tables WHERE database = ? AND name = ?")
        .bind(config.database.as_str())
        .bind(RECORD_TABLE)
        .fetch_one()
        .await
        .map_err(StoreError::clickhouse("reading the migrations table"))?;
    if exists == 0 {
        return Ok(Vec::new());
    }
    config
        .client()
        .query(&format!(
            "SELECT DISTINCT version, checksum FROM {RECORD_TABLE} ORDER BY version"
        ))
        .fetch_all()
        .await
        .map_err(StoreError::clickhouse("reading the migrations table"))
}

fn verify_applied(applied: &[AppliedVersion]) -> Result<(), StoreError> {
    for record in applied {
        let Some(migration) = MIGRATIONS.iter().find(|m| m.version == record.version) else {
            return Err(StoreError::UnknownMigration {
                version: record.version,
            });
        };
        let current = migration.checksum();
        if current != record.checksum {
            return Err(StoreError::MigrationChanged {
                version: migration.version,
                name: migration.name,
                stored: record.checksum.clone(),
                current,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_statements_at_line_ending_semicolons() {
        let migration = Migration {
            version: 9,
            name: "t",
            sql: "-- comment; not a statement\nCREATE TABLE a (x String DEFAULT 'a;b')\nENGINE = Log;\n\nDROP TABLE IF EXISTS b;\n",
        };
        assert_eq!(
            migration.statements(),
            vec![
                "CREATE TABLE a (x String DEFAULT 'a;b')\nENGINE = Log".to_owned(),
                "DROP TABLE IF EXISTS b".to_owned()
            ]
        );
    }

    #[test]
    fn versions_are_increasing_and_unique() {
        for pair in MIGRATIONS.windows(2) {
            assert!(pair[0].version < pair[1].version);
        }
    }
}
