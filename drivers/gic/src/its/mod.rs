//! The GICv3/v4 Interrupt Translation Service (Arm IHI 0069, chapter 5.2
//! "The ITS", 5.3 "ITS commands", 12.19-12.20 its registers).
//!
//! * [`regs`]: the register map, bit fields, GITS_TRANSLATER's offset and
//!   [`doorbell_address`];
//! * [`caps`]: GITS_TYPER decoded once into [`ItsCaps`], and the
//!   write-then-read-back probe of every `GITS_BASER<n>` ([`TableCaps`]);
//! * [`commands`]: 32-byte commands ([`ItsCommand`]) with their
//!   constructors and decoding, and [`RdBase`] (processor number or
//!   address, per GITS_TYPER.PTA);
//! * [`unit`](mod@unit): [`ItsUnit`] — ownership, device table (flat or
//!   two-level with level-2 pages on demand), collection table, the
//!   command queue with SYNC, stall recovery and timeouts, collections,
//!   devices with their ITTs, events to LPIs, and the software record of
//!   every mapping;
//! * [`model`]: a register, queue and table model of an ITS that delivers
//!   into [`RedistModel`](crate::redist::model::RedistModel), for host
//!   tests here and in other crates.
//!
//! Typical use at boot, once the redistributors have LPIs on:
//!
//! ```text
//! let mut its = ItsUnit::take_ownership(mmio, mem, clock,
//!     ItsConfig::new(0, its_base, cpus, lpi_bits))?;
//! for cpu in cpus { its.map_collection(cpu, frame.target(gicr_base, its.caps().pta))?; }
//! its.map_device(rid, 1)?;                        // DeviceID = requester ID
//! let lpi = lpis.alloc()?;
//! lpi_tables.set(lpi, LpiConfig::enabled(0xa0))?;
//! its.map_event(rid, 0, lpi, cpu)?;              // MSI data 0 → lpi
//! // device MSI: address its.doorbell(), data 0
//! ```

pub mod caps;
pub mod commands;
pub mod error;
pub mod model;
mod queue;
pub mod regs;
pub mod unit;

#[cfg(test)]
mod tests;

pub use caps::{ItsCaps, PageSizes, TableCaps, TyperBuilder};
pub use commands::{ItsCommand, RdBase};
pub use error::ItsError;
pub use regs::{DOORBELL_OFFSET, ItsPageSize, TableType, doorbell_address};
pub use unit::{
    DeviceTableLayout, DeviceTableRequest, EventMapping, ItsConfig, ItsUnit, plan_device_table,
};
