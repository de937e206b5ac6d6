//! Recovery as a decision table (DESIGN §5; STYLE: TigerBeetle's journal).
//!
//! Opening a log classifies what it finds into one `Case` per header and per partition; each
//! case has exactly one `Action`, in `RECOVERY_TABLE`. The same table is printed in
//! docs/formats.md, and a test checks that the two agree.
//!
//! Invariants the table relies on:
//! - a half is zeroed (and, in `power` mode, persisted) before it is reused, and the unused rest
//!   of the active half is zeroed at every open, so the first non-record after the last valid
//!   record is either zeroes (a clean end) or a write that never completed (a torn tail); a
//!   listed record that verifies beyond either was written after the lost one, which in
//!   `process` mode only damage can explain;
//! - the header records the last lsn of the sealed half, written only after that half's records
//!   were durable, so a record missing before it can only be corruption, never a crash;
//! - within a partition, lsns strictly increase in file order.

use crate::header::{HeaderDefect, PartitionEntry};
use crate::media::Media;
use crate::record::{RECORD_HEADER_BYTES, RecordDefect, RecordHeader, decode_header, verify_crc};
use crate::types::{Lsn, PartitionKind};

/// What recovery found, per header or per partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Case {
    /// Every record up to the tail verifies; both header copies are valid.
    Valid,
    /// The active half ends in bytes that are neither a valid record nor zeroes (a write that
    /// never completed), or in zeroes followed by listed records that verify (in `power` mode, a
    /// later write that reached the media before an earlier one).
    TornTail,
    /// A record the header says must exist (at or below the sealed half's last lsn, above the
    /// release point) is missing or fails its CRC.
    CorruptBeforeTail,
    /// A record verifies only under a generation the header does not list for its lsn. A crash
    /// cannot produce this (a generation is listed, durably, before its first record is
    /// written): the header in use is older than the records, or the bytes come from elsewhere.
    StaleGeneration,
    /// The header names another cluster or another node.
    ForeignIdentity,
    /// One header copy fails its checks; the other is valid.
    HeaderCopiesDisagree,
    /// Neither header copy is valid.
    BothHeadersBad,
}

/// What recovery does about a `Case`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Use the partition as it is.
    Keep,
    /// Drop everything from the first bad byte to the end of the half (zeroed and persisted);
    /// the records before it are kept. The caller asks the partner for records above the new
    /// tail (S8).
    TruncateTail,
    /// Persist the partition as `failed`: no record of it is replayed or appended until it is
    /// reset; S8 applies (recover from a partner's copy or NVFAIL).
    FailPartition,
    /// Use the valid header copy; the next header write replaces the other.
    UseValidCopy,
    /// Refuse to open and change nothing; the operator must point the node at its own log or
    /// reformat it (S8 then recovers records from the partner or NVFAILs).
    RefuseToOpen,
}

/// One row of the decision table.
#[derive(Clone, Copy, Debug)]
pub struct Row {
    /// What was found.
    pub case: Case,
    /// What is done.
    pub action: Action,
    /// Why, in a sentence (also in docs/formats.md).
    pub why: &'static str,
}

/// The recovery decision table: one row, one action, per case.
pub const RECOVERY_TABLE: [Row; 7] = [
    Row {
        case: Case::Valid,
        action: Action::Keep,
        why: "every record up to the tail verifies; replay the unreleased ones",
    },
    Row {
        case: Case::TornTail,
        action: Action::TruncateTail,
        why: "an append that never completed was never acknowledged; the partner's copy fills in",
    },
    Row {
        case: Case::CorruptBeforeTail,
        action: Action::FailPartition,
        why: "a durable record was lost; replaying around it would skip an acknowledged write",
    },
    Row {
        case: Case::StaleGeneration,
        action: Action::FailPartition,
        why: "a record verifies but the header does not list it: never replay it, never destroy it",
    },
    Row {
        case: Case::ForeignIdentity,
        action: Action::RefuseToOpen,
        why: "another node's log must not be replayed or overwritten as ours",
    },
    Row {
        case: Case::HeaderCopiesDisagree,
        action: Action::UseValidCopy,
        why: "a header write was torn; the other copy was persisted before it started",
    },
    Row {
        case: Case::BothHeadersBad,
        action: Action::RefuseToOpen,
        why: "nothing says where records are or which generations are live",
    },
];

