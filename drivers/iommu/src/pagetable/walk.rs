//! An independent translation-table walker.
//!
//! Written from the specifications separately from the formats the engine
//! writes with: it decodes raw descriptor bits itself and shares no
//! encoding or decoding code with them, so a test that checks the engine's
//! tables with this walker checks them against a second reading of the
//! spec. Drivers' tests use it too (e.g. to follow a VT-d context entry's
//! table the way the hardware would).
//!
//! Levels are numbered from the leaf up as in the rest of this module (level
//! 0 holds 4 KiB pages); Arm's level n is this walker's level `3 - n`.

use alloc::vec::Vec;

use sluice_hal::{DmaMemory, PhysAddr};

use super::MapPerms;

/// Which descriptor format to decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkKind {
    /// VT-d second-level (VT-d spec rev 4.0, 9.8).
    VtdSecondLevel,
    /// VT-d first-level: IA-32e paging layout (VT-d 9.7, SDM vol. 3A 4.5).
    VtdFirstLevel,
    /// VMSAv8-64 stage 1, 4 KiB granule (Arm ARM, descriptor formats).
    ArmStage1,
    /// VMSAv8-64 stage 2, 4 KiB granule (Arm ARM, descriptor formats).
    ArmStage2,
    /// AMD nested paging: long-mode layout (AMD APM vol. 2, 5.3 and 15.25).
    AmdNpt,
    /// Intel EPT (SDM vol. 3C, "The Extended Page Table Mechanism").
    IntelEpt,
}

/// What the walker needs to know about a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalkParams {
    pub kind: WalkKind,
    pub levels: u8,
    pub input_bits: u32,
    pub output_bits: u32,
}

/// A successful walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Walk {
    /// The physical address the input address translates to.
    pub phys: PhysAddr,
    /// Size of the leaf: 4 KiB, 2 MiB or 1 GiB.
    pub page_size: u64,
    /// Level of the leaf (0 for 4 KiB).
    pub level: u8,
    /// Effective rights, combined over all levels. For formats with a
    /// user/privileged distinction, the rights of the privilege level the
    /// page belongs to (see `user`).
    pub perms: MapPerms,
    /// Whether unprivileged (user, EL0) requests may use the page. Always
    /// true for formats without the distinction (VT-d second level, EPT,
    /// stage 2, NPT).
    pub user: bool,
    /// The raw leaf descriptor, for checking attribute bits.
    pub leaf: u64,
}

/// Why a walk stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkFault {
    /// The parameters describe no table of that kind (e.g. five Arm levels).
    InvalidParams,
    /// The input address is at or above `1 << input_bits`.
    AddressTooWide,
    /// The entry at `level` is not present (invalid).
    NotPresent { level: u8 },
    /// The entry at `level` has a reserved encoding (e.g. a large page where
    /// none is allowed, an output address beyond the output width).
    Reserved { level: u8 },
    /// An Arm leaf with AF = 0 (access-flag fault).
    AccessFlag { level: u8 },
    /// The access is not permitted by the effective rights.
    Permission,
}

/// The access a request makes, for [`walk_access`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    pub write: bool,
    pub exec: bool,
    pub user: bool,
}

fn bits(raw: u64, hi: u32, lo: u32) -> u64 {
    (raw >> lo) & ((1u64 << (hi - lo + 1)) - 1)
}

fn bit(raw: u64, n: u32) -> bool {
    raw & (1u64 << n) != 0
}

/// Output-address field `[out-1 : shift]` of `raw`, with `max_out` the
/// format's widest field. Bits between `out` and `max_out` must be zero.
fn out_addr(raw: u64, shift: u32, out: u32, max_out: u32) -> Result<u64, ()> {
    let field = bits(raw, max_out - 1, shift) << shift;
    if out < 64 && field >> out != 0 {
        return Err(());
    }
    Ok(field)
}

