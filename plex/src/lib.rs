//! Disks, disk labels, plexes and mirrored aggregates: the storage side of SyncMirror
//! (DESIGN §6).
//!
//! So far: the `BlockDevice` trait that every disk is used through (owned, 4 KiB-aligned
//! buffers, so the same trait fits pread/pwrite, io_uring with O_DIRECT and, later, a remote
//! plex over gRPC), a pread/pwrite device, an in-memory device with injectable faults, the
//! conformance test body every device must pass, the two-copy disk label and the persistent
//! dirty bitmap. Plexes, the mirrored aggregate, resync and the io_uring device follow
//! (issue 4). This crate knows nothing of `nvlog`, `proto` or
//! the daemons, and nothing in it may assume that a disk is local.

pub mod aggregate;
pub mod bitmap;
pub mod buf;
pub mod device;
pub mod file;
pub mod label;
pub mod layout;
pub mod mem;
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
pub use plex::{Plex, PlexDisk, PlexError};
pub use types::{CpId, Epoch, Lsn, NodeId, PeerState, PlexGeneration, PlexState, ResyncLevel, Site, Uuid};
pub use uring::{DirectIo, UringDevice, UringOptions};
