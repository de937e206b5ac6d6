//! Heal and switchback (DESIGN §6.4, §11; S2, S5, S8, S14).
//!
//! After a switchover, node Y serves its partner X's aggregates from plex 1 (at Y's site); plex
//! 0, at X's site, is out. When X returns it waits for switchback: it learns from Y's hello
//! that Y holds higher epochs for all its aggregates, serves its disks (DiskService) and none
//! of its volumes, and keeps its own unreleased records of them.
//!
//! **Heal** (`Admin.Heal`, run at Y):
//! 1. X answers with the extents its unreleased records touch (a CP of X in flight when it
//!    went away may have put them on plex 0 only) or "all" if it cannot read them;
//! 2. Y marks them in the bitmap of its plex, durably; only then X discards the records (S8);
//! 3. Y reattaches plex 0 through X's DiskService at its own epoch. The generation rules
//!    decide (S5): plex 0 is the target of an incremental resync from the merged bitmap (§6.4),
//!    or, if X wrote alone before it went away, both plexes moved on: a split brain, refused;
//! 4. the plex monitor resyncs plex 0 in the background and keeps it attached from then on.
//!
//! **Switchback** (`Admin.Switchback`, run at Y): vetoed unless X waits for switchback and
//! every switched-over aggregate is healed with both plexes normal. Y journals the plan (new
//! epochs, owner X), stops I/O to the aggregates, drains, completes a CP (both plexes normal
//! after it), persists the new epochs (its own writes at the old ones are refused from then
//! on, S2), stops serving them and thaws its receiver of X's records; then X takes them back
//! (`Admin.TakeBack`): it persists the epochs, opens the aggregates from both plexes, records
//! itself as owner, completes a CP and serves. A crash of Y before the epochs are raised rolls
//! the switchback back (it serves the aggregates again); after, a re-run resumes at the hand
//! over. X's take-back is idempotent.
//!
//! Invariants: at every moment at most one node holds the current epoch of an aggregate and
//! only it writes it (S2); X discards its records only after what they touch is durable in the
//! resync set (S8); a plex is a resync source only by the generation rules (S5); the switchback
//! CP covers every write Y acknowledged, on both plexes, before the epoch moves.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use mc_proto::v1::{
    HealExtent, HealExtents, HealPartnerReply, HealPartnerRequest, HealReply, HealRequest, HealedAggregate,
    SwitchbackReply, SwitchbackRequest, TakeBackReply, TakeBackRequest, Veto,
};
use nvlog::{Lsn, PartitionKind};
use plex::{Aggregate, Epoch, NodeId, PlexState, Uuid};
use prost::Message;
use tonic::Status;
use tonic::transport::Channel;

use crate::node::{AggrSlot, Node, Phase, SlotState, hex};
use crate::operations::{OperationKind, OperationRecord, OperationState};
use crate::switchover::{Plan, Planned};

/// Per aggregate, the (volume id, offset, length) ranges a node's unreleased records touch;
/// `None`: they cannot be read, every region must be copied.
type Extents = Option<Vec<(u32, u64, u64)>>;

/// More extents than this and the resync copies every region (a bounded reply).
const MAX_HEAL_EXTENTS: usize = 65_536;
const HEAL_MAGIC: &[u8; 4] = b"HEA1";

/// The aggregates a heal reattached (the heal operation's payload).
pub fn encode_healed(uuids: &[Uuid]) -> Vec<u8> {
    let mut out = HEAL_MAGIC.to_vec();
    let count = u16::try_from(uuids.len().min(256)).unwrap_or(0);
    out.extend_from_slice(&count.to_le_bytes());
    for uuid in uuids.iter().take(256) {
        out.extend_from_slice(&uuid.0);
    }
    out
}

/// Decodes a heal payload; any defect is an error, never a panic.
pub fn decode_healed(bytes: &[u8]) -> Result<Vec<Uuid>, String> {
    if bytes.len() < 6 || &bytes[..4] != HEAL_MAGIC {
        return Err("a heal payload has a bad magic or is truncated".into());
    }
    let count = usize::from(u16::from_le_bytes([bytes[4], bytes[5]]));
    if count > 256 || bytes.len() != 6 + count * 16 {
        return Err(format!("a heal payload of {} bytes for {count} aggregates", bytes.len()));
    }
    Ok(bytes[6..]
        .chunks_exact(16)
        .map(|c| {
            let mut uuid = [0u8; 16];
            uuid.copy_from_slice(c);
            Uuid(uuid)
        })
        .collect())
}

/// The aggregates whose home plex a heal reattached since the latest switchover.
pub fn healed_aggregates(records: &[OperationRecord]) -> Vec<Uuid> {
    let since = records.iter().rposition(|op| op.kind == OperationKind::Switchover).map_or(0, |at| at + 1);
    records[since..]
        .iter()
        .filter(|op| op.kind == OperationKind::Heal)
        .filter_map(|op| decode_healed(&op.payload).ok())
        .flatten()
        .collect()
}

/// The latest switchback of the journal with its plan.
pub fn last_switchback(records: &[OperationRecord]) -> Option<(OperationRecord, Plan)> {
    records.iter().rev().filter(|op| op.kind == OperationKind::Switchback).find_map(|op| {
        Plan::decode(&op.payload)
            .ok()
            .filter(|plan| !plan.aggregates.is_empty())
            .map(|plan| (op.clone(), plan))
    })
}

/// Whether the latest switchover's hold on the partner's partition is over: a switchback after
/// it raised its epochs (the partner's new records carry epochs above everything it sent
/// before, so the receiver takes them again).
pub fn switched_back(records: &[OperationRecord], shelf: &crate::shelf_state::ShelfState) -> bool {
    let last_switchover = records.iter().rposition(|op| op.kind == OperationKind::Switchover);
    let last_switchback = records.iter().rposition(|op| op.kind == OperationKind::Switchback);
    match (last_switchover, last_switchback) {
        (Some(over), Some(back)) if back > over => Plan::decode(&records[back].payload)
            .is_ok_and(|plan| plan.aggregates.iter().any(|a| shelf.marks(a.uuid).epoch >= a.new)),
        _ => false,
    }
}

