//! Starting the VMs of the command line on aarch64: PCI and SMMU
//! ownership, the SMMUv3 backend under the iommufd object model, every VM
//! built and declared, the first VM run on the boot CPU and each further
//! VM on a CPU of its own (started with PSCI).

extern crate alloc;

use alloc::boxed::Box;
use alloc::collections::BTreeSet;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, Ordering};

use log::{info, warn};
use sluice_hypervisor::iommufd::smmu_backend::{SmmuBackend, SmmuDevice};
use sluice_hypervisor::iommufd::vtd_backend::{FunctionReset, ResetError};
use sluice_hypervisor::iommufd::{Iommufd, VmConfig, VmId};
use sluice_hypervisor::vm::config::ValidVm;
use sluice_hypervisor::vm::instance::{DeviceFacts, device_id, register_with_iommufd};
use sluice_kernel::boot_info::find_guest_image;
use sluice_kernel::hw::PhysMmio;
use sluice_kernel::platform::Platform;
use sluice_pci::config::ConfigSpace;
use sluice_pci::{Bdf, Ecam, PciAddress, Topology};
use spin::Mutex;

use super::hw::HostCpu;
use super::{BareMetalVm, VmReport, build_vm, el2_for_this_cpu, run_vm};
use crate::pci::Pci;
use crate::smmu_owner::OwnedSmmus;

/// The iommufd object model of this machine, over its SMMUs.
pub type MachineIommufd = Iommufd<SmmuBackend<'static>>;

/// Time the boot CPU waits for a VM on another CPU to finish.
const OTHER_CPU_TIMEOUT_NS: u64 = 600_000_000_000;

/// Hands a value to another CPU.
///
/// The object model and a VM's host state hold driver objects that reach
/// hardware through physical addresses (`PhysMmio`, frame memory, the ECAM
/// window); they are not `Send` only because they are trait objects.
/// Sluice's CPUs share one address space (the identity map).
struct AnyCpu<T>(T);

// SAFETY: see the type's documentation: the wrapped values only carry
// physical addresses valid on every CPU; what CPUs share is behind a spin
// lock (the object model) or owned by one CPU at a time (a VM's host state
// moves to the CPU that runs it and back).
unsafe impl<T> Send for AnyCpu<T> {}

impl<F: FnOnce(sluice_kernel::smp::CpuInfo)> AnyCpu<F> {
    /// The job as the CPU mailbox takes it.
    fn into_job(self) -> impl FnOnce(sluice_kernel::smp::CpuInfo) + Send + 'static
    where
        F: 'static,
    {
        // A method call moves `self` whole into the closure.
        move |cpu| self.call(cpu)
    }

    fn call(self, cpu: sluice_kernel::smp::CpuInfo) {
        (self.0)(cpu)
    }
}

/// PCI function-level reset through configuration space (PCIe base spec
/// 6.6.2 and 7.5.3.4: Device Control bit 15 "Initiate Function Level
/// Reset"; the function must be ready again 100 ms later).
struct EcamReset {
    ecam: &'static Ecam<PhysMmio>,
    topologies: &'static [Topology],
}

