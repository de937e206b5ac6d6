//! The disk label (DESIGN §6.1; docs/formats.md "Disk label"): two copies, each in its own
//! 4 KiB block at the start of the disk, with a sequence number and a CRC-32.
//!
//! Invariants:
//! - the copy with sequence `s` lives in slot `s % 2`, so consecutive writes alternate slots;
//! - a label write is flushed (fdatasync) before `write_label` returns, so the other slot
//!   always holds an intact, durable copy (S12: durable before it counts);
//! - the sequence, the plex generation, the epoch high-water mark and the last CP id only
//!   increase (checked by the callers that change them, asserted here for the sequence);
//! - reserved bytes are zero and checked; every field is validated against the device.

use crate::buf::AlignedBuf;
use crate::device::{BLOCK_BYTES, BlockDevice, DeviceError};
use crate::types::{CpId, Epoch, Lsn, NodeId, PeerState, PlexGeneration, PlexState, ResyncLevel, Site, Uuid};

/// "MCDISKL1" in little-endian byte order.
pub const LABEL_MAGIC: u64 = u64::from_le_bytes(*b"MCDISKL1");
/// The label format this code reads and writes.
pub const LABEL_VERSION: u32 = 1;
/// Bytes of one label copy (the CRC covers all but its last 4).
pub const LABEL_BYTES: usize = 256;
/// Copy 0 is at byte 0, copy 1 at `LABEL_SLOT_BYTES`; areas of the disk start after both.
pub const LABEL_SLOT_BYTES: u64 = BLOCK_BYTES;
/// The first byte after the two label copies.
pub const LABEL_AREA_BYTES: u64 = 2 * LABEL_SLOT_BYTES;

mod field {
    use std::ops::Range;
    pub const MAGIC: Range<usize> = 0..8;
    pub const VERSION: Range<usize> = 8..12;
    pub const LABEL_BYTES: Range<usize> = 12..16;
    pub const SEQUENCE: Range<usize> = 16..24;
    pub const CLUSTER: Range<usize> = 24..40;
    pub const DISK: Range<usize> = 40..56;
    pub const SITE: usize = 56;
    pub const POOL: usize = 57;
    pub const PLEX_INDEX: usize = 58;
    pub const PLEX_STATE: usize = 59;
    pub const RESYNC_LEVEL: usize = 60;
    pub const PEER_STATE: usize = 61;
    pub const RESERVED_A: Range<usize> = 62..64;
    pub const SIZE: Range<usize> = 64..72;
    pub const OWNER: Range<usize> = 72..76;
    pub const HOME_OWNER: Range<usize> = 76..80;
    pub const DR_HOME_OWNER: Range<usize> = 80..84;
    pub const REGION_BYTES: Range<usize> = 84..88;
    pub const AGGREGATE: Range<usize> = 88..104;
    pub const PLEX_GENERATION: Range<usize> = 104..112;
    pub const PEER_SYNC_GENERATION: Range<usize> = 112..120;
    pub const EPOCH_NUMBER: Range<usize> = 120..128;
    pub const EPOCH_OWNER: Range<usize> = 128..132;
    pub const CP_WRITER: Range<usize> = 132..136;
    pub const CP_ID: Range<usize> = 136..144;
    pub const CP_LOG_GENERATION: Range<usize> = 144..152;
    pub const CP_LAST_LSN: Range<usize> = 152..160;
    pub const RESYNC_NEXT_REGION: Range<usize> = 160..168;
    pub const BITMAP: Range<usize> = 168..184;
    pub const CHECKSUMS: Range<usize> = 184..200;
    pub const DATA: Range<usize> = 200..216;
    pub const RESERVED_B: Range<usize> = 216..252;
    pub const CRC: Range<usize> = 252..256;
}
const _: () = assert!(field::CRC.end == LABEL_BYTES);
const _: () = assert!(LABEL_BYTES as u64 <= LABEL_SLOT_BYTES);

/// A byte range of the disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Extent {
    /// First byte.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl Extent {
    fn end(&self) -> Option<u64> {
        self.offset.checked_add(self.len)
    }
}

