//! The conformance body every `BlockDevice` must pass (pread/pwrite, in-memory, io_uring, and
//! later the remote plex), and small helpers for device tests.
//!
//! It panics with a message naming the broken property; call it from a test.

use std::future::Future;
use std::pin::Pin;

use crate::buf::AlignedBuf;
use crate::device::{BLOCK_BYTES, BlockDevice, DeviceError};

/// The aggregate the aggregate tests create: cluster `[1; 16]`, aggregate `[2; 16]`, owner
/// node 1, plexes at sites A and B, epoch 1, regions of `region_bytes`.
pub fn test_spec(region_bytes: u32) -> crate::aggregate::AggregateSpec {
    use crate::types::{Epoch, NodeId, Site, Uuid};
    crate::aggregate::AggregateSpec {
        cluster: Uuid([1; 16]),
        aggregate: Uuid([2; 16]),
        owner: NodeId(1),
        sites: [Site::A, Site::B],
        region_bytes,
        epoch: Epoch { number: 1, owner: NodeId(1) },
    }
}

/// Aggregate options for tests: a short mirror timeout and small resync batches.
pub fn test_options(
    mirror_timeout: std::time::Duration,
    resync_batch_bytes: u64,
) -> crate::aggregate::AggregateOptions {
    crate::aggregate::AggregateOptions {
        mirror_timeout,
        resync_batch_bytes,
        ..crate::aggregate::AggregateOptions::default()
    }
}

/// Blocks the conformance body needs at least.
pub const CONFORMANCE_BLOCKS: u64 = 64;

pub use crate::device::join_all;

/// A block-sized pattern that differs per block and per `seed`.
pub fn pattern(seed: u64, blocks: u64) -> AlignedBuf {
    let len = usize::try_from(blocks * BLOCK_BYTES).expect("a test buffer fits usize");
    let mut buf = AlignedBuf::zeroed(len);
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for byte in buf.as_mut_slice() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        *byte = state.to_le_bytes()[3];
    }
    buf
}

async fn read(device: &(impl BlockDevice + ?Sized), offset: u64, blocks: u64) -> AlignedBuf {
    let len = usize::try_from(blocks * BLOCK_BYTES).expect("fits");
    let (result, buf) = device.read(offset, AlignedBuf::zeroed(len)).await;
    if let Err(e) = result {
        panic!("read of {blocks} blocks at {offset} failed: {e}");
    }
    buf
}

async fn write(device: &(impl BlockDevice + ?Sized), offset: u64, data: AlignedBuf) {
    let expected = data.clone();
    let (result, returned) = device.write(offset, data).await;
    if let Err(e) = result {
        panic!("write at {offset} failed: {e}");
    }
    assert_eq!(returned, expected, "a write must hand its buffer back unchanged");
}

