//! The total of a page's filters: stored rows per month, distinct counts where copies are
//! pending, and the snapshot of months and pending copies both read from.

use std::collections::{BTreeSet, HashMap};

use audit_store::PENDING_MONTHS_SQL;

use super::months::Aggregated;
use super::sql::{Condition, Param};
use super::AuditLogStore;
use super::ReadError;
use crate::partitions::{self, Aggregate, Month};
use crate::query::Filters;

/// Up to this many stored rows, `total` is an exact count of distinct events.
pub const EXACT_TOTAL_LIMIT: u64 = 100_000;

/// What a request knows of the table its counts read: its months, and the months of
/// `audit_events` holding a copy of an event found and not collapsed yet.
#[derive(Debug, Clone, Default)]
pub(super) struct Snapshot {
    /// None when the table is not partitioned by month.
    pub(super) months: Option<Vec<Month>>,
    pub(super) pending: BTreeSet<String>,
}

/// Stored rows per month (month id -> rows) under a request's filters and range.
pub(super) type MonthRows = HashMap<String, u64>;

impl AuditLogStore {
    /// The months of `table` (its active parts) and the months with copies pending, in one
    /// query.
    pub(super) async fn snapshot(&self, table: &'static str) -> Result<Snapshot, ReadError> {
        let (listing, parts_sql) = self.parts_listing(table);
        // Rows with `pending` = 1 name a month with a copy pending; the others are parts.
        let sql = format!(
            "SELECT *, 0 AS pending FROM ({parts_sql}) \
             UNION ALL SELECT partition_id, '', 0, 1 FROM ({PENDING_MONTHS_SQL})"
        );
        let rows: Vec<(String, String, u32, u8)> =
            self.fetch_all("snapshot", &listing, &sql).await?;
        let mut parts = Vec::new();
        let mut pending = BTreeSet::new();
        for (partition, name, level, is_pending) in rows {
            if is_pending == 1 {
                pending.insert(partition);
            } else {
                parts.push((partition, name, level));
            }
        }
        let snapshot = Snapshot {
            months: partitions::months(&parts),
            pending,
        };
        if let Ok(mut last) = self.last_snapshots.lock() {
            last.insert(table, snapshot.clone());
        }
        Ok(snapshot)
    }

    /// The snapshot of `table` the last request took, if any.
    pub(super) fn last_snapshot(&self, table: &'static str) -> Option<Snapshot> {
        self.last_snapshots.lock().ok()?.get(table).cloned()
    }

    /// Number of events matching the filters, and whether it is exact (see [`Self::count_in`]).
    pub async fn count(
        &self,
        organization_id: &str,
        filters: &Filters,
    ) -> Result<(u64, bool), ReadError> {
        let (total, exact, _) = self.total(organization_id, filters).await?;
        Ok((total, exact))
    }

    /// [`Self::count_in`] with a snapshot of its own. Without a count cache nothing needs the
    /// months before counting: the stored rows are counted beside the snapshot, and are the
    /// total when no month in range holds a copy pending.
    pub(super) async fn total(
        &self,
        organization_id: &str,
        filters: &Filters,
    ) -> Result<(u64, bool, Option<MonthRows>), ReadError> {
        let condition = Condition::on_keys(organization_id, filters);
        if self.partitions.enabled() {
            let snapshot = self.snapshot(condition.table).await?;
            return self.count_in(organization_id, filters, &snapshot).await;
        }
        let sql = format!(
            "SELECT count() FROM {} WHERE {}",
            condition.table,
            condition.clause()
        );
        let (snapshot, stored) = tokio::try_join!(
            self.snapshot(condition.table),
            self.fetch_one::<u64>("count", &condition, &sql)
        )?;
        let (from, to) = (filters.from_ms, filters.to_ms);
        if snapshot.months.as_deref().is_some_and(|months| {
            months
                .iter()
                .filter(|m| m.meets(from, to))
                .all(|m| !snapshot.pending.contains(&m.id))
        }) {
            return Ok((stored, true, None));
        }
        self.count_in(organization_id, filters, &snapshot).await
    }

