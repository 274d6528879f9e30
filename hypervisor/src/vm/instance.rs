//! One VM put together and run: the pieces of [`crate::vm`] and
//! [`crate::passthrough`] assembled in the order the boot protocol needs,
//! and the run loop that feeds every exit to [`handle_exit`].
//!
//! Nothing here touches hardware: the bare-metal kernel supplies host
//! frames ([`FrameSource`]), a nested page table ([`NestedPageTable`]), the
//! host's PCI configuration space ([`ConfigSpace`]), a [`VcpuBackend`] and
//! the iommufd dispatcher; host tests supply models of each.
//!
//! Building a VM ([`build_x86`], [`build_aarch64`]):
//! 1. guest RAM from host frames, scrubbed, with the ECAM window as MMIO;
//! 2. the emulated PCI bus over the assigned functions, their BARs placed
//!    in the guest's BAR window;
//! 3. the nested page table over RAM and BARs (ECAM, MSI window and holes
//!    stay unmapped, so they fault to Sluice);
//! 4. the guest image loaded and the start info, descriptor tables and
//!    identity page tables written (the direct-boot protocol; aarch64
//!    guests start with their MMU off and get only the start info);
//! 5. the VM and its devices declared to the iommufd object model
//!    ([`register_with_iommufd`]); every device stays blocked until the
//!    guest binds and attaches it.
//!
//! Running a vCPU ([`run_vcpu`]) repeats: enter the guest, count the exit,
//! let [`handle_exit`] act on it, then keep the host in step with the
//! object model: bus mastering follows `DEVICE_BIND`/`DEVICE_UNBIND`, DMA
//! faults are moved into the guests' fault queues before each hypercall,
//! and guest `WBINVD` follows the VM's WBINVD policy. A vCPU that halts
//! (x86 `HLT`, Arm `WFI`) with interrupts disabled (RFLAGS.IF clear,
//! PSTATE.I set) has finished: there is nothing to wake it.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use sluice_hal::PhysAddr;
use sluice_pci::{ConfigSpace, PciAddress, Topology};

use crate::iommufd::ioas::Span;
use crate::iommufd::{self, AssignedDevice, DeviceId, IommuBackend, Iommufd, VmId};
use crate::passthrough::{EcamWindow, GuestPciBus, PassthroughError};
use crate::vcpu::hypercall::HypercallDispatcher;
use crate::vcpu::{Aarch64EntryState, EntryState, VcpuBackend, VcpuError, VcpuExit};

use super::boot::{self, BootError, Machine, aarch64_layout};
use super::config::{AssignedPci, ValidVm, passthrough_functions};
use super::exits::{Console, CpuidSource, ExitAction, ExitEnv, StopReason, handle_exit};
use super::memory::{FrameSource, GuestRam, MemoryError, layout};
use super::nested::{NestedError, NestedPageTable, map_vm};

/// RFLAGS.IF: the vCPU accepts maskable interrupts.
const RFLAGS_IF: u64 = 1 << 9;

/// Why a VM could not be built. Everything allocated for it is released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildError {
    Memory(MemoryError),
    Passthrough(PassthroughError),
    Nested(NestedError),
    Boot(BootError),
    /// The iommufd object model refused the VM or one of its devices.
    Iommufd(iommufd::Error),
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Memory(e) => write!(f, "guest RAM: {e}"),
            Self::Passthrough(e) => write!(f, "PCI passthrough: {e:?}"),
            Self::Nested(e) => write!(f, "nested page table: {e:?}"),
            Self::Boot(e) => write!(f, "guest boot: {e}"),
            Self::Iommufd(e) => write!(f, "iommufd: {e:?}"),
        }
    }
}

/// Exits of one VM, by kind, and hypercalls by command.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExitStats {
    pub total: u64,
    pub hypercalls: u64,
    pub port_io: u64,
    pub nested_page_faults: u64,
    pub cpuid: u64,
    pub msr: u64,
    pub hlt: u64,
    pub wbinvd: u64,
    pub other: u64,
    /// Hypercall command → number of calls.
    pub by_command: BTreeMap<u64, u64>,
}

