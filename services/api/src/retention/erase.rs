//! Erasure of a person (`audit-api erase --org --user`): their emails, names, IP addresses and
//! user agents, in every stored event and table, replaced by stable pseudonyms
//! ([`audit_store::retention::Pseudonyms`]).
//!
//! The job is recorded (`audit_erasures`, state `running`) before it changes anything, and each
//! step records its end; a process that dies mid-way leaves a running job that the next
//! `retention run` (or the same command) finishes. Every step is idempotent: it first learns the
//! person's values from every table that may still hold one, so a step done already finds
//! nothing left to change.
//!
//! Steps: (1) the actor-email copy's columns, (2) the events, (3) the directory, (4) the copies
//! sorted by actor email, whose sort key is the email: their rows of the person are removed and
//! written again from the events under the pseudonym.

use std::collections::BTreeSet;
use std::time::Duration;

use audit_store::clickhouse;
use audit_store::retention::{self, HoldRow, Pseudonyms, ERASURES_TABLE};
use audit_store::{CopyTable, COPY_TABLES, DIRECTORY_USERS_TABLE, EVENTS_TABLE};
use clickhouse::Row;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::info;

use super::admin::RetentionAdmin;
use super::purge::{Job, JobError, Statement};
use crate::time::format_timestamp;

/// The copy of the events with every column, sorted by actor email (migration 0005).
const ROWS_COPY: &str = "audit_events_by_actor_email_rows";

/// The last step; a job whose `step` is this is done.
pub const LAST_STEP: u32 = 4;

/// One version of an erasure job.
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct ErasureRow {
    pub organization_id: String,
    pub user_id: String,
    pub erasure_id: String,
    pub version: u64,
    pub requested_by: String,
    pub requested_at_ms: i64,
    /// `running` or `done`.
    pub state: String,
    /// The last step finished (0: none yet).
    pub step: u32,
    /// The person's events when the job started.
    pub events: u64,
    pub finished_at_ms: i64,
}

/// What an erasure did, as the CLI prints it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ErasureView {
    pub erasure_id: String,
    pub organization_id: String,
    pub user_id: String,
    pub state: String,
    pub events: u64,
    pub requested_by: String,
    pub requested_at: String,
    pub finished_at: Option<String>,
}

impl From<&ErasureRow> for ErasureView {
    fn from(row: &ErasureRow) -> Self {
        Self {
            erasure_id: row.erasure_id.clone(),
            organization_id: row.organization_id.clone(),
            user_id: row.user_id.clone(),
            state: row.state.clone(),
            events: row.events,
            requested_by: row.requested_by.clone(),
            requested_at: format_timestamp(row.requested_at_ms),
            finished_at: (row.state == "done").then(|| format_timestamp(row.finished_at_ms)),
        }
    }
}

/// The person's values still stored, as the tables hold them now (pseudonyms left out).
#[derive(Debug, Default)]
struct Known {
    emails: BTreeSet<String>,
    names: BTreeSet<String>,
    ips: BTreeSet<String>,
    user_agents: BTreeSet<String>,
}

impl Known {
    fn is_empty(&self) -> bool {
        self.emails.is_empty()
            && self.names.is_empty()
            && self.ips.is_empty()
            && self.user_agents.is_empty()
    }

    /// Each value as a JSON string (quotes included) and its pseudonym as one: what replaces
    /// a value equal to it inside `changes` and `metadata`.
    fn json_replacements(&self, p: &Pseudonyms) -> Vec<(String, String)> {
        let quote = |s: &str| serde_json::to_string(s).unwrap_or_default();
        let mut pairs = Vec::new();
        for email in &self.emails {
            pairs.push((quote(email), quote(&p.email())));
        }
        for name in &self.names {
            pairs.push((quote(name), quote(&p.name())));
        }
        for ip in &self.ips {
            pairs.push((quote(ip), quote(&p.ip(ip))));
        }
        for agent in &self.user_agents {
            pairs.push((quote(agent), quote(&p.user_agent())));
        }
        pairs
    }
}

