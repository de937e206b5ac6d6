//! `DiskService`: this site's shelf served to the DR partner, whose aggregates keep a plex here
//! (DESIGN §6.2, §7, §8; S2, S3, S12).
//!
//! Every call is checked before it touches anything: our cluster, sender = our DR partner,
//! receiver = us; the epoch presented is held by the sender (its owner is the sender) and is not
//! below the aggregate's high-water mark (`ShelfState::admit`, which persists a higher one
//! before the call goes on); the disk is open for that aggregate and plex. A labelled disk
//! belongs to the aggregate and plex its label names; a blank one is bound by `OpenDisk`.
//!
//! Invariants:
//! - a refused call changes nothing: no byte written, no mark raised;
//! - a write is answered only after it is durable: after a flush that began after the write
//!   completed (one flush covers every write completed before it, group commit; S12);
//! - a disk whose write or flush failed refuses everything until it is opened again (S10);
//! - disks of this node's own aggregates (their label names us as owner) are served only to a
//!   partner presenting a higher epoch than the label's (it took them over, S2);
//! - bad input (a malformed call, a range outside the disk, an oversized request) is an error
//!   status, never a panic.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use mc_proto::v1::disk_service_server::DiskService;
use mc_proto::v1::{
    DiskCall, DiskFlushReply, DiskFlushRequest, DiskReadReply, DiskReadRequest, DiskWriteReply,
    DiskWriteRequest, Identity, ListDisksReply, ListDisksRequest, OpenDiskReply, OpenDiskRequest,
    PlexDropReply, PlexDropRequest, ShelfDiskInfo,
};
use plex::{AlignedBuf, BlockDevice, DeviceError, Epoch, NodeId, Uuid};
use tonic::{Request, Response, Status};

use crate::peer::PeerClock;
use crate::shelf_state::{RecordedDrop, ShelfState, ShelfStateError};

/// The largest read or write one call carries (a request under the message limit).
pub const MAX_IO_BYTES: u64 = 1 << 20;
/// The most extents one `Write` carries.
pub const MAX_EXTENTS: usize = 1024;

/// Who serves and for whom.
#[derive(Clone, Copy, Debug)]
pub struct ServerIdentity {
    /// The cluster.
    pub cluster: [u8; 16],
    /// This node.
    pub node: u32,
    /// The DR partner, the only node whose calls are served.
    pub partner: u32,
}

/// A disk open for a partner's aggregate.
#[derive(Debug)]
struct ServedDisk {
    /// This opening's handle.
    handle: u64,
    aggregate: Uuid,
    plex: u8,
    device: Arc<dyn BlockDevice>,
    /// Completed writes, counted.
    written: AtomicU64,
    /// The count of completed writes the last flush covered; the lock serializes flushes.
    flushed: tokio::sync::Mutex<u64>,
    failed: AtomicBool,
}

impl ServedDisk {
    /// Makes every write completed so far durable: returns at once if a flush that began
    /// after `through` writes completed has finished, else flushes (S12).
    async fn durable(&self, through: u64) -> Result<(), DeviceError> {
        let mut flushed = self.flushed.lock().await;
        if *flushed >= through {
            return Ok(());
        }
        let target = self.written.load(Ordering::Acquire);
        self.device.flush().await?;
        *flushed = target;
        Ok(())
    }
}

/// The service.
#[derive(Debug)]
pub struct DiskServer {
    identity: ServerIdentity,
    shelf_dir: PathBuf,
    state: Arc<ShelfState>,
    clock: Arc<PeerClock>,
    open: Mutex<HashMap<String, Arc<ServedDisk>>>,
    /// The last handle given out.
    handles: AtomicU64,
}

fn state_status(e: ShelfStateError) -> Status {
    match e {
        ShelfStateError::Stale { .. } => Status::failed_precondition(e.to_string()),
        _ => Status::unavailable(e.to_string()),
    }
}

fn device_status(e: &DeviceError) -> Status {
    match e {
        DeviceError::OutOfRange { .. } | DeviceError::Misaligned { .. } => {
            Status::invalid_argument(e.to_string())
        }
        DeviceError::Failed => Status::failed_precondition(format!("{e}: open the disk again")),
        DeviceError::Io { .. } => Status::unavailable(e.to_string()),
    }
}

/// The uuid in a 16-byte field.
pub fn uuid_of(bytes: &[u8], what: &str) -> Result<Uuid, Status> {
    <[u8; 16]>::try_from(bytes)
        .map(Uuid)
        .map_err(|_| Status::invalid_argument(format!("{what} is not 16 bytes")))
}

