//! Arm SMMUv3 driver.
//!
//! Written from the Arm System Memory Management Unit Architecture
//! Specification, SMMU architecture version 3 (IHI 0070); sections are
//! cited where a fact comes from.
//!
//! * [`regs`]: the register block (pages 0 and 1), as typed registers and
//!   bit fields;
//! * [`caps`]: IDR0-IDR5 decoded once into [`SmmuCapabilities`] (with the
//!   boot-log summary), and [`IdrBuilder`] for tests and the model;
//! * [`structs`]: stream table entries, level-1 stream table descriptors,
//!   context descriptors and level-1 CD descriptors;
//! * [`commands`]: command-queue entries (CFGI, TLBI with ranges,
//!   CMD_SYNC with or without MSI);
//! * [`events`]: event records decoded by name into [`SmmuFault`];
//! * [`unit`](mod@unit): [`SmmuUnit`], one SMMU: bring-up with every stream aborting
//!   (GBPA.ABORT first), linear or 2-level stream tables (level-2 tables
//!   on demand), stage-1 (ASID, CD) and stage-2 (VMID) domains over the
//!   IO page-table engine, stream and substream attach, unmap with TLBI by
//!   VA / IPA range and CMD_SYNC, command-error recovery, event draining
//!   with per-domain fault queues, global errors;
//! * [`walker`]: an independent walker (stream table → STE → CD → stage-1
//!   and stage-2 tables) written separately from the code that builds the
//!   structures;
//! * [`ownership`]: every SMMU of the IORT taken over at boot, RMR ranges
//!   identity-mapped for the StreamIDs they name, failures reported with
//!   the devices they leave uncovered;
//! * [`model`]: a register and queue model of an SMMU with configuration
//!   caches, a TLB and walk caches, for host tests here and in other
//!   crates.
//!
//! Every table and queue is one 4 KiB page (`DmaMemory` hands out single
//! pages): linear stream tables cover 64 StreamIDs, 2-level ones 2^15, CD
//! tables 64 SubstreamIDs (2^15 with IDR0.CD2L), the command queue holds
//! 256 commands and the event queue 128 records.
//!
//! Typical use, one unit per IORT SMMUv3 node:
//!
//! ```text
//! let mut smmu = SmmuUnit::init(mmio, mem, clock, SmmuConfig::new(0, base))?;
//! let dom = smmu.alloc_domain(SmmuDomainConfig::any())?;
//! smmu.map(dom, iova, phys, len, MapPerms::READ_WRITE)?;
//! smmu.attach_stream(stream_id, dom)?;
//! ...
//! let events = smmu.drain_events();
//! ```

pub mod caps;
pub mod commands;
pub mod error;
pub mod events;
pub mod model;
pub mod ownership;
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
    AttributedFault, EventDrain, MemoryKind, SmmuConfig, SmmuDomainConfig, SmmuDomainId,
    SmmuDomainInfo, SmmuDomainShape, SmmuUnit, StageRequest, StreamTableLayout, StreamTableRequest,
};
