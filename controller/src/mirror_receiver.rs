//! The receiving side of the NVLog mirror (DESIGN §4.2, §5, §8; S13): the `NvlogMirror`
//! service stores the DR partner's records in this node's `dr_partner` partition exactly as the
//! writer encoded them, and keeps its own account of the mirror.
//!
//! The stream, as the receiver sees it:
//! 1. the writer's hello (identities checked: our cluster, sender = our DR partner, receiver =
//!    us) is answered with our hello (partition generation, durable tail, mirror state, whether
//!    records were lost), then with every record held above the writer's recovered tail (S8);
//! 2. a record is acknowledged only once it is durable here, and only if its lsn follows the
//!    durable tail (S13: contiguous lsns only); a gap persists `out_of_sync` and tells the
//!    writer, which re-establishes (§4.2);
//! 3. the writer's announcement `resyncing` at lsn N (a re-establish) allows the gap below N and
//!    persists `resyncing`; `in_sync` (after the covering CP) persists `in_sync`;
//! 4. `Release` releases; keepalives are answered with this node's epochs.
//!
//! Invariants:
//! - the mirror state is changed only by the rules above and by the silence rule: with no
//!   completed round trip with the writer (a reply to our own keepalive) for
//!   `mirror_timeout − margin`, `out_of_sync` is persisted by the receiver itself (S13);
//! - a record is acknowledged at most after it is durable in the configured mode; nothing that
//!   fails a check is stored or acknowledged;
//! - bad input (wrong identity, a malformed message, a record that fails its checks) is an
//!   error value on the stream, never a panic.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mc_proto::v1::nvlog_mirror_server::NvlogMirror;
use mc_proto::v1::receiver_message::Body as Out;
use mc_proto::v1::writer_message::Body as In;
use mc_proto::v1::{
    Identity, Keepalive, KeepaliveReply, MirrorState as WireMirrorState, MirroredRecord, ReceiverHello,
    ReceiverMessage, ReceiverStateChange, RecordAck, WriterMessage,
};
use nvlog::{Lsn, Media, MirrorState, Nvlog, NvlogError, PartitionKind};
use tokio::sync::mpsc;
use tonic::codegen::tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

const KIND: PartitionKind = PartitionKind::DrPartner;

/// Who we are and whom we receive from.
#[derive(Clone, Copy, Debug)]
pub struct ReceiverIdentity {
    /// The cluster.
    pub cluster: [u8; 16],
    /// This node.
    pub node: u32,
    /// The DR partner whose records we hold.
    pub writer: u32,
}

/// Timers of the receiver (DESIGN §10.1).
#[derive(Clone, Copy, Debug)]
pub struct ReceiverTimers {
    /// How often the receiver sends its own keepalive.
    pub keepalive_interval: Duration,
    /// `mirror_timeout − margin`: silence after which the receiver persists `out_of_sync`.
    pub silence_limit: Duration,
}

/// The service.
#[derive(Debug)]
pub struct MirrorReceiver<M: Media> {
    nvlog: Arc<Nvlog<M>>,
    identity: ReceiverIdentity,
    timers: ReceiverTimers,
    /// The writer's last sign of life, shared with every service of this node (S3).
    clock: Arc<crate::peer::PeerClock>,
    /// This node's epoch high-water marks (S2): hellos and records below them are refused, a
    /// higher one is persisted before the record that carries it is acknowledged.
    shelf_state: Arc<crate::shelf_state::ShelfState>,
    /// When the last round trip with the writer completed (ms since `epoch`).
    last_round_trip_ms: Arc<AtomicU64>,
    /// The writer's messages received and not yet applied by the store (`Queued`): while any
    /// waits (a stalled store), the account may lag what the writer said before our last round
    /// trip, so it vouches for nothing (§9 (a), `switchover::sync_doubts`).
    unstored: Arc<AtomicU64>,
    epoch: Instant,
    /// Set at shutdown: every stream ends, so the server's drain does not wait for them.
    stop: tokio::sync::watch::Sender<bool>,
    /// Raised each time the silence rule persists `out_of_sync`: the stream tells the writer
    /// (S13), which takes it as the acknowledgement of a drop (S3).
    marked: tokio::sync::watch::Sender<u64>,
    /// True once the writer's aggregates were switched over to this node (DESIGN §11 step 2):
    /// nothing more from it is stored, released or announced. Every stored message holds it
    /// shared, so `freeze` returns only once no message is being applied.
    frozen: tokio::sync::RwLock<bool>,
    /// `frozen`, for the streams to watch.
    frozen_watch: tokio::sync::watch::Sender<bool>,
    /// The self-fence lease, when a mediator is configured: our keepalive round trips renew it.
    lease: std::sync::OnceLock<crate::lease::SharedLease>,
    /// This node's mediator link, when one is configured (its silence is told to the writer).
    mediator: std::sync::OnceLock<Arc<crate::mediator_link::MediatorLink>>,
}