impl DiskServer {
    /// Serves the shelf at `shelf_dir` to `identity.partner`.
    pub fn new(
        identity: ServerIdentity,
        shelf_dir: PathBuf,
        state: Arc<ShelfState>,
        clock: Arc<PeerClock>,
    ) -> DiskServer {
        // Handles start from the clock, so a restarted server never hands out one an earlier
        // life gave (a delayed call of that life is refused too).
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
            .unwrap_or(1);
        DiskServer {
            identity,
            shelf_dir,
            state,
            clock,
            open: Mutex::new(HashMap::new()),
            handles: AtomicU64::new(start),
        }
    }

    fn check_identity(&self, identity: Option<&Identity>) -> Result<(), Status> {
        let identity = identity.ok_or_else(|| Status::invalid_argument("the call has no identity"))?;
        if identity.cluster_id.as_slice() != self.identity.cluster {
            return Err(Status::failed_precondition("the caller belongs to another cluster"));
        }
        if identity.sender_node != self.identity.partner {
            return Err(Status::failed_precondition(format!(
                "node {} is not this node's DR partner (node {})",
                identity.sender_node, self.identity.partner
            )));
        }
        if identity.receiver_node != self.identity.node {
            return Err(Status::failed_precondition(format!(
                "the call is for node {}, this is node {}",
                identity.receiver_node, self.identity.node
            )));
        }
        self.clock.heard();
        Ok(())
    }

    /// Checks the identities and the epoch of a call about an aggregate (S2).
    async fn admit(&self, call: Option<&DiskCall>) -> Result<(Uuid, u8, Epoch), Status> {
        let call = call.ok_or_else(|| Status::invalid_argument("the request has no call"))?;
        self.check_identity(call.identity.as_ref())?;
        let aggregate = uuid_of(&call.aggregate_uuid, "aggregate_uuid")?;
        let epoch = call.epoch.as_ref().ok_or_else(|| Status::invalid_argument("the call has no epoch"))?;
        if epoch.owner_node != self.identity.partner {
            return Err(Status::failed_precondition(format!(
                "epoch {} is held by node {}, not by the caller (node {})",
                epoch.number, epoch.owner_node, self.identity.partner
            )));
        }
        let plex = u8::try_from(call.plex_index)
            .ok()
            .filter(|p| *p <= 1)
            .ok_or_else(|| Status::invalid_argument(format!("there is no plex {}", call.plex_index)))?;
        let epoch = Epoch { number: epoch.number, owner: NodeId(epoch.owner_node) };
        self.state.admit(aggregate, epoch).await.map_err(state_status)?;
        Ok((aggregate, plex, epoch))
    }

    /// The open disk a call is about, if it belongs to the call's aggregate and plex.
    fn served(&self, call: Option<&DiskCall>, aggregate: Uuid, plex: u8) -> Result<Arc<ServedDisk>, Status> {
        let name = call.map(|c| c.disk.as_str()).unwrap_or_default();
        let disk =
            self.open.lock().expect("the open-disk lock holder panicked").get(name).cloned().ok_or_else(
                || Status::failed_precondition(format!("disk {name:?} is not open: call OpenDisk")),
            )?;
        if call.map(|c| c.handle) != Some(disk.handle) {
            return Err(Status::failed_precondition(format!(
                "disk {name:?} was opened again since this call's opening: a late call is refused"
            )));
        }
        if disk.aggregate != aggregate || disk.plex != plex {
            return Err(Status::failed_precondition(format!(
                "disk {name:?} belongs to another aggregate or plex"
            )));
        }
        if disk.failed.load(Ordering::Acquire) {
            return Err(Status::failed_precondition(format!(
                "disk {name:?} failed a write or flush and refuses I/O until opened again (S10)"
            )));
        }
        Ok(disk)
    }

    fn check_io(offset: u64, len: u64) -> Result<(), Status> {
        if len > MAX_IO_BYTES {
            return Err(Status::invalid_argument(format!("{len} bytes: at most {MAX_IO_BYTES} per call")));
        }
        plex::device::check_range(offset, usize::try_from(len).unwrap_or(usize::MAX), u64::MAX)
            .map_err(|e| Status::invalid_argument(e.to_string()))
    }
}

