//! The real VT-d backend ([`VtdBackend`] over [`VtdUnit`]s) driving
//! register models of VT-d units ([`VtdModel`]), as a [`TestIommu`].
//!
//! Each device's [`IommuCaps`] become the capability registers of the unit
//! it sits behind: snoop control is ECAP.SC, PASID support is scalable
//! mode with ECAP.PASID/PSS, page sizes are CAP.SLLPS, the input width is
//! CAP.MGAW/SAGAW. Devices whose capabilities (and test unit number) are
//! equal share a unit; others get one each, because on VT-d these are
//! properties of the unit, not of the device. Units whose devices ask for
//! interrupt remapping get ECAP.IR and have it enabled, as the boot code
//! does. What the backend then reports comes from the driver's decoding of
//! the registers and its own state, not from the test's request.
//!
//! A DMA goes through [`VtdModel::dma`]: through the model's context,
//! PASID and IOTLB caches (so a forgotten invalidation shows up as a stale
//! translation), and a refused DMA lands in the fault-recording registers,
//! where the backend's [`IommuBackend::drain_faults`] finds it.
//!
//! The units borrow their register model, memory and clock for `'static`,
//! as on bare metal: the test platform leaks those (a few kilobytes per
//! platform, in tests only).

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::rc::Rc;
use alloc::vec::Vec;
use core::any::Any;
use core::cell::{Cell, RefCell};

use sluice_hal::model::{ModelClock, ModelMemory};
use sluice_hal::{Mmio, PhysAddr};
use sluice_iommu::vtd::model::{self, VtdModel};
use sluice_iommu::vtd::regs;
use sluice_iommu::vtd::walker::{DmaRequest, TranslationFault};
use sluice_iommu::vtd::{CapBuilder, IrConfig, ModeRequest, VtdConfig, VtdUnit};
use sluice_pci::Bdf;

use super::TestIommu;
use crate::iommufd::{
    AttachTarget, BackendError, DeviceId, DmaFault, DomainConfig, DomainId, FaultReason,
    FunctionReset, IommuBackend, IommuCaps, PageBudget, Prot, ResetError, VtdBackend, VtdDevice,
};

/// Host address width of the modelled platform (DMAR HAW + 1).
const HAW: u32 = 46;

/// The unit features a test platform does not take from device
/// capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VtdFlavour {
    /// Scalable mode for every unit (units of PASID-capable devices are
    /// scalable anyway).
    pub scalable: bool,
    /// CAP.CM: not-present entries may be cached, so every new mapping and
    /// attachment needs an invalidation (QEMU's `caching-mode=on`).
    pub caching_mode: bool,
    /// ECAP.C (and SMPWC): the unit's walks snoop CPU caches.
    pub coherent: bool,
    /// CAP.RWBF: table writes need a write-buffer flush.
    pub write_buffer_flush: bool,
}

impl VtdFlavour {
    /// Legacy mode, coherent walks, no caching mode.
    pub const fn legacy() -> Self {
        Self {
            scalable: false,
            caching_mode: false,
            coherent: true,
            write_buffer_flush: false,
        }
    }
    /// Scalable mode with second-level domains, non-coherent walks.
    pub const fn scalable() -> Self {
        Self {
            scalable: true,
            caching_mode: false,
            coherent: false,
            write_buffer_flush: false,
        }
    }
    /// Legacy mode in caching mode with write-buffer flushing, as a
    /// virtual IOMMU may be.
    pub const fn caching_mode() -> Self {
        Self {
            scalable: false,
            caching_mode: true,
            coherent: false,
            write_buffer_flush: true,
        }
    }
}

/// The register model behind a unit, with one fault to inject: a lost
/// doorbell (a write to IQT the unit never sees), after which the driver's
/// wait for its invalidation times out, as with hardware that stopped
/// fetching. The next doorbell carries the lost descriptors too.
pub struct FlakyMmio {
    model: &'static VtdModel<'static>,
    lose_next_doorbell: Cell<bool>,
    lost: Cell<u32>,
}

impl Mmio for FlakyMmio {
    fn read32(&self, offset: usize) -> u32 {
        self.model.read32(offset)
    }
    fn write32(&self, offset: usize, value: u32) {
        self.model.write32(offset, value)
    }
    fn read64(&self, offset: usize) -> u64 {
        self.model.read64(offset)
    }
    fn write64(&self, offset: usize, value: u64) {
        if offset == regs::IQT.offset() && self.lose_next_doorbell.replace(false) {
            self.lost.set(self.lost.get() + 1);
            return;
        }
        self.model.write64(offset, value)
    }
}

