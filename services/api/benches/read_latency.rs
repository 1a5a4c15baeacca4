//! `make bench`: latency of the read API on 10,000,000 events across 100 organizations (one
//! holding half of them), each case next to its reference line, the straightforward SQL sent
//! straight to ClickHouse over HTTP, in one process invocation so that ratios hold on a noisy
//! machine. Then CSV export throughput and the peak RSS of the exporting process.
//!
//! Needs the local stack (`make up`) and the release binary (`cargo build --release --bins`).
//! The data set is generated once into the `audit_bench_read` database and regenerated when it
//! is more than a day old (pages are anchored at "now", as live audit logs are).

use std::time::{Duration, Instant};

mod support;

use audit_api::keys::{self, Role};
use audit_api::query::{Cursor, Filters, SortOrder};
use audit_store::clickhouse::{self, Row};
use audit_store::{migrations, ClickHouseConfig};
use audit_testkit::{clickhouse_url, percentile};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use support::{api_get, Api, BIG_ORG, EVENTS};

const DATABASE: &str = "audit_bench_read";
const DATA_VERSION: u32 = 3;
const ITERATIONS: usize = 100;
const WARM_UPS: usize = 10;
/// Clients of the mixed paging line, and how long it runs for each side.
const CLIENTS: usize = 16;
const MIXED_SECONDS: u64 = 15;
const DEPTH: u64 = 100_000;
const EXPORT_ROWS_TARGET: u64 = 1_000_000;
const EXPORT_RUNS: usize = 3;

fn config() -> ClickHouseConfig {
    support::config(DATABASE)
}

#[derive(Debug, Row, Serialize, Deserialize)]
struct DataMeta {
    version: u32,
    events: u64,
    newest_ms: i64,
}

/// 10M events over the last 365 days: half in `org_big`, the rest over 99 organizations; 1,000
/// actors per organization, 23 event types, 6 resource types.
async fn ensure_data(client: &clickhouse::Client) -> i64 {
    let now = chrono::Utc::now().timestamp_millis();
    let meta: Option<DataMeta> = client
        .query("SELECT version, events, newest_ms FROM bench_meta")
        .fetch_optional()
        .await
        .unwrap_or(None);
    if let Some(meta) = meta {
        if meta.version == DATA_VERSION
            && meta.events == EVENTS
            && now - meta.newest_ms < 86_400_000
        {
            eprintln!("bench: reusing the {EVENTS}-event data set in {DATABASE}");
            return meta.newest_ms;
        }
    }
    eprintln!("bench: generating {EVENTS} events into {DATABASE} (about a minute)");
    audit_testkit::drop_database(&config(), DATABASE)
        .await
        .unwrap();
    migrations::apply(&config()).await.unwrap();
    support::generate(client, now, None).await;
    client
        .query("CREATE TABLE bench_meta (version UInt32, events UInt64, newest_ms Int64) ENGINE = TinyLog")
        .execute()
        .await
        .unwrap();
    client
        .query("INSERT INTO bench_meta VALUES (?, ?, ?)")
        .bind(DATA_VERSION)
        .bind(EVENTS)
        .bind(now)
        .execute()
        .await
        .unwrap();
    now
}

/// p50 and p99 in milliseconds of `ITERATIONS` runs after `WARM_UPS` (a serving process is warm:
/// ClickHouse's mark and index caches, the service's per-month counts; both sides get the same).
async fn measure<F, Fut>(mut run: F) -> (f64, f64)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..WARM_UPS {
        run().await;
    }
    let mut times = Vec::with_capacity(ITERATIONS);
    for _ in 0..ITERATIONS {
        let started = Instant::now();
        run().await;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    (percentile(&times, 0.5), percentile(&times, 0.99))
}

/// The straightforward SQL over ClickHouse's HTTP interface.
async fn clickhouse_post(http: &reqwest::Client, sql: String) -> Vec<u8> {
    let response = http
        .post(format!("{}/?database={DATABASE}", clickhouse_url()))
        .body(sql)
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "{}",
        response.text().await.unwrap_or_default()
    );
    response.bytes().await.unwrap().to_vec()
}

struct Case {
    name: &'static str,
    query: String,
    /// WHERE clause (after the organization) and OFFSET of the reference SQL.
    reference_where: String,
    reference_offset: u64,
}

