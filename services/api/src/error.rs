//! Every error the HTTP API can answer with, mapped to a status in one place. The body is always
//! `{"error": {"code", "message", "parameter"?}}` and never carries SQL, server messages or keys.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use tracing::{debug, error};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A query parameter is missing its form, out of range or repeated.
    #[error("{message}")]
    InvalidParameter {
        parameter: &'static str,
        message: String,
    },
    #[error("missing API key: send it in the X-API-Key header")]
    MissingKey,
    #[error("the API key is unknown or revoked")]
    InvalidKey,
    #[error("this API key's role may not read audit logs; an admin key is required")]
    Forbidden,
    #[error("too many requests for this API key; retry later")]
    RateLimited { retry_after: Duration },
    #[error(
        "the query took longer than the configured limit; narrow the filters or the time range"
    )]
    QueryTimeout,
    #[error("the audit log store is unavailable; retry later")]
    StoreUnavailable,
    #[error("this server is running as many exports as it may; retry later")]
    TooManyExports,
    #[error("the service is starting and has not loaded its API keys yet; retry later")]
    NotReady,
    #[error("the service has not loaded the organizations' retention yet; retry later")]
    RetentionNotLoaded,
    #[error("no such route")]
    NotFound,
    /// A request body is not JSON, or one of its fields is wrong.
    #[error("{message}")]
    InvalidBody { field: String, message: String },
    #[error("no log stream with this id in your organization")]
    StreamNotFound,
    #[error("{0}")]
    StreamLimit(String),
    #[error("this stream is not a webhook: it has no signing secret")]
    NotAWebhook,
    #[error("log streams are not configured on this server")]
    StreamsNotConfigured,
    /// Anything else: logged in full, answered without detail.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn error_code(&self) -> &'static str {
        match self {
            ApiError::InvalidParameter { .. } => "invalid_parameter",
            ApiError::MissingKey => "missing_api_key",
            ApiError::InvalidKey => "invalid_api_key",
            ApiError::Forbidden => "forbidden",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::QueryTimeout => "query_timeout",
            ApiError::StoreUnavailable => "store_unavailable",
            ApiError::TooManyExports => "too_many_exports",
            ApiError::NotReady | ApiError::RetentionNotLoaded => "not_ready",
            ApiError::NotFound => "not_found",
            ApiError::InvalidBody { .. } => "invalid_request",
            ApiError::StreamNotFound => "stream_not_found",
            ApiError::StreamLimit(_) => "stream_limit",
            ApiError::NotAWebhook => "not_a_webhook",
            ApiError::StreamsNotConfigured => "streams_not_configured",
            ApiError::Internal(_) => "internal_error",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidParameter { .. } | ApiError::InvalidBody { .. } => {
                StatusCode::BAD_REQUEST
            }
            ApiError::StreamLimit(_) | ApiError::NotAWebhook => StatusCode::CONFLICT,
            ApiError::MissingKey | ApiError::InvalidKey => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::QueryTimeout => StatusCode::GATEWAY_TIMEOUT,
            ApiError::StoreUnavailable
            | ApiError::NotReady
            | ApiError::RetentionNotLoaded
            | ApiError::TooManyExports
            | ApiError::StreamsNotConfigured => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::NotFound | ApiError::StreamNotFound => StatusCode::NOT_FOUND,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameter: Option<&'a str>,
    /// The request body's field that is wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            ApiError::Internal(detail) => error!(detail = %detail, "request failed"),
            ApiError::StoreUnavailable
            | ApiError::QueryTimeout
            | ApiError::NotReady
            | ApiError::RetentionNotLoaded => {
                error!(code = self.error_code(), "request failed")
            }
            _ => debug!(code = self.error_code(), "request refused"),
        }
        let parameter = match &self {
            ApiError::InvalidParameter { parameter, .. } => Some(*parameter),
            _ => None,
        };
        let field = match &self {
            ApiError::InvalidBody { field, .. } => Some(field.as_str()),
            _ => None,
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.error_code(),
                message: self.to_string(),
                parameter,
                field,
            },
        };
        let mut response = (status, Json(body)).into_response();
        let headers = response.headers_mut();
        match &self {
            ApiError::RateLimited { retry_after } => {
                let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
            }
            ApiError::MissingKey | ApiError::InvalidKey => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("ApiKey header=\"X-API-Key\""),
                );
            }
            ApiError::StoreUnavailable
            | ApiError::NotReady
            | ApiError::RetentionNotLoaded
            | ApiError::TooManyExports => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            _ => {}
        }
        response
    }
}

