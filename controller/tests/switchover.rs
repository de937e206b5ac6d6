//! Forced switchover after a disaster, NVFAIL, deposition and forced unfence (DESIGN §9, §11;
//! S2, S3, S8, S9, S13), with real daemons, the fault proxy on the inter-site links and a real
//! NBD host that records which writes were acknowledged.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;
mod host;

use std::time::{Duration, Instant};

use common::{CLUSTER, Cluster, Settings};
use host::{Host, HostError, Workload};
use mc_proto::v1::{
    ModifyVolumeRequest, StatusReply, SwitchoverReply, SwitchoverRequest, UnfenceRequest, VolumeInfo,
};
use mc_tests::proxy::{Mode, Side};
use prost::Message;

const VOLUME_BYTES: u64 = 16 << 20;
/// Blocks the workload cycles over.
const BLOCKS: u64 = 256;

fn request(confirmed: bool, override_vetoes: bool) -> SwitchoverRequest {
    SwitchoverRequest {
        cluster_id: CLUSTER.to_vec(),
        forced_on_disaster: true,
        simulate: false,
        override_vetoes,
        force_nvfail_all: false,
        confirmed,
    }
}

/// `Admin.Switchover` at node `i`: the reply, or the status with the vetoes it carries.
async fn switchover(
    cluster: &Cluster,
    i: usize,
    request: SwitchoverRequest,
) -> Result<SwitchoverReply, (tonic::Status, Vec<String>)> {
    let mut admin = cluster.admin(i).await;
    match admin.switchover(request).await {
        Ok(reply) => Ok(reply.into_inner()),
        Err(status) => {
            let vetoes = SwitchoverReply::decode(status.details())
                .map(|r| r.vetoes.iter().map(|v| format!("{} {}: {}", v.kind, v.code, v.reason)).collect())
                .unwrap_or_default();
            Err((status, vetoes))
        }
    }
}

fn volume<'a>(status: &'a StatusReply, name: &str) -> &'a VolumeInfo {
    status
        .aggregates
        .iter()
        .flat_map(|a| a.volumes.iter())
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no volume {name}: {status:#?}"))
}

/// Disaster in sync: a host writes to A; site A is lost (`kill -9`); the forced switchover at
/// B serves vol_a with every acknowledged write, not NVFAILed (B can show it was in sync: its
/// receiver in sync and its last round trip with A younger than mirror_timeout − margin).
/// Prevents a switchover that loses acknowledged records (replay of the dr_partner partition,
/// S8) or NVFAILs without cause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disaster_in_sync_loses_nothing_and_does_not_nvfail() {
    let mut cluster =
        Cluster::up(&Settings { cp_interval_ms: 60_000, ..Settings::default() }, VOLUME_BYTES).await;
    cluster.wait_in_sync().await;
    let load = Workload::start(&cluster.nbd_address(0), "vol_a", BLOCKS);
    load.wait_count(500);
    cluster.kill(0);
    assert!(load.wait_ended(Duration::from_secs(10)), "the host's connection to A should have failed");
    let ledger = load.stop();
    let started = Instant::now();
    let reply = switchover(&cluster, 1, request(true, false)).await.unwrap();
    eprintln!("forced switchover took {:?}: {reply:?}", started.elapsed());
    assert_eq!(reply.volumes, ["vol_a"], "{reply:?}");
    assert!(reply.nvfailed_volumes.is_empty(), "{reply:?}");
    let status = cluster.status(1).await;
    assert_eq!(status.mode, "switchover", "{status:#?}");
    assert!(!volume(&status, "vol_a").in_nvfailed_state, "{status:#?}");
    host::check_acknowledged(&cluster.nbd_address(1), &ledger);
    // Idempotent: a second run reports the switchover done.
    let again = switchover(&cluster, 1, request(true, false)).await.unwrap();
    assert_eq!(again.volumes, ["vol_a"], "{again:?}");
    // B serves and takes new writes.
    let mut host = Host::connect(&cluster.nbd_address(1), "vol_a").unwrap();
    host.write(0, &host::pattern(0, 999)).unwrap();
    assert_eq!(host.read(0, 4096).unwrap(), host::pattern(0, 999));
}

