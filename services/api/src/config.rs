//! The typed configuration of `audit-api`: defaults, then a TOML file, then environment
//! variables `AUDIT_API__<SECTION>__<KEY>`. Every field is listed in the README.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use audit_runtime::kafka::{Connection, KafkaSecurity};
use audit_runtime::{load_settings, SettingsError, TelemetryConfig};
use audit_store::ClickHouseConfig;
use serde::Deserialize;

pub const ENV_PREFIX: &str = "AUDIT_API";

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Address the HTTP API (and `/healthz`, `/readyz`, `/metrics`, `/openapi.json`) listens on.
    pub http_listen: SocketAddr,
    /// Where events are read from; see [`ClickHouseConfig`].
    pub clickhouse: ClickHouseConfig,
    pub query: QueryConfig,
    pub rate_limit: RateLimitConfig,
    pub keys: KeysConfig,
    pub read_events: ReadEventsConfig,
    pub streams: StreamsConfig,
    pub retention: RetentionConfig,
    /// Apply pending ClickHouse migrations at start-up; when false, refuse to start if any is pending.
    pub migrate_on_start: bool,
    /// How long in-flight requests (CSV streams included) may run after SIGTERM.
    pub shutdown_timeout_ms: u64,
    /// Logs and traces.
    pub telemetry: TelemetryConfig,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            http_listen: SocketAddr::from(([127, 0, 0, 1], 18080)),
            clickhouse: ClickHouseConfig::default(),
            query: QueryConfig::default(),
            rate_limit: RateLimitConfig::default(),
            keys: KeysConfig::default(),
            read_events: ReadEventsConfig::default(),
            streams: StreamsConfig::default(),
            retention: RetentionConfig::default(),
            migrate_on_start: true,
            shutdown_timeout_ms: 25_000,
            telemetry: TelemetryConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueryConfig {
    /// ClickHouse `max_execution_time` of page and count queries, in seconds; past it the
    /// request fails with 504.
    pub timeout_seconds: u64,
    /// `max_execution_time` of export streams (0 = none: an export runs as long as the client reads).
    pub export_timeout_seconds: u64,
    /// Filter combinations whose per-month stored-row counts are kept between requests (least
    /// recently used dropped first; 0 counts every month on every request).
    pub count_cache_entries: usize,
    /// 0 (the default): an export is one query sorted by ClickHouse, which reads in sort-key
    /// order. Above 0: stored rows an export reads per query, ordered by the service (the design
    /// for engines that sort everything first); a running export then holds two windows (~400
    /// bytes a row each).
    pub export_window_rows: u64,
    /// Exports this process runs at once (0 = no limit); one more is refused with 503 and
    /// `Retry-After`. Each takes two reader threads and three ClickHouse connections.
    pub max_concurrent_exports: usize,
}

impl Default for QueryConfig {
    fn default() -> Self {
        Self {
            timeout_seconds: 10,
            export_timeout_seconds: 0,
            count_cache_entries: 2_000,
            export_window_rows: 0,
            max_concurrent_exports: 4,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained requests per second allowed per API key (0 disables the limit).
    pub requests_per_second: u32,
    /// Requests a key may send at once above the sustained rate.
    pub burst: u32,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            requests_per_second: 10,
            burst: 20,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeysConfig {
    /// How often every replica re-reads the key table; a revocation takes effect within this
    /// interval (plus one query).
    pub refresh_interval_ms: u64,
    /// How often the last-used times of keys are written back.
    pub usage_flush_interval_ms: u64,
}

impl Default for KeysConfig {
    fn default() -> Self {
        Self {
            refresh_interval_ms: 2_000,
            usage_flush_interval_ms: 10_000,
        }
    }
}

impl KeysConfig {
    pub fn refresh_interval(&self) -> Duration {
        Duration::from_millis(self.refresh_interval_ms)
    }
}

/// Publishing of `audit_log.viewed` / `audit_log.exported` events: reads of the audit log are
/// themselves audited.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReadEventsConfig {
    pub enabled: bool,
    /// `bootstrap.servers`.
    pub brokers: String,
    pub topic: String,
    /// TLS and SASL towards the brokers (the same settings as the ingest's `kafka.security`).
    pub security: KafkaSecurity,
    /// Extra librdkafka producer properties (tuning, `compression.type`, security settings
    /// `security` does not cover).
    pub properties: BTreeMap<String, String>,
    /// `sasl.password`, from a secret in the environment (`AUDIT_API__READ_EVENTS__SASL_PASSWORD`).
    pub sasl_password: Option<secrecy::SecretString>,
}

impl ReadEventsConfig {
    /// How the producer reaches the brokers.
    pub fn connection(&self) -> Connection<'_> {
        Connection {
            section: "read_events",
            brokers: &self.brokers,
            properties: &self.properties,
            sasl_password: self.sasl_password.as_ref(),
            security: &self.security,
        }
    }
}

impl Default for ReadEventsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            brokers: "127.0.0.1:19092".to_owned(),
            topic: audit_event::topics::READS.to_owned(),
            security: KafkaSecurity::default(),
            properties: BTreeMap::new(),
            sasl_password: None,
        }
    }
}

