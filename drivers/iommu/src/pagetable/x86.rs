//! x86 paging-structure entries: the long-mode layout shared by VT-d
//! first-level tables and AMD NPT, and Intel EPT.
//!
//! Long-mode (4/5-level) paging entries: Intel SDM vol. 3A section 4.5,
//! tables 4-15 to 4-20; AMD APM vol. 2 section 5.3.3. Bit 0 P, bit 1 R/W,
//! bit 2 U/S, bit 3 PWT, bit 4 PCD, bit 5 A, bit 6 D (leaves), bit 7 PS
//! (in PDPTEs and PDEs; in PTEs bit 7 is PAT), bit 8 G, bits M-1:12 the
//! address (M = MAXPHYADDR, at most 52), bit 63 XD/NX.
//!
//! EPT entries: Intel SDM vol. 3C, "EPT Translation Mechanism" (29.3.2 in
//! the 2023 edition; chapter 28 in older ones), entry format tables. Bit 0
//! read, bit 1 write, bit 2 execute, bits 5:3 memory type (leaves), bit 6
//! ignore PAT (leaves), bit 7 PS (large-page leaves), bit 8 accessed, bit 9
//! dirty (leaves), bits M-1:12 the address.

use sluice_hal::PhysAddr;

use super::format::{Decoded, PageTableFormat, X86MemType};
use super::walk::{WalkKind, WalkParams};
use super::{MapPerms, PageTableError, level_size};

/// Mask of address bits `[bits-1:12]`.
pub(super) const fn address_mask(bits: u32) -> u64 {
    let top = if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    top & !0xfff
}

/// A long-mode paging-structure entry (PML5E, PML4E, PDPTE, PDE or PTE).
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct X86PagingEntry(u64);

const _: () = assert!(core::mem::size_of::<X86PagingEntry>() == 8);

impl X86PagingEntry {
    pub const PRESENT: u64 = 1 << 0;
    pub const WRITABLE: u64 = 1 << 1;
    pub const USER: u64 = 1 << 2;
    pub const WRITE_THROUGH: u64 = 1 << 3;
    pub const CACHE_DISABLE: u64 = 1 << 4;
    pub const ACCESSED: u64 = 1 << 5;
    pub const DIRTY: u64 = 1 << 6;
    pub const PAGE_SIZE: u64 = 1 << 7;
    pub const GLOBAL: u64 = 1 << 8;
    pub const EXECUTE_DISABLE: u64 = 1 << 63;
    /// Bits 51:12: the widest address field (MAXPHYADDR = 52).
    pub const ADDRESS: u64 = address_mask(52);

    pub const fn from_raw(raw: u64) -> Self {
        Self(raw)
    }
    pub const fn raw(self) -> u64 {
        self.0
    }
    /// A PML5E/PML4E/PDPTE/PDE pointing to the next table.
    pub const fn table(table: PhysAddr, flags: u64) -> Self {
        Self((table.as_u64() & Self::ADDRESS) | Self::PRESENT | flags)
    }
    /// A leaf; `large` sets PS (2 MiB PDE or 1 GiB PDPTE).
    pub const fn leaf(phys: PhysAddr, large: bool, flags: u64) -> Self {
        let ps = if large { Self::PAGE_SIZE } else { 0 };
        Self((phys.as_u64() & Self::ADDRESS) | Self::PRESENT | ps | flags)
    }
    pub const fn is_present(self) -> bool {
        self.0 & Self::PRESENT != 0
    }
    pub const fn is_large(self) -> bool {
        self.0 & Self::PAGE_SIZE != 0
    }
    pub const fn address(self) -> PhysAddr {
        PhysAddr::new(self.0 & Self::ADDRESS)
    }
    pub const fn has(self, bit: u64) -> bool {
        self.0 & bit != 0
    }
}

/// Caching controls of a long-mode leaf: PWT and PCD select one of PAT
/// entries 0-3 (the PAT bit itself is left clear).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct X86Caching {
    pub write_through: bool,
    pub cache_disable: bool,
}

impl X86Caching {
    const fn bits(self) -> u64 {
        (if self.write_through {
            X86PagingEntry::WRITE_THROUGH
        } else {
            0
        }) | (if self.cache_disable {
            X86PagingEntry::CACHE_DISABLE
        } else {
            0
        })
    }

    const fn from_entry(entry: X86PagingEntry) -> Self {
        Self {
            write_through: entry.has(X86PagingEntry::WRITE_THROUGH),
            cache_disable: entry.has(X86PagingEntry::CACHE_DISABLE),
        }
    }
}

/// The long-mode encoding shared by VT-d first level and NPT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LongMode {
    levels: u8,
    output_bits: u32,
}

