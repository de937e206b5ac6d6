//! The controllers with a real `mc-mediator` (DESIGN §10; S3, S6, S7): automatic switchover of
//! a lost site, no switchover when only the inter-site link is lost, and the self-fence of an
//! isolated site before the survivor takes over. Scaled timers: keepalive 200 ms / 1.5 s,
//! margin 1 s, heartbeat 200 ms, lease 2 s, mirror_timeout and AUSO window 5 s.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;
mod host;
mod mediator_support;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Cluster, Settings};
use host::Workload;
use mc_tests::proxy::{FaultProxy, Mode};
use mediator_support::{start_mediator, wait_mediator_in_sync};

const VOLUME_BYTES: u64 = 16 << 20;
const BLOCKS: u64 = 256;

fn settings(mediator: [String; 2]) -> Settings {
    Settings { cp_interval_ms: 60_000, mediator: Some(mediator), ..Settings::default() }
}

/// A mediator under `temp`, and a cluster (A, B) that uses it, in sync and recorded so at the
/// mediator.
async fn up_in_sync(temp: &std::path::Path) -> (mediator_support::MediatorProc, Cluster) {
    let mediator = start_mediator(&temp.join("mediator"));
    let address = mediator.address.clone();
    let cluster = Cluster::up(&settings([address.clone(), address]), VOLUME_BYTES).await;
    cluster.wait_in_sync().await;
    wait_mediator_in_sync(&mediator.address).await;
    (mediator, cluster)
}

