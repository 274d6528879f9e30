//! SMMU_IDR0-IDR5, IIDR and AIDR folded once into [`SmmuCapabilities`],
//! the policy the rest of the driver reads (Arm IHI 0070, 6.3.1-6.3.8).

use core::fmt;

use sluice_hal::Mmio;

use super::regs;

const fn bit(raw: u32, n: u32) -> bool {
    raw & (1 << n) != 0
}

const fn field(raw: u32, hi: u32, lo: u32) -> u32 {
    (raw >> lo) & ((1u32 << (hi - lo + 1)) - 1)
}

/// IDR5.OAS / CD.IPS / STE.S2PS encoding → address bits (6.3.6).
pub const fn oas_bits_from_encoding(encoding: u32) -> u32 {
    match encoding {
        0 => 32,
        1 => 36,
        2 => 40,
        3 => 42,
        4 => 44,
        5 => 48,
        6 => 52,
        _ => 56,
    }
}

/// Address bits → the smallest IPS/PS encoding that covers them.
pub const fn oas_encoding_for(bits: u32) -> u32 {
    match bits {
        0..=32 => 0,
        33..=36 => 1,
        37..=40 => 2,
        41..=42 => 3,
        43..=44 => 4,
        45..=48 => 5,
        49..=52 => 6,
        _ => 7,
    }
}

/// Everything the driver needs to know about one SMMU, decoded from the ID
/// registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmmuCapabilities {
    /// The raw registers, for logs and for whatever is not decoded.
    pub idr: [u32; 6],
    pub iidr: u32,
    pub aidr: u32,
    /// SMMUv3.`arch_minor` (AIDR.ArchMinorRev; ArchMajorRev 0 is v3).
    pub arch_minor: u8,

    // ---- IDR0 (6.3.1) ----
    /// S2P / S1P: stage 2 / stage 1 translation.
    pub stage2: bool,
    pub stage1: bool,
    /// TTF: VMSAv8-64 (AArch64) and VMSAv8-32 LPAE table formats.
    pub aarch64_tables: bool,
    pub aarch32_tables: bool,
    /// COHACC: the SMMU's accesses to tables and queues are coherent with
    /// the CPUs' caches. When false every table, descriptor and queue write
    /// must be cleaned to memory before the SMMU may read it.
    pub coherent: bool,
    /// BTM: broadcast TLB maintenance.
    pub broadcast_tlb: bool,
    /// HTTU: hardware table updates, 0 none, 1 access flag, 2 access flag
    /// and dirty state.
    pub httu: u8,
    /// HYP: EL2 StreamWorld (and CMD_TLBI_EL2_*).
    pub hyp: bool,
    pub ats: bool,
    pub ns1ats: bool,
    /// ASID16 / VMID16: 16-bit ASIDs / VMIDs (8-bit otherwise).
    pub asid16: bool,
    pub vmid16: bool,
    /// MSI: the SMMU can write MSIs (CMD_SYNC completion, queue IRQs).
    pub msi: bool,
    pub sev: bool,
    pub atos: bool,
    pub pri: bool,
    pub vmid_wildcard: bool,
    /// CD2L: 2-level context-descriptor tables.
    pub cd2l: bool,
    pub vatos: bool,
    /// TTENDIAN: 0 mixed, 2 little-endian only, 3 big-endian only.
    pub ttendian: u8,
    /// STALL_MODEL: 0 stall and terminate, 1 terminate only, 2 stall
    /// forced.
    pub stall_model: u8,
    /// TERM_MODEL: terminated transactions always abort (no RAZ/WI).
    pub term_model_abort_only: bool,
    /// ST_LEVEL = 0b01: 2-level stream tables.
    pub two_level_stream_table: bool,

    // ---- IDR1 (6.3.2) ----
    /// SIDSIZE / SSIDSIZE: StreamID and SubstreamID widths in bits.
    pub sid_bits: u8,
    pub ssid_bits: u8,
    /// PRIQS / EVENTQS / CMDQS: log2 of the largest queue sizes.
    pub priq_log2: u8,
    pub eventq_log2: u8,
    pub cmdq_log2: u8,
    pub attr_perms_override: bool,
    pub attr_types_override: bool,
    /// REL: base addresses are relative to the register page (embedded).
    pub relative_base: bool,
    /// QUEUES_PRESET / TABLES_PRESET: queue and table bases are fixed.
    pub queues_preset: bool,
    pub tables_preset: bool,

    // ---- IDR3 (6.3.4) ----
    pub hierarchical_attr_disable: bool,
    /// STT: small translation tables (T0SZ up to 48).
    pub small_tables: bool,
    /// RIL: range invalidation and the TTL hint in TLBI commands.
    pub range_invalidation: bool,
    /// BBML: break-before-make level (2: a block may be replaced by an
    /// equivalent table without break-before-make).
    pub bbml: u8,

    // ---- IDR5 (6.3.6) ----
    /// OAS: output (physical) address size in bits.
    pub oas_bits: u32,
    /// GRAN4K / GRAN16K / GRAN64K: supported translation granules.
    pub granule_4k: bool,
    pub granule_16k: bool,
    pub granule_64k: bool,
    /// VAX: 48- or 52-bit virtual addresses.
    pub va_bits: u32,
    /// STALL_MAX: most outstanding stalled transactions.
    pub stall_max: u16,
}

