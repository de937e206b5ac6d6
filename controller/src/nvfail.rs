//! NVFAIL (DESIGN §9; S9): per-volume options and state, the rules that put volumes in the
//! NVFAILed state, and the admin calls that change options, clear the state and delete volumes.
//!
//! The options and the state live in the volume table (`volume.rs`, entry flags), so they
//! survive restarts and move with the aggregate at a switchover. `Node::volume` refuses an
//! NVFAILed volume, so every request on it fails (gRPC `FAILED_PRECONDITION`, NBD `EIO`) and a new
//! NBD connection is refused, from the moment the table in memory says so.
//!
//! Invariants:
//! - a volume enters the NVFAILed state only by the controller's decision (`Node::enter_nvfail`),
//!   never by an admin call; only an administrator leaves it, with `confirmed`;
//! - the state is durable (the table written and flushed on both plexes) before it is reported
//!   as entered or cleared; the table in memory carries the sequence of the last durable write,
//!   so a failed write never makes the next one overwrite the last good slot;
//! - every table change runs under `Node::admin` (the callers of `enter_nvfail` hold it), so two
//!   changes never start from the same table;
//! - with `nvfail off`, an event that would have NVFAILed the volume is logged at ERROR as a
//!   possible rollback and counted, never silent (S9).

use std::collections::HashMap;

use mc_proto::v1::{DeleteVolumeReply, DeleteVolumeRequest, ModifyVolumeRequest, VolumeInfo};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tonic::Status;

use crate::node::{AggrSlot, BLOCK, DataError, Node};
use crate::volume::{FlagChange, VolumeEntry, VolumeTable};

/// Labels of the entering counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    rule: &'static str,
}

/// NVFAIL counters (registered by the daemon).
#[derive(Clone, Debug, Default)]
pub struct NvfailMetrics {
    entered: Family<RuleLabels, Counter>,
    cleared: Counter,
    possible_rollbacks: Counter,
}

impl NvfailMetrics {
    /// Registers the counters.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "controller_nvfail_entered",
            "Volumes that entered the NVFAILed state, by rule of DESIGN §9 (a to e)",
            self.entered.clone(),
        );
        registry.register(
            "controller_nvfail_cleared",
            "NVFAILed states cleared by an administrator",
            self.cleared.clone(),
        );
        registry.register(
            "controller_nvfail_possible_rollbacks",
            "Volumes with nvfail off that an NVFAIL rule would have NVFAILed (S9)",
            self.possible_rollbacks.clone(),
        );
    }

    /// Volumes that entered the state under `rule` so far.
    pub fn entered(&self, rule: NvfailRule) -> u64 {
        self.entered.get_or_create(&RuleLabels { rule: rule.letter() }).get()
    }

    /// States cleared so far.
    pub fn cleared(&self) -> u64 {
        self.cleared.get()
    }

    /// Possible rollbacks logged so far.
    pub fn possible_rollbacks(&self) -> u64 {
        self.possible_rollbacks.get()
    }
}

/// Which rule of DESIGN §9 NVFAILs a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NvfailRule {
    /// (a) a forced switchover that cannot show the aggregate was in sync.
    NotInSync,
    /// (b) `dr_force_nvfail` is set and a forced switchover happens.
    DrForce,
    /// (c) `--force-nvfail-all`.
    ForceAll,
    /// (d) S8 could not recover the records.
    Unrecoverable,
    /// (e) an operator forced an unfence (S2).
    ForcedUnfence,
}

impl NvfailRule {
    /// The rule's letter in DESIGN §9.
    pub fn letter(self) -> &'static str {
        match self {
            NvfailRule::NotInSync => "a",
            NvfailRule::DrForce => "b",
            NvfailRule::ForceAll => "c",
            NvfailRule::Unrecoverable => "d",
            NvfailRule::ForcedUnfence => "e",
        }
    }

    /// What the rule does to `volume`.
    pub fn verdict(self, volume: &VolumeEntry) -> Verdict {
        if volume.in_nvfailed_state {
            return Verdict::AlreadyNvfailed;
        }
        match self {
            NvfailRule::ForceAll => Verdict::Enter,
            // Rule (b) adds to the others: a volume without the option is not subject to it.
            NvfailRule::DrForce if volume.dr_force_nvfail => Verdict::Enter,
            NvfailRule::DrForce => Verdict::Untouched,
            NvfailRule::NotInSync | NvfailRule::Unrecoverable | NvfailRule::ForcedUnfence => {
                if volume.nvfail { Verdict::Enter } else { Verdict::PossibleRollback }
            }
        }
    }
}

