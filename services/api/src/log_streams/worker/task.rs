//! One stream's delivery loop, run by the replica that owns its partition: read the
//! organization's events from the stream's position in the stored-events topic (a reader of its
//! own, so that a stream that waits holds back no other), keep those the filters take, send
//! them as one batch, and move the position only when the destination accepted the batch.
//! Failures are retried with capped, jittered back-off (a `Retry-After` is honoured); after
//! `failing_after_ms` the stream reports `failing`; a refusal that no retry can fix (4xx other
//! than 408 and 429) stops it in `error` until its settings change. It never skips an event.

use std::sync::Arc;
use std::time::{Duration, Instant};

use audit_runtime::kafka::LoggingContext;
use audit_store::stored;
use rand::Rng;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::health::{HealthBoard, StreamMetrics};
use crate::config::StreamsConfig;
use crate::log_streams::deliver::{self, DeliveryEvent, Outcome, Sender};
use crate::log_streams::payload;
use crate::log_streams::spec::{Secrets, Settings};
use crate::log_streams::table::{StateRow, StreamRow};
use crate::retention::{ErasedPerson, ErasedSubjects, RetentionSnapshot};

/// A stream's settings as its task uses them (secrets opened).
#[derive(Debug, Clone)]
pub struct StreamConfig {
    pub row: StreamRow,
    pub settings: Settings,
    pub secrets: Secrets,
}

pub struct ReaderContext(LoggingContext);

impl ClientContext for ReaderContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        self.0.log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.0.error(error, reason);
    }
}

impl ConsumerContext for ReaderContext {}

/// What a task needs from the worker.
#[derive(Clone)]
pub struct TaskShared {
    pub reader_config: rdkafka::ClientConfig,
    pub topic: String,
    pub streams: StreamsConfig,
    pub sender: Sender,
    pub board: HealthBoard,
    pub metrics: StreamMetrics,
    /// Which events each organization still holds: an expired event is never delivered.
    pub retention: RetentionSnapshot,
    /// Erased persons: their events read again from the topic (a replay) go out pseudonymized.
    pub erased: ErasedSubjects,
    /// Epoch ms of each task's last loop round, for `/healthz`.
    pub heartbeats: Arc<std::sync::Mutex<std::collections::HashMap<String, Instant>>>,
}

/// What a stream may deliver of its organization's events, taken once per batch: those it
/// still holds, with its erased persons pseudonymized.
struct Scope {
    visibility: audit_store::retention::Visibility,
    erased: Vec<ErasedPerson>,
}

impl Scope {
    fn of(shared: &TaskShared, organization_id: &str) -> Self {
        Self {
            visibility: shared
                .retention
                .visibility_or_default(organization_id, now_ms()),
            erased: shared.erased.of(organization_id),
        }
    }

    /// Whether the row may go out (after the erasures are applied to it).
    fn holds(&self, row: &mut audit_store::AuditEventRow) -> bool {
        self.visibility.holds(row.occurred_at_ms) && self.erased.iter().all(|p| p.scrub(row))
    }
}

/// A batch read from the topic.
struct Batch {
    /// The offset the batch starts at.
    start: i64,
    events: Vec<DeliveryEvent>,
    /// The offset after the last message the batch covers (its events and the skipped ones).
    end: i64,
    /// Ingest time of the batch's oldest event.
    oldest_ingested_ms: i64,
}

/// Reads one partition from a position, keeping one organization's events that pass the filters.
struct Reader {
    consumer: Arc<StreamConsumer<ReaderContext>>,
    /// The partition's end offset, fetched at most every few seconds (for the lag).
    high: i64,
    high_fetched: Option<Instant>,
    topic: String,
    partition: i32,
    /// The next offset to read.
    next: i64,
    /// An event read but not fitting the previous batch: the next batch starts with it.
    carried: Option<(i64, DeliveryEvent, i64, usize)>,
    /// The batch read while the previous one was being delivered.
    ready: Option<Batch>,
}

impl Reader {
    fn open(shared: &TaskShared, partition: i32, offset: i64) -> Result<Self, KafkaError> {
        let consumer: StreamConsumer<ReaderContext> = shared
            .reader_config
            .create_with_context(ReaderContext(LoggingContext::default()))?;
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(&shared.topic, partition, Offset::Offset(offset))?;
        consumer.assign(&list)?;
        Ok(Self {
            consumer: Arc::new(consumer),
            high: 0,
            high_fetched: None,
            topic: shared.topic.clone(),
            partition,
            next: offset,
            carried: None,
            ready: None,
        })
    }

