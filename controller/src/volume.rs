//! The volume table of an aggregate (DESIGN §4, §12): which volumes are carved out of it, where
//! each starts and how large it is. It lives in the aggregate's first 128 KiB, written through
//! the aggregate (so it is mirrored to both plexes and checksummed like any data block), in two
//! 64 KiB slots with sequence numbers: an update writes the older slot and flushes, so a torn
//! update leaves the other slot intact. The byte layout is in `docs/formats.md`.
//!
//! Invariants:
//! - decoding never panics on any bytes; a slot that fails any check is ignored, and a table
//!   with no valid slot is an error (the aggregate is then not served), never an empty table;
//! - volumes never overlap each other or the table, and start on a 1 MiB boundary;
//! - volume ids are never reused within an aggregate (records name volumes by id, S8): removing
//!   a volume leaves `next_id` as it is;
//! - an entry's flags hold only the bits below (`FLAGS_KNOWN`); 0, the value of every table
//!   written before NVFAIL existed, means `nvfail on` (S9's default), no `dr_force_nvfail`, not
//!   NVFAILed. A slot with an unknown flag bit is refused, never read as if the bit were clear.

use std::ops::Range;

/// Bytes of one slot.
pub const SLOT_BYTES: u64 = SLOT_LEN as u64;
const SLOT_LEN: usize = 64 * 1024;
/// Bytes reserved at the start of the aggregate for the two slots.
pub const TABLE_BYTES: u64 = 2 * SLOT_BYTES;
/// Volumes start on this boundary.
pub const VOLUME_ALIGN: u64 = 1 << 20;
/// The longest volume or aggregate name, in bytes of UTF-8.
pub const MAX_NAME_BYTES: usize = 64;

const MAGIC: &[u8; 8] = b"MCVOLTB1";
const VERSION: u32 = 1;
const HEADER_BYTES: usize = 128;
const ENTRY_BYTES: usize = 128;
/// The most volumes one aggregate holds.
pub const MAX_VOLUMES: usize = (SLOT_LEN - HEADER_BYTES) / ENTRY_BYTES;

/// Entry flag: `nvfail off` (the bit is set for the non-default value, so 0 means on, S9).
pub const FLAG_NVFAIL_OFF: u32 = 1 << 0;
/// Entry flag: `dr_force_nvfail` (DESIGN §9 rule (b)).
pub const FLAG_DR_FORCE_NVFAIL: u32 = 1 << 1;
/// Entry flag: the volume is in the NVFAILed state (DESIGN §9).
pub const FLAG_IN_NVFAILED_STATE: u32 = 1 << 2;
/// Every flag bit this version knows.
pub const FLAGS_KNOWN: u32 = FLAG_NVFAIL_OFF | FLAG_DR_FORCE_NVFAIL | FLAG_IN_NVFAILED_STATE;

mod field {
    use std::ops::Range;
    pub const MAGIC: Range<usize> = 0..8;
    pub const VERSION: Range<usize> = 8..12;
    pub const COUNT: Range<usize> = 12..16;
    pub const SEQUENCE: Range<usize> = 16..24;
    pub const AGGREGATE: Range<usize> = 24..40;
    pub const NEXT_ID: Range<usize> = 40..44;
    pub const CRC: Range<usize> = 44..48;
    pub const NAME: Range<usize> = 48..112;
    // Entry fields, relative to the entry.
    pub const E_ID: Range<usize> = 0..4;
    pub const E_FLAGS: Range<usize> = 4..8;
    pub const E_BASE: Range<usize> = 8..16;
    pub const E_SIZE: Range<usize> = 16..24;
    pub const E_NAME: Range<usize> = 24..88;
}

/// One volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeEntry {
    /// Never reused within the aggregate; records name the volume by it.
    pub id: u32,
    /// Unique within the node.
    pub name: String,
    /// The volume's first byte in the aggregate.
    pub base: u64,
    /// Bytes.
    pub size: u64,
    /// `nvfail on` (the default, S9): the volume is NVFAILed when DESIGN §9's rules say so.
    pub nvfail: bool,
    /// `dr_force_nvfail`: NVFAILed by any forced switchover (DESIGN §9 rule (b)).
    pub dr_force_nvfail: bool,
    /// In the NVFAILed state: no I/O until an administrator clears it.
    pub in_nvfailed_state: bool,
}

