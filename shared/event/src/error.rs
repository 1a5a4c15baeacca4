//! Why a message is not an acceptable audit event.

use std::fmt;

/// The class of a rejection; stable strings used in DLQ headers and metrics labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Larger than [`crate::MAX_EVENT_BYTES`].
    TooLarge,
    /// Not parseable as JSON (or not UTF-8).
    NotJson,
    /// JSON, but not of the shape the schema describes.
    SchemaViolation,
    /// `occurredAt` is missing an offset, out of range or not a real instant.
    BadTimestamp,
    /// `organizationId` is empty or not of the allowed form.
    BadOrganization,
    /// Valid by the contract, but the storage refused the row (never retried).
    StorageRejected,
}

impl RejectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::TooLarge => "too_large",
            RejectReason::NotJson => "not_json",
            RejectReason::SchemaViolation => "schema_violation",
            RejectReason::BadTimestamp => "bad_timestamp",
            RejectReason::BadOrganization => "bad_organization",
            RejectReason::StorageRejected => "storage_rejected",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejected message: the reason class and a message naming what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct EventError {
    pub reason: RejectReason,
    pub detail: String,
}

impl EventError {
    pub fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }

    pub(crate) fn field(field: &str, problem: impl fmt::Display) -> Self {
        Self::new(RejectReason::SchemaViolation, format!("{field}: {problem}"))
    }
}