/// What the last CP recorded on this plex covers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpRecord {
    /// The CP's id.
    pub id: CpId,
    /// The controller that wrote it.
    pub writer: NodeId,
    /// That controller's NVLog generation.
    pub log_generation: u64,
    /// The last lsn of that controller the CP covers (S8).
    pub last_lsn: Lsn,
}

/// One disk's label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskLabel {
    /// Raised by every label write; picks the newer copy.
    pub sequence: u64,
    /// The cluster the disk belongs to.
    pub cluster: Uuid,
    /// This disk.
    pub disk: Uuid,
    /// The site the disk is at.
    pub site: Site,
    /// 0 at the owner's site, 1 at the other.
    pub pool: u8,
    /// The disk's size; must equal the device's.
    pub size_bytes: u64,
    /// The controller that owns the aggregate now.
    pub owner: NodeId,
    /// The controller that owns it when there is no takeover.
    pub home_owner: NodeId,
    /// The original owner, kept during a switchover.
    pub dr_home_owner: NodeId,
    /// The aggregate this disk's plex belongs to.
    pub aggregate: Uuid,
    /// 0 or 1.
    pub plex_index: u8,
    /// This plex's state.
    pub plex_state: PlexState,
    /// What this plex recorded about its peer (`OutOfDate` after a drop).
    pub peer_state: PeerState,
    /// This plex's current generation.
    pub plex_generation: PlexGeneration,
    /// The generation both plexes shared when last in sync.
    pub peer_sync_generation: PlexGeneration,
    /// The highest epoch seen for the aggregate; lower ones are refused (DESIGN §7).
    pub epoch_high_water: Epoch,
    /// The last CP recorded on this plex.
    pub last_cp: CpRecord,
    /// Bytes per dirty-bitmap region (a power of two, at least 4 KiB).
    pub region_bytes: u32,
    /// Where the persistent dirty bitmap lives.
    pub bitmap: Extent,
    /// Where the per-block CRC-32s live.
    pub checksums: Extent,
    /// Where data blocks live.
    pub data: Extent,
}

/// Why a label copy is unusable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LabelDefect {
    /// Every byte is zero: never written.
    #[error("blank")]
    Blank,
    /// Not a label.
    #[error("bad magic")]
    BadMagic,
    /// A version this code does not read.
    #[error("unsupported label version {0}")]
    Version(u32),
    /// The CRC-32 does not match.
    #[error("CRC mismatch")]
    BadCrc,
    /// A field is out of range or inconsistent.
    #[error("invalid field: {0}")]
    BadField(&'static str),
}

/// Why a label cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    /// The device failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// Neither copy is valid: a new or replaced disk (both blank) or a destroyed label. Such a
    /// disk is only ever the target of a full resync (DESIGN §6.4, seed 002).
    #[error("no valid disk label (copy 0: {slot0}; copy 1: {slot1})")]
    NoValidLabel {
        /// Why copy 0 is unusable.
        slot0: LabelDefect,
        /// Why copy 1 is unusable.
        slot1: LabelDefect,
    },
}

impl LabelError {
    /// Whether the disk has never been labelled (both copies all zero).
    pub fn is_blank(&self) -> bool {
        matches!(self, LabelError::NoValidLabel { slot0: LabelDefect::Blank, slot1: LabelDefect::Blank })
    }
}

fn u32_at(bytes: &[u8], range: std::ops::Range<usize>) -> u32 {
    u32::from_le_bytes(bytes[range].try_into().expect("4 bytes"))
}
fn u64_at(bytes: &[u8], range: std::ops::Range<usize>) -> u64 {
    u64::from_le_bytes(bytes[range].try_into().expect("8 bytes"))
}

const STATE_NORMAL: u8 = 1;
const STATE_FAILED: u8 = 2;
const STATE_OUT_OF_DATE: u8 = 3;
const STATE_RESYNCING: u8 = 4;

fn state_code(state: PlexState) -> (u8, u8, u64) {
    match state {
        PlexState::Normal => (STATE_NORMAL, 0, 0),
        PlexState::Failed => (STATE_FAILED, 0, 0),
        PlexState::OutOfDate => (STATE_OUT_OF_DATE, 0, 0),
        PlexState::Resyncing { level: ResyncLevel::Full, next_region } => (STATE_RESYNCING, 1, next_region),
        PlexState::Resyncing { level: ResyncLevel::Incremental, next_region } => {
            (STATE_RESYNCING, 2, next_region)
        }
    }
}

