//! The directory projection: the latest known email of each user and name of each team, per
//! organization, folded from the events themselves and stored in ClickHouse. Used to fill
//! `actor.email`, `affectedUser.email` and a team's `resource.name` when a producer sent ids only.
//!
//! Longer than most modules: the cache, its look-ups and the table it folds into are one
//! projection.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use audit_store::clickhouse::{self, Row};
use audit_store::{
    AuditEventRow, DirectoryTeamRow, DirectoryUserRow, DIRECTORY_TEAMS_TABLE, DIRECTORY_USERS_TABLE,
};
use lru::LruCache;
use serde::Deserialize;

use crate::metrics::IngestMetrics;
use crate::sink::{ClickHouseError, ClickHouseSink};

/// What a fact is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FactKind {
    UserEmail,
    TeamName,
}

type FactKey = (FactKind, String, String);

/// A value with the event that stated it; the later (occurredAt, event id) wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fact {
    pub value: String,
    pub occurred_at_ms: i64,
    pub event_id: String,
}

impl Fact {
    fn newer_than(&self, other: &Fact) -> bool {
        (self.occurred_at_ms, &self.event_id) > (other.occurred_at_ms, &other.event_id)
    }
}

/// The facts one batch states, ready to be stored.
#[derive(Debug, Default)]
pub struct BatchFacts {
    pub users: Vec<DirectoryUserRow>,
    pub teams: Vec<DirectoryTeamRow>,
}

impl BatchFacts {
    /// Every fact with its cache key, users first.
    fn entries(&self) -> impl Iterator<Item = (FactKey, Fact)> + '_ {
        let users = self.users.iter().map(|u| {
            let key = (
                FactKind::UserEmail,
                u.organization_id.clone(),
                u.user_id.clone(),
            );
            (
                key,
                Fact {
                    value: u.email.clone(),
                    occurred_at_ms: u.occurred_at_ms,
                    event_id: u.event_id.clone(),
                },
            )
        });
        let teams = self.teams.iter().map(|t| {
            let key = (
                FactKind::TeamName,
                t.organization_id.clone(),
                t.team_id.clone(),
            );
            (
                key,
                Fact {
                    value: t.name.clone(),
                    occurred_at_ms: t.occurred_at_ms,
                    event_id: t.event_id.clone(),
                },
            )
        });
        users.chain(teams)
    }
}

/// The row with the largest `order` per `key`, in first-seen key order.
fn latest_per_key<T, K, O>(rows: Vec<T>, key_and_order: impl Fn(&T) -> (K, O)) -> Vec<T>
where
    K: std::hash::Hash + Eq,
    O: Ord,
{
    let mut best: HashMap<K, (O, usize)> = HashMap::new();
    for (index, row) in rows.iter().enumerate() {
        let (key, order) = key_and_order(row);
        match best.get_mut(&key) {
            Some(current) if current.0 >= order => {}
            Some(current) => *current = (order, index),
            None => {
                best.insert(key, (order, index));
            }
        }
    }
    let mut winners: Vec<usize> = best.into_values().map(|(_, index)| index).collect();
    winners.sort_unstable();
    let mut winners = winners.into_iter().peekable();
    rows.into_iter()
        .enumerate()
        .filter_map(|(index, row)| {
            if winners.peek() == Some(&index) {
                winners.next();
                Some(row)
            } else {
                None
            }
        })
        .collect()
}

/// Facts stated by events: user emails (of user actors and affected users) and team names
/// (of team resources). Extracted before enrichment, so filled-in values never become facts.
pub fn facts_of<'a>(rows: impl IntoIterator<Item = &'a AuditEventRow>) -> BatchFacts {
    let mut facts = BatchFacts::default();
    for row in rows {
        let user = |id: &str, email: &str| DirectoryUserRow {
            organization_id: row.organization_id.clone(),
            user_id: id.to_owned(),
            email: email.to_owned(),
            occurred_at_ms: row.occurred_at_ms,
            event_id: row.id.clone(),
        };
        if row.actor_type == USER_ACTOR {
            if let Some(email) = &row.actor_email {
                facts.users.push(user(&row.actor_id, email));
            }
        }
        if let (Some(id), Some(email)) = (&row.affected_user_id, &row.affected_user_email) {
            facts.users.push(user(id, email));
        }
        if row.resource_type == TEAM_RESOURCE {
            if let Some(name) = &row.resource_name {
                facts.teams.push(DirectoryTeamRow {
                    organization_id: row.organization_id.clone(),
                    team_id: row.resource_id.clone(),
                    name: name.clone(),
                    occurred_at_ms: row.occurred_at_ms,
                    event_id: row.id.clone(),
                });
            }
        }
    }
    facts
}

