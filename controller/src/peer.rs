//! When this node last heard from its DR partner (DESIGN §0: "heard from" is any message
//! received from it by any of our services, on the local monotonic clock). S3 lets a partner
//! or plex be dropped without the partner's acknowledgement only after `mirror_timeout` of such
//! silence.
//!
//! Invariants:
//! - before anything is heard, the silence counts from the clock's creation (the node's start),
//!   never from an earlier, unknown instant;
//! - silence counts only while this process runs: after a pause (SIGSTOP, a VM freeze, a
//!   starved runtime) that `watch_pauses` notices, it counts again from the resume. A paused
//!   controller that resumes must not take the pause for the partner's silence and drop it at
//!   once (S3): the partner may have taken its aggregates over meanwhile, and the next round
//!   trip tells it so (S2).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The partner's last sign of life.
#[derive(Debug)]
pub struct PeerClock {
    start: Instant,
    /// Milliseconds after `start` of the last message heard.
    last_ms: AtomicU64,
    /// Milliseconds after `start` of the last tick of `watch_pauses`.
    tick_ms: AtomicU64,
    /// Milliseconds after `start` when this process resumed from its last noticed pause.
    resumed_ms: AtomicU64,
}

/// How often `watch_pauses` ticks.
const TICK: Duration = Duration::from_millis(100);
/// A gap between ticks above this is a pause.
const PAUSE: Duration = Duration::from_millis(1000);

impl Default for PeerClock {
    fn default() -> PeerClock {
        PeerClock {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            tick_ms: AtomicU64::new(0),
            resumed_ms: AtomicU64::new(0),
        }
    }
}

impl PeerClock {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A message from the partner arrived.
    pub fn heard(&self) {
        self.last_ms.fetch_max(self.now_ms(), Ordering::AcqRel);
    }

    /// How long nothing has been heard while this process ran.
    pub fn silent_for(&self) -> Duration {
        self.silent_at(self.now_ms())
    }

    fn silent_at(&self, now: u64) -> Duration {
        // A pause not noticed by a tick yet counts as one (the ticker may not have run since).
        let since = self.last_ms.load(Ordering::Acquire).max(self.resumed_ms.load(Ordering::Acquire));
        let tick = self.tick_ms.load(Ordering::Acquire);
        let pause_ms = u64::try_from(PAUSE.as_millis()).unwrap_or(u64::MAX);
        if tick > 0 && now.saturating_sub(tick) > pause_ms {
            return Duration::ZERO;
        }
        Duration::from_millis(now.saturating_sub(since))
    }

    /// One tick of `watch_pauses` at `now_ms`.
    fn tick_at(&self, now_ms: u64) {
        let last = self.tick_ms.swap(now_ms, Ordering::AcqRel);
        if last > 0 && now_ms.saturating_sub(last) > u64::try_from(PAUSE.as_millis()).unwrap_or(u64::MAX) {
            self.resumed_ms.fetch_max(now_ms, Ordering::AcqRel);
            tracing::warn!(
                paused_ms = now_ms - last,
                "this process was paused or starved: the partner's silence counts again from now"
            );
        }
    }

    /// Ticks until the clock is dropped, noticing pauses of this process.
    pub fn watch_pauses(self: &std::sync::Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = std::sync::Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                match weak.upgrade() {
                    Some(clock) => clock.tick_at(clock.now_ms().max(1)),
                    None => return,
                }
                tokio::time::sleep(TICK).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pause_restarts_the_silence() {
        let clock = PeerClock::default();
        clock.tick_at(100);
        clock.tick_at(200);
        assert_eq!(clock.silent_at(300), Duration::from_millis(300));
        // A gap between ticks that is not noticed yet counts as a pause.
        assert_eq!(clock.silent_at(5000), Duration::ZERO);
        // Noticed: the silence counts from the resume, not from the last message.
        clock.tick_at(5200);
        assert_eq!(clock.silent_at(5300), Duration::from_millis(100));
        // Ticks go on: 2 s of silence while running.
        for now in (5300..=7100).step_by(100) {
            clock.tick_at(now);
        }
        assert_eq!(clock.silent_at(7200), Duration::from_millis(2000));
    }
}
