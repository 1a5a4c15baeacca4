//! The ClickHouse side of audit-logs, shared by both services: connection settings, the row
//! types of the events table, and the migrations runner for `schemas/clickhouse/`.

mod cluster;
mod config;
mod copies;
mod error;
pub mod migrations;
mod ping;
pub mod retention;
mod rows;
mod settings;
pub mod stored;

pub use cluster::{is_sharded, Rendered, Topology, LOCAL_SUFFIX, SHARD_KEY};
pub use config::{ClickHouseConfig, Compression};
pub use copies::{
    pending_duplicate_months, CopyTable, COPY_TABLES, DUPLICATES_TABLE, INTENTS_TABLE,
    PENDING_MONTHS_SQL,
};
pub use error::{classify, exception_code, Failure, StoreError};
pub use ping::{ping, PingError};
pub use rows::{
    AuditEventRow, DirectoryTeamRow, DirectoryUserRow, Lineage, DIRECTORY_TEAMS_TABLE,
    DIRECTORY_USERS_TABLE, EVENTS_TABLE,
};
pub use settings::has_setting;

/// Re-exported so callers name one version of the client crate.
pub use clickhouse;
