//! The operation journal (DESIGN §11): every switchover or unfence this node runs is recorded
//! durably before it starts and as it progresses, so `mcctl operation show` can report it and a
//! controller restarted in the middle can resume or roll it back.
//!
//! The file is `<shelf>/.operations`, replaced atomically (written to a temporary file, fsynced,
//! renamed, directory fsynced, as `shelf_state` does); its layout is in `docs/formats.md`
//! ("Operation journal").
//!
//! Invariants:
//! - ids only rise: `begin` takes `next_id`, which the file keeps, so an id is never reused, not
//!   even after the record it named was dropped and the journal reopened;
//! - the file generation only rises: every replacement writes the next one;
//! - `begin`, `update` and `finish` return once the change is durable in the file; the in-memory
//!   copy changes only after the file did, and replacements are serialized;
//! - at most `MAX_RECORDS` records are kept; the oldest finished ones are dropped first and an
//!   `in_progress` record is never dropped (a `begin` that would need to is refused);
//! - a file that fails its checks (magic, version, owner, bounds, CRC) is an error at open, never
//!   silently an empty journal; a missing file is an empty one;
//! - after a failed write the journal refuses every change until it is reopened (fail-stop).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::shelf_state::ShelfOwner;

const MAGIC: [u8; 8] = *b"MCOPLOG1";
const VERSION: u32 = 1;
/// Bytes of the header: magic, version, record count, cluster id, node id, reserved, next id,
/// generation.
const HEADER_BYTES: usize = 56;
/// Bytes of a record before its strings and payload.
const RECORD_FIXED_BYTES: usize = 32;
/// The file name in the shelf directory (a dot file: never taken for a disk).
pub const FILE_NAME: &str = ".operations";
/// The most records the journal keeps.
pub const MAX_RECORDS: usize = 64;
/// The longest step text, in bytes.
pub const MAX_STEP_BYTES: usize = 256;
/// The most errors one operation records.
pub const MAX_ERRORS: usize = 16;
/// The longest error text, in bytes.
pub const MAX_ERROR_BYTES: usize = 1024;
/// The largest payload, in bytes.
pub const MAX_PAYLOAD_BYTES: usize = 64 << 10;

const _: () = assert!(HEADER_BYTES == 8 + 4 + 4 + 16 + 4 + 4 + 8 + 8);
const _: () = assert!(RECORD_FIXED_BYTES == 8 + 1 + 1 + 2 + 4 + 8 + 8);

/// What an operation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OperationKind {
    /// A forced switchover (`switchover --forced-on-disaster`).
    Switchover,
    /// A forced unfence.
    Unfence,
    /// A heal: the switched-over aggregates' home plexes reattached and resynced.
    Heal,
    /// A switchback: the switched-over aggregates returned to their home node.
    Switchback,
}

impl OperationKind {
    fn code(self) -> u8 {
        match self {
            OperationKind::Switchover => 1,
            OperationKind::Unfence => 2,
            OperationKind::Heal => 3,
            OperationKind::Switchback => 4,
        }
    }

    fn from_code(code: u8) -> Option<OperationKind> {
        match code {
            1 => Some(OperationKind::Switchover),
            2 => Some(OperationKind::Unfence),
            3 => Some(OperationKind::Heal),
            4 => Some(OperationKind::Switchback),
            _ => None,
        }
    }

    /// The name `mcctl` and the wire use.
    pub fn name(self) -> &'static str {
        match self {
            OperationKind::Switchover => "switchover",
            OperationKind::Unfence => "unfence",
            OperationKind::Heal => "heal",
            OperationKind::Switchback => "switchback",
        }
    }
}

/// Where an operation is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OperationState {
    /// Running, or interrupted by a crash (a re-run resumes it).
    InProgress,
    /// Done.
    Successful,
    /// Done for some aggregates only.
    PartiallySuccessful,
    /// Not done.
    Failed,
}

impl OperationState {
    fn code(self) -> u8 {
        match self {
            OperationState::InProgress => 1,
            OperationState::Successful => 2,
            OperationState::PartiallySuccessful => 3,
            OperationState::Failed => 4,
        }
    }