fn decode_state(code: u8, level: u8, next_region: u64) -> Result<PlexState, LabelDefect> {
    let plain = |state| {
        if level == 0 && next_region == 0 {
            Ok(state)
        } else {
            Err(LabelDefect::BadField("resync fields of a plex that is not resyncing"))
        }
    };
    match (code, level) {
        (STATE_NORMAL, _) => plain(PlexState::Normal),
        (STATE_FAILED, _) => plain(PlexState::Failed),
        (STATE_OUT_OF_DATE, _) => plain(PlexState::OutOfDate),
        (STATE_RESYNCING, 1) => Ok(PlexState::Resyncing { level: ResyncLevel::Full, next_region }),
        (STATE_RESYNCING, 2) => Ok(PlexState::Resyncing { level: ResyncLevel::Incremental, next_region }),
        _ => Err(LabelDefect::BadField("plex state")),
    }
}

impl DiskLabel {
    /// The slot this copy is written to.
    pub fn slot(&self) -> u64 {
        self.sequence % 2
    }

    /// Encodes the label with its CRC.
    pub fn encode(&self) -> [u8; LABEL_BYTES] {
        let mut out = [0u8; LABEL_BYTES];
        let put32 = |out: &mut [u8; LABEL_BYTES], range: std::ops::Range<usize>, v: u32| {
            out[range].copy_from_slice(&v.to_le_bytes());
        };
        let put64 = |out: &mut [u8; LABEL_BYTES], range: std::ops::Range<usize>, v: u64| {
            out[range].copy_from_slice(&v.to_le_bytes());
        };
        put64(&mut out, field::MAGIC, LABEL_MAGIC);
        put32(&mut out, field::VERSION, LABEL_VERSION);
        put32(&mut out, field::LABEL_BYTES, 256);
        put64(&mut out, field::SEQUENCE, self.sequence);
        out[field::CLUSTER].copy_from_slice(&self.cluster.0);
        out[field::DISK].copy_from_slice(&self.disk.0);
        out[field::SITE] = self.site as u8;
        out[field::POOL] = self.pool;
        out[field::PLEX_INDEX] = self.plex_index;
        let (state, level, next_region) = state_code(self.plex_state);
        out[field::PLEX_STATE] = state;
        out[field::RESYNC_LEVEL] = level;
        out[field::PEER_STATE] = match self.peer_state {
            PeerState::Normal => STATE_NORMAL,
            PeerState::Failed => STATE_FAILED,
            PeerState::OutOfDate => STATE_OUT_OF_DATE,
            PeerState::Resyncing => STATE_RESYNCING,
        };
        put64(&mut out, field::SIZE, self.size_bytes);
        put32(&mut out, field::OWNER, self.owner.0);
        put32(&mut out, field::HOME_OWNER, self.home_owner.0);
        put32(&mut out, field::DR_HOME_OWNER, self.dr_home_owner.0);
        put32(&mut out, field::REGION_BYTES, self.region_bytes);
        out[field::AGGREGATE].copy_from_slice(&self.aggregate.0);
        put64(&mut out, field::PLEX_GENERATION, self.plex_generation.0);
        put64(&mut out, field::PEER_SYNC_GENERATION, self.peer_sync_generation.0);
        put64(&mut out, field::EPOCH_NUMBER, self.epoch_high_water.number);
        put32(&mut out, field::EPOCH_OWNER, self.epoch_high_water.owner.0);
        put32(&mut out, field::CP_WRITER, self.last_cp.writer.0);
        put64(&mut out, field::CP_ID, self.last_cp.id.0);
        put64(&mut out, field::CP_LOG_GENERATION, self.last_cp.log_generation);
        put64(&mut out, field::CP_LAST_LSN, self.last_cp.last_lsn.0);
        put64(&mut out, field::RESYNC_NEXT_REGION, next_region);
        for (range, extent) in
            [(field::BITMAP, self.bitmap), (field::CHECKSUMS, self.checksums), (field::DATA, self.data)]
        {
            put64(&mut out, range.start..range.start + 8, extent.offset);
            put64(&mut out, range.start + 8..range.end, extent.len);
        }
        let crc = crc32fast::hash(&out[..field::CRC.start]);
        put32(&mut out, field::CRC, crc);
        out
    }

