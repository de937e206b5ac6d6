//! An in-memory disk with injectable faults (DESIGN §6.2, STYLE 1): EIO, torn writes, latency,
//! misdirected writes, and a device that hangs. It also keeps what a power loss would leave:
//! completed writes are volatile until a flush.
//!
//! Invariants: see `device`; faults change only what the fault says (a torn or misdirected
//! write still reports success, like a lying disk; block checksums must catch it).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::watch;

use crate::buf::AlignedBuf;
use crate::device::{BLOCK_BYTES, BlockDevice, DeviceError, IoFuture, check_range};

/// Faults to inject; each `_next_` fault applies to one write and then clears itself.
#[derive(Clone, Debug, Default)]
pub struct MemFaults {
    /// Reads fail with EIO.
    pub read_error: bool,
    /// Writes fail with EIO (and latch the device as failed, S10).
    pub write_error: bool,
    /// Flushes fail with EIO (and latch the device as failed, S10).
    pub flush_error: bool,
    /// The next write lands only its first this-many bytes, yet reports success.
    pub torn_next_write: Option<usize>,
    /// The next write lands at this offset instead, yet reports success.
    pub misdirect_next_write: Option<u64>,
    /// Every I/O takes this long.
    pub latency: Duration,
}

#[derive(Debug)]
struct Contents {
    /// What reads see.
    current: Vec<u8>,
    /// What survives a power loss.
    durable: Vec<u8>,
    /// Completed writes since the last flush, in order.
    pending: Vec<(u64, Vec<u8>)>,
}

/// A disk in memory.
pub struct MemDevice {
    contents: Mutex<Contents>,
    faults: Mutex<MemFaults>,
    hung: watch::Sender<bool>,
    failed: AtomicBool,
}

fn eio() -> std::io::Error {
    std::io::Error::from_raw_os_error(5)
}

impl std::fmt::Debug for MemDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the contents: a test failure must not print megabytes.
        f.debug_struct("MemDevice")
            .field("size_bytes", &self.contents().current.len())
            .field("failed", &self.failed.load(Ordering::Acquire))
            .field("hung", &*self.hung.borrow())
            .finish_non_exhaustive()
    }
}

impl MemDevice {
    /// A zeroed device of `size_bytes` (a non-zero multiple of 4 KiB).
    pub fn new(size_bytes: u64) -> MemDevice {
        assert!(
            size_bytes > 0 && size_bytes.is_multiple_of(BLOCK_BYTES),
            "a device is a non-zero number of blocks, not {size_bytes} bytes"
        );
        MemDevice::from_image(vec![0; usize::try_from(size_bytes).expect("a device that fits in memory")])
    }

    /// A device holding `image`, all of it durable (as after a reboot).
    pub fn from_image(image: Vec<u8>) -> MemDevice {
        MemDevice {
            contents: Mutex::new(Contents { durable: image.clone(), current: image, pending: Vec::new() }),
            faults: Mutex::new(MemFaults::default()),
            hung: watch::channel(false).0,
            failed: AtomicBool::new(false),
        }
    }

