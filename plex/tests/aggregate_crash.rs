//! Crash images of the label and bitmap persist protocol (issue 4): every write and flush the
//! aggregate issues is journalled; for every prefix of the journal, the disks are rebuilt as a
//! power loss at that point would leave them (unflushed writes all lost, or all kept), the
//! aggregate is reopened, the writes that were not yet durable are written again (as the
//! controller's NVLog replay does, S8: their records are not released before the CP that
//! flushes them), the aggregate is resynced, and then
//! - the plexes are byte-identical: every region written while the other plex was not
//!   `normal` was marked dirty (S4) and the direction was right (S5); a flushed write, whose
//!   record the controller may have released, is on both plexes only through the bitmap;
//! - every write that was flushed before the crash reads back.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use plex::testing::{RecordingHook, pattern, plex_data};
use plex::{
    Aggregate, AggregateOptions, AggregateSpec, AlignedBuf, BLOCK_BYTES, BlockDevice, DeviceError, IoFuture,
    MemDevice,
};

const REGION: u64 = 65536;

#[derive(Clone, Debug)]
enum Op {
    Write { device: usize, offset: u64, data: Vec<u8> },
    Flush { device: usize },
}

/// A device that journals its completed writes and flushes, in completion order.
#[derive(Debug)]
struct Journaled {
    id: usize,
    inner: Arc<MemDevice>,
    log: Arc<Mutex<Vec<Op>>>,
}

impl BlockDevice for Journaled {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }

    fn read(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, (Result<(), DeviceError>, AlignedBuf)> {
        self.inner.read(offset, buf)
    }

    fn write(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, (Result<(), DeviceError>, AlignedBuf)> {
        Box::pin(async move {
            let (result, buf) = self.inner.write(offset, buf).await;
            if result.is_ok() {
                let data = buf.as_slice().to_vec();
                self.log.lock().unwrap().push(Op::Write { device: self.id, offset, data });
            }
            (result, buf)
        })
    }

    fn flush(&self) -> IoFuture<'_, Result<(), DeviceError>> {
        Box::pin(async move {
            let result = self.inner.flush().await;
            if result.is_ok() {
                self.log.lock().unwrap().push(Op::Flush { device: self.id });
            }
            result
        })
    }
}

fn options() -> AggregateOptions {
    plex::testing::test_options(Duration::from_millis(200), 2 * REGION)
}

/// Rebuilds every device as a power loss after `prefix` journal entries leaves it.
fn crash_images(initial: &[Vec<u8>], log: &[Op], prefix: usize, keep_unflushed: bool) -> Vec<Arc<MemDevice>> {
    let mut durable: Vec<Vec<u8>> = initial.to_vec();
    let mut pending: Vec<Vec<(u64, &[u8])>> = vec![Vec::new(); initial.len()];
    for op in &log[..prefix] {
        match op {
            Op::Write { device, offset, data } => pending[*device].push((*offset, data)),
            Op::Flush { device } => {
                for (offset, data) in pending[*device].drain(..) {
                    let at = offset as usize;
                    durable[*device][at..at + data.len()].copy_from_slice(data);
                }
            }
        }
    }
    durable
        .into_iter()
        .zip(pending)
        .map(|(mut image, pending)| {
            if keep_unflushed {
                for (offset, data) in pending {
                    let at = offset as usize;
                    image[at..at + data.len()].copy_from_slice(data);
                }
            }
            Arc::new(MemDevice::from_image(image))
        })
        .collect()
}

/// (journal length at its start, journal length once a flush made it durable, offset, seed,
/// blocks) of every write of a scenario.
type Writes = Vec<(usize, usize, u64, u64, u64)>;

fn spec() -> AggregateSpec {
    plex::testing::test_spec(REGION as u32)
}

/// Plex 0 is disk 0; plex 1 is disks 1 and 2, concatenated.
fn plexes(devices: &[Arc<dyn BlockDevice>]) -> [Vec<Arc<dyn BlockDevice>>; 2] {
    [vec![devices[0].clone()], vec![devices[1].clone(), devices[2].clone()]]
}

