//! The bounded model check of the safety core (issue 11), and the proof that it bites: each
//! deliberate break of the product's code (`model_breaks`) yields a counterexample, printed as
//! a trace.
//!
//! The breaks are process-wide switches: the tests here hold one lock for their whole run, so
//! `cargo test` (threads) and `cargo nextest` (processes) both run them one at a time.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::sync::Mutex;
use std::time::Instant;

use mc_model::{
    ACKED_WRITES_HELD, Bounds, ClusterModel, NO_AUSO_OUT_OF_SYNC, NO_STALE_EPOCH, NO_WAY_BACK, ONE_WRITER,
    RECOVERS, REPLAY_DOUBT, REPLAY_GAP, SAFETY, SOME_AUSO, SOME_GRANT_AFTER_RESTART, SOME_PLEX_RESYNC,
    SOME_RECOVERY, SOME_RESYNC, SOME_SWITCHBACK, SOME_SWITCHBACK_IN_SYNC, SOME_SWITCHBACK_RESUMED,
    SOME_WRITE_ACKNOWLEDGED, trace,
};
use stateright::{Checker, HasDiscoveries, Model};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Explores every state within `bounds`; panics with the trace of any safety violation.
fn check_all(bounds: Bounds) {
    check_all_of(&[SOME_WRITE_ACKNOWLEDGED, SOME_AUSO, SOME_RECOVERY, SOME_RESYNC], bounds);
}

/// `check_all`, with the vacuity guards that must be reached.
fn check_all_of(reached: &[&'static str], bounds: Bounds) {
    let started = Instant::now();
    let checker = ClusterModel { bounds }.checker().threads(threads()).spawn_bfs().join();
    println!(
        "model check {bounds:?}: {} states explored, {} unique, max depth {}, {:.1} s",
        checker.state_count(),
        checker.unique_state_count(),
        checker.max_depth(),
        started.elapsed().as_secs_f64()
    );
    for name in SAFETY {
        if let Some(path) = checker.discovery(name) {
            panic!("the model check found a violation of \"{name}\":\n{}", trace(path));
        }
    }
    for name in reached {
        assert!(checker.discovery(name).is_some(), "no state where {name}: the check would be vacuous");
    }
    // The replay's gap rule inside the partner's records stands behind the receiver's rules;
    // with a mediator, its release-point rule stands behind the grant's in-sync record
    // (docs/safety.md): were one of these reached, a rule would carry weight the model does not
    // show biting. Without a mediator the release-point rule is load-bearing (a plex dropped
    // while B's site was cut off), and `reached` names it where a check must reach it.
    let unreachable: &[&str] = if bounds.mediator { &[REPLAY_GAP, REPLAY_DOUBT] } else { &[REPLAY_GAP] };
    for name in unreachable {
        if let Some(path) = checker.discovery(name) {
            panic!("a state where {name}, thought unreachable:\n{}", trace(path));
        }
    }
}

#[test]
fn the_bounded_model_check_finds_no_violation() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    check_all(Bounds::CI);
}

/// The larger run: two faults of any kind but message faults, nine seconds, one interleaving
/// per second (the depth where findings 5 and 6 of docs/safety.md live).
/// `cargo nextest run -p mc-model --cargo-profile release --run-ignored only the_larger`, or
/// `mc-model-check --fifo --horizon 9 --faults 2` (docs/safety.md).
#[test]
#[ignore = "the larger bounded run: 46 million states, about 15 minutes and 16.5 GiB in release on 2 cores"]
fn the_larger_model_check_finds_no_violation() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    check_all(Bounds { horizon: 9, faults: 2, fifo: true, ..Bounds::CI });
}

