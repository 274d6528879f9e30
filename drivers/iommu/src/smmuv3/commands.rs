//! Command-queue entries (Arm IHI 0070, chapter 4 "Commands"), 16 bytes
//! each.
//!
//! Layouts: opcode in bits 7:0 of every command (4.1.1); StreamID in bits
//! 63:32 of the configuration-invalidation commands (4.3); VMID in 47:32,
//! ASID in 63:48, NUM in 16:12, SCALE in 24:20, and in the second word
//! Leaf bit 0, TTL 9:8, TG 11:10 and the address in 63:12 for the TLB
//! invalidations (4.4); CS 13:12, MSH 23:22, MSIAttr 27:24, MSIData 63:32
//! and MSIAddress 51:2 for CMD_SYNC (4.7.3).

use core::fmt;

/// A command opcode (4.1.1).
pub mod opcode {
    pub const PREFETCH_CONFIG: u8 = 0x01;
    pub const PREFETCH_ADDR: u8 = 0x02;
    pub const CFGI_STE: u8 = 0x03;
    /// Also CMD_CFGI_ALL, with Range = 31.
    pub const CFGI_STE_RANGE: u8 = 0x04;
    pub const CFGI_CD: u8 = 0x05;
    pub const CFGI_CD_ALL: u8 = 0x06;
    pub const CFGI_VMS_PIDM: u8 = 0x07;
    pub const TLBI_NH_ALL: u8 = 0x10;
    pub const TLBI_NH_ASID: u8 = 0x11;
    pub const TLBI_NH_VA: u8 = 0x12;
    pub const TLBI_NH_VAA: u8 = 0x13;
    pub const TLBI_EL3_ALL: u8 = 0x18;
    pub const TLBI_EL3_VA: u8 = 0x1a;
    pub const TLBI_EL2_ALL: u8 = 0x20;
    pub const TLBI_EL2_ASID: u8 = 0x21;
    pub const TLBI_EL2_VA: u8 = 0x22;
    pub const TLBI_EL2_VAA: u8 = 0x23;
    pub const TLBI_S12_VMALL: u8 = 0x28;
    pub const TLBI_S2_IPA: u8 = 0x2a;
    pub const TLBI_NSNH_ALL: u8 = 0x30;
    pub const ATC_INV: u8 = 0x40;
    pub const PRI_RESP: u8 = 0x41;
    pub const RESUME: u8 = 0x44;
    pub const STALL_TERM: u8 = 0x45;
    pub const SYNC: u8 = 0x46;

    /// The spec's name of an opcode, for logs.
    pub const fn name(op: u8) -> &'static str {
        match op {
            PREFETCH_CONFIG => "CMD_PREFETCH_CONFIG",
            PREFETCH_ADDR => "CMD_PREFETCH_ADDR",
            CFGI_STE => "CMD_CFGI_STE",
            CFGI_STE_RANGE => "CMD_CFGI_STE_RANGE",
            CFGI_CD => "CMD_CFGI_CD",
            CFGI_CD_ALL => "CMD_CFGI_CD_ALL",
            CFGI_VMS_PIDM => "CMD_CFGI_VMS_PIDM",
            TLBI_NH_ALL => "CMD_TLBI_NH_ALL",
            TLBI_NH_ASID => "CMD_TLBI_NH_ASID",
            TLBI_NH_VA => "CMD_TLBI_NH_VA",
            TLBI_NH_VAA => "CMD_TLBI_NH_VAA",
            TLBI_EL3_ALL => "CMD_TLBI_EL3_ALL",
            TLBI_EL3_VA => "CMD_TLBI_EL3_VA",
            TLBI_EL2_ALL => "CMD_TLBI_EL2_ALL",
            TLBI_EL2_ASID => "CMD_TLBI_EL2_ASID",
            TLBI_EL2_VA => "CMD_TLBI_EL2_VA",
            TLBI_EL2_VAA => "CMD_TLBI_EL2_VAA",
            TLBI_S12_VMALL => "CMD_TLBI_S12_VMALL",
            TLBI_S2_IPA => "CMD_TLBI_S2_IPA",
            TLBI_NSNH_ALL => "CMD_TLBI_NSNH_ALL",
            ATC_INV => "CMD_ATC_INV",
            PRI_RESP => "CMD_PRI_RESP",
            RESUME => "CMD_RESUME",
            STALL_TERM => "CMD_STALL_TERM",
            SYNC => "CMD_SYNC",
            _ => "unknown command",
        }
    }
}

