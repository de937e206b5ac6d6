//! Heal and switchback (DESIGN §6.4, §11; S2, S5, S8, S14) with real daemons and a real NBD host
//! that records which writes were acknowledged: the planned cycle (negotiated switchover, heal,
//! switchback) and the disaster cycle (forced switchover, the old owner back, heal, switchback).
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;
mod host;

use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{CLUSTER, Cluster, Settings};
use host::{Host, Workload};
use mc_proto::v1::{
    HealReply, HealRequest, MirrorState, StatusReply, SwitchbackReply, SwitchbackRequest, SwitchoverRequest,
};
use prost::Message;

const VOLUME_BYTES: u64 = 16 << 20;
/// Blocks the workloads cycle over (1 MiB): the heal resync must stay near this, far below the
/// 64 MiB plexes.
const BLOCKS: u64 = 256;

fn switchover_request(forced: bool) -> SwitchoverRequest {
    SwitchoverRequest {
        cluster_id: CLUSTER.to_vec(),
        forced_on_disaster: forced,
        simulate: false,
        override_vetoes: false,
        force_nvfail_all: false,
        confirmed: forced,
    }
}

async fn heal(cluster: &Cluster, i: usize) -> Result<HealReply, tonic::Status> {
    let mut admin = cluster.admin(i).await;
    admin.heal(HealRequest { cluster_id: CLUSTER.to_vec() }).await.map(|r| r.into_inner())
}

/// `Admin.Switchback` at node `i`: the reply, or the status with the veto codes it carries.
async fn switchback(
    cluster: &Cluster,
    i: usize,
    simulate: bool,
) -> Result<SwitchbackReply, (tonic::Status, Vec<String>)> {
    let mut admin = cluster.admin(i).await;
    match admin.switchback(SwitchbackRequest { cluster_id: CLUSTER.to_vec(), simulate }).await {
        Ok(reply) => Ok(reply.into_inner()),
        Err(status) => {
            let codes = SwitchbackReply::decode(status.details())
                .map(|r| r.vetoes.iter().map(|v| v.code.clone()).collect())
                .unwrap_or_default();
            Err((status, codes))
        }
    }
}

fn aggr(status: &StatusReply) -> &mc_proto::v1::AggregateInfo {
    status.aggregates.iter().find(|a| a.name == "aggr_a").unwrap_or_else(|| panic!("no aggr_a: {status:#?}"))
}

/// The data extent of a plex disk file (from its label).
async fn data_of(path: &Path) -> Vec<u8> {
    let device = plex::FileDevice::open(path).unwrap();
    let (label, _) = plex::read_label(&device).await.unwrap();
    let mut file = std::fs::File::open(path).unwrap();
    let mut all = Vec::new();
    file.read_to_end(&mut all).unwrap();
    let start = label.data.offset as usize;
    all[start..start + label.data.len as usize].to_vec()
}

/// Both plexes of aggr_a (d0 on A's shelf, d1 on B's) hold the same data, block for block.
async fn assert_plexes_identical(cluster: &Cluster) {
    let d0 = data_of(&cluster.nodes[0].dir.join("shelf/d0")).await;
    let d1 = data_of(&cluster.nodes[1].dir.join("shelf/d1")).await;
    assert_eq!(d0.len(), d1.len(), "the plexes' data areas differ in size");
    let differing: Vec<usize> = d0
        .chunks(4096)
        .zip(d1.chunks(4096))
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i)
        .collect();
    assert!(
        differing.is_empty(),
        "{} blocks differ between the plexes, first {:?}",
        differing.len(),
        &differing[..differing.len().min(8)]
    );
}

