//! The controller daemon's life (DESIGN §8, §13): open (or create) the NVLog, serve gRPC
//! (`grpc.health.v1`, server reflection) and Prometheus `/metrics`, stop on request.
//!
//! The daemon reads the labels of its shelf (read only), opens its NVLog, starts the mirror
//! writer to its DR partner and the gRPC services (`NvlogMirror` receiver, `Admin`, `Data`),
//! then recovers (`Node::recover`: fenced until the partner confirms, S2) and runs CPs. On
//! shutdown it stops serving, drains, runs a final CP and closes the streams.
//!
//! Invariants:
//! - the NVLog file is opened with the configured durability and an exclusive lock (a second
//!   daemon on the same file fails at start, never shares it); a new file is formatted with a
//!   `local` partition for this node and a `dr_partner` partition for its DR partner;
//! - health is `SERVING` only after the NVLog is open, and `NOT_SERVING` from the moment a
//!   shutdown begins;
//! - `run` returns only after both servers have stopped, or `DRAIN_TIMEOUT` after the shutdown
//!   began (connections still open are then cut); the bound addresses are printed first, on one
//!   line, so that a test or the lab can find servers bound to port 0.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use nvlog::{
    ClusterId, FormatSpec, Generation, Identity, Lsn, MmapMedia, NodeId, Nvlog, Options, PartitionKind,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::Instrument;

use crate::admin::AdminService;
use crate::config::{Config, Durability};
use crate::data::DataService;
use crate::mirror_receiver::{MirrorReceiver, MirrorService, ReceiverIdentity, ReceiverTimers};
use crate::node::{Node, Phase};
use crate::nvlog_mirror::{MirrorWriter, WriterIdentity, WriterTimers};

/// How long a shutdown waits for open connections to finish.
pub const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// The file in `shelf_dir` that keeps the mediator's state version (DESIGN §10 rule 5), with
/// `-<node id>` appended (an HA pair may share a shelf directory).
pub const MEDIATOR_VERSION_FILE: &str = ".mediator-version";
/// The file in `shelf_dir`, with `-<node id>` appended, that says this node's local NVLog
/// partition was lost or corrupt and S8's decision (the partner's copy replaces it, or the
/// volumes are NVFAILed) is not durable yet: undecided, or decided incomplete (NVFAIL), so that no
/// later start decides otherwise (the node's own reports may make the mediator's record intact
/// again meanwhile). Written (atomically, fsynced) before the NVLog is formatted or its partition
/// reset; removed once every NVFAIL is recorded or the copy was adopted. A restart in between
/// finds a valid NVLog (formatted, perhaps refilled from an incomplete copy) and would otherwise
/// serve from it. Layout in docs/formats.md.
pub const NVLOG_LOST_FILE: &str = ".nvlog-lost";
const NVLOG_LOST_MAGIC: &[u8; 8] = b"MCNVLOST";
const NVLOG_LOST_FORMAT: u32 = 1;
/// Magic, format version, cluster id, node id, state, CRC-32.
const NVLOG_LOST_BYTES: usize = 8 + 4 + 16 + 4 + 4 + 4;

/// What the lost-NVLog marker says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LostMark {
    /// No marker: the local partition is what the NVLog file says.
    None,
    /// Lost, S8 not decided yet.
    Undecided,
    /// Lost, and the partner's copy was found incomplete: NVFAIL (also for a damaged or foreign
    /// marker, the safe reading).
    Incomplete,
}

/// The path of this node's `NVLOG_LOST_FILE`.
pub fn nvlog_lost_marker(config: &Config) -> std::path::PathBuf {
    config.shelf_dir.join(format!("{NVLOG_LOST_FILE}-{}", config.node_id))
}

/// The marker's bytes: undecided, or (`incomplete`) the copy found incomplete.
pub fn encode_nvlog_lost(cluster: &[u8; 16], node: u32, incomplete: bool) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(NVLOG_LOST_BYTES);
    bytes.extend_from_slice(NVLOG_LOST_MAGIC);
    bytes.extend_from_slice(&NVLOG_LOST_FORMAT.to_le_bytes());
    bytes.extend_from_slice(cluster);
    bytes.extend_from_slice(&node.to_le_bytes());
    bytes.extend_from_slice(&u32::from(incomplete).to_le_bytes());
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes
}

