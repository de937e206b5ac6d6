//! The mediator's durable state (DESIGN §10): `decide::State` and whether it is still being
//! rebuilt (rule 5), in `<state_dir>/mediator.state`.
//!
//! The file is replaced atomically: written to `mediator.state.tmp`, fsynced, renamed over the
//! old one, and the directory fsynced. Layout (little-endian, fixed-width; also in `docs/formats.md`):
//!
//! | Offset | Size | Field |
//! |---|---|---|
//! | 0 | 8 | magic `MCMEDST1` |
//! | 8 | 4 | format version (1) |
//! | 12 | 4 | flags: bit 0 set while the state is lost and not yet rebuilt (rule 5); others zero |
//! | 16 | 16 | cluster id |
//! | 32 | 8 | state version |
//! | 40 | 4 | aggregate count A |
//! | 44 | 4 | grant count G |
//! | 48 | 4 | applied-stamp count N |
//! | 52 | 4 | body length L in bytes (everything between the header and the CRC) |
//! | 56 | L | body: A aggregate entries by uuid, G grants in order, N stamps by node |
//! | 56 + L | 4 | CRC-32 of every byte before it |
//!
//! Aggregate entry, 56 bytes: uuid (16), epoch number (8), epoch owner (4), owner's word
//! present (1: 0 or 1), owner's mirror state (1), owner's plexes normal (1: 0 or 1), receiver's
//! word present (1: 0 or 1), owner's receiver generation (8), receiver's partition generation
//! (8), receiver's mirror state (1), mirror intact (1: 0 or 1; S8), zero (6). An absent word
//! has all its fields zero. Mirror states: 1 in_sync, 2 out_of_sync, 3 resyncing (as in
//! `common.proto`). A file written before the mirror-intact byte existed holds zero there:
//! no mirror is intact until it is in sync again (the safe reading).
//!
//! Grant, 16 + 32 × M bytes: survivor node (4), lost site (1: 0 is A, 1 is B), automatic (1),
//! NVFAIL (1), zero (1), epoch count M (4), zero (4); then per epoch: aggregate uuid (16),
//! number (8), owner (4), zero (4).
//!
//! Applied stamp, 24 bytes: node (4), zero (4), log generation (8), sequence (8).
//!
//! Invariants:
//! - a file that fails any check (magic, version, flags, identity, lengths, CRC, an enum or
//!   flag out of range, a reserved byte not zero, entries out of order) is an error, never an
//!   empty state; a missing file is `None` (the daemon then starts with its state lost);
//! - the encoding is canonical: `decode(encode(x)) == x`, and every accepted file re-encodes to
//!   the same bytes;
//! - after a failed write the store is latched failed (S10): it refuses every later write
//!   until the daemon restarts, so a reply never follows a state that may not be durable.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::decide::{AggregateId, AggregateRecord, Epoch, Grant, MirrorState, NodeId, Site, State};

const MAGIC: [u8; 8] = *b"MCMEDST1";
const FORMAT_VERSION: u32 = 1;
/// Flags bit: the state is lost and not yet rebuilt (rule 5).
const FLAG_LOST: u32 = 1;
/// Bytes of the header.
const HEADER_BYTES: usize = 56;
/// Bytes of one aggregate entry.
const AGGREGATE_BYTES: usize = 56;
/// Bytes of a grant before its epochs.
const GRANT_BYTES: usize = 16;
/// Bytes of one epoch of a grant.
const GRANT_EPOCH_BYTES: usize = 32;
/// Bytes of one applied stamp.
const STAMP_BYTES: usize = 24;
/// Bytes of the CRC.
const CRC_BYTES: usize = 4;
/// A state file larger than this is damaged (far more aggregates than any cluster holds); it
/// bounds what a damaged file makes us read.
pub const MAX_FILE_BYTES: u64 = 64 << 20;
/// The file name in the state directory.
pub const FILE_NAME: &str = "mediator.state";

const _: () = assert!(HEADER_BYTES == 8 + 4 + 4 + 16 + 8 + 4 * 4);
const _: () = assert!(AGGREGATE_BYTES == 16 + 8 + 4 + 4 + 8 + 8 + 1 + 1 + 6);
const _: () = assert!(GRANT_BYTES == 4 + 4 + 4 + 4 && GRANT_EPOCH_BYTES == 16 + 8 + 4 + 4);
const _: () = assert!(STAMP_BYTES == 4 + 4 + 8 + 8);

