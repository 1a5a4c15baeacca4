//! The typed configuration of `audit-ingest`: defaults, then a TOML file, then environment
//! variables `AUDIT_INGEST__<SECTION>__<KEY>`. Every field is listed in the README.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use audit_runtime::kafka::{Connection, KafkaSecurity};
use audit_runtime::{load_settings, SettingsError, TelemetryConfig};
use audit_store::ClickHouseConfig;
use serde::Deserialize;

pub const ENV_PREFIX: &str = "AUDIT_INGEST";

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    pub kafka: KafkaConfig,
    /// Where events are written; see [`ClickHouseConfig`].
    pub clickhouse: ClickHouseConfig,
    pub batch: BatchConfig,
    pub dead_letter: DeadLetterConfig,
    pub stored_events: StoredEventsConfig,
    pub retry: RetryConfig,
    pub directory: DirectoryConfig,
    pub retention: RetentionConfig,
    pub liveness: LivenessConfig,
    /// Address of the `/healthz`, `/readyz` and `/metrics` listener.
    pub http_listen: SocketAddr,
    /// Apply pending ClickHouse migrations at start-up; when false, refuse to start if any is pending.
    pub migrate_on_start: bool,
    /// How long a SIGTERM may take: flush, commit and leave the group within it.
    pub shutdown_timeout_ms: u64,
    /// Logs and traces.
    pub telemetry: TelemetryConfig,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            kafka: KafkaConfig::default(),
            clickhouse: ClickHouseConfig::default(),
            batch: BatchConfig::default(),
            dead_letter: DeadLetterConfig::default(),
            stored_events: StoredEventsConfig::default(),
            retry: RetryConfig::default(),
            directory: DirectoryConfig::default(),
            retention: RetentionConfig::default(),
            liveness: LivenessConfig::default(),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 18081)),
            migrate_on_start: true,
            shutdown_timeout_ms: 9_000,
            telemetry: TelemetryConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Consumer group shared by all replicas.
    pub group_id: String,
    /// Topics to consume.
    pub topics: Vec<String>,
    /// TLS and SASL towards the brokers, for the consumer and the dead-letter producer alike.
    pub security: KafkaSecurity,
    /// Extra librdkafka properties for consumer and producer alike (tuning, or security settings
    /// `security` does not cover, e.g. `compression.type` of the dead-letter producer).
    pub properties: BTreeMap<String, String>,
    /// `sasl.password`, kept out of `properties` so that it can come from a secret in the
    /// environment (`AUDIT_INGEST__KAFKA__SASL_PASSWORD`) and is never printed.
    pub sasl_password: Option<secrecy::SecretString>,
    /// `group.instance.id`: static group membership. A replica that restarts with the same id
    /// within the session timeout gets its partitions back without a rebalance of the group.
    /// Must be stable per replica and unique in the group (the chart uses the pod name of a
    /// StatefulSet). None: a new member at every start.
    pub instance_id: Option<String>,
    /// `session.timeout.ms`: how long the group waits for a silent member before giving its
    /// partitions to others. None: 30 s with `instance_id` (covers a pod restart), else 10 s.
    pub session_timeout_ms: Option<u64>,
    /// `partition.assignment.strategy`.
    pub assignor: String,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            sasl_password: None,
            brokers: "127.0.0.1:19092".to_owned(),
            group_id: "audit-ingest".to_owned(),
            topics: audit_event::topics::IDENTITY.map(str::to_owned).to_vec(),
            security: KafkaSecurity::default(),
            properties: BTreeMap::new(),
            instance_id: None,
            session_timeout_ms: None,
            assignor: "cooperative-sticky".to_owned(),
        }
    }
}

