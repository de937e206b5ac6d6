//! Behaviour of the journal: append, partner copies, release, replay, recovery rows and
//! fail-stop, on the in-memory media and on a real mapped file.

// Test data generators truncate random numbers on purpose.
#![allow(clippy::cast_possible_truncation, clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::*;
use nvlog::header::{DATA_START, HEADER_SLOT_BYTES};
use nvlog::mem::MemMedia;
use nvlog::{
    Action, Case, Durability, Epoch, Generation, Identity, Lsn, Media, MirrorState, MmapMedia, NodeId, Nvlog,
    NvlogError, PartitionKind, Record, ReplayFilter, encode_record,
};
use proptest::prelude::*;

const LOCAL: PartitionKind = PartitionKind::Local;
const DR: PartitionKind = PartitionKind::DrPartner;

fn replay_all<M: Media>(log: &Nvlog<M>, kind: PartitionKind) -> Vec<Record> {
    let replay = log.replay(kind, &ReplayFilter::default()).unwrap();
    assert!(replay.gaps.is_empty(), "unexpected gaps {:?}", replay.gaps);
    replay.records
}

fn reopen(media: &Arc<MemMedia>, durability: Durability) -> (Nvlog<Arc<MemMedia>>, nvlog::RecoveryReport) {
    Nvlog::open(media.clone(), IDENTITY, options(durability)).unwrap()
}

/// A partner's record as its writer would send it.
fn partner_record(lsn: u64, generation: u64, data: &[u8]) -> Vec<u8> {
    let input = common::write_input(data, lsn * 4096);
    let input = nvlog::RecordInput { epoch: Epoch { number: 1, owner: PARTNER }, ..input };
    encode_record(&input, Lsn(lsn), Generation(generation), PARTNER).unwrap()
}

#[test]
fn appended_records_replay_in_order_after_reopen() {
    for durability in [Durability::Process, Durability::Power] {
        let (media, log) = mem_log(256 * 1024, durability);
        let generation = log.generation();
        let mut expected = Vec::new();
        for i in 0..20u64 {
            let data = payload(i, 100 + i as usize * 37);
            let lsn = log.append(&write_input(&data, i * 4096)).unwrap();
            assert_eq!(lsn, Lsn(i + 1));
            expected.push(data);
        }
        log.append(&trim_input(0, 8192)).unwrap();
        drop(log);
        let (log, report) = reopen(&media, durability);
        assert_eq!(report.header_case, Case::Valid);
        assert!(report.partitions.iter().all(|p| p.case == Case::Valid));
        assert!(log.generation() > generation, "the generation rises at every open");
        let records = replay_all(&log, LOCAL);
        assert_eq!(records.len(), 21);
        for (i, data) in expected.iter().enumerate() {
            assert_eq!(records[i].header.lsn, Lsn(i as u64 + 1));
            assert_eq!(&records[i].payload[..], &data[..]);
            assert_eq!(records[i].header.generation, generation);
        }
        assert_eq!(records[20].header.op, nvlog::OpKind::Trim);
        // The next lsn follows the recovered tail, under the new generation.
        let lsn = log.append(&write_input(b"after", 0)).unwrap();
        assert_eq!(lsn, Lsn(22));
        let last = replay_all(&log, LOCAL).pop().unwrap();
        assert_eq!(last.header.generation, log.generation());
    }
}

#[test]
fn lsns_start_above_the_floor() {
    let media = Arc::new(MemMedia::new(64 * 1024));
    let opts = nvlog::Options { lsn_floor: Lsn(100), ..options(Durability::Power) };
    let (log, _) = Nvlog::format(media.clone(), &spec(), opts).unwrap();
    assert_eq!(log.append(&write_input(b"x", 0)).unwrap(), Lsn(101));
    assert_eq!(log.status(LOCAL).unwrap().released_lsn, Lsn(100));
    assert_eq!(replay_all(&log, LOCAL).len(), 1);
}