    /// Number of events matching the filters, whether it is exact, and the stored rows per
    /// month when they were counted month by month. The ingest stores no copy of its own
    /// re-deliveries, and finds and collapses copies of events published twice upstream
    /// (`audit_event_duplicates`), so the stored rows of a month are its events unless a copy
    /// was found there and not collapsed yet: then the total is the stored-row count of every
    /// month in range (counted per month, and a month whose parts did not change since an
    /// earlier request is not counted again, see [`crate::partitions`]), and exact. In a month
    /// with a copy pending the old rules apply: up to [`EXACT_TOTAL_LIMIT`] events it counts
    /// distinct events; above, it is the number of stored rows (exceeding the events by the
    /// copies not collapsed yet), exact only when every month in range is one merged part.
    pub(super) async fn count_in(
        &self,
        organization_id: &str,
        filters: &Filters,
        snapshot: &Snapshot,
    ) -> Result<(u64, bool, Option<MonthRows>), ReadError> {
        let condition = Condition::on_keys(organization_id, filters);
        let table = condition.table;
        let distinct_sql = Self::distinct_sql(&condition);
        let distinct = || self.fetch_one::<u64>("count_distinct", &condition, &distinct_sql);
        let span = (filters.from_ms, filters.to_ms);
        let months = &snapshot.months;
        let stored = || self.stored_count(organization_id, filters, &condition, months.clone());
        if months.as_deref().is_some_and(|m| {
            m.iter()
                .filter(|m| m.meets(span.0, span.1))
                .all(|m| !snapshot.pending.contains(&m.id))
        }) {
            let counted = stored().await?;
            return Ok((counted.value, true, counted.per_month));
        }
        if months
            .as_deref()
            .is_some_and(|m| partitions::all_merged(m, span.0, span.1))
        {
            // No month in range can hold a copy: the stored rows are the events. A month
            // counted just now must still be the merged part it was listed as, since a part
            // written in between could hold a copy that the count included.
            let counted = stored().await?;
            let settled = self.still_listed(table, &counted.counted_now).await?;
            return Ok((counted.value, settled, counted.per_month));
        }
        if filters.is_selective() {
            if let Some(total) = self
                .count_open_months(organization_id, filters, &condition, months.as_deref())
                .await?
            {
                return Ok((total.0, total.1, None));
            }
            // Likely a small set: one scan settles it.
            let n = distinct().await?;
            if n <= EXACT_TOTAL_LIMIT {
                return Ok((n, true, None));
            }
            let counted = stored().await?;
            return Ok((counted.value, false, counted.per_month));
        }
        let counted = stored().await?;
        let n = counted.value;
        if n > EXACT_TOTAL_LIMIT || n == 0 {
            return Ok((n, n == 0, counted.per_month));
        }
        Ok((distinct().await?, true, counted.per_month))
    }

    /// A distinct count of the events under `condition` that stops past [`EXACT_TOTAL_LIMIT`]:
    /// exact for small sets, cheap for big ones.
    pub(super) fn distinct_sql(condition: &Condition) -> String {
        format!(
            "SELECT count() FROM (SELECT DISTINCT occurred_at_ms, id FROM {} WHERE {} LIMIT {})",
            condition.table,
            condition.sql,
            EXACT_TOTAL_LIMIT + 1
        )
    }

    /// A selective total when some months in range are one merged part and others are not:
    /// the merged months' stored rows are their events (counted per month and kept, see
    /// [`Self::stored_count`]), and one distinct count over the other months settles those
    /// (the months where new events and re-deliveries land, usually the current one). None
    /// when no month is merged, or the other months hold more than [`EXACT_TOTAL_LIMIT`].
    /// Exact like the all-merged case: a merged month counted just now must still be listed
    /// the same afterwards.
    pub(super) async fn count_open_months(
        &self,
        organization_id: &str,
        filters: &Filters,
        condition: &Condition,
        months: Option<&[Month]>,
    ) -> Result<Option<(u64, bool)>, ReadError> {
        let (merged, open): (Vec<Month>, Vec<Month>) = months
            .unwrap_or_default()
            .iter()
            .filter(|m| m.meets(filters.from_ms, filters.to_ms))
            .cloned()
            .partition(|m| m.merged);
        if merged.is_empty() || open.is_empty() {
            return Ok(None);
        }
        let mut in_open = condition.clone();
        let ranges: Vec<String> = open
            .iter()
            .map(|m| {
                let from = in_open.param(Param::Int(m.start_ms));
                let to = in_open.param(Param::Int(m.end_ms));
                format!("(occurred_at_ms >= {from} AND occurred_at_ms < {to})")
            })
            .collect();
        in_open.and(&format!("({})", ranges.join(" OR ")));
        let sql = Self::distinct_sql(&in_open);
        let (in_open_months, in_merged_months) = tokio::try_join!(
            self.fetch_one::<u64>("count_distinct", &in_open, &sql),
            self.stored_count(organization_id, filters, condition, Some(merged)),
        )?;
        if in_open_months > EXACT_TOTAL_LIMIT {
            return Ok(None);
        }
        let settled = self
            .still_listed(condition.table, &in_merged_months.counted_now)
            .await?;
        Ok(Some((in_merged_months.value + in_open_months, settled)))
    }

