//! The Sluice hypercall ABI.
#![no_std]
