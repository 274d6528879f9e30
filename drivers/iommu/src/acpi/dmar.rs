//! The DMA Remapping Reporting table (Intel VT-d Architecture
//! Specification rev. 4.1, chapter 8 "BIOS Considerations").
//!
//! Layout (§8.1): the 36-byte SDT header, Host Address Width (u8, the
//! width minus one) at 36, Flags (u8) at 37, 10 reserved bytes, then
//! remapping structures from offset 48, each starting with Type (u16) and
//! Length (u16).

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use bitflags::bitflags;
use sluice_pci::config::{
    ConfigError, ConfigSpace, HEADER_TYPE, NO_DEVICE_VENDOR, SECONDARY_BUS, VENDOR_ID,
};
use sluice_pci::sdt::{SdtError, SdtHeader, le_u8, le_u16, le_u32, le_u64, parse_sdt};
use sluice_pci::{Bdf, PciAddress, Segment};

pub const DMAR_SIGNATURE: &[u8; 4] = b"DMAR";

/// Byte offsets of the on-wire structures (VT-d 4.1 §8.1-8.10). Each
/// `LEN` is the fixed part, checked against its last field at compile time.
pub mod layout {
    pub mod table {
        pub const HOST_ADDRESS_WIDTH: usize = 36;
        pub const FLAGS: usize = 37;
        pub const RESERVED: usize = 38;
        pub const FIRST_STRUCTURE: usize = 48;
        const _: () = assert!(RESERVED + 10 == FIRST_STRUCTURE);
    }
    /// Common remapping structure header.
    pub mod structure {
        pub const TYPE: usize = 0;
        pub const LENGTH: usize = 2;
        pub const LEN: usize = 4;
        const _: () = assert!(LENGTH + 2 == LEN);
    }
    /// DMA Remapping Hardware Unit Definition (§8.3).
    pub mod drhd {
        pub const FLAGS: usize = 4;
        pub const SIZE: usize = 5;
        pub const SEGMENT: usize = 6;
        pub const REGISTER_BASE: usize = 8;
        pub const LEN: usize = 16;
        const _: () = assert!(REGISTER_BASE + 8 == LEN);
    }
    /// Reserved Memory Region Reporting (§8.4).
    pub mod rmrr {
        pub const SEGMENT: usize = 6;
        pub const BASE: usize = 8;
        pub const LIMIT: usize = 16;
        pub const LEN: usize = 24;
        const _: () = assert!(LIMIT + 8 == LEN);
    }
    /// Root Port ATS Capability Reporting (§8.5).
    pub mod atsr {
        pub const FLAGS: usize = 4;
        pub const SEGMENT: usize = 6;
        pub const LEN: usize = 8;
        const _: () = assert!(SEGMENT + 2 == LEN);
    }
    /// Remapping Hardware Static Affinity (§8.6).
    pub mod rhsa {
        pub const REGISTER_BASE: usize = 8;
        pub const PROXIMITY_DOMAIN: usize = 16;
        pub const LEN: usize = 20;
        const _: () = assert!(PROXIMITY_DOMAIN + 4 == LEN);
    }
    /// ACPI Name-space Device Declaration (§8.7).
    pub mod andd {
        pub const DEVICE_NUMBER: usize = 7;
        pub const NAME: usize = 8;
        /// Fixed part plus at least the name's terminating NUL.
        pub const LEN: usize = 9;
        const _: () = assert!(NAME + 1 == LEN);
    }
    /// SoC Integrated Address Translation Cache reporting (§8.8).
    pub mod satc {
        pub const FLAGS: usize = 4;
        pub const SEGMENT: usize = 6;
        pub const LEN: usize = 8;
        const _: () = assert!(SEGMENT + 2 == LEN);
    }
    /// Device Scope (§8.3.1).
    pub mod scope {
        pub const TYPE: usize = 0;
        pub const LENGTH: usize = 1;
        pub const FLAGS: usize = 2;
        pub const ENUMERATION_ID: usize = 4;
        pub const START_BUS: usize = 5;
        pub const PATH: usize = 6;
        pub const PATH_ENTRY: usize = 2;
        const _: () = assert!(START_BUS + 1 == PATH);
    }
}