/// Runs erasures.
pub struct Eraser<'a> {
    job: &'a Job,
    admin: &'a RetentionAdmin,
    key: Option<&'a SecretString>,
    settle: Duration,
}

impl<'a> Eraser<'a> {
    pub fn new(
        job: &'a Job,
        admin: &'a RetentionAdmin,
        key: Option<&'a SecretString>,
        settle: Duration,
    ) -> Self {
        Self {
            job,
            admin,
            key,
            settle,
        }
    }

    fn pseudonyms(&self, organization_id: &str, user_id: &str) -> Result<Pseudonyms, JobError> {
        let key = self.key.ok_or_else(|| {
            JobError::Refused(
                "retention.pseudonym_key is not set: erasure needs it to derive the pseudonyms"
                    .into(),
            )
        })?;
        Ok(Pseudonyms::new(
            key.expose_secret().as_bytes(),
            organization_id,
            user_id,
        ))
    }

    /// Erases the person, or finishes their erasure left running. Refused while a legal hold
    /// covers any of their events.
    pub async fn erase(
        &self,
        organization_id: &str,
        user_id: &str,
        by: &str,
    ) -> Result<ErasureView, JobError> {
        self.erase_until(organization_id, user_id, by, LAST_STEP)
            .await
    }

    /// [`Self::erase`] up to step `last` (a run cut short, as by a crash, when below
    /// [`LAST_STEP`]).
    pub async fn erase_until(
        &self,
        organization_id: &str,
        user_id: &str,
        by: &str,
        last: u32,
    ) -> Result<ErasureView, JobError> {
        self.erase_inner(organization_id, user_id, by, last)
            .await
            .map_err(JobError::redacted)
    }

    async fn erase_inner(
        &self,
        organization_id: &str,
        user_id: &str,
        by: &str,
        last: u32,
    ) -> Result<ErasureView, JobError> {
        if organization_id.trim().is_empty() || user_id.trim().is_empty() {
            return Err(JobError::Refused(
                "--org and --user must not be empty".into(),
            ));
        }
        if by.trim().is_empty() {
            return Err(JobError::Refused(
                "--by must name who asked for the erasure".into(),
            ));
        }
        let pseudonyms = self.pseudonyms(organization_id, user_id)?;
        self.check_holds(organization_id, user_id, &pseudonyms)
            .await?;
        let running = self
            .erasures(organization_id)
            .await?
            .into_iter()
            .find(|e| e.user_id == user_id && e.state == "running");
        let row = match running {
            Some(row) => row,
            None => {
                let known = self.known(organization_id, user_id, &pseudonyms).await?;
                let events = self.count_events(organization_id, user_id, &known).await?;
                let row = ErasureRow {
                    organization_id: organization_id.to_owned(),
                    user_id: user_id.to_owned(),
                    erasure_id: format!("erasure_{}", uuid::Uuid::new_v4().simple()),
                    version: retention::version_now(),
                    requested_by: by.to_owned(),
                    requested_at_ms: retention::now_ms(),
                    state: "running".into(),
                    step: 0,
                    events,
                    finished_at_ms: 0,
                };
                self.record(&row).await?;
                // Ingest replicas learn of the erasure within their refresh interval and
                // pseudonymize the person's events from then on; wait for that before
                // rewriting what is stored.
                tokio::time::sleep(self.settle).await;
                row
            }
        };
        self.run(row, &pseudonyms, last).await
    }

    /// Finishes every erasure left running (a crashed command's).
    pub async fn resume_all(&self) -> Result<Vec<ErasureView>, JobError> {
        let mut done = Vec::new();
        for row in self.running().await? {
            let pseudonyms = self.pseudonyms(&row.organization_id, &row.user_id)?;
            let view = self
                .run(row, &pseudonyms, LAST_STEP)
                .await
                .map_err(JobError::redacted)?;
            done.push(view);
        }
        Ok(done)
    }