/// What an NVFAIL rule does to one volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It enters the NVFAILed state.
    Enter,
    /// It is NVFAILed already (and stays so).
    AlreadyNvfailed,
    /// `nvfail off`: it stays online, and may have lost acknowledged writes (S9: logged).
    PossibleRollback,
    /// The rule does not apply to it.
    Untouched,
}

/// Why volumes are NVFAILed.
#[derive(Clone, Debug)]
pub struct NvfailCause {
    /// The rule.
    pub rule: NvfailRule,
    /// In words an operator can act on.
    pub why: String,
}

/// The reason status gives for an NVFAILed volume.
fn nvfailed_reason(name: &str) -> String {
    format!(
        "NVFAILed (DESIGN §9): it may have lost acknowledged writes, so it serves no I/O (the \
         controller's log says which rule and why); after checking its data, clear the state with \
         `mcctl volume modify {name} --in-nvfailed-state false --confirm`"
    )
}

/// What status shows of one volume.
pub fn volume_info(aggr: &AggrSlot, volume: &VolumeEntry, offline: &HashMap<String, String>) -> VolumeInfo {
    // Offline wins: clearing the NVFAILed state would not bring such a volume back. A deposed
    // aggregate's (S2) or one a switchover has not exported yet is offline with why.
    let withheld = aggr.deposed();
    let offline = withheld.as_ref().or(offline.get(&volume.name));
    let (state, reason) = match (offline, volume.in_nvfailed_state) {
        (Some(reason), false) => ("offline", reason.clone()),
        (Some(reason), true) => ("offline", format!("{reason}; also {}", nvfailed_reason(&volume.name))),
        (None, true) => ("nvfailed", nvfailed_reason(&volume.name)),
        (None, false) => ("online", String::new()),
    };
    VolumeInfo {
        id: volume.id,
        name: volume.name.clone(),
        aggregate_uuid: aggr.uuid.0.to_vec(),
        size_bytes: volume.size,
        state: state.to_string(),
        reason,
        nvfail: volume.nvfail,
        dr_force_nvfail: volume.dr_force_nvfail,
        in_nvfailed_state: volume.in_nvfailed_state,
    }
}

/// Checks the arguments of `ModifyVolume` that need no node: what changes.
fn modify_change(request: &ModifyVolumeRequest) -> Result<FlagChange, Status> {
    if request.in_nvfailed_state == Some(true) {
        return Err(Status::invalid_argument(
            "--in-nvfailed-state true is refused: entering the NVFAILed state is the controller's decision \
             (DESIGN §9); only false (clearing) is accepted",
        ));
    }
    let change = FlagChange {
        nvfail: request.nvfail,
        dr_force_nvfail: request.dr_force_nvfail,
        in_nvfailed_state: request.in_nvfailed_state,
    };
    if change == FlagChange::default() {
        return Err(Status::invalid_argument(
            "nothing to change: give --nvfail, --dr-force-nvfail or --in-nvfailed-state false",
        ));
    }
    if change.in_nvfailed_state == Some(false) && !request.confirmed {
        return Err(Status::failed_precondition(format!(
            "clearing the NVFAILed state of volume {} accepts that it may have lost acknowledged writes \
             (DESIGN §9): check its data, then add --confirm",
            request.name
        )));
    }
    Ok(change)
}

/// The aggregate holding volume `name`, found in the tables directly (an NVFAILed or offline
/// volume is found too, unlike `Node::volume`), and refused if this node was deposed from it.
fn find(node: &Node, name: &str) -> Result<std::sync::Arc<AggrSlot>, Status> {
    let aggr =
        node.aggregates().into_iter().find(|a| a.table().volumes.iter().any(|v| v.name == name)).ok_or_else(
            || Status::not_found(format!("no volume named {name:?} on node {}", node.node_id())),
        )?;
    if let Some(why) = aggr.deposed() {
        return Err(Status::failed_precondition(format!(
            "volume {name} is not changed: this node no longer owns its aggregate ({why})"
        )));
    }
    Ok(aggr)
}