/// Translates `iova` through the table at `root`.
pub fn walk<M: DmaMemory + ?Sized>(
    mem: &M,
    params: &WalkParams,
    root: PhysAddr,
    iova: u64,
) -> Result<Walk, WalkFault> {
    let (max_levels, max_out) = match params.kind {
        WalkKind::ArmStage1 | WalkKind::ArmStage2 => (4, 48),
        _ => (5, 52),
    };
    if params.levels == 0
        || params.levels > max_levels
        || params.output_bits < 12
        || params.output_bits > max_out
    {
        return Err(WalkFault::InvalidParams);
    }
    if params.input_bits < 64 && iova >> params.input_bits != 0 {
        return Err(WalkFault::AddressTooWide);
    }
    let mut table = root.as_u64();
    let mut level = params.levels - 1;
    let mut read = true;
    let mut write = true;
    let mut exec = true;
    let mut user = true;
    // Arm stage 1: table-level execute-never for unprivileged and
    // privileged requests; which one applies is known at the leaf.
    let mut uxn_table = false;
    let mut pxn_table = false;
    loop {
        let shift = 12 + 9 * u32::from(level);
        let index = (iova >> shift) & 0x1ff;
        let raw = mem.read_u64(PhysAddr::new(table + index * 8));
        let size = 1u64 << shift;
        // Each arm either descends to the next table (`continue`) or sets
        // the leaf address.
        let leaf_addr: u64;
        match params.kind {
            WalkKind::VtdSecondLevel => {
                // Not present when R and W are both clear; PS (bit 7) makes
                // a leaf in SL-PDPE/SL-PDE only.
                if raw & 0b11 == 0 {
                    return Err(WalkFault::NotPresent { level });
                }
                read &= bit(raw, 0);
                write &= bit(raw, 1);
                exec &= bit(raw, 2);
                let ps = bit(raw, 7);
                if ps && level > 2 {
                    return Err(WalkFault::Reserved { level });
                }
                let addr = out_addr(raw, 12, params.output_bits, 52)
                    .map_err(|()| WalkFault::Reserved { level })?;
                if level == 0 || ps {
                    leaf_addr = addr;
                } else {
                    table = addr;
                    level -= 1;
                    continue;
                }
            }
            WalkKind::VtdFirstLevel | WalkKind::AmdNpt => {
                // P bit 0; R/W bit 1, U/S bit 2 and XD bit 63 combine over
                // levels; PS bit 7 in PDPTE/PDE; in PTEs bit 7 is PAT.
                if !bit(raw, 0) {
                    return Err(WalkFault::NotPresent { level });
                }
                write &= bit(raw, 1);
                user &= bit(raw, 2);
                exec &= !bit(raw, 63);
                let ps = level > 0 && bit(raw, 7);
                if ps && level > 2 {
                    return Err(WalkFault::Reserved { level });
                }
                let addr = out_addr(raw, 12, params.output_bits, 52)
                    .map_err(|()| WalkFault::Reserved { level })?;
                if level == 0 || ps {
                    // Large leaves keep PAT in bit 12: drop the low bits.
                    leaf_addr = addr & !(size - 1);
                } else {
                    table = addr;
                    level -= 1;
                    continue;
                }
            }
            WalkKind::IntelEpt => {
                // Not present when bits 2:0 are clear; PS bit 7.
                if raw & 0b111 == 0 {
                    return Err(WalkFault::NotPresent { level });
                }
                // Write without read is a misconfiguration.
                if bit(raw, 1) && !bit(raw, 0) {
                    return Err(WalkFault::Reserved { level });
                }
                read &= bit(raw, 0);
                write &= bit(raw, 1);
                exec &= bit(raw, 2);
                let ps = level > 0 && bit(raw, 7);
                if ps && level > 2 {
                    return Err(WalkFault::Reserved { level });
                }
                let addr = out_addr(raw, 12, params.output_bits, 52)
                    .map_err(|()| WalkFault::Reserved { level })?;
                if level == 0 || ps {
                    leaf_addr = addr & !(size - 1);
                } else {
                    table = addr;
                    level -= 1;
                    continue;
                }
            }
            WalkKind::ArmStage1 | WalkKind::ArmStage2 => {
                // bit 0 valid; bits 1:0 = 0b11 table/page, 0b01 block.
                if !bit(raw, 0) {
                    return Err(WalkFault::NotPresent { level });
                }
                let is_table_or_page = bit(raw, 1);
                if level == 0 && !is_table_or_page {
                    // Block encoding at Arm level 3: invalid.
                    return Err(WalkFault::NotPresent { level });
                }
                if level == 3 && !is_table_or_page {
                    // No level-0 blocks with the 4 KiB granule (no LPA2):
                    // a translation fault.
                    return Err(WalkFault::NotPresent { level });
                }
                let addr = out_addr(raw, 12, params.output_bits, 48)
                    .map_err(|()| WalkFault::Reserved { level })?;
                if level > 0 && is_table_or_page {
                    if params.kind == WalkKind::ArmStage1 {
                        // Hierarchical controls: APTable[1] bit 62 no write,
                        // APTable[0] bit 61 no EL0, UXNTable bit 60,
                        // PXNTable bit 59 (stage 2 has none).
                        write &= !bit(raw, 62);
                        user &= !bit(raw, 61);
                        uxn_table |= bit(raw, 60);
                        pxn_table |= bit(raw, 59);
                    }
                    table = addr;
                    level -= 1;
                    continue;
                }
                if !bit(raw, 10) {
                    return Err(WalkFault::AccessFlag { level });
                }
                let block_addr = addr & !(size - 1);
                if params.kind == WalkKind::ArmStage1 {
                    // AP[2] bit 7 read-only, AP[1] bit 6 EL0 access;
                    // PXN bit 53, UXN bit 54.
                    user &= bit(raw, 6);
                    write &= !bit(raw, 7);
                    exec &= if user {
                        !uxn_table && !bit(raw, 54)
                    } else {
                        !pxn_table && !bit(raw, 53)
                    };
                } else {
                    // S2AP bit 6 read, bit 7 write; XN[1:0] bits 54:53.
                    read &= bit(raw, 6);
                    write &= bit(raw, 7);
                    exec &= bits(raw, 54, 53) == 0;
                }
                leaf_addr = block_addr;
            }
        }
        return Ok(Walk {
            phys: PhysAddr::new(leaf_addr + (iova & (size - 1))),
            page_size: size,
            level,
            perms: MapPerms::new(read, write, exec),
            user,
            leaf: raw,
        });
    }
}

