//! The hypervisor at run time on x86_64 (SVM with nested paging): the VMs
//! of the command line are validated against the platform, built
//! ([`sluice_hypervisor::vm::instance`]), declared to one iommufd object
//! model shared by all of them, and run until they finish.
//!
//! The object model sits behind a spin lock: vCPUs on different physical
//! CPUs take it for one hypercall (or one fault collection) at a time, so
//! no VM can hold it while its guest runs.

pub mod guests;
pub mod hw;
pub mod narration;
pub mod scenario;

extern crate alloc;

use alloc::boxed::Box;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use sluice_hypervisor::iommufd::{GuestMemory, IommuBackend, Iommufd, VmId};
use sluice_hypervisor::vcpu::VcpuBackend;
use sluice_hypervisor::vcpu::hypercall::HypercallDispatcher;
use sluice_hypervisor::vcpu::svm::{SvmBackend, SvmFeatures};
use sluice_hypervisor::vm::config::ValidVm;
use sluice_hypervisor::vm::instance::{
    BuildInputs, ExitStats, RunEnd, RunHost, VmInstance, VmIommuState, build_x86, run_vcpu,
};
use sluice_iommu::pagetable::x86::AmdNpt;
use sluice_iommu::pagetable::{IoPageTable, PageSize, TableConfig};
use sluice_kernel::arch::svm;
use sluice_kernel::clock;
use sluice_kernel::hw::{FrameDmaMemory, PhysMmio};
use sluice_kernel::platform::Platform;
use sluice_pci::{Ecam, Topology};
use spin::Mutex;

use hw::{BareMetalSvm, KernelFrames};

/// Exits one vCPU may take before Sluice gives up on it: far more than any
/// test guest needs, and a bound on a guest that never finishes.
pub const MAX_EXITS: u64 = 10_000_000;

/// A VM as Sluice runs it on bare metal.
pub type BareMetalVm = VmInstance<'static, KernelFrames<'static>, &'static Ecam<PhysMmio>>;

/// How one VM's run went.
#[derive(Debug, Clone)]
pub struct VmReport {
    pub name: String,
    pub end: RunEnd,
    pub stats: ExitStats,
    pub console: Vec<String>,
    /// Wall time from the first VMRUN to the end.
    pub elapsed_ns: u64,
}

/// The object model shared between CPUs; each call takes the lock once.
pub struct SharedIommufd<'a, B: IommuBackend>(pub &'a Mutex<Iommufd<B>>);

impl<B: IommuBackend> HypercallDispatcher for SharedIommufd<'_, B> {
    fn dispatch(&mut self, vm: VmId, mem: &dyn GuestMemory, command: u64, argument: u64) -> i64 {
        self.0.lock().dispatch(vm, mem, command, argument)
    }
}

impl<B: IommuBackend> VmIommuState for SharedIommufd<'_, B> {
    fn device_bound(&self, vm: VmId, guest_bdf: u32) -> bool {
        self.0.lock().device_bound(vm, guest_bdf)
    }
    fn wbinvd_flushes(&self, vm: VmId) -> bool {
        self.0.lock().wbinvd_flushes(vm)
    }
    fn collect_faults(&mut self) {
        self.0.lock().collect_faults();
    }
}

/// SVM switched on for the calling CPU, with its own host save and VMSAVE
/// pages, and a vCPU backend over it.
pub fn svm_for_this_cpu(platform: &Platform) -> Result<SvmBackend<BareMetalSvm>, String> {
    let detected = svm::detect().map_err(|e| format!("SVM: {e}"))?;
    let a = sluice_kernel::arch::cpuid(0x8000_000a, 0);
    let width = sluice_kernel::arch::cpuid(0x8000_0008, 0);
    let features = SvmFeatures::from_cpuid(a.ebx, a.edx, width.eax);
    let pages = platform
        .frames
        .lock()
        .allocate(2, 4096)
        .map_err(|e| format!("SVM host pages: {e}"))?;
    // SAFETY: two fresh frames, identity-mapped, ours from now on.
    unsafe { core::ptr::write_bytes(pages as *mut u8, 0, 2 * 4096) };
    // SAFETY: `detect` found SVM; the first page is this CPU's host save
    // area for as long as Sluice runs (it is never freed).
    unsafe { svm::enable(pages) };
    log::info!(
        "SVM on this CPU: {} ASIDs, nested paging {}, next-RIP save {} (instruction lengths decoded by Sluice when absent)",
        detected.asids,
        detected.nested_paging,
        detected.next_rip_save
    );
    // SAFETY: SVM is enabled on this CPU; the second page is its VMSAVE
    // area, never freed.
    let hardware = unsafe { BareMetalSvm::new(pages + 4096) };
    SvmBackend::new(hardware, features).map_err(|e| format!("SVM backend: {e}"))
}

