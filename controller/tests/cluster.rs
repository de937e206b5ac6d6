//! A 2-node cluster of real `mc-controller` processes (DESIGN §4, §4.1, §4.2, §5, §6, §8; S1,
//! S2, S3, S4, S5, S8, S12, S13): the write path mirrored to the DR partner, CPs, `kill -9` and
//! restart, lost and torn NVLogs, a partner that loses its copy, garbage on the gRPC endpoints,
//! and the inter-site link through the fault-injecting proxy: cuts shorter and longer than the
//! mirror timeout, both ways and one way, a gray partner, a partner killed for longer than the
//! timeout, and a link flapping during a resync (plex 1 is on B's shelf).
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{BLOCK, CLUSTER, Cluster, Model, Settings, block_data, wait_acked, workload, workload_in};
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
    // Trim and write-zeroes: the ranges read as zeroes, before and after the restart below.
    let zero = |offset: u64, length: u64| mc_proto::v1::RangeRequest {
        cluster_id: CLUSTER.to_vec(),
        volume: "vol_a".into(),
        offset,
        length,
    };
    let trimmed = (BLOCKS - 8) * BLOCK;
    data.write(WriteRequest {
        cluster_id: CLUSTER.to_vec(),
        volume: "vol_a".into(),
        offset: trimmed,
        data: vec![7; 4 * BLOCK as usize],
    })
    .await
    .unwrap();
    data.trim(zero(trimmed + 100, BLOCK)).await.unwrap();
    data.write_zeroes(zero(trimmed + 2 * BLOCK, 2 * BLOCK)).await.unwrap();
    let expect_trimmed = |back: &[u8]| {
        assert!(back[..100].iter().all(|&b| b == 7));
        assert!(back[100..100 + BLOCK as usize].iter().all(|&b| b == 0));
        assert!(back[100 + BLOCK as usize..2 * BLOCK as usize].iter().all(|&b| b == 7));
        assert!(back[2 * BLOCK as usize..].iter().all(|&b| b == 0));
    };
    expect_trimmed(&data.read(read(trimmed, 4 * BLOCK)).await.unwrap().into_inner().data);
    assert_eq!(model.check(&mut data, "vol_a").await, model.blocks.len());
    // B holds A's records and counts itself in sync once a CP covered the start (S13).
    let b = cluster.wait_status(1, "B's copy in sync", |s| mirror_state(s) == MirrorState::InSync).await;
    let a = cluster.wait_status(0, "a CP", |s| s.cp.as_ref().unwrap().completed > 0).await;
    assert_eq!(a.dr_mirror.as_ref().unwrap().state, MirrorState::InSync as i32, "{a:#?}");
    assert_eq!(b.aggregates.len(), 0);
    assert_eq!(a.aggregates[0].volumes[0].name, "vol_a");
    assert_eq!(a.aggregates[0].state, "mirrored,normal");
    let metrics = cluster.scrape(0);
    for line in [
        "controller_node_phase{phase=\"serving\"} 1",
        "controller_mirror_connected 1",
        "controller_cps_completed ",
        "controller_nvlog_used_bytes{partition=\"local\",writer=\"1\"}",
    ] {
        assert!(metrics.contains(line), "no {line:?} in\n{metrics}");
    }
    // A clean stop (final CP) and restart: everything is still there.
    assert!(cluster.terminate(0));
    cluster.start(0);
    cluster.wait_state(0, "serving").await;
    let mut data = cluster.data(0).await;
    model.check(&mut data, "vol_a").await;
    expect_trimmed(&data.read(read(trimmed, 4 * BLOCK)).await.unwrap().into_inner().data);
    // And after a kill -9, from the NVLog (trims replayed too).
    data.trim(zero(trimmed + 100, BLOCK)).await.unwrap();
    data.write_zeroes(zero(trimmed + 2 * BLOCK, 2 * BLOCK)).await.unwrap();
    cluster.kill(0);
    cluster.start(0);
    cluster.wait_state(0, "serving").await;
    let mut data = cluster.data(0).await;
    model.check(&mut data, "vol_a").await;
    expect_trimmed(&data.read(read(trimmed, 4 * BLOCK)).await.unwrap().into_inner().data);
}

/// `kill -9` of the writer at random moments under a workload (20 cycles): after each restart
/// every acknowledged write reads back (S1, S8).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_writer_loses_no_acknowledged_write() {
    let mut cluster =
        Cluster::up(&Settings { cp_interval_ms: 300, ..Settings::default() }, VOLUME_BYTES).await;
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

/// Kill A for good after acknowledged writes: every acknowledged write not covered by a CP is
/// in B's `dr_partner` partition, readable through B's Admin API (S1, S8).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partner_holds_every_acknowledged_write_not_covered_by_a_cp() {
    // In `power` mode on both nodes: group-committed msyncs at the writer and the receiver.
    let mut cluster = Cluster::up(
        &Settings { cp_interval_ms: 60_000, durability: "power", ..Settings::default() },
        VOLUME_BYTES,
    )
    .await;
    let mut data = cluster.data(0).await;
    let mut acked = Vec::new();
    for n in 1..=300u64 {
        let block = (n * 31) % BLOCKS;
        let lsn = common::write_at(&mut data, block * BLOCK, block_data(block, n)).await.unwrap();
        acked.push((lsn, block, n));
    }
    let covered = cluster.status(0).await.cp.unwrap().last_lsn;
    cluster.kill(0);
    let held = cluster.records(1, "dr_partner").await;
    let mut found = 0;
    for (lsn, block, n) in acked.iter().filter(|(lsn, _, _)| *lsn > covered) {
        let record = held.iter().find(|r| r.lsn == *lsn).unwrap_or_else(|| panic!("lsn {lsn} is not at B"));
        assert_eq!(record.writer_node, 1);
        assert_eq!(record.op, "write");
        assert_eq!(record.offset, block * BLOCK);
        assert_eq!(record.payload, block_data(*block, *n), "lsn {lsn}");
        found += 1;
    }
    assert!(found >= 250, "only {found} writes were above the last CP {covered}");
}