    fn from_code(code: u8) -> Option<OperationState> {
        match code {
            1 => Some(OperationState::InProgress),
            2 => Some(OperationState::Successful),
            3 => Some(OperationState::PartiallySuccessful),
            4 => Some(OperationState::Failed),
            _ => None,
        }
    }

    /// The name `mcctl` and the wire use (ONTAP's).
    pub fn name(self) -> &'static str {
        match self {
            OperationState::InProgress => "in_progress",
            OperationState::Successful => "successful",
            OperationState::PartiallySuccessful => "partially_successful",
            OperationState::Failed => "failed",
        }
    }
}

/// One operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperationRecord {
    /// Raised by every new operation of this node.
    pub id: u64,
    /// What.
    pub kind: OperationKind,
    /// Where.
    pub state: OperationState,
    /// Unix milliseconds.
    pub start_unix_ms: u64,
    /// Unix milliseconds; 0 while in progress.
    pub end_unix_ms: u64,
    /// What failed.
    pub errors: Vec<String>,
    /// The node that runs it.
    pub node: u32,
    /// The step reached, in words.
    pub step: String,
    /// The operation's own durable progress (its type encodes it), at most `MAX_PAYLOAD_BYTES`.
    pub payload: Vec<u8>,
}

/// Why the journal failed.
#[derive(Debug, thiserror::Error)]
pub enum OperationLogError {
    /// A refused change: an unknown or finished operation, a value over its bound, a journal
    /// full of operations in progress, or a journal latched failed by an earlier write error.
    #[error("operation journal: {0}")]
    Failed(String),
    /// The file is damaged or belongs to another node.
    #[error("operation journal {path}: {reason}")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The file could not be read or written.
    #[error("operation journal {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// What the file holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Journal {
    /// The id the next `begin` takes: above every id ever used.
    next_id: u64,
    /// Raised by every replacement of the file.
    generation: u64,
    /// Oldest first, ids strictly rising.
    records: Vec<OperationRecord>,
}

impl Journal {
    fn empty() -> Journal {
        Journal { next_id: 1, generation: 0, records: Vec::new() }
    }
}

/// The clock the journal stamps records with: unix milliseconds.
pub type Clock = fn() -> u64;

/// The system clock in unix milliseconds (0 before 1970, which no real clock reports).
pub fn system_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The journal.
#[derive(Debug)]
pub struct OperationLog {
    path: PathBuf,
    owner: ShelfOwner,
    clock: Clock,
    /// What the file holds.
    journal: Mutex<Journal>,
    /// Serializes file replacements.
    writer: tokio::sync::Mutex<()>,
    /// Set by a failed write: every later change is refused until the journal is reopened.
    failed: AtomicBool,
}

fn check_bounds(record: &OperationRecord) -> Result<(), String> {
    if record.step.len() > MAX_STEP_BYTES {
        return Err(format!("step of {} bytes is over {MAX_STEP_BYTES}", record.step.len()));
    }
    if record.errors.len() > MAX_ERRORS {
        return Err(format!("{} errors are over {MAX_ERRORS}", record.errors.len()));
    }
    if let Some(long) = record.errors.iter().find(|e| e.len() > MAX_ERROR_BYTES) {
        return Err(format!("an error of {} bytes is over {MAX_ERROR_BYTES}", long.len()));
    }
    if record.payload.len() > MAX_PAYLOAD_BYTES {
        return Err(format!("payload of {} bytes is over {MAX_PAYLOAD_BYTES}", record.payload.len()));
    }
    Ok(())
}

/// A length as the file stores it (callers have checked the bounds, all far below `u32::MAX`).
fn len_u32(len: usize) -> [u8; 4] {
    u32::try_from(len).expect("lengths are bounded far below u32::MAX").to_le_bytes()
}