/// What the file holds.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Stored {
    /// The decision core's durable state.
    pub state: State,
    /// The state was lost and not yet rebuilt when written (rule 5).
    pub lost: bool,
}

/// Why the state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file is damaged or belongs to another cluster.
    #[error("mediator state {path}: {reason}")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The file could not be read or written.
    #[error("mediator state {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// An earlier write failed: nothing more is written until the daemon restarts (S10).
    #[error(
        "mediator state {path}: an earlier write failed; restart the mediator once the state directory works"
    )]
    Failed {
        /// The file.
        path: String,
    },
}

/// The state file of one mediator.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    cluster: [u8; 16],
    failed: AtomicBool,
}

impl Store {
    /// The store in `state_dir` of the mediator of `cluster` (nothing is touched yet).
    pub fn new(state_dir: &Path, cluster: [u8; 16]) -> Store {
        Store { path: state_dir.join(FILE_NAME), cluster, failed: AtomicBool::new(false) }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    /// Whether an earlier write failed (the store is latched).
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Reads the file: `None` when there is none; an error when it is damaged, belongs to
    /// another cluster, or cannot be read.
    pub fn load(&self) -> Result<Option<Stored>, StoreError> {
        let io = |source| StoreError::Io { path: self.describe(), source };
        let file = match std::fs::File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        let size = file.metadata().map_err(io)?.len();
        if size > MAX_FILE_BYTES {
            return Err(StoreError::Corrupt {
                path: self.describe(),
                reason: format!("{size} bytes is more than a state file holds ({MAX_FILE_BYTES})"),
            });
        }
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_FILE_BYTES + 1), &mut bytes)
            .map_err(io)?;
        decode(self.cluster, &bytes)
            .map(Some)
            .map_err(|reason| StoreError::Corrupt { path: self.describe(), reason })
    }

    /// Replaces the file with `state` and `lost`, durably (blocking: call it off the async
    /// threads). A failure latches the store.
    pub fn save(&self, state: &State, lost: bool) -> Result<(), StoreError> {
        if self.is_failed() {
            return Err(StoreError::Failed { path: self.describe() });
        }
        let bytes = encode(self.cluster, state, lost);
        replace_file(&self.path, &bytes).map_err(|source| {
            self.failed.store(true, Ordering::Release);
            StoreError::Io { path: self.describe(), source }
        })
    }
}

/// Replaces `path` with `bytes` atomically and durably: temporary file, fsync, rename,
/// directory fsync.
fn replace_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

fn count(n: usize) -> [u8; 4] {
    // Counts beyond u32 cannot be built: the message size limit bounds reports, and so the
    // aggregates, grants and nodes a mediator can learn.
    u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes()
}

fn mirror_byte(state: MirrorState) -> u8 {
    match state {
        MirrorState::InSync => 1,
        MirrorState::OutOfSync => 2,
        MirrorState::Resyncing => 3,
    }
}

fn mirror_from(byte: u8) -> Option<MirrorState> {
    match byte {
        1 => Some(MirrorState::InSync),
        2 => Some(MirrorState::OutOfSync),
        3 => Some(MirrorState::Resyncing),
        _ => None,
    }
}

