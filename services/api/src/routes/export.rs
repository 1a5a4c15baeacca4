//! `GET /api/v1/organization/audit-logs/export`: every matching event, CSV or NDJSON, streamed
//! with constant memory and no row limit.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};

use crate::auth::AdminCaller;
use crate::error::ApiError;
use crate::query::ExportQuery;
use crate::routes::audit_logs::download_headers;
use crate::routes::{freshness_headers, read_facts, RequestInfo, ResponseFormat};
use crate::AppState;

pub async fn export(
    State(state): State<AppState>,
    AdminCaller(caller): AdminCaller,
    request: RequestInfo,
    query: ExportQuery,
) -> Result<Response, ApiError> {
    let permit = Arc::clone(&state.exports)
        .try_acquire_owned()
        .map_err(|_| ApiError::TooManyExports)?;
    let format = query.format;
    let held = state
        .retention
        .scope(&caller.organization_id, &query.filters)?;
    let source = state
        .store
        .export(&caller.organization_id, &held, query.sort);
    let body = crate::export::start(source, format, state.metrics.clone(), permit).await?;
    let mut headers = download_headers(&query.filters, format);
    freshness_headers(&state, &mut headers);
    let mut response = (headers, body).into_response();
    response
        .extensions_mut()
        .insert(ResponseFormat(format.label()));
    state.read_events.publish(&read_facts(
        &caller,
        &query.filters,
        &request,
        "audit_log.exported",
        format.label(),
    ));
    Ok(response)
}
