//! One page of events: its keys (and rows) read in a window of months, beside its total.

use super::record::{EventCursor, EventRecord};
use super::sql::{order_by, Condition, Param};
use super::window::Window;
use super::ReadError;
use super::{AuditLogStore, Snapshot};
use crate::query::{Cursor, Filters, SortOrder};

/// What a page is made of, one per event: built from the stored record as it is read (the
/// HTTP layer's JSON item, say), so that the store needs to know nothing of it.
pub trait PageItem: for<'r, 'a> From<&'r EventRecord<'a>> + Send {}

impl<T> PageItem for T where T: for<'r, 'a> From<&'r EventRecord<'a>> + Send {}

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

impl PageRequest<'_> {
    pub(super) fn wanted(&self) -> u64 {
        u64::from(self.limit) + 1
    }

    pub(super) fn offset(&self) -> u64 {
        if self.cursor.is_some() {
            0
        } else {
            self.offset
        }
    }
}

/// A page as [`AuditLogStore::page`] reads it, with the total of its filters.
pub struct Page<T> {
    /// The (time, id) keys of the page's events, in order, at most `limit`.
    pub keys: Vec<(i64, String)>,
    /// The events themselves, when asked for.
    pub items: Option<Vec<T>>,
    /// Whether events follow the page.
    pub more: bool,
    pub total: u64,
    pub total_exact: bool,
}

impl AuditLogStore {
    /// One page of events and the total of its filters.
    ///
    /// A first page (or a cursor page) is read while the total is counted, in a window sized
    /// by the months the last request listed and the per-month counts the cache kept (a month
    /// that received rows since holds at least as many; a window that comes back short is
    /// read again whole). A page at an offset waits for the total's exact per-month counts
    /// and skips the whole months its offset passes.
    ///
    /// `items`: whether to read the events (JSON) or only their keys (CSV, which streams the
    /// events afterwards with [`Self::page_rows_cursor`]).
    pub async fn page<T: PageItem>(
        &self,
        request: &PageRequest<'_>,
        items: bool,
    ) -> Result<Page<T>, ReadError> {
        let filters = request.filters;
        let org = request.organization_id;
        let table = Condition::on_keys(org, filters).table;
        // A window sized by the counts kept from earlier requests (lower bounds).
        let hinted = |snapshot: &Snapshot| {
            let months = snapshot.months.clone().unwrap_or_default();
            let hints = self.month_hints(org, filters, &months);
            Window::of(request, &months, &hints, false, &snapshot.pending)
        };
        let ((keys, rows, more), (total, total_exact)) = if request.offset() == 0 {
            // The window from what the last request saw of the table: a month listed since
            // or a month that received rows since holds at least what the window counts.
            let window = hinted(&self.last_snapshot(table).unwrap_or_default());
            let (page, (total, exact, _)) = tokio::try_join!(
                self.read_page(request, window, items),
                self.total(org, filters)
            )?;
            (page, (total, exact))
        } else {
            let snapshot = self.snapshot(table).await?;
            let (total, exact, per_month) = self.count_in(org, filters, &snapshot).await?;
            let window = match &per_month {
                Some(rows) => {
                    let months = snapshot.months.as_deref().unwrap_or_default();
                    Window::of(request, months, rows, true, &snapshot.pending)
                }
                None => hinted(&snapshot),
            };
            (
                self.read_page(request, window, items).await?,
                (total, exact),
            )
        };
        Ok(Page {
            keys,
            items: rows,
            more,
            total,
            total_exact,
        })
    }

    /// The page's keys (and events, with `items`) read in `window`; again over the whole range
    /// when a narrowed window comes back short (its months held fewer events than counted:
    /// re-deliveries, or rows removed since), and with FINAL when the page shows an event twice
    /// (a copy not found yet).
    pub(super) async fn read_page<T: PageItem>(
        &self,
        request: &PageRequest<'_>,
        window: Window,
        items: bool,
    ) -> Result<(Vec<(i64, String)>, Option<Vec<T>>, bool), ReadError> {
        let wanted = request.wanted() as usize;
        let mut window = window;
        loop {
            let (keys, rows) = if items {
                self.page_items(request, &window).await?
            } else {
                (self.page_keys(request, &window).await?, None)
            };
            let twice = keys.windows(2).any(|pair| pair[0] == pair[1]);
            if twice && !window.copies {
                window.copies = true;
                continue;
            }
            if keys.len() < wanted && window.narrowed {
                window = Window::whole(request);
                continue;
            }
            let more = keys.len() >= wanted;
            let limit = request.limit as usize;
            let mut keys = keys;
            keys.truncate(limit);
            let rows = rows.map(|mut rows| {
                rows.truncate(limit);
                rows
            });
            return Ok((keys, rows, more));
        }
    }

    /// The page's condition on `table`-like `base`, limited to the window and the cursor.
    pub(super) fn page_condition(
        base: Condition,
        request: &PageRequest<'_>,
        window: &Window,
    ) -> Condition {
        let mut condition = base;
        condition.between(window.from_ms, window.to_ms);
        if let Some(cursor) = request.cursor {
            condition.after(cursor);
        }
        condition
    }

    /// `SELECT` text over the page's condition: `columns`, ordered, offset and limited.
    pub(super) fn page_sql(
        columns: &str,
        condition: &Condition,
        request: &PageRequest<'_>,
        window: &Window,
    ) -> String {
        format!(
            "SELECT {columns} FROM {}{} WHERE {} {} LIMIT {}, {}",
            condition.table,
            if window.copies { " FINAL" } else { "" },
            condition.sql,
            order_by(request.sort),
            window.offset,
            request.wanted(),
        )
    }

