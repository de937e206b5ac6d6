//! The `Admin` gRPC service (DESIGN §8, §11): the node's status (fencing, NVLog partitions, the
//! DR mirror as the writer sees it, aggregates, plexes, volumes, CPs), aggregate and volume
//! creation, and reading a partition's records (what a partner holds of ours, S8).
//!
//! Invariants: a request naming another cluster is refused with `FAILED_PRECONDITION` (a
//! stale address or another cluster's tool, never answered as if it were ours); a malformed
//! cluster id or argument is `INVALID_ARGUMENT`; status and record listing only read.

use std::sync::Arc;

use mc_proto::v1::admin_server::Admin;
use mc_proto::v1::{
    AggregateInfo, CpStats, CreateAggregateRequest, CreateVolumeRequest, DeleteVolumeReply,
    DeleteVolumeRequest, HealPartnerReply, HealPartnerRequest, HealReply, HealRequest, Identity,
    MirrorControlReply, MirrorControlRequest, MirrorState as WireMirrorState, ModifyVolumeRequest,
    NvlogPartition, OperationsReply, OperationsRequest, PartitionRecord, PartitionRecordsReply,
    PartitionRecordsRequest, PlexInfo, ReleaseAggregatesReply, ReleaseAggregatesRequest, ResyncInfo,
    StatusReply, StatusRequest, SwitchbackReply, SwitchbackRequest, SwitchoverReply, SwitchoverRequest,
    TakeBackReply, TakeBackRequest, UnavailableAggregate, UnfenceReply, UnfenceRequest, VolumeInfo,
    WriterMirror,
};
use nvlog::{OpKind, PartitionKind};
use tonic::{Request, Response, Status};

use crate::config::Site;
use crate::node::{AggrSlot, Node};
use crate::nvlog_mirror::WriterState;

/// Refuses a malformed or foreign cluster id.
pub fn check_cluster(ours: &[u8; 16], theirs: &[u8]) -> Result<(), Status> {
    if theirs.len() != 16 {
        return Err(Status::invalid_argument(format!("cluster_id is {} bytes, not 16", theirs.len())));
    }
    if theirs != ours {
        return Err(Status::failed_precondition("this node belongs to another cluster"));
    }
    Ok(())
}

/// The most records one `PartitionRecords` call returns.
const MAX_RECORDS_PER_CALL: u32 = 256;

/// The service.
#[derive(Debug)]
pub struct AdminService {
    node: Arc<Node>,
}

impl AdminService {
    /// A service over `node`.
    pub fn new(node: Arc<Node>) -> AdminService {
        AdminService { node }
    }

    fn check_cluster(&self, cluster: &[u8]) -> Result<(), Status> {
        check_cluster(&self.node.config().cluster_id, cluster)
    }
}

/// What status shows of one aggregate.
pub async fn aggregate_info(node: &Node, aggr: &AggrSlot) -> AggregateInfo {
    let status = aggr.aggregate.status().await;
    // The counts behind `status.bitmap`'s line (the same plex's bitmap), for `mirror status`.
    let bitmap = aggr.aggregate.bitmap_summary().await;
    let table = aggr.table().clone();
    let last_cp = *aggr.last_cp.lock().expect("last CP lock");
    let offline = node.offline_reasons();
    let disks = aggr.disks.lock().expect("disk list lock").clone();
    let (here, there) = match node.config().site {
        Site::A => ("A", "B"),
        Site::B => ("B", "A"),
    };
    // Plex 0 is at the home node's site: after a switchover that is the other site.
    let (here, there) = if aggr.switched_over { (there, here) } else { (here, there) };
    AggregateInfo {
        uuid: aggr.uuid.0.to_vec(),
        name: table.name.clone(),
        state: status.state.to_string(),
        size_bytes: aggr.aggregate.size_bytes(),
        plexes: (0..2)
            .map(|i| PlexInfo {
                index: u32::from(i == 1),
                state: status.plexes[i].to_string(),
                generation: status.plexes[i].generation.0,
                disks: disks[i].clone(),
                site: if i == 0 { here } else { there }.to_string(),
            })
            .collect(),
        volumes: table.volumes.iter().map(|v| crate::nvfail::volume_info(aggr, v, &offline)).collect(),
        last_cp_id: last_cp.id.0,
        last_cp_lsn: last_cp.last_lsn.0,
        epoch: Some(crate::wire::epoch(aggr.plex_epoch())),
        switched_over: aggr.switched_over,
        home_node: if aggr.switched_over { node.config().dr_partner.node_id } else { node.node_id() },
        bitmap_regions: bitmap.map_or(0, |b| b.regions),
        dirty_regions: bitmap.map_or(0, |b| b.dirty_regions),
        region_bytes: bitmap.map_or(0, |b| b.region_bytes),
        resync: status.resync.as_ref().map(resync_info),
        mirror_paused: node.shelf_state.marks(aggr.uuid).paused,
    }
}