fn encode(owner: ShelfOwner, journal: &Journal) -> Vec<u8> {
    assert!(journal.records.len() <= MAX_RECORDS, "{} records", journal.records.len());
    let mut out = Vec::with_capacity(HEADER_BYTES + 4);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&len_u32(journal.records.len()));
    out.extend_from_slice(&owner.cluster);
    out.extend_from_slice(&owner.node.to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&journal.next_id.to_le_bytes());
    out.extend_from_slice(&journal.generation.to_le_bytes());
    for record in &journal.records {
        // Checked by every change before it gets here: the decoder would refuse the file.
        assert!(check_bounds(record).is_ok(), "record {} over its bounds", record.id);
        out.extend_from_slice(&record.id.to_le_bytes());
        out.extend_from_slice(&[record.kind.code(), record.state.code(), 0, 0]);
        out.extend_from_slice(&record.node.to_le_bytes());
        out.extend_from_slice(&record.start_unix_ms.to_le_bytes());
        out.extend_from_slice(&record.end_unix_ms.to_le_bytes());
        out.extend_from_slice(&len_u32(record.step.len()));
        out.extend_from_slice(record.step.as_bytes());
        out.extend_from_slice(&len_u32(record.errors.len()));
        for error in &record.errors {
            out.extend_from_slice(&len_u32(error.len()));
            out.extend_from_slice(error.as_bytes());
        }
        out.extend_from_slice(&len_u32(record.payload.len()));
        out.extend_from_slice(&record.payload);
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Reads fields in order, each read checked against the end.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize, what: &str) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(len).filter(|end| *end <= self.bytes.len());
        let Some(end) = end else {
            return Err(format!("{what} of {len} bytes at offset {} runs past the end", self.at));
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

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A length at most `max`.
    fn len(&mut self, max: usize, what: &str) -> Result<usize, String> {
        let len = usize::try_from(self.u32(what)?).unwrap_or(usize::MAX);
        if len > max {
            return Err(format!("{what} {len} is over {max}"));
        }
        Ok(len)
    }

    /// A length-prefixed UTF-8 string of at most `max` bytes.
    fn string(&mut self, max: usize, what: &str) -> Result<String, String> {
        let len = self.len(max, what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }
}

fn decode(owner: ShelfOwner, bytes: &[u8]) -> Result<Journal, String> {
    if bytes.len() < HEADER_BYTES + 4 {
        return Err(format!("{} bytes is too short", bytes.len()));
    }
    if bytes[..8] != MAGIC {
        return Err("bad magic".into());
    }
    let body = bytes.len() - 4;
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&bytes[body..]);
    if crc32fast::hash(&bytes[..body]) != u32::from_le_bytes(crc) {
        return Err("CRC mismatch".into());
    }
    let mut r = Reader { bytes: &bytes[..body], at: 8 };
    let version = r.u32("version")?;
    if version != VERSION {
        return Err(format!("unsupported version {version}"));
    }
    let count = r.len(MAX_RECORDS, "record count")?;
    let cluster: [u8; 16] = r.array("cluster id")?;
    let node = r.u32("node id")?;
    if cluster != owner.cluster || node != owner.node {
        return Err(format!(
            "the file belongs to node {node} of cluster {}, not to node {} of cluster {}",
            crate::node::hex(&cluster),
            owner.node,
            crate::node::hex(&owner.cluster)
        ));
    }
    if r.u32("reserved")? != 0 {
        return Err("reserved header bytes are not zero".into());
    }
    let next_id = r.u64("next id")?;
    let generation = r.u64("generation")?;
    let mut records = Vec::with_capacity(count);
    for i in 0..count {
        let id = r.u64("id")?;
        let [kind, state, reserved0, reserved1] = r.array::<4>("kind and state")?;
        let kind = OperationKind::from_code(kind).ok_or(format!("record {i}: unknown kind {kind}"))?;
        let state = OperationState::from_code(state).ok_or(format!("record {i}: unknown state {state}"))?;
        if reserved0 != 0 || reserved1 != 0 {
            return Err(format!("record {i}: reserved bytes are not zero"));
        }
        let record_node = r.u32("node")?;
        if record_node != owner.node {
            return Err(format!("record {i}: run by node {record_node}, not by {}", owner.node));
        }
        let start_unix_ms = r.u64("start")?;
        let end_unix_ms = r.u64("end")?;
        let step = r.string(MAX_STEP_BYTES, "step length")?;
        let error_count = r.len(MAX_ERRORS, "error count")?;
        let mut errors = Vec::with_capacity(error_count);
        for _ in 0..error_count {
            errors.push(r.string(MAX_ERROR_BYTES, "error length")?);
        }
        let payload_len = r.len(MAX_PAYLOAD_BYTES, "payload length")?;
        let payload = r.take(payload_len, "payload")?.to_vec();
        if records.last().is_some_and(|last: &OperationRecord| last.id >= id) {
            return Err(format!("record {i}: id {id} does not rise"));
        }
        if id == 0 || id >= next_id {
            return Err(format!("record {i}: id {id} is not in 1..{next_id}"));
        }
        records.push(OperationRecord {
            id,
            kind,
            state,
            start_unix_ms,
            end_unix_ms,
            errors,
            node: record_node,
            step,
            payload,
        });
    }
    if r.at != body {
        return Err(format!("{} bytes follow the last record", body - r.at));
    }
    if next_id == 0 {
        return Err("next id is 0".into());
    }
    Ok(Journal { next_id, generation, records })
}

