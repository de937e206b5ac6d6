//! The persistent dirty bitmap (DESIGN §6.4; S4): one bit per region of the data area, marking
//! regions written while the other plex was not `normal`.
//!
//! Invariants:
//! - `mark` returns only once the bits are durable on the device (written and flushed), so a
//!   caller that marks before it issues a data write (S4) can never lose the mark in a crash;
//! - `clear` is called only once the region's copy is durable on the resync target, and a bit
//!   is never cleared by a crash: a bitmap block that does not verify (torn, corrupt) loads as
//!   all dirty, which can only cost an extra copy, never a missed one;
//! - every bitmap block carries a magic, a version, its index, the aggregate uuid and a CRC-32
//!   (docs/formats.md "Dirty bitmap").

use std::collections::BTreeSet;
use std::ops::Range;

use crate::buf::AlignedBuf;
use crate::device::{BLOCK_BYTES, BlockDevice, DeviceError};
use crate::label::Extent;
use crate::types::Uuid;

/// "MCBM" in little-endian byte order.
pub const BITMAP_MAGIC: u32 = u32::from_le_bytes(*b"MCBM");
/// The bitmap block format version.
pub const BITMAP_VERSION: u16 = 1;
/// Bytes of a bitmap block's header.
pub const BITMAP_HEADER_BYTES: usize = 32;
/// Bytes of bits in one bitmap block (the rest of the block after the header and the CRC).
pub const BITMAP_BITS_BYTES: usize = 4096 - BITMAP_HEADER_BYTES - 4;
const _: () = assert!(BLOCK_BYTES == 4096);
/// Regions one bitmap block covers.
pub const REGIONS_PER_BLOCK: u64 = (BITMAP_BITS_BYTES * 8) as u64;

/// Why the bitmap cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BitmapError {
    /// The device failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The bitmap extent cannot hold one bit per region of the data area.
    #[error("a bitmap of {have} bytes cannot cover {regions} regions ({need} bytes needed)")]
    TooSmall {
        /// Bytes of the extent.
        have: u64,
        /// Bytes needed.
        need: u64,
        /// Regions to cover.
        regions: u64,
    },
    /// The region size is not a power of two of at least 4 KiB.
    #[error("invalid region size {0}")]
    RegionSize(u32),
    /// A data range outside the data area.
    #[error("range {offset}+{len} is outside the data area of {data_bytes} bytes")]
    OutOfRange {
        /// Start, relative to the data area.
        offset: u64,
        /// Length.
        len: u64,
        /// Size of the data area.
        data_bytes: u64,
    },
}

/// The dirty bitmap of one plex, in memory and on its device.
#[derive(Clone, Debug)]
pub struct DirtyBitmap {
    extent: Extent,
    aggregate: Uuid,
    region_bytes: u64,
    data_bytes: u64,
    regions: u64,
    words: Vec<u64>,
    /// Bitmap blocks changed in memory and not yet written.
    unwritten: BTreeSet<u64>,
    /// Blocks that did not verify at load (loaded as all dirty).
    damaged_blocks: u64,
}

impl DirtyBitmap {
    /// An all-clean bitmap for a data area of `data_bytes`, stored in `extent`.
    pub fn new(
        extent: Extent,
        aggregate: Uuid,
        region_bytes: u32,
        data_bytes: u64,
    ) -> Result<DirtyBitmap, BitmapError> {
        if !region_bytes.is_power_of_two() || u64::from(region_bytes) < BLOCK_BYTES {
            return Err(BitmapError::RegionSize(region_bytes));
        }
        let regions = data_bytes.div_ceil(u64::from(region_bytes));
        let need = regions.div_ceil(REGIONS_PER_BLOCK) * BLOCK_BYTES;
        if need > extent.len {
            return Err(BitmapError::TooSmall { have: extent.len, need, regions });
        }
        let words = vec![0u64; usize::try_from(regions.div_ceil(64)).expect("the bitmap fits in memory")];
        Ok(DirtyBitmap {
            extent,
            aggregate,
            region_bytes: u64::from(region_bytes),
            data_bytes,
            regions,
            words,
            unwritten: BTreeSet::new(),
            damaged_blocks: 0,
        })
    }

