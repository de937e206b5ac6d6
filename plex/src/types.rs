//! Domain numbers of the storage side, as newtypes (STYLE 12). `plex` knows nothing of
//! `nvlog`; the controller converts between the two.
//!
//! Invariants: a plex generation, an epoch and a CP id only increase; a label's sequence
//! number only increases.

/// A controller's node id; 0 is never a node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u32);

/// A 128-bit id (cluster, disk, aggregate).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Uuid(pub [u8; 16]);

/// An aggregate's ownership stamp (DESIGN §7), ordered by number, then owner.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch {
    /// Raised by every change of owner.
    pub number: u64,
    /// The node holding the aggregate at this epoch.
    pub owner: NodeId,
}

/// A plex generation (DESIGN §6.4): a plex starts a new one on its first write after its peer
/// was dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PlexGeneration(pub u64);

/// A consistency point's id, per aggregate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CpId(pub u64);

/// An NVLog lsn, as recorded by a CP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

/// A site.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Site {
    /// Site A.
    A = 1,
    /// Site B.
    B = 2,
}

/// A plex's state, as ONTAP shows it (DESIGN §6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PlexState {
    /// In sync and usable.
    Normal,
    /// Unusable (I/O errors).
    Failed,
    /// Dropped; holds an older image than its peer.
    OutOfDate,
    /// Being resynced; never a source, a switchover target or a read source until complete (S5).
    Resyncing {
        /// Full or incremental.
        level: ResyncLevel,
        /// The persistent resume point: the next region to copy.
        next_region: u64,
    },
}

/// How much a resync copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResyncLevel {
    /// Every region.
    Full,
    /// The regions dirty in the bitmap.
    Incremental,
}

/// What a plex's label records about its peer: the state alone, without resync progress
/// (the peer's own label holds that).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PeerState {
    /// In sync.
    Normal,
    /// Unusable.
    Failed,
    /// Dropped: this plex has moved on without it.
    OutOfDate,
    /// Being resynced from this plex.
    Resyncing,
}