    async fn run(
        &self,
        mut row: ErasureRow,
        p: &Pseudonyms,
        last: u32,
    ) -> Result<ErasureView, JobError> {
        let (org, user) = (row.organization_id.clone(), row.user_id.clone());
        while row.step < last.min(LAST_STEP) {
            let step = row.step + 1;
            let known = self.known(&org, &user, p).await?;
            match step {
                1 => {
                    self.update_events(ROWS_COPY, &org, &user, p, &known)
                        .await?
                }
                2 => {
                    self.update_events(EVENTS_TABLE, &org, &user, p, &known)
                        .await?
                }
                3 => self.update_directory(&org, &user, p).await?,
                _ => {
                    let old = self.old_keys(&org, &user, p, &known).await?;
                    let new_key = p.email().to_lowercase();
                    for copy in COPY_TABLES.iter().filter(|c| keyed_by_email(c)) {
                        self.rekey(copy, &org, &old, &new_key).await?;
                    }
                }
            }
            row.step = step;
            row.version = retention::version_now().max(row.version + 1);
            if step == LAST_STEP {
                row.state = "done".into();
                row.finished_at_ms = retention::now_ms();
            }
            self.record(&row).await?;
            info!(erasure_id = %row.erasure_id, step, "erasure step done");
        }
        if row.state == "done" {
            self.admin
                .announce(
                    &org,
                    "audit_log.subject_erased",
                    &row.requested_by,
                    json!({"type": "user", "id": user}),
                    Vec::new(),
                    json!({"erasureId": row.erasure_id, "events": row.events}),
                )
                .await;
        }
        Ok(ErasureView::from(&row))
    }

    /// Refuses while an active hold covers one of the person's events.
    async fn check_holds(
        &self,
        organization_id: &str,
        user_id: &str,
        p: &Pseudonyms,
    ) -> Result<(), JobError> {
        let client = self.job.client();
        let holds: Vec<HoldRow> = retention::load_holds(&client, Some(organization_id))
            .await?
            .into_iter()
            .filter(HoldRow::is_active)
            .collect();
        if holds.is_empty() {
            return Ok(());
        }
        let known = self.known(organization_id, user_id, p).await?;
        let mut statement = Statement::default();
        let person = person_clause(&mut statement, organization_id, user_id, &known, p);
        let mut ranges = Vec::new();
        for hold in &holds {
            let from = hold
                .from_ms
                .map(|f| format!("occurred_at_ms >= {}", statement.int(f)));
            let to = hold
                .to_ms
                .map(|t| format!("occurred_at_ms < {}", statement.int(t)));
            let bounds: Vec<String> = [from, to].into_iter().flatten().collect();
            ranges.push(if bounds.is_empty() {
                "1".to_owned()
            } else {
                format!("({})", bounds.join(" AND "))
            });
        }
        statement.sql = format!(
            "SELECT count() FROM {EVENTS_TABLE} WHERE {person} AND ({})",
            ranges.join(" OR ")
        );
        let covered: u64 = statement
            .bind(client.query(&statement.sql))
            .fetch_one()
            .await?;
        if covered > 0 {
            let ids: Vec<&str> = holds.iter().map(|h| h.hold_id.as_str()).collect();
            return Err(JobError::Refused(format!(
                "refused: {covered} of this person's events are under a legal hold ({}); \
                 nothing was changed. Lift the hold first, or wait until it is lifted",
                ids.join(", ")
            )));
        }
        Ok(())
    }

