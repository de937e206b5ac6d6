//! Domain numbers of the journal, as newtypes (STYLE 12).
//!
//! Invariants:
//! - a writer's `Lsn`s only increase, across log generations and reformats, starting at 1;
//! - a log's `Generation` only increases: at format and at every open;
//! - a partition's `partition_generation` only increases: whenever it is reset.

use std::fmt;

/// Log sequence number of one writer node. 0 means "none".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// No record: every real lsn is above it.
    pub const ZERO: Lsn = Lsn(0);

    /// The lsn that follows this one, saturating at the end of the lsn space (the journal
    /// never hands out the last lsn; use `checked_next` where that matters).
    pub fn next(self) -> Lsn {
        Lsn(self.0.saturating_add(1))
    }

    /// The lsn that follows this one, or `None` at the end of the lsn space.
    pub fn checked_next(self) -> Option<Lsn> {
        self.0.checked_add(1).map(Lsn)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A log generation (an incarnation of one node's log). It salts every record's CRC-32, so a
/// record of an incarnation the header does not list is never replayed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Generation(pub u64);

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A controller's node id. 0 is never a valid node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u32);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The cluster's 128-bit id.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClusterId(pub [u8; 16]);

/// An aggregate's 128-bit uuid.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AggregateId(pub [u8; 16]);

/// A volume of an aggregate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VolumeId(pub u32);

/// An aggregate's ownership stamp (DESIGN §7), ordered by number, then owner node id.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch {
    /// Raised by every change of owner.
    pub number: u64,
    /// The node that holds the aggregate at this epoch.
    pub owner: NodeId,
}

/// Which node a log belongs to, and in which cluster. Opening a log of another identity is
/// refused (recovery row "foreign node or cluster id").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    /// The cluster this node belongs to.
    pub cluster: ClusterId,
    /// The node that owns the log file.
    pub node: NodeId,
}

/// What a record does to its volume range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum OpKind {
    /// Write the payload at `offset`; the payload length equals the range length.
    Write = 1,
    /// Discard the range; no payload.
    Trim = 2,
    /// Write zeroes over the range; no payload.
    WriteZeroes = 3,
}

impl OpKind {
    pub(crate) fn from_u16(value: u16) -> Option<OpKind> {
        match value {
            1 => Some(OpKind::Write),
            2 => Some(OpKind::Trim),
            3 => Some(OpKind::WriteZeroes),
            _ => None,
        }
    }
}

/// The four partitions of DESIGN §5. A 2-node configuration uses `Local` and `DrPartner`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u32)]
pub enum PartitionKind {
    /// This node's own records.
    Local = 1,
    /// The records of the HA partner (same site).
    HaPartner = 2,
    /// The records of the DR partner (other site).
    DrPartner = 3,
    /// The records of the DR partner's HA partner while it is taken over.
    DrAuxiliary = 4,
}

impl PartitionKind {
    /// Every kind, in table order.
    pub const ALL: [PartitionKind; 4] = [
        PartitionKind::Local,
        PartitionKind::HaPartner,
        PartitionKind::DrPartner,
        PartitionKind::DrAuxiliary,
    ];

    pub(crate) fn from_u32(value: u32) -> Option<PartitionKind> {
        match value {
            1 => Some(PartitionKind::Local),
            2 => Some(PartitionKind::HaPartner),
            3 => Some(PartitionKind::DrPartner),
            4 => Some(PartitionKind::DrAuxiliary),
            _ => None,
        }
    }

    /// The name used in logs, metrics and the docs.
    pub fn name(self) -> &'static str {
        match self {
            PartitionKind::Local => "local",
            PartitionKind::HaPartner => "ha_partner",
            PartitionKind::DrPartner => "dr_partner",
            PartitionKind::DrAuxiliary => "dr_auxiliary",
        }
    }
}

impl fmt::Display for PartitionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The receiver's own account of a writer's mirror (S13), persisted in the header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum MirrorState {
    /// Not a mirror partition (the local one), or never mirrored.
    #[default]
    None = 0,
    /// Holds every unreleased record of the writer.
    InSync = 1,
    /// Has stopped receiving; must not be trusted for a switchover without NVFAIL.
    OutOfSync = 2,
    /// Re-established at the writer's next lsn; in sync only after the covering CP (§4.2).
    Resyncing = 3,
    /// The writer is known to be down.
    Offline = 4,
}

impl MirrorState {
    pub(crate) fn from_u32(value: u32) -> Option<MirrorState> {
        match value {
            0 => Some(MirrorState::None),
            1 => Some(MirrorState::InSync),
            2 => Some(MirrorState::OutOfSync),
            3 => Some(MirrorState::Resyncing),
            4 => Some(MirrorState::Offline),
            _ => None,
        }
    }
}

/// When an append counts as durable (`nvlog.durability`, DESIGN §5).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Durability {
    /// Durable once copied into the mapping: survives `kill -9`, not power loss.
    #[default]
    Process,
    /// Durable once `msync(MS_SYNC)` returned; concurrent appends share one msync.
    Power,
}