/// With one break on, the checker must find a violation of `expected`; prints its trace.
fn bites(set: impl Fn(bool), expected: &'static str, bounds: Bounds) {
    /// Turns the break off however the test ends (a path is rebuilt by running the model
    /// again, so the break stays on until the trace is printed).
    struct On<F: Fn(bool)>(F);
    impl<F: Fn(bool)> Drop for On<F> {
        fn drop(&mut self) {
            (self.0)(false);
        }
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    set(true);
    let _on = On(set);
    let checker = ClusterModel { bounds }
        .checker()
        .threads(threads())
        .finish_when(HasDiscoveries::AnyOf([expected].into_iter().collect()))
        .spawn_bfs()
        .join();
    let Some(path) = checker.discovery(expected) else {
        panic!(
            "the break went unnoticed: no violation of \"{expected}\" in {} states",
            checker.unique_state_count()
        );
    };
    println!(
        "counterexample of \"{expected}\" ({} states explored):\n{}",
        checker.unique_state_count(),
        trace(path)
    );
}

fn controller_break(b: controller::model_breaks::Break) -> impl Fn(bool) {
    move |on| controller::model_breaks::set(b, on)
}

#[test]
fn acknowledging_before_the_partner_acks_is_caught() {
    use controller::model_breaks::Break;
    bites(controller_break(Break::AckBeforePartner), ACKED_WRITES_HELD, Bounds::CI);
}

#[test]
fn accepting_a_stale_epoch_is_caught() {
    use controller::model_breaks::Break;
    bites(controller_break(Break::AcceptStaleEpoch), NO_STALE_EPOCH, Bounds::CI);
}

/// S6: A paused past its lease while the operator's switchover is granted to B; the grant's
/// delivery to B slips into the next second, in which A's first keepalive round trip would
/// revive its lapsed lease (the model's finding 1, docs/safety.md).
#[test]
fn renewing_a_lapsed_lease_is_caught() {
    use controller::model_breaks::Break;
    let bounds = Bounds { horizon: 7, faults: 2, pause: true, delay: true, ..only_faults() };
    bites(controller_break(Break::RenewLapsedLease), ONE_WRITER, bounds);
}

/// S3: A's drop of a stalled receiver (a gray disk: keepalives answered, records not taken)
/// acknowledges before the mediator recorded it; A dies before its next heartbeat tells the
/// mediator, which then grants AUSO to B without the write.
#[test]
fn dropping_without_the_mediators_record_is_caught() {
    use controller::model_breaks::Break;
    bites(controller_break(Break::DropWithoutMediatorRecord), ACKED_WRITES_HELD, gray_disk_then_crash());
}

/// S7: the same path with the drop recorded: the mediator's in-sync record says no, and only
/// the break grants.
#[test]
fn granting_auso_without_the_in_sync_record_is_caught() {
    use mediator::model_breaks::{Break, set};
    bites(|on| set(Break::GrantWithoutInSync, on), NO_AUSO_OUT_OF_SYNC, gray_disk_then_crash());
}

/// No fault kind, no operator: the tests below enable what their path needs.
fn only_faults() -> Bounds {
    Bounds {
        crash: false,
        lose_nvlog: false,
        pause: false,
        stall: false,
        cut_link: false,
        cut_mediator: false,
        lose: false,
        duplicate: false,
        delay: false,
        switchovers: 0,
        fifo: true,
        ..Bounds::CI
    }
}

/// A write, a stalled receiver, the mirror timeout, a crash of A, then AUSO's lease + margin:
/// a 12-second path, explored one interleaving per second (`Bounds::fifo`).
fn gray_disk_then_crash() -> Bounds {
    Bounds { horizon: 12, faults: 2, stall: true, crash: true, ..only_faults() }
}

/// S14: A crashes and X is switched over to B automatically; A comes back waiting for
/// switchback; then B crashes and the operator forces a switchover at A. Only the break lets
/// the mediator take A's site for a survivor before heal and switchback.
#[test]
fn a_switched_over_site_as_a_target_before_heal_is_caught() {
    use mediator::model_breaks::{Break, set};
    let bounds = Bounds { horizon: 9, writes: 0, faults: 2, crash: true, switchovers: 1, ..only_faults() };
    bites(|on| set(Break::SwitchedOverTarget, on), NO_WAY_BACK, bounds);
}

/// Liveness: A paused past its lease resumes; the mediator confirms its epoch, but the break
/// leaves it fenced, so nobody serves X though nothing is broken any more.
#[test]
fn a_fence_that_confirmation_never_lifts_is_caught() {
    use controller::model_breaks::Break;
    let bounds = Bounds { horizon: 8, faults: 1, pause: true, ..only_faults() };
    bites(controller_break(Break::ConfirmKeepsFence), RECOVERS, bounds);
}

/// Without a mediator (no lease; the DR partner confirms epochs; drops complete after
/// mirror_timeout of silence; forced switchovers on the operator's word that the partner is
/// down): 10 seconds, two faults, every order.
#[test]
fn the_bounded_model_check_without_a_mediator_finds_no_violation() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    check_all_of(
        &[SOME_WRITE_ACKNOWLEDGED, SOME_RECOVERY, SOME_RESYNC],
        Bounds { horizon: 10, faults: 2, mediator: false, ..Bounds::CI },
    );
}

