//! A test platform for host tests of the iommufd hypercall interface.
//!
//! [`Platform::builder`] describes VMs (their RAM and MMIO holes), the
//! devices assigned to them (guest BDF, group, PASID width, snoop control,
//! interrupt remapping, RMRRs, ...) and builds an [`Iommufd`] over an IOMMU
//! backend:
//!
//! * [`PlatformBuilder::build`]: the [`MockIommu`], which keeps translation
//!   state of its own;
//! * [`PlatformBuilder::build_vtd`]: Sluice's real VT-d backend
//!   ([`crate::iommufd::VtdBackend`]) and driver over register models of
//!   VT-d units ([`VtdModelIommu`]); the device capabilities become the
//!   units' capability registers, and DMAs go through the model's caches
//!   and fault registers;
//! * [`PlatformBuilder::build_smmu`]: Sluice's real SMMUv3 backend
//!   ([`crate::iommufd::smmu_backend::SmmuBackend`]) and driver over
//!   register models of SMMUs ([`SmmuModelIommu`]);
//! * [`PlatformBuilder::build_any`]: any of them, chosen by a
//!   [`BackendKind`], so one test function can run against every backend.
//!
//! Hypercalls go through [`Iommufd::dispatch`] — the same entry point
//! guests use — with their argument structs written into the VM's RAM;
//! [`Platform::dma`] tells where a (device, PASID, IOVA) DMA lands.
//!
//! ```
//! use sluice_abi::{self as abi, errno, map_flags};
//! use sluice_hypervisor::iommufd::VmId;
//! use sluice_hypervisor::testing::{DeviceSetup, DmaOutcome, Platform, VmSetup};
//!
//! let vm = VmId(1);
//! let nic = abi::bdf(0, 0, 3, 0);
//! let mut p = Platform::builder()
//!     .vm(vm, VmSetup::new().ram(0, 16 << 20))
//!     .device(DeviceSetup::new(vm, nic).group(7))
//!     .build();
//!
//! let ioas = p.ioas_alloc(vm).unwrap();
//! let dev = p.bind(vm, nic).unwrap().dev_id;
//! p.attach(vm, dev, ioas).unwrap();
//! let flags = map_flags::READABLE | map_flags::WRITEABLE | map_flags::FIXED_IOVA;
//! p.map(vm, ioas, 0x20_0000, 0x1000, Some(0x8000_0000), flags).unwrap();
//!
//! // The device now reaches guest RAM at 0x20_0000 through IOVA 0x8000_0000.
//! assert_eq!(
//!     p.dma(vm, nic, None, 0x8000_0010, true),
//!     DmaOutcome::Ram { vm, gpa: 0x20_0010 }
//! );
//! // Unmapping twice: the second call finds nothing (ENOENT, as iommufd).
//! assert_eq!(p.unmap(vm, ioas, 0x8000_0000, 0x1000), Ok(0x1000));
//! assert_eq!(p.unmap(vm, ioas, 0x8000_0000, 0x1000), Err(errno::ENOENT));
//! ```
//!
//! The same session on the VT-d backend:
//!
//! ```
//! use sluice_abi::{self as abi, map_flags};
//! use sluice_hypervisor::iommufd::{FaultReason, VmId};
//! use sluice_hypervisor::testing::{
//!     BackendKind, DeviceSetup, DmaOutcome, Platform, VmSetup, VtdFlavour,
//! };
//!
//! let vm = VmId(1);
//! let nic = abi::bdf(0, 0, 3, 0);
//! let mut p = Platform::builder()
//!     .vm(vm, VmSetup::new().ram(0, 16 << 20))
//!     .device(DeviceSetup::new(vm, nic))
//!     .build_any(BackendKind::Vtd(VtdFlavour::scalable()));
//!
//! let ioas = p.ioas_alloc(vm).unwrap();
//! let dev = p.bind(vm, nic).unwrap().dev_id;
//! p.attach(vm, dev, ioas).unwrap();
//! let flags = map_flags::READABLE | map_flags::FIXED_IOVA;
//! p.map(vm, ioas, 0x20_0000, 0x1000, Some(0x8000_0000), flags).unwrap();
//! assert_eq!(
//!     p.dma(vm, nic, None, 0x8000_0010, false),
//!     DmaOutcome::Ram { vm, gpa: 0x20_0010 }
//! );
//! // The model's page walk refuses the write; the fault reaches the
//! // backend's fault drain through the unit's fault-recording registers.
//! assert_eq!(
//!     p.dma(vm, nic, None, 0x8000_0010, true),
//!     DmaOutcome::Fault(FaultReason::Permission)
//! );
//! assert_eq!(p.unmap(vm, ioas, 0x8000_0000, 0x1000), Ok(0x1000));
//! assert_eq!(p.live_table_pages() as u64, p.iommufd.page_table_pages(vm));
//! ```

mod mock_iommu;
mod smmu_iommu;
mod vtd_iommu;

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::rc::Rc;
use alloc::vec::Vec;
use core::any::Any;

use sluice_abi::{self as abi, AbiStruct, cmd};
use sluice_hal::PhysAddr;
use sluice_hal::model::ModelMemory;

