//! Every replica's view of the key table, refreshed in the background (revocations take
//! effect within the refresh interval), constant-time authentication against it, and the
//! last-used times it collects and writes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use audit_store::clickhouse;
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::secret::{hash, key_id_of};
use super::table::{load, UsageRow, USAGE_TABLE};
use super::{now_ms, ApiKeyRow, Caller, Role};

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
    use crate::keys::secret::PREFIX;
    use crate::keys::{generate, CreatedKey};
    use secrecy::ExposeSecret;
    use sha2::{Digest, Sha256};

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