    /// The (time, id) keys of the page in `window`: up to `limit + 1` of them, in order.
    pub(super) async fn page_keys(
        &self,
        request: &PageRequest<'_>,
        window: &Window,
    ) -> Result<Vec<(i64, String)>, ReadError> {
        let base = Condition::on_keys(request.organization_id, request.filters);
        let condition = Self::page_condition(base, request, window);
        let sql = Self::page_sql("occurred_at_ms, id", &condition, request, window);
        self.fetch_all("page_keys", &condition, &sql).await
    }

    /// The page's events in `window`, with their keys. One query on the table of full rows
    /// (ClickHouse 26.9 reads it in sort-key order and reads the other columns of the page's
    /// rows only); a filter on event type alone over more than a month reads the keys from its
    /// key-only table first, then the rows by key.
    pub(super) async fn page_items<T: PageItem>(
        &self,
        request: &PageRequest<'_>,
        window: &Window,
    ) -> Result<(Vec<(i64, String)>, Option<Vec<T>>), ReadError> {
        let base = Condition::on_rows(request.organization_id, request.filters);
        // A filter on event type alone reads the full rows directly when the window is one
        // month: read in order, ClickHouse stops at the page's last match, and the counts put
        // enough matches in that month (at worst it reads the month's event types, about 3 ms
        // for 400,000 rows). A wider window could hold a rare type thinly spread.
        let one_month = window.months.is_some_and(|n| n <= 1);
        if Condition::on_keys(request.organization_id, request.filters).table != base.table
            && !one_month
        {
            let keys = self.page_keys(request, window).await?;
            let items = self.page_rows(request, &keys).await?;
            return Ok((keys, Some(items)));
        }
        let condition = Self::page_condition(base, request, window);
        let sql = Self::page_sql("?fields", &condition, request, window);
        self.timed("page_rows", &condition, &sql, |query| async move {
            let mut cursor = query.fetch::<EventRecord<'_>>()?;
            let mut keys = Vec::new();
            let mut items = Vec::new();
            while let Some(row) = cursor.next().await? {
                keys.push((row.occurred_at_ms, row.id.to_owned()));
                items.push(T::from(&row));
            }
            Ok((keys, Some(items)))
        })
        .await
    }

    /// The events of `keys` in their order, as JSON items, one each (a copy not merged yet is
    /// one event).
    pub(super) async fn page_rows<T: PageItem>(
        &self,
        request: &PageRequest<'_>,
        keys: &[(i64, String)],
    ) -> Result<Vec<T>, ReadError> {
        let Some((condition, sql)) = Self::rows_query(request, keys) else {
            return Ok(Vec::new());
        };
        self.timed("page_rows", &condition, &sql, |query| async move {
            let mut cursor = query.fetch::<EventRecord<'_>>()?;
            let mut items = Vec::with_capacity(keys.len());
            while let Some(row) = cursor.next().await? {
                items.push(T::from(&row));
            }
            Ok(items)
        })
        .await
    }

    /// The same rows as [`Self::page_rows`], as a cursor (CSV pages).
    pub fn page_rows_cursor(
        &self,
        request: &PageRequest<'_>,
        keys: &[(i64, String)],
    ) -> Result<Option<EventCursor>, ReadError> {
        let Some((condition, sql)) = Self::rows_query(request, keys) else {
            return Ok(None);
        };
        condition
            .bind(self.client.query(&sql))
            .fetch::<EventRecord<'_>>()
            .map(Some)
            .map_err(ReadError::from)
    }

    pub(super) fn rows_query(
        request: &PageRequest<'_>,
        keys: &[(i64, String)],
    ) -> Option<(Condition, String)> {
        let earliest = keys.iter().map(|(t, _)| *t).min()?;
        let latest = keys.iter().map(|(t, _)| *t).max()?;
        // PREWHERE on the id set first: ClickHouse then reads the other columns only for the
        // granules that hold a page row (a page spread over days would otherwise read every
        // column of every row in between). An IN set, not has(array): a hash lookup per row.
        let mut condition = Condition::on_rows(request.organization_id, request.filters);
        condition.between(Some(earliest), Some(latest.saturating_add(1)));
        let ids = condition.param(Param::Texts(
            keys.iter().map(|(_, id)| id.clone()).collect(),
        ));
        // LIMIT 1 BY: a re-delivery not merged yet is one event.
        let sql = format!(
            "SELECT ?fields FROM {} PREWHERE id IN {ids} WHERE {} {} LIMIT 1 BY occurred_at_ms, id",
            condition.table,
            condition.sql,
            order_by(request.sort),
        );
        Some((condition, sql))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sql::tests::placeholders;

    /// The page's id set comes after the filters' parameters, and every placeholder has one.
    #[test]
    fn rows_by_key_send_the_id_set_as_an_array() {
        let filters = Filters {
            resource_type: Some("team".to_owned()),
            ..Filters::default()
        };
        let request = PageRequest {
            organization_id: "org",
            filters: &filters,
            sort: SortOrder::Desc,
            limit: 2,
            offset: 0,
            cursor: None,
        };
        let keys = vec![(20, "b".to_owned()), (10, "a".to_owned())];
        let (condition, sql) = AuditLogStore::rows_query(&request, &keys).unwrap();
        assert!(
            sql.contains("PREWHERE id IN {p4:Array(String)} WHERE organization_id = {p0:String}")
        );
        assert_eq!(placeholders(&sql), condition.params.len());
        assert_eq!(
            condition.params[4],
            Param::Texts(vec!["b".to_owned(), "a".to_owned()])
        );
    }
}
