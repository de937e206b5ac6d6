//! The DiskService of real `mc-controller` processes (DESIGN §6.2, §7, §8; S2, S12): plex 1 of
//! A's aggregate lives on B's shelf; calls with a stale epoch, another cluster, another sender,
//! an epoch the sender does not hold, another aggregate or plex, or bad ranges are refused and
//! change nothing; a raised epoch mark survives B's restart.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use common::{BLOCK, CLUSTER, Cluster, Settings, block_data};
use mc_proto::v1::disk_service_client::DiskServiceClient;
use mc_proto::v1::{
    DiskCall, DiskExtent, DiskFlushRequest, DiskReadRequest, DiskWriteRequest, Epoch, Identity,
    ListDisksRequest, OpenDiskRequest, PlexDropRequest,
};
use tonic::Code;
use tonic::transport::Channel;

fn identity(cluster: &[u8], sender: u32, receiver: u32) -> Option<Identity> {
    Some(Identity { cluster_id: cluster.to_vec(), sender_node: sender, receiver_node: receiver })
}

#[derive(Clone)]
struct Call {
    cluster: Vec<u8>,
    sender: u32,
    aggregate: Vec<u8>,
    epoch: (u64, u32),
    plex: u32,
    disk: String,
    handle: u64,
}

impl Call {
    fn wire(&self) -> Option<DiskCall> {
        Some(DiskCall {
            identity: identity(&self.cluster, self.sender, 2),
            aggregate_uuid: self.aggregate.clone(),
            epoch: Some(Epoch { number: self.epoch.0, owner_node: self.epoch.1 }),
            plex_index: self.plex,
            disk: self.disk.clone(),
            handle: self.handle,
        })
    }
}