/// The vetoes: with the partner reachable, a forced switchover is refused (hard veto), and
/// without the operator's confirmation too; nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reachable_partner_or_no_confirmation_vetoes() {
    let cluster = Cluster::up(&Settings::default(), VOLUME_BYTES).await;
    cluster.wait_in_sync().await;
    let (status, vetoes) = switchover(&cluster, 1, request(true, false)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(vetoes.iter().any(|v| v.starts_with("hard partner_reachable")), "{vetoes:?}");
    let (_, vetoes) = switchover(&cluster, 1, request(false, false)).await.unwrap_err();
    assert!(vetoes.iter().any(|v| v.starts_with("hard not_confirmed")), "{vetoes:?}");
    let simulated =
        switchover(&cluster, 1, SwitchoverRequest { simulate: true, ..request(true, false) }).await.unwrap();
    assert!(simulated.vetoes.iter().any(|v| v.code == "partner_reachable"), "{simulated:?}");
    assert!(simulated.operation.is_none());
    // A still serves; B took nothing.
    assert_eq!(cluster.status(1).await.mode, "normal");
    let mut host = Host::connect(&cluster.nbd_address(0), "vol_a").unwrap();
    host.write(0, &host::pattern(0, 1)).unwrap();
}

/// Rolling disaster: the link is cut, A goes on writing alone past mirror_timeout (it drops B,
/// S3), then A is lost. B cannot show it was in sync: the switchover is vetoed (soft veto, the
/// out-of-sync reason); overridden, vol_a comes up NVFAILed (refused until an operator
/// clears it), never silently old.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_disaster_is_vetoed_and_overriding_nvfails() {
    let mut cluster =
        Cluster::up_with_links(&Settings { cp_interval_ms: 60_000, ..Settings::default() }, VOLUME_BYTES)
            .await;
    cluster.wait_in_sync().await;
    let load = Workload::start(&cluster.nbd_address(0), "vol_a", BLOCKS);
    load.wait_count(100);
    for link in 0..2 {
        cluster.link(link).set_both(Mode::Blackhole);
    }
    // A stalls for mirror_timeout, drops B, then acknowledges alone.
    let before = load.count();
    let deadline = Instant::now() + Duration::from_secs(30);
    while load.count() < before + 50 {
        assert!(Instant::now() < deadline, "A never went on alone: {:?}", load.ledger.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.kill(0);
    let _ledger = load.stop();
    let (status, vetoes) = switchover(&cluster, 1, request(true, false)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(
        vetoes.iter().any(|v| v.starts_with("soft out_of_sync") || v.starts_with("soft sync_unknown")),
        "{vetoes:?}"
    );
    assert!(!vetoes.iter().any(|v| v.starts_with("hard")), "{vetoes:?}");
    let reply = switchover(&cluster, 1, request(true, true)).await.unwrap();
    assert_eq!(reply.nvfailed_volumes, ["vol_a"], "{reply:?}");
    assert!(volume(&cluster.status(1).await, "vol_a").in_nvfailed_state);
    match Host::connect(&cluster.nbd_address(1), "vol_a") {
        Err(HostError::Refused(_, message)) => assert!(message.contains("NVFAIL"), "{message}"),
        other => panic!("an NVFAILed volume was served: {:?}", other.map(|_| ())),
    }
    // Cleared by the operator (who accepts the possible loss), it is served again.
    let mut admin = cluster.admin(1).await;
    let refused = admin
        .modify_volume(ModifyVolumeRequest {
            cluster_id: CLUSTER.to_vec(),
            name: "vol_a".into(),
            in_nvfailed_state: Some(false),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    admin
        .modify_volume(ModifyVolumeRequest {
            cluster_id: CLUSTER.to_vec(),
            name: "vol_a".into(),
            in_nvfailed_state: Some(false),
            confirmed: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut host = Host::connect(&cluster.nbd_address(1), "vol_a").unwrap();
    host.read(0, 4096).unwrap();
}

/// Link cut, then A lost before any timeout: B's last round trip with A is recent, its
/// receiver in sync, so a switchover at once is not NVFAILed (A could not have acknowledged
/// alone before mirror_timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_survivor_knows_within_the_limit() {
    let mut cluster =
        Cluster::up_with_links(&Settings { cp_interval_ms: 60_000, ..Settings::default() }, VOLUME_BYTES)
            .await;
    cluster.wait_in_sync().await;
    let load = Workload::start(&cluster.nbd_address(0), "vol_a", BLOCKS);
    load.wait_count(200);
    for link in 0..2 {
        cluster.link(link).set_both(Mode::Blackhole);
    }
    cluster.kill(0);
    let ledger = load.stop();
    let reply = switchover(&cluster, 1, request(true, false)).await.unwrap();
    assert!(reply.nvfailed_volumes.is_empty(), "{reply:?}");
    host::check_acknowledged(&cluster.nbd_address(1), &ledger);
}

/// The survivor cannot know: link cut and A lost before any timeout, but the switchover comes
/// later than mirror_timeout − margin after B's last round trip with A: A may have gone on
/// alone, so vol_a is NVFAILed (with --override-vetoes; vetoed without).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_survivor_cannot_know_after_the_limit() {
    let mut cluster = Cluster::up_with_links(&Settings::default(), VOLUME_BYTES).await;
    cluster.wait_in_sync().await;
    cluster.link(0).set(Side::Forward, Mode::Blackhole);
    cluster.link(0).set(Side::Backward, Mode::Blackhole);
    cluster.link(1).set_both(Mode::Blackhole);
    cluster.kill(0);
    // mirror_timeout 5 s, margin 1 s: 4 s after the last round trip.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let (_, vetoes) = switchover(&cluster, 1, request(true, false)).await.unwrap_err();
    assert!(vetoes.iter().any(|v| v.starts_with("soft")), "{vetoes:?}");
    let reply = switchover(&cluster, 1, request(true, true)).await.unwrap();
    assert_eq!(reply.nvfailed_volumes, ["vol_a"], "{reply:?}");
}

/// B restarted between the loss of A and the switchover: it has no round trip with A in this
/// life, so it cannot know; it is fenced (S2) until the operator unfences it, and the
/// switchover NVFAILs vol_a.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_survivor_cannot_know() {
    let mut cluster = Cluster::up(&Settings::default(), VOLUME_BYTES).await;
    cluster.wait_in_sync().await;
    cluster.kill(0);
    cluster.kill(1);
    cluster.start(1);
    cluster.wait_state(1, "fenced").await;
    let (_, vetoes) = switchover(&cluster, 1, request(true, true)).await.unwrap_err();
    assert!(vetoes.iter().any(|v| v.starts_with("hard node_fenced")), "{vetoes:?}");
    let mut admin = cluster.admin(1).await;
    admin
        .unfence(UnfenceRequest { cluster_id: CLUSTER.to_vec(), force: true, confirmed: true })
        .await
        .unwrap();
    let reply = switchover(&cluster, 1, request(true, true)).await.unwrap();
    assert_eq!(reply.nvfailed_volumes, ["vol_a"], "{reply:?}");
}

/// Finding 7 of docs/safety.md (§9 (a), S13): B's NVLog storage stalls (a gray disk) with A's
/// messages received and not applied, while its keepalive round trips go on; then site A is
/// lost. B's account still says in sync and its last round trip is fresh, but it may lag what A
/// sent (a re-establish, a write A acknowledged alone): the switchover at once is vetoed (soft)
/// for the unstored messages, and overriding NVFAILs vol_a.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_survivor_with_messages_unstored_cannot_know() {
    let (mut cluster, stall) =
        Cluster::up_with_receiver_stall_switch(&Settings::default(), VOLUME_BYTES).await;
    cluster.wait_in_sync().await;
    std::fs::write(&stall, b"").unwrap();
    let mut data = cluster.data(0).await;
    let write = tokio::spawn(async move { common::write_at(&mut data, 0, vec![7; 4096]).await });
    // B's store holds the write's record (the stall logs once a message reaches it).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cluster.log(1).contains("fault injected: stalled") {
        assert!(Instant::now() < deadline, "B's store never got a message");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!write.is_finished(), "a write completed while B stored nothing");
    cluster.kill(0);
    let (_, vetoes) = switchover(&cluster, 1, request(true, false)).await.unwrap_err();
    assert!(
        vetoes.iter().any(|v| v.starts_with("soft sync_unknown") && v.contains("not yet stored")),
        "{vetoes:?}"
    );
    let reply = switchover(&cluster, 1, request(true, true)).await.unwrap();
    assert_eq!(reply.nvfailed_volumes, ["vol_a"], "{reply:?}");
    std::fs::remove_file(&stall).unwrap();
}

/// A restarted controller whose partner site is down stays fenced (S2); the forced unfence
/// raises its epoch and brings its volumes up NVFAILed (DESIGN §9 (e)).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_unfence_nvfails() {
    let mut cluster = Cluster::up(&Settings::default(), VOLUME_BYTES).await;
    cluster.wait_in_sync().await;
    cluster.kill(1);
    cluster.kill(0);
    cluster.start(0);
    let fenced = cluster.wait_state(0, "fenced").await;
    assert!(fenced.aggregates.is_empty(), "{fenced:#?}");
    let mut admin = cluster.admin(0).await;
    let refused = admin
        .unfence(UnfenceRequest { cluster_id: CLUSTER.to_vec(), force: true, confirmed: false })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let reply = admin
        .unfence(UnfenceRequest { cluster_id: CLUSTER.to_vec(), force: true, confirmed: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.nvfailed_volumes, ["vol_a"], "{reply:?}");
    let status = cluster.status(0).await;
    assert_eq!(status.node_state, "serving");
    let epoch = status.aggregates[0].epoch.unwrap();
    assert_eq!((epoch.number, epoch.owner_node), (2, 1), "{status:#?}");
    assert!(matches!(Host::connect(&cluster.nbd_address(0), "vol_a"), Err(HostError::Refused(..))));
}

/// Waits until process `pid` is stopped (state `T` in /proc): SIGSTOP is delivered
/// asynchronously, and a switchover must not race the delivery.
fn wait_stopped(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The state follows the parenthesized command name.
        let state = stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next());
        if state == Some('T') {
            return;
        }
        assert!(Instant::now() < deadline, "process {pid} did not stop: {stat}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Deposed owner: A is paused (SIGSTOP) under a workload across the forced switchover at B,
/// for longer than mirror_timeout, then resumed. It must not take the pause for B's silence and
/// acknowledge alone (S3): it learns the higher epoch from B and stops serving vol_a (S2). Every
/// write its host saw acknowledged, before or after the pause, is at B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_owner_is_deposed_when_it_resumes() {
    let cluster =
        Cluster::up(&Settings { cp_interval_ms: 60_000, ..Settings::default() }, VOLUME_BYTES).await;
    cluster.wait_in_sync().await;
    let load = Workload::start(&cluster.nbd_address(0), "vol_a", BLOCKS);
    load.wait_count(300);
    let pid = cluster.procs[0].as_ref().unwrap().child.id() as i32;
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    wait_stopped(pid);
    let at_pause = load.count();
    let reply = switchover(&cluster, 1, request(true, false)).await.unwrap();
    assert!(reply.nvfailed_volumes.is_empty(), "{reply:?}");
    // Paused past mirror_timeout (5 s): on resume, A's writes have waited "too long".
    tokio::time::sleep(Duration::from_secs(6)).await;
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    let deposed = cluster
        .wait_status(0, "vol_a deposed at A", |s| {
            s.aggregates.iter().flat_map(|a| a.volumes.iter()).any(|v| v.reason.contains("deposed"))
        })
        .await;
    assert_eq!(volume(&deposed, "vol_a").state, "offline", "{deposed:#?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ledger = load.stop();
    // At most the write in flight at the pause completed after it (its record reached B).
    assert!(
        ledger.count <= at_pause + 1,
        "A acknowledged {} writes after the pause",
        ledger.count - at_pause
    );
    if let Ok(mut old) = Host::connect(&cluster.nbd_address(0), "vol_a") {
        assert!(old.write(0, &host::pattern(0, 777)).is_err(), "the deposed owner acknowledged a write");
    }
    host::check_acknowledged(&cluster.nbd_address(1), &ledger);
}

/// A restarted after the switchover: B's hello tells it the higher epoch; it stays fenced and
/// does not serve vol_a, and B goes on serving it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_old_owner_does_not_serve() {
    let mut cluster = Cluster::up(&Settings::default(), VOLUME_BYTES).await;
    cluster.wait_in_sync().await;
    cluster.kill(0);
    switchover(&cluster, 1, request(true, false)).await.unwrap();
    cluster.start(0);
    let a = cluster
        .wait_status(0, "A deposed", |s| {
            s.state_reason.contains("deposed") || s.unavailable.iter().any(|u| u.reason.contains("deposed"))
        })
        .await;
    assert_ne!(a.node_state, "serving", "{a:#?}");
    assert!(Host::connect(&cluster.nbd_address(0), "vol_a").is_err());
    let mut b = Host::connect(&cluster.nbd_address(1), "vol_a").unwrap();
    b.write(0, &host::pattern(0, 5)).unwrap();
}

/// `kill -9` of B in the middle of the switchover (after the freeze, and after the replay
/// before the CP), restart, forced unfence, re-run: the operation completes from the journal
/// and every write A acknowledged is at B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_interrupted_by_a_crash_completes_when_rerun() {
    for step in ["frozen", "replayed"] {
        let mut cluster =
            Cluster::up(&Settings { cp_interval_ms: 60_000, ..Settings::default() }, VOLUME_BYTES).await;
        cluster.wait_in_sync().await;
        let load = Workload::start(&cluster.nbd_address(0), "vol_a", BLOCKS);
        load.wait_count(300);
        cluster.kill(0);
        let ledger = load.stop();
        cluster.kill(1);
        cluster.env[1] = vec![("MC_FAULT_SWITCHOVER_CRASH_AT".into(), step.into())];
        cluster.start(1);
        // Fenced: A is gone, nobody confirms B's epoch; B has no aggregate of its own.
        cluster.wait_state(1, "fenced").await;
        let mut admin = cluster.admin(1).await;
        admin
            .unfence(UnfenceRequest { cluster_id: CLUSTER.to_vec(), force: true, confirmed: true })
            .await
            .unwrap();
        let crashed = switchover(&cluster, 1, request(true, true)).await;
        assert!(crashed.is_err(), "{step}: the switchover should have crashed the daemon");
        let daemon = cluster.procs[1].as_mut().unwrap();
        let exit = daemon.child.wait().unwrap();
        assert!(!exit.success(), "{step}: {exit:?}");
        cluster.procs[1] = None;
        cluster.env[1].clear();
        cluster.start(1);
        cluster.wait_state(1, "fenced").await;
        let mut admin = cluster.admin(1).await;
        admin
            .unfence(UnfenceRequest { cluster_id: CLUSTER.to_vec(), force: true, confirmed: true })
            .await
            .unwrap();
        let reply = switchover(&cluster, 1, request(true, true)).await.unwrap();
        assert_eq!(reply.volumes, ["vol_a"], "{step}: {reply:?}");
        let operation = reply.operation.clone().unwrap();
        assert_eq!(operation.state, "successful", "{step}: {operation:?}");
        // B restarted before the switchover: it cannot know whether A wrote alone (S9).
        assert_eq!(reply.nvfailed_volumes, ["vol_a"], "{step}: {reply:?}");
        let mut admin = cluster.admin(1).await;
        admin
            .modify_volume(ModifyVolumeRequest {
                cluster_id: CLUSTER.to_vec(),
                name: "vol_a".into(),
                in_nvfailed_state: Some(false),
                confirmed: true,
                ..Default::default()
            })
            .await
            .unwrap();
        host::check_acknowledged(&cluster.nbd_address(1), &ledger);
    }
}