impl ExitStats {
    fn count(&mut self, exit: &VcpuExit) {
        self.total += 1;
        match exit {
            VcpuExit::Hypercall { command, .. } => {
                self.hypercalls += 1;
                *self.by_command.entry(*command).or_default() += 1;
            }
            VcpuExit::PortIo(_) => self.port_io += 1,
            VcpuExit::NestedPageFault { .. }
            | VcpuExit::DecodedMmio { .. }
            | VcpuExit::UndecodableMmio { .. } => self.nested_page_faults += 1,
            VcpuExit::Cpuid { .. } => self.cpuid += 1,
            VcpuExit::Msr { .. } => self.msr += 1,
            VcpuExit::Hlt => self.hlt += 1,
            VcpuExit::Wbinvd | VcpuExit::Invd => self.wbinvd += 1,
            _ => self.other += 1,
        }
    }

    /// Calls of hypercall `command` so far.
    pub fn calls(&self, command: u64) -> u64 {
        self.by_command.get(&command).copied().unwrap_or(0)
    }
}

/// A VM's host-side state.
pub struct VmInstance<'m, S: FrameSource, C: ConfigSpace> {
    pub id: VmId,
    pub name: String,
    pub ram: GuestRam<S>,
    pub pci: GuestPciBus<C>,
    pub nested: Box<dyn NestedPageTable + 'm>,
    pub console: Console,
    /// The guest's architecture.
    pub machine: Machine,
    /// Where the first vCPU of an x86 VM starts. An aarch64 VM's starts at
    /// `aarch64_entry`; this then holds an inert x86 state (RIP 0) that no
    /// aarch64 backend accepts. [`VmInstance::create_vcpu`] picks the right
    /// one.
    pub entry: EntryState,
    /// Where the first vCPU of an aarch64 VM starts.
    pub aarch64_entry: Option<Aarch64EntryState>,
    pub devices: Vec<AssignedPci>,
    pub stats: ExitStats,
    /// Every console line the guest printed, in order.
    pub console_lines: Vec<String>,
}

impl<S: FrameSource, C: ConfigSpace> VmInstance<'_, S, C> {
    /// The VM's first vCPU on `backend`, from the entry state of its
    /// architecture.
    pub fn create_vcpu<B: VcpuBackend>(&self, backend: &mut B) -> Result<B::Vcpu, VcpuError> {
        match (self.machine, &self.aarch64_entry) {
            (Machine::Aarch64, Some(entry)) => backend.create_aarch64_vcpu(entry),
            (Machine::Aarch64, None) => Err(VcpuError::InvalidGuestState(
                "an aarch64 VM without an aarch64 entry state",
            )),
            (Machine::X86_64, _) => backend.create_vcpu(&self.entry),
        }
    }

    /// The guest's trapped ECAM window.
    pub fn ecam_window(&self) -> EcamWindow {
        let ((base, _), _) = self.machine.pci_windows();
        EcamWindow { base, buses: 1 }
    }

    /// Tears the VM down: the nested table is freed, then the RAM is
    /// scrubbed and freed. Destroy the VM in the object model first
    /// ([`Iommufd::destroy_vm`]), so that no IOMMU domain maps the RAM.
    pub fn destroy(self) {
        let Self { ram, nested, .. } = self;
        nested.release();
        ram.release();
    }
}

/// What [`build_x86`] needs besides host memory.
pub struct BuildInputs<'a, C: ConfigSpace> {
    pub id: VmId,
    pub vm: &'a ValidVm,
    /// The guest's ELF image.
    pub image: &'a [u8],
    /// Host PCI configuration space (the passthrough bus reads and filters
    /// through it).
    pub host_config: C,
    /// PCI topology of every segment.
    pub topologies: &'a [Topology],
    /// The guest CPU offers 1 GiB pages (its identity tables may use them).
    pub one_gib_pages: bool,
}

/// Builds an x86 VM (steps 1–4 of the module documentation). On error
/// nothing stays allocated: the RAM is scrubbed and freed, the nested table
/// released.
pub fn build_x86<'m, S: FrameSource, C: ConfigSpace>(
    inputs: BuildInputs<'_, C>,
    frames: S,
    nested: Box<dyn NestedPageTable + 'm>,
) -> Result<VmInstance<'m, S, C>, BuildError> {
    build(Machine::X86_64, inputs, frames, nested)
}

/// Builds an aarch64 VM: RAM from [`aarch64_layout::RAM_BASE`], the ECAM
/// window and the console register trapped, BARs in the aarch64 BAR
/// window, the stage-2 table (any [`NestedPageTable`], normally Arm stage
/// 2) over RAM and BARs, and the aarch64 direct boot
/// ([`boot::boot_aarch64`]); `one_gib_pages` is not used. On error nothing
/// stays allocated.
pub fn build_aarch64<'m, S: FrameSource, C: ConfigSpace>(
    inputs: BuildInputs<'_, C>,
    frames: S,
    nested: Box<dyn NestedPageTable + 'm>,
) -> Result<VmInstance<'m, S, C>, BuildError> {
    build(Machine::Aarch64, inputs, frames, nested)
}

