//! One flush of a batch, everything that must be durable before its offsets may be committed:
//! fill fields from the directory, insert the events (rows ClickHouse rejects become dead
//! letters; re-delivered rows stored already are not inserted again, see [`crate::fence`]),
//! store the directory facts, produce and await the dead letters.

use std::collections::BTreeMap;
use std::time::Instant;

use audit_event::{EventError, RejectReason};
use audit_store::retention::ErasedSubjects;
use audit_store::{AuditEventRow, EVENTS_TABLE};
use rdkafka::error::KafkaError;
use tracing::{debug, info_span, warn, Instrument};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::batch::{DeadLetter, EventBatch, SourcePosition};
use crate::dead_letter::DeadLetterProducer;
use crate::directory::{facts_of, BatchFacts, Directory, KnownValues};
use crate::duplicates::DuplicateWatch;
use crate::fence::{partition_stored, report_skipped, Claim, Fencing, Split};
use crate::kafka::PartitionKey;
use crate::metrics::IngestMetrics;
use crate::sink::{ClickHouseError, ClickHouseSink};
use crate::stored_events::StoredEventPublisher;

/// A flush that cannot complete: the service must stop without committing.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    #[error("cannot produce to the dead-letter topic: {0}")]
    DeadLetter(#[source] KafkaError),
    #[error("the directory projection could not be written: {0}")]
    Directory(#[source] ClickHouseError),
    #[error("cannot read or write what is stored already (the ingest's fences): {0}")]
    Fence(#[source] ClickHouseError),
    #[error("cannot produce to the stored-events topic: {0}")]
    StoredEvents(#[source] KafkaError),
}

/// What a completed flush made durable.
#[derive(Debug, Default)]
pub struct FlushedBatch {
    pub next_offsets: BTreeMap<PartitionKey, i64>,
    pub inserted: usize,
    pub dead_lettered: usize,
    /// Re-delivered events found stored already.
    pub skipped: usize,
}

pub struct Flusher {
    pub sink: ClickHouseSink,
    pub directory: Option<Directory>,
    pub dead_letters: DeadLetterProducer,
    pub metrics: IngestMetrics,
    pub fencing: Fencing,
    pub duplicates: std::sync::Arc<DuplicateWatch>,
    /// None: stored events are not published (`stored_events.enabled = false`).
    pub stored_events: Option<StoredEventPublisher>,
    /// Erased persons: their events are stored under pseudonyms (see [`Self::flush`]).
    pub erasures: ErasedSubjects,
}

/// What became of a flush's events.
#[derive(Default)]
struct Stored {
    inserted: Vec<AuditEventRow>,
    rejected: Vec<(AuditEventRow, ClickHouseError)>,
    /// Found stored already (re-delivered), not inserted again.
    skipped: Vec<AuditEventRow>,
    /// Of partitions revoked during the flush: left to their new owner.
    released: usize,
    /// Time spent on the fences: reading them, recording intents, looking rows up.
    fence_time: std::time::Duration,
}

/// Stamps the rows with the time they are stored.
fn stamp(rows: &mut [AuditEventRow]) {
    let ingested_at_ms = crate::now_ms();
    for row in rows {
        row.ingested_at_ms = ingested_at_ms;
    }
}

/// The dead letter of a row ClickHouse rejected: the row as it was to be stored stands in for
/// the original bytes, which are gone by now.
fn rejected_row((row, error): &(AuditEventRow, ClickHouseError)) -> DeadLetter {
    DeadLetter {
        key: Some(row.id.clone().into_bytes()),
        payload: serde_json::to_vec(row).ok(),
        headers: vec![("dlq.payload.form".to_owned(), Some(b"stored_row".to_vec()))],
        error: EventError::new(RejectReason::StorageRejected, error.to_string()),
        source: SourcePosition {
            topic: row.source_topic.clone(),
            partition: row.source_partition,
            offset: row.source_offset,
        },
    }
}

impl Flusher {
    /// Flushes `batch`. `claim`: the assignment of its partitions when the flush started (none
    /// for a replay); rows of partitions revoked since are left to the new owner.
    pub async fn flush(
        &self,
        batch: EventBatch,
        claim: Option<Claim>,
    ) -> Result<FlushedBatch, FlushError> {
        let span = info_span!(
            "ingest.flush",
            events = batch.events.len(),
            dead_letters = batch.dead_letters.len()
        );
        for context in &batch.trace_links {
            span.add_link(context.clone());
        }
        self.flush_inner(batch, claim.as_ref())
            .instrument(span)
            .await
    }

    /// The steps of a flush, in order; the offsets may be committed once all succeeded.
    async fn flush_inner(
        &self,
        batch: EventBatch,
        claim: Option<&Claim>,
    ) -> Result<FlushedBatch, FlushError> {
        let next_offsets = batch.next_offsets();
        let EventBatch {
            events: mut rows,
            mut dead_letters,
            ..
        } = batch;

        let started = Instant::now();
        let mut facts = self.enrich(&mut rows).await;
        // After the directory filled the rows (its cache may hold an erased person's email).
        self.erasures.apply_all(&mut rows);
        for fact in &mut facts.users {
            if let Some(email) =
                self.erasures
                    .email_of(&fact.organization_id, &fact.user_id, fact.occurred_at_ms)
            {
                fact.email = email;
            }
        }
        stamp(&mut rows);
        self.phase("directory_read", started);

        let bytes: usize = rows.iter().map(AuditEventRow::wire_size).sum();
        let started = Instant::now();
        let stored = self.store_events(rows, claim).await?;
        // The fences' own share (intents, fence reads, look-ups) apart from the insert's.
        self.observe_phase("fence", stored.fence_time);
        self.observe_phase(
            "insert",
            started.elapsed().saturating_sub(stored.fence_time),
        );
        self.duplicates.note(&stored.inserted);
        if stored.released > 0 {
            debug!(
                events = stored.released,
                "partitions revoked during the flush: their events are left to the new owner"
            );
        }
        dead_letters.extend(stored.rejected.iter().map(rejected_row));

        let started = Instant::now();
        if let Some(directory) = &self.directory {
            directory
                .store(&facts)
                .await
                .map_err(FlushError::Directory)?;
        }
        self.phase("directory_write", started);

        let started = Instant::now();
        if let Some(publisher) = &self.stored_events {
            // Rows found stored already are published again (their first publication may be
            // what a crash interrupted), with the new ones in source order.
            let mut rows: Vec<&AuditEventRow> =
                stored.inserted.iter().chain(&stored.skipped).collect();
            if !stored.skipped.is_empty() {
                rows.sort_by(|a, b| {
                    (&a.source_topic, a.source_partition, a.source_offset).cmp(&(
                        &b.source_topic,
                        b.source_partition,
                        b.source_offset,
                    ))
                });
            }
            publisher
                .publish_all(&rows)
                .await
                .map_err(FlushError::StoredEvents)?;
        }
        self.phase("stored_events", started);

        let started = Instant::now();
        self.dead_letters
            .send_all(&dead_letters)
            .await
            .map_err(FlushError::DeadLetter)?;
        self.phase("dead_letter", started);

        self.record(&stored.inserted, bytes);
        Ok(FlushedBatch {
            next_offsets,
            inserted: stored.inserted.len(),
            dead_lettered: dead_letters.len(),
            skipped: stored.skipped.len(),
        })
    }

    /// Fills the rows' missing actor and user fields from the directory (when it is on), and
    /// returns the batch's facts for the directory to store after the events.
    async fn enrich(&self, rows: &mut [AuditEventRow]) -> BatchFacts {
        let Some(directory) = &self.directory else {
            return BatchFacts::default();
        };
        let facts = directory.prepare(facts_of(rows.iter()));
        // After prepare (which compares with what the cache held before this batch).
        directory.observe(&facts);
        let known = self
            .sink
            .retry_transient("directory_read", || directory.resolve(rows))
            .await
            .unwrap_or_else(|err| {
                // A rejected read (not an outage) only costs the enrichment of this batch.
                warn!(error = %err, "directory read rejected; batch stored without enrichment");
                KnownValues::default()
            });
        for row in rows.iter_mut() {
            directory.fill(row, &known);
        }
        facts
    }

    /// The batch's size and the inserted rows per topic, and the newest event time seen.
    fn record(&self, inserted: &[AuditEventRow], bytes: usize) {
        self.metrics
            .batch_rows
            .with_label_values(&[] as &[&str])
            .observe(inserted.len() as f64);
        self.metrics
            .batch_bytes
            .with_label_values(&[] as &[&str])
            .observe(bytes as f64);
        let mut per_topic: BTreeMap<&str, u64> = BTreeMap::new();
        for row in inserted {
            *per_topic.entry(row.source_topic.as_str()).or_default() += 1;
        }
        for (topic, count) in per_topic {
            self.metrics
                .inserted
                .with_label_values(&[topic])
                .inc_by(count);
        }
        if let Some(ms) = inserted.iter().map(|row| row.occurred_at_ms).max() {
            let seconds = ms as f64 / 1000.0;
            if seconds > self.metrics.newest_occurred_at.get() {
                self.metrics.newest_occurred_at.set(seconds);
            }
        }
    }

    fn phase(&self, name: &str, since: Instant) {
        self.observe_phase(name, since.elapsed());
    }

    fn observe_phase(&self, name: &str, took: std::time::Duration) {
        self.metrics
            .flush_phase_seconds
            .with_label_values(&[name])
            .observe(took.as_secs_f64());
    }

    /// Stores `rows` exactly once: rows at or below their partition's fence are looked up and
    /// skipped if stored already, the intents of the rest are recorded, and they are inserted
    /// while the claim holds. If ClickHouse rejects the data, the rejected rows are found one
    /// by one (a rejected insert stored nothing).
    async fn store_events(
        &self,
        rows: Vec<AuditEventRow>,
        claim: Option<&Claim>,
    ) -> Result<Stored, FlushError> {
        let mut stored = Stored::default();
        let started = Instant::now();
        let Split { uncertain, fresh } = self
            .fencing
            .split(rows, claim)
            .await
            .map_err(FlushError::Fence)?;
        let mut rows = fresh;
        if !uncertain.is_empty() {
            rows.extend(self.skip_stored(uncertain, &mut stored).await?);
        }
        // Before the claim is checked: a member that takes a partition over after this check
        // reads these intents (see crate::fence).
        self.fencing
            .write_intents(&rows)
            .await
            .map_err(FlushError::Fence)?;
        stored.fence_time += started.elapsed();
        match self.insert_fenced(rows, claim, &mut stored).await? {
            Ok(()) => {}
            Err((rows, err)) => {
                warn!(rows = rows.len(), error = %err, "batch rejected, inserting rows one by one");
                for row in rows {
                    if let Err((mut row, err)) =
                        self.insert_fenced(vec![row], claim, &mut stored).await?
                    {
                        stored.rejected.extend(row.pop().map(|row| (row, err)));
                    }
                }
            }
        }
        Ok(stored)
    }

    /// Inserts `rows` (their intents recorded) until ClickHouse acknowledges them or rejects
    /// the data (then returns them with the reason). Before every attempt the rows of
    /// partitions no longer held are dropped; after a failed attempt, which may have landed in
    /// whole or in part, the rows stored meanwhile are looked up and not inserted again.
    async fn insert_fenced(
        &self,
        mut rows: Vec<AuditEventRow>,
        claim: Option<&Claim>,
        stored: &mut Stored,
    ) -> Result<Result<(), (Vec<AuditEventRow>, ClickHouseError)>, FlushError> {
        let mut delays = backon::BackoffBuilder::build(self.sink.retry().backoff());
        loop {
            if let Some(claim) = claim {
                let before = rows.len();
                rows.retain(|row| claim.holds(&(row.source_topic.clone(), row.source_partition)));
                stored.released += before - rows.len();
            }
            if rows.is_empty() {
                return Ok(Ok(()));
            }
            match self.sink.insert_once(EVENTS_TABLE, &rows).await {
                Ok(()) => {
                    // The whole batch, most of the time: no second buffer of it.
                    if stored.inserted.is_empty() {
                        stored.inserted = rows;
                    } else {
                        stored.inserted.append(&mut rows);
                    }
                    return Ok(Ok(()));
                }
                Err(err) if !err.is_transient() => return Ok(Err((rows, err))),
                Err(err) => {
                    let delay = delays.next().unwrap_or(std::time::Duration::from_secs(1));
                    self.sink.retry().note("clickhouse_insert", &err, delay);
                    tokio::time::sleep(delay).await;
                    let started = Instant::now();
                    rows = self.skip_stored(rows, stored).await?;
                    stored.fence_time += started.elapsed();
                }
            }
        }
    }

    /// The rows of `rows` not stored yet; the others are counted as skipped, and any copy table
    /// that lacks them is filled.
    async fn skip_stored(
        &self,
        rows: Vec<AuditEventRow>,
        stored: &mut Stored,
    ) -> Result<Vec<AuditEventRow>, FlushError> {
        let found = self
            .sink
            .retry_transient("fence_lookup", || self.fencing.stored(&rows))
            .await
            .map_err(FlushError::Fence)?;
        let looked_up = rows.len();
        let (insert, skip) = partition_stored(rows, &found);
        if !skip.is_empty() {
            self.sink
                .retry_transient("fence_lookup", || self.fencing.fill_copies(&skip))
                .await
                .map_err(FlushError::Fence)?;
            self.metrics.already_stored.inc_by(skip.len() as u64);
            report_skipped(skip.len(), looked_up);
            stored.skipped.extend(skip);
        }
        Ok(insert)
    }
}
