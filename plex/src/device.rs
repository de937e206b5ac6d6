//! The block device every disk is used through (DESIGN §6.2).
//!
//! Invariants every implementation keeps (the conformance body in `testing` checks them):
//! - offsets and lengths are multiples of `BLOCK_BYTES`, and inside the device; anything else
//!   is an error value, never a panic, and touches nothing;
//! - a buffer handed to `read` or `write` comes back with the result, whatever the result;
//! - a completed `write` is visible to every later `read`; it is durable only once a later
//!   `flush` has completed;
//! - after a failed write or flush the device refuses writes and flushes until it is reopened
//!   (S10); a failed flush is never retried.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::task::Poll;

use crate::buf::AlignedBuf;

/// Data blocks and device I/O are in units of 4 KiB.
pub const BLOCK_BYTES: u64 = 4096;

/// A boxed future, so that devices of different kinds (local, io_uring, remote) can stand
/// behind one `dyn BlockDevice`.
pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why an I/O failed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The device reported an error.
    #[error("{op} at byte {offset} failed: {source}")]
    Io {
        /// `read`, `write` or `flush`.
        op: &'static str,
        /// Where.
        offset: u64,
        /// What the device said.
        #[source]
        source: io::Error,
    },
    /// The range is not inside the device.
    #[error("range {offset}+{len} is outside the device of {size} bytes")]
    OutOfRange {
        /// Start of the range.
        offset: u64,
        /// Its length.
        len: u64,
        /// The device size.
        size: u64,
    },
    /// The offset or length is not a multiple of the block size.
    #[error("range {offset}+{len} is not aligned to {BLOCK_BYTES} bytes")]
    Misaligned {
        /// Start of the range.
        offset: u64,
        /// Its length.
        len: u64,
    },
    /// An earlier write or flush failed: the device refuses writes until reopened (S10).
    #[error("the device failed earlier and refuses writes until it is reopened")]
    Failed,
}

/// A disk: fixed size, 4 KiB blocks, owned buffers.
pub trait BlockDevice: Send + Sync + std::fmt::Debug {
    /// The size in bytes (a multiple of `BLOCK_BYTES`).
    fn size_bytes(&self) -> u64;

    /// Reads `buf.len()` bytes at `offset` into `buf` and returns it.
    fn read(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, (Result<(), DeviceError>, AlignedBuf)>;

    /// Writes `buf` at `offset` and returns it.
    fn write(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, (Result<(), DeviceError>, AlignedBuf)>;

    /// Makes every completed write durable (fdatasync).
    fn flush(&self) -> IoFuture<'_, Result<(), DeviceError>>;
}

/// Checks that `[offset, offset + len)` is block-aligned and inside a device of `size` bytes.
pub fn check_range(offset: u64, len: usize, size: u64) -> Result<(), DeviceError> {
    let len = len as u64;
    if !offset.is_multiple_of(BLOCK_BYTES) || !len.is_multiple_of(BLOCK_BYTES) {
        return Err(DeviceError::Misaligned { offset, len });
    }
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DeviceError::OutOfRange { offset, len, size }),
    }
}

/// Runs every future to completion concurrently on the current task and returns their outputs
/// in order: many requests in flight at once, without spawning.
pub async fn join_all<'a, T>(mut futures: Vec<Pin<Box<dyn Future<Output = T> + Send + 'a>>>) -> Vec<T> {
    let mut outputs: Vec<Option<T>> = futures.iter().map(|_| None).collect();
    poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => *output = Some(value),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending { Poll::Pending } else { Poll::Ready(()) }
    })
    .await;
    outputs.into_iter().map(|output| output.expect("every future completed")).collect()
}
