//! Secrets of log streams at rest: AES-256-GCM under the operator's stream key
//! (`streams.secret_key`), with the stream id as associated data so that a ciphertext copied to
//! another stream does not decrypt. Stored as base64 of nonce (12 bytes) then ciphertext.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};

#[derive(Debug, thiserror::Error)]
pub enum SecretBoxError {
    #[error(
        "streams.secret_key must be the base64 of 32 random bytes (e.g. `openssl rand -base64 32`)"
    )]
    BadKey,
    #[error("a stream's stored secrets cannot be decrypted with this streams.secret_key")]
    Undecryptable,
}

#[derive(Clone)]
pub struct SecretBox {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox(..)")
    }
}

impl SecretBox {
    pub fn from_key(key: &SecretString) -> Result<Self, SecretBoxError> {
        let bytes = STANDARD
            .decode(key.expose_secret().trim())
            .map_err(|_| SecretBoxError::BadKey)?;
        let cipher = Aes256Gcm::new_from_slice(&bytes).map_err(|_| SecretBoxError::BadKey)?;
        Ok(Self { cipher })
    }

    pub fn seal(&self, stream_id: &str, plain: &[u8]) -> String {
        let mut nonce = [0u8; 12];
        rand::rng().fill_bytes(&mut nonce);
        let sealed = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plain,
                    aad: stream_id.as_bytes(),
                },
            )
            .expect("AES-GCM encryption of a small message");
        let mut out = nonce.to_vec();
        out.extend(sealed);
        STANDARD.encode(out)
    }

    pub fn open(&self, stream_id: &str, sealed: &str) -> Result<Vec<u8>, SecretBoxError> {
        let bytes = STANDARD
            .decode(sealed)
            .map_err(|_| SecretBoxError::Undecryptable)?;
        if bytes.len() < 12 {
            return Err(SecretBoxError::Undecryptable);
        }
        let (nonce, body) = bytes.split_at(12);
        self.cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: body,
                    aad: stream_id.as_bytes(),
                },
            )
            .map_err(|_| SecretBoxError::Undecryptable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SecretBox {
        SecretBox::from_key(&SecretString::from(STANDARD.encode([7u8; 32]))).unwrap()
    }

    #[test]
    fn sealed_secrets_open_only_for_their_stream_and_key() {
        let boxed = key().seal("ls_1", b"hec-token");
        assert!(!boxed.contains("hec-token"));
        assert_eq!(key().open("ls_1", &boxed).unwrap(), b"hec-token");
        assert!(key().open("ls_2", &boxed).is_err());
        let other = SecretBox::from_key(&SecretString::from(STANDARD.encode([8u8; 32]))).unwrap();
        assert!(other.open("ls_1", &boxed).is_err());
        // A fresh nonce each time.
        assert_ne!(key().seal("ls_1", b"x"), key().seal("ls_1", b"x"));
    }

    #[test]
    fn keys_of_the_wrong_size_are_refused() {
        for bad in ["", "c2hvcnQ=", "not base64 at all"] {
            assert!(
                SecretBox::from_key(&SecretString::from(bad)).is_err(),
                "{bad}"
            );
        }
    }
}