pub use mock_iommu::MockIommu;
pub use smmu_iommu::{FlakySmmu, SmmuFlavour, SmmuModelIommu};
pub use vtd_iommu::{FlakyMmio, VtdFlavour, VtdModelIommu};

/// An IOMMU backend the test platform can drive: the [`MockIommu`], or
/// Sluice's VT-d backend over register models ([`VtdModelIommu`]), so every
/// test here can run against the real driver too.
pub trait TestIommu: IommuBackend + 'static {
    /// Makes `device` known with these capabilities, in the blocking state.
    fn add_device(&mut self, device: DeviceId, caps: IommuCaps, flr: bool);
    /// Issues a DMA of `device` (with `pasid`) at `iova`: the host address
    /// it reaches, or why the IOMMU refused it (the refusal is recorded as a
    /// fault for [`IommuBackend::drain_faults`]).
    fn dma(
        &mut self,
        device: DeviceId,
        pasid: Option<u32>,
        iova: u64,
        write: bool,
    ) -> Result<PhysAddr, FaultReason>;
    /// Live domains.
    fn domain_count(&self) -> usize;
    /// Where the RID (or a PASID) of `device` points.
    fn attachment(&self, device: DeviceId, pasid: Option<u32>) -> AttachTarget;
    /// Function-level resets done on `device`.
    fn resets(&self, device: DeviceId) -> u32;
    /// Makes the attach to a domain after `successes` more successful ones
    /// fail once, as hardware that times out on an invalidation would.
    fn fail_attach_after(&mut self, successes: Option<u32>);
    /// How a live domain was made.
    fn domain_config(&self, domain: DomainId) -> Option<DomainConfig>;
    /// Page-table pages a live domain holds, as the backend itself counts
    /// them (what the VM's page budget must equal).
    fn domain_table_pages(&self, domain: DomainId) -> Option<u64>;
    /// Host pages the IOMMU holds besides domain page tables (VT-d root,
    /// context and PASID tables, invalidation queue); 0 for the mock.
    fn infrastructure_pages(&self) -> usize;
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

impl TestIommu for MockIommu {
    fn add_device(&mut self, device: DeviceId, caps: IommuCaps, flr: bool) {
        MockIommu::add_device(self, device, caps, flr);
    }
    fn dma(
        &mut self,
        device: DeviceId,
        pasid: Option<u32>,
        iova: u64,
        write: bool,
    ) -> Result<PhysAddr, FaultReason> {
        MockIommu::dma(self, device, pasid, iova, write)
    }
    fn domain_count(&self) -> usize {
        MockIommu::domain_count(self)
    }
    fn attachment(&self, device: DeviceId, pasid: Option<u32>) -> AttachTarget {
        MockIommu::attachment(self, device, pasid)
    }
    fn resets(&self, device: DeviceId) -> u32 {
        MockIommu::resets(self, device)
    }
    fn fail_attach_after(&mut self, successes: Option<u32>) {
        MockIommu::fail_attach_after(self, successes);
    }
    fn domain_config(&self, domain: DomainId) -> Option<DomainConfig> {
        MockIommu::domain_config(self, domain)
    }
    fn domain_table_pages(&self, domain: DomainId) -> Option<u64> {
        self.table_pages(domain)
    }
    fn infrastructure_pages(&self) -> usize {
        0
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// Which backend a platform built with [`PlatformBuilder::build_any`]
/// runs, so one test function can run against each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Mock,
    Vtd(VtdFlavour),
    /// Sluice's SMMUv3 backend and driver over register models
    /// ([`SmmuModelIommu`]).
    Smmu(SmmuFlavour),
}

impl BackendKind {
    pub fn is_vtd(&self) -> bool {
        matches!(self, BackendKind::Vtd(_))
    }
    pub fn is_smmu(&self) -> bool {
        matches!(self, BackendKind::Smmu(_))
    }
}

/// A platform whose backend is chosen at run time.
pub type AnyPlatform = Platform<Box<dyn TestIommu>>;

impl IommuBackend for Box<dyn TestIommu> {
    fn caps(&self, device: DeviceId) -> Result<IommuCaps, BackendError> {
        (**self).caps(device)
    }
    fn domain_alloc(
        &mut self,
        device: DeviceId,
        config: DomainConfig,
        budget: &mut PageBudget,
    ) -> Result<DomainId, BackendError> {
        (**self).domain_alloc(device, config, budget)
    }
    fn domain_free(&mut self, domain: DomainId, budget: &mut PageBudget) {
        (**self).domain_free(domain, budget)
    }
    fn map(
        &mut self,
        domain: DomainId,
        iova: u64,
        phys: PhysAddr,
        length: u64,
        prot: Prot,
        large_pages: bool,
        budget: &mut PageBudget,
    ) -> Result<(), BackendError> {
        (**self).map(domain, iova, phys, length, prot, large_pages, budget)
    }
    fn unmap(&mut self, domain: DomainId, iova: u64, length: u64, budget: &mut PageBudget) {
        (**self).unmap(domain, iova, length, budget)
    }
    fn attach(
        &mut self,
        device: DeviceId,
        pasid: Option<u32>,
        target: AttachTarget,
    ) -> Result<(), BackendError> {
        (**self).attach(device, pasid, target)
    }
    fn reset_device(&mut self, device: DeviceId) -> Result<(), BackendError> {
        (**self).reset_device(device)
    }
    fn drain_faults(&mut self, sink: &mut dyn FnMut(DmaFault)) {
        (**self).drain_faults(sink)
    }
}

impl TestIommu for Box<dyn TestIommu> {
    fn add_device(&mut self, device: DeviceId, caps: IommuCaps, flr: bool) {
        (**self).add_device(device, caps, flr)
    }
    fn dma(
        &mut self,
        device: DeviceId,
        pasid: Option<u32>,
        iova: u64,
        write: bool,
    ) -> Result<PhysAddr, FaultReason> {
        (**self).dma(device, pasid, iova, write)
    }
    fn domain_count(&self) -> usize {
        (**self).domain_count()
    }
    fn attachment(&self, device: DeviceId, pasid: Option<u32>) -> AttachTarget {
        (**self).attachment(device, pasid)
    }
    fn resets(&self, device: DeviceId) -> u32 {
        (**self).resets(device)
    }
    fn fail_attach_after(&mut self, successes: Option<u32>) {
        (**self).fail_attach_after(successes)
    }
    fn domain_config(&self, domain: DomainId) -> Option<DomainConfig> {
        (**self).domain_config(domain)
    }
    fn domain_table_pages(&self, domain: DomainId) -> Option<u64> {
        (**self).domain_table_pages(domain)
    }
    fn infrastructure_pages(&self) -> usize {
        (**self).infrastructure_pages()
    }
    fn as_any(&self) -> &dyn Any {
        (**self).as_any()
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        (**self).as_any_mut()
    }
}

use crate::iommufd::{
    ARM_SW_MSI_WINDOW, AssignedDevice, AttachTarget, BackendError, DeviceId, DmaFault,
    DomainConfig, DomainId, FaultReason, GuestMemory, GuestMemoryError, IommuBackend, IommuCaps,
    Iommufd, MsiWindow, PageBudget, Prot, VmConfig, VmId, X86_MSI_WINDOW,
};

/// Bytes at the top of a VM's first RAM range the harness uses for
/// argument structs and arrays; tests should not map them.
pub const SCRATCH_SIZE: u64 = 64 << 10;

/// Host-physical base of VM n's RAM (n from 1): far apart and below the
/// model allocator's page pool.
const fn host_base(index: u64) -> u64 {
    0x1000_0000 * index
}

/// The RAM of one test VM, backed by the shared [`ModelMemory`].
pub struct TestGuestMemory {
    host: Rc<ModelMemory>,
    /// (gpa, length, host address)
    ram: Vec<(u64, u64, u64)>,
    mmio: Vec<(u64, u64)>,
}

impl TestGuestMemory {
    fn find(&self, gpa: u64) -> Result<(u64, u64), GuestMemoryError> {
        for &(start, len, host) in &self.ram {
            if gpa >= start && gpa - start < len {
                return Ok((host + (gpa - start), len - (gpa - start)));
            }
        }
        if self.mmio.iter().any(|&(s, l)| gpa >= s && gpa - s < l) {
            return Err(GuestMemoryError::NotRam { gpa });
        }
        Err(GuestMemoryError::Unmapped { gpa })
    }