impl KafkaConfig {
    /// How the clients reach the brokers.
    pub fn connection(&self) -> Connection<'_> {
        Connection {
            section: "kafka",
            brokers: &self.brokers,
            properties: &self.properties,
            sasl_password: self.sasl_password.as_ref(),
            security: &self.security,
        }
    }

    /// The session timeout in effect (see `session_timeout_ms`).
    pub fn session_timeout_ms(&self) -> u64 {
        match (self.session_timeout_ms, &self.instance_id) {
            (Some(ms), _) => ms,
            (None, Some(_)) => 30_000,
            (None, None) => 10_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchConfig {
    /// Flush when this many events are buffered.
    pub max_rows: usize,
    /// Flush when the buffered rows reach this many bytes.
    pub max_bytes: usize,
    /// Flush when the oldest buffered event has waited this long (milliseconds).
    pub max_age_ms: u64,
    /// Flushes that may run at once (their offsets are still committed in order).
    pub max_in_flight: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            // ClickHouse 18.16's CPU per row falls with the insert size (fewer parts to write
            // and merge): 50,000-row inserts take half the CPU of 10,000-row ones. One big
            // flush while the next batch fills beat two smaller ones in flight on 2 cores
            // (~15% more events/s than 2 x 25,000 at the same ~170 MB peak RSS).
            max_rows: 50_000,
            max_bytes: 48 * 1024 * 1024,
            max_age_ms: 250,
            max_in_flight: 1,
        }
    }
}

