//! Prometheus metrics of the ingest service, registered once and served on `/metrics`.

use prometheus::{
    exponential_buckets, Counter, Gauge, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
};

/// The `operation` label values of `audit_ingest_retries_total`.
pub const RETRIED_OPERATIONS: [&str; 7] = [
    "clickhouse_insert",
    "fence_read",
    "fence_write",
    "fence_lookup",
    "directory_read",
    "dead_letter_produce",
    "offset_commit",
];

/// Every metric `audit-ingest` exports. Cheap to clone (handles are reference-counted).
#[derive(Clone)]
pub struct IngestMetrics {
    registry: Registry,
    pub consumed: IntCounterVec,
    pub inserted: IntCounterVec,
    pub dead_lettered: IntCounterVec,
    pub batch_rows: HistogramVec,
    pub batch_bytes: HistogramVec,
    pub insert_seconds: HistogramVec,
    pub flush_phase_seconds: HistogramVec,
    pub backpressure_seconds: Counter,
    pub retries: IntCounterVec,
    pub consumer_lag: IntGaugeVec,
    pub committed_offset: IntGaugeVec,
    pub newest_occurred_at: Gauge,
    pub enriched: IntCounterVec,
    pub last_progress: Gauge,
    pub stalled: prometheus::IntGauge,
    pub already_stored: prometheus::IntCounter,
    pub stored_published: prometheus::IntCounter,
    pub duplicates_found: prometheus::IntCounter,
    pub duplicate_collapses: prometheus::IntCounter,
    pub duplicate_check_seconds: HistogramVec,
    pub undecodable_batches: prometheus::IntCounter,
    pub blocked_partitions: prometheus::IntGauge,
}