/// Builds `valid` as VM `id`: RAM from the frame allocator, its nested page
/// table (AMD NPT, 4 levels, 2 MiB pages at most) and the boot protocol.
pub fn build_vm(
    platform: &'static Platform,
    ecam: &'static Ecam<PhysMmio>,
    topologies: &'static [Topology],
    valid: &ValidVm,
    id: VmId,
    image: &[u8],
) -> Result<BareMetalVm, String> {
    let tables: &'static FrameDmaMemory<'static> =
        Box::leak(Box::new(FrameDmaMemory::new(&platform.frames)));
    let physical_bits = sluice_kernel::arch::cpuid(0x8000_0008, 0).eax & 0xff;
    let format = AmdNpt::new(4, physical_bits).map_err(|e| format!("NPT format: {e:?}"))?;
    // 2 MiB leaves: guest RAM comes in 2 MiB chunks; 1 GiB pages would
    // need 1 GiB-aligned host memory the allocator rarely has.
    let npt = IoPageTable::new(tables, format, TableConfig::new(PageSize::Size2M, true))
        .map_err(|e| format!("NPT root: {e:?}"))?;
    let one_gib_pages = sluice_kernel::arch::cpuid(0x8000_0001, 0).edx & (1 << 26) != 0;
    build_x86(
        BuildInputs {
            id,
            vm: valid,
            image,
            host_config: ecam,
            topologies,
            one_gib_pages,
        },
        KernelFrames::new(&platform.frames),
        Box::new(npt),
    )
    .map_err(|e| format!("VM {}: {e}", valid.config.name))
}

/// Runs the first vCPU of `vm` on this CPU until it finishes or stops.
pub fn run_vm<B: IommuBackend>(
    vm: &mut BareMetalVm,
    backend: &mut SvmBackend<BareMetalSvm>,
    iommufd: &Mutex<Iommufd<B>>,
    host: &mut dyn RunHost,
) -> Result<VmReport, String> {
    let mut vcpu = backend
        .create_vcpu(&vm.entry)
        .map_err(|e| format!("VM {}: vCPU: {e}", vm.name))?;
    backend
        .set_nested_root(&mut vcpu, vm.nested.root_address())
        .map_err(|e| format!("VM {}: nested root: {e}", vm.name))?;
    let start = clock::now_ns().unwrap_or(0);
    let end = run_vcpu(
        vm,
        backend,
        &mut vcpu,
        &mut SharedIommufd(iommufd),
        host,
        MAX_EXITS,
    );
    let elapsed_ns = clock::now_ns().unwrap_or(0).saturating_sub(start);
    backend.destroy_vcpu(vcpu);
    Ok(VmReport {
        name: vm.name.to_string(),
        end,
        stats: vm.stats.clone(),
        console: vm.console_lines.clone(),
        elapsed_ns,
    })
}

/// The `vm=` words of the command line, parsed and validated against the
/// platform's functions, IOMMU coverage and groups. Every problem is
/// logged; any problem refuses the whole configuration (a half-started set
/// of VMs could split a group).
pub fn configured_vms(
    platform: &Platform,
    topologies: &[Topology],
    associations: &[sluice_iommu::association::Association],
) -> Result<Vec<ValidVm>, String> {
    use sluice_hypervisor::vm::config::{
        PlatformLimits, parse_command_line, platform_devices, validate,
    };
    let text = platform.command_line.vms.join(" ");
    let configs = parse_command_line(&text).map_err(|errors| {
        for e in &errors {
            log::error!("VM configuration: {e}");
        }
        format!("{} problem(s) in the vm= words", errors.len())
    })?;
    let devices: Vec<_> = topologies
        .iter()
        .zip(associations)
        .flat_map(|(t, a)| platform_devices(t, a))
        .collect();
    // Half of the free memory for guests: IOMMU and nested page tables,
    // and Sluice's own structures, need the rest.
    let limits = PlatformLimits {
        memory: platform.frames.lock().free_frames() * 4096 / 2,
        max_cpus: 1,
    };
    validate(&configs, &devices, limits).map_err(|errors| {
        for e in &errors {
            log::error!("VM configuration: {e}");
        }
        format!("{} problem(s) in the VM configuration", errors.len())
    })
}
