//! Primary fault logging (VT-d spec rev 4.x, 7.1.3 and 11.4.7): decoding
//! the fault-recording registers and draining them without ever stalling.

use alloc::vec::Vec;
use core::fmt;

use sluice_hal::Mmio;
use sluice_pci::Bdf;

use super::caps::VtdCapabilities;
use super::regs::{self, frcd, fsts};

/// A fault reason code (spec appendix "Non-recoverable Fault Reason
/// Encodings").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FaultReason(pub u8);

/// What a fault means for the guest that owns the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultClass {
    /// No translation: a root/context/PASID entry or a page is not present.
    NotPresent,
    /// The page is present but does not allow the access.
    Permission,
    /// The address is beyond the domain's width.
    AddressWidth,
    /// The request type is blocked by the translation structures.
    Blocked,
    /// The translation structures are malformed (reserved bits, invalid
    /// programming, access errors): a driver bug or memory corruption.
    Malformed,
    /// Interrupt-remapping faults.
    InterruptRemapping,
    Other,
}

impl FaultReason {
    /// The spec's description of the reason. Scalable-mode codes are named
    /// by the structure they concern and their entry in the spec's table
    /// (e.g. "SSL.2") where the table has more than access error /
    /// not present / reserved entries.
    pub const fn description(self) -> &'static str {
        match self.0 {
            0x01 => "root entry not present",
            0x02 => "context entry not present",
            0x03 => "invalid context entry programming",
            0x04 => "address beyond the domain's address width",
            0x05 => "write without write permission",
            0x06 => "read without read permission",
            0x07 => "error accessing a second-level paging entry",
            0x08 => "error accessing the root entry",
            0x09 => "error accessing the context entry",
            0x0a => "reserved bits set in the root entry",
            0x0b => "reserved bits set in the context entry",
            0x0c => "reserved bits set in a second-level paging entry",
            0x0d => "request blocked by the context entry's translation type",
            0x0e => "legacy-mode general fault (LGN.4)",
            0x20 => "reserved bits set in a remappable interrupt request",
            0x21 => "interrupt index beyond the remapping table",
            0x22 => "interrupt remapping table entry not present",
            0x23 => "error accessing the interrupt remapping table",
            0x24 => "reserved bits set in the interrupt remapping table entry",
            0x25 => "compatibility-format interrupt blocked",
            0x26 => "invalid source-id validation in the remapping table entry",
            0x27 => "error accessing a posted-interrupt descriptor",
            0x28 => "reserved bits set in a posted-interrupt descriptor",
            0x29 => "interrupt request without PASID is invalid",
            0x30..=0x33 => "invalid root-table address register programming (RTA)",
            0x38 => "error accessing the scalable-mode root entry",
            0x39 => "scalable-mode root entry not present",
            0x3a => "reserved bits set in the scalable-mode root entry",
            0x40 => "error accessing the scalable-mode context entry",
            0x41 => "scalable-mode context entry not present",
            0x42 => "reserved bits set in the scalable-mode context entry",
            0x43 => "invalid scalable-mode context entry programming",
            0x44..=0x48 => "scalable-mode context entry fault (SCT.5-9)",
            0x50 => "error accessing the PASID-directory entry",
            0x51 => "PASID-directory entry not present",
            0x52 => "reserved bits set in the PASID-directory entry",
            0x58 => "error accessing the PASID-table entry",
            0x59 => "PASID-table entry not present",
            0x5a => "reserved bits set in the PASID-table entry",
            0x5b => "invalid PASID-table entry programming",
            0x5c | 0x5d => "PASID-table entry fault (SPT.5-6)",
            0x70..=0x77 | 0x90 | 0x91 => "scalable-mode first-level paging fault (SFL)",
            0x78..=0x7d => "scalable-mode second-level paging fault (SSL)",
            0x80..=0x89 => "scalable-mode general translation fault (SGN)",
            _ => "unknown fault reason",
        }
    }

    /// The class of the reason, for reporting to the owner of the device.
    pub const fn class(self) -> FaultClass {
        match self.0 {
            0x01 | 0x02 | 0x39 | 0x41 | 0x51 | 0x59 | 0x71 => FaultClass::NotPresent,
            0x05 | 0x06 => FaultClass::Permission,
            0x04 => FaultClass::AddressWidth,
            0x0d => FaultClass::Blocked,
            0x03
            | 0x07..=0x0c
            | 0x30..=0x33
            | 0x38
            | 0x3a
            | 0x40
            | 0x42
            | 0x43
            | 0x50
            | 0x52
            | 0x58
            | 0x5a
            | 0x5b => FaultClass::Malformed,
            0x20..=0x29 => FaultClass::InterruptRemapping,
            _ => FaultClass::Other,
        }
    }
}

impl fmt::Display for FaultReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (reason {:#04x})", self.description(), self.0)
    }
}

/// The kind of the faulting request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessKind {
    Read,
    Write,
}

/// One decoded fault-recording register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultRecord {
    /// Which fault-recording register held it.
    pub index: u16,
    /// The requester (source ID).
    pub source: Bdf,
    /// The page address of the request (FI bits 63:12).
    pub address: u64,
    pub access: AccessKind,
    pub reason: FaultReason,
    /// The request's PASID when it carried one (PP set).
    pub pasid: Option<u32>,
    pub privileged: bool,
    pub execute: bool,
    /// The request's address type (AT): 0 untranslated, 1 translation
    /// request, 2 translated.
    pub address_type: u8,
}