/// [`walk`], then checks that `access` is permitted.
pub fn walk_access<M: DmaMemory + ?Sized>(
    mem: &M,
    params: &WalkParams,
    root: PhysAddr,
    iova: u64,
    access: Access,
) -> Result<Walk, WalkFault> {
    let w = walk(mem, params, root, iova)?;
    let allowed = (!access.user || w.user)
        && if access.exec {
            w.perms.exec
        } else if access.write {
            w.perms.write
        } else {
            w.perms.read
        };
    if allowed {
        Ok(w)
    } else {
        Err(WalkFault::Permission)
    }
}

/// Every table page reachable from `root` (root included), found by
/// following table entries only. Leaf-level tables are listed but not read.
pub fn reachable_tables<M: DmaMemory + ?Sized>(
    mem: &M,
    params: &WalkParams,
    root: PhysAddr,
) -> Vec<PhysAddr> {
    let mut found = Vec::new();
    let Some(top) = params.levels.checked_sub(1) else {
        return found;
    };
    let mut stack = Vec::new();
    stack.push((root.as_u64(), top));
    while let Some((table, level)) = stack.pop() {
        found.push(PhysAddr::new(table));
        if level == 0 {
            continue;
        }
        for index in 0..512u64 {
            let raw = mem.read_u64(PhysAddr::new(table + index * 8));
            let next = match params.kind {
                WalkKind::VtdSecondLevel => raw & 0b11 != 0 && !bit(raw, 7),
                WalkKind::VtdFirstLevel | WalkKind::AmdNpt => bit(raw, 0) && !bit(raw, 7),
                WalkKind::IntelEpt => raw & 0b111 != 0 && !bit(raw, 7),
                WalkKind::ArmStage1 | WalkKind::ArmStage2 => raw & 0b11 == 0b11,
            };
            if next {
                let max_out = match params.kind {
                    WalkKind::ArmStage1 | WalkKind::ArmStage2 => 48,
                    _ => 52,
                };
                stack.push((bits(raw, max_out - 1, 12) << 12, level - 1));
            }
        }
    }
    found
}