impl SmmuCapabilities {
    /// Decodes raw IDR0-IDR5, IIDR and AIDR values.
    pub const fn decode(idr: [u32; 6], iidr: u32, aidr: u32) -> Self {
        let [idr0, idr1, _idr2, idr3, _idr4, idr5] = idr;
        let ttf = field(idr0, 3, 2);
        Self {
            idr,
            iidr,
            aidr,
            arch_minor: field(aidr, 3, 0) as u8,

            stage2: bit(idr0, 0),
            stage1: bit(idr0, 1),
            aarch64_tables: ttf & 0b10 != 0,
            aarch32_tables: ttf & 0b01 != 0,
            coherent: bit(idr0, 4),
            broadcast_tlb: bit(idr0, 5),
            httu: field(idr0, 7, 6) as u8,
            hyp: bit(idr0, 9),
            ats: bit(idr0, 10),
            ns1ats: bit(idr0, 11),
            asid16: bit(idr0, 12),
            msi: bit(idr0, 13),
            sev: bit(idr0, 14),
            atos: bit(idr0, 15),
            pri: bit(idr0, 16),
            vmid_wildcard: bit(idr0, 17),
            vmid16: bit(idr0, 18),
            cd2l: bit(idr0, 19),
            vatos: bit(idr0, 20),
            ttendian: field(idr0, 22, 21) as u8,
            stall_model: field(idr0, 25, 24) as u8,
            term_model_abort_only: bit(idr0, 26),
            two_level_stream_table: field(idr0, 28, 27) == 0b01,

            sid_bits: field(idr1, 5, 0) as u8,
            ssid_bits: field(idr1, 10, 6) as u8,
            priq_log2: field(idr1, 15, 11) as u8,
            eventq_log2: field(idr1, 20, 16) as u8,
            cmdq_log2: field(idr1, 25, 21) as u8,
            attr_perms_override: bit(idr1, 26),
            attr_types_override: bit(idr1, 27),
            relative_base: bit(idr1, 28),
            queues_preset: bit(idr1, 29),
            tables_preset: bit(idr1, 30),

            hierarchical_attr_disable: bit(idr3, 2),
            small_tables: bit(idr3, 9),
            range_invalidation: bit(idr3, 10),
            bbml: field(idr3, 12, 11) as u8,

            oas_bits: oas_bits_from_encoding(field(idr5, 2, 0)),
            granule_4k: bit(idr5, 4),
            granule_16k: bit(idr5, 5),
            granule_64k: bit(idr5, 6),
            va_bits: if field(idr5, 11, 10) == 0b01 { 52 } else { 48 },
            stall_max: field(idr5, 31, 16) as u16,
        }
    }

    /// Reads the identification registers.
    pub fn read(mmio: &dyn Mmio) -> Self {
        Self::decode(
            [
                regs::IDR0.read(mmio),
                regs::IDR1.read(mmio),
                regs::IDR2.read(mmio),
                regs::IDR3.read(mmio),
                regs::IDR4.read(mmio),
                regs::IDR5.read(mmio),
            ],
            regs::IIDR.read(mmio),
            regs::AIDR.read(mmio),
        )
    }

    /// Number of ASIDs (256 or 65536).
    pub const fn asid_count(&self) -> u32 {
        if self.asid16 { 1 << 16 } else { 1 << 8 }
    }

    /// Number of VMIDs (256 or 65536).
    pub const fn vmid_count(&self) -> u32 {
        if self.vmid16 { 1 << 16 } else { 1 << 8 }
    }

