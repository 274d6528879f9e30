//! The SMMUv3 in-memory configuration structures (Arm IHI 0070, chapter 5):
//! level-1 stream-table descriptors (5.1), stream table entries (5.2),
//! level-1 context descriptors (5.3) and context descriptors (5.4).
//!
//! Each is a `#[repr(C)]` array of little-endian 64-bit words with a
//! compile-time size check. Word 0 of an STE holds `V` and `Config`, word 0
//! of a CD holds `V`: the driver writes every other word first and word 0
//! last (3.21.3 "Configuration structure update procedure").

use sluice_hal::PhysAddr;

/// Bits `hi:lo` of `raw`.
const fn bits(raw: u64, hi: u32, lo: u32) -> u64 {
    (raw >> lo) & (u64::MAX >> (63 - (hi - lo)))
}

/// Address bits 51:6 (stream table / STE / L2 STE pointers).
const ADDR_51_6: u64 = 0x000f_ffff_ffff_ffc0;
/// Address bits 51:4 (TTB0, S2TTB).
const ADDR_51_4: u64 = 0x000f_ffff_ffff_fff0;
/// Address bits 51:12 (L1CD.L2Ptr).
const ADDR_51_12: u64 = 0x000f_ffff_ffff_f000;

/// Bytes of one STE and one CD.
pub const STE_SIZE: u64 = 64;
pub const CD_SIZE: u64 = 64;
/// STEs (and CDs) in one 4 KiB table page.
pub const ENTRIES_PER_PAGE: u64 = 64;
/// log2 of [`ENTRIES_PER_PAGE`]: the StreamID bits a level-2 stream table
/// page resolves (STRTAB_BASE_CFG.SPLIT = 6) and the SubstreamID bits a
/// level-2 CD table page resolves (STE.S1Fmt = 0b01).
pub const PAGE_INDEX_BITS: u32 = 6;
/// 8-byte level-1 descriptors in one 4 KiB page.
pub const L1_ENTRIES_PER_PAGE: u64 = 512;

/// Cacheability of the SMMU's accesses to a structure (STE.S1CIR/S1COR,
/// S2IR0/S2OR0, CD.IR0/OR0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum Cacheability {
    #[default]
    NonCacheable = 0b00,
    WriteBackAllocate = 0b01,
    WriteThrough = 0b10,
    WriteBackNoWriteAllocate = 0b11,
}

/// Shareability of the SMMU's accesses to a structure (STE.S1CSH, S2SH0,
/// CD.SH0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum Shareable {
    NonShareable = 0b00,
    #[default]
    OuterShareable = 0b10,
    InnerShareable = 0b11,
}

/// The attributes of a table walk: write-back inner shareable for a
/// coherent SMMU (IDR0.COHACC = 1), non-cacheable otherwise (where
/// shareability is ignored and behaves as outer shareable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalkAttrs {
    pub inner: Cacheability,
    pub outer: Cacheability,
    pub share: Shareable,
}

impl WalkAttrs {
    pub const fn for_coherency(coherent: bool) -> Self {
        if coherent {
            Self {
                inner: Cacheability::WriteBackAllocate,
                outer: Cacheability::WriteBackAllocate,
                share: Shareable::InnerShareable,
            }
        } else {
            Self {
                inner: Cacheability::NonCacheable,
                outer: Cacheability::NonCacheable,
                share: Shareable::OuterShareable,
            }
        }
    }
}

/// STE.Config (5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SteConfig {
    /// 0b000: abort, no event recorded.
    Abort = 0b000,
    /// 0b100: both stages bypass.
    Bypass = 0b100,
    /// 0b101: stage 1 translates, stage 2 bypasses.
    Stage1 = 0b101,
    /// 0b110: stage 1 bypasses, stage 2 translates.
    Stage2 = 0b110,
    /// 0b111: both stages translate (nested).
    Nested = 0b111,
}

impl SteConfig {
    /// Decodes Config; reserved 0b0xx encodings behave as abort.
    pub const fn from_bits(bits: u64) -> Self {
        match bits & 0b111 {
            0b100 => Self::Bypass,
            0b101 => Self::Stage1,
            0b110 => Self::Stage2,
            0b111 => Self::Nested,
            _ => Self::Abort,
        }
    }
    pub const fn stage1(self) -> bool {
        matches!(self, Self::Stage1 | Self::Nested)
    }
    pub const fn stage2(self) -> bool {
        matches!(self, Self::Stage2 | Self::Nested)
    }
}

