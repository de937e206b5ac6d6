//! Regression tests from an adversarial review of the aggregate (F1–F10). Each test asserts
//! the safe behaviour; each failed before its fix: unflushed writes of a dropped plex not
//! marked (F1, S4), a split brain merged after a crash at resync completion (F2, S5), a drop
//! not recorded through the hook after a crash (F3, S3), a stale plex made the source by a
//! replaced disk in the up-to-date one (F4, S5/S9), hangs at resync completion, in CP label
//! writes and in read repair (F5–F7), a cancelled drop wedging the aggregate (F8), a panic on
//! an empty plex (F9), and a resync-time mark cleared under a degraded write (F10, S4).
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use plex::testing::{MirrorRig, RecordingHook, pattern, plex_data};
use plex::{
    Aggregate, AggregateError, AggregateOptions, AggregateSpec, AlignedBuf, BLOCK_BYTES, BlockDevice,
    CpRecord, DeviceError, DropHook, IoFuture, MemDevice, MemFaults, PeerState, PlexDrop, PlexGeneration,
    PlexState, read_label,
};

const REGION: u64 = 65536;
const TIMEOUT: Duration = Duration::from_millis(300);

fn spec() -> AggregateSpec {
    plex::testing::test_spec(65536)
}

fn options() -> AggregateOptions {
    plex::testing::test_options(TIMEOUT, 4 * REGION)
}

type Rig = MirrorRig;

fn unreadable() -> MemFaults {
    MemFaults { read_error: true, ..MemFaults::default() }
}

/// F1 (S4): a write that completed on both plexes but was never flushed on plex 1 is not marked
/// when plex 1 is dropped by a failed flush; the flush returns Ok (the CP counts it durable).
/// After a power loss at plex 1's site the resync does not copy it.
#[tokio::test]
async fn f1_flush_failure_drop_marks_unflushed_writes() {
    let rig = Rig::new();
    let aggregate = Aggregate::create(&spec(), rig.plexes(), options(), no_hook()).await.unwrap();
    let size = aggregate.size_bytes();
    aggregate.write(2 * REGION, &pattern(1, 4)).await.unwrap();
    rig.disks[1][0].set_faults(MemFaults { flush_error: true, ..MemFaults::default() });
    aggregate.flush().await.unwrap(); // the CP's data "is durable": labels may now record it
    eprintln!("after the flush-failure drop: {}", aggregate.status().await.bitmap);
    drop(aggregate);
    let crashed = rig.crashed();
    let aggregate = Aggregate::open(crashed.plexes(), options(), no_hook()).await.unwrap();
    aggregate.resync().await.unwrap();
    assert_eq!(crashed.first_difference(size).await, None, "plexes differ after resync");
}

/// F2 (S5/S3): a crash between the target and source label writes of a resync completion leaves
/// the source with peer `resyncing`. Opened alone, the source neither records a drop nor starts
/// a generation; the peer opened alone does. The two independent histories then read as
/// `peer-moved-on` and plex 0's acknowledged writes are overwritten.
#[tokio::test]
async fn f2_split_brain_after_crash_at_resync_completion() {
    let rig = Rig::new();
    let aggregate = Aggregate::create(&spec(), rig.plexes(), options(), no_hook()).await.unwrap();
    rig.hang(1);
    aggregate.write(0, &pattern(1, 1)).await.unwrap();
    rig.unhang(1);
    aggregate.reattach(1).await.unwrap();
    aggregate.resync().await.unwrap().unwrap();
    aggregate.flush().await.unwrap();
    drop(aggregate);
    // The state a crash between the two label writes of try_complete leaves on plex 0.
    let disk = rig.disks[0][0].clone();
    let (mut label, _) = read_label(disk.as_ref()).await.unwrap();
    assert_eq!(label.plex_generation, PlexGeneration(2));
    label.peer_state = PeerState::Resyncing;
    label.peer_sync_generation = PlexGeneration(1);
    plex::write_label(disk.as_ref(), &mut label).await.unwrap();

    // Site A alone.
    rig.faults(1, unreadable());
    let hook = Arc::new(RecordingHook::default());
    let a = Aggregate::open(rig.plexes(), options(), hook.clone()).await.unwrap();
    a.write(3 * REGION, &pattern(33, 1)).await.unwrap();
    a.flush().await.unwrap();
    eprintln!("site A alone: drops recorded {:?}, states {:?}", hook.drops(), a.plex_states());
    drop(a);
    rig.faults(1, MemFaults::default());
    // Site B alone.
    rig.faults(0, unreadable());
    let b = Aggregate::open(rig.plexes(), options(), no_hook()).await.unwrap();
    b.write(5 * REGION, &pattern(55, 1)).await.unwrap();
    b.flush().await.unwrap();
    drop(b);
    rig.faults(0, MemFaults::default());

    let both = Aggregate::open(rig.plexes(), options(), no_hook()).await;
    match both {
        Err(AggregateError::SplitBrain { .. }) => {}
        Err(e) => panic!("unexpected error {e}"),
        Ok(aggregate) => {
            eprintln!("opened, states {:?}", aggregate.plex_states());
            aggregate.resync().await.unwrap();
            let data = aggregate.read(3 * REGION, BLOCK_BYTES).await.unwrap();
            panic!(
                "split brain merged; site A's acknowledged write at region 3 {}",
                if data == pattern(33, 1) { "survived" } else { "is lost" }
            );
        }
    }
}

