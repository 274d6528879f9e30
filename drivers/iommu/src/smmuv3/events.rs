//! Event records (Arm IHI 0070, 7.3), 32 bytes each, decoded by name into
//! [`SmmuFault`].
//!
//! Common layout (7.3): event number in bits 7:0, SSV bit 11, SubstreamID
//! 31:12, StreamID 63:32. Translation-related faults (F_TRANSLATION,
//! F_ADDR_SIZE, F_ACCESS, F_PERMISSION, F_WALK_EABT, F_TLB_CONFLICT,
//! F_TRANSL_FORBIDDEN, F_UUT) carry STAG 79:64, Stall 95, PnU 97, InD 98,
//! RnW 99 (1 = read), S2 103, CLASS 105:104, InputAddr 191:128, and IPA
//! 255:204 (stage-2 faults). F_STE_FETCH, F_CD_FETCH, F_VMS_FETCH and
//! F_WALK_EABT carry FetchAddr in 255:195.

use core::fmt;

/// An event number (7.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EventKind {
    /// 0x01: unsupported upstream transaction.
    Uut,
    /// 0x02: StreamID outside the stream table (or an absent level-2
    /// table).
    BadStreamId,
    /// 0x03: external abort fetching an STE.
    SteFetch,
    /// 0x04: the STE is invalid (V = 0) or ILLEGAL.
    BadSte,
    /// 0x05: an ATS translation request was refused.
    BadAtsTreq,
    /// 0x06: traffic on a disabled (sub)stream (S1DSS = terminate,
    /// SubstreamID 0 with S1DSS = substream 0).
    StreamDisabled,
    /// 0x07: an ATS-translated transaction was not allowed.
    TranslForbidden,
    /// 0x08: the SubstreamID is beyond S1CDMax or substreams are off.
    BadSubstreamId,
    /// 0x09: external abort fetching a CD.
    CdFetch,
    /// 0x0a: the CD is invalid (V = 0) or ILLEGAL.
    BadCd,
    /// 0x0b: external abort during a table walk.
    WalkEabt,
    /// 0x10: translation fault (no valid descriptor, address outside the
    /// table's input range).
    Translation,
    /// 0x11: address-size fault (output beyond IPS/PS/OAS).
    AddrSize,
    /// 0x12: access-flag fault.
    Access,
    /// 0x13: permission fault.
    Permission,
    /// 0x20: TLB conflict.
    TlbConflict,
    /// 0x21: configuration cache conflict.
    CfgConflict,
    /// 0x24: a PRI page request (not a fault).
    PageRequest,
    /// 0x25: external abort fetching a VMS.
    VmsFetch,
    /// Any other number (IMPLEMENTATION DEFINED or newer revisions).
    Other(u8),
}

impl EventKind {
    pub const fn from_code(code: u8) -> Self {
        match code {
            0x01 => Self::Uut,
            0x02 => Self::BadStreamId,
            0x03 => Self::SteFetch,
            0x04 => Self::BadSte,
            0x05 => Self::BadAtsTreq,
            0x06 => Self::StreamDisabled,
            0x07 => Self::TranslForbidden,
            0x08 => Self::BadSubstreamId,
            0x09 => Self::CdFetch,
            0x0a => Self::BadCd,
            0x0b => Self::WalkEabt,
            0x10 => Self::Translation,
            0x11 => Self::AddrSize,
            0x12 => Self::Access,
            0x13 => Self::Permission,
            0x20 => Self::TlbConflict,
            0x21 => Self::CfgConflict,
            0x24 => Self::PageRequest,
            0x25 => Self::VmsFetch,
            other => Self::Other(other),
        }
    }

    pub const fn code(self) -> u8 {
        match self {
            Self::Uut => 0x01,
            Self::BadStreamId => 0x02,
            Self::SteFetch => 0x03,
            Self::BadSte => 0x04,
            Self::BadAtsTreq => 0x05,
            Self::StreamDisabled => 0x06,
            Self::TranslForbidden => 0x07,
            Self::BadSubstreamId => 0x08,
            Self::CdFetch => 0x09,
            Self::BadCd => 0x0a,
            Self::WalkEabt => 0x0b,
            Self::Translation => 0x10,
            Self::AddrSize => 0x11,
            Self::Access => 0x12,
            Self::Permission => 0x13,
            Self::TlbConflict => 0x20,
            Self::CfgConflict => 0x21,
            Self::PageRequest => 0x24,
            Self::VmsFetch => 0x25,
            Self::Other(code) => code,
        }
    }

