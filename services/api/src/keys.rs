//! API keys: generation (shown once), storage as a SHA-256 hash in ClickHouse, the in-memory
//! snapshot every replica refreshes (revocations take effect within the refresh interval),
//! constant-time verification, and last-used bookkeeping.
//!
//! A key reads `alk_<key id>_<secret>`: the key id (64 random bits, hex) is public and finds the
//! row; the whole key is hashed and compared. Keys carry 256 random bits, so a fast hash is
//! enough: there is nothing to brute-force.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use audit_store::clickhouse::{self, Row};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

pub const KEYS_TABLE: &str = "api_keys";
pub const USAGE_TABLE: &str = "api_key_usage";
const PREFIX: &str = "alk_";
/// The columns of [`ApiKeyRow`], in order.
const KEY_COLUMNS: &str =
    "key_id, organization_id, role, name, secret_sha256, created_at_ms, revoked_at_ms, version";

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

    fn parse(text: &str) -> Option<Self> {
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

#[derive(Debug, Clone, Row, Serialize, Deserialize)]
struct UsageRow {
    key_id: String,
    last_used_at_ms: i64,
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

fn hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The key id of a well-formed key, or None.
fn key_id_of(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    (id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) && secret.len() == 43)
        .then_some(id)
}

/// Makes a new key for `organization_id` (not stored yet).
pub fn generate(organization_id: &str, role: Role, name: &str) -> CreatedKey {
    let mut rng = rand::rng();
    let mut id = [0u8; 8];
    let mut secret = [0u8; 32];
    rng.fill_bytes(&mut id);
    rng.fill_bytes(&mut secret);
    let key_id = hex::encode(id);
    let key = format!("{PREFIX}{key_id}_{}", URL_SAFE_NO_PAD.encode(secret));
    let now = now_ms();
    CreatedKey {
        row: ApiKeyRow {
            key_id,
            organization_id: organization_id.to_owned(),
            role: role.as_str().to_owned(),
            name: name.to_owned(),
            secret_sha256: hash(&key),
            created_at_ms: now,
            revoked_at_ms: None,
            version: now as u64,
        },
        secret: secrecy::SecretString::from(key),
    }
}

/// Stores a new key.
pub async fn create(
    client: &clickhouse::Client,
    key: &CreatedKey,
) -> Result<(), clickhouse::error::Error> {
    let mut insert = client.insert::<ApiKeyRow>(KEYS_TABLE).await?;
    insert.write(&key.row).await?;
    insert.end().await
}

/// The current version of every key (of one organization, if given).
pub async fn load(
    client: &clickhouse::Client,
    organization_id: Option<&str>,
) -> Result<Vec<ApiKeyRow>, clickhouse::error::Error> {
    let columns = KEY_COLUMNS;
    // FINAL keeps the highest version per key even before the background merge.
    match organization_id {
        Some(org) => {
            client
                .query(&format!("SELECT {columns} FROM {KEYS_TABLE} FINAL WHERE organization_id = ? ORDER BY created_at_ms"))
                .bind(org)
                .fetch_all()
                .await
        }
        None => {
            client
                .query(&format!("SELECT {columns} FROM {KEYS_TABLE} FINAL"))
                .fetch_all()
                .await
        }
    }
}

/// Last use of each key, epoch milliseconds.
pub async fn last_used(
    client: &clickhouse::Client,
) -> Result<HashMap<String, i64>, clickhouse::error::Error> {
    let rows: Vec<UsageRow> = client
        .query(&format!(
            "SELECT key_id, max(last_used_at_ms) AS last_used_at_ms FROM {USAGE_TABLE} GROUP BY key_id"
        ))
        .fetch_all()
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.key_id, r.last_used_at_ms))
        .collect())
}

/// Why `revoke` did nothing.
#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    #[error("no API key with id {0}")]
    Unknown(String),
    #[error("API key {0} was already revoked")]
    AlreadyRevoked(String),
    #[error(transparent)]
    Store(#[from] clickhouse::error::Error),
}

