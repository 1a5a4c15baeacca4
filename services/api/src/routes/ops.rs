//! `/healthz` (process up), `/readyz` (keys loaded, ClickHouse reachable, not shutting down),
//! `/metrics` (Prometheus) and `/openapi.json` (the contract in `schemas/openapi/`).

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;

use crate::AppState;

/// The OpenAPI 3.1 document, compiled in so that the served contract is the tested one.
pub const OPENAPI: &str = include_str!("../../../../schemas/openapi/audit-logs.openapi.json");

pub async fn healthz() -> &'static str {
    "ok\n"
}

pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if state.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    if !state.keys.loaded() {
        return (StatusCode::SERVICE_UNAVAILABLE, "api keys not loaded yet\n");
    }
    match audit_store::ping(state.store.client(), Duration::from_secs(2)).await {
        Ok(()) => (StatusCode::OK, "ready\n"),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "clickhouse unreachable\n"),
    }
}

pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

pub async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}
