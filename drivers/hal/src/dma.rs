//! Memory that devices and IOMMU table walkers read: page tables, queues,
//! context and stream tables.

use core::fmt;

pub const PAGE_SIZE: u64 = 4096;

/// A host physical address.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PhysAddr(u64);

const _: () = assert!(core::mem::size_of::<PhysAddr>() == 8);

impl PhysAddr {
    pub const fn new(raw: u64) -> Self {
        Self(raw)
    }
    pub const fn as_u64(self) -> u64 {
        self.0
    }
    pub const fn is_page_aligned(self) -> bool {
        self.0.is_multiple_of(PAGE_SIZE)
    }
    /// `self + bytes`, or `None` on overflow.
    pub const fn checked_add(self, bytes: u64) -> Option<Self> {
        match self.0.checked_add(bytes) {
            Some(v) => Some(Self(v)),
            None => None,
        }
    }
}

impl fmt::Debug for PhysAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PhysAddr({:#x})", self.0)
    }
}

impl fmt::Display for PhysAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// No page could be allocated (pool exhausted, quota reached, or a test
/// injected the failure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaAllocError;

impl fmt::Display for DmaAllocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("out of DMA-able memory")
    }
}

/// Page-granular memory shared with devices.
///
/// All methods take `&self`: implementations use interior mutability so one
/// allocator can be shared by every driver. Accesses are by physical address
/// and 64-bit word, which is all IOMMU structures need; implementations must
/// make word writes single-copy atomic (a table walker never sees a torn
/// entry).
pub trait DmaMemory {
    /// One zeroed, 4 KiB-aligned page.
    fn alloc_page(&self) -> Result<PhysAddr, DmaAllocError>;
    /// Returns a page obtained from [`DmaMemory::alloc_page`]. Freeing
    /// anything else is a bug the implementation may report loudly.
    fn free_page(&self, page: PhysAddr);
    fn read_u64(&self, addr: PhysAddr) -> u64;
    fn write_u64(&self, addr: PhysAddr, value: u64);
    /// Makes CPU writes to `[addr, addr + len)` visible to an agent whose
    /// reads do not snoop the CPU caches (VT-d ECAP.C = 0, SMMU COHACC = 0).
    fn flush_for_device(&self, addr: PhysAddr, len: u64);

    /// `pages` zeroed, physically contiguous 4 KiB pages whose first byte
    /// is a multiple of `align` bytes (a power of two; anything below
    /// [`PAGE_SIZE`] means page alignment), for structures larger than a
    /// page: GIC LPI configuration and pending tables, ITS tables with
    /// 16/64 KiB pages, large ITTs.
    ///
    /// The default implementation fails: this memory cannot hand out
    /// contiguous ranges. Callers must treat that like any other
    /// allocation failure (fall back to single pages or report which
    /// structure could not be placed).
    fn alloc_contiguous(&self, pages: u64, align: u64) -> Result<PhysAddr, DmaAllocError> {
        let _ = (pages, align);
        Err(DmaAllocError)
    }

    /// Returns a range obtained from [`DmaMemory::alloc_contiguous`], with
    /// the same page count. The default (for memory that never hands out
    /// contiguous ranges) only logs the misuse: such a range cannot exist.
    fn free_contiguous(&self, start: PhysAddr, pages: u64) {
        log::error!(
            "DMA memory: free of {pages} contiguous pages at {start}, but this memory \
             never hands out contiguous ranges; ignored"
        );
    }

    fn read_u32(&self, addr: PhysAddr) -> u32 {
        let word = self.read_u64(PhysAddr::new(addr.as_u64() & !7));
        (word >> ((addr.as_u64() & 4) * 8)) as u32
    }
    fn write_u32(&self, addr: PhysAddr, value: u32) {
        let aligned = PhysAddr::new(addr.as_u64() & !7);
        let shift = (addr.as_u64() & 4) * 8;
        let word = self.read_u64(aligned);
        let merged = (word & !(0xffff_ffffu64 << shift)) | (u64::from(value) << shift);
        self.write_u64(aligned, merged);
    }
}
