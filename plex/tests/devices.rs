//! Every block device passes the same conformance body; the in-memory device's faults do
//! what they say.
#![allow(clippy::unwrap_used)]

use std::future::{Future, poll_fn};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use plex::testing::{CONFORMANCE_BLOCKS, conformance, join_all, pattern};
use plex::uring::{DirectIo, UringDevice, UringOptions};
use plex::{AlignedBuf, BLOCK_BYTES, BlockDevice, DeviceError, FileDevice, MemDevice, MemFaults};

const SIZE: u64 = CONFORMANCE_BLOCKS * BLOCK_BYTES;

#[tokio::test]
async fn mem_device_conforms() {
    conformance(&MemDevice::new(SIZE)).await;
}

#[tokio::test]
async fn file_device_conforms() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let device = FileDevice::create(&dir.path().join("disk"), SIZE).unwrap();
    conformance(&device).await;
    // Reopened, it still holds what was written.
    drop(device);
    let device = FileDevice::open(&dir.path().join("disk")).unwrap();
    let (result, buf) = device.read(0, AlignedBuf::zeroed(4096)).await;
    result.unwrap();
    assert_eq!(buf, pattern(1, 1), "the conformance body's first write");
}

#[test]
fn file_device_refuses_odd_sizes_and_existing_files() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    assert!(FileDevice::create(&dir.path().join("odd"), 5000).is_err());
    std::fs::write(dir.path().join("short"), b"not a disk").unwrap();
    assert!(FileDevice::open(&dir.path().join("short")).is_err());
    assert!(FileDevice::create(&dir.path().join("short"), SIZE).is_err(), "create clobbered a file");
}

#[tokio::test]
async fn eio_on_write_latches_the_device_until_reopened() {
    let device = MemDevice::new(SIZE);
    device.set_faults(MemFaults { write_error: true, ..MemFaults::default() });
    let (result, _) = device.write(0, pattern(1, 1)).await;
    assert!(matches!(result, Err(DeviceError::Io { op: "write", .. })));
    device.set_faults(MemFaults::default());
    let (result, _) = device.write(0, pattern(1, 1)).await;
    assert!(matches!(result, Err(DeviceError::Failed)), "a write after a failed write was accepted");
    assert!(matches!(device.flush().await, Err(DeviceError::Failed)));
    device.reopen();
    device.write(0, pattern(1, 1)).await.0.unwrap();
}

#[tokio::test]
async fn failed_flush_is_never_retried() {
    let device = MemDevice::new(SIZE);
    device.write(0, pattern(1, 1)).await.0.unwrap();
    device.set_faults(MemFaults { flush_error: true, ..MemFaults::default() });
    assert!(device.flush().await.is_err());
    device.set_faults(MemFaults::default());
    assert!(matches!(device.flush().await, Err(DeviceError::Failed)));
}

#[tokio::test]
async fn eio_on_read_is_an_error_not_data() {
    let device = MemDevice::new(SIZE);
    device.set_faults(MemFaults { read_error: true, ..MemFaults::default() });
    let (result, _) = device.read(0, AlignedBuf::zeroed(4096)).await;
    assert!(matches!(result, Err(DeviceError::Io { op: "read", .. })));
}

#[tokio::test]
async fn torn_and_misdirected_writes_land_as_described() {
    let device = MemDevice::new(SIZE);
    device.set_faults(MemFaults { torn_next_write: Some(512), ..MemFaults::default() });
    device.write(0, pattern(1, 2)).await.0.unwrap();
    let image = device.snapshot();
    assert_eq!(&image[..512], &pattern(1, 2).as_slice()[..512]);
    assert!(image[512..8192].iter().all(|&b| b == 0), "a torn write landed past its tear");
    // The fault applies once.
    device.write(0, pattern(2, 1)).await.0.unwrap();
    assert_eq!(&device.snapshot()[..4096], pattern(2, 1).as_slice());

    device.set_faults(MemFaults { misdirect_next_write: Some(8 * BLOCK_BYTES), ..MemFaults::default() });
    device.write(4 * BLOCK_BYTES, pattern(3, 1)).await.0.unwrap();
    let image = device.snapshot();
    assert!(image[4 * 4096..5 * 4096].iter().all(|&b| b == 0), "the misdirected write reached its target");
    assert_eq!(&image[8 * 4096..9 * 4096], pattern(3, 1).as_slice());
}

