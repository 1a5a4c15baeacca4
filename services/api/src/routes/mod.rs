//! The router: the audit-log endpoints, the operations endpoints, and the middleware every
//! request goes through (request id, metrics, request log).

pub mod audit_logs;
pub mod export;
pub mod log_streams;
pub mod ops;
pub mod retention;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::extract::{ConnectInfo, FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use tracing::Span;

use crate::error::ApiError;
use crate::keys::Caller;
use crate::query::{AuditLogQuery, ExportQuery, Filters};
use crate::read_events::ReadFacts;
use crate::time::format_timestamp;
use crate::AppState;

pub const AUDIT_LOGS_PATH: &str = "/api/v1/organization/audit-logs";
pub const EXPORT_PATH: &str = "/api/v1/organization/audit-logs/export";
/// Ingest time of the newest event the store holds: how fresh the answer is.
pub const FRESHNESS_HEADER: &str = "x-audit-newest-ingested-at";
pub const REQUEST_ID_HEADER: &str = "x-request-id";

pub fn router(state: AppState) -> Router {
    Router::new()
        .route(AUDIT_LOGS_PATH, get(audit_logs::list))
        .route(EXPORT_PATH, get(export::export))
        .route(retention::RETENTION_PATH, get(retention::show))
        .route(
            log_streams::STREAMS_PATH,
            get(log_streams::list).post(log_streams::create),
        )
        .route(
            &format!("{}/{{id}}", log_streams::STREAMS_PATH),
            get(log_streams::get)
                .patch(log_streams::update)
                .delete(log_streams::delete),
        )
        .route(
            &format!("{}/{{id}}/test", log_streams::STREAMS_PATH),
            post(log_streams::test),
        )
        .route(
            &format!("{}/{{id}}/replay", log_streams::STREAMS_PATH),
            post(log_streams::replay),
        )
        .route(
            &format!("{}/{{id}}/rotate-secret", log_streams::STREAMS_PATH),
            post(log_streams::rotate_secret),
        )
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(ops::openapi))
        .fallback(|| async { ApiError::NotFound })
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        // Every request has an id (the caller's, when it sent a sane one), echoed in the answer.
        .layer(PropagateRequestIdLayer::new(request_id_header()))
        .layer(SetRequestIdLayer::new(request_id_header(), MakeRequestUuid))
        .layer(middleware::map_request(drop_unsafe_request_id))
        .layer(
            // Method and path only: query strings may hold emails, headers hold keys.
            TraceLayer::new_for_http().make_span_with(|request: &Request| {
                tracing::info_span!(
                    "request",
                    method = %request.method(),
                    path = %request.uri().path(),
                    request_id = tracing::field::Empty,
                )
            }),
        )
        .with_state(state)
}

/// The response format, for the metrics label; set by the handlers that have one.
#[derive(Debug, Clone, Copy)]
pub struct ResponseFormat(pub &'static str);

/// Request id, client address and user agent of the request being served.
#[derive(Debug, Clone)]
pub struct RequestInfo {
    pub request_id: String,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for RequestInfo {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        Ok(RequestInfo {
            request_id: parts
                .headers
                .get(REQUEST_ID_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned(),
            ip: parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip().to_string()),
            user_agent: parts
                .headers
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        })
    }
}

/// The page endpoint's query string as an extractor: a handler receives it parsed, and a bad
/// one is answered with its 400 before the handler runs.
impl<S: Send + Sync> FromRequestParts<S> for AuditLogQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        Ok(Self::parse(parts.uri.query())?)
    }
}

/// The export endpoint's query string as an extractor (see [`AuditLogQuery`]'s).
impl<S: Send + Sync> FromRequestParts<S> for ExportQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        Ok(Self::parse(parts.uri.query())?)
    }
}

/// The read event of a request: `audit_log.viewed` or `audit_log.exported`, in `format`.
pub fn read_facts<'a>(
    caller: &'a Caller,
    filters: &'a Filters,
    request: &'a RequestInfo,
    event_type: &'static str,
    format: &'static str,
) -> ReadFacts<'a> {
    ReadFacts {
        caller,
        event_type,
        format,
        filters,
        request_id: &request.request_id,
        ip: request.ip.clone(),
        user_agent: request.user_agent.clone(),
    }
}

pub fn freshness_headers(state: &AppState, headers: &mut HeaderMap) {
    let newest = state.newest_ingested_at.load(Ordering::Relaxed);
    if newest > 0 {
        if let Ok(value) = HeaderValue::from_str(&format_timestamp(newest as i64)) {
            headers.insert(FRESHNESS_HEADER, value);
        }
    }
}

fn request_id_header() -> HeaderName {
    HeaderName::from_static(REQUEST_ID_HEADER)
}

/// A caller's request id is kept only when it is short and plain (it goes into logs and
/// traces); otherwise a new one is made.
async fn drop_unsafe_request_id(mut request: Request) -> Request {
    let sane = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            !v.is_empty()
                && v.len() <= 128
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        });
    if !sane {
        request.headers_mut().remove(REQUEST_ID_HEADER);
    }
    request
}

/// The request's id in its span; metrics by route, status and format.
async fn observe(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    if let Some(id) = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        Span::current().record("request_id", id);
    }
    let response = next.run(request).await;
    let format = response
        .extensions()
        .get::<ResponseFormat>()
        .map(|f| f.0)
        .unwrap_or("none");
    let status = response.status();
    state
        .metrics
        .requests
        .with_label_values(&[route.as_str(), status.as_str(), format])
        .inc();
    state
        .metrics
        .request_seconds
        .with_label_values(&[route.as_str(), format])
        .observe(started.elapsed().as_secs_f64());
    response
}
