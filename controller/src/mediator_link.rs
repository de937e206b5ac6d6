//! The controller's side of the mediator (DESIGN §10; S2, S6): a heartbeat every `heartbeat`
//! with this node's report (mode, epochs, NVLog mirror states as writer and as receiver, plex
//! states, the DR partner's ages), whose reply renews the lease (S6) from the heartbeat's send
//! time, for the smaller of the two leases.
//!
//! - A reply that names a higher epoch for an aggregate this node serves deposes it (S2) and
//!   renews nothing.
//! - When a check finds the lease lapsed, the node fences itself (no acknowledgement, no read
//!   completion, no new connection) until a heartbeat round trip confirms its epochs (S2),
//!   which restarts the lease.
//!
//! - A grant for this node (AUSO, or a manual forced switchover requested through the mediator,
//!   S7) is run as a forced switchover at the granted epochs, then confirmed; the mediator
//!   re-sends it until then, so a crash in between resumes it from the journal.
//!
//! - Drops are recorded at the mediator (S3), stamped from the heartbeat counter; from the
//!   start of a drop the aggregate is reported out of sync until this node's state shows it.
//! - Epochs for a negotiated switchover (asked by the releasing owner), a switchback and a
//!   forced unfence are raised by the mediator while it answers (`raise_epochs`).
//! - Replies that can confirm epochs (the mediator's state not lost) feed start-up's S2
//!   confirmation (`confirmations`), and say which mirrors the mediator holds intact, for a
//!   start-up that lost its NVLog partition (S8).
//! - The state version the mediator last sent is kept in `<shelf_dir>/.mediator-version-<node>`
//!   and reported back (rule 5: a restored snapshot counts as lost).
//!
//! Invariants: only a completed round trip renews, counted from its send time; a lapsed lease
//! is renewed only by a confirmation whose epochs are not above this node's.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mc_proto::v1::mediator_client::MediatorClient;
use mc_proto::v1::{
    HeartbeatReply, HeartbeatRequest, Identity, MirrorState as WireMirrorState, OwnedAggregate, PartnerAge,
    ReceivedMirror,
};
use nvlog::PartitionKind;

use crate::config::MediatorConfig;
use crate::lease::SharedLease;
use crate::node::{Node, Phase};
use crate::nvlog_mirror::WriterState;

/// The reason a self-fenced node gives.
const SELF_FENCED: &str = "self-fenced";

/// The heartbeat client.
#[derive(Debug)]
pub struct MediatorLink {
    config: MediatorConfig,
    /// Who we are: cluster id and node id.
    cluster: [u8; 16],
    node: u32,
    lease: SharedLease,
    sequence: AtomicU64,
    /// The NVLog generation the reports carry (drop records are stamped with it too).
    log_generation: AtomicU64,
    /// Aggregates whose drop is being (or was) recorded while this node's own state may still
    /// say in sync: reported out of sync until that state shows the drop, or its drop counts
    /// (plex and NVLog mirror) moved past the ones the last report saw before the record (the
    /// drop completed and was already undone by a resync, between two reports) (S3).
    dropping: std::sync::Mutex<std::collections::HashMap<plex::Uuid, u64>>,
    /// Per aggregate, the drop counts the latest report saw.
    drops_seen: std::sync::Mutex<std::collections::HashMap<plex::Uuid, u64>>,
    state_version: AtomicU64,
    /// Where the state version is kept across restarts, and the one last written there.
    version_file: Option<std::path::PathBuf>,
    persisted_version: std::sync::Mutex<(u64, Option<Instant>)>,
    writing_version: std::sync::atomic::AtomicBool,
    started: Instant,
    /// A grant is being run (one at a time).
    running_grant: std::sync::atomic::AtomicBool,
    /// The latest reply (any), to tell whether the mediator answers (S2's fallback to the DR
    /// partner applies only while it does not).
    last_answer: std::sync::Mutex<Option<Instant>>,
    /// The latest reply that can confirm epochs (the mediator's state not lost), counted up
    /// with each: what start-up waits on (S2, S8).
    confirmation: tokio::sync::watch::Sender<Confirmation>,
}

