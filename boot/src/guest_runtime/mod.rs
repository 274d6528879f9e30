//! Running the VMs of the command line on bare metal, for both
//! architectures. What differs per architecture (the vCPU backend, how a
//! VM is built, which IOMMU backend sits under the object model) comes
//! from an [`ArchRuntime`] and the caller of [`Machine::new`]; the rest is
//! here once:
//!
//! * the `vm=` words validated against PCI and the owned IOMMUs
//!   ([`configured_vms`]);
//! * one iommufd object model behind a spin lock shared by the CPUs
//!   ([`SharedIommufd`]): a vCPU takes it for one hypercall or one fault
//!   collection at a time, never while its guest runs;
//! * VM 0 on the boot CPU and VM n on CPU n ([`run_all`]), further VMs
//!   entering their guest once the first is ready;
//! * guest RAM from the frame allocator ([`KernelFrames`]), function-level
//!   reset over ECAM ([`EcamReset`]), the run loop's host hooks
//!   ([`HostCpu`]) and the judgement of the test guests ([`verdict`]).

pub mod narration;
pub mod verdict;

extern crate alloc;

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, Ordering};

use log::{info, warn};
use sluice_hal::PhysAddr;
use sluice_hypervisor::iommufd::{
    FunctionReset, GuestMemory, IommuBackend, Iommufd, MsiWindow, ResetError, VmConfig, VmId,
};
use sluice_hypervisor::vcpu::VcpuBackend;
use sluice_hypervisor::vcpu::hypercall::HypercallDispatcher;
use sluice_hypervisor::vm::config::ValidVm;
use sluice_hypervisor::vm::exits::CpuidSource;
use sluice_hypervisor::vm::instance::{
    DeviceFacts, ExitStats, RunEnd, RunHost, VmInstance, VmIommuState, device_id,
    register_with_iommufd, run_vcpu,
};
use sluice_hypervisor::vm::memory::{FrameError, FrameSource};
use sluice_kernel::boot_info::find_guest_image;
use sluice_kernel::clock;
use sluice_kernel::hw::PhysMmio;
use sluice_kernel::memory::frame::FrameAllocator;
use sluice_kernel::platform::Platform;
use sluice_pci::config::ConfigSpace;
use sluice_pci::{Bdf, Ecam, PciAddress, Topology};
use spin::Mutex;

use crate::pci::{IommuMap, Pci};

/// Exits one vCPU may take before Sluice gives up on it: far more than any
/// test guest needs, and a bound on a guest that never finishes.
pub const MAX_EXITS: u64 = 10_000_000;

/// Time a VM waits for the first to be ready, and the boot CPU for a VM on
/// another CPU to finish.
const OTHER_CPU_TIMEOUT_NS: u64 = 600_000_000_000;

/// A VM as Sluice runs it on bare metal.
pub type BareMetalVm = VmInstance<'static, KernelFrames<'static>, &'static Ecam<PhysMmio>>;

/// What an architecture contributes.
pub trait ArchRuntime: 'static {
    type Backend: VcpuBackend;
    /// The vCPU backend of the calling CPU (hardware virtualization switched
    /// on for it).
    fn backend_for_this_cpu(platform: &'static Platform) -> Result<Self::Backend, String>;
    /// Builds `valid` as VM `id` with `image`: RAM, nested table and the
    /// architecture's boot protocol.
    fn build_vm(
        platform: &'static Platform,
        pci: &'static Pci,
        valid: &ValidVm,
        id: VmId,
        image: &[u8],
    ) -> Result<BareMetalVm, String>;
}

