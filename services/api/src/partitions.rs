//! Aggregates over a table (stored-row counts, the newest ingest time) kept per ClickHouse
//! partition for as long as that partition's parts stay the same.
//!
//! Every table the read path aggregates is partitioned by the month of `occurred_at_ms`
//! (`toYYYYMM`, migrations 0001 and 0004), and a MergeTree part never changes once written: an
//! insert adds a part, a merge or a mutation replaces parts with new ones under new names. The
//! set of active part names of a partition therefore identifies its content, and an aggregate
//! over a partition stays exact until that set changes. A request lists the parts (one
//! `system.parts` query, about 2 ms), reuses what it knows for unchanged partitions and has
//! ClickHouse compute the others in one query. Partitions hold disjoint rows (by event time), so
//! a sum of per-partition counts, each exact at some moment during the request, never counts a
//! row twice; a live system recounts only the months that received events since the last request.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use chrono::{NaiveDate, TimeZone, Utc};
use lru::LruCache;

/// What is computed per partition, and how partitions combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Aggregate {
    /// Stored rows (re-deliveries not merged yet included).
    Count,
    /// Newest `ingested_at_ms` (0 for no rows).
    NewestIngestedAt,
}

impl Aggregate {
    pub fn sql(self) -> &'static str {
        match self {
            Aggregate::Count => "count()",
            Aggregate::NewestIngestedAt => "max(ingested_at_ms)",
        }
    }

    /// The query kind in the metrics.
    pub fn label(self) -> &'static str {
        match self {
            Aggregate::Count => "count",
            Aggregate::NewestIngestedAt => "newest_ingested_at",
        }
    }

    fn combine(self, a: u64, b: u64) -> u64 {
        match self {
            Aggregate::Count => a.saturating_add(b),
            Aggregate::NewestIngestedAt => a.max(b),
        }
    }
}

/// One partition of a month-partitioned table as `system.parts` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Month {
    /// `partition_id`, e.g. `202501`.
    pub id: String,
    /// Inclusive start, epoch ms (UTC).
    pub start_ms: i64,
    /// Exclusive end, epoch ms (UTC).
    pub end_ms: i64,
    /// Identifies the partition's content: a hash of its active part names.
    digest: u64,
    /// One part, written by a merge: ReplacingMergeTree kept one row per sorting key, so the
    /// month holds no re-delivery and its stored rows are its distinct events.
    pub merged: bool,
}

impl Month {
    /// Whether the whole month lies within `[from, to)`.
    pub fn within(&self, from_ms: Option<i64>, to_ms: Option<i64>) -> bool {
        from_ms.is_none_or(|from| from <= self.start_ms) && to_ms.is_none_or(|to| to >= self.end_ms)
    }

    /// Whether any instant of `[from, to)` falls in this month.
    pub fn meets(&self, from_ms: Option<i64>, to_ms: Option<i64>) -> bool {
        from_ms.is_none_or(|from| from < self.end_ms) && to_ms.is_none_or(|to| to > self.start_ms)
    }
}

/// One active part as `system.parts` lists it: `(partition_id, name, level)`; level 0 is an
/// insert, above 0 a merge. On a cluster the name is `<shard number>/<name>`: each shard
/// names its own parts.
pub type Part = (String, String, u32);

/// Whether a month's parts are one merged part per shard: then no event is stored twice in it
/// (the copies of an event are on one shard).
fn merged(parts: &[(&str, u32)]) -> bool {
    let mut per_shard: BTreeMap<&str, usize> = BTreeMap::new();
    for (name, level) in parts {
        if *level == 0 {
            return false;
        }
        let shard = name.split_once('/').map_or("", |(shard, _)| shard);
        *per_shard.entry(shard).or_default() += 1;
    }
    !per_shard.is_empty() && per_shard.values().all(|&n| n == 1)
}

/// The months of a table from its active parts, or None when a partition id is not a `YYYYMM`
/// month (the table is not partitioned as this module assumes).
pub fn months(parts: &[Part]) -> Option<Vec<Month>> {
    let mut by_partition: BTreeMap<&str, Vec<(&str, u32)>> = BTreeMap::new();
    for (partition, part, level) in parts {
        by_partition
            .entry(partition)
            .or_default()
            .push((part, *level));
    }
    by_partition
        .into_iter()
        .map(|(id, mut parts)| {
            let (start_ms, end_ms) = month_bounds(id)?;
            parts.sort_unstable();
            let mut hasher = DefaultHasher::new();
            parts.hash(&mut hasher);
            Some(Month {
                id: id.to_owned(),
                start_ms,
                end_ms,
                digest: hasher.finish(),
                merged: merged(&parts),
            })
        })
        .collect()
}