    /// Decodes and validates the copy read from `slot` of a device of `device_bytes`.
    pub fn decode(bytes: &[u8], slot: u64, device_bytes: u64) -> Result<DiskLabel, LabelDefect> {
        if bytes.len() < LABEL_BYTES {
            return Err(LabelDefect::BadField("short label"));
        }
        let bytes = &bytes[..LABEL_BYTES];
        if bytes.iter().all(|&b| b == 0) {
            return Err(LabelDefect::Blank);
        }
        if u64_at(bytes, field::MAGIC) != LABEL_MAGIC {
            return Err(LabelDefect::BadMagic);
        }
        let version = u32_at(bytes, field::VERSION);
        if version != LABEL_VERSION {
            return Err(LabelDefect::Version(version));
        }
        if crc32fast::hash(&bytes[..field::CRC.start]) != u32_at(bytes, field::CRC) {
            return Err(LabelDefect::BadCrc);
        }
        if u32_at(bytes, field::LABEL_BYTES) != 256 {
            return Err(LabelDefect::BadField("label size"));
        }
        if bytes[field::RESERVED_A].iter().chain(&bytes[field::RESERVED_B]).any(|&b| b != 0) {
            return Err(LabelDefect::BadField("reserved bytes are not zero"));
        }
        let sequence = u64_at(bytes, field::SEQUENCE);
        if sequence % 2 != slot {
            return Err(LabelDefect::BadField("sequence does not belong to this slot"));
        }
        let site = match bytes[field::SITE] {
            1 => Site::A,
            2 => Site::B,
            _ => return Err(LabelDefect::BadField("site")),
        };
        let (pool, plex_index) = (bytes[field::POOL], bytes[field::PLEX_INDEX]);
        if pool > 1 || plex_index > 1 {
            return Err(LabelDefect::BadField("pool or plex index"));
        }
        let next_region = u64_at(bytes, field::RESYNC_NEXT_REGION);
        let plex_state = decode_state(bytes[field::PLEX_STATE], bytes[field::RESYNC_LEVEL], next_region)?;
        let peer_state = match bytes[field::PEER_STATE] {
            STATE_NORMAL => PeerState::Normal,
            STATE_FAILED => PeerState::Failed,
            STATE_OUT_OF_DATE => PeerState::OutOfDate,
            STATE_RESYNCING => PeerState::Resyncing,
            _ => return Err(LabelDefect::BadField("peer state")),
        };
        let extent = |range: std::ops::Range<usize>| Extent {
            offset: u64_at(bytes, range.start..range.start + 8),
            len: u64_at(bytes, range.start + 8..range.end),
        };
        let label = DiskLabel {
            sequence,
            cluster: Uuid(bytes[field::CLUSTER].try_into().expect("16 bytes")),
            disk: Uuid(bytes[field::DISK].try_into().expect("16 bytes")),
            site,
            pool,
            size_bytes: u64_at(bytes, field::SIZE),
            owner: NodeId(u32_at(bytes, field::OWNER)),
            home_owner: NodeId(u32_at(bytes, field::HOME_OWNER)),
            dr_home_owner: NodeId(u32_at(bytes, field::DR_HOME_OWNER)),
            aggregate: Uuid(bytes[field::AGGREGATE].try_into().expect("16 bytes")),
            plex_index,
            plex_state,
            peer_state,
            plex_generation: PlexGeneration(u64_at(bytes, field::PLEX_GENERATION)),
            peer_sync_generation: PlexGeneration(u64_at(bytes, field::PEER_SYNC_GENERATION)),
            epoch_high_water: Epoch {
                number: u64_at(bytes, field::EPOCH_NUMBER),
                owner: NodeId(u32_at(bytes, field::EPOCH_OWNER)),
            },
            last_cp: CpRecord {
                id: CpId(u64_at(bytes, field::CP_ID)),
                writer: NodeId(u32_at(bytes, field::CP_WRITER)),
                log_generation: u64_at(bytes, field::CP_LOG_GENERATION),
                last_lsn: Lsn(u64_at(bytes, field::CP_LAST_LSN)),
            },
            region_bytes: u32_at(bytes, field::REGION_BYTES),
            bitmap: extent(field::BITMAP),
            checksums: extent(field::CHECKSUMS),
            data: extent(field::DATA),
        };
        label.check(device_bytes)?;
        Ok(label)
    }

