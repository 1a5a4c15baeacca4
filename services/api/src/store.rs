//! The read side of `audit_events`: builds the SQL of a page, a count or an export, always scoped
//! to the caller's organization, with every filter value bound (the `clickhouse` crate escapes
//! bound values; ClickHouse 18.16 has no server-side query parameters).
//!
//! De-duplication: `FINAL` collapses rows that share the sorting key (organization, time, id),
//! so a re-delivered event shows once even before the background merge ran.

use std::time::Instant;

use audit_store::clickhouse::{self, Row};
use audit_store::EVENTS_TABLE;
use serde::Deserialize;

use crate::error::{from_clickhouse, ApiError};
use crate::metrics::ApiMetrics;
use crate::query::{Cursor, Filters, SortOrder};

/// One event as the read path returns it (the lineage columns stay internal).
#[derive(Debug, Clone, PartialEq, Row, Deserialize)]
pub struct EventRecord {
    pub id: String,
    pub occurred_at_ms: i64,
    pub event_type: String,
    pub actor_id: String,
    pub actor_type: String,
    pub actor_email: Option<String>,
    pub actor_name: Option<String>,
    pub affected_user_id: Option<String>,
    pub affected_user_email: Option<String>,
    pub resource_type: String,
    pub resource_id: String,
    pub resource_name: Option<String>,
    pub changes: String,
    pub context_ip: Option<String>,
    pub context_user_agent: Option<String>,
    pub context_request_id: Option<String>,
    pub context_location: Option<String>,
    pub metadata: Option<String>,
}

/// A value to bind to the next `?` of the SQL text.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Bound {
    Text(String),
    Int(i64),
}

/// `WHERE` clause text with `?` placeholders, and the values for them in order.
#[derive(Debug, Default)]
struct Condition {
    sql: String,
    values: Vec<Bound>,
}

impl Condition {
    fn and(&mut self, sql: &str, values: impl IntoIterator<Item = Bound>) {
        if !self.sql.is_empty() {
            self.sql.push_str(" AND ");
        }
        self.sql.push_str(sql);
        self.values.extend(values);
    }

    /// Organization first: no statement is built without it.
    fn scoped(organization_id: &str, filters: &Filters) -> Self {
        let mut c = Condition::default();
        c.and(
            "organization_id = ?",
            [Bound::Text(organization_id.to_owned())],
        );
        if let Some(from) = filters.from_ms {
            c.and("occurred_at_ms >= ?", [Bound::Int(from)]);
        }
        if let Some(to) = filters.to_ms {
            c.and("occurred_at_ms < ?", [Bound::Int(to)]);
        }
        let text = |v: &Option<String>| v.clone().map(Bound::Text);
        if let Some(v) = text(&filters.event_type) {
            c.and("event_type = ?", [v]);
        }
        if let Some(v) = text(&filters.actor_id) {
            c.and("actor_id = ?", [v]);
        }
        if let Some(v) = text(&filters.actor_email) {
            c.and("lowerUTF8(actor_email) = ?", [v]);
        }
        if let Some(v) = text(&filters.resource_type) {
            c.and("resource_type = ?", [v]);
        }
        if let Some(v) = text(&filters.resource_id) {
            c.and("resource_id = ?", [v]);
        }
        c
    }

    /// Strictly after the cursor's (time, id) in its sort order. The plain bound on time comes
    /// first so that ClickHouse can skip by the primary key.
    fn after(&mut self, cursor: &Cursor) {
        let (bound, strict, id) = match cursor.sort {
            SortOrder::Desc => ("occurred_at_ms <= ?", "occurred_at_ms < ?", "id < ?"),
            SortOrder::Asc => ("occurred_at_ms >= ?", "occurred_at_ms > ?", "id > ?"),
        };
        let t = cursor.occurred_at_ms;
        self.and(bound, [Bound::Int(t)]);
        self.and(
            &format!("({strict} OR {id})"),
            [Bound::Int(t), Bound::Text(cursor.id.clone())],
        );
    }

    fn bind(&self, mut query: clickhouse::query::Query) -> clickhouse::query::Query {
        for value in &self.values {
            query = match value {
                Bound::Text(text) => query.bind(text.as_str()),
                Bound::Int(n) => query.bind(*n),
            };
        }
        query
    }
}

/// What a page query asks for.
pub struct PageRequest<'a> {
    pub organization_id: &'a str,
    pub filters: &'a Filters,
    pub sort: SortOrder,
    /// Rows to return; the store fetches one more to know whether a next page exists.
    pub limit: u32,
    pub offset: u64,
    pub cursor: Option<&'a Cursor>,
}

/// Queries `audit_events` for the API.
#[derive(Clone)]
pub struct AuditLogStore {
    client: clickhouse::Client,
    export_client: clickhouse::Client,
    metrics: ApiMetrics,
}