#[test]
fn one_mib_records_round_trip_and_larger_are_refused() {
    let (media, log) = mem_log(8 * 1024 * 1024, Durability::Power);
    let big = payload(7, nvlog::MAX_PAYLOAD_BYTES as usize);
    log.append(&write_input(&big, 0)).unwrap();
    let too_big = vec![1u8; nvlog::MAX_PAYLOAD_BYTES as usize + 1];
    assert!(matches!(log.append(&write_input(&too_big, 0)), Err(NvlogError::InvalidRecord(_))));
    drop(log);
    let (log, _) = reopen(&media, Durability::Power);
    assert_eq!(&replay_all(&log, LOCAL)[0].payload[..], &big[..]);
}

#[test]
fn a_record_larger_than_half_a_partition_is_refused_not_truncated() {
    let (_media, log) = mem_log(DATA_START + 2 * 16384, Durability::Process);
    let data = vec![1u8; 9000];
    assert!(matches!(log.append(&write_input(&data, 0)), Err(NvlogError::RecordTooLarge { .. })));
    assert_eq!(log.status(LOCAL).unwrap().last_lsn, Lsn::ZERO);
}

/// Back-pressure: a full partition refuses (`try_`) or waits, and never overwrites unreleased
/// records.
#[test]
fn full_partition_applies_back_pressure_until_release() {
    let (media, log) = mem_log(DATA_START + 2 * 16384, Durability::Power);
    let data = vec![9u8; 1000];
    let mut last = Lsn::ZERO;
    loop {
        match log.try_append_buffered(&write_input(&data, 0)) {
            Ok(lsn) => last = lsn,
            Err(NvlogError::Full(PartitionKind::Local)) => break,
            Err(other) => panic!("{other}"),
        }
    }
    log.persist_through(LOCAL, last).unwrap();
    assert!(last.0 >= 6, "both halves hold records before the log is full");
    let log = Arc::new(log);
    let waiter = {
        let log = log.clone();
        std::thread::spawn(move || log.append(&write_input(&[7u8; 1000], 0)).unwrap())
    };
    // The waiter cannot complete until a release frees the sealed half; the pause only gives it
    // the chance to (wrongly) complete, so a slow machine weakens the check but never fails it.
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(!waiter.is_finished(), "an append completed while the partition was full");
    log.release(LOCAL, last).unwrap();
    let lsn = waiter.join().unwrap();
    assert_eq!(lsn, last.next());
    assert!(log.stats().full_waits >= 1);
    drop(log);
    let (log, _) = reopen(&media, Durability::Power);
    let records = replay_all(&log, LOCAL);
    assert_eq!(records.iter().map(|r| r.header.lsn).collect::<Vec<_>>(), vec![last.next()]);
}

#[test]
fn partner_records_keep_the_writers_bytes() {
    let (media, log) = mem_log(256 * 1024, Durability::Power);
    let sent: Vec<Vec<u8>> = (1..=5).map(|lsn| partner_record(lsn, 3, &payload(lsn, 300))).collect();
    for bytes in &sent {
        log.append_copy(DR, bytes).unwrap();
    }
    assert_eq!(log.records_above(DR, Lsn(2)).unwrap(), sent[2..].to_vec());
    assert_eq!(log.durable_tail(DR).unwrap(), Lsn(5));
    drop(log);
    let (log, _) = reopen(&media, Durability::Power);
    assert_eq!(log.records_above(DR, Lsn::ZERO).unwrap(), sent);
    let records = replay_all(&log, DR);
    assert!(records.iter().all(|r| r.header.generation == Generation(3) && r.header.writer == PARTNER));
}

/// S13: a receiver acknowledges only contiguous lsns and reports any gap.
#[test]
fn partner_gaps_duplicates_and_strangers_are_refused() {
    let (_media, log) = mem_log(256 * 1024, Durability::Process);
    log.append_copy(DR, &partner_record(1, 1, b"a")).unwrap();
    assert!(matches!(
        log.append_copy(DR, &partner_record(3, 1, b"c")),
        Err(NvlogError::Gap { expected: Lsn(2), got: Lsn(3) })
    ));
    assert!(matches!(log.append_copy(DR, &partner_record(1, 1, b"a")), Err(NvlogError::NotAfterTail { .. })));
    // A record of this node in the partner's partition.
    let own = encode_record(&write_input(b"x", 0), Lsn(2), Generation(1), NODE).unwrap();
    assert!(matches!(log.append_copy(DR, &own), Err(NvlogError::WrongWriter { .. })));
    // A corrupted record.
    let mut bad = partner_record(2, 1, b"b");
    bad[100] ^= 1;
    assert!(matches!(log.append_copy(DR, &bad), Err(NvlogError::InvalidRecord(_))));
    assert_eq!(log.status(DR).unwrap().last_lsn, Lsn(1));
}