    /// Checks the fields against each other and against a device of `device_bytes`.
    pub fn check(&self, device_bytes: u64) -> Result<(), LabelDefect> {
        if self.size_bytes != device_bytes {
            return Err(LabelDefect::BadField("size differs from the device"));
        }
        if self.owner.0 == 0 || self.home_owner.0 == 0 || self.dr_home_owner.0 == 0 {
            return Err(LabelDefect::BadField("owner node 0"));
        }
        if !self.region_bytes.is_power_of_two() || u64::from(self.region_bytes) < BLOCK_BYTES {
            return Err(LabelDefect::BadField("region size"));
        }
        if self.peer_sync_generation > self.plex_generation {
            return Err(LabelDefect::BadField("peer-sync generation above the plex generation"));
        }
        let mut extents = [self.bitmap, self.checksums, self.data];
        for extent in extents {
            let end = extent.end().ok_or(LabelDefect::BadField("extent overflows"))?;
            if extent.offset < LABEL_AREA_BYTES
                || !extent.offset.is_multiple_of(BLOCK_BYTES)
                || !extent.len.is_multiple_of(BLOCK_BYTES)
                || extent.len == 0
                || end > device_bytes
            {
                return Err(LabelDefect::BadField("extent outside the disk or misaligned"));
            }
        }
        extents.sort_by_key(|extent| extent.offset);
        if extents.windows(2).any(|pair| pair[0].offset + pair[0].len > pair[1].offset) {
            return Err(LabelDefect::BadField("extents overlap"));
        }
        Ok(())
    }
}

/// Which copy a read used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LabelCopies {
    /// Both copies valid; the newer one is used.
    BothValid,
    /// One copy is unusable (a torn label write); the valid one is used.
    OneValid,
}

/// Reads both copies and returns the newer valid one.
pub async fn read_label(
    device: &(impl BlockDevice + ?Sized),
) -> Result<(DiskLabel, LabelCopies), LabelError> {
    let size = device.size_bytes();
    let (result, buf) =
        device.read(0, AlignedBuf::zeroed(usize::try_from(LABEL_AREA_BYTES).expect("8 KiB"))).await;
    result?;
    let slot_bytes = usize::try_from(LABEL_SLOT_BYTES).expect("4 KiB");
    let copy0 = DiskLabel::decode(&buf.as_slice()[..slot_bytes], 0, size);
    let copy1 = DiskLabel::decode(&buf.as_slice()[slot_bytes..], 1, size);
    match (copy0, copy1) {
        (Ok(a), Ok(b)) => Ok((if a.sequence > b.sequence { a } else { b }, LabelCopies::BothValid)),
        (Ok(valid), Err(_)) | (Err(_), Ok(valid)) => Ok((valid, LabelCopies::OneValid)),
        (Err(slot0), Err(slot1)) => Err(LabelError::NoValidLabel { slot0, slot1 }),
    }
}

/// Writes `label` with the next sequence number into the older slot and flushes it; on return
/// the new label is durable and `label.sequence` is the one written.
pub async fn write_label(
    device: &(impl BlockDevice + ?Sized),
    label: &mut DiskLabel,
) -> Result<(), LabelError> {
    let mut next = label.clone();
    next.sequence = match label.sequence.checked_add(1) {
        Some(sequence) => sequence,
        // Only a corrupt label that still passed its CRC gets here; never wrap the sequence.
        None => {
            let defect = LabelDefect::BadField("sequence number exhausted");
            return Err(LabelError::NoValidLabel { slot0: defect, slot1: defect });
        }
    };
    if let Err(defect) = next.check(device.size_bytes()) {
        return Err(LabelError::NoValidLabel { slot0: defect, slot1: defect });
    }
    let mut buf = AlignedBuf::zeroed(usize::try_from(LABEL_SLOT_BYTES).expect("4 KiB"));
    buf.as_mut_slice()[..LABEL_BYTES].copy_from_slice(&next.encode());
    let (result, _) = device.write(next.slot() * LABEL_SLOT_BYTES, buf).await;
    result?;
    device.flush().await?;
    *label = next;
    Ok(())
}