const USER_ACTOR: &str = "user";
const TEAM_RESOURCE: &str = "team";

/// The fields of a row that the directory can fill.
fn wanted_keys(row: &AuditEventRow) -> Vec<FactKey> {
    let mut keys = Vec::new();
    let org = &row.organization_id;
    if row.actor_type == USER_ACTOR && row.actor_email.is_none() {
        keys.push((FactKind::UserEmail, org.clone(), row.actor_id.clone()));
    }
    if let (Some(id), None) = (&row.affected_user_id, &row.affected_user_email) {
        keys.push((FactKind::UserEmail, org.clone(), id.clone()));
    }
    if row.resource_type == TEAM_RESOURCE && row.resource_name.is_none() {
        keys.push((FactKind::TeamName, org.clone(), row.resource_id.clone()));
    }
    keys
}

/// Values found for the fields a batch wants filled.
#[derive(Debug, Default)]
pub struct KnownValues(HashMap<FactKey, String>);

#[derive(Debug, Clone)]
struct Cached {
    /// The latest fact this process knows of.
    fact: Option<Fact>,
    loaded: Instant,
    /// Whether ClickHouse was read for this key (else only facts seen in batches are known).
    complete: bool,
}

#[derive(Debug, Row, Deserialize)]
struct StoredFact {
    id: String,
    value: String,
    occurred_at_ms: i64,
    event_id: String,
}

/// The projection: an LRU cache in front of the ClickHouse tables.
pub struct Directory {
    sink: ClickHouseSink,
    cache: Mutex<LruCache<FactKey, Cached>>,
    ttl: Duration,
    metrics: IngestMetrics,
}

impl Directory {
    pub fn new(
        sink: ClickHouseSink,
        entries: usize,
        ttl: Duration,
        metrics: IngestMetrics,
    ) -> Self {
        let capacity = NonZeroUsize::new(entries.max(1)).unwrap_or(NonZeroUsize::MIN);
        Self {
            sink,
            cache: Mutex::new(LruCache::new(capacity)),
            ttl,
            metrics,
        }
    }

    fn with_cache<R>(&self, f: impl FnOnce(&mut LruCache<FactKey, Cached>) -> R) -> R {
        f(&mut crate::locked(&self.cache))
    }

    /// The stored or batch-stated values for every field of `rows` that the directory can
    /// fill. Reads ClickHouse for keys the cache lacks (or holds for longer than the TTL).
    /// Call [`Directory::observe`] with the batch's facts first.
    pub async fn resolve(&self, rows: &[AuditEventRow]) -> Result<KnownValues, ClickHouseError> {
        let wanted: HashSet<FactKey> = rows.iter().flat_map(wanted_keys).collect();
        if wanted.is_empty() {
            return Ok(KnownValues::default());
        }
        let now = Instant::now();
        let missing: Vec<FactKey> = self.with_cache(|cache| {
            wanted
                .iter()
                .filter(|key| match cache.get(*key) {
                    Some(cached) => {
                        !cached.complete || now.duration_since(cached.loaded) > self.ttl
                    }
                    None => true,
                })
                .cloned()
                .collect()
        });
        if !missing.is_empty() {
            let loaded = self.load(&missing).await?;
            self.with_cache(|cache| {
                for key in missing {
                    let stored = loaded.get(&key).cloned();
                    // A fact seen in an earlier batch may be newer than what was read.
                    let seen = cache.get(&key).and_then(|c| c.fact.clone());
                    let fact = match (stored, seen) {
                        (Some(a), Some(b)) => Some(if b.newer_than(&a) { b } else { a }),
                        (a, b) => a.or(b),
                    };
                    cache.put(
                        key,
                        Cached {
                            fact,
                            loaded: now,
                            complete: true,
                        },
                    );
                }
            });
        }
        Ok(KnownValues(self.with_cache(|cache| {
            wanted
                .iter()
                .filter_map(|key| {
                    let fact = cache.get(key)?.fact.as_ref()?;
                    Some((key.clone(), fact.value.clone()))
                })
                .collect()
        })))
    }