/// Three in-memory disks and their journalled views.
/// The disks, the shared journal, and the journalled views of the disks.
type JournaledDisks = (Vec<Arc<MemDevice>>, Arc<Mutex<Vec<Op>>>, Vec<Arc<dyn BlockDevice>>);

fn journaled_disks() -> JournaledDisks {
    let disks: Vec<Arc<MemDevice>> = vec![
        Arc::new(MemDevice::new(4 << 20)),
        Arc::new(MemDevice::new(2 << 20)),
        Arc::new(MemDevice::new(2 << 20)),
    ];
    let log = Arc::new(Mutex::new(Vec::new()));
    let journaled = disks
        .iter()
        .enumerate()
        .map(|(id, inner)| {
            Arc::new(Journaled { id, inner: inner.clone(), log: log.clone() }) as Arc<dyn BlockDevice>
        })
        .collect();
    (disks, log, journaled)
}

/// Crashes after every prefix of `log`, reopens, replays the writes not yet durable, resyncs,
/// and checks that the plexes are identical and every write reads back.
async fn check_every_crash(initial: &[Vec<u8>], log: &[Op], writes: &Writes, size: u64) {
    eprintln!("{} journal entries", log.len());
    assert!(log.len() > 20, "the scenario did too little I/O to be a test");
    for prefix in 0..=log.len() {
        for keep_unflushed in [false, true] {
            let images = crash_images(initial, log, prefix, keep_unflushed);
            let devices: Vec<Arc<dyn BlockDevice>> =
                images.iter().map(|image| image.clone() as Arc<dyn BlockDevice>).collect();
            let context =
                format!("crash after {prefix} of {} entries (unflushed kept: {keep_unflushed})", log.len());
            let aggregate = Aggregate::open(plexes(&devices), options(), Arc::new(RecordingHook::default()))
                .await
                .unwrap_or_else(|e| panic!("{context}: open failed: {e}"));
            // NVLog replay: the writes not yet durable at the crash, written again.
            for (started, durable_at, offset, seed, blocks) in writes {
                if *started <= prefix && prefix < *durable_at {
                    aggregate.write(*offset, &pattern(*seed, *blocks)).await.unwrap();
                }
            }
            aggregate.resync().await.unwrap_or_else(|e| panic!("{context}: resync failed: {e}"));
            let a = plex_data(&devices[..1], size).await;
            let b = plex_data(&devices[1..], size).await;
            if let Some(at) = a.iter().zip(&b).position(|(x, y)| x != y) {
                panic!("{context}: the plexes differ at byte {at} (region {})", at as u64 / REGION);
            }
            for (started, _, offset, seed, blocks) in writes {
                if *started <= prefix {
                    let data = aggregate.read(*offset, blocks * BLOCK_BYTES).await;
                    let data = data.unwrap_or_else(|e| panic!("{context}: read of a write failed: {e}"));
                    assert_eq!(data, pattern(*seed, *blocks), "{context}: a write at {offset} is lost");
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_any_crash_every_region_written_alone_is_resynced() {
    let (disks, log, journaled) = journaled_disks();
    let aggregate =
        Aggregate::create(&spec(), plexes(&journaled), options(), Arc::new(RecordingHook::default()))
            .await
            .unwrap();
    let size = aggregate.size_bytes();
    aggregate.write(REGION, &pattern(1, 4)).await.unwrap();
    aggregate.flush().await.unwrap();
    let initial: Vec<Vec<u8>> = disks.iter().map(|disk| disk.snapshot()).collect();
    log.lock().unwrap().clear();

    let mut writes: Writes = vec![(0, 0, REGION, 1, 4)];
    let mut write = async |offset: u64, seed: u64, blocks: u64| {
        let started = log.lock().unwrap().len();
        aggregate.write(offset, &pattern(seed, blocks)).await.unwrap();
        aggregate.flush().await.unwrap();
        writes.push((started, log.lock().unwrap().len(), offset, seed, blocks));
    };
    // The second plex hangs: the write waits for the timeout, the plex is dropped.
    disks[1].hang();
    disks[2].hang();
    write(3 * REGION + BLOCK_BYTES, 3, 2).await;
    // Across plex 1's disk boundary.
    write((2 << 20) - 2 * BLOCK_BYTES - 16384, 4, 8).await;
    write(5 * REGION, 5, 16).await;
    disks[1].unhang();
    disks[2].unhang();
    aggregate.reattach(1).await.unwrap();
    aggregate.resync().await.unwrap().unwrap();
    write(7 * REGION, 7, 1).await;
    drop(aggregate);
    let log = log.lock().unwrap().clone();
    check_every_crash(&initial, &log, &writes, size).await;
}

/// The same check with writes left unflushed across the drop (a drop must mark what the
/// dropped plex never made durable) and writes racing the resync (their marks may be cleared
/// only once the target flushed them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_any_crash_unflushed_and_resync_time_writes_are_on_both_plexes() {
    let (disks, log, journaled) = journaled_disks();
    let aggregate = Arc::new(
        Aggregate::create(&spec(), plexes(&journaled), options(), Arc::new(RecordingHook::default()))
            .await
            .unwrap(),
    );
    let size = aggregate.size_bytes();
    let initial: Vec<Vec<u8>> = disks.iter().map(|disk| disk.snapshot()).collect();
    log.lock().unwrap().clear();

    let writes = Arc::new(Mutex::new(Writes::new()));
    // Writes completed since the last flush: made durable by the next one.
    let unflushed = Arc::new(Mutex::new(Vec::<usize>::new()));
    let write = {
        let (aggregate, log, writes, unflushed) =
            (aggregate.clone(), log.clone(), writes.clone(), unflushed.clone());
        move |offset: u64, seed: u64, blocks: u64| {
            let (aggregate, log, writes, unflushed) =
                (aggregate.clone(), log.clone(), writes.clone(), unflushed.clone());
            async move {
                let started = log.lock().unwrap().len();
                aggregate.write(offset, &pattern(seed, blocks)).await.unwrap();
                let mut writes = writes.lock().unwrap();
                writes.push((started, usize::MAX, offset, seed, blocks));
                unflushed.lock().unwrap().push(writes.len() - 1);
            }
        }
    };
    let flush = {
        let (aggregate, log, writes, unflushed) =
            (aggregate.clone(), log.clone(), writes.clone(), unflushed.clone());
        move || {
            let (aggregate, log, writes, unflushed) =
                (aggregate.clone(), log.clone(), writes.clone(), unflushed.clone());
            async move {
                let covered: Vec<usize> = std::mem::take(&mut *unflushed.lock().unwrap());
                aggregate.flush().await.unwrap();
                let durable_at = log.lock().unwrap().len();
                let mut writes = writes.lock().unwrap();
                for index in covered {
                    writes[index].1 = durable_at;
                }
            }
        }
    };
    // Two writes land on both plexes unflushed; then plex 1 hangs and is dropped by a third.
    write(0, 1, 16).await;
    write(2 * REGION, 2, 4).await;
    disks[1].hang();
    disks[2].hang();
    write(4 * REGION, 4, 1).await;
    write(6 * REGION, 6, 2).await;
    flush().await;
    write(8 * REGION, 8, 1).await;
    disks[1].unhang();
    disks[2].unhang();
    aggregate.reattach(1).await.unwrap();
    // Writes race the resync, to regions it copies and to regions it does not.
    let resync = aggregate.spawn_resync();
    for (region, seed) in [(2u64, 12u64), (10, 20), (4, 14), (12, 22)] {
        write(region * REGION + 8 * BLOCK_BYTES, seed, 1).await;
    }
    flush().await;
    resync.await.unwrap().unwrap();
    write(14 * REGION, 24, 1).await;
    flush().await;
    drop(aggregate);
    let log = log.lock().unwrap().clone();
    let writes = writes.lock().unwrap().clone();
    check_every_crash(&initial, &log, &writes, size).await;
}
