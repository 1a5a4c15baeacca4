//! Times as the API reads and writes them: epoch milliseconds inside, RFC 3339 with
//! milliseconds in every response (the event contract's own form), a compact form in file
//! names.

use chrono::{DateTime, Utc};

pub const HOUR_MS: i64 = 3_600_000;
pub const DAY_MS: i64 = 24 * HOUR_MS;

/// `2025-01-01T00:00:00.000Z`: what every response says a timestamp is.
pub fn format_timestamp(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| audit_event::format_rfc3339_millis(&t))
        .unwrap_or_default()
}

/// `20250101T000000Z`, for file names.
pub fn compact_timestamp(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.format("%Y%m%dT%H%M%SZ").to_string())
        .unwrap_or_default()
}