/// What the latest mediator reply that can confirm epochs (its state not lost) said.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Confirmation {
    /// How many such replies arrived since the start (0: none yet).
    pub count: u64,
    /// The mediator's epochs (S2).
    pub epochs: Vec<(plex::Uuid, plex::Epoch)>,
    /// The aggregates whose NVLog mirror the mediator holds intact: in sync at the current
    /// epoch, with no drop recorded since (S8).
    pub mirror_intact: Vec<plex::Uuid>,
}

/// Why the mediator raised no epochs.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RaiseError {
    /// It could not be reached (no connection: nothing was asked). While it does not answer
    /// heartbeats either, S2's fallback applies (the caller raises the epoch itself; the
    /// mediator adopts it from the next report); otherwise the caller retries.
    #[error("the mediator cannot be reached: {0}")]
    Unreachable(String),
    /// It was asked and did not answer: it may have raised them. The caller must act as if it
    /// had (never serve again at the old epoch) and retry.
    #[error("the mediator did not answer; it may have raised the epochs: {0}")]
    Unknown(String),
    /// It refused (its state is lost, a grant is pending, a live owner, ...): nothing changed.
    #[error("the mediator refused to raise the epochs: {0}")]
    Refused(String),
}

fn wire_state(state: WriterState) -> WireMirrorState {
    match state {
        WriterState::InSync => WireMirrorState::InSync,
        WriterState::Resyncing { .. } => WireMirrorState::Resyncing,
        WriterState::OutOfSync | WriterState::Unknown => WireMirrorState::OutOfSync,
    }
}

/// S3: what a report says of an aggregate whose drop is being (or was) recorded at the mediator,
/// and whether that ends the entry. `drops`: the aggregate's drop counts (plexes and NVLog mirror)
/// now; `before`: those the last report saw before the record (`u64::MAX`: never reported). Out
/// of sync while this node's state does not show the drop yet; the entry ends once the state
/// shows it, or once the counts moved past `before` (the drop completed and a resync already
/// undid it, between two reports: in sync again is then the truth).
fn while_dropping(
    state: WireMirrorState,
    plexes_normal: bool,
    drops: u64,
    before: u64,
) -> (WireMirrorState, bool) {
    if state == WireMirrorState::InSync && plexes_normal && drops <= before {
        (WireMirrorState::OutOfSync, false)
    } else {
        (state, true)
    }
}

fn age_ms(age: Duration) -> u64 {
    u64::try_from(age.as_millis()).unwrap_or(u64::MAX)
}

impl MediatorLink {
    /// A link for `config`, renewing `lease`.
    /// `version_file` keeps the mediator's state version across restarts (`None`: memory
    /// only); a damaged one is reported and counts as 0 (a restored mediator snapshot is then
    /// only caught once this controller has seen a newer version again).
    pub fn new(
        config: MediatorConfig,
        lease: SharedLease,
        cluster: [u8; 16],
        node: u32,
        version_file: Option<std::path::PathBuf>,
    ) -> Arc<MediatorLink> {
        let version = match version_file.as_deref().map(|path| read_version(path, &cluster, node)) {
            Some(Ok(version)) => version,
            Some(Err(e)) => {
                tracing::error!(node, "{e}; counting the mediator's state version from 0");
                0
            }
            None => 0,
        };
        Arc::new(MediatorLink {
            config,
            cluster,
            node,
            lease,
            sequence: AtomicU64::new(0),
            log_generation: AtomicU64::new(0),
            dropping: std::sync::Mutex::new(std::collections::HashMap::new()),
            drops_seen: std::sync::Mutex::new(std::collections::HashMap::new()),
            state_version: AtomicU64::new(version),
            version_file,
            persisted_version: std::sync::Mutex::new((version, None)),
            writing_version: std::sync::atomic::AtomicBool::new(false),
            started: Instant::now(),
            running_grant: std::sync::atomic::AtomicBool::new(false),
            last_answer: std::sync::Mutex::new(None),
            confirmation: tokio::sync::watch::Sender::new(Confirmation::default()),
        })
    }

