//! What the hypervisor crate asks of bare metal on x86 besides what both
//! architectures share (`crate::guest_runtime`): VMRUN with the guest's
//! general-purpose registers.

use sluice_hal::PhysAddr;
use sluice_hypervisor::vcpu::svm::SvmHardware;
use sluice_hypervisor::vcpu::svm::vmcb::Vmcb;
use sluice_hypervisor::vcpu::{GuestRegisters, gpr};
use sluice_kernel::arch::svm::{self, GuestGprs};

/// VMRUN on this CPU. One per physical CPU: the host VMSAVE area is the
/// CPU's own.
pub struct BareMetalSvm {
    /// A page VMSAVE/VMLOAD keep the host's FS/GS/TR/... state in around
    /// each VMRUN.
    host_vmsave: u64,
}

impl BareMetalSvm {
    /// # Safety
    /// SVM must be enabled on the calling CPU ([`svm::enable`]) and
    /// `host_vmsave` a zeroed 4 KiB page this CPU owns for as long as the
    /// value lives.
    pub const unsafe fn new(host_vmsave: u64) -> Self {
        Self { host_vmsave }
    }
}

impl SvmHardware for BareMetalSvm {
    fn physical_address(&self, object: *const u8) -> PhysAddr {
        // Sluice's heap and frames are identity-mapped.
        PhysAddr::new(object as u64)
    }

    fn vmrun(&mut self, vmcb: &mut Vmcb, gprs: &mut GuestRegisters) {
        let g = &gprs.gprs;
        let mut saved = GuestGprs {
            rbx: g[gpr::RBX],
            rcx: g[gpr::RCX],
            rdx: g[gpr::RDX],
            rsi: g[gpr::RSI],
            rdi: g[gpr::RDI],
            rbp: g[gpr::RBP],
            r8: g[8],
            r9: g[9],
            r10: g[10],
            r11: g[11],
            r12: g[12],
            r13: g[13],
            r14: g[14],
            r15: g[15],
        };
        // SAFETY: `new`'s contract gives an enabled SVM and our own VMSAVE
        // page; the VMCB is 4 KiB aligned (its type says so), identity-mapped
        // heap memory, and passed VMRUN's consistency checks in the backend;
        // the guest runs under nested paging, so it cannot reach Sluice.
        unsafe {
            svm::run(
                core::ptr::from_mut(vmcb) as u64,
                &mut saved,
                self.host_vmsave,
            )
        };
        let g = &mut gprs.gprs;
        g[gpr::RBX] = saved.rbx;
        g[gpr::RCX] = saved.rcx;
        g[gpr::RDX] = saved.rdx;
        g[gpr::RSI] = saved.rsi;
        g[gpr::RDI] = saved.rdi;
        g[gpr::RBP] = saved.rbp;
        g[8] = saved.r8;
        g[9] = saved.r9;
        g[10] = saved.r10;
        g[11] = saved.r11;
        g[12] = saved.r12;
        g[13] = saved.r13;
        g[14] = saved.r14;
        g[15] = saved.r15;
    }
}