/// Writes `table` durably, then makes it the aggregate's table.
async fn replace_table(aggr: &AggrSlot, table: VolumeTable) -> Result<(), String> {
    Node::write_table(&aggr.aggregate, &table).await?;
    *aggr.table() = table;
    Ok(())
}

/// `Admin.ModifyVolume`.
pub async fn modify_volume(node: &Node, request: &ModifyVolumeRequest) -> Result<VolumeInfo, Status> {
    let change = modify_change(request)?;
    let _admin = node.admin.lock().await;
    node.check_serving().map_err(|e| crate::data::status(&e))?;
    let name = request.name.as_str();
    let aggr = find(node, name)?;
    let (table, before) = {
        let table = aggr.table().clone();
        let before = table.volumes.iter().find(|v| v.name == name).cloned();
        (table, before)
    };
    let before = before.ok_or_else(|| Status::not_found(format!("no volume named {name:?}")))?;
    let changed = table.with_flags(name, change).map_err(|e| Status::not_found(e.to_string()))?;
    let after = changed
        .volumes
        .iter()
        .find(|v| v.name == name)
        .cloned()
        .ok_or_else(|| Status::internal(format!("volume {name} vanished from its changed table")))?;
    if after != before {
        replace_table(&aggr, changed).await.map_err(|e| Status::internal(format!("volume {name}: {e}")))?;
        let aggregate = aggr.table().name.clone();
        if before.in_nvfailed_state && !after.in_nvfailed_state {
            node.nvfail_metrics.cleared.inc();
            tracing::warn!(
                node = node.node_id(),
                aggregate,
                volume = name,
                "NVFAILed state cleared by the operator: the volume serves I/O again and may lack acknowledged \
                 writes (DESIGN §9)"
            );
        }
        if before.nvfail != after.nvfail || before.dr_force_nvfail != after.dr_force_nvfail {
            tracing::info!(
                node = node.node_id(),
                aggregate,
                volume = name,
                nvfail = after.nvfail,
                dr_force_nvfail = after.dr_force_nvfail,
                "volume NVFAIL options changed"
            );
        }
    }
    Ok(volume_info(&aggr, &after, &node.offline_reasons()))
}

/// `Admin.DeleteVolume`.
pub async fn delete_volume(node: &Node, request: &DeleteVolumeRequest) -> Result<DeleteVolumeReply, Status> {
    let name = request.name.as_str();
    if !request.confirmed {
        return Err(Status::failed_precondition(format!(
            "deleting volume {name} discards its data for good: add --confirm"
        )));
    }
    let _admin = node.admin.lock().await;
    node.check_serving().map_err(|e| crate::data::status(&e))?;
    let aggr = find(node, name)?;
    let table = aggr.table().clone();
    let entry = table
        .volumes
        .iter()
        .find(|v| v.name == name)
        .cloned()
        .ok_or_else(|| Status::not_found(format!("no volume named {name:?}")))?;
    let without = table.without_volume(name).map_err(|e| Status::not_found(e.to_string()))?;
    replace_table(&aggr, without).await.map_err(|e| Status::internal(format!("volume {name}: {e}")))?;
    // From here no new request finds the volume. Requests that found it before hold their
    // range locks: wait for them, so none lands after the extent may have been handed out again.
    let first = entry.base / BLOCK;
    let end = (entry.base + entry.size).div_ceil(BLOCK);
    let drained = node.locks.lock((aggr.index, first), end).await;
    // Its cached blocks are dropped rather than destaged: a volume created later in the extent
    // then reads the same before and after a restart (replay skips the deleted volume's
    // records). A CP running now may still destage its frozen blocks; that is the same disk
    // content either way.
    node.lock_cache()
        .active
        .retain(|(index, block), _| *index != aggr.index || !(first..end).contains(block));
    drop(drained);
    // An offline reason names the volume; a later volume of the same name must not inherit it.
    node.offline.lock().expect("offline lock").remove(name);
    tracing::warn!(
        node = node.node_id(),
        aggregate = %aggr.table().name,
        volume = name,
        id = entry.id,
        size = entry.size,
        "volume deleted by the operator (its id is never reused)"
    );
    Ok(DeleteVolumeReply {})
}