impl LongMode {
    fn new(levels: u8, output_bits: u32) -> Result<Self, PageTableError> {
        if !(4..=5).contains(&levels) || !(32..=52).contains(&output_bits) {
            return Err(PageTableError::InvalidFormat);
        }
        Ok(Self {
            levels,
            output_bits,
        })
    }

    fn input_bits(self) -> u32 {
        // 4-level paging translates 48 bits, 5-level 57 (SDM vol. 3A 4.5).
        12 + 9 * u32::from(self.levels)
    }

    fn leaf(self, level: u8, phys: PhysAddr, perms: MapPerms, flags: u64) -> u64 {
        let mut flags = flags;
        if perms.write {
            flags |= X86PagingEntry::WRITABLE;
        }
        if !perms.exec {
            flags |= X86PagingEntry::EXECUTE_DISABLE;
        }
        X86PagingEntry::leaf(phys, level > 0, flags).raw()
    }

    fn decode(self, level: u8, raw: u64) -> Decoded<X86PagingEntry> {
        let entry = X86PagingEntry::from_raw(raw);
        if !entry.is_present() {
            return Decoded::Invalid;
        }
        let addr = raw & address_mask(self.output_bits);
        if level > 0 && !entry.is_large() {
            return Decoded::Table(PhysAddr::new(addr));
        }
        // In large leaves bit 12 is the PAT bit, not address.
        let phys = addr & !(level_size(level) - 1);
        Decoded::Leaf {
            phys: PhysAddr::new(phys),
            perms: MapPerms {
                read: true,
                write: entry.has(X86PagingEntry::WRITABLE),
                exec: !entry.has(X86PagingEntry::EXECUTE_DISABLE),
            },
            attrs: entry,
        }
    }
}

fn check_long_mode_perms(perms: MapPerms) -> Result<(), PageTableError> {
    // A present long-mode entry is always readable: write-only and
    // execute-only cannot be expressed.
    if perms.read {
        Ok(())
    } else {
        Err(PageTableError::UnsupportedPermissions(perms))
    }
}

/// Attributes of a VT-d first-level leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FirstLevelAttrs {
    /// U/S: accessible to user-mode (non-privileged) requests.
    pub user: bool,
    pub caching: X86Caching,
}

/// VT-d first-level (first-stage) tables: the x86 long-mode layout walked by
/// the IOMMU for PASID-granular translation (VT-d spec rev 4.0, section 9.7:
/// "first-stage paging entries" follow the IA-32e layout of the SDM). 4 or 5
/// levels; 1 GiB pages only with CAP.FL1GP (cap with
/// [`super::TableConfig::max_page_size`]). Input addresses must be canonical,
/// so the table covers the lower half only: 47 bits (4 levels) or 56 bits
/// (5 levels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VtdFirstLevel {
    mode: LongMode,
}

impl VtdFirstLevel {
    /// `levels` 4 or 5; `host_address_width` from the DMAR HAW (+1).
    pub fn new(levels: u8, host_address_width: u32) -> Result<Self, PageTableError> {
        Ok(Self {
            mode: LongMode::new(levels, host_address_width)?,
        })
    }
}

impl PageTableFormat for VtdFirstLevel {
    type Attrs = FirstLevelAttrs;

    fn levels(&self) -> u8 {
        self.mode.levels
    }
    fn input_bits(&self) -> u32 {
        // Only the lower canonical half: IOVAs with bit 47 (56) set would
        // need sign extension, which DMA addresses never have.
        self.mode.input_bits() - 1
    }
    fn output_bits(&self) -> u32 {
        self.mode.output_bits
    }
    fn max_leaf_level(&self) -> u8 {
        2
    }
    fn check(&self, perms: MapPerms, _attrs: &FirstLevelAttrs) -> Result<(), PageTableError> {
        check_long_mode_perms(perms)
    }
    fn table_entry(&self, _level: u8, table: PhysAddr) -> u64 {
        // Non-leaf entries grant everything; the leaf decides (access rights
        // combine across levels, SDM vol. 3A 4.6).
        X86PagingEntry::table(table, X86PagingEntry::WRITABLE | X86PagingEntry::USER).raw()
    }
    fn leaf_entry(
        &self,
        level: u8,
        phys: PhysAddr,
        perms: MapPerms,
        attrs: &FirstLevelAttrs,
    ) -> u64 {
        let user = if attrs.user { X86PagingEntry::USER } else { 0 };
        self.mode
            .leaf(level, phys, perms, user | attrs.caching.bits())
    }
    fn decode(&self, level: u8, raw: u64) -> Decoded<FirstLevelAttrs> {
        match self.mode.decode(level, raw) {
            Decoded::Invalid => Decoded::Invalid,
            Decoded::Table(t) => Decoded::Table(t),
            Decoded::Leaf {
                phys,
                perms,
                attrs: entry,
            } => Decoded::Leaf {
                phys,
                perms,
                attrs: FirstLevelAttrs {
                    user: entry.has(X86PagingEntry::USER),
                    caching: X86Caching::from_entry(entry),
                },
            },
        }
    }
    fn hardware_managed_bits(&self) -> u64 {
        X86PagingEntry::ACCESSED | X86PagingEntry::DIRTY
    }
    fn dirty_bit(&self) -> Option<u64> {
        Some(X86PagingEntry::DIRTY)
    }
    fn walk_params(&self) -> WalkParams {
        WalkParams {
            kind: WalkKind::VtdFirstLevel,
            levels: self.mode.levels,
            input_bits: self.mode.input_bits() - 1,
            output_bits: self.mode.output_bits,
        }
    }
}

