//! Capability lists: the conventional list reached from offset 0x34 (PCI
//! 3.0 §6.7) and the PCI Express extended list at 0x100 (PCIe Base 6.0
//! §7.6). Both come from devices, so both walks stop on loops, on pointers
//! into the header or past the end of the space, and on misaligned
//! pointers, recording which of these happened.
//!
//! PCI 3.0 §6.7 reserves the low two bits of a capability pointer (they
//! must be zero; software is told to mask them). A device that sets them
//! is out of spec, and its list is more likely corrupt than merely
//! sloppy, so the walk stops there with [`CapError::Misaligned`] rather
//! than guessing: capabilities found before it are kept.

use alloc::vec::Vec;
use core::fmt;

use bitflags::bitflags;

use crate::address::PciAddress;
use crate::config::{
    CAPABILITIES_POINTER, ConfigError, ConfigSpace, LEGACY_CONFIG_SPACE_SIZE, STATUS,
    STATUS_CAPABILITIES_LIST,
};

/// Conventional capability IDs (PCI Code and ID Assignment Spec 1.11 §2).
pub mod cap_id {
    pub const POWER_MANAGEMENT: u8 = 0x01;
    pub const MSI: u8 = 0x05;
    pub const PCIX: u8 = 0x07;
    pub const VENDOR_SPECIFIC: u8 = 0x09;
    pub const PCI_EXPRESS: u8 = 0x10;
    pub const MSIX: u8 = 0x11;
}

/// Extended capability IDs (PCI Code and ID Assignment Spec 1.11 §3).
pub mod ext_cap_id {
    pub const AER: u16 = 0x0001;
    pub const ACS: u16 = 0x000d;
    pub const ARI: u16 = 0x000e;
    pub const ATS: u16 = 0x000f;
    pub const SRIOV: u16 = 0x0010;
    pub const PRI: u16 = 0x0013;
    pub const PASID: u16 = 0x001b;
}

/// First offset after the type 0/1 header; conventional capabilities live in
/// `0x40..=0xfc`.
pub const FIRST_CAP_OFFSET: u16 = 0x40;
pub const FIRST_EXT_CAP_OFFSET: u16 = 0x100;
const LAST_EXT_CAP_OFFSET: u16 = 0xffc;
/// At most one capability per dword of the region each list may use.
pub const MAX_CAPS: usize = ((LEGACY_CONFIG_SPACE_SIZE - FIRST_CAP_OFFSET) / 4) as usize;
pub const MAX_EXT_CAPS: usize = ((LAST_EXT_CAP_OFFSET + 4 - FIRST_EXT_CAP_OFFSET) / 4) as usize;

/// Why a capability walk stopped early. `from` is the offset of the
/// pointer (0x34, or the capability whose next field held it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapError {
    /// Pointer into the standard header (below 0x40, or below 0x100 for an
    /// extended capability).
    PointerIntoHeader { from: u16, pointer: u16 },
    /// Pointer past the space the list may use.
    PointerOutOfRange { from: u16, pointer: u16 },
    /// Pointer not dword aligned (the low two bits must be zero).
    Misaligned { from: u16, pointer: u16 },
    /// Pointer back to a capability already visited.
    Loop { from: u16, pointer: u16 },
    /// More entries than fit in the space.
    TooMany { limit: usize },
    /// An extended capability header read as all ones (function gone).
    AllOnesHeader { at: u16 },
    /// A capability too short for its fields, or whose fields could not be
    /// read.
    Config(ConfigError),
}

impl From<ConfigError> for CapError {
    fn from(e: ConfigError) -> Self {
        Self::Config(e)
    }
}