/// Log streams (README "Log streams"): their management API and the stream worker
/// (`audit-api streams`). The worker reaches Kafka with `read_events`' brokers, security and
/// properties.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamsConfig {
    /// Base64 of 32 random bytes (`openssl rand -base64 32`) sealing the streams' secrets.
    /// Without it the streams endpoints answer 503 and the worker does not start. Keep it in a
    /// secret (`AUDIT_API__STREAMS__SECRET_KEY`); every replica needs the same one.
    pub secret_key: Option<secrecy::SecretString>,
    /// The stored-events topic the ingest publishes to.
    pub topic: String,
    /// Consumer group of the stream workers: Kafka gives each replica a share of the topic's
    /// partitions, and with them the streams of the organizations in those partitions.
    pub group_id: String,
    /// Accept `http://` destinations (local runs and tests; never in production).
    pub allow_http: bool,
    /// Deliver to hosts that resolve to private, loopback or link-local addresses.
    pub allow_private_destinations: bool,
    /// Longest wait for a destination's answer; past it the attempt is retried.
    pub request_timeout_ms: u64,
    /// How long a batch waits for more events once it has one.
    pub batch_linger_ms: u64,
    /// A stream whose deliveries have failed for this long is reported `failing` (it keeps
    /// retrying and keeps its position).
    pub failing_after_ms: u64,
    /// First back-off after a failed delivery, doubled each time up to `max_backoff_ms`, with
    /// jitter; a `Retry-After` longer than the back-off is honoured.
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// Splunk HEC indexer acknowledgement: how long an ack may take before the batch is sent again.
    pub ack_timeout_ms: u64,
    /// How often the worker re-reads the streams' settings.
    pub refresh_interval_ms: u64,
    /// How often positions and health are written to ClickHouse (and at every state change,
    /// rebalance and shutdown). A replica killed between two writes re-sends at most this much.
    pub state_flush_interval_ms: u64,
}

impl Default for StreamsConfig {
    fn default() -> Self {
        Self {
            secret_key: None,
            topic: audit_event::topics::STORED.to_owned(),
            group_id: "audit-streams".to_owned(),
            allow_http: false,
            allow_private_destinations: false,
            request_timeout_ms: 10_000,
            batch_linger_ms: 200,
            failing_after_ms: 300_000,
            initial_backoff_ms: 1_000,
            max_backoff_ms: 60_000,
            ack_timeout_ms: 60_000,
            refresh_interval_ms: 1_000,
            state_flush_interval_ms: 1_000,
        }
    }
}

