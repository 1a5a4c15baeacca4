//! The audit event envelope: the Rust side of `schemas/events/audit-event.schema.json`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

use crate::error::{EventError, RejectReason};
use crate::timestamp;
use crate::validate;

/// Largest accepted message, in bytes (1 MiB).
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// A validated audit event. Built only by [`AuditEvent::from_slice`], so every value of this type
/// satisfies the contract.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEvent {
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    /// UTC, truncated to milliseconds.
    #[serde(serialize_with = "timestamp::serialize_millis")]
    pub occurred_at: DateTime<Utc>,
    pub organization_id: String,
    pub actor: EventActor,
    pub resource: EventResource,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affected_user: Option<AffectedUser>,
    /// Empty when the producer sent none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<Change>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<EventContext>,
    /// The producer's object, byte for byte.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<RawJson>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActorType {
    #[default]
    User,
    ApiKey,
    System,
    Scim,
}

impl ActorType {
    pub fn as_str(self) -> &'static str {
        match self {
            ActorType::User => "user",
            ActorType::ApiKey => "api_key",
            ActorType::System => "system",
            ActorType::Scim => "scim",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EventActor {
    pub id: String,
    #[serde(rename = "type", default, deserialize_with = "null_as_default")]
    pub actor_type: ActorType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EventResource {
    #[serde(rename = "type")]
    pub resource_type: String,
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AffectedUser {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Change {
    pub field: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_value: Option<RawJson>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_value: Option<RawJson>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EventContext {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
}

/// A JSON value kept as the producer wrote it (numbers beyond f64, key order, spacing).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RawJson(Box<RawValue>);

impl RawJson {
    pub fn get(&self) -> &str {
        self.0.get()
    }

    /// Wraps JSON text, checking that it parses.
    pub fn from_string(json: String) -> Result<Self, serde_json::Error> {
        RawValue::from_string(json).map(RawJson)
    }
}

impl PartialEq for RawJson {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

/// The message as serde sees it, before the checks serde cannot express.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WireEvent {
    id: String,
    #[serde(rename = "type")]
    event_type: String,
    occurred_at: String,
    organization_id: String,
    actor: EventActor,
    resource: EventResource,
    #[serde(default)]
    affected_user: Option<AffectedUser>,
    #[serde(default)]
    changes: Option<Vec<Change>>,
    #[serde(default)]
    context: Option<EventContext>,
    #[serde(default)]
    metadata: Option<RawJson>,
}

fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

impl AuditEvent {
    /// Parses and validates one Kafka message payload.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, EventError> {
        if bytes.len() > MAX_EVENT_BYTES {
            return Err(EventError::new(
                RejectReason::TooLarge,
                format!(
                    "message is {} bytes, the limit is {MAX_EVENT_BYTES}",
                    bytes.len()
                ),
            ));
        }
        // Fast path without path tracking; only a failure is parsed again to name the field.
        let wire: WireEvent = match serde_json::from_slice(bytes) {
            Ok(wire) => wire,
            Err(_) => return Err(Self::explain(bytes)),
        };
        Self::from_wire(wire)
    }

    /// The error of a message that failed to parse, with the path of the offending field.
    fn explain(bytes: &[u8]) -> EventError {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let parsed: Result<WireEvent, _> = serde_path_to_error::deserialize(&mut de);
        let err = match parsed.map(|_| de.end()) {
            Ok(Ok(())) => return EventError::new(RejectReason::NotJson, "unparseable message"),
            Ok(Err(trailing)) => {
                return EventError::new(RejectReason::NotJson, trailing.to_string())
            }
            Err(err) => err,
        };
        let path = err.path().to_string();
        let inner = err.into_inner();
        let reason = match inner.classify() {
            serde_json::error::Category::Data => RejectReason::SchemaViolation,
            _ => RejectReason::NotJson,
        };
        let detail = if reason == RejectReason::SchemaViolation && path != "." {
            format!("{path}: {inner}")
        } else {
            inner.to_string()
        };
        EventError::new(reason, detail)
    }

    fn from_wire(wire: WireEvent) -> Result<Self, EventError> {
        let occurred_at = timestamp::parse_occurred_at(&wire.occurred_at).map_err(|problem| {
            EventError::new(RejectReason::BadTimestamp, format!("occurredAt: {problem}"))
        })?;
        let event = AuditEvent {
            id: wire.id,
            event_type: wire.event_type,
            occurred_at,
            organization_id: wire.organization_id,
            actor: wire.actor,
            resource: wire.resource,
            affected_user: wire.affected_user,
            changes: wire.changes.unwrap_or_default(),
            context: wire.context,
            metadata: wire.metadata,
        };
        validate::check(&event)?;
        Ok(event)
    }

    /// Epoch milliseconds of `occurred_at`, the stored form.
    pub fn occurred_at_millis(&self) -> i64 {
        self.occurred_at.timestamp_millis()
    }

    /// The wire JSON of this event (what a producer publishes).
    pub fn to_json(&self) -> String {
        // Serialising plain strings, enums and already-valid raw JSON cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}
