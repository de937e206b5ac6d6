//! The `mc-mediator` daemon on the third site (DESIGN §10).
//!
//! This crate is filled by the mediator issue: a gRPC `Mediator` service with durable state,
//! the leases that make a controller fence itself (S6), the authoritative epochs, and the
//! sans-IO state machine that grants an automatic switchover only when it is provably safe
//! (S7). It depends on `mc-proto` only, never on `controller`.