/// S13, the receiver's own account: with no round trip with the writer for `limit`
/// (`mirror_timeout − margin`), a mirror held `in_sync` or `resyncing` becomes `out_of_sync`
/// (persisted by the caller). Sans-IO: the daemon's silence check and the model check
/// (`mc-model`) both decide with it.
pub fn silence_marks_out_of_sync(state: MirrorState, silent_for: Duration, limit: Duration) -> bool {
    use crate::model_breaks::{Break, active};
    silent_for >= limit
        && matches!(state, MirrorState::InSync | MirrorState::Resyncing)
        && !active(Break::ReceiverKeepsInSyncThroughSilence)
}

/// S13, §4.2: the receiver's account after the writer announces `announced` while it holds
/// `current`. `resyncing` (a re-establish) and `out_of_sync` (a drop) are taken from any state;
/// `in_sync` (a CP covered the re-establish) only from `resyncing` or `in_sync`: after an
/// `out_of_sync` the writer must re-establish first, and the error ends the session. Sans-IO:
/// the receiver's store and `mc-model` decide with it.
pub fn announced_state(current: MirrorState, announced: MirrorState) -> Result<MirrorState, String> {
    match announced {
        MirrorState::Resyncing | MirrorState::OutOfSync => Ok(announced),
        MirrorState::InSync if matches!(current, MirrorState::Resyncing | MirrorState::InSync) => {
            Ok(announced)
        }
        MirrorState::InSync => {
            Err(format!("in_sync announced while this receiver is {current:?}: re-establish first"))
        }
        other => Err(format!("announcement of {other:?}")),
    }
}

/// A writer's message on its way to the store, counted in the receiver's `unstored` from its
/// arrival until it is dropped: applied, refused, or dropped with the stream or the task.
struct Queued {
    body: Option<In>,
    count: Arc<AtomicU64>,
}

impl Queued {
    fn new(body: In, count: &Arc<AtomicU64>) -> Queued {
        count.fetch_add(1, Ordering::AcqRel);
        Queued { body: Some(body), count: count.clone() }
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

fn nvlog_status(e: &NvlogError) -> Status {
    match e {
        NvlogError::InvalidRecord(_) | NvlogError::WrongWriter { .. } | NvlogError::RecordTooLarge { .. } => {
            Status::invalid_argument(e.to_string())
        }
        NvlogError::StaleGeneration { .. } | NvlogError::NotAfterTail { .. } | NvlogError::Gap { .. } => {
            Status::failed_precondition(e.to_string())
        }
        NvlogError::Full(_) => Status::resource_exhausted(e.to_string()),
        _ => Status::unavailable(e.to_string()),
    }
}

/// Runs a blocking NVLog call off the runtime's threads (a `power` append msyncs).
async fn blocking<T: Send + 'static>(
    op: impl FnOnce() -> Result<T, NvlogError> + Send + 'static,
) -> Result<T, Status> {
    match tokio::task::spawn_blocking(op).await {
        Ok(result) => result.map_err(|e| nvlog_status(&e)),
        Err(e) => Err(Status::internal(format!("NVLog task lost: {e}"))),
    }
}

impl<M: Media + 'static> MirrorReceiver<M> {
    /// A receiver over `nvlog`'s `dr_partner` partition. Its silence watchdog runs on the
    /// current runtime for as long as the receiver lives.
    pub fn new(
        nvlog: Arc<Nvlog<M>>,
        identity: ReceiverIdentity,
        timers: ReceiverTimers,
        clock: Arc<crate::peer::PeerClock>,
        shelf_state: Arc<crate::shelf_state::ShelfState>,
    ) -> Arc<MirrorReceiver<M>> {
        let receiver = Arc::new(MirrorReceiver {
            nvlog,
            identity,
            timers,
            clock,
            shelf_state,
            last_round_trip_ms: Arc::new(AtomicU64::new(0)),
            unstored: Arc::new(AtomicU64::new(0)),
            epoch: Instant::now(),
            stop: tokio::sync::watch::Sender::new(false),
            marked: tokio::sync::watch::Sender::new(0),
            frozen: tokio::sync::RwLock::new(false),
            frozen_watch: tokio::sync::watch::Sender::new(false),
            lease: std::sync::OnceLock::new(),
            mediator: std::sync::OnceLock::new(),
        });
        let weak = Arc::downgrade(&receiver);
        tokio::spawn(async move {
            loop {
                let interval = match weak.upgrade() {
                    Some(receiver) => {
                        receiver.check_silence().await;
                        receiver.timers.keepalive_interval
                    }
                    None => return,
                };
                tokio::time::sleep(interval).await;
            }
        });
        receiver
    }

