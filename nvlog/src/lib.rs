//! The NVLog: a persistent-memory write journal in a memory-mapped file (DESIGN §5).
//!
//! A controller journals every host write here before it acknowledges it (S1), mirrors the
//! same record bytes to its partners, which keep them in their partner partitions, and frees
//! the space after a consistency point has put the data on the plexes (`release`). After a
//! crash or a switchover the records are replayed in lsn order, filtered as S8 says.
//!
//! Invariants of the whole crate:
//! - lsns of one writer only increase, across generations and reformats; log generations only
//!   increase; release points only increase;
//! - an acknowledged (durable) record is replayed intact after any crash the durability mode
//!   covers; a record that fails its CRC is never replayed;
//! - after a failed write or persist the log refuses writes until reopened (S10);
//! - data from the media is never a reason to panic: it is an error value or a recovery case.
//!
//! The layout is documented as tables in `docs/formats.md`; `recovery::RECOVERY_TABLE` is
//! the recovery decision table.

mod error;
pub mod header;
mod log;
pub mod media;
pub mod mem;
pub mod record;
pub mod recovery;
pub mod types;

pub use error::{NvlogError, Result};
#[cfg(feature = "fault-injection")]
pub use log::Faults;
pub use log::{FormatSpec, LsnGap, Nvlog, Options, PartitionStatus, Replay, ReplayFilter, Stats, lsn_gaps};
pub use media::{Media, MmapMedia};
pub use record::{MAX_PAYLOAD_BYTES, Record, RecordDefect, RecordHeader, RecordInput, encode_record};
pub use recovery::{Action, Case, PartitionRecovery, RecoveryReport};
pub use types::{
    AggregateId, ClusterId, Durability, Epoch, Generation, Identity, Lsn, MirrorState, NodeId, OpKind,
    PartitionKind, VolumeId,
};
