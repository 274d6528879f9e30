//! Entering a guest at EL1 from EL2 and coming back: the world switch.
//!
//! [`run`] saves Sluice's callee-saved state (X19–X30, SP, D8–D15, FPCR,
//! FPSR, DAIF, HCR_EL2) in a frame on its stack, loads the guest's EL2
//! configuration (HCR_EL2, VTCR_EL2, VTTBR_EL2, VMPIDR_EL2, VPIDR_EL2,
//! the timer controls), flushes the VMID's TLB entries when asked, loads
//! the guest's EL1 system registers, FP/SIMD registers, ELR/SPSR and
//! X0–X30, and `ERET`s. The guest's next exception to EL2 arrives at one
//! of the lower-EL vectors ([`super::exceptions`]), which check the frame's
//! marker and jump to `sluice_guest_exit`: everything is saved back into
//! the [`GuestState`], the syndrome registers are recorded, the guest's
//! virtual timer is disabled, the host's HCR_EL2 and callee-saved state
//! are restored, and [`run`] returns as an ordinary function.
//!
//! Register lists and encodings: Arm ARM (DDI 0487) D1 "The AArch64
//! Exception Model" (ERET, exception entry, the vector table) and D19
//! (each system register).

use core::arch::{asm, global_asm};
use core::mem::{offset_of, size_of};

/// The guest's registers, in the layout the world switch addresses.
#[repr(C, align(16))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuestState {
    pub x: [u64; 31],
    /// ELR_EL2: where the guest resumes.
    pub pc: u64,
    /// SPSR_EL2.
    pub pstate: u64,
    pub sp_el0: u64,
    pub sp_el1: u64,
    pub elr_el1: u64,
    pub spsr_el1: u64,
    pub sctlr_el1: u64,
    pub cpacr_el1: u64,
    pub ttbr0_el1: u64,
    pub ttbr1_el1: u64,
    pub tcr_el1: u64,
    pub mair_el1: u64,
    pub amair_el1: u64,
    pub vbar_el1: u64,
    pub contextidr_el1: u64,
    pub tpidr_el1: u64,
    pub tpidr_el0: u64,
    pub tpidrro_el0: u64,
    pub esr_el1: u64,
    pub far_el1: u64,
    pub afsr0_el1: u64,
    pub afsr1_el1: u64,
    pub par_el1: u64,
    pub cntkctl_el1: u64,
    pub csselr_el1: u64,
    pub mdscr_el1: u64,
    pub cntv_ctl_el0: u64,
    pub cntv_cval_el0: u64,
    pub fpcr: u64,
    pub fpsr: u64,
    /// V0–V31.
    pub v: [u128; 32],
}

const _: () = assert!(offset_of!(GuestState, v) % 16 == 0);
const _: () = assert!(size_of::<GuestState>() == 0x3f0);

/// How EL2 runs the guest.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuestControl {
    pub hcr_el2: u64,
    pub vtcr_el2: u64,
    pub vttbr_el2: u64,
    pub vmpidr_el2: u64,
    /// Non-zero: `TLBI VMALLS12E1IS` for the VMID before entering.
    pub flush_tlb: u64,
}

const _: () = assert!(size_of::<GuestControl>() == 40);

/// Why the guest left: the vector index (8–11: synchronous, IRQ, FIQ,
/// SError from AArch64; 12–15 the same from AArch32) and the syndrome.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuestExit {
    pub vector: u64,
    pub esr: u64,
    pub far: u64,
    pub hpfar: u64,
}

const _: () = assert!(size_of::<GuestExit>() == 32);

/// The host frame [`run`] leaves on the stack while the guest runs.
mod frame {
    pub const FP_CONTROL: usize = 160;
    pub const HCR_DAIF: usize = 176;
    pub const STATE_EXIT: usize = 192;
    pub const MARKER: usize = 208;
    pub const SIZE: usize = 224;
}

/// In the host frame while a guest runs on this CPU; a lower-EL exception
/// without it is one of Sluice's own faults.
pub const FRAME_MARKER: u64 = 0x511c_e6e5_7e27_0001;
/// Where the marker is, seen from a lower-EL vector after it pushed the
/// 272-byte exception frame.
pub const MARKER_FROM_VECTOR: usize = super::exceptions::FRAME_SIZE + frame::MARKER;

