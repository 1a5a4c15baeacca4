//! `make bench BENCH=streams`: log-stream delivery by the release `audit-api streams run`, fed
//! through a stored-events topic of its own on the local Kafka as the ingest feeds it, to local
//! webhook receivers, in one process invocation:
//!
//! 1. throughput: 400,000 events waiting for one webhook stream, delivered as fast as it goes;
//! 2. publish-to-delivered latency at 5,000 events/s for 30 s (each event's time is its publish
//!    time; the receiver takes its arrival time);
//! 3. the worker's peak RSS while one destination is down for `BENCH_STREAMS_DOWN_SECONDS`
//!    (600 by default) at 5,000 events/s, then how fast it catches up once the destination is back.
//!
//! Targets (issue 18): at least 50,000 events/s per replica, p99 under 2 s, RSS under 150 MB.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use audit_api::config::StreamsConfig;
use audit_api::log_streams::manage::{Actor, CreateStream, StreamAdmin};
use audit_store::{stored, AuditEventRow, ClickHouseConfig};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use base64::Engine;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Deserialize;

const PARTITIONS: i32 = 6;
const THROUGHPUT_EVENTS: u64 = 400_000;
const RATE: u64 = 5_000;
const LATENCY_SECONDS: u64 = 30;

/// What the receivers take from a webhook body: each event's id and time.
#[derive(Deserialize)]
struct Body {
    data: Data,
}

#[derive(Deserialize)]
struct Data {
    events: Vec<Item>,
}

#[derive(Deserialize)]
struct Item {
    timestamp: String,
}

#[derive(Default)]
struct Counts {
    events: AtomicU64,
    /// Record each event's delay (arrival minus its time).
    record: AtomicBool,
    delays_ms: Mutex<Vec<f64>>,
}

/// A webhook receiver answering 204 and counting events; `stop` takes it down.
struct Receiver {
    address: SocketAddr,
    counts: Arc<Counts>,
    stop: Option<tokio_util::sync::CancellationToken>,
}

async fn take(State(counts): State<Arc<Counts>>, body: Bytes) -> StatusCode {
    let Ok(body) = serde_json::from_slice::<Body>(&body) else {
        return StatusCode::BAD_REQUEST;
    };
    let now = chrono::Utc::now().timestamp_millis();
    if counts.record.load(Ordering::Relaxed) {
        let mut delays = counts.delays_ms.lock().unwrap();
        for item in &body.data.events {
            if let Ok(at) = chrono::DateTime::parse_from_rfc3339(&item.timestamp) {
                delays.push((now - at.timestamp_millis()) as f64);
            }
        }
    }
    counts
        .events
        .fetch_add(body.data.events.len() as u64, Ordering::Relaxed);
    StatusCode::NO_CONTENT
}

