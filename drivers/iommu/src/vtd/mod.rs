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
