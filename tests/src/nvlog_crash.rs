//! The NVLog kill-9 workload: what `nvlog-append-child` writes, the lines it acknowledges with,
//! and the checker that compares a recovered log against those acknowledgements (DESIGN §5, S1,
//! S8; STYLE 15).
//!
//! The child appends records whose every field is a function of the lsn (and, for the length, of
//! the child's seed), so the parent can recompute the exact bytes of any record it finds without
//! having seen the child's memory. It reports on stdout, one line at a time:
//!
//! | line          | meaning                                                             |
//! |---------------|---------------------------------------------------------------------|
//! | `S <lsn>`     | recovery and the start-up release are done; the next lsn is `<lsn>` |
//! | `A <lsn> <n>` | the append of lsn `<lsn>` with `<n>` payload bytes has returned     |
//! | `R <lsn>`     | about to release up to `<lsn>` (intent, printed before the call)    |
//! | `D <lsn>`     | the release up to `<lsn>` has returned                              |
//!
//! Invariants the checker enforces after every kill:
//! - every acknowledged lsn above the recovered release point is replayed with exactly the bytes
//!   the child wrote (S1: an acknowledged record is durable);
//! - no replayed record differs from what the generator gives for its lsn and its own length,
//!   acknowledged or not (a torn or stale record is never replayed);
//! - the records above the release point are contiguous (S8);
//! - the recovered release point is at most the highest release intent, and at least the
//!   highest completed release (release points only increase and are durable once returned);
//! - an lsn is acknowledged at most once (lsns only increase, across generations).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use nvlog::{
    AggregateId, ClusterId, Durability, Epoch, Identity, Lsn, LsnGap, MmapMedia, NodeId, Nvlog, OpKind,
    Options, PartitionKind, Record, RecordInput, ReplayFilter, VolumeId,
};

/// The cluster of the crash tests' logs.
pub const CLUSTER: ClusterId = ClusterId(*b"mc-nvlog-sigkill");
/// The aggregate every record is stamped with.
pub const AGGREGATE: AggregateId = AggregateId([0xA5; 16]);
/// The volume every record writes.
pub const VOLUME: VolumeId = VolumeId(1);
/// Block size of the volume: record offsets are multiples of it.
pub const BLOCK_BYTES: u64 = 4096;
/// Records write one of this many blocks, chosen by lsn.
pub const BLOCKS: u64 = 1024;
/// The largest payload the generator produces.
pub const MAX_GENERATED_PAYLOAD_BYTES: usize = 64 * 1024;
/// Size of the NVLog file of the crash tests: one `local` partition of two 6 MiB halves. A half
/// holds far more than the records appended between two of the child's releases (about 50 of at
/// most 64 KiB each), so an append never finds the partition full.
pub const LOG_FILE_BYTES: u64 = 12 * 1024 * 1024 + nvlog::header::DATA_START;

/// The identity of node `node` of the crash tests' cluster.
pub fn identity(node: NodeId) -> Identity {
    Identity { cluster: CLUSTER, node }
}

/// The epoch node `node` stamps its records with.
pub fn epoch(node: NodeId) -> Epoch {
    Epoch { number: 1, owner: node }
}

/// SplitMix64: a tiny, fast, well-mixed hash; the generator's only source of "randomness".
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The payload length of lsn `lsn` in a child run with seed `seed`: mostly 1 to 8192 bytes,
/// one record in sixteen 8 KiB to 64 KiB.
pub fn payload_len(seed: u64, lsn: Lsn) -> usize {
    let draw = mix(mix(seed) ^ lsn.0);
    let (low, high) =
        if draw.is_multiple_of(16) { (8193, MAX_GENERATED_PAYLOAD_BYTES as u64) } else { (1, 8192) };
    let len = low + (draw >> 8) % (high - low + 1);
    usize::try_from(len).expect("at most 64 KiB")
}

