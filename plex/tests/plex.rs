//! A plex over several disks: concatenation, and block checksums that catch bit rot, torn and
//! misdirected writes.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use plex::label::LABEL_AREA_BYTES;
use plex::testing::pattern;
use plex::{
    BLOCK_BYTES, CpRecord, DiskLabel, Epoch, Extent, MemDevice, MemFaults, NodeId, PeerState, Plex, PlexDisk,
    PlexError, PlexGeneration, PlexState, Site, Uuid,
};

const DISK: u64 = 64 * BLOCK_BYTES;
const DATA_OFFSET: u64 = 8 * BLOCK_BYTES;
const DATA_BYTES: u64 = DISK - DATA_OFFSET;

fn label(disk: u8) -> DiskLabel {
    DiskLabel {
        sequence: 0,
        cluster: Uuid([1; 16]),
        disk: Uuid([disk; 16]),
        site: Site::A,
        pool: 0,
        size_bytes: DISK,
        owner: NodeId(1),
        home_owner: NodeId(1),
        dr_home_owner: NodeId(1),
        aggregate: Uuid([3; 16]),
        plex_index: 0,
        plex_state: PlexState::Normal,
        peer_state: PeerState::Normal,
        plex_generation: PlexGeneration(1),
        peer_sync_generation: PlexGeneration(1),
        epoch_high_water: Epoch { number: 1, owner: NodeId(1) },
        last_cp: CpRecord::default(),
        region_bytes: 65536,
        bitmap: Extent { offset: LABEL_AREA_BYTES, len: BLOCK_BYTES },
        checksums: Extent { offset: LABEL_AREA_BYTES + BLOCK_BYTES, len: BLOCK_BYTES },
        data: Extent { offset: DATA_OFFSET, len: DATA_BYTES },
    }
}

fn plex_of(devices: &[Arc<MemDevice>]) -> Plex {
    let disks = devices
        .iter()
        .enumerate()
        .map(|(n, device)| PlexDisk { device: device.clone(), label: label(10 + u8::try_from(n).unwrap()) })
        .collect();
    Plex::new(disks).unwrap()
}

#[tokio::test]
async fn writes_span_disks_and_read_back() {
    let devices = [Arc::new(MemDevice::new(DISK)), Arc::new(MemDevice::new(DISK))];
    let plex = plex_of(&devices);
    assert_eq!(plex.size_bytes(), 2 * DATA_BYTES);
    // Never-written blocks read as zeroes.
    assert!(plex.read(0, 4 * BLOCK_BYTES).await.unwrap().as_slice().iter().all(|&b| b == 0));
    // A write across the boundary between the two disks.
    let offset = DATA_BYTES - 2 * BLOCK_BYTES;
    plex.write(offset, &pattern(1, 5)).await.unwrap();
    assert_eq!(plex.read(offset, 5 * BLOCK_BYTES).await.unwrap(), pattern(1, 5));
    assert_eq!(
        plex.read(offset + 2 * BLOCK_BYTES, BLOCK_BYTES).await.unwrap().as_slice(),
        &pattern(1, 5).as_slice()[8192..12288]
    );
    // It landed at the start of the second disk's data area.
    let image = devices[1].snapshot();
    let at = usize::try_from(DATA_OFFSET).unwrap();
    assert_eq!(&image[at..at + 4096], &pattern(1, 5).as_slice()[8192..12288]);
    plex.flush().await.unwrap();
    assert!(matches!(plex.read(2 * DATA_BYTES, BLOCK_BYTES).await, Err(PlexError::Range { .. })));
    assert!(matches!(plex.write(100, &pattern(1, 1)).await, Err(PlexError::Range { .. })));
}

#[tokio::test]
async fn bit_rot_is_an_error_not_data() {
    let device = Arc::new(MemDevice::new(DISK));
    let plex = plex_of(std::slice::from_ref(&device));
    plex.write(3 * BLOCK_BYTES, &pattern(2, 1)).await.unwrap();
    let mut image = device.snapshot();
    image[usize::try_from(DATA_OFFSET + 3 * BLOCK_BYTES + 77).unwrap()] ^= 0x10;
    let rotten = Arc::new(MemDevice::from_image(image));
    let plex = plex_of(&[rotten]);
    assert!(
        matches!(plex.read(3 * BLOCK_BYTES, BLOCK_BYTES).await, Err(PlexError::Checksum { offset }) if offset == 3 * BLOCK_BYTES)
    );
    // Its neighbours still read.
    plex.read(4 * BLOCK_BYTES, BLOCK_BYTES).await.unwrap();
}

