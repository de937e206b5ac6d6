//! The file header (DESIGN §5, docs/formats.md "NVLog header"): two copies, each in its own
//! 4 KiB slot, with a sequence number and a CRC-32.
//!
//! Invariants:
//! - the copy with sequence `s` lives in slot `s % 2`, so consecutive writes alternate slots;
//! - in `power` mode a header write is persisted before the next one starts, so at least one
//!   slot always holds an intact, persisted copy;
//! - the sequence, the log generation and every partition's `partition_generation` and
//!   `released_lsn` only increase;
//! - reserved bytes are zero and checked on read.

use crate::types::{ClusterId, Generation, Lsn, MirrorState, NodeId, PartitionKind};

/// "MCNVLOG1" in little-endian byte order.
pub const FILE_MAGIC: u64 = u64::from_le_bytes(*b"MCNVLOG1");
/// The on-disk format version this code reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Size of one header slot; copy 0 is at 0, copy 1 at `HEADER_SLOT_BYTES`.
pub const HEADER_SLOT_BYTES: u64 = 4096;
/// Where partition data may start.
pub const DATA_START: u64 = 2 * HEADER_SLOT_BYTES;
/// Partition offsets and sizes are multiples of this.
pub const PARTITION_ALIGN: u64 = 8192;
/// Partition table entries.
pub const MAX_PARTITIONS: usize = 4;
/// Generations of one writer that a partition can hold at once.
pub const MAX_GENERATIONS: usize = 8;

/// Bytes of one partition table entry.
pub const PARTITION_ENTRY_BYTES: usize = 256;
/// Bytes of the header that the CRC covers, plus the CRC and its reserved word.
pub const HEADER_BYTES: usize = 1160;
const HEADER_BYTES_U32: u32 = 1160;
const _: () = assert!(HEADER_BYTES_U32 as usize == HEADER_BYTES);

mod field {
    use std::ops::Range;
    pub const MAGIC: Range<usize> = 0..8;
    pub const VERSION: Range<usize> = 8..12;
    pub const HEADER_BYTES: Range<usize> = 12..16;
    pub const SEQUENCE: Range<usize> = 16..24;
    pub const CLUSTER: Range<usize> = 24..40;
    pub const NODE: Range<usize> = 40..44;
    pub const PARTITION_COUNT: Range<usize> = 44..48;
    pub const LOG_GENERATION: Range<usize> = 48..56;
    pub const FILE_BYTES: Range<usize> = 56..64;
    pub const RESERVED: Range<usize> = 64..128;
    pub const PARTITIONS: usize = 128;
    pub const CRC: Range<usize> = 1152..1156;
    pub const RESERVED_TAIL: Range<usize> = 1156..1160;

    pub mod partition {
        use std::ops::Range;
        pub const KIND: Range<usize> = 0..4;
        pub const MIRROR_STATE: Range<usize> = 4..8;
        pub const OFFSET: Range<usize> = 8..16;
        pub const SIZE: Range<usize> = 16..24;
        pub const WRITER: Range<usize> = 24..28;
        pub const FLAGS: Range<usize> = 28..32;
        pub const RELEASED_LSN: Range<usize> = 32..40;
        pub const PARTITION_GENERATION: Range<usize> = 40..48;
        pub const ACTIVE_HALF: Range<usize> = 48..52;
        pub const GENERATION_COUNT: Range<usize> = 52..56;
        pub const SEALED_LAST_LSN: Range<usize> = 56..64;
        pub const GENERATIONS: usize = 64;
        pub const GENERATION_ENTRY: usize = 16;
        pub const LSN_FLOOR: Range<usize> = 192..200;
        pub const RESERVED: Range<usize> = 200..256;
    }
}
const _: () = assert!(field::PARTITIONS + MAX_PARTITIONS * PARTITION_ENTRY_BYTES == field::CRC.start);
const _: () = assert!(field::RESERVED_TAIL.end == HEADER_BYTES);
const _: () = assert!(HEADER_BYTES as u64 <= HEADER_SLOT_BYTES);
const _: () = assert!(
    field::partition::GENERATIONS + MAX_GENERATIONS * field::partition::GENERATION_ENTRY
        == field::partition::LSN_FLOOR.start
);
const _: () = assert!(field::partition::RESERVED.end == PARTITION_ENTRY_BYTES);