impl StreamsConfig {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

/// Retention, legal holds and erasure (README "Retention, legal hold and erasure").
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Days an organization's events are held when the operator set no retention of its own
    /// (1 to 3650). 400: a year of evidence for an annual SOC 2 / ISO 27001 / PCI DSS audit
    /// period, plus a month of margin while the report is written.
    pub default_days: u32,
    /// How often every API replica (and stream worker) re-reads retentions and holds: a change
    /// applies to reads within it. Expiry itself is to the millisecond.
    pub refresh_interval_ms: u64,
    /// Key of the erased persons' pseudonyms (any string of 32 characters or more; every
    /// replica and the ingest need the same one). Without it `erase` is refused. Keep it in a
    /// secret (`AUDIT_API__RETENTION__PSEUDONYM_KEY`): with it, anyone could test whether a
    /// pseudonym belongs to an email they guess.
    pub pseudonym_key: Option<secrecy::SecretString>,
    /// How long an erasure waits, once recorded, before it rewrites the stored events: the
    /// ingest learns of it within its `retention.refresh_interval_ms` and pseudonymizes the
    /// person's events from then on; this covers that interval and a flush in flight.
    pub erasure_settle_ms: u64,
    /// ClickHouse `max_execution_time` of each step of the retention job (its mutations wait
    /// for completion up to it).
    pub job_timeout_seconds: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            default_days: 400,
            refresh_interval_ms: 2_000,
            pseudonym_key: None,
            erasure_settle_ms: 12_000,
            job_timeout_seconds: 3_600,
        }
    }
}

impl ApiConfig {
    /// Loads and validates the configuration; `file` is an optional TOML file.
    pub fn load(file: Option<&Path>) -> Result<Self, SettingsError> {
        let config: Self = load_settings(ENV_PREFIX, file, &["clickhouse.cluster_nodes"])?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), SettingsError> {
        self.clickhouse
            .validate()
            .map_err(|err| SettingsError::Invalid(err.to_string()))?;
        let invalid = |message: &str| Err(SettingsError::Invalid(message.to_owned()));
        if self.query.timeout_seconds == 0 {
            return invalid("query.timeout_seconds must be at least 1");
        }
        if self.rate_limit.requests_per_second > 0 && self.rate_limit.burst == 0 {
            return invalid("rate_limit.burst must be at least 1 when rate limiting is on");
        }
        if self.keys.refresh_interval_ms == 0 || self.keys.refresh_interval_ms > 5_000 {
            return invalid(
                "keys.refresh_interval_ms must be 1..=5000 (revocations take effect within it)",
            );
        }
        if self.keys.usage_flush_interval_ms == 0 {
            return invalid("keys.usage_flush_interval_ms must be at least 1");
        }
        if self.read_events.enabled && self.read_events.topic.is_empty() {
            return invalid("read_events.topic must not be empty when read_events.enabled");
        }
        let streams = &self.streams;
        if streams.request_timeout_ms == 0
            || streams.refresh_interval_ms == 0
            || streams.state_flush_interval_ms == 0
            || streams.initial_backoff_ms == 0
        {
            return invalid(
                "streams.request_timeout_ms, refresh_interval_ms, state_flush_interval_ms and \
                 initial_backoff_ms must be at least 1",
            );
        }
        if streams.max_backoff_ms < streams.initial_backoff_ms {
            return invalid("streams.max_backoff_ms must be at least streams.initial_backoff_ms");
        }
        if let Some(key) = &streams.secret_key {
            crate::log_streams::secret_box::SecretBox::from_key(key)
                .map_err(|err| SettingsError::Invalid(err.to_string()))?;
        }
        let retention = &self.retention;
        if !(audit_store::retention::MIN_DAYS..=audit_store::retention::MAX_DAYS)
            .contains(&retention.default_days)
        {
            return invalid("retention.default_days must be 1..=3650");
        }
        if retention.refresh_interval_ms == 0 || retention.refresh_interval_ms > 60_000 {
            return invalid("retention.refresh_interval_ms must be 1..=60000");
        }
        if let Some(key) = &retention.pseudonym_key {
            use secrecy::ExposeSecret;
            if key.expose_secret().len() < 32 {
                return invalid("retention.pseudonym_key must be at least 32 characters");
            }
        }
        if self.read_events.enabled {
            self.read_events
                .connection()
                .validate()
                .map_err(|err| SettingsError::Invalid(err.to_string()))?;
        }
        Ok(())
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_listen_on_loopback() {
        let config = ApiConfig::default();
        assert!(config.validate().is_ok());
        assert!(config.http_listen.ip().is_loopback());
    }

    #[test]
    fn a_refresh_slower_than_the_revocation_promise_is_refused() {
        let mut config = ApiConfig::default();
        config.keys.refresh_interval_ms = 60_000;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("keys.refresh_interval_ms"), "{err}");
    }
}