/// Where a built VM's first vCPU starts.
enum Entry {
    X86(EntryState),
    Aarch64(Aarch64EntryState),
}

fn build<'m, S: FrameSource, C: ConfigSpace>(
    machine: Machine,
    inputs: BuildInputs<'_, C>,
    frames: S,
    mut nested: Box<dyn NestedPageTable + 'm>,
) -> Result<VmInstance<'m, S, C>, BuildError> {
    let valid = inputs.vm;
    let inputs_id = inputs.id;
    let memory = valid.config.memory;
    let regions = match machine {
        Machine::X86_64 => layout::x86_ram_regions(memory),
        Machine::Aarch64 => {
            let end = aarch64_layout::RAM_BASE.saturating_add(memory);
            if end > aarch64_layout::GPA_LIMIT {
                nested.release();
                return Err(BuildError::Boot(BootError::RamBeyondAddressSpace { end }));
            }
            aarch64_layout::ram_regions(memory)
        }
    };
    let mut ram = match GuestRam::new(frames, &regions) {
        Ok(ram) => ram,
        Err(e) => {
            nested.release();
            return Err(BuildError::Memory(e));
        }
    };
    match assemble(machine, inputs, &mut ram, nested.as_mut()) {
        Ok((pci, entry)) => {
            let (entry, aarch64_entry) = match entry {
                Entry::X86(state) => (state, None),
                // No x86 state exists: an inert one (RIP 0) that aarch64
                // backends refuse.
                Entry::Aarch64(state) => (boot::x86_entry_state(0, 0), Some(state)),
            };
            Ok(VmInstance {
                id: inputs_id,
                name: valid.config.name.clone(),
                ram,
                pci,
                nested,
                console: Console::new(),
                machine,
                entry,
                aarch64_entry,
                devices: valid.devices.clone(),
                stats: ExitStats::default(),
                console_lines: Vec::new(),
            })
        }
        Err(e) => {
            // Nothing runs on the RAM yet and no IOMMU maps it: the table
            // and the frames can go back (scrubbed) at once.
            nested.release();
            ram.release();
            Err(e)
        }
    }
}

/// Steps 2–4 on RAM that exists: the trapped windows declared in RAM's
/// map, the passthrough bus, the nested table, the direct boot.
fn assemble<S: FrameSource, C: ConfigSpace>(
    machine: Machine,
    inputs: BuildInputs<'_, C>,
    ram: &mut GuestRam<S>,
    nested: &mut dyn NestedPageTable,
) -> Result<(GuestPciBus<C>, Entry), BuildError> {
    let BuildInputs {
        vm: valid,
        image,
        host_config,
        topologies,
        one_gib_pages,
        ..
    } = inputs;
    let ((ecam_base, ecam_size), (bar_base, bar_size)) = machine.pci_windows();
    ram.add_mmio(ecam_base, ecam_size)
        .map_err(BuildError::Memory)?;
    if machine == Machine::Aarch64 {
        ram.add_mmio(aarch64_layout::CONSOLE_GPA, sluice_hal::PAGE_SIZE)
            .map_err(BuildError::Memory)?;
    }
    let functions = passthrough_functions(&valid.devices, topologies);
    let pci = GuestPciBus::new(host_config, &functions, bar_base, bar_size)
        .map_err(BuildError::Passthrough)?;
    map_vm(nested, ram, &pci.bar_mappings()).map_err(BuildError::Nested)?;
    let devices = boot::start_info_devices(&valid.devices, topologies);
    let regions: Vec<(u64, u64)> = ram.regions().to_vec();
    let args = &valid.config.args;
    let (entry, image_range, pc) = match machine {
        Machine::X86_64 => {
            let booted = boot::boot_x86(&*ram, &regions, image, &devices, args, one_gib_pages)
                .map_err(BuildError::Boot)?;
            let pc = booted.entry_state.registers.rip;
            (
                Entry::X86(booted.entry_state),
                (booted.image.start, booted.image.end),
                pc,
            )
        }
        Machine::Aarch64 => {
            let booted = boot::boot_aarch64(&*ram, &regions, image, &devices, args)
                .map_err(BuildError::Boot)?;
            let pc = booted.entry_state.registers.pc;
            (
                Entry::Aarch64(booted.entry_state),
                (booted.image.start, booted.image.end),
                pc,
            )
        }
    };
    log::info!(
        "VM {}: {} MiB RAM, image {:#x}-{:#x} entry {:#x}, {} device(s), nested root {:#x}",
        valid.config.name,
        valid.config.memory >> 20,
        image_range.0,
        image_range.1,
        pc,
        valid.devices.len(),
        nested.root_address().as_u64(),
    );
    Ok((pci, entry))
}

