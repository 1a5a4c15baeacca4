//! The small operations listener: `/healthz` (fails only when the replica is stuck, see
//! [`crate::liveness`]), `/readyz` (group joined, ClickHouse reachable, not waiting, not stuck)
//! and `/metrics` (Prometheus text format).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use audit_store::clickhouse;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use rdkafka::consumer::Consumer;
use tokio_util::sync::CancellationToken;

use crate::kafka::IngestConsumer;
use crate::liveness::{Health, LivenessState};
use crate::metrics::IngestMetrics;

#[derive(Clone)]
pub struct OpsState {
    pub metrics: IngestMetrics,
    pub consumer: Arc<IngestConsumer>,
    pub clickhouse: clickhouse::Client,
    pub liveness: Arc<LivenessState>,
    pub shutdown: CancellationToken,
}

pub fn router(state: OpsState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Fails only when the replica is stuck: restarting it is the cure. Waiting for a dependency
/// that is down is not a reason to restart.
async fn healthz(State(state): State<OpsState>) -> (StatusCode, String) {
    match state.liveness.health() {
        Health::Stuck { reason } => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("stuck: {reason}\n"),
        ),
        _ => (StatusCode::OK, "ok\n".to_owned()),
    }
}

async fn readyz(State(state): State<OpsState>) -> (StatusCode, String) {
    let own = if !state.consumer.context().joined() {
        Err("kafka consumer group not joined yet".to_owned())
    } else {
        match state.liveness.health() {
            Health::Stuck { reason } => Err(format!("stuck: {reason}")),
            Health::Waiting { reason } => Err(format!("waiting: {reason}")),
            Health::Blocked { reason } => Err(format!("blocked: {reason}")),
            Health::Starting | Health::Progressing => Ok(()),
        }
    };
    let clickhouse = async {
        audit_store::ping(&state.clickhouse, Duration::from_secs(2))
            .await
            .map_err(|_| "waiting: clickhouse unreachable".to_owned())
    };
    audit_runtime::ops::readiness(&state.shutdown, own, clickhouse).await
}

async fn metrics(State(state): State<OpsState>) -> impl IntoResponse {
    audit_runtime::ops::metrics_response(state.metrics.render())
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
