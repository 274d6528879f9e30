//! The bare-metal implementations of the driver traits in `sluice_hal`:
//! registers and DMA memory reached through Sluice's identity map.

use sluice_hal::{DmaAllocError, DmaMemory, Mmio, PAGE_SIZE, PhysAddr};
use spin::Mutex;

use crate::memory::frame::FrameAllocator;

/// A device's register window at a physical address.
#[derive(Debug, Clone, Copy)]
pub struct PhysMmio {
    base: u64,
    size: u64,
}

impl PhysMmio {
    /// # Safety
    /// `[base, base + size)` must be a device's register block (from ACPI or
    /// a BAR) that the caller owns, identity-mapped as device memory or
    /// covered by an uncacheable MTRR.
    pub const unsafe fn new(base: u64, size: u64) -> Self {
        Self { base, size }
    }

    pub const fn base(&self) -> u64 {
        self.base
    }

    /// The address of `offset`, or `None` (logged) when the access would
    /// leave the window: register offsets can come from the hardware itself
    /// (VT-d CAP.FRO, ECAP.IRO), and a bad one must not reach other memory.
    fn address(&self, offset: usize, width: u64) -> Option<u64> {
        let offset = offset as u64;
        if offset
            .checked_add(width)
            .is_some_and(|end| end <= self.size)
        {
            return Some(self.base + offset);
        }
        log::error!(
            "register access at offset {offset:#x} is outside the {:#x}-byte window at {:#x}; ignored",
            self.size,
            self.base
        );
        None
    }
}

/// Out-of-window reads return all ones, like a PCI master abort.
impl Mmio for PhysMmio {
    fn read32(&self, offset: usize) -> u32 {
        // SAFETY: `new`'s contract; `address` keeps the access in the window.
        self.address(offset, 4).map_or(u32::MAX, |a| unsafe {
            core::ptr::read_volatile(a as *const u32)
        })
    }
    fn write32(&self, offset: usize, value: u32) {
        if let Some(a) = self.address(offset, 4) {
            // SAFETY: as `read32`.
            unsafe { core::ptr::write_volatile(a as *mut u32, value) }
        }
    }
    fn read64(&self, offset: usize) -> u64 {
        // SAFETY: as `read32`.
        self.address(offset, 8).map_or(u64::MAX, |a| unsafe {
            core::ptr::read_volatile(a as *const u64)
        })
    }
    fn write64(&self, offset: usize, value: u64) {
        if let Some(a) = self.address(offset, 8) {
            // SAFETY: as `read32`.
            unsafe { core::ptr::write_volatile(a as *mut u64, value) }
        }
    }
}

/// Pages for IOMMU structures, from the frame allocator.
pub struct FrameDmaMemory<'a> {
    frames: &'a Mutex<FrameAllocator>,
}

impl<'a> FrameDmaMemory<'a> {
    pub const fn new(frames: &'a Mutex<FrameAllocator>) -> Self {
        Self { frames }
    }
}

impl DmaMemory for FrameDmaMemory<'_> {
    fn alloc_page(&self) -> Result<PhysAddr, DmaAllocError> {
        let page = self
            .frames
            .lock()
            .allocate(1, PAGE_SIZE)
            .map_err(|_| DmaAllocError)?;
        // SAFETY: the frame is ours now and identity-mapped.
        unsafe { core::ptr::write_bytes(page as *mut u8, 0, PAGE_SIZE as usize) };
        Ok(PhysAddr::new(page))
    }

    fn free_page(&self, page: PhysAddr) {
        if let Err(e) = self.frames.lock().free(page.as_u64(), 1) {
            log::error!("DMA memory: {e}; the page stays allocated");
        }
    }

    fn read_u64(&self, addr: PhysAddr) -> u64 {
        // SAFETY: callers pass addresses inside pages they allocated here;
        // RAM is identity-mapped; 8-byte aligned accesses are single-copy
        // atomic.
        unsafe { core::ptr::read_volatile(addr.as_u64() as *const u64) }
    }

    fn write_u64(&self, addr: PhysAddr, value: u64) {
        // SAFETY: as `read_u64`.
        unsafe { core::ptr::write_volatile(addr.as_u64() as *mut u64, value) }
    }

    fn flush_for_device(&self, addr: PhysAddr, len: u64) {
        crate::arch::clean_dcache_range(addr.as_u64(), len);
    }

    fn alloc_contiguous(&self, pages: u64, align: u64) -> Result<PhysAddr, DmaAllocError> {
        let bytes = pages.checked_mul(PAGE_SIZE).ok_or(DmaAllocError)?;
        let start = self
            .frames
            .lock()
            .allocate(pages, align.max(PAGE_SIZE))
            .map_err(|_| DmaAllocError)?;
        // SAFETY: the frames are ours now and identity-mapped; `bytes` is
        // exactly what was allocated.
        unsafe { core::ptr::write_bytes(start as *mut u8, 0, bytes as usize) };
        Ok(PhysAddr::new(start))
    }

    fn free_contiguous(&self, start: PhysAddr, pages: u64) {
        if let Err(e) = self.frames.lock().free(start.as_u64(), pages) {
            log::error!("DMA memory: {e}; the {pages} pages at {start} stay allocated");
        }
    }
}
