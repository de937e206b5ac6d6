//! Scenarios of a mirrored aggregate on in-memory disks (issue 4): the mirror timeout and the
//! drop (S3, S4), incremental and full resync (S5), split brain, resume after a crash, read
//! repair. Randomised tests print their seed and take `PLEX_SEED`.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use plex::testing::{MirrorRig, RecordingHook, pattern, plex_data};
use plex::{
    Aggregate, AggregateError, AggregateOptions, AggregateSpec, AggregateState, BLOCK_BYTES, DropReason,
    GenerationRule, MemDevice, MemFaults, PeerState, PlexGeneration, PlexState, ResyncLevel, read_label,
};
use rand::{Rng, SeedableRng};

const REGION: u64 = 65536;
const TIMEOUT: Duration = Duration::from_millis(300);

fn spec() -> AggregateSpec {
    plex::testing::test_spec(65536)
}

fn options() -> AggregateOptions {
    plex::testing::test_options(TIMEOUT, 4 * REGION)
}

fn no_hook() -> Arc<RecordingHook> {
    Arc::default()
}

fn seed() -> u64 {
    let seed = std::env::var("PLEX_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("seed {seed} (rerun with PLEX_SEED={seed})");
    seed
}

type Rig = MirrorRig;

async fn create(rig: &Rig, hook: Arc<RecordingHook>) -> Aggregate {
    Aggregate::create(&spec(), rig.plexes(), options(), hook).await.unwrap()
}

#[tokio::test]
async fn a_new_aggregate_mirrors_every_write() {
    let rig = Rig::new();
    let aggregate = create(&rig, Arc::default()).await;
    let size = aggregate.size_bytes();
    assert!(size > 7 << 20, "size {size}");
    aggregate.write(0, &pattern(1, 16)).await.unwrap();
    // Across plex 1's two disks.
    let boundary = (4 << 20) - 40 * BLOCK_BYTES;
    aggregate.write(boundary, &pattern(2, 64)).await.unwrap();
    aggregate.flush().await.unwrap();
    assert_eq!(aggregate.read(boundary, 64 * BLOCK_BYTES).await.unwrap(), pattern(2, 64));
    let status = aggregate.status().await;
    assert_eq!(status.state, AggregateState::MirroredNormal);
    assert_eq!(status.to_string().lines().next(), Some("state: mirrored,normal"));
    assert!(status.to_string().contains("plex1: normal, generation 1"), "{status}");
    assert!(status.bitmap.ends_with(" 0 dirty (0.0%)"), "{}", status.bitmap);
    rig.assert_identical(size).await;
    // Bad ranges are errors.
    assert!(matches!(aggregate.write(size, &pattern(1, 1)).await, Err(AggregateError::Range { .. })));
    assert!(matches!(aggregate.read(3, 4096).await, Err(AggregateError::Range { .. })));
    assert!(matches!(aggregate.read(0, 0).await, Err(AggregateError::Range { .. })));
    // Labelled disks are never overwritten by a create.
    assert!(matches!(
        Aggregate::create(&spec(), rig.plexes(), options(), no_hook()).await,
        Err(AggregateError::Invalid(_))
    ));
}

/// Issue 4: plex hangs → timeout → dropped → writes continue → plex returns → incremental
/// resync → plexes byte-identical.
#[tokio::test]
async fn a_hung_plex_is_dropped_at_the_timeout_and_resynced_incrementally() {
    let rig = Rig::new();
    let hook = Arc::new(RecordingHook::default());
    let aggregate = create(&rig, hook.clone()).await;
    let size = aggregate.size_bytes();
    aggregate.write(0, &pattern(1, 64)).await.unwrap();
    // Durable on both: a drop need not mark it (an unflushed one would be marked, see
    // `writes_not_yet_flushed_on_a_dropped_plex_are_resynced`).
    aggregate.flush().await.unwrap();

    rig.hang(1);
    let started = Instant::now();
    aggregate.write(5 * REGION, &pattern(2, 2)).await.unwrap();
    assert!(started.elapsed() >= TIMEOUT, "completed before the mirror timeout without plex 1");
    let drops = hook.drops();
    assert_eq!(drops.len(), 1);
    assert_eq!((drops[0].plex, drops[0].reason), (1, DropReason::Timeout));
    assert_eq!(drops[0].survivor_generation, PlexGeneration(2));
    let status = aggregate.status().await;
    assert_eq!(status.state, AggregateState::MirrorDegraded);
    assert_eq!(status.to_string().lines().nth(2), Some("plex1: out_of_date, generation 1"), "{status}");
    let (label, _) = read_label(rig.disks[0][0].as_ref()).await.unwrap();
    assert_eq!(label.peer_state, PeerState::OutOfDate);
    assert_eq!((label.plex_generation, label.peer_sync_generation), (PlexGeneration(2), PlexGeneration(1)));

    // Writes go on at once, plex 0 alone.
    let started = Instant::now();
    for region in [9u64, 10, 40] {
        aggregate.write(region * REGION + BLOCK_BYTES, &pattern(region, 3)).await.unwrap();
    }
    assert!(started.elapsed() < TIMEOUT, "degraded writes still wait for the dropped plex");
    assert!(aggregate.status().await.bitmap.contains(" 4 dirty "), "{}", aggregate.status().await.bitmap);
    assert_eq!(aggregate.read(10 * REGION + BLOCK_BYTES, 3 * BLOCK_BYTES).await.unwrap(), pattern(10, 3));

    // A read is served by plex 0 (plex 1 is never read while out of date).
    assert_eq!(aggregate.read(0, 4 * BLOCK_BYTES).await.unwrap(), pattern(1, 4));
    rig.unhang(1);
    let decision = aggregate.reattach(1).await.unwrap();
    assert_eq!(decision.rule, GenerationRule::PeerMovedOn);
    assert_eq!(decision.resync, Some((0, 1, ResyncLevel::Incremental)));
    let progress = aggregate.resync().await.unwrap().unwrap();
    assert_eq!(progress.level, ResyncLevel::Incremental);
    assert_eq!(progress.copied_bytes, 4 * REGION, "an incremental resync copies the dirty regions only");
    assert!(progress.complete && progress.percent() == 100);
    let status = aggregate.status().await;
    assert_eq!(status.state, AggregateState::MirroredNormal, "{status}");
    assert!(status.bitmap.contains(" 0 dirty "), "{}", status.bitmap);
    aggregate.flush().await.unwrap();
    rig.assert_identical(size).await;
    for disk in rig.disks.iter().flatten() {
        let (label, _) = read_label(disk.as_ref()).await.unwrap();
        assert_eq!(label.plex_state, PlexState::Normal);
        assert_eq!(label.peer_state, PeerState::Normal);
        assert_eq!(
            (label.plex_generation, label.peer_sync_generation),
            (PlexGeneration(2), PlexGeneration(2))
        );
    }
}

/// S4: every write in flight to the plex when it is dropped is marked and resynced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_in_flight_at_the_drop_are_resynced() {
    let rig = Rig::new();
    let hook = Arc::new(RecordingHook::default());
    let aggregate = Arc::new(create(&rig, hook.clone()).await);
    let size = aggregate.size_bytes();
    rig.hang(1);
    let writes: Vec<_> = (0..8u64)
        .map(|i| {
            let aggregate = aggregate.clone();
            tokio::spawn(async move { aggregate.write((3 + 7 * i) * REGION, &pattern(100 + i, 4)).await })
        })
        .collect();
    for write in writes {
        write.await.unwrap().unwrap();
    }
    assert_eq!(hook.drops().len(), 1, "one drop for all the writes that waited");
    assert!(aggregate.status().await.bitmap.contains(" 8 dirty "), "{}", aggregate.status().await.bitmap);
    rig.unhang(1);
    aggregate.reattach(1).await.unwrap();
    aggregate.resync().await.unwrap().unwrap();
    rig.assert_identical(size).await;
    for i in 0..8u64 {
        assert_eq!(aggregate.read((3 + 7 * i) * REGION, 4 * BLOCK_BYTES).await.unwrap(), pattern(100 + i, 4));
    }
}

