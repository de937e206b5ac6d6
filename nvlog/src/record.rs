//! The record format (DESIGN §5, docs/formats.md "NVLog record").
//!
//! Invariants:
//! - a record is `RECORD_HEADER_BYTES` of header, then the payload, then zero padding to a
//!   multiple of 8 bytes; `total_len` says how long all of it is;
//! - the CRC-32 covers the writer's log generation (the salt), the header without its CRC field,
//!   the payload and the padding, so a record of another incarnation never verifies;
//! - a partner's record is stored byte for byte as the writer encoded it: same lsn, generation
//!   and checksum.

use bytes::Bytes;

use crate::types::{AggregateId, Epoch, Generation, Lsn, NodeId, OpKind, VolumeId};

/// "NVRC" in little-endian byte order.
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"NVRC");
/// Size of the fixed record header.
pub const RECORD_HEADER_BYTES: usize = 96;
/// Records start and end on this alignment.
pub const RECORD_ALIGN: usize = 8;
/// The largest payload of one record: larger host writes are split (DESIGN §4).
pub const MAX_PAYLOAD_BYTES: u32 = 1 << 20;
/// The largest encoded record.
pub const MAX_RECORD_BYTES: usize = RECORD_HEADER_BYTES + MAX_PAYLOAD_BYTES as usize;

pub(crate) mod field {
    use std::ops::Range;
    pub const MAGIC: Range<usize> = 0..4;
    pub const OP: Range<usize> = 4..6;
    pub const RESERVED_A: Range<usize> = 6..8;
    pub const TOTAL_LEN: Range<usize> = 8..12;
    pub const PAYLOAD_LEN: Range<usize> = 12..16;
    pub const LSN: Range<usize> = 16..24;
    pub const GENERATION: Range<usize> = 24..32;
    pub const WRITER: Range<usize> = 32..36;
    pub const VOLUME: Range<usize> = 36..40;
    pub const AGGREGATE: Range<usize> = 40..56;
    pub const EPOCH_NUMBER: Range<usize> = 56..64;
    pub const EPOCH_OWNER: Range<usize> = 64..68;
    pub const CRC: Range<usize> = 68..72;
    pub const OFFSET: Range<usize> = 72..80;
    pub const RANGE_LEN: Range<usize> = 80..88;
    pub const RESERVED_B: Range<usize> = 88..96;
}
const _: () = assert!(field::RESERVED_B.end == RECORD_HEADER_BYTES);
const _: () = assert!(RECORD_HEADER_BYTES.is_multiple_of(RECORD_ALIGN));

/// Why some bytes are not a valid record. Never a panic: these come from disk or the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordDefect {
    /// Fewer bytes than a header, or than the header's total length.
    #[error("truncated record: {have} bytes, {need} needed")]
    Truncated {
        /// Bytes available.
        have: usize,
        /// Bytes the record needs.
        need: usize,
    },
    /// Every byte of the header is zero: nothing was ever written here.
    #[error("no record (zeroes)")]
    Zeroes,
    /// The magic is not `RECORD_MAGIC`.
    #[error("bad record magic {0:#010x}")]
    BadMagic(u32),
    /// The op kind is unknown.
    #[error("unknown op kind {0}")]
    BadOp(u16),
    /// A reserved field is not zero.
    #[error("reserved bytes are not zero")]
    Reserved,
    /// Lengths disagree with each other or with the op kind, or exceed the limits.
    #[error("inconsistent lengths: {0}")]
    BadLength(&'static str),
    /// lsn 0, node 0, or offset + range overflows.
    #[error("invalid field: {0}")]
    BadField(&'static str),
    /// The CRC-32 does not match.
    #[error("CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadCrc {
        /// The CRC in the record.
        stored: u32,
        /// The CRC of the bytes as read.
        computed: u32,
    },
}

/// The decoded fixed header of a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// What the record does.
    pub op: OpKind,
    /// Bytes of header, payload and padding.
    pub total_len: u32,
    /// Bytes of payload.
    pub payload_len: u32,
    /// The writer's lsn.
    pub lsn: Lsn,
    /// The writer's log generation (the CRC salt).
    pub generation: Generation,
    /// The node that wrote the record.
    pub writer: NodeId,
    /// The volume written.
    pub volume: VolumeId,
    /// The aggregate of the volume.
    pub aggregate: AggregateId,
    /// The epoch the writer held for that aggregate.
    pub epoch: Epoch,
    /// The stored CRC-32.
    pub crc: u32,
    /// Byte offset in the volume.
    pub offset: u64,
    /// Bytes of the volume affected.
    pub range_len: u64,
}