/// Remapping structure types (§8.2).
pub mod structure_type {
    pub const DRHD: u16 = 0;
    pub const RMRR: u16 = 1;
    pub const ATSR: u16 = 2;
    pub const RHSA: u16 = 3;
    pub const ANDD: u16 = 4;
    pub const SATC: u16 = 5;
}

bitflags! {
    /// DMAR Flags (§8.1).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct DmarFlags: u8 {
        const INTR_REMAP = 1 << 0;
        const X2APIC_OPT_OUT = 1 << 1;
        const DMA_CTRL_PLATFORM_OPT_IN = 1 << 2;
    }

    /// DRHD Flags (§8.3).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct DrhdFlags: u8 {
        const INCLUDE_PCI_ALL = 1 << 0;
    }

    /// ATSR Flags (§8.5).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct AtsrFlags: u8 {
        const ALL_PORTS = 1 << 0;
    }

    /// SATC Flags (§8.8).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct SatcFlags: u8 {
        const ATC_REQUIRED = 1 << 0;
    }
}

/// Device scope entry types (§8.3.1, Table 8-4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScopeKind {
    PciEndpoint,
    PciSubHierarchy,
    IoApic,
    HpetMsi,
    AcpiNamespaceDevice,
    Reserved(u8),
}

impl ScopeKind {
    pub const fn from_raw(raw: u8) -> Self {
        match raw {
            1 => Self::PciEndpoint,
            2 => Self::PciSubHierarchy,
            3 => Self::IoApic,
            4 => Self::HpetMsi,
            5 => Self::AcpiNamespaceDevice,
            other => Self::Reserved(other),
        }
    }
    pub const fn raw(self) -> u8 {
        match self {
            Self::PciEndpoint => 1,
            Self::PciSubHierarchy => 2,
            Self::IoApic => 3,
            Self::HpetMsi => 4,
            Self::AcpiNamespaceDevice => 5,
            Self::Reserved(r) => r,
        }
    }
}

/// A device scope: the device named by walking `path` from `start_bus`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceScope {
    pub kind: ScopeKind,
    /// Scope flags (byte 2; reserved before VT-d 3.x).
    pub flags: u8,
    /// I/O APIC ID, HPET number or ACPI device number, by `kind`.
    pub enumeration_id: u8,
    pub start_bus: u8,
    /// (device, function) hops; all but the last name bridges.
    pub path: Vec<(u8, u8)>,
}

/// Why a scope path could not be followed to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScopeError {
    /// No function answers at a hop that should be a bridge.
    MissingBridge {
        at: PciAddress,
        hop: usize,
    },
    /// The function at a hop is not a type 1 (bridge) function.
    NotABridge {
        at: PciAddress,
        hop: usize,
    },
    /// A bridge's secondary bus does not lead below it.
    BadSecondaryBus {
        at: PciAddress,
        secondary: u8,
    },
    EmptyPath,
    Config(ConfigError),
}

impl fmt::Display for ScopeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MissingBridge { at, hop } => write!(f, "scope path hop {hop}: no bridge at {at}"),
            Self::NotABridge { at, hop } => write!(f, "scope path hop {hop}: {at} is not a bridge"),
            Self::BadSecondaryBus { at, secondary } => {
                write!(
                    f,
                    "scope path: bridge {at} has bad secondary bus {secondary:#04x}"
                )
            }
            Self::EmptyPath => f.write_str("scope has an empty path"),
            Self::Config(e) => write!(f, "{e}"),
        }
    }
}