/// Site A is lost (kill -9) under a workload: B switches over by itself once A's lease has
/// lapsed (the mediator's grant, DESIGN §10 rule 2), serves every write A acknowledged, and
/// NVFAILs nothing (the mediator recorded the aggregate in sync). The time is measured, not
/// asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_site_is_switched_over_automatically() {
    let temp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (mediator, mut cluster) = up_in_sync(temp.path()).await;
    let load = Workload::start(&cluster.nbd_address(0), "vol_a", BLOCKS);
    load.wait_count(300);
    cluster.kill(0);
    let killed = Instant::now();
    assert!(load.wait_ended(Duration::from_secs(10)));
    let ledger = load.stop();
    let b = cluster.wait_status(1, "B in switchover", |s| s.mode == "switchover").await;
    eprintln!("automatic switchover {:?} after the kill", killed.elapsed());
    assert!(!b.aggregates.iter().any(|a| a.volumes.iter().any(|v| v.in_nvfailed_state)), "{b:#?}");
    host::check_acknowledged(&cluster.nbd_address(1), &ledger);
    // The operator's view of it.
    let out = Command::new(env!("CARGO_BIN_EXE_mcctl"))
        .args([
            "mediator",
            "show",
            "--mediator",
            &mediator.address,
            "--cluster-id",
            "00112233445566778899aabbccddeeff",
        ])
        .args(["-o", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let view: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(view["diagnosis"].as_str().unwrap().contains("site A lost"), "{view:#}");
    assert!(view["last_decision"].as_str().unwrap().contains("automatic switchover of site A"), "{view:#}");
}

/// The inter-site link is cut while both sites reach the mediator: never a switchover (rule 3);
/// A drops B's mirror only once the mediator recorded it (S3) and goes on serving its own
/// aggregate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_link_with_both_sites_at_the_mediator_never_switches() {
    let temp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mediator = start_mediator(&temp.path().join("mediator"));
    let address = mediator.address.clone();
    let mut cluster = Cluster::with_links(&settings([address.clone(), address])).await;
    cluster.start(0);
    cluster.start(1);
    cluster.wait_state(0, "serving").await;
    cluster.create_volume(0, VOLUME_BYTES).await;
    cluster.wait_in_sync().await;
    let load = Workload::start(&cluster.nbd_address(0), "vol_a", BLOCKS);
    load.wait_count(100);
    for link in 0..2 {
        cluster.link(link).set_both(Mode::Blackhole);
    }
    let before = load.count();
    // Past mirror_timeout, lease + margin and the AUSO window.
    let until = Instant::now() + Duration::from_secs(9);
    while Instant::now() < until {
        assert_eq!(cluster.status(1).await.mode, "normal", "B switched over with A reaching the mediator");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(load.count() > before + 50, "A stopped serving: {:?}", load.ledger.lock().unwrap());
    let a = cluster.status(0).await;
    assert_eq!(a.node_state, "serving", "{a:#?}");
    // The mediator tells it apart (rule 7) and holds the aggregate out of sync: AUSO disabled.
    let view = mediator.show().await;
    assert!(view.diagnosis.contains("inter-site link lost"), "{view:#?}");
    assert!(view.aggregates.iter().all(|a| !a.in_sync), "{view:#?}");
    let auso_b = view.auso.iter().find(|a| a.site == "B").unwrap();
    assert!(!auso_b.enabled, "{view:#?}");
    // The link comes back: resync, then both reports make it in sync and AUSO is armed again.
    for link in 0..2 {
        cluster.link(link).set_both(Mode::Pass);
    }
    wait_mediator_in_sync(&mediator.address).await;
    let view = mediator.show().await;
    assert!(view.auso.iter().any(|a| a.site == "B" && a.enabled), "{view:#?}");
    let ledger = load.stop();
    host::check_acknowledged(&cluster.nbd_address(0), &ledger);
    cluster.kill(1);
    cluster.kill(0);
}

/// Site A is isolated from B and from the mediator: it fences itself within its lease (its
/// writes fail), and B takes over only after that: A's last acknowledgement comes before B
/// serves vol_a (never two writers, S6).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_site_fences_itself_before_the_survivor_takes_over() {
    let temp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mediator = start_mediator(&temp.path().join("mediator"));
    let a_to_mediator = FaultProxy::start(mediator.address.parse().unwrap()).await.unwrap();
    let mut cluster =
        Cluster::with_links(&settings([a_to_mediator.address().to_string(), mediator.address.clone()])).await;
    cluster.start(0);
    cluster.start(1);
    cluster.wait_state(0, "serving").await;
    cluster.create_volume(0, VOLUME_BYTES).await;
    cluster.wait_in_sync().await;
    wait_mediator_in_sync(&mediator.address).await;
    let load = Workload::start(&cluster.nbd_address(0), "vol_a", BLOCKS);
    load.wait_count(200);
    for link in 0..2 {
        cluster.link(link).set_both(Mode::Blackhole);
    }
    a_to_mediator.set_both(Mode::Blackhole);
    let isolated = Instant::now();
    assert!(load.wait_ended(Duration::from_secs(20)), "A went on acknowledging while isolated");
    let a_stopped = Instant::now();
    let ledger = load.stop();
    cluster.wait_status(1, "B in switchover", |s| s.mode == "switchover").await;
    let b_took_over = Instant::now();
    eprintln!(
        "A's writes failed {:?} after the isolation; B switched over {:?} after it",
        a_stopped - isolated,
        b_took_over - isolated
    );
    assert!(a_stopped < b_took_over);
    let a = cluster.status(0).await;
    assert_ne!(a.node_state, "serving", "{a:#?}");
    host::check_acknowledged(&cluster.nbd_address(1), &ledger);
    // B acknowledges a write of vol_a; the acknowledgement intervals of A and B, as each logs
    // them with the machine's monotonic clock, never overlap.
    let mut at_b = host::Host::connect(&cluster.nbd_address(1), "vol_a").unwrap();
    at_b.write(0, &host::pattern(0, 1_000_000)).unwrap();
    at_b.close();
    let a_last = ack_stamps(&cluster.log(0), "last acknowledgement");
    assert!(!a_last.is_empty(), "A logged no last acknowledgement:\n{}", cluster.log(0));
    let (aggregate, a_last) = a_last.last().cloned().unwrap();
    // The log reaches the test through a pipe: give it a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    let b_first = loop {
        let first = ack_stamps(&cluster.log(1), "first acknowledgement");
        if let Some((_, t)) = first.iter().find(|(a, _)| *a == aggregate) {
            break *t;
        }
        assert!(Instant::now() < deadline, "B logged no first acknowledgement of {aggregate}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("A's last acknowledgement {a_last} ns, B's first {b_first} ns (CLOCK_MONOTONIC)");
    assert!(
        a_last < b_first,
        "the acknowledgement intervals overlap: A's last {a_last}, B's first {b_first}"
    );
    cluster.kill(0);
}

/// `(aggregate, mono_ns)` of every log line with `what` ("first acknowledgement" or "last
/// acknowledgement").
fn ack_stamps(log: &str, what: &str) -> Vec<(String, u64)> {
    let field = |line: &str, name: &str| {
        line.split_whitespace()
            .find_map(|word| word.strip_prefix(name).map(|v| v.trim_matches('"').to_string()))
    };
    log.lines()
        .map(strip_ansi)
        .filter(|line| line.contains(what))
        .filter_map(|line| {
            let aggregate = field(&line, "aggregate=")?;
            let mono = field(&line, "mono_ns=")?.parse().ok()?;
            Some((aggregate, mono))
        })
        .collect()
}

/// `line` without its terminal colour sequences (`ESC [ ... m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// S2 at start-up with a mediator: A, switched over while it was down, restarts with the
/// inter-site link cut. The mediator's higher epochs tell it it was deposed: it waits for
/// switchback (fenced, its disks served) without its DR partner's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarting_controller_learns_from_the_mediator_that_it_was_deposed() {
    let temp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mediator = start_mediator(&temp.path().join("mediator"));
    let address = mediator.address.clone();
    let mut cluster = Cluster::with_links(&settings([address.clone(), address])).await;
    cluster.start(0);
    cluster.start(1);
    cluster.wait_state(0, "serving").await;
    cluster.create_volume(0, VOLUME_BYTES).await;
    cluster.wait_in_sync().await;
    wait_mediator_in_sync(&mediator.address).await;
    cluster.kill(0);
    cluster.wait_status(1, "B in switchover", |s| s.mode == "switchover").await;
    for link in 0..2 {
        cluster.link(link).set_both(Mode::Blackhole);
    }
    cluster.start(0);
    let a = cluster.wait_status(0, "A waiting for switchback", |s| s.mode == "waiting-for-switchback").await;
    assert_ne!(a.node_state, "serving", "{a:#?}");
    assert!(cluster.log(0).contains("the mediator holds higher epochs"), "{}", cluster.log(0));
    cluster.kill(0);
    cluster.kill(1);
}

