//! The read side of `audit_events`: builds the SQL of a page, a count or an export, always scoped
//! to the caller's organization, with every filter value sent as a server-side query parameter
//! (`{p0:String}` in the text, `param_p0` beside it).
//!
//! De-duplication: `FINAL` collapses rows that share the sorting key (organization, time, id),
//! so a re-delivered event shows once even before the background merge ran.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use audit_store::clickhouse::{self, Row};
use audit_store::{ClickHouseConfig, Topology, EVENTS_TABLE, PENDING_MONTHS_SQL};
use serde::Deserialize;

use crate::config::QueryConfig;
use crate::error::{from_clickhouse, ApiError};
use crate::metrics::ApiMetrics;
use crate::partitions::{self, Aggregate, AggregateKey, Month, Part, PartitionCache};
use crate::query::{Cursor, Filters, SortOrder};
use crate::render::EventItem;

/// One event as the read path returns it (the lineage columns stay internal), borrowing its
/// text from the cursor's buffer: a row is rendered before the next one is read, so no field is
/// ever copied into a `String` of its own (an export decodes millions of rows).
#[derive(Debug, Clone, PartialEq, Row, Deserialize)]
pub struct EventRecord<'a> {
    pub id: &'a str,
    pub occurred_at_ms: i64,
    pub event_type: &'a str,
    pub actor_id: &'a str,
    pub actor_type: &'a str,
    #[serde(borrow)]
    pub actor_email: Option<&'a str>,
    #[serde(borrow)]
    pub actor_name: Option<&'a str>,
    #[serde(borrow)]
    pub affected_user_id: Option<&'a str>,
    #[serde(borrow)]
    pub affected_user_email: Option<&'a str>,
    pub resource_type: &'a str,
    pub resource_id: &'a str,
    #[serde(borrow)]
    pub resource_name: Option<&'a str>,
    pub changes: &'a str,
    #[serde(borrow)]
    pub context_ip: Option<&'a str>,
    #[serde(borrow)]
    pub context_user_agent: Option<&'a str>,
    #[serde(borrow)]
    pub context_request_id: Option<&'a str>,
    #[serde(borrow)]
    pub context_location: Option<&'a str>,
    #[serde(borrow)]
    pub metadata: Option<&'a str>,
}

/// A cursor over [`EventRecord`]s; each row borrows from it until the next is read.
pub type EventCursor = clickhouse::query::RowCursor<EventRecord<'static>>;

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
    pub async fn hours(&self) -> Result<Vec<(i64, u64)>, ApiError> {
        let sql = format!(
            "SELECT toInt64(intDiv(occurred_at_ms, {HOUR_MS})) AS hour, count() \
             FROM {} WHERE {} GROUP BY hour ORDER BY hour",
            self.condition.table, self.condition.sql,
        );
        self.query(&self.condition, &sql)?
            .fetch_all::<(i64, u64)>()
            .await
            .map_err(|err| from_clickhouse(&err))
    }

    /// The events with `from_ms <= time < to_ms` (None: unbounded), in `self.sort` order when
    /// `sorted`, else in the order ClickHouse reads them.
    pub fn rows(
        &self,
        from_ms: Option<i64>,
        to_ms: Option<i64>,
        sorted: bool,
    ) -> Result<EventCursor, ApiError> {
        let mut condition = self.condition.clone();
        condition.between(from_ms, to_ms);
        let order = if sorted {
            AuditLogStore::order_by(self.sort)
        } else {
            String::new()
        };
        let sql = format!(
            "SELECT ?fields FROM {} WHERE {} {order}",
            condition.table, condition.sql
        );
        self.query(&condition, &sql)?
            .fetch::<EventRecord<'_>>()
            .map_err(|err| from_clickhouse(&err))
    }

    /// `sql` with `condition` bound, limited to what is left of the export's time.
    fn query(
        &self,
        condition: &Condition,
        sql: &str,
    ) -> Result<clickhouse::query::Query, ApiError> {
        let mut client = self.client.clone();
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ApiError::QueryTimeout);
            }
            let seconds = left.as_secs_f64().ceil() as u64;
            client = client.with_setting("max_execution_time", seconds.to_string());
        }
        Ok(condition.bind(client.query(sql)))
    }
}

/// A value sent as a server-side query parameter: `{p0:String}` in the statement, `param_p0`
/// beside it, so that ClickHouse parses it as a value of that type and never as SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Param {
    Text(String),
    Int(i64),
    /// The right side of `IN`.
    Texts(Vec<String>),
}

impl Param {
    fn type_name(&self) -> &'static str {
        match self {
            Param::Text(_) => "String",
            Param::Int(_) => "Int64",
            Param::Texts(_) => "Array(String)",
        }
    }
}

pub(crate) const HOUR_MS: i64 = 3_600_000;
pub(crate) const DAY_MS: i64 = 24 * HOUR_MS;

