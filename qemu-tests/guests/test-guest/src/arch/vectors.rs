//! aarch64 only: an EL1 vector table whose synchronous handlers record an
//! exception the guest provoked on purpose and step over the instruction,
//! and probes that execute instructions Sluice traps to EL2 and does not
//! emulate, from EL1 with SP_EL1 (EL1h), EL1 with SP_EL0 (EL1t) and EL0.
//!
//! Vector offsets from `VBAR_EL1` (Arm ARM DDI 0487 G.b, D1.10.2): the
//! current EL with SP_EL0 at 0x000, with SP_ELx at 0x200, a lower EL in
//! AArch64 at 0x400, in AArch32 at 0x600; synchronous, IRQ, FIQ and SError
//! 0x80 apart in each group. The handlers run on SP_EL1 (exception entry
//! selects it) and keep every register but the ones they restore.
//!
//! Only an exception the guest armed [`RECORD`] for is stepped over (the
//! next one is not); any other exception, or an interrupt, ends the guest
//! with a failed `exception` step naming it, rather than being skipped
//! silently. An `SVC #0` from EL0 is how the EL0 probe returns: to EL1h at
//! the address in X1.

use core::arch::{asm, global_asm};
use core::mem::offset_of;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::console::Report;

/// What the handler saw at the armed exception.
#[repr(C)]
pub struct Record {
    /// Non-zero: the next synchronous exception is expected (the handler
    /// clears it).
    pub armed: AtomicU64,
    /// Armed exceptions taken since [`Record::arm`].
    pub count: AtomicU64,
    /// The vector's offset from `VBAR_EL1`.
    pub vector: AtomicU64,
    pub esr: AtomicU64,
    pub elr: AtomicU64,
    pub spsr: AtomicU64,
    /// `DAIF`, `CurrentEL` and `SPSel` in the handler: the PSTATE exception
    /// entry gave it.
    pub daif: AtomicU64,
    pub current_el: AtomicU64,
    pub spsel: AtomicU64,
}

pub static RECORD: Record = Record {
    armed: AtomicU64::new(0),
    count: AtomicU64::new(0),
    vector: AtomicU64::new(0),
    esr: AtomicU64::new(0),
    elr: AtomicU64::new(0),
    spsr: AtomicU64::new(0),
    daif: AtomicU64::new(0),
    current_el: AtomicU64::new(0),
    spsel: AtomicU64::new(0),
};

/// A copy of [`RECORD`].
#[derive(Debug, Clone, Copy)]
pub struct Seen {
    pub count: u64,
    pub vector: u64,
    pub esr: u64,
    pub elr: u64,
    pub spsr: u64,
    pub daif: u64,
    pub current_el: u64,
    pub spsel: u64,
}

impl Record {
    /// Expects one exception from now on.
    pub fn arm(&self) {
        self.count.store(0, Ordering::SeqCst);
        self.armed.store(1, Ordering::SeqCst);
    }

    /// What was recorded; disarms.
    pub fn take(&self) -> Seen {
        self.armed.store(0, Ordering::SeqCst);
        Seen {
            count: self.count.load(Ordering::SeqCst),
            vector: self.vector.load(Ordering::SeqCst),
            esr: self.esr.load(Ordering::SeqCst),
            elr: self.elr.load(Ordering::SeqCst),
            spsr: self.spsr.load(Ordering::SeqCst),
            daif: self.daif.load(Ordering::SeqCst),
            current_el: self.current_el.load(Ordering::SeqCst),
            spsel: self.spsel.load(Ordering::SeqCst),
        }
    }
}

