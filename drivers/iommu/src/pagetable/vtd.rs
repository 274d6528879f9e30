//! VT-d second-level (second-stage) translation tables.
//!
//! Entry layout from the Intel VT-d specification rev 4.0, section 9.8
//! ("second-stage paging entries"; section 9.8 "second-level" in rev 3.x):
//!
//! | bits       | field                                                  |
//! |------------|--------------------------------------------------------|
//! | 0          | R: read                                                |
//! | 1          | W: write                                               |
//! | 2          | X: execute (only used when the PASID entry sets SLEE)  |
//! | 5:3        | EMT: extended memory type (leaves)                     |
//! | 6          | IPAT: ignore PAT (leaves)                              |
//! | 7          | PS: this SL-PDPE/SL-PDE is a 1 GiB/2 MiB leaf          |
//! | 8          | A: accessed (set by hardware when enabled)             |
//! | 9          | D: dirty (leaves; set by hardware when enabled)        |
//! | 11         | SNP: snoop (leaves; honoured when ECAP.SC = 1)         |
//! | (HAW-1):12 | address of the next table or of the page               |
//!
//! An entry with R = W = 0 is not present. The table has 3, 4 or 5 levels
//! (AGAW 39, 48 or 57 bits), chosen from CAP.SAGAW (section 11.4.2: bit 1
//! 3-level, bit 2 4-level, bit 3 5-level).

use sluice_hal::PhysAddr;

use super::format::{Decoded, PageTableFormat, X86MemType};
use super::walk::{WalkKind, WalkParams};
use super::x86::address_mask;
use super::{MapPerms, PageTableError, level_size};

/// A VT-d second-level paging entry (SL-PML5E ... SL-PTE).
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VtdSlEntry(u64);

const _: () = assert!(core::mem::size_of::<VtdSlEntry>() == 8);

impl VtdSlEntry {
    pub const READ: u64 = 1 << 0;
    pub const WRITE: u64 = 1 << 1;
    pub const EXECUTE: u64 = 1 << 2;
    pub const EMT_SHIFT: u32 = 3;
    pub const EMT: u64 = 0b111 << Self::EMT_SHIFT;
    pub const IGNORE_PAT: u64 = 1 << 6;
    pub const PAGE_SIZE: u64 = 1 << 7;
    pub const ACCESSED: u64 = 1 << 8;
    pub const DIRTY: u64 = 1 << 9;
    pub const SNOOP: u64 = 1 << 11;

    pub const fn from_raw(raw: u64) -> Self {
        Self(raw)
    }
    pub const fn raw(self) -> u64 {
        self.0
    }
    /// A non-leaf entry; it grants R, W and X so the leaf alone decides
    /// (effective rights are the AND over all levels).
    pub const fn table(table: PhysAddr, address_mask: u64) -> Self {
        Self((table.as_u64() & address_mask) | Self::READ | Self::WRITE | Self::EXECUTE)
    }
    pub const fn leaf(
        phys: PhysAddr,
        address_mask: u64,
        large: bool,
        perms: MapPerms,
        attrs: VtdSlAttrs,
    ) -> Self {
        let mut raw =
            (phys.as_u64() & address_mask) | (attrs.memory_type.bits() << Self::EMT_SHIFT);
        if perms.read {
            raw |= Self::READ;
        }
        if perms.write {
            raw |= Self::WRITE;
        }
        if perms.exec {
            raw |= Self::EXECUTE;
        }
        if attrs.ignore_pat {
            raw |= Self::IGNORE_PAT;
        }
        if attrs.snoop {
            raw |= Self::SNOOP;
        }
        if large {
            raw |= Self::PAGE_SIZE;
        }
        Self(raw)
    }
    pub const fn is_present(self) -> bool {
        self.0 & (Self::READ | Self::WRITE) != 0
    }
    pub const fn is_large(self) -> bool {
        self.0 & Self::PAGE_SIZE != 0
    }
    pub const fn perms(self) -> MapPerms {
        MapPerms::new(
            self.0 & Self::READ != 0,
            self.0 & Self::WRITE != 0,
            self.0 & Self::EXECUTE != 0,
        )
    }
    pub const fn attrs(self) -> VtdSlAttrs {
        let emt = (self.0 & Self::EMT) >> Self::EMT_SHIFT;
        VtdSlAttrs {
            snoop: self.0 & Self::SNOOP != 0,
            memory_type: match X86MemType::from_bits(emt) {
                Some(t) => t,
                None => X86MemType::Uncacheable,
            },
            ignore_pat: self.0 & Self::IGNORE_PAT != 0,
        }
    }
}

