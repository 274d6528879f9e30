//! Configuration-space access: the [`ConfigSpace`] trait every PCI routine
//! reads through, and the offsets of the standard header (PCI Local Bus
//! Specification 3.0 §6.1, PCI-to-PCI Bridge Architecture Specification 1.2
//! §3.2).

use core::fmt;

use crate::address::PciAddress;

/// Size of one function's configuration space with ECAM (PCIe Base §7.2.2).
pub const CONFIG_SPACE_SIZE: u16 = 4096;
/// Size of the conventional (PCI-compatible) part.
pub const LEGACY_CONFIG_SPACE_SIZE: u16 = 256;

pub const VENDOR_ID: u16 = 0x00;
pub const DEVICE_ID: u16 = 0x02;
pub const COMMAND: u16 = 0x04;
pub const STATUS: u16 = 0x06;
pub const REVISION_ID: u16 = 0x08;
/// Programming interface (0x09), sub-class (0x0a), base class (0x0b).
pub const CLASS_PROG_IF: u16 = 0x09;
pub const HEADER_TYPE: u16 = 0x0e;
pub const BAR0: u16 = 0x10;
pub const CAPABILITIES_POINTER: u16 = 0x34;
/// Type 1 (bridge) header.
pub const PRIMARY_BUS: u16 = 0x18;
pub const SECONDARY_BUS: u16 = 0x19;
pub const SUBORDINATE_BUS: u16 = 0x1a;
pub const SECONDARY_STATUS: u16 = 0x1e;

pub const COMMAND_IO_SPACE: u16 = 1 << 0;
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const STATUS_CAPABILITIES_LIST: u16 = 1 << 4;
pub const HEADER_TYPE_MULTI_FUNCTION: u8 = 0x80;

/// Vendor ID read back when no function answers at an address.
pub const NO_DEVICE_VENDOR: u16 = 0xffff;

/// Why a configuration access could not be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigError {
    /// No ECAM window covers this segment and bus.
    NoWindow(PciAddress),
    /// Offset beyond the 4 KiB configuration space.
    OffsetOutOfRange { addr: PciAddress, offset: u16 },
    /// Offset not aligned to the access width.
    Misaligned { addr: PciAddress, offset: u16 },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoWindow(a) => write!(f, "{a}: no ECAM window covers this bus"),
            Self::OffsetOutOfRange { addr, offset } => {
                write!(f, "{addr}: config offset {offset:#x} beyond 4 KiB")
            }
            Self::Misaligned { addr, offset } => {
                write!(f, "{addr}: config offset {offset:#x} misaligned for access")
            }
        }
    }
}

/// Checks an access of `width` bytes at `offset`.
pub const fn check_offset(addr: PciAddress, offset: u16, width: u16) -> Result<(), ConfigError> {
    if !offset.is_multiple_of(width) {
        return Err(ConfigError::Misaligned { addr, offset });
    }
    if offset > CONFIG_SPACE_SIZE - width {
        return Err(ConfigError::OffsetOutOfRange { addr, offset });
    }
    Ok(())
}

/// Read/write access to PCI configuration space.
///
/// Implementations provide aligned 32-bit accesses; narrower ones are
/// derived. Reads of an address where no function answers return all ones,
/// as the hardware does. Narrow writes are read-modify-write of the
/// containing dword, except that the Status (0x06) and Secondary Status
/// (0x1e) halves are written as zero: their error bits are write-1-to-clear
/// (PCI 3.0 §6.2.3), so writing back what was read would clear them.
pub trait ConfigSpace {
    fn read32(&self, addr: PciAddress, offset: u16) -> Result<u32, ConfigError>;
    fn write32(&self, addr: PciAddress, offset: u16, value: u32) -> Result<(), ConfigError>;

    fn read16(&self, addr: PciAddress, offset: u16) -> Result<u16, ConfigError> {
        check_offset(addr, offset, 2)?;
        let dword = self.read32(addr, offset & !3)?;
        Ok((dword >> ((offset & 2) * 8)) as u16)
    }

    fn read8(&self, addr: PciAddress, offset: u16) -> Result<u8, ConfigError> {
        check_offset(addr, offset, 1)?;
        let dword = self.read32(addr, offset & !3)?;
        Ok((dword >> ((offset & 3) * 8)) as u8)
    }

    fn write16(&self, addr: PciAddress, offset: u16, value: u16) -> Result<(), ConfigError> {
        check_offset(addr, offset, 2)?;
        let shift = u32::from(offset & 2) * 8;
        let merged = merge_narrow_write(
            self.read32(addr, offset & !3)?,
            offset & !3,
            0xffff << shift,
            u32::from(value) << shift,
        );
        self.write32(addr, offset & !3, merged)
    }

    fn write8(&self, addr: PciAddress, offset: u16, value: u8) -> Result<(), ConfigError> {
        check_offset(addr, offset, 1)?;
        let shift = u32::from(offset & 3) * 8;
        let merged = merge_narrow_write(
            self.read32(addr, offset & !3)?,
            offset & !3,
            0xff << shift,
            u32::from(value) << shift,
        );
        self.write32(addr, offset & !3, merged)
    }
}

/// The dword to write for a narrow write: the old contents outside `mask`,
/// with write-1-to-clear status halves zeroed (see [`ConfigSpace`]).
fn merge_narrow_write(old: u32, dword_offset: u16, mask: u32, value: u32) -> u32 {
    let mut keep = old & !mask;
    if dword_offset == COMMAND || dword_offset == SECONDARY_STATUS & !3 {
        keep &= 0x0000_ffff | mask;
    }
    keep | (value & mask)
}

impl<T: ConfigSpace + ?Sized> ConfigSpace for &T {
    fn read32(&self, addr: PciAddress, offset: u16) -> Result<u32, ConfigError> {
        (**self).read32(addr, offset)
    }
    fn write32(&self, addr: PciAddress, offset: u16, value: u32) -> Result<(), ConfigError> {
        (**self).write32(addr, offset, value)
    }
}
