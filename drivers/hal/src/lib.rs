//! The narrow waist between Sluice's drivers and hardware.
//!
//! Drivers never dereference a physical address or a register pointer
//! themselves: they go through [`Mmio`] for registers, [`DmaMemory`] for
//! memory that devices (and IOMMU page walkers) read, and [`Clock`] for every
//! wait. On bare metal the kernel implements these traits over identity-mapped
//! memory; in host tests the [`model`] implementations stand in, so the very
//! same driver code runs against a register model.
#![no_std]

extern crate alloc;

pub mod access;
pub mod clock;
pub mod dma;
pub mod mmio;
pub mod model;

pub use access::DeviceAccess;
pub use clock::{Clock, Timeout, poll_until};
pub use dma::{DmaAllocError, DmaMemory, PAGE_SIZE, PhysAddr};
pub use mmio::{Mmio, ReadOnly, ReadWrite, Reg32, Reg64, WriteOnly};
