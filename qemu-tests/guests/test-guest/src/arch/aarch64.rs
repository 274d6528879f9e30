//! aarch64 (the direct-boot protocol for it is not written yet): `HVC #0`
//! with X0 = 0xC600_0000 | command and X1 = argument GPA, result in X0
//! (SMC Calling Convention, `docs/hypercalls.md`); the console is the MMIO
//! byte register the start info names (console kind 2).

use core::arch::asm;

/// No console until the start info names one.
pub const DEFAULT_CONSOLE: (u32, u64) = (0, 0);

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
    // SAFETY: by the caller.
    unsafe { core::ptr::read_volatile(address as *const u8) }
}

/// # Safety
/// As [`mmio_read8`].
pub unsafe fn mmio_read16(address: u64) -> u16 {
    // SAFETY: by the caller.
    unsafe { core::ptr::read_volatile(address as *const u16) }
}

/// # Safety
/// As [`mmio_read8`].
pub unsafe fn mmio_read32(address: u64) -> u32 {
    // SAFETY: by the caller.
    unsafe { core::ptr::read_volatile(address as *const u32) }
}

/// # Safety
/// As [`mmio_read8`].
pub unsafe fn mmio_read64(address: u64) -> u64 {
    // SAFETY: by the caller.
    unsafe { core::ptr::read_volatile(address as *const u64) }
}

/// # Safety
/// `address` must be a device register (or memory) this guest may write.
pub unsafe fn mmio_write8(address: u64, value: u8) {
    // SAFETY: by the caller.
    unsafe { core::ptr::write_volatile(address as *mut u8, value) }
}

/// # Safety
/// As [`mmio_write8`].
pub unsafe fn mmio_write16(address: u64, value: u16) {
    // SAFETY: by the caller.
    unsafe { core::ptr::write_volatile(address as *mut u16, value) }
}

/// # Safety
/// As [`mmio_write8`].
pub unsafe fn mmio_write32(address: u64, value: u32) {
    // SAFETY: by the caller.
    unsafe { core::ptr::write_volatile(address as *mut u32, value) }
}

/// # Safety
/// As [`mmio_write8`].
pub unsafe fn mmio_write64(address: u64, value: u64) {
    // SAFETY: by the caller.
    unsafe { core::ptr::write_volatile(address as *mut u64, value) }
}

/// Interrupts masked, wait for ever.
pub fn halt() -> ! {
    loop {
        // SAFETY: masks interrupts and waits; touches no memory.
        unsafe { asm!("msr daifset, #0xf", "wfi", options(nomem, nostack)) };
    }
}

pub fn relax() {
    core::hint::spin_loop();
}
