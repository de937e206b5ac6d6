//! The gRPC `Mediator` service (DESIGN §8, §10): each call becomes a `decide::Event`, the
//! decision core handles it at the mediator's monotonic time (since the daemon started), and
//! its actions are executed in order: `Persist` writes the state file, `Reply` is the answer,
//! `Refuse` is `FAILED_PRECONDITION` with the reason, `Alert` is logged and counted.
//!
//! Status codes (DESIGN §8): malformed input (missing identity, a uuid not 16 bytes, an
//! unknown mode or mirror state, a sender 0) is `INVALID_ARGUMENT`; a call for another
//! cluster or addressed to a node other than the mediator (0) is `FAILED_PRECONDITION`, as the
//! controller's services answer misdirected calls; a refusal of the decision core and a stale
//! heartbeat are `FAILED_PRECONDITION`; a state that could not be made durable is
//! `UNAVAILABLE`.
//!
//! Invariants:
//! - a reply is sent only after every state change it follows is durable: the file is written
//!   (and fsynced) under the same lock as the decision, before the answer leaves; one lock
//!   serializes decisions and writes, so two writes never race and the file only moves forward;
//! - after a failed write the store is latched (S10): every call that could change or reveal
//!   the state is answered `UNAVAILABLE` until the daemon restarts, the health status turns
//!   `NOT_SERVING`, and nothing from the failed change is ever sent;
//! - the file also records whether the state is lost and not yet rebuilt (rule 5), so a
//!   restart in the middle of a rebuild does not end it;
//! - a stale heartbeat renews nothing: it gets `FAILED_PRECONDITION`, never a lease.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mc_proto::v1::mediator_server::Mediator as MediatorRpc;
use mc_proto::v1::{
    AggregateEpoch, AusoView, ConfirmDownReply, ConfirmDownRequest, ConfirmGrantRequest, HeartbeatReply,
    HeartbeatRequest, Identity, MediatorAggregateView, MediatorGrant, MediatorNodeView, MediatorShowReply,
    MediatorShowRequest, MediatorSwitchoverRequest, RaiseEpochsRequest, RecordDropRequest,
};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::decide::{
    self, Action, AggregateId, Diagnosis, Epoch, Event, Grant, Mode, NodeId, Now, OwnedReport, PartnerView,
    ReceivedReport, Report, Site,
};
use crate::metrics::{GrantLabels, Metrics, NodeLabels};
use crate::store::Store;

/// The health service name of this service.
pub const SERVICE_NAME: &str = "mc.v1.Mediator";

/// The decision core and what the file last recorded of it.
#[derive(Debug)]
struct Core {
    mediator: decide::Mediator,
    /// Whether the file records the state as lost; `None`: no readable file yet.
    saved_lost: Option<bool>,
}

#[derive(Debug)]
struct Shared {
    cluster: [u8; 16],
    started: Instant,
    /// The configured controllers.
    nodes: BTreeSet<NodeId>,
    observer: bool,
    core: tokio::sync::Mutex<Core>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    health: Option<tonic_health::server::HealthReporter>,
}

/// The service; cheap to clone.
#[derive(Clone, Debug)]
pub struct MediatorService {
    shared: Arc<Shared>,
}

/// What one event came to.
#[derive(Debug)]
struct Applied {
    reply: Option<decide::Reply>,
    lost: bool,
}

fn invalid(message: impl Into<String>) -> Status {
    Status::invalid_argument(message.into())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `A` or `B`.
pub fn site_name(site: Site) -> &'static str {
    if site.0 == 0 { "A" } else { "B" }
}

/// The mode as the wire and ONTAP name it.
pub fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Normal => "normal",
        Mode::Switchover => "switchover",
        Mode::WaitingForSwitchback => "waiting-for-switchback",
        Mode::PartialSwitchover => "partial-switchover",
        Mode::PartialSwitchback => "partial-switchback",
    }
}

/// A mode from the wire; unknown names are refused.
pub fn parse_mode(text: &str) -> Result<Mode, Status> {
    [
        Mode::Normal,
        Mode::Switchover,
        Mode::WaitingForSwitchback,
        Mode::PartialSwitchover,
        Mode::PartialSwitchback,
    ]
    .into_iter()
    .find(|m| mode_name(*m) == text)
    .ok_or_else(|| {
        invalid(format!(
            "mode {text:?} is none of normal, switchover, waiting-for-switchback, partial-switchover, \
                 partial-switchback"
        ))
    })
}