    /// Writes the mediator's state version when it moved, at most once a second (it moves with
    /// every heartbeat; a version written late only weakens rule 5's restored-snapshot check).
    async fn persist_version(&self) {
        let Some(path) = self.version_file.clone() else { return };
        let version = self.state_version.load(Ordering::Acquire);
        {
            let persisted = self.persisted_version.lock().expect("the version lock holder panicked");
            if version <= persisted.0 || persisted.1.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
                return;
            }
        }
        let bytes = encode_version(&self.cluster, self.node, version);
        let written =
            tokio::task::spawn_blocking(move || crate::shelf_state::replace_file(&path, &bytes)).await;
        let mut persisted = self.persisted_version.lock().expect("the version lock holder panicked");
        persisted.1 = Some(Instant::now());
        match written {
            Ok(Ok(())) => persisted.0 = version,
            Ok(Err(e)) => tracing::warn!(node = self.node, "writing the mediator's state version: {e}"),
            Err(e) => tracing::warn!(node = self.node, "writing the mediator's state version: {e}"),
        }
    }

    /// Whether the mediator answered within the lease.
    pub fn answering(&self) -> bool {
        self.last_answer
            .lock()
            .expect("the mediator answer lock holder panicked")
            .is_some_and(|at| at.elapsed() < self.config.lease)
    }

    fn answered(&self) {
        *self.last_answer.lock().expect("the mediator answer lock holder panicked") = Some(Instant::now());
    }

    /// The mediator's epoch confirmations (S2) and intact mirrors (S8): the latest reply whose
    /// state was not lost.
    pub fn confirmations(&self) -> tokio::sync::watch::Receiver<Confirmation> {
        self.confirmation.subscribe()
    }

    /// Asks the mediator for new epochs: each aggregate of `aggregates` to the node named
    /// beside it (negotiated switchover, switchback, forced unfence; DESIGN §10: while it
    /// answers, it alone raises epochs). Returns the issued epochs, one per aggregate.
    pub async fn raise_epochs(
        &self,
        aggregates: &[(plex::Uuid, u32)],
        reason: &str,
    ) -> Result<Vec<(plex::Uuid, plex::Epoch)>, RaiseError> {
        // Connected first: a failure here means nothing was asked.
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", self.config.address))
            .map_err(|e| RaiseError::Unreachable(format!("mediator address {}: {e}", self.config.address)))?
            .connect_timeout(self.config.heartbeat);
        let channel = endpoint.connect().await.map_err(|e| RaiseError::Unreachable(e.to_string()))?;
        let mut client = MediatorClient::new(channel);
        let mut request = tonic::Request::new(mc_proto::v1::RaiseEpochsRequest {
            identity: Some(Identity {
                cluster_id: self.cluster.to_vec(),
                sender_node: self.node,
                receiver_node: 0,
            }),
            aggregates: aggregates
                .iter()
                .map(|(uuid, owner)| mc_proto::v1::RaiseEpoch {
                    aggregate_uuid: uuid.0.to_vec(),
                    owner: *owner,
                })
                .collect(),
            reason: reason.to_string(),
        });
        request.set_timeout(self.config.lease / 2);
        let reply = match client.raise_epochs(request).await {
            Ok(reply) => reply.into_inner(),
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument
                ) =>
            {
                self.answered();
                return Err(RaiseError::Refused(status.message().to_string()));
            }
            Err(status) => return Err(RaiseError::Unknown(status.message().to_string())),
        };
        self.answered();
        self.state_version.fetch_max(reply.state_version, Ordering::AcqRel);
        let mut issued = Vec::with_capacity(aggregates.len());
        for (uuid, owner) in aggregates {
            let epoch = reply
                .epochs
                .iter()
                .filter_map(crate::wire::from_aggregate_epoch)
                .find(|(u, _)| u == uuid)
                .map(|(_, e)| e)
                .filter(|e| e.owner.0 == *owner)
                .ok_or_else(|| {
                    RaiseError::Unknown(format!(
                        "the reply holds no epoch of aggregate {} for node {owner}",
                        crate::node::hex(&uuid.0)
                    ))
                })?;
            issued.push((*uuid, epoch));
        }
        Ok(issued)
    }

    /// This node's report now.
    pub fn report(&self, node: &Node) -> HeartbeatRequest {
        // The stamp first: a drop recorded with a lower one was marked before what follows is
        // read, so this report says so (S3).
        let sequence = self.sequence.fetch_add(1, Ordering::AcqRel) + 1;
        let log_generation = node.nvlog().generation().0;
        self.log_generation.store(log_generation, Ordering::Release);
        let mut dropping = self.dropping.lock().expect("the dropping set lock holder panicked");
        let mut drops_seen = self.drops_seen.lock().expect("the drops seen lock holder panicked");
        let config = node.config();
        let mirror = node.mirror().status();
        let receiver = node.nvlog().status(PartitionKind::DrPartner).ok();
        let round_trip = node.receiver.get().and_then(|r| r.last_round_trip_age());
        let heard = node.clock.silent_for();
        let owned = node
            .aggregates()
            .iter()
            .filter(|a| !a.switched_over && a.deposed().is_none())
            .map(|a| {
                let mut state = wire_state(mirror.state);
                let plexes_normal = a.aggregate.plex_states() == [plex::PlexState::Normal; 2];
                let drops = a.aggregate.counters().drops + mirror.drops;
                drops_seen.insert(a.uuid, drops);
                if let Some(&before) = dropping.get(&a.uuid) {
                    let (reported, ended) = while_dropping(state, plexes_normal, drops, before);
                    state = reported;
                    if ended {
                        dropping.remove(&a.uuid);
                    }
                }
                OwnedAggregate {
                    epoch: Some(crate::wire::aggregate_epoch(a.uuid, a.plex_epoch())),
                    mirror: state as i32,
                    receiver_generation: mirror.partner_generation,
                    plexes_normal,
                }
            })
            .collect();
        drop(drops_seen);
        drop(dropping);
        HeartbeatRequest {
            identity: Some(Identity {
                cluster_id: config.cluster_id.to_vec(),
                sender_node: config.node_id,
                receiver_node: 0,
            }),
            log_generation,
            sequence,
            state_version: self.state_version.load(Ordering::Acquire),
            uptime_ms: age_ms(self.started.elapsed()),
            mode: node.mode().to_string(),
            fenced: node.state().phase != Phase::Serving,
            partners: vec![PartnerAge {
                node: config.dr_partner.node_id,
                heard: true,
                heard_age_ms: age_ms(heard),
                round_trip: round_trip.is_some(),
                round_trip_age_ms: round_trip.map_or(0, age_ms),
            }],
            owned,
            received: receiver
                .map(|r| ReceivedMirror {
                    writer: config.dr_partner.node_id,
                    partition_generation: r.partition_generation,
                    state: crate::wire::mirror_state(r.mirror_state) as i32,
                })
                .into_iter()
                .collect(),
            epochs_seen: node.shelf_state.wire_epochs(),
        }
    }

    fn client(&self) -> Result<MediatorClient<tonic::transport::Channel>, String> {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", self.config.address))
            .map_err(|e| format!("mediator address {}: {e}", self.config.address))?
            .connect_timeout(self.config.heartbeat);
        Ok(MediatorClient::new(endpoint.connect_lazy()))
    }

    fn identity(node: &Node) -> Identity {
        Identity {
            cluster_id: node.config().cluster_id.to_vec(),
            sender_node: node.node_id(),
            receiver_node: 0,
        }
    }

    /// Records at the mediator that this node dropped a mirror or plex of `aggregate` (S3);
    /// `plex_only`: a plex, not the NVLog mirror (whose copy at the DR partner then stays
    /// complete, S8). Returns once the mediator has it durably. The caller retries an error: until then the
    /// writes that wait on the drop stall, and after `lease` without a round trip the node
    /// fences itself (S3, S6).
    pub async fn record_drop(&self, aggregate: plex::Uuid, plex_only: bool) -> Result<(), String> {
        let mut client = self.client()?;
        // Marked before the stamp is taken: every report stamped above the record says out
        // of sync, and one stamped below it is ignored by the mediator once the record is in.
        {
            // The same lock order as `report`.
            let mut dropping = self.dropping.lock().expect("the dropping set lock holder panicked");
            let seen = self.drops_seen.lock().expect("the drops seen lock holder panicked");
            // Not reported yet: only the state showing the drop ends the entry.
            dropping.insert(aggregate, seen.get(&aggregate).copied().unwrap_or(u64::MAX));
        }
        let sequence = self.sequence.fetch_add(1, Ordering::AcqRel) + 1;
        let mut request = tonic::Request::new(mc_proto::v1::RecordDropRequest {
            identity: Some(Identity {
                cluster_id: self.cluster.to_vec(),
                sender_node: self.node,
                receiver_node: 0,
            }),
            aggregate_uuid: aggregate.0.to_vec(),
            log_generation: self.log_generation.load(Ordering::Acquire),
            sequence,
            plex_only,
        });
        request.set_timeout(self.config.lease / 2);
        let reply = client
            .record_drop(request)
            .await
            .map_err(|s| format!("the mediator did not record the drop: {}", s.message()))?
            .into_inner();
        // Only heartbeat replies, whose epochs are checked, renew the lease (S6).
        self.state_version.fetch_max(reply.state_version, Ordering::AcqRel);
        Ok(())
    }

    /// A manual forced switchover through the mediator (S7): its grant, or why it refused.
    pub async fn request_switchover(
        &self,
        node: &Node,
        override_in_sync: bool,
    ) -> Result<crate::switchover::Granted, String> {
        let mut client = self.client()?;
        let mut request = tonic::Request::new(mc_proto::v1::MediatorSwitchoverRequest {
            identity: Some(Self::identity(node)),
            override_in_sync,
        });
        request.set_timeout(self.config.lease);
        let reply = client
            .request_switchover(request)
            .await
            .map_err(|s| format!("the mediator refused the switchover: {}", s.message()))?
            .into_inner();
        let grant = reply
            .grant
            .as_ref()
            .filter(|g| g.to_node == node.node_id())
            .and_then(crate::switchover::Granted::from_wire)
            .ok_or("the mediator answered without a grant for this node")?;
        self.state_version.fetch_max(reply.state_version, Ordering::AcqRel);
        Ok(grant)
    }

    /// Tells the mediator the grant was applied (it stops re-sending it).
    pub async fn confirm_grant(&self, node: &Node) -> Result<(), String> {
        let mut client = self.client()?;
        let mut request =
            tonic::Request::new(mc_proto::v1::ConfirmGrantRequest { identity: Some(Self::identity(node)) });
        request.set_timeout(self.config.lease);
        client.confirm_grant(request).await.map(|_| ()).map_err(|s| s.message().to_string())
    }

    /// Runs a grant for this node (once at a time), then confirms it.
    fn spawn_grant(self: &Arc<Self>, node: Arc<Node>, grant: crate::switchover::Granted) {
        if self.running_grant.swap(true, Ordering::AcqRel) {
            return;
        }
        let link = self.clone();
        tokio::spawn(async move {
            tracing::error!(
                node = node.node_id(),
                automatic = grant.automatic,
                nvfail = grant.nvfail,
                "the mediator granted this node its partner's aggregates: switching over"
            );
            match crate::switchover::run_grant(&node, &grant).await {
                Ok(reply) => {
                    tracing::warn!(node = node.node_id(), volumes = ?reply.volumes, "granted switchover done");
                    if let Err(e) = link.confirm_grant(&node).await {
                        tracing::warn!(
                            node = node.node_id(),
                            "confirming the grant: {e} (it is re-sent, and re-running is idempotent)"
                        );
                    }
                }
                Err(status) => {
                    tracing::error!(
                        node = node.node_id(),
                        "the granted switchover failed: {}",
                        status.message()
                    );
                }
            }
            link.running_grant.store(false, Ordering::Release);
        });
    }

    /// Applies a reply to a heartbeat sent at `sent` (S2, S6).
    pub async fn apply(&self, node: &Node, sent: Instant, reply: &HeartbeatReply) {
        self.answered();
        self.state_version.fetch_max(reply.state_version, Ordering::AcqRel);
        if !reply.state_lost {
            let epochs: Vec<(plex::Uuid, plex::Epoch)> =
                reply.epochs.iter().filter_map(crate::wire::from_aggregate_epoch).collect();
            // An entry that is not a uuid names nothing: that mirror is not vouched for (S8).
            let mirror_intact: Vec<plex::Uuid> = reply
                .mirror_intact
                .iter()
                .filter_map(|bytes| <[u8; 16]>::try_from(bytes.as_slice()).ok().map(plex::Uuid))
                .collect();
            self.confirmation.send_modify(|confirmation| {
                confirmation.count += 1;
                confirmation.epochs = epochs;
                confirmation.mirror_intact = mirror_intact;
            });
        }
        let mut above = Vec::new();
        for wire in &reply.epochs {
            let Some((uuid, epoch)) = crate::wire::from_aggregate_epoch(wire) else { continue };
            // A higher epoch naming this node (a raise it asked for and never used) deposes
            // nothing: only this node writes with it.
            if let Some(slot) =
                node.aggregates().into_iter().find(|a| a.uuid == uuid && a.deposed().is_none())
                && epoch > slot.plex_epoch()
                && epoch.owner.0 != node.node_id()
            {
                above.push((uuid, epoch));
            }
        }
        for (uuid, epoch) in &above {
            node.depose(*uuid, *epoch).await;
        }
        if !above.is_empty() {
            return;
        }
        let offered = (reply.lease_ms > 0).then(|| Duration::from_millis(reply.lease_ms));
        if self.lease.is_lapsed() {
            if reply.state_lost {
                // Rule 5: its epochs may be behind (a takeover it has not relearnt yet).
                tracing::warn!(
                    node = node.node_id(),
                    "the mediator's state is lost: it cannot confirm this node's epochs yet; still self-fenced"
                );
                return;
            }
            // S2: the mediator confirmed our epochs (none above ours): the fence ends.
            self.lease.confirm(sent, offered);
            tracing::warn!(
                node = node.node_id(),
                "the mediator confirmed this node's epochs: the self-fence ends"
            );
        } else {
            self.lease.renew(sent, offered);
        }
    }

    /// Fences the node when the lease lapsed, and unfences it once confirmed (S6).
    pub fn enforce(&self, node: &Node) {
        let state = node.state();
        match self.lease.check() {
            Err(e) if state.phase == Phase::Serving => {
                tracing::error!(node = node.node_id(), "{e}");
                node.set_state(Phase::Fenced, format!("{SELF_FENCED}: {e}"));
            }
            Ok(()) if state.phase == Phase::Fenced && state.reason.starts_with(SELF_FENCED) => {
                node.set_state(Phase::Serving, "serving");
            }
            _ => {}
        }
    }

    /// Heartbeats until `stop`.
    pub async fn run(self: Arc<Self>, node: Arc<Node>, mut stop: tokio::sync::watch::Receiver<bool>) {
        // The fence shows in the node's state within a tenth of the lease, whatever a
        // heartbeat call in flight waits for (the acknowledgement and read paths check the
        // lease themselves).
        {
            let (link, node, mut stop) = (self.clone(), node.clone(), stop.clone());
            let every = (self.config.lease / 10).max(Duration::from_millis(10));
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = tokio::time::sleep(every) => link.enforce(&node),
                        _ = stop.wait_for(|stop| *stop) => return,
                    }
                }
            });
        }
        let address = format!("http://{}", self.config.address);
        let mut client: Option<MediatorClient<tonic::transport::Channel>> = None;
        let mut ticker = tokio::time::interval(self.config.heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_error = String::new();
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
            self.enforce(&node);
            if client.is_none() {
                let endpoint = match tonic::transport::Endpoint::from_shared(address.clone()) {
                    Ok(endpoint) => endpoint.connect_timeout(self.config.heartbeat),
                    Err(e) => {
                        tracing::error!(address = %self.config.address, "mediator address: {e}");
                        return;
                    }
                };
                client = Some(MediatorClient::new(endpoint.connect_lazy()));
            }
            let Some(mediator) = client.as_mut() else { continue };
            let request = self.report(&node);
            let sent = Instant::now();
            let mut call = tonic::Request::new(request);
            call.set_timeout(self.config.lease / 2);
            match mediator.heartbeat(call).await {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    self.apply(&node, sent, &reply).await;
                    // In the background, one at a time: a slow disk must not delay heartbeats.
                    if !self.writing_version.swap(true, Ordering::AcqRel) {
                        let link = self.clone();
                        tokio::spawn(async move {
                            link.persist_version().await;
                            link.writing_version.store(false, Ordering::Release);
                        });
                    }
                    if let Some(grant) = reply.grant.as_ref().filter(|g| g.to_node == node.node_id()) {
                        match crate::switchover::Granted::from_wire(grant) {
                            Some(grant) => self.spawn_grant(node.clone(), grant),
                            None => {
                                tracing::error!(node = node.node_id(), "a malformed grant from the mediator")
                            }
                        }
                    }
                    last_error.clear();
                }
                Err(status) => {
                    let text = status.message().to_string();
                    if text != last_error {
                        tracing::warn!(node = node.node_id(), "mediator heartbeat: {text}");
                        last_error = text;
                    }
                    if status.code() == tonic::Code::Unavailable {
                        client = None;
                    }
                }
            }
            self.enforce(&node);
        }
    }
}

