//! In-memory translation structures the unit walks (VT-d spec rev 4.x,
//! chapter 9 "Translation Structure Formats").
//!
//! Every structure is a `#[repr(C)]` newtype over its 64-bit words, built
//! with `const fn` constructors. [`words`](RootEntry::words) gives the words
//! in the order the driver writes them: the word holding the present bit
//! comes *first* in the array and is written *last* when an entry becomes
//! present (and cleared first when it stops being present), so the hardware
//! never sees a present entry with stale fields.

use sluice_hal::PhysAddr;

const ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;
const PRESENT: u64 = 1;

/// Root-table entries per root table (one per bus), 16 bytes each (9.1).
pub const ROOT_ENTRIES: usize = 256;
/// Legacy context entries per context table (one per devfn), 16 bytes each.
pub const LEGACY_CONTEXT_ENTRIES: usize = 256;
/// Scalable-mode context entries per context table (half the devfns), 32
/// bytes each (9.4).
pub const SCALABLE_CONTEXT_ENTRIES: usize = 128;
/// PASID-table entries per PASID table, 64 bytes each (9.6): PASID bits 5:0
/// index the table, bits 19:6 the directory.
pub const PASID_TABLE_ENTRIES: u32 = 64;
/// PASID-directory entries per 4 KiB page (8 bytes each, 9.5).
pub const PASID_DIR_ENTRIES_PER_PAGE: u32 = 512;

/// Legacy root entry (9.1): bit 0 P, bits 63:12 context-table pointer; the
/// upper 64 bits are reserved.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RootEntry([u64; 2]);
const _: () = assert!(core::mem::size_of::<RootEntry>() == 16);

impl RootEntry {
    pub const NOT_PRESENT: Self = Self([0, 0]);

    pub const fn legacy(context_table: PhysAddr) -> Self {
        Self([(context_table.as_u64() & ADDRESS_MASK) | PRESENT, 0])
    }

    /// Scalable-mode root entry (9.2): the lower half (bit 0 LP, bits 63:12
    /// LCTP) points to the context table of devfn 0-127, the upper half
    /// (UP, UCTP) to that of devfn 128-255.
    pub const fn scalable(lower: Option<PhysAddr>, upper: Option<PhysAddr>) -> Self {
        let lo = match lower {
            Some(t) => (t.as_u64() & ADDRESS_MASK) | PRESENT,
            None => 0,
        };
        let hi = match upper {
            Some(t) => (t.as_u64() & ADDRESS_MASK) | PRESENT,
            None => 0,
        };
        Self([lo, hi])
    }

    pub const fn from_words(words: [u64; 2]) -> Self {
        Self(words)
    }
    pub const fn words(&self) -> [u64; 2] {
        self.0
    }
    /// Legacy: P. Scalable: LP.
    pub const fn is_present(&self) -> bool {
        self.0[0] & PRESENT != 0
    }
    /// Legacy: the context table. Scalable: the lower context table.
    pub const fn context_table(&self) -> Option<PhysAddr> {
        if self.is_present() {
            Some(PhysAddr::new(self.0[0] & ADDRESS_MASK))
        } else {
            None
        }
    }
    /// Scalable: the upper context table (devfn 128-255).
    pub const fn upper_context_table(&self) -> Option<PhysAddr> {
        if self.0[1] & PRESENT != 0 {
            Some(PhysAddr::new(self.0[1] & ADDRESS_MASK))
        } else {
            None
        }
    }
}

/// The translation type of a legacy context entry (9.3, TT bits 3:2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum TranslationType {
    /// 00b: untranslated requests go through the second-level table;
    /// translated requests and translation requests are blocked.
    UntranslatedOnly = 0b00,
    /// 01b: as 00b, and device-TLB (ATS) translated / translation requests
    /// are allowed.
    AllowDeviceTlb = 0b01,
    /// 10b: pass-through (needs ECAP.PT).
    PassThrough = 0b10,
}

/// Legacy context entry (9.3).
///
/// Low word: bit 0 P, bit 1 FPD, bits 3:2 TT, bits 63:12 SLPTPTR.
/// High word: bits 2:0 AW, bits 23:8 DID.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ContextEntry([u64; 2]);
const _: () = assert!(core::mem::size_of::<ContextEntry>() == 16);