impl BatchConfig {
    pub fn max_age(&self) -> Duration {
        Duration::from_millis(self.max_age_ms)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeadLetterConfig {
    /// Topic that receives invalid messages, raw, with the reason in headers.
    pub topic: String,
    /// Stop the service when more than this fraction of a window's messages is invalid.
    pub max_invalid_ratio: f64,
    /// Messages per window for `max_invalid_ratio`.
    pub window_messages: u64,
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        Self {
            topic: audit_event::topics::DEAD_LETTERS.to_owned(),
            max_invalid_ratio: 0.5,
            window_messages: 1_000,
        }
    }
}

/// The stored-events topic, which log streams deliver from (README "Log streams").
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoredEventsConfig {
    /// Publish every stored event (after its insert, before the offsets are committed). Off:
    /// log streams deliver nothing new.
    pub enabled: bool,
    /// Must exist at start-up; its partition count must never change.
    pub topic: String,
}

impl Default for StoredEventsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            topic: audit_event::topics::STORED.to_owned(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// First back-off after a transient failure (milliseconds).
    pub initial_backoff_ms: u64,
    /// Back-off cap (milliseconds); retries go on until success or shutdown.
    pub max_backoff_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            initial_backoff_ms: 100,
            max_backoff_ms: 5_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DirectoryConfig {
    /// Fill missing actor/affected-user emails and team names from the directory projection.
    pub enrich: bool,
    /// Entries kept in memory.
    pub cache_entries: usize,
    /// How long a cached entry is trusted before it is read again (milliseconds).
    pub cache_ttl_ms: u64,
}

impl Default for DirectoryConfig {
    fn default() -> Self {
        Self {
            enrich: true,
            cache_entries: 100_000,
            cache_ttl_ms: 60_000,
        }
    }
}

/// Erased persons (README "Retention, legal hold and erasure"): what the ingest does with
/// their events.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// The API's `retention.pseudonym_key` (the same secret). With it, an erased person's events
    /// that occurred before their erasure and arrive again (a re-delivery, `audit-ingest
    /// replay`) are stored and published under their pseudonyms; without it they are stored as
    /// sent, and a warning says so.
    pub pseudonym_key: Option<secrecy::SecretString>,
    /// Pseudonymize an erased person's later events too (events that occur after the
    /// erasure), so that the service never stores their data again.
    pub pseudonymize_later_events: bool,
    /// How often the erasures are re-read; the API's `retention.erasure_settle_ms` must exceed
    /// it.
    pub refresh_interval_ms: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            pseudonym_key: None,
            pseudonymize_later_events: false,
            refresh_interval_ms: 5_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LivenessConfig {
    /// A replica whose assigned partitions have lag and made no progress (no commit, not caught
    /// up) for this long, while Kafka and ClickHouse answer, is stuck: `/healthz` fails
    /// (milliseconds).
    pub stall_after_ms: u64,
    /// How often progress is checked against Kafka's offsets (milliseconds).
    pub check_interval_ms: u64,
}

impl Default for LivenessConfig {
    fn default() -> Self {
        Self {
            // Long enough for a backfill's 50,000-row flush retried through a slow ClickHouse
            // and for a rebalance that waits out a session timeout; short enough that a stuck
            // replica is restarted within minutes, long before anyone would notice the gap.
            stall_after_ms: 120_000,
            check_interval_ms: 5_000,
        }
    }
}

impl LivenessConfig {
    pub fn stall_after(&self) -> Duration {
        Duration::from_millis(self.stall_after_ms)
    }

    pub fn check_interval(&self) -> Duration {
        Duration::from_millis(self.check_interval_ms)
    }
}

impl IngestConfig {
    /// Loads and validates the configuration; `file` is an optional TOML file.
    pub fn load(file: Option<&Path>) -> Result<Self, SettingsError> {
        let config: Self = load_settings(
            ENV_PREFIX,
            file,
            &["kafka.topics", "clickhouse.cluster_nodes"],
        )?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), SettingsError> {
        let invalid = |message: String| Err(SettingsError::Invalid(message));
        self.clickhouse
            .validate()
            .map_err(|err| SettingsError::Invalid(err.to_string()))?;
        if self.kafka.brokers.trim().is_empty() {
            return invalid("kafka.brokers must not be empty".to_owned());
        }
        if self.retention.refresh_interval_ms == 0 {
            return invalid("retention.refresh_interval_ms must be at least 1".to_owned());
        }
        if self.retention.pseudonymize_later_events && self.retention.pseudonym_key.is_none() {
            return invalid(
                "retention.pseudonymize_later_events needs retention.pseudonym_key".to_owned(),
            );
        }
        if self.kafka.group_id.trim().is_empty() {
            return invalid("kafka.group_id must not be empty".to_owned());
        }
        if self.kafka.topics.is_empty() || self.kafka.topics.iter().any(|t| t.trim().is_empty()) {
            return invalid("kafka.topics must list at least one non-empty topic".to_owned());
        }
        if self.stored_events.enabled && self.kafka.topics.contains(&self.stored_events.topic) {
            return invalid(format!(
                "stored_events.topic {:?} must not be one of kafka.topics",
                self.stored_events.topic
            ));
        }
        if self.kafka.topics.contains(&self.dead_letter.topic) {
            return invalid(format!(
                "dead_letter.topic {:?} must not be one of kafka.topics",
                self.dead_letter.topic
            ));
        }
        for key in self.kafka.properties.keys() {
            if MANAGED_PROPERTIES.contains(&key.as_str()) {
                return invalid(format!(
                    "kafka.properties.{key} is set by audit-ingest itself and cannot be overridden"
                ));
            }
            if let Some(setting) = DEDICATED_PROPERTIES
                .iter()
                .find_map(|(property, setting)| (property == key).then_some(setting))
            {
                return invalid(format!(
                    "kafka.properties.{key}: use kafka.{setting} instead"
                ));
            }
        }
        self.kafka
            .connection()
            .validate()
            .map_err(|err| SettingsError::Invalid(err.to_string()))?;
        if let Some(id) = &self.kafka.instance_id {
            let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
            if id.is_empty() || id.len() > 249 || !id.chars().all(allowed) {
                return invalid(format!(
                    "kafka.instance_id {id:?} must be 1-249 characters of letters, digits, '.', '_' and '-'"
                ));
            }
        }
        // The broker's default group.min/max.session.timeout.ms.
        if !(6_000..=1_800_000).contains(&self.kafka.session_timeout_ms()) {
            return invalid("kafka.session_timeout_ms must be between 6000 and 1800000".to_owned());
        }
        let strategies: Vec<&str> = self.kafka.assignor.split(',').map(str::trim).collect();
        let known = ["range", "roundrobin", "cooperative-sticky"];
        let cooperative = strategies.contains(&"cooperative-sticky");
        if strategies.iter().any(|s| !known.contains(s)) || (cooperative && strategies.len() > 1) {
            return invalid(format!(
                "kafka.assignor {:?} must be cooperative-sticky, or range and/or roundrobin (eager and cooperative cannot be mixed)",
                self.kafka.assignor
            ));
        }
        if self.batch.max_rows == 0
            || self.batch.max_bytes == 0
            || self.batch.max_age_ms == 0
            || self.batch.max_in_flight == 0
        {
            return invalid(
                "batch.max_rows, batch.max_bytes, batch.max_age_ms and batch.max_in_flight must be > 0".to_owned(),
            );
        }
        if !(self.dead_letter.max_invalid_ratio > 0.0 && self.dead_letter.max_invalid_ratio <= 1.0)
        {
            return invalid("dead_letter.max_invalid_ratio must be in (0, 1]".to_owned());
        }
        if self.dead_letter.window_messages == 0 {
            return invalid("dead_letter.window_messages must be > 0".to_owned());
        }
        if self.liveness.check_interval_ms == 0
            || self.liveness.stall_after_ms < 2 * self.liveness.check_interval_ms
        {
            return invalid(
                "liveness: need 0 < check_interval_ms and stall_after_ms >= 2 x check_interval_ms"
                    .to_owned(),
            );
        }
        if self.retry.initial_backoff_ms == 0
            || self.retry.max_backoff_ms < self.retry.initial_backoff_ms
        {
            return invalid("retry: need 0 < initial_backoff_ms <= max_backoff_ms".to_owned());
        }
        Ok(())
    }
}

/// librdkafka properties that have a setting of their own, which must be used instead.
pub const DEDICATED_PROPERTIES: &[(&str, &str)] = &[
    ("group.instance.id", "instance_id"),
    ("session.timeout.ms", "session_timeout_ms"),
    ("partition.assignment.strategy", "assignor"),
];

/// librdkafka properties whose values the delivery guarantee depends on.
pub const MANAGED_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "isolation.level",
    "enable.idempotence",
    "acks",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        IngestConfig::default().validate().unwrap();
    }

