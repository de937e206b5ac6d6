//! Deliberate breaks of the safety core, for the model checker only (issue 11: "the checker
//! bites"). Each names one rule of DESIGN §0 that the code below stops enforcing while the break
//! is active; `mc-model`'s tests turn one on and expect a counterexample.
//!
//! Without the `model-breaks` feature, `active` is a constant `false` and the checks compile
//! away. With it (only `mc-model` enables it), a break is active only after `set` turned it on,
//! which nothing but `mc-model`'s tests does: the daemons never call `set`.

/// One deliberate break.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Break {
    /// S1: a record counts as mirrored before the partner acknowledged it.
    AckBeforePartner,
    /// S3: a drop takes the partner out of the ack set without the mediator's record.
    DropWithoutMediatorRecord,
    /// S6: a lapsed lease is renewed by a round trip.
    RenewLapsedLease,
    /// S2: a stale epoch passes the shelf's epoch gate.
    AcceptStaleEpoch,
    /// Liveness (S2, S6): S2's confirmation does not end the fence of a lapsed lease.
    ConfirmKeepsFence,
    /// S13: the receiver's account stays `in_sync` through a silence of the writer.
    ReceiverKeepsInSyncThroughSilence,
    /// S8: a lost local partition adopts the partner's copy as complete without the mediator
    /// vouching that no drop was recorded.
    AdoptWithoutMediatorIntact,
    /// S8: a switchover replays the partner's records across a run of missing lsns: between
    /// the last CP the plex here holds and the partner's release point (records the partner
    /// released while this plex was dropped), or inside the partition's records (no model path
    /// reaches that one, docs/safety.md).
    ReplayAcrossGap,
    /// §9 (a), S13: a switchover without a mediator trusts the receiver's account while the
    /// writer's messages wait unstored (a stalled store).
    TrustUnstoredAccount,
    /// S1, S8: a switchback hands the aggregates back with the home node's records from before
    /// the switchover still held in the survivor's receiver partition.
    SwitchbackKeepsHeldRecords,
    /// Liveness (finding 10): a switchback interrupted after it asked the mediator for the new
    /// epochs is rolled back at start, though the mediator may hold them.
    SwitchbackRollsBackAfterAsking,
}

#[cfg(feature = "model-breaks")]
static ACTIVE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

#[cfg(feature = "model-breaks")]
fn bit(b: Break) -> u32 {
    1 << (b as u32)
}

/// Whether `b` is active.
#[inline]
pub fn active(b: Break) -> bool {
    #[cfg(feature = "model-breaks")]
    {
        ACTIVE.load(std::sync::atomic::Ordering::Relaxed) & bit(b) != 0
    }
    #[cfg(not(feature = "model-breaks"))]
    {
        let _ = b;
        false
    }
}

/// Turns `b` on or off (the model checker's tests only).
#[cfg(feature = "model-breaks")]
pub fn set(b: Break, on: bool) {
    use std::sync::atomic::Ordering;
    if on {
        ACTIVE.fetch_or(bit(b), Ordering::Relaxed);
    } else {
        ACTIVE.fetch_and(!bit(b), Ordering::Relaxed);
    }
}
