//! Consistency points (DESIGN §4 step 5; S12): every `cp_interval`, when half the local NVLog
//! partition has been written since the last one, when a write finds the NVLog full, and at
//! shutdown.
//!
//! A CP, in this order:
//! 1. picks its lsn L (every record at or below L was applied to the cache or failed) and
//!    freezes the cache: new writes go on into a fresh one;
//! 2. destages the frozen blocks to both plexes of their aggregates and flushes every aggregate
//!    (data durable: O_DIRECT writes plus `fdatasync`);
//! 3. records the CP (id, writer, log generation, L) in the labels of every aggregate;
//! 4. only then releases the records up to L locally and tells the partner to release them.
//!
//! Invariants: one CP at a time; a CP that fails puts its frozen blocks back under any newer
//! ones and releases nothing, so nothing acknowledged is lost; a CP with nothing to do writes
//! nothing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use nvlog::{Lsn, PartitionKind};
use plex::{AlignedBuf, CpId, CpRecord};
use tokio::task::JoinSet;

use crate::node::{BLOCK, Block, DataError, Key, Node, Phase};

/// The largest destage write.
const DESTAGE_BYTES: u64 = 1 << 20;
/// Destage writes in flight at once, at most. The remote plex needs many: the partner answers a
/// write once an fdatasync covers it (S12), so the destage rate is about the window over the
/// time of a write and an fdatasync there. Measured with the lab (4 KiB random writes, QD32):
/// a window of 64 runs destaged ~3,300 blocks/s, 1024 ~11,000, 4096 ~14,000.
const DESTAGE_DEPTH: usize = 4096;
/// Destage bytes in flight at once, at most (the runs are copies of cached blocks).
const DESTAGE_WINDOW_BYTES: u64 = 64 << 20;

impl Node {
    /// Runs one CP now (waiting for a running one to finish first).
    pub async fn cp(&self, why: &'static str) -> Result<(), DataError> {
        let _one = self.cp_running.lock().await;
        let started = Instant::now();
        // 1. L, and the frozen cache.
        let (lsn, frozen) = {
            let mut append = self.lock_append();
            let lsn = match append.inflight.first() {
                Some(first) => Lsn(first.0 - 1),
                None => append.last,
            }
            .min(self.release_cap());
            append.since_cp = 0;
            if lsn < append.sealed_through {
                // Records of the sealed half were still in flight: another CP, right after
                // this one, frees it.
                self.request_cp();
            }
            let mut cache = self.lock_cache();
            let frozen = Arc::new(std::mem::take(&mut cache.active));
            cache.frozen = frozen.clone();
            (lsn, frozen)
        };
        let released = self.nvlog.status(PartitionKind::Local).map(|s| s.released_lsn).unwrap_or_default();
        if frozen.is_empty() && lsn <= released {
            self.lock_cache().frozen = Arc::new(BTreeMap::new());
            return Ok(());
        }
        let result = self.destage_and_record(lsn, &frozen).await;
        match result {
            Ok(id) => {
                // The partner's release is queued before ours frees any space: every record
                // that lands in space freed here is queued after it, so the partner (whose
                // partition holds the same records) never finds its partition full first.
                self.mirror.release(lsn);
                let nvlog = self.nvlog.clone();
                let release =
                    tokio::task::spawn_blocking(move || nvlog.release(PartitionKind::Local, lsn)).await;
                match release {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(DataError::Nvlog(format!("release after CP {id}: {e}"))),
                    Err(e) => return Err(DataError::Nvlog(format!("release task: {e}"))),
                }
                self.lock_cache().frozen = Arc::new(BTreeMap::new());
                let mut stats = self.lock_stats();
                stats.completed += 1;
                stats.last_id = id;
                stats.last_lsn = lsn;
                stats.last_duration = started.elapsed();
                stats.last_blocks = frozen.len() as u64;
                drop(stats);
                let took = started.elapsed();
                if took > std::time::Duration::from_secs(1) {
                    tracing::warn!(
                        node = self.config.node_id,
                        id,
                        lsn = lsn.0,
                        blocks = frozen.len(),
                        why,
                        ?took,
                        "slow CP"
                    );
                } else {
                    tracing::debug!(
                        node = self.config.node_id,
                        id,
                        lsn = lsn.0,
                        blocks = frozen.len(),
                        why,
                        ?took,
                        "CP done"
                    );
                }
                Ok(())
            }
            Err(e) => {
                // Nothing was released: put the frozen blocks back under any newer ones.
                let mut cache = self.lock_cache();
                let newer = std::mem::take(&mut cache.active);
                let mut merged = (*frozen).clone();
                merged.extend(newer);
                cache.active = merged;
                cache.frozen = Arc::new(BTreeMap::new());
                drop(cache);
                tracing::error!(node = self.config.node_id, lsn = lsn.0, why, "CP failed: {e}");
                Err(e)
            }
        }
    }

