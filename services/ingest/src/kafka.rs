//! Kafka clients of the ingest service: the consumer with its rebalance/statistics context, the
//! dead-letter producer, and helpers for message headers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use audit_runtime::kafka::LoggingContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::producer::FutureProducer;
use rdkafka::statistics::Statistics;
use rdkafka::ClientContext;
use tracing::{info, warn};

use crate::config::KafkaConfig;
use crate::locked;
use crate::metrics::IngestMetrics;

/// A topic partition, the unit of ordering and of offset commits.
pub type PartitionKey = (String, i32);

/// Observes the group protocol on behalf of the pipeline and the liveness watchdog: which
/// partitions were revoked since the loop last looked, how many rebalances happened, which
/// partitions are assigned since when, whether the group was joined, and the lag figures
/// librdkafka reports.
pub struct IngestContext {
    metrics: IngestMetrics,
    joined: AtomicBool,
    /// Incremented after every assignment or revocation, so that the per-message check needs no
    /// lock when nothing changed.
    rebalances: AtomicU64,
    revoked: Mutex<BTreeSet<PartitionKey>>,
    assigned: Mutex<BTreeMap<PartitionKey, Instant>>,
    /// Set when librdkafka reports a failed offset commit; the loop commits again.
    commit_failed: AtomicBool,
}

impl IngestContext {
    pub fn new(metrics: IngestMetrics) -> Self {
        Self {
            metrics,
            joined: AtomicBool::new(false),
            rebalances: AtomicU64::new(0),
            revoked: Mutex::new(BTreeSet::new()),
            assigned: Mutex::new(BTreeMap::new()),
            commit_failed: AtomicBool::new(false),
        }
    }

    /// True once a rebalance has assigned this member (possibly zero partitions).
    pub fn joined(&self) -> bool {
        self.joined.load(Ordering::Relaxed)
    }

    /// How many assignments and revocations this member has seen.
    pub fn rebalances(&self) -> u64 {
        self.rebalances.load(Ordering::Acquire)
    }

    /// Partitions revoked since the last call.
    pub fn take_revoked(&self) -> BTreeSet<PartitionKey> {
        std::mem::take(&mut *locked(&self.revoked))
    }

    /// Whether an offset commit failed since the last call.
    pub fn take_commit_failed(&self) -> bool {
        self.commit_failed.swap(false, Ordering::AcqRel)
    }

    /// The entries of `offsets` whose partitions are assigned to this member.
    pub fn owned<'a>(
        &self,
        offsets: &'a BTreeMap<PartitionKey, i64>,
    ) -> Vec<(&'a PartitionKey, &'a i64)> {
        let assigned = locked(&self.assigned);
        offsets
            .iter()
            .filter(|(key, _)| assigned.contains_key(*key))
            .collect()
    }

    /// When each of `partitions` assigned to this member was given to it (the assignment it
    /// belongs to: a partition revoked and assigned again gets a new time).
    pub fn assigned_since(
        &self,
        partitions: &BTreeSet<PartitionKey>,
    ) -> BTreeMap<PartitionKey, Instant> {
        let assigned = locked(&self.assigned);
        partitions
            .iter()
            .filter_map(|key| Some((key.clone(), *assigned.get(key)?)))
            .collect()
    }

    /// When `partition` was given to this member, if it is assigned.
    pub fn assigned_at(&self, partition: &PartitionKey) -> Option<Instant> {
        locked(&self.assigned).get(partition).copied()
    }

    /// Whether any partition is assigned to this member.
    pub fn has_assignment(&self) -> bool {
        !locked(&self.assigned).is_empty()
    }

    /// The partitions assigned to this member, each with the time it was given them.
    pub fn assigned(&self) -> Vec<(PartitionKey, Instant)> {
        locked(&self.assigned)
            .iter()
            .map(|(key, at)| (key.clone(), *at))
            .collect()
    }
}

fn keys(partitions: &rdkafka::TopicPartitionList) -> Vec<PartitionKey> {
    partitions
        .elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

impl ClientContext for IngestContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        audit_runtime::kafka::forward_log(level, fac, log_message);
    }

    fn stats(&self, statistics: Statistics) {
        for (topic, stats) in &statistics.topics {
            for (partition, p) in &stats.partitions {
                if *partition < 0 || !p.desired || p.committed_offset < 0 || p.hi_offset < 0 {
                    continue;
                }
                self.metrics
                    .consumer_lag
                    .with_label_values(&[topic.as_str(), &partition.to_string()])
                    .set(p.consumer_lag.max(0));
            }
        }
    }
}