/// S2 at start-up with a mediator: A restarts while its DR partner is down. The mediator
/// confirms A's epoch; after mirror_timeout without the partner A recovers on that
/// confirmation and serves every write it acknowledged before (the mirror and plex 1 dropped
/// through the mediator, S3). Without a mediator it would wait for the partner (or an
/// operator's forced unfence with NVFAIL). Only with `power` durability: in `process`
/// durability a power loss may have cut the NVLog's tail silently, and only the partner's copy
/// brings it back (S8).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarting_controller_serves_on_the_mediators_confirmation_without_its_partner() {
    let temp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mediator = start_mediator(&temp.path().join("mediator"));
    let address = mediator.address.clone();
    let settings = Settings { durability: "power", ..settings([address.clone(), address]) };
    let mut cluster = Cluster::up(&settings, VOLUME_BYTES).await;
    cluster.wait_in_sync().await;
    wait_mediator_in_sync(&mediator.address).await;
    let load = Workload::start(&cluster.nbd_address(0), "vol_a", BLOCKS);
    load.wait_count(200);
    let ledger = load.stop();
    cluster.kill(1);
    // A restarts while B is down.
    cluster.kill(0);
    let restarted = Instant::now();
    cluster.start(0);
    let a = cluster.wait_status(0, "A serving", |s| s.node_state == "serving").await;
    eprintln!("A served {:?} after its restart, B down", restarted.elapsed());
    assert!(
        restarted.elapsed() >= Duration::from_secs(5),
        "A served before mirror_timeout without its partner's handshake: {a:#?}"
    );
    assert!(cluster.log(0).contains("recovering on the mediator's confirmation"), "{}", cluster.log(0));
    host::check_acknowledged(&cluster.nbd_address(0), &ledger);
    // And it acknowledges new writes (alone: the mirror's drop is recorded at the mediator).
    let load = Workload::start(&cluster.nbd_address(0), "vol_a", BLOCKS);
    load.wait_count(20);
    let ledger = load.stop();
    host::check_acknowledged(&cluster.nbd_address(0), &ledger);
    cluster.kill(0);
}

