//! Where each owned stream stands, shared by its task (which updates it), the manager (which
//! writes changed entries to `audit_log_stream_state` every `state_flush_interval_ms`, and at
//! once when a stream stops) and the metrics.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use audit_store::clickhouse;
use prometheus::{
    Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry,
};

use crate::log_streams::table::{self, StateRow};

pub const STATES: [&str; 3] = ["active", "failing", "error"];

#[derive(Clone)]
pub struct StreamMetrics {
    pub registry: Registry,
    pub delivered: IntCounterVec,
    pub attempts: IntCounterVec,
    pub request_seconds: HistogramVec,
    pub latency_seconds: HistogramVec,
    pub lag_seconds: GaugeVec,
    pub lag_events: IntGaugeVec,
    pub state: IntGaugeVec,
    pub owned_partitions: IntGauge,
    pub owned_streams: IntGauge,
    pub last_progress: Gauge,
    pub state_write_failures: IntCounter,
}

impl Default for StreamMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamMetrics {
    pub fn new() -> Self {
        use audit_runtime::metrics::{counter_vec, register};
        let registry = Registry::new();
        let stream_labels = &["organization_id", "stream_id"];
        let delivered = counter_vec(
            &registry,
            "audit_stream_events_delivered_total",
            "Events a destination accepted, by destination kind.",
            &["kind"],
        );
        let attempts = counter_vec(
            &registry,
            "audit_stream_deliveries_total",
            "Delivery attempts (one request, one batch) by kind and outcome (delivered, retry, error).",
            &["kind", "outcome"],
        );
        let request_seconds = register(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "audit_stream_request_seconds",
                    "Duration of one delivery request, by kind.",
                )
                .buckets(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ]),
                &["kind"],
            )
            .expect("valid metric"),
        );
        let latency_seconds = register(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "audit_stream_delivery_latency_seconds",
                    "From the ingest storing an event to its destination accepting it (the oldest \
                     event of each delivered batch), by kind.",
                )
                .buckets(vec![
                    0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0,
                ]),
                &["kind"],
            )
            .expect("valid metric"),
        );
        let lag_seconds = register(
            &registry,
            GaugeVec::new(
                Opts::new(
                    "audit_stream_lag_seconds",
                    "Age of the oldest event a stream has not delivered yet (0 when caught up).",
                ),
                stream_labels,
            )
            .expect("valid metric"),
        );
        let lag_events = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "audit_stream_lag_events",
                    "Messages of the stream's partition of the stored-events topic after its \
                     position (an upper bound of its undelivered events).",
                ),
                stream_labels,
            )
            .expect("valid metric"),
        );
        let state = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "audit_stream_state",
                    "1 for the state each owned stream is in (active, failing, error).",
                ),
                &["organization_id", "stream_id", "state"],
            )
            .expect("valid metric"),
        );
        let owned_partitions = register(
            &registry,
            IntGauge::new(
                "audit_stream_owned_partitions",
                "Partitions of the stored-events topic this replica delivers.",
            )
            .expect("valid metric"),
        );
        let owned_streams = register(
            &registry,
            IntGauge::new(
                "audit_stream_owned_streams",
                "Streams this replica delivers (paused ones included).",
            )
            .expect("valid metric"),
        );
        let last_progress = register(
            &registry,
            Gauge::new(
                "audit_stream_last_progress_timestamp_seconds",
                "When the worker's loop last completed a round.",
            )
            .expect("valid metric"),
        );
        let state_write_failures = register(
            &registry,
            IntCounter::new(
                "audit_stream_state_write_failures_total",
                "Failed writes of positions and health to ClickHouse (retried at the next interval).",
            )
            .expect("valid metric"),
        );
        Self {
            registry,
            delivered,
            attempts,
            request_seconds,
            latency_seconds,
            lag_seconds,
            lag_events,
            state,
            owned_partitions,
            owned_streams,
            last_progress,
            state_write_failures,
        }
    }

    /// Shows `row`'s health in the per-stream gauges.
    pub fn show(&self, row: &StateRow) {
        let labels = [row.organization_id.as_str(), row.stream_id.as_str()];
        self.lag_seconds
            .with_label_values(&labels)
            .set(row.lag_ms.max(0) as f64 / 1000.0);
        self.lag_events
            .with_label_values(&labels)
            .set(row.lag_events.max(0));
        for state in STATES {
            self.state
                .with_label_values(&[labels[0], labels[1], state])
                .set(i64::from(row.state == state));
        }
    }

    /// Drops a stream's gauges (deleted, or owned by another replica now).
    pub fn forget(&self, organization_id: &str, stream_id: &str) {
        let labels = [organization_id, stream_id];
        let _ = self.lag_seconds.remove_label_values(&labels);
        let _ = self.lag_events.remove_label_values(&labels);
        for state in STATES {
            let _ = self
                .state
                .remove_label_values(&[organization_id, stream_id, state]);
        }
    }
}

/// The health of every stream this replica owns, and which changed since the last write.
#[derive(Clone, Default)]
pub struct HealthBoard {
    inner: Arc<Mutex<Board>>,
}

#[derive(Default)]
struct Board {
    rows: HashMap<String, StateRow>,
    dirty: HashSet<String>,
}

fn now_us() -> u64 {
    chrono::Utc::now().timestamp_micros().max(0) as u64
}

impl HealthBoard {
    fn lock(&self) -> std::sync::MutexGuard<'_, Board> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a stream's new state; written at the next flush.
    pub fn update(&self, row: StateRow) {
        let mut board = self.lock();
        board.dirty.insert(row.stream_id.clone());
        board.rows.insert(row.stream_id.clone(), row);
    }

    pub fn get(&self, stream_id: &str) -> Option<StateRow> {
        self.lock().rows.get(stream_id).cloned()
    }

    pub fn remove(&self, stream_id: &str) {
        let mut board = self.lock();
        board.rows.remove(stream_id);
        board.dirty.remove(stream_id);
    }

    /// Writes the changed rows (of `only` streams, or all) to ClickHouse; they stay dirty if the
    /// write fails.
    pub async fn flush(
        &self,
        client: &clickhouse::Client,
        only: Option<&HashSet<String>>,
    ) -> Result<usize, clickhouse::error::Error> {
        let rows: Vec<StateRow> = {
            let board = self.lock();
            board
                .dirty
                .iter()
                .filter(|id| only.is_none_or(|only| only.contains(*id)))
                .filter_map(|id| board.rows.get(id))
                .cloned()
                .collect()
        };
        if rows.is_empty() {
            return Ok(0);
        }
        let stamped: Vec<StateRow> = rows
            .iter()
            .cloned()
            .map(|mut row| {
                row.written_at_us = now_us();
                row
            })
            .collect();
        table::insert_states(client, &stamped).await?;
        let mut board = self.lock();
        for row in &rows {
            // Unless it changed again meanwhile.
            if board.rows.get(&row.stream_id) == Some(row) {
                board.dirty.remove(&row.stream_id);
            }
        }
        Ok(stamped.len())
    }
}