/// F3 (S3): a crash after the survivor's label records the drop but before the hook succeeded;
/// on reopen the drop is never sent through the hook, yet writes go to one plex.
#[tokio::test]
async fn f3_drop_not_rerecorded_after_crash_during_hook() {
    let rig = Rig::new();
    let aggregate = Arc::new(
        Aggregate::create(&spec(), rig.plexes(), options(), Arc::new(RecordingHook::refusing(1000)))
            .await
            .unwrap(),
    );
    rig.hang(1);
    let write = {
        let aggregate = aggregate.clone();
        tokio::spawn(async move { aggregate.write(0, &pattern(1, 1)).await })
    };
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (label, _) = read_label(rig.disks[0][0].as_ref()).await.unwrap();
        if label.peer_state == PeerState::OutOfDate {
            break;
        }
    }
    let crashed = rig.crashed();
    write.abort();
    let hook = Arc::new(RecordingHook::default());
    let aggregate = Aggregate::open(crashed.plexes(), options(), hook.clone()).await.unwrap();
    aggregate.write(4 * REGION, &pattern(4, 1)).await.unwrap();
    eprintln!("states {:?}", aggregate.plex_states());
    assert_eq!(
        hook.drops().len(),
        1,
        "a write completed on one plex with the drop never recorded by the hook"
    );
}

/// F4 (S5): the survivor plex (the only one with the writes made while its peer was out of date)
/// has one disk replaced. `no-valid-label` makes it the full-resync target of the stale plex.
#[tokio::test]
async fn f4_blank_disk_in_survivor_makes_stale_plex_the_source() {
    let mut rig = Rig::new();
    let aggregate = Aggregate::create(&spec(), rig.plexes(), options(), no_hook()).await.unwrap();
    rig.hang(0);
    aggregate.write(2 * REGION, &pattern(2, 1)).await.unwrap(); // plex 0 dropped, plex 1 alone
    aggregate.write(3 * REGION, &pattern(3, 1)).await.unwrap();
    aggregate.flush().await.unwrap();
    drop(aggregate);
    rig.unhang(0);
    rig.disks[1][1] = Arc::new(MemDevice::new(4 << 20)); // replaced second disk of plex 1
    match Aggregate::open(rig.plexes(), options(), no_hook()).await {
        Err(e) => eprintln!("refused: {e}"),
        Ok(aggregate) => {
            eprintln!("opened, states {:?}", aggregate.plex_states());
            let data = aggregate.read(3 * REGION, BLOCK_BYTES).await.unwrap();
            assert_eq!(
                data,
                pattern(3, 1),
                "acknowledged write silently rolled back (stale plex 0 is the source)"
            );
        }
    }
}

/// A device whose flushes hang from the `n`th one once armed.
#[derive(Debug)]
struct FlushTrap {
    inner: Arc<MemDevice>,
    countdown: AtomicI64,
}

