//! Driver for QEMU's `edu` teaching device (1234:11e8), Sluice's DMA
//! workhorse in tests. Register layout from QEMU's edu specification:
//! 0x00 identification, 0x04 liveness (reads back inverted), 0x80 DMA source,
//! 0x88 DMA destination, 0x90 DMA count, 0x98 DMA command (bit 0 start and
//! busy, bit 1 direction: set = device buffer → RAM). The device's own buffer
//! is at DMA address 0x40000 (4 KiB; QEMU 7.2 aborts on a transfer that
//! reaches its last byte, so transfers stay ≤ 2 KiB).

extern crate alloc;

use alloc::format;
use alloc::string::String;

use sluice_hal::{ReadOnly, ReadWrite, Reg32, Reg64, poll_until};
use sluice_kernel::clock::KernelClock;
use sluice_kernel::hw::PhysMmio;

const VENDOR: u16 = 0x1234;
const DEVICE: u16 = 0x11e8;
/// The device-side buffer as seen in DMA addresses.
pub const DEVICE_BUFFER: u64 = 0x40000;
pub const MAX_TRANSFER: u64 = 2048;

const IDENTIFICATION: Reg32<ReadOnly> = Reg32::new(0x00);
/// Interrupt status (bits raised and not acknowledged), raise (ORs into
/// the status and signals the interrupt: an MSI when MSI is enabled) and
/// acknowledge (clears status bits).
#[cfg(target_arch = "aarch64")]
const INTERRUPT_STATUS: Reg32<ReadOnly> = Reg32::new(0x24);
#[cfg(target_arch = "aarch64")]
const INTERRUPT_RAISE: Reg32<ReadWrite> = Reg32::new(0x60);
#[cfg(target_arch = "aarch64")]
const INTERRUPT_ACK: Reg32<ReadWrite> = Reg32::new(0x64);
const LIVENESS: Reg32<ReadWrite> = Reg32::new(0x04);
const DMA_SOURCE: Reg64<ReadWrite> = Reg64::new(0x80);
const DMA_DESTINATION: Reg64<ReadWrite> = Reg64::new(0x88);
const DMA_COUNT: Reg64<ReadWrite> = Reg64::new(0x90);
const DMA_COMMAND: Reg64<ReadWrite> = Reg64::new(0x98);

const COMMAND_START: u64 = 1 << 0;
const COMMAND_TO_RAM: u64 = 1 << 1;
/// QEMU runs a transfer about 100 ms after it is started.
const DMA_TIMEOUT_NS: u64 = 2_000_000_000;

/// Whether `function` is an edu device.
pub fn is_edu(function: &sluice_pci::Function) -> bool {
    (function.vendor_id, function.device_id) == (VENDOR, DEVICE)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// RAM (the `address` argument) → the device buffer.
    ToDevice,
    /// The device buffer → RAM.
    ToRam,
}

pub struct Edu {
    registers: PhysMmio,
}

impl Edu {
    /// # Safety
    /// `bar0` must be the edu device's BAR 0 (1 MiB of registers).
    pub unsafe fn new(bar0: u64, size: u64) -> Result<Self, String> {
        // SAFETY: the caller names edu's register BAR.
        let registers = unsafe { PhysMmio::new(bar0, size) };
        let edu = Self { registers };
        let id = IDENTIFICATION.read(&edu.registers);
        if id & 0xff != 0xed {
            return Err(format!(
                "BAR 0 at {bar0:#x} does not look like edu (identification {id:#x})"
            ));
        }
        LIVENESS.write(&edu.registers, 0x5a5a_0f0f);
        let back = LIVENESS.read(&edu.registers);
        if back != !0x5a5a_0f0f {
            return Err(format!(
                "edu liveness check failed: wrote 0x5a5a0f0f, read {back:#x}"
            ));
        }
        Ok(edu)
    }

    /// Raises the device's interrupt with status `bits`: edu signals it at
    /// once, as one MSI write when MSI is enabled. Whatever was pending is
    /// acknowledged first, so the status names this raise only. (Only the
    /// aarch64 ITS scenario raises edu interrupts so far.)
    #[cfg(target_arch = "aarch64")]
    pub fn raise_interrupt(&self, bits: u32) {
        let pending = INTERRUPT_STATUS.read(&self.registers);
        INTERRUPT_ACK.write(&self.registers, pending);
        INTERRUPT_RAISE.write(&self.registers, bits);
    }

    /// Runs one DMA transfer of `count` bytes between `address` (a DMA
    /// address: an IOVA when the IOMMU translates) and the device buffer
    /// at `DEVICE_BUFFER + offset`, waiting for it with a timeout.
    pub fn dma(
        &self,
        direction: Direction,
        address: u64,
        offset: u64,
        count: u64,
    ) -> Result<(), String> {
        if count == 0 || count > MAX_TRANSFER || offset + count > MAX_TRANSFER {
            return Err(format!(
                "edu transfer of {count} bytes at buffer offset {offset} is out of range"
            ));
        }
        let device = DEVICE_BUFFER + offset;
        let (source, destination, command) = match direction {
            Direction::ToDevice => (address, device, COMMAND_START),
            Direction::ToRam => (device, address, COMMAND_START | COMMAND_TO_RAM),
        };
        let busy = DMA_COMMAND.read(&self.registers) & COMMAND_START != 0;
        if busy {
            return Err(String::from(
                "edu DMA engine is still busy from an earlier transfer",
            ));
        }
        DMA_SOURCE.write(&self.registers, source);
        DMA_DESTINATION.write(&self.registers, destination);
        DMA_COUNT.write(&self.registers, count);
        DMA_COMMAND.write(&self.registers, command);
        poll_until(&KernelClock, DMA_TIMEOUT_NS, || {
            (DMA_COMMAND.read(&self.registers) & COMMAND_START == 0).then_some(())
        })
        .map_err(|t| {
            format!(
                "edu DMA did not finish within {} ms",
                t.waited_ns / 1_000_000
            )
        })
    }
}
