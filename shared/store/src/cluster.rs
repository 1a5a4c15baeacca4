//! Sharded deployments: how the migrations' tables are laid out on a ClickHouse cluster, and
//! how a statement that must reach every server is run.
//!
//! With `clickhouse.cluster` set, the events table and every copy of it are sharded: each server
//! holds `<table>_local` (its shard's rows; `Replicated*` with the `{shard}`/`{replica}` macros
//! when `cluster_replicated`), and `<table>` is a `Distributed` table over them that both
//! services read and write through as before. Rows go to a shard by `cityHash64(organization_id,
//! id)`: every copy of one event, and its rows in every copy table, land on the same shard, where
//! ReplacingMergeTree and `FINAL` collapse them. The materialized views run on each server, from
//! its `audit_events_local` to its copy tables. The small tables (directory, keys, fences, the
//! migrations record) are whole on every server: replicated across the cluster when
//! `cluster_replicated`, else the services use the ones of the server at `clickhouse.url`.
//!
//! Statements for every server run `ON CLUSTER` when `cluster_replicated` (ClickHouse's
//! distributed DDL, which needs Keeper), else on each of `cluster_nodes` in turn. They name
//! every table with its database: a server running a distributed DDL task resolves a bare name
//! in its own default database (18.16 does; the runner does not rely on later versions'
//! rewriting).

use crate::config::ClickHouseConfig;
use crate::copies::COPY_TABLES;
use crate::error::StoreError;
use crate::rows::EVENTS_TABLE;

/// The suffix of a shard's own table behind a `Distributed` one.
pub const LOCAL_SUFFIX: &str = "_local";

/// The shard key of every sharded table: all of them have these columns.
pub const SHARD_KEY: &str = "cityHash64(organization_id, id)";

/// How the store is laid out, from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology<'a> {
    /// One server (or a replicated cluster the operator manages outside the service).
    Single,
    /// Shards with replicas: `ON CLUSTER` statements and `Replicated*` engines.
    Replicated { cluster: &'a str },
    /// Shards of one server each, without Keeper: every server is told in turn.
    Shards {
        cluster: &'a str,
        nodes: &'a [String],
    },
}

/// Whether `table` is sharded (the events table and its copies) under a cluster.
pub fn is_sharded(table: &str) -> bool {
    table == EVENTS_TABLE || COPY_TABLES.iter().any(|c| c.table == table)
}

/// A statement of a migration as it runs on the configured topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub sql: String,
    /// Runs on every server (`ON CLUSTER` is in `sql` when replicated; otherwise the runner
    /// sends it to each node). Otherwise it runs once, on the server at `clickhouse.url`.
    pub every_server: bool,
}

