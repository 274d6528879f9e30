//! Arm VMSAv8-64 translation tables with the 4 KiB granule: stage 1 (SMMUv3
//! context descriptors) and stage 2 (SMMUv3 STEs and the CPU's VTTBR).
//!
//! Descriptor formats from the Arm ARM (DDI 0487), "Translation table
//! descriptor formats" (D8.3 in issue J), 4 KiB granule, 48-bit output:
//!
//! * bits 1:0: `0b11` table (levels 0-2) or page (level 3), `0b01` block
//!   (levels 1 and 2 only with 4 KiB granule), bit 0 clear: invalid.
//! * bits 47:12: next-level table / output address (a block's address is
//!   aligned to its size).
//! * Stage 1 leaves: `AttrIndx[2:0]` bits 4:2, `AP[2:1]` bits 7:6 (`AP[2]` = read
//!   only, `AP[1]` = EL0 access), SH bits 9:8, AF bit 10, nG bit 11, PXN bit
//!   53, UXN bit 54. Table descriptors: PXNTable bit 59, UXNTable bit 60,
//!   APTable bits 62:61 (left zero: no restriction).
//! * Stage 2 leaves: `MemAttr[3:0]` bits 5:2, S2AP bits 7:6 (bit 6 read, bit 7
//!   write), SH bits 9:8, AF bit 10, `XN[1:0]` bits 54:53.
//!
//! Arm levels 0-3 are this module's levels 3-0. Leaves are written with AF
//! set, so no access-flag fault or hardware AF update is needed.
//! Concatenated stage-2 root tables are not supported.

use sluice_hal::PhysAddr;

use super::format::{Decoded, PageTableFormat, Shareability};
use super::walk::{WalkKind, WalkParams};
use super::x86::address_mask;
use super::{MapPerms, PageTableError, level_size};

/// Output address bits 47:12.
const OA_MASK: u64 = address_mask(48);
const VALID: u64 = 1 << 0;
const TABLE_OR_PAGE: u64 = 1 << 1;
const AF: u64 = 1 << 10;
const SH_SHIFT: u32 = 8;
const SH_MASK: u64 = 0b11 << SH_SHIFT;

/// Decodes the type bits common to both stages.
fn descriptor_kind(level: u8, raw: u64) -> Option<bool> {
    // Some(true): table (level > 0) or page (level 0); Some(false): block.
    if raw & VALID == 0 {
        return None;
    }
    let table_or_page = raw & TABLE_OR_PAGE != 0;
    if (level == 0 || level >= 3) && !table_or_page {
        // The block encoding at Arm level 3 is reserved, and with the 4 KiB
        // granule (without FEAT_LPA2) level 0 has no blocks: both fault
        // like invalid entries.
        return None;
    }
    Some(table_or_page)
}

/// A stage-1 descriptor.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LpaeS1Entry(u64);

const _: () = assert!(core::mem::size_of::<LpaeS1Entry>() == 8);

impl LpaeS1Entry {
    pub const ATTR_INDEX_SHIFT: u32 = 2;
    pub const ATTR_INDEX: u64 = 0b111 << Self::ATTR_INDEX_SHIFT;
    /// `AP[1]`: accessible from EL0 (unprivileged).
    pub const AP_EL0: u64 = 1 << 6;
    /// `AP[2]`: read-only.
    pub const AP_READ_ONLY: u64 = 1 << 7;
    pub const ACCESS_FLAG: u64 = AF;
    pub const NOT_GLOBAL: u64 = 1 << 11;
    pub const PXN: u64 = 1 << 53;
    pub const UXN: u64 = 1 << 54;

