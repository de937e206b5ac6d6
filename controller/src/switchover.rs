//! Forced switchover, forced unfence and deposition (DESIGN §7, §9, §11; S2, S3, S8, S9, S13).
//!
//! A forced switchover runs on the survivor Y for its DR partner X, in the order of DESIGN §11:
//! 1. the vetoes are checked and the new epochs chosen: above every epoch this shelf saw for
//!    X's aggregates (its marks and the labels of the plexes here);
//! 2. the plan (the epoch X held, the new epoch and the NVFAIL decision of §9 (a), per
//!    aggregate) is journalled, then the new epochs are persisted in this shelf's marks (the
//!    NVLog receiver's and DiskService's high-water marks) and the receiver is frozen, so
//!    nothing more from X is stored, released or announced;
//! 3. each aggregate is opened from its plex here (plex 0, at X's site, stays out until heal)
//!    and the new owner and epoch are written in the labels;
//! 4. X's records are replayed from the `dr_partner` partition into the write cache (S8:
//!    above the label's CP, stamped with the frozen epoch, contiguous);
//! 5. NVFAIL (§9 rules (a) to (d));
//! 6. a CP puts it all on the plex here; the journal marks the aggregate done;
//! 7. the volumes are exported.
//!
//! Re-running after a crash resumes from the journal: an aggregate marked done is not
//! replayed again (its records are covered by our CP), the others are redone from step 3 with
//! the journalled epochs and decision; a crash before the plan was journalled loses the round
//! trip evidence, so the re-run NVFAILs (S9).
//!
//! Invariants:
//! - nothing of X is accepted here once step 2 is durable; X's records are applied only with
//!   the epoch X held at the freeze (S8), and never twice (the journal's `done`);
//! - a volume is exported only after its records are replayed, its NVFAIL decision applied and
//!   a CP made both durable;
//! - a node that sees a higher epoch for one of its aggregates (the partner's hello or
//!   keepalives) persists it as its shelf's mark (so its own disk writes at the old epoch are
//!   refused, S2) and stops serving the aggregate at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mc_proto::v1::{SwitchoverReply, SwitchoverRequest, UnfenceReply, UnfenceRequest, Veto};
use nvlog::{Lsn, PartitionKind};
use plex::{Aggregate, Epoch, NodeId, PlexState, Uuid};
use prost::Message;
use tonic::Status;

use crate::model_breaks::{Break, active};
use crate::node::{AggrSlot, Node, Phase, SlotState, VolumeRef, hex};
use crate::nvfail::{NvfailCause, NvfailRule};
use crate::operations::{OperationKind, OperationRecord, OperationState};
use crate::shelf::FoundAggregate;

/// The journal's steps, in words.
const STEP_PLANNED: &str = "planned: epochs persisted, the partner's partition frozen";
const STEP_DONE: &str = "volumes exported";

/// What a forced switchover decided for one aggregate (journalled before anything changes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    /// The aggregate.
    pub uuid: Uuid,
    /// The epoch the partner held when its partition was frozen (S8 replays only those).
    pub frozen: Epoch,
    /// The epoch this node takes.
    pub new: Epoch,
    /// The lsn of the partner's last CP the plex here recorded (S8: its records at or below it
    /// are on the plex), 0 if that CP was not the partner's.
    pub floor: u64,
    /// Why the survivor cannot show the aggregate was in sync (§9 (a)), if it cannot.
    pub not_in_sync: Option<String>,
    /// Replayed, NVFAIL applied and covered by a CP.
    pub done: bool,
}

/// The durable plan of a forced switchover (the operation's payload).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// `--force-nvfail-all` (§9 (c)).
    pub force_nvfail_all: bool,
    /// A negotiated switchover: the partner released its aggregates after a final CP.
    pub negotiated: bool,
    /// The partner's aggregates.
    pub aggregates: Vec<Planned>,
}

const PLAN_MAGIC: &[u8; 4] = b"SWO2";
const MAX_REASON_BYTES: usize = 1024;
const MAX_PLANNED: usize = 256;

impl Plan {
    /// The payload bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(PLAN_MAGIC);
        out.push(u8::from(self.force_nvfail_all));
        out.push(u8::from(self.negotiated));
        let count = u16::try_from(self.aggregates.len().min(MAX_PLANNED)).unwrap_or(0);
        out.extend_from_slice(&count.to_le_bytes());
        for planned in self.aggregates.iter().take(MAX_PLANNED) {
            out.extend_from_slice(&planned.uuid.0);
            for epoch in [planned.frozen, planned.new] {
                out.extend_from_slice(&epoch.number.to_le_bytes());
                out.extend_from_slice(&epoch.owner.0.to_le_bytes());
            }
            out.extend_from_slice(&planned.floor.to_le_bytes());
            out.push(u8::from(planned.done));
            let reason = planned.not_in_sync.as_deref().map(|r| truncate(r, MAX_REASON_BYTES));
            out.push(u8::from(reason.is_some()));
            let reason = reason.unwrap_or_default();
            out.extend_from_slice(&u16::try_from(reason.len()).unwrap_or(0).to_le_bytes());
            out.extend_from_slice(reason.as_bytes());
        }
        out
    }

    /// Decodes a payload; any defect is an error, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<Plan, String> {
        let mut at = 0usize;
        let mut take = |n: usize| -> Result<&[u8], String> {
            let end = at.checked_add(n).filter(|end| *end <= bytes.len()).ok_or("the plan is truncated")?;
            let out = &bytes[at..end];
            at = end;
            Ok(out)
        };
        if take(4)? != PLAN_MAGIC {
            return Err("the plan has a bad magic".into());
        }
        let flag = |b: u8| match b {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(format!("a flag of the plan is {other}")),
        };
        let force_nvfail_all = flag(take(1)?[0])?;
        let negotiated = flag(take(1)?[0])?;
        let count = usize::from(u16::from_le_bytes([take(1)?[0], take(1)?[0]]));
        if count > MAX_PLANNED {
            return Err(format!("the plan lists {count} aggregates"));
        }
        let mut aggregates = Vec::with_capacity(count);
        for _ in 0..count {
            let mut uuid = [0u8; 16];
            uuid.copy_from_slice(take(16)?);
            let mut epochs = [Epoch::default(); 2];
            for epoch in &mut epochs {
                let mut number = [0u8; 8];
                number.copy_from_slice(take(8)?);
                let mut owner = [0u8; 4];
                owner.copy_from_slice(take(4)?);
                *epoch =
                    Epoch { number: u64::from_le_bytes(number), owner: NodeId(u32::from_le_bytes(owner)) };
            }
            let mut floor = [0u8; 8];
            floor.copy_from_slice(take(8)?);
            let done = flag(take(1)?[0])?;
            let has_reason = flag(take(1)?[0])?;
            let len = usize::from(u16::from_le_bytes([take(1)?[0], take(1)?[0]]));
            if len > MAX_REASON_BYTES {
                return Err(format!("a reason of {len} bytes"));
            }
            let reason = std::str::from_utf8(take(len)?).map_err(|_| "a reason is not UTF-8")?.to_string();
            if !has_reason && !reason.is_empty() {
                return Err("a reason without its flag".into());
            }
            aggregates.push(Planned {
                uuid: Uuid(uuid),
                frozen: epochs[0],
                new: epochs[1],
                floor: u64::from_le_bytes(floor),
                not_in_sync: has_reason.then_some(reason),
                done,
            });
        }
        if at != bytes.len() {
            return Err("bytes after the plan".into());
        }
        Ok(Plan { force_nvfail_all, negotiated, aggregates })
    }
}

fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The last forced switchover of the journal that got as far as its plan, with the plan.
pub fn last_switchover(records: &[OperationRecord]) -> Option<(OperationRecord, Plan)> {
    records.iter().rev().filter(|op| op.kind == OperationKind::Switchover).find_map(|op| {
        Plan::decode(&op.payload)
            .ok()
            .filter(|plan| !plan.aggregates.is_empty())
            .map(|plan| (op.clone(), plan))
    })
}

