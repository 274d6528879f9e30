//! What the hypervisor crate asks of bare metal on aarch64 besides what
//! both architectures share (`crate::guest_runtime`): the world switch into
//! a guest at EL1 ([`sluice_kernel::arch::guest`]).

use sluice_hypervisor::vcpu::Aarch64Registers;
use sluice_hypervisor::vcpu::el2::{
    El1SystemRegisters, El2Hardware, ExceptionKind, ExitSyndrome, FpRegisters, GuestContext,
    GuestControl,
};
use sluice_kernel::arch::guest::{self, GuestState};

/// The world switch on this CPU. Made only where
/// [`guest::check_this_cpu`] succeeded.
pub struct BareMetalEl2 {
    _checked: (),
}

impl BareMetalEl2 {
    /// The world switch, if this CPU runs Sluice the way it needs.
    pub fn for_this_cpu() -> Result<Self, guest::GuestEntryError> {
        guest::check_this_cpu()?;
        Ok(Self { _checked: () })
    }
}

fn to_kernel(c: &GuestContext) -> GuestState {
    let e = &c.el1;
    GuestState {
        x: c.registers.x,
        pc: c.registers.pc,
        pstate: c.registers.pstate,
        sp_el0: e.sp_el0,
        sp_el1: e.sp_el1,
        elr_el1: e.elr_el1,
        spsr_el1: e.spsr_el1,
        sctlr_el1: e.sctlr_el1,
        cpacr_el1: e.cpacr_el1,
        ttbr0_el1: e.ttbr0_el1,
        ttbr1_el1: e.ttbr1_el1,
        tcr_el1: e.tcr_el1,
        mair_el1: e.mair_el1,
        amair_el1: e.amair_el1,
        vbar_el1: e.vbar_el1,
        contextidr_el1: e.contextidr_el1,
        tpidr_el1: e.tpidr_el1,
        tpidr_el0: e.tpidr_el0,
        tpidrro_el0: e.tpidrro_el0,
        esr_el1: e.esr_el1,
        far_el1: e.far_el1,
        afsr0_el1: e.afsr0_el1,
        afsr1_el1: e.afsr1_el1,
        par_el1: e.par_el1,
        cntkctl_el1: e.cntkctl_el1,
        csselr_el1: e.csselr_el1,
        mdscr_el1: e.mdscr_el1,
        cntv_ctl_el0: e.cntv_ctl_el0,
        cntv_cval_el0: e.cntv_cval_el0,
        fpcr: c.fp.fpcr,
        fpsr: c.fp.fpsr,
        v: c.fp.v,
    }
}

fn from_kernel(s: &GuestState) -> GuestContext {
    GuestContext {
        registers: Aarch64Registers {
            x: s.x,
            pc: s.pc,
            pstate: s.pstate,
        },
        el1: El1SystemRegisters {
            sctlr_el1: s.sctlr_el1,
            cpacr_el1: s.cpacr_el1,
            ttbr0_el1: s.ttbr0_el1,
            ttbr1_el1: s.ttbr1_el1,
            tcr_el1: s.tcr_el1,
            mair_el1: s.mair_el1,
            amair_el1: s.amair_el1,
            vbar_el1: s.vbar_el1,
            contextidr_el1: s.contextidr_el1,
            tpidr_el1: s.tpidr_el1,
            tpidr_el0: s.tpidr_el0,
            tpidrro_el0: s.tpidrro_el0,
            sp_el0: s.sp_el0,
            sp_el1: s.sp_el1,
            elr_el1: s.elr_el1,
            spsr_el1: s.spsr_el1,
            esr_el1: s.esr_el1,
            far_el1: s.far_el1,
            afsr0_el1: s.afsr0_el1,
            afsr1_el1: s.afsr1_el1,
            par_el1: s.par_el1,
            cntkctl_el1: s.cntkctl_el1,
            csselr_el1: s.csselr_el1,
            mdscr_el1: s.mdscr_el1,
            cntv_ctl_el0: s.cntv_ctl_el0,
            cntv_cval_el0: s.cntv_cval_el0,
        },
        fp: FpRegisters {
            v: s.v,
            fpcr: s.fpcr,
            fpsr: s.fpsr,
        },
    }
}

impl El2Hardware for BareMetalEl2 {
    fn enter(&mut self, context: &mut GuestContext, control: &GuestControl) -> ExitSyndrome {
        let mut state = to_kernel(context);
        let kernel_control = guest::GuestControl {
            hcr_el2: control.hcr_el2,
            vtcr_el2: control.vtcr_el2,
            vttbr_el2: control.vttbr_el2,
            vmpidr_el2: control.vmpidr_el2,
            flush_tlb: u64::from(control.flush_tlb),
        };
        // SAFETY: `for_this_cpu` checked this CPU; the backend builds
        // `control` with stage 2 on (HCR_EL2.VM) over the VM's own table,
        // and refuses to enter with a PSTATE that is not EL1/EL0.
        let exit = unsafe { guest::run(&mut state, &kernel_control) };
        *context = from_kernel(&state);
        ExitSyndrome {
            kind: match exit.vector % 4 {
                0 => ExceptionKind::Synchronous,
                1 => ExceptionKind::Irq,
                2 => ExceptionKind::Fiq,
                _ => ExceptionKind::SError,
            },
            esr: exit.esr,
            far: exit.far,
            hpfar: exit.hpfar,
        }
    }
}
