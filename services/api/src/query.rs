//! The query string of the audit-log endpoints, parsed and validated into an [`AuditLogQuery`].
//! Unknown and repeated parameters are refused: a misspelt filter must not silently widen an
//! audit export to every event.
//!
//! Longer than most modules: the rules of every parameter of the published contract, side by
//! side, with their tests.

use std::collections::BTreeSet;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::DateTime;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const DEFAULT_LIMIT: u32 = 50;
pub const MAX_LIMIT: u32 = 1000;
/// Longest accepted filter value, in characters; ids and emails are far shorter.
const MAX_VALUE_LEN: usize = 512;

/// A query parameter that is unknown, repeated, missing its form or out of range: the 400
/// that names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidParameter {
    pub parameter: &'static str,
    pub message: String,
}

fn invalid(parameter: &'static str, message: impl Into<String>) -> InvalidParameter {
    InvalidParameter {
        parameter,
        message: message.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SortOrder {
    Asc,
    Desc,
}

impl SortOrder {
    pub fn sql(self) -> &'static str {
        match self {
            SortOrder::Asc => "ASC",
            SortOrder::Desc => "DESC",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageFormat {
    Json,
    Csv,
}

impl PageFormat {
    /// The `format` value, also the metrics and read-event label.
    pub fn label(self) -> &'static str {
        match self {
            PageFormat::Json => "json",
            PageFormat::Csv => "csv",
        }
    }
}

/// The format of a streamed body: a CSV page, or an export's `format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    Csv,
    Ndjson,
}

impl BodyFormat {
    /// The metrics label, which is also the file extension.
    pub fn label(self) -> &'static str {
        match self {
            BodyFormat::Csv => "csv",
            BodyFormat::Ndjson => "ndjson",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            BodyFormat::Csv => "text/csv; charset=utf-8",
            BodyFormat::Ndjson => "application/x-ndjson",
        }
    }
}

/// The filters shared by the page and export endpoints; every value is bound, never spliced.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Filters {
    /// Inclusive lower bound, epoch milliseconds.
    pub from_ms: Option<i64>,
    /// Exclusive upper bound, epoch milliseconds.
    pub to_ms: Option<i64>,
    pub event_type: Option<String>,
    pub actor_id: Option<String>,
    /// Lower-cased: the match is case-insensitive.
    pub actor_email: Option<String>,
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    /// Times the organization no longer holds, each `[start, end)`, between legal holds older
    /// than its retention (set by [`crate::retention`], never by the caller; not part of a
    /// cursor's fingerprint).
    #[serde(skip)]
    pub gaps: Vec<(i64, i64)>,
}

/// Where a cursor page starts: strictly after this (time, id) in the query's sort order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    #[serde(rename = "s")]
    pub sort: SortOrder,
    #[serde(rename = "t")]
    pub occurred_at_ms: i64,
    #[serde(rename = "i")]
    pub id: String,
    /// Fingerprint of the filters the cursor was made for.
    #[serde(rename = "f")]
    pub filters: String,
}

impl Cursor {
    pub fn encode(&self) -> String {
        // Serialising a struct of strings and integers cannot fail.
        let json = serde_json::to_vec(self).unwrap_or_default();
        URL_SAFE_NO_PAD.encode(json)
    }

    fn decode(text: &str) -> Option<Self> {
        let bytes = URL_SAFE_NO_PAD.decode(text).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

/// `GET /api/v1/organization/audit-logs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditLogQuery {
    pub filters: Filters,
    pub sort: SortOrder,
    pub limit: u32,
    pub offset: u64,
    pub cursor: Option<Cursor>,
    pub format: PageFormat,
}

/// `GET /api/v1/organization/audit-logs/export`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportQuery {
    pub filters: Filters,
    pub sort: SortOrder,
    pub format: BodyFormat,
}

impl Filters {
    /// True when a filter on an id or email is present: the match is probably a small set.
    pub fn is_selective(&self) -> bool {
        self.actor_id.is_some()
            || self.actor_email.is_some()
            || self.resource_id.is_some()
            || self.spans_at_most(crate::time::DAY_MS)
    }

    /// True when `from` and `to` are both given and at most `ms` apart.
    pub fn spans_at_most(&self, ms: i64) -> bool {
        matches!((self.from_ms, self.to_ms), (Some(from), Some(to)) if to - from <= ms)
    }