/// AMD nested page tables: long-mode entries translating guest-physical
/// addresses. Every entry has U/S set because NPT walks treat all accesses
/// as user accesses (AMD APM vol. 2, section 15.25 "Nested Paging").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AmdNpt {
    mode: LongMode,
}

impl AmdNpt {
    /// `levels` 4 (or 5 with 5-level NPT); `output_bits` the host
    /// MAXPHYADDR.
    pub fn new(levels: u8, output_bits: u32) -> Result<Self, PageTableError> {
        Ok(Self {
            mode: LongMode::new(levels, output_bits)?,
        })
    }
}

impl PageTableFormat for AmdNpt {
    type Attrs = X86Caching;

    fn levels(&self) -> u8 {
        self.mode.levels
    }
    fn input_bits(&self) -> u32 {
        self.mode.input_bits()
    }
    fn output_bits(&self) -> u32 {
        self.mode.output_bits
    }
    fn max_leaf_level(&self) -> u8 {
        2
    }
    fn check(&self, perms: MapPerms, _attrs: &X86Caching) -> Result<(), PageTableError> {
        check_long_mode_perms(perms)
    }
    fn table_entry(&self, _level: u8, table: PhysAddr) -> u64 {
        X86PagingEntry::table(table, X86PagingEntry::WRITABLE | X86PagingEntry::USER).raw()
    }
    fn leaf_entry(&self, level: u8, phys: PhysAddr, perms: MapPerms, attrs: &X86Caching) -> u64 {
        self.mode
            .leaf(level, phys, perms, X86PagingEntry::USER | attrs.bits())
    }
    fn decode(&self, level: u8, raw: u64) -> Decoded<X86Caching> {
        match self.mode.decode(level, raw) {
            Decoded::Invalid => Decoded::Invalid,
            Decoded::Table(t) => Decoded::Table(t),
            Decoded::Leaf {
                phys,
                perms,
                attrs: entry,
            } => Decoded::Leaf {
                phys,
                perms,
                attrs: X86Caching::from_entry(entry),
            },
        }
    }
    fn hardware_managed_bits(&self) -> u64 {
        X86PagingEntry::ACCESSED | X86PagingEntry::DIRTY
    }
    fn dirty_bit(&self) -> Option<u64> {
        Some(X86PagingEntry::DIRTY)
    }
    fn walk_params(&self) -> WalkParams {
        WalkParams {
            kind: WalkKind::AmdNpt,
            levels: self.mode.levels,
            input_bits: self.mode.input_bits(),
            output_bits: self.mode.output_bits,
        }
    }
}

/// An EPT paging-structure entry.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EptEntry(u64);

const _: () = assert!(core::mem::size_of::<EptEntry>() == 8);

impl EptEntry {
    pub const READ: u64 = 1 << 0;
    pub const WRITE: u64 = 1 << 1;
    pub const EXECUTE: u64 = 1 << 2;
    pub const MEMORY_TYPE_SHIFT: u32 = 3;
    pub const MEMORY_TYPE: u64 = 0b111 << Self::MEMORY_TYPE_SHIFT;
    pub const IGNORE_PAT: u64 = 1 << 6;
    pub const PAGE_SIZE: u64 = 1 << 7;
    pub const ACCESSED: u64 = 1 << 8;
    pub const DIRTY: u64 = 1 << 9;
    pub const ADDRESS: u64 = address_mask(52);

