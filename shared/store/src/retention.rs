//! Retention, legal holds and erasure (migration 0008), the parts every service shares: which
//! events of an organization are still held ([`Visibility`]), the tables that say so, and the
//! pseudonyms that replace an erased person's data ([`Pseudonyms`]).
//!
//! An event is **held** while it is younger than its organization's retention, or while a legal
//! hold covers its time. Every read path shows only held events, and the retention job removes
//! every other one from every table. A hold's events stay readable past the retention: a hold
//! exists so that they can be produced.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use clickhouse::Row;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

pub const POLICIES_TABLE: &str = "audit_retention_policies";
pub const HOLDS_TABLE: &str = "audit_legal_holds";
pub const ERASURES_TABLE: &str = "audit_erasures";
pub const RUNS_TABLE: &str = "audit_retention_runs";

/// The bounds of a retention in days, set per organization or as the default.
pub const MIN_DAYS: u32 = 1;
pub const MAX_DAYS: u32 = 3_650;

const DAY_MS: i64 = 86_400_000;

/// Epoch milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// A version number for the tables' ReplacingMergeTree: microseconds now, so that a later write
/// from any process wins.
pub fn version_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default()
}

/// One version of an organization's retention (`days` = 0: back to the default).
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct PolicyRow {
    pub organization_id: String,
    pub version: u64,
    pub days: u32,
    pub set_by: String,
    pub set_at_ms: i64,
}

/// One version of a legal hold.
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct HoldRow {
    pub organization_id: String,
    pub hold_id: String,
    pub version: u64,
    /// Inclusive, epoch ms; None reaches the oldest event.
    pub from_ms: Option<i64>,
    /// Exclusive, epoch ms; None reaches every later event, those to come included.
    pub to_ms: Option<i64>,
    pub reason: String,
    pub placed_by: String,
    pub placed_at_ms: i64,
    pub lifted_by: String,
    pub lifted_at_ms: Option<i64>,
}

impl HoldRow {
    pub fn is_active(&self) -> bool {
        self.lifted_at_ms.is_none()
    }

    /// Whether the hold covers some time of `[from, to]` (both inclusive).
    pub fn covers_any(&self, from_ms: i64, to_ms: i64) -> bool {
        self.from_ms.is_none_or(|f| f <= to_ms) && self.to_ms.is_none_or(|t| t > from_ms)
    }
}

/// The organization's retention in days: its own value, else the default.
pub fn effective_days(own: Option<u32>, default_days: u32) -> u32 {
    own.filter(|d| *d > 0).unwrap_or(default_days)
}

/// Which times of an organization's events are held at one moment: from `from_ms` on
/// (None: from the oldest), except the gaps (each `[start, end)`), which lie between the
/// ranges of legal holds older than the retention.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Visibility {
    pub from_ms: Option<i64>,
    pub gaps: Vec<(i64, i64)>,
}

impl Visibility {
    /// The events held `now_ms` under a retention of `days` and the organization's active
    /// `holds`: younger than the retention (`occurred_at >= now - days`, to the millisecond), or
    /// covered by a hold.
    pub fn at(now_ms: i64, days: u32, holds: &[HoldRow]) -> Self {
        let cutoff = now_ms.saturating_sub(i64::from(days).saturating_mul(DAY_MS));
        let mut ranges: Vec<(i64, i64)> = holds
            .iter()
            .filter(|h| h.is_active())
            .map(|h| (h.from_ms.unwrap_or(i64::MIN), h.to_ms.unwrap_or(i64::MAX)))
            .filter(|(from, to)| from < to)
            .collect();
        ranges.push((cutoff, i64::MAX));
        ranges.sort_unstable();
        let mut merged: Vec<(i64, i64)> = Vec::new();
        for (from, to) in ranges {
            match merged.last_mut() {
                Some(last) if from <= last.1 => last.1 = last.1.max(to),
                _ => merged.push((from, to)),
            }
        }
        let from_ms = merged.first().map(|r| r.0).filter(|f| *f != i64::MIN);
        let gaps = merged.windows(2).map(|w| (w[0].1, w[1].0)).collect();
        Self { from_ms, gaps }
    }