/// Up to this many stored rows, `total` is an exact count of distinct events.
pub const EXACT_TOTAL_LIMIT: u64 = 100_000;

/// Key-only copy of `audit_events` sorted by event type first (migration 0004).
pub const BY_TYPE_TABLE: &str = "audit_events_by_type";
/// Full copy of `audit_events` sorted by lower-cased actor email first (migration 0005).
pub const BY_ACTOR_EMAIL_TABLE: &str = "audit_events_by_actor_email_rows";

/// A `WHERE` clause over one table, with its parameters (named `p0`, `p1`, ... by position).
#[derive(Debug, Clone)]
struct Condition {
    table: &'static str,
    sql: String,
    params: Vec<Param>,
}

impl Condition {
    fn on(table: &'static str) -> Self {
        Self {
            table,
            sql: String::new(),
            params: Vec::new(),
        }
    }

    /// The placeholder of a new parameter.
    fn param(&mut self, value: Param) -> String {
        let placeholder = format!("{{p{}:{}}}", self.params.len(), value.type_name());
        self.params.push(value);
        placeholder
    }

    fn and(&mut self, sql: &str) {
        if !self.sql.is_empty() {
            self.sql.push_str(" AND ");
        }
        self.sql.push_str(sql);
    }

    /// `left value`, e.g. `("event_type =", Text(..))`.
    fn and_compare(&mut self, left: &str, value: Param) {
        let placeholder = self.param(value);
        self.and(&format!("{left} {placeholder}"));
    }

    /// `from_ms <= occurred_at_ms < to_ms`, each bound only when given.
    fn between(&mut self, from_ms: Option<i64>, to_ms: Option<i64>) {
        if let Some(from) = from_ms {
            self.and_compare("occurred_at_ms >=", Param::Int(from));
        }
        if let Some(to) = to_ms {
            self.and_compare("occurred_at_ms <", Param::Int(to));
        }
    }

    /// The clause, or `1` for none.
    fn clause(&self) -> &str {
        if self.sql.is_empty() {
            "1"
        } else {
            &self.sql
        }
    }

    /// Organization first, then `column = value` when the table is sorted by that column next:
    /// no statement is built without the organization.
    fn organization(table: &'static str, organization_id: &str, key: Option<(&str, &str)>) -> Self {
        let mut c = Condition::on(table);
        c.and_compare("organization_id =", Param::Text(organization_id.to_owned()));
        if let Some((column, value)) = key {
            c.and_compare(&format!("{column} ="), Param::Text(value.to_owned()));
        }
        c
    }

    /// The selection of the filters on a table of full rows: the actor-email copy when they
    /// name an actor email (that actor's events are contiguous there), else `audit_events`.
    fn scoped(organization_id: &str, filters: &Filters) -> Self {
        let mut c = match &filters.actor_email {
            Some(email) => Self::organization(
                BY_ACTOR_EMAIL_TABLE,
                organization_id,
                Some(("actor_email_key", email)),
            ),
            None => Self::organization(EVENTS_TABLE, organization_id, None),
        };
        c.between(filters.from_ms, filters.to_ms);
        for (column, value) in [
            ("event_type", &filters.event_type),
            ("actor_id", &filters.actor_id),
            ("resource_type", &filters.resource_type),
            ("resource_id", &filters.resource_id),
        ] {
            if let Some(value) = value {
                c.and_compare(&format!("{column} ="), Param::Text(value.clone()));
            }
        }
        c
    }

    /// The same selection as [`Condition::scoped`], on the cheapest table that can answer it
    /// for keys and counts: a filter on event type alone (time bounds aside) reads its key-only
    /// table, where the matching rows of an organization are contiguous.
    fn indexed(organization_id: &str, filters: &Filters) -> Self {
        let alone = filters.actor_email.is_none()
            && filters.actor_id.is_none()
            && filters.resource_type.is_none()
            && filters.resource_id.is_none();
        match &filters.event_type {
            Some(event_type) if alone => {
                let key = Some(("event_type", event_type.as_str()));
                let mut c = Self::organization(BY_TYPE_TABLE, organization_id, key);
                c.between(filters.from_ms, filters.to_ms);
                c
            }
            _ => Self::scoped(organization_id, filters),
        }
    }

    /// Strictly after the cursor's (time, id) in its sort order. The plain bound on time comes
    /// first: by it ClickHouse skips along the primary key.
    fn after(&mut self, cursor: &Cursor) {
        let (at, strict) = match cursor.sort {
            SortOrder::Desc => ("<=", "<"),
            SortOrder::Asc => (">=", ">"),
        };
        let t = self.param(Param::Int(cursor.occurred_at_ms));
        let id = self.param(Param::Text(cursor.id.clone()));
        self.and(&format!(
            "occurred_at_ms {at} {t} AND (occurred_at_ms {strict} {t} OR id {strict} {id})"
        ));
    }