    pub const fn from_raw(raw: u64) -> Self {
        Self(raw)
    }
    pub const fn raw(self) -> u64 {
        self.0
    }
    /// A non-leaf entry granting read, write and execute (access rights
    /// combine across levels, SDM vol. 3C "EPT-Induced VM Exits").
    pub const fn table(table: PhysAddr) -> Self {
        Self((table.as_u64() & Self::ADDRESS) | Self::READ | Self::WRITE | Self::EXECUTE)
    }
    pub const fn leaf(
        phys: PhysAddr,
        large: bool,
        perms: MapPerms,
        memory_type: X86MemType,
        ignore_pat: bool,
    ) -> Self {
        let mut raw =
            (phys.as_u64() & Self::ADDRESS) | (memory_type.bits() << Self::MEMORY_TYPE_SHIFT);
        if perms.read {
            raw |= Self::READ;
        }
        if perms.write {
            raw |= Self::WRITE;
        }
        if perms.exec {
            raw |= Self::EXECUTE;
        }
        if ignore_pat {
            raw |= Self::IGNORE_PAT;
        }
        if large {
            raw |= Self::PAGE_SIZE;
        }
        Self(raw)
    }
    /// Bits 2:0 all clear: not present (SDM vol. 3C, EPT translation).
    pub const fn is_present(self) -> bool {
        self.0 & (Self::READ | Self::WRITE | Self::EXECUTE) != 0
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
    pub const fn memory_type_bits(self) -> u64 {
        (self.0 & Self::MEMORY_TYPE) >> Self::MEMORY_TYPE_SHIFT
    }
}

/// Attributes of an EPT leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct EptAttrs {
    pub memory_type: X86MemType,
    pub ignore_pat: bool,
}

/// Intel EPT, 4 levels (or 5 with IA32_VMX_EPT_VPID_CAP bit 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntelEpt {
    levels: u8,
    output_bits: u32,
    execute_only: bool,
}

impl IntelEpt {
    /// `execute_only`: IA32_VMX_EPT_VPID_CAP bit 0 (execute-only
    /// translations supported).
    pub fn new(levels: u8, output_bits: u32, execute_only: bool) -> Result<Self, PageTableError> {
        if !(4..=5).contains(&levels) || !(32..=52).contains(&output_bits) {
            return Err(PageTableError::InvalidFormat);
        }
        Ok(Self {
            levels,
            output_bits,
            execute_only,
        })
    }

    /// The EPT pointer for the VMCS (SDM vol. 3C, "Extended-Page-Table
    /// Pointer (EPTP)"): bits 2:0 the paging-structure memory type (6,
    /// write-back), bits 5:3 the page-walk length minus one, bit 6 enables
    /// accessed/dirty flags, bits 51:12 the root table.
    pub const fn eptp(&self, root: PhysAddr, accessed_dirty: bool) -> u64 {
        let ad = if accessed_dirty { 1 << 6 } else { 0 };
        (root.as_u64() & EptEntry::ADDRESS)
            | ((self.levels as u64 - 1) << 3)
            | ad
            | X86MemType::WriteBack.bits()
    }
}

impl PageTableFormat for IntelEpt {
    type Attrs = EptAttrs;

    fn levels(&self) -> u8 {
        self.levels
    }
    fn input_bits(&self) -> u32 {
        12 + 9 * u32::from(self.levels)
    }
    fn output_bits(&self) -> u32 {
        self.output_bits
    }
    fn max_leaf_level(&self) -> u8 {
        2
    }
    fn check(&self, perms: MapPerms, _attrs: &EptAttrs) -> Result<(), PageTableError> {
        // Write without read is an EPT misconfiguration, and execute-only
        // needs the capability (SDM vol. 3C, "EPT Misconfigurations").
        let ok = if perms.read {
            true
        } else {
            perms.exec && !perms.write && self.execute_only
        };
        if ok {
            Ok(())
        } else {
            Err(PageTableError::UnsupportedPermissions(perms))
        }
    }
    fn table_entry(&self, _level: u8, table: PhysAddr) -> u64 {
        EptEntry::table(table).raw()
    }
    fn leaf_entry(&self, level: u8, phys: PhysAddr, perms: MapPerms, attrs: &EptAttrs) -> u64 {
        EptEntry::leaf(phys, level > 0, perms, attrs.memory_type, attrs.ignore_pat).raw()
    }
    fn decode(&self, level: u8, raw: u64) -> Decoded<EptAttrs> {
        let entry = EptEntry::from_raw(raw);
        if !entry.is_present() {
            return Decoded::Invalid;
        }
        let addr = raw & address_mask(self.output_bits);
        if level > 0 && !entry.is_large() {
            return Decoded::Table(PhysAddr::new(addr));
        }
        Decoded::Leaf {
            phys: PhysAddr::new(addr & !(level_size(level) - 1)),
            perms: entry.perms(),
            attrs: EptAttrs {
                memory_type: X86MemType::from_bits(entry.memory_type_bits()).unwrap_or_default(),
                ignore_pat: raw & EptEntry::IGNORE_PAT != 0,
            },
        }
    }
    fn hardware_managed_bits(&self) -> u64 {
        EptEntry::ACCESSED | EptEntry::DIRTY
    }
    fn dirty_bit(&self) -> Option<u64> {
        Some(EptEntry::DIRTY)
    }
    fn walk_params(&self) -> WalkParams {
        WalkParams {
            kind: WalkKind::IntelEpt,
            levels: self.levels,
            input_bits: self.input_bits(),
            output_bits: self.output_bits,
        }
    }
}
