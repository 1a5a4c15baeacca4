//! `make bench BENCH=retention`: on the 10M-event data set (one organization holding 5M), the
//! time the retention job takes to expire one month of the big organization from every table,
//! and an erasure of one person who appears in 100,000 events; beside each, the read API's
//! latency while it runs against the same reads on an idle store, in one process invocation so
//! that the ratios hold on a noisy machine. Then the two ClickHouse delete mechanisms on one
//! month of the events table alone.
//!
//! Needs the local stack (`make up`) and the release binary (`cargo build --release --bins`).
//! Destructive: the data set is generated afresh into `audit_bench_retention` every run.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use audit_api::config::ApiConfig;
use audit_api::keys::{self, Role};
use audit_api::retention::commands::Operator;
use audit_store::{clickhouse, migrations, ClickHouseConfig};
use audit_testkit::percentile;
use secrecy::ExposeSecret;

mod support;

use support::{api_get, Api, BIG_ORG, EVENTS};

const DATABASE: &str = "audit_bench_retention";
const DAY_MS: i64 = 86_400_000;
/// One event of `org_big` in this many is the erased person's: 100,000 of its 5,000,000.
const SUBJECT_EVERY: u64 = 50;
const IDLE_SECONDS: u64 = 20;
/// Clients reading while the job runs (the machine has two cores; ClickHouse shares them).
const CLIENTS: usize = 2;

fn config() -> ClickHouseConfig {
    support::config(DATABASE)
}

/// Latencies (ms) of the read mix, looped by `CLIENTS` clients until `stop`: the big
/// organization's first page with its total, the same filtered by event type, and a small
/// organization's first page.
async fn read_load(
    http: reqwest::Client,
    base: String,
    keys: (String, String),
    stop: Arc<AtomicBool>,
) -> Vec<f64> {
    let mut clients = Vec::new();
    for client in 0..CLIENTS {
        let (http, base, keys, stop) = (http.clone(), base.clone(), keys.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let urls = [
                (
                    format!("{base}/api/v1/organization/audit-logs?limit=50"),
                    &keys.0,
                ),
                (
                    format!(
                        "{base}/api/v1/organization/audit-logs?limit=50&eventType=user.logged_in"
                    ),
                    &keys.0,
                ),
                (
                    format!("{base}/api/v1/organization/audit-logs?limit=50"),
                    &keys.1,
                ),
            ];
            let mut times = Vec::new();
            let mut n = client;
            while !stop.load(Ordering::Relaxed) {
                let (url, key) = &urls[n % urls.len()];
                let started = Instant::now();
                api_get(&http, url, key).await;
                times.push(started.elapsed().as_secs_f64() * 1000.0);
                n += 1;
            }
            times
        }));
    }
    let mut all = Vec::new();
    for client in clients {
        all.extend(client.await.unwrap());
    }
    all.sort_by(f64::total_cmp);
    all
}

/// Runs `work` while the read mix runs; its result, its time, and the reads' latencies.
async fn under_load<T, F: std::future::Future<Output = T>>(
    http: &reqwest::Client,
    api: &Api,
    keys: &(String, String),
    work: F,
) -> (T, Duration, Vec<f64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(read_load(
        http.clone(),
        api.base.clone(),
        keys.clone(),
        stop.clone(),
    ));
    // The clients are warm before the work starts.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = Instant::now();
    let result = work.await;
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    (result, took, load.await.unwrap())
}

fn p(times: &[f64]) -> String {
    format!(
        "{:.1} / {:.1} ms ({} reads)",
        percentile(times, 0.5),
        percentile(times, 0.99),
        times.len()
    )
}

async fn count(client: &clickhouse::Client, sql: &str) -> u64 {
    client.query(sql).fetch_one().await.unwrap()
}

