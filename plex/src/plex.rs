//! A plex: one full copy of an aggregate, made of the data areas of one or more disks of one
//! pool, concatenated (DESIGN §6). Every 4 KiB data block has a CRC-32 in its disk's checksum
//! area (DESIGN §6.3); a read that does not verify is an error, never data.
//!
//! Invariants:
//! - a block's CRC is salted with its disk's uuid and its block index on that disk, so a
//!   misdirected write or a block of another disk never verifies;
//! - a block whose data and CRC are both zero was never written and reads as zeroes;
//! - a piece's data and its checksum block are written under one lock, so concurrent writes
//!   never lose each other's CRCs nor pair one write's data with another's CRC (one lock per
//!   plex for now: the io_uring work will narrow it to checksum blocks);
//! - a read concurrent with a write of the same block may see a mismatch: the aggregate orders
//!   reads and writes of a region (reads come from the write cache first, DESIGN §4);
//! - a write is complete (data and CRCs) before `write` returns; `flush` makes it durable.

use std::sync::Arc;

use tokio::sync::Mutex;

use crate::buf::AlignedBuf;
use crate::device::{BLOCK_BYTES, BlockDevice, DeviceError};
use crate::label::DiskLabel;

/// CRCs per checksum block.
const CRCS_PER_BLOCK: u64 = BLOCK_BYTES / 4;

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
    checksum_lock: Mutex<()>,
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
        Ok(Plex { disks, starts, size, checksum_lock: Mutex::new(()) })
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

    async fn read_checksums(
        &self,
        disk: usize,
        first_block: u64,
        blocks: u64,
    ) -> Result<(u64, AlignedBuf), PlexError> {
        let label = &self.disks[disk].label;
        let first = first_block / CRCS_PER_BLOCK;
        let last = (first_block + blocks - 1) / CRCS_PER_BLOCK;
        let len = usize::try_from((last - first + 1) * BLOCK_BYTES).expect("checksum blocks fit usize");
        let (result, buf) = self.disks[disk]
            .device
            .read(label.checksums.offset + first * BLOCK_BYTES, AlignedBuf::zeroed(len))
            .await;
        result.map_err(|source| PlexError::Device { disk, source })?;
        Ok((first * CRCS_PER_BLOCK, buf))
    }

    /// Reads `len` bytes at plex offset `offset`; every block is verified.
    pub async fn read(&self, offset: u64, len: u64) -> Result<AlignedBuf, PlexError> {
        let mut out = AlignedBuf::zeroed(usize::try_from(len).expect("a read fits in memory"));
        for (disk, within, plex_at, take) in self.pieces(offset, len)? {
            let label = &self.disks[disk].label;
            let (result, data) = self.disks[disk]
                .device
                .read(label.data.offset + within, AlignedBuf::zeroed(usize::try_from(take).expect("fits")))
                .await;
            result.map_err(|source| PlexError::Device { disk, source })?;
            let first_block = within / BLOCK_BYTES;
            let blocks = take / BLOCK_BYTES;
            let (base, crcs) = self.read_checksums(disk, first_block, blocks).await?;
            for i in 0..blocks {
                let block = first_block + i;
                let at = usize::try_from((block - base) * 4).expect("fits");
                let stored = u32::from_le_bytes(crcs.as_slice()[at..at + 4].try_into().expect("4 bytes"));
                let range = usize::try_from(i * BLOCK_BYTES).expect("fits")
                    ..usize::try_from((i + 1) * BLOCK_BYTES).expect("fits");
                let bytes = &data.as_slice()[range];
                let never_written = stored == 0 && bytes.iter().all(|&b| b == 0);
                if !never_written && block_crc(label, block, bytes) != stored {
                    return Err(PlexError::Checksum { offset: plex_at + i * BLOCK_BYTES });
                }
            }
            let start = usize::try_from(plex_at - offset).expect("fits");
            out.as_mut_slice()[start..start + data.len()].copy_from_slice(data.as_slice());
        }
        Ok(out)
    }

    /// Writes `data` at plex offset `offset`, with the CRC of every block.
    pub async fn write(&self, offset: u64, data: &AlignedBuf) -> Result<(), PlexError> {
        for (disk, within, plex_at, take) in self.pieces(offset, data.len() as u64)? {
            let label = &self.disks[disk].label;
            let start = usize::try_from(plex_at - offset).expect("fits");
            let piece =
                AlignedBuf::from_slice(&data.as_slice()[start..start + usize::try_from(take).expect("fits")]);
            let first_block = within / BLOCK_BYTES;
            let blocks = take / BLOCK_BYTES;
            let crcs: Vec<u32> = (0..blocks)
                .map(|i| {
                    let range = usize::try_from(i * BLOCK_BYTES).expect("fits")
                        ..usize::try_from((i + 1) * BLOCK_BYTES).expect("fits");
                    block_crc(label, first_block + i, &piece.as_slice()[range])
                })
                .collect();
            // Data and CRCs of a piece change together: concurrent writes of one checksum block
            // (or one data block) never interleave into a block whose CRC is another write's.
            let _guard = self.checksum_lock.lock().await;
            let (result, _) = self.disks[disk].device.write(label.data.offset + within, piece).await;
            result.map_err(|source| PlexError::Device { disk, source })?;
            let (base, mut sums) = self.read_checksums(disk, first_block, blocks).await?;
            for (i, crc) in crcs.iter().enumerate() {
                let at = usize::try_from((first_block + i as u64 - base) * 4).expect("fits");
                sums.as_mut_slice()[at..at + 4].copy_from_slice(&crc.to_le_bytes());
            }
            let (result, _) = self.disks[disk]
                .device
                .write(label.checksums.offset + base / CRCS_PER_BLOCK * BLOCK_BYTES, sums)
                .await;
            result.map_err(|source| PlexError::Device { disk, source })?;
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