    /// Whether an event of this time is held.
    pub fn holds(&self, occurred_at_ms: i64) -> bool {
        self.from_ms.is_none_or(|f| occurred_at_ms >= f)
            && !self
                .gaps
                .iter()
                .any(|(start, end)| occurred_at_ms >= *start && occurred_at_ms < *end)
    }

    /// Whether some events may be past it: there is a bound or a gap.
    pub fn removes_any(&self) -> bool {
        self.from_ms.is_some() || !self.gaps.is_empty()
    }
}

/// The latest retention of every organization that set one (days > 0).
pub async fn load_policies(
    client: &clickhouse::Client,
) -> Result<Vec<(String, u32)>, clickhouse::error::Error> {
    client
        .query(&format!(
            "SELECT organization_id, argMax(days, version) AS d FROM {POLICIES_TABLE} \
             GROUP BY organization_id HAVING d > 0 ORDER BY organization_id"
        ))
        .fetch_all()
        .await
}

/// The latest version of one organization's retention, if it ever set one.
pub async fn load_policy(
    client: &clickhouse::Client,
    organization_id: &str,
) -> Result<Option<PolicyRow>, clickhouse::error::Error> {
    client
        .query(&format!(
            "SELECT ?fields FROM {POLICIES_TABLE} WHERE organization_id = ? \
             ORDER BY version DESC LIMIT 1"
        ))
        .bind(organization_id)
        .fetch_optional()
        .await
}

/// The latest version of every hold (of one organization, or of all), lifted ones included,
/// newest placed first.
pub async fn load_holds(
    client: &clickhouse::Client,
    organization_id: Option<&str>,
) -> Result<Vec<HoldRow>, clickhouse::error::Error> {
    let scope = if organization_id.is_some() {
        "WHERE organization_id = ?"
    } else {
        ""
    };
    let query = client.query(&format!(
        "SELECT ?fields FROM {HOLDS_TABLE} {scope} \
         ORDER BY organization_id, hold_id, version DESC LIMIT 1 BY organization_id, hold_id"
    ));
    let query = match organization_id {
        Some(org) => query.bind(org),
        None => query,
    };
    let mut holds: Vec<HoldRow> = query.fetch_all().await?;
    holds.sort_by_key(|h| std::cmp::Reverse(h.placed_at_ms));
    Ok(holds)
}

/// Writes one version of a hold.
pub async fn write_hold(
    client: &clickhouse::Client,
    row: &HoldRow,
) -> Result<(), clickhouse::error::Error> {
    write_one(client, HOLDS_TABLE, row).await
}

/// Writes one version of an organization's retention.
pub async fn write_policy(
    client: &clickhouse::Client,
    row: &PolicyRow,
) -> Result<(), clickhouse::error::Error> {
    write_one(client, POLICIES_TABLE, row).await
}

/// Inserts one row into `table`.
pub async fn write_one<T>(
    client: &clickhouse::Client,
    table: &str,
    row: &T,
) -> Result<(), clickhouse::error::Error>
where
    T: for<'a> clickhouse::Row<Value<'a> = T> + clickhouse::RowWrite,
{
    let mut insert = client.insert::<T>(table).await?;
    insert.write(row).await?;
    insert.end().await
}

/// Every person erased or being erased: (organization, user id, when it was asked, epoch ms).
pub async fn load_erased(
    client: &clickhouse::Client,
) -> Result<Vec<(String, String, i64)>, clickhouse::error::Error> {
    client
        .query(&format!(
            "SELECT organization_id, user_id, max(requested_at_ms) FROM {ERASURES_TABLE} \
             GROUP BY organization_id, user_id"
        ))
        .fetch_all()
        .await
}