/// Whether every month meeting `[from, to)` is [`Month::merged`] (true for none).
pub fn all_merged(months: &[Month], from_ms: Option<i64>, to_ms: Option<i64>) -> bool {
    months
        .iter()
        .filter(|m| m.meets(from_ms, to_ms))
        .all(|m| m.merged)
}

/// `[first instant, first instant of the next month)` of a `YYYYMM` partition id, epoch ms UTC.
fn month_bounds(id: &str) -> Option<(i64, i64)> {
    if id.len() != 6 || !id.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let year: i32 = id[..4].parse().ok()?;
    let month: u32 = id[4..].parse().ok()?;
    let first = NaiveDate::from_ymd_opt(year, month, 1)?;
    let next = first.checked_add_months(chrono::Months::new(1))?;
    let ms = |day: NaiveDate| {
        Some(
            Utc.from_utc_datetime(&day.and_hms_opt(0, 0, 0)?)
                .timestamp_millis(),
        )
    };
    Some((ms(first)?, ms(next)?))
}

/// Which aggregate over which rows: the table, the aggregate and the bound condition.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AggregateKey {
    pub table: &'static str,
    pub aggregate: Aggregate,
    /// The `WHERE` text and its bound values, rendered: equal keys select equal rows.
    pub condition: String,
}

/// What a request must still compute, and the part it already knows.
#[derive(Debug)]
pub struct Plan {
    /// The aggregate over the months that did not change.
    pub known: u64,
    /// Months to compute (changed, or never computed for this key).
    pub missing: Vec<Month>,
    /// Months taken from the cache, with their values.
    pub reused: Vec<(String, u64)>,
}

/// Month id -> (digest of its parts, value) for one key.
type Known = Arc<HashMap<String, (u64, u64)>>;

/// Per-partition results by [`AggregateKey`], least recently used dropped past `capacity` keys.
pub struct PartitionCache {
    entries: Option<Mutex<LruCache<AggregateKey, Known>>>,
}