/// Range = 31 in CMD_CFGI_STE_RANGE: every StreamID (CMD_CFGI_ALL, 4.3.3).
pub const CFGI_RANGE_ALL: u8 = 31;

/// The range form of an address-based TLB invalidation (4.4.1.1): with
/// TG ≠ 0, `(NUM + 1) * 2^SCALE` granules starting at the address are
/// invalidated. Needs SMMU_IDR3.RIL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlbiRange {
    /// NUM, 5 bits.
    pub num: u8,
    /// SCALE, 5 bits (without SMMU_IDR5.DS).
    pub scale: u8,
}

impl TlbiRange {
    /// TG = 0b01: 4 KiB granule.
    pub const TG_4K: u64 = 0b01;

    /// Pages covered.
    pub const fn pages(self) -> u64 {
        (self.num as u64 + 1) << self.scale
    }

    /// The encoding for exactly `pages` pages (≥ 2: a one-page range with
    /// no level hint is reserved and raises CERROR_ILL), or `None` when
    /// `pages` is not of the form `(NUM + 1) * 2^SCALE`.
    pub const fn for_pages(pages: u64) -> Option<Self> {
        if pages < 2 {
            return None;
        }
        let scale = pages.trailing_zeros();
        let num = pages >> scale;
        if num > 32 || scale > 31 {
            return None;
        }
        Some(Self {
            num: (num - 1) as u8,
            scale: scale as u8,
        })
    }
}

/// CMD_SYNC's completion signal (CS, 4.7.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncSignal {
    /// SIG_NONE: completion is seen by CMDQ_CONS moving past the command.
    None,
    /// SIG_IRQ: also writes MSIData to MSIAddress (32 bits).
    Msi { address: u64, data: u32 },
}

/// One command, 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Command([u64; 2]);

const _: () = assert!(core::mem::size_of::<Command>() == 16);

impl Command {
    const SID_SHIFT: u32 = 32;
    const SSID_SHIFT: u32 = 12;
    const VMID_SHIFT: u32 = 32;
    const ASID_SHIFT: u32 = 48;
    const NUM_SHIFT: u32 = 12;
    const SCALE_SHIFT: u32 = 20;
    const LEAF: u64 = 1;
    const TG_SHIFT: u32 = 10;
    const VA_MASK: u64 = !0xfff;
    const IPA_MASK: u64 = 0x000f_ffff_ffff_f000;
    const CS_SHIFT: u32 = 12;
    const CS_SIG_IRQ: u64 = 0b01;
    /// MSH = inner shareable, MSIAttr = Normal write-back (0xf): the MSI
    /// is a plain memory write the CPU polls.
    const MSH_SHIFT: u32 = 22;
    const MSIATTR_SHIFT: u32 = 24;
    const MSI_DATA_SHIFT: u32 = 32;
    const MSI_ADDR_MASK: u64 = 0x000f_ffff_ffff_fffc;

