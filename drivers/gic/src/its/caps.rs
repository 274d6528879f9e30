//! GITS_TYPER, GITS_IIDR and GITS_PIDR2 folded once into [`ItsCaps`], the
//! policy the rest of the driver reads (Arm IHI 0069, 12.19.13), and the
//! `GITS_BASER<n>` probe that finds out what each table descriptor accepts
//! (12.19.1).

use core::fmt;

use sluice_hal::Mmio;

use super::regs::{self, ItsPageSize, TableType, baser, typer};

const fn field(raw: u64, shift: u32, mask: u64) -> u64 {
    (raw >> shift) & mask
}

/// Everything the driver needs to know about one ITS, decoded from its ID
/// registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ItsCaps {
    /// The raw registers, for logs.
    pub typer: u64,
    pub iidr: u32,
    /// GITS_PIDR2.ArchRev: 3 for GICv3, 4 for GICv4.
    pub arch_rev: u8,
    /// Physical: physical LPIs (without it the ITS is useless to Sluice).
    pub physical: bool,
    /// Virtual: GICv4 direct injection of virtual LPIs.
    pub virtual_lpis: bool,
    /// CCT: cumulative collection tables.
    pub cumulative_collections: bool,
    /// ITT_entry_size + 1: bytes per ITT entry.
    pub itt_entry_bytes: u32,
    /// ID_bits + 1: EventID bits a device may have.
    pub event_bits: u32,
    /// Devbits + 1: DeviceID bits the ITS translates.
    pub device_bits: u32,
    /// SEIS: command errors raise System Errors.
    pub seis: bool,
    /// PTA: commands name redistributors by physical address (>> 16)
    /// rather than by GICR_TYPER.Processor_Number.
    pub pta: bool,
    /// HCC: collections held in the ITS (ICIDs below need no table).
    pub hcc: u32,
    /// ICID bits: CIDbits + 1 with CIL, 16 otherwise.
    pub collection_bits: u32,
    pub vmovp: bool,
}

impl ItsCaps {
    /// Decodes raw GITS_TYPER, GITS_IIDR and GITS_PIDR2 values.
    pub const fn decode(typer_raw: u64, iidr: u32, pidr2: u32) -> Self {
        let cil = typer_raw & typer::CIL != 0;
        Self {
            typer: typer_raw,
            iidr,
            arch_rev: ((pidr2 >> 4) & 0xf) as u8,
            physical: typer_raw & typer::PHYSICAL != 0,
            virtual_lpis: typer_raw & typer::VIRTUAL != 0,
            cumulative_collections: typer_raw & typer::CCT != 0,
            itt_entry_bytes: field(
                typer_raw,
                typer::ITT_ENTRY_SIZE_SHIFT,
                typer::ITT_ENTRY_SIZE_MASK,
            ) as u32
                + 1,
            event_bits: field(typer_raw, typer::ID_BITS_SHIFT, typer::ID_BITS_MASK) as u32 + 1,
            device_bits: field(typer_raw, typer::DEVBITS_SHIFT, typer::DEVBITS_MASK) as u32 + 1,
            seis: typer_raw & typer::SEIS != 0,
            pta: typer_raw & typer::PTA != 0,
            hcc: field(typer_raw, typer::HCC_SHIFT, typer::HCC_MASK) as u32,
            collection_bits: if cil {
                field(typer_raw, typer::CIDBITS_SHIFT, typer::CIDBITS_MASK) as u32 + 1
            } else {
                16
            },
            vmovp: typer_raw & typer::VMOVP != 0,
        }
    }

    /// Reads the identification registers (no side effects).
    pub fn read(mmio: &dyn Mmio) -> Self {
        Self::decode(
            regs::TYPER.read(mmio),
            regs::IIDR.read(mmio),
            regs::PIDR2.read(mmio),
        )
    }

    /// DeviceIDs below this exist.
    pub const fn device_limit(&self) -> u64 {
        1u64 << self.device_bits
    }

    /// ICIDs below this exist.
    pub const fn collection_limit(&self) -> u32 {
        if self.collection_bits >= 32 {
            u32::MAX
        } else {
            1 << self.collection_bits
        }
    }

    /// GITS_IIDR.ProductID, Variant, Revision and Implementer (12.19.9).
    pub const fn implementation(&self) -> (u8, u8, u8, u16) {
        (
            (self.iidr >> 24) as u8,
            ((self.iidr >> 16) & 0xf) as u8,
            ((self.iidr >> 12) & 0xf) as u8,
            (self.iidr & 0xfff) as u16,
        )
    }

    /// A one-line summary for the boot log.
    pub fn summary(&self) -> Summary<'_> {
        Summary(self)
    }
}

