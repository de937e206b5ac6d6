//! The `mc-mediator` daemon on the third site (DESIGN §10).
//!
//! So far: `decide`, the sans-IO state machine that holds the authoritative epochs and the
//! in-sync record, and grants an automatic switchover only when it is provably safe (S7).
//! Still to come (issue 10): the gRPC `Mediator` service with durable state, and the
//! controllers' heartbeat and self-fence (S6). It depends on `mc-proto` only, never on
//! `controller`.

pub mod decide;