/// How one VM's run went.
#[derive(Debug, Clone)]
pub struct VmReport {
    pub name: String,
    pub end: RunEnd,
    pub stats: ExitStats,
    pub console: Vec<String>,
    /// Wall time from the first guest entry to the end.
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

/// PCI function-level reset through configuration space (PCIe base spec
/// 6.6.2 and 7.5.3.4: Device Control bit 15 "Initiate Function Level
/// Reset"; the function must be ready again 100 ms later).
pub struct EcamReset {
    pub ecam: &'static Ecam<PhysMmio>,
    pub topologies: &'static [Topology],
}

impl FunctionReset for EcamReset {
    fn function_level_reset(&mut self, rid: Bdf) -> Result<(), ResetError> {
        // An IOMMU unit belongs to one segment; the requester ID names the
        // function on it. A BDF present on several segments is ambiguous.
        let mut matches = self
            .topologies
            .iter()
            .flat_map(|t| t.functions.iter())
            .filter(|f| f.addr.bdf == rid);
        let (Some(function), None) = (matches.next(), matches.next()) else {
            return Err(ResetError::Failed(
                "no single function with this requester ID",
            ));
        };
        let pcie = function
            .caps
            .pcie
            .filter(|p| p.flr)
            .ok_or(ResetError::NotCapable)?;
        let control = pcie.offset + 0x08;
        let value = self
            .ecam
            .read16(function.addr, control)
            .map_err(|_| ResetError::Failed("device control unreadable"))?;
        self.ecam
            .write16(function.addr, control, value | (1 << 15))
            .map_err(|_| ResetError::Failed("device control unwritable"))?;
        clock::delay_ns(100_000_000);
        let vendor = self
            .ecam
            .read16(function.addr, 0)
            .map_err(|_| ResetError::Timeout)?;
        if vendor == 0xffff {
            return Err(ResetError::Timeout);
        }
        info!("pci {}: function-level reset done", function.addr);
        Ok(())
    }
}

/// The host side of the run loop. With a `ready` flag it is the first VM's
/// host: the flag is raised when the guest prints `GUEST-READY`. With
/// `narrate`, each guest step is printed with what it means (the demo).
pub struct HostCpu {
    pub ready: Option<&'static AtomicBool>,
    pub narrate: bool,
}

impl CpuidSource for HostCpu {
    #[cfg(target_arch = "x86_64")]
    fn host_cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        let r = sluice_kernel::arch::cpuid(leaf, subleaf);
        [r.eax, r.ebx, r.ecx, r.edx]
    }
    /// aarch64 has no CPUID: no exit asks for it.
    #[cfg(not(target_arch = "x86_64"))]
    fn host_cpuid(&self, _leaf: u32, _subleaf: u32) -> [u32; 4] {
        [0; 4]
    }
}

impl RunHost for HostCpu {
    fn cpuid(&self) -> &dyn CpuidSource {
        self
    }
    #[cfg(target_arch = "x86_64")]
    fn flush_caches(&mut self) {
        // SAFETY: WBINVD writes back and invalidates this CPU's caches; it
        // has no other effect on Sluice's state.
        unsafe { core::arch::asm!("wbinvd", options(nostack, preserves_flags)) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    fn flush_caches(&mut self) {
        // Only x86 WBINVD/INVD exits ask for this.
        log::error!("a cache flush was requested for an aarch64 guest: no exit should ask for one");
    }
    fn console_line(&mut self, vm: &str, line: &str) {
        if self.narrate {
            narration::narrate(vm, line);
        }
        if line == "GUEST-READY"
            && let Some(flag) = self.ready
        {
            flag.store(true, Ordering::Release);
        }
    }
}

/// Hands a value to another CPU.
///
/// The object model and a VM's host state hold driver objects that reach
/// hardware through plain physical addresses (`PhysMmio`, frame memory,
/// the ECAM window); they are not marked `Send` only because they are
/// trait objects. Sluice's CPUs share one address space (the identity
/// map), so those addresses mean the same on every CPU.
struct AnyCpu<T>(T);

// SAFETY: see the type's documentation: the wrapped values only carry
// physical addresses valid on every CPU, and whatever is shared between
// CPUs is behind a spin lock (the object model) or owned by one CPU at a
// time (a VM's host state moves to the CPU that runs it and back).
unsafe impl<T> Send for AnyCpu<T> {}

impl<F: FnOnce(sluice_kernel::smp::CpuInfo) + 'static> AnyCpu<F> {
    /// The job as the CPU mailbox takes it.
    fn into_job(self) -> impl FnOnce(sluice_kernel::smp::CpuInfo) + Send + 'static {
        // A method call moves `self` whole into the closure (destructuring
        // it there would capture the non-`Send` field alone).
        move |cpu| self.call(cpu)
    }

    fn call(self, cpu: sluice_kernel::smp::CpuInfo) {
        (self.0)(cpu)
    }
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

/// Everything needed to run the configured VMs.
pub struct Machine<B: IommuBackend + 'static> {
    pub platform: &'static Platform,
    pub pci: &'static Pci,
    pub iommufd: &'static Mutex<Iommufd<B>>,
    pub vms: Vec<ValidVm>,
    /// What every VM is declared to the object model with.
    pub vm_config: VmConfig,
    /// Each function's MSI doorbell page (Arm: its ITS's GITS_TRANSLATER
    /// page), for functions whose MSIs Sluice routes through a doorbell it
    /// owns.
    pub msi_doorbells: BTreeMap<PciAddress, PhysAddr>,
}

