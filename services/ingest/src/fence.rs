//! Exactly once into ClickHouse for the ingest's own re-deliveries: a message that a crash, a
//! restart, a rebalance, a retried insert or a replay delivers again is not stored again.
//!
//! Before a flush inserts, it records per topic partition the highest offset it may store
//! (`ingest_write_intents`, [`Fencing::write_intents`]), then checks that this member still owns
//! the partition in the same assignment ([`Claim`]), and only then inserts. A member that takes
//! a partition over reads that record once (the partition's *fence*): a message at or below it
//! may be stored already, in whole or in part, and is looked up by its source position first
//! ([`Fencing::stored`]); a message above it cannot have been stored by anyone (no insert
//! starts before its intent is recorded) and is inserted unchecked. After a failed insert
//! attempt the rows it carried are looked up the same way before the next attempt, since it may
//! have landed (a timeout after ClickHouse wrote the data, a multi-month insert cut short).
//!
//! Why the order matters: the group hands a partition to a new owner only after the old one
//! gave it up (its revoke callback ran), so an old owner's flush that still saw its claim
//! recorded its intent before that, and the new owner's fence, read after its assignment, covers
//! it. What remains is an insert already sent when the partition moved that lands after the
//! new owner looked its rows up: the duplicate check after insert finds such a copy
//! ([`crate::duplicates`]) and it is collapsed like an upstream duplicate.
//!
//! Longer than most modules: exactly once across takeovers (fences, intents, look-ups and the
//! copy repair) is one protocol, read best in one place.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use audit_store::clickhouse::{self, Row};
use audit_store::{AuditEventRow, ClickHouseConfig, COPY_TABLES, EVENTS_TABLE, INTENTS_TABLE};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::kafka::{IngestContext, PartitionKey};
use crate::locked;
use crate::sink::{classify, ClickHouseError, ClickHouseSink};

/// A flush's claim on its partitions: the assignment each belonged to when the flush started. A
/// partition revoked since (even if assigned back) is no longer held: its messages are read
/// again by the owner of the new assignment, which read its fence after that assignment.
#[derive(Clone)]
pub struct Claim {
    context: Arc<IngestContext>,
    since: BTreeMap<PartitionKey, Instant>,
}

impl Claim {
    pub fn new(context: Arc<IngestContext>, partitions: &BTreeSet<PartitionKey>) -> Self {
        let since = context.assigned_since(partitions);
        Self { context, since }
    }

    /// Whether this member still holds `partition` in the assignment the flush started with.
    pub fn holds(&self, partition: &PartitionKey) -> bool {
        self.since
            .get(partition)
            .is_some_and(|at| self.context.assigned_at(partition) == Some(*at))
    }

    /// Drops the rows of partitions no longer held; returns how many were dropped.
    pub fn retain_held(&self, rows: &mut Vec<AuditEventRow>) -> usize {
        let partitions: BTreeSet<(&str, i32)> = rows
            .iter()
            .map(|r| (r.source_topic.as_str(), r.source_partition))
            .collect();
        let released: BTreeSet<(String, i32)> = partitions
            .into_iter()
            .map(|(topic, partition)| (topic.to_owned(), partition))
            .filter(|key| !self.holds(key))
            .collect();
        if released.is_empty() {
            return 0;
        }
        let before = rows.len();
        rows.retain(|r| {
            !released.iter().any(|(topic, partition)| {
                *partition == r.source_partition && *topic == r.source_topic
            })
        });
        before - rows.len()
    }

    /// The assignment `partition` belonged to when the flush started.
    pub fn epoch(&self, partition: &PartitionKey) -> Option<Instant> {
        self.since.get(partition).copied()
    }
}

/// What is known of a partition's fence: the highest offset that may be stored, as read for
/// one assignment (`epoch`; none for a replay, which owns nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fence {
    epoch: Option<Instant>,
    high: i64,
}

/// The fences of the partitions this process writes, read once per assignment.
#[derive(Default, Clone)]
pub struct Fences {
    known: Arc<Mutex<HashMap<PartitionKey, Fence>>>,
}

/// Whether `partition`'s fence must be read (again) for the assignment `epoch`: it is unknown,
/// or was read for an earlier assignment (the partition was revoked since, and another member
/// may have written it meanwhile).
fn needs_read(
    known: &HashMap<PartitionKey, Fence>,
    partition: &PartitionKey,
    epoch: Option<Instant>,
) -> bool {
    known.get(partition).is_none_or(|f| f.epoch != epoch)
}

