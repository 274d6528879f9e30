//! VER, CAP and ECAP folded once into [`VtdCapabilities`], the policy the
//! rest of the driver reads (VT-d spec rev 4.x, 11.4.1-11.4.3).

use core::fmt;

use sluice_hal::Mmio;

use super::regs;
use crate::pagetable::PageSize;

const fn bit(raw: u64, n: u32) -> bool {
    raw & (1u64 << n) != 0
}

const fn field(raw: u64, hi: u32, lo: u32) -> u64 {
    (raw >> lo) & ((1u64 << (hi - lo + 1)) - 1)
}

/// Everything the driver needs to know about one remapping unit, decoded
/// from VER, CAP and ECAP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VtdCapabilities {
    pub version_major: u8,
    pub version_minor: u8,
    /// The raw registers, for logs and for whatever is not decoded.
    pub cap: u64,
    pub ecap: u64,

    // ---- CAP (11.4.2) ----
    /// ND: number of domain IDs, `2^(4 + 2 * ND)` (16 ... 65536).
    pub domain_count: u32,
    /// AFL: advanced fault logging.
    pub advanced_fault_logging: bool,
    /// RWBF: software must flush the write buffer after changing tables.
    pub required_write_buffer_flush: bool,
    /// PLMR / PHMR: protected low/high memory regions.
    pub protected_low_memory: bool,
    pub protected_high_memory: bool,
    /// CM: caching mode — not-present and erroneous entries may be cached,
    /// so not-present → present changes need invalidation too (virtual
    /// IOMMUs such as QEMU's with `caching-mode=on`).
    pub caching_mode: bool,
    /// SAGAW: bit 1 3-level (39-bit), bit 2 4-level (48-bit), bit 3 5-level
    /// (57-bit) second-level tables.
    pub sagaw: u8,
    /// MGAW + 1: the widest guest (input) address, in bits.
    pub max_guest_address_width: u32,
    /// ZLR: zero-length reads are supported.
    pub zero_length_read: bool,
    /// FRO * 16: byte offset of the first fault-recording register.
    pub fault_record_offset: usize,
    /// SLLPS: bit 0 2 MiB, bit 1 1 GiB second-level pages.
    pub sllps: u8,
    /// PSI: page-selective IOTLB invalidation.
    pub page_selective_invalidation: bool,
    /// NFR + 1: number of fault-recording registers.
    pub fault_record_count: u32,
    /// MAMV: largest address mask (log2 pages) of a page-selective
    /// invalidation.
    pub max_address_mask: u8,
    /// DWD / DRD: write / read draining on IOTLB invalidation.
    pub drain_writes: bool,
    pub drain_reads: bool,
    /// FL1GP: first-level 1 GiB pages.
    pub first_level_1g: bool,
    /// PI: posted interrupts.
    pub posted_interrupts: bool,
    /// FL5LP: first-level 5-level paging.
    pub first_level_5level: bool,

    // ---- ECAP (11.4.3) ----
    /// C: the unit's walks of root/context/PASID structures and (legacy mode)
    /// page tables snoop CPU caches. When false, every table write must be
    /// flushed before the hardware may read it.
    pub coherent: bool,
    /// QI: queued invalidation.
    pub queued_invalidation: bool,
    /// DT: device-TLB (ATS) invalidation.
    pub device_tlb: bool,
    /// IR: interrupt remapping.
    pub interrupt_remapping: bool,
    /// EIM: extended (x2APIC) interrupt mode.
    pub extended_interrupt_mode: bool,
    /// PT: pass-through translation type.
    pub pass_through: bool,
    /// SC: snoop control (SNP bit in second-level leaves, PGSNP in PASID
    /// entries).
    pub snoop_control: bool,
    /// IRO * 16: byte offset of the IOTLB register pair.
    pub iotlb_offset: usize,
    /// MHMV: maximum interrupt handle mask.
    pub max_handle_mask: u8,
    /// MTS: memory type support.
    pub memory_type: bool,
    /// NEST: nested translation.
    pub nested: bool,
    /// PRS / ERS / SRS: page requests, execute requests, supervisor requests.
    pub page_requests: bool,
    pub execute_requests: bool,
    pub supervisor_requests: bool,
    /// PASID and PSS + 1: PASID support and its width in bits.
    pub pasid: bool,
    pub pasid_bits: u8,
    /// DIT: device-TLB invalidation throttling.
    pub device_tlb_throttle: bool,
    /// PDS: page-request drain.
    pub page_request_drain: bool,
    /// SMTS: scalable-mode translation.
    pub scalable_mode: bool,
    /// VCS: virtual command support.
    pub virtual_command: bool,
    /// SLADS: second-level accessed/dirty.
    pub second_level_ad: bool,
    /// SLTS / FLTS: second-level / first-level translation in scalable mode.
    pub second_level_translation: bool,
    pub first_level_translation: bool,
    /// SMPWC: scalable-mode page-walk coherency (the PWSNP field of PASID
    /// entries is honoured).
    pub scalable_page_walk_coherency: bool,
    /// RPS: RID_PASID field support.
    pub rid_pasid: bool,
    /// ADMS: abort-DMA mode (TTM = 11b).
    pub abort_dma_mode: bool,
}

