//! Helpers shared by the journal's integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::sync::Arc;

use nvlog::mem::MemMedia;
use nvlog::{
    AggregateId, ClusterId, Durability, Epoch, FormatSpec, Generation, Identity, NodeId, Nvlog, OpKind,
    Options, PartitionKind, RecordInput, VolumeId,
};

pub const NODE: NodeId = NodeId(1);
pub const PARTNER: NodeId = NodeId(2);
pub const IDENTITY: Identity = Identity { cluster: ClusterId([0xC1; 16]), node: NODE };
pub const AGGREGATE: AggregateId = AggregateId([0xA6; 16]);
pub const EPOCH: Epoch = Epoch { number: 1, owner: NODE };

pub fn spec() -> FormatSpec {
    FormatSpec {
        identity: IDENTITY,
        partitions: vec![(PartitionKind::Local, NODE), (PartitionKind::DrPartner, PARTNER)],
        generation_floor: Generation(0),
    }
}

pub fn options(durability: Durability) -> Options {
    Options { durability, ..Options::default() }
}

/// A formatted in-memory log of `len` bytes.
pub fn mem_log(len: u64, durability: Durability) -> (Arc<MemMedia>, Nvlog<Arc<MemMedia>>) {
    let media = Arc::new(MemMedia::new(len));
    let (log, _) = Nvlog::format(media.clone(), &spec(), options(durability)).unwrap();
    (media, log)
}

/// Deterministic payload bytes for a record, so a checker can recompute them.
pub fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

pub fn write_input(data: &[u8], offset: u64) -> RecordInput<'_> {
    RecordInput {
        op: OpKind::Write,
        aggregate: AGGREGATE,
        epoch: EPOCH,
        volume: VolumeId(1),
        offset,
        range_len: data.len() as u64,
        payload: data,
    }
}

pub fn trim_input(offset: u64, len: u64) -> RecordInput<'static> {
    RecordInput {
        op: OpKind::Trim,
        aggregate: AGGREGATE,
        epoch: EPOCH,
        volume: VolumeId(1),
        offset,
        range_len: len,
        payload: &[],
    }
}
