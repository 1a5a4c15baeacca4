//! Harness of the log-stream tests: a stored-events topic of the test's own (fed as the ingest
//! feeds it), the stream worker as a child process (`audit-api streams run`, so that it can be
//! killed), and local receivers speaking each destination's intake protocol as the vendor
//! documents it (paths, auth headers, body forms, status codes and limits).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use audit_store::{stored, AuditEventRow};
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use base64::Engine;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::{ApiConfig, TestApi};

pub const PARTITIONS: i32 = 6;

/// The test's Kafka topics and group, and its stream key.
#[derive(Clone)]
pub struct StreamsEnv {
    pub topic: String,
    pub changes_topic: String,
    pub group: String,
    pub secret_key: String,
    producer: FutureProducer,
}

impl StreamsEnv {
    pub async fn new(name: &str) -> Self {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let env = Self {
            topic: format!("test.streams.{name}.{}", &suffix[..12]),
            changes_topic: format!("test.streams.{name}.changes.{}", &suffix[..12]),
            group: format!("test-streams-{name}-{}", &suffix[..12]),
            secret_key: base64::engine::general_purpose::STANDARD.encode(rand_bytes()),
            producer: ClientConfig::new()
                .set("bootstrap.servers", audit_testkit::brokers())
                .set("enable.idempotence", "true")
                .set("linger.ms", "5")
                .create()
                .unwrap(),
        };
        create_topic(&env.topic, PARTITIONS).await;
        create_topic(&env.changes_topic, 1).await;
        env
    }

    /// Streams settings of both the API and the worker.
    pub fn tune(&self, config: &mut ApiConfig) {
        config.streams.secret_key = Some(self.secret_key.clone().into());
        config.streams.topic = self.topic.clone();
        config.streams.group_id = self.group.clone();
        config.streams.allow_http = true;
        config.streams.allow_private_destinations = true;
        config.streams.request_timeout_ms = 2_000;
        config.read_events.enabled = true;
        config.read_events.brokers = audit_testkit::brokers();
        config.read_events.topic = self.changes_topic.clone();
    }

    pub async fn api(&self, name: &str) -> TestApi {
        let env = self.clone();
        TestApi::spawn_with(name, move |config| env.tune(config)).await
    }

    /// Publishes rows as the ingest does: keyed and partitioned by organization, stamped now.
    pub async fn publish(&self, rows: &[AuditEventRow]) {
        let producer = &self.producer;
        let now = chrono::Utc::now().timestamp_millis() as u64;
        let payloads: Vec<(String, i32, Vec<u8>)> = rows
            .iter()
            .map(|row| {
                let mut row = row.clone();
                row.ingested_at_ms = now;
                (
                    row.organization_id.clone(),
                    stored::partition_of(&row.organization_id, PARTITIONS),
                    stored::encode(&row),
                )
            })
            .collect();
        let sends = payloads.iter().map(|(key, partition, payload)| {
            producer.send(
                FutureRecord::to(&self.topic)
                    .key(key.as_str())
                    .partition(*partition)
                    .payload(payload.as_slice()),
                Duration::from_secs(30),
            )
        });
        for result in futures_util::future::join_all(sends).await {
            result.map_err(|(err, _)| err).unwrap();
        }
    }

    /// The audit events of stream changes the API published.
    pub fn changes(&self) -> Vec<Value> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::Message;
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", audit_testkit::brokers())
            .set("group.id", format!("{}-changes", self.group))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let (_, high) = consumer
            .fetch_watermarks(&self.changes_topic, 0, Duration::from_secs(10))
            .unwrap();
        let mut list = rdkafka::TopicPartitionList::new();
        list.add_partition_offset(&self.changes_topic, 0, rdkafka::Offset::Beginning)
            .unwrap();
        consumer.assign(&list).unwrap();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while (out.len() as i64) < high && Instant::now() < deadline {
            if let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) {
                out.push(serde_json::from_slice(message.payload().unwrap()).unwrap());
            }
        }
        out
    }
}

