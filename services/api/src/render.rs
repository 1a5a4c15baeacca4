//! How an event leaves the service: the JSON item of the published contract, and the CSV row
//! (RFC 4180 quoting by the `csv` crate, spreadsheet formulas neutralised).

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::query::format_timestamp;
use crate::store::EventRecord;

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EventItem {
    pub id: String,
    pub timestamp: String,
    pub event_type: String,
    pub actor: Actor,
    pub affected_user: Option<AffectedUser>,
    pub resource: Resource,
    pub changes: Vec<Change>,
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

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Change {
    pub field: String,
    #[serde(default)]
    pub old_value: Option<Box<RawValue>>,
    #[serde(default)]
    pub new_value: Option<Box<RawValue>>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Context {
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub request_id: Option<String>,
    pub location: Option<String>,
}

impl From<EventRecord> for EventItem {
    fn from(r: EventRecord) -> Self {
        // The ingest stored validated JSON; an unreadable value (never expected) reads as empty
        // rather than failing a whole page.
        let changes = serde_json::from_str(&r.changes).unwrap_or_default();
        let metadata = r.metadata.and_then(|m| RawValue::from_string(m).ok());
        Self {
            id: r.id,
            timestamp: format_timestamp(r.occurred_at_ms),
            event_type: r.event_type,
            actor: Actor {
                id: r.actor_id,
                actor_type: r.actor_type,
                email: r.actor_email,
                name: r.actor_name,
            },
            affected_user: r.affected_user_id.map(|id| AffectedUser {
                id,
                email: r.affected_user_email,
            }),
            resource: Resource {
                resource_type: r.resource_type,
                id: r.resource_id,
                name: r.resource_name,
            },
            changes,
            context: Context {
                ip: r.context_ip,
                user_agent: r.context_user_agent,
                request_id: r.context_request_id,
                location: r.context_location,
            },
            metadata,
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
pub fn neutralize(cell: &str) -> std::borrow::Cow<'_, str> {
    match cell.as_bytes().first() {
        Some(b'=' | b'+' | b'-' | b'@' | b'\t' | b'\r') => format!("'{cell}").into(),
        _ => cell.into(),
    }
}

/// Appends one event as a CSV record.
pub fn write_csv_row<W: std::io::Write>(
    writer: &mut csv::Writer<W>,
    r: &EventRecord,
) -> csv::Result<()> {
    fn opt(value: &Option<String>) -> std::borrow::Cow<'_, str> {
        value.as_deref().map(neutralize).unwrap_or_default()
    }
    let timestamp = format_timestamp(r.occurred_at_ms);
    // `changes` is stored compact with absent old/new values left out; the CSV shows the
    // same objects as the JSON items (explicit nulls).
    let changes: Vec<Change> = serde_json::from_str(&r.changes).unwrap_or_default();
    let changes = serde_json::to_string(&changes).unwrap_or_else(|_| "[]".to_owned());
    writer.write_record([
        neutralize(&r.id).as_ref(),
        &timestamp,
        neutralize(&r.event_type).as_ref(),
        neutralize(&r.actor_id).as_ref(),
        neutralize(&r.actor_type).as_ref(),
        opt(&r.actor_email).as_ref(),
        opt(&r.actor_name).as_ref(),
        opt(&r.affected_user_id).as_ref(),
        opt(&r.affected_user_email).as_ref(),
        neutralize(&r.resource_type).as_ref(),
        neutralize(&r.resource_id).as_ref(),
        opt(&r.resource_name).as_ref(),
        neutralize(&changes).as_ref(),
        opt(&r.context_ip).as_ref(),
        opt(&r.context_user_agent).as_ref(),
        opt(&r.context_request_id).as_ref(),
        opt(&r.context_location).as_ref(),
        opt(&r.metadata).as_ref(),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record() -> EventRecord {
        EventRecord {
            id: "e1".into(),
            occurred_at_ms: 1_735_689_600_123,
            event_type: "team_member.updated".into(),
            actor_id: "u1".into(),
            actor_type: "user".into(),
            actor_email: Some("=HYPERLINK(\"http://x\")".into()),
            actor_name: Some("Ada, \"the\" Admin\nline two".into()),
            affected_user_id: None,
            affected_user_email: None,
            resource_type: "team".into(),
            resource_id: "t1".into(),
            resource_name: Some("-1+2".into()),
            changes: r#"[{"field":"teamRole","newValue":"maintainer"}]"#.into(),
            context_ip: None,
            context_user_agent: None,
            context_request_id: None,
            context_location: None,
            metadata: Some(r#"{"a":1}"#.into()),
        }
    }

    #[test]
    fn json_items_have_the_contract_shape() {
        let item = serde_json::to_value(EventItem::from(record())).unwrap();
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
        write_csv_row(&mut writer, &record()).unwrap();
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
            rec.actor_name = Some(cell.clone());
            let mut writer = csv::Writer::from_writer(Vec::new());
            write_csv_row(&mut writer, &rec).unwrap();
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
