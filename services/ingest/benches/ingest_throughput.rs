//! `make bench`: ingest throughput, freshness and memory of `audit-ingest`, with reference lines,
//! in one process invocation so that the ratios hold on a noisy machine.
//!
//! Needs the local stack (`make up`) and the release binaries (`cargo build --release --bins`).
//! Figures printed:
//!   1. audit-ingest: 1,000,000 events from pre-filled topics, sustained events/s, peak RSS.
//!   2. audit-ingest over `SASL_SSL` (SCRAM-SHA-512) to Kafka and HTTPS to ClickHouse, same
//!      events: the cost of TLS against line 1, and the time from process start to the first row.
//!   3. Reference: kcat streaming the topics into one HTTP INSERT ... SELECT FROM input() (the
//!      closest stand-in for ClickHouse's Kafka engine, which the library build cannot run).
//!   4. Reference (ceiling): INSERT ... FORMAT RowBinary of the same rows from a file.
//!      Lines 1-4 run in `BENCH_ROUNDS` (default 3) interleaved rounds; medians are compared.
//!   5. Freshness at a fixed 5,000 events/s: produce -> visible, p50 / p99 / max.
//!   6. Liveness (`support/chaos_lines.rs`): events/s visible during the chaos test's schedule
//!      against the same load without faults, and kill -> resume times with static and dynamic
//!      group membership.
//!
//! `BENCH_INGEST_LINES=throughput` or `=chaos` runs one group of lines.

#[path = "support/chaos_lines.rs"]
mod chaos_lines;
#[path = "../tests/common/mod.rs"]
mod common;

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use audit_store::clickhouse::{self, Row};
use audit_store::{migrations, ClickHouseConfig};
use audit_testkit::{brokers, clickhouse_url, percentile, release_binary};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Deserialize;

const EVENTS: u64 = 1_000_000;
const PARTITIONS: i32 = 6;
const FRESHNESS_RATE: u64 = 5_000;
const FRESHNESS_SECONDS: u64 = 30;

struct Topics {
    users: String,
    teams: String,
    auth: String,
}

impl Topics {
    fn all(&self) -> Vec<String> {
        vec![self.users.clone(), self.teams.clone(), self.auth.clone()]
    }
}

async fn create_topics(prefix: &str) -> Topics {
    let topics = Topics {
        users: format!("{prefix}.users"),
        teams: format!("{prefix}.teams"),
        auth: format!("{prefix}.auth"),
    };
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let mut names = topics.all();
    names.push(format!("{prefix}.dlq"));
    let new: Vec<NewTopic<'_>> = names
        .iter()
        .map(|n| NewTopic::new(n, PARTITIONS, TopicReplication::Fixed(1)))
        .collect();
    for result in admin
        .create_topics(&new, &AdminOptions::new())
        .await
        .unwrap()
    {
        result.unwrap();
    }
    topics
}

fn loadgen(topics: &Topics, count: u64, rate: u64, run: &str) -> Command {
    let mut command = Command::new(release_binary("audit-loadgen"));
    command.args([
        "--brokers",
        &brokers(),
        "--count",
        &count.to_string(),
        "--rate",
        &rate.to_string(),
        "--users-topic",
        &topics.users,
        "--teams-topic",
        &topics.teams,
        "--auth-topic",
        &topics.auth,
        "--run-id",
        run,
    ]);
    command
}

async fn fresh_database(name: &str) -> ClickHouseConfig {
    let config = ClickHouseConfig {
        url: clickhouse_url(),
        database: name.to_owned(),
        ..ClickHouseConfig::default()
    };
    migrations::apply(&config).await.expect("migrations");
    config
}

async fn count(client: &clickhouse::Client, table: &str) -> u64 {
    client
        .query(&format!("SELECT count() FROM {table}"))
        .fetch_one()
        .await
        .unwrap_or(0)
}

/// How the measured ingest reaches Kafka and ClickHouse.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Transport {
    /// The local stack's plaintext listener and ClickHouse's HTTP port.
    Plaintext,
    /// `SASL_SSL` with SCRAM-SHA-512 to Kafka and HTTPS to ClickHouse, both verified against the
    /// local CA: what a managed Kafka and ClickHouse Cloud ask for.
    Secure,
}