    /// Ends every stream (shutdown).
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Freezes the writer's partition (a forced switchover, DESIGN §11 step 2): from the return
    /// on, no record, release or announcement of the writer is applied, its streams end, and
    /// its hellos are answered with this node's epochs and refused (so a deposed writer learns
    /// of the higher epoch, S2). Not undone in this life of the node (heal restarts it).
    pub async fn freeze(&self) {
        *self.frozen.write().await = true;
        self.frozen_watch.send_replace(true);
    }

    /// Lets this receiver's keepalive round trips renew `lease` (a mediator is configured, S6).
    pub fn set_lease(&self, lease: crate::lease::SharedLease) {
        let _ = self.lease.set(lease);
    }

    /// This node's mediator link: its silence rides on hellos and keepalive replies.
    pub fn set_mediator(&self, link: Arc<crate::mediator_link::MediatorLink>) {
        let _ = self.mediator.set(link);
    }

    fn mediator_silent(&self) -> bool {
        self.mediator.get().is_some_and(|m| !m.answering())
    }

    /// Drops every record of the writer held here (a switchback, before `thaw`): they are from
    /// before the switchover, replayed by it and on both plexes since the switchback's CP. Kept,
    /// they would stand for the writer's new records of the same lsns (a writer that lost its
    /// NVLog counts on from its last CP, below them): a hello would count them as held (S1) or
    /// return them to the writer to replay over newer data (S8). The release point stays.
    pub async fn drop_held_records(&self) -> Result<(), String> {
        // Held while the partition is reset: no message is being stored meanwhile.
        let _frozen = self.frozen.write().await;
        let nvlog = self.nvlog.clone();
        blocking(move || nvlog.reset_partition(KIND)).await.map(|_| ()).map_err(|s| s.message().to_string())
    }

    /// Ends a freeze (a switchback, DESIGN §11): the writer's aggregates now carry epochs above
    /// every one it held before, persisted here, so nothing it sent at the old ones is accepted;
    /// its new sessions re-establish the mirror (§4.2).
    pub async fn thaw(&self) {
        *self.frozen.write().await = false;
        self.frozen_watch.send_replace(false);
    }

    /// Whether the writer's partition is frozen.
    pub fn is_frozen(&self) -> bool {
        *self.frozen_watch.borrow()
    }

    /// How many of the writer's messages were received and wait for the store (records,
    /// releases, announcements): the account reflects them only once this is zero.
    pub fn unstored(&self) -> u64 {
        self.unstored.load(Ordering::Acquire)
    }

    /// How long ago the last round trip with the writer completed (a reply to our keepalive),
    /// `None` if none did in this life of the node.
    pub fn last_round_trip_age(&self) -> Option<Duration> {
        let at = self.last_round_trip_ms.load(Ordering::Acquire);
        (at > 0).then(|| Duration::from_millis(self.now_ms().saturating_sub(at)))
    }