impl Topology<'_> {
    /// ` ON CLUSTER <name>` where distributed DDL is used, else nothing.
    pub fn on_cluster(&self) -> String {
        match self {
            Topology::Replicated { cluster } => format!(" ON CLUSTER {cluster}"),
            _ => String::new(),
        }
    }

    /// The table a statement names when it must act on each shard's own rows (`OPTIMIZE`, the
    /// parts listing, a view's source).
    pub fn local_table(&self, table: &str) -> String {
        if *self != Topology::Single && is_sharded(table) {
            format!("{table}{LOCAL_SUFFIX}")
        } else {
            table.to_owned()
        }
    }

    /// The statements one migration statement becomes: unchanged on one server; on a cluster,
    /// per the layout of the module documentation. The migrations follow a fixed form
    /// (`CREATE TABLE IF NOT EXISTS <name>` ... `ENGINE = <engine>` on a line of its own,
    /// `CREATE MATERIALIZED VIEW IF NOT EXISTS <name> TO <table> AS SELECT ... FROM <table>`);
    /// one that does not is refused, naming it, rather than laid out wrongly.
    pub fn render(&self, statement: &str, database: &str) -> Result<Vec<Rendered>, StoreError> {
        let once = |sql: String| Rendered {
            sql,
            every_server: false,
        };
        let every = |sql: String| Rendered {
            sql,
            every_server: true,
        };
        if *self == Topology::Single {
            return Ok(vec![once(statement.to_owned())]);
        }
        let on = self.on_cluster();
        if let Some(rest) = statement.strip_prefix("CREATE TABLE IF NOT EXISTS ") {
            let (name, body) = split_name(rest)?;
            let (columns, engine, settings) = split_engine(name, body)?;
            if !is_sharded(name) {
                let engine = self.engine(engine, database, name, false)?;
                return Ok(vec![every(format!(
                    "CREATE TABLE IF NOT EXISTS {database}.{name}{on}{columns}ENGINE = {engine}{settings}"
                ))]);
            }
            let local = format!("{name}{LOCAL_SUFFIX}");
            let engine = self.engine(engine, database, &local, true)?;
            let cluster = match self {
                Topology::Replicated { cluster } | Topology::Shards { cluster, .. } => *cluster,
                Topology::Single => unreachable!("handled above"),
            };
            return Ok(vec![
                every(format!(
                    "CREATE TABLE IF NOT EXISTS {database}.{local}{on}{columns}ENGINE = {engine}{settings}"
                )),
                every(format!(
                    "CREATE TABLE IF NOT EXISTS {database}.{name}{on} AS {database}.{local} \
                     ENGINE = Distributed('{cluster}', '{database}', '{local}', {SHARD_KEY})"
                )),
            ]);
        }
        // A view's text is one line of single spaces (its SELECT has no literal with spaces).
        let squashed = statement.split_whitespace().collect::<Vec<_>>().join(" ");
        if let Some(rest) = squashed.strip_prefix("CREATE MATERIALIZED VIEW IF NOT EXISTS ") {
            let (name, body) = split_name(rest)?;
            let body = body.trim_start();
            let Some((target, select)) =
                body.strip_prefix("TO ").and_then(|b| b.split_once(" AS "))
            else {
                return Err(unexpected(name, "a view without TO <table> AS"));
            };
            let source = format!(" FROM {EVENTS_TABLE}");
            if !select.trim_end().ends_with(&source) {
                return Err(unexpected(name, "a view that does not read audit_events"));
            }
            let select = format!(
                "{}{}",
                select.trim_end().strip_suffix(&source).unwrap_or(select),
                format_args!(" FROM {database}.{}", self.local_table(EVENTS_TABLE))
            );
            return Ok(vec![every(format!(
                "CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.{name}{on} TO {database}.{} AS {select}",
                self.local_table(target.trim())
            ))]);
        }
        if statement.starts_with("CREATE") || statement.starts_with("ALTER") {
            return Err(unexpected(
                statement.lines().next().unwrap_or_default(),
                "a schema change the cluster layout does not know",
            ));
        }
        // Back-fills and other writes: once, through the Distributed tables.
        Ok(vec![once(statement.to_owned())])
    }

    /// The engine of a table on this topology: `Replicated<engine>` with its Keeper path and
    /// replica name when replicated (per shard for a sharded table, one group across the whole
    /// cluster for a table every server holds whole), else as written.
    fn engine(
        &self,
        engine: &str,
        database: &str,
        table: &str,
        sharded: bool,
    ) -> Result<String, StoreError> {
        if !matches!(self, Topology::Replicated { .. }) {
            return Ok(engine.to_owned());
        }
        let (family, args) = match engine.split_once('(') {
            Some((family, args)) => (
                family.trim(),
                args.trim_end()
                    .strip_suffix(')')
                    .ok_or_else(|| unexpected(table, "an engine without its closing parenthesis"))?
                    .trim(),
            ),
            None => (engine.trim(), ""),
        };
        if !family.ends_with("MergeTree") {
            return Err(unexpected(
                table,
                "an engine that is not of the MergeTree family",
            ));
        }
        let (path, replica) = if sharded {
            (
                format!("/clickhouse/tables/{{shard}}/{database}/{table}"),
                "{replica}",
            )
        } else {
            (
                format!("/clickhouse/tables/all/{database}/{table}"),
                "{shard}-{replica}",
            )
        };
        let args = if args.is_empty() {
            String::new()
        } else {
            format!(", {args}")
        };
        Ok(format!("Replicated{family}('{path}', '{replica}'{args})"))
    }
}

fn unexpected(what: &str, why: &str) -> StoreError {
    StoreError::Config(format!(
        "clickhouse.cluster: cannot lay out {what:?} on a cluster ({why})"
    ))
}

/// `<name>` and what follows it.
fn split_name(rest: &str) -> Result<(&str, &str), StoreError> {
    let end = rest
        .find(|c: char| c.is_whitespace() || c == '(')
        .unwrap_or(rest.len());
    let name = &rest[..end];
    if name.is_empty() {
        return Err(unexpected(rest, "no name"));
    }
    Ok((name, &rest[end..]))
}