/// Partition flag: recovery found corruption before the tail (S8 applies).
pub const FLAG_FAILED: u32 = 1;

/// One generation of the writer held by a partition, with the first lsn it wrote there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenerationSpan {
    /// The writer's log generation.
    pub generation: Generation,
    /// The first lsn of that generation in this partition.
    pub first_lsn: Lsn,
}

/// The persistent state of one partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionEntry {
    /// Which partition.
    pub kind: PartitionKind,
    /// The receiver's account of the writer's mirror (S13).
    pub mirror_state: MirrorState,
    /// Byte offset of the partition in the file.
    pub offset: u64,
    /// Bytes of the partition: two halves of `size / 2`.
    pub size: u64,
    /// The node whose records this partition holds.
    pub writer: NodeId,
    /// `FLAG_FAILED`.
    pub flags: u32,
    /// Every record at or below this lsn may be overwritten.
    pub released_lsn: Lsn,
    /// Raised whenever the partition is reset (it lost records: S13).
    pub partition_generation: u64,
    /// The half new records go to.
    pub active_half: u32,
    /// The last lsn in the other (sealed) half, or 0 when it holds none.
    pub sealed_last_lsn: Lsn,
    /// Generations of the writer with records here, oldest first.
    pub generations: Vec<GenerationSpan>,
    /// Lsns of this node's own new records start above this (set when a partition that held
    /// records up to it is reset, so an lsn is never reused). 0 for partner partitions.
    pub lsn_floor: Lsn,
}

impl PartitionEntry {
    /// Bytes of one half.
    pub fn half_size(&self) -> u64 {
        self.size / 2
    }

    /// Byte offset of half `half` in the file.
    pub fn half_offset(&self, half: u32) -> u64 {
        self.offset + u64::from(half) * self.half_size()
    }

    /// Whether recovery marked the partition failed.
    pub fn failed(&self) -> bool {
        self.flags & FLAG_FAILED != 0
    }

    /// The generation span that owns `lsn` under `generation`, if the header lists it.
    pub fn lists(&self, generation: Generation, lsn: Lsn) -> bool {
        let Some(index) = self.generations.iter().position(|span| span.generation == generation) else {
            return false;
        };
        let span = self.generations[index];
        let below_next = self.generations.get(index + 1).is_none_or(|next| lsn < next.first_lsn);
        lsn >= span.first_lsn && below_next
    }
}

/// The whole header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileHeader {
    /// Raised by every header write; picks the newer copy.
    pub sequence: u64,
    /// The cluster of the node.
    pub cluster: ClusterId,
    /// The node owning this log.
    pub node: NodeId,
    /// This node's log generation, raised at format and at every open.
    pub log_generation: Generation,
    /// The size of the file.
    pub file_bytes: u64,
    /// The partitions, in table order.
    pub partitions: Vec<PartitionEntry>,
}

/// Why a header copy is unusable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderDefect {
    /// The magic is wrong (also: never written).
    #[error("bad header magic")]
    BadMagic,
    /// A version this code does not read.
    #[error("unsupported format version {0}")]
    Version(u32),
    /// The CRC-32 does not match.
    #[error("header CRC mismatch")]
    BadCrc,
    /// A field is out of range or inconsistent.
    #[error("invalid header field: {0}")]
    BadField(&'static str),
}

fn u32_at(bytes: &[u8], range: std::ops::Range<usize>) -> u32 {
    u32::from_le_bytes(bytes[range].try_into().expect("4 bytes"))
}
fn u64_at(bytes: &[u8], range: std::ops::Range<usize>) -> u64 {
    u64::from_le_bytes(bytes[range].try_into().expect("8 bytes"))
}
fn put_u32(bytes: &mut [u8], range: std::ops::Range<usize>, value: u32) {
    bytes[range].copy_from_slice(&value.to_le_bytes());
}
fn put_u64(bytes: &mut [u8], range: std::ops::Range<usize>, value: u64) {
    bytes[range].copy_from_slice(&value.to_le_bytes());
}