/// The action the table gives for `case`.
pub fn action_for(case: Case) -> Action {
    RECOVERY_TABLE
        .iter()
        .find(|row| row.case == case)
        .map(|row| row.action)
        .expect("the recovery table has a row for every case")
}

/// What recovery did to one partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionRecovery {
    /// Which partition.
    pub kind: PartitionKind,
    /// What was found.
    pub case: Case,
    /// What was done.
    pub action: Action,
    /// Records kept (including released ones still in the file).
    pub records: usize,
    /// The highest lsn kept, or the release point when none is kept.
    pub tail: Lsn,
    /// The defect that ended the scan, when it was not a clean end.
    pub defect: Option<String>,
    /// Records that verify but lie beyond a torn tail (or beyond zeroes, counting only records
    /// whose generation is listed) and were dropped with it. In `power` mode a power loss can
    /// leave such records (none of them was acknowledged, since an acknowledgement covers every
    /// lower lsn); bit rot or a lost sector in an acknowledged record looks the same, so the
    /// caller must take the partner's records above `tail` before serving (S8), or NVFAIL
    /// without one. In `process` mode this is always corruption and the partition fails
    /// instead.
    pub dropped_verified_records: usize,
}

/// What recovery did to the whole log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryReport {
    /// The header case: `Valid` or `HeaderCopiesDisagree`.
    pub header_case: Case,
    /// The log generation of this open.
    pub generation: crate::types::Generation,
    /// One entry per partition.
    pub partitions: Vec<PartitionRecovery>,
}

/// Why a half's scan stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Stop {
    /// Zeroes or the end of the half: nothing more was ever written.
    Clean,
    /// A record that does not verify, or is out of order, or belongs to another writer.
    Damaged(String),
    /// A record that verifies under a generation the header does not list for its lsn.
    Stale(String),
    /// The scan reached the lsn it was told to stop at.
    Reached,
}

/// One record found by a scan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Found {
    pub lsn: Lsn,
    pub offset: u64,
    pub len: u32,
}

pub(crate) struct HalfScan {
    pub records: Vec<Found>,
    /// Bytes of the half holding valid records.
    pub end: u64,
    pub stop: Stop,
}

/// Scans one half from its start: valid records of the partition's writer and listed
/// generations, in strictly increasing lsn order above `above`, up to `stop_at` if given.
pub(crate) fn scan_half<M: Media + ?Sized>(
    media: &M,
    entry: &PartitionEntry,
    half: u32,
    above: Lsn,
    stop_at: Option<Lsn>,
    check_crc: bool,
) -> std::io::Result<HalfScan> {
    let base = entry.half_offset(half);
    let size = entry.half_size();
    let mut records = Vec::new();
    let mut pos = 0u64;
    let mut previous = above;
    let mut header_bytes = [0u8; RECORD_HEADER_BYTES];
    let mut body = Vec::new();
    let stop = loop {
        if stop_at.is_some_and(|stop| previous >= stop) {
            break Stop::Reached;
        }
        if pos + RECORD_HEADER_BYTES as u64 > size {
            break Stop::Clean;
        }
        media.read(base + pos, &mut header_bytes)?;
        let header: RecordHeader = match decode_header(&header_bytes) {
            Ok(header) => header,
            Err(RecordDefect::Zeroes) => break Stop::Clean,
            Err(defect) => break Stop::Damaged(format!("at byte {pos} of half {half}: {defect}")),
        };
        let total = u64::from(header.total_len);
        if pos + total > size {
            break Stop::Damaged(format!("at byte {pos} of half {half}: record runs past the half"));
        }
        if header.writer != entry.writer {
            break Stop::Damaged(format!(
                "at byte {pos} of half {half}: record of node {} in the partition of node {}",
                header.writer, entry.writer
            ));
        }
        body.resize(usize::try_from(total).expect("a record is at most 1 MiB"), 0);
        media.read(base + pos, &mut body)?;
        if check_crc && let Err(defect) = verify_crc(&header, &body) {
            break Stop::Damaged(format!("at byte {pos} of half {half}, lsn {}: {defect}", header.lsn));
        }
        if header.lsn <= previous {
            break Stop::Damaged(format!(
                "at byte {pos} of half {half}: lsn {} does not follow {previous}",
                header.lsn
            ));
        }
        // A released record is never replayed and its generation may be gone from the list;
        // it only has to verify so the scan can step over it.
        if header.lsn > entry.released_lsn && !entry.lists(header.generation, header.lsn) {
            break Stop::Stale(format!(
                "at byte {pos} of half {half}: lsn {} of generation {} is not listed",
                header.lsn, header.generation
            ));
        }
        records.push(Found { lsn: header.lsn, offset: base + pos, len: header.total_len });
        previous = header.lsn;
        pos += total;
    };
    Ok(HalfScan { records, end: pos, stop })
}

