//! Crash images of the dirty bitmap's persist protocol (S4): after any crash, every region
//! whose mark was acknowledged (and not cleared since) is dirty. Prints its seed and image
//! count; `PLEX_BITMAP_SEED=<hex>` repeats a run.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::collections::BTreeSet;

use plex::bitmap::REGIONS_PER_BLOCK;
use plex::label::Extent;
use plex::{BLOCK_BYTES, DirtyBitmap, MemDevice, MemFaults, Uuid};

const REGION: u32 = 4096;
const AGGREGATE: Uuid = Uuid([7; 16]);
/// Two bitmap blocks' worth of regions, so marks span blocks.
const DATA_BYTES: u64 = (REGIONS_PER_BLOCK + 4000) * REGION as u64;
const EXTENT: Extent = Extent { offset: 2 * BLOCK_BYTES, len: 4 * BLOCK_BYTES };
const DEVICE_BYTES: u64 = 8 * BLOCK_BYTES;

struct Rng(u64);
impl Rng {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound.max(1)
    }
}

async fn load(image: Vec<u8>) -> DirtyBitmap {
    let device = MemDevice::from_image(image);
    DirtyBitmap::load(&device, EXTENT, AGGREGATE, REGION, DATA_BYTES).await.unwrap()
}

fn missing(bitmap: &DirtyBitmap, must: &BTreeSet<u64>) -> Option<u64> {
    must.iter().copied().find(|region| !bitmap.is_dirty(*region))
}

#[tokio::test]
async fn acknowledged_marks_survive_every_crash() {
    let seed = std::env::var("PLEX_BITMAP_SEED")
        .ok()
        .and_then(|s| u64::from_str_radix(&s, 16).ok())
        .unwrap_or_else(|| {
            u64::try_from(
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
                    % (1 << 63),
            )
            .unwrap()
                | 1
        });
    println!("bitmap crash seed: {seed:x} (repeat with PLEX_BITMAP_SEED={seed:x})");
    let mut rng = Rng(seed);
    let mut images = 0u64;
    for _workload in 0..40 {
        let mut device = MemDevice::new(DEVICE_BYTES);
        let mut bitmap = DirtyBitmap::new(EXTENT, AGGREGATE, REGION, DATA_BYTES).unwrap();
        bitmap.format(&device).await.unwrap();
        // Regions whose mark returned Ok and that no successful clear has covered since.
        let mut must: BTreeSet<u64> = BTreeSet::new();
        for _op in 0..30 {
            let fault = rng.below(3) == 0;
            // A write torn by the crash itself: only with an op that does not complete (a torn write
            // the device acknowledged would be a lying disk, which block checksums catch, not this).
            let torn = (fault && rng.below(2) == 0).then(|| usize::try_from(rng.below(4096)).unwrap());
            device.set_faults(MemFaults {
                flush_error: fault,
                torn_next_write: torn,
                ..MemFaults::default()
            });
            let clear = rng.below(3) == 0 && bitmap.dirty_count() > 0;
            let mut clearing = None;
            let result = if clear {
                let dirty: Vec<u64> = bitmap.dirty_regions().collect();
                let region = dirty[rng.below(dirty.len() as u64) as usize];
                clearing = Some(region);
                bitmap.clear(&device, region).await.map(|()| Some(region))
            } else {
                let offset = rng.below(DATA_BYTES / 4096) * 4096;
                let len = (1 + rng.below(64)) * 4096;
                let len = len.min(DATA_BYTES - offset);
                let regions = bitmap.regions_of(offset, len).unwrap();
                bitmap.mark(&device, offset, len).await.map(|()| {
                    must.extend(regions);
                    None
                })
            };
            match result {
                Ok(Some(cleared)) => {
                    must.remove(&cleared);
                }
                Ok(None) => {}
                Err(_) => {
                    // A clear is issued only once the region's copy is durable, so a clear that
                    // may or may not have landed leaves the region safe either way.
                    if let Some(region) = clearing {
                        must.remove(&region);
                    }
                    // The op never completed: crash now, with any subset of its writes landed.
                    for keep in 0..3u64 {
                        let image = device.power_loss_image(|i| match keep {
                            0 => false,
                            1 => true,
                            _ => (i as u64 + seed).is_multiple_of(2),
                        });
                        let loaded = load(image).await;
                        images += 1;
                        if let Some(region) = missing(&loaded, &must) {
                            panic!("seed {seed:x}: acknowledged mark of region {region} lost in a crash");
                        }
                    }
                    // Reboot from one of those images and go on with what it holds.
                    device = MemDevice::from_image(device.power_loss_image(|_| rng.below(2) == 0));
                    bitmap = DirtyBitmap::load(&device, EXTENT, AGGREGATE, REGION, DATA_BYTES).await.unwrap();
                    continue;
                }
            }
            // A crash right after a completed op keeps every acknowledged mark.
            let loaded = load(device.power_loss_image(|_| false)).await;
            images += 1;
            if let Some(region) = missing(&loaded, &must) {
                panic!("seed {seed:x}: acknowledged mark of region {region} not durable");
            }
            // And a completed op is durable exactly as it stands in memory.
            bitmap.persist(&device).await.unwrap();
            let loaded = load(device.power_loss_image(|_| false)).await;
            assert!(
                loaded.dirty_regions().eq(bitmap.dirty_regions()),
                "seed {seed:x}: the durable bitmap differs from the acknowledged one"
            );
        }
    }
    println!("bitmap crash images checked: {images}");
}