// Each vector: save X0/X1, X0 = the vector's offset, to the common path.
// Common path (X0/X1 at [sp+16], X2/X3 at [sp]): interrupts and SErrors
// are fatal; SVC (EC 0x15) returns to EL1h at the caller's X1; an armed
// exception is recorded and stepped over (A64: 4 bytes); anything else is
// fatal.
global_asm!(
    r#"
    .pushsection .text.test_guest_vectors, "ax"
    .balign 2048
    .global test_guest_vectors
test_guest_vectors:
    .irp offset, 0x000, 0x080, 0x100, 0x180, 0x200, 0x280, 0x300, 0x380, 0x400, 0x480, 0x500, 0x580, 0x600, 0x680, 0x700, 0x780
    .balign 0x80
    stp x0, x1, [sp, #-16]!
    mov x0, #\offset
    b 90f
    .endr

90:
    stp x2, x3, [sp, #-16]!
    and x2, x0, #0x180
    cbnz x2, 99f
    mrs x2, esr_el1
    lsr x3, x2, #26
    cmp x3, #0x15
    b.eq 95f
    adrp x1, {record}
    add x1, x1, :lo12:{record}
    ldr x3, [x1, #{armed}]
    cbz x3, 99f
    str xzr, [x1, #{armed}]
    ldr x3, [x1, #{count}]
    add x3, x3, #1
    str x3, [x1, #{count}]
    str x0, [x1, #{vector}]
    str x2, [x1, #{esr}]
    mrs x2, elr_el1
    str x2, [x1, #{elr}]
    add x2, x2, #4
    msr elr_el1, x2
    mrs x2, spsr_el1
    str x2, [x1, #{spsr}]
    mrs x2, daif
    str x2, [x1, #{daif}]
    mrs x2, currentel
    str x2, [x1, #{current_el}]
    mrs x2, spsel
    str x2, [x1, #{spsel}]
    ldp x2, x3, [sp], #16
    ldp x0, x1, [sp], #16
    eret

    // SVC from EL0: back to EL1h, D/A/I/F masked, at the caller's X1.
95:
    ldr x2, [sp, #24]
    msr elr_el1, x2
    mov x2, #0x3c5
    msr spsr_el1, x2
    ldp x2, x3, [sp], #16
    ldp x0, x1, [sp], #16
    eret

99:
    mrs x1, esr_el1
    mrs x2, elr_el1
    mrs x3, far_el1
    b {unexpected}
    .popsection
"#,
    record = sym RECORD,
    unexpected = sym unexpected_exception,
    armed = const offset_of!(Record, armed),
    count = const offset_of!(Record, count),
    vector = const offset_of!(Record, vector),
    esr = const offset_of!(Record, esr),
    elr = const offset_of!(Record, elr),
    spsr = const offset_of!(Record, spsr),
    daif = const offset_of!(Record, daif),
    current_el = const offset_of!(Record, current_el),
    spsel = const offset_of!(Record, spsel),
);

unsafe extern "C" {
    static test_guest_vectors: u8;
}

/// An exception nobody armed for: one failed step naming it, then done.
extern "C" fn unexpected_exception(vector: u64, esr: u64, elr: u64, far: u64) -> ! {
    let mut report = Report::new();
    report.fail(
        "exception",
        format_args!(
            "unexpected exception at vector {vector:#x}: ESR_EL1 {esr:#x}, ELR_EL1 {elr:#x}, FAR_EL1 {far:#x}"
        ),
    );
    report.done()
}

/// Points `VBAR_EL1` at the table.
pub fn install() {
    let table = &raw const test_guest_vectors as u64;
    // SAFETY: the table's handlers keep every register they do not
    // deliberately restore and only touch RECORD.
    unsafe { asm!("msr vbar_el1, {t}", "isb", t = in(reg) table, options(nostack)) };
}

/// `MRS Xt, ACTLR_EL1` at EL1h (trapped by `HCR_EL2.TACR`); returns the
/// instruction's address.
pub fn read_actlr_el1() -> u64 {
    let at: u64;
    // SAFETY: reads a register; if it faults, the armed handler steps over
    // it (the exception frame goes below SP, which the compiler keeps
    // nothing under).
    unsafe {
        asm!(
            "adr {at}, 2f",
            "2: mrs {value}, actlr_el1",
            at = out(reg) at,
            value = out(reg) _,
        )
    };
    at
}

/// `MSR ACTLR_EL1, XZR` at EL1t (SP_EL0 selected); returns the
/// instruction's address.
pub fn write_actlr_el1_on_sp_el0() -> u64 {
    let at: u64;
    // SAFETY: nothing between the SPSel writes uses the stack; the
    // exception handler runs on SP_EL1 (exception entry selects it). The
    // write would set no bit if it were not trapped.
    unsafe {
        asm!(
            "msr spsel, #0",
            "adr {at}, 2f",
            "2: msr actlr_el1, xzr",
            "msr spsel, #1",
            at = out(reg) at,
        )
    };
    at
}

/// At EL0: `MRS X0, CNTP_CTL_EL0`, with `CNTKCTL_EL1.EL0PTEN` set so that
/// EL1 does not trap it and EL2 does (`CNTHCTL_EL2.EL1PCEN` = 0), then
/// `SVC #0` back to EL1h. Returns the MRS's address.
pub fn read_physical_timer_at_el0() -> u64 {
    let at: u64;
    // SAFETY: the EL0 code uses no stack and no memory; the SVC handler
    // returns to label 3 at EL1h with D/A/I/F masked (the guest runs
    // masked throughout), SP_EL1 as it was. CNTKCTL_EL1 is restored.
    unsafe {
        asm!(
            "mrs {saved}, cntkctl_el1",
            "orr x9, {saved}, #0x200",
            "msr cntkctl_el1, x9",
            "isb",
            "adr {at}, 2f",
            "msr elr_el1, {at}",
            "mov x9, #0x3c0",
            "msr spsr_el1, x9",
            "adr x1, 3f",
            "eret",
            "2: mrs x0, cntp_ctl_el0",
            "svc #0",
            "3: msr cntkctl_el1, {saved}",
            "isb",
            at = out(reg) at,
            saved = out(reg) _,
            out("x0") _,
            out("x1") _,
            out("x9") _,
        )
    };
    at
}

/// `SMC #0` at EL1h with X0 a function that is not PSCI (SMC64 SiP
/// service call 0); returns the instruction's address.
pub fn smc_not_psci() -> u64 {
    let at: u64;
    // SAFETY: Sluice traps SMC (HCR_EL2.TSC); nothing is called, the armed
    // handler steps over the instruction.
    unsafe {
        asm!(
            "adr {at}, 2f",
            "2: smc #0",
            at = out(reg) at,
            inout("x0") 0xc200_0000u64 => _,
        )
    };
    at
}