#[tokio::test]
async fn torn_and_misdirected_writes_are_caught() {
    let device = Arc::new(MemDevice::new(DISK));
    let plex = plex_of(std::slice::from_ref(&device));
    plex.write(0, &pattern(1, 1)).await.unwrap();
    plex.write(BLOCK_BYTES, &pattern(2, 1)).await.unwrap();
    // A torn data write (the disk says it completed).
    device.set_faults(MemFaults { torn_next_write: Some(1000), ..MemFaults::default() });
    plex.write(0, &pattern(3, 1)).await.unwrap();
    assert!(matches!(plex.read(0, BLOCK_BYTES).await, Err(PlexError::Checksum { .. })));
    // A misdirected data write: the intended block keeps stale data, the hit block new data.
    device.set_faults(MemFaults {
        misdirect_next_write: Some(DATA_OFFSET + 5 * BLOCK_BYTES),
        ..MemFaults::default()
    });
    plex.write(BLOCK_BYTES, &pattern(4, 1)).await.unwrap();
    assert!(
        matches!(plex.read(BLOCK_BYTES, BLOCK_BYTES).await, Err(PlexError::Checksum { .. })),
        "stale block read as new"
    );
    assert!(
        matches!(plex.read(5 * BLOCK_BYTES, BLOCK_BYTES).await, Err(PlexError::Checksum { .. })),
        "misplaced block read as valid"
    );
}

#[tokio::test]
async fn concurrent_writes_keep_every_checksum() {
    let device = Arc::new(MemDevice::new(DISK));
    let plex = Arc::new(plex_of(std::slice::from_ref(&device)));
    let tasks: Vec<_> = (0..32u64)
        .map(|i| {
            let plex = plex.clone();
            tokio::spawn(async move { plex.write(i * BLOCK_BYTES, &pattern(50 + i, 1)).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    for i in 0..32u64 {
        assert_eq!(plex.read(i * BLOCK_BYTES, BLOCK_BYTES).await.unwrap(), pattern(50 + i, 1), "block {i}");
    }
}

#[test]
fn disks_of_another_plex_are_refused() {
    let a = Arc::new(MemDevice::new(DISK));
    let b = Arc::new(MemDevice::new(DISK));
    let mut other = label(11);
    other.plex_index = 1;
    let disks = vec![PlexDisk { device: a, label: label(10) }, PlexDisk { device: b, label: other }];
    assert!(matches!(Plex::new(disks), Err(PlexError::Invalid(_))));
    assert!(matches!(Plex::new(Vec::new()), Err(PlexError::Invalid(_))));
}

/// A block and its CRC moved together to another place (a shifted or misdirected write of
/// both, or a block of another disk) never verify: the CRC is salted with the disk and the
/// block index.
#[tokio::test]
async fn a_block_moved_with_its_checksum_never_verifies() {
    let device = Arc::new(MemDevice::new(DISK));
    let plex = plex_of(std::slice::from_ref(&device));
    plex.write(0, &pattern(1, 2)).await.unwrap();
    let mut image = device.snapshot();
    let data = usize::try_from(DATA_OFFSET).unwrap();
    let sums = usize::try_from(LABEL_AREA_BYTES + BLOCK_BYTES).unwrap();
    image.copy_within(data..data + 4096, data + 4096);
    image.copy_within(sums..sums + 4, sums + 4);
    let moved = Arc::new(MemDevice::from_image(image.clone()));
    let plex = plex_of(&[moved]);
    assert!(matches!(plex.read(BLOCK_BYTES, BLOCK_BYTES).await, Err(PlexError::Checksum { .. })));
    // The same bytes read through a plex whose disk has another uuid.
    let stranger = Arc::new(MemDevice::from_image(image));
    let disks = vec![PlexDisk { device: stranger, label: label(99) }];
    let plex = Plex::new(disks).unwrap();
    assert!(matches!(plex.read(0, BLOCK_BYTES).await, Err(PlexError::Checksum { .. })));
}
