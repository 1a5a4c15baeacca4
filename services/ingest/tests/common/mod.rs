//! Harness for the ingest integration tests: unique topics, group and database per test, the real
//! `audit-ingest` binary as a child process, and helpers to produce and to read back.
#![allow(dead_code)] // each test binary uses a different part

pub mod chaos;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use audit_store::clickhouse;
use audit_store::ClickHouseConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;

pub use audit_testkit::brokers;

/// Partitions of each test's stored-events topic.
pub const STORED_PARTITIONS: i32 = 6;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One test's private Kafka topics, consumer group and ClickHouse database.
#[derive(Clone)]
pub struct TestEnv {
    pub name: String,
    pub topics: Vec<String>,
    pub dead_letter_topic: String,
    /// The stored-events topic the ingest publishes to (6 partitions, as `make up` creates it).
    pub stored_topic: String,
    pub group: String,
    pub clickhouse: ClickHouseConfig,
    pub partitions: i32,
}

impl TestEnv {
    pub async fn new(name: &str, partitions: i32) -> Self {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let suffix = &suffix[..12];
        let topics: Vec<String> = ["users", "teams", "auth"]
            .iter()
            .map(|t| format!("test.{name}.{t}.{suffix}"))
            .collect();
        let dead_letter_topic = format!("test.{name}.dlq.{suffix}");
        let env = Self {
            name: name.to_owned(),
            topics,
            dead_letter_topic,
            stored_topic: format!("test.{name}.stored.{suffix}"),
            group: format!("test-{name}-{suffix}"),
            clickhouse: audit_testkit::clickhouse_config(format!(
                "audit_test_{}_{suffix}",
                name.replace('-', "_")
            )),
            partitions,
        };
        let mut all = env.topics.clone();
        all.push(env.dead_letter_topic.clone());
        create_topics(&all, partitions).await;
        create_topics(std::slice::from_ref(&env.stored_topic), STORED_PARTITIONS).await;
        env
    }

    /// Every message of the stored-events topic, per partition in offset order: (partition,
    /// key, row).
    pub fn stored_messages(&self) -> Vec<(i32, String, audit_store::AuditEventRow)> {
        use rdkafka::Message;
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("group.id", format!("{}-reader", self.group))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut out = Vec::new();
        for partition in 0..STORED_PARTITIONS {
            let (_, high) = consumer
                .fetch_watermarks(&self.stored_topic, partition, Duration::from_secs(10))
                .unwrap();
            let mut list = TopicPartitionList::new();
            list.add_partition_offset(&self.stored_topic, partition, Offset::Beginning)
                .unwrap();
            consumer.assign(&list).unwrap();
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut next = 0;
            while next < high {
                assert!(Instant::now() < deadline, "stored topic unreadable");
                let Some(message) = consumer.poll(Duration::from_millis(500)) else {
                    continue;
                };
                let message = message.unwrap();
                next = message.offset() + 1;
                let key = String::from_utf8(message.key().unwrap().to_vec()).unwrap();
                let row = audit_store::stored::decode(message.payload().unwrap()).unwrap();
                out.push((partition, key, row));
            }
        }
        out
    }

    /// Environment of an `audit-ingest` process bound to this test's resources.
    pub fn ingest_env(&self, http_port: u16) -> BTreeMap<String, String> {
        let mut env = self.base_env(http_port);
        if !self.clickhouse.cluster.is_empty() {
            env.extend([
                (
                    "AUDIT_INGEST__CLICKHOUSE__CLUSTER".into(),
                    self.clickhouse.cluster.clone(),
                ),
                (
                    "AUDIT_INGEST__CLICKHOUSE__CLUSTER_REPLICATED".into(),
                    self.clickhouse.cluster_replicated.to_string(),
                ),
                (
                    "AUDIT_INGEST__CLICKHOUSE__CLUSTER_NODES".into(),
                    self.clickhouse.cluster_nodes.join(","),
                ),
            ]);
        }
        env
    }

