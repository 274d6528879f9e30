//! CPU exceptions (vectors 0–31): every one is fatal for now, and prints a
//! clear reason and a register dump before Sluice stops.

use core::arch::{asm, global_asm};
use core::mem::size_of;

use super::gdt::KERNEL_CODE;

// Entry stubs: vectors without a CPU-pushed error code push a zero so every
// frame has the same layout, then the vector number; the common path saves
// the general registers and calls `sluice_exception_handler` (System V ABI,
// frame pointer in RDI; the UEFI target's default C ABI is Win64, so the
// handler is declared `extern "sysv64"`). In 64-bit mode the CPU aligns RSP
// to 16 before pushing its frame; 22 quadwords keep that alignment.
global_asm!(
    r#"
.macro SLUICE_STUB_NOERR n
.global sluice_exception_stub_\n
sluice_exception_stub_\n:
    push 0
    push \n
    jmp sluice_exception_common
.endm
.macro SLUICE_STUB_ERR n
.global sluice_exception_stub_\n
sluice_exception_stub_\n:
    push \n
    jmp sluice_exception_common
.endm
SLUICE_STUB_NOERR 0
SLUICE_STUB_NOERR 1
SLUICE_STUB_NOERR 2
SLUICE_STUB_NOERR 3
SLUICE_STUB_NOERR 4
SLUICE_STUB_NOERR 5
SLUICE_STUB_NOERR 6
SLUICE_STUB_NOERR 7
SLUICE_STUB_ERR 8
SLUICE_STUB_NOERR 9
SLUICE_STUB_ERR 10
SLUICE_STUB_ERR 11
SLUICE_STUB_ERR 12
SLUICE_STUB_ERR 13
SLUICE_STUB_ERR 14
SLUICE_STUB_NOERR 15
SLUICE_STUB_NOERR 16
SLUICE_STUB_ERR 17
SLUICE_STUB_NOERR 18
SLUICE_STUB_NOERR 19
SLUICE_STUB_NOERR 20
SLUICE_STUB_ERR 21
SLUICE_STUB_NOERR 22
SLUICE_STUB_NOERR 23
SLUICE_STUB_NOERR 24
SLUICE_STUB_NOERR 25
SLUICE_STUB_NOERR 26
SLUICE_STUB_NOERR 27
SLUICE_STUB_NOERR 28
SLUICE_STUB_ERR 29
SLUICE_STUB_ERR 30
SLUICE_STUB_NOERR 31
sluice_exception_common:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov rdi, rsp
    call sluice_exception_handler
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    add rsp, 16
    iretq
"#
);

/// The stack as `sluice_exception_common` leaves it.
#[repr(C)]
#[derive(Debug)]
pub struct ExceptionFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}
const _: () = assert!(size_of::<ExceptionFrame>() == 22 * 8);

unsafe extern "C" {
    safe fn sluice_exception_stub_0();
    safe fn sluice_exception_stub_1();
    safe fn sluice_exception_stub_2();
    safe fn sluice_exception_stub_3();
    safe fn sluice_exception_stub_4();
    safe fn sluice_exception_stub_5();
    safe fn sluice_exception_stub_6();
    safe fn sluice_exception_stub_7();
    safe fn sluice_exception_stub_8();
    safe fn sluice_exception_stub_9();
    safe fn sluice_exception_stub_10();
    safe fn sluice_exception_stub_11();
    safe fn sluice_exception_stub_12();
    safe fn sluice_exception_stub_13();
    safe fn sluice_exception_stub_14();
    safe fn sluice_exception_stub_15();
    safe fn sluice_exception_stub_16();
    safe fn sluice_exception_stub_17();
    safe fn sluice_exception_stub_18();
    safe fn sluice_exception_stub_19();
    safe fn sluice_exception_stub_20();
    safe fn sluice_exception_stub_21();
    safe fn sluice_exception_stub_22();
    safe fn sluice_exception_stub_23();
    safe fn sluice_exception_stub_24();
    safe fn sluice_exception_stub_25();
    safe fn sluice_exception_stub_26();
    safe fn sluice_exception_stub_27();
    safe fn sluice_exception_stub_28();
    safe fn sluice_exception_stub_29();
    safe fn sluice_exception_stub_30();
    safe fn sluice_exception_stub_31();
}

