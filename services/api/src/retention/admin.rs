//! The operator's changes to retention and legal holds (`audit-api retention|hold`), each an
//! audit event of the organization, and the view of an organization's retention that its admin
//! reads at `GET /api/v1/organization/audit-logs/retention`.

use audit_store::clickhouse;
use audit_store::retention::{self, HoldRow, PolicyRow, Visibility, MAX_DAYS, MIN_DAYS};
use serde::Serialize;
use serde_json::{json, Value};
use tracing::warn;

use crate::query::Filters;
use crate::read_events::ReadEventPublisher;
use crate::store::{AuditLogStore, ReadError};
use crate::time::format_timestamp;

/// Why a change was refused.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    Invalid(String),
    #[error("no legal hold {0} in this organization")]
    NoSuchHold(String),
    #[error("clickhouse: {0}")]
    Store(#[from] clickhouse::error::Error),
    #[error("reading events: {0}")]
    Read(#[from] ReadError),
}

/// An organization's retention as its admin sees it.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RetentionView {
    pub organization_id: String,
    pub retention_days: u32,
    /// `organization` (set by the operator) or `default` (the service's).
    pub source: &'static str,
    /// Events that occurred before this time are expired unless a legal hold covers them.
    pub expires_before: String,
    /// The oldest event still held (None: none).
    pub oldest_event_at: Option<String>,
    pub legal_holds: Vec<HoldView>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HoldView {
    pub id: String,
    pub from: Option<String>,
    pub to: Option<String>,
    pub reason: String,
    pub placed_at: String,
    pub placed_by: String,
    pub lifted_at: Option<String>,
    pub lifted_by: Option<String>,
}

impl From<&HoldRow> for HoldView {
    fn from(h: &HoldRow) -> Self {
        Self {
            id: h.hold_id.clone(),
            from: h.from_ms.map(format_timestamp),
            to: h.to_ms.map(format_timestamp),
            reason: h.reason.clone(),
            placed_at: format_timestamp(h.placed_at_ms),
            placed_by: h.placed_by.clone(),
            lifted_at: h.lifted_at_ms.map(format_timestamp),
            lifted_by: h.lifted_at_ms.map(|_| h.lifted_by.clone()),
        }
    }
}

/// The view of an organization's retention: `days` (and whether they are its own) and its
/// active `holds` as the caller knows them, the oldest event held read from the store.
pub async fn view(
    store: &AuditLogStore,
    organization_id: &str,
    (days, own): (u32, bool),
    holds: &[HoldRow],
    now_ms: i64,
) -> Result<RetentionView, ReadError> {
    let visibility = Visibility::at(now_ms, days, holds);
    let held = super::narrow(&Filters::default(), &visibility);
    let oldest = store.oldest(organization_id, &held).await?;
    Ok(RetentionView {
        organization_id: organization_id.to_owned(),
        retention_days: days,
        source: if own { "organization" } else { "default" },
        expires_before: format_timestamp(now_ms - i64::from(days) * 86_400_000),
        oldest_event_at: oldest.map(format_timestamp),
        legal_holds: holds.iter().map(HoldView::from).collect(),
    })
}

/// The operator's side: changes written to the retention tables, each announced as an audit
/// event of the organization (actor `{type: system, id: audit-api-cli, name: <by>}`).
pub struct RetentionAdmin {
    client: clickhouse::Client,
    default_days: u32,
    events: ReadEventPublisher,
}

impl RetentionAdmin {
    pub fn new(client: clickhouse::Client, default_days: u32, events: ReadEventPublisher) -> Self {
        Self {
            client,
            default_days,
            events,
        }
    }

    pub fn client(&self) -> &clickhouse::Client {
        &self.client
    }

    /// Waits for audit events still queued (before a command exits).
    pub fn flush(&self) {
        self.events.flush(std::time::Duration::from_secs(5));
    }

    /// The organization's retention in days, whether it is its own, and its active holds, read
    /// from the tables now.
    pub async fn current(
        &self,
        organization_id: &str,
    ) -> Result<((u32, bool), Vec<HoldRow>), AdminError> {
        let policy = retention::load_policy(&self.client, organization_id).await?;
        let own = policy.map(|p| p.days).filter(|d| *d > 0);
        let holds = retention::load_holds(&self.client, Some(organization_id))
            .await?
            .into_iter()
            .filter(HoldRow::is_active)
            .collect();
        Ok((
            (
                retention::effective_days(own, self.default_days),
                own.is_some(),
            ),
            holds,
        ))
    }

    /// Sets the organization's retention (`None`: back to the default).
    pub async fn set_days(
        &self,
        organization_id: &str,
        days: Option<u32>,
        by: &str,
    ) -> Result<(), AdminError> {
        check_organization(organization_id)?;
        check_by(by)?;
        if let Some(days) = days {
            if !(MIN_DAYS..=MAX_DAYS).contains(&days) {
                return Err(AdminError::Invalid(format!(
                    "the retention must be {MIN_DAYS} to {MAX_DAYS} days; got {days}"
                )));
            }
        }
        let ((before, _), _) = self.current(organization_id).await?;
        retention::write_policy(
            &self.client,
            &PolicyRow {
                organization_id: organization_id.to_owned(),
                version: retention::version_now(),
                days: days.unwrap_or(0),
                set_by: by.to_owned(),
                set_at_ms: retention::now_ms(),
            },
        )
        .await?;
        let after = days.unwrap_or(self.default_days);
        self.announce(
            organization_id,
            "audit_log.retention_updated",
            by,
            json!({"type": "audit_log", "id": organization_id}),
            vec![json!({"field": "retentionDays", "oldValue": before, "newValue": after})],
            json!({"source": if days.is_some() { "organization" } else { "default" }}),
        )
        .await;
        Ok(())
    }

    /// Places a hold over `[from, to)` (open ends reach the oldest or every later event).
    pub async fn place_hold(
        &self,
        organization_id: &str,
        from_ms: Option<i64>,
        to_ms: Option<i64>,
        reason: &str,
        by: &str,
    ) -> Result<HoldRow, AdminError> {
        check_organization(organization_id)?;
        check_by(by)?;
        let reason = reason.trim();
        if reason.is_empty() || reason.chars().count() > 1_000 {
            return Err(AdminError::Invalid(
                "a legal hold needs a reason of 1 to 1000 characters".into(),
            ));
        }
        if let (Some(from), Some(to)) = (from_ms, to_ms) {
            if from >= to {
                return Err(AdminError::Invalid("--from must be before --to".into()));
            }
        }
        let row = HoldRow {
            organization_id: organization_id.to_owned(),
            hold_id: format!("hold_{}", uuid::Uuid::new_v4().simple()),
            version: retention::version_now(),
            from_ms,
            to_ms,
            reason: reason.to_owned(),
            placed_by: by.to_owned(),
            placed_at_ms: retention::now_ms(),
            lifted_by: String::new(),
            lifted_at_ms: None,
        };
        retention::write_hold(&self.client, &row).await?;
        self.announce(
            organization_id,
            "audit_log.legal_hold_placed",
            by,
            json!({"type": "legal_hold", "id": row.hold_id}),
            Vec::new(),
            json!({
                "from": from_ms.map(format_timestamp),
                "to": to_ms.map(format_timestamp),
                "reason": row.reason,
            }),
        )
        .await;
        Ok(row)
    }

    /// Lifts an active hold: normal expiry resumes for its range.
    pub async fn lift_hold(
        &self,
        organization_id: &str,
        hold_id: &str,
        by: &str,
    ) -> Result<HoldRow, AdminError> {
        check_by(by)?;
        let holds = retention::load_holds(&self.client, Some(organization_id)).await?;
        let Some(hold) = holds.into_iter().find(|h| h.hold_id == hold_id) else {
            return Err(AdminError::NoSuchHold(hold_id.to_owned()));
        };
        if !hold.is_active() {
            return Ok(hold);
        }
        let row = HoldRow {
            version: retention::version_now().max(hold.version + 1),
            lifted_by: by.to_owned(),
            lifted_at_ms: Some(retention::now_ms()),
            ..hold
        };
        retention::write_hold(&self.client, &row).await?;
        self.announce(
            organization_id,
            "audit_log.legal_hold_lifted",
            by,
            json!({"type": "legal_hold", "id": row.hold_id}),
            Vec::new(),
            json!({"reason": row.reason}),
        )
        .await;
        Ok(row)
    }

    /// Publishes the audit event of a change (awaited; a failure is logged and counted, the
    /// change stands).
    pub(super) async fn announce(
        &self,
        organization_id: &str,
        event_type: &str,
        by: &str,
        resource: Value,
        changes: Vec<Value>,
        metadata: Value,
    ) {
        let event = json!({
            "id": format!("evt_{}", uuid::Uuid::new_v4().simple()),
            "type": event_type,
            "occurredAt": format_timestamp(retention::now_ms()),
            "organizationId": organization_id,
            "actor": {"type": "system", "id": "audit-api-cli", "name": by},
            "resource": resource,
            "changes": changes,
            "metadata": metadata,
        });
        if let Err(err) = self.events.send(organization_id, &event).await {
            warn!(error = %err, event_type, organization_id, "could not publish the audit event of a retention change");
        }
    }
}

fn check_organization(organization_id: &str) -> Result<(), AdminError> {
    if organization_id.trim().is_empty() {
        return Err(AdminError::Invalid("--org must not be empty".into()));
    }
    Ok(())
}

/// Who asked: every change names its operator (`--by`).
fn check_by(by: &str) -> Result<(), AdminError> {
    if by.trim().is_empty() || by.chars().count() > 200 {
        return Err(AdminError::Invalid(
            "--by must name who asks for the change (1 to 200 characters)".into(),
        ));
    }
    Ok(())
}
