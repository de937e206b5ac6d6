//! `mirror pause|resume|fullresync` (DESIGN §6.4, §11; S3, S4, S5): the operator's control of
//! an aggregate's plex mirror, DataKeeper style.
//!
//! - **pause**: the paused state is persisted in the shelf state first (so neither the plex
//!   monitor nor a restart reattaches the plex), then the plex at the other site is detached
//!   like any drop: regions in flight marked (S4), the drop recorded in the other plex's label
//!   and at the DR partner (S3) before any write completes on one plex alone. Writes go on and
//!   are tracked in the bitmap. While paused, the DR partner's copy is out of date: a forced
//!   switchover to it is vetoed (out of sync) and would NVFAIL.
//! - **resume**: the paused state is cleared; the plex monitor reattaches the plex (the
//!   generation rules decide, S5) and resyncs the regions written meanwhile.
//! - **fullresync**: the plex is detached if attached, every region marked dirty, and resumed:
//!   the resync copies the whole aggregate.
//!
//! Invariants: a paused plex is never reattached automatically; a pause never leaves an
//! aggregate without a normal plex (refused when the other plex is not normal).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use mc_proto::v1::{MirrorControlReply, MirrorControlRequest};
use plex::PlexState;
use tonic::Status;

use crate::node::{AggrSlot, Node};

/// The aggregate named `name`, or holding a volume named `name`, served here.
fn find(node: &Node, name: &str) -> Result<Arc<AggrSlot>, Status> {
    node.aggregates()
        .into_iter()
        .filter(|a| a.deposed().is_none())
        .find(|a| {
            let table = a.table();
            table.name == name || table.volumes.iter().any(|v| v.name == name)
        })
        .ok_or_else(|| {
            Status::not_found(format!("node {} serves no aggregate or volume named {name:?}", node.node_id()))
        })
}

/// `Admin.MirrorControl`.
pub async fn admin_mirror(
    node: &Arc<Node>,
    request: &MirrorControlRequest,
) -> Result<MirrorControlReply, Status> {
    let _admin = node.admin.lock().await;
    node.check_serving().map_err(|e| crate::data::status(&e))?;
    let slot = find(node, &request.name)?;
    let name = slot.table().name.clone();
    // The plex at the other site: plex 1, or plex 0 of a switched-over aggregate.
    let remote = usize::from(!slot.switched_over);
    if slot.switched_over && !slot.healed.load(Ordering::Acquire) {
        return Err(Status::failed_precondition(format!(
            "aggregate {name} is switched over and its plex at the other site is out until heal: run `mcctl heal`"
        )));
    }
    let state = |e: crate::shelf_state::ShelfStateError| {
        Status::unavailable(format!("persist the mirror state: {e}"))
    };
    let detach = |slot: Arc<AggrSlot>| async move {
        if matches!(slot.aggregate.plex_states()[remote], PlexState::Normal | PlexState::Resyncing { .. }) {
            slot.aggregate
                .detach(remote)
                .await
                .map_err(|e| Status::failed_precondition(format!("detach plex {remote}: {e}")))?;
        }
        Ok::<(), Status>(())
    };
    let result = match request.action.as_str() {
        "pause" => {
            node.shelf_state.set_paused(slot.uuid, true).await.map_err(state)?;
            detach(slot.clone()).await?;
            format!(
                "paused: plex {remote} detached (out of date); writes are tracked in the bitmap; `mirror resume` \
                 resyncs them"
            )
        }
        "resume" => {
            node.shelf_state.set_paused(slot.uuid, false).await.map_err(state)?;
            format!("resumed: plex {remote} is reattached and the regions written meanwhile are resynced")
        }
        "fullresync" => {
            node.shelf_state.set_paused(slot.uuid, true).await.map_err(state)?;
            detach(slot.clone()).await?;
            slot.aggregate
                .mark_dirty(&[], true)
                .await
                .map_err(|e| Status::unavailable(format!("mark every region: {e}")))?;
            node.shelf_state.set_paused(slot.uuid, false).await.map_err(state)?;
            format!("full resync: every region marked; plex {remote} is reattached and every region copied")
        }
        other => {
            return Err(Status::invalid_argument(format!(
                "unknown mirror action {other:?}: pause, resume or fullresync"
            )));
        }
    };
    tracing::warn!(node = node.node_id(), aggregate = %name, action = %request.action, "mirror {}", request.action);
    Ok(MirrorControlReply { aggregate: name, plex: u32::from(remote == 1), result })
}
