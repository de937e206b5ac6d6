//! A 2-node cluster of real `mc-controller` processes (DESIGN §4, §5, §8; S1, S2, S8, S12,
//! S13): the write path mirrored to the DR partner, CPs, `kill -9` and restart, lost and torn
//! NVLogs, a partner that loses its copy, and garbage on the gRPC endpoints.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{BLOCK, CLUSTER, Cluster, Model, Settings, block_data, workload};
use mc_proto::v1::{MirrorState, ReadRequest, WriteRequest};

const VOLUME_BYTES: u64 = 16 << 20;
const BLOCKS: u64 = VOLUME_BYTES / BLOCK;

async fn write(cluster: &Cluster, i: usize, block: u64, write: u64) -> Result<u64, tonic::Status> {
    let mut data = cluster.data(i).await;
    data.write(WriteRequest {
        cluster_id: CLUSTER.to_vec(),
        volume: "vol_a".into(),
        offset: block * BLOCK,
        data: block_data(block, write),
    })
    .await
    .map(|r| r.into_inner().last_lsn)
}

fn mirror_state(status: &mc_proto::v1::StatusReply) -> MirrorState {
    let partner = status.partitions.iter().find(|p| p.kind == "dr_partner").unwrap();
    MirrorState::try_from(partner.mirror_state).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_mirrored_read_back_and_survive_a_clean_restart() {
    let mut cluster = Cluster::new(&Settings::default());
    cluster.start(0);
    // Without its DR partner, A stays fenced and says why (S2).
    let fenced = cluster.wait_state(0, "fenced").await;
    assert!(fenced.state_reason.contains("DR partner"), "{}", fenced.state_reason);
    let refused = write(&cluster, 0, 0, 1).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    cluster.start(1);
    cluster.wait_state(0, "serving").await;
    cluster.wait_state(1, "serving").await;
    cluster.create_volume(0, VOLUME_BYTES).await;
    let mut model = Model::default();
    for n in 0..200u64 {
        let block = (n * 7919) % (BLOCKS - 8);
        model.sent(block, n + 1);
        write(&cluster, 0, block, n + 1).await.unwrap();
        model.acked(block, n + 1);
    }
    // Partial-block and cross-block writes merge with what is there.
    let mut data = cluster.data(0).await;
    let odd = vec![0x5a; 6000];
    let tail = (BLOCKS - 4) * BLOCK;
    data.write(WriteRequest {
        cluster_id: CLUSTER.to_vec(),
        volume: "vol_a".into(),
        offset: tail + 1000,
        data: odd.clone(),
    })
    .await
    .unwrap();
    let read = |offset: u64, length: u64| ReadRequest {
        cluster_id: CLUSTER.to_vec(),
        volume: "vol_a".into(),
        offset,
        length,
    };
    let back = data.read(read(tail, 3 * BLOCK)).await.unwrap().into_inner().data;
    assert_eq!(&back[1000..7000], &odd[..]);
    assert!(back[..1000].iter().all(|&b| b == 0) && back[7000..].iter().all(|&b| b == 0));
    data.write(WriteRequest {
        cluster_id: CLUSTER.to_vec(),
        volume: "vol_a".into(),
        offset: tail,
        data: vec![0; 3 * BLOCK as usize],
    })
    .await
    .unwrap();
    assert_eq!(model.check(&mut data, "vol_a").await, model.blocks.len());
    // B holds A's records and counts itself in sync once a CP covered the start (S13).
    let b = cluster.wait_status(1, "B's copy in sync", |s| mirror_state(s) == MirrorState::InSync).await;
    let a = cluster.wait_status(0, "a CP", |s| s.cp.as_ref().unwrap().completed > 0).await;
    assert_eq!(a.dr_mirror.as_ref().unwrap().state, MirrorState::InSync as i32, "{a:#?}");
    assert_eq!(b.aggregates.len(), 0);
    assert_eq!(a.aggregates[0].volumes[0].name, "vol_a");
    assert_eq!(a.aggregates[0].state, "mirrored,normal");
    // A clean stop (final CP) and restart: everything is still there.
    assert!(cluster.terminate(0));
    cluster.start(0);
    cluster.wait_state(0, "serving").await;
    let mut data = cluster.data(0).await;
    model.check(&mut data, "vol_a").await;
}

/// `kill -9` of the writer at random moments under a workload (20 cycles): after each restart
/// every acknowledged write reads back (S1, S8).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_writer_loses_no_acknowledged_write() {
    let mut cluster = Cluster::new(&Settings { cp_interval_ms: 300, ..Settings::default() });
    cluster.start(0);
    cluster.start(1);
    cluster.wait_state(0, "serving").await;
    cluster.create_volume(0, VOLUME_BYTES).await;
    let model = Arc::new(Mutex::new(Model::default()));
    let mut next_write = 1u64;
    for cycle in 0..20u64 {
        let stop = Arc::new(AtomicBool::new(false));
        let data = cluster.data(0).await;
        let load = tokio::spawn(workload(data, "vol_a", 512, 8, model.clone(), stop.clone(), next_write));
        let run_ms = 150 + rand::random::<u64>() % 600;
        tokio::time::sleep(Duration::from_millis(run_ms)).await;
        cluster.kill(0);
        stop.store(true, Ordering::Relaxed);
        load.await.unwrap();
        next_write += 1_000_000;
        cluster.start(0);
        cluster.wait_state(0, "serving").await;
        let snapshot = model.lock().unwrap().clone();
        let mut data = cluster.data(0).await;
        let checked = snapshot.check(&mut data, "vol_a").await;
        assert!(checked > 0 || cycle == 0);
    }
    let acked = model.lock().unwrap().acked;
    assert!(acked > 100, "only {acked} writes were acknowledged");
}
