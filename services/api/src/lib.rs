//! `audit-api`: answers `GET /api/v1/organization/audit-logs` (and its streaming export) from
//! ClickHouse. The library holds all logic; `main.rs` only wires configuration, telemetry and
//! the CLI.

pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod error;
pub mod export;
pub mod keys;
pub mod log_streams;
pub mod metrics;
pub mod partitions;
pub mod query;
pub mod read_events;
pub mod render;
pub mod retention;
pub mod routes;
pub mod store;
pub mod stream;
pub mod time;

pub use app::{AppState, Application};
pub use config::ApiConfig;
