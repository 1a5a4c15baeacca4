//! `audit-ingest replay`: re-reads a range of a topic (from offsets or timestamps) into ClickHouse
//! through the same flush as the service. It commits nothing and relies on the same
//! de-duplication, so replaying a range that was already ingested changes nothing visible.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use indicatif::{ProgressBar, ProgressStyle};
use rdkafka::consumer::Consumer;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::app::{build_flusher, prepare_schema, AppError};
use crate::batch::{decode, Decoded, EventBatch};
use crate::config::IngestConfig;
use crate::kafka::{self, IngestContext, PartitionKey};
use crate::metrics::IngestMetrics;

/// Where a replay starts or stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeEnd {
    Offset(i64),
    Time(DateTime<Utc>),
    /// Start: the earliest retained message. End: the high watermark when the replay starts.
    Edge,
}

#[derive(Debug, Clone)]
pub struct ReplayRange {
    pub topics: Vec<String>,
    /// Empty: every partition of each topic.
    pub partitions: Vec<i32>,
    pub from: RangeEnd,
    /// Exclusive.
    pub to: RangeEnd,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplaySummary {
    pub messages: u64,
    pub events: u64,
    pub dead_letters: u64,
    /// Events found stored already (not stored again).
    pub already_stored: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    App(#[from] AppError),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("topic {0:?} does not exist")]
    UnknownTopic(String),
    #[error("partition {partition} does not exist in topic {topic:?}")]
    UnknownPartition { topic: String, partition: i32 },
    #[error(transparent)]
    Flush(#[from] crate::flush::FlushError),
    #[error("replay interrupted; {0} messages were stored before the interruption")]
    Interrupted(u64),
}

const KAFKA_TIMEOUT: Duration = Duration::from_secs(15);

/// Replays the range; `show_progress` draws a progress bar on stderr (hidden if not a terminal).
pub async fn replay(
    config: &IngestConfig,
    range: &ReplayRange,
    show_progress: bool,
    stop: CancellationToken,
) -> Result<ReplaySummary, ReplayError> {
    prepare_schema(config).await?;
    kafka::probe(&config.kafka).await.map_err(AppError::from)?;
    let metrics = IngestMetrics::new();
    let flusher = build_flusher(config, &metrics).await?;
    // A throwaway group: replay assigns partitions itself and never commits.
    let group = format!("{}-replay-{}", config.kafka.group_id, std::process::id());
    let consumer = kafka::consumer(
        &config.kafka,
        &group,
        kafka::Membership::Standalone,
        IngestContext::new(metrics.clone()),
    )?;

    let plan = plan(&consumer, range)?;
    let total: i64 = plan.values().map(|(start, end)| (end - start).max(0)).sum();
    let mut assignment = TopicPartitionList::new();
    let mut remaining: BTreeMap<PartitionKey, i64> = BTreeMap::new();
    for ((topic, partition), (start, end)) in &plan {
        if end > start {
            assignment.add_partition_offset(topic, *partition, Offset::Offset(*start))?;
            remaining.insert((topic.clone(), *partition), *end);
        }
    }
    info!(partitions = remaining.len(), messages = total, "replaying");
    let progress = if show_progress {
        ProgressBar::new(total as u64)
    } else {
        ProgressBar::hidden()
    };
    progress.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} messages ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    if remaining.is_empty() {
        progress.finish_and_clear();
        return Ok(ReplaySummary::default());
    }
    consumer.assign(&assignment)?;

    let mut summary = ReplaySummary::default();
    let mut batch = EventBatch::default();
    let batch_config = &config.batch;
    while !remaining.is_empty() {
        let message = tokio::select! {
            _ = stop.cancelled() => return Err(ReplayError::Interrupted(summary.messages - batch.len() as u64)),
            _ = tokio::time::sleep(batch_config.max_age()) => {
                // Idle: a partition whose range ends in control records (transactions) or
                // compacted-away offsets has no message at end - 1; its position tells.
                if let Ok(position) = consumer.position() {
                    for element in position.elements() {
                        if let Offset::Offset(at) = element.offset() {
                            let key = (element.topic().to_owned(), element.partition());
                            if remaining.get(&key).is_some_and(|end| at >= *end) {
                                remaining.remove(&key);
                            }
                        }
                    }
                }
                None
            }
            received = consumer.recv() => Some(received?),
        };
        if let Some(message) = message {
            let key = (message.topic().to_owned(), message.partition());
            let Some(end) = remaining.get(&key).copied() else {
                continue;
            };
            if message.offset() >= end {
                remaining.remove(&key);
                let mut done = TopicPartitionList::new();
                done.add_partition(&key.0, key.1);
                consumer.pause(&done)?;
                continue;
            }
            if message.offset() + 1 >= end {
                remaining.remove(&key);
            }
            let size = message.payload_len();
            let decoded = decode(&message);
            summary.messages += 1;
            match decoded {
                Decoded::Event(_) => summary.events += 1,
                Decoded::Invalid(_) => summary.dead_letters += 1,
            }
            batch.push(decoded, size, None);
            progress.inc(1);
        }
        // The service's rule (one flush at a time here), and the end of the range.
        let state = batch.state(batch_config);
        if state.due() || (remaining.is_empty() && !state.empty) {
            let flushed = flusher.flush(std::mem::take(&mut batch), None).await?;
            summary.already_stored += flushed.skipped as u64;
        }
    }
    // What the replay stored is checked for copies of upstream duplicates now; the service's
    // watcher collapses the months found.
    crate::duplicates::check_noted(&flusher.duplicates, flusher.sink.client(), &metrics).await;
    progress.finish_and_clear();
    info!(
        messages = summary.messages,
        events = summary.events,
        dead_letters = summary.dead_letters,
        already_stored = summary.already_stored,
        "replay done"
    );
    Ok(summary)
}

/// Start and end offset of every partition in the range.
fn plan(
    consumer: &kafka::IngestConsumer,
    range: &ReplayRange,
) -> Result<BTreeMap<PartitionKey, (i64, i64)>, ReplayError> {
    let mut plan = BTreeMap::new();
    for topic in &range.topics {
        let metadata = consumer.fetch_metadata(Some(topic), KAFKA_TIMEOUT)?;
        let Some(meta) = metadata.topics().iter().find(|t| t.name() == topic) else {
            return Err(ReplayError::UnknownTopic(topic.clone()));
        };
        if meta.error().is_some() || meta.partitions().is_empty() {
            return Err(ReplayError::UnknownTopic(topic.clone()));
        }
        let existing: Vec<i32> = meta.partitions().iter().map(|p| p.id()).collect();
        let partitions = if range.partitions.is_empty() {
            existing.clone()
        } else {
            range.partitions.clone()
        };
        for partition in partitions {
            if !existing.contains(&partition) {
                return Err(ReplayError::UnknownPartition {
                    topic: topic.clone(),
                    partition,
                });
            }
            let (low, high) = consumer.fetch_watermarks(topic, partition, KAFKA_TIMEOUT)?;
            let start = resolve(consumer, topic, partition, &range.from, low, high)?.max(low);
            let end = resolve(consumer, topic, partition, &range.to, high, high)?.min(high);
            plan.insert((topic.clone(), partition), (start, end));
        }
    }
    Ok(plan)
}

fn resolve(
    consumer: &kafka::IngestConsumer,
    topic: &str,
    partition: i32,
    bound: &RangeEnd,
    edge: i64,
    high: i64,
) -> Result<i64, ReplayError> {
    match bound {
        RangeEnd::Edge => Ok(edge),
        RangeEnd::Offset(offset) => Ok(*offset),
        RangeEnd::Time(at) => {
            let mut query = TopicPartitionList::new();
            query.add_partition_offset(topic, partition, Offset::Offset(at.timestamp_millis()))?;
            let found = consumer.offsets_for_times(query, KAFKA_TIMEOUT)?;
            Ok(
                match found.find_partition(topic, partition).map(|e| e.offset()) {
                    Some(Offset::Offset(offset)) => offset,
                    // No message at or after that time.
                    _ => high,
                },
            )
        }
    }
}