impl VtdCapabilities {
    /// Decodes raw VER, CAP and ECAP values.
    pub const fn decode(ver: u32, cap: u64, ecap: u64) -> Self {
        let nd = field(cap, 2, 0) as u32;
        Self {
            version_major: ((ver >> 4) & 0xf) as u8,
            version_minor: (ver & 0xf) as u8,
            cap,
            ecap,
            // ND 7 is reserved: treat as the largest defined value.
            domain_count: 1 << (4 + 2 * if nd > 6 { 6 } else { nd }),
            advanced_fault_logging: bit(cap, 3),
            required_write_buffer_flush: bit(cap, 4),
            protected_low_memory: bit(cap, 5),
            protected_high_memory: bit(cap, 6),
            caching_mode: bit(cap, 7),
            sagaw: field(cap, 12, 8) as u8,
            max_guest_address_width: field(cap, 21, 16) as u32 + 1,
            zero_length_read: bit(cap, 22),
            fault_record_offset: field(cap, 33, 24) as usize * 16,
            sllps: field(cap, 37, 34) as u8,
            page_selective_invalidation: bit(cap, 39),
            fault_record_count: field(cap, 47, 40) as u32 + 1,
            max_address_mask: field(cap, 53, 48) as u8,
            drain_writes: bit(cap, 54),
            drain_reads: bit(cap, 55),
            first_level_1g: bit(cap, 56),
            posted_interrupts: bit(cap, 59),
            first_level_5level: bit(cap, 60),

            coherent: bit(ecap, 0),
            queued_invalidation: bit(ecap, 1),
            device_tlb: bit(ecap, 2),
            interrupt_remapping: bit(ecap, 3),
            extended_interrupt_mode: bit(ecap, 4),
            pass_through: bit(ecap, 6),
            snoop_control: bit(ecap, 7),
            iotlb_offset: field(ecap, 17, 8) as usize * 16,
            max_handle_mask: field(ecap, 23, 20) as u8,
            memory_type: bit(ecap, 25),
            nested: bit(ecap, 26),
            page_requests: bit(ecap, 29),
            execute_requests: bit(ecap, 30),
            supervisor_requests: bit(ecap, 31),
            pasid: bit(ecap, 40),
            pasid_bits: field(ecap, 39, 35) as u8 + 1,
            device_tlb_throttle: bit(ecap, 41),
            page_request_drain: bit(ecap, 42),
            scalable_mode: bit(ecap, 43),
            virtual_command: bit(ecap, 44),
            second_level_ad: bit(ecap, 45),
            second_level_translation: bit(ecap, 46),
            first_level_translation: bit(ecap, 47),
            scalable_page_walk_coherency: bit(ecap, 48),
            rid_pasid: bit(ecap, 49),
            abort_dma_mode: bit(ecap, 52),
        }
    }

    /// Reads VER, CAP and ECAP from the unit.
    pub fn read(mmio: &dyn Mmio) -> Self {
        Self::decode(
            regs::VER.read(mmio),
            regs::CAP.read(mmio),
            regs::ECAP.read(mmio),
        )
    }

    /// Whether second-level tables of `levels` (3, 4 or 5) levels are
    /// supported (SAGAW bit `levels - 2`).
    pub const fn supports_sl_levels(&self, levels: u8) -> bool {
        levels >= 3 && levels <= 5 && self.sagaw & (1 << (levels - 2)) != 0
    }

