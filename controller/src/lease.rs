//! The self-fence lease (DESIGN §0 S6, §10 rule 1): with a mediator configured, a controller
//! that has completed no round trip with its DR partner and none with the mediator for `lease`
//! stops acknowledging and serving, reads included. Sans-IO: the caller passes the monotonic
//! time; the daemon checks it before every acknowledgement and read completion.
//!
//! Rules:
//! - a round trip renews the lease from the time its request was **sent** (never from the
//!   reply's arrival), for the smaller of this controller's lease and the one the mediator sent;
//! - only replies that carry the sender's epochs renew it (the caller checks them);
//! - **a lapsed lease is never renewed**: once a check finds it lapsed, or a round trip comes
//!   back that was sent after the lease had run out (whether or not a check saw it), the
//!   controller stays fenced until S2's confirmation (`confirm`), which also tells it whether it
//!   was deposed;
//! - the monotonic clock runs while the process is stopped (SIGSTOP): a paused controller that
//!   resumes finds its lease lapsed and cannot drain queued completions.
//!
//! Invariant: `check(now)` is `Ok` only if some round trip sent after `now − lease` completed
//! and no earlier check found the lease lapsed since the last confirmation.
//!
//! The time type is generic: the daemon uses `Instant`, the model checker (`mc-model`) a
//! `Duration` since its start, so both run this same code.

use std::ops::Add;
use std::time::{Duration, Instant};

use crate::model_breaks::{Break, active};

/// The lease state, over a monotonic time `T` (`Instant` in the daemon).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Lease<T = Instant> {
    lease: Duration,
    /// The lease ends here (the latest renewal's send time plus the lease).
    until: Option<T>,
    /// Found lapsed: fenced until `confirm`.
    lapsed: bool,
}

/// Why the controller is fenced by its lease.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// No round trip completed yet since the start or the last confirmation.
    #[error("no round trip with the DR partner or the mediator yet: the lease never started (S6)")]
    NeverStarted,
    /// The lease ran out.
    #[error(
        "no round trip with the DR partner or the mediator for the lease ({lease:?}): self-fenced until the \
         epoch is confirmed (S6, S2)"
    )]
    Lapsed {
        /// The lease.
        lease: Duration,
    },
}

impl<T: Copy + Ord + Add<Duration, Output = T>> Lease<T> {
    /// A lease of `lease`, not started: fenced until the first round trip.
    pub fn new(lease: Duration) -> Lease<T> {
        Lease { lease, until: None, lapsed: false }
    }

    /// A round trip with the mediator or the DR partner whose request was sent at `sent`
    /// completed; `offered` is the lease the mediator's reply carries (`None` for the partner).
    /// Returns false if the lease had lapsed: it is not renewed.
    pub fn renew(&mut self, sent: T, offered: Option<Duration>) -> bool {
        // A lease that had run out before this round trip was even sent lapsed, whether or not
        // a check saw it (a process paused past its lease and resumed: its first round trip
        // must not revive the lease, found by the model check, docs/safety.md).
        if self.until.is_some_and(|until| sent >= until) && !active(Break::RenewLapsedLease) {
            self.lapsed = true;
        }
        if self.lapsed {
            if !active(Break::RenewLapsedLease) {
                return false;
            }
            self.lapsed = false;
        }
        let lease = offered.map_or(self.lease, |offered| offered.min(self.lease));
        let until = sent + lease;
        self.until = Some(self.until.map_or(until, |current| current.max(until)));
        true
    }

    /// Whether the controller may acknowledge or complete a read at `now`. A lease found lapsed
    /// stays lapsed.
    pub fn check(&mut self, now: T) -> Result<(), LeaseError> {
        if self.lapsed {
            return Err(LeaseError::Lapsed { lease: self.lease });
        }
        match self.until {
            None => Err(LeaseError::NeverStarted),
            Some(until) if now < until => Ok(()),
            Some(_) => {
                self.lapsed = true;
                Err(LeaseError::Lapsed { lease: self.lease })
            }
        }
    }

    /// S2's confirmation after a fence: the epoch is confirmed (by the mediator or the DR
    /// partner) in a round trip sent at `sent`; the lease restarts from there.
    pub fn confirm(&mut self, sent: T, offered: Option<Duration>) {
        if !active(Break::ConfirmKeepsFence) {
            self.lapsed = false;
        }
        self.until = None;
        self.renew(sent, offered);
    }

    /// Whether a check found the lease lapsed (fenced until `confirm`).
    pub fn is_lapsed(&self) -> bool {
        self.lapsed
    }
}

/// The lease shared by the services that renew it (the mediator heartbeat, the NVLog mirror's
/// keepalives both ways) and the paths that check it (acknowledgements, read completions).
#[derive(Clone, Debug)]
pub struct SharedLease(std::sync::Arc<std::sync::Mutex<Lease>>);