/// How the rows of a flush divide under the fences: rows that may be stored already (at or
/// below their partition's fence) and rows that cannot be.
#[derive(Debug, Default, PartialEq)]
pub struct Split {
    pub uncertain: Vec<AuditEventRow>,
    pub fresh: Vec<AuditEventRow>,
}

/// The skip rule: a row whose offset is at or below its partition's fence may be stored
/// already and must be looked up; a row above it, or of a partition with no fence (never
/// written with intents), is inserted as it is.
pub fn split(rows: Vec<AuditEventRow>, fences: &HashMap<PartitionKey, i64>) -> Split {
    if fences.is_empty() {
        return Split {
            uncertain: Vec::new(),
            fresh: rows,
        };
    }
    let fences: HashMap<(&str, i32), i64> = fences
        .iter()
        .map(|((topic, partition), high)| ((topic.as_str(), *partition), *high))
        .collect();
    let (uncertain, fresh) = rows.into_iter().partition(|row| {
        fences
            .get(&(row.source_topic.as_str(), row.source_partition))
            .is_some_and(|high| row.source_offset <= *high)
    });
    Split { uncertain, fresh }
}

/// Which of `rows` are stored already: those whose source position and id are in `stored`.
pub fn partition_stored(
    rows: Vec<AuditEventRow>,
    stored: &HashSet<StoredPosition>,
) -> (Vec<AuditEventRow>, Vec<AuditEventRow>) {
    rows.into_iter()
        .partition(|row| !stored.contains(&StoredPosition::of(row)))
}

/// A stored event's source position and id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Row, Serialize, Deserialize)]
pub struct StoredPosition {
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub id: String,
}

impl StoredPosition {
    pub fn of(row: &AuditEventRow) -> Self {
        Self {
            source_topic: row.source_topic.clone(),
            source_partition: row.source_partition,
            source_offset: row.source_offset,
            id: row.id.clone(),
        }
    }
}

#[derive(Debug, Row, Serialize)]
struct IntentRow<'a> {
    source_topic: &'a str,
    source_partition: i32,
    high_offset: i64,
    written_at_ms: u64,
}

/// Organizations per look-up statement (each adds a key range to the statement's text).
const ORGANIZATIONS_PER_STATEMENT: usize = 100;

/// The ClickHouse side of the fences.
#[derive(Clone)]
pub struct Fencing {
    pub sink: ClickHouseSink,
    pub fences: Fences,
    /// Per copy table (of [`COPY_TABLES`]), the table [`Self::fill_copies`] looks its keys up
    /// in: on a cluster the shard's own table, named with its database (the statement's
    /// `SELECT` runs on each shard, whose default database is not the store's), where the
    /// event's copy rows are (`audit_store::SHARD_KEY`).
    copy_lookups: Vec<String>,
}

impl Fencing {
    pub fn new(sink: ClickHouseSink, store: &ClickHouseConfig) -> Self {
        let topology = store.topology();
        Self {
            sink,
            fences: Fences::default(),
            copy_lookups: COPY_TABLES
                .iter()
                .map(|copy| format!("{}.{}", store.database, topology.local_table(copy.table)))
                .collect(),
        }
    }

    /// Divides `rows` by the fences of their partitions for the claim's assignments (reading the
    /// fences not known for them yet).
    pub async fn split(
        &self,
        rows: Vec<AuditEventRow>,
        claim: Option<&Claim>,
    ) -> Result<Split, ClickHouseError> {
        let epoch = |key: &PartitionKey| claim.and_then(|c| c.epoch(key));
        let partitions: BTreeSet<PartitionKey> = rows
            .iter()
            .map(|r| (r.source_topic.clone(), r.source_partition))
            .collect();
        let missing: Vec<PartitionKey> = {
            let known = locked(&self.fences.known);
            partitions
                .iter()
                .filter(|key| needs_read(&known, key, epoch(key)))
                .cloned()
                .collect()
        };
        if !missing.is_empty() {
            let highs = self
                .sink
                .retry_transient("fence_read", || self.read_fences(&missing))
                .await?;
            let mut known = locked(&self.fences.known);
            for key in missing {
                let high = highs.get(&key).copied().unwrap_or(-1);
                if high >= 0 {
                    info!(
                        topic = key.0,
                        partition = key.1,
                        high,
                        "fence read: offsets at or below it are looked up before insert"
                    );
                }
                let fence = Fence {
                    epoch: epoch(&key),
                    high,
                };
                known.insert(key, fence);
            }
        }
        let highs: HashMap<PartitionKey, i64> = {
            let known = locked(&self.fences.known);
            partitions
                .into_iter()
                .filter_map(|key| {
                    let high = known.get(&key)?.high;
                    (high >= 0).then_some((key, high))
                })
                .collect()
        };
        Ok(split(rows, &highs))
    }

