//! The ingest's one retry policy, for ClickHouse requests and dead-letter sends alike: capped,
//! jittered exponential back-off (`retry.*` settings) with no limit on attempts (a caller stops
//! on shutdown), each retry counted in `audit_ingest_retries_total` under its operation and
//! logged.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use tracing::warn;

use crate::config::RetryConfig;
use crate::metrics::IngestMetrics;

#[derive(Clone)]
pub struct Retry {
    config: RetryConfig,
    metrics: IngestMetrics,
}

impl Retry {
    pub fn new(config: RetryConfig, metrics: IngestMetrics) -> Self {
        Self { config, metrics }
    }

    /// The delays between attempts.
    pub fn backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::new()
            .with_jitter()
            .with_min_delay(Duration::from_millis(self.config.initial_backoff_ms))
            .with_max_delay(Duration::from_millis(self.config.max_backoff_ms))
            .without_max_times()
    }

    /// Counts and logs a retry of `operation` in `delay` after `error`.
    pub fn note(&self, operation: &str, error: &dyn Display, delay: Duration) {
        self.metrics.retries.with_label_values(&[operation]).inc();
        warn!(operation, error = %error, retry_in_ms = delay.as_millis() as u64, "request failed, retrying");
    }

    /// Runs `attempt` until it succeeds or fails with an error `retryable` refuses.
    pub async fn run<T, E, Fut>(
        &self,
        operation: &str,
        attempt: impl FnMut() -> Fut,
        retryable: impl Fn(&E) -> bool,
    ) -> Result<T, E>
    where
        E: Display,
        Fut: Future<Output = Result<T, E>>,
    {
        attempt
            .retry(self.backoff())
            .when(retryable)
            .notify(|err, delay| self.note(operation, err, delay))
            .await
    }
}