async fn try_write(
    client: &mut DiskServiceClient<Channel>,
    call: &Call,
    offset: u64,
) -> Result<(), tonic::Status> {
    client
        .write(DiskWriteRequest {
            call: call.wire(),
            offset,
            data: block_data(offset / BLOCK, 0xbad).into(),
            extents: Vec::new(),
        })
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_epochs_strangers_and_bad_calls_are_refused_and_change_nothing() {
    let mut cluster = Cluster::up(&Settings::default(), 4 << 20).await;
    let status = cluster.status(0).await;
    let aggregate = &status.aggregates[0];
    assert_eq!(aggregate.plexes[1].site, "B", "{aggregate:?}");
    assert_eq!(aggregate.state, "mirrored,normal");
    let b_disk = cluster.nodes[1].dir.join("shelf").join("d1");
    assert!(b_disk.exists(), "plex 1's disk is on B's shelf");
    assert!(!cluster.nodes[0].dir.join("shelf").join("d1").exists());
    // A writes through both plexes, then stops cleanly: B's disk is quiet from here.
    let mut data = cluster.data(0).await;
    common::write_at(&mut data, 0, block_data(0, 1)).await.unwrap();
    assert!(cluster.terminate(0));
    let before = std::fs::read(&b_disk).unwrap();

    let mut client = DiskServiceClient::new(cluster.channel(1).await);
    let listed = client.list_disks(ListDisksRequest { identity: identity(&CLUSTER, 1, 2) }).await.unwrap();
    let d1 = listed.into_inner().disks.into_iter().find(|d| d.name == "d1").unwrap();
    assert!(d1.labelled && d1.plex_index == 1 && d1.owner_node == 1 && d1.aggregate_uuid == aggregate.uuid);

    let good = Call {
        cluster: CLUSTER.to_vec(),
        sender: 1,
        aggregate: aggregate.uuid.clone(),
        epoch: (1, 1),
        plex: 1,
        disk: "d1".into(),
        handle: 0,
    };
    let opened = client.open_disk(OpenDiskRequest { call: good.wire(), create_size_bytes: 0 }).await.unwrap();
    let good = Call { handle: opened.into_inner().handle, ..good };
    let offset = 1 << 20;
    let mut other_cluster = CLUSTER.to_vec();
    other_cluster[0] ^= 1;
    let refusals: Vec<(&str, Call, u64, Code)> = vec![
        ("stale epoch", Call { epoch: (0, 1), ..good.clone() }, offset, Code::FailedPrecondition),
        (
            "another cluster",
            Call { cluster: other_cluster, ..good.clone() },
            offset,
            Code::FailedPrecondition,
        ),
        (
            "a short cluster id",
            Call { cluster: vec![1, 2, 3], ..good.clone() },
            offset,
            Code::FailedPrecondition,
        ),
        (
            "another sender",
            Call { sender: 3, epoch: (1, 3), ..good.clone() },
            offset,
            Code::FailedPrecondition,
        ),
        (
            "an epoch of another node",
            Call { epoch: (5, 2), ..good.clone() },
            offset,
            Code::FailedPrecondition,
        ),
        (
            "another aggregate",
            Call { aggregate: vec![7; 16], ..good.clone() },
            offset,
            Code::FailedPrecondition,
        ),
        (
            "a malformed aggregate",
            Call { aggregate: vec![7; 3], ..good.clone() },
            offset,
            Code::InvalidArgument,
        ),
        ("plex 0", Call { plex: 0, ..good.clone() }, offset, Code::FailedPrecondition),
        ("plex 9", Call { plex: 9, ..good.clone() }, offset, Code::InvalidArgument),
        ("a disk not open", Call { disk: "d0".into(), ..good.clone() }, offset, Code::FailedPrecondition),
        ("a misaligned offset", good.clone(), offset + 512, Code::InvalidArgument),
        ("past the end", good.clone(), 1 << 40, Code::InvalidArgument),
        (
            "an earlier opening",
            Call { handle: good.handle - 1, ..good.clone() },
            offset,
            Code::FailedPrecondition,
        ),
    ];
    for (what, call, offset, code) in &refusals {
        let error = try_write(&mut client, call, *offset).await.unwrap_err();
        assert_eq!(error.code(), *code, "{what}: {error:?}");
    }
    let error = client
        .write(DiskWriteRequest {
            call: good.wire(),
            offset,
            data: vec![1u8; (2 << 20) - 4096].into(),
            extents: Vec::new(),
        })
        .await
        .unwrap_err();
    assert!(matches!(error.code(), Code::InvalidArgument | Code::OutOfRange), "oversized: {error:?}");
    // A write of several extents is refused whole when one of them is bad, when it also carries
    // data of its own, or when it has too many: nothing of it is written.
    let extent = |at: u64| DiskExtent { offset: at, data: block_data(at / BLOCK, 0xbad).into() };
    let bad_extents: Vec<(&str, DiskWriteRequest)> = vec![
        (
            "one extent past the end",
            DiskWriteRequest {
                call: good.wire(),
                offset: 0,
                data: Default::default(),
                extents: vec![extent(offset), extent(1 << 40)],
            },
        ),
        (
            "one extent misaligned",
            DiskWriteRequest {
                call: good.wire(),
                offset: 0,
                data: Default::default(),
                extents: vec![extent(offset), extent(offset + 512 + BLOCK)],
            },
        ),
        (
            "extents and data",
            DiskWriteRequest {
                call: good.wire(),
                offset,
                data: vec![1u8; 4096].into(),
                extents: vec![extent(offset + BLOCK)],
            },
        ),
        (
            "too many extents",
            DiskWriteRequest {
                call: good.wire(),
                offset: 0,
                data: Default::default(),
                extents: (0..1025).map(|_| DiskExtent { offset, data: vec![0u8; 512].into() }).collect(),
            },
        ),
    ];
    for (what, request) in bad_extents {
        let error = client.write(request).await.unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{what}: {error:?}");
    }
    let error =
        client.read(DiskReadRequest { call: good.wire(), offset, length: 64 << 20 }).await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument, "oversized read: {error:?}");
    let error = client
        .record_plex_drop(PlexDropRequest {
            call: Call { epoch: (0, 1), disk: String::new(), ..good.clone() }.wire(),
            dropped_plex: 1,
            reason: "timeout".into(),
            survivor_generation: 9,
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition, "stale drop: {error:?}");
    // Opening a disk of another aggregate, or for another plex, is refused too.
    let error = client
        .open_disk(OpenDiskRequest { call: Call { plex: 0, ..good.clone() }.wire(), create_size_bytes: 0 })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition, "{error:?}");
    assert_eq!(std::fs::read(&b_disk).unwrap(), before, "a refused call changed the disk");

    // A higher epoch of the caller raises the mark (a switchover would); from then on the old
    // epoch is stale, and stays so after B restarts (the mark was persisted first, DESIGN §7).
    let raised = Call { epoch: (2, 1), ..good.clone() };
    client.flush(DiskFlushRequest { call: raised.wire() }).await.unwrap();
    let error = try_write(&mut client, &good, offset).await.unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition, "{error:?}");
    assert!(error.message().contains("stale epoch"), "{error:?}");
    assert!(cluster.terminate(1));
    cluster.start(1);
    let mut client = DiskServiceClient::new(cluster.channel(1).await);
    let error =
        client.open_disk(OpenDiskRequest { call: good.wire(), create_size_bytes: 0 }).await.unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition, "after restart: {error:?}");
    assert_eq!(std::fs::read(&b_disk).unwrap(), before, "a refused call changed the disk");
    // The raised epoch is served, and a write it makes is durable when answered. The handle of
    // B's earlier life is refused.
    let error = try_write(&mut client, &raised, offset).await.unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition, "a handle of B's earlier life: {error:?}");
    let opened =
        client.open_disk(OpenDiskRequest { call: raised.wire(), create_size_bytes: 0 }).await.unwrap();
    let raised = Call { handle: opened.into_inner().handle, ..raised };
    try_write(&mut client, &raised, offset).await.unwrap();
    let read = client.read(DiskReadRequest { call: raised.wire(), offset, length: BLOCK }).await.unwrap();
    assert_eq!(read.into_inner().data.to_vec(), block_data(offset / BLOCK, 0xbad));
    // Several extents in one call all land.
    let extents: Vec<DiskExtent> = [3u64, 9, 4]
        .iter()
        .map(|i| DiskExtent { offset: offset + i * BLOCK, data: block_data(offset / BLOCK + i, 7).into() })
        .collect();
    client
        .write(DiskWriteRequest { call: raised.wire(), offset: 0, data: Default::default(), extents })
        .await
        .unwrap();
    for i in [3u64, 9, 4] {
        let at = offset + i * BLOCK;
        let read =
            client.read(DiskReadRequest { call: raised.wire(), offset: at, length: BLOCK }).await.unwrap();
        assert_eq!(read.into_inner().data.to_vec(), block_data(at / BLOCK, 7), "extent {i}");
    }
}