/// A flapping link: cut, A drops B after the silence and writes alone, the link returns for a
/// moment and is cut again before the mirror is re-established, then A is lost. B's receiver
/// keeps its own account (S13): it holds the mirror out of sync (or resyncing), never in sync,
/// so the switchover is vetoed and, overridden, NVFAILs vol_a.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_link_leaves_the_receiver_out_of_sync() {
    let mut cluster =
        Cluster::up_with_links(&Settings { cp_interval_ms: 60_000, ..Settings::default() }, VOLUME_BYTES)
            .await;
    cluster.wait_in_sync().await;
    let load = Workload::start(&cluster.nbd_address(0), "vol_a", BLOCKS);
    load.wait_count(100);
    for link in 0..2 {
        cluster.link(link).set_both(Mode::Blackhole);
    }
    let before = load.count();
    let deadline = Instant::now() + Duration::from_secs(30);
    while load.count() < before + 50 {
        assert!(Instant::now() < deadline, "A never went on alone: {:?}", load.ledger.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A moment of link: held bytes flow (keepalive replies, B's own mirror to A), then it is cut
    // again. A's writer → B's receiver stays cut: a hello A sent on a connection it opened during
    // the cut would otherwise complete a re-establishment, and with its covering CP the receiver
    // is legitimately back in sync (S13) — on a slow machine that fits in the moment.
    cluster.link(0).set(Side::Backward, Mode::Pass);
    cluster.link(1).set_both(Mode::Pass);
    tokio::time::sleep(Duration::from_millis(150)).await;
    for link in 0..2 {
        cluster.link(link).set_both(Mode::Blackhole);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.kill(0);
    let _ = load.stop();
    let b = cluster.status(1).await;
    let receiver = b.partitions.iter().find(|p| p.kind == "dr_partner").unwrap();
    assert_ne!(receiver.mirror_state, mc_proto::v1::MirrorState::InSync as i32, "{b:#?}");
    let (_, vetoes) = switchover(&cluster, 1, request(true, false)).await.unwrap_err();
    assert!(vetoes.iter().any(|v| v.starts_with("soft out_of_sync")), "{vetoes:?}");
    let reply = switchover(&cluster, 1, request(true, true)).await.unwrap();
    assert_eq!(reply.nvfailed_volumes, ["vol_a"], "{reply:?}");
}

/// DESIGN §9 rules (b) and (c): a volume with `dr_force_nvfail` set is NVFAILed by any forced
/// switchover, even one that can show it was in sync; `--force-nvfail-all` NVFAILs every volume
/// taken over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dr_force_nvfail_and_force_nvfail_all_nvfail_in_sync_volumes() {
    for force_all in [false, true] {
        let mut cluster = Cluster::up(&Settings::default(), VOLUME_BYTES).await;
        cluster.wait_in_sync().await;
        if !force_all {
            let mut admin = cluster.admin(0).await;
            let set = admin
                .modify_volume(ModifyVolumeRequest {
                    cluster_id: CLUSTER.to_vec(),
                    name: "vol_a".into(),
                    dr_force_nvfail: Some(true),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            assert!(set.dr_force_nvfail);
        }
        cluster.kill(0);
        let reply = switchover(
            &cluster,
            1,
            SwitchoverRequest { force_nvfail_all: force_all, ..request(true, false) },
        )
        .await
        .unwrap();
        assert!(reply.vetoes.is_empty(), "in sync: {reply:?}");
        assert_eq!(reply.nvfailed_volumes, ["vol_a"], "force_all {force_all}: {reply:?}");
    }
}

/// Negotiated switchover under a workload (DESIGN §11): A stops accepting writes, drains, makes
/// a CP and releases vol_a's aggregate at B's epoch; B serves it without NVFAIL. Every write
/// the host saw acknowledged is at B, A refuses vol_a from then on (its writes fail rather than
/// being acknowledged), and B's new writes are still mirrored to A (the ack set keeps A).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_negotiated_switchover_under_a_workload_loses_nothing() {
    let cluster =
        Cluster::up(&Settings { cp_interval_ms: 60_000, ..Settings::default() }, VOLUME_BYTES).await;
    cluster.wait_in_sync().await;
    let load = Workload::start(&cluster.nbd_address(0), "vol_a", BLOCKS);
    load.wait_count(300);
    // Vetoed as forced (A answers); a negotiated one needs no confirmation.
    let (_, vetoes) = switchover(&cluster, 1, request(true, false)).await.unwrap_err();
    assert!(vetoes.iter().any(|v| v.starts_with("hard partner_reachable")), "{vetoes:?}");
    let started = Instant::now();
    let reply =
        switchover(&cluster, 1, SwitchoverRequest { forced_on_disaster: false, ..request(false, false) })
            .await
            .unwrap();
    eprintln!("negotiated switchover took {:?}: {reply:?}", started.elapsed());
    assert_eq!(reply.volumes, ["vol_a"], "{reply:?}");
    assert!(reply.nvfailed_volumes.is_empty(), "{reply:?}");
    assert_eq!(reply.operation.as_ref().unwrap().state, "successful", "{reply:?}");
    // The host's connection to A fails its next write.
    let deadline = Instant::now() + Duration::from_secs(30);
    while load.ledger.lock().unwrap().ended.is_none() {
        assert!(Instant::now() < deadline, "A went on acknowledging writes after the release");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ledger = load.stop();
    let a = cluster.status(0).await;
    assert!(volume(&a, "vol_a").reason.contains("released"), "{a:#?}");
    host::check_acknowledged(&cluster.nbd_address(1), &ledger);
    // B writes vol_a, and the write is mirrored to A's NVLog (A stays in the ack set).
    let mut b = Host::connect(&cluster.nbd_address(1), "vol_a").unwrap();
    b.write(0, &host::pattern(0, 4242)).unwrap();
    let b_status = cluster.status(1).await;
    assert_eq!(b_status.mode, "switchover");
    assert_eq!(
        b_status.dr_mirror.as_ref().map(|m| m.state),
        Some(mc_proto::v1::MirrorState::InSync as i32),
        "{b_status:#?}"
    );
}

/// A negotiated switchover whose survivor B is killed (abort, as `kill -9`) before and after A
/// released its aggregates: B restarts (A confirms its epoch), the interrupted operation is
/// rolled back, and a re-run completes; every acknowledged write is at B and A never serves
/// vol_a again once released (never two writers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_negotiated_switchover_interrupted_by_a_crash_completes_when_rerun() {
    for step in ["planned", "released"] {
        let mut cluster = Cluster::new(&Settings { cp_interval_ms: 60_000, ..Settings::default() });
        cluster.env[1] = vec![("MC_FAULT_SWITCHOVER_CRASH_AT".into(), step.into())];
        cluster.start(0);
        cluster.start(1);
        cluster.wait_state(0, "serving").await;
        cluster.create_volume(0, VOLUME_BYTES).await;
        cluster.wait_in_sync().await;
        let load = Workload::start(&cluster.nbd_address(0), "vol_a", BLOCKS);
        load.wait_count(200);
        let negotiated = SwitchoverRequest { forced_on_disaster: false, ..request(false, false) };
        assert!(switchover(&cluster, 1, negotiated.clone()).await.is_err(), "{step}: no crash");
        let exit = cluster.procs[1].as_mut().unwrap().child.wait().unwrap();
        assert!(!exit.success(), "{step}: {exit:?}");
        cluster.procs[1] = None;
        cluster.env[1].clear();
        if step == "released" {
            // A released vol_a: its host's writes fail from then on.
            let deadline = Instant::now() + Duration::from_secs(30);
            while load.ledger.lock().unwrap().ended.is_none() {
                assert!(Instant::now() < deadline, "A acknowledged writes after releasing");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        cluster.start(1);
        cluster.wait_state(1, "serving").await;
        // As an operator would: wait for the mirror, then re-run (a release is called off while
        // a plex is being resynced).
        cluster
            .wait_status(0, "A's aggregate mirrored and normal", |s| {
                s.aggregates.first().is_none_or(|a| a.state == "mirrored,normal")
            })
            .await;
        let deadline = Instant::now() + Duration::from_secs(60);
        let reply = loop {
            match switchover(&cluster, 1, negotiated.clone()).await {
                Ok(reply) => break reply,
                Err((status, vetoes)) => {
                    assert!(Instant::now() < deadline, "{step}: {status:?} {vetoes:?}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        };
        assert_eq!(reply.volumes, ["vol_a"], "{step}: {reply:?}");
        let why: Vec<String> =
            cluster.log(1).lines().filter(|l| l.contains("NVFAIL")).map(str::to_string).collect();
        assert!(reply.nvfailed_volumes.is_empty(), "{step}: {reply:?}\n{why:#?}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while load.ledger.lock().unwrap().ended.is_none() {
            assert!(Instant::now() < deadline, "{step}: A acknowledged writes after the switchover");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let ledger = load.stop();
        host::check_acknowledged(&cluster.nbd_address(1), &ledger);
    }
}
