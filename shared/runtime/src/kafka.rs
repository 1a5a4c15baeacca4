//! How every Kafka client of either service reaches the brokers: the typed security settings
//! (TLS, SASL, OAUTHBEARER), the operator's extra librdkafka properties, the SASL password kept
//! apart so that it can live in a secret, and a start-up probe that turns a wrong CA or a wrong
//! password into an error naming the cause instead of an endless reconnect loop.
//!
//! Longer than most modules: every security protocol and SASL mechanism, their validation and
//! the probe belong together (one set of settings, checked once, applied to every client).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer, ProducerContext};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tracing::{debug, error, info, warn};

/// `security.protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum SecurityProtocol {
    #[default]
    #[serde(rename = "PLAINTEXT", alias = "plaintext")]
    Plaintext,
    #[serde(rename = "SSL", alias = "ssl")]
    Ssl,
    #[serde(rename = "SASL_PLAINTEXT", alias = "sasl_plaintext")]
    SaslPlaintext,
    #[serde(rename = "SASL_SSL", alias = "sasl_ssl")]
    SaslSsl,
}

impl SecurityProtocol {
    fn name(self) -> &'static str {
        match self {
            Self::Plaintext => "PLAINTEXT",
            Self::Ssl => "SSL",
            Self::SaslPlaintext => "SASL_PLAINTEXT",
            Self::SaslSsl => "SASL_SSL",
        }
    }

    fn tls(self) -> bool {
        matches!(self, Self::Ssl | Self::SaslSsl)
    }

    fn sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }
}

/// `sasl.mechanism`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
    #[serde(rename = "OAUTHBEARER")]
    OAuthBearer,
}

impl SaslMechanism {
    fn name(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
            Self::OAuthBearer => "OAUTHBEARER",
        }
    }
}

/// TLS and SASL towards the brokers. Everything is optional: the default is plaintext, as on the
/// local stack.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSecurity {
    /// `PLAINTEXT` (default), `SSL`, `SASL_PLAINTEXT` or `SASL_SSL`.
    pub protocol: SecurityProtocol,
    /// With a `SASL_*` protocol: `PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512` or `OAUTHBEARER`.
    pub sasl_mechanism: Option<SaslMechanism>,
    /// PLAIN and SCRAM user name (the password is `sasl_password`, beside `properties`).
    pub sasl_username: Option<String>,
    /// PEM file of the CA(s) that signed the brokers' certificates. None: the system's CA roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS; needs `key_file`.
    pub cert_file: Option<PathBuf>,
    /// Private key (PEM) of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// Password of an encrypted `key_file`.
    pub key_password: Option<SecretString>,
    /// Whether the broker's host name must match its certificate (`https`, the default) or not
    /// (`none`: only for brokers whose certificates name no host, never across a network you
    /// do not trust).
    pub endpoint_identification: EndpointIdentification,
    /// OAUTHBEARER tokens from an OpenID Connect provider (client credentials grant).
    pub oauthbearer: Option<OAuthBearer>,
}

/// `ssl.endpoint.identification.algorithm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointIdentification {
    #[default]
    Https,
    None,
}

/// An OpenID Connect client: librdkafka fetches and refreshes the token itself
/// (`sasl.oauthbearer.method=oidc`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuthBearer {
    /// The provider's token endpoint, e.g. `https://login.example.com/oauth2/token`.
    pub token_endpoint: String,
    pub client_id: String,
    /// From a secret in the environment, e.g. `AUDIT_INGEST__KAFKA__SECURITY__OAUTHBEARER__CLIENT_SECRET`.
    pub client_secret: SecretString,
    #[serde(default)]
    pub scope: Option<String>,
    /// SASL extensions some services require (Confluent Cloud: `logicalCluster`, `identityPoolId`).
    #[serde(default)]
    pub extensions: BTreeMap<String, String>,
}

