//! Arm EL2: guests at EL1 under Sluice at EL2 (Armv8-A virtualization
//! extensions with a stage-2 translation per VM).
//!
//! The backend keeps each vCPU's whole EL1 context ([`GuestContext`]: X0–X30,
//! PC, PSTATE, the EL1 system registers, FP/SIMD), decides how EL2 runs it
//! ([`GuestControl`]: `HCR_EL2`, `VTCR_EL2`, `VTTBR_EL2` with a VMID of its
//! own, `VMPIDR_EL2`) and decodes every exit from `ESR_EL2` ([`exit`]).
//! The world switch itself (load the context, `ERET`, take the exception
//! back at EL2, save the context) is the [`El2Hardware`] trait: the
//! bare-metal kernel implements it, host tests script it, as with SVM.
//!
//! VMIDs belong to one backend (one per physical CPU on bare metal), like
//! SVM ASIDs: two CPUs may give the same VMID to different VMs. That is
//! safe because the world switch never sets `VTTBR_EL2.CnP`, so TLB
//! entries stay private to the CPU that made them, and a VMID's first
//! entry on a CPU flushes whatever a previous owner left there.
//!
//! Program-counter convention: after [`El2Backend::run`] the PC is always
//! the address of the exiting instruction (for `HVC`, whose `ELR_EL2` is
//! the next instruction, the backend steps it back), so that
//! [`VcpuBackend::advance_rip`] with the exit's length resumes after it,
//! exactly as on x86.
//!
//! The x86-shaped parts of [`VcpuBackend`] map as follows: the
//! [`GuestRegisters`] view is X0–X15 in `gprs`, the PC in `rip` and PSTATE
//! in `rflags` (the full register file is
//! [`VcpuBackend::aarch64_registers`]); [`VcpuBackend::translation_state`]
//! is all zero (no x86 decoding happens: data aborts come decoded); vCPUs
//! are created with [`VcpuBackend::create_aarch64_vcpu`]. Exceptions are
//! injected with [`VcpuBackend::inject_aarch64_exception`] and taken at
//! the next entry ([`inject`]); x86 events are refused.

pub mod exit;
pub mod inject;
pub mod sysregs;

use sluice_hal::PhysAddr;
use sluice_iommu::pagetable::PageTableError;
use sluice_iommu::pagetable::arm::ArmStage2;

pub use exit::{ExceptionKind, ExitSyndrome};
pub use inject::PstateFeatures;

use super::svm::asid::{AsidAllocator, AsidError};
use super::{
    Aarch64EntryState, Aarch64Exception, Aarch64Registers, EntryState, Event, Exit, GuestRegisters,
    TranslationState, VcpuBackend, VcpuError, pstate,
};
use sysregs::{hcr, pa_range_bits, pa_range_encoding, vmpidr_value, vtcr_value, vttbr_value};

/// The guest-physical address size of every VM: 39 bits (512 GiB), a
/// stage-2 table of three levels starting at Arm level 1 (`VTCR_EL2.T0SZ`
/// = 25, `SL0` = 1), valid for every physical address size.
pub const IPA_BITS: u32 = 39;

/// The EL1 system registers a guest owns. The world switch loads them
/// before entering the guest and saves them when it leaves, so no guest
/// sees another's (or stale) values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct El1SystemRegisters {
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
    pub sp_el0: u64,
    pub sp_el1: u64,
    pub elr_el1: u64,
    pub spsr_el1: u64,
    pub esr_el1: u64,
    pub far_el1: u64,
    pub afsr0_el1: u64,
    pub afsr1_el1: u64,
    pub par_el1: u64,
    pub cntkctl_el1: u64,
    pub csselr_el1: u64,
    pub mdscr_el1: u64,
    /// The EL1 virtual timer (the guest's own; disabled while Sluice
    /// runs so it cannot interrupt Sluice).
    pub cntv_ctl_el0: u64,
    pub cntv_cval_el0: u64,
}

/// FP/SIMD registers (V0–V31, FPCR, FPSR): Sluice's own code uses them
/// too, so they are switched with the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FpRegisters {
    pub v: [u128; 32],
    pub fpcr: u64,
    pub fpsr: u64,
}

/// Everything of a vCPU the world switch loads and saves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuestContext {
    /// X0–X30, PC (`ELR_EL2`) and PSTATE (`SPSR_EL2`).
    pub registers: Aarch64Registers,
    pub el1: El1SystemRegisters,
    pub fp: FpRegisters,
}

