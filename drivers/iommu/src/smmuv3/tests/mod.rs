//! Host tests of the SMMUv3 driver against the register model.

mod bringup;
mod events;
mod ownership;
mod queues;
mod structures;
mod substreams;
mod translation;

use sluice_hal::PhysAddr;
use sluice_hal::model::{ModelClock, ModelMemory};

use super::caps::IdrBuilder;
use super::model::SmmuModel;
use super::unit::{SmmuConfig, SmmuUnit};
use super::walker::Request;

pub fn config() -> SmmuConfig {
    SmmuConfig {
        // 1000 polls of the 1 us model clock.
        timeout_ns: 1_000_000,
        ..SmmuConfig::new(0, 0x0905_0000)
    }
}

pub fn clock() -> ModelClock {
    ModelClock::new(1_000)
}

/// Stage 1 and stage 2, coherent, 2-level stream table, 8-bit
/// SubstreamIDs with 2-level CD tables, range invalidation.
pub fn both_stages() -> IdrBuilder {
    IdrBuilder {
        stage2: true,
        vmid16: true,
        ssid_bits: 8,
        cd2l: true,
        msi: false,
        ..IdrBuilder::qemu_7_2()
    }
}

pub fn init<'a>(
    model: &'a SmmuModel<'a>,
    mem: &'a ModelMemory,
    clock: &'a ModelClock,
) -> SmmuUnit<'a> {
    init_with(model, mem, clock, config())
}

pub fn init_with<'a>(
    model: &'a SmmuModel<'a>,
    mem: &'a ModelMemory,
    clock: &'a ModelClock,
    config: SmmuConfig,
) -> SmmuUnit<'a> {
    match SmmuUnit::init(model, mem, clock, config) {
        Ok(unit) => unit,
        Err(e) => panic!("init failed: {e}"),
    }
}

pub fn read(sid: u32, iova: u64) -> Request {
    Request::read(sid, iova)
}

pub fn write(sid: u32, iova: u64) -> Request {
    Request::write(sid, iova)
}

pub fn phys(addr: u64) -> PhysAddr {
    PhysAddr::new(addr)
}

/// A device's StreamID (bus 0, device 3 in PCI terms).
pub const SID_A: u32 = 0x18;
/// A StreamID in another level-2 table.
pub const SID_B: u32 = 0x0100;
