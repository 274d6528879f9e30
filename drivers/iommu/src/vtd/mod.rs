//! Intel VT-d remapping hardware driver.
//!
//! Written from the Intel Virtualization Technology for Directed I/O
//! Architecture Specification (rev 4.x/5.x); sections are cited where a
//! fact comes from.
//!
//! * [`regs`]: the register block, as typed registers and bit fields;
//! * [`caps`]: VER/CAP/ECAP decoded once into [`VtdCapabilities`];
//! * [`structs`]: root, context, PASID-directory and PASID-table entries;
//! * [`descriptors`]: queued-invalidation descriptors.

pub mod caps;
pub mod descriptors;
pub mod regs;
pub mod structs;

pub use caps::{CapBuilder, VtdCapabilities};
pub mod error;
pub mod fault;
mod invalidation;
pub mod model;
pub mod unit;
pub mod walker;

pub use error::VtdError;
pub use fault::{AccessKind, FaultClass, FaultReason, FaultRecord};
pub use unit::{
    AtsConfig, AttributedFault, DomainConfig, DomainId, DomainInfo, DomainKind, FaultDrain,
    ModeRequest, TranslationMode, VtdConfig, VtdUnit,
};

#[cfg(test)]
mod tests;