/// The file that keeps the mediator's state version (DESIGN §10 rule 5): magic `MCMVER01`,
/// format version 1, cluster id, node id, the state version, CRC-32 of what precedes it.
const VERSION_MAGIC: &[u8; 8] = b"MCMVER01";
const VERSION_FORMAT: u32 = 1;
const VERSION_BYTES: usize = 8 + 4 + 16 + 4 + 8 + 4;

fn encode_version(cluster: &[u8; 16], node: u32, version: u64) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(VERSION_BYTES);
    bytes.extend_from_slice(VERSION_MAGIC);
    bytes.extend_from_slice(&VERSION_FORMAT.to_le_bytes());
    bytes.extend_from_slice(cluster);
    bytes.extend_from_slice(&node.to_le_bytes());
    bytes.extend_from_slice(&version.to_le_bytes());
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes
}

/// The state version in `path`: 0 if there is none yet; an error if it is damaged or belongs
/// to another node or cluster.
fn read_version(path: &std::path::Path, cluster: &[u8; 16], node: u32) -> Result<u64, String> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    decode_version(&bytes, cluster, node).map_err(|e| format!("{}: {e}", path.display()))
}

fn decode_version(bytes: &[u8], cluster: &[u8; 16], node: u32) -> Result<u64, String> {
    if bytes.len() != VERSION_BYTES {
        return Err(format!("{} bytes, expected {VERSION_BYTES}", bytes.len()));
    }
    let (body, crc) = bytes.split_at(VERSION_BYTES - 4);
    if body[..8] != VERSION_MAGIC[..] {
        return Err("not a mediator state version file (bad magic)".into());
    }
    let word = |at: usize| u32::from_le_bytes([body[at], body[at + 1], body[at + 2], body[at + 3]]);
    if crc32fast::hash(body).to_le_bytes() != crc {
        return Err("checksum mismatch".into());
    }
    if word(8) != VERSION_FORMAT {
        return Err(format!("format version {} (this controller reads {VERSION_FORMAT})", word(8)));
    }
    if body[12..28] != cluster[..] || word(28) != node {
        return Err(format!("written by node {} of another cluster or node", word(28)));
    }
    let mut version = [0u8; 8];
    version.copy_from_slice(&body[32..40]);
    Ok(u64::from_le_bytes(version))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// S3 and the race CI found: a drop recorded while this node's state still says in sync is
    /// reported out of sync until the state shows it; a drop that completed and was resynced
    /// between two reports (the counts moved) ends the entry with the truth (in sync), instead of
    /// being reported out of sync forever; a drop never reported before stays out of sync.
    #[test]
    fn a_drop_being_recorded_is_out_of_sync_until_the_state_shows_it() {
        use WireMirrorState::{InSync, OutOfSync, Resyncing};
        assert_eq!(while_dropping(InSync, true, 3, 3), (OutOfSync, false), "not visible yet");
        assert_eq!(while_dropping(InSync, true, 3, u64::MAX), (OutOfSync, false), "never reported");
        assert_eq!(while_dropping(OutOfSync, true, 4, 3), (OutOfSync, true), "the state shows it");
        assert_eq!(while_dropping(Resyncing, true, 4, 3), (Resyncing, true), "resyncing");
        assert_eq!(while_dropping(InSync, false, 3, 3), (InSync, true), "a plex shows it");
        assert_eq!(while_dropping(InSync, true, 4, 3), (InSync, true), "dropped and resynced since");
    }

    #[test]
    fn the_state_version_file_round_trips_and_refuses_damage() {
        let cluster = [7u8; 16];
        let bytes = encode_version(&cluster, 2, 12345);
        assert_eq!(decode_version(&bytes, &cluster, 2), Ok(12345));
        assert!(decode_version(&bytes, &cluster, 1).unwrap_err().contains("another"));
        assert!(decode_version(&bytes, &[8u8; 16], 2).unwrap_err().contains("another"));
        assert!(decode_version(&bytes[..10], &cluster, 2).is_err());
        for at in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x10;
            assert!(decode_version(&damaged, &cluster, 2).is_err(), "byte {at} flipped was accepted");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mediator-version");
        assert_eq!(read_version(&path, &cluster, 2), Ok(0));
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read_version(&path, &cluster, 2), Ok(12345));
    }
}