/// S3: the write that found the plex gone completes only once the hook has recorded the drop.
#[tokio::test]
async fn writes_stall_until_the_drop_is_recorded() {
    let rig = Rig::new();
    let hook = Arc::new(RecordingHook::refusing(3));
    let aggregate = create(&rig, hook.clone()).await;
    rig.disks[1][0].set_faults(MemFaults { write_error: true, ..MemFaults::default() });
    let started = Instant::now();
    let aggregate = Arc::new(aggregate);
    // A second write arrives while the drop is still unrecorded: it must wait for it too.
    let second = {
        let (aggregate, hook) = (aggregate.clone(), hook.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            aggregate.write(8 * REGION, &pattern(2, 1)).await.unwrap();
            hook.drops().len()
        })
    };
    aggregate.write(0, &pattern(1, 1)).await.unwrap();
    assert_eq!(hook.drops().len(), 1, "the write completed before its drop was recorded");
    assert_eq!(second.await.unwrap(), 1, "a write during the drop completed before it was recorded");
    assert_eq!(hook.drops()[0].reason, DropReason::Failed);
    // Three refusals with back-off (50 + 100 + 200 ms); a failed plex is not waited for.
    assert!(started.elapsed() >= Duration::from_millis(350), "{:?}", started.elapsed());
    assert_eq!(aggregate.plex_states()[1], PlexState::Failed);
    assert!(aggregate.status().await.to_string().contains("plex1: failed"));
    // A failed plex comes back once its disks are reopened.
    rig.disks[1][0].reopen();
    rig.disks[1][0].set_faults(MemFaults::default());
    aggregate.reattach(1).await.unwrap();
    aggregate.resync().await.unwrap().unwrap();
    rig.assert_identical(aggregate.size_bytes()).await;
}

