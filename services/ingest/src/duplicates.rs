//! After insert: finds events stored more than once (an event id published twice upstream, or a
//! copy that slipped past the fences, see [`crate::fence`]), records the months that hold them
//! (`audit_event_duplicates`, read by the API, whose totals say they are approximate meanwhile)
//! and collapses those months (`OPTIMIZE ... PARTITION ... FINAL` of the events table and of
//! every copy table: ReplacingMergeTree keeps one row per event).
//!
//! Every flush notes the key ranges (organization, hour of event time) it inserted; every
//! [`CHECK_EVERY`] the watcher looks for keys stored twice within the ranges noted since, one
//! `GROUP BY` over those ranges only. A copy is therefore found within one interval of its
//! insert, and collapsed at the next turn of the watcher (of any replica: the pending months
//! are read from ClickHouse, so a replica that found a copy and died leaves it to the others).
//!
//! The check costs ClickHouse about 1 µs per row inserted (a `GROUP BY` over the new rows'
//! ranges): nothing at a steady few thousand events per second, but some 10% of the insert
//! work while a backlog is caught up at full speed. So while more than [`BUSY_ROWS`] rows
//! arrived in the last interval, the check waits, up to [`MAX_DEFER`]: the same work, done once
//! over the whole burst when it ends instead of during it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use audit_store::clickhouse::{self, Row};
use audit_store::{
    pending_duplicate_months, AuditEventRow, ClickHouseConfig, COPY_TABLES, DUPLICATES_TABLE,
    EVENTS_TABLE,
};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::IngestMetrics;
use crate::{locked, now_ms};

/// How often the watcher checks what was inserted since, and collapses pending months.
pub const CHECK_EVERY: Duration = Duration::from_secs(5);

/// Rows inserted in one [`CHECK_EVERY`] above which the check waits (20,000 events/s).
pub const BUSY_ROWS: u64 = 100_000;

/// The longest a check waits for a burst to end.
pub const MAX_DEFER: Duration = Duration::from_secs(60);

const HOUR_MS: i64 = 3_600_000;

/// Key ranges per statement of a check.
const RANGES_PER_STATEMENT: usize = 100;

/// Key ranges inserted and not checked yet: per (organization, hour of event time), the oldest
/// and newest event time.
#[derive(Default)]
pub struct DuplicateWatch {
    ranges: Mutex<BTreeMap<(String, i64), (i64, i64)>>,
    /// Rows noted since the watcher last looked.
    recent_rows: std::sync::atomic::AtomicU64,
}

impl DuplicateWatch {
    /// Notes the key ranges of inserted rows.
    pub fn note(&self, rows: &[AuditEventRow]) {
        self.recent_rows
            .fetch_add(rows.len() as u64, std::sync::atomic::Ordering::Relaxed);
        // Borrowed keys first: a batch covers few (organization, hour) ranges.
        let mut batch: HashMap<(&str, i64), (i64, i64)> = HashMap::new();
        for row in rows {
            let at = row.occurred_at_ms;
            let span = batch
                .entry((row.organization_id.as_str(), at.div_euclid(HOUR_MS)))
                .or_insert((at, at));
            span.0 = span.0.min(at);
            span.1 = span.1.max(at);
        }
        let mut ranges = locked(&self.ranges);
        for ((org, hour), (lo, hi)) in batch {
            let span = ranges.entry((org.to_owned(), hour)).or_insert((lo, hi));
            span.0 = span.0.min(lo);
            span.1 = span.1.max(hi);
        }
    }

    fn take(&self) -> Vec<(String, i64, i64)> {
        std::mem::take(&mut *locked(&self.ranges))
            .into_iter()
            .map(|((org, _), (lo, hi))| (org, lo, hi))
            .collect()
    }