/// What a caller asks to append; the journal adds the lsn, writer and generation.
#[derive(Clone, Copy, Debug)]
pub struct RecordInput<'a> {
    /// What the record does.
    pub op: OpKind,
    /// The aggregate of the volume.
    pub aggregate: AggregateId,
    /// The epoch this writer holds for the aggregate.
    pub epoch: Epoch,
    /// The volume written.
    pub volume: VolumeId,
    /// Byte offset in the volume.
    pub offset: u64,
    /// Bytes of the volume affected (equals the payload length for a write).
    pub range_len: u64,
    /// The data of a write; empty for trim and write-zeroes.
    pub payload: &'a [u8],
}

/// A whole record read back from the journal or received from a partner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The decoded header.
    pub header: RecordHeader,
    /// The payload (empty for trim and write-zeroes).
    pub payload: Bytes,
}

fn u16_at(bytes: &[u8], range: std::ops::Range<usize>) -> u16 {
    u16::from_le_bytes(bytes[range].try_into().expect("field is 2 bytes"))
}
fn u32_at(bytes: &[u8], range: std::ops::Range<usize>) -> u32 {
    u32::from_le_bytes(bytes[range].try_into().expect("field is 4 bytes"))
}
fn u64_at(bytes: &[u8], range: std::ops::Range<usize>) -> u64 {
    u64::from_le_bytes(bytes[range].try_into().expect("field is 8 bytes"))
}

/// Rounds `len` up to the record alignment.
pub(crate) const fn align_up(len: usize) -> usize {
    (len + RECORD_ALIGN - 1) & !(RECORD_ALIGN - 1)
}

/// The encoded length of a record with `payload_len` bytes of payload.
pub fn encoded_len(payload_len: usize) -> usize {
    RECORD_HEADER_BYTES + align_up(payload_len)
}

/// Checks the op-kind and length rules shared by encode and decode.
fn check_shape(op: OpKind, payload_len: u64, range_len: u64, offset: u64) -> Result<(), RecordDefect> {
    if payload_len > u64::from(MAX_PAYLOAD_BYTES) {
        return Err(RecordDefect::BadLength("payload exceeds 1 MiB"));
    }
    match op {
        OpKind::Write if payload_len != range_len => {
            return Err(RecordDefect::BadLength("a write's payload length must equal its range length"));
        }
        OpKind::Write if payload_len == 0 => return Err(RecordDefect::BadLength("empty write")),
        OpKind::Trim | OpKind::WriteZeroes if payload_len != 0 => {
            return Err(RecordDefect::BadLength("trim and write-zeroes carry no payload"));
        }
        OpKind::Trim | OpKind::WriteZeroes if range_len == 0 => {
            return Err(RecordDefect::BadLength("empty range"));
        }
        _ => {}
    }
    if offset.checked_add(range_len).is_none() {
        return Err(RecordDefect::BadField("offset + range length overflows"));
    }
    Ok(())
}

/// Checks what a caller asks to append, before any space is taken for it.
pub(crate) fn check_input(input: &RecordInput<'_>) -> Result<(), RecordDefect> {
    check_shape(input.op, input.payload.len() as u64, input.range_len, input.offset)
}

/// Encodes the header of a record (CRC field zero).
pub(crate) fn encode_header(
    input: &RecordInput<'_>,
    lsn: Lsn,
    generation: Generation,
    writer: NodeId,
) -> Result<[u8; RECORD_HEADER_BYTES], RecordDefect> {
    let payload_len = input.payload.len();
    check_shape(input.op, payload_len as u64, input.range_len, input.offset)?;
    if lsn == Lsn::ZERO {
        return Err(RecordDefect::BadField("lsn 0"));
    }
    if writer.0 == 0 {
        return Err(RecordDefect::BadField("writer node 0"));
    }
    let total_len = u32::try_from(encoded_len(payload_len)).expect("a record of at most 1 MiB fits u32");
    let payload_len = u32::try_from(payload_len).expect("checked against 1 MiB");
    let mut header = [0u8; RECORD_HEADER_BYTES];
    header[field::MAGIC].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    header[field::OP].copy_from_slice(&(input.op as u16).to_le_bytes());
    header[field::TOTAL_LEN].copy_from_slice(&total_len.to_le_bytes());
    header[field::PAYLOAD_LEN].copy_from_slice(&payload_len.to_le_bytes());
    header[field::LSN].copy_from_slice(&lsn.0.to_le_bytes());
    header[field::GENERATION].copy_from_slice(&generation.0.to_le_bytes());
    header[field::WRITER].copy_from_slice(&writer.0.to_le_bytes());
    header[field::VOLUME].copy_from_slice(&input.volume.0.to_le_bytes());
    header[field::AGGREGATE].copy_from_slice(&input.aggregate.0);
    header[field::EPOCH_NUMBER].copy_from_slice(&input.epoch.number.to_le_bytes());
    header[field::EPOCH_OWNER].copy_from_slice(&input.epoch.owner.0.to_le_bytes());
    header[field::OFFSET].copy_from_slice(&input.offset.to_le_bytes());
    header[field::RANGE_LEN].copy_from_slice(&input.range_len.to_le_bytes());
    Ok(header)
}