/// A setting that cannot work, named by its configuration key.
#[derive(Debug, thiserror::Error)]
pub enum KafkaSettingsError {
    #[error("{key}: {problem}")]
    Invalid { key: String, problem: String },
    #[error("{key}: cannot read {path}: {source}")]
    File {
        key: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Everything that decides how one client connects: a borrowed view of a service's Kafka section.
#[derive(Debug, Clone, Copy)]
pub struct Connection<'a> {
    /// The section's configuration key, e.g. `kafka` or `read_events` (for error messages).
    pub section: &'a str,
    pub brokers: &'a str,
    pub properties: &'a BTreeMap<String, String>,
    pub sasl_password: Option<&'a SecretString>,
    pub security: &'a KafkaSecurity,
}

/// Properties that `security` sets; setting them in `properties` too would be ambiguous.
const SECURITY_PROPERTIES: &[&str] = &[
    "security.protocol",
    "sasl.mechanism",
    "sasl.mechanisms",
    "sasl.username",
    "sasl.password",
    "ssl.ca.location",
    "ssl.certificate.location",
    "ssl.key.location",
    "ssl.key.password",
    "ssl.endpoint.identification.algorithm",
    "sasl.oauthbearer.method",
    "sasl.oauthbearer.client.id",
    "sasl.oauthbearer.client.secret",
    "sasl.oauthbearer.token.endpoint.url",
    "sasl.oauthbearer.scope",
    "sasl.oauthbearer.extensions",
];

impl Connection<'_> {
    fn key(&self, field: &str) -> String {
        format!("{}.{field}", self.section)
    }

    fn invalid(&self, field: &str, problem: impl Into<String>) -> KafkaSettingsError {
        KafkaSettingsError::Invalid {
            key: self.key(field),
            problem: problem.into(),
        }
    }

    /// Whether `security` is in use (any field set), as opposed to raw `properties`.
    fn typed(&self) -> bool {
        let s = self.security;
        s.protocol != SecurityProtocol::Plaintext
            || s.sasl_mechanism.is_some()
            || s.sasl_username.is_some()
            || s.ca_file.is_some()
            || s.cert_file.is_some()
            || s.key_file.is_some()
            || s.oauthbearer.is_some()
    }