/// STE.S1Fmt (5.2): the layout of the CD table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CdTableFormat {
    /// 0b00: a linear array of 2^S1CDMax CDs (or one CD).
    Linear = 0b00,
    /// 0b01: L1CD pointers to 4 KiB leaf tables of 64 CDs.
    TwoLevel4K = 0b01,
    /// 0b10: L1CD pointers to 64 KiB leaf tables of 1024 CDs.
    TwoLevel64K = 0b10,
}

/// STE.S1DSS (5.2): what happens to traffic without a SubstreamID when
/// substreams are enabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DefaultSubstream {
    /// 0b00: abort with F_STREAM_DISABLED.
    Terminate = 0b00,
    /// 0b01: stage 1 bypassed.
    Bypass = 0b01,
    /// 0b10: translated with CD 0; SubstreamID 0 itself is then refused.
    Substream0 = 0b10,
}

/// The stage-1 part of an STE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SteStage1 {
    /// The CD, linear CD table or L1CD table.
    pub context_ptr: PhysAddr,
    /// S1CDMax: log2 of the number of CDs (0: one CD, no substreams).
    pub cd_max: u8,
    pub format: CdTableFormat,
    pub default_substream: DefaultSubstream,
    /// S1CIR / S1COR / S1CSH: attributes of CD fetches.
    pub cd_attrs: WalkAttrs,
    /// S1STALLD: stage-1 faults never stall (only legal when
    /// IDR0.STALL_MODEL = 0b00).
    pub stall_disable: bool,
}

/// The stage-2 part of an STE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SteStage2 {
    pub vmid: u16,
    /// S2T0SZ: 64 - IPA bits.
    pub t0sz: u8,
    /// S2SL0: starting level (4 KiB granule: 1 = Arm level 1, 2 = level 0).
    pub sl0: u8,
    /// S2IR0 / S2OR0 / S2SH0: attributes of stage-2 table walks.
    pub walk_attrs: WalkAttrs,
    /// S2PS encoding: output size.
    pub ps: u8,
    /// S2TTB: the stage-2 root table.
    pub ttb: PhysAddr,
    /// S2AFFD: access-flag faults disabled.
    pub affd: bool,
    /// S2R: record stage-2 faults as events.
    pub record_faults: bool,
}

/// A stream table entry (5.2), 64 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ste([u64; 8]);

const _: () = assert!(core::mem::size_of::<Ste>() == STE_SIZE as usize);

impl Ste {
    // Word 0.
    pub const V: u64 = 1 << 0;
    pub const CONFIG_SHIFT: u32 = 1;
    pub const S1FMT_SHIFT: u32 = 4;
    pub const S1CDMAX_SHIFT: u32 = 59;
    // Word 1 (bit 64 + n).
    pub const S1DSS_SHIFT: u32 = 0;
    pub const S1CIR_SHIFT: u32 = 2;
    pub const S1COR_SHIFT: u32 = 4;
    pub const S1CSH_SHIFT: u32 = 6;
    pub const S1STALLD: u64 = 1 << 27;
    pub const EATS_SHIFT: u32 = 28;
    pub const STRW_SHIFT: u32 = 30;
    pub const SHCFG_SHIFT: u32 = 44;
    /// SHCFG = 0b01: use the incoming shareability.
    pub const SHCFG_INCOMING: u64 = 0b01;
    // Word 2 (bit 128 + n).
    pub const S2T0SZ_SHIFT: u32 = 32;
    pub const S2SL0_SHIFT: u32 = 38;
    pub const S2IR0_SHIFT: u32 = 40;
    pub const S2OR0_SHIFT: u32 = 42;
    pub const S2SH0_SHIFT: u32 = 44;
    pub const S2TG_SHIFT: u32 = 46;
    pub const S2PS_SHIFT: u32 = 48;
    pub const S2AA64: u64 = 1 << 51;
    pub const S2ENDI: u64 = 1 << 52;
    pub const S2AFFD: u64 = 1 << 53;
    pub const S2PTW: u64 = 1 << 54;
    pub const S2HD: u64 = 1 << 55;
    pub const S2HA: u64 = 1 << 56;
    pub const S2S: u64 = 1 << 57;
    pub const S2R: u64 = 1 << 58;

