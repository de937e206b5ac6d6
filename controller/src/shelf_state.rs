//! The shelf's own durable state (DESIGN §7; S2, S3): per aggregate with disks on this shelf,
//! the highest epoch seen (the SCSI persistent-reservation high-water mark every disk write is
//! checked against, whoever sends it) and the last plex drop its owner recorded here.
//!
//! The file is `<shelf>/.shelf-state`, replaced atomically (written to a temporary file,
//! fsynced, renamed, directory fsynced); its layout is in `docs/formats.md`.
//!
//! Invariants:
//! - `admit` refuses an epoch below the aggregate's high-water mark; a higher one is durable
//!   in the file before `admit` returns, so no write of a new epoch completes before its mark is
//!   persisted;
//! - the mark only rises, in memory and in the file; a file that fails its checks is an error
//!   at open (the shelf is not served), never silently replaced by an empty one;
//! - changes are serialized: two raises never race to the file.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use plex::{Epoch, NodeId, Uuid};

const MAGIC: [u8; 8] = *b"MCSHELF1";
const VERSION: u32 = 1;
/// Bytes of the header: magic, version, entry count, cluster id, node id, reserved.
const HEADER_BYTES: usize = 40;
/// Bytes of one entry.
const ENTRY_BYTES: usize = 48;
/// The file name in the shelf directory (a dot file: never taken for a disk).
pub const FILE_NAME: &str = ".shelf-state";
/// More aggregates than any shelf holds; bounds what a damaged count can make us allocate.
const MAX_ENTRIES: usize = 1 << 16;

/// A plex drop recorded here by the aggregate's owner (S3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordedDrop {
    /// The plex dropped.
    pub plex: u8,
    /// 0 timeout, 1 failed, 2 out of date.
    pub reason: u8,
    /// The survivor's generation after the drop.
    pub survivor_generation: u64,
}

/// What the shelf knows of one aggregate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AggregateMarks {
    /// The highest epoch seen.
    pub epoch: Epoch,
    /// The last drop recorded, if any.
    pub drop: Option<RecordedDrop>,
    /// The operator paused the aggregate's mirror (`mcctl mirror pause`): the plex at the
    /// other site stays detached until `mirror resume` (kept in a byte older files leave 0).
    pub paused: bool,
}

/// Why the state could not be read, admitted or written.
#[derive(Debug, thiserror::Error)]
pub enum ShelfStateError {
    /// The file is damaged.
    #[error("shelf state {path}: {reason}")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The file could not be read or written.
    #[error("shelf state {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// An epoch below the high-water mark (S2).
    #[error(
        "stale epoch {got_number}@node{got_owner} for aggregate {aggregate}: the high-water mark is {hwm_number}@node{hwm_owner}"
    )]
    Stale {
        /// The aggregate, in hex.
        aggregate: String,
        /// The epoch presented.
        got_number: u64,
        /// Its owner.
        got_owner: u32,
        /// The mark.
        hwm_number: u64,
        /// Its owner.
        hwm_owner: u32,
    },
}

/// Whose shelf a state file belongs to: a file of another cluster or node is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShelfOwner {
    /// The cluster.
    pub cluster: [u8; 16],
    /// The node serving the shelf.
    pub node: u32,
}

/// The state, shared by the DiskService and this node's own plex writes.
#[derive(Debug)]
pub struct ShelfState {
    path: PathBuf,
    owner: ShelfOwner,
    /// What the file holds.
    marks: Mutex<BTreeMap<Uuid, AggregateMarks>>,
    /// Marks seen in labels at open (durable there, not necessarily in the file).
    observed: Mutex<BTreeMap<Uuid, Epoch>>,
    /// Serializes file replacements.
    writer: tokio::sync::Mutex<()>,
    /// Held shared by every DiskService write and flush from its epoch check to its answer, and
    /// exclusively by `admit_exclusive`: a partner's write that passed the check before a
    /// switchover raised the mark cannot land after it (S2).
    io_gate: tokio::sync::RwLock<()>,
}

