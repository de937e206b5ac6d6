//! Fault-injection points for the tests that need a partner to misbehave in ways a network
//! proxy cannot produce (a gray partner: keepalives answered, records never stored).
//!
//! A point is armed only when the daemon's environment names a switch file for it, and it
//! fires only while that file exists. Without the variable a point costs one relaxed load.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

/// The NVLog receiver's storage stalls (a hung NVRAM): records, releases and announcements
/// wait; keepalives are still answered.
pub const RECEIVER_STORAGE: &str = "MC_FAULT_RECEIVER_STALL_FILE";

fn switch(point: &'static str) -> Option<&'static PathBuf> {
    static RECEIVER: OnceLock<Option<PathBuf>> = OnceLock::new();
    let cell = match point {
        RECEIVER_STORAGE => &RECEIVER,
        _ => return None,
    };
    cell.get_or_init(|| std::env::var_os(point).map(PathBuf::from)).as_ref()
}

/// Waits while the switch file of `point` exists.
pub async fn wait_while_stalled(point: &'static str) {
    let Some(path) = switch(point) else { return };
    let mut logged = false;
    while path.exists() {
        if !logged {
            tracing::warn!(point, "fault injected: stalled while {} exists", path.display());
            logged = true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The forced switchover crashes the daemon (abort, as `kill -9` would leave it) at the step
/// this variable names: `planned`, `released` (negotiated only), `frozen`, `adopted`, `replayed`
/// or `cp`; heal and switchback at `heal-discarded`, `switchback-planned`, `switchback-cp`,
/// `switchback-asked` (the mediator raised the epochs, not yet persisted here),
/// `switchback-raised` or `switchback-handed`.
pub const SWITCHOVER_CRASH: &str = "MC_FAULT_SWITCHOVER_CRASH_AT";

/// Aborts the process if `SWITCHOVER_CRASH` names `step`.
pub fn crash_at(step: &str) {
    static AT: OnceLock<Option<String>> = OnceLock::new();
    let at = AT.get_or_init(|| std::env::var(SWITCHOVER_CRASH).ok());
    if at.as_deref() == Some(step) {
        tracing::error!(step, "fault injected: the switchover crashes here");
        std::process::abort();
    }
}
