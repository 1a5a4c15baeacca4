//! Row types of the events table, in column order (RowBinary has no names).

use audit_event::AuditEvent;
use clickhouse::Row;
use serde::{Deserialize, Serialize};

pub const EVENTS_TABLE: &str = "audit_events";

/// Where an event came from, kept with it for lineage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lineage {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub ingested_at_ms: u64,
}

/// One row of `audit_events` (see `schemas/clickhouse/0001_create_audit_events.sql`).
#[derive(Debug, Clone, Default, PartialEq, Row, Serialize, Deserialize)]
pub struct AuditEventRow {
    pub organization_id: String,
    pub occurred_at_ms: i64,
    pub id: String,
    pub event_type: String,
    pub actor_id: String,
    pub actor_type: String,
    pub actor_email: Option<String>,
    pub actor_name: Option<String>,
    pub resource_type: String,
    pub resource_id: String,
    pub resource_name: Option<String>,
    pub affected_user_id: Option<String>,
    pub affected_user_email: Option<String>,
    /// JSON array text of `{field, oldValue?, newValue?}`.
    pub changes: String,
    pub context_ip: Option<String>,
    pub context_user_agent: Option<String>,
    pub context_request_id: Option<String>,
    pub context_location: Option<String>,
    /// The producer's metadata object, verbatim.
    pub metadata: Option<String>,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub ingested_at_ms: u64,
}

impl AuditEventRow {
    pub fn from_event(event: &AuditEvent, lineage: &Lineage) -> Self {
        Self::from_event_owned(event.clone(), lineage.clone())
    }

    /// Moves the event's values into a row (no copies: the ingest's hot path).
    pub fn from_event_owned(event: AuditEvent, lineage: Lineage) -> Self {
        let occurred_at_ms = event.occurred_at_millis();
        // Serialising validated changes (strings and raw JSON) cannot fail.
        let changes = serde_json::to_string(&event.changes).unwrap_or_else(|_| "[]".to_owned());
        let context = event.context.unwrap_or_default();
        let (affected_user_id, affected_user_email) = match event.affected_user {
            Some(user) => (Some(user.id), user.email),
            None => (None, None),
        };
        Self {
            organization_id: event.organization_id,
            occurred_at_ms,
            id: event.id,
            event_type: event.event_type,
            actor_id: event.actor.id,
            actor_type: event.actor.actor_type.as_str().to_owned(),
            actor_email: event.actor.email,
            actor_name: event.actor.name,
            resource_type: event.resource.resource_type,
            resource_id: event.resource.id,
            resource_name: event.resource.name,
            affected_user_id,
            affected_user_email,
            changes,
            context_ip: context.ip,
            context_user_agent: context.user_agent,
            context_request_id: context.request_id,
            context_location: context.location,
            metadata: event.metadata.map(|m| m.get().to_owned()),
            source_topic: lineage.topic,
            source_partition: lineage.partition,
            source_offset: lineage.offset,
            ingested_at_ms: lineage.ingested_at_ms,
        }
    }

    /// Approximate bytes of the row on the wire, for batch size limits.
    pub fn wire_size(&self) -> usize {
        fn opt(value: &Option<String>) -> usize {
            1 + value.as_ref().map_or(0, |v| v.len() + 2)
        }
        self.organization_id.len()
            + self.id.len()
            + self.event_type.len()
            + self.actor_id.len()
            + self.actor_type.len()
            + self.resource_type.len()
            + self.resource_id.len()
            + self.changes.len()
            + self.source_topic.len()
            + opt(&self.actor_email)
            + opt(&self.actor_name)
            + opt(&self.resource_name)
            + opt(&self.affected_user_id)
            + opt(&self.affected_user_email)
            + opt(&self.context_ip)
            + opt(&self.context_user_agent)
            + opt(&self.context_request_id)
            + opt(&self.context_location)
            + opt(&self.metadata)
            + 9 * 2
            + 8 * 3
            + 4
    }
}

pub const DIRECTORY_USERS_TABLE: &str = "directory_users";
pub const DIRECTORY_TEAMS_TABLE: &str = "directory_teams";

/// One "user id has this email" fact (`directory_users`).
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct DirectoryUserRow {
    pub organization_id: String,
    pub user_id: String,
    pub email: String,
    pub occurred_at_ms: i64,
    pub event_id: String,
}

/// One "team id has this name" fact (`directory_teams`).
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct DirectoryTeamRow {
    pub organization_id: String,
    pub team_id: String,
    pub name: String,
    pub occurred_at_ms: i64,
    pub event_id: String,
}