    /// Reads the bitmap from `device`. A block that does not verify loads as all dirty.
    pub async fn load(
        device: &(impl BlockDevice + ?Sized),
        extent: Extent,
        aggregate: Uuid,
        region_bytes: u32,
        data_bytes: u64,
    ) -> Result<DirtyBitmap, BitmapError> {
        let mut bitmap = DirtyBitmap::new(extent, aggregate, region_bytes, data_bytes)?;
        let mut damaged = BTreeSet::new();
        for block in 0..bitmap.blocks() {
            let (result, buf) =
                device.read(extent.offset + block * BLOCK_BYTES, AlignedBuf::zeroed(4096)).await;
            result?;
            let regions = bitmap.block_regions(block);
            match decode_block(buf.as_slice(), block, aggregate) {
                Some(bits) => {
                    for region in regions {
                        let bit = region - block * REGIONS_PER_BLOCK;
                        if bits[usize::try_from(bit / 8).expect("in block")] & (1 << (bit % 8)) != 0 {
                            bitmap.set(region);
                        }
                    }
                }
                None => {
                    bitmap.damaged_blocks += 1;
                    damaged.insert(block);
                    for region in regions {
                        bitmap.set(region);
                    }
                }
            }
        }
        // Blocks that verified are on disk as loaded; a damaged block is rewritten (all dirty)
        // by the next persist.
        bitmap.unwritten = damaged;
        Ok(bitmap)
    }

    /// Writes every block of the bitmap (a new plex) and flushes.
    pub async fn format(&mut self, device: &(impl BlockDevice + ?Sized)) -> Result<(), BitmapError> {
        self.unwritten.extend(0..self.blocks());
        self.persist(device).await
    }

    fn blocks(&self) -> u64 {
        self.regions.div_ceil(REGIONS_PER_BLOCK)
    }

    fn block_regions(&self, block: u64) -> Range<u64> {
        block * REGIONS_PER_BLOCK..((block + 1) * REGIONS_PER_BLOCK).min(self.regions)
    }

    fn set(&mut self, region: u64) -> bool {
        let (word, bit) = (usize::try_from(region / 64).expect("in bitmap"), region % 64);
        let was = self.words[word] & (1 << bit) != 0;
        self.words[word] |= 1 << bit;
        if !was {
            self.unwritten.insert(region / REGIONS_PER_BLOCK);
        }
        !was
    }

