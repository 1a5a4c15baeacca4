//! Aggregates computed month by month over a table's parts, kept while a month's parts stay
//! the same (see [`crate::partitions`]).

use audit_store::Topology;

use super::count::MonthRows;
use super::sql::{Condition, Param};
use super::AuditLogStore;
use super::ReadError;
use crate::partitions::{self, Aggregate, AggregateKey, Month, Part};

/// What [`AuditLogStore::by_month`] computed.
pub(super) struct Aggregated {
    pub(super) value: u64,
    /// The months whose value this call computed (not taken from the cache).
    pub(super) counted_now: Vec<Month>,
    /// The value of each month, when every month was computed or known one by one.
    pub(super) per_month: Option<MonthRows>,
}

impl AuditLogStore {
    /// The months of `table` from its active parts (one `system.parts` read), or None when it
    /// is not partitioned by month.
    pub(super) async fn months(&self, table: &str) -> Result<Option<Vec<Month>>, ReadError> {
        let (listing, sql) = self.parts_listing(table);
        let parts: Vec<Part> = self.fetch_all("parts", &listing, &sql).await?;
        Ok(partitions::months(&parts))
    }

    /// The active parts of `table` (partition, name, level): its condition and statement. On
    /// a cluster, the parts of its shards' own tables, one replica of each shard, each name
    /// prefixed with its shard's number (see [`partitions::Part`]).
    pub(super) fn parts_listing(&self, table: &str) -> (Condition, String) {
        let topology = self.clickhouse.topology();
        let mut listing = Condition::on("system.parts");
        listing.and("active");
        listing.and_compare("database =", Param::Text(self.clickhouse.database.clone()));
        listing.and_compare("table =", Param::Text(topology.local_table(table)));
        let sql = match topology {
            Topology::Single => format!(
                "SELECT partition_id, name, level FROM system.parts WHERE {}",
                listing.sql
            ),
            Topology::Replicated { cluster } | Topology::Shards { cluster, .. } => format!(
                "SELECT partition_id, concat(toString(_shard_num), '/', name), level \
                 FROM cluster('{cluster}', system.parts) WHERE {}",
                listing.sql
            ),
        };
        (listing, sql)
    }

    pub(super) fn aggregate_key(condition: &Condition, aggregate: Aggregate) -> AggregateKey {
        AggregateKey {
            table: condition.table,
            aggregate,
            condition: format!("{} {:?}", condition.sql, condition.params),
        }
    }

    /// `aggregate` over the rows of `condition` within `[from, to)`, computed per month (of
    /// `months`, from [`Self::months`]): the months whose parts did not change since the cache
    /// saw them are taken from it, the others are computed one `UNION ALL` branch each. Without
    /// a cache, `[from, to)` is aggregated in one query. A table whose partitions are not
    /// months is aggregated in one plain query.
    pub(super) async fn by_month(
        &self,
        condition: &Condition,
        aggregate: Aggregate,
        months: Option<Vec<Month>>,
        (from_ms, to_ms): (Option<i64>, Option<i64>),
    ) -> Result<Aggregated, ReadError> {
        let table = condition.table;
        let kind = aggregate.label();
        let Some(months) = months else {
            let sql = format!(
                "SELECT {} FROM {table} WHERE {}",
                aggregate.sql(),
                condition.clause()
            );
            return Ok(Aggregated {
                value: self.fetch_one(kind, condition, &sql).await?,
                counted_now: Vec::new(),
                per_month: None,
            });
        };
        let key = Self::aggregate_key(condition, aggregate);
        let plan = self.partitions.plan(&key, months.clone(), from_ms, to_ms);
        self.metrics
            .observe_months(plan.reused.len(), plan.missing.len());
        let mut per_month: MonthRows = plan.reused.iter().cloned().collect();
        if plan.missing.is_empty() {
            let value = self.partitions.complete(&key, plan, &[]);
            return Ok(Aggregated {
                value,
                counted_now: Vec::new(),
                per_month: Some(per_month),
            });
        }
        if !self.partitions.enabled() {
            // Nothing is kept (`query.count_cache_entries = 0`): the range in one query, which
            // ClickHouse answers from the primary key's ranges. Counted month by month it
            // would cost a query's overhead (about 3 ms on 26.9) per month.
            let mut whole = condition.clone();
            whole.between(from_ms, to_ms);
            let sql = format!(
                "SELECT {} FROM {table} WHERE {}",
                aggregate.sql(),
                whole.clause()
            );
            let value = self.fetch_one(kind, &whole, &sql).await?;
            return Ok(Aggregated {
                value,
                counted_now: plan.missing,
                per_month: None,
            });
        }
        let counted_now = plan.missing.clone();
        let (value, computed) = self.compute_months(condition, &key, plan).await?;
        per_month.extend(computed);
        Ok(Aggregated {
            value,
            counted_now,
            per_month: Some(per_month),
        })
    }

    /// Computes the plan's missing months (one `UNION ALL` branch each), keeps them in the
    /// cache, and returns the aggregate over the plan's months with the computed values.
    pub(super) async fn compute_months(
        &self,
        condition: &Condition,
        key: &AggregateKey,
        plan: partitions::Plan,
    ) -> Result<(u64, Vec<(String, u64)>), ReadError> {
        let mut union = condition.clone();
        let rows = condition.clause().to_owned();
        let branches: Vec<String> = plan
            .missing
            .iter()
            .map(|month| {
                let id = union.param(Param::Text(month.id.clone()));
                let from = union.param(Param::Int(month.start_ms));
                let to = union.param(Param::Int(month.end_ms));
                format!(
                    "SELECT {id} AS month, {} AS value FROM {} WHERE {rows} \
                     AND occurred_at_ms >= {from} AND occurred_at_ms < {to}",
                    key.aggregate.sql(),
                    condition.table,
                )
            })
            .collect();
        let kind = key.aggregate.label();
        let computed: Vec<(String, u64)> = self
            .fetch_all(kind, &union, &branches.join(" UNION ALL "))
            .await?;
        Ok((self.partitions.complete(key, plan, &computed), computed))
    }
}
