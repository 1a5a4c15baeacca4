//! How an event leaves the service: the JSON item of the published contract, and the CSV row
//! (RFC 4180 quoting by the `csv` crate, spreadsheet formulas neutralised).

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::store::EventRecord;
use crate::time::format_timestamp;

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EventItem {
    pub id: String,
    pub timestamp: String,
    pub event_type: String,
    pub actor: Actor,
    pub affected_user: Option<AffectedUser>,
    pub resource: Resource,
    /// `[{field, oldValue, newValue}]`, see [`normalize_changes`].
    pub changes: Box<RawValue>,
    pub context: Context,
    pub metadata: Option<Box<RawValue>>,
}

#[derive(Debug, Serialize)]
pub struct Actor {
    pub id: String,
    #[serde(rename = "type")]
    pub actor_type: String,
    pub email: Option<String>,
    pub name: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct AffectedUser {
    pub id: String,
    pub email: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Resource {
    #[serde(rename = "type")]
    pub resource_type: String,
    pub id: String,
    pub name: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Context {
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub request_id: Option<String>,
    pub location: Option<String>,
}

/// One entry of `changes`, borrowed from the stored JSON text.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Change<'a> {
    #[serde(borrow)]
    field: Cow<'a, str>,
    #[serde(borrow, default)]
    old_value: Option<&'a RawValue>,
    #[serde(borrow, default)]
    new_value: Option<&'a RawValue>,
}

/// Writes `changes` as the contract shows it into `out` (cleared first): the ingest stores them
/// compact with absent old/new values left out; JSON items and CSV cells show explicit nulls.
/// The ingest stored validated JSON; an unreadable value (never expected) reads as `[]` rather
/// than failing a whole page or export.
pub fn normalize_changes(stored: &str, out: &mut Vec<u8>) {
    out.clear();
    let parsed: Result<Vec<Change<'_>>, _> = serde_json::from_str(stored);
    if parsed
        .and_then(|changes| serde_json::to_writer(&mut *out, &changes))
        .is_err()
    {
        out.clear();
        out.extend_from_slice(b"[]");
    }
}

impl From<&EventRecord<'_>> for EventItem {
    fn from(r: &EventRecord<'_>) -> Self {
        let owned = |value: Option<&str>| value.map(str::to_owned);
        let mut changes = Vec::new();
        normalize_changes(r.changes, &mut changes);
        let changes = String::from_utf8(changes).unwrap_or_else(|_| "[]".to_owned());
        Self {
            id: r.id.to_owned(),
            timestamp: format_timestamp(r.occurred_at_ms),
            event_type: r.event_type.to_owned(),
            actor: Actor {
                id: r.actor_id.to_owned(),
                actor_type: r.actor_type.to_owned(),
                email: owned(r.actor_email),
                name: owned(r.actor_name),
            },
            affected_user: r.affected_user_id.map(|id| AffectedUser {
                id: id.to_owned(),
                email: owned(r.affected_user_email),
            }),
            resource: Resource {
                resource_type: r.resource_type.to_owned(),
                id: r.resource_id.to_owned(),
                name: owned(r.resource_name),
            },
            changes: RawValue::from_string(changes)
                .unwrap_or_else(|_| RawValue::from_string("[]".to_owned()).expect("valid JSON")),
            context: Context {
                ip: owned(r.context_ip),
                user_agent: owned(r.context_user_agent),
                request_id: owned(r.context_request_id),
                location: owned(r.context_location),
            },
            metadata: r
                .metadata
                .and_then(|m| RawValue::from_string(m.to_owned()).ok()),
        }
    }
}

/// The CSV columns, in order.
pub const CSV_HEADER: [&str; 18] = [
    "id",
    "timestamp",
    "eventType",
    "actorId",
    "actorType",
    "actorEmail",
    "actorName",
    "affectedUserId",
    "affectedUserEmail",
    "resourceType",
    "resourceId",
    "resourceName",
    "changes",
    "contextIp",
    "contextUserAgent",
    "contextRequestId",
    "contextLocation",
    "metadata",
];

/// A cell a spreadsheet would evaluate (`=`, `+`, `-`, `@`, tab, CR first) gets a leading `'`,
/// the OWASP-recommended neutralisation; every other cell is written as stored.
pub fn neutralize(cell: &str) -> Cow<'_, str> {
    match cell.as_bytes().first() {
        Some(b'=' | b'+' | b'-' | b'@' | b'\t' | b'\r') => format!("'{cell}").into(),
        _ => cell.into(),
    }
}

