//! Writes rows into ClickHouse with RowBinary inserts, and tells a transient failure (retry it)
//! from a rejection of the data itself (never retry it: the rows go to the dead-letter topic).

use std::time::{Duration, Instant};

use audit_store::clickhouse::{self, RowOwned, RowWrite};

use crate::metrics::IngestMetrics;
use crate::retry::Retry;

/// Why a ClickHouse request of the ingest failed: an insert, or a read (the directory's
/// look-ups, the fences).
#[derive(Debug, thiserror::Error)]
pub enum ClickHouseError {
    /// ClickHouse refused the data (type, parse or size errors): retrying cannot help.
    #[error("clickhouse rejected the data: {0}")]
    Rejected(String),
    /// Network, server down, overload, timeouts: retry with back-off.
    #[error("clickhouse request failed: {0}")]
    Transient(String),
}

impl ClickHouseError {
    pub fn is_transient(&self) -> bool {
        matches!(self, ClickHouseError::Transient(_))
    }
}

/// What a failed ClickHouse request means for the ingest (see [`audit_store::classify`]): a
/// rejection of the data goes to the dead-letter topic, everything else is retried.
pub fn classify(error: &clickhouse::error::Error) -> ClickHouseError {
    let text = error.to_string();
    match audit_store::classify(error) {
        audit_store::Failure::Rejected => ClickHouseError::Rejected(text),
        _ => ClickHouseError::Transient(text),
    }
}

/// Inserts rows into one table, retrying transient failures with capped, jittered back-off.
#[derive(Clone)]
pub struct ClickHouseSink {
    client: clickhouse::Client,
    retry: Retry,
    metrics: IngestMetrics,
    /// Sends `optimize_on_insert = 0` with the events' inserts (see [`Self::uncollapsed_inserts`]).
    uncollapsed: bool,
}

impl ClickHouseSink {
    pub fn new(client: clickhouse::Client, retry: Retry, metrics: IngestMetrics) -> Self {
        Self {
            client,
            retry,
            metrics,
            uncollapsed: false,
        }
    }

    /// Inserts the events without collapsing each insert's copies as ClickHouse writes them
    /// (`optimize_on_insert = 0`; the default `1`, from 21.x on, made a 50,000-row insert take
    /// about 390 ms instead of 230 ms on 26.9). Copies within one insert are then stored like
    /// copies across inserts: the duplicate check finds and collapses both, and every read
    /// already shows one of each. Only for servers that know the setting (18.16 does not).
    pub fn uncollapsed_inserts(mut self, on: bool) -> Self {
        self.uncollapsed = on;
        self
    }

    pub fn client(&self) -> &clickhouse::Client {
        &self.client
    }

    /// One insert, no retry.
    pub async fn insert_once<T>(&self, table: &str, rows: &[T]) -> Result<(), ClickHouseError>
    where
        T: RowOwned + RowWrite,
    {
        let started = Instant::now();
        let result = async {
            let mut insert = self
                .client
                .insert::<T>(table)
                .await?
                .with_timeouts(Some(Duration::from_secs(30)), Some(Duration::from_secs(60)));
            if self.uncollapsed && table == audit_store::EVENTS_TABLE {
                insert = insert.with_setting("optimize_on_insert", "0");
            }
            for row in rows {
                insert.write(row).await?;
            }
            insert.end().await
        }
        .await;
        if table == audit_store::EVENTS_TABLE {
            self.metrics
                .insert_seconds
                .with_label_values(&[] as &[&str])
                .observe(started.elapsed().as_secs_f64());
        }
        result.map_err(|err| classify(&err))
    }

    /// Inserts until ClickHouse acknowledges or rejects the data; transient failures are retried
    /// for ever (the caller cancels on shutdown).
    pub async fn insert<T>(&self, table: &str, rows: &[T]) -> Result<(), ClickHouseError>
    where
        T: RowOwned + RowWrite,
    {
        if rows.is_empty() {
            return Ok(());
        }
        self.retry_transient("clickhouse_insert", || self.insert_once(table, rows))
            .await
    }

    /// Runs `operation` until it succeeds or fails with a non-transient error (see
    /// [`Retry::run`]), counting each retry under `label`.
    pub async fn retry_transient<T, Fut>(
        &self,
        label: &str,
        operation: impl FnMut() -> Fut,
    ) -> Result<T, ClickHouseError>
    where
        Fut: std::future::Future<Output = Result<T, ClickHouseError>>,
    {
        self.retry
            .run(label, operation, ClickHouseError::is_transient)
            .await
    }

    /// The retry policy, for loops that do more between attempts than wait.
    pub fn retry(&self) -> &Retry {
        &self.retry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_errors_are_rejections_and_outages_are_transient() {
        let rejected = clickhouse::error::Error::BadResponse(
            "Code: 27. DB::Exception: Cannot parse input: expected '\\t' before: 'x'".to_owned(),
        );
        assert!(!classify(&rejected).is_transient());
        let rejected_by_18_16 = clickhouse::error::Error::BadResponse(
            "Code: 27, e.displayText() = DB::Exception: Cannot parse input, e.what() = DB::Exception"
                .to_owned(),
        );
        assert!(!classify(&rejected_by_18_16).is_transient());
        let overloaded = clickhouse::error::Error::BadResponse(
            "Code: 202. DB::Exception: Too many simultaneous queries".to_owned(),
        );
        assert!(classify(&overloaded).is_transient());
        let no_code =
            clickhouse::error::Error::BadResponse("<html>502 Bad Gateway</html>".to_owned());
        assert!(classify(&no_code).is_transient());
        assert!(classify(&clickhouse::error::Error::TimedOut).is_transient());
    }
}