/// The platform's device ID for a host PCI function, as the IOMMU backend
/// knows it: segment in bits 31:16, bus/device/function below.
pub const fn device_id(address: PciAddress) -> DeviceId {
    DeviceId(((address.segment.0 as u32) << 16) | address.bdf.requester_id() as u32)
}

/// Host facts about an assigned device the object model needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceFacts {
    /// RMRR ranges firmware declared for the device.
    pub rmrrs: Vec<Span>,
    /// The page of the MSI doorbell its interrupts are writes to (Arm: its
    /// ITS's GITS_TRANSLATER page, from the IORT).
    pub msi_doorbell: Option<PhysAddr>,
}

/// Declares `vm` and its devices to the object model (step 5). The
/// devices' PCI facts come from enumeration: FLR and PASID width from their
/// capabilities; a PCI Express function may issue no-snoop requests
/// (Device Control "Enable No Snoop" is set at reset, PCIe base spec
/// 7.5.3.4), a conventional PCI one cannot.
pub fn register_with_iommufd<B: IommuBackend, S: FrameSource, C: ConfigSpace>(
    iommufd: &mut Iommufd<B>,
    vm: &VmInstance<'_, S, C>,
    config: iommufd::VmConfig,
    topologies: &[Topology],
    facts: &dyn Fn(PciAddress) -> DeviceFacts,
) -> Result<(), BuildError> {
    iommufd
        .create_vm(vm.id, config)
        .map_err(BuildError::Iommufd)?;
    for d in &vm.devices {
        let function = topologies.iter().find_map(|t| t.get(d.host));
        let facts = facts(d.host);
        let info = AssignedDevice {
            device: device_id(d.host),
            guest_bdf: d.guest_abi_bdf(),
            group: d.group,
            rmrrs: facts.rmrrs,
            msi_doorbell: facts.msi_doorbell,
            no_snoop: function.is_some_and(|f| f.caps.pcie.is_some()),
            flr: function.is_some_and(|f| f.caps.flr()),
            pasid_log2: function
                .and_then(|f| f.caps.pasid)
                .map_or(0, |p| p.max_width),
        };
        if let Err(e) = iommufd.assign_device(vm.id, info) {
            // Leave nothing half-registered.
            let _ = iommufd.destroy_vm(vm.id);
            return Err(BuildError::Iommufd(e));
        }
    }
    Ok(())
}

/// What the run loop needs from the object model besides hypercalls.
pub trait VmIommuState: HypercallDispatcher {
    /// Whether the device the guest sees at `guest_bdf` (ABI packing) is
    /// bound through `DEVICE_BIND`.
    fn device_bound(&self, vm: VmId, guest_bdf: u32) -> bool;
    /// Guest WBINVD must flush caches (the iommufd WBINVD policy).
    fn wbinvd_flushes(&self, vm: VmId) -> bool;
    /// Moves DMA faults the IOMMU recorded into the guests' fault queues.
    fn collect_faults(&mut self);
}

impl<B: IommuBackend> VmIommuState for Iommufd<B> {
    fn device_bound(&self, vm: VmId, guest_bdf: u32) -> bool {
        self.device_list(vm).is_ok_and(|list| {
            list.iter()
                .any(|d| d.guest_bdf == guest_bdf && d.dev_id != 0)
        })
    }
    fn wbinvd_flushes(&self, vm: VmId) -> bool {
        // An unknown VM flushes: the safe answer.
        self.wbinvd_policy(vm)
            .map_or(true, |p| p == sluice_abi::wbinvd::FLUSH)
    }
    fn collect_faults(&mut self) {
        self.process_faults();
    }
}

/// What the run loop asks of the machine it runs on.
pub trait RunHost {
    /// Host CPUID, for the guest's filtered view.
    fn cpuid(&self) -> &dyn CpuidSource;
    /// Write back and invalidate this CPU's caches (guest WBINVD under the
    /// `FLUSH` policy).
    fn flush_caches(&mut self);
    /// A complete console line of VM `vm` (already logged).
    fn console_line(&mut self, vm: &str, line: &str) {
        let _ = (vm, line);
    }
}