struct TestUnit {
    /// The test's unit number and the registers derived for it.
    key: (u32, CapBuilder, bool),
    index: u32,
    model: &'static VtdModel<'static>,
    mmio: &'static FlakyMmio,
}

/// Counts the function-level resets the backend asks for.
struct RecordingReset(Rc<RefCell<BTreeMap<Bdf, u32>>>);

impl FunctionReset for RecordingReset {
    fn function_level_reset(&mut self, rid: Bdf) -> Result<(), ResetError> {
        *self.0.borrow_mut().entry(rid).or_default() += 1;
        Ok(())
    }
}

/// A [`TestIommu`] running Sluice's VT-d backend and driver over register
/// models. See the module documentation.
pub struct VtdModelIommu {
    backend: VtdBackend<'static>,
    mem: &'static ModelMemory,
    clock: &'static ModelClock,
    flavour: VtdFlavour,
    units: Vec<TestUnit>,
    /// Device → (test unit, requester ID).
    devices: BTreeMap<DeviceId, (usize, Bdf)>,
    resets: Rc<RefCell<BTreeMap<Bdf, u32>>>,
    fail_attach_after: Option<u32>,
}

impl VtdModelIommu {
    pub fn new(mem: Rc<ModelMemory>, flavour: VtdFlavour) -> Self {
        let mem: &'static ModelMemory = Box::leak(Box::new(mem));
        let clock: &'static ModelClock = Box::leak(Box::new(ModelClock::new(1_000)));
        let resets = Rc::new(RefCell::new(BTreeMap::new()));
        let mut backend = VtdBackend::new();
        backend.set_function_reset(Box::new(RecordingReset(resets.clone())));
        Self {
            backend,
            mem,
            clock,
            flavour,
            units: Vec::new(),
            devices: BTreeMap::new(),
            resets,
            fail_attach_after: None,
        }
    }