/// Heal, then the wait for B's resync of plex 0; returns the resync's total bytes and the
/// regions A's unreleased records added to the resync set.
async fn heal_and_resync(cluster: &Cluster) -> (u64, u64) {
    let reply = heal(cluster, 1).await.unwrap();
    eprintln!("heal: {reply:?}");
    assert_eq!(reply.operation.as_ref().unwrap().state, "successful", "{reply:?}");
    assert_eq!(reply.aggregates.len(), 1, "{reply:?}");
    assert!(reply.aggregates[0].reattached, "{reply:?}");
    let b = cluster
        .wait_status(1, "aggr_a mirrored and normal after heal", |s| {
            s.aggregates.iter().any(|a| {
                a.name == "aggr_a"
                    && a.state == "mirrored,normal"
                    && a.resync.as_ref().is_some_and(|r| r.complete)
            })
        })
        .await;
    let resync = aggr(&b).resync.clone().unwrap();
    eprintln!("heal resync: {resync:?}");
    assert_eq!(resync.level, "incremental", "{resync:?}");
    assert_eq!((resync.source_plex, resync.target_plex), (1, 0), "{resync:?}");
    (resync.total_bytes, reply.aggregates[0].regions_marked)
}

/// The planned cycle under a workload (issue 9): negotiated switchover to B, writes at B, heal
/// (an incremental resync bounded by what B wrote, not by the plex size), switchback, writes at
/// A; every acknowledged write is read back at each step, and the plexes end byte-identical.
/// Also: switchback is vetoed before heal, A's mode is waiting-for-switchback meanwhile, and
/// both nodes are back to normal at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_planned_cycle_loses_nothing_and_resyncs_incrementally() {
    let mut cluster = Cluster::up(&Settings::default(), VOLUME_BYTES).await;
    cluster.wait_in_sync().await;
    // 1. Negotiated switchover under a workload at A.
    let load = Workload::start(&cluster.nbd_address(0), "vol_a", BLOCKS);
    load.wait_count(300);
    let started = Instant::now();
    let mut admin = cluster.admin(1).await;
    let reply = admin.switchover(switchover_request(false)).await.unwrap().into_inner();
    eprintln!("negotiated switchover took {:?}", started.elapsed());
    assert_eq!(reply.volumes, ["vol_a"], "{reply:?}");
    assert!(load.wait_ended(Duration::from_secs(30)), "A went on acknowledging writes after the release");
    let ledger = load.stop();
    host::check_acknowledged(&cluster.nbd_address(1), &ledger);
    assert_eq!(cluster.status(0).await.mode, "waiting-for-switchback");
    assert_eq!(cluster.status(1).await.mode, "switchover");
    // Switchback needs heal first.
    let (_, codes) = switchback(&cluster, 1, false).await.unwrap_err();
    assert!(codes.iter().any(|c| c == "not_healed"), "{codes:?}");
    // 2. Writes at B (some destaged by a CP, so the resync has work), then heal while they go on.
    let load = Workload::start(&cluster.nbd_address(1), "vol_a", BLOCKS);
    load.wait_count(300);
    let cps = cluster.status(1).await.cp.map_or(0, |c| c.completed);
    cluster.wait_status(1, "a CP at B", |s| s.cp.is_some_and(|c| c.completed > cps)).await;
    let (total, _) = heal_and_resync(&cluster).await;
    assert!(total > 0 && total <= 2 << 20, "the heal resync copied {total} bytes for 1 MiB written");
    load.wait_count(load.count() + 100);
    // 3. Switchback: B stops serving vol_a, A serves it with everything B acknowledged.
    let simulated = switchback(&cluster, 1, true).await.unwrap();
    assert!(simulated.vetoes.is_empty(), "{simulated:?}");
    let started = Instant::now();
    let reply = switchback(&cluster, 1, false).await.unwrap();
    eprintln!("switchback took {:?}: {reply:?}", started.elapsed());
    assert_eq!(reply.volumes, ["vol_a"], "{reply:?}");
    assert_eq!(reply.operation.as_ref().unwrap().state, "successful", "{reply:?}");
    assert!(load.wait_ended(Duration::from_secs(30)), "B went on acknowledging writes after the switchback");
    let ledger = load.stop();
    host::check_acknowledged(&cluster.nbd_address(0), &ledger);
    assert!(Host::connect(&cluster.nbd_address(1), "vol_a").is_err(), "B still exports vol_a");
    let (a, b) = (cluster.status(0).await, cluster.status(1).await);
    assert_eq!((a.mode.as_str(), b.mode.as_str()), ("normal", "normal"), "{a:#?}\n{b:#?}");
    assert_eq!(a.node_state, "serving");
    // 4. A writes again, mirrored to B (its NVLog mirror re-established) and to both plexes.
    let load = Workload::start(&cluster.nbd_address(0), "vol_a", BLOCKS);
    load.wait_count(300);
    let ledger = load.stop();
    cluster.wait_in_sync().await;
    host::check_acknowledged(&cluster.nbd_address(0), &ledger);
    // A clean stop of A: its final CP puts everything on both plexes.
    assert!(cluster.terminate(0), "A did not stop cleanly");
    assert_plexes_identical(&cluster).await;
}