/// A person erased (or being erased): their events that occurred up to the erasure are shown
/// only under pseudonyms wherever they are read again from Kafka (a stream's replay).
#[derive(Debug, Clone)]
pub struct ErasedPerson {
    pub user_id: String,
    pub erased_at_ms: i64,
    /// None when this process has no `retention.pseudonym_key`: the person's events are then
    /// withheld rather than shown.
    pub pseudonyms: Option<Pseudonyms>,
    /// Also the events that occurred after the erasure (the ingest's
    /// `retention.pseudonymize_later_events`).
    pub later: bool,
}

impl ErasedPerson {
    /// Applies the erasure to a row; false when the row must be withheld.
    pub fn scrub(&self, row: &mut crate::AuditEventRow) -> bool {
        if row.occurred_at_ms > self.erased_at_ms && !self.later {
            return true;
        }
        match &self.pseudonyms {
            Some(p) => {
                p.apply(row);
                true
            }
            None => {
                let user = self.user_id.as_str();
                !(row.actor_id == user
                    || row.affected_user_id.as_deref() == Some(user)
                    || (row.resource_type == "user" && row.resource_id == user))
            }
        }
    }
}

/// Every organization's erased persons, re-read with the retention snapshot.
#[derive(Clone, Default)]
pub struct ErasedSubjects {
    key: Option<Arc<SecretString>>,
    later: bool,
    loaded: Arc<std::sync::atomic::AtomicBool>,
    by_organization: Arc<RwLock<HashMap<String, Vec<ErasedPerson>>>>,
}

impl ErasedSubjects {
    pub fn new(key: Option<&SecretString>) -> Self {
        Self {
            key: key.cloned().map(Arc::new),
            ..Self::default()
        }
    }

    /// Pseudonymizes the persons' later events too, not only those up to their erasure.
    pub fn with_later_events(mut self, later: bool) -> Self {
        self.later = later;
        self
    }

    pub fn loaded(&self) -> bool {
        self.loaded.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether some person is erased and this process has no key to pseudonymize them.
    pub fn unkeyed(&self) -> bool {
        self.key.is_none()
            && self
                .by_organization
                .read()
                .is_ok_and(|m| m.values().any(|v| !v.is_empty()))
    }

    pub async fn refresh(
        &self,
        client: &clickhouse::Client,
    ) -> Result<(), clickhouse::error::Error> {
        let rows = load_erased(client).await?;
        self.replace(rows);
        Ok(())
    }

    /// Replaces the known erasures by `rows` (organization, user id, erased at).
    pub fn replace(&self, rows: Vec<(String, String, i64)>) {
        let mut by_organization: HashMap<String, Vec<ErasedPerson>> = HashMap::new();
        for (organization_id, user_id, erased_at_ms) in rows {
            let pseudonyms = self.key.as_ref().map(|key| {
                Pseudonyms::new(key.expose_secret().as_bytes(), &organization_id, &user_id)
            });
            by_organization
                .entry(organization_id)
                .or_default()
                .push(ErasedPerson {
                    user_id,
                    erased_at_ms,
                    pseudonyms,
                    later: self.later,
                });
        }
        if let Ok(mut slot) = self.by_organization.write() {
            *slot = by_organization;
        }
        self.loaded
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Re-reads the erasures every `every` until `stop`.
    pub async fn maintain(
        self,
        client: clickhouse::Client,
        every: std::time::Duration,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {
                    if let Err(err) = self.refresh(&client).await {
                        tracing::warn!(error = %err, "cannot re-read the erasures; keeping the last ones");
                    }
                }
            }
        }
    }

    /// Applies every erasure to the rows of one batch before they are stored (the ingest):
    /// nothing is withheld there, a person's rows are pseudonymized when this process has the
    /// key. Returns how many rows changed.
    pub fn apply_all(&self, rows: &mut [crate::AuditEventRow]) -> usize {
        let Ok(map) = self.by_organization.read() else {
            return 0;
        };
        if map.is_empty() {
            return 0;
        }
        let mut changed = 0;
        for row in rows {
            let Some(persons) = map.get(&row.organization_id) else {
                continue;
            };
            for person in persons {
                let due = row.occurred_at_ms <= person.erased_at_ms || person.later;
                if let (true, Some(p)) = (due, &person.pseudonyms) {
                    if p.apply(row) {
                        changed += 1;
                    }
                }
            }
        }
        changed
    }

