//! Where ClickHouse is and how to log in; part of each service's configuration.

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::error::StoreError;

/// Connection settings. Every field has a default that matches the local stack.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClickHouseConfig {
    /// HTTP endpoint, e.g. `http://127.0.0.1:18123`.
    pub url: String,
    /// Database holding the audit tables; created by the migrations runner.
    pub database: String,
    pub user: String,
    pub password: SecretString,
    /// Compression of request and response bodies: `lz4` (saves network) or `none` (saves CPU
    /// when ClickHouse is on the same host).
    pub compression: Compression,
}

/// Body compression between the services and ClickHouse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    Lz4,
    None,
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:18123".to_owned(),
            database: "audit".to_owned(),
            user: "default".to_owned(),
            password: SecretString::from(String::new()),
            compression: Compression::Lz4,
        }
    }
}

impl ClickHouseConfig {
    /// Checks what would otherwise fail later with a less clear message.
    pub fn validate(&self) -> Result<(), StoreError> {
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(StoreError::Config(format!(
                "clickhouse.url must start with http:// or https://, got {:?}",
                self.url
            )));
        }
        if !is_identifier(&self.database) {
            return Err(StoreError::Config(format!(
                "clickhouse.database must be letters, digits and underscores, got {:?}",
                self.database
            )));
        }
        Ok(())
    }

    /// A client bound to the audit database.
    pub fn client(&self) -> clickhouse::Client {
        self.server_client().with_database(&self.database)
    }

    /// A client for statements that must run before the database exists.
    pub fn server_client(&self) -> clickhouse::Client {
        let client = clickhouse::Client::default()
            .with_url(&self.url)
            .with_user(&self.user)
            // ClickHouse 18.16 lacks RowBinaryWithNamesAndTypes, which validation needs.
            .with_validation(false)
            .with_compression(match self.compression {
                Compression::Lz4 => clickhouse::Compression::Lz4,
                Compression::None => clickhouse::Compression::None,
            });
        let password = self.password.expose_secret();
        if password.is_empty() {
            client
        } else {
            client.with_password(password)
        }
    }
}

pub(crate) fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_database_names_that_would_need_quoting() {
        let mut config = ClickHouseConfig::default();
        assert!(config.validate().is_ok());
        config.database = "audit; DROP TABLE x".to_owned();
        assert!(config.validate().is_err());
        config.database = "9audit".to_owned();
        assert!(config.validate().is_err());
    }

    #[test]
    fn rejects_urls_without_scheme() {
        let config = ClickHouseConfig {
            url: "127.0.0.1:18123".to_owned(),
            ..ClickHouseConfig::default()
        };
        assert!(config.validate().is_err());
    }

    #[test]
    fn debug_output_hides_the_password() {
        let config = ClickHouseConfig {
            password: SecretString::from("hunter2".to_owned()),
            ..ClickHouseConfig::default()
        };
        assert!(!format!("{config:?}").contains("hunter2"));
    }
}