    /// Fills the row's missing fields from `known`; returns how many were filled.
    pub fn fill(&self, row: &mut AuditEventRow, known: &KnownValues) -> usize {
        if known.0.is_empty() {
            return 0;
        }
        let mut filled = 0;
        let mut lookup = |kind, org: &str, id: &str, field: &str| {
            let value = known.0.get(&(kind, org.to_owned(), id.to_owned())).cloned();
            if value.is_some() {
                self.metrics.enriched.with_label_values(&[field]).inc();
                filled += 1;
            }
            value
        };
        if row.actor_type == USER_ACTOR && row.actor_email.is_none() {
            row.actor_email = lookup(
                FactKind::UserEmail,
                &row.organization_id,
                &row.actor_id,
                "actor_email",
            );
        }
        if let (Some(id), None) = (&row.affected_user_id, &row.affected_user_email) {
            row.affected_user_email = lookup(
                FactKind::UserEmail,
                &row.organization_id,
                id,
                "affected_user_email",
            );
        }
        if row.resource_type == TEAM_RESOURCE && row.resource_name.is_none() {
            row.resource_name = lookup(
                FactKind::TeamName,
                &row.organization_id,
                &row.resource_id,
                "resource_name",
            );
        }
        filled
    }

    /// Merges a batch's facts into the cache. A key not cached yet is added as incomplete: a
    /// lookup will still read ClickHouse, where a newer fact may be stored.
    pub fn observe(&self, facts: &BatchFacts) {
        let now = Instant::now();
        self.with_cache(|cache| {
            for (key, fact) in facts.entries() {
                match cache.get_mut(&key) {
                    Some(cached) => {
                        if cached.fact.as_ref().is_none_or(|old| fact.newer_than(old)) {
                            cached.fact = Some(fact);
                        }
                    }
                    None => {
                        cache.put(
                            key,
                            Cached {
                                fact: Some(fact),
                                loaded: now,
                                complete: false,
                            },
                        );
                    }
                }
            }
        });
    }

    /// Keeps the facts worth storing: the latest per key, and only if newer than the fact this
    /// process already stored or read for that key.
    pub fn prepare(&self, facts: BatchFacts) -> BatchFacts {
        let latest_users = latest_per_key(facts.users, |u| {
            (
                (u.organization_id.clone(), u.user_id.clone()),
                (u.occurred_at_ms, u.event_id.clone()),
            )
        });
        let latest_teams = latest_per_key(facts.teams, |t| {
            (
                (t.organization_id.clone(), t.team_id.clone()),
                (t.occurred_at_ms, t.event_id.clone()),
            )
        });
        let prepared = BatchFacts {
            users: latest_users,
            teams: latest_teams,
        };
        let keep: Vec<bool> = self.with_cache(|cache| {
            prepared
                .entries()
                .map(
                    |(key, fact)| match cache.peek(&key).and_then(|c| c.fact.as_ref()) {
                        Some(known) => fact.newer_than(known),
                        None => true,
                    },
                )
                .collect()
        });
        let users_len = prepared.users.len();
        let mut keep_users = keep[..users_len].iter();
        let mut keep_teams = keep[users_len..].iter();
        BatchFacts {
            users: prepared
                .users
                .into_iter()
                .filter(|_| *keep_users.next().unwrap_or(&true))
                .collect(),
            teams: prepared
                .teams
                .into_iter()
                .filter(|_| *keep_teams.next().unwrap_or(&true))
                .collect(),
        }
    }

    /// Reads the latest stored fact of each key, one query per (kind, organization).
    async fn load(&self, keys: &[FactKey]) -> Result<HashMap<FactKey, Fact>, ClickHouseError> {
        let mut groups: HashMap<(FactKind, &str), Vec<&str>> = HashMap::new();
        for (kind, org, id) in keys {
            groups
                .entry((*kind, org.as_str()))
                .or_default()
                .push(id.as_str());
        }
        let mut found = HashMap::new();
        for ((kind, org), ids) in groups {
            let (table, id_column, value_column) = match kind {
                FactKind::UserEmail => (DIRECTORY_USERS_TABLE, "user_id", "email"),
                FactKind::TeamName => (DIRECTORY_TEAMS_TABLE, "team_id", "name"),
            };
            let sql = format!(
                "SELECT {id_column} AS id, {value_column} AS value, occurred_at_ms, event_id \
                 FROM {table} WHERE organization_id = ? AND has(?, {id_column}) \
                 ORDER BY id, occurred_at_ms DESC, event_id DESC LIMIT 1 BY id"
            );
            let rows: Vec<StoredFact> = self
                .sink
                .client()
                .query(&sql)
                .bind(org)
                .bind(ids)
                .fetch_all()
                .await
                .map_err(|err| crate::sink::classify(&err))?;
            for row in rows {
                found.insert(
                    (kind, org.to_owned(), row.id),
                    Fact {
                        value: row.value,
                        occurred_at_ms: row.occurred_at_ms,
                        event_id: row.event_id,
                    },
                );
            }
        }
        Ok(found)
    }