/// At start, before anything is served: settles what a crash left in the journal (DESIGN §11:
/// resumed or rolled back). An unfence in progress is over (it ended with the process); a
/// switchover in progress that never raised an epoch is rolled back (nothing was taken over:
/// the partner's partition is not frozen, its plan is cleared); one that did stays in progress
/// for a re-run to resume. Returns the latest switchover whose epochs were raised, with its
/// plan: its partner's partition is frozen and its `done` aggregates are served here.
pub async fn settle_at_start(
    journal: &crate::operations::OperationLog,
    shelf: &crate::shelf_state::ShelfState,
) -> Option<(OperationRecord, Plan)> {
    for op in journal.list().into_iter().filter(|op| op.state == OperationState::InProgress) {
        if op.kind == OperationKind::Unfence {
            let _ = journal
                .finish(op.id, OperationState::Failed, vec!["interrupted: the node restarted".into()])
                .await;
        }
    }
    let (op, plan) = last_switchover(&journal.list())?;
    let raised = plan.aggregates.iter().any(|a| shelf.marks(a.uuid).epoch >= a.new);
    if raised {
        return Some((op, plan));
    }
    if op.state == OperationState::InProgress {
        tracing::warn!(
            operation = op.id,
            "a forced switchover interrupted before it raised an epoch: rolled back"
        );
        let _ =
            journal.update(op.id, "rolled back: interrupted before any epoch was raised", Vec::new()).await;
        let _ = journal
            .finish(
                op.id,
                OperationState::Failed,
                vec!["rolled back: the node restarted before any epoch was raised".into()],
            )
            .await;
    }
    None
}

fn veto(kind: &str, code: &str, aggregate: Option<Uuid>, reason: impl Into<String>) -> Veto {
    Veto {
        kind: kind.into(),
        code: code.into(),
        aggregate: aggregate.map(|u| hex(&u.0)).unwrap_or_default(),
        reason: reason.into(),
    }
}

/// Whether the DR partner answers an `Admin.Status` within `bound` (a completed round trip).
async fn partner_answers(node: &Node, bound: Duration) -> Option<String> {
    let address = format!("http://{}", node.config().dr_partner.address);
    let probe = async {
        let endpoint = tonic::transport::Endpoint::from_shared(address).ok()?.connect_timeout(bound);
        let channel = endpoint.connect().await.ok()?;
        let mut client = mc_proto::v1::admin_client::AdminClient::new(channel);
        let request = mc_proto::v1::StatusRequest { cluster_id: node.config().cluster_id.to_vec() };
        match client.status(request).await {
            Ok(reply) => Some(format!(
                "node {} answered: it is {}",
                node.config().dr_partner.node_id,
                reply.into_inner().node_state
            )),
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::Cancelled
                        | tonic::Code::Unknown
                ) =>
            {
                None
            }
            Err(status) => {
                Some(format!("node {} answered: {}", node.config().dr_partner.node_id, status.message()))
            }
        }
    };
    tokio::time::timeout(bound, probe).await.ok().flatten()
}

/// The partner's aggregates with a plex on this shelf.
async fn candidates(node: &Node) -> Result<Vec<FoundAggregate>, Status> {
    let disks = crate::shelf::scan(&node.config().shelf_dir)
        .await
        .map_err(|e| Status::internal(format!("scan the shelf: {e}")))?;
    let partner = node.config().dr_partner.node_id;
    Ok(crate::shelf::aggregates(&disks, Uuid(node.config().cluster_id))
        .into_iter()
        .filter(|f| f.plexes[1].iter().filter_map(|d| d.label.as_ref()).any(|l| l.home_owner.0 == partner))
        .collect())
}

/// The vetoes and the plan a forced switchover would run now (step 1).
async fn evaluate(
    node: &Node,
    request: &SwitchoverRequest,
    resume: Option<&Plan>,
    granted: Option<&Granted>,
) -> Result<(Vec<Veto>, Plan), Status> {
    let config = node.config();
    let me = config.node_id;
    let partner = config.dr_partner.node_id;
    let mut vetoes = Vec::new();
    let negotiated = !request.forced_on_disaster;
    if !negotiated && !request.confirmed && !request.simulate && granted.is_none() {
        vetoes.push(veto(
            "hard",
            "not_confirmed",
            None,
            format!(
                "without a mediator, a forced switchover needs the operator's confirmation that node {partner}'s \
                 site is down or isolated (--confirm): if it still writes, its writes are lost"
            ),
        ));
    }
    if let Some(op) = node.operations().list().iter().rev().find(|op| op.state == OperationState::InProgress)
        && op.kind != OperationKind::Switchover
    {
        vetoes.push(veto(
            "hard",
            "operation_in_progress",
            None,
            format!("operation {} ({:?}) is in progress on node {me}", op.id, op.kind),
        ));
    }
    let state = node.state();
    if state.phase != Phase::Serving {
        vetoes.push(veto(
            "hard",
            "node_fenced",
            None,
            format!(
                "node {me} is {} ({}); if its DR partner's site is down, run `mcctl node unfence {me} --force \
                 --confirm` first",
                state.phase.name(),
                state.reason
            ),
        ));
    }
    // A mediator's grant replaces the partner checks: the partner's lease lapsed (S6, S7).
    let probe =
        if granted.is_some() { None } else { partner_answers(node, config.timers.keepalive_timeout).await };
    match probe {
        Some(answer) if !negotiated => vetoes.push(veto(
            "hard",
            "partner_reachable",
            None,
            format!(
                "the DR partner is reachable ({answer}): a forced switchover is only for a site that is down; \
                 run a negotiated switchover (without --forced-on-disaster)"
            ),
        )),
        None if negotiated => vetoes.push(veto(
            "hard",
            "partner_unreachable",
            None,
            format!(
                "node {partner} does not answer: a negotiated switchover needs it to release its aggregates; if \
                 its site is down, use --forced-on-disaster"
            ),
        )),
        _ => {}
    }
    let found = candidates(node).await?;
    if found.len() > MAX_PLANNED {
        vetoes.push(veto(
            "hard",
            "too_many_aggregates",
            None,
            format!(
                "{} aggregates of node {partner}: one switchover takes at most {MAX_PLANNED}",
                found.len()
            ),
        ));
    }
    if found.is_empty() {
        vetoes.push(veto(
            "hard",
            "nothing_to_switch_over",
            None,
            format!("this shelf holds no plex of node {partner}'s aggregates"),
        ));
    }
    let nvlog = node.nvlog().clone();
    // In this order (§9 (a)): the round trip, then the messages still unstored, then the
    // account. Whatever the writer sent before that round trip was counted before it was
    // recorded, so it is either still counted here or already applied to the state read next;
    // read the other way round, a store coming out of a stall could apply a re-establish
    // between a stale state and a count of zero.
    let round_trip = node.receiver.get().and_then(|r| r.last_round_trip_age());
    let unstored = node.receiver.get().map_or(0, |r| r.unstored());
    let receiver_state = nvlog.status(PartitionKind::DrPartner).map(|s| s.mirror_state).ok();
    let limit = config.timers.mirror_timeout.saturating_sub(config.timers.margin);
    let mut plan = Plan {
        force_nvfail_all: request.force_nvfail_all && !negotiated,
        negotiated,
        aggregates: Vec::new(),
    };
    for f in &found {
        let uuid = f.uuid;
        let labels: Vec<_> = f.plexes[1].iter().map(|d| d.label.as_ref()).collect();
        let Some(first) = labels.iter().flatten().next().copied() else { continue };
        if let Some(done) = resume.and_then(|p| p.aggregates.iter().find(|a| a.uuid == uuid)) {
            plan.aggregates.push(done.clone());
            continue;
        }
        if first.owner.0 == me {
            // Labels already ours, but no plan says so: a plan lost with its journal entry.
            vetoes.push(veto(
                "hard",
                "no_plan",
                Some(uuid),
                "the labels here name this node the owner but the journal holds no plan for it",
            ));
            continue;
        }
        if labels.iter().any(Option::is_none) {
            vetoes.push(veto(
                "hard",
                "no_usable_plex",
                Some(uuid),
                "a disk of plex 1 on this shelf has no valid label",
            ));
            continue;
        }
        match first.plex_state {
            PlexState::Normal => {}
            PlexState::Resyncing { .. } => {
                vetoes.push(veto(
                    "hard",
                    "no_usable_plex",
                    Some(uuid),
                    "plex 1 here is an unfinished resync target (S5): it holds a mix of old and new blocks",
                ));
                continue;
            }
            other => {
                vetoes.push(veto("hard", "no_usable_plex", Some(uuid), format!("plex 1 here is {other:?}")));
                continue;
            }
        }
        let marks = node.shelf_state.marks(uuid);
        let label_epoch = labels.iter().flatten().map(|l| l.epoch_high_water).max().unwrap_or_default();
        let seen = marks.epoch.max(label_epoch);
        let frozen = if seen.owner.0 == partner { seen } else { label_epoch };
        let Some(number) = seen.number.checked_add(1) else {
            vetoes.push(veto(
                "hard",
                "epoch_exhausted",
                Some(uuid),
                "the aggregate's epoch number cannot be raised",
            ));
            continue;
        };
        let new = match granted {
            // The mediator issued it (it alone raises epochs while it answers, DESIGN §10).
            Some(granted) => match granted.epochs.iter().find(|(u, _)| *u == uuid) {
                Some((_, epoch)) if *epoch > seen && epoch.owner.0 == me => *epoch,
                _ => {
                    vetoes.push(veto(
                        "hard",
                        "not_granted",
                        Some(uuid),
                        "the mediator's grant holds no epoch above this shelf's for this aggregate",
                    ));
                    continue;
                }
            },
            None => Epoch { number, owner: NodeId(me) },
        };
        // DESIGN §9 (a), without a mediator: the receiver holds the mirror in sync, the plexes
        // are normal and the last round trip is younger than mirror_timeout − margin.
        let SyncDoubts { mut not_in_sync, unknown } =
            sync_doubts(receiver_state, round_trip, unstored, limit, partner);
        // A drop the plex here has since been resynced from is healed: resync completion gives
        // the target the source's generation, which is at least the survivor's at the drop.
        let generation_here = labels.iter().flatten().map(|l| l.plex_generation.0).min().unwrap_or(0);
        if let Some(drop) = marks.drop.filter(|d| d.plex == 1 && generation_here < d.survivor_generation) {
            not_in_sync.push(format!(
                "node {partner} recorded plex 1 dropped here (generation {}): the plex here is out of date",
                drop.survivor_generation
            ));
        }
        // With a grant, the mediator's in-sync record decides §9 (a) (S7): an automatic grant
        // means in sync; a manual one that overrode it means NVFAIL.
        if let Some(granted) = granted {
            let reasons = granted.nvfail.then(|| {
                "the operator overrode the mediator's record that the aggregate was not in sync (S7)"
                    .to_string()
            });
            let cp = f.last_cp();
            plan.aggregates.push(Planned {
                uuid,
                frozen,
                new,
                floor: if cp.writer.0 == partner { cp.last_lsn.0 } else { 0 },
                not_in_sync: reasons,
                done: false,
            });
            let _ = (not_in_sync, unknown);
            continue;
        }
        // A negotiated switchover loses nothing or does not run: out of sync is a hard veto.
        let kind = if negotiated { "hard" } else { "soft" };
        for reason in &not_in_sync {
            vetoes.push(veto(kind, "out_of_sync", Some(uuid), reason.clone()));
        }
        if !negotiated {
            for reason in &unknown {
                vetoes.push(veto("soft", "sync_unknown", Some(uuid), reason.clone()));
            }
        }
        let reasons: Vec<String> = not_in_sync.into_iter().chain(unknown).collect();
        let cp = f.last_cp();
        plan.aggregates.push(Planned {
            uuid,
            frozen,
            new,
            floor: if cp.writer.0 == partner { cp.last_lsn.0 } else { 0 },
            not_in_sync: (!reasons.is_empty() && !negotiated).then(|| reasons.join("; ")),
            done: false,
        });
    }
    Ok((vetoes, plan))
}

