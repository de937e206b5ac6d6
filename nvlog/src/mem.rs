//! An in-memory media that records every write and persist, and produces the images a crash
//! could leave behind (STYLE 1, 15; TigerBeetle's `testing/storage.zig`).
//!
//! Two crash models:
//! - **process crash** (`kill -9`): the page cache survives, so the image is every completed
//!   write, plus possibly a prefix of the write in progress;
//! - **power loss**: the image is what was persisted, plus any subset of the writes not yet
//!   persisted, each possibly torn at 512-byte sector boundaries (disks write sectors
//!   atomically, pages not). This is more adversarial than a real page cache, which is fine.
//!
//! Persist works on whole 4 KiB pages, like msync: persisting one byte persists its page.

use std::io;
use std::sync::Mutex;

use crate::media::{Media, check_range};

/// The page size persist rounds to.
pub const PAGE_BYTES: u64 = 4096;
/// The unit a power loss can tear a write into.
pub const SECTOR_BYTES: u64 = 512;

/// One operation on the media, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Bytes copied in.
    Write {
        /// Where.
        offset: u64,
        /// What.
        data: Vec<u8>,
    },
    /// A persist barrier over a range.
    Persist {
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
    },
}

#[derive(Debug)]
struct Inner {
    /// The image when tracing started: everything in it is durable.
    base: Vec<u8>,
    current: Vec<u8>,
    trace: Vec<Event>,
    fail_writes: bool,
    fail_persists: bool,
}

/// Media in memory, with a trace of every operation and injectable failures.
#[derive(Debug)]
pub struct MemMedia {
    inner: Mutex<Inner>,
}

impl MemMedia {
    /// A zero-filled media of `len` bytes.
    pub fn new(len: u64) -> MemMedia {
        MemMedia::from_image(vec![0; usize::try_from(len).expect("media fits in memory")])
    }

    /// A media holding `image`, all of it durable (as after a reboot).
    pub fn from_image(image: Vec<u8>) -> MemMedia {
        MemMedia {
            inner: Mutex::new(Inner {
                base: image.clone(),
                current: image,
                trace: Vec::new(),
                fail_writes: false,
                fail_persists: false,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("MemMedia lock holder panicked")
    }

    /// Forgets the trace: the current image becomes the durable base (as after a clean persist
    /// of everything).
    pub fn restart_trace(&self) {
        let mut inner = self.lock();
        inner.base = inner.current.clone();
        inner.trace.clear();
    }

    /// The operations since the trace started.
    pub fn trace(&self) -> Vec<Event> {
        self.lock().trace.clone()
    }

    /// How many operations the trace holds.
    pub fn trace_len(&self) -> usize {
        self.lock().trace.len()
    }

    /// A simulator positioned at the start of the trace.
    pub fn crash_sim(&self) -> CrashSim {
        CrashSim::new(self.lock().base.clone())
    }

    /// What a reader sees now.
    pub fn snapshot(&self) -> Vec<u8> {
        self.lock().current.clone()
    }

    /// Makes every following write fail with EIO.
    pub fn fail_writes(&self, fail: bool) {
        self.lock().fail_writes = fail;
    }

    /// Makes every following persist fail with EIO.
    pub fn fail_persists(&self, fail: bool) {
        self.lock().fail_persists = fail;
    }
}

impl Media for MemMedia {
    fn len(&self) -> u64 {
        self.lock().current.len() as u64
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut inner = self.lock();
        if inner.fail_writes {
            return Err(io::Error::from_raw_os_error(libc_eio()));
        }
        let start = check_range(inner.current.len() as u64, offset, data.len())?;
        inner.current[start..start + data.len()].copy_from_slice(data);
        inner.trace.push(Event::Write { offset, data: data.to_vec() });
        Ok(())
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let inner = self.lock();
        let start = check_range(inner.current.len() as u64, offset, buf.len())?;
        buf.copy_from_slice(&inner.current[start..start + buf.len()]);
        Ok(())
    }

    fn persist(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut inner = self.lock();
        if inner.fail_persists {
            return Err(io::Error::from_raw_os_error(libc_eio()));
        }
        let media_len = inner.current.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > media_len) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "persist outside the media"));
        }
        inner.trace.push(Event::Persist { offset, len });
        Ok(())
    }
}

const fn libc_eio() -> i32 {
    5
}

