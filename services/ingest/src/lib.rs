//! `audit-ingest`: consumes audit events from Kafka and writes them into ClickHouse.
//! The library holds all logic; `main.rs` only wires configuration, telemetry and the CLI.

pub mod cli;
pub mod config;

pub use config::IngestConfig;