/// The NVFAIL options and state of a volume, as a change: `None` leaves a field as it is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlagChange {
    /// `nvfail on|off`.
    pub nvfail: Option<bool>,
    /// `dr_force_nvfail`.
    pub dr_force_nvfail: Option<bool>,
    /// The NVFAILed state.
    pub in_nvfailed_state: Option<bool>,
}

impl VolumeEntry {
    /// The aggregate bytes the volume occupies.
    pub fn extent(&self) -> Range<u64> {
        self.base..self.base + self.size
    }

    /// The entry's flags field.
    pub fn flags(&self) -> u32 {
        let mut flags = 0;
        if !self.nvfail {
            flags |= FLAG_NVFAIL_OFF;
        }
        if self.dr_force_nvfail {
            flags |= FLAG_DR_FORCE_NVFAIL;
        }
        if self.in_nvfailed_state {
            flags |= FLAG_IN_NVFAILED_STATE;
        }
        flags
    }

    /// Sets the options and state from a flags field; an unknown bit is an error.
    fn set_flags(&mut self, flags: u32) -> Result<(), String> {
        let unknown = flags & !FLAGS_KNOWN;
        if unknown != 0 {
            return Err(format!(
                "volume {} has unknown flag bits {unknown:#x} (flags {flags:#x}): written by a newer version?",
                self.name
            ));
        }
        self.nvfail = flags & FLAG_NVFAIL_OFF == 0;
        self.dr_force_nvfail = flags & FLAG_DR_FORCE_NVFAIL != 0;
        self.in_nvfailed_state = flags & FLAG_IN_NVFAILED_STATE != 0;
        Ok(())
    }
}

/// The table of one aggregate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeTable {
    /// Raised by every update; picks the newer slot.
    pub sequence: u64,
    /// The aggregate it belongs to.
    pub aggregate: [u8; 16],
    /// The aggregate's name.
    pub name: String,
    /// The id the next volume gets.
    pub next_id: u32,
    /// The volumes.
    pub volumes: Vec<VolumeEntry>,
}

/// Why a table or a change to it is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VolumeError {
    /// A name is empty, too long or not printable.
    #[error("invalid name {0:?}: 1 to 64 bytes, letters, digits, '_', '-' and '.'")]
    BadName(String),
    /// The name is taken.
    #[error("a volume named {0:?} exists")]
    Exists(String),
    /// No room.
    #[error("no room for {size} bytes in aggregate {aggregate:?} ({free} bytes free in one piece)")]
    NoSpace {
        /// The aggregate.
        aggregate: String,
        /// Requested.
        size: u64,
        /// The largest free extent.
        free: u64,
    },
    /// Size 0, not a multiple of 4 KiB, or too many volumes.
    #[error("{0}")]
    Invalid(String),
    /// No volume of that name in the table.
    #[error("no volume named {0:?} in the table")]
    NotFound(String),
    /// Neither slot holds a valid table.
    #[error("no valid volume table: {0}")]
    NoValidTable(String),
}

/// Checks a volume or aggregate name.
pub fn check_name(name: &str) -> Result<(), VolumeError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok { Ok(()) } else { Err(VolumeError::BadName(name.to_string())) }
}

fn u32_at(bytes: &[u8], range: Range<usize>) -> u32 {
    let mut out = [0u8; 4];
    out.copy_from_slice(&bytes[range]);
    u32::from_le_bytes(out)
}

fn u64_at(bytes: &[u8], range: Range<usize>) -> u64 {
    let mut out = [0u8; 8];
    out.copy_from_slice(&bytes[range]);
    u64::from_le_bytes(out)
}

fn name_at(bytes: &[u8]) -> Result<String, String> {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    if bytes[end..].iter().any(|&b| b != 0) {
        return Err("bytes after a name's end".into());
    }
    let name = std::str::from_utf8(&bytes[..end]).map_err(|_| "a name is not UTF-8".to_string())?;
    Ok(name.to_string())
}

impl VolumeTable {
    /// The table of a new aggregate.
    pub fn new(aggregate: [u8; 16], name: &str) -> Result<VolumeTable, VolumeError> {
        check_name(name)?;
        Ok(VolumeTable { sequence: 0, aggregate, name: name.to_string(), next_id: 1, volumes: Vec::new() })
    }

    /// The aggregate offset of the slot this version of the table is written to: versions
    /// alternate, so an update never overwrites the last good copy.
    pub fn slot_offset(&self) -> u64 {
        (self.sequence % 2) * SLOT_BYTES
    }