#[tokio::test(start_paused = true)]
async fn latency_delays_every_io() {
    let device = MemDevice::new(SIZE);
    device.set_faults(MemFaults { latency: Duration::from_secs(3), ..MemFaults::default() });
    let start = tokio::time::Instant::now();
    device.write(0, pattern(1, 1)).await.0.unwrap();
    assert!(start.elapsed() >= Duration::from_secs(3));
}

#[tokio::test(start_paused = true)]
async fn a_hung_device_completes_nothing_until_it_returns() {
    let device = std::sync::Arc::new(MemDevice::new(SIZE));
    device.hang();
    let io = {
        let device = device.clone();
        tokio::spawn(async move { device.write(0, pattern(1, 1)).await.0 })
    };
    // An hour of (paused, simulated) time passes without completion.
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert!(!io.is_finished(), "a hung device completed a write");
    assert!(device.snapshot().iter().all(|&b| b == 0));
    device.unhang();
    io.await.unwrap().unwrap();
    assert_eq!(&device.snapshot()[..4096], pattern(1, 1).as_slice());
}

#[tokio::test]
async fn unflushed_writes_may_be_lost_on_power_loss() {
    let device = MemDevice::new(SIZE);
    device.write(0, pattern(1, 1)).await.0.unwrap();
    device.flush().await.unwrap();
    device.write(4096, pattern(2, 1)).await.0.unwrap();
    assert_eq!(device.unflushed_writes(), 1);
    let lost = device.power_loss_image(|_| false);
    assert_eq!(&lost[..4096], pattern(1, 1).as_slice(), "a flushed write was lost");
    assert!(lost[4096..8192].iter().all(|&b| b == 0));
    let kept = device.power_loss_image(|_| true);
    assert_eq!(&kept[4096..8192], pattern(2, 1).as_slice());
}

/// The io_uring device in both modes this file system allows: O_DIRECT if it accepts it, and
/// buffered always. Returns (mode, device) pairs on files in `dir`.
fn uring_modes(dir: &Path, size: u64, entries: u32) -> Vec<(&'static str, UringDevice)> {
    let mut devices = Vec::new();
    let buffered = UringOptions { entries, direct: DirectIo::Never };
    let device = UringDevice::create_with(&dir.join("buffered"), size, buffered).unwrap();
    assert!(!device.direct());
    devices.push(("buffered", device));
    let auto = UringOptions { entries, direct: DirectIo::Auto };
    let device = UringDevice::create_with(&dir.join("auto"), size, auto).unwrap();
    if device.direct() {
        devices.push(("direct", device));
    } else {
        eprintln!("{} refuses O_DIRECT: the direct mode is not tested here", dir.display());
    }
    devices
}

async fn read_block(device: &impl BlockDevice, block: u64) -> AlignedBuf {
    let (result, buf) = device.read(block * BLOCK_BYTES, AlignedBuf::zeroed(4096)).await;
    result.unwrap();
    buf
}

/// The production engine keeps the `BlockDevice` contract, with and without O_DIRECT, and what it
/// wrote is on the file when it is reopened.
#[tokio::test]
async fn uring_device_conforms() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    for (mode, device) in uring_modes(dir.path(), SIZE, 16) {
        eprintln!("conformance of the {mode} io_uring device");
        conformance(&device).await;
        let path = device.path().to_path_buf();
        drop(device);
        let device = UringDevice::open(&path).unwrap();
        assert_eq!(device.size_bytes(), SIZE);
        assert_eq!(read_block(&device, 0).await, pattern(1, 1), "{mode}: the conformance body's first write");
        // Block 63 was last written by the body's concurrent writes (pattern 100 + 31).
        assert_eq!(read_block(&device, 63).await, pattern(131, 1), "{mode}: a concurrent write");
    }
}