impl SharedLease {
    /// A lease of `lease`, not started.
    pub fn new(lease: Duration) -> SharedLease {
        SharedLease(std::sync::Arc::new(std::sync::Mutex::new(Lease::new(lease))))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lease> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `Lease::renew`.
    pub fn renew(&self, sent: Instant, offered: Option<Duration>) -> bool {
        self.lock().renew(sent, offered)
    }

    /// `Lease::check` now.
    pub fn check(&self) -> Result<(), LeaseError> {
        self.lock().check(Instant::now())
    }

    /// `Lease::confirm`.
    pub fn confirm(&self, sent: Instant, offered: Option<Duration>) {
        self.lock().confirm(sent, offered);
    }

    /// `Lease::is_lapsed`.
    pub fn is_lapsed(&self) -> bool {
        self.lock().is_lapsed()
    }
}

/// The send times of the last keepalives of one stream, to renew the lease from the send time
/// of the one a reply answers.
#[derive(Debug, Default)]
pub struct SentKeepalives(std::collections::VecDeque<(u64, Instant)>);

impl SentKeepalives {
    /// Keepalive `sequence` was sent now.
    pub fn sent(&mut self, sequence: u64) {
        self.0.push_back((sequence, Instant::now()));
        while self.0.len() > 64 {
            self.0.pop_front();
        }
    }

    /// The send time of keepalive `sequence`, forgetting it and every older one.
    pub fn answered(&mut self, sequence: u64) -> Option<Instant> {
        let at = self.0.iter().find(|(s, _)| *s == sequence).map(|(_, at)| *at);
        self.0.retain(|(s, _)| *s > sequence);
        at
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Prevents a lease counted from the reply's arrival, one longer than the mediator offers, a
    /// lapsed lease renewed, or a fence without a confirmation ended.
    #[test]
    fn the_lease_counts_from_the_send_time_and_a_lapsed_one_stays_lapsed() {
        let t0 = Instant::now();
        let mut lease = Lease::new(ms(2000));
        assert_eq!(lease.check(t0), Err(LeaseError::NeverStarted));
        // Sent at t0, answered 1.5 s later: the lease ends at t0 + 2 s, not t0 + 3.5 s.
        assert!(lease.renew(t0, Some(ms(10_000))));
        assert_eq!(lease.check(t0 + ms(1999)), Ok(()));
        assert!(lease.check(t0 + ms(2000)).is_err());
        // Lapsed: a late reply renews nothing.
        assert!(!lease.renew(t0 + ms(1900), None));
        assert!(lease.check(t0 + ms(2001)).is_err());
        assert!(lease.is_lapsed());
        // S2 confirmation ends the fence.
        lease.confirm(t0 + ms(3000), Some(ms(1000)));
        assert_eq!(lease.check(t0 + ms(3500)), Ok(()));
        // The mediator's shorter lease wins.
        assert!(lease.check(t0 + ms(4000)).is_err());
    }

    /// Prevents a reply renewing from the wrong send time, or a replayed reply renewing twice.
    #[test]
    fn keepalive_replies_map_to_their_send_time() {
        let mut sent = SentKeepalives::default();
        sent.sent(1);
        let first = sent.0[0].1;
        sent.sent(2);
        assert_eq!(sent.answered(1), Some(first));
        assert_eq!(sent.answered(1), None);
        assert!(sent.answered(2).is_some());
        assert_eq!(sent.answered(3), None);
    }

    /// Prevents an older round trip from shortening the lease a newer one gave.
    /// Found by the model check (issue 11): A paused past its lease, resumed, and its first
    /// keepalive round trip with B revived the lease before any check had seen it run out,
    /// while B was taking over through the mediator: two writers.
    #[test]
    fn a_lease_that_ran_out_unseen_is_not_renewed_by_a_later_round_trip() {
        let t0 = Instant::now();
        let mut lease = Lease::new(ms(2000));
        assert!(lease.renew(t0, None));
        // No check between t0 + 2 s (the end) and the next round trip, sent at t0 + 5 s.
        assert!(!lease.renew(t0 + ms(5000), None));
        assert!(lease.is_lapsed());
        assert!(lease.check(t0 + ms(5100)).is_err());
        // A round trip sent while it still ran does renew it.
        let mut lease = Lease::new(ms(2000));
        assert!(lease.renew(t0, None));
        assert!(lease.renew(t0 + ms(1999), None));
        assert_eq!(lease.check(t0 + ms(3000)), Ok(()));
    }

    #[test]
    fn renewals_only_extend() {
        let t0 = Instant::now();
        let mut lease = Lease::new(ms(2000));
        lease.renew(t0 + ms(1000), None);
        lease.renew(t0, None);
        assert_eq!(lease.check(t0 + ms(2500)), Ok(()));
    }
}
