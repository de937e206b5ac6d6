//! The `Admin` gRPC service (DESIGN §8, §11). So far: `Status`, the node's identity and the
//! state of every NVLog partition.
//!
//! Invariants: a request naming another cluster is refused with `FAILED_PRECONDITION` (a
//! stale address or another cluster's tool, never answered as if it were ours); a malformed
//! cluster id is `INVALID_ARGUMENT`; the service only reads.

use std::sync::Arc;

use mc_proto::v1::admin_server::Admin;
use mc_proto::v1::{Identity, MirrorState as WireMirrorState, NvlogPartition, StatusReply, StatusRequest};
use nvlog::{MmapMedia, Nvlog, PartitionKind};
use tonic::{Request, Response, Status};

use crate::config::{Config, Site};

/// The service.
#[derive(Debug)]
pub struct AdminService {
    config: Config,
    nvlog: Arc<Nvlog<MmapMedia>>,
}

impl AdminService {
    /// A service over this node's configuration and NVLog.
    pub fn new(config: Config, nvlog: Arc<Nvlog<MmapMedia>>) -> AdminService {
        AdminService { config, nvlog }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(&self, request: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        let cluster = request.into_inner().cluster_id;
        if cluster.len() != 16 {
            return Err(Status::invalid_argument(format!("cluster_id is {} bytes, not 16", cluster.len())));
        }
        if cluster != self.config.cluster_id {
            return Err(Status::failed_precondition("this node belongs to another cluster"));
        }
        let mut partitions = Vec::new();
        for kind in self.nvlog.partition_kinds() {
            let status = self
                .nvlog
                .status(kind)
                .map_err(|e| Status::internal(format!("NVLog partition {kind}: {e}")))?;
            partitions.push(NvlogPartition {
                kind: kind.name().to_string(),
                writer_node: status.writer.0,
                mirror_state: if kind == PartitionKind::Local {
                    WireMirrorState::Unspecified as i32
                } else {
                    crate::wire::mirror_state(status.mirror_state) as i32
                },
                partition_generation: status.partition_generation,
                released_lsn: status.released_lsn.0,
                last_lsn: status.last_lsn.0,
                durable_lsn: status.durable_lsn.0,
                unreleased_records: status.unreleased_records as u64,
                used_bytes: status.used_bytes,
                size_bytes: status.size_bytes,
            });
        }
        Ok(Response::new(StatusReply {
            identity: Some(Identity {
                cluster_id: self.config.cluster_id.to_vec(),
                sender_node: self.config.node_id,
                receiver_node: 0,
            }),
            site: match self.config.site {
                Site::A => "A",
                Site::B => "B",
            }
            .to_string(),
            log_generation: self.nvlog.generation().0,
            partitions,
        }))
    }
}
