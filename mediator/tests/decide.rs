//! Table tests of the mediator's decisions (DESIGN §10): one row per rule, with the scaled timer
//! profile (lease 2 s, margin 0.5 s, AUSO window 5 s). Each row is a timeline of events at
//! the mediator's clock and what must (or must not) come out.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use mediator::decide::{
    Action, AggregateId, Config, Controller, Diagnosis, Epoch, Event, Grant, Mediator, MirrorState, Mode,
    NodeId, OwnedReport, PartnerView, ReceivedReport, Report, Site, State, Timers,
};

const A: NodeId = NodeId(1);
const B: NodeId = NodeId(2);
/// Owned by A.
const AGG: AggregateId = AggregateId([7; 16]);

fn config(observer: bool) -> Config {
    Config {
        controllers: vec![Controller { node: A, site: Site(0) }, Controller { node: B, site: Site(1) }],
        timers: Timers::SCALED,
        observer,
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A report of `node` (sequence `seq`), hearing its partner `heard` ms ago (`None`: never).
fn report(node: NodeId, seq: u64, heard: Option<u64>) -> Report {
    let partner = if node == A { B } else { A };
    Report {
        node,
        log_generation: 1,
        sequence: seq,
        state_version: 0,
        uptime: Duration::from_secs(100),
        mode: Mode::Normal,
        fenced: false,
        partners: vec![PartnerView {
            node: partner,
            heard_age: heard.map(ms),
            round_trip_age: heard.map(ms),
        }],
        owned: if node == A {
            vec![OwnedReport {
                aggregate: AGG,
                epoch: Epoch { number: 1, owner: A },
                mirror: MirrorState::InSync,
                receiver_generation: 5,
                plexes_normal: true,
            }]
        } else {
            Vec::new()
        },
        received: if node == B {
            vec![ReceivedReport { writer: A, partition_generation: 5, state: MirrorState::InSync }]
        } else {
            Vec::new()
        },
        epochs_seen: Vec::new(),
    }
}

fn grants(actions: &[Action]) -> Vec<Grant> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Reply(r) => r.grant.clone(),
            _ => None,
        })
        .collect()
}

fn refusal(actions: &[Action]) -> Option<String> {
    actions.iter().find_map(|a| match a {
        Action::Refuse { reason, .. } => Some(reason.clone()),
        _ => None,
    })
}

/// Both sites report at 0 ms (in sync), then A goes silent; B reports every 200 ms from
/// `from` until `until`, its last sign of A at 0 ms. Returns when the first grant came.
fn silent_a(mediator: &mut Mediator, from: u64, until: u64) -> Option<u64> {
    mediator.handle(ms(0), Event::Report(report(A, 1, Some(0))));
    mediator.handle(ms(0), Event::Report(report(B, 1, Some(0))));
    let mut seq = 2;
    let mut at = from;
    while at <= until {
        let actions = mediator.handle(ms(at), Event::Report(report(B, seq, Some(at))));
        if !grants(&actions).is_empty() {
            return Some(at);
        }
        seq += 1;
        at += 200;
    }
    None
}

fn mediator(observer: bool) -> Mediator {
    Mediator::new(config(observer), Some(State::default())).unwrap()
}

/// Rule 2, the site-lost case: AUSO only once lease + margin (2.5 s) passed since the later of
/// the mediator's and B's last sign of A, and then with an epoch above A's, to B.
#[test]
fn auso_waits_for_lease_plus_margin_and_raises_the_epoch() {
    let mut m = mediator(false);
    let at = silent_a(&mut m, 200, 5000).expect("no AUSO for a lost site");
    assert_eq!(at, 2600, "granted at {at} ms, lease + margin is 2500 ms");
    let grant = m.state().grants[0].clone();
    assert_eq!((grant.to, grant.from, grant.automatic, grant.nvfail), (B, Site(0), true, false));
    assert_eq!(grant.epochs, vec![(AGG, Epoch { number: 2, owner: B })]);
    assert_eq!(m.diagnose(ms(2600)), Diagnosis::SiteLost(Site(0)));
    // The grant is B's S3 record for dropping A: B's own aggregates are out of sync now.
    let b_aggr = AggregateId([8; 16]);
    assert!(!m.state().aggregates.get(&b_aggr).is_some_and(|r| r.in_sync()));
    // Final: re-delivered until confirmed, then not.
    let again = m.handle(ms(2800), Event::Report(report(B, 100, Some(2800))));
    assert_eq!(grants(&again), vec![grant]);
    m.handle(ms(2900), Event::ConfirmGrant { node: B });
    assert!(grants(&m.handle(ms(3000), Event::Report(report(B, 101, Some(3000))))).is_empty());
}