    /// The supported second-level level counts, smallest first.
    pub fn sl_levels(&self) -> impl Iterator<Item = u8> + '_ {
        (3..=5u8).filter(|&l| self.supports_sl_levels(l))
    }

    /// The level count for a domain translating `width` bits of IOVA: the
    /// smallest supported table whose AGAW (12 + 9 * levels) covers
    /// `width`, or `None` when no supported table does.
    pub fn sl_levels_for(&self, width: u32) -> Option<u8> {
        self.sl_levels().find(|&l| 12 + 9 * u32::from(l) >= width)
    }

    /// The largest second-level page the unit supports (from SLLPS).
    pub const fn max_sl_page(&self) -> PageSize {
        PageSize::from_vtd_sllps(self.sllps)
    }

    /// The largest first-level page (2 MiB always, 1 GiB with FL1GP).
    pub const fn max_fl_page(&self) -> PageSize {
        if self.first_level_1g {
            PageSize::Size1G
        } else {
            PageSize::Size2M
        }
    }

    /// The number of PASIDs the unit supports (0 without ECAP.PASID).
    pub const fn pasid_count(&self) -> u64 {
        if self.pasid { 1 << self.pasid_bits } else { 0 }
    }

    /// A one-line summary for the boot log, e.g.
    /// `ver 1.0, 39-bit, 3-level SL, 2M/1G pages, 65536 domains, QI, IR`.
    pub fn summary(&self) -> Summary<'_> {
        Summary(self)
    }
}

/// [`VtdCapabilities::summary`].
pub struct Summary<'a>(&'a VtdCapabilities);

impl fmt::Display for Summary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.0;
        write!(
            f,
            "ver {}.{}, {}-bit, ",
            c.version_major, c.version_minor, c.max_guest_address_width
        )?;
        let mut first = true;
        for levels in c.sl_levels() {
            if !first {
                f.write_str("/")?;
            }
            write!(f, "{levels}")?;
            first = false;
        }
        if first {
            f.write_str("no")?;
        }
        f.write_str("-level SL, ")?;
        match c.max_sl_page() {
            PageSize::Size1G => f.write_str("2M/1G pages")?,
            PageSize::Size2M => f.write_str("2M pages")?,
            PageSize::Size4K => f.write_str("4K pages only")?,
        }
        write!(f, ", {} domains", c.domain_count)?;
        let flags: [(bool, &str); 13] = [
            (c.queued_invalidation, "QI"),
            (c.interrupt_remapping, "IR"),
            (c.extended_interrupt_mode, "EIM"),
            (c.snoop_control, "SC"),
            (c.pass_through, "PT"),
            (c.device_tlb, "DT"),
            (c.scalable_mode, "SM"),
            (c.first_level_translation, "FLT"),
            (c.nested, "NEST"),
            (c.page_requests, "PRS"),
            (c.page_selective_invalidation, "PSI"),
            (c.coherent, "coherent"),
            (c.posted_interrupts, "PI"),
        ];
        for (on, name) in flags {
            if on {
                write!(f, ", {name}")?;
            }
        }
        if c.pasid {
            write!(f, ", PASID({})", c.pasid_bits)?;
        }
        if c.caching_mode {
            f.write_str(", caching-mode")?;
        }
        if c.required_write_buffer_flush {
            f.write_str(", RWBF")?;
        }
        if !c.coherent {
            f.write_str(", non-coherent walks")?;
        }
        Ok(())
    }
}

/// Raw CAP/ECAP values built from named fields, for tests and the register
/// model. Every field is in its decoded form (e.g. `mgaw` 39, not 38).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapBuilder {
    pub nd: u8,
    pub rwbf: bool,
    pub caching_mode: bool,
    pub sagaw: u8,
    pub mgaw: u32,
    pub fro: u16,
    pub sllps: u8,
    pub psi: bool,
    pub nfr: u16,
    pub mamv: u8,
    pub drain: bool,
    pub fl1gp: bool,
    pub fl5lp: bool,
    pub coherent: bool,
    pub qi: bool,
    pub dt: bool,
    pub ir: bool,
    pub eim: bool,
    pub pt: bool,
    pub sc: bool,
    pub iro: u16,
    pub nest: bool,
    pub prs: bool,
    pub pasid_bits: u8,
    pub smts: bool,
    pub slts: bool,
    pub flts: bool,
    pub smpwc: bool,
    pub rps: bool,
    pub ver: u32,
}