/// Fills `out` with the payload of lsn `lsn` of length `len`. The bytes depend on both, so a
/// record whose length field was damaged does not match the content of a shorter record either.
pub fn fill_payload(lsn: Lsn, len: usize, out: &mut Vec<u8>) {
    out.clear();
    let key = mix(lsn.0) ^ mix(len as u64).rotate_left(17);
    let mut word = 0u64;
    while out.len() < len {
        let bytes = mix(key ^ word).to_le_bytes();
        let take = (len - out.len()).min(bytes.len());
        out.extend_from_slice(&bytes[..take]);
        word += 1;
    }
}

/// The payload of lsn `lsn` of length `len`.
pub fn payload(lsn: Lsn, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    fill_payload(lsn, len, &mut out);
    out
}

/// The volume offset lsn `lsn` writes at.
pub fn record_offset(lsn: Lsn) -> u64 {
    (lsn.0 % BLOCKS) * BLOCK_BYTES
}

/// The record the child appends as lsn `lsn` with `payload` (from `fill_payload`).
pub fn record_input(node: NodeId, lsn: Lsn, payload: &[u8]) -> RecordInput<'_> {
    RecordInput {
        op: OpKind::Write,
        aggregate: AGGREGATE,
        epoch: epoch(node),
        volume: VOLUME,
        offset: record_offset(lsn),
        range_len: payload.len() as u64,
        payload,
    }
}

/// One line of the child's stdout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Line {
    /// Recovery and the start-up release are done; `next` is the next lsn to append.
    Serving {
        /// The next lsn.
        next: Lsn,
    },
    /// An append returned: the record is acknowledged.
    Ack {
        /// Its lsn.
        lsn: Lsn,
        /// Its payload length.
        len: u32,
    },
    /// A release up to `lsn` is about to be issued.
    ReleaseIntent(Lsn),
    /// A release up to `lsn` returned.
    Released(Lsn),
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Line::Serving { next } => write!(f, "S {next}"),
            Line::Ack { lsn, len } => write!(f, "A {lsn} {len}"),
            Line::ReleaseIntent(lsn) => write!(f, "R {lsn}"),
            Line::Released(lsn) => write!(f, "D {lsn}"),
        }
    }
}

impl Line {
    /// Parses one complete line, without its newline.
    pub fn parse(text: &str) -> Option<Line> {
        let mut words = text.split(' ');
        let tag = words.next()?;
        let mut number = || words.next()?.parse::<u64>().ok();
        let line = match tag {
            "S" => Line::Serving { next: Lsn(number()?) },
            "A" => Line::Ack { lsn: Lsn(number()?), len: u32::try_from(number()?).ok()? },
            "R" => Line::ReleaseIntent(Lsn(number()?)),
            "D" => Line::Released(Lsn(number()?)),
            _ => return None,
        };
        words.next().is_none().then_some(line)
    }
}

/// What the parent learned from every child so far.
#[derive(Clone, Debug, Default)]
pub struct History {
    /// Every acknowledged lsn and its payload length.
    pub acked: BTreeMap<Lsn, u32>,
    /// The highest release intent (`R`).
    pub max_intent: Lsn,
    /// The highest completed release (`D`).
    pub max_released: Lsn,
}

impl History {
    /// Takes in one line of a child; returns a violation if the line itself breaks a rule.
    pub fn observe(&mut self, line: Line) -> Option<Violation> {
        match line {
            Line::Serving { .. } => None,
            Line::Ack { lsn, len } => {
                let earlier = self.acked.insert(lsn, len)?;
                Some(Violation::AckedTwice { lsn, earlier_len: earlier, len })
            }
            Line::ReleaseIntent(lsn) => {
                self.max_intent = self.max_intent.max(lsn);
                None
            }
            Line::Released(lsn) => {
                self.max_released = self.max_released.max(lsn);
                None
            }
        }
    }

    /// The acknowledged lsns a log released up to `released` must still replay.
    pub fn acked_above(&self, released: Lsn) -> impl Iterator<Item = (Lsn, u32)> + '_ {
        self.acked.range(released.next()..).map(|(&lsn, &len)| (lsn, len))
    }
}

/// What the parent found when it opened the log after a kill.
#[derive(Clone, Debug, Default)]
pub struct Recovered {
    /// The release point of the local partition.
    pub released: Lsn,
    /// The replayed records, in the order replay returned them.
    pub records: Vec<Record>,
    /// Gaps replay reported.
    pub gaps: Vec<LsnGap>,
    /// What recovery found in the local partition (`Case` name), for the summary.
    pub case: String,
    /// The defect that ended recovery's scan, if any.
    pub defect: Option<String>,
}

