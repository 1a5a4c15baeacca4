//! The retention job (`audit-api retention run`): removes every event an organization no
//! longer holds from every table that holds it, and finishes erasures a crashed run left.
//!
//! Removal is one `ALTER TABLE ... DELETE` mutation per table (the events, each copy, the
//! directory), waited for (`mutations_sync = 2`): when the job ends, the rows are gone from disk,
//! not only hidden. A mutation rewrites only the parts holding matching rows (ClickHouse
//! hard-links the others), so a run costs about one rewrite of the months where something
//! expired. Every value is a bound parameter. A run that fails or is killed is simply run again:
//! each step is idempotent.

use std::collections::HashMap;

use audit_store::clickhouse;
use audit_store::retention::{self, HoldRow, Visibility, RUNS_TABLE};
use audit_store::{
    is_sharded, ClickHouseConfig, COPY_TABLES, DIRECTORY_TEAMS_TABLE, DIRECTORY_USERS_TABLE,
    EVENTS_TABLE,
};
use clickhouse::Row;
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::time::format_timestamp;

/// Organizations per mutation: the clause grows with each.
const ORGANIZATIONS_PER_STATEMENT: usize = 200;

/// Why a run of the job failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("{0}")]
    Refused(String),
    #[error("clickhouse: {0}")]
    Store(#[from] clickhouse::error::Error),
    /// A ClickHouse failure of an erasure, without the server's message: it quotes the
    /// statement, whose values are the person's data.
    #[error(
        "clickhouse failed during the erasure ({0}); its message is not shown because it quotes \
         the person's values. The job stays running: run the command again, or the next \
         `retention run` finishes it"
    )]
    Erasure(String),
}

impl JobError {
    /// This error with ClickHouse's message replaced by its kind and exception code.
    pub fn redacted(self) -> Self {
        match self {
            JobError::Store(err) => {
                JobError::Erasure(match audit_store::exception_code(&err.to_string()) {
                    Some(code) => format!("exception code {code}"),
                    None => format!("{:?}", audit_store::classify(&err)),
                })
            }
            other => other,
        }
    }
}

/// A statement with its bound values (`{p0:String}` in the text, `param_p0` beside it).
#[derive(Debug, Clone, Default)]
pub(super) struct Statement {
    pub(super) sql: String,
    params: Vec<Value>,
}

#[derive(Debug, Clone)]
enum Value {
    Text(String),
    Int(i64),
    Texts(Vec<String>),
}

impl Statement {
    pub(super) fn text(&mut self, value: &str) -> String {
        self.push(Value::Text(value.to_owned()), "String")
    }

    pub(super) fn int(&mut self, value: i64) -> String {
        self.push(Value::Int(value), "Int64")
    }

    pub(super) fn texts(&mut self, values: Vec<String>) -> String {
        self.push(Value::Texts(values), "Array(String)")
    }

    fn push(&mut self, value: Value, type_name: &str) -> String {
        let placeholder = format!("{{p{}:{type_name}}}", self.params.len());
        self.params.push(value);
        placeholder
    }

    pub(super) fn bind(&self, mut query: clickhouse::query::Query) -> clickhouse::query::Query {
        for (n, value) in self.params.iter().enumerate() {
            let name = format!("p{n}");
            query = match value {
                Value::Text(t) => query.param(&name, t.as_str()),
                Value::Int(i) => query.param(&name, i),
                Value::Texts(list) => query.param(&name, list),
            };
        }
        query
    }
}

/// What the job needs: the store's layout, and a client whose statements may run long.
#[derive(Clone)]
pub struct Job {
    clickhouse: ClickHouseConfig,
    timeout_seconds: u64,
    default_days: u32,
}

/// The outcome of one purge.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PurgeReport {
    pub run_id: String,
    pub started_at: String,
    pub finished_at: String,
    /// Events removed per organization (stored rows of `audit_events` before the run).
    pub organizations: Vec<OrganizationPurge>,
    pub removed_events: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct OrganizationPurge {
    pub organization_id: String,
    pub retention_days: u32,
    /// Events before this time were removed unless a hold covers them.
    pub held_from: Option<String>,
    pub removed_events: u64,
}

#[derive(Debug, Row, Serialize)]
struct RunRow {
    run_id: String,
    started_at_ms: i64,
    finished_at_ms: i64,
    organizations: u32,
    removed_rows: u64,
    error: String,
}

#[derive(Debug, Row, Deserialize)]
struct Oldest {
    organization_id: String,
    oldest_ms: i64,
}