/// The file's bytes for `state` of the mediator of `cluster`.
pub fn encode(cluster: [u8; 16], state: &State, lost: bool) -> Vec<u8> {
    let mut body = Vec::new();
    for (id, record) in &state.aggregates {
        body.extend_from_slice(&id.0);
        body.extend_from_slice(&record.epoch.number.to_le_bytes());
        body.extend_from_slice(&record.epoch.owner.0.to_le_bytes());
        let (owner_present, owner_state, plexes_normal, owner_generation) = match record.owner_says {
            Some((state, generation, normal)) => (1u8, mirror_byte(state), u8::from(normal), generation),
            None => (0, 0, 0, 0),
        };
        let (receiver_present, receiver_state, receiver_generation) = match record.receiver_says {
            Some((state, generation)) => (1u8, mirror_byte(state), generation),
            None => (0, 0, 0),
        };
        body.extend_from_slice(&[owner_present, owner_state, plexes_normal, receiver_present]);
        body.extend_from_slice(&owner_generation.to_le_bytes());
        body.extend_from_slice(&receiver_generation.to_le_bytes());
        body.push(receiver_state);
        body.push(u8::from(record.mirror_intact));
        body.extend_from_slice(&[0u8; 6]);
    }
    for grant in &state.grants {
        body.extend_from_slice(&grant.to.0.to_le_bytes());
        body.extend_from_slice(&[grant.from.0, u8::from(grant.automatic), u8::from(grant.nvfail), 0]);
        body.extend_from_slice(&count(grant.epochs.len()));
        body.extend_from_slice(&[0u8; 4]);
        for (id, epoch) in &grant.epochs {
            body.extend_from_slice(&id.0);
            body.extend_from_slice(&epoch.number.to_le_bytes());
            body.extend_from_slice(&epoch.owner.0.to_le_bytes());
            body.extend_from_slice(&[0u8; 4]);
        }
    }
    for (node, (generation, sequence)) in &state.applied {
        body.extend_from_slice(&node.0.to_le_bytes());
        body.extend_from_slice(&[0u8; 4]);
        body.extend_from_slice(&generation.to_le_bytes());
        body.extend_from_slice(&sequence.to_le_bytes());
    }
    let mut out = Vec::with_capacity(HEADER_BYTES + body.len() + CRC_BYTES);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(if lost { FLAG_LOST } else { 0 }).to_le_bytes());
    out.extend_from_slice(&cluster);
    out.extend_from_slice(&state.version.to_le_bytes());
    out.extend_from_slice(&count(state.aggregates.len()));
    out.extend_from_slice(&count(state.grants.len()));
    out.extend_from_slice(&count(state.applied.len()));
    out.extend_from_slice(&count(body.len()));
    out.extend_from_slice(&body);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// A bounds-checked reader over the body: every read past the end is an error, never a panic.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|end| *end <= self.bytes.len());
        let Some(end) = end else {
            return Err(format!(
                "{what}: the body ends at byte {}, before byte {}",
                self.bytes.len(),
                self.at.saturating_add(n)
            ));
        };
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn zero(&mut self, n: usize, what: &str) -> Result<(), String> {
        if self.take(n, what)?.iter().any(|b| *b != 0) {
            return Err(format!("{what}: reserved bytes are not zero"));
        }
        Ok(())
    }

    fn flag(&mut self, what: &str) -> Result<bool, String> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(format!("{what}: {other} is neither 0 nor 1")),
        }
    }
}