/// The disaster cycle: A is lost with acknowledged writes not yet in a CP; forced switchover at
/// B; A restarts and waits for switchback (fenced, serving nothing, mode waiting-for-switchback);
/// heal takes what A's unreleased records touch into the resync set before A discards them (S8)
/// and resyncs plex 0 incrementally; switchback returns vol_a to A with every write B
/// acknowledged; the plexes end byte-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disaster_cycle_heals_incrementally_and_switches_back() {
    let mut cluster =
        Cluster::up(&Settings { cp_interval_ms: 60_000, ..Settings::default() }, VOLUME_BYTES).await;
    cluster.wait_in_sync().await;
    let load = Workload::start(&cluster.nbd_address(0), "vol_a", BLOCKS);
    load.wait_count(300);
    cluster.kill(0);
    assert!(load.wait_ended(Duration::from_secs(10)));
    let ledger = load.stop();
    let reply = cluster.admin(1).await.switchover(switchover_request(true)).await.unwrap().into_inner();
    assert!(reply.nvfailed_volumes.is_empty(), "{reply:?}");
    host::check_acknowledged(&cluster.nbd_address(1), &ledger);
    // Heal needs A back.
    assert!(heal(&cluster, 1).await.is_err());
    cluster.start(0);
    let a = cluster.wait_status(0, "A waiting for switchback", |s| s.mode == "waiting-for-switchback").await;
    assert_eq!(a.node_state, "fenced", "{a:#?}");
    assert!(a.state_reason.contains("waiting for switchback"), "{a:#?}");
    assert!(Host::connect(&cluster.nbd_address(0), "vol_a").is_err(), "A serves vol_a before switchback");
    // S14: an operator cannot force a node that waits for switchback to serve.
    let refused = cluster
        .admin(0)
        .await
        .unfence(mc_proto::v1::UnfenceRequest { cluster_id: CLUSTER.to_vec(), force: true, confirmed: true })
        .await;
    assert!(refused.is_err(), "a node waiting for switchback was force-unfenced: {refused:?}");
    let a = cluster.status(0).await;
    assert_eq!((a.node_state.as_str(), a.mode.as_str()), ("fenced", "waiting-for-switchback"), "{a:#?}");
    // A's records of vol_a are kept until heal (S8).
    let kept = cluster.records(0, "local").await.len();
    assert!(kept > 0, "A discarded its records before heal");
    let load = Workload::start(&cluster.nbd_address(1), "vol_a", BLOCKS);
    load.wait_count(200);
    let (total, marked) = heal_and_resync(&cluster).await;
    assert!(total > 0 && total <= 2 << 20, "the heal resync copied {total} bytes for 1 MiB written");
    // What A's unreleased records touch went into the resync set, then A discarded them.
    assert!(marked > 0, "A reported no region of its unreleased records");
    assert!(cluster.records(0, "local").await.is_empty(), "A kept its records after heal");
    let reply = switchback(&cluster, 1, false).await.unwrap();
    assert_eq!(reply.operation.as_ref().unwrap().state, "successful", "{reply:?}");
    assert!(load.wait_ended(Duration::from_secs(30)));
    let ledger = load.stop();
    let a = cluster.wait_state(0, "serving").await;
    assert_eq!(a.mode, "normal", "{a:#?}");
    assert!(!a.aggregates.iter().any(|g| g.volumes.iter().any(|v| v.in_nvfailed_state)), "{a:#?}");
    host::check_acknowledged(&cluster.nbd_address(0), &ledger);
    let load = Workload::start(&cluster.nbd_address(0), "vol_a", BLOCKS);
    load.wait_count(200);
    let ledger = load.stop();
    cluster.wait_in_sync().await;
    host::check_acknowledged(&cluster.nbd_address(0), &ledger);
    // A clean stop of A: its final CP puts everything on both plexes.
    assert!(cluster.terminate(0), "A did not stop cleanly");
    assert_plexes_identical(&cluster).await;
}