    /// Encodes the table as one slot.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; SLOT_LEN];
        out[field::MAGIC].copy_from_slice(MAGIC);
        out[field::VERSION].copy_from_slice(&VERSION.to_le_bytes());
        let count = u32::try_from(self.volumes.len()).unwrap_or(u32::MAX);
        out[field::COUNT].copy_from_slice(&count.to_le_bytes());
        out[field::SEQUENCE].copy_from_slice(&self.sequence.to_le_bytes());
        out[field::AGGREGATE].copy_from_slice(&self.aggregate);
        out[field::NEXT_ID].copy_from_slice(&self.next_id.to_le_bytes());
        out[field::NAME][..self.name.len()].copy_from_slice(self.name.as_bytes());
        for (index, volume) in self.volumes.iter().enumerate().take(MAX_VOLUMES) {
            let entry = &mut out[HEADER_BYTES + index * ENTRY_BYTES..][..ENTRY_BYTES];
            entry[field::E_ID].copy_from_slice(&volume.id.to_le_bytes());
            entry[field::E_FLAGS].copy_from_slice(&volume.flags().to_le_bytes());
            entry[field::E_BASE].copy_from_slice(&volume.base.to_le_bytes());
            entry[field::E_SIZE].copy_from_slice(&volume.size.to_le_bytes());
            entry[field::E_NAME][..volume.name.len()].copy_from_slice(volume.name.as_bytes());
        }
        let used = HEADER_BYTES + self.volumes.len().min(MAX_VOLUMES) * ENTRY_BYTES;
        let crc = crc32fast::hash(&out[..used]);
        out[field::CRC].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes one slot, checking everything; `aggregate_size` bounds the volumes.
    pub fn decode(slot: &[u8], aggregate_size: u64) -> Result<VolumeTable, String> {
        if slot.len() < HEADER_BYTES {
            return Err("short slot".into());
        }
        if &slot[field::MAGIC] != MAGIC {
            return Err("bad magic".into());
        }
        let version = u32_at(slot, field::VERSION);
        if version != VERSION {
            return Err(format!("version {version}"));
        }
        let count = u32_at(slot, field::COUNT) as usize;
        if count > MAX_VOLUMES || HEADER_BYTES + count * ENTRY_BYTES > slot.len() {
            return Err(format!("{count} volumes"));
        }
        let used = HEADER_BYTES + count * ENTRY_BYTES;
        let mut copy = slot[..used].to_vec();
        copy[field::CRC].fill(0);
        if crc32fast::hash(&copy) != u32_at(slot, field::CRC) {
            return Err("bad CRC".into());
        }
        let mut aggregate = [0u8; 16];
        aggregate.copy_from_slice(&slot[field::AGGREGATE]);
        let name = name_at(&slot[field::NAME])?;
        let next_id = u32_at(slot, field::NEXT_ID);
        let mut volumes = Vec::with_capacity(count);
        for index in 0..count {
            let entry = &slot[HEADER_BYTES + index * ENTRY_BYTES..][..ENTRY_BYTES];
            let mut volume = VolumeEntry {
                id: u32_at(entry, field::E_ID),
                name: name_at(&entry[field::E_NAME])?,
                base: u64_at(entry, field::E_BASE),
                size: u64_at(entry, field::E_SIZE),
                nvfail: true,
                dr_force_nvfail: false,
                in_nvfailed_state: false,
            };
            volume.set_flags(u32_at(entry, field::E_FLAGS))?;
            volumes.push(volume);
        }
        let table =
            VolumeTable { sequence: u64_at(slot, field::SEQUENCE), aggregate, name, next_id, volumes };
        table.check(aggregate_size)?;
        Ok(table)
    }

    /// The structural rules of the table.
    fn check(&self, aggregate_size: u64) -> Result<(), String> {
        check_name(&self.name).map_err(|e| e.to_string())?;
        let mut extents: Vec<Range<u64>> = Vec::new();
        for volume in &self.volumes {
            check_name(&volume.name).map_err(|e| e.to_string())?;
            if volume.id == 0 || volume.id >= self.next_id {
                return Err(format!(
                    "volume {} has id {} (next id {})",
                    volume.name, volume.id, self.next_id
                ));
            }
            let end = volume.base.checked_add(volume.size).ok_or("a volume's end overflows")?;
            if volume.size == 0
                || !volume.size.is_multiple_of(plex::BLOCK_BYTES)
                || volume.base % VOLUME_ALIGN != 0
                || volume.base < TABLE_BYTES
                || end > aggregate_size
            {
                return Err(format!("volume {} has a bad extent {}..{end}", volume.name, volume.base));
            }
            if extents.iter().any(|e| e.start < end && volume.base < e.end) {
                return Err(format!("volume {} overlaps another", volume.name));
            }
            if self.volumes.iter().filter(|v| v.name == volume.name || v.id == volume.id).count() > 1 {
                return Err(format!("volume {} is listed twice", volume.name));
            }
            extents.push(volume.extent());
        }
        Ok(())
    }

