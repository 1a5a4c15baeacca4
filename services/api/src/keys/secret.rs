//! A key's form: `alk_<key id>_<secret>`, the key id 64 random bits in hex, the secret 256
//! random bits in base64url; stored only as the SHA-256 of the whole key.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};

use super::{now_ms, ApiKeyRow, CreatedKey, Role};

pub(super) const PREFIX: &str = "alk_";

pub(super) fn hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// The key id of a well-formed key, or None.
pub(super) fn key_id_of(key: &str) -> Option<&str> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

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
}