/// Kill -9 of B (the node running the operation) at each step of heal and switchback, under a
/// workload at B: B restarts, the interrupted operation is rolled back (before the epochs are
/// raised) or stays in progress, and a re-run completes it; every write B acknowledged is at A
/// at the end, and B never serves vol_a once the epochs were raised (never two writers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heal_and_switchback_interrupted_by_a_crash_complete_when_rerun() {
    for step in
        ["heal-discarded", "switchback-planned", "switchback-cp", "switchback-raised", "switchback-handed"]
    {
        let mut cluster = Cluster::new(&Settings::default());
        cluster.env[1] = vec![("MC_FAULT_SWITCHOVER_CRASH_AT".into(), step.into())];
        cluster.start(0);
        cluster.start(1);
        cluster.wait_state(0, "serving").await;
        cluster.create_volume(0, VOLUME_BYTES).await;
        cluster.wait_in_sync().await;
        cluster.admin(1).await.switchover(switchover_request(false)).await.unwrap();
        let load = Workload::start(&cluster.nbd_address(1), "vol_a", BLOCKS);
        load.wait_count(200);
        let crash_b = |cluster: &mut Cluster| {
            let exit = cluster.procs[1].as_mut().unwrap().child.wait().unwrap();
            assert!(!exit.success(), "{step}: {exit:?}");
            cluster.procs[1] = None;
            cluster.env[1].clear();
        };
        if step == "heal-discarded" {
            assert!(heal(&cluster, 1).await.is_err(), "{step}: no crash");
            crash_b(&mut cluster);
            assert!(load.wait_ended(Duration::from_secs(10)), "{step}");
            let ledger = load.stop();
            cluster.start(1);
            cluster.wait_state(1, "serving").await;
            host::check_acknowledged(&cluster.nbd_address(1), &ledger);
            let (total, _) = heal_and_resync(&cluster).await;
            assert!(total <= 2 << 20, "{step}: {total}");
            let reply = switchback(&cluster, 1, false).await.unwrap();
            assert_eq!(reply.operation.as_ref().unwrap().state, "successful", "{step}: {reply:?}");
            host::check_acknowledged(&cluster.nbd_address(0), &ledger);
            continue;
        }
        heal_and_resync(&cluster).await;
        load.wait_count(load.count() + 50);
        assert!(switchback(&cluster, 1, false).await.is_err(), "{step}: no crash");
        crash_b(&mut cluster);
        assert!(load.wait_ended(Duration::from_secs(10)), "{step}");
        let ledger = load.stop();
        cluster.start(1);
        let raised = matches!(step, "switchback-raised" | "switchback-handed");
        let b = cluster.wait_state(1, "serving").await;
        if raised {
            // The epochs moved to A: B serves vol_a no more, whatever its journal says.
            assert!(
                Host::connect(&cluster.nbd_address(1), "vol_a").is_err(),
                "{step}: B serves vol_a: {b:#?}"
            );
            assert_eq!(b.mode, "partial-switchback", "{step}: {b:#?}");
        } else {
            // Rolled back: B serves vol_a with everything it acknowledged.
            let ops = cluster
                .admin(1)
                .await
                .operations(mc_proto::v1::OperationsRequest { cluster_id: CLUSTER.to_vec() })
                .await
                .unwrap()
                .into_inner()
                .operations;
            let last = ops.last().unwrap();
            assert_eq!(
                (last.kind.as_str(), last.state.as_str()),
                ("switchback", "failed"),
                "{step}: {last:?}"
            );
            host::check_acknowledged(&cluster.nbd_address(1), &ledger);
            cluster
                .wait_status(1, "aggr_a mirrored and normal", |s| {
                    s.aggregates.iter().any(|a| a.name == "aggr_a" && a.state == "mirrored,normal")
                })
                .await;
        }
        let reply = switchback(&cluster, 1, false).await.unwrap();
        assert_eq!(reply.operation.as_ref().unwrap().state, "successful", "{step}: {reply:?}");
        let a = cluster.wait_state(0, "serving").await;
        assert_eq!(a.mode, "normal", "{step}: {a:#?}");
        assert_eq!(cluster.status(1).await.mode, "normal", "{step}");
        host::check_acknowledged(&cluster.nbd_address(0), &ledger);
        let mut host = Host::connect(&cluster.nbd_address(0), "vol_a").unwrap();
        host.write(0, &host::pattern(0, 31_337)).unwrap();
        assert!(Host::connect(&cluster.nbd_address(1), "vol_a").is_err(), "{step}: two nodes export vol_a");
    }
}