#[tokio::main]
async fn main() {
    let client = config().client();
    eprintln!("bench: generating {EVENTS} events into {DATABASE} (a minute or two)");
    audit_testkit::drop_database(&config(), DATABASE)
        .await
        .unwrap();
    migrations::apply(&config()).await.unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    support::generate(&client, now, Some(SUBJECT_EVERY)).await;
    let big = keys::generate(BIG_ORG, Role::Admin, "bench");
    keys::create(&client, &big).await.unwrap();
    let small = keys::generate("org_101", Role::Admin, "bench");
    keys::create(&client, &small).await.unwrap();
    let keys = (
        big.secret.expose_secret().to_owned(),
        small.secret.expose_secret().to_owned(),
    );
    let http = reqwest::Client::new();
    let api = Api::start(
        &http,
        DATABASE,
        &[("AUDIT_API__RETENTION__REFRESH_INTERVAL_MS", "500")],
    )
    .await;
    let mut operator_config = ApiConfig {
        clickhouse: config(),
        ..ApiConfig::default()
    };
    operator_config.read_events.enabled = false;
    operator_config.retention.default_days = audit_store::retention::MAX_DAYS;
    operator_config.retention.pseudonym_key =
        Some("bench-pseudonym-key-0123456789abcdef".to_owned().into());
    operator_config.retention.erasure_settle_ms = 0;
    let operator = Operator::new(&operator_config).unwrap();

    // The idle store: the same reads, nothing else running.
    let (_, _, idle) = under_load(&http, &api, &keys, async {
        tokio::time::sleep(Duration::from_secs(IDLE_SECONDS)).await;
    })
    .await;

    // Erase the person of 100,000 events.
    let subject_sql = "SELECT count() FROM audit_events WHERE organization_id = 'org_big' \
                       AND actor_id = 'usr_subject'";
    let subject_events = count(&client, subject_sql).await;
    let (erased, erase_time, during_erasure) = under_load(&http, &api, &keys, async {
        operator
            .erase(BIG_ORG, "usr_subject", "bench")
            .await
            .unwrap()
    })
    .await;
    let still = count(
        &client,
        "SELECT count() FROM audit_events_by_actor_email_rows WHERE \
         positionCaseInsensitive(ifNull(actor_email, ''), 'subject@example.com') > 0 \
         OR actor_email_key = 'subject@example.com'",
    )
    .await
        + count(
            &client,
            "SELECT count() FROM audit_events WHERE ifNull(actor_email, '') = 'subject@example.com' \
             OR ifNull(context_ip, '') = '198.51.100.77'",
        )
        .await;
    assert_eq!(still, 0, "the erased person's values are still stored");

    // Expire the oldest month of org_big: a retention of 335 days on a year of events.
    let cutoff = now - 335 * DAY_MS;
    let month_sql = |table: &str| {
        format!(
            "SELECT count() FROM {table} WHERE organization_id = '{BIG_ORG}' AND occurred_at_ms < {cutoff}"
        )
    };
    let to_expire = count(&client, &month_sql("audit_events")).await;
    operator
        .admin
        .set_days(BIG_ORG, Some(335), "bench")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (report, expire_time, during_expiry) = under_load(&http, &api, &keys, async {
        operator
            .job
            .purge(chrono::Utc::now().timestamp_millis())
            .await
            .unwrap()
    })
    .await;
    let mut left = 0;
    for table in [
        "audit_events",
        "audit_events_by_type",
        "audit_events_by_actor_email",
        "audit_events_by_actor_email_rows",
    ] {
        left += count(&client, &month_sql(table)).await;
    }
    assert_eq!(left, 0, "expired rows left after the job");

    // The mechanisms alone, on the events table: the next two months of org_big, one each way.
    let month = |k: i64| {
        (
            now - (335 - 30 * (k - 1)) * DAY_MS,
            now - (335 - 30 * k) * DAY_MS,
        )
    };
    let (a_from, a_to) = month(1);
    let (b_from, b_to) = month(2);
    let mutation_rows = count(
        &client,
        &format!("SELECT count() FROM audit_events WHERE organization_id = '{BIG_ORG}' AND occurred_at_ms >= {a_from} AND occurred_at_ms < {a_to}"),
    )
    .await;
    let started = Instant::now();
    client
        .query(&format!("ALTER TABLE audit_events DELETE WHERE organization_id = '{BIG_ORG}' AND occurred_at_ms >= {a_from} AND occurred_at_ms < {a_to}"))
        .with_setting("mutations_sync", "2")
        .execute()
        .await
        .unwrap();
    let mutation_time = started.elapsed();
    let lightweight_rows = count(
        &client,
        &format!("SELECT count() FROM audit_events WHERE organization_id = '{BIG_ORG}' AND occurred_at_ms >= {b_from} AND occurred_at_ms < {b_to}"),
    )
    .await;
    let started = Instant::now();
    client
        .query(&format!("DELETE FROM audit_events WHERE organization_id = '{BIG_ORG}' AND occurred_at_ms >= {b_from} AND occurred_at_ms < {b_to}"))
        .with_setting("mutations_sync", "2")
        .execute()
        .await
        .unwrap();
    let lightweight_time = started.elapsed();
    let masked_on_disk: u64 = client
        .query(&format!(
            "SELECT sum(rows) FROM system.parts WHERE database = '{DATABASE}' AND table = 'audit_events' AND active AND has_lightweight_delete"
        ))
        .fetch_one()
        .await
        .unwrap_or(0);
    let version: String = client.query("SELECT version()").fetch_one().await.unwrap();

    let idle_p99 = percentile(&idle, 0.99);
    let ratio = |t: &[f64]| percentile(t, 0.99) / idle_p99;
    println!("## Retention, legal hold and erasure benchmark");
    println!();
    println!(
        "ClickHouse {version}, {EVENTS} events (5,000,000 in {BIG_ORG}, over a year), {CLIENTS} clients reading \
         through the release audit-api throughout (the big organization's first page with its total, the \
         same filtered by event type, a small organization's first page), run on {}.",
        chrono::Utc::now().format("%Y-%m-%d")
    );
    println!();
    println!("| line | figure | reference |");
    println!("|---|---:|---|");
    println!(
        "| reads on the idle store, p50 / p99 | {} | the reference line |",
        p(&idle)
    );
    println!(
        "| expire one month of {BIG_ORG}: the retention job, every table ({to_expire} events; {} reported) | **{:.1} s** | removal bound: 24 h |",
        report.removed_events,
        expire_time.as_secs_f64()
    );
    println!(
        "| reads during the expiry, p50 / p99 | {} | p99 {:.2}x idle |",
        p(&during_expiry),
        ratio(&during_expiry)
    );
    println!(
        "| erase one person ({subject_events} events as actor; {} counted with mentions), every table | **{:.1} s** | - |",
        erased.events,
        erase_time.as_secs_f64()
    );
    println!(
        "| reads during the erasure, p50 / p99 | {} | p99 {:.2}x idle |",
        p(&during_erasure),
        ratio(&during_erasure)
    );
    println!(
        "| mechanism: `ALTER TABLE ... DELETE` (mutation, rows gone from disk), one month of the events table alone ({mutation_rows} rows) | {:.1} s | chosen |",
        mutation_time.as_secs_f64()
    );
    println!(
        "| mechanism: lightweight `DELETE FROM` (rows masked, on disk until the next merge), the next month ({lightweight_rows} rows) | {:.1} s | {masked_on_disk} rows of masked parts still on disk |",
        lightweight_time.as_secs_f64()
    );
    println!();
    println!("Reproduce: `make bench BENCH=retention`.");
}