/// Opens the log at `path` the way a restarting controller does, and replays its local
/// partition. The log is closed again before this returns.
pub fn recover(path: &Path, node: NodeId, durability: Durability) -> Result<Recovered, String> {
    let media = MmapMedia::open(path).map_err(|e| format!("map the NVLog file: {e}"))?;
    let options = Options { durability, ..Options::default() };
    let (log, report) = Nvlog::open(media, identity(node), options).map_err(|e| format!("open: {e}"))?;
    let local = report
        .partitions
        .into_iter()
        .find(|partition| partition.kind == PartitionKind::Local)
        .ok_or("recovery reports no local partition")?;
    let case = format!("{:?}", local.case);
    let defect = local.defect;
    let status = log.status(PartitionKind::Local).map_err(|e| format!("status: {e}"))?;
    let replay = log
        .replay(PartitionKind::Local, &ReplayFilter::default())
        .map_err(|e| format!("replay (recovery found {case}: {defect:?}): {e}"))?;
    Ok(Recovered { released: status.released_lsn, records: replay.records, gaps: replay.gaps, case, defect })
}

/// A broken rule, with the values that show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// The log could not be opened or replayed.
    Unrecoverable(String),
    /// An acknowledged record above the release point is not replayed (S1).
    AckedLost {
        /// The record's lsn.
        lsn: Lsn,
        /// Its acknowledged payload length.
        len: u32,
        /// The recovered release point.
        released: Lsn,
        /// The highest lsn replayed.
        replayed_up_to: Lsn,
    },
    /// An acknowledged record is replayed with another length than the child acknowledged.
    AckedLengthDiffers {
        /// The record's lsn.
        lsn: Lsn,
        /// The acknowledged length.
        acked: u32,
        /// The replayed length.
        replayed: usize,
    },
    /// A replayed record differs from what the generator gives for its lsn and length.
    Corrupt {
        /// The record's lsn.
        lsn: Lsn,
        /// What differs.
        what: String,
    },
    /// Replay returned a record at or below the release point, or out of lsn order.
    OutOfOrder {
        /// The record's lsn.
        lsn: Lsn,
        /// The lsn before it (or the release point).
        after: Lsn,
    },
    /// Replay reported missing lsns above the release point (S8).
    Gap(LsnGap),
    /// The recovered release point is above every release the child announced.
    ReleasedBeyondIntent {
        /// The recovered release point.
        released: Lsn,
        /// The highest intent.
        intent: Lsn,
    },
    /// A release that returned is not in the recovered release point.
    ReleaseLost {
        /// The recovered release point.
        released: Lsn,
        /// The highest release that returned.
        completed: Lsn,
    },
    /// The same lsn was acknowledged twice: an acknowledged record was lost and its lsn reused.
    AckedTwice {
        /// The lsn.
        lsn: Lsn,
        /// The length acknowledged first.
        earlier_len: u32,
        /// The length acknowledged now.
        len: u32,
    },
    /// The child broke the line protocol or stopped by itself.
    Child(String),
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::Unrecoverable(why) => write!(f, "the log cannot be recovered: {why}"),
            Violation::AckedLost { lsn, len, released, replayed_up_to } => write!(
                f,
                "acknowledged lsn {lsn} ({len} bytes) is not replayed (released {released}, \
                 replayed up to {replayed_up_to})"
            ),
            Violation::AckedLengthDiffers { lsn, acked, replayed } => {
                write!(f, "acknowledged lsn {lsn} had {acked} bytes, replay has {replayed}")
            }
            Violation::Corrupt { lsn, what } => write!(f, "replayed lsn {lsn} is corrupt: {what}"),
            Violation::OutOfOrder { lsn, after } => write!(f, "replayed lsn {lsn} after lsn {after}"),
            Violation::Gap(gap) => {
                write!(f, "replay has a gap between lsn {} and lsn {}", gap.after, gap.next)
            }
            Violation::ReleasedBeyondIntent { released, intent } => {
                write!(f, "released up to {released}, but no release above {intent} was issued")
            }
            Violation::ReleaseLost { released, completed } => {
                write!(f, "released up to {released}, but a release up to {completed} had returned")
            }
            Violation::AckedTwice { lsn, earlier_len, len } => {
                write!(f, "lsn {lsn} acknowledged twice ({earlier_len} bytes, then {len} bytes)")
            }
            Violation::Child(why) => write!(f, "child: {why}"),
        }
    }
}

