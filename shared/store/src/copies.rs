//! The tables that keep the events table's rows free of copies, and the tables its materialized
//! views fill (migrations 0004 to 0006), named once for both services.

use std::collections::BTreeSet;

/// Per topic partition, the highest offset the ingest may have stored (migration 0006).
pub const INTENTS_TABLE: &str = "ingest_write_intents";

/// Months of `audit_events` holding copies of an event, and their collapses (migration 0006).
pub const DUPLICATES_TABLE: &str = "audit_event_duplicates";

/// A table a materialized view of `audit_events` fills: the view's `SELECT` list over
/// `audit_events`, and the table's sort key as read from the table and as computed from
/// `audit_events`. The ingest uses them to fill a copy that missed rows the events table holds
/// (ClickHouse writes the views after the events table, so an insert cut short in between
/// leaves the events stored and a copy without them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyTable {
    pub table: &'static str,
    pub select: &'static str,
    pub key: &'static str,
    pub key_from_events: &'static str,
}

/// Every table the views of `audit_events` fill, with their views' expressions (a test checks
/// them against the migrations).
pub const COPY_TABLES: &[CopyTable] = &[
    CopyTable {
        table: "audit_events_by_type",
        select: "organization_id, event_type, occurred_at_ms, id",
        key: "organization_id, event_type, occurred_at_ms, id",
        key_from_events: "organization_id, event_type, occurred_at_ms, id",
    },
    CopyTable {
        table: "audit_events_by_actor_email",
        select: "organization_id, lowerUTF8(ifNull(actor_email, '')) AS actor_email, occurred_at_ms, id",
        key: "organization_id, actor_email, occurred_at_ms, id",
        key_from_events: "organization_id, lowerUTF8(ifNull(actor_email, '')), occurred_at_ms, id",
    },
    CopyTable {
        table: "audit_events_by_actor_email_rows",
        select: "organization_id, lowerUTF8(ifNull(actor_email, '')) AS actor_email_key, occurred_at_ms, id, \
                 event_type, actor_id, actor_type, actor_email, actor_name, resource_type, resource_id, \
                 resource_name, affected_user_id, affected_user_email, changes, context_ip, \
                 context_user_agent, context_request_id, context_location, metadata, source_topic, \
                 source_partition, source_offset, ingested_at_ms",
        key: "organization_id, actor_email_key, occurred_at_ms, id",
        key_from_events: "organization_id, lowerUTF8(ifNull(actor_email, '')), occurred_at_ms, id",
    },
];

/// The statement listing the months (partition ids) of `audit_events` with a copy found and
/// not collapsed since, one `partition_id` a row (the API reads it in the same request as the
/// table's parts).
pub const PENDING_MONTHS_SQL: &str = "SELECT partition_id FROM audit_event_duplicates \
     GROUP BY partition_id HAVING maxIf(at_ms, kind = 'found') >= maxIf(at_ms, kind = 'collapsed')";

/// The months (partition ids) of `audit_events` with a copy found and not collapsed since.
pub async fn pending_duplicate_months(
    client: &clickhouse::Client,
) -> Result<BTreeSet<String>, clickhouse::error::Error> {
    let months: Vec<String> = client.query(PENDING_MONTHS_SQL).fetch_all().await?;
    Ok(months.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrations::MIGRATIONS;

    /// The expressions the ingest re-runs are the views' own: a view changed by a migration
    /// must change them too.
    #[test]
    fn the_pending_months_statement_reads_the_duplicates_table() {
        assert!(PENDING_MONTHS_SQL.contains(&format!("FROM {DUPLICATES_TABLE} ")));
    }

    #[test]
    fn copy_expressions_are_the_views_own() {
        let squash = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        let views: String = MIGRATIONS
            .iter()
            .flat_map(|m| m.statements())
            .filter(|s| s.contains("MATERIALIZED VIEW"))
            .map(|s| squash(&s))
            .collect::<Vec<_>>()
            .join("\n");
        for copy in COPY_TABLES {
            let view = format!(
                "TO {} AS SELECT {} FROM audit_events",
                copy.table,
                squash(copy.select)
            );
            assert!(views.contains(&view), "no view reads {view:?} in\n{views}");
        }
        assert_eq!(
            views.lines().count(),
            COPY_TABLES.len(),
            "a view without its copy table"
        );
    }
}