/// [`ItsCaps::summary`].
pub struct Summary<'a>(&'a ItsCaps);

impl fmt::Display for Summary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.0;
        write!(
            f,
            "GICv{} ITS, DeviceID {} bits, EventID {} bits, ITT entry {} B, ICID {} bits, \
             HCC {}, RDbase by {}",
            c.arch_rev,
            c.device_bits,
            c.event_bits,
            c.itt_entry_bytes,
            c.collection_bits,
            c.hcc,
            if c.pta { "address" } else { "processor number" },
        )?;
        if !c.physical {
            f.write_str(", NO physical LPIs")?;
        }
        if c.virtual_lpis {
            f.write_str(", vLPIs")?;
        }
        if c.seis {
            f.write_str(", SEIS")?;
        }
        Ok(())
    }
}

/// A set of `GITS_BASER<n>` page sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PageSizes(u8);

impl PageSizes {
    pub const NONE: Self = Self(0);

    pub const fn only(size: ItsPageSize) -> Self {
        Self(size.mask_bit())
    }
    pub const fn with(self, size: ItsPageSize) -> Self {
        Self(self.0 | size.mask_bit())
    }
    pub const fn contains(self, size: ItsPageSize) -> bool {
        self.0 & size.mask_bit() != 0
    }
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
    /// The smallest size in the set.
    pub fn smallest(self) -> Option<ItsPageSize> {
        ItsPageSize::ALL.into_iter().find(|&s| self.contains(s))
    }
}

/// What one implemented `GITS_BASER<n>` describes and accepts, found by
/// writing each choice and reading it back (12.19.1: Page_Size "might be
/// RO" when only one size is supported, Indirect is RAZ/WI when only flat
/// tables are).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableCaps {
    /// n of `GITS_BASER<n>`.
    pub index: usize,
    pub kind: TableType,
    /// Entry_Size + 1: bytes per table entry.
    pub entry_bytes: u32,
    pub page_sizes: PageSizes,
    /// Two-level tables are accepted.
    pub indirect: bool,
    /// The register as found, before probing (firmware's table, if Valid).
    pub found: u64,
}

impl TableCaps {
    /// Probes GITS_BASER<`index`>, leaving it invalid (Valid = 0). `None`
    /// for an unimplemented register.
    ///
    /// Writes the register: only call it while GITS_CTLR.Enabled = 0 and
    /// GITS_CTLR.Quiescent = 1 (12.19.1: otherwise UNPREDICTABLE).
    pub fn probe(mmio: &dyn Mmio, index: usize) -> Option<Self> {
        let reg = regs::baser(index);
        let found = reg.read(mmio);
        let kind = TableType::from_field(field(found, baser::TYPE_SHIFT, baser::TYPE_MASK));
        if kind == TableType::Unimplemented {
            return None;
        }
        let entry_bytes = field(found, baser::ENTRY_SIZE_SHIFT, baser::ENTRY_SIZE_MASK) as u32 + 1;
        let mut page_sizes = PageSizes::NONE;
        let mut indirect = false;
        let mut last = ItsPageSize::Size4K;
        for size in ItsPageSize::ALL {
            reg.write(
                mmio,
                baser::INDIRECT | (size.field() << baser::PAGE_SIZE_SHIFT),
            );
            let back = reg.read(mmio);
            last = ItsPageSize::from_field(field(back, baser::PAGE_SIZE_SHIFT, 0b11));
            if last == size {
                page_sizes = page_sizes.with(size);
            }
            indirect |= back & baser::INDIRECT != 0;
        }
        if page_sizes.is_empty() {
            // A fixed Page_Size that reads as none of the values written:
            // what it reads is what it is.
            page_sizes = PageSizes::only(last);
        }
        reg.write(mmio, 0);
        Some(Self {
            index,
            kind,
            entry_bytes,
            page_sizes,
            indirect,
            found,
        })
    }

    /// Whether firmware had left this table valid.
    pub const fn was_valid(&self) -> bool {
        self.found & baser::VALID != 0
    }
}

/// Probes every `GITS_BASER<n>` (same constraints as [`TableCaps::probe`]).
pub fn probe_tables(mmio: &dyn Mmio) -> [Option<TableCaps>; regs::BASER_COUNT] {
    core::array::from_fn(|n| TableCaps::probe(mmio, n))
}

/// Raw GITS_TYPER values, for tests and the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TyperBuilder {
    pub physical: bool,
    pub virtual_lpis: bool,
    pub itt_entry_bytes: u32,
    pub event_bits: u32,
    pub device_bits: u32,
    pub seis: bool,
    pub pta: bool,
    pub hcc: u32,
    /// `Some(bits)`: CIL = 1 with CIDbits = bits - 1; `None`: CIL = 0
    /// (16-bit ICIDs).
    pub collection_bits: Option<u32>,
}