/// Seeds 002: a replaced (blank) disk is the target of a full resync from the good plex,
/// never the reverse, whichever plex it is in.
#[tokio::test]
async fn a_replaced_disk_gets_a_full_resync_from_the_good_plex() {
    let rig = Rig::new();
    let aggregate = create(&rig, Arc::default()).await;
    let size = aggregate.size_bytes();
    for region in 0..size / REGION {
        aggregate.write(region * REGION, &pattern(region, 16)).await.unwrap();
    }
    aggregate.flush().await.unwrap();
    drop(aggregate);
    let good = plex_data(&rig.plex(1), size).await;

    let mut rig = rig;
    rig.disks[0] = vec![Arc::new(MemDevice::new(8 << 20))];
    let aggregate = Aggregate::open(rig.plexes(), options(), no_hook()).await.unwrap();
    assert_eq!(aggregate.plex_states()[0], PlexState::OutOfDate);
    assert_eq!(aggregate.status().await.state, AggregateState::MirrorDegraded);
    // Reads come from the good plex meanwhile.
    assert_eq!(aggregate.read(3 * REGION, REGION).await.unwrap(), pattern(3, 16));
    let progress = aggregate.resync().await.unwrap().unwrap();
    assert_eq!(progress.level, ResyncLevel::Full);
    assert_eq!(progress.copied_bytes, size, "a full resync copies everything");
    assert_eq!(plex_data(&rig.plex(1), size).await, good, "the good plex was written by the resync");
    rig.assert_identical(size).await;
    let (label, _) = read_label(rig.disks[0][0].as_ref()).await.unwrap();
    assert_eq!(label.plex_state, PlexState::Normal);
    drop(aggregate);
    // Reopened, it is in sync.
    let aggregate = Aggregate::open(rig.plexes(), options(), no_hook()).await.unwrap();
    assert_eq!(aggregate.status().await.state, AggregateState::MirroredNormal);
}