    pub const fn from_words(words: [u64; 2]) -> Self {
        Self(words)
    }
    pub const fn words(&self) -> [u64; 2] {
        self.0
    }
    pub const fn opcode(&self) -> u8 {
        self.0[0] as u8
    }
    pub const fn name(&self) -> &'static str {
        opcode::name(self.opcode())
    }

    const fn op(op: u8) -> u64 {
        op as u64
    }

    /// CMD_CFGI_STE (4.3.1): the STE of `sid` (`leaf`), or also the
    /// level-1 descriptor leading to it (`!leaf`).
    pub const fn cfgi_ste(sid: u32, leaf: bool) -> Self {
        Self([
            Self::op(opcode::CFGI_STE) | ((sid as u64) << Self::SID_SHIFT),
            if leaf { Self::LEAF } else { 0 },
        ])
    }

    /// CMD_CFGI_STE_RANGE (4.3.2): the 2^(`range` + 1) STEs (and level-1
    /// descriptors) whose StreamIDs share `sid`'s bits above `range`.
    pub const fn cfgi_ste_range(sid: u32, range: u8) -> Self {
        Self([
            Self::op(opcode::CFGI_STE_RANGE) | ((sid as u64) << Self::SID_SHIFT),
            range as u64 & 0x1f,
        ])
    }

    /// CMD_CFGI_ALL (4.3.3): every STE, L1STD and CD.
    pub const fn cfgi_all() -> Self {
        Self::cfgi_ste_range(0, CFGI_RANGE_ALL)
    }

    /// CMD_CFGI_CD (4.3.4): the CD of (`sid`, `ssid`) (`leaf`), or also
    /// the L1CD leading to it (`!leaf`).
    pub const fn cfgi_cd(sid: u32, ssid: u32, leaf: bool) -> Self {
        Self([
            Self::op(opcode::CFGI_CD)
                | (((ssid as u64) & 0xf_ffff) << Self::SSID_SHIFT)
                | ((sid as u64) << Self::SID_SHIFT),
            if leaf { Self::LEAF } else { 0 },
        ])
    }

    /// CMD_CFGI_CD_ALL (4.3.5): every CD reached through `sid`'s STE.
    pub const fn cfgi_cd_all(sid: u32) -> Self {
        Self([
            Self::op(opcode::CFGI_CD_ALL) | ((sid as u64) << Self::SID_SHIFT),
            0,
        ])
    }

    /// CMD_TLBI_NH_ALL (4.4.2.1): every stage-1 NS-EL1 entry of `vmid`.
    pub const fn tlbi_nh_all(vmid: u16) -> Self {
        Self([
            Self::op(opcode::TLBI_NH_ALL) | ((vmid as u64) << Self::VMID_SHIFT),
            0,
        ])
    }

    /// CMD_TLBI_NH_ASID (4.4.2.2): non-global stage-1 entries of
    /// (`vmid`, `asid`).
    pub const fn tlbi_nh_asid(vmid: u16, asid: u16) -> Self {
        Self([
            Self::op(opcode::TLBI_NH_ASID)
                | ((vmid as u64) << Self::VMID_SHIFT)
                | ((asid as u64) << Self::ASID_SHIFT),
            0,
        ])
    }

    /// CMD_TLBI_NH_VA (4.4.2.4): stage-1 entries of (`vmid`, `asid`) for
    /// `va`, or for the pages of `range` starting at `va`; `leaf`: only
    /// last-level entries (walk caches kept).
    pub const fn tlbi_nh_va(
        vmid: u16,
        asid: u16,
        va: u64,
        leaf: bool,
        range: Option<TlbiRange>,
    ) -> Self {
        let w0 = Self::op(opcode::TLBI_NH_VA)
            | ((vmid as u64) << Self::VMID_SHIFT)
            | ((asid as u64) << Self::ASID_SHIFT);
        Self::with_address(w0, va & Self::VA_MASK, leaf, range)
    }

    /// CMD_TLBI_S2_IPA (4.4.3.1): stage-2 entries of `vmid` for `ipa` (or
    /// the range starting there).
    pub const fn tlbi_s2_ipa(vmid: u16, ipa: u64, leaf: bool, range: Option<TlbiRange>) -> Self {
        let w0 = Self::op(opcode::TLBI_S2_IPA) | ((vmid as u64) << Self::VMID_SHIFT);
        Self::with_address(w0, ipa & Self::IPA_MASK, leaf, range)
    }

    const fn with_address(w0: u64, addr: u64, leaf: bool, range: Option<TlbiRange>) -> Self {
        let mut w0 = w0;
        let mut w1 = addr;
        if leaf {
            w1 |= Self::LEAF;
        }
        if let Some(r) = range {
            w0 |= ((r.num as u64 & 0x1f) << Self::NUM_SHIFT)
                | ((r.scale as u64 & 0x1f) << Self::SCALE_SHIFT);
            // TTL = 0: no level hint.
            w1 |= TlbiRange::TG_4K << Self::TG_SHIFT;
        }
        Self([w0, w1])
    }

    /// CMD_TLBI_S12_VMALL (4.4.3.2): every entry of `vmid`, both stages.
    pub const fn tlbi_s12_vmall(vmid: u16) -> Self {
        Self([
            Self::op(opcode::TLBI_S12_VMALL) | ((vmid as u64) << Self::VMID_SHIFT),
            0,
        ])
    }

    /// CMD_TLBI_EL2_ALL (4.4.2.7): every EL2 entry (needs IDR0.HYP).
    pub const fn tlbi_el2_all() -> Self {
        Self([Self::op(opcode::TLBI_EL2_ALL), 0])
    }

    /// CMD_TLBI_NSNH_ALL (4.4.4.1): every Non-secure non-EL2 entry.
    pub const fn tlbi_nsnh_all() -> Self {
        Self([Self::op(opcode::TLBI_NSNH_ALL), 0])
    }

    /// CMD_SYNC (4.7.3).
    pub const fn sync(signal: SyncSignal) -> Self {
        match signal {
            SyncSignal::None => Self([Self::op(opcode::SYNC), 0]),
            SyncSignal::Msi { address, data } => Self([
                Self::op(opcode::SYNC)
                    | (Self::CS_SIG_IRQ << Self::CS_SHIFT)
                    | (0b11 << Self::MSH_SHIFT)
                    | (0xf << Self::MSIATTR_SHIFT)
                    | ((data as u64) << Self::MSI_DATA_SHIFT),
                address & Self::MSI_ADDR_MASK,
            ]),
        }
    }
}

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}({:#018x}, {:#018x})",
            self.name(),
            self.0[0],
            self.0[1]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_invalidations() {
        let c = Command::cfgi_ste(0x1234, true);
        assert_eq!(c.words(), [0x0000_1234_0000_0003, 1]);
        assert_eq!(Command::cfgi_ste(7, false).words()[1], 0);
        assert_eq!(Command::cfgi_all().words(), [0x04, 31]);
        assert_eq!(
            Command::cfgi_ste_range(0x40, 5).words(),
            [0x0000_0040_0000_0004, 5]
        );
        let cd = Command::cfgi_cd(0x10, 0x3, true);
        assert_eq!(cd.words(), [0x0000_0010_0000_3005, 1]);
        assert_eq!(Command::cfgi_cd_all(9).words(), [0x0000_0009_0000_0006, 0]);
    }

    #[test]
    fn tlb_invalidations() {
        assert_eq!(
            Command::tlbi_nh_asid(0, 0x1234).words(),
            [0x1234_0000_0000_0011, 0]
        );
        let va = Command::tlbi_nh_va(0, 7, 0x4000_1fff, true, None);
        assert_eq!(va.words(), [0x0007_0000_0000_0012, 0x4000_1001]);
        let ranged = Command::tlbi_nh_va(
            0,
            7,
            0x4000_0000,
            false,
            Some(TlbiRange { num: 24, scale: 2 }),
        );
        assert_eq!(
            ranged.words()[0],
            0x0007_0000_0000_0012 | (24 << 12) | (2 << 20)
        );
        assert_eq!(ranged.words()[1], 0x4000_0000 | (0b01 << 10));
        let ipa = Command::tlbi_s2_ipa(5, 0xffff_8000_0020_0000, true, None);
        assert_eq!(ipa.words(), [0x0000_0005_0000_002a, 0x000f_8000_0020_0001]);
        assert_eq!(
            Command::tlbi_s12_vmall(3).words(),
            [0x0000_0003_0000_0028, 0]
        );
        assert_eq!(Command::tlbi_nsnh_all().opcode(), opcode::TLBI_NSNH_ALL);
    }

    #[test]
    fn sync_with_and_without_msi() {
        assert_eq!(Command::sync(SyncSignal::None).words(), [0x46, 0]);
        let msi = Command::sync(SyncSignal::Msi {
            address: 0x8000_1234,
            data: 0xcafe,
        });
        assert_eq!(msi.words()[0] & 0xff, 0x46);
        assert_eq!((msi.words()[0] >> 12) & 0b11, 0b01, "CS = SIG_IRQ");
        assert_eq!(msi.words()[0] >> 32, 0xcafe);
        assert_eq!(msi.words()[1], 0x8000_1234);
        assert_eq!(msi.name(), "CMD_SYNC");
    }

    #[test]
    fn range_encodings() {
        assert_eq!(TlbiRange::for_pages(1), None, "reserved without TTL");
        let r = TlbiRange::for_pages(100).unwrap();
        assert_eq!((r.num, r.scale), (24, 2));
        assert_eq!(r.pages(), 100);
        assert_eq!(
            TlbiRange::for_pages(33),
            None,
            "33 = 33 * 2^0, NUM too large"
        );
        assert_eq!(TlbiRange::for_pages(1 << 20).unwrap().pages(), 1 << 20);
    }
}