    /// All zero: V = 0, so the SMMU records C_BAD_STE.
    pub const fn invalid() -> Self {
        Self([0; 8])
    }

    /// V = 1, Config = abort: traffic is aborted without an event.
    pub const fn abort() -> Self {
        let mut w = [0; 8];
        w[0] = Self::V | ((SteConfig::Abort as u64) << Self::CONFIG_SHIFT);
        Self(w)
    }

    /// Both stages bypassed (only for streams Sluice deliberately trusts).
    pub const fn bypass() -> Self {
        let mut w = [0; 8];
        w[0] = Self::V | ((SteConfig::Bypass as u64) << Self::CONFIG_SHIFT);
        w[1] = Self::SHCFG_INCOMING << Self::SHCFG_SHIFT;
        Self(w)
    }

    /// Stage 1 translates through the CD(s) of `s1`, stage 2 bypasses.
    pub const fn stage1(s1: SteStage1) -> Self {
        let mut w = [0; 8];
        w[0] = Self::V | ((SteConfig::Stage1 as u64) << Self::CONFIG_SHIFT);
        Self::put_stage1(&mut w, &s1);
        Self(w)
    }

    /// Stage 2 translates with the table of `s2`, stage 1 bypasses.
    pub const fn stage2(s2: SteStage2) -> Self {
        let mut w = [0; 8];
        w[0] = Self::V | ((SteConfig::Stage2 as u64) << Self::CONFIG_SHIFT);
        w[1] = Self::SHCFG_INCOMING << Self::SHCFG_SHIFT;
        Self::put_stage2(&mut w, &s2);
        Self(w)
    }

    /// Both stages: CD pointers and stage-1 tables are IPAs translated by
    /// `s2`.
    pub const fn nested(s1: SteStage1, s2: SteStage2) -> Self {
        let mut w = [0; 8];
        w[0] = Self::V | ((SteConfig::Nested as u64) << Self::CONFIG_SHIFT);
        Self::put_stage1(&mut w, &s1);
        Self::put_stage2(&mut w, &s2);
        Self(w)
    }

    const fn put_stage1(w: &mut [u64; 8], s1: &SteStage1) {
        w[0] |= ((s1.format as u64) << Self::S1FMT_SHIFT)
            | (s1.context_ptr.as_u64() & ADDR_51_6)
            | ((s1.cd_max as u64 & 0x1f) << Self::S1CDMAX_SHIFT);
        w[1] |= ((s1.default_substream as u64) << Self::S1DSS_SHIFT)
            | ((s1.cd_attrs.inner as u64) << Self::S1CIR_SHIFT)
            | ((s1.cd_attrs.outer as u64) << Self::S1COR_SHIFT)
            | ((s1.cd_attrs.share as u64) << Self::S1CSH_SHIFT)
            | (Self::SHCFG_INCOMING << Self::SHCFG_SHIFT);
        if s1.stall_disable {
            w[1] |= Self::S1STALLD;
        }
    }

    const fn put_stage2(w: &mut [u64; 8], s2: &SteStage2) {
        // S2TG = 0b00 (4 KiB), S2ENDI = 0 (little-endian), S2PTW = 0, no
        // HTTU, S2S = 0 (terminate, never stall).
        w[2] = (s2.vmid as u64)
            | ((s2.t0sz as u64 & 0x3f) << Self::S2T0SZ_SHIFT)
            | ((s2.sl0 as u64 & 0b11) << Self::S2SL0_SHIFT)
            | ((s2.walk_attrs.inner as u64) << Self::S2IR0_SHIFT)
            | ((s2.walk_attrs.outer as u64) << Self::S2OR0_SHIFT)
            | ((s2.walk_attrs.share as u64) << Self::S2SH0_SHIFT)
            | ((s2.ps as u64 & 0b111) << Self::S2PS_SHIFT)
            | Self::S2AA64;
        if s2.affd {
            w[2] |= Self::S2AFFD;
        }
        if s2.record_faults {
            w[2] |= Self::S2R;
        }
        w[3] = s2.ttb.as_u64() & ADDR_51_4;
    }

