//! EL2 exception vectors. Every exception Sluice itself takes at EL2 is
//! fatal for now: the handler decodes ESR_EL2 by name, prints FAR/ELR/SPSR
//! and the registers, and stops Sluice. Exceptions from a lower EL are a
//! guest leaving: those vectors go to the world switch
//! ([`super::guest`]), which checks that a guest is running on this CPU
//! and otherwise hands the exception to the same fatal handler.

use core::arch::{asm, global_asm};
use core::mem::size_of;

// The vector table (Arm ARM D1.10.2): four groups (current EL with SP_EL0,
// current EL with SP_ELx, lower EL AArch64, lower EL AArch32) of four
// entries (synchronous, IRQ, FIQ, SError), 0x80 bytes each, 2 KiB aligned.
// Each entry saves x0/x1, puts its index in x0 and joins the common path,
// which saves the rest of the frame and calls the Rust handler; the
// lower-EL entries join the world switch's check instead, with the same
// frame.
global_asm!(
    r#"
.macro SLUICE_VECTOR kind
.balign 0x80
    sub sp, sp, #272
    stp x0, x1, [sp, #0]
    mov x0, #\kind
    b sluice_el2_exception_common
.endm
.macro SLUICE_LOWER_EL_VECTOR kind
.balign 0x80
    sub sp, sp, #272
    stp x0, x1, [sp, #0]
    mov x0, #\kind
    b sluice_lower_el_exception
.endm
.balign 0x800
.global sluice_el2_vectors
sluice_el2_vectors:
SLUICE_VECTOR 0
SLUICE_VECTOR 1
SLUICE_VECTOR 2
SLUICE_VECTOR 3
SLUICE_VECTOR 4
SLUICE_VECTOR 5
SLUICE_VECTOR 6
SLUICE_VECTOR 7
SLUICE_LOWER_EL_VECTOR 8
SLUICE_LOWER_EL_VECTOR 9
SLUICE_LOWER_EL_VECTOR 10
SLUICE_LOWER_EL_VECTOR 11
SLUICE_LOWER_EL_VECTOR 12
SLUICE_LOWER_EL_VECTOR 13
SLUICE_LOWER_EL_VECTOR 14
SLUICE_LOWER_EL_VECTOR 15
    .global sluice_el2_exception_common
sluice_el2_exception_common:
    stp x2, x3, [sp, #16]
    stp x4, x5, [sp, #32]
    stp x6, x7, [sp, #48]
    stp x8, x9, [sp, #64]
    stp x10, x11, [sp, #80]
    stp x12, x13, [sp, #96]
    stp x14, x15, [sp, #112]
    stp x16, x17, [sp, #128]
    stp x18, x19, [sp, #144]
    stp x20, x21, [sp, #160]
    stp x22, x23, [sp, #176]
    stp x24, x25, [sp, #192]
    stp x26, x27, [sp, #208]
    stp x28, x29, [sp, #224]
    mrs x1, elr_el2
    mrs x2, spsr_el2
    stp x30, x1, [sp, #240]
    str x2, [sp, #256]
    mov x1, sp
    bl sluice_el2_exception_handler
    ldp x30, x1, [sp, #240]
    ldr x2, [sp, #256]
    msr elr_el2, x1
    msr spsr_el2, x2
    ldp x2, x3, [sp, #16]
    ldp x4, x5, [sp, #32]
    ldp x6, x7, [sp, #48]
    ldp x8, x9, [sp, #64]
    ldp x10, x11, [sp, #80]
    ldp x12, x13, [sp, #96]
    ldp x14, x15, [sp, #112]
    ldp x16, x17, [sp, #128]
    ldp x18, x19, [sp, #144]
    ldp x20, x21, [sp, #160]
    ldp x22, x23, [sp, #176]
    ldp x24, x25, [sp, #192]
    ldp x26, x27, [sp, #208]
    ldp x28, x29, [sp, #224]
    ldp x0, x1, [sp, #0]
    add sp, sp, #272
    eret
"#
);

/// Bytes each vector pushes ([`ExceptionFrame`]).
pub const FRAME_SIZE: usize = 272;

/// The stack as `sluice_el2_exception_common` leaves it.
#[repr(C)]
pub struct ExceptionFrame {
    pub x: [u64; 31],
    pub elr: u64,
    pub spsr: u64,
    pub padding: u64,
}
const _: () = assert!(size_of::<ExceptionFrame>() == FRAME_SIZE);

unsafe extern "C" {
    static sluice_el2_vectors: u8;
}

/// Points VBAR_EL2 at Sluice's vectors.
pub fn init() {
    // SAFETY: the vector table is 2 KiB aligned code that lives forever.
    unsafe {
        let base = &raw const sluice_el2_vectors as u64;
        asm!("msr vbar_el2, {}", "isb", in(reg) base, options(nostack));
    }
}

const GROUPS: [&str; 4] = [
    "current EL with SP_EL0",
    "current EL with SP_ELx",
    "lower EL (AArch64)",
    "lower EL (AArch32)",
];
const KINDS: [&str; 4] = ["synchronous", "IRQ", "FIQ", "SError"];

/// The name of an exception class (Arm ARM D17.2.37, ESR_EL2.EC).
pub fn exception_class_name(ec: u64) -> &'static str {
    match ec {
        0x00 => "unknown reason",
        0x01 => "trapped WFI/WFE",
        0x07 => "trapped SVE/SIMD/FP access",
        0x0e => "illegal execution state",
        0x11 | 0x15 => "SVC",
        0x12 | 0x16 => "HVC",
        0x13 | 0x17 => "SMC",
        0x18 => "trapped MSR/MRS/system instruction",
        0x19 => "trapped SVE access",
        0x20 => "instruction abort from a lower EL",
        0x21 => "instruction abort at EL2",
        0x22 => "PC alignment fault",
        0x24 => "data abort from a lower EL",
        0x25 => "data abort at EL2",
        0x26 => "SP alignment fault",
        0x2c => "trapped floating-point exception",
        0x2f => "SError",
        0x30 | 0x31 => "breakpoint",
        0x32 | 0x33 => "software step",
        0x34 | 0x35 => "watchpoint",
        0x3c => "BRK instruction",
        _ => "reserved exception class",
    }
}

/// Decodes the fault status code of an abort (ESR.ISS[5:0], DFSC/IFSC).
pub fn fault_status_name(fsc: u64) -> &'static str {
    match fsc {
        0b000000..=0b000011 => "address size fault",
        0b000100..=0b000111 => "translation fault",
        0b001001..=0b001011 => "access flag fault",
        0b001101..=0b001111 => "permission fault",
        0b010000 => "synchronous external abort",
        0b100001 => "alignment fault",
        0b110000 => "TLB conflict abort",
        _ => "other fault",
    }
}

fn read_esr() -> u64 {
    let value: u64;
    // SAFETY: reading ESR_EL2 has no side effects.
    unsafe { asm!("mrs {}, esr_el2", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

fn read_far() -> u64 {
    let value: u64;
    // SAFETY: reading FAR_EL2 has no side effects.
    unsafe { asm!("mrs {}, far_el2", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

#[unsafe(no_mangle)]
extern "C" fn sluice_el2_exception_handler(kind: u64, frame: &ExceptionFrame) {
    use core::fmt::Write;
    let esr = read_esr();
    let far = read_far();
    let ec = (esr >> 26) & 0x3f;
    let mut reason = crate::fatal::Reason::new();
    let group = GROUPS[(kind as usize / 4) % 4];
    let what = KINDS[kind as usize % 4];
    let _ = if kind.is_multiple_of(4) && matches!(ec, 0x20 | 0x21 | 0x24 | 0x25) {
        let fsc = esr & 0x3f;
        let level = if fsc < 0b010000 { fsc & 3 } else { 0 };
        let access = if matches!(ec, 0x24 | 0x25) {
            if esr & (1 << 6) != 0 { "write" } else { "read" }
        } else {
            "fetch"
        };
        write!(
            reason,
            "{} ({}, level {}, {}) at ELR={:#x} FAR={:#x} ESR={:#x}",
            exception_class_name(ec),
            fault_status_name(fsc),
            level,
            access,
            frame.elr,
            far,
            esr
        )
    } else if kind.is_multiple_of(4) {
        write!(
            reason,
            "{} at ELR={:#x} ESR={:#x} FAR={:#x}",
            exception_class_name(ec),
            frame.elr,
            esr,
            far
        )
    } else {
        write!(
            reason,
            "unexpected {what} exception at ELR={:#x}",
            frame.elr
        )
    };
    crate::console::enter_emergency();
    crate::println!(
        "\n!!! CPU exception{}: {what} from {group}: {}",
        crate::smp::CurrentCpu,
        reason.as_str()
    );
    for row in 0..8 {
        let base = row * 4;
        let mut line = crate::fatal::Reason::new();
        for i in base..(base + 4).min(31) {
            let _ = write!(line, "X{:<2}={:016x} ", i, frame.x[i]);
        }
        crate::println!("    {}", line.as_str());
    }
    crate::println!(
        "    ELR={:016x} SPSR={:016x} ESR={:016x} FAR={:016x}",
        frame.elr,
        frame.spsr,
        esr,
        far
    );
    crate::fatal::cpu_exception(reason.as_str());
}
