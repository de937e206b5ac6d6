//! Protocol buffers of the product and the tonic code generated from them (DESIGN §8).
//!
//! The .proto files live in `proto/proto/` and are compiled by `build.rs` with protox, so no
//! system `protoc` is needed. Services arrive with the issues that implement them; this crate
//! holds only the wire format and knows nothing of `nvlog`, `plex` or the daemons.
//!
//! Invariants of the wire format:
//! - every call names the cluster, the sender and the receiver (`Identity`) and, where it is
//!   about an aggregate, the aggregate uuid and the epoch the sender holds;
//! - an NVLog record travels exactly as the writer encoded it, so the receiver keeps the
//!   writer's lsn, log generation and checksum.

/// Messages and services of package `mc.v1`.
pub mod v1 {
    #![allow(missing_docs, missing_debug_implementations, clippy::all, clippy::pedantic)]
    tonic::include_proto!("mc.v1");
}

/// The encoded `FileDescriptorSet` of every .proto file, for tonic-reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("mc_descriptor");

/// The largest gRPC message a peer may send us: a 1 MiB NVLog payload plus its header and the
/// protobuf framing, with headroom. Raised deliberately above tonic's default, never removed.
pub const MAX_MESSAGE_BYTES: usize = 2 * 1024 * 1024;

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    /// A full-size NVLog record (1 MiB of payload and its 96-byte header) must fit in one
    /// message under the decode limit we configure, or mirroring it would fail at run time.
    #[test]
    fn largest_record_fits_the_message_limit() {
        let message = v1::WriterMessage {
            body: Some(v1::writer_message::Body::Record(v1::MirroredRecord {
                lsn: u64::MAX,
                encoded: vec![0xA5; 96 + (1 << 20)],
            })),
        };
        assert!(message.encoded_len() < MAX_MESSAGE_BYTES);
    }

    #[test]
    fn descriptor_set_names_the_mirror_service() {
        let text = String::from_utf8_lossy(FILE_DESCRIPTOR_SET);
        assert!(text.contains("NvlogMirror") && text.contains("nvlog_mirror.proto"));
    }
}