fn spawn_ingest(
    topics: &Topics,
    prefix: &str,
    database: &str,
    group: &str,
    port: u16,
    transport: Transport,
) -> Child {
    let mut command = Command::new(release_binary("audit-ingest"));
    if transport == Transport::Secure {
        let stack = audit_testkit::SecureStack::from_env();
        let ca = stack.tls("ca.crt");
        command
            .env("AUDIT_INGEST__KAFKA__BROKERS", &stack.sasl_ssl)
            .env("AUDIT_INGEST__KAFKA__SECURITY__PROTOCOL", "SASL_SSL")
            .env(
                "AUDIT_INGEST__KAFKA__SECURITY__SASL_MECHANISM",
                "SCRAM-SHA-512",
            )
            .env("AUDIT_INGEST__KAFKA__SECURITY__SASL_USERNAME", &stack.user)
            .env("AUDIT_INGEST__KAFKA__SECURITY__CA_FILE", &ca)
            .env("AUDIT_INGEST__KAFKA__SASL_PASSWORD", &stack.password)
            .env("AUDIT_INGEST__CLICKHOUSE__URL", &stack.clickhouse_https)
            .env("AUDIT_INGEST__CLICKHOUSE__TLS__CA_FILE", &ca);
    } else {
        command
            .env("AUDIT_INGEST__KAFKA__BROKERS", brokers())
            .env("AUDIT_INGEST__CLICKHOUSE__URL", clickhouse_url());
    }
    command
        .arg("run")
        .env("AUDIT_INGEST__KAFKA__GROUP_ID", group)
        .env("AUDIT_INGEST__KAFKA__TOPICS", topics.all().join(","))
        .env("AUDIT_INGEST__DEAD_LETTER__TOPIC", format!("{prefix}.dlq"))
        .env("AUDIT_INGEST__CLICKHOUSE__DATABASE", database)
        .env("AUDIT_INGEST__HTTP_LISTEN", format!("127.0.0.1:{port}"))
        .env("AUDIT_INGEST__TELEMETRY__LOG_FILTER", "warn")
        // Same host as ClickHouse: compressing the inserts only costs CPU on both sides.
        .env("AUDIT_INGEST__CLICKHOUSE__COMPRESSION", "none")
        // The allocator settings of the ingest image (deploy/docker/Dockerfile).
        .env("MIMALLOC_PURGE_DELAY", "0")
        .env("MALLOC_ARENA_MAX", "2")
        .stdout(Stdio::null())
        .spawn()
        .expect("audit-ingest")
}

/// Peak resident memory of a running process so far: the kernel's high-water mark (VmHWM), so
/// a peak between two samples is not missed (0 once the process is gone).
fn rss_mb(pid: u32) -> f64 {
    audit_testkit::proc_status_kb(pid, "VmHWM").map_or(0.0, |kb| kb as f64 / 1024.0)
}

struct Throughput {
    seconds: f64,
    rate: f64,
    peak_rss_mb: f64,
    /// From the start of the wait (right after the process started) to the first row visible:
    /// start-up, joining the group, the first fetch and the first insert.
    first_row_seconds: f64,
}