/// Both plexes written independently (each opened while the other was unreadable): refused,
/// until the operator names the plex whose changes are discarded.
#[tokio::test]
async fn a_split_brain_is_refused_until_a_plex_is_discarded() {
    let rig = Rig::new();
    let aggregate = create(&rig, Arc::default()).await;
    let size = aggregate.size_bytes();
    aggregate.write(0, &pattern(1, 64)).await.unwrap();
    aggregate.flush().await.unwrap();
    drop(aggregate);
    let unreadable = MemFaults { read_error: true, ..MemFaults::default() };
    // Site A alone writes regions 0 and 2.
    rig.disks[1].iter().for_each(|disk| disk.set_faults(unreadable.clone()));
    let hook = Arc::new(RecordingHook::default());
    let a = Aggregate::open(rig.plexes(), options(), hook.clone()).await.unwrap();
    assert_eq!(hook.drops().len(), 1, "a plex unreadable at open is dropped through the hook");
    a.write(0, &pattern(10, 1)).await.unwrap();
    a.write(2 * REGION, &pattern(12, 1)).await.unwrap();
    a.flush().await.unwrap();
    drop(a);
    rig.disks[1].iter().for_each(|disk| disk.set_faults(MemFaults::default()));
    // Site B alone writes regions 2 and 5.
    rig.disks[0][0].set_faults(unreadable);
    let b = Aggregate::open(rig.plexes(), options(), no_hook()).await.unwrap();
    b.write(2 * REGION, &pattern(22, 1)).await.unwrap();
    b.write(5 * REGION, &pattern(25, 1)).await.unwrap();
    b.flush().await.unwrap();
    drop(b);
    rig.disks[0][0].set_faults(MemFaults::default());

    let refused = Aggregate::open(rig.plexes(), options(), no_hook()).await;
    assert!(matches!(refused, Err(AggregateError::SplitBrain { g0: 2, s0: 1, g1: 3, s1: 1 })), "{refused:?}");
    // Both plexes are untouched by the refusal.
    let plex0 = plex_data(&rig.plex(0), size).await;
    // Discarding is refused where the rules know the direction.
    let aggregate = Aggregate::open_discarding(rig.plexes(), options(), no_hook(), 1).await.unwrap();
    assert_eq!(aggregate.plex_states()[1], PlexState::OutOfDate);
    aggregate.resync().await.unwrap().unwrap();
    rig.assert_identical(size).await;
    assert_eq!(plex_data(&rig.plex(0), size).await, plex0, "the kept plex changed");
    assert_eq!(aggregate.read(2 * REGION, BLOCK_BYTES).await.unwrap(), pattern(12, 1));
    // Plex 1's own change to region 5 is discarded too (it was in plex 1's bitmap).
    assert_eq!(aggregate.read(5 * REGION, BLOCK_BYTES).await.unwrap().as_slice(), &[0u8; 4096][..]);
    drop(aggregate);
    assert!(matches!(
        Aggregate::open_discarding(rig.plexes(), options(), no_hook(), 0).await,
        Err(AggregateError::Invalid(_))
    ));
}

/// A crash in the middle of a resync: on restart the target's label says `resyncing`, it is
/// never taken as a source, and the resync resumes from the bitmap instead of starting over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_interrupted_by_a_crash_resumes_and_completes() {
    let rig = Rig::new();
    let aggregate = Arc::new(create(&rig, Arc::default()).await);
    let size = aggregate.size_bytes();
    let regions = size / REGION;
    rig.hang(1);
    for region in 0..regions {
        aggregate.write(region * REGION, &pattern(region + 7, 16)).await.unwrap();
    }
    aggregate.flush().await.unwrap();
    rig.unhang(1);
    aggregate.reattach(1).await.unwrap();
    let resync = {
        let aggregate = aggregate.clone();
        tokio::spawn(async move { aggregate.resync().await })
    };
    // Let it copy part of the way, then crash.
    let deadline = Instant::now() + Duration::from_secs(30);
    while aggregate.resync_progress().is_none_or(|p| p.copied_bytes < 32 * REGION) {
        assert!(Instant::now() < deadline, "the resync copied nothing: {:?}", aggregate.resync_progress());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    resync.abort();
    let _ = resync.await;
    let crashed = rig.crashed();
    drop(aggregate);

    let aggregate = Aggregate::open(crashed.plexes(), options(), no_hook()).await.unwrap();
    assert!(matches!(
        aggregate.plex_states()[1],
        PlexState::Resyncing { level: ResyncLevel::Incremental, .. }
    ));
    assert_eq!(aggregate.status().await.state, AggregateState::Resyncing);
    let progress = aggregate.resync().await.unwrap().unwrap();
    assert!(
        progress.copied_bytes < size,
        "the resumed resync started over ({} bytes)",
        progress.copied_bytes
    );
    crashed.assert_identical(size).await;
    for region in [0, regions / 2, regions - 1] {
        assert_eq!(aggregate.read(region * REGION, REGION).await.unwrap(), pattern(region + 7, 16));
    }
}

/// DESIGN §6.3: a block that fails its checksum is served from the other plex and rewritten.
#[tokio::test]
async fn a_bit_flip_is_repaired_from_the_other_plex() {
    let rig = Rig::new();
    let aggregate = create(&rig, Arc::default()).await;
    aggregate.write(4 * REGION, &pattern(4, 16)).await.unwrap();
    aggregate.flush().await.unwrap();
    let (label, _) = read_label(rig.disks[0][0].as_ref()).await.unwrap();
    rig.disks[0][0].corrupt(label.data.offset + 4 * REGION + 3 * BLOCK_BYTES + 17, 0x04);
    assert_eq!(aggregate.read(4 * REGION, REGION).await.unwrap(), pattern(4, 16));
    assert_eq!(aggregate.counters().read_repairs, 1);
    // The bad copy was rewritten.
    rig.assert_identical(aggregate.size_bytes()).await;
    assert_eq!(aggregate.read(4 * REGION, REGION).await.unwrap(), pattern(4, 16));
    assert_eq!(aggregate.counters().read_repairs, 1);
}