fn vetoed(vetoes: &[Veto], override_soft: bool) -> bool {
    vetoes.iter().any(|v| v.kind == "hard" || !override_soft)
}

fn vetoed_status(reply: &SwitchoverReply) -> Status {
    let list: Vec<String> =
        reply.vetoes.iter().map(|v| format!("{} veto {}: {}", v.kind, v.code, v.reason)).collect();
    Status::with_details(
        tonic::Code::FailedPrecondition,
        format!("vetoed: {}", list.join("; ")),
        reply.encode_to_vec().into(),
    )
}

/// A mediator's grant of the partner's aggregates to this node (DESIGN §10 rule 2, S7).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Granted {
    /// The new epochs.
    pub epochs: Vec<(Uuid, Epoch)>,
    /// The in-sync condition was overridden: NVFAIL.
    pub nvfail: bool,
    /// Automatic (AUSO).
    pub automatic: bool,
}

impl Granted {
    /// From the wire; `None` if malformed.
    pub fn from_wire(grant: &mc_proto::v1::MediatorGrant) -> Option<Granted> {
        let epochs =
            grant.epochs.iter().map(crate::wire::from_aggregate_epoch).collect::<Option<Vec<_>>>()?;
        Some(Granted { epochs, nvfail: grant.nvfail, automatic: grant.automatic })
    }
}

/// `Admin.Switchover`.
pub async fn admin_switchover(
    node: &Arc<Node>,
    request: &SwitchoverRequest,
) -> Result<SwitchoverReply, Status> {
    // S7: with a mediator, a manual forced switchover goes through its lease conditions; the
    // grant carries the epochs.
    if request.forced_on_disaster
        && !request.simulate
        && let Some(link) = node.mediator.get()
    {
        let grant = link.request_switchover(node, request.override_vetoes).await.map_err(|why| {
            let reply = SwitchoverReply {
                vetoes: vec![veto("hard", "mediator_refused", None, why)],
                ..Default::default()
            };
            vetoed_status(&reply)
        })?;
        return switchover_with(node, request, Some(&grant)).await;
    }
    switchover_with(node, request, None).await
}

/// Runs a granted switchover (AUSO, or a manual one through the mediator), then confirms it.
pub async fn run_grant(node: &Arc<Node>, grant: &Granted) -> Result<SwitchoverReply, Status> {
    let request = SwitchoverRequest {
        cluster_id: node.config().cluster_id.to_vec(),
        forced_on_disaster: true,
        simulate: false,
        override_vetoes: grant.nvfail,
        force_nvfail_all: false,
        confirmed: true,
    };
    switchover_with(node, &request, Some(grant)).await
}