    /// Messages of the partition after `next` (the lag's upper bound); the end offset is asked
    /// of the broker at most every 5 seconds.
    async fn behind(&mut self) -> i64 {
        if self
            .high_fetched
            .is_none_or(|at| at.elapsed() > Duration::from_secs(5))
        {
            let consumer = self.consumer.clone();
            let (topic, partition) = (self.topic.clone(), self.partition);
            let fetched = tokio::task::spawn_blocking(move || {
                consumer.fetch_watermarks(&topic, partition, Duration::from_secs(2))
            })
            .await;
            if let Ok(Ok((_, high))) = fetched {
                self.high = high;
                self.high_fetched = Some(Instant::now());
            }
        }
        (self.high.max(self.next) - self.next).max(0)
    }

    /// The next batch: up to the destination's limits, closed `linger` after its first event,
    /// or when no message arrives for `idle` (then possibly empty, covering skipped messages).
    async fn next_batch(
        &mut self,
        config: &StreamConfig,
        scope: &Scope,
        linger: Duration,
        idle: Duration,
    ) -> Result<Batch, KafkaError> {
        let (max_events, max_bytes) = deliver::limits(&config.settings.destination);
        let start = self.carried.as_ref().map_or(self.next, |c| c.0);
        let mut events = Vec::new();
        let mut bytes = 0usize;
        let mut oldest = 0i64;
        let mut end = self.next;
        let mut first_at: Option<tokio::time::Instant> = None;
        if let Some((offset, event, ingested, size)) = self.carried.take() {
            events.push(event);
            bytes += size;
            oldest = ingested;
            end = offset + 1;
            first_at = Some(tokio::time::Instant::now());
        }
        let organization = config.row.organization_id.as_bytes();
        loop {
            if events.len() >= max_events {
                break;
            }
            let wait = match first_at {
                Some(at) => linger.saturating_sub(at.elapsed()),
                None => idle,
            };
            let message = match tokio::time::timeout(wait, self.consumer.recv()).await {
                Err(_) => break,
                Ok(Err(err)) => return Err(err),
                Ok(Ok(message)) => message,
            };
            let offset = message.offset();
            if offset < self.next {
                continue;
            }
            self.next = offset + 1;
            if message.key() != Some(organization) {
                end = self.next;
                continue;
            }
            let Some(mut row) = message.payload().and_then(|p| stored::decode(p).ok()) else {
                warn!(
                    partition = self.partition,
                    offset, "unreadable stored event skipped"
                );
                end = self.next;
                continue;
            };
            let filters = &config.settings.filters;
            if row.organization_id != config.row.organization_id
                || !filters.matches(&row.event_type, &row.actor_type, &row.resource_type)
            {
                end = self.next;
                continue;
            }
            if !scope.holds(&mut row) {
                end = self.next;
                continue;
            }
            let event = DeliveryEvent {
                id: row.id.clone(),
                occurred_at_ms: row.occurred_at_ms,
                event_type: row.event_type.clone(),
                payload: payload::render(&row, config.settings.format),
            };
            // The body's share of this event (its payload and the envelope around it).
            let size = event.payload.get().len() + 160;
            if !events.is_empty() && bytes + size > max_bytes {
                self.carried = Some((offset, event, row.ingested_at_ms as i64, size));
                break;
            }
            if events.is_empty() {
                oldest = row.ingested_at_ms as i64;
                first_at = Some(tokio::time::Instant::now());
            }
            events.push(event);
            bytes += size;
            end = self.next;
        }
        Ok(Batch {
            start,
            events,
            end,
            oldest_ingested_ms: oldest,
        })
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The offset of the first message stored at or after `at_ms`. None stored yet: the end of
/// the partition as it was *before* the look-up (a message arriving meanwhile is not skipped).
async fn offset_at(shared: &TaskShared, partition: i32, at_ms: i64) -> Result<i64, KafkaError> {
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || {
        let consumer: rdkafka::consumer::BaseConsumer = shared.reader_config.create()?;
        let (_, high_before) =
            consumer.fetch_watermarks(&shared.topic, partition, Duration::from_secs(30))?;
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(&shared.topic, partition, Offset::Offset(at_ms))?;
        let found = consumer.offsets_for_times(list, Duration::from_secs(30))?;
        let offset = found
            .find_partition(&shared.topic, partition)
            .map(|e| e.offset());
        Ok(match offset {
            Some(Offset::Offset(offset)) => offset,
            _ => high_before,
        })
    })
    .await
    .expect("offset lookup task")
}

pub struct StreamTask {
    pub shared: TaskShared,
    pub partition: i32,
    pub config: watch::Receiver<Arc<StreamConfig>>,
    pub stop: CancellationToken,
    pub state: StateRow,
}

enum Wait {
    Elapsed,
    Changed,
    Stopped,
}

impl StreamTask {
    fn beat(&self) {
        self.shared
            .heartbeats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(self.state.stream_id.clone(), Instant::now());
    }