const STUBS: [extern "C" fn(); 32] = [
    sluice_exception_stub_0,
    sluice_exception_stub_1,
    sluice_exception_stub_2,
    sluice_exception_stub_3,
    sluice_exception_stub_4,
    sluice_exception_stub_5,
    sluice_exception_stub_6,
    sluice_exception_stub_7,
    sluice_exception_stub_8,
    sluice_exception_stub_9,
    sluice_exception_stub_10,
    sluice_exception_stub_11,
    sluice_exception_stub_12,
    sluice_exception_stub_13,
    sluice_exception_stub_14,
    sluice_exception_stub_15,
    sluice_exception_stub_16,
    sluice_exception_stub_17,
    sluice_exception_stub_18,
    sluice_exception_stub_19,
    sluice_exception_stub_20,
    sluice_exception_stub_21,
    sluice_exception_stub_22,
    sluice_exception_stub_23,
    sluice_exception_stub_24,
    sluice_exception_stub_25,
    sluice_exception_stub_26,
    sluice_exception_stub_27,
    sluice_exception_stub_28,
    sluice_exception_stub_29,
    sluice_exception_stub_30,
    sluice_exception_stub_31,
];

/// One IDT gate (Intel SDM vol. 3, 6.14.1 "64-bit mode IDT").
#[repr(C)]
#[derive(Clone, Copy)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attributes: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}
const _: () = assert!(size_of::<Gate>() == 16);

impl Gate {
    const EMPTY: Self = Self {
        offset_low: 0,
        selector: 0,
        ist: 0,
        type_attributes: 0,
        offset_mid: 0,
        offset_high: 0,
        reserved: 0,
    };

