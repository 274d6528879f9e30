//! The guest's PCI bus through the ECAM window (PCI Express Base
//! Specification, "Enhanced Configuration Access Mechanism": function
//! `bus:dev.fn` at `base + (bus << 20 | dev << 15 | fn << 12)`).

use crate::arch;
use crate::console::{Reason, fail};
use crate::start_info::StartInfo;

/// Type 0 header offsets and COMMAND bits (PCI Local Bus Specification
/// 3.0, 6.1 and 6.2.2).
pub const VENDOR_ID: u16 = 0x00;
pub const DEVICE_ID: u16 = 0x02;
pub const COMMAND: u16 = 0x04;
pub const HEADER_TYPE: u16 = 0x0e;
pub const BAR0: u16 = 0x10;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;

/// The guest's PCI BAR window (`docs/boot-protocol.md`, "Guest-physical
/// memory", and its aarch64 section).
#[cfg(not(target_arch = "aarch64"))]
pub const BAR_WINDOW: (u64, u64) = (0xc000_0000, 0xe000_0000);
#[cfg(target_arch = "aarch64")]
pub const BAR_WINDOW: (u64, u64) = (0x1000_0000, 0x3000_0000);

/// One function's configuration space in the ECAM window.
#[derive(Debug, Clone, Copy)]
pub struct Function {
    /// ABI packing: `segment << 16 | bus << 8 | device << 3 | function`.
    pub bdf: u32,
    base: u64,
}

impl Function {
    /// The function at ABI BDF `bdf`, if the window (`ecam_base`, `buses`
    /// buses) holds it.
    pub fn new(info: &StartInfo, bdf: u32) -> Result<Self, Reason> {
        let (segment, bus) = (bdf >> 16, (bdf >> 8) & 0xff);
        if segment != 0 || bus >= info.ecam_buses {
            return fail!("BDF {bdf:#x} is outside the ECAM window");
        }
        // Bus, device and function make bits 27:12 of the offset.
        let base = info.ecam_base + (u64::from(bdf & 0xffff) << 12);
        Ok(Function { bdf, base })
    }

    pub fn read16(&self, offset: u16) -> u16 {
        // SAFETY: inside this function's 4 KiB of the ECAM window, which
        // Sluice emulates; a 2-byte MOVZX.
        unsafe { arch::mmio_read16(self.base + u64::from(offset & 0xffe)) }
    }

    pub fn read32(&self, offset: u16) -> u32 {
        // SAFETY: as `read16`; a 4-byte MOV.
        unsafe { arch::mmio_read32(self.base + u64::from(offset & 0xffc)) }
    }

    pub fn read8(&self, offset: u16) -> u8 {
        // SAFETY: as `read16`; a 1-byte MOVZX.
        unsafe { arch::mmio_read8(self.base + u64::from(offset & 0xfff)) }
    }

    pub fn write16(&self, offset: u16, value: u16) {
        // SAFETY: as `read16`.
        unsafe { arch::mmio_write16(self.base + u64::from(offset & 0xffe), value) }
    }

    pub fn command(&self) -> u16 {
        self.read16(COMMAND)
    }

    /// Sets or clears `bits` of COMMAND (a 16-bit write: STATUS next to it
    /// is write-one-to-clear and must not be written).
    pub fn set_command(&self, bits: u16, on: bool) -> u16 {
        let old = self.command();
        let new = if on { old | bits } else { old & !bits };
        self.write16(COMMAND, new);
        self.command()
    }

    /// BAR 0's address (32- or 64-bit memory BAR), as Sluice placed it.
    pub fn bar0(&self) -> Result<u64, Reason> {
        if self.read8(HEADER_TYPE) & 0x7f != 0 {
            return fail!("not a type 0 header");
        }
        let low = self.read32(BAR0);
        if low & 1 != 0 {
            return fail!("BAR0 {low:#x} is an I/O BAR");
        }
        let address = match (low >> 1) & 3 {
            0 => u64::from(low & !0xf),
            2 => u64::from(low & !0xf) | u64::from(self.read32(BAR0 + 4)) << 32,
            _ => return fail!("BAR0 {low:#x} has a reserved type"),
        };
        if !(BAR_WINDOW.0..BAR_WINDOW.1).contains(&address) {
            return fail!("BAR0 at {address:#x} is outside the BAR window");
        }
        Ok(address)
    }
}