    /// The person's values every table still holds (emails, names, addresses, user agents).
    async fn known(
        &self,
        organization_id: &str,
        user_id: &str,
        p: &Pseudonyms,
    ) -> Result<Known, JobError> {
        let client = self.job.client();
        let mut known = Known::default();
        // One scan per table: the values of the rows where the person acted, was affected or
        // is the resource, each kind in an array of its own.
        #[derive(Row, Deserialize)]
        struct Values {
            emails: Vec<String>,
            names: Vec<String>,
            ips: Vec<String>,
            agents: Vec<String>,
            affected: Vec<String>,
            named: Vec<String>,
        }
        for table in [EVENTS_TABLE, ROWS_COPY] {
            let values: Values = client
                .query(&format!(
                    "SELECT \
                     groupUniqArrayIf(assumeNotNull(actor_email), actor_id = ? AND actor_email IS NOT NULL), \
                     groupUniqArrayIf(assumeNotNull(actor_name), actor_id = ? AND actor_name IS NOT NULL), \
                     groupUniqArrayIf(assumeNotNull(context_ip), actor_id = ? AND context_ip IS NOT NULL), \
                     groupUniqArrayIf(assumeNotNull(context_user_agent), actor_id = ? AND context_user_agent IS NOT NULL), \
                     groupUniqArrayIf(assumeNotNull(affected_user_email), affected_user_id = ? AND affected_user_email IS NOT NULL), \
                     groupUniqArrayIf(assumeNotNull(resource_name), resource_type = 'user' AND resource_id = ? AND resource_name IS NOT NULL) \
                     FROM {table} WHERE organization_id = ? \
                     AND (actor_id = ? OR affected_user_id = ? OR (resource_type = 'user' AND resource_id = ?))"
                ))
                .bind(user_id)
                .bind(user_id)
                .bind(user_id)
                .bind(user_id)
                .bind(user_id)
                .bind(user_id)
                .bind(organization_id)
                .bind(user_id)
                .bind(user_id)
                .bind(user_id)
                .fetch_one()
                .await?;
            known.emails.extend(values.emails);
            known.names.extend(values.names);
            known.ips.extend(values.ips);
            known.user_agents.extend(values.agents);
            known.emails.extend(values.affected);
            for name in values.named {
                if name.contains('@') {
                    known.emails.insert(name);
                } else {
                    known.names.insert(name);
                }
            }
        }
        let directory: Vec<String> = client
            .query(&format!(
                "SELECT DISTINCT email FROM {DIRECTORY_USERS_TABLE} \
                 WHERE organization_id = ? AND user_id = ?"
            ))
            .bind(organization_id)
            .bind(user_id)
            .fetch_all()
            .await?;
        known.emails.extend(directory);
        for set in [
            &mut known.emails,
            &mut known.names,
            &mut known.ips,
            &mut known.user_agents,
        ] {
            set.retain(|v| !v.trim().is_empty() && !p.is_pseudonym(v));
        }
        Ok(known)
    }

    async fn count_events(
        &self,
        organization_id: &str,
        user_id: &str,
        known: &Known,
    ) -> Result<u64, JobError> {
        let client = self.job.client();
        let p = self.pseudonyms(organization_id, user_id)?;
        let mut statement = Statement::default();
        let person = person_clause(&mut statement, organization_id, user_id, known, &p);
        // Distinct events: an event not collapsed yet may be stored twice.
        statement.sql = format!(
            "SELECT count() FROM (SELECT DISTINCT occurred_at_ms, id FROM {EVENTS_TABLE} WHERE {person})"
        );
        Ok(statement
            .bind(client.query(&statement.sql))
            .fetch_one()
            .await?)
    }

    /// Steps 1 and 2: the person's values in a table of full event rows.
    async fn update_events(
        &self,
        table: &str,
        organization_id: &str,
        user_id: &str,
        p: &Pseudonyms,
        known: &Known,
    ) -> Result<(), JobError> {
        let mut s = Statement::default();
        let person = person_clause(&mut s, organization_id, user_id, known, p);
        let u = s.text(user_id);
        let (pe, pn, pua) = (
            s.text(&p.email()),
            s.text(&p.name()),
            s.text(&p.user_agent()),
        );
        let ips: Vec<String> = known.ips.iter().cloned().collect();
        let pips: Vec<String> = ips.iter().map(|ip| p.ip(ip)).collect();
        let (ips, pips) = (s.texts(ips), s.texts(pips));
        let mut changes = "changes".to_owned();
        let mut metadata = "assumeNotNull(metadata)".to_owned();
        for (value, pseudonym) in known.json_replacements(p) {
            let (v, r) = (s.text(&value), s.text(&pseudonym));
            changes = format!("replaceAll({changes}, {v}, {r})");
            metadata = format!("replaceAll({metadata}, {v}, {r})");
        }
        let set = [
            format!("actor_email = if(actor_id = {u} AND actor_email IS NOT NULL, {pe}, actor_email)"),
            format!("actor_name = if(actor_id = {u} AND actor_name IS NOT NULL, {pn}, actor_name)"),
            format!(
                "context_ip = if(actor_id = {u} AND context_ip IS NOT NULL, \
                 transform(assumeNotNull(context_ip), {ips}, {pips}, assumeNotNull(context_ip)), context_ip)"
            ),
            format!(
                "context_user_agent = if(actor_id = {u} AND context_user_agent IS NOT NULL, {pua}, context_user_agent)"
            ),
            format!(
                "affected_user_email = if(affected_user_id = {u} AND affected_user_email IS NOT NULL, {pe}, affected_user_email)"
            ),
            format!(
                "resource_name = if(resource_type = 'user' AND resource_id = {u} AND resource_name IS NOT NULL, \
                 if(position(assumeNotNull(resource_name), '@') > 0, {pe}, {pn}), resource_name)"
            ),
            format!("changes = {changes}"),
            format!("metadata = if(metadata IS NULL, NULL, {metadata})"),
        ];
        self.job
            .alter(
                table,
                &format!("UPDATE {} WHERE {person}", set.join(", ")),
                &s,
            )
            .await?;
        Ok(())
    }