impl fmt::Display for CapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PointerIntoHeader { from, pointer } => {
                write!(
                    f,
                    "capability pointer at {from:#x} points into the header ({pointer:#x})"
                )
            }
            Self::PointerOutOfRange { from, pointer } => {
                write!(
                    f,
                    "capability pointer at {from:#x} is out of range ({pointer:#x})"
                )
            }
            Self::Misaligned { from, pointer } => {
                write!(
                    f,
                    "capability pointer at {from:#x} is misaligned ({pointer:#x})"
                )
            }
            Self::Loop { from, pointer } => {
                write!(f, "capability list loops at {from:#x} -> {pointer:#x}")
            }
            Self::TooMany { limit } => write!(f, "more than {limit} capabilities"),
            Self::AllOnesHeader { at } => {
                write!(f, "extended capability at {at:#x} reads all ones")
            }
            Self::Config(e) => write!(f, "{e}"),
        }
    }
}

/// One entry of a capability list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapEntry {
    pub id: u16,
    pub offset: u16,
    /// Capability version (extended capabilities only; 0 otherwise).
    pub version: u8,
}

/// A set of visited dword offsets.
struct Visited([u64; 16]);

impl Visited {
    /// Marks `offset`; false if it was already marked.
    fn insert(&mut self, offset: u16) -> bool {
        let dword = usize::from(offset / 4) & 0x3ff;
        let (word, bit) = (dword / 64, dword % 64);
        let fresh = self.0[word] & (1 << bit) == 0;
        self.0[word] |= 1 << bit;
        fresh
    }
}

/// Walks the conventional capability list. Returns what was found before
/// any error, and the error that stopped the walk.
pub fn walk_capabilities(
    cfg: &dyn ConfigSpace,
    addr: PciAddress,
) -> (Vec<CapEntry>, Option<CapError>) {
    let mut found = Vec::new();
    let status = match cfg.read16(addr, STATUS) {
        Ok(s) => s,
        Err(e) => return (found, Some(e.into())),
    };
    if status & STATUS_CAPABILITIES_LIST == 0 || status == 0xffff {
        return (found, None);
    }
    let mut visited = Visited([0; 16]);
    let mut from = CAPABILITIES_POINTER;
    let mut pointer = match cfg.read8(addr, CAPABILITIES_POINTER) {
        Ok(p) => u16::from(p),
        Err(e) => return (found, Some(e.into())),
    };
    while pointer != 0 {
        let check = if pointer & 3 != 0 {
            Some(CapError::Misaligned { from, pointer })
        } else if pointer < FIRST_CAP_OFFSET {
            Some(CapError::PointerIntoHeader { from, pointer })
        } else if pointer > LEGACY_CONFIG_SPACE_SIZE - 4 {
            Some(CapError::PointerOutOfRange { from, pointer })
        } else if !visited.insert(pointer) {
            Some(CapError::Loop { from, pointer })
        } else if found.len() >= MAX_CAPS {
            Some(CapError::TooMany { limit: MAX_CAPS })
        } else {
            None
        };
        if let Some(e) = check {
            return (found, Some(e));
        }
        let header = match cfg.read16(addr, pointer) {
            Ok(h) => h,
            Err(e) => return (found, Some(e.into())),
        };
        found.push(CapEntry {
            id: header & 0xff,
            offset: pointer,
            version: 0,
        });
        from = pointer + 1;
        pointer = header >> 8;
    }
    (found, None)
}