    pub fn backend(&self) -> &VtdBackend<'static> {
        &self.backend
    }

    pub fn backend_mut(&mut self) -> &mut VtdBackend<'static> {
        &mut self.backend
    }

    /// The register model of the unit translating `device`.
    pub fn model(&self, device: DeviceId) -> Option<&'static VtdModel<'static>> {
        let &(u, _) = self.devices.get(&device)?;
        Some(self.units[u].model)
    }

    /// The requester ID the device was given.
    pub fn requester_id(&self, device: DeviceId) -> Option<Bdf> {
        self.devices.get(&device).map(|&(_, rid)| rid)
    }

    /// A DMA with the model's full outcome (snooping, IOTLB hit) or the
    /// walker's fault; a fault is recorded in the unit's fault registers.
    pub fn dma_outcome(
        &self,
        device: DeviceId,
        pasid: Option<u32>,
        iova: u64,
        write: bool,
    ) -> Result<model::DmaOutcome, TranslationFault> {
        let &(u, rid) = self
            .devices
            .get(&device)
            .unwrap_or_else(|| panic!("device {} not added", device.0));
        self.units[u].model.dma(DmaRequest {
            sid: rid.requester_id(),
            pasid,
            iova,
            write,
        })
    }

    /// Programming errors any model saw (empty for a correct driver).
    pub fn violations(&self) -> Vec<&'static str> {
        self.units
            .iter()
            .flat_map(|u| u.model.violations())
            .collect()
    }

    /// The unit registers a device with these capabilities sits behind.
    fn registers(&self, caps: &IommuCaps) -> (CapBuilder, bool) {
        let four_k = 1u64 << 12;
        let (two_m, one_g) = (1u64 << 21, 1u64 << 30);
        assert!(
            caps.page_sizes & four_k != 0 && caps.page_sizes & !(four_k | two_m | one_g) == 0,
            "VT-d pages are 4 KiB, 2 MiB and 1 GiB: {:#x} cannot be modelled",
            caps.page_sizes
        );
        let sllps = match (caps.page_sizes & two_m != 0, caps.page_sizes & one_g != 0) {
            (false, false) => 0,
            (true, false) => 0b01,
            (true, true) => 0b11,
            (false, true) => panic!("1 GiB pages without 2 MiB pages cannot be modelled"),
        };
        let sagaw = match caps.input_address_bits {
            39 => 0b0010,
            48 => 0b0110,
            bits => panic!("a {bits}-bit VT-d unit is not modelled (39 or 48)"),
        };
        let scalable = self.flavour.scalable || caps.scalable_mode;
        let coherent = self.flavour.coherent;
        let regs = CapBuilder {
            nd: 6,
            rwbf: self.flavour.write_buffer_flush,
            caching_mode: self.flavour.caching_mode,
            sagaw,
            mgaw: u32::from(caps.input_address_bits),
            // 256 fault-recording registers at 0x400, IOTLB registers at
            // 0x300: enough records for every test between two drains.
            fro: 0x40,
            sllps,
            psi: true,
            nfr: 256,
            mamv: 18,
            drain: true,
            fl1gp: false,
            fl5lp: false,
            coherent,
            qi: true,
            dt: false,
            // Enabled after bring-up (`unit_for`); the backend reports
            // whether it is on.
            ir: caps.interrupt_remapping,
            eim: false,
            pt: true,
            sc: caps.snoop_control,
            iro: 0x30,
            nest: false,
            prs: false,
            pasid_bits: if caps.scalable_mode {
                caps.max_pasid_log2
            } else {
                0
            },
            smts: scalable,
            slts: scalable,
            flts: scalable,
            smpwc: scalable && coherent,
            rps: scalable,
            ver: if scalable { 0x30 } else { 0x10 },
        };
        (regs, scalable)
    }

    fn unit_for(&mut self, caps: &IommuCaps) -> usize {
        let (regs, scalable) = self.registers(caps);
        let key = (caps.unit, regs, scalable);
        if let Some(n) = self.units.iter().position(|u| u.key == key) {
            return n;
        }
        let model: &'static VtdModel<'static> =
            Box::leak(Box::new(VtdModel::new(self.mem, regs, HAW)));
        let mmio: &'static FlakyMmio = Box::leak(Box::new(FlakyMmio {
            model,
            lose_next_doorbell: Cell::new(false),
            lost: Cell::new(0),
        }));
        let n = self.units.len();
        let config = VtdConfig {
            mode: if scalable {
                ModeRequest::Scalable
            } else {
                ModeRequest::Legacy
            },
            // 1000 polls of the 1 us model clock.
            timeout_ns: 1_000_000,
            ..VtdConfig::new(n as u32, 0xfed9_0000 + 0x1000 * n as u64, HAW)
        };
        let mut unit = VtdUnit::init(mmio, self.mem, self.clock, config)
            .unwrap_or_else(|e| panic!("VT-d model unit {n} did not come up: {e}"));
        if caps.interrupt_remapping {
            unit.enable_interrupt_remapping(IrConfig { x2apic: false })
                .unwrap_or_else(|e| panic!("VT-d model unit {n}: interrupt remapping: {e}"));
        }
        let index = self.backend.add_unit(unit);
        self.units.push(TestUnit {
            key,
            index,
            model,
            mmio,
        });
        n
    }

    /// Pages the units' own structures hold (root, queue, context and
    /// PASID tables) plus pages kept out of use after failed invalidations:
    /// everything the units hold besides domain tables.
    pub fn structure_pages(&self) -> usize {
        self.units
            .iter()
            .filter_map(|u| self.backend.unit(u.index))
            .map(|u| u.structure_pages() + u.quarantined_pages())
            .sum()
    }
}

/// How a refused DMA looks to the guest, read from the walker's fault
/// (which, unlike the fault record, tells an unmapped page from a missing
/// permission). A malformed structure is a driver bug: the test fails.
fn walker_reason(f: TranslationFault) -> FaultReason {
    use TranslationFault::*;
    match f {
        RootNotPresent
        | ContextNotPresent
        | TranslationTypeBlocked
        | PasidNotEnabled
        | PasidBeyondDirectory
        | PasidDirNotPresent
        | PasidEntryNotPresent => FaultReason::Blocked,
        NotPresent { .. } | AddressBeyondWidth | NonCanonical => FaultReason::NotPresent,
        WriteDenied | ReadDenied => FaultReason::Permission,
        ContextInvalid | PasidEntryInvalid | Reserved { .. } => {
            panic!("the driver wrote malformed translation structures: {f:?}")
        }
    }
}