/// Marks a key revoked by writing a newer version of its row.
pub async fn revoke(client: &clickhouse::Client, key_id: &str) -> Result<ApiKeyRow, RevokeError> {
    let columns = KEY_COLUMNS;
    let current: Option<ApiKeyRow> = client
        .query(&format!(
            "SELECT {columns} FROM {KEYS_TABLE} FINAL WHERE key_id = ?"
        ))
        .bind(key_id)
        .fetch_optional()
        .await?;
    let mut row = current.ok_or_else(|| RevokeError::Unknown(key_id.to_owned()))?;
    if row.revoked_at_ms.is_some() {
        return Err(RevokeError::AlreadyRevoked(key_id.to_owned()));
    }
    let now = now_ms();
    row.revoked_at_ms = Some(now);
    row.version = (now as u64).max(row.version + 1);
    let mut insert = client.insert::<ApiKeyRow>(KEYS_TABLE).await?;
    insert.write(&row).await?;
    insert.end().await?;
    Ok(row)
}

/// Key id -> current row; swapped whole on each refresh.
type KeySnapshot = Arc<HashMap<String, ApiKeyRow>>;

/// Why a presented key was not accepted (the HTTP layer answers 401, 403 or 503).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("the key snapshot has not been loaded yet")]
    NotReady,
    #[error("unknown, malformed or revoked key")]
    InvalidKey,
    #[error("the key's role is not one this build knows")]
    UnknownRole,
}

/// Every replica's view of the key table, refreshed in the background.
#[derive(Clone)]
pub struct KeyStore {
    snapshot: Arc<RwLock<Option<KeySnapshot>>>,
    used: Arc<Mutex<HashMap<String, i64>>>,
}

impl Default for KeyStore {
    fn default() -> Self {
        Self::new()
    }
}

impl KeyStore {
    pub fn new() -> Self {
        Self {
            snapshot: Arc::new(RwLock::new(None)),
            used: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// True once the key table was read at least once.
    pub fn loaded(&self) -> bool {
        self.snapshot.read().map(|s| s.is_some()).unwrap_or(false)
    }

    pub fn replace(&self, rows: Vec<ApiKeyRow>) {
        let map = rows.into_iter().map(|r| (r.key_id.clone(), r)).collect();
        if let Ok(mut snapshot) = self.snapshot.write() {
            *snapshot = Some(Arc::new(map));
        }
    }

    /// Re-reads the key table now.
    pub async fn refresh(
        &self,
        client: &clickhouse::Client,
    ) -> Result<(), clickhouse::error::Error> {
        let rows = load(client, None).await?;
        debug!(keys = rows.len(), "api keys refreshed");
        self.replace(rows);
        Ok(())
    }

    /// Refreshes the snapshot every `every` and writes last-used times every `flush_every`,
    /// until `stop`; the last usage flush happens on the way out.
    pub async fn maintain(
        self,
        client: clickhouse::Client,
        every: Duration,
        flush_every: Duration,
        stop: CancellationToken,
    ) {
        let mut refresh = tokio::time::interval(every);
        let mut flush = tokio::time::interval(flush_every);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = refresh.tick() => {
                    if let Err(err) = self.refresh(&client).await {
                        warn!(error = %err, "api key refresh failed; keeping the previous snapshot");
                    }
                }
                _ = flush.tick() => self.flush_usage(&client).await,
            }
        }
        self.flush_usage(&client).await;
    }

    async fn flush_usage(&self, client: &clickhouse::Client) {
        let pending: Vec<UsageRow> = match self.used.lock() {
            Ok(mut used) => used
                .drain()
                .map(|(key_id, last_used_at_ms)| UsageRow {
                    key_id,
                    last_used_at_ms,
                })
                .collect(),
            Err(_) => return,
        };
        if pending.is_empty() {
            return;
        }
        let result = async {
            let mut insert = client.insert::<UsageRow>(USAGE_TABLE).await?;
            for row in &pending {
                insert.write(row).await?;
            }
            insert.end().await
        }
        .await;
        if let Err(err) = result {
            warn!(error = %err, keys = pending.len(), "could not record api key usage; will retry");
            if let Ok(mut used) = self.used.lock() {
                for row in pending {
                    let entry = used.entry(row.key_id).or_insert(row.last_used_at_ms);
                    *entry = (*entry).max(row.last_used_at_ms);
                }
            }
        }
    }