/// Walks the PCI Express extended capability list (only meaningful for
/// functions with a PCI Express capability).
pub fn walk_extended_capabilities(
    cfg: &dyn ConfigSpace,
    addr: PciAddress,
) -> (Vec<CapEntry>, Option<CapError>) {
    let mut found = Vec::new();
    let mut visited = Visited([0; 16]);
    let mut from = FIRST_EXT_CAP_OFFSET;
    let mut pointer = FIRST_EXT_CAP_OFFSET;
    loop {
        let check = if pointer & 3 != 0 {
            Some(CapError::Misaligned { from, pointer })
        } else if pointer < FIRST_EXT_CAP_OFFSET {
            Some(CapError::PointerIntoHeader { from, pointer })
        } else if pointer > LAST_EXT_CAP_OFFSET {
            Some(CapError::PointerOutOfRange { from, pointer })
        } else if !visited.insert(pointer) {
            Some(CapError::Loop { from, pointer })
        } else if found.len() >= MAX_EXT_CAPS {
            Some(CapError::TooMany {
                limit: MAX_EXT_CAPS,
            })
        } else {
            None
        };
        if let Some(e) = check {
            return (found, Some(e));
        }
        let header = match cfg.read32(addr, pointer) {
            Ok(h) => h,
            Err(e) => return (found, Some(e.into())),
        };
        if header == 0xffff_ffff {
            if pointer == FIRST_EXT_CAP_OFFSET {
                return (found, None); // no extended space (conventional path)
            }
            return (found, Some(CapError::AllOnesHeader { at: pointer }));
        }
        if header == 0 && pointer == FIRST_EXT_CAP_OFFSET {
            return (found, None); // an empty list (PCIe Base §7.6.2)
        }
        found.push(CapEntry {
            id: (header & 0xffff) as u16,
            offset: pointer,
            version: ((header >> 16) & 0xf) as u8,
        });
        let next = (header >> 20) as u16;
        if next == 0 {
            return (found, None);
        }
        from = pointer;
        pointer = next;
    }
}

/// PCI Express device/port type (PCIe Base 6.0 §7.5.3.2, bits 7:4 of the
/// PCI Express Capabilities register).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortType {
    Endpoint,
    LegacyEndpoint,
    RootPort,
    UpstreamSwitchPort,
    DownstreamSwitchPort,
    PcieToPciBridge,
    PciToPcieBridge,
    RootComplexIntegratedEndpoint,
    RootComplexEventCollector,
    Reserved(u8),
}

impl PortType {
    pub const fn from_raw(raw: u8) -> Self {
        match raw {
            0x0 => Self::Endpoint,
            0x1 => Self::LegacyEndpoint,
            0x4 => Self::RootPort,
            0x5 => Self::UpstreamSwitchPort,
            0x6 => Self::DownstreamSwitchPort,
            0x7 => Self::PcieToPciBridge,
            0x8 => Self::PciToPcieBridge,
            0x9 => Self::RootComplexIntegratedEndpoint,
            0xa => Self::RootComplexEventCollector,
            other => Self::Reserved(other),
        }
    }
    pub const fn raw(self) -> u8 {
        match self {
            Self::Endpoint => 0x0,
            Self::LegacyEndpoint => 0x1,
            Self::RootPort => 0x4,
            Self::UpstreamSwitchPort => 0x5,
            Self::DownstreamSwitchPort => 0x6,
            Self::PcieToPciBridge => 0x7,
            Self::PciToPcieBridge => 0x8,
            Self::RootComplexIntegratedEndpoint => 0x9,
            Self::RootComplexEventCollector => 0xa,
            Self::Reserved(r) => r,
        }
    }
}

/// The PCI Express capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PcieCap {
    pub offset: u16,
    pub version: u8,
    pub port_type: PortType,
    /// Function Level Reset Capability, DEVCAP bit 28 (PCIe Base §7.5.3.3).
    pub flr: bool,
    /// ARI Forwarding Enable, Device Control 2 bit 5 (PCIe Base 6.0
    /// §7.5.3.16; capability version 2 only): a port forwarding
    /// configuration requests for device numbers other than 0, so the
    /// function below may use all 8 bits of devfn as its function number.
    pub ari_forwarding: bool,
}

/// Alternative Routing-ID Interpretation (PCIe Base 6.0 §7.8.7): the ARI
/// Capability register at +4 holds the Next Function Number in bits 15:8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AriCap {
    pub offset: u16,
    /// The next higher function of the device, 0 for none.
    pub next_function: u8,
}