#[tokio::test]
async fn a_damaged_block_loads_as_all_dirty() {
    let device = MemDevice::new(DEVICE_BYTES);
    let mut bitmap = DirtyBitmap::new(EXTENT, AGGREGATE, REGION, DATA_BYTES).unwrap();
    bitmap.format(&device).await.unwrap();
    let mut image = device.snapshot();
    image[usize::try_from(EXTENT.offset).unwrap() + 100] ^= 1;
    let loaded = load(image).await;
    assert_eq!(loaded.damaged_blocks(), 1);
    assert_eq!(loaded.dirty_count(), REGIONS_PER_BLOCK, "the damaged block's regions are all dirty");
    // A bitmap written for another aggregate is not ours: all dirty too.
    let other = MemDevice::from_image(device.snapshot());
    let foreign = DirtyBitmap::load(&other, EXTENT, Uuid([9; 16]), REGION, DATA_BYTES).await.unwrap();
    assert_eq!(foreign.dirty_count(), foreign.region_count());
}

#[tokio::test]
async fn marks_merge_and_clear() {
    let device = MemDevice::new(DEVICE_BYTES);
    let mut survivor = DirtyBitmap::new(EXTENT, AGGREGATE, REGION, DATA_BYTES).unwrap();
    survivor.format(&device).await.unwrap();
    survivor.mark(&device, 0, 3 * 4096).await.unwrap();
    let mut returning = DirtyBitmap::new(EXTENT, AGGREGATE, REGION, DATA_BYTES).unwrap();
    returning.mark(&MemDevice::new(DEVICE_BYTES), 100 * 4096, 4096).await.unwrap();
    survivor.merge(&returning);
    survivor.persist(&device).await.unwrap();
    assert_eq!(survivor.dirty_regions().collect::<Vec<_>>(), vec![0, 1, 2, 100]);
    survivor.clear(&device, 1).await.unwrap();
    let loaded = DirtyBitmap::load(&device, EXTENT, AGGREGATE, REGION, DATA_BYTES).await.unwrap();
    assert_eq!(loaded.dirty_regions().collect::<Vec<_>>(), vec![0, 2, 100]);
    assert!(survivor.regions_of(DATA_BYTES, 4096).is_err());
    assert!(
        DirtyBitmap::new(Extent { offset: 8192, len: 4096 }, AGGREGATE, REGION, DATA_BYTES).is_err(),
        "too small"
    );
}
