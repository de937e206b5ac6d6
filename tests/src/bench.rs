//! What the benchmarks share: the durability modes they compare, latency arithmetic and medians,
//! and the gRPC connection and status call to a daemon.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use nvlog::Durability;

/// A durability mode as the benchmarks' `--modes` flags name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Durable once copied into the mapping.
    Process,
    /// Durable once msync(MS_SYNC) returned.
    Power,
}

impl Mode {
    /// The name reports and configs use.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Process => "process",
            Mode::Power => "power",
        }
    }

    /// The NVLog's durability.
    pub fn durability(self) -> Durability {
        match self {
            Mode::Process => Durability::Process,
            Mode::Power => Durability::Power,
        }
    }
}

/// A duration in nanoseconds, saturating.
pub fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Nanoseconds as microseconds, for reports.
#[allow(clippy::cast_precision_loss)]
pub fn micros(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

/// Nearest-rank percentile of sorted latencies, `per_mille` of 1000; 0 for no samples.
pub fn percentile(sorted: &[u64], per_mille: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (sorted.len() * per_mille).div_ceil(1000);
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// `RAMFS_MAGIC` of Linux (libc does not export it).
#[cfg(target_os = "linux")]
const RAMFS_MAGIC: i128 = 0x8584_58f6;

/// Refuses a directory on a memory file system (`why`: what would not be measured there);
/// returns the file system's name for the report.
#[cfg(target_os = "linux")]
pub fn check_disk_file_system(dir: &Path, why: &str) -> Result<String> {
    use std::os::unix::ffi::OsStrExt as _;

    let canonical = std::fs::canonicalize(dir).with_context(|| format!("resolve {}", dir.display()))?;
    if canonical.starts_with("/dev/shm") {
        bail!("{} is under /dev/shm (memory): use a directory on a disk", canonical.display());
    }
    let path = std::ffi::CString::new(canonical.as_os_str().as_bytes())
        .with_context(|| format!("pass {} to statfs", canonical.display()))?;
    // SAFETY: an all-zero `statfs` is a valid value of this plain C struct.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a NUL-terminated string and `stat` a valid, writable `statfs`, both alive
    // for the call.
    let rc = unsafe { libc::statfs(path.as_ptr(), &mut stat) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statfs {}", canonical.display()));
    }
    // `f_type` is signed or unsigned, 32 or 64 bits, depending on the target.
    let f_type = i128::from(stat.f_type);
    if f_type == i128::from(libc::TMPFS_MAGIC) || f_type == RAMFS_MAGIC {
        bail!(
            "{} is on a memory file system (f_type {f_type:#x}): {why}; pass --dir on a disk (ext4)",
            canonical.display()
        );
    }
    Ok(if f_type == i128::from(libc::EXT4_SUPER_MAGIC) {
        "ext4".to_string()
    } else {
        format!("file system type {f_type:#x}")
    })
}

/// Not checked off Linux.
#[cfg(not(target_os = "linux"))]
pub fn check_disk_file_system(_dir: &Path, _why: &str) -> Result<String> {
    Ok("file system not checked".to_string())
}

/// The median of `values`; `None` when there are none.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some(f64::midpoint(sorted[n / 2 - 1], sorted[n / 2])),
    }
}

/// A gRPC channel to a daemon at `address` (`host:port`).
pub async fn connect(address: &str) -> Result<tonic::transport::Channel> {
    tonic::transport::Channel::from_shared(format!("http://{address}"))
        .context("build the channel's URI")?
        .connect()
        .await
        .with_context(|| format!("connect to {address}"))
}

/// `Admin.Status` of the daemon behind `admin`, in cluster `cluster`.
pub async fn status(
    admin: &mut mc_proto::v1::admin_client::AdminClient<tonic::transport::Channel>,
    cluster: &[u8; 16],
) -> Result<mc_proto::v1::StatusReply> {
    Ok(admin
        .status(mc_proto::v1::StatusRequest { cluster_id: cluster.to_vec() })
        .await
        .context("Admin.Status")?
        .into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The median is the middle value, or the mean of the middle two; none of nothing.
    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let sorted: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&sorted, 500), 50);
        assert_eq!(percentile(&sorted, 990), 99);
        assert_eq!(percentile(&sorted, 1000), 100);
        assert_eq!(percentile(&[7], 990), 7);
        assert_eq!(percentile(&[], 500), 0);
    }

    /// A benchmark must not silently measure a memory file system.
    #[test]
    fn dev_shm_is_refused() {
        if Path::new("/dev/shm").is_dir() {
            assert!(check_disk_file_system(Path::new("/dev/shm"), "test").is_err());
        }
    }
}