impl FileHeader {
    /// The slot this copy is written to.
    pub fn slot(&self) -> u64 {
        self.sequence % 2
    }

    /// Encodes the header with its CRC.
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        put_u64(&mut out, field::MAGIC, FILE_MAGIC);
        put_u32(&mut out, field::VERSION, FORMAT_VERSION);
        put_u32(&mut out, field::HEADER_BYTES, HEADER_BYTES_U32);
        put_u64(&mut out, field::SEQUENCE, self.sequence);
        out[field::CLUSTER].copy_from_slice(&self.cluster.0);
        put_u32(&mut out, field::NODE, self.node.0);
        let count = u32::try_from(self.partitions.len()).expect("at most 4 partitions");
        put_u32(&mut out, field::PARTITION_COUNT, count);
        put_u64(&mut out, field::LOG_GENERATION, self.log_generation.0);
        put_u64(&mut out, field::FILE_BYTES, self.file_bytes);
        for (index, part) in self.partitions.iter().enumerate() {
            use field::partition as p;
            let base = field::PARTITIONS + index * PARTITION_ENTRY_BYTES;
            let entry = &mut out[base..base + PARTITION_ENTRY_BYTES];
            put_u32(entry, p::KIND, part.kind as u32);
            put_u32(entry, p::MIRROR_STATE, part.mirror_state as u32);
            put_u64(entry, p::OFFSET, part.offset);
            put_u64(entry, p::SIZE, part.size);
            put_u32(entry, p::WRITER, part.writer.0);
            put_u32(entry, p::FLAGS, part.flags);
            put_u64(entry, p::RELEASED_LSN, part.released_lsn.0);
            put_u64(entry, p::PARTITION_GENERATION, part.partition_generation);
            put_u32(entry, p::ACTIVE_HALF, part.active_half);
            let spans = u32::try_from(part.generations.len()).expect("at most 8 generations");
            put_u32(entry, p::GENERATION_COUNT, spans);
            put_u64(entry, p::SEALED_LAST_LSN, part.sealed_last_lsn.0);
            put_u64(entry, p::LSN_FLOOR, part.lsn_floor.0);
            for (slot, span) in part.generations.iter().enumerate() {
                let at = p::GENERATIONS + slot * p::GENERATION_ENTRY;
                put_u64(entry, at..at + 8, span.generation.0);
                put_u64(entry, at + 8..at + 16, span.first_lsn.0);
            }
        }
        let crc = crc32fast::hash(&out[..field::CRC.start]);
        put_u32(&mut out, field::CRC, crc);
        out
    }

    /// Decodes and validates one copy read from slot `slot`.
    pub fn decode(bytes: &[u8], slot: u64, media_len: u64) -> Result<FileHeader, HeaderDefect> {
        if bytes.len() < HEADER_BYTES {
            return Err(HeaderDefect::BadField("short header"));
        }
        if u64_at(bytes, field::MAGIC) != FILE_MAGIC {
            return Err(HeaderDefect::BadMagic);
        }
        let version = u32_at(bytes, field::VERSION);
        if version != FORMAT_VERSION {
            return Err(HeaderDefect::Version(version));
        }
        if u32_at(bytes, field::HEADER_BYTES) as usize != HEADER_BYTES {
            return Err(HeaderDefect::BadField("header size"));
        }
        if crc32fast::hash(&bytes[..field::CRC.start]) != u32_at(bytes, field::CRC) {
            return Err(HeaderDefect::BadCrc);
        }
        if bytes[field::RESERVED].iter().any(|&b| b != 0) || u32_at(bytes, field::RESERVED_TAIL) != 0 {
            return Err(HeaderDefect::BadField("reserved bytes are not zero"));
        }
        let sequence = u64_at(bytes, field::SEQUENCE);
        if sequence % 2 != slot {
            return Err(HeaderDefect::BadField("sequence does not belong to this slot"));
        }
        let file_bytes = u64_at(bytes, field::FILE_BYTES);
        if file_bytes != media_len {
            return Err(HeaderDefect::BadField("file size differs from the media"));
        }
        let node = NodeId(u32_at(bytes, field::NODE));
        if node.0 == 0 {
            return Err(HeaderDefect::BadField("node id 0"));
        }
        let count = u32_at(bytes, field::PARTITION_COUNT) as usize;
        if count == 0 || count > MAX_PARTITIONS {
            return Err(HeaderDefect::BadField("partition count"));
        }
        let mut partitions = Vec::with_capacity(count);
        for index in 0..MAX_PARTITIONS {
            let base = field::PARTITIONS + index * PARTITION_ENTRY_BYTES;
            let entry = &bytes[base..base + PARTITION_ENTRY_BYTES];
            if index >= count {
                if entry.iter().any(|&b| b != 0) {
                    return Err(HeaderDefect::BadField("unused partition entry is not zero"));
                }
                continue;
            }
            partitions.push(decode_partition(entry)?);
        }
        let header = FileHeader {
            sequence,
            cluster: ClusterId(bytes[field::CLUSTER].try_into().expect("16 bytes")),
            node,
            log_generation: Generation(u64_at(bytes, field::LOG_GENERATION)),
            file_bytes,
            partitions,
        };
        header.check_layout()?;
        Ok(header)
    }

    /// Checks the partition table: unique kinds, aligned, inside the file, not overlapping.
    pub fn check_layout(&self) -> Result<(), HeaderDefect> {
        let mut spans: Vec<(u64, u64)> = Vec::new();
        for (index, part) in self.partitions.iter().enumerate() {
            if self.partitions[..index].iter().any(|other| other.kind == part.kind) {
                return Err(HeaderDefect::BadField("duplicate partition kind"));
            }
            if part.offset < DATA_START || part.offset % PARTITION_ALIGN != 0 {
                return Err(HeaderDefect::BadField("partition offset"));
            }
            if part.size == 0 || part.size % PARTITION_ALIGN != 0 {
                return Err(HeaderDefect::BadField("partition size"));
            }
            let end = part.offset.checked_add(part.size).ok_or(HeaderDefect::BadField("partition end"))?;
            if end > self.file_bytes {
                return Err(HeaderDefect::BadField("partition beyond the file"));
            }
            if spans.iter().any(|&(start, stop)| part.offset < stop && start < end) {
                return Err(HeaderDefect::BadField("partitions overlap"));
            }
            spans.push((part.offset, end));
        }
        Ok(())
    }
}