    #[test]
    fn guarantee_critical_kafka_properties_cannot_be_overridden() {
        let mut config = IngestConfig::default();
        config
            .kafka
            .properties
            .insert("enable.auto.commit".to_owned(), "true".to_owned());
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("enable.auto.commit"), "{err}");
    }

    #[test]
    fn membership_settings_are_checked_and_have_one_place_each() {
        let mut config = IngestConfig::default();
        config.kafka.instance_id = Some("audit-ingest-0".to_owned());
        config.validate().unwrap();
        assert_eq!(config.kafka.session_timeout_ms(), 30_000);
        config.kafka.instance_id = Some("pod 0".to_owned());
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("kafka.instance_id"), "{err}");

        let mut config = IngestConfig::default();
        assert_eq!(config.kafka.session_timeout_ms(), 10_000);
        config
            .kafka
            .properties
            .insert("group.instance.id".to_owned(), "x".to_owned());
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("use kafka.instance_id"), "{err}");

        let mut config = IngestConfig::default();
        config.kafka.assignor = "range,cooperative-sticky".to_owned();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("cannot be mixed"), "{err}");
        config.kafka.assignor = "range,roundrobin".to_owned();
        config.validate().unwrap();
        config.kafka.session_timeout_ms = Some(1_000);
        assert!(config.validate().is_err());
    }

    #[test]
    fn the_dead_letter_topic_is_not_consumed() {
        let mut config = IngestConfig::default();
        config.dead_letter.topic = audit_event::topics::USERS.to_owned();
        assert!(config.validate().is_err());
    }
}
