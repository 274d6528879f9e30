//! x86_64: `VMMCALL` (AMD SVM) or `VMCALL` (Intel VMX) with RAX = command
//! and RBX = argument GPA, result in RAX (`docs/hypercalls.md`); the
//! console is I/O port 0xe9.

use core::arch::asm;
use core::sync::atomic::{AtomicBool, Ordering};

/// Console kind 1 (x86 I/O port) at port 0xe9, the protocol's console.
pub const DEFAULT_CONSOLE: (u32, u64) = (1, 0xe9);

/// Whether the CPU is Intel's (VMCALL) rather than AMD's (VMMCALL): the
/// other instruction raises #UD in a guest, which would end this one.
static INTEL: AtomicBool = AtomicBool::new(false);

pub fn init() {
    // CPUID leaf 0: the vendor string in EBX, EDX, ECX (SDM vol. 2A, CPUID).
    let leaf0 = core::arch::x86_64::__cpuid(0);
    let intel = (leaf0.ebx, leaf0.edx, leaf0.ecx)
        == (
            u32::from_le_bytes(*b"Genu"),
            u32::from_le_bytes(*b"ineI"),
            u32::from_le_bytes(*b"ntel"),
        );
    INTEL.store(intel, Ordering::Relaxed);
}

/// CPUID of `leaf` (EAX, EBX, ECX, EDX).
pub fn cpuid(leaf: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid(leaf);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// One hypercall; `argument` is a guest-physical address (this guest runs
/// identity-mapped, so the address of a local is one).
pub fn hypercall(command: u64, argument: u64) -> i64 {
    let result: u64;
    // RBX is reserved by the compiler: swap the argument in and out around
    // the call. Sluice preserves every register but RAX.
    // SAFETY: the hypercall reads and writes only the argument struct (and
    // arrays it names), all of which the caller owns; no stack is used.
    unsafe {
        if INTEL.load(Ordering::Relaxed) {
            asm!(
                "xchg {arg}, rbx",
                "vmcall",
                "xchg {arg}, rbx",
                arg = inout(reg) argument => _,
                inout("rax") command => result,
                options(nostack),
            );
        } else {
            asm!(
                "xchg {arg}, rbx",
                "vmmcall",
                "xchg {arg}, rbx",
                arg = inout(reg) argument => _,
                inout("rax") command => result,
                options(nostack),
            );
        }
    }
    result as i64
}

pub fn port_write_byte(port: u16, byte: u8) {
    // SAFETY: an OUT to the console port only prints.
    unsafe { asm!("out dx, al", in("dx") port, in("al") byte, options(nomem, nostack)) };
}

/// # Safety
/// `address` must be a device register (or memory) this guest may read.
pub unsafe fn mmio_read8(address: u64) -> u8 {
    let value: u32;
    // SAFETY: by the caller. A plain MOVZX, as the ECAM window requires.
    unsafe {
        asm!("movzx {v:e}, byte ptr [{a}]", a = in(reg) address, v = out(reg) value, options(nostack))
    };
    value as u8
}

/// # Safety
/// As [`mmio_read8`].
pub unsafe fn mmio_read16(address: u64) -> u16 {
    let value: u32;
    // SAFETY: by the caller.
    unsafe {
        asm!("movzx {v:e}, word ptr [{a}]", a = in(reg) address, v = out(reg) value, options(nostack))
    };
    value as u16
}

/// # Safety
/// As [`mmio_read8`].
pub unsafe fn mmio_read32(address: u64) -> u32 {
    let value: u32;
    // SAFETY: by the caller.
    unsafe {
        asm!("mov {v:e}, dword ptr [{a}]", a = in(reg) address, v = out(reg) value, options(nostack))
    };
    value
}

/// # Safety
/// As [`mmio_read8`]; not for the ECAM window (8-byte accesses stop the VM).
pub unsafe fn mmio_read64(address: u64) -> u64 {
    let value: u64;
    // SAFETY: by the caller.
    unsafe {
        asm!("mov {v}, qword ptr [{a}]", a = in(reg) address, v = out(reg) value, options(nostack))
    };
    value
}

/// # Safety
/// `address` must be a device register (or memory) this guest may write.
pub unsafe fn mmio_write8(address: u64, value: u8) {
    // SAFETY: by the caller.
    unsafe {
        asm!("mov byte ptr [{a}], {v}", a = in(reg) address, v = in(reg_byte) value, options(nostack))
    };
}

/// # Safety
/// As [`mmio_write8`].
pub unsafe fn mmio_write16(address: u64, value: u16) {
    // SAFETY: by the caller.
    unsafe {
        asm!("mov word ptr [{a}], {v:x}", a = in(reg) address, v = in(reg) value, options(nostack))
    };
}

/// # Safety
/// As [`mmio_write8`].
pub unsafe fn mmio_write32(address: u64, value: u32) {
    // SAFETY: by the caller.
    unsafe {
        asm!("mov dword ptr [{a}], {v:e}", a = in(reg) address, v = in(reg) value, options(nostack))
    };
}

/// # Safety
/// As [`mmio_write8`]; not for the ECAM window.
pub unsafe fn mmio_write64(address: u64, value: u64) {
    // SAFETY: by the caller.
    unsafe {
        asm!("mov qword ptr [{a}], {v}", a = in(reg) address, v = in(reg) value, options(nostack))
    };
}

/// Interrupts off, halt, forever: Sluice ends the VM at the first HLT.
pub fn halt() -> ! {
    loop {
        // SAFETY: stops this vCPU; touches no memory.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// A pause between polls of a device.
pub fn relax() {
    core::hint::spin_loop();
}
