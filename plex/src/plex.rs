//! A plex: one full copy of an aggregate, made of the data areas of one or more disks of one
//! pool, concatenated (DESIGN §6). Every 4 KiB data block has a CRC-32 in its disk's checksum
//! area (DESIGN §6.3); a read that does not verify is an error, never data.
//!
//! Invariants:
//! - a block's CRC is salted with its disk's uuid and its block index on that disk, so a
//!   misdirected write or a block of another disk never verifies;
//! - a block whose data and CRC are both zero was never written and reads as zeroes;
//! - each checksum block is cached in memory once read (4 bytes per 4 KiB of data) and has its
//!   own lock; a write holds the locks of the checksum blocks it touches, in ascending order,
//!   while it writes its data and those checksum blocks (concurrently), so concurrent writes
//!   never lose each other's CRCs nor pair one write's data with another's CRC, and writes to
//!   different checksum blocks (4 MiB of data each) run in parallel;
//! - the cache holds what was last written; a checksum block that fails to write leaves its
//!   device failed (S10), so the cache never outlives a disk that disagrees with it;
//! - a read concurrent with a write of the same block may see a mismatch: the aggregate orders
//!   reads and writes of a region (reads come from the write cache first, DESIGN §4);
//! - a write is complete (data and CRCs) before `write` returns; `flush` makes it durable.

use std::sync::Arc;

use tokio::sync::{Mutex, MutexGuard};

use crate::buf::AlignedBuf;
use crate::device::{BLOCK_BYTES, BlockDevice, DeviceError, IoFuture, join_all};
use crate::label::DiskLabel;

/// CRCs per checksum block.
const CRCS_PER_BLOCK: u64 = BLOCK_BYTES / 4;
/// A block, as a buffer length.
#[allow(clippy::cast_possible_truncation)]
const BLOCK_LEN: usize = BLOCK_BYTES as usize;

/// A length or offset inside one I/O buffer (which fits in memory) as `usize`.
fn usize_of(n: u64) -> usize {
    usize::try_from(n).expect("an in-buffer offset fits usize")
}

/// The stored CRC of data block `block` from the locked checksum blocks starting at the one
/// holding `first_block`.
fn crc_of(guards: &[MutexGuard<'_, Option<AlignedBuf>>], first_block: u64, block: u64) -> u32 {
    let sums = guards[usize_of(block / CRCS_PER_BLOCK - first_block / CRCS_PER_BLOCK)]
        .as_ref()
        .expect("locked checksum blocks are loaded");
    let at = usize_of(block % CRCS_PER_BLOCK * 4);
    u32::from_le_bytes(sums.as_slice()[at..at + 4].try_into().expect("4 bytes"))
}

/// Why a plex I/O failed.
#[derive(Debug, thiserror::Error)]
pub enum PlexError {
    /// A disk failed.
    #[error("disk {disk}: {source}")]
    Device {
        /// Index of the disk in the plex.
        disk: usize,
        /// What the device said.
        #[source]
        source: DeviceError,
    },
    /// A block's data does not match its CRC (bit rot, torn or misdirected write).
    #[error("block at plex offset {offset} fails its checksum")]
    Checksum {
        /// Plex offset of the block.
        offset: u64,
    },
    /// The range is outside the plex or not block-aligned.
    #[error("range {offset}+{len} is not block-aligned inside the plex of {size} bytes")]
    Range {
        /// Start.
        offset: u64,
        /// Length.
        len: u64,
        /// The plex's data size.
        size: u64,
    },
    /// The disks do not form one plex.
    #[error("invalid plex: {0}")]
    Invalid(String),
}

/// One disk of a plex, with its label.
#[derive(Debug)]
pub struct PlexDisk {
    /// The device.
    pub device: Arc<dyn BlockDevice>,
    /// Its label (its data and checksum extents).
    pub label: DiskLabel,
}

/// A plex over one or more disks.
#[derive(Debug)]
pub struct Plex {
    disks: Vec<PlexDisk>,
    /// Plex offset where each disk's data starts.
    starts: Vec<u64>,
    size: u64,
    /// Per disk, per checksum block: its cached contents once loaded.
    checksums: Vec<Vec<Mutex<Option<AlignedBuf>>>>,
}

fn block_crc(disk: &DiskLabel, block: u64, data: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&disk.disk.0);
    hasher.update(&block.to_le_bytes());
    hasher.update(data);
    hasher.finalize()
}