    /// Checks a presented key. Unknown, malformed and revoked keys are one answer
    /// ([`AuthError::InvalidKey`]), so a caller learns nothing about which keys exist.
    pub fn authenticate(&self, presented: &str) -> Result<Caller, AuthError> {
        let snapshot = self
            .snapshot
            .read()
            .ok()
            .and_then(|s| s.clone())
            .ok_or(AuthError::NotReady)?;
        let key_id = key_id_of(presented).ok_or(AuthError::InvalidKey)?;
        let row = snapshot.get(key_id).ok_or(AuthError::InvalidKey)?;
        let presented_hash = hash(presented);
        let matches: bool = presented_hash
            .as_bytes()
            .ct_eq(row.secret_sha256.as_bytes())
            .into();
        if !matches || row.revoked_at_ms.is_some() {
            return Err(AuthError::InvalidKey);
        }
        let role = Role::parse(&row.role).ok_or(AuthError::UnknownRole)?;
        if let Ok(mut used) = self.used.lock() {
            used.insert(row.key_id.clone(), now_ms());
        }
        Ok(Caller {
            key_id: row.key_id.clone(),
            key_name: row.name.clone(),
            organization_id: row.organization_id.clone(),
            role,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn store_with(keys: &[&CreatedKey]) -> KeyStore {
        let store = KeyStore::new();
        store.replace(keys.iter().map(|k| k.row.clone()).collect());
        store
    }

    #[test]
    fn a_generated_key_authenticates_and_is_stored_only_as_a_hash() {
        let key = generate("org_a", Role::Admin, "ci");
        let text = key.secret.expose_secret().to_owned();
        assert!(text.starts_with("alk_"));
        // What is stored is the SHA-256 of the whole key, computed here independently, and
        // nothing else of the row holds the secret.
        let expected: String = Sha256::digest(text.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(key.row.secret_sha256, expected);
        let (_, secret) = text[PREFIX.len()..].split_once('_').unwrap();
        for column in [
            &key.row.key_id,
            &key.row.name,
            &key.row.role,
            &key.row.secret_sha256,
        ] {
            assert!(!column.contains(secret), "{column}");
        }
        let caller = store_with(&[&key]).authenticate(&text).unwrap();
        assert_eq!(caller.organization_id, "org_a");
        assert_eq!(caller.role, Role::Admin);
    }

    #[test]
    fn keys_differ_and_carry_256_random_bits() {
        let a = generate("o", Role::Admin, "a");
        let b = generate("o", Role::Admin, "b");
        assert_ne!(a.secret.expose_secret(), b.secret.expose_secret());
        // The secret itself may contain '_' (base64url): split after the key id only.
        let (_, secret) = a.secret.expose_secret()[PREFIX.len()..]
            .split_once('_')
            .unwrap();
        assert_eq!(URL_SAFE_NO_PAD.decode(secret).unwrap().len(), 32);
    }

    #[test]
    fn wrong_revoked_and_malformed_keys_are_all_401() {
        let key = generate("org_a", Role::Admin, "ci");
        let mut revoked = generate("org_a", Role::Admin, "old");
        revoked.row.revoked_at_ms = Some(1);
        let store = store_with(&[&key, &revoked]);
        let text = key.secret.expose_secret();
        let mut tampered = text.to_owned();
        tampered.pop();
        tampered.push(if text.ends_with('A') { 'B' } else { 'A' });
        for bad in [
            tampered.as_str(),
            "alk_nope",
            "",
            revoked.secret.expose_secret(),
        ] {
            assert!(
                matches!(store.authenticate(bad), Err(AuthError::InvalidKey)),
                "{bad}"
            );
        }
    }

    #[test]
    fn nothing_authenticates_before_the_first_load() {
        let key = generate("org_a", Role::Admin, "ci");
        assert!(matches!(
            KeyStore::new().authenticate(key.secret.expose_secret()),
            Err(AuthError::NotReady)
        ));
    }

    #[test]
    fn use_is_recorded_for_the_next_flush() {
        let key = generate("org_a", Role::Member, "ci");
        let store = store_with(&[&key]);
        store.authenticate(key.secret.expose_secret()).unwrap();
        assert!(store.used.lock().unwrap().contains_key(&key.row.key_id));
    }
}
