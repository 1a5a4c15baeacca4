//! The read side of `audit_events`: builds the SQL of a page, a count or an export, always scoped
//! to the caller's organization, with every filter value sent as a server-side query parameter
//! (`{p0:String}` in the text, `param_p0` beside it).
//!
//! De-duplication: `FINAL` collapses rows that share the sorting key (organization, time, id),
//! so a re-delivered event shows once even before the background merge ran.
//!
//! One concern per module: [`sql`] binds values and builds clauses, [`tables`] picks the table
//! that answers the filters, [`page`] reads a page in the [`window`] of months it needs,
//! [`count`] totals the filters from per-month aggregates ([`months`]), [`export`] is the
//! source of an export, [`freshness`] the newest ingest time.

mod count;
mod export;
mod freshness;
mod months;
mod page;
mod record;
mod sql;
mod tables;
mod window;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use audit_store::clickhouse;
use audit_store::ClickHouseConfig;

pub use count::EXACT_TOTAL_LIMIT;
pub use export::ExportSource;
pub use page::{Page, PageItem, PageRequest};
pub use record::{EventCursor, EventRecord};
pub use tables::{BY_ACTOR_EMAIL_TABLE, BY_TYPE_TABLE};

use crate::config::QueryConfig;
use crate::metrics::ApiMetrics;
use crate::partitions::PartitionCache;
use count::Snapshot;
use sql::Condition;

/// Why a read failed, in the store's terms; the HTTP layer maps it to an answer
/// (`impl From<ReadError> for ApiError`).
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("clickhouse is unavailable: {0}")]
    Unavailable(String),
    #[error("the query ran past its time limit")]
    Timeout,
    #[error("clickhouse query failed: {0}")]
    Failed(String),
}

impl From<clickhouse::error::Error> for ReadError {
    fn from(err: clickhouse::error::Error) -> Self {
        ReadError::from(&err)
    }
}

impl From<&clickhouse::error::Error> for ReadError {
    fn from(err: &clickhouse::error::Error) -> Self {
        match audit_store::classify(err) {
            audit_store::Failure::Unavailable => ReadError::Unavailable(err.to_string()),
            audit_store::Failure::Timeout => ReadError::Timeout,
            audit_store::Failure::Rejected | audit_store::Failure::Other => {
                ReadError::Failed(err.to_string())
            }
        }
    }
}

/// Queries `audit_events` for the API.
#[derive(Clone)]
pub struct AuditLogStore {
    client: clickhouse::Client,
    /// Exports open a client of their own from it (see [`Self::export`]).
    clickhouse: ClickHouseConfig,
    export_timeout_seconds: u64,
    export_window_rows: u64,
    metrics: ApiMetrics,
    /// Counts and the newest ingest time per month, while the month's parts stay the same.
    partitions: Arc<PartitionCache>,
    /// The last [`Snapshot`] taken of each table: first pages size their window by it while
    /// their own snapshot and total are under way.
    last_snapshots: Arc<Mutex<HashMap<&'static str, Snapshot>>>,
}

impl AuditLogStore {
    pub fn new(clickhouse: &ClickHouseConfig, config: &QueryConfig, metrics: ApiMetrics) -> Self {
        Self {
            client: clickhouse
                .client()
                .with_setting("max_execution_time", config.timeout_seconds.to_string()),
            clickhouse: clickhouse.clone(),
            export_timeout_seconds: config.export_timeout_seconds,
            export_window_rows: config.export_window_rows,
            metrics,
            partitions: Arc::new(PartitionCache::new(config.count_cache_entries)),
            last_snapshots: Arc::default(),
        }
    }

    pub fn client(&self) -> &clickhouse::Client {
        &self.client
    }

    /// Runs a query (`condition` bound into `sql`), timed under `kind` in the metrics.
    async fn timed<T, F>(
        &self,
        kind: &str,
        condition: &Condition,
        sql: &str,
        run: impl FnOnce(clickhouse::query::Query) -> F,
    ) -> Result<T, ReadError>
    where
        F: std::future::Future<Output = clickhouse::error::Result<T>>,
    {
        let started = Instant::now();
        let result = run(condition.bind(self.client.query(sql))).await;
        self.metrics.observe_query(kind, started);
        result.map_err(ReadError::from)
    }

    async fn fetch_all<T>(
        &self,
        kind: &str,
        condition: &Condition,
        sql: &str,
    ) -> Result<Vec<T>, ReadError>
    where
        T: clickhouse::RowOwned + clickhouse::RowRead,
    {
        self.timed(kind, condition, sql, |q| q.fetch_all::<T>())
            .await
    }

    /// [`Self::fetch_all`] for a statement that returns exactly one row.
    async fn fetch_one<T>(
        &self,
        kind: &str,
        condition: &Condition,
        sql: &str,
    ) -> Result<T, ReadError>
    where
        T: clickhouse::RowOwned + clickhouse::RowRead,
    {
        self.timed(kind, condition, sql, |q| q.fetch_one::<T>())
            .await
    }
}

impl AuditLogStore {
    /// The time of the organization's oldest event under `filters` (None: no event).
    pub async fn oldest(
        &self,
        organization_id: &str,
        filters: &crate::query::Filters,
    ) -> Result<Option<i64>, ReadError> {
        let condition = Condition::on_rows(organization_id, filters);
        let sql = format!(
            "SELECT occurred_at_ms FROM {} WHERE {} ORDER BY occurred_at_ms ASC LIMIT 1",
            condition.table,
            condition.clause()
        );
        self.timed("oldest", &condition, &sql, |q| q.fetch_optional::<i64>())
            .await
    }
}