impl ConsumerContext for IngestContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(partitions) => {
                let revoked = keys(partitions);
                info!(partitions = revoked.len(), "partitions revoked");
                let mut assigned = locked(&self.assigned);
                for key in &revoked {
                    assigned.remove(key);
                    let _ = self
                        .metrics
                        .consumer_lag
                        .remove_label_values(&[key.0.as_str(), &key.1.to_string()]);
                }
                drop(assigned);
                locked(&self.revoked).extend(revoked);
                self.rebalances.fetch_add(1, Ordering::AcqRel);
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(err) => warn!(error = %err, "rebalance error"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &rdkafka::TopicPartitionList) {
        let failed = result.is_err() || offsets.elements().iter().any(|e| e.error().is_err());
        if failed {
            self.commit_failed.store(true, Ordering::Release);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(partitions) = rebalance {
            // Every partition this member is given starts fetching. librdkafka keeps the
            // application's pause flag of a partition across revoke and re-assign (on removal
            // it resets only its own LIB_PAUSE flag: rdkafka_assignment.c), so a partition the
            // loop paused for back-pressure before a rebalance came back paused and was never
            // fetched again, while the loop believed the new assignment started unpaused: the
            // stall of issue 13. The loop pauses the new assignment again if it still waits
            // for a flush (Pipeline::after_rebalance).
            if let Err(err) = consumer.resume(partitions) {
                warn!(error = %err, "cannot resume newly assigned partitions");
            }
            let now = Instant::now();
            locked(&self.assigned).extend(keys(partitions).into_iter().map(|key| (key, now)));
            info!(partitions = partitions.count(), "partitions assigned");
            self.joined.store(true, Ordering::Relaxed);
            self.rebalances.fetch_add(1, Ordering::AcqRel);
        }
    }
}

pub type IngestConsumer = StreamConsumer<IngestContext>;

/// A client configuration of `config` (see [`audit_runtime::kafka::client_config`]).
fn client_config(
    config: &KafkaConfig,
    defaults: &[(&str, &str)],
    managed: &[(&str, &str)],
) -> ClientConfig {
    audit_runtime::kafka::client_config(&config.connection(), defaults, managed)
}

/// How a consumer takes part in its group.
pub enum Membership<'a> {
    /// The service's consumer: subscribes with the configured assignor, session timeout and,
    /// when set, its static `group.instance.id`.
    Group(&'a KafkaConfig),
    /// Assigns partitions itself (replay): a throwaway group, never joined.
    Standalone,
}

/// The group consumer: offsets are committed by the pipeline only, after ClickHouse acknowledged.
pub fn consumer(
    config: &KafkaConfig,
    group_id: &str,
    membership: Membership<'_>,
    context: IngestContext,
) -> KafkaResult<IngestConsumer> {
    let mut client = client_config(
        config,
        &[
            ("auto.offset.reset", "earliest"),
            ("enable.partition.eof", "false"),
            ("statistics.interval.ms", "5000"),
            ("heartbeat.interval.ms", "1000"),
            // Small prefetch, refilled often. librdkafka keeps a whole decompressed producer
            // batch alive while any of its messages waits in the queue, and one fetch response
            // lands in the queue in full before the thresholds are checked, so the fetch sizes
            // bound memory as much as the queue thresholds do. With the default 1 s back-off
            // once the queue is full, a small queue would run dry between fetches; at 5 ms it
            // does not. Measured on 1M backlogged events (18 partitions or 3): peak RSS 96-99 MB
            // instead of 207-234 MB with 16 MiB fetches, and 25-30% faster.
            ("queued.max.messages.kbytes", "4096"),
            ("queued.min.messages", "5000"),
            ("fetch.queue.backoff.ms", "5"),
            ("fetch.max.bytes", "2097152"),
            ("fetch.message.max.bytes", "524288"),
        ],
        &[
            ("group.id", group_id),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("isolation.level", "read_committed"),
        ],
    );
    if let Membership::Group(group) = membership {
        client.set("session.timeout.ms", group.session_timeout_ms().to_string());
        client.set("partition.assignment.strategy", &group.assignor);
        if let Some(id) = &group.instance_id {
            client.set("group.instance.id", id);
        }
    }
    client.create_with_context(context)
}

/// The dead-letter producer: idempotent, every write acknowledged by all in-sync replicas.
pub fn producer(config: &KafkaConfig) -> KafkaResult<DeadLetterClient> {
    audit_runtime::kafka::idempotent_producer(
        &config.connection(),
        &[("message.max.bytes", "4194304"), ("linger.ms", "5")],
    )
}

/// How long the start-up probe waits for brokers that do not answer before starting anyway.
const PROBE_WAIT: Duration = Duration::from_secs(10);

/// Fails, naming the cause, when the brokers refuse the TLS or SASL settings (a wrong CA, a
/// wrong password), instead of reconnecting forever. The consumer and the dead-letter producer
/// share the settings, so one probe covers both.
pub async fn probe(config: &KafkaConfig) -> Result<(), audit_runtime::kafka::ProbeError> {
    let config = config.clone();
    tokio::task::spawn_blocking(move || {
        audit_runtime::kafka::probe(&config.connection(), PROBE_WAIT)
    })
    .await
    .unwrap_or(Ok(()))
}

/// The dead-letter producer's type.
pub type DeadLetterClient = FutureProducer<LoggingContext>;