fn usize_of(n: u32) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// Reads the file's bytes, checking everything; the error says what is wrong.
pub fn decode(cluster: [u8; 16], bytes: &[u8]) -> Result<Stored, String> {
    if bytes.len() < HEADER_BYTES + CRC_BYTES {
        return Err(format!("{} bytes is too short for a state file", bytes.len()));
    }
    let mut header = Reader { bytes: &bytes[..HEADER_BYTES], at: 0 };
    if header.array::<8>("magic")? != MAGIC {
        return Err("bad magic: not a mediator state file".into());
    }
    let version = header.u32("format version")?;
    if version != FORMAT_VERSION {
        return Err(format!("unsupported format version {version}"));
    }
    let flags = header.u32("flags")?;
    if flags & !FLAG_LOST != 0 {
        return Err(format!("unknown flags {flags:#x}"));
    }
    let file_cluster = header.array::<16>("cluster id")?;
    let state_version = header.u64("state version")?;
    let aggregates = usize_of(header.u32("aggregate count")?);
    let grants = usize_of(header.u32("grant count")?);
    let stamps = usize_of(header.u32("stamp count")?);
    let body_bytes = usize_of(header.u32("body length")?);
    if Some(bytes.len()) != HEADER_BYTES.checked_add(body_bytes).and_then(|n| n.checked_add(CRC_BYTES)) {
        return Err(format!("the header says {body_bytes} body bytes, the file has {} bytes", bytes.len()));
    }
    let crc_at = bytes.len() - CRC_BYTES;
    let mut stored_crc = [0u8; 4];
    stored_crc.copy_from_slice(&bytes[crc_at..]);
    if crc32fast::hash(&bytes[..crc_at]) != u32::from_le_bytes(stored_crc) {
        return Err("CRC mismatch".into());
    }
    if file_cluster != cluster {
        return Err(format!(
            "the file belongs to cluster {}, not to cluster {}",
            hex(&file_cluster),
            hex(&cluster)
        ));
    }
    // Checked before anything is allocated: fixed-size entries must fit the body.
    let fixed = aggregates
        .checked_mul(AGGREGATE_BYTES)
        .zip(grants.checked_mul(GRANT_BYTES))
        .zip(stamps.checked_mul(STAMP_BYTES))
        .and_then(|((a, g), s)| a.checked_add(g)?.checked_add(s));
    if fixed.is_none_or(|fixed| fixed > body_bytes) {
        return Err(format!(
            "{aggregates} aggregates, {grants} grants and {stamps} stamps do not fit {body_bytes} body bytes"
        ));
    }
    let mut body = Reader { bytes: &bytes[HEADER_BYTES..crc_at], at: 0 };
    let mut state = State { version: state_version, ..State::default() };
    for i in 0..aggregates {
        let what = format!("aggregate {i}");
        let id = AggregateId(body.array::<16>(&what)?);
        let epoch = Epoch { number: body.u64(&what)?, owner: NodeId(body.u32(&what)?) };
        let owner_present = body.flag(&what)?;
        let owner_state = body.u8(&what)?;
        let plexes_normal = body.flag(&what)?;
        let receiver_present = body.flag(&what)?;
        let owner_generation = body.u64(&what)?;
        let receiver_generation = body.u64(&what)?;
        let receiver_state = body.u8(&what)?;
        let mirror_intact = body.flag(&what)?;
        body.zero(6, &what)?;
        let owner_says = if owner_present {
            let state = mirror_from(owner_state)
                .ok_or_else(|| format!("{what}: owner's mirror state {owner_state}"))?;
            Some((state, owner_generation, plexes_normal))
        } else if owner_state != 0 || plexes_normal || owner_generation != 0 {
            return Err(format!("{what}: an absent owner's word with fields set"));
        } else {
            None
        };
        let receiver_says = if receiver_present {
            let state = mirror_from(receiver_state)
                .ok_or_else(|| format!("{what}: receiver's mirror state {receiver_state}"))?;
            Some((state, receiver_generation))
        } else if receiver_state != 0 || receiver_generation != 0 {
            return Err(format!("{what}: an absent receiver's word with fields set"));
        } else {
            None
        };
        if state.aggregates.last_key_value().is_some_and(|(last, _)| *last >= id) {
            return Err(format!("{what}: out of order or listed twice"));
        }
        state.aggregates.insert(id, AggregateRecord { epoch, owner_says, receiver_says, mirror_intact });
    }
    for i in 0..grants {
        let what = format!("grant {i}");
        let to = NodeId(body.u32(&what)?);
        let from = match body.u8(&what)? {
            site @ (0 | 1) => Site(site),
            other => return Err(format!("{what}: site {other}")),
        };
        let automatic = body.flag(&what)?;
        let nvfail = body.flag(&what)?;
        body.zero(1, &what)?;
        let epochs = usize_of(body.u32(&what)?);
        body.zero(4, &what)?;
        // Bounded by the body before anything is allocated.
        if epochs.checked_mul(GRANT_EPOCH_BYTES).is_none_or(|n| n > body.bytes.len() - body.at) {
            return Err(format!("{what}: {epochs} epochs do not fit the body"));
        }
        let mut list = Vec::with_capacity(epochs);
        for j in 0..epochs {
            let what = format!("grant {i} epoch {j}");
            let id = AggregateId(body.array::<16>(&what)?);
            let epoch = Epoch { number: body.u64(&what)?, owner: NodeId(body.u32(&what)?) };
            body.zero(4, &what)?;
            list.push((id, epoch));
        }
        state.grants.push(Grant { to, from, epochs: list, automatic, nvfail });
    }
    let mut applied = BTreeMap::new();
    for i in 0..stamps {
        let what = format!("stamp {i}");
        let node = NodeId(body.u32(&what)?);
        body.zero(4, &what)?;
        let stamp = (body.u64(&what)?, body.u64(&what)?);
        if applied.last_key_value().is_some_and(|(last, _)| *last >= node) {
            return Err(format!("{what}: out of order or listed twice"));
        }
        applied.insert(node, stamp);
    }
    state.applied = applied;
    if body.at != body.bytes.len() {
        return Err(format!("{} bytes follow the last entry", body.bytes.len() - body.at));
    }
    Ok(Stored { state, lost: flags & FLAG_LOST != 0 })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const CLUSTER: [u8; 16] = [0x5a; 16];

    fn epoch(number: u64, owner: u32) -> Epoch {
        Epoch { number, owner: NodeId(owner) }
    }

    /// A state with every kind of field set, absent words included.
    fn sample() -> State {
        let mut state = State { version: 42, ..State::default() };
        state.aggregates.insert(
            AggregateId([1; 16]),
            AggregateRecord {
                epoch: epoch(3, 1),
                owner_says: Some((MirrorState::InSync, 9, true)),
                receiver_says: Some((MirrorState::Resyncing, 9)),
                mirror_intact: true,
            },
        );
        state.aggregates.insert(
            AggregateId([2; 16]),
            AggregateRecord {
                epoch: epoch(7, 2),
                owner_says: None,
                receiver_says: None,
                mirror_intact: false,
            },
        );
        state.aggregates.insert(
            AggregateId([3; 16]),
            AggregateRecord {
                epoch: epoch(1, 1),
                owner_says: Some((MirrorState::OutOfSync, 0, false)),
                receiver_says: None,
                mirror_intact: false,
            },
        );
        state.grants.push(Grant {
            to: NodeId(2),
            from: Site(0),
            epochs: vec![(AggregateId([1; 16]), epoch(4, 2)), (AggregateId([3; 16]), epoch(2, 2))],
            automatic: true,
            nvfail: false,
        });
        state.grants.push(Grant {
            to: NodeId(1),
            from: Site(1),
            epochs: vec![],
            automatic: false,
            nvfail: true,
        });
        state.applied.insert(NodeId(1), (5, 100));
        state.applied.insert(NodeId(2), (u64::MAX, 1));
        state
    }

    /// Prevents a field that is written but not read back (or read into the wrong place).
    #[test]
    fn round_trip_keeps_everything() {
        for lost in [false, true] {
            let bytes = encode(CLUSTER, &sample(), lost);
            assert_eq!(decode(CLUSTER, &bytes).unwrap(), Stored { state: sample(), lost });
        }
        let empty = encode(CLUSTER, &State::default(), true);
        assert_eq!(empty.len(), HEADER_BYTES + CRC_BYTES);
        assert_eq!(decode(CLUSTER, &empty).unwrap(), Stored { state: State::default(), lost: true });
    }

    /// Prevents a damaged file from being taken for a state (rule 5 then applies instead).
    #[test]
    fn every_bit_flip_and_every_truncation_is_refused() {
        let bytes = encode(CLUSTER, &sample(), false);
        for at in 0..bytes.len() {
            for bit in 0..8 {
                let mut damaged = bytes.clone();
                damaged[at] ^= 1 << bit;
                assert!(
                    decode(CLUSTER, &damaged).is_err(),
                    "a flip of bit {bit} at byte {at} went unnoticed"
                );
            }
        }
        for len in 0..bytes.len() {
            assert!(decode(CLUSTER, &bytes[..len]).is_err(), "a file cut at {len} bytes was accepted");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode(CLUSTER, &longer).is_err());
    }

    /// Prevents a state file of another cluster (a copied directory) from being used.
    #[test]
    fn another_clusters_file_is_refused() {
        let bytes = encode(CLUSTER, &sample(), false);
        let error = decode([1; 16], &bytes).unwrap_err();
        assert!(error.contains("cluster"), "{error}");
    }

    /// Checks that fields the CRC covers are checked on their own too: a file written by a
    /// buggy or foreign writer with a valid CRC is still refused when a value is out of range.
    #[test]
    fn values_out_of_range_are_refused_even_with_a_good_crc() {
        let bytes = encode(CLUSTER, &sample(), false);
        let reseal = |mut b: Vec<u8>| {
            let at = b.len() - CRC_BYTES;
            let crc = crc32fast::hash(&b[..at]);
            b[at..].copy_from_slice(&crc.to_le_bytes());
            b
        };
        assert_eq!(decode(CLUSTER, &reseal(bytes.clone())).unwrap().state, sample());
        let first = HEADER_BYTES;
        let cases: [(usize, u8, &str); 8] = [
            (12, 2, "unknown flag"),
            (first + 28, 2, "owner flag 2"),
            (first + 29, 9, "owner mirror state 9"),
            (first + 48, 0, "present receiver with state 0"),
            (first + 49, 2, "mirror intact flag 2"),
            (first + 50, 1, "reserved byte"),
            // The second aggregate has no owner's word: a state byte there is refused.
            (first + AGGREGATE_BYTES + 29, 1, "absent owner with a state"),
            // The first grant's site.
            (first + 3 * AGGREGATE_BYTES + 4, 2, "site 2"),
        ];
        for (at, value, what) in cases {
            let mut damaged = bytes.clone();
            damaged[at] = value;
            assert!(decode(CLUSTER, &reseal(damaged)).is_err(), "{what} was accepted");
        }
        // Entries out of order.
        let mut swapped = bytes.clone();
        let (a, b) = (first, first + AGGREGATE_BYTES);
        let second: Vec<u8> = swapped[b..b + AGGREGATE_BYTES].to_vec();
        let first_entry: Vec<u8> = swapped[a..a + AGGREGATE_BYTES].to_vec();
        swapped[a..a + AGGREGATE_BYTES].copy_from_slice(&second);
        swapped[b..b + AGGREGATE_BYTES].copy_from_slice(&first_entry);
        assert!(decode(CLUSTER, &reseal(swapped)).is_err(), "aggregates out of order were accepted");
        // Counts that claim more than the body holds.
        let mut counted = bytes;
        counted[40..44].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(CLUSTER, &reseal(counted)).is_err());
    }

    /// Prevents a panic (or a huge allocation) on garbage. Prints its seed; re-run with
    /// `STORE_GARBAGE_SEED`.
    #[test]
    fn garbage_never_panics() {
        let seed: u64 =
            std::env::var("STORE_GARBAGE_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.subsec_nanos().into())
                    .unwrap_or(1)
            });
        println!("STORE_GARBAGE_SEED={seed}");
        let mut x = seed | 1;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let good = encode(CLUSTER, &sample(), false);
        for round in 0..20_000 {
            let len = usize::try_from(next() % 600).unwrap();
            let mut bytes: Vec<u8> = (0..len).map(|_| next().to_le_bytes()[0]).collect();
            if round % 2 == 0 && len >= HEADER_BYTES {
                // A valid header with garbage after it reaches the body checks.
                bytes[..HEADER_BYTES].copy_from_slice(&good[..HEADER_BYTES]);
                let body = u32::try_from(len - HEADER_BYTES - CRC_BYTES.min(len - HEADER_BYTES)).unwrap();
                bytes[52..56].copy_from_slice(&body.to_le_bytes());
                if len >= HEADER_BYTES + CRC_BYTES {
                    let at = len - CRC_BYTES;
                    let crc = crc32fast::hash(&bytes[..at]);
                    bytes[at..].copy_from_slice(&crc.to_le_bytes());
                }
            }
            let _ = decode(CLUSTER, &bytes);
        }
    }

    /// Prevents a damaged file from being read as "no state" and then overwritten silently.
    #[test]
    fn load_tells_missing_from_damaged_and_save_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path(), CLUSTER);
        assert!(store.load().unwrap().is_none());
        store.save(&sample(), true).unwrap();
        assert_eq!(store.load().unwrap(), Some(Stored { state: sample(), lost: true }));
        store.save(&State::default(), false).unwrap();
        assert_eq!(store.load().unwrap(), Some(Stored::default()));
        assert!(!dir.path().join("mediator.state.tmp").exists());
        std::fs::write(store.path(), b"garbage").unwrap();
        assert!(matches!(store.load(), Err(StoreError::Corrupt { .. })));
    }

    /// Prevents a write after a failed one (S10): the store stays failed.
    #[test]
    fn a_failed_write_latches_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path(), CLUSTER);
        // A non-empty directory where the file goes: the rename fails, even for root.
        std::fs::create_dir_all(store.path().join("in-the-way")).unwrap();
        assert!(matches!(store.save(&sample(), false), Err(StoreError::Io { .. })));
        assert!(store.is_failed());
        std::fs::remove_dir_all(store.path()).unwrap();
        assert!(matches!(store.save(&sample(), false), Err(StoreError::Failed { .. })));
        assert!(store.load().unwrap().is_none());
    }
}