/// Finds every record of the partition's writer that verifies, at any 8-byte position of the
/// half from `from` on, whatever its generation or order, and returns their headers; steps over
/// the body of each one found so records inside payloads of genuine records are not counted.
/// Used where the ordinary scan stopped and recovery must know what lies beyond: the highest
/// lsn that exists (so lsns never go back) and whether verified records follow a damaged or
/// zeroed one.
pub(crate) fn sweep_half<M: Media + ?Sized>(
    media: &M,
    entry: &PartitionEntry,
    half: u32,
    from: u64,
    check_crc: bool,
) -> std::io::Result<Vec<RecordHeader>> {
    const CHUNK: u64 = 1 << 20;
    let base = entry.half_offset(half);
    let size = entry.half_size();
    let magic = crate::record::RECORD_MAGIC.to_le_bytes();
    let mut found = Vec::new();
    let mut chunk = Vec::new();
    let mut body = Vec::new();
    let mut pos = from.next_multiple_of(crate::record::RECORD_ALIGN as u64);
    while pos + RECORD_HEADER_BYTES as u64 <= size {
        let chunk_start = pos;
        let len = CHUNK.min(size - chunk_start);
        chunk.resize(usize::try_from(len).expect("chunk fits usize"), 0);
        media.read(base + chunk_start, &mut chunk)?;
        let mut skip_to = chunk_start;
        while pos < chunk_start + len && pos + RECORD_HEADER_BYTES as u64 <= size {
            let at = usize::try_from(pos - chunk_start).expect("in chunk");
            if pos >= skip_to && chunk[at..at + 4] == magic {
                let mut header_bytes = [0u8; RECORD_HEADER_BYTES];
                media.read(base + pos, &mut header_bytes)?;
                if let Ok(header) = decode_header(&header_bytes)
                    && header.writer == entry.writer
                    && pos + u64::from(header.total_len) <= size
                {
                    body.resize(header.total_len as usize, 0);
                    media.read(base + pos, &mut body)?;
                    if !check_crc || verify_crc(&header, &body).is_ok() {
                        found.push(header);
                        skip_to = pos + u64::from(header.total_len);
                    }
                }
            }
            pos += crate::record::RECORD_ALIGN as u64;
        }
        pos = pos.max(skip_to);
    }
    Ok(found)
}

/// Maps a header-copy outcome to its case.
pub(crate) fn header_case(slot0: &Result<(), HeaderDefect>, slot1: &Result<(), HeaderDefect>) -> Case {
    match (slot0.is_ok(), slot1.is_ok()) {
        (true, true) => Case::Valid,
        (false, false) => Case::BothHeadersBad,
        _ => Case::HeaderCopiesDisagree,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_case_has_exactly_one_row() {
        for case in [
            Case::Valid,
            Case::TornTail,
            Case::CorruptBeforeTail,
            Case::StaleGeneration,
            Case::ForeignIdentity,
            Case::HeaderCopiesDisagree,
            Case::BothHeadersBad,
        ] {
            assert_eq!(RECOVERY_TABLE.iter().filter(|row| row.case == case).count(), 1, "{case:?}");
        }
    }

    /// The operator documentation must say what the code does.
    #[test]
    fn docs_print_the_same_table() {
        let docs = include_str!("../../docs/formats.md");
        for row in RECOVERY_TABLE {
            let line = format!("| `{:?}` | `{:?}` | {} |", row.case, row.action, row.why);
            assert!(docs.contains(&line), "docs/formats.md lacks the row:\n{line}");
        }
    }
}