    fn contents(&self) -> std::sync::MutexGuard<'_, Contents> {
        self.contents.lock().expect("MemDevice lock holder panicked")
    }

    /// Replaces the injected faults.
    pub fn set_faults(&self, faults: MemFaults) {
        *self.faults.lock().expect("MemDevice lock holder panicked") = faults;
    }

    /// Makes every I/O from now on wait until `unhang` (a disk that stops answering).
    pub fn hang(&self) {
        self.hung.send_replace(true);
    }

    /// Lets waiting and new I/O proceed.
    pub fn unhang(&self) {
        self.hung.send_replace(false);
    }

    /// Clears the fail-stop latch, as reopening a real device would.
    pub fn reopen(&self) {
        self.failed.store(false, Ordering::Release);
    }

    /// What reads see now.
    pub fn snapshot(&self) -> Vec<u8> {
        self.contents().current.clone()
    }

    /// What a power loss now would leave: the flushed image plus the completed writes since
    /// the last flush that `keep(index)` selects, in order.
    pub fn power_loss_image(&self, mut keep: impl FnMut(usize) -> bool) -> Vec<u8> {
        let contents = self.contents();
        let mut image = contents.durable.clone();
        for (index, (offset, data)) in contents.pending.iter().enumerate() {
            if keep(index) {
                let start = usize::try_from(*offset).expect("offset fits usize");
                image[start..start + data.len()].copy_from_slice(data);
            }
        }
        image
    }

    /// Flips bits of the byte at `offset` with `xor`, in what reads see and in what survives a
    /// power loss (bit rot under the file system's feet).
    pub fn corrupt(&self, offset: u64, xor: u8) {
        let mut contents = self.contents();
        let at = usize::try_from(offset).expect("offset fits usize");
        contents.current[at] ^= xor;
        contents.durable[at] ^= xor;
    }

    /// Completed writes not yet flushed.
    pub fn unflushed_writes(&self) -> usize {
        self.contents().pending.len()
    }

    async fn before_io(&self) -> MemFaults {
        let mut hung = self.hung.subscribe();
        // The sender lives as long as `self`, so this only returns once unhung.
        let _ = hung.wait_for(|hung| !*hung).await;
        let faults = self.faults.lock().expect("MemDevice lock holder panicked").clone();
        if !faults.latency.is_zero() {
            tokio::time::sleep(faults.latency).await;
        }
        faults
    }
}

fn to_usize(value: u64) -> usize {
    usize::try_from(value).expect("in-memory offsets fit usize")
}

impl BlockDevice for MemDevice {
    fn size_bytes(&self) -> u64 {
        self.contents().current.len() as u64
    }

    fn read(&self, offset: u64, mut buf: AlignedBuf) -> IoFuture<'_, (Result<(), DeviceError>, AlignedBuf)> {
        Box::pin(async move {
            if let Err(e) = check_range(offset, buf.len(), self.size_bytes()) {
                return (Err(e), buf);
            }
            let faults = self.before_io().await;
            if faults.read_error {
                return (Err(DeviceError::Io { op: "read", offset, source: eio() }), buf);
            }
            let start = to_usize(offset);
            let len = buf.len();
            buf.as_mut_slice().copy_from_slice(&self.contents().current[start..start + len]);
            (Ok(()), buf)
        })
    }

    fn write(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, (Result<(), DeviceError>, AlignedBuf)> {
        Box::pin(async move {
            if self.failed.load(Ordering::Acquire) {
                return (Err(DeviceError::Failed), buf);
            }
            if let Err(e) = check_range(offset, buf.len(), self.size_bytes()) {
                return (Err(e), buf);
            }
            let faults = self.before_io().await;
            if faults.write_error {
                self.failed.store(true, Ordering::Release);
                return (Err(DeviceError::Io { op: "write", offset, source: eio() }), buf);
            }
            let (target, kept) = {
                let mut guard = self.faults.lock().expect("MemDevice lock holder panicked");
                (guard.misdirect_next_write.take().unwrap_or(offset), guard.torn_next_write.take())
            };
            let data = &buf.as_slice()[..kept.unwrap_or(buf.len()).min(buf.len())];
            let mut contents = self.contents();
            // A misdirected write may aim anywhere: clip it to the device.
            let start = to_usize(target).min(contents.current.len());
            let end = (start + data.len()).min(contents.current.len());
            contents.current[start..end].copy_from_slice(&data[..end - start]);
            contents.pending.push((target, data[..end - start].to_vec()));
            drop(contents);
            (Ok(()), buf)
        })
    }

    fn flush(&self) -> IoFuture<'_, Result<(), DeviceError>> {
        Box::pin(async move {
            if self.failed.load(Ordering::Acquire) {
                return Err(DeviceError::Failed);
            }
            let faults = self.before_io().await;
            if faults.flush_error {
                self.failed.store(true, Ordering::Release);
                return Err(DeviceError::Io { op: "flush", offset: 0, source: eio() });
            }
            let mut contents = self.contents();
            contents.durable = contents.current.clone();
            contents.pending.clear();
            Ok(())
        })
    }
}