/// Checks the `BlockDevice` contract on a fresh, zeroed device of at least
/// `CONFORMANCE_BLOCKS` blocks.
pub async fn conformance(device: &(impl BlockDevice + ?Sized)) {
    let size = device.size_bytes();
    assert!(size.is_multiple_of(BLOCK_BYTES), "size {size} is not a whole number of blocks");
    assert!(size >= CONFORMANCE_BLOCKS * BLOCK_BYTES, "the device is too small for the conformance body");
    let block = BLOCK_BYTES;

    // A fresh device reads as zeroes.
    assert!(read(device, 0, 4).await.as_slice().iter().all(|&b| b == 0), "a fresh device is not zeroed");

    // Round trips, single and multi-block, and a read of part of a multi-block write.
    write(device, 0, pattern(1, 1)).await;
    assert_eq!(read(device, 0, 1).await, pattern(1, 1), "single-block round trip");
    write(device, 16 * block, pattern(2, 8)).await;
    assert_eq!(read(device, 16 * block, 8).await, pattern(2, 8), "multi-block round trip");
    let part = read(device, 18 * block, 2).await;
    assert_eq!(part.as_slice(), &pattern(2, 8).as_slice()[2 * 4096..4 * 4096], "partial read");
    // Overwrite is visible; its neighbours are not touched.
    write(device, 17 * block, pattern(3, 1)).await;
    assert_eq!(read(device, 17 * block, 1).await, pattern(3, 1), "overwrite");
    assert_eq!(read(device, 16 * block, 1).await.as_slice(), &pattern(2, 8).as_slice()[..4096], "neighbour");
    // The last block.
    write(device, size - block, pattern(4, 1)).await;
    assert_eq!(read(device, size - block, 1).await, pattern(4, 1), "last block");

    // Bad ranges are errors that touch nothing and give the buffer back.
    let before = read(device, 0, 1).await;
    let bad = [(size, 1u64), (size - block, 2), (u64::MAX - block + 1, 1)];
    for (offset, blocks) in bad {
        let data = pattern(9, blocks);
        let (result, back) = device.write(offset, data.clone()).await;
        assert!(matches!(result, Err(DeviceError::OutOfRange { .. })), "write at {offset}: {result:?}");
        assert_eq!(back, data, "the buffer of a refused write comes back");
        let (result, _) = device.read(offset, AlignedBuf::zeroed(data.len())).await;
        assert!(matches!(result, Err(DeviceError::OutOfRange { .. })), "read at {offset}: {result:?}");
    }
    for (offset, len) in [(1u64, 4096usize), (4096, 100), (512, 512)] {
        let (result, _) = device.write(offset, AlignedBuf::zeroed(len)).await;
        assert!(matches!(result, Err(DeviceError::Misaligned { .. })), "write {offset}+{len}: {result:?}");
        let (result, _) = device.read(offset, AlignedBuf::zeroed(len)).await;
        assert!(matches!(result, Err(DeviceError::Misaligned { .. })), "read {offset}+{len}: {result:?}");
    }
    assert_eq!(read(device, 0, 1).await, before, "a refused I/O changed the device");
    assert_eq!(read(device, size - block, 1).await, pattern(4, 1), "a refused I/O changed the last block");

    // Many requests in flight at once, on distinct blocks.
    let writes = (0..32u64)
        .map(|i| {
            let offset = (32 + i % 32) * block;
            let future: Pin<Box<dyn Future<Output = _> + Send + '_>> =
                device.write(offset, pattern(100 + i, 1));
            future
        })
        .collect();
    for (result, _) in join_all(writes).await {
        result.expect("a concurrent write failed");
    }
    let reads = (0..32u64)
        .map(|i| {
            let future: Pin<Box<dyn Future<Output = _> + Send + '_>> =
                device.read((32 + i) * block, AlignedBuf::zeroed(4096));
            future
        })
        .collect();
    for (i, (result, buf)) in join_all(reads).await.into_iter().enumerate() {
        result.expect("a concurrent read failed");
        assert_eq!(buf, pattern(100 + i as u64, 1), "concurrent write {i} read back");
    }

    device.flush().await.expect("flush");
}

/// A `DropHook` that records every drop, and can refuse the first few (a partner that does
/// not answer yet).
#[derive(Debug, Default)]
pub struct RecordingHook {
    drops: std::sync::Mutex<Vec<crate::aggregate::PlexDrop>>,
    refuse: std::sync::atomic::AtomicUsize,
}

impl RecordingHook {
    /// A hook that refuses the first `n` calls.
    pub fn refusing(n: usize) -> RecordingHook {
        RecordingHook { drops: std::sync::Mutex::default(), refuse: std::sync::atomic::AtomicUsize::new(n) }
    }

    /// The drops recorded so far.
    pub fn drops(&self) -> Vec<crate::aggregate::PlexDrop> {
        self.drops.lock().expect("hook lock").clone()
    }
}

impl crate::aggregate::DropHook for RecordingHook {
    fn plex_dropped<'a>(
        &'a self,
        drop: &'a crate::aggregate::PlexDrop,
    ) -> crate::device::IoFuture<'a, Result<(), String>> {
        Box::pin(async move {
            use std::sync::atomic::Ordering;
            if self.refuse.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1)).is_ok() {
                return Err("the partner does not answer".to_string());
            }
            self.drops.lock().expect("hook lock").push(drop.clone());
            Ok(())
        })
    }
}