    fn walk(
        &self,
        gpa: u64,
        len: usize,
        mut f: impl FnMut(u64, usize, usize),
    ) -> Result<(), GuestMemoryError> {
        gpa.checked_add(len as u64)
            .ok_or(GuestMemoryError::Overflow)?;
        let mut done = 0usize;
        while done < len {
            let (host, avail) = self.find(gpa + done as u64)?;
            let n = (avail.min((len - done) as u64)) as usize;
            f(host, done, n);
            done += n;
        }
        Ok(())
    }

    /// The guest address of a host address inside this VM's RAM.
    pub fn host_to_gpa(&self, phys: PhysAddr) -> Option<u64> {
        let p = phys.as_u64();
        self.ram
            .iter()
            .find(|&&(_, len, host)| p >= host && p - host < len)
            .map(|&(gpa, _, host)| gpa + (p - host))
    }
}

impl GuestMemory for TestGuestMemory {
    fn read(&self, gpa: u64, out: &mut [u8]) -> Result<(), GuestMemoryError> {
        // Check the whole range first so a failed read has no effect.
        self.walk(gpa, out.len(), |_, _, _| {})?;
        let host = &self.host;
        self.walk(gpa, out.len(), |h, at, n| {
            host.peek(PhysAddr::new(h), &mut out[at..at + n])
        })
    }
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), GuestMemoryError> {
        self.walk(gpa, data.len(), |_, _, _| {})?;
        self.walk(gpa, data.len(), |h, at, n| {
            self.host.poke(PhysAddr::new(h), &data[at..at + n])
        })
    }
    fn ram_to_host(&self, gpa: u64) -> Result<(PhysAddr, u64), GuestMemoryError> {
        self.find(gpa).map(|(h, n)| (PhysAddr::new(h), n))
    }
}

/// A VM to build.
#[derive(Debug, Clone, Default)]
pub struct VmSetup {
    ram: Vec<(u64, u64)>,
    mmio: Vec<(u64, u64)>,
    config: VmConfig,
}

