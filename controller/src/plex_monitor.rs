//! Automatic reattach and resync of dropped plexes (DESIGN §4.1 step 4, §6.4; S5): while the
//! node serves, a plex that is `out_of_date` or `failed` is reopened (plex 1 at the DR
//! partner, plex 0 on this shelf) and reattached once its disks answer; the generation rules
//! decide whether it may be the target (`plex::Aggregate::reattach_with`: a split brain or a
//! plex that would become a source is refused and stays out); then it is resynced from the
//! dirty bitmap in the background. A resync that fails (the link dropped again) leaves the plex
//! out of date, and the next round starts again from the persistent bitmap.
//!
//! Invariants: at most one resync per aggregate runs; a plex becomes `normal` only through
//! `plex`'s resync completion (never here); nothing runs unless the node serves.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use plex::PlexState;

use crate::node::{AggrSlot, Node, Phase, hex};

/// How often dropped plexes are looked at.
const ROUND: Duration = Duration::from_millis(500);

impl Node {
    /// Runs until `stop`.
    pub async fn run_plex_monitor(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut resyncs: HashMap<u32, tokio::task::JoinHandle<()>> = HashMap::new();
        let mut last_logged: HashMap<(u32, usize), (String, Instant)> = HashMap::new();
        loop {
            tokio::select! {
                () = tokio::time::sleep(ROUND) => {}
                _ = stop.wait_for(|stop| *stop) => break,
            }
            if self.state().phase != Phase::Serving {
                continue;
            }
            for aggr in self.aggregates() {
                // Plex 0 of a switched-over aggregate is at the partner's site: it returns at
                // heal, not here (after heal it is kept like any plex); a deposed or adopting
                // aggregate is not ours to repair.
                let unhealed = aggr.switched_over && !aggr.healed.load(std::sync::atomic::Ordering::Acquire);
                // A mirror the operator paused stays detached until `mirror resume`.
                let paused = self.shelf_state.marks(aggr.uuid).paused;
                if unhealed || paused || aggr.deposed().is_some() {
                    continue;
                }
                if resyncs.get(&aggr.index).is_some_and(|task| !task.is_finished()) {
                    continue;
                }
                let states = aggr.aggregate.plex_states();
                let Some(index) = (0..2).find(|&i| {
                    !matches!(states[i], PlexState::Normal) && matches!(states[1 - i], PlexState::Normal)
                }) else {
                    continue;
                };
                if !matches!(states[index], PlexState::Resyncing { .. }) {
                    match self.reattach(&aggr, index).await {
                        Ok(()) => {}
                        Err(why) => {
                            // Once per distinct reason per minute: the link may be down for long.
                            let key = (aggr.index, index);
                            let repeat = last_logged.get(&key).is_some_and(|(last, at)| {
                                *last == why && at.elapsed() < Duration::from_secs(60)
                            });
                            if !repeat {
                                tracing::warn!(aggregate = %hex(&aggr.uuid.0), plex = index, "plex not reattached yet: {why}");
                                last_logged.insert(key, (why, Instant::now()));
                            }
                            continue;
                        }
                    }
                }
                last_logged.remove(&(aggr.index, index));
                let aggregate = aggr.aggregate.clone();
                let uuid = aggr.uuid;
                resyncs.insert(
                    aggr.index,
                    tokio::spawn(async move {
                        match aggregate.resync().await {
                            Ok(Some(progress)) => {
                                tracing::info!(aggregate = %hex(&uuid.0), plex = index, %progress, "resync complete: plex normal");
                            }
                            Ok(None) => {}
                            Err(e) => {
                                tracing::warn!(aggregate = %hex(&uuid.0), plex = index, "resync stopped: {e}");
                            }
                        }
                    }),
                );
            }
        }
        for (_, task) in resyncs {
            task.abort();
        }
    }

    /// Reopens plex `index`'s disks and reattaches them (the generation rules decide, S5).
    async fn reattach(&self, aggr: &AggrSlot, index: usize) -> Result<(), String> {
        let epoch = plex::Epoch { number: aggr.epoch.number, owner: plex::NodeId(aggr.epoch.owner.0) };
        // The plex at the partner's site: plex 1, or plex 0 of a switched-over aggregate.
        let remote = if aggr.switched_over { 0 } else { 1 };
        let (devices, names) = if index == remote {
            let known = aggr.disks.lock().expect("disk list lock")[index].clone();
            let names = if known.is_empty() { None } else { Some(known) };
            let plex = if index == 0 { 0 } else { 1 };
            self.remote_plex_devices(aggr.uuid, epoch, plex, names.as_deref(), 0).await?
        } else {
            let names = aggr.disks.lock().expect("disk list lock")[index].clone();
            let paths: Vec<_> = names.iter().map(|n| self.config.shelf_dir.join(n)).collect();
            (self.local_devices(&paths, aggr.uuid, epoch)?, names)
        };
        let decision = aggr.aggregate.reattach_with(index, devices).await.map_err(|e| e.to_string())?;
        aggr.disks.lock().expect("disk list lock")[index] = names;
        tracing::info!(
            aggregate = %hex(&aggr.uuid.0),
            plex = index,
            rule = decision.rule.name(),
            "plex reattached; resync starts"
        );
        Ok(())
    }
}