impl ContextEntry {
    pub const NOT_PRESENT: Self = Self([0, 0]);
    pub const FAULT_PROCESSING_DISABLE: u64 = 1 << 1;
    pub const TT_SHIFT: u32 = 2;
    pub const DID_SHIFT: u32 = 8;

    /// A present entry translating through the second-level table at
    /// `slptptr` with `aw` (1: 3-level, 2: 4-level, 3: 5-level) in domain
    /// `did`.
    pub const fn new(slptptr: PhysAddr, aw: u8, did: u16, tt: TranslationType) -> Self {
        Self([
            (slptptr.as_u64() & ADDRESS_MASK) | ((tt as u64) << Self::TT_SHIFT) | PRESENT,
            (aw as u64 & 0b111) | ((did as u64) << Self::DID_SHIFT),
        ])
    }

    pub const fn with_fault_processing_disabled(self) -> Self {
        Self([self.0[0] | Self::FAULT_PROCESSING_DISABLE, self.0[1]])
    }

    pub const fn from_words(words: [u64; 2]) -> Self {
        Self(words)
    }
    pub const fn words(&self) -> [u64; 2] {
        self.0
    }
    pub const fn is_present(&self) -> bool {
        self.0[0] & PRESENT != 0
    }
    pub const fn did(&self) -> u16 {
        (self.0[1] >> Self::DID_SHIFT) as u16
    }
    pub const fn aw(&self) -> u8 {
        (self.0[1] & 0b111) as u8
    }
    pub const fn slptptr(&self) -> PhysAddr {
        PhysAddr::new(self.0[0] & ADDRESS_MASK)
    }
    pub const fn translation_type(&self) -> u8 {
        ((self.0[0] >> Self::TT_SHIFT) & 0b11) as u8
    }
}

/// Scalable-mode context entry (9.4), 256 bits.
///
/// Word 0: bit 0 P, bit 1 FPD, bit 2 DTE (device-TLB enable), bit 3 PASIDE
/// (PASID-tagged requests allowed), bit 4 PRE (page requests), bits 11:9
/// PDTS (the PASID directory has `2^(PDTS + 7)` entries), bits 63:12 PASID
/// directory pointer. Word 1: bits 19:0 RID_PASID (the PASID used for
/// requests without one), bit 20 RID_PRIV. Words 2-3 reserved.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ScalableContextEntry([u64; 4]);
const _: () = assert!(core::mem::size_of::<ScalableContextEntry>() == 32);

impl ScalableContextEntry {
    pub const NOT_PRESENT: Self = Self([0; 4]);
    pub const FAULT_PROCESSING_DISABLE: u64 = 1 << 1;
    pub const DEVICE_TLB_ENABLE: u64 = 1 << 2;
    pub const PASID_ENABLE: u64 = 1 << 3;
    pub const PAGE_REQUEST_ENABLE: u64 = 1 << 4;
    pub const PDTS_SHIFT: u32 = 9;

    /// A present entry whose PASID directory at `pasid_dir` has
    /// `2^(pdts + 7)` entries; requests without PASID use `rid_pasid`.
    pub const fn new(pasid_dir: PhysAddr, pdts: u8, rid_pasid: u32) -> Self {
        Self([
            (pasid_dir.as_u64() & ADDRESS_MASK)
                | ((pdts as u64 & 0b111) << Self::PDTS_SHIFT)
                | PRESENT,
            rid_pasid as u64 & 0xf_ffff,
            0,
            0,
        ])
    }
    pub const fn with_pasid_enable(self) -> Self {
        Self([
            self.0[0] | Self::PASID_ENABLE,
            self.0[1],
            self.0[2],
            self.0[3],
        ])
    }
    pub const fn with_device_tlb(self) -> Self {
        Self([
            self.0[0] | Self::DEVICE_TLB_ENABLE,
            self.0[1],
            self.0[2],
            self.0[3],
        ])
    }