/// A deposed owner whose link to B heals while its mediator link stays down does not come
/// back (S2, S6): its lease lapsed while isolated, B took over by the mediator's grant, and
/// B's answers carry the higher epoch, so the partner's round trips confirm nothing. A host
/// still connected to A gets no reads from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_owner_whose_link_heals_without_the_mediator_does_not_come_back() {
    let temp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mediator = start_mediator(&temp.path().join("mediator"));
    let a_to_mediator = FaultProxy::start(mediator.address.parse().unwrap()).await.unwrap();
    let mut cluster =
        Cluster::with_links(&settings([a_to_mediator.address().to_string(), mediator.address.clone()])).await;
    cluster.start(0);
    cluster.start(1);
    cluster.wait_state(0, "serving").await;
    cluster.create_volume(0, VOLUME_BYTES).await;
    cluster.wait_in_sync().await;
    wait_mediator_in_sync(&mediator.address).await;
    let mut connected = host::Host::connect(&cluster.nbd_address(0), "vol_a").unwrap();
    connected.read(0, 4096).unwrap();
    for link in 0..2 {
        cluster.link(link).set_both(Mode::Blackhole);
    }
    a_to_mediator.set_both(Mode::Blackhole);
    cluster.wait_status(1, "B in switchover", |s| s.mode == "switchover").await;
    // The inter-site link heals; A's mediator link does not.
    for link in 0..2 {
        cluster.link(link).set_both(Mode::Pass);
    }
    let a = cluster
        .wait_status(0, "A deposed of its aggregate", |s| {
            s.mode == "waiting-for-switchback" || !s.unavailable.is_empty()
        })
        .await;
    eprintln!("A after the link healed: {} ({}), {:?}", a.node_state, a.state_reason, a.unavailable);
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let a = cluster.status(0).await;
        assert!(
            a.node_state != "serving" || !a.unavailable.is_empty(),
            "A serves its aggregate again: {a:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(connected.read(0, 4096).is_err(), "a host still connected to A read from it");
    assert!(!cluster.log(0).contains("the DR partner confirmed this node's epochs"), "{}", cluster.log(0));
    cluster.kill(0);
    cluster.kill(1);
}

/// S2's fallback: with the mediator unreachable from both sites, a cut of the inter-site link
/// fences both (no round trip with anyone for the lease, S6). When the link comes back the DR
/// partner's round trip confirms each one's epochs (no higher epoch anywhere) and both serve
/// again, the mediator still down; every acknowledged write is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_mediator_down_the_dr_partner_confirms_a_lapsed_lease() {
    let temp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mediator = start_mediator(&temp.path().join("mediator"));
    let to_mediator = [
        FaultProxy::start(mediator.address.parse().unwrap()).await.unwrap(),
        FaultProxy::start(mediator.address.parse().unwrap()).await.unwrap(),
    ];
    let mut cluster = Cluster::with_links(&settings([
        to_mediator[0].address().to_string(),
        to_mediator[1].address().to_string(),
    ]))
    .await;
    cluster.start(0);
    cluster.start(1);
    cluster.wait_state(0, "serving").await;
    cluster.create_volume(0, VOLUME_BYTES).await;
    cluster.wait_in_sync().await;
    wait_mediator_in_sync(&mediator.address).await;
    for proxy in &to_mediator {
        proxy.set_both(Mode::Blackhole);
    }
    let load = Workload::start(&cluster.nbd_address(0), "vol_a", BLOCKS);
    load.wait_count(100);
    for link in 0..2 {
        cluster.link(link).set_both(Mode::Blackhole);
    }
    assert!(load.wait_ended(Duration::from_secs(20)), "A went on acknowledging alone");
    let ledger = load.stop();
    cluster.wait_status(0, "A self-fenced", |s| s.node_state == "fenced").await;
    for link in 0..2 {
        cluster.link(link).set_both(Mode::Pass);
    }
    let healed = Instant::now();
    cluster.wait_status(0, "A serving again", |s| s.node_state == "serving").await;
    eprintln!("A confirmed by its partner {:?} after the link healed", healed.elapsed());
    assert!(cluster.log(0).contains("the DR partner confirmed this node's epochs"), "{}", cluster.log(0));
    assert_eq!(cluster.status(1).await.mode, "normal");
    host::check_acknowledged(&cluster.nbd_address(0), &ledger);
    cluster.kill(0);
    cluster.kill(1);
}