impl VmSetup {
    pub fn new() -> Self {
        Self::default()
    }
    /// Guest RAM `[gpa, gpa + length)`. Successive ranges are placed in host
    /// memory with a 1 MiB gap between them, so they are never contiguous.
    pub fn ram(mut self, gpa: u64, length: u64) -> Self {
        self.ram.push((gpa, length));
        self
    }
    /// An MMIO hole (not RAM: mapping it for DMA must fail).
    pub fn mmio(mut self, gpa: u64, length: u64) -> Self {
        self.mmio.push((gpa, length));
        self
    }
    pub fn config(mut self, config: VmConfig) -> Self {
        self.config = config;
        self
    }
}

/// A device to assign.
#[derive(Debug, Clone)]
pub struct DeviceSetup {
    vm: VmId,
    guest_bdf: u32,
    group: Option<u32>,
    caps: IommuCaps,
    rmrrs: Vec<(u64, u64)>,
    no_snoop: bool,
    flr: bool,
    pasid_log2: u8,
    msi_doorbell: Option<PhysAddr>,
}

impl DeviceSetup {
    /// A device with a well-behaved IOMMU: snoop control and interrupt
    /// remapping on, legacy (non-scalable) mode, 48-bit IOVAs, 4 KiB and
    /// 2 MiB pages, in a group of its own; it can issue no-snoop DMA and has
    /// FLR.
    pub fn new(vm: VmId, guest_bdf: u32) -> Self {
        Self {
            vm,
            guest_bdf,
            group: None,
            caps: IommuCaps {
                unit: 0,
                snoop_control: true,
                interrupt_remapping: true,
                scalable_mode: false,
                max_pasid_log2: 0,
                page_sizes: (1 << 12) | (1 << 21),
                input_address_bits: 48,
            },
            rmrrs: Vec::new(),
            no_snoop: true,
            flr: true,
            pasid_log2: 0,
            msi_doorbell: None,
        }
    }
    pub fn group(mut self, group: u32) -> Self {
        self.group = Some(group);
        self
    }
    pub fn unit(mut self, unit: u32) -> Self {
        self.caps.unit = unit;
        self
    }
    pub fn snoop_control(mut self, on: bool) -> Self {
        self.caps.snoop_control = on;
        self
    }
    pub fn interrupt_remapping(mut self, on: bool) -> Self {
        self.caps.interrupt_remapping = on;
        self
    }
    /// Scalable mode with `iommu_bits` of PASID in the IOMMU and
    /// `device_bits` in the device's PASID capability.
    pub fn pasid(mut self, iommu_bits: u8, device_bits: u8) -> Self {
        self.caps.scalable_mode = true;
        self.caps.max_pasid_log2 = iommu_bits;
        self.pasid_log2 = device_bits;
        self
    }
    pub fn rmrr(mut self, start: u64, last: u64) -> Self {
        self.rmrrs.push((start, last));
        self
    }
    pub fn no_snoop(mut self, on: bool) -> Self {
        self.no_snoop = on;
        self
    }
    pub fn flr(mut self, on: bool) -> Self {
        self.flr = on;
        self
    }
    pub fn input_address_bits(mut self, bits: u8) -> Self {
        self.caps.input_address_bits = bits;
        self
    }
    pub fn page_sizes(mut self, bitmap: u64) -> Self {
        self.caps.page_sizes = bitmap;
        self
    }
    /// The device's MSIs are writes to the doorbell page `page` (see
    /// [`PlatformBuilder::software_msi_window`]).
    pub fn msi_doorbell(mut self, page: u64) -> Self {
        self.msi_doorbell = Some(PhysAddr::new(page));
        self
    }
}

#[derive(Default)]
pub struct PlatformBuilder {
    vms: Vec<(VmId, VmSetup)>,
    devices: Vec<DeviceSetup>,
    host_devices: Vec<u32>,
    no_msi_window: bool,
    software_msi_window: bool,
}

impl PlatformBuilder {
    pub fn vm(mut self, vm: VmId, setup: VmSetup) -> Self {
        self.vms.push((vm, setup));
        self
    }
    pub fn device(mut self, device: DeviceSetup) -> Self {
        self.devices.push(device);
        self
    }
    /// A device the host keeps, in IOMMU `group`.
    pub fn host_device(mut self, group: u32) -> Self {
        self.host_devices.push(group);
        self
    }
    /// No MSI window (as on an SMMU without a software MSI region).
    pub fn without_msi_window(mut self) -> Self {
        self.no_msi_window = true;
        self
    }
    /// Arm's software-managed MSI window ([`ARM_SW_MSI_WINDOW`]) instead
    /// of the x86 one: doorbells are mapped into the HWPTs.
    pub fn software_msi_window(mut self) -> Self {
        self.software_msi_window = true;
        self
    }

    /// Builds the platform. Panics on an inconsistent description (a test
    /// bug, not guest input).
    pub fn build(self) -> Platform {
        self.build_with(MockIommu::new)
    }

    /// Builds the platform over Sluice's VT-d backend and driver, on
    /// register models of VT-d units ([`VtdModelIommu`]).
    pub fn build_vtd(self, flavour: VtdFlavour) -> Platform<VtdModelIommu> {
        self.build_with(|mem| VtdModelIommu::new(mem, flavour))
    }

