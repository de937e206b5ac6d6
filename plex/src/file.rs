//! A disk in a file (or block device) through plain pread/pwrite on tokio's blocking pool.
//!
//! Invariants: see `device`; in particular, after a failed write or fdatasync the device
//! refuses writes and flushes until it is reopened (S10).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::buf::AlignedBuf;
use crate::device::{BLOCK_BYTES, BlockDevice, DeviceError, IoFuture, check_range};

/// A file or block device used with pread/pwrite and fdatasync.
#[derive(Debug)]
pub struct FileDevice {
    file: Arc<File>,
    size: u64,
    path: PathBuf,
    failed: Arc<AtomicBool>,
}

/// Creates a new sparse file of `size_bytes` (a non-zero multiple of 4 KiB) and syncs it; fails
/// if the file exists. Shared by the devices that live in files.
pub fn create_sparse(path: &Path, size_bytes: u64) -> io::Result<()> {
    if size_bytes == 0 || !size_bytes.is_multiple_of(BLOCK_BYTES) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "size must be a non-zero multiple of 4 KiB"));
    }
    let file = OpenOptions::new().read(true).write(true).create_new(true).open(path)?;
    file.set_len(size_bytes)?;
    file.sync_all()
}

impl FileDevice {
    /// Creates a new sparse file of `size_bytes` (a multiple of 4 KiB); fails if it exists.
    pub fn create(path: &Path, size_bytes: u64) -> io::Result<FileDevice> {
        create_sparse(path, size_bytes)?;
        FileDevice::open(path)
    }

    /// Opens an existing file; its size must be a non-zero multiple of 4 KiB.
    pub fn open(path: &Path) -> io::Result<FileDevice> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let size = file.metadata()?.len();
        if size == 0 || !size.is_multiple_of(BLOCK_BYTES) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is {size} bytes, not a non-zero multiple of 4 KiB", path.display()),
            ));
        }
        Ok(FileDevice { file: Arc::new(file), size, path: path.to_path_buf(), failed: Arc::default() })
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Runs `op` on tokio's blocking pool; a panicked or cancelled task becomes an I/O error.
async fn blocking<T: Send + 'static>(op: impl FnOnce() -> T + Send + 'static, lost: impl FnOnce() -> T) -> T {
    match tokio::task::spawn_blocking(op).await {
        Ok(result) => result,
        Err(_) => lost(),
    }
}

fn lost_task() -> io::Error {
    io::Error::other("the I/O task was lost")
}

impl BlockDevice for FileDevice {
    fn size_bytes(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, (Result<(), DeviceError>, AlignedBuf)> {
        Box::pin(async move {
            if let Err(e) = check_range(offset, buf.len(), self.size) {
                return (Err(e), buf);
            }
            let file = self.file.clone();
            let len = buf.len();
            let (result, buf) = blocking(
                move || {
                    let mut buf = buf;
                    let result = file.read_exact_at(buf.as_mut_slice(), offset);
                    (result, buf)
                },
                || (Err(lost_task()), AlignedBuf::zeroed(len)),
            )
            .await;
            (result.map_err(|source| DeviceError::Io { op: "read", offset, source }), buf)
        })
    }

    fn write(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, (Result<(), DeviceError>, AlignedBuf)> {
        Box::pin(async move {
            if self.failed.load(Ordering::Acquire) {
                return (Err(DeviceError::Failed), buf);
            }
            if let Err(e) = check_range(offset, buf.len(), self.size) {
                return (Err(e), buf);
            }
            let file = self.file.clone();
            let len = buf.len();
            let (result, buf) = blocking(
                move || {
                    let result = file.write_all_at(buf.as_slice(), offset);
                    (result, buf)
                },
                || (Err(lost_task()), AlignedBuf::zeroed(len)),
            )
            .await;
            if result.is_err() {
                self.failed.store(true, Ordering::Release);
            }
            (result.map_err(|source| DeviceError::Io { op: "write", offset, source }), buf)
        })
    }

    fn flush(&self) -> IoFuture<'_, Result<(), DeviceError>> {
        Box::pin(async move {
            if self.failed.load(Ordering::Acquire) {
                return Err(DeviceError::Failed);
            }
            let file = self.file.clone();
            let result = blocking(move || file.sync_data(), || Err(lost_task())).await;
            if result.is_err() {
                // Never retry a failed flush: what it should have made durable is unknown.
                self.failed.store(true, Ordering::Release);
            }
            result.map_err(|source| DeviceError::Io { op: "flush", offset: 0, source })
        })
    }
}