async fn mirror(cluster: &Cluster, action: &str) -> mc_proto::v1::MirrorControlReply {
    let mut admin = cluster.admin(0).await;
    let request = mc_proto::v1::MirrorControlRequest {
        cluster_id: CLUSTER.to_vec(),
        name: "vol_a".into(),
        action: action.into(),
    };
    admin.mirror_control(request).await.unwrap().into_inner()
}

/// Waits until aggr_a at A is mirrored and normal after a resync; returns the resync.
async fn wait_resynced(cluster: &Cluster) -> mc_proto::v1::ResyncInfo {
    let a = cluster
        .wait_status(0, "aggr_a resynced", |s| {
            s.aggregates.iter().any(|a| {
                a.name == "aggr_a"
                    && a.state == "mirrored,normal"
                    && a.resync.as_ref().is_some_and(|r| r.complete)
            })
        })
        .await;
    aggr(&a).resync.clone().unwrap()
}

/// `mirror pause` under a workload detaches plex 1 (the drop recorded at B, S3: a forced
/// switchover there is vetoed as out of sync) and keeps it detached, across a restart too;
/// `resume` resyncs only what was written meanwhile; `fullresync` copies every region.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_pause_resume_and_fullresync() {
    let mut cluster = Cluster::up(&Settings::default(), VOLUME_BYTES).await;
    cluster.wait_in_sync().await;
    let load = Workload::start(&cluster.nbd_address(0), "vol_a", BLOCKS);
    load.wait_count(200);
    let reply = mirror(&cluster, "pause").await;
    assert_eq!((reply.aggregate.as_str(), reply.plex), ("aggr_a", 1), "{reply:?}");
    load.wait_count(load.count() + 300);
    // B knows: its copy is out of date (S3).
    let mut admin = cluster.admin(1).await;
    let simulated = admin
        .switchover(SwitchoverRequest { simulate: true, ..switchover_request(true) })
        .await
        .unwrap()
        .into_inner();
    assert!(simulated.vetoes.iter().any(|v| v.code == "out_of_sync"), "{simulated:?}");
    // Paused stays paused: past several plex monitor rounds, and across a restart.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(aggr(&cluster.status(0).await).plexes[1].state, "out_of_date");
    let ledger = load.stop();
    assert!(cluster.terminate(0), "A did not stop cleanly");
    cluster.start(0);
    cluster.wait_state(0, "serving").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let a = cluster.status(0).await;
    assert_ne!(aggr(&a).state, "mirrored,normal", "a paused mirror was reattached: {a:#?}");
    host::check_acknowledged(&cluster.nbd_address(0), &ledger);
    // Resume: incremental, bounded by what was written (1 MiB of blocks).
    mirror(&cluster, "resume").await;
    let resync = wait_resynced(&cluster).await;
    assert_eq!(resync.level, "incremental", "{resync:?}");
    assert!(resync.total_bytes > 0 && resync.total_bytes <= 2 << 20, "{resync:?}");
    // Fullresync: everything.
    mirror(&cluster, "fullresync").await;
    let resync = wait_resynced(&cluster).await;
    let size = aggr(&cluster.status(0).await).size_bytes;
    assert!(resync.total_bytes >= size, "a full resync copied {} of {size} bytes", resync.total_bytes);
    host::check_acknowledged(&cluster.nbd_address(0), &ledger);
    cluster.wait_in_sync().await;
    assert!(cluster.terminate(0), "A did not stop cleanly");
    assert_plexes_identical(&cluster).await;
}