    async fn read_fences(
        &self,
        partitions: &[PartitionKey],
    ) -> Result<HashMap<PartitionKey, i64>, ClickHouseError> {
        let condition =
            vec!["(source_topic = ? AND source_partition = ?)"; partitions.len()].join(" OR ");
        let mut query = self.sink.client().query(&format!(
            "SELECT source_topic, source_partition, max(high_offset) FROM {INTENTS_TABLE} \
             WHERE {condition} GROUP BY source_topic, source_partition"
        ));
        for (topic, partition) in partitions {
            query = query.bind(topic.as_str()).bind(*partition);
        }
        let rows: Vec<(String, i32, i64)> = query.fetch_all().await.map_err(|e| classify(&e))?;
        Ok(rows.into_iter().map(|(t, p, h)| ((t, p), h)).collect())
    }

    /// Records, before an insert of `rows`, the highest offset it may store per partition.
    pub async fn write_intents(&self, rows: &[AuditEventRow]) -> Result<(), ClickHouseError> {
        let mut highs: BTreeMap<(&str, i32), i64> = BTreeMap::new();
        for row in rows {
            let high = highs
                .entry((row.source_topic.as_str(), row.source_partition))
                .or_insert(row.source_offset);
            *high = (*high).max(row.source_offset);
        }
        let now = crate::now_ms();
        let intents: Vec<IntentRow<'_>> = highs
            .into_iter()
            .map(|((topic, partition), high)| IntentRow {
                source_topic: topic,
                source_partition: partition,
                high_offset: high,
                written_at_ms: now,
            })
            .collect();
        if intents.is_empty() {
            return Ok(());
        }
        self.sink
            .retry_transient("fence_write", || async {
                let mut insert = self
                    .sink
                    .client()
                    .insert::<IntentRow<'_>>(INTENTS_TABLE)
                    .await
                    .map_err(|e| classify(&e))?;
                for intent in &intents {
                    insert.write(intent).await.map_err(|e| classify(&e))?;
                }
                insert.end().await.map_err(|e| classify(&e))
            })
            .await
    }

    /// The source positions (with ids) among `rows` that `audit_events` holds, read by the
    /// events' keys (organization and time range) so that only the ranges of these rows are
    /// read.
    pub async fn stored(
        &self,
        rows: &[AuditEventRow],
    ) -> Result<HashSet<StoredPosition>, ClickHouseError> {
        let mut found = HashSet::new();
        let scope = Scope::of(rows);
        for organizations in scope.organizations.chunks(ORGANIZATIONS_PER_STATEMENT) {
            let (sql, binds) = scope.condition(organizations);
            let mut query = self.sink.client().query(&format!(
                "SELECT source_topic, source_partition, source_offset, id FROM {EVENTS_TABLE} \
                 WHERE {sql}"
            ));
            for bind in &binds {
                query = bind.apply(query);
            }
            let rows: Vec<StoredPosition> = query.fetch_all().await.map_err(|e| classify(&e))?;
            found.extend(rows);
        }
        Ok(found)
    }

    /// Fills every copy table (the views' targets) with the rows of `stored` that
    /// `audit_events` holds and the copy lacks: an insert cut short after the events table was
    /// written and before its views were leaves them out, and the skip rule will not insert
    /// the events again.
    pub async fn fill_copies(&self, stored: &[AuditEventRow]) -> Result<(), ClickHouseError> {
        if stored.is_empty() {
            return Ok(());
        }
        let scope = Scope::of(stored);
        for organizations in scope.organizations.chunks(ORGANIZATIONS_PER_STATEMENT) {
            let (sql, binds) = scope.condition(organizations);
            let (keys_sql, key_binds) = scope.key_ranges(organizations);
            for (copy, lookup) in COPY_TABLES.iter().zip(&self.copy_lookups) {
                let statement = format!(
                    "INSERT INTO {copy} SELECT {select} FROM {EVENTS_TABLE} WHERE {sql} \
                     AND ({from_events}) NOT IN (SELECT {key} FROM {lookup} WHERE {keys_sql})",
                    copy = copy.table,
                    select = copy.select,
                    from_events = copy.key_from_events,
                    key = copy.key,
                );
                let mut query = self.sink.client().query(&statement);
                for bind in binds.iter().chain(&key_binds) {
                    query = bind.apply(query);
                }
                query.execute().await.map_err(|e| classify(&e))?;
            }
        }
        Ok(())
    }
}

