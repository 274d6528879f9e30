//! The EL2 system registers that configure a guest at EL1: `HCR_EL2`,
//! `VTCR_EL2`, `VTTBR_EL2`, and the ID fields they depend on. Bit
//! positions from the Arm ARM (DDI 0487), chapter D19 "AArch64 System
//! Register Descriptions", one register per section.

/// `HCR_EL2` bits.
pub mod hcr {
    /// Stage-2 translation for EL1&0.
    pub const VM: u64 = 1 << 0;
    /// Set/way invalidation from EL1 also cleans (HCR_EL2.SWIO).
    pub const SWIO: u64 = 1 << 1;
    /// Physical FIQs, IRQs and SErrors go to EL2.
    pub const FMO: u64 = 1 << 3;
    pub const IMO: u64 = 1 << 4;
    pub const AMO: u64 = 1 << 5;
    /// Broadcast TLB and instruction-cache maintenance from EL1 inner
    /// shareable (the vCPU may later run on another CPU).
    pub const FB: u64 = 1 << 9;
    /// Barrier shareability upgrade to inner shareable (`BSU` = 0b01).
    pub const BSU_INNER: u64 = 0b01 << 10;
    /// Default cacheability: with the guest's stage 1 off, its accesses are
    /// Normal write-back instead of Device-nGnRnE, so it sees what Sluice
    /// wrote through its cacheable mapping (and unaligned RAM accesses
    /// work).
    pub const DC: u64 = 1 << 12;
    /// Trap WFI and WFE.
    pub const TWI: u64 = 1 << 13;
    pub const TWE: u64 = 1 << 14;
    /// Trap SMC.
    pub const TSC: u64 = 1 << 19;
    /// Trap implementation-defined system registers.
    pub const TIDCP: u64 = 1 << 20;
    /// Trap ACTLR_EL1.
    pub const TACR: u64 = 1 << 21;
    /// Trap data-cache maintenance by set/way (it reaches the physical
    /// caches Sluice shares).
    pub const TSW: u64 = 1 << 22;
    /// Trap the general exception routing override (must be 0 for a guest).
    pub const TGE: u64 = 1 << 27;
    /// EL1 is AArch64.
    pub const RW: u64 = 1 << 31;
    /// Virtualization host extensions (must be 0 for this world switch).
    pub const E2H: u64 = 1 << 34;

    /// What Sluice runs its guests with: stage 2, physical interrupts to
    /// EL2, WFI/WFE/SMC/set-way/IMPDEF trapped, AArch64 EL1, default
    /// cacheability while the guest's MMU is off.
    pub const GUEST: u64 = VM
        | SWIO
        | FMO
        | IMO
        | AMO
        | FB
        | BSU_INNER
        | DC
        | TWI
        | TWE
        | TSC
        | TIDCP
        | TACR
        | TSW
        | RW;
}

/// `ID_AA64MMFR0_EL1.PARange` (bits 3:0) and `VTCR_EL2.PS` encodings:
/// physical address size in bits.
pub const fn pa_range_bits(encoding: u64) -> Option<u32> {
    match encoding {
        0b0000 => Some(32),
        0b0001 => Some(36),
        0b0010 => Some(40),
        0b0011 => Some(42),
        0b0100 => Some(44),
        0b0101 => Some(48),
        0b0110 => Some(52),
        _ => None,
    }
}

/// The `PARange`/`PS` encoding of `bits` (one of the sizes above).
pub const fn pa_range_encoding(bits: u32) -> Option<u64> {
    match bits {
        32 => Some(0b000),
        36 => Some(0b001),
        40 => Some(0b010),
        42 => Some(0b011),
        44 => Some(0b100),
        48 => Some(0b101),
        52 => Some(0b110),
        _ => None,
    }
}

/// `VTCR_EL2` fields.
pub mod vtcr {
    pub const T0SZ_SHIFT: u32 = 0;
    pub const SL0_SHIFT: u32 = 6;
    /// Table walks Normal, inner write-back read/write-allocate.
    pub const IRGN0_WBWA: u64 = 0b01 << 8;
    /// Table walks outer write-back read/write-allocate.
    pub const ORGN0_WBWA: u64 = 0b01 << 10;
    /// Table walks inner shareable.
    pub const SH0_INNER: u64 = 0b11 << 12;
    /// `TG0` = 0b00: 4 KiB granule.
    pub const TG0_4K: u64 = 0b00 << 14;
    pub const PS_SHIFT: u32 = 16;
    /// 16-bit VMIDs.
    pub const VS: u64 = 1 << 19;
    /// Bit 31 is RES1.
    pub const RES1: u64 = 1 << 31;
}

/// `VTCR_EL2` for a stage-2 table with `t0sz` and start level `sl0`
/// (4 KiB granule, cacheable inner-shareable walks), output size `ps`
/// (the `PS` encoding) and `vmid16` for 16-bit VMIDs.
pub const fn vtcr_value(t0sz: u8, sl0: u8, ps: u64, vmid16: bool) -> u64 {
    let mut v = vtcr::RES1
        | ((t0sz as u64 & 0x3f) << vtcr::T0SZ_SHIFT)
        | ((sl0 as u64 & 0b11) << vtcr::SL0_SHIFT)
        | vtcr::IRGN0_WBWA
        | vtcr::ORGN0_WBWA
        | vtcr::SH0_INNER
        | vtcr::TG0_4K
        | ((ps & 0b111) << vtcr::PS_SHIFT);
    if vmid16 {
        v |= vtcr::VS;
    }
    v
}

