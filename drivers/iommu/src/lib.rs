//! IOMMU support for Sluice.
#![cfg_attr(not(test), no_std)]

extern crate alloc;