/// Where devices' MSIs go, as the object model needs it.
#[derive(Debug, Clone, Default)]
pub struct MsiRouting {
    pub window: Option<MsiWindow>,
    /// See [`Machine::msi_doorbells`].
    pub doorbells: BTreeMap<PciAddress, PhysAddr>,
}

impl<B: IommuBackend + 'static> Machine<B> {
    /// The machine over `backend`, which holds the owned IOMMUs with the
    /// `registered` functions. Only those are assignable; the `vm=` words
    /// are validated against them. Devices not assigned to a VM stay
    /// blocked, declared as the host's so no VM can bind a device of their
    /// group.
    pub fn new(
        platform: &'static Platform,
        pci: &'static Pci,
        map: &IommuMap,
        backend: B,
        registered: &BTreeSet<PciAddress>,
        msi: MsiRouting,
        vm_config: VmConfig,
    ) -> Result<Self, String> {
        let mut associations = map.per_segment.clone();
        for a in &mut associations {
            for d in &mut a.devices {
                d.assignable &= registered.contains(&d.addr);
            }
        }
        let vms = configured_vms(platform, &pci.segments, &associations)?;
        let mut iommufd = Iommufd::new(backend, msi.window);
        let assigned: BTreeSet<PciAddress> = vms
            .iter()
            .flat_map(|vm| vm.devices.iter().map(|d| d.host))
            .collect();
        for a in &associations {
            for d in &a.devices {
                if !assigned.contains(&d.addr) {
                    iommufd.declare_host_device(device_id(d.addr), d.group);
                }
            }
        }
        Ok(Self {
            platform,
            pci,
            iommufd: Box::leak(Box::new(Mutex::new(iommufd))),
            vms,
            vm_config,
            msi_doorbells: msi.doorbells,
        })
    }
}

/// Builds VM `index` of `machine` and declares it to the object model.
fn build_and_register<A: ArchRuntime, B: IommuBackend + 'static>(
    machine: &Machine<B>,
    index: usize,
) -> Result<BareMetalVm, String> {
    let valid = &machine.vms[index];
    let image =
        find_guest_image(&machine.platform.guest_images, &valid.config.image).ok_or_else(|| {
            format!(
                "VM {}: image `{}` was not loaded from the ESP",
                valid.config.name, valid.config.image
            )
        })?;
    let id = VmId(index as u32 + 1);
    let vm = A::build_vm(machine.platform, machine.pci, valid, id, image.bytes)?;
    let registered = register_with_iommufd(
        &mut machine.iommufd.lock(),
        &vm,
        machine.vm_config,
        &machine.pci.segments,
        &|addr| DeviceFacts {
            msi_doorbell: machine.msi_doorbells.get(&addr).copied(),
            ..DeviceFacts::default()
        },
    );
    if let Err(e) = registered {
        vm.destroy();
        return Err(format!("VM {}: {e}", valid.config.name));
    }
    Ok(vm)
}