/// The EL2 configuration a vCPU runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestControl {
    pub hcr_el2: u64,
    pub vtcr_el2: u64,
    /// Stage-2 root and VMID.
    pub vttbr_el2: u64,
    pub vmpidr_el2: u64,
    /// Invalidate the VMID's stage-1 and stage-2 TLB entries
    /// (`TLBI VMALLS12E1IS`, with `VTTBR_EL2` already holding the VMID)
    /// before entering: the VMID was used before, or the table changed.
    pub flush_tlb: bool,
}

/// What only bare metal can do.
pub trait El2Hardware {
    /// Loads `control` into the EL2 registers (flushing the VMID's TLB
    /// entries when asked), then `context`, enters the guest with `ERET`,
    /// and returns at its next exception to EL2 with `context` saved back,
    /// the guest's virtual timer disabled and the host's `HCR_EL2`
    /// restored.
    fn enter(&mut self, context: &mut GuestContext, control: &GuestControl) -> ExitSyndrome;
}

/// What the processor offers (`ID_AA64MMFR0_EL1`, `ID_AA64MMFR1_EL1`,
/// and for exception entry `ID_AA64PFR1_EL1`, `ID_AA64MMFR2_EL1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct El2Features {
    /// Physical address size (`PARange`).
    pub physical_bits: u32,
    /// VMID width: 8 or 16 (`VMIDBits`).
    pub vmid_bits: u8,
    /// What exception entry to EL1 does to PSTATE ([`inject`]).
    pub pstate: PstateFeatures,
}

impl El2Features {
    /// Decodes `ID_AA64MMFR0_EL1.PARange` (bits 3:0) and
    /// `ID_AA64MMFR1_EL1.VMIDBits` (bits 7:4: 0b0010 is 16 bits). An
    /// unknown PARange reads as 32 bits, the minimum. PSTATE features:
    /// those of an Armv8.0 processor (none) until
    /// [`El2Features::with_pstate_features`].
    pub const fn from_id_registers(mmfr0: u64, mmfr1: u64) -> Self {
        let physical_bits = match pa_range_bits(mmfr0 & 0xf) {
            Some(bits) => bits,
            None => 32,
        };
        Self {
            physical_bits,
            vmid_bits: if (mmfr1 >> 4) & 0xf == 0b0010 { 16 } else { 8 },
            pstate: PstateFeatures::from_id_registers(0, 0, 0),
        }
    }

    /// The same with the processor's PSTATE features (decoded by
    /// [`PstateFeatures::from_id_registers`]).
    pub const fn with_pstate_features(self, pstate: PstateFeatures) -> Self {
        Self { pstate, ..self }
    }

    /// Output address size of the stage-2 tables: the physical address
    /// size, at most 48 bits (the table format's limit).
    pub const fn stage2_output_bits(&self) -> u32 {
        if self.physical_bits > 48 {
            48
        } else {
            self.physical_bits
        }
    }

    /// The stage-2 table format for guests of this processor.
    pub fn stage2_format(&self) -> Result<ArmStage2, PageTableError> {
        ArmStage2::new(IPA_BITS, self.stage2_output_bits())
    }
}

/// One vCPU.
pub struct El2Vcpu {
    context: GuestContext,
    vmid: u16,
    index: u8,
    /// The stage-2 root, once set.
    root: Option<u64>,
    flush_tlb: bool,
    /// Taken at the next entry.
    pending: Option<Aarch64Exception>,
}

impl El2Vcpu {
    pub fn context(&self) -> &GuestContext {
        &self.context
    }
    pub fn vmid(&self) -> u16 {
        self.vmid
    }
    /// The exception the guest takes at its next entry, if any.
    pub fn pending_exception(&self) -> Option<Aarch64Exception> {
        self.pending
    }
}

/// The Arm EL2 implementation of [`VcpuBackend`].
pub struct El2Backend<H: El2Hardware> {
    hardware: H,
    features: El2Features,
    vtcr_el2: u64,
    vmids: AsidAllocator,
    next_index: u8,
}

/// `SPSR_EL2.M[4:0]` values a guest may be entered with: EL0t, EL1t, EL1h
/// (AArch64). Anything else, EL2 above all, would hand Sluice's own
/// exception level to guest code.
const fn guest_mode(pstate: u64) -> bool {
    matches!(pstate & 0x1f, 0b00000 | 0b00100 | 0b00101)
}

