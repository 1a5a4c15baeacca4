//! The operations endpoints both services answer alike: `/readyz`'s common checks (not
//! shutting down, the service's own conditions, then ClickHouse) and `/metrics`' answer.

use std::future::Future;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio_util::sync::CancellationToken;

/// `/readyz`: 503 while shutting down, then 503 with the service's own reason (`own`, checked
/// in order, first failure wins), then 503 unless `clickhouse` answers; 200 "ready" otherwise.
pub async fn readiness(
    shutdown: &CancellationToken,
    own: Result<(), String>,
    clickhouse: impl Future<Output = Result<(), String>>,
) -> (StatusCode, String) {
    let unavailable = |reason: String| (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n"));
    if shutdown.is_cancelled() {
        return unavailable("shutting down".to_owned());
    }
    if let Err(reason) = own {
        return unavailable(reason);
    }
    match clickhouse.await {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(reason) => unavailable(reason),
    }
}

/// `/metrics`: Prometheus' text exposition format.
pub fn metrics_response(text: String) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_failing_condition_is_the_answer() {
        let live = CancellationToken::new();
        let ok = async { Ok(()) };
        assert_eq!(
            readiness(&live, Ok(()), ok).await,
            (StatusCode::OK, "ready\n".to_owned())
        );
        let down = async { Err("clickhouse unreachable".to_owned()) };
        assert_eq!(
            readiness(&live, Err("keys not loaded".to_owned()), down).await,
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "keys not loaded\n".to_owned()
            )
        );
        let down = async { Err("clickhouse unreachable".to_owned()) };
        assert_eq!(
            readiness(&live, Ok(()), down).await.1,
            "clickhouse unreachable\n"
        );
        let stopping = CancellationToken::new();
        stopping.cancel();
        let ok = async { Ok(()) };
        assert_eq!(
            readiness(&stopping, Err("x".to_owned()), ok).await.1,
            "shutting down\n"
        );
    }
}
