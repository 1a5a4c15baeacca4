//! The JSON Schema in `schemas/events/` and the Rust parser must agree on every example file:
//! accepted by one iff accepted by the other, and each invalid example rejected for its reason.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use audit_event::{AuditEvent, MAX_EVENT_BYTES};
use serde_json::Value;

fn events_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas/events")
}

fn schema_validator() -> jsonschema::Validator {
    let schema: Value = serde_json::from_str(
        &fs::read_to_string(events_dir().join("audit-event.schema.json")).unwrap(),
    )
    .unwrap();
    jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .should_validate_formats(true)
        .build(&schema)
        .expect("the event schema compiles")
}

fn example_files(kind: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(events_dir().join("examples").join(kind))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .filter(|path| path.file_name().is_some_and(|name| name != "expected.json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no {kind} examples found");
    files
}

/// What the schema (plus the byte limit it documents but cannot express) says of a message.
fn schema_accepts(validator: &jsonschema::Validator, bytes: &[u8]) -> bool {
    if bytes.len() > MAX_EVENT_BYTES {
        return false;
    }
    match serde_json::from_slice::<Value>(bytes) {
        Ok(value) => validator.is_valid(&value),
        Err(_) => false,
    }
}

#[test]
fn schema_and_parser_agree_on_every_example() {
    let validator = schema_validator();
    let mut checked = 0;
    for kind in ["valid", "invalid"] {
        for path in example_files(kind) {
            let bytes = fs::read(&path).unwrap();
            let by_schema = schema_accepts(&validator, &bytes);
            let by_parser = AuditEvent::from_slice(&bytes);
            assert_eq!(
                by_schema,
                by_parser.is_ok(),
                "{}: schema says {by_schema}, parser says {by_parser:?}",
                path.display()
            );
            assert_eq!(
                by_schema,
                kind == "valid",
                "{} is filed under {kind}",
                path.display()
            );
            checked += 1;
        }
    }
    assert!(checked > 50, "only {checked} examples checked");
}

#[test]
fn every_invalid_example_is_rejected_for_its_stated_reason() {
    let expected: Value = serde_json::from_str(
        &fs::read_to_string(events_dir().join("examples/invalid/expected.json")).unwrap(),
    )
    .unwrap();
    let expected: BTreeMap<String, String> = expected["examples"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(file, reason)| (file.clone(), reason.as_str().unwrap().to_owned()))
        .collect();
    let files = example_files("invalid");
    assert_eq!(
        files.len(),
        expected.len(),
        "expected.json must list every invalid example"
    );
    for path in files {
        let key = format!(
            "examples/invalid/{}",
            path.file_name().unwrap().to_str().unwrap()
        );
        let want = expected
            .get(&key)
            .unwrap_or_else(|| panic!("{key} missing from expected.json"));
        let err = AuditEvent::from_slice(&fs::read(&path).unwrap()).unwrap_err();
        assert_eq!(err.reason.as_str(), want, "{key}: {err}");
        assert!(!err.detail.is_empty());
    }
}

#[test]
fn errors_name_the_offending_field() {
    let cases = [
        ("missing-actor.json", "actor"),
        ("wrong-type-id.json", "id"),
        ("bad-actor-email.json", "actor.email"),
        ("timestamp-no-offset.json", "occurredAt"),
        ("wrong-type-context-ip.json", "context.ip"),
        ("unknown-top-level-field.json", "tenant"),
    ];
    for (file, field) in cases {
        let bytes = fs::read(events_dir().join("examples/invalid").join(file)).unwrap();
        let err = AuditEvent::from_slice(&bytes).unwrap_err();
        assert!(
            err.detail.contains(field),
            "{file}: {err} does not name {field}"
        );
    }
}

#[test]
fn catalog_lists_every_required_type_with_a_matching_example() {
    let required = [
        "user.created",
        "user.invited",
        "user.updated",
        "user.deleted",
        "user.deactivated",
        "user.reactivated",
        "user.logged_in",
        "user.logged_out",
        "user.login_failed",
        "user.password_changed",
        "user.mfa_enabled",
        "user.mfa_disabled",
        "team.created",
        "team.updated",
        "team.deleted",
        "team_member.added",
        "team_member.removed",
        "team_member.updated",
        "role.assigned",
        "role.revoked",
        "api_key.created",
        "api_key.revoked",
        "organization.updated",
    ];
    let catalog: Value =
        serde_json::from_str(&fs::read_to_string(events_dir().join("catalog.json")).unwrap())
            .unwrap();
    let entries = catalog["types"].as_array().unwrap();
    for wanted in required {
        let entry = entries
            .iter()
            .find(|entry| entry["type"] == wanted)
            .unwrap_or_else(|| panic!("{wanted} missing from catalog.json"));
        let example = events_dir().join(entry["example"].as_str().unwrap());
        let event = AuditEvent::from_slice(&fs::read(&example).unwrap()).unwrap();
        assert_eq!(event.event_type, wanted);
        assert_eq!(event.resource.resource_type, entry["resourceType"]);
    }
}

#[test]
fn valid_examples_round_trip_through_the_wire_format() {
    for path in example_files("valid") {
        let event = AuditEvent::from_slice(&fs::read(&path).unwrap()).unwrap();
        let again = AuditEvent::from_slice(event.to_json().as_bytes()).unwrap();
        assert_eq!(event, again, "{}", path.display());
    }
}

#[test]
fn metadata_and_change_values_are_kept_verbatim() {
    let bytes =
        fs::read(events_dir().join("examples/valid/edge.unicode-and-injection.json")).unwrap();
    let event = AuditEvent::from_slice(&bytes).unwrap();
    let metadata = event.metadata.as_ref().unwrap().get();
    // Beyond f64 and u64: a Value round trip would have changed it.
    assert!(metadata.contains("12345678901234567890"), "{metadata}");
    assert_eq!(event.actor.name.as_deref(), Some("Zoë Ωmega 🚀"));
}

#[test]
fn unknown_well_formed_types_are_accepted() {
    let bytes = fs::read(events_dir().join("examples/valid/edge.unknown-type.json")).unwrap();
    assert_eq!(
        AuditEvent::from_slice(&bytes).unwrap().event_type,
        "billing.invoice.paid"
    );
}
