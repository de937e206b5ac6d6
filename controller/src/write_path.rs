//! The write path (DESIGN §4; S1): validate, append to the local NVLog and send the same record
//! to the DR partner concurrently, acknowledge when both persisted it, with the data in the
//! write cache; reads from the cache, then from a plex.
//!
//! Invariants:
//! - a write returns `Ok` only after every record of it is durable locally and acknowledged by
//!   the partner (`assert!`ed, S1); a failed or timed-out write returns an error and its data
//!   never enters the cache (its record may still land at replay: an unacknowledged write may);
//! - records are at most 1 MiB of payload (DESIGN §4); trims and write-zeroes carry no payload;
//! - records are queued to the mirror under the append lock, so they reach it in lsn order;
//! - a write that finds both NVLog halves full waits for a CP (back-pressure, counted) and is
//!   never acknowledged early; it first completes its own records already appended, so the
//!   CP can release them.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use nvlog::{AggregateId, Durability, Lsn, MAX_PAYLOAD_BYTES, NvlogError, OpKind, RecordInput, VolumeId};

use crate::node::{BLOCK, BLOCK_LEN, Block, DataError, Node, VolumeRef};

/// Bytes of volume one trim or write-zeroes record covers at most.
const ZERO_RECORD_BYTES: u64 = 64 << 20;
/// The largest read one call serves.
pub const MAX_READ_BYTES: u64 = 32 << 20;

/// Counts a request in flight until dropped (shutdown drains them).
struct Busy<'a>(&'a Node);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

fn zero_block() -> Block {
    static ZERO: std::sync::OnceLock<Block> = std::sync::OnceLock::new();
    ZERO.get_or_init(|| Arc::from(vec![0u8; BLOCK_LEN])).clone()
}

/// One appended record of a request: its lsn and the part of the request it covers.
struct Appended {
    lsn: Lsn,
    offset: u64,
    len: u64,
    data: Bytes,
}