/// The grant records, in the same state change, every aggregate of the survivor's site as out
/// of sync (its mirror to the lost site is dropped: S3).
#[test]
fn a_grant_clears_the_survivors_own_in_sync_record() {
    let b_aggr = AggregateId([8; 16]);
    let with_b_aggregate = |seq: u64, heard: u64| {
        let mut r = report(B, seq, Some(heard));
        r.owned.push(OwnedReport {
            aggregate: b_aggr,
            epoch: Epoch { number: 1, owner: B },
            mirror: MirrorState::InSync,
            receiver_generation: 9,
            plexes_normal: true,
        });
        r
    };
    let mut m = mediator(false);
    let mut a = report(A, 1, Some(0));
    a.received.push(ReceivedReport { writer: B, partition_generation: 9, state: MirrorState::InSync });
    m.handle(ms(0), Event::Report(with_b_aggregate(1, 0)));
    m.handle(ms(0), Event::Report(a));
    assert!(m.state().aggregates[&b_aggr].in_sync());
    let mut granted = false;
    for (seq, at) in (2..).zip((200..=4000).step_by(200)) {
        if !grants(&m.handle(ms(at), Event::Report(with_b_aggregate(seq, at)))).is_empty() {
            granted = true;
            break;
        }
    }
    assert!(granted);
    assert!(!m.state().aggregates[&b_aggr].in_sync());
}

/// Rule 2, "the later of": B heard A more recently than the mediator did; the lease counts from
/// B's sign of A.
#[test]
fn auso_counts_from_the_later_sign_of_life() {
    let mut m = mediator(false);
    m.handle(ms(0), Event::Report(report(A, 1, Some(0))));
    // B still heard A at 1000 ms (the mediator link of A died first).
    let mut granted = None;
    for (seq, at) in (2..).zip((1200..=6000).step_by(200)) {
        let age = at - 1000;
        if !grants(&m.handle(ms(at), Event::Report(report(B, seq, Some(age))))).is_empty() {
            granted = Some(at);
            break;
        }
    }
    assert_eq!(granted, Some(3600), "1000 ms + lease + margin");
}

/// Rule 2, the window: a survivor that reports only after the AUSO window gets nothing; a
/// manual forced switchover (no window) still can.
#[test]
fn auso_outside_the_window_is_refused_but_manual_is_not() {
    let mut m = mediator(false);
    assert_eq!(silent_a(&mut m, 5200, 6000), None);
    let actions = m.handle(ms(6000), Event::ManualSwitchover { node: B, override_in_sync: false });
    let grant = grants(&actions);
    assert_eq!(grant.len(), 1, "{actions:?}");
    assert!(!grant[0].automatic && !grant[0].nvfail);
}

/// Rule 3: the inter-site link is lost while both sites reach the mediator: never a switchover.
#[test]
fn link_lost_with_both_sites_reporting_never_switches() {
    let mut m = mediator(false);
    m.handle(ms(0), Event::Report(report(A, 1, Some(0))));
    m.handle(ms(0), Event::Report(report(B, 1, Some(0))));
    for (seq, at) in (2..).zip((200..=8000).step_by(200)) {
        let a = m.handle(ms(at), Event::Report(report(A, seq, Some(at))));
        let b = m.handle(ms(at), Event::Report(report(B, seq, Some(at))));
        assert!(grants(&a).is_empty() && grants(&b).is_empty(), "switched at {at} ms");
    }
    assert_eq!(m.diagnose(ms(8000)), Diagnosis::InterSiteLinkLost);
    let manual = m.handle(ms(8000), Event::ManualSwitchover { node: B, override_in_sync: true });
    assert!(refusal(&manual).unwrap().contains("lease may still run"), "{manual:?}");
}

/// Rule 2's in-sync condition and rule 3: an owner that reported out of sync, a receiver that
/// does, a partition generation mismatch, a plex down or a recorded drop: no AUSO; a manual
/// switchover needs the override and then NVFAILs.
#[test]
fn not_in_sync_blocks_auso_and_manual_needs_the_override() {
    type Lower = fn(&mut Report);
    let keep: Lower = |_| {};
    let cases: [(&str, Lower, Lower, bool); 5] = [
        ("owner out of sync", |r| r.owned[0].mirror = MirrorState::OutOfSync, keep, false),
        ("receiver resyncing", keep, |r| r.received[0].state = MirrorState::Resyncing, false),
        ("generation mismatch", keep, |r| r.received[0].partition_generation = 6, false),
        ("plex not normal", |r| r.owned[0].plexes_normal = false, keep, false),
        ("drop recorded", keep, keep, true),
    ];
    for (name, lower_a, lower_b, drop) in cases {
        let mut m = mediator(false);
        let mut a = report(A, 1, Some(0));
        lower_a(&mut a);
        m.handle(ms(0), Event::Report(a));
        if drop {
            m.handle(ms(0), Event::RecordDrop { node: A, aggregate: AGG, stamp: (1, 2), plex_only: false });
        }
        for (seq, at) in (1..).zip((0..=5000).step_by(200)) {
            let mut b = report(B, seq, Some(at));
            lower_b(&mut b);
            let actions = m.handle(ms(at), Event::Report(b));
            assert!(grants(&actions).is_empty(), "{name}: AUSO at {at} ms");
        }
        let refused = m.handle(ms(5000), Event::ManualSwitchover { node: B, override_in_sync: false });
        assert!(refusal(&refused).unwrap().contains("not recorded in sync"), "{name}: {refused:?}");
        let forced = m.handle(ms(5000), Event::ManualSwitchover { node: B, override_in_sync: true });
        let grant = grants(&forced);
        assert!(grant.len() == 1 && grant[0].nvfail, "{name}: {forced:?}");
    }
}