    pub const fn from_words(words: [u64; 4]) -> Self {
        Self(words)
    }
    pub const fn words(&self) -> [u64; 4] {
        self.0
    }
    pub const fn is_present(&self) -> bool {
        self.0[0] & PRESENT != 0
    }
    pub const fn pasid_dir(&self) -> PhysAddr {
        PhysAddr::new(self.0[0] & ADDRESS_MASK)
    }
    pub const fn pdts(&self) -> u8 {
        ((self.0[0] >> Self::PDTS_SHIFT) & 0b111) as u8
    }
    pub const fn rid_pasid(&self) -> u32 {
        (self.0[1] & 0xf_ffff) as u32
    }
}

/// Scalable-mode PASID-directory entry (9.5): bit 0 P, bit 1 FPD, bits
/// 63:12 the PASID table of 64 PASIDs.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PasidDirEntry(u64);
const _: () = assert!(core::mem::size_of::<PasidDirEntry>() == 8);

impl PasidDirEntry {
    pub const NOT_PRESENT: Self = Self(0);
    pub const fn new(pasid_table: PhysAddr) -> Self {
        Self((pasid_table.as_u64() & ADDRESS_MASK) | PRESENT)
    }
    pub const fn from_raw(raw: u64) -> Self {
        Self(raw)
    }
    pub const fn raw(self) -> u64 {
        self.0
    }
    pub const fn is_present(self) -> bool {
        self.0 & PRESENT != 0
    }
    pub const fn table(self) -> PhysAddr {
        PhysAddr::new(self.0 & ADDRESS_MASK)
    }
}

/// PASID-granular translation type (9.6, PGTT bits 8:6 of word 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Pgtt {
    FirstLevel = 0b001,
    SecondLevel = 0b010,
    Nested = 0b011,
    PassThrough = 0b100,
}

/// Scalable-mode PASID-table entry (9.6), 512 bits.
///
/// Word 0: bit 0 P, bit 1 FPD, bits 4:2 AW, bit 5 SLEE, bits 8:6 PGTT, bit 9
/// SLADE, bits 63:12 SLPTPTR. Word 1: bits 15:0 DID, bit 23 PWSNP (page-walk
/// snoop), bit 24 PGSNP (page snoop: force every access to snoop), bit 25
/// CD, bit 26 EMTE, bits 29:27 EMT, bit 30 PWT, bit 31 PCD, bits 63:32 PAT.
/// Word 2: bit 0 SRE, bit 1 ERE, bits 3:2 FLPM (0: 4-level, 1: 5-level),
/// bit 4 WPE, bit 5 NXE, bit 6 SMEP, bit 7 EAFE, bits 63:12 FLPTPTR.
/// Words 3-7 reserved.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PasidEntry([u64; 8]);
const _: () = assert!(core::mem::size_of::<PasidEntry>() == 64);

impl PasidEntry {
    pub const NOT_PRESENT: Self = Self([0; 8]);
    pub const FAULT_PROCESSING_DISABLE: u64 = 1 << 1;
    pub const AW_SHIFT: u32 = 2;
    pub const SLEE: u64 = 1 << 5;
    pub const PGTT_SHIFT: u32 = 6;
    pub const SLADE: u64 = 1 << 9;
    pub const PWSNP: u64 = 1 << 23;
    pub const PGSNP: u64 = 1 << 24;
    pub const SRE: u64 = 1 << 0;
    pub const FLPM_SHIFT: u32 = 2;
    /// NXE: the XD bit of first-level entries is honoured (reserved when
    /// clear, as with IA32_EFER.NXE).
    pub const NXE: u64 = 1 << 5;

    /// Second-level-only translation through `slptptr` (`aw` as in the
    /// legacy context entry) in domain `did`.
    pub const fn second_level(slptptr: PhysAddr, aw: u8, did: u16) -> Self {
        let mut words = [0u64; 8];
        words[0] = (slptptr.as_u64() & ADDRESS_MASK)
            | ((Pgtt::SecondLevel as u64) << Self::PGTT_SHIFT)
            | ((aw as u64 & 0b111) << Self::AW_SHIFT)
            | PRESENT;
        words[1] = did as u64;
        Self(words)
    }

    /// First-level-only translation through `flptptr` with 4 or 5 levels
    /// (FLPM 0 / 1) in domain `did`. Supervisor requests stay disabled; NXE
    /// is set so that non-executable leaves (XD) are valid.
    pub const fn first_level(flptptr: PhysAddr, levels: u8, did: u16) -> Self {
        let flpm = if levels == 5 { 1 } else { 0 };
        let mut words = [0u64; 8];
        words[0] = ((Pgtt::FirstLevel as u64) << Self::PGTT_SHIFT) | PRESENT;
        words[1] = did as u64;
        words[2] = (flptptr.as_u64() & ADDRESS_MASK) | (flpm << Self::FLPM_SHIFT) | Self::NXE;
        Self(words)
    }

