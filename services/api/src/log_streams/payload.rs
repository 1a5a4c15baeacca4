//! One event as a stream delivers it: the API's JSON item (the default), or OCSF 1.8 (README
//! "Log streams" documents the mapping field by field), made from the row the ingest stored.

use audit_store::AuditEventRow;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use super::spec::PayloadFormat;
use crate::render::EventItem;
use crate::store::EventRecord;

/// The OCSF schema version of the payloads.
pub const OCSF_VERSION: &str = "1.8.0";

/// The record the read path renders, borrowing from a stored row.
pub fn record_of(row: &AuditEventRow) -> EventRecord<'_> {
    EventRecord {
        id: &row.id,
        occurred_at_ms: row.occurred_at_ms,
        event_type: &row.event_type,
        actor_id: &row.actor_id,
        actor_type: &row.actor_type,
        actor_email: row.actor_email.as_deref(),
        actor_name: row.actor_name.as_deref(),
        affected_user_id: row.affected_user_id.as_deref(),
        affected_user_email: row.affected_user_email.as_deref(),
        resource_type: &row.resource_type,
        resource_id: &row.resource_id,
        resource_name: row.resource_name.as_deref(),
        changes: &row.changes,
        context_ip: row.context_ip.as_deref(),
        context_user_agent: row.context_user_agent.as_deref(),
        context_request_id: row.context_request_id.as_deref(),
        context_location: row.context_location.as_deref(),
        metadata: row.metadata.as_deref(),
    }
}

/// The event in `format`, as JSON text (serialized once; request bodies embed it verbatim).
pub fn render(row: &AuditEventRow, format: PayloadFormat) -> Box<RawValue> {
    match format {
        PayloadFormat::Json => serde_json::value::to_raw_value(&EventItem::from(&record_of(row))),
        PayloadFormat::Ocsf => serde_json::value::to_raw_value(&ocsf(row)),
    }
    .expect("an event serializes")
}

/// OCSF class, activity and their names for an event type.
struct Classified {
    class_uid: u32,
    class_name: &'static str,
    activity_id: u32,
    activity_name: &'static str,
}

fn classify(event_type: &str) -> Classified {
    let c = |class_uid, class_name, activity_id, activity_name| Classified {
        class_uid,
        class_name,
        activity_id,
        activity_name,
    };
    const ACCOUNT: &str = "Account Change";
    const AUTH: &str = "Authentication";
    const GROUP: &str = "Group Management";
    const ACCESS: &str = "User Access Management";
    match event_type {
        "user.created" | "user.invited" => c(3001, ACCOUNT, 1, "Create"),
        "user.reactivated" => c(3001, ACCOUNT, 2, "Enable"),
        "user.password_changed" => c(3001, ACCOUNT, 3, "Password Change"),
        "user.deactivated" => c(3001, ACCOUNT, 5, "Disable"),
        "user.deleted" => c(3001, ACCOUNT, 6, "Delete"),
        "user.mfa_enabled" => c(3001, ACCOUNT, 10, "MFA Factor Enable"),
        "user.mfa_disabled" => c(3001, ACCOUNT, 11, "MFA Factor Disable"),
        "user.logged_in" | "user.login_failed" => c(3002, AUTH, 1, "Logon"),
        "user.logged_out" => c(3002, AUTH, 2, "Logoff"),
        "role.assigned" => c(3005, ACCESS, 1, "Assign Privileges"),
        "role.revoked" => c(3005, ACCESS, 2, "Revoke Privileges"),
        "team_member.added" => c(3006, GROUP, 3, "Add User"),
        "team_member.removed" => c(3006, GROUP, 4, "Remove User"),
        "team.deleted" => c(3006, GROUP, 5, "Delete"),
        "team.created" => c(3006, GROUP, 6, "Create"),
        other if other.starts_with("team.") || other.starts_with("team_member.") => {
            c(3006, GROUP, 99, "Other")
        }
        other if other.starts_with("user.") => c(3001, ACCOUNT, 99, "Other"),
        // api_key.*, organization.*, audit_log.* and unknown types: OCSF's Base Event.
        _ => c(0, "Base Event", 99, "Other"),
    }
}