    /// Builds the platform over Sluice's SMMUv3 backend and driver, on
    /// register models of SMMUs ([`SmmuModelIommu`]).
    pub fn build_smmu(self, flavour: SmmuFlavour) -> Platform<SmmuModelIommu> {
        self.build_with(|mem| SmmuModelIommu::new(mem, flavour))
    }

    /// Builds the platform over the backend `kind` names.
    pub fn build_any(self, kind: BackendKind) -> AnyPlatform {
        match kind {
            BackendKind::Mock => {
                self.build_with(|mem| Box::new(MockIommu::new(mem)) as Box<dyn TestIommu>)
            }
            BackendKind::Vtd(flavour) => self
                .build_with(|mem| Box::new(VtdModelIommu::new(mem, flavour)) as Box<dyn TestIommu>),
            BackendKind::Smmu(flavour) => self.build_with(|mem| {
                Box::new(SmmuModelIommu::new(mem, flavour)) as Box<dyn TestIommu>
            }),
        }
    }

    /// Builds the platform over another IOMMU backend, made from the shared
    /// host memory (page tables are allocated from it).
    pub fn build_with<B: TestIommu>(self, make: impl FnOnce(Rc<ModelMemory>) -> B) -> Platform<B> {
        let host = Rc::new(ModelMemory::new());
        let mut mock = make(host.clone());
        let mut devices = BTreeMap::new();
        for (n, d) in self.devices.iter().enumerate() {
            let id = DeviceId(n as u32 + 1);
            mock.add_device(id, d.caps, d.flr);
            devices.insert((d.vm, d.guest_bdf), id);
        }
        let msi = if self.no_msi_window {
            None
        } else if self.software_msi_window {
            Some(MsiWindow::SoftwareManaged(ARM_SW_MSI_WINDOW))
        } else {
            Some(MsiWindow::Bypass(X86_MSI_WINDOW))
        };
        let mut iommufd = Iommufd::new(mock, msi);
        for (n, &group) in self.host_devices.iter().enumerate() {
            iommufd.declare_host_device(DeviceId(0x1_0000 + n as u32), group);
        }
        let mut vms = BTreeMap::new();
        for (index, (vm, setup)) in self.vms.into_iter().enumerate() {
            iommufd
                .create_vm(vm, setup.config)
                .expect("VM IDs are unique");
            let mut host_at = host_base(index as u64 + 1);
            let mut ram = Vec::new();
            for (gpa, len) in &setup.ram {
                ram.push((*gpa, *len, host_at));
                host_at += len + (1 << 20);
            }
            vms.insert(
                vm,
                TestGuestMemory {
                    host: host.clone(),
                    ram,
                    mmio: setup.mmio.clone(),
                },
            );
        }
        for (n, d) in self.devices.into_iter().enumerate() {
            let id = DeviceId(n as u32 + 1);
            iommufd
                .assign_device(
                    d.vm,
                    AssignedDevice {
                        device: id,
                        guest_bdf: d.guest_bdf,
                        group: d.group.unwrap_or(1000 + n as u32),
                        rmrrs: d.rmrrs,
                        no_snoop: d.no_snoop,
                        flr: d.flr,
                        pasid_log2: d.pasid_log2,
                        msi_doorbell: d.msi_doorbell,
                    },
                )
                .expect("device assignment is consistent");
        }
        Platform {
            iommufd,
            host,
            vms,
            devices,
        }
    }
}

/// Where a DMA went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmaOutcome {
    /// Guest RAM of `vm`.
    Ram { vm: VmId, gpa: u64 },
    /// Host memory no VM owns (must never happen).
    Host(PhysAddr),
    /// Refused by the IOMMU.
    Fault(FaultReason),
}

/// What `DEVICE_BIND` returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bound {
    pub dev_id: u32,
    pub group: u32,
    pub group_bdfs: Vec<u32>,
}

/// The mock platform: the object model, its mock IOMMU, and the VMs' RAM.
pub struct Platform<B: TestIommu = MockIommu> {
    pub iommufd: Iommufd<B>,
    pub host: Rc<ModelMemory>,
    vms: BTreeMap<VmId, TestGuestMemory>,
    devices: BTreeMap<(VmId, u32), DeviceId>,
}

type CallResult<T> = Result<T, i64>;

/// Usable IOVA ranges and the IOVA alignment.
pub type IovaRanges = (Vec<(u64, u64)>, u64);

impl Platform {
    pub fn builder() -> PlatformBuilder {
        PlatformBuilder::default()
    }
}

impl<B: TestIommu> Platform<B> {
    pub fn memory(&self, vm: VmId) -> &TestGuestMemory {
        &self.vms[&vm]
    }

    /// Host pages held by IOMMU domain page tables: every live page of the
    /// shared memory except the IOMMU's own structures (none for the mock).
    /// Zero once every domain is freed, whatever the backend.
    pub fn live_table_pages(&self) -> usize {
        self.host.live_pages() - self.iommufd.backend().infrastructure_pages()
    }

    /// The VM's page-table pages as the backend counts them, over every
    /// HWPT of the VM: what [`Iommufd::page_table_pages`] must equal.
    pub fn backend_table_pages(&self, vm: VmId) -> u64 {
        self.iommufd
            .snapshot(vm)
            .hwpts
            .iter()
            .map(|h| {
                self.iommufd
                    .backend()
                    .domain_table_pages(h.domain)
                    .expect("every HWPT has a live domain")
            })
            .sum()
    }