/// `mirror pause` drops plex 1 of aggr_a through the drop path: the mediator records it (S3)
/// and holds the aggregate out of sync, so AUSO of site A is disabled, with the reason; after
/// `mirror resume` and the resync, both reports make it in sync again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_mirror_is_recorded_at_the_mediator_and_disables_auso() {
    let temp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (mediator, mut cluster) = up_in_sync(temp.path()).await;
    let control = |action: &str| mc_proto::v1::MirrorControlRequest {
        cluster_id: common::CLUSTER.to_vec(),
        name: "vol_a".into(),
        action: action.into(),
    };
    let mut admin = cluster.admin(0).await;
    admin.mirror_control(control("pause")).await.unwrap();
    let view = mediator.show().await;
    assert!(view.aggregates.iter().all(|a| !a.in_sync), "the pause left the aggregate in sync: {view:#?}");
    let auso_b = view.auso.iter().find(|a| a.site == "B").unwrap();
    assert!(!auso_b.enabled && auso_b.reason.contains("sync"), "{view:#?}");
    admin.mirror_control(control("resume")).await.unwrap();
    wait_mediator_in_sync(&mediator.address).await;
    cluster.kill(0);
    cluster.kill(1);
}

/// B loses its NVLog file and restarts within mirror_timeout (S13): it rejoins as `resyncing`,
/// A's mirror is not in sync until a CP covers what B lost, and the mediator holds A's
/// aggregate out of sync until then. A lost now is not switched over automatically: B lacks
/// records A acknowledged (they are on no plex yet).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_lost_its_nvlog_disables_auso_until_the_covering_cp() {
    let temp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (mediator, mut cluster) = up_in_sync(temp.path()).await;
    let load = Workload::start(&cluster.nbd_address(0), "vol_a", BLOCKS);
    load.wait_count(200);
    cluster.kill(1);
    std::fs::remove_file(cluster.nodes[1].nvlog()).unwrap();
    cluster.start(1);
    cluster.wait_state(1, "serving").await;
    load.wait_count(load.count() + 50);
    let ledger = load.stop();
    // The mediator's record: not in sync (the owner says resyncing).
    let view = mediator.show().await;
    assert!(view.aggregates.iter().all(|a| !a.in_sync), "in sync while B lacks records: {view:#?}");
    cluster.kill(0);
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        assert_eq!(cluster.status(1).await.mode, "normal", "B switched over without A's records");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let view = mediator.show().await;
    let auso_b = view.auso.iter().find(|a| a.site == "B").unwrap();
    assert!(auso_b.reason.contains("not recorded in sync"), "{view:#?}");
    // An operator may still force it: with NVFAIL, since the mediator's record says so.
    let mut admin = cluster.admin(1).await;
    let request = mc_proto::v1::SwitchoverRequest {
        cluster_id: common::CLUSTER.to_vec(),
        forced_on_disaster: true,
        simulate: false,
        override_vetoes: true,
        force_nvfail_all: false,
        confirmed: true,
    };
    let reply = admin.switchover(request).await.unwrap().into_inner();
    assert!(reply.nvfailed_volumes.contains(&"vol_a".to_string()), "{reply:#?}");
    drop(ledger);
    cluster.kill(1);
}

/// While the mediator answers it alone raises epochs (DESIGN §10): the planned cycle with a
/// mediator (negotiated switchover, heal, switchback) takes its epochs from it, each step's
/// epoch above the last, and loses no acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_planned_cycle_takes_its_epochs_from_the_mediator() {
    let temp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (mediator, cluster) = up_in_sync(temp.path()).await;
    let load = Workload::start(&cluster.nbd_address(0), "vol_a", BLOCKS);
    load.wait_count(100);
    let request = |forced: bool| mc_proto::v1::SwitchoverRequest {
        cluster_id: common::CLUSTER.to_vec(),
        forced_on_disaster: forced,
        simulate: false,
        override_vetoes: false,
        force_nvfail_all: false,
        confirmed: false,
    };
    let mut b = cluster.admin(1).await;
    b.switchover(request(false)).await.unwrap();
    assert!(load.wait_ended(Duration::from_secs(30)));
    let ledger = load.stop();
    let view = mediator.show().await;
    assert!(view.last_decision.contains("raised for node 2 (negotiated switchover"), "{view:#?}");
    let at_mediator = view.aggregates[0].epoch.unwrap();
    let at_b = cluster.status(1).await;
    let served = at_b.aggregates.iter().find(|a| a.switched_over).unwrap().epoch.unwrap();
    assert_eq!((served.number, served.owner_node), (at_mediator.number, 2), "{view:#?}\n{at_b:#?}");
    host::check_acknowledged(&cluster.nbd_address(1), &ledger);
    // Heal, then switch back: the epoch goes back to A, above B's.
    b.heal(mc_proto::v1::HealRequest { cluster_id: common::CLUSTER.to_vec() }).await.unwrap();
    cluster
        .wait_status(1, "aggr_a resynced after heal", |s| {
            s.aggregates.iter().any(|a| a.switched_over && a.state == "mirrored,normal")
        })
        .await;
    b.switchback(mc_proto::v1::SwitchbackRequest { cluster_id: common::CLUSTER.to_vec(), simulate: false })
        .await
        .unwrap();
    let view = mediator.show().await;
    assert!(view.last_decision.contains("raised for node 1 (switchback"), "{view:#?}");
    let back = view.aggregates[0].epoch.unwrap();
    assert!(back.number > served.number && back.owner_node == 1, "{view:#?}");
    cluster
        .wait_status(0, "A serving vol_a again", |s| s.mode == "normal" && s.node_state == "serving")
        .await;
    host::check_acknowledged(&cluster.nbd_address(0), &ledger);
}

