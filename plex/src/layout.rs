//! Where a disk's areas go (docs/formats.md "Disk layout"): the two label copies, the dirty
//! bitmap, the checksum area and the data area, in that order, each 4 KiB-aligned.
//!
//! Invariants:
//! - every disk of a plex reserves a bitmap extent large enough for the whole plex (only the
//!   first disk's is used), so the plex's bitmap never depends on which disk is first;
//! - the checksum area holds one CRC-32 per data block of its disk;
//! - the areas never overlap and the label's `check` accepts them.

use crate::bitmap::REGIONS_PER_BLOCK;
use crate::device::BLOCK_BYTES;
use crate::label::{Extent, LABEL_AREA_BYTES};

/// CRCs per checksum block.
const CRCS_PER_BLOCK: u64 = BLOCK_BYTES / 4;

/// One disk's areas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskAreas {
    /// The dirty bitmap (used on the plex's first disk).
    pub bitmap: Extent,
    /// One CRC-32 per data block.
    pub checksums: Extent,
    /// Data blocks.
    pub data: Extent,
}

/// Why disks cannot form a plex.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// No disks.
    #[error("a plex needs at least one disk")]
    NoDisks,
    /// The region size is not a power of two of at least 4 KiB.
    #[error("region size {0} is not a power of two of at least 4 KiB")]
    RegionSize(u32),
    /// A disk's size is not a whole number of blocks.
    #[error("disk {disk} is {size} bytes, not a multiple of 4 KiB")]
    Misaligned {
        /// Index of the disk.
        disk: usize,
        /// Its size.
        size: u64,
    },
    /// A disk has no room for data after its label, bitmap and checksum areas.
    #[error("disk {disk} of {size} bytes is too small for a label, a bitmap and data")]
    TooSmall {
        /// Index of the disk.
        disk: usize,
        /// Its size.
        size: u64,
    },
}

/// Lays out the disks of one plex, of the given sizes, for regions of `region_bytes`.
pub fn plan_plex(sizes: &[u64], region_bytes: u32) -> Result<Vec<DiskAreas>, LayoutError> {
    if sizes.is_empty() {
        return Err(LayoutError::NoDisks);
    }
    if !region_bytes.is_power_of_two() || u64::from(region_bytes) < BLOCK_BYTES {
        return Err(LayoutError::RegionSize(region_bytes));
    }
    for (disk, &size) in sizes.iter().enumerate() {
        if !size.is_multiple_of(BLOCK_BYTES) {
            return Err(LayoutError::Misaligned { disk, size });
        }
    }
    // Enough bits for every byte of every disk: more than the data area needs, never less.
    let total: u64 = sizes.iter().fold(0u64, |sum, size| sum.saturating_add(*size));
    let regions = total.div_ceil(u64::from(region_bytes));
    let bitmap_len = regions.div_ceil(REGIONS_PER_BLOCK).max(1) * BLOCK_BYTES;
    sizes
        .iter()
        .enumerate()
        .map(|(disk, &size)| {
            let too_small = LayoutError::TooSmall { disk, size };
            let rest = size.checked_sub(LABEL_AREA_BYTES + bitmap_len).ok_or(too_small)? / BLOCK_BYTES;
            // `data` blocks need `ceil(data / 1024)` checksum blocks; the largest `data` that fits.
            let mut data = rest * CRCS_PER_BLOCK / (CRCS_PER_BLOCK + 1);
            while data + data.div_ceil(CRCS_PER_BLOCK) > rest {
                data -= 1;
            }
            if data == 0 {
                return Err(too_small);
            }
            let sums = data.div_ceil(CRCS_PER_BLOCK);
            let bitmap = Extent { offset: LABEL_AREA_BYTES, len: bitmap_len };
            let checksums = Extent { offset: bitmap.offset + bitmap.len, len: sums * BLOCK_BYTES };
            let data = Extent { offset: checksums.offset + checksums.len, len: data * BLOCK_BYTES };
            Ok(DiskAreas { bitmap, checksums, data })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn areas_fit_and_do_not_overlap() {
        for size in [64 * BLOCK_BYTES, 1 << 30, (1 << 30) + 5 * BLOCK_BYTES, 3 << 40] {
            let second = size / 2 / BLOCK_BYTES * BLOCK_BYTES + BLOCK_BYTES * 7;
            let areas = plan_plex(&[size, second], 65536).unwrap();
            for (area, size) in areas.iter().zip([size, second]) {
                assert!(area.bitmap.offset >= LABEL_AREA_BYTES);
                assert!(area.bitmap.offset + area.bitmap.len <= area.checksums.offset);
                assert!(area.checksums.offset + area.checksums.len <= area.data.offset);
                assert!(area.data.offset + area.data.len <= size, "data runs past the disk");
                assert!(area.checksums.len / 4 >= area.data.len / BLOCK_BYTES, "too few CRCs");
                // Little is wasted: at most one checksum block's worth of data.
                assert!(size - (area.data.offset + area.data.len) <= CRCS_PER_BLOCK * BLOCK_BYTES);
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert_eq!(plan_plex(&[], 65536), Err(LayoutError::NoDisks));
        assert_eq!(plan_plex(&[1 << 20], 1000), Err(LayoutError::RegionSize(1000)));
        assert_eq!(plan_plex(&[5000], 65536), Err(LayoutError::Misaligned { disk: 0, size: 5000 }));
        assert!(matches!(plan_plex(&[3 * BLOCK_BYTES], 65536), Err(LayoutError::TooSmall { .. })));
        assert!(matches!(plan_plex(&[4 * BLOCK_BYTES], 65536), Err(LayoutError::TooSmall { .. })));
    }
}