impl PartitionCache {
    /// A capacity of 0 keeps nothing: every request computes every month.
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: NonZeroUsize::new(capacity).map(|c| Mutex::new(LruCache::new(c))),
        }
    }

    /// Splits the months that meet `[from, to)` into known ones (summed) and missing ones.
    pub fn plan(
        &self,
        key: &AggregateKey,
        months: Vec<Month>,
        from_ms: Option<i64>,
        to_ms: Option<i64>,
    ) -> Plan {
        let months = months.into_iter().filter(|m| m.meets(from_ms, to_ms));
        let known_values = self
            .entries
            .as_ref()
            .and_then(|entries| entries.lock().ok()?.get(key).cloned());
        let mut plan = Plan {
            known: 0,
            missing: Vec::new(),
            reused: Vec::new(),
        };
        for month in months {
            match known_values.as_ref().and_then(|k| k.get(&month.id)) {
                Some(&(digest, value)) if digest == month.digest => {
                    plan.known = key.aggregate.combine(plan.known, value);
                    plan.reused.push((month.id.clone(), value));
                }
                _ => plan.missing.push(month),
            }
        }
        plan
    }

    /// Whether anything is kept between requests (`query.count_cache_entries` > 0).
    pub fn enabled(&self) -> bool {
        self.entries.is_some()
    }

    /// The last value kept for each month under `key`, whatever the month's parts are now.
    /// For a count, a value whose month changed since is a lower bound of its stored rows as
    /// long as rows are only added (a merge that collapses a copy lowers it by that copy).
    pub fn last_values(&self, key: &AggregateKey) -> HashMap<String, u64> {
        let Some(known) = self
            .entries
            .as_ref()
            .and_then(|entries| entries.lock().ok()?.peek(key).cloned())
        else {
            return HashMap::new();
        };
        known
            .iter()
            .map(|(month, (_, value))| (month.clone(), *value))
            .collect()
    }

    /// Remembers the values of the plan's missing months (by month id) and returns the
    /// aggregate over every month of the plan. Other months of the key stay as they were (a
    /// request may plan only some months); a month no longer listed is never planned, so its
    /// entry is never used again and goes with its key.
    pub fn complete(&self, key: &AggregateKey, plan: Plan, computed: &[(String, u64)]) -> u64 {
        let computed: HashMap<&str, u64> = computed.iter().map(|(m, v)| (m.as_str(), *v)).collect();
        let total = computed
            .values()
            .fold(plan.known, |acc, v| key.aggregate.combine(acc, *v));
        if plan.missing.is_empty() {
            return total;
        }
        let Some(entries) = &self.entries else {
            return total;
        };
        let Ok(mut entries) = entries.lock() else {
            return total;
        };
        let mut remembered = entries
            .get(key)
            .map(|known| known.as_ref().clone())
            .unwrap_or_default();
        for month in &plan.missing {
            if let Some(value) = computed.get(month.id.as_str()) {
                remembered.insert(month.id.clone(), (month.digest, *value));
            }
        }
        entries.put(key.clone(), Arc::new(remembered));
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parts named `<partition>_<min>_<max>_<level>`, as ClickHouse names them.
    fn parts(list: &[(&str, &str)]) -> Vec<Part> {
        list.iter()
            .map(|(p, n)| {
                let level = n.rsplit('_').next().unwrap().parse().unwrap();
                (p.to_string(), n.to_string(), level)
            })
            .collect()
    }

    fn key() -> AggregateKey {
        AggregateKey {
            table: "audit_events",
            aggregate: Aggregate::Count,
            condition: "organization_id = 'a'".to_owned(),
        }
    }

    /// January and February 2025, one part each, as inserted.
    fn jan_feb() -> Vec<Month> {
        months(&parts(&[
            ("202501", "202501_1_1_0"),
            ("202502", "202502_2_2_0"),
        ]))
        .unwrap()
    }

    #[test]
    fn partition_ids_map_to_utc_months() {
        let m = months(&parts(&[
            ("202412", "202412_1_1_0"),
            ("202501", "202501_2_2_0"),
        ]))
        .unwrap();
        assert_eq!(m[0].start_ms, 1_733_011_200_000); // 2024-12-01T00:00:00Z
        assert_eq!(m[0].end_ms, 1_735_689_600_000); // 2025-01-01T00:00:00Z
        assert_eq!(m[1].start_ms, 1_735_689_600_000);
        assert!(m[1].meets(Some(1_735_689_600_000), None));
        assert!(!m[0].meets(Some(1_735_689_600_000), None));
        assert!(!m[1].meets(None, Some(1_735_689_600_000)));
        assert!(months(&parts(&[("all", "all_1_1_0")])).is_none());
        assert!(months(&parts(&[("202513", "202513_1_1_0")])).is_none());
    }

    #[test]
    fn a_month_is_reused_until_its_parts_change() {
        let cache = PartitionCache::new(10);
        let before = jan_feb();
        let plan = cache.plan(&key(), before.clone(), None, None);
        assert_eq!(plan.missing.len(), 2);
        let computed = vec![("202501".to_owned(), 10), ("202502".to_owned(), 5)];
        assert_eq!(cache.complete(&key(), plan, &computed), 15);

        let plan = cache.plan(&key(), before, None, None);
        assert!(plan.missing.is_empty());
        assert_eq!(cache.complete(&key(), plan, &[]), 15);

        // An insert into February, a merge in January: both months are recomputed.
        let after = months(&parts(&[
            ("202501", "202501_1_3_1"),
            ("202502", "202502_2_2_0"),
            ("202502", "202502_4_4_0"),
        ]))
        .unwrap();
        let plan = cache.plan(&key(), after.clone(), None, None);
        assert_eq!(plan.missing.len(), 2);
        let computed = vec![("202501".to_owned(), 10), ("202502".to_owned(), 7)];
        assert_eq!(cache.complete(&key(), plan, &computed), 17);

        // A month dropped from the table is no longer counted.
        let plan = cache.plan(&key(), after[1..].to_vec(), None, None);
        assert!(plan.missing.is_empty());
        assert_eq!(cache.complete(&key(), plan, &[]), 7);
    }

    #[test]
    fn only_months_in_range_are_planned_and_keys_do_not_mix() {
        let cache = PartitionCache::new(10);
        let all = jan_feb();
        let feb = Some(1_738_368_000_000); // 2025-02-01T00:00:00Z
        let plan = cache.plan(&key(), all.clone(), feb, None);
        assert_eq!(plan.missing.len(), 1);
        assert_eq!(plan.missing[0].id, "202502");
        assert_eq!(cache.complete(&key(), plan, &[("202502".to_owned(), 3)]), 3);

        let newest = AggregateKey {
            aggregate: Aggregate::NewestIngestedAt,
            ..key()
        };
        let plan = cache.plan(&newest, all, None, None);
        assert_eq!(plan.missing.len(), 2);
        let computed = vec![("202501".to_owned(), 9), ("202502".to_owned(), 4)];
        assert_eq!(cache.complete(&newest, plan, &computed), 9);
    }

    #[test]
    fn on_a_cluster_one_merged_part_per_shard_makes_a_month_duplicate_free() {
        let part = |name: &str, level| ("202501".to_owned(), name.to_owned(), level);
        let merged = |parts: &[Part]| months(parts).unwrap()[0].merged;
        assert!(merged(&[
            part("1/202501_1_9_2", 2),
            part("2/202501_1_7_1", 1)
        ]));
        assert!(!merged(&[
            part("1/202501_1_9_2", 2),
            part("2/202501_8_8_0", 0)
        ]));
        assert!(!merged(&[
            part("1/202501_1_9_2", 2),
            part("2/202501_1_7_1", 1),
            part("2/202501_8_9_1", 1)
        ]));
    }

    #[test]
    fn only_a_single_merged_part_makes_a_month_duplicate_free() {
        let m = months(&parts(&[
            ("202501", "202501_1_1_0"),
            ("202502", "202502_2_5_1"),
            ("202503", "202503_3_6_1"),
            ("202503", "202503_7_7_0"),
        ]))
        .unwrap();
        assert_eq!(
            m.iter().map(|m| m.merged).collect::<Vec<_>>(),
            [false, true, false]
        );
        let (feb, mar) = (Some(m[1].start_ms), Some(m[2].start_ms));
        assert!(all_merged(&m, feb, mar));
        assert!(!all_merged(&m, feb, None));
        assert!(!all_merged(&m, None, mar));
        assert!(all_merged(&[], None, None));
    }

    /// This module reads a partition id `YYYYMM` as the month of `occurred_at_ms`: every table it
    /// aggregates must be partitioned exactly that way.
    #[test]
    fn every_partitioned_table_is_partitioned_by_the_month_of_occurred_at() {
        let expected = "PARTITION BY toYYYYMM(toDateTime(intDiv(occurred_at_ms, 1000), 'UTC'))";
        let mut tables = Vec::new();
        for migration in audit_store::migrations::MIGRATIONS {
            for statement in migration.statements() {
                let Some(at) = statement.find("PARTITION BY") else {
                    continue;
                };
                let line = statement[at..].lines().next().unwrap().trim();
                assert_eq!(line, expected, "migration {}", migration.name);
                let created = statement.split("CREATE TABLE IF NOT EXISTS").nth(1);
                let table = created.and_then(|rest| rest.split_whitespace().next());
                tables.push(table.expect("a partitioned CREATE TABLE").to_owned());
            }
        }
        tables.sort();
        let mut aggregated = [
            audit_store::EVENTS_TABLE,
            crate::store::BY_TYPE_TABLE,
            crate::store::BY_ACTOR_EMAIL_TABLE,
            // Migration 0004's key-only actor-email table, no longer read (see 0005).
            "audit_events_by_actor_email",
        ];
        aggregated.sort();
        assert_eq!(tables, aggregated);
    }

    #[test]
    fn a_request_for_some_months_keeps_the_others() {
        let cache = PartitionCache::new(10);
        let both = jan_feb();
        let plan = cache.plan(&key(), both.clone(), None, None);
        let computed = vec![("202501".to_owned(), 10), ("202502".to_owned(), 5)];
        assert_eq!(cache.complete(&key(), plan, &computed), 15);
        // February changes and is asked for alone; January stays known.
        let feb = months(&parts(&[("202502", "202502_2_3_1")])).unwrap();
        let plan = cache.plan(&key(), feb, None, None);
        assert_eq!(cache.complete(&key(), plan, &[("202502".to_owned(), 6)]), 6);
        let mut now = both;
        now[1] = months(&parts(&[("202502", "202502_2_3_1")]))
            .unwrap()
            .remove(0);
        let plan = cache.plan(&key(), now, None, None);
        assert!(plan.missing.is_empty());
        assert_eq!(cache.complete(&key(), plan, &[]), 16);
        // Whole months of a range, and the edges.
        let (jan, feb) = (&jan_feb()[0], &jan_feb()[1]);
        assert!(jan.within(None, Some(feb.start_ms)));
        assert!(!jan.within(Some(jan.start_ms + 1), None));
        assert!(!feb.within(None, Some(feb.end_ms - 1)));
    }

    #[test]
    fn capacity_zero_computes_every_time() {
        let cache = PartitionCache::new(0);
        let m = months(&parts(&[("202501", "202501_1_1_0")])).unwrap();
        let plan = cache.plan(&key(), m.clone(), None, None);
        assert_eq!(cache.complete(&key(), plan, &[("202501".to_owned(), 1)]), 1);
        assert_eq!(cache.plan(&key(), m, None, None).missing.len(), 1);
    }
}