/// How a vCPU's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    /// HLT with interrupts disabled: the guest is done.
    Finished,
    /// The VM was stopped; the reason was logged.
    Stopped(StopReason),
    /// The exit budget ran out (a guest that never finishes).
    ExitLimit,
}

/// Runs `vcpu` of `vm` until it finishes, is stopped, or has taken
/// `max_exits` exits. See the module documentation.
#[allow(clippy::too_many_arguments)]
pub fn run_vcpu<B, D, S, C>(
    vm: &mut VmInstance<'_, S, C>,
    backend: &mut B,
    vcpu: &mut B::Vcpu,
    iommu: &mut D,
    host: &mut dyn RunHost,
    max_exits: u64,
) -> RunEnd
where
    B: VcpuBackend,
    D: VmIommuState,
    S: FrameSource,
    C: ConfigSpace,
{
    let ecam = vm.ecam_window();
    let mut taken = 0u64;
    loop {
        if taken >= max_exits {
            log::error!(
                "VM {}: stopped after {taken} exits without finishing",
                vm.name
            );
            return RunEnd::ExitLimit;
        }
        let exit = match backend.run(vcpu) {
            Ok(exit) => exit,
            Err(e) => {
                log::error!("VM {} stopped: vCPU backend: {e}", vm.name);
                return RunEnd::Stopped(StopReason::Backend(e));
            }
        };
        taken += 1;
        vm.stats.count(&exit.reason);
        let hypercall = matches!(exit.reason, VcpuExit::Hypercall { .. });
        if hypercall {
            // A guest reading its fault queue sees every fault recorded so
            // far.
            iommu.collect_faults();
        }
        let wbinvd_flushes =
            matches!(exit.reason, VcpuExit::Wbinvd | VcpuExit::Invd) && iommu.wbinvd_flushes(vm.id);
        let mut env = ExitEnv {
            vm: vm.id,
            vm_name: &vm.name,
            memory: &vm.ram,
            dispatcher: &mut *iommu,
            pci: &mut vm.pci,
            ecam,
            console: &mut vm.console,
            cpuid: host.cpuid(),
            wbinvd_flushes,
            console_lines: Vec::new(),
        };
        let action = handle_exit(backend, vcpu, &exit, &mut env);
        let mut lines = core::mem::take(&mut env.console_lines);
        for line in &lines {
            host.console_line(&vm.name, line);
        }
        vm.console_lines.append(&mut lines);
        if hypercall {
            sync_bus_mastering(vm, iommu);
        }
        match action {
            ExitAction::Resume => {}
            ExitAction::FlushCaches => host.flush_caches(),
            ExitAction::Halt => {
                let interrupts_on = match backend.aarch64_registers(vcpu) {
                    Some(arm) => arm.irqs_unmasked(),
                    None => backend.registers(vcpu).rflags & RFLAGS_IF != 0,
                };
                if !interrupts_on {
                    log::info!("VM {}: halted with interrupts disabled: finished", vm.name);
                    return RunEnd::Finished;
                }
                // No virtual interrupt source exists yet: nothing could
                // ever wake this vCPU.
                let reason = StopReason::Backend(VcpuError::Unsupported(
                    "HLT with interrupts enabled (Sluice delivers no virtual interrupts yet)",
                ));
                log::error!("VM {} stopped: {reason}", vm.name);
                return RunEnd::Stopped(reason);
            }
            ExitAction::Stop(reason) => return RunEnd::Stopped(reason),
        }
    }
}

/// Bus mastering is allowed exactly while the device is bound.
fn sync_bus_mastering<D: VmIommuState, S: FrameSource, C: ConfigSpace>(
    vm: &mut VmInstance<'_, S, C>,
    iommu: &D,
) {
    for d in &vm.devices {
        let bound = iommu.device_bound(vm.id, d.guest_abi_bdf());
        let allowed = vm
            .pci
            .device(d.guest)
            .is_some_and(|p| p.bus_master_allowed());
        if bound != allowed {
            log::info!(
                "VM {}: bus mastering of {} (guest {}) {}",
                vm.name,
                d.host,
                d.guest,
                if bound {
                    "allowed: device bound"
                } else {
                    "revoked: device unbound"
                }
            );
            vm.pci.set_bus_master_allowed(d.guest, bound);
        }
    }
}