/// Appends one event as a CSV record. `scratch` is reused across rows for the `changes` text,
/// which needs no neutralising: it is a JSON array, so it starts with `[`.
pub fn write_csv_row<W: std::io::Write>(
    writer: &mut csv::Writer<W>,
    r: &EventRecord<'_>,
    scratch: &mut Vec<u8>,
) -> csv::Result<()> {
    fn opt(value: Option<&str>) -> Cow<'_, str> {
        value.map(neutralize).unwrap_or_default()
    }
    let timestamp = format_timestamp(r.occurred_at_ms);
    normalize_changes(r.changes, scratch);
    writer.write_record([
        neutralize(r.id).as_bytes(),
        timestamp.as_bytes(),
        neutralize(r.event_type).as_bytes(),
        neutralize(r.actor_id).as_bytes(),
        neutralize(r.actor_type).as_bytes(),
        opt(r.actor_email).as_bytes(),
        opt(r.actor_name).as_bytes(),
        opt(r.affected_user_id).as_bytes(),
        opt(r.affected_user_email).as_bytes(),
        neutralize(r.resource_type).as_bytes(),
        neutralize(r.resource_id).as_bytes(),
        opt(r.resource_name).as_bytes(),
        scratch.as_slice(),
        opt(r.context_ip).as_bytes(),
        opt(r.context_user_agent).as_bytes(),
        opt(r.context_request_id).as_bytes(),
        opt(r.context_location).as_bytes(),
        opt(r.metadata).as_bytes(),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record() -> EventRecord<'static> {
        EventRecord {
            id: "e1",
            occurred_at_ms: 1_735_689_600_123,
            event_type: "team_member.updated",
            actor_id: "u1",
            actor_type: "user",
            actor_email: Some("=HYPERLINK(\"http://x\")"),
            actor_name: Some("Ada, \"the\" Admin\nline two"),
            affected_user_id: None,
            affected_user_email: None,
            resource_type: "team",
            resource_id: "t1",
            resource_name: Some("-1+2"),
            changes: r#"[{"field":"teamRole","newValue":"maintainer"}]"#,
            context_ip: None,
            context_user_agent: None,
            context_request_id: None,
            context_location: None,
            metadata: Some(r#"{"a":1}"#),
        }
    }

    #[test]
    fn json_items_have_the_contract_shape() {
        let item = serde_json::to_value(EventItem::from(&record())).unwrap();
        assert_eq!(item["timestamp"], "2025-01-01T00:00:00.123Z");
        assert_eq!(item["affectedUser"], serde_json::Value::Null);
        assert_eq!(item["changes"][0]["oldValue"], serde_json::Value::Null);
        assert_eq!(item["changes"][0]["newValue"], "maintainer");
        assert_eq!(item["metadata"]["a"], 1);
        assert_eq!(item["context"]["ip"], serde_json::Value::Null);
    }

    #[test]
    fn csv_rows_quote_and_neutralise() {
        let mut writer = csv::Writer::from_writer(Vec::new());
        write_csv_row(&mut writer, &record(), &mut Vec::new()).unwrap();
        let text = String::from_utf8(writer.into_inner().unwrap()).unwrap();
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .from_reader(text.as_bytes());
        let row = reader.records().next().unwrap().unwrap();
        assert_eq!(&row[5], "'=HYPERLINK(\"http://x\")");
        assert_eq!(&row[6], "Ada, \"the\" Admin\nline two");
        assert_eq!(&row[11], "'-1+2");
        assert_eq!(
            &row[12],
            r#"[{"field":"teamRole","oldValue":null,"newValue":"maintainer"}]"#
        );
    }

    proptest! {
        /// No cell that reaches a spreadsheet starts with a formula trigger, and a CSV reader
        /// gets back exactly what was written (after the neutralising quote).
        #[test]
        fn any_cell_round_trips_without_formulas(cell in "\\PC{0,40}|[=+@\\-\t\r].{0,20}") {
            let mut rec = record();
            rec.actor_name = Some(&cell);
            let mut writer = csv::Writer::from_writer(Vec::new());
            write_csv_row(&mut writer, &rec, &mut Vec::new()).unwrap();
            let bytes = writer.into_inner().unwrap();
            let mut reader = csv::ReaderBuilder::new().has_headers(false).from_reader(&bytes[..]);
            let row = reader.records().next().unwrap().unwrap();
            let got = &row[6];
            prop_assert!(!matches!(got.as_bytes().first(), Some(b'=' | b'+' | b'-' | b'@' | b'\t' | b'\r')));
            let expected = neutralize(&cell);
            prop_assert_eq!(got, expected.as_ref());
        }
    }
}
