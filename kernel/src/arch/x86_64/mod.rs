//! x86_64 support: port I/O, descriptor tables, exceptions, paging, TSC.

pub mod exceptions;
pub mod gdt;
pub mod interrupts;
pub mod lapic;
pub mod paging;
pub mod smp;
pub mod svm;

use core::arch::asm;

pub fn port_write_u8(port: u16, value: u8) {
    // SAFETY: port output has no memory effects; callers own the device.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}

pub fn port_read_u8(port: u16) -> u8 {
    let value: u8;
    // SAFETY: port input has no memory effects; callers own the device.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    };
    value
}

pub fn port_write_u32(port: u16, value: u32) {
    // SAFETY: as `port_write_u8`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    };
}

pub fn port_read_u32(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as `port_read_u8`.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags))
    };
    value
}

pub fn read_counter() -> u64 {
    // SAFETY: RDTSC only reads the time-stamp counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

pub struct CpuidResult {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

pub fn cpuid(leaf: u32, subleaf: u32) -> CpuidResult {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    CpuidResult {
        eax: r.eax,
        ebx: r.ebx,
        ecx: r.ecx,
        edx: r.edx,
    }
}

/// Stops this CPU for good.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: CLI; HLT only stops the CPU.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// QEMU's `isa-debug-exit` device at port 0xf4: QEMU exits with status
/// `(code << 1) | 1`.
pub fn qemu_exit(code: u32) {
    port_write_u32(0xf4, code);
}

pub fn read_cr2() -> u64 {
    let value: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

pub fn read_cr3() -> u64 {
    let value: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe { asm!("mov {}, cr3", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

/// # Safety
/// `value` must point at page tables that map all code, data and stacks in
/// use at the same addresses as the current ones.
pub unsafe fn write_cr3(value: u64) {
    // SAFETY: the caller guarantees the new tables are a superset identity map.
    unsafe { asm!("mov cr3, {}", in(reg) value, options(nostack, preserves_flags)) };
}

/// Triggers a page fault by reading an address the identity map leaves
/// unmapped (the `fault` scenario).
pub fn trigger_fault() -> ! {
    let address = paging::UNMAPPED_PROBE_ADDRESS as *const u64;
    // SAFETY: deliberately faulting is the point; the handler never returns.
    let value = unsafe { core::ptr::read_volatile(address) };
    panic!("reading the unmapped address {address:p} returned {value:#x} instead of faulting");
}

pub const ARCH_NAME: &str = "x86_64";

pub fn disable_interrupts() {
    // SAFETY: CLI only masks maskable interrupts.
    unsafe { asm!("cli", options(nomem, nostack)) };
}

/// Writes back the cache lines of `[start, start + len)` to memory, for
/// agents that do not snoop (VT-d ECAP.C = 0): CLFLUSH each 64-byte line,
/// then MFENCE so the flushes complete before the structures are published
/// (Intel SDM vol. 2, CLFLUSH: ordered by MFENCE).
pub fn clean_dcache_range(start: u64, len: u64) {
    const LINE: u64 = 64;
    let mut line = start & !(LINE - 1);
    let end = start.saturating_add(len);
    while line < end {
        // SAFETY: CLFLUSH of identity-mapped RAM has no architectural effect
        // beyond the cache.
        unsafe { asm!("clflush [{}]", in(reg) line, options(nostack, preserves_flags)) };
        line += LINE;
    }
    // SAFETY: MFENCE only orders memory operations.
    unsafe { asm!("mfence", options(nostack, preserves_flags)) };
}