/// S13: B is paused past the silence limit while A drops it by silence and acknowledges alone;
/// A then loses its NVLog. Only B's own account (`out_of_sync` by silence) tells A that B's copy
/// lacks the write; the break keeps it `in_sync` and A serves without the write.
#[test]
fn a_receiver_that_stays_in_sync_through_silence_is_caught() {
    use controller::model_breaks::Break;
    let bounds =
        Bounds { horizon: 10, faults: 2, pause: true, lose_nvlog: true, mediator: false, ..only_faults() };
    bites(controller_break(Break::ReceiverKeepsInSyncThroughSilence), ACKED_WRITES_HELD, bounds);
}

/// A gray disk at B, and A's crash losing its NVLog, with a mediator, one interleaving per
/// second (finding 5 of docs/safety.md: A dropped B through the mediator and acknowledged alone;
/// B, its store stalled with the drop and the re-establish unapplied, still says `in_sync` and
/// has round trips since its start: it cannot know).
fn gray_disk_then_lost_nvlog() -> Bounds {
    Bounds { horizon: 9, faults: 2, stall: true, lose_nvlog: true, ..only_faults() }
}

#[test]
fn the_model_check_of_a_lost_nvlog_with_a_mediator_finds_no_violation() {
    check_all(Bounds { crash: true, ..gray_disk_then_lost_nvlog() });
}

/// S8: the same bounds; the break adopts the partner's copy without the mediator's word that
/// the mirror is intact, and the write A acknowledged alone is lost.
#[test]
fn adopting_a_copy_without_the_mediators_word_is_caught() {
    use controller::model_breaks::Break;
    bites(
        controller_break(Break::AdoptWithoutMediatorIntact),
        ACKED_WRITES_HELD,
        gray_disk_then_lost_nvlog(),
    );
}

/// §10 rule 3 (S13 at the mediator): the same gray-disk path. After A's drop is recorded, the
/// stalled receiver still reports `in_sync`; the break lets that report alone restore the in-sync
/// record, and AUSO hands X to a B that lacks the write.
#[test]
fn a_receiver_report_restoring_in_sync_is_caught() {
    use mediator::model_breaks::{Break, set};
    bites(|on| set(Break::ReceiverReportRestoresInSync, on), NO_AUSO_OUT_OF_SYNC, gray_disk_then_crash());
}

/// §9 (a), S13 (finding 7 of docs/safety.md): without a mediator, B crashes and A drops it by
/// silence and acknowledges alone; B restarts, and A's handshake re-establishes the mirror, but
/// B's store stalls (a gray disk) before it applies the `resyncing` announcement; its keepalive
/// round trips go on; A crashes and the operator switches over to B on the word that A is down.
/// B's account still says `in_sync` with a recent round trip; only the unstored messages show
/// it lags. The break trusts the account, and B serves without the write.
#[test]
fn trusting_a_receiver_account_with_messages_unstored_is_caught() {
    use controller::model_breaks::Break;
    bites(controller_break(Break::TrustUnstoredAccount), ACKED_WRITES_HELD, crash_stall_crash());
}