/// Rule 2: no controller of the survivor's site may be fenced or in takeover.
#[test]
fn a_fenced_or_switched_over_survivor_gets_nothing() {
    for (name, change) in [
        ("fenced", (true, Mode::Normal)),
        ("switchover", (false, Mode::Switchover)),
        ("waiting", (false, Mode::WaitingForSwitchback)),
    ] {
        let mut m = mediator(false);
        m.handle(ms(0), Event::Report(report(A, 1, Some(0))));
        for (seq, at) in (1..).zip((0..=5000).step_by(200)) {
            let mut r = report(B, seq, Some(at));
            (r.fenced, r.mode) = change;
            assert!(grants(&m.handle(ms(at), Event::Report(r))).is_empty(), "{name}: AUSO at {at} ms");
        }
    }
}

/// Rule 6: observer mode detects and alerts, never grants automatically; manual works.
#[test]
fn observer_mode_never_grants_automatically() {
    let mut m = mediator(true);
    assert_eq!(silent_a(&mut m, 200, 5000), None);
    assert_eq!(m.diagnose(ms(5000)), Diagnosis::SiteLost(Site(0)));
    let manual = m.handle(ms(5000), Event::ManualSwitchover { node: B, override_in_sync: false });
    assert_eq!(grants(&manual).len(), 1, "{manual:?}");
}

/// Rule 5: a mediator without its state grants nothing until every controller has reported (or
/// is confirmed down), holds nothing in sync until the owner reports, and issues epochs above
/// every one reported.
#[test]
fn a_mediator_that_lost_its_state_rebuilds_it_first() {
    let mut m = Mediator::new(config(false), None).unwrap();
    assert!(m.is_lost());
    let mut b = report(B, 1, Some(0));
    b.epochs_seen = vec![(AGG, Epoch { number: 41, owner: A })];
    m.handle(ms(0), Event::Report(b));
    for (seq, at) in (2..).zip((200..=4000).step_by(200)) {
        let actions = m.handle(ms(at), Event::Report(report(B, seq, Some(at + 3000))));
        assert!(grants(&actions).is_empty(), "granted at {at} ms with the state lost");
    }
    let refused = m.handle(ms(4000), Event::ManualSwitchover { node: B, override_in_sync: true });
    assert!(refusal(&refused).unwrap().contains("state was lost"), "{refused:?}");
    // The operator confirms A down: still not in sync (A never reported): manual with override.
    m.handle(ms(4000), Event::ConfirmDown { nodes: vec![A] });
    assert!(!m.is_lost());
    let plain = m.handle(ms(4200), Event::ManualSwitchover { node: B, override_in_sync: false });
    assert!(refusal(&plain).unwrap().contains("not recorded in sync"), "{plain:?}");
    let forced = m.handle(ms(4200), Event::ManualSwitchover { node: B, override_in_sync: true });
    let grant = grants(&forced);
    assert_eq!(grant[0].epochs, vec![(AGG, Epoch { number: 42, owner: B })], "{forced:?}");
    assert!(grant[0].nvfail);
}

/// Rule 5, a restored snapshot: a controller reports a state version above the mediator's.
#[test]
fn a_state_older_than_a_controller_saw_counts_as_lost() {
    let mut m = mediator(false);
    m.handle(ms(0), Event::Report(report(A, 1, Some(0))));
    let mut b = report(B, 1, Some(0));
    b.state_version = 1_000;
    let actions = m.handle(ms(0), Event::Report(b));
    assert!(m.is_lost());
    assert!(
        actions.iter().any(|a| matches!(a, Action::Alert(t) if t.contains("treated as lost"))),
        "{actions:?}"
    );
    assert_eq!(silent_a(&mut m, 200, 5000), None, "granted with an old state");
}