    /// Step 3: the directory's facts about the person.
    async fn update_directory(
        &self,
        organization_id: &str,
        user_id: &str,
        p: &Pseudonyms,
    ) -> Result<(), JobError> {
        let mut s = Statement::default();
        let (o, u, pe) = (s.text(organization_id), s.text(user_id), s.text(&p.email()));
        self.job
            .alter(
                DIRECTORY_USERS_TABLE,
                &format!("UPDATE email = {pe} WHERE organization_id = {o} AND user_id = {u} AND email != {pe}"),
                &s,
            )
            .await?;
        Ok(())
    }

    /// The lower-cased emails the copies sorted by actor email may still file the person's
    /// events under: the ones the tables hold, and the keys of the full-row copy (which keeps
    /// them until the end of step 4, as it is re-keyed last).
    async fn old_keys(
        &self,
        organization_id: &str,
        user_id: &str,
        p: &Pseudonyms,
        known: &Known,
    ) -> Result<BTreeSet<String>, JobError> {
        let key_column = COPY_TABLES
            .iter()
            .find(|c| c.table == ROWS_COPY)
            .map(email_key_column)
            .unwrap_or("actor_email_key");
        let keys: Vec<String> = self
            .job
            .client()
            .query(&format!(
                "SELECT DISTINCT {key_column} FROM {ROWS_COPY} \
                 WHERE organization_id = ? AND actor_id = ?"
            ))
            .bind(organization_id)
            .bind(user_id)
            .fetch_all()
            .await?;
        let new_key = p.email().to_lowercase();
        let mut old: BTreeSet<String> = known.emails.iter().map(|e| e.to_lowercase()).collect();
        old.extend(keys);
        old.retain(|k| !k.is_empty() && *k != new_key);
        Ok(old)
    }

    /// Step 4, for one copy sorted by actor email: its rows under the person's old emails are
    /// removed, then the events under those emails (others' too, who may share one) and the
    /// pseudonym are written again from the events, each event once.
    async fn rekey(
        &self,
        copy: &CopyTable,
        organization_id: &str,
        old: &BTreeSet<String>,
        new_key: &str,
    ) -> Result<(), JobError> {
        let key_column = email_key_column(copy);
        if !old.is_empty() {
            let mut s = Statement::default();
            let (o, keys) = (
                s.text(organization_id),
                s.texts(old.iter().cloned().collect()),
            );
            self.job
                .alter(
                    copy.table,
                    &format!("DELETE WHERE organization_id = {o} AND {key_column} IN {keys}"),
                    &s,
                )
                .await?;
        }
        let mut all = old.clone();
        all.insert(new_key.to_owned());
        let mut s = Statement::default();
        let o = s.text(organization_id);
        let keys = s.texts(all.into_iter().collect());
        s.sql = format!(
            "INSERT INTO {table} SELECT {select} FROM {events} \
             WHERE organization_id = {o} AND lowerUTF8(ifNull(actor_email, '')) IN {keys} \
             AND (occurred_at_ms, id) GLOBAL NOT IN (SELECT occurred_at_ms, id FROM {table} \
             WHERE organization_id = {o} AND {key_column} IN {keys})",
            table = self.job.qualified(copy.table),
            events = self.job.qualified(EVENTS_TABLE),
            select = copy.select,
        );
        s.bind(self.job.client().query(&s.sql)).execute().await?;
        Ok(())
    }