/// MSI (PCI 3.0 §6.8.1): Message Control at +2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiCap {
    pub offset: u16,
    /// Message Control bit 7.
    pub is_64bit: bool,
    /// Message Control bit 8.
    pub per_vector_masking: bool,
    /// log2 of the vectors requested, Message Control bits 3:1.
    pub multiple_message_capable: u8,
}

/// MSI-X (PCI 3.0 §6.8.2): Message Control at +2, Table Offset/BIR at +4,
/// PBA Offset/BIR at +8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixCap {
    pub offset: u16,
    /// Number of table entries (the field holds N-1).
    pub table_size: u16,
    pub table_bir: u8,
    pub table_offset: u32,
    pub pba_bir: u8,
    pub pba_offset: u32,
}

bitflags! {
    /// ACS Capability and Control register bits (PCIe Base 6.0 §7.7.8.2-3):
    /// the same positions in both registers.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct AcsFlags: u16 {
        const SOURCE_VALIDATION = 1 << 0;
        const TRANSLATION_BLOCKING = 1 << 1;
        const P2P_REQUEST_REDIRECT = 1 << 2;
        const P2P_COMPLETION_REDIRECT = 1 << 3;
        const UPSTREAM_FORWARDING = 1 << 4;
        const P2P_EGRESS_CONTROL = 1 << 5;
        const DIRECT_TRANSLATED_P2P = 1 << 6;
    }
}

impl AcsFlags {
    /// The controls that keep a port's downstream devices from reaching
    /// each other without going through the IOMMU.
    pub const ISOLATION: Self = Self::SOURCE_VALIDATION
        .union(Self::P2P_REQUEST_REDIRECT)
        .union(Self::P2P_COMPLETION_REDIRECT)
        .union(Self::UPSTREAM_FORWARDING);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcsCap {
    pub offset: u16,
    pub capability: AcsFlags,
    pub control: AcsFlags,
}

/// ATS (PCIe Base 6.0 §10.5.1): capability at +4, control at +6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtsCap {
    pub offset: u16,
    /// Invalidate Queue Depth (0 means 32).
    pub invalidate_queue_depth: u8,
    pub page_aligned_request: bool,
    pub enabled: bool,
    pub smallest_translation_unit: u8,
}

/// Page Request Interface (PCIe Base 6.0 §10.5.2): control +4, status +6,
/// outstanding page request capacity +8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PriCap {
    pub offset: u16,
    pub enabled: bool,
    pub outstanding_capacity: u32,
}

/// PASID (PCIe Base 6.0 §7.8.8): capability at +4, control at +6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PasidCap {
    pub offset: u16,
    /// Max PASID Width, bits 12:8 (PASIDs are `0..1 << max_width`).
    pub max_width: u8,
    pub execute_permission: bool,
    pub privileged_mode: bool,
    pub enabled: bool,
}

/// SR-IOV (PCIe Base 6.0 §9.3.3): InitialVFs at +0x0c, TotalVFs at +0x0e,
/// NumVFs at +0x10, First VF Offset at +0x14, VF Stride at +0x16.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SriovCap {
    pub offset: u16,
    pub initial_vfs: u16,
    pub total_vfs: u16,
    /// VFs currently configured (0 until software sets it).
    pub num_vfs: u16,
    pub first_vf_offset: u16,
    pub vf_stride: u16,
}

impl SriovCap {
    /// Requester ID of VF `n` (1-based) of the PF at `pf`: the PF's
    /// routing ID plus First VF Offset plus `(n - 1)` strides (PCIe Base
    /// 6.0 §9.3.3.10-11; the sum may carry into the bus number). `None`
    /// for `n` outside `1..=total_vfs` or past requester ID 0xffff.
    pub fn vf_requester_id(&self, pf: crate::Bdf, n: u16) -> Option<crate::Bdf> {
        if n == 0 || n > self.total_vfs {
            return None;
        }
        let rid = u32::from(pf.requester_id())
            + u32::from(self.first_vf_offset)
            + u32::from(n - 1) * u32::from(self.vf_stride);
        u16::try_from(rid).ok().map(crate::Bdf::from_requester_id)
    }
}