    /// Checks what would otherwise fail at the first connection with a less clear message.
    pub fn validate(&self) -> Result<(), KafkaSettingsError> {
        if self.brokers.trim().is_empty() {
            return Err(self.invalid("brokers", "must name at least one broker (host:port)"));
        }
        let s = self.security;
        if self.typed() {
            if let Some(key) = SECURITY_PROPERTIES
                .iter()
                .find(|key| **key != "sasl.password" && self.properties.contains_key(**key))
            {
                return Err(self.invalid(
                    &format!("properties.{key}"),
                    format!(
                        "set by {} as well; configure it in one place",
                        self.key("security")
                    ),
                ));
            }
        }
        match (s.protocol.sasl(), s.sasl_mechanism) {
            (true, None)
                if !self.properties.contains_key("sasl.mechanism")
                    && !self.properties.contains_key("sasl.mechanisms") =>
            {
                return Err(self.invalid(
                    "security.sasl_mechanism",
                    format!(
                        "{} needs a mechanism: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER",
                        s.protocol.name()
                    ),
                ));
            }
            (false, Some(mechanism)) => {
                return Err(self.invalid(
                    "security.sasl_mechanism",
                    format!(
                        "{} is set but security.protocol is {} (use SASL_SSL or SASL_PLAINTEXT)",
                        mechanism.name(),
                        s.protocol.name()
                    ),
                ));
            }
            _ => {}
        }
        match s.sasl_mechanism {
            Some(
                SaslMechanism::Plain | SaslMechanism::ScramSha256 | SaslMechanism::ScramSha512,
            ) => {
                if s.sasl_username.as_deref().is_none_or(str::is_empty) {
                    return Err(
                        self.invalid("security.sasl_username", "PLAIN and SCRAM need a user name")
                    );
                }
                if self
                    .sasl_password
                    .is_none_or(|p| p.expose_secret().is_empty())
                {
                    return Err(self.invalid(
                        "sasl_password",
                        "PLAIN and SCRAM need a password (set it from a secret in the environment)",
                    ));
                }
            }
            Some(SaslMechanism::OAuthBearer) => {
                let configured_by_properties =
                    self.properties.contains_key("sasl.oauthbearer.method")
                        || self
                            .properties
                            .contains_key("enable.sasl.oauthbearer.unsecure.jwt")
                        || self.properties.contains_key("sasl.oauthbearer.config");
                match &s.oauthbearer {
                    None if !configured_by_properties => {
                        return Err(self.invalid(
                            "security.oauthbearer",
                            "OAUTHBEARER needs token_endpoint, client_id and client_secret",
                        ));
                    }
                    Some(oauth) => {
                        if !(oauth.token_endpoint.starts_with("https://")
                            || oauth.token_endpoint.starts_with("http://"))
                        {
                            return Err(self.invalid(
                                "security.oauthbearer.token_endpoint",
                                format!("must be an http(s) URL, got {:?}", oauth.token_endpoint),
                            ));
                        }
                        if oauth.client_id.is_empty()
                            || oauth.client_secret.expose_secret().is_empty()
                        {
                            return Err(self.invalid(
                                "security.oauthbearer",
                                "client_id and client_secret must not be empty",
                            ));
                        }
                    }
                    None => {}
                }
            }
            None => {}
        }
        if s.sasl_username.is_some() && !s.protocol.sasl() {
            return Err(self.invalid(
                "security.sasl_username",
                format!(
                    "is set but security.protocol is {} (use SASL_SSL or SASL_PLAINTEXT)",
                    s.protocol.name()
                ),
            ));
        }
        if s.oauthbearer.is_some() && s.sasl_mechanism != Some(SaslMechanism::OAuthBearer) {
            return Err(self.invalid(
                "security.oauthbearer",
                "is set but security.sasl_mechanism is not OAUTHBEARER",
            ));
        }
        if s.cert_file.is_some() != s.key_file.is_some() {
            return Err(self.invalid(
                "security.cert_file",
                "a client certificate needs both cert_file and key_file",
            ));
        }
        if !s.protocol.tls() && (s.ca_file.is_some() || s.cert_file.is_some()) {
            return Err(self.invalid(
                "security.protocol",
                format!(
                    "ca_file and cert_file need a TLS protocol (SSL or SASL_SSL), not {}",
                    s.protocol.name()
                ),
            ));
        }
        for (field, path) in [
            ("security.ca_file", &s.ca_file),
            ("security.cert_file", &s.cert_file),
            ("security.key_file", &s.key_file),
        ] {
            if let Some(path) = path {
                readable(&self.key(field), path)?;
            }
        }
        Ok(())
    }

    /// Sets `bootstrap.servers`, the operator's `properties`, then what `security` and
    /// `sasl_password` say.
    pub fn apply(&self, client: &mut ClientConfig) {
        client.set("bootstrap.servers", self.brokers);
        for (key, value) in self.properties {
            client.set(key, value);
        }
        let s = self.security;
        if self.typed() {
            client.set("security.protocol", s.protocol.name());
        }
        if let Some(mechanism) = s.sasl_mechanism {
            client.set("sasl.mechanism", mechanism.name());
        }
        if let Some(user) = &s.sasl_username {
            client.set("sasl.username", user);
        }
        if let Some(password) = self.sasl_password {
            client.set("sasl.password", password.expose_secret());
        }
        if s.protocol.tls() {
            match &s.ca_file {
                Some(path) => client.set("ssl.ca.location", path.to_string_lossy()),
                // The system's roots wherever this distribution keeps them (librdkafka probes
                // the usual paths; OpenSSL's compiled-in directory differs between images).
                None if !self.properties.contains_key("ssl.ca.location") => {
                    client.set("ssl.ca.location", "probe")
                }
                None => client,
            };
            if s.endpoint_identification == EndpointIdentification::None {
                client.set("ssl.endpoint.identification.algorithm", "none");
            }
        }
        if let (Some(cert), Some(key)) = (&s.cert_file, &s.key_file) {
            client.set("ssl.certificate.location", cert.to_string_lossy());
            client.set("ssl.key.location", key.to_string_lossy());
        }
        if let Some(password) = &s.key_password {
            client.set("ssl.key.password", password.expose_secret());
        }
        if let Some(oauth) = &s.oauthbearer {
            client.set("sasl.oauthbearer.method", "oidc");
            client.set("sasl.oauthbearer.token.endpoint.url", &oauth.token_endpoint);
            client.set("sasl.oauthbearer.client.id", &oauth.client_id);
            client.set(
                "sasl.oauthbearer.client.secret",
                oauth.client_secret.expose_secret(),
            );
            if let Some(scope) = &oauth.scope {
                client.set("sasl.oauthbearer.scope", scope);
            }
            if !oauth.extensions.is_empty() {
                let extensions: Vec<String> = oauth
                    .extensions
                    .iter()
                    .map(|(key, value)| format!("{key}={value}"))
                    .collect();
                client.set("sasl.oauthbearer.extensions", extensions.join(","));
            }
        }
    }
}