    /// PGSNP: every access translated through this entry snoops (needs
    /// ECAP.SC).
    pub const fn with_page_snoop(self) -> Self {
        let mut w = self.0;
        w[1] |= Self::PGSNP;
        Self(w)
    }
    /// PWSNP: the unit's walks of the page tables snoop (needs ECAP.SMPWC).
    pub const fn with_page_walk_snoop(self) -> Self {
        let mut w = self.0;
        w[1] |= Self::PWSNP;
        Self(w)
    }

    pub const fn from_words(words: [u64; 8]) -> Self {
        Self(words)
    }
    pub const fn words(&self) -> [u64; 8] {
        self.0
    }
    pub const fn is_present(&self) -> bool {
        self.0[0] & PRESENT != 0
    }
    pub const fn did(&self) -> u16 {
        self.0[1] as u16
    }
    pub const fn pgtt(&self) -> u8 {
        ((self.0[0] >> Self::PGTT_SHIFT) & 0b111) as u8
    }
    pub const fn page_snoop(&self) -> bool {
        self.0[1] & Self::PGSNP != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_root_and_context_entries_place_fields_per_spec() {
        let root = RootEntry::legacy(PhysAddr::new(0x1234_5000));
        assert_eq!(root.words(), [0x1234_5001, 0]);
        assert_eq!(root.context_table(), Some(PhysAddr::new(0x1234_5000)));
        assert!(!RootEntry::NOT_PRESENT.is_present());

        let ctx = ContextEntry::new(
            PhysAddr::new(0xabc_d000),
            2,
            0x1234,
            TranslationType::AllowDeviceTlb,
        );
        assert_eq!(ctx.words(), [0xabc_d000 | 0b0100 | 1, 2 | (0x1234 << 8)]);
        assert_eq!(
            (ctx.did(), ctx.aw(), ctx.translation_type()),
            (0x1234, 2, 1)
        );
        assert_eq!(ctx.slptptr(), PhysAddr::new(0xabc_d000));
        assert_eq!(ctx.with_fault_processing_disabled().words()[0] & 2, 2);
    }

    #[test]
    fn scalable_entries_place_fields_per_spec() {
        let root = RootEntry::scalable(Some(PhysAddr::new(0x1000)), None);
        assert_eq!(root.words(), [0x1001, 0]);
        assert_eq!(root.upper_context_table(), None);
        let both = RootEntry::scalable(Some(PhysAddr::new(0x1000)), Some(PhysAddr::new(0x2000)));
        assert_eq!(both.upper_context_table(), Some(PhysAddr::new(0x2000)));

        let ctx = ScalableContextEntry::new(PhysAddr::new(0x5000), 2, 0).with_pasid_enable();
        assert_eq!(ctx.words(), [0x5000 | (2 << 9) | 0b1000 | 1, 0, 0, 0]);
        assert_eq!(ctx.pdts(), 2);
        assert_eq!(ctx.with_device_tlb().words()[0] & 0b100, 0b100);

        let dir = PasidDirEntry::new(PhysAddr::new(0x7000));
        assert_eq!(dir.raw(), 0x7001);

        let sl = PasidEntry::second_level(PhysAddr::new(0x9000), 1, 7).with_page_snoop();
        assert_eq!(sl.words()[0], 0x9000 | (0b010 << 6) | (1 << 2) | 1);
        assert_eq!(sl.words()[1], 7 | (1 << 24));
        assert_eq!((sl.pgtt(), sl.did(), sl.page_snoop()), (2, 7, true));

        let fl = PasidEntry::first_level(PhysAddr::new(0xa000), 5, 9).with_page_walk_snoop();
        assert_eq!(fl.words()[0], (0b001 << 6) | 1);
        assert_eq!(fl.words()[1], 9 | (1 << 23));
        assert_eq!(fl.words()[2], 0xa000 | (1 << 2) | (1 << 5));
    }
}
