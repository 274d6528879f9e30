//! Sluice's test guest.
//!
//! A 64-bit `no_std` ELF that Sluice starts with its direct-boot protocol
//! (`docs/boot-protocol.md`). It reads the start-info block, finds its
//! `edu` devices through the ECAM window and runs the scenario its
//! `args=` word names, driving DMA through the iommufd hypercalls
//! (`docs/hypercalls.md`):
//!
//! * `dma` — the whole device life cycle, translated DMA both ways, and
//!   the faults of every way DMA must be stopped; leaves a victim buffer
//!   mapped for `attacker`;
//! * `attacker` — DMA at the victim's IOVA and GPA faults;
//! * `hostile` — hostile hypercall arguments get the documented errno
//!   (and on aarch64, trapped instructions Sluice does not emulate are
//!   UNDEFINED for the guest, which handles them and goes on).
//!
//! Output, on the console the start info names, one line per step:
//! `GUEST-TEST <step> PASS` or `GUEST-TEST <step> FAIL <reason>`, then
//! `GUEST-DONE passed=<n> failed=<m>`, then `cli; hlt` for good (Sluice
//! takes HLT with interrupts off as the end of the VM).
#![cfg_attr(not(test), no_std)]
#![cfg_attr(not(test), no_main)]
// Host unit tests exercise the parsers only; the program itself runs in a VM.
#![cfg_attr(test, allow(dead_code))]
// Failure reasons are formatted into a fixed buffer (there is no heap), so
// `Result<_, Reason>` is large by design; steps are not on a hot path.
#![allow(clippy::result_large_err)]

mod arch;
mod console;
mod edu;
mod hypercall;
mod layout;
mod pci;
mod scenarios;
mod start_info;

use console::Report;

/// The guest's main program: `start_info` is the block's address (RDI on
/// x86_64).
fn run(start_info: u64) -> ! {
    arch::init();
    let mut report = Report::new();
    let info = match start_info::read(start_info) {
        Ok(info) => {
            console::set_console(info.console_kind, info.console_address);
            report.pass("start-info");
            info
        }
        Err(why) => {
            // The default console of this architecture is all that is left.
            report.fail("start-info", format_args!("{why}"));
            report.done()
        }
    };
    scenarios::run(&info, &mut report);
    report.done()
}

#[cfg(not(test))]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    console::panic(info)
}

/// x86_64 entry: long mode, identity-mapped, RDI = start info, RSP as after
/// a `call` (so a System V function can be the entry point).
#[cfg(all(not(test), target_arch = "x86_64"))]
#[unsafe(no_mangle)]
#[unsafe(link_section = ".text._start")]
pub extern "sysv64" fn _start(start_info: u64) -> ! {
    run(start_info)
}

/// aarch64 entry: EL1 with the MMU off, X0 = start info, SP_EL1 a usable
/// stack (`docs/boot-protocol.md`, "aarch64").
#[cfg(all(not(test), target_arch = "aarch64"))]
#[unsafe(no_mangle)]
#[unsafe(link_section = ".text._start")]
pub extern "C" fn _start(start_info: u64) -> ! {
    run(start_info)
}

#[cfg(test)]
fn main() {}