fn readable(key: &str, path: &Path) -> Result<(), KafkaSettingsError> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|source| KafkaSettingsError::File {
            key: key.to_owned(),
            path: path.to_owned(),
            source,
        })
}

/// The last error librdkafka logged about reaching the brokers, kept for the start-up probe.
#[derive(Debug, Default)]
pub struct ConnectionLog {
    last_error: Mutex<Option<String>>,
}

impl ConnectionLog {
    /// Forwards one librdkafka log line to `tracing` and remembers it when it is an error.
    pub fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        if forward_log(level, fac, message) {
            *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(message.to_owned());
        }
    }

    /// The last error logged, if any.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The last error when it says that the settings are wrong (TLS verification, SASL
    /// credentials or mechanism, token acquisition): retrying cannot help.
    pub fn settings_error(&self) -> Option<String> {
        self.last_error()
            .filter(|message| is_settings_error(message))
    }
}

/// Forwards one librdkafka log line to `tracing` at its level; true when it is an error.
pub fn forward_log(level: RDKafkaLogLevel, fac: &str, message: &str) -> bool {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => {
            error!(facility = fac, "librdkafka: {message}");
            return true;
        }
        RDKafkaLogLevel::Warning => warn!(facility = fac, "librdkafka: {message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            info!(facility = fac, "librdkafka: {message}")
        }
        RDKafkaLogLevel::Debug => debug!(facility = fac, "librdkafka: {message}"),
    }
    false
}

/// Whether a librdkafka error line is caused by the client's TLS or SASL settings.
pub fn is_settings_error(message: &str) -> bool {
    const CAUSES: &[&str] = &[
        "SSL handshake failed",
        "certificate verify failed",
        "SASL authentication error",
        "Authentication failed",
        "SASL handshake failed",
        "Unsupported SASL mechanism",
        "OAUTHBEARER",
        "ssl.ca.location",
        "Failed to retrieve OIDC token",
        "Failed to acquire SASL",
    ];
    CAUSES.iter().any(|cause| message.contains(cause))
}

/// Why a client could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot connect to Kafka at {brokers}: {cause}")]
    Settings { brokers: String, cause: String },
    #[error("invalid Kafka client settings: {0}")]
    Client(#[from] rdkafka::error::KafkaError),
}

/// The context of the project's producers: librdkafka's log lines and errors go to `tracing`,
/// and are kept for [`probe`].
#[derive(Debug, Clone, Default)]
pub struct LoggingContext {
    pub connection: Arc<ConnectionLog>,
}

impl ClientContext for LoggingContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.connection.log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.connection.log(
            RDKafkaLogLevel::Error,
            "ERROR",
            &format!("{error}: {reason}"),
        );
    }
}