async fn switchover_with(
    node: &Arc<Node>,
    request: &SwitchoverRequest,
    granted: Option<&Granted>,
) -> Result<SwitchoverReply, Status> {
    let started = Instant::now();
    let _admin = node.admin.lock().await;
    let journal = node.operations().list();
    let resume = last_switchover(&journal).filter(|(op, _)| op.state == OperationState::InProgress);
    if let Some((op, plan)) = last_switchover(&journal)
        && op.state != OperationState::InProgress
        && plan.aggregates.iter().all(|a| a.done)
        && node.aggregates().iter().any(|a| a.switched_over)
    {
        // Done already: say so (idempotent).
        let volumes = switched_volumes(node);
        return Ok(SwitchoverReply {
            vetoes: Vec::new(),
            operation: Some(crate::operations::to_wire(&op)),
            nvfailed_volumes: nvfailed(node),
            volumes,
        });
    }
    let (vetoes, plan) = evaluate(node, request, resume.as_ref().map(|(_, plan)| plan), granted).await?;
    let mut reply = SwitchoverReply { vetoes, ..Default::default() };
    if request.simulate {
        return Ok(reply);
    }
    if vetoed(&reply.vetoes, request.override_vetoes) {
        return Err(vetoed_status(&reply));
    }
    for v in &reply.vetoes {
        tracing::warn!(node = node.node_id(), code = %v.code, aggregate = %v.aggregate, "soft veto overridden: {}", v.reason);
    }
    // Step 2: the plan, then the epochs and the freeze.
    let op = match &resume {
        Some((op, _)) => {
            node.operations()
                .update(op.id, STEP_PLANNED, plan.encode())
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            op.clone()
        }
        None => node
            .operations()
            .begin(OperationKind::Switchover, STEP_PLANNED, plan.encode())
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?,
    };
    tracing::warn!(
        node = node.node_id(),
        operation = op.id,
        aggregates = plan.aggregates.len(),
        "forced switchover: taking over the DR partner's aggregates"
    );
    let plan_bytes = plan.encode();
    crate::faults::crash_at("planned");
    let result = run(node, op.id, plan).await;
    let (state, errors) = match &result {
        Ok(outcome) if outcome.errors.is_empty() => (OperationState::Successful, Vec::new()),
        Ok(outcome) if outcome.adopted > 0 => (OperationState::PartiallySuccessful, outcome.errors.clone()),
        Ok(outcome) => (OperationState::Failed, outcome.errors.clone()),
        Err(e) => (OperationState::Failed, vec![e.clone()]),
    };
    // A failed step leaves the operation in progress: a re-run resumes it from the journal.
    if state != OperationState::Failed {
        node.operations()
            .finish(op.id, state, errors.clone())
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
    } else {
        let step = format!("stopped, re-run to resume: {}", errors.join("; "));
        let _ = node.operations().update(op.id, truncate(&step, 200), plan_bytes).await;
    }
    tracing::warn!(node = node.node_id(), operation = op.id, ?state, took = ?started.elapsed(), "forced switchover ended");
    let record = node.operations().list().into_iter().find(|r| r.id == op.id);
    reply.operation = record.as_ref().map(crate::operations::to_wire);
    reply.nvfailed_volumes = nvfailed(node);
    reply.volumes = switched_volumes(node);
    match state {
        OperationState::Failed => Err(Status::internal(format!(
            "the forced switchover failed (operation {}; re-run it to resume): {}",
            op.id,
            errors.join("; ")
        ))),
        _ => Ok(reply),
    }
}

fn switched_volumes(node: &Node) -> Vec<String> {
    node.aggregates()
        .iter()
        .filter(|a| a.switched_over && a.deposed().is_none())
        .flat_map(|a| a.table().volumes.iter().map(|v| v.name.clone()).collect::<Vec<_>>())
        .collect()
}