impl IngestMetrics {
    pub fn new() -> Self {
        use audit_runtime::metrics::{counter_vec, histogram_vec, register};
        let registry = Registry::new();
        let counter =
            |name: &str, help: &str, labels: &[&str]| counter_vec(&registry, name, help, labels);
        let consumed = counter(
            "audit_ingest_events_consumed_total",
            "Kafka messages received, valid or not.",
            &["topic"],
        );
        let inserted = counter(
            "audit_ingest_events_inserted_total",
            "Events acknowledged by ClickHouse.",
            &["topic"],
        );
        let dead_lettered = counter(
            "audit_ingest_events_dead_lettered_total",
            "Messages produced to the dead-letter topic, by reason.",
            &["topic", "reason"],
        );
        let retries = counter(
            "audit_ingest_retries_total",
            "Retried operations after a transient failure.",
            &["operation"],
        );
        let enriched = counter(
            "audit_ingest_enriched_fields_total",
            "Missing fields filled from the directory projection.",
            &["field"],
        );
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            histogram_vec(&registry, name, help, &[], buckets)
        };
        let batch_rows = histogram(
            "audit_ingest_batch_rows",
            "Events per ClickHouse insert.",
            exponential_buckets(1.0, 4.0, 9).expect("valid buckets"),
        );
        let batch_bytes = histogram(
            "audit_ingest_batch_bytes",
            "Bytes per ClickHouse insert.",
            exponential_buckets(1024.0, 4.0, 9).expect("valid buckets"),
        );
        let insert_seconds = histogram(
            "audit_ingest_insert_duration_seconds",
            "Time of one ClickHouse insert, retries excluded.",
            exponential_buckets(0.002, 2.0, 12).expect("valid buckets"),
        );
        let flush_phase_seconds = histogram_vec(
            &registry,
            "audit_ingest_flush_phase_seconds",
            "Time of each phase of a flush, retries included.",
            &["phase"],
            exponential_buckets(0.001, 2.0, 14).expect("valid buckets"),
        );
        let duplicate_check_seconds = histogram(
            "audit_ingest_duplicate_check_seconds",
            "Time of one duplicate check over the key ranges inserted since the last.",
            exponential_buckets(0.001, 2.0, 14).expect("valid buckets"),
        );
        let backpressure_seconds = register(
            &registry,
            Counter::with_opts(Opts::new(
                "audit_ingest_backpressure_seconds_total",
                "Time the consumer waited with a full batch for the flush ahead of it.",
            ))
            .expect("valid metric"),
        );
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            register(
                &registry,
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let consumer_lag = gauge(
            "audit_ingest_consumer_lag",
            "Messages behind the partition's high watermark, as librdkafka reports it.",
            &["topic", "partition"],
        );
        let committed_offset = gauge(
            "audit_ingest_committed_offset",
            "Last offset committed for the partition (next offset to read).",
            &["topic", "partition"],
        );
        let newest_occurred_at = register(
            &registry,
            Gauge::with_opts(Opts::new(
                "audit_ingest_newest_occurred_at_seconds",
                "occurredAt (Unix seconds) of the newest event inserted.",
            ))
            .expect("valid metric"),
        );
        let last_progress = register(
            &registry,
            Gauge::with_opts(Opts::new(
                "audit_ingest_last_progress_timestamp_seconds",
                "Unix time up to which every assigned partition made progress (offset committed \
                 or caught up, checked every liveness.check_interval_ms); current while idle.",
            ))
            .expect("valid metric"),
        );
        let stalled = register(
            &registry,
            prometheus::IntGauge::with_opts(Opts::new(
                "audit_ingest_stalled",
                "1 while partitions with lag have made no progress for liveness.stall_after_ms \
                 (then /healthz fails), else 0.",
            ))
            .expect("valid metric"),
        );
        let int_counter = |name: &str, help: &str| {
            register(
                &registry,
                prometheus::IntCounter::with_opts(Opts::new(name, help)).expect("valid metric"),
            )
        };
        let already_stored = int_counter(
            "audit_ingest_events_already_stored_total",
            "Re-delivered events (after a crash, a rebalance, a failed insert attempt or a \
             replay) found stored already and not inserted again.",
        );
        let stored_published = int_counter(
            "audit_ingest_stored_events_published_total",
            "Stored events published to the stored-events topic (what log streams deliver).",
        );
        let duplicates_found = int_counter(
            "audit_ingest_duplicate_rows_found_total",
            "Surplus rows of events stored more than once, found by the check after insert \
             (upstream duplicates, mostly); their months are collapsed.",
        );
        let duplicate_collapses = int_counter(
            "audit_ingest_duplicate_collapses_total",
            "Months merged into one row per event after copies were found.",
        );
        let undecodable_batches = int_counter(
            "audit_ingest_undecodable_batch_errors_total",
            "Times the consumer could not decode a record batch (unknown or failing compression \
             codec, corrupt batch). The partition stops at that batch; see \
             audit_ingest_blocked_partitions.",
        );
        let blocked_partitions = register(
            &registry,
            prometheus::IntGauge::with_opts(Opts::new(
                "audit_ingest_blocked_partitions",
                "Assigned partitions stopped at a record batch the consumer cannot decode (then \
                 /readyz fails and names them); nothing behind such a batch is skipped.",
            ))
            .expect("valid metric"),
        );
        // Every retried operation starts at 0, so that dashboards and alerts see the series
        // before the first failure.
        for operation in RETRIED_OPERATIONS {
            retries.with_label_values(&[operation]);
        }
        Self {
            registry,
            consumed,
            inserted,
            dead_lettered,
            batch_rows,
            batch_bytes,
            insert_seconds,
            flush_phase_seconds,
            backpressure_seconds,
            retries,
            consumer_lag,
            committed_offset,
            newest_occurred_at,
            enriched,
            last_progress,
            stalled,
            already_stored,
            stored_published,
            duplicates_found,
            duplicate_collapses,
            duplicate_check_seconds,
            undecodable_batches,
            blocked_partitions,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        audit_runtime::metrics::render(&self.registry)
    }
}

impl Default for IngestMetrics {
    fn default() -> Self {
        Self::new()
    }
}