/// Runs the first vCPU of `vm` on this CPU until it finishes or stops.
pub fn run_vm<V: VcpuBackend, B: IommuBackend>(
    vm: &mut BareMetalVm,
    backend: &mut V,
    iommufd: &Mutex<Iommufd<B>>,
    host: &mut dyn RunHost,
) -> Result<VmReport, String> {
    let mut vcpu = vm
        .create_vcpu(backend)
        .map_err(|e| format!("VM {}: vCPU: {e}", vm.name))?;
    if let Err(e) = backend.set_nested_root(&mut vcpu, vm.nested.root_address()) {
        backend.destroy_vcpu(vcpu);
        return Err(format!("VM {}: nested root: {e}", vm.name));
    }
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

/// A VM that ran, with its host state still alive (its RAM can be
/// inspected) until [`finish`].
pub struct RanVm {
    pub report: VmReport,
    pub vm: BareMetalVm,
}

/// Runs every configured VM at once: VM 0 on this (the boot) CPU, VM n on
/// CPU n. VMs after the first enter their guest once the first VM is ready
/// (its guest printed `GUEST-READY`, e.g. once a buffer other VMs aim at is
/// in place) or has ended, so cross-VM checks never race its setup.
/// Returns when all have finished or stopped. A VM that could not be built
/// or started is an error naming it; VMs already running are still waited
/// for.
pub fn run_all<A: ArchRuntime, B: IommuBackend + 'static>(
    machine: &Machine<B>,
    narrate: bool,
) -> Result<Vec<RanVm>, String> {
    if machine.vms.is_empty() {
        return Err(String::from(
            "no vm= words on the command line: no VM to run",
        ));
    }
    let cpus = if machine.vms.len() > 1 {
        sluice_kernel::smp::init(machine.platform).map_err(|e| format!("smp: {e}"))?
    } else {
        Vec::new()
    };
    if machine.vms.len() > 1 && cpus.len() < machine.vms.len() {
        return Err(format!(
            "{} VMs need {} CPUs (one each); the MADT lists {}",
            machine.vms.len(),
            machine.vms.len(),
            cpus.len()
        ));
    }
    let iommufd = machine.iommufd;
    let platform = machine.platform;
    let ready: &'static AtomicBool = Box::leak(Box::new(AtomicBool::new(false)));
    let mut others = Vec::new();
    let mut errors = Vec::new();
    for index in 1..machine.vms.len() {
        let mut vm = match build_and_register::<A, B>(machine, index) {
            Ok(vm) => vm,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        let slot: &'static Mutex<Option<Result<RanVm, String>>> =
            Box::leak(Box::new(Mutex::new(None)));
        let job = move |_cpu| {
            let result = A::backend_for_this_cpu(platform)
                .and_then(|mut backend| {
                    wait_until_ready(ready)?;
                    run_vm(
                        &mut vm,
                        &mut backend,
                        iommufd,
                        &mut HostCpu {
                            ready: None,
                            narrate,
                        },
                    )
                })
                .map(|report| RanVm { report, vm });
            *slot.lock() = Some(result);
        };
        match sluice_kernel::smp::run_on(index, AnyCpu(job).into_job()) {
            Ok(done) => others.push((index, done, slot)),
            Err(e) => errors.push(format!(
                "VM {}: CPU {index}: {e}",
                machine.vms[index].config.name
            )),
        }
    }
    let first = build_and_register::<A, B>(machine, 0).and_then(|mut vm| {
        let mut backend = A::backend_for_this_cpu(platform)?;
        let report = run_vm(
            &mut vm,
            &mut backend,
            iommufd,
            &mut HostCpu {
                ready: Some(ready),
                narrate,
            },
        );
        Ok(RanVm {
            report: report?,
            vm,
        })
    });
    // Ended, ready or not: the others go.
    ready.store(true, Ordering::Release);
    let mut ran = Vec::new();
    match first {
        Ok(r) => ran.push(r),
        Err(e) => errors.push(e),
    }
    for (index, done, slot) in others {
        if let Err(e) = done.wait(OTHER_CPU_TIMEOUT_NS) {
            errors.push(format!(
                "VM {}: CPU {index} did not finish: {e}",
                machine.vms[index].config.name
            ));
            continue;
        }
        match slot.lock().take() {
            Some(Ok(r)) => ran.push(r),
            Some(Err(e)) => errors.push(e),
            None => errors.push(format!(
                "VM {}: CPU {index} reported nothing",
                machine.vms[index].config.name
            )),
        }
    }
    if errors.is_empty() {
        Ok(ran)
    } else {
        for r in ran {
            finish(machine, r);
        }
        Err(errors.join("; "))
    }
}

/// Waits for the first VM to be ready (see [`run_all`]).
fn wait_until_ready(ready: &AtomicBool) -> Result<(), String> {
    let start = clock::now_ns().unwrap_or(0);
    while !ready.load(Ordering::Acquire) {
        let now = clock::now_ns().unwrap_or(u64::MAX);
        if now.saturating_sub(start) > OTHER_CPU_TIMEOUT_NS {
            return Err(String::from("the first VM never became ready"));
        }
        core::hint::spin_loop();
    }
    Ok(())
}

/// Tears a VM down: out of the object model (its domains and mappings
/// go), then its nested table and RAM.
pub fn finish<B: IommuBackend + 'static>(machine: &Machine<B>, ran: RanVm) {
    if let Err(e) = machine.iommufd.lock().destroy_vm(ran.vm.id) {
        // Its RAM may still be mapped for DMA: leak it rather than reuse.
        warn!(
            "VM {}: cannot be removed from iommufd ({e:?}); its memory is kept",
            ran.report.name
        );
        core::mem::forget(ran.vm);
        return;
    }
    ran.vm.destroy();
}
