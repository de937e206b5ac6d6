//! Region locks of a mirrored aggregate (DESIGN §6.4: resync "orders itself against CP destage
//! writes to the region being copied").
//!
//! Invariants:
//! - writes hold their regions shared, resync copies and read repairs hold them exclusive; a
//!   lock of several regions is taken all at once or not at all, so nothing deadlocks;
//! - an exclusive waiter is never starved: once it waits on a region, new shared lockers of
//!   that region wait behind it (a resync converges under a steady write load).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

#[derive(Debug, Default)]
struct Entry {
    shared: u32,
    exclusive: bool,
    /// Exclusive lockers waiting for this region.
    exclusive_waiting: u32,
}

#[derive(Debug, Default)]
struct Table {
    entries: HashMap<u64, Entry>,
}

/// The lock table.
#[derive(Debug, Default)]
pub(crate) struct RegionLocks {
    table: Mutex<Table>,
    released: Notify,
}

/// An exclusive locker's place in the queue of its regions; left on drop (also when the
/// waiting future is cancelled).
struct Waiting<'a> {
    locks: &'a RegionLocks,
    regions: Range<u64>,
    armed: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut table = self.locks.table();
        for region in self.regions.clone() {
            if let Some(entry) = table.entries.get_mut(&region) {
                entry.exclusive_waiting = entry.exclusive_waiting.saturating_sub(1);
                if entry.shared == 0 && !entry.exclusive && entry.exclusive_waiting == 0 {
                    table.entries.remove(&region);
                }
            }
        }
        drop(table);
        self.locks.released.notify_waiters();
    }
}

/// A held lock; released on drop.
#[derive(Debug)]
pub(crate) struct RegionGuard {
    locks: Arc<RegionLocks>,
    regions: Range<u64>,
    exclusive: bool,
}

impl RegionLocks {
    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().expect("region lock holder panicked")
    }

    /// Waits until every region of `regions` can be taken in the mode asked, then takes them.
    pub(crate) async fn lock(self: &Arc<Self>, regions: Range<u64>, exclusive: bool) -> RegionGuard {
        let mut waiting: Option<Waiting<'_>> = None;
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut table = self.table();
                let free = regions.clone().all(|region| match table.entries.get(&region) {
                    None => true,
                    Some(entry) if exclusive => !entry.exclusive && entry.shared == 0,
                    Some(entry) => !entry.exclusive && entry.exclusive_waiting == 0,
                });
                if free {
                    if let Some(mut waiting) = waiting.take() {
                        // Leave the queue under the same lock that takes the regions.
                        waiting.armed = false;
                        for region in regions.clone() {
                            if let Some(entry) = table.entries.get_mut(&region) {
                                entry.exclusive_waiting = entry.exclusive_waiting.saturating_sub(1);
                            }
                        }
                    }
                    for region in regions.clone() {
                        let entry = table.entries.entry(region).or_default();
                        if exclusive {
                            entry.exclusive = true;
                        } else {
                            entry.shared += 1;
                        }
                    }
                    return RegionGuard { locks: self.clone(), regions, exclusive };
                }
                if exclusive && waiting.is_none() {
                    for region in regions.clone() {
                        table.entries.entry(region).or_default().exclusive_waiting += 1;
                    }
                    waiting = Some(Waiting { locks: self, regions: regions.clone(), armed: true });
                }
            }
            notified.await;
        }
    }

    fn unlock(&self, guard: &RegionGuard) {
        {
            let mut table = self.table();
            for region in guard.regions.clone() {
                let Some(entry) = table.entries.get_mut(&region) else { continue };
                if guard.exclusive {
                    entry.exclusive = false;
                } else {
                    entry.shared = entry.shared.saturating_sub(1);
                }
                if entry.shared == 0 && !entry.exclusive && entry.exclusive_waiting == 0 {
                    table.entries.remove(&region);
                }
            }
        }
        self.released.notify_waiters();
    }
}

impl Drop for RegionGuard {
    fn drop(&mut self) {
        self.locks.unlock(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn exclusive_waits_for_shared_and_shared_for_exclusive() {
        let locks = Arc::new(RegionLocks::default());
        let a = locks.lock(0..4, false).await;
        let b = locks.lock(2..6, false).await;
        let waiter = {
            let locks = locks.clone();
            tokio::spawn(async move { locks.lock(3..4, true).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "exclusive taken while shared held");
        drop(a);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "exclusive taken while one shared holder remains");
        drop(b);
        let exclusive = waiter.await.unwrap();
        let shared = {
            let locks = locks.clone();
            tokio::spawn(async move { locks.lock(0..8, false).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!shared.is_finished(), "shared taken while exclusive held");
        drop(exclusive);
        shared.await.unwrap();
    }

    #[tokio::test]
    async fn a_waiting_exclusive_locker_is_not_starved_by_new_shared_ones() {
        let locks = Arc::new(RegionLocks::default());
        let first = locks.lock(0..1, false).await;
        let exclusive = {
            let locks = locks.clone();
            tokio::spawn(async move { locks.lock(0..1, true).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let late = {
            let locks = locks.clone();
            tokio::spawn(async move { locks.lock(0..1, false).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!late.is_finished(), "a shared locker overtook a waiting exclusive one");
        drop(first);
        let held = exclusive.await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!late.is_finished());
        drop(held);
        late.await.unwrap();
        // A cancelled exclusive waiter leaves the queue.
        let shared = locks.lock(0..1, false).await;
        let cancelled = {
            let locks = locks.clone();
            tokio::spawn(async move { locks.lock(0..1, true).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        cancelled.abort();
        let _ = cancelled.await;
        tokio::time::timeout(Duration::from_secs(5), locks.lock(0..1, false)).await.unwrap();
        drop(shared);
    }
}
