//! The hypervisor at run time on aarch64 (EL2 with a stage-2 table per
//! VM): the VMs of the command line are validated against the platform,
//! built ([`sluice_hypervisor::vm::instance::build_aarch64`]), declared to
//! one iommufd object model over the owned SMMUs, and run until they
//! finish. The counterpart of the x86 runtime (`crate::vmm`).

pub mod guests;
pub mod hw;
pub mod scenario;

extern crate alloc;

use alloc::boxed::Box;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use sluice_hypervisor::iommufd::{GuestMemory, IommuBackend, Iommufd, VmId};
use sluice_hypervisor::vcpu::VcpuBackend;
use sluice_hypervisor::vcpu::el2::{El2Backend, El2Features};
use sluice_hypervisor::vcpu::hypercall::HypercallDispatcher;
use sluice_hypervisor::vm::config::ValidVm;
use sluice_hypervisor::vm::instance::{
    BuildInputs, ExitStats, RunEnd, RunHost, VmInstance, VmIommuState, build_aarch64, run_vcpu,
};
use sluice_iommu::pagetable::{IoPageTable, PageSize, TableConfig};
use sluice_kernel::arch::guest;
use sluice_kernel::clock;
use sluice_kernel::hw::{FrameDmaMemory, PhysMmio};
use sluice_kernel::platform::Platform;
use sluice_pci::{Ecam, Topology};
use spin::Mutex;

use hw::{BareMetalEl2, KernelFrames};

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
    /// Wall time from the first entry to the end.
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

/// The processor's stage-2 features.
fn features() -> El2Features {
    let (mmfr0, mmfr1) = guest::memory_model_features();
    El2Features::from_id_registers(mmfr0, mmfr1)
}

/// The EL2 vCPU backend on the calling CPU.
pub fn el2_for_this_cpu() -> Result<El2Backend<BareMetalEl2>, String> {
    let hardware = BareMetalEl2::for_this_cpu().map_err(|e| format!("EL2: {e}"))?;
    let features = features();
    log::info!(
        "EL2 on this CPU: {}-bit physical addresses, {}-bit VMIDs, guests get a {}-bit stage-2 space",
        features.physical_bits,
        features.vmid_bits,
        sluice_hypervisor::vcpu::el2::IPA_BITS
    );
    El2Backend::new(hardware, features).map_err(|e| format!("EL2 backend: {e}"))
}

/// Builds `valid` as VM `id`: RAM from the frame allocator, its stage-2
/// table (2 MiB blocks at most) and the aarch64 boot protocol; then the
/// guest's RAM is cleaned to the point of coherency and the instruction
/// caches invalidated, so its first fetches see the image Sluice wrote.
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
    let format = features()
        .stage2_format()
        .map_err(|e| format!("stage-2 format: {e:?}"))?;
    // 2 MiB leaves: guest RAM comes in 2 MiB chunks; 1 GiB blocks would
    // need 1 GiB-aligned host memory the allocator rarely has. The CPU's
    // stage-2 walks are cache-coherent (VTCR_EL2 IRGN0/ORGN0 write-back).
    let s2 = IoPageTable::new(tables, format, TableConfig::new(PageSize::Size2M, true))
        .map_err(|e| format!("stage-2 root: {e:?}"))?;
    let vm = build_aarch64(
        BuildInputs {
            id,
            vm: valid,
            image,
            host_config: ecam,
            topologies,
            one_gib_pages: false,
        },
        KernelFrames::new(&platform.frames),
        Box::new(s2),
    )
    .map_err(|e| format!("VM {}: {e}", valid.config.name))?;
    for chunk in vm.ram.chunks() {
        sluice_kernel::arch::clean_dcache_range(chunk.host.as_u64(), chunk.length);
    }
    guest::invalidate_instruction_caches();
    Ok(vm)
}

/// Runs the first vCPU of `vm` on this CPU until it finishes or stops.
pub fn run_vm<B: IommuBackend>(
    vm: &mut BareMetalVm,
    backend: &mut El2Backend<BareMetalEl2>,
    iommufd: &Mutex<Iommufd<B>>,
    host: &mut dyn RunHost,
) -> Result<VmReport, String> {
    let mut vcpu = vm
        .create_vcpu(backend)
        .map_err(|e| format!("VM {}: vCPU: {e}", vm.name))?;
    backend
        .set_nested_root(&mut vcpu, vm.nested.root_address())
        .map_err(|e| format!("VM {}: stage-2 root: {e}", vm.name))?;
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
/// platform's functions, SMMU coverage and groups. Every problem is
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
    // Half of the free memory for guests: SMMU and stage-2 tables, and
    // Sluice's own structures, need the rest.
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
