//! The log-stream tables in ClickHouse (migration 0007): `audit_log_streams`, one row per
//! version of a stream's settings (written by the API and the CLI), and
//! `audit_log_stream_state`, where each stream stands (written by the worker that owns it).
//! Every read of settings is scoped to one organization, except the worker's read of all.

use audit_store::clickhouse::{self, Row};
use serde::{Deserialize, Serialize};

pub const STREAMS_TABLE: &str = "audit_log_streams";
pub const STATE_TABLE: &str = "audit_log_stream_state";

const STREAM_COLUMNS: &str = "organization_id, stream_id, version, name, kind, settings, secrets, \
     paused, deleted, replay_seq, replay_from_ms, created_at_ms, updated_at_ms";
const STATE_COLUMNS: &str = "organization_id, stream_id, written_at_us, replay_seq, \
     config_version, partition, next_offset, state, delivered_events, last_delivered_at_ms, \
     last_error_status, last_error, last_error_at_ms, failing_since_ms, lag_events, lag_ms";

/// One version of a stream's settings.
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct StreamRow {
    pub organization_id: String,
    pub stream_id: String,
    pub version: u64,
    pub name: String,
    pub kind: String,
    /// [`super::spec::Settings`] as JSON.
    pub settings: String,
    /// [`super::spec::Secrets`] as JSON, sealed by [`super::secret_box::SecretBox`].
    pub secrets: String,
    pub paused: u8,
    pub deleted: u8,
    pub replay_seq: u64,
    pub replay_from_ms: i64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// Where a stream stands, as its worker last wrote it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct StateRow {
    pub organization_id: String,
    pub stream_id: String,
    pub written_at_us: u64,
    /// The replay request this position follows (a newer one moves the position).
    pub replay_seq: u64,
    /// The settings version last applied (a newer one ends an `error` state: retried).
    pub config_version: u64,
    pub partition: i32,
    /// The next offset of the stored-events topic to deliver (-1: not placed yet).
    pub next_offset: i64,
    /// `active`, `failing` or `error` (`paused` comes from the settings).
    pub state: String,
    pub delivered_events: u64,
    pub last_delivered_at_ms: i64,
    /// HTTP status of the last failure (0: none, or no answer; -1: the worker could not open
    /// the stream's secrets).
    pub last_error_status: i32,
    pub last_error: String,
    pub last_error_at_ms: i64,
    pub failing_since_ms: i64,
    pub lag_events: i64,
    pub lag_ms: i64,
}

pub async fn insert_version(
    client: &clickhouse::Client,
    row: &StreamRow,
) -> Result<(), clickhouse::error::Error> {
    let mut insert = client.insert::<StreamRow>(STREAMS_TABLE).await?;
    insert.write(row).await?;
    insert.end().await
}

/// The current version of every stream of `organization_id` (deleted ones included: callers
/// skip them), oldest first.
pub async fn organization_streams(
    client: &clickhouse::Client,
    organization_id: &str,
) -> Result<Vec<StreamRow>, clickhouse::error::Error> {
    client
        .query(&format!(
            "SELECT {STREAM_COLUMNS} FROM {STREAMS_TABLE} FINAL WHERE organization_id = ? \
             ORDER BY created_at_ms, stream_id"
        ))
        .bind(organization_id)
        .fetch_all()
        .await
}

/// The current version of every stream of every organization (the workers' read).
pub async fn all_streams(
    client: &clickhouse::Client,
) -> Result<Vec<StreamRow>, clickhouse::error::Error> {
    client
        .query(&format!(
            "SELECT {STREAM_COLUMNS} FROM {STREAMS_TABLE} FINAL ORDER BY organization_id, stream_id"
        ))
        .fetch_all()
        .await
}

/// The newest state of each stream of `organization_id` (or of every organization).
pub async fn states(
    client: &clickhouse::Client,
    organization_id: Option<&str>,
) -> Result<Vec<StateRow>, clickhouse::error::Error> {
    let query = match organization_id {
        Some(org) => client
            .query(&format!(
                "SELECT {STATE_COLUMNS} FROM {STATE_TABLE} FINAL WHERE organization_id = ?"
            ))
            .bind(org),
        None => client.query(&format!("SELECT {STATE_COLUMNS} FROM {STATE_TABLE} FINAL")),
    };
    query.fetch_all().await
}

/// The newest state of one stream of `organization_id`.
pub async fn state_of(
    client: &clickhouse::Client,
    organization_id: &str,
    stream_id: &str,
) -> Result<Option<StateRow>, clickhouse::error::Error> {
    client
        .query(&format!(
            "SELECT {STATE_COLUMNS} FROM {STATE_TABLE} FINAL \
             WHERE organization_id = ? AND stream_id = ?"
        ))
        .bind(organization_id)
        .bind(stream_id)
        .fetch_optional()
        .await
}

pub async fn insert_states(
    client: &clickhouse::Client,
    rows: &[StateRow],
) -> Result<(), clickhouse::error::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut insert = client.insert::<StateRow>(STATE_TABLE).await?;
    for row in rows {
        insert.write(row).await?;
    }
    insert.end().await
}