/// Whether a switchback drops the home node's records held in this node's receiver partition
/// before it hands the aggregates back (`MirrorReceiver::drop_held_records`; found by the model
/// check, docs/safety.md finding 9). Always, but under the model checker's deliberate break.
pub fn drops_held_records() -> bool {
    !crate::model_breaks::active(crate::model_breaks::Break::SwitchbackKeepsHeldRecords)
}

/// The journal step of a switchback that has not yet drained (nothing asked of the mediator).
const SWITCHBACK_PLANNED: &str = "planned";

/// At start: a switchback interrupted before it raised an epoch here is rolled back (the
/// aggregates are served here again), unless it may have asked the mediator for the new epochs
/// (`mediator_configured`, and past its first step): the mediator may hold them, and its next
/// reply deposes this node of the aggregates (finding 10 of docs/safety.md: rolled back, nothing
/// could then switch them back), so it stays in progress for a re-run, which resumes at the hand
/// over once this node holds the epochs, or drains and asks again. One that raised them here
/// stays in progress too; an interrupted heal ends as failed (re-running it is safe).
pub async fn settle_at_start(
    journal: &crate::operations::OperationLog,
    shelf: &crate::shelf_state::ShelfState,
    mediator_configured: bool,
) {
    for op in journal.list().into_iter().filter(|op| op.state == OperationState::InProgress) {
        match op.kind {
            OperationKind::Heal => {
                let _ = journal
                    .finish(
                        op.id,
                        OperationState::Failed,
                        vec!["interrupted: the node restarted; re-run it".into()],
                    )
                    .await;
            }
            OperationKind::Switchback => {
                let raised = Plan::decode(&op.payload)
                    .is_ok_and(|plan| plan.aggregates.iter().any(|a| shelf.marks(a.uuid).epoch >= a.new));
                let asked = op.step != SWITCHBACK_PLANNED;
                if rolled_back_at_start(raised, mediator_configured, asked) {
                    tracing::warn!(
                        operation = op.id,
                        "a switchback interrupted before it raised an epoch: rolled back"
                    );
                    let _ = journal
                        .finish(
                            op.id,
                            OperationState::Failed,
                            vec!["rolled back: the node restarted before any epoch was raised".into()],
                        )
                        .await;
                } else if !raised {
                    tracing::warn!(
                        operation = op.id,
                        "a switchback interrupted after it may have asked the mediator for the epochs: kept \
                         in progress; re-run it"
                    );
                }
            }
            _ => {}
        }
    }
}

/// Why the aggregates of a switchback kept in progress are not served (`held_by_switchback`).
pub const HELD_BY_SWITCHBACK: &str = "a switchback is in progress and may have had the mediator raise the epochs: \
                                      not served here at the old ones; re-run `mcctl switchback`";

/// The aggregates of a switchback in progress past its first step: the mediator may hold their
/// new epochs, so they are never served here again at the old ones (finding 10): they stay
/// quiesced until a re-run hands them over, whatever happens to the run.
pub fn held_by_switchback(records: &[OperationRecord]) -> Vec<Uuid> {
    last_switchback(records)
        .filter(|(op, _)| op.state == OperationState::InProgress && op.step != SWITCHBACK_PLANNED)
        .map(|(_, plan)| plan.aggregates.iter().map(|a| a.uuid).collect())
        .unwrap_or_default()
}

/// Whether a switchback found in progress at start is rolled back (`settle_at_start`): only if
/// this node did not raise the epochs (`raised_here`) and no mediator can hold them: none is
/// configured, or the switchback never got to ask (`asked`: past its first journal step).
pub fn rolled_back_at_start(raised_here: bool, mediator_configured: bool, asked: bool) -> bool {
    use crate::model_breaks::{Break, active};
    !raised_here && (!mediator_configured || !asked || active(Break::SwitchbackRollsBackAfterAsking))
}

fn veto(kind: &str, code: &str, aggregate: Option<Uuid>, reason: impl Into<String>) -> Veto {
    Veto {
        kind: kind.into(),
        code: code.into(),
        aggregate: aggregate.map(|u| hex(&u.0)).unwrap_or_default(),
        reason: reason.into(),
    }
}

/// An Admin client of the DR partner.
async fn partner_client(node: &Node) -> Result<mc_proto::v1::admin_client::AdminClient<Channel>, String> {
    let config = node.config();
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", config.dr_partner.address))
        .map_err(|e| format!("partner address: {e}"))?
        .connect_timeout(config.timers.keepalive_timeout);
    let channel = tokio::time::timeout(config.timers.keepalive_timeout, endpoint.connect())
        .await
        .map_err(|_| format!("node {} did not answer in time", config.dr_partner.node_id))?
        .map_err(|e| format!("connect to node {}: {e}", config.dr_partner.node_id))?;
    Ok(mc_proto::v1::admin_client::AdminClient::new(channel))
}

fn identity(node: &Node) -> mc_proto::v1::Identity {
    let config = node.config();
    mc_proto::v1::Identity {
        cluster_id: config.cluster_id.to_vec(),
        sender_node: config.node_id,
        receiver_node: config.dr_partner.node_id,
    }
}

/// The partner's mode and state, if it answers.
async fn partner_mode(node: &Node) -> Result<(String, String, String), String> {
    let mut client = partner_client(node).await?;
    let request = mc_proto::v1::StatusRequest { cluster_id: node.config().cluster_id.to_vec() };
    let bound = node.config().timers.keepalive_timeout;
    let reply = tokio::time::timeout(bound, client.status(request))
        .await
        .map_err(|_| "the partner's status did not come in time".to_string())?
        .map_err(|s| s.message().to_string())?
        .into_inner();
    Ok((reply.mode, reply.node_state, reply.state_reason))
}

