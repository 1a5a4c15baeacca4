//! `occurredAt`: RFC 3339 with an explicit offset in, UTC with milliseconds out.

use std::sync::LazyLock;

use chrono::{DateTime, SecondsFormat, Utc};
use regex::Regex;
use serde::Serializer;

/// Same pattern as the schema's `occurredAt.pattern`: 'T' separator, an explicit offset, and years
/// 1970-2099 (the storage partitions by month of a 32-bit DateTime).
static OCCURRED_AT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"^(19[7-9][0-9]|20[0-9]{2})-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})$",
    )
    .expect("static regex")
});

/// Parses an `occurredAt` value; digits below the millisecond are truncated.
pub fn parse_occurred_at(text: &str) -> Result<DateTime<Utc>, String> {
    if !OCCURRED_AT.is_match(text) {
        return Err(format!(
            "{text:?} is not an RFC 3339 date-time with an explicit offset \
             (e.g. 2025-01-31T23:59:59.123Z), years 1970-2099"
        ));
    }
    let parsed = DateTime::parse_from_rfc3339(text)
        .map_err(|err| format!("{text:?} is not a valid date-time: {err}"))?;
    let millis = parsed.timestamp_millis();
    DateTime::<Utc>::from_timestamp_millis(millis)
        .ok_or_else(|| format!("{text:?} is out of range"))
}

/// `2025-01-31T23:59:59.123Z`: always three fractional digits, always `Z`.
pub fn format_rfc3339_millis(at: &DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub(crate) fn serialize_millis<S: Serializer>(
    at: &DateTime<Utc>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format_rfc3339_millis(at))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_milliseconds_and_converts_to_utc() {
        let at = parse_occurred_at("2025-06-01T14:00:00.123456+02:00").unwrap();
        assert_eq!(format_rfc3339_millis(&at), "2025-06-01T12:00:00.123Z");
    }

    #[test]
    fn rejects_missing_offset_and_impossible_dates() {
        assert!(parse_occurred_at("2025-03-01T10:00:00").is_err());
        assert!(parse_occurred_at("2025-02-30T10:00:00Z").is_err());
        assert!(parse_occurred_at("2025-03-01 10:00:00Z").is_err());
        assert!(parse_occurred_at("1969-12-31T23:59:59Z").is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_millisecond_instant_round_trips(ms in 0i64..4_102_444_800_000) {
            let at = DateTime::<Utc>::from_timestamp_millis(ms).unwrap();
            let text = format_rfc3339_millis(&at);
            let back = parse_occurred_at(&text).unwrap();
            proptest::prop_assert_eq!(back.timestamp_millis(), ms);
        }
    }
}
