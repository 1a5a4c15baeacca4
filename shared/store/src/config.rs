//! Where ClickHouse is and how to log in; part of each service's configuration.

use std::sync::Arc;
use std::time::Duration;

use audit_runtime::tls::TlsSettings;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
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
    /// With an `https://` URL: the CA to trust instead of the system's roots, and an optional
    /// client certificate.
    pub tls: TlsSettings,
    /// A sharded deployment: the cluster's name in the servers' `remote_servers`. Empty: one
    /// server. See `audit_store::Topology` for the layout.
    pub cluster: String,
    /// With `cluster`: shards with replicas (`Replicated*` engines, `ON CLUSTER` statements;
    /// the servers need Keeper). `false`: shards of one server each, without Keeper.
    pub cluster_replicated: bool,
    /// With `cluster` and `cluster_replicated = false`: the HTTP URL of every server of the
    /// cluster, to which statements for every server are sent in turn.
    pub cluster_nodes: Vec<String>,
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
            tls: TlsSettings::default(),
            cluster: String::new(),
            cluster_replicated: true,
            cluster_nodes: Vec::new(),
        }
    }
}

/// TCP keep-alive of ClickHouse connections (the `clickhouse` crate's default client uses the same).
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// Idle pooled connections are dropped before ClickHouse's own 3 s keep-alive timeout closes them.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(2);

impl ClickHouseConfig {
    /// Checks what would otherwise fail later with a less clear message.
    pub fn validate(&self) -> Result<(), StoreError> {
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(StoreError::Config(format!(
                "clickhouse.url must start with http:// or https://, got {:?}",
                self.url
            )));
        }
        if self.https() {
            self.tls_config()?;
        } else if self.tls != TlsSettings::default() {
            return Err(StoreError::Config(
                "clickhouse.tls is set but clickhouse.url is not https://".to_owned(),
            ));
        }
        if !is_identifier(&self.database) {
            return Err(StoreError::Config(format!(
                "clickhouse.database must be letters, digits and underscores, got {:?}",
                self.database
            )));
        }
        self.validate_cluster()
    }

    fn validate_cluster(&self) -> Result<(), StoreError> {
        let refuse = |message: String| Err(StoreError::Config(message));
        if self.cluster.is_empty() {
            if !self.cluster_nodes.is_empty() {
                return refuse(
                    "clickhouse.cluster_nodes is set but clickhouse.cluster is not".to_owned(),
                );
            }
            return Ok(());
        }
        if !is_identifier(&self.cluster) {
            return refuse(format!(
                "clickhouse.cluster must be letters, digits and underscores, got {:?}",
                self.cluster
            ));
        }
        if self.cluster_replicated && !self.cluster_nodes.is_empty() {
            return refuse(
                "clickhouse.cluster_nodes is for clickhouse.cluster_replicated = false \
                 (a replicated cluster is told with ON CLUSTER)"
                    .to_owned(),
            );
        }
        if !self.cluster_replicated && self.cluster_nodes.is_empty() {
            return refuse(
                "clickhouse.cluster_replicated = false needs clickhouse.cluster_nodes, \
                 the HTTP URL of every server of the cluster"
                    .to_owned(),
            );
        }
        for node in &self.cluster_nodes {
            if !(node.starts_with("http://") || node.starts_with("https://")) {
                return refuse(format!(
                    "clickhouse.cluster_nodes: {node:?} must start with http:// or https://"
                ));
            }
        }
        Ok(())
    }

    /// A client bound to the audit database.
    pub fn client(&self) -> clickhouse::Client {
        let client = self.server_client().with_database(&self.database);
        if self.cluster.is_empty() {
            client
        } else {
            // An insert into a Distributed table returns once every shard stored its rows,
            // not when they are queued on the server that received them. (The setting's old
            // name: 23.x renamed it `distributed_foreground_insert` and kept this one as its
            // alias, so that older servers a cluster layout is tested on know it too.)
            client
                .with_setting("insert_distributed_sync", "1")
                // A subquery over a sharded table inside a query over one (the ingest's copy
                // repair: `NOT IN (SELECT ... FROM <copy>)`) reads each shard's own table: the
                // rows it compares are of one event, all on one shard (`SHARD_KEY`).
                .with_setting("distributed_product_mode", "local")
                // Reads and inserts reach the first healthy replica of each shard, in the
                // order of `remote_servers`: a read after an insert (the ingest's duplicate
                // check, its fence look-ups after a takeover) sees what the insert stored.
                // With the default (`random`) it may reach a replica that has not fetched the
                // part yet (a CI run's check found 44 of 100 copies). The price: the other
                // replicas serve only when the first fails.
                .with_setting("load_balancing", "in_order")
        }
    }

    fn https(&self) -> bool {
        self.url.starts_with("https://")
    }

    /// The TLS configuration of `tls`, read from its files for every new connection pool (so
    /// that a renewed client certificate is used by the next one).
    fn tls_config(&self) -> Result<Arc<rustls::ClientConfig>, StoreError> {
        self.tls
            .client_config("clickhouse.tls")
            .map_err(|err| StoreError::Config(err.to_string()))
    }

    /// A connection pool of its own: plain HTTP, or HTTPS with the configured TLS.
    fn http_client(&self) -> clickhouse::Client {
        let mut connector = HttpConnector::new();
        connector.set_keepalive(Some(TCP_KEEPALIVE));
        let mut builder = HttpClient::builder(TokioExecutor::new());
        builder.pool_idle_timeout(POOL_IDLE_TIMEOUT);
        if !self.https() {
            return clickhouse::Client::with_http_client(builder.build(connector));
        }
        let tls = match self.tls_config() {
            Ok(tls) => tls,
            Err(err) => {
                // validate() refuses such settings at start-up. A client built without it fails
                // every request (a plain connector refuses https://) rather than trust anything.
                tracing::error!(error = %err, "clickhouse.tls is unusable; requests will fail");
                return clickhouse::Client::with_http_client(builder.build(connector));
            }
        };
        connector.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*tls).clone())
            .https_only()
            .enable_http1()
            .wrap_connector(connector);
        clickhouse::Client::with_http_client(builder.build(https))
    }

    /// A client for statements that must run before the database exists.
    pub fn server_client(&self) -> clickhouse::Client {
        let client = self
            .http_client()
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
    fn cluster_settings_that_cannot_work_are_refused_naming_the_key() {
        let config = |cluster: &str, replicated: bool, nodes: &[&str]| ClickHouseConfig {
            cluster: cluster.to_owned(),
            cluster_replicated: replicated,
            cluster_nodes: nodes.iter().map(|n| (*n).to_owned()).collect(),
            ..ClickHouseConfig::default()
        };
        let refused = |c: ClickHouseConfig| c.validate().unwrap_err().to_string();
        assert!(config("audit", true, &[]).validate().is_ok());
        assert!(config("audit", false, &["http://a:8123", "https://b:8443"])
            .validate()
            .is_ok());
        assert!(refused(config("", true, &["http://a:8123"])).contains("clickhouse.cluster_nodes"));
        assert!(refused(config("a-b", true, &[])).contains("clickhouse.cluster must"));
        assert!(refused(config("audit", false, &[])).contains("needs clickhouse.cluster_nodes"));
        assert!(refused(config("audit", true, &["http://a:8123"]))
            .contains("cluster_replicated = false"));
        assert!(refused(config("audit", false, &["a:8123"])).contains("\"a:8123\""));
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
