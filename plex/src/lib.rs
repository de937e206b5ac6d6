//! Disks, disk labels, plexes and mirrored aggregates: the storage side of SyncMirror
//! (DESIGN §6).
//!
//! - `device`: the `BlockDevice` trait every disk is used through (owned, 4 KiB-aligned
//!   buffers, so the same trait fits pread/pwrite, io_uring with O_DIRECT and a remote plex over
//!   gRPC), with three implementations: `uring` (the production path), `file` (pread/pwrite)
//!   and `mem` (in memory, with injectable faults), and the conformance body in `testing`;
//! - `label` (two-copy disk label), `layout` (where a disk's areas go), `bitmap` (the
//!   persistent dirty bitmap), `plex` (disks concatenated, with salted per-block checksums);
//! - `aggregate`: plex 0 and plex 1 written concurrently, the drop of a plex after the mirror
//!   timeout (S3, S4), read repair, the generation rules and resync (S5);
//! - `metrics`: every counter of the crate.
//!
//! This crate knows nothing of `nvlog`, `proto` or the daemons, and nothing in it may assume
//! that a disk is local.

pub mod aggregate;
pub mod bitmap;
pub mod buf;
pub mod device;
pub mod file;
pub mod label;
pub mod layout;
pub mod mem;
pub mod metrics;
pub mod plex;
mod regions;
pub mod testing;
pub mod types;
pub mod uring;

pub use aggregate::{
    Aggregate, AggregateCounters, AggregateError, AggregateOptions, AggregateSpec, AggregateState,
    AggregateStatus, Decision, DropHook, DropReason, GenerationRule, PlexDrop, PlexStatus, ResyncProgress,
    decide, next_generation,
};
pub use bitmap::{BitmapError, DirtyBitmap};
pub use buf::AlignedBuf;
pub use device::{BLOCK_BYTES, BlockDevice, DeviceError, IoFuture};
pub use file::FileDevice;
pub use label::{CpRecord, DiskLabel, Extent, LabelCopies, LabelDefect, LabelError, read_label, write_label};
pub use mem::{MemDevice, MemFaults};
pub use metrics::PlexMetrics;
pub use plex::{Plex, PlexDisk, PlexError};
pub use types::{CpId, Epoch, Lsn, NodeId, PeerState, PlexGeneration, PlexState, ResyncLevel, Site, Uuid};
pub use uring::{DirectIo, UringDevice, UringOptions};
