//! The `mc-controller` daemon and the `mcctl` admin CLI (DESIGN §4, §8, §9, §11, §12).
//!
//! The daemon (`daemon::run`) serves the write path that acknowledges a host write only once
//! its record is persisted in the local NVLog and at every partner in the ack set (S1,
//! `write_path`, `nvlog_mirror`, `mirror_receiver`), consistency points (`cp`), aggregates whose
//! second plex is at the other site (`remote_disk`, `disk_service`, `shelf_state`), the NBD
//! export (`nbd`), and the gRPC services (`admin`, `data`), health, reflection and `/metrics`.
//! `lab` is what `mcctl lab` runs: a two-site cluster of real daemons on this machine. Later
//! issues add switchover, heal, switchback, NVFAIL and the rest of `mcctl`. It uses `nvlog`,
//! `plex` and `mc-proto`, never `mediator`.

pub mod admin;
pub mod cli;
pub mod config;
pub mod cp;
pub mod daemon;
pub mod data;
pub mod disk_service;
pub mod faults;
pub mod heal;
pub mod lab;
pub mod lease;
pub mod mediator_link;
pub mod mirror_admin;
pub mod mirror_receiver;
pub mod model_breaks;
pub mod nbd;
pub mod node;
pub mod nvfail;
pub mod nvlog_mirror;
pub mod operations;
pub mod peer;
pub mod plex_monitor;
pub mod remote_disk;
pub mod shelf;
pub mod shelf_state;
pub mod switchover;
pub mod volume;
pub mod wire;
pub mod write_path;
