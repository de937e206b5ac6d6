//! The receiving side of the NVLog mirror over real gRPC (DESIGN §4.2, §5, §8; S8, S13): a
//! writer's records are stored exactly, acknowledged only once durable and only when
//! contiguous, returned above the writer's recovered tail, released on `Release`; a gap or
//! silence makes the receiver persist `out_of_sync` by itself; a re-establish makes it
//! `resyncing` and the covering CP's announcement `in_sync`; a stranger is refused.
#![allow(clippy::unwrap_used)]

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use controller::mirror_receiver::{MirrorReceiver, MirrorService, ReceiverIdentity, ReceiverTimers};
use mc_proto::v1::nvlog_mirror_client::NvlogMirrorClient;
use mc_proto::v1::nvlog_mirror_server::NvlogMirrorServer;
use mc_proto::v1::receiver_message::Body as Out;
use mc_proto::v1::writer_message::Body as In;
use mc_proto::v1::{
    Identity, KeepaliveReply, MirrorAnnouncement, MirrorState as WireState, MirroredRecord, ReceiverMessage,
    Release, WriterHello, WriterMessage,
};
use nvlog::mem::MemMedia;
use nvlog::{
    AggregateId, ClusterId, Epoch, FormatSpec, Generation, Identity as LogIdentity, Lsn, MirrorState, NodeId,
    Nvlog, OpKind, Options, PartitionKind, RecordInput, VolumeId, encode_record,
};
use tokio::sync::mpsc;
use tonic::Streaming;
use tonic::codegen::tokio_stream::Stream;

const CLUSTER: [u8; 16] = [7; 16];
const RECEIVER: u32 = 1;
const WRITER: u32 = 2;
const DEADLINE: Duration = Duration::from_secs(10);

struct Outbound(mpsc::Receiver<WriterMessage>);

impl Stream for Outbound {
    type Item = WriterMessage;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<WriterMessage>> {
        self.0.poll_recv(cx)
    }
}

struct Rig {
    _dir: tempfile::TempDir,
    nvlog: Arc<Nvlog<MemMedia>>,
    receiver: Arc<MirrorReceiver<MemMedia>>,
    address: String,
    _server: tokio::task::JoinHandle<()>,
}

async fn rig(silence_limit: Duration) -> Rig {
    let spec = FormatSpec {
        identity: LogIdentity { cluster: ClusterId(CLUSTER), node: NodeId(RECEIVER) },
        partitions: vec![
            (PartitionKind::Local, NodeId(RECEIVER)),
            (PartitionKind::DrPartner, NodeId(WRITER)),
        ],
        generation_floor: Generation(0),
    };
    let (nvlog, _) = Nvlog::format(MemMedia::new(16 << 20), &spec, Options::default()).unwrap();
    // As the daemon does for a new log: `resyncing` until the writer's covering CP.
    nvlog.set_mirror_state(PartitionKind::DrPartner, MirrorState::Resyncing).unwrap();
    let nvlog = Arc::new(nvlog);
    let dir = tempfile::tempdir().unwrap();
    let receiver = MirrorReceiver::new(
        nvlog.clone(),
        ReceiverIdentity { cluster: CLUSTER, node: RECEIVER, writer: WRITER },
        ReceiverTimers { keepalive_interval: Duration::from_millis(50), silence_limit },
        Arc::new(controller::peer::PeerClock::default()),
        controller::shelf_state::ShelfState::open(
            &dir.path().join("shelf"),
            controller::shelf_state::ShelfOwner { cluster: CLUSTER, node: RECEIVER },
        )
        .unwrap(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let served = receiver.clone();
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(NvlogMirrorServer::new(MirrorService(served)))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
            .unwrap();
    });
    Rig { _dir: dir, nvlog, receiver, address, _server: server }
}

/// One writer stream.
struct Writer {
    to: mpsc::Sender<WriterMessage>,
    from: Streaming<ReceiverMessage>,
}

impl Writer {
    async fn connect(rig: &Rig, identity: Identity, recovered_tail: u64) -> Result<Writer, tonic::Status> {
        Writer::connect_with(rig, identity, recovered_tail, vec![]).await
    }

    async fn connect_with(
        rig: &Rig,
        identity: Identity,
        recovered_tail: u64,
        epochs: Vec<mc_proto::v1::AggregateEpoch>,
    ) -> Result<Writer, tonic::Status> {
        let channel =
            tonic::transport::Channel::from_shared(rig.address.clone()).unwrap().connect().await.unwrap();
        let mut client = NvlogMirrorClient::new(channel);
        let (to, rx) = mpsc::channel(64);
        let hello = WriterHello {
            identity: Some(identity),
            log_generation: 1,
            recovered_tail_lsn: recovered_tail,
            epochs,
        };
        to.send(WriterMessage { body: Some(In::Hello(hello)) }).await.unwrap();
        let from = client.mirror(Outbound(rx)).await?.into_inner();
        Ok(Writer { to, from })
    }