    /// Puts back ranges a failed check did not cover.
    fn restore(&self, ranges: Vec<(String, i64, i64)>) {
        let mut known = locked(&self.ranges);
        for (org, lo, hi) in ranges {
            let span = known
                .entry((org, lo.div_euclid(HOUR_MS)))
                .or_insert((lo, hi));
            span.0 = span.0.min(lo);
            span.1 = span.1.max(hi);
        }
    }
}

#[derive(Debug, Row, Serialize)]
struct FindingRow<'a> {
    partition_id: &'a str,
    kind: &'a str,
    at_ms: u64,
    copies: u64,
}

/// Runs until `shutdown`: checks what was inserted, records and collapses what it finds.
pub async fn watch(
    watch: std::sync::Arc<DuplicateWatch>,
    store: ClickHouseConfig,
    metrics: IngestMetrics,
    shutdown: CancellationToken,
) {
    let client = store.client();
    let mut last_check = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(CHECK_EVERY) => {}
        }
        let recent = watch
            .recent_rows
            .swap(0, std::sync::atomic::Ordering::Relaxed);
        if due(recent, last_check.elapsed()) {
            last_check = std::time::Instant::now();
            check_noted(&watch, &client, &metrics).await;
        }
        if let Err(err) = collapse_pending(&store, &metrics).await {
            warn!(error = %err, "collapsing months that hold copies failed; trying again");
        }
    }
}

/// Whether the check runs now: unless a burst is being ingested (`recent` rows in the last
/// interval), or it has waited [`MAX_DEFER`] since the last check.
fn due(recent: u64, since_last: Duration) -> bool {
    recent <= BUSY_ROWS || since_last >= MAX_DEFER
}

/// Checks the ranges noted since the last call and records the months holding copies; ranges
/// of a failed check are kept for the next. Returns the surplus rows found.
pub async fn check_noted(
    watch: &DuplicateWatch,
    client: &clickhouse::Client,
    metrics: &IngestMetrics,
) -> u64 {
    let ranges = watch.take();
    if ranges.is_empty() {
        return 0;
    }
    let started = std::time::Instant::now();
    let checked = check(client, &ranges).await;
    metrics
        .duplicate_check_seconds
        .with_label_values(&[] as &[&str])
        .observe(started.elapsed().as_secs_f64());
    let found = match checked {
        Ok(found) => found,
        Err(err) => {
            warn!(error = %err, "duplicate check failed; checking again");
            watch.restore(ranges);
            return 0;
        }
    };
    if let Err(err) = record(client, &found, "found").await {
        warn!(error = %err, "cannot record months holding copies; checking again");
        watch.restore(ranges);
        return 0;
    }
    let copies: u64 = found.values().sum();
    if copies > 0 {
        metrics.duplicates_found.inc_by(copies);
        warn!(months = ?found.keys().collect::<Vec<_>>(), copies, "events stored more than once; collapsing their months");
    }
    copies
}

/// Per month, how many surplus rows the ranges hold (keys stored more than once).
pub async fn check(
    client: &clickhouse::Client,
    ranges: &[(String, i64, i64)],
) -> Result<BTreeMap<String, u64>, clickhouse::error::Error> {
    let mut found = BTreeMap::new();
    for chunk in ranges.chunks(RANGES_PER_STATEMENT) {
        let condition = vec![
            "(organization_id = ? AND occurred_at_ms >= ? AND occurred_at_ms <= ?)";
            chunk.len()
        ]
        .join(" OR ");
        let mut query = client.query(&format!(
            "SELECT toString(toYYYYMM(toDateTime(intDiv(occurred_at_ms, 1000), 'UTC'))) AS month, \
             sum(c - 1) FROM (SELECT occurred_at_ms, count() AS c FROM {EVENTS_TABLE} \
             WHERE {condition} GROUP BY organization_id, occurred_at_ms, id HAVING c > 1) \
             GROUP BY month"
        ));
        for (org, lo, hi) in chunk {
            query = query.bind(org.as_str()).bind(*lo).bind(*hi);
        }
        let rows: Vec<(String, u64)> = query.fetch_all().await?;
        for (month, copies) in rows {
            *found.entry(month).or_default() += copies;
        }
    }
    Ok(found)
}