    /// A short fingerprint binding a cursor to the filters and sort it was made for.
    pub fn fingerprint(&self, sort: SortOrder) -> String {
        let canonical = serde_json::to_vec(&(self, sort)).unwrap_or_default();
        hex::encode(&Sha256::digest(canonical)[..8])
    }
}

const FILTER_PARAMETERS: [&str; 7] = [
    "from",
    "to",
    "eventType",
    "actorId",
    "actorEmail",
    "resourceType",
    "resourceId",
];

/// The raw pairs of a query string, each name at most once and known to the endpoint.
struct Params {
    pairs: Vec<(&'static str, String)>,
}

impl Params {
    fn parse(raw: Option<&str>, known: &[&'static str]) -> Result<Self, InvalidParameter> {
        let mut pairs: Vec<(&'static str, String)> = Vec::new();
        let mut seen = BTreeSet::new();
        for (name, value) in form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
            let Some(&known_name) = known.iter().find(|k| **k == name) else {
                return Err(invalid(
                    "query",
                    format!(
                        "unknown query parameter {:?}; accepted: {}",
                        truncate(&name),
                        known.join(", ")
                    ),
                ));
            };
            if !seen.insert(known_name) {
                return Err(invalid(
                    known_name,
                    format!("{known_name} is given more than once"),
                ));
            }
            pairs.push((known_name, value.into_owned()));
        }
        Ok(Self { pairs })
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    fn text(&self, name: &'static str) -> Result<Option<String>, InvalidParameter> {
        let Some(value) = self.get(name) else {
            return Ok(None);
        };
        if value.is_empty() {
            return Err(invalid(name, format!("{name} must not be empty")));
        }
        if value.chars().count() > MAX_VALUE_LEN {
            return Err(invalid(
                name,
                format!("{name} is longer than {MAX_VALUE_LEN} characters"),
            ));
        }
        Ok(Some(value.to_owned()))
    }

    /// An email address, lower-cased (the match is case-insensitive). Only its shape is
    /// checked: something before and after one `@`, no spaces.
    fn email(&self, name: &'static str) -> Result<Option<String>, InvalidParameter> {
        let Some(value) = self.text(name)? else {
            return Ok(None);
        };
        let well_formed = match value.split_once('@') {
            Some((local, domain)) => {
                !local.is_empty()
                    && !domain.is_empty()
                    && !domain.contains('@')
                    && !value.chars().any(|c| c.is_whitespace() || c.is_control())
            }
            None => false,
        };
        if !well_formed {
            return Err(invalid(
                name,
                format!(
                    "{name} must be an email address, got {:?}",
                    truncate(&value)
                ),
            ));
        }
        Ok(Some(value.to_lowercase()))
    }

    fn time(&self, name: &'static str) -> Result<Option<i64>, InvalidParameter> {
        let Some(value) = self.get(name) else {
            return Ok(None);
        };
        let parsed = DateTime::parse_from_rfc3339(value).map_err(|_| {
            invalid(
                name,
                format!(
                    "{name} must be an RFC 3339 date-time with a UTC offset, e.g. 2025-01-01T00:00:00Z; got {:?}",
                    truncate(value)
                ),
            )
        })?;
        // Millisecond resolution: round sub-millisecond bounds up, which keeps `from`
        // inclusive and `to` exclusive for events stored in whole milliseconds.
        let micros = parsed.timestamp_micros();
        Ok(Some(
            micros.div_euclid(1000) + i64::from(micros.rem_euclid(1000) > 0),
        ))
    }

    fn filters(&self) -> Result<Filters, InvalidParameter> {
        let filters = Filters {
            from_ms: self.time("from")?,
            to_ms: self.time("to")?,
            event_type: self.text("eventType")?,
            actor_id: self.text("actorId")?,
            actor_email: self.email("actorEmail")?,
            resource_type: self.text("resourceType")?,
            resource_id: self.text("resourceId")?,
            gaps: Vec::new(),
        };
        if let (Some(from), Some(to)) = (filters.from_ms, filters.to_ms) {
            if from >= to {
                return Err(invalid("from", "from must be before to"));
            }
        }
        Ok(filters)
    }

    fn sort(&self) -> Result<SortOrder, InvalidParameter> {
        match self.get("sort") {
            None | Some("desc") => Ok(SortOrder::Desc),
            Some("asc") => Ok(SortOrder::Asc),
            Some(other) => Err(invalid(
                "sort",
                format!("sort must be asc or desc, got {:?}", truncate(other)),
            )),
        }
    }
}

impl AuditLogQuery {
    pub fn parse(raw: Option<&str>) -> Result<Self, InvalidParameter> {
        let mut known = FILTER_PARAMETERS.to_vec();
        known.extend(["sort", "limit", "offset", "cursor", "format"]);
        let params = Params::parse(raw, &known)?;
        let filters = params.filters()?;
        let sort = params.sort()?;
        let limit = match params.get("limit") {
            None => DEFAULT_LIMIT,
            Some(text) => match text.parse::<u32>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
                _ => {
                    return Err(invalid(
                        "limit",
                        format!(
                            "limit must be an integer from 1 to {MAX_LIMIT}, got {:?}",
                            truncate(text)
                        ),
                    ))
                }
            },
        };
        let offset = match params.get("offset") {
            None => 0,
            Some(text) => text
                .parse::<u64>()
                .ok()
                .filter(|n| *n <= i64::MAX as u64)
                .ok_or_else(|| {
                    invalid(
                        "offset",
                        format!(
                            "offset must be a non-negative integer, got {:?}",
                            truncate(text)
                        ),
                    )
                })?,
        };
        let format = match params.get("format") {
            None | Some("json") => PageFormat::Json,
            Some("csv") => PageFormat::Csv,
            Some(other) => {
                return Err(invalid(
                    "format",
                    format!("format must be json or csv, got {:?}", truncate(other)),
                ))
            }
        };
        let cursor = match params.get("cursor") {
            None => None,
            // offset=0 is the default: a client that sends every parameter's default (as
            // generated clients do) may page by cursor.
            Some(_) if offset > 0 => return Err(invalid(
                "cursor",
                "cursor and an offset above 0 cannot be combined; a cursor already says where the page starts",
            )),
            Some(text) => {
                let cursor = Cursor::decode(text).ok_or_else(|| {
                    invalid("cursor", "cursor is not one this service returned")
                })?;
                if cursor.filters != filters.fingerprint(sort) || cursor.sort != sort {
                    return Err(invalid(
                        "cursor",
                        "cursor was made for other filters or another sort; send the same filters as the first page",
                    ));
                }
                Some(cursor)
            }
        };
        Ok(Self {
            filters,
            sort,
            limit,
            offset,
            cursor,
            format,
        })
    }
}

impl ExportQuery {
    pub fn parse(raw: Option<&str>) -> Result<Self, InvalidParameter> {
        let mut known = FILTER_PARAMETERS.to_vec();
        known.extend(["sort", "format"]);
        let params = Params::parse(raw, &known)?;
        let format = match params.get("format") {
            None | Some("csv") => BodyFormat::Csv,
            Some("ndjson") => BodyFormat::Ndjson,
            Some(other) => {
                return Err(invalid(
                    "format",
                    format!("format must be csv or ndjson, got {:?}", truncate(other)),
                ))
            }
        };
        Ok(Self {
            filters: params.filters()?,
            sort: params.sort()?,
            format,
        })
    }
}

/// Echoing a hostile value back in full helps nobody.
fn truncate(value: &str) -> String {
    value.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parameter_of(raw: &str) -> String {
        match AuditLogQuery::parse(Some(raw)) {
            Err(InvalidParameter { parameter, .. }) => parameter.to_owned(),
            other => panic!("{raw}: expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn defaults_match_the_published_contract() {
        let query = AuditLogQuery::parse(None).unwrap();
        assert_eq!(query.limit, 50);
        assert_eq!(query.offset, 0);
        assert_eq!(query.sort, SortOrder::Desc);
        assert_eq!(query.format, PageFormat::Json);
        assert_eq!(query.filters, Filters::default());
    }

    #[test]
    fn every_bad_value_names_its_parameter() {
        for (raw, parameter) in [
            ("limit=0", "limit"),
            ("limit=1001", "limit"),
            ("limit=ten", "limit"),
            ("offset=-1", "offset"),
            ("offset=1.5", "offset"),
            ("sort=up", "sort"),
            ("format=xml", "format"),
            ("from=2025-01-01T00:00:00", "from"),
            ("to=yesterday", "to"),
            ("from=2025-02-01T00:00:00Z&to=2025-01-01T00:00:00Z", "from"),
            ("from=2025-01-01T00:00:00Z&to=2025-01-01T00:00:00Z", "from"),
            ("limit=5&limit=6", "limit"),
            ("eventType=a&eventType=b", "eventType"),
            ("actorId=", "actorId"),
            ("actorEmail=null", "actorEmail"),
            ("actorEmail=a%40b%40c", "actorEmail"),
            ("cursor=bm9wZQ", "cursor"),
            ("evenType=user.created", "query"),
        ] {
            assert_eq!(parameter_of(raw), parameter, "{raw}");
        }
    }

    #[test]
    fn limits_at_the_edges_are_accepted() {
        assert_eq!(AuditLogQuery::parse(Some("limit=1")).unwrap().limit, 1);
        assert_eq!(
            AuditLogQuery::parse(Some("limit=1000")).unwrap().limit,
            1000
        );
    }

    #[test]
    fn times_with_offsets_are_normalised_to_utc_milliseconds() {
        let query = AuditLogQuery::parse(Some(
            "from=2025-01-01T01:00:00%2B01:00&to=2025-01-01T00:00:00.0005Z",
        ))
        .unwrap();
        assert_eq!(query.filters.from_ms, Some(1_735_689_600_000));
        assert_eq!(query.filters.to_ms, Some(1_735_689_600_001));
    }

    #[test]
    fn actor_email_is_matched_case_insensitively() {
        let query = AuditLogQuery::parse(Some("actorEmail=Ada.Admin%40ACME.example")).unwrap();
        assert_eq!(
            query.filters.actor_email.as_deref(),
            Some("ada.admin@acme.example")
        );
    }

    #[test]
    fn a_cursor_only_fits_the_filters_it_was_made_for() {
        let filters = AuditLogQuery::parse(Some("eventType=user.created"))
            .unwrap()
            .filters;
        let cursor = Cursor {
            sort: SortOrder::Desc,
            occurred_at_ms: 5,
            id: "e".to_owned(),
            filters: filters.fingerprint(SortOrder::Desc),
        }
        .encode();
        let same = AuditLogQuery::parse(Some(&format!("eventType=user.created&cursor={cursor}")));
        assert_eq!(same.unwrap().cursor.unwrap().occurred_at_ms, 5);
        assert_eq!(
            parameter_of(&format!("eventType=user.deleted&cursor={cursor}")),
            "cursor"
        );
        assert_eq!(
            parameter_of(&format!("sort=asc&eventType=user.created&cursor={cursor}")),
            "cursor"
        );
        assert_eq!(
            parameter_of(&format!("eventType=user.created&offset=1&cursor={cursor}")),
            "cursor"
        );
        // The default offset, as generated clients send it, goes with a cursor.
        let with_default = AuditLogQuery::parse(Some(&format!(
            "eventType=user.created&offset=0&cursor={cursor}"
        )));
        assert_eq!(with_default.unwrap().cursor.unwrap().occurred_at_ms, 5);
    }

    #[test]
    fn export_takes_no_pagination() {
        assert!(matches!(
            ExportQuery::parse(Some("limit=5")),
            Err(InvalidParameter {
                parameter: "query",
                ..
            })
        ));
        assert_eq!(
            ExportQuery::parse(Some("format=ndjson")).unwrap().format,
            BodyFormat::Ndjson
        );
    }

    proptest! {
        /// Whatever arrives in the query string, parsing answers Ok or names what was wrong, never
        /// panics.
        #[test]
        fn arbitrary_query_strings_never_panic(raw in ".{0,200}") {
            if let Err(err) = AuditLogQuery::parse(Some(&raw)) {
                prop_assert!(!err.message.is_empty() && !err.parameter.is_empty());
            }
        }

        #[test]
        fn timestamps_round_trip(ms in 0i64..4_102_444_800_000) {
            let text = crate::time::format_timestamp(ms);
            let raw = format!("from={}", text);
            let query = AuditLogQuery::parse(Some(&raw)).unwrap();
            prop_assert_eq!(query.filters.from_ms, Some(ms));
        }
    }
}
