//! The shelf: the directory of disk files at this site (DESIGN §3, §6). Finds the aggregates on
//! it from their disk labels, opens disks for I/O, and creates disk files for new aggregates.
//!
//! A plex's disks are concatenated in the order of their file names, which is the order they
//! were given in when the aggregate was created (the controller sorts them then): disk files
//! must not be renamed.
//!
//! Invariants: scanning only reads; a file whose label cannot be read is reported, never
//! written; disk names are plain file names (no path separators), so a request cannot reach
//! outside the shelf.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use plex::{BlockDevice, DiskLabel, FileDevice, LabelError, UringDevice, Uuid};

/// A disk file of the shelf and what its label says.
#[derive(Clone, Debug)]
pub struct ShelfDisk {
    /// The file name.
    pub name: String,
    /// The full path.
    pub path: PathBuf,
    /// The label, if the disk has a valid one.
    pub label: Option<DiskLabel>,
}

/// An aggregate found on the shelf: its disks, per plex, in order.
#[derive(Clone, Debug)]
pub struct FoundAggregate {
    /// The aggregate.
    pub uuid: Uuid,
    /// Plex 0's and plex 1's disks, each sorted by file name.
    pub plexes: [Vec<ShelfDisk>; 2],
    /// Served here after a switchover: this node's plex is plex 1 (its home is the partner).
    pub switched_over: bool,
}

impl FoundAggregate {
    /// The epoch recorded in the labels of this node's plex here (plex 1 after a switchover).
    pub fn epoch(&self) -> Option<plex::Epoch> {
        let plex = usize::from(self.switched_over);
        self.plexes[plex].iter().filter_map(|d| d.label.as_ref()).map(|l| l.epoch_high_water).max()
    }

    /// The newest CP recorded by any of its labels (what replay starts after, S8).
    pub fn last_cp(&self) -> plex::CpRecord {
        self.plexes
            .iter()
            .flatten()
            .filter_map(|disk| disk.label.as_ref())
            .map(|label| label.last_cp)
            .max_by_key(|cp| (cp.last_lsn, cp.id))
            .unwrap_or_default()
    }
}

/// Why a disk name is refused.
pub fn check_disk_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!("disk name {name:?}: letters, digits, '_', '-' and '.' only, not starting with '.'"))
    }
}

/// Reads the label of every regular file in `dir` (a missing directory is an empty shelf).
pub async fn scan(dir: &Path) -> std::io::Result<Vec<ShelfDisk>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut disks = Vec::new();
    for entry in entries {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            continue;
        }
        let Some(name) = entry.file_name().to_str().map(str::to_string) else { continue };
        if check_disk_name(&name).is_err() || name.ends_with(".tmp") {
            continue;
        }
        let path = entry.path();
        let label = match FileDevice::open(&path) {
            Ok(device) => match plex::read_label(&device).await {
                Ok((label, _)) => Some(label),
                Err(LabelError::NoValidLabel { .. }) => None,
                Err(e) => {
                    tracing::warn!(disk = %path.display(), "label unreadable: {e}");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(disk = %path.display(), "cannot open: {e}");
                None
            }
        };
        disks.push(ShelfDisk { name, path, label });
    }
    disks.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(disks)
}

/// Groups labelled disks of `cluster` by aggregate and plex.
pub fn aggregates(disks: &[ShelfDisk], cluster: Uuid) -> Vec<FoundAggregate> {
    let mut found: BTreeMap<[u8; 16], FoundAggregate> = BTreeMap::new();
    for disk in disks {
        let Some(label) = &disk.label else { continue };
        if label.cluster != cluster || label.plex_index > 1 {
            continue;
        }
        let entry = found.entry(label.aggregate.0).or_insert_with(|| FoundAggregate {
            uuid: label.aggregate,
            plexes: [Vec::new(), Vec::new()],
            switched_over: false,
        });
        entry.plexes[usize::from(label.plex_index)].push(disk.clone());
    }
    found.into_values().collect()
}

/// Opens a disk for I/O: io_uring (the production path, DESIGN §6.2), or pread/pwrite where
/// io_uring is unavailable.
pub fn open_device(path: &Path) -> std::io::Result<Arc<dyn BlockDevice>> {
    match UringDevice::open(path) {
        Ok(device) => Ok(Arc::new(device)),
        Err(e) => {
            tracing::warn!(disk = %path.display(), "io_uring unavailable ({e}); using pread/pwrite");
            Ok(Arc::new(FileDevice::open(path)?))
        }
    }
}

/// The devices of a found aggregate, per plex.
pub fn open_aggregate(found: &FoundAggregate) -> std::io::Result<[Vec<Arc<dyn BlockDevice>>; 2]> {
    let open = |disks: &Vec<ShelfDisk>| -> std::io::Result<Vec<Arc<dyn BlockDevice>>> {
        disks.iter().map(|disk| open_device(&disk.path)).collect()
    };
    Ok([open(&found.plexes[0])?, open(&found.plexes[1])?])
}

/// Creates a sparse disk file of `size_bytes` if it does not exist; an existing file is kept.
pub fn ensure_disk_file(dir: &Path, name: &str, size_bytes: u64) -> Result<PathBuf, String> {
    check_disk_name(name)?;
    std::fs::create_dir_all(dir).map_err(|e| format!("create the shelf {}: {e}", dir.display()))?;
    let path = dir.join(name);
    if path.exists() {
        return Ok(path);
    }
    if size_bytes == 0 {
        return Err(format!("disk {name} does not exist and no size was given to create it"));
    }
    plex::file::create_sparse(&path, size_bytes).map_err(|e| format!("create disk {name}: {e}"))?;
    Ok(path)
}

/// A disk of this shelf written by this node for its own aggregate: every write first checks
/// the epoch this node holds against the shelf's high-water mark, as the DiskService checks the
/// partner's (DESIGN §7, S2): a deposed owner's write fails and touches nothing.
#[derive(Debug)]
pub struct GuardedDisk {
    inner: Arc<dyn BlockDevice>,
    state: Arc<crate::shelf_state::ShelfState>,
    aggregate: Uuid,
    epoch: plex::Epoch,
}

impl GuardedDisk {
    /// `inner`, written at `epoch` for `aggregate`.
    pub fn new(
        inner: Arc<dyn BlockDevice>,
        state: Arc<crate::shelf_state::ShelfState>,
        aggregate: Uuid,
        epoch: plex::Epoch,
    ) -> GuardedDisk {
        GuardedDisk { inner, state, aggregate, epoch }
    }
}

impl BlockDevice for GuardedDisk {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }

    fn read(
        &self,
        offset: u64,
        buf: plex::AlignedBuf,
    ) -> plex::IoFuture<'_, (Result<(), plex::DeviceError>, plex::AlignedBuf)> {
        self.inner.read(offset, buf)
    }

    fn write(
        &self,
        offset: u64,
        buf: plex::AlignedBuf,
    ) -> plex::IoFuture<'_, (Result<(), plex::DeviceError>, plex::AlignedBuf)> {
        Box::pin(async move {
            if let Err(e) = self.state.admit(self.aggregate, self.epoch).await {
                let source = std::io::Error::new(std::io::ErrorKind::PermissionDenied, e.to_string());
                return (Err(plex::DeviceError::Io { op: "write", offset, source }), buf);
            }
            self.inner.write(offset, buf).await
        })
    }

    fn flush(&self) -> plex::IoFuture<'_, Result<(), plex::DeviceError>> {
        self.inner.flush()
    }
}
