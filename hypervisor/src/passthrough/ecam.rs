//! The trapped ECAM window: decoding a guest-physical address into a
//! configuration access (PCI Express Base Specification, §7.2.2, table
//! 7-1: address bits 27:20 bus, 19:15 device, 14:12 function, 11:0
//! register), and emulating the guest instruction that touched it.
//!
//! The nested tables leave the window unmapped, so every guest access is
//! a nested page fault at the ECAM GPA. The fault says where, not what:
//! the instruction is decoded ([`crate::vcpu::decode`]) for its size,
//! direction and register, the access goes to the [`GuestPciBus`], a load
//! lands in the destination register with the x86 rules, and the caller
//! advances RIP by the returned length.

use sluice_pci::{Bdf, ConfigSpace};

use super::config_space::GuestPciBus;
use crate::vcpu::decode::{
    self, CodeMode, DecodeError, InstructionFetch, Operation, StoreSource, read_register,
    write_register,
};
use crate::vcpu::{AccessKind, AccessSize, GuestRegisters};

/// A guest ECAM window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EcamWindow {
    pub base: u64,
    /// Buses the window decodes, from 0.
    pub buses: u16,
}

impl EcamWindow {
    pub const fn size(&self) -> u64 {
        (self.buses as u64) << 20
    }

    pub const fn contains(&self, gpa: u64) -> bool {
        gpa >= self.base && gpa - self.base < self.size()
    }

    /// The function and register `gpa` addresses, or `None` outside the
    /// window.
    pub const fn decode(&self, gpa: u64) -> Option<(Bdf, u16)> {
        if !self.contains(gpa) {
            return None;
        }
        let offset = gpa - self.base;
        let bus = (offset >> 20) as u8;
        let device = ((offset >> 15) & 0x1f) as u8;
        let function = ((offset >> 12) & 7) as u8;
        Some((Bdf::new(bus, device, function), (offset & 0xfff) as u16))
    }

    /// The guest-physical address of (`bdf`, `register`).
    pub const fn address(&self, bdf: Bdf, register: u16) -> u64 {
        self.base + ((bdf.requester_id() as u64) << 12) + (register & 0xfff) as u64
    }
}

/// Why an ECAM exit could not be emulated. The VM is stopped with a log
/// line: resuming would repeat the fault forever or skip an instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmioError {
    /// The fault address is outside the window.
    NotEcam(u64),
    /// The instruction could not be decoded.
    Decode(DecodeError),
    /// The instruction is not a memory access (`HLT`, port I/O, ...).
    NotAMemoryAccess,
    /// The instruction's direction disagrees with the fault (a load that
    /// faulted as a write, or an instruction fetch from the window).
    AccessMismatch,
}

impl From<DecodeError> for MmioError {
    fn from(e: DecodeError) -> Self {
        MmioError::Decode(e)
    }
}

/// Emulates the instruction at `rip` that faulted with `access` at `gpa`
/// in `window`; returns the instruction length for the caller to advance
/// RIP by.
///
/// An access wider than a dword or crossing a dword is not a valid ECAM
/// access (PCIe Base §7.2.2.2): it completes as an unsupported request
/// would, reads all ones and writes nothing.
#[allow(clippy::too_many_arguments)]
pub fn emulate_ecam_access<C: ConfigSpace, F: InstructionFetch + ?Sized>(
    bus: &mut GuestPciBus<C>,
    window: &EcamWindow,
    gpa: u64,
    access: AccessKind,
    fetch: &F,
    rip: u64,
    mode: CodeMode,
    regs: &mut GuestRegisters,
) -> Result<u8, MmioError> {
    let (bdf, offset) = window.decode(gpa).ok_or(MmioError::NotEcam(gpa))?;
    let insn = decode::decode(fetch, rip, mode)?;
    if access == AccessKind::Execute {
        return Err(MmioError::AccessMismatch);
    }
    let is_store = matches!(insn.operation, Operation::MovStore { .. });
    match insn.operation {
        Operation::MovStore { .. }
        | Operation::MovLoad { .. }
        | Operation::MovZeroExtend { .. } => {}
        _ => return Err(MmioError::NotAMemoryAccess),
    }
    if is_store != (access == AccessKind::Write) {
        return Err(MmioError::AccessMismatch);
    }
    let valid =
        |size: AccessSize| size != AccessSize::Qword && (offset & 3) + u16::from(size.bytes()) <= 4;
    match insn.operation {
        Operation::MovStore { size, source } => {
            let value = match source {
                StoreSource::Register(r) => read_register(regs, r, size),
                StoreSource::Immediate(v) => v,
            };
            if valid(size) {
                bus.write(bdf, offset, size, value as u32);
            } else {
                log::debug!("ECAM write of {} bytes at {gpa:#x} dropped", size.bytes());
            }
        }
        Operation::MovLoad { size, destination } => {
            let value = if valid(size) {
                u64::from(bus.read(bdf, offset, size))
            } else {
                size.mask()
            };
            write_register(regs, destination, size, value);
        }
        Operation::MovZeroExtend {
            size,
            destination,
            destination_size,
        } => {
            let value = if valid(size) {
                u64::from(bus.read(bdf, offset, size))
            } else {
                size.mask()
            };
            write_register(regs, destination, destination_size, value);
        }
        _ => return Err(MmioError::NotAMemoryAccess),
    }
    Ok(insn.length)
}