impl DeviceScope {
    /// Follows the path through the bridges' secondary bus numbers as
    /// firmware programmed them (§8.3.2) and returns the device's address.
    /// The final device need not answer (hot-plug slots, I/O APICs).
    pub fn resolve(
        &self,
        segment: Segment,
        cfg: &dyn ConfigSpace,
    ) -> Result<PciAddress, ScopeError> {
        let Some((&(last_dev, last_fn), hops)) = self.path.split_last() else {
            return Err(ScopeError::EmptyPath);
        };
        let mut bus = self.start_bus;
        for (hop, &(dev, func)) in hops.iter().enumerate() {
            let at = PciAddress::from_parts(segment, Bdf::new(bus, dev, func));
            let vendor = cfg.read16(at, VENDOR_ID).map_err(ScopeError::Config)?;
            if vendor == NO_DEVICE_VENDOR {
                return Err(ScopeError::MissingBridge { at, hop });
            }
            let header = cfg.read8(at, HEADER_TYPE).map_err(ScopeError::Config)?;
            if header & 0x7f != 1 {
                return Err(ScopeError::NotABridge { at, hop });
            }
            let secondary = cfg.read8(at, SECONDARY_BUS).map_err(ScopeError::Config)?;
            if secondary <= bus {
                return Err(ScopeError::BadSecondaryBus { at, secondary });
            }
            bus = secondary;
        }
        Ok(PciAddress::from_parts(
            segment,
            Bdf::new(bus, last_dev, last_fn),
        ))
    }
}

/// A DMA remapping hardware unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drhd {
    /// Offset of the structure in the table (for messages).
    pub offset: usize,
    pub flags: DrhdFlags,
    /// Register set size: 2^`size` 4 KiB pages (bits 3:0; 0 before VT-d 3.x
    /// meaning one page).
    pub size: u8,
    pub segment: Segment,
    pub register_base: u64,
    pub scopes: Vec<DeviceScope>,
}

impl Drhd {
    pub fn register_size(&self) -> u64 {
        4096u64 << (self.size & 0xf)
    }
    pub fn include_pci_all(&self) -> bool {
        self.flags.contains(DrhdFlags::INCLUDE_PCI_ALL)
    }
}

/// A reserved memory region some devices DMA to before and after the OS
/// takes over (USB legacy emulation, integrated graphics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rmrr {
    pub offset: usize,
    pub segment: Segment,
    pub base: u64,
    /// Last byte of the region (inclusive).
    pub limit: u64,
    pub scopes: Vec<DeviceScope>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Atsr {
    pub offset: usize,
    pub flags: AtsrFlags,
    pub segment: Segment,
    pub scopes: Vec<DeviceScope>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rhsa {
    pub offset: usize,
    pub register_base: u64,
    pub proximity_domain: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Andd {
    pub offset: usize,
    pub acpi_device_number: u8,
    /// Fully qualified ACPI object name, e.g. `\_SB.PCI0.I2C0`.
    pub object_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Satc {
    pub offset: usize,
    pub flags: SatcFlags,
    pub segment: Segment,
    pub scopes: Vec<DeviceScope>,
}

/// A structure type this parser does not know; skipped by its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownStructure {
    pub offset: usize,
    pub structure_type: u16,
    pub length: u16,
}

/// What is wrong with a table or one of its structures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmarError {
    /// Header problem: the table is rejected.
    Table(SdtError),
    /// A structure length below the 4-byte header (0 included): the walk
    /// cannot continue past it.
    StructureLengthTooSmall { length: u16 },
    /// A structure length past the end of the table: the walk stops.
    StructureOverrunsTable { length: u16, remaining: usize },
    /// Fewer than 4 bytes left after the last structure.
    TrailingBytes { count: usize },
    /// A structure shorter than its type's fixed part; it is skipped.
    StructureTooShort { length: u16, minimum: usize },
    /// A scope length below 6: the rest of the structure's scopes are
    /// dropped.
    ScopeLengthTooSmall { at: usize, length: u8 },
    /// A scope running past the end of its structure: dropped with the
    /// rest.
    ScopeOverrunsStructure { at: usize, length: u8 },
    /// A scope with no path, or an odd number of path bytes: skipped.
    ScopeBadPath { at: usize, length: u8 },
    /// RMRR limit below its base: the RMRR is skipped.
    RmrrInverted { base: u64, limit: u64 },
    /// RMRR base or size not a multiple of 4 KiB: kept, as devices depend
    /// on it, but reported.
    RmrrMisaligned { base: u64, limit: u64 },
    /// ANDD object name without a NUL or not ASCII: skipped.
    AnddBadName,
}

impl From<SdtError> for DmarError {
    fn from(e: SdtError) -> Self {
        Self::Table(e)
    }
}

impl fmt::Display for DmarError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Table(e) => write!(f, "DMAR rejected: {e}"),
            Self::StructureLengthTooSmall { length } => {
                write!(
                    f,
                    "structure length {length} below 4; rest of table ignored"
                )
            }
            Self::StructureOverrunsTable { length, remaining } => write!(
                f,
                "structure length {length} runs past the table ({remaining} bytes left); rest ignored"
            ),
            Self::TrailingBytes { count } => {
                write!(f, "{count} trailing bytes after the last structure")
            }
            Self::StructureTooShort { length, minimum } => {
                write!(
                    f,
                    "structure length {length} below its minimum {minimum}; skipped"
                )
            }
            Self::ScopeLengthTooSmall { at, length } => {
                write!(
                    f,
                    "device scope at {at:#x}: length {length} below 6; remaining scopes ignored"
                )
            }
            Self::ScopeOverrunsStructure { at, length } => {
                write!(
                    f,
                    "device scope at {at:#x}: length {length} runs past its structure; remaining scopes ignored"
                )
            }
            Self::ScopeBadPath { at, length } => {
                write!(
                    f,
                    "device scope at {at:#x}: length {length} gives no whole path; skipped"
                )
            }
            Self::RmrrInverted { base, limit } => {
                write!(f, "RMRR limit {limit:#x} below base {base:#x}; skipped")
            }
            Self::RmrrMisaligned { base, limit } => {
                write!(f, "RMRR {base:#x}-{limit:#x} not 4 KiB aligned")
            }
            Self::AnddBadName => f.write_str("ANDD object name not NUL-terminated ASCII; skipped"),
        }
    }
}