    /// Stores the facts [`Directory::prepare`] kept (retrying transient failures).
    pub async fn store(&self, facts: &BatchFacts) -> Result<(), ClickHouseError> {
        self.sink
            .insert(DIRECTORY_USERS_TABLE, &facts.users)
            .await?;
        self.sink.insert(DIRECTORY_TEAMS_TABLE, &facts.teams).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(json: &str) -> AuditEventRow {
        let event = audit_event::AuditEvent::from_slice(json.as_bytes()).unwrap();
        AuditEventRow::from_event_owned(
            event,
            audit_store::Lineage {
                topic: "t".into(),
                partition: 0,
                offset: 0,
                ingested_at_ms: 0,
            },
        )
    }

    #[test]
    fn facts_come_from_stated_values_only() {
        let created = event(
            r#"{"id":"e1","type":"user.created","occurredAt":"2025-01-01T00:00:00Z","organizationId":"o",
                "actor":{"id":"admin","email":"admin@x.io"},"resource":{"type":"user","id":"u1"},
                "affectedUser":{"id":"u1","email":"u1@x.io"}}"#,
        );
        let team = event(
            r#"{"id":"e2","type":"team.created","occurredAt":"2025-01-01T00:00:01Z","organizationId":"o",
                "actor":{"id":"bot","type":"system","email":"bot@x.io"},"resource":{"type":"team","id":"t1","name":"Core"}}"#,
        );
        let facts = facts_of([&created, &team]);
        let users: Vec<(&str, &str)> = facts
            .users
            .iter()
            .map(|u| (u.user_id.as_str(), u.email.as_str()))
            .collect();
        // A system actor's email is not a user's email.
        assert_eq!(users, vec![("admin", "admin@x.io"), ("u1", "u1@x.io")]);
        assert_eq!(facts.teams.len(), 1);
        assert_eq!(facts.teams[0].name, "Core");
    }

    #[test]
    fn later_facts_win_and_ties_go_to_the_larger_event_id() {
        let a = Fact {
            value: "a".into(),
            occurred_at_ms: 10,
            event_id: "e1".into(),
        };
        let b = Fact {
            value: "b".into(),
            occurred_at_ms: 10,
            event_id: "e2".into(),
        };
        let c = Fact {
            value: "c".into(),
            occurred_at_ms: 9,
            event_id: "e9".into(),
        };
        assert!(b.newer_than(&a));
        assert!(!a.newer_than(&b));
        assert!(a.newer_than(&c));
    }

    #[test]
    fn keeps_the_latest_fact_per_key_in_first_seen_order() {
        let row = |user: &str, at: i64, id: &str| DirectoryUserRow {
            organization_id: "o".into(),
            user_id: user.into(),
            email: format!("{user}-{at}@x.io"),
            occurred_at_ms: at,
            event_id: id.into(),
        };
        let rows = vec![
            row("a", 5, "e1"),
            row("b", 1, "e2"),
            row("a", 9, "e3"),
            row("a", 9, "e0"),
        ];
        let latest = latest_per_key(rows, |r| {
            (r.user_id.clone(), (r.occurred_at_ms, r.event_id.clone()))
        });
        let ids: Vec<&str> = latest.iter().map(|r| r.event_id.as_str()).collect();
        assert_eq!(ids, vec!["e2", "e3"]);
    }

    #[test]
    fn only_missing_fields_are_wanted() {
        let e = event(
            r#"{"id":"e3","type":"team_member.added","occurredAt":"2025-01-01T00:00:00Z","organizationId":"o",
                "actor":{"id":"u9"},"resource":{"type":"team","id":"t1"},"affectedUser":{"id":"u2","email":"u2@x.io"}}"#,
        );
        let keys = wanted_keys(&e);
        assert_eq!(
            keys,
            vec![
                (FactKind::UserEmail, "o".to_owned(), "u9".to_owned()),
                (FactKind::TeamName, "o".to_owned(), "t1".to_owned()),
            ]
        );
    }
}