/// Checks that a call comes from the DR partner, for this node.
fn check_partner_call(node: &Node, identity: Option<&mc_proto::v1::Identity>) -> Result<(), Status> {
    let config = node.config();
    let identity = identity.ok_or_else(|| Status::invalid_argument("no identity"))?;
    crate::admin::check_cluster(&config.cluster_id, &identity.cluster_id)?;
    if identity.sender_node != config.dr_partner.node_id || identity.receiver_node != config.node_id {
        return Err(Status::failed_precondition(format!(
            "a call from node {} for node {}: only the DR partner (node {}) may make it",
            identity.sender_node, identity.receiver_node, config.dr_partner.node_id
        )));
    }
    Ok(())
}

fn epochs_of(list: &[mc_proto::v1::AggregateEpoch], owner: u32) -> Result<Vec<(Uuid, Epoch)>, Status> {
    let mut out = Vec::with_capacity(list.len());
    for wire in list {
        let (uuid, epoch) = crate::wire::from_aggregate_epoch(wire)
            .ok_or_else(|| Status::invalid_argument("a malformed aggregate epoch"))?;
        if epoch.owner.0 != owner {
            return Err(Status::invalid_argument(format!(
                "epoch {}@node{} is not held by node {owner}",
                epoch.number, epoch.owner.0
            )));
        }
        out.push((uuid, epoch));
    }
    if out.len() > 256 {
        return Err(Status::invalid_argument("more than 256 aggregates"));
    }
    Ok(out)
}

impl Node {
    /// The extents this node's unreleased records of switched-away aggregates touch (S8), per
    /// aggregate: `None` when they cannot be read (every region must be copied).
    async fn unreleased_extents(&self, wanted: &[Uuid]) -> HashMap<Uuid, Extents> {
        let away = self.switched_away();
        let mut out: HashMap<Uuid, Extents> = HashMap::new();
        let pending: Vec<(Uuid, Lsn)> = wanted
            .iter()
            .filter_map(|uuid| away.get(uuid).filter(|a| !a.discarded).map(|a| (*uuid, a.floor)))
            .collect();
        for uuid in wanted {
            out.insert(*uuid, Some(Vec::new()));
        }
        if pending.is_empty() {
            return out;
        }
        let all = |out: &mut HashMap<Uuid, Extents>| {
            for (uuid, _) in &pending {
                out.insert(*uuid, None);
            }
        };
        if self.local_partition_lost() {
            all(&mut out);
            return out;
        }
        let start = pending.iter().map(|(_, floor)| *floor).min().unwrap_or(Lsn::ZERO);
        let nvlog = self.nvlog().clone();
        let replay = tokio::task::spawn_blocking(move || {
            nvlog.replay(PartitionKind::Local, &nvlog::ReplayFilter { after_lsn: start, frozen_epochs: None })
        })
        .await;
        let replay = match replay {
            Ok(Ok(replay)) if replay.gaps.is_empty() => replay,
            Ok(Ok(_)) | Ok(Err(_)) | Err(_) => {
                all(&mut out);
                return out;
            }
        };
        let mut per: BTreeMap<Uuid, Vec<(u32, u64, u64)>> = BTreeMap::new();
        for record in &replay.records {
            let header = &record.header;
            let uuid = Uuid(header.aggregate.0);
            let Some((_, floor)) = pending.iter().find(|(u, _)| *u == uuid) else { continue };
            if header.lsn <= *floor || header.range_len == 0 {
                continue;
            }
            per.entry(uuid).or_default().push((header.volume.0, header.offset, header.range_len));
        }
        for (uuid, mut extents) in per {
            extents.sort_unstable();
            let mut merged: Vec<(u32, u64, u64)> = Vec::new();
            for (volume, offset, len) in extents {
                match merged.last_mut() {
                    Some((v, o, l)) if *v == volume && offset <= *o + *l => {
                        *l = (*l).max(offset + len - *o);
                    }
                    _ => merged.push((volume, offset, len)),
                }
            }
            out.insert(uuid, (merged.len() <= MAX_HEAL_EXTENTS).then_some(merged));
        }
        out
    }
}

/// `Admin.HealPartner`: the returning node's side of a heal.
pub async fn admin_heal_partner(
    node: &Arc<Node>,
    request: &HealPartnerRequest,
) -> Result<HealPartnerReply, Status> {
    check_partner_call(node, request.identity.as_ref())?;
    let partner = node.config().dr_partner.node_id;
    let asked = epochs_of(&request.epochs, partner)?;
    let _admin = node.admin.lock().await;
    for (uuid, epoch) in &asked {
        // S2: only the holder of the current epoch asks; a stale caller is refused.
        let mark = node.shelf_state.marks(*uuid).epoch;
        if *epoch < mark {
            return Err(Status::failed_precondition(format!(
                "epoch {}@node{} of aggregate {} is below {}@node{} seen here (S2)",
                epoch.number,
                epoch.owner.0,
                hex(&uuid.0),
                mark.number,
                mark.owner.0
            )));
        }
        if node.aggregates().iter().any(|a| a.uuid == *uuid && !a.is_deposed()) {
            return Err(Status::failed_precondition(format!(
                "aggregate {} is served here: it was not switched over",
                hex(&uuid.0)
            )));
        }
    }
    let uuids: Vec<Uuid> = asked.iter().map(|(u, _)| *u).collect();
    let extents = node.unreleased_extents(&uuids).await;
    let aggregates = uuids
        .iter()
        .map(|uuid| {
            let found = extents.get(uuid).cloned().unwrap_or(None);
            HealExtents {
                aggregate_uuid: uuid.0.to_vec(),
                all: found.is_none(),
                extents: found
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(volume_id, offset, length)| HealExtent { volume_id, offset, length })
                    .collect(),
            }
        })
        .collect();
    if request.discard {
        let remaining = {
            let mut away = node.switched_away.lock().expect("switched-away lock");
            for uuid in &uuids {
                if let Some(entry) = away.get_mut(uuid) {
                    entry.discarded = true;
                }
            }
            away.values().filter(|a| !a.discarded).count()
        };
        if remaining == 0 {
            node.heal_cap.store(u64::MAX, Ordering::Release);
            node.cp("heal: the switched-over aggregates' records discarded")
                .await
                .map_err(|e| Status::unavailable(format!("the CP that discards the records failed: {e}")))?;
        }
        tracing::warn!(
            node = node.node_id(),
            aggregates = uuids.len(),
            "heal: this node's records of its switched-over aggregates discarded (S8)"
        );
    }
    Ok(HealPartnerReply { aggregates })
}

