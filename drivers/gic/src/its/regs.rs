//! The ITS register map (Arm IHI 0069, 12.19 "The GIC ITS control
//! registers" and 12.20 "The GIC ITS translation register"), as typed
//! registers plus their bit fields.
//!
//! An ITS occupies two 64 KiB frames: the control frame (ITS_base) with
//! identification, control, the command-queue registers and the table
//! descriptors, and the translation frame at ITS_base + 0x10000 holding
//! GITS_TRANSLATER, the doorbell devices write their MSIs to (IHI 0069,
//! 12.1 "The GIC Memory-mapped register map", table "ITS register map").

use sluice_hal::{ReadOnly, ReadWrite, Reg32, Reg64, WriteOnly};

/// Offset of the translation frame from ITS_base.
pub const TRANSLATION_FRAME: usize = 0x1_0000;
/// Bytes of register space one ITS needs (both frames).
pub const REGISTER_SPAN: usize = 2 * TRANSLATION_FRAME;

/// GITS_CTLR, ITS control (12.19.6).
pub const CTLR: Reg32<ReadWrite> = Reg32::new(0x0000);
/// GITS_IIDR, implementer identification (12.19.9).
pub const IIDR: Reg32<ReadOnly> = Reg32::new(0x0004);
/// GITS_TYPER, ITS type: what the ITS implements (12.19.13). 64 bits.
pub const TYPER: Reg64<ReadOnly> = Reg64::new(0x0008);
/// GITS_CBASER, command queue base (12.19.2).
pub const CBASER: Reg64<ReadWrite> = Reg64::new(0x0080);
/// GITS_CWRITER, where software writes the next command (12.19.5).
pub const CWRITER: Reg64<ReadWrite> = Reg64::new(0x0088);
/// GITS_CREADR, where the ITS reads the next command (12.19.4).
pub const CREADR: Reg64<ReadOnly> = Reg64::new(0x0090);
/// GITS_BASER0, the first of eight translation table descriptors
/// (12.19.1); use [`baser()`] for the others.
pub const BASER0: Reg64<ReadWrite> = Reg64::new(0x0100);
/// Number of `GITS_BASER<n>` registers an ITS may implement (12.19.1:
/// "a maximum of 8"; unimplemented ones are RES0).
pub const BASER_COUNT: usize = 8;
/// GITS_PIDR2, peripheral ID 2: ArchRev in bits 7:4 (12.19.10, 12.1.2).
pub const PIDR2: Reg32<ReadOnly> = Reg32::new(0xffe8);
/// GITS_TRANSLATER, the doorbell (12.20.1): a 32-bit write of an EventID,
/// the DeviceID coming from the writer's sideband.
pub const TRANSLATER: Reg32<WriteOnly> = Reg32::new(TRANSLATION_FRAME + 0x40);

/// Offset of GITS_TRANSLATER from ITS_base: what an MSI address points
/// to.
pub const DOORBELL_OFFSET: u64 = TRANSLATER.offset() as u64;

/// The physical address devices write their MSIs to for the ITS at
/// `its_base` (the MSI address programmed into MSI/MSI-X capabilities,
/// and the doorbell an SMMU must map or bypass for those writes).
/// QEMU `virt`: ITS at 0x0808_0000, doorbell 0x0809_0040.
pub const fn doorbell_address(its_base: u64) -> u64 {
    its_base + DOORBELL_OFFSET
}

/// GITS_BASER<`n`> (`n` < [`BASER_COUNT`]).
pub const fn baser(n: usize) -> Reg64<ReadWrite> {
    BASER0.at(n, 8)
}

/// GITS_CTLR bits (12.19.6).
pub mod ctlr {
    /// Enabled: the ITS translates MSIs and processes commands.
    pub const ENABLED: u32 = 1 << 0;
    /// Quiescent (RO): with Enabled = 0, the ITS has finished every
    /// transaction, written back every cache and stopped reading tables.
    /// Table descriptors may only be changed while it is 1.
    pub const QUIESCENT: u32 = 1 << 31;
}

