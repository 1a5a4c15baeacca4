//! Log streams (README "Log streams"): each organization's events pushed to its SIEM. The
//! management API and CLI write a stream's settings (`manage`); the stream worker (`audit-api
//! streams`, `worker`) delivers from the stored-events topic the ingest publishes to.

pub mod deliver;
pub mod manage;
pub mod payload;
pub mod secret_box;
pub mod signing;
pub mod spec;
pub mod table;
pub mod worker;
