//! The physical frame allocator: free ranges of 4 KiB frames taken from the
//! firmware's memory map.

use alloc::vec::Vec;
use core::fmt;

use crate::boot_info::{MemoryRegion, RegionKind};

pub const FRAME_SIZE: u64 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// No free range is large enough.
    Exhausted {
        requested_frames: u64,
        free_frames: u64,
    },
    /// A zero-sized or unaligned request, or an alignment that is not a
    /// power of two.
    BadRequest,
    /// A free of memory that is (partly) free already or was never usable.
    BadFree { start: u64, frames: u64 },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exhausted {
                requested_frames,
                free_frames,
            } => write!(
                f,
                "out of physical memory: {requested_frames} contiguous frames requested, {free_frames} free in all"
            ),
            Self::BadRequest => f.write_str("invalid frame allocation request"),
            Self::BadFree { start, frames } => {
                write!(
                    f,
                    "free of {frames} frames at {start:#x} that were not allocated"
                )
            }
        }
    }
}

/// First-fit allocator over sorted, disjoint, non-adjacent free ranges
/// `[start, end)`.
#[derive(Debug, Default)]
pub struct FrameAllocator {
    free: Vec<(u64, u64)>,
}

impl FrameAllocator {
    /// Takes every `Usable` region of the map (trimmed to whole frames),
    /// except frame 0, which stays unused so that a zero physical address is
    /// never a valid allocation.
    pub fn from_memory_map(map: &[MemoryRegion]) -> Self {
        let mut allocator = Self::default();
        for region in map.iter().filter(|r| r.kind == RegionKind::Usable) {
            let start = region.start.max(FRAME_SIZE).next_multiple_of(FRAME_SIZE);
            let end = region.end() & !(FRAME_SIZE - 1);
            if start < end {
                allocator.insert(start, end);
            }
        }
        allocator
    }

    pub fn free_frames(&self) -> u64 {
        self.free.iter().map(|(s, e)| (e - s) / FRAME_SIZE).sum()
    }

    /// `frames` contiguous frames aligned to `align` bytes (a power of two,
    /// at least 4 KiB).
    pub fn allocate(&mut self, frames: u64, align: u64) -> Result<u64, FrameError> {
        self.allocate_below(frames, align, u64::MAX)
    }

    /// Like [`FrameAllocator::allocate`], with the whole allocation below
    /// `limit` (for devices that can only address low memory).
    pub fn allocate_below(
        &mut self,
        frames: u64,
        align: u64,
        limit: u64,
    ) -> Result<u64, FrameError> {
        let align = align.max(FRAME_SIZE);
        if frames == 0 || !align.is_power_of_two() {
            return Err(FrameError::BadRequest);
        }
        let bytes = frames
            .checked_mul(FRAME_SIZE)
            .ok_or(FrameError::BadRequest)?;
        for index in 0..self.free.len() {
            let (start, end) = self.free[index];
            let Some(aligned) = start.checked_next_multiple_of(align) else {
                continue;
            };
            let Some(alloc_end) = aligned.checked_add(bytes) else {
                continue;
            };
            if alloc_end > end || alloc_end > limit {
                continue;
            }
            // Split the range around the allocation.
            let mut replacement = Vec::with_capacity(2);
            if start < aligned {
                replacement.push((start, aligned));
            }
            if alloc_end < end {
                replacement.push((alloc_end, end));
            }
            self.free.splice(index..=index, replacement);
            return Ok(aligned);
        }
        Err(FrameError::Exhausted {
            requested_frames: frames,
            free_frames: self.free_frames(),
        })
    }

    /// Removes `[start, start + frames)` from the free ranges (memory found
    /// in use after the allocator was built). Frames not free are ignored.
    pub fn reserve(&mut self, start: u64, frames: u64) {
        let end = start.saturating_add(frames.saturating_mul(FRAME_SIZE));
        let mut kept = Vec::with_capacity(self.free.len() + 1);
        for &(s, e) in &self.free {
            if e <= start || s >= end {
                kept.push((s, e));
                continue;
            }
            if s < start {
                kept.push((s, start));
            }
            if end < e {
                kept.push((end, e));
            }
        }
        self.free = kept;
    }

