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
//! Still to come (issue 10): recording drops at the mediator (S3), epochs raised by the
//! mediator for negotiated switchover and switchback, the epoch confirmation at start (S2), and
//! the persisted state version.
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
    state_version: AtomicU64,
    started: Instant,
    /// A grant is being run (one at a time).
    running_grant: std::sync::atomic::AtomicBool,
}

fn wire_state(state: WriterState) -> WireMirrorState {
    match state {
        WriterState::InSync => WireMirrorState::InSync,
        WriterState::Resyncing { .. } => WireMirrorState::Resyncing,
        WriterState::OutOfSync | WriterState::Unknown => WireMirrorState::OutOfSync,
    }
}

fn age_ms(age: Duration) -> u64 {
    u64::try_from(age.as_millis()).unwrap_or(u64::MAX)
}

impl MediatorLink {
    /// A link for `config`, renewing `lease`.
    pub fn new(
        config: MediatorConfig,
        lease: SharedLease,
        cluster: [u8; 16],
        node: u32,
    ) -> Arc<MediatorLink> {
        Arc::new(MediatorLink {
            config,
            cluster,
            node,
            lease,
            sequence: AtomicU64::new(0),
            state_version: AtomicU64::new(0),
            started: Instant::now(),
            running_grant: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// This node's report now.
    pub fn report(&self, node: &Node) -> HeartbeatRequest {
        let config = node.config();
        let mirror = node.mirror().status();
        let receiver = node.nvlog().status(PartitionKind::DrPartner).ok();
        let round_trip = node.receiver.get().and_then(|r| r.last_round_trip_age());
        let heard = node.clock.silent_for();
        let owned = node
            .aggregates()
            .iter()
            .filter(|a| !a.switched_over && a.deposed().is_none())
            .map(|a| OwnedAggregate {
                epoch: Some(crate::wire::aggregate_epoch(a.uuid, a.plex_epoch())),
                mirror: wire_state(mirror.state) as i32,
                receiver_generation: mirror.partner_generation,
                plexes_normal: a.aggregate.plex_states() == [plex::PlexState::Normal; 2],
            })
            .collect();
        HeartbeatRequest {
            identity: Some(Identity {
                cluster_id: config.cluster_id.to_vec(),
                sender_node: config.node_id,
                receiver_node: 0,
            }),
            log_generation: node.nvlog().generation().0,
            sequence: self.sequence.fetch_add(1, Ordering::AcqRel) + 1,
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
    /// returns once the mediator has it durably. The caller retries an error: until then the
    /// writes that wait on the drop stall, and after `lease` without a round trip the node
    /// fences itself (S3, S6).
    pub async fn record_drop(&self, aggregate: plex::Uuid) -> Result<(), String> {
        let mut client = self.client()?;
        let mut request = tonic::Request::new(mc_proto::v1::RecordDropRequest {
            identity: Some(Identity {
                cluster_id: self.cluster.to_vec(),
                sender_node: self.node,
                receiver_node: 0,
            }),
            aggregate_uuid: aggregate.0.to_vec(),
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
        self.state_version.fetch_max(reply.state_version, Ordering::AcqRel);
        let mut above = Vec::new();
        for wire in &reply.epochs {
            let Some((uuid, epoch)) = crate::wire::from_aggregate_epoch(wire) else { continue };
            if let Some(slot) =
                node.aggregates().into_iter().find(|a| a.uuid == uuid && a.deposed().is_none())
                && epoch > slot.plex_epoch()
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