/// GITS_TYPER fields (12.19.13).
pub mod typer {
    /// Physical: physical LPIs are supported.
    pub const PHYSICAL: u64 = 1 << 0;
    /// Virtual: GICv4 virtual LPIs are supported.
    pub const VIRTUAL: u64 = 1 << 1;
    /// CCT: cumulative collection tables.
    pub const CCT: u64 = 1 << 2;
    /// ITT_entry_size, bits 7:4: bytes per ITT entry, minus one.
    pub const ITT_ENTRY_SIZE_SHIFT: u32 = 4;
    pub const ITT_ENTRY_SIZE_MASK: u64 = 0xf;
    /// ID_bits, bits 12:8: EventID bits supported, minus one.
    pub const ID_BITS_SHIFT: u32 = 8;
    pub const ID_BITS_MASK: u64 = 0x1f;
    /// Devbits, bits 17:13: DeviceID bits supported, minus one.
    pub const DEVBITS_SHIFT: u32 = 13;
    pub const DEVBITS_MASK: u64 = 0x1f;
    /// SEIS: command errors are reported as System Errors.
    pub const SEIS: u64 = 1 << 18;
    /// PTA: RDbase in commands is a physical address (>> 16), not a
    /// processor number.
    pub const PTA: u64 = 1 << 19;
    /// HCC, bits 31:24: collections held in the ITS itself.
    pub const HCC_SHIFT: u32 = 24;
    pub const HCC_MASK: u64 = 0xff;
    /// CIDbits, bits 35:32: collection ID bits, minus one (valid with CIL).
    pub const CIDBITS_SHIFT: u32 = 32;
    pub const CIDBITS_MASK: u64 = 0xf;
    /// CIL: CIDbits is meaningful; otherwise ICIDs are 16 bits.
    pub const CIL: u64 = 1 << 36;
    /// VMOVP: VMOVP needs no cross-ITS synchronisation (GICv4).
    pub const VMOVP: u64 = 1 << 37;
    /// VSGI (GICv4.1).
    pub const VSGI: u64 = 1 << 39;
    /// UMSI / INV (GICv3.x options reported for the log).
    pub const UMSI: u64 = 1 << 44;
    pub const INV: u64 = 1 << 46;
}

/// Inner cacheability encodings shared by GITS_CBASER, `GITS_BASER<n>` and
/// the redistributor's PROPBASER/PENDBASER (12.19.1-2, 12.11.x).
pub mod cache {
    /// Device-nGnRnE.
    pub const DEVICE_NGNRNE: u64 = 0b000;
    /// Normal Inner Non-cacheable.
    pub const NON_CACHEABLE: u64 = 0b001;
    /// Normal Inner Cacheable Read-allocate, Write-allocate, Write-back.
    pub const WRITE_BACK: u64 = 0b111;
}

/// Shareability encodings of the same registers.
pub mod share {
    pub const NON_SHAREABLE: u64 = 0b00;
    pub const INNER_SHAREABLE: u64 = 0b01;
    pub const OUTER_SHAREABLE: u64 = 0b10;
}

/// GITS_CBASER fields (12.19.2).
pub mod cbaser {
    pub const VALID: u64 = 1 << 63;
    /// InnerCache, bits 61:59.
    pub const INNER_CACHE_SHIFT: u32 = 59;
    /// OuterCache, bits 55:53 (0: same as inner).
    pub const OUTER_CACHE_SHIFT: u32 = 53;
    /// Physical_Address, bits 51:12: the queue is 4 KiB aligned.
    pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
    /// Shareability, bits 11:10.
    pub const SHAREABILITY_SHIFT: u32 = 10;
    pub const SHAREABILITY_MASK: u64 = 0b11 << SHAREABILITY_SHIFT;
    /// Size, bits 7:0: 4 KiB pages, minus one.
    pub const SIZE_MASK: u64 = 0xff;
}

