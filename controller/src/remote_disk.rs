//! A disk at the other site as a `BlockDevice` over the partner's `DiskService` (DESIGN §6.2):
//! the aggregate's plex 1.
//!
//! Invariants:
//! - every call carries the cluster, this node, the partner, the aggregate, the plex and the
//!   epoch this node holds for the aggregate (S2, DESIGN §8), and has a deadline;
//! - a completed `write` is durable at the partner (the service answers only then, S12); the
//!   writes that wait while `WRITE_CALLS_IN_FLIGHT` calls are in flight go together in one call
//!   (one flush at the partner for all of them), in the order they were queued;
//! - requests above `MAX_IO_BYTES` are split into calls sent concurrently;
//! - after a failed write or flush the device refuses writes and flushes until it is opened
//!   again (S10); a read that fails is only an error;
//! - every answer from the partner counts as hearing from it (`PeerClock`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use mc_proto::v1::disk_service_client::DiskServiceClient;
use mc_proto::v1::{
    DiskCall, DiskExtent, DiskFlushRequest, DiskReadRequest, DiskWriteRequest, Identity, ListDisksRequest,
    OpenDiskRequest, PlexDropRequest, ShelfDiskInfo,
};
use plex::{AlignedBuf, BLOCK_BYTES, BlockDevice, DeviceError, Epoch, IoFuture, Uuid};
use tonic::transport::Channel;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::disk_service::{MAX_EXTENTS, MAX_IO_BYTES};
use crate::peer::PeerClock;

/// Where the partner's disks are and who we are to it.
#[derive(Clone, Debug)]
pub struct RemoteShelf {
    client: DiskServiceClient<Channel>,
    cluster: [u8; 16],
    node: u32,
    partner: u32,
    /// The deadline of one call.
    timeout: Duration,
    clock: Arc<PeerClock>,
}

/// A status as a device error.
fn io_error(op: &'static str, offset: u64, status: &tonic::Status) -> DeviceError {
    DeviceError::Io {
        op,
        offset,
        source: std::io::Error::other(format!("{}: {}", status.code(), status.message())),
    }
}