/// Why `record` is not the record the child writes as its lsn, if it is not.
fn record_defect(node: NodeId, record: &Record) -> Option<String> {
    let header = &record.header;
    let lsn = header.lsn;
    let expected = (OpKind::Write, node, VOLUME, AGGREGATE, epoch(node), record_offset(lsn));
    let found = (header.op, header.writer, header.volume, header.aggregate, header.epoch, header.offset);
    if found != expected {
        return Some(format!("header fields {found:?}, expected {expected:?}"));
    }
    if header.range_len != record.payload.len() as u64 {
        return Some(format!("range of {} bytes, payload of {}", header.range_len, record.payload.len()));
    }
    let want = payload(lsn, record.payload.len());
    if record.payload[..] != want[..] {
        let first = record.payload.iter().zip(&want).position(|(a, b)| a != b).unwrap_or_default();
        return Some(format!("payload of {} bytes differs from byte {first} on", want.len()));
    }
    None
}

/// Compares what recovery found with everything the children acknowledged; returns every broken
/// rule (empty when the log kept its promises).
pub fn check(node: NodeId, history: &History, recovered: &Recovered) -> Vec<Violation> {
    let mut violations = Vec::new();
    let released = recovered.released;
    if released > history.max_intent {
        violations.push(Violation::ReleasedBeyondIntent { released, intent: history.max_intent });
    }
    if released < history.max_released {
        violations.push(Violation::ReleaseLost { released, completed: history.max_released });
    }
    violations.extend(recovered.gaps.iter().map(|&gap| Violation::Gap(gap)));
    let mut replayed = BTreeMap::new();
    let mut previous = released;
    for record in &recovered.records {
        let lsn = record.header.lsn;
        if lsn <= previous {
            violations.push(Violation::OutOfOrder { lsn, after: previous });
        }
        previous = previous.max(lsn);
        if let Some(what) = record_defect(node, record) {
            violations.push(Violation::Corrupt { lsn, what });
        }
        replayed.insert(lsn, record.payload.len());
    }
    let replayed_up_to = replayed.keys().next_back().copied().unwrap_or(released);
    for (lsn, len) in history.acked_above(released) {
        match replayed.get(&lsn) {
            None => violations.push(Violation::AckedLost { lsn, len, released, replayed_up_to }),
            Some(&replayed) if replayed != len as usize => {
                violations.push(Violation::AckedLengthDiffers { lsn, acked: len, replayed });
            }
            Some(_) => {}
        }
    }
    violations
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use nvlog::{Generation, RecordHeader};

    use super::*;

    const NODE: NodeId = NodeId(1);

    fn record(lsn: u64, len: usize) -> Record {
        let lsn = Lsn(lsn);
        let payload = payload(lsn, len);
        let input = record_input(NODE, lsn, &payload);
        let header = RecordHeader {
            op: input.op,
            total_len: 0,
            payload_len: u32::try_from(len).unwrap(),
            lsn,
            generation: Generation(2),
            writer: NODE,
            volume: input.volume,
            aggregate: input.aggregate,
            epoch: input.epoch,
            crc: 0,
            offset: input.offset,
            range_len: input.range_len,
        };
        Record { header, payload: Bytes::from(payload) }
    }

    /// Lsns 1..=5 acknowledged, released up to 2 (intent 2), lsns 3..=6 replayed (6 unacked).
    fn good_case() -> (History, Recovered) {
        let mut history = History::default();
        for lsn in 1..=5u32 {
            assert_eq!(history.observe(Line::Ack { lsn: Lsn(lsn.into()), len: 100 + lsn }), None);
        }
        history.observe(Line::ReleaseIntent(Lsn(2)));
        let records = (3..=6u8).map(|lsn| record(lsn.into(), 100 + usize::from(lsn))).collect();
        (history, Recovered { released: Lsn(2), records, ..Recovered::default() })
    }

    #[test]
    fn an_intact_log_passes() {
        let (history, recovered) = good_case();
        assert_eq!(check(NODE, &history, &recovered), vec![]);
    }

    /// A checker that ignored lost acknowledgements would pass a log that drops its tail.
    #[test]
    fn a_lost_acknowledged_record_is_reported() {
        let (history, mut recovered) = good_case();
        recovered.records.truncate(2);
        let violations = check(NODE, &history, &recovered);
        assert!(matches!(violations[..], [Violation::AckedLost { lsn: Lsn(5), .. }]), "{violations:?}");
    }

    /// A checker that trusted replay would pass a torn record replayed without its CRC check.
    #[test]
    fn a_corrupt_record_is_reported_acknowledged_or_not() {
        for lsn in [4, 6] {
            let (history, mut recovered) = good_case();
            let index = lsn - 3;
            let mut bytes = recovered.records[index].payload.to_vec();
            bytes[7] ^= 0x10;
            recovered.records[index].payload = Bytes::from(bytes);
            let violations = check(NODE, &history, &recovered);
            assert!(matches!(violations[..], [Violation::Corrupt { .. }]), "{violations:?}");
        }
        let (history, mut recovered) = good_case();
        recovered.records[1].header.offset += BLOCK_BYTES;
        assert!(matches!(check(NODE, &history, &recovered)[..], [Violation::Corrupt { .. }]));
    }

    #[test]
    fn release_points_are_checked_against_intents_and_completions() {
        let (mut history, mut recovered) = good_case();
        recovered.released = Lsn(3);
        recovered.records.remove(0);
        assert!(matches!(check(NODE, &history, &recovered)[..], [Violation::ReleasedBeyondIntent { .. }]));
        let (_, recovered) = good_case();
        history.observe(Line::ReleaseIntent(Lsn(3)));
        history.observe(Line::Released(Lsn(3)));
        assert!(matches!(check(NODE, &history, &recovered)[..], [Violation::ReleaseLost { .. }]));
    }

    #[test]
    fn a_reused_lsn_and_a_changed_length_are_reported() {
        let (mut history, mut recovered) = good_case();
        assert!(matches!(
            history.observe(Line::Ack { lsn: Lsn(5), len: 1 }),
            Some(Violation::AckedTwice { lsn: Lsn(5), .. })
        ));
        recovered.records[2] = record(5, 7);
        assert!(matches!(check(NODE, &history, &recovered)[..], [Violation::AckedLengthDiffers { .. }]));
    }

    #[test]
    fn lines_round_trip_and_garbage_is_refused() {
        for line in [
            Line::Serving { next: Lsn(7) },
            Line::Ack { lsn: Lsn(9), len: 4096 },
            Line::ReleaseIntent(Lsn(3)),
            Line::Released(Lsn(3)),
        ] {
            assert_eq!(Line::parse(&line.to_string()), Some(line));
        }
        for garbage in ["", "A", "A 1", "A 1 2 3", "X 1", "R x", "A 1 99999999999"] {
            assert_eq!(Line::parse(garbage), None, "{garbage:?}");
        }
    }

    #[test]
    fn the_generator_is_deterministic_and_depends_on_lsn_and_length() {
        assert_eq!(payload(Lsn(5), 100), payload(Lsn(5), 100));
        assert_ne!(payload(Lsn(5), 100), payload(Lsn(6), 100));
        assert_ne!(payload(Lsn(5), 100)[..50], payload(Lsn(5), 50)[..]);
        let lens: Vec<_> = (1..=4000).map(|lsn| payload_len(42, Lsn(lsn))).collect();
        assert!(lens.iter().all(|&len| (1..=MAX_GENERATED_PAYLOAD_BYTES).contains(&len)));
        assert!(lens.iter().any(|&len| len > 8192), "some records must be large");
        assert!(lens.iter().any(|&len| len < 64), "some records must be tiny");
    }
}