/// Whether the marker says "incomplete"; an error if it is damaged or not this node's.
fn decode_nvlog_lost(bytes: &[u8], cluster: &[u8; 16], node: u32) -> Result<bool, String> {
    if bytes.len() != NVLOG_LOST_BYTES {
        return Err(format!("{} bytes, expected {NVLOG_LOST_BYTES}", bytes.len()));
    }
    let (body, crc) = bytes.split_at(NVLOG_LOST_BYTES - 4);
    if body[..8] != NVLOG_LOST_MAGIC[..] {
        return Err("not a lost-NVLog marker (bad magic)".into());
    }
    if crc32fast::hash(body).to_le_bytes() != crc {
        return Err("checksum mismatch".into());
    }
    let word = |at: usize| u32::from_le_bytes([body[at], body[at + 1], body[at + 2], body[at + 3]]);
    if word(8) != NVLOG_LOST_FORMAT {
        return Err(format!("format version {} (this controller reads {NVLOG_LOST_FORMAT})", word(8)));
    }
    if body[12..28] != cluster[..] || word(28) != node {
        return Err(format!("written by node {} of another cluster or node", word(28)));
    }
    match word(32) {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(format!("state {other}")),
    }
}

/// Reads this node's marker (S8's state from an earlier start). A damaged or foreign one is
/// logged and read as "incomplete": the volumes are NVFAILed rather than served on a guess.
pub fn read_nvlog_lost(config: &Config) -> std::io::Result<LostMark> {
    let path = nvlog_lost_marker(config);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(LostMark::None),
        Err(e) => return Err(e),
    };
    match decode_nvlog_lost(&bytes, &config.cluster_id, config.node_id) {
        Ok(false) => Ok(LostMark::Undecided),
        Ok(true) => Ok(LostMark::Incomplete),
        Err(e) => {
            tracing::error!(
                path = %path.display(),
                "the lost-NVLog marker is unreadable ({e}): the DR partner's copy counts as incomplete (S8)"
            );
            Ok(LostMark::Incomplete)
        }
    }
}

/// Writes this node's marker durably (atomic replace, fsynced with its directory).
pub fn write_nvlog_lost(config: &Config, incomplete: bool) -> std::io::Result<()> {
    let bytes = encode_nvlog_lost(&config.cluster_id, config.node_id, incomplete);
    crate::shelf_state::replace_file(&nvlog_lost_marker(config), &bytes)
}

/// Removes the marker once S8's decision is durable; an error is only logged (the next start
/// decides again, NVFAILing if the copy is incomplete then).
pub fn clear_nvlog_lost(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {
            if let Some(dir) = path.parent()
                && let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all())
            {
                tracing::warn!(path = %path.display(), "fsync after removing the lost-NVLog marker: {e}");
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), "removing the lost-NVLog marker: {e}"),
    }
}

/// Why the daemon cannot start or stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The NVLog cannot be opened or created.
    #[error("NVLog {path}: {message}")]
    Nvlog {
        /// The file.
        path: String,
        /// What failed.
        message: String,
    },
    /// A listen address cannot be bound.
    #[error("bind {what} on {address}: {source}")]
    Bind {
        /// `grpc`, `metrics` or `nbd`.
        what: &'static str,
        /// The address.
        address: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A server failed.
    #[error("{what} server: {message}")]
    Serve {
        /// `grpc` or `metrics`.
        what: &'static str,
        /// What failed.
        message: String,
    },
}

/// Labels of a per-partition gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabels {
    partition: String,
    writer: u64,
}

/// Every metric of the controller so far (STYLE 14: named `controller_<noun>_<unit>`).
#[derive(Debug, Default)]
struct Metrics {
    nvlog_used: Family<PartitionLabels, Gauge>,
    nvlog_size: Family<PartitionLabels, Gauge>,
    nvlog_last_lsn: Family<PartitionLabels, Gauge>,
    /// 1 for the node's current phase, 0 for the others.
    node_phase: Family<PhaseLabels, Gauge>,
    cps: Gauge,
    cp_last_duration_us: Gauge,
    cp_last_blocks: Gauge,
    backpressure_waits: Gauge,
    replayed_records: Gauge,
    mirror_connected: Gauge,
    mirror_acked_lsn: Gauge,
    /// 1 for the writer's account of the DR mirror (in_sync, resyncing, out_of_sync, unknown).
    mirror_state: Family<MirrorStateLabels, Gauge>,
    mirror_drops: Gauge,
    partner_silent_ms: Gauge,
}

