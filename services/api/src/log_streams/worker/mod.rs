//! The stream worker, `audit-api streams run`: delivers the streams of the organizations whose
//! partitions of the stored-events topic the consumer group gives this replica. A manager loop
//! re-reads the streams' settings every `refresh_interval_ms`, starts and stops one task per
//! owned stream ([`task`]), writes positions and health every `state_flush_interval_ms`, and
//! answers the group's rebalances ([`ownership`]). `/healthz` fails when the loop or a stream's
//! task stops making rounds; `/readyz` when the settings cannot be read.

pub mod health;
pub mod ownership;
pub mod task;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use audit_store::{clickhouse, migrations, stored};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use rdkafka::consumer::Consumer;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use self::health::{HealthBoard, StreamMetrics};
use self::ownership::{Membership, Ownership};
use self::task::{StreamConfig, StreamTask, TaskShared};
use super::deliver::Sender;
use super::manage::parse_settings;
use super::secret_box::SecretBox;
use super::spec::Secrets;
use super::table::{self, StateRow, StreamRow};
use crate::config::ApiConfig;
use crate::retention::{ErasedSubjects, RetentionSnapshot};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("clickhouse schema: {0}")]
    Schema(#[from] audit_store::StoreError),
    #[error("streams.secret_key is not set: the worker cannot open the streams' secrets")]
    NoSecretKey,
    #[error(transparent)]
    SecretKey(#[from] super::secret_box::SecretBoxError),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    KafkaSettings(#[from] audit_runtime::kafka::ProbeError),
    #[error("the stored-events topic {0:?} does not exist (the ingest publishes it; see README \"Log streams\")")]
    MissingTopic(String),
    #[error("cannot read the organizations' retention and erasures: {0}")]
    Retention(String),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// `last_error_status` of an error of the worker's own (not the destination's answer): the
/// stream's secrets could not be opened. A worker that can open them delivers again.
const WORKER_FAILURE: i32 = -1;

pub struct Worker {
    config: ApiConfig,
    client: clickhouse::Client,
    secret_box: SecretBox,
    shared: TaskShared,
    group_config: rdkafka::ClientConfig,
    partitions: i32,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
    ops: OpsState,
}

#[derive(Clone)]
struct OpsState {
    metrics: StreamMetrics,
    heartbeats: Arc<Mutex<HashMap<String, Instant>>>,
    last_round: Arc<Mutex<Instant>>,
    last_refresh: Arc<Mutex<Option<Instant>>>,
    shutdown: CancellationToken,
    client: clickhouse::Client,
    stale_after: Duration,
    refresh_interval: Duration,
}

impl Worker {
    pub async fn build(config: ApiConfig) -> Result<Self, WorkerError> {
        migrations::prepare(&config.clickhouse, config.migrate_on_start).await?;
        let key = config
            .streams
            .secret_key
            .as_ref()
            .ok_or(WorkerError::NoSecretKey)?;
        let secret_box = SecretBox::from_key(key)?;
        let settings = config.read_events.clone();
        tokio::task::spawn_blocking(move || {
            audit_runtime::kafka::probe(&settings.connection(), Duration::from_secs(10))
        })
        .await
        .unwrap_or(Ok(()))?;
        let streams = &config.streams;
        let connection = config.read_events.connection();
        let reader_group = format!("{}-readers", streams.group_id);
        let reader_config = audit_runtime::kafka::client_config(
            &connection,
            &[
                // Read-ahead per stream: bounded (a stream waiting for its destination holds at
                // most this), and refilled at once when drained (librdkafka's default back-off
                // of 1 s after the queue was full capped a stream at about 6,000 events/s).
                ("queued.max.messages.kbytes", "4096"),
                ("queued.min.messages", "10000"),
                ("fetch.queue.backoff.ms", "10"),
                ("fetch.wait.max.ms", "100"),
                ("fetch.max.bytes", "8388608"),
            ],
            &[
                ("group.id", reader_group.as_str()),
                ("enable.auto.commit", "false"),
                ("enable.auto.offset.store", "false"),
                ("auto.offset.reset", "earliest"),
            ],
        );
        let group_config = audit_runtime::kafka::client_config(
            &connection,
            &[("session.timeout.ms", "10000")],
            &[
                ("group.id", streams.group_id.as_str()),
                ("enable.auto.commit", "false"),
                ("partition.assignment.strategy", "cooperative-sticky"),
            ],
        );
        let partitions = {
            let probe: rdkafka::consumer::BaseConsumer = reader_config.create()?;
            let topic = streams.topic.clone();
            tokio::task::spawn_blocking(move || {
                probe
                    .fetch_metadata(Some(&topic), Duration::from_secs(30))
                    .map(|m| {
                        m.topics()
                            .iter()
                            .find(|t| t.name() == topic && t.error().is_none())
                            .map_or(0, |t| t.partitions().len() as i32)
                    })
            })
            .await
            .expect("metadata task")?
        };
        if partitions == 0 {
            return Err(WorkerError::MissingTopic(streams.topic.clone()));
        }
        let address = config.http_listen;
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|source| WorkerError::Listen { address, source })?;
        let metrics = StreamMetrics::new();
        let heartbeats = Arc::new(Mutex::new(HashMap::new()));
        let client = config.clickhouse.client();
        let shutdown = CancellationToken::new();
        let shared = TaskShared {
            reader_config,
            topic: streams.topic.clone(),
            streams: streams.clone(),
            sender: Sender::new(
                streams.request_timeout(),
                streams.allow_private_destinations,
            )
            .with_ack_timeout(Duration::from_millis(streams.ack_timeout_ms)),
            board: HealthBoard::default(),
            metrics: metrics.clone(),
            retention: RetentionSnapshot::new(config.retention.default_days),
            erased: ErasedSubjects::new(config.retention.pseudonym_key.as_ref()),
            heartbeats: heartbeats.clone(),
        };
        // Nothing is delivered before the worker knows what each organization still holds.
        tokio::try_join!(
            shared.retention.refresh(&client),
            shared.erased.refresh(&client)
        )
        .map_err(|err| WorkerError::Retention(err.to_string()))?;
        let ops = OpsState {
            metrics,
            heartbeats,
            last_round: Arc::new(Mutex::new(Instant::now())),
            last_refresh: Arc::new(Mutex::new(None)),
            shutdown: shutdown.clone(),
            client: client.clone(),
            // A task's round can take a request, a HEC ack wait and a back-off.
            stale_after: streams.request_timeout()
                + Duration::from_millis(streams.ack_timeout_ms + streams.max_backoff_ms)
                + Duration::from_secs(30),
            refresh_interval: Duration::from_millis(streams.refresh_interval_ms),
        };
        Ok(Self {
            config,
            client,
            secret_box,
            shared,
            group_config,
            partitions,
            listener,
            shutdown,
            ops,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    pub async fn run(self) -> Result<(), WorkerError> {
        let router = Router::new()
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .with_state(self.ops.clone());
        let shutdown = self.shutdown.clone();
        let listener = self.listener;
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await;
        });
        let streams = &self.config.streams;
        let revoke_wait = streams.request_timeout() + Duration::from_secs(10);
        let (membership, events) =
            Membership::join(self.group_config.clone(), &streams.topic, revoke_wait)?;
        info!(topic = %streams.topic, partitions = self.partitions, group = %streams.group_id, "stream worker started");
        let mut manager = Manager {
            client: self.client.clone(),
            secret_box: self.secret_box.clone(),
            shared: self.shared.clone(),
            partitions: self.partitions,
            owned: BTreeSet::new(),
            configs: HashMap::new(),
            running: HashMap::new(),
            unreadable: HashMap::new(),
            ops: self.ops.clone(),
        };
        let events = manager.run(events, self.shutdown.clone()).await;
        // Leave the group; the revocation it causes finds every stream stopped already.
        let leaving = tokio::task::spawn_blocking(move || membership.leave());
        drain(events, leaving).await;
        let _ = server.await;
        info!("stream worker stopped");
        Ok(())
    }
}

/// Answers revocations while the member leaves the group.
async fn drain(mut events: mpsc::UnboundedReceiver<Ownership>, leaving: JoinHandle<()>) {
    tokio::pin!(leaving);
    loop {
        tokio::select! {
            _ = &mut leaving => return,
            event = events.recv() => match event {
                Some(Ownership::Revoked(_, done)) => { let _ = done.send(()); }
                Some(Ownership::Assigned(_)) => {}
                None => { let _ = (&mut leaving).await; return; }
            },
        }
    }
}

struct Running {
    organization_id: String,
    partition: i32,
    config: watch::Sender<Arc<StreamConfig>>,
    stop: CancellationToken,
    handle: JoinHandle<()>,
}

struct Manager {
    client: clickhouse::Client,
    secret_box: SecretBox,
    shared: TaskShared,
    partitions: i32,
    owned: BTreeSet<i32>,
    /// The newest settings of every stream, secrets opened.
    configs: HashMap<String, Arc<StreamConfig>>,
    running: HashMap<String, Running>,
    /// Streams whose settings or secrets cannot be opened (the version that failed).
    unreadable: HashMap<String, StreamRow>,
    ops: OpsState,
}

impl Manager {
    async fn run(
        &mut self,
        mut events: mpsc::UnboundedReceiver<Ownership>,
        shutdown: CancellationToken,
    ) -> mpsc::UnboundedReceiver<Ownership> {
        let mut refresh = tokio::time::interval(Duration::from_millis(
            self.shared.streams.refresh_interval_ms,
        ));
        let mut flush = tokio::time::interval(Duration::from_millis(
            self.shared.streams.state_flush_interval_ms,
        ));
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            *self
                .ops
                .last_round
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Instant::now();
            self.shared
                .metrics
                .last_progress
                .set(chrono::Utc::now().timestamp_millis() as f64 / 1000.0);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                event = events.recv() => match event {
                    Some(Ownership::Assigned(partitions)) => {
                        self.owned.extend(partitions);
                        self.reconcile().await;
                    }
                    Some(Ownership::Revoked(partitions, done)) => {
                        let revoked: BTreeSet<i32> = partitions.into_iter().collect();
                        self.owned.retain(|p| !revoked.contains(p));
                        self.reconcile().await;
                        let _ = done.send(());
                    }
                    None => break,
                },
                _ = refresh.tick() => {
                    if self.refresh().await {
                        self.reconcile().await;
                    }
                }
                _ = flush.tick() => self.flush(None).await,
            }
            self.shared
                .metrics
                .owned_partitions
                .set(self.owned.len() as i64);
            self.shared
                .metrics
                .owned_streams
                .set(self.running.len() as i64);
        }
        self.owned.clear();
        self.reconcile().await;
        events
    }

    /// Re-reads every stream's settings; false when ClickHouse could not be read.
    async fn refresh(&mut self) -> bool {
        if let Err(err) = tokio::try_join!(
            self.shared.retention.refresh(&self.client),
            self.shared.erased.refresh(&self.client)
        ) {
            warn!(error = %err, "cannot read retention and erasures; keeping the last ones");
            return false;
        }
        let rows = match table::all_streams(&self.client).await {
            Ok(rows) => rows,
            Err(err) => {
                warn!(error = %err, "cannot read the streams' settings; keeping the last ones");
                return false;
            }
        };
        *self
            .ops
            .last_refresh
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        let mut seen = HashSet::new();
        for row in rows {
            seen.insert(row.stream_id.clone());
            let known = self
                .configs
                .get(&row.stream_id)
                .map(|c| c.row.version)
                .or_else(|| self.unreadable.get(&row.stream_id).map(|r| r.version));
            if known == Some(row.version) {
                continue;
            }
            match self.open(&row) {
                Ok(config) => {
                    self.unreadable.remove(&row.stream_id);
                    self.configs.insert(row.stream_id.clone(), Arc::new(config));
                }
                Err(reason) => {
                    error!(stream_id = %row.stream_id, reason = %reason, "stream cannot be delivered");
                    self.configs.remove(&row.stream_id);
                    self.unreadable.insert(row.stream_id.clone(), row);
                }
            }
        }
        self.configs.retain(|id, _| seen.contains(id));
        self.unreadable.retain(|id, _| seen.contains(id));
        true
    }

    fn open(&self, row: &StreamRow) -> Result<StreamConfig, String> {
        let settings = parse_settings(row).map_err(|e| e.to_string())?;
        let secrets: Secrets = if row.deleted == 1 {
            Secrets::default()
        } else {
            let plain = self
                .secret_box
                .open(&row.stream_id, &row.secrets)
                .map_err(|e| e.to_string())?;
            serde_json::from_slice(&plain).map_err(|e| e.to_string())?
        };
        Ok(StreamConfig {
            row: row.clone(),
            settings,
            secrets,
        })
    }

    /// Owned streams this worker cannot open are in `error`, saying why (once per version).
    async fn report_unreadable(&mut self) {
        let owned: Vec<StreamRow> = self
            .unreadable
            .values()
            .filter(|row| row.deleted == 0)
            .filter(|row| {
                self.owned
                    .contains(&stored::partition_of(&row.organization_id, self.partitions))
            })
            .filter(|row| {
                self.shared.board.get(&row.stream_id).is_none_or(|s| {
                    s.last_error_status != WORKER_FAILURE || s.config_version != row.version
                })
            })
            .cloned()
            .collect();
        if owned.is_empty() {
            return;
        }
        let Ok(stored_states) = table::states(&self.client, None).await else {
            return;
        };
        for row in owned {
            let partition = stored::partition_of(&row.organization_id, self.partitions);
            let mut state = stored_states
                .iter()
                .find(|s| s.stream_id == row.stream_id)
                .cloned()
                .unwrap_or_else(|| StateRow {
                    organization_id: row.organization_id.clone(),
                    stream_id: row.stream_id.clone(),
                    partition,
                    next_offset: -1,
                    ..StateRow::default()
                });
            // Its health says so; the position stays as it was stored.
            state.state = "error".into();
            state.config_version = row.version;
            state.last_error_status = WORKER_FAILURE;
            state.last_error = "this stream's secrets cannot be opened with the worker's \
                 streams.secret_key (was the key changed?)"
                .into();
            state.last_error_at_ms = chrono::Utc::now().timestamp_millis();
            self.shared.board.update(state);
        }
    }

    /// Starts the tasks of owned, live streams; stops the others (their positions written).
    async fn reconcile(&mut self) {
        self.report_unreadable().await;
        let wanted: HashMap<String, (i32, Arc<StreamConfig>)> = self
            .configs
            .iter()
            .filter(|(_, c)| c.row.deleted == 0)
            .map(|(id, c)| {
                let partition = stored::partition_of(&c.row.organization_id, self.partitions);
                (id.clone(), (partition, c.clone()))
            })
            .filter(|(_, (partition, _))| self.owned.contains(partition))
            .collect();
        let stopping: Vec<String> = self
            .running
            .keys()
            .filter(|id| !wanted.contains_key(*id))
            .cloned()
            .collect();
        if !stopping.is_empty() {
            self.stop(&stopping).await;
        }
        for (id, (_, config)) in &wanted {
            if let Some(running) = self.running.get(id) {
                if running.config.borrow().row.version != config.row.version {
                    let _ = running.config.send(config.clone());
                }
            }
        }
        let starting: Vec<(String, i32, Arc<StreamConfig>)> = wanted
            .into_iter()
            .filter(|(id, _)| !self.running.contains_key(id))
            .map(|(id, (partition, config))| (id, partition, config))
            .collect();
        if starting.is_empty() {
            return;
        }
        let stored_states: HashMap<String, StateRow> = match table::states(&self.client, None).await
        {
            Ok(rows) => rows.into_iter().map(|r| (r.stream_id.clone(), r)).collect(),
            Err(err) => {
                // Starting without the stored position could send events twice or skip them:
                // wait for the next round.
                warn!(error = %err, "cannot read the streams' positions; starting them later");
                return;
            }
        };
        for (id, partition, config) in starting {
            let state = self
                .shared
                .board
                .get(&id)
                .or_else(|| stored_states.get(&id).cloned())
                .unwrap_or_else(|| StateRow {
                    organization_id: config.row.organization_id.clone(),
                    stream_id: id.clone(),
                    partition,
                    next_offset: -1,
                    state: "active".into(),
                    ..StateRow::default()
                });
            let mut state = state;
            if state.state == "error" && state.last_error_status == WORKER_FAILURE {
                // A worker could not open the stream; this one can: deliver.
                state.state = "active".into();
            }
            let (sender, receiver) = watch::channel(config.clone());
            let stop = CancellationToken::new();
            let task = StreamTask {
                shared: self.shared.clone(),
                partition,
                config: receiver,
                stop: stop.clone(),
                state,
            };
            let handle = tokio::spawn(task.run());
            self.running.insert(
                id,
                Running {
                    organization_id: config.row.organization_id.clone(),
                    partition,
                    config: sender,
                    stop,
                    handle,
                },
            );
        }
    }

    /// Stops these streams' tasks, waits for them, and writes their last state.
    async fn stop(&mut self, ids: &[String]) {
        let mut stopped = Vec::new();
        for id in ids {
            if let Some(running) = self.running.remove(id) {
                running.stop.cancel();
                stopped.push((id.clone(), running));
            }
        }
        let limit = self.shared.streams.request_timeout() + Duration::from_secs(5);
        for (id, running) in &mut stopped {
            if tokio::time::timeout(limit, &mut running.handle)
                .await
                .is_err()
            {
                warn!(stream_id = %id, partition = running.partition, "stream task did not stop in time; aborted");
                running.handle.abort();
            }
        }
        let only: HashSet<String> = stopped.iter().map(|(id, _)| id.clone()).collect();
        for attempt in 0..5 {
            match self.shared.board.flush(&self.client, Some(&only)).await {
                Ok(_) => break,
                Err(err) => {
                    self.shared.metrics.state_write_failures.inc();
                    warn!(error = %err, attempt, "cannot write stopped streams' positions");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        for (id, running) in stopped {
            self.shared.board.remove(&id);
            self.shared.metrics.forget(&running.organization_id, &id);
            self.ops
                .heartbeats
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        }
    }

    async fn flush(&self, only: Option<&HashSet<String>>) {
        if let Err(err) = self.shared.board.flush(&self.client, only).await {
            self.shared.metrics.state_write_failures.inc();
            warn!(error = %err, "cannot write the streams' positions; retrying at the next interval");
        }
    }
}

async fn healthz(State(ops): State<OpsState>) -> Response {
    let round = ops
        .last_round
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .elapsed();
    if round > Duration::from_secs(60) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the worker's loop has not made a round for {} s\n",
                round.as_secs()
            ),
        )
            .into_response();
    }
    let stuck: Vec<String> = ops
        .heartbeats
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|(_, at)| at.elapsed() > ops.stale_after)
        .map(|(id, _)| id.clone())
        .collect();
    if !stuck.is_empty() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("stream tasks making no progress: {}\n", stuck.join(", ")),
        )
            .into_response();
    }
    (StatusCode::OK, "ok\n").into_response()
}

async fn readyz(State(ops): State<OpsState>) -> Response {
    let refreshed = *ops.last_refresh.lock().unwrap_or_else(|e| e.into_inner());
    let own = match refreshed {
        None => Err("the streams' settings have not been read yet".to_owned()),
        Some(at) if at.elapsed() > ops.refresh_interval * 3 + Duration::from_secs(10) => {
            Err(format!(
                "the streams' settings have not been read for {} s",
                at.elapsed().as_secs()
            ))
        }
        Some(_) => Ok(()),
    };
    let client = ops.client.clone();
    audit_runtime::ops::readiness(&ops.shutdown, own, async move {
        audit_store::ping(&client, Duration::from_secs(2))
            .await
            .map_err(|err| format!("clickhouse unavailable: {err}"))
    })
    .await
    .into_response()
}

async fn metrics(State(ops): State<OpsState>) -> Response {
    audit_runtime::ops::metrics_response(audit_runtime::metrics::render(&ops.metrics.registry))
}