/// Reports older than one applied are ignored and not answered (no late lease renewal); every
/// applied one is persisted before its reply.
#[test]
fn old_reports_are_ignored_and_changes_persist_before_replies() {
    let mut m = mediator(false);
    let first = m.handle(ms(0), Event::Report(report(A, 5, Some(0))));
    assert_eq!(first.first(), Some(&Action::Persist), "{first:?}");
    let reply = first.iter().position(|a| matches!(a, Action::Reply(_))).unwrap();
    assert!(reply > 0);
    assert!(m.handle(ms(100), Event::Report(report(A, 5, Some(0)))).is_empty());
    assert!(m.handle(ms(100), Event::Report(report(A, 4, Some(0)))).is_empty());
    let mut newer_generation = report(A, 1, Some(0));
    newer_generation.log_generation = 2;
    assert!(!m.handle(ms(100), Event::Report(newer_generation)).is_empty());
    let unknown = m.handle(ms(100), Event::Report(report(NodeId(9), 1, None)));
    assert!(refusal(&unknown).is_some());
}

/// Rule 7 and the "switching sides" case: A loses the mediator (B still hears A), then B loses
/// it while A gets it back: the mediator names the mediator link, and never grants.
#[test]
fn mediator_link_loss_is_told_apart_and_never_grants() {
    let mut m = mediator(false);
    m.handle(ms(0), Event::Report(report(A, 1, Some(0))));
    m.handle(ms(0), Event::Report(report(B, 1, Some(0))));
    // A's mediator link is down; B hears A all along.
    for (seq, at) in (2..).zip((200..=4000).step_by(200)) {
        assert!(grants(&m.handle(ms(at), Event::Report(report(B, seq, Some(100))))).is_empty(), "at {at} ms");
    }
    assert_eq!(m.diagnose(ms(4000)), Diagnosis::MediatorLinkLost(Site(0)));
    // Sides switch: A is back, B is gone from the mediator; A hears B.
    for (seq, at) in (2..).zip((4200..=9000).step_by(200)) {
        assert!(grants(&m.handle(ms(at), Event::Report(report(A, seq, Some(100))))).is_empty(), "at {at} ms");
    }
    assert_eq!(m.diagnose(ms(9000)), Diagnosis::MediatorLinkLost(Site(1)));
}

/// S11: the timer order of DESIGN §10.1, each rule refused with its name.
#[test]
fn timer_order_is_validated() {
    assert_eq!(Timers::DEFAULT.validate(), Ok(()));
    assert_eq!(Timers::SCALED.validate(), Ok(()));
    let s = Timers::SCALED;
    let rows = [
        (Timers { margin: Duration::ZERO, ..s }, "margin"),
        (Timers { keepalive_timeout: ms(2000), ..s }, "keepalive timeout"),
        (Timers { heartbeat: ms(700), ..s }, "heartbeat"),
        (Timers { auso_window: ms(2500), ..s }, "lease + margin"),
        (Timers { auso_window: ms(6000), ..s }, "auso_window"),
        (Timers { mirror_timeout: ms(500), auso_window: ms(500), ..s }, "mirror_timeout"),
        (
            Timers { keepalive_timeout: ms(1900), mirror_timeout: ms(2900), auso_window: ms(2900), ..s },
            "mirror_timeout − margin",
        ),
    ];
    for (timers, rule) in rows {
        let error = timers.validate().unwrap_err();
        assert!(error.contains(rule), "{timers:?}: {error}");
    }
    assert!(
        Mediator::new(Config { timers: Timers { margin: Duration::ZERO, ..s }, ..config(false) }, None)
            .is_err()
    );
}