    /// Uses `server`, one ClickHouse of the test's own, instead of the shared one (and its
    /// layout: a private server is a server alone).
    pub fn use_server(&mut self, server: &PrivateClickHouse) {
        self.clickhouse.url = server.url();
        self.clickhouse.cluster = String::new();
        self.clickhouse.cluster_nodes = Vec::new();
    }

    fn base_env(&self, http_port: u16) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("AUDIT_INGEST__KAFKA__BROKERS".into(), brokers()),
            ("AUDIT_INGEST__KAFKA__GROUP_ID".into(), self.group.clone()),
            ("AUDIT_INGEST__KAFKA__TOPICS".into(), self.topics.join(",")),
            (
                "AUDIT_INGEST__DEAD_LETTER__TOPIC".into(),
                self.dead_letter_topic.clone(),
            ),
            (
                "AUDIT_INGEST__STORED_EVENTS__TOPIC".into(),
                self.stored_topic.clone(),
            ),
            (
                "AUDIT_INGEST__CLICKHOUSE__URL".into(),
                self.clickhouse.url.clone(),
            ),
            (
                "AUDIT_INGEST__CLICKHOUSE__DATABASE".into(),
                self.clickhouse.database.clone(),
            ),
            (
                "AUDIT_INGEST__HTTP_LISTEN".into(),
                format!("127.0.0.1:{http_port}"),
            ),
            ("AUDIT_INGEST__TELEMETRY__LOG_FORMAT".into(), "json".into()),
            (
                "AUDIT_INGEST__TELEMETRY__LOG_FILTER".into(),
                "info,audit_ingest=debug".into(),
            ),
            ("AUDIT_INGEST__RETRY__MAX_BACKOFF_MS".into(), "1000".into()),
        ])
    }

    pub fn client(&self) -> clickhouse::Client {
        self.clickhouse.client()
    }

    /// Events visible through the de-duplicating read (`FINAL`).
    pub async fn visible_count(&self) -> u64 {
        self.client()
            .query("SELECT count() FROM audit_events FINAL")
            .fetch_one()
            .await
            .unwrap_or(0)
    }

    /// Like [`Self::visible_count`], but None when the query fails (e.g. on the first request
    /// after ClickHouse was restarted) instead of 0.
    pub async fn try_visible_count(&self) -> Option<u64> {
        self.client()
            .query("SELECT count() FROM audit_events FINAL")
            .fetch_one()
            .await
            .ok()
    }

    /// Rows of the de-duplicating read (`FINAL`) and distinct event ids among them.
    pub async fn visible_and_distinct(&self) -> (u64, u64) {
        self.client()
            .query("SELECT count(), uniqExact(id) FROM audit_events FINAL")
            .fetch_one::<(u64, u64)>()
            .await
            .unwrap_or((0, 0))
    }

    /// Migrates the test's database and keeps every row ever inserted into `audit_events` in a
    /// plain MergeTree fed by a view: copies written by the ingest stay visible there after
    /// ClickHouse merged them away (small tables merge within seconds, which would hide them
    /// from a count of `audit_events`).
    /// `binary`: the `audit-ingest` build under test, when another than this workspace's: its
    /// own `migrate` creates the schema (an older build refuses a newer schema).
    pub async fn track_inserts(&self, binary: Option<&Path>) {
        match binary {
            Some(binary) => {
                let status = Command::new(binary)
                    .arg("migrate")
                    .envs(self.ingest_env(free_port()))
                    .status()
                    .unwrap();
                assert!(status.success(), "{} migrate failed", binary.display());
            }
            None => {
                audit_store::migrations::apply(&self.clickhouse)
                    .await
                    .unwrap();
            }
        }
        for sql in [
            "CREATE TABLE inserted_ids (id String) ENGINE = MergeTree ORDER BY id",
            "CREATE MATERIALIZED VIEW inserted_ids_mv TO inserted_ids AS SELECT id FROM audit_events",
        ] {
            self.client().query(sql).execute().await.unwrap();
        }
    }

    /// Rows ever inserted into `audit_events` since [`Self::track_inserts`], and distinct ids
    /// among them.
    pub async fn inserted_and_distinct(&self) -> (u64, u64) {
        self.client()
            .query("SELECT count(), uniqExact(id) FROM inserted_ids")
            .fetch_one()
            .await
            .unwrap()
    }

    /// Stored rows (no `FINAL`: copies not merged yet included) and distinct event ids, per
    /// organization.
    pub async fn stored_and_distinct(&self) -> BTreeMap<String, (u64, u64)> {
        self.client()
            .query("SELECT organization_id, count(), uniqExact(id) FROM audit_events GROUP BY organization_id")
            .fetch_all::<(String, u64, u64)>()
            .await
            .unwrap()
            .into_iter()
            .map(|(org, rows, ids)| (org, (rows, ids)))
            .collect()
    }

    pub async fn visible_ids(&self) -> Vec<String> {
        self.client()
            .query("SELECT id FROM audit_events FINAL ORDER BY id")
            .fetch_all()
            .await
            .unwrap()
    }

    /// Polls until `count` events are visible, or panics after `limit`.
    pub async fn wait_for_count(&self, count: u64, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let visible = self.visible_count().await;
            if visible >= count {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: {visible} of {count} events visible after {limit:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The group's committed offset per (topic, partition), as the broker has it.
    pub fn committed_offsets(&self) -> BTreeMap<(String, i32), i64> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("group.id", &self.group)
            .create()
            .unwrap();
        let mut wanted = TopicPartitionList::new();
        for topic in &self.topics {
            for partition in 0..self.partitions {
                wanted.add_partition(topic, partition);
            }
        }
        let committed = consumer
            .committed_offsets(wanted, Duration::from_secs(10))
            .unwrap();
        committed
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some(((e.topic().to_owned(), e.partition()), o)),
                _ => None,
            })
            .collect()
    }

    pub async fn drop_database(&self) {
        let _ = audit_testkit::drop_database(&self.clickhouse, &self.clickhouse.database).await;
    }
}

