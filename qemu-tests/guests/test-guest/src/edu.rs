//! QEMU's `edu` device (1234:11e8), from QEMU's `docs/specs/edu.rst`:
//! 0x00 identification (`0xRRrr00ed`), 0x04 liveness (reads back
//! inverted), 0x80 DMA source, 0x88 DMA destination, 0x90 count, 0x98
//! command: bit 0 start (clear when done), bit 1 direction (0: RAM → edu,
//! 1: edu → RAM). The device-side buffer is at DMA address 0x40000;
//! DMA addresses are masked to 28 bits.

use crate::arch;
use crate::console::{Reason, fail};
use crate::layout::{EDU_DMA_LIMIT, TRANSFER};
use crate::pci::{COMMAND_MEMORY, Function};
use crate::start_info::StartInfo;

pub const VENDOR: u16 = 0x1234;
pub const DEVICE: u16 = 0x11e8;
/// The device buffer in DMA addresses.
pub const DEVICE_BUFFER: u64 = 0x4_0000;

const IDENTIFICATION: u64 = 0x00;
const LIVENESS: u64 = 0x04;
const DMA_SOURCE: u64 = 0x80;
const DMA_DESTINATION: u64 = 0x88;
const DMA_COUNT: u64 = 0x90;
const DMA_COMMAND: u64 = 0x98;
const COMMAND_START: u64 = 1 << 0;
const COMMAND_TO_RAM: u64 = 1 << 1;

/// Polls of the command register before a transfer counts as stuck. QEMU
/// runs a transfer about 100 ms after it starts; each poll is a trapped
/// MMIO read, so this is many seconds.
const POLL_LIMIT: u32 = 20_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// RAM (a DMA address) → the device buffer.
    ToDevice,
    /// The device buffer → RAM.
    ToRam,
}

pub struct Edu {
    pub function: Function,
    /// IOMMU group from the start info.
    pub group: u32,
    bar0: u64,
}

impl Edu {
    /// The `index`th edu of the start-info device list, checked on the bus:
    /// identity in configuration space, BAR 0 placed, memory decoding on,
    /// the identification and liveness registers answering.
    pub fn find(info: &StartInfo, index: usize) -> Result<Edu, Reason> {
        let Some(d) = info
            .devices()
            .iter()
            .filter(|d| (d.vendor_id, d.device_id) == (VENDOR, DEVICE))
            .nth(index)
        else {
            return fail!("no edu #{index} in the start-info device list");
        };
        let function = Function::new(info, d.guest_bdf)?;
        let (vendor, device) = (
            function.read16(crate::pci::VENDOR_ID),
            function.read16(crate::pci::DEVICE_ID),
        );
        if (vendor, device) != (VENDOR, DEVICE) {
            return fail!(
                "ECAM at BDF {:#x} reads {vendor:04x}:{device:04x}, not edu",
                d.guest_bdf
            );
        }
        let bar0 = function.bar0()?;
        let command = function.set_command(COMMAND_MEMORY, true);
        if command & COMMAND_MEMORY == 0 {
            return fail!("memory decoding did not turn on (COMMAND {command:#x})");
        }
        let edu = Edu {
            function,
            group: d.iommu_group,
            bar0,
        };
        let id = edu.read32(IDENTIFICATION);
        if id & 0xff != 0xed {
            return fail!("BAR0 at {bar0:#x}: identification {id:#x} is not edu's");
        }
        edu.write32(LIVENESS, 0x5a5a_0f0f);
        let back = edu.read32(LIVENESS);
        if back != !0x5a5a_0f0f {
            return fail!("liveness check: wrote 0x5a5a0f0f, read {back:#x}");
        }
        Ok(edu)
    }

    fn read32(&self, offset: u64) -> u32 {
        // SAFETY: edu's register BAR, 1 MiB, checked to be in the BAR window.
        unsafe { arch::mmio_read32(self.bar0 + offset) }
    }

    fn write32(&self, offset: u64, value: u32) {
        // SAFETY: as `read32`.
        unsafe { arch::mmio_write32(self.bar0 + offset, value) }
    }

    fn read64(&self, offset: u64) -> u64 {
        // SAFETY: as `read32`.
        unsafe { arch::mmio_read64(self.bar0 + offset) }
    }

    fn write64(&self, offset: u64, value: u64) {
        // SAFETY: as `read32`.
        unsafe { arch::mmio_write64(self.bar0 + offset, value) }
    }

    /// One transfer of [`TRANSFER`] bytes between DMA address `address` and
    /// the start of the device buffer; returns when edu reports it done
    /// (which it does whether or not the IOMMU let the access through).
    pub fn dma(&self, direction: Direction, address: u64) -> Result<(), Reason> {
        if address >= EDU_DMA_LIMIT {
            return fail!(
                "DMA address {address:#x} is beyond edu's {}-bit mask",
                EDU_DMA_LIMIT.trailing_zeros()
            );
        }
        let (source, destination, command) = match direction {
            Direction::ToDevice => (address, DEVICE_BUFFER, COMMAND_START),
            Direction::ToRam => (DEVICE_BUFFER, address, COMMAND_START | COMMAND_TO_RAM),
        };
        if self.read64(DMA_COMMAND) & COMMAND_START != 0 {
            return fail!("edu is still busy with an earlier transfer");
        }
        self.write64(DMA_SOURCE, source);
        self.write64(DMA_DESTINATION, destination);
        self.write64(DMA_COUNT, TRANSFER as u64);
        self.write64(DMA_COMMAND, command);
        for _ in 0..POLL_LIMIT {
            if self.read64(DMA_COMMAND) & COMMAND_START == 0 {
                return Ok(());
            }
            arch::relax();
        }
        fail!("edu DMA ({direction:?} at {address:#x}) did not finish after {POLL_LIMIT} polls")
    }
}
