//! The MCFG table: where each segment's ECAM window lives (PCI Firmware
//! Specification 3.2 §4.1.2). Layout: the 36-byte SDT header, 8 reserved
//! bytes, then 16-byte allocation entries (base address u64, segment u16,
//! start bus u8, end bus u8, 4 reserved bytes).

use alloc::vec::Vec;

use crate::address::Segment;
use crate::sdt::{SdtError, SdtHeader, le_u8, le_u16, le_u64, parse_sdt};

pub const MCFG_SIGNATURE: &[u8; 4] = b"MCFG";
const ENTRIES_OFFSET: usize = 44;
const ENTRY_LEN: usize = 16;

/// One ECAM allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct McfgEntry {
    /// Physical address that corresponds to bus 0 of the segment: bus `n`'s
    /// configuration space is at `base + (n << 20)` even when `start_bus`
    /// is not 0 (PCI Firmware 3.2, Table 4-3).
    pub base: u64,
    pub segment: Segment,
    pub start_bus: u8,
    pub end_bus: u8,
}

impl McfgEntry {
    /// Physical start and length of the part of the window that decodes
    /// `start_bus..=end_bus`, i.e. what to map for [`crate::ecam::EcamWindow`].
    pub fn mapped_range(&self) -> Option<(u64, u64)> {
        let start = self.base.checked_add(u64::from(self.start_bus) << 20)?;
        let buses = u64::from(self.end_bus.checked_sub(self.start_bus)?) + 1;
        start.checked_add(buses << 20)?;
        Some((start, buses << 20))
    }
}

/// Problems with one entry; the other entries are still returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum McfgEntryError {
    /// End bus below start bus.
    InvertedBusRange {
        index: usize,
        start_bus: u8,
        end_bus: u8,
    },
    /// Base plus window size overflows the physical address space.
    WindowOverflows { index: usize, base: u64 },
    /// Bytes after the last whole entry.
    TrailingBytes { count: usize },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mcfg {
    pub header: SdtHeader,
    pub entries: Vec<McfgEntry>,
    pub errors: Vec<McfgEntryError>,
}

/// Parses a whole MCFG table (header included).
pub fn parse_mcfg(bytes: &[u8]) -> Result<Mcfg, SdtError> {
    let (header, table) = parse_sdt(bytes, MCFG_SIGNATURE, ENTRIES_OFFSET)?;
    let body = &table[ENTRIES_OFFSET..];
    let mut entries = Vec::new();
    let mut errors = Vec::new();
    for (index, raw) in body.chunks_exact(ENTRY_LEN).enumerate() {
        let (Some(base), Some(segment), Some(start_bus), Some(end_bus)) = (
            le_u64(raw, 0),
            le_u16(raw, 8),
            le_u8(raw, 10),
            le_u8(raw, 11),
        ) else {
            continue; // unreachable: chunks are exactly ENTRY_LEN bytes
        };
        let entry = McfgEntry {
            base,
            segment: Segment(segment),
            start_bus,
            end_bus,
        };
        if end_bus < start_bus {
            errors.push(McfgEntryError::InvertedBusRange {
                index,
                start_bus,
                end_bus,
            });
            continue;
        }
        if entry.mapped_range().is_none() {
            errors.push(McfgEntryError::WindowOverflows { index, base });
            continue;
        }
        entries.push(entry);
    }
    let trailing = body.len() % ENTRY_LEN;
    if trailing != 0 {
        errors.push(McfgEntryError::TrailingBytes { count: trailing });
    }
    Ok(Mcfg {
        header,
        entries,
        errors,
    })
}