/// Everything Sluice needs to know about a function's capabilities, read
/// once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub list: Vec<CapEntry>,
    pub extended: Vec<CapEntry>,
    pub power_management: bool,
    pub pcie: Option<PcieCap>,
    pub msi: Option<MsiCap>,
    pub msix: Option<MsixCap>,
    pub acs: Option<AcsCap>,
    pub ats: Option<AtsCap>,
    pub pri: Option<PriCap>,
    pub pasid: Option<PasidCap>,
    pub sriov: Option<SriovCap>,
    pub ari: Option<AriCap>,
    /// Why a walk stopped early, or a capability could not be decoded.
    pub errors: Vec<CapError>,
}

impl Capabilities {
    /// Whether Function Level Reset is supported.
    pub fn flr(&self) -> bool {
        self.pcie.is_some_and(|p| p.flr)
    }

    /// ACS controls enabled (empty without an ACS capability).
    pub fn acs_control(&self) -> AcsFlags {
        self.acs.map_or(AcsFlags::empty(), |a| a.control)
    }

    /// Short names of the features present, in a fixed order, for logs.
    pub fn names(&self) -> Vec<&'static str> {
        let mut names = Vec::new();
        let present = [
            (self.power_management, "pm"),
            (self.msi.is_some(), "msi"),
            (self.msix.is_some(), "msix"),
            (self.pcie.is_some(), "pcie"),
            (self.flr(), "flr"),
            (self.acs.is_some(), "acs"),
            (self.ari.is_some(), "ari"),
            (self.ats.is_some(), "ats"),
            (self.pri.is_some(), "pri"),
            (self.pasid.is_some(), "pasid"),
            (self.sriov.is_some(), "sriov"),
        ];
        for (on, name) in present {
            if on {
                names.push(name);
            }
        }
        names
    }
}

/// Walks both lists and decodes the capabilities Sluice uses.
pub fn read_capabilities(cfg: &dyn ConfigSpace, addr: PciAddress) -> Capabilities {
    let mut caps = Capabilities::default();
    let (list, err) = walk_capabilities(cfg, addr);
    caps.errors.extend(err);
    for entry in &list {
        if let Err(e) = decode_capability(cfg, addr, entry, &mut caps) {
            caps.errors.push(e.into());
        }
    }
    caps.list = list;
    if caps.pcie.is_some() {
        let (ext, err) = walk_extended_capabilities(cfg, addr);
        caps.errors.extend(err);
        for entry in &ext {
            if let Err(e) = decode_extended_capability(cfg, addr, entry, &mut caps) {
                caps.errors.push(e.into());
            }
        }
        caps.extended = ext;
    }
    caps
}

fn decode_capability(
    cfg: &dyn ConfigSpace,
    addr: PciAddress,
    entry: &CapEntry,
    caps: &mut Capabilities,
) -> Result<(), ConfigError> {
    let at = entry.offset;
    // Offsets past 0xff for the fields below wrap into extended space on a
    // lying pointer near the end; reads stay inside the 4 KiB space and are
    // checked by `ConfigSpace`, so at worst garbage is decoded, never UB.
    match entry.id as u8 {
        cap_id::POWER_MANAGEMENT => caps.power_management = true,
        cap_id::PCI_EXPRESS if caps.pcie.is_none() => {
            let reg = cfg.read16(addr, at + 2)?;
            let devcap = cfg.read32(addr, at + 4)?;
            let version = (reg & 0xf) as u8;
            let devctl2 = if version >= 2 {
                cfg.read16(addr, at + 0x28)?
            } else {
                0
            };
            caps.pcie = Some(PcieCap {
                offset: at,
                version,
                port_type: PortType::from_raw(((reg >> 4) & 0xf) as u8),
                flr: devcap & (1 << 28) != 0,
                ari_forwarding: devctl2 & (1 << 5) != 0,
            });
        }
        cap_id::MSI if caps.msi.is_none() => {
            let control = cfg.read16(addr, at + 2)?;
            caps.msi = Some(MsiCap {
                offset: at,
                is_64bit: control & (1 << 7) != 0,
                per_vector_masking: control & (1 << 8) != 0,
                multiple_message_capable: ((control >> 1) & 7) as u8,
            });
        }
        cap_id::MSIX if caps.msix.is_none() => {
            let control = cfg.read16(addr, at + 2)?;
            let table = cfg.read32(addr, at + 4)?;
            let pba = cfg.read32(addr, at + 8)?;
            caps.msix = Some(MsixCap {
                offset: at,
                table_size: (control & 0x7ff) + 1,
                table_bir: (table & 7) as u8,
                table_offset: table & !7,
                pba_bir: (pba & 7) as u8,
                pba_offset: pba & !7,
            });
        }
        _ => {}
    }
    Ok(())
}

