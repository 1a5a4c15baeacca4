//! Whether ClickHouse answers: the one check behind both services' readiness and the ingest's
//! liveness watchdog.

use std::time::Duration;

/// Why ClickHouse did not answer a ping.
#[derive(Debug, thiserror::Error)]
pub enum PingError {
    #[error("{0}")]
    Failed(#[from] clickhouse::error::Error),
    #[error("no answer within {} s", .0.as_secs_f64())]
    TimedOut(Duration),
}

/// Runs `SELECT 1` and waits at most `timeout` for the answer.
pub async fn ping(client: &clickhouse::Client, timeout: Duration) -> Result<(), PingError> {
    match tokio::time::timeout(timeout, client.query("SELECT 1").fetch_one::<u8>()).await {
        Ok(answer) => answer.map(|_| ()).map_err(PingError::from),
        Err(_) => Err(PingError::TimedOut(timeout)),
    }
}
