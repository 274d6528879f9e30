//! Host tests of the ITS driver against the ITS and redistributor models.

mod bringup;
mod isolation;
mod queue;
mod tables;

use alloc::vec::Vec;

use sluice_hal::model::{ModelClock, ModelMemory};

use super::model::{ItsModel, ItsModelConfig};
use super::unit::{ItsConfig, ItsUnit};
use super::{ItsError, RdBase};
use crate::lpi::Lpi;
use crate::redist::model::RedistModel;
use crate::redist::{LpiTables, Redistributor, walk_frames};

/// QEMU `virt`'s ITS base.
pub const ITS_BASE: u64 = 0x0808_0000;

/// Two collections, 16-bit LPIs, 1000 polls of the 1 us model clock.
pub fn config() -> ItsConfig {
    ItsConfig {
        timeout_ns: 1_000_000,
        ..ItsConfig::new(0, ITS_BASE, 2, 16)
    }
}

pub fn clock() -> ModelClock {
    ModelClock::new(1_000)
}

pub fn take<'a>(its: &'a ItsModel<'a>, mem: &'a ModelMemory, clock: &'a ModelClock) -> ItsUnit<'a> {
    take_with(its, mem, clock, config())
}

pub fn take_with<'a>(
    its: &'a ItsModel<'a>,
    mem: &'a ModelMemory,
    clock: &'a ModelClock,
    config: ItsConfig,
) -> ItsUnit<'a> {
    match ItsUnit::take_ownership(its, mem, clock, config) {
        Ok(unit) => unit,
        Err(e) => panic!("take_ownership failed: {e}"),
    }
}

/// LPIs on for every redistributor of `redist`: one shared configuration
/// table of 16-bit INTIDs, a pending table each.
pub fn lpis_on<'a>(
    redist: &'a RedistModel<'a>,
    mem: &'a ModelMemory,
) -> (LpiTables<'a>, Vec<Redistributor<'a>>) {
    let tables = LpiTables::new(mem, 16).expect("configuration table");
    let frames = walk_frames(redist, redist.region_bytes()).expect("frames");
    let mut rds = Vec::new();
    for f in frames {
        let mut rd = Redistributor::new(redist, mem, f);
        rd.enable_lpis(&tables).expect("LPIs on");
        rds.push(rd);
    }
    (tables, rds)
}

/// Collection `n` → redistributor `n`, for each redistributor.
pub fn map_collections(unit: &mut ItsUnit<'_>, rds: &[Redistributor<'_>], base: u64) {
    let pta = unit.caps().pta;
    for (n, rd) in rds.iter().enumerate() {
        unit.map_collection(n as u16, rd.frame().target(base, pta))
            .expect("MAPC");
    }
}

pub fn lpi(n: u32) -> Lpi {
    Lpi::new(n).expect("an LPI INTID")
}

pub fn qemu_model<'a>(mem: &'a ModelMemory, redist: &'a RedistModel<'a>) -> ItsModel<'a> {
    ItsModel::new(mem, redist, ItsModelConfig::qemu_7_2())
}

/// A device (bus 0, device 3, function 0 as a requester ID).
pub const DEV_A: u32 = 0x0018;
/// Another device.
pub const DEV_B: u32 = 0x0020;

pub fn is_stall(e: &ItsError, op: u8) -> bool {
    matches!(e, ItsError::CommandStalled { command, .. } if command.opcode() == op)
}

pub fn processor(n: u16) -> RdBase {
    RdBase::Processor(n)
}