const PADDING: [u8; RECORD_ALIGN] = [0; RECORD_ALIGN];

/// The salted CRC-32 of a record: generation, header without the CRC field, payload, padding.
pub(crate) fn record_crc(generation: Generation, header: &[u8], payload: &[u8], padding: usize) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&generation.0.to_le_bytes());
    hasher.update(&header[..field::CRC.start]);
    hasher.update(&header[field::CRC.end..RECORD_HEADER_BYTES]);
    hasher.update(payload);
    hasher.update(&PADDING[..padding]);
    hasher.finalize()
}

/// Sets the CRC of an encoded header.
pub(crate) fn seal_header(header: &mut [u8; RECORD_HEADER_BYTES], generation: Generation, payload: &[u8]) {
    let padding = align_up(payload.len()) - payload.len();
    let crc = record_crc(generation, header, payload, padding);
    header[field::CRC].copy_from_slice(&crc.to_le_bytes());
}

/// Encodes a whole record (header, payload, padding) into one buffer, as it travels to a
/// partner.
pub fn encode_record(
    input: &RecordInput<'_>,
    lsn: Lsn,
    generation: Generation,
    writer: NodeId,
) -> Result<Vec<u8>, RecordDefect> {
    let mut header = encode_header(input, lsn, generation, writer)?;
    seal_header(&mut header, generation, input.payload);
    let mut out = Vec::with_capacity(encoded_len(input.payload.len()));
    out.extend_from_slice(&header);
    out.extend_from_slice(input.payload);
    out.resize(encoded_len(input.payload.len()), 0);
    Ok(out)
}

/// Decodes and checks a record header, without the CRC (which needs the payload).
pub fn decode_header(bytes: &[u8]) -> Result<RecordHeader, RecordDefect> {
    if bytes.len() < RECORD_HEADER_BYTES {
        return Err(RecordDefect::Truncated { have: bytes.len(), need: RECORD_HEADER_BYTES });
    }
    let bytes = &bytes[..RECORD_HEADER_BYTES];
    if bytes.iter().all(|&b| b == 0) {
        return Err(RecordDefect::Zeroes);
    }
    let magic = u32_at(bytes, field::MAGIC);
    if magic != RECORD_MAGIC {
        return Err(RecordDefect::BadMagic(magic));
    }
    let op_raw = u16_at(bytes, field::OP);
    let op = OpKind::from_u16(op_raw).ok_or(RecordDefect::BadOp(op_raw))?;
    if u16_at(bytes, field::RESERVED_A) != 0 || u64_at(bytes, field::RESERVED_B) != 0 {
        return Err(RecordDefect::Reserved);
    }
    let total_len = u32_at(bytes, field::TOTAL_LEN);
    let payload_len = u32_at(bytes, field::PAYLOAD_LEN);
    let offset = u64_at(bytes, field::OFFSET);
    let range_len = u64_at(bytes, field::RANGE_LEN);
    check_shape(op, u64::from(payload_len), range_len, offset)?;
    if total_len as usize != encoded_len(payload_len as usize) {
        return Err(RecordDefect::BadLength("total length does not match the payload length"));
    }
    let lsn = Lsn(u64_at(bytes, field::LSN));
    if lsn == Lsn::ZERO {
        return Err(RecordDefect::BadField("lsn 0"));
    }
    let writer = NodeId(u32_at(bytes, field::WRITER));
    if writer.0 == 0 {
        return Err(RecordDefect::BadField("writer node 0"));
    }
    Ok(RecordHeader {
        op,
        total_len,
        payload_len,
        lsn,
        generation: Generation(u64_at(bytes, field::GENERATION)),
        writer,
        volume: VolumeId(u32_at(bytes, field::VOLUME)),
        aggregate: AggregateId(bytes[field::AGGREGATE].try_into().expect("16 bytes")),
        epoch: Epoch {
            number: u64_at(bytes, field::EPOCH_NUMBER),
            owner: NodeId(u32_at(bytes, field::EPOCH_OWNER)),
        },
        crc: u32_at(bytes, field::CRC),
        offset,
        range_len,
    })
}