/// §4.2: after a re-establish at the writer's next lsn, the receiver accepts the jump, and
/// replay reports the gap until a release covers it (S8: a gap NVFAILs).
#[test]
fn declared_gap_is_accepted_and_reported_by_replay() {
    let (_media, log) = mem_log(256 * 1024, Durability::Power);
    log.append_copy(DR, &partner_record(1, 1, b"a")).unwrap();
    log.allow_gap_at(DR, Lsn(5)).unwrap();
    log.append_copy(DR, &partner_record(5, 1, b"e")).unwrap();
    log.append_copy(DR, &partner_record(6, 1, b"f")).unwrap();
    let replay = log.replay(DR, &ReplayFilter::default()).unwrap();
    assert_eq!(replay.gaps, vec![nvlog::LsnGap { after: Lsn(1), next: Lsn(5) }]);
    assert_eq!(replay.records.len(), 3);
    log.release(DR, Lsn(4)).unwrap();
    let replay = log.replay(DR, &ReplayFilter::default()).unwrap();
    assert!(replay.gaps.is_empty());
    assert_eq!(replay.records.len(), 2);
}

#[test]
fn partner_partition_holds_several_generations_until_released() {
    let (media, log) = mem_log(256 * 1024, Durability::Power);
    log.append_copy(DR, &partner_record(1, 4, b"a")).unwrap();
    log.append_copy(DR, &partner_record(2, 4, b"b")).unwrap();
    log.append_copy(DR, &partner_record(3, 5, b"c")).unwrap();
    assert!(matches!(
        log.append_copy(DR, &partner_record(4, 4, b"d")),
        Err(NvlogError::StaleGeneration { .. })
    ));
    drop(log);
    let (log, _) = reopen(&media, Durability::Power);
    let generations: Vec<_> = replay_all(&log, DR).iter().map(|r| r.header.generation.0).collect();
    assert_eq!(generations, vec![4, 4, 5]);
    log.release(DR, Lsn(2)).unwrap();
    drop(log);
    let (log, _) = reopen(&media, Durability::Power);
    let records = replay_all(&log, DR);
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].header.generation, Generation(5));
}

#[test]
fn replay_filter_skips_covered_lsns_and_foreign_epochs() {
    let (_media, log) = mem_log(256 * 1024, Durability::Process);
    for lsn in 1..=4 {
        log.append_copy(DR, &partner_record(lsn, 1, b"r")).unwrap();
    }
    let filter = ReplayFilter { after_lsn: Lsn(2), frozen_epochs: None };
    let lsns: Vec<_> = log.replay(DR, &filter).unwrap().records.iter().map(|r| r.header.lsn.0).collect();
    assert_eq!(lsns, vec![3, 4]);
    let stale = HashMap::from([(AGGREGATE, Epoch { number: 2, owner: PARTNER })]);
    let replay = log.replay(DR, &ReplayFilter { after_lsn: Lsn::ZERO, frozen_epochs: Some(stale) }).unwrap();
    assert!(replay.records.is_empty());
    assert_eq!(replay.skipped_for_epoch, 4);
    let frozen = HashMap::from([(AGGREGATE, Epoch { number: 1, owner: PARTNER })]);
    let replay = log.replay(DR, &ReplayFilter { after_lsn: Lsn::ZERO, frozen_epochs: Some(frozen) }).unwrap();
    assert_eq!(replay.records.len(), 4);
}

/// S10: after a failed msync nothing more is accepted, even once the media works again; a
/// reopen recovers what was durable.
#[test]
fn failed_persist_latches_the_log_until_reopen() {
    let (media, log) = mem_log(256 * 1024, Durability::Power);
    log.append(&write_input(b"durable", 0)).unwrap();
    media.fail_persists(true);
    assert!(matches!(log.append(&write_input(b"lost", 0)), Err(NvlogError::Io { .. })));
    media.fail_persists(false);
    assert!(matches!(log.append(&write_input(b"after", 0)), Err(NvlogError::Failed)));
    assert!(matches!(log.release(LOCAL, Lsn(1)), Err(NvlogError::Failed)));
    assert_eq!(log.stats().io_errors, 1);
    drop(log);
    let (log, _) = reopen(&media, Durability::Power);
    assert_eq!(&replay_all(&log, LOCAL)[0].payload[..], b"durable");
    log.append(&write_input(b"again", 0)).unwrap();
}