/// Finding 9 of docs/safety.md (S1, S8), found by the model check: A dies and its NVLog file is
/// lost while B holds A's acknowledged records above A's last CP; forced switchover; A returns
/// with a new log that counts on from its last CP, below those records; B overwrites the blocks;
/// heal and switchback. B's receiver partition must not keep A's records from before the
/// switchover: A's first handshake would take them back as its own (they are above its tail) and
/// its next recovery would replay them over what B wrote (or, had A written first, count B's
/// tail as holding A's new records). Checked by a crash of A right after the switchback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchback_after_a_lost_nvlog_leaves_no_old_record_to_replay() {
    let mut cluster =
        Cluster::up(&Settings { cp_interval_ms: 60_000, ..Settings::default() }, VOLUME_BYTES).await;
    cluster.wait_in_sync().await;
    let load = Workload::start(&cluster.nbd_address(0), "vol_a", BLOCKS);
    load.wait_count(300);
    cluster.kill(0);
    assert!(load.wait_ended(Duration::from_secs(10)));
    let first = load.stop();
    std::fs::remove_file(cluster.nodes[0].nvlog()).unwrap();
    let held = cluster.records(1, "dr_partner").await.len();
    assert!(held >= 300, "B holds {held} records of A: they must be above A's last CP for this test");
    let reply = cluster.admin(1).await.switchover(switchover_request(true)).await.unwrap().into_inner();
    assert!(reply.nvfailed_volumes.is_empty(), "{reply:?}");
    host::check_acknowledged(&cluster.nbd_address(1), &first);
    cluster.start(0);
    cluster.wait_status(0, "A waiting for switchback", |s| s.mode == "waiting-for-switchback").await;
    // B writes every block again, past A's rounds: a replayed record of A would show.
    let load = Workload::start(&cluster.nbd_address(1), "vol_a", BLOCKS);
    load.wait_count(3 * BLOCKS);
    let reply = heal(&cluster, 1).await.unwrap();
    assert_eq!(reply.operation.as_ref().unwrap().state, "successful", "{reply:?}");
    cluster
        .wait_status(1, "aggr_a mirrored and normal after heal", |s| {
            s.aggregates.iter().any(|a| a.name == "aggr_a" && a.state == "mirrored,normal")
        })
        .await;
    let reply = switchback(&cluster, 1, false).await.unwrap();
    assert_eq!(reply.operation.as_ref().unwrap().state, "successful", "{reply:?}");
    assert!(load.wait_ended(Duration::from_secs(30)));
    let second = load.stop();
    cluster.wait_state(0, "serving").await;
    // A's first handshake since the switchback (a lost NVLog's new partition keeps no persisted
    // account until a drop or a re-establish, so `wait_in_sync` does not apply).
    cluster
        .wait_status(0, "A's NVLog mirror session up and in sync", |s| {
            s.dr_mirror.as_ref().is_some_and(|m| m.connected && m.state == MirrorState::InSync as i32)
        })
        .await;
    host::check_acknowledged(&cluster.nbd_address(0), &second);
    // A crash of A before its next CP: its recovery replays its local partition above the
    // switchback's CP.
    cluster.kill(0);
    cluster.start(0);
    cluster.wait_state(0, "serving").await;
    host::check_acknowledged(&cluster.nbd_address(0), &second);
}