    /// The spec's name.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Uut => "F_UUT",
            Self::BadStreamId => "C_BAD_STREAMID",
            Self::SteFetch => "F_STE_FETCH",
            Self::BadSte => "C_BAD_STE",
            Self::BadAtsTreq => "F_BAD_ATS_TREQ",
            Self::StreamDisabled => "F_STREAM_DISABLED",
            Self::TranslForbidden => "F_TRANSL_FORBIDDEN",
            Self::BadSubstreamId => "C_BAD_SUBSTREAMID",
            Self::CdFetch => "F_CD_FETCH",
            Self::BadCd => "C_BAD_CD",
            Self::WalkEabt => "F_WALK_EABT",
            Self::Translation => "F_TRANSLATION",
            Self::AddrSize => "F_ADDR_SIZE",
            Self::Access => "F_ACCESS",
            Self::Permission => "F_PERMISSION",
            Self::TlbConflict => "F_TLB_CONFLICT",
            Self::CfgConflict => "F_CFG_CONFLICT",
            Self::PageRequest => "E_PAGE_REQUEST",
            Self::VmsFetch => "F_VMS_FETCH",
            Self::Other(_) => "unknown event",
        }
    }

    /// Whether the record carries InputAddr, RnW, S2 and CLASS.
    pub const fn has_input_address(self) -> bool {
        matches!(
            self,
            Self::Uut
                | Self::TranslForbidden
                | Self::WalkEabt
                | Self::Translation
                | Self::AddrSize
                | Self::Access
                | Self::Permission
                | Self::TlbConflict
        )
    }

    /// Whether the record carries FetchAddr.
    pub const fn has_fetch_address(self) -> bool {
        matches!(
            self,
            Self::SteFetch | Self::CdFetch | Self::WalkEabt | Self::VmsFetch
        )
    }

    /// Whether the event reports a malformed configuration structure (a
    /// Sluice bug or memory corruption) rather than a device accessing
    /// what it may not.
    pub const fn is_configuration_error(self) -> bool {
        matches!(
            self,
            Self::BadSte
                | Self::BadCd
                | Self::SteFetch
                | Self::CdFetch
                | Self::WalkEabt
                | Self::VmsFetch
                | Self::CfgConflict
                | Self::TlbConflict
        )
    }
}

/// CLASS (7.3): what the faulting access was doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultClass {
    /// 0b00: fetching a CD (through stage 2).
    Cd,
    /// 0b01: fetching a stage-1 table descriptor (through stage 2).
    TableWalk,
    /// 0b10: the input address itself.
    Input,
    /// 0b11: reserved.
    Reserved,
}

impl FaultClass {
    pub const fn from_bits(bits: u64) -> Self {
        match bits & 0b11 {
            0b00 => Self::Cd,
            0b01 => Self::TableWalk,
            0b10 => Self::Input,
            _ => Self::Reserved,
        }
    }
    pub const fn bits(self) -> u64 {
        match self {
            Self::Cd => 0b00,
            Self::TableWalk => 0b01,
            Self::Input => 0b10,
            Self::Reserved => 0b11,
        }
    }
}

/// One raw event record.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EventRecord([u64; 4]);

const _: () = assert!(core::mem::size_of::<EventRecord>() == 32);

impl EventRecord {
    pub const SSV: u64 = 1 << 11;
    pub const SSID_SHIFT: u32 = 12;
    pub const SID_SHIFT: u32 = 32;
    /// Word 1 (bit 64 + n).
    pub const STALL: u64 = 1 << 31;
    pub const PNU: u64 = 1 << 33;
    pub const IND: u64 = 1 << 34;
    pub const RNW: u64 = 1 << 35;
    pub const S2: u64 = 1 << 39;
    pub const CLASS_SHIFT: u32 = 40;
    /// Word 3: IPA bits 55:12, FetchAddr bits 55:3.
    pub const IPA_MASK: u64 = 0x00ff_ffff_ffff_f000;
    pub const FETCH_MASK: u64 = 0x00ff_ffff_ffff_fff8;

    pub const fn from_words(words: [u64; 4]) -> Self {
        Self(words)
    }
    pub const fn words(&self) -> [u64; 4] {
        self.0
    }
    pub const fn kind(&self) -> EventKind {
        EventKind::from_code(self.0[0] as u8)
    }
    pub const fn stream_id(&self) -> u32 {
        (self.0[0] >> Self::SID_SHIFT) as u32
    }
    pub const fn substream_id(&self) -> Option<u32> {
        if self.0[0] & Self::SSV != 0 {
            Some(((self.0[0] >> Self::SSID_SHIFT) & 0xf_ffff) as u32)
        } else {
            None
        }
    }