/// Checks the CRC of a whole encoded record whose header decoded as `header`. Padding must be
/// zero: it is covered by the CRC.
pub(crate) fn verify_crc(header: &RecordHeader, bytes: &[u8]) -> Result<(), RecordDefect> {
    let total = header.total_len as usize;
    if bytes.len() < total {
        return Err(RecordDefect::Truncated { have: bytes.len(), need: total });
    }
    let payload_end = RECORD_HEADER_BYTES + header.payload_len as usize;
    let computed = {
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&header.generation.0.to_le_bytes());
        hasher.update(&bytes[..field::CRC.start]);
        hasher.update(&bytes[field::CRC.end..RECORD_HEADER_BYTES]);
        hasher.update(&bytes[RECORD_HEADER_BYTES..total]);
        hasher.finalize()
    };
    if computed != header.crc {
        return Err(RecordDefect::BadCrc { stored: header.crc, computed });
    }
    debug_assert!(payload_end <= total);
    Ok(())
}

impl Record {
    /// Decodes and verifies one whole record (exactly `total_len` bytes or more).
    pub fn decode(bytes: &[u8]) -> Result<Record, RecordDefect> {
        let header = decode_header(bytes)?;
        verify_crc(&header, bytes)?;
        let payload_end = RECORD_HEADER_BYTES + header.payload_len as usize;
        Ok(Record { header, payload: Bytes::copy_from_slice(&bytes[RECORD_HEADER_BYTES..payload_end]) })
    }

    /// Encodes the record again, byte for byte as its writer did (same CRC).
    pub fn encode(&self) -> Vec<u8> {
        let h = &self.header;
        let input = RecordInput {
            op: h.op,
            aggregate: h.aggregate,
            epoch: h.epoch,
            volume: h.volume,
            offset: h.offset,
            range_len: h.range_len,
            payload: &self.payload,
        };
        encode_record(&input, h.lsn, h.generation, h.writer).expect("a decoded record encodes again")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(payload: &[u8]) -> RecordInput<'_> {
        RecordInput {
            op: OpKind::Write,
            aggregate: AggregateId([7; 16]),
            epoch: Epoch { number: 3, owner: NodeId(1) },
            volume: VolumeId(2),
            offset: 4096,
            range_len: payload.len() as u64,
            payload,
        }
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let bytes = encode_record(&input(b"hello"), Lsn(9), Generation(4), NodeId(1)).unwrap();
        assert_eq!(bytes.len(), encoded_len(5));
        let record = Record::decode(&bytes).unwrap();
        assert_eq!(record.header.lsn, Lsn(9));
        assert_eq!(record.header.generation, Generation(4));
        assert_eq!(&record.payload[..], b"hello");
        assert_eq!(record.encode(), bytes);
    }

    /// A record replayed under another generation's salt would resurrect a dead incarnation.
    #[test]
    fn generation_salts_the_crc() {
        let mut bytes = encode_record(&input(b"x"), Lsn(1), Generation(4), NodeId(1)).unwrap();
        bytes[field::GENERATION].copy_from_slice(&5u64.to_le_bytes());
        assert!(matches!(Record::decode(&bytes), Err(RecordDefect::BadCrc { .. })));
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let bytes = encode_record(&input(b"some payload!"), Lsn(1), Generation(1), NodeId(1)).unwrap();
        for bit in 0..bytes.len() * 8 {
            let mut copy = bytes.clone();
            copy[bit / 8] ^= 1 << (bit % 8);
            assert!(Record::decode(&copy).is_err(), "bit {bit} flip accepted");
        }
    }

    #[test]
    fn shape_rules_are_enforced() {
        let mut bad = input(b"abc");
        bad.range_len = 4;
        assert!(encode_record(&bad, Lsn(1), Generation(1), NodeId(1)).is_err());
        let trim = RecordInput { op: OpKind::Trim, payload: b"", range_len: 0, ..input(b"") };
        assert!(encode_record(&trim, Lsn(1), Generation(1), NodeId(1)).is_err());
        let big = vec![0u8; MAX_PAYLOAD_BYTES as usize + 1];
        assert!(encode_record(&input(&big), Lsn(1), Generation(1), NodeId(1)).is_err());
        assert!(encode_record(&input(b"a"), Lsn(0), Generation(1), NodeId(1)).is_err());
    }
}
