//! Exceptions Sluice makes a guest take at EL1: what the processor does on
//! a synchronous exception to EL1, done on the vCPU's saved context (Arm
//! ARM DDI 0487 G.b, D1.10 "Exception entry", D1.10.2 "Exception vectors",
//! and the shared pseudocode `AArch64.TakeException`).
//!
//! The exception is taken from the guest's PSTATE at the next entry:
//!
//! * `ELR_EL1` = the PC (the preferred return address of an UNDEFINED
//!   instruction or a synchronous abort is the instruction itself),
//!   `SPSR_EL1` = PSTATE, `ESR_EL1` = the syndrome, `FAR_EL1` for aborts;
//! * PSTATE: EL1 with SP_EL1 (EL1h), AArch64, `D`, `A`, `I`, `F` set, `SS`
//!   and `IL` clear, and per feature: `PAN` set when `SCTLR_EL1.SPAN` is 0
//!   (FEAT_PAN), `UAO` clear (FEAT_UAO), `BTYPE` clear (FEAT_BTI), `SSBS`
//!   = `SCTLR_EL1.DSSBS` (FEAT_SSBS), `TCO` set (FEAT_MTE), `ALLINT` =
//!   NOT `SCTLR_EL1.SPINTMASK` (FEAT_NMI); everything else (NZCV, DIT, PAN
//!   with SPAN set) unchanged;
//! * PC = `VBAR_EL1[63:11]` with the vector offset: from EL1 with SP_EL0
//!   0x000, from EL1 with SP_EL1 0x200, from EL0 in AArch64 0x400 (from
//!   AArch32 0x600), plus 0x000 for a synchronous exception.
//!
//! `SPSR_EL1.BTYPE` keeps the guest's value: for these exception types the
//! pseudocode leaves zeroing it CONSTRAINED UNPREDICTABLE, and keeping it
//! is one of the permitted behaviours.

use super::GuestContext;
use super::sysregs::{id, sctlr};
use crate::vcpu::{Aarch64Exception, VcpuError, pstate};

/// Offsets from `VBAR_EL1` of the vector groups (D1.10.2, "Vector offsets
/// from vector table base address"), each group holding the synchronous,
/// IRQ, FIQ and SError vectors 0x80 apart.
pub mod vector {
    /// Exception from the current EL while using SP_EL0.
    pub const CURRENT_EL_SP0: u64 = 0x000;
    /// Exception from the current EL while using SP_ELx.
    pub const CURRENT_EL_SPX: u64 = 0x200;
    /// Exception from a lower EL, all of whose lower ELs are AArch64.
    pub const LOWER_EL_AARCH64: u64 = 0x400;
    /// Exception from a lower EL using AArch32.
    pub const LOWER_EL_AARCH32: u64 = 0x600;
    /// The synchronous vector within a group.
    pub const SYNCHRONOUS: u64 = 0x000;
}

/// The processor features that change what exception entry does to
/// PSTATE. The guest sees the host's ID registers, so these are the
/// host's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PstateFeatures {
    pub pan: bool,
    pub uao: bool,
    pub bti: bool,
    pub ssbs: bool,
    pub mte: bool,
    pub nmi: bool,
    /// FEAT_GCS: exception entry also sets `PSTATE.EXLOCK` from
    /// `GCSCR_EL1`, which the world switch does not hold; injection is
    /// refused on such processors rather than done half right.
    pub gcs: bool,
}

impl PstateFeatures {
    /// Decodes `ID_AA64PFR1_EL1` (BT 3:0, SSBS 7:4, MTE 11:8, NMI 39:36,
    /// GCS 47:44), `ID_AA64MMFR1_EL1` (PAN 23:20) and `ID_AA64MMFR2_EL1`
    /// (UAO 7:4): each feature is present when its field is non-zero.
    pub const fn from_id_registers(pfr1: u64, mmfr1: u64, mmfr2: u64) -> Self {
        const fn field(value: u64, shift: u32) -> bool {
            (value >> shift) & 0xf != 0
        }
        Self {
            pan: field(mmfr1, id::MMFR1_PAN_SHIFT),
            uao: field(mmfr2, id::MMFR2_UAO_SHIFT),
            bti: field(pfr1, id::PFR1_BT_SHIFT),
            ssbs: field(pfr1, id::PFR1_SSBS_SHIFT),
            mte: field(pfr1, id::PFR1_MTE_SHIFT),
            nmi: field(pfr1, id::PFR1_NMI_SHIFT),
            gcs: field(pfr1, id::PFR1_GCS_SHIFT),
        }
    }
}