/// A small deterministic generator, so crash images are reproducible from a seed.
#[derive(Clone, Debug)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `0..bound` (`bound > 0`).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound.max(1)
    }
}

/// Replays a trace event by event and produces, at any point, the images a crash there could
/// leave.
#[derive(Clone, Debug)]
pub struct CrashSim {
    durable: Vec<u8>,
    current: Vec<u8>,
    /// Writes not yet covered by a persist, in order (already clipped to what is not persisted).
    pending: Vec<(u64, Vec<u8>)>,
}

impl CrashSim {
    fn new(base: Vec<u8>) -> CrashSim {
        CrashSim { durable: base.clone(), current: base, pending: Vec::new() }
    }

    /// Applies the next event of the trace.
    pub fn apply(&mut self, event: &Event) {
        match event {
            Event::Write { offset, data } => {
                let start = usize::try_from(*offset).expect("offset fits usize");
                self.current[start..start + data.len()].copy_from_slice(data);
                self.pending.push((*offset, data.clone()));
            }
            Event::Persist { offset, len } => {
                let media_len = self.current.len() as u64;
                let first = offset / PAGE_BYTES * PAGE_BYTES;
                let end = (offset + len).div_ceil(PAGE_BYTES) * PAGE_BYTES;
                let end = end.min(media_len);
                let (a, b) = (to_usize(first), to_usize(end));
                self.durable[a..b].copy_from_slice(&self.current[a..b]);
                let mut kept = Vec::with_capacity(self.pending.len());
                for (start, data) in self.pending.drain(..) {
                    let stop = start + data.len() as u64;
                    if stop <= first || start >= end {
                        kept.push((start, data));
                        continue;
                    }
                    if start < first {
                        kept.push((start, data[..to_usize(first - start)].to_vec()));
                    }
                    if stop > end {
                        kept.push((end, data[to_usize(end - start)..].to_vec()));
                    }
                }
                self.pending = kept;
            }
        }
    }

    /// Writes not yet persisted.
    pub fn pending_writes(&self) -> usize {
        self.pending.len()
    }

    /// The image after a process crash: every completed write.
    pub fn process_crash(&self) -> Vec<u8> {
        self.current.clone()
    }

    /// The image after a process crash in the middle of `next` (a write): a random prefix of it.
    pub fn process_crash_during(&self, next: &Event, rng: &mut SplitMix64) -> Option<Vec<u8>> {
        let Event::Write { offset, data } = next else {
            return None;
        };
        let mut image = self.current.clone();
        let cut = to_usize(rng.below(data.len() as u64));
        let start = to_usize(*offset);
        image[start..start + cut].copy_from_slice(&data[..cut]);
        Some(image)
    }

    /// The image after a power loss with none of the pending writes.
    pub fn power_loss_clean(&self) -> Vec<u8> {
        self.durable.clone()
    }

    /// The image after a power loss: the durable image plus a random subset of the pending
    /// writes, each whole or torn at sector boundaries.
    pub fn power_loss(&self, rng: &mut SplitMix64) -> Vec<u8> {
        let mut image = self.durable.clone();
        for (offset, data) in &self.pending {
            let start = to_usize(*offset);
            match rng.below(4) {
                0 => {}
                1 => image[start..start + data.len()].copy_from_slice(data),
                _ => {
                    // Each sector the write touches lands or not, independently.
                    let mut at = *offset;
                    let end = offset + data.len() as u64;
                    while at < end {
                        let sector_end = ((at / SECTOR_BYTES) + 1) * SECTOR_BYTES;
                        let stop = sector_end.min(end);
                        if rng.below(2) == 0 {
                            let (a, b) = (to_usize(at), to_usize(stop));
                            let from = to_usize(at - offset);
                            image[a..b].copy_from_slice(&data[from..from + (b - a)]);
                        }
                        at = stop;
                    }
                }
            }
        }
        image
    }
}

/// Flips one random bit of `image` in `[from, image.len())`.
pub fn flip_random_bit(image: &mut [u8], from: usize, rng: &mut SplitMix64) -> usize {
    let span = (image.len() - from) as u64;
    let byte = from + to_usize(rng.below(span));
    image[byte] ^= 1 << rng.below(8);
    byte
}

fn to_usize(value: u64) -> usize {
    usize::try_from(value).expect("in-memory offsets fit usize")
}