    /// A present 64-bit interrupt gate (type 0xE), DPL 0.
    const fn interrupt(handler: u64, ist: u8) -> Self {
        Self {
            offset_low: handler as u16,
            selector: KERNEL_CODE,
            ist,
            type_attributes: 0x8e,
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

static mut IDT: [Gate; 256] = [Gate::EMPTY; 256];

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

/// Installs handlers for vectors 0–31. NMI, double fault and machine check
/// run on IST1.
pub fn init() {
    // SAFETY: called once on the boot CPU before interrupts are enabled; the
    // IDT is static and lives forever.
    unsafe {
        let idt_ptr = &raw mut IDT;
        let idt = &mut *idt_ptr;
        for (vector, stub) in STUBS.iter().enumerate() {
            let ist = if matches!(vector, 2 | 8 | 18) { 1 } else { 0 };
            idt[vector] = Gate::interrupt(*stub as usize as u64, ist);
        }
    }
    load();
}

/// Loads the IDT `init` built on the running CPU (every CPU shares it).
pub fn load() {
    let pointer = DescriptorPointer {
        limit: (size_of::<[Gate; 256]>() - 1) as u16,
        base: (&raw const IDT) as u64,
    };
    // SAFETY: the IDT is static and lives forever; after `init` it is only
    // read.
    unsafe { asm!("lidt [{}]", in(reg) &pointer, options(nostack, preserves_flags)) };
}

/// Points external-interrupt vector `vector` (32-255) at `handler`, a
/// 64-bit interrupt gate on the current stack, for [`super::interrupts`].
/// Exception vectors are left alone.
pub(super) fn set_interrupt_gate(vector: u8, handler: u64) {
    if vector < 32 {
        return;
    }
    // SAFETY: the IDT is static; the gate is written before anything can
    // raise its vector (the interrupts module installs each gate once,
    // before registering a handler or enabling interrupts).
    unsafe {
        let idt_ptr = &raw mut IDT;
        (*idt_ptr)[usize::from(vector)] = Gate::interrupt(handler, 0);
    }
}

/// The mnemonic and name of an exception vector (Intel SDM vol. 3, table 6-1).
pub fn vector_name(vector: u64) -> (&'static str, &'static str) {
    match vector {
        0 => ("#DE", "divide error"),
        1 => ("#DB", "debug"),
        2 => ("NMI", "non-maskable interrupt"),
        3 => ("#BP", "breakpoint"),
        4 => ("#OF", "overflow"),
        5 => ("#BR", "bound range exceeded"),
        6 => ("#UD", "invalid opcode"),
        7 => ("#NM", "device not available"),
        8 => ("#DF", "double fault"),
        10 => ("#TS", "invalid TSS"),
        11 => ("#NP", "segment not present"),
        12 => ("#SS", "stack-segment fault"),
        13 => ("#GP", "general protection"),
        14 => ("#PF", "page fault"),
        16 => ("#MF", "x87 floating-point error"),
        17 => ("#AC", "alignment check"),
        18 => ("#MC", "machine check"),
        19 => ("#XM", "SIMD floating-point exception"),
        20 => ("#VE", "virtualization exception"),
        21 => ("#CP", "control protection"),
        29 => ("#VC", "VMM communication"),
        30 => ("#SX", "security exception"),
        _ => ("#??", "reserved vector"),
    }
}

/// Decodes a page-fault error code (SDM vol. 3, 4.7).
fn page_fault_cause(error: u64) -> &'static str {
    match (error & 1 != 0, error & 2 != 0, error & 16 != 0) {
        (_, _, true) => "instruction fetch",
        (false, false, _) => "read of a not-present page",
        (false, true, _) => "write to a not-present page",
        (true, false, _) => "read protection violation",
        (true, true, _) => "write protection violation",
    }
}

#[unsafe(no_mangle)]
extern "sysv64" fn sluice_exception_handler(frame: &ExceptionFrame) {
    let (mnemonic, name) = vector_name(frame.vector);
    let mut reason = heapless_reason();
    use core::fmt::Write;
    let _ = if frame.vector == 14 {
        write!(
            reason,
            "{mnemonic} {name} ({}) at RIP={:#x} CR2={:#x} error={:#x}",
            page_fault_cause(frame.error_code),
            frame.rip,
            super::read_cr2(),
            frame.error_code
        )
    } else {
        write!(
            reason,
            "{mnemonic} {name} at RIP={:#x} error={:#x}",
            frame.rip, frame.error_code
        )
    };
    crate::console::enter_emergency();
    crate::println!(
        "\n!!! CPU exception{}: vector {} {}",
        crate::smp::CurrentCpu,
        frame.vector,
        reason.as_str()
    );
    crate::println!(
        "    RAX={:016x} RBX={:016x} RCX={:016x} RDX={:016x}",
        frame.rax,
        frame.rbx,
        frame.rcx,
        frame.rdx
    );
    crate::println!(
        "    RSI={:016x} RDI={:016x} RBP={:016x} RSP={:016x}",
        frame.rsi,
        frame.rdi,
        frame.rbp,
        frame.rsp
    );
    crate::println!(
        "    R8 ={:016x} R9 ={:016x} R10={:016x} R11={:016x}",
        frame.r8,
        frame.r9,
        frame.r10,
        frame.r11
    );
    crate::println!(
        "    R12={:016x} R13={:016x} R14={:016x} R15={:016x}",
        frame.r12,
        frame.r13,
        frame.r14,
        frame.r15
    );
    crate::println!(
        "    RIP={:016x} CS={:04x} RFLAGS={:016x} SS={:04x} CR3={:016x}",
        frame.rip,
        frame.cs,
        frame.rflags,
        frame.ss,
        super::read_cr3()
    );
    crate::fatal::cpu_exception(reason.as_str());
}

fn heapless_reason() -> crate::fatal::Reason {
    crate::fatal::Reason::new()
}
