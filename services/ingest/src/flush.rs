//! One flush of a batch, everything that must be durable before its offsets may be committed:
//! fill fields from the directory, insert the events (rows ClickHouse rejects become dead
//! letters), store the directory facts, produce and await the dead letters.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use audit_event::{EventError, RejectReason};
use audit_store::{AuditEventRow, EVENTS_TABLE};
use rdkafka::error::KafkaError;
use tracing::{info_span, warn, Instrument};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::batch::{DeadLetter, EventBatch, SourcePosition};
use crate::dead_letter::DeadLetterProducer;
use crate::directory::{facts_of, Directory, KnownValues};
use crate::kafka::PartitionKey;
use crate::metrics::IngestMetrics;
use crate::sink::{ClickHouseSink, InsertError};

/// A flush that cannot complete: the service must stop without committing.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    #[error("cannot produce to the dead-letter topic: {0}")]
    DeadLetter(#[source] KafkaError),
    #[error("the directory projection could not be written: {0}")]
    Directory(#[source] InsertError),
}

/// What a completed flush made durable.
#[derive(Debug, Default)]
pub struct FlushedBatch {
    pub next_offsets: BTreeMap<PartitionKey, i64>,
    pub inserted: usize,
    pub dead_lettered: usize,
}

pub struct Flusher {
    pub sink: ClickHouseSink,
    pub directory: Option<Directory>,
    pub dead_letters: DeadLetterProducer,
    pub metrics: IngestMetrics,
}

impl Flusher {
    pub async fn flush(&self, batch: EventBatch) -> Result<FlushedBatch, FlushError> {
        let span = info_span!(
            "ingest.flush",
            events = batch.events.len(),
            dead_letters = batch.dead_letters.len()
        );
        for context in &batch.trace_links {
            span.add_link(context.clone());
        }
        self.flush_inner(batch).instrument(span).await
    }

    async fn flush_inner(&self, batch: EventBatch) -> Result<FlushedBatch, FlushError> {
        let next_offsets = batch.next_offsets();
        let EventBatch {
            events: mut rows,
            mut dead_letters,
            ..
        } = batch;

        let phase = |name: &str, since: std::time::Instant| {
            self.metrics
                .flush_phase_seconds
                .with_label_values(&[name])
                .observe(since.elapsed().as_secs_f64());
        };
        let started = std::time::Instant::now();
        let facts = match &self.directory {
            Some(directory) => directory.prepare(facts_of(&rows)),
            None => Default::default(),
        };
        if let Some(directory) = &self.directory {
            // After prepare (which compares with what the cache held before this batch).
            directory.observe(&facts);
            let known = self
                .sink
                .retry_transient("directory_read", || directory.resolve(&rows))
                .await
                .unwrap_or_else(|err| {
                    // A rejected read (not an outage) only costs the enrichment of this batch.
                    warn!(error = %err, "directory read rejected; batch stored without enrichment");
                    KnownValues::default()
                });
            for row in &mut rows {
                directory.fill(row, &known);
            }
        }

        let ingested_at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default();
        for row in &mut rows {
            row.ingested_at_ms = ingested_at_ms;
        }
        phase("directory_read", started);
        let bytes: usize = rows.iter().map(AuditEventRow::wire_size).sum();
        let started = std::time::Instant::now();
        let rejected = self.insert_events(&rows).await;
        phase("insert", started);
        let mut inserted_per_topic: BTreeMap<&str, u64> = BTreeMap::new();
        let mut newest_ms = None;
        for (index, row) in rows.iter().enumerate() {
            if rejected.iter().any(|(i, _)| *i == index) {
                continue;
            }
            *inserted_per_topic
                .entry(row.source_topic.as_str())
                .or_default() += 1;
            newest_ms = newest_ms.max(Some(row.occurred_at_ms));
        }
        for (index, error) in &rejected {
            let row = &rows[*index];
            dead_letters.push(DeadLetter {
                key: Some(row.id.clone().into_bytes()),
                // The original bytes are gone by now; the row as it was to be stored stands in.
                payload: serde_json::to_vec(row).ok(),
                headers: vec![("dlq.payload.form".to_owned(), Some(b"stored_row".to_vec()))],
                error: EventError::new(RejectReason::StorageRejected, error.to_string()),
                source: SourcePosition {
                    topic: row.source_topic.clone(),
                    partition: row.source_partition,
                    offset: row.source_offset,
                },
            });
        }

        let started = std::time::Instant::now();
        if let Some(directory) = &self.directory {
            directory
                .store(&facts)
                .await
                .map_err(FlushError::Directory)?;
        }
        phase("directory_write", started);
        let started = std::time::Instant::now();
        self.dead_letters
            .send_all(&dead_letters)
            .await
            .map_err(FlushError::DeadLetter)?;
        phase("dead_letter", started);

        let inserted = rows.len() - rejected.len();
        self.metrics
            .batch_rows
            .with_label_values(&[] as &[&str])
            .observe(inserted as f64);
        self.metrics
            .batch_bytes
            .with_label_values(&[] as &[&str])
            .observe(bytes as f64);
        for (topic, count) in inserted_per_topic {
            self.metrics
                .inserted
                .with_label_values(&[topic])
                .inc_by(count);
        }
        if let Some(ms) = newest_ms {
            let seconds = ms as f64 / 1000.0;
            if seconds > self.metrics.newest_occurred_at.get() {
                self.metrics.newest_occurred_at.set(seconds);
            }
        }
        Ok(FlushedBatch {
            next_offsets,
            inserted,
            dead_lettered: dead_letters.len(),
        })
    }

    /// Inserts all rows; if ClickHouse rejects the data, finds the rejected rows one by one.
    /// Returns the indexes of the rows that were not stored, with the reason.
    async fn insert_events(&self, rows: &[AuditEventRow]) -> Vec<(usize, InsertError)> {
        match self.sink.insert(EVENTS_TABLE, rows).await {
            Ok(()) => Vec::new(),
            Err(err) => {
                warn!(rows = rows.len(), error = %err, "batch rejected, inserting rows one by one");
                let mut rejected = Vec::new();
                for (index, row) in rows.iter().enumerate() {
                    if let Err(err) = self
                        .sink
                        .insert(EVENTS_TABLE, std::slice::from_ref(row))
                        .await
                    {
                        rejected.push((index, err));
                    }
                }
                rejected
            }
        }
    }
}
