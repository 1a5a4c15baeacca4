//! The Kafka topics of the contract, named once: the upstream identity services publish to the
//! first three, the ingest writes rejected messages to the dead-letter topic and every stored
//! event to the stored-events topic (which log streams deliver from), and the API publishes its
//! own reads and stream changes (both are audited). The shell scripts take the
//! same names from `deploy/local/common.sh`, the chart from its `values.yaml`.

pub const USERS: &str = "identity.users.v1";
pub const TEAMS: &str = "identity.teams.v1";
pub const AUTH: &str = "identity.auth.v1";
/// What the ingest consumes by default.
pub const IDENTITY: [&str; 3] = [USERS, TEAMS, AUTH];
pub const DEAD_LETTERS: &str = "audit.dlq.v1";
pub const READS: &str = "audit.reads.v1";
/// Every event the ingest stored, keyed by organization (see `audit_store::stored`): what log
/// streams deliver.
pub const STORED: &str = "audit.stored.v1";