#[test]
fn uring_device_refuses_odd_sizes_existing_files_and_bad_options() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    assert!(UringDevice::create(&dir.path().join("odd"), 5000).is_err());
    assert!(UringDevice::create(&dir.path().join("empty"), 0).is_err());
    std::fs::write(dir.path().join("short"), b"not a disk").unwrap();
    assert!(UringDevice::open(&dir.path().join("short")).is_err());
    assert!(UringDevice::create(&dir.path().join("short"), SIZE).is_err(), "create clobbered a file");
    assert!(UringDevice::open(&dir.path().join("missing")).is_err());
    for entries in [0, 1, 65536] {
        let options = UringOptions { entries, ..UringOptions::default() };
        assert!(
            UringDevice::create_with(&dir.path().join(format!("e{entries}")), SIZE, options).is_err(),
            "{entries} entries were accepted"
        );
    }
}

/// Many more requests than the ring has entries, from several tasks at once, reads and writes
/// mixed: none is lost, mixed up or stuck in the thread's queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn uring_device_keeps_many_mixed_requests_in_flight() {
    const TASKS: u64 = 8;
    const BLOCKS_PER_TASK: u64 = 32;
    const BLOCKS: u64 = TASKS * BLOCKS_PER_TASK;
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    for (mode, device) in uring_modes(dir.path(), BLOCKS * BLOCK_BYTES, 8) {
        let device = Arc::new(device);
        // First every block holds the pattern of round 0, written concurrently.
        let mut handles = Vec::new();
        for task in 0..TASKS {
            let device = device.clone();
            handles.push(tokio::spawn(async move {
                let writes = (0..BLOCKS_PER_TASK)
                    .map(|i| {
                        let block = task * BLOCKS_PER_TASK + i;
                        let future: Pin<Box<dyn Future<Output = _> + Send + '_>> =
                            device.write(block * BLOCK_BYTES, pattern(block, 1));
                        future
                    })
                    .collect();
                for (result, _) in join_all(writes).await {
                    result.unwrap();
                }
            }));
        }
        for handle in handles {
            handle.await.unwrap();
        }
        // Then each task reads its even blocks (checking round 0) while rewriting its odd ones,
        // in one batch of 32 requests per task: 256 in flight against 8 entries.
        let mut handles = Vec::new();
        for task in 0..TASKS {
            let device = device.clone();
            handles.push(tokio::spawn(async move {
                let requests = (0..BLOCKS_PER_TASK)
                    .map(|i| {
                        let block = task * BLOCKS_PER_TASK + i;
                        let offset = block * BLOCK_BYTES;
                        let future: Pin<Box<dyn Future<Output = _> + Send + '_>> = if i % 2 == 0 {
                            device.read(offset, AlignedBuf::zeroed(4096))
                        } else {
                            device.write(offset, pattern(1000 + block, 1))
                        };
                        future
                    })
                    .collect();
                for (i, (result, buf)) in join_all(requests).await.into_iter().enumerate() {
                    result.unwrap();
                    let block = task * BLOCKS_PER_TASK + i as u64;
                    if i % 2 == 0 {
                        assert_eq!(buf, pattern(block, 1), "{mode}: block {block} read back");
                    } else {
                        assert_eq!(buf, pattern(1000 + block, 1), "{mode}: block {block}'s buffer");
                    }
                }
            }));
        }
        for handle in handles {
            handle.await.unwrap();
        }
        device.flush().await.unwrap();
        for block in 0..BLOCKS {
            let expected = if block % 2 == 0 { pattern(block, 1) } else { pattern(1000 + block, 1) };
            assert_eq!(read_block(&*device, block).await, expected, "{mode}: block {block} at the end");
        }
    }
}