fn replied_epochs(actions: &[Action]) -> Vec<(AggregateId, Epoch)> {
    actions
        .iter()
        .find_map(|a| match a {
            Action::Reply(r) => Some(r.epochs.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

/// While the mediator answers it alone raises epochs (DESIGN §10): a negotiated switchover's,
/// a switchback's or a forced unfence's epoch goes above every epoch recorded or reported, is
/// persisted before the reply, and clears the in-sync record. Refused while the state is lost
/// (rule 5), while a grant of the aggregate is pending, and for an unknown owner.
#[test]
fn raised_epochs_go_above_every_epoch_seen_and_only_with_a_known_state() {
    let mut m = mediator(false);
    m.handle(ms(0), Event::Report(report(A, 1, Some(0))));
    m.handle(ms(0), Event::Report(report(B, 1, Some(0))));
    assert!(m.state().aggregates[&AGG].in_sync());
    let actions = m.handle(
        ms(100),
        Event::RaiseEpochs { node: A, aggregates: vec![(AGG, B)], reason: "negotiated switchover".into() },
    );
    assert_eq!(actions.first(), Some(&Action::Persist), "{actions:?}");
    assert!(replied_epochs(&actions).contains(&(AGG, Epoch { number: 2, owner: B })), "{actions:?}");
    assert!(!m.state().aggregates[&AGG].in_sync(), "a raised epoch kept the in-sync record");
    assert!(
        m.last_decision()
            .is_some_and(|d| d.contains("raised for node 2 (negotiated switchover, asked by node 1)"))
    );
    // B saw epoch 4 somewhere (a label): the switchback's epoch goes above it, back to A.
    let mut b = report(B, 2, Some(150));
    b.epochs_seen = vec![(AGG, Epoch { number: 4, owner: B })];
    m.handle(ms(150), Event::Report(b));
    let actions = m.handle(
        ms(200),
        Event::RaiseEpochs { node: B, aggregates: vec![(AGG, A)], reason: "switchback".into() },
    );
    assert!(replied_epochs(&actions).contains(&(AGG, Epoch { number: 5, owner: A })), "{actions:?}");
    // Refusals change nothing.
    let version = m.state().version;
    for (aggregates, why) in [
        (vec![(AGG, NodeId(9))], "not configured"),
        (vec![(AGG, A), (AGG, B)], "twice"),
        (Vec::new(), "no aggregate"),
    ] {
        let actions = m.handle(ms(300), Event::RaiseEpochs { node: A, aggregates, reason: String::new() });
        assert!(refusal(&actions).is_some_and(|r| r.contains(why)), "{why}: {actions:?}");
        assert_eq!(m.state().version, version);
    }
    // A pending grant of the aggregate: no other epoch until it is confirmed.
    let mut m = mediator(false);
    silent_a(&mut m, 200, 5000).expect("no grant");
    let actions = m.handle(
        ms(5200),
        Event::RaiseEpochs { node: B, aggregates: vec![(AGG, B)], reason: "negotiated switchover".into() },
    );
    assert!(refusal(&actions).is_some_and(|r| r.contains("grant")), "{actions:?}");
    // Lost state: refused until every controller reported; the reply says lost.
    let mut m = Mediator::new(config(false), None).unwrap();
    let actions = m.handle(ms(0), Event::Report(report(A, 1, Some(0))));
    assert!(actions.iter().any(|a| matches!(a, Action::Reply(r) if r.state_lost)), "{actions:?}");
    let actions = m.handle(
        ms(10),
        Event::RaiseEpochs { node: A, aggregates: vec![(AGG, A)], reason: "forced unfence".into() },
    );
    assert!(refusal(&actions).is_some_and(|r| r.contains("lost")), "{actions:?}");
    let actions = m.handle(ms(20), Event::Report(report(B, 1, Some(0))));
    assert!(actions.iter().any(|a| matches!(a, Action::Reply(r) if !r.state_lost)), "{actions:?}");
    let actions = m.handle(
        ms(30),
        Event::RaiseEpochs { node: A, aggregates: vec![(AGG, A)], reason: "forced unfence".into() },
    );
    assert!(replied_epochs(&actions).contains(&(AGG, Epoch { number: 2, owner: A })), "{actions:?}");
}

/// A drop recorded for an aggregate the mediator has no record of makes no record up (no
/// owner-less epoch appears in its state).
#[test]
fn a_drop_of_an_unknown_aggregate_makes_no_record() {
    let mut m = mediator(false);
    let unknown = AggregateId([3; 16]);
    let actions =
        m.handle(ms(0), Event::RecordDrop { node: A, aggregate: unknown, stamp: (1, 1), plex_only: false });
    assert!(actions.iter().any(|a| matches!(a, Action::Reply(_))), "{actions:?}");
    assert!(!m.state().aggregates.contains_key(&unknown));
}

/// `mcctl mediator show`'s AUSO status is armed/disarmed, not "would grant now": with both
/// sites healthy and in sync AUSO towards B is enabled; a drop disables it with the reason.
#[test]
fn auso_status_says_armed_while_both_sites_are_up() {
    let mut m = mediator(false);
    m.handle(ms(0), Event::Report(report(A, 1, Some(0))));
    m.handle(ms(0), Event::Report(report(B, 1, Some(0))));
    let status = m.auso_status(ms(100));
    assert_eq!(status[1], (Site(1), Ok(())), "{status:?}");
    assert!(status[0].1.as_ref().is_err_and(|r| r.contains("owns no aggregate")), "{status:?}");
    m.handle(ms(200), Event::RecordDrop { node: A, aggregate: AGG, stamp: (1, 2), plex_only: false });
    let status = m.auso_status(ms(300));
    assert!(status[1].1.as_ref().is_err_and(|r| r.contains("not recorded in sync")), "{status:?}");
}

/// A live owner is never deposed behind its back: a raise that moves an aggregate away from a
/// node that reports is refused unless that node asks (a negotiated switchover's release, a
/// switchback); once it has been silent for lease + margin, it is allowed (a forced unfence of
/// a node whose partner is gone).
#[test]
fn only_the_owner_gives_an_aggregate_away_while_it_reports() {
    let mut m = mediator(false);
    m.handle(ms(0), Event::Report(report(A, 1, Some(0))));
    m.handle(ms(0), Event::Report(report(B, 1, Some(0))));
    let raise =
        |node, owner| Event::RaiseEpochs { node, aggregates: vec![(AGG, owner)], reason: String::new() };
    // B takes A's aggregate while A reports: refused.
    let actions = m.handle(ms(100), raise(B, B));
    assert!(refusal(&actions).is_some_and(|r| r.contains("only it can give it away")), "{actions:?}");
    // A gives it to B (its release): granted.
    let actions = m.handle(ms(200), raise(A, B));
    assert!(replied_epochs(&actions).contains(&(AGG, Epoch { number: 2, owner: B })), "{actions:?}");
    // A takes it back while B reports: refused; B gives it back: granted.
    m.handle(ms(300), Event::Report(report(B, 2, Some(300))));
    assert!(refusal(&m.handle(ms(400), raise(A, A))).is_some());
    let actions = m.handle(ms(500), raise(B, A));
    assert!(replied_epochs(&actions).contains(&(AGG, Epoch { number: 3, owner: A })), "{actions:?}");
    // A goes silent at the mediator, but B still hears it (their round trips renew A's lease,
    // S6): refused.
    // (A report's partner age is how long before it B last heard A.)
    m.handle(ms(2900), Event::Report(report(B, 3, Some(0))));
    assert!(
        refusal(&m.handle(ms(3000), raise(B, B))).is_some_and(|r| r.contains("only it can give it away"))
    );
    // Neither hears A for lease + margin (2.5 s): B may raise it for itself.
    m.handle(ms(5300), Event::Report(report(B, 4, Some(2400))));
    assert!(refusal(&m.handle(ms(5300), raise(B, B))).is_some(), "B heard A 2.4 s ago");
    m.handle(ms(5500), Event::Report(report(B, 5, Some(2600))));
    let actions = m.handle(ms(5500), raise(B, B));
    assert!(replied_epochs(&actions).contains(&(AGG, Epoch { number: 4, owner: B })), "{actions:?}");
}

/// A heartbeat sent before a drop record and delivered after it is older than the record: it
/// is ignored and the aggregate stays out of sync (the owner's later report decides).
#[test]
fn a_report_older_than_a_drop_record_is_ignored() {
    let mut m = mediator(false);
    m.handle(ms(0), Event::Report(report(A, 1, Some(0))));
    m.handle(ms(0), Event::Report(report(B, 1, Some(0))));
    assert!(m.state().aggregates[&AGG].in_sync());
    // A's heartbeat 2 (still saying in sync) is overtaken by its drop record, stamped 3.
    let actions =
        m.handle(ms(100), Event::RecordDrop { node: A, aggregate: AGG, stamp: (1, 3), plex_only: false });
    assert_eq!(actions.first(), Some(&Action::Persist), "{actions:?}");
    let late = m.handle(ms(150), Event::Report(report(A, 2, Some(150))));
    assert!(!late.iter().any(|a| matches!(a, Action::Reply(_))), "a stale report was answered: {late:?}");
    m.handle(ms(200), Event::Report(report(B, 2, Some(200))));
    assert!(!m.state().aggregates[&AGG].in_sync(), "a report older than the drop made it in sync");
    // The owner's next report decides (here it says in sync again: a resync completed).
    m.handle(ms(300), Event::Report(report(A, 4, Some(300))));
    assert!(m.state().aggregates[&AGG].in_sync());
}

/// S2, S9: a mediator rebuilt with a controller confirmed down, not from its report, may hold
/// epochs below one that controller used: its replies confirm nothing until it reports.
#[test]
fn a_rebuild_by_confirmation_confirms_no_epoch_until_the_node_reports() {
    let mut m = Mediator::new(config(false), None).unwrap();
    m.handle(ms(0), Event::Report(report(B, 1, Some(0))));
    m.handle(ms(10), Event::ConfirmDown { nodes: vec![A] });
    assert!(!m.is_lost());
    let actions = m.handle(ms(20), Event::Report(report(B, 2, Some(20))));
    assert!(actions.iter().any(|a| matches!(a, Action::Reply(r) if r.state_lost)), "{actions:?}");
    let actions = m.handle(ms(30), Event::Report(report(A, 1, Some(30))));
    assert!(actions.iter().any(|a| matches!(a, Action::Reply(r) if !r.state_lost)), "{actions:?}");
}

/// S7 (found by the model check with S14 broken): while the survivor has not confirmed its
/// grant, no second grant moves the same aggregates, or the first survivor, re-sent its grant,
/// would apply an epoch below the one issued since and serve beside the second.
#[test]
fn a_grant_not_yet_confirmed_blocks_a_second_grant_of_its_aggregates() {
    let mut m = mediator(false);
    assert!(silent_a(&mut m, 200, 5000).is_some(), "no AUSO for a lost site");
    // B never confirms and goes silent; A is back, healthy as far as its report goes.
    let mut a = report(A, 2, None);
    a.owned.clear();
    m.handle(ms(5600), Event::Report(a));
    let refused = m.handle(ms(5600), Event::ManualSwitchover { node: A, override_in_sync: true });
    assert!(grants(&refused).is_empty(), "{refused:?}");
    assert!(refusal(&refused).unwrap().contains("not confirmed"), "{refused:?}");
    // Once B confirmed, the grant is no longer in flight: the usual rules decide.
    m.handle(ms(5600), Event::ConfirmGrant { node: B });
    let second = m.handle(ms(5600), Event::ManualSwitchover { node: A, override_in_sync: true });
    assert!(refusal(&second).is_none_or(|r| !r.contains("not confirmed")), "{second:?}");
}

/// S14 (found by the model check): A went down, its aggregate was switched over to B, then B
/// went down too. A's latest report predates the switchover and still claims the aggregate at
/// its old epoch: a forced switchover to A is refused until A reports having learned it (then
/// it waits for heal and switchback, and is refused for that).
#[test]
fn a_site_switched_over_is_no_target_even_on_a_report_from_before() {
    let mut m = mediator(false);
    assert!(silent_a(&mut m, 200, 5000).is_some(), "no AUSO for a lost site");
    m.handle(ms(2600), Event::ConfirmGrant { node: B });
    // B goes silent; A's latest report is still the one of 0 ms, owning AGG at 1@A.
    let refused = m.handle(ms(6000), Event::ManualSwitchover { node: A, override_in_sync: true });
    assert!(grants(&refused).is_empty(), "{refused:?}");
    assert!(refusal(&refused).unwrap().contains("S14"), "{refused:?}");
    // A restarts and learns: it waits for switchback.
    let mut a = report(A, 2, None);
    a.owned.clear();
    (a.mode, a.fenced) = (Mode::WaitingForSwitchback, true);
    m.handle(ms(6000), Event::Report(a));
    let refused = m.handle(ms(6000), Event::ManualSwitchover { node: A, override_in_sync: true });
    assert!(refusal(&refused).unwrap().contains("waits for heal and switchback"), "{refused:?}");
}

/// The mirror's intactness in `actions`' reply (S8).
fn replied_intact(actions: &[Action]) -> Option<bool> {
    actions.iter().find_map(|a| match a {
        Action::Reply(r) => Some(r.mirror_intact.contains(&AGG)),
        _ => None,
    })
}

/// S8: the mirror is intact once the record is in sync; a drop of the NVLog mirror ends that
/// until owner and receiver both say in sync again, whatever the reports in between say (an
/// owner that lost its NVLog and restarted reports nothing of the aggregate, then out of sync);
/// a plex drop leaves it intact. Every reply names it.
#[test]
fn only_a_mirror_drop_ends_an_intact_mirror_until_in_sync_again() {
    let mut m = mediator(false);
    assert_eq!(replied_intact(&m.handle(ms(0), Event::Report(report(A, 1, Some(0))))), Some(false));
    assert_eq!(replied_intact(&m.handle(ms(0), Event::Report(report(B, 1, Some(0))))), Some(true));
    // A plex drop: out of sync (AUSO off), the NVLog copy at B still complete.
    let plex = Event::RecordDrop { node: A, aggregate: AGG, stamp: (1, 2), plex_only: true };
    assert_eq!(replied_intact(&m.handle(ms(100), plex)), Some(true));
    assert!(!m.state().aggregates[&AGG].in_sync());
    // A drop of the NVLog mirror.
    let mirror = Event::RecordDrop { node: A, aggregate: AGG, stamp: (1, 3), plex_only: false };
    assert_eq!(replied_intact(&m.handle(ms(200), mirror)), Some(false));
    // A restarts (a new log generation) without its partition: its reports name no aggregate
    // until it decided, then out of sync; B still says in sync. Not intact.
    let mut restarted = report(A, 1, Some(300));
    restarted.log_generation = 2;
    restarted.owned.clear();
    assert_eq!(replied_intact(&m.handle(ms(300), Event::Report(restarted.clone()))), Some(false));
    assert_eq!(replied_intact(&m.handle(ms(300), Event::Report(report(B, 2, Some(300))))), Some(false));
    restarted.sequence = 2;
    restarted.owned = report(A, 0, None).owned;
    restarted.owned[0].mirror = MirrorState::Resyncing;
    assert_eq!(replied_intact(&m.handle(ms(400), Event::Report(restarted.clone()))), Some(false));
    // The resync done, both in sync: intact again.
    restarted.sequence = 3;
    restarted.owned[0].mirror = MirrorState::InSync;
    assert_eq!(replied_intact(&m.handle(ms(500), Event::Report(restarted))), Some(true));
    // A new epoch (a negotiated switchover to B) ends it too: B's mirror to A was never in sync.
    let raise = Event::RaiseEpochs { node: A, aggregates: vec![(AGG, B)], reason: String::new() };
    assert_eq!(replied_intact(&m.handle(ms(600), raise)), Some(false));
}

/// S8, rule 5: a mediator that lost its state vouches for no mirror until owner and receiver
/// report in sync again (a drop it had recorded is forgotten with the state).
#[test]
fn a_lost_state_vouches_for_no_mirror() {
    let mut m = Mediator::new(config(false), None).unwrap();
    assert_eq!(replied_intact(&m.handle(ms(0), Event::Report(report(B, 1, Some(0))))), Some(false));
    let mut restarted = report(A, 1, Some(0));
    restarted.owned.clear();
    assert_eq!(replied_intact(&m.handle(ms(0), Event::Report(restarted))), Some(false));
    // The owner says in sync; the receiver's word came before the mediator knew the aggregate.
    assert_eq!(replied_intact(&m.handle(ms(100), Event::Report(report(A, 2, Some(100))))), Some(false));
    assert_eq!(replied_intact(&m.handle(ms(100), Event::Report(report(B, 2, Some(100))))), Some(true));
}

fn state_lost(actions: &[Action]) -> Option<bool> {
    actions.iter().find_map(|a| match a {
        Action::Reply(r) => Some(r.state_lost),
        _ => None,
    })
}

/// Rule 5 after a restart (finding 8 of docs/safety.md): a mediator over the state file it read
/// back cannot tell it from an older copy restored over it, so it rebuilds: its replies confirm
/// no epoch until every controller has reported, it grants nothing meanwhile, and nothing is in
/// sync until the owner and the receiver report again. The epochs and a mirror's being intact
/// are kept; a report of a newer state version during the rebuild clears the records too.
#[test]
fn a_restarted_mediator_rebuilds_whatever_file_it_read() {
    let mut m = mediator(false);
    m.handle(ms(0), Event::Report(report(A, 1, Some(0))));
    m.handle(ms(0), Event::Report(report(B, 1, Some(0))));
    assert!(m.state().aggregates[&AGG].in_sync() && m.state().aggregates[&AGG].mirror_intact);
    let file = m.state().clone();

    let mut m = Mediator::restart(config(false), file.clone()).unwrap();
    assert!(m.is_lost());
    assert!(!m.state().aggregates[&AGG].in_sync(), "the file's in-sync record was trusted");
    assert!(m.state().aggregates[&AGG].mirror_intact);
    // A is silent (down); B reports for longer than lease + margin: no grant, no confirmation.
    for (seq, at) in (2..).zip((0..=4000).step_by(200)) {
        let actions = m.handle(ms(at), Event::Report(report(B, seq, Some(at + 3000))));
        assert!(grants(&actions).is_empty(), "granted at {at} ms while rebuilding");
        assert_eq!(state_lost(&actions), Some(true), "a reply at {at} ms could confirm an epoch");
    }
    // A reports: rebuilt, and in sync again on both words.
    let a = m.handle(ms(4200), Event::Report(report(A, 2, Some(0))));
    assert_eq!(state_lost(&a), Some(false), "{a:?}");
    let b = m.handle(ms(4200), Event::Report(report(B, 100, Some(0))));
    assert_eq!(replied_intact(&b), Some(true));
    assert!(m.state().aggregates[&AGG].in_sync());

    // Restarted over the same file again, and A saw a version the file lacks (it recorded a
    // drop after the copy was made). B reports first, for long: whatever the counter reached
    // meanwhile, A's version still shows a history the file lacks, and the mirror is no longer
    // vouched for (review of finding 8's fix: the running counter had overtaken it).
    let mut m = Mediator::restart(config(false), file.clone()).unwrap();
    for seq in 200..260 {
        let mut b = report(B, seq, Some(0));
        b.state_version = m.state().version;
        m.handle(ms(0), Event::Report(b));
    }
    assert!(m.state().aggregates[&AGG].mirror_intact, "a version this process issued cleared the records");
    let mut a = report(A, 300, Some(0));
    a.owned.clear();
    a.state_version = file.version + 5;
    m.handle(ms(0), Event::Report(a));
    assert!(!m.state().aggregates[&AGG].mirror_intact, "a mirror intact in an older state was kept");
}

/// Bad input: a controller reporting the highest state version neither panics the mediator nor
/// wraps its version to 0 (which would read every later report as from a newer state).
#[test]
fn a_reported_state_version_at_the_top_does_not_wrap() {
    let mut m = mediator(false);
    let mut a = report(A, 1, Some(0));
    a.state_version = u64::MAX;
    m.handle(ms(0), Event::Report(a));
    m.handle(ms(100), Event::Report(report(B, 1, Some(0))));
    m.handle(ms(200), Event::Report(report(A, 2, Some(0))));
    assert_eq!(m.state().version, u64::MAX);
}