    pub const fn from_raw(raw: u64) -> Self {
        Self(raw)
    }
    pub const fn raw(self) -> u64 {
        self.0
    }
    pub const fn table(table: PhysAddr) -> Self {
        Self((table.as_u64() & OA_MASK) | VALID | TABLE_OR_PAGE)
    }
    /// A page (level 0) or block descriptor.
    pub const fn leaf(phys: PhysAddr, page: bool, perms: MapPerms, attrs: ArmS1Attrs) -> Self {
        let mut raw = (phys.as_u64() & OA_MASK)
            | VALID
            | AF
            | ((attrs.attr_index as u64 & 0b111) << Self::ATTR_INDEX_SHIFT)
            | (attrs.shareability.bits() << SH_SHIFT);
        if page {
            raw |= TABLE_OR_PAGE;
        }
        if !perms.write {
            raw |= Self::AP_READ_ONLY;
        }
        if attrs.user {
            raw |= Self::AP_EL0;
        }
        if attrs.not_global {
            raw |= Self::NOT_GLOBAL;
        }
        // Executable for the privilege level the page belongs to only: a
        // user page is never executable by privileged accesses, nor a
        // privileged page by unprivileged ones.
        raw |= match (perms.exec, attrs.user) {
            (false, _) => Self::PXN | Self::UXN,
            (true, true) => Self::PXN,
            (true, false) => Self::UXN,
        };
        Self(raw)
    }
}

/// Attributes of a stage-1 leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ArmS1Attrs {
    /// Index into MAIR (0-7).
    pub attr_index: u8,
    pub shareability: Shareability,
    /// `AP[1]`: unprivileged (EL0 / SMMU unprivileged transactions) access.
    pub user: bool,
    /// nG: the translation is ASID-specific.
    pub not_global: bool,
}

/// VMSAv8-64 stage 1, 4 KiB granule, 3 or 4 levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArmStage1 {
    levels: u8,
    input_bits: u32,
    output_bits: u32,
    bbm_level2: bool,
}

/// The level count for an input size (TnSZ = 64 - input_bits): 4 levels
/// start at Arm level 0 for 40-48 bits, 3 at level 1 for 31-39 bits (Arm ARM
/// chapter D8, initial lookup level for the 4 KiB granule).
fn arm_levels(input_bits: u32) -> Option<u8> {
    match input_bits {
        31..=39 => Some(3),
        40..=48 => Some(4),
        _ => None,
    }
}

impl ArmStage1 {
    /// TCR/CD.T0SZ for this input size.
    pub const fn t0sz(&self) -> u8 {
        (64 - self.input_bits) as u8
    }

    /// `input_bits` = 64 - T0SZ (31-48); `output_bits` from IPS/OAS (at most
    /// 48).
    pub fn new(input_bits: u32, output_bits: u32) -> Result<Self, PageTableError> {
        let levels = arm_levels(input_bits).ok_or(PageTableError::InvalidFormat)?;
        if !(32..=48).contains(&output_bits) {
            return Err(PageTableError::InvalidFormat);
        }
        Ok(Self {
            levels,
            input_bits,
            output_bits,
            bbm_level2: false,
        })
    }

    /// The walker tolerates a block being replaced by an equivalent table
    /// without break-before-make (SMMU_IDR3.BBML = 2, or FEAT_BBM level 2
    /// for the CPU), so splits need no TLB invalidation in between.
    pub const fn with_bbm_level2(mut self) -> Self {
        self.bbm_level2 = true;
        self
    }
}

