//! When this node last heard from its DR partner (DESIGN §0: "heard from" is any message
//! received from it by any of our services, on the local monotonic clock). S3 lets a partner
//! or plex be dropped without the partner's acknowledgement only after `mirror_timeout` of such
//! silence.
//!
//! Invariant: before anything is heard, the silence counts from the clock's creation (the
//! node's start), never from an earlier, unknown instant.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The partner's last sign of life.
#[derive(Debug)]
pub struct PeerClock {
    start: Instant,
    /// Milliseconds after `start` of the last message heard.
    last_ms: AtomicU64,
}

impl Default for PeerClock {
    fn default() -> PeerClock {
        PeerClock { start: Instant::now(), last_ms: AtomicU64::new(0) }
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

    /// How long nothing has been heard.
    pub fn silent_for(&self) -> Duration {
        Duration::from_millis(self.now_ms().saturating_sub(self.last_ms.load(Ordering::Acquire)))
    }
}