/// Polls `table` until it holds `target` rows; the rate counts from the first row seen.
async fn wait_rows(
    client: &clickhouse::Client,
    table: &str,
    target: u64,
    pid: Option<u32>,
    limit: Duration,
) -> Option<Throughput> {
    let started = Instant::now();
    let mut first: Option<(Instant, u64)> = None;
    let mut peak = 0.0_f64;
    loop {
        if let Some(pid) = pid {
            peak = peak.max(rss_mb(pid));
        }
        let rows = count(client, table).await;
        let now = Instant::now();
        if rows > 0 && first.is_none() {
            first = Some((now, rows));
        }
        if rows >= target {
            let (t0, n0) = first.unwrap_or((started, 0));
            let window = now.duration_since(t0).as_secs_f64();
            // Rows that all became visible at once (one streamed INSERT, which ClickHouse
            // squashes into one block) have no window of their own: time them from the start.
            let rate = if window > 0.5 {
                (rows - n0) as f64 / window
            } else {
                rows as f64 / now.duration_since(started).as_secs_f64()
            };
            return Some(Throughput {
                seconds: now.duration_since(started).as_secs_f64(),
                rate,
                peak_rss_mb: peak,
                first_row_seconds: t0.duration_since(started).as_secs_f64(),
            });
        }
        if started.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Commits offset 0 on every partition for `group`, so a new member starts at the beginning.
fn rewind_group(topics: &Topics, group: &str) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", group)
        .create()
        .unwrap();
    let mut offsets = TopicPartitionList::new();
    for topic in topics.all() {
        for partition in 0..PARTITIONS {
            offsets
                .add_partition_offset(&topic, partition, Offset::Offset(0))
                .unwrap();
        }
    }
    consumer
        .commit(&offsets, CommitMode::Sync)
        .expect("commit start offsets");
}

/// The simplest Kafka -> ClickHouse pipe a user could build instead: kcat reads the topics as a
/// consumer group and streams the JSON to one HTTP `INSERT ... SELECT ... FROM input(...) FORMAT
/// JSONEachRow` whose SELECT maps the flat fields (the mapping ClickHouse's Kafka engine line used
/// on 18.16; 26.9 as a library runs no Kafka-engine consumers). No validation, no dead letters,
/// no exactly-once, no enrichment: it does less work than audit-ingest.
async fn kcat_pipe(topics: &Topics, database: &str, group: &str) -> Option<Throughput> {
    let config = fresh_database(database).await;
    let client = config.client();
    rewind_group(topics, group);
    let select = "INSERT INTO audit_events SELECT
            organizationId AS organization_id,
            toInt64(toUnixTimestamp(parseDateTimeBestEffort(occurredAt))) * 1000 + toInt64(substring(occurredAt, 21, 3)) AS occurred_at_ms,
            id, type AS event_type, `actor.id` AS actor_id, if(`actor.type` = '', 'user', `actor.type`) AS actor_type,
            nullIf(`actor.email`, '') AS actor_email, nullIf(`actor.name`, '') AS actor_name,
            `resource.type` AS resource_type, `resource.id` AS resource_id, nullIf(`resource.name`, '') AS resource_name,
            nullIf(`affectedUser.id`, '') AS affected_user_id, nullIf(`affectedUser.email`, '') AS affected_user_email,
            '[]' AS changes, nullIf(`context.ip`, '') AS context_ip, nullIf(`context.userAgent`, '') AS context_user_agent,
            nullIf(`context.requestId`, '') AS context_request_id, nullIf(`context.location`, '') AS context_location,
            CAST(NULL AS Nullable(String)) AS metadata, '' AS source_topic, toInt32(0) AS source_partition,
            toInt64(0) AS source_offset, toUInt64(toUnixTimestamp(now())) * 1000 AS ingested_at_ms
        FROM input('id String, type String, occurredAt String, organizationId String,
            `actor.id` String, `actor.type` String, `actor.email` String, `actor.name` String,
            `resource.type` String, `resource.id` String, `resource.name` String,
            `affectedUser.id` String, `affectedUser.email` String,
            `context.ip` String, `context.userAgent` String, `context.requestId` String, `context.location` String')
        FORMAT JSONEachRow";
    // The body streams (-T -); -T would append a file name to the path, the request target says
    // "/". ClickHouse squashes the streamed rows into one block despite max_insert_block_size,
    // so they become visible at once and the line is timed from its start (see wait_rows).
    let target = format!(
        "/?database={database}&max_insert_block_size=50000&input_format_import_nested_json=1\
         &input_format_skip_unknown_fields=1{}&query={}",
        uncollapsed(&client).await,
        url_encode(select)
    );
    let topics = topics.all().join(" ");
    let mut pipe = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; kcat -b {} -G {group} -X auto.offset.reset=earliest -e -q -f '%s\\n' {topics} \
             | curl -sS --fail -X POST -T - --request-target '{target}' '{}/'",
            brokers(),
            clickhouse_url()
        ))
        .stdout(Stdio::null())
        // A group of its own, so that kcat and curl end with it (kcat -G -e may not exit).
        .process_group(0)
        .spawn()
        .expect("bash with kcat and curl");
    let result = wait_rows(
        &client,
        "audit_events",
        EVENTS,
        None,
        Duration::from_secs(600),
    )
    .await;
    let _ = Command::new("kill")
        .args(["-TERM", &format!("-{}", pipe.id())])
        .status();
    let _ = pipe.wait();
    result
}