    /// Whether tables are little-endian (the only byte order the driver
    /// writes).
    pub const fn little_endian_tables(&self) -> bool {
        self.ttendian != 0b11
    }

    /// IIDR.ProductID, Variant, Revision and Implementer (6.3.7).
    pub const fn implementation(&self) -> (u16, u8, u8, u16) {
        (
            field(self.iidr, 31, 20) as u16,
            field(self.iidr, 19, 16) as u8,
            field(self.iidr, 15, 12) as u8,
            field(self.iidr, 11, 0) as u16,
        )
    }

    /// A one-line summary for the boot log, e.g.
    /// `SMMUv3.1, S1, AArch64, 2-level ST, SID 16, SSID 0, ASID16, OAS 44,
    /// 4K/16K/64K, cmdq 2^19, evtq 2^19, RIL, coherent`.
    pub fn summary(&self) -> Summary<'_> {
        Summary(self)
    }
}

/// [`SmmuCapabilities::summary`].
pub struct Summary<'a>(&'a SmmuCapabilities);

impl fmt::Display for Summary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.0;
        write!(f, "SMMUv3.{}, ", c.arch_minor)?;
        f.write_str(match (c.stage1, c.stage2) {
            (true, true) => "S1+S2",
            (true, false) => "S1",
            (false, true) => "S2",
            (false, false) => "no stages",
        })?;
        f.write_str(match (c.aarch64_tables, c.aarch32_tables) {
            (true, true) => ", AArch64+AArch32",
            (true, false) => ", AArch64",
            (false, true) => ", AArch32 only",
            (false, false) => ", no table format",
        })?;
        write!(
            f,
            ", {} ST, SID {}, SSID {}",
            if c.two_level_stream_table {
                "2-level"
            } else {
                "linear"
            },
            c.sid_bits,
            c.ssid_bits
        )?;
        if c.asid16 {
            f.write_str(", ASID16")?;
        }
        if c.vmid16 && c.stage2 {
            f.write_str(", VMID16")?;
        }
        write!(f, ", OAS {}", c.oas_bits)?;
        let mut granules = [""; 3];
        let mut n = 0;
        for (on, name) in [
            (c.granule_4k, "4K"),
            (c.granule_16k, "16K"),
            (c.granule_64k, "64K"),
        ] {
            if on {
                granules[n] = name;
                n += 1;
            }
        }
        f.write_str(", ")?;
        if n == 0 {
            f.write_str("no granules")?;
        }
        for (i, g) in granules[..n].iter().enumerate() {
            if i > 0 {
                f.write_str("/")?;
            }
            f.write_str(g)?;
        }
        write!(f, ", cmdq 2^{}, evtq 2^{}", c.cmdq_log2, c.eventq_log2)?;
        let flags: [(bool, &str); 10] = [
            (c.cd2l, "CD2L"),
            (c.range_invalidation, "RIL"),
            (c.bbml == 2, "BBML2"),
            (c.ats, "ATS"),
            (c.pri, "PRI"),
            (c.msi, "MSI"),
            (c.hyp, "HYP"),
            (c.httu == 1, "HTTU(A)"),
            (c.httu >= 2, "HTTU(A+D)"),
            (c.broadcast_tlb, "BTM"),
        ];
        for (on, name) in flags {
            if on {
                write!(f, ", {name}")?;
            }
        }
        if c.coherent {
            f.write_str(", coherent")
        } else {
            f.write_str(", non-coherent table walks")
        }
    }
}

/// Raw ID register values built from named fields, for tests and the
/// register model. Every field is in its decoded form (e.g. `oas_bits` 44,
/// not the encoding 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdrBuilder {
    pub stage1: bool,
    pub stage2: bool,
    pub coherent: bool,
    pub httu: u8,
    pub hyp: bool,
    pub ats: bool,
    pub asid16: bool,
    pub vmid16: bool,
    pub msi: bool,
    pub pri: bool,
    pub cd2l: bool,
    pub stall_model: u8,
    pub term_model: bool,
    pub two_level: bool,
    pub sid_bits: u8,
    pub ssid_bits: u8,
    pub eventq_log2: u8,
    pub cmdq_log2: u8,
    pub ril: bool,
    pub bbml: u8,
    pub oas_bits: u32,
    pub granules: (bool, bool, bool),
    pub arch_minor: u8,
}