    /// Picks the valid slot with the higher sequence.
    pub fn pick(slots: [&[u8]; 2], aggregate_size: u64) -> Result<VolumeTable, VolumeError> {
        let decoded = slots.map(|slot| VolumeTable::decode(slot, aggregate_size));
        match decoded {
            [Ok(a), Ok(b)] => Ok(if a.sequence >= b.sequence { a } else { b }),
            [Ok(a), Err(_)] | [Err(_), Ok(a)] => Ok(a),
            [Err(a), Err(b)] => Err(VolumeError::NoValidTable(format!("slot 0: {a}; slot 1: {b}"))),
        }
    }

    /// The table with one more volume of `size` bytes, placed in the first free extent that
    /// fits (1 MiB aligned).
    pub fn with_volume(
        &self,
        name: &str,
        size: u64,
        aggregate_size: u64,
    ) -> Result<VolumeTable, VolumeError> {
        check_name(name)?;
        if self.volumes.iter().any(|v| v.name == name) {
            return Err(VolumeError::Exists(name.to_string()));
        }
        if size == 0 || !size.is_multiple_of(plex::BLOCK_BYTES) {
            return Err(VolumeError::Invalid(format!(
                "volume size {size} is not a positive multiple of 4096"
            )));
        }
        if self.volumes.len() >= MAX_VOLUMES {
            return Err(VolumeError::Invalid(format!("the aggregate holds {MAX_VOLUMES} volumes already")));
        }
        let mut taken: Vec<Range<u64>> = self.volumes.iter().map(VolumeEntry::extent).collect();
        taken.sort_by_key(|e| e.start);
        let mut start = VOLUME_ALIGN.max(TABLE_BYTES);
        let mut largest = 0u64;
        let mut place = None;
        for extent in taken.iter().chain(std::iter::once(&(aggregate_size..aggregate_size))) {
            let free = extent.start.saturating_sub(start);
            largest = largest.max(free);
            if free >= size {
                place = Some(start);
                break;
            }
            start = start.max(extent.end.div_ceil(VOLUME_ALIGN) * VOLUME_ALIGN);
        }
        let Some(base) = place else {
            return Err(VolumeError::NoSpace { aggregate: self.name.clone(), size, free: largest });
        };
        let mut table = self.clone();
        table.sequence += 1;
        table.volumes.push(VolumeEntry {
            id: self.next_id,
            name: name.to_string(),
            base,
            size,
            nvfail: true,
            dr_force_nvfail: false,
            in_nvfailed_state: false,
        });
        table.next_id = self
            .next_id
            .checked_add(1)
            .ok_or_else(|| VolumeError::Invalid("volume ids are exhausted".into()))?;
        Ok(table)
    }

    /// The table with `change` applied to volume `name`'s options and state.
    pub fn with_flags(&self, name: &str, change: FlagChange) -> Result<VolumeTable, VolumeError> {
        self.with_entries(
            |v| v.name == name,
            name,
            |entry| {
                if let Some(nvfail) = change.nvfail {
                    entry.nvfail = nvfail;
                }
                if let Some(force) = change.dr_force_nvfail {
                    entry.dr_force_nvfail = force;
                }
                if let Some(state) = change.in_nvfailed_state {
                    entry.in_nvfailed_state = state;
                }
            },
        )
    }

    /// The table with every volume `select` picks put in the NVFAILed state (at least one must
    /// be picked; `what` names them in the error).
    pub fn with_nvfailed(
        &self,
        select: impl Fn(&VolumeEntry) -> bool,
        what: &str,
    ) -> Result<VolumeTable, VolumeError> {
        self.with_entries(select, what, |entry| entry.in_nvfailed_state = true)
    }