/// DESIGN §10 rule 5, a restored snapshot: the mediator restarted from an older copy of its
/// state file. B reports a higher state version than the file holds, so the mediator treats its
/// state as lost: with A gone (it never reports again), it grants nothing, though the old copy
/// holds A's aggregate in sync; `mediator show` says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mediator_restored_from_an_older_state_grants_nothing() {
    let temp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (mut mediator, mut cluster) = up_in_sync(temp.path()).await;
    let old = mediator.state_file();
    // Every heartbeat moves the state version on.
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.kill(0);
    mediator.restart_from(&old);
    let restarted = Instant::now();
    let until = restarted + Duration::from_secs(8);
    while Instant::now() < until {
        assert_eq!(
            cluster.status(1).await.mode,
            "normal",
            "a mediator restored from an old state granted AUSO"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let view = mediator.show().await;
    assert!(view.state_lost, "{view:#?}");
    let auso_b = view.auso.iter().find(|a| a.site == "B").unwrap();
    assert!(auso_b.reason.contains("state was lost"), "{view:#?}");
    // The operator confirms A down (`mcctl mediator confirm-down`, with --confirm only): the
    // state is rebuilt, and A's aggregate is still not in sync (its owner never reported since).
    let mcctl = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_mcctl"))
            .args(["mediator", "confirm-down", "--node", "1", "--mediator", &mediator.address])
            .args(["--cluster-id", "00112233445566778899aabbccddeeff", "-o", "json"])
            .args(extra)
            .output()
            .unwrap()
    };
    assert_eq!(mcctl(&[]).status.code(), Some(2), "confirm-down ran without --confirm");
    let out = mcctl(&["--confirm"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["state_lost"], false, "{reply:#}");
    let view = mediator.show().await;
    assert!(!view.state_lost && view.aggregates.iter().all(|a| !a.in_sync), "{view:#?}");
    assert_eq!(cluster.status(1).await.mode, "normal");
    cluster.kill(1);
}

/// Finding 8 of docs/safety.md (S2, §10 rule 5): A is lost and B takes X over automatically;
/// then B is lost too, and the mediator comes back over an older copy of its state, from before
/// the switchover; A restarts. Only B could show that copy is old, and B is down: the restarted
/// mediator must not confirm A's epoch (it rebuilds whatever file it read), so A stays fenced
/// instead of serving without what B acknowledged. The mediator's view says its state is lost.
/// With `power` durability, where a restarting node recovers on the mediator's confirmation
/// without its partner (in `process` durability it waits for the partner's copy anyway, S8).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mediator_restored_from_before_a_switchover_does_not_confirm_the_old_owner() {
    let temp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut mediator = start_mediator(&temp.path().join("mediator"));
    let address = mediator.address.clone();
    let settings = Settings { durability: "power", ..settings([address.clone(), address]) };
    let mut cluster = Cluster::up(&settings, VOLUME_BYTES).await;
    cluster.wait_in_sync().await;
    wait_mediator_in_sync(&mediator.address).await;
    let old = mediator.state_file();
    cluster.kill(0);
    cluster.wait_status(1, "B in switchover", |s| s.mode == "switchover" && s.node_state == "serving").await;
    cluster.kill(1);
    mediator.restart_from(&old);
    cluster.start(0);
    let started = Instant::now();
    // Longer than mirror_timeout, after which a confirmed A recovers without its partner.
    while started.elapsed() < Duration::from_secs(12) {
        let a = cluster.status(0).await;
        assert_ne!(a.node_state, "serving", "A served on a confirmation from an old mediator state: {a:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let view = mediator.show().await;
    assert!(view.state_lost, "{view:#?}");
    cluster.kill(0);
}

/// A higher epoch naming the node itself (a raise it asked for and never used: a forced
/// unfence or release whose answer was lost) never deposes it: only it writes with that epoch.
/// Here the raise is asked in A's name directly; A goes on serving and acknowledging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_higher_epoch_naming_the_node_itself_does_not_depose_it() {
    let temp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (mediator, cluster) = up_in_sync(temp.path()).await;
    let aggregate = cluster.status(0).await.aggregates[0].uuid.clone();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", mediator.address))
        .unwrap()
        .connect_lazy();
    let mut client = mc_proto::v1::mediator_client::MediatorClient::new(channel);
    let request = mc_proto::v1::RaiseEpochsRequest {
        identity: Some(mc_proto::v1::Identity {
            cluster_id: common::CLUSTER.to_vec(),
            sender_node: 1,
            receiver_node: 0,
        }),
        aggregates: vec![mc_proto::v1::RaiseEpoch { aggregate_uuid: aggregate, owner: 1 }],
        reason: "a test: a raise whose answer was lost".into(),
    };
    let reply = client.raise_epochs(request).await.unwrap().into_inner();
    assert!(
        reply.epochs.iter().any(|e| e.epoch.is_some_and(|e| e.number == 2 && e.owner_node == 1)),
        "{reply:?}"
    );
    let load = Workload::start(&cluster.nbd_address(0), "vol_a", BLOCKS);
    load.wait_count(50);
    // Past several heartbeat replies carrying epoch 2@node1.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = load.count();
    load.wait_count(before + 50);
    let a = cluster.status(0).await;
    assert!(a.unavailable.is_empty() && a.node_state == "serving", "{a:#?}");
    let ledger = load.stop();
    host::check_acknowledged(&cluster.nbd_address(0), &ledger);
}

/// Forty acknowledged writes at A (blocks 0 to 19, twice), in the returned model.
async fn write_forty_blocks(cluster: &Cluster) -> common::Model {
    let mut data = cluster.data(0).await;
    let mut model = common::Model::default();
    for n in 1..=40u64 {
        let block = n % 20;
        model.sent(block, n);
        common::write_at(&mut data, block * common::BLOCK, common::block_data(block, n)).await.unwrap();
        model.acked(block, n);
    }
    model
}

/// A serves again, no volume NVFAILed, and every write of `model` reads back.
async fn served_without_nvfail(cluster: &Cluster, model: &common::Model) {
    let a = cluster.wait_state(0, "serving").await;
    assert!(!a.aggregates.iter().any(|g| g.volumes.iter().any(|v| v.in_nvfailed_state)), "{a:#?}");
    let mut data = cluster.data(0).await;
    model.check(&mut data, "vol_a").await;
}

/// S8 with a mediator: A loses its NVLog file while the operator has paused the plex mirror (a
/// plex drop, recorded at the mediator). The NVLog mirror was never dropped, so the mediator
/// still names it intact: A waits for its word, adopts B's copy as complete and serves every
/// acknowledged write, NVFAILing nothing. (A drop of the NVLog mirror would have NVFAILed the
/// volumes: the model check's `adopting_a_copy_without_the_mediators_word_is_caught`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_nvlog_is_recovered_on_the_mediators_word_that_the_mirror_is_intact() {
    let temp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (mediator, mut cluster) = up_in_sync(temp.path()).await;
    let mut admin = cluster.admin(0).await;
    let pause = mc_proto::v1::MirrorControlRequest {
        cluster_id: common::CLUSTER.to_vec(),
        name: "vol_a".into(),
        action: "pause".into(),
    };
    admin.mirror_control(pause).await.unwrap();
    let view = mediator.show().await;
    assert!(view.aggregates.iter().all(|a| !a.in_sync && a.mirror_intact), "{view:#?}");
    let model = write_forty_blocks(&cluster).await;
    cluster.kill(0);
    std::fs::remove_file(cluster.nodes[0].nvlog()).unwrap();
    cluster.start(0);
    served_without_nvfail(&cluster, &model).await;
    cluster.kill(0);
    cluster.kill(1);
}

