//! `Admin.ModifyVolume` and `Admin.DeleteVolume` (DESIGN §9, §11) against a 2-node cluster of
//! real daemons: NVFAIL options set and kept across a `kill -9`, the refusals an operator gets
//! (entering the NVFAILed state by hand, clearing or deleting without `--confirm`), a deleted
//! volume gone from status, the data API and the NBD export, its id never reused, and a restart
//! that replays the deleted volume's records skipping them instead of taking every volume
//! offline. (The NVFAILed state itself is entered only by the switchover code; its refusals are
//! unit tests of `nvfail`, `nbd::negotiate` and `nbd::server`.)
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::BufMut;
use common::{BLOCK, CLUSTER, Cluster, Settings, block_data};
use controller::nbd::codec;
use mc_proto::v1::{
    CreateVolumeRequest, DeleteVolumeRequest, ModifyVolumeRequest, ReadRequest, StatusReply, VolumeInfo,
    WriteRequest,
};
use tonic::Code;

const MIB: u64 = 1 << 20;

fn volume<'a>(status: &'a StatusReply, name: &str) -> Option<&'a VolumeInfo> {
    status.aggregates.iter().flat_map(|a| a.volumes.iter()).find(|v| v.name == name)
}

fn modify(name: &str) -> ModifyVolumeRequest {
    ModifyVolumeRequest {
        cluster_id: CLUSTER.to_vec(),
        name: name.into(),
        nvfail: None,
        dr_force_nvfail: None,
        in_nvfailed_state: None,
        confirmed: false,
    }
}

fn delete(name: &str, confirmed: bool) -> DeleteVolumeRequest {
    DeleteVolumeRequest { cluster_id: CLUSTER.to_vec(), name: name.into(), confirmed }
}

async fn write(cluster: &Cluster, volume: &str, block: u64, n: u64) -> Result<u64, tonic::Status> {
    let request = WriteRequest {
        cluster_id: CLUSTER.to_vec(),
        volume: volume.into(),
        offset: block * BLOCK,
        data: block_data(block, n),
    };
    cluster.data(0).await.write(request).await.map(|r| r.into_inner().last_lsn)
}

async fn read(cluster: &Cluster, volume: &str, block: u64) -> Result<Vec<u8>, tonic::Status> {
    let request = ReadRequest {
        cluster_id: CLUSTER.to_vec(),
        volume: volume.into(),
        offset: block * BLOCK,
        length: BLOCK,
    };
    cluster.data(0).await.read(request).await.map(|r| r.into_inner().data)
}

/// The reply type the NBD server gives to `NBD_OPT_GO` on `name`.
fn nbd_go_reply(address: &str, name: &str) -> u32 {
    let mut stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    stream.write_all(&3u32.to_be_bytes()).unwrap();
    let mut data = Vec::new();
    data.put_u32(name.len() as u32);
    data.put_slice(name.as_bytes());
    data.put_u16(0);
    let mut option = Vec::new();
    option.put_u64(codec::IHAVEOPT);
    option.put_u32(codec::OPT_GO);
    option.put_u32(data.len() as u32);
    option.put_slice(&data);
    stream.write_all(&option).unwrap();
    loop {
        let mut header = [0u8; 20];
        stream.read_exact(&mut header).unwrap();
        let kind = u32::from_be_bytes(header[12..16].try_into().unwrap());
        let length = u32::from_be_bytes(header[16..20].try_into().unwrap()) as usize;
        let mut body = vec![0u8; length];
        stream.read_exact(&mut body).unwrap();
        if kind != codec::REP_INFO {
            return kind;
        }
    }
}

