//! Intel VT-d remapping hardware driver.
//!
//! Written from the Intel Virtualization Technology for Directed I/O
//! Architecture Specification (rev 4.x/5.x); sections are cited where a
//! fact comes from.
//!
//! * [`regs`]: the register block, as typed registers and bit fields;
//! * [`caps`]: VER/CAP/ECAP decoded once into [`VtdCapabilities`] (with
//!   the boot-log summary);
//! * [`structs`]: root, context, PASID-directory and PASID-table entries;
//! * [`descriptors`]: queued-invalidation descriptors;
//! * [`unit`]: [`VtdUnit`], one DRHD: bring-up (blocking every device),
//!   domains over the IO page-table engine, device / alias / PASID attach,
//!   map and unmap with exactly the invalidation each change needs, RMRR
//!   identity maps, fault draining with per-domain queues;
//! * [`fault`]: fault-record decoding and the bounded, rate-limited drain;
//! * [`fault_event`]: fault events by interrupt: the message, and the
//!   mailbox the interrupt handler drains into, with storm masking;
//! * [`intremap`]: interrupt remapping: the table, IRTA/SIRTP/IRE/CFI,
//!   remapped entries with source-ID checks and entry-cache invalidation;
//! * [`walker`]: an independent translation walker (root → context →
//!   PASID → page table) written separately from the code that builds the
//!   tables;
//! * [`ownership`]: every DRHD of the DMAR brought up at once, RMRRs
//!   identity-mapped, failed units' devices marked uncovered;
//! * [`model`]: a register model of a unit, with context/PASID/IOTLB/
//!   paging-structure caches, for host tests here and in other crates.
//!
//! Typical use, one unit per DRHD:
//!
//! ```text
//! let mut unit = VtdUnit::init(mmio, mem, clock, VtdConfig::new(0, base, haw))?;
//! let dom = unit.alloc_domain(DomainConfig::second_level().snooped())?;
//! unit.map(dom, iova, phys, len, MapPerms::READ_WRITE)?;
//! unit.attach_device_with_aliases(bdf, &aliases, dom)?;
//! ...
//! let faults = unit.drain_faults();
//! ```

pub mod caps;
pub mod descriptors;
pub mod regs;
pub mod structs;

pub use caps::{CapBuilder, VtdCapabilities};
pub mod error;
pub mod fault;
pub mod fault_event;
pub mod intremap;
mod invalidation;
pub mod model;
pub mod ownership;
pub mod unit;
pub mod walker;

pub use error::VtdError;
pub use fault::{AccessKind, FaultClass, FaultReason, FaultRecord};
pub use fault_event::{FaultEventMessage, FaultMailbox, StormPolicy};
pub use intremap::{
    DeliveryMode, IrConfig, Irte, RemappableMsi, RemappedInterrupt, SidQualifier, SourceValidation,
    TriggerMode,
};
pub use unit::{
    AtsConfig, AttributedFault, DomainConfig, DomainId, DomainInfo, DomainKind, DomainShape,
    FaultDrain, ModeRequest, RID_PASID, TranslationMode, VtdConfig, VtdUnit,
};

#[cfg(test)]
mod tests;
