//! Publishes every stored event to the stored-events topic (see `audit_store::stored`), which
//! the log streams deliver from. A flush publishes its events after their insert and awaits
//! Kafka's acknowledgements before its offsets may be committed: a crash in between stores
//! nothing twice (the fences find the rows) and publishes them again, so the topic holds every
//! stored event at least once, one organization's in the order they were stored.

use std::time::Duration;

use audit_store::{stored, AuditEventRow};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::config::{KafkaConfig, StoredEventsConfig};
use crate::metrics::IngestMetrics;
use crate::retry::Retry;
use audit_runtime::kafka::LoggingContext;

/// Why the publisher cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StoredEventsError {
    #[error("cannot create the stored-events producer: {0}")]
    Producer(#[source] KafkaError),
    #[error("cannot read the partitions of the stored-events topic {topic:?}: {source}")]
    Metadata {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error(
        "the stored-events topic {0:?} does not exist: create it (see README \"Log streams\") or \
         set stored_events.enabled = false"
    )]
    MissingTopic(String),
}

pub struct StoredEventPublisher {
    producer: FutureProducer<LoggingContext>,
    topic: String,
    partitions: i32,
    metrics: IngestMetrics,
    retry: Retry,
}

impl StoredEventPublisher {
    /// Connects and reads the topic's partition count (None when publishing is off).
    pub async fn connect(
        kafka: &KafkaConfig,
        config: &StoredEventsConfig,
        metrics: IngestMetrics,
        retry: Retry,
    ) -> Result<Option<Self>, StoredEventsError> {
        if !config.enabled {
            return Ok(None);
        }
        let producer = audit_runtime::kafka::idempotent_producer(
            &kafka.connection(),
            &[
                ("linger.ms", "5"),
                ("compression.type", "lz4"),
                ("batch.num.messages", "10000"),
                ("queue.buffering.max.messages", "1000000"),
            ],
        )
        .map_err(StoredEventsError::Producer)?;
        let topic = config.topic.clone();
        let partitions = {
            let producer = producer.clone();
            let name = topic.clone();
            tokio::task::spawn_blocking(move || {
                use rdkafka::producer::Producer;
                producer
                    .client()
                    .fetch_metadata(Some(&name), Duration::from_secs(30))
            })
            .await
            .expect("metadata task")
            .map_err(|source| StoredEventsError::Metadata {
                topic: topic.clone(),
                source,
            })?
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map(|t| t.partitions().len() as i32)
            .filter(|count| *count > 0)
            .ok_or_else(|| StoredEventsError::MissingTopic(topic.clone()))?
        };
        Ok(Some(Self {
            producer,
            topic,
            partitions,
            metrics,
            retry,
        }))
    }

    /// Produces every row and waits for all acknowledgements, retrying failed sends.
    pub async fn publish_all(&self, rows: &[&AuditEventRow]) -> Result<(), KafkaError> {
        if rows.is_empty() {
            return Ok(());
        }
        let sends = rows.iter().map(|row| {
            self.retry.run(
                "stored_event_produce",
                move || self.send(row),
                |err| !crate::dead_letter::is_permanent(err),
            )
        });
        for result in futures_util::future::join_all(sends).await {
            result?;
        }
        self.metrics.stored_published.inc_by(rows.len() as u64);
        Ok(())
    }

    async fn send(&self, row: &AuditEventRow) -> Result<(), KafkaError> {
        let payload = stored::encode(row);
        let record = FutureRecord::to(&self.topic)
            .key(row.organization_id.as_str())
            .partition(stored::partition_of(&row.organization_id, self.partitions))
            .payload(payload.as_slice());
        self.producer
            .send(record, Duration::from_secs(30))
            .await
            .map(|_| ())
            .map_err(|(err, _)| err)
    }
}