impl AuditLogStore {
    pub fn new(
        client: clickhouse::Client,
        timeout_seconds: u64,
        export_timeout_seconds: u64,
        metrics: ApiMetrics,
    ) -> Self {
        Self {
            export_client: client
                .clone()
                .with_setting("max_execution_time", export_timeout_seconds.to_string()),
            client: client.with_setting("max_execution_time", timeout_seconds.to_string()),
            metrics,
        }
    }

    pub fn client(&self) -> &clickhouse::Client {
        &self.client
    }

    fn order_by(sort: SortOrder) -> String {
        let dir = sort.sql();
        format!("ORDER BY occurred_at_ms {dir}, id {dir}")
    }

    /// Up to `limit + 1` events of the page, in order.
    pub async fn page(&self, request: &PageRequest<'_>) -> Result<Vec<EventRecord>, ApiError> {
        let mut condition = Condition::scoped(request.organization_id, request.filters);
        let offset = match request.cursor {
            Some(cursor) => {
                condition.after(cursor);
                0
            }
            None => request.offset,
        };
        let sql = format!(
            "SELECT ?fields FROM {EVENTS_TABLE} FINAL WHERE {} {} LIMIT {}, {}",
            condition.sql,
            Self::order_by(request.sort),
            offset,
            u64::from(request.limit) + 1
        );
        let started = Instant::now();
        let result = condition
            .bind(self.client.query(&sql))
            .fetch_all::<EventRecord>()
            .await;
        self.metrics.observe_query("page", started);
        result.map_err(|err| from_clickhouse(&err))
    }

    /// Exact number of distinct events matching the filters.
    pub async fn count(&self, organization_id: &str, filters: &Filters) -> Result<u64, ApiError> {
        let condition = Condition::scoped(organization_id, filters);
        let sql = format!(
            "SELECT count() FROM {EVENTS_TABLE} FINAL WHERE {}",
            condition.sql
        );
        let started = Instant::now();
        let result = condition
            .bind(self.client.query(&sql))
            .fetch_one::<u64>()
            .await;
        self.metrics.observe_query("count", started);
        result.map_err(|err| from_clickhouse(&err))
    }

    /// A cursor over matching events, read as the client consumes them. `page` bounds it to
    /// (limit, offset); None streams everything (export).
    pub fn stream(
        &self,
        organization_id: &str,
        filters: &Filters,
        sort: SortOrder,
        page: Option<(u32, u64)>,
        cursor: Option<&Cursor>,
    ) -> Result<clickhouse::query::RowCursor<EventRecord>, ApiError> {
        let mut condition = Condition::scoped(organization_id, filters);
        let offset = match (cursor, page) {
            (Some(cursor), _) => {
                condition.after(cursor);
                0
            }
            (None, Some((_, offset))) => offset,
            (None, None) => 0,
        };
        let limit = page
            .map(|(limit, _)| format!(" LIMIT {offset}, {limit}"))
            .unwrap_or_default();
        let sql = format!(
            "SELECT ?fields FROM {EVENTS_TABLE} FINAL WHERE {} {}{limit}",
            condition.sql,
            Self::order_by(sort),
        );
        let client = if page.is_some() {
            &self.client
        } else {
            &self.export_client
        };
        condition
            .bind(client.query(&sql))
            .fetch::<EventRecord>()
            .map_err(|err| from_clickhouse(&err))
    }

    /// Ingest time of the newest stored event, epoch milliseconds (None on an empty table).
    pub async fn newest_ingested_at(&self) -> Result<Option<u64>, ApiError> {
        let sql = format!("SELECT max(ingested_at_ms) FROM {EVENTS_TABLE}");
        let newest = self
            .client
            .query(&sql)
            .fetch_one::<u64>()
            .await
            .map_err(|err| from_clickhouse(&err))?;
        Ok((newest > 0).then_some(newest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_statement_starts_with_the_organization_and_binds_all_values() {
        let filters = Filters {
            from_ms: Some(1),
            to_ms: Some(2),
            event_type: Some("a' OR 1=1 --".to_owned()),
            actor_id: Some("b".to_owned()),
            actor_email: Some("c".to_owned()),
            resource_type: Some("d".to_owned()),
            resource_id: Some("e".to_owned()),
        };
        let condition = Condition::scoped("org", &filters);
        assert!(condition.sql.starts_with("organization_id = ?"));
        assert!(!condition.sql.contains("OR 1=1"));
        assert_eq!(condition.sql.matches('?').count(), condition.values.len());
        assert_eq!(condition.values.len(), 8);
    }

    #[test]
    fn a_cursor_continues_strictly_after_its_event() {
        let mut condition = Condition::default();
        condition.after(&Cursor {
            sort: SortOrder::Desc,
            occurred_at_ms: 10,
            id: "x".to_owned(),
            filters: String::new(),
        });
        assert_eq!(
            condition.sql,
            "occurred_at_ms <= ? AND (occurred_at_ms < ? OR id < ?)"
        );
        assert_eq!(condition.values.len(), 3);
    }
}
