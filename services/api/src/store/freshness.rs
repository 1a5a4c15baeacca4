//! How fresh the stored events are: the ingest time of the newest.

use audit_store::EVENTS_TABLE;

use super::sql::Condition;
use super::AuditLogStore;
use super::ReadError;
use crate::partitions::Aggregate;

impl AuditLogStore {
    /// Ingest time of the newest stored event, epoch milliseconds (None on an empty table).
    /// Per month like the counts: only months that received rows since the last call are read.
    pub async fn newest_ingested_at(&self) -> Result<Option<u64>, ReadError> {
        let everything = Condition::on(EVENTS_TABLE);
        let months = self.months(EVENTS_TABLE).await?;
        let newest = self
            .by_month(
                &everything,
                Aggregate::NewestIngestedAt,
                months,
                (None, None),
            )
            .await?
            .value;
        Ok((newest > 0).then_some(newest))
    }
}
