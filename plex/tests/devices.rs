//! Every block device passes the same conformance body; the in-memory device's faults do
//! what they say.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use plex::testing::{CONFORMANCE_BLOCKS, conformance, pattern};
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