/// Three faults (crashes and a gray disk), no mediator, 11 seconds, one interleaving per second.
fn crash_stall_crash() -> Bounds {
    Bounds {
        horizon: 11,
        faults: 3,
        crash: true,
        stall: true,
        switchovers: 1,
        mediator: false,
        ..only_faults()
    }
}

/// The regression check of finding 7: the same bounds, nothing broken.
#[test]
fn the_model_check_of_a_gray_disk_without_a_mediator_finds_no_violation() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    check_all_of(&[SOME_WRITE_ACKNOWLEDGED, SOME_RECOVERY, SOME_RESYNC], crash_stall_crash());
}

/// B's plex dropped (S3): the link is cut while a CP is due; after `mirror_timeout` of silence A
/// drops B's plex and its CP goes on with A's plex alone, releasing records B's plex never got.
/// The link heals: the handshake tells B the release point, and the mirror is in sync again at
/// the next CP, before A's plex monitor has resynced B's plex. A crashes; without a mediator the
/// operator switches over to B, whose account is `in_sync` with a fresh round trip: only the
/// replay's rule that the release point must not be above the plex's last CP NVFAILs. Nine
/// seconds, three faults, no mediator, one interleaving per second.
fn cut_heal_crash() -> Bounds {
    Bounds {
        horizon: 9,
        faults: 3,
        crash: true,
        cut_link: true,
        switchovers: 1,
        mediator: false,
        ..only_faults()
    }
}

/// S8: the break replays across the lsns between the plex's last CP and the partner's release
/// point, and B serves without the write A's CP put in A's plex alone.
#[test]
fn replaying_across_a_gap_is_caught() {
    use controller::model_breaks::Break;
    bites(controller_break(Break::ReplayAcrossGap), ACKED_WRITES_HELD, cut_heal_crash());
}

/// The same bounds, nothing broken: the replay's release-point rule is reached (it NVFAILs
/// where the switchover's own checks found nothing).
#[test]
fn the_model_check_of_a_dropped_plex_without_a_mediator_finds_no_violation() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    check_all_of(
        &[SOME_WRITE_ACKNOWLEDGED, SOME_RECOVERY, SOME_RESYNC, SOME_PLEX_RESYNC, REPLAY_DOUBT],
        cut_heal_crash(),
    );
}

/// With a mediator: a cut that outlasts `mirror_timeout` while a CP is due drops B's plex (the
/// mediator records it before the CP goes on, S3), heals, and the plex monitor resyncs it; the
/// mediator's in-sync record follows (no AUSO while the plex is out of date). Ten seconds, two
/// faults (link and mediator cuts), one interleaving per second.
#[test]
fn the_model_check_of_a_dropped_plex_with_a_mediator_finds_no_violation() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    check_all_of(
        &[SOME_WRITE_ACKNOWLEDGED, SOME_RECOVERY, SOME_RESYNC, SOME_PLEX_RESYNC, SOME_AUSO],
        Bounds {
            horizon: 10,
            faults: 2,
            cut_link: true,
            cut_mediator: true,
            switchovers: 1,
            ..only_faults()
        },
    );
}

/// Mediator restarts (§10 rule 5): with its state file, without one, or over an older copy
/// restored from a backup, among crashes of both controllers: five seconds, three faults, one
/// interleaving per second (finding 8 of docs/safety.md lives here).
fn crashes_and_mediator_restarts() -> Bounds {
    Bounds { horizon: 5, faults: 3, crash: true, restart_mediator: true, ..only_faults() }
}

#[test]
fn the_model_check_of_mediator_restarts_finds_no_violation() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    check_all_of(
        &[SOME_WRITE_ACKNOWLEDGED, SOME_AUSO, SOME_RECOVERY, SOME_GRANT_AFTER_RESTART],
        crashes_and_mediator_restarts(),
    );
}