/// The key ranges (organization, time) and source ranges (partition, offsets) of some rows.
struct Scope {
    /// Per organization, the oldest and newest `occurred_at_ms`.
    organizations: Vec<(String, i64, i64)>,
    /// Per topic partition, the lowest and highest offset.
    sources: Vec<(String, i32, i64, i64)>,
}

enum Bind {
    Text(String),
    Int(i64),
}

impl Bind {
    fn apply(&self, query: clickhouse::query::Query) -> clickhouse::query::Query {
        match self {
            Bind::Text(text) => query.bind(text.as_str()),
            Bind::Int(n) => query.bind(*n),
        }
    }
}

impl Scope {
    fn of(rows: &[AuditEventRow]) -> Self {
        let mut organizations: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
        let mut sources: BTreeMap<(&str, i32), (i64, i64)> = BTreeMap::new();
        for row in rows {
            let span = organizations
                .entry(row.organization_id.as_str())
                .or_insert((row.occurred_at_ms, row.occurred_at_ms));
            span.0 = span.0.min(row.occurred_at_ms);
            span.1 = span.1.max(row.occurred_at_ms);
            let range = sources
                .entry((row.source_topic.as_str(), row.source_partition))
                .or_insert((row.source_offset, row.source_offset));
            range.0 = range.0.min(row.source_offset);
            range.1 = range.1.max(row.source_offset);
        }
        Self {
            organizations: organizations
                .into_iter()
                .map(|(org, (lo, hi))| (org.to_owned(), lo, hi))
                .collect(),
            sources: sources
                .into_iter()
                .map(|((topic, partition), (lo, hi))| (topic.to_owned(), partition, lo, hi))
                .collect(),
        }
    }

    /// `WHERE` text over `audit_events` (key ranges of `organizations`, then source ranges).
    fn condition(&self, organizations: &[(String, i64, i64)]) -> (String, Vec<Bind>) {
        let (keys, mut binds) = self.key_ranges(organizations);
        let sources =
            vec![
                "(source_topic = ? AND source_partition = ? AND source_offset >= ? AND source_offset <= ?)";
                self.sources.len()
            ]
            .join(" OR ");
        for (topic, partition, lo, hi) in &self.sources {
            binds.push(Bind::Text(topic.clone()));
            binds.push(Bind::Int(i64::from(*partition)));
            binds.push(Bind::Int(*lo));
            binds.push(Bind::Int(*hi));
        }
        (format!("{keys} AND ({sources})"), binds)
    }

    /// `WHERE` text selecting the key ranges of `organizations` (any table sorted by
    /// organization and time after its first column).
    fn key_ranges(&self, organizations: &[(String, i64, i64)]) -> (String, Vec<Bind>) {
        let text = vec![
            "(organization_id = ? AND occurred_at_ms >= ? AND occurred_at_ms <= ?)";
            organizations.len()
        ]
        .join(" OR ");
        let binds = organizations
            .iter()
            .flat_map(|(org, lo, hi)| [Bind::Text(org.clone()), Bind::Int(*lo), Bind::Int(*hi)])
            .collect();
        (format!("({text})"), binds)
    }
}