/// GITS_CWRITER / GITS_CREADR fields (12.19.4-5).
pub mod queue {
    /// Offset, bits 19:5: byte offset of a 32-byte command slot.
    pub const OFFSET_MASK: u64 = 0x000f_ffe0;
    /// GITS_CWRITER.Retry: restart a queue stalled on a command error.
    pub const RETRY: u64 = 1 << 0;
    /// GITS_CREADR.Stalled: the queue stopped on a command error; the
    /// offending command is the one at CREADR.Offset.
    pub const STALLED: u64 = 1 << 0;
    /// Bytes per command (5.3 "ITS commands").
    pub const COMMAND_BYTES: u64 = 32;
}

/// `GITS_BASER<n>` fields (12.19.1).
pub mod baser {
    pub const VALID: u64 = 1 << 63;
    /// Indirect: two-level table (RAZ/WI when only flat tables exist for
    /// this type).
    pub const INDIRECT: u64 = 1 << 62;
    /// InnerCache, bits 61:59.
    pub const INNER_CACHE_SHIFT: u32 = 59;
    /// Type, bits 58:56 (RO).
    pub const TYPE_SHIFT: u32 = 56;
    pub const TYPE_MASK: u64 = 0b111;
    /// OuterCache, bits 55:53.
    pub const OUTER_CACHE_SHIFT: u32 = 53;
    /// Entry_Size, bits 52:48 (RO): bytes per entry, minus one.
    pub const ENTRY_SIZE_SHIFT: u32 = 48;
    pub const ENTRY_SIZE_MASK: u64 = 0x1f;
    /// Physical_Address, bits 47:12 for 4 KiB and 16 KiB pages; with
    /// 64 KiB pages bits 47:16 hold `PA[47:16]` and bits 15:12 hold
    /// `PA[51:48]`.
    pub const ADDR_MASK: u64 = 0x0000_ffff_ffff_f000;
    /// Shareability, bits 11:10.
    pub const SHAREABILITY_SHIFT: u32 = 10;
    pub const SHAREABILITY_MASK: u64 = 0b11 << SHAREABILITY_SHIFT;
    /// Page_Size, bits 9:8.
    pub const PAGE_SIZE_SHIFT: u32 = 8;
    pub const PAGE_SIZE_MASK: u64 = 0b11 << PAGE_SIZE_SHIFT;
    /// Size, bits 7:0: pages of Page_Size, minus one.
    pub const SIZE_MASK: u64 = 0xff;
    /// Most pages one table (or level-1 table) may have.
    pub const MAX_PAGES: u64 = 256;
    /// A level-1 descriptor of an indirect table (5.2.1 "The ITS tables"):
    /// Valid in bit 63, the level-2 page's physical address below.
    pub const L1_VALID: u64 = 1 << 63;
    pub const L1_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
    pub const L1_ENTRY_BYTES: u64 = 8;

    /// The Physical_Address field for `pa` at `page_size` bytes per page.
    pub const fn encode_address(pa: u64, page_size: u64) -> u64 {
        if page_size == 0x1_0000 {
            (pa & 0x0000_ffff_ffff_0000) | (((pa >> 48) & 0xf) << 12)
        } else {
            pa & ADDR_MASK
        }
    }

    /// The physical address a Physical_Address field holds.
    pub const fn decode_address(raw: u64, page_size: u64) -> u64 {
        if page_size == 0x1_0000 {
            (raw & 0x0000_ffff_ffff_0000) | (((raw >> 12) & 0xf) << 48)
        } else {
            raw & ADDR_MASK
        }
    }
}

/// What a `GITS_BASER<n>` describes (its Type field, 12.19.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableType {
    /// 0b000: not implemented.
    Unimplemented,
    /// 0b001: the device table, indexed by DeviceID.
    Devices,
    /// 0b010: vPEs (GICv4).
    Vpes,
    /// 0b100: interrupt collections, indexed by ICID.
    Collections,
    /// Reserved encodings.
    Reserved(u8),
}

