//! The `mc-controller` daemon and the `mcctl` admin CLI (DESIGN §4, §8, §9, §11).
//!
//! So far: `admin` (the `Admin` service's `Status`), `config` (the validated TOML configuration with the timer rules of DESIGN §10.1)
//! and `daemon` (`run`: the NVLog opened or formatted, `grpc.health.v1`, reflection,
//! `/metrics`, a clean stop on SIGTERM). The controller issues add the write path that
//! acknowledges a host write only once its record is persisted in the local NVLog and at every
//! partner in the ack set (S1), consistency points, the NBD export, the other gRPC services,
//! switchover, heal, switchback and NVFAIL. It uses `nvlog`, `plex` and `mc-proto`, never
//! `mediator`.

pub mod admin;
pub mod config;
pub mod cp;
pub mod daemon;
pub mod data;
pub mod disk_service;
pub mod faults;
pub mod mirror_receiver;
pub mod nbd;
pub mod node;
pub mod nvlog_mirror;
pub mod peer;
pub mod plex_monitor;
pub mod remote_disk;
pub mod shelf;
pub mod shelf_state;
pub mod volume;
pub mod wire;
pub mod write_path;
