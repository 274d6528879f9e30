//! The iommufd-style object model each guest drives through hypercalls.
//!
//! Per VM there is one object table (IDs start at 1, the lowest free ID is
//! reused, as iommufd's xarray does) holding:
//!
//! * **IOAS** — an IO address space: the guest's mappings of its own RAM
//!   ([`ioas`]), allowed and reserved IOVA ranges;
//! * **HWPT** — a paging domain of the IOMMU that mirrors one IOAS; made
//!   explicitly (`HWPT_ALLOC`) or automatically when a device attaches to an
//!   IOAS (then destroyed with its last device);
//! * **device** — a bound assigned device (`DEVICE_BIND`);
//! * **fault queue** — DMA faults of the HWPTs allocated with it.
//!
//! Reference rules follow iommufd: an IOAS is busy while a HWPT is built on
//! it, a HWPT while a device (or PASID) is attached, a fault queue while a
//! HWPT reports to it; `DESTROY` of a busy object gives `EBUSY`.
//!
//! Every operation checks everything first and changes state last, undoing
//! backend work on failure, so a failed call leaves the VM as it was.
//! Errors are [`Error`] values; [`Error::errno`] turns them into Linux errno
//! values at the hypercall boundary ([`dispatch`]).

pub mod backend;
pub mod dispatch;
pub mod guest_memory;
pub mod ioas;
pub mod smmu_backend;
pub mod vtd_backend;

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::vec::Vec;

use sluice_abi::errno;
use sluice_hal::{PAGE_SIZE, PhysAddr};

pub use backend::{
    AttachTarget, BackendError, DeviceId, DmaFault, DomainConfig, DomainId, FaultReason,
    FunctionReset, IommuBackend, IommuCaps, PageBudget, Prot, ResetError,
};
pub use guest_memory::{GuestMemory, GuestMemoryError, HostChunk};
use ioas::{Area, Ioas, ReserveOwner, Span};
pub use vtd_backend::{RegisterError, VtdBackend, VtdDevice};

/// The x86 MSI address window (Intel SDM vol. 3, "Message Address Register
/// Format"): DMA writes there are interrupt requests, never memory.
pub const X86_MSI_WINDOW: Span = (0xfee0_0000, 0xfeef_ffff);

/// The IOVA window Sluice keeps for MSI doorbells on Arm: 1 MiB at 128 MiB,
/// the software-managed MSI region Linux's SMMUv3 driver reports
/// (`IOMMU_RESV_SW_MSI`), so IOVA layouts that work on Linux iommufd work
/// here.
pub const ARM_SW_MSI_WINDOW: Span = (0x0800_0000, 0x080f_ffff);

/// Where a device's MSIs go in its IOVA space, reserved in every IOAS the
/// device attaches to (iommufd reports it as a reserved range and refuses
/// mappings there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsiWindow {
    /// Writes to the window are interrupt requests the IOMMU never
    /// translates (x86: [`X86_MSI_WINDOW`]).
    Bypass(Span),
    /// The IOMMU translates MSI writes like any DMA (Arm: SMMU, GIC ITS):
    /// Sluice maps each attached device's doorbell page
    /// ([`AssignedDevice::msi_doorbell`]) into the window of the HWPT's
    /// domain, one page per distinct doorbell, write-only with device
    /// memory attributes, until the HWPT is destroyed.
    SoftwareManaged(Span),
}

impl MsiWindow {
    pub const fn span(self) -> Span {
        match self {
            Self::Bypass(s) | Self::SoftwareManaged(s) => s,
        }
    }
}

/// Fault records a queue holds before it counts overflows.
pub const FAULT_QUEUE_CAPACITY: usize = 64;

/// Identifies a VM to the object model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VmId(pub u32);