fn decode_partition(entry: &[u8]) -> Result<PartitionEntry, HeaderDefect> {
    use field::partition as p;
    let kind =
        PartitionKind::from_u32(u32_at(entry, p::KIND)).ok_or(HeaderDefect::BadField("partition kind"))?;
    let mirror_state = MirrorState::from_u32(u32_at(entry, p::MIRROR_STATE))
        .ok_or(HeaderDefect::BadField("mirror state"))?;
    let flags = u32_at(entry, p::FLAGS);
    if flags & !FLAG_FAILED != 0 {
        return Err(HeaderDefect::BadField("unknown partition flags"));
    }
    let active_half = u32_at(entry, p::ACTIVE_HALF);
    if active_half > 1 {
        return Err(HeaderDefect::BadField("active half"));
    }
    let writer = NodeId(u32_at(entry, p::WRITER));
    if writer.0 == 0 {
        return Err(HeaderDefect::BadField("writer node 0"));
    }
    let count = u32_at(entry, p::GENERATION_COUNT) as usize;
    if count > MAX_GENERATIONS {
        return Err(HeaderDefect::BadField("generation count"));
    }
    let mut generations: Vec<GenerationSpan> = Vec::with_capacity(count);
    for slot in 0..MAX_GENERATIONS {
        let at = p::GENERATIONS + slot * p::GENERATION_ENTRY;
        let generation = Generation(u64_at(entry, at..at + 8));
        let first_lsn = Lsn(u64_at(entry, at + 8..at + 16));
        if slot >= count {
            if generation.0 != 0 || first_lsn.0 != 0 {
                return Err(HeaderDefect::BadField("unused generation slot is not zero"));
            }
            continue;
        }
        if first_lsn == Lsn::ZERO {
            return Err(HeaderDefect::BadField("generation without a first lsn"));
        }
        if let Some(last) = generations.last()
            && (generation <= last.generation || first_lsn <= last.first_lsn)
        {
            return Err(HeaderDefect::BadField("generations out of order"));
        }
        generations.push(GenerationSpan { generation, first_lsn });
    }
    if entry[p::RESERVED].iter().any(|&b| b != 0) {
        return Err(HeaderDefect::BadField("reserved partition bytes are not zero"));
    }
    Ok(PartitionEntry {
        kind,
        mirror_state,
        offset: u64_at(entry, p::OFFSET),
        size: u64_at(entry, p::SIZE),
        writer,
        flags,
        released_lsn: Lsn(u64_at(entry, p::RELEASED_LSN)),
        partition_generation: u64_at(entry, p::PARTITION_GENERATION),
        active_half,
        sealed_last_lsn: Lsn(u64_at(entry, p::SEALED_LAST_LSN)),
        lsn_floor: Lsn(u64_at(entry, p::LSN_FLOOR)),
        generations,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> FileHeader {
        FileHeader {
            sequence: 5,
            cluster: ClusterId([1; 16]),
            node: NodeId(1),
            log_generation: Generation(3),
            file_bytes: DATA_START + 2 * 16384,
            partitions: vec![
                PartitionEntry {
                    kind: PartitionKind::Local,
                    mirror_state: MirrorState::None,
                    offset: DATA_START,
                    size: 16384,
                    writer: NodeId(1),
                    flags: 0,
                    released_lsn: Lsn(4),
                    partition_generation: 1,
                    active_half: 1,
                    sealed_last_lsn: Lsn(7),
                    generations: vec![
                        GenerationSpan { generation: Generation(2), first_lsn: Lsn(1) },
                        GenerationSpan { generation: Generation(3), first_lsn: Lsn(6) },
                    ],
                    lsn_floor: Lsn(3),
                },
                PartitionEntry {
                    kind: PartitionKind::DrPartner,
                    mirror_state: MirrorState::InSync,
                    offset: DATA_START + 16384,
                    size: 16384,
                    writer: NodeId(2),
                    flags: 0,
                    released_lsn: Lsn(0),
                    partition_generation: 1,
                    active_half: 0,
                    sealed_last_lsn: Lsn(0),
                    generations: vec![],
                    lsn_floor: Lsn(0),
                },
            ],
        }
    }

    #[test]
    fn round_trip() {
        let header = sample();
        let bytes = header.encode();
        assert_eq!(FileHeader::decode(&bytes, 1, header.file_bytes).unwrap(), header);
    }

    #[test]
    fn wrong_slot_is_refused() {
        let header = sample();
        assert!(FileHeader::decode(&header.encode(), 0, header.file_bytes).is_err());
    }

    #[test]
    fn generation_spans_bound_lsns() {
        let part = &sample().partitions[0];
        assert!(part.lists(Generation(2), Lsn(5)));
        assert!(!part.lists(Generation(2), Lsn(6)));
        assert!(part.lists(Generation(3), Lsn(600)));
        assert!(!part.lists(Generation(3), Lsn(5)));
        assert!(!part.lists(Generation(1), Lsn(5)));
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let header = sample();
        let bytes = header.encode();
        for bit in 0..HEADER_BYTES * 8 {
            let mut copy = bytes;
            copy[bit / 8] ^= 1 << (bit % 8);
            assert!(FileHeader::decode(&copy, 1, header.file_bytes).is_err(), "bit {bit}");
        }
    }
}