impl Plex {
    /// Builds a plex from disks of one aggregate, plex index and pool, in order.
    pub fn new(disks: Vec<PlexDisk>) -> Result<Plex, PlexError> {
        let first = disks.first().ok_or_else(|| PlexError::Invalid("no disks".into()))?;
        let (aggregate, index, pool) = (first.label.aggregate, first.label.plex_index, first.label.pool);
        let mut starts = Vec::with_capacity(disks.len());
        let mut size = 0u64;
        for (n, disk) in disks.iter().enumerate() {
            let label = &disk.label;
            if label.aggregate != aggregate || label.plex_index != index || label.pool != pool {
                return Err(PlexError::Invalid(format!(
                    "disk {n} belongs to another aggregate, plex or pool"
                )));
            }
            if label.check(disk.device.size_bytes()).is_err() {
                return Err(PlexError::Invalid(format!("disk {n}'s label does not fit its device")));
            }
            let blocks = label.data.len / BLOCK_BYTES;
            if label.checksums.len < blocks.div_ceil(CRCS_PER_BLOCK) * BLOCK_BYTES {
                return Err(PlexError::Invalid(format!("disk {n}'s checksum area is too small")));
            }
            starts.push(size);
            size += label.data.len;
        }
        let checksums = disks
            .iter()
            .map(|disk| {
                let blocks = (disk.label.data.len / BLOCK_BYTES).div_ceil(CRCS_PER_BLOCK);
                (0..blocks).map(|_| Mutex::new(None)).collect()
            })
            .collect();
        Ok(Plex { disks, starts, size, checksums })
    }

    /// Bytes of data the plex holds.
    pub fn size_bytes(&self) -> u64 {
        self.size
    }

    /// The disks, in order.
    pub fn disks(&self) -> &[PlexDisk] {
        &self.disks
    }