/// Drops the oldest finished records until at most `MAX_RECORDS` remain; never an in-progress
/// one, so more than `MAX_RECORDS` may remain when too many are in progress.
fn prune(records: &mut Vec<OperationRecord>) {
    let mut excess = records.len().saturating_sub(MAX_RECORDS);
    // The latest switchover, heal and switchback are kept: their plans say which of the
    // partner's aggregates this node serves, whether their home plexes were reattached, and
    // whether the partner's partition is frozen.
    let latest = |kind: OperationKind| records.iter().rev().find(|r| r.kind == kind).map(|r| r.id);
    let kept =
        [latest(OperationKind::Switchover), latest(OperationKind::Heal), latest(OperationKind::Switchback)];
    records.retain(|r| {
        if excess > 0 && r.state != OperationState::InProgress && !kept.contains(&Some(r.id)) {
            excess -= 1;
            false
        } else {
            true
        }
    });
}

impl OperationLog {
    /// Opens `<dir>/.operations` (a missing file is an empty journal; the directory is created;
    /// a damaged file, or one of another cluster or node, is refused).
    pub fn open(dir: &Path, owner: ShelfOwner) -> Result<Arc<OperationLog>, OperationLogError> {
        OperationLog::open_with_clock(dir, owner, system_unix_ms)
    }

