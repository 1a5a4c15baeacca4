//! Prometheus metrics of the read service, registered once and served on `/metrics`.

use std::time::Instant;

use prometheus::{exponential_buckets, HistogramVec, IntCounterVec, Registry};

/// Every metric `audit-api` exports. Cheap to clone (handles are reference-counted).
#[derive(Clone)]
pub struct ApiMetrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_seconds: HistogramVec,
    pub rows_streamed: IntCounterVec,
    pub bytes_streamed: IntCounterVec,
    pub query_seconds: HistogramVec,
    pub read_events: IntCounterVec,
    pub months: IntCounterVec,
}

impl Default for ApiMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ApiMetrics {
    pub fn new() -> Self {
        use audit_runtime::metrics::{counter_vec, histogram_vec};
        let registry = Registry::new();
        let buckets = || exponential_buckets(0.001, 2.0, 16).expect("valid buckets");
        Self {
            requests: counter_vec(
                &registry,
                "audit_api_requests_total",
                "HTTP requests answered, by route, status and format.",
                &["route", "status", "format"],
            ),
            request_seconds: histogram_vec(
                &registry,
                "audit_api_request_duration_seconds",
                "Time to the response head (streams continue after it), by route and format.",
                &["route", "format"],
                buckets(),
            ),
            rows_streamed: counter_vec(
                &registry,
                "audit_api_rows_streamed_total",
                "Events written into response bodies, by format.",
                &["format"],
            ),
            bytes_streamed: counter_vec(
                &registry,
                "audit_api_bytes_streamed_total",
                "Bytes of CSV and NDJSON bodies sent, by format.",
                &["format"],
            ),
            query_seconds: histogram_vec(
                &registry,
                "audit_api_clickhouse_query_duration_seconds",
                "ClickHouse query time, by kind (page, count).",
                &["kind"],
                buckets(),
            ),
            read_events: counter_vec(
                &registry,
                "audit_api_read_events_total",
                "audit_log.viewed/exported events handed to Kafka, by result.",
                &["result"],
            ),
            months: counter_vec(
                &registry,
                "audit_api_aggregate_months_total",
                "Months of counts and watermarks, by outcome: reused (parts unchanged) or computed.",
                &["outcome"],
            ),
            registry,
        }
    }

    pub fn observe_months(&self, reused: usize, computed: usize) {
        self.months
            .with_label_values(&["reused"])
            .inc_by(reused as u64);
        self.months
            .with_label_values(&["computed"])
            .inc_by(computed as u64);
    }

    /// A chunk of a streamed body (CSV page or export) handed to the client.
    pub fn observe_streamed(&self, format: &str, rows: u64, bytes: usize) {
        self.rows_streamed.with_label_values(&[format]).inc_by(rows);
        self.bytes_streamed
            .with_label_values(&[format])
            .inc_by(bytes as u64);
    }

    pub fn observe_query(&self, kind: &str, started: Instant) {
        self.query_seconds
            .with_label_values(&[kind])
            .observe(started.elapsed().as_secs_f64());
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        audit_runtime::metrics::render(&self.registry)
    }
}