pub async fn create_topics(names: &[String], partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let new: Vec<NewTopic<'_>> = names
        .iter()
        .map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(1)))
        .collect();
    for result in admin
        .create_topics(
            &new,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .unwrap()
    {
        result.unwrap();
    }
}

pub fn producer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("enable.idempotence", "true")
        .set("message.max.bytes", "4194304")
        .set("linger.ms", "5")
        .create()
        .unwrap()
}

/// Produces each payload (keyed by its index) to the given topic and waits for the broker's ack.
pub async fn produce(producer: &FutureProducer, topic: &str, messages: &[(String, Vec<u8>)]) {
    let sends = messages.iter().map(|(key, payload)| {
        producer.send(
            FutureRecord::to(topic)
                .key(key.as_bytes())
                .payload(payload.as_slice()),
            Duration::from_secs(30),
        )
    });
    for result in futures_util::future::join_all(sends).await {
        result.map_err(|(err, _)| err).unwrap();
    }
}

/// Valid example files of the contract, as JSON values.
pub fn valid_examples() -> Vec<Value> {
    let dir = repo_root().join("schemas/events/examples/valid");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| serde_json::from_slice(&std::fs::read(f).unwrap()).unwrap())
        .collect()
}

/// `count` distinct valid events cycling through every example (every catalog type), with
/// unique ids and organizations spread over three tenants.
pub fn generate_events(prefix: &str, count: usize) -> Vec<Value> {
    let examples = valid_examples();
    (0..count)
        .map(|i| generated_event(&examples, prefix, i))
        .collect()
}

/// The `i`-th event of [`generate_events`].
pub fn generated_event(examples: &[Value], prefix: &str, i: usize) -> Value {
    let mut event = examples[i % examples.len()].clone();
    event["id"] = Value::String(format!("{prefix}-{i:06}"));
    event["organizationId"] = Value::String(format!("org_{}", i % 3));
    event
}

/// The topic an event belongs on, by the usual routing: user.* -> users, team*.* -> teams, else auth.
pub fn topic_for<'a>(env: &'a TestEnv, event: &Value) -> &'a str {
    let kind = event["type"].as_str().unwrap_or_default();
    if kind.starts_with("user.logged") || kind.starts_with("user.login") {
        &env.topics[2]
    } else if kind.starts_with("team") {
        &env.topics[1]
    } else if kind.starts_with("user.") {
        &env.topics[0]
    } else {
        &env.topics[2]
    }
}