/// `Admin.Heal`, at the node serving its partner's aggregates.
pub async fn admin_heal(node: &Arc<Node>, _request: &HealRequest) -> Result<HealReply, Status> {
    let started = Instant::now();
    let _admin = node.admin.lock().await;
    node.check_serving().map_err(|e| crate::data::status(&e))?;
    if let Some(op) = node.operations().in_progress().first() {
        return Err(Status::failed_precondition(format!(
            "operation {} ({}) is in progress on node {}: finish it first",
            op.id,
            op.kind.name(),
            node.node_id()
        )));
    }
    let slots: Vec<Arc<AggrSlot>> =
        node.aggregates().into_iter().filter(|a| a.switched_over && a.deposed().is_none()).collect();
    if slots.is_empty() {
        return Err(Status::failed_precondition(format!(
            "nothing to heal: node {} serves none of its partner's aggregates (no switchover)",
            node.node_id()
        )));
    }
    let partner = node.config().dr_partner.node_id;
    let (mode, state, reason) = partner_mode(node).await.map_err(|e| {
        Status::failed_precondition(format!(
            "node {partner} does not answer ({e}): heal needs it up (its controller started, waiting for \
             switchback)"
        ))
    })?;
    if mode != "waiting-for-switchback" {
        return Err(Status::failed_precondition(format!(
            "node {partner} is {state} in mode {mode} ({reason}): heal needs it waiting for switchback"
        )));
    }
    let op = node
        .operations()
        .begin(OperationKind::Heal, "collecting the partner's unreleased records", encode_healed(&[]))
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let result = heal(node, op.id, &slots).await;
    let (aggregates, errors) = match result {
        Ok(rows) => {
            let errors: Vec<String> =
                rows.iter().filter(|r| !r.reattached).map(|r| format!("{}: {}", r.name, r.result)).collect();
            (rows, errors)
        }
        Err(e) => (Vec::new(), vec![e]),
    };
    let reattached = aggregates.iter().filter(|r| r.reattached).count();
    let state = match (reattached, errors.is_empty()) {
        (_, true) => OperationState::Successful,
        (0, false) => OperationState::Failed,
        _ => OperationState::PartiallySuccessful,
    };
    node.operations()
        .finish(op.id, state, errors.clone())
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    tracing::warn!(node = node.node_id(), operation = op.id, ?state, took = ?started.elapsed(), "heal ended");
    let record = node.operations().get(op.id);
    if state == OperationState::Failed {
        return Err(Status::internal(format!(
            "the heal failed (operation {}): {}",
            op.id,
            errors.join("; ")
        )));
    }
    Ok(HealReply { operation: record.as_ref().map(crate::operations::to_wire), aggregates })
}

async fn heal(node: &Arc<Node>, id: u64, slots: &[Arc<AggrSlot>]) -> Result<Vec<HealedAggregate>, String> {
    let epochs: Vec<_> = slots.iter().map(|s| crate::wire::aggregate_epoch(s.uuid, s.plex_epoch())).collect();
    let mut client = partner_client(node).await?;
    let bound = node.config().timers.mirror_timeout * 2;
    let ask = |discard: bool| HealPartnerRequest {
        identity: Some(identity(node)),
        epochs: epochs.clone(),
        discard,
    };
    // 1. What the partner's unreleased records touch.
    let reply = tokio::time::timeout(bound, client.heal_partner(ask(false)))
        .await
        .map_err(|_| "the partner did not list its records in time".to_string())?
        .map_err(|s| format!("the partner did not list its records: {}", s.message()))?
        .into_inner();
    // 2. Into the resync set, durably, before the partner discards them (S8).
    let mut marked: HashMap<Uuid, u64> = HashMap::new();
    for slot in slots {
        let listed = reply.aggregates.iter().find(|a| a.aggregate_uuid == slot.uuid.0);
        let (all, ranges) = match listed {
            None => (true, Vec::new()),
            Some(listed) if listed.all => (true, Vec::new()),
            Some(listed) => {
                let table = slot.table().clone();
                let mut all = false;
                let mut ranges = Vec::new();
                for extent in &listed.extents {
                    match table.volumes.iter().find(|v| v.id == extent.volume_id) {
                        Some(volume) => {
                            let end = extent.offset.checked_add(extent.length);
                            if end.is_none_or(|end| end > volume.size) {
                                all = true;
                                break;
                            }
                            let start = volume.base + extent.offset;
                            let aligned = start / plex::BLOCK_BYTES * plex::BLOCK_BYTES;
                            let len = (start + extent.length).div_ceil(plex::BLOCK_BYTES) * plex::BLOCK_BYTES
                                - aligned;
                            ranges.push((aligned, len));
                        }
                        // A volume deleted here since: nothing of it is read any more.
                        None if table.was_removed(extent.volume_id) => {}
                        None => {
                            all = true;
                            break;
                        }
                    }
                }
                (all, ranges)
            }
        };
        let newly = slot
            .aggregate
            .mark_dirty(&ranges, all)
            .await
            .map_err(|e| format!("aggregate {}: mark the partner's regions: {e}", slot.table().name))?;
        marked.insert(slot.uuid, newly);
    }
    node.operations()
        .update(id, "the partner's regions marked; it discards its records", encode_healed(&[]))
        .await
        .map_err(|e| e.to_string())?;
    // 3. The partner discards them.
    tokio::time::timeout(bound, client.heal_partner(ask(true)))
        .await
        .map_err(|_| "the partner did not discard its records in time".to_string())?
        .map_err(|s| format!("the partner did not discard its records: {}", s.message()))?;
    crate::faults::crash_at("heal-discarded");
    // 4. Plex 0, at the partner's site, reattached: the generation rules decide (S5).
    let mut rows = Vec::new();
    let mut healed = healed_aggregates(&node.operations().list());
    for slot in slots {
        let name = slot.table().name.clone();
        let mut row = HealedAggregate {
            name: name.clone(),
            uuid: slot.uuid.0.to_vec(),
            reattached: false,
            result: String::new(),
            regions_marked: marked.get(&slot.uuid).copied().unwrap_or(0),
        };
        if slot.healed.load(Ordering::Acquire) {
            row.reattached = true;
            row.result = "healed already".into();
            rows.push(row);
            continue;
        }
        match reattach_home(node, slot).await {
            Ok(rule) => {
                slot.healed.store(true, Ordering::Release);
                healed.push(slot.uuid);
                row.reattached = true;
                row.result =
                    format!("plex 0 reattached ({rule}); its resync from plex 1 runs in the background");
                tracing::warn!(node = node.node_id(), aggregate = %name, rule, "heal: home plex reattached");
            }
            Err(e) => {
                row.result = e;
                tracing::error!(node = node.node_id(), aggregate = %name, "heal: {}", row.result);
            }
        }
        rows.push(row);
    }
    node.operations()
        .update(id, "home plexes reattached; resync in the background", encode_healed(&healed))
        .await
        .map_err(|e| e.to_string())?;
    Ok(rows)
}

