//! `audit-api`: answers `GET /api/v1/organization/audit-logs` from ClickHouse.
//! The library holds all logic; `main.rs` only wires configuration, telemetry and the CLI.

pub mod cli;
pub mod config;

pub use config::ApiConfig;