    fn publish(&self) {
        self.shared.metrics.show(&self.state);
        self.shared.board.update(self.state.clone());
    }

    /// Sleeps up to `duration`, waking early on a settings change or stop.
    async fn wait(&mut self, duration: Duration) -> Wait {
        tokio::select! {
            _ = self.stop.cancelled() => Wait::Stopped,
            changed = self.config.changed() => match changed {
                Ok(()) => Wait::Changed,
                Err(_) => Wait::Stopped,
            },
            _ = tokio::time::sleep(duration) => Wait::Elapsed,
        }
    }

    pub async fn run(mut self) {
        let mut reader: Option<Reader> = None;
        let stream_id = self.state.stream_id.clone();
        info!(stream_id = %stream_id, partition = self.partition, "stream started");
        while !self.stop.is_cancelled() {
            self.beat();
            let config = self.config.borrow_and_update().clone();
            if config.row.deleted == 1 {
                break;
            }
            if config.row.paused == 1 {
                reader = None;
                if let Wait::Stopped = self.wait(Duration::from_secs(5)).await {
                    break;
                }
                continue;
            }
            if self.state.state == "error" && self.state.config_version >= config.row.version {
                reader = None;
                if let Wait::Stopped = self.wait(Duration::from_secs(5)).await {
                    break;
                }
                continue;
            }
            if self.state.state == "error" {
                // New settings: try again.
                self.state.state = "active".into();
                self.state.config_version = config.row.version;
                self.publish();
            }
            // Placement: a replay request, a new stream, or a partition count that changed.
            let placement = if config.row.replay_seq > self.state.replay_seq {
                Some(config.row.replay_from_ms)
            } else if self.state.next_offset < 0 {
                Some(config.row.created_at_ms)
            } else if self.state.partition != self.partition {
                Some(
                    self.state
                        .last_delivered_at_ms
                        .max(config.row.created_at_ms),
                )
            } else {
                None
            };
            if let Some(at_ms) = placement {
                match offset_at(&self.shared, self.partition, at_ms).await {
                    Ok(offset) => {
                        info!(stream_id = %stream_id, offset, "stream placed");
                        self.state.next_offset = offset;
                        self.state.partition = self.partition;
                        self.state.replay_seq = config.row.replay_seq;
                        self.state.config_version = config.row.version;
                        self.publish();
                        reader = None;
                    }
                    Err(err) => {
                        warn!(stream_id = %stream_id, error = %err, "cannot place the stream in the stored-events topic; retrying");
                        if let Wait::Stopped = self.wait(Duration::from_secs(2)).await {
                            break;
                        }
                        continue;
                    }
                }
            }
            let position = self.state.next_offset;
            let active = match &mut reader {
                Some(reader)
                    if reader
                        .ready
                        .as_ref()
                        .map_or(reader.next == position, |b| b.start == position) =>
                {
                    reader
                }
                _ => match Reader::open(&self.shared, self.partition, self.state.next_offset) {
                    Ok(opened) => reader.insert(opened),
                    Err(err) => {
                        warn!(stream_id = %stream_id, error = %err, "cannot open a reader");
                        if let Wait::Stopped = self.wait(Duration::from_secs(2)).await {
                            break;
                        }
                        continue;
                    }
                },
            };
            let linger = Duration::from_millis(self.shared.streams.batch_linger_ms);
            let scope = Scope::of(&self.shared, &config.row.organization_id);
            let batch = match active.ready.take() {
                Some(batch) => Ok(batch),
                None => tokio::select! {
                    _ = self.stop.cancelled() => break,
                    batch = active.next_batch(&config, &scope, linger, Duration::from_secs(1)) => batch,
                },
            };
            let batch = match batch {
                Ok(batch) => batch,
                Err(err) => {
                    warn!(stream_id = %stream_id, error = %err, "reading the stored-events topic failed; reopening");
                    reader = None;
                    if let Wait::Stopped = self.wait(Duration::from_secs(1)).await {
                        break;
                    }
                    continue;
                }
            };
            let behind = active.behind().await;
            if batch.events.is_empty() {
                let moved = batch.end != self.state.next_offset;
                self.state.next_offset = batch.end;
                let lag_changed = self.state.lag_ms != 0 || self.state.lag_events != behind;
                self.state.lag_ms = 0;
                self.state.lag_events = behind;
                if moved || lag_changed {
                    self.publish();
                }
                continue;
            }
            // The next batch is read (and rendered) while this one is sent.
            let (delivered, next) = tokio::join!(
                self.deliver(&batch, behind),
                active.next_batch(&config, &scope, linger, Duration::from_secs(1))
            );
            // Read with these settings: kept only if they still hold.
            let unchanged = self.config.borrow().row.version == config.row.version;
            match (delivered, next) {
                (Some(true), Ok(next)) if unchanged => active.ready = Some(next),
                (Some(true), _) => reader = None,
                (Some(false), _) => reader = None,
                (None, _) => break,
            }
        }
        // Stopped: the position written is the last batch delivered.
        self.publish();
        info!(stream_id = %stream_id, "stream stopped");
    }