impl FunctionReset for EcamReset {
    fn function_level_reset(&mut self, rid: Bdf) -> Result<(), ResetError> {
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
        sluice_kernel::clock::delay_ns(100_000_000);
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

/// The SMMUv3 backend over every owned SMMU, with every covered function
/// registered by its StreamID. Functions an RMR names stay out: firmware
/// DMAs into their RMR ranges, so they are never assigned.
fn smmu_backend(
    owned: OwnedSmmus,
    pci: &'static Pci,
) -> (SmmuBackend<'static>, BTreeSet<PciAddress>) {
    let mut backend = SmmuBackend::new();
    backend.set_function_reset(Box::new(EcamReset {
        ecam: &pci.ecam,
        topologies: &pci.segments,
    }));
    let rmr: BTreeSet<PciAddress> = owned
        .device_unit
        .keys()
        .copied()
        .filter(|&a| owned.is_rmr_device(a))
        .collect();
    let mut unit_index = Vec::new();
    for unit in owned.units {
        unit_index.push(backend.add_unit(unit.unit));
    }
    let mut registered = BTreeSet::new();
    for (&addr, &(unit, stream_id)) in &owned.device_unit {
        if rmr.contains(&addr) {
            warn!("pci {addr}: named by an RMR; it stays with the host and cannot be assigned");
            continue;
        }
        let Some(function) = pci.functions().find(|f| f.addr == addr) else {
            continue;
        };
        if function.is_bridge() {
            continue;
        }
        let Some(&unit) = unit_index.get(unit) else {
            continue;
        };
        let desc = SmmuDevice {
            unit,
            stream_id,
            rid: addr.bdf,
            flr: function.caps.flr(),
        };
        match backend.add_device(device_id(addr), desc) {
            Ok(()) => {
                registered.insert(addr);
            }
            Err(e) => warn!("pci {addr}: cannot be assigned: {e:?}"),
        }
    }
    (backend, registered)
}

/// Everything needed to run the configured VMs.
pub struct Machine {
    pub platform: &'static Platform,
    pub pci: &'static Pci,
    pub iommufd: &'static Mutex<MachineIommufd>,
    pub vms: Vec<ValidVm>,
    /// What every VM is declared to the object model with.
    pub vm_config: VmConfig,
}

/// Brings PCI and every SMMU under Sluice's control and validates the
/// `vm=` words against what was found. Devices not assigned to a VM stay
/// blocked, declared as the host's so no VM can bind a device of their
/// group. Every VM gets `vm_config` in the object model.
pub fn prepare(platform: &'static Platform, vm_config: VmConfig) -> Result<Machine, String> {
    let acpi = platform
        .acpi
        .as_ref()
        .ok_or("no ACPI tables: PCI and the SMMUs are unknown")?;
    let pci: &'static Pci = Box::leak(Box::new(crate::pci::discover(acpi)?));
    let map = crate::pci::associate(acpi, pci)?;
    let owned = crate::smmu_owner::take_ownership(platform, &map)?;
    let (backend, registered) = smmu_backend(owned, pci);
    let mut associations = map.per_segment.clone();
    for a in &mut associations {
        for d in &mut a.devices {
            d.assignable &= registered.contains(&d.addr);
        }
    }
    let vms = super::configured_vms(platform, &pci.segments, &associations)?;
    // No MSI window: on Arm an MSI is a write the SMMU translates like any
    // other (to the ITS doorbell), not an address range the IOMMU skips.
    let mut iommufd = Iommufd::new(backend, None);
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
    Ok(Machine {
        platform,
        pci,
        iommufd: Box::leak(Box::new(Mutex::new(iommufd))),
        vms,
        vm_config,
    })
}

/// Builds VM `index` of `machine` and declares it to the object model.
fn build_and_register(machine: &Machine, index: usize) -> Result<BareMetalVm, String> {
    let valid = &machine.vms[index];
    let image =
        find_guest_image(&machine.platform.guest_images, &valid.config.image).ok_or_else(|| {
            format!(
                "VM {}: image `{}` was not loaded from the ESP",
                valid.config.name, valid.config.image
            )
        })?;
    let id = VmId(index as u32 + 1);
    let vm = build_vm(
        machine.platform,
        &machine.pci.ecam,
        &machine.pci.segments,
        valid,
        id,
        image.bytes,
    )?;
    let registered = register_with_iommufd(
        &mut machine.iommufd.lock(),
        &vm,
        machine.vm_config,
        &machine.pci.segments,
        &|_| DeviceFacts::default(),
    );
    if let Err(e) = registered {
        vm.destroy();
        return Err(format!("VM {}: {e}", valid.config.name));
    }
    Ok(vm)
}

/// A VM that ran, with its host state still alive (its RAM can be
/// inspected) until [`finish`].
pub struct RanVm {
    pub report: VmReport,
    pub vm: BareMetalVm,
}

/// Runs every configured VM at once: VM 0 on this (the boot) CPU, VM n on
/// CPU n. VMs after the first enter their guest once the first VM is ready
/// (its guest printed `GUEST-READY`) or has ended. Returns when all have
/// finished or stopped; a VM that could not be built or started is an
/// error naming it (VMs already running are still waited for).
pub fn run_all(machine: &Machine) -> Result<Vec<RanVm>, String> {
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
    let ready: &'static AtomicBool = Box::leak(Box::new(AtomicBool::new(false)));
    let mut others = Vec::new();
    let mut errors = Vec::new();
    for index in 1..machine.vms.len() {
        let mut vm = match build_and_register(machine, index) {
            Ok(vm) => vm,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        let slot: &'static Mutex<Option<Result<RanVm, String>>> =
            Box::leak(Box::new(Mutex::new(None)));
        let job = move |_cpu| {
            let result = el2_for_this_cpu()
                .and_then(|mut backend| {
                    wait_until_ready(ready)?;
                    run_vm(&mut vm, &mut backend, iommufd, &mut HostCpu { ready: None })
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
    let first = build_and_register(machine, 0).and_then(|mut vm| {
        let mut backend = el2_for_this_cpu()?;
        let report = run_vm(
            &mut vm,
            &mut backend,
            iommufd,
            &mut HostCpu { ready: Some(ready) },
        );
        ready.store(true, Ordering::Release);
        Ok(RanVm {
            report: report?,
            vm,
        })
    });
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
    let start = sluice_kernel::clock::now_ns().unwrap_or(0);
    while !ready.load(Ordering::Acquire) {
        let now = sluice_kernel::clock::now_ns().unwrap_or(u64::MAX);
        if now.saturating_sub(start) > OTHER_CPU_TIMEOUT_NS {
            return Err(String::from("the first VM never became ready"));
        }
        core::hint::spin_loop();
    }
    Ok(())
}

/// Tears a VM down: out of the object model (its domains and mappings
/// go), then its stage-2 table and RAM.
pub fn finish(machine: &Machine, ran: RanVm) {
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
