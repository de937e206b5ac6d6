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
    /// S7: an automatic switchover is granted though an aggregate is not recorded in sync.
    GrantWithoutInSync,
    /// S14: a controller waiting for switchback counts as a healthy survivor, so its site can be
    /// a switchover target again before heal and switchback.
    SwitchedOverTarget,
    /// §10 rule 3, S13: the receiver's report alone restores the in-sync record, whatever the
    /// owner's word (a drop recorded since).
    ReceiverReportRestoresInSync,
    /// §10 rule 5, S2: a restarted mediator trusts the state file it read (as before finding
    /// 8): an older copy restored over it confirms a superseded epoch.
    RestartTrustsItsFile,
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
