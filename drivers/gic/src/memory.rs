//! Blocks of DMA memory the GIC reads: one page when that is enough, a
//! contiguous run otherwise.

use sluice_hal::{DmaAllocError, DmaMemory, PAGE_SIZE, PhysAddr};

/// Memory handed to the GIC (a table, a queue, an ITT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Block {
    pub start: PhysAddr,
    pub pages: u64,
    /// From `alloc_contiguous` (freed whole) rather than `alloc_page`.
    contiguous: bool,
}

impl Block {
    /// At least `bytes` zeroed bytes starting at a multiple of `align`: one
    /// page from `alloc_page` when that covers it, else a contiguous run.
    pub fn alloc(mem: &dyn DmaMemory, bytes: u64, align: u64) -> Result<Self, DmaAllocError> {
        let bytes = bytes.max(1);
        if bytes <= PAGE_SIZE && align <= PAGE_SIZE {
            return Ok(Self {
                start: mem.alloc_page()?,
                pages: 1,
                contiguous: false,
            });
        }
        let pages = bytes.div_ceil(PAGE_SIZE);
        Ok(Self {
            start: mem.alloc_contiguous(pages, align.max(PAGE_SIZE))?,
            pages,
            contiguous: true,
        })
    }

    pub const fn bytes(&self) -> u64 {
        self.pages * PAGE_SIZE
    }

    pub fn free(self, mem: &dyn DmaMemory) {
        if self.contiguous {
            mem.free_contiguous(self.start, self.pages);
        } else {
            mem.free_page(self.start);
        }
    }
}

#[cfg(test)]
mod tests {
    use sluice_hal::model::ModelMemory;

    use super::*;

    #[test]
    fn small_blocks_are_single_pages_and_large_ones_runs() {
        let mem = ModelMemory::new();
        let small = Block::alloc(&mem, 256, 256).unwrap();
        assert_eq!(small.pages, 1);
        assert!(mem.contiguous_runs().is_empty());
        let big = Block::alloc(&mem, 3 * PAGE_SIZE + 1, 0x1_0000).unwrap();
        assert_eq!(big.pages, 4);
        assert_eq!(big.start.as_u64() % 0x1_0000, 0);
        assert_eq!(mem.contiguous_runs(), [(big.start, 4)]);
        // A one-page table that must be 64 KiB aligned is a run too.
        let aligned = Block::alloc(&mem, 100, 0x1_0000).unwrap();
        assert_eq!(aligned.start.as_u64() % 0x1_0000, 0);
        assert_eq!(mem.live_pages(), 6);
        for b in [small, big, aligned] {
            b.free(&mem);
        }
        assert_eq!(mem.live_pages(), 0);
    }
}