fn encode(owner: ShelfOwner, marks: &BTreeMap<Uuid, AggregateMarks>) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + marks.len() * ENTRY_BYTES + 4);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&u32::try_from(marks.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(&owner.cluster);
    out.extend_from_slice(&owner.node.to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    for (uuid, mark) in marks {
        out.extend_from_slice(&uuid.0);
        out.extend_from_slice(&mark.epoch.number.to_le_bytes());
        out.extend_from_slice(&mark.epoch.owner.0.to_le_bytes());
        let (present, plex, reason, generation) = match mark.drop {
            Some(d) => (1u8, d.plex, d.reason, d.survivor_generation),
            None => (0, 0, 0, 0),
        };
        out.extend_from_slice(&[present, plex, reason, u8::from(mark.paused)]);
        out.extend_from_slice(&generation.to_le_bytes());
        out.extend_from_slice(&[0u8; 8]);
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

fn decode(owner: ShelfOwner, bytes: &[u8]) -> Result<BTreeMap<Uuid, AggregateMarks>, String> {
    if bytes.len() < HEADER_BYTES + 4 {
        return Err(format!("{} bytes is too short", bytes.len()));
    }
    if bytes[..8] != MAGIC {
        return Err("bad magic".into());
    }
    let version = le_u32(bytes, 8);
    if version != VERSION {
        return Err(format!("unsupported version {version}"));
    }
    let count = usize::try_from(le_u32(bytes, 12)).unwrap_or(usize::MAX);
    if count > MAX_ENTRIES || bytes.len() != HEADER_BYTES + count * ENTRY_BYTES + 4 {
        return Err(format!("{count} entries do not fit {} bytes", bytes.len()));
    }
    let body = bytes.len() - 4;
    if crc32fast::hash(&bytes[..body]) != le_u32(bytes, body) {
        return Err("CRC mismatch".into());
    }
    let (cluster, node) = (&bytes[16..32], le_u32(bytes, 32));
    if cluster != owner.cluster || node != owner.node {
        return Err(format!(
            "the file belongs to node {node} of cluster {}, not to node {} of cluster {}",
            crate::node::hex(cluster),
            owner.node,
            crate::node::hex(&owner.cluster)
        ));
    }
    let mut marks = BTreeMap::new();
    for i in 0..count {
        let at = HEADER_BYTES + i * ENTRY_BYTES;
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&bytes[at..at + 16]);
        let epoch = Epoch { number: le_u64(bytes, at + 16), owner: NodeId(le_u32(bytes, at + 24)) };
        let flags = &bytes[at + 28..at + 32];
        let drop = match flags[0] {
            0 => None,
            1 => Some(RecordedDrop {
                plex: flags[1],
                reason: flags[2],
                survivor_generation: le_u64(bytes, at + 32),
            }),
            other => return Err(format!("entry {i}: drop flag {other}")),
        };
        let paused = match flags[3] {
            0 => false,
            1 => true,
            other => return Err(format!("entry {i}: pause flag {other}")),
        };
        if marks.insert(Uuid(uuid), AggregateMarks { epoch, drop, paused }).is_some() {
            return Err(format!("entry {i}: aggregate listed twice"));
        }
    }
    Ok(marks)
}

/// Lower-case hex of an aggregate uuid.
fn hex(uuid: Uuid) -> String {
    crate::node::hex(&uuid.0)
}

impl ShelfState {
    /// Opens the state of the shelf at `dir` served by `owner` (a missing file is an empty
    /// state; the directory is created; a file of another cluster or node is refused).
    pub fn open(dir: &Path, owner: ShelfOwner) -> Result<Arc<ShelfState>, ShelfStateError> {
        let path = dir.join(FILE_NAME);
        let io = |source| ShelfStateError::Io { path: path.display().to_string(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        let marks = match std::fs::read(&path) {
            Ok(bytes) => decode(owner, &bytes)
                .map_err(|reason| ShelfStateError::Corrupt { path: path.display().to_string(), reason })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(io(e)),
        };
        Ok(Arc::new(ShelfState {
            path,
            owner,
            marks: Mutex::new(marks),
            observed: Mutex::new(BTreeMap::new()),
            writer: tokio::sync::Mutex::new(()),
            io_gate: tokio::sync::RwLock::new(()),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Uuid, AggregateMarks>> {
        self.marks.lock().expect("the shelf state lock holder panicked")
    }

    /// What the shelf knows of `aggregate`: the file's entry, its epoch raised to any mark
    /// observed in a label.
    pub fn marks(&self, aggregate: Uuid) -> AggregateMarks {
        let mut marks = self.lock().get(&aggregate).copied().unwrap_or_default();
        marks.epoch = marks.epoch.max(self.observed(aggregate));
        marks
    }

    /// Every aggregate's mark (the file's, raised to any observed in a label).
    pub fn all(&self) -> Vec<(Uuid, Epoch)> {
        let mut marks: BTreeMap<Uuid, Epoch> = self.lock().iter().map(|(uuid, m)| (*uuid, m.epoch)).collect();
        for (uuid, epoch) in self.observed.lock().expect("the observed lock holder panicked").iter() {
            let entry = marks.entry(*uuid).or_default();
            *entry = (*entry).max(*epoch);
        }
        marks.into_iter().collect()
    }

    /// `all` as the wire carries it (hellos and keepalive replies, S2).
    pub fn wire_epochs(&self) -> Vec<mc_proto::v1::AggregateEpoch> {
        self.all().into_iter().map(|(uuid, epoch)| crate::wire::aggregate_epoch(uuid, epoch)).collect()
    }

    fn observed(&self, aggregate: Uuid) -> Epoch {
        self.observed
            .lock()
            .expect("the observed lock holder panicked")
            .get(&aggregate)
            .copied()
            .unwrap_or_default()
    }

    /// The high-water mark of `aggregate` is at least `epoch` (from a label read at open): in
    /// memory only, since the label that holds it is durable already.
    pub fn observe(&self, aggregate: Uuid, epoch: Epoch) {
        let mut observed = self.observed.lock().expect("the observed lock holder panicked");
        let entry = observed.entry(aggregate).or_default();
        *entry = (*entry).max(epoch);
    }

    fn stale(aggregate: Uuid, got: Epoch, mark: Epoch) -> ShelfStateError {
        ShelfStateError::Stale {
            aggregate: hex(aggregate),
            got_number: got.number,
            got_owner: got.owner.0,
            hwm_number: mark.number,
            hwm_owner: mark.owner.0,
        }
    }

    /// Checks `epoch` against the mark (S2): a lower one is refused; a higher one becomes the
    /// mark, durably, before this returns.
    pub async fn admit(&self, aggregate: Uuid, epoch: Epoch) -> Result<(), ShelfStateError> {
        let mark = self.marks(aggregate).epoch;
        if !admits(mark, epoch) {
            return Err(ShelfState::stale(aggregate, epoch, mark));
        }
        let on_file = self.lock().get(&aggregate).map(|m| m.epoch);
        if on_file.is_some_and(|on_file| epoch <= on_file) {
            return Ok(());
        }
        let observed = self.observed(aggregate);
        self.update(aggregate, |entry| {
            let mark = entry.epoch.max(observed);
            if !admits(mark, epoch) {
                return Err(ShelfState::stale(aggregate, epoch, mark));
            }
            entry.epoch = entry.epoch.max(epoch);
            Ok(())
        })
        .await
    }

    /// Held shared from a DiskService call's epoch check to its answer (see `io_gate`).
    pub async fn io_guard(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.io_gate.read().await
    }

    /// `admit` once no DiskService write or flush is in progress: when it returns, every
    /// partner write at a lower epoch has either completed or will be refused (a switchover's
    /// raise, DESIGN §11 step 2).
    pub async fn admit_exclusive(&self, aggregate: Uuid, epoch: Epoch) -> Result<(), ShelfStateError> {
        let _gate = self.io_gate.write().await;
        self.admit(aggregate, epoch).await
    }

    /// Records a plex drop of `aggregate`, durably, after `admit`ting `epoch`.
    pub async fn record_drop(
        &self,
        aggregate: Uuid,
        epoch: Epoch,
        drop: RecordedDrop,
    ) -> Result<(), ShelfStateError> {
        self.admit(aggregate, epoch).await?;
        self.update(aggregate, |mark| {
            mark.drop = Some(drop);
            Ok(())
        })
        .await
    }

    /// Persists whether the operator paused the aggregate's mirror.
    pub async fn set_paused(&self, aggregate: Uuid, paused: bool) -> Result<(), ShelfStateError> {
        self.update(aggregate, |mark| {
            mark.paused = paused;
            Ok(())
        })
        .await
    }

    async fn update(
        &self,
        aggregate: Uuid,
        change: impl FnOnce(&mut AggregateMarks) -> Result<(), ShelfStateError>,
    ) -> Result<(), ShelfStateError> {
        let _writer = self.writer.lock().await;
        let mut next = self.lock().clone();
        change(next.entry(aggregate).or_default())?;
        let bytes = encode(self.owner, &next);
        let path = self.path.clone();
        let written = tokio::task::spawn_blocking(move || replace_file(&path, &bytes))
            .await
            .map_err(|e| std::io::Error::other(format!("shelf state task: {e}")))
            .and_then(|r| r);
        written.map_err(|source| ShelfStateError::Io { path: self.path.display().to_string(), source })?;
        *self.lock() = next;
        Ok(())
    }
}

/// S2's epoch gate, sans IO: `epoch` may be used against a shelf whose mark is `mark` unless it
/// is lower (stale); a higher one then becomes the mark. Every record, hello, disk write and
/// switchover step passes here (`ShelfState::admit`), and so does the model checker.
pub fn admits(mark: Epoch, epoch: Epoch) -> bool {
    epoch >= mark || crate::model_breaks::active(crate::model_breaks::Break::AcceptStaleEpoch)
}

/// Replaces `path` with `bytes` atomically and durably.
pub(crate) fn replace_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

    use super::*;

    const OWNER: ShelfOwner = ShelfOwner { cluster: [9; 16], node: 2 };

    fn epoch(number: u64, owner: u32) -> Epoch {
        Epoch { number, owner: NodeId(owner) }
    }

    #[tokio::test]
    async fn marks_only_rise_survive_reopen_and_refuse_stale_epochs() {
        let dir = tempfile::tempdir().unwrap();
        let state = ShelfState::open(dir.path(), OWNER).unwrap();
        let aggr = Uuid([3; 16]);
        state.admit(aggr, epoch(1, 1)).await.unwrap();
        state.admit(aggr, epoch(2, 1)).await.unwrap();
        let stale = state.admit(aggr, epoch(1, 1)).await.unwrap_err();
        assert!(matches!(stale, ShelfStateError::Stale { .. }), "{stale}");
        let drop = RecordedDrop { plex: 1, reason: 0, survivor_generation: 4 };
        state.record_drop(aggr, epoch(2, 1), drop).await.unwrap();
        // A mark seen only in a label refuses lower epochs without being written.
        let other = Uuid([4; 16]);
        state.observe(other, epoch(7, 2));
        assert!(state.admit(other, epoch(6, 2)).await.is_err());
        state.set_paused(aggr, true).await.unwrap();
        let reopened = ShelfState::open(dir.path(), OWNER).unwrap();
        assert_eq!(
            reopened.marks(aggr),
            AggregateMarks { epoch: epoch(2, 1), drop: Some(drop), paused: true }
        );
        reopened.set_paused(aggr, false).await.unwrap();
        assert!(!ShelfState::open(dir.path(), OWNER).unwrap().marks(aggr).paused);
        assert!(reopened.admit(aggr, epoch(1, 9)).await.is_err());
        assert_eq!(reopened.marks(other), AggregateMarks::default());
    }

    #[test]
    fn damage_is_detected_and_garbage_never_panics() {
        let mut marks = BTreeMap::new();
        marks.insert(Uuid([1; 16]), AggregateMarks { epoch: epoch(3, 2), drop: None, paused: true });
        let bytes = encode(OWNER, &marks);
        assert_eq!(decode(OWNER, &bytes).unwrap(), marks);
        // Another node's or another cluster's file is refused.
        assert!(decode(ShelfOwner { node: 3, ..OWNER }, &bytes).is_err());
        assert!(decode(ShelfOwner { cluster: [8; 16], ..OWNER }, &bytes).is_err());
        for at in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x10;
            assert!(decode(OWNER, &damaged).is_err(), "a flip at byte {at} went unnoticed");
        }
        for len in 0..bytes.len() {
            assert!(decode(OWNER, &bytes[..len]).is_err());
        }
        let mut seed = 1u64;
        for _ in 0..2000 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let len = usize::try_from(seed >> 54).unwrap();
            let garbage: Vec<u8> = (0..len).map(|i| (seed >> (i % 56)) as u8).collect();
            let _ = decode(OWNER, &garbage);
        }
    }

    #[test]
    fn a_corrupt_file_is_an_error_not_an_empty_state() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), b"not a shelf state").unwrap();
        assert!(matches!(ShelfState::open(dir.path(), OWNER), Err(ShelfStateError::Corrupt { .. })));
    }
}
