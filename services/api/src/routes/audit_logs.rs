//! `GET /api/v1/organization/audit-logs`: one page of the caller's organization's events, as
//! JSON (with `total` and `nextCursor`) or as a streamed CSV file.

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::auth::AdminCaller;
use crate::error::ApiError;
use crate::query::BodyFormat;
use crate::query::{AuditLogQuery, Cursor, Filters, PageFormat};
use crate::render::EventItem;
use crate::routes::{freshness_headers, read_facts, RequestInfo, ResponseFormat};
use crate::store::PageRequest;
use crate::stream;
use crate::time::compact_timestamp;
use crate::AppState;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PageBody {
    total: u64,
    limit: u32,
    offset: u64,
    items: Vec<EventItem>,
    next_cursor: Option<String>,
}

pub async fn list(
    State(state): State<AppState>,
    AdminCaller(caller): AdminCaller,
    request: RequestInfo,
    query: AuditLogQuery,
) -> Result<Response, ApiError> {
    let held = state
        .retention
        .scope(&caller.organization_id, &query.filters)?;
    let page = PageRequest {
        organization_id: caller.organization_id.as_str(),
        filters: &held,
        sort: query.sort,
        limit: query.limit,
        offset: query.offset,
        cursor: query.cursor.as_ref(),
    };
    let json = matches!(query.format, PageFormat::Json);
    let read = state.store.page(&page, json).await?;
    let next_cursor = next_cursor(&query, read.more, &read.keys);
    let mut response = match read.items {
        Some(items) => Json(PageBody {
            total: read.total,
            limit: query.limit,
            offset: if query.cursor.is_some() {
                0
            } else {
                query.offset
            },
            next_cursor,
            items,
        })
        .into_response(),
        None => {
            let cursor = state.store.page_rows_cursor(&page, &read.keys)?;
            let body = stream::start(cursor, BodyFormat::Csv, state.metrics.clone()).await?;
            let mut headers = download_headers(&query.filters, BodyFormat::Csv);
            if let Some(cursor) = next_cursor.and_then(|c| HeaderValue::from_str(&c).ok()) {
                headers.insert("x-next-cursor", cursor);
            }
            (headers, body).into_response()
        }
    };
    total_headers(response.headers_mut(), read.total, read.total_exact);
    freshness_headers(&state, response.headers_mut());
    let format = query.format.label();
    response.extensions_mut().insert(ResponseFormat(format));
    let facts = read_facts(
        &caller,
        &query.filters,
        &request,
        "audit_log.viewed",
        format,
    );
    state.read_events.publish(&facts);
    Ok(response)
}

/// The cursor of the page after this one, when events follow: it starts after the page's last
/// key and only fits the same filters and sort.
fn next_cursor(query: &AuditLogQuery, more: bool, keys: &[(i64, String)]) -> Option<String> {
    let (occurred_at_ms, id) = keys.last().filter(|_| more)?.clone();
    Some(
        Cursor {
            sort: query.sort,
            occurred_at_ms,
            id,
            filters: query.filters.fingerprint(query.sort),
        }
        .encode(),
    )
}

/// `X-Total-Count` and whether it is exact, on JSON and CSV pages alike.
fn total_headers(headers: &mut HeaderMap, total: u64, exact: bool) {
    headers.insert("x-total-count", HeaderValue::from(total));
    headers.insert(
        "x-total-count-exact",
        HeaderValue::from_static(if exact { "true" } else { "false" }),
    );
}

/// `Content-Type` of `format` and `Content-Disposition: attachment;
/// filename="audit-logs-<from>-<to>.<ext>"`; an open end reads `start` / `now`.
pub fn download_headers(filters: &Filters, format: BodyFormat) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    headers.insert(
        header::CONTENT_DISPOSITION,
        attachment(filters, format.label()),
    );
    headers
}

fn attachment(filters: &Filters, extension: &str) -> HeaderValue {
    let from = filters
        .from_ms
        .map(compact_timestamp)
        .unwrap_or_else(|| "start".to_owned());
    let to = filters
        .to_ms
        .map(compact_timestamp)
        .unwrap_or_else(|| "now".to_owned());
    // Only digits, letters and '-' reach the header.
    HeaderValue::from_str(&format!(
        "attachment; filename=\"audit-logs-{from}-{to}.{extension}\""
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("attachment"))
}
