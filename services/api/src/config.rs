//! The typed configuration of `audit-api`: defaults, then a TOML file, then environment
//! variables `AUDIT_API__<SECTION>__<KEY>`. Every field is listed in the README.

use std::path::Path;

use audit_runtime::{load_settings, SettingsError, TelemetryConfig};
use audit_store::ClickHouseConfig;
use serde::Deserialize;

pub const ENV_PREFIX: &str = "AUDIT_API";

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Where events are read from; see [`ClickHouseConfig`].
    pub clickhouse: ClickHouseConfig,
    /// Logs and traces.
    pub telemetry: TelemetryConfig,
}

impl ApiConfig {
    /// Loads and validates the configuration; `file` is an optional TOML file.
    pub fn load(file: Option<&Path>) -> Result<Self, SettingsError> {
        let config: Self = load_settings(ENV_PREFIX, file, &[])?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), SettingsError> {
        self.clickhouse
            .validate()
            .map_err(|err| SettingsError::Invalid(err.to_string()))
    }
}