#[test]
fn failed_write_latches_the_log() {
    let (media, log) = mem_log(256 * 1024, Durability::Process);
    media.fail_writes(true);
    assert!(matches!(log.append(&write_input(b"x", 0)), Err(NvlogError::Io { .. })));
    media.fail_writes(false);
    assert!(matches!(log.append(&write_input(b"x", 0)), Err(NvlogError::Failed)));
}

#[test]
fn mirror_state_is_persisted() {
    let (media, log) = mem_log(64 * 1024, Durability::Power);
    log.set_mirror_state(DR, MirrorState::OutOfSync).unwrap();
    drop(log);
    let (log, _) = reopen(&media, Durability::Power);
    assert_eq!(log.status(DR).unwrap().mirror_state, MirrorState::OutOfSync);
}

// ---- One test per row of the recovery decision table. ----

fn half_size(media: &MemMedia) -> u64 {
    (media.len() - DATA_START) / 2 / 2
}

#[test]
fn recovery_row_torn_tail_truncates_and_continues() {
    let (media, log) = mem_log(DATA_START + 2 * 65536, Durability::Power);
    for i in 0..3u64 {
        log.append(&write_input(&payload(i, 500), 0)).unwrap();
    }
    drop(log);
    // Damage the last record's payload: it looks like an append that never completed.
    let third = DATA_START + 2 * nvlog::record::encoded_len(500) as u64;
    media.write(third + 200, &[0xFF; 8]).unwrap();
    let (log, report) = reopen(&media, Durability::Power);
    let local = &report.partitions[0];
    assert_eq!((local.case, local.action), (Case::TornTail, Action::TruncateTail));
    assert_eq!(local.tail, Lsn(2));
    assert_eq!(replay_all(&log, LOCAL).len(), 2);
    // The torn bytes were zeroed: nothing of them can come back after the next append.
    let mut rest = vec![0u8; 600];
    media.read(third, &mut rest).unwrap();
    assert!(rest.iter().all(|&b| b == 0));
    assert_eq!(log.append(&write_input(b"next", 0)).unwrap(), Lsn(3));
}

#[test]
fn recovery_row_corrupt_before_tail_fails_the_partition() {
    let (media, log) = mem_log(DATA_START + 2 * 16384, Durability::Power);
    // Fill the first half so it is sealed, then write one record into the second.
    let mut lsn = Lsn::ZERO;
    while log.status(LOCAL).unwrap().used_bytes <= half_size(&media) {
        lsn = log.append(&write_input(&payload(lsn.0, 1000), 0)).unwrap();
        assert!(lsn.0 < 20, "the first half never sealed");
    }
    drop(log);
    // Flip a payload byte of the first record, which sits in the sealed half.
    media.write(DATA_START + 150, &[0x5A]).unwrap();
    let (log, report) = reopen(&media, Durability::Power);
    let local = &report.partitions[0];
    assert_eq!((local.case, local.action), (Case::CorruptBeforeTail, Action::FailPartition), "{local:?}");
    assert!(matches!(log.replay(LOCAL, &ReplayFilter::default()), Err(NvlogError::PartitionFailed(_))));
    assert!(matches!(log.append(&write_input(b"x", 0)), Err(NvlogError::PartitionFailed(_))));
    // The mark is persistent, and a reset is the way out (after S8 recovered the records).
    drop(log);
    let (log, report) = reopen(&media, Durability::Power);
    assert_eq!(report.partitions[0].case, Case::CorruptBeforeTail);
    let generation = log.reset_partition(LOCAL).unwrap();
    assert_eq!(generation, 2);
    assert!(log.append(&write_input(b"x", 0)).unwrap() > lsn);
}

