//! What a driver of a memory-walking device (an IOMMU, an ITS) holds for
//! every register access, wait and table write: the three traits, how long
//! a wait may take, and whether the device snoops CPU caches.

use crate::clock::{Clock, Timeout, poll_until};
use crate::dma::{DmaMemory, PhysAddr};
use crate::mmio::Mmio;

#[derive(Clone, Copy)]
pub struct DeviceAccess<'a> {
    pub mmio: &'a dyn Mmio,
    pub mem: &'a dyn DmaMemory,
    pub clock: &'a dyn Clock,
    /// How long any one wait on the device may take.
    pub timeout_ns: u64,
    /// Whether the device's reads of memory structures snoop CPU caches
    /// (VT-d ECAP.C, SMMU IDR0.COHACC, ITS shareability); when not, every
    /// write it will read is cleaned to the point of coherency first.
    pub coherent: bool,
}

impl DeviceAccess<'_> {
    /// Makes CPU writes to `[addr, addr + len)` visible to the device.
    pub fn flush(&self, addr: PhysAddr, len: u64) {
        if !self.coherent {
            self.mem.flush_for_device(addr, len);
        }
    }

    /// Waits until `done`, at most `timeout_ns`.
    pub fn wait_until(&self, mut done: impl FnMut() -> bool) -> Result<(), Timeout> {
        poll_until(self.clock, self.timeout_ns, || done().then_some(()))
    }
}