/// Where an exception taken from `pstate` enters, relative to `VBAR_EL1`;
/// `None` for a PSTATE that is not EL0 or EL1 (the guest never runs
/// elsewhere).
pub const fn vector_group(pstate: u64) -> Option<u64> {
    if pstate & pstate::AARCH32 != 0 {
        // AArch32 is only possible at EL0 (HCR_EL2.RW makes EL1 AArch64):
        // M[3:0] = User (0b0000).
        return if pstate & pstate::MODE == 0 {
            Some(vector::LOWER_EL_AARCH32)
        } else {
            None
        };
    }
    match pstate & pstate::MODE {
        pstate::MODE_EL0T => Some(vector::LOWER_EL_AARCH64),
        pstate::MODE_EL1T => Some(vector::CURRENT_EL_SP0),
        pstate::MODE_EL1H => Some(vector::CURRENT_EL_SPX),
        _ => None,
    }
}

/// PSTATE after taking an exception to EL1 from `old`, with `sctlr_el1`
/// the guest's `SCTLR_EL1`.
pub const fn pstate_on_entry(old: u64, sctlr_el1: u64, features: &PstateFeatures) -> u64 {
    let mut new = old & !(pstate::MODE | pstate::AARCH32);
    new |= pstate::MODE_EL1H | pstate::DAIF;
    new &= !(pstate::SS | pstate::IL);
    if features.pan && sctlr_el1 & sctlr::SPAN == 0 {
        new |= pstate::PAN;
    }
    if features.uao {
        new &= !pstate::UAO;
    }
    if features.bti {
        new &= !pstate::BTYPE;
    }
    if features.ssbs {
        new &= !pstate::SSBS;
        if sctlr_el1 & sctlr::DSSBS != 0 {
            new |= pstate::SSBS;
        }
    }
    if features.mte {
        new |= pstate::TCO;
    }
    if features.nmi {
        new &= !pstate::ALLINT;
        if sctlr_el1 & sctlr::SPINTMASK == 0 {
            new |= pstate::ALLINT;
        }
    }
    new
}

/// Takes `exception` on `context` as the processor would at the
/// instruction at the PC: afterwards the context is at the EL1 handler.
/// Refuses a PSTATE the guest cannot be in, an AArch32 source (Sluice
/// never resumes an AArch32 EL0: it would not be reached) and FEAT_GCS
/// processors.
pub fn take_exception(
    context: &mut GuestContext,
    exception: Aarch64Exception,
    features: &PstateFeatures,
) -> Result<(), VcpuError> {
    let old = context.registers.pstate;
    let group = match vector_group(old) {
        Some(vector::LOWER_EL_AARCH32) => {
            return Err(VcpuError::BadEvent(
                "the guest is in AArch32 state, which Sluice does not run",
            ));
        }
        Some(group) => group,
        None => {
            return Err(VcpuError::InvalidGuestState(
                "PSTATE names an exception level other than EL1/EL0",
            ));
        }
    };
    if features.gcs {
        return Err(VcpuError::Unsupported(
            "exception injection on a FEAT_GCS processor (PSTATE.EXLOCK comes from GCSCR_EL1, which the world switch does not hold)",
        ));
    }
    let from_el0 = group == vector::LOWER_EL_AARCH64;
    let el1 = &mut context.el1;
    el1.elr_el1 = context.registers.pc;
    el1.spsr_el1 = old;
    el1.esr_el1 = exception.syndrome(from_el0);
    if let Some(far) = exception.fault_address() {
        el1.far_el1 = far;
    }
    context.registers.pstate = pstate_on_entry(old, el1.sctlr_el1, features);
    // VBAR_EL1 bits 10:0 are RES0: the offset supplies them.
    context.registers.pc = (el1.vbar_el1 & !0x7ff) | group | vector::SYNCHRONOUS;
    Ok(())
}