    pub const fn from_words(words: [u64; 8]) -> Self {
        Self(words)
    }
    pub const fn words(&self) -> [u64; 8] {
        self.0
    }

    pub const fn valid(&self) -> bool {
        self.0[0] & Self::V != 0
    }
    pub const fn config(&self) -> SteConfig {
        SteConfig::from_bits(bits(self.0[0], 3, 1))
    }
    pub const fn s1_format(&self) -> u8 {
        bits(self.0[0], 5, 4) as u8
    }
    pub const fn s1_context_ptr(&self) -> PhysAddr {
        PhysAddr::new(self.0[0] & ADDR_51_6)
    }
    pub const fn s1_cd_max(&self) -> u8 {
        bits(self.0[0], 63, 59) as u8
    }
    pub const fn s1_dss(&self) -> u8 {
        bits(self.0[1], 1, 0) as u8
    }
    pub const fn s1_cd_attrs(&self) -> (u8, u8, u8) {
        (
            bits(self.0[1], 3, 2) as u8,
            bits(self.0[1], 5, 4) as u8,
            bits(self.0[1], 7, 6) as u8,
        )
    }
    pub const fn s1_stall_disable(&self) -> bool {
        self.0[1] & Self::S1STALLD != 0
    }
    pub const fn eats(&self) -> u8 {
        bits(self.0[1], 29, 28) as u8
    }
    pub const fn strw(&self) -> u8 {
        bits(self.0[1], 31, 30) as u8
    }
    pub const fn shcfg(&self) -> u8 {
        bits(self.0[1], 45, 44) as u8
    }
    pub const fn s2_vmid(&self) -> u16 {
        bits(self.0[2], 15, 0) as u16
    }
    pub const fn s2_t0sz(&self) -> u8 {
        bits(self.0[2], 37, 32) as u8
    }
    pub const fn s2_sl0(&self) -> u8 {
        bits(self.0[2], 39, 38) as u8
    }
    pub const fn s2_walk_attrs(&self) -> (u8, u8, u8) {
        (
            bits(self.0[2], 41, 40) as u8,
            bits(self.0[2], 43, 42) as u8,
            bits(self.0[2], 45, 44) as u8,
        )
    }
    pub const fn s2_tg(&self) -> u8 {
        bits(self.0[2], 47, 46) as u8
    }
    pub const fn s2_ps(&self) -> u8 {
        bits(self.0[2], 50, 48) as u8
    }
    pub const fn s2_aa64(&self) -> bool {
        self.0[2] & Self::S2AA64 != 0
    }
    pub const fn s2_affd(&self) -> bool {
        self.0[2] & Self::S2AFFD != 0
    }
    pub const fn s2_record(&self) -> bool {
        self.0[2] & Self::S2R != 0
    }
    pub const fn s2_stall(&self) -> bool {
        self.0[2] & Self::S2S != 0
    }
    pub const fn s2_ttb(&self) -> PhysAddr {
        PhysAddr::new(self.0[3] & ADDR_51_4)
    }
}

/// A level-1 stream table descriptor (5.1), 8 bytes.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L1Std(u64);

const _: () = assert!(core::mem::size_of::<L1Std>() == 8);

impl L1Std {
    /// Span = 0: the level-2 table is absent; its StreamIDs are invalid
    /// (C_BAD_STREAMID).
    pub const fn absent() -> Self {
        Self(0)
    }
    /// A level-2 table of 2^`log2_entries` STEs (Span = log2 + 1).
    pub const fn new(l2: PhysAddr, log2_entries: u32) -> Self {
        Self((l2.as_u64() & ADDR_51_6) | ((log2_entries as u64 + 1) & 0x1f))
    }
    pub const fn from_raw(raw: u64) -> Self {
        Self(raw)
    }
    pub const fn raw(self) -> u64 {
        self.0
    }
    pub const fn span(self) -> u8 {
        (self.0 & 0x1f) as u8
    }
    pub const fn l2_ptr(self) -> PhysAddr {
        PhysAddr::new(self.0 & ADDR_51_6)
    }
}

/// A level-1 context descriptor (5.3), 8 bytes.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L1Cd(u64);

const _: () = assert!(core::mem::size_of::<L1Cd>() == 8);