/// The reference SQL of a case: its page and its count.
fn reference_sql(case: &Case) -> (String, String) {
    (
        format!(
            "SELECT * FROM audit_events WHERE organization_id = '{BIG_ORG}'{} ORDER BY occurred_at_ms DESC, id DESC LIMIT 50 OFFSET {} FORMAT JSON",
            case.reference_where, case.reference_offset
        ),
        format!(
            "SELECT count() FROM audit_events WHERE organization_id = '{BIG_ORG}'{} FORMAT JSON",
            case.reference_where
        ),
    )
}

/// p50/p99 of a case through the API, then of its reference SQL (page and count, concurrently).
async fn measure_case(
    http: &reqwest::Client,
    api: &Api,
    key: &str,
    case: &Case,
) -> ((f64, f64), (f64, f64)) {
    let url = format!("{}/api/v1/organization/audit-logs?{}", api.base, case.query);
    let ours = measure(|| async {
        api_get(http, &url, key).await;
    })
    .await;
    let (page_sql, count_sql) = reference_sql(case);
    let reference = measure(|| async {
        tokio::join!(
            clickhouse_post(http, page_sql.clone()),
            clickhouse_post(http, count_sql.clone())
        );
    })
    .await;
    (ours, reference)
}

/// `CLIENTS` clients, each sending its next request as soon as its last one was answered,
/// cycling through the cases (client k starts at case k) for `MIXED_SECONDS`: requests per
/// second, p50 and p99 in milliseconds.
async fn mixed_load<F, Fut>(cases: usize, run: F) -> (f64, f64, f64)
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let until = Instant::now() + Duration::from_secs(MIXED_SECONDS);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let run = run.clone();
            tokio::spawn(async move {
                let mut times = Vec::new();
                let mut case = client % cases;
                while Instant::now() < until {
                    let started = Instant::now();
                    run(case).await;
                    times.push(started.elapsed().as_secs_f64() * 1000.0);
                    case = (case + 1) % cases;
                }
                times
            })
        })
        .collect();
    let mut times = Vec::new();
    for client in clients {
        times.extend(client.await.unwrap());
    }
    times.sort_by(f64::total_cmp);
    (
        times.len() as f64 / MIXED_SECONDS as f64,
        percentile(&times, 0.5),
        percentile(&times, 0.99),
    )
}

const LIVE_BATCH: u64 = 100;
const LIVE_EVERY_MS: u64 = 200;

/// Inserts `LIVE_BATCH` events of `org_live`, dated now, every `LIVE_EVERY_MS` until aborted.
async fn insert_live_events(client: clickhouse::Client) {
    let mut every = tokio::time::interval(Duration::from_millis(LIVE_EVERY_MS));
    loop {
        every.tick().await;
        let now = chrono::Utc::now().timestamp_millis();
        let sql = format!(
            "INSERT INTO audit_events (organization_id, occurred_at_ms, id, event_type, actor_id, \
             actor_type, resource_type, resource_id, changes, source_topic, source_partition, \
             source_offset, ingested_at_ms) \
             SELECT 'org_live', {now} + number, concat('live_', toString({now}), '_', toString(number)), \
             'user.created', 'usr_1', 'user', 'user', 'usr_2', '[]', 'identity.users.v1', 0, number, {now} \
             FROM system.numbers LIMIT {LIVE_BATCH}"
        );
        client.query(&sql).execute().await.unwrap();
    }
}

fn iso(ms: i64) -> String {
    audit_api::time::format_timestamp(ms)
}