/// `VTTBR_EL2`: the stage-2 root (`BADDR`, bits 47:1, with CnP bit 0
/// clear) and the VMID (bits 63:48, 55:48 with 8-bit VMIDs).
pub const fn vttbr_value(root: u64, vmid: u16) -> u64 {
    (root & 0x0000_ffff_ffff_fffe) | ((vmid as u64) << 48)
}

/// ID register fields Sluice decodes besides `PARange` and `VMIDBits`
/// (D19 "ID_AA64PFR1_EL1", "ID_AA64MMFR1_EL1", "ID_AA64MMFR2_EL1"): the
/// shift of each 4-bit field.
pub mod id {
    pub const PFR1_BT_SHIFT: u32 = 0;
    pub const PFR1_SSBS_SHIFT: u32 = 4;
    pub const PFR1_MTE_SHIFT: u32 = 8;
    pub const PFR1_NMI_SHIFT: u32 = 36;
    pub const PFR1_GCS_SHIFT: u32 = 44;
    pub const MMFR1_PAN_SHIFT: u32 = 20;
    pub const MMFR2_UAO_SHIFT: u32 = 4;
}

/// `SCTLR_EL1` bits that decide PSTATE on exception entry to EL1 (D19
/// "SCTLR_EL1").
pub mod sctlr {
    /// Set Privileged Access Never: 0 sets PSTATE.PAN on exception entry.
    pub const SPAN: u64 = 1 << 23;
    /// Default PSTATE.SSBS on exception entry.
    pub const DSSBS: u64 = 1 << 44;
    /// 0 sets PSTATE.ALLINT on exception entry (FEAT_NMI).
    pub const SPINTMASK: u64 = 1 << 62;
}

/// `SCTLR_EL1` with the bits that are RES1 in Armv8.0 (29, 28, 23, 22,
/// 20, 11) and everything else off: MMU, caches, alignment checks.
pub const SCTLR_EL1_MMU_OFF: u64 =
    (1 << 29) | (1 << 28) | (1 << 23) | (1 << 22) | (1 << 20) | (1 << 11);

/// `CPACR_EL1.FPEN` = 0b11: FP/SIMD instructions do not trap at EL1/EL0.
pub const CPACR_EL1_FPEN: u64 = 0b11 << 20;

/// `VMPIDR_EL2` (what the guest reads as `MPIDR_EL1`) for vCPU `index`:
/// bit 31 RES1, Aff0 = the index (a uniprocessor-style flat topology).
pub const fn vmpidr_value(index: u8) -> u64 {
    (1 << 31) | index as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vtcr_for_a_39_bit_three_level_table() {
        // T0SZ 25, SL0 1 (start at level 1), 48-bit PS, 8-bit VMIDs.
        let v = vtcr_value(25, 1, 0b101, false);
        assert_eq!(v & 0x3f, 25);
        assert_eq!((v >> 6) & 3, 1);
        assert_eq!((v >> 8) & 3, 1, "IRGN0 WBWA");
        assert_eq!((v >> 10) & 3, 1, "ORGN0 WBWA");
        assert_eq!((v >> 12) & 3, 3, "SH0 inner");
        assert_eq!((v >> 14) & 3, 0, "4 KiB granule");
        assert_eq!((v >> 16) & 7, 0b101);
        assert_eq!(v & vtcr::VS, 0);
        assert_ne!(v & (1 << 31), 0, "RES1");
        assert_eq!(v, 0x8005_3559);
        assert_ne!(vtcr_value(25, 1, 0b101, true) & (1 << 19), 0);
    }

    #[test]
    fn vttbr_and_pa_ranges() {
        assert_eq!(vttbr_value(0x4123_4000, 7), 0x0007_0000_4123_4000);
        assert_eq!(vttbr_value(0x4123_4001, 0x1ff), 0x01ff_0000_4123_4000);
        for bits in [32, 36, 40, 42, 44, 48, 52] {
            assert_eq!(pa_range_bits(pa_range_encoding(bits).unwrap()), Some(bits));
        }
        assert_eq!(pa_range_bits(0b0111), None);
        assert_eq!(pa_range_encoding(39), None);
    }

    #[test]
    fn guest_hcr_and_reset_values() {
        assert_eq!(hcr::GUEST & (hcr::TGE | hcr::E2H), 0);
        assert_eq!(hcr::GUEST & 0xffff_ffff, 0x8078_763b);
        // The canonical Armv8.0 SCTLR_EL1 RES1 pattern.
        assert_eq!(SCTLR_EL1_MMU_OFF, 0x30d0_0800);
        assert_eq!(vmpidr_value(0), 0x8000_0000);
    }
}
