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