impl Node {
    /// The NVFAIL counters.
    pub fn nvfail_metrics(&self) -> &NvfailMetrics {
        &self.nvfail_metrics
    }

    /// NVFAILs the volumes of `aggr` (all, or those with the ids given) for `cause`, durably in
    /// its volume table; returns the names NVFAILed (those NVFAILed before included). The
    /// caller holds `Node::admin`.
    pub(crate) async fn enter_nvfail(
        &self,
        aggr: &AggrSlot,
        volume_ids: Option<&[u32]>,
        cause: &NvfailCause,
    ) -> Result<Vec<String>, DataError> {
        let rule = cause.rule;
        let table = aggr.table().clone();
        let aggregate = table.name.clone();
        if let Some(why) = aggr.deposed().filter(|_| aggr.is_deposed()) {
            // S2: a deposed node writes nothing of the aggregate; the new owner decides.
            return Err(DataError::Invalid(format!(
                "aggregate {aggregate}: NVFAIL not recorded, this node no longer owns it ({why})"
            )));
        }
        if let Some(ids) = volume_ids {
            for id in ids.iter().filter(|id| table.volumes.iter().all(|v| v.id != **id)) {
                tracing::debug!(node = self.node_id(), aggregate, volume_id = id, "no such volume to NVFAIL");
            }
        }
        let mut names = Vec::new();
        let mut entering = Vec::new();
        for volume in table.volumes.iter().filter(|v| volume_ids.is_none_or(|ids| ids.contains(&v.id))) {
            match rule.verdict(volume) {
                Verdict::Enter => {
                    entering.push(volume.id);
                    names.push(volume.name.clone());
                }
                Verdict::AlreadyNvfailed => names.push(volume.name.clone()),
                Verdict::PossibleRollback => {
                    self.nvfail_metrics.possible_rollbacks.inc();
                    tracing::error!(
                        node = self.node_id(),
                        aggregate,
                        volume = volume.name,
                        rule = rule.letter(),
                        why = %cause.why,
                        "possible rollback: the volume has nvfail off, so it stays online although it may have \
                         lost acknowledged writes (S9); check its data"
                    );
                }
                Verdict::Untouched => {}
            }
        }
        if entering.is_empty() {
            return Ok(names);
        }
        let changed = table
            .with_nvfailed(|v| entering.contains(&v.id), &aggregate)
            .map_err(|e| DataError::Invalid(e.to_string()))?;
        if let Err(e) = Node::write_table(&aggr.aggregate, &changed).await {
            // Refuse I/O anyway (S9 before availability), but keep the sequence of the last
            // durable table so the next write does not overwrite its slot.
            let mut in_memory = changed;
            in_memory.sequence = table.sequence;
            *aggr.table() = in_memory;
            tracing::error!(
                node = self.node_id(),
                aggregate,
                volumes = ?names,
                rule = rule.letter(),
                why = %cause.why,
                "NVFAIL could not be recorded in the volume table: {e}; the volumes refuse I/O until restart"
            );
            return Err(DataError::Plex(format!("aggregate {aggregate}: record NVFAIL: {e}")));
        }
        *aggr.table() = changed;
        for volume in table.volumes.iter().filter(|v| entering.contains(&v.id)) {
            self.nvfail_metrics.entered.get_or_create(&RuleLabels { rule: rule.letter() }).inc();
            tracing::error!(
                node = self.node_id(),
                aggregate,
                volume = volume.name,
                rule = rule.letter(),
                why = %cause.why,
                "volume NVFAILed: it serves no I/O until an administrator checks it and runs \
                 `mcctl volume modify {} --in-nvfailed-state false --confirm` (DESIGN §9)",
                volume.name
            );
        }
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn volume(nvfail: bool, dr_force_nvfail: bool, in_nvfailed_state: bool) -> VolumeEntry {
        VolumeEntry {
            id: 1,
            name: "v".into(),
            base: 1 << 20,
            size: 1 << 20,
            nvfail,
            dr_force_nvfail,
            in_nvfailed_state,
        }
    }

    /// DESIGN §9's rules as a table: a volume with `nvfail off` silently left online by rules
    /// (a), (d), (e) — or one NVFAILed by (b) without `dr_force_nvfail` — is what it prevents.
    #[test]
    fn rules_decide_as_the_table_says() {
        use NvfailRule::{DrForce, ForceAll, ForcedUnfence, NotInSync, Unrecoverable};
        use Verdict::{AlreadyNvfailed, Enter, PossibleRollback, Untouched};
        // (nvfail, dr_force_nvfail): verdicts for a, b, c, d, e.
        let rows = [
            ((true, false), [Enter, Untouched, Enter, Enter, Enter]),
            ((true, true), [Enter, Enter, Enter, Enter, Enter]),
            ((false, false), [PossibleRollback, Untouched, Enter, PossibleRollback, PossibleRollback]),
            ((false, true), [PossibleRollback, Enter, Enter, PossibleRollback, PossibleRollback]),
        ];
        let rules = [NotInSync, DrForce, ForceAll, Unrecoverable, ForcedUnfence];
        for ((nvfail, force), verdicts) in rows {
            for (rule, expected) in rules.iter().zip(verdicts) {
                assert_eq!(
                    rule.verdict(&volume(nvfail, force, false)),
                    expected,
                    "{rule:?} {nvfail} {force}"
                );
                // An NVFAILed volume stays so, whatever the rule and options.
                assert_eq!(rule.verdict(&volume(nvfail, force, true)), AlreadyNvfailed);
            }
        }
        let letters: Vec<&str> = rules.iter().map(|r| r.letter()).collect();
        assert_eq!(letters, ["a", "b", "c", "d", "e"]);
    }

    fn request(in_nvfailed_state: Option<bool>, confirmed: bool) -> ModifyVolumeRequest {
        ModifyVolumeRequest {
            cluster_id: vec![],
            name: "v".into(),
            nvfail: None,
            dr_force_nvfail: None,
            in_nvfailed_state,
            confirmed,
        }
    }

    /// Entering the state is never an operator's call, and clearing needs the confirmation that
    /// acknowledged writes may be lost (DESIGN §9).
    #[test]
    fn modify_arguments_are_checked() {
        let refused = modify_change(&request(Some(true), true)).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        let refused = modify_change(&request(Some(false), false)).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
        assert!(refused.message().contains("--confirm"), "{refused:?}");
        let refused = modify_change(&request(None, true)).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        let change = modify_change(&request(Some(false), true)).unwrap();
        assert_eq!(change.in_nvfailed_state, Some(false));
        let options = ModifyVolumeRequest { nvfail: Some(false), ..request(None, false) };
        assert_eq!(modify_change(&options).unwrap().nvfail, Some(false));
    }

    /// An NVFAILed volume is refused with a message that says how to clear it, over gRPC as a
    /// precondition (not a transient `UNAVAILABLE` that clients retry).
    #[test]
    fn nvfailed_errors_say_how_to_clear() {
        let e = DataError::NvFailed { volume: "v".into(), reason: "why".into() };
        let status = crate::data::status(&e);
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert!(status.message().contains("mcctl volume modify v --in-nvfailed-state false --confirm"));
        assert!(nvfailed_reason("v").contains("mcctl volume modify v --in-nvfailed-state false --confirm"));
    }

    #[test]
    fn metrics_count_by_rule() {
        let metrics = NvfailMetrics::default();
        metrics.entered.get_or_create(&RuleLabels { rule: NvfailRule::DrForce.letter() }).inc();
        assert_eq!(metrics.entered(NvfailRule::DrForce), 1);
        assert_eq!(metrics.entered(NvfailRule::NotInSync), 0);
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("controller_nvfail_entered_total{rule=\"b\"} 1"), "{text}");
        assert!(text.contains("controller_nvfail_cleared_total 0"), "{text}");
        assert!(text.contains("controller_nvfail_possible_rollbacks_total 0"), "{text}");
    }
}