/// The raw bytes of a plex's data area (its disks' data extents, concatenated), read through
/// the labels; the first `len` bytes. For comparing plexes byte for byte.
pub async fn plex_data(devices: &[std::sync::Arc<dyn BlockDevice>], len: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for device in devices {
        let (label, _) = crate::label::read_label(device.as_ref()).await.expect("a labelled disk");
        let take = label.data.len.min(len - out.len() as u64);
        let (result, buf) =
            device.read(label.data.offset, AlignedBuf::zeroed(usize::try_from(take).expect("fits"))).await;
        result.expect("read of a data area");
        out.extend_from_slice(buf.as_slice());
        if out.len() as u64 == len {
            break;
        }
    }
    out
}

/// Two plexes on in-memory disks for aggregate tests: plex 0 is one 8 MiB disk, plex 1 two
/// 4 MiB disks concatenated (so plex 1 always spans a disk boundary).
#[derive(Debug)]
pub struct MirrorRig {
    /// The disks of plex 0 and plex 1.
    pub disks: [Vec<std::sync::Arc<crate::mem::MemDevice>>; 2],
}

impl Default for MirrorRig {
    fn default() -> MirrorRig {
        MirrorRig::new()
    }
}

impl MirrorRig {
    /// Fresh, zeroed disks.
    pub fn new() -> MirrorRig {
        use crate::mem::MemDevice;
        use std::sync::Arc;
        MirrorRig {
            disks: [
                vec![Arc::new(MemDevice::new(8 << 20))],
                vec![Arc::new(MemDevice::new(4 << 20)), Arc::new(MemDevice::new(4 << 20))],
            ],
        }
    }

    /// Plex `index`'s disks, as the aggregate takes them.
    pub fn plex(&self, index: usize) -> Vec<std::sync::Arc<dyn BlockDevice>> {
        self.disks[index].iter().map(|disk| disk.clone() as std::sync::Arc<dyn BlockDevice>).collect()
    }

    /// Both plexes.
    pub fn plexes(&self) -> [Vec<std::sync::Arc<dyn BlockDevice>>; 2] {
        [self.plex(0), self.plex(1)]
    }

    /// Plex `index`'s disks stop answering.
    pub fn hang(&self, index: usize) {
        self.disks[index].iter().for_each(|disk| disk.hang());
    }

    /// Plex `index`'s disks answer again.
    pub fn unhang(&self, index: usize) {
        self.disks[index].iter().for_each(|disk| disk.unhang());
    }

    /// Sets the faults of every disk of plex `index`.
    pub fn faults(&self, index: usize, faults: crate::mem::MemFaults) {
        self.disks[index].iter().for_each(|disk| disk.set_faults(faults.clone()));
    }

    /// What a power loss now leaves: the flushed writes only, on new disks.
    pub fn crashed(&self) -> MirrorRig {
        use crate::mem::MemDevice;
        use std::sync::Arc;
        let image = |disk: &Arc<MemDevice>| Arc::new(MemDevice::from_image(disk.power_loss_image(|_| false)));
        MirrorRig { disks: [0, 1].map(|i| self.disks[i].iter().map(image).collect()) }
    }

    /// The first byte at which the plexes' data areas differ, within `size` bytes.
    pub async fn first_difference(&self, size: u64) -> Option<u64> {
        let a = plex_data(&self.plex(0), size).await;
        let b = plex_data(&self.plex(1), size).await;
        assert_eq!(a.len() as u64, size, "plex 0 holds less than {size} bytes");
        a.iter().zip(&b).position(|(x, y)| x != y).map(|at| at as u64)
    }

    /// Panics, naming the byte and its 64 KiB region, unless the plexes are byte-identical.
    pub async fn assert_identical(&self, size: u64) {
        if let Some(at) = self.first_difference(size).await {
            panic!("the plexes differ at byte {at} (region {})", at / 65536);
        }
    }
}
