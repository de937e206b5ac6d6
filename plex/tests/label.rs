//! The disk label: format checks, and the two-copy persist protocol under crashes.
#![allow(clippy::unwrap_used)]

use plex::label::{LABEL_AREA_BYTES, LABEL_BYTES, LABEL_SLOT_BYTES};
use plex::{
    BLOCK_BYTES, CpId, CpRecord, DiskLabel, Epoch, Extent, LabelCopies, LabelDefect, Lsn, MemDevice,
    MemFaults, NodeId, PeerState, PlexGeneration, PlexState, ResyncLevel, Site, Uuid, read_label,
    write_label,
};
use proptest::prelude::*;

const DISK: u64 = 1024 * BLOCK_BYTES;

fn label() -> DiskLabel {
    DiskLabel {
        sequence: 0,
        cluster: Uuid([1; 16]),
        disk: Uuid([2; 16]),
        site: Site::A,
        pool: 0,
        size_bytes: DISK,
        owner: NodeId(1),
        home_owner: NodeId(1),
        dr_home_owner: NodeId(1),
        aggregate: Uuid([3; 16]),
        plex_index: 0,
        plex_state: PlexState::Resyncing { level: ResyncLevel::Incremental, next_region: 17 },
        peer_state: PeerState::OutOfDate,
        plex_generation: PlexGeneration(5),
        peer_sync_generation: PlexGeneration(4),
        epoch_high_water: Epoch { number: 9, owner: NodeId(2) },
        last_cp: CpRecord { id: CpId(77), writer: NodeId(1), log_generation: 3, last_lsn: Lsn(1234) },
        region_bytes: 65536,
        bitmap: Extent { offset: LABEL_AREA_BYTES, len: BLOCK_BYTES },
        checksums: Extent { offset: LABEL_AREA_BYTES + BLOCK_BYTES, len: 4 * BLOCK_BYTES },
        data: Extent { offset: 16 * BLOCK_BYTES, len: DISK - 16 * BLOCK_BYTES },
    }
}

#[test]
fn round_trip_and_every_bit_flip_is_refused() {
    let mut label = label();
    label.sequence = 7;
    let bytes = label.encode();
    assert_eq!(DiskLabel::decode(&bytes, 1, DISK).unwrap(), label);
    assert!(DiskLabel::decode(&bytes, 0, DISK).is_err(), "a copy in the wrong slot");
    assert!(DiskLabel::decode(&bytes, 1, DISK + BLOCK_BYTES).is_err(), "a label of another size");
    for bit in 0..LABEL_BYTES * 8 {
        let mut copy = bytes;
        copy[bit / 8] ^= 1 << (bit % 8);
        assert!(DiskLabel::decode(&copy, 1, DISK).is_err(), "bit {bit} flip accepted");
    }
}

#[test]
fn inconsistent_fields_are_refused() {
    let cases: [fn(&mut DiskLabel); 5] = [
        |l| l.owner = NodeId(0),
        |l| l.region_bytes = 5000,
        |l| l.peer_sync_generation = PlexGeneration(99),
        |l| l.bitmap = Extent { offset: 0, len: BLOCK_BYTES },
        |l| l.checksums = l.data,
    ];
    for (index, change) in cases.into_iter().enumerate() {
        let mut bad = label();
        change(&mut bad);
        assert!(bad.check(DISK).is_err(), "case {index} accepted");
    }
}

#[tokio::test]
async fn a_blank_disk_has_no_label() {
    let err = read_label(&MemDevice::new(DISK)).await.unwrap_err();
    assert!(err.is_blank(), "{err}");
}

#[tokio::test]
async fn writes_alternate_slots_and_the_newest_wins() {
    let device = MemDevice::new(DISK);
    let mut label = label();
    for generation in 6..12u64 {
        label.plex_generation = PlexGeneration(generation);
        write_label(&device, &mut label).await.unwrap();
        let (read, copies) = read_label(&device).await.unwrap();
        assert_eq!(read, label);
        assert_eq!(copies, if label.sequence == 1 { LabelCopies::OneValid } else { LabelCopies::BothValid });
        assert_eq!(device.unflushed_writes(), 0, "write_label returned before its flush");
    }
}

/// Crash images of the label protocol: at every point a crash leaves the previous label or
/// the new one, never neither, and a torn write never yields a label that was not written.
#[tokio::test]
async fn a_crash_during_a_label_write_leaves_the_old_or_the_new_label() {
    let mut device = MemDevice::new(DISK);
    let mut label = label();
    write_label(&device, &mut label).await.unwrap();
    let mut images = 0;
    for step in 0..40u64 {
        let previous = label.clone();
        let mut next = label.clone();
        next.plex_generation = PlexGeneration(previous.plex_generation.0 + 1);
        next.last_cp.id = CpId(previous.last_cp.id.0 + 1);
        // The write lands (whole, or torn at `step`-dependent bytes); the flush never comes.
        let torn = (step % 3 == 1).then_some(((step * 37) % 256) as usize);
        device.set_faults(MemFaults { flush_error: true, torn_next_write: torn, ..MemFaults::default() });
        assert!(write_label(&device, &mut next).await.is_err());
        assert_eq!(next.sequence, previous.sequence, "a failed label write advanced the sequence");
        let mut landed = label.clone();
        landed.sequence += 1;
        landed.plex_generation = PlexGeneration(previous.plex_generation.0 + 1);
        landed.last_cp.id = CpId(previous.last_cp.id.0 + 1);
        for keep in [false, true] {
            let image = device.power_loss_image(|_| keep);
            let crashed = MemDevice::from_image(image);
            let (read, _) = read_label(&crashed).await.unwrap();
            images += 1;
            if keep && torn.is_none() {
                assert_eq!(read, landed, "step {step}: the landed write is not read");
            } else {
                assert_eq!(read, previous, "step {step}: not the previous label");
            }
        }
        // Reboot with the write landed (if whole) and go on.
        device = MemDevice::from_image(device.power_loss_image(|_| true));
        label = read_label(&device).await.unwrap().0;
        write_label(&device, &mut label).await.unwrap();
    }
    println!("label crash images checked: {images}");
}

#[tokio::test]
async fn a_destroyed_label_is_reported_not_guessed() {
    let device = MemDevice::new(DISK);
    let mut label = label();
    write_label(&device, &mut label).await.unwrap();
    write_label(&device, &mut label).await.unwrap();
    let mut image = device.snapshot();
    image[10] ^= 1;
    image[usize::try_from(LABEL_SLOT_BYTES).unwrap() + 10] ^= 1;
    let err = read_label(&MemDevice::from_image(image)).await.unwrap_err();
    assert!(!err.is_blank());
    assert!(
        matches!(
            err,
            plex::LabelError::NoValidLabel { slot0: LabelDefect::Version(_) | LabelDefect::BadCrc, .. }
        ),
        "{err}"
    );
}

proptest! {
    /// Random bytes in the label area are an error value, never a panic.
    #[test]
    fn random_label_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), LABEL_BYTES..2 * LABEL_BYTES), slot in 0u64..2) {
        let _ = DiskLabel::decode(&bytes, slot, DISK);
        let mut valid = label();
        valid.sequence = slot;
        let mut encoded = valid.encode().to_vec();
        let at = bytes[0] as usize % LABEL_BYTES;
        encoded[at] = bytes[1];
        let _ = DiskLabel::decode(&encoded, slot, DISK);
    }
}