    /// Decodes the fields the record's event number defines.
    pub fn decode(&self) -> SmmuFault {
        let kind = self.kind();
        let with_input = kind.has_input_address();
        let stage2 = with_input && self.0[1] & Self::S2 != 0;
        SmmuFault {
            kind,
            stream_id: self.stream_id(),
            substream_id: self.substream_id(),
            address: with_input.then_some(self.0[2]),
            access: with_input.then(|| {
                if self.0[1] & Self::RNW != 0 {
                    Access::Read
                } else {
                    Access::Write
                }
            }),
            privileged: with_input && self.0[1] & Self::PNU != 0,
            instruction: with_input && self.0[1] & Self::IND != 0,
            stage2,
            class: with_input.then_some(FaultClass::from_bits(self.0[1] >> Self::CLASS_SHIFT)),
            ipa: stage2.then_some(self.0[3] & Self::IPA_MASK),
            fetch_address: kind
                .has_fetch_address()
                .then_some(self.0[3] & Self::FETCH_MASK),
            raw: self.0,
        }
    }
}

/// Whether a faulting transaction read or wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// A decoded event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmmuFault {
    pub kind: EventKind,
    pub stream_id: u32,
    /// The SubstreamID (PASID) the transaction carried, if any.
    pub substream_id: Option<u32>,
    /// InputAddr: the address the device used (a VA for stage-1 faults,
    /// an IPA for stage-2-only streams).
    pub address: Option<u64>,
    pub access: Option<Access>,
    pub privileged: bool,
    pub instruction: bool,
    /// The fault happened at stage 2.
    pub stage2: bool,
    pub class: Option<FaultClass>,
    /// The IPA that faulted at stage 2.
    pub ipa: Option<u64>,
    /// The structure or descriptor address whose fetch aborted.
    pub fetch_address: Option<u64>,
    pub raw: [u64; 4],
}

impl fmt::Display for SmmuFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} from stream {:#x}", self.kind.name(), self.stream_id)?;
        if let Some(ssid) = self.substream_id {
            write!(f, " substream {ssid:#x}")?;
        }
        if let (Some(addr), Some(access)) = (self.address, self.access) {
            let what = match access {
                Access::Read => "read",
                Access::Write => "write",
            };
            write!(f, ": {what} of {addr:#x}")?;
            if self.stage2 {
                f.write_str(" at stage 2")?;
                if let Some(ipa) = self.ipa {
                    write!(f, " (IPA {ipa:#x})")?;
                }
            }
        }
        if let Some(fetch) = self.fetch_address {
            write!(f, ", fetching {fetch:#x}")?;
        }
        if let EventKind::Other(code) = self.kind {
            write!(f, " (event {code:#x})")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use alloc::format;

    use super::*;

    #[test]
    fn kinds_roundtrip_through_their_codes() {
        for code in 0..=0xffu8 {
            assert_eq!(EventKind::from_code(code).code(), code);
        }
        assert_eq!(EventKind::from_code(0x10).name(), "F_TRANSLATION");
        assert_eq!(EventKind::from_code(0x02).name(), "C_BAD_STREAMID");
        assert_eq!(EventKind::from_code(0x99), EventKind::Other(0x99));
    }

    #[test]
    fn translation_fault_fields() {
        let rec = EventRecord::from_words([
            0x10 | EventRecord::SSV | (5 << 12) | (0x42 << 32),
            EventRecord::S2 | (0b10 << 40),
            0xdead_b000,
            0x1234_5000,
        ]);
        let f = rec.decode();
        assert_eq!(f.kind, EventKind::Translation);
        assert_eq!((f.stream_id, f.substream_id), (0x42, Some(5)));
        assert_eq!(f.address, Some(0xdead_b000));
        assert_eq!(f.access, Some(Access::Write), "RnW = 0");
        assert!(f.stage2);
        assert_eq!(f.class, Some(FaultClass::Input));
        assert_eq!(f.ipa, Some(0x1234_5000));
        assert_eq!(f.fetch_address, None);
        assert_eq!(
            format!("{f}"),
            "F_TRANSLATION from stream 0x42 substream 0x5: write of 0xdeadb000 at stage 2 \
             (IPA 0x12345000)"
        );
    }

    #[test]
    fn configuration_events_have_no_address() {
        let f = EventRecord::from_words([0x04 | (7 << 32), 0, 0x1111, 0x2222]).decode();
        assert_eq!(f.kind, EventKind::BadSte);
        assert_eq!(f.substream_id, None);
        assert_eq!((f.address, f.access, f.fetch_address), (None, None, None));
        assert!(f.kind.is_configuration_error());
        let fetch = EventRecord::from_words([0x09 | (3 << 32), 0, 0, 0x8000_0048]).decode();
        assert_eq!(fetch.fetch_address, Some(0x8000_0048));
        assert_eq!(
            format!("{fetch}"),
            "F_CD_FETCH from stream 0x3, fetching 0x80000048"
        );
    }
}