impl<H: El2Hardware> El2Backend<H> {
    /// A backend for `features`. Refuses a processor whose physical
    /// address size the stage-2 format cannot describe.
    pub fn new(hardware: H, features: El2Features) -> Result<Self, VcpuError> {
        let format = features
            .stage2_format()
            .map_err(|_| VcpuError::Unsupported("physical address size below 32 bits"))?;
        let ps = pa_range_encoding(features.stage2_output_bits()).ok_or(VcpuError::Unsupported(
            "physical address size without a VTCR_EL2.PS encoding",
        ))?;
        Ok(Self {
            hardware,
            features,
            vtcr_el2: vtcr_value(format.t0sz(), format.sl0(), ps, features.vmid_bits == 16),
            vmids: AsidAllocator::new(1u32 << features.vmid_bits),
            next_index: 0,
        })
    }

    pub fn features(&self) -> &El2Features {
        &self.features
    }
    pub fn hardware(&self) -> &H {
        &self.hardware
    }
    pub fn hardware_mut(&mut self) -> &mut H {
        &mut self.hardware
    }
    /// `VTCR_EL2` for every guest.
    pub fn vtcr_el2(&self) -> u64 {
        self.vtcr_el2
    }
}

impl<H: El2Hardware> VcpuBackend for El2Backend<H> {
    type Vcpu = El2Vcpu;

    /// Releases the vCPU's VMID (its TLB entries are flushed when the VMID
    /// is handed out again).
    fn destroy_vcpu(&mut self, vcpu: El2Vcpu) {
        if let Err(e) = self.vmids.free(u32::from(vcpu.vmid)) {
            log::error!("EL2: freeing vCPU VMID {} failed: {e:?}", vcpu.vmid);
        }
    }

    fn create_vcpu(&mut self, _entry: &EntryState) -> Result<El2Vcpu, VcpuError> {
        Err(VcpuError::Unsupported(
            "an x86 entry state on the Arm EL2 backend (aarch64 vCPUs start from an Aarch64EntryState)",
        ))
    }

    fn create_aarch64_vcpu(&mut self, entry: &Aarch64EntryState) -> Result<El2Vcpu, VcpuError> {
        if !guest_mode(entry.registers.pstate) {
            return Err(VcpuError::InvalidGuestState(
                "PSTATE names an exception level other than EL1/EL0 (AArch64)",
            ));
        }
        let vmid = self.vmids.allocate().map_err(|e| match e {
            AsidError::Exhausted | AsidError::NotAllocated(_) => VcpuError::OutOfAsids,
        })?;
        let mut context = GuestContext {
            registers: entry.registers,
            ..GuestContext::default()
        };
        context.el1.sp_el1 = entry.sp_el1;
        context.el1.sctlr_el1 = entry.sctlr_el1;
        context.el1.cpacr_el1 = entry.cpacr_el1;
        let index = self.next_index;
        self.next_index = self.next_index.wrapping_add(1);
        Ok(El2Vcpu {
            context,
            // At most 16 bits wide (`vmid_bits`).
            vmid: vmid as u16,
            index,
            root: None,
            // The VMID may have been another VM's: its TLB entries go.
            flush_tlb: true,
            pending: None,
        })
    }

    fn run(&mut self, vcpu: &mut El2Vcpu) -> Result<Exit, VcpuError> {
        let Some(root) = vcpu.root else {
            return Err(VcpuError::InvalidGuestState(
                "stage-2 translation is not set up (set_nested_root first)",
            ));
        };
        if !guest_mode(vcpu.context.registers.pstate) {
            return Err(VcpuError::InvalidGuestState(
                "PSTATE names an exception level other than EL1/EL0 (AArch64)",
            ));
        }
        if let Some(exception) = vcpu.pending.take() {
            let from = vcpu.context.registers;
            inject::take_exception(&mut vcpu.context, exception, &self.features.pstate)?;
            log::debug!(
                "EL2: vCPU {} takes {exception:?} at EL1: PC {:#x} (PSTATE {:#x}) -> vector {:#x} (VBAR_EL1 {:#x}), ESR_EL1 {:#x}",
                vcpu.index,
                from.pc,
                from.pstate,
                vcpu.context.registers.pc,
                vcpu.context.el1.vbar_el1,
                vcpu.context.el1.esr_el1
            );
        }
        let control = GuestControl {
            hcr_el2: hcr::GUEST,
            vtcr_el2: self.vtcr_el2,
            vttbr_el2: vttbr_value(root, vcpu.vmid),
            vmpidr_el2: vmpidr_value(vcpu.index),
            flush_tlb: vcpu.flush_tlb,
        };
        let syndrome = self.hardware.enter(&mut vcpu.context, &control);
        vcpu.flush_tlb = false;
        let r = &mut vcpu.context.registers;
        let decoded = exit::decode_exit(&syndrome, r.x[0], r.x[1]);
        if decoded.elr_past_instruction
            && let super::InstructionLength::Known(n) = decoded.length
        {
            r.pc = r.pc.wrapping_sub(u64::from(n));
        }
        Ok(Exit {
            reason: decoded.reason,
            rip: r.pc,
            length: decoded.length,
        })
    }

