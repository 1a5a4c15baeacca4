//! `/api/v1/organization/audit-log-streams`: an organization's admin manages its log streams
//! (README "Log streams"). Every handler acts within the caller's organization only: another
//! organization's stream id answers 404, as an unknown one does.

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::RequestInfo;
use crate::auth::AdminCaller;
use crate::error::ApiError;
use crate::log_streams::manage::{Actor, CreateStream, UpdateStream};
use crate::AppState;

pub const STREAMS_PATH: &str = "/api/v1/organization/audit-log-streams";

#[derive(serde::Serialize)]
struct StreamList {
    data: Vec<crate::log_streams::manage::StreamView>,
}

fn actor(caller: &AdminCaller, request: RequestInfo) -> Actor {
    Actor {
        id: caller.0.key_id.clone(),
        actor_type: "api_key",
        name: Some(caller.0.key_name.clone()),
        request_id: Some(request.request_id).filter(|id| !id.is_empty()),
        ip: request.ip,
        user_agent: request.user_agent,
    }
}

/// A JSON body, or a 400 naming where it is wrong.
fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    let text = if bytes.iter().all(u8::is_ascii_whitespace) {
        &b"{}"[..]
    } else {
        bytes
    };
    let mut de = serde_json::Deserializer::from_slice(text);
    serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        ApiError::InvalidBody {
            field: if path == "." { "body".into() } else { path },
            message: format!("invalid request body: {inner}"),
        }
    })
}

pub async fn list(
    State(state): State<AppState>,
    caller: AdminCaller,
) -> Result<Response, ApiError> {
    let data = state.streams.list(&caller.0.organization_id).await?;
    Ok(Json(StreamList { data }).into_response())
}

pub async fn create(
    State(state): State<AppState>,
    caller: AdminCaller,
    request: RequestInfo,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let create: CreateStream = body(&bytes)?;
    let view = state
        .streams
        .create(&caller.0.organization_id, &actor(&caller, request), create)
        .await?;
    let location = format!("{STREAMS_PATH}/{}", view.id);
    let mut response = (StatusCode::CREATED, Json(view)).into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    Ok(response)
}

pub async fn get(
    State(state): State<AppState>,
    caller: AdminCaller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let view = state.streams.get(&caller.0.organization_id, &id).await?;
    Ok(Json(view).into_response())
}

pub async fn update(
    State(state): State<AppState>,
    caller: AdminCaller,
    request: RequestInfo,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::InvalidBody {
            field: "body".into(),
            message: "a JSON object of the fields to change is required".into(),
        });
    }
    let update: UpdateStream = body(&bytes)?;
    let view = state
        .streams
        .update(
            &caller.0.organization_id,
            &actor(&caller, request),
            &id,
            update,
        )
        .await?;
    Ok(Json(view).into_response())
}

pub async fn delete(
    State(state): State<AppState>,
    caller: AdminCaller,
    request: RequestInfo,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    state
        .streams
        .delete(&caller.0.organization_id, &actor(&caller, request), &id)
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub async fn test(
    State(state): State<AppState>,
    caller: AdminCaller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let result = state.streams.test(&caller.0.organization_id, &id).await?;
    Ok(Json(result).into_response())
}

pub async fn replay(
    State(state): State<AppState>,
    caller: AdminCaller,
    request: RequestInfo,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let from = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(key, _)| key == "from")
        .map(|(_, value)| value.into_owned())
        .ok_or(ApiError::InvalidParameter {
            parameter: "from",
            message: "from is required: the RFC 3339 time to deliver again from".into(),
        })?;
    let from_ms = chrono::DateTime::parse_from_rfc3339(&from)
        .map_err(|_| ApiError::InvalidParameter {
            parameter: "from",
            message: format!("from: {from:?} is not an RFC 3339 time such as 2026-01-31T00:00:00Z"),
        })?
        .timestamp_millis();
    let view = state
        .streams
        .replay(
            &caller.0.organization_id,
            &actor(&caller, request),
            &id,
            from_ms,
        )
        .await?;
    Ok((StatusCode::ACCEPTED, Json(view)).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Rotation {
    /// A JSON integer, also in a form like `300.0`.
    overlap_seconds: Option<serde_json::Number>,
}

impl Rotation {
    fn overlap(&self) -> Result<Option<u64>, ApiError> {
        let Some(number) = &self.overlap_seconds else {
            return Ok(None);
        };
        let whole = number.as_u64().or_else(|| {
            number
                .as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= u64::MAX as f64)
                .map(|f| f as u64)
        });
        whole.map(Some).ok_or_else(|| ApiError::InvalidBody {
            field: "overlapSeconds".into(),
            message: "overlapSeconds: a whole number of seconds, 0 to 604800".into(),
        })
    }
}

pub async fn rotate_secret(
    State(state): State<AppState>,
    caller: AdminCaller,
    request: RequestInfo,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let rotation: Rotation = body(&bytes)?;
    let view = state
        .streams
        .rotate_secret(
            &caller.0.organization_id,
            &actor(&caller, request),
            &id,
            rotation.overlap()?,
        )
        .await?;
    Ok(Json(view).into_response())
}