    /// Steps 2 and 3; returns the CP id.
    async fn destage_and_record(&self, lsn: Lsn, frozen: &BTreeMap<Key, Block>) -> Result<u64, DataError> {
        // A deposed aggregate is written no more (S2): its cached blocks are dropped.
        let aggregates: Vec<_> = self.aggregates().into_iter().filter(|a| !a.is_deposed()).collect();
        let mut writes = JoinSet::new();
        let mut window = 0u64;
        let mut run: Option<(u32, u64, Vec<u8>)> = None;
        let issue =
            |writes: &mut JoinSet<Result<u64, String>>, window: &mut u64, run: (u32, u64, Vec<u8>)| {
                let (index, block, bytes) = run;
                let aggregate = aggregates.iter().find(|a| a.index == index).map(|a| a.aggregate.clone());
                let len = bytes.len() as u64;
                *window += len;
                writes.spawn(async move {
                    let aggregate = aggregate.ok_or_else(|| format!("no aggregate {index}"))?;
                    let data = AlignedBuf::from_slice(&bytes);
                    aggregate.write(block * BLOCK, &data).await.map_err(|e| e.to_string())?;
                    Ok(len)
                });
            };
        for (&(index, block), data) in frozen {
            if !aggregates.iter().any(|a| a.index == index) {
                continue;
            }
            match &mut run {
                Some((i, start, bytes))
                    if *i == index
                        && *start + bytes.len() as u64 / BLOCK == block
                        && (bytes.len() as u64) < DESTAGE_BYTES =>
                {
                    bytes.extend_from_slice(data);
                }
                _ => {
                    if let Some(done) = run.take() {
                        issue(&mut writes, &mut window, done);
                    }
                    run = Some((index, block, data.to_vec()));
                }
            }
            while writes.len() >= DESTAGE_DEPTH || window >= DESTAGE_WINDOW_BYTES {
                let Some(result) = writes.join_next().await else { break };
                window -= result
                    .map_err(|e| DataError::Plex(format!("destage task: {e}")))?
                    .map_err(DataError::Plex)?;
            }
        }
        if let Some(done) = run.take() {
            issue(&mut writes, &mut window, done);
        }
        while let Some(result) = writes.join_next().await {
            result.map_err(|e| DataError::Plex(format!("destage task: {e}")))?.map_err(DataError::Plex)?;
        }
        let id = self.next_cp_id.fetch_add(1, Ordering::Relaxed);
        let record = CpRecord {
            id: CpId(id),
            writer: plex::NodeId(self.config.node_id),
            log_generation: self.nvlog.generation().0,
            last_lsn: plex::Lsn(lsn.0),
        };
        // S12: data durable on every aggregate before any label records the CP.
        for aggr in &aggregates {
            aggr.aggregate.flush().await.map_err(|e| DataError::Plex(e.to_string()))?;
        }
        for aggr in &aggregates {
            aggr.aggregate.record_cp(record).await.map_err(|e| DataError::Plex(e.to_string()))?;
            *aggr.last_cp.lock().expect("last CP lock") = record;
        }
        Ok(id)
    }

    /// Asks for a CP and waits until one that started after the request completed.
    pub async fn wait_for_cp(&self) -> Result<(), DataError> {
        let mut done = self.cp_done.subscribe();
        // The attempt running now may have picked its lsn before this request: wait for the
        // one after it too, asking again after each (a permit covers one attempt only).
        let target = *done.borrow() + 2;
        loop {
            if *done.borrow() >= target {
                return Ok(());
            }
            self.request_cp();
            self.check_serving()?;
            // A CP may wait a mirror timeout for a plex, then up to another for the drop to be
            // recorded (S3) before it completes.
            let bound = self.config.timers.mirror_timeout * 3;
            // S6: a lease that lapses meanwhile (the CP stuck recording a drop at a mediator it
            // cannot reach) ends the wait with the fence, not after `bound`.
            let lapsed = async {
                loop {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    if let Err(e) = self.check_lease() {
                        return e;
                    }
                }
            };
            let changed = tokio::select! {
                changed = tokio::time::timeout(bound, done.changed()) => changed,
                e = lapsed, if self.lease.get().is_some() => return Err(e),
            };
            match changed {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(DataError::Nvlog("the CP task stopped".into())),
                Err(_) => {
                    tracing::warn!(
                        node = self.config.node_id,
                        target,
                        done = *done.borrow(),
                        "no CP completed while a write waited for space"
                    );
                    return Err(DataError::Nvlog(format!("no CP freed NVLog space within {bound:?}")));
                }
            }
        }
    }

    /// Asks the CP loop for a CP. Level-triggered: a request made while a CP runs starts
    /// another right after it; none is lost.
    pub(crate) fn request_cp(&self) {
        self.cp_requests.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The CP loop: every `cp_interval`, or on request, while serving.
    pub async fn run_cps(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut requests = self.cp_requests.subscribe();
        let mut seen = *requests.borrow();
        loop {
            tokio::select! {
                () = tokio::time::sleep(self.config.timers.cp_interval) => {}
                () = async { let _ = requests.wait_for(|n| *n != seen).await; } => {}
                () = self.mirror.space_wanted() => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
            if self.state().phase != Phase::Serving {
                // Requests made before serving stay pending until it serves.
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
            seen = *requests.borrow();
            let _ = self.cp("timer or space").await;
            // Every completed attempt counts for waiters, even a no-op one.
            self.cp_done.send_modify(|n| *n += 1);
        }
    }
}
