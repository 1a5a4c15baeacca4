//! Spans of time in epoch milliseconds, the unit of every time the API reads and writes.

pub const HOUR_MS: i64 = 3_600_000;
pub const DAY_MS: i64 = 24 * HOUR_MS;