    /// The platform's ID of the device the guest of `vm` sees at `guest_bdf`.
    pub fn device_id(&self, vm: VmId, guest_bdf: u32) -> DeviceId {
        self.devices[&(vm, guest_bdf)]
    }

    /// Where argument structs go: the top of the VM's first RAM range.
    pub fn scratch(&self, vm: VmId) -> u64 {
        let (gpa, len, _) = self.vms[&vm].ram[0];
        gpa + len - SCRATCH_SIZE
    }

    /// Issues a raw hypercall with the bytes `arg` at the scratch area.
    pub fn raw_call(&mut self, vm: VmId, command: u64, arg: &[u8]) -> (i64, Vec<u8>) {
        let gpa = self.scratch(vm);
        let mem = &self.vms[&vm];
        mem.write(gpa, arg).expect("scratch area is RAM");
        let r = self.iommufd.dispatch(vm, mem, command, gpa);
        let mut out = alloc::vec![0u8; arg.len()];
        mem.read(gpa, &mut out).expect("scratch area is RAM");
        (r, out)
    }

    /// Issues a hypercall with `arg` (its `size` set to the full struct) in
    /// guest memory; on return `arg` holds what the hypervisor wrote back.
    pub fn call<T: AbiStruct>(&mut self, vm: VmId, command: u64, arg: &mut T) -> i64 {
        let mut bytes = alloc::vec![0u8; T::SIZE];
        arg.encode(&mut bytes);
        bytes[..4].copy_from_slice(&(T::SIZE as u32).to_le_bytes());
        let (r, out) = self.raw_call(vm, command, &bytes);
        *arg = T::decode(&out);
        r
    }

    /// Dispatches `command` with its argument at any guest-physical address
    /// (to test arguments outside RAM).
    pub fn dispatch_at(&mut self, vm: VmId, command: u64, arg_gpa: u64) -> i64 {
        self.iommufd.dispatch(vm, &self.vms[&vm], command, arg_gpa)
    }

    /// Writes `bytes` into the scratch area at `offset` (for arrays).
    pub fn put_scratch(&self, vm: VmId, offset: u64, bytes: &[u8]) -> u64 {
        let gpa = self.scratch(vm) + offset;
        self.vms[&vm]
            .write(gpa, bytes)
            .expect("scratch area is RAM");
        gpa
    }

    pub fn get_scratch(&self, vm: VmId, offset: u64, out: &mut [u8]) {
        let gpa = self.scratch(vm) + offset;
        self.vms[&vm].read(gpa, out).expect("scratch area is RAM");
    }

    fn ok(r: i64) -> CallResult<()> {
        if r < 0 { Err(-r) } else { Ok(()) }
    }

    pub fn ioas_alloc(&mut self, vm: VmId) -> CallResult<u32> {
        let mut a = abi::IoasAlloc::default();
        Self::ok(self.call(vm, cmd::IOAS_ALLOC, &mut a))?;
        Ok(a.out_ioas_id)
    }

    pub fn destroy(&mut self, vm: VmId, id: u32) -> CallResult<()> {
        let mut a = abi::Destroy { size: 0, id };
        Self::ok(self.call(vm, cmd::DESTROY, &mut a))
    }

    /// `IOAS_MAP`; `iova` is used with `FIXED_IOVA` in `flags` (add it
    /// yourself). Returns the IOVA.
    pub fn map(
        &mut self,
        vm: VmId,
        ioas: u32,
        gpa: u64,
        length: u64,
        iova: Option<u64>,
        flags: u32,
    ) -> CallResult<u64> {
        let mut a = abi::IoasMap {
            size: 0,
            flags,
            ioas_id: ioas,
            reserved: 0,
            addr: gpa,
            length,
            iova: iova.unwrap_or(0),
        };
        Self::ok(self.call(vm, cmd::IOAS_MAP, &mut a))?;
        Ok(a.iova)
    }