impl IdrBuilder {
    /// QEMU 7.2's `virt,iommu=smmuv3`: SMMUv3.1 with stage 1 only,
    /// AArch64 tables, coherent, 16-bit ASIDs, 2-level stream tables with
    /// 16-bit StreamIDs, no substreams, terminate-only fault model, range
    /// invalidation, 44-bit OAS, all three granules, 2^19-entry queues.
    pub const fn qemu_7_2() -> Self {
        Self {
            stage1: true,
            stage2: false,
            coherent: true,
            httu: 0,
            hyp: false,
            ats: false,
            asid16: true,
            vmid16: false,
            msi: false,
            pri: false,
            cd2l: false,
            stall_model: 1,
            term_model: true,
            two_level: true,
            sid_bits: 16,
            ssid_bits: 0,
            eventq_log2: 19,
            cmdq_log2: 19,
            ril: true,
            bbml: 0,
            oas_bits: 44,
            granules: (true, true, true),
            arch_minor: 1,
        }
    }

    /// A server-class SMMU: both stages, 16-bit ASIDs and VMIDs, 2-level
    /// stream and CD tables, 20-bit SubstreamIDs, MSI, ATS/PRI, 48-bit OAS,
    /// no range invalidation (a v3.1 part), BBML 0, and *non-coherent*
    /// table walks.
    pub const fn server() -> Self {
        Self {
            stage1: true,
            stage2: true,
            coherent: false,
            httu: 2,
            hyp: true,
            ats: true,
            asid16: true,
            vmid16: true,
            msi: true,
            pri: true,
            cd2l: true,
            stall_model: 0,
            term_model: false,
            two_level: true,
            sid_bits: 16,
            ssid_bits: 20,
            eventq_log2: 17,
            cmdq_log2: 17,
            ril: false,
            bbml: 0,
            oas_bits: 48,
            granules: (true, false, true),
            arch_minor: 1,
        }
    }

    pub const fn idr(&self) -> [u32; 6] {
        let mut idr0 = 0u32;
        if self.stage2 {
            idr0 |= 1 << 0;
        }
        if self.stage1 {
            idr0 |= 1 << 1;
        }
        idr0 |= 0b10 << 2; // TTF: AArch64
        if self.coherent {
            idr0 |= 1 << 4;
        }
        idr0 |= (self.httu as u32 & 0b11) << 6;
        if self.hyp {
            idr0 |= 1 << 9;
        }
        if self.ats {
            idr0 |= 1 << 10;
        }
        if self.asid16 {
            idr0 |= 1 << 12;
        }
        if self.msi {
            idr0 |= 1 << 13;
        }
        if self.pri {
            idr0 |= 1 << 16;
        }
        if self.vmid16 {
            idr0 |= 1 << 18;
        }
        if self.cd2l {
            idr0 |= 1 << 19;
        }
        idr0 |= 0b10 << 21; // TTENDIAN: little-endian
        idr0 |= (self.stall_model as u32 & 0b11) << 24;
        if self.term_model {
            idr0 |= 1 << 26;
        }
        if self.two_level {
            idr0 |= 0b01 << 27;
        }
        let idr1 = (self.sid_bits as u32 & 0x3f)
            | ((self.ssid_bits as u32 & 0x1f) << 6)
            | ((self.eventq_log2 as u32 & 0x1f) << 16)
            | ((self.cmdq_log2 as u32 & 0x1f) << 21);
        let mut idr3 = (self.bbml as u32 & 0b11) << 11;
        if self.ril {
            idr3 |= 1 << 10;
        }
        let mut idr5 = oas_encoding_for(self.oas_bits);
        if self.granules.0 {
            idr5 |= 1 << 4;
        }
        if self.granules.1 {
            idr5 |= 1 << 5;
        }
        if self.granules.2 {
            idr5 |= 1 << 6;
        }
        [idr0, idr1, 0, idr3, 0, idr5]
    }

    pub const fn aidr(&self) -> u32 {
        self.arch_minor as u32 & 0xf
    }

    pub const fn capabilities(&self) -> SmmuCapabilities {
        SmmuCapabilities::decode(self.idr(), 0x0434_043b, self.aidr())
    }
}

#[cfg(test)]
mod tests {
    use alloc::format;

    use super::*;

