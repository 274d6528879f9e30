//! Sluice's kernel: console and logging, physical memory, the hypervisor's
//! own page tables, exception handling and the clock, for x86_64 and
//! aarch64.
//!
//! Everything that touches hardware is compiled for the UEFI targets only;
//! the hardware-independent parts (command line, boot information, frame
//! allocator, MADT, PSCI codes, the SMP mailbox, the local APIC's start-up
//! sequence) also build and are tested on the host.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod boot_info;
pub mod cmdline;
pub mod madt;
pub mod memory;
pub mod psci;
pub mod smp;

#[cfg(target_os = "uefi")]
pub mod acpi_tables;
#[cfg(target_os = "uefi")]
pub mod arch;
#[cfg(target_os = "uefi")]
pub mod clock;
#[cfg(target_os = "uefi")]
pub mod console;
#[cfg(target_os = "uefi")]
pub mod fatal;
#[cfg(target_os = "uefi")]
pub mod hw;
#[cfg(target_os = "uefi")]
pub mod platform;

// The local APIC code is pure logic over `sluice_hal` traits: its start-up
// sequence and delays are tested on the host against a register model.
#[cfg(all(test, target_arch = "x86_64"))]
#[allow(dead_code)]
#[path = "arch/x86_64/lapic.rs"]
mod lapic_host_tests;