impl From<crate::store::ReadError> for ApiError {
    fn from(err: crate::store::ReadError) -> Self {
        use crate::store::ReadError;
        match err {
            ReadError::Unavailable(detail) => {
                debug!(detail = %detail, "clickhouse unavailable");
                ApiError::StoreUnavailable
            }
            ReadError::Timeout => ApiError::QueryTimeout,
            ReadError::Failed(detail) => ApiError::Internal(detail),
        }
    }
}

impl From<crate::query::InvalidParameter> for ApiError {
    fn from(err: crate::query::InvalidParameter) -> Self {
        ApiError::InvalidParameter {
            parameter: err.parameter,
            message: err.message,
        }
    }
}

impl From<crate::keys::AuthError> for ApiError {
    fn from(err: crate::keys::AuthError) -> Self {
        use crate::keys::AuthError;
        match err {
            AuthError::NotReady => ApiError::NotReady,
            AuthError::InvalidKey => ApiError::InvalidKey,
            AuthError::UnknownRole => ApiError::Forbidden,
        }
    }
}

impl From<crate::stream::StreamError> for ApiError {
    fn from(err: crate::stream::StreamError) -> Self {
        match err {
            crate::stream::StreamError::Store(err) => err.into(),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<crate::log_streams::manage::ManageError> for ApiError {
    fn from(err: crate::log_streams::manage::ManageError) -> Self {
        use crate::log_streams::manage::ManageError;
        match err {
            ManageError::Invalid(invalid) => ApiError::InvalidBody {
                message: invalid.to_string(),
                field: invalid.field,
            },
            ManageError::NotFound => ApiError::StreamNotFound,
            ManageError::TooMany => ApiError::StreamLimit(err.to_string()),
            ManageError::NotConfigured => ApiError::StreamsNotConfigured,
            ManageError::NotAWebhook => ApiError::NotAWebhook,
            ManageError::Store(err) => err.into(),
            ManageError::Secrets(..) => ApiError::Internal(err.to_string()),
        }
    }
}

/// What a failed ClickHouse request means for the caller (see [`audit_store::classify`]).
pub fn from_clickhouse(err: &audit_store::clickhouse::error::Error) -> ApiError {
    crate::store::ReadError::from(err).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use audit_store::clickhouse::error::Error;

    #[test]
    fn clickhouse_failures_map_to_503_and_504_without_their_text() {
        // 18.16's form, then the form of later versions.
        for text in [
            "Code: 159, e.displayText() = DB::Exception: Timeout exceeded: elapsed 10.1 seconds, \
             maximum: 10, e.what() = DB::Exception",
            "Code: 159. DB::Exception: Timeout exceeded: elapsed 10.1 seconds, SELECT secret",
        ] {
            let timeout = from_clickhouse(&Error::BadResponse(text.into()));
            assert_eq!(timeout.status(), StatusCode::GATEWAY_TIMEOUT, "{text}");
            assert!(!timeout.to_string().contains("SELECT"));
        }
        let busy = from_clickhouse(&Error::BadResponse(
            "Code: 202, e.displayText() = DB::Exception: Too many simultaneous queries".into(),
        ));
        assert_eq!(busy.status(), StatusCode::SERVICE_UNAVAILABLE);
        let gateway = from_clickhouse(&Error::BadResponse("502 Bad Gateway".into()));
        assert_eq!(gateway.status(), StatusCode::SERVICE_UNAVAILABLE);
        let down = from_clickhouse(&Error::TimedOut);
        assert_eq!(down.status(), StatusCode::SERVICE_UNAVAILABLE);
        let bug = from_clickhouse(&Error::BadResponse(
            "Code: 62, e.displayText() = DB::Exception: Syntax error near SELECT".into(),
        ));
        assert_eq!(bug.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(bug.to_string(), "internal error");
    }

    #[test]
    fn rate_limit_answers_carry_a_whole_number_retry_after() {
        let response = ApiError::RateLimited {
            retry_after: Duration::from_millis(1_200),
        }
        .into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
    }
}