impl FaultRecord {
    /// Decodes the two halves of a fault-recording register, or `None`
    /// when its F bit is clear.
    pub const fn decode(index: u16, low: u64, high: u64) -> Option<Self> {
        if high & frcd::F == 0 {
            return None;
        }
        Some(Self {
            index,
            source: Bdf::from_requester_id((high & frcd::SID_MASK) as u16),
            address: low & frcd::FI_MASK,
            // T1 = 1: read (or AtomicOp); 0: write.
            access: if high & frcd::T1 != 0 {
                AccessKind::Read
            } else {
                AccessKind::Write
            },
            reason: FaultReason(((high >> frcd::FR_SHIFT) & 0xff) as u8),
            pasid: if high & frcd::PP != 0 {
                Some(((high >> frcd::PV_SHIFT) & frcd::PV_MASK) as u32)
            } else {
                None
            },
            privileged: high & frcd::PRIV != 0,
            execute: high & frcd::EXE != 0,
            address_type: ((high >> frcd::AT_SHIFT) & 0b11) as u8,
        })
    }
}

impl fmt::Display for FaultRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let access = match self.access {
            AccessKind::Read => "read",
            AccessKind::Write => "write",
        };
        write!(f, "DMA {access} from {} ", self.source)?;
        if let Some(p) = self.pasid {
            write!(f, "PASID {p} ")?;
        }
        write!(f, "at {:#x}: {}", self.address, self.reason)
    }
}

/// The result of one pass over the fault-recording registers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawDrain {
    pub records: Vec<FaultRecord>,
    /// FSTS.PFO was set: faults were lost because every register was full.
    pub overflowed: bool,
    /// Records not logged because of the per-drain log limit.
    pub suppressed_logs: usize,
}

/// Reads every pending fault record once, starting at FSTS.FRI, clears each
/// (F is write-1-to-clear), then clears PFO; `sink` gets each record as
/// `(index, low, high)`. At most `record_count` registers are read, so a
/// fault storm cannot keep the caller here. Nothing is logged or
/// allocated: the fault-event interrupt handler uses this too. Returns
/// whether PFO was set (faults were lost).
pub fn read_records(
    mmio: &dyn Mmio,
    record_offset: usize,
    record_count: u32,
    mut sink: impl FnMut(u16, u64, u64),
) -> bool {
    let status = regs::FSTS.read(mmio);
    let count = record_count as usize;
    if status & fsts::PPF != 0 && count > 0 {
        let first = ((status & fsts::FRI_MASK) >> fsts::FRI_SHIFT) as usize % count;
        for step in 0..count {
            let index = (first + step) % count;
            let (low_reg, high_reg) = regs::fault_record(record_offset, index);
            let high = high_reg.read(mmio);
            if high & frcd::F == 0 {
                continue;
            }
            let low = low_reg.read(mmio);
            high_reg.write(mmio, frcd::F);
            sink(index as u16, low, high);
        }
    }
    let overflowed = status & fsts::PFO != 0;
    if overflowed {
        regs::FSTS.write(mmio, fsts::PFO);
    }
    overflowed
}

/// Logs `records` (at most `log_limit` of them, the rest only counted) and
/// an overflow; returns the number not logged.
pub fn log_records(
    unit: u32,
    records: &[FaultRecord],
    overflowed: bool,
    log_limit: usize,
) -> usize {
    for record in records.iter().take(log_limit) {
        log::warn!("vtd{unit}: {record}");
    }
    if overflowed {
        log::warn!("vtd{unit}: fault-recording registers overflowed; some faults were lost");
    }
    let suppressed = records.len().saturating_sub(log_limit);
    if suppressed > 0 {
        log::warn!("vtd{unit}: {suppressed} more DMA faults not logged (rate limit)");
    }
    suppressed
}

/// [`read_records`] with the records decoded and logged (at most
/// `log_limit` of them, the rest only counted).
pub fn drain_records(
    mmio: &dyn Mmio,
    caps: &VtdCapabilities,
    unit: u32,
    log_limit: usize,
) -> RawDrain {
    let mut records = Vec::new();
    let overflowed = read_records(
        mmio,
        caps.fault_record_offset,
        caps.fault_record_count,
        |index, low, high| records.extend(FaultRecord::decode(index, low, high)),
    );
    let suppressed_logs = log_records(unit, &records, overflowed, log_limit);
    RawDrain {
        records,
        overflowed,
        suppressed_logs,
    }
}

#[cfg(test)]
mod tests {
    use alloc::format;

    use super::*;

    #[test]
    fn fault_record_fields_decode_by_name() {
        let high = frcd::F | frcd::T1 | (0x02u64 << frcd::FR_SHIFT) | 0x0018;
        let r = FaultRecord::decode(3, 0x1234_5678, high).expect("F is set");
        assert_eq!(r.index, 3);
        assert_eq!(r.source, Bdf::new(0, 3, 0));
        assert_eq!(r.address, 0x1234_5000);
        assert_eq!(r.access, AccessKind::Read);
        assert_eq!(r.reason.class(), FaultClass::NotPresent);
        assert_eq!(r.pasid, None);
        assert_eq!(
            format!("{r}"),
            "DMA read from 00:03.0 at 0x12345000: context entry not present (reason 0x02)"
        );
        let w = FaultRecord::decode(
            0,
            0,
            frcd::F | frcd::PP | (5 << frcd::PV_SHIFT) | (0x05 << frcd::FR_SHIFT),
        )
        .expect("F is set");
        assert_eq!((w.access, w.pasid), (AccessKind::Write, Some(5)));
        assert_eq!(w.reason.class(), FaultClass::Permission);
        assert_eq!(FaultRecord::decode(0, 0, 0), None);
        assert_eq!(
            FaultReason(0x59).description(),
            "PASID-table entry not present"
        );
    }
}
