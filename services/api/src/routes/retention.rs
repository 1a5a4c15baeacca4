//! `GET /api/v1/organization/audit-logs/retention`: the caller's organization's retention, the
//! oldest event it still holds, and its legal holds.

use axum::extract::State;
use axum::Json;

use crate::auth::AdminCaller;
use crate::error::ApiError;
use crate::retention::admin::{self, RetentionView};
use crate::AppState;

pub const RETENTION_PATH: &str = "/api/v1/organization/audit-logs/retention";

pub async fn show(
    State(state): State<AppState>,
    AdminCaller(caller): AdminCaller,
) -> Result<Json<RetentionView>, ApiError> {
    let org = caller.organization_id.as_str();
    let days = state.retention.days_of(org)?;
    let holds = state.retention.holds_of(org)?;
    let view = admin::view(
        &state.store,
        org,
        days,
        &holds,
        audit_store::retention::now_ms(),
    )
    .await?;
    Ok(Json(view))
}
