//! aarch64 support at EL2: exception vectors, the EL2 stage-1 identity map,
//! the world switch into guests at EL1, the generic timer and QEMU exit
//! through semihosting.

pub mod exceptions;
pub mod guest;
pub mod paging;
pub mod smp;

use core::arch::asm;

pub const ARCH_NAME: &str = "aarch64";

pub fn read_counter() -> u64 {
    let value: u64;
    // SAFETY: reading the virtual counter has no side effects; ISB orders it.
    unsafe {
        asm!("isb", "mrs {}, cntpct_el0", out(reg) value, options(nomem, nostack, preserves_flags))
    };
    value
}

pub fn counter_frequency() -> u64 {
    let value: u64;
    // SAFETY: reading CNTFRQ_EL0 has no side effects.
    unsafe { asm!("mrs {}, cntfrq_el0", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

pub fn current_el() -> u64 {
    let value: u64;
    // SAFETY: reading CurrentEL has no side effects.
    unsafe { asm!("mrs {}, CurrentEL", out(reg) value, options(nomem, nostack, preserves_flags)) };
    (value >> 2) & 3
}

pub fn halt_forever() -> ! {
    loop {
        // SAFETY: masking interrupts and waiting only stops this CPU.
        unsafe { asm!("msr daifset, #0xf", "wfi", options(nomem, nostack)) };
    }
}

/// Ends QEMU with `code` as its exit status: semihosting SYS_EXIT (0x18)
/// with the AArch64 parameter block {ADP_Stopped_ApplicationExit (0x20026),
/// code} (Arm "Semihosting for AArch32 and AArch64", SYS_EXIT), then PSCI
/// SYSTEM_OFF (0x8400_0008) over SMC if semihosting is not enabled.
pub fn qemu_exit(code: u32) {
    let block: [u64; 2] = [0x20026, u64::from(code)];
    // SAFETY: the semihosting trap reads the block and ends the VM; QEMU is
    // started with semihosting enabled (Sluice only calls this under QEMU).
    unsafe {
        asm!("hlt #0xf000", inout("x0") 0x18u64 => _, in("x1") block.as_ptr(), options(nostack));
        asm!("smc #0", inout("x0") 0x8400_0008u64 => _, options(nostack));
    }
}

/// Triggers a data abort by reading an address the identity map leaves
/// unmapped (the `fault` scenario).
pub fn trigger_fault() -> ! {
    let address = paging::unmapped_probe_address() as *const u64;
    // SAFETY: deliberately faulting is the point; the handler never returns.
    let value = unsafe { core::ptr::read_volatile(address) };
    panic!("reading the unmapped address {address:p} returned {value:#x} instead of faulting");
}

pub fn disable_interrupts() {
    // SAFETY: masking DAIF only masks exceptions.
    unsafe { asm!("msr daifset, #0xf", options(nomem, nostack)) };
}

/// Cleans `[start, start + len)` to the point of coherency, for SMMUs whose
/// table walks are not coherent (IDR0.COHACC = 0): DC CVAC per line (line
/// size from CTR_EL0.DminLine), then DSB so the cleans complete first.
pub fn clean_dcache_range(start: u64, len: u64) {
    let ctr: u64;
    // SAFETY: reading CTR_EL0 has no side effects.
    unsafe { asm!("mrs {}, ctr_el0", out(reg) ctr, options(nomem, nostack, preserves_flags)) };
    let line = 4u64 << ((ctr >> 16) & 0xf);
    let mut address = start & !(line - 1);
    let end = start.saturating_add(len);
    while address < end {
        // SAFETY: cleaning identity-mapped RAM to PoC only affects caches.
        unsafe { asm!("dc cvac, {}", in(reg) address, options(nostack, preserves_flags)) };
        address += line;
    }
    // SAFETY: DSB only orders memory operations.
    unsafe { asm!("dsb sy", options(nostack, preserves_flags)) };
}