/// A mirror state from the wire (`field` names it in the message). `UNSPECIFIED` (what a
/// controller sends for a partition that holds no mirror state yet) and `OFFLINE` (the writer
/// is known to be down) are both "not in sync": any report may lower the record, none may
/// raise it without saying `IN_SYNC` (rule 3). A value the enum does not know is refused.
pub fn parse_mirror_state(value: i32, field: &str) -> Result<decide::MirrorState, Status> {
    use mc_proto::v1::MirrorState as Wire;
    match Wire::try_from(value) {
        Ok(Wire::InSync) => Ok(decide::MirrorState::InSync),
        Ok(Wire::Resyncing) => Ok(decide::MirrorState::Resyncing),
        Ok(Wire::OutOfSync | Wire::Offline | Wire::Unspecified) => Ok(decide::MirrorState::OutOfSync),
        Err(_) => Err(invalid(format!("{field}: {value} is not a mirror state"))),
    }
}

fn uuid(bytes: &[u8], field: &str) -> Result<AggregateId, Status> {
    <[u8; 16]>::try_from(bytes)
        .map(AggregateId)
        .map_err(|_| invalid(format!("{field}: an aggregate uuid is 16 bytes, not {}", bytes.len())))
}

fn aggregate_epoch(wire: &AggregateEpoch, field: &str) -> Result<(AggregateId, Epoch), Status> {
    let id = uuid(&wire.aggregate_uuid, &format!("{field}.aggregate_uuid"))?;
    let epoch = wire.epoch.as_ref().ok_or_else(|| invalid(format!("{field}.epoch is missing")))?;
    Ok((id, Epoch { number: epoch.number, owner: NodeId(epoch.owner_node) }))
}

fn wire_aggregate_epoch((id, epoch): &(AggregateId, Epoch)) -> AggregateEpoch {
    AggregateEpoch {
        aggregate_uuid: id.0.to_vec(),
        epoch: Some(mc_proto::v1::Epoch { number: epoch.number, owner_node: epoch.owner.0 }),
    }
}

fn wire_grant(grant: &Grant) -> MediatorGrant {
    MediatorGrant {
        to_node: grant.to.0,
        from_site: site_name(grant.from).to_string(),
        epochs: grant.epochs.iter().map(wire_aggregate_epoch).collect(),
        automatic: grant.automatic,
        nvfail: grant.nvfail,
    }
}

fn wire_reply(reply: &decide::Reply) -> HeartbeatReply {
    HeartbeatReply {
        lease_ms: millis(reply.lease),
        epochs: reply.epochs.iter().map(wire_aggregate_epoch).collect(),
        state_version: reply.state_version,
        grant: reply.grant.as_ref().map(wire_grant),
        state_lost: reply.state_lost,
        mirror_intact: reply.mirror_intact.iter().map(|id| id.0.to_vec()).collect(),
    }
}

/// The diagnosis for `mcctl mediator show`: the short names of `mediator.proto` first.
pub fn diagnosis_text(diagnosis: Diagnosis) -> String {
    match diagnosis {
        Diagnosis::Healthy => format!("healthy: {}", decide::describe(diagnosis)),
        Diagnosis::NoReports => format!("no reports: {}", decide::describe(diagnosis)),
        _ => decide::describe(diagnosis),
    }
}

