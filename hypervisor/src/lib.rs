//! Sluice's hypervisor layer.
#![cfg_attr(not(test), no_std)]

extern crate alloc;
