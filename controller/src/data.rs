//! The `Data` gRPC service (DESIGN §4): the data API over the network, for tests and the
//! benchmark until the NBD export exists. Every call names the cluster; errors map to codes
//! deliberately (DESIGN §8): not serving → `UNAVAILABLE`, unknown volume → `NOT_FOUND`, a range
//! outside the volume → `OUT_OF_RANGE`, an NVFAILed volume → `FAILED_PRECONDITION` (only an
//! administrator clearing the state helps, DESIGN §9), bad input → `INVALID_ARGUMENT`, a partner
//! that did not acknowledge → `DEADLINE_EXCEEDED` (the write was not acknowledged).

use std::sync::Arc;

use bytes::Bytes;
use mc_proto::v1::data_server::Data;
use mc_proto::v1::{
    FlushReply, FlushRequest, RangeRequest, ReadReply, ReadRequest, WriteReply, WriteRequest,
};
use nvlog::OpKind;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::node::{DataError, Node};

/// The largest write one call carries: one NVLog record.
pub const MAX_WRITE_BYTES: usize = nvlog::MAX_PAYLOAD_BYTES as usize;

/// The service.
#[derive(Debug)]
pub struct DataService {
    node: Arc<Node>,
}

impl DataService {
    /// A service over `node`.
    pub fn new(node: Arc<Node>) -> DataService {
        DataService { node }
    }

    fn check_cluster(&self, cluster: &[u8]) -> Result<(), Status> {
        crate::admin::check_cluster(&self.node.config().cluster_id, cluster)
    }

    /// A span naming the node, the volume and its aggregate (DESIGN §13).
    fn span(&self, op: &'static str, volume: &str) -> tracing::Span {
        if !tracing::enabled!(tracing::Level::DEBUG) {
            return tracing::Span::none();
        }
        let aggregate = self.node.volume(volume).map(|v| v.aggr.table().name.clone()).unwrap_or_default();
        tracing::debug_span!("data", node = self.node.node_id(), op, volume, aggregate)
    }
}

/// The gRPC status of a data error.
pub fn status(e: &DataError) -> Status {
    match e {
        DataError::NotServing { .. } | DataError::Offline { .. } => Status::unavailable(e.to_string()),
        DataError::NotFound(_) => Status::not_found(e.to_string()),
        // Not transient: retrying cannot help until an administrator clears the state (S9).
        DataError::NvFailed { .. } => Status::failed_precondition(e.to_string()),
        DataError::Range(_) => Status::out_of_range(e.to_string()),
        DataError::Invalid(_) => Status::invalid_argument(e.to_string()),
        DataError::Mirror(_) => Status::deadline_exceeded(e.to_string()),
        DataError::Nvlog(_) | DataError::Plex(_) => Status::internal(e.to_string()),
    }
}

#[tonic::async_trait]
impl Data for DataService {
    async fn write(&self, request: Request<WriteRequest>) -> Result<Response<WriteReply>, Status> {
        let request = request.into_inner();
        self.check_cluster(&request.cluster_id)?;
        if request.data.len() > MAX_WRITE_BYTES {
            return Err(Status::invalid_argument(format!(
                "{} bytes in one write; at most {MAX_WRITE_BYTES}",
                request.data.len()
            )));
        }
        let span = self.span("write", &request.volume);
        let lsn = self
            .node
            .write(&request.volume, request.offset, Bytes::from(request.data))
            .instrument(span)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(WriteReply { last_lsn: lsn.0 }))
    }

    async fn read(&self, request: Request<ReadRequest>) -> Result<Response<ReadReply>, Status> {
        let request = request.into_inner();
        self.check_cluster(&request.cluster_id)?;
        if request.length > MAX_WRITE_BYTES as u64 {
            return Err(Status::invalid_argument(format!(
                "{} bytes in one read; at most {MAX_WRITE_BYTES}",
                request.length
            )));
        }
        let data =
            self.node.read(&request.volume, request.offset, request.length).await.map_err(|e| status(&e))?;
        Ok(Response::new(ReadReply { data }))
    }

    async fn flush(&self, request: Request<FlushRequest>) -> Result<Response<FlushReply>, Status> {
        let request = request.into_inner();
        self.check_cluster(&request.cluster_id)?;
        self.node.flush(&request.volume).map_err(|e| status(&e))?;
        Ok(Response::new(FlushReply {}))
    }

    async fn trim(&self, request: Request<RangeRequest>) -> Result<Response<WriteReply>, Status> {
        let request = request.into_inner();
        self.check_cluster(&request.cluster_id)?;
        let lsn = self
            .node
            .zero(&request.volume, OpKind::Trim, request.offset, request.length)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(WriteReply { last_lsn: lsn.0 }))
    }

    async fn write_zeroes(&self, request: Request<RangeRequest>) -> Result<Response<WriteReply>, Status> {
        let request = request.into_inner();
        self.check_cluster(&request.cluster_id)?;
        let lsn = self
            .node
            .zero(&request.volume, OpKind::WriteZeroes, request.offset, request.length)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(WriteReply { last_lsn: lsn.0 }))
    }
}