/// A heartbeat as the decision core reads it; every field checked (`sender` is the checked
/// identity's sender).
pub fn report(sender: NodeId, request: &HeartbeatRequest) -> Result<Report, Status> {
    let mut partners = Vec::with_capacity(request.partners.len());
    for (i, p) in request.partners.iter().enumerate() {
        if p.node == 0 || NodeId(p.node) == sender {
            return Err(invalid(format!(
                "partners[{i}].node {} is not a partner of node {}",
                p.node, sender.0
            )));
        }
        if partners.iter().any(|v: &PartnerView| v.node.0 == p.node) {
            return Err(invalid(format!("partners[{i}]: node {} is listed twice", p.node)));
        }
        partners.push(PartnerView {
            node: NodeId(p.node),
            heard_age: p.heard.then(|| Duration::from_millis(p.heard_age_ms)),
            round_trip_age: p.round_trip.then(|| Duration::from_millis(p.round_trip_age_ms)),
        });
    }
    let mut owned = Vec::with_capacity(request.owned.len());
    for (i, o) in request.owned.iter().enumerate() {
        let field = format!("owned[{i}]");
        let wire = o.epoch.as_ref().ok_or_else(|| invalid(format!("{field}.epoch is missing")))?;
        let (aggregate, epoch) = aggregate_epoch(wire, &format!("{field}.epoch"))?;
        // Only the owner's word counts as the owner's (rule 3 and the in-sync record).
        if epoch.owner != sender {
            return Err(invalid(format!(
                "{field}: node {} reports an aggregate whose epoch names node {} as its owner",
                sender.0, epoch.owner.0
            )));
        }
        if owned.iter().any(|r: &OwnedReport| r.aggregate == aggregate) {
            return Err(invalid(format!("{field}: the aggregate is listed twice")));
        }
        owned.push(OwnedReport {
            aggregate,
            epoch,
            mirror: parse_mirror_state(o.mirror, &format!("{field}.mirror"))?,
            receiver_generation: o.receiver_generation,
            plexes_normal: o.plexes_normal,
        });
    }
    let mut received = Vec::with_capacity(request.received.len());
    for (i, r) in request.received.iter().enumerate() {
        if r.writer == 0 || NodeId(r.writer) == sender {
            return Err(invalid(format!("received[{i}].writer {} is not another node", r.writer)));
        }
        received.push(ReceivedReport {
            writer: NodeId(r.writer),
            partition_generation: r.partition_generation,
            state: parse_mirror_state(r.state, &format!("received[{i}].state"))?,
        });
    }
    let epochs_seen = request
        .epochs_seen
        .iter()
        .enumerate()
        .map(|(i, e)| aggregate_epoch(e, &format!("epochs_seen[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Report {
        node: sender,
        log_generation: request.log_generation,
        sequence: request.sequence,
        state_version: request.state_version,
        uptime: Duration::from_millis(request.uptime_ms),
        mode: parse_mode(&request.mode)?,
        fenced: request.fenced,
        partners,
        owned,
        received,
        epochs_seen,
    })
}

impl MediatorService {
    /// The service over `mediator`, persisting to `store`. `saved_lost`: what the file read at
    /// start records (`None`: no readable file). `health` is told `NOT_SERVING` when a write
    /// fails.
    pub fn new(
        cluster: [u8; 16],
        mediator: decide::Mediator,
        saved_lost: Option<bool>,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        health: Option<tonic_health::server::HealthReporter>,
    ) -> MediatorService {
        let config = mediator.config();
        let nodes = config.controllers.iter().map(|c| c.node).collect();
        let observer = config.observer;
        metrics.observe(mediator.is_lost(), &mediator.node_views(Duration::ZERO));
        MediatorService {
            shared: Arc::new(Shared {
                cluster,
                started: Instant::now(),
                nodes,
                observer,
                core: tokio::sync::Mutex::new(Core { mediator, saved_lost }),
                store,
                metrics,
                health,
            }),
        }
    }

    /// The mediator's time: since the service was built (the daemon's start).
    fn now(&self) -> Now {
        self.shared.started.elapsed()
    }

    fn check_cluster(&self, cluster: &[u8]) -> Result<(), Status> {
        if cluster.len() != 16 {
            return Err(invalid(format!("cluster_id is {} bytes, not 16", cluster.len())));
        }
        if cluster != self.shared.cluster {
            return Err(Status::failed_precondition("this mediator belongs to another cluster"));
        }
        Ok(())
    }

    /// Checks the identity of a controller's call and returns its sender.
    fn sender(&self, identity: Option<&Identity>) -> Result<NodeId, Status> {
        let identity = identity.ok_or_else(|| invalid("identity is missing"))?;
        self.check_cluster(&identity.cluster_id)?;
        if identity.sender_node == 0 {
            return Err(invalid("identity.sender_node is 0, which is the mediator"));
        }
        if identity.receiver_node != 0 {
            return Err(Status::failed_precondition(format!(
                "the call is for node {}; the mediator is node 0",
                identity.receiver_node
            )));
        }
        Ok(NodeId(identity.sender_node))
    }

    fn counted<T>(&self, result: Result<T, Status>) -> Result<T, Status> {
        if let Err(status) = &result {
            match status.code() {
                tonic::Code::InvalidArgument => self.shared.metrics.invalid_requests.inc(),
                tonic::Code::FailedPrecondition => self.shared.metrics.refusals.inc(),
                _ => 0,
            };
        }
        result
    }

    fn alert(&self, text: &str) {
        self.shared.metrics.alerts.inc();
        tracing::warn!(alert = %text, "mediator alert");
    }

    fn unavailable(&self) -> Status {
        Status::unavailable(format!(
            "the mediator could not persist its state to {} and answers nothing until it is restarted",
            self.shared.store.path().display()
        ))
    }

    /// Writes the state, durably, before anything that follows is sent.
    async fn persist(&self, core: &mut Core) -> Result<(), Status> {
        let state = core.mediator.state().clone();
        let lost = core.mediator.is_lost();
        let store = self.shared.store.clone();
        let written =
            tokio::task::spawn_blocking(move || store.save(&state, lost)).await.unwrap_or_else(|e| {
                Err(crate::store::StoreError::Io {
                    path: self.shared.store.path().display().to_string(),
                    source: std::io::Error::other(format!("the writing task failed: {e}")),
                })
            });
        match written {
            Ok(()) => {
                core.saved_lost = Some(lost);
                Ok(())
            }
            Err(e) => {
                self.shared.metrics.persist_failures.inc();
                tracing::error!(
                    error = %e,
                    "the mediator state could not be written: the mediator stops answering (S10); fix the \
                     state directory and restart it"
                );
                if let Some(health) = &self.shared.health {
                    health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
                    health.set_service_status(SERVICE_NAME, tonic_health::ServingStatus::NotServing).await;
                }
                Err(self.unavailable())
            }
        }
    }

    /// Runs `actions` in order; returns the reply, or the refusal as a status.
    async fn execute(&self, core: &mut Core, actions: Vec<Action>) -> Result<Option<decide::Reply>, Status> {
        let mut reply = None;
        let mut refusal = None;
        for action in actions {
            match action {
                // Nothing after a failed write is sent or logged as done: the change it carried
                // may not be durable.
                Action::Persist => self.persist(core).await?,
                Action::Reply(r) => reply = Some(r),
                Action::Refuse { to, reason } => {
                    tracing::info!(node = to.0, %reason, "refused");
                    refusal = Some(reason);
                }
                Action::Alert(text) => self.alert(&text),
            }
        }
        // The lost flag can change without a state change (an operator's ConfirmDown).
        if core.saved_lost != Some(core.mediator.is_lost()) {
            self.persist(core).await?;
        }
        match refusal {
            Some(reason) => Err(Status::failed_precondition(reason)),
            None => Ok(reply),
        }
    }

    /// Hands `event` to the decision core and executes its actions, to the end even when the
    /// caller goes away: a cancelled call (a deadline, a dropped connection) must not release
    /// the core lock while its state write still runs, or the next write would race it (S10).
    async fn apply(&self, event: Event) -> Result<Applied, Status> {
        let this = self.clone();
        tokio::spawn(async move { this.apply_to_end(event).await }.in_current_span())
            .await
            .map_err(|e| Status::internal(format!("the request's task failed: {e}")))?
    }

    async fn apply_to_end(&self, event: Event) -> Result<Applied, Status> {
        let mut core = self.shared.core.lock().await;
        if self.shared.store.is_failed() {
            return Err(self.unavailable());
        }
        // Taken under the lock, so the core sees its time only move forward.
        let now = self.now();
        let before = core.mediator.state().grants.clone();
        let actions = core.mediator.handle(now, event);
        let result = self.execute(&mut core, actions).await;
        // A grant whose write failed was never issued: it is neither sent nor counted.
        let durable = !self.shared.store.is_failed();
        for grant in core.mediator.state().grants.iter().filter(|g| durable && !before.contains(g)) {
            let kind = if grant.automatic { "automatic" } else { "manual" };
            self.shared.metrics.grants.get_or_create(&GrantLabels { kind }).inc();
        }
        let lost = core.mediator.is_lost();
        self.shared.metrics.observe(lost, &core.mediator.node_views(now));
        Ok(Applied { reply: result?, lost })
    }

    fn answer(applied: Applied, what: &str) -> Result<Response<HeartbeatReply>, Status> {
        match applied.reply {
            Some(reply) => Ok(Response::new(wire_reply(&reply))),
            None => Err(Status::internal(format!("the decision core did not answer the {what}"))),
        }
    }

    /// Time passes: the decision core's alerts (a changed diagnosis) are logged and counted;
    /// the gauges are refreshed.
    pub async fn tick(&self) {
        let mut core = self.shared.core.lock().await;
        let now = self.now();
        let actions = core.mediator.tick(now);
        if self.shared.store.is_failed() {
            for action in actions {
                if let Action::Alert(text) = action {
                    self.alert(&text);
                }
            }
        } else {
            for action in actions {
                match action {
                    Action::Alert(text) => self.alert(&text),
                    Action::Persist => {
                        let _ = self.persist(&mut core).await;
                    }
                    other => tracing::warn!(?other, "a tick produced an action with nobody to send it to"),
                }
            }
        }
        self.shared.metrics.observe(core.mediator.is_lost(), &core.mediator.node_views(now));
    }

    /// Calls `tick` every `interval` until `stop` turns true.
    pub async fn run_ticks(self, interval: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // The stop check holds no watch guard across the tick's await (it is not `Send`).
            let stopped = tokio::select! {
                _ = ticks.tick() => false,
                _ = stop.wait_for(|stop| *stop) => true,
            };
            if stopped {
                return;
            }
            self.tick().await;
        }
    }

    async fn heartbeat_inner(&self, request: HeartbeatRequest) -> Result<Response<HeartbeatReply>, Status> {
        let node = self.sender(request.identity.as_ref())?;
        if self.shared.nodes.contains(&node) {
            self.shared.metrics.heartbeats.get_or_create(&NodeLabels { node: node.0 }).inc();
        }
        let report = report(node, &request)?;
        let applied = self.apply(Event::Report(report)).await?;
        if applied.reply.is_none() {
            // Ignored by the core: older than (or the same as) a report already applied.
            return Err(Status::failed_precondition(format!(
                "stale report: node {}'s report (log generation {}, sequence {}) is not newer than one \
                 already applied; it renews nothing",
                node.0, request.log_generation, request.sequence
            )));
        }
        MediatorService::answer(applied, "heartbeat")
    }

    async fn record_drop_inner(
        &self,
        request: RecordDropRequest,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let node = self.sender(request.identity.as_ref())?;
        let aggregate = uuid(&request.aggregate_uuid, "aggregate_uuid")?;
        tracing::info!(aggregate = %hex(&aggregate.0), "drop recorded");
        let stamp = (request.log_generation, request.sequence);
        let plex_only = request.plex_only;
        let applied = self.apply(Event::RecordDrop { node, aggregate, stamp, plex_only }).await?;
        MediatorService::answer(applied, "drop record")
    }

    async fn request_switchover_inner(
        &self,
        request: MediatorSwitchoverRequest,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let node = self.sender(request.identity.as_ref())?;
        tracing::warn!(override_in_sync = request.override_in_sync, "manual forced switchover requested");
        let event = Event::ManualSwitchover { node, override_in_sync: request.override_in_sync };
        let applied = self.apply(event).await?;
        MediatorService::answer(applied, "switchover request")
    }

    async fn confirm_grant_inner(
        &self,
        request: ConfirmGrantRequest,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let node = self.sender(request.identity.as_ref())?;
        let applied = self.apply(Event::ConfirmGrant { node }).await?;
        MediatorService::answer(applied, "grant confirmation")
    }

    async fn raise_epochs_inner(
        &self,
        request: RaiseEpochsRequest,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let node = self.sender(request.identity.as_ref())?;
        let mut aggregates = Vec::with_capacity(request.aggregates.len());
        for (i, raise) in request.aggregates.iter().enumerate() {
            let id = uuid(&raise.aggregate_uuid, &format!("aggregates[{i}].aggregate_uuid"))?;
            if raise.owner == 0 {
                return Err(invalid(format!("aggregates[{i}].owner is 0")));
            }
            aggregates.push((id, NodeId(raise.owner)));
        }
        let reason: String = request.reason.chars().take(200).collect();
        tracing::warn!(aggregates = aggregates.len(), %reason, "a controller asks for new epochs");
        let applied = self.apply(Event::RaiseEpochs { node, aggregates, reason }).await?;
        MediatorService::answer(applied, "epoch raise")
    }

    async fn confirm_down_inner(
        &self,
        request: ConfirmDownRequest,
    ) -> Result<Response<ConfirmDownReply>, Status> {
        self.check_cluster(&request.cluster_id)?;
        if request.nodes.is_empty() {
            return Err(invalid("nodes is empty: name the controllers confirmed down"));
        }
        let mut nodes = Vec::with_capacity(request.nodes.len());
        for (i, node) in request.nodes.iter().enumerate() {
            if !self.shared.nodes.contains(&NodeId(*node)) {
                return Err(invalid(format!("nodes[{i}]: node {node} is not configured here")));
            }
            nodes.push(NodeId(*node));
        }
        tracing::warn!(nodes = ?request.nodes, "an operator confirms controllers down (rule 5)");
        let applied = self.apply(Event::ConfirmDown { nodes }).await?;
        Ok(Response::new(ConfirmDownReply { state_lost: applied.lost }))
    }

    async fn show_inner(&self, request: MediatorShowRequest) -> Result<Response<MediatorShowReply>, Status> {
        self.check_cluster(&request.cluster_id)?;
        let core = self.shared.core.lock().await;
        if self.shared.store.is_failed() {
            // What memory holds may be ahead of the file.
            return Err(self.unavailable());
        }
        let now = self.now();
        let mediator = &core.mediator;
        let state = mediator.state();
        let nodes = mediator
            .node_views(now)
            .into_iter()
            .map(|v| MediatorNodeView {
                node: v.node.0,
                site: site_name(v.site).to_string(),
                heard: v.heard_ago.is_some(),
                heard_ms_ago: v.heard_ago.map_or(0, millis),
                mode: v.mode.map_or_else(String::new, |(mode, _)| mode_name(mode).to_string()),
                fenced: v.mode.is_some_and(|(_, fenced)| fenced),
            })
            .collect();
        let aggregates = state
            .aggregates
            .iter()
            .map(|(id, record)| MediatorAggregateView {
                uuid: id.0.to_vec(),
                epoch: Some(mc_proto::v1::Epoch {
                    number: record.epoch.number,
                    owner_node: record.epoch.owner.0,
                }),
                in_sync: record.in_sync(),
                mirror_intact: record.mirror_intact,
            })
            .collect();
        let auso = mediator
            .auso_status(now)
            .into_iter()
            .map(|(site, status)| AusoView {
                site: site_name(site).to_string(),
                enabled: status.is_ok(),
                reason: status.err().unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(MediatorShowReply {
            diagnosis: diagnosis_text(mediator.diagnose(now)),
            observer: self.shared.observer,
            state_lost: mediator.is_lost(),
            state_version: state.version,
            nodes,
            aggregates,
            auso,
            last_decision: mediator.last_decision().unwrap_or_default().to_string(),
            pending_grants: state.grants.iter().map(wire_grant).collect(),
        }))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn span(method: &'static str, identity: Option<&Identity>) -> tracing::Span {
    let node = identity.map_or(0, |i| i.sender_node);
    tracing::info_span!("rpc", method, node)
}

#[tonic::async_trait]
impl MediatorRpc for MediatorService {
    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let request = request.into_inner();
        let span = span("Heartbeat", request.identity.as_ref());
        let result = self.heartbeat_inner(request).instrument(span).await;
        self.counted(result)
    }

    async fn record_drop(
        &self,
        request: Request<RecordDropRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let request = request.into_inner();
        let span = span("RecordDrop", request.identity.as_ref());
        let result = self.record_drop_inner(request).instrument(span).await;
        self.counted(result)
    }

    async fn request_switchover(
        &self,
        request: Request<MediatorSwitchoverRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let request = request.into_inner();
        let span = span("RequestSwitchover", request.identity.as_ref());
        let result = self.request_switchover_inner(request).instrument(span).await;
        self.counted(result)
    }

    async fn confirm_grant(
        &self,
        request: Request<ConfirmGrantRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let request = request.into_inner();
        let span = span("ConfirmGrant", request.identity.as_ref());
        let result = self.confirm_grant_inner(request).instrument(span).await;
        self.counted(result)
    }

    async fn raise_epochs(
        &self,
        request: Request<RaiseEpochsRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let request = request.into_inner();
        let span = span("RaiseEpochs", request.identity.as_ref());
        let result = self.raise_epochs_inner(request).instrument(span).await;
        self.counted(result)
    }

    async fn confirm_down(
        &self,
        request: Request<ConfirmDownRequest>,
    ) -> Result<Response<ConfirmDownReply>, Status> {
        let result =
            self.confirm_down_inner(request.into_inner()).instrument(span("ConfirmDown", None)).await;
        self.counted(result)
    }

    async fn show(
        &self,
        request: Request<MediatorShowRequest>,
    ) -> Result<Response<MediatorShowReply>, Status> {
        let result = self.show_inner(request.into_inner()).instrument(span("Show", None)).await;
        self.counted(result)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use mc_proto::v1::{OwnedAggregate, PartnerAge, ReceivedMirror};

    use super::*;
    use crate::decide::{Config, Controller, State, Timers};

    const CLUSTER: [u8; 16] = [0x11; 16];
    const AGG: [u8; 16] = [7; 16];

    fn config() -> Config {
        Config {
            controllers: vec![
                Controller { node: NodeId(1), site: Site(0) },
                Controller { node: NodeId(2), site: Site(1) },
            ],
            timers: Timers::SCALED,
            observer: false,
        }
    }

    fn service(dir: &std::path::Path) -> MediatorService {
        let mediator = decide::Mediator::new(config(), Some(State::default())).unwrap();
        let store = Arc::new(Store::new(dir, CLUSTER));
        MediatorService::new(CLUSTER, mediator, Some(false), store, Arc::new(Metrics::default()), None)
    }

    fn identity(node: u32) -> Option<Identity> {
        Some(Identity { cluster_id: CLUSTER.to_vec(), sender_node: node, receiver_node: 0 })
    }

    fn heartbeat(node: u32, sequence: u64) -> HeartbeatRequest {
        let partner = 3 - node;
        HeartbeatRequest {
            identity: identity(node),
            log_generation: 1,
            sequence,
            state_version: 0,
            uptime_ms: 1000,
            mode: "normal".into(),
            fenced: false,
            partners: vec![PartnerAge {
                node: partner,
                heard: true,
                heard_age_ms: 10,
                round_trip: true,
                round_trip_age_ms: 10,
            }],
            owned: if node == 1 {
                vec![OwnedAggregate {
                    epoch: Some(AggregateEpoch {
                        aggregate_uuid: AGG.to_vec(),
                        epoch: Some(mc_proto::v1::Epoch { number: 1, owner_node: 1 }),
                    }),
                    mirror: mc_proto::v1::MirrorState::InSync as i32,
                    receiver_generation: 5,
                    plexes_normal: true,
                }]
            } else {
                Vec::new()
            },
            received: if node == 2 {
                vec![ReceivedMirror {
                    writer: 1,
                    partition_generation: 5,
                    state: mc_proto::v1::MirrorState::InSync as i32,
                }]
            } else {
                Vec::new()
            },
            epochs_seen: Vec::new(),
        }
    }

    /// Prevents malformed or misdirected heartbeats from reaching the decision core (DESIGN
    /// §8: bad input is INVALID_ARGUMENT, a misdirected call FAILED_PRECONDITION).
    #[tokio::test]
    async fn bad_heartbeats_are_refused_with_the_right_code() {
        let dir = tempfile::tempdir().unwrap();
        let service = service(dir.path());
        type Edit = fn(&mut HeartbeatRequest);
        let cases: Vec<(&str, Edit, tonic::Code)> = vec![
            ("no identity", |r| r.identity = None, tonic::Code::InvalidArgument),
            (
                "short cluster id",
                |r| r.identity.as_mut().unwrap().cluster_id = vec![1; 3],
                tonic::Code::InvalidArgument,
            ),
            (
                "other cluster",
                |r| r.identity.as_mut().unwrap().cluster_id = vec![9; 16],
                tonic::Code::FailedPrecondition,
            ),
            (
                "for a controller",
                |r| r.identity.as_mut().unwrap().receiver_node = 2,
                tonic::Code::FailedPrecondition,
            ),
            ("sender 0", |r| r.identity.as_mut().unwrap().sender_node = 0, tonic::Code::InvalidArgument),
            ("unknown mode", |r| r.mode = "takeover".into(), tonic::Code::InvalidArgument),
            ("empty mode", |r| r.mode = String::new(), tonic::Code::InvalidArgument),
            ("unknown mirror state", |r| r.owned[0].mirror = 17, tonic::Code::InvalidArgument),
            ("no epoch", |r| r.owned[0].epoch = None, tonic::Code::InvalidArgument),
            (
                "uuid of 15 bytes",
                |r| r.owned[0].epoch.as_mut().unwrap().aggregate_uuid = vec![1; 15],
                tonic::Code::InvalidArgument,
            ),
            (
                "foreign owner",
                |r| r.owned[0].epoch.as_mut().unwrap().epoch.as_mut().unwrap().owner_node = 2,
                tonic::Code::InvalidArgument,
            ),
            ("owned twice", |r| r.owned.push(r.owned[0].clone()), tonic::Code::InvalidArgument),
            ("partner twice", |r| r.partners.push(r.partners[0]), tonic::Code::InvalidArgument),
            ("self as partner", |r| r.partners[0].node = 1, tonic::Code::InvalidArgument),
            (
                "self as writer",
                |r| {
                    r.received.push(ReceivedMirror { writer: 1, partition_generation: 1, state: 1 });
                },
                tonic::Code::InvalidArgument,
            ),
            (
                "unconfigured node",
                |r| {
                    r.identity.as_mut().unwrap().sender_node = 9;
                    r.owned.clear();
                },
                tonic::Code::FailedPrecondition,
            ),
        ];
        for (what, edit, code) in cases {
            let mut request = heartbeat(1, 1);
            edit(&mut request);
            let status = service.heartbeat(Request::new(request)).await.unwrap_err();
            assert_eq!(status.code(), code, "{what}: {status:?}");
            assert!(!status.message().is_empty(), "{what}");
        }
        // None of them changed anything: the first good heartbeat is sequence 1.
        let reply = service.heartbeat(Request::new(heartbeat(1, 1))).await.unwrap().into_inner();
        assert_eq!(reply.lease_ms, 2000);
        assert_eq!(service.shared.metrics.invalid_requests.get(), 13);
    }

    /// Prevents a controller whose receiver holds no mirror state yet (the wire's UNSPECIFIED)
    /// from failing every heartbeat, and an OFFLINE or UNSPECIFIED state from counting as in
    /// sync.
    #[tokio::test]
    async fn unspecified_and_offline_mirror_states_lower_the_record() {
        for state in [mc_proto::v1::MirrorState::Unspecified, mc_proto::v1::MirrorState::Offline] {
            assert_eq!(parse_mirror_state(state as i32, "x").unwrap(), decide::MirrorState::OutOfSync);
        }
        let dir = tempfile::tempdir().unwrap();
        let service = service(dir.path());
        service.heartbeat(Request::new(heartbeat(1, 1))).await.unwrap();
        let mut b = heartbeat(2, 1);
        b.received[0].state = mc_proto::v1::MirrorState::Unspecified as i32;
        service.heartbeat(Request::new(b)).await.unwrap();
        let show = service
            .show(Request::new(MediatorShowRequest { cluster_id: CLUSTER.to_vec() }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(show.aggregates.len(), 1);
        assert!(!show.aggregates[0].in_sync);
        service.heartbeat(Request::new(heartbeat(2, 2))).await.unwrap();
        let show = service
            .show(Request::new(MediatorShowRequest { cluster_id: CLUSTER.to_vec() }))
            .await
            .unwrap()
            .into_inner();
        assert!(show.aggregates[0].in_sync);
    }

    /// Prevents a reply from getting ahead of the durable state (S10): a failed write answers
    /// UNAVAILABLE, and so does every later call, even one that would change nothing.
    #[tokio::test]
    async fn a_failed_write_sends_nothing_and_latches() {
        let dir = tempfile::tempdir().unwrap();
        let service = service(dir.path());
        service.heartbeat(Request::new(heartbeat(1, 1))).await.unwrap();
        // A non-empty directory where the file goes: the rename fails, even for root.
        let path = dir.path().join(crate::store::FILE_NAME);
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir_all(path.join("in-the-way")).unwrap();
        let status = service.heartbeat(Request::new(heartbeat(1, 2))).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        std::fs::remove_dir_all(&path).unwrap();
        for status in [
            service.heartbeat(Request::new(heartbeat(1, 3))).await.unwrap_err(),
            service
                .confirm_grant(Request::new(ConfirmGrantRequest { identity: identity(2) }))
                .await
                .unwrap_err(),
            service
                .show(Request::new(MediatorShowRequest { cluster_id: CLUSTER.to_vec() }))
                .await
                .unwrap_err(),
        ] {
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        }
        assert_eq!(service.shared.metrics.persist_failures.get(), 1);
        assert!(!path.exists(), "the store wrote after a failure");
    }

    /// Prevents a restart in the middle of a rebuild (rule 5) from ending the rebuild: the
    /// file records the state as lost until every controller has reported or been confirmed
    /// down, including when only an operator's ConfirmDown ends it.
    #[tokio::test]
    async fn the_lost_flag_is_durable_and_confirm_down_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::new(dir.path(), CLUSTER));
        let mediator = decide::Mediator::new(config(), None).unwrap();
        let service =
            MediatorService::new(CLUSTER, mediator, None, store.clone(), Arc::new(Metrics::default()), None);
        service.heartbeat(Request::new(heartbeat(1, 1))).await.unwrap();
        assert!(store.load().unwrap().unwrap().lost);
        for (nodes, code) in [(vec![], tonic::Code::InvalidArgument), (vec![7], tonic::Code::InvalidArgument)]
        {
            let request = ConfirmDownRequest { cluster_id: CLUSTER.to_vec(), nodes };
            assert_eq!(service.confirm_down(Request::new(request)).await.unwrap_err().code(), code);
        }
        let request = ConfirmDownRequest { cluster_id: CLUSTER.to_vec(), nodes: vec![2] };
        assert!(!service.confirm_down(Request::new(request)).await.unwrap().into_inner().state_lost);
        assert!(!store.load().unwrap().unwrap().lost, "the end of the rebuild was not written");
    }

    /// Prevents a stale heartbeat from renewing a lease.
    #[tokio::test]
    async fn a_stale_heartbeat_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let service = service(dir.path());
        service.heartbeat(Request::new(heartbeat(1, 5))).await.unwrap();
        for sequence in [5, 4] {
            let status = service.heartbeat(Request::new(heartbeat(1, sequence))).await.unwrap_err();
            assert_eq!(status.code(), tonic::Code::FailedPrecondition);
            assert!(status.message().starts_with("stale report"), "{}", status.message());
        }
    }
}