/// S8 with the mediator down: A loses its NVLog and restarts; B returns its copy, but only the
/// mediator can say whether a drop of the mirror was recorded, so A stays fenced (it neither
/// serves nor NVFAILs) until the mediator is back and names the mirror intact; then it serves
/// every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_nvlog_waits_for_the_mediator_before_adopting_the_partners_copy() {
    let temp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (mut mediator, mut cluster) = up_in_sync(temp.path()).await;
    let model = write_forty_blocks(&cluster).await;
    mediator.kill();
    cluster.kill(0);
    std::fs::remove_file(cluster.nodes[0].nvlog()).unwrap();
    cluster.start(0);
    let waiting = |s: &mc_proto::v1::StatusReply| s.state_reason.contains("mediator's word");
    let a = cluster.wait_status(0, "A waiting for the mediator", waiting).await;
    assert_eq!(a.node_state, "fenced", "{a:#?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let a = cluster.status(0).await;
    assert!(waiting(&a), "A did not wait for the mediator: {a:#?}");
    mediator.restart();
    served_without_nvfail(&cluster, &model).await;
    cluster.kill(0);
    cluster.kill(1);
}

/// Finding 10 of docs/safety.md (liveness): B dies right after the mediator raised aggr_a's
/// epoch for A in a switchback, before B persisted it (crash point `switchback-asked`). When B
/// is back, the mediator's next reply deposes B of aggr_a, while A still waits for switchback.
/// The switchback must stay in progress, so that its re-run hands aggr_a to A (rolled back, as
/// before the fix, its re-run found nothing to switch back and nobody served aggr_a).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchback_interrupted_after_the_mediator_raised_the_epoch_completes_when_rerun() {
    let temp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mediator = start_mediator(&temp.path().join("mediator"));
    let address = mediator.address.clone();
    let mut cluster = Cluster::new(&settings([address.clone(), address]));
    cluster.env[1] = vec![(controller::faults::SWITCHOVER_CRASH.into(), "switchback-asked".into())];
    cluster.start(0);
    cluster.start(1);
    cluster.wait_state(0, "serving").await;
    cluster.create_volume(0, VOLUME_BYTES).await;
    cluster.wait_in_sync().await;
    wait_mediator_in_sync(&mediator.address).await;
    let load = Workload::start(&cluster.nbd_address(0), "vol_a", BLOCKS);
    load.wait_count(100);
    let request = mc_proto::v1::SwitchoverRequest {
        cluster_id: common::CLUSTER.to_vec(),
        forced_on_disaster: false,
        simulate: false,
        override_vetoes: false,
        force_nvfail_all: false,
        confirmed: false,
    };
    cluster.admin(1).await.switchover(request).await.unwrap();
    assert!(load.wait_ended(Duration::from_secs(30)));
    let ledger = load.stop();
    let mut b = cluster.admin(1).await;
    b.heal(mc_proto::v1::HealRequest { cluster_id: common::CLUSTER.to_vec() }).await.unwrap();
    cluster
        .wait_status(1, "aggr_a resynced after heal", |s| {
            s.aggregates.iter().any(|a| a.switched_over && a.state == "mirrored,normal")
        })
        .await;
    let switchback =
        mc_proto::v1::SwitchbackRequest { cluster_id: common::CLUSTER.to_vec(), simulate: false };
    assert!(b.switchback(switchback.clone()).await.is_err(), "B did not crash");
    let exit = cluster.procs[1].as_mut().unwrap().child.wait().unwrap();
    assert!(!exit.success(), "{exit:?}");
    cluster.procs[1] = None;
    cluster.env[1].clear();
    let view = mediator.show().await;
    assert!(view.last_decision.contains("raised for node 1 (switchback"), "{view:#?}");
    cluster.start(1);
    // The operator re-runs the switchback until B, restarted, takes it (it may still be
    // recovering): it must hand aggr_a over.
    let deadline = Instant::now() + Duration::from_secs(30);
    let reply = loop {
        let mut b = cluster.admin(1).await;
        match b.switchback(switchback.clone()).await {
            Ok(reply) => break reply.into_inner(),
            Err(status) if Instant::now() < deadline => {
                eprintln!("switchback re-run: {}", status.message());
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(status) => {
                panic!(
                    "the switchback re-run never completed: {}\n{:#?}",
                    status.message(),
                    cluster.status(1).await
                )
            }
        }
    };
    assert_eq!(reply.operation.as_ref().unwrap().state, "successful", "{reply:?}");
    cluster
        .wait_status(0, "A serving vol_a again", |s| s.mode == "normal" && s.node_state == "serving")
        .await;
    host::check_acknowledged(&cluster.nbd_address(0), &ledger);
}