/// DESIGN §6.3: no repair from a plex that is not `normal`, nor of a dirty region.
#[tokio::test]
async fn a_bit_flip_in_a_dirty_region_is_an_error() {
    let rig = Rig::new();
    let aggregate = create(&rig, Arc::default()).await;
    aggregate.write(0, &pattern(1, 16)).await.unwrap();
    rig.hang(1);
    aggregate.write(4 * REGION, &pattern(4, 16)).await.unwrap();
    rig.unhang(1);
    let (label, _) = read_label(rig.disks[0][0].as_ref()).await.unwrap();
    rig.disks[0][0].corrupt(label.data.offset + 4 * REGION + 17, 0x04);
    let read = aggregate.read(4 * REGION, REGION).await;
    assert!(matches!(read, Err(AggregateError::Unrepairable { plex: 0, .. })), "{read:?}");
    assert_eq!((aggregate.counters().read_repairs, aggregate.counters().read_errors), (0, 1));
    // Plex 1's stale copy of the region was not used, nor was it touched.
    let stale = plex_data(&rig.plex(1), 5 * REGION).await;
    assert!(stale[4 * REGION as usize..].iter().all(|&b| b == 0));
}

/// Resync copies hold their regions: writes racing the resync (seeded) end identical on both
/// plexes, and the resync converges while they run. Disks with latency widen the window in
/// which a copy that read the source could overwrite a newer write on the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_during_a_resync_are_never_lost_on_the_target() {
    let seed = seed();
    let rig = Rig::new();
    let aggregate = Arc::new(
        Aggregate::create(
            &spec(),
            rig.plexes(),
            AggregateOptions {
                mirror_timeout: TIMEOUT,
                resync_batch_bytes: REGION,
                ..AggregateOptions::default()
            },
            no_hook(),
        )
        .await
        .unwrap(),
    );
    let size = aggregate.size_bytes();
    let hot_blocks = 24 * REGION / BLOCK_BYTES;
    rig.hang(1);
    for region in 0..24 {
        aggregate.write(region * REGION, &pattern(region, 16)).await.unwrap();
    }
    rig.unhang(1);
    aggregate.reattach(1).await.unwrap();
    let slow = MemFaults { latency: Duration::from_micros(300), ..MemFaults::default() };
    rig.disks.iter().flatten().for_each(|disk| disk.set_faults(slow.clone()));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..4u64)
        .map(|writer| {
            let (aggregate, done) = (aggregate.clone(), done.clone());
            tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ writer);
                let mut writes = 0;
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    let block = rng.random_range(0..hot_blocks - 2);
                    aggregate.write(block * BLOCK_BYTES, &pattern(rng.random(), 2)).await.unwrap();
                    writes += 1;
                }
                writes
            })
        })
        .collect();
    aggregate.resync().await.unwrap().unwrap();
    done.store(true, std::sync::atomic::Ordering::Release);
    let mut writes = 0;
    for writer in writers {
        writes += writer.await.unwrap();
    }
    eprintln!("{writes} writes raced the resync");
    assert!(writes > 20, "too few writes raced the resync to test anything");
    assert_eq!(aggregate.status().await.state, AggregateState::MirroredNormal);
    rig.assert_identical(size).await;
}

/// A plex that hangs on a read is dropped at the timeout and the read is served by the other.
#[tokio::test]
async fn a_read_from_a_hung_plex_is_served_by_the_other_after_the_timeout() {
    let rig = Rig::new();
    let hook = Arc::new(RecordingHook::default());
    let aggregate = Arc::new(create(&rig, hook.clone()).await);
    aggregate.write(0, &pattern(1, 16)).await.unwrap();
    rig.hang(0);
    let started = Instant::now();
    assert_eq!(aggregate.read(0, REGION).await.unwrap(), pattern(1, 16));
    assert!(started.elapsed() >= TIMEOUT);
    assert_eq!(aggregate.plex_states(), [PlexState::OutOfDate, PlexState::Normal]);
    assert_eq!(hook.drops().len(), 1);
    rig.unhang(0);
    aggregate.reattach(0).await.unwrap();
    let resync = aggregate.spawn_resync();
    assert!(resync.await.unwrap().unwrap().is_some_and(|progress| progress.complete));
    assert_eq!(aggregate.status().await.state, AggregateState::MirroredNormal);
}