/// Why an operation failed. Each becomes one errno ([`Error::errno`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// `size` below the struct's minimum (`EINVAL`).
    ArgumentTooSmall,
    /// Non-zero bytes beyond the struct Sluice knows, or `size` above 4 KiB
    /// (`E2BIG`).
    ArgumentTooBig,
    /// Unknown flag bits (`EOPNOTSUPP`).
    UnsupportedFlags,
    /// A reserved field is not zero (`EOPNOTSUPP`).
    ReservedNotZero,
    /// A feature Sluice does not offer (`EOPNOTSUPP`).
    NotSupported(&'static str),
    /// No such command (`ENOTTY`).
    UnknownCommand,
    /// Guest memory could not be accessed, or is not the VM's RAM (`EFAULT`).
    GuestMemory(GuestMemoryError),
    /// No object with this ID, or not of the type the command needs
    /// (`ENOENT`).
    NoSuchObject(u32),
    /// The object is referenced by another (`EBUSY`).
    ObjectBusy(u32),
    /// Bad argument (`EINVAL`).
    Invalid(&'static str),
    /// `start + length` wraps (`EOVERFLOW`).
    Overflow,
    /// The IOVA range is already mapped (`EEXIST`).
    AlreadyMapped,
    /// The range to unmap or copy is not (exactly) mapped (`ENOENT`).
    NotMapped,
    /// No free IOVA range is big enough (`ENOSPC`).
    NoIovaSpace,
    /// A reservation conflicts with mappings or allowed ranges
    /// (`EADDRINUSE`).
    AddressInUse(&'static str),
    /// Already bound or attached (`EBUSY`).
    Busy(&'static str),
    /// Not allowed (`EPERM`).
    NotPermitted(&'static str),
    /// Memory for IOMMU page tables could not be allocated (`ENOMEM`).
    OutOfMemory,
    /// A per-VM quota is used up (`ENOMEM`).
    QuotaExceeded(&'static str),
    /// An output array is too small; the needed count was written
    /// (`EMSGSIZE`).
    BufferTooSmall { needed: u32 },
    /// The guest BDF names no device assigned to this VM (`ENODEV`).
    NoSuchDevice,
    /// Already exists (`EEXIST`), e.g. a vPASID already linked.
    Exists(&'static str),
}

impl Error {
    /// The positive errno value.
    pub fn errno(&self) -> i64 {
        match self {
            Error::ArgumentTooSmall => errno::EINVAL,
            Error::ArgumentTooBig => errno::E2BIG,
            Error::UnsupportedFlags | Error::ReservedNotZero | Error::NotSupported(_) => {
                errno::EOPNOTSUPP
            }
            Error::UnknownCommand => errno::ENOTTY,
            Error::GuestMemory(_) => errno::EFAULT,
            Error::NoSuchObject(_) | Error::NotMapped => errno::ENOENT,
            Error::ObjectBusy(_) | Error::Busy(_) => errno::EBUSY,
            Error::Invalid(_) => errno::EINVAL,
            Error::Overflow => errno::EOVERFLOW,
            Error::AlreadyMapped | Error::Exists(_) => errno::EEXIST,
            Error::NoIovaSpace => errno::ENOSPC,
            Error::AddressInUse(_) => errno::EADDRINUSE,
            Error::NotPermitted(_) => errno::EPERM,
            Error::OutOfMemory | Error::QuotaExceeded(_) => errno::ENOMEM,
            Error::BufferTooSmall { .. } => errno::EMSGSIZE,
            Error::NoSuchDevice => errno::ENODEV,
        }
    }
}

impl From<GuestMemoryError> for Error {
    fn from(e: GuestMemoryError) -> Self {
        Error::GuestMemory(e)
    }
}

impl From<BackendError> for Error {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::OutOfMemory => Error::OutOfMemory,
            BackendError::QuotaExceeded => Error::QuotaExceeded("IOMMU page-table memory"),
            BackendError::NoSuchDevice => Error::NoSuchDevice,
            BackendError::Incompatible => {
                Error::Invalid("the IOMMU cannot attach this device to this domain")
            }
            BackendError::BadRange => Error::Invalid("IOVA range refused by the IOMMU domain"),
            BackendError::Unsupported => {
                Error::NotSupported("operation not supported by the IOMMU")
            }
        }
    }
}

/// Per-VM limits, so that a guest cannot exhaust the hypervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// IOAS, HWPT, device and fault-queue objects together.
    pub max_objects: u32,
    /// Mappings over all IOASes.
    pub max_areas: u32,
    /// Ranges per `IOAS_ALLOW_IOVAS`.
    pub max_allowed_ranges: u32,
    /// IOMMU page-table pages over all domains.
    pub max_page_table_pages: u64,
}

impl Default for Quota {
    fn default() -> Self {
        Self {
            max_objects: 256,
            max_areas: 4096,
            max_allowed_ranges: 256,
            max_page_table_pages: 4096,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VmConfig {
    /// Let devices whose IOMMU cannot remap interrupts be bound anyway (their
    /// MSIs are not isolated; a warning names each such device).
    pub allow_unsafe_interrupts: bool,
    pub quota: Quota,
}

/// A device the platform assigned to a VM, with the PCI facts the object
/// model needs. The IOMMU facts come from [`IommuBackend::caps`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssignedDevice {
    pub device: DeviceId,
    /// Where the guest sees the device ([`sluice_abi::bdf`] packing); it may
    /// differ from the host BDF.
    pub guest_bdf: u32,
    /// IOMMU group: devices the platform cannot isolate from each other.
    pub group: u32,
    /// RMRR / direct-mapped ranges the firmware declared for the device.
    pub rmrrs: Vec<Span>,
    /// The device can issue no-snoop transactions.
    pub no_snoop: bool,
    /// The device supports function-level reset.
    pub flr: bool,
    /// PASID bits of the device's PASID capability (0: none).
    pub pasid_log2: u8,
    /// The page of the MSI doorbell the device's interrupts are writes to
    /// (Arm: the GITS_TRANSLATER page of the ITS the IORT names), mapped
    /// into its HWPTs under a [`MsiWindow::SoftwareManaged`] window.
    pub msi_doorbell: Option<PhysAddr>,
}

#[derive(Debug)]
struct Hwpt {
    ioas: u32,
    domain: DomainId,
    auto: bool,
    config: DomainConfig,
    unit: u32,
    fault: Option<u32>,
    /// RID and PASID attachments.
    users: u32,
    /// Doorbell page → the IOVA in the software-managed MSI window it is
    /// mapped at in `domain`.
    msi_pages: BTreeMap<PhysAddr, u64>,
}

#[derive(Debug)]
struct BoundDevice {
    device: DeviceId,
    group: u32,
    caps: IommuCaps,
    rid: Option<u32>,
    pasids: BTreeMap<u32, u32>,
}

#[derive(Debug, Default)]
struct FaultQueue {
    records: VecDeque<sluice_abi::FaultRecord>,
    overflow: u64,
    users: u32,
}

#[derive(Debug)]
enum Object {
    Ioas(Ioas),
    Hwpt(Hwpt),
    Device(BoundDevice),
    Fault(FaultQueue),
}

#[derive(Debug, Default)]
struct GroupState {
    hwpt: Option<u32>,
    attached: BTreeSet<u32>,
    bound: BTreeSet<u32>,
}

struct Vm {
    config: VmConfig,
    objects: BTreeMap<u32, Object>,
    budget: PageBudget,
    areas: u32,
    groups: BTreeMap<u32, GroupState>,
    /// vPASID → (device ID, host PASID).
    vpasids: BTreeMap<u32, (u32, u32)>,
}

struct Assignment {
    vm: VmId,
    info: AssignedDevice,
    bound: Option<u32>,
}

/// The iommufd object model of the whole machine: every VM's objects, the
/// device assignments and the IOMMU backend.
pub struct Iommufd<B: IommuBackend> {
    backend: B,
    msi_window: Option<MsiWindow>,
    vms: BTreeMap<VmId, Vm>,
    assignments: BTreeMap<DeviceId, Assignment>,
    /// Devices the host keeps (not assigned to any VM), by IOMMU group: a
    /// VM may not bind a device whose group contains one.
    host_devices: BTreeMap<DeviceId, u32>,
}

/// What `DEVICE_BIND` returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindResult {
    pub dev_id: u32,
    pub group: u32,
    /// Guest BDFs of every device of the group, this one included.
    pub group_bdfs: Vec<u32>,
}

/// One mapping, as [`VmSnapshot`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AreaSnapshot {
    pub iova: u64,
    pub length: u64,
    pub prot: Prot,
    pub chunks: Vec<HostChunk>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoasSnapshot {
    pub id: u32,
    pub areas: Vec<AreaSnapshot>,
    pub allowed: Vec<Span>,
    pub reserved: Vec<Span>,
    pub hwpts: Vec<u32>,
    pub large_pages: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HwptSnapshot {
    pub id: u32,
    pub ioas: u32,
    pub auto: bool,
    pub users: u32,
    pub enforce_coherency: bool,
    pub pasid_compatible: bool,
    pub domain: DomainId,
    /// (IOVA, doorbell page) of every MSI doorbell mapped in the domain.
    pub msi_pages: Vec<(u64, PhysAddr)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSnapshot {
    pub id: u32,
    pub rid: Option<u32>,
    /// (PASID, HWPT)
    pub pasids: Vec<(u32, u32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultSnapshot {
    pub id: u32,
    pub queued: usize,
    pub overflow: u64,
    pub users: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSnapshot {
    pub group: u32,
    pub hwpt: Option<u32>,
    pub attached: Vec<u32>,
    pub bound: Vec<u32>,
}

/// Everything about one VM's objects, for tests and diagnostics: two equal
/// snapshots mean the VM's iommufd state is the same.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VmSnapshot {
    pub ioases: Vec<IoasSnapshot>,
    pub hwpts: Vec<HwptSnapshot>,
    pub devices: Vec<DeviceSnapshot>,
    pub faults: Vec<FaultSnapshot>,
    pub page_table_pages: u64,
    /// (vPASID, device ID, host PASID)
    pub vpasids: Vec<(u32, u32, u32)>,
    pub groups: Vec<GroupSnapshot>,
}

fn lowest_free_id(objects: &BTreeMap<u32, Object>) -> u32 {
    let mut id = 1;
    for &k in objects.keys() {
        if k != id {
            break;
        }
        id += 1;
    }
    id
}

impl Vm {
    fn check_object_quota(&self) -> Result<(), Error> {
        if self.objects.len() as u64 >= u64::from(self.config.quota.max_objects) {
            Err(Error::QuotaExceeded("objects"))
        } else {
            Ok(())
        }
    }
    fn insert(&mut self, object: Object) -> u32 {
        let id = lowest_free_id(&self.objects);
        self.objects.insert(id, object);
        id
    }
    fn ioas(&self, id: u32) -> Result<&Ioas, Error> {
        match self.objects.get(&id) {
            Some(Object::Ioas(i)) => Ok(i),
            _ => Err(Error::NoSuchObject(id)),
        }
    }
    fn ioas_mut(&mut self, id: u32) -> Result<&mut Ioas, Error> {
        match self.objects.get_mut(&id) {
            Some(Object::Ioas(i)) => Ok(i),
            _ => Err(Error::NoSuchObject(id)),
        }
    }
    fn hwpt(&self, id: u32) -> Result<&Hwpt, Error> {
        match self.objects.get(&id) {
            Some(Object::Hwpt(h)) => Ok(h),
            _ => Err(Error::NoSuchObject(id)),
        }
    }
    fn hwpt_mut(&mut self, id: u32) -> Result<&mut Hwpt, Error> {
        match self.objects.get_mut(&id) {
            Some(Object::Hwpt(h)) => Ok(h),
            _ => Err(Error::NoSuchObject(id)),
        }
    }
    fn device(&self, id: u32) -> Result<&BoundDevice, Error> {
        match self.objects.get(&id) {
            Some(Object::Device(d)) => Ok(d),
            _ => Err(Error::NoSuchObject(id)),
        }
    }
    fn device_mut(&mut self, id: u32) -> Result<&mut BoundDevice, Error> {
        match self.objects.get_mut(&id) {
            Some(Object::Device(d)) => Ok(d),
            _ => Err(Error::NoSuchObject(id)),
        }
    }
    fn fault_mut(&mut self, id: u32) -> Result<&mut FaultQueue, Error> {
        match self.objects.get_mut(&id) {
            Some(Object::Fault(f)) => Ok(f),
            _ => Err(Error::NoSuchObject(id)),
        }
    }
    fn domains_of(&self, ioas: &Ioas) -> Vec<DomainId> {
        ioas.hwpts
            .keys()
            .filter_map(|h| self.hwpt(*h).ok().map(|h| h.domain))
            .collect()
    }
}

/// Maps `chunks` at `iova` into every domain, undoing everything on failure.
fn map_into_domains<B: IommuBackend>(
    backend: &mut B,
    budget: &mut PageBudget,
    domains: &[DomainId],
    iova: u64,
    chunks: &[HostChunk],
    prot: Prot,
    large_pages: bool,
) -> Result<(), Error> {
    for (n, &domain) in domains.iter().enumerate() {
        let mut at = iova;
        for c in chunks {
            if let Err(e) = backend.map(domain, at, c.phys, c.length, prot, large_pages, budget) {
                if at > iova {
                    backend.unmap(domain, iova, at - iova, budget);
                }
                let total: u64 = chunks.iter().map(|c| c.length).sum();
                for &done in &domains[..n] {
                    backend.unmap(done, iova, total, budget);
                }
                return Err(e.into());
            }
            at += c.length;
        }
    }
    Ok(())
}

fn effective_pasid_log2(caps: &IommuCaps, info: &AssignedDevice) -> u8 {
    if caps.scalable_mode {
        caps.max_pasid_log2.min(info.pasid_log2)
    } else {
        0
    }
}

/// Where an attach goes.
#[derive(Debug, Clone, Copy)]
enum Target {
    Ioas(u32),
    Hwpt(u32),
}

impl<B: IommuBackend> Iommufd<B> {
    /// An object model using `backend`; `msi_window` is reserved in every
    /// IOAS a device attaches to (x86: `MsiWindow::Bypass(X86_MSI_WINDOW)`,
    /// Arm: `MsiWindow::SoftwareManaged(ARM_SW_MSI_WINDOW)`).
    pub fn new(backend: B, msi_window: Option<MsiWindow>) -> Self {
        Self {
            backend,
            msi_window,
            vms: BTreeMap::new(),
            assignments: BTreeMap::new(),
            host_devices: BTreeMap::new(),
        }
    }

    /// Records that the host keeps `device`, a member of IOMMU `group`.
    pub fn declare_host_device(&mut self, device: DeviceId, group: u32) {
        self.host_devices.insert(device, group);
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    pub fn create_vm(&mut self, vm: VmId, config: VmConfig) -> Result<(), Error> {
        if self.vms.contains_key(&vm) {
            return Err(Error::Exists("VM already exists"));
        }
        self.vms.insert(
            vm,
            Vm {
                config,
                objects: BTreeMap::new(),
                budget: PageBudget::new(config.quota.max_page_table_pages),
                areas: 0,
                groups: BTreeMap::new(),
                vpasids: BTreeMap::new(),
            },
        );
        Ok(())
    }

    /// Tears down every object of the VM (unbinding its devices) and forgets
    /// it and its assignments.
    pub fn destroy_vm(&mut self, vm: VmId) -> Result<(), Error> {
        let v = self.vms.get(&vm).ok_or(Error::Invalid("no such VM"))?;
        let devices: Vec<u32> = v
            .objects
            .iter()
            .filter(|(_, o)| matches!(o, Object::Device(_)))
            .map(|(&k, _)| k)
            .collect();
        for d in devices {
            self.device_unbind(vm, d)?;
        }
        // HWPTs first (they hold IOASes and fault queues), then the rest.
        let v = self.vms.get(&vm).ok_or(Error::Invalid("no such VM"))?;
        let hwpts: Vec<u32> = v
            .objects
            .iter()
            .filter(|(_, o)| matches!(o, Object::Hwpt(_)))
            .map(|(&k, _)| k)
            .collect();
        for h in hwpts {
            self.destroy(vm, h)?;
        }
        let v = self.vms.get(&vm).ok_or(Error::Invalid("no such VM"))?;
        let rest: Vec<u32> = v.objects.keys().copied().collect();
        for id in rest {
            self.destroy(vm, id)?;
        }
        self.vms.remove(&vm);
        self.assignments.retain(|_, a| a.vm != vm);
        Ok(())
    }

    /// Gives `info.device` to `vm`. The VM layer does this when it builds the
    /// VM; the guest then finds the device with `DEVICE_LIST`.
    pub fn assign_device(&mut self, vm: VmId, info: AssignedDevice) -> Result<(), Error> {
        if !self.vms.contains_key(&vm) {
            return Err(Error::Invalid("no such VM"));
        }
        if self.assignments.contains_key(&info.device) {
            return Err(Error::Busy("device already assigned"));
        }
        // RMRRs come from firmware tables: refuse nonsense rather than trust it.
        if info.rmrrs.iter().any(|&(start, last)| start > last) {
            log::warn!(
                "device {}: firmware reserved-memory range with start above end; not assignable",
                info.device.0
            );
            return Err(Error::Invalid("RMRR with start > last"));
        }
        if info.msi_doorbell.is_some_and(|d| !d.is_page_aligned()) {
            return Err(Error::Invalid("MSI doorbell page not page-aligned"));
        }
        if self
            .assignments
            .values()
            .any(|a| a.vm == vm && a.info.guest_bdf == info.guest_bdf)
        {
            return Err(Error::Exists("guest BDF already used in this VM"));
        }
        self.backend.caps(info.device)?;
        self.assignments.insert(
            info.device,
            Assignment {
                vm,
                info,
                bound: None,
            },
        );
        Ok(())
    }

    fn vm_mut(&mut self, vm: VmId) -> Result<&mut Vm, Error> {
        self.vms.get_mut(&vm).ok_or(Error::Invalid("no such VM"))
    }
    fn vm(&self, vm: VmId) -> Result<&Vm, Error> {
        self.vms.get(&vm).ok_or(Error::Invalid("no such VM"))
    }

    /// Page-table pages the VM's domains use.
    pub fn page_table_pages(&self, vm: VmId) -> u64 {
        self.vms.get(&vm).map_or(0, |v| v.budget.used_pages)
    }

    /// The host PASID the guest linked to `vpasid` (ENQCMD translation).
    pub fn translate_vpasid(&self, vm: VmId, vpasid: u32) -> Option<u32> {
        self.vms.get(&vm)?.vpasids.get(&vpasid).map(|&(_, p)| p)
    }

    // ---------------------------------------------------------------- IOAS

    pub fn ioas_alloc(&mut self, vm: VmId) -> Result<u32, Error> {
        let v = self.vm_mut(vm)?;
        v.check_object_quota()?;
        Ok(v.insert(Object::Ioas(Ioas::new())))
    }

    /// `IOAS_MAP`: maps guest RAM `[gpa, gpa + length)`; returns the IOVA.
    #[allow(clippy::too_many_arguments)]
    pub fn ioas_map(
        &mut self,
        vm: VmId,
        mem: &dyn GuestMemory,
        ioas_id: u32,
        gpa: u64,
        length: u64,
        fixed_iova: Option<u64>,
        prot: Prot,
    ) -> Result<u64, Error> {
        // iommufd checks the raw values first: an IOVA or length of all ones
        // can never be valid.
        if fixed_iova == Some(u64::MAX) || length == u64::MAX {
            return Err(Error::Overflow);
        }
        if !prot.read && !prot.write {
            return Err(Error::Invalid("mapping with neither read nor write"));
        }
        self.vm(vm)?.ioas(ioas_id)?;
        if length == 0 {
            return Err(Error::Invalid("zero length"));
        }
        if let Some(iova) = fixed_iova {
            iova.checked_add(length - 1).ok_or(Error::Overflow)?;
        }
        gpa.checked_add(length - 1).ok_or(Error::Overflow)?;
        if !gpa.is_multiple_of(sluice_hal::PAGE_SIZE)
            || !length.is_multiple_of(sluice_hal::PAGE_SIZE)
        {
            return Err(Error::Invalid("guest address or length not 4 KiB aligned"));
        }
        let chunks = guest_memory::translate_range(mem, gpa, length)?;
        self.map_chunks(vm, ioas_id, fixed_iova, length, chunks, prot)
    }

    fn map_chunks(
        &mut self,
        vm: VmId,
        ioas_id: u32,
        fixed_iova: Option<u64>,
        length: u64,
        chunks: Vec<HostChunk>,
        prot: Prot,
    ) -> Result<u64, Error> {
        let Iommufd { backend, vms, .. } = self;
        let v = vms.get_mut(&vm).ok_or(Error::Invalid("no such VM"))?;
        let ioas = v.ioas(ioas_id)?;
        if !length.is_multiple_of(ioas.iova_alignment()) {
            return Err(Error::Invalid("length not aligned to the IOAS alignment"));
        }
        let iova = match fixed_iova {
            Some(iova) => {
                ioas.check_fixed(iova, length)?;
                iova
            }
            None => ioas.allocate(length)?,
        };
        if v.areas >= v.config.quota.max_areas {
            return Err(Error::QuotaExceeded("mappings"));
        }
        let domains = v.domains_of(ioas);
        let large = ioas.large_pages;
        map_into_domains(backend, &mut v.budget, &domains, iova, &chunks, prot, large)?;
        v.areas += 1;
        v.ioas_mut(ioas_id)?.areas.insert(
            iova,
            Area {
                iova,
                length,
                prot,
                chunks,
            },
        );
        Ok(iova)
    }

    /// `IOAS_UNMAP`: returns the number of bytes unmapped.
    pub fn ioas_unmap(
        &mut self,
        vm: VmId,
        ioas_id: u32,
        iova: u64,
        length: u64,
    ) -> Result<u64, Error> {
        let Iommufd { backend, vms, .. } = self;
        let v = vms.get_mut(&vm).ok_or(Error::Invalid("no such VM"))?;
        let ioas = v.ioas(ioas_id)?;
        let all = iova == 0 && length == u64::MAX;
        let span = if all {
            (0, u64::MAX)
        } else {
            if iova == u64::MAX || length == u64::MAX {
                return Err(Error::Overflow);
            }
            if length == 0 {
                return Err(Error::Invalid("zero length"));
            }
            (iova, iova.checked_add(length - 1).ok_or(Error::Overflow)?)
        };
        let keys = ioas.areas_in(span);
        if keys.is_empty() {
            // iommufd: unmapping everything of an empty IOAS succeeds.
            return if all { Ok(0) } else { Err(Error::NotMapped) };
        }
        if keys
            .iter()
            .any(|k| ioas.areas[k].iova < span.0 || ioas.areas[k].last() > span.1)
        {
            return Err(Error::NotMapped);
        }
        let domains = v.domains_of(ioas);
        let mut unmapped = 0;
        let mut removed = Vec::new();
        {
            let ioas = v.ioas_mut(ioas_id)?;
            for k in keys {
                if let Some(area) = ioas.areas.remove(&k) {
                    unmapped += area.length;
                    removed.push(area);
                }
            }
        }
        for area in &removed {
            for &d in &domains {
                backend.unmap(d, area.iova, area.length, &mut v.budget);
            }
        }
        v.areas -= removed.len() as u32;
        Ok(unmapped)
    }

    /// `IOAS_COPY`: returns the destination IOVA.
    #[allow(clippy::too_many_arguments)]
    pub fn ioas_copy(
        &mut self,
        vm: VmId,
        dst_ioas: u32,
        src_ioas: u32,
        src_iova: u64,
        length: u64,
        fixed_dst_iova: Option<u64>,
        prot: Prot,
    ) -> Result<u64, Error> {
        if fixed_dst_iova == Some(u64::MAX) || src_iova == u64::MAX || length == u64::MAX {
            return Err(Error::Overflow);
        }
        let v = self.vm(vm)?;
        v.ioas(dst_ioas)?;
        let src = v.ioas(src_ioas)?;
        if !prot.read && !prot.write {
            return Err(Error::Invalid("mapping with neither read nor write"));
        }
        if length == 0 {
            return Err(Error::Invalid("zero length"));
        }
        if let Some(iova) = fixed_dst_iova {
            iova.checked_add(length - 1).ok_or(Error::Overflow)?;
        }
        let (chunks, writable) = src.chunks_for(src_iova, length)?;
        if prot.write && !writable {
            return Err(Error::NotPermitted("source range is not writable"));
        }
        if chunks
            .iter()
            .any(|c| !c.phys.is_page_aligned() || c.length % sluice_hal::PAGE_SIZE != 0)
        {
            return Err(Error::Invalid("source range not 4 KiB aligned"));
        }
        self.map_chunks(vm, dst_ioas, fixed_dst_iova, length, chunks, prot)
    }

    /// `IOAS_IOVA_RANGES`: the usable ranges and the IOVA alignment.
    pub fn ioas_iova_ranges(&self, vm: VmId, ioas_id: u32) -> Result<(Vec<Span>, u64), Error> {
        let ioas = self.vm(vm)?.ioas(ioas_id)?;
        Ok((ioas.usable_ranges(), ioas.iova_alignment()))
    }

    /// `IOAS_ALLOW_IOVAS`: replaces the allowed ranges.
    pub fn ioas_allow_iovas(
        &mut self,
        vm: VmId,
        ioas_id: u32,
        spans: Vec<Span>,
    ) -> Result<(), Error> {
        let v = self.vm_mut(vm)?;
        if spans.len() as u64 > u64::from(v.config.quota.max_allowed_ranges) {
            return Err(Error::QuotaExceeded("allowed ranges"));
        }
        let ioas = v.ioas_mut(ioas_id)?;
        let spans = ioas.check_allowed(spans)?;
        ioas.allowed = spans;
        Ok(())
    }

    /// `OPTION HUGE_PAGES`: get (`None`) or set.
    pub fn ioas_huge_pages(
        &mut self,
        vm: VmId,
        ioas_id: u32,
        set: Option<u64>,
    ) -> Result<u64, Error> {
        let v = self.vm_mut(vm)?;
        let ioas = v.ioas_mut(ioas_id)?;
        match set {
            None => Ok(u64::from(ioas.large_pages)),
            Some(val) if val > 1 => Err(Error::Invalid("HUGE_PAGES takes 0 or 1")),
            Some(val) => {
                // iommufd refuses to turn large pages off once domains hold
                // mappings (they may already use large pages).
                if val == 0 && ioas.large_pages && !ioas.hwpts.is_empty() && !ioas.areas.is_empty()
                {
                    return Err(Error::Invalid(
                        "cannot disable huge pages while HWPTs hold mappings",
                    ));
                }
                ioas.large_pages = val == 1;
                Ok(val)
            }
        }
    }

    // ------------------------------------------------------------- objects

    /// `DESTROY`.
    pub fn destroy(&mut self, vm: VmId, id: u32) -> Result<(), Error> {
        let Iommufd { backend, vms, .. } = self;
        let v = vms.get_mut(&vm).ok_or(Error::Invalid("no such VM"))?;
        match v.objects.get(&id) {
            None => Err(Error::NoSuchObject(id)),
            Some(Object::Device(_)) => Err(Error::ObjectBusy(id)),
            Some(Object::Ioas(ioas)) => {
                if !ioas.hwpts.is_empty() {
                    return Err(Error::ObjectBusy(id));
                }
                let n = ioas.areas.len() as u32;
                v.objects.remove(&id);
                v.areas -= n;
                Ok(())
            }
            Some(Object::Fault(f)) => {
                if f.users > 0 {
                    return Err(Error::ObjectBusy(id));
                }
                v.objects.remove(&id);
                Ok(())
            }
            Some(Object::Hwpt(h)) => {
                if h.users > 0 {
                    return Err(Error::ObjectBusy(id));
                }
                destroy_hwpt(backend, v, id);
                Ok(())
            }
        }
    }

    /// `FAULT_QUEUE_ALLOC`.
    pub fn fault_queue_alloc(&mut self, vm: VmId) -> Result<u32, Error> {
        let v = self.vm_mut(vm)?;
        v.check_object_quota()?;
        Ok(v.insert(Object::Fault(FaultQueue::default())))
    }

    /// `HWPT_ALLOC`: a paging HWPT on IOAS `pt_id` for bound device `dev_id`.
    pub fn hwpt_alloc(
        &mut self,
        vm: VmId,
        dev_id: u32,
        pt_id: u32,
        pasid: bool,
        fault: Option<u32>,
    ) -> Result<u32, Error> {
        let v = self.vm(vm)?;
        let dev = v.device(dev_id)?;
        match v.objects.get(&pt_id) {
            Some(Object::Ioas(_)) => {}
            Some(Object::Hwpt(_)) => {
                return Err(Error::NotSupported("nested HWPTs"));
            }
            _ => return Err(Error::NoSuchObject(pt_id)),
        }
        if let Some(f) = fault
            && !matches!(v.objects.get(&f), Some(Object::Fault(_)))
        {
            return Err(Error::NoSuchObject(f));
        }
        let info = self.assignment(dev.device)?;
        if pasid && effective_pasid_log2(&dev.caps, info) == 0 {
            return Err(Error::Invalid("device or IOMMU without PASID support"));
        }
        let config = DomainConfig {
            enforce_coherency: dev.caps.snoop_control,
            pasid_compatible: pasid,
        };
        let (device, caps) = (dev.device, dev.caps);
        self.create_hwpt(vm, pt_id, device, caps, config, false, fault)
    }

    fn assignment(&self, device: DeviceId) -> Result<&AssignedDevice, Error> {
        self.assignments
            .get(&device)
            .map(|a| &a.info)
            .ok_or(Error::NoSuchDevice)
    }

    #[allow(clippy::too_many_arguments)]
    fn create_hwpt(
        &mut self,
        vm: VmId,
        ioas_id: u32,
        device: DeviceId,
        caps: IommuCaps,
        config: DomainConfig,
        auto: bool,
        fault: Option<u32>,
    ) -> Result<u32, Error> {
        let Iommufd { backend, vms, .. } = self;
        let v = vms.get_mut(&vm).ok_or(Error::Invalid("no such VM"))?;
        v.check_object_quota()?;
        let ioas = match v.objects.get(&ioas_id) {
            Some(Object::Ioas(i)) => i,
            _ => return Err(Error::NoSuchObject(ioas_id)),
        };
        let min_page = caps.min_page_size();
        let aperture_last = caps.aperture_last();
        ioas.check_domain_fits(min_page, aperture_last)?;
        let domain = backend.domain_alloc(device, config, &mut v.budget)?;
        let mut done: Vec<&Area> = Vec::new();
        for area in ioas.areas.values() {
            if let Err(e) = map_into_domains(
                backend,
                &mut v.budget,
                &[domain],
                area.iova,
                &area.chunks,
                area.prot,
                ioas.large_pages,
            ) {
                for a in done {
                    backend.unmap(domain, a.iova, a.length, &mut v.budget);
                }
                backend.domain_free(domain, &mut v.budget);
                return Err(e);
            }
            done.push(area);
        }
        let id = v.insert(Object::Hwpt(Hwpt {
            ioas: ioas_id,
            domain,
            auto,
            config,
            unit: caps.unit,
            fault,
            users: 0,
            msi_pages: BTreeMap::new(),
        }));
        if let Some(f) = fault
            && let Ok(q) = v.fault_mut(f)
        {
            q.users += 1;
        }
        let ioas = v.ioas_mut(ioas_id)?;
        ioas.hwpts.insert(id, min_page);
        if aperture_last < u64::MAX {
            ioas.reserved.insert(
                ReserveOwner::Hwpt(id),
                alloc::vec![(aperture_last + 1, u64::MAX)],
            );
        }
        Ok(id)
    }
}

/// Frees a HWPT nothing uses: unmaps the IOAS from its domain, frees the
/// domain and drops its references.
fn destroy_hwpt<B: IommuBackend>(backend: &mut B, v: &mut Vm, id: u32) {
    let Some(Object::Hwpt(h)) = v.objects.remove(&id) else {
        return;
    };
    if let Some(Object::Ioas(ioas)) = v.objects.get_mut(&h.ioas) {
        for area in ioas.areas.values() {
            backend.unmap(h.domain, area.iova, area.length, &mut v.budget);
        }
        ioas.hwpts.remove(&id);
        ioas.reserved.remove(&ReserveOwner::Hwpt(id));
        ioas.reserved.remove(&ReserveOwner::MsiPages(id));
    }
    for &iova in h.msi_pages.values() {
        backend.unmap(h.domain, iova, PAGE_SIZE, &mut v.budget);
    }
    backend.domain_free(h.domain, &mut v.budget);
    if let Some(f) = h.fault
        && let Some(Object::Fault(q)) = v.objects.get_mut(&f)
    {
        q.users -= 1;
    }
}

mod devices;
