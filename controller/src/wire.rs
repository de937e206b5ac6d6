//! Conversions between the domain types of the libraries and the wire types of `mc-proto`.
//!
//! Invariant: every conversion is total; a wire value a peer may send that has no domain value
//! is handled where it is received, as an error.

use mc_proto::v1::MirrorState as WireMirrorState;
use nvlog::MirrorState;

/// A mirror state as the wire carries it.
pub fn mirror_state(state: MirrorState) -> WireMirrorState {
    match state {
        MirrorState::None => WireMirrorState::Unspecified,
        MirrorState::InSync => WireMirrorState::InSync,
        MirrorState::OutOfSync => WireMirrorState::OutOfSync,
        MirrorState::Resyncing => WireMirrorState::Resyncing,
        MirrorState::Offline => WireMirrorState::Offline,
    }
}

/// An epoch as the wire carries it.
pub fn epoch(epoch: plex::Epoch) -> mc_proto::v1::Epoch {
    mc_proto::v1::Epoch { number: epoch.number, owner_node: epoch.owner.0 }
}

/// One aggregate's epoch as the wire carries it.
pub fn aggregate_epoch(aggregate: plex::Uuid, epoch: plex::Epoch) -> mc_proto::v1::AggregateEpoch {
    mc_proto::v1::AggregateEpoch {
        aggregate_uuid: aggregate.0.to_vec(),
        epoch: Some(mc_proto::v1::Epoch { number: epoch.number, owner_node: epoch.owner.0 }),
    }
}

/// An aggregate's epoch from the wire; `None` when malformed.
pub fn from_aggregate_epoch(wire: &mc_proto::v1::AggregateEpoch) -> Option<(plex::Uuid, plex::Epoch)> {
    let uuid = <[u8; 16]>::try_from(wire.aggregate_uuid.as_slice()).ok()?;
    let epoch = wire.epoch.as_ref()?;
    Some((plex::Uuid(uuid), plex::Epoch { number: epoch.number, owner: plex::NodeId(epoch.owner_node) }))
}
