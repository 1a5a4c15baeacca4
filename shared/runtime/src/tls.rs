//! TLS of the project's HTTP clients (ClickHouse, the OTLP collector): which CA roots to trust
//! and which client certificate to present, built once into a rustls configuration.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};
use serde::Deserialize;

/// Server verification and client identity of an HTTPS client. Every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM file of the CA(s) to trust instead of the system's roots (a private or self-signed CA).
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM) for mutual TLS; needs `key_file`.
    pub cert_file: Option<PathBuf>,
    /// Private key (PEM, PKCS#8, PKCS#1 or SEC1) of `cert_file`.
    pub key_file: Option<PathBuf>,
}

/// What is wrong with the TLS settings, named by configuration key and file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{key}: cannot read {path}: {source}")]
    Read {
        key: String,
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{key}: {path} holds no {what}")]
    Empty {
        key: String,
        path: PathBuf,
        what: &'static str,
    },
    #[error("{key}: a client certificate needs both cert_file and key_file")]
    HalfIdentity { key: String },
    #[error("{key}: no usable CA certificate in {path}: {source}")]
    BadCa {
        key: String,
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{key}: the system has no CA certificates (install ca-certificates or set ca_file)")]
    NoSystemRoots { key: String },
    #[error("{key}: the client certificate and key do not work together: {source}")]
    BadIdentity {
        key: String,
        #[source]
        source: rustls::Error,
    },
}

impl TlsSettings {
    /// The rustls configuration these settings describe; `key` is the settings' configuration
    /// key (e.g. `clickhouse.tls`), for error messages.
    pub fn client_config(&self, key: &str) -> Result<Arc<ClientConfig>, TlsError> {
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(TlsError::HalfIdentity {
                key: key.to_owned(),
            });
        }
        let roots = match &self.ca_file {
            Some(path) => {
                let field = format!("{key}.ca_file");
                let mut roots = RootCertStore::empty();
                for cert in read_certificates(&field, path)? {
                    roots.add(cert).map_err(|source| TlsError::BadCa {
                        key: field.clone(),
                        path: path.clone(),
                        source,
                    })?;
                }
                roots
            }
            None => system_roots(key)?,
        };
        let builder = ClientConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(roots);
        let config = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(private)) => {
                let chain = read_certificates(&format!("{key}.cert_file"), cert)?;
                let field = format!("{key}.key_file");
                let private =
                    PrivateKeyDer::from_pem_file(private).map_err(|source| TlsError::Read {
                        key: field,
                        path: private.clone(),
                        source,
                    })?;
                builder
                    .with_client_auth_cert(chain, private)
                    .map_err(|source| TlsError::BadIdentity {
                        key: key.to_owned(),
                        source,
                    })?
            }
            // Neither (half an identity was refused above).
            _ => builder.with_no_client_auth(),
        };
        Ok(Arc::new(config))
    }
}

/// ring: built with a C compiler alone, like the rest of the tree. rustls 0.23.48 deprecates it
/// because it lacks post-quantum key exchange; aws-lc-rs has it but needs cmake and a long build.
/// The connections it secures (ClickHouse, the OTLP collector) stay inside the operator's network.
#[allow(deprecated)]
fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certificates(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read_error = |source| TlsError::Read {
        key: key.to_owned(),
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_error)?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            key: key.to_owned(),
            path: path.to_owned(),
            what: "PEM certificate",
        });
    }
    Ok(certs)
}

fn system_roots(key: &str) -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    // Unparsable entries in the system bundle are skipped, as every TLS client does.
    let _ = roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        return Err(TlsError::NoSystemRoots {
            key: key.to_owned(),
        });
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_ca_file_is_named_with_its_key() {
        let settings = TlsSettings {
            ca_file: Some(PathBuf::from("/nonexistent/ca.pem")),
            ..TlsSettings::default()
        };
        let err = settings
            .client_config("clickhouse.tls")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("clickhouse.tls.ca_file") && err.contains("/nonexistent/ca.pem"),
            "{err}"
        );
    }

    #[test]
    fn a_file_without_certificates_is_refused() {
        let dir = std::env::temp_dir().join(format!("audit-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("empty.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let settings = TlsSettings {
            ca_file: Some(path),
            ..TlsSettings::default()
        };
        let err = settings
            .client_config("clickhouse.tls")
            .unwrap_err()
            .to_string();
        assert!(err.contains("holds no PEM certificate"), "{err}");
    }

    #[test]
    fn half_a_client_identity_is_refused() {
        let settings = TlsSettings {
            cert_file: Some(PathBuf::from("/etc/hostname")),
            ..TlsSettings::default()
        };
        let err = settings
            .client_config("clickhouse.tls")
            .unwrap_err()
            .to_string();
        assert!(err.contains("both cert_file and key_file"), "{err}");
    }
}