impl Node {
    fn enter(&self) -> Busy<'_> {
        self.busy.fetch_add(1, Ordering::AcqRel);
        Busy(self)
    }

    fn check_range(volume: &VolumeRef, offset: u64, len: u64) -> Result<(), DataError> {
        match offset.checked_add(len) {
            Some(end) if end <= volume.entry.size => Ok(()),
            _ => Err(DataError::Range(format!(
                "{len} bytes at {offset} are outside volume {} ({} bytes)",
                volume.entry.name, volume.entry.size
            ))),
        }
    }

    /// Writes `data` at `offset` of `volume`; returns the last lsn it appended.
    pub async fn write(&self, volume: &str, offset: u64, data: Bytes) -> Result<Lsn, DataError> {
        let _busy = self.enter();
        self.check_serving()?;
        let volume = self.volume(volume)?;
        let len = data.len() as u64;
        Node::check_range(&volume, offset, len)?;
        self.submit(&volume, OpKind::Write, offset, len, data).await
    }

    /// Trims (`OpKind::Trim`) or zeroes (`OpKind::WriteZeroes`) a range: it reads as zeroes after.
    pub async fn zero(&self, volume: &str, op: OpKind, offset: u64, len: u64) -> Result<Lsn, DataError> {
        let _busy = self.enter();
        self.check_serving()?;
        let volume = self.volume(volume)?;
        Node::check_range(&volume, offset, len)?;
        if op == OpKind::Write {
            return Err(DataError::Invalid("zero() takes a trim or write-zeroes".into()));
        }
        self.submit(&volume, op, offset, len, Bytes::new()).await
    }

    /// FLUSH: an acknowledged write is already durable in the mirrored NVLog (DESIGN §4).
    pub fn flush(&self, volume: &str) -> Result<(), DataError> {
        self.check_serving()?;
        self.volume(volume).map(|_| ())
    }

    async fn submit(
        &self,
        volume: &VolumeRef,
        op: OpKind,
        offset: u64,
        len: u64,
        data: Bytes,
    ) -> Result<Lsn, DataError> {
        if len == 0 {
            return Ok(self.lock_append().last);
        }
        let base = volume.entry.base;
        let first = (base + offset) / BLOCK;
        let end = (base + offset + len).div_ceil(BLOCK);
        let _range = self.locks.lock((volume.aggr.index, first), end).await;
        let chunk = if op == OpKind::Write { u64::from(MAX_PAYLOAD_BYTES) } else { ZERO_RECORD_BYTES };
        let mut pending: Vec<Appended> = Vec::new();
        let mut last = Lsn::ZERO;
        let mut pos = 0u64;
        while pos < len {
            let n = chunk.min(len - pos);
            let payload = if op == OpKind::Write {
                data.slice(
                    usize::try_from(pos).unwrap_or(usize::MAX)
                        ..usize::try_from(pos + n).unwrap_or(usize::MAX),
                )
            } else {
                Bytes::new()
            };
            match self.append_record(volume, op, offset + pos, n, &payload) {
                Ok(lsn) => {
                    pending.push(Appended { lsn, offset: offset + pos, len: n, data: payload });
                    pos += n;
                }
                Err(NvlogError::Full(_)) => {
                    // Back-pressure (DESIGN §4): finish what this request appended so a CP can
                    // release it, then wait for a CP.
                    let done = std::mem::take(&mut pending);
                    if let Some(lsn) = self.complete(volume, op, done).await? {
                        last = lsn;
                    }
                    self.lock_stats().backpressure_waits += 1;
                    self.wait_for_cp().await?;
                }
                Err(e) => {
                    self.settle(&pending);
                    return Err(DataError::Nvlog(e.to_string()));
                }
            }
        }
        if let Some(lsn) = self.complete(volume, op, pending).await? {
            last = lsn;
        }
        Ok(last)
    }

    /// Appends one record (without waiting for durability) and queues it to the mirror, under
    /// the append lock so the mirror sees lsn order; the lsn is in flight until applied or
    /// abandoned.
    fn append_record(
        &self,
        volume: &VolumeRef,
        op: OpKind,
        offset: u64,
        len: u64,
        payload: &[u8],
    ) -> Result<Lsn, NvlogError> {
        let input = RecordInput {
            op,
            aggregate: AggregateId(volume.aggr.uuid.0),
            epoch: volume.aggr.epoch,
            volume: VolumeId(volume.entry.id),
            offset,
            range_len: len,
            payload,
        };
        let mut append = self.lock_append();
        let (lsn, encoded) = self.nvlog.try_append_encoded(&input)?;
        let size = encoded.len() as u64;
        self.mirror.enqueue_record(lsn, encoded);
        append.inflight.insert(lsn);
        append.last = append.last.max(lsn);
        append.since_cp += size;
        // DESIGN §4: a CP starts when the active half is full, that is when the log switched
        // to the other half, so the sealed one is released while the new one fills; and, as a
        // backstop, after half a partition of bytes.
        let switches = self.nvlog.half_switches(nvlog::PartitionKind::Local).unwrap_or(append.half_switches);
        if switches != append.half_switches || append.since_cp >= self.half_bytes {
            if switches != append.half_switches {
                append.sealed_through = Lsn(lsn.0 - 1);
            }
            append.half_switches = switches;
            append.since_cp = 0;
            self.request_cp();
        }
        Ok(lsn)
    }

    /// The records of `pending` are no longer in flight: applied to the cache, or failed (never
    /// acknowledged). A CP may cover them from now on.
    fn settle(&self, pending: &[Appended]) {
        let mut append = self.lock_append();
        for record in pending {
            append.inflight.remove(&record.lsn);
        }
    }

    /// Waits until `pending`'s records are durable here and acknowledged by the partner, then
    /// applies them to the cache (S1, DESIGN §4 step 4).
    async fn complete(
        &self,
        volume: &VolumeRef,
        op: OpKind,
        pending: Vec<Appended>,
    ) -> Result<Option<Lsn>, DataError> {
        let Some(last) = pending.last().map(|record| record.lsn) else { return Ok(None) };
        let local = async {
            if self.nvlog.durability() == Durability::Process {
                // The copy into the mapping was the persist.
                return self
                    .nvlog
                    .persist_through(nvlog::PartitionKind::Local, last)
                    .map_err(|e| e.to_string());
            }
            let nvlog = self.nvlog.clone();
            match tokio::task::spawn_blocking(move || {
                nvlog.persist_through(nvlog::PartitionKind::Local, last)
            })
            .await
            {
                Ok(result) => result.map_err(|e| e.to_string()),
                Err(e) => Err(format!("persist task: {e}")),
            }
        };
        let mut serving = volume.aggr.serving.subscribe();
        let partner = async {
            // DESIGN §4.1: wait up to the mirror timeout, then drop the partner as S3 requires
            // (which stalls until the drop is recorded) and go on without it.
            let mirrored = async {
                loop {
                    match self.mirror.wait_mirrored(last, self.config.timers.mirror_timeout).await {
                        Err(crate::nvlog_mirror::MirrorError::Timeout { partner, lsn, waited }) => {
                            let why =
                                format!("node {partner} did not acknowledge lsn {} within {waited:?}", lsn.0);
                            self.mirror.drop_partner(why).await?;
                        }
                        other => return other.map_err(DataError::Mirror),
                    }
                }
            };
            // S6: a lease that lapses while the write waits (a stalled drop that cannot be
            // recorded) ends the wait with an error: the host sees the fence, never an ack.
            let lapsed = async {
                loop {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    if let Err(e) = self.check_lease() {
                        return e;
                    }
                }
            };
            // S2: a higher epoch seen while waiting ends the wait; the write is not acknowledged.
            tokio::select! {
                result = mirrored => result,
                e = lapsed, if self.lease.get().is_some() => Err(e),
                deposed = serving.wait_for(|state| matches!(state, crate::node::SlotState::Deposed(_))) => {
                    let why = match deposed.as_deref() {
                        Ok(crate::node::SlotState::Deposed(why)) => why.clone(),
                        _ => "the node is stopping".to_string(),
                    };
                    Err(DataError::Offline { volume: volume.entry.name.clone(), reason: why })
                }
            }
        };
        let (local, partner) = tokio::join!(local, partner);
        if let Err(e) = local {
            self.settle(&pending);
            return Err(DataError::Nvlog(e));
        }
        if let Err(e) = partner {
            self.settle(&pending);
            tracing::warn!(node = self.config.node_id, lsn = last.0, "write not acknowledged: {e}");
            return Err(e);
        }
        // S2: checked again right before the acknowledgement.
        if let Some(why) = volume.aggr.deposed().filter(|_| volume.aggr.is_deposed()) {
            self.settle(&pending);
            return Err(DataError::Offline { volume: volume.entry.name.clone(), reason: why });
        }
        // S6: and the lease.
        if let Err(e) = self.check_lease() {
            self.settle(&pending);
            return Err(e);
        }
        // S1, checked in release builds too.
        assert!(
            self.nvlog.durable_tail(nvlog::PartitionKind::Local).unwrap_or_default() >= last
                && self.mirror.mirrored(last),
            "S1: acknowledging lsn {} before it is durable locally and at every partner in the ack set",
            last.0
        );
        volume.aggr.acks.note(self.config.node_id, volume.aggr.uuid, volume.aggr.epoch.number);
        // A fence that logged the last acknowledgement between the lease check and here: this
        // one is the last.
        if self.check_serving().is_err() {
            volume.aggr.acks.log_last(
                self.config.node_id,
                volume.aggr.uuid,
                "acknowledged while the fence began",
            );
        }
        let mut result = Ok(Some(last));
        for record in &pending {
            if result.is_ok()
                && let Err(e) = self.apply(volume, op, record.offset, record.len, &record.data).await
            {
                result = Err(e);
            }
        }
        self.settle(&pending);
        result
    }

    /// Puts a write (or zeroes) into the active cache, merging partial blocks with the current
    /// contents. The caller holds the range.
    pub(crate) async fn apply(
        &self,
        volume: &VolumeRef,
        op: OpKind,
        offset: u64,
        len: u64,
        payload: &[u8],
    ) -> Result<(), DataError> {
        if len == 0 {
            return Ok(());
        }
        if op == OpKind::Write && payload.len() as u64 != len {
            return Err(DataError::Invalid(format!(
                "a write of {len} bytes carries {} bytes",
                payload.len()
            )));
        }
        let start = volume.entry.base + offset;
        let end = start + len;
        let first = start / BLOCK;
        let last = (end - 1) / BLOCK;
        let mut blocks: Vec<(u64, Block)> =
            Vec::with_capacity(usize::try_from(last - first + 1).unwrap_or(0));
        for block in first..=last {
            let block_start = block * BLOCK;
            let from = start.max(block_start);
            let to = end.min(block_start + BLOCK);
            let new: Block = if from == block_start && to == block_start + BLOCK {
                match op {
                    OpKind::Write => {
                        let at = usize::try_from(from - start).unwrap_or(usize::MAX);
                        Arc::from(&payload[at..at + BLOCK_LEN])
                    }
                    _ => zero_block(),
                }
            } else {
                let mut merged = self.block(volume.aggr.index, &volume.aggr.aggregate, block).await?.to_vec();
                let inside = usize::try_from(from - block_start).unwrap_or(0)
                    ..usize::try_from(to - block_start).unwrap_or(0);
                match op {
                    OpKind::Write => {
                        let at = usize::try_from(from - start).unwrap_or(usize::MAX);
                        merged[inside.clone()].copy_from_slice(&payload[at..at + inside.len()]);
                    }
                    _ => merged[inside].fill(0),
                }
                Arc::from(merged)
            };
            blocks.push((block, new));
        }
        let mut cache = self.lock_cache();
        for (block, data) in blocks {
            cache.active.insert((volume.aggr.index, block), data);
        }
        Ok(())
    }

    /// The current contents of one block: the cache, else the plexes.
    async fn block(&self, index: u32, aggregate: &plex::Aggregate, block: u64) -> Result<Block, DataError> {
        {
            let cache = self.lock_cache();
            if let Some(data) =
                cache.active.get(&(index, block)).or_else(|| cache.frozen.get(&(index, block)))
            {
                return Ok(data.clone());
            }
        }
        let data = aggregate.read(block * BLOCK, BLOCK).await.map_err(|e| DataError::Plex(e.to_string()))?;
        Ok(Arc::from(data.as_slice()))
    }

    /// Reads `len` bytes at `offset` of `volume` (DESIGN §4: cache first, then a plex).
    pub async fn read(&self, volume: &str, offset: u64, len: u64) -> Result<Vec<u8>, DataError> {
        let _busy = self.enter();
        self.check_serving()?;
        let volume = self.volume(volume)?;
        Node::check_range(&volume, offset, len)?;
        if len > MAX_READ_BYTES {
            return Err(DataError::Range(format!("a read of {len} bytes; at most {MAX_READ_BYTES}")));
        }
        if len == 0 {
            return Ok(Vec::new());
        }
        let start = volume.entry.base + offset;
        let end = start + len;
        let first = start / BLOCK;
        let last = (end - 1) / BLOCK;
        let index = volume.aggr.index;
        let cached: Vec<Option<Block>> = {
            let cache = self.lock_cache();
            (first..=last)
                .map(|block| {
                    cache.active.get(&(index, block)).or_else(|| cache.frozen.get(&(index, block))).cloned()
                })
                .collect()
        };
        let mut out = vec![0u8; usize::try_from((last - first + 1) * BLOCK).unwrap_or(0)];
        let mut i = 0usize;
        while i < cached.len() {
            if let Some(data) = &cached[i] {
                out[i * BLOCK_LEN..(i + 1) * BLOCK_LEN].copy_from_slice(data);
                i += 1;
                continue;
            }
            let run_start = i;
            while i < cached.len() && cached[i].is_none() {
                i += 1;
            }
            let offset = (first + run_start as u64) * BLOCK;
            let length = (i - run_start) as u64 * BLOCK;
            let data = volume
                .aggr
                .aggregate
                .read(offset, length)
                .await
                .map_err(|e| DataError::Plex(e.to_string()))?;
            out[run_start * BLOCK_LEN..i * BLOCK_LEN].copy_from_slice(data.as_slice());
        }
        let skip = usize::try_from(start - first * BLOCK).unwrap_or(0);
        out.drain(..skip);
        out.truncate(usize::try_from(len).unwrap_or(usize::MAX));
        // S6: no read completes once the lease lapsed (a resumed process drains nothing).
        self.check_lease()?;
        Ok(out)
    }
}