impl ProducerContext for LoggingContext {
    type DeliveryOpaque = ();
    fn delivery(&self, _result: &DeliveryResult<'_>, _opaque: Self::DeliveryOpaque) {}
}

/// A client configuration: the service's `defaults`, then the connection's own settings and the
/// operator's `properties` (which may override the defaults), then the settings a guarantee
/// depends on (`managed`, which validation forbids overriding).
pub fn client_config(
    connection: &Connection<'_>,
    defaults: &[(&str, &str)],
    managed: &[(&str, &str)],
) -> ClientConfig {
    let mut client = ClientConfig::new();
    for (key, value) in defaults {
        client.set(*key, *value);
    }
    connection.apply(&mut client);
    for (key, value) in managed {
        client.set(*key, *value);
    }
    client
}

/// The services' producers (the ingest's dead letters, the API's read events): idempotent,
/// every write acknowledged by all in-sync replicas, librdkafka's log in `tracing`.
pub fn idempotent_producer(
    connection: &Connection<'_>,
    defaults: &[(&str, &str)],
) -> Result<rdkafka::producer::FutureProducer<LoggingContext>, KafkaError> {
    client_config(
        connection,
        defaults,
        &[("enable.idempotence", "true"), ("acks", "all")],
    )
    .create_with_context(LoggingContext::default())
}

/// Connects with `connection`'s settings (a client of its own, dropped afterwards) until the
/// brokers answer a metadata request, for at most `wait`. Fails at once, naming the cause, when
/// librdkafka reports that the TLS or SASL settings are wrong (a wrong CA, a wrong password, an
/// unknown mechanism, no token from the OAuth provider): retrying cannot help, and a process
/// that exits with the cause is what an operator can act on. Brokers that merely do not answer
/// yet are not an error (the services wait for Kafka and say so in `/readyz`). Blocking: call
/// on a blocking thread.
pub fn probe(connection: &Connection<'_>, wait: Duration) -> Result<(), ProbeError> {
    let context = LoggingContext::default();
    let mut config = ClientConfig::new();
    connection.apply(&mut config);
    // Only what connecting needs: the operator's tuning properties may be consumer-only.
    config.set_log_level(RDKafkaLogLevel::Warning);
    let client: BaseProducer<LoggingContext> = config.create_with_context(context.clone())?;
    let started = Instant::now();
    loop {
        let answered = client
            .client()
            .fetch_metadata(None, Duration::from_secs(2))
            .is_ok();
        // Serves the queued log lines and errors (they reach the context only when polled).
        client.poll(Duration::from_millis(100));
        if answered {
            return Ok(());
        }
        if let Some(cause) = context.connection.settings_error() {
            return Err(ProbeError::Settings {
                brokers: connection.brokers.to_owned(),
                cause,
            });
        }
        if started.elapsed() >= wait {
            warn!(
                brokers = connection.brokers,
                last_error = context.connection.last_error().unwrap_or_default(),
                "Kafka does not answer yet; starting anyway and waiting for it"
            );
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connection<'a>(
        properties: &'a BTreeMap<String, String>,
        password: Option<&'a SecretString>,
        security: &'a KafkaSecurity,
    ) -> Connection<'a> {
        Connection {
            section: "kafka",
            brokers: "broker:9093",
            properties,
            sasl_password: password,
            security,
        }
    }

    #[test]
    fn scram_over_tls_becomes_librdkafka_properties() {
        let properties = BTreeMap::new();
        let password = SecretString::from("s3cret".to_owned());
        let security = KafkaSecurity {
            protocol: SecurityProtocol::SaslSsl,
            sasl_mechanism: Some(SaslMechanism::ScramSha512),
            sasl_username: Some("audit".to_owned()),
            ..KafkaSecurity::default()
        };
        let c = connection(&properties, Some(&password), &security);
        c.validate().unwrap();
        let mut client = ClientConfig::new();
        c.apply(&mut client);
        assert_eq!(client.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(client.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(client.get("sasl.username"), Some("audit"));
        assert_eq!(client.get("sasl.password"), Some("s3cret"));
        assert_eq!(client.get("ssl.ca.location"), Some("probe"));
        assert_eq!(client.get("bootstrap.servers"), Some("broker:9093"));
    }

    #[test]
    fn raw_properties_still_work_alone() {
        let properties = BTreeMap::from([
            ("security.protocol".to_owned(), "SASL_SSL".to_owned()),
            ("sasl.mechanisms".to_owned(), "PLAIN".to_owned()),
        ]);
        let security = KafkaSecurity::default();
        let password = SecretString::from("p".to_owned());
        let c = connection(&properties, Some(&password), &security);
        c.validate().unwrap();
        let mut client = ClientConfig::new();
        c.apply(&mut client);
        assert_eq!(client.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(client.get("sasl.password"), Some("p"));
    }

    #[test]
    fn settings_that_cannot_work_are_named() {
        let properties = BTreeMap::new();
        let no_mechanism = KafkaSecurity {
            protocol: SecurityProtocol::SaslSsl,
            ..KafkaSecurity::default()
        };
        let err = connection(&properties, None, &no_mechanism)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("kafka.security.sasl_mechanism"), "{err}");

        let no_password = KafkaSecurity {
            protocol: SecurityProtocol::SaslSsl,
            sasl_mechanism: Some(SaslMechanism::ScramSha256),
            sasl_username: Some("audit".to_owned()),
            ..KafkaSecurity::default()
        };
        let err = connection(&properties, None, &no_password)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("kafka.sasl_password"), "{err}");

        let missing_ca = KafkaSecurity {
            protocol: SecurityProtocol::Ssl,
            ca_file: Some(PathBuf::from("/nonexistent/ca.pem")),
            ..KafkaSecurity::default()
        };
        let err = connection(&properties, None, &missing_ca)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("kafka.security.ca_file") && err.contains("/nonexistent/ca.pem"),
            "{err}"
        );

        let both = BTreeMap::from([("security.protocol".to_owned(), "SSL".to_owned())]);
        let typed = KafkaSecurity {
            protocol: SecurityProtocol::Ssl,
            ..KafkaSecurity::default()
        };
        let err = connection(&both, None, &typed)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("kafka.properties.security.protocol"), "{err}");
    }