/// A crash between the two label writes that complete a resync leaves equal generations and a
/// source that still records its peer `resyncing`. Opening sets that back to `normal`, so the
/// next drop still starts a new generation (without one, a later split brain would read as
/// "in sync").
#[tokio::test]
async fn labels_left_by_a_crash_at_resync_completion_still_start_a_generation_at_the_next_drop() {
    let rig = Rig::new();
    drop(create(&rig, no_hook()).await);
    let disk = rig.disks[0][0].clone();
    let (mut label, _) = read_label(disk.as_ref()).await.unwrap();
    label.peer_state = PeerState::Resyncing;
    plex::write_label(disk.as_ref(), &mut label).await.unwrap();

    let hook = Arc::new(RecordingHook::default());
    let aggregate = Aggregate::open(rig.plexes(), options(), hook.clone()).await.unwrap();
    assert_eq!(aggregate.status().await.state, AggregateState::MirroredNormal);
    assert_eq!(read_label(disk.as_ref()).await.unwrap().0.peer_state, PeerState::Normal);
    rig.hang(1);
    aggregate.write(0, &pattern(1, 1)).await.unwrap();
    assert_eq!(hook.drops()[0].survivor_generation, PlexGeneration(2));
    rig.unhang(1);
}

/// STYLE 14: repairs, I/O errors (checksum, timeout), drops and resync bytes reach the
/// registered metrics with the aggregate and plex as labels.
#[tokio::test]
async fn metrics_count_repairs_errors_drops_and_resync_bytes() {
    let rig = Rig::new();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = plex::PlexMetrics::default();
    metrics.register(&mut registry);
    let options = AggregateOptions { metrics, ..options() };
    let aggregate = Aggregate::create(&spec(), rig.plexes(), options, no_hook()).await.unwrap();
    aggregate.write(0, &pattern(1, 16)).await.unwrap();
    aggregate.flush().await.unwrap();
    let (label, _) = read_label(rig.disks[0][0].as_ref()).await.unwrap();
    rig.disks[0][0].corrupt(label.data.offset + 5, 1);
    aggregate.read(0, REGION).await.unwrap();
    rig.hang(1);
    aggregate.write(REGION, &pattern(2, 16)).await.unwrap();
    rig.unhang(1);
    aggregate.reattach(1).await.unwrap();
    aggregate.resync().await.unwrap();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let agg = "aggregate=\"02020202020202020202020202020202\"";
    for line in [
        format!("plex_read_repairs_total{{{agg},plex=\"0\"}} 1"),
        format!("plex_io_errors_total{{{agg},plex=\"0\",kind=\"checksum\"}} 1"),
        format!("plex_io_errors_total{{{agg},plex=\"1\",kind=\"timeout\"}} 1"),
        format!("plex_drops_total{{{agg},plex=\"1\"}} 1"),
        format!("plex_resync_copied_bytes_total{{{agg},plex=\"1\"}} 65536"),
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
    }
}

/// A device that failed stays failed until reopened (S10); `reattach_with` takes the reopened
/// device, so a failed plex can be resynced without closing the aggregate.
#[tokio::test]
async fn a_failed_plex_comes_back_on_reopened_devices() {
    let mut rig = Rig::new();
    let aggregate = create(&rig, no_hook()).await;
    aggregate.write(0, &pattern(1, 16)).await.unwrap();
    aggregate.flush().await.unwrap();
    rig.disks[1][1].set_faults(MemFaults { write_error: true, ..MemFaults::default() });
    // Plex 1's second disk starts at 4 MiB minus its metadata: write across it.
    aggregate.write((4 << 20) - 8 * REGION, &pattern(2, 256)).await.unwrap();
    assert_eq!(aggregate.plex_states()[1], PlexState::Failed);
    // The old device objects refuse writes for good; "reopen" them as new objects.
    rig.disks[1] = rig.disks[1].iter().map(|disk| Arc::new(MemDevice::from_image(disk.snapshot()))).collect();
    aggregate.reattach_with(1, rig.plex(1)).await.unwrap();
    aggregate.resync().await.unwrap().unwrap();
    assert_eq!(aggregate.status().await.state, AggregateState::MirroredNormal);
    rig.assert_identical(aggregate.size_bytes()).await;
    assert!(matches!(aggregate.reattach_with(0, Vec::new()).await, Err(AggregateError::Invalid(_))));
}