/// Labels of the mirror state gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MirrorStateLabels {
    state: String,
}

/// Labels of the phase gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: String,
}

fn gauge_value(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Metrics {
    fn register(&self, registry: &mut Registry) {
        registry.register_with_unit(
            "controller_nvlog_used",
            "NVLog bytes holding unreleased records, per partition",
            Unit::Bytes,
            self.nvlog_used.clone(),
        );
        registry.register_with_unit(
            "controller_nvlog_size",
            "NVLog partition size",
            Unit::Bytes,
            self.nvlog_size.clone(),
        );
        registry.register(
            "controller_nvlog_last_lsn",
            "The highest lsn written in each partition",
            self.nvlog_last_lsn.clone(),
        );
        registry.register(
            "controller_node_phase",
            "1 for the node's phase (starting, fenced, recovering, serving, stopping)",
            self.node_phase.clone(),
        );
        registry.register(
            "controller_cps_completed",
            "Consistency points completed since start",
            self.cps.clone(),
        );
        registry.register(
            "controller_cp_last_duration_microseconds",
            "How long the last CP took",
            self.cp_last_duration_us.clone(),
        );
        registry.register(
            "controller_cp_last_blocks",
            "4 KiB blocks the last CP destaged",
            self.cp_last_blocks.clone(),
        );
        registry.register(
            "controller_write_backpressure_waits",
            "Writes that found both NVLog halves full and waited for a CP, since start",
            self.backpressure_waits.clone(),
        );
        registry.register(
            "controller_nvlog_replayed_records",
            "Records replayed from the local NVLog partition at start",
            self.replayed_records.clone(),
        );
        registry.register(
            "controller_mirror_connected",
            "1 while the NVLog mirror stream to the DR partner is up",
            self.mirror_connected.clone(),
        );
        registry.register(
            "controller_mirror_acked_lsn",
            "Every record up to this lsn is persisted at the DR partner",
            self.mirror_acked_lsn.clone(),
        );
        registry.register(
            "controller_mirror_state",
            "1 for this node's account, as the writer, of its NVLog mirror to the DR partner",
            self.mirror_state.clone(),
        );
        registry.register(
            "controller_mirror_drops",
            "Times the DR partner left the ack set after the mirror timeout (S3), since start",
            self.mirror_drops.clone(),
        );
        registry.register(
            "controller_partner_silent_milliseconds",
            "Time since anything was heard from the DR partner on any service",
            self.partner_silent_ms.clone(),
        );
    }

    /// Reads the node's state into the gauges (at every scrape).
    fn update_node(&self, node: &Node) {
        let phase = node.state().phase;
        for p in [Phase::Starting, Phase::Fenced, Phase::Recovering, Phase::Serving, Phase::Stopping] {
            self.node_phase
                .get_or_create(&PhaseLabels { phase: p.name().to_string() })
                .set(i64::from(p == phase));
        }
        let cp = node.cp_stats();
        self.cps.set(gauge_value(cp.completed));
        self.cp_last_duration_us
            .set(gauge_value(u64::try_from(cp.last_duration.as_micros()).unwrap_or(u64::MAX)));
        self.cp_last_blocks.set(gauge_value(cp.last_blocks));
        self.backpressure_waits.set(gauge_value(cp.backpressure_waits));
        self.replayed_records.set(gauge_value(cp.replayed_records));
        let mirror = node.mirror().status();
        self.mirror_connected.set(i64::from(mirror.connected));
        self.mirror_acked_lsn.set(gauge_value(mirror.acked.0));
        let state = match mirror.state {
            crate::nvlog_mirror::WriterState::Unknown => "unknown",
            crate::nvlog_mirror::WriterState::InSync => "in_sync",
            crate::nvlog_mirror::WriterState::Resyncing { .. } => "resyncing",
            crate::nvlog_mirror::WriterState::OutOfSync => "out_of_sync",
        };
        for s in ["unknown", "in_sync", "resyncing", "out_of_sync"] {
            self.mirror_state
                .get_or_create(&MirrorStateLabels { state: s.to_string() })
                .set(i64::from(s == state));
        }
        self.mirror_drops.set(gauge_value(mirror.drops));
        self.partner_silent_ms
            .set(gauge_value(u64::try_from(node.clock.silent_for().as_millis()).unwrap_or(u64::MAX)));
    }

    /// Reads the NVLog's state into the gauges (at every scrape).
    fn update(&self, nvlog: &Nvlog<MmapMedia>) {
        for kind in PartitionKind::ALL {
            if let Ok(status) = nvlog.status(kind) {
                let labels = PartitionLabels {
                    partition: kind.name().to_string(),
                    writer: u64::from(status.writer.0),
                };
                self.nvlog_used
                    .get_or_create(&labels)
                    .set(i64::try_from(status.used_bytes).unwrap_or(i64::MAX));
                self.nvlog_size
                    .get_or_create(&labels)
                    .set(i64::try_from(status.size_bytes).unwrap_or(i64::MAX));
                self.nvlog_last_lsn
                    .get_or_create(&labels)
                    .set(i64::try_from(status.last_lsn.0).unwrap_or(i64::MAX));
            }
        }
    }
}

/// Opens the NVLog, or creates and formats it if the file does not exist.
/// `lsn_floor`: the highest lsn of this node any label records (S8: lsns never go back);
/// `generation_floor`: the highest log generation of this node any label records.
/// Opens (or formats) the NVLog; also returns whether the local partition was lost or corrupt.
/// `mark_lost` runs before a lost partition is reset or a missing file formatted.
fn open_nvlog(
    config: &Config,
    lsn_floor: Lsn,
    generation_floor: u64,
    mark_lost: impl FnOnce() -> Result<(), DaemonError>,
) -> Result<(Nvlog<MmapMedia>, bool), DaemonError> {
    let path = &config.nvlog_path;
    let error = |message: String| DaemonError::Nvlog { path: path.display().to_string(), message };
    // `..default()` fills the test-only fields that exist when the workspace enables them.
    #[allow(clippy::needless_update)]
    let options = Options {
        durability: match config.durability {
            Durability::Process => nvlog::Durability::Process,
            Durability::Power => nvlog::Durability::Power,
        },
        lsn_floor,
        ..Options::default()
    };
    let identity = Identity { cluster: ClusterId(config.cluster_id), node: NodeId(config.node_id) };
    if Path::new(path).exists() {
        let media = MmapMedia::open(path).map_err(|e| error(format!("open: {e}")))?;
        let (log, report) =
            Nvlog::open(media, identity, options).map_err(|e| error(format!("recover: {e}")))?;
        tracing::info!(path = %path.display(), ?report, "NVLog recovered");
        // S8: a corrupt local partition is recovered from the partner's copy: emptied here
        // (its release point and lsn floor stay), then refilled by the records the partner
        // returns above that point at the first mirror handshake, before anything is served.
        let local = log.status(PartitionKind::Local).map_err(|e| error(format!("status: {e}")))?;
        if local.failed {
            tracing::error!(
                path = %path.display(),
                released = local.released_lsn.0,
                "the local NVLog partition is corrupt: its records will be taken from the DR partner's copy (S8)"
            );
            mark_lost()?;
            log.reset_partition(PartitionKind::Local)
                .map_err(|e| error(format!("reset the local partition: {e}")))?;
        }
        Ok((log, local.failed))
    } else {
        mark_lost()?;
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| error(format!("create {}: {e}", dir.display())))?;
        }
        let media =
            MmapMedia::create(path, config.nvlog_size_bytes).map_err(|e| error(format!("create: {e}")))?;
        let spec = FormatSpec {
            identity,
            partitions: vec![
                (PartitionKind::Local, NodeId(config.node_id)),
                (PartitionKind::DrPartner, NodeId(config.dr_partner.node_id)),
            ],
            // A lost log must never reuse a generation its partner may still hold records of:
            // above every generation the labels record, and above the clock in microseconds,
            // which no earlier life of this node can have reached by counting starts.
            generation_floor: Generation(generation_floor.max(unix_micros())),
        };
        let (log, _) = Nvlog::format(media, &spec, options).map_err(|e| error(format!("format: {e}")))?;
        // A new log holds none of the partner's records it may have held before (a lost file):
        // the receiver is `resyncing` until the writer's covering CP (S13, DESIGN §4.2).
        log.set_mirror_state(PartitionKind::DrPartner, nvlog::MirrorState::Resyncing)
            .map_err(|e| error(format!("record the receiver as resyncing: {e}")))?;
        tracing::info!(path = %path.display(), size_bytes = config.nvlog_size_bytes, "NVLog formatted");
        Ok((log, true))
    }
}

fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

async fn bind(what: &'static str, address: SocketAddr) -> Result<TcpListener, DaemonError> {
    TcpListener::bind(address).await.map_err(|source| DaemonError::Bind { what, address, source })
}

/// Runs the daemon until `shutdown` completes, then stops the servers and returns.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    let span = tracing::info_span!("controller", node = config.node_id);
    run_in_span(config, shutdown).instrument(span).await
}

async fn run_in_span(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    // The labels are read, never written, before the partner confirms the epoch (S2).
    let disks = crate::shelf::scan(&config.shelf_dir).await.map_err(|e| DaemonError::Nvlog {
        path: config.shelf_dir.display().to_string(),
        message: format!("scan the shelf: {e}"),
    })?;
    let all = crate::shelf::aggregates(&disks, plex::Uuid(config.cluster_id));
    let ours = |cp: &plex::CpRecord| cp.writer.0 == config.node_id;
    let lsn_floor = all.iter().map(|f| f.last_cp()).filter(ours).map(|cp| cp.last_lsn.0).max().unwrap_or(0);
    let generation_floor =
        all.iter().map(|f| f.last_cp()).filter(ours).map(|cp| cp.log_generation).max().unwrap_or(0);
    // This node's aggregates: plex 0 on this shelf, owned by us. The others here are plex 1 of
    // the DR partner's, served through DiskService.
    let found: Vec<_> = all
        .into_iter()
        .filter(|f| f.plexes[0].iter().any(|d| d.label.as_ref().is_some_and(|l| l.owner.0 == config.node_id)))
        .collect();
    let shelf_state = crate::shelf_state::ShelfState::open(
        &config.shelf_dir,
        crate::shelf_state::ShelfOwner { cluster: config.cluster_id, node: config.node_id },
    )
    .map_err(|e| DaemonError::Nvlog {
        path: config.shelf_dir.display().to_string(),
        message: e.to_string(),
    })?;
    let operations = crate::operations::OperationLog::open(
        &config.shelf_dir,
        crate::shelf_state::ShelfOwner { cluster: config.cluster_id, node: config.node_id },
    )
    .map_err(|e| DaemonError::Nvlog {
        path: config.shelf_dir.display().to_string(),
        message: e.to_string(),
    })?;
    // The DR partner's aggregates a completed forced switchover gave this node (their plex
    // here is plex 1, its labels name this node the owner).
    let switchover = crate::switchover::settle_at_start(&operations, &shelf_state).await;
    crate::heal::settle_at_start(&operations, &shelf_state, config.mediator.is_some()).await;
    // A switchback that raised its epochs ended the hold on the partner's partition.
    let switched_back = crate::heal::switched_back(&operations.list(), &shelf_state);
    let mut found = found;
    if let Some((_, plan)) = &switchover {
        let partner_aggregates = crate::shelf::aggregates(&disks, plex::Uuid(config.cluster_id));
        for mut f in partner_aggregates {
            let ours =
                f.plexes[1].iter().any(|d| d.label.as_ref().is_some_and(|l| l.owner.0 == config.node_id));
            if ours && plan.aggregates.iter().any(|a| a.uuid == f.uuid && a.done) {
                f.switched_over = true;
                found.push(f);
            }
        }
    }
    let clock = Arc::new(crate::peer::PeerClock::default());
    let _pauses = clock.watch_pauses();
    let remote = crate::remote_disk::RemoteShelf::new(
        &config.dr_partner.address,
        config.cluster_id,
        config.node_id,
        config.dr_partner.node_id,
        // A little above the aggregate's own bound on plex I/O, so a stalled link reads as a
        // timeout there (plex out of date), not as a failed disk.
        config.timers.mirror_timeout + std::time::Duration::from_secs(1),
        config.timers.keepalive_interval,
        clock.clone(),
    )
    .map_err(|message| DaemonError::Serve { what: "disk client", message })?;
    // S8: a lost partition stays lost until decided, across restarts (`NVLOG_LOST_FILE`). A node
    // with no aggregate yet (a new cluster) has nothing its lost log could have held.
    let marker = nvlog_lost_marker(&config);
    let marker_error = |what: &str, e: std::io::Error| DaemonError::Nvlog {
        path: marker.display().to_string(),
        message: format!("{what} the lost-NVLog marker: {e}"),
    };
    let mark = read_nvlog_lost(&config).map_err(|e| marker_error("read", e))?;
    let marked = mark != LostMark::None;
    let write_mark = || {
        if found.is_empty() || marked {
            return Ok(());
        }
        write_nvlog_lost(&config, false).map_err(|e| marker_error("write", e))
    };
    let (nvlog, local_partition_lost) = open_nvlog(&config, Lsn(lsn_floor), generation_floor, write_mark)?;
    if marked && !local_partition_lost && !found.is_empty() {
        tracing::error!(
            marker = %marker.display(),
            "the local NVLog partition was lost before the last start, which did not decide whether the DR \
             partner's copy replaces it: deciding now (S8)"
        );
    }
    let local_partition_lost = local_partition_lost || marked;
    let nvlog = Arc::new(nvlog);
    let mirror = MirrorWriter::start(
        nvlog.clone(),
        WriterIdentity {
            cluster: config.cluster_id,
            node: config.node_id,
            partner: config.dr_partner.node_id,
            address: config.dr_partner.address.clone(),
        },
        WriterTimers {
            keepalive_interval: config.timers.keepalive_interval,
            keepalive_timeout: config.timers.keepalive_timeout,
            mirror_timeout: config.timers.mirror_timeout,
        },
        clock.clone(),
    );
    // The epochs this node holds, from its labels, go in its first hello (S2).
    mirror.set_epochs(
        found.iter().filter_map(|f| Some(crate::wire::aggregate_epoch(f.uuid, f.epoch()?))).collect(),
    );
    // A marker found with no aggregate (labels unreadable at this start) stays for a start that
    // finds them.
    let local_partition_lost = local_partition_lost && !found.is_empty();
    let copy_refused = local_partition_lost && mark == LostMark::Incomplete;
    let node = Node::new(
        config.clone(),
        nvlog.clone(),
        crate::node::NodeParts {
            mirror: mirror.clone(),
            local_partition_lost,
            copy_refused,
            shelf_state: shelf_state.clone(),
            remote,
            clock: clock.clone(),
            operations,
        },
    );

    let grpc_listener = bind("grpc", config.grpc_listen).await?;
    let metrics_listener = bind("metrics", config.metrics_listen).await?;
    let grpc_address = grpc_listener.local_addr().map_err(|source| DaemonError::Bind {
        what: "grpc",
        address: config.grpc_listen,
        source,
    })?;
    let metrics_address = metrics_listener.local_addr().map_err(|source| DaemonError::Bind {
        what: "metrics",
        address: config.metrics_listen,
        source,
    })?;
    let nbd_listener = bind("nbd", config.nbd_listen).await?;
    let nbd_address = nbd_listener.local_addr().map_err(|source| DaemonError::Bind {
        what: "nbd",
        address: config.nbd_listen,
        source,
    })?;
    // One line that tests and the lab parse; keep its shape.
    println!(
        "mc-controller node {} listening grpc={grpc_address} metrics={metrics_address} nbd={nbd_address}",
        config.node_id
    );
    tracing::info!(%grpc_address, %metrics_address, %nbd_address, "listening");

    let (stop_tx, stop_rx) = watch::channel(false);
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
    health_reporter.set_service_status("mc.v1.Admin", tonic_health::ServingStatus::Serving).await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(mc_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| DaemonError::Serve { what: "grpc", message: format!("reflection: {e}") })?;

    let receiver_handle;
    let grpc = {
        let mut stop = stop_rx.clone();
        let admin = mc_proto::v1::admin_server::AdminServer::new(AdminService::new(node.clone()))
            .max_decoding_message_size(mc_proto::MAX_MESSAGE_BYTES);
        let data = mc_proto::v1::data_server::DataServer::new(DataService::new(node.clone()))
            .max_decoding_message_size(mc_proto::MAX_MESSAGE_BYTES);
        let receiver = MirrorReceiver::new(
            nvlog.clone(),
            ReceiverIdentity {
                cluster: config.cluster_id,
                node: config.node_id,
                writer: config.dr_partner.node_id,
            },
            ReceiverTimers {
                keepalive_interval: config.timers.keepalive_interval,
                silence_limit: config.timers.mirror_timeout.saturating_sub(config.timers.margin),
            },
            clock.clone(),
            shelf_state.clone(),
        );
        receiver_handle = receiver.clone();
        node.set_receiver(receiver.clone());
        // S6: with a mediator, the lease is renewed by its heartbeats and by the NVLog mirror's
        // keepalive round trips both ways, and checked before every acknowledgement and read.
        if let Some(mediator) = &config.mediator {
            let lease = crate::lease::SharedLease::new(mediator.lease);
            node.set_lease(lease.clone());
            node.mirror().set_lease(lease.clone());
            receiver.set_lease(lease.clone());
            // Before recovery opens an aggregate: its drop hook records drops at the mediator.
            let link = crate::mediator_link::MediatorLink::new(
                mediator.clone(),
                lease,
                config.cluster_id,
                config.node_id,
                Some(config.shelf_dir.join(format!("{MEDIATOR_VERSION_FILE}-{}", config.node_id))),
            );
            node.mirror().set_mediator(link.clone());
            receiver.set_mediator(link.clone());
            let _ = node.mediator.set(link);
        }
        let mirror = mc_proto::v1::nvlog_mirror_server::NvlogMirrorServer::new(MirrorService(receiver))
            .max_decoding_message_size(mc_proto::MAX_MESSAGE_BYTES);
        let disks =
            mc_proto::v1::disk_service_server::DiskServiceServer::new(crate::disk_service::DiskServer::new(
                crate::disk_service::ServerIdentity {
                    cluster: config.cluster_id,
                    node: config.node_id,
                    partner: config.dr_partner.node_id,
                },
                config.shelf_dir.clone(),
                shelf_state.clone(),
                clock.clone(),
            ))
            .max_decoding_message_size(mc_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(mc_proto::MAX_MESSAGE_BYTES);
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(reflection)
            .add_service(admin)
            .add_service(mirror)
            .add_service(data)
            .add_service(disks)
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true)),
                async move {
                    let _ = stop.wait_for(|stop| *stop).await;
                },
            )
    };

    let metrics = Arc::new(Metrics::default());
    let nbd_metrics = crate::nbd::server::NbdMetrics::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    nbd_metrics.register(&mut registry);
    node.plex_metrics().register(&mut registry);
    node.nvfail_metrics().register(&mut registry);
    let registry = Arc::new(registry);
    let app = {
        let (metrics, registry, nvlog, node) =
            (metrics.clone(), registry.clone(), nvlog.clone(), node.clone());
        axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let (metrics, registry, nvlog, node) =
                    (metrics.clone(), registry.clone(), nvlog.clone(), node.clone());
                async move {
                    metrics.update(&nvlog);
                    metrics.update_node(&node);
                    let mut text = String::new();
                    match prometheus_client::encoding::text::encode(&mut text, &registry) {
                        Ok(()) => (
                            axum::http::StatusCode::OK,
                            [("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                            text,
                        ),
                        Err(e) => (
                            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                            [("content-type", "text/plain; charset=utf-8")],
                            format!("encoding the metrics failed: {e}\n"),
                        ),
                    }
                }
            }),
        )
    };
    let http = {
        let mut stop = stop_rx.clone();
        axum::serve(metrics_listener, app).with_graceful_shutdown(async move {
            let _ = stop.wait_for(|stop| *stop).await;
        })
    };

    if switchover.is_some() && !switched_back {
        // A switchover that raised its epochs before this start froze the partner's partition
        // (DESIGN §11).
        receiver_handle.freeze().await;
        node.partner_down_confirmed.store(true, std::sync::atomic::Ordering::Release);
    }
    let grpc = tokio::spawn(grpc);
    let http = tokio::spawn(async move { http.await });
    let nbd = tokio::spawn(
        crate::nbd::server::serve(nbd_listener, node.clone(), nbd_metrics, stop_rx.clone())
            .instrument(tracing::info_span!("nbd", node = config.node_id)),
    );
    let recovery = {
        let (node, stop) = (node.clone(), stop_rx.clone());
        let span = tracing::info_span!("recovery", node = config.node_id);
        tokio::spawn(async move { node.recover(found, stop).await }.instrument(span))
    };
    let cps = tokio::spawn(
        node.clone().run_cps(stop_rx.clone()).instrument(tracing::info_span!("cp", node = config.node_id)),
    );
    let deposed = tokio::spawn(
        node.clone()
            .watch_deposed(stop_rx.clone())
            .instrument(tracing::info_span!("epochs", node = config.node_id)),
    );
    let monitor = tokio::spawn(
        node.clone()
            .run_plex_monitor(stop_rx.clone())
            .instrument(tracing::info_span!("plex-monitor", node = config.node_id)),
    );
    let heartbeat = node.mediator.get().cloned().map(|link| {
        tokio::spawn(
            link.run(node.clone(), stop_rx.clone())
                .instrument(tracing::info_span!("mediator", node = config.node_id)),
        )
    });
    // `mc.v1.Data` is SERVING exactly while the node serves volumes.
    let data_health = {
        let (node, reporter, mut stop) = (node.clone(), health_reporter.clone(), stop_rx.clone());
        tokio::spawn(async move {
            let mut state = node.subscribe();
            loop {
                let serving = state.borrow_and_update().phase == crate::node::Phase::Serving;
                let status = if serving {
                    tonic_health::ServingStatus::Serving
                } else {
                    tonic_health::ServingStatus::NotServing
                };
                reporter.set_service_status("mc.v1.Data", status).await;
                tokio::select! {
                    changed = state.changed() => if changed.is_err() { return },
                    _ = stop.wait_for(|stop| *stop) => return,
                }
            }
        })
    };
    shutdown.await;
    tracing::info!("shutting down");
    health_reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    health_reporter.set_service_status("mc.v1.Admin", tonic_health::ServingStatus::NotServing).await;
    health_reporter.set_service_status("mc.v1.Data", tonic_health::ServingStatus::NotServing).await;
    node.shutdown(DRAIN_TIMEOUT).await;
    receiver_handle.stop();
    recovery.abort();
    let _ = stop_tx.send(true);
    let _ = cps.await;
    let _ = monitor.await;
    let _ = deposed.await;
    if let Some(heartbeat) = heartbeat {
        let _ = heartbeat.await;
    }
    let _ = data_health.await;
    // Servers stop accepting at once and drain open connections; a client that keeps its
    // connection open does not hold the daemon up for more than `DRAIN_TIMEOUT`.
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        let _ = nbd.await;
        (grpc.await, http.await)
    })
    .await;
    let (grpc, http) = match drained {
        Ok(results) => results,
        Err(_) => {
            tracing::warn!(timeout = ?DRAIN_TIMEOUT, "connections still open at shutdown are cut");
            return Ok(());
        }
    };
    match grpc {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(DaemonError::Serve { what: "grpc", message: e.to_string() }),
        Err(e) => return Err(DaemonError::Serve { what: "grpc", message: e.to_string() }),
    }
    match http {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(DaemonError::Serve { what: "metrics", message: e.to_string() }),
        Err(e) => return Err(DaemonError::Serve { what: "metrics", message: e.to_string() }),
    }
    // The NVLog is closed (and its lock released) when the last reference goes.
    drop(node);
    drop(mirror);
    drop(nvlog);
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The lost-NVLog marker round-trips both states; any damage, or another node's or
    /// cluster's marker, is an error (which `read_nvlog_lost` reads as "incomplete").
    #[test]
    fn the_lost_nvlog_marker_round_trips_and_refuses_damage() {
        let cluster = [3u8; 16];
        for incomplete in [false, true] {
            let bytes = encode_nvlog_lost(&cluster, 1, incomplete);
            assert_eq!(decode_nvlog_lost(&bytes, &cluster, 1), Ok(incomplete));
            assert!(decode_nvlog_lost(&bytes, &cluster, 2).unwrap_err().contains("another"));
            assert!(decode_nvlog_lost(&bytes, &[4u8; 16], 1).unwrap_err().contains("another"));
            assert!(decode_nvlog_lost(&bytes[..10], &cluster, 1).is_err());
            assert!(decode_nvlog_lost(&[], &cluster, 1).is_err());
            for at in 0..bytes.len() {
                let mut damaged = bytes.clone();
                damaged[at] ^= 0x01;
                assert!(decode_nvlog_lost(&damaged, &cluster, 1).is_err(), "byte {at} flipped was accepted");
            }
        }
    }
}