    /// `IOAS_UNMAP`; returns the bytes unmapped.
    pub fn unmap(&mut self, vm: VmId, ioas: u32, iova: u64, length: u64) -> CallResult<u64> {
        let mut a = abi::IoasUnmap {
            size: 0,
            ioas_id: ioas,
            iova,
            length,
        };
        Self::ok(self.call(vm, cmd::IOAS_UNMAP, &mut a))?;
        Ok(a.length)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn copy(
        &mut self,
        vm: VmId,
        dst: u32,
        src: u32,
        src_iova: u64,
        length: u64,
        dst_iova: Option<u64>,
        flags: u32,
    ) -> CallResult<u64> {
        let mut a = abi::IoasCopy {
            size: 0,
            flags,
            dst_ioas_id: dst,
            src_ioas_id: src,
            length,
            dst_iova: dst_iova.unwrap_or(0),
            src_iova,
        };
        Self::ok(self.call(vm, cmd::IOAS_COPY, &mut a))?;
        Ok(a.dst_iova)
    }

    /// `IOAS_IOVA_RANGES` with room for `capacity` ranges: (ranges,
    /// alignment), or the errno and the count the hypervisor asked for.
    pub fn iova_ranges(
        &mut self,
        vm: VmId,
        ioas: u32,
        capacity: u32,
    ) -> Result<IovaRanges, (i64, u32)> {
        let array = self.scratch(vm) + 4096;
        let mut a = abi::IoasIovaRanges {
            size: 0,
            ioas_id: ioas,
            num_iovas: capacity,
            reserved: 0,
            allowed_iovas: array,
            out_iova_alignment: 0,
        };
        let r = self.call(vm, cmd::IOAS_IOVA_RANGES, &mut a);
        if r < 0 {
            return Err((-r, a.num_iovas));
        }
        let mut out = Vec::new();
        for i in 0..u64::from(a.num_iovas) {
            let mut raw = [0u8; 16];
            self.get_scratch(vm, 4096 + i * 16, &mut raw);
            let range = abi::IovaRange::decode(&raw);
            out.push((range.start, range.last));
        }
        Ok((out, a.out_iova_alignment))
    }

    pub fn allow_iovas(&mut self, vm: VmId, ioas: u32, ranges: &[(u64, u64)]) -> CallResult<()> {
        let mut bytes = Vec::new();
        for &(start, last) in ranges {
            let mut raw = [0u8; 16];
            abi::IovaRange { start, last }.encode(&mut raw);
            bytes.extend_from_slice(&raw);
        }
        let array = self.put_scratch(vm, 4096, &bytes);
        let mut a = abi::IoasAllowIovas {
            size: 0,
            ioas_id: ioas,
            num_iovas: ranges.len() as u32,
            reserved: 0,
            allowed_iovas: array,
        };
        Self::ok(self.call(vm, cmd::IOAS_ALLOW_IOVAS, &mut a))
    }

    /// `OPTION HUGE_PAGES`: `Some(v)` sets, `None` gets.
    pub fn huge_pages(&mut self, vm: VmId, ioas: u32, set: Option<u64>) -> CallResult<u64> {
        let mut a = abi::IommuOption {
            size: 0,
            option_id: abi::option::HUGE_PAGES,
            op: if set.is_some() {
                abi::option::OP_SET
            } else {
                abi::option::OP_GET
            },
            reserved: 0,
            object_id: ioas,
            val64: set.unwrap_or(0),
        };
        Self::ok(self.call(vm, cmd::OPTION, &mut a))?;
        Ok(a.val64)
    }

    /// `DEVICE_BIND` with room for 16 group members.
    pub fn bind(&mut self, vm: VmId, guest_bdf: u32) -> CallResult<Bound> {
        let array = self.scratch(vm) + 8192;
        let mut a = abi::DeviceBind {
            size: 0,
            flags: 0,
            guest_bdf,
            out_dev_id: 0,
            out_group_id: 0,
            num_group_devices: 16,
            group_devices: array,
        };
        Self::ok(self.call(vm, cmd::DEVICE_BIND, &mut a))?;
        let mut group_bdfs = Vec::new();
        for i in 0..u64::from(a.num_group_devices) {
            let mut raw = [0u8; 4];
            self.get_scratch(vm, 8192 + i * 4, &mut raw);
            group_bdfs.push(u32::from_le_bytes(raw));
        }
        Ok(Bound {
            dev_id: a.out_dev_id,
            group: a.out_group_id,
            group_bdfs,
        })
    }

    pub fn unbind(&mut self, vm: VmId, dev_id: u32) -> CallResult<()> {
        let mut a = abi::DeviceUnbind { size: 0, dev_id };
        Self::ok(self.call(vm, cmd::DEVICE_UNBIND, &mut a))
    }

    fn attach_cmd(
        &mut self,
        vm: VmId,
        command: u64,
        dev_id: u32,
        pasid: Option<u32>,
        pt_id: u32,
    ) -> CallResult<u32> {
        let mut a = abi::DeviceAttach {
            size: 0,
            flags: if pasid.is_some() {
                abi::attach_flags::PASID
            } else {
                0
            },
            dev_id,
            pt_id,
            pasid: pasid.unwrap_or(0),
            out_hwpt_id: 0,
        };
        Self::ok(self.call(vm, command, &mut a))?;
        Ok(a.out_hwpt_id)
    }

    /// `DEVICE_ATTACH` of the RID; returns the HWPT.
    pub fn attach(&mut self, vm: VmId, dev_id: u32, pt_id: u32) -> CallResult<u32> {
        self.attach_cmd(vm, cmd::DEVICE_ATTACH, dev_id, None, pt_id)
    }
    pub fn attach_pasid(
        &mut self,
        vm: VmId,
        dev_id: u32,
        pasid: u32,
        pt_id: u32,
    ) -> CallResult<u32> {
        self.attach_cmd(vm, cmd::DEVICE_ATTACH, dev_id, Some(pasid), pt_id)
    }
    pub fn replace(&mut self, vm: VmId, dev_id: u32, pt_id: u32) -> CallResult<u32> {
        self.attach_cmd(vm, cmd::DEVICE_REPLACE, dev_id, None, pt_id)
    }
    pub fn replace_pasid(
        &mut self,
        vm: VmId,
        dev_id: u32,
        pasid: u32,
        pt_id: u32,
    ) -> CallResult<u32> {
        self.attach_cmd(vm, cmd::DEVICE_REPLACE, dev_id, Some(pasid), pt_id)
    }

    pub fn detach(&mut self, vm: VmId, dev_id: u32, pasid: Option<u32>) -> CallResult<()> {
        let mut a = abi::DeviceDetach {
            size: 0,
            flags: if pasid.is_some() {
                abi::attach_flags::PASID
            } else {
                0
            },
            dev_id,
            pasid: pasid.unwrap_or(0),
        };
        Self::ok(self.call(vm, cmd::DEVICE_DETACH, &mut a))
    }

    /// `HWPT_ALLOC` with `flags` (`hwpt_flags`), and a fault queue if given.
    pub fn hwpt_alloc(
        &mut self,
        vm: VmId,
        dev_id: u32,
        ioas: u32,
        flags: u32,
        fault: Option<u32>,
    ) -> CallResult<u32> {
        let mut a = abi::HwptAlloc {
            size: 0,
            flags: flags
                | if fault.is_some() {
                    abi::hwpt_flags::FAULT_ID_VALID
                } else {
                    0
                },
            dev_id,
            pt_id: ioas,
            fault_id: fault.unwrap_or(0),
            ..Default::default()
        };
        Self::ok(self.call(vm, cmd::HWPT_ALLOC, &mut a))?;
        Ok(a.out_hwpt_id)
    }

    pub fn hw_info(&mut self, vm: VmId, dev_id: u32) -> CallResult<abi::HwInfo> {
        let mut a = abi::HwInfo {
            dev_id,
            ..Default::default()
        };
        Self::ok(self.call(vm, cmd::GET_HW_INFO, &mut a))?;
        Ok(a)
    }

    /// `DEVICE_LIST` with room for 32 devices.
    pub fn device_list(&mut self, vm: VmId) -> CallResult<Vec<abi::DeviceInfo>> {
        let array = self.scratch(vm) + 4096;
        let mut a = abi::DeviceList {
            num_devices: 32,
            devices: array,
            ..Default::default()
        };
        Self::ok(self.call(vm, cmd::DEVICE_LIST, &mut a))?;
        let mut out = Vec::new();
        for i in 0..u64::from(a.num_devices) {
            let mut raw = [0u8; abi::DeviceInfo::SIZE];
            self.get_scratch(vm, 4096 + i * abi::DeviceInfo::SIZE as u64, &mut raw);
            out.push(abi::DeviceInfo::decode(&raw));
        }
        Ok(out)
    }

    pub fn fault_queue_alloc(&mut self, vm: VmId) -> CallResult<u32> {
        let mut a = abi::FaultAlloc::default();
        Self::ok(self.call(vm, cmd::FAULT_QUEUE_ALLOC, &mut a))?;
        Ok(a.out_fault_id)
    }

    /// `FAULT_READ` of up to `max` records: (records, overflow count).
    pub fn fault_read(
        &mut self,
        vm: VmId,
        fault_id: u32,
        max: u32,
    ) -> CallResult<(Vec<abi::FaultRecord>, u64)> {
        self.iommufd.process_faults();
        let array = self.scratch(vm) + 4096;
        let mut a = abi::FaultRead {
            fault_id,
            num_records: max,
            records: array,
            ..Default::default()
        };
        Self::ok(self.call(vm, cmd::FAULT_READ, &mut a))?;
        let mut out = Vec::new();
        for i in 0..u64::from(a.num_records) {
            let mut raw = [0u8; abi::FaultRecord::SIZE];
            self.get_scratch(vm, 4096 + i * abi::FaultRecord::SIZE as u64, &mut raw);
            out.push(abi::FaultRecord::decode(&raw));
        }
        Ok((out, a.out_overflow))
    }

    pub fn wbinvd_policy(&mut self, vm: VmId) -> CallResult<u32> {
        let mut a = abi::WbinvdPolicy::default();
        Self::ok(self.call(vm, cmd::WBINVD_POLICY, &mut a))?;
        Ok(a.out_policy)
    }

    pub fn vpasid_set(&mut self, vm: VmId, dev_id: u32, vpasid: u32, pasid: u32) -> CallResult<()> {
        let mut a = abi::VpasidSet {
            dev_id,
            vpasid,
            pasid,
            ..Default::default()
        };
        Self::ok(self.call(vm, cmd::VPASID_SET, &mut a))
    }

    pub fn vpasid_clear(&mut self, vm: VmId, vpasid: u32) -> CallResult<()> {
        let mut a = abi::VpasidClear { size: 0, vpasid };
        Self::ok(self.call(vm, cmd::VPASID_CLEAR, &mut a))
    }

    /// Where a DMA by the device `vm` sees at `guest_bdf` lands (recording a
    /// fault in the mock IOMMU if it is refused).
    pub fn dma(
        &mut self,
        vm: VmId,
        guest_bdf: u32,
        pasid: Option<u32>,
        iova: u64,
        write: bool,
    ) -> DmaOutcome {
        let dev = self.device_id(vm, guest_bdf);
        match self.iommufd.backend_mut().dma(dev, pasid, iova, write) {
            Err(reason) => DmaOutcome::Fault(reason),
            Ok(phys) => {
                for (&owner, mem) in &self.vms {
                    if let Some(gpa) = mem.host_to_gpa(phys) {
                        return DmaOutcome::Ram { vm: owner, gpa };
                    }
                }
                DmaOutcome::Host(phys)
            }
        }
    }
}