impl Receiver {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut receiver = Self {
            address: listener.local_addr().unwrap(),
            counts: Arc::default(),
            stop: None,
        };
        receiver.serve(listener);
        receiver
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let stop = tokio_util::sync::CancellationToken::new();
        let token = stop.clone();
        let router = Router::new()
            .route("/", post(take))
            .with_state(self.counts.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async move { token.cancelled().await })
                .await;
        });
        self.stop = Some(stop);
    }

    fn down(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop.cancel();
        }
    }

    async fn up(&mut self) {
        let listener = loop {
            match tokio::net::TcpListener::bind(self.address).await {
                Ok(listener) => break listener,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        self.serve(listener);
    }

    fn count(&self) -> u64 {
        self.counts.events.load(Ordering::Relaxed)
    }

    async fn wait_for(&self, count: u64, limit: Duration) -> Instant {
        let deadline = Instant::now() + limit;
        while self.count() < count {
            assert!(
                Instant::now() < deadline,
                "{} of {count} events delivered",
                self.count()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Instant::now()
    }
}

fn row(org: &str, n: u64, at_ms: i64) -> AuditEventRow {
    AuditEventRow {
        organization_id: org.to_owned(),
        occurred_at_ms: at_ms,
        id: format!("evt_{org}_{n:09}"),
        event_type: [
            "user.created",
            "team_member.added",
            "user.logged_in",
            "role.assigned",
        ][(n % 4) as usize]
            .to_owned(),
        actor_id: format!("usr_{}", n % 1000),
        actor_type: "user".to_owned(),
        actor_email: Some(format!("user{}@acme.example", n % 1000)),
        actor_name: Some("Ada Admin".to_owned()),
        resource_type: "team".to_owned(),
        resource_id: format!("team_{}", n % 50),
        resource_name: Some("Platform".to_owned()),
        affected_user_id: Some(format!("usr_{}", n % 977)),
        affected_user_email: Some(format!("member{}@acme.example", n % 977)),
        changes: r#"[{"field":"role","oldValue":"member","newValue":"admin"}]"#.to_owned(),
        context_ip: Some("203.0.113.7".to_owned()),
        context_user_agent: Some("Mozilla/5.0 (X11; Linux x86_64)".to_owned()),
        context_request_id: Some(format!("req_{n}")),
        context_location: None,
        metadata: Some(r#"{"source":"bench"}"#.to_owned()),
        source_topic: "identity.users.v1".to_owned(),
        source_partition: 0,
        source_offset: n as i64,
        ingested_at_ms: at_ms as u64,
    }
}

struct Publisher {
    producer: FutureProducer,
    topic: String,
}

impl Publisher {
    /// Publishes rows as the ingest does (keyed and partitioned by organization).
    async fn send(&self, rows: &[AuditEventRow]) {
        let payloads: Vec<(i32, Vec<u8>)> = rows
            .iter()
            .map(|r| {
                (
                    stored::partition_of(&r.organization_id, PARTITIONS),
                    stored::encode(r),
                )
            })
            .collect();
        let sends = rows.iter().zip(&payloads).map(|(r, (partition, payload))| {
            self.producer.send(
                FutureRecord::to(&self.topic)
                    .key(r.organization_id.as_str())
                    .partition(*partition)
                    .payload(payload.as_slice()),
                Duration::from_secs(60),
            )
        });
        for result in futures_util::future::join_all(sends).await {
            result.map_err(|(err, _)| err).unwrap();
        }
    }

    /// `rate` events a second of `org` for `seconds`, each stamped with its publish time.
    async fn steady(&self, org: &str, rate: u64, seconds: u64, first: u64) -> u64 {
        let ticks = seconds * 10;
        let per_tick = rate / 10;
        let started = Instant::now();
        for tick in 0..ticks {
            let now = chrono::Utc::now().timestamp_millis();
            let rows: Vec<AuditEventRow> = (0..per_tick)
                .map(|i| row(org, first + tick * per_tick + i, now))
                .collect();
            self.send(&rows).await;
            let next = started + Duration::from_millis((tick + 1) * 100);
            tokio::time::sleep_until(next.into()).await;
        }
        ticks * per_tick
    }
}

/// Distinct organizations, each in a partition of its own.
fn organizations(count: usize) -> Vec<String> {
    let mut seen = std::collections::BTreeSet::new();
    (0..)
        .map(|n| format!("org_bench_{n}"))
        .filter(|org| seen.insert(stored::partition_of(org, PARTITIONS)))
        .take(count)
        .collect()
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    audit_testkit::percentile(values, p)
}

#[tokio::main]
async fn main() {
    let down_seconds: u64 = std::env::var("BENCH_STREAMS_DOWN_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..10];
    let topic = format!("bench.streams.{suffix}");
    let brokers = audit_testkit::brokers();
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    admin
        .create_topics(
            &[NewTopic::new(
                &topic,
                PARTITIONS,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
    let clickhouse = ClickHouseConfig {
        url: audit_testkit::clickhouse_url(),
        database: format!("audit_bench_streams_{suffix}"),
        ..ClickHouseConfig::default()
    };
    audit_store::migrations::apply(&clickhouse).await.unwrap();
    let secret_key = base64::engine::general_purpose::STANDARD.encode(
        [
            uuid::Uuid::new_v4().into_bytes(),
            uuid::Uuid::new_v4().into_bytes(),
        ]
        .concat(),
    );
    let streams = StreamsConfig {
        secret_key: Some(secret_key.clone().into()),
        topic: topic.clone(),
        allow_http: true,
        allow_private_destinations: true,
        ..StreamsConfig::default()
    };
    let read_events = audit_api::config::ReadEventsConfig {
        enabled: false,
        ..Default::default()
    };
    let events = audit_api::read_events::ReadEventPublisher::new(
        &read_events,
        audit_api::metrics::ApiMetrics::new(),
    )
    .unwrap();
    let admin_api = StreamAdmin::new(clickhouse.client(), &streams, events).unwrap();
    let actor = Actor {
        id: "bench".into(),
        actor_type: "system",
        name: None,
        request_id: None,
        ip: None,
        user_agent: None,
    };
    let orgs = organizations(3);
    let (tp_org, latency_org, down_org) = (&orgs[0], &orgs[1], &orgs[2]);
    let mut receivers = Vec::new();
    for org in &orgs {
        let receiver = Receiver::start().await;
        let body: CreateStream = serde_json::from_value(serde_json::json!({
            "name": "bench",
            "destination": {"type": "webhook", "url": format!("http://{}/", receiver.address)},
        }))
        .unwrap();
        admin_api.create(org, &actor, body).await.unwrap();
        receivers.push(receiver);
    }
    let publisher = Publisher {
        producer: ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set("compression.type", "lz4")
            .set("queue.buffering.max.messages", "1000000")
            .create()
            .unwrap(),
        topic: topic.clone(),
    };

    // 1. Throughput: the backlog is there before the worker starts.
    let now = chrono::Utc::now().timestamp_millis();
    let published = Instant::now();
    for chunk in 0..(THROUGHPUT_EVENTS / 10_000) {
        let rows: Vec<AuditEventRow> = (0..10_000)
            .map(|i| row(tp_org, chunk * 10_000 + i, now))
            .collect();
        publisher.send(&rows).await;
    }
    let publish_rate = THROUGHPUT_EVENTS as f64 / published.elapsed().as_secs_f64();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = std::env::temp_dir().join(format!("bench-streams-{suffix}.log"));
    let mut worker: Child = Command::new(audit_testkit::release_binary("audit-api"))
        .args(["streams", "run"])
        .env("AUDIT_API__HTTP_LISTEN", format!("127.0.0.1:{port}"))
        .env("AUDIT_API__CLICKHOUSE__URL", &clickhouse.url)
        .env("AUDIT_API__CLICKHOUSE__DATABASE", &clickhouse.database)
        .env("AUDIT_API__READ_EVENTS__BROKERS", &brokers)
        .env("AUDIT_API__STREAMS__SECRET_KEY", &secret_key)
        .env("AUDIT_API__STREAMS__TOPIC", &topic)
        .env(
            "AUDIT_API__STREAMS__GROUP_ID",
            format!("bench-streams-{suffix}"),
        )
        .env("AUDIT_API__STREAMS__ALLOW_HTTP", "true")
        .env("AUDIT_API__STREAMS__ALLOW_PRIVATE_DESTINATIONS", "true")
        .env("AUDIT_API__TELEMETRY__LOG_FILTER", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .spawn()
        .unwrap();
    let pid = worker.id();
    let started = Instant::now();
    let cpu_before = audit_testkit::proc_cpu_seconds(pid).unwrap_or(0.0);
    let done = receivers[0]
        .wait_for(THROUGHPUT_EVENTS, Duration::from_secs(600))
        .await;
    let seconds = (done - started).as_secs_f64();
    let throughput = THROUGHPUT_EVENTS as f64 / seconds;
    let throughput_cpu = audit_testkit::proc_cpu_seconds(pid).unwrap_or(0.0) - cpu_before;
    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let metric = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let requests = metric("audit_stream_request_seconds_count{kind=\"webhook\"}");
    let request_ms =
        metric("audit_stream_request_seconds_sum{kind=\"webhook\"}") / requests * 1000.0;

    // 2. Latency at 5,000 events/s.
    receivers[1].counts.record.store(true, Ordering::Relaxed);
    let sent = publisher
        .steady(latency_org, RATE, LATENCY_SECONDS, 0)
        .await;
    receivers[1].wait_for(sent, Duration::from_secs(120)).await;
    let mut delays = receivers[1].counts.delays_ms.lock().unwrap().clone();
    let p50 = percentile(&mut delays, 0.50);
    let p99 = percentile(&mut delays, 0.99);
    let max = delays.last().copied().unwrap_or(f64::NAN);

    // 3. A destination down for `down_seconds` at 5,000 events/s: the worker's memory.
    receivers[2].down();
    let rss_peak = Arc::new(AtomicU64::new(0));
    let sampling = {
        let rss_peak = rss_peak.clone();
        tokio::spawn(async move {
            while let Some(kb) = audit_testkit::proc_status_kb(pid, "VmRSS") {
                rss_peak.fetch_max(kb, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    let backlog = publisher.steady(down_org, RATE, down_seconds, 0).await;
    let rss_down_mb = rss_peak.load(Ordering::Relaxed) as f64 / 1024.0;
    receivers[2].up().await;
    let back = Instant::now();
    receivers[2]
        .wait_for(backlog, Duration::from_secs(1800))
        .await;
    let catch_up = backlog as f64 / back.elapsed().as_secs_f64();
    let rss_peak_mb = rss_peak.load(Ordering::Relaxed) as f64 / 1024.0;
    sampling.abort();
    let _ = worker.kill();
    let _ = worker.wait();

    let verdict = |ok: bool| if ok { "met" } else { "NOT MET" };
    println!("## Log stream delivery (`make bench BENCH=streams`)");
    println!();
    println!(
        "One release `audit-api streams run` on this machine ({} cores), the local Kafka and ClickHouse, webhook receivers in the bench process. {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    );
    println!();
    println!("| line | figure | target | verdict |");
    println!("|---|---:|---|---|");
    println!(
        "| delivery throughput, one webhook stream, {THROUGHPUT_EVENTS} waiting events (events/s) | {throughput:.0} | at least 50,000 | {} |",
        verdict(throughput >= 50_000.0)
    );
    println!(
        "| worker CPU during it (core-seconds per 100,000 events) | {:.2} | - | - |",
        throughput_cpu / THROUGHPUT_EVENTS as f64 * 100_000.0
    );
    println!(
        "| during it: requests, and their mean duration (ms) | {requests:.0} requests, {request_ms:.1} ms | - | - |"
    );
    println!(
        "| publish-to-delivered p50 at {RATE} events/s for {LATENCY_SECONDS} s (ms) | {p50:.0} | - | - |"
    );
    println!(
        "| publish-to-delivered p99 at {RATE} events/s (ms) | {p99:.0} | under 2,000 | {} |",
        verdict(p99 < 2_000.0)
    );
    println!("| publish-to-delivered max (ms) | {max:.0} | - | - |");
    println!(
        "| worker peak RSS, one destination down {down_seconds} s at {RATE} events/s (MB) | {rss_down_mb:.0} | under 150 | {} |",
        verdict(rss_down_mb < 150.0)
    );
    println!(
        "| catch-up of that backlog ({backlog} events) once the destination is back (events/s) | {catch_up:.0} | - | - |"
    );
    println!("| worker peak RSS over the whole run (MB) | {rss_peak_mb:.0} | - | - |");
    println!(
        "| reference: the bench's own publish rate to the topic (events/s) | {publish_rate:.0} | - | - |"
    );
    println!();
    println!(
        "Reproduce: `make bench BENCH=streams` (`BENCH_STREAMS_DOWN_SECONDS=60` for a shorter outage)."
    );
    let _ = admin.delete_topics(&[&topic], &AdminOptions::new()).await;
    let _ = audit_testkit::drop_database(&clickhouse, &clickhouse.database).await;
}