#[test]
fn recovery_row_stale_generation_is_never_replayed() {
    let (media, log) = mem_log(64 * 1024, Durability::Process);
    log.append(&write_input(b"one", 0)).unwrap();
    let tail = DATA_START + nvlog::record::encoded_len(3) as u64;
    drop(log);
    // A record that verifies, but under a generation the header never listed.
    let stale = encode_record(&write_input(b"ghost", 0), Lsn(2), Generation(999), NODE).unwrap();
    media.write(tail, &stale).unwrap();
    let before = media.snapshot();
    let (log, report) = reopen(&media, Durability::Process);
    let local = &report.partitions[0];
    assert_eq!((local.case, local.action), (Case::StaleGeneration, Action::FailPartition));
    assert!(log.replay(LOCAL, &ReplayFilter::default()).is_err());
    // Nothing that verifies is destroyed: the records are where they were.
    let data = (DATA_START as usize)..(DATA_START as usize + 4096);
    assert_eq!(media.snapshot()[data.clone()], before[data]);
}

#[test]
fn recovery_row_foreign_identity_is_refused_untouched() {
    let (media, log) = mem_log(64 * 1024, Durability::Power);
    log.append(&write_input(b"mine", 0)).unwrap();
    drop(log);
    let before = media.snapshot();
    let other = Identity { node: NodeId(9), ..IDENTITY };
    assert!(matches!(
        Nvlog::open(media.clone(), other, options(Durability::Power)),
        Err(NvlogError::ForeignIdentity { .. })
    ));
    let other_cluster = Identity { cluster: nvlog::ClusterId([9; 16]), ..IDENTITY };
    assert!(Nvlog::open(media.clone(), other_cluster, options(Durability::Power)).is_err());
    assert_eq!(media.snapshot(), before, "a refused open wrote to the log");
}

/// A torn header write leaves the older copy, which was persisted before the write started.
#[test]
fn recovery_row_header_copies_disagree_uses_the_valid_one() {
    let (media, log) = mem_log(64 * 1024, Durability::Power);
    log.append(&write_input(b"kept", 0)).unwrap();
    // This header write is the one a crash tears.
    let before_write = media.snapshot();
    log.set_mirror_state(DR, MirrorState::OutOfSync).unwrap();
    let after_write = media.snapshot();
    drop(log);
    let slot = (0..2u64)
        .find(|slot| {
            let range = (*slot * HEADER_SLOT_BYTES) as usize..(*slot * HEADER_SLOT_BYTES + 1160) as usize;
            before_write[range.clone()] != after_write[range]
        })
        .unwrap();
    let mut torn = after_write.clone();
    let half = (slot * HEADER_SLOT_BYTES) as usize + 580;
    torn[half..half + 580].copy_from_slice(&before_write[half..half + 580]);
    let copy = Arc::new(MemMedia::from_image(torn));
    let (log, report) = Nvlog::open(copy.clone(), IDENTITY, options(Durability::Power)).unwrap();
    assert_eq!(report.header_case, Case::HeaderCopiesDisagree);
    assert_eq!(&replay_all(&log, LOCAL)[0].payload[..], b"kept");
    assert_eq!(log.status(DR).unwrap().mirror_state, MirrorState::None, "the torn write never happened");
    drop(log);
    // The open rewrote the torn copy: both are valid again.
    let (_log, report) = Nvlog::open(copy, IDENTITY, options(Durability::Power)).unwrap();
    assert_eq!(report.header_case, Case::Valid);
}

/// Corruption of the newest header copy (not a crash) leaves a header older than the records:
/// the records must be neither replayed under wrong assumptions nor destroyed.
#[test]
fn a_lost_newest_header_never_silently_drops_records() {
    let (media, log) = mem_log(DATA_START + 2 * 16384, Durability::Power);
    let mut lsn = Lsn::ZERO;
    while log.status(LOCAL).unwrap().used_bytes <= 8192 + 2000 {
        lsn = log.append(&write_input(&payload(lsn.0, 1000), 0)).unwrap();
    }
    log.release(LOCAL, Lsn(3)).unwrap();
    drop(log);
    let newest = {
        let (log, _) = reopen(&media, Durability::Power);
        let records = replay_all(&log, LOCAL).len();
        drop(log);
        records
    };
    // Corrupt, in turn, each header copy of an image taken right after some header write.
    for slot in 0..2u64 {
        let copy = Arc::new(MemMedia::from_image(media.snapshot()));
        copy.write(slot * HEADER_SLOT_BYTES + 30, &[0xEE]).unwrap();
        let (log, report) = Nvlog::open(copy.clone(), IDENTITY, options(Durability::Power)).unwrap();
        assert_eq!(report.header_case, Case::HeaderCopiesDisagree);
        match log.replay(LOCAL, &ReplayFilter::default()) {
            Ok(replay) => assert_eq!(replay.records.len(), newest, "records dropped silently"),
            Err(NvlogError::PartitionFailed(_)) => {}
            Err(other) => panic!("{other}"),
        }
    }
}

