//! The IO page-table engine.
//!
//! One engine ([`IoPageTable`]) builds and edits every radix translation
//! table Sluice hands to hardware: VT-d second- and first-level tables, Arm
//! VMSAv8-64 stage 1 and stage 2 tables (SMMUv3 and the CPU's stage 2), AMD
//! NPT and Intel EPT. What differs between them (how many levels, which levels
//! may hold a leaf, the bits of an entry) is described by a
//! [`PageTableFormat`]; the engine itself only knows radix walks of 512
//! 8-byte entries per 4 KiB table.
//!
//! Conventions used throughout this module:
//!
//! * **Levels are numbered from the leaf up**: level 0 holds 4 KiB pages,
//!   level 1 entries map 2 MiB, level 2 entries map 1 GiB, and the root table
//!   is level `levels - 1`. (Arm calls our level 0 "level 3"; VT-d calls it
//!   the SL-PTE level.)
//! * Every call either succeeds completely or fails with nothing changed,
//!   neither in memory nor in what a walker could have cached: `map` and
//!   `unmap` allocate everything they need *before* writing any entry.
//! * Every successful change returns an [`Invalidation`]: exactly which IOVA
//!   pages changed, the largest leaf touched, whether paging-structure caches
//!   are affected, and the table pages to free once the caller has
//!   invalidated ([`Invalidation::complete`]).
//! * [`walk`] is an independent table walker written from the specifications
//!   (it shares no decoding code with the formats) for tests of this engine
//!   and of the drivers.
//!
//! The life of a change, as a driver sees it:
//!
//! ```
//! use sluice_hal::{PhysAddr, model::ModelMemory};
//! use sluice_iommu::pagetable::vtd::{VtdSecondLevel, VtdSlAttrs};
//! use sluice_iommu::pagetable::{IoPageTable, MapPerms, PageSize, TableConfig};
//!
//! let mem = ModelMemory::new();
//! // CAP.SAGAW offers 3- and 4-level tables; the domain needs 48 bits; the
//! // DMAR says HAW = 46 bits; CAP.SLLPS allows 2 MiB and 1 GiB pages.
//! let format = VtdSecondLevel::from_sagaw(0b0110, 48, 46)?;
//! let config = TableConfig::new(PageSize::from_vtd_sllps(0b11), true);
//! let mut table: IoPageTable<'_, _, ModelMemory> = IoPageTable::new(&mem, format, config)?;
//!
//! let attrs = VtdSlAttrs { snoop: true, ..VtdSlAttrs::default() };
//! let inv = table.map(0x4000_0000, PhysAddr::new(0x8000_0000), 0x20_0000, MapPerms::READ_WRITE, attrs)?;
//! assert_eq!(inv.largest_page(), 0x20_0000); // one 2 MiB leaf
//! // In caching mode the driver now invalidates `inv.newly_present()`.
//! inv.complete(&mem);
//!
//! let inv = table.unmap(0x4000_0000, 0x1000)?; // splits the 2 MiB leaf
//! assert_eq!(inv.ranges().len(), 1);
//! assert!(inv.flush_paging_structures()); // VT-d: IH = 0
//! // The driver invalidates `inv.ranges()` (address mask chosen from
//! // `inv.largest_page()`), waits for completion, and only then:
//! inv.complete(&mem); // frees unlinked tables
//!
//! table.destroy().release(&mem); // after detaching and a domain flush
//! assert_eq!(mem.live_pages(), 0);
//! # Ok::<(), sluice_iommu::pagetable::PageTableError>(())
//! ```

mod engine;
mod format;
mod invalidation;
pub mod walk;

pub mod arm;
pub mod vtd;
pub mod x86;

#[cfg(test)]
mod tests;

pub use engine::{IoPageTable, TableConfig};
pub use format::{Decoded, PageTableFormat, Shareability, X86MemType};
pub use invalidation::{ChangeKind, Invalidation, IovaRange, PendingFree};

use core::fmt;

use sluice_hal::PhysAddr;

/// Bits of IOVA translated by one table level (512 entries of 8 bytes).
pub const BITS_PER_LEVEL: u32 = 9;
/// Entries in one table.
pub const ENTRIES_PER_TABLE: u64 = 1 << BITS_PER_LEVEL;
/// The smallest page every format supports.
pub const PAGE_SHIFT: u32 = 12;

/// Bytes mapped by one entry at `level` (level 0: 4 KiB).
pub const fn level_size(level: u8) -> u64 {
    1u64 << (PAGE_SHIFT + BITS_PER_LEVEL * level as u32)
}

/// Index of `iova`'s entry in the table at `level`.
pub const fn level_index(iova: u64, level: u8) -> u64 {
    (iova >> (PAGE_SHIFT + BITS_PER_LEVEL * level as u32)) & (ENTRIES_PER_TABLE - 1)
}

