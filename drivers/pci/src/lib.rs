//! PCI for Sluice: configuration-space access (ECAM, described by MCFG),
//! enumeration through bridges, BARs, capabilities, requester IDs and DMA
//! aliases, and IOMMU groups derived from ACS isolation.
//!
//! Everything here reads firmware- and device-provided data, so nothing
//! trusts it: loops, out-of-range pointers and bus numbers become errors in
//! the result, never panics or hangs.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod address;
pub mod bar;
pub mod caps;
pub mod config;
pub mod ecam;
pub mod enumerate;
pub mod groups;
pub mod mcfg;
pub mod model;
pub mod sdt;

pub use address::{Bdf, PciAddress, Segment};
pub use config::{ConfigError, ConfigSpace};
pub use ecam::{Ecam, EcamWindow};
pub use enumerate::{Function, Topology, enumerate};
pub use groups::{DmaAlias, Groups, iommu_groups};
