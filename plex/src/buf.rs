//! Owned I/O buffers aligned for O_DIRECT.
//!
//! Large buffers (64 KiB and up) are recycled through a small process-wide pool (at most
//! 64 MiB held): a fresh multi-megabyte allocation is a new mapping whose every page faults on
//! first touch, which cost the write path more than the I/O itself (docs/performance.md).
//!
//! Invariants: the memory is aligned to `BLOCK_BYTES`, initialised at allocation (zeroed, or
//! copied from a slice; a recycled buffer is overwritten the same way), and owned by
//! exactly one `AlignedBuf`; an I/O takes the buffer and gives it back with its result, so a
//! buffer is never shared with the kernel and the caller at once.

use std::alloc::{Layout, alloc, alloc_zeroed, dealloc};
use std::fmt;
use std::ptr::NonNull;

use crate::device::BLOCK_BYTES;

const ALIGN: usize = 4096;
/// Buffers at least this large are recycled.
const POOL_MIN_BYTES: usize = 64 << 10;
/// The pool holds at most this many bytes.
const POOL_MAX_BYTES: usize = 64 << 20;

/// Freed large buffers by length, as addresses (a `*mut u8` is not `Send`); each is owned by
/// the pool alone, allocated with `Layout::from_size_align(len, ALIGN)`.
#[derive(Default)]
struct Pool {
    free: std::collections::HashMap<usize, Vec<usize>>,
    bytes: usize,
}

static POOL: std::sync::Mutex<Option<Pool>> = std::sync::Mutex::new(None);

fn pool() -> std::sync::MutexGuard<'static, Option<Pool>> {
    // A panic while holding the lock cannot leave the pool inconsistent (push and pop are
    // single steps), so a poisoned lock is still usable.
    POOL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A recycled buffer of exactly `len` bytes, if the pool has one (its contents are stale).
fn take_pooled(len: usize) -> Option<NonNull<u8>> {
    if len < POOL_MIN_BYTES {
        return None;
    }
    let mut pool = pool();
    let pool = pool.as_mut()?;
    let address = pool.free.get_mut(&len)?.pop()?;
    pool.bytes -= len;
    NonNull::new(address as *mut u8)
}

/// Keeps a freed buffer for reuse; false if the pool is full (the caller frees it).
fn give_pooled(ptr: NonNull<u8>, len: usize) -> bool {
    if len < POOL_MIN_BYTES {
        return false;
    }
    let mut pool = pool();
    let pool = pool.get_or_insert_with(Pool::default);
    if pool.bytes + len > POOL_MAX_BYTES {
        return false;
    }
    pool.free.entry(len).or_default().push(ptr.as_ptr() as usize);
    pool.bytes += len;
    true
}
const _: () = assert!(ALIGN as u64 == BLOCK_BYTES);

/// A heap buffer aligned to 4 KiB.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer owns its memory exclusively; moving it between threads moves that
// ownership, and shared references only allow reads.
unsafe impl Send for AlignedBuf {}
// SAFETY: as above; `&AlignedBuf` gives only `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes.
    pub fn zeroed(len: usize) -> AlignedBuf {
        if len == 0 {
            return AlignedBuf { ptr: NonNull::dangling(), len: 0 };
        }
        if let Some(ptr) = take_pooled(len) {
            // SAFETY: the pool hands out a buffer of exactly `len` bytes that nothing else owns.
            unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, len) };
            return AlignedBuf { ptr, len };
        }
        let layout = Layout::from_size_align(len, ALIGN).expect("a buffer size below isize::MAX");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else { std::alloc::handle_alloc_error(layout) };
        AlignedBuf { ptr, len }
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> AlignedBuf {
        if data.is_empty() {
            return AlignedBuf { ptr: NonNull::dangling(), len: 0 };
        }
        let ptr = match take_pooled(data.len()) {
            Some(ptr) => ptr,
            None => {
                let layout =
                    Layout::from_size_align(data.len(), ALIGN).expect("a buffer size below isize::MAX");
                // SAFETY: the layout has a non-zero size. The memory is uninitialised until the
                // copy below, and nothing reads it before.
                let raw = unsafe { alloc(layout) };
                let Some(ptr) = NonNull::new(raw) else { std::alloc::handle_alloc_error(layout) };
                ptr
            }
        };
        // SAFETY: `ptr` is valid for `data.len()` bytes and owned by nobody else (fresh, or
        // taken from the pool), so it cannot overlap `data`, which is borrowed from a live
        // owner; after the copy every byte is initialised. (No zeroing first: a copy
        // of a 1 MiB write per plex is on the write path.)
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr.as_ptr(), data.len()) };
        AlignedBuf { ptr, len: data.len() }
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len` bytes (or dangling with len 0), initialised (zeroed
        // at allocation), and owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len > 0 && !give_pooled(self.ptr, self.len) {
            let layout = Layout::from_size_align(self.len, ALIGN).expect("the layout it was allocated with");
            // SAFETY: allocated in `zeroed` or `from_slice` (or recycled from the pool, which
            // only holds such buffers) with this very layout, and not freed before.
            unsafe { dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf").field("len", &self.len).finish()
    }
}

impl Clone for AlignedBuf {
    fn clone(&self) -> AlignedBuf {
        AlignedBuf::from_slice(self.as_slice())
    }
}

impl PartialEq for AlignedBuf {
    fn eq(&self, other: &AlignedBuf) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for AlignedBuf {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_zeroed() {
        for len in [4096usize, 8192, 1 << 20] {
            let buf = AlignedBuf::zeroed(len);
            assert_eq!(buf.as_slice().as_ptr() as usize % ALIGN, 0);
            assert!(buf.as_slice().iter().all(|&b| b == 0));
        }
        assert!(AlignedBuf::zeroed(0).is_empty());
        assert_eq!(AlignedBuf::from_slice(b"abc").as_slice(), b"abc");
    }
}