    /// Sends `batch` until the destination takes it (true), refuses it for good (false: the
    /// stream is in `error`), or the task must stop (None). Settings changes apply between
    /// attempts; pausing or deleting gives the batch up (it is read again later).
    async fn deliver(&mut self, batch: &Batch, behind: i64) -> Option<bool> {
        let kind_config = self.config.borrow().clone();
        let kind = kind_config.settings.destination.kind();
        let first = self.state.next_offset;
        let message_id = format!(
            "msg_{}_{}_{}_{}",
            self.state.stream_id, self.partition, first, batch.end
        );
        let mut backoff = Duration::from_millis(self.shared.streams.initial_backoff_ms);
        let max_backoff = Duration::from_millis(self.shared.streams.max_backoff_ms);
        loop {
            self.beat();
            let config = self.config.borrow_and_update().clone();
            if config.row.deleted == 1
                || config.row.paused == 1
                || config.row.replay_seq > self.state.replay_seq
            {
                // Given up: read again from the position once placed or resumed.
                return Some(false);
            }
            let started = Instant::now();
            let outcome = self
                .shared
                .sender
                .send(
                    &self.state.stream_id,
                    &config.settings.destination,
                    &config.secrets,
                    &message_id,
                    &batch.events,
                )
                .await;
            self.shared
                .metrics
                .request_seconds
                .with_label_values(&[kind])
                .observe(started.elapsed().as_secs_f64());
            let now = now_ms();
            match outcome {
                Outcome::Delivered { .. } => {
                    self.shared
                        .metrics
                        .attempts
                        .with_label_values(&[kind, "delivered"])
                        .inc();
                    self.shared
                        .metrics
                        .delivered
                        .with_label_values(&[kind])
                        .inc_by(batch.events.len() as u64);
                    self.shared
                        .metrics
                        .latency_seconds
                        .with_label_values(&[kind])
                        .observe((now - batch.oldest_ingested_ms).max(0) as f64 / 1000.0);
                    let state = &mut self.state;
                    state.next_offset = batch.end;
                    state.delivered_events += batch.events.len() as u64;
                    state.last_delivered_at_ms = now;
                    state.state = "active".into();
                    state.failing_since_ms = 0;
                    state.lag_ms = 0;
                    state.lag_events = behind;
                    state.config_version = state.config_version.max(config.row.version);
                    self.publish();
                    return Some(true);
                }
                Outcome::Misconfigured { status, reason } => {
                    self.shared
                        .metrics
                        .attempts
                        .with_label_values(&[kind, "error"])
                        .inc();
                    warn!(stream_id = %self.state.stream_id, status, reason = %reason, "destination refused the stream's requests; stream in error until its settings change");
                    let state = &mut self.state;
                    state.state = "error".into();
                    state.last_error_status = i32::from(status);
                    state.last_error = reason;
                    state.last_error_at_ms = now;
                    state.config_version = config.row.version;
                    state.lag_ms = (now - batch.oldest_ingested_ms).max(0);
                    state.lag_events = behind + batch.events.len() as i64;
                    self.publish();
                    return Some(false);
                }
                Outcome::Retry {
                    status,
                    reason,
                    retry_after,
                } => {
                    self.shared
                        .metrics
                        .attempts
                        .with_label_values(&[kind, "retry"])
                        .inc();
                    let state = &mut self.state;
                    if state.failing_since_ms == 0 {
                        state.failing_since_ms = now;
                    }
                    if now - state.failing_since_ms >= self.shared.streams.failing_after_ms as i64 {
                        if state.state != "failing" {
                            warn!(stream_id = %state.stream_id, reason = %reason, "stream failing: its destination has not accepted a batch for failing_after_ms");
                        }
                        state.state = "failing".into();
                    }
                    state.last_error_status = status.map_or(0, i32::from);
                    state.last_error = reason;
                    state.last_error_at_ms = now;
                    state.lag_ms = (now - batch.oldest_ingested_ms).max(0);
                    state.lag_events = behind + batch.events.len() as i64;
                    self.publish();
                    // Full jitter on the back-off; a longer Retry-After wins.
                    let jittered = rand::rng().random_range(backoff / 2..=backoff);
                    let delay = retry_after.map_or(jittered, |after| after.max(jittered));
                    backoff = (backoff * 2).min(max_backoff);
                    match self.wait(delay.min(Duration::from_secs(3600))).await {
                        Wait::Stopped => return None,
                        Wait::Changed | Wait::Elapsed => {}
                    }
                }
            }
        }
    }
}