/// An interrupt source a DRHD remaps: an I/O APIC or an MSI-capable HPET,
/// with the source ID its interrupt requests carry (VT-d 4.1 §8.3.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InterruptSource {
    /// Index in [`Dmar::drhds`].
    pub drhd: usize,
    /// [`ScopeKind::IoApic`] or [`ScopeKind::HpetMsi`].
    pub kind: ScopeKind,
    /// I/O APIC ID or HPET number (the scope's enumeration ID).
    pub id: u8,
    pub source_id: PciAddress,
}

/// A problem found in one structure; `offset` is where the structure starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StructureError {
    pub offset: usize,
    pub structure_type: u16,
    pub error: DmarError,
}

/// A parsed DMAR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dmar {
    pub header: SdtHeader,
    /// Maximum DMA physical address width in bits (the field plus one).
    pub host_address_width: u8,
    pub flags: DmarFlags,
    pub drhds: Vec<Drhd>,
    pub rmrrs: Vec<Rmrr>,
    pub atsrs: Vec<Atsr>,
    pub rhsas: Vec<Rhsa>,
    pub andds: Vec<Andd>,
    pub satcs: Vec<Satc>,
    pub unknown: Vec<UnknownStructure>,
    pub errors: Vec<StructureError>,
}

/// Parses a whole DMAR table. Header problems reject the table; problems
/// in a structure are collected in [`Dmar::errors`] and the rest of the
/// table is parsed as far as the structure lengths can be trusted.
pub fn parse(bytes: &[u8]) -> Result<Dmar, DmarError> {
    let (header, table) = parse_sdt(bytes, DMAR_SIGNATURE, layout::table::FIRST_STRUCTURE)?;
    let mut dmar = Dmar {
        header,
        host_address_width: table[layout::table::HOST_ADDRESS_WIDTH].saturating_add(1),
        flags: DmarFlags::from_bits_truncate(table[layout::table::FLAGS]),
        drhds: Vec::new(),
        rmrrs: Vec::new(),
        atsrs: Vec::new(),
        rhsas: Vec::new(),
        andds: Vec::new(),
        satcs: Vec::new(),
        unknown: Vec::new(),
        errors: Vec::new(),
    };
    let mut offset = layout::table::FIRST_STRUCTURE;
    while offset < table.len() {
        let remaining = table.len() - offset;
        let (Some(kind), Some(length)) = (
            le_u16(table, offset + layout::structure::TYPE),
            le_u16(table, offset + layout::structure::LENGTH),
        ) else {
            dmar.push_error(
                offset,
                u16::MAX,
                DmarError::TrailingBytes { count: remaining },
            );
            break;
        };
        if usize::from(length) < layout::structure::LEN {
            dmar.push_error(offset, kind, DmarError::StructureLengthTooSmall { length });
            break;
        }
        if usize::from(length) > remaining {
            dmar.push_error(
                offset,
                kind,
                DmarError::StructureOverrunsTable { length, remaining },
            );
            break;
        }
        let s = &table[offset..offset + usize::from(length)];
        dmar.parse_structure(offset, kind, s);
        offset += usize::from(length);
    }
    for e in &dmar.errors {
        log::warn!(
            "dmar: structure type {} at {:#x}: {}",
            e.structure_type,
            e.offset,
            e.error
        );
    }
    for u in &dmar.unknown {
        log::info!(
            "dmar: skipping unknown structure type {} ({} bytes) at {:#x}",
            u.structure_type,
            u.length,
            u.offset
        );
    }
    Ok(dmar)
}

