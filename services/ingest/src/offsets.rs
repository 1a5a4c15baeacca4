//! The offsets this member made durable, kept so that a commit that failed is made again.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use crate::kafka::PartitionKey;

/// How often a failed offset commit is tried again (while commits keep failing, e.g. during a
/// rebalance).
pub(crate) const COMMIT_RETRY_EVERY: Duration = Duration::from_secs(1);

/// The offsets this member made durable, per partition it owns, and whether a commit of them
/// failed. A commit that fails (during a rebalance, say) is tried again with them, also when no
/// more messages arrive on the partition to carry a later commit: otherwise the committed
/// offset stays behind for good, every lag monitor shows lag that is not there, and a restart
/// reads the events again.
#[derive(Debug, Default)]
pub(crate) struct DurableOffsets {
    next: BTreeMap<PartitionKey, i64>,
    retry: bool,
    last_retry: Option<Instant>,
}

impl DurableOffsets {
    pub(crate) fn record(&mut self, next_offsets: &BTreeMap<PartitionKey, i64>) {
        for (key, next) in next_offsets {
            let entry = self.next.entry(key.clone()).or_insert(*next);
            *entry = (*entry).max(*next);
        }
    }

    pub(crate) fn forget(&mut self, revoked: &BTreeSet<PartitionKey>) {
        self.next.retain(|key, _| !revoked.contains(key));
    }

    /// Whether anything could need committing again: the loop wakes up for it.
    pub(crate) fn watching(&self) -> bool {
        self.retry || !self.next.is_empty()
    }

    /// The offsets to commit again now: after a failure, at most once per
    /// `COMMIT_RETRY_EVERY`.
    pub(crate) fn due(
        &mut self,
        failed: bool,
        now: Instant,
    ) -> Option<&BTreeMap<PartitionKey, i64>> {
        self.retry |= failed;
        let too_soon = self
            .last_retry
            .is_some_and(|at| now < at + COMMIT_RETRY_EVERY);
        if !self.retry || too_soon || self.next.is_empty() {
            return None;
        }
        self.retry = false;
        self.last_retry = Some(now);
        Some(&self.next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offsets(entries: &[(&str, i32, i64)]) -> BTreeMap<PartitionKey, i64> {
        entries
            .iter()
            .map(|(t, p, o)| (((*t).to_owned(), *p), *o))
            .collect()
    }

    #[test]
    fn a_failed_commit_is_retried_once_per_interval_with_the_highest_durable_offsets() {
        let mut durable = DurableOffsets::default();
        let t0 = Instant::now();
        assert!(durable.due(false, t0).is_none(), "nothing to commit");
        durable.record(&offsets(&[("a", 0, 10), ("a", 1, 5)]));
        durable.record(&offsets(&[("a", 0, 20)]));
        assert!(durable.due(false, t0).is_none(), "no failure, no retry");
        assert_eq!(
            durable.due(true, t0),
            Some(&offsets(&[("a", 0, 20), ("a", 1, 5)]))
        );
        // It failed again at once: the next try waits for the interval.
        assert!(durable.due(true, t0 + Duration::from_millis(10)).is_none());
        assert!(durable
            .due(false, t0 + COMMIT_RETRY_EVERY - Duration::from_millis(1))
            .is_none());
        assert!(durable.due(false, t0 + COMMIT_RETRY_EVERY).is_some());
        assert!(
            durable.due(false, t0 + COMMIT_RETRY_EVERY * 3).is_none(),
            "done"
        );
    }

    #[test]
    fn revoked_partitions_are_not_committed_again() {
        let mut durable = DurableOffsets::default();
        durable.record(&offsets(&[("a", 0, 10), ("a", 1, 5)]));
        durable.forget(&BTreeSet::from([("a".to_owned(), 0)]));
        assert_eq!(
            durable.due(true, Instant::now()),
            Some(&offsets(&[("a", 1, 5)]))
        );
        durable.forget(&BTreeSet::from([("a".to_owned(), 1)]));
        assert!(!durable.watching());
    }
}
