//! API keys: generation (shown once), storage as a SHA-256 hash in ClickHouse, the in-memory
//! snapshot every replica refreshes (revocations take effect within the refresh interval),
//! constant-time verification, and last-used bookkeeping.
//!
//! A key reads `alk_<key id>_<secret>`: the key id (64 random bits, hex) is public and finds the
//! row; the whole key is hashed and compared. Keys carry 256 random bits, so a fast hash is
//! enough: there is nothing to brute-force.
//!
//! [`secret`]: the key's form, generation and hash; [`table`]: the key tables in ClickHouse
//! (the CLI's writes, the loads); [`snapshot`]: every replica's view of them, and
//! authentication against it.

mod secret;
mod snapshot;
mod table;

use audit_store::clickhouse::{self, Row};
use serde::{Deserialize, Serialize};

pub use secret::generate;
pub use snapshot::{AuthError, KeyStore};
pub use table::{create, last_used, load, revoke, RevokeError, KEYS_TABLE, USAGE_TABLE};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// May read and export the organization's audit log.
    Admin,
    /// Authenticates, but may not read audit logs (403).
    Member,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Member => "member",
        }
    }

    pub(super) fn parse(text: &str) -> Option<Self> {
        match text {
            "admin" => Some(Role::Admin),
            "member" => Some(Role::Member),
            _ => None,
        }
    }
}

/// One version of a key's row in `api_keys` (see `schemas/clickhouse/0003_create_api_keys.sql`).
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct ApiKeyRow {
    pub key_id: String,
    pub organization_id: String,
    pub role: String,
    pub name: String,
    pub secret_sha256: String,
    pub created_at_ms: i64,
    pub revoked_at_ms: Option<i64>,
    pub version: u64,
}

/// Who is calling: the organization every query is scoped to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub key_id: String,
    pub key_name: String,
    pub organization_id: String,
    pub role: Role,
}

/// A freshly created key: `secret` is the only copy of the key in clear.
pub struct CreatedKey {
    pub row: ApiKeyRow,
    pub secret: secrecy::SecretString,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