/// The URL setting audit-ingest sends with its events' inserts (`optimize_on_insert = 0`, see
/// `ClickHouseSink::uncollapsed_inserts`), for the reference lines: empty where the server does
/// not know it (18.16).
async fn uncollapsed(client: &clickhouse::Client) -> &'static str {
    if audit_store::has_setting(client, "optimize_on_insert")
        .await
        .expect("settings look-up")
    {
        "&optimize_on_insert=0"
    } else {
        ""
    }
}

/// Percent-encodes a query for a URL.
fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Exports the rows audit-ingest stored as RowBinary, then times inserting that file.
async fn raw_insert(source_database: &str, database: &str) -> Throughput {
    let config = fresh_database(database).await;
    let file = std::env::temp_dir().join(format!("{database}.rowbinary"));
    let export = Command::new("curl")
        .args(["-sS", "--fail", "-o"])
        .arg(&file)
        .arg(format!("{}/?database={source_database}", clickhouse_url()))
        .args([
            "--data-binary",
            "SELECT * FROM audit_events FORMAT RowBinary",
        ])
        .status()
        .unwrap();
    assert!(export.success(), "export failed");
    // The same setting as audit-ingest's inserts, where the server has it.
    let settings = uncollapsed(&config.client()).await;
    let started = Instant::now();
    let insert = Command::new("curl")
        .args(["-sS", "--fail", "-X", "POST", "-T"])
        .arg(&file)
        // -T appends the file's name to a URL path without one; the request target says "/".
        .arg("--request-target")
        .arg(format!(
            "/?database={database}{settings}&query=INSERT%20INTO%20audit_events%20FORMAT%20RowBinary"
        ))
        .arg(format!("{}/", clickhouse_url()))
        .status()
        .unwrap();
    let seconds = started.elapsed().as_secs_f64();
    assert!(insert.success(), "insert failed");
    let rows = count(&config.client(), "audit_events").await;
    let _ = std::fs::remove_file(&file);
    Throughput {
        seconds,
        rate: rows as f64 / seconds,
        peak_rss_mb: 0.0,
        first_row_seconds: 0.0,
    }
}

#[derive(Row, Deserialize)]
struct Arrival {
    ingested_at_ms: u64,
    occurred_at_ms: i64,
}