async fn record(
    client: &clickhouse::Client,
    months: &BTreeMap<String, u64>,
    kind: &str,
) -> Result<(), clickhouse::error::Error> {
    if months.is_empty() {
        return Ok(());
    }
    let at_ms = now_ms();
    let mut insert = client.insert::<FindingRow<'_>>(DUPLICATES_TABLE).await?;
    for (month, copies) in months {
        insert
            .write(&FindingRow {
                partition_id: month,
                kind,
                at_ms,
                copies: *copies,
            })
            .await?;
    }
    insert.end().await
}

/// Collapses every pending month: merges each table's partition of that month into one part,
/// which keeps one row per event (on a cluster: on every shard, where the copies of an event
/// are, see [`audit_store::Topology`]). The collapse is recorded with the time it started, so
/// that a copy found after that time keeps the month pending.
pub async fn collapse_pending(
    store: &ClickHouseConfig,
    metrics: &IngestMetrics,
) -> Result<(), clickhouse::error::Error> {
    let client = store.client();
    let months: BTreeSet<String> = pending_duplicate_months(&client).await?;
    for month in months {
        // Only months as ClickHouse names them (`toYYYYMM`): the id is spliced into OPTIMIZE,
        // which takes no bound values.
        if month.len() != 6 || !month.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let started = now_ms();
        let clock = std::time::Instant::now();
        for table in std::iter::once(EVENTS_TABLE).chain(COPY_TABLES.iter().map(|c| c.table)) {
            let sql = format!(
                "OPTIMIZE TABLE {} PARTITION ID '{month}' FINAL",
                store.each_shard_table(table)
            );
            // An OPTIMIZE that finds the month's parts merging already (another replica
            // collapsing it, or a background merge) would do nothing and succeed: then the
            // month would be recorded as collapsed before it is. It must fail instead, and is
            // tried again.
            store
                .execute_everywhere(&sql, |c| c.with_setting("optimize_throw_if_noop", "1"))
                .await?;
        }
        let mut insert = client.insert::<FindingRow<'_>>(DUPLICATES_TABLE).await?;
        insert
            .write(&FindingRow {
                partition_id: &month,
                kind: "collapsed",
                at_ms: started,
                copies: 0,
            })
            .await?;
        insert.end().await?;
        metrics.duplicate_collapses.inc();
        info!(
            month,
            seconds = clock.elapsed().as_secs_f64(),
            "month collapsed: one row per event"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(org: &str, at: i64) -> AuditEventRow {
        AuditEventRow {
            organization_id: org.into(),
            occurred_at_ms: at,
            ..AuditEventRow::default()
        }
    }

    #[test]
    fn the_check_waits_for_a_burst_to_end_but_not_for_ever() {
        assert!(due(0, Duration::ZERO));
        assert!(due(BUSY_ROWS, CHECK_EVERY));
        assert!(!due(BUSY_ROWS + 1, CHECK_EVERY));
        assert!(!due(500_000, MAX_DEFER - Duration::from_secs(1)));
        assert!(due(500_000, MAX_DEFER));
    }

    #[test]
    fn ranges_are_kept_per_organization_and_hour() {
        let watch = DuplicateWatch::default();
        watch.note(&[row("a", 10), row("a", 5), row("b", 7)]);
        watch.note(&[row("a", HOUR_MS + 1), row("a", 20)]);
        let mut ranges = watch.take();
        ranges.sort();
        assert_eq!(
            ranges,
            [
                ("a".to_owned(), 5, 20),
                ("a".to_owned(), HOUR_MS + 1, HOUR_MS + 1),
                ("b".to_owned(), 7, 7)
            ]
        );
        assert!(watch.take().is_empty(), "taken once");
        watch.restore(ranges.clone());
        let mut again = watch.take();
        again.sort();
        assert_eq!(
            again, ranges,
            "a failed check is retried with the same ranges"
        );
    }
}