#[test]
fn recovery_row_both_headers_bad_refuses_to_open() {
    let (media, log) = mem_log(64 * 1024, Durability::Power);
    drop(log);
    media.write(8, &[0xEE]).unwrap();
    media.write(HEADER_SLOT_BYTES + 8, &[0xEE]).unwrap();
    assert!(matches!(
        Nvlog::open(media.clone(), IDENTITY, options(Durability::Power)),
        Err(NvlogError::NoValidHeader { .. })
    ));
}

/// Group commit under real threads: every append gets a unique lsn, none is lost, and replay
/// after a reopen returns each payload under its lsn.
#[test]
fn concurrent_appenders_share_persists() {
    let (media, log) = mem_log(4 * 1024 * 1024, Durability::Power);
    let log = Arc::new(log);
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                (0..200u64)
                    .map(|i| {
                        let data = payload(t * 1000 + i, 64);
                        (log.append(&write_input(&data, t * 1000 + i)).unwrap(), data)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut acked: Vec<(Lsn, Vec<u8>)> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    acked.sort();
    assert_eq!(acked.len(), 1600);
    assert!(acked.windows(2).all(|w| w[1].0 == w[0].0.next()), "lsns are unique and contiguous");
    drop(log);
    let (log, _) = reopen(&media, Durability::Power);
    let records = replay_all(&log, LOCAL);
    assert_eq!(records.len(), acked.len());
    for (record, (lsn, data)) in records.iter().zip(&acked) {
        assert_eq!((record.header.lsn, &record.payload[..]), (*lsn, &data[..]));
    }
}

#[test]
fn mapped_file_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nvlog");
    let media = MmapMedia::create(&path, 1024 * 1024).unwrap();
    let (log, _) = Nvlog::format(media, &spec(), options(Durability::Power)).unwrap();
    for i in 0..100u64 {
        log.append(&write_input(&payload(i, 4096), i * 4096)).unwrap();
    }
    log.release(LOCAL, Lsn(50)).unwrap();
    drop(log);
    let (log, _) =
        Nvlog::open(MmapMedia::open(&path).unwrap(), IDENTITY, options(Durability::Power)).unwrap();
    let records = replay_all(&log, LOCAL);
    assert_eq!(records.first().unwrap().header.lsn, Lsn(51));
    assert_eq!(records.len(), 50);
    assert!(MmapMedia::create(&path, 4096).is_err(), "create never clobbers an existing log");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Random records (sizes, kinds, releases, reopens) survive append and replay.
    #[test]
    fn random_records_survive_append_and_replay(
        ops in proptest::collection::vec((0usize..3000, 0u8..10), 1..80),
        power in any::<bool>(),
    ) {
        let durability = if power { Durability::Power } else { Durability::Process };
        let (media, mut log) = mem_log(DATA_START + 2 * 32768, durability);
        let mut live: Vec<(Lsn, Vec<u8>)> = Vec::new();
        for (i, (len, action)) in ops.into_iter().enumerate() {
            match action {
                0 => {
                    drop(log);
                    log = reopen(&media, durability).0;
                }
                1 if !live.is_empty() => {
                    let upto = live[live.len() / 2].0;
                    log.release(LOCAL, upto).unwrap();
                    live.retain(|(lsn, _)| *lsn > upto);
                }
                _ => {
                    let data = payload(i as u64, len.max(1));
                    let lsn = loop {
                        match log.try_append_buffered(&write_input(&data, i as u64)) {
                            Ok(lsn) => break lsn,
                            // A full partition, or one holding records of as many generations as
                            // the header lists (reopens without a release): a CP frees it.
                            Err(NvlogError::Full(_) | NvlogError::TooManyGenerations(_)) => {
                                let upto = live.last().unwrap().0;
                                log.persist_through(LOCAL, upto).unwrap();
                                log.release(LOCAL, upto).unwrap();
                                live.clear();
                            }
                            Err(other) => panic!("{other}"),
                        }
                    };
                    log.persist_through(LOCAL, lsn).unwrap();
                    live.push((lsn, data));
                }
            }
        }
        drop(log);
        let (log, _) = reopen(&media, durability);
        let records = replay_all(&log, LOCAL);
        let got: Vec<(Lsn, Vec<u8>)> = records.iter().map(|r| (r.header.lsn, r.payload.to_vec())).collect();
        prop_assert_eq!(got, live);
    }

    /// Random bytes anywhere in a log never make recovery panic, and never yield a record
    /// whose CRC does not verify.
    #[test]
    fn random_bytes_never_panic_or_replay_a_bad_record(
        writes in proptest::collection::vec((0u64..(DATA_START + 2 * 16384), proptest::collection::vec(any::<u8>(), 1..300)), 1..20),
        records in 0u64..12,
    ) {
        let (media, log) = mem_log(DATA_START + 2 * 16384, Durability::Process);
        for i in 0..records {
            log.append(&write_input(&payload(i, 200), 0)).unwrap();
            log.append_copy(DR, &partner_record(i + 1, 1, &payload(i, 150))).unwrap();
        }
        drop(log);
        for (offset, bytes) in writes {
            let end = (offset as usize + bytes.len()).min(media.len() as usize);
            media.write(offset, &bytes[..end - offset as usize]).unwrap();
        }
        if let Ok((log, _)) = Nvlog::open(media.clone(), IDENTITY, options(Durability::Process)) {
            for kind in [LOCAL, DR] {
                if let Ok(replay) = log.replay(kind, &ReplayFilter::default()) {
                    for record in replay.records {
                        // Re-encoding computes the CRC from the fields; it must equal the stored one.
                        let encoded = record.encode();
                        prop_assert!(Record::decode(&encoded).is_ok());
                        prop_assert_eq!(Record::decode(&encoded).unwrap().header.crc, record.header.crc);
                    }
                }
            }
        }
    }

    /// Whole random files (not derived from a log) are refused cleanly.
    #[test]
    fn random_files_are_refused_without_panic(bytes in proptest::collection::vec(any::<u8>(), 16384..20000)) {
        let media = Arc::new(MemMedia::from_image(bytes));
        prop_assert!(Nvlog::open(media, IDENTITY, options(Durability::Process)).is_err());
    }
}

/// A host may write data that looks exactly like a record of the current generation. Bytes of
/// an earlier round of a half must never be read as records after the half is reused: a
/// released half is zeroed before reuse (breaking that makes this test fail).
#[test]
fn a_host_payload_that_looks_like_a_record_is_never_replayed() {
    let (media, log) = mem_log(DATA_START + 2 * 16384, Durability::Process);
    // A forged record with a huge lsn, signed with the generation the log is writing now.
    let forged = encode_record(&write_input(&[0xBA; 8], 0), Lsn(1 << 40), log.generation(), NODE).unwrap();
    assert_eq!(forged.len(), 104);
    let spray: Vec<u8> = forged.iter().copied().cycle().take(104 * 70).collect();
    // Round one of half 0: the sprayed payload, so forged copies sit at 96 + k * 104.
    let first = log.append(&write_input(&spray, 0)).unwrap();
    // Fill half 1 and free half 0; the next record goes to the start of half 0 again, and its
    // 104-byte payload ends it exactly where a forged copy started in round one.
    let filler = log.append(&write_input(&vec![1u8; 8000], 0)).unwrap();
    log.release(LOCAL, first).unwrap();
    let last = log.append(&write_input(&[2u8; 104], 0)).unwrap();
    assert_eq!(log.status(LOCAL).unwrap().used_bytes, 8096 + 200, "the record sits at the start of half 0");
    drop(log);
    let (log, _) = reopen(&media, Durability::Process);
    let lsns: Vec<_> = replay_all(&log, LOCAL).iter().map(|r| r.header.lsn).collect();
    assert_eq!(lsns, vec![filler, last]);
}