    /// S13: no round trip with the writer for `silence_limit` persists `out_of_sync`.
    async fn check_silence(&self) {
        let silent_ms = self.now_ms().saturating_sub(self.last_round_trip_ms.load(Ordering::Acquire));
        let silent_for = Duration::from_millis(silent_ms);
        let limit = self.timers.silence_limit;
        if silent_for < limit {
            return;
        }
        let nvlog = self.nvlog.clone();
        let changed = blocking(move || {
            let state = nvlog.status(KIND)?.mirror_state;
            if silence_marks_out_of_sync(state, silent_for, limit) {
                nvlog.set_mirror_state(KIND, MirrorState::OutOfSync)?;
                return Ok(true);
            }
            Ok(false)
        })
        .await;
        if let Ok(true) = changed {
            self.marked.send_modify(|n| *n += 1);
            tracing::warn!(
                writer = self.identity.writer,
                silent_ms,
                "no round trip with the writer: out_of_sync (S13)"
            );
        }
    }

    fn check_identity(&self, identity: Option<&Identity>) -> Result<(), Status> {
        let identity = identity.ok_or_else(|| Status::invalid_argument("hello without identity"))?;
        if identity.cluster_id.as_slice() != self.identity.cluster {
            return Err(Status::failed_precondition("the writer belongs to another cluster"));
        }
        if identity.sender_node != self.identity.writer {
            return Err(Status::failed_precondition(format!(
                "node {} is not this node's DR partner (node {})",
                identity.sender_node, self.identity.writer
            )));
        }
        if identity.receiver_node != self.identity.node {
            return Err(Status::failed_precondition(format!(
                "the hello is for node {}, this is node {}",
                identity.receiver_node, self.identity.node
            )));
        }
        Ok(())
    }

    fn our_identity(&self) -> Identity {
        Identity {
            cluster_id: self.identity.cluster.to_vec(),
            sender_node: self.identity.node,
            receiver_node: self.identity.writer,
        }
    }

    /// The task that acknowledges records once durable: it takes every lsn appended so far,
    /// persists through the highest (one msync for the batch in `power` mode; nothing to do in
    /// `process` mode) and acknowledges it. It ends with the stream (its sender dropped).
    fn persister(&self, out: mpsc::Sender<Result<ReceiverMessage, Status>>) -> mpsc::UnboundedSender<Lsn> {
        let (tx, mut rx) = mpsc::unbounded_channel::<Lsn>();
        let nvlog = self.nvlog.clone();
        tokio::spawn(async move {
            while let Some(mut lsn) = rx.recv().await {
                while let Ok(next) = rx.try_recv() {
                    lsn = lsn.max(next);
                }
                let result = if nvlog.durability() == nvlog::Durability::Process {
                    nvlog.persist_through(KIND, lsn).map_err(|e| nvlog_status(&e))
                } else {
                    let nvlog = nvlog.clone();
                    blocking(move || nvlog.persist_through(KIND, lsn)).await
                };
                let message = match result {
                    Ok(()) => Ok(ReceiverMessage { body: Some(Out::Ack(RecordAck { lsn: lsn.0 })) }),
                    Err(status) => Err(status),
                };
                let failed = message.is_err();
                if out.send(message).await.is_err() || failed {
                    return;
                }
            }
        });
        tx
    }

