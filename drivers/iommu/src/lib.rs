//! IOMMU support for Sluice: the ACPI tables that describe IOMMUs (DMAR,
//! IORT), which IOMMU translates which device, and the one IO page-table
//! engine every translation format goes through.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod acpi;
pub mod association;
pub mod pagetable;
pub mod smmuv3;
pub mod vtd;