/// `CNTHCTL_EL2` while a guest runs: EL1PCTEN (bit 0) lets it read the
/// physical counter; EL1PCEN (bit 1) clear traps its physical timer.
const CNTHCTL_GUEST: u64 = 1;

// x0 = state, x1 = control, x2 = exit.
global_asm!(
    r#"
// A lower-EL vector's common path: sp = the 272-byte exception frame with
// X0/X1 saved, x0 = the vector index. A guest exit only if this CPU's
// stack holds a running guest's host frame right above; else one of
// Sluice's own (fatal) exceptions.
    .global sluice_lower_el_exception
sluice_lower_el_exception:
    str x2, [sp, #16]
    ldr x1, [sp, #{marker_from_vector}]
    movz x2, #{m0}
    movk x2, #{m1}, lsl #16
    movk x2, #{m2}, lsl #32
    movk x2, #{m3}, lsl #48
    cmp x1, x2
    ldr x2, [sp, #16]
    b.eq sluice_guest_exit
    b sluice_el2_exception_common

    .global sluice_guest_run
sluice_guest_run:
    sub sp, sp, #{frame_size}
    stp x19, x20, [sp, #0]
    stp x21, x22, [sp, #16]
    stp x23, x24, [sp, #32]
    stp x25, x26, [sp, #48]
    stp x27, x28, [sp, #64]
    stp x29, x30, [sp, #80]
    stp d8, d9, [sp, #96]
    stp d10, d11, [sp, #112]
    stp d12, d13, [sp, #128]
    stp d14, d15, [sp, #144]
    mrs x3, fpcr
    mrs x4, fpsr
    stp x3, x4, [sp, #{fp_control}]
    mrs x3, hcr_el2
    mrs x4, daif
    stp x3, x4, [sp, #{hcr_daif}]
    stp x0, x2, [sp, #{state_exit}]
    movz x3, #{m0}
    movk x3, #{m1}, lsl #16
    movk x3, #{m2}, lsl #32
    movk x3, #{m3}, lsl #48
    str x3, [sp, #{marker}]

    // The guest's EL2 configuration. Table writes must be visible to the
    // stage-2 walker before the first guest access.
    dsb ish
    ldr x3, [x1, #{c_hcr}]
    msr hcr_el2, x3
    ldr x3, [x1, #{c_vtcr}]
    msr vtcr_el2, x3
    ldr x3, [x1, #{c_vttbr}]
    msr vttbr_el2, x3
    ldr x3, [x1, #{c_vmpidr}]
    msr vmpidr_el2, x3
    mrs x3, midr_el1
    msr vpidr_el2, x3
    mov x3, #{cnthctl}
    msr cnthctl_el2, x3
    msr cntvoff_el2, xzr
    isb
    ldr x3, [x1, #{c_flush}]
    cbz x3, 1f
    tlbi vmalls12e1is
    dsb ish
    isb
1:
    // EL1 system registers.
    ldr x3, [x0, #{sp_el0}]
    msr sp_el0, x3
    ldr x3, [x0, #{sp_el1}]
    msr sp_el1, x3
    ldr x3, [x0, #{elr_el1}]
    msr elr_el1, x3
    ldr x3, [x0, #{spsr_el1}]
    msr spsr_el1, x3
    ldr x3, [x0, #{sctlr_el1}]
    msr sctlr_el1, x3
    ldr x3, [x0, #{cpacr_el1}]
    msr cpacr_el1, x3
    ldr x3, [x0, #{ttbr0_el1}]
    msr ttbr0_el1, x3
    ldr x3, [x0, #{ttbr1_el1}]
    msr ttbr1_el1, x3
    ldr x3, [x0, #{tcr_el1}]
    msr tcr_el1, x3
    ldr x3, [x0, #{mair_el1}]
    msr mair_el1, x3
    ldr x3, [x0, #{amair_el1}]
    msr amair_el1, x3
    ldr x3, [x0, #{vbar_el1}]
    msr vbar_el1, x3
    ldr x3, [x0, #{contextidr_el1}]
    msr contextidr_el1, x3
    ldr x3, [x0, #{tpidr_el1}]
    msr tpidr_el1, x3
    ldr x3, [x0, #{tpidr_el0}]
    msr tpidr_el0, x3
    ldr x3, [x0, #{tpidrro_el0}]
    msr tpidrro_el0, x3
    ldr x3, [x0, #{esr_el1}]
    msr esr_el1, x3
    ldr x3, [x0, #{far_el1}]
    msr far_el1, x3
    ldr x3, [x0, #{afsr0_el1}]
    msr afsr0_el1, x3
    ldr x3, [x0, #{afsr1_el1}]
    msr afsr1_el1, x3
    ldr x3, [x0, #{par_el1}]
    msr par_el1, x3
    ldr x3, [x0, #{cntkctl_el1}]
    msr cntkctl_el1, x3
    ldr x3, [x0, #{csselr_el1}]
    msr csselr_el1, x3
    ldr x3, [x0, #{mdscr_el1}]
    msr mdscr_el1, x3
    ldr x3, [x0, #{cntv_cval_el0}]
    msr cntv_cval_el0, x3
    ldr x3, [x0, #{cntv_ctl_el0}]
    msr cntv_ctl_el0, x3

    // FP/SIMD.
    ldr x3, [x0, #{fpcr}]
    msr fpcr, x3
    ldr x3, [x0, #{fpsr}]
    msr fpsr, x3
    add x3, x0, #{v}
    ldp q0, q1, [x3, #0]
    ldp q2, q3, [x3, #32]
    ldp q4, q5, [x3, #64]
    ldp q6, q7, [x3, #96]
    ldp q8, q9, [x3, #128]
    ldp q10, q11, [x3, #160]
    ldp q12, q13, [x3, #192]
    ldp q14, q15, [x3, #224]
    ldp q16, q17, [x3, #256]
    ldp q18, q19, [x3, #288]
    ldp q20, q21, [x3, #320]
    ldp q22, q23, [x3, #352]
    ldp q24, q25, [x3, #384]
    ldp q26, q27, [x3, #416]
    ldp q28, q29, [x3, #448]
    ldp q30, q31, [x3, #480]

    ldr x3, [x0, #{pc}]
    msr elr_el2, x3
    ldr x3, [x0, #{pstate}]
    msr spsr_el2, x3
    isb

    ldp x2, x3, [x0, #16]
    ldp x4, x5, [x0, #32]
    ldp x6, x7, [x0, #48]
    ldp x8, x9, [x0, #64]
    ldp x10, x11, [x0, #80]
    ldp x12, x13, [x0, #96]
    ldp x14, x15, [x0, #112]
    ldp x16, x17, [x0, #128]
    ldp x18, x19, [x0, #144]
    ldp x20, x21, [x0, #160]
    ldp x22, x23, [x0, #176]
    ldp x24, x25, [x0, #192]
    ldp x26, x27, [x0, #208]
    ldp x28, x29, [x0, #224]
    ldr x30, [x0, #240]
    ldp x0, x1, [x0, #0]
    eret
    // Nothing after ERET runs; stop straight-line speculation.
    dsb nsh
    isb

// From a lower-EL vector: sp = host frame - 272 with the guest's X0/X1 at
// [sp], x0 = the vector index, X2-X30 the guest's.
    .global sluice_guest_exit
sluice_guest_exit:
    ldr x1, [sp, #{fv_state}]
    stp x2, x3, [x1, #16]
    stp x4, x5, [x1, #32]
    stp x6, x7, [x1, #48]
    stp x8, x9, [x1, #64]
    stp x10, x11, [x1, #80]
    stp x12, x13, [x1, #96]
    stp x14, x15, [x1, #112]
    stp x16, x17, [x1, #128]
    stp x18, x19, [x1, #144]
    stp x20, x21, [x1, #160]
    stp x22, x23, [x1, #176]
    stp x24, x25, [x1, #192]
    stp x26, x27, [x1, #208]
    stp x28, x29, [x1, #224]
    str x30, [x1, #240]
    ldp x2, x3, [sp, #0]
    stp x2, x3, [x1, #0]
    add sp, sp, #{exception_frame}

    mrs x3, elr_el2
    str x3, [x1, #{pc}]
    mrs x3, spsr_el2
    str x3, [x1, #{pstate}]
    mrs x3, sp_el0
    str x3, [x1, #{sp_el0}]
    mrs x3, sp_el1
    str x3, [x1, #{sp_el1}]
    mrs x3, elr_el1
    str x3, [x1, #{elr_el1}]
    mrs x3, spsr_el1
    str x3, [x1, #{spsr_el1}]
    mrs x3, sctlr_el1
    str x3, [x1, #{sctlr_el1}]
    mrs x3, cpacr_el1
    str x3, [x1, #{cpacr_el1}]
    mrs x3, ttbr0_el1
    str x3, [x1, #{ttbr0_el1}]
    mrs x3, ttbr1_el1
    str x3, [x1, #{ttbr1_el1}]
    mrs x3, tcr_el1
    str x3, [x1, #{tcr_el1}]
    mrs x3, mair_el1
    str x3, [x1, #{mair_el1}]
    mrs x3, amair_el1
    str x3, [x1, #{amair_el1}]
    mrs x3, vbar_el1
    str x3, [x1, #{vbar_el1}]
    mrs x3, contextidr_el1
    str x3, [x1, #{contextidr_el1}]
    mrs x3, tpidr_el1
    str x3, [x1, #{tpidr_el1}]
    mrs x3, tpidr_el0
    str x3, [x1, #{tpidr_el0}]
    mrs x3, tpidrro_el0
    str x3, [x1, #{tpidrro_el0}]
    mrs x3, esr_el1
    str x3, [x1, #{esr_el1}]
    mrs x3, far_el1
    str x3, [x1, #{far_el1}]
    mrs x3, afsr0_el1
    str x3, [x1, #{afsr0_el1}]
    mrs x3, afsr1_el1
    str x3, [x1, #{afsr1_el1}]
    mrs x3, par_el1
    str x3, [x1, #{par_el1}]
    mrs x3, cntkctl_el1
    str x3, [x1, #{cntkctl_el1}]
    mrs x3, csselr_el1
    str x3, [x1, #{csselr_el1}]
    mrs x3, mdscr_el1
    str x3, [x1, #{mdscr_el1}]
    mrs x3, cntv_ctl_el0
    str x3, [x1, #{cntv_ctl_el0}]
    mrs x3, cntv_cval_el0
    str x3, [x1, #{cntv_cval_el0}]
    // The guest's timer must not interrupt Sluice.
    msr cntv_ctl_el0, xzr

    mrs x3, fpcr
    str x3, [x1, #{fpcr}]
    mrs x3, fpsr
    str x3, [x1, #{fpsr}]
    add x3, x1, #{v}
    stp q0, q1, [x3, #0]
    stp q2, q3, [x3, #32]
    stp q4, q5, [x3, #64]
    stp q6, q7, [x3, #96]
    stp q8, q9, [x3, #128]
    stp q10, q11, [x3, #160]
    stp q12, q13, [x3, #192]
    stp q14, q15, [x3, #224]
    stp q16, q17, [x3, #256]
    stp q18, q19, [x3, #288]
    stp q20, q21, [x3, #320]
    stp q22, q23, [x3, #352]
    stp q24, q25, [x3, #384]
    stp q26, q27, [x3, #416]
    stp q28, q29, [x3, #448]
    stp q30, q31, [x3, #480]

    ldr x2, [sp, #{state_exit_ptr}]
    str x0, [x2, #{e_vector}]
    mrs x3, esr_el2
    str x3, [x2, #{e_esr}]
    mrs x3, far_el2
    str x3, [x2, #{e_far}]
    mrs x3, hpfar_el2
    str x3, [x2, #{e_hpfar}]

    // Back to Sluice's configuration (stage 2 off).
    ldp x3, x4, [sp, #{hcr_daif}]
    msr hcr_el2, x3
    isb
    ldp x5, x6, [sp, #{fp_control}]
    msr fpcr, x5
    msr fpsr, x6
    str xzr, [sp, #{marker}]
    ldp x19, x20, [sp, #0]
    ldp x21, x22, [sp, #16]
    ldp x23, x24, [sp, #32]
    ldp x25, x26, [sp, #48]
    ldp x27, x28, [sp, #64]
    ldp x29, x30, [sp, #80]
    ldp d8, d9, [sp, #96]
    ldp d10, d11, [sp, #112]
    ldp d12, d13, [sp, #128]
    ldp d14, d15, [sp, #144]
    add sp, sp, #{frame_size}
    msr daif, x4
    ret
"#,
    marker_from_vector = const MARKER_FROM_VECTOR,
    frame_size = const frame::SIZE,
    fp_control = const frame::FP_CONTROL,
    hcr_daif = const frame::HCR_DAIF,
    state_exit = const frame::STATE_EXIT,
    state_exit_ptr = const frame::STATE_EXIT + 8,
    marker = const frame::MARKER,
    fv_state = const super::exceptions::FRAME_SIZE + frame::STATE_EXIT,
    exception_frame = const super::exceptions::FRAME_SIZE,
    m0 = const FRAME_MARKER & 0xffff,
    m1 = const (FRAME_MARKER >> 16) & 0xffff,
    m2 = const (FRAME_MARKER >> 32) & 0xffff,
    m3 = const (FRAME_MARKER >> 48) & 0xffff,
    cnthctl = const CNTHCTL_GUEST,
    c_hcr = const offset_of!(GuestControl, hcr_el2),
    c_vtcr = const offset_of!(GuestControl, vtcr_el2),
    c_vttbr = const offset_of!(GuestControl, vttbr_el2),
    c_vmpidr = const offset_of!(GuestControl, vmpidr_el2),
    c_flush = const offset_of!(GuestControl, flush_tlb),
    e_vector = const offset_of!(GuestExit, vector),
    e_esr = const offset_of!(GuestExit, esr),
    e_far = const offset_of!(GuestExit, far),
    e_hpfar = const offset_of!(GuestExit, hpfar),
    pc = const offset_of!(GuestState, pc),
    pstate = const offset_of!(GuestState, pstate),
    sp_el0 = const offset_of!(GuestState, sp_el0),
    sp_el1 = const offset_of!(GuestState, sp_el1),
    elr_el1 = const offset_of!(GuestState, elr_el1),
    spsr_el1 = const offset_of!(GuestState, spsr_el1),
    sctlr_el1 = const offset_of!(GuestState, sctlr_el1),
    cpacr_el1 = const offset_of!(GuestState, cpacr_el1),
    ttbr0_el1 = const offset_of!(GuestState, ttbr0_el1),
    ttbr1_el1 = const offset_of!(GuestState, ttbr1_el1),
    tcr_el1 = const offset_of!(GuestState, tcr_el1),
    mair_el1 = const offset_of!(GuestState, mair_el1),
    amair_el1 = const offset_of!(GuestState, amair_el1),
    vbar_el1 = const offset_of!(GuestState, vbar_el1),
    contextidr_el1 = const offset_of!(GuestState, contextidr_el1),
    tpidr_el1 = const offset_of!(GuestState, tpidr_el1),
    tpidr_el0 = const offset_of!(GuestState, tpidr_el0),
    tpidrro_el0 = const offset_of!(GuestState, tpidrro_el0),
    esr_el1 = const offset_of!(GuestState, esr_el1),
    far_el1 = const offset_of!(GuestState, far_el1),
    afsr0_el1 = const offset_of!(GuestState, afsr0_el1),
    afsr1_el1 = const offset_of!(GuestState, afsr1_el1),
    par_el1 = const offset_of!(GuestState, par_el1),
    cntkctl_el1 = const offset_of!(GuestState, cntkctl_el1),
    csselr_el1 = const offset_of!(GuestState, csselr_el1),
    mdscr_el1 = const offset_of!(GuestState, mdscr_el1),
    cntv_ctl_el0 = const offset_of!(GuestState, cntv_ctl_el0),
    cntv_cval_el0 = const offset_of!(GuestState, cntv_cval_el0),
    fpcr = const offset_of!(GuestState, fpcr),
    fpsr = const offset_of!(GuestState, fpsr),
    v = const offset_of!(GuestState, v),
);

unsafe extern "C" {
    fn sluice_guest_run(state: *mut GuestState, control: *const GuestControl, exit: *mut GuestExit);
}

macro_rules! read_sysreg {
    ($name:literal) => {{
        let value: u64;
        // SAFETY: reading an ID or EL2 system register has no side effects.
        unsafe {
            asm!(concat!("mrs {}, ", $name), out(reg) value, options(nomem, nostack, preserves_flags))
        };
        value
    }};
}

/// `ID_AA64MMFR0_EL1` (PARange) and `ID_AA64MMFR1_EL1` (VMIDBits).
pub fn memory_model_features() -> (u64, u64) {
    (
        read_sysreg!("id_aa64mmfr0_el1"),
        read_sysreg!("id_aa64mmfr1_el1"),
    )
}

/// `ID_AA64PFR1_EL1` and `ID_AA64MMFR2_EL1`: the PSTATE features exception
/// entry depends on (BTI, SSBS, MTE, NMI, GCS; UAO). By their generic
/// names (`S3_0_C0_C4_1`, `S3_0_C0_C7_2`), which every assembler accepts.
pub fn pstate_feature_registers() -> (u64, u64) {
    (read_sysreg!("s3_0_c0_c4_1"), read_sysreg!("s3_0_c0_c7_2"))
}

/// Why this CPU cannot run guests with this world switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestEntryError {
    /// Sluice does not run at EL2.
    NotEl2(u64),
    /// HCR_EL2.E2H is set: EL1 register names would reach EL2's.
    HostExtensions,
    /// Sluice's stack is SP_EL0 (SPSel = 0), which the guest owns.
    StackIsSpEl0,
}

impl core::fmt::Display for GuestEntryError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotEl2(el) => write!(f, "Sluice runs at EL{el}, not EL2"),
            Self::HostExtensions => f.write_str(
                "HCR_EL2.E2H is set (VHE): the world switch needs the non-VHE EL2 layout",
            ),
            Self::StackIsSpEl0 => {
                f.write_str("Sluice runs on SP_EL0 (SPSel = 0), which belongs to the guest")
            }
        }
    }
}

/// Checks that this CPU runs Sluice the way [`run`] assumes: EL2, no VHE,
/// its own stack pointer (SP_EL2).
pub fn check_this_cpu() -> Result<(), GuestEntryError> {
    let el = super::current_el();
    if el != 2 {
        return Err(GuestEntryError::NotEl2(el));
    }
    if read_sysreg!("hcr_el2") & (1 << 34) != 0 {
        return Err(GuestEntryError::HostExtensions);
    }
    if read_sysreg!("spsel") & 1 == 0 {
        return Err(GuestEntryError::StackIsSpEl0);
    }
    Ok(())
}

/// Runs the guest of `state` under `control` until its next exception to
/// EL2; `state` holds its registers afterwards.
///
/// # Safety
/// [`check_this_cpu`] succeeded on this CPU; `control` puts the guest at
/// EL1 or EL0 under a stage-2 table (`HCR_EL2.VM`) that maps only memory
/// the guest may use, and `state.pstate` names EL1 or EL0 (AArch64): an
/// `ERET` to EL2 would run guest code with Sluice's privileges.
pub unsafe fn run(state: &mut GuestState, control: &GuestControl) -> GuestExit {
    let mut exit = GuestExit::default();
    // SAFETY: the caller's contract; the world switch returns like a
    // function call (AAPCS64), with the callee-saved registers restored.
    unsafe { sluice_guest_run(state, control, &mut exit) };
    exit
}

/// Invalidates every instruction cache to the point of unification in the
/// inner-shareable domain (after guest code was written as data, with the
/// data cleaned first: Arm ARM B2.4 "Caches").
pub fn invalidate_instruction_caches() {
    // SAFETY: cache maintenance has no architectural effect on memory.
    unsafe {
        asm!(
            "dsb ish",
            "ic ialluis",
            "dsb ish",
            "isb",
            options(nostack, preserves_flags)
        )
    };
}