impl TableType {
    pub const fn from_field(field: u64) -> Self {
        match field {
            0b000 => Self::Unimplemented,
            0b001 => Self::Devices,
            0b010 => Self::Vpes,
            0b100 => Self::Collections,
            other => Self::Reserved(other as u8),
        }
    }
    pub const fn field(self) -> u64 {
        match self {
            Self::Unimplemented => 0b000,
            Self::Devices => 0b001,
            Self::Vpes => 0b010,
            Self::Collections => 0b100,
            Self::Reserved(v) => v as u64,
        }
    }
    pub const fn name(self) -> &'static str {
        match self {
            Self::Unimplemented => "unimplemented",
            Self::Devices => "device table",
            Self::Vpes => "vPE table",
            Self::Collections => "collection table",
            Self::Reserved(_) => "reserved table type",
        }
    }
}

/// `GITS_BASER<n>`.Page_Size (12.19.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ItsPageSize {
    Size4K,
    Size16K,
    Size64K,
}

impl ItsPageSize {
    /// Every page size, smallest first.
    pub const ALL: [Self; 3] = [Self::Size4K, Self::Size16K, Self::Size64K];

    pub const fn bytes(self) -> u64 {
        match self {
            Self::Size4K => 0x1000,
            Self::Size16K => 0x4000,
            Self::Size64K => 0x1_0000,
        }
    }
    pub const fn field(self) -> u64 {
        match self {
            Self::Size4K => 0b00,
            Self::Size16K => 0b01,
            Self::Size64K => 0b10,
        }
    }
    /// 0b11 is reserved and treated as 64 KiB.
    pub const fn from_field(field: u64) -> Self {
        match field & 0b11 {
            0b00 => Self::Size4K,
            0b01 => Self::Size16K,
            _ => Self::Size64K,
        }
    }
    /// Bit of this size in a [`PageSizes`](super::caps::PageSizes) mask.
    pub const fn mask_bit(self) -> u8 {
        1 << self.field()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_match_the_register_map() {
        assert_eq!(CTLR.offset(), 0x0);
        assert_eq!(TYPER.offset(), 0x8);
        assert_eq!(CBASER.offset(), 0x80);
        assert_eq!(CWRITER.offset(), 0x88);
        assert_eq!(CREADR.offset(), 0x90);
        assert_eq!(baser(0).offset(), 0x100);
        assert_eq!(baser(7).offset(), 0x138);
        assert_eq!(TRANSLATER.offset(), 0x1_0040);
        assert_eq!(DOORBELL_OFFSET, 0x1_0040);
    }

    #[test]
    fn qemu_virt_doorbell() {
        // QEMU 7.2 `virt`, gic-version=3: ITS at 0x08080000, translation
        // frame at 0x08090000.
        assert_eq!(doorbell_address(0x0808_0000), 0x0809_0040);
    }

    #[test]
    fn baser_addresses_with_64k_pages_carry_bits_51_48_low() {
        let pa = 0x000a_1234_5678_0000;
        let field = baser::encode_address(pa, 0x1_0000);
        assert_eq!(field & 0xf000, 0xa000, "PA[51:48] in bits 15:12");
        assert_eq!(field & !0xffff & !(0xfu64 << 48), 0x1234_5678_0000);
        assert_eq!(baser::decode_address(field, 0x1_0000), pa);
        let pa4k = 0x0000_1234_5678_9000;
        assert_eq!(baser::encode_address(pa4k, 0x1000), pa4k);
        assert_eq!(baser::decode_address(pa4k, 0x1000), pa4k);
    }

    #[test]
    fn table_types_and_page_sizes_roundtrip() {
        for t in [
            TableType::Devices,
            TableType::Vpes,
            TableType::Collections,
            TableType::Unimplemented,
        ] {
            assert_eq!(TableType::from_field(t.field()), t);
        }
        assert_eq!(TableType::from_field(0b011), TableType::Reserved(3));
        for p in ItsPageSize::ALL {
            assert_eq!(ItsPageSize::from_field(p.field()), p);
        }
        assert_eq!(ItsPageSize::Size64K.bytes(), 65536);
    }
}