/// A caller that gives up on a request (drops its future) after the ring thread took it must not
/// leave the kernel writing into freed memory or the device stuck; later I/O works, and dropping
/// the device waits for the abandoned requests.
#[tokio::test]
async fn uring_device_survives_cancelled_requests() {
    const BLOCKS: u64 = 1024;
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    for (mode, device) in uring_modes(dir.path(), BLOCKS * BLOCK_BYTES, 4) {
        for round in 0..4u64 {
            // Big reads and writes, each polled once (so handed to the ring thread) and dropped.
            for i in 0..16u64 {
                let offset = (i % 4) * 256 * BLOCK_BYTES;
                let mut future = if (i + round) % 2 == 0 {
                    device.write(offset, pattern(i, 256))
                } else {
                    device.read(offset, AlignedBuf::zeroed(1 << 20))
                };
                poll_fn(|cx| {
                    let _ = future.as_mut().poll(cx);
                    Poll::Ready(())
                })
                .await;
                drop(future);
            }
            let block = 7 + round;
            device.write(block * BLOCK_BYTES, pattern(500 + round, 1)).await.0.unwrap();
            assert_eq!(read_block(&device, block).await, pattern(500 + round, 1), "{mode}: after cancels");
        }
        device.flush().await.unwrap();
        // Dropped with cancelled requests perhaps still in flight: the drop waits for them.
        let path = device.path().to_path_buf();
        drop(device);
        let device = UringDevice::open(&path).unwrap();
        assert_eq!(read_block(&device, 10).await, pattern(503, 1), "{mode}: after reopening");
    }
}

/// Bad ranges are refused without touching the file and the buffer comes back, including ranges
/// whose end overflows and buffers longer than the device.
#[tokio::test]
async fn uring_device_refuses_bad_ranges() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    for (mode, device) in uring_modes(dir.path(), SIZE, 4) {
        device.write(0, pattern(1, 1)).await.0.unwrap();
        let cases = [
            (1u64, 4096usize),
            (4095, 4096),
            (0, 4097),
            (0, 1),
            (SIZE, 4096),
            (SIZE - 4096, 8192),
            (u64::MAX - 4095, 4096),
            (0, usize::try_from(SIZE).unwrap() + 4096),
        ];
        for (offset, len) in cases {
            let data = AlignedBuf::from_slice(&vec![0xA5; len]);
            let (result, back) = device.write(offset, data.clone()).await;
            assert!(
                matches!(result, Err(DeviceError::Misaligned { .. } | DeviceError::OutOfRange { .. })),
                "{mode}: write {offset}+{len}: {result:?}"
            );
            assert_eq!(back, data, "{mode}: the buffer of a refused write comes back");
            let (result, back) = device.read(offset, AlignedBuf::zeroed(len)).await;
            assert!(
                matches!(result, Err(DeviceError::Misaligned { .. } | DeviceError::OutOfRange { .. })),
                "{mode}: read {offset}+{len}: {result:?}"
            );
            assert_eq!(back.len(), len, "{mode}: the buffer of a refused read comes back");
        }
        // An empty transfer is in range and does nothing.
        let (result, back) = device.write(4096, AlignedBuf::zeroed(0)).await;
        result.unwrap();
        assert!(back.is_empty());
        assert_eq!(read_block(&device, 0).await, pattern(1, 1), "{mode}: a refused I/O changed the device");
        // Not a refusal: the device still writes.
        device.write(4096, pattern(2, 1)).await.0.unwrap();
        device.flush().await.unwrap();
    }
}

/// A file cut short under the device (someone truncated it) gives a read error at the missing
/// end, not a hang resubmitting a zero-length read, and not zeroes passed off as data.
#[tokio::test]
async fn uring_device_read_past_a_truncated_end_is_an_error() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    for (mode, device) in uring_modes(dir.path(), SIZE, 4) {
        device.write(0, pattern(1, 1)).await.0.unwrap();
        std::fs::OpenOptions::new().write(true).open(device.path()).unwrap().set_len(SIZE / 2).unwrap();
        let read = device.read(SIZE - 4096, AlignedBuf::zeroed(4096));
        let (result, _) = tokio::time::timeout(Duration::from_secs(30), read).await.expect("the read hung");
        match result {
            Err(DeviceError::Io { op: "read", source, .. }) => {
                assert_eq!(source.kind(), std::io::ErrorKind::UnexpectedEof, "{mode}: {source}");
            }
            other => panic!("{mode}: a read past the end of the file gave {other:?}"),
        }
        // A read that straddles the end is short, then makes no progress: also an error.
        let (result, _) = device.read(SIZE / 2 - 4096, AlignedBuf::zeroed(8192)).await;
        assert!(matches!(result, Err(DeviceError::Io { op: "read", .. })), "{mode}: {result:?}");
        // Reads are not writes: the device is not latched.
        assert_eq!(read_block(&device, 0).await, pattern(1, 1));
        device.write(0, pattern(2, 1)).await.0.unwrap();
    }
}
