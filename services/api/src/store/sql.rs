//! Statements over one table: a `WHERE` clause whose every value is a server-side query
//! parameter (`{p0:String}` in the text, `param_p0` beside it), never spliced into the SQL.

use audit_store::clickhouse;

use crate::query::{Cursor, SortOrder};

/// A value sent as a server-side query parameter: `{p0:String}` in the statement, `param_p0`
/// beside it, so that ClickHouse parses it as a value of that type and never as SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Param {
    Text(String),
    Int(i64),
    /// The right side of `IN`.
    Texts(Vec<String>),
}

impl Param {
    fn type_name(&self) -> &'static str {
        match self {
            Param::Text(_) => "String",
            Param::Int(_) => "Int64",
            Param::Texts(_) => "Array(String)",
        }
    }
}

/// A `WHERE` clause over one table, with its parameters (named `p0`, `p1`, ... by position).
#[derive(Debug, Clone)]
pub(super) struct Condition {
    pub(super) table: &'static str,
    pub(super) sql: String,
    pub(super) params: Vec<Param>,
}

impl Condition {
    pub(super) fn on(table: &'static str) -> Self {
        Self {
            table,
            sql: String::new(),
            params: Vec::new(),
        }
    }

    /// The placeholder of a new parameter.
    pub(super) fn param(&mut self, value: Param) -> String {
        let placeholder = format!("{{p{}:{}}}", self.params.len(), value.type_name());
        self.params.push(value);
        placeholder
    }

    pub(super) fn and(&mut self, sql: &str) {
        if !self.sql.is_empty() {
            self.sql.push_str(" AND ");
        }
        self.sql.push_str(sql);
    }

    /// `left value`, e.g. `("event_type =", Text(..))`.
    pub(super) fn and_compare(&mut self, left: &str, value: Param) {
        let placeholder = self.param(value);
        self.and(&format!("{left} {placeholder}"));
    }

    /// `from_ms <= occurred_at_ms < to_ms`, each bound only when given.
    pub(super) fn between(&mut self, from_ms: Option<i64>, to_ms: Option<i64>) {
        if let Some(from) = from_ms {
            self.and_compare("occurred_at_ms >=", Param::Int(from));
        }
        if let Some(to) = to_ms {
            self.and_compare("occurred_at_ms <", Param::Int(to));
        }
    }

    /// Outside each `[start, end)` of `gaps` (times an organization no longer holds).
    pub(super) fn outside(&mut self, gaps: &[(i64, i64)]) {
        for (start, end) in gaps {
            let start = self.param(Param::Int(*start));
            let end = self.param(Param::Int(*end));
            self.and(&format!(
                "NOT (occurred_at_ms >= {start} AND occurred_at_ms < {end})"
            ));
        }
    }

    /// The clause, or `1` for none.
    pub(super) fn clause(&self) -> &str {
        if self.sql.is_empty() {
            "1"
        } else {
            &self.sql
        }
    }

    /// Strictly after the cursor's (time, id) in its sort order. The plain bound on time comes
    /// first: by it ClickHouse skips along the primary key.
    pub(super) fn after(&mut self, cursor: &Cursor) {
        let (at, strict) = match cursor.sort {
            SortOrder::Desc => ("<=", "<"),
            SortOrder::Asc => (">=", ">"),
        };
        let t = self.param(Param::Int(cursor.occurred_at_ms));
        let id = self.param(Param::Text(cursor.id.clone()));
        self.and(&format!(
            "occurred_at_ms {at} {t} AND (occurred_at_ms {strict} {t} OR id {strict} {id})"
        ));
    }

    pub(super) fn bind(&self, mut query: clickhouse::query::Query) -> clickhouse::query::Query {
        for (n, value) in self.params.iter().enumerate() {
            let name = format!("p{n}");
            query = match value {
                Param::Text(text) => query.param(&name, text.as_str()),
                Param::Int(n) => query.param(&name, n),
                Param::Texts(list) => query.param(&name, list),
            };
        }
        query
    }
}

/// `ORDER BY` of the sort order: time, then id as the tie-breaker.
pub(super) fn order_by(sort: SortOrder) -> String {
    let dir = sort.sql();
    format!("ORDER BY occurred_at_ms {dir}, id {dir}")
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use audit_store::EVENTS_TABLE;

    /// Placeholders in the text, each with a parameter.
    pub(crate) fn placeholders(sql: &str) -> usize {
        sql.matches("{p").count()
    }

    #[test]
    fn a_cursor_continues_strictly_after_its_event() {
        let mut condition = Condition::on(EVENTS_TABLE);
        let cursor = Cursor {
            sort: SortOrder::Desc,
            occurred_at_ms: 10,
            id: "x".to_owned(),
            filters: String::new(),
        };
        condition.after(&cursor);
        assert_eq!(
            condition.sql,
            "occurred_at_ms <= {p0:Int64} AND (occurred_at_ms < {p0:Int64} OR id < {p1:String})"
        );
        assert_eq!(
            condition.params,
            vec![Param::Int(10), Param::Text("x".to_owned())]
        );
    }
}