impl BlockDevice for FlushTrap {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn read(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, (Result<(), DeviceError>, AlignedBuf)> {
        self.inner.read(offset, buf)
    }
    fn write(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, (Result<(), DeviceError>, AlignedBuf)> {
        self.inner.write(offset, buf)
    }
    fn flush(&self) -> IoFuture<'_, Result<(), DeviceError>> {
        Box::pin(async move {
            if self.countdown.fetch_sub(1, Ordering::AcqRel) == 1 {
                eprintln!("FlushTrap: hanging");
                std::future::pending::<()>().await;
            }
            self.inner.flush().await
        })
    }
}

/// F5 (liveness, §4.1): the target hangs at resync completion: `try_complete` holds the gate
/// exclusively across an untimed flush, so every write blocks forever and nothing is dropped.
#[tokio::test]
async fn f5_hung_target_at_completion_blocks_all_writes() {
    let disks = [
        Arc::new(MemDevice::new(8 << 20)),
        Arc::new(MemDevice::new(4 << 20)),
        Arc::new(MemDevice::new(4 << 20)),
    ];
    let trap = Arc::new(FlushTrap { inner: disks[1].clone(), countdown: AtomicI64::new(i64::MAX) });
    let plexes = || -> [Vec<Arc<dyn BlockDevice>>; 2] {
        [
            vec![disks[0].clone() as Arc<dyn BlockDevice>],
            vec![trap.clone() as Arc<dyn BlockDevice>, disks[2].clone()],
        ]
    };
    let hook = Arc::new(RecordingHook::default());
    let aggregate = Arc::new(Aggregate::create(&spec(), plexes(), options(), hook.clone()).await.unwrap());
    disks[1].set_faults(MemFaults { write_error: true, ..MemFaults::default() });
    aggregate.write(0, &pattern(1, 1)).await.unwrap(); // plex 1 dropped (failed)
    disks[1].set_faults(MemFaults::default());
    disks[1].reopen();
    aggregate.reattach(1).await.unwrap();
    // Flushes of plex 1 disk 0 during the resync: its label (1), the batch (2), completion (3).
    trap.countdown.store(3, Ordering::Release);
    let resync = aggregate.spawn_resync();
    tokio::time::sleep(Duration::from_millis(200)).await;
    eprintln!("states {:?}, resync finished: {}", aggregate.plex_states(), resync.is_finished());
    let write = tokio::time::timeout(10 * TIMEOUT, aggregate.write(8 * REGION, &pattern(8, 1))).await;
    assert!(
        write.is_ok(),
        "a write waited {:?} (> mirror_timeout) and the hung plex was never dropped",
        10 * TIMEOUT
    );
}

/// F6 (liveness): label writes have no timeout: a CP record on a hung plex never returns and the
/// plex is never dropped; status() hangs behind it.
#[tokio::test]
async fn f6_record_cp_on_hung_plex_never_returns() {
    let rig = Rig::new();
    let aggregate = Arc::new(Aggregate::create(&spec(), rig.plexes(), options(), no_hook()).await.unwrap());
    rig.hang(1);
    let cp = {
        let aggregate = aggregate.clone();
        tokio::spawn(async move { aggregate.record_cp(CpRecord::default()).await })
    };
    tokio::time::sleep(10 * TIMEOUT).await;
    let status = tokio::time::timeout(TIMEOUT, aggregate.status()).await;
    eprintln!(
        "record_cp finished: {}, status answered: {}, states {:?}",
        cp.is_finished(),
        status.is_ok(),
        aggregate.plex_states()
    );
    assert!(cp.is_finished(), "record_cp hung past 10x mirror_timeout without dropping the plex");
}

/// F7 (liveness): read repair reads the other plex without a timeout while holding the region
/// exclusively; a hung other plex wedges the read and every write to the region.
#[tokio::test]
async fn f7_read_repair_from_hung_plex_wedges_region() {
    let rig = Rig::new();
    let aggregate = Arc::new(Aggregate::create(&spec(), rig.plexes(), options(), no_hook()).await.unwrap());
    aggregate.write(4 * REGION, &pattern(4, 16)).await.unwrap();
    aggregate.flush().await.unwrap();
    let (label, _) = read_label(rig.disks[0][0].as_ref()).await.unwrap();
    rig.disks[0][0].corrupt(label.data.offset + 4 * REGION + 17, 0x04);
    rig.hang(1);
    let read = {
        let aggregate = aggregate.clone();
        tokio::spawn(async move { aggregate.read(4 * REGION, REGION).await.map(|_| ()) })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let write = tokio::time::timeout(10 * TIMEOUT, aggregate.write(4 * REGION, &pattern(5, 1))).await;
    eprintln!(
        "read finished: {}, write finished: {}, states {:?}",
        read.is_finished(),
        write.is_ok(),
        aggregate.plex_states()
    );
    assert!(write.is_ok(), "a write to the region waited > 10x mirror_timeout behind a read repair");
}

/// A hook that blocks until released.
#[derive(Debug, Default)]
struct GateHook {
    open: AtomicBool,
    calls: AtomicU64,
}

impl DropHook for GateHook {
    fn plex_dropped<'a>(&'a self, _drop: &'a PlexDrop) -> IoFuture<'a, Result<(), String>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::AcqRel);
            while !self.open.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(())
        })
    }
}