/// Writes 300 records to 60 blocks (each block overwritten five times, with a clean restart
/// and its final CP halfway), kills A, changes its
/// NVLog with `change`, restarts A: A adopts B's records above its recovered tail (S8), every
/// block holds its last acknowledged value, exactly the records above the last CP are replayed
/// (none twice), and A goes on writing with new lsns that B accepts.
async fn restart_after(change: impl FnOnce(&Cluster, &[u8])) {
    let mut cluster =
        Cluster::up(&Settings { cp_interval_ms: 60_000, ..Settings::default() }, VOLUME_BYTES).await;
    let mut data = cluster.data(0).await;
    let mut model = Model::default();
    let mut last = (0, Vec::new());
    for n in 1..=300u64 {
        let block = n % 60;
        model.sent(block, n);
        let lsn = common::write_at(&mut data, block * BLOCK, block_data(block, n)).await.unwrap();
        model.acked(block, n);
        last = (lsn, block_data(block, n));
        if n == 150 {
            // A clean restart in the middle: its final CP covers the first half.
            assert!(cluster.terminate(0));
            cluster.start(0);
            cluster.wait_state(0, "serving").await;
            data = cluster.data(0).await;
        }
    }
    let before = cluster.status(0).await;
    let covered = before.aggregates[0].last_cp_lsn;
    assert!(covered >= 150, "{before:#?}");
    cluster.kill(0);
    change(&cluster, &last.1);
    cluster.start(0);
    let after = cluster.wait_state(0, "serving").await;
    let mut data = cluster.data(0).await;
    model.check(&mut data, "vol_a").await;
    assert_eq!(
        after.cp.unwrap().replayed_records,
        last.0 - covered,
        "every record above the CP exactly once"
    );
    let lsn = common::write_at(&mut data, 0, block_data(0, 1000)).await.unwrap();
    assert!(lsn > last.0, "new lsn {lsn} is not above {}", last.0);
    let at_b = cluster.records(1, "dr_partner").await;
    let lsns: Vec<u64> = at_b.iter().map(|r| r.lsn).collect();
    assert!(lsns.windows(2).all(|w| w[0] < w[1]), "B's lsns are not strictly increasing: {lsns:?}");
    assert!(lsns.contains(&lsn));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_with_a_torn_tail_adopts_the_partners_records() {
    restart_after(|cluster, last| {
        assert!(common::damage(&cluster.nodes[0].nvlog(), last), "the last record is in A's NVLog");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_whose_nvlog_was_deleted_adopts_the_partners_records() {
    restart_after(|cluster, _| std::fs::remove_file(cluster.nodes[0].nvlog()).unwrap()).await;
}

/// B killed and its NVLog file deleted, back within seconds: B's copy is `resyncing` (not
/// `in_sync`) at B and at A until a CP covers the restart point, then `in_sync` (S13, §4.2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_that_lost_its_nvlog_is_resyncing_until_the_covering_cp() {
    let mut cluster =
        Cluster::up(&Settings { cp_interval_ms: 60_000, ..Settings::default() }, VOLUME_BYTES).await;
    let mut data = cluster.data(0).await;
    for n in 1..=50u64 {
        common::write_at(&mut data, n * BLOCK, block_data(n, n)).await.unwrap();
    }
    cluster.wait_status(1, "B in sync", |s| mirror_state(s) == MirrorState::InSync).await;
    cluster.kill(1);
    std::fs::remove_file(cluster.nodes[1].nvlog()).unwrap();
    cluster.start(1);
    let b = cluster.wait_status(1, "B resyncing", |s| mirror_state(s) == MirrorState::Resyncing).await;
    let partition = b.partitions.iter().find(|p| p.kind == "dr_partner").unwrap();
    assert_eq!(partition.writer_node, 1);
    assert!(!partition.copy_complete && partition.copy_note.starts_with("incomplete"), "{partition:?}");
    // A resent what it holds above B's (empty) tail, but B stays resyncing: no CP yet.
    let a = cluster
        .wait_status(0, "A resyncing and connected", |s| {
            let m = s.dr_mirror.as_ref().unwrap();
            m.connected && m.state == MirrorState::Resyncing as i32
        })
        .await;
    let from = a.dr_mirror.unwrap().resync_from_lsn;
    assert!(from > 50, "resync from {from}");
    common::write_at(&mut data, 0, block_data(0, 51)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        mirror_state(&cluster.status(1).await),
        MirrorState::Resyncing,
        "in sync before the covering CP"
    );
    // Half a partition of writes starts a CP (DESIGN §4), which covers the restart point.
    for n in 0..6u64 {
        common::write_at(&mut data, (1 << 20) * (n + 2), vec![n as u8; 1 << 20]).await.unwrap();
    }
    let b =
        cluster.wait_status(1, "B in sync after the CP", |s| mirror_state(s) == MirrorState::InSync).await;
    assert!(b.partitions.iter().find(|p| p.kind == "dr_partner").unwrap().copy_complete);
    let a = cluster
        .wait_status(0, "A in sync", |s| s.dr_mirror.as_ref().unwrap().state == MirrorState::InSync as i32)
        .await;
    assert!(a.cp.unwrap().last_lsn >= from - 1);
    let back = common::read_at(&mut data, 0, BLOCK).await.unwrap();
    assert_eq!(back, block_data(0, 51));
}

/// A partner that stops answering (SIGSTOP) stalls writes for `mirror_timeout`; then, nothing
/// having been heard from it, it is dropped (S3, DESIGN §4.1): the drop is persisted at A
/// before the write is acknowledged, and writes go on with the local copy. When it answers
/// again, the mirror is re-established as `resyncing` and is `in_sync` after the covering CP,
/// at both ends (§4.2, S13).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_partner_is_dropped_after_the_mirror_timeout_and_re_established_when_back() {
    let cluster =
        Cluster::up(&Settings { mirror_timeout_ms: 4000, ..Settings::default() }, VOLUME_BYTES).await;
    let mut data = cluster.data(0).await;
    common::write_at(&mut data, 0, block_data(0, 1)).await.unwrap();
    cluster.signal(1, libc::SIGSTOP);
    let started = std::time::Instant::now();
    common::write_at(&mut data, 0, block_data(0, 2)).await.unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(3900),
        "acknowledged after {waited:?}, before the mirror timeout"
    );
    // Recorded at A (persisted in its own partition's header) before the acknowledgement.
    let a = cluster.status(0).await;
    let local = a.partitions.iter().find(|p| p.kind == "local").unwrap();
    assert_eq!(local.mirror_state, MirrorState::OutOfSync as i32, "{a:#?}");
    assert_eq!(a.dr_mirror.as_ref().unwrap().state, MirrorState::OutOfSync as i32, "{a:#?}");
    // Writes go on at once while the partner is out of the ack set.
    let started = std::time::Instant::now();
    for n in 3..20u64 {
        common::write_at(&mut data, n * BLOCK, block_data(n, n)).await.unwrap();
    }
    assert!(started.elapsed() < Duration::from_secs(3), "writes stalled after the drop");
    cluster.signal(1, libc::SIGCONT);
    cluster
        .wait_status(0, "A re-established and in sync", |s| {
            s.dr_mirror.as_ref().unwrap().state == MirrorState::InSync as i32
                && s.partitions
                    .iter()
                    .any(|p| p.kind == "local" && p.mirror_state == MirrorState::InSync as i32)
        })
        .await;
    cluster.wait_status(1, "B in sync", |s| mirror_state(s) == MirrorState::InSync).await;
    common::write_at(&mut data, 0, block_data(0, 21)).await.unwrap();
    assert_eq!(common::read_at(&mut data, 0, BLOCK).await.unwrap(), block_data(0, 21));
    for n in 3..20u64 {
        assert_eq!(common::read_at(&mut data, n * BLOCK, BLOCK).await.unwrap(), block_data(n, n));
    }
}

/// Garbage on every gRPC endpoint of a serving node gets an error, never a panic, and loses
/// nothing (DESIGN §8: bad input → INVALID_ARGUMENT, another cluster → FAILED_PRECONDITION).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_every_endpoint_is_an_error_and_loses_nothing() {
    use mc_proto::v1::{
        CreateAggregateRequest, CreateVolumeRequest, FlushRequest, PartitionRecordsRequest, RangeRequest,
        StatusRequest,
    };
    use tonic::Code;
    let cluster = Cluster::up(&Settings::default(), VOLUME_BYTES).await;
    let mut data = cluster.data(0).await;
    common::write_at(&mut data, 0, block_data(0, 1)).await.unwrap();
    let other_cluster = {
        let mut id = CLUSTER.to_vec();
        id[3] ^= 0x40;
        id
    };
    let w = |cluster_id: Vec<u8>, volume: &str, offset: u64, data: Vec<u8>| WriteRequest {
        cluster_id,
        volume: volume.into(),
        offset,
        data,
    };
    let code = |r: Result<tonic::Response<mc_proto::v1::WriteReply>, tonic::Status>| r.unwrap_err().code();
    // Data.Write
    assert_eq!(
        code(data.write(w(other_cluster.clone(), "vol_a", 0, vec![1; 4096])).await),
        Code::FailedPrecondition
    );
    assert_eq!(code(data.write(w(vec![1, 2], "vol_a", 0, vec![1; 4096])).await), Code::InvalidArgument);
    assert_eq!(code(data.write(w(CLUSTER.to_vec(), "nope", 0, vec![1; 4096])).await), Code::NotFound);
    assert_eq!(
        code(data.write(w(CLUSTER.to_vec(), "vol_a", VOLUME_BYTES, vec![1; 1])).await),
        Code::OutOfRange
    );
    assert_eq!(
        code(data.write(w(CLUSTER.to_vec(), "vol_a", u64::MAX - 10, vec![1; 4096])).await),
        Code::OutOfRange
    );
    assert_eq!(
        code(data.write(w(CLUSTER.to_vec(), "vol_a", 0, vec![1; (1 << 20) + 1])).await),
        Code::InvalidArgument
    );
    // Above the message limit: refused by the decoder.
    let huge = data.write(w(CLUSTER.to_vec(), "vol_a", 0, vec![1; 3 << 20])).await.unwrap_err();
    assert!(matches!(huge.code(), Code::ResourceExhausted | Code::OutOfRange | Code::Internal), "{huge:?}");
    // Data.Read, Trim, WriteZeroes, Flush
    let r = |offset: u64, length: u64| ReadRequest {
        cluster_id: CLUSTER.to_vec(),
        volume: "vol_a".into(),
        offset,
        length,
    };
    assert_eq!(data.read(r(u64::MAX, 1)).await.unwrap_err().code(), Code::OutOfRange);
    assert_eq!(data.read(r(0, u64::MAX)).await.unwrap_err().code(), Code::InvalidArgument);
    let z = |offset: u64, length: u64| RangeRequest {
        cluster_id: CLUSTER.to_vec(),
        volume: "vol_a".into(),
        offset,
        length,
    };
    assert_eq!(data.trim(z(4096, u64::MAX)).await.unwrap_err().code(), Code::OutOfRange);
    assert_eq!(data.write_zeroes(z(VOLUME_BYTES, 1)).await.unwrap_err().code(), Code::OutOfRange);
    let flush = FlushRequest { cluster_id: CLUSTER.to_vec(), volume: "missing".into() };
    assert_eq!(data.flush(flush).await.unwrap_err().code(), Code::NotFound);
    // Admin
    let mut admin = cluster.admin(0).await;
    assert_eq!(
        admin.status(StatusRequest { cluster_id: vec![] }).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    for (name, plex0, size) in [
        ("aggr_a", "d7", 64u64 << 20),
        ("bad/name", "d7", 64 << 20),
        ("aggr_b", "../escape", 64 << 20),
        ("aggr_b", "d8", 0),
        ("aggr_b", "d0", 64 << 20),
        ("aggr_b", "d9", 4096),
    ] {
        let request = CreateAggregateRequest {
            cluster_id: CLUSTER.to_vec(),
            name: name.into(),
            plex0_disks: vec![plex0.into()],
            plex1_disks: vec!["d10".into()],
            disk_size_bytes: size,
        };
        let error = admin.create_aggregate(request).await.unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{name} {plex0} {size}: {error:?}");
    }
    for (aggregate, name, size) in [
        ("aggr_a", "vol_a", 4096u64),
        ("aggr_a", "v2", 0),
        ("aggr_a", "v2", 1000),
        ("aggr_a", "v2", 1 << 40),
        ("none", "v2", 4096),
    ] {
        let request = CreateVolumeRequest {
            cluster_id: CLUSTER.to_vec(),
            aggregate: aggregate.into(),
            name: name.into(),
            size_bytes: size,
        };
        let error = admin.create_volume(request).await.unwrap_err();
        assert!(
            matches!(error.code(), Code::InvalidArgument | Code::NotFound),
            "{aggregate} {name} {size}: {error:?}"
        );
    }
    let records = |partition: &str, cluster_id: Vec<u8>| PartitionRecordsRequest {
        cluster_id,
        partition: partition.into(),
        after_lsn: u64::MAX,
        max_records: u32::MAX,
        with_payload: true,
    };
    assert_eq!(
        admin.partition_records(records("ha", CLUSTER.to_vec())).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        admin.partition_records(records("local", other_cluster)).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    assert!(
        admin
            .partition_records(records("local", CLUSTER.to_vec()))
            .await
            .unwrap()
            .into_inner()
            .records
            .is_empty()
    );
    // Raw bytes that are not HTTP/2 at all.
    {
        use std::io::Write;
        let mut raw = std::net::TcpStream::connect(cluster.nodes[0].address()).unwrap();
        let _ = raw.write_all(&[0xde, 0xad, 0xbe, 0xef].repeat(4096));
    }
    // Still serving, nothing lost, and the disk names did not escape the shelf.
    assert_eq!(cluster.status(0).await.node_state, "serving");
    assert_eq!(common::read_at(&mut data, 0, BLOCK).await.unwrap(), block_data(0, 1));
    assert!(!cluster.nodes[0].dir.join("escape").exists());
}

/// Five times the NVLog's size written in 1 MiB records by four writers: CPs at half a
/// partition and back-pressure when both halves are full keep it going (DESIGN §4), and every
/// byte reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_nvlog_makes_writes_wait_for_cps_and_loses_nothing() {
    let cluster =
        Cluster::up(&Settings { cp_interval_ms: 60_000, ..Settings::default() }, VOLUME_BYTES).await;
    let mib = 1u64 << 20;
    let mut tasks = Vec::new();
    for writer in 0..4u64 {
        let mut data = cluster.data(0).await;
        tasks.push(tokio::spawn(async move {
            for round in 0..20u64 {
                let offset = (writer * 4 + round % 4) * mib;
                common::write_at(&mut data, offset, vec![(writer * 20 + round) as u8; mib as usize])
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let status = cluster.status(0).await;
    let cp = status.cp.unwrap();
    assert!(cp.completed >= 4, "{cp:?}");
    let mut data = cluster.data(0).await;
    for writer in 0..4u64 {
        for slot in 0..4u64 {
            let last_round = 16 + slot;
            let back = common::read_at(&mut data, (writer * 4 + slot) * mib, mib).await.unwrap();
            assert!(
                back.iter().all(|&b| b == (writer * 20 + last_round) as u8),
                "writer {writer} slot {slot}"
            );
        }
    }
    eprintln!("CPs: {}, back-pressure waits: {}", cp.completed, cp.backpressure_waits);
}

/// A cluster whose A acknowledged blocks 1 to 20 (mirrored to B; CPs a minute apart, so they
/// are all in the NVLogs), and A's data connection.
async fn up_with_twenty_blocks() -> (Cluster, mc_proto::v1::data_client::DataClient<tonic::transport::Channel>)
{
    let cluster =
        Cluster::up(&Settings { cp_interval_ms: 60_000, ..Settings::default() }, VOLUME_BYTES).await;
    let mut data = cluster.data(0).await;
    for n in 1..=20u64 {
        common::write_at(&mut data, n * BLOCK, block_data(n, n)).await.unwrap();
    }
    (cluster, data)
}

/// A writer whose NVLog was lost while its partner's copy was incomplete (the partner had lost
/// its own NVLog and was still resyncing): the copy cannot be trusted to hold every
/// acknowledged write, so the volumes are NVFAILed with the reason (S8, DESIGN §9 rule (d)) and
/// refuse I/O until an operator clears them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_writer_nvlog_with_an_incomplete_partner_copy_nvfails_the_volumes() {
    let (mut cluster, mut data) = up_with_twenty_blocks().await;
    cluster.kill(1);
    std::fs::remove_file(cluster.nodes[1].nvlog()).unwrap();
    cluster.start(1);
    cluster.wait_status(1, "B resyncing", |s| mirror_state(s) == MirrorState::Resyncing).await;
    common::write_at(&mut data, 0, block_data(0, 21)).await.unwrap();
    cluster.kill(0);
    std::fs::remove_file(cluster.nodes[0].nvlog()).unwrap();
    cluster.start(0);
    let a = cluster.wait_state(0, "serving").await;
    let volume = &a.aggregates[0].volumes[0];
    assert_eq!(volume.state, "nvfailed", "{a:#?}");
    assert!(volume.in_nvfailed_state, "{a:#?}");
    let mut data = cluster.data(0).await;
    let refused = common::write_at(&mut data, 0, block_data(0, 22)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("NVFAIL"), "{refused:?}");
    assert_eq!(
        common::read_at(&mut data, 0, BLOCK).await.unwrap_err().code(),
        tonic::Code::FailedPrecondition
    );
    let log = cluster.log(0);
    assert!(log.contains("S8") && log.contains("incomplete"), "the reason is not logged:\n{log}");
}

/// B goes down, A drops it after mirror_timeout of silence (no mediator, S3) and acknowledges
/// a write alone (block 0), then A is killed and its NVLog file deleted. Both are down.
async fn acknowledge_alone_then_lose_the_writer_nvlog() -> Cluster {
    let (mut cluster, mut data) = up_with_twenty_blocks().await;
    cluster.kill(1);
    // Waits mirror_timeout, then A drops B and acknowledges alone.
    common::write_at(&mut data, 0, block_data(0, 21)).await.unwrap();
    cluster.kill(0);
    std::fs::remove_file(cluster.nodes[0].nvlog()).unwrap();
    cluster
}

/// A serves again with its volume NVFAILed: writes its lost NVLog held are not lost silently.
async fn assert_served_nvfailed(cluster: &Cluster) {
    let a = cluster.wait_state(0, "serving").await;
    let volume = &a.aggregates[0].volumes[0];
    assert_eq!(volume.state, "nvfailed", "acknowledged writes would be lost silently: {a:#?}");
    assert!(volume.in_nvfailed_state, "{a:#?}");
}

/// Found by the model check (docs/safety.md, S8): B goes down, A drops it after mirror_timeout
/// of silence (no mediator, S3) and acknowledges a write alone; then A loses its NVLog and both
/// restart. B's partition is intact and its account says `in_sync`, but B was down while A
/// dropped it, and A's record of the drop was in the partition it lost: B's copy cannot vouch
/// for that write (no round trip since B started), so A NVFAILs the volumes instead of serving
/// without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_writer_nvlog_after_dropping_a_restarted_partner_nvfails_the_volumes() {
    let mut cluster = acknowledge_alone_then_lose_the_writer_nvlog().await;
    cluster.start(1);
    cluster.start(0);
    assert_served_nvfailed(&cluster).await;
}

/// As above, but A crashes again before B is back, so before S8 decided: its second start
/// finds a valid (new, empty) NVLog file. The lost partition stays lost until decided (the
/// marker in the shelf directory), so A still NVFAILs the volumes instead of serving without the
/// write it acknowledged alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_writer_nvlog_stays_lost_across_a_restart_before_the_partner_returns() {
    let mut cluster = acknowledge_alone_then_lose_the_writer_nvlog().await;
    cluster.start(0);
    cluster
        .wait_status(0, "A waiting for B", |s| s.state_reason.contains("waiting for the DR partner"))
        .await;
    cluster.kill(0);
    assert!(cluster.nodes[0].nvlog().exists(), "the second start formatted no NVLog");
    cluster.start(1);
    cluster.start(0);
    assert_served_nvfailed(&cluster).await;
}

/// S8's verdict "incomplete" is durable: a start that crashed after finding the partner's copy
/// incomplete, before every NVFAIL was recorded, left the marker saying so. The next start
/// NVFAILs, although the partner (running, in sync, a round trip since its start) would vouch
/// for its copy now (and, with a mediator, the node's own reports may have made the record
/// intact again meanwhile). Simulated by writing the marker's "incomplete" content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_found_incomplete_stays_incomplete_at_the_next_start() {
    let (mut cluster, _data) = up_with_twenty_blocks().await;
    cluster.kill(0);
    let id = cluster.nodes[0].id;
    let marker =
        cluster.nodes[0].dir.join("shelf").join(format!("{}-{id}", controller::daemon::NVLOG_LOST_FILE));
    std::fs::write(&marker, controller::daemon::encode_nvlog_lost(&CLUSTER, id, true)).unwrap();
    cluster.start(0);
    assert_served_nvfailed(&cluster).await;
    assert!(!marker.exists(), "the marker outlived the recorded NVFAIL");
}

/// `kill -9` of the partner (B) under a workload, back within a second, five times: writes
/// stall while it is away, then go on after it resynchronises from its durable tail; every
/// acknowledged write reads back, and B's copy ends in sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_partner_stalls_writes_and_loses_nothing() {
    let mut cluster =
        Cluster::up(&Settings { cp_interval_ms: 300, ..Settings::default() }, VOLUME_BYTES).await;
    let model = Arc::new(Mutex::new(Model::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(workload(cluster.data(0).await, "vol_a", 512, 8, model.clone(), stop.clone(), 1));
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(200 + rand::random::<u64>() % 400)).await;
        cluster.kill(1);
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.start(1);
        cluster.wait_state(1, "serving").await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    cluster.finish(load).await;
    let snapshot = model.lock().unwrap().clone();
    assert!(snapshot.acked > 50, "only {} writes were acknowledged", snapshot.acked);
    let mut data = cluster.data(0).await;
    snapshot.check(&mut data, "vol_a").await;
    cluster.wait_status(1, "B in sync", |s| mirror_state(s) == MirrorState::InSync).await;
}

/// Both sites killed at once and restarted together: neither waits on the other (each runs its
/// NVLog receiver while it is fenced, S2), and every acknowledged write reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_sites_killed_at_once_restart_without_waiting_on_each_other() {
    let mut cluster =
        Cluster::up(&Settings { cp_interval_ms: 60_000, ..Settings::default() }, VOLUME_BYTES).await;
    let mut data = cluster.data(0).await;
    let mut model = Model::default();
    for n in 1..=100u64 {
        let block = n % 40;
        model.sent(block, n);
        common::write_at(&mut data, block * BLOCK, block_data(block, n)).await.unwrap();
        model.acked(block, n);
    }
    cluster.kill(0);
    cluster.kill(1);
    cluster.start(0);
    cluster.start(1);
    cluster.wait_state(0, "serving").await;
    cluster.wait_state(1, "serving").await;
    let mut data = cluster.data(0).await;
    model.check(&mut data, "vol_a").await;
}

/// An aggregate over two disks per plex, given out of order: the plex concatenates them in
/// file-name order, and a restart finds and reassembles them from their labels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregate_of_several_disks_per_plex_is_reassembled_at_restart() {
    use mc_proto::v1::{CreateAggregateRequest, CreateVolumeRequest};
    let mut cluster = Cluster::new(&Settings::default());
    cluster.start(0);
    cluster.start(1);
    cluster.wait_state(0, "serving").await;
    let mut admin = cluster.admin(0).await;
    let aggregate = admin
        .create_aggregate(CreateAggregateRequest {
            cluster_id: CLUSTER.to_vec(),
            name: "aggr_a".into(),
            plex0_disks: vec!["p0-b".into(), "p0-a".into()],
            plex1_disks: vec!["p1-a".into(), "p1-b".into()],
            disk_size_bytes: 24 << 20,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(aggregate.plexes[0].disks, ["p0-a", "p0-b"]);
    let size = aggregate.size_bytes;
    assert!(size > 24 << 20, "the plex spans both disks: {size}");
    let volume_bytes = (size - (2 << 20)) / BLOCK * BLOCK;
    admin
        .create_volume(CreateVolumeRequest {
            cluster_id: CLUSTER.to_vec(),
            aggregate: "aggr_a".into(),
            name: "vol_a".into(),
            size_bytes: volume_bytes,
        })
        .await
        .unwrap();
    let blocks = volume_bytes / BLOCK;
    let mut data = cluster.data(0).await;
    let mut model = Model::default();
    for n in 1..=blocks / 64 {
        let block = n * 64 - 1;
        model.sent(block, n);
        common::write_at(&mut data, block * BLOCK, block_data(block, n)).await.unwrap();
        model.acked(block, n);
    }
    // A clean stop destages everything to the plexes; the restart reads it from both disks.
    assert!(cluster.terminate(0));
    cluster.start(0);
    let status = cluster.wait_state(0, "serving").await;
    assert_eq!(status.aggregates[0].plexes[1].disks, ["p1-a", "p1-b"]);
    let mut data = cluster.data(0).await;
    model.check(&mut data, "vol_a").await;
}

/// The inter-site link cut (both ways, then each way alone) for less than `mirror_timeout`
/// under a workload, through the fault-injecting proxy: writes stall while it is cut and go on
/// when it is back; nothing acknowledged is lost and the mirror ends in sync. (Cuts longer than
/// the timeout, which drop the partner under S3, are the tests below.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_cut_shorter_than_the_mirror_timeout_stalls_writes_and_loses_nothing() {
    use mc_tests::proxy::{Mode, Side};
    let settings = Settings { mirror_timeout_ms: 8000, cp_interval_ms: 500, ..Settings::default() };
    let cluster = Cluster::up_with_links(&settings, VOLUME_BYTES).await;
    let model = Arc::new(Mutex::new(Model::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(workload(cluster.data(0).await, "vol_a", 512, 8, model.clone(), stop.clone(), 1));
    let acked = || model.lock().unwrap().acked;
    for cut in [None, Some(Side::Forward), Some(Side::Backward)] {
        tokio::time::sleep(Duration::from_millis(300)).await;
        match cut {
            None => cluster.link(0).set_both(Mode::Blackhole),
            Some(side) => cluster.link(0).set(side, Mode::Blackhole),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let during = acked();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(acked(), during, "a write was acknowledged while the link was cut ({cut:?})");
        cluster.link(0).set_both(Mode::Pass);
        let started = std::time::Instant::now();
        while acked() == during {
            assert!(started.elapsed() < Duration::from_secs(20), "writes did not resume after {cut:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let snapshot = model.lock().unwrap().clone();
    let mut data = cluster.data(0).await;
    snapshot.check(&mut data, "vol_a").await;
    cluster.wait_status(1, "B in sync", |s| mirror_state(s) == MirrorState::InSync).await;
}

/// Plex 0 (at A) and plex 1 (on B's shelf) of A's aggregate, compared where data lives (labels,
/// bitmaps and checksums, salted with each disk's uuid, differ by design).
async fn plexes_identical(cluster: &Cluster) -> Result<(), String> {
    let mut plexes = Vec::new();
    for path in [cluster.nodes[0].dir.join("shelf").join("d0"), cluster.nodes[1].dir.join("shelf").join("d1")]
    {
        let device = plex::FileDevice::open(&path).unwrap();
        let label = plex::read_label(&device).await.unwrap().0;
        plexes.push((std::fs::read(&path).unwrap(), label));
    }
    let ((a, label_a), (b, label_b)) = (&plexes[0], &plexes[1]);
    let (ea, eb) = (label_a.data, label_b.data);
    let ra = &a[ea.offset as usize..(ea.offset + ea.len) as usize];
    let rb = &b[eb.offset as usize..(eb.offset + eb.len) as usize];
    if ra != rb {
        let differ = ra.chunks(4096).zip(rb.chunks(4096)).filter(|(x, y)| x != y).count();
        let first = ra.chunks(4096).zip(rb.chunks(4096)).position(|(x, y)| x != y).unwrap_or(0);
        return Err(format!("the plexes differ in {differ} data blocks, the first at block {first}"));
    }
    Ok(())
}

fn plex_state(status: &mc_proto::v1::StatusReply, plex: usize) -> String {
    status.aggregates[0].plexes[plex].state.clone()
}

fn local_mirror_state(status: &mc_proto::v1::StatusReply) -> i32 {
    status.partitions.iter().find(|p| p.kind == "local").unwrap().mirror_state
}

/// The inter-site link cut both ways for longer than `mirror_timeout` under a write workload
/// (DESIGN §4.1, §4.2, §6.4; S1, S3, S4): writes stall; after the timeout the partner is out of
/// sync, recorded at A before any further acknowledgement, and plex 1 dropped; writes go
/// on with A's copies; when the link is back the mirror re-establishes (resyncing, then in
/// sync after the covering CP), plex 1 resyncs from the bitmap, the plexes end byte-identical
/// (so writes in flight at the cut were in the resync set), and no acknowledged write is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_cut_longer_than_the_mirror_timeout_drops_then_resyncs_and_loses_nothing() {
    use mc_tests::proxy::Mode;
    let settings = Settings { mirror_timeout_ms: 4000, cp_interval_ms: 500, ..Settings::default() };
    let mut cluster = Cluster::up_with_links(&settings, VOLUME_BYTES).await;
    let model = Arc::new(Mutex::new(Model::default()));
    let stop = Arc::new(AtomicBool::new(false));
    // Before and during the cut the workload writes one part of the volume, after the drop
    // another: what plex 1 misses of the first part is what was in flight at the cut, which
    // only the drop's bitmap marks (S4) bring to it.
    let load =
        tokio::spawn(workload_in(cluster.data(0).await, "vol_a", 0..1024, 8, model.clone(), stop.clone(), 1));
    let acked = || model.lock().unwrap().acked;
    wait_acked(&model, 100, "no writes before the cut").await;
    cluster.link(0).set_both(Mode::Blackhole);
    cluster.link(1).set_both(Mode::Blackhole);
    let cut = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stalled = acked();
    wait_acked(&model, stalled, "writes did not resume after the mirror timeout").await;
    let resumed = cut.elapsed();
    // The drop was persisted at A before the first acknowledgement after the stall.
    let a = cluster.status(0).await;
    assert_eq!(local_mirror_state(&a), MirrorState::OutOfSync as i32, "{a:#?}");
    assert!(resumed >= Duration::from_millis(3500), "writes resumed {resumed:?} after the cut");
    stop.store(true, Ordering::Relaxed);
    cluster.finish(load).await;
    // Out of date after a timeout, failed after a transport error: dropped either way.
    let dropped = |s: &mc_proto::v1::StatusReply| {
        ["out_of_date", "failed"].iter().any(|p| plex_state(s, 1).starts_with(p))
    };
    let a = cluster.wait_status(0, "plex 1 dropped", dropped).await;
    assert_eq!(a.aggregates[0].state, "mirror degraded", "{a:#?}");
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(workload_in(
        cluster.data(0).await,
        "vol_a",
        2048..3072,
        8,
        model.clone(),
        stop.clone(),
        1 << 40,
    ));
    let during = acked();
    wait_acked(&model, during + 200, "writes stopped while degraded").await;
    // The connections die (TCP gave up): what was in flight at the cut never arrives, so only
    // the bitmap marks of the drop (S4) bring it to plex 1.
    cluster.link(0).reset();
    cluster.link(1).reset();
    cluster.link(0).set_both(Mode::Pass);
    cluster.link(1).set_both(Mode::Pass);
    cluster.wait_in_sync().await;
    let healed = acked();
    wait_acked(&model, healed + 100, "writes stopped after the heal").await;
    stop.store(true, Ordering::Relaxed);
    cluster.finish(load).await;
    let snapshot = model.lock().unwrap().clone();
    let mut data = cluster.data(0).await;
    snapshot.check(&mut data, "vol_a").await;
    // A clean stop destages the last CP to both plexes: then they hold the same bytes.
    assert!(cluster.terminate(0));
    plexes_identical(&cluster).await.unwrap();
}

/// One-way cuts longer than `mirror_timeout` (DESIGN §0 "round trip", S3, S13): first A→B is
/// dropped while B→A works, then the reverse. Writes stall, then go on after the timeout;
/// nobody takes "I still receive packets" for a working link: A, which still hears B when
/// only A→B is cut, drops B only on B's own acknowledgement (its receiver persisted out of
/// sync and said so), and drops it on silence when B→A is cut; B's receiver marks itself out
/// of sync although A's records keep arriving. Each time the link comes back the mirror and
/// plex 1 resync, and in the end no acknowledged write is lost and the plexes are identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_way_cuts_drop_only_on_acknowledgement_or_silence_and_lose_nothing() {
    use mc_tests::proxy::{Mode, Side};
    let settings = Settings { mirror_timeout_ms: 4000, cp_interval_ms: 500, ..Settings::default() };
    let mut cluster = Cluster::up_with_links(&settings, VOLUME_BYTES).await;
    let model = Arc::new(Mutex::new(Model::default()));
    // Link 0 carries A's calls to B (Forward: A→B), link 1 B's calls to A (Backward: A→B).
    let cuts = [
        ("A→B", Side::Forward, Side::Backward, "the partner acknowledged it"),
        ("B→A", Side::Backward, Side::Forward, "nothing heard from the partner"),
    ];
    for (round, (name, on_link0, on_link1, how)) in cuts.into_iter().enumerate() {
        let stop = Arc::new(AtomicBool::new(false));
        let first_write = (round as u64 + 1) << 40;
        let load = tokio::spawn(workload(
            cluster.data(0).await,
            "vol_a",
            2048,
            8,
            model.clone(),
            stop.clone(),
            first_write,
        ));
        let before = model.lock().unwrap().acked;
        wait_acked(&model, before + 100, &format!("{name}: no writes before the cut")).await;
        cluster.link(0).set(on_link0, Mode::Blackhole);
        cluster.link(1).set(on_link1, Mode::Blackhole);
        let cut = std::time::Instant::now();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let stalled = model.lock().unwrap().acked;
        wait_acked(&model, stalled, &format!("{name}: writes did not resume after the mirror timeout")).await;
        assert!(
            cut.elapsed() >= Duration::from_millis(3500),
            "{name}: resumed {:?} after the cut",
            cut.elapsed()
        );
        let a = cluster.status(0).await;
        assert_eq!(local_mirror_state(&a), MirrorState::OutOfSync as i32, "{name}: {a:#?}");
        let log = cluster.log(0);
        let drop_line = log.lines().rev().find(|l| l.contains("NVLog mirror dropped")).unwrap_or_default();
        assert!(drop_line.contains(how), "{name}: the drop was not by {how:?}: {drop_line}");
        // B keeps its own account: out of sync although A's records reach it when only B→A
        // is cut (S13: only round trips count).
        cluster
            .wait_status(1, "B's receiver out of sync", |s| mirror_state(s) == MirrorState::OutOfSync)
            .await;
        let degraded = model.lock().unwrap().acked;
        wait_acked(&model, degraded + 200, &format!("{name}: writes stopped while degraded")).await;
        cluster.link(0).set_both(Mode::Pass);
        cluster.link(1).set_both(Mode::Pass);
        cluster.wait_in_sync().await;
        stop.store(true, Ordering::Relaxed);
        cluster.finish(load).await;
    }
    let snapshot = model.lock().unwrap().clone();
    let mut data = cluster.data(0).await;
    snapshot.check(&mut data, "vol_a").await;
    assert!(cluster.terminate(0));
    plexes_identical(&cluster).await.unwrap();
}

/// `kill -9` of B — the side holding plex 1 and A's NVLog copy — for longer than
/// `mirror_timeout` under a workload: A stalls, drops B's mirror and plex 1 once nothing has
/// been heard from B for the timeout (S3), and goes on; B restarts with its copy intact but
/// stale, and A re-establishes the mirror as resyncing (its own persisted drop says B lacks
/// what A wrote alone), resyncs plex 1 from the bitmap, and ends in sync with identical plexes
/// and no acknowledged write lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_partner_beyond_the_timeout_drops_then_resyncs_and_loses_nothing() {
    let settings = Settings { mirror_timeout_ms: 4000, cp_interval_ms: 500, ..Settings::default() };
    let mut cluster = Cluster::up(&settings, VOLUME_BYTES).await;
    let model = Arc::new(Mutex::new(Model::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let load =
        tokio::spawn(workload(cluster.data(0).await, "vol_a", 2048, 8, model.clone(), stop.clone(), 1));
    let acked = || model.lock().unwrap().acked;
    wait_acked(&model, 200, "no writes before the kill").await;
    cluster.kill(1);
    let killed = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stalled = acked();
    wait_acked(&model, stalled, "writes did not resume after the mirror timeout").await;
    assert!(killed.elapsed() >= Duration::from_millis(3500), "resumed {:?} after the kill", killed.elapsed());
    let dropped = |s: &mc_proto::v1::StatusReply| {
        ["out_of_date", "failed"].iter().any(|p| plex_state(s, 1).starts_with(p))
            && local_mirror_state(s) == MirrorState::OutOfSync as i32
    };
    cluster.wait_status(0, "mirror and plex 1 dropped", dropped).await;
    let degraded = acked();
    wait_acked(&model, degraded + 300, "writes stopped while B was down").await;
    cluster.start(1);
    cluster.wait_in_sync().await;
    stop.store(true, Ordering::Relaxed);
    cluster.finish(load).await;
    let snapshot = model.lock().unwrap().clone();
    let mut data = cluster.data(0).await;
    snapshot.check(&mut data, "vol_a").await;
    assert!(cluster.terminate(0));
    plexes_identical(&cluster).await.unwrap();
}

/// The link flapping every second while plex 1 resyncs (DESIGN §6.4, S5): the resync stalls
/// and goes on, or stops and starts again from the persistent bitmap, and finishes; plex 1 is
/// never reported normal before every dirty region was copied (the plexes are compared once it
/// is), and no acknowledged write is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_flapping_during_a_resync_never_marks_the_plex_normal_early() {
    use mc_tests::proxy::Mode;
    let settings = Settings {
        mirror_timeout_ms: 4000,
        cp_interval_ms: 500,
        resync_bytes_per_second: 1 << 20,
        ..Settings::default()
    };
    let mut cluster = Cluster::up_with_links(&settings, VOLUME_BYTES).await;
    let model = Arc::new(Mutex::new(Model::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let load =
        tokio::spawn(workload(cluster.data(0).await, "vol_a", BLOCKS, 8, model.clone(), stop.clone(), 1));
    // A cut long enough to drop plex 1; writes all over the volume meanwhile dirty most of it.
    cluster.link(0).set_both(Mode::Blackhole);
    cluster.link(1).set_both(Mode::Blackhole);
    cluster
        .wait_status(0, "plex 1 dropped", |s| {
            ["out_of_date", "failed"].iter().any(|p| plex_state(s, 1).starts_with(p))
        })
        .await;
    let degraded = model.lock().unwrap().acked;
    let started = std::time::Instant::now();
    loop {
        let acked = model.lock().unwrap().acked;
        if acked >= degraded + 3000 {
            break;
        }
        if started.elapsed() > Duration::from_secs(30) {
            panic!(
                "writes stopped while degraded at {acked}: {:#?}\n{}",
                cluster.status(0).await,
                cluster.log(0)
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    cluster.finish(load).await;
    cluster.link(0).reset();
    cluster.link(1).reset();
    // Back, then flapping: one second up, one second down, while the resync runs.
    let mut saw_resyncing = false;
    for _ in 0..4 {
        cluster.link(0).set_both(Mode::Pass);
        cluster.link(1).set_both(Mode::Pass);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let a = cluster.status(0).await;
        saw_resyncing |= plex_state(&a, 1).starts_with("resyncing");
        assert!(!plex_state(&a, 1).starts_with("normal"), "plex 1 normal within seconds: {a:#?}");
        // Down for a second; then the connections die (TCP gave up): the copies hanging in
        // them fail and the resyncing plex is dropped, then reattached and resumed from the
        // bitmap once the link is back.
        cluster.link(0).set_both(Mode::Blackhole);
        cluster.link(1).set_both(Mode::Blackhole);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        cluster.link(0).reset();
        cluster.link(1).reset();
    }
    assert!(saw_resyncing, "the resync never ran while the link flapped");
    let reattached = cluster.log(0).matches("plex reattached").count();
    assert!(reattached >= 2, "the flaps never dropped the resyncing plex ({reattached} reattach)");
    cluster.link(0).set_both(Mode::Pass);
    cluster.link(1).set_both(Mode::Pass);
    cluster.wait_status(0, "plexes normal", |s| s.aggregates[0].state == "mirrored,normal").await;
    let snapshot = model.lock().unwrap().clone();
    let mut data = cluster.data(0).await;
    snapshot.check(&mut data, "vol_a").await;
    assert!(cluster.terminate(0));
    plexes_identical(&cluster).await.unwrap();
}

/// A gray partner: B answers keepalives but its NVLog storage hangs, so it acknowledges no
/// record (S1, S3). A hears from B, so it may drop B only on B's acknowledgement, which never
/// comes: writes stall past the mirror timeout and nothing is acknowledged without B's copy.
/// When B's storage recovers, the stalled write completes with B holding its record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gray_partner_stalls_writes_and_nothing_is_acknowledged_without_its_copy() {
    let settings = Settings { mirror_timeout_ms: 4000, ..Settings::default() };
    let (cluster, stall) = Cluster::up_with_receiver_stall_switch(&settings, VOLUME_BYTES).await;
    let mut data = cluster.data(0).await;
    common::write_at(&mut data, 0, block_data(0, 1)).await.unwrap();
    std::fs::write(&stall, b"").unwrap();
    let mut stalled = cluster.data(0).await;
    let write = tokio::spawn(async move { common::write_at(&mut stalled, 0, block_data(0, 2)).await });
    tokio::time::sleep(Duration::from_millis(10_000)).await;
    assert!(!write.is_finished(), "a write completed while the partner stored nothing");
    let a = cluster.status(0).await;
    // The drop began (persisted locally first, S3) but the partner is still in the ack set.
    assert_ne!(
        a.dr_mirror.as_ref().unwrap().state,
        MirrorState::OutOfSync as i32,
        "dropped a partner it hears: {a:#?}"
    );
    let log = cluster.log(0);
    assert!(log.contains("dropping the NVLog mirror"), "the timeout never started a drop");
    assert!(!log.contains("NVLog mirror dropped"), "dropped without the partner's acknowledgement");
    // B recovers: the write completes, with its record at B.
    std::fs::remove_file(&stall).unwrap();
    let lsn = tokio::time::timeout(Duration::from_secs(30), write).await.unwrap().unwrap().unwrap();
    let held = cluster.records(1, "dr_partner").await;
    assert!(held.iter().any(|r| r.lsn == lsn), "B does not hold lsn {lsn} of the acknowledged write");
    assert_eq!(common::read_at(&mut data, 0, BLOCK).await.unwrap(), block_data(0, 2));
}