#[tonic::async_trait]
impl DiskService for DiskServer {
    async fn list_disks(
        &self,
        request: Request<ListDisksRequest>,
    ) -> Result<Response<ListDisksReply>, Status> {
        self.check_identity(request.get_ref().identity.as_ref())?;
        let disks = crate::shelf::scan(&self.shelf_dir)
            .await
            .map_err(|e| Status::unavailable(format!("scan the shelf: {e}")))?;
        let disks = disks
            .into_iter()
            .map(|disk| {
                let size = std::fs::metadata(&disk.path).map(|m| m.len()).unwrap_or(0);
                match disk.label {
                    Some(label) if label.cluster.0 == self.identity.cluster => ShelfDiskInfo {
                        name: disk.name,
                        size_bytes: size,
                        aggregate_uuid: label.aggregate.0.to_vec(),
                        plex_index: u32::from(label.plex_index),
                        owner_node: label.owner.0,
                        labelled: true,
                    },
                    Some(_) | None => ShelfDiskInfo {
                        name: disk.name,
                        size_bytes: size,
                        labelled: disk.label.is_some(),
                        ..ShelfDiskInfo::default()
                    },
                }
            })
            .collect();
        Ok(Response::new(ListDisksReply { disks }))
    }

    async fn open_disk(&self, request: Request<OpenDiskRequest>) -> Result<Response<OpenDiskReply>, Status> {
        let request = request.into_inner();
        let call = request.call.as_ref();
        // Identities and the sender's epoch first; the label may hold a higher mark (below).
        let (aggregate, plex, epoch) = self.admit(call).await?;
        let name = call.map(|c| c.disk.clone()).unwrap_or_default();
        crate::shelf::check_disk_name(&name).map_err(Status::invalid_argument)?;
        let path = crate::shelf::ensure_disk_file(&self.shelf_dir, &name, request.create_size_bytes)
            .map_err(Status::invalid_argument)?;
        let device = crate::shelf::open_device(&path)
            .map_err(|e| Status::unavailable(format!("open disk {name}: {e}")))?;
        match plex::read_label(device.as_ref()).await {
            Ok((label, _)) => {
                if label.cluster.0 != self.identity.cluster {
                    return Err(Status::failed_precondition(format!(
                        "disk {name} belongs to another cluster"
                    )));
                }
                if label.aggregate != aggregate || label.plex_index != plex {
                    return Err(Status::failed_precondition(format!(
                        "disk {name} belongs to plex {} of another aggregate",
                        label.plex_index
                    )));
                }
                // Our own aggregate's disk is served only to a partner holding a higher epoch
                // than its label records: it took the aggregate over (a switchover; heal
                // reattaches this plex) or is handing it back (switchback). The mark check
                // below persists that epoch, so our own writes at the old one are refused (S2).
                if label.owner.0 == self.identity.node && epoch <= label.epoch_high_water {
                    return Err(Status::failed_precondition(format!(
                        "disk {name} belongs to an aggregate this node owns"
                    )));
                }
                // The label's mark counts too (S2): a caller below it is stale.
                self.state.observe(aggregate, label.epoch_high_water);
                self.state.admit(aggregate, epoch).await.map_err(state_status)?;
            }
            Err(plex::LabelError::NoValidLabel { .. }) => {
                tracing::info!(disk = %name, aggregate = %crate::node::hex(&aggregate.0), plex, "blank disk bound to the partner's aggregate");
            }
            Err(e) => return Err(Status::unavailable(format!("read the label of disk {name}: {e}"))),
        }
        let size = device.size_bytes();
        let handle = self.handles.fetch_add(1, Ordering::AcqRel) + 1;
        let served = Arc::new(ServedDisk {
            handle,
            aggregate,
            plex,
            device,
            written: AtomicU64::new(0),
            flushed: tokio::sync::Mutex::new(0),
            failed: AtomicBool::new(false),
        });
        self.open.lock().expect("the open-disk lock holder panicked").insert(name, served);
        Ok(Response::new(OpenDiskReply { size_bytes: size, handle }))
    }

    async fn read(&self, request: Request<DiskReadRequest>) -> Result<Response<DiskReadReply>, Status> {
        let request = request.into_inner();
        let (aggregate, plex, _) = self.admit(request.call.as_ref()).await?;
        DiskServer::check_io(request.offset, request.length)?;
        let disk = self.served(request.call.as_ref(), aggregate, plex)?;
        let len = usize::try_from(request.length).map_err(|_| Status::invalid_argument("length"))?;
        let (result, buf) = disk.device.read(request.offset, AlignedBuf::zeroed(len)).await;
        result.map_err(|e| device_status(&e))?;
        Ok(Response::new(DiskReadReply { data: Bytes::copy_from_slice(buf.as_slice()) }))
    }