/// Finding 8 (S2, rule 5): A crashes, X is switched over to B, B acknowledges a write and
/// crashes, and the mediator comes back over an older copy of its state; A restarts. The break
/// lets the restarted mediator trust its file: it confirms A's epoch 1, and A serves without the
/// write. Only B could show the file is old, and B is down.
#[test]
fn a_restarted_mediator_trusting_its_file_is_caught() {
    use mediator::model_breaks::{Break, set};
    bites(|on| set(Break::RestartTrustsItsFile, on), ACKED_WRITES_HELD, crashes_and_mediator_restarts());
}

/// Heal and switchback (DESIGN §11) after an operator's forced switchover to B, without a
/// mediator: crashes, lost NVLogs, pauses, a gray disk and link cuts, two of them, a write.
fn heal_and_switchback() -> Bounds {
    Bounds {
        horizon: 9,
        writes: 1,
        faults: 2,
        crash: true,
        lose_nvlog: true,
        pause: true,
        stall: true,
        cut_link: true,
        switchovers: 1,
        mediator: false,
        switchback: true,
        ..only_faults()
    }
}

/// S1, S8 (finding 9 of docs/safety.md): A dies with its NVLog, the operator switches over to
/// B, A returns (its new log counts on from its last CP, below the records of it B holds), heal
/// and switchback. Were A's old records still held in B's receiver partition, A's handshake
/// would take B's tail for its own new records: a write acknowledged as mirrored that B does not
/// hold, lost when A loses its NVLog again.
#[test]
fn a_switchback_keeping_the_home_nodes_held_records_is_caught() {
    use controller::model_breaks::Break;
    let bounds = Bounds {
        horizon: 5,
        writes: 2,
        faults: 2,
        crash: true,
        lose_nvlog: true,
        switchovers: 1,
        mediator: false,
        switchback: true,
        ..only_faults()
    };
    bites(controller_break(Break::SwitchbackKeepsHeldRecords), ACKED_WRITES_HELD, bounds);
}

/// The regression check of finding 9, and S14 in full: a switchback hands X back, the mirror is
/// in sync again after it, and no switchover goes back before it.
#[test]
fn the_model_check_of_heal_and_switchback_without_a_mediator_finds_no_violation() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    check_all_of(
        &[SOME_WRITE_ACKNOWLEDGED, SOME_RECOVERY, SOME_SWITCHBACK, SOME_SWITCHBACK_IN_SYNC],
        heal_and_switchback(),
    );
}

/// With a mediator: A crashes, AUSO to B, A restarts, heal and switchback, with a second crash
/// anywhere (the switchback's node while the mediator raises the epoch, finding 10). Eight
/// seconds, no write (the switchback's steps are what is explored).
fn switchback_with_a_mediator() -> Bounds {
    Bounds {
        horizon: 8,
        writes: 0,
        faults: 2,
        crash: true,
        switchovers: 1,
        switchback: true,
        ..only_faults()
    }
}

/// Liveness (finding 10 of docs/safety.md): B crashes right after it asked the mediator to raise
/// X's epoch for A; the mediator did. Were the switchback rolled back at B's restart, the
/// mediator's next reply would depose B while A still waits for switchback: nothing could switch
/// X back, and nobody serves it.
#[test]
fn a_switchback_rolled_back_after_asking_the_mediator_is_caught() {
    use controller::model_breaks::Break;
    bites(controller_break(Break::SwitchbackRollsBackAfterAsking), RECOVERS, switchback_with_a_mediator());
}

/// The regression check of finding 10: an interrupted switchback is re-run and hands X back.
#[test]
fn the_model_check_of_a_switchback_with_a_mediator_finds_no_violation() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    check_all_of(
        &[SOME_RECOVERY, SOME_SWITCHBACK_RESUMED, SOME_SWITCHBACK_IN_SYNC],
        switchback_with_a_mediator(),
    );
}