impl PageTableFormat for ArmStage1 {
    type Attrs = ArmS1Attrs;

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
        // Blocks at Arm levels 1 (1 GiB) and 2 (2 MiB).
        2
    }
    fn check(&self, perms: MapPerms, attrs: &ArmS1Attrs) -> Result<(), PageTableError> {
        // Every valid stage-1 descriptor grants read: write-only and
        // execute-only cannot be expressed.
        if !perms.read {
            return Err(PageTableError::UnsupportedPermissions(perms));
        }
        if attrs.attr_index > 7 {
            return Err(PageTableError::UnsupportedAttributes);
        }
        Ok(())
    }
    fn table_entry(&self, _level: u8, table: PhysAddr) -> u64 {
        LpaeS1Entry::table(table).raw()
    }
    fn leaf_entry(&self, level: u8, phys: PhysAddr, perms: MapPerms, attrs: &ArmS1Attrs) -> u64 {
        LpaeS1Entry::leaf(phys, level == 0, perms, *attrs).raw()
    }
    fn decode(&self, level: u8, raw: u64) -> Decoded<ArmS1Attrs> {
        let Some(table_or_page) = descriptor_kind(level, raw) else {
            return Decoded::Invalid;
        };
        let addr = raw & address_mask(self.output_bits);
        if level > 0 && table_or_page {
            return Decoded::Table(PhysAddr::new(addr));
        }
        let user = raw & LpaeS1Entry::AP_EL0 != 0;
        let xn = if user {
            LpaeS1Entry::UXN
        } else {
            LpaeS1Entry::PXN
        };
        Decoded::Leaf {
            phys: PhysAddr::new(addr & !(level_size(level) - 1)),
            perms: MapPerms::new(true, raw & LpaeS1Entry::AP_READ_ONLY == 0, raw & xn == 0),
            attrs: ArmS1Attrs {
                attr_index: ((raw & LpaeS1Entry::ATTR_INDEX) >> LpaeS1Entry::ATTR_INDEX_SHIFT)
                    as u8,
                shareability: Shareability::from_bits((raw & SH_MASK) >> SH_SHIFT)
                    .unwrap_or_default(),
                user,
                not_global: raw & LpaeS1Entry::NOT_GLOBAL != 0,
            },
        }
    }
    fn split_needs_break_before_make(&self) -> bool {
        !self.bbm_level2
    }
    fn walk_params(&self) -> WalkParams {
        WalkParams {
            kind: WalkKind::ArmStage1,
            levels: self.levels,
            input_bits: self.input_bits,
            output_bits: self.output_bits,
        }
    }
}

/// A stage-2 descriptor.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LpaeS2Entry(u64);

const _: () = assert!(core::mem::size_of::<LpaeS2Entry>() == 8);

impl LpaeS2Entry {
    pub const MEM_ATTR_SHIFT: u32 = 2;
    pub const MEM_ATTR: u64 = 0b1111 << Self::MEM_ATTR_SHIFT;
    /// `S2AP[0]`: read.
    pub const S2AP_READ: u64 = 1 << 6;
    /// `S2AP[1]`: write.
    pub const S2AP_WRITE: u64 = 1 << 7;
    pub const ACCESS_FLAG: u64 = AF;
    /// `XN[1]` (bit 54; without FEAT_XNX bit 53 is RES0 and bit 54 is XN).
    pub const XN: u64 = 1 << 54;

    pub const fn from_raw(raw: u64) -> Self {
        Self(raw)
    }
    pub const fn raw(self) -> u64 {
        self.0
    }
    pub const fn table(table: PhysAddr) -> Self {
        Self((table.as_u64() & OA_MASK) | VALID | TABLE_OR_PAGE)
    }
    pub const fn leaf(phys: PhysAddr, page: bool, perms: MapPerms, attrs: ArmS2Attrs) -> Self {
        let mut raw = (phys.as_u64() & OA_MASK)
            | VALID
            | AF
            | ((attrs.mem_attr as u64 & 0b1111) << Self::MEM_ATTR_SHIFT)
            | (attrs.shareability.bits() << SH_SHIFT);
        if page {
            raw |= TABLE_OR_PAGE;
        }
        if perms.read {
            raw |= Self::S2AP_READ;
        }
        if perms.write {
            raw |= Self::S2AP_WRITE;
        }
        if !perms.exec {
            raw |= Self::XN;
        }
        Self(raw)
    }
}

/// Attributes of a stage-2 leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ArmS2Attrs {
    /// `MemAttr[3:0]` (e.g. 0b1111 Normal write-back, 0b0001 Device-nGnRE).
    pub mem_attr: u8,
    pub shareability: Shareability,
}

/// VMSAv8-64 stage 2, 4 KiB granule, 3 levels (start at Arm level 1,
/// VTCR.SL0 = 1) or 4 levels (start at level 0, SL0 = 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArmStage2 {
    levels: u8,
    input_bits: u32,
    output_bits: u32,
    bbm_level2: bool,
}