    async fn send(&self, body: In) {
        self.to.send(WriterMessage { body: Some(body) }).await.unwrap();
    }

    /// The next message that is not a keepalive (keepalives are answered here).
    async fn next(&mut self) -> Result<Out, tonic::Status> {
        loop {
            let message =
                tokio::time::timeout(DEADLINE, self.from.message()).await.expect("the receiver answers");
            match message?.and_then(|m| m.body) {
                Some(Out::Keepalive(keepalive)) => {
                    // The receiver may already have ended the stream (after an error it sends
                    // next): a reply that cannot be sent is no failure of the test.
                    let reply = KeepaliveReply {
                        sequence: keepalive.sequence,
                        epochs: vec![],
                        mediator_silent: false,
                    };
                    let _ = self.to.send(WriterMessage { body: Some(In::KeepaliveReply(reply)) }).await;
                }
                Some(body) => return Ok(body),
                None => return Err(tonic::Status::aborted("stream ended")),
            }
        }
    }
}

fn identity() -> Identity {
    Identity { cluster_id: CLUSTER.to_vec(), sender_node: WRITER, receiver_node: RECEIVER }
}

fn record(lsn: u64) -> MirroredRecord {
    record_at(lsn, Epoch { number: 1, owner: NodeId(WRITER) })
}

fn record_at(lsn: u64, epoch: Epoch) -> MirroredRecord {
    let payload = vec![u8::try_from(lsn % 251).unwrap(); 4096];
    let input = RecordInput {
        op: OpKind::Write,
        aggregate: AggregateId([3; 16]),
        epoch,
        volume: VolumeId(1),
        offset: lsn * 4096,
        range_len: 4096,
        payload: &payload,
    };
    MirroredRecord { lsn, encoded: encode_record(&input, Lsn(lsn), Generation(1), NodeId(WRITER)).unwrap() }
}