impl Job {
    pub fn new(clickhouse: &ClickHouseConfig, timeout_seconds: u64, default_days: u32) -> Self {
        Self {
            clickhouse: clickhouse.clone(),
            timeout_seconds,
            default_days,
        }
    }

    /// A client of `server` for the job's statements: mutations waited for on every replica,
    /// up to the job's time limit, and the job's own queries at the lowest CPU priority (Linux
    /// nice 19; a no-op on a server without CAP_SYS_NICE), so that reads keep theirs. The
    /// mutations themselves run in the server's background pool: its
    /// `os_threads_nice_value_merge_mutate` (README) does the same for them.
    fn client_of(&self, server: &ClickHouseConfig) -> clickhouse::Client {
        server
            .client()
            .with_setting("max_execution_time", self.timeout_seconds.to_string())
            .with_setting("mutations_sync", "2")
            .with_setting("os_thread_priority", "19")
    }

    pub(super) fn client(&self) -> clickhouse::Client {
        self.client_of(&self.clickhouse)
    }

    /// Runs `ALTER TABLE <table's shards> <rest>` wherever `table` lives: every server for the
    /// events and their copies on a cluster of single-server shards, else the server at
    /// `clickhouse.url` (with `ON CLUSTER` when replicated).
    pub(super) async fn alter(
        &self,
        table: &str,
        rest: &str,
        statement: &Statement,
    ) -> Result<(), clickhouse::error::Error> {
        let sql = format!(
            "ALTER TABLE {} {rest}",
            self.clickhouse.each_shard_table(table)
        );
        let servers = if is_sharded(table) {
            self.clickhouse.every_server()
        } else {
            vec![self.clickhouse.clone()]
        };
        for server in servers {
            statement
                .bind(self.client_of(&server).query(&sql))
                .execute()
                .await?;
        }
        Ok(())
    }

    /// `<database>.<table>`: a statement that reaches other servers (a `Distributed` table's
    /// `GLOBAL IN` subquery) names its tables with their database.
    pub(super) fn qualified(&self, table: &str) -> String {
        format!("{}.{table}", self.clickhouse.database)
    }

    /// Every table holding an organization's events or facts about its people.
    pub(super) fn event_tables() -> impl Iterator<Item = &'static str> {
        std::iter::once(EVENTS_TABLE).chain(COPY_TABLES.iter().map(|c| c.table))
    }

    /// Removes what every organization no longer holds at `now_ms`, then records the run.
    pub async fn purge(&self, now_ms: i64) -> Result<PurgeReport, JobError> {
        let run_id = format!("run_{}", uuid::Uuid::new_v4().simple());
        let started = retention::now_ms();
        let result = self.purge_inner(now_ms).await;
        let finished = retention::now_ms();
        let (organizations, removed, error) = match &result {
            Ok(orgs) => (
                orgs.len() as u32,
                orgs.iter().map(|o| o.removed_events).sum(),
                String::new(),
            ),
            Err(err) => (0, 0, err.to_string()),
        };
        let run = RunRow {
            run_id: run_id.clone(),
            started_at_ms: started,
            finished_at_ms: finished,
            organizations,
            removed_rows: removed,
            error,
        };
        retention::write_one(&self.client(), RUNS_TABLE, &run).await?;
        let organizations = result?;
        info!(%run_id, organizations = organizations.len(), removed_events = removed, "retention run finished");
        Ok(PurgeReport {
            run_id,
            started_at: format_timestamp(started),
            finished_at: format_timestamp(finished),
            removed_events: removed,
            organizations,
        })
    }

    async fn purge_inner(&self, now_ms: i64) -> Result<Vec<OrganizationPurge>, JobError> {
        let client = self.client();
        let (policies, holds) = tokio::try_join!(
            retention::load_policies(&client),
            retention::load_holds(&client, None)
        )?;
        let days: HashMap<String, u32> = policies.into_iter().collect();
        let mut active: HashMap<String, Vec<HoldRow>> = HashMap::new();
        for hold in holds.into_iter().filter(HoldRow::is_active) {
            active
                .entry(hold.organization_id.clone())
                .or_default()
                .push(hold);
        }
        // The oldest event or fact of each organization: those with nothing past their
        // retention are left alone.
        let oldest: Vec<Oldest> = client
            .query(&format!(
                "SELECT organization_id, min(m) AS oldest_ms FROM ( \
                 SELECT organization_id, min(occurred_at_ms) AS m FROM {EVENTS_TABLE} GROUP BY organization_id \
                 UNION ALL SELECT organization_id, min(occurred_at_ms) FROM {DIRECTORY_USERS_TABLE} GROUP BY organization_id \
                 UNION ALL SELECT organization_id, min(occurred_at_ms) FROM {DIRECTORY_TEAMS_TABLE} GROUP BY organization_id) \
                 GROUP BY organization_id ORDER BY organization_id"
            ))
            .fetch_all()
            .await?;
        let mut expired: Vec<(String, u32, Visibility)> = Vec::new();
        for org in oldest {
            let d = retention::effective_days(
                days.get(&org.organization_id).copied(),
                self.default_days,
            );
            let holds = active
                .get(&org.organization_id)
                .map(Vec::as_slice)
                .unwrap_or_default();
            let visibility = Visibility::at(now_ms, d, holds);
            let past = visibility.from_ms.is_some_and(|f| org.oldest_ms < f)
                || !visibility.gaps.is_empty();
            if past {
                expired.push((org.organization_id, d, visibility));
            }
        }
        let mut report = Vec::new();
        for chunk in expired.chunks(ORGANIZATIONS_PER_STATEMENT) {
            let mut statement = Statement::default();
            let clause = expired_clause(&mut statement, chunk);
            let mut count = statement.clone();
            count.sql = format!(
                "SELECT organization_id, count() FROM {EVENTS_TABLE} WHERE {clause} GROUP BY organization_id"
            );
            let counts: HashMap<String, u64> = count
                .bind(client.query(&count.sql))
                .fetch_all::<(String, u64)>()
                .await?
                .into_iter()
                .collect();
            for table in Self::event_tables().chain([DIRECTORY_USERS_TABLE, DIRECTORY_TEAMS_TABLE])
            {
                self.alter(table, &format!("DELETE WHERE {clause}"), &statement)
                    .await?;
            }
            for (organization_id, days, visibility) in chunk {
                report.push(OrganizationPurge {
                    organization_id: organization_id.clone(),
                    retention_days: *days,
                    held_from: visibility.from_ms.map(format_timestamp),
                    removed_events: counts.get(organization_id).copied().unwrap_or(0),
                });
            }
        }
        Ok(report)
    }
}