impl Dmar {
    /// The I/O APICs and HPETs every DRHD remaps, with their source IDs;
    /// scopes whose path cannot be followed are returned with the index of
    /// their DRHD.
    pub fn interrupt_sources(
        &self,
        cfg: &dyn ConfigSpace,
    ) -> (Vec<InterruptSource>, Vec<(usize, ScopeError)>) {
        let mut sources = Vec::new();
        let mut errors = Vec::new();
        for (drhd, unit) in self.drhds.iter().enumerate() {
            for scope in &unit.scopes {
                if !matches!(scope.kind, ScopeKind::IoApic | ScopeKind::HpetMsi) {
                    continue;
                }
                match scope.resolve(unit.segment, cfg) {
                    Ok(source_id) => sources.push(InterruptSource {
                        drhd,
                        kind: scope.kind,
                        id: scope.enumeration_id,
                        source_id,
                    }),
                    Err(e) => errors.push((drhd, e)),
                }
            }
        }
        (sources, errors)
    }

    fn push_error(&mut self, offset: usize, structure_type: u16, error: DmarError) {
        self.errors.push(StructureError {
            offset,
            structure_type,
            error,
        });
    }

    fn parse_structure(&mut self, offset: usize, kind: u16, s: &[u8]) {
        let minimum = match kind {
            structure_type::DRHD => layout::drhd::LEN,
            structure_type::RMRR => layout::rmrr::LEN,
            structure_type::ATSR => layout::atsr::LEN,
            structure_type::RHSA => layout::rhsa::LEN,
            structure_type::ANDD => layout::andd::LEN,
            structure_type::SATC => layout::satc::LEN,
            _ => {
                self.unknown.push(UnknownStructure {
                    offset,
                    structure_type: kind,
                    length: s.len() as u16,
                });
                return;
            }
        };
        if s.len() < minimum {
            self.push_error(
                offset,
                kind,
                DmarError::StructureTooShort {
                    length: s.len() as u16,
                    minimum,
                },
            );
            return;
        }
        // Fixed parts are in bounds past this point; the `unwrap_or(0)`s
        // below cannot take effect.
        let u8_at = |o| le_u8(s, o).unwrap_or(0);
        let u16_at = |o| le_u16(s, o).unwrap_or(0);
        let u64_at = |o| le_u64(s, o).unwrap_or(0);
        match kind {
            structure_type::DRHD => {
                let scopes = self.parse_scopes(offset, kind, s, layout::drhd::LEN);
                self.drhds.push(Drhd {
                    offset,
                    flags: DrhdFlags::from_bits_truncate(u8_at(layout::drhd::FLAGS)),
                    size: u8_at(layout::drhd::SIZE) & 0xf,
                    segment: Segment(u16_at(layout::drhd::SEGMENT)),
                    register_base: u64_at(layout::drhd::REGISTER_BASE),
                    scopes,
                });
            }
            structure_type::RMRR => {
                let base = u64_at(layout::rmrr::BASE);
                let limit = u64_at(layout::rmrr::LIMIT);
                if limit < base {
                    self.push_error(offset, kind, DmarError::RmrrInverted { base, limit });
                    return;
                }
                if base % 4096 != 0 || limit % 4096 != 4095 {
                    self.push_error(offset, kind, DmarError::RmrrMisaligned { base, limit });
                }
                let scopes = self.parse_scopes(offset, kind, s, layout::rmrr::LEN);
                self.rmrrs.push(Rmrr {
                    offset,
                    segment: Segment(u16_at(layout::rmrr::SEGMENT)),
                    base,
                    limit,
                    scopes,
                });
            }
            structure_type::ATSR => {
                let scopes = self.parse_scopes(offset, kind, s, layout::atsr::LEN);
                self.atsrs.push(Atsr {
                    offset,
                    flags: AtsrFlags::from_bits_truncate(u8_at(layout::atsr::FLAGS)),
                    segment: Segment(u16_at(layout::atsr::SEGMENT)),
                    scopes,
                });
            }
            structure_type::RHSA => self.rhsas.push(Rhsa {
                offset,
                register_base: u64_at(layout::rhsa::REGISTER_BASE),
                proximity_domain: le_u32(s, layout::rhsa::PROXIMITY_DOMAIN).unwrap_or(0),
            }),
            structure_type::ANDD => {
                let name_bytes = &s[layout::andd::NAME..];
                let name = name_bytes
                    .iter()
                    .position(|&b| b == 0)
                    .map(|end| &name_bytes[..end])
                    .filter(|n| n.is_ascii())
                    .and_then(|n| core::str::from_utf8(n).ok());
                match name {
                    Some(n) => self.andds.push(Andd {
                        offset,
                        acpi_device_number: u8_at(layout::andd::DEVICE_NUMBER),
                        object_name: String::from(n),
                    }),
                    None => self.push_error(offset, kind, DmarError::AnddBadName),
                }
            }
            _ => {
                let scopes = self.parse_scopes(offset, kind, s, layout::satc::LEN);
                self.satcs.push(Satc {
                    offset,
                    flags: SatcFlags::from_bits_truncate(u8_at(layout::satc::FLAGS)),
                    segment: Segment(u16_at(layout::satc::SEGMENT)),
                    scopes,
                });
            }
        }
    }