/// Options on and off, kept across a `kill -9`; the refusals of `ModifyVolume`. Prevents an
/// operator from NVFAILing a volume by hand, clearing the state without acknowledging the
/// possible loss, or options that are lost at a restart (S9's default would silently return).
#[tokio::test]
async fn modify_volume_sets_options_durably_and_refuses_what_it_must() {
    let mut cluster = Cluster::up(&Settings::default(), 16 * MIB).await;
    let mut admin = cluster.admin(0).await;
    let fresh = cluster.status(0).await;
    let vol = volume(&fresh, "vol_a").unwrap();
    assert!(vol.nvfail && !vol.dr_force_nvfail && !vol.in_nvfailed_state, "{vol:#?}");
    assert_eq!(vol.state, "online");

    let off = admin
        .modify_volume(ModifyVolumeRequest { nvfail: Some(false), ..modify("vol_a") })
        .await
        .unwrap()
        .into_inner();
    assert!(!off.nvfail && !off.dr_force_nvfail && !off.in_nvfailed_state, "{off:#?}");
    let forced = admin
        .modify_volume(ModifyVolumeRequest { dr_force_nvfail: Some(true), ..modify("vol_a") })
        .await
        .unwrap()
        .into_inner();
    assert!(!forced.nvfail && forced.dr_force_nvfail, "a change of one option keeps the other: {forced:#?}");
    assert_eq!(forced.state, "online");

    // Entering the state is the controller's decision, with or without --confirm.
    for confirmed in [false, true] {
        let refused = admin
            .modify_volume(ModifyVolumeRequest {
                in_nvfailed_state: Some(true),
                confirmed,
                ..modify("vol_a")
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    }
    // Clearing needs --confirm.
    let refused = admin
        .modify_volume(ModifyVolumeRequest { in_nvfailed_state: Some(false), ..modify("vol_a") })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("--confirm"), "{refused:?}");
    let cleared = admin
        .modify_volume(ModifyVolumeRequest {
            in_nvfailed_state: Some(false),
            confirmed: true,
            ..modify("vol_a")
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!cleared.in_nvfailed_state && cleared.state == "online", "{cleared:#?}");
    let refused = admin.modify_volume(modify("vol_a")).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "nothing to change: {refused:?}");
    let refused =
        admin.modify_volume(ModifyVolumeRequest { nvfail: Some(true), ..modify("nope") }).await.unwrap_err();
    assert_eq!(refused.code(), Code::NotFound, "{refused:?}");
    // The refusals changed nothing.
    let status = cluster.status(0).await;
    let vol = volume(&status, "vol_a").unwrap();
    assert!(!vol.nvfail && vol.dr_force_nvfail && !vol.in_nvfailed_state, "{vol:#?}");
    // The daemon registered the counters; a no-op clear counts nothing.
    let metrics = cluster.scrape(0);
    assert!(metrics.contains("controller_nvfail_cleared_total 0"), "{metrics}");
    assert!(metrics.contains("controller_nvfail_possible_rollbacks_total 0"), "{metrics}");

    // The options are in the volume table: a kill -9 and restart keeps them.
    cluster.kill(0);
    cluster.start(0);
    let status = cluster.wait_state(0, "serving").await;
    let vol = volume(&status, "vol_a").unwrap();
    assert!(!vol.nvfail && vol.dr_force_nvfail && !vol.in_nvfailed_state, "{vol:#?}");
    let mut admin = cluster.admin(0).await;
    let on = admin
        .modify_volume(ModifyVolumeRequest {
            nvfail: Some(true),
            dr_force_nvfail: Some(false),
            ..modify("vol_a")
        })
        .await
        .unwrap()
        .into_inner();
    assert!(on.nvfail && !on.dr_force_nvfail, "{on:#?}");
    assert!(!cluster.log(0).contains("panicked"), "{}", cluster.log(0));
}

/// `DeleteVolume`: refused without `--confirm`; then the volume is gone from status, the data
/// API and the NBD export, its id is not reused, and its records still in the NVLog are
/// skipped by the replay after a `kill -9` (before, a record of an unknown volume took every
/// volume of the node offline) and never land in the volume that took its place.
#[tokio::test]
async fn delete_volume_removes_it_and_a_restart_skips_its_records() {
    // No periodic CP: the deleted volume's records stay in the NVLog until the restart.
    let settings = Settings { cp_interval_ms: 600_000, ..Settings::default() };
    let mut cluster = Cluster::up(&settings, 8 * MIB).await;
    let mut admin = cluster.admin(0).await;
    admin
        .create_volume(CreateVolumeRequest {
            cluster_id: CLUSTER.to_vec(),
            aggregate: "aggr_a".into(),
            name: "vol_b".into(),
            size_bytes: 8 * MIB,
        })
        .await
        .unwrap();
    let vol_b_id = volume(&cluster.status(0).await, "vol_b").unwrap().id;
    for n in 0..20u64 {
        write(&cluster, "vol_a", n, n + 1).await.unwrap();
        write(&cluster, "vol_b", n, n + 1000).await.unwrap();
    }

    let refused = admin.delete_volume(delete("vol_b", false)).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("--confirm"), "{refused:?}");
    assert!(volume(&cluster.status(0).await, "vol_b").is_some(), "a refused delete deleted");
    assert_eq!(nbd_go_reply(&cluster.nbd_address(0), "vol_b"), codec::REP_ACK);

    admin.delete_volume(delete("vol_b", true)).await.unwrap();
    let status = cluster.status(0).await;
    assert!(volume(&status, "vol_b").is_none(), "{status:#?}");
    assert_eq!(volume(&status, "vol_a").unwrap().state, "online");
    let gone = write(&cluster, "vol_b", 0, 1).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    assert_eq!(nbd_go_reply(&cluster.nbd_address(0), "vol_b"), codec::REP_ERR_UNKNOWN);
    assert_eq!(nbd_go_reply(&cluster.nbd_address(0), "vol_a"), codec::REP_ACK);
    let again = admin.delete_volume(delete("vol_b", true)).await.unwrap_err();
    assert_eq!(again.code(), Code::NotFound, "{again:?}");

    // A new volume takes the freed extent but not the id.
    let vol_c = admin
        .create_volume(CreateVolumeRequest {
            cluster_id: CLUSTER.to_vec(),
            aggregate: "aggr_a".into(),
            name: "vol_c".into(),
            size_bytes: 8 * MIB,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(vol_c.id > vol_b_id, "id {} reused (vol_b had {vol_b_id})", vol_c.id);
    let mut vol_c_before = Vec::new();
    for n in 0..20u64 {
        vol_c_before.push(read(&cluster, "vol_c", n).await.unwrap());
    }

    // The deleted volume's records are still held, above the last CP: the replay meets them.
    let covered = cluster.status(0).await.aggregates[0].last_cp_lsn;
    let held = cluster.records(0, "local").await;
    let of_b = held.iter().filter(|r| r.volume_id == vol_b_id && r.lsn > covered).count();
    assert_eq!(of_b, 20, "vol_b's records above the last CP {covered}: {held:#?}");

    cluster.kill(0);
    cluster.start(0);
    let status = cluster.wait_state(0, "serving").await;
    for name in ["vol_a", "vol_c"] {
        let vol = volume(&status, name).unwrap();
        assert_eq!(vol.state, "online", "{vol:#?}\n{}", cluster.log(0));
    }
    assert!(volume(&status, "vol_b").is_none(), "{status:#?}");
    assert!(status.cp.as_ref().unwrap().replayed_records >= 20, "{status:#?}");
    for n in 0..20u64 {
        assert_eq!(read(&cluster, "vol_a", n).await.unwrap(), block_data(n, n + 1), "vol_a block {n}");
        assert_eq!(read(&cluster, "vol_c", n).await.unwrap(), vol_c_before[n as usize], "vol_c block {n}");
    }
    assert!(!cluster.log(0).contains("panicked"), "{}", cluster.log(0));
}

/// Makes A lose acknowledged writes the way S8 cannot recover: B loses its copy (it rejoins
/// `resyncing`), A writes once more, then A is killed and loses its NVLog; A restarts with an
/// incomplete copy, so the controller itself NVFAILs A's volumes by rule (d).
async fn lose_records(cluster: &mut Cluster) {
    for n in 1..=20u64 {
        write(cluster, "vol_a", n, n).await.unwrap();
    }
    cluster.kill(1);
    std::fs::remove_file(cluster.nodes[1].nvlog()).unwrap();
    cluster.start(1);
    cluster
        .wait_status(1, "B's receiver resyncing", |s| {
            s.partitions.iter().any(|p| {
                p.kind == "dr_partner" && p.mirror_state == mc_proto::v1::MirrorState::Resyncing as i32
            })
        })
        .await;
    write(cluster, "vol_a", 0, 21).await.unwrap();
    cluster.kill(0);
    std::fs::remove_file(cluster.nodes[0].nvlog()).unwrap();
    cluster.start(0);
    cluster.wait_state(0, "serving").await;
}

/// End to end, with the state entered by the controller (S8's rule (d)): an NVFAILed volume
/// is shown as such with how to clear it, refuses data-API I/O with `FAILED_PRECONDITION` and
/// new NBD connections with `NBD_REP_ERR_POLICY`, keeps refusing after a refused clear, and
/// serves again once cleared with `--confirm`; entering and clearing are counted. Prevents a
/// volume that may have lost acknowledged writes from being served silently (S9).
#[tokio::test]
async fn an_nvfailed_volume_refuses_io_until_cleared_with_confirm() {
    let settings = Settings { cp_interval_ms: 60_000, ..Settings::default() };
    let mut cluster = Cluster::up(&settings, 8 * MIB).await;
    lose_records(&mut cluster).await;
    let status = cluster.status(0).await;
    let vol = volume(&status, "vol_a").unwrap();
    assert_eq!(vol.state, "nvfailed", "{vol:#?}\n{}", cluster.log(0));
    assert!(vol.in_nvfailed_state && vol.nvfail, "{vol:#?}");
    assert!(vol.reason.contains("mcctl volume modify vol_a --in-nvfailed-state false --confirm"), "{vol:#?}");
    let refused = write(&cluster, "vol_a", 0, 22).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("--in-nvfailed-state false --confirm"), "{refused:?}");
    assert_eq!(read(&cluster, "vol_a", 0).await.unwrap_err().code(), Code::FailedPrecondition);
    assert_eq!(nbd_go_reply(&cluster.nbd_address(0), "vol_a"), codec::REP_ERR_POLICY);
    let metrics = cluster.scrape(0);
    assert!(metrics.contains("controller_nvfail_entered_total{rule=\"d\"} 1"), "{metrics}");

    let mut admin = cluster.admin(0).await;
    let refused = admin
        .modify_volume(ModifyVolumeRequest { in_nvfailed_state: Some(false), ..modify("vol_a") })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(volume(&cluster.status(0).await, "vol_a").unwrap().state, "nvfailed");
    assert_eq!(nbd_go_reply(&cluster.nbd_address(0), "vol_a"), codec::REP_ERR_POLICY);

    let cleared = admin
        .modify_volume(ModifyVolumeRequest {
            in_nvfailed_state: Some(false),
            confirmed: true,
            ..modify("vol_a")
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!cleared.in_nvfailed_state && cleared.state == "online", "{cleared:#?}");
    write(&cluster, "vol_a", 0, 23).await.unwrap();
    assert_eq!(read(&cluster, "vol_a", 0).await.unwrap(), block_data(0, 23));
    assert_eq!(nbd_go_reply(&cluster.nbd_address(0), "vol_a"), codec::REP_ACK);
    let metrics = cluster.scrape(0);
    assert!(metrics.contains("controller_nvfail_cleared_total 1"), "{metrics}");
    assert!(cluster.log(0).contains("NVFAILed state cleared by the operator"), "{}", cluster.log(0));
    // Cleared durably: a restart keeps it online.
    cluster.kill(0);
    cluster.start(0);
    let status = cluster.wait_state(0, "serving").await;
    assert_eq!(volume(&status, "vol_a").unwrap().state, "online", "{status:#?}");
}

/// With `nvfail off`, the same loss leaves the volume online but is logged at ERROR as a
/// possible rollback and counted (S9: never silent).
#[tokio::test]
async fn nvfail_off_logs_and_counts_a_possible_rollback() {
    let settings = Settings { cp_interval_ms: 60_000, ..Settings::default() };
    let mut cluster = Cluster::up(&settings, 8 * MIB).await;
    let mut admin = cluster.admin(0).await;
    admin.modify_volume(ModifyVolumeRequest { nvfail: Some(false), ..modify("vol_a") }).await.unwrap();
    lose_records(&mut cluster).await;
    let status = cluster.status(0).await;
    let vol = volume(&status, "vol_a").unwrap();
    assert_eq!(vol.state, "online", "{vol:#?}");
    assert!(!vol.in_nvfailed_state && !vol.nvfail, "{vol:#?}");
    let metrics = cluster.scrape(0);
    assert!(metrics.contains("controller_nvfail_possible_rollbacks_total 1"), "{metrics}");
    assert!(!metrics.contains("controller_nvfail_entered_total{"), "{metrics}");
    assert!(cluster.log(0).contains("possible rollback"), "{}", cluster.log(0));
    write(&cluster, "vol_a", 0, 22).await.unwrap();
}