    /// Whether the months just counted are still listed with the same parts (true for none):
    /// a part written in between could hold a re-delivery that the count included.
    pub(super) async fn still_listed(
        &self,
        table: &str,
        counted_now: &[Month],
    ) -> Result<bool, ReadError> {
        if counted_now.is_empty() {
            return Ok(true);
        }
        let now = self.months(table).await?.unwrap_or_default();
        Ok(counted_now.iter().all(|month| now.contains(month)))
    }

    /// The two conditions of a count split by month (see [`Self::stored_count`]): the months
    /// lying wholly within `from`/`to` are counted under the filters without the time bounds,
    /// so that any range (a poller's moving `to`, say) reuses what was counted for its whole
    /// months; only the months at its edges are counted with the bounds.
    pub(super) fn split_months(
        organization_id: &str,
        filters: &Filters,
        months: Vec<Month>,
    ) -> ((Condition, Vec<Month>), Vec<Month>) {
        let span = (filters.from_ms, filters.to_ms);
        let (whole, edges): (Vec<Month>, Vec<Month>) = months
            .into_iter()
            .filter(|m| m.meets(span.0, span.1))
            .partition(|m| m.within(span.0, span.1));
        let unbounded = Filters {
            from_ms: None,
            to_ms: None,
            ..filters.clone()
        };
        (
            (Condition::on_keys(organization_id, &unbounded), whole),
            edges,
        )
    }

    /// The stored rows per month that earlier requests counted under a page's filters (see
    /// [`Self::stored_count`]), whatever happened to the months since.
    pub(super) fn month_hints(
        &self,
        organization_id: &str,
        filters: &Filters,
        months: &[Month],
    ) -> MonthRows {
        let ((unbounded, whole), edges) =
            Self::split_months(organization_id, filters, months.to_vec());
        let bounded = Condition::on_keys(organization_id, filters);
        let mut hints = MonthRows::new();
        for (condition, months) in [(unbounded, whole), (bounded, edges)] {
            let known = self
                .partitions
                .last_values(&Self::aggregate_key(&condition, Aggregate::Count));
            for month in months {
                if let Some(n) = known.get(&month.id) {
                    hints.insert(month.id, *n);
                }
            }
        }
        hints
    }

    /// Stored rows matching the filters, per month (see [`Self::by_month`] and
    /// [`Self::split_months`]). `bounded` is `Condition::on_keys` of the filters.
    pub(super) async fn stored_count(
        &self,
        organization_id: &str,
        filters: &Filters,
        bounded: &Condition,
        months: Option<Vec<Month>>,
    ) -> Result<Aggregated, ReadError> {
        let span = (filters.from_ms, filters.to_ms);
        let Some(months) = months else {
            return self.by_month(bounded, Aggregate::Count, None, span).await;
        };
        let ((unbounded, whole), edges) = Self::split_months(organization_id, filters, months);
        // The whole months' own range, on the sides where the filters bound it: without a
        // cache the whole months are counted in one query over it.
        let whole_span = (
            span.0.and(whole.first().map(|m| m.start_ms)),
            span.1.and(whole.last().map(|m| m.end_ms)),
        );
        let (whole, edges) = tokio::try_join!(
            self.by_month(&unbounded, Aggregate::Count, Some(whole), whole_span),
            async {
                if edges.is_empty() {
                    return Ok(None);
                }
                self.by_month(bounded, Aggregate::Count, Some(edges), span)
                    .await
                    .map(Some)
            },
        )?;
        let Some(edges) = edges else {
            return Ok(whole);
        };
        let per_month = match (whole.per_month, edges.per_month) {
            (Some(mut a), Some(b)) => {
                a.extend(b);
                Some(a)
            }
            _ => None,
        };
        let mut counted_now = whole.counted_now;
        counted_now.extend(edges.counted_now);
        Ok(Aggregated {
            value: whole.value + edges.value,
            counted_now,
            per_month,
        })
    }
}