impl CapBuilder {
    /// QEMU 7.2's `intel-iommu` with its default properties: VT-d 1.0,
    /// 39-bit (3-level only), 16-bit domain IDs, one fault-recording
    /// register at 0x220, IOTLB registers at 0xf0, PSI with MAMV 18,
    /// 2M/1G pages, QI, no snoop control, non-coherent walks (ECAP.C = 0).
    pub const fn qemu_default() -> Self {
        Self {
            nd: 6,
            rwbf: false,
            caching_mode: false,
            sagaw: 0b0010,
            mgaw: 39,
            fro: 0x22,
            sllps: 0b11,
            psi: true,
            nfr: 1,
            mamv: 18,
            drain: true,
            fl1gp: false,
            fl5lp: false,
            coherent: false,
            qi: true,
            dt: false,
            ir: false,
            eim: false,
            pt: true,
            sc: false,
            iro: 0x0f,
            nest: false,
            prs: false,
            pasid_bits: 0,
            smts: false,
            slts: false,
            flts: false,
            smpwc: false,
            rps: false,
            ver: 0x10,
        }
    }

    /// A server-class unit: 48-bit with 4- and 5-level tables, 256 domains,
    /// eight fault records, snoop control, scalable mode with first- and
    /// second-level translation, 20-bit PASIDs, device TLBs, no caching
    /// mode, and *non-coherent* walks (ECAP.C = 0).
    pub const fn server() -> Self {
        Self {
            nd: 2,
            rwbf: false,
            caching_mode: false,
            sagaw: 0b0110 | 0b1000,
            mgaw: 48,
            fro: 0x40,
            sllps: 0b11,
            psi: true,
            nfr: 8,
            mamv: 9,
            drain: true,
            fl1gp: true,
            fl5lp: true,
            coherent: false,
            qi: true,
            dt: true,
            ir: true,
            eim: true,
            pt: true,
            sc: true,
            iro: 0x50,
            nest: true,
            prs: false,
            pasid_bits: 20,
            smts: true,
            slts: true,
            flts: true,
            smpwc: true,
            rps: true,
            ver: 0x60,
        }
    }

    pub const fn cap(&self) -> u64 {
        let mut cap = self.nd as u64 & 0b111;
        if self.rwbf {
            cap |= 1 << 4;
        }
        if self.caching_mode {
            cap |= 1 << 7;
        }
        cap |= (self.sagaw as u64 & 0x1f) << 8;
        cap |= ((self.mgaw as u64).saturating_sub(1) & 0x3f) << 16;
        cap |= (self.fro as u64 & 0x3ff) << 24;
        cap |= (self.sllps as u64 & 0xf) << 34;
        if self.psi {
            cap |= 1 << 39;
        }
        cap |= ((self.nfr as u64).saturating_sub(1) & 0xff) << 40;
        cap |= (self.mamv as u64 & 0x3f) << 48;
        if self.drain {
            cap |= (1 << 54) | (1 << 55);
        }
        if self.fl1gp {
            cap |= 1 << 56;
        }
        if self.fl5lp {
            cap |= 1 << 60;
        }
        cap
    }

    pub const fn ecap(&self) -> u64 {
        let flags: [(bool, u32); 15] = [
            (self.coherent, 0),
            (self.qi, 1),
            (self.dt, 2),
            (self.ir, 3),
            (self.eim, 4),
            (self.pt, 6),
            (self.sc, 7),
            (self.nest, 26),
            (self.prs, 29),
            (self.pasid_bits != 0, 40),
            (self.smts, 43),
            (self.slts, 46),
            (self.flts, 47),
            (self.smpwc, 48),
            (self.rps, 49),
        ];
        let mut ecap = (self.iro as u64 & 0x3ff) << 8;
        let mut i = 0;
        while i < flags.len() {
            if flags[i].0 {
                ecap |= 1 << flags[i].1;
            }
            i += 1;
        }
        if self.pasid_bits != 0 {
            ecap |= ((self.pasid_bits as u64 - 1) & 0x1f) << 35;
        }
        ecap
    }

    pub const fn capabilities(&self) -> VtdCapabilities {
        VtdCapabilities::decode(self.ver, self.cap(), self.ecap())
    }
}

#[cfg(test)]
mod tests {
    use alloc::format;

    use super::*;