impl L1Cd {
    pub const V: u64 = 1;
    pub const fn new(l2: PhysAddr) -> Self {
        Self((l2.as_u64() & ADDR_51_12) | Self::V)
    }
    pub const fn from_raw(raw: u64) -> Self {
        Self(raw)
    }
    pub const fn raw(self) -> u64 {
        self.0
    }
    pub const fn valid(self) -> bool {
        self.0 & Self::V != 0
    }
    pub const fn l2_ptr(self) -> PhysAddr {
        PhysAddr::new(self.0 & ADDR_51_12)
    }
}

/// The fields of a stage-1 context descriptor that vary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CdParams {
    pub asid: u16,
    /// TTB0: the stage-1 root table.
    pub ttb0: PhysAddr,
    /// T0SZ: 64 - input bits.
    pub t0sz: u8,
    /// IPS encoding: intermediate physical (output) size.
    pub ips: u8,
    /// IR0 / OR0 / SH0: attributes of the table walk.
    pub walk_attrs: WalkAttrs,
    /// MAIR: the eight memory attributes the leaves' AttrIndx selects.
    pub mair: u64,
}

/// A context descriptor (5.4), 64 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cd([u64; 8]);

const _: () = assert!(core::mem::size_of::<Cd>() == CD_SIZE as usize);

impl Cd {
    // Word 0.
    pub const T0SZ_SHIFT: u32 = 0;
    pub const TG0_SHIFT: u32 = 6;
    pub const IR0_SHIFT: u32 = 8;
    pub const OR0_SHIFT: u32 = 10;
    pub const SH0_SHIFT: u32 = 12;
    pub const EPD0: u64 = 1 << 14;
    pub const ENDI: u64 = 1 << 15;
    pub const EPD1: u64 = 1 << 30;
    pub const V: u64 = 1 << 31;
    pub const IPS_SHIFT: u32 = 32;
    pub const AFFD: u64 = 1 << 35;
    pub const WXN: u64 = 1 << 36;
    pub const TBI0: u64 = 1 << 38;
    pub const PAN: u64 = 1 << 40;
    pub const AA64: u64 = 1 << 41;
    pub const HD: u64 = 1 << 42;
    pub const HA: u64 = 1 << 43;
    pub const S: u64 = 1 << 44;
    pub const R: u64 = 1 << 45;
    pub const A: u64 = 1 << 46;
    pub const ASET: u64 = 1 << 47;
    pub const ASID_SHIFT: u32 = 48;

    /// V = 0: the SMMU records C_BAD_CD for traffic using it.
    pub const fn invalid() -> Self {
        Self([0; 8])
    }

    /// A valid VMSAv8-64 CD translating with TTB0 only (EPD1 = 1), 4 KiB
    /// granule, little-endian, faults terminate with abort and are
    /// recorded (S = 0, R = 1, A = 1), no hardware A/D updates, access-flag
    /// faults enabled (the engine writes every leaf with AF set), ASET = 1
    /// (the ASID is private to the SMMU: CPU broadcast TLBIs need not
    /// reach it).
    pub const fn stage1(p: CdParams) -> Self {
        let mut w = [0; 8];
        w[0] = ((p.t0sz as u64 & 0x3f) << Self::T0SZ_SHIFT)
            | ((p.walk_attrs.inner as u64) << Self::IR0_SHIFT)
            | ((p.walk_attrs.outer as u64) << Self::OR0_SHIFT)
            | ((p.walk_attrs.share as u64) << Self::SH0_SHIFT)
            | Self::EPD1
            | Self::V
            | ((p.ips as u64 & 0b111) << Self::IPS_SHIFT)
            | Self::AA64
            | Self::R
            | Self::A
            | Self::ASET
            | ((p.asid as u64) << Self::ASID_SHIFT);
        w[1] = p.ttb0.as_u64() & ADDR_51_4;
        w[3] = p.mair;
        Self(w)
    }

    pub const fn from_words(words: [u64; 8]) -> Self {
        Self(words)
    }
    pub const fn words(&self) -> [u64; 8] {
        self.0
    }