impl RemoteShelf {
    /// The partner's shelf at `address` (`host:port`); connects lazily, so an unreachable
    /// partner is an error of each call, not of this.
    pub fn new(
        address: &str,
        cluster: [u8; 16],
        node: u32,
        partner: u32,
        timeout: Duration,
        keepalive_interval: Duration,
        clock: Arc<PeerClock>,
    ) -> Result<RemoteShelf, String> {
        // HTTP/2 pings find a dead connection (not the kernel's TCP timeout), but only after
        // the mirror timeout: a cut shorter than it must stall the plex's I/O, not fail it
        // (DESIGN §4.1), and a request is never retried on another connection (a late copy of
        // it could land after a newer write). Calls have the mirror timeout as deadline anyway.
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| format!("partner address {address}: {e}"))?
            .connect_timeout(timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(keepalive_interval)
            .keep_alive_timeout(timeout)
            .keep_alive_while_idle(true);
        let client = DiskServiceClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(mc_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(mc_proto::MAX_MESSAGE_BYTES);
        Ok(RemoteShelf { client, cluster, node, partner, timeout, clock })
    }

    fn identity(&self) -> Identity {
        Identity { cluster_id: self.cluster.to_vec(), sender_node: self.node, receiver_node: self.partner }
    }

    /// The partner's node id.
    pub fn partner(&self) -> u32 {
        self.partner
    }

    async fn bounded<T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, tonic::Status> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(reply)) => {
                self.clock.heard();
                Ok(reply.into_inner())
            }
            Ok(Err(status)) => {
                // A status the partner sent is hearing from it; one our transport made up is not.
                if !matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                ) {
                    self.clock.heard();
                }
                Err(status)
            }
            Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                "the DR partner (node {}) did not answer within {:?}",
                self.partner, self.timeout
            ))),
        }
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout);
        request
    }

    /// The disks of the partner's shelf.
    pub async fn list(&self) -> Result<Vec<ShelfDiskInfo>, tonic::Status> {
        let mut client = self.client.clone();
        let request = self.request(ListDisksRequest { identity: Some(self.identity()) });
        Ok(self.bounded(client.list_disks(request)).await?.disks)
    }

    /// The disks of plex `plex` of `aggregate` at the partner, in name order.
    pub async fn plex_disks(&self, aggregate: Uuid, plex: u8) -> Result<Vec<String>, tonic::Status> {
        let mut names: Vec<String> = self
            .list()
            .await?
            .into_iter()
            .filter(|d| d.labelled && d.aggregate_uuid == aggregate.0 && d.plex_index == u32::from(plex))
            .map(|d| d.name)
            .collect();
        names.sort();
        Ok(names)
    }

    fn call(&self, aggregate: Uuid, epoch: Epoch, plex: u8, disk: &str) -> DiskCall {
        DiskCall {
            identity: Some(self.identity()),
            aggregate_uuid: aggregate.0.to_vec(),
            epoch: Some(mc_proto::v1::Epoch { number: epoch.number, owner_node: epoch.owner.0 }),
            plex_index: u32::from(plex),
            disk: disk.to_string(),
            handle: 0,
        }
    }

    /// Opens disk `disk` at the partner for plex `plex` of `aggregate` at `epoch`, creating a
    /// sparse file of `create_size` bytes if it does not exist and that is not 0.
    pub async fn open(
        &self,
        aggregate: Uuid,
        epoch: Epoch,
        plex: u8,
        disk: &str,
        create_size: u64,
    ) -> Result<RemoteDisk, tonic::Status> {
        let mut call = self.call(aggregate, epoch, plex, disk);
        let mut client = self.client.clone();
        let request =
            self.request(OpenDiskRequest { call: Some(call.clone()), create_size_bytes: create_size });
        let reply = self.bounded(client.open_disk(request)).await?;
        let size = reply.size_bytes;
        // Every call of this opening carries its handle (a reopen refuses the older ones).
        call.handle = reply.handle;
        if size == 0 || !size.is_multiple_of(BLOCK_BYTES) {
            return Err(tonic::Status::failed_precondition(format!(
                "disk {disk} at the partner has {size} bytes, not a positive multiple of {BLOCK_BYTES}"
            )));
        }
        let (writes, queue) = mpsc::unbounded_channel();
        tokio::spawn(send_writes(self.clone(), call.clone(), queue));
        Ok(RemoteDisk {
            shelf: self.clone(),
            call,
            name: disk.to_string(),
            size,
            failed: AtomicBool::new(false),
            writes,
        })
    }

    /// Records at the partner that this node dropped plex `dropped` of `aggregate` (S3).
    pub async fn record_drop(
        &self,
        aggregate: Uuid,
        epoch: Epoch,
        dropped: u8,
        reason: &str,
        survivor_generation: u64,
    ) -> Result<(), tonic::Status> {
        let mut client = self.client.clone();
        let request = self.request(PlexDropRequest {
            call: Some(self.call(aggregate, epoch, dropped, "")),
            dropped_plex: u32::from(dropped),
            reason: reason.to_string(),
            survivor_generation,
        });
        self.bounded(client.record_plex_drop(request)).await.map(|_| ())
    }
}

/// Calls of one disk's writes in flight at once; the writes that arrive meanwhile wait and go
/// together in the next call.
pub const WRITE_CALLS_IN_FLIGHT: usize = 8;

/// One write waiting for a call: its extent and who waits for the answer.
#[derive(Debug)]
struct QueuedWrite {
    offset: u64,
    data: Bytes,
    done: oneshot::Sender<Result<(), tonic::Status>>,
}