    fn with_entries(
        &self,
        select: impl Fn(&VolumeEntry) -> bool,
        what: &str,
        change: impl Fn(&mut VolumeEntry),
    ) -> Result<VolumeTable, VolumeError> {
        let mut table = self.clone();
        let mut found = false;
        for entry in table.volumes.iter_mut().filter(|v| select(v)) {
            change(entry);
            found = true;
        }
        if !found {
            return Err(VolumeError::NotFound(what.to_string()));
        }
        table.sequence += 1;
        Ok(table)
    }

    /// The table without volume `name`. `next_id` stays: ids are never reused, so NVLog records
    /// of the removed volume can never be taken for another's (S8).
    pub fn without_volume(&self, name: &str) -> Result<VolumeTable, VolumeError> {
        let mut table = self.clone();
        let before = table.volumes.len();
        table.volumes.retain(|v| v.name != name);
        if table.volumes.len() == before {
            return Err(VolumeError::NotFound(name.to_string()));
        }
        table.sequence += 1;
        Ok(table)
    }

    /// Whether records naming volume `id` may be left unapplied: the volume was removed from
    /// this table (its id was handed out, `id < next_id`, and no entry holds it now).
    pub fn was_removed(&self, id: u32) -> bool {
        id != 0 && id < self.next_id && self.volumes.iter().all(|v| v.id != id)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

    use super::*;

    const SIZE: u64 = 64 << 20;

    #[test]
    fn round_trip_and_placement() {
        let table = VolumeTable::new([7; 16], "aggr_a").unwrap();
        let table = table.with_volume("vol1", 8 << 20, SIZE).unwrap();
        let table = table.with_volume("vol2", 4096, SIZE).unwrap();
        assert_eq!(table.volumes[0].base, VOLUME_ALIGN);
        assert_eq!(table.volumes[1].base, 9 << 20);
        assert_eq!(table.volumes[1].id, 2);
        let decoded = VolumeTable::decode(&table.encode(), SIZE).unwrap();
        assert_eq!(decoded, table);
        assert!(matches!(table.with_volume("vol1", 4096, SIZE), Err(VolumeError::Exists(_))));
        assert!(matches!(table.with_volume("big", 60 << 20, SIZE), Err(VolumeError::NoSpace { .. })));
        assert!(matches!(table.with_volume("bad name", 4096, SIZE), Err(VolumeError::BadName(_))));
        assert!(matches!(table.with_volume("odd", 1000, SIZE), Err(VolumeError::Invalid(_))));
    }

    #[test]
    fn newer_valid_slot_wins_and_damage_is_detected() {
        let one = VolumeTable::new([1; 16], "a").unwrap().with_volume("v", 1 << 20, SIZE).unwrap();
        let two = one.with_volume("w", 1 << 20, SIZE).unwrap();
        let (e1, e2) = (one.encode(), two.encode());
        assert_eq!(VolumeTable::pick([&e1, &e2], SIZE).unwrap(), two);
        let mut torn = e2.clone();
        torn[HEADER_BYTES + ENTRY_BYTES + 9] ^= 1;
        assert_eq!(VolumeTable::pick([&e1, &torn], SIZE).unwrap(), one);
        assert!(VolumeTable::pick([&torn, &vec![0; SLOT_LEN]], SIZE).is_err());
    }

    #[test]
    fn garbage_never_panics() {
        let mut state = 0x1234_5678_u64;
        for round in 0..2000 {
            let mut slot =
                VolumeTable::new([3; 16], "x").unwrap().with_volume("v", 4096, SIZE).unwrap().encode();
            for _ in 0..(1 + round % 8) {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let at = (state >> 33) as usize % (HEADER_BYTES + 2 * ENTRY_BYTES);
                slot[at] = (state >> 13) as u8;
            }
            let _ = VolumeTable::decode(&slot, SIZE);
            let _ = VolumeTable::decode(&slot[..(round % 300)], SIZE);
        }
    }

    /// A flag lost or misread in the encoding would silently turn NVFAIL off or clear the
    /// NVFAILed state of a volume after a restart (S9).
    #[test]
    fn flags_round_trip() {
        let table = VolumeTable::new([5; 16], "a").unwrap().with_volume("v", 1 << 20, SIZE).unwrap();
        let table = table.with_volume("w", 1 << 20, SIZE).unwrap();
        let fresh = &table.volumes[0];
        assert!(fresh.nvfail && !fresh.dr_force_nvfail && !fresh.in_nvfailed_state, "{fresh:?}");
        for bits in 0..=FLAGS_KNOWN {
            let change = FlagChange {
                nvfail: Some(bits & FLAG_NVFAIL_OFF == 0),
                dr_force_nvfail: Some(bits & FLAG_DR_FORCE_NVFAIL != 0),
                in_nvfailed_state: Some(bits & FLAG_IN_NVFAILED_STATE != 0),
            };
            let changed = table.with_flags("v", change).unwrap();
            assert_eq!(changed.sequence, table.sequence + 1);
            assert_eq!(changed.volumes[0].flags(), bits);
            assert_eq!(changed.volumes[1], table.volumes[1], "another volume changed");
            let slot = changed.encode();
            assert_eq!(u32_at(&slot[HEADER_BYTES..], field::E_FLAGS), bits);
            assert_eq!(VolumeTable::decode(&slot, SIZE).unwrap(), changed);
        }
        // `None` leaves a field as it is.
        let forced =
            table.with_flags("v", FlagChange { dr_force_nvfail: Some(true), ..FlagChange::default() });
        let forced = forced.unwrap();
        assert!(forced.volumes[0].nvfail && forced.volumes[0].dr_force_nvfail);
        assert!(matches!(table.with_flags("nope", FlagChange::default()), Err(VolumeError::NotFound(_))));
        let failed = table.with_nvfailed(|v| v.id == 2, "id 2").unwrap();
        assert!(!failed.volumes[0].in_nvfailed_state && failed.volumes[1].in_nvfailed_state);
        assert!(matches!(table.with_nvfailed(|_| false, "none"), Err(VolumeError::NotFound(_))));
    }

    /// Every table written before NVFAIL existed has flags 0: it must read as `nvfail on`, the
    /// default S9 requires, not as off.
    #[test]
    fn old_zero_flags_decode_as_nvfail_on() {
        let table = VolumeTable::new([6; 16], "a").unwrap().with_volume("v", 1 << 20, SIZE).unwrap();
        let slot = table.encode();
        assert_eq!(u32_at(&slot[HEADER_BYTES..], field::E_FLAGS), 0);
        let volume = &VolumeTable::decode(&slot, SIZE).unwrap().volumes[0];
        assert!(volume.nvfail && !volume.dr_force_nvfail && !volume.in_nvfailed_state, "{volume:?}");
    }

    /// A bit this version does not know (a newer version's option) must refuse the slot rather
    /// than be dropped by the next rewrite of the table.
    #[test]
    fn unknown_flag_bits_are_refused() {
        let table = VolumeTable::new([8; 16], "a").unwrap().with_volume("v", 1 << 20, SIZE).unwrap();
        for bit in 3..32 {
            let mut slot = table.encode();
            slot[HEADER_BYTES + field::E_FLAGS.start..][..4].copy_from_slice(&(1u32 << bit).to_le_bytes());
            // Re-seal, so only the flag check can refuse it.
            slot[field::CRC].fill(0);
            let crc = crc32fast::hash(&slot[..HEADER_BYTES + ENTRY_BYTES]);
            slot[field::CRC].copy_from_slice(&crc.to_le_bytes());
            let error = VolumeTable::decode(&slot, SIZE).unwrap_err();
            assert!(error.contains("unknown flag bits"), "bit {bit}: {error}");
            assert!(VolumeTable::pick([&slot, &slot], SIZE).is_err());
        }
    }

    /// Reusing a removed volume's id would let its NVLog records be replayed into another
    /// volume (S8).
    #[test]
    fn removal_keeps_next_id() {
        let table = VolumeTable::new([9; 16], "a").unwrap().with_volume("v", 1 << 20, SIZE).unwrap();
        let table = table.with_volume("w", 1 << 20, SIZE).unwrap();
        let removed = table.without_volume("v").unwrap();
        assert_eq!(removed.sequence, table.sequence + 1);
        assert_eq!(removed.next_id, 3);
        assert_eq!(removed.volumes.len(), 1);
        assert_eq!(removed.volumes[0].name, "w");
        assert!(removed.was_removed(1) && !removed.was_removed(2) && !removed.was_removed(3));
        assert!(!removed.was_removed(0));
        assert_eq!(VolumeTable::decode(&removed.encode(), SIZE).unwrap(), removed);
        assert!(matches!(removed.without_volume("v"), Err(VolumeError::NotFound(_))));
        // The freed extent is reused, the id is not.
        let again = removed.with_volume("v", 1 << 20, SIZE).unwrap();
        assert_eq!(again.volumes[1].id, 3);
        assert_eq!(again.volumes[1].base, VOLUME_ALIGN);
    }
}
