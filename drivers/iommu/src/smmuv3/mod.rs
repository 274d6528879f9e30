//! Arm SMMUv3 driver.
//!
//! Written from the Arm System Memory Management Unit Architecture
//! Specification, SMMU architecture version 3 (IHI 0070); sections are
//! cited where a fact comes from.
//!
//! * [`regs`]: the register block, as typed registers and bit fields;
//! * [`caps`]: IDR0-IDR5 decoded once into [`SmmuCapabilities`] (with the
//!   boot-log summary);
//! * [`structs`]: stream table entries, level-1 stream table descriptors,
//!   context descriptors and level-1 CD descriptors;
//! * [`commands`]: command-queue entries;
//! * [`events`]: event records decoded by name into [`SmmuFault`].

pub mod caps;
pub mod commands;
pub mod error;
pub mod events;
pub mod model;
mod queue;
pub mod regs;
pub mod structs;
pub mod unit;
pub mod walker;

#[cfg(test)]
mod tests;

pub use caps::{IdrBuilder, SmmuCapabilities};
pub use error::{CommandErrorKind, SmmuError, Stage};
pub use events::{Access, EventKind, EventRecord, FaultClass, SmmuFault};
pub use unit::{
    AttributedFault, EventDrain, SmmuConfig, SmmuDomainConfig, SmmuDomainId, SmmuDomainInfo,
    SmmuUnit, StageRequest, StreamTableLayout, StreamTableRequest,
};