fn decode_extended_capability(
    cfg: &dyn ConfigSpace,
    addr: PciAddress,
    entry: &CapEntry,
    caps: &mut Capabilities,
) -> Result<(), ConfigError> {
    let at = entry.offset;
    // An extended capability at 0xffc has no room for fields: reads past
    // 0xfff fail in `check_offset` and are reported, not decoded.
    let field = |delta: u16| at.saturating_add(delta);
    match entry.id {
        ext_cap_id::ACS if caps.acs.is_none() => {
            let capability = cfg.read16(addr, field(4))?;
            let control = cfg.read16(addr, field(6))?;
            caps.acs = Some(AcsCap {
                offset: at,
                capability: AcsFlags::from_bits_truncate(capability),
                control: AcsFlags::from_bits_truncate(control),
            });
        }
        ext_cap_id::ATS if caps.ats.is_none() => {
            let capability = cfg.read16(addr, field(4))?;
            let control = cfg.read16(addr, field(6))?;
            caps.ats = Some(AtsCap {
                offset: at,
                invalidate_queue_depth: (capability & 0x1f) as u8,
                page_aligned_request: capability & (1 << 5) != 0,
                enabled: control & (1 << 15) != 0,
                smallest_translation_unit: (control & 0x1f) as u8,
            });
        }
        ext_cap_id::PRI if caps.pri.is_none() => {
            let control = cfg.read16(addr, field(4))?;
            let capacity = cfg.read32(addr, field(8))?;
            caps.pri = Some(PriCap {
                offset: at,
                enabled: control & 1 != 0,
                outstanding_capacity: capacity,
            });
        }
        ext_cap_id::PASID if caps.pasid.is_none() => {
            let capability = cfg.read16(addr, field(4))?;
            let control = cfg.read16(addr, field(6))?;
            caps.pasid = Some(PasidCap {
                offset: at,
                max_width: ((capability >> 8) & 0x1f) as u8,
                execute_permission: capability & (1 << 1) != 0,
                privileged_mode: capability & (1 << 2) != 0,
                enabled: control & 1 != 0,
            });
        }
        ext_cap_id::SRIOV if caps.sriov.is_none() => {
            let initial_vfs = cfg.read16(addr, field(0x0c))?;
            let total_vfs = cfg.read16(addr, field(0x0e))?;
            let num_vfs = cfg.read16(addr, field(0x10))?;
            let first_vf_offset = cfg.read16(addr, field(0x14))?;
            let vf_stride = cfg.read16(addr, field(0x16))?;
            caps.sriov = Some(SriovCap {
                offset: at,
                initial_vfs,
                total_vfs,
                num_vfs,
                first_vf_offset,
                vf_stride,
            });
        }
        ext_cap_id::ARI if caps.ari.is_none() => {
            let capability = cfg.read16(addr, field(4))?;
            caps.ari = Some(AriCap {
                offset: at,
                next_function: (capability >> 8) as u8,
            });
        }
        _ => {}
    }
    Ok(())
}