impl IommuBackend for VtdModelIommu {
    fn caps(&self, device: DeviceId) -> Result<IommuCaps, BackendError> {
        self.backend.caps(device)
    }
    fn domain_alloc(
        &mut self,
        device: DeviceId,
        config: DomainConfig,
        budget: &mut PageBudget,
    ) -> Result<DomainId, BackendError> {
        self.backend.domain_alloc(device, config, budget)
    }
    fn domain_free(&mut self, domain: DomainId, budget: &mut PageBudget) {
        self.backend.domain_free(domain, budget)
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
        self.backend
            .map(domain, iova, phys, length, prot, large_pages, budget)
    }
    fn unmap(&mut self, domain: DomainId, iova: u64, length: u64, budget: &mut PageBudget) {
        self.backend.unmap(domain, iova, length, budget)
    }
    fn attach(
        &mut self,
        device: DeviceId,
        pasid: Option<u32>,
        target: AttachTarget,
    ) -> Result<(), BackendError> {
        let inject = matches!(target, AttachTarget::Domain(_))
            && match self.fail_attach_after {
                Some(0) => {
                    self.fail_attach_after = None;
                    true
                }
                Some(n) => {
                    self.fail_attach_after = Some(n - 1);
                    false
                }
                None => false,
            };
        let Some(&(u, _)) = self.devices.get(&device) else {
            return self.backend.attach(device, pasid, target);
        };
        let mmio = self.units[u].mmio;
        if !inject {
            return self.backend.attach(device, pasid, target);
        }
        let lost = mmio.lost.get();
        mmio.lose_next_doorbell.set(true);
        let r = self.backend.attach(device, pasid, target);
        mmio.lose_next_doorbell.set(false);
        assert_eq!(
            mmio.lost.get(),
            lost + 1,
            "the attach needed no invalidation on this unit, so no failure \
             could be injected (use a caching-mode flavour)"
        );
        r
    }
    fn reset_device(&mut self, device: DeviceId) -> Result<(), BackendError> {
        self.backend.reset_device(device)
    }
    fn drain_faults(&mut self, sink: &mut dyn FnMut(DmaFault)) {
        self.backend.drain_faults(sink)
    }
}

impl TestIommu for VtdModelIommu {
    fn add_device(&mut self, device: DeviceId, caps: IommuCaps, flr: bool) {
        let u = self.unit_for(&caps);
        // Bus 1 onwards, so requester IDs never collide with the tests'
        // guest BDFs by accident and exercise a non-zero bus.
        let rid = Bdf::from_requester_id(0x0100u16.wrapping_add(device.0 as u16));
        assert!(
            self.devices.values().all(|&(_, r)| r != rid),
            "device {} would share requester ID {rid}",
            device.0
        );
        self.backend
            .add_device(
                device,
                VtdDevice {
                    unit: self.units[u].index,
                    rid,
                    aliases: Vec::new(),
                    flr,
                },
            )
            .unwrap_or_else(|e| panic!("device {}: {e}", device.0));
        self.devices.insert(device, (u, rid));
    }

    fn dma(
        &mut self,
        device: DeviceId,
        pasid: Option<u32>,
        iova: u64,
        write: bool,
    ) -> Result<PhysAddr, FaultReason> {
        self.dma_outcome(device, pasid, iova, write)
            .map(|o| o.phys)
            .map_err(walker_reason)
    }

    fn domain_count(&self) -> usize {
        self.backend.domain_count()
    }

    fn attachment(&self, device: DeviceId, pasid: Option<u32>) -> AttachTarget {
        self.backend.attachment(device, pasid)
    }

    fn resets(&self, device: DeviceId) -> u32 {
        self.requester_id(device)
            .and_then(|rid| self.resets.borrow().get(&rid).copied())
            .unwrap_or(0)
    }

    fn fail_attach_after(&mut self, successes: Option<u32>) {
        self.fail_attach_after = successes;
    }

    fn domain_config(&self, domain: DomainId) -> Option<DomainConfig> {
        self.backend.domain_config(domain)
    }

    fn domain_table_pages(&self, domain: DomainId) -> Option<u64> {
        let (unit, vtd) = self.backend.vtd_domain(domain)?;
        let info = self.backend.unit(unit)?.domain_info(vtd).ok()?;
        Some(info.table_pages as u64)
    }

    fn infrastructure_pages(&self) -> usize {
        self.structure_pages()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