    /// Splits a plex range into (disk, offset in its data area, plex offset, length) pieces.
    fn pieces(&self, offset: u64, len: u64) -> Result<Vec<(usize, u64, u64, u64)>, PlexError> {
        let aligned = offset.is_multiple_of(BLOCK_BYTES) && len.is_multiple_of(BLOCK_BYTES);
        if !aligned || offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(PlexError::Range { offset, len, size: self.size });
        }
        let mut pieces = Vec::new();
        let (mut at, end) = (offset, offset + len);
        while at < end {
            let disk = self.starts.partition_point(|&start| start <= at) - 1;
            let within = at - self.starts[disk];
            let take = (self.disks[disk].label.data.len - within).min(end - at);
            pieces.push((disk, within, at, take));
            at += take;
        }
        Ok(pieces)
    }

    /// Locks the checksum blocks covering `blocks` data blocks from `first_block` of `disk`,
    /// loading each from the disk the first time.
    async fn lock_checksums(
        &self,
        disk: usize,
        first_block: u64,
        blocks: u64,
    ) -> Result<Vec<MutexGuard<'_, Option<AlignedBuf>>>, PlexError> {
        let label = &self.disks[disk].label;
        let (first, last) = (first_block / CRCS_PER_BLOCK, (first_block + blocks - 1) / CRCS_PER_BLOCK);
        let mut guards = Vec::with_capacity(usize::try_from(last - first + 1).unwrap_or(1));
        for index in first..=last {
            let mut guard =
                self.checksums[disk][usize::try_from(index).expect("checksum blocks fit usize")].lock().await;
            if guard.is_none() {
                let (result, buf) = self.disks[disk]
                    .device
                    .read(label.checksums.offset + index * BLOCK_BYTES, AlignedBuf::zeroed(BLOCK_LEN))
                    .await;
                result.map_err(|source| PlexError::Device { disk, source })?;
                *guard = Some(buf);
            }
            guards.push(guard);
        }
        Ok(guards)
    }

    /// Reads `len` bytes at plex offset `offset`; every block is verified.
    pub async fn read(&self, offset: u64, len: u64) -> Result<AlignedBuf, PlexError> {
        let pieces = self.pieces(offset, len)?;
        let size = usize::try_from(len).map_err(|_| PlexError::Range { offset, len, size: self.size })?;
        // Only a range that spans disks needs a buffer of its own.
        let mut out = if pieces.len() > 1 { AlignedBuf::zeroed(size) } else { AlignedBuf::zeroed(0) };
        for (disk, within, plex_at, take) in pieces {
            let label = &self.disks[disk].label;
            let first_block = within / BLOCK_BYTES;
            let blocks = take / BLOCK_BYTES;
            let stored: Vec<u32> = {
                let guards = self.lock_checksums(disk, first_block, blocks).await?;
                (first_block..first_block + blocks).map(|block| crc_of(&guards, first_block, block)).collect()
            };
            let (result, data) = self.disks[disk]
                .device
                .read(label.data.offset + within, AlignedBuf::zeroed(usize_of(take)))
                .await;
            result.map_err(|source| PlexError::Device { disk, source })?;
            for (i, stored) in (0..blocks).zip(stored) {
                let bytes = &data.as_slice()[usize_of(i * BLOCK_BYTES)..usize_of((i + 1) * BLOCK_BYTES)];
                let never_written = stored == 0 && bytes.iter().all(|&b| b == 0);
                if !never_written && block_crc(label, first_block + i, bytes) != stored {
                    return Err(PlexError::Checksum { offset: plex_at + i * BLOCK_BYTES });
                }
            }
            if data.len() as u64 == len {
                // The whole range was on one disk: the device's buffer is the answer.
                return Ok(data);
            }
            let start = usize_of(plex_at - offset);
            out.as_mut_slice()[start..start + data.len()].copy_from_slice(data.as_slice());
        }
        Ok(out)
    }

    /// Writes `data` at plex offset `offset`, with the CRC of every block.
    pub async fn write(&self, offset: u64, data: &AlignedBuf) -> Result<(), PlexError> {
        for (disk, within, plex_at, take) in self.pieces(offset, data.len() as u64)? {
            let label = &self.disks[disk].label;
            let device = &self.disks[disk].device;
            let start = usize_of(plex_at - offset);
            let piece = AlignedBuf::from_slice(&data.as_slice()[start..start + usize_of(take)]);
            let first_block = within / BLOCK_BYTES;
            let blocks = take / BLOCK_BYTES;
            // Data and CRCs of a piece change together under the checksum blocks' locks:
            // concurrent writes of one checksum block (or one data block) never interleave into
            // a block whose CRC is another write's.
            let mut guards = self.lock_checksums(disk, first_block, blocks).await?;
            let first_sum_block = first_block / CRCS_PER_BLOCK;
            for i in 0..blocks {
                let block = first_block + i;
                let bytes = &piece.as_slice()[usize_of(i * BLOCK_BYTES)..usize_of((i + 1) * BLOCK_BYTES)];
                let crc = block_crc(label, block, bytes);
                let sums = guards[usize_of(block / CRCS_PER_BLOCK - first_sum_block)]
                    .as_mut()
                    .expect("locked checksum blocks are loaded");
                let at = usize_of(block % CRCS_PER_BLOCK * 4);
                sums.as_mut_slice()[at..at + 4].copy_from_slice(&crc.to_le_bytes());
            }
            let mut writes: Vec<IoFuture<'_, (Result<(), DeviceError>, AlignedBuf)>> =
                vec![device.write(label.data.offset + within, piece)];
            for (n, guard) in guards.iter().enumerate() {
                let sums = guard.as_ref().expect("locked checksum blocks are loaded").clone();
                let index = first_sum_block + n as u64;
                writes.push(device.write(label.checksums.offset + index * BLOCK_BYTES, sums));
            }
            for (result, _) in join_all(writes).await {
                result.map_err(|source| PlexError::Device { disk, source })?;
            }
            drop(guards);
        }
        Ok(())
    }

    /// Makes every completed write durable on every disk (S12: before the label records it).
    pub async fn flush(&self) -> Result<(), PlexError> {
        for (disk, plex_disk) in self.disks.iter().enumerate() {
            plex_disk.device.flush().await.map_err(|source| PlexError::Device { disk, source })?;
        }
        Ok(())
    }
}