    #[test]
    fn qemu_7_2_decodes_to_its_documented_properties() {
        let c = IdrBuilder::qemu_7_2().capabilities();
        assert!(c.stage1 && !c.stage2);
        assert!(c.aarch64_tables && !c.aarch32_tables);
        assert!(c.two_level_stream_table && c.coherent && c.asid16);
        assert_eq!((c.sid_bits, c.ssid_bits), (16, 0));
        assert_eq!(c.oas_bits, 44);
        assert_eq!((c.cmdq_log2, c.eventq_log2), (19, 19));
        assert_eq!(c.asid_count(), 65536);
        assert_eq!(c.stall_model, 1);
        assert!(c.term_model_abort_only && c.range_invalidation);
        assert!(c.little_endian_tables());
        assert_eq!(
            format!("{}", c.summary()),
            "SMMUv3.1, S1, AArch64, 2-level ST, SID 16, SSID 0, ASID16, OAS 44, 4K/16K/64K, \
             cmdq 2^19, evtq 2^19, RIL, coherent"
        );
    }

    #[test]
    fn raw_registers_decode_field_by_field() {
        // IDR0: S2P, S1P, TTF=0b11, COHACC=0, HTTU=0b01, HYP, ATS, MSI, PRI,
        // VMID16, CD2L, TTENDIAN=0b00, STALL_MODEL=0b10, ST_LEVEL=0b01.
        let idr0: u32 = 0b11
            | (0b11 << 2)
            | (0b01 << 6)
            | (1 << 9)
            | (1 << 10)
            | (1 << 13)
            | (1 << 16)
            | (1 << 18)
            | (1 << 19)
            | (0b10 << 24)
            | (0b01 << 27);
        // IDR1: SIDSIZE 8, SSIDSIZE 5, PRIQS 4, EVENTQS 9, CMDQS 10,
        // TABLES_PRESET.
        let idr1: u32 = 8 | (5 << 6) | (4 << 11) | (9 << 16) | (10 << 21) | (1 << 30);
        // IDR3: RIL, BBML 2. IDR5: OAS 48 (5), GRAN4K, GRAN64K, VAX 52,
        // STALL_MAX 7.
        let idr3: u32 = (1 << 10) | (2 << 11);
        let idr5: u32 = 5 | (1 << 4) | (1 << 6) | (0b01 << 10) | (7 << 16);
        let c = SmmuCapabilities::decode([idr0, idr1, 0, idr3, 0, idr5], 0x1234_5678, 0x2);
        assert!(c.stage1 && c.stage2 && c.aarch64_tables && c.aarch32_tables);
        assert!(!c.coherent && c.hyp && c.ats && c.msi && c.pri && c.vmid16 && c.cd2l);
        assert!(!c.asid16);
        assert_eq!(c.asid_count(), 256);
        assert_eq!(c.vmid_count(), 65536);
        assert_eq!(c.httu, 1);
        assert_eq!(c.stall_model, 2);
        assert!(c.two_level_stream_table);
        assert_eq!((c.sid_bits, c.ssid_bits), (8, 5));
        assert_eq!((c.priq_log2, c.eventq_log2, c.cmdq_log2), (4, 9, 10));
        assert!(c.tables_preset && !c.queues_preset);
        assert!(c.range_invalidation);
        assert_eq!(c.bbml, 2);
        assert_eq!(c.oas_bits, 48);
        assert!(c.granule_4k && !c.granule_16k && c.granule_64k);
        assert_eq!(c.va_bits, 52);
        assert_eq!(c.stall_max, 7);
        assert_eq!(c.arch_minor, 2);
        assert_eq!(c.implementation(), (0x123, 4, 5, 0x678));
        let line = format!("{}", c.summary());
        assert!(line.starts_with("SMMUv3.2, S1+S2, AArch64+AArch32, 2-level ST, SID 8, SSID 5"));
        assert!(line.contains("HTTU(A)") && line.contains("BBML2"));
        assert!(line.ends_with("non-coherent table walks"), "{line}");
    }

    #[test]
    fn oas_encodings_roundtrip() {
        for enc in 0..=6 {
            assert_eq!(oas_encoding_for(oas_bits_from_encoding(enc)), enc);
        }
        assert_eq!(oas_encoding_for(39), 2, "39 bits need the 40-bit encoding");
    }

    #[test]
    fn builder_roundtrips_through_decode() {
        let b = IdrBuilder::server();
        let c = b.capabilities();
        assert_eq!(c.idr, b.idr());
        assert_eq!(c.ssid_bits, 20);
        assert_eq!(c.oas_bits, 48);
        assert!(!c.coherent && c.stage2 && c.cd2l && c.msi);
        assert_eq!(c.stall_model, 0);
    }
}