/// Reattaches plex 0 of a switched-over aggregate through the partner's DiskService.
async fn reattach_home(node: &Node, slot: &AggrSlot) -> Result<&'static str, String> {
    let epoch = slot.plex_epoch();
    let (devices, names) = node.remote_plex_devices(slot.uuid, epoch, 0, None, 0).await?;
    match slot.aggregate.reattach_with(0, devices).await {
        Ok(decision) => {
            slot.disks.lock().expect("disk list lock")[0] = names;
            Ok(decision.rule.name())
        }
        Err(plex::AggregateError::SplitBrain { g0, s0, g1, s1 }) => Err(format!(
            "refused: split brain (S5): plex 0 at generation {g0} (peer-sync {s0}) and plex 1 at {g1} (peer-sync \
             {s1}) were both written since they were last in sync; nothing is merged"
        )),
        Err(e) => Err(format!("plex 0 not reattached: {e}")),
    }
}

/// The vetoes and plan of a switchback now.
async fn evaluate_switchback(node: &Node, resume: Option<&Plan>) -> (Vec<Veto>, Plan) {
    let me = node.node_id();
    let partner = node.config().dr_partner.node_id;
    let mut vetoes = Vec::new();
    if let Some(plan) = resume {
        return (vetoes, plan.clone());
    }
    if let Some(op) = node.operations().in_progress().first() {
        vetoes.push(veto(
            "hard",
            "operation_in_progress",
            None,
            format!("operation {} ({}) is in progress on node {me}", op.id, op.kind.name()),
        ));
    }
    let state = node.state();
    if state.phase != Phase::Serving {
        vetoes.push(veto(
            "hard",
            "node_fenced",
            None,
            format!("node {me} is {} ({})", state.phase.name(), state.reason),
        ));
    }
    match partner_mode(node).await {
        Ok((mode, _, _)) if mode == "waiting-for-switchback" => {}
        Ok((mode, state, reason)) => vetoes.push(veto(
            "hard",
            "partner_not_waiting",
            None,
            format!("node {partner} is {state} in mode {mode} ({reason}): it must wait for switchback"),
        )),
        Err(e) => vetoes.push(veto(
            "hard",
            "partner_unreachable",
            None,
            format!("node {partner} does not answer ({e}): a switchback hands the aggregates to it"),
        )),
    }
    let slots: Vec<Arc<AggrSlot>> =
        node.aggregates().into_iter().filter(|a| a.switched_over && a.deposed().is_none()).collect();
    if slots.is_empty() {
        vetoes.push(veto(
            "hard",
            "nothing_to_switch_back",
            None,
            format!("node {me} serves none of node {partner}'s aggregates"),
        ));
    }
    let mut plan = Plan { force_nvfail_all: false, negotiated: true, aggregates: Vec::new() };
    for slot in &slots {
        let name = slot.table().name.clone();
        if !slot.healed.load(Ordering::Acquire) {
            vetoes.push(veto(
                "hard",
                "not_healed",
                Some(slot.uuid),
                format!("aggregate {name}: its home plex is not reattached; run `mcctl heal` first"),
            ));
        }
        let states = slot.aggregate.plex_states();
        if states != [PlexState::Normal; 2] {
            let percent = slot.aggregate.resync_progress().map(|p| p.percent());
            vetoes.push(veto(
                "hard",
                "not_in_sync",
                Some(slot.uuid),
                match percent {
                    Some(p) if matches!(states[0], PlexState::Resyncing { .. }) => {
                        format!("aggregate {name}: plex 0 is resyncing ({p}%); wait until it is normal")
                    }
                    _ => format!("aggregate {name}: plexes {states:?}; both must be normal"),
                },
            ));
        }
        let current = slot.plex_epoch();
        let Some(number) = current.number.checked_add(1) else {
            vetoes.push(veto(
                "hard",
                "epoch_exhausted",
                Some(slot.uuid),
                "the epoch number cannot be raised",
            ));
            continue;
        };
        plan.aggregates.push(Planned {
            uuid: slot.uuid,
            frozen: current,
            new: Epoch { number, owner: NodeId(partner) },
            floor: 0,
            not_in_sync: None,
            done: false,
        });
    }
    (vetoes, plan)
}

fn switchback_vetoed(reply: &SwitchbackReply) -> Status {
    let list: Vec<String> =
        reply.vetoes.iter().map(|v| format!("{} veto {}: {}", v.kind, v.code, v.reason)).collect();
    Status::with_details(
        tonic::Code::FailedPrecondition,
        format!("vetoed: {}", list.join("; ")),
        reply.encode_to_vec().into(),
    )
}

