//! The errors of the journal. Callers match on them; nothing here is a panic.

use std::io;

use crate::header::HeaderDefect;
use crate::record::RecordDefect;
use crate::types::{ClusterId, Generation, Lsn, NodeId, PartitionKind};

/// Every way an NVLog operation can fail.
#[derive(Debug, thiserror::Error)]
pub enum NvlogError {
    /// The media failed; the log is now latched as failed (S10).
    #[error("NVLog media I/O error during {op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// An earlier write or persist failed: appends are refused until the log is reopened (S10).
    #[error("the NVLog failed after an I/O error and refuses writes until it is reopened")]
    Failed,
    /// Recovery found corruption before the tail of this partition (S8 applies).
    #[error("NVLog partition {0} is failed: reset it after recovering its records from a partner")]
    PartitionFailed(PartitionKind),
    /// The log has no such partition.
    #[error("this NVLog has no {0} partition")]
    NoPartition(PartitionKind),
    /// The record is malformed.
    #[error("invalid NVLog record: {0}")]
    InvalidRecord(#[from] RecordDefect),
    /// A record read back verifies but is not the one recovery indexed at that place: the
    /// media changed under the open log (nothing of it is replayed).
    #[error("NVLog partition {kind}: the record at the place of lsn {indexed} now holds lsn {found}")]
    IndexMismatch {
        /// The partition.
        kind: PartitionKind,
        /// The lsn recovery indexed there.
        indexed: Lsn,
        /// The lsn the media holds there now.
        found: Lsn,
    },
    /// The record cannot fit in half a partition.
    #[error("a record of {len} bytes does not fit in a half of {half} bytes")]
    RecordTooLarge {
        /// Encoded length.
        len: u64,
        /// Size of one half.
        half: u64,
    },
    /// Both halves hold unreleased records: wait for a CP to release some (back-pressure).
    #[error("NVLog partition {0} is full: both halves hold unreleased records")]
    Full(PartitionKind),
    /// A partner's record in a partition that belongs to another writer.
    #[error("record of node {got} offered to the partition of node {expected}")]
    WrongWriter {
        /// The partition's writer.
        expected: NodeId,
        /// The record's writer.
        got: NodeId,
    },
    /// A record at or below the partition's tail (duplicate or reordered).
    #[error("lsn {got} is not above the tail {tail}")]
    NotAfterTail {
        /// The record's lsn.
        got: Lsn,
        /// The partition's tail.
        tail: Lsn,
    },
    /// A gap in the writer's lsns (S13); nothing was appended.
    #[error("gap in the writer's lsns: expected {expected}, got {got}")]
    Gap {
        /// The lsn that should come next.
        expected: Lsn,
        /// The lsn that came.
        got: Lsn,
    },
    /// A record of a generation older than one the partition already holds.
    #[error("generation {got} is older than generation {newest} already held")]
    StaleGeneration {
        /// The record's generation.
        got: Generation,
        /// The newest generation held.
        newest: Generation,
    },
    /// The partition already lists the most generations it can; a CP must release some.
    #[error("NVLog partition {0} already holds records of 8 generations")]
    TooManyGenerations(PartitionKind),
    /// Neither header copy is valid (recovery row `BothHeadersBad`).
    #[error("neither NVLog header copy is valid (copy 0: {slot0}; copy 1: {slot1})")]
    NoValidHeader {
        /// Why copy 0 is invalid.
        slot0: HeaderDefect,
        /// Why copy 1 is invalid.
        slot1: HeaderDefect,
    },
    /// The log belongs to another node or cluster (recovery row `ForeignIdentity`).
    #[error(
        "the NVLog belongs to node {found_node} of cluster {found_cluster:02x?}, not to node {expected_node}"
    )]
    ForeignIdentity {
        /// The cluster in the header.
        found_cluster: ClusterId,
        /// The node in the header.
        found_node: NodeId,
        /// The node that tried to open it.
        expected_node: NodeId,
    },
    /// `persist_through` for an lsn the partition never wrote or dropped in a reset.
    #[error("lsn {lsn} of partition {kind} was never written or was dropped by a reset")]
    NotWritten {
        /// The partition.
        kind: PartitionKind,
        /// The lsn asked for.
        lsn: Lsn,
    },
    /// The lsn space of this node is used up (only a corrupt floor or header leads here).
    #[error("no lsn is left for this node")]
    LsnExhausted,
    /// The format request cannot be satisfied.
    #[error("invalid NVLog format request: {0}")]
    InvalidSpec(String),
}

/// Results of this crate.
pub type Result<T, E = NvlogError> = std::result::Result<T, E>;