/// Sends a disk's queued writes, many per call (group commit on the client: one flush at the
/// partner answers all of a call's extents, S12), with at most `WRITE_CALLS_IN_FLIGHT` calls in
/// flight. A write is answered with its call's answer. Ends when the disk is dropped.
async fn send_writes(shelf: RemoteShelf, call: DiskCall, mut queue: mpsc::UnboundedReceiver<QueuedWrite>) {
    let calls = Arc::new(Semaphore::new(WRITE_CALLS_IN_FLIGHT));
    let mut carry: Option<QueuedWrite> = None;
    loop {
        // The permit first: while every call is in flight, writes gather in the queue.
        let Ok(permit) = calls.clone().acquire_owned().await else { return };
        let first = match carry.take() {
            Some(write) => write,
            None => match queue.recv().await {
                Some(write) => write,
                None => return,
            },
        };
        let mut bytes = first.data.len() as u64;
        let mut batch = vec![first];
        while batch.len() < MAX_EXTENTS {
            match queue.try_recv() {
                Ok(next) if bytes + next.data.len() as u64 <= MAX_IO_BYTES => {
                    bytes += next.data.len() as u64;
                    batch.push(next);
                }
                Ok(next) => {
                    carry = Some(next);
                    break;
                }
                Err(_) => break,
            }
        }
        tokio::spawn(send_batch(shelf.clone(), call.clone(), batch, permit));
    }
}

/// One call with `batch`'s extents; each waiting write gets its answer.
async fn send_batch(
    shelf: RemoteShelf,
    call: DiskCall,
    batch: Vec<QueuedWrite>,
    permit: OwnedSemaphorePermit,
) {
    let mut waiters = Vec::with_capacity(batch.len());
    let mut extents = Vec::with_capacity(batch.len());
    for write in batch {
        extents.push(DiskExtent { offset: write.offset, data: write.data });
        waiters.push(write.done);
    }
    let message = match <[DiskExtent; 1]>::try_from(extents) {
        Ok([one]) => {
            DiskWriteRequest { call: Some(call), offset: one.offset, data: one.data, extents: Vec::new() }
        }
        Err(extents) => DiskWriteRequest { call: Some(call), offset: 0, data: Bytes::new(), extents },
    };
    let mut client = shelf.client.clone();
    let request = shelf.request(message);
    let result = shelf.bounded(client.write(request)).await.map(|_| ());
    drop(permit);
    for waiter in waiters {
        let _ = waiter.send(result.clone());
    }
}

/// One disk at the partner.
#[derive(Debug)]
pub struct RemoteDisk {
    shelf: RemoteShelf,
    call: DiskCall,
    name: String,
    size: u64,
    failed: AtomicBool,
    /// To `send_writes`.
    writes: mpsc::UnboundedSender<QueuedWrite>,
}

impl RemoteDisk {
    /// The disk's name at the partner.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `[offset, offset + len)` in pieces of at most `MAX_IO_BYTES`.
    fn pieces(offset: u64, len: u64) -> Vec<(u64, u64)> {
        let mut pieces = Vec::new();
        let mut at = 0;
        while at < len {
            let n = MAX_IO_BYTES.min(len - at);
            pieces.push((offset + at, n));
            at += n;
        }
        pieces
    }

    async fn read_piece(&self, offset: u64, len: u64) -> Result<Bytes, DeviceError> {
        let mut client = self.shelf.client.clone();
        let request =
            self.shelf.request(DiskReadRequest { call: Some(self.call.clone()), offset, length: len });
        let data =
            self.shelf.bounded(client.read(request)).await.map_err(|s| io_error("read", offset, &s))?.data;
        if data.len() as u64 != len {
            return Err(DeviceError::Io {
                op: "read",
                offset,
                source: std::io::Error::other(format!("the partner returned {} bytes of {len}", data.len())),
            });
        }
        Ok(data)
    }

    async fn write_piece(&self, offset: u64, data: Bytes) -> Result<(), DeviceError> {
        let (done, answer) = oneshot::channel();
        let stopped = || DeviceError::Io {
            op: "write",
            offset,
            source: std::io::Error::other("the disk's write sender stopped"),
        };
        self.writes.send(QueuedWrite { offset, data, done }).map_err(|_| stopped())?;
        match answer.await {
            Ok(result) => result.map_err(|s| io_error("write", offset, &s)),
            Err(_) => Err(stopped()),
        }
    }
}