/// Produces events to their topics, keyed by event id.
pub async fn publish(env: &TestEnv, producer: &FutureProducer, events: &[Value]) {
    let mut by_topic: BTreeMap<&str, Vec<(String, Vec<u8>)>> = BTreeMap::new();
    for event in events {
        by_topic.entry(topic_for(env, event)).or_default().push((
            event["id"].as_str().unwrap().to_owned(),
            serde_json::to_vec(event).unwrap(),
        ));
    }
    for (topic, messages) in by_topic {
        produce(producer, topic, &messages).await;
    }
}

/// A running `audit-ingest` child process; killed when dropped.
pub struct IngestProcess {
    pub child: Child,
    pub http_port: u16,
    pub log: PathBuf,
}

impl IngestProcess {
    pub fn spawn(env: &TestEnv, extra: &[(&str, &str)]) -> Self {
        let label = uuid::Uuid::new_v4().simple().to_string();
        Self::spawn_binary(
            env,
            Path::new(env!("CARGO_BIN_EXE_audit-ingest")),
            &label,
            extra,
        )
    }

    /// Starts `binary` (the build under test, or a release build for a benchmark); its log goes
    /// to a temporary file named after the test and `label`.
    pub fn spawn_binary(env: &TestEnv, binary: &Path, label: &str, extra: &[(&str, &str)]) -> Self {
        let http_port = free_port();
        let log = std::env::temp_dir().join(format!("audit-ingest-{}-{label}.log", env.group));
        let file = std::fs::File::create(&log).unwrap();
        let mut command = Command::new(binary);
        command
            .arg("run")
            .envs(env.ingest_env(http_port))
            .envs(extra.iter().map(|(k, v)| (*k, *v)))
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        let child = command.spawn().unwrap();
        Self {
            child,
            http_port,
            log,
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `/readyz` answers 200 (group joined, ClickHouse reachable).
    pub async fn wait_ready(&mut self, limit: Duration) {
        let url = format!("http://127.0.0.1:{}/readyz", self.http_port);
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("audit-ingest exited early with {status}:\n{}", self.logs());
            }
            if let Ok(response) = reqwest::get(&url).await {
                if response.status().is_success() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "audit-ingest not ready after {limit:?}:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn metrics(&self) -> String {
        let url = format!("http://127.0.0.1:{}/metrics", self.http_port);
        reqwest::get(&url).await.unwrap().text().await.unwrap()
    }

    /// Waits until the metric `name` (summed over its labels) reaches `at_least`, failing with
    /// `what` and the process's log after `limit`.
    pub async fn wait_for_metric(&self, name: &str, at_least: f64, limit: Duration, what: &str) {
        let deadline = Instant::now() + limit;
        while metric_sum(&self.metrics().await, name) < at_least {
            assert!(
                Instant::now() < deadline,
                "{what} within {limit:?}:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }

    /// Waits for the process to exit, up to `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for IngestProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sum of a Prometheus counter family over all its label sets.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.starts_with(name)
                && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A ClickHouse server of this test's own (same scripts as `make up`, other ports and state),
/// for tests that stop and start it.
pub struct PrivateClickHouse {
    pub state: PathBuf,
    pub http_port: u16,
    pub tcp_port: u16,
}

impl PrivateClickHouse {
    pub fn start() -> Self {
        let server = Self {
            state: std::env::temp_dir().join(format!("audit-ch-{}", uuid::Uuid::new_v4().simple())),
            http_port: free_port(),
            tcp_port: free_port(),
        };
        server.run("start");
        server
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    pub fn run(&self, action: &str) {
        Self::control(&self.state, self.http_port, self.tcp_port, action);
    }

    /// `clickhouse.sh start|stop` for the server of that state directory and ports (callable
    /// from a blocking task, which cannot borrow the server).
    pub fn control(state: &Path, http_port: u16, tcp_port: u16, action: &str) {
        let status = Command::new("bash")
            .arg(repo_root().join("deploy/local/clickhouse.sh"))
            .arg(action)
            .env("AUDIT_STATE_DIR", state)
            // Its directory under its own state, even inside `make test`'s second run, which
            // points the local stack's at the floor engine's.
            .env_remove("AUDIT_CLICKHOUSE_DIR")
            .env("AUDIT_CLICKHOUSE_HTTP_PORT", http_port.to_string())
            .env("AUDIT_CLICKHOUSE_TCP_PORT", tcp_port.to_string())
            // No HTTPS proxy: its port belongs to the local stack's server.
            .env("AUDIT_CLICKHOUSE_HTTPS_PORT", "0")
            .status()
            .unwrap();
        assert!(status.success(), "clickhouse.sh {action} failed");
    }
}

impl Drop for PrivateClickHouse {
    fn drop(&mut self) {
        self.run("stop");
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

/// The read API as a user meets it: the `audit-api` binary of this workspace (built here if
/// needed, with the profile of the test) serving the test's database, with an admin key per
/// organization created through its CLI.
pub struct ApiProcess {
    child: Child,
    port: u16,
    keys: BTreeMap<String, String>,
}

impl ApiProcess {
    pub fn binary() -> PathBuf {
        if let Some(path) = std::env::var_os("AUDIT_API_BINARY") {
            return path.into();
        }
        let ingest = PathBuf::from(env!("CARGO_BIN_EXE_audit-ingest"));
        let release = ingest.parent().is_some_and(|dir| dir.ends_with("release"));
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(cargo);
        build
            .args(["build", "-q", "-p", "audit-api", "--bin", "audit-api"])
            .current_dir(repo_root());
        if release {
            build.arg("--release");
        }
        assert!(build.status().unwrap().success(), "cannot build audit-api");
        ingest.with_file_name("audit-api")
    }

    pub async fn spawn(env: &TestEnv, organizations: &[&str]) -> Self {
        let binary = Self::binary();
        let clickhouse = [
            ("AUDIT_API__CLICKHOUSE__URL", env.clickhouse.url.clone()),
            (
                "AUDIT_API__CLICKHOUSE__DATABASE",
                env.clickhouse.database.clone(),
            ),
            ("AUDIT_API__READ_EVENTS__ENABLED", "false".to_owned()),
            ("AUDIT_API__TELEMETRY__LOG_FILTER", "warn".to_owned()),
            // Fixtures may date from 2025: held under the longest retention.
            ("AUDIT_API__RETENTION__DEFAULT_DAYS", "3650".to_owned()),
        ];
        let mut keys = BTreeMap::new();
        for org in organizations {
            let output = Command::new(&binary)
                .args(["keys", "create", "--org", org, "--role", "admin", "--quiet"])
                .envs(clickhouse.iter().map(|(k, v)| (*k, v)))
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
            let key = String::from_utf8(output.stdout).unwrap().trim().to_owned();
            keys.insert((*org).to_owned(), key);
        }
        let port = free_port();
        let child = Command::new(&binary)
            .arg("serve")
            .env("AUDIT_API__HTTP_LISTEN", format!("127.0.0.1:{port}"))
            .envs(clickhouse.iter().map(|(k, v)| (*k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let api = Self { child, port, keys };
        let ready = format!("http://127.0.0.1:{port}/readyz");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(reqwest::get(&ready).await, Ok(r) if r.status().is_success()) {
            assert!(Instant::now() < deadline, "audit-api did not become ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        api
    }

    /// `total` and `X-Total-Count-Exact` of the organization's unfiltered first page.
    pub async fn total(&self, organization: &str) -> (u64, bool) {
        let response = reqwest::Client::new()
            .get(format!(
                "http://127.0.0.1:{}/api/v1/organization/audit-logs?limit=1",
                self.port
            ))
            .header("X-API-Key", &self.keys[organization])
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{}", response.status());
        let exact = response
            .headers()
            .get("x-total-count-exact")
            .and_then(|v| v.to_str().ok())
            == Some("true");
        let body: Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        (body["total"].as_u64().unwrap(), exact)
    }
}

impl Drop for ApiProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
