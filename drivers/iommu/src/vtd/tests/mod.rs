//! Host tests of the VT-d driver against the register model.

mod accounting;
mod attach;
mod bringup;
mod fault_event;
mod faults;
mod intremap;
mod invalidation;

use sluice_hal::PhysAddr;
use sluice_hal::model::{ModelClock, ModelMemory};
use sluice_pci::Bdf;

use super::caps::CapBuilder;
use super::model::VtdModel;
use super::unit::{ModeRequest, VtdConfig, VtdUnit};
use super::walker::DmaRequest;

/// Host address width of the test platforms.
pub const HAW: u32 = 46;

pub fn config(mode: ModeRequest) -> VtdConfig {
    VtdConfig {
        mode,
        // 1000 polls of the 1 us model clock.
        timeout_ns: 1_000_000,
        ..VtdConfig::new(0, 0xfed9_0000, HAW)
    }
}

pub fn clock() -> ModelClock {
    ModelClock::new(1_000)
}

pub fn model<'m>(mem: &'m ModelMemory, caps: CapBuilder) -> VtdModel<'m> {
    VtdModel::new(mem, caps, HAW)
}

pub fn init<'a>(
    model: &'a VtdModel<'a>,
    mem: &'a ModelMemory,
    clock: &'a ModelClock,
    mode: ModeRequest,
) -> VtdUnit<'a> {
    match VtdUnit::init(model, mem, clock, config(mode)) {
        Ok(unit) => unit,
        Err(e) => panic!("init failed: {e}"),
    }
}

pub const DEV_A: Bdf = Bdf::new(0, 3, 0);
pub const DEV_B: Bdf = Bdf::new(0, 4, 0);
/// A device behind a PCIe-to-PCI bridge at 00:1e.0, whose DMA may carry the
/// bridge's requester ID.
pub const DEV_BEHIND_BRIDGE: Bdf = Bdf::new(5, 0, 0);
pub const BRIDGE_ALIAS: Bdf = Bdf::new(0, 0x1e, 0);
/// A device in the upper half of a bus (devfn >= 128).
pub const DEV_UPPER: Bdf = Bdf::new(2, 0x11, 1);

pub fn read(dev: Bdf, iova: u64) -> DmaRequest {
    DmaRequest::read(dev.requester_id(), iova)
}

pub fn write(dev: Bdf, iova: u64) -> DmaRequest {
    DmaRequest::write(dev.requester_id(), iova)
}

pub fn phys(addr: u64) -> PhysAddr {
    PhysAddr::new(addr)
}