    async fn write(&self, request: Request<DiskWriteRequest>) -> Result<Response<DiskWriteReply>, Status> {
        let request = request.into_inner();
        // From the epoch check to the answer: a switchover's raise waits for it (S2).
        let _gate = self.state.io_guard().await;
        let (aggregate, plex, _) = self.admit(request.call.as_ref()).await?;
        let extents: Vec<(u64, bytes::Bytes)> = if request.extents.is_empty() {
            vec![(request.offset, request.data)]
        } else {
            if request.offset != 0 || !request.data.is_empty() {
                return Err(Status::invalid_argument(
                    "a write with extents carries no offset or data of its own",
                ));
            }
            request.extents.into_iter().map(|e| (e.offset, e.data)).collect()
        };
        if extents.len() > MAX_EXTENTS {
            return Err(Status::invalid_argument(format!(
                "{} extents in one write; at most {MAX_EXTENTS}",
                extents.len()
            )));
        }
        let total: u64 = extents.iter().map(|(_, data)| data.len() as u64).sum();
        DiskServer::check_io(0, total)?;
        let disk = self.served(request.call.as_ref(), aggregate, plex)?;
        // Every extent is checked before any is written, so a bad one writes nothing.
        for (offset, data) in &extents {
            DiskServer::check_io(*offset, data.len() as u64)?;
            plex::device::check_range(*offset, data.len(), disk.device.size_bytes())
                .map_err(|e| device_status(&e))?;
        }
        let count = extents.len() as u64;
        let writes: Vec<plex::IoFuture<'_, (Result<(), DeviceError>, AlignedBuf)>> = extents
            .iter()
            .map(|(offset, data)| disk.device.write(*offset, AlignedBuf::from_slice(data)))
            .collect();
        for (result, _) in plex::device::join_all(writes).await {
            if let Err(e) = result {
                if !matches!(e, DeviceError::OutOfRange { .. } | DeviceError::Misaligned { .. }) {
                    disk.failed.store(true, Ordering::Release);
                }
                return Err(device_status(&e));
            }
        }
        let through = disk.written.fetch_add(count, Ordering::AcqRel) + count;
        if let Err(e) = disk.durable(through).await {
            disk.failed.store(true, Ordering::Release);
            return Err(device_status(&e));
        }
        Ok(Response::new(DiskWriteReply {}))
    }

    async fn flush(&self, request: Request<DiskFlushRequest>) -> Result<Response<DiskFlushReply>, Status> {
        let request = request.into_inner();
        let _gate = self.state.io_guard().await;
        let (aggregate, plex, _) = self.admit(request.call.as_ref()).await?;
        let disk = self.served(request.call.as_ref(), aggregate, plex)?;
        let through = disk.written.load(Ordering::Acquire);
        if let Err(e) = disk.durable(through).await {
            disk.failed.store(true, Ordering::Release);
            return Err(device_status(&e));
        }
        Ok(Response::new(DiskFlushReply {}))
    }

    async fn record_plex_drop(
        &self,
        request: Request<PlexDropRequest>,
    ) -> Result<Response<PlexDropReply>, Status> {
        let request = request.into_inner();
        let (aggregate, _, epoch) = self.admit(request.call.as_ref()).await?;
        let plex = u8::try_from(request.dropped_plex)
            .ok()
            .filter(|p| *p <= 1)
            .ok_or_else(|| Status::invalid_argument(format!("there is no plex {}", request.dropped_plex)))?;
        let reason = match request.reason.as_str() {
            "timeout" => 0,
            "failed" => 1,
            "out_of_date" => 2,
            other => return Err(Status::invalid_argument(format!("unknown drop reason {other:?}"))),
        };
        let drop = RecordedDrop { plex, reason, survivor_generation: request.survivor_generation };
        self.state.record_drop(aggregate, epoch, drop).await.map_err(state_status)?;
        tracing::warn!(
            aggregate = %crate::node::hex(&aggregate.0),
            plex,
            reason = %request.reason,
            survivor_generation = request.survivor_generation,
            "the DR partner recorded a plex drop here (S3)"
        );
        Ok(Response::new(PlexDropReply {}))
    }
}