/// Produce -> visible latency at a fixed rate: events carry their production time as occurredAt;
/// a poller records when each first shows up.
async fn freshness(suffix: &str) -> (Vec<f64>, f64) {
    let prefix = format!("bench.fresh.{suffix}");
    let topics = create_topics(&prefix).await;
    let database = format!("bench_fresh_{suffix}");
    let config = fresh_database(&database).await;
    let client = config.client();
    let mut ingest = spawn_ingest(
        &topics,
        &prefix,
        &database,
        &format!("bench-fresh-{suffix}"),
        common::free_port(),
        Transport::Plaintext,
    );
    tokio::time::sleep(Duration::from_secs(5)).await; // join the group
    let total = FRESHNESS_RATE * FRESHNESS_SECONDS;
    let mut producer = loadgen(&topics, total, FRESHNESS_RATE, &format!("fresh{suffix}"))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut latencies = Vec::with_capacity(total as usize);
    let mut last_ingested = 0_u64;
    let mut peak = 0.0_f64;
    let deadline = Instant::now() + Duration::from_secs(FRESHNESS_SECONDS + 60);
    while (latencies.len() as u64) < total && Instant::now() < deadline {
        peak = peak.max(rss_mb(ingest.id()));
        let rows: Vec<Arrival> = client
            .query(
                "SELECT ingested_at_ms, occurred_at_ms FROM audit_events WHERE ingested_at_ms > ?",
            )
            .bind(last_ingested)
            .fetch_all()
            .await
            .unwrap_or_default();
        let seen_at = chrono::Utc::now().timestamp_millis();
        for row in rows {
            last_ingested = last_ingested.max(row.ingested_at_ms);
            latencies.push((seen_at - row.occurred_at_ms) as f64 / 1000.0);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = producer.wait();
    let _ = ingest.kill();
    let _ = ingest.wait();
    latencies.sort_by(f64::total_cmp);
    (latencies, peak)
}

/// Median and range of one line's rates over the rounds.
struct Line {
    median: f64,
    low: f64,
    high: f64,
    seconds: f64,
}

impl Line {
    fn of(runs: &[Throughput]) -> Line {
        let mut rates: Vec<f64> = runs.iter().map(|t| t.rate).collect();
        rates.sort_by(f64::total_cmp);
        let mut seconds: Vec<f64> = runs.iter().map(|t| t.seconds).collect();
        seconds.sort_by(f64::total_cmp);
        Line {
            median: percentile(&rates, 0.5),
            low: rates.first().copied().unwrap_or(f64::NAN),
            high: rates.last().copied().unwrap_or(f64::NAN),
            seconds: percentile(&seconds, 0.5),
        }
    }
}

/// Rounds of the three throughput lines, interleaved: the reference lines move a lot between
/// runs on a small machine (merges, disk writeback), so each line is run several times and the
/// medians are compared.
fn rounds() -> usize {
    std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(3usize)
        .max(1)
}

/// Which groups of lines to run: `BENCH_INGEST_LINES=throughput,chaos` (default both).
fn enabled(lines: &str) -> bool {
    std::env::var("BENCH_INGEST_LINES")
        .map_or(true, |wanted| wanted.split(',').any(|w| w.trim() == lines))
}

#[tokio::main]
async fn main() {
    println!(
        "# audit-ingest benchmark ({} UTC)",
        chrono::Utc::now().format("%Y-%m-%d %H:%M")
    );
    if enabled("throughput") {
        throughput_lines().await;
    }
    if enabled("chaos") {
        chaos_lines::lines().await;
    }
}

/// Starts an audit-ingest on a fresh `database` and waits until it stored every pre-filled event;
/// the process is still running when this returns.
async fn ingest_run(
    topics: &Topics,
    prefix: &str,
    database: &str,
    tag: &str,
    port: u16,
    transport: Transport,
) -> (Throughput, Child) {
    let config = fresh_database(database).await;
    let ingest = spawn_ingest(
        topics,
        prefix,
        database,
        &format!("bench-{database}-{tag}"),
        port,
        transport,
    );
    let run = wait_rows(
        &config.client(),
        "audit_events",
        EVENTS,
        Some(ingest.id()),
        Duration::from_secs(600),
    )
    .await
    .unwrap_or_else(|| panic!("audit-ingest ({database}) did not store every event within 600 s"));
    (run, ingest)
}

/// Throughput against the two references, freshness and memory.
async fn throughput_lines() {
    let suffix = chrono::Utc::now().format("%m%d%H%M%S").to_string();
    let prefix = format!("bench.events.{suffix}");
    eprintln!("bench: pre-filling {EVENTS} events into {prefix}.*");
    let topics = create_topics(&prefix).await;
    let fill = loadgen(&topics, EVENTS, 0, &format!("b{suffix}"))
        .output()
        .unwrap();
    assert!(fill.status.success(), "loadgen failed");
    let fill_line = String::from_utf8_lossy(&fill.stdout).trim().to_owned();
    let stack = ClickHouseConfig {
        url: clickhouse_url(),
        ..ClickHouseConfig::default()
    };
    let server = stack.server_client();
    let drop_database = |db: String| {
        let stack = stack.clone();
        async move {
            let _ = audit_testkit::drop_database(&stack, &db).await;
        }
    };

    let rounds = rounds();
    let (mut ours, mut engine, mut ceiling) = (Vec::new(), Vec::new(), Vec::new());
    let mut secure = Vec::new();
    let mut engine_unfinished = 0;
    let mut ingest_rss = 0.0_f64;
    let mut costs = Vec::new();
    let previous = PreviousResults::read();
    for round in 1..=rounds {
        let tag = format!("{suffix}_{round}");
        settle(&server).await;
        eprintln!("bench: round {round}/{rounds}: audit-ingest");
        let ingest_db = format!("bench_ingest_{tag}");
        let port = common::free_port();
        let (run, mut ingest) = ingest_run(
            &topics,
            &prefix,
            &ingest_db,
            &tag,
            port,
            Transport::Plaintext,
        )
        .await;
        // The duplicate check waits for the burst to end (one quiet interval), then covers it.
        tokio::time::sleep(Duration::from_secs(12)).await;
        costs.push(FenceCost::scrape(port).await);
        let _ = ingest.kill();
        let _ = ingest.wait();
        ingest_rss = ingest_rss.max(run.peak_rss_mb);
        ours.push(run);

        settle(&server).await;
        eprintln!("bench: round {round}/{rounds}: audit-ingest over SASL_SSL + HTTPS");
        let secure_db = format!("bench_secure_{tag}");
        let (run, mut ingest) = ingest_run(
            &topics,
            &prefix,
            &secure_db,
            &tag,
            common::free_port(),
            Transport::Secure,
        )
        .await;
        let _ = ingest.kill();
        let _ = ingest.wait();
        secure.push(run);
        drop_database(secure_db).await;

        settle(&server).await;
        eprintln!("bench: round {round}/{rounds}: kcat -> INSERT FROM input()");
        let engine_db = format!("bench_engine_{tag}");
        match kcat_pipe(&topics, &engine_db, &format!("bench-engine-{tag}")).await {
            Some(run) => engine.push(run),
            None => engine_unfinished += 1,
        }
        drop_database(engine_db).await;

        settle(&server).await;
        eprintln!("bench: round {round}/{rounds}: raw RowBinary insert");
        let raw_db = format!("bench_raw_{tag}");
        ceiling.push(raw_insert(&ingest_db, &raw_db).await);
        drop_database(raw_db).await;
        drop_database(ingest_db).await;
    }

    settle(&server).await;
    eprintln!("bench: freshness at {FRESHNESS_RATE} events/s for {FRESHNESS_SECONDS} s");
    let (latencies, fresh_rss) = freshness(&suffix).await;

    let ours_runs = ours;
    let ours = Line::of(&ours_runs);
    let engine = (!engine.is_empty()).then(|| Line::of(&engine));
    let ceiling = Line::of(&ceiling);
    let engine_rate = engine.as_ref().map_or(f64::NAN, |e| e.median);
    let p50 = percentile(&latencies, 0.50);
    let p99 = percentile(&latencies, 0.99);
    let max = latencies.last().copied().unwrap_or(f64::NAN);
    let peak_rss = ingest_rss.max(fresh_rss);
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };

    println!();
    println!(
        "machine: {} cores; ClickHouse {} and Kafka 4.1 on loopback (make up); pre-fill: {fill_line}",
        num_cpus(),
        server_version(&server).await
    );
    println!(
        "audit-ingest: release build, default settings except clickhouse.compression=none \
         (same host), with the image's allocator settings (MIMALLOC_PURGE_DELAY=0, \
         MALLOC_ARENA_MAX=2); 3 topics x {PARTITIONS} partitions. The kcat line replaces ClickHouse's \
         Kafka engine + materialized view, which the engine built as a library cannot run (no \
         background consumers; creating the table fails): kcat streams the topics into one HTTP \
         INSERT ... SELECT ... FROM input() FORMAT JSONEachRow with the Kafka-engine line's mapping \
         of the flat fields, so it does less work (no validation, changes, metadata or exactly-once). \
         Where the server knows it, all three lines insert with optimize_on_insert=0 (audit-ingest's \
         setting: copies within one insert are left to its duplicate check)."
    );
    println!(
        "{rounds} rounds, each running the three lines in turn on the same topics (a new consumer \
         group each time) after ClickHouse's merges have settled; rates are medians over the \
         rounds (range in brackets), counted from the first row visible to the last."
    );
    println!();
    println!("| line | events | seconds (median) | events/s (median) | range | vs audit-ingest |");
    println!("|---|---:|---:|---:|---:|---:|");
    let row = |name: &str, line: &Line| {
        println!(
            "| {name} | {EVENTS} | {:.1} | {:.0} | {:.0}-{:.0} | {:.2} |",
            line.seconds,
            line.median,
            line.low,
            line.high,
            line.median / ours.median
        );
    };
    row("audit-ingest (1M pre-filled, sustained)", &ours);
    match &engine {
        Some(e) => row("reference: kcat -> INSERT ... FROM input() FORMAT JSONEachRow", e),
        None => println!(
            "| reference: kcat -> INSERT ... FROM input() FORMAT JSONEachRow | {EVENTS} | did not finish in 600 s | - | - | - |"
        ),
    }
    row(
        "reference: INSERT FORMAT RowBinary from file (ceiling)",
        &ceiling,
    );
    if engine_unfinished > 0 && engine.is_some() {
        println!();
        println!("({engine_unfinished} kcat round(s) did not finish in 600 s and are left out.)");
    }
    println!();
    println!(
        "| freshness at {FRESHNESS_RATE} events/s ({} events) | p50 | p99 | max |",
        latencies.len()
    );
    println!("|---|---:|---:|---:|");
    println!("| produce -> visible in ClickHouse (s) | {p50:.3} | {p99:.3} | {max:.3} |");
    println!();
    let secure_line = Line::of(&secure);
    let first_row = |runs: &[Throughput]| {
        let mut seconds: Vec<f64> = runs.iter().map(|t| t.first_row_seconds).collect();
        seconds.sort_by(f64::total_cmp);
        percentile(&seconds, 0.5)
    };
    println!(
        "Cost of TLS: the same 1M events, in the same rounds, read over Kafka's SASL_SSL listener \
         (SCRAM-SHA-512, TLS 1.3 by OpenSSL 3 in librdkafka) and written over ClickHouse's HTTPS \
         port (rustls), both verified against the local CA."
    );
    println!();
    println!("| line | events/s (median) | range | vs plaintext | process start -> first row stored (s, median) |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| audit-ingest, plaintext Kafka + HTTP ClickHouse | {:.0} | {:.0}-{:.0} | 1.00 | {:.2} |",
        ours.median,
        ours.low,
        ours.high,
        first_row(&ours_runs)
    );
    println!(
        "| audit-ingest, SASL_SSL (SCRAM-SHA-512) + HTTPS ClickHouse | {:.0} | {:.0}-{:.0} | {:.2} | {:.2} |",
        secure_line.median,
        secure_line.low,
        secure_line.high,
        secure_line.median / ours.median,
        first_row(&secure)
    );
    println!();
    println!("| target | figure | verdict |");
    println!("|---|---|---|");
    println!(
        "| ingest >= 1.5x the kcat pipe (medians; it replaces the Kafka engine) | {:.2}x | {} |",
        ours.median / engine_rate,
        verdict(ours.median >= 1.5 * engine_rate)
    );
    println!(
        "| ingest >= 60% of raw insert ceiling (medians) | {:.0}% | {} |",
        100.0 * ours.median / ceiling.median,
        verdict(ours.median >= 0.6 * ceiling.median)
    );
    println!(
        "| freshness p99 < 1 s | {p99:.3} s | {} |",
        verdict(p99 < 1.0)
    );
    println!(
        "| ingest RSS < 200 MB (peak over every round and the freshness run) | {peak_rss:.0} MB | {} |",
        verdict(peak_rss < 200.0)
    );
    match &previous {
        Some(previous) => println!(
            "| ingest within 5% of the previous results (RESULTS.md before this run: {:.0} events/s, \
             {:.0}% of the ceiling) | {:.0} events/s ({:+.1}%), {:.0}% of the ceiling | {} |",
            previous.rate,
            100.0 * previous.rate / previous.ceiling,
            ours.median,
            100.0 * (ours.median / previous.rate - 1.0),
            100.0 * ours.median / ceiling.median,
            verdict(ours.median >= 0.95 * previous.rate)
        ),
        None => println!("| ingest within 5% of the previous results | no previous RESULTS.md | - |"),
    }
    FenceCost::print(&costs);

    // The bench topics and databases are large; keep the machine tidy.
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let mut topics_to_delete = topics.all();
    topics_to_delete.push(format!("{prefix}.dlq"));
    for fresh in ["users", "teams", "auth", "dlq"] {
        topics_to_delete.push(format!("bench.fresh.{suffix}.{fresh}"));
    }
    let names: Vec<&str> = topics_to_delete.iter().map(String::as_str).collect();
    let _ = admin.delete_topics(&names, &AdminOptions::new()).await;
    drop_database(format!("bench_fresh_{suffix}")).await;
}

/// The figures of the last `make bench BENCH=ingest` (`RESULTS.md`, read before this run
/// rewrites it): the ingest's median rate and the ceiling's.
struct PreviousResults {
    rate: f64,
    ceiling: f64,
}

impl PreviousResults {
    fn read() -> Option<Self> {
        let text =
            std::fs::read_to_string(common::repo_root().join("services/ingest/benches/RESULTS.md"))
                .ok()?;
        let median = |line: &str| -> Option<f64> {
            let row = text.lines().find(|l| l.starts_with(line))?;
            row.split('|').nth(4)?.trim().parse().ok()
        };
        Some(Self {
            rate: median("| audit-ingest (1M pre-filled, sustained) |")?,
            ceiling: median("| reference: INSERT FORMAT RowBinary from file (ceiling) |")?,
        })
    }
}

/// What exactly-once costs one ingest run, from its metrics: the fences' share of each flush
/// (recording intents; no fence reads or look-ups on a fresh database) and the duplicate checks.
struct FenceCost {
    flushes: f64,
    fence_seconds: f64,
    insert_seconds: f64,
    checks: f64,
    check_seconds: f64,
}

impl FenceCost {
    async fn scrape(port: u16) -> Self {
        let text = match reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let value = |name: &str| common::chaos::metric_value(&text, name).unwrap_or(f64::NAN);
        Self {
            flushes: value("audit_ingest_flush_phase_seconds_count{phase=\"fence\"}"),
            fence_seconds: value("audit_ingest_flush_phase_seconds_sum{phase=\"fence\"}"),
            insert_seconds: value("audit_ingest_flush_phase_seconds_sum{phase=\"insert\"}"),
            checks: value("audit_ingest_duplicate_check_seconds_count"),
            check_seconds: value("audit_ingest_duplicate_check_seconds_sum"),
        }
    }

    fn print(costs: &[Self]) {
        let median = |f: &dyn Fn(&Self) -> f64| {
            let mut values: Vec<f64> = costs.iter().map(f).filter(|v| v.is_finite()).collect();
            values.sort_by(f64::total_cmp);
            percentile(&values, 0.5)
        };
        println!();
        println!(
            "Cost of exactly-once per audit-ingest run (medians over the rounds, from its metrics): \
             one intents insert per flush before the events' insert; fence reads and look-ups only \
             after a takeover (none here: a fresh database); a duplicate check every 5 s over the \
             key ranges inserted since, deferred while more than 100,000 rows arrive per 5 s (up \
             to 60 s), so here it runs once the burst has been stored, outside the timed window."
        );
        println!();
        println!("| flushes | intents ms per flush | events insert ms per flush | intents / insert | duplicate checks | ms per check |");
        println!("|---:|---:|---:|---:|---:|---:|");
        println!(
            "| {:.0} | {:.1} | {:.1} | {:.1}% | {:.0} | {:.1} |",
            median(&|c| c.flushes),
            median(&|c| 1000.0 * c.fence_seconds / c.flushes),
            median(&|c| 1000.0 * c.insert_seconds / c.flushes),
            median(&|c| 100.0 * c.fence_seconds / c.insert_seconds),
            median(&|c| c.checks),
            median(&|c| 1000.0 * c.check_seconds / c.checks),
        );
    }
}

/// Writes dirty pages out and waits for ClickHouse's background merges (up to 60 s), so that
/// each line starts from the same quiet machine.
async fn settle(server: &clickhouse::Client) {
    let _ = Command::new("sync").status();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let merging: u64 = server
            .query("SELECT count() FROM system.merges")
            .fetch_one()
            .await
            .unwrap_or(0);
        if merging == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

async fn server_version(server: &clickhouse::Client) -> String {
    server
        .query("SELECT version()")
        .fetch_one::<String>()
        .await
        .unwrap_or_else(|_| "?".to_owned())
}
