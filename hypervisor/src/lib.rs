//! Sluice's hypervisor layer.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod iommufd;
pub mod passthrough;
pub mod testing;
pub mod vcpu;
pub mod vm;