fn put(map: &mut Map<String, Value>, key: &str, value: Option<&str>) {
    if let Some(value) = value {
        map.insert(key.to_owned(), Value::String(value.to_owned()));
    }
}

/// OCSF `user` object of an id, email and name.
fn user(uid: &str, email: Option<&str>, name: Option<&str>, kind: Option<&str>) -> Value {
    let mut user = Map::new();
    user.insert("uid".into(), json!(uid));
    put(&mut user, "email_addr", email);
    put(&mut user, "name", name);
    if let Some(kind) = kind {
        let type_id = match kind {
            "user" => 1,
            "system" => 3,
            _ => 99,
        };
        user.insert("type_id".into(), json!(type_id));
        user.insert("type".into(), json!(kind));
    }
    Value::Object(user)
}

/// The event as an OCSF 1.8 object of its class (see [`classify`]).
pub fn ocsf(row: &AuditEventRow) -> Value {
    let class = classify(&row.event_type);
    let failed = row.event_type == "user.login_failed";
    let actor_user = user(
        &row.actor_id,
        row.actor_email.as_deref(),
        row.actor_name.as_deref(),
        Some(&row.actor_type),
    );
    let mut event = Map::new();
    let category = if class.class_uid == 0 { 0 } else { 3 };
    event.insert("category_uid".into(), json!(category));
    event.insert(
        "category_name".into(),
        json!(if category == 3 {
            "Identity & Access Management"
        } else {
            "Uncategorized"
        }),
    );
    event.insert("class_uid".into(), json!(class.class_uid));
    event.insert("class_name".into(), json!(class.class_name));
    event.insert("activity_id".into(), json!(class.activity_id));
    event.insert("activity_name".into(), json!(class.activity_name));
    event.insert(
        "type_uid".into(),
        json!(u64::from(class.class_uid) * 100 + u64::from(class.activity_id)),
    );
    event.insert(
        "type_name".into(),
        json!(format!("{}: {}", class.class_name, class.activity_name)),
    );
    event.insert("time".into(), json!(row.occurred_at_ms));
    event.insert("severity_id".into(), json!(1));
    event.insert("severity".into(), json!("Informational"));
    event.insert("status_id".into(), json!(if failed { 2 } else { 1 }));
    event.insert(
        "status".into(),
        json!(if failed { "Failure" } else { "Success" }),
    );
    event.insert("message".into(), json!(row.event_type));
    event.insert(
        "metadata".into(),
        json!({
            "version": OCSF_VERSION,
            "uid": row.id,
            "tenant_uid": row.organization_id,
            "event_code": row.event_type,
            "logged_time": row.ingested_at_ms,
            "product": {"name": "audit-logs", "vendor_name": "audit-logs"},
        }),
    );
    event.insert("actor".into(), json!({ "user": actor_user.clone() }));
    // The user the event is about: the affected user, else the actor (a sign-in is about the
    // one signing in), else a user resource.
    let subject = match (&row.affected_user_id, row.resource_type.as_str()) {
        (Some(id), _) => user(id, row.affected_user_email.as_deref(), None, None),
        (None, "user") if class.class_uid == 3001 => {
            user(&row.resource_id, None, row.resource_name.as_deref(), None)
        }
        _ => actor_user,
    };
    event.insert("user".into(), subject);
    match class.class_uid {
        3006 => {
            let mut group = Map::new();
            group.insert("uid".into(), json!(row.resource_id));
            put(&mut group, "name", row.resource_name.as_deref());
            event.insert("group".into(), Value::Object(group));
        }
        3005 => {
            let privilege = row.resource_name.as_deref().unwrap_or(&row.resource_id);
            event.insert("privileges".into(), json!([privilege]));
        }
        _ => {}
    }
    if let Some(ip) = &row.context_ip {
        event.insert("src_endpoint".into(), json!({ "ip": ip }));
    }
    if let Some(agent) = &row.context_user_agent {
        event.insert("http_request".into(), json!({ "user_agent": agent }));
    }
    let mut unmapped = Map::new();
    unmapped.insert(
        "resource".into(),
        json!({"type": row.resource_type, "id": row.resource_id, "name": row.resource_name}),
    );
    if let Ok(changes) = serde_json::from_str::<Value>(&row.changes) {
        if changes.as_array().is_some_and(|c| !c.is_empty()) {
            unmapped.insert("changes".into(), changes);
        }
    }
    if let Some(metadata) = row
        .metadata
        .as_deref()
        .and_then(|m| serde_json::from_str::<Value>(m).ok())
    {
        unmapped.insert("metadata".into(), metadata);
    }
    put(
        &mut unmapped,
        "request_id",
        row.context_request_id.as_deref(),
    );
    put(&mut unmapped, "location", row.context_location.as_deref());
    event.insert("unmapped".into(), Value::Object(unmapped));
    Value::Object(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(event_type: &str) -> AuditEventRow {
        AuditEventRow {
            organization_id: "org_acme".into(),
            occurred_at_ms: 1_700_000_000_123,
            id: "evt_1".into(),
            event_type: event_type.into(),
            actor_id: "usr_admin".into(),
            actor_type: "user".into(),
            actor_email: Some("admin@acme.test".into()),
            resource_type: "team".into(),
            resource_id: "team_1".into(),
            resource_name: Some("Security".into()),
            affected_user_id: Some("usr_2".into()),
            affected_user_email: Some("two@acme.test".into()),
            changes: r#"[{"field":"role","newValue":"admin"}]"#.into(),
            context_ip: Some("203.0.113.9".into()),
            ingested_at_ms: 1_700_000_000_500,
            ..AuditEventRow::default()
        }
    }

    #[test]
    fn json_payloads_are_the_api_item() {
        let item: Value =
            serde_json::from_str(render(&row("team_member.added"), PayloadFormat::Json).get())
                .unwrap();
        assert_eq!(item["id"], "evt_1");
        assert_eq!(item["eventType"], "team_member.added");
        assert_eq!(item["timestamp"], "2023-11-14T22:13:20.123Z");
        assert_eq!(item["affectedUser"]["email"], "two@acme.test");
        assert_eq!(item["changes"][0]["oldValue"], Value::Null);
    }

    #[test]
    fn ocsf_classes_follow_the_event_type() {
        for (event_type, class_uid, activity_id) in [
            ("user.created", 3001, 1),
            ("user.password_changed", 3001, 3),
            ("user.mfa_disabled", 3001, 11),
            ("user.logged_in", 3002, 1),
            ("user.login_failed", 3002, 1),
            ("user.logged_out", 3002, 2),
            ("role.assigned", 3005, 1),
            ("role.revoked", 3005, 2),
            ("team_member.added", 3006, 3),
            ("team.created", 3006, 6),
            ("team.updated", 3006, 99),
            ("organization.updated", 0, 99),
        ] {
            let event = ocsf(&row(event_type));
            assert_eq!(event["class_uid"], class_uid, "{event_type}");
            assert_eq!(event["activity_id"], activity_id, "{event_type}");
            assert_eq!(
                event["type_uid"],
                class_uid * 100 + activity_id,
                "{event_type}"
            );
            assert_eq!(event["metadata"]["uid"], "evt_1");
            assert_eq!(event["metadata"]["tenant_uid"], "org_acme");
            assert_eq!(event["metadata"]["version"], OCSF_VERSION);
            assert_eq!(event["time"], 1_700_000_000_123i64);
        }
        let failed = ocsf(&row("user.login_failed"));
        assert_eq!(failed["status_id"], 2);
        let added = ocsf(&row("team_member.added"));
        assert_eq!(added["group"]["name"], "Security");
        assert_eq!(added["user"]["uid"], "usr_2");
        assert_eq!(added["actor"]["user"]["email_addr"], "admin@acme.test");
        assert_eq!(added["src_endpoint"]["ip"], "203.0.113.9");
        assert_eq!(added["unmapped"]["changes"][0]["field"], "role");
    }
}
