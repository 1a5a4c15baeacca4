//! One event as the read path returns it.

use audit_store::clickhouse::{self, Row};
use serde::Deserialize;

/// One event as the read path returns it (the lineage columns stay internal), borrowing its
/// text from the cursor's buffer: a row is rendered before the next one is read, so no field is
/// ever copied into a `String` of its own (an export decodes millions of rows).
#[derive(Debug, Clone, PartialEq, Row, Deserialize)]
pub struct EventRecord<'a> {
    pub id: &'a str,
    pub occurred_at_ms: i64,
    pub event_type: &'a str,
    pub actor_id: &'a str,
    pub actor_type: &'a str,
    #[serde(borrow)]
    pub actor_email: Option<&'a str>,
    #[serde(borrow)]
    pub actor_name: Option<&'a str>,
    #[serde(borrow)]
    pub affected_user_id: Option<&'a str>,
    #[serde(borrow)]
    pub affected_user_email: Option<&'a str>,
    pub resource_type: &'a str,
    pub resource_id: &'a str,
    #[serde(borrow)]
    pub resource_name: Option<&'a str>,
    pub changes: &'a str,
    #[serde(borrow)]
    pub context_ip: Option<&'a str>,
    #[serde(borrow)]
    pub context_user_agent: Option<&'a str>,
    #[serde(borrow)]
    pub context_request_id: Option<&'a str>,
    #[serde(borrow)]
    pub context_location: Option<&'a str>,
    #[serde(borrow)]
    pub metadata: Option<&'a str>,
}

/// A cursor over [`EventRecord`]s; each row borrows from it until the next is read.
pub type EventCursor = clickhouse::query::RowCursor<EventRecord<'static>>;
