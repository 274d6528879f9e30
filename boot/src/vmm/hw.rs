//! What the hypervisor crate asks of bare metal on x86: VMRUN with the
//! guest's general-purpose registers, host frames for guest RAM, host
//! CPUID, and cache flushes.

use core::sync::atomic::{AtomicBool, Ordering};
use sluice_hal::PhysAddr;
use sluice_hypervisor::vcpu::svm::SvmHardware;
use sluice_hypervisor::vcpu::svm::vmcb::Vmcb;
use sluice_hypervisor::vcpu::{GuestRegisters, gpr};
use sluice_hypervisor::vm::exits::CpuidSource;
use sluice_hypervisor::vm::instance::RunHost;
use sluice_hypervisor::vm::memory::{FrameError, FrameSource};
use sluice_kernel::arch::svm::{self, GuestGprs};
use sluice_kernel::memory::frame::FrameAllocator;
use spin::Mutex;

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

/// Guest RAM from the kernel's frame allocator. Frames are identity-mapped
/// in Sluice's own page tables, so they are read and written directly.
pub struct KernelFrames<'a> {
    frames: &'a Mutex<FrameAllocator>,
}

impl<'a> KernelFrames<'a> {
    pub const fn new(frames: &'a Mutex<FrameAllocator>) -> Self {
        Self { frames }
    }
}

impl FrameSource for KernelFrames<'_> {
    fn allocate(&self, frames: u64, align: u64) -> Result<PhysAddr, FrameError> {
        self.frames
            .lock()
            .allocate(frames, align)
            .map(PhysAddr::new)
            .map_err(|_| FrameError)
    }
    fn free(&self, base: PhysAddr, frames: u64) {
        if let Err(e) = self.frames.lock().free(base.as_u64(), frames) {
            log::error!(
                "guest RAM at {:#x}: {e}; the frames stay allocated",
                base.as_u64()
            );
        }
    }
    fn read(&self, phys: PhysAddr, out: &mut [u8]) {
        // SAFETY: the caller stays inside one allocation from `allocate`
        // (the trait's contract), which is identity-mapped RAM we own.
        unsafe {
            core::ptr::copy_nonoverlapping(phys.as_u64() as *const u8, out.as_mut_ptr(), out.len())
        }
    }
    fn write(&self, phys: PhysAddr, data: &[u8]) {
        // SAFETY: as `read`.
        unsafe {
            core::ptr::copy_nonoverlapping(data.as_ptr(), phys.as_u64() as *mut u8, data.len())
        }
    }
    fn zero(&self, phys: PhysAddr, len: u64) {
        // SAFETY: as `read`.
        unsafe { core::ptr::write_bytes(phys.as_u64() as *mut u8, 0, len as usize) }
    }
}

/// The host CPU, for the run loop. With a `ready` flag it is the first
/// VM's host: the flag is raised when the guest prints `GUEST-READY`.
pub struct HostCpu {
    pub ready: Option<&'static AtomicBool>,
    /// Print each guest step with what it means (the demo).
    pub narrate: bool,
}

impl CpuidSource for HostCpu {
    fn host_cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        let r = sluice_kernel::arch::cpuid(leaf, subleaf);
        [r.eax, r.ebx, r.ecx, r.edx]
    }
}

impl RunHost for HostCpu {
    fn cpuid(&self) -> &dyn CpuidSource {
        self
    }
    fn flush_caches(&mut self) {
        // SAFETY: WBINVD writes back and invalidates this CPU's caches; it
        // has no other effect on Sluice's state.
        unsafe { core::arch::asm!("wbinvd", options(nostack, preserves_flags)) };
    }
    fn console_line(&mut self, vm: &str, line: &str) {
        if self.narrate {
            narrate(vm, line);
        }
        if line == "GUEST-READY"
            && let Some(flag) = self.ready
        {
            flag.store(true, Ordering::Release);
        }
    }
}

/// One demo line for a guest step: `GUEST-TEST <step> PASS|FAIL ...`.
fn narrate(vm: &str, line: &str) {
    let mut words = line.split_whitespace();
    if words.next() != Some("GUEST-TEST") {
        return;
    }
    let Some(step) = words.next() else { return };
    let verdict = words.next().unwrap_or("?");
    if let Some(what) = super::narration::describe(step) {
        sluice_kernel::println!("  [{vm}] {what}: {verdict}");
    }
}