impl ArmStage2 {
    /// VTCR.T0SZ (or STE.S2T0SZ) for this input size.
    pub const fn t0sz(&self) -> u8 {
        (64 - self.input_bits) as u8
    }

    /// VTCR.SL0 (or STE.S2SL0) for the 4 KiB granule: 0b01 starts the walk
    /// at Arm level 1 (3 levels), 0b10 at level 0 (4 levels).
    pub const fn sl0(&self) -> u8 {
        self.levels - 2
    }

    /// `input_bits` = 64 - T0SZ (31-48); `output_bits` from PS/OAS (at most
    /// 48).
    pub fn new(input_bits: u32, output_bits: u32) -> Result<Self, PageTableError> {
        let levels = arm_levels(input_bits).ok_or(PageTableError::InvalidFormat)?;
        if !(32..=48).contains(&output_bits) {
            return Err(PageTableError::InvalidFormat);
        }
        Ok(Self {
            levels,
            input_bits,
            output_bits,
            bbm_level2: false,
        })
    }

    /// The walker tolerates a block being replaced by an equivalent table
    /// without break-before-make (SMMU_IDR3.BBML = 2, or FEAT_BBM level 2
    /// for the CPU), so splits need no TLB invalidation in between.
    pub const fn with_bbm_level2(mut self) -> Self {
        self.bbm_level2 = true;
        self
    }
}

impl PageTableFormat for ArmStage2 {
    type Attrs = ArmS2Attrs;

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
    fn check(&self, perms: MapPerms, attrs: &ArmS2Attrs) -> Result<(), PageTableError> {
        // S2AP = 0b00 with XN clear would be an execute-only page; keep
        // instruction fetch tied to read permission to stay portable.
        let data_access = perms.read || perms.write;
        let fetch_ok = !perms.exec || perms.read;
        if !data_access || !fetch_ok {
            return Err(PageTableError::UnsupportedPermissions(perms));
        }
        if attrs.mem_attr > 0b1111 {
            return Err(PageTableError::UnsupportedAttributes);
        }
        Ok(())
    }
    fn table_entry(&self, _level: u8, table: PhysAddr) -> u64 {
        LpaeS2Entry::table(table).raw()
    }
    fn leaf_entry(&self, level: u8, phys: PhysAddr, perms: MapPerms, attrs: &ArmS2Attrs) -> u64 {
        LpaeS2Entry::leaf(phys, level == 0, perms, *attrs).raw()
    }
    fn decode(&self, level: u8, raw: u64) -> Decoded<ArmS2Attrs> {
        let Some(table_or_page) = descriptor_kind(level, raw) else {
            return Decoded::Invalid;
        };
        let addr = raw & address_mask(self.output_bits);
        if level > 0 && table_or_page {
            return Decoded::Table(PhysAddr::new(addr));
        }
        Decoded::Leaf {
            phys: PhysAddr::new(addr & !(level_size(level) - 1)),
            perms: MapPerms::new(
                raw & LpaeS2Entry::S2AP_READ != 0,
                raw & LpaeS2Entry::S2AP_WRITE != 0,
                raw & (LpaeS2Entry::XN | (1 << 53)) == 0,
            ),
            attrs: ArmS2Attrs {
                mem_attr: ((raw & LpaeS2Entry::MEM_ATTR) >> LpaeS2Entry::MEM_ATTR_SHIFT) as u8,
                shareability: Shareability::from_bits((raw & SH_MASK) >> SH_SHIFT)
                    .unwrap_or_default(),
            },
        }
    }
    fn split_needs_break_before_make(&self) -> bool {
        !self.bbm_level2
    }
    fn walk_params(&self) -> WalkParams {
        WalkParams {
            kind: WalkKind::ArmStage2,
            levels: self.levels,
            input_bits: self.input_bits,
            output_bits: self.output_bits,
        }
    }
}