/// Logs what a look-up found, for the operator reading a restart's logs.
pub fn report_skipped(skipped: usize, looked_up: usize) {
    if skipped > 0 {
        warn!(
            skipped,
            looked_up, "re-delivered events already stored; not stored again"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(topic: &str, partition: i32, offset: i64) -> AuditEventRow {
        AuditEventRow {
            organization_id: "org_a".into(),
            occurred_at_ms: 1_000 + offset,
            id: format!("evt_{topic}_{partition}_{offset}"),
            source_topic: topic.into(),
            source_partition: partition,
            source_offset: offset,
            ..AuditEventRow::default()
        }
    }

    fn offsets(rows: &[AuditEventRow]) -> Vec<(i32, i64)> {
        rows.iter()
            .map(|r| (r.source_partition, r.source_offset))
            .collect()
    }

    #[test]
    fn rows_at_or_below_the_fence_are_looked_up_and_rows_above_are_not() {
        let fences = HashMap::from([(("users".to_owned(), 0), 100)]);
        let rows = vec![
            row("users", 0, 99),
            row("users", 0, 100),
            row("users", 0, 101),
        ];
        let split = split(rows, &fences);
        assert_eq!(offsets(&split.uncertain), [(0, 99), (0, 100)]);
        assert_eq!(offsets(&split.fresh), [(0, 101)]);
    }

    #[test]
    fn after_a_rebalance_the_new_owner_checks_what_the_old_one_may_have_stored() {
        // The old owner committed up to 150 and recorded intents up to 200 (its last flush
        // landed, or half of it did, before it died); the new owner reads from 150.
        let fences = HashMap::from([(("users".to_owned(), 3), 200)]);
        let redelivered: Vec<AuditEventRow> = (150..260).map(|o| row("users", 3, o)).collect();
        let split = split(redelivered, &fences);
        assert_eq!(split.uncertain.len(), 51, "150..=200 looked up");
        assert_eq!(split.fresh.len(), 59, "201..260 inserted unchecked");
        // Half of the old owner's last flush landed (a multi-month insert cut short).
        let stored: HashSet<StoredPosition> = (150..=200)
            .filter(|o| o % 2 == 0)
            .map(|o| StoredPosition::of(&row("users", 3, o)))
            .collect();
        let (insert, skip) = partition_stored(split.uncertain, &stored);
        assert_eq!(skip.len(), 26);
        assert!(insert.iter().all(|r| r.source_offset % 2 == 1));
    }

    #[test]
    fn a_fence_holds_for_its_own_partition_and_topic_only() {
        let fences = HashMap::from([(("users".to_owned(), 1), 500)]);
        let rows = vec![
            row("users", 0, 10),
            row("teams", 1, 10),
            row("users", 1, 10),
        ];
        let split = split(rows, &fences);
        assert_eq!(offsets(&split.uncertain), [(1, 10)]);
        assert_eq!(split.uncertain[0].source_topic, "users");
        assert_eq!(
            split.fresh.len(),
            2,
            "partitions without a fence go in unchecked"
        );
    }

    #[test]
    fn a_replay_from_the_start_looks_up_everything_up_to_the_fence() {
        // The group's offsets reset to 0 (or `audit-ingest replay`): all of 0..=fence may be
        // stored, and only what the look-up finds is skipped.
        let fences = HashMap::from([(("users".to_owned(), 0), 2)]);
        let rows: Vec<AuditEventRow> = (0..5).map(|o| row("users", 0, o)).collect();
        let split = split(rows, &fences);
        assert_eq!(offsets(&split.uncertain), [(0, 0), (0, 1), (0, 2)]);
        let stored = HashSet::from([
            StoredPosition::of(&row("users", 0, 0)),
            StoredPosition::of(&row("users", 0, 2)),
        ]);
        let (insert, skip) = partition_stored(split.uncertain, &stored);
        assert_eq!(
            offsets(&insert),
            [(0, 1)],
            "a gap left by a partial insert is filled"
        );
        assert_eq!(offsets(&skip), [(0, 0), (0, 2)]);
    }

    #[test]
    fn a_stored_row_is_the_same_message_only_with_the_same_id() {
        // The topic was re-created: offset 3 is another message now.
        let stored = HashSet::from([StoredPosition {
            id: "evt_of_the_old_topic".into(),
            ..StoredPosition::of(&row("users", 0, 3))
        }]);
        let (insert, skip) = partition_stored(vec![row("users", 0, 3)], &stored);
        assert_eq!((insert.len(), skip.len()), (1, 0));
    }

    #[test]
    fn a_new_assignment_reads_its_fence_again() {
        let first = Instant::now();
        let key = ("users".to_owned(), 0);
        let known = HashMap::from([(
            key.clone(),
            Fence {
                epoch: Some(first),
                high: 7,
            },
        )]);
        let later = first + std::time::Duration::from_millis(1);
        assert!(
            !needs_read(&known, &key, Some(first)),
            "same assignment: known"
        );
        assert!(
            needs_read(&known, &key, Some(later)),
            "revoked and assigned again: read again"
        );
        assert!(needs_read(&known, &key, None), "a replay reads its own");
        assert!(needs_read(&known, &("users".to_owned(), 1), Some(first)));
    }

    #[test]
    fn scope_covers_each_organization_and_partition_once() {
        let mut rows = vec![row("users", 0, 5), row("users", 0, 9), row("teams", 2, 1)];
        rows[2].organization_id = "org_b".into();
        let scope = Scope::of(&rows);
        assert_eq!(
            scope.organizations,
            [
                ("org_a".to_owned(), 1_005, 1_009),
                ("org_b".to_owned(), 1_001, 1_001)
            ]
        );
        assert_eq!(
            scope.sources,
            [("teams".to_owned(), 2, 1, 1), ("users".to_owned(), 0, 5, 9)]
        );
        let (sql, binds) = scope.condition(&scope.organizations);
        assert_eq!(sql.matches('?').count(), binds.len());
        assert!(sql.starts_with("((organization_id = ?"), "{sql}");
    }
}
