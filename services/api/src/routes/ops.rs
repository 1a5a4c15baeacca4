//! `/healthz` (process up), `/readyz` (keys and retention loaded, ClickHouse reachable, not shutting down),
//! `/metrics` (Prometheus) and `/openapi.json` (the contract in `schemas/openapi/`).

use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::AppState;

/// The OpenAPI 3.1 document, compiled in so that the served contract is the tested one.
pub const OPENAPI: &str = include_str!("../../../../schemas/openapi/audit-logs.openapi.json");

pub async fn healthz() -> &'static str {
    "ok\n"
}

pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let keys = if !state.keys.loaded() {
        Err("api keys not loaded yet".to_owned())
    } else if !state.retention.loaded() {
        Err("retention not loaded yet".to_owned())
    } else {
        Ok(())
    };
    let clickhouse = async {
        audit_store::ping(state.store.client(), Duration::from_secs(2))
            .await
            .map_err(|_| "clickhouse unreachable".to_owned())
    };
    audit_runtime::ops::readiness(&state.shutdown, keys, clickhouse).await
}

pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    audit_runtime::ops::metrics_response(state.metrics.render())
}

pub async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}