    fn bind(&self, mut query: clickhouse::query::Query) -> clickhouse::query::Query {
        for (n, value) in self.params.iter().enumerate() {
            let name = format!("p{n}");
            query = match value {
                Param::Text(text) => query.param(&name, text.as_str()),
                Param::Int(n) => query.param(&name, n),
                Param::Texts(list) => query.param(&name, list),
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

impl PageRequest<'_> {
    fn wanted(&self) -> u64 {
        u64::from(self.limit) + 1
    }

    fn offset(&self) -> u64 {
        if self.cursor.is_some() {
            0
        } else {
            self.offset
        }
    }
}

/// A page as [`AuditLogStore::page`] reads it, with the total of its filters.
pub struct Page {
    /// The (time, id) keys of the page's events, in order, at most `limit`.
    pub keys: Vec<(i64, String)>,
    /// The events themselves, when asked for.
    pub items: Option<Vec<EventItem>>,
    /// Whether events follow the page.
    pub more: bool,
    pub total: u64,
    pub total_exact: bool,
}

/// What a request knows of the table its counts read: its months, and the months of
/// `audit_events` holding a copy of an event found and not collapsed yet.
#[derive(Debug, Clone, Default)]
struct Snapshot {
    /// None when the table is not partitioned by month.
    months: Option<Vec<Month>>,
    pending: BTreeSet<String>,
}

/// Stored rows per month (month id -> rows) under a request's filters and range.
type MonthRows = HashMap<String, u64>;

/// The part of a page's range it reads: whole months next to where the page starts, sized by
/// the stored rows per month that the total counts anyway, so that ClickHouse opens only the
/// parts of those months (each part it opens costs it a granule read and its index analysis).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Window {
    /// `occurred_at_ms >= from_ms` (a month's start).
    from_ms: Option<i64>,
    /// `occurred_at_ms < to_ms` (a month's start or end).
    to_ms: Option<i64>,
    /// Rows to skip within the window: the page's offset less the rows of the months it skips.
    offset: u64,
    /// Whether the window is narrower than the page's range on the side away from where the
    /// page starts: a page that comes back short must then be read again over the whole range.
    narrowed: bool,
    /// Whether a month of the window holds a copy not collapsed yet: the read then uses FINAL.
    copies: bool,
    /// Listed months the window reads (None: not known, no listing yet).
    months: Option<usize>,
}

impl Window {
    /// The whole range, de-duplicated by FINAL.
    fn whole(request: &PageRequest<'_>) -> Self {
        Window {
            offset: request.offset(),
            copies: true,
            ..Window::default()
        }
    }

    /// The window of `request` over `months` (ascending), whose stored rows under the
    /// request's filters are `rows` (months absent there count as empty). With `exact` rows
    /// (counted by this request), whole months the offset passes are skipped and the offset
    /// reduced by their rows, provided no copy is pending in them.
    fn of(
        request: &PageRequest<'_>,
        months: &[Month],
        rows: &MonthRows,
        exact: bool,
        pending: &BTreeSet<String>,
    ) -> Self {
        let (from, to) = (request.filters.from_ms, request.filters.to_ms);
        let cursor = request.cursor.map(|c| c.occurred_at_ms);
        let desc = request.sort == SortOrder::Desc;
        let mut list: Vec<&Month> = months
            .iter()
            .filter(|m| m.meets(from, to))
            .filter(|m| match (cursor, desc) {
                (None, _) => true,
                (Some(t), true) => m.start_ms <= t,
                (Some(t), false) => m.end_ms > t,
            })
            .collect();
        if desc {
            list.reverse();
        }
        let stored = |m: &Month| rows.get(&m.id).copied().unwrap_or(0);
        let mut window = Window {
            offset: request.offset(),
            ..Window::default()
        };
        let mut first = 0;
        if exact {
            while let Some(month) = list.get(first) {
                let n = stored(month);
                if n > window.offset || pending.contains(&month.id) {
                    break;
                }
                window.offset -= n;
                first += 1;
            }
        }
        if first > 0 {
            let skipped = list[first - 1];
            if desc {
                window.to_ms = Some(skipped.start_ms);
            } else {
                window.from_ms = Some(skipped.end_ms);
            }
        }
        let needed = window.offset + request.wanted();
        let mut have = 0;
        let mut last = list.len();
        for (n, month) in list.iter().enumerate().skip(first) {
            // The cursor's own month: how many of its rows lie past the cursor is unknown.
            let holds_cursor = cursor.is_some_and(|t| month.start_ms <= t && t < month.end_ms);
            if !holds_cursor {
                have += stored(month);
            }
            if have >= needed {
                last = n + 1;
                if last < list.len() {
                    window.narrowed = true;
                    if desc {
                        window.from_ms = Some(month.start_ms);
                    } else {
                        window.to_ms = Some(month.end_ms);
                    }
                }
                break;
            }
        }
        let read = &list[first.min(list.len())..last];
        window.copies = read.iter().any(|m| pending.contains(&m.id));
        window.months = (!list.is_empty()).then_some(read.len());
        window
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

/// What [`AuditLogStore::by_month`] computed.
struct Aggregated {
    value: u64,
    /// The months whose value this call computed (not taken from the cache).
    counted_now: Vec<Month>,
    /// The value of each month, when every month was computed or known one by one.
    per_month: Option<MonthRows>,
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

    fn order_by(sort: SortOrder) -> String {
        let dir = sort.sql();
        format!("ORDER BY occurred_at_ms {dir}, id {dir}")
    }

    /// Runs a query (`condition` bound into `sql`), timed under `kind` in the metrics.
    async fn timed<T, F>(
        &self,
        kind: &str,
        condition: &Condition,
        sql: &str,
        run: impl FnOnce(clickhouse::query::Query) -> F,
    ) -> Result<T, ApiError>
    where
        F: std::future::Future<Output = clickhouse::error::Result<T>>,
    {
        let started = Instant::now();
        let result = run(condition.bind(self.client.query(sql))).await;
        self.metrics.observe_query(kind, started);
        result.map_err(|err| from_clickhouse(&err))
    }

    async fn fetch_all<T>(
        &self,
        kind: &str,
        condition: &Condition,
        sql: &str,
    ) -> Result<Vec<T>, ApiError>
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
    ) -> Result<T, ApiError>
    where
        T: clickhouse::RowOwned + clickhouse::RowRead,
    {
        self.timed(kind, condition, sql, |q| q.fetch_one::<T>())
            .await
    }

    /// The months of `table` (its active parts) and the months with copies pending, in one
    /// query.
    async fn snapshot(&self, table: &'static str) -> Result<Snapshot, ApiError> {
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
    fn last_snapshot(&self, table: &'static str) -> Option<Snapshot> {
        self.last_snapshots.lock().ok()?.get(table).cloned()
    }

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
    pub async fn page(&self, request: &PageRequest<'_>, items: bool) -> Result<Page, ApiError> {
        let filters = request.filters;
        let org = request.organization_id;
        let table = Condition::indexed(org, filters).table;
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
    async fn read_page(
        &self,
        request: &PageRequest<'_>,
        window: Window,
        items: bool,
    ) -> Result<(Vec<(i64, String)>, Option<Vec<EventItem>>, bool), ApiError> {
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
    fn page_condition(base: Condition, request: &PageRequest<'_>, window: &Window) -> Condition {
        let mut condition = base;
        condition.between(window.from_ms, window.to_ms);
        if let Some(cursor) = request.cursor {
            condition.after(cursor);
        }
        condition
    }

    /// `SELECT` text over the page's condition: `columns`, ordered, offset and limited.
    fn page_sql(
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
            Self::order_by(request.sort),
            window.offset,
            request.wanted(),
        )
    }

    /// The (time, id) keys of the page in `window`: up to `limit + 1` of them, in order.
    async fn page_keys(
        &self,
        request: &PageRequest<'_>,
        window: &Window,
    ) -> Result<Vec<(i64, String)>, ApiError> {
        let base = Condition::indexed(request.organization_id, request.filters);
        let condition = Self::page_condition(base, request, window);
        let sql = Self::page_sql("occurred_at_ms, id", &condition, request, window);
        self.fetch_all("page_keys", &condition, &sql).await
    }

    /// The page's events in `window`, with their keys. One query on the table of full rows
    /// (ClickHouse 26.9 reads it in sort-key order and reads the other columns of the page's
    /// rows only); a filter on event type alone over more than a month reads the keys from its
    /// key-only table first, then the rows by key.
    async fn page_items(
        &self,
        request: &PageRequest<'_>,
        window: &Window,
    ) -> Result<(Vec<(i64, String)>, Option<Vec<EventItem>>), ApiError> {
        let base = Condition::scoped(request.organization_id, request.filters);
        // A filter on event type alone reads the full rows directly when the window is one
        // month: read in order, ClickHouse stops at the page's last match, and the counts put
        // enough matches in that month (at worst it reads the month's event types, about 3 ms
        // for 400,000 rows). A wider window could hold a rare type thinly spread.
        let one_month = window.months.is_some_and(|n| n <= 1);
        if Condition::indexed(request.organization_id, request.filters).table != base.table
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
                items.push(EventItem::from(&row));
            }
            Ok((keys, Some(items)))
        })
        .await
    }

    /// The events of `keys` in their order, as JSON items, one each (a copy not merged yet is
    /// one event).
    async fn page_rows(
        &self,
        request: &PageRequest<'_>,
        keys: &[(i64, String)],
    ) -> Result<Vec<EventItem>, ApiError> {
        let Some((condition, sql)) = Self::rows_query(request, keys) else {
            return Ok(Vec::new());
        };
        self.timed("page_rows", &condition, &sql, |query| async move {
            let mut cursor = query.fetch::<EventRecord<'_>>()?;
            let mut items = Vec::with_capacity(keys.len());
            while let Some(row) = cursor.next().await? {
                items.push(EventItem::from(&row));
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
    ) -> Result<Option<EventCursor>, ApiError> {
        let Some((condition, sql)) = Self::rows_query(request, keys) else {
            return Ok(None);
        };
        condition
            .bind(self.client.query(&sql))
            .fetch::<EventRecord<'_>>()
            .map(Some)
            .map_err(|err| from_clickhouse(&err))
    }

    fn rows_query(
        request: &PageRequest<'_>,
        keys: &[(i64, String)],
    ) -> Option<(Condition, String)> {
        let earliest = keys.iter().map(|(t, _)| *t).min()?;
        let latest = keys.iter().map(|(t, _)| *t).max()?;
        // PREWHERE on the id set first: ClickHouse then reads the other columns only for the
        // granules that hold a page row (a page spread over days would otherwise read every
        // column of every row in between). An IN set, not has(array): a hash lookup per row.
        let mut condition = Condition::scoped(request.organization_id, request.filters);
        condition.between(Some(earliest), Some(latest.saturating_add(1)));
        let ids = condition.param(Param::Texts(
            keys.iter().map(|(_, id)| id.clone()).collect(),
        ));
        condition.sql = format!("id IN {ids} WHERE {}", condition.sql);
        // LIMIT 1 BY: a re-delivery not merged yet is one event.
        let sql = format!(
            "SELECT ?fields FROM {} PREWHERE {} {} LIMIT 1 BY occurred_at_ms, id",
            condition.table,
            condition.sql,
            Self::order_by(request.sort),
        );
        Some((condition, sql))
    }

    /// Number of events matching the filters, and whether it is exact (see [`Self::count_in`]).
    pub async fn count(
        &self,
        organization_id: &str,
        filters: &Filters,
    ) -> Result<(u64, bool), ApiError> {
        let (total, exact, _) = self.total(organization_id, filters).await?;
        Ok((total, exact))
    }

    /// [`Self::count_in`] with a snapshot of its own. Without a count cache nothing needs the
    /// months before counting: the stored rows are counted beside the snapshot, and are the
    /// total when no month in range holds a copy pending.
    async fn total(
        &self,
        organization_id: &str,
        filters: &Filters,
    ) -> Result<(u64, bool, Option<MonthRows>), ApiError> {
        let condition = Condition::indexed(organization_id, filters);
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
    async fn count_in(
        &self,
        organization_id: &str,
        filters: &Filters,
        snapshot: &Snapshot,
    ) -> Result<(u64, bool, Option<MonthRows>), ApiError> {
        let condition = Condition::indexed(organization_id, filters);
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
    fn distinct_sql(condition: &Condition) -> String {
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
    async fn count_open_months(
        &self,
        organization_id: &str,
        filters: &Filters,
        condition: &Condition,
        months: Option<&[Month]>,
    ) -> Result<Option<(u64, bool)>, ApiError> {
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
    async fn still_listed(&self, table: &str, counted_now: &[Month]) -> Result<bool, ApiError> {
        if counted_now.is_empty() {
            return Ok(true);
        }
        let now = self.months(table).await?.unwrap_or_default();
        Ok(counted_now.iter().all(|month| now.contains(month)))
    }

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
            condition: Condition::scoped(organization_id, filters),
            sort,
            window_rows: self.export_window_rows,
            deadline: (timeout > 0).then(|| Instant::now() + Duration::from_secs(timeout)),
        }
    }

    /// Ingest time of the newest stored event, epoch milliseconds (None on an empty table).
    /// Per month like the counts: only months that received rows since the last call are read.
    pub async fn newest_ingested_at(&self) -> Result<Option<u64>, ApiError> {
        let everything = Condition::on(EVENTS_TABLE);
        let months = self.months(EVENTS_TABLE).await?;
        let newest = self
            .by_month(
                &everything,
                Aggregate::NewestIngestedAt,
                months,
                (None, None),
            )
            .await?
            .value;
        Ok((newest > 0).then_some(newest))
    }

    /// The two conditions of a count split by month (see [`Self::stored_count`]): the months
    /// lying wholly within `from`/`to` are counted under the filters without the time bounds,
    /// so that any range (a poller's moving `to`, say) reuses what was counted for its whole
    /// months; only the months at its edges are counted with the bounds.
    fn split_months(
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
            (Condition::indexed(organization_id, &unbounded), whole),
            edges,
        )
    }

    /// The stored rows per month that earlier requests counted under a page's filters (see
    /// [`Self::stored_count`]), whatever happened to the months since.
    fn month_hints(&self, organization_id: &str, filters: &Filters, months: &[Month]) -> MonthRows {
        let ((unbounded, whole), edges) =
            Self::split_months(organization_id, filters, months.to_vec());
        let bounded = Condition::indexed(organization_id, filters);
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
    /// [`Self::split_months`]). `bounded` is `Condition::indexed` of the filters.
    async fn stored_count(
        &self,
        organization_id: &str,
        filters: &Filters,
        bounded: &Condition,
        months: Option<Vec<Month>>,
    ) -> Result<Aggregated, ApiError> {
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

    /// The months of `table` from its active parts (one `system.parts` read), or None when it
    /// is not partitioned by month.
    async fn months(&self, table: &str) -> Result<Option<Vec<Month>>, ApiError> {
        let (listing, sql) = self.parts_listing(table);
        let parts: Vec<Part> = self.fetch_all("parts", &listing, &sql).await?;
        Ok(partitions::months(&parts))
    }

    /// The active parts of `table` (partition, name, level): its condition and statement. On
    /// a cluster, the parts of its shards' own tables, one replica of each shard, each name
    /// prefixed with its shard's number (see [`partitions::Part`]).
    fn parts_listing(&self, table: &str) -> (Condition, String) {
        let topology = self.clickhouse.topology();
        let mut listing = Condition::on("system.parts");
        listing.and("active");
        listing.and_compare("database =", Param::Text(self.clickhouse.database.clone()));
        listing.and_compare("table =", Param::Text(topology.local_table(table)));
        let sql = match topology {
            Topology::Single => format!(
                "SELECT partition_id, name, level FROM system.parts WHERE {}",
                listing.sql
            ),
            Topology::Replicated { cluster } | Topology::Shards { cluster, .. } => format!(
                "SELECT partition_id, concat(toString(_shard_num), '/', name), level \
                 FROM cluster('{cluster}', system.parts) WHERE {}",
                listing.sql
            ),
        };
        (listing, sql)
    }

    fn aggregate_key(condition: &Condition, aggregate: Aggregate) -> AggregateKey {
        AggregateKey {
            table: condition.table,
            aggregate,
            condition: format!("{} {:?}", condition.sql, condition.params),
        }
    }

    /// `aggregate` over the rows of `condition` within `[from, to)`, computed per month (of
    /// `months`, from [`Self::months`]): the months whose parts did not change since the cache
    /// saw them are taken from it, the others are computed one `UNION ALL` branch each. Without
    /// a cache, `[from, to)` is aggregated in one query. A table whose partitions are not
    /// months is aggregated in one plain query.
    async fn by_month(
        &self,
        condition: &Condition,
        aggregate: Aggregate,
        months: Option<Vec<Month>>,
        (from_ms, to_ms): (Option<i64>, Option<i64>),
    ) -> Result<Aggregated, ApiError> {
        let table = condition.table;
        let kind = aggregate.label();
        let Some(months) = months else {
            let sql = format!(
                "SELECT {} FROM {table} WHERE {}",
                aggregate.sql(),
                condition.clause()
            );
            return Ok(Aggregated {
                value: self.fetch_one(kind, condition, &sql).await?,
                counted_now: Vec::new(),
                per_month: None,
            });
        };
        let key = Self::aggregate_key(condition, aggregate);
        let plan = self.partitions.plan(&key, months.clone(), from_ms, to_ms);
        self.metrics
            .observe_months(plan.reused.len(), plan.missing.len());
        let mut per_month: MonthRows = plan.reused.iter().cloned().collect();
        if plan.missing.is_empty() {
            let value = self.partitions.complete(&key, plan, &[]);
            return Ok(Aggregated {
                value,
                counted_now: Vec::new(),
                per_month: Some(per_month),
            });
        }
        if !self.partitions.enabled() {
            // Nothing is kept (`query.count_cache_entries = 0`): the range in one query, which
            // ClickHouse answers from the primary key's ranges. Counted month by month it
            // would cost a query's overhead (about 3 ms on 26.9) per month.
            let mut whole = condition.clone();
            whole.between(from_ms, to_ms);
            let sql = format!(
                "SELECT {} FROM {table} WHERE {}",
                aggregate.sql(),
                whole.clause()
            );
            let value = self.fetch_one(kind, &whole, &sql).await?;
            return Ok(Aggregated {
                value,
                counted_now: plan.missing,
                per_month: None,
            });
        }
        let counted_now = plan.missing.clone();
        let (value, computed) = self.compute_months(condition, &key, plan).await?;
        per_month.extend(computed);
        Ok(Aggregated {
            value,
            counted_now,
            per_month: Some(per_month),
        })
    }

    /// Computes the plan's missing months (one `UNION ALL` branch each), keeps them in the
    /// cache, and returns the aggregate over the plan's months with the computed values.
    async fn compute_months(
        &self,
        condition: &Condition,
        key: &AggregateKey,
        plan: partitions::Plan,
    ) -> Result<(u64, Vec<(String, u64)>), ApiError> {
        let mut union = condition.clone();
        let rows = condition.clause().to_owned();
        let branches: Vec<String> = plan
            .missing
            .iter()
            .map(|month| {
                let id = union.param(Param::Text(month.id.clone()));
                let from = union.param(Param::Int(month.start_ms));
                let to = union.param(Param::Int(month.end_ms));
                format!(
                    "SELECT {id} AS month, {} AS value FROM {} WHERE {rows} \
                     AND occurred_at_ms >= {from} AND occurred_at_ms < {to}",
                    key.aggregate.sql(),
                    condition.table,
                )
            })
            .collect();
        let kind = key.aggregate.label();
        let computed: Vec<(String, u64)> = self
            .fetch_all(kind, &union, &branches.join(" UNION ALL "))
            .await?;
        Ok((self.partitions.complete(key, plan, &computed), computed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Placeholders in the text, each with a parameter.
    fn placeholders(sql: &str) -> usize {
        sql.matches("{p").count()
    }

    #[test]
    fn every_statement_starts_with_the_organization_and_sends_values_as_parameters() {
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
        assert!(condition.sql.starts_with("organization_id = {p0:String}"));
        assert!(!condition.sql.contains("OR 1=1"));
        assert!(!condition.sql.contains('\''));
        assert_eq!(placeholders(&condition.sql), condition.params.len());
        assert_eq!(condition.params.len(), 8);
        assert!(condition.sql.contains("occurred_at_ms >= {p2:Int64}"));
    }

    /// The copy sorted by actor email serves every request that names one (keys, counts, rows,
    /// exports), with the email right after the organization: the prefix of its sorting key.
    #[test]
    fn an_actor_email_is_read_from_the_copy_sorted_by_it() {
        let filters = Filters {
            actor_email: Some("ada@acme.example".to_owned()),
            event_type: Some("user.created".to_owned()),
            ..Filters::default()
        };
        for c in [
            Condition::scoped("org", &filters),
            Condition::indexed("org", &filters),
        ] {
            assert_eq!(c.table, BY_ACTOR_EMAIL_TABLE);
            assert!(c.sql.starts_with(
                "organization_id = {p0:String} AND actor_email_key = {p1:String} AND "
            ));
            assert_eq!(c.params.len(), 3);
        }
        let by_type = Filters {
            event_type: Some("user.created".to_owned()),
            ..Filters::default()
        };
        assert_eq!(Condition::indexed("org", &by_type).table, BY_TYPE_TABLE);
        assert_eq!(Condition::scoped("org", &by_type).table, EVENTS_TABLE);
    }

    #[test]
    fn a_cursor_continues_strictly_after_its_event() {
        let mut condition = Condition::on(EVENTS_TABLE);
        let cursor = Cursor {
            sort: SortOrder::Desc,
            occurred_at_ms: 10,
            id: "x".to_owned(),
            filters: String::new(),
        };
        condition.after(&cursor);
        assert_eq!(
            condition.sql,
            "occurred_at_ms <= {p0:Int64} AND (occurred_at_ms < {p0:Int64} OR id < {p1:String})"
        );
        assert_eq!(
            condition.params,
            vec![Param::Int(10), Param::Text("x".to_owned())]
        );
    }

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

    const JAN: i64 = 1_735_689_600_000; // 2025-01-01T00:00:00Z
    const FEB: i64 = 1_738_368_000_000;
    const MAR: i64 = 1_740_787_200_000;

    fn three_months() -> Vec<Month> {
        let parts: Vec<Part> = ["202501", "202502", "202503"]
            .iter()
            .enumerate()
            .map(|(n, id)| (id.to_string(), format!("{id}_{n}_{n}_0"), 0))
            .collect();
        partitions::months(&parts).unwrap()
    }

    fn rows(jan: u64, feb: u64, mar: u64) -> MonthRows {
        [("202501", jan), ("202502", feb), ("202503", mar)]
            .into_iter()
            .map(|(m, n)| (m.to_owned(), n))
            .collect()
    }

    fn request<'a>(
        filters: &'a Filters,
        sort: SortOrder,
        offset: u64,
        cursor: Option<&'a Cursor>,
    ) -> PageRequest<'a> {
        PageRequest {
            organization_id: "org",
            filters,
            sort,
            limit: 50,
            offset,
            cursor,
        }
    }

    #[test]
    fn a_first_page_reads_the_newest_months_that_hold_it() {
        let filters = Filters::default();
        let none = BTreeSet::new();
        let months = three_months();
        let first = request(&filters, SortOrder::Desc, 0, None);
        // March alone holds 51 rows.
        let w = Window::of(&first, &months, &rows(100, 100, 60), false, &none);
        assert_eq!((w.from_ms, w.to_ms, w.offset), (Some(MAR), None, 0));
        assert!(w.narrowed && !w.copies);
        assert_eq!(w.months, Some(1));
        // March and February together.
        let w = Window::of(&first, &months, &rows(100, 30, 30), false, &none);
        assert_eq!((w.from_ms, w.to_ms), (Some(FEB), None));
        // Not enough anywhere, or nothing known: the whole range.
        let w = Window::of(&first, &months, &rows(10, 10, 10), false, &none);
        assert_eq!(
            w,
            Window {
                months: Some(3),
                ..Window::default()
            }
        );
        let w = Window::of(&first, &months, &MonthRows::new(), false, &none);
        assert_eq!((w.from_ms, w.to_ms, w.months), (None, None, Some(3)));
        // No listing yet (the process's first request): nothing is known.
        let w = Window::of(&first, &[], &MonthRows::new(), false, &none);
        assert_eq!(w, Window::default());
        // Oldest first, from January.
        let asc = request(&filters, SortOrder::Asc, 0, None);
        let w = Window::of(&asc, &months, &rows(60, 10, 10), false, &none);
        assert_eq!((w.from_ms, w.to_ms), (None, Some(FEB)));
        // A copy pending in a month read: FINAL.
        let pending: BTreeSet<String> = ["202503".to_owned()].into();
        let w = Window::of(&first, &months, &rows(100, 100, 60), false, &pending);
        assert!(w.copies);
        let w = Window::of(&asc, &months, &rows(60, 10, 10), false, &pending);
        assert!(!w.copies);
    }

    #[test]
    fn an_offset_skips_whole_months_only_when_their_rows_are_exact_and_free_of_copies() {
        let filters = Filters::default();
        let none = BTreeSet::new();
        let months = three_months();
        let deep = request(&filters, SortOrder::Desc, 130, None);
        // March (60) and February (50) are passed: 20 rows into January.
        let w = Window::of(&deep, &months, &rows(100, 50, 60), true, &none);
        assert_eq!((w.from_ms, w.to_ms, w.offset), (None, Some(FEB), 20));
        // Counts from the cache alone: nothing skipped, the window grows from the start.
        let w = Window::of(&deep, &months, &rows(100, 50, 60), false, &none);
        assert_eq!((w.from_ms, w.to_ms, w.offset), (None, None, 130));
        assert!(!w.narrowed);
        let w = Window::of(&deep, &months, &rows(100, 150, 60), false, &none);
        assert_eq!((w.from_ms, w.to_ms, w.offset), (Some(FEB), None, 130));
        // February holds a copy: skipping stops before it.
        let pending: BTreeSet<String> = ["202502".to_owned()].into();
        let w = Window::of(&deep, &months, &rows(100, 50, 60), true, &pending);
        assert_eq!((w.from_ms, w.to_ms, w.offset), (None, Some(MAR), 70));
        assert!(w.copies);
        // Oldest first: January passed.
        let asc = request(&filters, SortOrder::Asc, 120, None);
        let w = Window::of(&asc, &months, &rows(100, 80, 60), true, &none);
        assert_eq!((w.from_ms, w.to_ms, w.offset), (Some(FEB), Some(MAR), 20));
        // An offset past every row reads past the last month: nothing.
        let past = request(&filters, SortOrder::Desc, 1_000, None);
        let w = Window::of(&past, &months, &rows(100, 50, 60), true, &none);
        assert_eq!((w.to_ms, w.offset), (Some(JAN), 790));
    }

    #[test]
    fn a_cursor_page_does_not_count_its_own_month() {
        let filters = Filters::default();
        let none = BTreeSet::new();
        let months = three_months();
        let cursor = Cursor {
            sort: SortOrder::Desc,
            occurred_at_ms: MAR + 1_000,
            id: "x".to_owned(),
            filters: String::new(),
        };
        let page = request(&filters, SortOrder::Desc, 0, Some(&cursor));
        // March holds the cursor: its 500 rows may all lie after it; February is read too.
        let w = Window::of(&page, &months, &rows(100, 500, 500), false, &none);
        assert_eq!((w.from_ms, w.to_ms, w.offset), (Some(FEB), None, 0));
        assert!(w.narrowed);
        // Oldest first from January's cursor: January and February.
        let cursor = Cursor {
            sort: SortOrder::Asc,
            occurred_at_ms: JAN + 1_000,
            ..cursor
        };
        let page = request(&filters, SortOrder::Asc, 0, Some(&cursor));
        let w = Window::of(&page, &months, &rows(500, 500, 500), false, &none);
        assert_eq!((w.from_ms, w.to_ms), (None, Some(MAR)));
    }
}
