//! `audit-ingest`: consumes audit events from Kafka and writes them into ClickHouse.
//! The library holds all logic; `main.rs` only wires configuration, telemetry and the CLI.
//!
//! Stages: [`batch`] (decode, accumulate) -> [`flush`] (directory, ClickHouse, dead letters)
//! -> [`pipeline`] (commit offsets); [`app`] wires them with [`kafka`], [`sink`] and [`http`].

pub mod app;
pub mod batch;
pub mod cli;
pub mod config;
pub mod dead_letter;
pub mod directory;
pub mod duplicates;
pub mod fence;
pub mod flow;
pub mod flush;
pub mod http;
pub mod invalid_ratio;
pub mod kafka;
pub mod liveness;
pub mod metrics;
pub mod offsets;
pub mod pipeline;
pub mod replay;
pub mod retry;
pub mod sink;
pub mod stored_events;

pub use app::Application;

/// Locks `mutex`, also after a panic elsewhere poisoned it: every value the service keeps
/// behind a lock (caches, sets of partitions, a health verdict) stays usable as it was.
pub(crate) fn locked<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
pub use config::IngestConfig;

/// Now, in Unix epoch milliseconds (the stored rows' clock).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}