fn state(rig: &Rig) -> MirrorState {
    rig.nvlog.status(PartitionKind::DrPartner).unwrap().mirror_state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_acknowledged_once_durable_returned_above_the_tail_and_released() {
    let rig = rig(Duration::from_secs(60)).await;
    let mut writer = Writer::connect(&rig, identity(), 0).await.unwrap();
    let Out::Hello(hello) = writer.next().await.unwrap() else { panic!("no hello") };
    assert_eq!(hello.durable_tail_lsn, 0);
    for lsn in 1..=5 {
        let sent = record(lsn);
        writer.send(In::Record(sent.clone())).await;
        assert!(matches!(writer.next().await.unwrap(), Out::Ack(ack) if ack.lsn == lsn));
    }
    assert_eq!(rig.nvlog.status(PartitionKind::DrPartner).unwrap().durable_lsn, Lsn(5));
    // The writer restarts having recovered only up to lsn 2: lsns 3..=5 come back, byte for byte.
    drop(writer);
    let mut writer = Writer::connect(&rig, identity(), 2).await.unwrap();
    let Out::Hello(hello) = writer.next().await.unwrap() else { panic!("no hello") };
    assert_eq!(hello.durable_tail_lsn, 5);
    for lsn in 3..=5 {
        let Out::ReturnedRecord(returned) = writer.next().await.unwrap() else { panic!("no record") };
        assert_eq!(returned, record(lsn));
    }
    // A release after the covering CP.
    writer.send(In::Release(Release { lsn: 4 })).await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while rig.nvlog.status(PartitionKind::DrPartner).unwrap().released_lsn < Lsn(4) {
        assert!(tokio::time::Instant::now() < deadline, "the release was not applied");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_is_never_acknowledged_and_makes_the_receiver_out_of_sync_until_re_established() {
    let rig = rig(Duration::from_secs(60)).await;
    let mut writer = Writer::connect(&rig, identity(), 0).await.unwrap();
    writer.next().await.unwrap();
    // A new log starts `resyncing`; the writer's covering CP makes it `in_sync`.
    assert_eq!(state(&rig), MirrorState::Resyncing);
    writer.send(In::Record(record(1))).await;
    assert!(matches!(writer.next().await.unwrap(), Out::Ack(_)));
    writer.send(In::Announcement(MirrorAnnouncement { state: WireState::InSync as i32, lsn: 1 })).await;
    writer.send(In::Record(record(2))).await;
    assert!(matches!(writer.next().await.unwrap(), Out::Ack(ack) if ack.lsn == 2));
    assert_eq!(state(&rig), MirrorState::InSync);
    // lsn 4 without 3: refused, not acknowledged, out_of_sync persisted and announced.
    writer.send(In::Record(record(4))).await;
    let Out::StateChange(change) = writer.next().await.unwrap() else { panic!("no state change") };
    assert_eq!(change.state, WireState::OutOfSync as i32);
    assert_eq!(state(&rig), MirrorState::OutOfSync);
    assert_eq!(rig.nvlog.status(PartitionKind::DrPartner).unwrap().durable_lsn, Lsn(2));
    // in_sync is refused until the writer re-establishes.
    writer.send(In::Announcement(MirrorAnnouncement { state: WireState::InSync as i32, lsn: 2 })).await;
    assert_eq!(writer.next().await.unwrap_err().code(), tonic::Code::FailedPrecondition);
    // Re-established at lsn 10: resyncing, records from 10 on.
    let mut writer = Writer::connect(&rig, identity(), 2).await.unwrap();
    writer.next().await.unwrap();
    writer.send(In::Announcement(MirrorAnnouncement { state: WireState::Resyncing as i32, lsn: 10 })).await;
    writer.send(In::Record(record(10))).await;
    assert!(matches!(writer.next().await.unwrap(), Out::Ack(ack) if ack.lsn == 10));
    assert_eq!(state(&rig), MirrorState::Resyncing);
    // A writer that recovered nothing gets 1, 2 and 10 back, each under its own lsn.
    drop(writer);
    let mut writer = Writer::connect(&rig, identity(), 0).await.unwrap();
    writer.next().await.unwrap();
    for lsn in [1, 2, 10] {
        let Out::ReturnedRecord(returned) = writer.next().await.unwrap() else { panic!("no record") };
        assert_eq!(returned, record(lsn));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_writer_makes_the_receiver_out_of_sync_by_itself() {
    // A silence limit well above any scheduling stall of a loaded CI machine, well below the
    // deadline.
    let rig = rig(Duration::from_millis(1500)).await;
    let mut writer = Writer::connect(&rig, identity(), 0).await.unwrap();
    writer.next().await.unwrap();
    writer.send(In::Record(record(1))).await;
    assert!(matches!(writer.next().await.unwrap(), Out::Ack(_)));
    writer.send(In::Announcement(MirrorAnnouncement { state: WireState::InSync as i32, lsn: 1 })).await;
    // While the writer answers keepalives, the mirror stays in sync.
    let until = tokio::time::Instant::now() + Duration::from_millis(900);
    while tokio::time::Instant::now() < until {
        let _ = tokio::time::timeout(Duration::from_millis(100), writer.next()).await;
    }
    assert_eq!(state(&rig), MirrorState::InSync);
    // Then it goes silent (it stops answering keepalives, the stream stays open).
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while state(&rig) != MirrorState::OutOfSync {
        assert!(tokio::time::Instant::now() < deadline, "the receiver never noticed the silence");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(writer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_and_garbage_are_refused() {
    let rig = rig(Duration::from_secs(60)).await;
    let cases = [
        Identity { cluster_id: vec![8; 16], ..identity() },
        Identity { sender_node: 9, ..identity() },
        Identity { receiver_node: 9, ..identity() },
        Identity { cluster_id: vec![1, 2], ..identity() },
    ];
    for stranger in cases {
        let result = match Writer::connect(&rig, stranger.clone(), 0).await {
            Ok(mut writer) => writer.next().await.map(|_| ()),
            Err(status) => Err(status),
        };
        assert_eq!(result.unwrap_err().code(), tonic::Code::FailedPrecondition, "{stranger:?}");
    }
    // A record whose bytes are garbage, and a second hello.
    let mut writer = Writer::connect(&rig, identity(), 0).await.unwrap();
    writer.next().await.unwrap();
    writer.send(In::Record(MirroredRecord { lsn: 1, encoded: vec![0xAB; 100] })).await;
    assert_eq!(writer.next().await.unwrap_err().code(), tonic::Code::InvalidArgument);
    let mut writer = Writer::connect(&rig, identity(), 0).await.unwrap();
    writer.next().await.unwrap();
    writer
        .send(In::Hello(WriterHello {
            identity: Some(identity()),
            log_generation: 1,
            recovered_tail_lsn: 0,
            epochs: vec![],
        }))
        .await;
    assert_eq!(writer.next().await.unwrap_err().code(), tonic::Code::InvalidArgument);
    assert_eq!(rig.nvlog.status(PartitionKind::DrPartner).unwrap().last_lsn, Lsn(0), "garbage was stored");
}

/// S2 at the receiver: a record with an epoch above the mark raises it (durably, before its
/// ack); from then on a record or a hello with a lower epoch is refused and nothing is stored;
/// an epoch held by another node than the writer is refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_epochs_are_refused_and_the_mark_is_reported() {
    let rig = rig(Duration::from_secs(60)).await;
    let mut writer = Writer::connect(&rig, identity(), 0).await.unwrap();
    writer.next().await.unwrap();
    writer.send(In::Record(record_at(1, Epoch { number: 2, owner: NodeId(WRITER) }))).await;
    assert!(matches!(writer.next().await.unwrap(), Out::Ack(ack) if ack.lsn == 1));
    writer.send(In::Record(record_at(2, Epoch { number: 1, owner: NodeId(WRITER) }))).await;
    let error = writer.next().await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::FailedPrecondition, "{error:?}");
    assert!(error.message().contains("stale epoch"), "{error:?}");
    assert_eq!(rig.nvlog.status(PartitionKind::DrPartner).unwrap().durable_lsn, Lsn(1));
    // The mark is in the next hello; a hello at the old epoch is refused.
    let mut writer = Writer::connect(&rig, identity(), 1).await.unwrap();
    let Out::Hello(hello) = writer.next().await.unwrap() else { panic!("no hello") };
    let mark = hello.epochs.iter().find(|e| e.aggregate_uuid == [3; 16]).and_then(|e| e.epoch).unwrap();
    assert_eq!((mark.number, mark.owner_node), (2, WRITER));
    writer.send(In::Record(record_at(2, Epoch { number: 2, owner: NodeId(RECEIVER) }))).await;
    let error = writer.next().await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::FailedPrecondition, "an epoch of another node: {error:?}");
    let stale = mc_proto::v1::AggregateEpoch {
        aggregate_uuid: vec![3; 16],
        epoch: Some(mc_proto::v1::Epoch { number: 1, owner_node: WRITER }),
    };
    // A stale hello is answered with the receiver's epochs (so a deposed writer learns why,
    // S2), then refused.
    let mut refused = Writer::connect_with(&rig, identity(), 1, vec![stale]).await.unwrap();
    let Out::Hello(hello) = refused.next().await.unwrap() else { panic!("no hello before the refusal") };
    let mark = hello.epochs.iter().find(|e| e.aggregate_uuid == [3; 16]).and_then(|e| e.epoch).unwrap();
    assert_eq!((mark.number, mark.owner_node), (2, WRITER));
    assert_eq!(hello.returned_records, 0);
    assert!(hello.refusal.contains("stale epoch"), "{hello:?}");
    let error = refused.next().await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::FailedPrecondition, "a stale hello: {error:?}");
    assert_eq!(rig.nvlog.status(PartitionKind::DrPartner).unwrap().durable_lsn, Lsn(1));
}

/// A forced switchover freezes the writer's partition (DESIGN §11 step 2): the open stream
/// ends, a release or announcement sent after it is not applied, and a new hello is answered
/// with the receiver's epochs and refused. Prevents a deposed writer (paused, then resumed)
/// from releasing or re-announcing records the survivor is about to replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_partition_takes_nothing_more_from_its_writer() {
    let rig = rig(Duration::from_secs(60)).await;
    let mut writer = Writer::connect(&rig, identity(), 0).await.unwrap();
    writer.next().await.unwrap();
    for lsn in 1..=3 {
        writer.send(In::Record(record(lsn))).await;
        assert!(matches!(writer.next().await.unwrap(), Out::Ack(ack) if ack.lsn == lsn));
    }
    rig.receiver.freeze().await;
    assert!(rig.receiver.is_frozen());
    writer.send(In::Release(Release { lsn: 3 })).await;
    writer.send(In::Announcement(MirrorAnnouncement { state: WireState::OutOfSync as i32, lsn: 0 })).await;
    writer.send(In::Record(record(4))).await;
    let error = loop {
        match writer.next().await {
            Ok(Out::Ack(ack)) => panic!("lsn {} acknowledged after the freeze", ack.lsn),
            Ok(_) => continue,
            Err(error) => break error,
        }
    };
    assert_eq!(error.code(), tonic::Code::FailedPrecondition, "{error:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let status = rig.nvlog.status(PartitionKind::DrPartner).unwrap();
    assert_eq!(status.released_lsn, Lsn(0), "a release after the freeze was applied");
    assert_eq!(status.durable_lsn, Lsn(3));
    assert_eq!(status.mirror_state, MirrorState::Resyncing, "an announcement after the freeze was applied");
    let mut again = Writer::connect(&rig, identity(), 3).await.unwrap();
    let Out::Hello(hello) = again.next().await.unwrap() else { panic!("no hello before the refusal") };
    assert!(hello.refusal.contains("switchover"), "{hello:?}");
    assert_eq!(again.next().await.unwrap_err().code(), tonic::Code::FailedPrecondition);
}
