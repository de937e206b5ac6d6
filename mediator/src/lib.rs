//! The `mc-mediator` daemon on the third site (DESIGN §10).
//!
//! - `decide`: the sans-IO state machine that holds the authoritative epochs and the in-sync
//!   record, and grants an automatic switchover only when it is provably safe (S7);
//! - `store`: its durable state (magic, version, CRC-32, atomic replace);
//! - `config`: the TOML configuration, validated against the timer order (S11);
//! - `service`: the gRPC `Mediator` service that feeds calls to `decide` and persists before
//!   it replies;
//! - `metrics`: every Prometheus metric of the crate;
//! - `daemon`: the process (`mc-mediator`): servers, health, reflection, ticks, shutdown.
//!
//! It depends on `mc-proto` only, never on `controller`.

pub mod config;
pub mod daemon;
pub mod decide;
pub mod metrics;
pub mod model_breaks;
pub mod service;
pub mod store;