/// Attributes of a VT-d second-level leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct VtdSlAttrs {
    /// SNP: force snooping of this page's accesses (needs ECAP.SC).
    pub snoop: bool,
    /// EMT, used when the context/PASID entry enables extended memory types.
    pub memory_type: X86MemType,
    /// IPAT.
    pub ignore_pat: bool,
}

/// The VT-d second-level format with a run-time level count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VtdSecondLevel {
    levels: u8,
    input_bits: u32,
    output_bits: u32,
}

impl VtdSecondLevel {
    /// `levels` 3, 4 or 5; `input_bits` the domain's address width (at most
    /// the level count's AGAW); `host_address_width` the DMAR HAW + 1.
    pub fn new(
        levels: u8,
        input_bits: u32,
        host_address_width: u32,
    ) -> Result<Self, PageTableError> {
        if !(3..=5).contains(&levels)
            || input_bits < 12
            || input_bits > Self::agaw(levels)
            || !(32..=52).contains(&host_address_width)
        {
            return Err(PageTableError::InvalidFormat);
        }
        Ok(Self {
            levels,
            input_bits,
            output_bits: host_address_width,
        })
    }

    /// The smallest level count in CAP.SAGAW that covers `input_bits`.
    pub fn from_sagaw(
        sagaw: u8,
        input_bits: u32,
        host_address_width: u32,
    ) -> Result<Self, PageTableError> {
        (3..=5u8)
            .find(|&levels| sagaw & (1 << (levels - 2)) != 0 && Self::agaw(levels) >= input_bits)
            .ok_or(PageTableError::InvalidFormat)
            .and_then(|levels| Self::new(levels, input_bits, host_address_width))
    }

    /// Adjusted guest address width of a level count: 39, 48 or 57.
    pub const fn agaw(levels: u8) -> u32 {
        12 + 9 * levels as u32
    }

    /// The context-entry AW field for this table (VT-d 9.3: 1 = 3-level,
    /// 2 = 4-level, 3 = 5-level).
    pub const fn context_aw(&self) -> u8 {
        self.levels - 2
    }

    fn mask(&self) -> u64 {
        address_mask(self.output_bits)
    }
}

impl PageTableFormat for VtdSecondLevel {
    type Attrs = VtdSlAttrs;

    fn levels(&self) -> u8 {
        self.levels
    }
    fn input_bits(&self) -> u32 {
        self.input_bits
    }
    fn output_bits(&self) -> u32 {
        self.output_bits
    }
    fn max_leaf_level(&self) -> u8 {
        2
    }
    fn check(&self, perms: MapPerms, attrs: &VtdSlAttrs) -> Result<(), PageTableError> {
        let _ = attrs;
        // R = W = 0 would be a not-present entry.
        if perms.read || perms.write {
            Ok(())
        } else {
            Err(PageTableError::UnsupportedPermissions(perms))
        }
    }
    fn table_entry(&self, _level: u8, table: PhysAddr) -> u64 {
        VtdSlEntry::table(table, self.mask()).raw()
    }
    fn leaf_entry(&self, level: u8, phys: PhysAddr, perms: MapPerms, attrs: &VtdSlAttrs) -> u64 {
        VtdSlEntry::leaf(phys, self.mask(), level > 0, perms, *attrs).raw()
    }
    fn decode(&self, level: u8, raw: u64) -> Decoded<VtdSlAttrs> {
        let entry = VtdSlEntry::from_raw(raw);
        if !entry.is_present() {
            return Decoded::Invalid;
        }
        let addr = raw & self.mask();
        if level > 0 && !entry.is_large() {
            return Decoded::Table(PhysAddr::new(addr));
        }
        Decoded::Leaf {
            phys: PhysAddr::new(addr & !(level_size(level) - 1)),
            perms: entry.perms(),
            attrs: entry.attrs(),
        }
    }
    fn hardware_managed_bits(&self) -> u64 {
        VtdSlEntry::ACCESSED | VtdSlEntry::DIRTY
    }
    fn dirty_bit(&self) -> Option<u64> {
        Some(VtdSlEntry::DIRTY)
    }
    fn walk_params(&self) -> WalkParams {
        WalkParams {
            kind: WalkKind::VtdSecondLevel,
            levels: self.levels,
            input_bits: self.input_bits,
            output_bits: self.output_bits,
        }
    }
}

pub use super::x86::{FirstLevelAttrs, VtdFirstLevel};
