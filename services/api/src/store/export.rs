//! What an export reads.

use std::time::{Duration, Instant};

use audit_store::{clickhouse, ClickHouseConfig};

use super::record::{EventCursor, EventRecord};
use super::sql::{order_by, Condition};
use super::AuditLogStore;
use super::ReadError;
use crate::query::{Filters, SortOrder};
use crate::time::HOUR_MS;

/// The queries of one export (see [`AuditLogStore::export`]). ClickHouse 18.16 sorts every row
/// of a query before it sends the first (no read-in-order), and sorting full rows costs it more
/// than reading them: a million rows of the benchmark take 1.0-1.3 s sorted against 0.15 s
/// unsorted (`FORMAT Null`). So an export reads its range in time windows of a few ten thousand
/// rows, each without `ORDER BY`, and the service orders each window (see
/// `export::start`); [`Self::hours`] sizes the windows. Without `FINAL` either: it
/// would merge every part of the range first; re-deliveries not merged yet are dropped as
/// twins when the window is put in order, since they share (time, id) and so their window.
#[derive(Clone)]
pub struct ExportSource {
    clickhouse: ClickHouseConfig,
    client: clickhouse::Client,
    condition: Condition,
    pub sort: SortOrder,
    /// `query.export_window_rows`.
    pub window_rows: u64,
    /// `query.export_timeout_seconds` from the start of the export, over all its queries.
    deadline: Option<Instant>,
}

impl ExportSource {
    /// The same source with a client (and connection pool) of its own: a reader thread opens
    /// its connections on its own runtime, so that they never wake another thread.
    pub fn with_own_client(&self) -> Self {
        Self {
            client: self.clickhouse.client(),
            ..self.clone()
        }
    }

    /// Stored rows per hour of the export's range (hours since the epoch, ascending).
    pub async fn hours(&self) -> Result<Vec<(i64, u64)>, ReadError> {
        let sql = format!(
            "SELECT toInt64(intDiv(occurred_at_ms, {HOUR_MS})) AS hour, count() \
             FROM {} WHERE {} GROUP BY hour ORDER BY hour",
            self.condition.table, self.condition.sql,
        );
        self.query(&self.condition, &sql)?
            .fetch_all::<(i64, u64)>()
            .await
            .map_err(ReadError::from)
    }

    /// The events with `from_ms <= time < to_ms` (None: unbounded), in `self.sort` order when
    /// `sorted`, else in the order ClickHouse reads them.
    pub fn rows(
        &self,
        from_ms: Option<i64>,
        to_ms: Option<i64>,
        sorted: bool,
    ) -> Result<EventCursor, ReadError> {
        let mut condition = self.condition.clone();
        condition.between(from_ms, to_ms);
        let order = if sorted {
            order_by(self.sort)
        } else {
            String::new()
        };
        let sql = format!(
            "SELECT ?fields FROM {} WHERE {} {order}",
            condition.table, condition.sql
        );
        self.query(&condition, &sql)?
            .fetch::<EventRecord<'_>>()
            .map_err(ReadError::from)
    }

    /// `sql` with `condition` bound, limited to what is left of the export's time.
    fn query(
        &self,
        condition: &Condition,
        sql: &str,
    ) -> Result<clickhouse::query::Query, ReadError> {
        let mut client = self.client.clone();
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ReadError::Timeout);
            }
            let seconds = left.as_secs_f64().ceil() as u64;
            client = client.with_setting("max_execution_time", seconds.to_string());
        }
        Ok(condition.bind(client.query(sql)))
    }
}

impl AuditLogStore {
    /// What an export reads (see [`ExportSource`]).
    pub fn export(
        &self,
        organization_id: &str,
        filters: &Filters,
        sort: SortOrder,
    ) -> ExportSource {
        let timeout = self.export_timeout_seconds;
        ExportSource {
            clickhouse: self.clickhouse.clone(),
            client: self.clickhouse.client(),
            condition: Condition::on_rows(organization_id, filters),
            sort,
            window_rows: self.export_window_rows,
            deadline: (timeout > 0).then(|| Instant::now() + Duration::from_secs(timeout)),
        }
    }
}