    #[test]
    fn oidc_settings_reach_librdkafka() {
        let properties = BTreeMap::new();
        let security = KafkaSecurity {
            protocol: SecurityProtocol::SaslSsl,
            sasl_mechanism: Some(SaslMechanism::OAuthBearer),
            oauthbearer: Some(OAuthBearer {
                token_endpoint: "https://idp.example/token".to_owned(),
                client_id: "audit".to_owned(),
                client_secret: SecretString::from("cs".to_owned()),
                scope: Some("kafka".to_owned()),
                extensions: BTreeMap::from([
                    ("identityPoolId".to_owned(), "pool-1".to_owned()),
                    ("logicalCluster".to_owned(), "lkc-1".to_owned()),
                ]),
            }),
            ..KafkaSecurity::default()
        };
        let c = connection(&properties, None, &security);
        c.validate().unwrap();
        let mut client = ClientConfig::new();
        c.apply(&mut client);
        assert_eq!(client.get("sasl.oauthbearer.method"), Some("oidc"));
        assert_eq!(client.get("sasl.oauthbearer.client.secret"), Some("cs"));
        assert_eq!(
            client.get("sasl.oauthbearer.extensions"),
            Some("identityPoolId=pool-1,logicalCluster=lkc-1")
        );
    }

    #[test]
    fn tls_and_sasl_failures_are_settings_errors_and_refusals_are_not() {
        assert!(is_settings_error("sasl_ssl://127.0.0.1:19094/bootstrap: SASL authentication error: Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512"));
        assert!(is_settings_error("ssl://b:9093/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed"));
        assert!(!is_settings_error(
            "127.0.0.1:19092/bootstrap: Connect to ipv4#127.0.0.1:19092 failed: Connection refused"
        ));
    }

    #[test]
    fn debug_output_hides_secrets() {
        let security = KafkaSecurity {
            key_password: Some(SecretString::from("hunter2".to_owned())),
            oauthbearer: Some(OAuthBearer {
                token_endpoint: "https://idp/token".to_owned(),
                client_id: "id".to_owned(),
                client_secret: SecretString::from("hunter3".to_owned()),
                scope: None,
                extensions: BTreeMap::new(),
            }),
            ..KafkaSecurity::default()
        };
        let text = format!("{security:?}");
        assert!(
            !text.contains("hunter2") && !text.contains("hunter3"),
            "{text}"
        );
    }
}
