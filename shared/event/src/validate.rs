//! The checks of the schema that serde's types cannot express: lengths, patterns, object-ness.
//! Each one mirrors a keyword in `audit-event.schema.json`; `tests/schema_agreement.rs` keeps the
//! two in step over every example file.

use std::sync::LazyLock;

use regex::Regex;

use crate::error::{EventError, RejectReason};
use crate::model::AuditEvent;

static EVENT_TYPE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[a-z][a-z_]*(\.[a-z][a-z_]*)+$").expect("static regex"));
static ORGANIZATION_ID: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$").expect("static regex"));
static RESOURCE_TYPE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[a-z][a-z_]*$").expect("static regex"));
static EMAIL: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[^@\s]+@[^@\s]+$").expect("static regex"));

const MAX_ID_CHARS: usize = 128;
const MAX_ENTITY_ID_CHARS: usize = 256;
const MAX_EMAIL_CHARS: usize = 320;
const MAX_NAME_CHARS: usize = 256;
const MAX_CHANGES: usize = 1000;

pub fn is_valid_event_type(value: &str) -> bool {
    (value.len() <= MAX_ID_CHARS || value.chars().count() <= MAX_ID_CHARS)
        && EVENT_TYPE.is_match(value)
}

pub fn is_valid_organization_id(value: &str) -> bool {
    // The pattern admits ASCII only, so bytes are characters.
    (1..=MAX_ID_CHARS).contains(&value.len()) && ORGANIZATION_ID.is_match(value)
}

pub(crate) fn check(event: &AuditEvent) -> Result<(), EventError> {
    length("id", &event.id, 1, MAX_ID_CHARS)?;
    if !is_valid_event_type(&event.event_type) {
        return Err(EventError::field(
            "type",
            format!(
                "{:?} is not a dotted lowercase event type like team_member.added",
                event.event_type
            ),
        ));
    }
    if !is_valid_organization_id(&event.organization_id) {
        return Err(EventError::new(
            RejectReason::BadOrganization,
            format!(
                "organizationId: {:?} must be 1-128 characters of letters, digits and . _ : - \
                 starting with a letter or digit",
                event.organization_id
            ),
        ));
    }

    length("actor.id", &event.actor.id, 1, MAX_ENTITY_ID_CHARS)?;
    optional_email("actor.email", event.actor.email.as_deref())?;
    optional_length("actor.name", event.actor.name.as_deref(), MAX_NAME_CHARS)?;

    length("resource.type", &event.resource.resource_type, 1, 64)?;
    if !RESOURCE_TYPE.is_match(&event.resource.resource_type) {
        return Err(EventError::field(
            "resource.type",
            format!(
                "{:?} must be lowercase letters and underscores",
                event.resource.resource_type
            ),
        ));
    }
    length("resource.id", &event.resource.id, 1, MAX_ENTITY_ID_CHARS)?;
    optional_length(
        "resource.name",
        event.resource.name.as_deref(),
        MAX_NAME_CHARS,
    )?;

    if let Some(user) = &event.affected_user {
        length("affectedUser.id", &user.id, 1, MAX_ENTITY_ID_CHARS)?;
        optional_email("affectedUser.email", user.email.as_deref())?;
    }

    if event.changes.len() > MAX_CHANGES {
        return Err(EventError::field(
            "changes",
            format!("{} items, at most {MAX_CHANGES}", event.changes.len()),
        ));
    }
    for (index, change) in event.changes.iter().enumerate() {
        length(&format!("changes[{index}].field"), &change.field, 1, 256)?;
    }

    if let Some(context) = &event.context {
        optional_length("context.ip", context.ip.as_deref(), 64)?;
        optional_length("context.userAgent", context.user_agent.as_deref(), 1024)?;
        optional_length("context.requestId", context.request_id.as_deref(), 256)?;
        optional_length("context.location", context.location.as_deref(), 256)?;
    }

    if let Some(metadata) = &event.metadata {
        if !metadata.get().trim_start().starts_with('{') {
            return Err(EventError::field("metadata", "must be a JSON object"));
        }
    }
    Ok(())
}

fn length(field: &str, value: &str, min: usize, max: usize) -> Result<(), EventError> {
    // A string is never longer in characters than in bytes: count only when it could matter.
    if value.len() <= max && (min == 0 || !value.is_empty()) {
        return Ok(());
    }
    let chars = value.chars().count();
    if chars < min {
        return Err(EventError::field(field, "must not be empty"));
    }
    if chars > max {
        return Err(EventError::field(
            field,
            format!("is {chars} characters, at most {max}"),
        ));
    }
    Ok(())
}

fn optional_length(field: &str, value: Option<&str>, max: usize) -> Result<(), EventError> {
    match value {
        Some(value) => length(field, value, 0, max),
        None => Ok(()),
    }
}

fn optional_email(field: &str, value: Option<&str>) -> Result<(), EventError> {
    let Some(value) = value else { return Ok(()) };
    length(field, value, 0, MAX_EMAIL_CHARS)?;
    if !EMAIL.is_match(value) {
        return Err(EventError::field(
            field,
            format!("{value:?} is not an email address"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_types() {
        assert!(is_valid_event_type("team_member.added"));
        assert!(is_valid_event_type("billing.invoice.paid"));
        assert!(!is_valid_event_type("login"));
        assert!(!is_valid_event_type("Team.added"));
        assert!(!is_valid_event_type("team..added"));
        assert!(!is_valid_event_type("team.added."));
    }

    #[test]
    fn organization_ids() {
        assert!(is_valid_organization_id("org_acme"));
        assert!(is_valid_organization_id("7f3a-9c:eu.1"));
        assert!(!is_valid_organization_id(""));
        assert!(!is_valid_organization_id("_org"));
        assert!(!is_valid_organization_id("acme corp"));
        assert!(!is_valid_organization_id(&"a".repeat(129)));
    }
}