    pub const fn valid(&self) -> bool {
        self.0[0] & Self::V != 0
    }
    pub const fn t0sz(&self) -> u8 {
        bits(self.0[0], 5, 0) as u8
    }
    pub const fn tg0(&self) -> u8 {
        bits(self.0[0], 7, 6) as u8
    }
    pub const fn walk_attrs(&self) -> (u8, u8, u8) {
        (
            bits(self.0[0], 9, 8) as u8,
            bits(self.0[0], 11, 10) as u8,
            bits(self.0[0], 13, 12) as u8,
        )
    }
    pub const fn epd0(&self) -> bool {
        self.0[0] & Self::EPD0 != 0
    }
    pub const fn epd1(&self) -> bool {
        self.0[0] & Self::EPD1 != 0
    }
    pub const fn ips(&self) -> u8 {
        bits(self.0[0], 34, 32) as u8
    }
    pub const fn affd(&self) -> bool {
        self.0[0] & Self::AFFD != 0
    }
    pub const fn aa64(&self) -> bool {
        self.0[0] & Self::AA64 != 0
    }
    pub const fn hardware_updates(&self) -> (bool, bool) {
        (self.0[0] & Self::HA != 0, self.0[0] & Self::HD != 0)
    }
    /// (S, R, A): stall, record, abort.
    pub const fn fault_model(&self) -> (bool, bool, bool) {
        (
            self.0[0] & Self::S != 0,
            self.0[0] & Self::R != 0,
            self.0[0] & Self::A != 0,
        )
    }
    pub const fn aset(&self) -> bool {
        self.0[0] & Self::ASET != 0
    }
    pub const fn asid(&self) -> u16 {
        bits(self.0[0], 63, 48) as u16
    }
    pub const fn ttb0(&self) -> PhysAddr {
        PhysAddr::new(self.0[1] & ADDR_51_4)
    }
    pub const fn mair(&self) -> u64 {
        self.0[3]
    }
}

/// MAIR attribute encodings (Arm ARM, MAIR_EL1) used by Sluice's stage-1
/// tables: index 0 Normal write-back read/write-allocate (inner and
/// outer), index 1 Device-nGnRE, index 2 Normal non-cacheable.
pub mod mair {
    pub const NORMAL_WB: u64 = 0xff;
    pub const DEVICE_NGNRE: u64 = 0x04;
    pub const NORMAL_NC: u64 = 0x44;
    pub const INDEX_NORMAL: u8 = 0;
    pub const INDEX_DEVICE: u8 = 1;
    pub const INDEX_NORMAL_NC: u8 = 2;
    pub const VALUE: u64 = NORMAL_WB | (DEVICE_NGNRE << 8) | (NORMAL_NC << 16);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abort_and_invalid_stes() {
        let a = Ste::abort();
        assert!(a.valid());
        assert_eq!(a.config(), SteConfig::Abort);
        assert_eq!(a.words()[0], 0b0001);
        assert!(a.words()[1..].iter().all(|&w| w == 0));
        assert!(!Ste::invalid().valid());
        let b = Ste::bypass();
        assert_eq!(b.config(), SteConfig::Bypass);
        assert_eq!(b.words()[0], 0b1001);
    }

    #[test]
    fn config_decoding_treats_reserved_values_as_abort() {
        for raw in 0..4 {
            assert_eq!(SteConfig::from_bits(raw), SteConfig::Abort);
        }
        assert!(SteConfig::Nested.stage1() && SteConfig::Nested.stage2());
        assert!(!SteConfig::Stage2.stage1() && SteConfig::Stage2.stage2());
    }

    #[test]
    fn l1_descriptors() {
        let std = L1Std::new(PhysAddr::new(0x1234_5000), 6);
        assert_eq!(std.raw(), 0x1234_5000 | 7);
        assert_eq!(std.span(), 7);
        assert_eq!(std.l2_ptr(), PhysAddr::new(0x1234_5000));
        assert_eq!(L1Std::absent().span(), 0);
        let cd = L1Cd::new(PhysAddr::new(0xabc_d000));
        assert!(cd.valid());
        assert_eq!(cd.raw(), 0xabc_d001);
        assert_eq!(cd.l2_ptr(), PhysAddr::new(0xabc_d000));
    }

    #[test]
    fn mair_value_has_the_three_attributes() {
        assert_eq!(mair::VALUE, 0x44_04_ff);
    }
}
