//! The `mc-controller` daemon and the `mcctl` admin CLI (DESIGN §4, §8, §9, §11).
//!
//! This crate is filled by the controller issues: the write path that acknowledges a host
//! write only once its record is persisted in the local NVLog and at every partner in the
//! ack set (S1), consistency points, the NBD export, the gRPC services, switchover, heal,
//! switchback and NVFAIL. It uses `nvlog`, `plex` and `mc-proto`, never `mediator`.
