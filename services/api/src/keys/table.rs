//! The key tables in ClickHouse: the CLI creates and revokes keys there, every replica loads
//! them, and last-used times are written beside them.

use std::collections::HashMap;

use audit_store::clickhouse::{self, Row};
use serde::{Deserialize, Serialize};

use super::{now_ms, ApiKeyRow, CreatedKey};

pub const KEYS_TABLE: &str = "api_keys";
pub const USAGE_TABLE: &str = "api_key_usage";
/// The columns of [`ApiKeyRow`], in order.
const KEY_COLUMNS: &str =
    "key_id, organization_id, role, name, secret_sha256, created_at_ms, revoked_at_ms, version";

#[derive(Debug, Clone, Row, Serialize, Deserialize)]
pub(super) struct UsageRow {
    pub(super) key_id: String,
    pub(super) last_used_at_ms: i64,
}

/// Stores a new key.
pub async fn create(
    client: &clickhouse::Client,
    key: &CreatedKey,
) -> Result<(), clickhouse::error::Error> {
    let mut insert = client.insert::<ApiKeyRow>(KEYS_TABLE).await?;
    insert.write(&key.row).await?;
    insert.end().await
}

/// The current version of every key (of one organization, if given).
pub async fn load(
    client: &clickhouse::Client,
    organization_id: Option<&str>,
) -> Result<Vec<ApiKeyRow>, clickhouse::error::Error> {
    let columns = KEY_COLUMNS;
    // FINAL keeps the highest version per key even before the background merge.
    match organization_id {
        Some(org) => {
            client
                .query(&format!("SELECT {columns} FROM {KEYS_TABLE} FINAL WHERE organization_id = ? ORDER BY created_at_ms"))
                .bind(org)
                .fetch_all()
                .await
        }
        None => {
            client
                .query(&format!("SELECT {columns} FROM {KEYS_TABLE} FINAL"))
                .fetch_all()
                .await
        }
    }
}

/// Last use of each key, epoch milliseconds.
pub async fn last_used(
    client: &clickhouse::Client,
) -> Result<HashMap<String, i64>, clickhouse::error::Error> {
    let rows: Vec<UsageRow> = client
        .query(&format!(
            "SELECT key_id, max(last_used_at_ms) AS last_used_at_ms FROM {USAGE_TABLE} GROUP BY key_id"
        ))
        .fetch_all()
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.key_id, r.last_used_at_ms))
        .collect())
}

/// Why `revoke` did nothing.
#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    #[error("no API key with id {0}")]
    Unknown(String),
    #[error("API key {0} was already revoked")]
    AlreadyRevoked(String),
    #[error(transparent)]
    Store(#[from] clickhouse::error::Error),
}

/// Marks a key revoked by writing a newer version of its row.
pub async fn revoke(client: &clickhouse::Client, key_id: &str) -> Result<ApiKeyRow, RevokeError> {
    let columns = KEY_COLUMNS;
    let current: Option<ApiKeyRow> = client
        .query(&format!(
            "SELECT {columns} FROM {KEYS_TABLE} FINAL WHERE key_id = ?"
        ))
        .bind(key_id)
        .fetch_optional()
        .await?;
    let mut row = current.ok_or_else(|| RevokeError::Unknown(key_id.to_owned()))?;
    if row.revoked_at_ms.is_some() {
        return Err(RevokeError::AlreadyRevoked(key_id.to_owned()));
    }
    let now = now_ms();
    row.revoked_at_ms = Some(now);
    row.version = (now as u64).max(row.version + 1);
    let mut insert = client.insert::<ApiKeyRow>(KEYS_TABLE).await?;
    insert.write(&row).await?;
    insert.end().await?;
    Ok(row)
}
