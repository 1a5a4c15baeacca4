//! The consume loop: Kafka -> decode -> batch -> flush -> commit. When to flush, stop taking
//! messages, pause and resume is decided by [`crate::flow::FlowControl`]; after every rebalance
//! the loop's pause state is applied to the new assignment. Offsets are committed only after
//! their flush, in order, so a committed offset never passes an event ClickHouse has not
//! acknowledged.
//!
//! Longer than most modules: the loop, its commits and its orderly or failed shutdown share its
//! state; the decisions that need none of it are in `flow`, `offsets` and `invalid_ratio`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::batch::{decode, trace_context, Decoded, EventBatch};
use crate::config::{BatchConfig, DeadLetterConfig};
use crate::fence::Claim;
use crate::flow::FlowControl;
use crate::flush::{FlushError, FlushedBatch, Flusher};
use crate::invalid_ratio::{InvalidRatioGuard, TooManyInvalid};
use crate::kafka::{IngestConsumer, PartitionKey};
use crate::liveness::LivenessState;
use crate::metrics::IngestMetrics;
use crate::offsets::{DurableOffsets, COMMIT_RETRY_EVERY};

/// Why the consume loop stopped other than by a shutdown request.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    InvalidRatio(#[from] TooManyInvalid),
    #[error(transparent)]
    Flush(#[from] FlushError),
    #[error("a flush task failed: {0}")]
    FlushTask(#[from] tokio::task::JoinError),
    #[error("cannot subscribe to {topics:?}: {source}")]
    Subscribe {
        topics: Vec<String>,
        #[source]
        source: rdkafka::error::KafkaError,
    },
}

pub struct Pipeline {
    pub consumer: Arc<IngestConsumer>,
    pub flusher: Arc<Flusher>,
    pub metrics: IngestMetrics,
    pub batch: BatchConfig,
    pub dead_letter: DeadLetterConfig,
    pub topics: Vec<String>,
    pub shutdown_timeout: Duration,
    /// Set while shutting down: commits become synchronous.
    pub final_commit: std::sync::atomic::AtomicBool,
    /// Told whether the loop holds uncommitted messages, for the liveness watchdog.
    pub liveness: Arc<LivenessState>,
}

type InFlight = JoinHandle<Result<FlushedBatch, FlushError>>;

/// How long leaving the group may take at shutdown.
const LEAVE_WITHIN: Duration = Duration::from_secs(2);

/// How long a full batch waits for the flush ahead of it before the partitions are paused.
const PAUSE_AFTER: Duration = Duration::from_secs(5);

impl Pipeline {
    /// Consumes until `shutdown` is cancelled (then flushes, commits and leaves the group) or a
    /// fatal error occurs (then stops without committing what is not durable).
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), PipelineError> {
        let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        self.consumer
            .subscribe(&topics)
            .map_err(|source| PipelineError::Subscribe {
                topics: self.topics.clone(),
                source,
            })?;
        info!(topics = ?self.topics, "consuming");

        let mut batch = EventBatch::default();
        // Flushes under way, oldest first; committed strictly in this order.
        let mut in_flight: VecDeque<InFlight> = VecDeque::new();
        let mut flow = FlowControl::new(self.batch.max_in_flight, PAUSE_AFTER);
        let mut rebalances_seen = 0;
        let mut durable = DurableOffsets::default();
        let mut guard = InvalidRatioGuard::new(&self.dead_letter);
        let max_age = self.batch.max_age();

        let outcome = loop {
            self.after_rebalance(
                &mut batch,
                &mut durable,
                &mut rebalances_seen,
                flow.paused(),
            );
            self.retry_failed_commit(&mut durable);
            self.liveness
                .set_holding(!batch.is_empty() || !in_flight.is_empty());

            let turn = flow.turn(Instant::now(), batch.state(&self.batch), in_flight.len());
            if turn.start_flush {
                in_flight.push_back(self.start_flush(std::mem::take(&mut batch)));
            }
            if let Some(blocked) = turn.unblocked_after {
                self.metrics
                    .backpressure_seconds
                    .inc_by(blocked.as_secs_f64());
            }
            if turn.resume {
                self.set_paused(false);
            }
            let deadline = batch
                .deadline(max_age)
                .map(Instant::from_std)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));

            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Ok(()),
                joined = async { in_flight.front_mut().expect("guarded by if").await }, if !in_flight.is_empty() => {
                    in_flight.pop_front();
                    match joined {
                        Ok(Ok(flushed)) => {
                            durable.record(&flushed.next_offsets);
                            self.commit(&flushed);
                        }
                        Ok(Err(err)) => break Err(PipelineError::Flush(err)),
                        Err(err) => break Err(PipelineError::FlushTask(err)),
                    }
                }
                _ = async { tokio::time::sleep_until(turn.pause_at.expect("guarded by if")).await }, if turn.pause_at.is_some() => {
                    self.set_paused(true);
                    flow.pause();
                }
                received = self.consumer.recv(), if turn.take_messages => match received {
                    Ok(message) => {
                        self.after_rebalance(&mut batch, &mut durable, &mut rebalances_seen, flow.paused());
                        if let Err(err) = self.accept(&message, &mut batch, &mut guard) {
                            break Err(err);
                        }
                        drop(message);
                        // Take what is already buffered without going round the select (and its
                        // timer) once per message.
                        let mut outcome = Ok(());
                        while !flow.paused() && !batch.is_full(self.batch.max_rows, self.batch.max_bytes) {
                            let Some(next) = self.consumer.recv().now_or_never() else { break };
                            match next {
                                Ok(message) => {
                                    self.after_rebalance(&mut batch, &mut durable, &mut rebalances_seen, flow.paused());
                                    outcome = self.accept(&message, &mut batch, &mut guard);
                                    if outcome.is_err() {
                                        break;
                                    }
                                }
                                Err(err) => {
                                    self.consumer_error(&err);
                                    break;
                                }
                            }
                        }
                        if let Err(err) = outcome {
                            break Err(err);
                        }
                    }
                    Err(err) => self.consumer_error(&err),
                },
                // While offsets could need committing again, look at least every second
                // whether a commit failed (the loop may otherwise sleep in recv()).
                _ = tokio::time::sleep(COMMIT_RETRY_EVERY), if durable.watching() => {}
                // Only while a flush could start (see `Turn::flush_slot_free`): the flush's
                // completion wakes the loop otherwise.
                _ = tokio::time::sleep_until(deadline), if !batch.is_empty() && turn.flush_slot_free => {}
            }
        };

        match outcome {
            Ok(()) => {
                info!(
                    buffered = batch.len(),
                    "shutting down: flushing and committing"
                );
                let drain = self.drain(in_flight, batch);
                match tokio::time::timeout(self.shutdown_timeout, drain).await {
                    Ok(Ok(())) => info!("final batch committed"),
                    Ok(Err(err)) => {
                        error!(error = %err, "final flush failed; uncommitted events will be re-delivered")
                    }
                    Err(_) => {
                        warn!("final flush timed out; uncommitted events will be re-delivered")
                    }
                }
                self.leave_group().await;
                Ok(())
            }
            Err(err) => {
                // Let a flush already under way finish: what it stored gets committed.
                self.final_commit
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                // In order, and only while each succeeds: a later commit must not pass a
                // failed flush.
                for handle in in_flight {
                    match tokio::time::timeout(self.shutdown_timeout, handle).await {
                        Ok(Ok(Ok(flushed))) => self.commit(&flushed),
                        _ => break,
                    }
                }
                self.leave_group().await;
                Err(err)
            }
        }
    }

    async fn drain(
        &self,
        in_flight: VecDeque<InFlight>,
        batch: EventBatch,
    ) -> Result<(), PipelineError> {
        self.final_commit
            .store(true, std::sync::atomic::Ordering::Relaxed);
        for handle in in_flight {
            let flushed = handle.await??;
            self.commit(&flushed);
        }
        let mut batch = batch;
        self.forget_revoked(&mut batch);
        if !batch.is_empty() {
            let claim = self.claim(&batch);
            let flushed = self.flusher.flush(batch, Some(claim)).await?;
            self.commit(&flushed);
        }
        Ok(())
    }

    /// Leaves the consumer group, so that the partitions move to the other replicas at once. A
    /// static member (`kafka.instance_id`) sends no LeaveGroup when its consumer is closed, by
    /// design (KIP-345: a crashed replica that comes back keeps its partitions), but it does
    /// when it unsubscribes and its partitions are given up, which takes polling. Without
    /// this, a replica stopped for good (a scale-down) held its partitions for a whole session
    /// timeout, and every rebalance meanwhile waited for it, failing the others' commits.
    async fn leave_group(&self) {
        self.consumer.unsubscribe();
        let deadline = Instant::now() + LEAVE_WITHIN;
        while self.consumer.context().has_assignment() && Instant::now() < deadline {
            // Serves the revocation; a message received now is not committed and is read
            // again by the partition's next owner.
            let _ = tokio::time::timeout(Duration::from_millis(100), self.consumer.recv()).await;
        }
        // The LeaveGroup request goes out once the partitions are given up.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    /// Decodes one message into the batch. The rebalance callbacks run inside `recv()`, so the
    /// caller forgets revoked partitions before calling this with a message of the new assignment.
    /// A consumer error. One that says a record batch cannot be decoded (a compression codec
    /// this build lacks, a corrupt batch) stops its partition at that batch: librdkafka retries
    /// it at every fetch and never skips it. It is counted, logged at `error` and handed to the
    /// watchdog, which finds the partition and makes `/readyz` name it.
    fn consumer_error(&self, err: &KafkaError) {
        if is_undecodable(err) {
            self.metrics.undecodable_batches.inc();
            if self.liveness.note_undecodable(err.to_string()) {
                error!(
                    error = %err,
                    "kafka record batch cannot be decoded; its partition stops there (nothing behind it is skipped) and /readyz will name it"
                );
            }
        } else {
            warn!(error = %err, "kafka consumer error");
        }
    }

    fn accept(
        &self,
        message: &BorrowedMessage<'_>,
        batch: &mut EventBatch,
        guard: &mut InvalidRatioGuard,
    ) -> Result<(), PipelineError> {
        self.metrics
            .consumed
            .with_label_values(&[message.topic()])
            .inc();
        let size = message.payload_len();
        let trace = trace_context(message);
        let decoded = decode(message);
        if let Decoded::Invalid(letter) = &decoded {
            debug!(
                topic = letter.source.topic,
                partition = letter.source.partition,
                offset = letter.source.offset,
                reason = %letter.error.reason,
                "invalid message"
            );
        }
        guard.record(matches!(decoded, Decoded::Event(_)))?;
        batch.push(decoded, size, trace);
        Ok(())
    }

    /// After a rebalance (`seen` is the count of rebalances handled): drops the batch's messages
    /// of revoked partitions and, while the loop holds its partitions paused, pauses the new
    /// assignment too. The assign callback resumes every partition it is given
    /// (`IngestContext::post_rebalance`): a pause must never outlive the loop's own `paused`
    /// state, which is what stalled partitions for good before.
    fn after_rebalance(
        &self,
        batch: &mut EventBatch,
        durable: &mut DurableOffsets,
        seen: &mut u64,
        paused: bool,
    ) {
        let rebalances = self.consumer.context().rebalances();
        if rebalances == *seen {
            return;
        }
        *seen = rebalances;
        durable.forget(&self.forget_revoked(batch));
        if paused {
            self.set_paused(true);
        }
    }

    /// Drops the batch's messages of partitions revoked since the last call, and returns those
    /// partitions. Their new owner reads the messages again from the last committed offset.
    fn forget_revoked(&self, batch: &mut EventBatch) -> BTreeSet<PartitionKey> {
        let revoked = self.consumer.context().take_revoked();
        if !revoked.is_empty() {
            let dropped = batch.drop_partitions(&revoked);
            info!(
                partitions = revoked.len(),
                dropped, "forgot revoked partitions"
            );
        }
        revoked
    }

    fn start_flush(&self, batch: EventBatch) -> InFlight {
        let flusher = Arc::clone(&self.flusher);
        let claim = self.claim(&batch);
        tokio::spawn(async move { flusher.flush(batch, Some(claim)).await })
    }

    /// The batch's partitions in the assignment they belong to now.
    fn claim(&self, batch: &EventBatch) -> Claim {
        let partitions = batch.next_offsets().into_keys().collect();
        Claim::new(Arc::clone(self.consumer.context()), &partitions)
    }

    fn set_paused(&self, pause: bool) {
        let assignment = match self.consumer.assignment() {
            Ok(assignment) => assignment,
            Err(err) => {
                warn!(error = %err, "cannot read the assignment to pause or resume");
                return;
            }
        };
        let result = if pause {
            self.consumer.pause(&assignment)
        } else {
            self.consumer.resume(&assignment)
        };
        match result {
            Ok(()) => info!(
                pause,
                partitions = assignment.count(),
                "back-pressure: partitions paused or resumed"
            ),
            Err(err) => warn!(error = %err, pause, "cannot pause or resume partitions"),
        }
    }

    /// Commits the offsets a flush made durable, for the partitions this member still owns (a
    /// partition revoked while its flush ran belongs to another member now, whose commits must
    /// not be moved back). A failed commit only means re-delivery (the events are stored and
    /// de-duplicated), so it is logged, not fatal.
    fn commit(&self, flushed: &FlushedBatch) {
        if self.commit_offsets(&flushed.next_offsets) {
            debug!(
                partitions = flushed.next_offsets.len(),
                inserted = flushed.inserted,
                dead_lettered = flushed.dead_lettered,
                "batch committed"
            );
        }
    }

    /// Commits `next_offsets` of the partitions still owned; true if a commit was queued (or,
    /// at shutdown, done).
    fn commit_offsets(&self, next_offsets: &BTreeMap<PartitionKey, i64>) -> bool {
        let owned = self.consumer.context().owned(next_offsets);
        if owned.len() < next_offsets.len() {
            debug!(
                partitions = next_offsets.len() - owned.len(),
                "not committing partitions revoked during their flush"
            );
        }
        let next_offsets = owned;
        if next_offsets.is_empty() {
            return false;
        }
        let mut offsets = TopicPartitionList::new();
        for ((topic, partition), next) in &next_offsets {
            if let Err(err) =
                offsets.add_partition_offset(topic, *partition, Offset::Offset(**next))
            {
                warn!(topic, partition, error = %err, "cannot build offset list");
            }
        }
        // Async: the commit is queued in order behind earlier ones and the loop goes on; the
        // final commit at shutdown is synchronous (see `drain`).
        let mode = if self.final_commit.load(std::sync::atomic::Ordering::Relaxed) {
            CommitMode::Sync
        } else {
            CommitMode::Async
        };
        match self.consumer.commit(&offsets, mode) {
            Ok(()) => {
                for ((topic, partition), next) in &next_offsets {
                    self.metrics
                        .committed_offset
                        .with_label_values(&[topic.as_str(), &partition.to_string()])
                        .set(**next);
                }
                true
            }
            Err(err) => {
                self.metrics
                    .retries
                    .with_label_values(&["offset_commit"])
                    .inc();
                warn!(error = %err, "offset commit failed; the batch will be re-delivered and de-duplicated");
                false
            }
        }
    }

    /// Commits again what this member made durable if an asynchronous commit failed since the
    /// last call (librdkafka reports it through the commit callback).
    fn retry_failed_commit(&self, durable: &mut DurableOffsets) {
        let failed = self.consumer.context().take_commit_failed();
        if let Some(next_offsets) = durable.due(failed, Instant::now()) {
            self.metrics
                .retries
                .with_label_values(&["offset_commit"])
                .inc();
            if self.commit_offsets(next_offsets) {
                debug!(
                    partitions = next_offsets.len(),
                    "failed offset commit retried"
                );
            }
        }
    }
}

/// Whether a consumer error means that a fetched record batch cannot be decoded.
fn is_undecodable(err: &KafkaError) -> bool {
    matches!(
        err,
        KafkaError::MessageConsumption(code) | KafkaError::MessageConsumptionFatal(code)
            if matches!(
                code,
                RDKafkaErrorCode::BadCompression
                    | RDKafkaErrorCode::NotImplemented
                    | RDKafkaErrorCode::BadMessage
                    | RDKafkaErrorCode::InvalidMessage
                    | RDKafkaErrorCode::UnsupportedCompressionType
                    | RDKafkaErrorCode::InvalidRecord
            )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding_failures_are_told_apart_from_other_consumer_errors() {
        for code in [
            RDKafkaErrorCode::BadCompression,
            RDKafkaErrorCode::NotImplemented,
            RDKafkaErrorCode::InvalidRecord,
        ] {
            assert!(is_undecodable(&KafkaError::MessageConsumption(code)));
        }
        for code in [
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::Authentication,
            RDKafkaErrorCode::UnknownTopicOrPartition,
        ] {
            assert!(!is_undecodable(&KafkaError::MessageConsumption(code)));
        }
    }
}
