//! aarch64 (`docs/boot-protocol.md`, "aarch64"): `HVC #0` with X0 =
//! 0xC600_0000 | command and X1 = argument GPA, result in X0 (SMC Calling
//! Convention, `docs/hypercalls.md`); the console is the MMIO byte register
//! the start info names (console kind 2). Accesses to Sluice's emulated
//! registers (console, ECAM) must be single loads and stores without
//! writeback, which the processor describes to Sluice (ESR_EL2.ISV): the
//! accessors below are inline assembly so the compiler cannot pick another
//! form.

use core::arch::asm;

/// Console kind 2 at 0x0900_0000, the protocol's console, until the start
/// info says otherwise.
pub const DEFAULT_CONSOLE: (u32, u64) = (2, 0x0900_0000);

pub fn init() {}

pub fn hypercall(command: u64, argument: u64) -> i64 {
    let result: u64;
    // SAFETY: the hypercall reads and writes only the argument struct (and
    // arrays it names), all of which the caller owns.
    unsafe {
        asm!(
            "hvc #0",
            inout("x0") sluice_abi::regs::AARCH64_FUNCTION_BASE | command => result,
            in("x1") argument,
            options(nostack),
        );
    }
    result as i64
}

/// # Safety
/// `address` must be a device register (or memory) this guest may read.
pub unsafe fn mmio_read8(address: u64) -> u8 {
    let value: u32;
    // SAFETY: by the caller. LDRB: a single load Sluice can emulate.
    unsafe { asm!("ldrb {v:w}, [{a}]", a = in(reg) address, v = out(reg) value, options(nostack)) };
    value as u8
}

/// # Safety
/// As [`mmio_read8`].
pub unsafe fn mmio_read16(address: u64) -> u16 {
    let value: u32;
    // SAFETY: by the caller.
    unsafe { asm!("ldrh {v:w}, [{a}]", a = in(reg) address, v = out(reg) value, options(nostack)) };
    value as u16
}

/// # Safety
/// As [`mmio_read8`].
pub unsafe fn mmio_read32(address: u64) -> u32 {
    let value: u32;
    // SAFETY: by the caller.
    unsafe { asm!("ldr {v:w}, [{a}]", a = in(reg) address, v = out(reg) value, options(nostack)) };
    value
}

/// # Safety
/// As [`mmio_read8`]; not for the ECAM window (8-byte accesses read all
/// ones there).
pub unsafe fn mmio_read64(address: u64) -> u64 {
    let value: u64;
    // SAFETY: by the caller.
    unsafe { asm!("ldr {v}, [{a}]", a = in(reg) address, v = out(reg) value, options(nostack)) };
    value
}

/// # Safety
/// `address` must be a device register (or memory) this guest may write.
pub unsafe fn mmio_write8(address: u64, value: u8) {
    // SAFETY: by the caller. STRB: a single store Sluice can emulate.
    unsafe {
        asm!("strb {v:w}, [{a}]", a = in(reg) address, v = in(reg) u32::from(value), options(nostack))
    };
}

/// # Safety
/// As [`mmio_write8`].
pub unsafe fn mmio_write16(address: u64, value: u16) {
    // SAFETY: by the caller.
    unsafe {
        asm!("strh {v:w}, [{a}]", a = in(reg) address, v = in(reg) u32::from(value), options(nostack))
    };
}

/// # Safety
/// As [`mmio_write8`].
pub unsafe fn mmio_write32(address: u64, value: u32) {
    // SAFETY: by the caller.
    unsafe { asm!("str {v:w}, [{a}]", a = in(reg) address, v = in(reg) value, options(nostack)) };
}

/// # Safety
/// As [`mmio_write8`]; not for the ECAM window.
pub unsafe fn mmio_write64(address: u64, value: u64) {
    // SAFETY: by the caller.
    unsafe { asm!("str {v}, [{a}]", a = in(reg) address, v = in(reg) value, options(nostack)) };
}

/// Interrupts masked, wait for ever: Sluice ends the VM at the first WFI
/// with IRQs masked.
pub fn halt() -> ! {
    loop {
        // SAFETY: masks interrupts and waits; touches no memory.
        unsafe { asm!("msr daifset, #0xf", "wfi", options(nomem, nostack)) };
    }
}

pub fn relax() {
    core::hint::spin_loop();
}
