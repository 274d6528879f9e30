//! What differs between architectures, kept small: the hypercall
//! instruction, the default console, MMIO accessors for the ECAM window and
//! BARs, and halting.
//!
//! Each architecture module provides:
//! * `init()` — once at entry (x86_64: picks VMCALL or VMMCALL);
//! * `hypercall(command, argument_gpa) -> i64`;
//! * `DEFAULT_CONSOLE: (kind, address)` — before the start info is read;
//! * `port_write_byte(port, byte)` (x86_64 only) for console kind 1;
//! * `mmio_read{8,16,32,64}` / `mmio_write{8,16,32,64}` — single loads and
//!   stores (the ECAM window accepts only plain 1/2/4-byte moves);
//! * `halt() -> !` — interrupts off, halt forever.

#[cfg(target_arch = "aarch64")]
mod aarch64;
/// aarch64: the EL1 vector table and the trapped-instruction probes.
#[cfg(target_arch = "aarch64")]
pub mod vectors;
#[cfg(target_arch = "aarch64")]
pub use aarch64::*;

#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "x86_64")]
pub use x86_64::*;
