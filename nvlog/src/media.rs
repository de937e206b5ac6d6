//! The byte store under the journal: a trait, and the memory-mapped file of production.
//!
//! Invariants:
//! - `write` makes bytes visible to later `read`s at once and durable against a crash of the
//!   process (the page cache outlives it); only a successful `persist` makes them survive a
//!   power loss;
//! - a failed `persist` is never retried by the journal (S10): it latches itself as failed.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;
use std::sync::Arc;

use memmap2::MmapRaw;

/// A fixed-size byte store with an explicit persist barrier.
///
/// The journal guarantees that concurrent `write`s never overlap each other nor a concurrent
/// `read`, so an implementation may copy without further locking.
pub trait Media: Send + Sync {
    /// The fixed size in bytes.
    fn len(&self) -> u64;
    /// True when the media holds no bytes at all.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copies `data` to `offset`.
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Copies `buf.len()` bytes at `offset` into `buf`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Makes every write to `[offset, offset + len)` survive a power loss (whole pages).
    fn persist(&self, offset: u64, len: u64) -> io::Result<()>;
}

impl<T: Media + ?Sized> Media for Arc<T> {
    fn len(&self) -> u64 {
        (**self).len()
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        (**self).write(offset, data)
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).read(offset, buf)
    }
    fn persist(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).persist(offset, len)
    }
}

pub(crate) fn check_range(media_len: u64, offset: u64, len: usize) -> io::Result<usize> {
    let end = u64::try_from(len).ok().and_then(|len| offset.checked_add(len));
    match end {
        Some(end) if end <= media_len => {
            usize::try_from(offset).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset"))
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("range {offset}+{len} is outside the media of {media_len} bytes"),
        )),
    }
}

/// A file mapped shared with memmap2: the NVRAM stand-in of DESIGN §5.
#[derive(Debug)]
pub struct MmapMedia {
    map: MmapRaw,
    len: u64,
    // Keeps the file open for the life of the mapping.
    _file: File,
}

impl MmapMedia {
    /// Creates a new zero-filled file of `len` bytes (sparse) and maps it. Fails if it exists.
    /// The file stays locked (exclusively) until the media is dropped.
    pub fn create(path: &Path, len: u64) -> io::Result<MmapMedia> {
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(path)?;
        lock(&file, path)?;
        file.set_len(len)?;
        file.sync_all()?;
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        MmapMedia::map(file)
    }

    /// Maps an existing file. Fails while another process holds it.
    pub fn open(path: &Path) -> io::Result<MmapMedia> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        lock(&file, path)?;
        MmapMedia::map(file)
    }

    fn map(file: File) -> io::Result<MmapMedia> {
        let len = file.metadata()?.len();
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "the NVLog file is empty"));
        }
        let map = MmapRaw::map_raw(&file)?;
        Ok(MmapMedia { map, len, _file: file })
    }
}

/// Takes an exclusive lock on the file for as long as it is open, so two processes never
/// journal into one log.
fn lock(file: &File, path: &Path) -> io::Result<()> {
    file.try_lock().map_err(|error| match error {
        std::fs::TryLockError::WouldBlock => io::Error::new(
            io::ErrorKind::WouldBlock,
            format!("{} is in use by another process", path.display()),
        ),
        std::fs::TryLockError::Error(error) => error,
    })
}

impl Media for MmapMedia {
    fn len(&self) -> u64 {
        self.len
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let start = check_range(self.len, offset, data.len())?;
        // SAFETY: the range is inside the mapping (checked above), the mapping lives as long as
        // `self`, and the journal never lets two writes, or a write and a read, overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.map.as_mut_ptr().add(start), data.len());
        }
        Ok(())
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = check_range(self.len, offset, buf.len())?;
        // SAFETY: as in `write`; `buf` is a distinct allocation of the right length.
        unsafe {
            std::ptr::copy_nonoverlapping(self.map.as_ptr().add(start), buf.as_mut_ptr(), buf.len());
        }
        Ok(())
    }

    fn persist(&self, offset: u64, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "len"))?;
        let start = check_range(self.len, offset, len)?;
        // memmap2 aligns the start down to a page and calls msync(MS_SYNC).
        self.map.flush_range(start, len)
    }
}