impl TyperBuilder {
    /// What QEMU 7.2's ITS reports: physical LPIs, 12-byte ITT entries,
    /// 16-bit EventIDs, DeviceIDs and ICIDs (CIL = 1), no PTA, no HCC.
    pub const fn qemu_7_2() -> Self {
        Self {
            physical: true,
            virtual_lpis: false,
            itt_entry_bytes: 12,
            event_bits: 16,
            device_bits: 16,
            seis: false,
            pta: false,
            hcc: 0,
            collection_bits: Some(16),
        }
    }

    pub const fn raw(&self) -> u64 {
        let mut v = ((self.itt_entry_bytes as u64 - 1) & typer::ITT_ENTRY_SIZE_MASK)
            << typer::ITT_ENTRY_SIZE_SHIFT
            | ((self.event_bits as u64 - 1) & typer::ID_BITS_MASK) << typer::ID_BITS_SHIFT
            | ((self.device_bits as u64 - 1) & typer::DEVBITS_MASK) << typer::DEVBITS_SHIFT
            | (self.hcc as u64 & typer::HCC_MASK) << typer::HCC_SHIFT;
        if self.physical {
            v |= typer::PHYSICAL;
        }
        if self.virtual_lpis {
            v |= typer::VIRTUAL;
        }
        if self.seis {
            v |= typer::SEIS;
        }
        if self.pta {
            v |= typer::PTA;
        }
        if let Some(bits) = self.collection_bits {
            v |= typer::CIL | ((bits as u64 - 1) & typer::CIDBITS_MASK) << typer::CIDBITS_SHIFT;
        }
        v
    }

    pub const fn caps(&self) -> ItsCaps {
        ItsCaps::decode(self.raw(), 0x0000_043b, 0x3 << 4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typer_fields_decode_at_their_spec_positions() {
        // ITT_entry_size 7:4 = 11 (12 B), ID_bits 12:8 = 15, Devbits
        // 17:13 = 19, PTA bit 19, HCC 31:24 = 4, CIDbits 35:32 = 7 with
        // CIL bit 36, Physical bit 0.
        let raw =
            1 | (11 << 4) | (15 << 8) | (19 << 13) | (1 << 19) | (4 << 24) | (7 << 32) | (1 << 36);
        let c = ItsCaps::decode(raw, 0, 0x4 << 4);
        assert!(c.physical && c.pta && !c.virtual_lpis && !c.seis);
        assert_eq!(c.itt_entry_bytes, 12);
        assert_eq!(c.event_bits, 16);
        assert_eq!(c.device_bits, 20);
        assert_eq!(c.hcc, 4);
        assert_eq!(c.collection_bits, 8);
        assert_eq!(c.collection_limit(), 256);
        assert_eq!(c.device_limit(), 1 << 20);
        assert_eq!(c.arch_rev, 4);
        // Without CIL, ICIDs are 16 bits whatever CIDbits says.
        let c = ItsCaps::decode(raw & !(1 << 36), 0, 0);
        assert_eq!(c.collection_bits, 16);
    }

    #[test]
    fn builder_roundtrips_through_decode() {
        let b = TyperBuilder {
            pta: true,
            hcc: 2,
            collection_bits: None,
            device_bits: 5,
            event_bits: 3,
            itt_entry_bytes: 8,
            ..TyperBuilder::qemu_7_2()
        };
        let c = b.caps();
        assert_eq!(
            (
                c.pta,
                c.hcc,
                c.collection_bits,
                c.device_bits,
                c.event_bits,
                c.itt_entry_bytes
            ),
            (true, 2, 16, 5, 3, 8)
        );
        let q = TyperBuilder::qemu_7_2().caps();
        assert_eq!(
            (
                q.device_bits,
                q.event_bits,
                q.collection_bits,
                q.itt_entry_bytes
            ),
            (16, 16, 16, 12)
        );
        let line = alloc::format!("{}", q.summary());
        assert!(line.contains("DeviceID 16 bits"), "{line}");
        assert!(line.contains("processor number"), "{line}");
    }

    #[test]
    fn page_size_sets() {
        let s = PageSizes::only(ItsPageSize::Size64K).with(ItsPageSize::Size16K);
        assert!(s.contains(ItsPageSize::Size16K) && !s.contains(ItsPageSize::Size4K));
        assert_eq!(s.smallest(), Some(ItsPageSize::Size16K));
        assert_eq!(PageSizes::NONE.smallest(), None);
    }
}