/// F8 (robustness): a caller that cancels a write while its drop is being recorded (e.g. an NBD
/// request timeout) leaves `dropping` set forever: every later write hangs.
#[tokio::test]
async fn f8_cancelled_drop_wedges_the_aggregate() {
    let rig = Rig::new();
    let hook = Arc::new(GateHook::default());
    let aggregate = Aggregate::create(&spec(), rig.plexes(), options(), hook.clone()).await.unwrap();
    rig.disks[1][0].set_faults(MemFaults { write_error: true, ..MemFaults::default() });
    let cancelled = tokio::time::timeout(TIMEOUT, aggregate.write(0, &pattern(1, 1))).await;
    assert!(cancelled.is_err());
    hook.open.store(true, Ordering::Release);
    let next = tokio::time::timeout(10 * TIMEOUT, aggregate.write(8 * REGION, &pattern(2, 1))).await;
    eprintln!("hook calls {}, states {:?}", hook.calls.load(Ordering::Acquire), aggregate.plex_states());
    assert!(next.is_ok(), "the next write hangs forever: `dropping` was left set by the cancelled write");
}

/// F9 (robustness): a plex with no devices panics in open instead of returning an error.
#[tokio::test]
async fn f9_empty_plex_panics() {
    let rig = Rig::new();
    drop(Aggregate::create(&spec(), rig.plexes(), options(), no_hook()).await.unwrap());
    let result = Aggregate::open([Vec::new(), rig.plex(1)], options(), no_hook()).await;
    assert!(result.is_err());
}

/// A device for plex 0 whose flushes can be paused and whose data writes (>= 16 KiB) delayed.
#[derive(Debug)]
struct Ctl {
    inner: Arc<MemDevice>,
    pause_flush: tokio::sync::watch::Sender<bool>,
    delay_ms: AtomicU64,
}

