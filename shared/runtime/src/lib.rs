//! Process plumbing both services share: telemetry set-up, layered configuration
//! (defaults, then an optional file, then environment) and shutdown signals.

pub mod kafka;
pub mod metrics;
pub mod ops;
pub mod settings;
pub mod shutdown;
pub mod telemetry;
pub mod tls;

pub use settings::{load_settings, SettingsError};

/// A service's exit: on error, the error chain on stderr (never a backtrace, whatever
/// `RUST_BACKTRACE` says) and a failure code.
pub fn exit_code(service: &str, result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{service}: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
pub use telemetry::{init as init_telemetry, LogFormat, TelemetryConfig, TelemetryGuard};