/// The page sizes a leaf may have with 4 KiB tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PageSize {
    Size4K,
    Size2M,
    Size1G,
}

impl PageSize {
    /// The table level whose entries map this size.
    pub const fn level(self) -> u8 {
        match self {
            PageSize::Size4K => 0,
            PageSize::Size2M => 1,
            PageSize::Size1G => 2,
        }
    }

    pub const fn bytes(self) -> u64 {
        level_size(self.level())
    }

    /// The largest page a VT-d unit supports for second-level tables, from
    /// CAP.SLLPS (VT-d spec rev 4.0, section 11.4.2: bit 0 of the field is
    /// 2 MiB, bit 1 is 1 GiB). A 1 GiB bit without the 2 MiB bit is treated as
    /// 4 KiB only, since the engine never skips a page size.
    pub const fn from_vtd_sllps(sllps: u8) -> Self {
        match sllps & 0b11 {
            0b11 => PageSize::Size1G,
            0b01 => PageSize::Size2M,
            _ => PageSize::Size4K,
        }
    }
}

/// The access a mapping grants. Which combinations a format can express
/// differs (x86 paging cannot express write-only, EPT cannot express
/// write-without-read); [`PageTableFormat::check`] rejects the rest with
/// [`PageTableError::UnsupportedPermissions`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MapPerms {
    pub read: bool,
    pub write: bool,
    pub exec: bool,
}

impl MapPerms {
    pub const READ: Self = Self::new(true, false, false);
    pub const READ_WRITE: Self = Self::new(true, true, false);
    pub const ALL: Self = Self::new(true, true, true);

    pub const fn new(read: bool, write: bool, exec: bool) -> Self {
        Self { read, write, exec }
    }

    pub const fn is_none(self) -> bool {
        !self.read && !self.write && !self.exec
    }
}

/// What an IOVA currently translates to, as recorded in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation<A> {
    /// The physical address `iova` itself translates to (page offset
    /// included).
    pub phys: PhysAddr,
    pub perms: MapPerms,
    pub attrs: A,
    /// Size of the leaf that holds the translation.
    pub page_size: u64,
}

/// Why a page-table operation was refused. Nothing was changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageTableError {
    /// `len` was zero.
    ZeroLength,
    /// The IOVA, physical address or length is not a multiple of 4 KiB.
    Misaligned,
    /// `iova + len` or `phys + len` does not fit in 64 bits.
    Overflow,
    /// The IOVA range reaches beyond the format's input address width.
    IovaOutOfRange { input_bits: u32 },
    /// The physical range reaches beyond what the format's entries can hold.
    PhysOutOfRange { output_bits: u32 },
    /// Part of the range is already mapped; `iova` is the first mapped page
    /// found.
    AlreadyMapped { iova: u64 },
    /// The format cannot express these permissions.
    UnsupportedPermissions(MapPerms),
    /// The format-specific attributes are out of range (e.g. a reserved
    /// memory type).
    UnsupportedAttributes,
    /// The format parameters are invalid (e.g. a level count the format does
    /// not have).
    InvalidFormat,
    /// A table page could not be allocated.
    OutOfMemory,
    /// The unmap needs to split a superpage and the format requires
    /// break-before-make for that: use `unmap_with_break`.
    NeedsBreakBeforeMake,
    /// The format has no dirty bit the engine can use, or the walker does
    /// not snoop CPU caches (hardware-set bits would not be seen reliably).
    DirtyTrackingUnsupported,
}

impl fmt::Display for PageTableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ZeroLength => f.write_str("zero-length range"),
            Self::Misaligned => f.write_str("address or length is not 4 KiB aligned"),
            Self::Overflow => f.write_str("address + length overflows"),
            Self::IovaOutOfRange { input_bits } => {
                write!(f, "IOVA range beyond the {input_bits}-bit input width")
            }
            Self::PhysOutOfRange { output_bits } => {
                write!(
                    f,
                    "physical range beyond the {output_bits}-bit output width"
                )
            }
            Self::AlreadyMapped { iova } => write!(f, "IOVA {iova:#x} is already mapped"),
            Self::UnsupportedPermissions(p) => {
                write!(f, "permissions {p:?} cannot be expressed by this format")
            }
            Self::UnsupportedAttributes => f.write_str("memory attributes out of range"),
            Self::InvalidFormat => f.write_str("invalid page-table format parameters"),
            Self::OutOfMemory => f.write_str("out of memory for page tables"),
            Self::DirtyTrackingUnsupported => {
                f.write_str("dirty tracking is not available for this table")
            }
            Self::NeedsBreakBeforeMake => {
                f.write_str("splitting a superpage needs break-before-make with TLB invalidation")
            }
        }
    }
}