impl BlockDevice for RemoteDisk {
    fn size_bytes(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, mut buf: AlignedBuf) -> IoFuture<'_, (Result<(), DeviceError>, AlignedBuf)> {
        Box::pin(async move {
            if let Err(e) = plex::device::check_range(offset, buf.len(), self.size) {
                return (Err(e), buf);
            }
            let pieces = RemoteDisk::pieces(offset, buf.len() as u64);
            let futures: Vec<IoFuture<'_, Result<Bytes, DeviceError>>> =
                pieces.iter().map(|&(at, n)| Box::pin(self.read_piece(at, n)) as IoFuture<'_, _>).collect();
            let results = plex::device::join_all(futures).await;
            let out = buf.as_mut_slice();
            let mut at = 0usize;
            for result in results {
                match result {
                    Ok(data) => {
                        out[at..at + data.len()].copy_from_slice(&data);
                        at += data.len();
                    }
                    Err(e) => return (Err(e), buf),
                }
            }
            (Ok(()), buf)
        })
    }

    fn write(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, (Result<(), DeviceError>, AlignedBuf)> {
        Box::pin(async move {
            if self.failed.load(Ordering::Acquire) {
                return (Err(DeviceError::Failed), buf);
            }
            if let Err(e) = plex::device::check_range(offset, buf.len(), self.size) {
                return (Err(e), buf);
            }
            let pieces = RemoteDisk::pieces(offset, buf.len() as u64);
            let futures: Vec<IoFuture<'_, Result<(), DeviceError>>> = pieces
                .iter()
                .map(|&(at, n)| {
                    let start = usize::try_from(at - offset).unwrap_or(usize::MAX);
                    let end = start.saturating_add(usize::try_from(n).unwrap_or(usize::MAX));
                    let data = Bytes::copy_from_slice(&buf.as_slice()[start..end]);
                    Box::pin(self.write_piece(at, data)) as IoFuture<'_, _>
                })
                .collect();
            for result in plex::device::join_all(futures).await {
                if let Err(e) = result {
                    self.failed.store(true, Ordering::Release);
                    return (Err(e), buf);
                }
            }
            (Ok(()), buf)
        })
    }

    fn flush(&self) -> IoFuture<'_, Result<(), DeviceError>> {
        Box::pin(async move {
            if self.failed.load(Ordering::Acquire) {
                return Err(DeviceError::Failed);
            }
            let mut client = self.shelf.client.clone();
            let request = self.shelf.request(DiskFlushRequest { call: Some(self.call.clone()) });
            match self.shelf.bounded(client.flush(request)).await {
                Ok(_) => Ok(()),
                Err(status) => {
                    self.failed.store(true, Ordering::Release);
                    Err(io_error("flush", 0, &status))
                }
            }
        })
    }
}

/// A disk of the remote plex that could not be reached when the aggregate was opened: every
/// I/O fails, so the aggregate drops the plex (S3, S4) and runs degraded until it is reattached
/// with disks opened at the partner.
#[derive(Debug)]
pub struct UnreachableDisk {
    /// Why.
    pub why: String,
}

impl BlockDevice for UnreachableDisk {
    fn size_bytes(&self) -> u64 {
        BLOCK_BYTES
    }

    fn read(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, (Result<(), DeviceError>, AlignedBuf)> {
        Box::pin(async move {
            (
                Err(DeviceError::Io { op: "read", offset, source: std::io::Error::other(self.why.clone()) }),
                buf,
            )
        })
    }

    fn write(&self, _offset: u64, buf: AlignedBuf) -> IoFuture<'_, (Result<(), DeviceError>, AlignedBuf)> {
        Box::pin(async move { (Err(DeviceError::Failed), buf) })
    }

    fn flush(&self) -> IoFuture<'_, Result<(), DeviceError>> {
        Box::pin(async move { Err(DeviceError::Failed) })
    }
}