/// A running (or the last) resync as status reports it.
fn resync_info(progress: &plex::ResyncProgress) -> ResyncInfo {
    ResyncInfo {
        level: match progress.level {
            plex::ResyncLevel::Full => "full",
            plex::ResyncLevel::Incremental => "incremental",
        }
        .to_string(),
        source_plex: u32::from(progress.source == 1),
        target_plex: u32::from(progress.target == 1),
        total_bytes: progress.total_bytes,
        copied_bytes: progress.copied_bytes,
        bytes_per_second: progress.rate(),
        complete: progress.complete,
    }
}

/// What an operator should know about a partner partition's copy.
fn copy_note(kind: PartitionKind, state: nvlog::MirrorState) -> &'static str {
    use nvlog::MirrorState as M;
    if kind == PartitionKind::Local {
        return "";
    }
    match state {
        M::InSync => "",
        M::Resyncing => {
            "incomplete: this copy lost records and holds only those mirrored since the writer re-established; \
             complete after the writer's covering CP"
        }
        M::OutOfSync => "incomplete: out of sync; the writer must re-establish the mirror",
        _ => "incomplete: the writer has not mirrored to this copy yet",
    }
}

fn op_name(op: OpKind) -> &'static str {
    match op {
        OpKind::Write => "write",
        OpKind::Trim => "trim",
        OpKind::WriteZeroes => "write_zeroes",
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(&self, request: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        self.check_cluster(&request.into_inner().cluster_id)?;
        let node = &self.node;
        let nvlog = node.nvlog();
        let mut partitions = Vec::new();
        for kind in nvlog.partition_kinds() {
            let status =
                nvlog.status(kind).map_err(|e| Status::internal(format!("NVLog partition {kind}: {e}")))?;
            partitions.push(NvlogPartition {
                kind: kind.name().to_string(),
                writer_node: status.writer.0,
                // For `local`: this node's persisted account, as the writer, of its DR mirror.
                mirror_state: crate::wire::mirror_state(status.mirror_state) as i32,
                partition_generation: status.partition_generation,
                released_lsn: status.released_lsn.0,
                last_lsn: status.last_lsn.0,
                durable_lsn: status.durable_lsn.0,
                unreleased_records: status.unreleased_records as u64,
                used_bytes: status.used_bytes,
                size_bytes: status.size_bytes,
                copy_complete: kind != PartitionKind::Local
                    && status.mirror_state == nvlog::MirrorState::InSync,
                copy_note: copy_note(kind, status.mirror_state).to_string(),
            });
        }
        let mirror = node.mirror().status();
        let (state, resync_from) = match mirror.state {
            WriterState::Unknown => (WireMirrorState::Unspecified, 0),
            WriterState::InSync => (WireMirrorState::InSync, 0),
            WriterState::Resyncing { from } => (WireMirrorState::Resyncing, from.0),
            WriterState::OutOfSync => (WireMirrorState::OutOfSync, 0),
        };
        let mut aggregates = Vec::new();
        for aggr in node.aggregates() {
            aggregates.push(aggregate_info(node, &aggr).await);
        }
        let cp = node.cp_stats();
        let state_now = node.state();
        let mut reason = state_now.reason.clone();
        for (uuid, why) in node.unavailable_aggregates() {
            reason.push_str(&format!("; aggregate {} not served: {why}", crate::node::hex(&uuid.0)));
        }
        Ok(Response::new(StatusReply {
            identity: Some(Identity {
                cluster_id: node.config().cluster_id.to_vec(),
                sender_node: node.node_id(),
                receiver_node: 0,
            }),
            site: match node.config().site {
                Site::A => "A",
                Site::B => "B",
            }
            .to_string(),
            log_generation: nvlog.generation().0,
            partitions,
            node_state: state_now.phase.name().to_string(),
            state_reason: reason,
            dr_mirror: Some(WriterMirror {
                partner_node: mirror.partner,
                state: state as i32,
                resync_from_lsn: resync_from,
                connected: mirror.connected,
                acked_lsn: mirror.acked.0,
            }),
            mode: node.mode().to_string(),
            unavailable: node
                .unavailable_aggregates()
                .into_iter()
                .map(|(uuid, reason)| UnavailableAggregate { uuid: uuid.0.to_vec(), reason })
                .collect(),
            aggregates,
            cp: Some(CpStats {
                completed: cp.completed,
                last_id: cp.last_id,
                last_lsn: cp.last_lsn.0,
                last_duration_us: u64::try_from(cp.last_duration.as_micros()).unwrap_or(u64::MAX),
                last_blocks: cp.last_blocks,
                backpressure_waits: cp.backpressure_waits,
                replayed_records: cp.replayed_records,
            }),
        }))
    }

    async fn create_aggregate(
        &self,
        request: Request<CreateAggregateRequest>,
    ) -> Result<Response<AggregateInfo>, Status> {
        let request = request.into_inner();
        self.check_cluster(&request.cluster_id)?;
        let slot = self
            .node
            .create_aggregate(
                &request.name,
                [request.plex0_disks, request.plex1_disks],
                request.disk_size_bytes,
            )
            .await
            .map_err(|e| crate::data::status(&e))?;
        Ok(Response::new(aggregate_info(&self.node, &slot).await))
    }

    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Result<Response<VolumeInfo>, Status> {
        let request = request.into_inner();
        self.check_cluster(&request.cluster_id)?;
        let volume = self
            .node
            .create_volume(&request.aggregate, &request.name, request.size_bytes)
            .await
            .map_err(|e| crate::data::status(&e))?;
        Ok(Response::new(crate::nvfail::volume_info(
            &volume.aggr,
            &volume.entry,
            &self.node.offline_reasons(),
        )))
    }

    async fn partition_records(
        &self,
        request: Request<PartitionRecordsRequest>,
    ) -> Result<Response<PartitionRecordsReply>, Status> {
        let request = request.into_inner();
        self.check_cluster(&request.cluster_id)?;
        let kind = match request.partition.as_str() {
            "local" => PartitionKind::Local,
            "dr_partner" => PartitionKind::DrPartner,
            other => return Err(Status::invalid_argument(format!("unknown partition {other:?}"))),
        };
        let limit = request.max_records.clamp(1, MAX_RECORDS_PER_CALL) as usize;
        let nvlog = self.node.nvlog().clone();
        let after = nvlog::Lsn(request.after_lsn);
        let encoded = tokio::task::spawn_blocking(move || nvlog.records_above(kind, after))
            .await
            .map_err(|e| Status::internal(format!("NVLog task: {e}")))?
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        let more = encoded.len() > limit;
        let mut records = Vec::new();
        for bytes in encoded.into_iter().take(limit) {
            let record = nvlog::Record::decode(&bytes)
                .map_err(|e| Status::internal(format!("a held record does not decode: {e}")))?;
            let header = &record.header;
            records.push(PartitionRecord {
                lsn: header.lsn.0,
                writer_node: header.writer.0,
                log_generation: header.generation.0,
                op: op_name(header.op).to_string(),
                aggregate_uuid: header.aggregate.0.to_vec(),
                volume_id: header.volume.0,
                offset: header.offset,
                range_length: header.range_len,
                payload: if request.with_payload { record.payload.to_vec() } else { Vec::new() },
            });
        }
        Ok(Response::new(PartitionRecordsReply { records, more }))
    }

    async fn modify_volume(
        &self,
        request: Request<ModifyVolumeRequest>,
    ) -> Result<Response<VolumeInfo>, Status> {
        let request = request.into_inner();
        self.check_cluster(&request.cluster_id)?;
        crate::nvfail::modify_volume(&self.node, &request).await.map(Response::new)
    }

    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeReply>, Status> {
        let request = request.into_inner();
        self.check_cluster(&request.cluster_id)?;
        crate::nvfail::delete_volume(&self.node, &request).await.map(Response::new)
    }

    async fn switchover(
        &self,
        request: Request<SwitchoverRequest>,
    ) -> Result<Response<SwitchoverReply>, Status> {
        let request = request.into_inner();
        self.check_cluster(&request.cluster_id)?;
        crate::switchover::admin_switchover(&self.node, &request).await.map(Response::new)
    }

    async fn unfence(&self, request: Request<UnfenceRequest>) -> Result<Response<UnfenceReply>, Status> {
        let request = request.into_inner();
        self.check_cluster(&request.cluster_id)?;
        crate::switchover::admin_unfence(&self.node, &request).await.map(Response::new)
    }

    async fn heal(&self, request: Request<HealRequest>) -> Result<Response<HealReply>, Status> {
        let request = request.into_inner();
        self.check_cluster(&request.cluster_id)?;
        crate::heal::admin_heal(&self.node, &request).await.map(Response::new)
    }

    async fn switchback(
        &self,
        request: Request<SwitchbackRequest>,
    ) -> Result<Response<SwitchbackReply>, Status> {
        let request = request.into_inner();
        self.check_cluster(&request.cluster_id)?;
        crate::heal::admin_switchback(&self.node, &request).await.map(Response::new)
    }

    async fn heal_partner(
        &self,
        request: Request<HealPartnerRequest>,
    ) -> Result<Response<HealPartnerReply>, Status> {
        crate::heal::admin_heal_partner(&self.node, &request.into_inner()).await.map(Response::new)
    }

    async fn take_back(&self, request: Request<TakeBackRequest>) -> Result<Response<TakeBackReply>, Status> {
        crate::heal::admin_take_back(&self.node, &request.into_inner()).await.map(Response::new)
    }

    async fn mirror_control(
        &self,
        request: Request<MirrorControlRequest>,
    ) -> Result<Response<MirrorControlReply>, Status> {
        let request = request.into_inner();
        self.check_cluster(&request.cluster_id)?;
        crate::mirror_admin::admin_mirror(&self.node, &request).await.map(Response::new)
    }

    async fn release_aggregates(
        &self,
        request: Request<ReleaseAggregatesRequest>,
    ) -> Result<Response<ReleaseAggregatesReply>, Status> {
        let request = request.into_inner();
        crate::switchover::admin_release(&self.node, &request).await.map(Response::new)
    }

    async fn operations(
        &self,
        request: Request<OperationsRequest>,
    ) -> Result<Response<OperationsReply>, Status> {
        let request = request.into_inner();
        self.check_cluster(&request.cluster_id)?;
        let operations = self.node.operations().list().iter().map(crate::operations::to_wire).collect();
        Ok(Response::new(OperationsReply { operations }))
    }
}
