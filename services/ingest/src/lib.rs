//! `audit-ingest`: consumes audit events from Kafka and writes them into ClickHouse.
//! The library holds all logic; `main.rs` only wires configuration, telemetry and the CLI.
//!
//! Stages: [`batch`] (decode, accumulate) -> [`flush`] (directory, ClickHouse, dead letters)
//! -> [`pipeline`] (commit offsets); [`app`] wires them with [`kafka`], [`sink`] and [`http`].

pub mod app;
pub mod batch;
pub mod cli;
pub mod config;
pub mod dead_letter;
pub mod directory;
pub mod flush;
pub mod http;
pub mod kafka;
pub mod liveness;
pub mod loadgen;
pub mod metrics;
pub mod pipeline;
pub mod replay;
pub mod sink;

pub use app::Application;
pub use config::IngestConfig;