fn nvfailed(node: &Node) -> Vec<String> {
    node.aggregates()
        .iter()
        .filter(|a| a.switched_over)
        .flat_map(|a| {
            a.table()
                .volumes
                .iter()
                .filter(|v| v.in_nvfailed_state)
                .map(|v| v.name.clone())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// What the replay of the partner's records in the `dr_partner` partition found (DESIGN §11
/// step 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplayFound {
    /// This node's account of the partner's mirror (S13).
    pub receiver: nvlog::MirrorState,
    /// The partition's release point (the partner's CPs, as it told us).
    pub released: Lsn,
    /// Records stamped with another epoch than the one frozen.
    pub skipped_for_epoch: usize,
    /// The first run of missing lsns above the replay's start.
    pub first_gap: Option<nvlog::LsnGap>,
}

/// S8: why the partner's records replayed here may lack acknowledged writes of an aggregate
/// whose plex at this site holds the partner's CPs through `floor` — its volumes are then
/// NVFAILed (S9) — or `None` when the replay is complete. Sans-IO: the switchover and `mc-model`
/// decide with it.
pub fn replay_doubt(found: &ReplayFound, floor: Lsn, partner: u32) -> Option<String> {
    if found.receiver == nvlog::MirrorState::Resyncing {
        return Some(format!("this node's copy of node {partner}'s records lost records (resyncing, S13)"));
    }
    if found.released > floor && !active(Break::ReplayAcrossGap) {
        // Released by the partner above what the plex here holds: lsns floor+1..=released are
        // in neither (a gap between the plex and the log), and those records are gone.
        return Some(format!(
            "node {partner} released its records up to lsn {} but the plex here holds its CPs only up to lsn {} (S8)",
            found.released.0, floor.0
        ));
    }
    if found.skipped_for_epoch > 0 {
        // Records of the partner stamped with another epoch than the one frozen (S8): not
        // applied, so the copy here may lack acknowledged writes.
        return Some(format!(
            "{} records of node {partner} carry another epoch than the one frozen (S8)",
            found.skipped_for_epoch
        ));
    }
    match found.first_gap {
        Some(gap) if !active(Break::ReplayAcrossGap) => Some(format!(
            "lsns {}..{} of node {partner} are missing from this node's copy (S8)",
            gap.after.0 + 1,
            gap.next.0
        )),
        _ => None,
    }
}

/// Why a forced switchover without a mediator cannot show that the partner's aggregate was in
/// sync (DESIGN §9 (a)): each reason is a soft veto, and overriding it NVFAILs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncDoubts {
    /// The partner may have acknowledged writes this node lacks.
    pub not_in_sync: Vec<String>,
    /// This node cannot know.
    pub unknown: Vec<String>,
}

/// §9 (a) without a mediator, as far as the NVLog goes (the plexes are the caller's): the
/// receiver's own account (S13) must hold the partner's mirror `in_sync`, and the last round
/// trip with the partner must be younger than `limit` (`mirror_timeout − margin`): after that,
/// or with no round trip in this life, the partner may have dropped us and gone on writing
/// alone (S3). `unstored`: the partner's messages received but not yet applied by the receiver
/// (a stalled store): the account may lag a re-establish the partner announced before our last
/// round trip (found by the model check, docs/safety.md). Sans-IO: the switchover's planner and
/// the model check (`mc-model`) decide with it.
pub fn sync_doubts(
    receiver_state: Option<nvlog::MirrorState>,
    round_trip: Option<Duration>,
    unstored: u64,
    limit: Duration,
    partner: u32,
) -> SyncDoubts {
    let mut doubts = SyncDoubts::default();
    match receiver_state {
        Some(nvlog::MirrorState::InSync) => {}
        Some(other) => doubts.not_in_sync.push(format!(
            "this node's receiver holds node {partner}'s NVLog mirror {other:?} (S13): node {partner} may have \
             acknowledged writes this node lacks"
        )),
        None => doubts.unknown.push("the receiver's partition cannot be read".to_string()),
    }
    if unstored > 0 && !active(Break::TrustUnstoredAccount) {
        doubts.unknown.push(format!(
            "{unstored} messages of node {partner} were received but not yet stored (is this node's NVLog \
             stalled?): its account of the mirror may lag what node {partner} announced (S13)"
        ));
    }
    match round_trip {
        None => doubts.unknown.push(format!(
            "no round trip with node {partner} completed since this node started: it may have gone on writing \
             alone"
        )),
        Some(age) if age >= limit => doubts.unknown.push(format!(
            "the last round trip with node {partner} was {:.1} s ago, more than mirror_timeout − margin ({:.1} s): \
             it may have gone on writing alone",
            age.as_secs_f64(),
            limit.as_secs_f64()
        )),
        Some(_) => {}
    }
    doubts
}

/// With a mediator, the new epochs of `plan`'s aggregates not done yet come from it (DESIGN
/// §10: while it answers, it alone raises epochs), each naming `owner`; the plan keeps the
/// higher of its own and the issued one. A mediator that cannot be reached and answers no
/// heartbeat either leaves S2's fallback (the plan's own epochs, which the mediator adopts
/// from the next report). Any other failure stops: `RaiseError::Unknown` means the epochs may
/// have moved, so the caller must not serve again at the old ones.
pub(crate) async fn mediator_epochs(
    node: &Node,
    plan: &mut Plan,
    owner: u32,
    reason: &str,
) -> Result<(), crate::mediator_link::RaiseError> {
    let Some(link) = node.mediator.get() else { return Ok(()) };
    let wanted: Vec<(Uuid, u32)> =
        plan.aggregates.iter().filter(|p| !p.done).map(|p| (p.uuid, owner)).collect();
    if wanted.is_empty() {
        return Ok(());
    }
    match link.raise_epochs(&wanted, reason).await {
        Ok(issued) => {
            for planned in plan.aggregates.iter_mut() {
                if let Some((_, epoch)) = issued.iter().find(|(u, _)| *u == planned.uuid) {
                    planned.new = planned.new.max(*epoch);
                }
            }
            Ok(())
        }
        Err(crate::mediator_link::RaiseError::Unreachable(e)) if !link.answering() => {
            tracing::warn!(
                node = node.node_id(),
                "{reason}: the mediator does not answer ({e}); the epochs are raised here and it adopts them \
                 from the next report (S2)"
            );
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// What `run` did.
struct Outcome {
    adopted: usize,
    errors: Vec<String>,
}

/// Steps 2 (epochs, freeze) to 7 for every aggregate of the plan not done yet.
async fn run(node: &Arc<Node>, id: u64, mut plan: Plan) -> Result<Outcome, String> {
    if plan.negotiated {
        // The owner stops, drains, completes a CP and persists our epochs (DESIGN §11); the
        // plex here then holds every write it acknowledged, up to the CP now in its labels.
        let (released, epochs) = release(node, &plan).await?;
        crate::faults::crash_at("released");
        // The partner's final CP covers every write it acknowledged, on both plexes (it
        // releases only mirrored, normal aggregates): its records at or below it are on the
        // plex here (S8). It persisted the epochs it names (the mediator's, when it answered).
        for planned in plan.aggregates.iter_mut().filter(|p| !p.done) {
            planned.floor = planned.floor.max(released);
            if let Some((_, epoch)) =
                epochs.iter().find(|(u, e)| *u == planned.uuid && e.owner.0 == node.node_id())
            {
                planned.new = planned.new.max(*epoch);
            }
        }
        node.operations()
            .update(id, "the partner released its aggregates", plan.encode())
            .await
            .map_err(|e| e.to_string())?;
    }
    for planned in &plan.aggregates {
        node.shelf_state
            .admit_exclusive(planned.uuid, planned.new)
            .await
            .map_err(|e| format!("persist epoch {}@node{}: {e}", planned.new.number, planned.new.owner.0))?;
    }
    if let Some(receiver) = node.receiver.get() {
        receiver.freeze().await;
    }
    crate::faults::crash_at("frozen");
    if !plan.negotiated {
        node.partner_down_confirmed.store(true, Ordering::Release);
        node.mirror()
            .drop_confirmed("forced switchover: the operator confirmed the partner's site down or isolated")
            .await
            .map_err(|e| format!("drop the NVLog mirror to the partner: {e}"))?;
    }
    let mut outcome = Outcome { adopted: 0, errors: Vec::new() };
    let found = candidates(node).await.map_err(|s| s.message().to_string())?;
    let mut adopting: Vec<(Arc<AggrSlot>, Planned)> = Vec::new();
    for planned in plan.aggregates.iter().filter(|p| !p.done) {
        let Some(f) = found.iter().find(|f| f.uuid == planned.uuid) else {
            outcome
                .errors
                .push(format!("aggregate {}: its plex is gone from this shelf", hex(&planned.uuid.0)));
            continue;
        };
        // An earlier attempt of this run may have opened it already.
        let slot = match node.aggregates().into_iter().find(|a| a.uuid == planned.uuid) {
            Some(slot) => slot,
            None => match node.adopt(f, planned.new, "forced switchover in progress").await {
                Ok(slot) => slot,
                Err(e) => {
                    outcome.errors.push(format!("aggregate {}: {e}", hex(&planned.uuid.0)));
                    continue;
                }
            },
        };
        adopting.push((slot, planned.clone()));
    }
    crate::faults::crash_at("adopted");
    // Step 4: the partner's records (S8).
    let problems = node.replay_partner(&adopting).await;
    crate::faults::crash_at("replayed");
    // Step 5: NVFAIL.
    for (slot, planned) in &adopting {
        let mut causes = Vec::new();
        if let Some(why) = &planned.not_in_sync {
            causes.push(NvfailCause { rule: NvfailRule::NotInSync, why: why.clone() });
        }
        if let Some(why) = problems.get(&slot.uuid) {
            causes.push(NvfailCause { rule: NvfailRule::Unrecoverable, why: why.clone() });
        }
        if plan.force_nvfail_all {
            causes.push(NvfailCause { rule: NvfailRule::ForceAll, why: "--force-nvfail-all".into() });
        }
        // Rule (b) is for forced switchovers only.
        if !plan.negotiated {
            causes.push(NvfailCause {
                rule: NvfailRule::DrForce,
                why: "dr_force_nvfail is set and a forced switchover happened".into(),
            });
        }
        for cause in &causes {
            if let Err(e) = node.enter_nvfail(slot, None, cause).await {
                // Not served rather than served without its NVFAIL (S9).
                let why = format!("its NVFAIL state could not be recorded: {e}");
                slot.set_deposed(node.node_id(), why.clone());
                outcome.errors.push(format!("aggregate {}: {why}", slot.table().name));
                break;
            }
        }
    }
    // Step 6: a CP puts the replayed records on the plex here.
    node.cp("switchover").await.map_err(|e| format!("the CP after replay failed: {e}"))?;
    crate::faults::crash_at("cp");
    for (slot, _) in &adopting {
        // Not one whose NVFAIL could not be recorded: a restart must not serve it.
        let ready = matches!(*slot.serving.borrow(), SlotState::Adopting(_));
        if let Some(planned) = plan.aggregates.iter_mut().find(|p| p.uuid == slot.uuid) {
            planned.done = ready;
        }
    }
    node.operations()
        .update(id, "replayed, NVFAIL applied, CP done", plan.encode())
        .await
        .map_err(|e| e.to_string())?;
    // Step 7: export.
    for (slot, _) in &adopting {
        if slot.send_serving() {
            outcome.adopted += 1;
        }
    }
    node.operations().update(id, STEP_DONE, plan.encode()).await.map_err(|e| e.to_string())?;
    Ok(outcome)
}

impl AggrSlot {
    /// Exports an adopted aggregate; false if it was deposed meanwhile.
    fn send_serving(&self) -> bool {
        self.serving.send_if_modified(|state| match state {
            SlotState::Adopting(_) => {
                *state = SlotState::Serving;
                true
            }
            _ => false,
        });
        matches!(*self.serving.borrow(), SlotState::Serving)
    }
}

impl Node {
    /// Opens a partner's aggregate from its plex on this shelf at `epoch` (plex 0, at the
    /// partner's site, stays out until heal), records this node as its owner in the labels and
    /// adds it to the node's list, not served (`Adopting`).
    pub(crate) async fn adopt(
        &self,
        found: &FoundAggregate,
        epoch: Epoch,
        why: &str,
    ) -> Result<Arc<AggrSlot>, String> {
        let index = self.aggregates().iter().map(|a| a.index + 1).max().unwrap_or(0);
        let slot =
            self.open_switched_over(found, index, epoch, SlotState::Adopting(why.to_string()), false).await?;
        let slot = Arc::new(slot);
        let mut list = self.aggregates.write().expect("the aggregate list lock holder panicked");
        if list.iter().any(|a| a.uuid == slot.uuid) {
            return Err("already open".into());
        }
        list.push(slot.clone());
        drop(list);
        self.publish_epochs();
        Ok(slot)
    }

    /// Opens a switched-over aggregate (module doc, step 3).
    pub(crate) async fn open_switched_over(
        &self,
        found: &FoundAggregate,
        index: u32,
        epoch: Epoch,
        state: SlotState,
        healed: bool,
    ) -> Result<AggrSlot, String> {
        let partner = self.config.dr_partner.node_id;
        let paths: Vec<std::path::PathBuf> = found.plexes[1].iter().map(|d| d.path.clone()).collect();
        if paths.is_empty() {
            return Err("no disk of plex 1 on this shelf".into());
        }
        let local = self.local_devices(&paths, found.uuid, epoch)?;
        // Plex 0 is at the partner's site: out until heal; after heal, reopened there (the
        // generation rules decide again, S5), or dropped and reattached by the plex monitor.
        let mut home_names = Vec::new();
        let home: Vec<Arc<dyn plex::BlockDevice>> = if healed {
            match self.remote_plex_devices(found.uuid, epoch, 0, None, 0).await {
                Ok((devices, names)) => {
                    home_names = names;
                    devices
                }
                Err(why) => vec![Arc::new(crate::remote_disk::UnreachableDisk { why })],
            }
        } else {
            vec![Arc::new(crate::remote_disk::UnreachableDisk {
                why: format!("plex 0 is at node {partner}'s site, switched over: it returns at heal"),
            })]
        };
        let aggregate = Aggregate::open([home, local], self.aggregate_options(), self.drop_hook(epoch))
            .await
            .map_err(|e| format!("open from plex 1: {e}"))?;
        let table = Node::read_table(&aggregate).await?;
        // Before the labels name this node the owner: a refused aggregate stays the partner's.
        for volume in &table.volumes {
            if self
                .aggregates()
                .iter()
                .any(|a| a.uuid != found.uuid && a.table().volumes.iter().any(|v| v.name == volume.name))
            {
                return Err(format!("volume {} has the name of a volume of this node", volume.name));
            }
        }
        aggregate
            .record_owner(NodeId(self.config.node_id), epoch)
            .await
            .map_err(|e| format!("record the new owner in the labels: {e}"))?;
        tracing::warn!(
            node = self.config.node_id,
            aggregate = %table.name,
            epoch = epoch.number,
            "aggregate opened from its plex at this site (switched over)"
        );
        Ok(AggrSlot {
            acks: crate::node::AckStamps::default(),
            index,
            uuid: found.uuid,
            aggregate: Arc::new(aggregate),
            epoch: nvlog::Epoch { number: epoch.number, owner: nvlog::NodeId(epoch.owner.0) },
            table: std::sync::Mutex::new(table),
            disks: std::sync::Mutex::new([
                home_names,
                found.plexes[1].iter().map(|d| d.name.clone()).collect(),
            ]),
            last_cp: std::sync::Mutex::new(found.last_cp()),
            switched_over: true,
            healed: std::sync::atomic::AtomicBool::new(healed),
            serving: tokio::sync::watch::Sender::new(state),
        })
    }

    /// Step 4: replays the partner's records held in the `dr_partner` partition into the write
    /// cache (S8). Returns, per aggregate, why its records could not all be recovered.
    async fn replay_partner(&self, adopting: &[(Arc<AggrSlot>, Planned)]) -> HashMap<Uuid, String> {
        let mut problems: HashMap<Uuid, String> = HashMap::new();
        if adopting.is_empty() {
            return problems;
        }
        let partner = self.config.dr_partner.node_id;
        let mut floors: HashMap<Uuid, Lsn> = HashMap::new();
        let mut frozen = HashMap::new();
        for (slot, planned) in adopting {
            // S8: the label's CP covers the partner's records at or below its lsn (as planned:
            // a CP of ours since, before a crash, must not lower it).
            floors.insert(slot.uuid, Lsn(planned.floor));
            frozen.insert(
                nvlog::AggregateId(slot.uuid.0),
                nvlog::Epoch { number: planned.frozen.number, owner: nvlog::NodeId(planned.frozen.owner.0) },
            );
        }
        let nvlog = self.nvlog.clone();
        let start = floors.values().min().copied().unwrap_or(Lsn::ZERO);
        let status = nvlog.status(PartitionKind::DrPartner);
        let replay = tokio::task::spawn_blocking(move || {
            nvlog.replay(
                PartitionKind::DrPartner,
                &nvlog::ReplayFilter { after_lsn: start, frozen_epochs: Some(frozen) },
            )
        })
        .await
        .map_err(|e| format!("replay task: {e}"))
        .and_then(|r| r.map_err(|e| e.to_string()));
        fn all(problems: &mut HashMap<Uuid, String>, adopting: &[(Arc<AggrSlot>, Planned)], why: &str) {
            for (slot, _) in adopting {
                problems.entry(slot.uuid).or_insert_with(|| why.to_string());
            }
        }
        let replay = match (status, replay) {
            (Ok(status), Ok(replay)) => {
                let found = ReplayFound {
                    receiver: status.mirror_state,
                    released: status.released_lsn,
                    skipped_for_epoch: replay.skipped_for_epoch,
                    first_gap: replay.gaps.first().copied(),
                };
                for (slot, _) in adopting {
                    let floor = floors.get(&slot.uuid).copied().unwrap_or_default();
                    if let Some(why) = replay_doubt(&found, floor, partner) {
                        problems.entry(slot.uuid).or_insert(why);
                    }
                }
                replay
            }
            (Err(e), _) => {
                all(&mut problems, adopting, &format!("the dr_partner partition: {e}"));
                return problems;
            }
            (_, Err(e)) => {
                all(&mut problems, adopting, &format!("replay: {e}"));
                return problems;
            }
        };
        let mut applied = 0u64;
        for record in &replay.records {
            let header = &record.header;
            let uuid = Uuid(header.aggregate.0);
            let Some((slot, _)) = adopting.iter().find(|(s, _)| s.uuid == uuid) else { continue };
            if floors.get(&uuid).is_some_and(|floor| header.lsn <= *floor) {
                continue;
            }
            let table = slot.table().clone();
            let Some(entry) = table.volumes.iter().find(|v| v.id == header.volume.0).cloned() else {
                if header.volume.0 >= table.next_id {
                    problems
                        .entry(uuid)
                        .or_insert_with(|| format!("lsn {} names an unknown volume", header.lsn.0));
                }
                continue;
            };
            let end = header.offset.checked_add(header.range_len);
            if end.is_none_or(|end| end > entry.size) {
                problems
                    .entry(uuid)
                    .or_insert_with(|| format!("lsn {} is outside volume {}", header.lsn.0, entry.name));
                continue;
            }
            let volume = VolumeRef { aggr: slot.clone(), entry };
            match self.apply(&volume, header.op, header.offset, header.range_len, &record.payload).await {
                Ok(()) => applied += 1,
                Err(e) => {
                    problems.entry(uuid).or_insert_with(|| format!("lsn {}: {e}", header.lsn.0));
                }
            }
        }
        tracing::warn!(
            node = self.config.node_id,
            partner,
            applied,
            skipped_for_epoch = replay.skipped_for_epoch,
            "the partner's NVLog records replayed (S8)"
        );
        problems
    }

    /// S2: the partner holds `epoch`, above ours, for `uuid`: persisted as this shelf's mark
    /// (our own disk writes at the old epoch are refused from now on) and the aggregate is no
    /// longer served.
    pub(crate) async fn depose(&self, uuid: Uuid, epoch: Epoch) {
        if let Err(e) = self.shelf_state.admit(uuid, epoch).await {
            tracing::error!(node = self.config.node_id, aggregate = %hex(&uuid.0), "persisting the higher epoch failed: {e}");
        }
        let Some(slot) = self.aggregates().into_iter().find(|a| a.uuid == uuid) else { return };
        if epoch <= slot.plex_epoch() || slot.is_deposed() {
            return;
        }
        let why = format!(
            "deposed: node {} holds epoch {} of aggregate {} (S2); this node serves and writes it no more",
            epoch.owner.0,
            epoch.number,
            slot.table().name
        );
        tracing::error!(node = self.config.node_id, aggregate = %hex(&uuid.0), "{why}");
        slot.set_deposed(self.config.node_id, why);
        if !slot.switched_over && epoch.owner.0 == self.config.dr_partner.node_id {
            self.register_away(uuid, epoch, slot_floor(self, &slot));
        }
        let mut cache = self.lock_cache();
        cache.active.retain(|(index, _), _| *index != slot.index);
    }

    /// Stops serving every aggregate the DR partner reports a higher epoch for (S2), for as
    /// long as the node runs.
    pub async fn watch_deposed(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut deposed = self.mirror.subscribe_deposed();
        loop {
            let list = deposed.borrow_and_update().clone();
            for (uuid, epoch) in list {
                self.depose(uuid, epoch).await;
            }
            tokio::select! {
                changed = deposed.changed() => if changed.is_err() { return },
                _ = stop.wait_for(|stop| *stop) => return,
            }
        }
    }
}

/// This node's records of `slot` at or below this lsn are on its plexes (its last CP there).
fn slot_floor(node: &Node, slot: &AggrSlot) -> Lsn {
    let cp = *slot.last_cp.lock().expect("last CP lock");
    if cp.writer.0 == node.node_id() { Lsn(cp.last_lsn.0) } else { Lsn::ZERO }
}

/// Asks the DR partner to release the aggregates of `plan` at its epochs (negotiated
/// switchover); returns the lsn of its final CP.
async fn release(node: &Node, plan: &Plan) -> Result<(u64, Vec<(Uuid, Epoch)>), String> {
    let config = node.config();
    let address = format!("http://{}", config.dr_partner.address);
    let call = async {
        let endpoint = tonic::transport::Endpoint::from_shared(address)
            .map_err(|e| format!("partner address: {e}"))?
            .connect_timeout(config.timers.keepalive_timeout);
        let channel = endpoint.connect().await.map_err(|e| format!("connect to the partner: {e}"))?;
        let mut client = mc_proto::v1::admin_client::AdminClient::new(channel);
        let request = mc_proto::v1::ReleaseAggregatesRequest {
            identity: Some(mc_proto::v1::Identity {
                cluster_id: config.cluster_id.to_vec(),
                sender_node: config.node_id,
                receiver_node: config.dr_partner.node_id,
            }),
            epochs: plan
                .aggregates
                .iter()
                .filter(|a| !a.done)
                .map(|a| crate::wire::aggregate_epoch(a.uuid, a.new))
                .collect(),
        };
        client
            .release_aggregates(request)
            .await
            .map(|reply| reply.into_inner())
            .map_err(|status| format!("the partner did not release its aggregates: {}", status.message()))
    };
    // Draining and a CP at the partner: bounded by the mirror timeout and a CP's time.
    let reply = tokio::time::timeout(config.timers.mirror_timeout * 4, call)
        .await
        .map_err(|_| "the partner did not answer the release in time".to_string())??;
    tracing::warn!(
        node = config.node_id,
        partner = config.dr_partner.node_id,
        last_cp_lsn = reply.last_cp_lsn,
        "the partner released its aggregates (negotiated switchover)"
    );
    let epochs = reply.epochs.iter().filter_map(crate::wire::from_aggregate_epoch).collect();
    Ok((reply.last_cp_lsn, epochs))
}

/// Hands-off preparation shared by the negotiated switchover's release and the switchback:
/// stops new I/O to `slots` (`Adopting(why)`), drains what was admitted (at most twice the
/// mirror timeout), completes a CP, and checks that it reached both plexes of each (a plex that
/// failed under it lacks what it released). On any failure the slots serve again and nothing
/// else changed; `what` names the operation in the error.
pub(crate) async fn quiesce(
    node: &Node,
    slots: &[Arc<AggrSlot>],
    why: &str,
    what: &str,
) -> Result<(), String> {
    for slot in slots {
        slot.serving.send_if_modified(|state| match state {
            SlotState::Serving => {
                *state = SlotState::Adopting(why.to_string());
                true
            }
            _ => false,
        });
    }
    let result = async {
        let deadline = Instant::now() + node.config().timers.mirror_timeout * 2;
        while node.busy.load(Ordering::Acquire) > 0 {
            if Instant::now() >= deadline {
                return Err(format!("writes still in flight: the {what} is called off"));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        node.cp("hand-off").await.map_err(|e| format!("the CP before the {what} failed: {e}"))?;
        for slot in slots {
            let states = slot.aggregate.plex_states();
            if states != [plex::PlexState::Normal; 2] {
                return Err(format!(
                    "aggregate {} lost a plex during the {what}'s CP (plexes {states:?}): the {what} is called off \
                     until the resync completes",
                    slot.table().name
                ));
            }
        }
        Ok(())
    }
    .await;
    if result.is_err() {
        for slot in slots {
            slot.serving.send_if_modified(|state| match state {
                SlotState::Adopting(_) => {
                    *state = SlotState::Serving;
                    true
                }
                _ => false,
            });
        }
    }
    result
}

/// `Admin.ReleaseAggregates`:/// `Admin.ReleaseAggregates`: the owner's side of a negotiated switchover (DESIGN §11): stops
/// accepting writes to the aggregates, drains those in flight, completes a CP that covers every
/// write it acknowledged, persists the caller's epochs in this shelf's marks (its own plex
/// writes at the old epoch are refused from then on, S2) and stops serving them. Idempotent: a
/// release already done answers the same.
pub async fn admin_release(
    node: &Arc<Node>,
    request: &mc_proto::v1::ReleaseAggregatesRequest,
) -> Result<mc_proto::v1::ReleaseAggregatesReply, Status> {
    let config = node.config();
    let identity = request.identity.as_ref().ok_or_else(|| Status::invalid_argument("no identity"))?;
    crate::admin::check_cluster(&config.cluster_id, &identity.cluster_id)?;
    if identity.sender_node != config.dr_partner.node_id || identity.receiver_node != config.node_id {
        return Err(Status::failed_precondition(format!(
            "a release is asked by node {} of node {}: only the DR partner (node {}) may take this node's \
             aggregates over",
            identity.sender_node, identity.receiver_node, config.dr_partner.node_id
        )));
    }
    let mut wanted = Vec::new();
    for wire in &request.epochs {
        let (uuid, epoch) = crate::wire::from_aggregate_epoch(wire)
            .ok_or_else(|| Status::invalid_argument("a malformed aggregate epoch"))?;
        if epoch.owner.0 != identity.sender_node {
            return Err(Status::invalid_argument("an epoch not held by the caller"));
        }
        let Some(slot) = node.aggregates().into_iter().find(|a| a.uuid == uuid && !a.switched_over) else {
            // Released already (this node restarted since and did not open it again).
            if node.shelf_state.marks(uuid).epoch >= epoch {
                continue;
            }
            return Err(Status::not_found(format!("aggregate {} is not served here", hex(&uuid.0))));
        };
        if epoch <= slot.plex_epoch() {
            return Err(Status::failed_precondition(format!(
                "epoch {}@node{} is not above this node's {}@node{} (S2)",
                epoch.number, epoch.owner.0, slot.epoch.number, slot.epoch.owner.0
            )));
        }
        // Its final CP must reach both plexes: the taker opens the one at its site.
        let states = slot.aggregate.plex_states();
        if states != [plex::PlexState::Normal; 2] {
            return Err(Status::failed_precondition(format!(
                "aggregate {} is not mirrored and normal (plexes {:?}): wait for the resync",
                slot.table().name,
                states
            )));
        }
        wanted.push((slot, epoch));
    }
    let _admin = node.admin.lock().await;
    node.check_serving().map_err(|e| crate::data::status(&e))?;
    // 1-3. No new I/O, drain, a CP that reached both plexes: the taker's plex holds every
    // acknowledged write.
    let slots: Vec<Arc<AggrSlot>> = wanted.iter().map(|(slot, _)| slot.clone()).collect();
    let why = format!("released to node {} (negotiated switchover): served there", identity.sender_node);
    quiesce(node, &slots, &why, "release").await.map_err(|e| Status::unavailable(format!("{e}; retry")))?;
    // With a mediator, the owner itself asks it for the taker's epochs (it alone raises epochs
    // while it answers, and moves an aggregate away from a live owner only at that owner's
    // request); only now, with this node's cache of them destaged, since the next heartbeat
    // reply deposes this node of them.
    let mut plan = Plan {
        negotiated: true,
        force_nvfail_all: false,
        aggregates: wanted
            .iter()
            .map(|(slot, epoch)| Planned {
                uuid: slot.uuid,
                frozen: slot.plex_epoch(),
                new: *epoch,
                floor: 0,
                not_in_sync: None,
                done: false,
            })
            .collect(),
    };
    if let Err(e) = mediator_epochs(node, &mut plan, identity.sender_node, "negotiated switchover").await {
        if let crate::mediator_link::RaiseError::Unknown(_) = e {
            // The epochs may be the taker's already: this node does not serve them again; the
            // taker's re-run asks again.
            return Err(Status::unavailable(format!("negotiated switchover: {e}; re-run it")));
        }
        for slot in &slots {
            slot.serving.send_if_modified(|state| match state {
                SlotState::Adopting(_) => {
                    *state = SlotState::Serving;
                    true
                }
                _ => false,
            });
        }
        return Err(Status::failed_precondition(format!("negotiated switchover: {e}")));
    }
    for ((_, epoch), planned) in wanted.iter_mut().zip(&plan.aggregates) {
        *epoch = planned.new;
    }
    // 4. The new epochs, durably; from now on this node writes none of it (S2).
    for (slot, epoch) in &wanted {
        node.shelf_state
            .admit(slot.uuid, *epoch)
            .await
            .map_err(|e| Status::unavailable(format!("persist the new epoch: {e}")))?;
        let why = format!(
            "deposed: released to node {} (negotiated switchover, epoch {}), served there",
            epoch.owner.0, epoch.number
        );
        tracing::warn!(node = config.node_id, aggregate = %slot.table().name, "{why}");
        slot.set_deposed(config.node_id, why);
        node.register_away(slot.uuid, *epoch, slot_floor(node, slot));
    }
    let stats = node.cp_stats();
    Ok(mc_proto::v1::ReleaseAggregatesReply {
        last_cp_lsn: stats.last_lsn.0,
        last_cp_id: stats.last_id,
        epochs: wanted.iter().map(|(slot, epoch)| crate::wire::aggregate_epoch(slot.uuid, *epoch)).collect(),
    })
}

/// `Admin.Unfence`: the operator's way out of a fence nobody can confirm (S2).
pub async fn admin_unfence(node: &Arc<Node>, request: &UnfenceRequest) -> Result<UnfenceReply, Status> {
    if !request.force || !request.confirmed {
        return Err(Status::invalid_argument(
            "a forced unfence needs --force and --confirm: it raises the epochs and NVFAILs every volume, since the \
             DR partner may have taken over meanwhile (S2, S9)",
        ));
    }
    let state = node.state();
    if state.phase != Phase::Fenced {
        return Err(Status::failed_precondition(format!(
            "node {} is {}, not fenced: nothing to unfence",
            node.node_id(),
            state.phase.name()
        )));
    }
    if !node.awaiting_partner.load(Ordering::Acquire) {
        return Err(Status::failed_precondition(format!(
            "node {} is fenced, but not waiting for its DR partner ({}): a forced unfence does not help",
            node.node_id(),
            state.reason
        )));
    }
    let op = node
        .operations()
        .begin(OperationKind::Unfence, "unfencing", Vec::new())
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    node.unfence.send_replace(true);
    let mut phase = node.subscribe();
    let _ = tokio::time::timeout(node.config().timers.mirror_timeout * 2, async {
        phase.wait_for(|s| s.phase == Phase::Serving || s.phase == Phase::Stopping).await.is_ok()
    })
    .await;
    let serving = node.state().phase == Phase::Serving;
    let errors = if serving {
        Vec::new()
    } else {
        vec![format!("the node is {}: {}", node.state().phase.name(), node.state().reason)]
    };
    let final_state = if serving { OperationState::Successful } else { OperationState::Failed };
    node.operations()
        .finish(op.id, final_state, errors.clone())
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let record = node.operations().list().into_iter().find(|r| r.id == op.id);
    let nvfailed_volumes = node
        .aggregates()
        .iter()
        .flat_map(|a| {
            a.table()
                .volumes
                .iter()
                .filter(|v| v.in_nvfailed_state)
                .map(|v| v.name.clone())
                .collect::<Vec<_>>()
        })
        .collect();
    if !serving {
        return Err(Status::internal(format!("the forced unfence did not complete: {}", errors.join("; "))));
    }
    Ok(UnfenceReply { nvfailed_volumes, operation: record.as_ref().map(crate::operations::to_wire) })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

    use super::*;

    fn plan() -> Plan {
        Plan {
            force_nvfail_all: true,
            negotiated: false,
            aggregates: vec![
                Planned {
                    uuid: Uuid([1; 16]),
                    frozen: Epoch { number: 1, owner: NodeId(1) },
                    new: Epoch { number: 2, owner: NodeId(2) },
                    floor: 17,
                    not_in_sync: Some("out of sync".into()),
                    done: false,
                },
                Planned {
                    uuid: Uuid([2; 16]),
                    frozen: Epoch { number: 4, owner: NodeId(1) },
                    new: Epoch { number: 5, owner: NodeId(2) },
                    floor: 0,
                    not_in_sync: None,
                    done: true,
                },
            ],
        }
    }

    #[test]
    fn a_receiver_with_messages_unstored_vouches_for_nothing() {
        let limit = Duration::from_secs(5);
        let fresh = Some(Duration::from_secs(1));
        let clean = sync_doubts(Some(nvlog::MirrorState::InSync), fresh, 0, limit, 2);
        assert_eq!(clean, SyncDoubts::default());
        let lagging = sync_doubts(Some(nvlog::MirrorState::InSync), fresh, 3, limit, 2);
        assert!(lagging.not_in_sync.is_empty());
        assert_eq!(lagging.unknown.len(), 1, "{lagging:?}");
        assert!(lagging.unknown[0].contains("3 messages of node 2"), "{lagging:?}");
    }

    #[test]
    fn the_replay_doubts_a_resyncing_copy_a_release_above_the_plex_another_epoch_and_a_gap() {
        let complete = ReplayFound {
            receiver: nvlog::MirrorState::InSync,
            released: Lsn(10),
            skipped_for_epoch: 0,
            first_gap: None,
        };
        assert_eq!(replay_doubt(&complete, Lsn(10), 2), None);
        assert_eq!(replay_doubt(&complete, Lsn(12), 2), None, "the plex holds more than was released");
        let resyncing = ReplayFound { receiver: nvlog::MirrorState::Resyncing, ..complete };
        assert!(replay_doubt(&resyncing, Lsn(10), 2).is_some_and(|why| why.contains("resyncing")));
        assert!(replay_doubt(&complete, Lsn(9), 2).is_some_and(|why| why.contains("released")));
        let stamped = ReplayFound { skipped_for_epoch: 1, ..complete };
        assert!(replay_doubt(&stamped, Lsn(10), 2).is_some_and(|why| why.contains("epoch")));
        let gap =
            ReplayFound { first_gap: Some(nvlog::LsnGap { after: Lsn(10), next: Lsn(13) }), ..complete };
        assert!(replay_doubt(&gap, Lsn(10), 2).is_some_and(|why| why.contains("lsns 11..13")));
    }

    #[test]
    fn the_plan_round_trips_and_damage_is_an_error() {
        let plan = plan();
        let bytes = plan.encode();
        assert_eq!(Plan::decode(&bytes).unwrap(), plan);
        for len in 0..bytes.len() {
            assert!(Plan::decode(&bytes[..len]).is_err(), "truncated at {len}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Plan::decode(&longer).is_err());
        let mut seed = 7u64;
        for _ in 0..2000 {
            let mut damaged = bytes.clone();
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let at = (seed >> 33) as usize % damaged.len();
            damaged[at] = (seed >> 13) as u8;
            let _ = Plan::decode(&damaged);
        }
    }

    #[test]
    fn soft_vetoes_stop_unless_overridden_and_hard_ones_always() {
        let soft = veto("soft", "out_of_sync", None, "x");
        let hard = veto("hard", "partner_reachable", None, "y");
        assert!(!vetoed(&[], false));
        assert!(vetoed(std::slice::from_ref(&soft), false));
        assert!(!vetoed(std::slice::from_ref(&soft), true));
        assert!(vetoed(&[soft, hard], true));
    }
}