fn rand_bytes() -> [u8; 32] {
    let mut bytes = [0u8; 32];
    let id = uuid::Uuid::new_v4();
    bytes[..16].copy_from_slice(id.as_bytes());
    bytes[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    bytes
}

pub async fn create_topic(name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", audit_testkit::brokers())
        .create()
        .unwrap();
    for result in admin
        .create_topics(
            &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .unwrap()
    {
        result.unwrap();
    }
}

/// A running `audit-api streams run`.
pub struct WorkerProcess {
    child: Child,
    pub port: u16,
    log: PathBuf,
}

impl WorkerProcess {
    pub async fn spawn(env: &StreamsEnv, api: &TestApi, extra: &[(&str, &str)]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::env::temp_dir().join(format!("{}-worker-{port}.log", env.group));
        let mut vars: BTreeMap<String, String> = BTreeMap::from([
            ("AUDIT_API__HTTP_LISTEN".into(), format!("127.0.0.1:{port}")),
            (
                "AUDIT_API__CLICKHOUSE__URL".into(),
                api.clickhouse.url.clone(),
            ),
            (
                "AUDIT_API__CLICKHOUSE__DATABASE".into(),
                api.clickhouse.database.clone(),
            ),
            (
                "AUDIT_API__READ_EVENTS__BROKERS".into(),
                audit_testkit::brokers(),
            ),
            (
                "AUDIT_API__STREAMS__SECRET_KEY".into(),
                env.secret_key.clone(),
            ),
            ("AUDIT_API__STREAMS__TOPIC".into(), env.topic.clone()),
            ("AUDIT_API__STREAMS__GROUP_ID".into(), env.group.clone()),
            ("AUDIT_API__STREAMS__ALLOW_HTTP".into(), "true".into()),
            (
                "AUDIT_API__STREAMS__ALLOW_PRIVATE_DESTINATIONS".into(),
                "true".into(),
            ),
            (
                "AUDIT_API__STREAMS__REQUEST_TIMEOUT_MS".into(),
                "2000".into(),
            ),
            (
                "AUDIT_API__STREAMS__INITIAL_BACKOFF_MS".into(),
                "100".into(),
            ),
            ("AUDIT_API__STREAMS__MAX_BACKOFF_MS".into(), "1000".into()),
            ("AUDIT_API__STREAMS__FAILING_AFTER_MS".into(), "2000".into()),
            (
                "AUDIT_API__STREAMS__REFRESH_INTERVAL_MS".into(),
                "200".into(),
            ),
            (
                "AUDIT_API__STREAMS__STATE_FLUSH_INTERVAL_MS".into(),
                "200".into(),
            ),
            ("AUDIT_API__STREAMS__ACK_TIMEOUT_MS".into(), "5000".into()),
            // The fixtures date from 2025: held under the longest retention.
            ("AUDIT_API__RETENTION__DEFAULT_DAYS".into(), "3650".into()),
            (
                "AUDIT_API__RETENTION__REFRESH_INTERVAL_MS".into(),
                "200".into(),
            ),
            ("AUDIT_API__TELEMETRY__LOG_FORMAT".into(), "json".into()),
            ("AUDIT_API__TELEMETRY__LOG_FILTER".into(), "info".into()),
        ]);
        for (key, value) in extra {
            vars.insert((*key).into(), (*value).into());
        }
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_audit-api"))
            .args(["streams", "run"])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(&vars)
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("audit-api starts");
        let worker = Self { child, port, log };
        worker.wait_ready().await;
        worker
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(response) =
                reqwest::get(format!("http://127.0.0.1:{}/readyz", self.port)).await
            {
                if response.status().is_success() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "worker not ready:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let response = reqwest::get(format!("http://127.0.0.1:{}{path}", self.port))
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, signal);
    }

    pub async fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Which intake a receiver speaks.
#[derive(Debug, Clone)]
pub enum Intake {
    Webhook,
    /// Splunk HEC with its token; `acks`: indexer acknowledgement on (acks turn true 300 ms
    /// after the request).
    Hec {
        token: String,
        acks: bool,
    },
    Datadog {
        api_key: String,
    },
}

/// How a receiver answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    Accept,
    /// This status (and `Retry-After` seconds), body `{"error": "..."}`.
    Status(u16, Option<u64>),
    /// Never answers.
    Hang,
}

/// One request the receiver took (accepted or not).
#[derive(Debug, Clone)]
pub struct Captured {
    pub path: String,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
    pub accepted: bool,
    pub at: Instant,
}

struct ReceiverState {
    intake: Intake,
    mode: Mode,
    captured: Vec<Captured>,
    next_ack: u64,
    acks: BTreeMap<u64, Instant>,
}

pub struct Receiver {
    pub address: SocketAddr,
    state: Arc<Mutex<ReceiverState>>,
    stop: Option<CancellationToken>,
}

impl Receiver {
    pub async fn start(intake: Intake) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut receiver = Self {
            address,
            state: Arc::new(Mutex::new(ReceiverState {
                intake,
                mode: Mode::Accept,
                captured: Vec::new(),
                next_ack: 1,
                acks: BTreeMap::new(),
            })),
            stop: None,
        };
        receiver.serve(listener);
        receiver
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let router = Router::new()
            .route("/hook", post(webhook))
            .route("/services/collector/event", post(hec_event))
            .route("/services/collector/ack", post(hec_ack))
            .route("/api/v2/logs", post(datadog))
            .with_state(self.state.clone());
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async move { token.cancelled().await })
                .await;
        });
        self.stop = Some(stop);
    }

    /// The URL a stream's destination takes.
    pub fn url(&self) -> String {
        let base = format!("http://{}", self.address);
        match self.state.lock().unwrap().intake {
            Intake::Webhook => format!("{base}/hook"),
            _ => base,
        }
    }

    pub fn set_mode(&self, mode: Mode) {
        self.state.lock().unwrap().mode = mode;
    }

    /// Stops listening: connections are refused until [`Receiver::up`].
    pub fn down(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop.cancel();
        }
    }

    pub async fn up(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match tokio::net::TcpListener::bind(self.address).await {
                Ok(listener) => break listener,
                Err(err) => {
                    assert!(Instant::now() < deadline, "cannot listen again: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        self.serve(listener);
    }

    pub fn captured(&self) -> Vec<Captured> {
        self.state.lock().unwrap().captured.clone()
    }

    /// The events of the accepted requests, in the order they arrived.
    pub fn events(&self) -> Vec<Value> {
        let state = self.state.lock().unwrap();
        state
            .captured
            .iter()
            .filter(|c| c.accepted && !c.path.ends_with("/ack"))
            .flat_map(|c| events_of(&state.intake, &c.body))
            .collect()
    }

    /// Ids of [`Receiver::events`] (the JSON item's `id`).
    pub fn ids(&self) -> Vec<String> {
        self.events()
            .iter()
            .map(|e| e["id"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// Waits until the accepted events hold every id of `wanted`; returns the ids received.
    pub async fn wait_for(&self, wanted: &[String], limit: Duration) -> Vec<String> {
        let deadline = Instant::now() + limit;
        loop {
            let ids = self.ids();
            let got: std::collections::BTreeSet<&String> = ids.iter().collect();
            if wanted.iter().all(|w| got.contains(w)) {
                return ids;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {} events arrived",
                wanted.iter().filter(|w| got.contains(w)).count(),
                wanted.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.down();
    }
}

/// The events in a request body of `intake`.
pub fn events_of(intake: &Intake, body: &[u8]) -> Vec<Value> {
    match intake {
        Intake::Webhook => {
            let body: Value = serde_json::from_slice(body).unwrap();
            body["data"]["events"].as_array().unwrap().clone()
        }
        Intake::Hec { .. } => serde_json::Deserializer::from_slice(body)
            .into_iter::<Value>()
            .map(|object| object.unwrap()["event"].clone())
            .collect(),
        Intake::Datadog { .. } => {
            let entries: Vec<Value> = serde_json::from_slice(body).unwrap();
            entries
                .iter()
                .map(|e| serde_json::from_str(e["message"].as_str().unwrap()).unwrap())
                .collect()
        }
    }
}

fn header_map(headers: &HeaderMap) -> BTreeMap<String, String> {
    headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                v.to_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// Records the request; answers per the mode, or hands over to the intake's own checks.
async fn answer_by_mode(
    state: &Arc<Mutex<ReceiverState>>,
    path: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> Option<Response> {
    let mode = state.lock().unwrap().mode.clone();
    let record = |accepted| Captured {
        path: path.to_owned(),
        headers: header_map(headers),
        body: body.to_vec(),
        accepted,
        at: Instant::now(),
    };
    match mode {
        Mode::Accept => None,
        Mode::Status(code, retry_after) => {
            state.lock().unwrap().captured.push(record(false));
            let mut response = (
                StatusCode::from_u16(code).unwrap(),
                axum::Json(json!({"error": format!("receiver answers {code}")})),
            )
                .into_response();
            if let Some(seconds) = retry_after {
                response
                    .headers_mut()
                    .insert("retry-after", seconds.to_string().parse().unwrap());
            }
            Some(response)
        }
        Mode::Hang => {
            state.lock().unwrap().captured.push(record(false));
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Some(StatusCode::GATEWAY_TIMEOUT.into_response())
        }
    }
}

fn accept(
    state: &Arc<Mutex<ReceiverState>>,
    path: &str,
    headers: &HeaderMap,
    body: &Bytes,
    accepted: bool,
) {
    state.lock().unwrap().captured.push(Captured {
        path: path.to_owned(),
        headers: header_map(headers),
        body: body.to_vec(),
        accepted,
        at: Instant::now(),
    });
}

async fn webhook(
    State(state): State<Arc<Mutex<ReceiverState>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(response) = answer_by_mode(&state, "/hook", &headers, &body).await {
        return response;
    }
    let signed = ["webhook-id", "webhook-timestamp", "webhook-signature"]
        .iter()
        .all(|h| headers.contains_key(*h));
    let json = headers
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    let ok = signed && json && serde_json::from_slice::<Value>(&body).is_ok();
    accept(&state, "/hook", &headers, &body, ok);
    if ok {
        StatusCode::NO_CONTENT.into_response()
    } else {
        (StatusCode::BAD_REQUEST, "unsigned or not JSON").into_response()
    }
}

/// HEC's answers (docs.splunk.com, "HTTP Event Collector REST API" and its status codes).
fn hec_error(status: StatusCode, code: u32, text: &str) -> Response {
    (status, axum::Json(json!({"text": text, "code": code}))).into_response()
}

async fn hec_event(
    State(state): State<Arc<Mutex<ReceiverState>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = "/services/collector/event";
    if let Some(response) = answer_by_mode(&state, path, &headers, &body).await {
        return response;
    }
    let Intake::Hec { token, acks } = state.lock().unwrap().intake.clone() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let refuse = |response: Response| {
        accept(&state, path, &headers, &body, false);
        response
    };
    let Some(auth) = headers.get("authorization").and_then(|v| v.to_str().ok()) else {
        return refuse(hec_error(StatusCode::UNAUTHORIZED, 2, "Token is required"));
    };
    if auth != format!("Splunk {token}") {
        return refuse(hec_error(StatusCode::FORBIDDEN, 4, "Invalid token"));
    }
    if body.len() > 1_000_000 {
        return refuse(hec_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            6,
            "Content too large",
        ));
    }
    let objects: Result<Vec<Value>, _> = serde_json::Deserializer::from_slice(&body)
        .into_iter::<Value>()
        .collect();
    let valid = objects.as_ref().is_ok_and(|objects| {
        !objects.is_empty()
            && objects
                .iter()
                .all(|o| o.get("event").is_some() && o["time"].is_number())
    });
    if !valid {
        return refuse(hec_error(StatusCode::BAD_REQUEST, 6, "Invalid data format"));
    }
    if acks {
        if !headers.contains_key("x-splunk-request-channel") {
            return refuse(hec_error(
                StatusCode::BAD_REQUEST,
                10,
                "Data channel is missing",
            ));
        }
        accept(&state, path, &headers, &body, true);
        let mut s = state.lock().unwrap();
        let id = s.next_ack;
        s.next_ack += 1;
        s.acks
            .insert(id, Instant::now() + Duration::from_millis(300));
        return axum::Json(json!({"text": "Success", "code": 0, "ackId": id})).into_response();
    }
    accept(&state, path, &headers, &body, true);
    axum::Json(json!({"text": "Success", "code": 0})).into_response()
}

async fn hec_ack(
    State(state): State<Arc<Mutex<ReceiverState>>>,
    Query(query): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !query.contains_key("channel") && !headers.contains_key("x-splunk-request-channel") {
        return hec_error(StatusCode::BAD_REQUEST, 10, "Data channel is missing");
    }
    let asked: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let s = state.lock().unwrap();
    let mut acks = serde_json::Map::new();
    for id in asked["acks"].as_array().cloned().unwrap_or_default() {
        let id = id.as_u64().unwrap_or(0);
        let done = s.acks.get(&id).is_some_and(|at| Instant::now() >= *at);
        acks.insert(id.to_string(), json!(done));
    }
    axum::Json(json!({ "acks": acks })).into_response()
}

/// Datadog Logs intake v2 (docs.datadoghq.com/api/latest/logs): 202 on success; 400, 403, 413.
async fn datadog(
    State(state): State<Arc<Mutex<ReceiverState>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = "/api/v2/logs";
    if let Some(response) = answer_by_mode(&state, path, &headers, &body).await {
        return response;
    }
    let Intake::Datadog { api_key } = state.lock().unwrap().intake.clone() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let refuse = |status: StatusCode, message: &str| {
        accept(&state, path, &headers, &body, false);
        (status, axum::Json(json!({"errors": [message]}))).into_response()
    };
    if headers.get("dd-api-key").and_then(|v| v.to_str().ok()) != Some(api_key.as_str()) {
        return refuse(StatusCode::FORBIDDEN, "Forbidden");
    }
    if body.len() > 5 * 1024 * 1024 {
        return refuse(StatusCode::PAYLOAD_TOO_LARGE, "Payload too large");
    }
    let Ok(entries) = serde_json::from_slice::<Vec<Value>>(&body) else {
        return refuse(StatusCode::BAD_REQUEST, "Bad Request");
    };
    if entries.is_empty() || entries.len() > 1000 {
        return refuse(StatusCode::BAD_REQUEST, "at most 1000 entries");
    }
    if entries
        .iter()
        .any(|e| e.to_string().len() > 1024 * 1024 || !e["message"].is_string())
    {
        return refuse(StatusCode::PAYLOAD_TOO_LARGE, "log entry too large");
    }
    accept(&state, path, &headers, &body, true);
    (StatusCode::ACCEPTED, axum::Json(json!({}))).into_response()
}