/// `Admin.Switchback`.
pub async fn admin_switchback(
    node: &Arc<Node>,
    request: &SwitchbackRequest,
) -> Result<SwitchbackReply, Status> {
    let started = Instant::now();
    let _admin = node.admin.lock().await;
    let resume =
        last_switchback(&node.operations().list()).filter(|(op, _)| op.state == OperationState::InProgress);
    let (vetoes, plan) = evaluate_switchback(node, resume.as_ref().map(|(_, plan)| plan)).await;
    let mut reply = SwitchbackReply { vetoes, ..Default::default() };
    if request.simulate {
        return Ok(reply);
    }
    if !reply.vetoes.is_empty() {
        return Err(switchback_vetoed(&reply));
    }
    let op = match &resume {
        Some((op, _)) => op.clone(),
        None => node
            .operations()
            .begin(OperationKind::Switchback, SWITCHBACK_PLANNED, plan.encode())
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?,
    };
    tracing::warn!(
        node = node.node_id(),
        operation = op.id,
        aggregates = plan.aggregates.len(),
        "switchback starts"
    );
    crate::faults::crash_at("switchback-planned");
    let volumes: Vec<String> = node
        .aggregates()
        .iter()
        .filter(|a| plan.aggregates.iter().any(|p| p.uuid == a.uuid))
        .flat_map(|a| a.table().volumes.iter().map(|v| v.name.clone()).collect::<Vec<_>>())
        .collect();
    // A resumed run past its first step may have had the mediator raise the epochs (finding 10).
    let held = resume.is_some() && !held_by_switchback(&node.operations().list()).is_empty();
    match run_switchback(node, op.id, plan, held).await {
        Ok(()) => {
            node.operations()
                .finish(op.id, OperationState::Successful, Vec::new())
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            tracing::warn!(node = node.node_id(), operation = op.id, took = ?started.elapsed(), "switchback done");
            reply.operation = node.operations().get(op.id).as_ref().map(crate::operations::to_wire);
            reply.volumes = volumes;
            Ok(reply)
        }
        Err(Stop::RolledBack(e)) => {
            let _ = node
                .operations()
                .finish(op.id, OperationState::Failed, vec![format!("rolled back: {e}")])
                .await;
            Err(Status::unavailable(format!(
                "the switchback was rolled back (operation {}): {e}; this node still serves the aggregates",
                op.id
            )))
        }
        Err(Stop::Resumable(e)) => {
            let _ = node
                .operations()
                .update(
                    op.id,
                    &truncate(&format!("stopped, re-run to resume: {e}"), 200),
                    node.operations().get(op.id).map(|r| r.payload).unwrap_or_default(),
                )
                .await;
            Err(Status::internal(format!(
                "the switchback stopped after the epochs were raised (operation {}; re-run it to resume): {e}",
                op.id
            )))
        }
    }
}