    /// `open`, stamping records with `clock` (tests inject one).
    pub fn open_with_clock(
        dir: &Path,
        owner: ShelfOwner,
        clock: Clock,
    ) -> Result<Arc<OperationLog>, OperationLogError> {
        let path = dir.join(FILE_NAME);
        let io = |source| OperationLogError::Io { path: path.display().to_string(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        let journal = match std::fs::read(&path) {
            Ok(bytes) => decode(owner, &bytes)
                .map_err(|reason| OperationLogError::Corrupt { path: path.display().to_string(), reason })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Journal::empty(),
            Err(e) => return Err(io(e)),
        };
        Ok(Arc::new(OperationLog {
            path,
            owner,
            clock,
            journal: Mutex::new(journal),
            writer: tokio::sync::Mutex::new(()),
            failed: AtomicBool::new(false),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Journal> {
        self.journal.lock().expect("the operation journal lock holder panicked")
    }

    /// Every operation, oldest first.
    pub fn list(&self) -> Vec<OperationRecord> {
        self.lock().records.clone()
    }

    /// Operation `id`, if the journal still holds it.
    pub fn get(&self, id: u64) -> Option<OperationRecord> {
        self.lock().records.iter().find(|r| r.id == id).cloned()
    }

    /// The operations in progress (interrupted by a crash, or running), oldest first.
    pub fn in_progress(&self) -> Vec<OperationRecord> {
        self.lock().records.iter().filter(|r| r.state == OperationState::InProgress).cloned().collect()
    }

    /// The newest operation.
    pub fn last(&self) -> Option<OperationRecord> {
        self.lock().records.last().cloned()
    }

    /// A new operation, durable when this returns.
    pub async fn begin(
        &self,
        kind: OperationKind,
        step: &str,
        payload: Vec<u8>,
    ) -> Result<OperationRecord, OperationLogError> {
        let now = (self.clock)();
        let node = self.owner.node;
        let step = step.to_string();
        self.change(move |journal| {
            let id = journal.next_id;
            let record = OperationRecord {
                id,
                kind,
                state: OperationState::InProgress,
                start_unix_ms: now,
                end_unix_ms: 0,
                errors: Vec::new(),
                node,
                step,
                payload,
            };
            check_bounds(&record)?;
            journal.next_id = id.checked_add(1).ok_or("operation ids are exhausted")?;
            journal.records.push(record.clone());
            prune(&mut journal.records);
            if journal.records.len() > MAX_RECORDS {
                return Err(format!("{MAX_RECORDS} operations are in progress already"));
            }
            Ok(record)
        })
        .await
    }

    /// Records progress, durably.
    pub async fn update(&self, id: u64, step: &str, payload: Vec<u8>) -> Result<(), OperationLogError> {
        let step = step.to_string();
        self.change(move |journal| {
            let record = in_progress_mut(journal, id)?;
            record.step = step;
            record.payload = payload;
            check_bounds(record)
        })
        .await
    }

    /// Ends an operation, durably.
    pub async fn finish(
        &self,
        id: u64,
        state: OperationState,
        errors: Vec<String>,
    ) -> Result<(), OperationLogError> {
        if state == OperationState::InProgress {
            return Err(OperationLogError::Failed(format!("operation {id} cannot finish in_progress")));
        }
        let now = (self.clock)();
        self.change(move |journal| {
            let record = in_progress_mut(journal, id)?;
            record.state = state;
            record.errors = errors;
            // A finished record always has an end, even from a clock stuck at 0.
            record.end_unix_ms = now.max(record.start_unix_ms).max(1);
            check_bounds(record)
        })
        .await
    }

    /// Applies `change` to a copy of the journal, writes it with the next generation, then
    /// makes it the in-memory copy.
    async fn change<T>(
        &self,
        change: impl FnOnce(&mut Journal) -> Result<T, String>,
    ) -> Result<T, OperationLogError> {
        let _writer = self.writer.lock().await;
        if self.failed.load(Ordering::SeqCst) {
            return Err(OperationLogError::Failed(
                "an earlier write failed: reopen the journal (restart the controller)".into(),
            ));
        }
        let mut next = self.lock().clone();
        let value = change(&mut next).map_err(OperationLogError::Failed)?;
        next.generation = next
            .generation
            .checked_add(1)
            .ok_or(OperationLogError::Failed("the journal generation is exhausted".into()))?;
        let bytes = encode(self.owner, &next);
        let path = self.path.clone();
        let written = tokio::task::spawn_blocking(move || crate::shelf_state::replace_file(&path, &bytes))
            .await
            .map_err(|e| std::io::Error::other(format!("operation journal task: {e}")))
            .and_then(|r| r);
        if let Err(source) = written {
            // Fail-stop: what the file holds is unknown now.
            self.failed.store(true, Ordering::SeqCst);
            return Err(OperationLogError::Io { path: self.path.display().to_string(), source });
        }
        *self.lock() = next;
        Ok(value)
    }
}

fn in_progress_mut(journal: &mut Journal, id: u64) -> Result<&mut OperationRecord, String> {
    let record = journal.records.iter_mut().find(|r| r.id == id).ok_or(format!("no operation {id}"))?;
    if record.state != OperationState::InProgress {
        return Err(format!("operation {id} is finished ({})", record.state.name()));
    }
    Ok(record)
}

/// As `Admin.Operations` returns it.
pub fn to_wire(record: &OperationRecord) -> mc_proto::v1::Operation {
    mc_proto::v1::Operation {
        id: record.id,
        kind: record.kind.name().to_string(),
        state: record.state.name().to_string(),
        start_unix_ms: record.start_unix_ms,
        end_unix_ms: record.end_unix_ms,
        errors: record.errors.clone(),
        node: record.node,
        step: record.step.clone(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

    use super::*;

    const OWNER: ShelfOwner = ShelfOwner { cluster: [9; 16], node: 2 };

    fn clock() -> u64 {
        1_700_000_000_000
    }

    fn record(id: u64, state: OperationState) -> OperationRecord {
        OperationRecord {
            id,
            kind: if id.is_multiple_of(2) { OperationKind::Switchover } else { OperationKind::Unfence },
            state,
            start_unix_ms: 1000 + id,
            end_unix_ms: if state == OperationState::InProgress { 0 } else { 2000 + id },
            errors: if state == OperationState::Failed {
                vec!["plex 1: é timeout".into()]
            } else {
                Vec::new()
            },
            node: OWNER.node,
            step: format!("step {id}"),
            payload: vec![u8::try_from(id % 251).unwrap(); usize::try_from(id % 7).unwrap()],
        }
    }

    fn sample() -> Journal {
        Journal {
            next_id: 9,
            generation: 4,
            records: vec![
                record(2, OperationState::Successful),
                record(5, OperationState::Failed),
                record(8, OperationState::InProgress),
            ],
        }
    }

    /// Prevents a field lost or reordered between encode and decode.
    #[test]
    fn round_trip() {
        let journal = sample();
        assert_eq!(decode(OWNER, &encode(OWNER, &journal)).unwrap(), journal);
        let empty = Journal::empty();
        let bytes = encode(OWNER, &empty);
        assert_eq!(bytes.len(), HEADER_BYTES + 4);
        assert_eq!(decode(OWNER, &bytes).unwrap(), empty);
        // Every bound, at its limit, still fits.
        let mut full = record(3, OperationState::Failed);
        full.step = "s".repeat(MAX_STEP_BYTES);
        full.errors = vec!["e".repeat(MAX_ERROR_BYTES); MAX_ERRORS];
        full.payload = vec![7; MAX_PAYLOAD_BYTES];
        let journal = Journal { next_id: 4, generation: 1, records: vec![full] };
        assert_eq!(decode(OWNER, &encode(OWNER, &journal)).unwrap(), journal);
    }

    /// Prevents a reused operation id (a stale record taken for a new one) and records lost on a
    /// restart.
    #[tokio::test]
    async fn reopen_keeps_records_and_ids_keep_rising() {
        let dir = tempfile::tempdir().unwrap();
        let log = OperationLog::open_with_clock(dir.path(), OWNER, clock).unwrap();
        assert!(log.list().is_empty() && log.last().is_none());
        let first = log.begin(OperationKind::Switchover, "freeze", vec![1, 2]).await.unwrap();
        assert_eq!((first.id, first.state, first.start_unix_ms), (1, OperationState::InProgress, clock()));
        log.update(first.id, "replay", vec![3]).await.unwrap();
        log.finish(first.id, OperationState::PartiallySuccessful, vec!["aggr_b: no plex".into()])
            .await
            .unwrap();
        // A finished operation takes no more changes; an unknown one none at all.
        assert!(log.update(first.id, "again", Vec::new()).await.is_err());
        assert!(log.finish(first.id, OperationState::Failed, Vec::new()).await.is_err());
        assert!(log.update(77, "x", Vec::new()).await.is_err());
        let second = log.begin(OperationKind::Unfence, "raise epochs", Vec::new()).await.unwrap();
        assert_eq!(second.id, 2);
        let before = log.list();
        drop(log);

        let log = OperationLog::open_with_clock(dir.path(), OWNER, clock).unwrap();
        assert_eq!(log.list(), before);
        let first = log.get(1).unwrap();
        assert_eq!(first.step, "replay");
        assert_eq!(first.payload, vec![3]);
        assert_eq!(first.state, OperationState::PartiallySuccessful);
        assert_eq!(first.end_unix_ms, clock());
        assert_eq!(log.in_progress().iter().map(|r| r.id).collect::<Vec<_>>(), vec![2]);
        assert_eq!(log.begin(OperationKind::Switchover, "s", Vec::new()).await.unwrap().id, 3);
        assert_eq!(log.last().unwrap().id, 3);
        let wire = to_wire(&log.get(1).unwrap());
        assert_eq!((wire.kind.as_str(), wire.state.as_str()), ("switchover", "partially_successful"));
        assert_eq!(to_wire(&log.get(2).unwrap()).kind, "unfence");
        assert_eq!(to_wire(&log.get(2).unwrap()).state, "in_progress");
    }

    /// Prevents values over their bounds from reaching the file (the decoder would then refuse
    /// it at the next start).
    #[tokio::test]
    async fn bounds_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let log = OperationLog::open_with_clock(dir.path(), OWNER, clock).unwrap();
        let long = "x".repeat(MAX_STEP_BYTES + 1);
        assert!(log.begin(OperationKind::Switchover, &long, Vec::new()).await.is_err());
        assert!(log.begin(OperationKind::Switchover, "s", vec![0; MAX_PAYLOAD_BYTES + 1]).await.is_err());
        let op = log.begin(OperationKind::Switchover, "s", Vec::new()).await.unwrap();
        assert!(
            log.finish(op.id, OperationState::Failed, vec![String::new(); MAX_ERRORS + 1]).await.is_err()
        );
        let long_error = vec!["e".repeat(MAX_ERROR_BYTES + 1)];
        assert!(log.finish(op.id, OperationState::Failed, long_error).await.is_err());
        assert!(log.finish(op.id, OperationState::InProgress, Vec::new()).await.is_err());
        log.finish(op.id, OperationState::Failed, vec!["e".into()]).await.unwrap();
        // The refused changes left no trace and the ids they would have used stay unused.
        assert_eq!(log.list().len(), 1);
        assert_eq!(OperationLog::open(dir.path(), OWNER).unwrap().list(), log.list());
    }

    /// Prevents a flipped bit or a torn file from being read as a (different) journal.
    #[test]
    fn every_flip_and_truncation_is_detected() {
        let bytes = encode(OWNER, &sample());
        for at in 0..bytes.len() {
            for bit in 0..8 {
                let mut damaged = bytes.clone();
                damaged[at] ^= 1 << bit;
                assert!(decode(OWNER, &damaged).is_err(), "a flip of bit {bit} at byte {at} went unnoticed");
            }
        }
        for len in 0..bytes.len() {
            assert!(decode(OWNER, &bytes[..len]).is_err(), "a truncation to {len} bytes went unnoticed");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode(OWNER, &longer).is_err());
    }

    /// Prevents a panic (or a huge allocation) on any bytes, including ones with a valid CRC.
    #[test]
    fn garbage_never_panics() {
        let seed = 0x5eed_0f0b_u64;
        println!("seed {seed:#x}");
        let mut state = seed;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            state
        };
        let valid = encode(OWNER, &sample());
        for round in 0..3000 {
            let r = next();
            let mut bytes: Vec<u8> = if round % 2 == 0 {
                let len = usize::try_from(r >> 53).unwrap();
                (0..len).map(|_| (next() >> 56) as u8).collect()
            } else {
                // Damage a valid file, then fix its CRC so the field checks are what is tested.
                let mut b = valid.clone();
                for _ in 0..1 + r % 4 {
                    let at = usize::try_from(next() % b.len() as u64).unwrap();
                    b[at] = (next() >> 56) as u8;
                }
                b
            };
            if bytes.len() >= 4 && round % 4 != 0 {
                let body = bytes.len() - 4;
                let crc = crc32fast::hash(&bytes[..body]);
                bytes[body..].copy_from_slice(&crc.to_le_bytes());
            }
            let _ = decode(OWNER, &bytes);
        }
    }

    /// Prevents a journal moved to (or left on) another node's shelf being taken as its own.
    #[test]
    fn another_nodes_file_is_refused() {
        let bytes = encode(OWNER, &sample());
        assert!(decode(ShelfOwner { node: 3, ..OWNER }, &bytes).is_err());
        assert!(decode(ShelfOwner { cluster: [8; 16], ..OWNER }, &bytes).is_err());
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), &bytes).unwrap();
        let other = OperationLog::open(dir.path(), ShelfOwner { node: 1, ..OWNER });
        assert!(matches!(other, Err(OperationLogError::Corrupt { .. })), "{other:?}");
        std::fs::write(dir.path().join(FILE_NAME), b"not a journal").unwrap();
        let damaged = OperationLog::open(dir.path(), OWNER);
        assert!(matches!(damaged, Err(OperationLogError::Corrupt { .. })), "{damaged:?}");
    }

    /// The latest switchover outlives any number of later operations: its plan says which of
    /// the partner's aggregates the node serves after a restart (found by a review: a survivor
    /// unfenced at 64 restarts lost them).
    #[tokio::test]
    async fn the_latest_switchover_is_never_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let log = OperationLog::open_with_clock(dir.path(), OWNER, clock).unwrap();
        let old = log.begin(OperationKind::Switchover, "s", Vec::new()).await.unwrap();
        log.finish(old.id, OperationState::Successful, Vec::new()).await.unwrap();
        let latest = log.begin(OperationKind::Switchover, "s", vec![7]).await.unwrap();
        log.finish(latest.id, OperationState::Successful, Vec::new()).await.unwrap();
        for _ in 0..MAX_RECORDS + 10 {
            let op = log.begin(OperationKind::Unfence, "s", Vec::new()).await.unwrap();
            log.finish(op.id, OperationState::Successful, Vec::new()).await.unwrap();
        }
        let list = OperationLog::open(dir.path(), OWNER).unwrap().list();
        assert_eq!(list.len(), MAX_RECORDS);
        assert!(list.iter().any(|r| r.id == latest.id && r.payload == [7]), "{list:?}");
        assert!(!list.iter().any(|r| r.id == old.id));
    }

    /// Prevents the record bound from dropping an operation still in progress (its resume after a
    /// crash would be lost), and checks that the oldest finished ones go first.
    #[tokio::test]
    async fn the_bound_never_drops_an_operation_in_progress() {
        let dir = tempfile::tempdir().unwrap();
        let log = OperationLog::open_with_clock(dir.path(), OWNER, clock).unwrap();
        let kept = log.begin(OperationKind::Switchover, "interrupted", Vec::new()).await.unwrap();
        for _ in 0..MAX_RECORDS + 10 {
            let op = log.begin(OperationKind::Unfence, "s", Vec::new()).await.unwrap();
            log.finish(op.id, OperationState::Successful, Vec::new()).await.unwrap();
        }
        let list = log.list();
        assert_eq!(list.len(), MAX_RECORDS);
        assert_eq!(list[0].id, kept.id);
        assert_eq!(list[0].state, OperationState::InProgress);
        // The finished ones kept are the newest.
        let last_id = u64::try_from(MAX_RECORDS).unwrap() + 11;
        assert_eq!(list[MAX_RECORDS - 1].id, last_id);
        assert_eq!(list[1].id, last_id - u64::try_from(MAX_RECORDS).unwrap() + 2);

        // A journal full of operations in progress refuses a new one rather than drop one.
        let dir = tempfile::tempdir().unwrap();
        let log = OperationLog::open_with_clock(dir.path(), OWNER, clock).unwrap();
        for _ in 0..MAX_RECORDS {
            log.begin(OperationKind::Switchover, "s", Vec::new()).await.unwrap();
        }
        assert!(log.begin(OperationKind::Switchover, "s", Vec::new()).await.is_err());
        assert_eq!(log.in_progress().len(), MAX_RECORDS);
        assert_eq!(OperationLog::open(dir.path(), OWNER).unwrap().list().len(), MAX_RECORDS);
    }
}