    /// The regions a data range touches.
    pub fn regions_of(&self, offset: u64, len: u64) -> Result<Range<u64>, BitmapError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.data_bytes => {
                Ok(offset / self.region_bytes
                    ..end.div_ceil(self.region_bytes).max(offset / self.region_bytes))
            }
            _ => Err(BitmapError::OutOfRange { offset, len, data_bytes: self.data_bytes }),
        }
    }

    /// Marks every region the data range touches and returns once that is durable (S4: call it
    /// before issuing the write it protects). No I/O when they are all marked already.
    pub async fn mark(
        &mut self,
        device: &(impl BlockDevice + ?Sized),
        offset: u64,
        len: u64,
    ) -> Result<(), BitmapError> {
        for region in self.regions_of(offset, len)? {
            self.set(region);
        }
        self.persist(device).await
    }

    /// Marks every region (a full resync) and persists.
    pub async fn mark_all(&mut self, device: &(impl BlockDevice + ?Sized)) -> Result<(), BitmapError> {
        for region in 0..self.regions {
            self.set(region);
        }
        self.persist(device).await
    }

    /// Clears one region once its copy is durable on the resync target, and persists.
    pub async fn clear(
        &mut self,
        device: &(impl BlockDevice + ?Sized),
        region: u64,
    ) -> Result<(), BitmapError> {
        if region >= self.regions {
            return Err(BitmapError::OutOfRange {
                offset: region * self.region_bytes,
                len: 0,
                data_bytes: self.data_bytes,
            });
        }
        let (word, bit) = (usize::try_from(region / 64).expect("in bitmap"), region % 64);
        if self.words[word] & (1 << bit) != 0 {
            self.words[word] &= !(1 << bit);
            self.unwritten.insert(region / REGIONS_PER_BLOCK);
        }
        self.persist(device).await
    }

    /// Sets the bits of `regions` in memory only and returns those that were clean; `persist`
    /// makes them durable. Out-of-range regions are ignored.
    pub fn set_regions(&mut self, regions: Range<u64>) -> Vec<u64> {
        let end = regions.end.min(self.regions);
        (regions.start..end).filter(|region| self.set(*region)).collect()
    }

    /// Clears the bit of `region` in memory only (a copy that became redundant); `persist` makes
    /// it durable. Losing it in a crash costs an extra copy, never a missed one.
    pub fn unset(&mut self, region: u64) {
        if region < self.regions {
            let (word, bit) = (usize::try_from(region / 64).expect("in bitmap"), region % 64);
            if self.words[word] & (1 << bit) != 0 {
                self.words[word] &= !(1 << bit);
                self.unwritten.insert(region / REGIONS_PER_BLOCK);
            }
        }
    }

    /// The first dirty region at or after `from`.
    pub fn next_dirty(&self, from: u64) -> Option<u64> {
        let mut region = from;
        while region < self.regions {
            let word = self.words[usize::try_from(region / 64).expect("in bitmap")] >> (region % 64);
            if word != 0 {
                let found = region + u64::from(word.trailing_zeros());
                return (found < self.regions).then_some(found);
            }
            region = (region / 64 + 1) * 64;
        }
        None
    }

    /// Adds every dirty region of `other` (heal after a switchover merges the returning plex's
    /// bitmap, DESIGN §6.4). Call `persist` after.
    pub fn merge(&mut self, other: &DirtyBitmap) {
        let regions = self.regions;
        for region in other.dirty_regions().filter(|region| *region < regions) {
            self.set(region);
        }
    }

    /// Writes the changed blocks and flushes.
    pub async fn persist(&mut self, device: &(impl BlockDevice + ?Sized)) -> Result<(), BitmapError> {
        if self.unwritten.is_empty() {
            return Ok(());
        }
        for &block in &self.unwritten {
            let buf = self.encode_block(block);
            let (result, _) = device.write(self.extent.offset + block * BLOCK_BYTES, buf).await;
            result?;
        }
        device.flush().await?;
        self.unwritten.clear();
        Ok(())
    }

    fn encode_block(&self, block: u64) -> AlignedBuf {
        let mut buf = AlignedBuf::zeroed(4096);
        let out = buf.as_mut_slice();
        out[0..4].copy_from_slice(&BITMAP_MAGIC.to_le_bytes());
        out[4..6].copy_from_slice(&BITMAP_VERSION.to_le_bytes());
        out[8..16].copy_from_slice(&block.to_le_bytes());
        out[16..32].copy_from_slice(&self.aggregate.0);
        for region in self.block_regions(block) {
            if self.is_dirty(region) {
                let bit = region - block * REGIONS_PER_BLOCK;
                out[BITMAP_HEADER_BYTES + usize::try_from(bit / 8).expect("in block")] |= 1 << (bit % 8);
            }
        }
        let crc = crc32fast::hash(&out[..4092]);
        out[4092..].copy_from_slice(&crc.to_le_bytes());
        buf
    }

    /// Whether `region` is dirty.
    pub fn is_dirty(&self, region: u64) -> bool {
        region < self.regions
            && self.words[usize::try_from(region / 64).expect("in bitmap")] & (1 << (region % 64)) != 0
    }

    /// The dirty regions, in order.
    pub fn dirty_regions(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.regions).filter(|region| self.is_dirty(*region))
    }

    /// Regions in all.
    pub fn region_count(&self) -> u64 {
        self.regions
    }

    /// Bytes per region.
    pub fn region_bytes(&self) -> u64 {
        self.region_bytes
    }

    /// Dirty regions.
    pub fn dirty_count(&self) -> u64 {
        self.words.iter().map(|word| u64::from(word.count_ones())).sum()
    }

    /// Blocks that did not verify at load.
    pub fn damaged_blocks(&self) -> u64 {
        self.damaged_blocks
    }

    /// The status line DataKeeper prints: `Bitmap: 819189 bits (chunks), 40302 dirty (4.9%)`.
    pub fn status_line(&self) -> String {
        let dirty = self.dirty_count();
        let percent_tenths = (dirty * 1000).checked_div(self.regions).unwrap_or(0);
        format!(
            "Bitmap: {} bits (chunks), {} dirty ({}.{}%)",
            self.regions,
            dirty,
            percent_tenths / 10,
            percent_tenths % 10
        )
    }
}

/// The bits of a block that verifies, or `None`.
fn decode_block(bytes: &[u8], block: u64, aggregate: Uuid) -> Option<&[u8]> {
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let ok = u32_at(0) == BITMAP_MAGIC
        && bytes[4..6] == BITMAP_VERSION.to_le_bytes()
        && bytes[6..8] == [0, 0]
        && bytes[8..16] == block.to_le_bytes()
        && bytes[16..32] == aggregate.0
        && crc32fast::hash(&bytes[..4092]) == u32_at(4092);
    ok.then(|| &bytes[BITMAP_HEADER_BYTES..4092])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_line_reads_like_datakeeper() {
        let extent = Extent { offset: 8192, len: 64 * 4096 };
        let mut bitmap = DirtyBitmap::new(extent, Uuid([0; 16]), 65536, 819_189 * 65536).unwrap();
        for region in 0..40_302 {
            bitmap.set(region);
        }
        assert_eq!(bitmap.status_line(), "Bitmap: 819189 bits (chunks), 40302 dirty (4.9%)");
    }
}