    /// Handles one stream until it ends or fails; every outgoing message goes through `out`.
    async fn serve(
        self: Arc<Self>,
        mut inbound: Streaming<WriterMessage>,
        out: mpsc::Sender<Result<ReceiverMessage, Status>>,
    ) -> Result<(), Status> {
        let send = sender(&out, self.timers.silence_limit);
        // 1. The hello.
        let hello = match inbound.message().await? {
            Some(WriterMessage { body: Some(In::Hello(hello)) }) => hello,
            Some(_) => return Err(Status::invalid_argument("the first message must be the writer's hello")),
            None => return Ok(()),
        };
        self.check_identity(hello.identity.as_ref())?;
        // S13 before the answer: a receiver that was paused, or starved, past the silence limit
        // may not have run its periodic check yet, and would tell a writer that lost its own
        // partition that its copy is in sync (found by the model check, docs/safety.md).
        self.check_silence().await;
        // Heard from, but not a round trip: a writer whose hellos arrive while our answers do
        // not (a one-way cut) must not keep this account in sync (S13).
        self.clock.heard();
        // S2: a writer holding an epoch below our mark for one of its aggregates was deposed; a
        // frozen partition (its aggregates switched over to us) takes nothing more from it.
        // Either way it is told our epochs first, so it learns that it was deposed.
        let mut refusal = self.is_frozen().then(|| {
            format!(
                "node {} took over node {}'s aggregates (switchover): its records are no longer \
                 accepted here (S2)",
                self.identity.node, self.identity.writer
            )
        });
        for wire in &hello.epochs {
            let (aggregate, epoch) = crate::wire::from_aggregate_epoch(wire)
                .ok_or_else(|| Status::invalid_argument("a malformed epoch in the hello"))?;
            let mark = self.shelf_state.marks(aggregate).epoch;
            if !crate::shelf_state::admits(mark, epoch) && refusal.is_none() {
                refusal = Some(format!(
                    "stale epoch {}@node{} for aggregate {}: this node saw {}@node{} (S2)",
                    epoch.number,
                    epoch.owner.0,
                    crate::node::hex(&aggregate.0),
                    mark.number,
                    mark.owner.0
                ));
            }
        }
        if let Some(refusal) = refusal {
            let reply = ReceiverHello {
                identity: Some(self.our_identity()),
                epochs: self.shelf_state.wire_epochs(),
                mirror_state: WireMirrorState::OutOfSync as i32,
                refusal: refusal.clone(),
                ..Default::default()
            };
            let _ = send(Out::Hello(reply)).await;
            return Err(Status::failed_precondition(refusal));
        }
        let nvlog = self.nvlog.clone();
        let status = blocking(move || nvlog.status(KIND)).await?;
        tracing::info!(
            writer = self.identity.writer,
            writer_generation = hello.log_generation,
            recovered_tail = hello.recovered_tail_lsn,
            durable_tail = status.durable_lsn.0,
            state = ?status.mirror_state,
            "writer hello"
        );
        // S8: the records we hold above the writer's recovered tail go back to it, right after
        // the hello, which says how many follow.
        let nvlog = self.nvlog.clone();
        let tail = Lsn(hello.recovered_tail_lsn);
        let returned = blocking(move || nvlog.records_above(KIND, tail)).await?;
        let reply = ReceiverHello {
            identity: Some(self.our_identity()),
            partition_generation: status.partition_generation,
            durable_tail_lsn: status.durable_lsn.0,
            mirror_state: crate::wire::mirror_state(status.mirror_state) as i32,
            lost_records: status.mirror_state == MirrorState::Resyncing,
            epochs: self.shelf_state.wire_epochs(),
            returned_records: returned.len() as u64,
            refusal: String::new(),
            mediator_silent: self.mediator_silent(),
            round_trip_since_start: self.last_round_trip_age().is_some(),
        };
        if !send(Out::Hello(reply)).await {
            return Ok(());
        }
        for encoded in returned {
            // The lsn from the record itself: a re-established mirror may have a gap below.
            let lsn = nvlog::record::decode_header(&encoded)
                .map_err(|e| Status::internal(format!("a held record does not decode: {e}")))?
                .lsn
                .0;
            if !send(Out::ReturnedRecord(MirroredRecord { lsn, encoded })).await {
                return Ok(());
            }
        }
        // 2-4. Keepalives are answered here; records, releases and announcements go, in order,
        // to the storage task, so a stalled store (a hung NVRAM) does not stop the keepalives
        // — the writer then hears us and may not drop us without our acknowledgement (S3).
        let mut stop = self.stop.subscribe();
        let mut frozen = self.frozen_watch.subscribe();
        let mut marked = self.marked.subscribe();
        marked.borrow_and_update();
        let (to_store, stored) = mpsc::channel::<Queued>(256);
        let mut storage = tokio::spawn(self.clone().store(stored, out.clone()));
        let mut keepalive = tokio::time::interval(self.timers.keepalive_interval);
        let mut sequence = 0u64;
        let mut sent_keepalives = crate::lease::SentKeepalives::default();
        loop {
            let message = tokio::select! {
                () = async { let _ = stop.wait_for(|stop| *stop).await; } => return Ok(()),
                () = async { let _ = frozen.wait_for(|frozen| *frozen).await; } => {
                    storage.abort();
                    return Err(Status::failed_precondition(
                        "this node took over the writer's aggregates (switchover) (S2)",
                    ));
                }
                ended = &mut storage => {
                    return match ended {
                        Ok(result) => result,
                        Err(e) => Err(Status::internal(format!("the storage task ended: {e}"))),
                    };
                }
                Ok(()) = marked.changed() => {
                    // S13: marked out of sync by silence; the writer is told.
                    let change = ReceiverStateChange {
                        state: WireMirrorState::OutOfSync as i32,
                        reason: "no round trip with the writer within the silence limit (S13)".into(),
                    };
                    if !send(Out::StateChange(change)).await {
                        return Ok(());
                    }
                    continue;
                }
                message = inbound.message() => message?,
                _ = keepalive.tick() => {
                    sequence += 1;
                    sent_keepalives.sent(sequence);
                    if !send(Out::Keepalive(Keepalive { sequence, epochs: self.shelf_state.wire_epochs() })).await {
                        return Ok(());
                    }
                    continue;
                }
            };
            let Some(WriterMessage { body }) = message else { return Ok(()) };
            self.clock.heard();
            match body {
                None => return Err(Status::invalid_argument("an empty message")),
                Some(In::Hello(_)) => return Err(Status::invalid_argument("a second hello on one stream")),
                Some(In::Keepalive(keepalive)) => {
                    let reply = KeepaliveReply {
                        sequence: keepalive.sequence,
                        epochs: self.shelf_state.wire_epochs(),
                        mediator_silent: self.mediator_silent(),
                    };
                    if !send(Out::KeepaliveReply(reply)).await {
                        return Ok(());
                    }
                }
                Some(In::KeepaliveReply(reply)) => {
                    // A round trip completed only when the writer answers our own keepalive.
                    if reply.sequence != 0 && reply.sequence <= sequence {
                        // Never 0: 0 means "no round trip yet".
                        self.last_round_trip_ms.store(self.now_ms().max(1), Ordering::Release);
                        // The DR partner's round trip renews this node's lease too (S6), from
                        // the keepalive's send time.
                        if let (Some(sent), Some(lease)) =
                            (sent_keepalives.answered(reply.sequence), self.lease.get())
                        {
                            lease.renew(sent, None);
                        }
                    }
                }
                Some(other) => {
                    if to_store.send(Queued::new(other, &self.unstored)).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// S2 for one record: its epoch must be the writer's and not below this node's mark for
    /// its aggregate; a higher one becomes the mark, durably, before the record is stored (and
    /// so before it is acknowledged).
    async fn admit_epoch(&self, encoded: &[u8]) -> Result<(), Status> {
        let header = nvlog::record::decode_header(encoded)
            .map_err(|e| Status::invalid_argument(format!("a record that does not decode: {e}")))?;
        let aggregate = plex::Uuid(header.aggregate.0);
        let epoch = plex::Epoch { number: header.epoch.number, owner: plex::NodeId(header.epoch.owner.0) };
        if epoch.owner.0 != self.identity.writer {
            return Err(Status::failed_precondition(format!(
                "lsn {} carries an epoch of node {}, not of its writer (node {})",
                header.lsn.0, epoch.owner.0, self.identity.writer
            )));
        }
        if epoch == self.shelf_state.marks(aggregate).epoch {
            return Ok(());
        }
        self.shelf_state.admit(aggregate, epoch).await.map_err(|e| match e {
            crate::shelf_state::ShelfStateError::Stale { .. } => {
                Status::failed_precondition(format!("lsn {}: {e}", header.lsn.0))
            }
            other => Status::unavailable(other.to_string()),
        })
    }

    /// Stores the writer's records and applies its releases and announcements, in stream order
    /// (module doc, steps 2 and 3).
    async fn store(
        self: Arc<Self>,
        mut stored: mpsc::Receiver<Queued>,
        out: mpsc::Sender<Result<ReceiverMessage, Status>>,
    ) -> Result<(), Status> {
        let send = sender(&out, self.timers.silence_limit);
        let persist = self.persister(out.clone());
        while let Some(mut queued) = stored.recv().await {
            // Counted as unstored until `queued` drops at the end of this turn (or with the task).
            let Some(body) = queued.body.take() else { continue };
            crate::faults::wait_while_stalled(crate::faults::RECEIVER_STORAGE).await;
            // Held while the message is applied: `freeze` waits for it.
            let frozen = self.frozen.read().await;
            if *frozen {
                return Err(Status::failed_precondition(
                    "this node took over the writer's aggregates (switchover) (S2)",
                ));
            }
            match body {
                In::Record(record) => {
                    self.admit_epoch(&record.encoded).await?;
                    // Written into the mapping here (a memcpy); made durable by the persister,
                    // which acknowledges a whole batch with one msync in `power` mode.
                    match self.nvlog.append_copy_buffered(KIND, &record.encoded).map_err(|e| nvlog_status(&e))
                    {
                        Ok(lsn) => {
                            if lsn.0 != record.lsn {
                                return Err(Status::invalid_argument(format!(
                                    "record announced as lsn {} is lsn {}",
                                    record.lsn, lsn.0
                                )));
                            }
                            if self.nvlog.durability() == nvlog::Durability::Process {
                                // The copy into the mapping was the persist: acknowledge now.
                                if !send(Out::Ack(RecordAck { lsn: lsn.0 })).await {
                                    return Ok(());
                                }
                            } else if persist.send(lsn).is_err() {
                                return Ok(());
                            }
                        }
                        Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                            // A gap or an out-of-order record: never acknowledged (S13).
                            let nvlog = self.nvlog.clone();
                            blocking(move || nvlog.set_mirror_state(KIND, MirrorState::OutOfSync)).await?;
                            tracing::warn!(
                                writer = self.identity.writer,
                                "record refused, out_of_sync: {}",
                                status.message()
                            );
                            let change = ReceiverStateChange {
                                state: WireMirrorState::OutOfSync as i32,
                                reason: status.message().to_string(),
                            };
                            if !send(Out::StateChange(change)).await {
                                return Ok(());
                            }
                        }
                        Err(status) => return Err(status),
                    }
                }
                In::Release(release) => {
                    let nvlog = self.nvlog.clone();
                    blocking(move || nvlog.release(KIND, Lsn(release.lsn))).await?;
                }
                In::Announcement(announcement) => {
                    let nvlog = self.nvlog.clone();
                    let announced = match WireMirrorState::try_from(announcement.state) {
                        Ok(WireMirrorState::Resyncing) => MirrorState::Resyncing,
                        Ok(WireMirrorState::InSync) => MirrorState::InSync,
                        Ok(WireMirrorState::OutOfSync) => MirrorState::OutOfSync,
                        Ok(other) => {
                            return Err(Status::invalid_argument(format!("announcement of {other:?}")));
                        }
                        Err(_) => return Err(Status::invalid_argument("unknown mirror state")),
                    };
                    let lsn = Lsn(announcement.lsn);
                    let current = {
                        let nvlog = nvlog.clone();
                        blocking(move || nvlog.status(KIND)).await?
                    };
                    let new_state = announced_state(current.mirror_state, announced)
                        .map_err(Status::failed_precondition)?;
                    blocking(move || {
                        // §4.2: the mirror restarts at the writer's next lsn; below it we are
                        // missing records until the covering CP.
                        if announced == MirrorState::Resyncing && lsn.0 > current.durable_lsn.0 + 1 {
                            nvlog.allow_gap_at(KIND, lsn)?;
                        }
                        nvlog.set_mirror_state(KIND, new_state)
                    })
                    .await?;
                    if announced == MirrorState::OutOfSync {
                        // The writer drops the mirror (S3): persisted here, then acknowledged.
                        let change = ReceiverStateChange {
                            state: WireMirrorState::OutOfSync as i32,
                            reason: "the writer dropped the mirror".into(),
                        };
                        if !send(Out::StateChange(change)).await {
                            return Ok(());
                        }
                    }
                    tracing::info!(writer = self.identity.writer, state = ?new_state, lsn = lsn.0, "mirror state announced");
                }
                _ => return Err(Status::internal("a message that is not stored reached the store")),
            }
        }
        Ok(())
    }
}

/// Sends one message on the stream, `false` when it is closed or takes nothing for `limit`: a
/// writer that takes no message for the silence limit (its side of the link is cut and HTTP/2
/// flow control stalled) ends the stream, and it re-establishes a new one.
fn sender(
    out: &mpsc::Sender<Result<ReceiverMessage, Status>>,
    limit: Duration,
) -> impl Fn(Out) -> Pin<Box<dyn std::future::Future<Output = bool> + Send>> + use<> {
    let out = out.clone();
    move |body: Out| {
        let out = out.clone();
        Box::pin(async move {
            matches!(
                tokio::time::timeout(limit, out.send(Ok(ReceiverMessage { body: Some(body) }))).await,
                Ok(Ok(()))
            )
        })
    }
}

/// The response stream.
pub type ReceiverStream = Pin<Box<dyn Stream<Item = Result<ReceiverMessage, Status>> + Send>>;

/// The gRPC face of a shared receiver.
#[derive(Debug)]
pub struct MirrorService<M: Media>(pub Arc<MirrorReceiver<M>>);

#[tonic::async_trait]
impl<M: Media + 'static> NvlogMirror for MirrorService<M> {
    type MirrorStream = ReceiverStream;

    async fn mirror(
        &self,
        request: Request<Streaming<WriterMessage>>,
    ) -> Result<Response<Self::MirrorStream>, Status> {
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let receiver = self.0.clone();
        tokio::spawn(async move {
            if let Err(status) = receiver.clone().serve(inbound, tx.clone()).await {
                tracing::warn!(writer = receiver.identity.writer, "mirror stream ends: {status}");
                let _ = tx.send(Err(status)).await;
            }
        });
        let stream = futures_stream(rx);
        Ok(Response::new(stream))
    }
}

/// An mpsc receiver as a stream.
struct RxStream(mpsc::Receiver<Result<ReceiverMessage, Status>>);

impl Stream for RxStream {
    type Item = Result<ReceiverMessage, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

fn futures_stream(rx: mpsc::Receiver<Result<ReceiverMessage, Status>>) -> ReceiverStream {
    Box::pin(RxStream(rx))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn in_sync_is_taken_only_after_a_re_establish() {
        use MirrorState::{InSync, OutOfSync, Resyncing};
        for current in [InSync, Resyncing, OutOfSync] {
            assert_eq!(announced_state(current, Resyncing), Ok(Resyncing));
            assert_eq!(announced_state(current, OutOfSync), Ok(OutOfSync));
        }
        assert_eq!(announced_state(Resyncing, InSync), Ok(InSync));
        assert_eq!(announced_state(InSync, InSync), Ok(InSync));
        assert!(announced_state(OutOfSync, InSync).is_err());
    }

    #[tokio::test]
    async fn a_message_counts_as_unstored_until_applied_or_dropped() {
        let count = Arc::new(AtomicU64::new(0));
        let (tx, mut rx) = mpsc::channel::<Queued>(4);
        let release = || In::Release(mc_proto::v1::Release { lsn: 1 });
        tx.send(Queued::new(release(), &count)).await.unwrap();
        tx.send(Queued::new(release(), &count)).await.unwrap();
        assert_eq!(count.load(Ordering::Acquire), 2);
        let mut first = rx.recv().await.unwrap();
        assert!(first.body.take().is_some());
        assert_eq!(count.load(Ordering::Acquire), 2, "taken from the queue, not applied yet");
        drop(first);
        assert_eq!(count.load(Ordering::Acquire), 1);
        // The stream ends with a message still queued: it is dropped with the channel.
        drop(rx);
        assert_eq!(count.load(Ordering::Acquire), 0);
        assert!(tx.send(Queued::new(release(), &count)).await.is_err());
        assert_eq!(count.load(Ordering::Acquire), 0, "a message the closed queue refused is not counted");
    }
}
