//! Process plumbing both services share: telemetry set-up, layered configuration
//! (defaults, then an optional file, then environment) and shutdown signals.

pub mod settings;
pub mod shutdown;
pub mod telemetry;

pub use settings::{load_settings, SettingsError};
pub use telemetry::{init as init_telemetry, LogFormat, TelemetryConfig, TelemetryGuard};