    pub fn free(&mut self, start: u64, frames: u64) -> Result<(), FrameError> {
        let bad = FrameError::BadFree { start, frames };
        if frames == 0 || !start.is_multiple_of(FRAME_SIZE) {
            return Err(bad);
        }
        let end = frames
            .checked_mul(FRAME_SIZE)
            .and_then(|b| start.checked_add(b))
            .ok_or(bad)?;
        if self.free.iter().any(|&(s, e)| s < end && start < e) {
            return Err(bad);
        }
        self.insert(start, end);
        Ok(())
    }

    fn insert(&mut self, start: u64, end: u64) {
        let index = self.free.partition_point(|&(s, _)| s < start);
        self.free.insert(index, (start, end));
        // Merge with the neighbours.
        if index + 1 < self.free.len() && self.free[index].1 >= self.free[index + 1].0 {
            self.free[index].1 = self.free[index].1.max(self.free[index + 1].1);
            self.free.remove(index + 1);
        }
        if index > 0 && self.free[index - 1].1 >= self.free[index].0 {
            self.free[index - 1].1 = self.free[index - 1].1.max(self.free[index].1);
            self.free.remove(index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> Vec<MemoryRegion> {
        alloc::vec![
            MemoryRegion {
                start: 0,
                pages: 16,
                kind: RegionKind::Usable
            },
            MemoryRegion {
                start: 0x10_0000,
                pages: 16,
                kind: RegionKind::AcpiNvs
            },
            MemoryRegion {
                start: 0x20_0000,
                pages: 1024,
                kind: RegionKind::Usable
            },
        ]
    }

    #[test]
    fn builds_from_usable_regions_without_frame_zero() {
        let fa = FrameAllocator::from_memory_map(&map());
        assert_eq!(fa.free_frames(), 15 + 1024);
    }

    #[test]
    fn allocates_aligned_and_frees_with_merging() {
        let mut fa = FrameAllocator::from_memory_map(&map());
        let a = fa.allocate(1, 4096).unwrap();
        assert_eq!(a, 0x1000);
        let b = fa.allocate(512, 0x20_0000).unwrap();
        assert_eq!(b % 0x20_0000, 0);
        assert!(b >= 0x20_0000);
        let before = fa.free_frames();
        fa.free(b, 512).unwrap();
        fa.free(a, 1).unwrap();
        assert_eq!(fa.free_frames(), before + 513);
        assert_eq!(fa.free.len(), 2, "ranges merged back: {:?}", fa.free);
    }

    #[test]
    fn exhaustion_and_bad_frees_are_errors() {
        let mut fa = FrameAllocator::from_memory_map(&map());
        assert!(matches!(
            fa.allocate(5000, 4096),
            Err(FrameError::Exhausted {
                requested_frames: 5000,
                ..
            })
        ));
        assert_eq!(fa.allocate(0, 4096), Err(FrameError::BadRequest));
        assert_eq!(fa.allocate(1, 3 * 4096), Err(FrameError::BadRequest));
        assert!(
            matches!(fa.free(0x20_0000, 1), Err(FrameError::BadFree { .. })),
            "double free"
        );
        assert!(matches!(
            fa.free(0x1001, 1),
            Err(FrameError::BadFree { .. })
        ));
        assert!(matches!(
            fa.free(!0xfff, 2),
            Err(FrameError::BadFree { .. })
        ));
    }

    #[test]
    fn allocate_below_respects_the_limit() {
        let mut fa = FrameAllocator::from_memory_map(&map());
        assert_eq!(fa.allocate_below(1, 4096, 0x20_2000).unwrap(), 0x1000);
        let low = fa.allocate_below(2, 4096, 0x20_2000).unwrap();
        assert_eq!(low, 0x2000, "the low range still has room");
        while fa.allocate_below(1, 4096, 0x10_0000).is_ok() {}
        let got = fa.allocate_below(1, 4096, 0x20_2000).unwrap();
        assert!(got + 4096 <= 0x20_2000, "{got:#x} ends above the limit");
        assert!(matches!(
            fa.allocate_below(4, 4096, 0x20_2000),
            Err(FrameError::Exhausted { .. })
        ));
    }

    #[test]
    fn reserve_carves_out_ranges() {
        let mut fa = FrameAllocator::from_memory_map(&map());
        fa.reserve(0x20_0000, 10);
        fa.reserve(0x0, 2);
        assert_eq!(fa.free_frames(), 14 + 1014);
        assert_eq!(fa.allocate(1, 4096).unwrap(), 0x2000);
    }
}