impl BlockDevice for Ctl {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn read(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, (Result<(), DeviceError>, AlignedBuf)> {
        self.inner.read(offset, buf)
    }
    fn write(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, (Result<(), DeviceError>, AlignedBuf)> {
        Box::pin(async move {
            let delay = self.delay_ms.load(Ordering::Acquire);
            if buf.len() >= 16384 && delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            self.inner.write(offset, buf).await
        })
    }
    fn flush(&self) -> IoFuture<'_, Result<(), DeviceError>> {
        Box::pin(async move {
            let mut paused = self.pause_flush.subscribe();
            let _ = paused.wait_for(|p| !*p).await;
            self.inner.flush().await
        })
    }
}

/// F10 (S4): a resync-time write W1 whose mark returns after a concurrent drop's `keep_marks`
/// sets `clear_on_release` anyway; a degraded write W4 that shares the region then clears the
/// bit on release although W4's data is on plex 0 only.
#[tokio::test]
async fn f10_clear_on_release_clears_a_degraded_mark() {
    let mem0 = Arc::new(MemDevice::new(8 << 20));
    let ctl = Arc::new(Ctl {
        inner: mem0.clone(),
        pause_flush: tokio::sync::watch::channel(false).0,
        delay_ms: AtomicU64::new(0),
    });
    let (disk_a, disk_b) = (Arc::new(MemDevice::new(4 << 20)), Arc::new(MemDevice::new(4 << 20)));
    let plexes = || -> [Vec<Arc<dyn BlockDevice>>; 2] {
        [
            vec![ctl.clone() as Arc<dyn BlockDevice>],
            vec![disk_a.clone() as Arc<dyn BlockDevice>, disk_b.clone()],
        ]
    };
    let opts = AggregateOptions {
        mirror_timeout: Duration::from_secs(2),
        resync_batch_bytes: REGION,
        resync_bytes_per_second: Some(1),
        ..AggregateOptions::default()
    };
    let aggregate = Arc::new(Aggregate::create(&spec(), plexes(), opts, no_hook()).await.unwrap());
    let size = aggregate.size_bytes();
    // Plex 1 out of date with region 0 dirty, then a resync that parks after its first batch.
    disk_a.set_faults(MemFaults { write_error: true, ..MemFaults::default() });
    aggregate.write(0, &pattern(1, 1)).await.unwrap();
    disk_a.set_faults(MemFaults::default());
    disk_a.reopen();
    aggregate.reattach(1).await.unwrap();
    let resync = aggregate.spawn_resync();
    while aggregate.resync_progress().is_none_or(|p| p.copied_bytes < REGION) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(matches!(aggregate.plex_states()[1], PlexState::Resyncing { .. }));
    eprintln!("parked: {}", aggregate.status().await.bitmap);

    // W3 on plex 1's second disk: fails there after 200 ms -> drop of plex 1.
    disk_b.set_faults(MemFaults {
        write_error: true,
        latency: Duration::from_millis(200),
        ..MemFaults::default()
    });
    let s = 80 * REGION;
    let w3 = {
        let aggregate = aggregate.clone();
        tokio::spawn(async move { aggregate.write(s, &pattern(3, 1)).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    // W1 on region 2 (plex 1's first disk): its mark's flush is held.
    ctl.pause_flush.send_replace(true);
    let w1 = {
        let aggregate = aggregate.clone();
        tokio::spawn(async move { aggregate.write(2 * REGION, &pattern(11, 4)).await })
    };
    tokio::time::sleep(Duration::from_millis(700)).await; // W3 fails on plex 1, its drop snapshots W1
    ctl.delay_ms.store(300, Ordering::Release);
    ctl.pause_flush.send_replace(false);
    tokio::time::sleep(Duration::from_millis(100)).await; // drop recorded; W1 still writing plex 0
    eprintln!("states after drop {:?}", aggregate.plex_states());
    // W4: degraded write of the same region, overlapping W1.
    aggregate.write(2 * REGION, &pattern(14, 4)).await.unwrap();
    w1.await.unwrap().unwrap();
    w3.await.unwrap().unwrap();
    ctl.delay_ms.store(0, Ordering::Release);
    let status = aggregate.status().await;
    eprintln!("after W4: {}", status.bitmap);
    resync.abort();
    let _ = resync.await;
    // Plex 1 comes back and the resync resumes from plex 0's bitmap.
    disk_b.set_faults(MemFaults::default());
    disk_b.reopen();
    aggregate.write(100 * REGION, &pattern(9, 1)).await.unwrap(); // any degraded write persists the bitmap
    eprintln!("after a later degraded write: {}", aggregate.status().await.bitmap);
    drop(aggregate);
    let aggregate = Aggregate::open(plexes(), options(), no_hook()).await.unwrap();
    eprintln!("reopened: states {:?}", aggregate.plex_states());
    aggregate.resync().await.unwrap();
    aggregate.flush().await.unwrap();
    let a = plex_data(&[ctl.clone() as Arc<dyn BlockDevice>], size).await;
    let b = plex_data(&[disk_a.clone() as Arc<dyn BlockDevice>, disk_b.clone()], size).await;
    let diff = a.iter().zip(&b).position(|(x, y)| x != y).map(|at| at as u64 / REGION);
    assert_eq!(diff, None, "plexes differ after resync (region 2: W4 only on plex 0, its bit cleared)");
}

fn no_hook() -> Arc<RecordingHook> {
    Arc::default()
}

/// A resync-time mark made redundant by a write that reached both plexes must not be cleared
/// (nor skipped by the copy) once a drop came after that write: a later degraded write to the
/// same region reaches plex 0 only, and the next resync, in the same aggregate, must copy it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_time_mark_survives_a_drop_that_follows_its_write() {
    let rig = Rig::new();
    let slow = AggregateOptions {
        resync_batch_bytes: REGION,
        resync_bytes_per_second: Some(256 << 10),
        ..options()
    };
    let aggregate = Arc::new(Aggregate::create(&spec(), rig.plexes(), slow, no_hook()).await.unwrap());
    let size = aggregate.size_bytes();
    aggregate.flush().await.unwrap();
    rig.hang(1);
    for region in [20u64, 21, 22, 23] {
        aggregate.write(region * REGION, &pattern(region, 1)).await.unwrap();
    }
    rig.unhang(1);
    aggregate.reattach(1).await.unwrap();
    let resync = aggregate.spawn_resync();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !matches!(aggregate.plex_states()[1], PlexState::Resyncing { .. }) {
        assert!(std::time::Instant::now() < deadline, "the resync did not start");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // W1: region 2 was clean; the write reaches both plexes and its mark becomes redundant.
    aggregate.write(2 * REGION, &pattern(1, 1)).await.unwrap();
    // Plex 1 fails: dropped.
    rig.faults(1, MemFaults { write_error: true, ..MemFaults::default() });
    aggregate.write(5 * REGION, &pattern(5, 1)).await.unwrap();
    assert_eq!(aggregate.plex_states()[1], PlexState::Failed);
    // W4: region 2 again, plex 0 only.
    aggregate.write(2 * REGION + BLOCK_BYTES, &pattern(4, 1)).await.unwrap();
    assert!(matches!(resync.await.unwrap(), Err(AggregateError::TargetDropped(1))));
    rig.faults(1, MemFaults::default());
    rig.disks[1].iter().for_each(|disk| disk.reopen());
    aggregate.reattach(1).await.unwrap();
    aggregate.resync().await.unwrap().unwrap();
    aggregate.flush().await.unwrap();
    assert_eq!(rig.first_difference(size).await, None, "the plexes differ after the resync");
}