#[tokio::main]
async fn main() {
    let client = config().client();
    let newest = ensure_data(&client).await;
    let http = reqwest::Client::new();
    let key = keys::generate(BIG_ORG, Role::Admin, "bench");
    keys::create(&client, &key).await.unwrap();
    let key = key.secret.expose_secret().to_owned();
    let version: String = client
        .query("SELECT version()")
        .fetch_one()
        .await
        .unwrap_or_else(|_| "(unknown version)".to_owned());

    // The cursor of the page at depth 100,000 (newest first, no filter).
    let (t, id): (i64, String) = client
        .query(&format!(
            "SELECT occurred_at_ms, id FROM audit_events FINAL WHERE organization_id = '{BIG_ORG}' \
             ORDER BY occurred_at_ms DESC, id DESC LIMIT {}, 1",
            DEPTH - 1
        ))
        .fetch_one()
        .await
        .unwrap();
    let cursor = Cursor {
        sort: SortOrder::Desc,
        occurred_at_ms: t,
        id,
        filters: Filters::default().fingerprint(SortOrder::Desc),
    }
    .encode();
    let day_from = newest - 100 * 86_400_000;
    let day_to = day_from + 86_400_000;
    let cases = vec![
        Case {
            name: "first page, no filter",
            query: "limit=50".into(),
            reference_where: String::new(),
            reference_offset: 0,
        },
        Case {
            name: "first page, eventType",
            query: "limit=50&eventType=role.assigned".into(),
            reference_where: " AND event_type = 'role.assigned'".into(),
            reference_offset: 0,
        },
        Case {
            name: "first page, actorEmail",
            query: "limit=50&actorEmail=user42%40example.com".into(),
            reference_where: " AND lowerUTF8(actor_email) = 'user42@example.com'".into(),
            reference_offset: 0,
        },
        Case {
            name: "first page, one-day range",
            query: format!("limit=50&from={}&to={}", iso(day_from), iso(day_to)),
            reference_where: format!(
                " AND occurred_at_ms >= {day_from} AND occurred_at_ms < {day_to}"
            ),
            reference_offset: 0,
        },
        Case {
            name: "offset 100,000",
            query: format!("limit=50&offset={DEPTH}"),
            reference_where: String::new(),
            reference_offset: DEPTH,
        },
        Case {
            name: "cursor page at depth 100,000",
            query: format!("limit=50&cursor={cursor}"),
            reference_where: String::new(),
            reference_offset: DEPTH,
        },
    ];

    let api = Api::start(&http, DATABASE, &[]).await;
    let mut rows = Vec::new();
    for case in &cases {
        eprintln!("bench: {}", case.name);
        let (ours, reference) = measure_case(&http, &api, &key, case).await;
        rows.push((case.name.to_owned(), ours, reference));
    }
    eprintln!("bench: {CLIENTS} clients paging");
    let urls: Vec<String> = cases
        .iter()
        .map(|case| format!("{}/api/v1/organization/audit-logs?{}", api.base, case.query))
        .collect();
    let mixed = {
        let (http, key, urls) = (http.clone(), key.clone(), urls.clone());
        mixed_load(cases.len(), move |case| {
            let (http, key, url) = (http.clone(), key.clone(), urls[case].clone());
            async move {
                api_get(&http, &url, &key).await;
            }
        })
        .await
    };
    let statements: Vec<(String, String)> = cases.iter().map(reference_sql).collect();
    let mixed_reference = {
        let http = http.clone();
        mixed_load(cases.len(), move |case| {
            let http = http.clone();
            let (page, count) = statements[case].clone();
            async move {
                tokio::join!(clickhouse_post(&http, page), clickhouse_post(&http, count));
            }
        })
        .await
    };
    // A live system: another organization's events arrive while the first page is read, so the
    // current month's parts keep changing and that month is counted again on every request.
    eprintln!("bench: first page while events arrive");
    let arriving = tokio::spawn(insert_live_events(client.clone()));
    let (live, live_reference) = measure_case(&http, &api, &key, &cases[0]).await;
    arriving.abort();
    rows.push((
        format!("first page, no filter, while {LIVE_BATCH} events arrive every {LIVE_EVERY_MS} ms"),
        live,
        live_reference,
    ));

    eprintln!("bench: total alone");
    let total_reference = measure(|| async {
        clickhouse_post(
            &http,
            format!("SELECT count() FROM audit_events WHERE organization_id = '{BIG_ORG}'"),
        )
        .await;
    })
    .await;
    for (name, entries) in [
        ("total alone (count of 5,000,000), months unchanged", 2_000),
        ("total alone, every month counted (month cache off)", 0),
    ] {
        let store = audit_api::store::AuditLogStore::new(
            &config(),
            &audit_api::config::QueryConfig {
                count_cache_entries: entries,
                ..Default::default()
            },
            audit_api::metrics::ApiMetrics::new(),
        );
        let total = measure(|| async {
            store.count(BIG_ORG, &Filters::default()).await.unwrap();
        })
        .await;
        rows.push((name.to_owned(), total, total_reference));
    }
    let page_rss = api.peak_rss_mb();
    drop(api);

    // Export: about 1,000,000 rows of org_big, in fresh processes for clean RSS figures: the
    // default (one query sorted by ClickHouse) and time windows ordered by the service.
    let export_from = newest - 73 * 86_400_000;
    let windowed = Api::start(
        &http,
        DATABASE,
        &[("AUDIT_API__QUERY__EXPORT_WINDOW_ROWS", "32768")],
    )
    .await;
    let one_query = Api::start(&http, DATABASE, &[]).await;
    eprintln!("bench: CSV export");
    let export_query = format!(
        "/api/v1/organization/audit-logs/export?format=csv&from={}",
        iso(export_from)
    );
    // EXPORT_RUNS runs of each, interleaved; medians are reported.
    let reference_sql = format!(
        "SELECT * FROM audit_events WHERE organization_id = '{BIG_ORG}' AND occurred_at_ms >= {export_from} \
         ORDER BY occurred_at_ms DESC, id DESC FORMAT CSVWithNames"
    );
    let (mut windowed_runs, mut one_query_runs) = (ExportRuns::default(), ExportRuns::default());
    let (mut reference_runs, mut reference_bytes) = (Vec::new(), 0usize);
    for _ in 0..EXPORT_RUNS {
        windowed_runs.measure(&windowed, &export_query, &key);
        one_query_runs.measure(&one_query, &export_query, &key);
        let started = Instant::now();
        reference_bytes = clickhouse_post(&http, reference_sql.clone()).await.len();
        reference_runs.push(started.elapsed().as_secs_f64());
    }
    let reference_seconds = median(&mut reference_runs);
    let (export_rows, bytes) = (windowed_runs.lines - 1, windowed_runs.bytes);
    assert_eq!(
        (one_query_runs.lines, one_query_runs.bytes),
        (windowed_runs.lines, bytes),
        "both exports send the same body"
    );
    let export_seconds = median(&mut windowed_runs.seconds);
    let export_rss = windowed.peak_rss_mb();
    let one_query_rss = one_query.peak_rss_mb();
    drop((windowed, one_query));

    println!(
        "# audit-api read benchmark ({} UTC)",
        chrono::Utc::now().format("%Y-%m-%d %H:%M")
    );
    println!();
    println!(
        "machine: {} cores; ClickHouse {version} on loopback; {EVENTS} events over 365 days in 100 organizations, \
         {BIG_ORG} holding half (5,000,000); every case reads {BIG_ORG}. {ITERATIONS} runs per line after {WARM_UPS} warm-ups, \
         one client, release build.",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    println!("Reference = the straightforward SQL (page `ORDER BY occurred_at_ms DESC, id DESC LIMIT 50 OFFSET n` and `count()`, \
              run concurrently, no de-duplication) sent to ClickHouse over HTTP.");
    println!();
    println!("| case | audit-api p50 ms | p99 ms | reference p50 ms | p99 ms | p99 vs reference |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, (p50, p99), (r50, r99)) in &rows {
        println!(
            "| {name} | {p50:.1} | {p99:.1} | {r50:.1} | {r99:.1} | {:.2}x |",
            p99 / r99
        );
    }
    println!();
    println!();
    println!(
        "| {CLIENTS} clients paging, the six cases above in turn, {MIXED_SECONDS} s each side | requests/s | p50 ms | p99 ms |"
    );
    println!("|---|---:|---:|---:|");
    println!(
        "| audit-api | {:.0} | {:.1} | {:.1} |",
        mixed.0, mixed.1, mixed.2
    );
    println!(
        "| reference (page and count concurrently per request) | {:.0} | {:.1} | {:.1} |",
        mixed_reference.0, mixed_reference.1, mixed_reference.2
    );
    println!();
    println!("| export (median of {EXPORT_RUNS} interleaved runs) | rows | seconds | rows/s | audit-api CPU s | peak RSS MB |");
    println!("|---|---:|---:|---:|---:|---:|");
    let one_query_seconds = median(&mut one_query_runs.seconds);
    println!(
        "| audit-api CSV export, one query sorted by ClickHouse (the default, `export_window_rows = 0`) | {export_rows} | {one_query_seconds:.2} | {:.0} | {:.2} | {one_query_rss:.0} |",
        export_rows as f64 / one_query_seconds,
        median(&mut one_query_runs.cpu),
    );
    println!(
        "| audit-api CSV export in time windows ordered by the service (`export_window_rows = 32768`, 2 readers) | {export_rows} | {export_seconds:.2} | {:.0} | {:.2} | {export_rss:.0} |",
        export_rows as f64 / export_seconds,
        median(&mut windowed_runs.cpu),
    );
    println!(
        "| reference: ClickHouse FORMAT CSVWithNames over HTTP (no de-duplication) | {export_rows} | {reference_seconds:.2} | {:.0} | - | - |",
        export_rows as f64 / reference_seconds
    );
    println!();
    println!("audit-api peak RSS over the page cases: {page_rss:.0} MB; export body {bytes} bytes, reference {reference_bytes} bytes.");
    println!();
    let first_pages = [&rows[0], &rows[1], &rows[2], &rows[3], &rows[6]];
    let worst_first = first_pages
        .iter()
        .map(|(_, (_, p99), _)| *p99)
        .fold(0.0, f64::max);
    let worst_ratio = first_pages
        .iter()
        .map(|(_, (_, p99), (_, r99))| p99 / r99)
        .fold(0.0, f64::max);
    let first_p99 = rows[0].1 .1;
    let cursor_p99 = rows[5].1 .1;
    let total_p99 = rows[7].1 .1.max(rows[8].1 .1);
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!("| target | figure | verdict |");
    println!("|---|---|---|");
    println!("| every first-page case p99 < 15 ms, total included (worst of the four, and while events arrive) | {worst_first:.1} ms | {} |", verdict(worst_first < 15.0));
    println!("| first page never slower than 1.2x the reference (worst p99 ratio of the same five) | {worst_ratio:.2}x | {} |", verdict(worst_ratio <= 1.2));
    println!(
        "| cursor page at depth 100,000 within 1.5x of the first page (p99) | {:.2}x | {} |",
        cursor_p99 / first_p99,
        verdict(cursor_p99 <= 1.5 * first_p99)
    );
    println!(
        "| total alone p99 < 10 ms (worse of the two lines) | {total_p99:.1} ms | {} |",
        verdict(total_p99 < 10.0)
    );
    let rate = export_rows as f64 / one_query_seconds;
    println!(
        "| export (the default) >= 700,000 rows/s | {rate:.0} rows/s | {} |",
        verdict(rate >= 700_000.0)
    );
    println!(
        "| export (the default) RSS < 64 MB | {one_query_rss:.0} MB | {} |",
        verdict(one_query_rss < 64.0)
    );
    println!(
        "| {CLIENTS} clients: throughput at least the reference's | {:.2}x | {} |",
        mixed.0 / mixed_reference.0,
        verdict(mixed.0 >= mixed_reference.0)
    );
    println!(
        "| {CLIENTS} clients: p99 within 1.2x of the reference's | {:.2}x | {} |",
        mixed.2 / mixed_reference.2,
        verdict(mixed.2 <= 1.2 * mixed_reference.2)
    );
    assert!(
        export_rows >= EXPORT_ROWS_TARGET * 9 / 10,
        "the export range held {export_rows} rows"
    );
}

fn median(runs: &mut [f64]) -> f64 {
    runs.sort_by(f64::total_cmp);
    percentile(runs, 0.5)
}

/// Runs of one export: wall seconds, CPU seconds of the serving process, and the last body's
/// lines and bytes.
#[derive(Default)]
struct ExportRuns {
    seconds: Vec<f64>,
    cpu: Vec<f64>,
    lines: u64,
    bytes: u64,
}

impl ExportRuns {
    /// One export, read like `curl > file` would: by a client on a thread of its own with a
    /// single-threaded runtime. The client shares the service's 2 cores; on the bench's
    /// multi-threaded runtime its connection task and reader woke each other across threads.
    fn measure(&mut self, api: &Api, query: &str, key: &str) {
        let pid = api.child.id();
        let url = format!("{}{query}", api.base);
        let key = key.to_owned();
        let cpu_before = audit_testkit::proc_cpu_seconds(pid).expect("audit-api runs");
        let started = Instant::now();
        let (lines, bytes) = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let mut response = reqwest::Client::new()
                    .get(url)
                    .header("X-API-Key", key)
                    .send()
                    .await
                    .unwrap();
                assert!(
                    response.status().is_success(),
                    "export: {}",
                    response.status()
                );
                let (mut lines, mut bytes) = (0u64, 0u64);
                while let Some(chunk) = response.chunk().await.unwrap() {
                    lines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
                    bytes += chunk.len() as u64;
                }
                (lines, bytes)
            })
        })
        .join()
        .expect("the export client ran");
        self.seconds.push(started.elapsed().as_secs_f64());
        self.cpu
            .push(audit_testkit::proc_cpu_seconds(pid).expect("audit-api runs") - cpu_before);
        (self.lines, self.bytes) = (lines, bytes);
    }
}
