//! Retention, legal holds and erasure on the API's side (README "Retention, legal hold and
//! erasure"): the snapshot of every organization's retention and holds that scopes each read
//! to the events still held ([`RetentionSnapshot`]), the operator's changes ([`admin`]), the job
//! that removes expired events ([`purge`]) and the erasure of a person ([`erase`]).

pub mod admin;
pub mod commands;
pub mod erase;
pub mod purge;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use audit_store::clickhouse;
use audit_store::retention::{self, HoldRow, Visibility};
pub use audit_store::retention::{ErasedPerson, ErasedSubjects};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::error::ApiError;
use crate::query::Filters;

/// Every organization's retention and active holds, re-read every `retention.refresh_interval_ms`.
/// Until the first read succeeds, reads are refused (503): without it an organization with a
/// short retention could be shown events it no longer holds.
#[derive(Clone)]
pub struct RetentionSnapshot {
    default_days: u32,
    loaded: Arc<RwLock<Option<Loaded>>>,
}

#[derive(Debug, Default)]
struct Loaded {
    days: HashMap<String, u32>,
    holds: HashMap<String, Vec<HoldRow>>,
}

impl RetentionSnapshot {
    pub fn new(default_days: u32) -> Self {
        Self {
            default_days,
            loaded: Arc::default(),
        }
    }

    pub fn default_days(&self) -> u32 {
        self.default_days
    }

    pub fn loaded(&self) -> bool {
        self.loaded.read().is_ok_and(|l| l.is_some())
    }

    pub async fn refresh(
        &self,
        client: &clickhouse::Client,
    ) -> Result<(), clickhouse::error::Error> {
        let (policies, holds) = tokio::try_join!(
            retention::load_policies(client),
            retention::load_holds(client, None)
        )?;
        let mut loaded = Loaded {
            days: policies.into_iter().collect(),
            holds: HashMap::new(),
        };
        for hold in holds.into_iter().filter(HoldRow::is_active) {
            loaded
                .holds
                .entry(hold.organization_id.clone())
                .or_default()
                .push(hold);
        }
        if let Ok(mut slot) = self.loaded.write() {
            *slot = Some(loaded);
        }
        Ok(())
    }

    pub async fn maintain(
        self,
        client: clickhouse::Client,
        every: Duration,
        stop: CancellationToken,
    ) {
        let mut refresh = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = refresh.tick() => {
                    if let Err(err) = self.refresh(&client).await {
                        warn!(error = %err, "retention refresh failed; keeping the previous snapshot");
                    }
                }
            }
        }
    }

    /// The organization's retention in days and whether it is its own (else the default).
    pub fn days_of(&self, organization_id: &str) -> Result<(u32, bool), ApiError> {
        let loaded = self
            .loaded
            .read()
            .map_err(|_| ApiError::RetentionNotLoaded)?;
        let loaded = loaded.as_ref().ok_or(ApiError::RetentionNotLoaded)?;
        Ok(match loaded.days.get(organization_id) {
            Some(days) => (*days, true),
            None => (self.default_days, false),
        })
    }

    /// The organization's active holds.
    pub fn holds_of(&self, organization_id: &str) -> Result<Vec<HoldRow>, ApiError> {
        let loaded = self
            .loaded
            .read()
            .map_err(|_| ApiError::RetentionNotLoaded)?;
        let loaded = loaded.as_ref().ok_or(ApiError::RetentionNotLoaded)?;
        Ok(loaded
            .holds
            .get(organization_id)
            .cloned()
            .unwrap_or_default())
    }

    /// Which of the organization's events it holds at `now_ms`.
    pub fn visibility(&self, organization_id: &str, now_ms: i64) -> Result<Visibility, ApiError> {
        let (days, _) = self.days_of(organization_id)?;
        Ok(Visibility::at(
            now_ms,
            days,
            &self.holds_of(organization_id)?,
        ))
    }

    /// [`Self::visibility`], or the default retention without holds while nothing is loaded.
    pub fn visibility_or_default(&self, organization_id: &str, now_ms: i64) -> Visibility {
        self.visibility(organization_id, now_ms)
            .unwrap_or_else(|_| Visibility::at(now_ms, self.default_days, &[]))
    }

    /// `filters` narrowed to the events the organization holds now: the read paths (pages,
    /// totals, CSV, exports, cursors) all take their filters through here.
    pub fn scope(&self, organization_id: &str, filters: &Filters) -> Result<Filters, ApiError> {
        let visibility = self.visibility(organization_id, retention::now_ms())?;
        Ok(narrow(filters, &visibility))
    }
}

/// `filters` within `visibility`: its bound raises `from`, and the gaps that meet the range are
/// excluded.
pub fn narrow(filters: &Filters, visibility: &Visibility) -> Filters {
    let from_ms = match (filters.from_ms, visibility.from_ms) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    let to_ms = filters.to_ms;
    let gaps = visibility
        .gaps
        .iter()
        .filter(|(start, end)| from_ms.is_none_or(|f| *end > f) && to_ms.is_none_or(|t| *start < t))
        .copied()
        .collect();
    Filters {
        from_ms,
        gaps,
        ..filters.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_is_raised_to_the_bound_and_keeps_only_gaps_it_meets() {
        let visibility = Visibility {
            from_ms: Some(100),
            gaps: vec![(200, 300), (400, 500)],
        };
        let filters = Filters {
            from_ms: Some(50),
            to_ms: Some(350),
            ..Filters::default()
        };
        let narrowed = narrow(&filters, &visibility);
        assert_eq!(narrowed.from_ms, Some(100));
        assert_eq!(narrowed.to_ms, Some(350));
        assert_eq!(narrowed.gaps, vec![(200, 300)]);
        let later = narrow(
            &Filters {
                from_ms: Some(1_000),
                ..Filters::default()
            },
            &visibility,
        );
        assert_eq!((later.from_ms, later.gaps.len()), (Some(1_000), 0));
        assert_eq!(
            narrow(&Filters::default(), &Visibility::default()),
            Filters::default()
        );
    }
}
