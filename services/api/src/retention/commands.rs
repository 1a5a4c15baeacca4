//! The operator's commands (`audit-api retention|hold|erase|erasures`), printing JSON.

use std::time::Duration;

use anyhow::Context;
use audit_store::retention;
use serde_json::json;

use super::admin::{self, HoldView, RetentionAdmin};
use super::erase::{Eraser, ErasureView};
use super::purge::Job;
use crate::cli::{HoldCommand, RetentionCommand};
use crate::config::ApiConfig;
use crate::metrics::ApiMetrics;
use crate::read_events::ReadEventPublisher;
use crate::store::AuditLogStore;

/// What the commands share: the admin (changes and their audit events) and the job.
pub struct Operator {
    pub admin: RetentionAdmin,
    pub job: Job,
    config: ApiConfig,
}

impl Operator {
    pub fn new(config: &ApiConfig) -> anyhow::Result<Self> {
        let events = ReadEventPublisher::new(&config.read_events, ApiMetrics::new())?;
        Ok(Self {
            admin: RetentionAdmin::new(
                config.clickhouse.client(),
                config.retention.default_days,
                events,
            ),
            job: Job::new(
                &config.clickhouse,
                config.retention.job_timeout_seconds,
                config.retention.default_days,
            ),
            config: config.clone(),
        })
    }

    pub fn eraser(&self) -> Eraser<'_> {
        Eraser::new(
            &self.job,
            &self.admin,
            self.config.retention.pseudonym_key.as_ref(),
            Duration::from_millis(self.config.retention.erasure_settle_ms),
        )
    }

    pub async fn retention(&self, command: RetentionCommand) -> anyhow::Result<serde_json::Value> {
        Ok(match command {
            RetentionCommand::Show { org } => {
                let (days, holds) = self.admin.current(&org).await?;
                let store = AuditLogStore::new(
                    &self.config.clickhouse,
                    &self.config.query,
                    ApiMetrics::new(),
                );
                serde_json::to_value(
                    admin::view(&store, &org, days, &holds, retention::now_ms()).await?,
                )?
            }
            RetentionCommand::Set { org, days, by } => {
                self.admin.set_days(&org, Some(days), &by).await?;
                self.show(&org).await?
            }
            RetentionCommand::Clear { org, by } => {
                self.admin.set_days(&org, None, &by).await?;
                self.show(&org).await?
            }
            RetentionCommand::Run => {
                let erasures = self
                    .eraser()
                    .resume_all()
                    .await
                    .context("finishing erasures left running")?;
                let purge = self
                    .job
                    .purge(retention::now_ms())
                    .await
                    .context("removing expired events")?;
                json!({"erasuresFinished": erasures, "purge": purge})
            }
        })
    }

    async fn show(&self, org: &str) -> anyhow::Result<serde_json::Value> {
        Box::pin(self.retention(RetentionCommand::Show {
            org: org.to_owned(),
        }))
        .await
    }

    pub async fn hold(&self, command: HoldCommand) -> anyhow::Result<serde_json::Value> {
        Ok(match command {
            HoldCommand::Place {
                org,
                reason,
                from,
                to,
                by,
            } => {
                let time = |name: &str, value: Option<String>| -> anyhow::Result<Option<i64>> {
                    value
                        .map(|v| {
                            chrono::DateTime::parse_from_rfc3339(&v)
                                .map(|t| t.timestamp_millis())
                                .with_context(|| {
                                    format!("--{name} must be an RFC 3339 date-time, e.g. 2025-01-01T00:00:00Z; got {v:?}")
                                })
                        })
                        .transpose()
                };
                let (from, to) = (time("from", from)?, time("to", to)?);
                let row = self.admin.place_hold(&org, from, to, &reason, &by).await?;
                serde_json::to_value(HoldView::from(&row))?
            }
            HoldCommand::List { org } => {
                let holds = retention::load_holds(self.admin.client(), org.as_deref()).await?;
                let data: Vec<serde_json::Value> = holds
                    .iter()
                    .map(|h| {
                        let mut v = serde_json::to_value(HoldView::from(h)).unwrap_or_default();
                        v["organizationId"] = json!(h.organization_id);
                        v["active"] = json!(h.is_active());
                        v
                    })
                    .collect();
                json!({ "data": data })
            }
            HoldCommand::Lift { org, id, by } => {
                serde_json::to_value(HoldView::from(&self.admin.lift_hold(&org, &id, &by).await?))?
            }
        })
    }

    pub async fn erase(&self, org: &str, user: &str, by: &str) -> anyhow::Result<ErasureView> {
        Ok(self.eraser().erase(org, user, by).await?)
    }

    pub async fn erasures(&self, org: &str) -> anyhow::Result<serde_json::Value> {
        let rows = self.eraser().erasures(org).await?;
        let data: Vec<ErasureView> = rows.iter().map(ErasureView::from).collect();
        Ok(json!({ "data": data }))
    }
}