    /// The pseudonym email of an erased user, for a fact of the directory stated at `at_ms`.
    pub fn email_of(&self, organization_id: &str, user_id: &str, at_ms: i64) -> Option<String> {
        let map = self.by_organization.read().ok()?;
        let person = map
            .get(organization_id)?
            .iter()
            .find(|p| p.user_id == user_id && (at_ms <= p.erased_at_ms || p.later))?;
        person.pseudonyms.as_ref().map(Pseudonyms::email)
    }

    pub fn of(&self, organization_id: &str) -> Vec<ErasedPerson> {
        self.by_organization
            .read()
            .ok()
            .and_then(|m| m.get(organization_id).cloned())
            .unwrap_or_default()
    }
}

/// The stable pseudonyms of one person of one organization: derived with HMAC-SHA-256 from the
/// operator's pseudonym key and the organization (its own secret), then the user id. The same
/// person gets the same pseudonyms in every event and in every later erasure (under the same
/// key); nobody without the key can tell whose they are or compute them from an email.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pseudonyms {
    organization_key: Vec<u8>,
    user_id: String,
    token: String,
}

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC takes a key of any length.
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts any key length");
    for part in parts {
        mac.update(&(part.len() as u64).to_be_bytes());
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

impl Pseudonyms {
    pub fn new(key: &[u8], organization_id: &str, user_id: &str) -> Self {
        let organization_key = hmac(
            key,
            &[b"audit-logs organization", organization_id.as_bytes()],
        );
        let person = hmac(&organization_key, &[b"person", user_id.as_bytes()]);
        Self {
            organization_key: organization_key.to_vec(),
            user_id: user_id.to_owned(),
            token: hex::encode(&person[..8]),
        }
    }

    /// `erased-<token>@erased.invalid`: still an email address (`.invalid` never resolves).
    pub fn email(&self) -> String {
        format!("erased-{}@erased.invalid", self.token)
    }

    pub fn name(&self) -> String {
        format!("Erased user {}", self.token)
    }

    pub fn user_agent(&self) -> String {
        format!("erased-{}", self.token)
    }

    /// One address of the documentation prefix 2001:db8::/32 per address the person used, so
    /// that the log still tells their sessions apart: the person's token, then 32 bits of the
    /// address's own HMAC.
    pub fn ip(&self, ip: &str) -> String {
        let h = hmac(
            &self.organization_key,
            &[b"ip", self.user_id.as_bytes(), ip.as_bytes()],
        );
        format!(
            "{}:{:02x}{:02x}:{:02x}{:02x}",
            self.ip_prefix(),
            h[0],
            h[1],
            h[2],
            h[3]
        )
    }

    /// `2001:db8:` and the token in four groups.
    fn ip_prefix(&self) -> String {
        let t = &self.token;
        format!(
            "2001:db8:{}:{}:{}:{}",
            &t[0..4],
            &t[4..8],
            &t[8..12],
            &t[12..16]
        )
    }

    /// Whether a value is one of this person's pseudonyms already (an erasure run again).
    pub fn is_pseudonym(&self, value: &str) -> bool {
        value.contains(&self.token) || value.starts_with(&self.ip_prefix())
    }
}

impl Pseudonyms {
    /// Replaces this person's values in one event row: the actor's email, name, address and
    /// user agent when they acted, the affected user's email, a user resource's name, and the
    /// same values where they stand whole (as JSON strings) in `changes` and `metadata`. What
    /// the stored-event paths use (a stream's replay of events stored before an erasure); the
    /// erasure job also replaces values the row does not state itself (older emails, say).
    /// Whether the row concerns the person.
    pub fn apply(&self, row: &mut crate::AuditEventRow) -> bool {
        let user = self.user_id.as_str();
        let mut own: Vec<(String, String)> = Vec::new();
        let mut swap = |field: &mut Option<String>, pseudonym: String| {
            if let Some(value) = field.take() {
                if !self.is_pseudonym(&value) {
                    own.push((value, pseudonym.clone()));
                }
                *field = Some(pseudonym);
            }
        };
        let mut concerned = false;
        if row.actor_id == user {
            concerned = true;
            swap(&mut row.actor_email, self.email());
            swap(&mut row.actor_name, self.name());
            let ip = row.context_ip.clone().map(|ip| self.ip(&ip));
            if let Some(ip) = ip {
                swap(&mut row.context_ip, ip);
            }
            swap(&mut row.context_user_agent, self.user_agent());
        }
        if row.affected_user_id.as_deref() == Some(user) {
            concerned = true;
            swap(&mut row.affected_user_email, self.email());
        }
        if row.resource_type == "user" && row.resource_id == user {
            concerned = true;
            let pseudonym = match &row.resource_name {
                Some(name) if name.contains('@') => self.email(),
                _ => self.name(),
            };
            swap(&mut row.resource_name, pseudonym);
        }
        for (value, pseudonym) in own {
            let quote = |s: &str| serde_json::to_string(s).unwrap_or_default();
            let (value, pseudonym) = (quote(&value), quote(&pseudonym));
            row.changes = row.changes.replace(&value, &pseudonym);
            if let Some(metadata) = &mut row.metadata {
                *metadata = metadata.replace(&value, &pseudonym);
            }
        }
        concerned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hold(from: Option<i64>, to: Option<i64>) -> HoldRow {
        HoldRow {
            organization_id: "o".into(),
            hold_id: "h".into(),
            version: 1,
            from_ms: from,
            to_ms: to,
            reason: String::new(),
            placed_by: String::new(),
            placed_at_ms: 0,
            lifted_by: String::new(),
            lifted_at_ms: None,
        }
    }

    const NOW: i64 = 100 * DAY_MS;

    #[test]
    fn an_event_is_held_from_the_cutoff_to_the_millisecond() {
        let v = Visibility::at(NOW, 30, &[]);
        let cutoff = NOW - 30 * DAY_MS;
        assert_eq!(v.from_ms, Some(cutoff));
        assert!(v.holds(cutoff));
        assert!(!v.holds(cutoff - 1));
        assert!(v.gaps.is_empty());
    }

    #[test]
    fn a_hold_without_bounds_keeps_everything() {
        let v = Visibility::at(NOW, 1, &[hold(None, None)]);
        assert_eq!(v, Visibility::default());
        assert!(v.holds(i64::MIN + 1));
        assert!(!v.removes_any());
    }

    #[test]
    fn an_old_hold_leaves_a_gap_and_a_reaching_hold_moves_the_bound() {
        let cutoff = NOW - 10 * DAY_MS;
        let v = Visibility::at(NOW, 10, &[hold(Some(5 * DAY_MS), Some(7 * DAY_MS))]);
        assert_eq!(v.from_ms, Some(5 * DAY_MS));
        assert_eq!(v.gaps, vec![(7 * DAY_MS, cutoff)]);
        assert!(v.holds(7 * DAY_MS - 1) && !v.holds(7 * DAY_MS) && v.holds(cutoff));
        let reaching = Visibility::at(NOW, 10, &[hold(Some(5 * DAY_MS), Some(cutoff + 1))]);
        assert_eq!(reaching.from_ms, Some(5 * DAY_MS));
        assert!(reaching.gaps.is_empty());
        let mut lifted = hold(Some(0), None);
        lifted.lifted_at_ms = Some(1);
        assert_eq!(Visibility::at(NOW, 10, &[lifted]).from_ms, Some(cutoff));
    }

    #[test]
    fn pseudonyms_are_stable_per_person_and_differ_across_people_and_organizations() {
        let a = Pseudonyms::new(b"key", "org", "u1");
        assert_eq!(a, Pseudonyms::new(b"key", "org", "u1"));
        assert_ne!(a.email(), Pseudonyms::new(b"key", "org", "u2").email());
        assert_ne!(a.email(), Pseudonyms::new(b"key", "org2", "u1").email());
        assert_ne!(a.email(), Pseudonyms::new(b"key2", "org", "u1").email());
        assert!(a.email().ends_with("@erased.invalid"));
        assert_eq!(a.ip("10.0.0.1"), a.ip("10.0.0.1"));
        assert_ne!(a.ip("10.0.0.1"), a.ip("10.0.0.2"));
        assert!(a.ip("10.0.0.1").parse::<std::net::Ipv6Addr>().is_ok());
        assert!(a.is_pseudonym(&a.name()));
        assert!(a.is_pseudonym(&a.ip("10.0.0.1")));
        assert!(!a.is_pseudonym("10.0.0.1"));
    }

    #[test]
    fn the_ingest_pseudonymizes_events_up_to_the_erasure_and_later_ones_only_when_asked() {
        let key: SecretString = "k".to_owned().into();
        let row = |at: i64| crate::AuditEventRow {
            organization_id: "org".into(),
            occurred_at_ms: at,
            actor_id: "usr_ada".into(),
            actor_email: Some("ada@x.example".into()),
            ..Default::default()
        };
        let p = Pseudonyms::new(b"k", "org", "usr_ada");
        for (later, want_after) in [
            (false, Some("ada@x.example".to_owned())),
            (true, Some(p.email())),
        ] {
            let subjects = ErasedSubjects::new(Some(&key)).with_later_events(later);
            subjects.replace(vec![("org".into(), "usr_ada".into(), 100)]);
            let mut rows = vec![
                row(100),
                row(101),
                crate::AuditEventRow {
                    organization_id: "other".into(),
                    ..row(1)
                },
            ];
            subjects.apply_all(&mut rows);
            assert_eq!(rows[0].actor_email, Some(p.email()));
            assert_eq!(rows[1].actor_email, want_after, "later = {later}");
            assert_eq!(rows[2].actor_email.as_deref(), Some("ada@x.example"));
            assert_eq!(subjects.email_of("org", "usr_ada", 50), Some(p.email()));
        }
        let unkeyed = ErasedSubjects::new(None);
        unkeyed.replace(vec![("org".into(), "usr_ada".into(), 100)]);
        assert!(unkeyed.unkeyed());
        let mut rows = vec![row(1)];
        assert_eq!(unkeyed.apply_all(&mut rows), 0);
    }

    #[test]
    fn a_row_loses_the_persons_values_by_role_and_inside_its_changes() {
        let p = Pseudonyms::new(b"key", "org", "usr_ada");
        let mut row = crate::AuditEventRow {
            actor_id: "usr_bob".into(),
            actor_email: Some("bob@x.example".into()),
            context_ip: Some("192.0.2.1".into()),
            resource_type: "user".into(),
            resource_id: "usr_ada".into(),
            resource_name: Some("ada@x.example".into()),
            affected_user_id: Some("usr_ada".into()),
            affected_user_email: Some("ada@x.example".into()),
            changes: r#"[{"field":"email","newValue":"ada@x.example"}]"#.into(),
            metadata: Some(r#"{"by":"bob@x.example"}"#.into()),
            ..Default::default()
        };
        assert!(p.apply(&mut row));
        assert_eq!(row.actor_email.as_deref(), Some("bob@x.example"));
        assert_eq!(row.context_ip.as_deref(), Some("192.0.2.1"));
        assert_eq!(row.affected_user_email, Some(p.email()));
        assert_eq!(row.resource_name, Some(p.email()));
        assert!(row.changes.contains(&p.email()) && !row.changes.contains("ada@x"));
        assert_eq!(row.metadata.as_deref(), Some(r#"{"by":"bob@x.example"}"#));
        let mut other = crate::AuditEventRow {
            actor_id: "usr_bob".into(),
            ..Default::default()
        };
        assert!(!p.apply(&mut other));
    }
}
