//! Base Address Registers (PCI 3.0 §6.2.5.1): decoding and sizing.
//!
//! Sizing writes all ones to a BAR and reads back which address bits are
//! writable. While a BAR holds all ones it would decode a bogus range, so
//! memory and I/O decode are switched off in COMMAND around the sizing, and
//! the BARs and COMMAND are restored to exactly what firmware left.

use alloc::vec::Vec;

use crate::address::PciAddress;
use crate::config::{
    BAR0, COMMAND, COMMAND_IO_SPACE, COMMAND_MEMORY_SPACE, ConfigError, ConfigSpace,
};

/// Type 0 headers have six BARs, type 1 (bridge) headers two.
pub const ENDPOINT_BARS: u8 = 6;
pub const BRIDGE_BARS: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// Memory BAR, 32-bit address (type 00b; also the legacy "below 1 MiB"
    /// type 01b, which decodes the same way).
    Memory32,
    /// Memory BAR, 64-bit address (type 10b), using the next BAR slot for
    /// the upper half.
    Memory64,
    Io,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    /// BAR slot (0-5); a 64-bit BAR also uses `index + 1`.
    pub index: u8,
    pub kind: BarKind,
    pub prefetchable: bool,
    /// Address firmware assigned.
    pub address: u64,
    /// Size in bytes (a power of two).
    pub size: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarError {
    /// A 64-bit BAR in the last slot has no upper half.
    Memory64InLastSlot {
        index: u8,
    },
    /// Memory type 11b is reserved.
    ReservedMemoryType {
        index: u8,
    },
    /// The writable bits read back are not a contiguous mask (so no
    /// power-of-two size can be derived).
    NonContiguousSizeMask {
        index: u8,
        mask: u64,
    },
    Config(ConfigError),
}

impl From<ConfigError> for BarError {
    fn from(e: ConfigError) -> Self {
        Self::Config(e)
    }
}

fn bar_offset(index: u8) -> u16 {
    BAR0 + 4 * u16::from(index)
}

/// Decodes and sizes the first `count` BARs of `addr`. Unimplemented BARs
/// (reading back zero) are left out.
pub fn size_bars(cfg: &dyn ConfigSpace, addr: PciAddress, count: u8) -> (Vec<Bar>, Vec<BarError>) {
    let mut bars = Vec::new();
    let mut errors = Vec::new();
    let command = match cfg.read16(addr, COMMAND) {
        Ok(c) => c,
        Err(e) => {
            errors.push(e.into());
            return (bars, errors);
        }
    };
    let decode = COMMAND_IO_SPACE | COMMAND_MEMORY_SPACE;
    if command & decode != 0
        && let Err(e) = cfg.write16(addr, COMMAND, command & !decode)
    {
        errors.push(e.into());
        return (bars, errors);
    }
    let mut index = 0;
    while index < count {
        match size_one(cfg, addr, index, count) {
            Ok((bar, used)) => {
                bars.extend(bar);
                index += used;
            }
            Err((e, used)) => {
                errors.push(e);
                index += used;
            }
        }
    }
    if command & decode != 0
        && let Err(e) = cfg.write16(addr, COMMAND, command)
    {
        errors.push(e.into());
    }
    (bars, errors)
}

/// Writes all ones to the BAR at `offset`, returns what reads back, and
/// restores the original value.
fn probe(
    cfg: &dyn ConfigSpace,
    addr: PciAddress,
    offset: u16,
    original: u32,
) -> Result<u32, ConfigError> {
    cfg.write32(addr, offset, 0xffff_ffff)?;
    let readback = cfg.read32(addr, offset);
    let restored = cfg.write32(addr, offset, original);
    let readback = readback?;
    restored?;
    Ok(readback)
}

type SizeResult = Result<(Option<Bar>, u8), (BarError, u8)>;

fn size_one(cfg: &dyn ConfigSpace, addr: PciAddress, index: u8, count: u8) -> SizeResult {
    let offset = bar_offset(index);
    let original = cfg.read32(addr, offset).map_err(|e| (e.into(), 1))?;
    if original & 1 != 0 {
        let mask = probe(cfg, addr, offset, original).map_err(|e| (e.into(), 1))? & !3;
        if mask == 0 {
            return Ok((None, 1));
        }
        // I/O BARs may implement only 16 address bits; the upper half then
        // reads back zero and must count as all ones for the size.
        let mask = if mask & 0xffff_0000 == 0 {
            mask | 0xffff_0000
        } else {
            mask
        };
        let size = u64::from((!mask).wrapping_add(1));
        return check_mask(index, u64::from(mask) | 0xffff_ffff_0000_0000, size)
            .map(|()| {
                (
                    Some(Bar {
                        index,
                        kind: BarKind::Io,
                        prefetchable: false,
                        address: u64::from(original & !3),
                        size,
                    }),
                    1,
                )
            })
            .map_err(|e| (e, 1));
    }
    let prefetchable = original & (1 << 3) != 0;
    match (original >> 1) & 3 {
        0 | 1 => {
            let mask = probe(cfg, addr, offset, original).map_err(|e| (e.into(), 1))? & !0xf;
            if mask == 0 {
                return Ok((None, 1));
            }
            let full = u64::from(mask) | 0xffff_ffff_0000_0000;
            let size = (!full).wrapping_add(1);
            check_mask(index, full, size).map_err(|e| (e, 1))?;
            Ok((
                Some(Bar {
                    index,
                    kind: BarKind::Memory32,
                    prefetchable,
                    address: u64::from(original & !0xf),
                    size,
                }),
                1,
            ))
        }
        2 => {
            if index + 1 >= count {
                return Err((BarError::Memory64InLastSlot { index }, 1));
            }
            let upper_offset = bar_offset(index + 1);
            let original_upper = cfg.read32(addr, upper_offset).map_err(|e| (e.into(), 2))?;
            let low = probe(cfg, addr, offset, original).map_err(|e| (e.into(), 2))? & !0xf;
            let high = probe(cfg, addr, upper_offset, original_upper).map_err(|e| (e.into(), 2))?;
            let full = (u64::from(high) << 32) | u64::from(low);
            if full == 0 {
                return Ok((None, 2));
            }
            let size = (!full).wrapping_add(1);
            check_mask(index, full, size).map_err(|e| (e, 2))?;
            Ok((
                Some(Bar {
                    index,
                    kind: BarKind::Memory64,
                    prefetchable,
                    address: (u64::from(original_upper) << 32) | u64::from(original & !0xf),
                    size,
                }),
                2,
            ))
        }
        _ => Err((BarError::ReservedMemoryType { index }, 1)),
    }
}

/// A size mask must be ones from the top down to the size bit.
fn check_mask(index: u8, mask: u64, size: u64) -> Result<(), BarError> {
    if size.is_power_of_two() && mask == !(size - 1) {
        Ok(())
    } else {
        Err(BarError::NonContiguousSizeMask { index, mask })
    }
}