/// `(organization_id = o AND (occurred_at_ms < held_from OR <in a gap>)) OR ...`: the rows of
/// these organizations that they no longer hold.
fn expired_clause(
    statement: &mut Statement,
    organizations: &[(String, u32, Visibility)],
) -> String {
    let mut terms = Vec::new();
    for (organization_id, _, visibility) in organizations {
        let org = statement.text(organization_id);
        let mut past = Vec::new();
        if let Some(from) = visibility.from_ms {
            past.push(format!("occurred_at_ms < {}", statement.int(from)));
        }
        for (start, end) in &visibility.gaps {
            let (s, e) = (statement.int(*start), statement.int(*end));
            past.push(format!("(occurred_at_ms >= {s} AND occurred_at_ms < {e})"));
        }
        terms.push(format!(
            "(organization_id = {org} AND ({}))",
            past.join(" OR ")
        ));
    }
    terms.join(" OR ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_erasure_error_names_the_code_and_never_the_values() {
        let err = JobError::Store(clickhouse::error::Error::BadResponse(
            "Code: 60. DB::Exception: Unknown table (SELECT 1 WHERE email = 'ada@corp.example')"
                .into(),
        ));
        let text = err.redacted().to_string();
        assert!(text.contains("exception code 60"), "{text}");
        assert!(!text.contains("ada@corp"), "{text}");
        let refused = JobError::Refused("under a legal hold".into()).redacted();
        assert_eq!(refused.to_string(), "under a legal hold");
    }

    #[test]
    fn the_clause_names_each_organization_with_its_bound_and_gaps_as_parameters() {
        let mut statement = Statement::default();
        let clause = expired_clause(
            &mut statement,
            &[
                (
                    "a' OR 1=1".into(),
                    30,
                    Visibility {
                        from_ms: Some(10),
                        gaps: vec![],
                    },
                ),
                (
                    "b".into(),
                    30,
                    Visibility {
                        from_ms: Some(1),
                        gaps: vec![(5, 9)],
                    },
                ),
            ],
        );
        assert_eq!(
            clause,
            "(organization_id = {p0:String} AND (occurred_at_ms < {p1:Int64})) OR \
             (organization_id = {p2:String} AND (occurred_at_ms < {p3:Int64} OR \
             (occurred_at_ms >= {p4:Int64} AND occurred_at_ms < {p5:Int64})))"
        );
        assert_eq!(statement.params.len(), 6);
    }
}
