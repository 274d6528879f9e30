//! What the distributor says about LPIs (Arm IHI 0069, 12.9.4 GICD_CTLR,
//! 12.9.38 GICD_TYPER).

use core::fmt;

use sluice_hal::{Mmio, ReadOnly, ReadWrite, Reg32};

use crate::lpi::Lpi;

/// GICD_CTLR (12.9.4).
pub const CTLR: Reg32<ReadWrite> = Reg32::new(0x0000);
/// GICD_TYPER (12.9.38).
pub const TYPER: Reg32<ReadOnly> = Reg32::new(0x0004);

/// GICD_CTLR bits.
pub mod ctlr {
    /// ARE_NS (ARE with GICD_CTLR.DS = 1), bit 4 in the Non-secure view:
    /// affinity routing, without which there are no LPIs (5.1).
    pub const ARE: u32 = 1 << 4;
}

/// GICD_TYPER fields.
pub mod typer {
    /// num_LPIs, bits 15:11: 0, or LPIs implemented = 2^(num_LPIs + 1).
    pub const NUM_LPIS_SHIFT: u32 = 11;
    pub const NUM_LPIS_MASK: u32 = 0x1f;
    /// MBIS: message-based SPIs.
    pub const MBIS: u32 = 1 << 16;
    /// LPIS: LPIs are supported.
    pub const LPIS: u32 = 1 << 17;
    /// IDbits, bits 23:19: INTID bits, minus one.
    pub const ID_BITS_SHIFT: u32 = 19;
    pub const ID_BITS_MASK: u32 = 0x1f;
}

/// The distributor's LPI support, decoded from GICD_TYPER and GICD_CTLR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DistributorInfo {
    pub typer: u32,
    pub ctlr: u32,
    /// GICD_TYPER.LPIS.
    pub lpis: bool,
    /// GICD_TYPER.IDbits + 1: INTID bits.
    pub id_bits: u32,
    /// GICD_TYPER.num_LPIs: when non-zero, how many LPIs exist (fewer than
    /// the INTID bits allow).
    pub implemented_lpis: Option<u64>,
    /// GICD_CTLR.ARE(_NS).
    pub affinity_routing: bool,
}

/// Why LPIs cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DistributorError {
    /// GICD_TYPER.LPIS = 0.
    NoLpis,
    /// GICD_CTLR.ARE_NS = 0: LPIs need affinity routing (5.1).
    NoAffinityRouting,
    /// Fewer INTID bits than LPIs need (GICD_TYPER.IDbits + 1 < 14).
    TooFewIdBits(u32),
}

impl fmt::Display for DistributorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoLpis => f.write_str("the GIC does not implement LPIs (GICD_TYPER.LPIS = 0)"),
            Self::NoAffinityRouting => {
                f.write_str("affinity routing is off (GICD_CTLR.ARE_NS = 0); LPIs need it")
            }
            Self::TooFewIdBits(bits) => {
                write!(f, "the GIC has {bits} INTID bits; LPIs need at least 14")
            }
        }
    }
}

impl DistributorInfo {
    pub const fn decode(typer: u32, ctlr: u32) -> Self {
        let num_lpis = (typer >> typer::NUM_LPIS_SHIFT) & typer::NUM_LPIS_MASK;
        Self {
            typer,
            ctlr,
            lpis: typer & typer::LPIS != 0,
            id_bits: ((typer >> typer::ID_BITS_SHIFT) & typer::ID_BITS_MASK) + 1,
            implemented_lpis: if num_lpis == 0 {
                None
            } else {
                Some(1u64 << (num_lpis + 1))
            },
            affinity_routing: ctlr & ctlr::ARE != 0,
        }
    }

    pub fn read(mmio: &dyn Mmio) -> Self {
        Self::decode(TYPER.read(mmio), CTLR.read(mmio))
    }

    /// The INTID bits to program into GICR_PROPBASER: `wanted`, capped by
    /// what the distributor supports and, when GICD_TYPER.num_LPIs says
    /// fewer LPIs exist, by that; or why LPIs cannot be used.
    pub fn lpi_id_bits(&self, wanted: u32) -> Result<u32, DistributorError> {
        if !self.lpis {
            return Err(DistributorError::NoLpis);
        }
        if !self.affinity_routing {
            return Err(DistributorError::NoAffinityRouting);
        }
        if self.id_bits < Lpi::MIN_ID_BITS {
            return Err(DistributorError::TooFewIdBits(self.id_bits));
        }
        let mut bits = wanted.clamp(Lpi::MIN_ID_BITS, self.id_bits);
        if let Some(count) = self.implemented_lpis {
            // INTIDs 8192..8192 + count exist.
            while bits > Lpi::MIN_ID_BITS
                && (1u64 << (bits - 1)) >= u64::from(Lpi::FIRST_INTID) + count
            {
                bits -= 1;
            }
        }
        Ok(bits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typer_fields_and_lpi_bits() {
        // LPIS bit 17, IDbits 23:19 = 15 (16 bits): QEMU's GICv3 with an
        // ITS.
        let d = DistributorInfo::decode((1 << 17) | (15 << 19), ctlr::ARE);
        assert!(d.lpis && d.affinity_routing);
        assert_eq!(d.id_bits, 16);
        assert_eq!(d.lpi_id_bits(16), Ok(16));
        assert_eq!(d.lpi_id_bits(20), Ok(16), "capped by IDbits");
        assert_eq!(d.lpi_id_bits(8), Ok(14), "at least 14");
        let no = DistributorInfo::decode(15 << 19, ctlr::ARE);
        assert_eq!(no.lpi_id_bits(16), Err(DistributorError::NoLpis));
        let legacy = DistributorInfo::decode((1 << 17) | (15 << 19), 0);
        assert_eq!(
            legacy.lpi_id_bits(16),
            Err(DistributorError::NoAffinityRouting)
        );
        let narrow = DistributorInfo::decode((1 << 17) | (9 << 19), ctlr::ARE);
        assert_eq!(
            narrow.lpi_id_bits(16),
            Err(DistributorError::TooFewIdBits(10))
        );
    }

    #[test]
    fn num_lpis_narrows_the_id_bits() {
        // 24 INTID bits but num_LPIs = 12: 2^13 LPIs, INTIDs 8192..16383,
        // which 14 bits cover.
        let d = DistributorInfo::decode((1 << 17) | (23 << 19) | (12 << 11), ctlr::ARE);
        assert_eq!(d.implemented_lpis, Some(8192));
        assert_eq!(d.lpi_id_bits(24), Ok(14));
        // num_LPIs = 14: 32768 LPIs up to INTID 40959 need 16 bits.
        let d = DistributorInfo::decode((1 << 17) | (23 << 19) | (14 << 11), ctlr::ARE);
        assert_eq!(d.lpi_id_bits(24), Ok(16));
    }
}