    #[test]
    fn qemu_default_decodes_to_its_documented_properties() {
        let c = CapBuilder::qemu_default().capabilities();
        assert_eq!((c.version_major, c.version_minor), (1, 0));
        assert_eq!(c.max_guest_address_width, 39);
        assert_eq!(c.sl_levels().collect::<alloc::vec::Vec<_>>(), [3]);
        assert_eq!(c.sl_levels_for(39), Some(3));
        assert_eq!(c.sl_levels_for(48), None);
        assert_eq!(c.domain_count, 65536);
        assert_eq!(c.fault_record_offset, 0x220);
        assert_eq!(c.fault_record_count, 1);
        assert_eq!(c.iotlb_offset, 0xf0);
        assert_eq!(c.max_address_mask, 18);
        assert!(c.page_selective_invalidation && c.queued_invalidation);
        assert!(!c.snoop_control && !c.coherent && !c.caching_mode && !c.pasid);
        assert_eq!(c.max_sl_page(), PageSize::Size1G);
        assert_eq!(
            format!("{}", c.summary()),
            "ver 1.0, 39-bit, 3-level SL, 2M/1G pages, 65536 domains, QI, PT, PSI, \
             non-coherent walks"
        );
    }

    #[test]
    fn server_unit_decodes_levels_pasid_and_snoop_control() {
        let c = CapBuilder::server().capabilities();
        assert_eq!(c.sl_levels().collect::<alloc::vec::Vec<_>>(), [3, 4, 5]);
        assert_eq!(c.sl_levels_for(40), Some(4));
        assert_eq!(c.sl_levels_for(57), Some(5));
        assert_eq!(c.domain_count, 256);
        assert_eq!(c.fault_record_count, 8);
        assert_eq!(c.fault_record_offset, 0x400);
        assert_eq!(c.iotlb_offset, 0x500);
        assert!(c.snoop_control && c.scalable_mode && c.pasid && c.device_tlb);
        assert_eq!(c.pasid_bits, 20);
        assert_eq!(c.pasid_count(), 1 << 20);
        assert!(c.first_level_1g && c.first_level_5level && c.nested);
        assert!(!c.caching_mode && !c.coherent);
        let line = format!("{}", c.summary());
        assert!(line.starts_with("ver 6.0, 48-bit, 3/4/5-level SL, 2M/1G pages, 256 domains"));
        assert!(line.contains("SM") && line.contains("PASID(20)") && line.contains("SC"));
    }

    #[test]
    fn raw_register_values_decode_field_by_field() {
        // CAP: ND=1 (64), RWBF, CM, SAGAW=0b0100 (4-level), MGAW=47 (48-bit),
        // FRO=0x10, SLLPS=0b01, no PSI, NFR=3 (4 records), MAMV=6.
        let cap: u64 = 1
            | (1 << 4)
            | (1 << 7)
            | (0b0100 << 8)
            | (47 << 16)
            | (0x10 << 24)
            | (0b01 << 34)
            | (3 << 40)
            | (6 << 48);
        // ECAP: C, IR, IRO=0x21, PSS=19 without PASID bit.
        let ecap: u64 = 1 | (1 << 3) | (0x21 << 8) | (19 << 35);
        let c = VtdCapabilities::decode(0x12, cap, ecap);
        assert_eq!((c.version_major, c.version_minor), (1, 2));
        assert_eq!(c.domain_count, 64);
        assert!(c.required_write_buffer_flush && c.caching_mode);
        assert_eq!(c.sl_levels().collect::<alloc::vec::Vec<_>>(), [4]);
        assert_eq!(c.sl_levels_for(39), Some(4), "3-level not offered: use 4");
        assert_eq!(c.max_guest_address_width, 48);
        assert_eq!(c.fault_record_offset, 0x100);
        assert_eq!(c.max_sl_page(), PageSize::Size2M);
        assert!(!c.page_selective_invalidation);
        assert_eq!(c.fault_record_count, 4);
        assert_eq!(c.max_address_mask, 6);
        assert!(c.coherent && c.interrupt_remapping && !c.queued_invalidation);
        assert_eq!(c.iotlb_offset, 0x210);
        assert!(!c.pasid);
        assert_eq!(c.pasid_count(), 0);
        let line = format!("{}", c.summary());
        assert!(line.contains("caching-mode") && line.contains("RWBF"));
        assert!(line.contains("2M pages") && line.contains("64 domains"));
    }

    #[test]
    fn builder_roundtrips_through_decode() {
        let b = CapBuilder::server();
        let c = b.capabilities();
        assert_eq!(c.cap, b.cap());
        assert_eq!(c.ecap, b.ecap());
        assert_eq!(c.max_guest_address_width, b.mgaw);
        assert_eq!(c.pasid_bits, b.pasid_bits);
        assert_eq!(c.max_address_mask, b.mamv);
    }
}