    async fn record(&self, row: &ErasureRow) -> Result<(), JobError> {
        retention::write_one(&self.job.client(), ERASURES_TABLE, row).await?;
        Ok(())
    }

    /// The latest version of each of the organization's erasures, newest first.
    pub async fn erasures(&self, organization_id: &str) -> Result<Vec<ErasureRow>, JobError> {
        Ok(self
            .job
            .client()
            .query(&format!(
                "SELECT ?fields FROM {ERASURES_TABLE} WHERE organization_id = ? \
                 ORDER BY version DESC LIMIT 1 BY erasure_id"
            ))
            .bind(organization_id)
            .fetch_all()
            .await?)
    }

    async fn running(&self) -> Result<Vec<ErasureRow>, JobError> {
        let rows: Vec<ErasureRow> = self
            .job
            .client()
            .query(&format!(
                "SELECT ?fields FROM {ERASURES_TABLE} \
                 ORDER BY version DESC LIMIT 1 BY organization_id, erasure_id"
            ))
            .fetch_all()
            .await?;
        Ok(rows.into_iter().filter(|r| r.state == "running").collect())
    }
}

/// Whether a copy's sort key holds the actor's email (its rows move when the email changes).
fn keyed_by_email(copy: &CopyTable) -> bool {
    copy.key.contains("actor_email")
}

/// The column of a copy's sort key that holds the lower-cased actor email.
fn email_key_column(copy: &CopyTable) -> &'static str {
    copy.key
        .split(", ")
        .find(|c| c.starts_with("actor_email"))
        .unwrap_or("actor_email")
}

/// The events of the organization that concern the person: they acted, were affected or are
/// the resource, or a change or the metadata holds one of their values.
fn person_clause(
    s: &mut Statement,
    organization_id: &str,
    user_id: &str,
    known: &Known,
    p: &Pseudonyms,
) -> String {
    let o = s.text(organization_id);
    let u = s.text(user_id);
    let mut terms = vec![
        format!("actor_id = {u}"),
        format!("affected_user_id = {u}"),
        format!("(resource_type = 'user' AND resource_id = {u})"),
    ];
    if !known.is_empty() {
        let needles: Vec<String> = known
            .json_replacements(p)
            .into_iter()
            .map(|(value, _)| value)
            .collect();
        // multiSearchAny takes at most 255 needles: one call per 200.
        for chunk in needles.chunks(200) {
            let list = s.texts(chunk.to_vec());
            terms.push(format!("multiSearchAny(changes, {list})"));
            terms.push(format!("multiSearchAny(ifNull(metadata, ''), {list})"));
        }
    }
    format!("organization_id = {o} AND ({})", terms.join(" OR "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_copies_keyed_by_email_are_found_with_their_key_column() {
        let keyed: Vec<(&str, &str)> = COPY_TABLES
            .iter()
            .filter(|c| keyed_by_email(c))
            .map(|c| (c.table, email_key_column(c)))
            .collect();
        assert_eq!(
            keyed,
            vec![
                ("audit_events_by_actor_email", "actor_email"),
                (ROWS_COPY, "actor_email_key"),
            ]
        );
    }

    #[test]
    fn values_inside_json_are_matched_whole_and_quoted() {
        let p = Pseudonyms::new(b"k", "o", "u");
        let known = Known {
            emails: ["ada@x.example".to_owned()].into(),
            names: ["Zoë \"Z\"".to_owned()].into(),
            ..Known::default()
        };
        let pairs = known.json_replacements(&p);
        assert_eq!(pairs[0].0, "\"ada@x.example\"");
        assert_eq!(pairs[0].1, format!("\"{}\"", p.email()));
        assert_eq!(pairs[1].0, "\"Zoë \\\"Z\\\"\"");
    }
}
