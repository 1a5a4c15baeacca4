//! The small operations listener: `/healthz` (process up), `/readyz` (group joined and
//! ClickHouse reachable) and `/metrics` (Prometheus text format).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use audit_store::clickhouse;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use rdkafka::consumer::Consumer;
use tokio_util::sync::CancellationToken;

use crate::kafka::IngestConsumer;
use crate::metrics::IngestMetrics;

#[derive(Clone)]
pub struct OpsState {
    pub metrics: IngestMetrics,
    pub consumer: Arc<IngestConsumer>,
    pub clickhouse: clickhouse::Client,
    pub shutdown: CancellationToken,
}

pub fn router(state: OpsState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<OpsState>) -> impl IntoResponse {
    if state.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    if !state.consumer.context().joined() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "kafka consumer group not joined yet\n",
        );
    }
    let ping = state.clickhouse.query("SELECT 1").fetch_one::<u8>();
    match tokio::time::timeout(Duration::from_secs(2), ping).await {
        Ok(Ok(_)) => (StatusCode::OK, "ready\n"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "clickhouse unreachable\n"),
    }
}

async fn metrics(State(state): State<OpsState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

/// Binds the listener; the returned future serves until `shutdown` is cancelled.
pub async fn serve(
    address: SocketAddr,
    state: OpsState,
) -> std::io::Result<(
    SocketAddr,
    impl std::future::Future<Output = std::io::Result<()>>,
)> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let bound = listener.local_addr()?;
    let shutdown = state.shutdown.clone();
    let server = axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await });
    Ok((bound, async move { server.await }))
}