fn truncate(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// How a switchback stopped.
enum Stop {
    /// Before any epoch was raised: this node serves the aggregates again.
    RolledBack(String),
    /// After: a re-run resumes at the hand over.
    Resumable(String),
}

async fn run_switchback(node: &Arc<Node>, id: u64, mut plan: Plan, held: bool) -> Result<(), Stop> {
    let raised = plan.aggregates.iter().all(|a| node.shelf_state.marks(a.uuid).epoch >= a.new);
    let slots: Vec<Arc<AggrSlot>> = node
        .aggregates()
        .into_iter()
        .filter(|a| a.switched_over && plan.aggregates.iter().any(|p| p.uuid == a.uuid))
        .collect();
    if raised {
        // Resumed once this node holds the new epochs (persisted by the hand over, or by a
        // mediator reply that deposed it): the home node takes the aggregates back at them.
        for planned in &mut plan.aggregates {
            let mark = node.shelf_state.marks(planned.uuid).epoch;
            if mark.owner == planned.new.owner {
                planned.new = planned.new.max(mark);
            }
        }
    } else {
        // A re-run of a switchback that may have asked the mediator already (`held`): its
        // aggregates stay quiesced whatever happens, and it stays resumable (finding 10).
        // (A slot deposed meanwhile stays deposed.)
        let hold = |e: String| {
            for slot in &slots {
                slot.serving.send_if_modified(|state| match state {
                    SlotState::Serving => {
                        *state = SlotState::Adopting(HELD_BY_SWITCHBACK.to_string());
                        true
                    }
                    _ => false,
                });
            }
            Stop::Resumable(e)
        };
        // 1. No new I/O to them; drain; a CP that covers every acknowledged write, on both plexes.
        if let Err(e) = crate::switchover::quiesce(
            node,
            &slots,
            "switching back to the home node: I/O paused",
            "switchback",
        )
        .await
        {
            return Err(if held { hold(e) } else { Stop::RolledBack(e) });
        }
        // Never called when `held`: the mediator's refusal is handled above for it, and the
        // paths without a mediator cannot be `held` (without one, a switchback in progress past
        // its first step has raised the epochs here and takes the branch above).
        let resume_serving = || {
            for slot in &slots {
                slot.serving.send_if_modified(|state| match state {
                    SlotState::Adopting(_) => {
                        *state = SlotState::Serving;
                        true
                    }
                    _ => false,
                });
            }
        };
        let lsn = node.cp_stats().last_lsn.0;
        for planned in &mut plan.aggregates {
            planned.floor = lsn;
        }
        if let Err(e) = node.operations().update(id, "drained, CP done", plan.encode()).await {
            return Err(if held { hold(e.to_string()) } else { Stop::RolledBack(e.to_string()) });
        }
        crate::faults::crash_at("switchback-cp");
        // 2. The new epochs (the mediator's, when it answers: only now, once this node's cache
        // of them is destaged, since its next heartbeat reply deposes this node of them),
        // durably: from now on this node writes none of it (S2).
        let partner = node.config().dr_partner.node_id;
        match crate::switchover::mediator_epochs(node, &mut plan, partner, "switchback").await {
            Ok(()) => {}
            // The epochs may be the home node's already: never served here again at the old
            // ones; a re-run resumes.
            Err(e @ crate::mediator_link::RaiseError::Unknown(_)) => {
                return Err(Stop::Resumable(format!("switchback: {e}")));
            }
            Err(e) if held => return Err(hold(format!("switchback: {e}"))),
            Err(e) => {
                resume_serving();
                return Err(Stop::RolledBack(format!("switchback: {e}")));
            }
        }
        crate::faults::crash_at("switchback-asked");
        // With a mediator the epochs have moved from here on: a failure leaves the aggregates
        // quiesced and the operation resumable, never served again at the old epochs.
        let raised_elsewhere = node.mediator.get().is_some();
        let stop = |e: String| if raised_elsewhere { Stop::Resumable(e) } else { Stop::RolledBack(e) };
        if let Err(e) = node.operations().update(id, "drained, CP done, epochs issued", plan.encode()).await {
            if !raised_elsewhere {
                resume_serving();
            }
            return Err(stop(e.to_string()));
        }
        for planned in &plan.aggregates {
            if let Err(e) = node.shelf_state.admit_exclusive(planned.uuid, planned.new).await {
                if !raised_elsewhere {
                    resume_serving();
                }
                return Err(stop(format!("persist the new epoch: {e}")));
            }
        }
        crate::faults::crash_at("switchback-raised");
    }
    for slot in &slots {
        let planned = plan.aggregates.iter().find(|p| p.uuid == slot.uuid);
        let why = format!(
            "switched back: node {} holds epoch {} (S2)",
            node.config().dr_partner.node_id,
            planned.map_or(0, |p| p.new.number)
        );
        slot.set_deposed(node.node_id(), why);
        node.lock_cache().active.retain(|(index, _), _| *index != slot.index);
    }
    node.operations()
        .update(id, "epochs raised; handing the aggregates back", plan.encode())
        .await
        .map_err(|e| Stop::Resumable(e.to_string()))?;
    // The partner's records carry the new epochs from now on: take them again, once those held
    // from before the switchover are gone (`drop_held_records`). Once per switchback: the plan's
    // `done` marks are journalled before the hand-over, after which the partition fills with the
    // partner's new records (a re-run must not drop those).
    if let Some(receiver) = node.receiver.get() {
        if drops_held_records() && !plan.aggregates.iter().any(|a| a.done) {
            receiver
                .drop_held_records()
                .await
                .map_err(|e| Stop::Resumable(format!("drop the partner's records held here: {e}")))?;
            for planned in &mut plan.aggregates {
                planned.done = true;
            }
            node.operations()
                .update(id, "the partner's held records dropped; handing the aggregates back", plan.encode())
                .await
                .map_err(|e| Stop::Resumable(e.to_string()))?;
        }
        receiver.thaw().await;
    }
    node.partner_down_confirmed.store(false, Ordering::Release);
    // 3. The home node takes them back.
    let request = TakeBackRequest {
        identity: Some(identity(node)),
        epochs: plan.aggregates.iter().map(|a| crate::wire::aggregate_epoch(a.uuid, a.new)).collect(),
        last_cp_lsn: plan.aggregates.first().map_or(0, |a| a.floor),
    };
    let bound = node.config().timers.mirror_timeout * 4;
    let call = async {
        let mut client = partner_client(node).await?;
        client.take_back(request).await.map_err(|s| s.message().to_string())
    };
    tokio::time::timeout(bound, call)
        .await
        .map_err(|_| Stop::Resumable("the home node did not take the aggregates back in time".into()))?
        .map_err(|e| Stop::Resumable(format!("the home node did not take the aggregates back: {e}")))?;
    crate::faults::crash_at("switchback-handed");
    // 4. Gone from here.
    {
        let mut list = node.aggregates.write().expect("the aggregate list lock holder panicked");
        list.retain(|a| !plan.aggregates.iter().any(|p| p.uuid == a.uuid));
    }
    node.unavailable
        .lock()
        .expect("unavailable lock")
        .retain(|(uuid, _)| !plan.aggregates.iter().any(|p| p.uuid == *uuid));
    node.publish_epochs();
    Ok(())
}

/// `Admin.TakeBack`: the home node's side of a switchback.
pub async fn admin_take_back(node: &Arc<Node>, request: &TakeBackRequest) -> Result<TakeBackReply, Status> {
    check_partner_call(node, request.identity.as_ref())?;
    let me = node.node_id();
    let wanted = epochs_of(&request.epochs, me)?;
    let _admin = node.admin.lock().await;
    let mut volumes = Vec::new();
    let mut opened = Vec::new();
    // Sessions with the partner fail while it holds our aggregates (deposed): the handshake to
    // wait for is the next one from here.
    let handshakes = node.mirror().status().handshakes;
    let connected = node.mirror().status().connected;
    for (uuid, epoch) in &wanted {
        if let Some(slot) = node.aggregates().into_iter().find(|a| a.uuid == *uuid && !a.switched_over)
            && slot.plex_epoch() >= *epoch
            && !slot.is_deposed()
        {
            // Taken back already (idempotent).
            volumes.extend(slot.table().volumes.iter().map(|v| v.name.clone()));
            continue;
        }
        let away = node.switched_away().get(uuid).copied();
        match away {
            Some(away) if away.discarded => {
                if *epoch <= away.holder {
                    return Err(Status::failed_precondition(format!(
                        "epoch {}@node{} is not above the holder's {}@node{} (S2)",
                        epoch.number, epoch.owner.0, away.holder.number, away.holder.owner.0
                    )));
                }
            }
            Some(_) => {
                return Err(Status::failed_precondition(format!(
                    "aggregate {} is not healed here (its records were not discarded): run `mcctl heal` first",
                    hex(&uuid.0)
                )));
            }
            None => {
                return Err(Status::failed_precondition(format!(
                    "aggregate {} is not waiting for switchback here",
                    hex(&uuid.0)
                )));
            }
        }
        // S2: persisted before anything is written at it.
        node.shelf_state
            .admit(*uuid, *epoch)
            .await
            .map_err(|e| Status::unavailable(format!("persist epoch {}@node{}: {e}", epoch.number, me)))?;
        node.mirror().forget_deposed(*uuid, *epoch);
        let slot = open_home(node, *uuid, *epoch)
            .await
            .map_err(|e| Status::unavailable(format!("aggregate {}: {e}", hex(&uuid.0))))?;
        volumes.extend(slot.table().volumes.iter().map(|v| v.name.clone()));
        opened.push(slot);
    }
    if !opened.is_empty() {
        // A CP at the new epoch: the labels name this node the last writer, above every record
        // of it the heal discarded (S8).
        node.cp("switchback")
            .await
            .map_err(|e| Status::unavailable(format!("the switchback CP failed: {e}")))?;
        // The partner holds our records again before a write is acknowledged (S1): wait for a
        // handshake (bounded; without one, writes wait for it like after any restart).
        let next = if connected { handshakes } else { handshakes + 1 };
        let _ =
            tokio::time::timeout(node.config().timers.mirror_timeout, node.mirror().wait_handshakes(next))
                .await;
        for slot in &opened {
            slot.serving.send_replace(SlotState::Serving);
            node.switched_away.lock().expect("switched-away lock").remove(&slot.uuid);
            node.unavailable.lock().expect("unavailable lock").retain(|(uuid, _)| *uuid != slot.uuid);
            tracing::warn!(node = me, aggregate = %slot.table().name, epoch = slot.epoch.number, "switchback: serving again");
        }
        if node.switched_away().is_empty() && node.state().phase == Phase::Fenced {
            node.set_state(Phase::Serving, "serving");
        }
    }
    Ok(TakeBackReply { volumes })
}

/// Opens one of this node's aggregates again at `epoch` (switchback), not yet served.
async fn open_home(node: &Arc<Node>, uuid: Uuid, epoch: Epoch) -> Result<Arc<AggrSlot>, String> {
    let disks =
        crate::shelf::scan(&node.config().shelf_dir).await.map_err(|e| format!("scan the shelf: {e}"))?;
    let found = crate::shelf::aggregates(&disks, Uuid(node.config().cluster_id))
        .into_iter()
        .find(|f| f.uuid == uuid)
        .ok_or("no disk of it on this shelf")?;
    let paths: Vec<std::path::PathBuf> = found.plexes[0].iter().map(|d| d.path.clone()).collect();
    if paths.is_empty() {
        return Err("no disk of plex 0 on this shelf".into());
    }
    let local = node.local_devices(&paths, uuid, epoch)?;
    let (remote, remote_names) = node.remote_devices(uuid, epoch, None, 0).await?;
    let aggregate = Aggregate::open([local, remote], node.aggregate_options(), node.drop_hook(epoch))
        .await
        .map_err(|e| format!("open: {e}"))?;
    aggregate
        .record_owner(NodeId(node.node_id()), epoch)
        .await
        .map_err(|e| format!("record this node as the owner: {e}"))?;
    let table = Node::read_table(&aggregate).await?;
    let index = node.aggregates().iter().map(|a| a.index + 1).max().unwrap_or(0);
    let slot = Arc::new(AggrSlot {
        acks: crate::node::AckStamps::default(),
        index,
        uuid,
        aggregate: Arc::new(aggregate),
        epoch: nvlog::Epoch { number: epoch.number, owner: nvlog::NodeId(epoch.owner.0) },
        table: std::sync::Mutex::new(table),
        disks: std::sync::Mutex::new([
            found.plexes[0].iter().map(|d| d.name.clone()).collect(),
            remote_names,
        ]),
        last_cp: std::sync::Mutex::new(found.last_cp()),
        switched_over: false,
        healed: std::sync::atomic::AtomicBool::new(false),
        serving: tokio::sync::watch::Sender::new(SlotState::Adopting("switchback in progress".into())),
    });
    {
        let mut list = node.aggregates.write().expect("the aggregate list lock holder panicked");
        list.retain(|a| a.uuid != uuid);
        list.push(slot.clone());
    }
    node.publish_epochs();
    Ok(slot)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn healed_lists_round_trip_and_damage_is_an_error() {
        let uuids = vec![Uuid([1; 16]), Uuid([2; 16])];
        let bytes = encode_healed(&uuids);
        assert_eq!(decode_healed(&bytes).unwrap(), uuids);
        for len in 0..bytes.len() {
            assert!(decode_healed(&bytes[..len]).is_err(), "truncated at {len}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode_healed(&longer).is_err());
        assert_eq!(decode_healed(&encode_healed(&[])).unwrap(), Vec::<Uuid>::new());
    }

    /// Finding 10: only a switchback that cannot have had the mediator raise the epochs is
    /// rolled back at start, and a kept one holds its aggregates quiesced.
    #[test]
    fn a_switchback_that_may_have_asked_the_mediator_is_kept_and_holds_its_aggregates() {
        // (raised here, mediator configured, asked) -> rolled back
        assert!(rolled_back_at_start(false, false, true));
        assert!(rolled_back_at_start(false, true, false));
        assert!(!rolled_back_at_start(false, true, true));
        assert!(!rolled_back_at_start(true, false, false));
        assert!(!rolled_back_at_start(true, true, true));
        let plan = Plan {
            force_nvfail_all: false,
            negotiated: true,
            aggregates: vec![Planned {
                uuid: Uuid([7; 16]),
                frozen: Epoch { number: 2, owner: NodeId(2) },
                new: Epoch { number: 3, owner: NodeId(1) },
                floor: 0,
                not_in_sync: None,
                done: false,
            }],
        };
        let op = |state, step: &str| OperationRecord {
            id: 1,
            kind: OperationKind::Switchback,
            state,
            start_unix_ms: 1,
            end_unix_ms: 0,
            errors: Vec::new(),
            node: 2,
            step: step.into(),
            payload: plan.encode(),
        };
        assert_eq!(
            held_by_switchback(&[op(OperationState::InProgress, "drained, CP done")]),
            [Uuid([7; 16])]
        );
        assert!(held_by_switchback(&[op(OperationState::InProgress, SWITCHBACK_PLANNED)]).is_empty());
        assert!(held_by_switchback(&[op(OperationState::Failed, "drained, CP done")]).is_empty());
    }
}
