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