    /// Device scopes from `first` to the end of structure `s`.
    fn parse_scopes(
        &mut self,
        offset: usize,
        kind: u16,
        s: &[u8],
        first: usize,
    ) -> Vec<DeviceScope> {
        use layout::scope;
        let mut scopes = Vec::new();
        let mut at = first;
        while at < s.len() {
            let table_offset = offset + at;
            let length = le_u8(s, at + scope::LENGTH).unwrap_or(0);
            if usize::from(length) < scope::PATH {
                self.push_error(
                    offset,
                    kind,
                    DmarError::ScopeLengthTooSmall {
                        at: table_offset,
                        length,
                    },
                );
                break;
            }
            let Some(raw) = s.get(at..at + usize::from(length)) else {
                self.push_error(
                    offset,
                    kind,
                    DmarError::ScopeOverrunsStructure {
                        at: table_offset,
                        length,
                    },
                );
                break;
            };
            at += usize::from(length);
            let path_bytes = &raw[scope::PATH..];
            if path_bytes.is_empty() || path_bytes.len() % scope::PATH_ENTRY != 0 {
                self.push_error(
                    offset,
                    kind,
                    DmarError::ScopeBadPath {
                        at: table_offset,
                        length,
                    },
                );
                continue;
            }
            scopes.push(DeviceScope {
                kind: ScopeKind::from_raw(raw[scope::TYPE]),
                flags: raw[scope::FLAGS],
                enumeration_id: raw[scope::ENUMERATION_ID],
                start_bus: raw[scope::START_BUS],
                path: path_bytes.chunks_exact(2).map(|p| (p[0], p[1])).collect(),
            });
        }
        scopes
    }
}