/// `(columns)\n`, the engine (its line), and what follows it (`PARTITION BY`, `ORDER BY`...).
fn split_engine<'a>(name: &str, body: &'a str) -> Result<(&'a str, &'a str, &'a str), StoreError> {
    let at = body
        .find("ENGINE = ")
        .ok_or_else(|| unexpected(name, "no ENGINE = "))?;
    let columns = &body[..at];
    let rest = &body[at + "ENGINE = ".len()..];
    let end = rest.find('\n').unwrap_or(rest.len());
    Ok((columns, &rest[..end], &rest[end..]))
}

impl ClickHouseConfig {
    /// The layout the configuration asks for.
    pub fn topology(&self) -> Topology<'_> {
        match (self.cluster.as_str(), self.cluster_replicated) {
            ("", _) => Topology::Single,
            (cluster, true) => Topology::Replicated { cluster },
            (cluster, false) => Topology::Shards {
                cluster,
                nodes: &self.cluster_nodes,
            },
        }
    }

    /// Clients of the servers a statement for every server is sent to: the one at `url` (with
    /// `ON CLUSTER` in the statement, or on one server), or each of `cluster_nodes`.
    pub fn every_server(&self) -> Vec<ClickHouseConfig> {
        match self.topology() {
            Topology::Shards { nodes, .. } => nodes
                .iter()
                .map(|url| ClickHouseConfig {
                    url: url.clone(),
                    ..self.clone()
                })
                .collect(),
            _ => vec![self.clone()],
        }
    }

    /// `table` as a statement on each shard's own rows names it (`OPTIMIZE TABLE {}`,
    /// `TRUNCATE TABLE {}`): the shard's table, with its database (a server running an `ON
    /// CLUSTER` task resolves a bare name in its own default database), and `ON CLUSTER` where
    /// replicated. Run the statement with [`Self::execute_everywhere`].
    pub fn each_shard_table(&self, table: &str) -> String {
        let topology = self.topology();
        format!(
            "{}.{}{}",
            self.database,
            topology.local_table(table),
            topology.on_cluster()
        )
    }

    /// Runs `sql` (built for this topology, `ON CLUSTER` included) on every server it must reach;
    /// `tune` sets what the statement needs on each client.
    pub async fn execute_everywhere(
        &self,
        sql: &str,
        tune: impl Fn(clickhouse::Client) -> clickhouse::Client,
    ) -> Result<(), clickhouse::error::Error> {
        for server in self.every_server() {
            tune(server.client()).query(sql).execute().await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrations::MIGRATIONS;

    fn all(topology: Topology<'_>) -> Vec<Rendered> {
        MIGRATIONS
            .iter()
            .flat_map(|m| m.statements())
            .flat_map(|s| topology.render(&s, "audit").unwrap())
            .collect()
    }

    #[test]
    fn one_server_runs_the_migrations_as_written() {
        let written: Vec<String> = MIGRATIONS.iter().flat_map(|m| m.statements()).collect();
        let rendered: Vec<String> = all(Topology::Single).into_iter().map(|r| r.sql).collect();
        assert_eq!(rendered, written);
    }

    #[test]
    fn a_replicated_cluster_gets_local_replicated_tables_and_distributed_ones_over_them() {
        let rendered = all(Topology::Replicated { cluster: "prod" });
        let text = rendered
            .iter()
            .map(|r| r.sql.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        for table in std::iter::once(EVENTS_TABLE).chain(COPY_TABLES.iter().map(|c| c.table)) {
            let local = rendered
                .iter()
                .find(|r| {
                    r.sql.starts_with(&format!(
                        "CREATE TABLE IF NOT EXISTS audit.{table}_local ON CLUSTER prod"
                    ))
                })
                .unwrap_or_else(|| panic!("no local table for {table} in\n{text}"));
            assert!(local.every_server);
            assert!(
                local.sql.contains(&format!(
                    "ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{{shard}}/audit/{table}_local', '{{replica}}'"
                )),
                "{}",
                local.sql
            );
            assert!(
                local.sql.contains("ORDER BY (organization_id"),
                "{}",
                local.sql
            );
            assert!(text.contains(&format!(
                "CREATE TABLE IF NOT EXISTS audit.{table} ON CLUSTER prod AS audit.{table}_local \
                 ENGINE = Distributed('prod', 'audit', '{table}_local', cityHash64(organization_id, id))"
            )));
        }
        // Every view reads the shard's own events into the shard's own copy.
        let views: Vec<&Rendered> = rendered
            .iter()
            .filter(|r| r.sql.contains("MATERIALIZED VIEW"))
            .collect();
        assert_eq!(views.len(), COPY_TABLES.len());
        for view in views {
            assert!(
                view.sql
                    .contains(" ON CLUSTER prod TO audit.audit_events_by_"),
                "{}",
                view.sql
            );
            assert!(
                view.sql.ends_with(" FROM audit.audit_events_local"),
                "{}",
                view.sql
            );
            assert!(view.sql.contains("_local AS SELECT"), "{}", view.sql);
        }
        // The small tables: whole on every server, one replication group.
        assert!(
            text.contains("CREATE TABLE IF NOT EXISTS audit.api_keys ON CLUSTER prod"),
            "{text}"
        );
        assert!(text.contains("ReplicatedReplacingMergeTree('/clickhouse/tables/all/audit/api_keys', '{shard}-{replica}'"), "{text}");
        assert!(text.contains("ReplicatedMergeTree('/clickhouse/tables/all/audit/audit_event_duplicates', '{shard}-{replica}')"), "{text}");
        // Back-fills run once, through the Distributed tables.
        let inserts: Vec<&Rendered> = rendered
            .iter()
            .filter(|r| r.sql.starts_with("INSERT"))
            .collect();
        assert!(!inserts.is_empty());
        assert!(inserts
            .iter()
            .all(|r| !r.every_server && !r.sql.contains("_local")));
    }

    #[test]
    fn shards_without_keeper_keep_the_engines_and_send_each_server_the_statement() {
        let nodes = vec!["http://a:8123".to_owned(), "http://b:8123".to_owned()];
        let rendered = all(Topology::Shards {
            cluster: "s",
            nodes: &nodes,
        });
        assert!(rendered
            .iter()
            .all(|r| !r.sql.contains("ON CLUSTER") && !r.sql.contains("Replicated")));
        assert!(rendered.iter().any(|r| r.every_server
            && r.sql
                .starts_with("CREATE TABLE IF NOT EXISTS audit.audit_events_local")
            && r.sql
                .contains("ENGINE = ReplacingMergeTree(ingested_at_ms)")));
        assert!(rendered.iter().any(|r| r.sql
            == "CREATE TABLE IF NOT EXISTS audit.audit_events AS audit.audit_events_local \
                ENGINE = Distributed('s', 'audit', 'audit_events_local', cityHash64(organization_id, id))"));
    }

    #[test]
    fn a_statement_outside_the_known_forms_is_refused_by_name() {
        let topology = Topology::Replicated { cluster: "c" };
        let err = topology
            .render(
                "CREATE TABLE IF NOT EXISTS t (a String) ORDER BY a",
                "audit",
            )
            .unwrap_err();
        assert!(err.to_string().contains("\"t\""), "{err}");
        let err = topology
            .render("ALTER TABLE audit_events ADD COLUMN x String", "audit")
            .unwrap_err();
        assert!(
            err.to_string().contains("ALTER TABLE audit_events"),
            "{err}"
        );
        assert!(topology
            .render(
                "CREATE TABLE IF NOT EXISTS t (a String)\nENGINE = Log",
                "audit"
            )
            .is_err());
    }

    #[test]
    fn a_statement_on_each_shard_names_its_own_table_and_the_cluster_where_replicated() {
        let mut config = ClickHouseConfig::default();
        assert_eq!(
            config.each_shard_table("audit_events"),
            "audit.audit_events"
        );
        config.cluster = "c".to_owned();
        assert_eq!(
            config.each_shard_table("audit_events"),
            "audit.audit_events_local ON CLUSTER c"
        );
        config.cluster_replicated = false;
        config.cluster_nodes = vec!["http://a:8123".to_owned()];
        assert_eq!(
            config.each_shard_table("audit_events"),
            "audit.audit_events_local"
        );
    }

    #[test]
    fn local_tables_are_named_only_on_a_cluster() {
        assert_eq!(Topology::Single.local_table("audit_events"), "audit_events");
        let replicated = Topology::Replicated { cluster: "c" };
        assert_eq!(replicated.local_table("audit_events"), "audit_events_local");
        assert_eq!(replicated.local_table("api_keys"), "api_keys");
    }
}
