//! The audit event contract (`schemas/events/audit-event.schema.json`) as Rust types: parsing,
//! validation with a reason code per failure, and serialisation back to the wire format.

mod error;
mod model;
mod timestamp;
pub mod topics;
mod validate;

pub use error::{EventError, RejectReason};
pub use model::{
    ActorType, AffectedUser, AuditEvent, Change, EventActor, EventContext, EventResource,
    MAX_EVENT_BYTES,
};
pub use timestamp::{format_rfc3339_millis, parse_occurred_at};
pub use validate::{is_valid_event_type, is_valid_organization_id};
