//! Enhanced Configuration Access Mechanism (PCIe Base 6.0 §7.2.2): each
//! function's 4 KiB of configuration space at
//! `base + (bus << 20 | device << 15 | function << 12)`.

use alloc::vec::Vec;

use sluice_hal::Mmio;

use crate::address::{PciAddress, Segment};
use crate::config::{ConfigError, ConfigSpace, check_offset};
use crate::mcfg::McfgEntry;

/// One mapped MCFG window. `mmio` offset 0 is the configuration space of
/// `start_bus`, device 0, function 0 (see [`McfgEntry::mapped_range`]).
pub struct EcamWindow<M> {
    pub segment: Segment,
    pub start_bus: u8,
    pub end_bus: u8,
    pub mmio: M,
}

impl<M> EcamWindow<M> {
    pub fn from_mcfg(entry: &McfgEntry, mmio: M) -> Self {
        Self {
            segment: entry.segment,
            start_bus: entry.start_bus,
            end_bus: entry.end_bus,
            mmio,
        }
    }

    fn covers(&self, addr: PciAddress) -> bool {
        addr.segment == self.segment && (self.start_bus..=self.end_bus).contains(&addr.bdf.bus())
    }

    fn offset_of(&self, addr: PciAddress, offset: u16) -> usize {
        let bus = usize::from(addr.bdf.bus() - self.start_bus);
        (bus << 20) | (usize::from(addr.bdf.devfn()) << 12) | usize::from(offset)
    }
}

/// Configuration access through every ECAM window firmware described.
pub struct Ecam<M> {
    windows: Vec<EcamWindow<M>>,
}

impl<M: Mmio> Ecam<M> {
    pub fn new(windows: Vec<EcamWindow<M>>) -> Self {
        Self { windows }
    }

    pub fn windows(&self) -> &[EcamWindow<M>] {
        &self.windows
    }

    fn window(&self, addr: PciAddress) -> Result<&EcamWindow<M>, ConfigError> {
        self.windows
            .iter()
            .find(|w| w.covers(addr))
            .ok_or(ConfigError::NoWindow(addr))
    }
}

impl<M: Mmio> ConfigSpace for Ecam<M> {
    fn read32(&self, addr: PciAddress, offset: u16) -> Result<u32, ConfigError> {
        check_offset(addr, offset, 4)?;
        let w = self.window(addr)?;
        Ok(w.mmio.read32(w.offset_of(addr, offset)))
    }

    fn write32(&self, addr: PciAddress, offset: u16, value: u32) -> Result<(), ConfigError> {
        check_offset(addr, offset, 4)?;
        let w = self.window(addr)?;
        w.mmio.write32(w.offset_of(addr, offset), value);
        Ok(())
    }
}