    fn registers(&self, vcpu: &El2Vcpu) -> GuestRegisters {
        let r = &vcpu.context.registers;
        let mut gprs = [0u64; 16];
        gprs.copy_from_slice(&r.x[..16]);
        GuestRegisters {
            gprs,
            rip: r.pc,
            rflags: r.pstate,
        }
    }

    fn set_registers(&mut self, vcpu: &mut El2Vcpu, registers: &GuestRegisters) {
        let r = &mut vcpu.context.registers;
        r.x[..16].copy_from_slice(&registers.gprs);
        r.pc = registers.rip;
        r.pstate = registers.rflags;
    }

    fn translation_state(&self, _vcpu: &El2Vcpu) -> TranslationState {
        TranslationState::default()
    }

    fn advance_rip(&mut self, vcpu: &mut El2Vcpu, length: u8) -> Result<(), VcpuError> {
        // A64 instructions are 4 bytes; T32 ones (an AArch32 EL0) 2 or 4.
        if length != 2 && length != 4 {
            return Err(VcpuError::BadInstructionLength(u64::from(length)));
        }
        let r = &mut vcpu.context.registers;
        r.pc = r.pc.wrapping_add(u64::from(length));
        // A retired instruction leaves no branch-target type behind.
        r.pstate &= !pstate::BTYPE;
        Ok(())
    }

    fn inject_event(&mut self, _vcpu: &mut El2Vcpu, event: Event) -> Result<(), VcpuError> {
        log::error!(
            "EL2: cannot inject {event:?}: x86 events do not exist on aarch64 (Sluice injects Aarch64Exception)"
        );
        Err(VcpuError::Unsupported(
            "an x86 event on the Arm EL2 backend (aarch64 guests take an Aarch64Exception)",
        ))
    }

    /// Queued and taken at the next entry ([`inject::take_exception`]),
    /// from the PSTATE and PC the vCPU has then. Checked now against its
    /// current state so that a refusal comes here, not at the entry.
    fn inject_aarch64_exception(
        &mut self,
        vcpu: &mut El2Vcpu,
        exception: Aarch64Exception,
    ) -> Result<(), VcpuError> {
        if vcpu.pending.is_some() {
            return Err(VcpuError::EventPending);
        }
        let mut trial = vcpu.context;
        inject::take_exception(&mut trial, exception, &self.features.pstate)?;
        vcpu.pending = Some(exception);
        Ok(())
    }

    fn set_nested_root(&mut self, vcpu: &mut El2Vcpu, root: PhysAddr) -> Result<(), VcpuError> {
        let bits = self.features.stage2_output_bits();
        if root.as_u64() == 0 || !root.is_page_aligned() || root.as_u64() >> bits != 0 {
            return Err(VcpuError::BadNestedRoot(root));
        }
        vcpu.root = Some(root.as_u64());
        vcpu.flush_tlb = true;
        Ok(())
    }

    fn aarch64_registers(&self, vcpu: &El2Vcpu) -> Option<Aarch64Registers> {
        Some(vcpu.context.registers)
    }

    fn set_aarch64_registers(
        &mut self,
        vcpu: &mut El2Vcpu,
        registers: &Aarch64Registers,
    ) -> Result<(), VcpuError> {
        if !guest_mode(registers.pstate) {
            return Err(VcpuError::InvalidGuestState(
                "PSTATE names an exception level other than EL1/EL0 (AArch64)",
            ));
        }
        vcpu.context.registers = *registers;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
